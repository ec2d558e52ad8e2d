//! Tests of the sync loop when the kernel refuses a transaction, on the strict fake behind the fault-injecting executor.
//!
//! A refused transaction is retried as a full sync after a delay doubling from 1 s to
//! syncPeriod; each refused transaction is counted once in the mode's failure metric; the
//! proxy turns unhealthy only once a change has waited 2 x syncPeriod, and healthy again with
//! the first success; the kernel (the fake) holds exactly what was last committed after every
//! refusal; and what it holds after the recovery equals a fresh full render. Time is tokio's
//! paused clock; the health model is asked at the matching wall-clock times.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::dataplane::{COLD_START_MAX_OPS, Dataplane, FailureKind};
use kpr_nft::{Errno, Fake, Faults, Faulty, Op};
use kpr_ops::health::{HealthModel, Probe};
use kpr_ops::metrics::Metrics;
use kpr_ops::server::Health;
use kpr_testkit::{NODE, slice};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::{mpsc, watch};

const SYNC_PERIOD: Duration = Duration::from_secs(30);

use super::fixtures::svc;

fn cfg() -> SyncConfig {
    SyncConfig {
        sync_period: SYNC_PERIOD,
        ..super::fixtures::config(Duration::from_secs(1))
    }
}

fn endpoints(i: u32) -> kpr_model::EndpointSlice {
    slice("ns", &format!("s{i}"), "a")
        .port("p", 8080, "TCP")
        .ready(&format!("10.0.{}.{}", i / 250, i % 250 + 1), NODE)
        .ready(&format!("10.1.{}.{}", i / 250, i % 250 + 1), "node-b")
        .build()
}

/// A sync state whose data plane applies to a shared fake through a faulty executor.
struct World {
    state: SyncState,
    fake: Arc<Mutex<Fake>>,
    faults: Faults,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

fn world(cold_max_ops: usize) -> World {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let exec = Faulty::new(fake.clone());
    let faults = exec.faults();
    let metrics = Arc::new(Metrics::new().unwrap());
    let health = Health::new(HealthModel::new(
        &["IPv4", "IPv6"],
        SystemTime::now(),
        2 * SYNC_PERIOD,
    ));
    let plane = Dataplane::new(Box::new(exec), 14, kpr_config::NodePortAddresses::Default)
        .with_cold_start_max_ops(cold_max_ops);
    let state = SyncState::new(cfg())
        .with_dataplane(plane)
        .with_metrics(metrics.clone())
        .with_health(health.clone());
    World {
        state,
        fake,
        faults,
        metrics,
        health,
    }
}

fn dump(fake: &Arc<Mutex<Fake>>) -> String {
    fake.lock().unwrap().dump()
}

/// What a fresh full render of `state`'s desired state puts in an empty kernel.
fn fresh(state: &SyncState) -> String {
    kpr_nft::normalize(&crate::dataplane::ruleset_text(
        state.desired(),
        14,
        &kpr_config::NodePortAddresses::Default,
        &state.node_context(),
    ))
}

/// Refused transactions counted, over both families, in the nftables failure counter.
fn counted(m: &Metrics) -> usize {
    ["IPv4", "IPv6"]
        .iter()
        .map(|f| m.nftables_sync_failures.with_label_values(&[f]).get() as usize)
        .sum()
}

/// The `/healthz` status code at `now`.
fn healthz(h: &Health, now: SystemTime) -> u16 {
    let mut code = 0;
    h.update(|m| {
        code = m
            .response(
                Probe::Healthz {
                    node_eligible: true,
                },
                now,
            )
            .0
    });
    code
}

/// Service `i` with a NodePort: chains and rules of its own, where a plain ClusterIP Service
/// is map elements only.
fn node_port_svc(i: u32) -> kpr_model::Service {
    kpr_testkit::service("ns", &format!("s{i}"))
        .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
        .node_port("p", 80, "TCP", 30_000 + i as i32)
        .build()
}

/// One scenario: a change the kernel refuses (`refuse` sets the fault) is retried with a
/// growing delay, each refusal counted once, the kernel left as it was, `/healthz` 503 only
/// after 2 x syncPeriod; the fault is lifted after 90 s and the next retry recovers.
async fn refused_then_recovered(errno: Errno, refuse: impl FnOnce(&Faults)) {
    let World {
        state,
        fake,
        faults,
        metrics,
        health,
    } = world(COLD_START_MAX_OPS);
    let (tx, rx) = mpsc::channel(16);
    let (_stop, shutdown) = watch::channel(false);
    let (rtx, mut reports) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(state, rx, shutdown, rtx));
    tx.send(Input::Services(Update::Replace(vec![svc(1)])))
        .await
        .unwrap();
    tx.send(Input::Slices(Update::Replace(vec![endpoints(1)])))
        .await
        .unwrap();
    let first = reports.recv().await.unwrap();
    assert!(matches!(first.applied, Some(Ok(_))), "{:?}", first.applied);
    let before = dump(&fake);
    assert!(before.contains("172.30.0.2") || before.contains("172.30.0.1"));

