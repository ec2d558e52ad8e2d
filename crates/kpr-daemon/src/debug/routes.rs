//! The debug endpoints, read-only JSON on the metrics address: `/debug/services` (streamed),
//! `/debug/explain`, `/debug/rules` (the committed ruleset, at most one render a second),
//! `/debug/syncs`, and upstream's `/configz`. Bad queries get 400 with a message. Nothing here
//! holds a lock the sync loop needs; heavy work runs on the blocking pool.

use super::{Hub, Snapshot};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kpr_model::explain::Explanation;
use kpr_model::intent::Packet;
use kpr_model::{IpFamily, Protocol, ServicePortDesired};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How old a snapshot explain answers from at once, syncs since or not.
const RECENT: Duration = Duration::from_secs(1);
/// How long a request waits for the loop to publish a fresh snapshot.
const PATIENCE: Duration = Duration::from_millis(500);
/// `/debug/rules` renders at most this often; requests in between get the last render.
const RULES_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Ctx {
    hub: Arc<Hub>,
    /// The last `/debug/rules` render: when, for which snapshot, the text.
    rules: Mutex<Option<(Instant, u64, Arc<str>)>>,
}

/// The debug routes, to merge into the metrics server's router.
pub fn router(hub: Arc<Hub>) -> axum::Router {
    let page = super::page::router(hub.clone());
    let verify = super::verify::router(hub.clone());
    let ctx = Arc::new(Ctx {
        hub,
        rules: Mutex::new(None),
    });
    axum::Router::new()
        .route("/debug/services", axum::routing::get(services))
        .route("/debug/explain", axum::routing::get(explain))
        .route("/debug/rules", axum::routing::get(rules))
        .route("/debug/syncs", axum::routing::get(syncs))
        .route("/configz", axum::routing::get(configz))
        .with_state(ctx)
        .merge(page)
        .merge(verify)
}

/// A JSON answer with upstream-style headers.
pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// A 400 (or other) answer with a JSON message.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() }).to_string();
    json_response(status, body)
}

async fn snapshot(ctx: &Ctx) -> Result<Arc<Snapshot>, Response> {
    ctx.hub.snapshot(PATIENCE).await.ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the sync loop has not published its state yet",
        )
    })
}

/// The question of `/debug/explain` and `kube-proxy-rs explain`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExplainQuery {
    /// `IP` or `IP:port` (`[v6]:port`); with `from_node` it may be empty (the node's IP).
    #[serde(default)]
    pub from: String,
    /// `IP:port` (`[v6]:port`).
    #[serde(default)]
    pub to: String,
    /// `tcp`, `udp` or `sctp` (default `tcp`).
    #[serde(default)]
    pub proto: String,
    /// Sent by a process of the node itself.
    #[serde(default)]
    pub from_node: bool,
    /// `json` (the default here) or `text`.
    #[serde(default)]
    pub output: String,
    /// Also say whether the kernel's rules agree (default); `false` answers from the model
    /// alone, without reading the kernel.
    #[serde(default = "yes")]
    pub kernel: bool,
}

fn yes() -> bool {
    true
}

/// A packet from the question; `Err` says what is wrong with it.
pub fn parse_packet(
    q: &ExplainQuery,
    node_ips: &BTreeMap<IpFamily, IpAddr>,
) -> Result<Packet, String> {
    let to: SocketAddr =
        q.to.trim()
            .parse()
            .map_err(|_| format!("to: {:?} is not IP:port (IPv6 as [addr]:port)", q.to))?;
    if to.port() == 0 {
        return Err("to: the port must be 1-65535".into());
    }
    let protocol = match q.proto.trim().to_ascii_lowercase().as_str() {
        "" | "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        other => return Err(format!("proto: {other:?} is not tcp, udp or sctp")),
    };
    let family = IpFamily::of(&to.ip());
    let from = q.from.trim();
    let src = if from.is_empty() {
        if !q.from_node {
            return Err("from: required (or from_node for traffic of the node itself)".into());
        }
        *node_ips
            .get(&family)
            .ok_or_else(|| format!("from: this node has no {family} address; give one"))?
    } else {
        match from.parse::<SocketAddr>() {
            Ok(sa) => sa.ip(),
            Err(_) => from
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| format!("from: {from:?} is not IP or IP:port"))?,
        }
    };
    if IpFamily::of(&src) != family {
        return Err(format!(
            "from {src} and to {} are of different families",
            to.ip()
        ));
    }
    Ok(Packet {
        src,
        iif: None,
        from_host: q.from_node,
        dst: to.ip(),
        protocol,
        port: to.port(),
    })
}

/// Explains a question against a snapshot (blocking: it may list the host's addresses).
pub fn explain_in(hub: &Hub, snap: &Snapshot, q: &ExplainQuery) -> Result<Explanation, String> {
    let pkt = parse_packet(q, &snap.node.node_ips)?;
    let family = IpFamily::of(&pkt.dst);
    let fam = snap
        .desired
        .families
        .get(&family)
        .ok_or_else(|| format!("no {family} state yet"))?;
    let host = hub.host_view(family, &snap.node);
    Ok(kpr_model::explain::explain(
        fam,
        &snap.state,
        &snap.node,
        &host,
        &pkt,
    ))
}

