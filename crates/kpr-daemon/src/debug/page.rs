//! The status page: health, the last syncs (a table and an SVG chart), a searchable, paged
//! table of service ports with their endpoints, a page per Service and an explain form, as
//! server-rendered HTML on the metrics address (`/`, `/service?name=ns/name`,
//! `/explain?from=&to=&proto=&from_node=`).
//!
//! For people who would rather look than read JSON. No JavaScript and no external assets
//! (inline CSS, inline SVG), and a Content-Security-Policy that forbids scripts, so even a
//! string that slipped past [`escape`] could run nothing; every string from the cluster goes
//! through [`escape`] all the same. Pages are bounded: the table shows [`PAGE_SIZE`] service
//! ports a page (at most [`MAX_LIMIT`]) and at most [`ROW_ENDPOINTS`] endpoints a row, so
//! 10,000 Services make a page of tens of kilobytes. Like `routes`, it takes snapshots through
//! [`Hub::snapshot`] (never blocking the loop) and renders on the blocking pool. Bad input
//! gets a 400 page saying what is wrong.

use super::routes::{
    EndpointState, ExplainQuery, ServicePortView, ServicesQuery, explain_in, port_view, select,
};
use super::{Hub, Snapshot, SyncRecord};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Service ports per page of the table.
pub const PAGE_SIZE: usize = 50;
/// The largest `limit` a request may ask for.
pub const MAX_LIMIT: usize = 500;
/// Endpoints shown per table row; the Service's page shows them all.
pub const ROW_ENDPOINTS: usize = 8;
/// Endpoints shown per port on a Service's page (`/debug/services` has every one).
const DETAIL_ENDPOINTS: usize = 1000;
/// Syncs shown in the table before the rest fold away.
const SYNC_ROWS: usize = 5;
/// How long a request waits for the loop to publish a fresh snapshot.
const PATIENCE: Duration = Duration::from_millis(500);

/// The status page's routes, to merge into the debug router.
pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(index))
        .route("/service", axum::routing::get(service))
        .route("/explain", axum::routing::get(explain))
        .with_state(hub)
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Percent-encodes a query-string value (everything but RFC 3986's unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The table's query: `?q=text&offset=N&limit=N`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListQuery {
    /// A substring of `namespace/name:port`, of a ClusterIP or of an endpoint address.
    #[serde(default)]
    pub q: String,
    pub offset: Option<usize>,
    pub limit: Option<usize>,
}

/// The explain form as the browser sends it (a checkbox sends `from_node=on`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExplainForm {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub proto: String,
    #[serde(default)]
    pub from_node: String,
}

/// What the page says about the process, read when the request comes.
#[derive(Debug, Clone)]
pub struct Status {
    pub mode: &'static str,
    /// `None` when the hub was given no health handle.
    pub health: Option<HealthView>,
    /// Oldest first.
    pub syncs: Vec<SyncRecord>,
    pub syncs_done: u64,
}

/// `/livez` as the page shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct HealthView {
    pub healthy: bool,
    /// Per family: when it last synced (RFC 3339) and whether it is healthy.
    #[serde(default)]
    pub status: BTreeMap<String, FamilyHealth>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FamilyHealth {
    #[serde(rename = "lastUpdated")]
    pub last_updated: String,
    pub healthy: bool,
}

impl Status {
    /// Reads the hub's syncs and health.
    pub fn read(hub: &Hub, now: SystemTime) -> Status {
        let health = hub.health().and_then(|h| {
            // The model answers `/livez` without counting a probe.
            let mut body = None;
            h.update(|m| body = Some(m.response(kpr_ops::health::Probe::Livez, now).1));
            body.and_then(|b| serde_json::from_str(&b).ok())
        });
        Status {
            mode: hub.fixed.mode,
            health,
            syncs: hub.syncs(),
            syncs_done: hub.syncs_done(),
        }
    }
}

