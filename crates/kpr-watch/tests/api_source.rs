//! The API-server source against the test API server (real HTTP, the real kube-rs client):
//! first lists become an `Apply` per object then a `Keep` of their keys, changes
//! `Apply`/`Delete`, other proxies' and headless objects
//! are filtered by the selector, only this node's Node arrives, and a relist after 410 Gone
//! replaces the whole set, so objects deleted while the watch was down disappear.
#![allow(clippy::unwrap_used)]

use kpr_apiserver::{ApiServer, Kind, Options};
use kpr_model::{Input, Update};
use kpr_testkit::{node, service, service_cidr, slice};
use kpr_watch::api::{self, Connect};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What the source reported: requests (method, code) and watch transitions.
#[derive(Debug, Default)]
struct Seen {
    requests: Mutex<Vec<(String, Option<u16>)>>,
    watches: Mutex<Vec<(String, bool)>>,
}

impl api::Observer for Seen {
    fn request(&self, method: &str, _host: &str, code: Option<u16>, _: Duration) {
        self.requests.lock().unwrap().push((method.into(), code));
    }
    fn watch(&self, resource: &str, up: bool) {
        self.watches.lock().unwrap().push((resource.into(), up));
    }
}

async fn client_of(server: &ApiServer) -> (kube::Client, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let client = api::client(
        &Connect {
            master: Some(server.url()),
            ..Connect::default()
        },
        seen.clone(),
    )
    .await
    .unwrap();
    (client, seen)
}

fn json<T: serde::Serialize>(o: &T) -> serde_json::Value {
    serde_json::to_value(o).unwrap()
}

/// A short description of an input: `S=a,b` (Services replaced), `S+a`, `S-a`, `E=..`,
/// `N=node-a` / `N=-`.
fn describe(i: &Input) -> String {
    let names = |v: Vec<Option<String>>| {
        let mut v: Vec<String> = v.into_iter().flatten().collect();
        v.sort();
        v.join(",")
    };
    match i {
        Input::Services(Update::Replace(v)) => {
            format!(
                "S={}",
                names(v.iter().map(|s| s.metadata.name.clone()).collect())
            )
        }
        Input::Services(Update::Keep(k)) => {
            format!(
                "S={}",
                names(k.iter().map(|k| Some(k.name.clone())).collect())
            )
        }
        Input::Slices(Update::Keep(k)) => {
            format!(
                "E={}",
                names(k.iter().map(|k| Some(k.name.clone())).collect())
            )
        }
        Input::Services(Update::Apply(s)) => format!("S+{}", s.metadata.name.clone().unwrap()),
        Input::Services(Update::Delete(k)) => format!("S-{}", k.name),
        Input::Slices(Update::Replace(v)) => {
            format!(
                "E={}",
                names(v.iter().map(|s| s.metadata.name.clone()).collect())
            )
        }
        Input::Slices(Update::Apply(s)) => format!("E+{}", s.metadata.name.clone().unwrap()),
        Input::Slices(Update::Delete(k)) => format!("E-{}", k.name),
        Input::Node(Some(n)) => format!("N={}", n.metadata.name.clone().unwrap()),
        Input::Node(None) => "N=-".into(),
        Input::ServiceCidrs(Update::Replace(v)) => {
            format!(
                "C={}",
                names(v.iter().map(|s| s.metadata.name.clone()).collect())
            )
        }
        Input::ServiceCidrs(Update::Keep(k)) => {
            format!(
                "C={}",
                names(k.iter().map(|k| Some(k.name.clone())).collect())
            )
        }
        Input::ServiceCidrs(Update::Apply(c)) => {
            format!("C+{}", c.metadata.name.clone().unwrap())
        }
        Input::ServiceCidrs(Update::Delete(k)) => format!("C-{}", k.name),
    }
}

