//! The iptables side of kube-proxy: for now, removing what upstream kube-proxy's iptables mode
//! leaves behind (§13.6), so switching to kube-proxy-rs's nftables mode needs no manual step
//! (§2.1 step 4). The iptables backend itself lands with its own issue.

pub mod cleanup;
pub mod exec;
