//! The live node's debug surface: what the proxy knows and did, for people and tools.
//!
//! The sync loop owns the state; it never waits for a reader. It appends a small record per
//! sync and, only when a reader asks (a [`Hub::snapshot`] call finds the last snapshot older
//! than the last sync), publishes a [`Snapshot`]: a copy of the cluster state and the desired
//! state, which are persistent maps, so the copy is O(1) whatever the cluster's size. Readers do everything
//! else (explaining a packet, rendering the committed ruleset, serializing thousands of
//! service ports) on their own time, off the loop's thread for anything heavy.
//!
//! `routes` serves it on the metrics address (`/debug/*`, `/configz`), `page` as HTML for
//! people (`/`, `/service`, `/explain`); `cli` is `kube-proxy-rs explain`, which asks a running
//! proxy or computes offline; `conntrack` is `kube-proxy-rs conntrack`, a Service's live
//! conntrack flows and the endpoint each went to; `verify` compares the kernel's rules with
//! the committed ones (`kube-proxy-rs verify`, `/debug/verify`, the loop's drift check, and
//! the kernel's view in explain).

pub mod cli;
pub mod conntrack;
pub mod page;
pub mod routes;
pub mod verify;

use kpr_config::NodePortAddresses;
use kpr_model::intent::HostView;
use kpr_model::node::NodeContext;
use kpr_model::{ClusterState, DesiredState, IpFamily, ServiceName};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};

/// How many syncs `/debug/syncs` remembers.
pub const SYNC_HISTORY: usize = 100;

/// One sync, as `/debug/syncs` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub full: bool,
    pub changed_services: usize,
    /// Operations (nftables) or chains written (iptables), all families.
    pub operations: usize,
    pub duration_seconds: f64,
    /// `ok`, or the error.
    pub result: String,
    /// The longest network-programming latency of the changes it applied.
    pub programming_latency_seconds: Option<f64>,
}

/// When a Service last changed in the kernel, and how long that took from its trigger.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceChange {
    pub at: SystemTime,
    pub latency: Option<Duration>,
}

/// When each Service last changed in the kernel (a persistent map: a snapshot's copy is O(1)).
pub type Changes = imbl::OrdMap<ServiceName, ServiceChange>;

/// What the loop publishes for readers.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The number of syncs done when it was taken.
    pub generation: u64,
    pub taken: SystemTime,
    pub state: ClusterState,
    /// The desired state of the last sync (what was committed, when it succeeded).
    pub desired: DesiredState,
    pub node: NodeContext,
    pub changes: Changes,
}

/// What does not change while the process runs.
#[derive(Debug, Clone)]
pub struct Static {
    /// `nftables` or `iptables`.
    pub mode: &'static str,
    pub masquerade_bit: u8,
    pub node_ports: NodePortAddresses,
    pub localhost_node_ports: bool,
    /// The effective configuration, as `/configz` serves it.
    pub configz: serde_json::Value,
}

/// Shared between the sync loop (writer) and the debug server (readers).
#[derive(Debug)]
pub struct Hub {
    pub fixed: Static,
    /// Syncs done so far (bumped by the loop after each).
    syncs_done: AtomicU64,
    syncs: Mutex<VecDeque<SyncRecord>>,
    published: watch::Sender<Option<Arc<Snapshot>>>,
    want: Notify,
    /// The iptables mode's back end, for `verify` (set once by `app.rs`).
    ipt: std::sync::OnceLock<verify::IptHost>,
    /// The proxy's health, for the status page (set once by `app.rs`).
    health: std::sync::OnceLock<Arc<kpr_ops::server::Health>>,
    /// The cgroup socket-lb balances, when it is on (set once by `app.rs`), for explain.
    socket_lb: std::sync::OnceLock<String>,
    /// The last comparison of the kernel with the committed rules (explain reuses it for a
    /// while: reading a 10,000-Service table takes seconds), and whether one is under way.
    kernel: Mutex<Option<Arc<verify::Reading>>>,
    reading: std::sync::atomic::AtomicBool,
}