/// The next `want.len()` inputs, in any order. ServiceCIDR inputs (`C…`) are skipped unless
/// some are wanted: every test's server serves ServiceCIDRs.
async fn expect(rx: &mut mpsc::Receiver<Input>, want: &[&str]) {
    let cidrs_too = want.iter().any(|w| w.starts_with('C'));
    let mut got = Vec::new();
    while got.len() < want.len() {
        let i = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out: got {got:?}, want {want:?}"))
            .unwrap();
        let d = describe(&i);
        if cidrs_too || !d.starts_with('C') {
            got.push(d);
        }
    }
    got.sort();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_source_follows_the_cluster_through_a_relist() {
    let mut server = ApiServer::start(Options::default()).await.unwrap();
    server.apply(json(
        &service("ns", "a")
            .cluster_ip("172.30.0.1")
            .port("p", 80, "TCP")
            .build(),
    ));
    server.apply(json(
        &service("ns", "theirs")
            .cluster_ip("172.30.0.2")
            .port("p", 80, "TCP")
            .label("service.kubernetes.io/service-proxy-name", "other")
            .build(),
    ));
    server.apply(json(
        &slice("ns", "a", "x")
            .port("p", 8080, "TCP")
            .ready("10.0.0.1", "node-a")
            .build(),
    ));
    server.apply(json(&node("node-a").build()));
    server.apply(json(&node("node-b").build()));

    let (client, _seen) = client_of(&server).await;
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, shutdown) = watch::channel(false);
    let source = tokio::spawn(api::run(client, "node-a".into(), tx, shutdown, _seen));
    // No ServiceCIDR yet: the end of an empty list.
    expect(&mut rx, &["S+a", "S=a", "E+a-x", "E=a-x", "N=node-a", "C="]).await;

    server.apply(json(
        &service("ns", "b")
            .cluster_ip("172.30.0.3")
            .port("p", 80, "TCP")
            .build(),
    ));
    server.delete(Kind::EndpointSlice, "ns", "a-x");
    server.apply(json(&node("node-b").label("x", "y").build()));
    expect(&mut rx, &["S+b", "E-a-x"]).await;

    // Down for a while; b is deleted and c created meanwhile, the history is forgotten: the
    // relist replaces everything, without b.
    server.stop().await;
    server.delete(Kind::Service, "ns", "b");
    server.apply(json(
        &service("ns", "c")
            .cluster_ip("172.30.0.4")
            .port("p", 80, "TCP")
            .build(),
    ));
    server.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await.unwrap();
    expect(&mut rx, &["S+a", "S+c", "S=a,c", "E=", "N=node-a", "C="]).await;

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .unwrap()
        .unwrap();
}

/// §4.8 / issue 15: ServiceCIDRs are read at `networking.k8s.io/v1`, else `v1beta1`; where
/// neither is served the other kinds flow as ever and no ServiceCIDR input is sent (so nothing
/// is dropped). They never hold up the first lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_cidrs_are_watched_at_the_version_the_api_server_serves() {
    for versions in [vec!["v1"], vec!["v1beta1"], vec!["v1beta1", "v1"], vec![]] {
        let server = ApiServer::start(Options {
            service_cidr_versions: versions.iter().map(|v| (*v).to_owned()).collect(),
            ..Options::default()
        })
        .await
        .unwrap();
        server.apply(json(
            &service("ns", "a")
                .cluster_ip("172.30.0.1")
                .port("p", 80, "TCP")
                .build(),
        ));
        server.apply(json(&service_cidr("kubernetes", &["172.30.0.0/16"])));
        let (client, seen) = client_of(&server).await;
        let (tx, mut rx) = mpsc::channel(64);
        let (stop, shutdown) = watch::channel(false);
        let source = tokio::spawn(api::run(
            client,
            "node-a".into(),
            tx,
            shutdown,
            seen.clone(),
        ));
        if versions.is_empty() {
            expect(&mut rx, &["S+a", "S=a", "E=", "N=-"]).await;
            let more = tokio::time::timeout(Duration::from_millis(800), rx.recv()).await;
            assert!(more.is_err(), "{versions:?}: nothing more, got {more:?}");
        } else {
            expect(
                &mut rx,
                &["S+a", "S=a", "E=", "N=-", "C+kubernetes", "C=kubernetes"],
            )
            .await;
            server.apply(json(&service_cidr("extra", &["172.31.0.0/24"])));
            expect(&mut rx, &["C+extra"]).await;
            server.delete(Kind::ServiceCidr, "", "kubernetes");
            expect(&mut rx, &["C-kubernetes"]).await;
            let watched = format!(
                "/apis/networking.k8s.io/{}/servicecidrs",
                versions.last().unwrap()
            );
            let requests = server.requests();
            assert!(
                requests
                    .iter()
                    .any(|r| r.starts_with(&format!("GET {watched}?")) && r.contains("watch=true")),
                "{versions:?}: watched at {watched}: {requests:?}"
            );
        }
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(5), source)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn connect_paths_kubeconfig_master_and_in_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:6443'}}]\nusers: [{name: u, user: {token: abc}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .unwrap();
    let from_file = api::config(&Connect {
        kubeconfig: Some(path.clone()),
        master: None,
    })
    .await
    .unwrap();
    assert_eq!(from_file.cluster_url.to_string(), "http://127.0.0.1:6443/");
    let overridden = api::config(&Connect {
        kubeconfig: Some(path),
        master: Some("http://127.0.0.1:7000".into()),
    })
    .await
    .unwrap();
    assert_eq!(overridden.cluster_url.to_string(), "http://127.0.0.1:7000/");
    assert!(
        api::config(&Connect {
            master: Some("not a url at all".into()),
            ..Connect::default()
        })
        .await
        .is_err()
    );
    // Not in a cluster: a clear error naming the flags (the in-cluster path itself is tested
    // through the binary, which can be given a service-account directory).
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        let err = api::config(&Connect::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kubeconfig"), "{err}");
    }
}

