//! Conntrack for kube-proxy-rs (§6.2): after a sync that changed the endpoints of a UDP
//! Service, flows whose DNAT target is no longer a serving endpoint are deleted, so UDP clients
//! (DNS resolvers) do not keep sending into a removed pod.
//!
//! [`reconcile`] decides (pure); [`netlink`] lists and deletes flows in the kernel (the only
//! code here that talks to it).

pub mod netlink;
pub mod reconcile;

pub use reconcile::{Flow, UdpServicePort, stale};
