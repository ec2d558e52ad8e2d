//! Measures the nftables path at scale, in a network namespace it creates (root only), with
//! the references measured in the same run: N Services x E endpoints loaded through the
//! netlink executor against the same ruleset loaded as text with `nft -f`; one endpoint change
//! (event -> tracked -> rendered -> committed in the kernel) through netlink, p50/p99 over 200
//! changes, against the same change through `nft -f`; the cold start in bounded transactions;
//! the active-repair check. Usage:
//! `cargo run --release -p kpr-dataplane --example nft_scale -- 10000 [endpoints]`.
#![allow(clippy::unwrap_used)]

use kpr_dataplane::nftables::{NftConfig, NodePortAddrs, Rendered, layout, render, render_cold};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{Input, IpFamily, Trackers, Update, desired, update_desired};
use kpr_nft::{Executor, Family, Netlink, NftCli, Op, Transaction};
use kpr_testkit::{NODE, service, slice};
use std::process::Command;
use std::time::{Duration, Instant};

fn main() {
    let arg = |i: usize, default: u32| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (n, e) = (arg(1, 1000), arg(2, 2));
    // `--maps` (third argument) probes named-map costs instead.
    let ns = format!("kpr-bench-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success(),
        "needs root"
    );
    let maps = std::env::args().any(|a| a == "--maps");
    let result = std::panic::catch_unwind(|| {
        if maps {
            maps_probe(n, &ns)
        } else {
            run(n, e, &ns)
        }
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    result.unwrap();
}

fn endpoints(svc: u32, e: u32, step: u32) -> kpr_testkit::SliceBuilder {
    let mut s = slice("ns", &format!("s{svc}"), "a").port("p", 8080, "TCP");
    for k in 0..e {
        // 10.(1 + k).x.y: unique per (service, endpoint); `generation` shifts one address.
        let host = svc * 2 + u32::from(k == 0) * step;
        let node = if k % 2 == 0 { NODE } else { "node-b" };
        s = s.ready(
            &format!("10.{}.{}.{}", 1 + k, host / 250 % 250, host % 250 + 1),
            node,
        );
    }
    s
}

fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn delete_table(exec: &mut dyn Executor, cfg: &NftConfig) {
    let mut tx = Transaction::new(cfg.table());
    tx.push(Op::AddTable(cfg.table()));
    tx.push(Op::DeleteTable);
    exec.apply(&tx).unwrap();
}

fn run(n: u32, e: u32, ns: &str) {
    let mut t = Trackers::new();
    let svcs = (0..n)
        .map(|i| {
            service("ns", &format!("s{i}"))
                .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
                .port("p", 80, "TCP")
                .build()
        })
        .collect();
    let slices = (0..n).map(|i| endpoints(i, e, 0).build()).collect();
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
    let mut nl = Netlink::in_netns(ns).unwrap();
    println!("== {n} Services x {e} endpoints (IPv4), in network namespace {ns}");

    let t0 = Instant::now();
    let plan = t.checkout();
    let mut d = desired(t.state(), &ctx, &pol);
    let mut rendered = Rendered::default();
    let tx = render(&d.families[&IpFamily::V4], &cfg, &mut rendered, &plan);
    let render_full = t0.elapsed();
    let script = kpr_nft::text::script(&tx);
    let file = std::env::temp_dir().join(format!("{ns}.nft"));
    std::fs::write(&file, &script).unwrap();
    let t1 = Instant::now();
    if std::env::var_os("KPR_BENCH_NO_FLOOR").is_none() {
        cli.run(&["-f", file.to_str().unwrap()], None).unwrap();
    }
    let nft_f = t1.elapsed();
    let _ = std::fs::remove_file(&file);
    delete_table(&mut nl, &cfg);
    let t2 = Instant::now();
    nl.apply(&tx).unwrap();
    let nl_full = t2.elapsed();
    println!(
        "full render: {render_full:?} ({} ops, {} KiB of nft text)",
        tx.len(),
        script.len() / 1024
    );
    println!("floor: nft -f FILE of the same ruleset: {nft_f:?}");
    println!(
        "full apply through netlink (one transaction): {nl_full:?} = {:.2}x the floor; render + apply = {:.2}x",
        nl_full.as_secs_f64() / nft_f.as_secs_f64(),
        (render_full + nl_full).as_secs_f64() / nft_f.as_secs_f64()
    );

    // One endpoint change at a time: event -> kernel commit.
    let mut one = |step: u32, exec: &mut dyn Executor, tr: &mut Trackers| -> (Duration, usize) {
        let start = Instant::now();
        let svc = step * 7919 % n;
        tr.record(Input::Slices(Update::Apply(
            endpoints(svc, e, step).build(),
        )));
        let plan = tr.checkout();
        update_desired(&mut d, tr.state(), &ctx, &pol, &plan);
        let tx = render(&d.families[&IpFamily::V4], &cfg, &mut rendered, &plan);
        let computed = start.elapsed();
        exec.apply(&tx).unwrap();
        if std::env::var_os("KPR_BENCH_VERBOSE").is_some() {
            eprintln!(
                "compute {computed:?} apply {:?}\n{}",
                start.elapsed() - computed,
                kpr_nft::text::script(&tx)
            );
        }
        (start.elapsed(), tx.len())
    };
    let mut samples = Vec::new();
    let mut ops = 0;
    for step in 1..=200 {
        let (d, o) = one(step, &mut nl, &mut t);
        samples.push(d);
        ops = o;
    }
    let (p50, p99) = (quantile(&mut samples, 0.5), quantile(&mut samples, 0.99));
    let mut cli_samples = Vec::new();
    let cli_runs = if std::env::var_os("KPR_BENCH_NO_FLOOR").is_some() {
        0
    } else {
        5
    };
    for step in (201..).take(cli_runs) {
        cli_samples.push(one(step, &mut cli, &mut t).0);
    }
    let cli_p50 = if cli_samples.is_empty() {
        Duration::ZERO
    } else {
        quantile(&mut cli_samples, 0.5)
    };
    println!(
        "one endpoint change, event -> kernel commit through netlink ({ops} ops): p50 {p50:?}, p99 {p99:?} (200 changes)"
    );
    println!(
        "the same through nft -f: p50 {cli_p50:?} (5 changes) = {:.0}x netlink",
        cli_p50.as_secs_f64() / p50.as_secs_f64()
    );

    if std::env::var_os("KPR_BENCH_PROBE").is_some() {
        probe(&mut nl, &cfg);
    }
    // The active-repair check the daemon runs every 250 ms.
    let t6 = Instant::now();
    let intact = nl.table_intact(&cfg.table(), layout::MASQUERADING).unwrap();
    println!(
        "repair check over netlink (filtered rule dump): {:?}, intact={intact}",
        t6.elapsed()
    );
    if std::env::var_os("KPR_BENCH_NO_FLOOR").is_some() {
        return;
    }
    let t4 = Instant::now();
    let listing = cli
        .list_table(Family::Ip, "kube-proxy-rs")
        .unwrap()
        .unwrap_or_default();
    println!(
        "reference: nft list table: {:?} ({} lines)",
        t4.elapsed(),
        listing.lines().count()
    );

    // Cold start in bounded transactions, in a fresh table.
    delete_table(&mut nl, &cfg);
    let mut cold = Rendered::default();
    let t5 = Instant::now();
    let chunks = render_cold(&d.families[&IpFamily::V4], &cfg, &mut cold, 10_000);
    let mut longest = Duration::ZERO;
    for c in &chunks {
        let t = Instant::now();
        nl.apply(c).unwrap();
        longest = longest.max(t.elapsed());
    }
    println!(
        "cold start (render + {} netlink transactions of <= ~10,000 ops): {:?}, longest transaction {longest:?}",
        chunks.len(),
        t5.elapsed()
    );
}

/// Where a small commit's time goes: transactions that do and do not make the kernel validate
/// the table (walk every chain reachable from the base chains).
fn probe(nl: &mut Netlink, cfg: &NftConfig) {
    use kpr_nft::{Chain, Element, Key, KeyType, Rule, Set, Statement, Table, Verdict};
    let time = |nl: &mut Netlink, what: &str, tx: &Transaction| {
        let mut v = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            nl.apply(tx).unwrap();
            v.push(t.elapsed());
        }
        println!("probe: {what}: {:?}", quantile(&mut v, 0.5));
    };
    let chain = |n: &str| Chain {
        name: n.into(),
        base: None,
        comment: None,
    };
    let mut a = Transaction::new(cfg.table());
    a.push(Op::AddSet(Set {
        name: "probe".into(),
        key: KeyType::Addr,
        interval: false,
        timeout: None,
        comment: None,
    }));
    a.push(Op::AddElement(Element {
        set: "probe".into(),
        key: Key::Addr("1.2.3.4".parse().unwrap()),
        verdict: None,
        target: None,
        comment: None,
    }));
    a.push(Op::DeleteElement(Element {
        set: "probe".into(),
        key: Key::Addr("1.2.3.4".parse().unwrap()),
        verdict: None,
        target: None,
        comment: None,
    }));
    time(nl, "element in a plain set (no validation)", &a);
    let mut b = Transaction::new(cfg.table());
    b.push(Op::AddChain(chain("probe-c")));
    b.push(Op::FlushChain("probe-c".into()));
    b.push(Op::AddRule(
        Rule::new("probe-c").s(Statement::Verdict(Verdict::Accept)),
    ));
    time(
        nl,
        "rule with a verdict in an unreferenced chain of our table",
        &b,
    );
    let other = Table {
        family: Family::Ip,
        name: "probe-other".into(),
        comment: None,
    };
    let mut c = Transaction::new(other.clone());
    c.push(Op::AddTable(other));
    c.push(Op::AddChain(chain("probe-c")));
    c.push(Op::FlushChain("probe-c".into()));
    c.push(Op::AddRule(
        Rule::new("probe-c").s(Statement::Verdict(Verdict::Accept)),
    ));
    time(nl, "the same rule in another table", &c);
}

/// `nft_scale --maps N`: what N named endpoint maps cost the kernel to load, alone, with one
/// element each, and with one chain and rule using each.
fn maps_probe(n: u32, ns: &str) {
    use kpr_nft::{Chain, Element, Key, KeyType, L4Proto, Map, Match, Rule, Statement, Table};
    let mut nl = Netlink::in_netns(ns).unwrap();
    let table = Table {
        family: Family::Ip,
        name: "maps".into(),
        comment: None,
    };
    for stage in ["maps", "maps+elements", "maps+elements+rules"] {
        let mut tx = Transaction::new(table.clone());
        tx.push(Op::AddTable(table.clone()));
        tx.push(Op::DeleteTable);
        tx.push(Op::AddTable(table.clone()));
        for i in 0..n {
            let name = format!("endpoints-{i:08}-ns/service-{i}/tcp/http");
            tx.push(Op::AddMap(Map {
                name: name.clone(),
                key: KeyType::Bucket(L4Proto::Tcp),
                comment: None,
            }));
            if stage != "maps" {
                tx.push(Op::AddElement(Element {
                    set: name.clone(),
                    key: Key::Bucket(0),
                    verdict: None,
                    target: Some(
                        format!("10.{}.{}.1:80", i / 250 % 250, i % 250)
                            .parse()
                            .unwrap(),
                    ),
                    comment: None,
                }));
            }
            if stage == "maps+elements+rules" {
                let chain = format!("service-{i:08}");
                tx.push(Op::AddChain(Chain {
                    name: chain.clone(),
                    base: None,
                    comment: None,
                }));
                tx.push(Op::AddRule(
                    Rule::new(&chain)
                        .m(Match::L4Proto(L4Proto::Tcp))
                        .s(Statement::DnatMap {
                            map: name,
                            offset: 0,
                            modulus: 1,
                        }),
                ));
            }
        }
        let t = Instant::now();
        nl.apply(&tx).unwrap();
        println!(
            "{n} named maps, {stage}: {:?} ({} ops)",
            t.elapsed(),
            tx.len()
        );
    }
}
