//! Measures the nftables path at scale, in a network namespace it creates (root only):
//! full render + `nft -f` apply of N Services x 2 endpoints, then one endpoint change (render
//! and apply), against `nft list table` of the same table as the reference of what the `nft`
//! CLI's cache fill costs. Usage: `cargo run --release -p kpr-dataplane --example nft_scale -- 10000`.
#![allow(clippy::unwrap_used)]

use kpr_dataplane::nftables::{NftConfig, NodePortAddrs, Rendered, render};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{Input, IpFamily, Trackers, Update, desired, update_desired};
use kpr_nft::{Executor, Family, NftCli};
use kpr_testkit::{NODE, service, slice};
use std::process::Command;
use std::time::Instant;

fn main() {
    // Re-executed inside the namespace: time the netlink repair check there.
    if std::env::args().nth(1).as_deref() == Some("--probe") {
        let t = Instant::now();
        let n = kpr_nft::netlink::chain_rule_count(Family::Ip, "kube-proxy-rs", "masquerading")
            .unwrap();
        println!(
            "repair check over netlink (filtered rule dump): {:?}, rules={n:?}",
            t.elapsed()
        );
        return;
    }
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let ns = format!("kpr-bench-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success(),
        "needs root"
    );
    let result = std::panic::catch_unwind(|| run(n, &ns));
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    result.unwrap();
}

fn run(n: u32, ns: &str) {
    let mut t = Trackers::new();
    let svcs = (0..n)
        .map(|i| {
            service("ns", &format!("s{i}"))
                .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
                .port("p", 80, "TCP")
                .build()
        })
        .collect();
    let slices = (0..n)
        .map(|i| {
            slice("ns", &format!("s{i}"), "a")
                .port("p", 8080, "TCP")
                .ready(&format!("10.1.{}.{}", i / 125, (i % 125) * 2 + 1), NODE)
                .ready(&format!("10.1.{}.{}", i / 125, (i % 125) * 2 + 2), "node-b")
                .build()
        })
        .collect();
    t.record(Input::Services(Update::Replace(svcs)));
    t.record(Input::Slices(Update::Replace(slices)));
    let mode = DetectLocalMode::ClusterCidr(vec!["10.0.0.0/8".parse().unwrap()]);
    let (ctx, pol) = (
        NodeContext::new(NODE, None),
        ProxyPolicy::new(false, &mode, None),
    );
    let cfg = NftConfig::new(
        IpFamily::V4,
        14,
        NodePortAddrs::List(vec!["192.168.0.2".parse().unwrap()]),
    );
    let mut cli = NftCli::in_netns(ns);

    let t0 = Instant::now();
    let plan = t.checkout();
    let mut d = desired(t.state(), &ctx, &pol);
    let mut rendered = Rendered::default();
    let tx = render(&d.families[&IpFamily::V4], &cfg, &mut rendered, &plan);
    let render_full = t0.elapsed();
    let t1 = Instant::now();
    cli.apply(&tx).unwrap();
    let apply_full = t1.elapsed();
    println!(
        "{n} Services x 2 endpoints: full render {render_full:?} ({} ops), full apply (nft -f) {apply_full:?}",
        tx.len()
    );

    // One endpoint change.
    let t2 = Instant::now();
    t.record(Input::Slices(Update::Apply(
        slice("ns", "s7", "a")
            .port("p", 8080, "TCP")
            .ready("10.9.9.9", NODE)
            .build(),
    )));
    let plan = t.checkout();
    update_desired(&mut d, t.state(), &ctx, &pol, &plan);
    let tx = render(&d.families[&IpFamily::V4], &cfg, &mut rendered, &plan);
    let render_one = t2.elapsed();
    let t3 = Instant::now();
    cli.apply(&tx).unwrap();
    let apply_one = t3.elapsed();
    println!(
        "one endpoint change: track+render {render_one:?} ({} ops), apply through nft -f {apply_one:?}",
        tx.len()
    );
    let t4 = Instant::now();
    let listing = cli
        .list_table(Family::Ip, "kube-proxy-rs")
        .unwrap()
        .unwrap_or_default();
    let list = t4.elapsed();
    // The repair check the daemon runs every 250 ms.
    let t6 = Instant::now();
    let intact = cli
        .table_intact(&cfg.table(), kpr_dataplane::nftables::layout::MASQUERADING)
        .unwrap();
    println!(
        "repair check (nft list chain ... masquerading): {:?}, intact={intact}",
        t6.elapsed()
    );
    let t7 = Instant::now();
    let tables = cli.run(&["list", "tables"], None).unwrap();
    println!(
        "nft list tables: {:?} ({} tables)",
        t7.elapsed(),
        tables.lines().count()
    );
    let exe = std::env::current_exe().unwrap();
    let probe = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .arg("--probe")
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&probe.stdout));
    // Cold start in bounded transactions, in a fresh table.
    cli.run(&["delete", "table", "ip", "kube-proxy-rs"], None)
        .unwrap();
    let mut cold = Rendered::default();
    let chunks =
        kpr_dataplane::nftables::render_cold(&d.families[&IpFamily::V4], &cfg, &mut cold, 10_000);
    let t5 = Instant::now();
    let mut longest = std::time::Duration::ZERO;
    for c in &chunks {
        let t = Instant::now();
        cli.apply(c).unwrap();
        longest = longest.max(t.elapsed());
    }
    println!(
        "cold start in {} transactions of <= ~10,000 ops: total {:?}, longest transaction {longest:?}",
        chunks.len(),
        t5.elapsed()
    );
    println!(
        "reference: nft list table {list:?} ({} lines); ratio apply-one / list-table = {:.2}",
        listing.lines().count(),
        apply_one.as_secs_f64() / list.as_secs_f64()
    );
}
