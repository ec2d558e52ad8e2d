//! The whole daemon against the test API server, per mode and size: the release binary runs
//! inside a fresh node namespace, watching an API server (also inside it) preloaded with N
//! Services, N EndpointSlices and this node's Node. Measures cold start (process start -> first
//! "Synced ... rules" line, and that sync's own `elapsed_us`), network-programming latency of
//! EndpointSlice updates (the daemon's `Network programming latency` lines, against the
//! `last-change-trigger-time` each update carries), peak RSS and CPU per 1,000 changes; then
//! (nftables mode, issue 16) the memory of a full resync ([`crate::resync`]), the debug surface
//! while it programs (issue 14), and, at the sizes asked, a second daemon's latency with
//! periodic syncs running ([`crate::periodic`]).

use crate::Mode;
use crate::cluster;
use crate::netns::Netns;
use crate::periodic::{self, Periodic};
use crate::resync::{self, Resync};
use crate::running::{
    Running, Slices, api_server, clock_ticks, cpu_ticks, latencies, nft_intact, reset_peak,
    status_kib,
};
use crate::stats::Quantiles;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// One mode and size through the daemon.
#[derive(Debug, Clone, Default)]
pub(crate) struct Daemon {
    pub(crate) cold_start: Option<Duration>,
    /// `elapsed_us` of the first sync's log line.
    pub(crate) first_sync: Option<Duration>,
    pub(crate) latency: Option<Quantiles>,
    /// VmHWM, KiB.
    pub(crate) peak_rss_kib: Option<u64>,
    pub(crate) cpu_per_1000: Option<f64>,
    /// Issue 14: `/debug/explain` answers (HTTP round trip) while updates run.
    pub(crate) explain: Option<Quantiles>,
    /// `/debug/services` of every port: time to read the whole streamed answer, and its size.
    pub(crate) services_listing: Option<(Duration, usize)>,
    /// Network-programming latency while the debug endpoints are queried without pause.
    pub(crate) latency_queried: Option<Quantiles>,
    /// Issue 16: memory and time of a full resync (nftables mode).
    pub(crate) resync: Option<Resync>,
    /// Issue 16: programming latency with periodic syncs running (a second daemon).
    pub(crate) periodic: Option<Periodic>,
    pub(crate) notes: Vec<String>,
}

/// What to run at one size.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// EndpointSlice updates of the latency phase (and of the debug phase, at most 200).
    pub(crate) updates: usize,
    /// Per update phase; a phase stops early past it, saying so.
    pub(crate) budget: Duration,
    /// The full resync's memory (nftables mode).
    pub(crate) resync: bool,
    /// The debug readers' phase (issue 14); `Some(reason)` skips it.
    pub(crate) skip_debug: Option<String>,
    /// The periodic-sync phase.
    pub(crate) periodic: Option<periodic::Plan>,
}

/// Between an update's sync and the next update: each update is a sync of its own. 50 ms, not
/// less: the test API server does not set TCP_NODELAY, so a watch event sent within ~40 ms of
/// the previous one waits for the client's delayed ACK (Nagle); measured: with 20 ms spacing
/// one update in ten took ~22 ms longer, with 35 ms ~6 ms longer, with 50 ms none. (A Go API
/// server sets TCP_NODELAY.)
const SPACING: Duration = Duration::from_millis(50);

