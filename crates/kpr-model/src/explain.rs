//! Why a packet goes where it goes: the model's intent for one packet, with its reasons.
//!
//! [`explain`] answers the question an operator asks of a Service ("which pod will this request
//! hit, and why not that one?") from the same state the backends render: the frontend the
//! packet hits, the source-range firewall, the traffic policy that applies, every endpoint of
//! the port with why it is in or out of the chosen set, the verdict (with each target's
//! probability), masquerading and session affinity. The verdict is [`crate::intent::intent`]'s,
//! so the explanation can never disagree with what the backends are checked against. Pure: the
//! caller supplies the state, the node and the packet.

use crate::desired::{ExternalAction, FamilyDesired, InternalAction, ServicePortDesired};
use crate::intent::{HostView, Intent, Packet, intent};
use crate::names::IpFamily;
use crate::node::{LocalDetector, NodeContext};
use crate::state::ClusterState;
use crate::topology::{EndpointInfo, TopologyMode, topology_mode};
use serde::Serialize;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

/// The answer for one packet.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub packet: PacketView,
    pub family: IpFamily,
    /// The frontend hit, if any.
    pub frontend: Option<Frontend>,
    /// Why nothing was hit, or what else is worth knowing about the frontend.
    pub note: Option<String>,
    /// The loadBalancerSourceRanges check (LB IPs with ranges only).
    pub firewall: Option<Firewall>,
    /// The traffic policy that applies.
    pub policy: Option<Policy>,
    /// The topology mode the endpoints were chosen under (`none`, `PreferSameZone`,
    /// `PreferSameNode`).
    pub topology: Option<String>,
    /// Every endpoint of the service port, in or out of the chosen set, with why.
    pub endpoints: Vec<EndpointView>,
    pub verdict: Verdict,
    pub masquerade: Option<Masquerade>,
    /// ClientIP session affinity timeout in seconds, when on.
    pub affinity_timeout_seconds: Option<u32>,
}

/// The packet as asked about.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PacketView {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Sent by a process of this node (not forwarded).
    pub from_node: bool,
}

/// A frontend of a service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Frontend {
    /// `ClusterIP`, `NodePort`, `externalIP` or `LoadBalancer`.
    pub kind: String,
    /// The address and port hit.
    pub address: String,
    /// The service port, `namespace/name:port`.
    pub service_port: String,
    pub namespace: String,
    pub service: String,
    /// The port's name (empty when unnamed).
    pub port_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Firewall {
    pub allowed: bool,
    /// The source ranges (and LB IPs, when the node is inside a range).
    pub ranges: Vec<String>,
    /// The range that let the packet in.
    pub matched: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `internal` or `external`.
    pub traffic: String,
    /// `Cluster` or `Local`: the endpoint set used.
    pub set: String,
    pub why: String,
}

