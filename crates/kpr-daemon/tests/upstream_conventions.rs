//! Upstream conventions operators' tooling relies on, with the real binary:
//! - on start, one `events.k8s.io/v1` Event about this Node (reason `Starting`, action
//!   `StartKubeProxy`, controller `kube-proxy`), as upstream's `birthCry`; a refused or
//!   unanswered event is logged and never holds up start-up or shutdown;
//! - `--write-config-to` with no `--config` writes upstream's document for the same flags;
//! - `--logging-format=json` writes component-base's JSON lines (`ts`, `caller`, `msg`, `v`,
//!   the key/value pairs, `err`), every line; the default text format stays klog's.
//!
//! The event and logging tests run the proxy (nftables mode) against the test API server inside
//! a network namespace; without root they print SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_apiserver::{ApiServer, EventsAnswer};
use kpr_testkit::lab::Lab;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

/// One proxy at a time: each test starts processes, and the machine may have two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A node namespace with the test API server inside it, serving this node's Node.
struct Node {
    lab: Lab,
    node: String,
    api: ApiServer,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Node {
    fn new(test: &str) -> Option<Node> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut lab = Lab::new(test)?;
        let node = lab.netns("node");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = rt
            .block_on(ApiServer::start(kpr_apiserver::Options {
                netns: Some(node.clone()),
                ..Default::default()
            }))
            .unwrap();
        api.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]},
        }));
        Some(Node {
            lab,
            node,
            api,
            dir: tempfile::tempdir().unwrap(),
            _rt: rt,
            _serial: serial,
        })
    }

    /// Starts the proxy with `extra` flags, its stdout and stderr both into `log`; waits for
    /// its first sync (start-up is over) and returns its process id.
    fn start(&mut self, extra: &str, log: &Path) -> u32 {
        let cmd = format!(
            "exec {BIN} --proxy-mode nftables --master {} --hostname-override node-a --cluster-cidr 10.0.0.0/8 --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 {extra} >>{} 2>&1",
            self.api.url(),
            log.display()
        );
        let node = self.node.clone();
        let pid = self.lab.spawn(&node, &["sh", "-c", &cmd]).id();
        Lab::wait_for("the first sync", Duration::from_secs(15), || {
            read(log).contains("Synced nftables rules")
        });
        pid
    }

    /// SIGTERM, then waits until the process has logged its shutdown and exited.
    fn stop(&self, pid: u32, log: &Path) {
        self.lab.sh(&self.node, &format!("kill -TERM {pid}"));
        Lab::wait_for("the proxy to stop", Duration::from_secs(10), || {
            read(log).contains("Shutting down") && exited(pid)
        });
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The event creations the API server received (`POST path`, an empty query left out).
    fn posts(&self) -> Vec<String> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("POST "))
            .map(|r| r.trim_end_matches('?').to_owned())
            .collect()
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Gone, or a zombie waiting for the lab to reap it.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// klog's text header: `I1207 12:00:00.123456   12345 file.rs:42] `.
fn is_klog(line: &str) -> bool {
    let Some((header, _)) = line.split_once("] ") else {
        return false;
    };
    let parts: Vec<&str> = header.split_whitespace().collect();
    let [sev_date, time, pid, file_line] = parts.as_slice() else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let t: Vec<&str> = time.split([':', '.']).collect();
    sev_date.len() == 5
        && matches!(sev_date.as_bytes()[0], b'I' | b'W' | b'E')
        && digits(&sev_date[1..])
        && t.len() == 4
        && t[..3].iter().all(|p| p.len() == 2 && digits(p))
        && t[3].len() == 6
        && digits(t[3])
        && digits(pid)
        && file_line
            .rsplit_once(':')
            .is_some_and(|(f, l)| f.ends_with(".rs") && digits(l))
}