    refuse(&faults);
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    tx.send(Input::Services(Update::Apply(node_port_svc(2))))
        .await
        .unwrap();
    tx.send(Input::Slices(Update::Apply(endpoints(2))))
        .await
        .unwrap();
    let mut attempts = Vec::new();
    let recovered = loop {
        let r = reports.recv().await.unwrap();
        let since = t0.elapsed();
        let Some(Err(e)) = &r.applied else {
            break r;
        };
        let words = kpr_nft::refusal::explain(errno.raw_os_error());
        for f in &e.failed {
            assert_eq!(f.kind, FailureKind::Refused);
            assert!(
                f.message.contains("the kernel refused `") && f.message.contains(words),
                "the refused operation and why, in words: {f}"
            );
        }
        assert_eq!(
            e.failed[0].full,
            !attempts.is_empty(),
            "the change is tried as a partial sync, the retries as full ones"
        );
        assert_eq!(dump(&fake), before, "a refusal left the kernel as it was");
        assert_eq!(
            counted(&metrics),
            faults.refused(),
            "each refused transaction counted once"
        );
        let expected = if since <= 2 * SYNC_PERIOD { 200 } else { 503 };
        assert_eq!(
            healthz(&health, wall0 + since),
            expected,
            "/healthz {since:?} after the change"
        );
        attempts.push(since);
        if since > Duration::from_secs(90) {
            faults.clear();
        }
    };
    let gaps: Vec<u64> = attempts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs())
        .collect();
    assert_eq!(
        gaps,
        [1, 2, 4, 8, 16, 30, 30],
        "the retry delay doubles from 1 s to syncPeriod: attempts at {attempts:?}"
    );
    assert!(recovered.plan.full, "the recovery is a full sync");
    let since = t0.elapsed();
    assert_eq!(since.as_secs(), 122);
    assert_eq!(healthz(&health, wall0 + since), 200, "healthy again");
    assert!(faults.refused() >= attempts.len());
    assert_eq!(counted(&metrics), faults.refused());
    for f in ["IPv4", "IPv6"] {
        assert_eq!(
            metrics
                .iptables_restore_failures
                .with_label_values(&[f])
                .get(),
            0
        );
    }
    drop(tx);
    let state = task.await.unwrap();
    assert_eq!(
        dump(&fake),
        fresh(&state),
        "recovered to a fresh full render"
    );
    assert!(dump(&fake).contains("172.30.0.3"), "the change is in");
}

/// EBUSY on the whole transaction (as when something still uses an object we delete).
#[tokio::test(start_paused = true)]
async fn ebusy_is_retried_with_backoff_counted_and_recovers() {
    refused_then_recovered(Errno::BUSY, |f| f.refuse_all(Errno::BUSY)).await;
}