impl Hub {
    pub fn new(fixed: Static) -> Arc<Hub> {
        Arc::new(Hub {
            fixed,
            syncs_done: AtomicU64::new(0),
            syncs: Mutex::new(VecDeque::new()),
            published: watch::channel(None).0,
            want: Notify::new(),
            ipt: std::sync::OnceLock::new(),
            health: std::sync::OnceLock::new(),
            socket_lb: std::sync::OnceLock::new(),
            kernel: Mutex::new(None),
            reading: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Lets the status page show the proxy's health (the first handle given stays).
    pub fn set_health(&self, health: Arc<kpr_ops::server::Health>) {
        let _ = self.health.set(health);
    }

    /// Socket-level load balancing is on for the processes of `cgroup` (explain says so).
    pub fn set_socket_lb(&self, cgroup: String) {
        let _ = self.socket_lb.set(cgroup);
    }

    /// The cgroup socket-lb balances, when it is on.
    pub fn socket_lb(&self) -> Option<&str> {
        self.socket_lb.get().map(String::as_str)
    }

    /// The proxy's health, when it was given.
    pub fn health(&self) -> Option<&Arc<kpr_ops::server::Health>> {
        self.health.get()
    }

    /// The loop: one sync happened.
    pub fn record_sync(&self, record: SyncRecord) {
        let mut syncs = self.syncs.lock().unwrap_or_else(|e| e.into_inner());
        if syncs.len() == SYNC_HISTORY {
            syncs.pop_front();
        }
        syncs.push_back(record);
        self.syncs_done.fetch_add(1, Ordering::Release);
    }

    /// The loop: resolves when a reader wants a fresh snapshot.
    pub async fn wanted(&self) {
        self.want.notified().await
    }

    /// The loop: whether the published snapshot is older than the last sync.
    pub fn stale(&self) -> bool {
        let done = self.syncs_done.load(Ordering::Acquire);
        self.published
            .borrow()
            .as_ref()
            .is_none_or(|s| s.generation < done)
    }

    /// The loop: publishes a snapshot.
    pub fn publish(&self, snapshot: Snapshot) {
        self.published.send_replace(Some(Arc::new(snapshot)));
    }

    /// The number of syncs done so far.
    pub fn syncs_done(&self) -> u64 {
        self.syncs_done.load(Ordering::Acquire)
    }

    /// The last syncs, oldest first.
    pub fn syncs(&self) -> Vec<SyncRecord> {
        self.syncs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// A reader that can do with a snapshot a few syncs behind (explain): the current one at
    /// once if it is younger than `recent` (a fresher one is asked for all the same), else as
    /// [`Hub::snapshot`]. The loop publishes at most a tenth of its time, so on a busy node the
    /// freshest snapshot is always a little behind; waiting for it costs a reader tens of ms.
    pub async fn recent_snapshot(
        &self,
        recent: Duration,
        patience: Duration,
    ) -> Option<Arc<Snapshot>> {
        let current = self.published.borrow().clone();
        match current {
            Some(s) if s.taken.elapsed().is_ok_and(|age| age < recent) => {
                if s.generation < self.syncs_done() {
                    self.want.notify_one();
                }
                Some(s)
            }
            _ => self.snapshot(patience).await,
        }
    }

    /// A reader: the current snapshot, asking the loop for a fresh one when the last is older
    /// than the last sync and waiting for it at most `patience` (a loop busy with a long sync
    /// is not waited for: the older snapshot is served). `None` before the first publication
    /// when the loop does not answer in time.
    pub async fn snapshot(&self, patience: Duration) -> Option<Arc<Snapshot>> {
        let mut rx = self.published.subscribe();
        let done = self.syncs_done();
        let fresh = |s: &Option<Arc<Snapshot>>| s.as_ref().is_some_and(|s| s.generation >= done);
        if fresh(&rx.borrow()) {
            return rx.borrow().clone();
        }
        self.want.notify_one();
        let _ = tokio::time::timeout(patience, rx.wait_for(fresh)).await;
        rx.borrow().clone()
    }

    /// The host facts explain needs for one family: which addresses accept NodePorts, and
    /// whether an undefined ClusterIP port is rejected (nftables) or passed (iptables).
    pub fn host_view(&self, family: IpFamily, node: &NodeContext) -> HostView {
        let node_port_ips =
            match crate::dataplane::node_port_addrs(&self.fixed.node_ports, family, node) {
                kpr_dataplane::nftables::NodePortAddrs::All => None,
                kpr_dataplane::nftables::NodePortAddrs::List(ips) => Some(ips),
            };
        let local_ips = if node_port_ips.is_none() {
            crate::dataplane::local_addresses()
        } else {
            Vec::new()
        };
        HostView {
            node_port_ips,
            local_ips,
            reject_unknown_cluster_ports: self.fixed.mode == "nftables",
        }
    }
}

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;
