//! The metrics kube-proxy exports (§8), with upstream's names, types, label names and buckets,
//! so dashboards and alerts keep working; and the text the metrics server sends.
//!
//! Only the running mode's set is registered (T8.4: no iptables series in nftables mode, and
//! no nftables series in iptables mode).
//! Process metrics (`process_*`) come from the prometheus crate's process collector.

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// Sync duration buckets: 15 exponential from 1 ms, doubling.
fn sync_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).unwrap_or_default()
}

/// Network-programming buckets: 0.25, 0.5, 1..59, 60..115 step 5, 120..300 step 30.
pub fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..60).map(f64::from));
    b.extend((60..=115).step_by(5).map(f64::from));
    b.extend((120..=300).step_by(30).map(f64::from));
    b
}

/// Every metric of §8 the nftables mode keeps.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub sync_duration: HistogramVec,
    pub sync_full_duration: HistogramVec,
    pub sync_partial_duration: HistogramVec,
    pub last_sync: GaugeVec,
    pub last_queued: GaugeVec,
    pub network_programming: HistogramVec,
    pub endpoint_changes_pending: IntGauge,
    pub endpoint_changes_total: IntCounter,
    pub service_changes_pending: IntGauge,
    pub service_changes_total: IntCounter,
    pub no_local_endpoints: GaugeVec,
    pub healthz_total: IntCounterVec,
    pub livez_total: IntCounterVec,
    pub nftables_sync_failures: IntCounterVec,
    pub nftables_cleanup_failures: IntCounterVec,
    pub iptables_restore_failures: IntCounterVec,
    pub iptables_partial_restore_failures: IntCounterVec,
    pub iptables_total: prometheus::IntGaugeVec,
    pub iptables_last: prometheus::IntGaugeVec,
    pub conntrack_sync_duration: HistogramVec,
    pub conntrack_deleted: CounterVec,
    /// client-go's request counter, as upstream's kube-proxy exports it: `code` is the HTTP
    /// status, or `<error>` when no response came.
    pub rest_client_requests: IntCounterVec,
    pub rest_client_duration: HistogramVec,
    /// kube-proxy-rs: 1 while the watch of a resource is listed and running, 0 while it fails.
    pub watch_up: IntGaugeVec,
    /// kube-proxy-rs: watch failures (each followed by a relist), per resource.
    pub watch_failures: IntCounterVec,
    /// kube-proxy-rs: periodic comparisons that found the kernel's rules differing from the
    /// committed ones, per family (each is followed by a full resync).
    pub rules_drift: IntCounterVec,
    /// kube-proxy-rs: times the repair check found our rules deleted or flushed and restored them.
    pub rules_repaired: IntCounter,
    pub start_time: Gauge,
}

fn alpha(name: &str, help: &str) -> Opts {
    Opts::new(name, format!("[ALPHA] {help}")).subsystem("kubeproxy")
}

fn hist(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::from(alpha(name, help)).buckets(buckets)
}

impl Metrics {
    /// The nftables mode's metrics, registered.
    pub fn new() -> prometheus::Result<Metrics> {
        Metrics::for_mode(false)
    }

