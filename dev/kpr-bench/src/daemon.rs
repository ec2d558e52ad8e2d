//! The whole daemon against the test API server, per mode and size: the release binary runs
//! inside a fresh node namespace, watching an API server (also inside it) preloaded with N
//! Services, N EndpointSlices and this node's Node. Measures cold start (process start -> first
//! "Synced ... rules" line, and that sync's own `elapsed_us`), network-programming latency of
//! EndpointSlice updates (the daemon's `Network programming latency` lines, against the
//! `last-change-trigger-time` each update carries), peak RSS and CPU per 1,000 changes.

use crate::Mode;
use crate::cluster;
use crate::netns::Netns;
use crate::stats::Quantiles;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    pub(crate) notes: Vec<String>,
}

/// Between an update's sync and the next update: each update is a sync of its own. 50 ms, not
/// less: the test API server does not set TCP_NODELAY, so a watch event sent within ~40 ms of
/// the previous one waits for the client's delayed ACK (Nagle); measured: with 20 ms spacing
/// one update in ten took ~22 ms longer, with 35 ms ~6 ms longer, with 50 ms none. (A Go API
/// server sets TCP_NODELAY.)
const SPACING: Duration = Duration::from_millis(50);

/// Lines of interest, with when they arrived.
#[derive(Debug, Default)]
struct Log {
    synced: Vec<(Instant, String)>,
    latency: Vec<String>,
    errors: Vec<String>,
}