/// One endpoint of the port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub address: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub local: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
    /// In the set the packet's traffic uses.
    pub chosen: bool,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// `DNAT`, `DROP`, `REJECT` or `PASS`.
    pub action: String,
    /// DNAT targets with the probability of each (a new connection picks one at random).
    pub targets: Vec<TargetView>,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetView {
    pub endpoint: String,
    pub probability: f64,
    pub masquerade: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Masquerade {
    pub masquerade: bool,
    pub why: String,
}

/// Explains what happens to `pkt` on this node. `state` supplies the endpoints' conditions
/// and locations (the desired state keeps only the chosen ones).
pub fn explain(
    fam: &FamilyDesired,
    state: &ClusterState,
    node: &NodeContext,
    host: &HostView,
    pkt: &Packet,
) -> Explanation {
    let verdict = intent(fam, host, pkt);
    let mut out = Explanation {
        packet: PacketView {
            src: pkt.src,
            dst: pkt.dst,
            port: pkt.port,
            protocol: pkt.protocol.to_string(),
            from_node: pkt.from_host,
        },
        family: fam.family,
        frontend: None,
        note: None,
        firewall: None,
        policy: None,
        topology: None,
        endpoints: Vec::new(),
        verdict: verdict_view(&verdict, ""),
        masquerade: None,
        affinity_timeout_seconds: None,
    };
    let Some((sp, kind)) = frontend(fam, host, pkt) else {
        let cluster_ip = fam.ports.values().find(|sp| sp.cluster_ip == pkt.dst);
        out.note = Some(match cluster_ip {
            Some(sp) => {
                let what = if host.reject_unknown_cluster_ports {
                    "rejected (nftables mode)"
                } else {
                    "not touched (iptables mode, as upstream)"
                };
                format!(
                    "{} is the ClusterIP of {}, which has no port {}/{}: {what}",
                    pkt.dst, sp.name.service, pkt.port, pkt.protocol
                )
            }
            None => match fam.service_cidrs.iter().find(|n| n.contains(&pkt.dst)) {
                Some(net) if host.reject_unknown_cluster_ports => format!(
                    "{} is inside ServiceCIDR range {net} but no Service uses it: dropped (nftables mode, as upstream)",
                    pkt.dst
                ),
                Some(net) => format!(
                    "{} is inside ServiceCIDR range {net} but no Service uses it: not touched (iptables mode, as upstream)",
                    pkt.dst
                ),
                None => "not a Service address: kube-proxy does not touch it".into(),
            },
        });
        out.verdict.why = out.note.clone().unwrap_or_default();
        return out;
    };
    out.frontend = Some(Frontend {
        kind: kind.into(),
        address: fmt_addr(pkt.dst, pkt.port),
        service_port: sp.name.to_string(),
        namespace: sp.name.service.namespace.to_string(),
        service: sp.name.service.name.to_string(),
        port_name: sp.name.port.to_string(),
    });
    out.affinity_timeout_seconds = sp.affinity_timeout;
    let pod = fam.detector.matches(pkt.src, pkt.iif.as_deref());
    let internal = kind == "ClusterIP";
    // The firewall applies to LB IPs only (§4.6).
    if kind == "LoadBalancer" && !sp.firewall_allow.is_empty() {
        let matched = sp.firewall_allow.iter().find(|n| n.contains(&pkt.src));
        out.firewall = Some(Firewall {
            allowed: matched.is_some(),
            ranges: sp.firewall_allow.iter().map(ToString::to_string).collect(),
            matched: matched.map(ToString::to_string),
        });
    }
    let (set, why_set) = if internal {
        match sp.internal {
            InternalAction::Local | InternalAction::Drop => (
                "Local",
                "internalTrafficPolicy: Local: only endpoints on this node".to_owned(),
            ),
            _ => (
                "Cluster",
                "internalTrafficPolicy Cluster (the default): endpoints anywhere".to_owned(),
            ),
        }
    } else {
        match sp.external.unwrap_or(ExternalAction::Reject) {
            ExternalAction::Local if pod => (
                "Cluster",
                "externalTrafficPolicy: Local, but the source is a pod of this node: it \
                 short-circuits to the Cluster set"
                    .to_owned(),
            ),
            ExternalAction::Local if pkt.from_host => (
                "Cluster",
                "externalTrafficPolicy: Local, but the packet comes from this node itself: \
                 it uses the Cluster set"
                    .to_owned(),
            ),
            ExternalAction::Local => (
                "Local",
                "externalTrafficPolicy: Local: only endpoints on this node, client IP kept"
                    .to_owned(),
            ),
            _ => (
                "Cluster",
                "externalTrafficPolicy Cluster (the default): endpoints anywhere".to_owned(),
            ),
        }
    };
    out.policy = Some(Policy {
        traffic: if internal { "internal" } else { "external" }.into(),
        set: set.into(),
        why: why_set,
    });
    let infos = state.endpoint_infos(&sp.name, fam.family, &node.name);
    let mode = topology_mode(&infos, &node.name, node.zone.as_deref());
    out.topology = Some(
        match mode {
            TopologyMode::None => "none",
            TopologyMode::PreferSameZone => "PreferSameZone",
            TopologyMode::PreferSameNode => "PreferSameNode",
        }
        .into(),
    );
    let chosen: Vec<std::net::SocketAddr> = if set == "Local" {
        sp.local_endpoints.iter().map(|e| e.addr).collect()
    } else {
        sp.cluster_endpoints.iter().map(|e| e.addr).collect()
    };
    let any_ready_in_topology = infos.iter().any(|e| e.ready && in_topology(e, mode, node));
    let any_local_ready = infos.iter().any(|e| e.ready && e.local);
    let (zones, nodes) = state.endpoint_places(&sp.name, fam.family);
    for e in &infos {
        let in_set = chosen.contains(&e.addr);
        let why = endpoint_why(
            e,
            in_set,
            set == "Local",
            mode,
            node,
            any_ready_in_topology,
            any_local_ready,
        );
        out.endpoints.push(EndpointView {
            address: e.addr.to_string(),
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
            node: nodes.get(&e.addr.ip()).cloned().flatten(),
            zone: zones.get(&e.addr.ip()).cloned().flatten(),
            local: e.local,
            zone_hints: e.zone_hints.iter().cloned().collect(),
            node_hints: e.node_hints.iter().cloned().collect(),
            chosen: in_set,
            why,
        });
    }
    out.verdict.why = verdict_why(&verdict, sp, internal, set, &out.firewall, pkt);
    out.masquerade = match &verdict {
        Intent::Dnat(targets) => Some(masquerade_why(
            fam,
            pkt,
            pod,
            internal,
            set,
            targets.iter().all(|t| t.masquerade),
            targets.iter().any(|t| t.masquerade),
        )),
        _ => None,
    };
    out
}

/// The frontend a packet hits, the way `intent` finds it.
fn frontend<'a>(
    fam: &'a FamilyDesired,
    host: &HostView,
    pkt: &Packet,
) -> Option<(&'a ServicePortDesired, &'static str)> {
    let same = |sp: &ServicePortDesired| sp.protocol == pkt.protocol && sp.port == pkt.port;
    for sp in fam.ports.values() {
        if sp.cluster_ip == pkt.dst && same(sp) {
            return Some((sp, "ClusterIP"));
        }
        if same(sp) && sp.load_balancer_ips.contains(&pkt.dst) {
            return Some((sp, "LoadBalancer"));
        }
        if same(sp) && sp.external_ips.contains(&pkt.dst) {
            return Some((sp, "externalIP"));
        }
    }
    if fam.ports.values().any(|sp| sp.cluster_ip == pkt.dst) {
        return None;
    }
    let accepts_node_port = match &host.node_port_ips {
        Some(ips) => ips.contains(&pkt.dst),
        None => host.local_ips.contains(&pkt.dst) && !pkt.dst.is_loopback(),
    };
    if !accepts_node_port {
        return None;
    }
    fam.ports
        .values()
        .find(|sp| sp.protocol == pkt.protocol && sp.node_port == Some(pkt.port))
        .map(|sp| (sp.as_ref(), "NodePort"))
}

