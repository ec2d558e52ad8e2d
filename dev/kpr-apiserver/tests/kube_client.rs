//! The real kube-rs client against the test API server: lists, watches, selectors as upstream
//! kube-proxy sets them, bookmarks asked for, a relist after 410 Gone, and recovery after the
//! server goes away and comes back. Loopback only.
#![allow(clippy::unwrap_used)]

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use kpr_apiserver::{ApiServer, Kind, Options};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::{Value, json};
use std::time::Duration;

/// Upstream's selector for Services and EndpointSlices (behaviour reference §2.1).
const SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

fn svc(name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    })
}

fn client(server: &ApiServer) -> Client {
    Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap()
}

/// Names in an event, `+name` for applied, `-name` for deleted, `init`/`done` for a relist.
fn describe(e: &Event<Service>) -> String {
    let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
    match e {
        Event::Init => "init".into(),
        Event::InitApply(s) => format!("~{}", name(s)),
        Event::InitDone => "done".into(),
        Event::Apply(s) => format!("+{}", name(s)),
        Event::Delete(s) => format!("-{}", name(s)),
    }
}

async fn next_events(
    stream: &mut (impl futures_util::Stream<Item = Result<Event<Service>, watcher::Error>> + Unpin),
    n: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("an event within 20 s")
            .expect("the stream goes on");
        if let Ok(e) = got {
            out.push(describe(&e));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_watches_relists_and_recovers() {
    let mut server = ApiServer::start(Options::default()).await.unwrap();
    server.apply(svc("a", "172.30.0.1", json!({})));
    server.apply(svc(
        "other",
        "172.30.0.2",
        json!({"service.kubernetes.io/service-proxy-name": "x"}),
    ));
    let api: Api<Service> = Api::all(client(&server));
    let cfg = watcher::Config::default().labels(SELECTOR);
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    assert_eq!(next_events(&mut events, 3).await, ["init", "~a", "done"]);

    server.apply(svc("b", "172.30.0.3", json!({})));
    assert_eq!(next_events(&mut events, 1).await, ["+b"]);
    server.apply(svc(
        "c",
        "172.30.0.4",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    server.delete(Kind::Service, "ns", "a");
    assert_eq!(
        next_events(&mut events, 1).await,
        ["-a"],
        "the headless one is filtered out"
    );
    let watches: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("watch=true"))
        .collect();
    assert!(
        watches
            .iter()
            .all(|r| r.contains("allowWatchBookmarks=true") && r.contains("labelSelector=")),
        "{watches:?}"
    );

    // Cut: the watcher resumes from its resourceVersion and misses nothing.
    server.drop_watches();
    server.apply(svc("b2", "172.30.0.7", json!({})));
    assert_eq!(until(&mut events, "+b2").await.last().unwrap(), "+b2");

    // Away for a while; meanwhile b is deleted and d created, and the history is forgotten.
    // Back on the same port, the watcher's resourceVersion is gone (410): it lists again, and
    // b is absent from the new list (the caller diffs Init..InitDone against what it had).
    server.stop().await;
    server.delete(Kind::Service, "ns", "b");
    server.apply(svc("d", "172.30.0.5", json!({})));
    server.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await.unwrap();
    let relist = until(&mut events, "done").await;
    let from_init: Vec<&String> = relist.iter().skip_while(|e| e.as_str() != "init").collect();
    assert_eq!(from_init, ["init", "~b2", "~d", "done"], "{relist:?}");
    assert!(
        server
            .requests()
            .iter()
            .filter(|r| !r.contains("watch=true"))
            .count()
            >= 2,
        "listed again"
    );
}

/// Events until (and including) `last`.
async fn until(
    stream: &mut (impl futures_util::Stream<Item = Result<Event<Service>, watcher::Error>> + Unpin),
    last: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some(last) {
        seen.extend(next_events(stream, 1).await);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_selector_picks_this_node_and_a_token_is_required_when_set() {
    let server = ApiServer::start(Options {
        token: Some("s3cret".into()),
        ..Options::default()
    })
    .await
    .unwrap();
    for n in ["node-a", "node-b"] {
        server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}));
    }
    let mut cfg = kube::Config::new(server.url().parse().unwrap());
    let denied: Api<Node> = Api::all(Client::try_from(cfg.clone()).unwrap());
    assert!(
        denied.list(&Default::default()).await.is_err(),
        "no token, no list"
    );
    cfg.auth_info.token = Some("s3cret".to_owned().into());
    let api: Api<Node> = Api::all(Client::try_from(cfg).unwrap());
    let lp = kube::api::ListParams::default().fields("metadata.name=node-b");
    let nodes = api.list(&lp).await.unwrap();
    let names: Vec<_> = nodes
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names, ["node-b"]);
}

/// HTTPS with the server's own CA and a bearer token, through a kubeconfig file, as a node's
/// kube-proxy reaches a real API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_kubeconfig_ca_and_token() {
    let server = ApiServer::start(Options {
        tls: true,
        token: Some("t0ken".into()),
        ..Options::default()
    })
    .await
    .unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    server.apply(svc("a", "172.30.0.1", json!({})));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, server.ca_pem().unwrap()).unwrap();
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}', certificate-authority: '{}'}}}}]\nusers: [{{name: u, user: {{token: t0ken}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
        server.url(),
        ca.display()
    );
    let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let api: Api<Service> = Api::all(Client::try_from(cfg).unwrap());
    let names: Vec<_> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(names, ["a"]);
}

/// `timeoutSeconds` ends a watch, and a watch sends the events after its resourceVersion,
/// read as raw HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_replays_history_and_ends_at_its_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = ApiServer::start(Options::default()).await.unwrap();
    let first = server.apply(svc("a", "172.30.0.1", json!({})));
    server.apply(svc("b", "172.30.0.2", json!({})));
    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /api/v1/services?watch=true&resourceVersion={first}&timeoutSeconds=1 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let start = std::time::Instant::now();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut body))
        .await
        .expect("the watch ends by itself")
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert!(
        body.contains(r#""type":"ADDED""#) && body.contains(r#""name":"b""#),
        "{body}"
    );
    assert!(
        !body.contains(r#""name":"a""#),
        "history starts after the resourceVersion: {body}"
    );
}

/// Lists in pages, as kube-rs asks (`limit`, `continue`): every page carries the first
/// page's resourceVersion, the pages together hold every object once, and a continue token
/// from before a compaction gets 410 Gone, as the API server's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_in_pages() {
    let server = ApiServer::start(Options::default()).await.unwrap();
    for i in 0..5 {
        server.apply(svc(
            &format!("s{i}"),
            &format!("172.30.0.{}", i + 1),
            json!({}),
        ));
    }
    let api: Api<Service> = Api::all(client(&server));
    let mut lp = kube::api::ListParams::default().limit(2);
    let mut names = Vec::new();
    let mut versions = Vec::new();
    let mut tokens = Vec::new();
    loop {
        let page = api.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().filter_map(|s| s.metadata.name.clone()));
        versions.push(page.metadata.resource_version.clone());
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => {
                tokens.push(c.clone());
                lp = lp.continue_token(&c);
            }
            None => break,
        }
        // A change between pages does not move the list's resourceVersion.
        server.apply(svc("later", "172.30.0.9", json!({})));
    }
    // `later` sorts before the page it was created during: this list does not see it.
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
    assert_eq!(versions.len(), 3);
    assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
    server.compact();
    let expired = kube::api::ListParams::default()
        .limit(2)
        .continue_token(&tokens[0]);
    match api.list(&expired).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 410, "{s:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}