async fn index(
    State(hub): State<Arc<Hub>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return bad_request("Status", "expected ?q=text&offset=N&limit=N (N a number)");
    };
    let snap = hub.snapshot(PATIENCE).await;
    let status = Status::read(&hub, SystemTime::now());
    blocking(move || (StatusCode::OK, index_html(&status, snap.as_deref(), &q))).await
}

async fn service(
    State(hub): State<Arc<Hub>>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Response {
    let name = query
        .ok()
        .and_then(|Query(q)| q.get("name").cloned())
        .unwrap_or_default();
    let snap = hub.snapshot(PATIENCE).await;
    blocking(move || service_html(snap.as_deref(), name.trim())).await
}

async fn explain(
    State(hub): State<Arc<Hub>>,
    query: Result<Query<ExplainForm>, QueryRejection>,
) -> Response {
    let Ok(Query(form)) = query else {
        return bad_request(
            "Explain",
            "expected ?from=IP&to=IP:port&proto=tcp|udp|sctp[&from_node=on]",
        );
    };
    let snap = hub.snapshot(PATIENCE).await;
    blocking(move || explain_html(&hub, snap.as_deref(), &form)).await
}

/// Runs a render on the blocking pool.
async fn blocking(render: impl FnOnce() -> (StatusCode, String) + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(render).await {
        Ok((status, body)) => html(status, body),
        Err(e) => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            layout(
                "Error",
                "",
                &format!("<p class=\"error\">{}</p>", escape(&e.to_string())),
            ),
        ),
    }
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                 frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

fn bad_request(title: &str, message: &str) -> Response {
    html(
        StatusCode::BAD_REQUEST,
        layout(
            title,
            "",
            &format!("<p class=\"error\">{}</p>", escape(message)),
        ),
    )
}

const NOT_PUBLISHED: &str = "The sync loop has not published its state yet (no sync has \
happened, or it is busy with a long one): refresh in a moment.";

/// `/`: health, syncs and one page of the service ports `q` selects.
pub fn index_html(st: &Status, snap: Option<&Snapshot>, q: &ListQuery) -> String {
    let mut b = String::with_capacity(32 * 1024);
    cards(&mut b, st, snap);
    b.push_str("<section id=\"syncs\"><h2>Syncs</h2><div class=\"syncgrid\"><div>");
    b.push_str(&sync_chart(&st.syncs));
    b.push_str("</div><div>");
    sync_table(&mut b, &st.syncs);
    b.push_str("</div></div></section>");
    b.push_str("<section id=\"services\"><h2>Services</h2>");
    match snap {
        Some(snap) => service_table(&mut b, snap, q),
        None => {
            let _ = write!(b, "<p class=\"error\">{}</p>", escape(NOT_PUBLISHED));
        }
    }
    b.push_str("</section>");
    let node = snap.map(|s| s.node.name.as_str()).unwrap_or("");
    layout("Status", node, &b)
}

fn cards(b: &mut String, st: &Status, snap: Option<&Snapshot>) {
    b.push_str("<div class=\"cards\">");
    match &st.health {
        Some(h) => {
            let (class, word) = if h.healthy {
                ("good", "healthy")
            } else {
                ("poor", "unhealthy")
            };
            let _ = write!(
                b,
                "<div class=\"card {class}\" id=\"health\"><h3>Health</h3><p class=\"big {word}\">{word}</p>"
            );
            for (family, f) in &h.status {
                let _ = write!(
                    b,
                    "<p>{} last update <span class=\"mono\" title=\"{}\">{}</span>{}</p>",
                    escape(family),
                    escape(&f.last_updated),
                    escape(&short_time(&f.last_updated)),
                    if f.healthy {
                        ""
                    } else {
                        " <b class=\"bad\">unhealthy</b>"
                    }
                );
            }
            b.push_str("<p class=\"muted\">as /livez reports it</p></div>");
        }
        None => b.push_str(
            "<div class=\"card\" id=\"health\"><h3>Health</h3><p class=\"big muted\">not known</p></div>",
        ),
    }
    let _ = write!(
        b,
        "<div class=\"card\"><h3>Syncs</h3><p class=\"big\">{}</p>",
        st.syncs_done
    );
    match st.syncs.last() {
        Some(s) => {
            let _ = write!(
                b,
                "<p>last <span class=\"mono\" title=\"{}\">{}</span>, {} in {}</p><p>{}</p>",
                escape(&s.time),
                escape(&short_time(&s.time)),
                if s.full { "full" } else { "partial" },
                fmt_secs(s.duration_seconds),
                result_html(&s.result)
            );
        }
        None => b.push_str("<p class=\"muted\">none yet</p>"),
    }
    b.push_str("</div>");
    let _ = write!(
        b,
        "<div class=\"card\"><h3>Node</h3><p class=\"big\">{}</p><p>{} mode</p>",
        snap.map(|s| escape(&s.node.name)).unwrap_or_default(),
        escape(st.mode)
    );
    if let Some(s) = snap {
        let ips: Vec<String> = s.node.node_ips.values().map(ToString::to_string).collect();
        let _ = write!(
            b,
            "<p>IPs {}</p><p>zone {}</p>",
            if ips.is_empty() {
                "none known".to_owned()
            } else {
                escape(&ips.join(", ")).into_owned()
            },
            escape(s.node.zone.as_deref().unwrap_or("-"))
        );
    }
    b.push_str("</div>");
    if let Some(s) = snap {
        let mut services = BTreeSet::new();
        let (mut ports, mut endpoints) = (0usize, 0usize);
        for fam in s.desired.families.values() {
            for sp in fam.ports.values() {
                services.insert(&sp.name.service);
                ports += 1;
                endpoints += sp.endpoints.len();
            }
        }
        let _ = write!(
            b,
            "<div class=\"card\"><h3>Services</h3><p class=\"big\">{}</p><p>{ports} service ports</p><p>{endpoints} endpoints in use</p></div>",
            services.len()
        );
    }
    b.push_str("</div>");
}

/// Seconds as a person reads them: `850 µs`, `4.2 ms`, `35 ms`, `1.25 s`.
pub fn fmt_secs(s: f64) -> String {
    if s == 0.0 {
        "0".into()
    } else if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s * 1e3 < 9.95 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `2025-05-01T10:00:00.123Z` as `2025-05-01 10:00:00` (UTC).
fn short_time(t: &str) -> String {
    match (t.get(..10), t.get(11..19)) {
        (Some(d), Some(h)) if t.is_char_boundary(19) => format!("{d} {h}"),
        _ => t.to_owned(),
    }
}

fn result_html(result: &str) -> String {
    if result.starts_with("ok") {
        format!("<span class=\"ok\">{}</span>", escape(result))
    } else {
        format!("<span class=\"bad\">{}</span>", escape(result))
    }
}

fn sync_table(b: &mut String, syncs: &[SyncRecord]) {
    if syncs.is_empty() {
        return;
    }
    let row = |b: &mut String, r: &SyncRecord| {
        let _ = write!(
            b,
            "<tr><td class=\"mono\" title=\"{}\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            escape(&r.time),
            escape(&short_time(&r.time)),
            if r.full { "full" } else { "partial" },
            r.changed_services,
            r.operations,
            fmt_secs(r.duration_seconds),
            r.programming_latency_seconds
                .map(fmt_secs)
                .unwrap_or_else(|| "-".into()),
            result_html(&r.result)
        );
    };
    const HEAD: &str = "<thead><tr><th>Time (UTC)</th><th>Kind</th><th class=\"num\" title=\"Services changed\">Changed</th><th class=\"num\" title=\"nftables operations or iptables chains written\">Operations</th><th class=\"num\">Duration</th><th class=\"num\" title=\"Network-programming latency\">Latency</th><th>Result</th></tr></thead>";
    let _ = write!(b, "<table class=\"syncs\">{HEAD}<tbody>");
    let newest_first: Vec<&SyncRecord> = syncs.iter().rev().collect();
    for r in newest_first.iter().take(SYNC_ROWS) {
        row(b, r);
    }
    b.push_str("</tbody></table>");
    if newest_first.len() > SYNC_ROWS {
        let _ = write!(
            b,
            "<details><summary>{} older syncs</summary><table class=\"syncs\">{HEAD}<tbody>",
            newest_first.len() - SYNC_ROWS
        );
        for r in newest_first.iter().skip(SYNC_ROWS) {
            row(b, r);
        }
        b.push_str("</tbody></table></details>");
    }
}

fn service_table(b: &mut String, snap: &Snapshot, q: &ListQuery) {
    let needle = q.q.trim();
    let limit = q.limit.unwrap_or(PAGE_SIZE).clamp(1, MAX_LIMIT);
    let offset = q.offset.unwrap_or(0);
    let _ = write!(
        b,
        "<form class=\"search\" method=\"get\" action=\"/\"><input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"namespace/name:port, ClusterIP or endpoint address\" size=\"44\"><button type=\"submit\">Search</button>{}</form>",
        escape(needle),
        if needle.is_empty() {
            String::new()
        } else {
            "<a href=\"/\">clear</a>".to_owned()
        }
    );
    let sq = ServicesQuery {
        q: (!needle.is_empty()).then(|| needle.to_owned()),
        ..ServicesQuery::default()
    };
    let mut total = 0usize;
    let mut rows = Vec::new();
    for (family, sp) in select(snap, &sq) {
        if total >= offset && total < offset.saturating_add(limit) {
            rows.push(port_view(snap, family, sp));
        }
        total += 1;
    }
    let _ = write!(
        b,
        "<p class=\"muted\" id=\"count\">{}</p>",
        if total == 0 {
            "No service port matches.".to_owned()
        } else if rows.is_empty() {
            format!("{total} service ports match; none at offset {offset}.")
        } else {
            format!(
                "Service ports {}–{} of {total}{}.",
                offset + 1,
                offset + rows.len(),
                if needle.is_empty() {
                    String::new()
                } else {
                    format!(" matching “{}”", escape(needle))
                }
            )
        }
    );
    if !rows.is_empty() {
        b.push_str("<table class=\"services\"><thead><tr><th>Service port</th><th>Family</th><th>Frontends</th><th>Traffic</th><th>Endpoints</th><th>Last change</th></tr></thead><tbody>");
        for v in &rows {
            service_row(b, v);
        }
        b.push_str("</tbody></table>");
    }
    let link = |off: usize| {
        let mut l = format!("/?q={}&amp;offset={off}", url_encode(needle));
        if limit != PAGE_SIZE {
            let _ = write!(l, "&amp;limit={limit}");
        }
        l
    };
    b.push_str("<nav class=\"pager\">");
    if offset > 0 {
        let _ = write!(
            b,
            "<a rel=\"prev\" href=\"{}\">← Previous {limit}</a>",
            link(offset.saturating_sub(limit))
        );
    }
    if offset.saturating_add(limit) < total {
        let _ = write!(
            b,
            "<a rel=\"next\" href=\"{}\">Next {} →</a>",
            link(offset + limit),
            limit.min(total - offset - limit)
        );
    }
    b.push_str("</nav>");
}

fn service_link(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}/{name}");
    format!(
        "<a href=\"/service?name={}\">{}</a>",
        url_encode(&full),
        escape(&full)
    )
}

fn service_row(b: &mut String, v: &ServicePortView) {
    let _ = write!(
        b,
        "<tr><td>{}{}</td><td>{} {}</td><td class=\"mono\">{}</td><td>internal: {}{}</td><td>",
        service_link(&v.namespace, &v.service),
        if v.port_name.is_empty() {
            String::new()
        } else {
            format!("<span class=\"muted\">:{}</span>", escape(&v.port_name))
        },
        v.family,
        escape(&v.protocol),
        frontends_brief(v),
        escape(v.internal),
        v.external
            .map(|e| format!("<br>external: {}", escape(e)))
            .unwrap_or_default()
    );
    if v.endpoints.is_empty() {
        b.push_str("<span class=\"muted\">none</span>");
    }
    for e in v.endpoints.iter().take(ROW_ENDPOINTS) {
        endpoint_badge(b, e);
    }
    if v.endpoints.len() > ROW_ENDPOINTS {
        let _ = write!(
            b,
            " <a href=\"/service?name={}\">+{} more</a>",
            url_encode(&format!("{}/{}", v.namespace, v.service)),
            v.endpoints.len() - ROW_ENDPOINTS
        );
    }
    let _ = write!(b, "</td><td>{}</td></tr>", last_change(v));
}

fn frontends_brief(v: &ServicePortView) -> String {
    let mut out = escape(&std::net::SocketAddr::new(v.cluster_ip, v.port).to_string()).into_owned();
    if let Some(np) = v.node_port {
        let _ = write!(out, "<br>NodePort {np}");
    }
    for ip in &v.external_ips {
        let _ = write!(out, "<br>external {ip}");
    }
    for ip in &v.load_balancer_ips {
        let _ = write!(out, "<br>LB {ip}");
    }
    out
}

/// `(class, word)` of an endpoint's conditions, as explain words them.
fn endpoint_condition(e: &EndpointState) -> (&'static str, &'static str) {
    match (e.ready, e.serving, e.terminating) {
        (true, _, _) => ("ready", "ready"),
        (false, true, true) => ("term", "serving-terminating"),
        (false, _, true) => ("term", "terminating"),
        _ => ("notready", "not ready"),
    }
}

fn endpoint_badge(b: &mut String, e: &EndpointState) {
    let (class, word) = endpoint_condition(e);
    let sets = match (e.cluster, e.local_set) {
        (true, true) => "in the Cluster and Local sets",
        (true, false) => "in the Cluster set",
        (false, true) => "in the Local set",
        (false, false) => "in no set",
    };
    let _ = write!(
        b,
        "<span class=\"ep {class}\" title=\"{word}; node {}; zone {}; {sets}\">{}",
        escape(e.node.as_deref().unwrap_or("-")),
        escape(e.zone.as_deref().unwrap_or("-")),
        escape(&e.address)
    );
    if class != "ready" {
        let _ = write!(b, " <em>{word}</em>");
    }
    b.push_str("</span>");
}

fn last_change(v: &ServicePortView) -> String {
    match &v.last_change {
        Some(t) => format!(
            "<span class=\"mono\" title=\"{}\">{}</span>{}",
            escape(t),
            escape(&short_time(t)),
            v.last_programming_latency_seconds
                .map(|l| format!("<br><span class=\"muted\">latency {}</span>", fmt_secs(l)))
                .unwrap_or_default()
        ),
        None => "<span class=\"muted\">before start</span>".into(),
    }
}

/// `/service?name=ns/name`: every port of one Service, with all its endpoints.
pub fn service_html(snap: Option<&Snapshot>, name: &str) -> (StatusCode, String) {
    let title = format!("Service {name}");
    if name.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            layout(
                "Service",
                "",
                "<p class=\"error\">name: required, as ?name=namespace/name</p>",
            ),
        );
    }
    let Some(snap) = snap else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            layout(
                &title,
                "",
                &format!("<p class=\"error\">{}</p>", escape(NOT_PUBLISHED)),
            ),
        );
    };
    let node = snap.node.name.as_str();
    let sq = ServicesQuery {
        service: Some(name.to_owned()),
        ..ServicesQuery::default()
    };
    let views: Vec<ServicePortView> = select(snap, &sq)
        .map(|(f, sp)| port_view(snap, f, sp))
        .collect();
    if views.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            layout(
                &title,
                node,
                &format!(
                    "<p class=\"error\">No Service {} in the last synced state (it may not exist, have no ports, or have been skipped as invalid: see the proxy's log).</p><p><a href=\"/?q={}\">Search for it</a></p>",
                    escape(name),
                    url_encode(name)
                ),
            ),
        );
    }
    let mut b = String::with_capacity(16 * 1024);
    let _ = write!(
        b,
        "<p><a href=\"/\">← all Services</a> · <a href=\"/debug/services?service={}\">as JSON</a></p>",
        url_encode(name)
    );
    for v in &views {
        port_section(&mut b, v);
    }
    (StatusCode::OK, layout(&title, node, &b))
}

