//! Programming latency with periodic syncs running (issue 16: "p99 < 20 ms at 10,000 x 10,
//! changes 50-1000 ms apart, with periodic syncs running; a sync that changes nothing never
//! delays the next change"). A second daemon, over the first one's table and the same test API
//! server, runs with `syncPeriod` 1 s (a periodic sync every second, each changing nothing) and
//! `minSyncPeriod` 30 ms, below the smallest spacing: a periodic sync that wrongly started the
//! min-sync window would hold the change after it for up to 30 ms. Two parts:
//!
//! - **spaced**: EndpointSlice updates written at a fixed schedule, gaps uniform in 50-1000 ms
//!   (a seeded PRNG), each waited for (its `Network programming latency` line); p50 / p99 /
//!   max, and the periodic syncs that ran meanwhile (their `Synced` lines: `full=false
//!   changed_services=0 ... operations=`);
//! - **probes**: updates written 2-20 ms after a periodic sync's line, inside the window such a
//!   sync would have started; one is counted as delayed when its latency exceeds the spaced
//!   updates' median by half or more of the delay the window would have added.

use crate::Mode;
use crate::netns::Netns;
use crate::running::{Running, Slices, field, latencies};
use crate::stats::{Quantiles, fmt_dur};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How the phase runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) changes: usize,
    pub(crate) probes: usize,
    pub(crate) sync_period: Duration,
    pub(crate) min_sync_period: Duration,
    /// The spaced updates' gaps, uniform in this range (ms).
    pub(crate) gap_ms: (u64, u64),
    /// A probe's delay after a periodic sync's line, uniform in this range (ms).
    pub(crate) probe_ms: (u64, u64),
    pub(crate) seed: u64,
}

impl Plan {
    /// The default run's: ~65 s of spaced updates and ten probes (~10 s).
    pub(crate) fn full() -> Plan {
        Plan {
            changes: 120,
            probes: 10,
            ..Plan::quick()
        }
    }

    /// `--quick`'s: a few of each.
    pub(crate) fn quick() -> Plan {
        Plan {
            changes: 8,
            probes: 2,
            sync_period: Duration::from_secs(1),
            min_sync_period: Duration::from_millis(30),
            gap_ms: (50, 1000),
            probe_ms: (2, 20),
            seed: 0x16_5eed,
        }
    }
}

/// A probe: an update written `after` a periodic sync's line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probe {
    pub(crate) after: Duration,
    pub(crate) latency: Duration,
}

/// What the phase measured.
#[derive(Debug, Clone)]
pub(crate) struct Periodic {
    pub(crate) plan: Plan,
    /// The second daemon: start -> first sync (a restart over the first one's table), and
    /// that sync's own time.
    pub(crate) restart: (Duration, Option<Duration>),
    pub(crate) latency: Option<Quantiles>,
    pub(crate) max: Option<Duration>,
    /// The spaced updates written, and the part's length.
    pub(crate) written: usize,
    pub(crate) phase: Duration,
    /// Periodic syncs (changing nothing) during the spaced part.
    pub(crate) noop_syncs: usize,
    /// Spaced updates written late (the previous one's sync outlasted the gap).
    pub(crate) late: usize,
    pub(crate) probes: Vec<Probe>,
    pub(crate) notes: Vec<String>,
}

impl Periodic {
    /// The delay a min-sync window started by the periodic sync would have added to `p`.
    pub(crate) fn would_be(&self, p: &Probe) -> Duration {
        self.plan.min_sync_period.saturating_sub(p.after)
    }

    /// Probes whose latency exceeds the spaced median by half the would-be delay or more.
    pub(crate) fn delayed(&self) -> usize {
        let Some(median) = self.latency.map(|q| q.p50) else {
            return 0;
        };
        self.probes
            .iter()
            .filter(|p| p.latency >= median + self.would_be(p) / 2)
            .count()
    }

    /// "0 of 10 delayed (max 3.1 ms; would-be delays 10-28 ms)".
    pub(crate) fn probes_summary(&self) -> String {
        if self.probes.is_empty() {
            return "no probe".into();
        }
        let max = self
            .probes
            .iter()
            .map(|p| p.latency)
            .max()
            .unwrap_or_default();
        let wb: Vec<Duration> = self.probes.iter().map(|p| self.would_be(p)).collect();
        format!(
            "{} of {} delayed (latency max {}; the window would have added {}-{})",
            self.delayed(),
            self.probes.len(),
            fmt_dur(max),
            fmt_dur(wb.iter().min().copied().unwrap_or_default()),
            fmt_dur(wb.iter().max().copied().unwrap_or_default()),
        )
    }
}

/// A periodic sync that changed nothing: a partial sync of no Service and no operation.
fn noop(line: &str) -> bool {
    line.contains(" full=false")
        && field(line, "changed_services") == Some(0)
        && line.contains(" operations= ")
}

