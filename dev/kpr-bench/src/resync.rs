//! The memory of a full resync (issue 16: "memory during the hourly full resync"), without
//! waiting an hour: our `masquerading` chain (the canary the repair check reads every 250 ms)
//! is flushed inside the node namespace, the daemon logs "... restoring them" and resyncs
//! everything in one transaction over its existing table, the same code path as the hourly
//! resync (`force_full`: a full render and one transaction). Measured: VmRSS before, the peak
//! during it (VmHWM reset to VmRSS just before, through `/proc/PID/clear_refs`, and VmRSS
//! sampled every 2 ms as a cross-check), VmRSS after, and the resync's time.

use crate::netns::Netns;
use crate::running::{Running, field, nft_intact, reset_peak, status_kib};
use kpr_dataplane::nftables::layout;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One full resync of a running daemon.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resync {
    /// VmRSS just before, KiB.
    pub(crate) before_kib: u64,
    /// The peak during the resync, KiB.
    pub(crate) peak_kib: u64,
    /// VmRSS 300 ms after its sync, KiB.
    pub(crate) after_kib: u64,
    /// The full sync's own `elapsed_us`.
    pub(crate) elapsed: Option<Duration>,
    /// From the flush to the full sync's line (the repair check's wait included).
    pub(crate) restored: Duration,
    /// Operations of the full transaction (`operations=` of its line).
    pub(crate) operations: Option<u64>,
    pub(crate) notes: Vec<String>,
}

impl Resync {
    /// Peak minus VmRSS before, MiB.
    pub(crate) fn growth_mib(&self) -> f64 {
        self.peak_kib.saturating_sub(self.before_kib) as f64 / 1024.0
    }
}

/// Flushes the canary chain of the daemon's table in `ns` and measures the resync that follows
/// (panics if none comes within `limit`, or the chain is not restored).
pub(crate) fn measure(ns: &Netns, d: &mut Running, limit: Duration) -> Resync {
    let mut out = Resync::default();
    let pid = d.pid;
    let (repairs, synced) = {
        let l = d.log();
        (l.repairs.len(), l.synced.len())
    };
    out.before_kib = status_kib(pid, "VmRSS").unwrap_or(0);
    let reset = reset_peak(pid);
    if !reset {
        out.notes.push(
            "full resync: VmHWM could not be reset (/proc/PID/clear_refs): its peak is VmRSS sampled every 2 ms".into(),
        );
    }
    let stop = AtomicBool::new(false);
    let sampled = AtomicU64::new(0);
    let flushed = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Some(k) = status_kib(pid, "VmRSS") {
                    sampled.fetch_max(k, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let t = Instant::now();
        ns.sh(&format!(
            "nft flush chain ip {} {}",
            layout::TABLE,
            layout::MASQUERADING
        ));
        // The repair check's warning, then the full sync after it.
        let line = loop {
            {
                let l = d.log();
                if l.repairs.len() > repairs
                    && let Some((at, line)) = l.synced[synced..]
                        .iter()
                        .find(|(at, line)| *at >= l.repairs[repairs] && line.contains(" full=true"))
                {
                    break Some((at.duration_since(t), line.clone()));
                }
            }
            if t.elapsed() > limit || !d.alive() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        stop.store(true, Ordering::Relaxed);
        line
    });
    let (restored, line) = flushed.unwrap_or_else(|| {
        panic!(
            "no full resync within {limit:?} of flushing our {} chain (log: {})",
            layout::MASQUERADING,
            d.log_path.display()
        )
    });
    out.restored = restored;
    out.elapsed = field(&line, "elapsed_us").map(Duration::from_micros);
    out.operations = line
        .split_once(" operations=IPv4=")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok());
    let hwm = if reset {
        status_kib(pid, "VmHWM").unwrap_or(0)
    } else {
        0
    };
    out.peak_kib = hwm.max(sampled.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_millis(300));
    out.after_kib = status_kib(pid, "VmRSS").unwrap_or(0);
    // Correctness: the chain is back.
    assert!(
        nft_intact(ns),
        "the full resync restored our {} chain",
        layout::MASQUERADING
    );
    eprintln!(
        "   full resync: VmRSS {} MiB -> peak {} MiB (+{:.1} MiB) -> {} MiB; its sync {:?}, restored {:?} after the flush",
        out.before_kib / 1024,
        out.peak_kib / 1024,
        out.growth_mib(),
        out.after_kib / 1024,
        out.elapsed.unwrap_or_default(),
        out.restored
    );
    out
}