async fn explain(
    State(ctx): State<Arc<Ctx>>,
    query: Result<Query<ExplainQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected ?from=IP&to=IP:port&proto=tcp|udp|sctp[&from_node=true][&output=text]",
        );
    };
    // A snapshot under a second old answers at once (the kernel check below compares the
    // kernel with that snapshot's own committed rules).
    let snap = match ctx.hub.recent_snapshot(RECENT, PATIENCE).await {
        Some(s) => s,
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sync loop has not published its state yet",
            );
        }
    };
    let hub = ctx.hub.clone();
    let text = q.output == "text";
    // The model's answer, and whether the kernel agrees (it reads the kernel's rules).
    let answer =
        tokio::task::spawn_blocking(move || super::verify::explain_live(&hub, &snap, &q)).await;
    match answer {
        Ok(Ok(e)) if text => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            e.to_string(),
        )
            .into_response(),
        Ok(Ok(e)) => json_response(
            StatusCode::OK,
            serde_json::to_string(&e).unwrap_or_default(),
        ),
        Ok(Err(msg)) => error(StatusCode::BAD_REQUEST, msg),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Filters and pages of `/debug/services`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServicesQuery {
    /// `namespace/name`: that Service only.
    pub service: Option<String>,
    /// A substring of `namespace/name:port`, or of an address.
    pub q: Option<String>,
    pub offset: Option<usize>,
    pub limit: Option<usize>,
}

/// One service port as `/debug/services` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortView {
    pub family: IpFamily,
    pub service_port: String,
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    pub protocol: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<String>,
    pub affinity_timeout_seconds: Option<u32>,
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
    /// What ClusterIP traffic gets: `Cluster`, `Local` (a set), `DROP` or `REJECT`.
    pub internal: &'static str,
    /// What external traffic gets, when the port has external frontends.
    pub external: Option<&'static str>,
    pub health_check_node_port: Option<u16>,
    pub endpoints: Vec<EndpointState>,
    pub last_change: Option<String>,
    pub last_programming_latency_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointState {
    pub address: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// In the Cluster set.
    pub cluster: bool,
    /// In the Local set.
    pub local_set: bool,
}

/// The view of one service port.
pub fn port_view(snap: &Snapshot, family: IpFamily, sp: &ServicePortDesired) -> ServicePortView {
    use kpr_model::{ExternalAction, InternalAction};
    let infos = snap.state.endpoint_infos(&sp.name, family, &snap.node.name);
    let (zones, nodes) = snap.state.endpoint_places(&sp.name, family);
    let change = snap.changes.get(&sp.name.service);
    ServicePortView {
        family,
        service_port: sp.name.to_string(),
        namespace: sp.name.service.namespace.to_string(),
        service: sp.name.service.name.to_string(),
        port_name: sp.name.port.to_string(),
        protocol: sp.protocol.to_string(),
        cluster_ip: sp.cluster_ip,
        port: sp.port,
        node_port: sp.node_port,
        external_ips: sp.external_ips.clone(),
        load_balancer_ips: sp.load_balancer_ips.clone(),
        source_ranges: sp.firewall_allow.iter().map(ToString::to_string).collect(),
        affinity_timeout_seconds: sp.affinity_timeout,
        internal_traffic_policy: if sp.internal_policy_local {
            "Local"
        } else {
            "Cluster"
        },
        external_traffic_policy: if sp.external_policy_local {
            "Local"
        } else {
            "Cluster"
        },
        internal: match sp.internal {
            InternalAction::Cluster => "Cluster",
            InternalAction::Local => "Local",
            InternalAction::Drop => "DROP",
            InternalAction::Reject => "REJECT",
        },
        external: sp.external.map(|a| match a {
            ExternalAction::Cluster => "Cluster",
            ExternalAction::Local => "Local",
            ExternalAction::Reject => "REJECT",
        }),
        health_check_node_port: sp.health_check_node_port,
        endpoints: infos
            .iter()
            .map(|e| EndpointState {
                address: e.addr.to_string(),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                local: e.local,
                node: nodes.get(&e.addr.ip()).cloned().flatten(),
                zone: zones.get(&e.addr.ip()).cloned().flatten(),
                cluster: sp.cluster_endpoints.iter().any(|c| c.addr == e.addr),
                local_set: sp.local_endpoints.iter().any(|c| c.addr == e.addr),
            })
            .collect(),
        last_change: change.map(|c| kpr_ops::time::rfc3339_nano(c.at)),
        last_programming_latency_seconds: change.and_then(|c| c.latency).map(|d| d.as_secs_f64()),
    }
}

