//! The soak (issue 15, "no leaks under churn"): the daemon in a node namespace against the test
//! API server, driven through EndpointSlice changes and Service creations and deletions until
//! the cluster is back where it started; its memory, descriptors, threads, our kernel objects
//! and conntrack entries are compared at the end with a baseline taken after a warm-up.
//!
//! Steps: preload N permanent Services ([`world`]), start the daemon, wait for its first sync
//! (sample "cold"); a warm-up (a twentieth of the run, then the first state restored; sample
//! "baseline"); the run, in batches of random size each ending with a change the daemon must
//! program and each waited for (the daemon is paced to keep up; no latency is measured), a
//! few UDP datagrams to the UDP Services after each batch (flows conntrack cleanup must
//! delete when their endpoint goes), a sample every tenth of the changes; then the first state
//! restored, every temporary Service deleted, and sample "end". Kernel objects must equal the
//! baseline's exactly, descriptors too; memory within a stated slack ([`verdicts`]).

mod driver;
mod probe;
mod render;
mod world;

pub(crate) use render::{BEGIN, END, render};

use crate::Mode;
use crate::cluster;
use crate::netns::Netns;
use driver::{Driver, Log, Progress, QUIET, TRAFFIC_SOCKETS};
use probe::{Conntrack, Kernel, Proc};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use world::World;

/// Sizes of one soak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) n: u32,
    pub(crate) e: u32,
    /// EndpointSlice writes to the permanent Services (restoring the first state comes on top).
    pub(crate) changes: usize,
    /// Temporary Services created (and deleted).
    pub(crate) churn: usize,
    /// Samples during the run.
    pub(crate) samples: usize,
    /// Writes per batch at most (the batch size is random in 1..=this).
    pub(crate) max_batch: u32,
    /// `--quick`: correctness and exact kernel equality are asserted (a failure fails the run).
    pub(crate) assert: bool,
}

impl Plan {
    /// Issue 15's soak: 1,000 Services x 10, 100,000 changes, 10,000 creations and deletions.
    pub(crate) fn full() -> Plan {
        Plan {
            n: 1_000,
            e: 10,
            changes: 100_000,
            churn: 10_000,
            samples: 10,
            max_batch: 100,
            assert: false,
        }
    }

    /// CI's: seconds, asserting only correctness and kernel equality.
    pub(crate) fn quick() -> Plan {
        Plan {
            n: 20,
            e: 3,
            changes: 500,
            churn: 50,
            samples: 2,
            max_batch: 20,
            assert: true,
        }
    }
}

/// One sample.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) label: String,
    /// EndpointSlice changes and Service creations of the run so far.
    pub(crate) changes: usize,
    pub(crate) created: usize,
    pub(crate) live: usize,
    pub(crate) proc: Proc,
    pub(crate) kernel: Kernel,
    pub(crate) ct: Conntrack,
}

/// One resource's verdict: end against baseline.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub(crate) what: String,
    /// `None`: reported, not judged.
    pub(crate) ok: Option<bool>,
    pub(crate) rule: String,
}

/// One mode's soak.
#[derive(Debug, Clone)]
pub(crate) struct Soak {
    pub(crate) mode: Mode,
    pub(crate) plan: Plan,
    pub(crate) seed: u64,
    pub(crate) samples: Vec<Sample>,
    pub(crate) verdicts: Vec<Verdict>,
    pub(crate) warmup: Duration,
    pub(crate) run: Duration,
    pub(crate) total: Duration,
    /// EndpointSlice writes of the run: changes, then restoring the first state.
    pub(crate) changes: usize,
    pub(crate) restore: usize,
    pub(crate) created: usize,
    pub(crate) deleted: usize,
    pub(crate) batches: usize,
    /// Batches after which the daemon did not sync within the grace (nothing to program).
    pub(crate) unsynced: usize,
    pub(crate) syncs: u64,
    pub(crate) full_syncs: u64,
    pub(crate) udp_sent: u64,
    pub(crate) ct_deleted: u64,
    pub(crate) cold_equals_baseline: bool,
    pub(crate) notes: Vec<String>,
}

impl Soak {
    /// A resource was judged and grew (or the ruleset differs).
    pub(crate) fn leaked(&self) -> bool {
        self.verdicts.iter().any(|v| v.ok == Some(false))
    }
}

