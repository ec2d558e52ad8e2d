//! What a sync leads to, after the kernel is written: the metrics, the health model, the
//! healthCheckNodePort servers, stale UDP conntrack flows, the debug record, and the log line.

use super::{SyncReport, SyncState, unix_now};
use kpr_model::node::NodeContext;
use kpr_model::{IpFamily, SyncPlan};
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

impl SyncState {
    /// After a sync: its record for the debug surface, and when its Services changed.
    pub(super) fn record_debug(&mut self, report: &SyncReport, elapsed: Duration) {
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

    /// Sync outcome into the metrics: durations, last sync, failures, pending changes, and
    /// the Local-policy ports without a local endpoint.
    ///
    /// Failures are counted per family that failed, once per refused transaction, in the
    /// mode's own counter as upstream does (§8): nftables `sync_failures_total`; iptables
    /// `restore_failures_total`, and `partial_restore_failures_total` too when the refused
    /// restore was a partial one. A failed `iptables-save` sent nothing and is not a failed
    /// restore (upstream carries on without the listing; we retry, see `sync_ipt`).
    pub(super) fn observe(
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
        for family in self.desired.families.keys() {
            // Counted per Service (its ports share the policy), as upstream counts names;
            // kept per Service from each sync's plan, not counted over every port.
            let (internal, external) = self.after_index.no_local_endpoints(*family);
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
    pub(super) fn reconcile_conntrack(&self, plan: &SyncPlan) {
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
    pub(super) fn sync_service_health(&mut self, ctx: &NodeContext) {
        let Some((servers, node_ports)) = &mut self.service_health else {
            return;
        };
        let primary = ctx.node_ips.keys().next().copied().unwrap_or(IpFamily::V4);
        // The ports with a healthCheckNodePort and ETP=Local, kept per Service from each
        // sync's plan (a walk over every port here cost O(Services) per endpoint change).
        let mut wanted: std::collections::BTreeMap<
            u16,
            (
                kpr_ops::service_health::Wanted,
                std::collections::BTreeSet<IpAddr>,
            ),
        > = std::collections::BTreeMap::new();
        for (name, port, ips) in self.after_index.health_checks(primary) {
            let entry = wanted.entry(port).or_insert_with(|| {
                let w = kpr_ops::service_health::Wanted {
                    namespace: name.service.namespace.to_string(),
                    name: name.service.name.to_string(),
                    local_endpoints: 0,
                };
                (w, std::collections::BTreeSet::new())
            });
            entry.1.extend(ips.iter().copied());
        }
        let wanted = wanted
            .into_iter()
            .map(|(p, (mut w, ips))| {
                w.local_endpoints = ips.len();
                (p, w)
            })
            .collect::<std::collections::BTreeMap<_, _>>();
        // The addresses are needed only to start a server (with nodePortAddresses CIDRs,
        // finding them runs `ip addr`): not on a sync where every wanted one is running.
        let running = servers.ports();
        let addrs = if wanted.keys().all(|p| running.contains(p)) {
            Vec::new()
        } else {
            match crate::dataplane::node_port_addrs(node_ports, primary, ctx) {
                kpr_dataplane::nftables::NodePortAddrs::All => vec![match primary {
                    IpFamily::V4 => IpAddr::from([0, 0, 0, 0]),
                    IpFamily::V6 => IpAddr::from([0u16; 8]),
                }],
                kpr_dataplane::nftables::NodePortAddrs::List(ips) => ips,
            }
        };
        servers.sync(&wanted, &addrs);
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
pub(super) fn log_report(
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
