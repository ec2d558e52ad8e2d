//! Where a new connection should go, according to the desired state alone.
//!
//! The model's statement of intent for §4: given a packet (source, input interface, whether it
//! comes from this host, destination) it answers DNAT to which endpoints (and whether each is
//! masqueraded), DROP, REJECT or PASS. Backends' packet tracers are checked against it, and
//! `--dry-run` and the explain tools use it to say where a packet will go.

use crate::desired::{Endpoint, ExternalAction, FamilyDesired, InternalAction, ServicePortDesired};
use crate::names::Protocol;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A new connection's first packet, as the proxy sees it before DNAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    /// Input interface (for interface-based local detection); `None` for locally generated.
    pub iif: Option<String>,
    /// The source address is local to this host (`fib saddr type local`).
    pub from_host: bool,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// Facts about the node that are not in the desired state (they come from interfaces).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostView {
    /// Addresses that accept NodePorts; `None` = every local address except loopback.
    pub node_port_ips: Option<Vec<IpAddr>>,
    /// This host's addresses (used when `node_port_ips` is `None`).
    pub local_ips: Vec<IpAddr>,
    /// The nftables mode's `cluster-ips-check` (§4.8): a ClusterIP with an undefined port is
    /// rejected, and an address of a ServiceCIDR that no Service uses is dropped. The iptables
    /// mode passes both, as upstream.
    pub reject_unknown_cluster_ports: bool,
}

/// A DNAT target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub addr: SocketAddr,
    pub masquerade: bool,
}

/// The verdict for a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Rewritten to one of these endpoints, picked at random.
    Dnat(Vec<Target>),
    Drop,
    Reject,
    /// Not touched by the proxy.
    Pass,
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Intent::Dnat(targets) => {
                f.write_str("DNAT to ")?;
                for (i, t) in targets.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    let masq = if t.masquerade { " (masquerade)" } else { "" };
                    write!(f, "{sep}{}{masq}", t.addr)?;
                }
                Ok(())
            }
            Intent::Drop => f.write_str("DROP"),
            Intent::Reject => f.write_str("REJECT"),
            Intent::Pass => f.write_str("PASS"),
        }
    }
}

/// Which frontend a packet hit.
enum Hit<'a> {
    Internal(&'a ServicePortDesired),
    External(&'a ServicePortDesired, bool),
    UnknownClusterPort,
    /// An address inside a ServiceCIDR that no Service uses.
    Unallocated,
    None,
}

/// Decides what happens to a new connection (§4).
pub fn intent(fam: &FamilyDesired, host: &HostView, pkt: &Packet) -> Intent {
    let pod = fam.detector.matches(pkt.src, pkt.iif.as_deref());
    match find(fam, host, pkt) {
        Hit::None => Intent::Pass,
        Hit::UnknownClusterPort if host.reject_unknown_cluster_ports => Intent::Reject,
        Hit::UnknownClusterPort => Intent::Pass,
        Hit::Unallocated if host.reject_unknown_cluster_ports => Intent::Drop,
        Hit::Unallocated => Intent::Pass,
        Hit::Internal(sp) => {
            let masq = fam.masquerade_all || (fam.detector.is_some() && !pod);
            match sp.internal {
                InternalAction::Reject => Intent::Reject,
                InternalAction::Drop => Intent::Drop,
                InternalAction::Cluster => dnat(&sp.cluster_endpoints, masq, pkt.src),
                InternalAction::Local => dnat(&sp.local_endpoints, masq, pkt.src),
            }
        }
        Hit::External(sp, via_lb) => {
            let action = sp.external.unwrap_or(ExternalAction::Reject);
            if action == ExternalAction::Reject && pkt.from_host {
                return Intent::Reject;
            }
            if via_lb
                && !sp.firewall_allow.is_empty()
                && !sp.firewall_allow.iter().any(|n| n.contains(&pkt.src))
            {
                return Intent::Drop;
            }
            match action {
                ExternalAction::Reject => Intent::Reject,
                ExternalAction::Cluster => dnat(&sp.cluster_endpoints, true, pkt.src),
                ExternalAction::Local if pod => dnat(&sp.cluster_endpoints, false, pkt.src),
                ExternalAction::Local if pkt.from_host => {
                    dnat(&sp.cluster_endpoints, true, pkt.src)
                }
                ExternalAction::Local if sp.local_endpoints.is_empty() => Intent::Drop,
                ExternalAction::Local => dnat(&sp.local_endpoints, false, pkt.src),
            }
        }
    }
}

fn find<'a>(fam: &'a FamilyDesired, host: &HostView, pkt: &Packet) -> Hit<'a> {
    let same = |sp: &ServicePortDesired| sp.protocol == pkt.protocol && sp.port == pkt.port;
    let mut cluster_ip_seen = false;
    for sp in fam.ports.values() {
        if sp.cluster_ip == pkt.dst {
            if same(sp) {
                return Hit::Internal(sp);
            }
            cluster_ip_seen = true;
        }
        if same(sp) && sp.load_balancer_ips.contains(&pkt.dst) {
            return Hit::External(sp, true);
        }
        if same(sp) && sp.external_ips.contains(&pkt.dst) {
            return Hit::External(sp, false);
        }
    }
    if cluster_ip_seen {
        return Hit::UnknownClusterPort;
    }
    let accepts_node_port = match &host.node_port_ips {
        Some(ips) => ips.contains(&pkt.dst),
        None => host.local_ips.contains(&pkt.dst) && !pkt.dst.is_loopback(),
    };
    if accepts_node_port {
        let hit = fam
            .ports
            .values()
            .find(|sp| sp.protocol == pkt.protocol && sp.node_port == Some(pkt.port));
        if let Some(sp) = hit {
            return Hit::External(sp, false);
        }
    }
    if fam.service_cidrs.iter().any(|n| n.contains(&pkt.dst)) {
        return Hit::Unallocated;
    }
    Hit::None
}

/// DNAT to a set; an endpoint that is the packet's own source is always masqueraded (hairpin).
fn dnat(set: &[Endpoint], masquerade: bool, src: IpAddr) -> Intent {
    if set.is_empty() {
        return Intent::Drop;
    }
    Intent::Dnat(
        set.iter()
            .map(|e| Target {
                addr: e.addr,
                masquerade: masquerade || e.addr.ip() == src,
            })
            .collect(),
    )
}
