//! The status page's tests: escaping, the pages' content and status codes, sizes with 10,000
//! Services, the chart, and the routes through a real server on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::sync::SyncState;
use kpr_testkit::{service, slice};

use crate::debug::fixtures::{hub, sync_config, synced};

/// A snapshot of these Services and slices, synced once.
fn snapshot(services: Vec<kpr_model::Service>, slices: Vec<kpr_model::EndpointSlice>) -> Snapshot {
    let node = kpr_testkit::node("node-a")
        .zone("a")
        .address("InternalIP", "192.168.0.2")
        .build();
    let state = SyncState::new(sync_config(&["10.0.0.0/8"]));
    synced(state, Some(node), services, slices).debug_snapshot(0)
}

fn web() -> Snapshot {
    snapshot(
        vec![
            service("default", "web")
                .cluster_ip("172.30.0.10")
                .port("http", 80, "TCP")
                .build(),
            service("default", "db")
                .cluster_ip("172.30.0.66")
                .port("", 5432, "TCP")
                .build(),
        ],
        vec![
            slice("default", "web", "1")
                .port("http", 8080, "TCP")
                .ready("10.0.0.11", "node-a")
                .ready("10.0.0.12", "node-b")
                .terminating("10.0.0.13", "node-a")
                .build(),
            // Names are validated, node names of endpoints are not.
            slice("default", "db", "1")
                .port("", 5432, "TCP")
                .ready("10.0.0.21", "x\"><script>alert('hi')</script>")
                .build(),
        ],
    )
}

fn status(syncs: Vec<SyncRecord>) -> Status {
    Status {
        mode: "nftables",
        health: Some(HealthView {
            healthy: true,
            status: BTreeMap::from([(
                "IPv4".to_owned(),
                FamilyHealth {
                    last_updated: "2025-05-01T10:00:05.5Z".into(),
                    healthy: true,
                },
            )]),
        }),
        syncs_done: syncs.len() as u64,
        syncs,
    }
}

fn record(i: usize) -> SyncRecord {
    SyncRecord {
        time: format!("2025-05-01T10:{:02}:{:02}.123456789Z", i / 60, i % 60),
        full: i == 0,
        changed_services: i,
        operations: 10 * i,
        duration_seconds: 0.001 * (i % 7 + 1) as f64,
        result: if i == 5 {
            "netlink: <EINVAL> & more".into()
        } else {
            "ok".into()
        },
        programming_latency_seconds: (!i.is_multiple_of(3)).then_some(0.05 * (i % 5) as f64),
    }
}