/// splitmix64: the gaps and probe delays, the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn ms(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// Runs the phase: a second daemon in `ns` against `api` (the first one stopped), `slices`
/// continuing the first one's updates.
pub(crate) fn measure(
    bin: &Path,
    ns: &Netns,
    api: &kpr_apiserver::ApiServer,
    mode: Mode,
    slices: &mut Slices,
    plan: &Plan,
    log_path: PathBuf,
) -> Periodic {
    let go = |d: Duration| format!("{}ms", d.as_millis());
    let (sync, min) = (go(plan.sync_period), go(plan.min_sync_period));
    let (sync_flag, min_flag) = match mode {
        Mode::Nftables => ("--nftables-sync-period", "--nftables-min-sync-period"),
        Mode::Iptables => ("--iptables-sync-period", "--iptables-min-sync-period"),
    };
    eprintln!(
        "   periodic syncs: a second daemon with {sync_flag} {sync} {min_flag} {min}; {} updates {}-{} ms apart, {} probes",
        plan.changes, plan.gap_ms.0, plan.gap_ms.1, plan.probes
    );
    let mut d = Running::start(
        bin,
        ns,
        api,
        mode,
        &[sync_flag, &sync, min_flag, &min],
        log_path,
    );
    let mut out = Periodic {
        plan: plan.clone(),
        restart: d.first_sync(Duration::from_secs(600)),
        latency: None,
        max: None,
        written: 0,
        phase: Duration::ZERO,
        noop_syncs: 0,
        late: 0,
        probes: Vec::new(),
        notes: Vec::new(),
    };
    // Periodic syncs run: wait for the first that changes nothing.
    let seen = |d: &Running, from: usize| d.log().synced[from..].iter().any(|(_, l)| noop(l));
    let t = Instant::now();
    while !seen(&d, 0) && t.elapsed() < plan.sync_period * 5 {
        assert!(d.alive(), "the second daemon exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    if !seen(&d, 0) {
        out.notes.push(format!(
            "periodic syncs: none changing nothing within {:?} of the first sync",
            plan.sync_period * 5
        ));
    }
    let limit = Duration::from_secs(30);
    let mut rng = Rng(plan.seed);

    // Spaced updates, at a fixed schedule.
    let lines_from = d.counts().1;
    let start = Instant::now();
    let mut at = start;
    let mut done = 0;
    for i in 0..plan.changes {
        if i > 0 {
            at += rng.ms(plan.gap_ms);
            match at.checked_duration_since(Instant::now()) {
                Some(wait) => std::thread::sleep(wait),
                None => out.late += 1,
            }
        }
        if !d.update(api, slices, limit) {
            out.notes.push(format!(
                "periodic syncs: update {} not synced within {limit:?}: updates stopped",
                i + 1
            ));
            break;
        }
        done += 1;
    }
    out.written = done;
    out.phase = start.elapsed();
    let end = Instant::now();
    let (spaced, noops) = {
        let l = d.log();
        let spaced = latencies(&l.latency[lines_from.min(l.latency.len())..]);
        let noops = l
            .synced
            .iter()
            .filter(|(at, line)| *at >= start && *at <= end && noop(line))
            .count();
        (spaced, noops)
    };
    if spaced.len() < done {
        out.notes.push(format!(
            "periodic syncs: {} latency lines for {done} updates",
            spaced.len()
        ));
    }
    out.noop_syncs = noops;
    out.max = spaced.iter().max().copied();
    out.latency = Quantiles::of(spaced);

    // Probes: an update just after a periodic sync that changed nothing.
    for _ in 0..plan.probes {
        let from = d.counts().0;
        let t = Instant::now();
        let line_at = loop {
            let hit = d.log().synced[from..]
                .iter()
                .find(|(_, l)| noop(l))
                .map(|(at, _)| *at);
            if let Some(at) = hit {
                break Some(at);
            }
            if t.elapsed() > plan.sync_period * 5 || !d.alive() {
                break None;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let Some(line_at) = line_at else {
            out.notes.push(format!(
                "periodic syncs: no periodic sync within {:?}: probes stopped",
                plan.sync_period * 5
            ));
            break;
        };
        std::thread::sleep(
            (line_at + rng.ms(plan.probe_ms)).saturating_duration_since(Instant::now()),
        );
        let before = d.counts().1;
        let after = line_at.elapsed();
        if !d.update(api, slices, limit) {
            out.notes.push(format!(
                "periodic syncs: a probe not synced within {limit:?}: probes stopped"
            ));
            break;
        }
        let latency = latencies(&d.log().latency[before..before + 1]);
        if let Some(&latency) = latency.first() {
            out.probes.push(Probe { after, latency });
        }
    }
    d.stop();
    let l = d.log();
    if !l.errors.is_empty() {
        out.notes.push(format!(
            "periodic syncs: {} error lines, first: {}",
            l.errors.len(),
            l.errors[0]
        ));
    }
    drop(l);
    eprintln!(
        "   periodic syncs: restart {:?}; latency {:?} max {:?} over {:?}, {} periodic syncs; probes: {}",
        out.restart.0,
        out.latency,
        out.max,
        out.phase,
        out.noop_syncs,
        out.probes_summary()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noop_syncs_are_told_apart() {
        let l = "I1207 06:55:46.183836   21131 after.rs:311] Synced nftables rules full=false changed_services=0 service_ports=IPv4=30000,IPv6=0 operations= bytes=0 elapsed_us=11";
        assert!(noop(l));
        let l = "I1207 09:40:21.549928    8554 after.rs:311] Synced nftables rules full=false changed_services=1 service_ports=IPv4=1000,IPv6=0 operations=IPv4=4 bytes=0 elapsed_us=274";
        assert!(!noop(l));
        let l = "I1207 09:40:20.955446    8554 after.rs:311] Synced nftables rules full=true changed_services=0 service_ports=IPv4=1000,IPv6=0 operations=IPv4=25179 (full),IPv6=50 (full) bytes=0 elapsed_us=70937";
        assert!(!noop(l));
    }

    #[test]
    fn gaps_stay_in_range_and_repeat() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        for _ in 0..1000 {
            let g = a.ms((50, 1000));
            assert!(g >= Duration::from_millis(50) && g <= Duration::from_millis(1000));
            assert_eq!(g, b.ms((50, 1000)));
        }
    }
}
