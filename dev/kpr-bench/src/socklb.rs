//! Socket-level load balancing (issue 18) against plain nftables DNAT: new TCP connections per
//! second and the latency of `connect()` from the node's own processes to a ClusterIP, at 1 and
//! 10,000 Services, and the conntrack entries each leaves behind.
//!
//! Per size, one node namespace holds the library's nftables rules (as the data-plane phase
//! installs them) and socket-lb's programs, attached to a throwaway cgroup (never the
//! machine's root cgroup) with their maps synced from the same desired state and pinned in a
//! bpffs of the run's own. The target (the last Service) has up to 10 endpoints, all addresses
//! of one pod namespace whose server accepts and closes. The load client is this binary run
//! again inside the node namespace ([`CLIENT_FLAG`]): once moved into the cgroup first
//! (socket-lb picks the endpoint inside `connect()`: no NAT) and once not (the rules DNAT and
//! masquerade), alternating, same rules, same run. It connects as fast as it can for a bounded
//! time, timing each `connect()`, and closes with SO_LINGER 0 (a RST: no TIME_WAIT to exhaust
//! the ports). Conntrack is flushed before each round and counted right after it: all entries,
//! and those whose original destination is the ClusterIP (NAT entries). Everything (namespaces,
//! cgroup, bpffs) is removed on drop, also after a panic.

use crate::cluster;
use crate::library;
use crate::netns::{self, Netns};
use crate::stats::{Quantiles, fmt_dur, thousands};
use crate::{Mode, traffic};
use kpr_netlab::TestCgroup;
use kpr_socklb::SocketLb;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The hidden subcommand of the load client: `kpr-bench --connect-client ADDR:PORT MILLIS
/// THREADS` prints one [`Load`] line.
pub(crate) const CLIENT_FLAG: &str = "--connect-client";

/// Sizes, rounds and load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Services x endpoints.
    pub(crate) sizes: Vec<(u32, u32)>,
    /// One round of one path.
    pub(crate) run_for: Duration,
    pub(crate) rounds: usize,
    /// Client threads.
    pub(crate) threads: usize,
}

impl Plan {
    /// Issue 18's sizes: about 35 s in all.
    pub(crate) fn full() -> Plan {
        Plan {
            sizes: vec![(1, 1), (10_000, 10)],
            run_for: Duration::from_secs(2),
            rounds: 3,
            threads: 2,
        }
    }

    /// One Service, a few seconds: so CI keeps the harness alive.
    pub(crate) fn quick() -> Plan {
        Plan {
            sizes: vec![(1, 1)],
            run_for: Duration::from_millis(300),
            rounds: 2,
            threads: 2,
        }
    }
}

/// Which way the client's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// In the cgroup: socket-lb rewrites the destination at `connect()`.
    SocketLb,
    /// Outside it: the nftables rules DNAT.
    Nftables,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::SocketLb => "socket-lb",
            Via::Nftables => "nftables",
        }
    }
}

/// One round of one path.
#[derive(Debug, Clone, Default)]
pub(crate) struct Round {
    pub(crate) per_sec: f64,
    pub(crate) connections: u64,
    pub(crate) failed: u64,
    /// Of the successful `connect()` calls.
    pub(crate) latency: Option<Quantiles>,
    /// Conntrack entries in the node right after the round (flushed before it).
    pub(crate) conntrack: u64,
    /// Of those, the ones whose original destination is the ClusterIP.
    pub(crate) nat: u64,
}

/// One size: each path's median round (by rate).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) n: u32,
    pub(crate) e: u32,
    /// Endpoints of the target Service (all live).
    pub(crate) live: u32,
    /// socket-lb's full sync of the maps: time, Services and backends written.
    pub(crate) sync: (Duration, usize, usize),
    pub(crate) socklb: Round,
    pub(crate) nft: Round,
}