fn in_topology(e: &EndpointInfo, mode: TopologyMode, node: &NodeContext) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => e.node_hints.contains(&node.name),
        TopologyMode::PreferSameZone => node
            .zone
            .as_deref()
            .is_some_and(|z| e.zone_hints.contains(z)),
    }
}

fn endpoint_why(
    e: &EndpointInfo,
    in_set: bool,
    local_set: bool,
    mode: TopologyMode,
    node: &NodeContext,
    any_ready_in_topology: bool,
    any_local_ready: bool,
) -> String {
    let serving_terminating = e.serving && e.terminating;
    if in_set {
        return match () {
            _ if e.ready && local_set => "ready, on this node".into(),
            _ if e.ready && mode == TopologyMode::PreferSameZone => format!(
                "ready, hinted for this node's zone {}",
                node.zone.as_deref().unwrap_or("")
            ),
            _ if e.ready && mode == TopologyMode::PreferSameNode => {
                "ready, hinted for this node".into()
            }
            _ if e.ready => "ready".into(),
            _ => "serving and terminating: used because no ready endpoint is left (terminating \
                  fallback)"
                .into(),
        };
    }
    if local_set && !e.local {
        return "not on this node (Local policy uses this node's endpoints only)".into();
    }
    if !e.ready && !serving_terminating {
        return if e.terminating {
            "terminating and not serving".into()
        } else {
            "not ready".into()
        };
    }
    if !e.ready {
        return if local_set && any_local_ready {
            "serving but terminating: ready endpoints on this node are used instead".into()
        } else {
            "serving but terminating: ready endpoints are used instead".into()
        };
    }
    if !in_topology(e, mode, node) && any_ready_in_topology {
        return match mode {
            TopologyMode::PreferSameNode => format!(
                "hinted for other nodes ({}), not this one (topology hints, e.g. \
                 trafficDistribution: PreferSameNode)",
                join(&e.node_hints)
            ),
            _ => format!(
                "hinted for other zones ({}), not this node's zone {} (topology hints, e.g. \
                 trafficDistribution: PreferClose)",
                join(&e.zone_hints),
                node.zone.as_deref().unwrap_or("(none)")
            ),
        };
    }
    "not in the chosen set".into()
}

