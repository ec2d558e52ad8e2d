//! The desired state: what every backend must make the kernel do, per family, per service port.
//!
//! [`desired()`] is a pure function of the [`ClusterState`], this node's [`NodeContext`] and the
//! [`ProxyPolicy`]; [`update_desired()`] recomputes only the Services a [`SyncPlan`] names and is
//! property-tested to equal a fresh full build. The traffic decisions of §4 (which endpoint set
//! internal and external traffic use; DROP vs REJECT) are made here, once, for all backends.

use crate::names::{IpFamily, Protocol, ServiceName, ServicePortName};
use crate::node::{LocalDetector, NodeContext, ProxyPolicy};
use crate::parse::{ParsedService, ParsedSlice};
use crate::state::{ClusterState, SyncPlan};
use crate::topology::{EndpointInfo, Uses, categorize};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Service ports to what each must do (ordered: output is deterministic).
pub type PortMap = imbl::OrdMap<ServicePortName, Arc<ServicePortDesired>>;

/// Everything the kernel should do, both families.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub families: BTreeMap<IpFamily, FamilyDesired>,
}

/// One family's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyDesired {
    pub family: IpFamily,
    /// How "from a local pod" is detected for this family (§4.10).
    pub detector: LocalDetector,
    pub masquerade_all: bool,
    /// This node's IP of this family (§2.2), if known.
    pub node_ip: Option<IpAddr>,
    /// A persistent map of shared (`Arc`) entries: a backend's committed copy and a debug
    /// snapshot are O(1) copies, and an update after one copies only the path to the entry.
    pub ports: PortMap,
    /// The family's ServiceCIDR ranges (§4.8): the nftables mode drops new connections to an
    /// address in them that no Service uses. Sorted, without repeats.
    pub service_cidrs: Vec<IpNet>,
}

/// An endpoint chosen for a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// On this node.
    pub local: bool,
    /// Ready; otherwise it is a serving-terminating fallback endpoint.
    pub ready: bool,
}

/// Where ClusterIP traffic goes (§4.1, §4.3, §4.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternalAction {
    /// DNAT to the Cluster set.
    Cluster,
    /// DNAT to the Local set (ITP=Local).
    Local,
    /// ITP=Local with endpoints only elsewhere.
    Drop,
    /// No usable endpoint anywhere.
    Reject,
}

/// Where external traffic (NodePort, externalIP, LB IP) goes (§4.2, §4.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalAction {
    /// ETP=Cluster: masquerade, DNAT to the Cluster set.
    Cluster,
    /// ETP=Local: ordinary sources to the Local set without masquerade (DROP when it is empty);
    /// local pods short-circuit to the Cluster set; host-local sources masquerade to the
    /// Cluster set.
    Local,
    /// No usable endpoint anywhere.
    Reject,
}

/// One service port in one family: its frontends, policies and chosen endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortDesired {
    pub name: ServicePortName,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// Sources allowed to reach the LB IPs; empty means no firewall (§4.6). Includes the LB
    /// IPs themselves when this node's IP is inside a range.
    pub firewall_allow: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// Every endpoint that needs a DNAT target: the union of the two sets, sorted. The same
    /// allocation as `cluster_endpoints` when they are equal (most ports).
    pub endpoints: Arc<[Endpoint]>,
    /// The Cluster set (§5.1), sorted.
    pub cluster_endpoints: Arc<[Endpoint]>,
    /// The Local set (§5.1), sorted.
    pub local_endpoints: Vec<Endpoint>,
    /// Some endpoint anywhere is ready or serving-terminating.
    pub has_any_endpoints: bool,
    pub internal: InternalAction,
    /// `None` when the port has no external frontend in this family.
    pub external: Option<ExternalAction>,
}

impl ServicePortDesired {
    /// Has a NodePort, an LB IP or an externalIP (§3.2 *ExternallyAccessible*).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    /// Counted in `sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}`.
    pub fn no_local_internal(&self) -> bool {
        self.internal == InternalAction::Drop
    }

    /// Counted in `sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"}`.
    pub fn no_local_external(&self) -> bool {
        self.external_policy_local && self.has_any_endpoints && self.local_endpoints.is_empty()
    }
}

