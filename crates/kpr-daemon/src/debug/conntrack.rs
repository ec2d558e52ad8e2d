//! `kube-proxy-rs conntrack`: the live conntrack flows of a Service and the endpoint each was
//! sent to, so "is anything still going to the old pod?" has an answer.
//!
//! With `--service ns/name` it asks the running proxy (`/debug/services` on `--server`, the
//! metrics address) for the Service's frontends and current endpoints, dumps this network
//! namespace's conntrack table over ctnetlink (each family the Service has, every protocol)
//! and keeps the flows to a frontend: ClusterIP, externalIPs and load-balancer IPs at the
//! port, or any address at the NodePort when the reply comes from one of the Service's
//! endpoints or the flow was DNATed on a local address. A flow's endpoint is its reply
//! source (the DNAT target); a flow whose endpoint is no longer among the Service's endpoints
//! is `stale`. With `--to IP:PORT` it needs no proxy: the flows to that destination, as
//! sent or as DNATed. Exit codes: 0 answered, 2 bad input, 1 the proxy or conntrack could not
//! be reached (ctnetlink needs CAP_NET_ADMIN).

use kpr_conntrack::Flow;
use kpr_conntrack::flow::{SCTP, TCP, UDP};
use kpr_conntrack::netlink::{self, Family};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

const USAGE: &str = "usage: kube-proxy-rs conntrack --service NAMESPACE/NAME [--port NAME] \
[--proto tcp|udp|sctp] [--server http://127.0.0.1:10249] [--output text|json]
       kube-proxy-rs conntrack --to IP:PORT [--proto tcp|udp|sctp] [--output text|json]
  Run it on the node, in the proxy's network namespace, with CAP_NET_ADMIN.";

/// Runs `kube-proxy-rs conntrack ARGS`.
pub fn conntrack(args: &[String]) -> ExitCode {
    let a = match parse_args(args) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("conntrack: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match answer(&a) {
        Ok(report) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", text(&report));
            }
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("conntrack: {msg}");
            ExitCode::from(code)
        }
    }
}

/// What the command prints (`--output json` as is).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `namespace/name` (`--service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `IP:port` (`--to`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<SocketAddr>,
    /// The service ports searched, with their frontends.
    pub service_ports: Vec<PortSearched>,
    pub flows: Vec<FlowView>,
    /// Flows per endpoint: every current endpoint of each service port (0 when none), and each
    /// stale one a flow still goes to.
    pub endpoints: Vec<EndpointCount>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSearched {
    pub service_port: String,
    pub protocol: String,
    /// `ip:port` of the ClusterIP, externalIPs and load-balancer IPs.
    pub frontends: Vec<SocketAddr>,
    pub node_port: Option<u16>,
}

/// One conntrack flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowView {
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// The original source.
    pub client: SocketAddr,
    /// The original destination.
    pub frontend: SocketAddr,
    /// `clusterIP`, `externalIP`, `loadBalancerIP` or `nodePort` (`--service` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend_kind: Option<&'static str>,
    /// `namespace/name:port` (`--service` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_port: Option<String>,
    /// The reply's source, i.e. the DNAT target; `null` when the flow was not DNATed.
    pub endpoint: Option<SocketAddr>,
    /// What the endpoint is to the Service now (`--service` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_state: Option<EndpointState>,
    /// The endpoint is not (or no longer) one of the Service's endpoints, or the flow was
    /// never DNATed to one: its packets go where the Service no longer sends new ones.
    pub stale: bool,
    /// The TCP or SCTP state (`ESTABLISHED`, ...); `null` for UDP.
    pub state: Option<String>,
    /// Seconds until the kernel forgets the flow.
    pub timeout_seconds: Option<u32>,
    /// Traffic was seen both ways.
    pub assured: bool,
    /// Where replies go when the client was masqueraded (the reply's destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masqueraded_as: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
}

/// What an endpoint a flow goes to is to the Service now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointState {
    /// A current, ready endpoint.
    Ready,
    /// Current, terminating but still serving.
    Terminating,
    /// Current, neither ready nor serving.
    NotReady,
    /// Not among the Service's endpoints any more.
    Stale,
    /// The flow was not DNATed (it hit the frontend while the Service had no endpoints).
    None,
}

