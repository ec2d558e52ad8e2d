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
use tokio::sync::{mpsc, watch};
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

    /// After a sync: its record for the debug surface, and when its Services changed.
    fn record_debug(&mut self, report: &SyncReport, elapsed: Duration) {
        let Some(hub) = &self.debug else {
            return;
        };
        let now = std::time::SystemTime::now();
        let latency = report.network_programming.iter().max().copied();
        let (operations, result) = match &report.applied {
            Some(Ok(a)) => (a.families.iter().map(|(_, n, _)| n).sum(), "ok".to_owned()),
            Some(Err(e)) => (
                e.done.families.iter().map(|(_, n, _)| n).sum(),
                e.to_string(),
            ),
            None => (0, "ok (no data plane)".to_owned()),
        };
        if matches!(report.applied, None | Some(Ok(_))) {
            // O(changes): only a changed Service can have been deleted.
            for name in &report.plan.changed_services {
                if self.trackers.state().service(name).is_some() {
                    self.changes.insert(
                        name.clone(),
                        crate::debug::ServiceChange { at: now, latency },
                    );
                } else {
                    self.changes.remove(name);
                }
            }
        }
        hub.record_sync(crate::debug::SyncRecord {
            time: kpr_ops::time::rfc3339_nano(now),
            full: report.plan.full,
            changed_services: report.plan.changed_services.len(),
            operations,
            duration_seconds: elapsed.as_secs_f64(),
            result,
            programming_latency_seconds: latency.map(|d| d.as_secs_f64()),
        });
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

    /// Sync outcome into the metrics: durations, last sync, failures, pending changes, and
    /// the Local-policy ports without a local endpoint.
    ///
    /// Failures are counted per family that failed, once per refused transaction, in the
    /// mode's own counter as upstream does (§8): nftables `sync_failures_total`; iptables
    /// `restore_failures_total`, and `partial_restore_failures_total` too when the refused
    /// restore was a partial one. A failed `iptables-save` sent nothing and is not a failed
    /// restore (upstream carries on without the listing; we retry, see `sync_ipt`).
    fn observe(
        &self,
        m: &kpr_ops::metrics::Metrics,
        applied: &Option<Result<crate::dataplane::ApplyReport, crate::dataplane::SyncFailure>>,
        latencies: &[Duration],
    ) {
        use crate::dataplane::FailureKind;
        let (done, failed) = match applied {
            Some(Ok(a)) => (Some(a), &[][..]),
            Some(Err(e)) => (Some(&e.done), &e.failed[..]),
            None => (None, &[][..]),
        };
        if let Some(a) = done {
            for (family, _, full) in &a.families {
                m.observe_sync(family.label(), *full, a.elapsed);
            }
            for family in self.desired.families.keys() {
                if !failed.iter().any(|f| f.family == *family) {
                    m.last_sync
                        .with_label_values(&[family.label()])
                        .set(unix_now());
                }
            }
            for (family, table, owned, written) in &a.iptables_rules {
                let labels = [family.label(), table.as_str()];
                m.iptables_total
                    .with_label_values(&labels)
                    .set(*owned as i64);
                m.iptables_last
                    .with_label_values(&labels)
                    .set(*written as i64);
            }
        }
        for f in failed {
            let label = [f.family.label()];
            match (self.mode(), f.kind) {
                ("iptables", FailureKind::Refused) => {
                    m.iptables_restore_failures.with_label_values(&label).inc();
                    if !f.full {
                        m.iptables_partial_restore_failures
                            .with_label_values(&label)
                            .inc();
                    }
                }
                ("iptables", FailureKind::Listing) => {}
                _ => m.nftables_sync_failures.with_label_values(&label).inc(),
            }
        }
        if !failed.is_empty() {
            return;
        }
        if done.is_none() {
            for family in self.desired.families.keys() {
                m.last_sync
                    .with_label_values(&[family.label()])
                    .set(unix_now());
            }
        }
        m.service_changes_pending.set(0);
        m.endpoint_changes_pending.set(0);
        if let Some(family) = self.desired.families.keys().next() {
            for d in latencies {
                m.network_programming
                    .with_label_values(&[family.label()])
                    .observe(d.as_secs_f64());
            }
        }
        for (family, fam) in &self.desired.families {
            // Counted per Service (its ports share the policy), as upstream counts names.
            let count = |policy: fn(&kpr_model::desired::ServicePortDesired) -> bool| {
                fam.ports
                    .values()
                    .filter(|sp| {
                        policy(sp) && sp.local_endpoints.is_empty() && sp.has_any_endpoints
                    })
                    .map(|sp| &sp.name.service)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            };
            let internal = count(|sp| sp.internal_policy_local);
            let external = count(|sp| sp.external_policy_local && sp.external.is_some());
            m.no_local_endpoints
                .with_label_values(&[family.label(), "internal"])
                .set(internal as f64);
            m.no_local_endpoints
                .with_label_values(&[family.label(), "external"])
                .set(external as f64);
        }
    }

    /// After a sync that changed a UDP service port, deletes the conntrack flows whose DNAT
    /// target is no longer one of its endpoints (§6.2), so UDP clients move to a live endpoint.
    fn reconcile_conntrack(&self, plan: &SyncPlan) {
        let udp_changed = plan
            .changed_ports
            .iter()
            .any(|p| p.protocol == kpr_model::Protocol::Udp);
        if !(plan.full || udp_changed) {
            return;
        }
        for (family, fam) in &self.desired.families {
            let start = std::time::Instant::now();
            let ports: Vec<kpr_conntrack::UdpServicePort> = fam
                .ports
                .values()
                .filter(|sp| sp.protocol == kpr_model::Protocol::Udp && !sp.endpoints.is_empty())
                .map(|sp| kpr_conntrack::UdpServicePort {
                    frontends: std::iter::once(sp.cluster_ip)
                        .chain(sp.external_ips.iter().copied())
                        .chain(sp.load_balancer_ips.iter().copied())
                        .collect(),
                    port: sp.port,
                    node_port: sp.node_port,
                    serving: sp.endpoints.iter().map(|e| e.addr).collect(),
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            let ct_family = match family {
                IpFamily::V4 => kpr_conntrack::netlink::Family::V4,
                IpFamily::V6 => kpr_conntrack::netlink::Family::V6,
            };
            let result = kpr_conntrack::netlink::list(ct_family).and_then(|flows| {
                let stale = kpr_conntrack::stale(&flows, &ports);
                kpr_conntrack::netlink::delete(ct_family, &stale)
            });
            match result {
                Ok(deleted) => {
                    if deleted > 0 {
                        tracing::debug!(family = %family, deleted, "Deleted stale UDP conntrack flows");
                    }
                    if let Some(m) = &self.metrics {
                        m.conntrack_sync_duration
                            .with_label_values(&[family.label()])
                            .observe(start.elapsed().as_secs_f64());
                        m.conntrack_deleted
                            .with_label_values(&[family.label()])
                            .inc_by(deleted as f64);
                    }
                }
                Err(e) => {
                    tracing::warn!(family = %family, "Could not clean up stale UDP conntrack flows: {e}")
                }
            }
        }
    }

    /// Opens and closes the healthCheckNodePort servers after a successful sync: one per
    /// LoadBalancer Service with ETP=Local, counting the distinct ready local endpoint
    /// addresses of all its ports, in the primary family (§7.2).
    fn sync_service_health(&mut self, ctx: &NodeContext) {
        let Some((servers, node_ports)) = &mut self.service_health else {
            return;
        };
        let primary = ctx.node_ips.keys().next().copied().unwrap_or(IpFamily::V4);
        let mut wanted: std::collections::BTreeMap<
            u16,
            (
                kpr_ops::service_health::Wanted,
                std::collections::BTreeSet<IpAddr>,
            ),
        > = std::collections::BTreeMap::new();
        if let Some(fam) = self.desired.families.get(&primary) {
            for sp in fam.ports.values() {
                let Some(port) = sp
                    .health_check_node_port
                    .filter(|_| sp.external_policy_local)
                else {
                    continue;
                };
                let entry = wanted.entry(port).or_insert_with(|| {
                    let w = kpr_ops::service_health::Wanted {
                        namespace: sp.name.service.namespace.clone(),
                        name: sp.name.service.name.clone(),
                        local_endpoints: 0,
                    };
                    (w, std::collections::BTreeSet::new())
                });
                entry.1.extend(
                    sp.endpoints
                        .iter()
                        .filter(|e| e.local && e.ready)
                        .map(|e| e.addr.ip()),
                );
            }
        }
        let wanted = wanted
            .into_iter()
            .map(|(p, (mut w, ips))| {
                w.local_endpoints = ips.len();
                (p, w)
            })
            .collect();
        let addrs = match crate::dataplane::node_port_addrs(node_ports, primary, ctx) {
            kpr_dataplane::nftables::NodePortAddrs::All => vec![match primary {
                IpFamily::V4 => IpAddr::from([0, 0, 0, 0]),
                IpFamily::V6 => IpAddr::from([0u16; 8]),
            }],
            kpr_dataplane::nftables::NodePortAddrs::List(ips) => ips,
        };
        servers.sync(&wanted, &addrs);
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
        update_desired(
            &mut self.desired,
            self.trackers.state(),
            &ctx,
            &policy,
            &plan,
        );
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
            crate::latency::network_programming(&plan.trigger_times, std::time::SystemTime::now())
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

/// Runs the loop until `shutdown` turns true or every sender is gone. Each sync's report is sent
/// to `reports` (the data plane's place until it lands; tests count syncs with it).
pub async fn run(
    mut state: SyncState,
    mut inputs: mpsc::Receiver<Input>,
    mut shutdown: watch::Receiver<bool>,
    reports: mpsc::UnboundedSender<SyncReport>,
) -> SyncState {
    let mut last_sync: Option<Instant> = None;
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
            Some(last_sync.map_or_else(Instant::now, |t| t + min))
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
                    last_sync = None;
                }
                // The check lists a chain through `nft`, whose cost grows with the table (80 ms
                // at 10,000 Services): keep it under a tenth of the time.
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
                    last_sync = None;
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
                if !matches!(&report.applied, Some(Ok(a)) if a.families.is_empty()) {
                    kernel_gen += 1;
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

/// Seconds since the Unix epoch, for timestamp gauges.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
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
struct DriftCheck {
    /// A comparison is running on the blocking pool.
    running: bool,
    /// The kernel cannot be read (no `nft`): checks stop.
    off: bool,
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
    fn drift_found(
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

/// Logs a sync; returns the failed syncs in a row after it.
///
/// A failure is one line at error level per family that failed: what was refused and why, in
/// words, the attempt, and when the retry comes. Repeats are not folded into a count: the
/// retry delay doubles from 1 s to syncPeriod, so a failure that persists logs about seven
/// lines in its first minute and then one per syncPeriod, and every line stands alone (a log
/// search for the refusal finds each attempt; each matches one increment of the failure
/// counter). The first success after failures says how long they lasted.
fn log_report(
    r: &SyncReport,
    failing: Option<(u32, Instant)>,
    retry_in: Duration,
) -> Option<(u32, Instant)> {
    if let Some(Err(e)) = &r.applied {
        let (attempt, since) = failing.map_or((1, Instant::now()), |(n, t)| (n + 1, t));
        for f in &e.failed {
            tracing::error!(
                family = %f.family,
                sync = if f.full { "full" } else { "partial" },
                attempt,
                retry_in_seconds = retry_in.as_secs_f64(),
                "Sync failed, retrying as a full sync: {}",
                f.message
            );
        }
        return Some((attempt, since));
    }
    if let Some((attempts, since)) = failing {
        tracing::info!(
            failed_attempts = attempts,
            failing_seconds = since.elapsed().as_secs_f64(),
            "Sync succeeded after failing"
        );
    }
    log_success(r);
    None
}

fn log_success(r: &SyncReport) {
    let ports: Vec<String> = r.ports.iter().map(|(f, n)| format!("{f}={n}")).collect();
    match &r.applied {
        Some(Ok(a)) => {
            let ops: Vec<String> = a
                .families
                .iter()
                .map(|(f, n, full)| format!("{f}={n}{}", if *full { " (full)" } else { "" }))
                .collect();
            tracing::info!(
                full = r.plan.full,
                changed_services = r.plan.changed_services.len(),
                service_ports = %ports.join(","),
                operations = %ops.join(","),
                bytes = a.bytes,
                elapsed_us = a.elapsed.as_micros() as u64,
                "Synced {} rules",
                r.mode
            );
            if let Some(worst) = r.network_programming.iter().max() {
                tracing::debug!(
                    changes = r.network_programming.len(),
                    max_us = worst.as_micros() as u64,
                    "Network programming latency"
                );
            }
            return;
        }
        Some(Err(_)) => return,
        None => {}
    }
    tracing::info!(
        full = r.plan.full,
        changed_services = r.plan.changed_services.len(),
        changed_ports = r.plan.changed_ports.len(),
        service_ports = %ports.join(","),
        "Computed desired state (no data plane in this build: nothing programmed)"
    );
    for p in &r.plan.changed_ports {
        tracing::debug!(port = %p, "Service port changed");
    }
}

#[cfg(test)]
mod refusals;

#[cfg(test)]
mod tests {
    use super::*;
    use kpr_testkit::{NODE, service};

    fn cfg() -> SyncConfig {
        SyncConfig {
            node_name: NODE.into(),
            masquerade_all: false,
            detect_local: DetectLocalMode::ClusterCidr(vec![]),
            bind_address: None,
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            wait_for_node: false,
        }
    }

    fn svc(i: u32) -> kpr_model::Service {
        service("ns", &format!("s{i}"))
            .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
            .port("p", 80, "TCP")
            .build()
    }

    /// §2.1 step 11 (T2.1.1, T2.1.2): no sync until both lists arrived, then exactly one.
    #[tokio::test(start_paused = true)]
    async fn t2_1_1_nothing_syncs_before_every_first_list() {
        let (tx, rx) = mpsc::channel(16);
        let (_stop, shutdown) = watch::channel(false);
        let (rtx, mut reports) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(SyncState::new(cfg()), rx, shutdown, rtx));
        tx.send(Input::Services(Update::Replace(vec![svc(1)])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(reports.try_recv().is_err(), "T2.1.1: slices not listed yet");
        tx.send(Input::Slices(Update::Replace(vec![])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let first = reports.try_recv().unwrap();
        assert!(first.plan.full);
        assert_eq!(first.ports, [(IpFamily::V4, 1), (IpFamily::V6, 0)]);
        assert!(reports.try_recv().is_err(), "T2.1.2: exactly one sync");
        drop(tx);
        task.await.unwrap();
    }

    /// §11 / T11.1: a burst is coalesced, syncs stay min_sync_period apart.
    #[tokio::test(start_paused = true)]
    async fn t11_1_a_burst_of_1000_changes_is_coalesced() {
        let (tx, rx) = mpsc::channel(2048);
        let (_stop, shutdown) = watch::channel(false);
        let (rtx, mut reports) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(SyncState::new(cfg()), rx, shutdown, rtx));
        tx.send(Input::Services(Update::Replace(vec![])))
            .await
            .unwrap();
        tx.send(Input::Slices(Update::Replace(vec![])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _initial = reports.try_recv().unwrap();
        for i in 0..1000 {
            tx.send(Input::Services(Update::Apply(svc(i))))
                .await
                .unwrap();
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut syncs = Vec::new();
        while let Ok(r) = reports.try_recv() {
            syncs.push(r);
        }
        assert!(
            (1..=3).contains(&syncs.len()),
            "{} syncs for 1000 changes",
            syncs.len()
        );
        let changed: usize = syncs.iter().map(|r| r.plan.changed_services.len()).sum();
        assert_eq!(changed, 1000);
        drop(tx);
        let state = task.await.unwrap();
        assert_eq!(state.desired().families[&IpFamily::V4].ports.len(), 1000);
    }

    /// Issue 4: 1,000 Service changes written to the (test) API server in a burst reach the
    /// sync loop through real HTTP watches and are coalesced into a few syncs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_through_the_api_server_is_coalesced() {
        let server = kpr_apiserver::ApiServer::start(kpr_apiserver::Options::default())
            .await
            .unwrap();
        let json = |v: &kpr_model::Node| serde_json::to_value(v).unwrap();
        server.apply(json(
            &kpr_testkit::node(NODE)
                .address("InternalIP", "192.168.0.2")
                .build(),
        ));
        let client = kpr_watch::api::client(
            &kpr_watch::api::Connect {
                master: Some(server.url()),
                ..Default::default()
            },
            std::sync::Arc::new(kpr_watch::api::NoObserver),
        )
        .await
        .unwrap();
        let (tx, rx) = mpsc::channel(1024);
        let (_stop, shutdown) = watch::channel(false);
        let (rtx, mut reports) = mpsc::unbounded_channel();
        let source = tokio::spawn(kpr_watch::api::run(
            client,
            NODE.into(),
            tx,
            shutdown.clone(),
            std::sync::Arc::new(kpr_watch::api::NoObserver),
        ));
        let cfg = SyncConfig {
            wait_for_node: true,
            ..cfg()
        };
        let task = tokio::spawn(run(SyncState::new(cfg), rx, shutdown, rtx));
        let first = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(first.plan.full, "the first sync follows the first lists");
        for i in 0..1000 {
            server.apply(serde_json::to_value(svc(i)).unwrap());
        }
        let mut syncs = 0;
        let mut changed = 0;
        while changed < 1000 {
            let r = tokio::time::timeout(Duration::from_secs(20), reports.recv())
                .await
                .unwrap()
                .unwrap();
            syncs += 1;
            changed += r.plan.changed_services.len();
        }
        assert!(syncs <= 10, "{syncs} syncs for 1000 changes");
        source.abort();
        task.abort();
    }

    /// Issue 13 / §7.1: a source that cannot list (here the EndpointSlices never arrive) while
    /// the Services did leaves their change queued and never synced, so the proxy turns
    /// unhealthy after 2 x syncPeriod, upstream's rule for a proxy that cannot sync; a proxy
    /// that has received nothing at all (the API server down at start) has nothing queued and
    /// stays healthy, as upstream's does, so a liveness probe does not restart-loop it.
    #[test]
    fn a_source_that_cannot_list_turns_health_503_after_twice_the_sync_period() {
        let now = std::time::SystemTime::now();
        let timeout = 2 * cfg().sync_period;
        let health = kpr_ops::server::Health::new(kpr_ops::health::HealthModel::new(
            &["IPv4", "IPv6"],
            now,
            timeout,
        ));
        let mut state = SyncState::new(cfg()).with_health(health.clone());
        let later = now + timeout + Duration::from_secs(1);
        assert!(health.healthy(later), "nothing received, nothing queued");
        state.record(Input::Services(Update::Replace(vec![svc(1)])));
        assert!(!state.ready(), "the slices have not been listed");
        assert!(health.healthy(now + timeout / 2));
        assert!(!health.healthy(later), "queued longer than 2 x syncPeriod");
    }

    /// §2.3: the node's IPs change (or its Node is deleted): the loop stops and says why.
    #[tokio::test(start_paused = true)]
    async fn a_node_ip_change_ends_the_loop_with_a_reason() {
        let (tx, rx) = mpsc::channel(16);
        let (_stop, shutdown) = watch::channel(false);
        let (rtx, _reports) = mpsc::unbounded_channel();
        let cfg = SyncConfig {
            wait_for_node: true,
            ..cfg()
        };
        let task = tokio::spawn(run(SyncState::new(cfg), rx, shutdown, rtx));
        let node = |ip: &str| {
            Input::Node(Some(Box::new(
                kpr_testkit::node(NODE).address("InternalIP", ip).build(),
            )))
        };
        tx.send(node("192.168.0.2")).await.unwrap();
        tx.send(node("192.168.0.2")).await.unwrap();
        tx.send(node("192.168.0.9")).await.unwrap();
        let state = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            state.exit_reason().unwrap().contains("IPs"),
            "{:?}",
            state.exit_reason()
        );
    }

    /// The drift check's results: a difference is logged, counted and resynced once; found
    /// again right after that resync it is not resynced again; a stale result says nothing.
    #[test]
    fn drift_is_counted_and_resynced_once_per_set_of_differences() {
        use crate::debug::verify::{Difference, Drift};
        let metrics = std::sync::Arc::new(kpr_ops::metrics::Metrics::new().unwrap());
        let mut state = SyncState::new(cfg()).with_metrics(metrics.clone());
        let diff: Difference = serde_json::from_value(serde_json::json!({
            "family": "IPv4", "object": "map service-ips", "kind": "missing",
            "detail": "missing element `172.30.0.10 . tcp . 80`"
        }))
        .unwrap();
        let found = || Drift::Found(vec![diff.clone()]);
        let counted = || metrics.rules_drift.with_label_values(&["IPv4"]).get();
        let mut check = DriftCheck::default();
        assert!(!state.drift_found(false, found(), &mut check), "stale");
        assert_eq!(counted(), 0);
        assert!(state.drift_found(true, found(), &mut check));
        assert_eq!(counted(), 1);
        assert!(
            state.trackers.has_pending() || state.force,
            "a full resync is due"
        );
        assert!(!state.drift_found(true, found(), &mut check), "persisting");
        assert_eq!(counted(), 1);
        assert!(!state.drift_found(true, Drift::None, &mut check));
        assert!(
            state.drift_found(true, found(), &mut check),
            "drifted again"
        );
        assert_eq!(counted(), 2);
        assert!(!state.drift_found(true, Drift::Failed("x".into()), &mut check));
        assert!(!check.off);
        assert!(!state.drift_found(true, Drift::Unavailable("no nft".into()), &mut check));
        assert!(check.off);
    }
}
