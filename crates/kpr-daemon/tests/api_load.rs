//! The sync loop fed by the real API source under absurd load (issue 15): a cluster of
//! 1,000-endpoint slices, and a flood of changes faster than syncs. No kernel: the loop
//! computes the desired state; time and memory are printed, correctness is asserted.
//!
//! The cluster's size is `KPR_ABSURD_SLICES` (default 300, which a debug build lists and
//! syncs in seconds); the full size of the issue is
//! `KPR_ABSURD_SLICES=10000 cargo test --release -p kpr-daemon --test api_load -- --nocapture`.
#![allow(clippy::unwrap_used)]

use kpr_apiserver::{ApiServer, Kind, Options};
use kpr_daemon::sync::{SyncConfig, SyncReport, SyncState, run};
use kpr_model::node::DetectLocalMode;
use kpr_model::{Input, IpFamily, Update};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Both tests measure this process's memory: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ENDPOINTS: usize = 1_000;

fn cfg(min_sync_period: Duration, sync_period: Duration) -> SyncConfig {
    SyncConfig {
        node_name: kpr_testkit::NODE.into(),
        masquerade_all: false,
        detect_local: DetectLocalMode::ClusterCidr(vec![]),
        bind_address: None,
        min_sync_period,
        sync_period,
        wait_for_node: true,
    }
}

/// (resident, peak resident) of this process, in MiB.
fn rss_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_default()
            >> 10
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak resident set size to the current one (Linux 4.0+), so a peak is this
/// phase's.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": kpr_testkit::NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": kpr_testkit::NODE_IP}]}})
}

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "ns"},
        "spec": {"clusterIP": format!("172.30.{}.{}", i / 250, i % 250 + 1),
                 "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}})
}

