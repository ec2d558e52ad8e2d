//! The loop: folds inputs, decides when to sync (coalescing, min-sync-period, retries with
//! backoff, every syncPeriod, a full resync every hour), checks the kernel's tables (repair,
//! drift) and publishes debug snapshots when readers ask.

use super::after::log_report;
use super::{SyncReport, SyncState};
use kpr_model::Input;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Runs the loop until `shutdown` turns true or every sender is gone. Each sync's report is sent
/// to `reports` (the data plane's place until it lands; tests count syncs with it).
pub async fn run(
    mut state: SyncState,
    mut inputs: mpsc::Receiver<Input>,
    mut shutdown: watch::Receiver<bool>,
    reports: mpsc::UnboundedSender<SyncReport>,
) -> SyncState {
    let mut last_sync: Option<Instant> = None;
    // The last sync that wrote to the kernel (or failed): `minSyncPeriod` counts from it. A
    // periodic sync that found nothing to do does not start the window, so it never delays
    // the change that comes right after it.
    let mut last_write: Option<Instant> = None;
    let mut retry_delay = Duration::ZERO;
    let mut periodic = tokio::time::interval_at(
        Instant::now() + state.cfg.sync_period,
        state.cfg.sync_period,
    );
    let mut full_periodic =
        tokio::time::interval_at(Instant::now() + FULL_SYNC_PERIOD, FULL_SYNC_PERIOD);
    // A sync that outlasts the period must not be followed by a burst of catch-up ticks
    // (each a forced sync ahead of the inputs in this biased select).
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    full_periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_repair = Instant::now() + REPAIR_INTERVAL;
    // Debug snapshots: the earliest the next may be published, and one deferred until then.
    let mut next_publish = Instant::now();
    let mut publish_at: Option<Instant> = None;
    // The drift check: a full comparison of the kernel with what was committed, run off this
    // thread (this loop never waits for it), while the last sync succeeded.
    let drift_every = state.cfg.sync_period.max(DRIFT_MIN_INTERVAL);
    let mut next_drift = Instant::now() + drift_every;
    let (drift_tx, mut drift_rx) = mpsc::unbounded_channel();
    let mut drift = DriftCheck::default();
    let mut last_ok = false;
    // The failed syncs in a row, and when the first of them was.
    let mut failing: Option<(u32, Instant)> = None;
    // Bumped by every sync that wrote to the kernel (or failed): a comparison that started
    // before one says nothing. Syncs that wrote nothing (the periodic ones) leave it alone.
    let mut kernel_gen: u64 = 0;
    loop {
        let due = if state.pending() {
            let min = state.cfg.min_sync_period.max(retry_delay);
            Some(last_write.map_or_else(Instant::now, |t| t + min))
        } else {
            None
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = periodic.tick() => state.force_sync(),
            _ = full_periodic.tick() => state.force_full(),
            _ = tokio::time::sleep_until(next_repair), if state.dataplane.is_some() && last_sync.is_some() => {
                let start = Instant::now();
                if !state.verify() {
                    tracing::warn!("Our {} rules were deleted or flushed by someone else; restoring them", state.mode());
                    if let Some(m) = &state.metrics {
                        m.rules_repaired.inc();
                    }
                    state.force_full();
                    (last_sync, last_write) = (None, None);
                }
                // The check is one netlink rule dump of a canary chain (about 40 µs); should it
                // ever grow with the table, it stays under a tenth of the time.
                next_repair = Instant::now() + REPAIR_INTERVAL.max(start.elapsed() * 10);
            }
            _ = tokio::time::sleep_until(next_drift), if !drift.running && !drift.off && state.dataplane.is_some() && state.debug.is_some() => {
                next_drift = Instant::now() + drift_every;
                let ports: usize = state.desired.families.values().map(|f| f.ports.len()).sum();
                if ports > DRIFT_MAX_PORTS {
                    if !drift.too_large {
                        tracing::info!(
                            service_ports = ports,
                            "The periodic drift check is off above {DRIFT_MAX_PORTS} service ports (each check renders and lists every rule); `kube-proxy-rs verify` compares on demand, and the hourly full resync rewrites everything"
                        );
                        drift.too_large = true;
                    }
                    continue;
                }
                drift.too_large = false;
                if let (true, Some(_), Some(job)) = (last_ok, last_sync, state.drift_job()) {
                    drift.running = true;
                    let (tx, generation) = (drift_tx.clone(), kernel_gen);
                    tokio::task::spawn_blocking(move || {
                        let start = std::time::Instant::now();
                        let found = job.run();
                        let _ = tx.send((generation, found, start.elapsed()));
                    });
                }
            }
            Some((generation, found, took)) = drift_rx.recv() => {
                drift.running = false;
                // It lists every rule of ours (iptables-nft-save alone takes 8 s at 10,000
                // Services): keep it under a tenth of the time.
                next_drift = Instant::now() + drift_every.max(took * 10);
                if state.drift_found(generation == kernel_gen, found, &mut drift) {
                    (last_sync, last_write) = (None, None);
                }
            }
            input = inputs.recv() => match input {
                Some(input) => {
                    state.record(input);
                    // Coalesce whatever else is already queued.
                    while let Ok(more) = inputs.try_recv() {
                        state.record(more);
                    }
                    if state.exit_reason().is_some() {
                        break;
                    }
                }
                None => break,
            },
            _ = wanted(&state.debug), if publish_at.is_none() => {
                // At most a tenth of the loop's time: a snapshot of 10,000 Services is a few
                // milliseconds of copying; readers wait for a later one instead.
                let now = Instant::now();
                if now >= next_publish {
                    next_publish = now + state.publish_debug() * 10;
                } else {
                    publish_at = Some(next_publish);
                }
            }
            _ = sleep_until(publish_at), if publish_at.is_some() => {
                publish_at = None;
                next_publish = Instant::now() + state.publish_debug() * 10;
            }
            _ = sleep_until(due), if due.is_some() => {
                let report = state.sync();
                last_sync = Some(Instant::now());
                last_ok = matches!(report.applied, None | Some(Ok(_)));
                let wrote = match &report.applied {
                    Some(Ok(a)) => !a.families.is_empty(),
                    Some(Err(_)) => true,
                    None => !report.plan.is_empty(),
                };
                if wrote {
                    kernel_gen += 1;
                    last_write = last_sync;
                }
                retry_delay = match &report.applied {
                    Some(Err(_)) => (retry_delay * 2).clamp(Duration::from_secs(1), state.cfg.sync_period),
                    _ => Duration::ZERO,
                };
                failing = log_report(&report, failing, state.cfg.min_sync_period.max(retry_delay));
                let _ = reports.send(report);
            }
        }
    }
    state
}