/// Runs one soak; panics on a correctness failure (the daemon exits or stops syncing; with
/// `plan.assert`, also when the end's kernel objects differ from the baseline's).
pub(crate) fn run(bin: &Path, mode: Mode, plan: &Plan) -> Soak {
    let started = Instant::now();
    let ns = Netns::new(&format!("soak-{}", mode.short()));
    // The node's InternalIP on a veth pair, and routes for the soak's UDP traffic to Services:
    // through a neighbour that never answers, so flows are created (and DNATed) and go nowhere.
    ns.sh(&format!(
        "ip link add kb-node type veth peer name kb-peer && ip addr add {}/24 dev kb-node \
         && ip link set kb-node up && ip link set kb-peer up \
         && ip neigh add 192.168.0.1 lladdr 02:00:00:00:00:01 dev kb-node nud permanent \
         && ip route add 172.16.0.0/16 via 192.168.0.1 dev kb-node \
         && ip route add 10.0.0.0/8 via 192.168.0.1 dev kb-node",
        cluster::NODE_IP
    ));
    let (rt, mut api) = crate::running::api_server(&ns);
    let seed = 0x5eed_0015 ^ u64::from(plan.n);
    let world = World::new(plan.n, plan.e, seed);
    api.apply(cluster::node());
    for o in world.initial() {
        api.apply(o);
    }

    let log_path = std::env::temp_dir().join(format!("{}.log", ns.name()));
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(bin)
        .args(["--master", &api.url(), "--proxy-mode", mode.flag()])
        .args(["--hostname-override", cluster::NODE])
        .args(["--cluster-cidr", "10.0.0.0/8"])
        // Every batch its own sync (the soak paces itself on them).
        .args(["--iptables-min-sync-period", "0s"])
        // /healthz on 0.0.0.0:10256 and metrics on 127.0.0.1:10249 of the node namespace.
        .args(["-v", "2"])
        .env("KPR_IPTABLES_BACKEND", "nft")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    // `ip netns exec` execs the daemon: same process.
    let pid = child.id();
    let log = Arc::new(Mutex::new(Log::default()));
    let reader = driver::read_log(&mut child, log.clone(), &log_path);
    let socks: Vec<UdpSocket> = ns.run_in(|| {
        (0..TRAFFIC_SOCKETS)
            .map(|_| UdpSocket::bind("0.0.0.0:0").expect("a UDP socket in the node namespace"))
            .collect()
    });
    let mut d = Driver {
        api: &api,
        ns: &ns,
        mode,
        pid,
        world,
        log: log.clone(),
        child: &mut child,
        socks,
        log_path: log_path.clone(),
        progress: Progress::default(),
        udp_sent: 0,
        batches: 0,
        unsynced: 0,
    };
    let mut out = Soak {
        mode,
        plan: plan.clone(),
        seed,
        samples: Vec::new(),
        verdicts: Vec::new(),
        warmup: Duration::ZERO,
        run: Duration::ZERO,
        total: Duration::ZERO,
        changes: 0,
        restore: 0,
        created: 0,
        deleted: 0,
        batches: 0,
        unsynced: 0,
        syncs: 0,
        full_syncs: 0,
        udp_sent: 0,
        ct_deleted: 0,
        cold_equals_baseline: false,
        notes: Vec::new(),
    };

    // Cold start.
    let limit = Instant::now() + Duration::from_secs(300);
    while d.log().synced == 0 {
        d.alive();
        assert!(
            Instant::now() < limit,
            "no first sync within 300 s (log: {})",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    d.quiet(QUIET, Instant::now());
    out.samples.push(d.sample("cold"));
    assert!(
        out.samples[0].kernel.canonical.len() > plan.n as usize,
        "the daemon's rules are in the kernel"
    );

    // Warm-up: a twentieth of the run, then the first state again.
    let t = Instant::now();
    d.drive(plan.changes / 20, plan.churn / 20, plan, None);
    d.restore();
    d.quiet(Duration::from_secs(1), Instant::now());
    out.warmup = t.elapsed();
    d.progress = Progress::default();
    out.samples.push(d.sample("baseline"));
    let syncs_before = d.log().synced;
    let full_before = d.log().full;
    let ct_before = d.log().ct_deleted;

    // The run.
    let t = Instant::now();
    let every = (plan.changes / plan.samples.max(1)).max(1);
    let mids = d.drive(plan.changes, plan.churn, plan, Some(every));
    out.changes = d.progress.changes;
    out.created = d.progress.created;
    out.deleted = d.progress.deleted;
    out.restore = d.restore();
    d.quiet(Duration::from_secs(1), Instant::now());
    out.run = t.elapsed();
    out.samples.extend(mids);
    let mut end = d.sample("end");
    let base = &out.samples[1];
    if end.proc.fds != base.proc.fds || end.proc.threads > base.proc.threads {
        // tokio's blocking threads (and what they hold) idle out after 10 s.
        out.notes.push(format!(
            "soak {}: at once after settling: {} fds, {} threads; re-sampled 11 s later",
            mode.flag(),
            end.proc.fds,
            end.proc.threads
        ));
        std::thread::sleep(Duration::from_secs(11));
        end = d.sample("end");
    }
    out.samples.push(end);
    {
        let l = d.log();
        out.syncs = l.synced - syncs_before;
        out.full_syncs = l.full - full_before;
        out.ct_deleted = l.ct_deleted - ct_before;
        for (at, (count, first)) in &l.problems {
            out.notes.push(format!(
                "soak {}: {count} error or warning lines from {at} in the daemon's log, the first: `{first}`",
                mode.flag(),
            ));
        }
    }
    out.batches = d.batches;
    out.unsynced = d.unsynced;
    out.udp_sent = d.udp_sent;
    d.alive();
    drop(d);

    let cold = &out.samples[0];
    let base = &out.samples[1];
    let last = out.samples.last().expect("the end sample");
    out.cold_equals_baseline = cold.kernel.canonical == base.kernel.canonical;
    if !out.cold_equals_baseline {
        out.notes.push(format!(
            "soak {}: the ruleset after the warm-up differs from the cold start's for the same cluster: {}",
            mode.flag(),
            first_differences(&cold.kernel, &base.kernel)
        ));
    }
    out.verdicts = verdicts(base, last);
    if last.kernel.canonical != base.kernel.canonical {
        out.notes.push(format!(
            "soak {}: end vs baseline: {}",
            mode.flag(),
            first_differences(&base.kernel, &last.kernel)
        ));
    }
    if last.proc.fd_kinds != base.proc.fd_kinds {
        out.notes.push(format!(
            "soak {}: descriptors by kind, baseline {:?}, end {:?}",
            mode.flag(),
            base.proc.fd_kinds,
            last.proc.fd_kinds
        ));
    }
    if plan.assert {
        assert!(
            last.kernel.counts == base.kernel.counts,
            "soak {}: kernel objects at the end {:?} differ from the baseline's {:?} (log: {})",
            mode.flag(),
            last.kernel.counts,
            base.kernel.counts,
            log_path.display()
        );
        assert!(
            last.kernel.canonical == base.kernel.canonical,
            "soak {}: the ruleset at the end differs from the baseline's: {} (log: {})",
            mode.flag(),
            first_differences(&base.kernel, &last.kernel),
            log_path.display()
        );
        assert_eq!(
            last.ct.stale,
            0,
            "soak {}: stale UDP flows left at the end",
            mode.flag()
        );
    }

    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    rt.block_on(api.stop());
    drop(ns);
    if !out.leaked() && out.notes.is_empty() && std::env::var_os("KPR_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_file(&log_path);
    } else {
        out.notes
            .push(format!("soak daemon log kept: {}", log_path.display()));
    }
    out.total = started.elapsed();
    out
}

/// End against baseline, per resource. Kernel objects and descriptors: exactly equal (fewer
/// descriptors only as many as API connections closed: the client's idle pooled one).
/// Threads and API connections: no more (tokio's blocking pool shrinks when idle, the kube
/// client's connection pool too). Memory: VmRSS and RssAnon
/// within 10% or 4 MiB of the baseline, whichever is larger (the allocator keeps freed pages
/// and fragments; a leak of 100 bytes per change would be 10 MB over 100,000 changes).
fn verdicts(base: &Sample, end: &Sample) -> Vec<Verdict> {
    let mut v = Vec::new();
    let mut judge = |what: &str, ok: Option<bool>, rule: &str| {
        v.push(Verdict {
            what: what.to_owned(),
            ok,
            rule: rule.to_owned(),
        })
    };
    for (k, b) in &base.kernel.counts {
        judge(k, Some(end.kernel.count(k) == *b), "equal");
    }
    judge(
        "ruleset (canonical listing)",
        Some(end.kernel.canonical == base.kernel.canonical),
        "identical",
    );
    let slack = |b: u64| (b / 10).max(4 * 1024);
    judge(
        "VmRSS",
        Some(end.proc.rss <= base.proc.rss + slack(base.proc.rss)),
        "<= baseline + max(10%, 4 MiB)",
    );
    judge(
        "RssAnon (heap proxy)",
        Some(end.proc.anon <= base.proc.anon + slack(base.proc.anon)),
        "<= baseline + max(10%, 4 MiB)",
    );
    judge("VmHWM", None, "reported");
    // The kube client pools an idle connection for lists and closes it after 90 s idle: one
    // fewer descriptor with one fewer API connection is not a difference of ours.
    let closed_idle = base.ct.api.saturating_sub(end.ct.api);
    judge(
        "file descriptors",
        Some(end.proc.fds <= base.proc.fds && base.proc.fds - end.proc.fds <= closed_idle),
        "equal",
    );
    judge(
        "threads",
        Some(end.proc.threads <= base.proc.threads),
        "<= baseline",
    );
    judge(
        "conntrack: the daemon's API connections",
        Some(end.ct.api <= base.ct.api),
        "<= baseline",
    );
    judge("conntrack: stale UDP flows", Some(end.ct.stale == 0), "0");
    judge("conntrack: UDP flows to Services", None, "reported");
    judge("conntrack: all entries", None, "reported");
    v
}

/// The first lines only one of two canonical rulesets has.
fn first_differences(a: &Kernel, b: &Kernel) -> String {
    let (sa, sb): (
        std::collections::BTreeSet<&String>,
        std::collections::BTreeSet<&String>,
    ) = (a.canonical.iter().collect(), b.canonical.iter().collect());
    let cut = |s: &str| s.chars().take(300).collect::<String>();
    let only_a: Vec<String> = sa.difference(&sb).take(3).map(|s| cut(s)).collect();
    let only_b: Vec<String> = sb.difference(&sa).take(3).map(|s| cut(s)).collect();
    format!(
        "{} lines only before, {} only after; before: {:?}; after: {:?}",
        sa.difference(&sb).count(),
        sb.difference(&sa).count(),
        only_a,
        only_b
    )
}
