//! Kernel tests (root, each in a network namespace of its own): what the real kernel refuses leaves our ruleset as it was, and the retry recovers.
//!
//! Real conflicts (a rule that is not ours jumping to a chain we delete; a table another
//! process owns) and an injected one (the fault-injecting executor in front of netlink, in the
//! middle of a cold start). The kernel's `nft list table` is compared, normalised, before and
//! after each refusal, and after the recovery with a fresh full render on the strict fake.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::sync::{SyncConfig, SyncState};
use kpr_model::{Input, Update};
use kpr_nft::{Errno, Faulty, Netlink, normalize};
use kpr_testkit::lab::Lab;
use kpr_testkit::{NODE, service, slice};
use std::sync::Arc;

fn cfg() -> SyncConfig {
    crate::sync::fixtures::config(Duration::ZERO)
}

/// `n` Services with a NodePort each (so each has chains of its own: a plain ClusterIP
/// Service is map elements only), two endpoints each.
fn services(n: u32) -> [Input; 2] {
    let svc = |i: u32| {
        service("ns", &format!("s{i}"))
            .cluster_ip(&format!("172.30.0.{i}"))
            .node_port("p", 80, "TCP", 30_000 + i as i32)
            .build()
    };
    let eps = |i: u32| {
        slice("ns", &format!("s{i}"), "a")
            .port("p", 8080, "TCP")
            .ready(&format!("10.0.0.{i}"), NODE)
            .ready(&format!("10.0.1.{i}"), "node-b")
            .build()
    };
    [
        Input::Services(Update::Replace((1..=n).map(svc).collect())),
        Input::Slices(Update::Replace((1..=n).map(eps).collect())),
    ]
}

/// A sync state programming the namespace `ns` through `exec`, with metrics.
fn state(
    exec: Box<dyn Executor + Send>,
    max_ops: usize,
) -> (SyncState, Arc<kpr_ops::metrics::Metrics>) {
    let metrics = Arc::new(kpr_ops::metrics::Metrics::new().unwrap());
    let plane =
        Dataplane::new(exec, 14, NodePortAddresses::Default).with_cold_start_max_ops(max_ops);
    let state = SyncState::new(cfg())
        .with_dataplane(plane)
        .with_metrics(metrics.clone());
    (state, metrics)
}

