//! The sync loop: one task owns all state, folds inputs, and decides when to sync.
//!
//! Inputs from every source arrive on one channel. Nothing is synced until each source has
//! delivered its first full list (a `Replace` or `Keep` of Services and of EndpointSlices, §2.1 step 11);
//! after that, bursts are coalesced and syncs are at least `min_sync_period` apart (§11). A sync
//! computes the desired state, applies it through the data plane (when there is one), and
//! reports what it did, with the network-programming latency of the changes it committed.
//! A sync the kernel refuses (for one family or both) is retried as a full one after a delay
//! doubling from 1 s to syncPeriod, counted in the mode's failure metric and logged in words
//! once per refusal (`log_report`); the refused family stays queued for the health model.

use crate::dataplane::Dataplane;
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{DesiredState, Input, IpFamily, SyncPlan, Trackers, Update, update_desired};
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

/// What the sync loop needs from the configuration.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// This node's name (lower-cased): local endpoints and node hints are matched against it.
    pub node_name: String,
    pub masquerade_all: bool,
    pub detect_local: DetectLocalMode,
    /// A non-unspecified `bindAddress` overrides the node IP of its family (§2.2).
    pub bind_address: Option<IpAddr>,
    pub min_sync_period: Duration,
    /// Periodic full resync (and, with a data plane, the retry delay cap).
    pub sync_period: Duration,
    /// Program nothing until this node's Node has arrived with an address (and, in NodeCIDR
    /// mode, its podCIDRs), as upstream's startup waits for it (§2.1 step 5). The API source
    /// sets it; a manifest directory may have no Node.
    pub wait_for_node: bool,
}

/// The result of one sync, for logging and (later) metrics.
#[derive(Debug, Clone)]
pub struct SyncReport {
    pub plan: SyncPlan,
    /// Service ports per family after the sync.
    pub ports: Vec<(IpFamily, usize)>,
    /// The data plane's result (`None` without a data plane).
    pub applied: Option<Result<crate::dataplane::ApplyReport, crate::dataplane::SyncFailure>>,
    /// Network-programming latency of the EndpointSlice changes this sync put in the kernel
    /// (from their last-change-trigger-time; empty unless the data plane applied them).
    pub network_programming: Vec<Duration>,
    /// "nftables" or "iptables".
    pub mode: &'static str,
}

/// All state the loop owns.
#[derive(Debug)]
pub struct SyncState {
    cfg: SyncConfig,
    trackers: Trackers,
    desired: DesiredState,
    context: Option<(NodeContext, ProxyPolicy)>,
    services_listed: bool,
    slices_listed: bool,
    wrong_node_logged: bool,
    dataplane: Option<Dataplane>,
    /// The last sync failed, or a repair or periodic resync is due: sync even without changes.
    force: bool,
    /// This node's IPs and podCIDRs as first seen: a change makes the process exit (§2.3).
    node_baseline: Option<NodeBaseline>,
    /// Why the process must exit, once it must.
    exit: Option<String>,
    /// What `/healthz` and `/livez` report (§7.1).
    health: Option<std::sync::Arc<kpr_ops::server::Health>>,
    /// The exported metrics (§8).
    metrics: Option<std::sync::Arc<kpr_ops::metrics::Metrics>>,
    /// healthCheckNodePort servers (§7.2), bound to the NodePort addresses.
    service_health: Option<(
        kpr_ops::service_health::ServiceHealth,
        kpr_config::NodePortAddresses,
    )>,
    /// The debug surface: sync records, and snapshots published when a reader asks.
    debug: Option<std::sync::Arc<crate::debug::Hub>>,
    /// When each Service last changed in the kernel (for the debug surface).
    changes: crate::debug::Changes,
    /// What the work after a sync reads of the desired state, kept per Service (O(changes)).
    after_index: index::AfterIndex,
    /// When this state began tracking changes: trigger times before it are not this
    /// process's latency (upstream's `trackerStartTime`), e.g. a restart's first list.
    tracking_since: std::time::SystemTime,
}

