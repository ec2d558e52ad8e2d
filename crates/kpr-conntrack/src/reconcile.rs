//! Which conntrack flows are stale (§6.2, upstream's `pkg/proxy/conntrack/cleanup.go`).

use crate::flow::{Flow, UDP};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

/// A UDP service port with at least one serving endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpServicePort {
    /// ClusterIP, externalIPs and load-balancer IPs.
    pub frontends: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `ip:port` of every serving endpoint (traffic policy, topology and terminating state
    /// deliberately ignored).
    pub serving: BTreeSet<SocketAddr>,
}

/// The flows to delete: UDP flows to a frontend `ip:port` (or any address at the node port)
/// of such a service port whose reply source is not one of its serving endpoints. Flows cached
/// while the Service had no endpoints (reply source = the frontend itself) go too.
pub fn stale<'a>(flows: &'a [Flow], ports: &[UdpServicePort]) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| f.proto == UDP)
        .filter(|f| {
            ports.iter().any(|p| {
                let to_frontend =
                    f.orig_dst.port() == p.port && p.frontends.contains(&f.orig_dst.ip());
                let to_node_port = p.node_port == Some(f.orig_dst.port());
                (to_frontend || to_node_port) && !p.serving.contains(&f.reply_src)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    fn flow(proto: u8, dst: &str, reply: &str) -> Flow {
        Flow::new(
            proto,
            (sa("10.0.0.5:40000"), sa(dst)),
            (sa(reply), sa("10.0.0.5:40000")),
        )
    }

    #[test]
    fn t6_2_flows_to_removed_endpoints_go_others_stay() {
        let dns = UdpServicePort {
            frontends: vec!["172.30.0.10".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))],
            port: 53,
            node_port: Some(30053),
            serving: [sa("10.0.0.12:5353")].into_iter().collect(),
        };
        let flows = vec![
            flow(UDP, "172.30.0.10:53", "10.0.0.11:5353"), // removed endpoint: stale
            flow(UDP, "172.30.0.10:53", "10.0.0.12:5353"), // serving: kept
            flow(UDP, "172.30.0.10:53", "172.30.0.10:53"), // cached with no endpoints: stale
            flow(UDP, "192.168.0.2:30053", "10.0.0.11:5353"), // node port, any address: stale
            flow(6, "172.30.0.10:53", "10.0.0.11:5353"),   // TCP: never (T6.2.3)
            flow(UDP, "172.30.0.99:53", "10.0.0.11:5353"), // not a Service: kept
        ];
        let gone: Vec<usize> = stale(&flows, &[dns])
            .into_iter()
            .map(|f| flows.iter().position(|x| x == f).unwrap_or(99))
            .collect();
        assert_eq!(gone, [0, 2, 3]);
    }
}
