//! The control plane at library level, per mode and size: cold full sync (render + apply into
//! a fresh namespace's kernel) against the kernel's own floor measured in the same run (the
//! same ruleset as text through `nft -f FILE` / `iptables-nft-restore --noflush FILE`), one
//! endpoint change and one new Service (event -> tracked -> rendered -> committed), and the
//! size of what is committed. Also installs a cluster for the data-plane measurement.
//!
//! nftables goes through the netlink executor (`render_cold_each`: bounded transactions, each
//! applied as soon as it is rendered, as the daemon's first sync; partial renders after).
//! iptables runs `iptables-nft-restore` as child processes from a thread inside the namespace;
//! its cold sync includes the `iptables-save` the daemon does before every full sync.

use crate::Mode;
use crate::cluster;
use crate::netns::Netns;
use crate::stats::{Quantiles, bounded, thousands};
use kpr_dataplane::iptables::{self as ipt, exec::Tools, exec::Variant};
use kpr_dataplane::nftables::{
    NftConfig, NodePortAddrs, Rendered, layout, render, render_cold_each,
};
use kpr_model::node::DetectLocalMode;
use kpr_model::{
    DesiredState, Input, IpFamily, NodeContext, ProxyPolicy, SyncPlan, Trackers, Update, desired,
    update_desired,
};
use kpr_nft::{Executor, Netlink};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// The daemon's bound on one cold-start transaction (`kpr-daemon` `COLD_START_MAX_OPS`).
const COLD_START_MAX_OPS: usize = 10_000;

/// How many samples, within what time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) changes: usize,
    pub(crate) adds: usize,
    /// Per series (changes, adds); a series stops early past it, saying so.
    pub(crate) time: Duration,
}

/// One mode and size at library level.
#[derive(Debug, Clone, Default)]
pub(crate) struct ControlPlane {
    pub(crate) cold: Option<Duration>,
    pub(crate) floor: Option<Duration>,
    pub(crate) change: Option<Quantiles>,
    pub(crate) add: Option<Quantiles>,
    /// nftables: operations in the full transaction; iptables: rules in all tables.
    pub(crate) count: String,
    /// iptables: median bytes of one endpoint change's restore input, and of the full one.
    pub(crate) restore_bytes: Option<(usize, usize)>,
    pub(crate) notes: Vec<String>,
}

/// The synthetic cluster folded into trackers and a desired state.
#[derive(Debug)]
pub(crate) struct World {
    trackers: Trackers,
    desired: DesiredState,
    ctx: NodeContext,
    policy: ProxyPolicy,
    n: u32,
    e: u32,
    generations: HashMap<u32, u32>,
}

impl World {
    /// `n` Services x `e` endpoints; Service `target` (if any) has the data-plane pod as its
    /// only endpoint.
    pub(crate) fn new(n: u32, e: u32, target: Option<u32>) -> World {
        World::with_live(n, e, target, 1)
    }

    /// [`World::new`] where Service `target` has `live` endpoints, all addresses of the
    /// data-plane pod ([`cluster::pod_ip`]).
    pub(crate) fn with_live(n: u32, e: u32, target: Option<u32>, live: u32) -> World {
        let svcs = (0..n)
            .map(|i| cluster::typed_service(cluster::service(i)))
            .collect();
        let slices = (0..n)
            .map(|i| {
                let s = if Some(i) == target {
                    cluster::live_slice(i, live)
                } else {
                    cluster::slice(i, e, 0, None)
                };
                cluster::typed_slice(s)
            })
            .collect();
        let mut trackers = Trackers::new();
        trackers.record(Input::Services(Update::Replace(svcs)));
        trackers.record(Input::Slices(Update::Replace(slices)));
        let mode = DetectLocalMode::ClusterCidr(vec!["10.0.0.0/8".parse().expect("CIDR")]);
        let ctx = NodeContext::new(cluster::NODE, None);
        let policy = ProxyPolicy::new(false, &mode, None);
        let _ = trackers.checkout();
        let desired = desired(trackers.state(), &ctx, &policy);
        World {
            trackers,
            desired,
            ctx,
            policy,
            n,
            e,
            generations: HashMap::new(),
        }
    }

    pub(crate) fn fam(&self) -> &kpr_model::FamilyDesired {
        &self.desired.families[&IpFamily::V4]
    }