/// The node facts the process cannot change without a restart (§2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeBaseline {
    ips: std::collections::BTreeMap<IpFamily, IpAddr>,
    pod_cidrs: Vec<ipnet::IpNet>,
}

impl SyncState {
    pub fn new(cfg: SyncConfig) -> SyncState {
        SyncState {
            cfg,
            trackers: Trackers::new(),
            desired: DesiredState::default(),
            context: None,
            services_listed: false,
            slices_listed: false,
            wrong_node_logged: false,
            dataplane: None,
            force: false,
            node_baseline: None,
            exit: None,
            health: None,
            metrics: None,
            service_health: None,
            debug: None,
            changes: crate::debug::Changes::new(),
            after_index: index::AfterIndex::default(),
            tracking_since: std::time::SystemTime::now(),
        }
    }

    /// Records syncs into this debug hub and publishes snapshots when its readers ask.
    pub fn with_debug(mut self, hub: std::sync::Arc<crate::debug::Hub>) -> SyncState {
        self.debug = Some(hub);
        self
    }

    /// Publishes a snapshot for the debug readers, if one is wanted and the last is stale;
    /// returns how long that took.
    pub fn publish_debug(&self) -> Duration {
        let start = Instant::now();
        let Some(hub) = &self.debug else {
            return Duration::ZERO;
        };
        if !hub.stale() {
            return Duration::ZERO;
        }
        hub.publish(self.debug_snapshot(hub.syncs_done()));
        start.elapsed()
    }

    /// What the loop knows now, as the debug surface reads it (`generation`: the syncs done).
    pub fn debug_snapshot(&self, generation: u64) -> crate::debug::Snapshot {
        crate::debug::Snapshot {
            generation,
            taken: std::time::SystemTime::now(),
            state: self.trackers.state().clone(),
            desired: self.desired.clone(),
            node: self.node_context(),
            changes: self.changes.clone(),
        }
    }

    /// Programs the kernel through this data plane on every sync.
    pub fn with_dataplane(mut self, dataplane: Dataplane) -> SyncState {
        self.dataplane = Some(dataplane);
        self
    }

    /// Reports to this health state: queued changes, successful syncs, node eligibility.
    pub fn with_health(mut self, health: std::sync::Arc<kpr_ops::server::Health>) -> SyncState {
        health.set_node_eligible(!self.cfg.wait_for_node);
        self.health = Some(health);
        self
    }

    /// Runs healthCheckNodePort servers (§7.2) on these NodePort addresses.
    pub fn with_service_health(
        mut self,
        servers: kpr_ops::service_health::ServiceHealth,
        node_ports: kpr_config::NodePortAddresses,
    ) -> SyncState {
        self.service_health = Some((servers, node_ports));
        self
    }

    /// The healthCheckNodePorts served now.
    pub fn health_check_ports(&self) -> Vec<u16> {
        self.service_health
            .as_ref()
            .map(|(s, _)| s.ports())
            .unwrap_or_default()
    }

