//! The debug endpoints over real HTTP on 127.0.0.1: answers, streaming, bad input.
#![allow(clippy::unwrap_used)]

use super::*;
use kpr_testkit::{NODE, service, slice};

fn hub_with(services: u32) -> Arc<Hub> {
    let hub = Hub::new(Static {
        localhost_node_ports: true,
        configz: serde_json::json!({"mode": "nftables", "clientConnection": {"kubeconfig": "/var/lib/kube-proxy/kubeconfig"}}),
        ..fixtures::fixed()
    });
    let state =
        crate::sync::SyncState::new(fixtures::sync_config(&["10.0.0.0/8"])).with_debug(hub.clone());
    let svcs = (0..services)
        .map(|i| {
            service("ns", &format!("s{i}"))
                .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
                .port("http", 80, "TCP")
                .build()
        })
        .collect();
    let slices = (0..services)
        .map(|i| {
            slice("ns", &format!("s{i}"), "a")
                .port("http", 8080, "TCP")
                .ready(&format!("10.1.{}.{}", i / 250, i % 250 + 1), NODE)
                .terminating(&format!("10.2.{}.{}", i / 250, i % 250 + 1), "node-b")
                .build()
        })
        .collect();
    fixtures::synced(state, None, svcs, slices).publish_debug();
    hub
}

async fn serve(hub: Arc<Hub>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, routes::router(hub)).await.unwrap();
    });
    addr
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let server = format!("http://{addr}");
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || cli::http_get(&server, &path).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_answers_and_refuses_bad_questions_with_400() {
    // `kernel=false`: the model's answer alone (this test reads no kernel).
    let addr = serve(hub_with(3)).await;
    let (code, body) = get(
        addr,
        "/debug/explain?from=10.0.0.5&to=172.30.0.2:80&proto=tcp&kernel=false",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["verdict"]["action"], "DNAT");
    assert_eq!(v["frontend"]["servicePort"], "ns/s1:http");
    let (code, text) = get(
        addr,
        "/debug/explain?from=10.0.0.5&to=172.30.0.2:80&output=text&kernel=false",
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        text.contains("Frontend: ClusterIP 172.30.0.2:80 of ns/s1:http"),
        "{text}"
    );
    for (bad, says) in [
        ("/debug/explain", "to:"),
        ("/debug/explain?to=172.30.0.2", "IP:port"),
        ("/debug/explain?to=172.30.0.2:99999", "IP:port"),
        ("/debug/explain?to=172.30.0.2:0&from=10.0.0.5", "1-65535"),
        (
            "/debug/explain?to=172.30.0.2:80&from=10.0.0.5&proto=icmp",
            "proto",
        ),
        ("/debug/explain?to=172.30.0.2:80&from=not-an-ip", "from"),
        ("/debug/explain?to=172.30.0.2:80&from=fd00::1", "families"),
        (
            "/debug/explain?to=172.30.0.2:80&from=10.0.0.5&from_node=maybe",
            "expected",
        ),
        ("/debug/services?offset=-1", "expected"),
    ] {
        let (code, body) = get(addr, bad).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body.contains(says), "{bad}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].is_string(), "{bad}: {body}");
    }
}

/// `/debug/services` is streamed (chunked, never one giant string) and is valid JSON; the
/// filters and pages select what they say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_stream_as_valid_json_and_filter() {
    let addr = serve(hub_with(1000)).await;
    let (code, body) = get(addr, "/debug/services").await;
    assert_eq!(code, 200);
    let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(v.len(), 1000);
    let first = &v[0];
    assert_eq!(first["servicePort"], "ns/s0:http");
    let eps = first["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    assert_eq!(eps[0]["cluster"], true);
    assert_eq!(eps[1]["terminating"], true);
    assert_eq!(eps[1]["node"], "node-b");
    let (_, body) = get(addr, "/debug/services?service=ns/s7").await;
    let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(v.len(), 1);
    let (_, body) = get(addr, "/debug/services?q=s99&offset=1&limit=5").await;
    let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    // s99, s990..s999 match; skip one, take five.
    assert_eq!(v.len(), 5);
    let (_, body) = get(addr, "/debug/services?service=ns/none").await;
    assert_eq!(body.trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_syncs_and_configz() {
    let addr = serve(hub_with(2)).await;
    let (code, rules) = get(addr, "/debug/rules").await;
    assert_eq!(code, 200);
    assert!(rules.contains("table ip kube-proxy-rs"), "{rules}");
    assert!(rules.contains("172.30.0.1"), "{rules}");
    let (code, syncs) = get(addr, "/debug/syncs").await;
    assert_eq!(code, 200);
    let v: Vec<serde_json::Value> = serde_json::from_str(&syncs).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["full"], true);
    let (code, configz) = get(addr, "/configz").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&configz).unwrap();
    assert_eq!(v["kubeproxy.config.k8s.io"]["mode"], "nftables");
    let (code, _) = get(addr, "/debug/nothing").await;
    assert_eq!(code, 404);
}