    /// The event of change `step`: one endpoint of one Service moves (built before the clock
    /// starts; every change really changes an address).
    fn endpoint_change(&mut self, step: u32) -> Vec<Input> {
        let svc = (u64::from(step) * 7919 % u64::from(self.n)) as u32;
        let g = self.generations.entry(svc).or_default();
        *g += 1;
        let s = cluster::slice(svc, self.e, *g, None);
        vec![Input::Slices(Update::Apply(cluster::typed_slice(s)))]
    }

    /// The events of a new Service (index `n + step`) and its slice.
    fn new_service(&mut self, step: u32) -> Vec<Input> {
        let i = self.n + step;
        vec![
            Input::Services(Update::Apply(cluster::typed_service(cluster::service(i)))),
            Input::Slices(Update::Apply(cluster::typed_slice(cluster::slice(
                i, self.e, 0, None,
            )))),
        ]
    }

    /// Tracks the events and brings the desired state up to date; returns the plan.
    fn track(&mut self, inputs: Vec<Input>) -> SyncPlan {
        for i in inputs {
            self.trackers.record(i);
        }
        let plan = self.trackers.checkout();
        update_desired(
            &mut self.desired,
            self.trackers.state(),
            &self.ctx,
            &self.policy,
            &plan,
        );
        plan
    }
}

fn nft_config() -> NftConfig {
    NftConfig::new(
        IpFamily::V4,
        14,
        NodePortAddrs::List(vec![cluster::NODE_IP.parse().expect("IP")]),
    )
}

fn ipt_config() -> ipt::IptConfig {
    ipt::IptConfig::new(
        IpFamily::V4,
        14,
        NodePortAddrs::List(vec![cluster::NODE_IP.parse().expect("IP")]),
    )
}

/// Runs one mode at one size.
pub(crate) fn measure(mode: Mode, n: u32, e: u32, budget: Budget, floor: bool) -> ControlPlane {
    let mut world = World::new(n, e, None);
    match mode {
        Mode::Nftables => nft(&mut world, budget, floor),
        Mode::Iptables => iptables(&mut world, budget, floor),
    }
}

fn nft(world: &mut World, budget: Budget, floor: bool) -> ControlPlane {
    let (n, e) = (world.n, world.e);
    let cfg = nft_config();
    let mut out = ControlPlane::default();
    // The floor: the same ruleset as nft text, in a fresh namespace.
    let full = render(
        world.fam(),
        &cfg,
        &mut Rendered::default(),
        &SyncPlan::full(),
    );
    out.count = format!("{} ops", thousands(full.len() as u64));
    let floor_ns = Netns::new(&format!("nft-floor-{n}x{e}"));
    if floor {
        let file = std::env::temp_dir().join(format!("{}.nft", floor_ns.name()));
        std::fs::write(&file, kpr_nft::text::script(&full)).expect("write the nft script");
        drop(full);
        out.floor = Some(floor_ns.run_in(|| {
            let t = Instant::now();
            let st = Command::new("nft")
                .arg("-f")
                .arg(&file)
                .status()
                .expect("nft runs");
            assert!(st.success(), "nft -f of our own ruleset failed");
            t.elapsed()
        }));
        eprintln!("   floor: nft -f {:?}", out.floor.unwrap_or_default());
        let _ = std::fs::remove_file(&file);
    }

    // Ours: render + bounded transactions through netlink, in another fresh namespace.
    let ns = Netns::new(&format!("nft-lib-{n}x{e}"));
    let mut nl = Netlink::in_netns(ns.name()).expect("netlink socket in the namespace");
    let mut committed = Rendered::default();
    let t = Instant::now();
    let mut txs = 0;
    render_cold_each(
        world.fam(),
        &cfg,
        &mut committed,
        COLD_START_MAX_OPS,
        &mut |tx| {
            txs += 1;
            nl.apply(&tx)
        },
    )
    .expect("cold-start transaction");
    out.cold = Some(t.elapsed());
    eprintln!(
        "   cold: render + {txs} netlink transactions {:?}",
        out.cold.unwrap_or_default()
    );
    assert!(
        nl.table_intact(&cfg.table(), layout::MASQUERADING)
            .unwrap_or(false),
        "the table is in the kernel after the cold sync"
    );
    drop(floor_ns);

    let mut step = |world: &mut World, inputs: Vec<Input>| -> Duration {
        let t = Instant::now();
        let plan = world.track(inputs);
        let tx = render(world.fam(), &cfg, &mut committed, &plan);
        nl.apply(&tx).expect("partial transaction");
        t.elapsed()
    };
    let (samples, note) = bounded(
        "nftables endpoint changes",
        budget.changes,
        budget.changes.min(5),
        budget.time,
        |s| {
            let inputs = world.endpoint_change(s);
            step(world, inputs)
        },
    );
    out.change = Quantiles::of(samples);
    out.notes.extend(note);
    let (samples, note) = bounded(
        "nftables new Services",
        budget.adds,
        budget.adds.min(5),
        budget.time,
        |s| {
            let inputs = world.new_service(s);
            step(world, inputs)
        },
    );
    out.add = Quantiles::of(samples);
    out.notes.extend(note);
    // Correctness: the first Service and the last one added are in the kernel's service map.
    let listing = ns.sh(&format!(
        "nft list map ip {} {}",
        layout::TABLE,
        layout::SERVICE_IPS
    ));
    let added = out.add.map_or(0, |q| q.count as u32);
    for i in [0, n + added] {
        let ip = cluster::cluster_ip(i);
        assert!(
            listing.contains(&format!("{ip} . tcp . 80")),
            "Service {i} ({ip}) is in the kernel's service-ips map"
        );
    }
    out
}