impl FamilyDesired {
    fn empty(family: IpFamily, node: &NodeContext, policy: &ProxyPolicy) -> FamilyDesired {
        FamilyDesired {
            family,
            detector: policy.detector(family).clone(),
            masquerade_all: policy.masquerade_all,
            node_ip: node.node_ips.get(&family).copied(),
            ports: PortMap::new(),
            service_cidrs: Vec::new(),
        }
    }

    /// (internal, external) counts of service ports with a Local policy and no local endpoint.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let internal = self
            .ports
            .values()
            .filter(|p| p.no_local_internal())
            .count();
        let external = self
            .ports
            .values()
            .filter(|p| p.no_local_external())
            .count();
        (internal, external)
    }
}

/// Computes the whole desired state.
pub fn desired(state: &ClusterState, node: &NodeContext, policy: &ProxyPolicy) -> DesiredState {
    let mut out = DesiredState::default();
    for family in IpFamily::ALL {
        let mut fam = FamilyDesired::empty(family, node, policy);
        fam.service_cidrs = state.service_cidrs(family);
        out.families.insert(family, fam);
    }
    for svc in state.services() {
        insert_service(&mut out, state, svc, node);
    }
    out
}

/// Brings `current` up to date with the state: a full rebuild when the plan says so, otherwise
/// only the changed Services are recomputed.
pub fn update_desired(
    current: &mut DesiredState,
    state: &ClusterState,
    node: &NodeContext,
    policy: &ProxyPolicy,
    plan: &SyncPlan,
) {
    if plan.full || current.families.len() != IpFamily::ALL.len() {
        // The old state goes first: a full sync never holds two of them.
        *current = DesiredState::default();
        *current = desired(state, node, policy);
        return;
    }
    if plan.service_cidrs {
        for (family, fam) in current.families.iter_mut() {
            fam.service_cidrs = state.service_cidrs(*family);
        }
    }
    for name in &plan.changed_services {
        for fam in current.families.values_mut() {
            remove_service(fam, name);
        }
        if let Some(svc) = state.service(name) {
            insert_service(current, state, svc, node);
        }
    }
}

fn remove_service(fam: &mut FamilyDesired, name: &ServiceName) {
    let first = ServicePortName::new(name.clone(), "", Protocol::Tcp);
    let doomed: Vec<ServicePortName> = fam
        .ports
        .range(first..)
        .take_while(|(k, _)| k.service == *name)
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        fam.ports.remove(&k);
    }
}

fn insert_service(
    out: &mut DesiredState,
    state: &ClusterState,
    svc: &ParsedService,
    node: &NodeContext,
) {
    for (family, fam) in out.families.iter_mut() {
        let Some(cluster_ip) = svc.cluster_ips.get(family).copied() else {
            continue;
        };
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == *family)
                .copied()
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let external_ips = of_family(&svc.external_ips);
        let load_balancer_ips = of_family(&svc.load_balancer_ips);
        let firewall_allow = firewall(svc, *family, &load_balancer_ips, fam.node_ip);
        let slices: Vec<&ParsedSlice> = state
            .slices(&svc.name)
            .filter(|s| s.family == *family)
            .collect();
        for port in &svc.ports {
            let name = ServicePortName::new(svc.name.clone(), port.name.clone(), port.protocol);
            let infos = merge_endpoints(&slices, &port.name, port.protocol, &node.name);
            let mut sp = ServicePortDesired {
                name: name.clone(),
                cluster_ip,
                port: port.port,
                protocol: port.protocol,
                node_port: port.node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                firewall_allow: firewall_allow.clone(),
                affinity_timeout: svc.affinity_timeout,
                external_policy_local: svc.external_policy_local,
                internal_policy_local: svc.internal_policy_local,
                health_check_node_port: svc.health_check_node_port,
                endpoints: Arc::from([]),
                cluster_endpoints: Arc::from([]),
                local_endpoints: Vec::new(),
                has_any_endpoints: false,
                internal: InternalAction::Reject,
                external: None,
            };
            decide(&mut sp, &infos, node);
            fam.ports.insert(name, Arc::new(sp));
        }
    }
}