/// Runs the daemon at one size.
pub(crate) fn measure(bin: &Path, mode: Mode, n: u32, e: u32, plan: &Plan) -> Daemon {
    let ns = Netns::new(&format!("dmn-{}-{n}x{e}", mode.short()));
    // The node's InternalIP on an interface, as on a node (a veth pair: no dummy module here).
    ns.sh(&format!(
        "ip link add kb-node type veth peer name kb-peer && ip addr add {}/24 dev kb-node && ip link set kb-node up && ip link set kb-peer up",
        cluster::NODE_IP
    ));
    let (rt, mut api) = api_server(&ns);
    let t = Instant::now();
    api.apply(cluster::node());
    for i in 0..n {
        api.apply(cluster::service(i));
        api.apply(cluster::slice(i, e, 0, None));
    }
    eprintln!("   API server preloaded in {:?}", t.elapsed());

    let log_path = std::env::temp_dir().join(format!("{}.log", ns.name()));
    let mut d = Running::start(
        bin,
        &ns,
        &api,
        mode,
        // Every update its own sync, at once.
        &["--iptables-min-sync-period", "0s"],
        log_path.clone(),
    );
    let mut out = Daemon::default();
    let what = format!("daemon {} {n}x{e}", mode.flag());

    // Cold start: the first sync, within a generous bound.
    let (cold, first) = d.first_sync(Duration::from_secs(600));
    out.cold_start = Some(cold);
    out.first_sync = first;
    // Correctness: the rules are in the kernel.
    match mode {
        Mode::Nftables => assert!(nft_intact(&ns), "the daemon's table is in the kernel"),
        Mode::Iptables => assert!(
            ns.sh("iptables-nft-save -t nat")
                .contains("-A KUBE-SERVICES"),
            "the daemon's chains are in the kernel"
        ),
    }
    // Quiet: no sync for 500 ms (a second sync may follow the first).
    d.quiet();

    let cpu_before = cpu_ticks(d.pid);
    let mut slices = Slices::new(n, e);
    let mut update = |count: usize, out: &mut Daemon, d: &mut Running| {
        let phase = Instant::now();
        let mut done = 0usize;
        for step in 1..=count {
            if done >= count.min(5) && phase.elapsed() > plan.budget {
                out.notes.push(format!(
                    "capped: {what}: {done} of {count} EndpointSlice updates (time budget {:?})",
                    plan.budget
                ));
                break;
            }
            let limit = Duration::from_secs(120);
            if !d.update(&api, &mut slices, limit) {
                out.notes.push(format!(
                    "{what}: update {step} not synced within {limit:?}: updates stopped"
                ));
                break;
            }
            done += 1;
            std::thread::sleep(SPACING);
        }
        done
    };
    let done = update(plan.updates, &mut out, &mut d);
    let quiet_lines = d.counts().1;
    let cpu_after = cpu_ticks(d.pid);
    if let (Some(a), Some(b)) = (cpu_before, cpu_after)
        && done > 0
    {
        let secs = (b - a) as f64 / clock_ticks() as f64;
        out.cpu_per_1000 = Some(secs * 1000.0 / done as f64);
    }
    // The proxy's own peak, before the resync and the debug readers below (whose kernel
    // readings render and list every rule: a debugging cost, reported in the notes).
    out.peak_rss_kib = status_kib(d.pid, "VmHWM");
    // For a heap profiler wrapping the daemon (`--daemon` a script that runs it under e.g.
    // heaptrack): stop here, so that its peak is this one, not the resync's or the readers'.
    if std::env::var_os("KPR_BENCH_STOP_AT_PEAK").is_some() {
        out.notes.push(format!(
            "{what}: stopped after the cold start and updates (KPR_BENCH_STOP_AT_PEAK)"
        ));
        drop(d);
        rt.block_on(api.stop());
        return out;
    }
    // Issue 16: a full resync, as the hourly one, and its memory.
    if plan.resync {
        eprintln!("   full resync (our masquerading chain flushed; the repair check resyncs)");
        let r = resync::measure(&ns, &mut d, Duration::from_secs(600));
        out.notes
            .extend(r.notes.iter().map(|n| format!("{what}: {n}")));
        out.resync = Some(r);
        d.quiet();
    }
    // From here the peak is the debug phase's alone (where the kernel lets it be reset).
    let reset = reset_peak(d.pid);
    // Issue 14: the same updates again while a reader queries the debug endpoints without
    // pause (explain for random Services, and every 20th request the whole /debug/services).
    let queried_from = d.counts().1;
    let mut queried_done = 0;
    if let Some(why) = &plan.skip_debug {
        out.notes
            .push(format!("skipped: {what}: the debug-reader phase ({why})"));
    } else {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (explains, listing, done) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| debug_reader(&ns, n, &stop));
            let done = update(plan.updates.min(200), &mut out, &mut d);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (explains, listing) = reader.join().unwrap_or_default();
            (explains, listing, done)
        });
        queried_done = done;
        out.explain = Quantiles::of(explains);
        out.services_listing = listing;
        if let (Some(before), Some(after)) = (out.peak_rss_kib, status_kib(d.pid, "VmHWM"))
            && after > before
        {
            out.notes.push(format!(
                "{what}: peak RSS {:.0} MB while the debug endpoints were queried (explain reads the kernel's rules){}",
                after as f64 * 1024.0 / 1e6,
                if reset {
                    ""
                } else {
                    "; VmHWM could not be reset, so it may be the resync's"
                }
            ));
        }
    }
    d.stop();
    {
        let l = d.log();
        let split = quiet_lines.min(l.latency.len());
        let quiet = latencies(&l.latency[..split]);
        if queried_done > 0 {
            let from = queried_from.min(l.latency.len());
            out.latency_queried = Quantiles::of(latencies(&l.latency[from..]));
        }
        if quiet.len() < done {
            out.notes.push(format!(
                "{what}: {} latency lines for {done} updates",
                quiet.len()
            ));
        }
        out.latency = Quantiles::of(quiet);
        if !l.errors.is_empty() {
            out.notes.push(format!(
                "{what}: {} error lines, first: {}",
                l.errors.len(),
                l.errors[0]
            ));
        }
    }
    let mut logs = vec![log_path];
    // Issue 16: a second daemon, with periodic syncs every second, over the same API server.
    if let Some(p) = &plan.periodic {
        let path = std::env::temp_dir().join(format!("{}-periodic.log", ns.name()));
        let r = periodic::measure(bin, &ns, &api, mode, &mut slices, p, path.clone());
        out.notes
            .extend(r.notes.iter().map(|n| format!("{what}: {n}")));
        out.periodic = Some(r);
        logs.push(path);
    }
    rt.block_on(api.stop());
    drop(ns);
    let keep = !out.notes.is_empty() || std::env::var_os("KPR_BENCH_KEEP").is_some();
    for path in logs {
        if keep {
            out.notes
                .push(format!("daemon log kept: {}", path.display()));
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    out
}

/// Queries the debug endpoints without pause until `stop` (explain for Services in a scattered
/// order; every 20th request the whole `/debug/services`): the explain round trips, and the
/// last listing's time and size.
fn debug_reader(
    ns: &Netns,
    n: u32,
    stop: &std::sync::atomic::AtomicBool,
) -> (Vec<Duration>, Option<(Duration, usize)>) {
    crate::netns::enter(ns.name());
    // The reader stands for a client on another machine: its own CPU (building requests,
    // reading 20 MB answers) must not count against the proxy on these two cores, so it runs
    // only when a CPU is otherwise idle. The proxy's side of every request (accepting,
    // parsing, explaining, streaming) still counts.
    let idle = thread_priority::ThreadSchedulePolicy::Normal(
        thread_priority::NormalThreadSchedulePolicy::Idle,
    );
    let _ = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        thread_priority::ThreadPriority::Min,
        idle,
    );
    let mut explains = Vec::new();
    let mut client = Client::default();
    let mut listing = None;
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        if i.is_multiple_of(20) {
            if let Some((t, bytes)) = client.get("/debug/services") {
                listing = Some((t, bytes));
            }
            continue;
        }
        let svc = (u64::from(i) * 104_729 % u64::from(n)) as u32;
        let path = format!(
            "/debug/explain?from=10.0.0.5&to={}:80&proto=tcp",
            cluster::cluster_ip(svc)
        );
        if let Some((t, _)) = client.get(&path) {
            explains.push(t);
        }
    }
    (explains, listing)
}