#[test]
fn starting_event_is_recorded_once_and_text_logs_stay_klogs() {
    let Some(mut n) = Node::new("event-start") else {
        return;
    };
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let log = n.log("proxy.log");
    let pid = n.start("-v 2", &log);
    Lab::wait_for("the Starting event", Duration::from_secs(10), || {
        !n.api.events().is_empty()
    });
    // A second event or a retry would show by now.
    std::thread::sleep(Duration::from_secs(1));
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let events = n.api.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        n.posts(),
        ["POST /apis/events.k8s.io/v1/namespaces/default/events"],
        "one creation, where client-go's events recorder creates it"
    );
    let e = &events[0];
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(e["apiVersion"], "events.k8s.io/v1");
    assert_eq!(e["kind"], "Event");
    assert_eq!(e["metadata"]["namespace"], "default");
    assert_eq!(e["reason"], "Starting");
    assert_eq!(e["action"], "StartKubeProxy");
    assert_eq!(e["type"], "Normal");
    assert_eq!(e["reportingController"], "kube-proxy");
    assert_eq!(
        e["reportingInstance"],
        format!("kube-proxy-{}", hostname.trim())
    );
    assert_eq!(
        e["regarding"],
        json!({"kind": "Node", "name": "node-a", "uid": "node-a"})
    );
    for absent in [
        "note",
        "related",
        "series",
        "deprecatedSource",
        "deprecatedCount",
    ] {
        assert!(e.get(absent).is_none(), "{absent} is not sent: {e}");
    }
    // `<node>.<UnixNano in hex>` and a microsecond eventTime, both from the start.
    let name = e["metadata"]["name"].as_str().unwrap();
    let nanos = u128::from_str_radix(name.strip_prefix("node-a.").unwrap(), 16).unwrap();
    assert!(
        (before.as_nanos()..=after.as_nanos()).contains(&nanos),
        "{name}"
    );
    let time = e["eventTime"].as_str().unwrap();
    assert_eq!(time.len(), "2026-12-07T12:00:00.123456Z".len(), "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");

    n.stop(pid, &log);
    let text = read(&log);
    assert!(text.lines().count() > 5, "{text}");
    for line in text.lines() {
        assert!(is_klog(line), "not a klog line: {line:?}\n{text}");
    }
    assert!(
        !text.contains("rejected event") && !text.contains("Unable to write event"),
        "{text}"
    );
}

