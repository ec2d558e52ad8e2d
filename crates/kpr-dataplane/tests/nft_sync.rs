//! Partial syncs and the kernel: any sequence of partial syncs leaves the same ruleset as one
//! full sync (property, on the strict fake), and the same transactions applied to the real
//! kernel — in a network namespace this test creates and always deletes — leave exactly what
//! the fake holds (root only; CI runs as root).
#![allow(clippy::unwrap_used)]

use kpr_dataplane::nftables::{NftConfig, NodePortAddrs, Rendered, render};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{
    DesiredState, Input, IpFamily, ObjectKey, SyncPlan, Trackers, Update, desired, update_desired,
};
use kpr_nft::{Executor, Fake, Netlink, NftCli, normalize};
use kpr_testkit::*;
use proptest::prelude::*;
use std::process::Command;

#[derive(Debug, Clone)]
enum Ev {
    Svc(u8, u8),
    DelSvc(u8),
    Slice(u8, Vec<(u8, u8)>),
    DelSlice(u8),
    /// The ServiceCIDRs become one of a few sets of ranges (§4.8).
    Cidrs(u8),
    Sync,
}

fn svc(id: u8, v: u8) -> ServiceBuilder {
    let mut b = service("ns", &format!("s{id}"))
        .cluster_ip(&format!("172.30.0.{}", id + 1))
        .cluster_ip(&format!("fd00:30::{}", id + 1));
    b = if v & 1 == 1 {
        b.node_port("p", 80, "TCP", 3000 + i32::from(id))
    } else {
        b.port("p", 80, "TCP")
    };
    if v & 2 == 2 {
        b = b.port("u", 53, "UDP");
    }
    if v & 4 == 4 {
        b = b
            .lb(&format!("1.2.3.{}", id + 1), None)
            .etp_local()
            .health_check_node_port(31000)
            .source_range("203.0.113.0/24");
    }
    if v & 8 == 8 {
        b = b.itp_local();
    }
    if v & 16 == 16 {
        b = b.affinity(Some(60));
    }
    if v & 32 == 32 {
        b = b.external_ip(&format!("192.168.99.{}", id + 1));
    }
    if v & 64 == 64 {
        b = b.port("s", 9999, "SCTP");
    }
    b
}

fn slice_of(id: u8, eps: &[(u8, u8)]) -> SliceBuilder {
    let mut s = slice("ns", &format!("s{id}"), "a")
        .port("p", 8080, "TCP")
        .port("u", 5353, "UDP")
        .port("s", 9999, "SCTP");
    for (i, st) in eps {
        let node = if i % 2 == 0 { NODE } else { OTHER_NODE };
        let addr = format!("10.0.{}.{}", i % 2, i + 10);
        s = if st % 2 == 0 {
            s.ready(&addr, node)
        } else {
            s.terminating(&addr, node)
        };
    }
    s
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        3 => (0u8..4, 0u8..128).prop_map(|(i, v)| Ev::Svc(i, v)),
        1 => (0u8..4).prop_map(Ev::DelSvc),
        4 => (0u8..4, prop::collection::vec((0u8..6, 0u8..2), 0..4)).prop_map(|(i, e)| Ev::Slice(i, e)),
        1 => (0u8..4).prop_map(Ev::DelSlice),
        1 => (0u8..4).prop_map(Ev::Cidrs),
        2 => Just(Ev::Sync),
    ]
}

fn record(t: &mut Trackers, e: &Ev) {
    let input = match e {
        Ev::Svc(i, v) => Input::Services(Update::Apply(svc(*i, *v).build())),
        Ev::DelSvc(i) => Input::Services(Update::Delete(ObjectKey::new("ns", format!("s{i}")))),
        Ev::Slice(i, eps) => Input::Slices(Update::Apply(slice_of(*i, eps).build())),
        Ev::DelSlice(i) => Input::Slices(Update::Delete(ObjectKey::new("ns", format!("s{i}-a")))),
        Ev::Cidrs(v) => {
            let ranges: &[&str] = match v {
                0 => &[],
                1 => &[SERVICE_CIDR],
                2 => &[SERVICE_CIDR, "fd00:30::/112"],
                _ => &["172.30.0.0/24", "172.29.0.0/16", "fd00:30::/112"],
            };
            Input::ServiceCidrs(Update::Replace(vec![service_cidr("kubernetes", ranges)]))
        }
        Ev::Sync => return,
    };
    t.record(input);
}

fn cfg(family: IpFamily) -> NftConfig {
    cfg_slots(family, kpr_dataplane::nftables::SLOTS)
}

