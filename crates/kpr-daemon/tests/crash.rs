//! Crash safety (issue 15 item 3): kill -9 at random points, then a restart must converge.
//!
//! A node namespace runs `kube-proxy-rs --master URL` against the test API server (serving
//! inside that namespace), with a client pod and a server pod behind Service `default/web`,
//! plus N generated Services of E endpoints each (the addressing of `kpr-bench`'s cluster). The
//! proxy is killed with SIGKILL (its whole process group: an `iptables-restore` it runs dies
//! with it; in iptables mode, half the time the daemon alone, so the restore is orphaned and
//! finishes or fails on its own) at random moments drawn from a seeded RNG (the seed is
//! printed; `KPR_CRASH_SEED=N` repeats a run):
//!
//! - **cold**: a start with no rules of ours in the kernel, killed before its first write,
//!   while it writes (a random part of the write window after `nft monitor` sees our table
//!   added, or after an `iptables-restore` child appears; the window is measured by the
//!   reference start and bounded by the last full sync), or just after its first sync;
//! - **burst**: a running proxy, killed in the middle of a burst of EndpointSlice updates and
//!   Service creations and deletions (whatever was not sent yet is sent while it is down);
//! - **restart**: an idle proxy killed (an unclean stop), objects changed while it is down,
//!   then the new process killed again during its first (full) sync.
//!
//! After every kill the kernel is read (`nft list ruleset`, or `iptables-save` and
//! `ip6tables-save` of the back end used) and must be a state a writer that only commits whole
//! transactions can leave: nftables' cold start is a series of bounded transactions, so the
//! table must be a prefix of them (every object there is complete, service ports' chains
//! exist for a prefix of the ports in name order, endpoint elements only once every chain
//! exists, verdict elements only once every endpoint element exists); otherwise each table
//! (nftables: per family; iptables: per family and table, each `COMMIT` is atomic) must
//! equal that table whole in a state the proxy could have committed (restart: the old or the
//! new; burst: the objects after some prefix of the Service events and some prefix of the
//! EndpointSlice events, two watches). Then the proxy is started again and, after its
//! first sync, the kernel's rules must equal the **reference**: what one clean start of the
//! same binary, against an API server holding the same objects, writes in a fresh namespace
//! (compared object by object: chains rule by rule in order, sets and maps element by element;
//! counters, handles and the kernel's element order ignored). Real TCP through `web` (and
//! through a Service created in the last burst) must reach the server pod; a Service deleted
//! meanwhile must not answer. The restarted proxy must not log a failed sync.
//!
//! `cargo test -p kpr-daemon --test crash` runs CI sizes (nftables 1,000 x 10, iptables 200
//! x 10, a few kills each). The full run, 10,000 Services x 10 endpoints in nftables mode
//! (1,000 x 10 in iptables mode: a restore of 10,000 x 10 takes minutes there, see
//! docs/benchmarks.md) and many kills, is:
//! `sudo KPR_CRASH_FULL=1 cargo test --release -p kpr-daemon --test crash -- --nocapture --test-threads 1`.
//! Root only (network namespaces); otherwise each test prints SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_apiserver::{ApiServer, Kind, Options};
use kpr_testkit::lab::{Lab, Reply};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[test]
fn nftables_kill_9_at_random_points_then_restart_converges() {
    campaign(Mode::Nftables);
}

#[test]
fn iptables_kill_9_during_restore_and_unclean_stops_converge() {
    campaign(Mode::Iptables);
}

#[test]
fn iptables_legacy_kill_9_during_restore_converges() {
    campaign(Mode::Legacy);
}

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");
const NODE_IP: &str = "192.168.0.2";
const WEB_IP: &str = "172.30.0.10";
const POD_IP: &str = "10.0.0.11";
const CLIENT_IP: &str = "10.0.0.5";
/// How long a start may take to its first sync before the test gives up.
const FIRST_SYNC_LIMIT: Duration = Duration::from_secs(180);

/// One test at a time: each starts many processes and kernel tables.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nftables,
    /// iptables mode on iptables-nft.
    Iptables,
    /// iptables mode on iptables-legacy.
    Legacy,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables | Mode::Legacy => "iptables",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables-nft",
            Mode::Legacy => "iptables-legacy",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Mode::Nftables => "nft",
            Mode::Iptables => "ipt",
            Mode::Legacy => "leg",
        }
    }

    /// `KPR_IPTABLES_BACKEND` for the proxy (the reference namespace must pick the same).
    fn backend(self) -> Option<&'static str> {
        match self {
            Mode::Nftables => None,
            Mode::Iptables => Some("nft"),
            Mode::Legacy => Some("legacy"),
        }
    }
}

/// Sizes and kill counts of one campaign.
#[derive(Debug, Clone, Copy)]
struct Plan {
    services: u32,
    endpoints: u32,
    cold: usize,
    burst: usize,
    restarts: usize,
    /// Events per burst.
    burst_events: usize,
    /// How many EndpointSlice events the proxy may be behind at a kill (candidates tried).
    max_lag: usize,
}

impl Plan {
    fn of(mode: Mode, full: bool) -> Plan {
        let (services, cold, burst, restarts) = match (mode, full) {
            (Mode::Nftables, false) => (1_000, 3, 3, 2),
            (Mode::Nftables, true) => (10_000, 16, 12, 6),
            (_, false) => (200, 2, 2, 1),
            (_, true) => (1_000, 8, 6, 4),
        };
        Plan {
            services,
            endpoints: 10,
            cold,
            burst,
            restarts,
            burst_events: if full { 60 } else { 30 },
            max_lag: 10,
        }
    }
}

fn campaign(mode: Mode) {
    let full = std::env::var("KPR_CRASH_FULL").is_ok_and(|v| v == "1");
    let plan = Plan::of(mode, full);
    let seed = std::env::var("KPR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut w) = World::new(mode, plan, seed) else {
        return;
    };
    eprintln!(
        "crash {}: seed {seed} (KPR_CRASH_SEED={seed} repeats it); {} Services x {} endpoints; {} cold, {} burst, {} restart kills",
        mode.name(),
        plan.services,
        plan.endpoints,
        plan.cold,
        plan.burst,
        plan.restarts
    );
    let started = Instant::now();
    let initial = w.objects.clone();
    let r0 = w.reference(&initial);
    eprintln!(
        "crash {}: reference clean start: first sync {:?} after spawn (the sync itself {:?}), first kernel write {:?} after spawn",
        mode.name(),
        w.cold_timing.0,
        w.cold_timing.1,
        w.cold_timing.2
    );
    for round in 0..plan.cold {
        w.cold_round(round, &r0);
    }
    drop(r0);
    for round in 0..plan.burst {
        w.burst_round(round);
    }
    for round in 0..plan.restarts {
        w.restart_round(round);
    }
    w.report(started.elapsed());
}