/// `nft list table ip kube-proxy-rs` in `ns`, normalised (empty when there is none).
fn listing(lab: &Lab, ns: &str) -> String {
    let out = lab.try_sh(ns, "nft list table ip kube-proxy-rs");
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// The IPv4 table a fresh full render of `state`'s desired state gives, normalised.
fn fresh(state: &SyncState) -> String {
    let ctx = state.node_context();
    let fam = &state.desired().families[&IpFamily::V4];
    let cfg = NftConfig::new(
        IpFamily::V4,
        14,
        node_port_addrs(&NodePortAddresses::Default, IpFamily::V4, &ctx),
    );
    let mut fake = Fake::default();
    fake.apply(&render(
        fam,
        &cfg,
        &mut Rendered::default(),
        &SyncPlan::full(),
    ))
    .unwrap();
    fake.dump()
}

fn failures(m: &kpr_ops::metrics::Metrics) -> u64 {
    m.nftables_sync_failures.with_label_values(&["IPv4"]).get()
}

/// Someone else's rule jumps to the chain of a Service we delete: the kernel refuses the
/// partial sync (EBUSY), which is counted and named in words, and the ruleset is exactly as
/// before; the retry, a full sync that replaces the whole table, recovers.
#[test]
fn a_chain_in_use_is_refused_atomically_and_the_full_retry_recovers() {
    let Some(mut lab) = Lab::new("nftables: a chain of ours in use") else {
        return;
    };
    let ns = lab.netns("busy");
    let (mut state, metrics) = state(
        Box::new(Netlink::in_netns(&ns).unwrap()),
        COLD_START_MAX_OPS,
    );
    for i in services(2) {
        state.record(i);
    }
    assert!(matches!(state.sync().applied, Some(Ok(_))));
    let table = lab.sh(&ns, "nft list table ip kube-proxy-rs");
    let chain = table
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain ")?.strip_suffix(" {"))
        .find(|c| c.contains("ns/s1/"))
        .unwrap()
        .to_owned();
    lab.sh(
        &ns,
        &format!("nft add chain ip kube-proxy-rs intruder && nft add rule ip kube-proxy-rs intruder jump {chain}"),
    );
    let before = listing(&lab, &ns);
    let [svcs, eps] = services(2);
    let (Input::Services(Update::Replace(mut s)), Input::Slices(Update::Replace(mut e))) =
        (svcs, eps)
    else {
        unreachable!()
    };
    s.remove(0);
    e.remove(0);
    state.record(Input::Services(Update::Replace(s)));
    state.record(Input::Slices(Update::Replace(e)));
    let err = state.sync().applied.unwrap().unwrap_err();
    eprintln!("refused: {err}");
    let f = &err.failed[0];
    assert_eq!((f.family, f.full), (IpFamily::V4, false), "{err}");
    assert!(
        f.message.contains(&format!(
            "the kernel refused `delete chain ip kube-proxy-rs {chain}`"
        )) && f.message.contains("is in use")
            && f.message.contains("EBUSY: Device or resource busy"),
        "{f}"
    );
    assert_eq!(listing(&lab, &ns), before, "the refusal changed the kernel");
    assert_eq!(failures(&metrics), 1);
    assert!(
        matches!(state.sync().applied, Some(Ok(_))),
        "the full retry"
    );
    assert_eq!(listing(&lab, &ns), fresh(&state));
    assert!(!listing(&lab, &ns).contains("172.30.0.1 "));
}

/// Another process owns a table of our name (nft's `owner` flag): every transaction of ours
/// is refused (EPERM) and changes nothing; when that process exits its table goes with it,
/// and the next sync builds ours.
#[test]
fn a_table_another_process_owns_refuses_every_sync_until_it_exits() {
    let Some(mut lab) = Lab::new("nftables: a table another process owns") else {
        return;
    };
    let ns = lab.netns("owner");
    lab.spawn(
        &ns,
        &[
            "sh",
            "-c",
            "(echo 'add table ip kube-proxy-rs { flags owner ; }'; sleep 3) | nft -i",
        ],
    );
    Lab::wait_for("the owner's table", Duration::from_secs(5), || {
        lab.try_sh(&ns, "nft list tables")
            .stdout
            .starts_with(b"table ip kube-proxy-rs")
    });
    let before = listing(&lab, &ns);
    let (mut state, metrics) = state(
        Box::new(Netlink::in_netns(&ns).unwrap()),
        COLD_START_MAX_OPS,
    );
    for i in services(2) {
        state.record(i);
    }
    for attempt in 1..=2 {
        let err = state.sync().applied.unwrap().unwrap_err();
        eprintln!("refused: {err}");
        assert!(
            err.to_string()
                .contains("another process owns the table (nft 'flags owner')")
                && err.to_string().contains("EPERM"),
            "{err}"
        );
        assert_eq!(
            listing(&lab, &ns),
            before,
            "attempt {attempt} changed the kernel"
        );
        assert_eq!(failures(&metrics), attempt);
    }
    Lab::wait_for("the owner to exit", Duration::from_secs(10), || {
        !lab.try_sh(&ns, "nft list tables")
            .stdout
            .starts_with(b"table ip kube-proxy-rs")
    });
    assert!(matches!(state.sync().applied, Some(Ok(_))));
    assert_eq!(listing(&lab, &ns), fresh(&state));
}

/// The fault-injecting executor in front of netlink refuses the third transaction of a cold
/// start: the two before it are undone, so the kernel holds no table of ours; the retry
/// builds the whole table.
#[test]
fn a_refusal_in_the_middle_of_a_cold_start_leaves_no_table_in_the_kernel() {
    let Some(mut lab) = Lab::new("nftables: a refusal mid cold start") else {
        return;
    };
    let ns = lab.netns("cold");
    let exec = Faulty::new(Netlink::in_netns(&ns).unwrap());
    let faults = exec.faults();
    let (mut state, metrics) = state(Box::new(exec), 60);
    for i in services(20) {
        state.record(i);
    }
    faults.refuse_after(Errno::NOSPC, 2);
    let err = state.sync().applied.unwrap().unwrap_err();
    assert!(err.to_string().contains("were undone"), "{err}");
    assert!(
        !lab.sh(&ns, "nft list tables")
            .contains("table ip kube-proxy-rs"),
        "no table of ours"
    );
    assert_eq!(failures(&metrics), 1);
    assert!(matches!(state.sync().applied, Some(Ok(_))));
    assert_eq!(listing(&lab, &ns), fresh(&state));
    assert!(faults.passed() > 8, "both cold starts were chunked");
}