    /// The metrics of the nftables mode, or of the iptables mode when `iptables`, registered.
    pub fn for_mode(iptables: bool) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let fam = &["ip_family"];
        let m = Metrics {
            sync_duration: HistogramVec::new(
                hist(
                    "sync_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds",
                    sync_buckets(),
                ),
                fam,
            )?,
            sync_full_duration: HistogramVec::new(
                hist(
                    "sync_full_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds for full resyncs",
                    sync_buckets(),
                ),
                fam,
            )?,
            sync_partial_duration: HistogramVec::new(
                hist(
                    "sync_partial_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds for partial resyncs",
                    sync_buckets(),
                ),
                fam,
            )?,
            last_sync: GaugeVec::new(
                alpha(
                    "sync_proxy_rules_last_timestamp_seconds",
                    "The last time proxy rules were successfully synced",
                ),
                fam,
            )?,
            last_queued: GaugeVec::new(
                alpha(
                    "sync_proxy_rules_last_queued_timestamp_seconds",
                    "The last time a sync of proxy rules was queued",
                ),
                fam,
            )?,
            network_programming: HistogramVec::new(
                hist(
                    "network_programming_duration_seconds",
                    "In Cluster Network Programming Latency in seconds",
                    programming_buckets(),
                ),
                fam,
            )?,
            endpoint_changes_pending: IntGauge::with_opts(alpha(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            ))?,
            endpoint_changes_total: IntCounter::with_opts(alpha(
                "sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ))?,
            service_changes_pending: IntGauge::with_opts(alpha(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            ))?,
            service_changes_total: IntCounter::with_opts(alpha(
                "sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ))?,
            no_local_endpoints: GaugeVec::new(
                alpha(
                    "sync_proxy_rules_no_local_endpoints_total",
                    "Number of services with a Local traffic policy and no endpoints",
                ),
                &["ip_family", "traffic_policy"],
            )?,
            healthz_total: IntCounterVec::new(
                alpha(
                    "proxy_healthz_total",
                    "Cumulative proxy healthz HTTP status",
                ),
                &["code"],
            )?,
            livez_total: IntCounterVec::new(
                alpha("proxy_livez_total", "Cumulative proxy livez HTTP status"),
                &["code"],
            )?,
            nftables_sync_failures: IntCounterVec::new(
                alpha(
                    "sync_proxy_rules_nftables_sync_failures_total",
                    "Cumulative proxy nftables sync failures",
                ),
                fam,
            )?,
            nftables_cleanup_failures: IntCounterVec::new(
                alpha(
                    "sync_proxy_rules_nftables_cleanup_failures_total",
                    "Cumulative proxy nftables cleanup failures",
                ),
                fam,
            )?,
            iptables_restore_failures: IntCounterVec::new(
                alpha(
                    "sync_proxy_rules_iptables_restore_failures_total",
                    "Cumulative proxy iptables restore failures",
                ),
                fam,
            )?,
            iptables_partial_restore_failures: IntCounterVec::new(
                alpha(
                    "sync_proxy_rules_iptables_partial_restore_failures_total",
                    "Cumulative proxy iptables partial restore failures",
                ),
                fam,
            )?,
            iptables_total: prometheus::IntGaugeVec::new(
                alpha(
                    "sync_proxy_rules_iptables_total",
                    "Total number of iptables rules owned by kube-proxy",
                ),
                &["ip_family", "table"],
            )?,
            iptables_last: prometheus::IntGaugeVec::new(
                alpha(
                    "sync_proxy_rules_iptables_last",
                    "Number of iptables rules written by kube-proxy in last sync",
                ),
                &["ip_family", "table"],
            )?,
            conntrack_sync_duration: HistogramVec::new(
                hist(
                    "conntrack_reconciler_sync_duration_seconds",
                    "ReconcileConntrackFlowsLatency latency in seconds",
                    sync_buckets(),
                ),
                fam,
            )?,
            conntrack_deleted: CounterVec::new(
                alpha(
                    "conntrack_reconciler_deleted_entries_total",
                    "Cumulative conntrack flows deleted by conntrack reconciler",
                ),
                fam,
            )?,
            rest_client_requests: IntCounterVec::new(
                Opts::new(
                    "rest_client_requests_total",
                    "[ALPHA] Number of HTTP requests, partitioned by status code, method, and host.",
                ),
                &["code", "host", "method"],
            )?,
            rest_client_duration: HistogramVec::new(
                HistogramOpts::new(
                    "rest_client_request_duration_seconds",
                    "[ALPHA] Request latency in seconds. Broken down by verb, and host.",
                )
                .buckets(vec![
                    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
                ]),
                &["host", "verb"],
            )?,
            watch_up: IntGaugeVec::new(
                Opts::new(
                    "kpr_watch_up",
                    "1 while the API watch of a resource is listed and running, 0 while it fails and relists.",
                ),
                &["resource"],
            )?,
            watch_failures: IntCounterVec::new(
                Opts::new(
                    "kpr_watch_failures_total",
                    "API watch failures per resource; each is followed by a relist.",
                ),
                &["resource"],
            )?,
            rules_drift: IntCounterVec::new(
                Opts::new(
                    "kpr_rules_drift_total",
                    "Periodic comparisons that found the kernel's rules differing from the committed ones; each is followed by a full resync.",
                ),
                &["ip_family"],
            )?,
            rules_repaired: IntCounter::new(
                "kpr_rules_repaired_total",
                "Times our rules were found deleted or flushed by someone else and restored.",
            )?,
            start_time: Gauge::new(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.sync_duration.clone()))?;
        r.register(Box::new(m.sync_full_duration.clone()))?;
        r.register(Box::new(m.sync_partial_duration.clone()))?;
        r.register(Box::new(m.last_sync.clone()))?;
        r.register(Box::new(m.last_queued.clone()))?;
        r.register(Box::new(m.network_programming.clone()))?;
        r.register(Box::new(m.endpoint_changes_pending.clone()))?;
        r.register(Box::new(m.endpoint_changes_total.clone()))?;
        r.register(Box::new(m.service_changes_pending.clone()))?;
        r.register(Box::new(m.service_changes_total.clone()))?;
        r.register(Box::new(m.no_local_endpoints.clone()))?;
        r.register(Box::new(m.healthz_total.clone()))?;
        r.register(Box::new(m.livez_total.clone()))?;
        if iptables {
            r.register(Box::new(m.iptables_restore_failures.clone()))?;
            r.register(Box::new(m.iptables_partial_restore_failures.clone()))?;
            r.register(Box::new(m.iptables_total.clone()))?;
            r.register(Box::new(m.iptables_last.clone()))?;
        } else {
            r.register(Box::new(m.nftables_sync_failures.clone()))?;
            r.register(Box::new(m.nftables_cleanup_failures.clone()))?;
        }
        r.register(Box::new(m.conntrack_sync_duration.clone()))?;
        r.register(Box::new(m.conntrack_deleted.clone()))?;
        r.register(Box::new(m.rest_client_requests.clone()))?;
        r.register(Box::new(m.rest_client_duration.clone()))?;
        r.register(Box::new(m.watch_up.clone()))?;
        r.register(Box::new(m.watch_failures.clone()))?;
        r.register(Box::new(m.rules_drift.clone()))?;
        r.register(Box::new(m.rules_repaired.clone()))?;
        let process = prometheus::process_collector::ProcessCollector::for_self();
        if r.register(Box::new(process)).is_err() {
            r.register(Box::new(m.start_time.clone()))?;
        }
        Ok(m)
    }

    /// One sync of a family took `d` (`full` or partial).
    pub fn observe_sync(&self, family: &str, full: bool, d: Duration) {
        let s = d.as_secs_f64();
        self.sync_duration.with_label_values(&[family]).observe(s);
        let which = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        which.with_label_values(&[family]).observe(s);
    }

    /// One request of the API client (client-go's `rest_client_*`): `code` `None` is a
    /// request that got no response.
    pub fn observe_request(&self, method: &str, host: &str, code: Option<u16>, d: Duration) {
        let code = code.map_or_else(|| "<error>".to_owned(), |c| c.to_string());
        self.rest_client_requests
            .with_label_values(&[code.as_str(), host, method])
            .inc();
        self.rest_client_duration
            .with_label_values(&[host, method])
            .observe(d.as_secs_f64());
    }

    /// The watch of `resource` is up (listed and running) or down (failed, relisting).
    pub fn observe_watch(&self, resource: &str, up: bool) {
        self.watch_up
            .with_label_values(&[resource])
            .set(i64::from(up));
        if !up {
            self.watch_failures.with_label_values(&[resource]).inc();
        }
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn text(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upstreams() {
        let s = sync_buckets();
        assert_eq!(s.len(), 15);
        assert!((s[0] - 0.001).abs() < 1e-12 && (s[14] - 16.384).abs() < 1e-9);
        let p = programming_buckets();
        assert_eq!(&p[..3], &[0.25, 0.5, 1.0]);
        assert_eq!(p.len(), 2 + 59 + 12 + 7);
        assert_eq!(p.last(), Some(&300.0));
    }
}
