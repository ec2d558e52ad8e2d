//! Endpoint selection: which endpoints each kind of traffic may use (§5.1, §5.2).
//!
//! A pure port of upstream's `CategorizeEndpoints` (pkg/proxy/topology.go): the Cluster set
//! (topology-filtered ready endpoints, else serving-terminating ones anywhere), the Local set
//! (local ready, else local serving-terminating; hints ignored) and whether any usable endpoint
//! exists at all (REJECT vs DROP, §4.8).

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// One endpoint of one service port, merged from all slices, with what selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName` equals this node's name.
    pub local: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl EndpointInfo {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// What a service port uses: derived from its policies (§3.2 "Derived").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uses {
    /// ITP=Cluster, or the port accepts external traffic at all (short-circuits need it).
    pub cluster: bool,
    /// ITP=Local, or ETP=Local on an externally accessible port.
    pub local: bool,
}

/// The topology mode chosen for a service port (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// The result of categorizing: indexes into the input slice, in input order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Categorized {
    pub cluster: Vec<usize>,
    pub local: Vec<usize>,
    /// Union of both sets: the endpoints that need DNAT targets, in input order.
    pub all: Vec<usize>,
    pub has_any: bool,
}

/// Picks the topology mode from the ready endpoints' hints, once, up front (§5.2).
pub fn topology_mode(endpoints: &[EndpointInfo], node: &str, zone: Option<&str>) -> TopologyMode {
    let ready = || endpoints.iter().filter(|e| e.ready);
    let all_node_hints = ready().all(|e| !e.node_hints.is_empty());
    if all_node_hints && ready().any(|e| e.node_hints.contains(node)) {
        return TopologyMode::PreferSameNode;
    }
    let all_zone_hints = ready().all(|e| !e.zone_hints.is_empty());
    if let Some(zone) = zone
        && all_zone_hints
        && ready().any(|e| e.zone_hints.contains(zone))
    {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

/// Splits a service port's endpoints into the Cluster and Local sets (§5.1).
pub fn categorize(
    endpoints: &[EndpointInfo],
    uses: Uses,
    node: &str,
    zone: Option<&str>,
) -> Categorized {
    let pick = |f: &dyn Fn(&EndpointInfo) -> bool| -> Vec<usize> {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| f(e))
            .map(|(i, _)| i)
            .collect()
    };
    let mut out = Categorized::default();
    if uses.cluster {
        let mode = topology_mode(endpoints, node, zone);
        out.cluster = pick(&|e| {
            e.ready
                && match mode {
                    TopologyMode::None => true,
                    TopologyMode::PreferSameNode => e.node_hints.contains(node),
                    TopologyMode::PreferSameZone => zone.is_some_and(|z| e.zone_hints.contains(z)),
                }
        });
        if out.cluster.is_empty() {
            out.cluster = pick(&|e| e.serving_terminating());
        }
        out.has_any = !out.cluster.is_empty();
    }
    if uses.local {
        out.has_any |= endpoints.iter().any(|e| e.ready || e.serving_terminating());
        out.local = pick(&|e| e.local && e.ready);
        if out.local.is_empty() {
            out.local = pick(&|e| e.local && e.serving_terminating());
        }
    }
    let mut all: Vec<usize> = out
        .cluster
        .iter()
        .chain(out.local.iter())
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    out.all = all;
    out
}