/// Runs every size of `plan`; `Err` is a skip (this build or kernel has no socket-lb), with
/// the reason. A broken measurement panics.
pub(crate) fn measure(plan: &Plan) -> Result<Vec<Row>, String> {
    if !kpr_socklb::built_with_bpf() {
        return Err("skipped: socket-lb (issue 18): this kpr-bench was built without the BPF programs (clang and libbpf-dev were not installed at build time)".into());
    }
    let mut rows = Vec::new();
    for &(n, e) in &plan.sizes {
        let live = e.min(10);
        eprintln!("   socket-lb vs nftables: installing {n} x {e} (target: {live} live endpoints)");
        let world = World::new(n, e, live)?;
        eprintln!(
            "   socket-lb maps: {} Services, {} backends in {:?}",
            world.sync.1, world.sync.2, world.sync.0
        );
        let (mut lb, mut nft) = (Vec::new(), Vec::new());
        for r in 0..plan.rounds {
            // Alternating order: drift on a shared machine hits both alike.
            let order = if r % 2 == 0 {
                [Via::SocketLb, Via::Nftables]
            } else {
                [Via::Nftables, Via::SocketLb]
            };
            for via in order {
                let round = world.round(via, plan.run_for, plan.threads);
                eprintln!(
                    "   {n} x {e} {}: {:.0} connections/s, p50/p99 {:?}, conntrack {} (NAT {})",
                    via.name(),
                    round.per_sec,
                    round.latency.map(|q| (q.p50, q.p99)),
                    round.conntrack,
                    round.nat
                );
                // Correctness, not timing: each path went the way it claims.
                assert!(
                    round.connections > 0,
                    "{} connected ({n} x {e})",
                    via.name()
                );
                match via {
                    Via::SocketLb => {
                        assert_eq!(
                            round.nat, 0,
                            "socket-lb's connections left no conntrack entry to the ClusterIP ({n} x {e})"
                        );
                        lb.push(round);
                    }
                    Via::Nftables => {
                        assert!(
                            round.nat > 0,
                            "nftables' connections were DNATed: conntrack holds entries to the ClusterIP ({n} x {e})"
                        );
                        nft.push(round);
                    }
                }
            }
        }
        let (socklb, nft) = (median(lb), median(nft));
        assert!(world.server.accepted() > 0, "the pod accepted connections");
        rows.push(Row {
            n,
            e,
            live,
            sync: world.sync,
            socklb,
            nft,
        });
        drop(world);
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(rows)
}

/// The section of the report (markdown).
pub(crate) fn render(rows: &[Row], plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "New TCP connections from the node's own processes to the last Service's ClusterIP (its endpoints all live, on one pod): a client in the node namespace with {} threads, connecting and resetting (SO_LINGER 0) for {} per round, {} rounds per path, alternating; median round. socket-lb: the client in the throwaway cgroup socket-lb is attached to; nftables: the same client outside it, through the same rules (DNAT and masquerade). Conntrack flushed before each round, counted in the node right after it: both paths' flows are tracked (the node has stateful rules), but only nftables' are NAT entries; a connection whose 4-tuple (source port) repeats within a round reuses its entry, so entries can be fewer than connections.\n",
        plan.threads,
        fmt_dur(plan.run_for),
        plan.rounds
    );
    s.push_str("| path | Services x E (target's endpoints) | new connections / s | vs nftables | connect() p50 / p99 (n) | failed connects | conntrack entries after the round | of which NAT (original destination the ClusterIP) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        for (via, x) in [(Via::SocketLb, &r.socklb), (Via::Nftables, &r.nft)] {
            let vs = if r.nft.per_sec > 0.0 {
                format!("{:.2}x", x.per_sec / r.nft.per_sec)
            } else {
                "—".into()
            };
            let lat = x.latency.map_or_else(
                || "—".into(),
                |q| format!("{} / {} ({})", fmt_dur(q.p50), fmt_dur(q.p99), q.count),
            );
            let _ = writeln!(
                s,
                "| {} | {} x {} ({}) | {} | {vs} | {lat} | {} | {} ({} connections) | {} |",
                via.name(),
                thousands(u64::from(r.n)),
                r.e,
                r.live,
                thousands(x.per_sec.round() as u64),
                thousands(x.failed),
                thousands(x.conntrack),
                thousands(x.connections),
                thousands(x.nat),
            );
        }
    }
    s.push('\n');
    for r in rows {
        let p = |f: fn(&Quantiles) -> Duration| match (r.socklb.latency, r.nft.latency) {
            (Some(a), Some(b)) if !f(&b).is_zero() => {
                format!("{:.2}x", f(&a).as_secs_f64() / f(&b).as_secs_f64())
            }
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "- {} x {}: socket-lb / nftables: {} the connections per second, connect() p50 {}, p99 {}; NAT entries {} vs {}; socket-lb's maps: one full sync in {} (Service entries: {}, backend entries: {})",
            thousands(u64::from(r.n)),
            r.e,
            if r.nft.per_sec > 0.0 {
                format!("{:.2}x", r.socklb.per_sec / r.nft.per_sec)
            } else {
                "—".into()
            },
            p(|q| q.p50),
            p(|q| q.p99),
            thousands(r.socklb.nat),
            thousands(r.nft.nat),
            fmt_dur(r.sync.0),
            thousands(r.sync.1 as u64),
            thousands(r.sync.2 as u64),
        );
    }
    s
}