#[test]
fn a_refused_or_unanswered_event_never_holds_up_start_up() {
    let Some(mut n) = Node::new("event-refused") else {
        return;
    };
    // Refused (the RBAC rule missing): logged as client-go logs it, not retried.
    n.api.answer_events(EventsAnswer::Refuse(403));
    let log = n.log("refused.log");
    let pid = n.start("--logging-format=text", &log);
    Lab::wait_for("the refusal in the log", Duration::from_secs(10), || {
        read(&log).contains("Server rejected event (will not retry!)")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(n.posts().len(), 1, "not retried: {:?}", n.posts());
    assert!(n.api.events().is_empty());
    assert!(!exited(pid), "still running:\n{}", read(&log));
    let text = read(&log);
    let refusal = text
        .lines()
        .find(|l| l.contains("Server rejected event"))
        .unwrap();
    assert!(refusal.starts_with('E'), "an error line: {refusal}");
    assert!(
        refusal.contains("Forbidden") || refusal.contains("forbidden"),
        "{refusal}"
    );
    assert!(text.lines().all(is_klog), "{text}");
    n.stop(pid, &log);

    // Never answered (a stuck API server): start-up and shutdown go on regardless.
    n.api.answer_events(EventsAnswer::Stall);
    let log = n.log("stalled.log");
    let pid = n.start("", &log);
    Lab::wait_for("the second creation", Duration::from_secs(10), || {
        n.posts().len() == 2
    });
    assert!(n.api.events().is_empty());
    n.stop(pid, &log);
    let text = read(&log);
    assert!(
        !text.contains("rejected event") && !text.contains("Unable to write event"),
        "{text}"
    );
}

#[test]
fn json_logging_writes_upstreams_fields_on_every_line() {
    let Some(mut n) = Node::new("json-logs") else {
        return;
    };
    // A refusal gives an error line too.
    n.api.answer_events(EventsAnswer::Refuse(403));
    let start = now_ms();
    let log = n.log("json.log");
    let pid = n.start("--logging-format=json -v 2", &log);
    Lab::wait_for("the refusal in the log", Duration::from_secs(10), || {
        read(&log).contains("Server rejected event (will not retry!)")
    });
    n.stop(pid, &log);
    let end = now_ms();

    let text = read(&log);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| check_json_line(l, start, end))
        .collect();
    assert!(lines.len() > 5, "{text}");
    let find = |msg: &str| {
        lines
            .iter()
            .find(|l| l["msg"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} line in\n{text}"))
    };
    let starting = find("Starting kube-proxy-rs, watching the API server");
    assert_eq!(starting["v"], 0);
    assert_eq!(starting["node"], "node-a");
    assert_eq!(starting["mode"], "nftables");
    let synced = find("Synced nftables rules");
    assert_eq!(synced["v"], 0);
    assert_eq!(synced["full"], true, "typed values: {synced}");
    assert!(synced["bytes"].is_u64(), "{synced}");
    let refused = find("Server rejected event (will not retry!)");
    assert!(
        refused.get("v").is_none(),
        "an error line has no v: {refused}"
    );
    assert!(
        refused["err"].as_str().unwrap().contains("forbidden"),
        "{refused}"
    );
    assert!(
        refused["event"]
            .as_str()
            .unwrap()
            .starts_with("default/node-a."),
        "{refused}"
    );
    let shutdown = find("Shutting down");
    assert_eq!(shutdown["v"], 0);
}

/// One line as component-base's JSON logger writes it: an object whose first members are
/// `ts` (milliseconds since the epoch, a float), `caller` (`dir/file.rs:line`) and `msg`,
/// then `v` (info lines only), then scalar key/value pairs.
fn check_json_line(line: &str, start_ms: f64, end_ms: f64) -> Value {
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    assert!(line.starts_with("{\"ts\":"), "ts first: {line}");
    let at = |key: &str| line.find(&format!(",\"{key}\":"));
    assert!(
        at("caller").is_some() && at("caller") < at("msg"),
        "then caller, msg: {line}"
    );
    let ts = v["ts"].as_f64().unwrap();
    assert!(
        (start_ms - 1000.0..=end_ms + 1000.0).contains(&ts),
        "ts in milliseconds: {ts} not in {start_ms}..{end_ms}"
    );
    let caller = v["caller"].as_str().unwrap();
    let (file, number) = caller.rsplit_once(':').unwrap();
    assert!(
        file.ends_with(".rs") && number.parse::<u32>().is_ok() && file.matches('/').count() <= 1,
        "{caller}"
    );
    assert!(v["msg"].is_string(), "{line}");
    if let Some(level) = obj.get("v") {
        assert!(
            [0, 2, 4].contains(&level.as_u64().unwrap()),
            "v is the verbosity: {line}"
        );
        assert!(at("msg") < at("v"), "v after msg: {line}");
    }
    for (key, value) in obj {
        assert!(
            !value.is_object() && !value.is_array(),
            "{key} is a scalar: {line}"
        );
    }
    v
}

/// The whole document upstream's `kube-proxy --write-config-to FILE` writes on Linux with no
/// other flag; where each value comes from is in kpr-config's `tests/yaml.rs`
/// (`UPSTREAM_WRITTEN_NO_FLAGS`): v1alpha1 defaults, then `platformApplyDefaults` (`mode:
/// iptables`, `detectLocalMode: ClusterCIDR`), then the internal round trip (sync periods in
/// the mode's block only, `portRange: ""`).
const UPSTREAM_WRITTEN_NO_FLAGS: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: \"\"
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: \"\"
  qps: 5
clusterCIDR: \"\"
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: \"\"
  interfaceNamePrefix: \"\"
detectLocalMode: ClusterCIDR
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: \"\"
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: \"\"
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: \"0\"
    text:
      infoBufferSize: \"0\"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: iptables
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: -999
portRange: \"\"
showHiddenMetricsForVersion: \"\"
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: \"\"
  rootHnsEndpointName: \"\"
  sourceVip: \"\"
";

#[test]
fn write_config_to_without_config_writes_upstreams_document() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("written.yaml");
    let out = Command::new(BIN)
        .arg("--write-config-to")
        .arg(&file)
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        UPSTREAM_WRITTEN_NO_FLAGS
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().all(is_klog), "{stderr}");

    // The same in JSON logging: the one line upstream logs, `file` as its key.
    let start = now_ms();
    let out = Command::new(BIN)
        .arg("--write-config-to")
        .arg(&file)
        .arg("--logging-format=json")
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| check_json_line(l, start, now_ms()))
        .collect();
    let wrote = lines
        .iter()
        .find(|l| l["msg"] == "Wrote configuration")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(wrote["file"], file.display().to_string());
    assert_eq!(wrote["v"], 0);
    assert!(
        out.stdout.is_empty(),
        "stdout is the program's, not the log's"
    );
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("  format: json\n"), "{written}");
}
