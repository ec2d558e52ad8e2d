//! Validation and conversion of Kubernetes objects into the model's own types.
//!
//! Implements §3.2 (Service interpretation) and §3.3 (EndpointSlice interpretation) of the
//! behaviour reference. A hostile or malformed object never panics: it is either skipped whole
//! (`Err(Skipped)`) or, where upstream drops only the bad entry (an invalid external IP, an
//! endpoint with an invalid address), kept without that entry and the drop reported alongside.

use crate::input::ObjectKey;
use crate::intern::{Interner, Place};
use crate::names::{IpFamily, Protocol, ServiceName};
use crate::objects::{EndpointSlice, Service, ServiceCidr};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// Label that hands a Service to another proxy (KEP-2447): ignored whatever its value.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking headless Services' slices.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Annotation carrying the time of the change that triggered a slice update.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Upstream's API limits: more than this is hostile input, not a real slice.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_SLICE_PORTS: usize = 100;
/// Session-affinity timeout bounds (API default and maximum).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// An object (or part of one) that was not used, and why. The caller logs it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `Service`, `EndpointSlice`, `Node` or `ServiceCIDR`.
    pub kind: &'static str,
    pub object: ObjectKey,
    /// True when the whole object was skipped; false when only one entry of it was.
    pub whole: bool,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.whole {
            "Skipping"
        } else {
            "Ignoring part of"
        };
        write!(f, "{what} {} {}: {}", self.kind, self.object, self.reason)
    }
}

/// One port of a Service as the model uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedPort {
    /// Port name, `""` when unnamed.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `None` for `nodePort: 0` or absent.
    pub node_port: Option<u16>,
}

