//! Conntrack for kube-proxy-rs (§6.2): after a sync that changed the endpoints of a UDP
//! Service, flows whose DNAT target is no longer a serving endpoint are deleted, so UDP clients
//! (DNS resolvers) do not keep sending into a removed pod.
//!
//! [`reconcile`] decides (pure); [`netlink`] lists and deletes flows in the kernel. [`sysctl`]
//! sets the conntrack sysctls at startup (§6.1).

pub mod netlink;
pub mod reconcile;
pub mod sysctl;

pub use reconcile::{Flow, UdpServicePort, stale};