    /// Keeps these metrics (§8).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<kpr_ops::metrics::Metrics>) -> SyncState {
        let now = unix_now();
        for family in ["IPv4", "IPv6"] {
            // Upstream sets the queued time at loop start.
            metrics.last_queued.with_label_values(&[family]).set(now);
        }
        self.metrics = Some(metrics);
        self
    }

    /// The metrics this loop keeps, if any.
    pub fn metrics(&self) -> Option<&std::sync::Arc<kpr_ops::metrics::Metrics>> {
        self.metrics.as_ref()
    }

    /// Makes a sync due even without changes (the periodic sync: health stays fresh, and it
    /// is partial, so it costs nothing when nothing changed).
    pub fn force_sync(&mut self) {
        self.force = true;
    }

    /// Makes the next sync a full one, even without changes (hourly resync, repair).
    pub fn force_full(&mut self) {
        self.trackers.request_full();
        self.force = true;
    }

    /// Whether the data plane's tables are still intact (always true without one).
    /// The data plane's mode ("nftables" without one: the default mode).
    pub fn mode(&self) -> &'static str {
        self.dataplane.as_ref().map_or("nftables", Dataplane::mode)
    }

    pub fn verify(&mut self) -> bool {
        self.dataplane.as_mut().is_none_or(Dataplane::verify)
    }

    /// Folds one input in, logging what was skipped (one line per object).
    pub fn record(&mut self, input: Input) {
        if let Some(m) = &self.metrics {
            let (services, slices) = match &input {
                Input::Services(Update::Replace(v)) => (v.len(), 0),
                Input::Services(Update::Keep(_)) | Input::Slices(Update::Keep(_)) => (0, 0),
                Input::Services(_) => (1, 0),
                Input::Slices(Update::Replace(v)) => (0, v.len()),
                Input::Slices(_) => (0, 1),
                Input::Node(_) | Input::ServiceCidrs(_) => (0, 0),
            };
            m.service_changes_total.inc_by(services as u64);
            m.service_changes_pending.add(services as i64);
            m.endpoint_changes_total.inc_by(slices as u64);
            m.endpoint_changes_pending.add(slices as i64);
        }
        match &input {
            Input::Services(Update::Replace(_) | Update::Keep(_)) => self.services_listed = true,
            Input::Slices(Update::Replace(_) | Update::Keep(_)) => self.slices_listed = true,
            Input::Node(Some(node)) => {
                let name = node.metadata.name.as_deref().unwrap_or("");
                if name != self.cfg.node_name {
                    if !self.wrong_node_logged {
                        tracing::warn!(node = name, expected = %self.cfg.node_name, "Ignoring Node object for another node");
                        self.wrong_node_logged = true;
                    }
                    return;
                }
            }
            Input::Node(None) if self.node_baseline.is_some() && self.cfg.wait_for_node => {
                self.exit = Some("this node's Node object was deleted".into());
            }
            _ => {}
        }
        let node_input = matches!(input, Input::Node(_));
        for skipped in self.trackers.record(input) {
            tracing::warn!("{skipped}");
        }
        if node_input {
            self.check_node();
        }
        if let (Some(m), true) = (&self.metrics, self.trackers.has_pending()) {
            for family in ["IPv4", "IPv6"] {
                m.last_queued.with_label_values(&[family]).set(unix_now());
            }
        }
        if let Some(h) = &self.health {
            if self.trackers.has_pending() {
                h.update(|m| m.queued(std::time::SystemTime::now()));
            }
            if node_input {
                // Eligible while the Node exists and is not being deleted or drained (§7.1);
                // a manifest directory without a Node does not make the node ineligible.
                let eligible = match self.trackers.state().node() {
                    Some(facts) => !facts.being_deleted,
                    None => !self.cfg.wait_for_node,
                };
                h.set_node_eligible(eligible);
            }
        }
    }

    /// Takes the node's IPs and podCIDRs as the baseline once they are known, and asks for an
    /// exit when they change afterwards (§2.3: the process restarts with the new values).
    fn check_node(&mut self) {
        let Some(facts) = self.trackers.state().node() else {
            return;
        };
        let node_cidr = matches!(self.cfg.detect_local, DetectLocalMode::NodeCidr);
        let now = NodeBaseline {
            ips: facts.node_ips.clone(),
            pod_cidrs: if node_cidr {
                facts.pod_cidrs.clone()
            } else {
                Vec::new()
            },
        };
        match &self.node_baseline {
            None if !now.ips.is_empty() && (!node_cidr || !now.pod_cidrs.is_empty()) => {
                self.node_baseline = Some(now);
            }
            Some(before) if *before != now && self.cfg.wait_for_node => {
                self.exit = Some(format!(
                    "this node's IPs or podCIDRs changed (from {:?} {:?} to {:?} {:?}); exiting so the restart uses them",
                    before.ips, before.pod_cidrs, now.ips, now.pod_cidrs
                ));
            }
            _ => {}
        }
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    /// Why the process must exit now, if it must.
    pub fn exit_reason(&self) -> Option<&str> {
        self.exit.as_deref()
    }

    /// Every source has delivered its first full list.
    pub fn ready(&self) -> bool {
        self.services_listed
            && self.slices_listed
            && (!self.cfg.wait_for_node || self.node_baseline.is_some())
    }

    /// A sync would do something.
    pub fn pending(&self) -> bool {
        self.ready() && (self.force || self.trackers.has_pending())
    }

    /// The cluster as the loop knows it.
    pub fn cluster_state(&self) -> &kpr_model::ClusterState {
        self.trackers.state()
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// This node as the model sees it now (§2.2: a non-unspecified bindAddress overrides the
    /// node IP of its family).
    pub fn node_context(&self) -> NodeContext {
        let mut ctx = NodeContext::new(self.cfg.node_name.clone(), self.trackers.state().node());
        if let Some(ip) = self.cfg.bind_address.filter(|ip| !ip.is_unspecified()) {
            ctx.node_ips.insert(IpFamily::of(&ip), ip);
        }
        ctx
    }

    /// Brings the desired state up to date with everything recorded so far.
    pub fn sync(&mut self) -> SyncReport {
        let started = Instant::now();
        let facts = self.trackers.state().node();
        let ctx = self.node_context();
        let policy = ProxyPolicy::new(self.cfg.masquerade_all, &self.cfg.detect_local, facts);
        let mut plan = self.trackers.checkout();
        if self.context.as_ref() != Some(&(ctx.clone(), policy.clone())) {
            plan.full = true;
        }
        if plan.full
            && let Some(d) = self.dataplane.as_mut()
        {
            // A full sync replaces everything: the committed copy (which holds the old
            // desired state's ports) goes before the new state is built, not after.
            d.forget_committed();
        }
        update_desired(
            &mut self.desired,
            self.trackers.state(),
            &ctx,
            &policy,
            &plan,
        );
        self.after_index.update(&self.desired, &plan);
        let applied = self
            .dataplane
            .as_mut()
            .map(|d| d.sync(&self.desired, &plan, &ctx));
        self.force = false;
        if let Some(Err(_)) = &applied {
            // Retry as a full sync (§11); the failed family's committed copy is already gone.
            self.force_full();
        }
        let succeeded = matches!(applied, None | Some(Ok(_)));
        if succeeded {
            self.sync_service_health(&ctx);
        }
        self.context = Some((ctx, policy));
        // From the slices' trigger times to now (the commit), computed once.
        let latencies = if succeeded {
            crate::latency::network_programming(
                &plan.trigger_times,
                self.tracking_since,
                std::time::SystemTime::now(),
            )
        } else {
            Vec::new()
        };
        if let Some(h) = &self.health {
            // Each family that synced is healthy again; a family that failed keeps its queued
            // change, so it turns unhealthy once that has waited 2 x syncPeriod (§7.1).
            let now = std::time::SystemTime::now();
            h.update(|m| {
                for family in self.desired.families.keys() {
                    if !matches!(&applied, Some(Err(e)) if e.failed(*family)) {
                        m.synced(family.label(), now);
                    }
                }
            });
        }
        if let Some(m) = &self.metrics {
            self.observe(m, &applied, &latencies);
        }
        let network_programming = if matches!(applied, Some(Ok(_))) {
            self.reconcile_conntrack(&plan);
            latencies
        } else {
            Vec::new()
        };
        let ports = self
            .desired
            .families
            .iter()
            .map(|(f, d)| (*f, d.ports.len()))
            .collect();
        let report = SyncReport {
            plan,
            ports,
            applied,
            network_programming,
            mode: self.mode(),
        };
        self.record_debug(&report, started.elapsed());
        report
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

mod after;
mod index;
mod run;

pub use run::{DRIFT_MAX_PORTS, DRIFT_MIN_INTERVAL, FULL_SYNC_PERIOD, REPAIR_INTERVAL, run};

#[cfg(test)]
mod refusals;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