fn join(s: &std::collections::BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn verdict_view(v: &Intent, why: &str) -> Verdict {
    let (action, targets) = match v {
        Intent::Dnat(t) => {
            let p = 1.0 / t.len().max(1) as f64;
            (
                "DNAT",
                t.iter()
                    .map(|t| TargetView {
                        endpoint: t.addr.to_string(),
                        probability: p,
                        masquerade: t.masquerade,
                    })
                    .collect(),
            )
        }
        Intent::Drop => ("DROP", Vec::new()),
        Intent::Reject => ("REJECT", Vec::new()),
        Intent::Pass => ("PASS", Vec::new()),
    };
    Verdict {
        action: action.into(),
        targets,
        why: why.into(),
    }
}

fn verdict_why(
    v: &Intent,
    sp: &ServicePortDesired,
    internal: bool,
    set: &str,
    firewall: &Option<Firewall>,
    pkt: &Packet,
) -> String {
    match v {
        Intent::Dnat(t) if t.len() == 1 => "the only endpoint of the set".into(),
        Intent::Dnat(t) => format!(
            "a new connection picks one of {} endpoints at random, each {:.1}%",
            t.len(),
            100.0 / t.len() as f64
        ),
        Intent::Reject if !sp.has_any_endpoints => {
            "the Service port has no usable endpoint anywhere: connections are refused".into()
        }
        Intent::Reject => "refused".into(),
        Intent::Drop if firewall.as_ref().is_some_and(|f| !f.allowed) => format!(
            "the source {} is in none of loadBalancerSourceRanges",
            pkt.src
        ),
        Intent::Drop if set == "Local" => format!(
            "{} policy Local and no usable endpoint on this node: dropped (endpoints exist \
             elsewhere, so it is not refused)",
            if internal { "internal" } else { "external" }
        ),
        Intent::Drop => "no endpoint in the set: dropped".into(),
        Intent::Pass => "not touched".into(),
    }
}

fn masquerade_why(
    fam: &FamilyDesired,
    pkt: &Packet,
    pod: bool,
    internal: bool,
    set: &str,
    all: bool,
    any: bool,
) -> Masquerade {
    let hairpin = !all && any;
    let why = if internal {
        if fam.masquerade_all {
            "masqueradeAll is set".to_owned()
        } else if !fam.detector.is_some() {
            "no local-traffic detector for this family: ClusterIP traffic is not masqueraded"
                .to_owned()
        } else if !pod {
            format!(
                "the source is not a local pod ({}): traffic from outside the pod network is \
                 masqueraded so replies come back through this node",
                detector(&fam.detector)
            )
        } else if all {
            "hairpin: the endpoint is the client itself".to_owned()
        } else {
            format!("the source is a local pod ({})", detector(&fam.detector))
        }
    } else if set == "Local" && !pkt.from_host && !pod {
        "externalTrafficPolicy: Local keeps the client's IP".to_owned()
    } else if pod && !pkt.from_host {
        "a local pod reaching an external frontend is not masqueraded".to_owned()
    } else {
        "external traffic to the Cluster set is masqueraded, so replies come back through this \
         node"
            .to_owned()
    };
    let why = if hairpin {
        format!("{why}; the endpoint that is the client itself is masqueraded (hairpin)")
    } else {
        why
    };
    Masquerade {
        masquerade: all,
        why,
    }
}

fn detector(d: &LocalDetector) -> String {
    match d {
        LocalDetector::None => "no detector".into(),
        LocalDetector::Cidr(n) => format!("detect-local: source in {n}"),
        LocalDetector::BridgeInterface(b) => format!("detect-local: input interface {b}"),
        LocalDetector::InterfaceNamePrefix(p) => format!("detect-local: input interface {p}*"),
    }
}

fn fmt_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.packet;
        let origin = if p.from_node { ", from this node" } else { "" };
        writeln!(
            f,
            "Packet {} -> {}/{} ({}{origin})",
            p.src,
            fmt_addr(p.dst, p.port),
            p.protocol,
            self.family
        )?;
        let mut step = 0;
        let mut line = |f: &mut fmt::Formatter<'_>, text: String| {
            step += 1;
            writeln!(f, "{step}. {text}")
        };
        let Some(fe) = &self.frontend else {
            line(
                f,
                format!("Frontend: none. {}", self.note.as_deref().unwrap_or("")),
            )?;
            return line(f, format!("Verdict: {}", self.verdict.action));
        };
        line(
            f,
            format!(
                "Frontend: {} {} of {}",
                fe.kind, fe.address, fe.service_port
            ),
        )?;
        if let Some(fw) = &self.firewall {
            let text = match &fw.matched {
                Some(m) => format!("Source ranges: allowed by {m}"),
                None => format!(
                    "Source ranges: {} is in none of [{}]: dropped",
                    p.src,
                    fw.ranges.join(", ")
                ),
            };
            line(f, text)?;
        }
        if let Some(pol) = &self.policy {
            line(
                f,
                format!("Traffic: {}, {} set ({})", pol.traffic, pol.set, pol.why),
            )?;
        }
        let mut eps = String::new();
        for e in &self.endpoints {
            let state = match (e.ready, e.serving, e.terminating) {
                (true, _, _) => "ready",
                (false, true, true) => "serving-terminating",
                (false, _, true) => "terminating",
                _ => "not ready",
            };
            let _ = writeln!(
                eps,
                "   {} {:<22} {:<20} node {:<12} zone {:<8} {}",
                if e.chosen { "+" } else { "-" },
                e.address,
                state,
                e.node.as_deref().unwrap_or("-"),
                e.zone.as_deref().unwrap_or("-"),
                e.why
            );
        }
        line(
            f,
            format!(
                "Endpoints (topology {}): {} in the set of {}",
                self.topology.as_deref().unwrap_or("none"),
                self.endpoints.iter().filter(|e| e.chosen).count(),
                self.endpoints.len()
            ),
        )?;
        f.write_str(&eps)?;
        let v = &self.verdict;
        line(f, format!("Verdict: {} ({})", v.action, v.why))?;
        for t in &v.targets {
            writeln!(
                f,
                "   {:<22} {:>5.1}%{}",
                t.endpoint,
                t.probability * 100.0,
                if t.masquerade { "  masquerade" } else { "" }
            )?;
        }
        if let Some(m) = &self.masquerade {
            line(
                f,
                format!(
                    "Masquerade: {} ({})",
                    if m.masquerade { "yes" } else { "no" },
                    m.why
                ),
            )?;
        }
        if let Some(t) = self.affinity_timeout_seconds {
            line(
                f,
                format!(
                    "Session affinity: ClientIP, {t} s (a client keeps the endpoint it got first)"
                ),
            )?;
        }
        Ok(())
    }
}