/// With few endpoint-map slots, ports collide (and move when others come and go) or find none
/// (and pick endpoints through per-endpoint chains).
fn cfg_slots(family: IpFamily, slots: u32) -> NftConfig {
    let ips = vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()];
    NftConfig {
        endpoint_slots: slots,
        ..NftConfig::new(family, 14, NodePortAddrs::List(ips))
    }
}

/// Runs the events, syncing partially at each `Sync`, through `execs` (one per family).
/// After each sync, checks the fake against a fresh full render, and calls `after`.
fn run(
    events: &[Ev],
    slots: u32,
    execs: &mut [(IpFamily, Box<dyn Executor>)],
    mut after: impl FnMut(IpFamily, &Fake),
) {
    let mut t = Trackers::new();
    t.record(Input::Services(Update::Replace(vec![])));
    let mut d = DesiredState::default();
    let mut rendered: Vec<Rendered> = vec![Rendered::default(); execs.len()];
    let mut fakes: Vec<Fake> = vec![Fake::default(); execs.len()];
    for e in events.iter().chain([Ev::Sync].iter()) {
        record(&mut t, e);
        if !matches!(e, Ev::Sync) {
            continue;
        }
        let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
        let ctx = NodeContext::new(NODE, None);
        let pol = ProxyPolicy::new(false, &mode, None);
        let plan = t.checkout();
        update_desired(&mut d, t.state(), &ctx, &pol, &plan);
        for (i, (family, exec)) in execs.iter_mut().enumerate() {
            let tx = render(
                &d.families[family],
                &cfg_slots(*family, slots),
                &mut rendered[i],
                &plan,
            );
            fakes[i].apply(&tx).unwrap_or_else(|e| {
                panic!(
                    "fake refused a rendered transaction: {e}\n{}",
                    kpr_nft::text::script(&tx)
                )
            });
            exec.apply(&tx).unwrap_or_else(|e| {
                panic!("executor refused: {e}\n{}", kpr_nft::text::script(&tx))
            });
            // The same state rendered in one full sync.
            let full = desired(t.state(), &ctx, &pol);
            let ftx = render(
                &full.families[family],
                &cfg_slots(*family, slots),
                &mut Rendered::default(),
                &SyncPlan::full(),
            );
            let mut fresh = Fake::default();
            fresh.apply(&ftx).unwrap();
            assert_eq!(
                fakes[i].dump(),
                fresh.dump(),
                "partial syncs diverged from a full sync ({family})"
            );
            after(*family, &fakes[i]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn partial_syncs_equal_one_full_sync(events in prop::collection::vec(ev(), 0..30), slots in prop_oneof![Just(kpr_dataplane::nftables::SLOTS), 0u32..6]) {
        let mut execs: Vec<(IpFamily, Box<dyn Executor>)> = vec![(IpFamily::V4, Box::new(Fake::default())), (IpFamily::V6, Box::new(Fake::default()))];
        run(&events, slots, &mut execs, |_, _| {});
    }
}

/// A network namespace for one test, deleted on drop (even when the test fails).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("SKIPPED (needs root and ip netns): kernel agreement test {tag}");
            return None;
        }
        let name = format!("kpr-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?
            .success();
        assert!(ok, "ip netns add {name} failed");
        Some(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The kernel holds exactly what the fake holds, after a full sync and after each partial one,
/// with the transactions applied through netlink (the daemon's executor).
#[test]
fn the_kernel_agrees_with_the_fake() {
    let nl = |ns: &str| -> Box<dyn Executor> { Box::new(Netlink::in_netns(ns).unwrap()) };
    kernel_agrees("agree-nl", kpr_dataplane::nftables::SLOTS, nl);
    kernel_agrees("agree-nl-3", 3, nl);
}

/// The same through `nft -f`, the reference the netlink encoder is checked against.
#[test]
fn the_kernel_agrees_with_the_fake_through_nft() {
    kernel_agrees("agree-cli", kpr_dataplane::nftables::SLOTS, |ns| {
        Box::new(NftCli::in_netns(ns))
    });
}

fn kernel_agrees(tag: &str, slots: u32, executor: impl Fn(&str) -> Box<dyn Executor>) {
    let Some(ns) = Netns::new(tag) else {
        return;
    };
    let events = vec![
        Ev::Svc(0, 0b111_0111),
        Ev::Slice(0, vec![(0, 0), (1, 0), (2, 1)]),
        Ev::Svc(1, 0b00_1001),
        Ev::Slice(1, vec![(3, 0)]),
        Ev::Svc(2, 0b01_0010),
        Ev::Cidrs(2),
        Ev::Sync,
        Ev::Slice(0, vec![(0, 0), (4, 0)]),
        Ev::Svc(1, 0b00_0001),
        Ev::Cidrs(3),
        Ev::Sync,
        Ev::DelSvc(2),
        Ev::Slice(1, vec![]),
        Ev::Sync,
        Ev::DelSvc(0),
        Ev::DelSlice(0),
    ];
    let cli = NftCli::in_netns(&ns.0);
    let mut execs: Vec<(IpFamily, Box<dyn Executor>)> = vec![
        (IpFamily::V4, executor(&ns.0)),
        (IpFamily::V6, executor(&ns.0)),
    ];
    let mut checks = 0;
    // Few slots: some ports share a probe sequence, some pick through endpoint chains.
    run(&events, slots, &mut execs, |family, fake| {
        let fam = if family == IpFamily::V4 {
            kpr_nft::Family::Ip
        } else {
            kpr_nft::Family::Ip6
        };
        let listing = cli.list_table(fam, "kube-proxy-rs").unwrap().unwrap();
        assert_eq!(
            normalize(&listing),
            fake.dump(),
            "kernel and fake differ ({family})\n--- kernel ---\n{listing}"
        );
        checks += 1;
    });
    assert_eq!(checks, 8);
}

/// The kernel refuses what the fake refuses, and a refused transaction changes nothing.
#[test]
fn the_kernel_and_the_fake_refuse_the_same_transaction() {
    let Some(ns) = Netns::new("refuse") else {
        return;
    };
    let table = cfg(IpFamily::V4).table();
    let mut ok = kpr_nft::Transaction::new(table.clone());
    ok.push(kpr_nft::Op::AddTable(table.clone()));
    ok.push(kpr_nft::Op::AddChain(kpr_nft::Chain {
        name: "a".into(),
        base: None,
        comment: None,
    }));
    let mut bad = kpr_nft::Transaction::new(table);
    bad.push(kpr_nft::Op::AddChain(kpr_nft::Chain {
        name: "b".into(),
        base: None,
        comment: None,
    }));
    bad.push(kpr_nft::Op::AddRule(kpr_nft::Rule::new("a").s(
        kpr_nft::Statement::Verdict(kpr_nft::Verdict::Jump("missing".into())),
    )));
    let cli = NftCli::in_netns(&ns.0);
    let mut nl = Netlink::in_netns(&ns.0).unwrap();
    let mut fake = Fake::default();
    Executor::apply(&mut nl, &ok).unwrap();
    fake.apply(&ok).unwrap();
    let before = cli
        .list_table(kpr_nft::Family::Ip, "kube-proxy-rs")
        .unwrap()
        .unwrap();
    assert!(
        Executor::apply(&mut nl, &bad).is_err(),
        "kernel accepted a dangling jump (netlink)"
    );
    assert!(
        Executor::apply(&mut cli.clone(), &bad).is_err(),
        "kernel accepted a dangling jump (nft -f)"
    );
    assert!(fake.apply(&bad).is_err(), "fake accepted a dangling jump");
    let after = cli
        .list_table(kpr_nft::Family::Ip, "kube-proxy-rs")
        .unwrap()
        .unwrap();
    assert_eq!(before, after, "a refused transaction changed the kernel");
    assert_eq!(normalize(&after), fake.dump());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A cold start split into bounded transactions builds exactly the table one full sync
    /// builds, and no chunk is larger than the bound plus one service port's operations.
    #[test]
    fn cold_start_chunks_build_the_same_table(events in prop::collection::vec(ev(), 1..30), max_ops in 5usize..200) {
        let mut t = Trackers::new();
        for e in &events {
            record(&mut t, e);
        }
        let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
        let (ctx, pol) = (NodeContext::new(NODE, None), ProxyPolicy::new(false, &mode, None));
        let d = desired(t.state(), &ctx, &pol);
        for family in [IpFamily::V4, IpFamily::V6] {
            let mut chunked = Rendered::default();
            let chunks = kpr_dataplane::nftables::render_cold(&d.families[&family], &cfg(family), &mut chunked, max_ops);
            let mut fake = Fake::default();
            for c in &chunks {
                fake.apply(c).unwrap();
            }
            let mut whole = Rendered::default();
            let full = render(&d.families[&family], &cfg(family), &mut whole, &SyncPlan::full());
            let mut reference = Fake::default();
            reference.apply(&full).unwrap();
            prop_assert_eq!(fake.dump(), reference.dump());
            prop_assert_eq!(&chunked, &whole);
            prop_assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), full.len());
            for c in chunks.iter().skip(1) {
                prop_assert!(c.len() <= max_ops + 60, "chunk of {} ops for a bound of {}", c.len(), max_ops);
            }
        }
    }
}
