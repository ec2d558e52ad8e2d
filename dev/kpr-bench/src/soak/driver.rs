//! The soak's driver: writes batches to the test API server, paced on the daemon's syncs
//! (read from its log), sends a few UDP datagrams to the Services after each, and samples.

use super::probe;
use super::world::{self, World, Write};
use super::{Plan, Sample};
use crate::Mode;
use crate::cluster;
use crate::netns::Netns;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The daemon's log, as far as the soak reads it.
#[derive(Debug, Default)]
pub(super) struct Log {
    pub(super) synced: u64,
    pub(super) full: u64,
    pub(super) last_sync: Option<Instant>,
    pub(super) ct_deleted: u64,
    /// Error and warning lines after the first sync, by source location: count, first line.
    pub(super) problems: std::collections::BTreeMap<String, (u64, String)>,
}

pub(super) const TRAFFIC_SOCKETS: usize = 4;
const DATAGRAMS_PER_BATCH: usize = 3;
/// A batch the daemon has nothing to program for yields no sync; after this, go on.
const NO_SYNC_GRACE: Duration = Duration::from_secs(10);
pub(super) const QUIET: Duration = Duration::from_millis(500);

/// Feeds the daemon's stderr to a file and to `log`.
pub(super) fn read_log(
    child: &mut Child,
    log: Arc<Mutex<Log>>,
    path: &Path,
) -> std::thread::JoinHandle<()> {
    let stderr = child.stderr.take().expect("stderr piped");
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(path).expect("create the daemon's log file"));
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let now = Instant::now();
            let _ = writeln!(file, "{line}");
            let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
            if line.contains("] Synced ") {
                l.synced += 1;
                l.last_sync = Some(now);
                if line.contains(" full=true") {
                    l.full += 1;
                }
            } else if line.contains("Deleted stale UDP conntrack flows") {
                l.ct_deleted += crate::running::field(&line, "deleted").unwrap_or(0);
            } else if line.starts_with(['E', 'F', 'W']) && l.synced > 0 {
                // After the first sync (startup warnings are about the namespace: sysctls).
                let at = line
                    .split_whitespace()
                    .find(|t| t.ends_with(']'))
                    .unwrap_or("?")
                    .trim_end_matches(']')
                    .to_owned();
                let p = l
                    .problems
                    .entry(at)
                    .or_insert_with(|| (0, line.chars().take(300).collect()));
                p.0 += 1;
            }
        }
        let _ = file.flush();
    })
}

/// Writes to the API server, paced on the daemon's syncs; samples.
pub(super) struct Driver<'a> {
    pub(super) api: &'a kpr_apiserver::ApiServer,
    pub(super) ns: &'a Netns,
    pub(super) mode: Mode,
    pub(super) pid: u32,
    pub(super) world: World,
    pub(super) log: Arc<Mutex<Log>>,
    pub(super) child: &'a mut Child,
    pub(super) socks: Vec<UdpSocket>,
    pub(super) log_path: std::path::PathBuf,
    /// Of the current `drive`.
    pub(super) progress: Progress,
    pub(super) udp_sent: u64,
    pub(super) batches: usize,
    pub(super) unsynced: usize,
}

/// Progress of one `drive`: (changes, created, deleted).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Progress {
    pub(super) changes: usize,
    pub(super) created: usize,
    pub(super) deleted: usize,
}

