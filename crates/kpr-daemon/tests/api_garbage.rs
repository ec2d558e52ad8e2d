//! The real binary against an API server that sends garbage (issue 15), end to end: while
//! faults are on, `/healthz` stays 200 and the nftables rules stay exactly as they were
//! (traffic keeps flowing to the last good endpoints); once the stream is sane again, the
//! change made meanwhile is programmed. Runs in network namespaces; without root it prints
//! SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_apiserver::{ApiServer, Fault, Kind};
use kpr_testkit::lab::{Lab, Reply};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A node namespace running the proxy against the test API server (served inside it), pods
/// answering with their name, and a client pod.
struct Node {
    lab: Lab,
    node: String,
    client: String,
    dir: tempfile::TempDir,
    log: PathBuf,
    api: ApiServer,
    _rt: tokio::runtime::Runtime,
}

impl Node {
    fn new() -> Option<Node> {
        let mut lab = Lab::new("api-garbage")?;
        let node = lab.netns("node");
        let outside = lab.netns("outside");
        let (up_node, up_outside) = lab.link(&node, &outside);
        lab.sh(&node, &format!("sysctl -qw net.ipv4.ip_forward=1 && ip addr add 203.0.113.1/24 dev {up_node} && ip addr add 192.168.0.2/32 dev {up_node} && ip route add default via 203.0.113.7"));
        lab.sh(
            &outside,
            &format!("ip addr add 203.0.113.7/24 dev {up_outside}"),
        );
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
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("proxy.log");
        let mut n = Node {
            lab,
            node,
            client: String::new(),
            dir,
            log,
            api,
            _rt: rt,
        };
        n.client = n.pod("client", "10.0.0.5");
        n.pod("pod1", "10.0.0.11");
        n.pod("pod2", "10.0.0.12");
        Some(n)
    }

    /// A pod namespace with `ip`, routed via the node, answering `<name> <peer>` on TCP 8080.
    fn pod(&mut self, name: &str, ip: &str) -> String {
        let ns = self.lab.netns(name);
        let (host, pod) = self.lab.link(&self.node, &ns);
        self.lab.sh(&ns, &format!("ip addr add {ip}/32 dev {pod} && ip route add 10.0.0.1 dev {pod} scope link && ip route add default via 10.0.0.1 dev {pod}"));
        self.lab.sh(
            &self.node,
            &format!(
                "ip addr add 10.0.0.1/32 dev {host} 2>/dev/null; ip route add {ip}/32 dev {host}"
            ),
        );
        let reply = format!("SYSTEM:'echo {name} $SOCAT_PEERADDR'");
        self.lab.spawn(
            &ns,
            &[
                "sh",
                "-c",
                &format!("socat -t5 TCP4-LISTEN:8080,fork,reuseaddr {reply}"),
            ],
        );
        Lab::wait_for("the pod's server", Duration::from_secs(5), || {
            self.lab.sh(&ns, "ss -ltn").contains(":8080")
        });
        ns
    }

    fn start_proxy(&mut self) {
        let cmd = format!(
            "exec {} --proxy-mode nftables --master {} --hostname-override node-a --cluster-cidr 10.0.0.0/8 --iptables-min-sync-period 0s -v 2 2>>{}",
            env!("CARGO_BIN_EXE_kube-proxy-rs"),
            self.api.url(),
            self.log.display()
        );
        let node = self.node.clone();
        self.lab.spawn(&node, &["sh", "-c", &cmd]);
        Lab::wait_for("the first sync", Duration::from_secs(15), || {
            self.logged("Synced nftables rules")
        });
    }

    fn logged(&self, what: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains(what)
    }

    /// Which pod answers a TCP request to `ip:80` from the client pod (`-` for none).
    fn who(&self, ip: &str) -> String {
        match self.lab.tcp(&self.client, ip, 80) {
            Reply::Ok(line) => line.split_whitespace().next().unwrap_or("").to_owned(),
            _ => "-".into(),
        }
    }

    /// Our table, without counter values.
    fn table(&self) -> String {
        self.lab
            .sh(&self.node, "nft -s list table ip kube-proxy-rs")
    }

    fn http_get(&self, port: u16, path: &str) -> String {
        self.lab.sh(
            &self.node,
            &format!("(printf 'GET {path} HTTP/1.1\\r\\nHost: node\\r\\nConnection: close\\r\\n\\r\\n'; sleep 0.3) | socat -t2 - TCP:127.0.0.1:{port} || true"),
        )
    }