/// ENOENT naming a chain (as when an object it refers to was deleted by someone else).
#[tokio::test(start_paused = true)]
async fn enoent_is_retried_with_backoff_counted_and_recovers() {
    refused_then_recovered(Errno::NOENT, |f| {
        f.refuse_op(Errno::NOENT, |op| matches!(op, Op::AddChain(_)))
    })
    .await;
}

/// EOPNOTSUPP naming a rule (as when the kernel lacks an expression's module).
#[tokio::test(start_paused = true)]
async fn eopnotsupp_is_retried_with_backoff_counted_and_recovers() {
    refused_then_recovered(Errno::OPNOTSUPP, |f| {
        f.refuse_op(Errno::OPNOTSUPP, |op| matches!(op, Op::AddRule(_)))
    })
    .await;
}

/// ENOSPC naming a map element (as when a set or map is full).
#[tokio::test(start_paused = true)]
async fn enospc_is_retried_with_backoff_counted_and_recovers() {
    refused_then_recovered(Errno::NOSPC, |f| {
        f.refuse_op(Errno::NOSPC, |op| matches!(op, Op::AddElement(_)))
    })
    .await;
}

fn record_services(state: &mut SyncState, n: u32) {
    state.record(Input::Services(Update::Replace((1..=n).map(svc).collect())));
    state.record(Input::Slices(Update::Replace(
        (1..=n).map(endpoints).collect(),
    )));
}

/// A cold start is several transactions; one refused after the first two went in leaves no
/// table of ours (the two are undone in one transaction), and the retry, a cold start again,
/// builds the whole table.
#[test]
fn a_refusal_in_the_middle_of_a_cold_start_leaves_no_table_and_the_retry_builds_it() {
    let mut w = world(60);
    record_services(&mut w.state, 20);
    w.faults.refuse_after(Errno::NOSPC, 2);
    let r = w.state.sync();
    let e = r.applied.unwrap().unwrap_err();
    assert_eq!(e.failed.len(), 1, "{e}");
    let f = &e.failed[0];
    assert_eq!(f.family, IpFamily::V4);
    assert!(
        f.message.contains("the cold start's transaction 3")
            && f.message.contains("were undone (our table deleted)"),
        "{f}"
    );
    assert!(
        !w.fake
            .lock()
            .unwrap()
            .has_table(kpr_nft::Family::Ip, kpr_dataplane::nftables::layout::TABLE),
        "no half-built table"
    );
    assert_eq!(
        w.metrics
            .nftables_sync_failures
            .with_label_values(&["IPv4"])
            .get(),
        1
    );
    let before = w.faults.passed();
    let r = w.state.sync();
    assert!(matches!(r.applied, Some(Ok(_))), "{:?}", r.applied);
    assert!(
        w.faults.passed() - before >= 4,
        "the retry is a chunked cold start again"
    );
    assert_eq!(dump(&w.fake), fresh(&w.state));
    assert!(w.health.healthy(SystemTime::now()));
}

/// If the undo is refused too, the half-built table stays (no Service reachable through it
/// here: the refusal hit the first chunk with verdict elements) and the retry, finding a table,
/// replaces it in one transaction.
#[test]
fn when_the_undo_is_refused_too_the_retry_replaces_the_half_built_table_at_once() {
    let mut w = world(60);
    record_services(&mut w.state, 20);
    // Verdict elements are refused, and so is deleting the table once one was.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    w.faults.refuse_op(Errno::NOSPC, move |op| match op {
        Op::AddElement(e) if e.verdict.is_some() => {
            armed.store(true, std::sync::atomic::Ordering::SeqCst);
            true
        }
        Op::DeleteTable => armed.load(std::sync::atomic::Ordering::SeqCst),
        _ => false,
    });
    let e = w.state.sync().applied.unwrap().unwrap_err();
    assert!(e.to_string().contains("could not be undone"), "{e}");
    let fake = w.fake.lock().unwrap().clone();
    let t = kpr_dataplane::nftables::layout::TABLE;
    assert!(fake.has_table(kpr_nft::Family::Ip, t));
    let svc1 =
        kpr_nft::Key::AddrProtoPort("172.30.0.2".parse().unwrap(), kpr_nft::L4Proto::Tcp, 80);
    assert_eq!(
        fake.map_get(kpr_nft::Family::Ip, t, "service-ips", &svc1),
        None,
        "nothing half-built is reachable"
    );
    w.faults.clear();
    let before = w.faults.passed();
    assert!(matches!(w.state.sync().applied, Some(Ok(_))));
    assert_eq!(
        w.faults.passed() - before,
        2,
        "one transaction per family: IPv4's replaces the half-built table"
    );
    assert_eq!(dump(&w.fake), fresh(&w.state));
}

