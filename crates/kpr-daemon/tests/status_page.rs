//! The status page in a real browser (issue 14): the real binary runs in a node namespace with
//! a few Services from a manifest directory (one endpoint terminating, one endpoint with a node
//! name full of HTML), its endpoints change a few times (so the chart has syncs and
//! network-programming latencies), and headless Chromium, run inside the same namespace,
//! loads `/`, a Service's page and the explain form from 127.0.0.1:10249. The DOM must show
//! the Services, endpoints and their conditions, the explain verdict, and no markup from the
//! cluster's strings. A screenshot of `/` is written to docs/images/status-page.png when that
//! file is missing or `KPR_UPDATE_SCREENSHOT=1` (so a test run does not rewrite a committed
//! image each time).
//!
//! Network safety: the proxy and the browser run only inside the namespaces the test creates,
//! and the browser loads only http://127.0.0.1 pages there, with every flag that keeps it from
//! calling home. Without root or Chromium (scripts/test.sh installs it) the test prints SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_testkit::lab::Lab;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\nspec: {podCIDRs: [10.0.0.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";

const SERVICES_YAML: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 172.30.0.10
  clusterIPs: [172.30.0.10]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 172.30.0.20
  clusterIPs: [172.30.0.20]
  ports:
  - {port: 5432, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: shop}
spec:
  clusterIP: 172.30.0.30
  clusterIPs: [172.30.0.30]
  internalTrafficPolicy: Local
  ports:
  - {name: redis, port: 6379, protocol: TCP}
"#;

/// The EndpointSlices: `web` has a ready endpoint here, one on node-b, one terminating (and
/// `extra` more, to change between syncs); `db`'s endpoint names an odd node; `cache` has
/// none on this node (ITP=Local: DROP).
fn slices_yaml(extra: usize, trigger: &str) -> String {
    let mut web = String::new();
    for i in 0..extra {
        web.push_str(&format!(
            "- {{addresses: [\"10.0.1.{}\"], nodeName: node-b, zone: zone-b, conditions: {{ready: true}}}}\n",
            i + 1
        ));
    }
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: "{trigger}"}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
- {{addresses: ["10.0.0.11"], nodeName: node-a, zone: zone-a, conditions: {{ready: true}}}}
- {{addresses: ["10.0.0.12"], nodeName: node-b, zone: zone-b, conditions: {{ready: true}}}}
- {{addresses: ["10.0.0.13"], nodeName: node-a, zone: zone-a, conditions: {{ready: false, serving: true, terminating: true}}}}
{web}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: shop
  labels: {{kubernetes.io/service-name: db}}