    /// `/healthz` answers 200 and says healthy.
    fn assert_healthy(&self, when: &str) {
        let r = self.http_get(10256, "/healthz");
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("\"healthy\":true"),
            "{when}: /healthz says\n{r}"
        );
    }

    /// The proxy's (resident, peak resident) memory in MiB, found by its health port.
    fn proxy_memory(&self) -> (u64, u64) {
        let ss = self.lab.sh(&self.node, "ss -ltnpH 'sport = :10256'");
        let pid = ss
            .split("pid=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_else(|| panic!("no pid in {ss}"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_default()
                >> 10
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// For `window`: `/healthz` stays 200, the table stays `table` (when given) and `ip`
    /// keeps answering from `pod`.
    fn holds(&self, window: Duration, what: &str, table: Option<&str>, ip: &str, pod: &str) {
        let end = Instant::now() + window;
        while Instant::now() < end {
            self.assert_healthy(what);
            if let Some(t) = table {
                assert_eq!(self.table(), t, "{what}: the rules changed");
            }
            assert_eq!(
                self.who(ip),
                pod,
                "{what}: {ip} answers from the last good endpoint"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until `ip` answers from `pod`.
    fn programmed(&self, what: &str, ip: &str, pod: &str) -> Duration {
        Lab::wait_for(what, Duration::from_secs(60), || self.who(ip) == pod)
    }
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(svc: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "node-a", "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

#[test]
fn garbage_from_the_api_server_keeps_the_rules_and_health_and_the_proxy_recovers() {
    let Some(mut n) = Node::new() else {
        return;
    };
    let window = Duration::from_secs(4);
    n.api.apply(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a"},
        "spec": {"podCIDRs": ["10.0.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}}));
    n.api.apply(service("web", "172.30.0.10"));
    n.api.apply(slice("web", &["10.0.0.11"]));
    n.start_proxy();
    assert_eq!(n.who("172.30.0.10"), "pod1");
    n.assert_healthy("at start");
    let (_, peak_start) = n.proxy_memory();

    // 1. A corrupt watch line hides a scale change, and every relist is cut short: the
    // source has nothing whole to act on. The rules do not move.
    let table = n.table();
    n.api.inject(Fault::CorruptWatchEvent(Kind::EndpointSlice));
    n.api.inject(Fault::TruncateLists(Kind::EndpointSlice));
    n.api.apply(slice("web", &["10.0.0.12"]));
    n.holds(
        window,
        "corrupt event, truncated lists",
        Some(&table),
        "172.30.0.10",
        "pod1",
    );
    n.api.clear(Fault::TruncateLists(Kind::EndpointSlice));
    let took = n.programmed(
        "the hidden change, after a whole list",
        "172.30.0.10",
        "pod2",
    );
    eprintln!("corrupt event + truncated lists: change programmed {took:?} after the fault");

    // 2. ConfigMaps in place of EndpointSlices, in the watch and in the lists.
    let table = n.table();
    n.api.inject(Fault::WrongKind(Kind::EndpointSlice));
    n.api.apply(slice("web", &["10.0.0.11"]));
    n.holds(
        window,
        "objects of the wrong kind",
        Some(&table),
        "172.30.0.10",
        "pod2",
    );
    n.api.clear(Fault::WrongKind(Kind::EndpointSlice));
    let took = n.programmed("the change, after the right kind", "172.30.0.10", "pod1");
    eprintln!("wrong kind: change programmed {took:?} after the fault");

    // 3. An endless watch line for Services (cut at 16 MiB; memory stays bounded) while the
    // EndpointSlice watch goes silent. The new Service arrives through the relist; its
    // slice, only through a working watch.
    let (_, peak_before) = n.proxy_memory();
    n.api.inject(Fault::SilentWatch(Kind::EndpointSlice));
    n.api.inject(Fault::EndlessLine(Kind::Service));
    n.api.apply(service("late", "172.30.0.12"));
    n.api.apply(slice("late", &["10.0.0.12"]));
    Lab::wait_for(
        "the new Service, from the relist",
        Duration::from_secs(30),
        || n.table().contains("172.30.0.12"),
    );
    n.holds(window, "silent slices watch", None, "172.30.0.10", "pod1");
    assert_eq!(
        n.who("172.30.0.12"),
        "-",
        "its slice is held back by the silent watch"
    );
    let (_, peak_after) = n.proxy_memory();
    // A silent watch stays stuck (a dead connection) until the proxy gives up on it after its
    // timeout (290 s + 2 s); a load balancer's reset ends it sooner.
    n.api.clear(Fault::SilentWatch(Kind::EndpointSlice));
    n.api.drop_watches();
    let took = n.programmed(
        "the late slice, after the watch is cut",
        "172.30.0.12",
        "pod2",
    );
    eprintln!(
        "endless line + silent watch: slice programmed {took:?} after the cut; proxy peak RSS {peak_before} MiB before the endless line, {peak_after} MiB after (at start {peak_start} MiB)"
    );
    assert!(
        peak_after < peak_before + 100,
        "an endless line costs at most its limit: {peak_before} -> {peak_after} MiB"
    );

    // 4. A flood of changes to other slices: still healthy, still serving; the last write
    // wins.
    let flood: Vec<Value> = (0..200)
        .map(|i| {
            slice(
                &format!("noise{}", i % 20),
                &[if i % 2 == 0 { "10.0.0.11" } else { "10.0.0.12" }],
            )
        })
        .collect();
    let flooding = n.api.flood(flood);
    n.holds(window, "a flood of changes", None, "172.30.0.10", "pod1");
    let written = flooding.stop();
    n.api.apply(slice("web", &["10.0.0.12"]));
    let took = n.programmed("the change after the flood", "172.30.0.10", "pod2");
    eprintln!("flood: {written} changes in {window:?}; the change after it programmed in {took:?}");
    n.assert_healthy("at the end");

    let metrics = n.http_get(10249, "/metrics");
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("kpr_watch_failures_total{resource=\"endpointslices\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_default();
    assert!(
        failures >= 2,
        "the failures are counted: {failures}\n{metrics}"
    );
    assert!(
        n.logged("Watch failed") && n.logged("Watch restored"),
        "outages are logged"
    );
    let _ = &n.dir;
}