/// The load client's own entry point (`kpr-bench --connect-client ADDR:PORT MILLIS THREADS`):
/// connects for that long and prints one result line.
pub(crate) fn client_main(args: &[String]) -> ! {
    let parsed = (|| {
        let to: SocketAddr = args.first()?.parse().ok()?;
        let ms: u64 = args.get(1)?.parse().ok()?;
        let threads: usize = args.get(2)?.parse().ok()?;
        Some((to, Duration::from_millis(ms), threads.max(1)))
    })();
    let Some((to, run_for, threads)) = parsed else {
        eprintln!("usage: kpr-bench {CLIENT_FLAG} ADDR:PORT MILLIS THREADS");
        std::process::exit(2);
    };
    println!("{}", load(to, run_for, threads).line());
    std::process::exit(0);
}

/// What one client run did.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Load {
    ok: u64,
    failed: u64,
    secs: f64,
    p50_ns: u64,
    p99_ns: u64,
}

impl Load {
    fn line(&self) -> String {
        format!(
            "connect-client ok={} failed={} secs={:.6} p50_ns={} p99_ns={}",
            self.ok, self.failed, self.secs, self.p50_ns, self.p99_ns
        )
    }

    fn parse(out: &str) -> Option<Load> {
        let line = out.lines().find(|l| l.starts_with("connect-client "))?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
        };
        Some(Load {
            ok: field("ok")?.parse().ok()?,
            failed: field("failed")?.parse().ok()?,
            secs: field("secs")?.parse().ok()?,
            p50_ns: field("p50_ns")?.parse().ok()?,
            p99_ns: field("p99_ns")?.parse().ok()?,
        })
    }
}