/// The service ports a query selects, in order: `(family, port)` of the snapshot.
pub fn select<'a>(
    snap: &'a Snapshot,
    q: &ServicesQuery,
) -> impl Iterator<Item = (IpFamily, &'a Arc<ServicePortDesired>)> + 'a {
    let service = q.service.clone();
    let needle = q.q.clone().unwrap_or_default();
    snap.desired
        .families
        .iter()
        .flat_map(|(f, fam)| fam.ports.values().map(move |sp| (*f, sp)))
        .filter(move |(_, sp)| {
            service
                .as_deref()
                .is_none_or(|s| sp.name.service.to_string() == s)
        })
        .filter(move |(_, sp)| {
            needle.is_empty()
                || sp.name.to_string().contains(&needle)
                || sp.cluster_ip.to_string().contains(&needle)
                || sp
                    .endpoints
                    .iter()
                    .any(|e| e.addr.to_string().contains(&needle))
        })
        .skip(q.offset.unwrap_or(0))
        .take(q.limit.unwrap_or(usize::MAX))
}

/// Streamed: the array is written a few hundred ports at a time, never built whole.
async fn services(
    State(ctx): State<Arc<Ctx>>,
    query: Result<Query<ServicesQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected ?service=ns/name, ?q=text, ?offset=N, ?limit=N",
        );
    };
    let snap = match snapshot(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    // The selected ports' names, then chunks rendered as the client reads.
    let keys: Arc<Vec<(IpFamily, kpr_model::ServicePortName)>> = Arc::new(
        select(&snap, &q)
            .map(|(f, sp)| (f, sp.name.clone()))
            .collect(),
    );
    const CHUNK: usize = 256;
    // Each chunk is serialized on a blocking thread (idle priority in the daemon), never on
    // the server's own.
    let chunks = futures_util::stream::unfold(0usize, move |i| {
        let (snap, keys) = (snap.clone(), keys.clone());
        async move {
            if i > keys.len() {
                return None;
            }
            let (len, end) = (keys.len(), (i + CHUNK).min(keys.len()));
            let chunk = tokio::task::spawn_blocking(move || services_chunk(&snap, &keys, i, end))
                .await
                .unwrap_or_default();
            // After the chunk that closes the array, the stream ends.
            let next = if end == len { end + 1 } else { end };
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), next))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(Body::from_stream(chunks))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The JSON text of ports `i..end` of a `/debug/services` answer (the first chunk opens the
/// array, the last closes it).
fn services_chunk(
    snap: &Snapshot,
    keys: &[(IpFamily, kpr_model::ServicePortName)],
    i: usize,
    end: usize,
) -> String {
    let mut buf = String::new();
    if i == 0 {
        buf.push('[');
    }
    for (n, (family, name)) in keys[i..end].iter().enumerate() {
        if i + n > 0 {
            buf.push(',');
        }
        match snap
            .desired
            .families
            .get(family)
            .and_then(|f| f.ports.get(name))
        {
            Some(sp) => buf.push_str(
                &serde_json::to_string(&port_view(snap, *family, sp)).unwrap_or_default(),
            ),
            None => buf.push_str("null"),
        }
    }
    if end == keys.len() {
        buf.push_str("]\n");
    }
    buf
}

async fn syncs(State(ctx): State<Arc<Ctx>>) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_string(&ctx.hub.syncs()).unwrap_or_default(),
    )
}

async fn configz(State(ctx): State<Arc<Ctx>>) -> Response {
    let body = serde_json::json!({ "kubeproxy.config.k8s.io": ctx.hub.fixed.configz });
    json_response(StatusCode::OK, body.to_string())
}

/// The committed ruleset: a full render of the last synced desired state (partial renders
/// equal full ones), as `nft list table` shows it or as `iptables-restore` input.
pub fn rules_text(hub: &Hub, snap: &Snapshot) -> String {
    let f = &hub.fixed;
    if f.mode == "iptables" {
        crate::dataplane::iptables_text(
            &snap.desired,
            f.masquerade_bit,
            &f.node_ports,
            f.localhost_node_ports,
            &snap.node,
        )
    } else {
        crate::dataplane::ruleset_text(&snap.desired, f.masquerade_bit, &f.node_ports, &snap.node)
    }
}

async fn rules(State(ctx): State<Arc<Ctx>>) -> Response {
    let text_response = |t: Arc<str>| {
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            t.to_string(),
        )
            .into_response()
    };
    let cached = ctx.rules.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some((at, _, text)) = &cached
        && at.elapsed() < RULES_INTERVAL
    {
        return text_response(text.clone());
    }
    let snap = match snapshot(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some((_, generation, text)) = &cached
        && *generation == snap.generation
    {
        return text_response(text.clone());
    }
    let hub = ctx.hub.clone();
    let generation = snap.generation;
    let text: Arc<str> = match tokio::task::spawn_blocking(move || rules_text(&hub, &snap)).await {
        Ok(t) => t.into(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    *ctx.rules.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((Instant::now(), generation, text.clone()));
    text_response(text)
}