/// How often everything is rewritten even without changes (upstream's `FullSyncPeriod`, §11).
/// The syncs every `syncPeriod` in between are partial: a full rewrite of 10,000 Services costs
/// the kernel about a second and the process a full transaction's memory, and drift is caught
/// within a second by the repair check instead.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// How often, at most, the data plane's tables are checked for outside deletion or flushing
/// (less often on large tables, where one check costs more; see `run`).
pub const REPAIR_INTERVAL: Duration = Duration::from_millis(250);

/// The drift check runs every syncPeriod, but at most this often (and at most a tenth of the
/// time: it lists every rule of ours).
pub const DRIFT_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The periodic drift check runs only while the state has at most this many service ports:
/// a check renders every rule and lists the kernel's (at 10,000 Services x 10 endpoints, about
/// 2.5 s of CPU and 150 MB of transient memory), which the proxy must not pay every period.
pub const DRIFT_MAX_PORTS: usize = 1_000;

/// At most this many differences are logged per drift check (`kube-proxy-rs verify` lists all).
const DRIFT_LOG_LINES: usize = 20;

/// The drift check, as the loop sees it.
#[derive(Debug, Default)]
pub(super) struct DriftCheck {
    /// A comparison is running on the blocking pool.
    running: bool,
    /// The kernel cannot be read (no `nft`): checks stop.
    pub(super) off: bool,
    /// The last comparison failed (logged once per streak).
    failing: bool,
    /// The differences the last full resync was for: found again after it, they are not
    /// resynced for again (a tool that keeps changing our rules, or an `nft` that lists them
    /// in another spelling, would otherwise cost a full resync every period).
    resynced_for: Option<Vec<String>>,
    /// That was logged.
    persisting: bool,
    /// The state is too large for the periodic check (logged once per streak).
    too_large: bool,
}