/// Chooses the endpoint sets and the internal/external actions (§4.2, §4.3, §4.8, §5.1).
fn decide(sp: &mut ServicePortDesired, infos: &[EndpointInfo], node: &NodeContext) {
    let accessible = sp.externally_accessible();
    let uses = Uses {
        cluster: !sp.internal_policy_local || accessible,
        local: sp.internal_policy_local || (sp.external_policy_local && accessible),
    };
    let cat = categorize(infos, uses, &node.name, node.zone.as_deref());
    let endpoint = |i: &usize| Endpoint {
        addr: infos[*i].addr,
        local: infos[*i].local,
        ready: infos[*i].ready,
    };
    sp.cluster_endpoints = cat.cluster.iter().map(endpoint).collect();
    sp.local_endpoints = cat.local.iter().map(endpoint).collect();
    sp.endpoints = if cat.all == cat.cluster {
        sp.cluster_endpoints.clone()
    } else {
        cat.all.iter().map(endpoint).collect()
    };
    sp.has_any_endpoints = cat.has_any;
    sp.internal = if !cat.has_any {
        InternalAction::Reject
    } else if sp.internal_policy_local {
        if sp.local_endpoints.is_empty() {
            InternalAction::Drop
        } else {
            InternalAction::Local
        }
    } else {
        InternalAction::Cluster
    };
    let external = if !cat.has_any {
        ExternalAction::Reject
    } else if sp.external_policy_local {
        ExternalAction::Local
    } else {
        ExternalAction::Cluster
    };
    sp.external = accessible.then_some(external);
}

/// The firewall allow-list for LB IPs (§4.6): active only with an LB IP and a range of this
/// family; the VIPs are allowed as sources when the node's IP is inside a range.
fn firewall(
    svc: &ParsedService,
    family: IpFamily,
    lb_ips: &[IpAddr],
    node_ip: Option<IpAddr>,
) -> Vec<IpNet> {
    let mut ranges: Vec<IpNet> = svc
        .source_ranges
        .iter()
        .filter(|r| IpFamily::of(&r.addr()) == family)
        .copied()
        .collect();
    if lb_ips.is_empty() || ranges.is_empty() {
        return Vec::new();
    }
    if node_ip.is_some_and(|ip| ranges.iter().any(|r| r.contains(&ip))) {
        ranges.extend(lb_ips.iter().map(|ip| IpNet::from(*ip)));
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

/// Merges one service port's endpoints from all its slices of one family (§3.3): ports match by
/// name and protocol; the same ip:port in several slices keeps the non-terminating entry; the
/// result is sorted by (ip, port).
pub(crate) fn merge_endpoints(
    slices: &[&ParsedSlice],
    port_name: &str,
    protocol: Protocol,
    node: &str,
) -> Vec<EndpointInfo> {
    let mut merged: BTreeMap<SocketAddr, EndpointInfo> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let info = EndpointInfo {
                addr: SocketAddr::new(ep.ip, port.port),
                ready: ep.ready && !ep.terminating,
                serving: ep.serving,
                terminating: ep.terminating,
                local: ep.node_name() == Some(node),
                zone_hints: ep.zone_hints().clone(),
                node_hints: ep.node_hints().clone(),
            };
            match merged.get(&info.addr) {
                Some(existing) if !existing.terminating || info.terminating => {}
                _ => {
                    merged.insert(info.addr, info);
                }
            }
        }
    }
    merged.into_values().collect()
}

impl ClusterState {
    /// One service port's endpoints of one family, merged from its slices as the desired
    /// state merges them (§3.3), with what selection reads.
    pub fn endpoint_infos(
        &self,
        port: &ServicePortName,
        family: crate::names::IpFamily,
        node: &str,
    ) -> Vec<crate::topology::EndpointInfo> {
        let slices: Vec<&ParsedSlice> = self
            .slices(&port.service)
            .filter(|s| s.family == family)
            .collect();
        merge_endpoints(&slices, &port.port, port.protocol, node)
    }
}