/// What one kill did, for the report.
#[derive(Debug)]
struct Record {
    round: String,
    delay: Duration,
    landed: String,
    /// Restart: spawn to first sync, and that sync's own duration.
    converge: (Duration, Duration),
}

/// Everything one campaign owns.
struct World {
    mode: Mode,
    plan: Plan,
    rng: Rng,
    /// Drop order: the daemon, the API server, then the lab (namespaces).
    daemon: Option<Daemon>,
    api: ApiServer,
    rt: tokio::runtime::Runtime,
    lab: Lab,
    node: String,
    client: String,
    dir: tempfile::TempDir,
    runs: usize,
    /// What the API server holds, by `Kind/namespace/name`.
    objects: BTreeMap<String, Value>,
    /// Slice generation per bench Service (each update moves one endpoint).
    generation: HashMap<u32, u32>,
    /// Services created by bursts (`default/cN`), and the serial of the next one.
    created: u32,
    deleted: Vec<(String, String)>,
    /// Reference snapshots by digest of the objects.
    refs: HashMap<u64, Rc<Snapshot>>,
    refs_made: usize,
    /// The reference's cold start: spawn to first sync, the sync's own duration, spawn to
    /// its first kernel write.
    cold_timing: (Duration, Duration, Duration),
    /// The last restart's timing (the window of a restart kill).
    restart_timing: (Duration, Duration),
    /// The longest pause between two events of a burst: about twice a partial sync, so the
    /// proxy is at most a few events behind when it is killed.
    burst_gap: Duration,
    records: Vec<Record>,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs: Vec<PathBuf> = (0..self.runs)
                .map(|n| self.dir.path().join(format!("proxy-{n}.log")))
                .collect();
            if let Some(last) = logs.last() {
                let text = std::fs::read_to_string(last).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!(
                    "--- last proxy log ({}), last lines ---\n{}",
                    last.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if std::env::var_os("KPR_CRASH_KEEP").is_some() {
                let kept = self.dir.path().to_owned();
                eprintln!("logs kept in {}", kept.display());
                std::mem::forget(std::mem::replace(
                    &mut self.dir,
                    tempfile::tempdir().unwrap(),
                ));
            }
        }
        self.daemon = None;
        self.rt.block_on(self.api.stop());
    }
}

impl World {
    fn new(mode: Mode, plan: Plan, seed: u64) -> Option<World> {
        let mut lab = Lab::new(&format!("crash-{}", mode.short()))?;
        let node = lab.netns("node");
        prepare_node(&lab, &node);
        let client = pod(&mut lab, &node, "client", CLIENT_IP, false);
        pod(&mut lab, &node, "pod1", POD_IP, true);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = rt
            .block_on(ApiServer::start(Options {
                netns: Some(node.clone()),
                ..Default::default()
            }))
            .unwrap();
        let mut objects = BTreeMap::new();
        let mut add = |v: Value| {
            objects.insert(key_of(&v), v);
        };
        add(node_object());
        add(service("default", "web", WEB_IP));
        add(pod_slice("default", "web"));
        for i in 0..plan.services {
            add(bench_service(i));
            add(bench_slice(i, plan.endpoints, 0));
        }
        for v in objects.values() {
            api.apply(v.clone());
        }
        Some(World {
            mode,
            plan,
            rng: Rng(seed),
            daemon: None,
            api,
            rt,
            lab,
            node,
            client,
            dir: tempfile::tempdir().unwrap(),
            runs: 0,
            objects,
            generation: HashMap::new(),
            created: 0,
            deleted: Vec::new(),
            refs: HashMap::new(),
            refs_made: 0,
            cold_timing: Default::default(),
            restart_timing: Default::default(),
            burst_gap: Duration::from_millis(if mode == Mode::Nftables { 20 } else { 100 }),
            records: Vec::new(),
        })
    }

    fn spawn(&mut self) -> Daemon {
        let log = self.dir.path().join(format!("proxy-{}.log", self.runs));
        self.runs += 1;
        Daemon::spawn(&self.node, self.mode, &self.api.url(), &log)
    }

    fn snapshot(&self, ns: &str) -> Snapshot {
        snapshot(&self.lab, ns, self.mode)
    }