addressType: IPv4
ports:
- {{name: "", port: 5432, protocol: TCP}}
endpoints:
- {{addresses: ["10.0.0.21"], nodeName: "x\"><script>alert(1)</script>", conditions: {{ready: true}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cache-1
  namespace: shop
  labels: {{kubernetes.io/service-name: cache}}
addressType: IPv4
ports:
- {{name: redis, port: 6379, protocol: TCP}}
endpoints:
- {{addresses: ["10.0.0.31"], nodeName: node-b, conditions: {{ready: true}}}}
"#
    )
}

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

/// Chromium, installed with apt when missing (Debian's package is `chromium`).
fn chromium() -> Option<String> {
    if let Some(p) = which("chromium") {
        return Some(p);
    }
    eprintln!("chromium not found: trying apt-get install chromium");
    let _ = Command::new("sh")
        .args([
            "-c",
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null",
        ])
        .status();
    which("chromium")
}

/// The proxy in a node namespace, and where its files are.
struct Node {
    lab: Lab,
    ns: String,
    dir: tempfile::TempDir,
    log: PathBuf,
    chromium: String,
}

impl Node {
    /// An HTTP GET to 127.0.0.1:10249 inside the node namespace: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let out = self.lab.sh(
            &self.ns,
            &format!("(printf 'GET {path} HTTP/1.1\\r\\nHost: node\\r\\nConnection: close\\r\\n\\r\\n'; sleep 0.5) | socat -t2 - TCP:127.0.0.1:10249 || true"),
        );
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Syncs recorded by `/debug/syncs` (at most its history).
    fn syncs(&self) -> usize {
        self.get("/debug/syncs").1.matches("\"time\"").count()
    }

    /// Headless Chromium inside the node namespace, with a fresh profile; its stdout.
    fn chromium(&self, args: &str, url: &str) -> String {
        assert!(url.starts_with("http://127.0.0.1:"), "local pages only");
        let profile = tempfile::tempdir().unwrap();
        let err = self.dir.path().join("chromium.log");
        let out = self.lab.try_sh(
            &self.ns,
            &format!(
                "HOME={home} timeout 120 {chromium} --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking --disable-component-update --disable-sync --disable-default-apps --disable-extensions --disable-dev-shm-usage --disable-breakpad --disable-crash-reporter --user-data-dir={home} {args} '{url}' 2>>{err}",
                home = profile.path().display(),
                chromium = self.chromium,
                err = err.display()
            ),
        );
        assert!(
            out.status.success(),
            "chromium {args} {url} failed: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dom(&self, path: &str) -> String {
        let dom = self.chromium("--dump-dom", &format!("http://127.0.0.1:10249{path}"));
        assert!(dom.contains("kube-proxy-rs"), "no page at {path}: {dom}");
        dom
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- proxy log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_status_page_in_a_browser() {
    if !is_root() {
        eprintln!(
            "SKIPPED: the_status_page_in_a_browser needs root (it creates network namespaces)"
        );
        return;
    }
    let Some(chromium) = chromium() else {
        eprintln!(
            "SKIPPED: the_status_page_in_a_browser needs chromium (apt-get install chromium; scripts/test.sh does)"
        );
        return;
    };
    let Some(mut lab) = Lab::new("status-page") else {
        return;
    };
    let ns = lab.netns("node");
    let peer = lab.netns("peer");
    let (up, _) = lab.link(&ns, &peer);
    lab.sh(
        &ns,
        &format!("ip addr add 192.168.0.2/24 dev {up} && ip addr add 203.0.113.1/24 dev {up}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxy.log");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let now = || kpr_ops::time::rfc3339_nano(SystemTime::now());
    std::fs::write(manifests.join("node.yaml"), NODE_YAML).unwrap();
    std::fs::write(manifests.join("services.yaml"), SERVICES_YAML).unwrap();
    std::fs::write(manifests.join("slices.yaml"), slices_yaml(0, &now())).unwrap();
    let cmd = format!(
        "exec {} --proxy-mode nftables --manifests {} --hostname-override node-a --cluster-cidr 10.0.0.0/8 2>>{}",
        env!("CARGO_BIN_EXE_kube-proxy-rs"),
        manifests.display(),
        log.display()
    );
    lab.spawn(&ns, &["sh", "-c", &cmd]);
    let node = Node {
        lab,
        ns,
        dir,
        log,
        chromium,
    };
    Lab::wait_for("the first sync", Duration::from_secs(20), || {
        node.syncs() >= 1
    });

    // A few endpoint changes, each a sync with a programming latency for the chart.
    for extra in 1..=5 {
        let before = node.syncs();
        std::fs::write(manifests.join("slices.yaml"), slices_yaml(extra, &now())).unwrap();
        Lab::wait_for("a sync after the change", Duration::from_secs(10), || {
            node.syncs() > before
        });
    }
    std::fs::write(manifests.join("slices.yaml"), slices_yaml(0, &now())).unwrap();
    let before = node.syncs();
    Lab::wait_for("the last sync", Duration::from_secs(10), || {
        node.syncs() > before
    });

    // Plain HTTP first: status codes and sizes.
    let (code, index) = node.get("/");
    assert_eq!(code, 200, "{index}");
    eprintln!("/: {} bytes of HTML", index.len());
    let (code, body) = node.get("/explain?from=10.0.0.5&to=nonsense&proto=tcp");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("to: &quot;nonsense&quot; is not IP:port"),
        "{body}"
    );
    assert_eq!(node.get("/service").0, 400);
    assert_eq!(node.get("/service?name=default%2Fnope").0, 404);
    assert_eq!(node.get("/?offset=x").0, 400);

    // The table, searched: the web Service's ports with every endpoint and its condition.
    let dom = node.dom("/?q=default/web");
    for must in [
        "<p class=\"big healthy\">healthy</p>",
        "IPv4 last update",
        "<svg",
        "Network-programming latency",
        "<circle",
        "Service ports 1–2 of 2 matching “default/web”.",
        ">default/web</a>",
        ":http</span>",
        ":dns</span>",
        "172.30.0.10:80",
        "NodePort 30080",
        "10.0.0.11:8080",
        "10.0.0.12:8080",
        "10.0.0.13:8080 <em>serving-terminating</em>",
        "10.0.0.11:5353",
    ] {
        assert!(
            dom.contains(must),
            "{must:?} missing from /?q=default/web:\n{dom}"
        );
    }
    assert!(!dom.contains("shop/db"), "filtered out");
    // Unfiltered: every Service, and what ITP=Local without a local endpoint does.
    let dom = node.dom("/");
    for must in [
        ">shop/db</a>",
        "10.0.0.21:5432",
        ">shop/cache</a>",
        "internal: DROP",
        "Service ports 1–4 of 4.",
    ] {
        assert!(dom.contains(must), "{must:?} missing from /:\n{dom}");
    }

    // A Service's page: every port, frontends, endpoints with their conditions and places.
    let dom = node.dom("/service?name=default%2Fweb");
    for must in [
        "default/web:http",
        "default/web:dns",
        "NodePort",
        "<td class=\"mono\">10.0.0.13:8080</td><td><span class=\"ep term\">serving-terminating</span></td><td class=\"no\">no</td><td class=\"yes\">yes</td><td class=\"yes\">yes</td><td>node-a</td><td>zone-a</td><td class=\"yes\">yes</td>",
        "<td class=\"mono\">10.0.0.12:8080</td><td><span class=\"ep ready\">ready</span></td>",
        "node-b",
        "zone-b",
        "the Cluster set",
        "Last change",
    ] {
        assert!(
            dom.contains(must),
            "{must:?} missing from the web page:\n{dom}"
        );
    }
    // The odd node name is text, never markup.
    let dom = node.dom("/service?name=shop%2Fdb");
    assert!(
        dom.contains("<td>x\"&gt;&lt;script&gt;alert(1)&lt;/script&gt;</td>"),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");

    // The explain form's answer for one packet.
    let dom = node.dom("/explain?from=10.0.0.5&to=172.30.0.10:80&proto=tcp");
    for must in [
        "<span class=\"verdict v-dnat\">DNAT</span>",
        "10.0.0.11:8080",
        "10.0.0.12:8080",
        "50.0%",
        "value=\"172.30.0.10:80\"",
        "<pre>Packet 10.0.0.5 -&gt; 172.30.0.10:80/TCP",
    ] {
        assert!(dom.contains(must), "{must:?} missing from /explain:\n{dom}");
    }
    let dom = node.dom("/explain?from=10.0.0.5&to=172.30.0.30:6379&proto=tcp");
    assert!(
        dom.contains("<span class=\"verdict v-drop\">DROP</span>"),
        "{dom}"
    );
    let dom = node.dom("/explain?from=10.0.0.5&to=nonsense&proto=tcp");
    assert!(dom.contains("class=\"error\""), "{dom}");

    // The screenshot.
    let shot = node.dir.path().join("status-page.png");
    node.chromium(
        &format!(
            "--hide-scrollbars --window-size=1280,900 --screenshot={}",
            shot.display()
        ),
        "http://127.0.0.1:10249/",
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    eprintln!("screenshot: {} bytes", png.len());
    assert!(png.len() < 300 * 1024, "{} bytes", png.len());
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/images/status-page.png");
    if !committed.exists() || std::env::var_os("KPR_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(committed.parent().unwrap()).unwrap();
        std::fs::write(&committed, &png).unwrap();
        eprintln!("wrote {}", committed.display());
    }
    // For a look at the other pages: KPR_SCREENSHOT_DIR=DIR saves them there.
    if let Some(dir) = std::env::var_os("KPR_SCREENSHOT_DIR") {
        for (name, path) in [
            ("service", "/service?name=default%2Fweb"),
            (
                "explain",
                "/explain?from=10.0.0.5&to=172.30.0.10:80&proto=tcp",
            ),
            (
                "explain-error",
                "/explain?from=10.0.0.5&to=nonsense&proto=tcp",
            ),
        ] {
            let file = Path::new(&dir).join(format!("{name}.png"));
            node.chromium(
                &format!(
                    "--hide-scrollbars --window-size=1280,900 --screenshot={}",
                    file.display()
                ),
                &format!("http://127.0.0.1:10249{path}"),
            );
        }
    }
    let start = Instant::now();
    drop(node);
    eprintln!("cleaned up in {:?}", start.elapsed());
}
