//! Conntrack for kube-proxy-rs (§6.2): after a sync that changed the endpoints of a UDP
//! Service, flows whose DNAT target is no longer a serving endpoint are deleted, so UDP clients
//! (DNS resolvers) do not keep sending into a removed pod.
//!
//! [`reconcile`] decides (pure); [`netlink`] lists and deletes flows in the kernel ([`Flow`]:
//! both tuples, status, state, timeout; `kube-proxy-rs conntrack` shows them). [`sysctl`] sets
//! the conntrack sysctls at startup (§6.1).

pub mod flow;
pub mod netlink;
pub mod reconcile;
pub mod sysctl;

pub use flow::Flow;
pub use reconcile::{UdpServicePort, stale};