/// Runs the daemon at one size: `updates` EndpointSlice updates, within `budget`.
pub(crate) fn measure(
    bin: &Path,
    mode: Mode,
    n: u32,
    e: u32,
    updates: usize,
    budget: Duration,
) -> Daemon {
    let ns = Netns::new(&format!("dmn-{}-{n}x{e}", mode.short()));
    // The node's InternalIP on an interface, as on a node (a veth pair: no dummy module here).
    ns.sh(&format!(
        "ip link add kb-node type veth peer name kb-peer && ip addr add {}/24 dev kb-node && ip link set kb-node up && ip link set kb-peer up",
        cluster::NODE_IP
    ));
    let (rt, mut api) = api_server(&ns);
    api.apply(cluster::node());
    for i in 0..n {
        api.apply(cluster::service(i));
        api.apply(cluster::slice(i, e, 0, None));
    }

    let log_path = std::env::temp_dir().join(format!("{}.log", ns.name()));
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(bin)
        .args(["--master", &api.url(), "--proxy-mode", mode.flag()])
        .args(["--hostname-override", cluster::NODE])
        .args(["--cluster-cidr", "10.0.0.0/8"])
        .args(["--iptables-min-sync-period", "0s"])
        // Metrics and debug endpoints on 127.0.0.1:10249 of the node namespace.
        .args(["--healthz-port", "0", "-v", "4"])
        // The back end the library measurements use (a fresh namespace would pick it anyway).
        .env("KPR_IPTABLES_BACKEND", "nft")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    // `ip netns exec` execs the daemon: same process.
    let pid = child.id();
    let log = Arc::new(Mutex::new(Log::default()));
    let reader = {
        let (log, stderr) = (log.clone(), child.stderr.take().expect("stderr piped"));
        let mut file = std::io::LineWriter::new(
            std::fs::File::create(&log_path).expect("create the daemon's log file"),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let _ = writeln!(file, "{line}");
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                if line.contains("] Synced ") {
                    l.synced.push((now, line));
                } else if line.contains("Network programming latency") {
                    l.latency.push(line);
                } else if line.starts_with('E') || line.starts_with('F') {
                    l.errors.push(line);
                }
            }
            let _ = file.flush();
        })
    };
    let mut out = Daemon::default();
    let counts = |log: &Arc<Mutex<Log>>| {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        (l.synced.len(), l.latency.len())
    };
    let alive = |child: &mut std::process::Child| matches!(child.try_wait(), Ok(None));

    // Cold start: the first sync, within a generous bound.
    let limit = Duration::from_secs(300);
    while counts(&log).0 == 0 {
        assert!(
            alive(&mut child),
            "the daemon exited before its first sync (log: {})",
            log_path.display()
        );
        assert!(
            start.elapsed() < limit,
            "no first sync within {limit:?} (log: {})",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        let (at, line) = &l.synced[0];
        out.cold_start = Some(at.duration_since(start));
        out.first_sync = field(line, "elapsed_us").map(Duration::from_micros);
    }
    // Correctness: the rules are in the kernel.
    match mode {
        Mode::Nftables => assert!(
            ns.sh("nft list tables").contains("kube-proxy-rs"),
            "the daemon's table is in the kernel"
        ),
        Mode::Iptables => assert!(
            ns.sh("iptables-nft-save -t nat")
                .contains("-A KUBE-SERVICES"),
            "the daemon's chains are in the kernel"
        ),
    }
    // Quiet: no sync for 500 ms (a second sync may follow the first).
    let mut last = counts(&log);
    let mut quiet = Instant::now();
    let settling = Instant::now();
    while quiet.elapsed() < Duration::from_millis(500)
        && settling.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
        let now = counts(&log);
        if now != last {
            last = now;
            quiet = Instant::now();
        }
    }

    let cpu_before = cpu_ticks(pid);
    let mut generations = std::collections::HashMap::<u32, u32>::new();
    let mut update = |count: usize, out: &mut Daemon, child: &mut std::process::Child| {
        let phase = Instant::now();
        let mut done = 0usize;
        for step in 1..=count {
            if done >= count.min(5) && phase.elapsed() > budget {
                out.notes.push(format!(
                    "capped: daemon {} {n}x{e}: {done} of {count} EndpointSlice updates (time budget {budget:?})",
                    mode.flag()
                ));
                break;
            }
            let svc = (step as u64 * 7919 % u64::from(n)) as u32;
            let g = generations.entry(svc).or_default();
            *g += 1;
            let before = counts(&log).1;
            let trigger = kpr_ops::time::rfc3339_nano(SystemTime::now());
            api.apply(cluster::slice(svc, e, *g, Some(&trigger)));
            let wait = Instant::now();
            let limit = Duration::from_secs(120);
            while counts(&log).1 == before && wait.elapsed() < limit {
                assert!(alive(child), "the daemon exited during the updates");
                std::thread::sleep(Duration::from_millis(1));
            }
            if counts(&log).1 == before {
                out.notes.push(format!(
                    "daemon {} {n}x{e}: update {step} not synced within {limit:?}: updates stopped",
                    mode.flag()
                ));
                break;
            }
            done += 1;
            std::thread::sleep(SPACING);
        }
        done
    };
    let done = update(updates, &mut out, &mut child);
    let cpu_after = cpu_ticks(pid);
    if let (Some(a), Some(b)) = (cpu_before, cpu_after)
        && done > 0
    {
        let secs = (b - a) as f64 / clock_ticks() as f64;
        out.cpu_per_1000 = Some(secs * 1000.0 / done as f64);
    }
    // The proxy's own peak, before the debug readers below (whose kernel readings render
    // and list every rule: a debugging cost, reported in the notes).
    out.peak_rss_kib = status_kib(pid, "VmHWM");
    // Issue 14: the same updates again while a reader queries the debug endpoints without
    // pause (explain for random Services, and every 20th request the whole /debug/services).
    let quiet_lines = counts(&log).1;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (explains, listing, queried_done) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            crate::netns::enter(ns.name());
            // The reader stands for a client on another machine: its own CPU (building
            // requests, reading 20 MB answers) must not count against the proxy on these two
            // cores, so it runs only when a CPU is otherwise idle. The proxy's side of every
            // request (accepting, parsing, explaining, streaming) still counts.
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
        });
        let done = update(updates.min(200), &mut out, &mut child);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (explains, listing) = reader.join().unwrap_or_default();
        (explains, listing, done)
    });
    out.explain = Quantiles::of(explains);
    out.services_listing = listing;
    if let (Some(before), Some(after)) = (out.peak_rss_kib, status_kib(pid, "VmHWM"))
        && after > before
    {
        out.notes.push(format!(
            "daemon {} {n}x{e}: peak RSS {:.0} MB while the debug endpoints were queried (explain reads the kernel's rules)",
            mode.flag(),
            after as f64 * 1024.0 / 1e6
        ));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    rt.block_on(api.stop());
    let l = log.lock().unwrap_or_else(|e| e.into_inner());
    let of = |lines: &[String]| -> Vec<Duration> {
        lines
            .iter()
            .filter_map(|line| field(line, "max_us"))
            .map(Duration::from_micros)
            .collect()
    };
    let split = quiet_lines.min(l.latency.len());
    let latencies = of(&l.latency[..split]);
    if queried_done > 0 {
        out.latency_queried = Quantiles::of(of(&l.latency[split..]));
    }
    if latencies.len() < done {
        out.notes.push(format!(
            "daemon {} {n}x{e}: {} latency lines for {done} updates",
            mode.flag(),
            latencies.len()
        ));
    }
    out.latency = Quantiles::of(latencies);
    if !l.errors.is_empty() {
        out.notes.push(format!(
            "daemon {} {n}x{e}: {} error lines, first: {}",
            mode.flag(),
            l.errors.len(),
            l.errors[0]
        ));
    }
    drop(l);
    drop(ns);
    if out.notes.is_empty() && std::env::var_os("KPR_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_file(&log_path);
    } else {
        out.notes
            .push(format!("daemon log kept: {}", log_path.display()));
    }
    out
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

/// The test API server on 127.0.0.1 of `ns`, and the runtime it runs on.
pub(crate) fn api_server(ns: &Netns) -> (tokio::runtime::Runtime, kpr_apiserver::ApiServer) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let api = rt
        .block_on(kpr_apiserver::ApiServer::start(kpr_apiserver::Options {
            netns: Some(ns.name().to_owned()),
            ..Default::default()
        }))
        .expect("the test API server starts");
    (rt, api)
}

/// `key=123` in a klog line.
pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let v: String = line[at..]
        .chars()
        .skip_while(|c| *c == '"')
        .take_while(char::is_ascii_digit)
        .collect();
    v.parse().ok()
}

/// utime + stime of a process and of its waited-for children (iptables mode's
/// `iptables-restore` runs), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 to 17 of stat(5) (utime, stime, cutime, cstime); `rest` starts at field 3.
    (11..=14).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// A `kB` line of /proc/PID/status.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_klog_lines() {
        let l = r#"I1201 08:30:00.123456   42 sync.rs:660] Network programming latency changes=1 max_us=812"#;
        assert_eq!(field(l, "max_us"), Some(812));
        assert_eq!(field(l, "changes"), Some(1));
        assert_eq!(field(l, "nope"), None);
        let l =
            r#"I1201 08:30:00.1   42 sync.rs:653] Synced nftables rules full=true elapsed_us=1520"#;
        assert_eq!(field(l, "elapsed_us"), Some(1520));
    }
}