/// A slice of `svc-{i}` with these endpoints (a JSON array).
fn slice(i: usize, endpoints: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// `n` ready endpoints from `10.{first}.x.y`, half on this node.
fn endpoints(first: usize, n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|j| {
                json!({"addresses": [format!("10.{first}.{}.{}", j / 250, j % 250 + 1)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": if j % 2 == 0 { kpr_testkit::NODE } else { kpr_testkit::OTHER_NODE }})
            })
            .collect(),
    )
}

/// The endpoint IPs a slice holds, sorted.
fn slice_ips(slice: &Value) -> Vec<String> {
    let mut ips: Vec<String> = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["addresses"][0].as_str().map(str::to_owned))
        .collect();
    ips.sort();
    ips
}

/// The endpoint IPs of each IPv4 service port (`ns/svc-i`), sorted.
fn desired_ips(state: &SyncState) -> BTreeMap<String, Vec<String>> {
    state.desired().families[&IpFamily::V4]
        .ports
        .iter()
        .map(|(name, port)| {
            let mut ips: Vec<String> = port
                .endpoints
                .iter()
                .map(|e| e.addr.ip().to_string())
                .collect();
            ips.sort();
            (name.service.to_string(), ips)
        })
        .collect()
}

/// The API source following the test API server, into `tx`.
async fn spawn_source(
    server: &ApiServer,
    tx: mpsc::Sender<Input>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let client = kpr_watch::api::client(
        &kpr_watch::api::Connect {
            master: Some(server.url()),
            ..Default::default()
        },
        Arc::new(kpr_watch::api::NoObserver),
    )
    .await
    .unwrap();
    tokio::spawn(kpr_watch::api::run(
        client,
        kpr_testkit::NODE.into(),
        tx,
        shutdown,
        Arc::new(kpr_watch::api::NoObserver),
    ))
}

async fn next_report(
    reports: &mut mpsc::UnboundedReceiver<SyncReport>,
    limit: Duration,
) -> SyncReport {
    tokio::time::timeout(limit, reports.recv())
        .await
        .expect("a sync in time")
        .expect("the loop runs")
}

/// Issue 15 (b): `KPR_ABSURD_SLICES` Services, each with a slice of 1,000 endpoints, listed
/// through the real source (pages of 500) and synced by the loop: the first sync has every
/// endpoint, one change after it is a small partial sync. Prints the time of each phase, and
/// the memory of the server's JSON and of the proxy's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_1000_endpoint_slices_is_listed_and_synced() {
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("KPR_ABSURD_SLICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let (rss0, _) = rss_mib();
    let server = ApiServer::start(Options::default()).await.unwrap();
    let start = Instant::now();
    server.apply(node());
    let eps = endpoints(1, ENDPOINTS);
    for i in 0..n {
        server.apply(service(i));
        server.apply(slice(i, eps.clone()));
    }
    drop(eps);
    let served = start.elapsed();
    let (rss_server, _) = rss_mib();

    reset_peak();
    let (tx, rx) = mpsc::channel(1024);
    let (stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let start = Instant::now();
    let source = spawn_source(&server, tx, shutdown.clone()).await;
    let state = SyncState::new(cfg(Duration::from_millis(100), Duration::from_secs(30)));
    let looper = tokio::spawn(run(state, rx, shutdown, rtx));
    let first = next_report(&mut reports, Duration::from_secs(1200)).await;
    let first_sync = start.elapsed();
    let (rss_synced, peak_first) = rss_mib();
    assert!(first.plan.full);
    assert_eq!(first.ports, [(IpFamily::V4, n), (IpFamily::V6, 0)]);

    // One slice changes: one port resynced.
    let start = Instant::now();
    server.apply(slice(0, endpoints(2, ENDPOINTS)));
    let change = next_report(&mut reports, Duration::from_secs(120)).await;
    let one_change = start.elapsed();
    assert!(!change.plan.full);
    assert_eq!(change.plan.changed_services.len(), 1);

    let _ = stop.send(true);
    let state = looper.await.unwrap();
    let _ = source.await;
    let (_, peak) = rss_mib();
    let ips = desired_ips(&state);
    assert_eq!(ips.len(), n);
    assert!(ips.values().all(|v| v.len() == ENDPOINTS));
    assert_eq!(
        ips["ns/svc-0"],
        slice_ips(&slice(0, endpoints(2, ENDPOINTS)))
    );
    assert_eq!(
        ips["ns/svc-1"],
        slice_ips(&slice(1, endpoints(1, ENDPOINTS)))
    );
    let total = n * ENDPOINTS;
    let per_endpoint = |mib: u64| (mib << 20) / total.max(1) as u64;
    eprintln!(
        "absurd cluster: {n} slices x {ENDPOINTS} endpoints = {total} endpoints (RSS {rss0} MiB at start)\n\
         \x20 server: written in {served:.1?}; RSS +{} MiB (its JSON)\n\
         \x20 proxy: listed and first sync {first_sync:.1?} after start ({:.2} us/endpoint); \
         RSS +{} MiB after it ({} B/endpoint), peak +{} MiB while listing ({} B/endpoint)\n\
         \x20 one slice changed: synced {one_change:.1?} after the write; peak RSS of the run {peak} MiB",
        rss_server.saturating_sub(rss0),
        first_sync.as_secs_f64() * 1e6 / total as f64,
        rss_synced.saturating_sub(rss_server),
        per_endpoint(rss_synced.saturating_sub(rss_server)),
        peak_first.saturating_sub(rss_server),
        per_endpoint(peak_first.saturating_sub(rss_server)),
    );
}

/// Issue 15 (c): a flood of EndpointSlice changes, as fast as one thread can write them, for
/// a few seconds. The loop keeps syncing (at most every min-sync-period, each sync folding
/// thousands of events), stays healthy throughout, its input channel is bounded (the API
/// source waits, TCP pushes back, and the API server ends a watch that falls too far behind:
/// the source resumes it), and once the flood stops its state is each slice's last version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_changes_is_coalesced_and_ends_in_the_last_state() {
    let _serial = SERIAL.lock().await;
    const SERVICES: usize = 20;
    const VERSIONS: usize = 5;
    let min_sync = Duration::from_millis(500);
    let sync_period = Duration::from_secs(2);
    let server = ApiServer::start(Options {
        history: 20_000,
        ..Options::default()
    })
    .await
    .unwrap();
    server.apply(node());
    for i in 0..SERVICES {
        server.apply(service(i));
        server.apply(slice(i, endpoints(1, 4)));
    }
    // Each slice in VERSIONS versions (1 to 5 endpoints of different ranges), interleaved.
    let mut flood = Vec::new();
    for v in 0..VERSIONS {
        for i in 0..SERVICES {
            flood.push(slice(i, endpoints(10 + v, 1 + (i + v) % 5)));
        }
    }

    let (source_tx, mut source_rx) = mpsc::channel::<Input>(1024);
    let (tx, rx) = mpsc::channel::<Input>(1024);
    let (stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let source = spawn_source(&server, source_tx, shutdown.clone()).await;
    // Between the source and the loop: counts slice changes, keeps each slice's last
    // resourceVersion, and the most the loop's channel ever held.
    let seen = Arc::new(std::sync::Mutex::new((
        0u64,
        BTreeMap::<String, String>::new(),
        0usize,
    )));
    let tap = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(input) = source_rx.recv().await {
                if let Input::Slices(Update::Apply(s)) = &input {
                    let mut seen = seen.lock().unwrap();
                    seen.0 += 1;
                    let name = s.metadata.name.clone().unwrap_or_default();
                    let rv = s.metadata.resource_version.clone().unwrap_or_default();
                    seen.1.insert(name, rv);
                }
                if tx.send(input).await.is_err() {
                    return;
                }
                let queued = tx.max_capacity() - tx.capacity();
                let mut seen = seen.lock().unwrap();
                seen.2 = seen.2.max(queued);
            }
        })
    };
    let health = kpr_ops::server::Health::new(kpr_ops::health::HealthModel::new(
        &["IPv4", "IPv6"],
        std::time::SystemTime::now(),
        2 * sync_period,
    ));
    let state = SyncState::new(cfg(min_sync, sync_period)).with_health(health.clone());
    let looper = tokio::spawn(run(state, rx, shutdown, rtx));
    next_report(&mut reports, Duration::from_secs(20)).await;
    let delivered_before = seen.lock().unwrap().0;

    reset_peak();
    let (rss_before, _) = rss_mib();
    let flooding = server.flood(flood);
    let start = Instant::now();
    let mut syncs = 0;
    let mut changed = 0;
    let mut unhealthy = 0;
    while start.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !health.healthy(std::time::SystemTime::now()) {
            unhealthy += 1;
        }
        while let Ok(r) = reports.try_recv() {
            syncs += 1;
            changed += r.plan.changed_services.len();
        }
    }
    let written = flooding.stop();
    let flood_time = start.elapsed();
    let (_, peak) = rss_mib();
    let delivered_during = seen.lock().unwrap().0 - delivered_before;

    // The final objects, by slice name: caught up when the source has seen each one's
    // resourceVersion.
    let last: BTreeMap<String, Value> = server
        .objects(Kind::EndpointSlice)
        .into_iter()
        .map(|o| (o["metadata"]["name"].as_str().unwrap().to_owned(), o))
        .collect();
    let caught_up = || {
        let seen = seen.lock().unwrap();
        last.iter().all(|(name, o)| {
            seen.1.get(name).map(String::as_str) == o["metadata"]["resourceVersion"].as_str()
        })
    };
    let start = Instant::now();
    while !caught_up() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the source never caught up with the flood"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let catch_up = start.elapsed();
    // Then one more sync at most min-sync-period later.
    tokio::time::sleep(3 * min_sync).await;
    let _ = stop.send(true);
    let state = looper.await.unwrap();
    let _ = source.await;
    let _ = tap.await;
    let max_queued = seen.lock().unwrap().2;
    eprintln!(
        "flood: {written} changes written in {flood_time:.1?}, {delivered_during} reached the loop; \
         {syncs} syncs meanwhile ({changed} service changes in them); the loop's channel held at most {max_queued}; \
         caught up {catch_up:.1?} after the flood; RSS {rss_before} MiB before, peak {peak} MiB during"
    );
    assert!(!state.pending(), "the last changes were synced");
    let want: BTreeMap<String, Vec<String>> = last
        .values()
        .map(|o| {
            let svc = o["metadata"]["labels"]["kubernetes.io/service-name"]
                .as_str()
                .unwrap();
            (format!("ns/{svc}"), slice_ips(o))
        })
        .collect();
    assert_eq!(
        desired_ips(&state),
        want,
        "the state is the last version of each slice"
    );
    assert!(written > 1_000, "a flood: {written} changes");
    assert!(
        syncs >= 3,
        "the loop kept syncing during the flood: {syncs} syncs"
    );
    assert!(
        delivered_during > 5 * syncs,
        "syncs coalesce events: {delivered_during} events, {syncs} syncs"
    );
    assert_eq!(unhealthy, 0, "healthy throughout the flood");
    assert!(max_queued <= 1024);
}