fn port_section(b: &mut String, v: &ServicePortView) {
    let proto = v.protocol.to_ascii_lowercase();
    let _ = write!(
        b,
        "<section class=\"port\"><h2>{} <span class=\"muted\">{} {}</span></h2><div class=\"cols\"><table class=\"kv\"><tbody>",
        escape(&v.service_port),
        v.family,
        escape(&v.protocol)
    );
    let kv = |b: &mut String, k: &str, v: &str| {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    };
    let cluster = std::net::SocketAddr::new(v.cluster_ip, v.port).to_string();
    kv(
        b,
        "ClusterIP",
        &format!(
            "<span class=\"mono\">{}</span> <a href=\"/explain?from=&amp;from_node=on&amp;to={}&amp;proto={}\">explain</a>",
            escape(&cluster),
            url_encode(&cluster),
            url_encode(&proto)
        ),
    );
    if let Some(np) = v.node_port {
        kv(
            b,
            "NodePort",
            &format!("<span class=\"mono\">{np}</span> on the node-port addresses"),
        );
    }
    let list = |ips: &[std::net::IpAddr]| {
        ips.iter()
            .map(|ip| std::net::SocketAddr::new(*ip, v.port).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !v.external_ips.is_empty() {
        kv(
            b,
            "External IPs",
            &format!(
                "<span class=\"mono\">{}</span>",
                escape(&list(&v.external_ips))
            ),
        );
    }
    if !v.load_balancer_ips.is_empty() {
        kv(
            b,
            "Load-balancer IPs",
            &format!(
                "<span class=\"mono\">{}</span>",
                escape(&list(&v.load_balancer_ips))
            ),
        );
    }
    if !v.source_ranges.is_empty() {
        kv(
            b,
            "Source ranges",
            &format!(
                "<span class=\"mono\">{}</span>",
                escape(&v.source_ranges.join(", "))
            ),
        );
    }
    kv(
        b,
        "Traffic policies",
        &format!(
            "internal {}, external {}",
            escape(v.internal_traffic_policy),
            escape(v.external_traffic_policy)
        ),
    );
    kv(
        b,
        "ClusterIP traffic goes to",
        &action_html(v.internal, "internal"),
    );
    if let Some(e) = v.external {
        kv(b, "External traffic goes to", &action_html(e, "external"));
    }
    if let Some(t) = v.affinity_timeout_seconds {
        kv(b, "Session affinity", &format!("ClientIP, {t} s"));
    }
    if let Some(p) = v.health_check_node_port {
        kv(b, "Health check NodePort", &p.to_string());
    }
    kv(b, "Last change", &last_change(v));
    b.push_str("</tbody></table></div>");
    let _ = write!(
        b,
        "<h3>Endpoints ({})</h3><table class=\"endpoints\"><thead><tr><th>Address</th><th>Condition</th><th>Ready</th><th>Serving</th><th>Terminating</th><th>Node</th><th>Zone</th><th>On this node</th><th>Cluster set</th><th>Local set</th></tr></thead><tbody>",
        v.endpoints.len()
    );
    if v.endpoints.is_empty() {
        b.push_str("<tr><td colspan=\"10\" class=\"muted\">no endpoints</td></tr>");
    }
    let yes = |x: bool| {
        if x {
            "<td class=\"yes\">yes</td>"
        } else {
            "<td class=\"no\">no</td>"
        }
    };
    for e in v.endpoints.iter().take(DETAIL_ENDPOINTS) {
        let (class, word) = endpoint_condition(e);
        let _ = write!(
            b,
            "<tr><td class=\"mono\">{}</td><td><span class=\"ep {class}\">{word}</span></td>{}{}{}<td>{}</td><td>{}</td>{}{}{}</tr>",
            escape(&e.address),
            yes(e.ready),
            yes(e.serving),
            yes(e.terminating),
            escape(e.node.as_deref().unwrap_or("-")),
            escape(e.zone.as_deref().unwrap_or("-")),
            yes(e.local),
            yes(e.cluster),
            yes(e.local_set)
        );
    }
    b.push_str("</tbody></table>");
    if v.endpoints.len() > DETAIL_ENDPOINTS {
        let _ = write!(
            b,
            "<p class=\"muted\">{} more: see <a href=\"/debug/services?service={}\">/debug/services</a>.</p>",
            v.endpoints.len() - DETAIL_ENDPOINTS,
            url_encode(&format!("{}/{}", v.namespace, v.service))
        );
    }
    b.push_str("</section>");
}

fn action_html(action: &str, traffic: &str) -> String {
    let (class, text) = match action {
        "Cluster" => ("ok", "the Cluster set"),
        "Local" => ("ok", "the Local set"),
        "DROP" => ("bad", "DROP (no local endpoint)"),
        "REJECT" => ("bad", "REJECT (no usable endpoint)"),
        other => ("", other),
    };
    format!(
        "<span class=\"{class}\" data-traffic=\"{traffic}\">{}</span>",
        escape(text)
    )
}

/// `/explain`: the form, and the explanation of the packet it describes.
pub fn explain_html(
    hub: &Hub,
    snap: Option<&Snapshot>,
    form: &ExplainForm,
) -> (StatusCode, String) {
    let mut b = String::with_capacity(8 * 1024);
    explain_form(&mut b, form);
    let node = snap.map(|s| s.node.name.as_str()).unwrap_or("");
    let asked = [&form.from, &form.to, &form.from_node]
        .iter()
        .any(|f| !f.trim().is_empty());
    if !asked {
        b.push_str("<p class=\"muted\">Where does a packet go on this node, and why? Give its source and destination.</p>");
        return (StatusCode::OK, layout("Explain", node, &b));
    }
    let from_node = match form.from_node.trim() {
        "" | "false" | "off" | "0" => false,
        "on" | "true" | "1" => true,
        other => {
            let _ = write!(
                b,
                "<p class=\"error\">from_node: {} is not on, true or false</p>",
                escape(&format!("{other:?}"))
            );
            return (StatusCode::BAD_REQUEST, layout("Explain", node, &b));
        }
    };
    let Some(snap) = snap else {
        let _ = write!(b, "<p class=\"error\">{}</p>", escape(NOT_PUBLISHED));
        return (StatusCode::SERVICE_UNAVAILABLE, layout("Explain", node, &b));
    };
    let q = ExplainQuery {
        from: form.from.clone(),
        to: form.to.clone(),
        proto: form.proto.clone(),
        from_node,
        output: String::new(),
        // The page shows the model's answer; `kube-proxy-rs explain` adds the kernel's.
        kernel: false,
    };
    match explain_in(hub, snap, &q) {
        Ok(e) => {
            let v = &e.verdict;
            let class = match v.action.as_str() {
                "DNAT" => "v-dnat",
                "DROP" => "v-drop",
                "REJECT" => "v-reject",
                _ => "v-pass",
            };
            let _ = write!(
                b,
                "<section id=\"answer\"><h2>Verdict</h2><p><span class=\"verdict {class}\">{}</span> {}</p>",
                escape(&v.action),
                escape(&v.why)
            );
            if let Some(fe) = &e.frontend {
                let _ = write!(
                    b,
                    "<p>Frontend: {} <span class=\"mono\">{}</span> of {}{}</p>",
                    escape(&fe.kind),
                    escape(&fe.address),
                    service_link(&fe.namespace, &fe.service),
                    if fe.port_name.is_empty() {
                        String::new()
                    } else {
                        format!(":{}", escape(&fe.port_name))
                    }
                );
            }
            if !v.targets.is_empty() {
                b.push_str("<table class=\"targets\"><thead><tr><th>Endpoint</th><th class=\"num\">Probability</th><th>Masquerade</th></tr></thead><tbody>");
                for t in &v.targets {
                    let _ = write!(
                        b,
                        "<tr><td class=\"mono\">{}</td><td class=\"num\">{:.1}%</td><td>{}</td></tr>",
                        escape(&t.endpoint),
                        t.probability * 100.0,
                        if t.masquerade { "yes" } else { "no" }
                    );
                }
                b.push_str("</tbody></table>");
            }
            let _ = write!(
                b,
                "<h3>Explanation</h3><pre>{}</pre></section>",
                escape(&e.to_string())
            );
            (StatusCode::OK, layout("Explain", node, &b))
        }
        Err(msg) => {
            let _ = write!(b, "<p class=\"error\" id=\"answer\">{}</p>", escape(&msg));
            (StatusCode::BAD_REQUEST, layout("Explain", node, &b))
        }
    }
}

fn explain_form(b: &mut String, f: &ExplainForm) {
    let proto = f.proto.trim().to_ascii_lowercase();
    let option = |p: &str| {
        let selected = proto == p || (proto.is_empty() && p == "tcp");
        format!(
            "<option value=\"{p}\"{}>{}</option>",
            if selected { " selected" } else { "" },
            p.to_ascii_uppercase()
        )
    };
    let checked = matches!(f.from_node.trim(), "on" | "true" | "1");
    let _ = write!(
        b,
        "<section><h2>Explain a packet</h2><form class=\"explain\" method=\"get\" action=\"/explain\"><label>From <input name=\"from\" value=\"{}\" placeholder=\"10.0.0.5 or IP:port\" size=\"22\"></label><label>To <input name=\"to\" value=\"{}\" placeholder=\"172.30.0.10:80\" size=\"22\" required></label><label>Protocol <select name=\"proto\">{}{}{}</select></label><label><input type=\"checkbox\" name=\"from_node\"{}> from this node</label><button type=\"submit\">Explain</button></form></section>",
        escape(&f.from),
        escape(&f.to),
        option("tcp"),
        option("udp"),
        option("sctp"),
        if checked { " checked" } else { "" }
    );
}

/// The page around a body: title, navigation, the style sheet.
fn layout(title: &str, node: &str, body: &str) -> String {
    let mut s = String::with_capacity(body.len() + 4096);
    let _ = write!(
        s,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{} · kube-proxy-rs{}</title><style>{STYLE}</style></head><body><header><h1>kube-proxy-rs</h1><nav><a href=\"/\">Status</a><a href=\"/explain\">Explain</a><a href=\"/metrics\">Metrics</a><a href=\"/debug/syncs\">Syncs (JSON)</a><a href=\"/debug/rules\">Rules</a><a href=\"/configz\">Config</a></nav><span class=\"who\">{}</span></header><main><h1 class=\"title\">{}</h1>",
        escape(title),
        if node.is_empty() {
            String::new()
        } else {
            format!(" on {}", escape(node))
        },
        if node.is_empty() {
            String::new()
        } else {
            format!("node {}", escape(node))
        },
        escape(title)
    );
    s.push_str(body);
    s.push_str("</main></body></html>\n");
    s
}

/// The stylesheet, inline in every page (no external assets).
const STYLE: &str = include_str!("page/style.css");

mod chart;

#[cfg(test)]
use chart::nice_max;
pub use chart::sync_chart;

#[cfg(test)]
mod tests;
