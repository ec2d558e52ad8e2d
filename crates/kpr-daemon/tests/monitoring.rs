//! Monitoring (the files of deploy/monitoring), proven with the real tools: Debian's
//! `prometheus` package brings `prometheus` and `promtool`.
//!
//! - The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`);
//!   the PrometheusRule manifest holds exactly the rules file; the example configuration
//!   passes `promtool check config`; every PromQL expression of the Grafana dashboard parses.
//! - A real Prometheus, in a network namespace the test creates, scrapes two real
//!   kube-proxy-rs: one in nftables mode fed from a manifest directory (in the same
//!   namespace, on 127.0.0.1:10249) and one in iptables mode fed by the test API server (in a
//!   second namespace, over a veth). The test changes an EndpointSlice, deletes a map element,
//!   flushes the table, makes the kernel refuse a transaction and a restore, so every metric
//!   the alerts and the dashboard use has a series; then asks Prometheus' HTTP API for the sync
//!   duration histogram, the network programming latency, every metric the rules and the
//!   dashboard name, every dashboard query, and the alerts that must be firing.
//! - `promtool check metrics` passes on both /metrics bodies (upstream's two gauges named
//!   `_total` aside), and every metric the rules and the dashboard query is in our output, so
//!   they cannot drift apart: a name we do not export fails the test, naming it.
//!
//! Network safety: the proxies and Prometheus run only inside the namespaces the test creates;
//! every address used is 127.0.0.1 or on the veth between them. Without root, or without
//! promtool and prometheus (scripts/test.sh installs them), the tests print SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_testkit::lab::Lab;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/monitoring")
        .join(file)
}

const RULES: &str = "kube-proxy-rs.rules.yml";
const RULES_TEST: &str = "kube-proxy-rs.rules.test.yml";
const PROMETHEUS_RULE: &str = "kube-proxy-rs.prometheusrule.yaml";
const DASHBOARD: &str = "kube-proxy-rs.dashboard.json";
const CONFIG: &str = "prometheus.yml";

/// What `promtool check metrics` says about upstream's names, which we keep (§8: dashboards
/// depend on them): two gauges whose names end in `_total`.
const UPSTREAM_LINT: &[(&str, &str)] = &[
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "non-counter metrics should not have \"_total\" suffix",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_total",
        "non-counter metrics should not have \"_total\" suffix",
    ),
];

// ---------------------------------------------------------------------------------------
// Metric names in PromQL, and in our output.