impl SyncState {
    /// A comparison of the kernel with the committed rules, to run off the loop's thread
    /// (needs the debug hub and a data plane).
    fn drift_job(&self) -> Option<crate::debug::verify::DriftJob> {
        let hub = self.debug.as_ref()?;
        self.dataplane.as_ref()?;
        Some(crate::debug::verify::DriftJob::new(
            hub,
            self.desired.clone(),
            self.node_context(),
        ))
    }

    /// A drift check's result: differences are logged (capped), counted per family, and a
    /// full resync is asked for. Returns whether one is due now. A result that is not
    /// `fresh` (a sync wrote to the kernel after the check started) says nothing.
    pub(super) fn drift_found(
        &mut self,
        fresh: bool,
        found: crate::debug::verify::Drift,
        check: &mut DriftCheck,
    ) -> bool {
        use crate::debug::verify::Drift;
        if !fresh {
            return false;
        }
        let diffs = match found {
            Drift::None => {
                check.failing = false;
                check.resynced_for = None;
                check.persisting = false;
                return false;
            }
            Drift::Unavailable(e) => {
                tracing::info!(
                    "Cannot read the kernel's rules to compare them with the committed ones; the drift check is off: {e}"
                );
                check.off = true;
                return false;
            }
            Drift::Failed(e) => {
                if !check.failing {
                    tracing::warn!("The drift check could not compare the kernel's rules: {e}");
                }
                check.failing = true;
                return false;
            }
            Drift::Found(d) => d,
        };
        check.failing = false;
        let seen: Vec<String> = diffs.iter().map(ToString::to_string).collect();
        if check.resynced_for.as_ref() == Some(&seen) {
            if !check.persisting {
                tracing::warn!(
                    differences = seen.len(),
                    "The same differences persist after a full resync; not resyncing for them again (kube-proxy-rs verify lists them)"
                );
            }
            check.persisting = true;
            return false;
        }
        check.resynced_for = Some(seen);
        check.persisting = false;
        for d in diffs.iter().take(DRIFT_LOG_LINES) {
            tracing::warn!(family = %d.family, object = %d.object, "Kernel rules differ from the committed ones: {}", d.detail);
        }
        if diffs.len() > DRIFT_LOG_LINES {
            tracing::warn!(
                "... and {} more differences (kube-proxy-rs verify lists them all)",
                diffs.len() - DRIFT_LOG_LINES
            );
        }
        let families: std::collections::BTreeSet<&str> =
            diffs.iter().map(|d| d.family.as_str()).collect();
        if let Some(m) = &self.metrics {
            for f in &families {
                m.rules_drift.with_label_values(&[f]).inc();
            }
        }
        tracing::warn!(
            differences = diffs.len(),
            "Our {} rules in the kernel drifted from what was committed; resyncing everything",
            self.mode()
        );
        self.force_full();
        true
    }
}

/// Resolves when a debug reader wants a snapshot (never without a hub).
async fn wanted(hub: &Option<std::sync::Arc<crate::debug::Hub>>) {
    match hub {
        Some(h) => h.wanted().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}