#[test]
fn escape_replaces_the_five_characters_and_borrows_otherwise() {
    assert_eq!(
        escape(r#"<a href="x" class='y'>&amp;</a>"#),
        "&lt;a href=&quot;x&quot; class=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
    );
    assert!(matches!(escape("default/web:http"), Cow::Borrowed(_)));
    assert_eq!(escape("ünïcödé ✓"), "ünïcödé ✓");
    assert_eq!(escape(""), "");
    assert_eq!(
        url_encode("default/web a&b=ü"),
        "default%2Fweb%20a%26b%3D%C3%BC"
    );
}

#[test]
fn cluster_strings_are_escaped_everywhere() {
    let snap = web();
    let st = status(vec![record(5)]);
    let pages = [
        index_html(&st, Some(&snap), &ListQuery::default()),
        index_html(
            &st,
            Some(&snap),
            &ListQuery {
                q: "<script>".into(),
                ..ListQuery::default()
            },
        ),
        service_html(Some(&snap), "default/db").1,
        service_html(Some(&snap), "default/<i>missing</i>").1,
    ];
    for page in &pages {
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
        assert!(!page.contains("<i>"), "{page}");
        assert!(!page.contains("<EINVAL>"), "{page}");
    }
    let node = "x&quot;&gt;&lt;script&gt;alert(&#39;hi&#39;)&lt;/script&gt;";
    assert!(pages[0].contains(&format!("title=\"ready; node {node}; zone -")));
    assert!(pages[0].contains("netlink: &lt;EINVAL&gt; &amp; more"));
    assert!(
        pages[1].contains("value=\"&lt;script&gt;\""),
        "{}",
        pages[1]
    );
    assert!(
        pages[1].contains("No service port matches."),
        "{}",
        pages[1]
    );
    assert!(
        pages[2].contains(&format!("<td>{node}</td>")),
        "{}",
        pages[2]
    );
    assert!(pages[3].contains("No Service default/&lt;i&gt;missing&lt;/i&gt;"));
}

#[test]
fn the_table_shows_endpoints_with_their_conditions() {
    let snap = web();
    let page = index_html(&status(vec![record(0)]), Some(&snap), &ListQuery::default());
    assert!(
        page.contains("href=\"/service?name=default%2Fweb\""),
        "{page}"
    );
    assert!(page.contains("10.0.0.11:8080"));
    assert!(page.contains("10.0.0.12:8080"));
    assert!(page.contains("10.0.0.13:8080 <em>serving-terminating</em>"));
    assert!(page.contains("healthy"));
    assert!(page.contains("Service ports 1–2 of 2."));
    let (code, detail) = service_html(Some(&snap), "default/web");
    assert_eq!(code, StatusCode::OK);
    assert!(detail.contains("<td class=\"mono\">10.0.0.13:8080</td><td><span class=\"ep term\">serving-terminating</span></td><td class=\"no\">no</td><td class=\"yes\">yes</td><td class=\"yes\">yes</td><td>node-a</td><td>-</td>"), "{detail}");
    assert!(detail.contains("the Cluster set"));
    let (missing, _) = service_html(Some(&snap), "default/nope");
    assert_eq!(missing, StatusCode::NOT_FOUND);
    assert_eq!(service_html(Some(&snap), "").0, StatusCode::BAD_REQUEST);
    assert_eq!(
        service_html(None, "default/web").0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn explain_answers_and_bad_input_is_a_400() {
    let snap = web();
    let hub = hub();
    let form = |from: &str, to: &str, proto: &str, from_node: &str| ExplainForm {
        from: from.into(),
        to: to.into(),
        proto: proto.into(),
        from_node: from_node.into(),
    };
    let (code, page) = explain_html(
        &hub,
        Some(&snap),
        &form("10.0.0.5", "172.30.0.10:80", "tcp", ""),
    );
    assert_eq!(code, StatusCode::OK, "{page}");
    assert!(
        page.contains("<span class=\"verdict v-dnat\">DNAT</span>"),
        "{page}"
    );
    assert!(page.contains("10.0.0.11:8080") && page.contains("10.0.0.12:8080"));
    assert!(
        page.contains("<pre>Packet 10.0.0.5 -&gt; 172.30.0.10:80/TCP"),
        "{page}"
    );
    let (code, page) = explain_html(&hub, Some(&snap), &form("", "", "", ""));
    assert_eq!(code, StatusCode::OK);
    assert!(!page.contains("id=\"answer\""));
    for bad in [
        form("10.0.0.5", "nonsense<b>", "tcp", ""),
        form("10.0.0.5", "172.30.0.10:80", "icmp", ""),
        form("", "172.30.0.10:80", "tcp", ""),
        form("fd00::1", "172.30.0.10:80", "tcp", ""),
        form("10.0.0.5", "172.30.0.10:80", "tcp", "maybe"),
    ] {
        let (code, page) = explain_html(&hub, Some(&snap), &bad);
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad:?}: {page}");
        assert!(page.contains("class=\"error\""));
        assert!(!page.contains("<b>"));
    }
    let (code, _) = explain_html(&hub, None, &form("10.0.0.5", "172.30.0.10:80", "", ""));
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn ten_thousand_services_make_a_small_page_with_paging() {
    let n = 10_000u32;
    let services = (0..n)
        .map(|i| {
            service("ns", &format!("svc-{i:05}"))
                .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
                .port("http", 80, "TCP")
                .build()
        })
        .collect();
    let slices = (0..n)
        .map(|i| {
            let mut s = slice("ns", &format!("svc-{i:05}"), "1").port("http", 8080, "TCP");
            for k in 0..20u32 {
                s = s.ready(
                    &format!("10.{}.{}.{}", 1 + k, i / 250, i % 250 + 1),
                    "node-b",
                );
            }
            s.build()
        })
        .collect();
    let snap = snapshot(services, slices);
    let st = status((0..crate::debug::SYNC_HISTORY).map(record).collect());
    let start = std::time::Instant::now();
    let page = index_html(&st, Some(&snap), &ListQuery::default());
    eprintln!(
        "10,000 Services x 20 endpoints: first page {} bytes in {:?}",
        page.len(),
        start.elapsed()
    );
    assert!(page.len() < 500 * 1024, "{} bytes", page.len());
    assert!(page.contains("Service ports 1–50 of 10000."));
    assert!(page.contains("rel=\"next\" href=\"/?q=&amp;offset=50\""));
    assert!(!page.contains("rel=\"prev\""));
    assert!(page.contains("+12 more"));
    assert_eq!(
        page.matches("<tr><td><a href=\"/service").count(),
        PAGE_SIZE
    );
    let last = index_html(
        &st,
        Some(&snap),
        &ListQuery {
            offset: Some(9_990),
            ..ListQuery::default()
        },
    );
    assert!(last.contains("Service ports 9991–10000 of 10000."));
    assert!(last.contains("rel=\"prev\" href=\"/?q=&amp;offset=9940\""));
    assert!(!last.contains("rel=\"next\""));
    let found = index_html(
        &st,
        Some(&snap),
        &ListQuery {
            q: "svc-0999".into(),
            limit: Some(100_000),
            ..ListQuery::default()
        },
    );
    assert!(
        found.contains("Service ports 1–10 of 10 matching “svc-0999”."),
        "capped at MAX_LIMIT, 10 match"
    );
    assert!(found.len() < 100 * 1024);
    let huge = index_html(
        &st,
        Some(&snap),
        &ListQuery {
            limit: Some(100_000),
            ..ListQuery::default()
        },
    );
    assert!(huge.contains("Service ports 1–500 of 10000."));
    eprintln!(
        "limit=100000 (capped at {MAX_LIMIT}): {} bytes; search: {} bytes",
        huge.len(),
        found.len()
    );
    assert!(huge.len() < 2 * 1024 * 1024, "{} bytes", huge.len());
}

#[test]
fn the_chart_scales_and_marks_failures() {
    let syncs: Vec<SyncRecord> = (0..100).map(record).collect();
    let svg = sync_chart(&syncs);
    assert_eq!(svg.matches("<rect class=\"bar").count(), 100);
    assert_eq!(svg.matches("<rect class=\"bar fail\"").count(), 1);
    assert_eq!(svg.matches("<circle").count(), 66);
    assert!(
        svg.contains(">10 ms</text>"),
        "durations up to 7 ms: scale 10 ms"
    );
    assert!(svg.contains(">200 ms</text>"), "latencies up to 0.2 s");
    assert!(svg.len() < 64 * 1024, "{}", svg.len());
    assert!(sync_chart(&[]).contains("no syncs yet"));
    assert_eq!(nice_max(0.0), 0.001);
    assert_eq!(nice_max(0.0031), 0.005);
    assert_eq!(nice_max(1.0), 1.0);
    assert_eq!(nice_max(1.2), 2.0);
    assert_eq!(fmt_secs(0.0004), "400 µs");
    assert_eq!(fmt_secs(0.0042), "4.2 ms");
    assert_eq!(fmt_secs(1.25), "1.25 s");
}

/// The routes through a real server: content type, status codes, the health handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_serve_html_and_400s() {
    let hub = hub();
    let health = kpr_ops::server::Health::new(kpr_ops::health::HealthModel::new(
        &["IPv4"],
        SystemTime::now(),
        Duration::from_secs(60),
    ));
    hub.set_health(health);
    hub.publish(web());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(async move { axum::serve(listener, crate::debug::routes::router(hub)).await });
    // A plain blocking client on the blocking pool (tokio's io-util is not a dependency).
    let get = |path: &'static str| async move {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            tcp.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            tcp.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap()
    };
    let page = get("/?q=web").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase()
            .contains("content-type: text/html; charset=utf-8")
    );
    assert!(
        page.to_lowercase()
            .contains("content-security-policy: default-src 'none'")
    );
    assert!(
        page.contains("<p class=\"big healthy\">healthy</p>"),
        "{page}"
    );
    assert!(page.contains("10.0.0.13:8080"));
    for (path, code) in [
        ("/?offset=x", "400"),
        ("/service", "400"),
        ("/service?name=default%2Fweb", "200"),
        ("/service?name=a%2Fb", "404"),
        ("/explain", "200"),
        ("/explain?from=10.0.0.5&to=172.30.0.10:80&proto=tcp", "200"),
        ("/explain?from=10.0.0.5&to=172.30.0.10&proto=tcp", "400"),
        ("/explain?from=%ZZ&to=1", "400"),
        ("/debug/syncs", "200"),
    ] {
        let r = get(path).await;
        assert!(r.starts_with(&format!("HTTP/1.1 {code}")), "{path}: {r}");
    }
    server.abort();
}