impl EndpointState {
    fn as_str(self) -> &'static str {
        match self {
            EndpointState::Ready => "ready",
            EndpointState::Terminating => "terminating",
            EndpointState::NotReady => "not-ready",
            EndpointState::Stale => "stale",
            EndpointState::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCount {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_port: Option<String>,
    /// `null`: the flows that were not DNATed.
    pub endpoint: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<EndpointState>,
    pub flows: usize,
}

/// A service port as `/debug/services` reports it: the fields read here.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortView {
    pub service_port: String,
    pub port_name: String,
    pub protocol: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    #[serde(default)]
    pub load_balancer_ips: Vec<IpAddr>,
    #[serde(default)]
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    /// `ip:port`.
    pub address: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl PortView {
    fn proto(&self) -> Option<u8> {
        proto_number(&self.protocol)
    }

    fn frontends(&self) -> impl Iterator<Item = (SocketAddr, &'static str)> + '_ {
        let at = |ip: &IpAddr| SocketAddr::new(*ip, self.port);
        std::iter::once((at(&self.cluster_ip), "clusterIP"))
            .chain(
                self.external_ips
                    .iter()
                    .map(move |ip| (at(ip), "externalIP")),
            )
            .chain(
                self.load_balancer_ips
                    .iter()
                    .map(move |ip| (at(ip), "loadBalancerIP")),
            )
    }

    /// The state of `addr` among this port's endpoints; `Stale` when it is not one.
    fn endpoint_state(&self, addr: SocketAddr) -> EndpointState {
        match self
            .endpoints
            .iter()
            .find(|e| e.address.parse::<SocketAddr>().ok() == Some(addr))
        {
            Some(e) if e.ready => EndpointState::Ready,
            Some(e) if e.serving && e.terminating => EndpointState::Terminating,
            Some(_) => EndpointState::NotReady,
            None => EndpointState::Stale,
        }
    }

    fn endpoint_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().filter_map(|e| e.address.parse().ok())
    }
}

/// The flows of a Service's ports, sorted by (service port, endpoint, client). `local` are
/// this node's addresses: a DNATed flow to one of them at a NodePort is the Service's even
/// when its endpoint is gone.
pub fn service_flows(flows: &[Flow], ports: &[PortView], local: &[IpAddr]) -> Vec<FlowView> {
    let mut out: Vec<FlowView> = flows
        .iter()
        .filter_map(|f| {
            ports.iter().find_map(|p| {
                if p.proto() != Some(f.proto) {
                    return None;
                }
                let kind = p
                    .frontends()
                    .find(|(fe, _)| *fe == f.orig_dst)
                    .map(|(_, kind)| kind)
                    .or_else(|| {
                        let node_port = p.node_port == Some(f.orig_dst.port())
                            && (p.endpoint_addrs().any(|e| e == f.reply_src)
                                || (f.dnat() && local.contains(&f.orig_dst.ip())));
                        node_port.then_some("nodePort")
                    })?;
                let state = if f.dnat() {
                    p.endpoint_state(f.reply_src)
                } else {
                    EndpointState::None
                };
                Some(FlowView {
                    frontend_kind: Some(kind),
                    service_port: Some(p.service_port.clone()),
                    endpoint_state: Some(state),
                    stale: matches!(state, EndpointState::Stale | EndpointState::None),
                    ..view(f)
                })
            })
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.service_port, a.endpoint, a.client, a.frontend).cmp(&(
            &b.service_port,
            b.endpoint,
            b.client,
            b.frontend,
        ))
    });
    out
}

/// The flows to `to` (of protocol `proto`, when given): sent to it, or DNATed to it.
pub fn flows_to(flows: &[Flow], to: SocketAddr, proto: Option<u8>) -> Vec<FlowView> {
    let mut out: Vec<FlowView> = flows
        .iter()
        .filter(|f| proto.is_none_or(|p| p == f.proto))
        .filter(|f| f.orig_dst == to || (f.dnat() && f.reply_src == to))
        .map(view)
        .collect();
    out.sort_by_key(|f| (f.endpoint, f.client, f.frontend));
    out
}

/// Flows per endpoint: with `ports`, every current endpoint of each (also without flows),
/// then the stale ones flows go to.
pub fn endpoint_counts(flows: &[FlowView], ports: &[PortView]) -> Vec<EndpointCount> {
    type Key = (Option<String>, Option<SocketAddr>);
    let mut counts: BTreeMap<Key, (Option<EndpointState>, usize)> = BTreeMap::new();
    for p in ports {
        for e in p.endpoint_addrs() {
            counts.insert(
                (Some(p.service_port.clone()), Some(e)),
                (Some(p.endpoint_state(e)), 0),
            );
        }
    }
    for f in flows {
        counts
            .entry((f.service_port.clone(), f.endpoint))
            .or_insert((f.endpoint_state, 0))
            .1 += 1;
    }
    counts
        .into_iter()
        .map(|((service_port, endpoint), (state, flows))| EndpointCount {
            service_port,
            endpoint,
            state,
            flows,
        })
        .collect()
}

/// The text output: a header, one line per flow, the counts per endpoint.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let what = match (&r.service, r.to) {
        (Some(s), _) => s.clone(),
        (None, Some(to)) => format!("to {to}"),
        (None, None) => String::new(),
    };
    let n = r.flows.len();
    let _ = writeln!(
        out,
        "{what}: {n} conntrack flow{}",
        if n == 1 { "" } else { "s" }
    );
    for p in &r.service_ports {
        let frontends: Vec<String> = p.frontends.iter().map(ToString::to_string).collect();
        let _ = write!(
            out,
            "  {} {} {}",
            p.service_port,
            p.protocol,
            frontends.join(" ")
        );
        if let Some(np) = p.node_port {
            let _ = write!(out, " nodePort {np}");
        }
        out.push('\n');
    }
    if !r.flows.is_empty() {
        out.push('\n');
        let service = r.service.is_some();
        let mut rows = vec![
            [
                "PROTO",
                "CLIENT",
                "FRONTEND",
                "ENDPOINT",
                if service { "ENDPOINT IS" } else { "" },
                "STATE",
                "TIMEOUT",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for f in &r.flows {
            rows.push(vec![
                f.protocol.clone(),
                f.client.to_string(),
                match f.frontend_kind {
                    Some(k) => format!("{} ({k})", f.frontend),
                    None => f.frontend.to_string(),
                },
                f.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
                f.endpoint_state
                    .map_or("", EndpointState::as_str)
                    .to_owned(),
                f.state.clone().unwrap_or_else(|| "-".into()),
                f.timeout_seconds
                    .map_or_else(|| "-".into(), |t| format!("{t}s")),
            ]);
        }
        table(&mut out, &rows);
    }
    if !r.endpoints.is_empty() {
        out.push('\n');
        let mut rows = vec![
            ["ENDPOINT", "SERVICE PORT", "IS", "FLOWS"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for e in &r.endpoints {
            rows.push(vec![
                e.endpoint
                    .map_or_else(|| "- (not DNATed)".into(), |a| a.to_string()),
                e.service_port.clone().unwrap_or_default(),
                e.state.map_or("", EndpointState::as_str).to_owned(),
                e.flows.to_string(),
            ]);
        }
        table(&mut out, &rows);
    }
    let stale = r.flows.iter().filter(|f| f.stale).count();
    if stale > 0 {
        let _ = writeln!(
            out,
            "\n{stale} flow{} still go{} to an endpoint the Service no longer has (stale)",
            if stale == 1 { "" } else { "s" },
            if stale == 1 { "es" } else { "" },
        );
    }
    out
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    service: Option<String>,
    port: Option<String>,
    to: Option<SocketAddr>,
    proto: Option<u8>,
    server: String,
    json: bool,
}

/// `Err("")` asks for the usage.
fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        server: "http://127.0.0.1:10249".into(),
        ..Args::default()
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "--service" => {
                let s = value()?;
                let valid = s.split_once('/').is_some_and(|(ns, n)| {
                    [ns, n].iter().all(|p| {
                        !p.is_empty()
                            && p.bytes().all(|b| {
                                b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)
                            })
                    })
                });
                if !valid {
                    return Err(format!("--service: {s:?} is not NAMESPACE/NAME"));
                }
                a.service = Some(s);
            }
            "--port" => a.port = Some(value()?),
            "--to" => {
                let v = value()?;
                let to: SocketAddr = v
                    .parse()
                    .map_err(|_| format!("--to: {v:?} is not IP:PORT (IPv6 as [addr]:port)"))?;
                if to.port() == 0 {
                    return Err("--to: the port must be 1-65535".into());
                }
                a.to = Some(to);
            }
            "--proto" => {
                let v = value()?;
                a.proto = Some(
                    proto_number(&v)
                        .ok_or_else(|| format!("--proto: {v:?} is not tcp, udp or sctp"))?,
                );
            }
            "--server" => a.server = value()?,
            "--output" | "-o" => {
                a.json = match value()?.as_str() {
                    "json" => true,
                    "text" => false,
                    other => return Err(format!("--output: {other:?} is not text or json")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (&a.service, a.to) {
        (Some(_), Some(_)) => Err("give --service or --to, not both".into()),
        (None, None) => Err("--service NAMESPACE/NAME or --to IP:PORT is required".into()),
        (None, Some(_)) if a.port.is_some() => Err("--port goes with --service".into()),
        _ => Ok(a),
    }
}

/// `tcp`, `udp`, `sctp` (any case) as an IP protocol number.
fn proto_number(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(TCP),
        "udp" => Some(UDP),
        "sctp" => Some(SCTP),
        _ => None,
    }
}

/// Asks the proxy (with `--service`), dumps conntrack, filters.
fn answer(a: &Args) -> Result<Report, (u8, String)> {
    if let Some(to) = a.to {
        let flows = dump(&[family(to.ip())])?;
        let flows = flows_to(&flows, to, a.proto);
        let endpoints = endpoint_counts(&flows, &[]);
        return Ok(Report {
            service: None,
            to: Some(to),
            service_ports: Vec::new(),
            flows,
            endpoints,
        });
    }
    let service = a.service.clone().unwrap_or_default();
    let ports = service_ports(&a.server, &service)?;
    let ports: Vec<PortView> = ports
        .into_iter()
        .filter(|p| a.port.as_ref().is_none_or(|n| *n == p.port_name))
        .filter(|p| a.proto.is_none_or(|n| p.proto() == Some(n)))
        .collect();
    if ports.is_empty() {
        return Err((
            2,
            format!(
                "{service} has no such port{}",
                a.port
                    .as_ref()
                    .map(|n| format!(" named {n:?}"))
                    .unwrap_or_default()
            ),
        ));
    }
    let families: BTreeSet<Family> = ports.iter().map(|p| family(p.cluster_ip)).collect();
    let families: Vec<Family> = families.into_iter().collect();
    let flows = dump(&families)?;
    let local = if ports.iter().any(|p| p.node_port.is_some()) {
        crate::dataplane::local_addresses()
    } else {
        Vec::new()
    };
    let flows = service_flows(&flows, &ports, &local);
    let endpoints = endpoint_counts(&flows, &ports);
    Ok(Report {
        service: Some(service),
        to: None,
        service_ports: ports
            .iter()
            .map(|p| PortSearched {
                service_port: p.service_port.clone(),
                protocol: p.protocol.clone(),
                frontends: p.frontends().map(|(fe, _)| fe).collect(),
                node_port: p.node_port,
            })
            .collect(),
        flows,
        endpoints,
    })
}

/// The Service's ports from the running proxy's `/debug/services`.
fn service_ports(server: &str, service: &str) -> Result<Vec<PortView>, (u8, String)> {
    let (status, body) = super::cli::http_get(
        server,
        &format!("/debug/services?service={service}"),
    )
    .map_err(|e| {
        (
            1,
            format!("cannot ask the proxy at {server}: {e} (--to IP:PORT lists flows without it)"),
        )
    })?;
    match status {
        200 => {}
        400 => return Err((2, format!("the proxy answered 400: {}", body.trim()))),
        _ => {
            return Err((1, format!("the proxy answered {status}: {}", body.trim())));
        }
    }
    // A port removed while the answer streamed is `null`.
    let ports: Vec<Option<PortView>> = serde_json::from_str(&body)
        .map_err(|e| (1, format!("unexpected answer from the proxy: {e}")))?;
    let ports: Vec<PortView> = ports.into_iter().flatten().collect();
    if ports.is_empty() {
        return Err((
            2,
            format!(
                "the proxy programs no Service {service} (unknown, headless, or without a ClusterIP)"
            ),
        ));
    }
    Ok(ports)
}

fn family(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// Every flow of `families` in this network namespace.
fn dump(families: &[Family]) -> Result<Vec<Flow>, (u8, String)> {
    let mut all = Vec::new();
    for f in families {
        let flows = netlink::list(*f).map_err(|e| {
            let why = if e.needs_privilege() {
                " (ctnetlink needs CAP_NET_ADMIN: run it as root on the node, in the proxy's \
network namespace)"
            } else {
                ""
            };
            (1, format!("cannot read conntrack: {e}{why}"))
        })?;
        all.extend(flows);
    }
    Ok(all)
}

/// A flow as shown, without the Service's view of it.
fn view(f: &Flow) -> FlowView {
    FlowView {
        protocol: f.proto_name(),
        client: f.orig_src,
        frontend: f.orig_dst,
        frontend_kind: None,
        service_port: None,
        endpoint: f.dnat().then_some(f.reply_src),
        endpoint_state: None,
        stale: false,
        state: f.state_name(),
        timeout_seconds: f.timeout,
        assured: f.assured(),
        masqueraded_as: f.snat().then_some(f.reply_dst),
        zone: f.zone,
    }
}

/// Aligned columns, two spaces apart; empty columns are dropped.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let cells: Vec<String> = (0..cols)
            .filter(|c| widths[*c] > 0)
            .map(|c| format!("{:w$}", r[c], w = widths[c]))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
}

#[cfg(test)]
mod tests;