/// The metric names an expression queries: identifiers starting with one of our prefixes
/// (`kubeproxy_`, `kpr_`, `rest_client_`, `process_`), outside string literals.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const PREFIXES: [&str; 4] = ["kubeproxy_", "kpr_", "rest_client_", "process_"];
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            // A string literal (label values, Grafana's legend text): skip to its end.
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' && c != '`' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
        } else if ident(c) {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if !ident(d) {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            let word = &expr[i..end];
            if PREFIXES.iter().any(|p| word.starts_with(p)) {
                names.insert(word.to_owned());
            }
        }
    }
    names
}

/// The metric families of an exposition text and their types (`# TYPE` lines).
fn exported(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` is a series name our output has: a counter or gauge family, or a
/// histogram's `_bucket`, `_sum` or `_count` (a summary's `_sum` or `_count`).
fn is_exported(name: &str, families: &BTreeMap<String, String>) -> bool {
    if let Some(kind) = families.get(name) {
        return !matches!(kind.as_str(), "histogram" | "summary");
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .and_then(|base| families.get(base))
            .is_some_and(|kind| kind == "histogram" || (kind == "summary" && *suffix != "_bucket"))
    })
}

/// Checks that every metric the expressions query is in our output; the error names each
/// missing metric and where it is queried.
fn check_exported(
    exprs: &[(String, String)],
    families: &BTreeMap<String, String>,
) -> Result<(), String> {
    let missing: Vec<String> = exprs
        .iter()
        .flat_map(|(place, expr)| {
            metric_names(expr)
                .into_iter()
                .filter(|n| !is_exported(n, families))
                .map(move |n| format!("{n} (queried by {place})"))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "metrics kube-proxy-rs does not export:\n  {}",
            missing.join("\n  ")
        ))
    }
}

// ---------------------------------------------------------------------------------------
// The files of deploy/monitoring.

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (`alert NAME` or `record NAME`, expression) of every rule in a rules document.
fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    let groups = rules["groups"].as_array().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| {
            let name = match (r["alert"].as_str(), r["record"].as_str()) {
                (Some(a), _) => format!("alert {a}"),
                (None, Some(r)) => format!("record {r}"),
                _ => panic!("a rule without a name: {r}"),
            };
            (name, r["expr"].as_str().expect("expr").to_owned())
        })
        .collect()
}

/// (`panel "TITLE"` or `variable NAME`, expression) of every query of the dashboard.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "panel \"{}\" {}",
                    p["title"].as_str().unwrap_or(""),
                    t["refId"].as_str().unwrap_or("")
                ),
                t["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(q) = v["definition"].as_str() {
            out.push((
                format!("variable {}", v["name"].as_str().unwrap_or("")),
                q.to_owned(),
            ));
        }
    }
    out
}

/// A dashboard expression as Prometheus can evaluate it: Grafana's variables replaced (every
/// job and instance; rates over `window`).
fn grafana_to_promql(expr: &str, window: &str) -> String {
    expr.replace("$__rate_interval", window)
        .replace("$job", ".*")
        .replace("$instance", ".*")
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(monitoring(DASHBOARD)).unwrap()).unwrap()
}

/// Every expression the rules (both forms) and the dashboard query.
fn all_exprs() -> Vec<(String, String)> {
    let mut exprs = rule_exprs(&yaml(&monitoring(RULES)));
    exprs.extend(
        rule_exprs(&yaml(&monitoring(PROMETHEUS_RULE))["spec"])
            .into_iter()
            .map(|(n, e)| (format!("PrometheusRule {n}"), e)),
    );
    exprs.extend(dashboard_exprs(&dashboard()));
    exprs
}

// ---------------------------------------------------------------------------------------
// Tests without root or tools.

#[test]
fn the_prometheus_rule_manifest_holds_the_rules_file() {
    let rules = yaml(&monitoring(RULES));
    let manifest = yaml(&monitoring(PROMETHEUS_RULE));
    assert_eq!(manifest["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(
        manifest["spec"]["groups"], rules["groups"],
        "{PROMETHEUS_RULE}'s spec.groups differs from {RULES}: edit both"
    );
    // The five things the alerts are for.
    let names: Vec<String> = rule_exprs(&rules).into_iter().map(|(n, _)| n).collect();
    for alert in [
        "KubeProxySyncStale",
        "KubeProxySyncFailing",
        "KubeProxyNetworkProgrammingLatencyHigh",
        "KubeProxyRulesRepaired",
        "KubeProxyRestarting",
    ] {
        assert!(names.contains(&format!("alert {alert}")), "{names:?}");
    }
}

#[test]
fn the_dashboard_is_grafana_json_over_our_metrics() {
    let d = dashboard();
    assert_eq!(d["uid"], "kube-proxy-rs");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "wider than the grid: {}",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(!p["description"].as_str().unwrap_or("").is_empty());
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                !metric_names(expr).is_empty(),
                "{}: no metric of ours in {expr}",
                p["title"]
            );
            // Every series is limited to the chosen jobs and instances.
            for name in metric_names(expr) {
                assert!(
                    expr.contains(&format!("{name}{{job=~\"$job\", instance=~\"$instance\"}}")),
                    "{}: {name} without the job and instance selector in {expr}",
                    p["title"]
                );
            }
        }
    }
}

/// Bad input: an alert rule, or a dashboard query, naming a metric we do not export fails
/// the check with the metric's name; so does a histogram's name without `_bucket`, `_sum`
/// or `_count`, and a `_bucket` of a counter.
#[test]
fn a_query_of_a_metric_we_do_not_export_fails_with_its_name() {
    let ours = "# HELP kubeproxy_sync_proxy_rules_duration_seconds x\n# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\nkubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1\nkubeproxy_sync_proxy_rules_duration_seconds_sum 0.1\nkubeproxy_sync_proxy_rules_duration_seconds_count 1\n# TYPE kpr_rules_repaired_total counter\nkpr_rules_repaired_total 0\n";
    let families = exported(ours);
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket{job=~"kubeproxy_in_a_string"}[5m]))) > 1 or kpr_rules_repaired_total"#
        ),
        BTreeSet::from([
            "kpr_rules_repaired_total".to_owned(),
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket".to_owned()
        ])
    );
    let good = [(
        "alert Good".to_owned(),
        "rate(kubeproxy_sync_proxy_rules_duration_seconds_count[5m]) > 0 and kpr_rules_repaired_total > 0"
            .to_owned(),
    )];
    check_exported(&good, &families).unwrap();

    // A rules file whose alert queries a metric that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let bad_rules = dir.path().join("bad.rules.yml");
    std::fs::write(
        &bad_rules,
        "groups:\n  - name: bad\n    rules:\n      - alert: KubeProxyMadeUp\n        expr: increase(kubeproxy_sync_proxy_rules_made_up_total[5m]) > 0\n",
    )
    .unwrap();
    let err = check_exported(&rule_exprs(&yaml(&bad_rules)), &families).unwrap_err();
    assert!(
        err.contains("kubeproxy_sync_proxy_rules_made_up_total (queried by alert KubeProxyMadeUp)"),
        "{err}"
    );
    for (expr, name) in [
        (
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_sync_proxy_rules_duration_seconds",
        ),
        (
            "rate(kpr_rules_repaired_total_bucket[5m])",
            "kpr_rules_repaired_total_bucket",
        ),
        ("sum(process_open_fds)", "process_open_fds"),
    ] {
        let err = check_exported(&[("panel \"x\"".into(), expr.into())], &families).unwrap_err();
        assert!(err.contains(name), "{expr}: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// The tools.

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn which(name: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !path.is_empty()).then_some(path)
}

/// `(prometheus, promtool)`, installed with apt when missing and root (Debian's package
/// `prometheus` brings both; scripts/test.sh installs it). One test at a time asks.
fn tools() -> Option<(String, String)> {
    static ASKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ASKING.lock().unwrap_or_else(|e| e.into_inner());
    let found = || Some((which("prometheus")?, which("promtool")?));
    if let Some(t) = found() {
        return Some(t);
    }
    if is_root() {
        eprintln!("prometheus or promtool not found: trying apt-get install prometheus");
        let _ = Command::new("sh")
            .args([
                "-c",
                // The package starts a Prometheus service on systemd hosts; the tests need
                // only the binaries.
                "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null && { systemctl disable --now prometheus >/dev/null 2>&1 || true; }",
            ])
            .status();
    }
    found()
}

/// Runs promtool with `args` (in `dir`, feeding `stdin`); its exit code and output.
fn promtool(tool: &str, dir: &Path, args: &[&str], stdin: Option<&str>) -> (i32, String) {
    let mut child = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_checks_the_rules_runs_their_unit_tests_and_parses_the_dashboard() {
    let Some((_, promtool_bin)) = tools() else {
        eprintln!(
            "SKIPPED: promtool_checks_the_rules_runs_their_unit_tests_and_parses_the_dashboard needs promtool (apt-get install prometheus; scripts/test.sh does)"
        );
        return;
    };
    let dir = monitoring("");
    let run = |args: &[&str]| {
        let (code, out) = promtool(&promtool_bin, &dir, args, None);
        assert_eq!(code, 0, "promtool {}:\n{out}", args.join(" "));
        eprintln!("promtool {}:\n{out}", args.join(" "));
        out
    };
    let out = run(&["check", "rules", RULES]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
    let out = run(&["test", "rules", RULES_TEST]);
    assert!(out.contains("SUCCESS"), "{out}");
    run(&["check", "config", CONFIG]);

    // The PrometheusRule's spec, as a rules file (JSON is YAML).
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("prometheusrule.rules.yml");
    let manifest = yaml(&monitoring(PROMETHEUS_RULE));
    std::fs::write(&spec, manifest["spec"].to_string()).unwrap();
    run(&["check", "rules", spec.to_str().unwrap()]);

    // Every dashboard query, with Grafana's variables replaced, as a recording rule: promtool
    // parses each.
    let exprs = dashboard_exprs(&dashboard());
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .filter(|(_, (place, _))| place.starts_with("panel"))
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": grafana_to_promql(e, "1m")}))
        .collect();
    let n = rules.len();
    let file = tmp.path().join("dashboard.rules.yml");
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let out = run(&["check", "rules", file.to_str().unwrap()]);
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

// ---------------------------------------------------------------------------------------
// The real Prometheus scraping the real kube-proxy-rs.

/// An HTTP/1.0 GET to `addr` from inside network namespace `ns`: status and body.
fn http_get(ns: &str, addr: &str, path: &str) -> Result<(u16, String), String> {
    let target: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let netns = format!("/run/netns/{ns}");
    // A socket belongs to the namespace it was made in: connect from a thread that moved there.
    let mut stream = std::thread::spawn(move || -> std::io::Result<TcpStream> {
        let file = std::fs::File::open(netns)?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        TcpStream::connect_timeout(&target, Duration::from_secs(2))
    })
    .join()
    .map_err(|_| "the connecting thread panicked".to_owned())?
    .map_err(|e| format!("connect to {addr} in {ns}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: no status: {head}"))?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One series of a query's answer: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// Prometheus' HTTP API, inside the namespace it runs in.
struct Prometheus {
    ns: String,
    addr: String,
}

impl Prometheus {
    /// `data` of a successful API answer; the error otherwise.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(&self.ns, &self.addr, path)?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("{path}: {status} {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!(
                "{path}: {status} {}: {}",
                v["errorType"], v["error"]
            ));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's samples (vector or scalar answers).
    fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .map_err(|e| format!("query `{promql}`: {e}"))?;
        let value = |v: &Value| -> f64 {
            v[1].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(match data["resultType"].as_str() {
            Some("scalar") => vec![(BTreeMap::new(), value(&data["result"]))],
            _ => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                        .collect();
                    (labels, value(&s["value"]))
                })
                .collect(),
        })
    }

    /// The series of metric `name` Prometheus holds (matching `selector`, e.g.
    /// `{mode="nftables"}`); an error naming the metric when there is none.
    fn metric(&self, name: &str, selector: &str) -> Result<Vec<Sample>, String> {
        let q = format!("{name}{selector}");
        let samples = self.query(&q)?;
        if samples.is_empty() {
            Err(format!(
                "Prometheus has no series of metric {name} (query `{q}`)"
            ))
        } else {
            Ok(samples)
        }
    }
}

const NODE_A: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDRs: [10.0.0.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";
const NODE_B: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDRs: [10.0.1.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.3}]}\n";

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]\n"
    )
}

/// An EndpointSlice of `svc` with endpoints `eps` on `node`, changed at `trigger` (the
/// annotation the network programming latency is measured from).
fn slice(svc: &str, node: &str, eps: &[&str], trigger: &str) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n"
    );
    for ip in eps {
        s.push_str(&format!(
            "  - {{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}}}\n"
        ));
    }
    s
}

fn now() -> String {
    kpr_ops::time::rfc3339_nano(SystemTime::now())
}

fn count(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// The value of the series `line_prefix` (name and labels, as /metrics writes them).
fn value_in(metrics: &str, line_prefix: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(line_prefix)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// What the test leaves behind when it fails: the logs.
struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.0 {
                eprintln!(
                    "--- {} ---\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }
}

#[test]
fn prometheus_scrapes_kube_proxy_rs_and_every_queried_metric_exists() {
    const TEST: &str = "prometheus_scrapes_kube_proxy_rs_and_every_queried_metric_exists";
    if !is_root() {
        eprintln!("SKIPPED: {TEST} needs root (it creates network namespaces)");
        return;
    }
    let Some((prometheus_bin, promtool_bin)) = tools() else {
        eprintln!(
            "SKIPPED: {TEST} needs prometheus and promtool (apt-get install prometheus; scripts/test.sh does)"
        );
        return;
    };
    let Some(mut lab) = Lab::new("monitoring") else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_kube-proxy-rs");
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b, log_prom) = (
        dir.path().join("proxy-nftables.log"),
        dir.path().join("proxy-iptables.log"),
        dir.path().join("prometheus.log"),
    );
    // Declared after `lab`, so dropped first: on a failure the logs are printed while the
    // processes that wrote them still run.
    let _logs = Logs(vec![log_a.clone(), log_b.clone(), log_prom.clone()]);

    // Node a: nftables mode, a manifest directory, Prometheus. Node b: iptables mode, the
    // test API server, its metrics on the veth between them.
    let a = lab.netns("a");
    let b = lab.netns("b");
    let (veth_a, veth_b) = lab.link(&a, &b);
    lab.sh(&a, &format!("ip addr add 192.168.0.2/24 dev {veth_a}"));
    lab.sh(&b, &format!("ip addr add 192.168.0.3/24 dev {veth_b}"));

    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("node.yaml"), NODE_A).unwrap();
    std::fs::write(manifests.join("web.yaml"), service("web", "172.30.0.10")).unwrap();
    std::fs::write(
        manifests.join("web-eps.yaml"),
        slice("web", "node-a", &["10.0.0.11"], &now()),
    )
    .unwrap();
    let proxy_a = format!(
        "exec {bin} --proxy-mode nftables --manifests {} --hostname-override node-a --cluster-cidr 10.0.0.0/8 --iptables-sync-period 2s --iptables-min-sync-period 0s -v 2 2>>{}",
        manifests.display(),
        log_a.display()
    );
    lab.spawn(&a, &["sh", "-c", &proxy_a]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = rt
        .block_on(kpr_apiserver::ApiServer::start(kpr_apiserver::Options {
            netns: Some(b.clone()),
            ..Default::default()
        }))
        .unwrap();
    let obj = |y: &str| -> Value { serde_saphyr::from_str(y).unwrap() };
    api.apply(obj(NODE_B));
    for (name, ip) in [("web", "172.30.0.10"), ("web2", "172.30.0.20")] {
        api.apply(obj(&service(name, ip)));
        api.apply(obj(&slice(name, "node-b", &["10.0.1.11"], &now())));
    }
    let proxy_b = format!(
        "exec {bin} --proxy-mode iptables --master {} --hostname-override node-b --cluster-cidr 10.0.0.0/8 --metrics-bind-address 192.168.0.3:10249 --iptables-sync-period 2s --iptables-min-sync-period 0s -v 2 2>>{}",
        api.url(),
        log_b.display()
    );
    lab.spawn(&b, &["sh", "-c", &proxy_b]);
    Lab::wait_for("the first syncs", Duration::from_secs(20), || {
        count(&log_a, "Synced nftables rules") > 0 && count(&log_b, "Synced iptables rules") > 0
    });

    // Prometheus in node a, scraping both every second and evaluating our alert rules.
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n  - job_name: kube-proxy\n    static_configs:\n      - targets: ['127.0.0.1:10249']\n        labels: {{mode: nftables}}\n      - targets: ['192.168.0.3:10249']\n        labels: {{mode: iptables}}\n",
            monitoring(RULES).canonicalize().unwrap().display()
        ),
    )
    .unwrap();
    let tsdb = dir.path().join("tsdb");
    let prom_cmd = format!(
        "exec {prometheus_bin} --config.file={} --storage.tsdb.path={} --web.listen-address=127.0.0.1:9090 2>>{}",
        config.display(),
        tsdb.display(),
        log_prom.display()
    );
    lab.spawn(&a, &["sh", "-c", &prom_cmd]);
    let prom = Prometheus {
        ns: a.clone(),
        addr: "127.0.0.1:9090".into(),
    };
    Lab::wait_for("Prometheus to be ready", Duration::from_secs(30), || {
        http_get(&a, "127.0.0.1:9090", "/-/ready").is_ok_and(|(s, _)| s == 200)
    });
    let ready_at = unix_now();
    let took = Lab::wait_for(
        "both targets up in Prometheus",
        Duration::from_secs(20),
        || {
            prom.query("up{job=\"kube-proxy\"} == 1")
                .is_ok_and(|s| s.len() == 2)
        },
    );
    eprintln!("both targets up after {took:?}");

    // EndpointSlice changes, each a partial sync with a network programming latency, a
    // scrape or two apart (a histogram's series appears with its first sample, so a rate
    // needs the next ones).
    let endpoints = ["10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"];
    for n in 2..=endpoints.len() {
        let before = count(&log_a, "Network programming latency");
        std::fs::write(
            manifests.join("web-eps.yaml"),
            slice("web", "node-a", &endpoints[..n], &now()),
        )
        .unwrap();
        Lab::wait_for("the latency of the change", Duration::from_secs(10), || {
            count(&log_a, "Network programming latency") > before
        });
        std::thread::sleep(Duration::from_millis(1500));
    }
    // The health endpoints, so their counters have series.
    for path in ["/healthz", "/livez"] {
        http_get(&a, "127.0.0.1:10256", path).unwrap();
        http_get(&b, "127.0.0.1:10256", path).unwrap();
    }
    let metrics_a = || http_get(&a, "127.0.0.1:10249", "/metrics").unwrap().1;
    let metrics_b = || http_get(&a, "192.168.0.3:10249", "/metrics").unwrap().1;

    // What the alerts watch for, for real. Drift: a map element deleted behind the proxy's
    // back, found by the periodic comparison.
    lab.sh(
        &a,
        "nft delete element ip kube-proxy-rs service-ips '{ 172.30.0.10 . tcp . 80 }'",
    );
    // The comparison runs every syncPeriod, at most every 10 s.
    Lab::wait_for("the drift to be counted", Duration::from_secs(30), || {
        value_in(&metrics_a(), "kpr_rules_drift_total{ip_family=\"IPv4\"}")
            .is_some_and(|v| v >= 1.0)
    });
    // A flush, repaired.
    lab.sh(&a, "nft flush table ip kube-proxy-rs");
    Lab::wait_for("the repair to be counted", Duration::from_secs(5), || {
        value_in(&metrics_a(), "kpr_rules_repaired_total").is_some_and(|v| v >= 1.0)
    });
    // Refused transactions: another process owns a table of our name for 5 s.
    lab.spawn(
        &a,
        &[
            "sh",
            "-c",
            "(echo 'delete table ip kube-proxy-rs; add table ip kube-proxy-rs { flags owner ; }'; sleep 5) | nft -i",
        ],
    );
    Lab::wait_for("a refused transaction", Duration::from_secs(10), || {
        value_in(
            &metrics_a(),
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}",
        )
        .is_some_and(|v| v >= 1.0)
    });
    // A refused restore: a rule that is not ours jumps to web2's chain, and web2 goes.
    let chain = lab
        .sh(&b, "iptables-nft-save -t nat")
        .lines()
        .find(|l| l.contains("-d 172.30.0.20/32") && l.contains("-j KUBE-SVC-"))
        .and_then(|l| l.split("-j ").nth(1))
        .expect("web2's service chain")
        .trim()
        .to_owned();
    let foreign = format!("-t nat -A OUTPUT -d 198.51.100.1/32 -j {chain}");
    lab.sh(&b, &format!("iptables-nft {foreign}"));
    assert!(api.delete(kpr_apiserver::Kind::Service, "default", "web2"));
    Lab::wait_for("a refused restore", Duration::from_secs(10), || {
        value_in(
            &metrics_b(),
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"}",
        )
        .is_some_and(|v| v >= 1.0)
    });
    lab.sh(
        &b,
        &format!("iptables-nft {}", foreign.replace(" -A ", " -D ")),
    );
    Lab::wait_for("node b to recover", Duration::from_secs(10), || {
        count(&log_b, "Sync succeeded after failing") > 0
    });
    Lab::wait_for("node a to recover", Duration::from_secs(15), || {
        count(&log_a, "Sync succeeded after failing") > 0
    });

    // promtool check metrics on both bodies: nothing but upstream's names.
    let bodies = [("nftables", metrics_a()), ("iptables", metrics_b())];
    for (mode, body) in &bodies {
        let (code, out) = promtool(&promtool_bin, dir.path(), &["check", "metrics"], Some(body));
        let problems: Vec<&str> = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                !UPSTREAM_LINT
                    .iter()
                    .any(|(m, p)| l.starts_with(m) && l.contains(p))
            })
            .collect();
        assert!(
            (code == 0 || code == 3) && problems.is_empty(),
            "promtool check metrics on the {mode} mode's /metrics (exit {code}):\n{}",
            problems.join("\n")
        );
        eprintln!("promtool check metrics, {mode} mode: exit {code}\n{out}");
    }

    // Every metric the rules and the dashboard query is in our output.
    let mut families = exported(&bodies[0].1);
    families.extend(exported(&bodies[1].1));
    let exprs = all_exprs();
    check_exported(&exprs, &families).unwrap_or_else(|e| panic!("{e}"));
    let queried: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    eprintln!(
        "{} metrics queried by the rules and the dashboard, all in our output",
        queried.len()
    );

    // ... and in Prometheus. Bad input first: a missing metric is named.
    let err = prom
        .metric("kubeproxy_no_such_metric_total", "")
        .unwrap_err();
    assert!(err.contains("kubeproxy_no_such_metric_total"), "{err}");
    let took = Lab::wait_for(
        "Prometheus to hold every queried metric",
        Duration::from_secs(10),
        || queried.iter().all(|n| prom.metric(n, "").is_ok()),
    );
    eprintln!("all in Prometheus {took:?} after the last change");
    for name in &queried {
        prom.metric(name, "").unwrap_or_else(|e| panic!("{e}"));
    }

    // The sync duration histogram and the network programming latency, per mode.
    for mode in ["nftables", "iptables"] {
        let sel = format!("{{mode=\"{mode}\",ip_family=\"IPv4\"}}");
        let syncs = prom
            .metric("kubeproxy_sync_proxy_rules_duration_seconds_count", &sel)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(syncs[0].1 >= 2.0, "{mode}: {syncs:?}");
        let buckets = prom
            .metric("kubeproxy_sync_proxy_rules_duration_seconds_bucket", &sel)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buckets.len(), 16, "{mode}: 15 buckets and +Inf");
        let p99 = prom
            .query(&format!("histogram_quantile(0.99, sum by (le) (rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket{sel}[1m])))"))
            .unwrap();
        assert!(
            p99.len() == 1 && p99[0].1 > 0.0 && p99[0].1 <= 16.384,
            "{mode}: sync p99 {p99:?}"
        );
        eprintln!("{mode}: {} syncs, p99 {:.4} s", syncs[0].1, p99[0].1);
    }
    let latency = prom
        .metric(
            "kubeproxy_network_programming_duration_seconds_count",
            "{mode=\"nftables\"}",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        latency[0].1 >= 3.0,
        "the EndpointSlice changes: {latency:?}"
    );
    let sum = prom
        .metric(
            "kubeproxy_network_programming_duration_seconds_sum",
            "{mode=\"nftables\"}",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(sum[0].1 > 0.0 && sum[0].1 < 60.0, "{sum:?}");
    let p99 = prom
        .query("histogram_quantile(0.99, sum by (le) (kubeproxy_network_programming_duration_seconds_bucket{mode=\"nftables\"}))")
        .unwrap();
    assert!(
        p99.len() == 1 && p99[0].1 > 0.0 && p99[0].1 <= 10.0,
        "the changes took seconds at most: {p99:?}"
    );
    eprintln!(
        "network programming latency: {} samples, p99 {} s",
        latency[0].1, p99[0].1
    );
    // Each process started once.
    let restarts = prom
        .query("changes(process_start_time_seconds{job=\"kube-proxy\"}[5m])")
        .unwrap();
    assert!(
        restarts.len() == 2 && restarts.iter().all(|(_, v)| *v == 0.0),
        "{restarts:?}"
    );

    // Every dashboard query evaluates, and has data.
    for (place, expr) in dashboard_exprs(&dashboard()) {
        if !place.starts_with("panel") {
            continue;
        }
        let promql = grafana_to_promql(&expr, "10s");
        let samples = prom
            .query(&promql)
            .unwrap_or_else(|e| panic!("{place}: {e}"));
        assert!(!samples.is_empty(), "{place}: no data for `{promql}`");
    }

    // The alert rules run in Prometheus without errors, and the ones the changes above
    // should fire (those without `for`) are firing.
    let rules = prom.api("/api/v1/rules").unwrap();
    let loaded: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(loaded.len(), 6, "{rules}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r}");
    }
    let took = Lab::wait_for(
        "KubeProxyRulesRepaired and KubeProxyRulesDrifted to fire",
        Duration::from_secs(10),
        || {
            let Ok(alerts) = prom.api("/api/v1/alerts") else {
                return false;
            };
            let firing: BTreeSet<String> = alerts["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["state"] == "firing" && a["labels"]["mode"] == "nftables")
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
                .collect();
            firing.contains("KubeProxyRulesRepaired") && firing.contains("KubeProxyRulesDrifted")
        },
    );
    eprintln!("the alerts fired {took:?} after the checks began");
    let alerts = prom.api("/api/v1/alerts").unwrap();
    eprintln!("alerts: {alerts}");

    screenshot(&lab, &a, &prom, ready_at, dir.path());

    drop(api);
    drop(rt);
    let start = Instant::now();
    drop(lab);
    eprintln!("cleaned up in {:?}", start.elapsed());
}

// ---------------------------------------------------------------------------------------
// What the dashboard looks like: its panels drawn from Prometheus' answers to its queries,
// in the dashboard's grid, and photographed by headless Chromium.

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Renders the dashboard over `[from, now]` and screenshots it; the PNG goes to
/// docs/images/dashboard.png when that file is missing or `KPR_UPDATE_SCREENSHOT=1`.
/// Without Chromium (scripts/test.sh installs it) there is no picture, and the test says so.
fn screenshot(lab: &Lab, ns: &str, prom: &Prometheus, from: f64, dir: &Path) {
    let Some(chromium) = which("chromium") else {
        eprintln!("no dashboard screenshot: chromium not found (apt-get install chromium)");
        return;
    };
    let (html, height) = render_dashboard(prom, from, unix_now());
    let page = dir.join("dashboard.html");
    std::fs::write(&page, html).unwrap();
    let shot = dir.join("dashboard.png");
    let profile = tempfile::tempdir().unwrap();
    // Inside the test's namespace, a local file, and every flag that keeps it from calling home.
    let out = lab.try_sh(
        ns,
        &format!(
            "HOME={home} timeout 120 {chromium} --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking --disable-component-update --disable-sync --disable-default-apps --disable-extensions --disable-dev-shm-usage --disable-breakpad --disable-crash-reporter --user-data-dir={home} --hide-scrollbars --window-size={DASH_WIDTH},{height} --screenshot={shot} 'file://{page}'",
            home = profile.path().display(),
            shot = shot.display(),
            page = page.display()
        ),
    );
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    eprintln!("dashboard screenshot: {} bytes", png.len());
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/images/dashboard.png");
    if !committed.exists() || std::env::var_os("KPR_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(committed.parent().unwrap()).unwrap();
        std::fs::write(&committed, &png).unwrap();
        eprintln!("wrote {}", committed.display());
    }
}

const DASH_WIDTH: u32 = 1400;
/// Pixels per grid row (Grafana's is 30; a little less keeps the picture small).
const DASH_ROW: f64 = 26.0;
const PALETTE: [&str; 8] = [
    "#73BF69", "#F2CC0C", "#5794F2", "#FF780A", "#F2495C", "#B877D9", "#8AB8FF", "#FADE2A",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A value in a panel's unit, as Grafana would write it.
fn format_value(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let num = |v: f64| {
        if (v == v.trunc() && v.abs() < 1e6) || v.abs() >= 100.0 {
            format!("{v:.0}")
        } else if v.abs() >= 1.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        }
    };
    match unit {
        "s" if v != 0.0 && v.abs() < 1e-3 => format!("{} µs", num(v * 1e6)),
        "s" if v != 0.0 && v.abs() < 1.0 => format!("{} ms", num(v * 1e3)),
        "s" => format!("{} s", num(v)),
        "ops" | "reqps" => format!("{} /s", num(v)),
        "bytes" => format!("{} MiB", num(v / 1048576.0)),
        "percentunit" => format!("{}%", num(v * 100.0)),
        _ => num(v),
    }
}

/// A legend from Grafana's `legendFormat` (`{{label}}` replaced by the series' value).
fn legend(format: &str, labels: &BTreeMap<String, String>) -> String {
    let mut out = format.to_owned();
    for (k, v) in labels {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    let out = out.trim().to_owned();
    if out.is_empty() {
        labels
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        out
    }
}

/// One series of a range query's answer: its labels and (time, value) points.
type Series = (BTreeMap<String, String>, Vec<(f64, f64)>);

/// The series of a range query.
fn query_range(prom: &Prometheus, promql: &str, from: f64, to: f64) -> Vec<Series> {
    let data = prom
        .api(&format!(
            "/api/v1/query_range?query={}&start={from:.3}&end={to:.3}&step=1",
            encode(promql)
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect();
            let points = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_str()?.parse::<f64>().ok()?)))
                .collect();
            (labels, points)
        })
        .collect()
}

fn clock(t: f64) -> String {
    let s = t as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The dashboard's panels as an HTML page over `[from, to]`, and the page's height.
fn render_dashboard(prom: &Prometheus, from: f64, to: f64) -> (String, u32) {
    let d = dashboard();
    let col = (f64::from(DASH_WIDTH) - 16.0) / 24.0;
    let mut body = String::new();
    let mut bottom = 0.0_f64;
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let num = |k: &str| g[k].as_f64().unwrap_or(0.0);
        let (x, y, w, h) = (
            8.0 + num("x") * col,
            48.0 + num("y") * DASH_ROW,
            num("w") * col - 6.0,
            num("h") * DASH_ROW - 6.0,
        );
        bottom = bottom.max(y + h);
        let title = escape(p["title"].as_str().unwrap_or(""));
        if p["type"] == "row" {
            body.push_str(&format!(
                "<div class=\"row\" style=\"left:{x}px;top:{y}px;width:{w}px\">{title}</div>\n"
            ));
            continue;
        }
        let unit = p["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("none");
        let targets = p["targets"].as_array().unwrap();
        body.push_str(&format!(
            "<div class=\"p\" style=\"left:{x:.0}px;top:{y:.0}px;width:{w:.0}px;height:{h:.0}px\"><div class=\"t\">{title}</div>"
        ));
        if p["type"] == "stat" {
            let expr = grafana_to_promql(targets[0]["expr"].as_str().unwrap(), "20s");
            let v = prom
                .query(&expr)
                .unwrap_or_else(|e| panic!("{e}"))
                .first()
                .map_or(f64::NAN, |s| s.1);
            let mut color = "#73BF69";
            for step in p["fieldConfig"]["defaults"]["thresholds"]["steps"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if step["value"].as_f64().is_none_or(|t| v >= t) {
                    color = step["color"].as_str().unwrap_or(color);
                }
            }
            let color = match color {
                "green" => "#73BF69",
                "orange" => "#FF9830",
                "red" => "#F2495C",
                c => c,
            };
            body.push_str(&format!(
                "<div class=\"stat\" style=\"color:{color};line-height:{:.0}px\">{}</div></div>\n",
                h - 30.0,
                escape(&format_value(v, unit))
            ));
            continue;
        }
        let mut series = Vec::new();
        for t in targets {
            let expr = grafana_to_promql(t["expr"].as_str().unwrap(), "20s");
            for (labels, points) in query_range(prom, &expr, from, to) {
                series.push((
                    legend(t["legendFormat"].as_str().unwrap_or(""), &labels),
                    points,
                ));
            }
        }
        series.sort_by(|a, b| a.0.cmp(&b.0));
        let legend_lines = 1.0 + (series.len() as f64 / 4.0).ceil().min(3.0);
        let (cw, ch) = (w - 70.0, h - 30.0 - 15.0 * legend_lines - 16.0);
        let values = series
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
            .filter(|v| v.is_finite());
        let max = values.fold(0.0_f64, f64::max);
        let max = if max > 0.0 { max * 1.1 } else { 1.0 };
        let mut svg = format!(
            "<svg width=\"{w:.0}\" height=\"{:.0}\"><g transform=\"translate(62,6)\">",
            ch + 22.0
        );
        for i in 0..=2 {
            let gy = ch * f64::from(i) / 2.0;
            let label = format_value(max * (1.0 - f64::from(i) / 2.0), unit);
            svg.push_str(&format!(
                "<line x1=\"0\" x2=\"{cw:.0}\" y1=\"{gy:.1}\" y2=\"{gy:.1}\" stroke=\"#2c3235\"/><text x=\"-6\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                gy + 4.0,
                escape(&label)
            ));
        }
        svg.push_str(&format!(
            "<text x=\"0\" y=\"{:.0}\">{}</text><text x=\"{cw:.0}\" y=\"{:.0}\" text-anchor=\"end\">{}</text>",
            ch + 16.0,
            clock(from),
            ch + 16.0,
            clock(to)
        ));
        let mut legend_html = String::new();
        for (i, (name, points)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let mut path = String::new();
            let mut pen_up = true;
            for (t, v) in points {
                if !v.is_finite() {
                    pen_up = true;
                    continue;
                }
                let px = (t - from) / (to - from).max(1.0) * cw;
                let py = ch - v / max * ch;
                path.push_str(&format!(
                    "{}{px:.1},{py:.1} ",
                    if pen_up { "M" } else { "L" }
                ));
                pen_up = false;
            }
            svg.push_str(&format!(
                "<path d=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>"
            ));
            if i < 12 {
                legend_html.push_str(&format!(
                    "<span><i style=\"background:{color}\"></i>{}</span>",
                    escape(name)
                ));
            }
        }
        svg.push_str("</g></svg>");
        body.push_str(&format!(
            "{svg}<div class=\"lg\">{legend_html}</div></div>\n"
        ));
    }
    let height = (bottom + 10.0) as u32;
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><style>
body{{margin:0;background:#111217;color:#ccccdc;font:12px 'DejaVu Sans',Helvetica,Arial,sans-serif;width:{DASH_WIDTH}px;height:{height}px;position:relative}}
header{{position:absolute;left:12px;top:10px;font-size:18px;color:#fff}}
header small{{font-size:12px;color:#8e8e8e;margin-left:12px}}
.p{{position:absolute;background:#181b1f;border:1px solid #2c3235;border-radius:3px;box-sizing:border-box;overflow:hidden}}
.t{{padding:5px 8px 2px;font-weight:bold;white-space:nowrap;overflow:hidden}}
.row{{position:absolute;font-size:14px;font-weight:bold;color:#fff;padding:3px 2px}}
.stat{{font-size:30px;font-weight:bold;text-align:center}}
svg text{{fill:#8e8e8e;font-size:10px}}
.lg{{padding:0 8px;font-size:11px;line-height:15px}}
.lg span{{margin-right:12px;white-space:nowrap;display:inline-block}}
.lg i{{display:inline-block;width:12px;height:3px;margin-right:4px;vertical-align:middle}}
</style></head><body><header>kube-proxy-rs <small>deploy/monitoring/{DASHBOARD} over the monitoring test's two nodes (nftables and iptables mode), {}&ndash;{} UTC</small></header>
{body}</body></html>
",
        clock(from),
        clock(to)
    );
    (html, height)
}