/// A refusal in one family does not keep the other from syncing: it is marked synced (its
/// health moves on), and only the refused family is counted and stays queued.
#[test]
fn a_refused_family_does_not_hold_back_the_other() {
    let mut w = world(COLD_START_MAX_OPS);
    record_services(&mut w.state, 2);
    assert!(matches!(w.state.sync().applied, Some(Ok(_))));
    w.faults.refuse_op(
        Errno::BUSY,
        |op| matches!(op, Op::AddTable(t) if t.family == kpr_nft::Family::Ip6),
    );
    w.state.record(Input::Services(Update::Apply(svc(3))));
    w.state.force_full();
    let now = SystemTime::now();
    let e = w.state.sync().applied.unwrap().unwrap_err();
    assert_eq!(
        e.failed.iter().map(|f| f.family).collect::<Vec<_>>(),
        [IpFamily::V6],
        "{e}"
    );
    assert!(
        e.done.families.iter().any(|(f, _, _)| *f == IpFamily::V4),
        "IPv4 synced"
    );
    let count = |f: &str| {
        w.metrics
            .nftables_sync_failures
            .with_label_values(&[f])
            .get()
    };
    assert_eq!((count("IPv4"), count("IPv6")), (0, 1));
    let mut body = String::new();
    w.health
        .update(|m| body = m.response(Probe::Livez, now + 3 * SYNC_PERIOD).1);
    assert!(
        body.contains(r#""status":{"IPv4":{"#) && body.contains(r#""healthy":true},"IPv6""#),
        "IPv4 healthy, IPv6 not: {body}"
    );
    assert!(body.ends_with(r#""healthy":false}}}"#), "{body}");
}

/// A full resync over our table (the hourly one; a repair after someone flushed a chain of
/// ours) replaces it in one transaction per family, never as a chunked cold start, even
/// though the committed copy is dropped before the new state is built (issue 16: a full
/// sync holds one copy, not two).
#[test]
fn a_full_resync_over_our_flushed_table_is_one_transaction_per_family() {
    let mut w = world(60);
    record_services(&mut w.state, 20);
    assert!(matches!(w.state.sync().applied, Some(Ok(_))));
    let cold = w.faults.passed();
    assert!(cold > 2, "the cold start was chunked: {cold} transactions");
    // Someone flushes our masquerading chain: the repair check sees it and forces a full sync.
    let table = kpr_nft::Table {
        family: kpr_nft::Family::Ip,
        name: kpr_dataplane::nftables::layout::TABLE.into(),
        comment: None,
    };
    let mut flush = kpr_nft::Transaction::new(table);
    flush.push(kpr_nft::Op::FlushChain(
        kpr_dataplane::nftables::layout::MASQUERADING.into(),
    ));
    w.fake.lock().unwrap().apply(&flush).unwrap();
    assert!(!w.state.verify(), "the flush is seen");
    w.state.force_full();
    let before = w.faults.passed();
    let r = w.state.sync();
    assert!(matches!(r.applied, Some(Ok(_))), "{:?}", r.applied);
    assert!(r.plan.full);
    assert_eq!(
        w.faults.passed() - before,
        2,
        "one transaction per family (IPv4, IPv6), not a chunked cold start"
    );
    assert_eq!(dump(&w.fake), fresh(&w.state));
}