/// A client of the daemon's metrics address on one kept-alive connection (as a browser or a
/// script would hold it), from a thread inside its namespace; reconnects when it closes.
#[derive(Default)]
struct Client {
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl Client {
    /// A GET: the time to read the whole answer and its body's size (`None` unless 200).
    fn get(&mut self, path: &str) -> Option<(Duration, usize)> {
        let start = Instant::now();
        let answer = self.try_get(path);
        if answer.is_none() {
            self.conn = None;
        }
        let (status, size) = answer?;
        (status == 200).then(|| (start.elapsed(), size))
    }

    fn try_get(&mut self, path: &str) -> Option<(u16, usize)> {
        use std::io::{BufRead, Read};
        if self.conn.is_none() {
            let s = std::net::TcpStream::connect("127.0.0.1:10249").ok()?;
            s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
            s.set_nodelay(true).ok()?;
            self.conn = Some(std::io::BufReader::new(s));
        }
        let conn = self.conn.as_mut()?;
        // One write: a request in pieces would wait on Nagle for the server's delayed ACK.
        let request = format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n");
        conn.get_mut().write_all(request.as_bytes()).ok()?;
        let mut line = String::new();
        conn.read_line(&mut line).ok()?;
        let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            line.clear();
            conn.read_line(&mut line).ok()?;
            let h = line.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
            chunked |= h.starts_with("transfer-encoding:") && h.contains("chunked");
            close |= h.starts_with("connection:") && h.contains("close");
        }
        let mut size = 0;
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line).ok()?;
                let n = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
                let mut chunk = vec![0; n + 2];
                conn.read_exact(&mut chunk).ok()?;
                size += n;
                if n == 0 {
                    break;
                }
            }
        } else {
            let n = length?;
            let mut body = vec![0; n];
            conn.read_exact(&mut body).ok()?;
            size = n;
        }
        if close {
            self.conn = None;
        }
        Some((status, size))
    }
}