/// Issue 13: objects the full API types cannot decode (a status condition without
/// lastTransitionTime, nulls in every optional field, unknown and newer fields) are listed and
/// watched like any other, and never hide the objects around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_objects_never_fail_a_list_or_a_watch() {
    use kpr_testkit::odd;
    let server = ApiServer::start(Options::default()).await.unwrap();
    server.apply(odd::service("ns", "odd", "172.30.0.9", 80));
    server.apply(json(
        &service("ns", "web")
            .cluster_ip("172.30.0.10")
            .port("p", 80, "TCP")
            .build(),
    ));
    server.apply(odd::slice("ns", "odd", &["10.0.0.1"], "node-a", 8080));
    server.apply(odd::node("node-a", "192.168.0.2"));
    let (client, seen) = client_of(&server).await;
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, shutdown) = watch::channel(false);
    let source = tokio::spawn(api::run(
        client,
        "node-a".into(),
        tx,
        shutdown,
        seen.clone(),
    ));
    expect(
        &mut rx,
        &[
            "S+odd",
            "S+web",
            "S=odd,web",
            "E+odd-odd",
            "E=odd-odd",
            "N=node-a",
        ],
    )
    .await;
    // While watching: another odd object, then the first one's deletion, then a normal one.
    server.apply(odd::service("ns", "odd2", "172.30.0.11", 80));
    server.delete(Kind::Service, "ns", "odd");
    server.apply(json(
        &service("ns", "after")
            .cluster_ip("172.30.0.12")
            .port("p", 80, "TCP")
            .build(),
    ));
    expect(&mut rx, &["S+odd2", "S-odd", "S+after"]).await;
    // The ServiceCIDR watch sends nothing here (there are none), so its coming up is not
    // ordered with the inputs above: wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.watches.lock().unwrap().len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let watches = seen.watches.lock().unwrap().clone();
    assert!(
        watches.iter().all(|(_, up)| *up),
        "no watch failed: {watches:?}"
    );
    assert_eq!(watches.len(), 4, "four watches came up: {watches:?}");
    let requests = seen.requests.lock().unwrap().clone();
    assert!(
        requests.iter().any(|(m, c)| m == "GET" && *c == Some(200)),
        "requests are reported: {requests:?}"
    );
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .unwrap()
        .unwrap();
}

/// Issue 13: an event the client cannot decode (here, in place of a deletion) fails the
/// watch; the source relists, so the deletion it never saw is still applied, and the outage is
/// reported (down, then up again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_event_makes_the_source_relist_and_nothing_is_lost() {
    let server = ApiServer::start(Options::default()).await.unwrap();
    for (name, ip) in [("a", "172.30.0.1"), ("b", "172.30.0.2")] {
        server.apply(json(
            &service("ns", name)
                .cluster_ip(ip)
                .port("p", 80, "TCP")
                .build(),
        ));
    }
    let (client, seen) = client_of(&server).await;
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, shutdown) = watch::channel(false);
    let source = tokio::spawn(api::run(
        client,
        "node-a".into(),
        tx,
        shutdown,
        seen.clone(),
    ));
    expect(&mut rx, &["S+a", "S+b", "S=a,b", "E=", "N=-"]).await;
    assert!(server.delete_garbled(Kind::Service, "ns", "b"));
    // The relist: a again, and the end of the list without b (the model deletes b).
    expect(&mut rx, &["S+a", "S=a"]).await;
    server.apply(json(
        &service("ns", "c")
            .cluster_ip("172.30.0.3")
            .port("p", 80, "TCP")
            .build(),
    ));
    expect(&mut rx, &["S+c"]).await;
    let services: Vec<bool> = seen
        .watches
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| r == "services")
        .map(|(_, up)| *up)
        .collect();
    assert_eq!(services, [true, false, true]);
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .unwrap()
        .unwrap();
}