fn iptables(world: &mut World, budget: Budget, floor: bool) -> ControlPlane {
    let (n, e) = (world.n, world.e);
    let cfg = ipt_config();
    let tools = Tools::new(Variant::Nft);
    let mut out = ControlPlane::default();
    let floor_ns = Netns::new(&format!("ipt-floor-{n}x{e}"));
    let ns = Netns::new(&format!("ipt-lib-{n}x{e}"));
    if floor {
        // The input ours restores on a cold start (a fresh namespace's iptables-save parsed),
        // restored from a file by the tool alone.
        let text = floor_ns.run_in(|| {
            let existing = ipt::Existing::parse(&tools.save(IpFamily::V4).expect("save"));
            let r = ipt::render(
                world.fam(),
                &cfg,
                &mut ipt::Rendered::default(),
                &SyncPlan::full(),
                Some(&existing),
            );
            r.text
        });
        let file = std::env::temp_dir().join(format!("{}.rules", floor_ns.name()));
        std::fs::write(&file, &text).expect("write the restore input");
        drop(text);
        out.floor = Some(floor_ns.run_in(|| {
            let t = Instant::now();
            let st = Command::new(restore_tool())
                .args(["-w", "5", "--noflush"])
                .arg(&file)
                .status()
                .expect("iptables-restore runs");
            assert!(st.success(), "iptables-restore of our own rules failed");
            t.elapsed()
        }));
        eprintln!(
            "   floor: {} --noflush {:?}",
            restore_tool(),
            out.floor.unwrap_or_default()
        );
        if std::env::var_os("KPR_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_file(&file);
        } else {
            eprintln!("   kept {}", file.display());
        }
    }

    ns.run_in(|| {
        let mut committed = ipt::Rendered::default();
        let t = Instant::now();
        let existing = ipt::Existing::parse(&tools.save(IpFamily::V4).expect("iptables-save"));
        let r = ipt::render(
            world.fam(),
            &cfg,
            &mut committed,
            &SyncPlan::full(),
            Some(&existing),
        );
        tools
            .restore(IpFamily::V4, &r.text)
            .expect("full iptables-restore");
        out.cold = Some(t.elapsed());
        eprintln!(
            "   cold: save + render + restore {:?}",
            out.cold.unwrap_or_default()
        );
        let full_bytes = r.text.len();
        drop(r);
        assert!(
            tools.intact(IpFamily::V4),
            "our chains are in the kernel after the cold sync"
        );
        let rules: usize = committed.rule_counts().values().sum();
        out.count = format!("{} rules", thousands(rules as u64));

        let mut bytes = Vec::new();
        let mut step = |world: &mut World, inputs: Vec<Input>, bytes: &mut Vec<usize>| {
            let t = Instant::now();
            let plan = world.track(inputs);
            let r = ipt::render(world.fam(), &cfg, &mut committed, &plan, None);
            if !r.text.is_empty() {
                tools
                    .restore(IpFamily::V4, &r.text)
                    .expect("partial iptables-restore");
            }
            let took = t.elapsed();
            bytes.push(r.text.len());
            took
        };
        let (samples, note) = bounded(
            "iptables endpoint changes",
            budget.changes,
            budget.changes.min(5),
            budget.time,
            |s| {
                let inputs = world.endpoint_change(s);
                step(world, inputs, &mut bytes)
            },
        );
        out.change = Quantiles::of(samples);
        out.notes.extend(note);
        bytes.sort_unstable();
        if let Some(b) = bytes.get(bytes.len() / 2) {
            out.restore_bytes = Some((*b, full_bytes));
        }
        let mut ignored = Vec::new();
        let (samples, note) = bounded(
            "iptables new Services",
            budget.adds,
            budget.adds.min(5),
            budget.time,
            |s| {
                let inputs = world.new_service(s);
                step(world, inputs, &mut ignored)
            },
        );
        out.add = Quantiles::of(samples);
        out.notes.extend(note);
        let added = out.add.map_or(0, |q| q.count as u32);
        let services = services_chain();
        for i in [0, n + added] {
            let vip = format!("-d {}/32", cluster::cluster_ip(i));
            assert!(
                services.iter().any(|l| l.contains(&vip)),
                "Service {i} has its rule in nat KUBE-SERVICES"
            );
        }
    });
    drop(floor_ns);
    out
}

