//! §8: every metric name, type and label name the nftables mode exports, compared with the
//! behaviour reference's table (read from `../shared/reference/kube-proxy-behaviour.md` when it
//! is beside the repository, as in CI; the same list is also written here, so the test never
//! passes by finding no reference).
#![allow(clippy::unwrap_used)]

use kpr_ops::metrics::Metrics;
use std::collections::BTreeMap;
use std::time::Duration;

/// (name, type, label names) for the nftables mode, from §8.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["ip_family", "traffic_policy"],
    ),
    ("kubeproxy_proxy_healthz_total", "counter", &["code"]),
    ("kubeproxy_proxy_livez_total", "counter", &["code"]),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "counter",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
        "counter",
        &["ip_family"],
    ),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_conntrack_reconciler_deleted_entries_total",
        "counter",
        &["ip_family"],
    ),
];

/// Every metric observed once, so each has a series to read labels from.
fn exercised() -> Metrics {
    let m = Metrics::new().unwrap();
    m.observe_sync("IPv4", true, Duration::from_millis(3));
    m.observe_sync("IPv4", false, Duration::from_millis(1));
    m.last_sync.with_label_values(&["IPv4"]).set(1.0);
    m.last_queued.with_label_values(&["IPv4"]).set(1.0);
    m.network_programming
        .with_label_values(&["IPv4"])
        .observe(0.3);
    m.endpoint_changes_pending.set(1);
    m.endpoint_changes_total.inc();
    m.service_changes_pending.set(1);
    m.service_changes_total.inc();
    m.no_local_endpoints
        .with_label_values(&["IPv4", "internal"])
        .set(1.0);
    m.healthz_total.with_label_values(&["200"]).inc();
    m.livez_total.with_label_values(&["200"]).inc();
    m.nftables_sync_failures.with_label_values(&["IPv4"]).inc();
    m.nftables_cleanup_failures
        .with_label_values(&["IPv4"])
        .inc();
    m.conntrack_sync_duration
        .with_label_values(&["IPv4"])
        .observe(0.01);
    m.conntrack_deleted.with_label_values(&["IPv4"]).inc();
    m
}

/// name -> (type, label names) of the kubeproxy_* families in an exposition text.
fn families(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let mut out: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            out.insert(name.to_owned(), (kind.to_owned(), Vec::new()));
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.split_whitespace().next().unwrap_or("");
        let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| metric.strip_suffix(s).filter(|f| out.contains_key(*f)))
            .unwrap_or(metric);
        if let Some((_, names)) = out.get_mut(family) {
            for l in labels
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
            {
                let name = l.split('=').next().unwrap().to_owned();
                if name != "le" && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    out.retain(|n, _| n.starts_with("kubeproxy_"));
    out
}

#[test]
fn s8_names_types_and_labels_are_upstreams() {
    let got = families(&exercised().text());
    let want: BTreeMap<String, (String, Vec<String>)> = EXPECTED
        .iter()
        .map(|(n, t, l)| {
            (
                n.to_string(),
                (t.to_string(), l.iter().map(|s| s.to_string()).collect()),
            )
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn s8_t8_4_no_iptables_series_in_nftables_mode() {
    let text = exercised().text();
    assert!(!text.contains("iptables"), "{text}");
    assert!(text.contains("# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] "));
}

/// The reference's own table, where it is beside the repository: every metric it lists for all
/// modes or for nftables is exported, with its type.
#[test]
fn s8_the_reference_table_agrees() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/kube-proxy-behaviour.md"
    );
    let Ok(reference) = std::fs::read_to_string(path) else {
        eprintln!(
            "SKIPPED (no ../shared/reference beside the repository): the embedded §8 list was checked"
        );
        return;
    };
    let section = reference
        .split("## §8 Metrics server")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let got = families(&exercised().text());
    let mut checked = 0;
    for row in section.lines().filter(|l| l.starts_with("| `kubeproxy_")) {
        let cols: Vec<&str> = row.split('|').map(str::trim).collect();
        let (names, kind, modes) = (cols[1], cols[2].trim_matches('*'), cols[4]);
        // "same" rows take the mode of the row above (the full-sync histogram's).
        if !(modes.contains("all") || modes.contains("nftables") || modes.starts_with("same")) {
            continue;
        }
        let names: Vec<String> = names
            .split(',')
            .flat_map(|n| n.split(" / "))
            .map(|n| n.trim().trim_matches('`').to_owned())
            .collect();
        let kinds: Vec<&str> = kind.split(" / ").map(str::trim).collect();
        let first = names[0].clone();
        for (i, n) in names.iter().enumerate() {
            // `a_pending` / `_total` is shorthand for `a_pending` and `a_total`.
            let n = if n.starts_with('_') {
                format!("{}{n}", first.rsplit_once('_').unwrap().0)
            } else {
                n.clone()
            };
            let k = kinds.get(i).or(kinds.first()).unwrap();
            let (gk, _) = got
                .get(&n)
                .unwrap_or_else(|| panic!("{n} ({k}) from §8 is not exported"));
            assert_eq!(gk, k, "{n}");
            checked += 1;
        }
    }
    assert!(checked >= 17, "only {checked} rows read from §8");
}