/// `threads` threads connecting to `to` until `run_for` has passed (or 5,000,000 connections).
fn load(to: SocketAddr, run_for: Duration, threads: usize) -> Load {
    let stop = AtomicBool::new(false);
    let ok = AtomicU64::new(0);
    let max = 5_000_000u64;
    let start = Instant::now();
    let per_thread: Vec<(Vec<Duration>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut took = Vec::with_capacity(1 << 16);
                    let mut failed = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if start.elapsed() >= run_for || ok.load(Ordering::Relaxed) >= max {
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                        let t = Instant::now();
                        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                            Ok(s) => {
                                took.push(t.elapsed());
                                ok.fetch_add(1, Ordering::Relaxed);
                                let _ = rustix::net::sockopt::set_socket_linger(
                                    &s,
                                    Some(Duration::ZERO),
                                );
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (took, failed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let failed = per_thread.iter().map(|(_, f)| f).sum();
    let all: Vec<Duration> = per_thread.into_iter().flat_map(|(t, _)| t).collect();
    let ok = all.len() as u64;
    let q = Quantiles::of(all);
    let ns = |f: fn(&Quantiles) -> Duration| q.as_ref().map_or(0, |q| f(q).as_nanos() as u64);
    Load {
        ok,
        failed,
        secs,
        p50_ns: ns(|q| q.p50),
        p99_ns: ns(|q| q.p99),
    }
}

/// The median round by rate.
fn median(mut rounds: Vec<Round>) -> Round {
    rounds.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    let mid = rounds.len() / 2;
    rounds.into_iter().nth(mid).unwrap_or_default()
}

/// What a world has mounted and attached, for [`sweep`] (on SIGINT or SIGTERM drops do not
/// run): bpffs mounts with their pin directories, and cgroup directories (the hierarchy is
/// mounted at their parent). Each entry is cleaned under this lock, by its drop or by the
/// sweep, whichever comes first, and leaves the list only once it is clean.
static ALIVE: Mutex<Vec<Alive>> = Mutex::new(Vec::new());

#[derive(Debug, Clone, PartialEq, Eq)]
enum Alive {
    Pins { mount: PathBuf, dir: PathBuf },
    Cgroup(PathBuf),
}

fn registry() -> std::sync::MutexGuard<'static, Vec<Alive>> {
    // Whatever a world records here, the run's last sweep (and a signal's) removes.
    netns::also_sweep(sweep);
    ALIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Detaches, deletes and unmounts what a world left (after the namespaces, and the clients in
/// them, are gone): the last line of defence, as [`netns::sweep`] is for namespaces.
pub(crate) fn sweep() {
    let mut left = registry();
    // Pins first: the programs are detached before their cgroup goes.
    left.sort_by_key(|a| matches!(a, Alive::Cgroup(_)));
    for a in left.drain(..) {
        match a {
            Alive::Pins { mount, dir } => {
                let _ = SocketLb::remove(&dir);
                kpr_netlab::unmount(&mount);
            }
            Alive::Cgroup(dir) => {
                let Some(mount) = dir.parent() else { continue };
                let deadline = Instant::now() + Duration::from_secs(2);
                loop {
                    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                        for pid in procs.lines() {
                            let _ = std::fs::write(mount.join("cgroup.procs"), pid);
                        }
                    }
                    match std::fs::remove_dir(&dir) {
                        Err(e)
                            if e.kind() != std::io::ErrorKind::NotFound
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        _ => break,
                    }
                }
                kpr_netlab::unmount(mount);
            }
        }
    }
}

/// A [`TestCgroup`] known to [`sweep`] while it lives.
#[derive(Debug)]
struct Cgroup {
    cg: Option<TestCgroup>,
    path: PathBuf,
}

impl Cgroup {
    fn new(name: &str) -> Cgroup {
        let mut reg = registry();
        let cg = TestCgroup::new(name).unwrap_or_else(|err| panic!("a throwaway cgroup: {err}"));
        let path = cg.path().to_owned();
        reg.push(Alive::Cgroup(path.clone()));
        Cgroup { cg: Some(cg), path }
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let mut reg = registry();
        if reg.contains(&Alive::Cgroup(self.path.clone())) {
            drop(self.cg.take());
            reg.retain(|a| *a != Alive::Cgroup(self.path.clone()));
        }
    }
}

/// A bpf filesystem of the run's own (outside `/sys`, which `ip netns exec` mounts anew),
/// where socket-lb pins its maps and links; on drop the programs are detached, the maps
/// deleted and the filesystem unmounted.
#[derive(Debug)]
struct Pins {
    mount: PathBuf,
    dir: PathBuf,
}

impl Pins {
    fn new(tag: &str) -> Pins {
        let mut reg = registry();
        let mount = std::env::temp_dir().join(format!("{}{tag}-bpffs", netns::prefix()));
        std::fs::create_dir_all(&mount).expect("create the bpffs mount point");
        if let Err(e) = kpr_netlab::mount_fs("bpf", &mount) {
            let _ = std::fs::remove_dir(&mount);
            panic!("mount a bpffs of our own: {e}");
        }
        let dir = mount.join("socklb");
        let pins = Pins { mount, dir };
        reg.push(pins.alive());
        pins
    }

    fn alive(&self) -> Alive {
        Alive::Pins {
            mount: self.mount.clone(),
            dir: self.dir.clone(),
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut reg = registry();
        if reg.contains(&self.alive()) {
            if let Err(e) = SocketLb::remove(&self.dir) {
                eprintln!("kpr-bench: removing socket-lb's pins: {e}");
            }
            kpr_netlab::unmount(&self.mount);
            reg.retain(|a| *a != self.alive());
        }
    }
}

/// A node with `n` Services in its nftables rules and in socket-lb's maps, and the target's
/// pod serving.
#[derive(Debug)]
struct World {
    vip: SocketAddr,
    sync: (Duration, usize, usize),
    // Dropped in this order: the server (stopped), socket-lb's handle, its pins (programs
    // detached, maps deleted), the cgroup, the namespaces.
    server: traffic::AcceptServer,
    _lb: SocketLb,
    _pins: Pins,
    cgroup: Cgroup,
    _pod: Netns,
    node: Netns,
}

impl World {
    fn new(n: u32, e: u32, live: u32) -> Result<World, String> {
        let tag = format!("sl-{n}x{e}");
        let node = Netns::new(&format!("{tag}-node"));
        let pod = Netns::new(&format!("{tag}-pod"));
        // The node's uplink: a veth pair of its own holding the node IP and the default route
        // (the source of the node's connections; nothing the rules do not rewrite leaves).
        node.sh(&format!(
            "ip link add kpr-up type veth peer name kpr-up-peer && ip link set kpr-up up && ip link set kpr-up-peer up && ip addr add {}/24 dev kpr-up && ip route add default via 192.168.0.1 dev kpr-up && sysctl -qw net.ipv4.ip_local_port_range='1024 65535'",
            cluster::NODE_IP
        ));
        let (host, pod_if) = netns::link(&node, &pod);
        let ips: Vec<String> = (0..live).map(|k| cluster::pod_ip(k).to_string()).collect();
        let mut pod_sh = String::new();
        let mut node_sh = format!("ip addr add 10.0.0.1/32 dev {host}");
        for ip in &ips {
            let _ = write!(pod_sh, "ip addr add {ip}/32 dev {pod_if} && ");
            let _ = write!(node_sh, " && ip route add {ip}/32 dev {host}");
        }
        pod.sh(&format!(
            "{pod_sh}ip route add 10.0.0.1 dev {pod_if} scope link && ip route add default via 10.0.0.1 dev {pod_if}"
        ));
        node.sh(&node_sh);

        let target = n - 1;
        let world = library::World::with_live(n, e, Some(target), live);
        library::install_world(Mode::Nftables, &node, &world, target);

        let cgroup = Cgroup::new(&format!("bench-socklb-{n}x{e}"));
        let pins = Pins::new(&tag);
        let mut lb = match SocketLb::start(cgroup.path(), &pins.dir) {
            Ok(lb) => lb,
            Err(err) => {
                return Err(format!(
                    "skipped: socket-lb (issue 18): this kernel refused its programs (the daemon would run plain nftables): {err}"
                ));
            }
        };
        let t = Instant::now();
        let stats = lb.sync(world.fam(), None).expect("socket-lb's full sync");
        let sync = (t.elapsed(), stats.services_written, stats.backends_written);
        drop(world);

        let server = traffic::AcceptServer::start(&pod, cluster::POD_PORT);
        let w = World {
            vip: SocketAddr::from((cluster::cluster_ip(target), cluster::SERVICE_PORT)),
            sync,
            server,
            _lb: lb,
            _pins: pins,
            cgroup,
            _pod: pod,
            node,
        };
        // Correctness: the Service answers both ways.
        for via in [Via::SocketLb, Via::Nftables] {
            let reached = (0..50).any(|_| {
                let ok = w.client(via, Duration::from_millis(20), 1).ok > 0;
                if !ok {
                    std::thread::sleep(Duration::from_millis(100));
                }
                ok
            });
            assert!(reached, "no connection to {} via {}", w.vip, via.name());
        }
        Ok(w)
    }

    /// One round of one path: conntrack flushed, the client run, conntrack counted.
    fn round(&self, via: Via, run_for: Duration, threads: usize) -> Round {
        self.node.sh("conntrack -F 2>/dev/null || true");
        let load = self.client(via, run_for, threads);
        let conntrack = self
            .node
            .sh("conntrack -C 2>/dev/null || echo 0")
            .trim()
            .parse()
            .unwrap_or(0);
        let nat = self
            .node
            .sh(&format!(
                "conntrack -L -d {} 2>/dev/null || true",
                self.vip.ip()
            ))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count() as u64;
        Round {
            per_sec: if load.secs > 0.0 {
                load.ok as f64 / load.secs
            } else {
                0.0
            },
            connections: load.ok,
            failed: load.failed,
            latency: (load.ok > 0).then(|| Quantiles {
                p50: Duration::from_nanos(load.p50_ns),
                p99: Duration::from_nanos(load.p99_ns),
                count: load.ok as usize,
            }),
            conntrack,
            nat,
        }
    }

    /// Runs the load client in the node namespace: in the cgroup first for socket-lb.
    fn client(&self, via: Via, run_for: Duration, threads: usize) -> Load {
        let bin = std::env::current_exe().expect("the path of this binary");
        let cmd = format!(
            "exec '{}' {CLIENT_FLAG} {} {} {threads}",
            bin.display(),
            self.vip,
            run_for.as_millis()
        );
        let script = match via {
            Via::SocketLb => format!(
                "echo $$ > '{}/cgroup.procs' && {cmd}",
                self.cgroup.path().display()
            ),
            Via::Nftables => cmd,
        };
        let out = self.node.try_sh(&script);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the load client ({}) failed: {}",
            via.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Load::parse(&stdout).unwrap_or_else(|| panic!("the load client printed {stdout:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_line_reads_back() {
        let l = Load {
            ok: 12_345,
            failed: 2,
            secs: 2.000_5,
            p50_ns: 41_000,
            p99_ns: 250_000,
        };
        assert_eq!(Load::parse(&format!("noise\n{}\n", l.line())), Some(l));
        assert_eq!(Load::parse("connect-client ok=1"), None);
    }

    #[test]
    fn the_median_round_is_by_rate() {
        let r = |per_sec| Round {
            per_sec,
            ..Round::default()
        };
        assert_eq!(median(vec![r(3.0), r(1.0), r(2.0)]).per_sec, 2.0);
        assert_eq!(median(vec![]).per_sec, 0.0);
    }
}