/// A Service after validation: everything the model reads from it, both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedService {
    pub name: ServiceName,
    /// At most one ClusterIP per family, from `spec.clusterIPs` (or `spec.clusterIP`).
    pub cluster_ips: ClusterIps,
    pub ports: Vec<ParsedPort>,
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs with `ipMode` unset or `VIP`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds; `None` when affinity is off.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local`, honoured only where upstream honours it (§3.2).
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// Only for `LoadBalancer` with ETP=Local and a non-zero port.
    pub health_check_node_port: Option<u16>,
}

/// A Service's ClusterIPs: at most one per family (the first listed), inline (a map would
/// cost a ~200-byte node per Service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterIps {
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
}

impl ClusterIps {
    /// The ClusterIP of this family.
    pub fn get(&self, family: &IpFamily) -> Option<&IpAddr> {
        match family {
            IpFamily::V4 => self.v4.as_ref(),
            IpFamily::V6 => self.v6.as_ref(),
        }
    }

    /// Every ClusterIP, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = (IpFamily, IpAddr)> + '_ {
        let v4 = self.v4.map(|ip| (IpFamily::V4, ip));
        v4.into_iter().chain(self.v6.map(|ip| (IpFamily::V6, ip)))
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `ip` unless its family has a ClusterIP already.
    fn add_first(&mut self, ip: IpAddr) {
        let slot = match IpFamily::of(&ip) {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        };
        slot.get_or_insert(ip);
    }
}

/// An endpoint of one slice. Compact (40 bytes): a cluster holds one per endpoint; its node
/// and zone are one shared [`Place`] ([`Interner`]) and the rarely set hints are boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Its node and its own zone (the zone is shown by explain; selection uses hints).
    pub place: Option<Arc<Place>>,
    /// Its topology hints; `None` when it has neither kind.
    pub hints: Option<Box<TopologyHints>>,
}

/// An endpoint's topology hints (§5.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopologyHints {
    pub zones: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
}

/// No hints.
static NO_HINTS: BTreeSet<String> = BTreeSet::new();

impl SliceEndpoint {
    /// The node it is on, if the slice says.
    pub fn node_name(&self) -> Option<&str> {
        self.place.as_ref().and_then(|p| p.node.as_deref())
    }

    /// The endpoint's own zone, if the slice says.
    pub fn zone(&self) -> Option<&str> {
        self.place.as_ref().and_then(|p| p.zone.as_deref())
    }

    /// The zones this endpoint is hinted for (empty: none).
    pub fn zone_hints(&self) -> &BTreeSet<String> {
        self.hints.as_ref().map_or(&NO_HINTS, |h| &h.zones)
    }

    /// The nodes this endpoint is hinted for (empty: none).
    pub fn node_hints(&self) -> &BTreeSet<String> {
        self.hints.as_ref().map_or(&NO_HINTS, |h| &h.nodes)
    }
}

/// A slice port: name (`""` unnamed), protocol, port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSlice {
    pub key: ObjectKey,
    pub service: ServiceName,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// The `last-change-trigger-time` annotation, verbatim (RFC 3339).
    pub trigger_time: Option<String>,
}

/// Whether a labelled object belongs to another proxy or to a headless Service (§3.1): such
/// objects are treated as absent.
pub fn is_filtered(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

/// Parses a Service. `Ok(None)` means "not ours": filtered by label, headless, ExternalName or
/// without a ClusterIP; `Err` means invalid. Partial drops are appended to `notes`.
pub fn parse_service(
    svc: &Service,
    notes: &mut Vec<Skipped>,
) -> Result<Option<ParsedService>, Skipped> {
    let key = ObjectKey::of(&svc.metadata);
    let skip = |reason: String| Skipped {
        kind: "Service",
        object: key.clone(),
        whole: true,
        reason,
    };
    if let Some(why) = invalid_names(&key, 63) {
        return Err(skip(why));
    }
    if is_filtered(svc.metadata.labels.as_ref()) {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(None);
    }
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    let listed: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => vec![primary],
    };
    if listed
        .first()
        .is_none_or(|ip| ip.is_empty() || *ip == "None")
    {
        return Ok(None);
    }
    let mut cluster_ips = ClusterIps::default();
    for raw in &listed {
        let ip = parse_ip(raw).ok_or_else(|| skip(format!("invalid clusterIP {raw:?}")))?;
        cluster_ips.add_first(ip);
    }

    // Sized to the list (a pushed-to Vec would hold room for four ports: kept for the
    // Service's lifetime, that is 10,000s of them).
    let mut ports = Vec::with_capacity(spec.ports.as_ref().map_or(0, Vec::len));
    let mut seen = BTreeSet::new();
    for p in spec.ports.as_deref().unwrap_or_default() {
        let name = p.name.clone().unwrap_or_default();
        let protocol = Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| {
            skip(format!(
                "port {name:?}: unknown protocol {:?}",
                p.protocol.as_deref().unwrap_or("")
            ))
        })?;
        let port = valid_port(p.port.unwrap_or(0))
            .ok_or_else(|| skip(format!("port {name:?}: {}", show_port(p.port))))?;
        let node_port = match p.node_port.unwrap_or(0) {
            0 => None,
            n => Some(
                valid_port(n)
                    .ok_or_else(|| skip(format!("port {name:?}: invalid nodePort {n}")))?,
            ),
        };
        if !seen.insert((name.clone(), protocol)) {
            return Err(skip(format!(
                "duplicate port name {name:?} for protocol {protocol}"
            )));
        }
        if !name.is_empty() && !dns_label(&name, 63) {
            return Err(skip(format!("invalid port name {name:?}")));
        }
        ports.push(ParsedPort {
            name,
            protocol,
            port,
            node_port,
        });
    }

    let mut partial = |reason: String| {
        notes.push(Skipped {
            kind: "Service",
            object: key.clone(),
            whole: false,
            reason,
        });
    };
    let mut external_ips = Vec::new();
    for raw in spec.external_ips.as_deref().unwrap_or_default() {
        match parse_ip(raw) {
            Some(ip) => external_ips.push(ip),
            None => partial(format!("invalid externalIP {raw:?}")),
        }
    }
    let mut load_balancer_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref());
    for ing in ingress.unwrap_or_default() {
        if !matches!(ing.ip_mode.as_deref(), None | Some("VIP")) {
            continue;
        }
        let Some(raw) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        match parse_ip(raw) {
            Some(ip) => load_balancer_ips.push(ip),
            None => partial(format!("invalid load-balancer ingress IP {raw:?}")),
        }
    }
    // An invalid source range skips the whole Service: dropping just the range could open a
    // firewalled load balancer to the world (fail closed).
    let mut source_ranges = Vec::new();
    for raw in spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default()
    {
        let trimmed = raw.trim();
        let net: IpNet = trimmed
            .parse()
            .map_err(|_| skip(format!("invalid loadBalancerSourceRanges entry {raw:?}")))?;
        source_ranges.push(net.trunc());
    }

    let affinity_timeout = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(t) if t > 0 && t <= i64::from(MAX_AFFINITY_TIMEOUT) => Some(t as u32),
                Some(t) => {
                    return Err(skip(format!(
                        "sessionAffinityConfig.clientIP.timeoutSeconds {t} not in 1..=86400"
                    )));
                }
            }
        }
        None | Some("None") | Some("") => None,
        Some(other) => return Err(skip(format!("unknown sessionAffinity {other:?}"))),
    };

    let externally_typed =
        matches!(svc_type, "LoadBalancer" | "NodePort") || !external_ips.is_empty();
    let external_policy_local =
        externally_typed && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = if svc_type == "LoadBalancer" && external_policy_local {
        match spec.health_check_node_port.unwrap_or(0) {
            0 => {
                partial(
                    "LoadBalancer with externalTrafficPolicy=Local has no healthCheckNodePort"
                        .into(),
                );
                None
            }
            n => match valid_port(n) {
                Some(p) => Some(p),
                None => return Err(skip(format!("invalid healthCheckNodePort {n}"))),
            },
        }
    } else {
        None
    };

    Ok(Some(ParsedService {
        name: ServiceName::new(key.namespace.clone(), key.name.clone()),
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity_timeout,
        external_policy_local,
        internal_policy_local,
        health_check_node_port,
    }))
}

/// Parses an EndpointSlice. `Ok(None)` means "not ours": filtered by label, no owning Service
/// label, or an FQDN slice. Endpoints with an invalid address are dropped and noted.
pub fn parse_slice(
    slice: &EndpointSlice,
    notes: &mut Vec<Skipped>,
) -> Result<Option<ParsedSlice>, Skipped> {
    parse_slice_with(slice, notes, &mut Interner::default())
}

/// [`parse_slice`], sharing node and zone names through `names`.
pub fn parse_slice_with(
    slice: &EndpointSlice,
    notes: &mut Vec<Skipped>,
    names: &mut Interner,
) -> Result<Option<ParsedSlice>, Skipped> {
    let key = ObjectKey::of(&slice.metadata);
    let skip = |reason: String| Skipped {
        kind: "EndpointSlice",
        object: key.clone(),
        whole: true,
        reason,
    };
    if let Some(why) = invalid_names(&key, 253) {
        return Err(skip(why));
    }
    let labels = slice.metadata.labels.as_ref();
    if is_filtered(labels) {
        return Ok(None);
    }
    let Some(service) = labels
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    if !dns_label(service, 63) {
        return Err(skip(format!(
            "invalid {LABEL_SERVICE_NAME} label {service:?}"
        )));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(None),
        other => return Err(skip(format!("unknown addressType {other:?}"))),
    };
    if slice.endpoints.len() > MAX_SLICE_ENDPOINTS {
        return Err(skip(format!(
            "{} endpoints exceed the API limit of {MAX_SLICE_ENDPOINTS}",
            slice.endpoints.len()
        )));
    }
    let raw_ports = slice.ports.as_deref().unwrap_or_default();
    if raw_ports.len() > MAX_SLICE_PORTS {
        return Err(skip(format!(
            "{} ports exceed the API limit of {MAX_SLICE_PORTS}",
            raw_ports.len()
        )));
    }
    let mut ports = Vec::with_capacity(raw_ports.len());
    for p in raw_ports {
        // Upstream ignores ports without a name or number (the controller always sets both).
        let (Some(name), Some(number)) = (p.name.as_ref(), p.port) else {
            continue;
        };
        if number == 0 {
            continue;
        }
        let protocol = Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| {
            skip(format!(
                "port {name:?}: unknown protocol {:?}",
                p.protocol.as_deref().unwrap_or("")
            ))
        })?;
        let port = valid_port(number)
            .ok_or_else(|| skip(format!("port {name:?}: invalid port {number}")))?;
        if ports
            .iter()
            .any(|q: &SlicePort| q.name == *name && q.protocol == protocol)
        {
            return Err(skip(format!(
                "duplicate port name {name:?} for protocol {protocol}"
            )));
        }
        if !name.is_empty() && !dns_label(name, 63) {
            return Err(skip(format!("invalid port name {name:?}")));
        }
        ports.push(SlicePort {
            name: name.clone(),
            protocol,
            port,
        });
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for ep in &slice.endpoints {
        let Some(raw) = ep.addresses.first() else {
            continue;
        };
        let Some(ip) = parse_ip(raw) else {
            notes.push(Skipped {
                kind: "EndpointSlice",
                object: key.clone(),
                whole: false,
                reason: format!("invalid endpoint address {raw:?}"),
            });
            continue;
        };
        if IpFamily::of(&ip) != family {
            continue;
        }
        let cond = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        let hints = TopologyHints {
            zones: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            nodes: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        };
        fn name(n: &Option<String>) -> Option<&str> {
            n.as_deref().filter(|n| !n.is_empty())
        }
        endpoints.push(SliceEndpoint {
            ip,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            place: names.place(name(&ep.node_name), name(&ep.zone)),
            hints: (hints != TopologyHints::default()).then(|| Box::new(hints)),
        });
    }
    let trigger_time = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
        .cloned();
    Ok(Some(ParsedSlice {
        service: ServiceName::new(key.namespace.clone(), service.clone()),
        key,
        family,
        ports,
        endpoints,
        trigger_time,
    }))
}

/// The ranges of a ServiceCIDR (§4.8). An entry the API server would refuse (not a CIDR, or
/// host bits set) is dropped and noted: without it fewer addresses are dropped, which is what
/// happened before the ServiceCIDR existed.
pub fn parse_service_cidr(obj: &ServiceCidr, notes: &mut Vec<Skipped>) -> Vec<IpNet> {
    let key = ObjectKey::of(&obj.metadata);
    let mut out = Vec::new();
    let raw = obj.spec.as_ref().and_then(|s| s.cidrs.as_deref());
    for entry in raw.unwrap_or_default() {
        match entry.parse::<IpNet>() {
            Ok(net) if net == net.trunc() => out.push(net),
            _ => notes.push(Skipped {
                kind: "ServiceCIDR",
                object: key.clone(),
                whole: false,
                reason: format!("invalid spec.cidrs entry {entry:?} (a CIDR with no host bits)"),
            }),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Names the API server would refuse (and that must never reach rule text): the namespace
/// must be a DNS-1123 label, the name a label (Services) or subdomain (slices).
fn invalid_names(key: &ObjectKey, max_name: usize) -> Option<String> {
    if key.name.is_empty() || key.namespace.is_empty() {
        return Some("metadata.name and metadata.namespace are required".into());
    }
    if !dns_label(&key.namespace, 63) {
        return Some(format!("invalid namespace {:?}", key.namespace));
    }
    let ok = if max_name == 63 {
        dns_label(&key.name, 63)
    } else {
        key.name.len() <= max_name && key.name.split('.').all(|l| dns_label(l, 63))
    };
    (!ok).then(|| format!("invalid name {:?}", key.name))
}

/// A DNS-1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric.
fn dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Parses an IP the way the API server's validation accepts it: no leading zeros in IPv4 octets
/// (Rust's parser already refuses them), no zone suffixes.
pub fn parse_ip(raw: &str) -> Option<IpAddr> {
    raw.parse().ok()
}

fn valid_port(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Why a port field is unusable: missing (or not a number), or out of range.
fn show_port(p: Option<i64>) -> String {
    match p {
        None => "missing port (absent, null or not an integer)".into(),
        Some(n) => format!("invalid port {n}"),
    }
}
