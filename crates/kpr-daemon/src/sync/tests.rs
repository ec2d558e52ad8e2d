//! The sync loop's unit tests: syncs, health, metrics, drift, the node.

use super::run::DriftCheck;
use super::*;
use kpr_testkit::NODE;
use tokio::sync::{mpsc, watch};

use super::fixtures::svc;

fn cfg() -> SyncConfig {
    super::fixtures::config(Duration::from_secs(1))
}

/// §2.1 step 11 (T2.1.1, T2.1.2): no sync until both lists arrived, then exactly one.
#[tokio::test(start_paused = true)]
async fn t2_1_1_nothing_syncs_before_every_first_list() {
    let (tx, rx) = mpsc::channel(16);
    let (_stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(SyncState::new(cfg()), rx, shutdown, rtx));
    tx.send(Input::Services(Update::Replace(vec![svc(1)])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(reports.try_recv().is_err(), "T2.1.1: slices not listed yet");
    tx.send(Input::Slices(Update::Replace(vec![])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let first = reports.try_recv().unwrap();
    assert!(first.plan.full);
    assert_eq!(first.ports, [(IpFamily::V4, 1), (IpFamily::V6, 0)]);
    assert!(reports.try_recv().is_err(), "T2.1.2: exactly one sync");
    drop(tx);
    task.await.unwrap();
}

/// §11 / T11.1: a burst is coalesced, syncs stay min_sync_period apart.
#[tokio::test(start_paused = true)]
async fn t11_1_a_burst_of_1000_changes_is_coalesced() {
    let (tx, rx) = mpsc::channel(2048);
    let (_stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(SyncState::new(cfg()), rx, shutdown, rtx));
    tx.send(Input::Services(Update::Replace(vec![])))
        .await
        .unwrap();
    tx.send(Input::Slices(Update::Replace(vec![])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _initial = reports.try_recv().unwrap();
    for i in 0..1000 {
        tx.send(Input::Services(Update::Apply(svc(i))))
            .await
            .unwrap();
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut syncs = Vec::new();
    while let Ok(r) = reports.try_recv() {
        syncs.push(r);
    }
    assert!(
        (1..=3).contains(&syncs.len()),
        "{} syncs for 1000 changes",
        syncs.len()
    );
    let changed: usize = syncs.iter().map(|r| r.plan.changed_services.len()).sum();
    assert_eq!(changed, 1000);
    drop(tx);
    let state = task.await.unwrap();
    assert_eq!(state.desired().families[&IpFamily::V4].ports.len(), 1000);
}

/// Issue 4: 1,000 Service changes written to the (test) API server in a burst reach the
/// sync loop through real HTTP watches and are coalesced into a few syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_the_api_server_is_coalesced() {
    let server = kpr_apiserver::ApiServer::start(kpr_apiserver::Options::default())
        .await
        .unwrap();
    let json = |v: &kpr_model::Node| serde_json::to_value(v).unwrap();
    server.apply(json(
        &kpr_testkit::node(NODE)
            .address("InternalIP", "192.168.0.2")
            .build(),
    ));
    let client = kpr_watch::api::client(
        &kpr_watch::api::Connect {
            master: Some(server.url()),
            ..Default::default()
        },
        std::sync::Arc::new(kpr_watch::api::NoObserver),
    )
    .await
    .unwrap();
    let (tx, rx) = mpsc::channel(1024);
    let (_stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let source = tokio::spawn(kpr_watch::api::run(
        client,
        NODE.into(),
        tx,
        shutdown.clone(),
        std::sync::Arc::new(kpr_watch::api::NoObserver),
    ));
    let cfg = SyncConfig {
        wait_for_node: true,
        ..cfg()
    };
    let task = tokio::spawn(run(SyncState::new(cfg), rx, shutdown, rtx));
    let first = tokio::time::timeout(Duration::from_secs(10), reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.plan.full, "the first sync follows the first lists");
    for i in 0..1000 {
        server.apply(serde_json::to_value(svc(i)).unwrap());
    }
    let mut syncs = 0;
    let mut changed = 0;
    while changed < 1000 {
        let r = tokio::time::timeout(Duration::from_secs(20), reports.recv())
            .await
            .unwrap()
            .unwrap();
        syncs += 1;
        changed += r.plan.changed_services.len();
    }
    assert!(syncs <= 10, "{syncs} syncs for 1000 changes");
    source.abort();
    task.abort();
}

/// Issue 13 / §7.1: a source that cannot list (here the EndpointSlices never arrive) while
/// the Services did leaves their change queued and never synced, so the proxy turns
/// unhealthy after 2 x syncPeriod, upstream's rule for a proxy that cannot sync; a proxy
/// that has received nothing at all (the API server down at start) has nothing queued and
/// stays healthy, as upstream's does, so a liveness probe does not restart-loop it.
#[test]
fn a_source_that_cannot_list_turns_health_503_after_twice_the_sync_period() {
    let now = std::time::SystemTime::now();
    let timeout = 2 * cfg().sync_period;
    let health = kpr_ops::server::Health::new(kpr_ops::health::HealthModel::new(
        &["IPv4", "IPv6"],
        now,
        timeout,
    ));
    let mut state = SyncState::new(cfg()).with_health(health.clone());
    let later = now + timeout + Duration::from_secs(1);
    assert!(health.healthy(later), "nothing received, nothing queued");
    state.record(Input::Services(Update::Replace(vec![svc(1)])));
    assert!(!state.ready(), "the slices have not been listed");
    assert!(health.healthy(now + timeout / 2));
    assert!(!health.healthy(later), "queued longer than 2 x syncPeriod");
}

/// §2.3: the node's IPs change (or its Node is deleted): the loop stops and says why.
#[tokio::test(start_paused = true)]
async fn a_node_ip_change_ends_the_loop_with_a_reason() {
    let (tx, rx) = mpsc::channel(16);
    let (_stop, shutdown) = watch::channel(false);
    let (rtx, _reports) = mpsc::unbounded_channel();
    let cfg = SyncConfig {
        wait_for_node: true,
        ..cfg()
    };
    let task = tokio::spawn(run(SyncState::new(cfg), rx, shutdown, rtx));
    let node = |ip: &str| {
        Input::Node(Some(Box::new(
            kpr_testkit::node(NODE).address("InternalIP", ip).build(),
        )))
    };
    tx.send(node("192.168.0.2")).await.unwrap();
    tx.send(node("192.168.0.2")).await.unwrap();
    tx.send(node("192.168.0.9")).await.unwrap();
    let state = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        state.exit_reason().unwrap().contains("IPs"),
        "{:?}",
        state.exit_reason()
    );
}

/// The drift check's results: a difference is logged, counted and resynced once; found
/// again right after that resync it is not resynced again; a stale result says nothing.
#[test]
fn drift_is_counted_and_resynced_once_per_set_of_differences() {
    use crate::debug::verify::{Difference, Drift};
    let metrics = std::sync::Arc::new(kpr_ops::metrics::Metrics::new().unwrap());
    let mut state = SyncState::new(cfg()).with_metrics(metrics.clone());
    let diff: Difference = serde_json::from_value(serde_json::json!({
        "family": "IPv4", "object": "map service-ips", "kind": "missing",
        "detail": "missing element `172.30.0.10 . tcp . 80`"
    }))
    .unwrap();
    let found = || Drift::Found(vec![diff.clone()]);
    let counted = || metrics.rules_drift.with_label_values(&["IPv4"]).get();
    let mut check = DriftCheck::default();
    assert!(!state.drift_found(false, found(), &mut check), "stale");
    assert_eq!(counted(), 0);
    assert!(state.drift_found(true, found(), &mut check));
    assert_eq!(counted(), 1);
    assert!(
        state.trackers.has_pending() || state.force,
        "a full resync is due"
    );
    assert!(!state.drift_found(true, found(), &mut check), "persisting");
    assert_eq!(counted(), 1);
    assert!(!state.drift_found(true, Drift::None, &mut check));
    assert!(
        state.drift_found(true, found(), &mut check),
        "drifted again"
    );
    assert_eq!(counted(), 2);
    assert!(!state.drift_found(true, Drift::Failed("x".into()), &mut check));
    assert!(!check.off);
    assert!(!state.drift_found(true, Drift::Unavailable("no nft".into()), &mut check));
    assert!(check.off);
}

/// Issue 16: a periodic sync that finds nothing to do does not start the `minSyncPeriod`
/// window, so a change right after it is synced at once (it waited up to a second behind it);
/// a sync that wrote something still keeps the next one `minSyncPeriod` away.
#[tokio::test(start_paused = true)]
async fn a_periodic_sync_that_changes_nothing_never_delays_the_next_change() {
    let fake = std::sync::Arc::new(std::sync::Mutex::new(kpr_nft::Fake::default()));
    let plane = Dataplane::new(
        Box::new(fake.clone()),
        14,
        kpr_config::NodePortAddresses::Default,
    );
    let state = SyncState::new(cfg()).with_dataplane(plane);
    let (tx, rx) = mpsc::channel(16);
    let (_stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(state, rx, shutdown, rtx));
    tx.send(Input::Services(Update::Replace(vec![svc(1)])))
        .await
        .unwrap();
    tx.send(Input::Slices(Update::Replace(vec![])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(reports.try_recv().unwrap().plan.full, "the first sync");
    // The periodic sync at 30 s writes nothing.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let periodic = reports.try_recv().unwrap();
    assert!(periodic.plan.is_empty(), "{:?}", periodic.plan);
    // A change 10 ms later is synced at once, not a second after the periodic sync.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let at = tokio::time::Instant::now();
    tx.send(Input::Services(Update::Apply(svc(2))))
        .await
        .unwrap();
    let changed = reports.recv().await.unwrap();
    assert!(changed.plan.changed_services.len() == 1);
    assert!(
        at.elapsed() < Duration::from_millis(5),
        "{:?}",
        at.elapsed()
    );
    // That one wrote: the next change waits out minSyncPeriod after it.
    let at = tokio::time::Instant::now();
    tx.send(Input::Services(Update::Apply(svc(3))))
        .await
        .unwrap();
    reports.recv().await.unwrap();
    assert!(
        at.elapsed() >= Duration::from_millis(990),
        "{:?}",
        at.elapsed()
    );
    drop(tx);
    task.await.unwrap();
}