/// The rules of nat `KUBE-SERVICES` (`iptables -S` of one chain: listing the whole table
/// takes minutes at 30,000 Services on iptables-nft). Run from inside the namespace.
fn services_chain() -> Vec<String> {
    let out = Command::new(restore_tool().replace("-restore", ""))
        .args(["-w", "5", "-t", "nat", "-S", ipt::render::SERVICES])
        .output()
        .expect("iptables runs");
    assert!(out.status.success(), "iptables -t nat -S KUBE-SERVICES");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}

/// `iptables-nft-restore` (what `Tools::new(Variant::Nft)` runs), or plain `iptables-restore`.
fn restore_tool() -> &'static str {
    let has = |t: &str| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has("iptables-nft-restore") {
        "iptables-nft-restore"
    } else {
        "iptables-restore"
    }
}

/// Installs `n` Services (`e` endpoints each; Service `target` leads to the data-plane pod)
/// into namespace `ns` the way the library's cold sync does; returns a description of where
/// the target's rule is (iptables: its position in nat `KUBE-SERVICES`).
pub(crate) fn install(mode: Mode, ns: &Netns, n: u32, e: u32, target: u32) -> String {
    install_world(mode, ns, &World::new(n, e, Some(target)), target)
}

/// [`install`] of a world built by the caller (who keeps its desired state).
pub(crate) fn install_world(mode: Mode, ns: &Netns, world: &World, target: u32) -> String {
    match mode {
        Mode::Nftables => {
            let cfg = nft_config();
            let mut nl = Netlink::in_netns(ns.name()).expect("netlink socket in the namespace");
            let mut committed = Rendered::default();
            render_cold_each(
                world.fam(),
                &cfg,
                &mut committed,
                COLD_START_MAX_OPS,
                &mut |tx| nl.apply(&tx),
            )
            .expect("install transaction");
            "verdict-map lookup".into()
        }
        Mode::Iptables => ns.run_in(|| {
            let cfg = ipt_config();
            let tools = Tools::new(Variant::Nft);
            let existing = ipt::Existing::parse(&tools.save(IpFamily::V4).expect("save"));
            let r = ipt::render(
                world.fam(),
                &cfg,
                &mut ipt::Rendered::default(),
                &SyncPlan::full(),
                Some(&existing),
            );
            tools.restore(IpFamily::V4, &r.text).expect("install");
            let vip = format!("-d {}/32", cluster::cluster_ip(target));
            let services = services_chain();
            let at = services.iter().position(|l| l.contains(&vip));
            match at {
                Some(p) => format!("rule {} of {} in nat KUBE-SERVICES", p + 1, services.len()),
                None => panic!("the target Service {vip} has no rule in nat KUBE-SERVICES"),
            }
        }),
    }
}