    /// Kills the running proxy (if any) with its process group.
    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill(true);
        }
    }

    /// One kill during a cold start, then a restart.
    fn cold_round(&mut self, round: usize, full: &Snapshot) {
        self.stop();
        self.clean_kernel();
        // Mostly while the first sync writes the kernel (from its first write, seen by `nft
        // monitor` or as an `iptables-restore` child, plus a random part of the write window
        // measured by the reference start); some before any write, some just after the sync.
        // The reference start's window may be long (it ran with `nft monitor` attached); a
        // full sync of the same size (the last restart's) bounds it.
        let (t, _, first_write) = self.cold_timing;
        let window = t.saturating_sub(first_write).min(self.restart_timing.1);
        let u = self.rng.unit();
        let (when, wait) = if u < 0.15 {
            ("before writing", first_write.mul_f64(self.rng.unit()))
        } else if u < 0.85 {
            ("while writing", window.mul_f64(self.rng.unit()))
        } else {
            (
                "after the sync",
                Duration::from_millis(300).mul_f64(self.rng.unit()),
            )
        };
        let monitor = (self.mode == Mode::Nftables && when == "while writing")
            .then(|| TableMonitor::start(&self.node));
        let group = self.mode == Mode::Nftables || self.rng.chance(0.5);
        let mut d = self.spawn();
        match when {
            "before writing" => sleep_until(d.spawned + wait),
            "while writing" => {
                d.wait_until(|d| {
                    d.syncs() > 0
                        || match &monitor {
                            Some(m) => m.seen().is_some(),
                            None => children_of(d.pid())
                                .iter()
                                .any(|(_, c)| c.contains("restore")),
                        }
                });
                std::thread::sleep(wait);
            }
            _ => {
                d.wait_until(|d| d.syncs() > 0);
                std::thread::sleep(wait);
            }
        }
        let delay = d.spawned.elapsed();
        let synced = d.syncs();
        let kids = d.kill(group);
        if let Some(m) = monitor {
            m.stop();
        }
        let k = self.snapshot(&self.node.clone());
        let state = match self.mode {
            Mode::Nftables => cold_prefix(&k, full),
            _ => whole_tables(&k, &[("new", full)], true),
        }
        .unwrap_or_else(|e| {
            panic!(
                "cold round {round}: killed {delay:?} after spawn: half-written kernel state: {e}"
            )
        });
        let landed = format!(
            "aimed {when} (+{:.1} ms), {}; {state}",
            wait.as_secs_f64() * 1e3,
            landing(synced, &kids, group)
        );
        self.restart_and_converge(format!("cold {round}"), delay, landed);
    }

    /// One kill in the middle of a burst of changes, then a restart.
    fn burst_round(&mut self, round: usize) {
        assert!(self.daemon.is_some(), "a proxy runs before a burst");
        let before = self.objects.clone();
        let events = self.events(self.plan.burst_events);
        let kill_after = 1 + self.rng.below(events.len() as u64) as usize;
        let gap = self.burst_gap.as_millis() as u64;
        let mut delay = Duration::ZERO;
        let burst = Instant::now();
        let (mut synced, mut kids) = (0, Vec::new());
        for (n, e) in events.iter().enumerate() {
            e.send(&self.api);
            e.apply_to(&mut self.objects);
            if n + 1 == kill_after {
                std::thread::sleep(Duration::from_millis(self.rng.below(gap)));
                delay = burst.elapsed();
                let d = self.daemon.as_mut().unwrap();
                synced = d.syncs();
                kids = d.kill(true);
                if let Some(partial) = d.partial_sync_median() {
                    self.burst_gap =
                        (partial * 2).clamp(Duration::from_millis(20), Duration::from_millis(1000));
                }
                self.daemon = None;
                break;
            }
            std::thread::sleep(Duration::from_millis(self.rng.below(gap)));
        }
        let k = self.snapshot(&self.node.clone());
        let state = self
            .match_burst(&k, &before, &events[..kill_after])
            .unwrap_or_else(|e| {
                panic!("burst round {round}: killed after event {kill_after} of {}: half-written kernel state: {e}", events.len())
            });
        // What was not sent yet happens while the proxy is down.
        for e in &events[kill_after..] {
            e.send(&self.api);
            e.apply_to(&mut self.objects);
        }
        let landed = format!(
            "{}; event {kill_after}/{}; {state}",
            landing(synced, &kids, true),
            events.len()
        );
        self.restart_and_converge(format!("burst {round}"), delay, landed);
    }

    /// An unclean stop of an idle proxy, changes while it is down, a kill during the new
    /// process's first sync, then a restart.
    fn restart_round(&mut self, round: usize) {
        self.stop();
        let idle = self.snapshot(&self.node.clone());
        let expected = self.reference(&self.objects.clone());
        if let Some(diff) = differences(&idle, &expected) {
            panic!(
                "restart round {round}: an idle proxy killed left other rules than it wrote: {diff}"
            );
        }
        let count = 2 + self.rng.below(6) as usize;
        for e in self.events(count) {
            e.send(&self.api);
            e.apply_to(&mut self.objects);
        }
        let new = self.reference(&self.objects.clone());
        let (t, s) = self.restart_timing;
        let window_start = t.saturating_sub(s);
        let delay = if self.rng.chance(0.7) {
            window_start + s.mul_f64(self.rng.unit())
        } else {
            window_start.mul_f64(self.rng.unit())
        };
        let group = self.mode == Mode::Nftables || self.rng.chance(0.5);
        let mut d = self.spawn();
        sleep_until(d.spawned + delay);
        let synced = d.syncs();
        let kids = d.kill(group);
        let k = self.snapshot(&self.node.clone());
        let state = whole_tables(&k, &[("old", &idle), ("new", &new)], false)
            .unwrap_or_else(|e| {
                panic!("restart round {round}: killed {delay:?} after spawn: half-written kernel state: {e}")
            });
        let landed = format!(
            "{}; {count} changes; {state}",
            landing(synced, &kids, group)
        );
        self.restart_and_converge(format!("restart {round}"), delay, landed);
    }

    /// Starts the proxy, waits for its first sync, and checks the kernel and traffic.
    fn restart_and_converge(&mut self, round: String, delay: Duration, landed: String) {
        let mut d = self.spawn();
        let (first, elapsed) = d.wait_first_sync();
        self.restart_timing = (first, elapsed);
        let k = self.snapshot(&self.node.clone());
        let failed: Vec<String> = d
            .log()
            .lines()
            .filter(|l| l.contains("Sync failed"))
            .map(str::to_owned)
            .collect();
        self.daemon = Some(d);
        let reference = self.reference(&self.objects.clone());
        if let Some(diff) = differences(&k, &reference) {
            panic!(
                "{round} (killed {delay:?} in; {landed}): after the restart's first sync the kernel differs from a clean start's: {diff}"
            );
        }
        assert!(
            failed.is_empty(),
            "{round}: the restarted proxy logged failed syncs: {failed:?}"
        );
        self.check_traffic(&round);
        eprintln!(
            "crash {} {round}: killed {delay:?} in: {landed}; restart: first sync {first:?} after spawn (sync {elapsed:?}), kernel == reference, traffic ok",
            self.mode.name()
        );
        self.records.push(Record {
            round,
            delay,
            landed,
            converge: (first, elapsed),
        });
    }

    fn check_traffic(&mut self, round: &str) {
        let who = |r: &Reply| match r {
            Reply::Ok(line) => line.split_whitespace().next().unwrap_or("").to_owned(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            who(&self.lab.tcp(&self.client, WEB_IP, 80)),
            "pod1",
            "{round}: traffic to default/web after the restart"
        );
        let alive: Vec<String> = self
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix("Service/default/c"))
            .filter(|n| {
                self.objects
                    .contains_key(&format!("EndpointSlice/default/c{n}-1"))
            })
            .map(|n| format!("c{n}"))
            .collect();
        if let Some(name) = alive.last() {
            let ip = self.objects[&format!("Service/default/{name}")]["spec"]["clusterIP"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(
                who(&self.lab.tcp(&self.client, &ip, 80)),
                "pod1",
                "{round}: traffic to default/{name} ({ip}), created by a burst"
            );
        }
        if let Some((name, ip)) = self.deleted.last() {
            let reply = self.lab.tcp(&self.client, ip, 80);
            assert!(
                !matches!(reply, Reply::Ok(_)),
                "{round}: default/{name} ({ip}) was deleted but answers: {reply:?}"
            );
        }
    }

    /// Removes every rule in the node namespace (ours: the test created it).
    fn clean_kernel(&self) {
        let script = match self.mode {
            Mode::Nftables | Mode::Iptables => "nft flush ruleset".to_owned(),
            Mode::Legacy => {
                let mut s = String::new();
                for tool in ["iptables-legacy", "ip6tables-legacy"] {
                    for table in ["filter", "nat", "mangle"] {
                        s.push_str(&format!("{tool} -t {table} -F; {tool} -t {table} -X; "));
                    }
                }
                s.push_str("true");
                s
            }
        };
        self.lab.sh(&self.node, &script);
        let k = self.snapshot(&self.node);
        assert!(k.values().all(pristine), "rules left after cleaning: {k:?}");
    }

    /// The kernel's rules after one clean start against the same objects in a fresh namespace
    /// (cached per object set).
    fn reference(&mut self, objects: &BTreeMap<String, Value>) -> Rc<Snapshot> {
        let digest = digest(objects);
        if let Some(s) = self.refs.get(&digest) {
            return s.clone();
        }
        let n = self.refs_made;
        self.refs_made += 1;
        let guard = RefNs::new(&format!("{}-ref{n}x", self.lab.prefix()));
        let ns = guard.0.as_str();
        prepare_node(&self.lab, ns);
        let mut api = self
            .rt
            .block_on(ApiServer::start(Options {
                netns: Some(ns.to_owned()),
                ..Default::default()
            }))
            .unwrap();
        for v in objects.values() {
            api.apply(v.clone());
        }
        let log = self.dir.path().join(format!("ref-{n}.log"));
        // The first reference is a cold start: find when its first kernel write begins
        // (nftables: `nft monitor` sees our table added; iptables: an `iptables-restore`
        // runs).
        let monitor = (n == 0 && self.mode == Mode::Nftables).then(|| TableMonitor::start(ns));
        let mut d = Daemon::spawn(ns, self.mode, &api.url(), &log);
        if n == 0 {
            let (first, elapsed, restore) = d.wait_first_sync_probing(|pid| {
                monitor.is_none() && children_of(pid).iter().any(|(_, c)| c.contains("restore"))
            });
            let writes = match monitor {
                Some(m) => m.stop().map(|at| at.saturating_duration_since(d.spawned)),
                None => restore,
            };
            self.cold_timing = (
                first,
                elapsed,
                writes.unwrap_or(first.saturating_sub(elapsed)),
            );
            self.restart_timing = (first, elapsed);
        } else {
            d.wait_first_sync();
        }
        let snap = Rc::new(self.snapshot(ns));
        d.kill(true);
        drop(d);
        self.rt.block_on(api.stop());
        drop(api);
        if self.refs.len() >= 8 {
            self.refs.clear();
        }
        self.refs.insert(digest, snap.clone());
        snap
    }

    /// `count` random changes, computed against the objects as they will be when sent in
    /// order: EndpointSlice updates, EndpointSlice deletions, Service deletions, and Services
    /// created (then their slice) and deleted (with their slice) again.
    fn events(&mut self, count: usize) -> Vec<Event> {
        let mut projected = self.objects.clone();
        let mut out = Vec::new();
        let e = self.plan.endpoints;
        while out.len() < count {
            let roll = self.rng.below(100);
            let i = self.rng.below(u64::from(self.plan.services)) as u32;
            let bench_svc = format!("Service/bench/{}", bench_name(i));
            let bench_eps = format!("EndpointSlice/bench/{}-a", bench_name(i));
            let ev = if roll < 45 {
                if !projected.contains_key(&bench_eps) {
                    continue;
                }
                let g = self.generation.entry(i).or_default();
                *g += 1;
                vec![Event::Apply(bench_slice(i, e, *g))]
            } else if roll < 60 {
                let n = self.created;
                self.created += 1;
                let name = format!("c{n}");
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 1, 0)) + 1 + n);
                vec![
                    Event::Apply(service("default", &name, &ip.to_string())),
                    Event::Apply(pod_slice("default", &name)),
                ]
            } else if roll < 70 {
                if !projected.contains_key(&bench_svc) {
                    continue;
                }
                vec![Event::Delete(Kind::Service, "bench".into(), bench_name(i))]
            } else if roll < 80 {
                if !projected.contains_key(&bench_eps) {
                    continue;
                }
                vec![Event::Delete(
                    Kind::EndpointSlice,
                    "bench".into(),
                    format!("{}-a", bench_name(i)),
                )]
            } else {
                let created: Vec<String> = projected
                    .keys()
                    .filter_map(|k| k.strip_prefix("Service/default/c"))
                    .map(|n| format!("c{n}"))
                    .collect();
                if created.is_empty() {
                    continue;
                }
                let name = created[self.rng.below(created.len() as u64) as usize].clone();
                let ip = projected[&format!("Service/default/{name}")]["spec"]["clusterIP"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                self.deleted.push((name.clone(), ip));
                vec![
                    Event::Delete(Kind::Service, "default".into(), name.clone()),
                    Event::Delete(Kind::EndpointSlice, "default".into(), format!("{name}-1")),
                ]
            };
            for ev in ev {
                ev.apply_to(&mut projected);
                out.push(ev);
            }
        }
        out
    }

    /// The kernel after a kill during a burst: each table must equal that of the objects after
    /// some prefix of the Service events and some prefix of the EndpointSlice events (two
    /// watches: the proxy may have seen more of one than of the other). The Services in the
    /// kernel say how many Service events were synced; EndpointSlice prefixes are tried from
    /// the newest back, up to `max_lag` events behind.
    fn match_burst(
        &mut self,
        k: &Snapshot,
        before: &BTreeMap<String, Value>,
        sent: &[Event],
    ) -> Result<String, String> {
        let services: Vec<&Event> = sent.iter().filter(|e| e.is_service()).collect();
        let slices: Vec<&Event> = sent.iter().filter(|e| !e.is_service()).collect();
        let touched: BTreeSet<String> = services.iter().map(|e| e.service_name()).collect();
        let in_kernel: BTreeSet<String> =
            comment_names(k).intersection(&touched).cloned().collect();
        let prefix = |i: usize, j: usize| {
            let mut o = before.clone();
            for e in services[..i].iter().chain(&slices[..j]) {
                e.apply_to(&mut o);
            }
            o
        };
        let present = |o: &BTreeMap<String, Value>| -> BTreeSet<String> {
            touched
                .iter()
                .filter(|n| o.contains_key(&format!("Service/{n}")))
                .cloned()
                .collect()
        };
        let svc_prefixes: Vec<usize> = (0..=services.len())
            .rev()
            .filter(|&i| present(&prefix(i, 0)) == in_kernel)
            .collect();
        if svc_prefixes.is_empty() {
            return Err(format!(
                "the touched Services in the kernel ({in_kernel:?}) are those of no prefix of the {} Service events",
                services.len()
            ));
        }
        let mut unmatched: BTreeSet<String> = k.keys().cloned().collect();
        // Per candidate (i, j): the tables found equal to its.
        let mut found: BTreeMap<(usize, usize), Vec<String>> = BTreeMap::new();
        let mut tried = 0;
        'search: for &i in &svc_prefixes {
            for j in (slices.len().saturating_sub(self.plan.max_lag)..=slices.len()).rev() {
                let candidate = self.reference(&prefix(i, j));
                tried += 1;
                let matched: Vec<String> = unmatched
                    .iter()
                    .filter(|t| k.get(*t) == candidate.get(*t))
                    .cloned()
                    .collect();
                for t in matched {
                    unmatched.remove(&t);
                    found.entry((i, j)).or_default().push(t);
                }
                // A table the candidate lacks but the kernel has (or the reverse) never
                // matches; tables only in the candidate are not in `unmatched`.
                if unmatched.is_empty() && candidate.keys().all(|t| k.contains_key(t)) {
                    break 'search;
                }
            }
        }
        if !unmatched.is_empty() {
            return Err(format!(
                "tables {unmatched:?} equal none of {tried} candidate states (Service prefixes {svc_prefixes:?}, the last {} slice prefixes)",
                self.plan.max_lag + 1
            ));
        }
        Ok(found
            .iter()
            .rev()
            .map(|((i, j), tables)| {
                format!(
                    "{} = after Service events {i}/{} and slice events {j}/{}",
                    tables.join(", "),
                    services.len(),
                    slices.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; "))
    }

    fn report(&self, took: Duration) {
        let mut firsts: Vec<Duration> = self.records.iter().map(|r| r.converge.0).collect();
        firsts.sort();
        let median = firsts.get(firsts.len() / 2).copied().unwrap_or_default();
        let max = firsts.last().copied().unwrap_or_default();
        let syncs: Vec<Duration> = self.records.iter().map(|r| r.converge.1).collect();
        let mut out = format!(
            "crash {}: {} Services x {}: {} kills in {took:?}, every restart converged to the reference and passed traffic\n  restart to first sync: median {median:?}, max {max:?}; first sync itself: max {:?}\n",
            self.mode.name(),
            self.plan.services,
            self.plan.endpoints,
            self.records.len(),
            syncs.iter().max().copied().unwrap_or_default()
        );
        for r in &self.records {
            out.push_str(&format!(
                "  {:<10} killed {:>8.1} ms in: {}; converged {:.1} ms (sync {:.1} ms)\n",
                r.round,
                r.delay.as_secs_f64() * 1e3,
                r.landed,
                r.converge.0.as_secs_f64() * 1e3,
                r.converge.1.as_secs_f64() * 1e3
            ));
        }
        eprintln!("{out}");
    }
}

// ---------------------------------------------------------------------------------------
// The proxy process.

struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    spawned: Instant,
}

impl Daemon {
    /// `kube-proxy-rs` inside `ns`, in a process group of its own (so a kill can take its
    /// `iptables-restore` with it), logging to `log`.
    fn spawn(ns: &str, mode: Mode, url: &str, log: &Path) -> Daemon {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN, "--master", url])
            .args(["--proxy-mode", mode.flag()])
            .args(["--hostname-override", "node-a"])
            .args(["--cluster-cidr", "10.0.0.0/8"])
            .args(["--iptables-min-sync-period", "0s", "-v", "2"]);
        if let Some(b) = mode.backend() {
            cmd.env("KPR_IPTABLES_BACKEND", b);
        }
        let stderr = std::fs::File::create(log).unwrap();
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            log: log.to_owned(),
            spawned: Instant::now(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `ready` every millisecond (bounded; the process must stay alive).
    fn wait_until(&mut self, mut ready: impl FnMut(&Daemon) -> bool) {
        while !ready(self) {
            let child = self.child.as_mut().unwrap();
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the proxy exited ({status}):\n{}", self.log());
            }
            assert!(
                self.spawned.elapsed() < FIRST_SYNC_LIMIT,
                "waited {FIRST_SYNC_LIMIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn syncs(&self) -> usize {
        self.log().matches("] Synced ").count()
    }

    /// The median duration of the partial syncs logged so far.
    fn partial_sync_median(&self) -> Option<Duration> {
        let mut us: Vec<u64> = self
            .log()
            .lines()
            .filter(|l| l.contains("] Synced ") && l.contains(" full=false"))
            .filter_map(|l| field(l, "elapsed_us"))
            .collect();
        us.sort_unstable();
        us.get(us.len() / 2).map(|u| Duration::from_micros(*u))
    }

    /// Waits for the first sync: (spawn to its log line, the sync's own `elapsed_us`).
    fn wait_first_sync(&mut self) -> (Duration, Duration) {
        let (at, elapsed, _) = self.wait_first_sync_probing(|_| false);
        (at, elapsed)
    }

    /// [`Daemon::wait_first_sync`], and when `probe(pid)` first held (checked in between).
    fn wait_first_sync_probing(
        &mut self,
        mut probe: impl FnMut(u32) -> bool,
    ) -> (Duration, Duration, Option<Duration>) {
        let mut seen = None;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains("] Synced ")) {
                let at = self.spawned.elapsed();
                let us = field(line, "elapsed_us").unwrap_or(0);
                return (at, Duration::from_micros(us), seen);
            }
            let child = self.child.as_mut().unwrap();
            if seen.is_none() && probe(child.id()) {
                seen = Some(self.spawned.elapsed());
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the proxy exited ({status}) before its first sync:\n{log}");
            }
            assert!(
                self.spawned.elapsed() < FIRST_SYNC_LIMIT,
                "no first sync within {FIRST_SYNC_LIMIT:?}:\n{log}"
            );
            if seen.is_none() {
                continue;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL to the process group (`group`) or the daemon alone; returns the children it
    /// had (their names) and waits until they are gone (an orphaned `iptables-restore` reads
    /// the end of its input and exits).
    fn kill(&mut self, group: bool) -> Vec<String> {
        let Some(mut child) = self.child.take() else {
            return Vec::new();
        };
        let pid = child.id();
        let kids = children_of(pid);
        let target = if group {
            format!("-{pid}")
        } else {
            pid.to_string()
        };
        let _ = Command::new("kill").args(["-KILL", "--", &target]).status();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        for (kid, _) in &kids {
            while running(*kid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        kids.into_iter().map(|(_, name)| name).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill(true);
    }
}

/// `nft monitor tables` in a namespace: when our IPv4 table was first added (a start first
/// removes upstream's `kube-proxy` tables, which shows as adding and deleting them).
struct TableMonitor {
    child: Child,
    seen: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    reader: std::thread::JoinHandle<()>,
}

impl TableMonitor {
    fn start(ns: &str) -> TableMonitor {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "monitor", "tables"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                let added = std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .any(|l| l.trim() == "add table ip kube-proxy-rs");
                if added {
                    *seen.lock().unwrap() = Some(Instant::now());
                }
            })
        };
        // Subscribed before anything is written.
        std::thread::sleep(Duration::from_millis(200));
        TableMonitor {
            child,
            seen,
            reader,
        }
    }

    fn seen(&self) -> Option<Instant> {
        *self.seen.lock().unwrap()
    }

    fn stop(mut self) -> Option<Instant> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let seen = self.seen.clone();
        let _ = self.reader.join();
        *seen.lock().unwrap()
    }
}

/// The processes whose parent is `pid`: (pid, command name).
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            // argv[0]'s file name: `comm` is cut at 15 characters (`iptables-legacy` is both
            // the save and the restore).
            let argv0 = std::fs::read(format!("/proc/{p}/cmdline"))
                .ok()
                .and_then(|c| {
                    let first = c.split(|b| *b == 0).next()?.to_vec();
                    let first = String::from_utf8(first).ok()?;
                    Some(first.rsplit('/').next()?.to_owned())
                })
                .filter(|a| !a.is_empty());
            out.push((p, argv0.unwrap_or_else(|| stat[open + 1..close].to_owned())));
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|c| s[c + 2..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Where a kill landed, as far as the process tells: syncs logged, children running.
fn landing(synced: usize, kids: &[String], group: bool) -> String {
    let who = if group { "group" } else { "daemon only" };
    match (synced, kids.is_empty()) {
        (0, true) => format!("SIGKILL ({who}) before the first sync was logged"),
        (n, true) => format!("SIGKILL ({who}) after {n} logged syncs"),
        (n, false) => format!(
            "SIGKILL ({who}) after {n} logged syncs, while running {}",
            kids.join(",")
        ),
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// `key=123` in a klog line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------
// Namespaces and pods.

/// A reference namespace (named with the lab's prefix), removed when dropped.
struct RefNs(String);

impl RefNs {
    fn new(name: &str) -> RefNs {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let ns = RefNs(name.to_owned());
        let up = Command::new("ip")
            .args(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        ns
    }
}

impl Drop for RefNs {
    fn drop(&mut self) {
        kpr_testkit::lab::remove_namespaces(&self.0);
    }
}

/// What a node namespace has that the rules may depend on: `lo`, the node IP on an
/// interface, forwarding on.
fn prepare_node(lab: &Lab, ns: &str) {
    lab.sh(
        ns,
        &format!("sysctl -qw net.ipv4.ip_forward=1 && ip link add kc-node type veth peer name kc-peer && ip addr add {NODE_IP}/24 dev kc-node && ip link set kc-node up && ip link set kc-peer up"),
    );
}

/// A pod namespace with `ip`, routed via the node; `serve`: answers TCP 8080 with
/// `<name> <peer>`.
fn pod(lab: &mut Lab, node: &str, name: &str, ip: &str, serve: bool) -> String {
    let ns = lab.netns(name);
    let (host, dev) = lab.link(node, &ns);
    lab.sh(&ns, &format!("ip addr add {ip}/32 dev {dev} && ip route add 10.0.0.1 dev {dev} scope link && ip route add default via 10.0.0.1 dev {dev}"));
    lab.sh(
        node,
        &format!("ip addr add 10.0.0.1/32 dev {host} 2>/dev/null; ip route add {ip}/32 dev {host}"),
    );
    if serve {
        let reply = format!("SYSTEM:'echo {name} $SOCAT_PEERADDR'");
        lab.spawn(
            &ns,
            &[
                "sh",
                "-c",
                &format!("socat -t5 TCP4-LISTEN:8080,fork,reuseaddr {reply}"),
            ],
        );
        Lab::wait_for("the pod's server", Duration::from_secs(5), || {
            lab.sh(&ns, "ss -ltn").contains(":8080")
        });
    }
    ns
}

// ---------------------------------------------------------------------------------------
// Objects (the addressing of kpr-bench's cluster: Service i is bench/s<i>, ClusterIP
// 172.16.0.0 + 1 + i, endpoints 10.64.0.0 + 16 i + offset, every other one on this node).

fn node_object() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "spec": {"podCIDR": "10.0.0.0/24", "podCIDRs": ["10.0.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    })
}

fn bench_name(i: u32) -> String {
    format!("s{i:06}")
}

fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn bench_service(i: u32) -> Value {
    let ip = Ipv4Addr::from(0xAC10_0000u32 + 1 + i).to_string();
    service("bench", &bench_name(i), &ip)
}

/// Service `i`'s slice; each generation moves endpoint 0.
fn bench_slice(i: u32, e: u32, generation: u32) -> Value {
    let endpoints: Vec<Value> = (0..e)
        .map(|k| {
            let offset = if k == 0 { generation % 6 } else { 5 + k };
            let ip = Ipv4Addr::from(0x0A40_0000u32 + i * 16 + offset);
            endpoint(
                &ip.to_string(),
                if k % 2 == 0 { "node-a" } else { "node-b" },
            )
        })
        .collect();
    slice("bench", &bench_name(i), "a", endpoints)
}

/// The server pod as the only endpoint of `ns/name`.
fn pod_slice(ns: &str, name: &str) -> Value {
    slice(ns, name, "1", vec![endpoint(POD_IP, "node-a")])
}

fn endpoint(ip: &str, node: &str) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true, "serving": true, "terminating": false}})
}

fn slice(ns: &str, svc: &str, suffix: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{svc}-{suffix}"),
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn key_of(v: &Value) -> String {
    format!(
        "{}/{}{}",
        v["kind"].as_str().unwrap(),
        v["metadata"]["namespace"]
            .as_str()
            .map(|n| format!("{n}/"))
            .unwrap_or_default(),
        v["metadata"]["name"].as_str().unwrap()
    )
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "Service",
        Kind::EndpointSlice => "EndpointSlice",
        other => panic!("bursts change Services and EndpointSlices only, not {other:?}"),
    }
}

fn digest(objects: &BTreeMap<String, Value>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (k, v) in objects {
        k.hash(&mut h);
        v.to_string().hash(&mut h);
    }
    h.finish()
}

/// One change sent to the API server.
#[derive(Debug, Clone)]
enum Event {
    Apply(Value),
    Delete(Kind, String, String),
}

impl Event {
    /// On the Services watch (else the EndpointSlices watch).
    fn is_service(&self) -> bool {
        match self {
            Event::Apply(v) => v["kind"] == "Service",
            Event::Delete(kind, ..) => *kind == Kind::Service,
        }
    }

    /// `namespace/name` of the Service or slice.
    fn service_name(&self) -> String {
        match self {
            Event::Apply(v) => format!(
                "{}/{}",
                v["metadata"]["namespace"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            ),
            Event::Delete(_, ns, name) => format!("{ns}/{name}"),
        }
    }

    fn send(&self, api: &ApiServer) {
        match self {
            Event::Apply(v) => {
                api.apply(v.clone());
            }
            Event::Delete(kind, ns, name) => {
                assert!(api.delete(*kind, ns, name), "{ns}/{name} exists");
            }
        }
    }

    fn apply_to(&self, objects: &mut BTreeMap<String, Value>) {
        match self {
            Event::Apply(v) => {
                objects.insert(key_of(v), v.clone());
            }
            Event::Delete(kind, ns, name) => {
                objects.remove(&format!("{}/{ns}/{name}", kind_name(*kind)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The kernel's rules, normalised.

/// Tables by name (`ip kube-proxy-rs`; `IPv4 nat`), each its objects by `chain NAME`,
/// `set NAME`, `map NAME` (and `""`: the table's own lines).
type Snapshot = BTreeMap<String, Table>;
type Table = BTreeMap<String, Obj>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Obj {
    /// Declarations, then rules, in order (counters and handles removed).
    lines: Vec<String>,
    /// A set's or map's elements (the kernel prints them in hash order).
    elements: BTreeSet<String>,
}

fn snapshot(lab: &Lab, ns: &str, mode: Mode) -> Snapshot {
    match mode {
        Mode::Nftables => parse_nft(&lab.sh(ns, "nft list ruleset")),
        Mode::Iptables | Mode::Legacy => {
            let variant = if mode == Mode::Legacy {
                "legacy"
            } else {
                "nft"
            };
            let mut s = parse_save(&lab.sh(ns, &format!("iptables-{variant}-save")), "IPv4");
            s.extend(parse_save(
                &lab.sh(ns, &format!("ip6tables-{variant}-save")),
                "IPv6",
            ));
            s
        }
    }
}

fn parse_nft(text: &str) -> Snapshot {
    let mut snap = Snapshot::new();
    let (mut table, mut obj): (Option<String>, Option<String>) = (None, None);
    let mut elements: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(buf) = elements.as_mut() {
            buf.push(' ');
            buf.push_str(line);
            if line.ends_with('}') {
                let text = elements.take().unwrap();
                let o = object(&mut snap, &table, &obj);
                o.elements
                    .extend(split_elements(text.trim_end_matches('}')));
            }
            continue;
        }
        if line == "}" {
            if obj.take().is_none() {
                table = None;
            }
            continue;
        }
        if let Some(name) = line
            .strip_prefix("table ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            table = Some(name.to_owned());
            snap.entry(name.to_owned()).or_default();
            continue;
        }
        if obj.is_none()
            && let Some(head) = line.strip_suffix(" {")
            && ["chain ", "set ", "map ", "flowtable "]
                .iter()
                .any(|k| head.starts_with(k))
        {
            obj = Some(head.to_owned());
            object(&mut snap, &table, &obj);
            continue;
        }
        if let Some(rest) = line.strip_prefix("elements = {") {
            if rest.ends_with('}') {
                let o = object(&mut snap, &table, &obj);
                o.elements
                    .extend(split_elements(rest.trim_end_matches('}')));
            } else {
                elements = Some(rest.to_owned());
            }
            continue;
        }
        let o = object(&mut snap, &table, &obj);
        o.lines.push(normal_rule(line));
    }
    snap
}

fn object<'a>(snap: &'a mut Snapshot, table: &Option<String>, obj: &Option<String>) -> &'a mut Obj {
    snap.entry(table.clone().unwrap_or_default())
        .or_default()
        .entry(obj.clone().unwrap_or_default())
        .or_default()
}

/// Elements separated by commas outside quotes.
fn split_elements(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|e| !e.is_empty())
        .collect()
}

/// Counters and handles removed.
fn normal_rule(line: &str) -> String {
    let mut words: Vec<&str> = Vec::new();
    let mut it = line.split_whitespace().peekable();
    while let Some(w) = it.next() {
        match w {
            "#" if it.peek() == Some(&"handle") => break,
            "packets" | "bytes" if words.last() == Some(&"counter") => {
                it.next();
            }
            _ => words.push(w),
        }
    }
    words.join(" ")
}

/// `iptables-save` text: per table, each chain's policy line and rules in order.
fn parse_save(text: &str, family: &str) -> Snapshot {
    let mut snap = Snapshot::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = format!("{family} {t}");
            snap.entry(table.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let chain = words.next().unwrap_or("");
            let policy = words.next().unwrap_or("-");
            let o = snap
                .entry(table.clone())
                .or_default()
                .entry(format!("chain {chain}"))
                .or_default();
            o.lines.insert(0, format!("policy {policy}"));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            snap.entry(table.clone())
                .or_default()
                .entry(format!("chain {chain}"))
                .or_default()
                .lines
                .push(rest.to_owned());
        }
    }
    snap
}

/// A table with no chain of ours and no rule: as the kernel has it before the proxy ran.
fn pristine(t: &Table) -> bool {
    t.iter().all(|(name, o)| {
        !name.starts_with("chain KUBE")
            && o.elements.is_empty()
            && o.lines.iter().all(|l| l.starts_with("policy "))
    })
}

/// `None` when equal; else the first differences, readable.
fn differences(k: &Snapshot, r: &Snapshot) -> Option<String> {
    if k == r {
        return None;
    }
    let mut out = Vec::new();
    let tables: BTreeSet<&String> = k.keys().chain(r.keys()).collect();
    for t in tables {
        let (kt, rt) = (k.get(t), r.get(t));
        let (Some(kt), Some(rt)) = (kt, rt) else {
            out.push(format!(
                "table {t}: {}",
                if kt.is_some() {
                    "in the kernel only"
                } else {
                    "missing from the kernel"
                }
            ));
            continue;
        };
        let names: BTreeSet<&String> = kt.keys().chain(rt.keys()).collect();
        for n in names {
            match (kt.get(n), rt.get(n)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) => {
                    let first = a
                        .lines
                        .iter()
                        .zip(&b.lines)
                        .find(|(x, y)| x != y)
                        .map(|(x, y)| format!("kernel `{x}` vs `{y}`"))
                        .unwrap_or_else(|| format!("{} vs {} lines", a.lines.len(), b.lines.len()));
                    let missing: Vec<&String> =
                        b.elements.difference(&a.elements).take(3).collect();
                    let extra: Vec<&String> = a.elements.difference(&b.elements).take(3).collect();
                    out.push(format!(
                        "{t} {n}: different ({first}; elements missing {missing:?}, extra {extra:?})"
                    ));
                }
                (Some(_), None) => out.push(format!("{t} {n}: in the kernel only")),
                (None, _) => out.push(format!("{t} {n}: missing from the kernel")),
            }
        }
    }
    let total = out.len();
    out.truncate(12);
    Some(format!("{total} differences: {}", out.join("; ")))
}

/// Each table of the kernel equals that table of one of `candidates` (or, with
/// `allow_pristine`, is as before the proxy ran); returns which, per table.
fn whole_tables(
    k: &Snapshot,
    candidates: &[(&str, &Snapshot)],
    allow_pristine: bool,
) -> Result<String, String> {
    let mut names: BTreeSet<&String> = k.keys().collect();
    for (_, c) in candidates {
        names.extend(c.keys());
    }
    let mut out = Vec::new();
    for t in names {
        let kt = k.get(t);
        let labels: Vec<&str> = candidates
            .iter()
            .filter(|(_, c)| c.get(t) == kt)
            .map(|(l, _)| *l)
            .collect();
        let label = match labels.is_empty() {
            false => Some(labels.join("=")),
            true => (allow_pristine && kt.is_none_or(pristine)).then(|| "before".to_owned()),
        };
        match label {
            Some(l) => out.push(format!("{t}: {l}")),
            None => {
                let nearest = candidates
                    .iter()
                    .map(|(l, c)| {
                        let one = |s: &Snapshot| {
                            s.get(t)
                                .map(|x| Snapshot::from([(t.clone(), x.clone())]))
                                .unwrap_or_default()
                        };
                        format!(
                            "vs {l}: {}",
                            differences(&one(k), &one(c)).unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" | ");
                return Err(format!(
                    "table {t} is neither whole old nor whole new: {nearest}"
                ));
            }
        }
    }
    Ok(out.join(", "))
}

/// The kernel after a kill during nftables' cold start: a prefix of the cold-start
/// transactions of the full table `f` (see the file's header). Returns how far it got.
fn cold_prefix(k: &Snapshot, f: &Snapshot) -> Result<String, String> {
    if let Some(t) = k.keys().find(|t| !f.contains_key(*t)) {
        return Err(format!("table {t} is not ours"));
    }
    let mut out = Vec::new();
    let mut previous_whole = true;
    // Families are synced in order (IPv4 first): `ip` sorts before `ip6`.
    for (name, ft) in f {
        let Some(kt) = k.get(name) else {
            previous_whole = false;
            out.push(format!("{name}: absent"));
            continue;
        };
        if !previous_whole {
            return Err(format!(
                "{name} exists while an earlier family's table is incomplete"
            ));
        }
        for (o, ko) in kt {
            let fo = ft
                .get(o)
                .ok_or_else(|| format!("{name} {o}: not in the full table"))?;
            if ko.lines != fo.lines {
                return Err(format!(
                    "{name} {o}: half-written ({} of {} lines)",
                    ko.lines.len(),
                    fo.lines.len()
                ));
            }
            if !ko.elements.is_subset(&fo.elements) {
                return Err(format!("{name} {o}: elements the full table does not have"));
            }
        }
        let verdict = |o: &str, x: &Obj| {
            o.starts_with("map ") && x.lines.iter().any(|l| l.contains(": verdict"))
        };
        let bucket = |o: &str, x: &Obj| o.starts_with("map ") && !verdict(o, x);
        // Plain ClusterIP ports' endpoints (`cluster-endpoints-<proto>`) go with their port,
        // after the pick chains that use them (written first); the sharded maps' elements
        // wait for every chain and set element.
        let plain = |o: &str, x: &Obj| bucket(o, x) && o.starts_with("map cluster-endpoints-");
        let sharded = |o: &str, x: &Obj| bucket(o, x) && !plain(o, x);
        let picks = |t: &Table| t.keys().filter(|o| o.starts_with("chain pick-")).count();
        let count = |t: &Table, pick: &dyn Fn(&str, &Obj) -> bool| -> usize {
            t.iter()
                .filter(|(o, x)| pick(o, x))
                .map(|(_, x)| x.elements.len())
                .sum()
        };
        let chains = |t: &Table| t.keys().filter(|o| o.starts_with("chain ")).count();
        let sets = |o: &str, _: &Obj| o.starts_with("set ");
        let (kc, fc) = (chains(kt), chains(ft));
        let (ks, fs) = (count(kt, &sets), count(ft, &sets));
        let (kb, fb) = (count(kt, &bucket), count(ft, &bucket));
        let (kv, fv) = (count(kt, &verdict), count(ft, &verdict));
        let ksh = count(kt, &sharded);
        if ksh > 0 && (kc < fc || ks < fs) {
            return Err(format!(
                "{name}: endpoint elements ({ksh}) before every chain and set element ({kc}/{fc} chains, {ks}/{fs} set elements)"
            ));
        }
        let kpl = count(kt, &plain);
        if kpl > 0 && picks(kt) < picks(ft) {
            return Err(format!(
                "{name}: plain ports' endpoint elements ({kpl}) before every pick chain ({}/{})",
                picks(kt),
                picks(ft)
            ));
        }
        if kv > 0 && (kc < fc || ks < fs || kb < fb) {
            return Err(format!(
                "{name}: verdict elements ({kv}) before every chain and endpoint element ({kc}/{fc} chains, {kb}/{fb} endpoint elements)"
            ));
        }
        // Service ports are written in name order: those with chains are the first ones.
        let ports = |t: &Table| -> Vec<String> {
            let mut v: Vec<String> = t
                .keys()
                .filter_map(|o| o.strip_prefix("chain "))
                .filter(|c| c.contains('/'))
                .filter_map(|c| c.splitn(3, '-').nth(2))
                .map(|p| p.split('/').take(2).collect::<Vec<_>>().join("/"))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let (kp, fp) = (ports(kt), ports(ft));
        if fp[..kp.len().min(fp.len())] != kp[..] {
            return Err(format!(
                "{name}: the service ports with chains ({}) are not the first {} in name order",
                kp.len(),
                kp.len()
            ));
        }
        previous_whole = kt == ft;
        out.push(if previous_whole {
            format!("{name}: whole")
        } else {
            format!(
                "{name}: partial ({kc}/{fc} chains, {ks}/{fs} set, {kb}/{fb} endpoint, {kv}/{fv} verdict elements)"
            )
        });
    }
    Ok(out.join(", "))
}

/// `ns/name` of every Service named in a comment (nft element comments `"ns/name:port"`,
/// iptables `--comment "ns/name:port ..."`).
fn comment_names(s: &Snapshot) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for o in s.values().flat_map(|t| t.values()) {
        for text in o.lines.iter().chain(&o.elements) {
            let mut rest = text.as_str();
            while let Some(at) = rest.find("comment ") {
                rest = &rest[at + 8..];
                let token = match rest.strip_prefix('"') {
                    Some(q) => q.split('"').next().unwrap_or(""),
                    None => rest.split_whitespace().next().unwrap_or(""),
                };
                if let Some((svc, _)) = token.split_once(':')
                    && svc.contains('/')
                {
                    out.insert(svc.to_owned());
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------

/// splitmix64: small, seeded, good enough to place kills.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

#[test]
fn normal_forms() {
    let nft = "table ip t {\n\tmap m {\n\t\ttype ipv4_addr : verdict\n\t\telements = { 1.2.3.4 comment \"a/b:p\" : goto x,\n\t\t\t     5.6.7.8 : drop }\n\t}\n\tchain x {\n\t\tcounter packets 3 bytes 180 drop # handle 4\n\t}\n}\n";
    let s = parse_nft(nft);
    let t = &s["ip t"];
    assert_eq!(t["map m"].elements.len(), 2);
    assert!(
        t["map m"]
            .elements
            .contains("1.2.3.4 comment \"a/b:p\" : goto x")
    );
    assert_eq!(t["chain x"].lines, vec!["counter drop"]);
    assert_eq!(comment_names(&s), BTreeSet::from(["a/b".to_owned()]));
    let save = "# Generated\n*nat\n:PREROUTING ACCEPT [3:180]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SVC-X -m comment --comment \"ns/web:p cluster IP\" -j KUBE-SEP-Y\nCOMMIT\n";
    let s = parse_save(save, "IPv4");
    assert_eq!(
        s["IPv4 nat"]["chain PREROUTING"].lines,
        vec!["policy ACCEPT"]
    );
    assert_eq!(s["IPv4 nat"]["chain KUBE-SVC-X"].lines.len(), 2);
    assert!(!pristine(&s["IPv4 nat"]));
    assert_eq!(comment_names(&s), BTreeSet::from(["ns/web".to_owned()]));
    assert_eq!(
        field("I1 x] Synced nftables rules elapsed_us=1520", "elapsed_us"),
        Some(1520)
    );
}
