//! A daemon under test: the release binary started in a node namespace against the test API
//! server, its log lines as they arrive, its /proc readings (RSS, peak, CPU), and the
//! EndpointSlice updates written to its API server. What the daemon, full-resync and
//! periodic-sync measurements share.

use crate::Mode;
use crate::cluster;
use crate::netns::Netns;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Lines of interest, with when they arrived.
#[derive(Debug, Default)]
pub(crate) struct Log {
    pub(crate) synced: Vec<(Instant, String)>,
    pub(crate) latency: Vec<(Instant, String)>,
    /// The repair check's "restoring them" warnings.
    pub(crate) repairs: Vec<Instant>,
    pub(crate) errors: Vec<String>,
}

/// A daemon running in a node namespace, its log read line by line.
pub(crate) struct Running {
    child: Child,
    pub(crate) pid: u32,
    log: Arc<Mutex<Log>>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub(crate) log_path: PathBuf,
    pub(crate) started: Instant,
}

impl Running {
    /// Starts `bin` in `ns` against `api`, with the flags every run uses and `extra`; its log
    /// goes to `log_path`.
    pub(crate) fn start(
        bin: &Path,
        ns: &Netns,
        api: &kpr_apiserver::ApiServer,
        mode: Mode,
        extra: &[&str],
        log_path: PathBuf,
    ) -> Running {
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(bin)
            .args(["--master", &api.url(), "--proxy-mode", mode.flag()])
            .args(["--hostname-override", cluster::NODE])
            .args(["--cluster-cidr", "10.0.0.0/8"])
            .args(extra)
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
                        l.latency.push((now, line));
                    } else if line.contains("restoring them") {
                        l.repairs.push(now);
                    } else if line.starts_with('E') || line.starts_with('F') {
                        l.errors.push(line);
                    }
                }
                let _ = file.flush();
            })
        };
        Running {
            child,
            pid,
            log,
            reader: Some(reader),
            log_path,
            started,
        }
    }

    pub(crate) fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (Synced lines, latency lines) so far.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let l = self.log();
        (l.synced.len(), l.latency.len())
    }

    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the first sync (panics if the daemon exits or `limit` passes); returns the
    /// time from process start to its line, and its own `elapsed_us`.
    pub(crate) fn first_sync(&mut self, limit: Duration) -> (Duration, Option<Duration>) {
        while self.counts().0 == 0 {
            assert!(
                self.alive(),
                "the daemon exited before its first sync (log: {})",
                self.log_path.display()
            );
            assert!(
                self.started.elapsed() < limit,
                "no first sync within {limit:?} (log: {})",
                self.log_path.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let l = self.log();
        let (at, line) = &l.synced[0];
        (
            at.duration_since(self.started),
            field(line, "elapsed_us").map(Duration::from_micros),
        )
    }

    /// Waits until no sync has happened for 500 ms (at most 30 s).
    pub(crate) fn quiet(&self) {
        let mut last = self.counts();
        let mut quiet = Instant::now();
        let settling = Instant::now();
        while quiet.elapsed() < Duration::from_millis(500)
            && settling.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.counts();
            if now != last {
                last = now;
                quiet = Instant::now();
            }
        }
    }

    /// Writes one update and waits for its latency line (at most `limit`); false if none came.
    pub(crate) fn update(
        &mut self,
        api: &kpr_apiserver::ApiServer,
        slices: &mut Slices,
        limit: Duration,
    ) -> bool {
        let before = self.counts().1;
        slices.write(api);
        let wait = Instant::now();
        while self.counts().1 == before && wait.elapsed() < limit {
            assert!(self.alive(), "the daemon exited during the updates");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.counts().1 > before
    }

    /// Kills the daemon and waits for its log to end.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The EndpointSlice updates of one size: update `step` moves one endpoint of Service
/// `step x 7919 mod N` (a permutation of the Services), each write carrying the moment of
/// writing as its `last-change-trigger-time`.
#[derive(Debug)]
pub(crate) struct Slices {
    n: u32,
    e: u32,
    step: u64,
    generations: HashMap<u32, u32>,
}

impl Slices {
    pub(crate) fn new(n: u32, e: u32) -> Slices {
        Slices {
            n,
            e,
            step: 0,
            generations: HashMap::new(),
        }
    }

    /// Writes the next update.
    pub(crate) fn write(&mut self, api: &kpr_apiserver::ApiServer) {
        self.step += 1;
        let svc = (self.step * 7919 % u64::from(self.n)) as u32;
        let g = self.generations.entry(svc).or_default();
        *g += 1;
        let trigger = kpr_ops::time::rfc3339_nano(SystemTime::now());
        api.apply(cluster::slice(svc, self.e, *g, Some(&trigger)));
    }
}

/// The latencies (`max_us`) of some latency lines.
pub(crate) fn latencies(lines: &[(Instant, String)]) -> Vec<Duration> {
    lines
        .iter()
        .filter_map(|(_, line)| field(line, "max_us"))
        .map(Duration::from_micros)
        .collect()
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
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 to 17 of stat(5) (utime, stime, cutime, cstime); `rest` starts at field 3.
    (11..=14).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// A `kB` line of /proc/PID/status.
pub(crate) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Our IPv4 table is in `ns`'s kernel and its `masquerading` chain has rules (one netlink rule
/// dump: `nft list` would read the whole table first, two minutes at 100,000 x 10).
pub(crate) fn nft_intact(ns: &Netns) -> bool {
    use kpr_nft::Executor as _;
    let table = kpr_nft::Table {
        family: kpr_nft::Family::Ip,
        name: kpr_dataplane::nftables::layout::TABLE.into(),
        comment: None,
    };
    kpr_nft::Netlink::in_netns(ns.name())
        .and_then(|mut nl| nl.table_intact(&table, kpr_dataplane::nftables::layout::MASQUERADING))
        .unwrap_or(false)
}

/// Resets the process's VmHWM to its VmRSS (`/proc/PID/clear_refs`, Linux 4.0 and later);
/// false where the kernel does not allow it.
pub(crate) fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
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
