//! This node's facts and the proxy-wide policy the model needs to decide endpoints and
//! masquerading: node name, zone, node IPs, PodCIDRs (§2.2, §3.4) and local-traffic detection
//! (§4.10).

use crate::names::IpFamily;
use crate::objects::Node;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The zone label (§3.4, §5.2).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The cluster-autoscaler taint that makes `/healthz` report the node ineligible (§7.1).
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// What the model reads from this node's Node object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Per family: the first InternalIP, else the first ExternalIP (§2.2).
    pub node_ips: BTreeMap<IpFamily, IpAddr>,
    /// `spec.podCIDRs` (valid entries, in order).
    pub pod_cidrs: Vec<IpNet>,
    /// Has a deletionTimestamp or the ToBeDeletedByClusterAutoscaler taint.
    pub being_deleted: bool,
}

impl NodeFacts {
    /// Reads the facts from a Node object. Invalid addresses and CIDRs are ignored.
    pub fn from_node(node: &Node) -> NodeFacts {
        let name = node.metadata.name.clone().unwrap_or_default();
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let mut node_ips = BTreeMap::new();
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default();
        for wanted in ["InternalIP", "ExternalIP"] {
            for a in addresses.iter().filter(|a| a.type_ == wanted) {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    node_ips.entry(IpFamily::of(&ip)).or_insert(ip);
                }
            }
        }
        let spec = node.spec.as_ref();
        let pod_cidrs = spec
            .and_then(|s| {
                s.pod_cidrs
                    .clone()
                    .or_else(|| s.pod_cidr.clone().map(|c| vec![c]))
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse::<IpNet>().ok())
            .collect();
        let tainted = spec
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == TAINT_TO_BE_DELETED);
        NodeFacts {
            name,
            labels,
            node_ips,
            pod_cidrs,
            being_deleted: tainted || node.metadata.deletion_timestamp.is_some(),
        }
    }

    pub fn zone(&self) -> Option<&str> {
        self.labels.get(LABEL_ZONE).map(String::as_str)
    }
}

/// This node as the endpoint decisions see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    /// The node name (lower-cased), used to tell local endpoints and node hints.
    pub name: String,
    /// The zone label, if the Node has one.
    pub zone: Option<String>,
    /// Per family: the node IP (§2.2), from the Node or `--bind-address`.
    pub node_ips: BTreeMap<IpFamily, IpAddr>,
}

impl NodeContext {
    /// A node context from the configured name and, when known, the Node's facts.
    pub fn new(name: impl Into<String>, facts: Option<&NodeFacts>) -> NodeContext {
        NodeContext {
            name: name.into(),
            zone: facts.and_then(|f| f.zone()).map(str::to_owned),
            node_ips: facts.map(|f| f.node_ips.clone()).unwrap_or_default(),
        }
    }
}

/// How "from a local pod" is decided for one family (§4.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDetector {
    /// No detector for this family: off-node ClusterIP traffic is not masqueraded and the pod
    /// short-circuit of ETP=Local is disabled.
    None,
    /// Source address inside this CIDR.
    Cidr(IpNet),
    /// Input interface equal to this bridge.
    BridgeInterface(String),
    /// Input interface name starting with this prefix.
    InterfaceNamePrefix(String),
}

impl LocalDetector {
    pub fn is_some(&self) -> bool {
        !matches!(self, LocalDetector::None)
    }

    /// Whether a packet with this source and input interface comes from a local pod.
    pub fn matches(&self, src: IpAddr, iif: Option<&str>) -> bool {
        match self {
            LocalDetector::None => false,
            LocalDetector::Cidr(net) => net.contains(&src),
            LocalDetector::BridgeInterface(b) => iif == Some(b.as_str()),
            LocalDetector::InterfaceNamePrefix(p) => iif.is_some_and(|i| i.starts_with(p.as_str())),
        }
    }
}

/// `detectLocalMode` with what it needs (§4.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocalMode {
    /// The configured `clusterCIDR` list (at most one per family).
    ClusterCidr(Vec<IpNet>),
    /// The Node's `spec.podCIDRs`.
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
}

impl DetectLocalMode {
    /// The detector for one family; CIDR modes use the first CIDR of that family.
    pub fn detector(&self, family: IpFamily, node: Option<&NodeFacts>) -> LocalDetector {
        let first = |cidrs: &[IpNet]| {
            cidrs
                .iter()
                .find(|c| IpFamily::of(&c.addr()) == family)
                .map_or(LocalDetector::None, |c| LocalDetector::Cidr(*c))
        };
        match self {
            DetectLocalMode::ClusterCidr(cidrs) => first(cidrs),
            DetectLocalMode::NodeCidr => node.map_or(LocalDetector::None, |n| first(&n.pod_cidrs)),
            DetectLocalMode::BridgeInterface(b) => LocalDetector::BridgeInterface(b.clone()),
            DetectLocalMode::InterfaceNamePrefix(p) => {
                LocalDetector::InterfaceNamePrefix(p.clone())
            }
        }
    }
}

/// Proxy-wide settings the model's decisions depend on, resolved per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPolicy {
    pub masquerade_all: bool,
    pub detectors: BTreeMap<IpFamily, LocalDetector>,
}

impl ProxyPolicy {
    /// Resolves the detectors of both families from the mode and the Node (if known).
    pub fn new(
        masquerade_all: bool,
        mode: &DetectLocalMode,
        node: Option<&NodeFacts>,
    ) -> ProxyPolicy {
        let detectors = IpFamily::ALL
            .iter()
            .map(|f| (*f, mode.detector(*f, node)))
            .collect();
        ProxyPolicy {
            masquerade_all,
            detectors,
        }
    }

    pub fn detector(&self, family: IpFamily) -> &LocalDetector {
        self.detectors.get(&family).unwrap_or(&LocalDetector::None)
    }
}