impl Driver<'_> {
    pub(super) fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn alive(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "the daemon exited (log: {})",
            self.log_path.display()
        );
    }

    pub(super) fn sample(&self, label: &str) -> Sample {
        Sample {
            label: label.to_owned(),
            changes: self.progress.changes,
            created: self.progress.created,
            live: self.world.live_temps(),
            proc: probe::process(self.pid),
            kernel: probe::kernel(self.ns, self.mode),
            ct: probe::conntrack(
                self.ns,
                self.api.port(),
                &self.world.udp_serving(),
                world::UDP_PORT,
            ),
        }
    }

    fn apply(&self, writes: Vec<Write>) {
        for w in writes {
            match w {
                Write::Apply(v) => {
                    self.api.apply(v);
                }
                Write::Delete(kind, name) => {
                    assert!(
                        self.api.delete(kind, cluster::NAMESPACE, &name),
                        "{kind:?} {name} exists"
                    );
                }
            }
        }
    }

    /// `changes` EndpointSlice writes and `churn` temporary Services created and deleted, in
    /// batches; a sample (after a quiet moment) every `every` changes.
    pub(super) fn drive(
        &mut self,
        changes: usize,
        churn: usize,
        plan: &Plan,
        every: Option<usize>,
    ) -> Vec<Sample> {
        self.progress = Progress::default();
        let (mut done, mut created, mut deleted) = (0usize, 0usize, 0usize);
        let frontends = self.world.udp_frontends();
        let mut samples = Vec::new();
        let mut next = every.unwrap_or(usize::MAX);
        loop {
            let left_changes = changes - done.min(changes);
            let left_churn = (churn - created) + (churn - deleted);
            if left_changes == 0 && left_churn == 0 {
                break;
            }
            self.world.next_batch();
            let size = self.world.rng().below(plan.max_batch) + 1;
            let mut writes = Vec::new();
            let mut churned = false;
            while (writes.len() as u32) < size {
                let left_changes = changes - done.min(changes);
                let left_churn = (churn - created) + (churn - deleted);
                let can_create = created < churn && self.world.can_create();
                let can_delete = deleted < created && self.world.can_delete();
                let roll = self
                    .world
                    .rng()
                    .below((left_changes + left_churn).max(1) as u32);
                if (roll as usize) < left_churn && (can_create || can_delete) {
                    // Towards half the pool alive: more objects held, more to free.
                    let create = can_create
                        && (!can_delete
                            || self.world.rng().below(world::POOL)
                                >= self.world.live_temps() as u32);
                    if create {
                        writes.extend(self.world.create());
                        created += 1;
                    } else {
                        writes.extend(self.world.delete());
                        deleted += 1;
                    }
                    churned = true;
                } else if left_changes > 3 {
                    let w = self.world.change();
                    done += w.len();
                    writes.extend(w);
                } else {
                    break;
                }
            }
            // Every batch ends with a change the daemon must program (unless the churn did).
            if done < changes || !churned {
                let w = self.world.moved();
                done += w.len();
                writes.extend(w);
            }
            self.apply(writes);
            let at = Instant::now();
            self.batches += 1;
            self.progress = Progress {
                changes: done,
                created,
                deleted,
            };
            if !self.synced_after(at) {
                self.unsynced += 1;
            }
            self.traffic(&frontends);
            if done >= next && done < changes {
                next += every.unwrap_or(usize::MAX);
                self.quiet(QUIET, Instant::now());
                let s = self.sample(&done.to_string());
                eprintln!(
                    "   {done} changes, {created} Services created ({} live): RSS {} KiB (anon {} KiB), {} fds, {} threads, {} conntrack entries",
                    s.live, s.proc.rss, s.proc.anon, s.proc.fds, s.proc.threads, s.ct.total
                );
                samples.push(s);
            }
        }
        samples
    }

    /// Writes what brings the permanent Services back to their first state; the count.
    pub(super) fn restore(&mut self) -> usize {
        let w = self.world.restore();
        let n = w.len();
        if n > 0 {
            self.apply(w);
            let at = Instant::now();
            self.synced_after(at);
        }
        n
    }

    /// Waits for a sync that ended after `at`; `false` after [`NO_SYNC_GRACE`] without one.
    fn synced_after(&mut self, at: Instant) -> bool {
        loop {
            if self.log().last_sync.is_some_and(|t| t > at) {
                return true;
            }
            if at.elapsed() > NO_SYNC_GRACE {
                return false;
            }
            self.alive();
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Waits until no sync for `quiet`, and at least `quiet` after `since`.
    pub(super) fn quiet(&mut self, quiet: Duration, since: Instant) {
        let limit = Instant::now() + Duration::from_secs(120);
        loop {
            let last = self.log().last_sync.unwrap_or(since).max(since);
            if last.elapsed() >= quiet {
                return;
            }
            assert!(
                Instant::now() < limit,
                "the daemon kept syncing for 120 s (log: {})",
                self.log_path.display()
            );
            self.alive();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A few datagrams to random UDP Services from the node namespace.
    fn traffic(&mut self, frontends: &[Ipv4Addr]) {
        for _ in 0..DATAGRAMS_PER_BATCH {
            let ip = frontends[self.world.rng().below(frontends.len() as u32) as usize];
            let s = &self.socks[self.world.rng().below(self.socks.len() as u32) as usize];
            if s.send_to(b"soak", (ip, world::UDP_PORT)).is_ok() {
                self.udp_sent += 1;
            }
        }
    }
}
