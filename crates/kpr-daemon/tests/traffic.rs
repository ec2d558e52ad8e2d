//! Real traffic through the real binary (§4, §5, issue 3's and issue 6's "must show"): a node
//! namespace runs `kube-proxy-rs --proxy-mode MODE --manifests DIR`, pod namespaces run socat
//! servers, an outside client namespace sends real TCP and UDP to Service addresses. One suite,
//! run in every mode: each scenario is a function of the [`Mode`], and `in_every_mode!` makes
//! a test of it per mode (`nftables::…`, `iptables::…`, with iptables-nft; `legacy::…` runs the
//! basic scenarios on iptables-legacy, picked by the proxy's own detection). Every namespace
//! is created by the test and removed afterwards (kpr_testkit::lab); without root the tests
//! print SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_testkit::lab::{Lab, Reply};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The data plane a test runs the proxy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nftables,
    /// iptables mode on iptables-nft.
    Iptables,
    /// iptables mode on iptables-legacy: kubelet's canary chain in legacy's mangle table makes
    /// the proxy pick legacy, as upstream's iptables-wrapper does.
    Legacy,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables",
            Mode::Iptables | Mode::Legacy => "iptables",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Mode::Nftables => "nft",
            Mode::Iptables => "ipt",
            Mode::Legacy => "leg",
        }
    }

    /// The iptables tool of this mode (`iptables-nft-save`, `ip6tables-legacy`, ...).
    fn tool(self, v6: bool, what: &str) -> String {
        let base = if v6 { "ip6tables" } else { "iptables" };
        let variant = if self == Mode::Legacy {
            "legacy"
        } else {
            "nft"
        };
        format!("{base}-{variant}{what}")
    }
}

/// Makes one test per mode from scenario functions taking a [`Mode`].
macro_rules! in_every_mode {
    ($($name:ident),* $(,)?) => {
        mod nftables {
            $( #[test] fn $name() { super::$name(super::Mode::Nftables) } )*
        }
        mod iptables {
            $( #[test] fn $name() { super::$name(super::Mode::Iptables) } )*
        }
    };
}

in_every_mode!(
    t4_1_1_cluster_ip_spreads_tcp_and_udp_over_all_endpoints,
    t4_8_3_unallocated_service_cidr_addresses_are_dropped_in_nftables_mode_only,
    t4_5_1_node_port_and_lb_ip_from_outside_and_t4_8_1_no_endpoints_refuse,
    t4_2_etp_local_preserves_the_client_ip_and_drops_without_local_endpoints,
    t4_3_1_itp_local_t5_4_1_affinity_and_t4_9_1_hairpin,
    ipv6_cluster_ip,
    manifest_edits_steer_new_connections_and_established_ones_survive,
    a_deleted_or_flushed_table_is_restored_within_a_second,
    rules_survive_a_restart_and_established_connections_keep_working,
    api_server_source_end_to_end,
    odd_objects_from_the_api_server_are_programmed_and_never_blind_the_proxy,
    t7_1_health_endpoints,
    t7_2_health_check_node_port,
    cleanup_removes_every_rule_of_ours_and_upstreams,
    t6_2_stale_udp_flows_are_deleted_when_their_endpoint_goes,
    verify_names_drift_explain_sees_it_and_the_drift_check_repairs_it,
    conntrack_command_shows_each_flows_endpoint_and_flags_stale_ones,
);

/// The basic scenarios on iptables-legacy.
mod legacy {
    #[test]
    fn t4_1_1_cluster_ip_spreads_tcp_and_udp_over_all_endpoints() {
        super::t4_1_1_cluster_ip_spreads_tcp_and_udp_over_all_endpoints(super::Mode::Legacy)
    }
    #[test]
    fn t4_5_1_node_port_and_lb_ip_from_outside_and_t4_8_1_no_endpoints_refuse() {
        super::t4_5_1_node_port_and_lb_ip_from_outside_and_t4_8_1_no_endpoints_refuse(
            super::Mode::Legacy,
        )
    }
    #[test]
    fn a_flushed_table_is_restored_within_a_second() {
        super::a_deleted_or_flushed_table_is_restored_within_a_second(super::Mode::Legacy)
    }
    #[test]
    fn verify_names_drift_explain_sees_it_and_the_drift_check_repairs_it() {
        super::verify_names_drift_explain_sees_it_and_the_drift_check_repairs_it(
            super::Mode::Legacy,
        )
    }
}

/// A node with pods and an outside client.
struct Cluster {
    mode: Mode,
    /// `--nodeport-addresses` (empty: unset, every local address).
    node_port_addresses: &'static str,
    lab: Lab,
    node: String,
    client: String,
    pods: BTreeMap<String, String>,
    dir: tempfile::TempDir,
    log: PathBuf,
    _serial: std::sync::MutexGuard<'static, ()>,
}

const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: a}}\nspec: {podCIDRs: [10.0.0.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";

/// Traffic tests run one at a time: each starts many processes, and a 2-core machine running
/// them all at once turns connect timeouts into flakes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cluster {
    fn new(test: &str, mode: Mode) -> Option<Cluster> {
        let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut lab = Lab::new(&format!("{test}-{}", mode.short()))?;
        let node = lab.netns("node");
        let client = lab.netns("client");
        let (up_node, up_client) = lab.link(&node, &client);
        lab.sh(&node, &format!("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && ip addr add 203.0.113.1/24 dev {up_node} && ip addr add 192.168.0.2/32 dev {up_node} && ip route add default via 203.0.113.7"));
        lab.sh(&client, &format!("ip addr add 203.0.113.7/24 dev {up_client} && for n in 192.168.0.0/24 1.2.3.0/24 5.6.7.0/24 192.168.99.0/24; do ip route add $n via 203.0.113.1; done"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.yaml"), NODE_YAML).unwrap();
        let log = dir.path().join("proxy.log");
        if mode == Mode::Legacy {
            // What kubelet creates where it runs: the proxy follows it to legacy.
            lab.sh(&node, "iptables-legacy -t mangle -N KUBE-KUBELET-CANARY");
        }
        Some(Cluster {
            mode,
            node_port_addresses: "primary",
            lab,
            node,
            client,
            pods: BTreeMap::new(),
            dir,
            log,
            _serial: guard,
        })
    }

    /// A pod namespace with `ip` (and an IPv6 address when `ip6` is given) routed via the node;
    /// it serves TCP 8080 and UDP 5353 (replying `<name> <peer address>`) and echoes on 9000.
    fn pod(&mut self, name: &str, ip: &str, ip6: Option<&str>) -> String {
        let ns = self.lab.netns(name);
        let (host, pod) = self.lab.link(&self.node, &ns);
        self.lab.sh(&ns, &format!("ip addr add {ip}/32 dev {pod} && ip route add 10.0.0.1 dev {pod} scope link && ip route add default via 10.0.0.1 dev {pod}"));
        self.lab.sh(
            &self.node,
            &format!(
                "ip addr add 10.0.0.1/32 dev {host} 2>/dev/null; ip route add {ip}/32 dev {host}"
            ),
        );
        if let Some(ip6) = ip6 {
            self.lab.sh(&ns, &format!("ip -6 addr add {ip6}/128 dev {pod} nodad && ip -6 route add fd00:10::1 dev {pod} && ip -6 route add default via fd00:10::1 dev {pod}"));
            self.lab.sh(&self.node, &format!("ip -6 addr add fd00:10::1/128 dev {host} nodad; ip -6 route add {ip6}/128 dev {host}"));
        }
        let reply = format!("SYSTEM:'echo {name} $SOCAT_PEERADDR'");
        self.lab.spawn(
            &ns,
            &[
                "sh",
                "-c",
                &format!("socat -t5 TCP4-LISTEN:8080,fork,reuseaddr {reply}"),
            ],
        );
        self.lab.spawn(
            &ns,
            &[
                "sh",
                "-c",
                &format!("socat -t5 UDP4-RECVFROM:5353,fork {reply}"),
            ],
        );
        if ip6.is_some() {
            self.lab.spawn(
                &ns,
                &[
                    "sh",
                    "-c",
                    &format!("socat -t5 TCP6-LISTEN:8080,ipv6only=1,fork,reuseaddr {reply}"),
                ],
            );
        }
        self.lab.spawn(
            &ns,
            &["socat", "TCP-LISTEN:9000,fork,reuseaddr", "EXEC:cat"],
        );
        // UDP too: a datagram sent before the UDP server is bound earns an ICMP port
        // unreachable, which socat reports as a refused flow.
        Lab::wait_for("pod servers", Duration::from_secs(5), || {
            let tcp = self.lab.sh(&ns, "ss -ltn");
            tcp.contains(":8080")
                && tcp.contains(":9000")
                && self.lab.sh(&ns, "ss -lun").contains(":5353")
        });
        self.pods.insert(name.into(), ns.clone());
        ns
    }

    fn manifest(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.path().join(file), yaml).unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.path().join(file)).unwrap();
    }

    /// Starts the proxy in the node namespace and waits for its first sync.
    /// Returns the proxy's process id.
    fn start_proxy(&mut self) -> u32 {
        let source = format!("--manifests {}", self.dir.path().display());
        self.start_proxy_with(&source)
    }

    /// Starts the proxy with `source` (`--manifests DIR` or `--master URL`).
    fn start_proxy_with(&mut self, source: &str) -> u32 {
        let cmd = format!(
            "exec {} --proxy-mode {} {source} --hostname-override node-a --cluster-cidr 10.0.0.0/8 {} --iptables-min-sync-period 0s -v 2 2>>{}",
            env!("CARGO_BIN_EXE_kube-proxy-rs"),
            self.mode.flag(),
            match self.node_port_addresses {
                "" => String::new(),
                a => format!("--nodeport-addresses {a}"),
            },
            self.log.display()
        );
        let node = self.node.clone();
        let before = self.syncs();
        let pid = self.lab.spawn(&node, &["sh", "-c", &cmd]).id();
        Lab::wait_for("the first sync", Duration::from_secs(10), || {
            self.syncs() > before
        });
        if self.mode != Mode::Nftables {
            let variant = if self.mode == Mode::Legacy {
                "legacy"
            } else {
                "nft"
            };
            assert!(
                self.logged(&format!("Using iptables-{variant}")),
                "the proxy picked the host's iptables back end"
            );
        }
        pid
    }

    /// Sends SIGTERM to the proxy and waits until it has logged its shutdown.
    fn stop_proxy(&self, pid: u32) {
        let stops = || {
            std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .matches("Shutting down")
                .count()
        };
        let before = stops();
        self.lab.sh(&self.node, &format!("kill -TERM {pid}"));
        Lab::wait_for("the proxy to stop", Duration::from_secs(5), || {
            stops() > before
        });
    }

    fn logged(&self, what: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains(what)
    }

    fn syncs(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(&format!("Synced {} rules", self.mode.flag()))
            .count()
    }

    /// Writes a manifest and waits until the proxy has synced it.
    fn apply(&self, file: &str, yaml: &str) {
        let before = self.syncs();
        self.manifest(file, yaml);
        Lab::wait_for("a sync after the change", Duration::from_secs(5), || {
            self.syncs() > before
        });
    }

    /// Opens a long-lived TCP connection from `client` to an echo server (port 9000 behind
    /// `dst`), sends a first line and waits for its echo.
    fn open_echo(&mut self, client: &str, dst: &str) -> Echo {
        let d = self.dir.path();
        let (fifo, out, go) = (d.join("echo-in"), d.join("echo-out"), d.join("echo-go"));
        self.lab.sh(client, &format!("mkfifo {}", fifo.display()));
        let reader = format!(
            "exec socat -T60 - TCP:{dst}:9000 < {} > {}",
            fifo.display(),
            out.display()
        );
        self.lab.spawn(client, &["sh", "-c", &reader]);
        let writer = format!(
            "exec 3>{} ; echo one >&3 ; while [ ! -e {} ]; do sleep 0.1; done ; echo two >&3 ; sleep 5",
            fifo.display(),
            go.display()
        );
        self.lab.spawn(client, &["sh", "-c", &writer]);
        let echo = Echo { out, go };
        echo.wait_for("one");
        echo
    }

    fn nft(&self, args: &str) -> String {
        self.lab.sh(&self.node, &format!("nft {args}"))
    }

    /// Our rules in the node namespace: the nftables ruleset, or `iptables-save` of both
    /// families.
    fn rules(&self) -> String {
        match self.mode {
            Mode::Nftables => self.nft("list ruleset"),
            mode => self.lab.sh(
                &self.node,
                &format!(
                    "{} && {}",
                    mode.tool(false, "-save"),
                    mode.tool(true, "-save")
                ),
            ),
        }
    }

    /// Whether a Service frontend on `ip` is programmed.
    fn programmed(&self, ip: &str) -> bool {
        match self.mode {
            Mode::Nftables => self
                .lab
                .try_sh(&self.node, "nft list map ip kube-proxy-rs service-ips")
                .stdout
                .windows(ip.len())
                .any(|w| w == ip.as_bytes()),
            _ => self.rules().contains(&format!("-d {ip}/32")),
        }
    }
}

/// A long-lived connection through a Service (see `Cluster::open_echo`).
struct Echo {
    out: PathBuf,
    go: PathBuf,
}

impl Echo {
    fn wait_for(&self, line: &str) {
        Lab::wait_for(
            &format!("{line:?} echoed on the long-lived connection"),
            Duration::from_secs(5),
            || {
                std::fs::read_to_string(&self.out)
                    .unwrap_or_default()
                    .contains(line)
            },
        );
    }

    /// Sends the second line and waits for its echo: the connection still works.
    fn still_works(&self) {
        std::fs::write(&self.go, "").unwrap();
        self.wait_for("two");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- proxy log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            eprintln!(
                "--- node ruleset ---\n{}",
                String::from_utf8_lossy(
                    &self
                        .lab
                        .try_sh(&self.node, "nft list ruleset; iptables-legacy-save")
                        .stdout
                )
            );
        }
    }
}

fn service(name: &str, ip: &str, extra: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n{extra}  ports: {ports}\n"
    )
}

fn slice(svc: &str, family: &str, eps: &[(&str, &str)], ports: &str) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: {family}\nports: {ports}\nendpoints:\n"
    );
    for (ip, node) in eps {
        s.push_str(&format!(
            "  - {{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}}}\n"
        ));
    }
    if eps.is_empty() {
        s.push_str("  []\n");
        s = s.replace("endpoints:\n  []\n", "endpoints: []\n");
    }
    s
}

/// A Service port pair: http (answers with the pod name) and echo (a long-lived connection).
const ECHO_PORTS: &str =
    "[{name: http, port: 80, protocol: TCP}, {name: echo, port: 9000, protocol: TCP}]";
const ECHO_EP_PORTS: &str =
    "[{name: http, port: 8080, protocol: TCP}, {name: echo, port: 9000, protocol: TCP}]";
const WEB_PORTS: &str =
    "[{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
const WEB_EP_PORTS: &str =
    "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]";

fn who(r: &Reply) -> String {
    match r {
        Reply::Ok(line) => line.split_whitespace().next().unwrap_or("").to_owned(),
        other => panic!("no reply: {other:?}"),
    }
}

fn peer(r: &Reply) -> String {
    match r {
        Reply::Ok(line) => line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .trim_start_matches("[::ffff:")
            .trim_end_matches(']')
            .to_owned(),
        other => panic!("no reply: {other:?}"),
    }
}

/// T4.1.1: new TCP connections and UDP flows to a ClusterIP spread over every ready endpoint.
fn t4_1_1_cluster_ip_spreads_tcp_and_udp_over_all_endpoints(mode: Mode) {
    let Some(mut c) = Cluster::new("t4_1_1", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    for (n, ip) in [
        ("pod1", "10.0.0.11"),
        ("pod2", "10.0.0.12"),
        ("pod3", "10.0.1.13"),
    ] {
        c.pod(n, ip, None);
    }
    c.manifest("svc.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest(
        "eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[
                ("10.0.0.11", "node-a"),
                ("10.0.0.12", "node-a"),
                ("10.0.1.13", "node-b"),
            ],
            WEB_EP_PORTS,
        ),
    );
    c.start_proxy();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..300 {
        let r = c.lab.tcp(&client, "172.30.0.10", 80);
        assert!(
            matches!(r, Reply::Ok(_)),
            "connection {i}: {r:?} after {counts:?}"
        );
        *counts.entry(who(&r)).or_default() += 1;
    }
    eprintln!("300 TCP connections: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|n| *n >= 50),
        "unfair spread: {counts:?}"
    );
    let mut udp: BTreeMap<String, usize> = BTreeMap::new();
    for line in c.lab.udp_burst(&client, "172.30.0.10", 53, 60) {
        *udp.entry(line.split_whitespace().next().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    eprintln!("60 UDP flows: {udp:?}");
    assert_eq!(udp.len(), 3, "{udp:?}");
    // Pod to pod: the client pod keeps its own address (no masquerade).
    assert_eq!(peer(&c.lab.tcp(&client, "172.30.0.10", 80)), "10.0.0.5");
}

const SERVICE_CIDR_YAML: &str = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [172.30.0.0/16]}\n";

/// T4.8.3: with a ServiceCIDR, a new connection to one of its addresses that no Service uses
/// is dropped on the node in nftables mode (as upstream), where it was routed out of the
/// node's default route before; the iptables mode routes it, as upstream. Adding and removing
/// the ServiceCIDR takes effect at the next sync. The node's default route leads to the
/// outside namespace, which owns 172.30.9.9 and 172.31.0.9 and answers on them.
fn t4_8_3_unallocated_service_cidr_addresses_are_dropped_in_nftables_mode_only(mode: Mode) {
    let Some(mut c) = Cluster::new("t4_8_3", mode) else {
        return;
    };
    let client_pod = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    let outside = c.client.clone();
    c.lab.sh(&outside, "ip addr add 172.30.9.9/32 dev lo && ip addr add 172.31.0.9/32 dev lo && ip route add 10.0.0.0/8 via 203.0.113.1");
    c.lab.spawn(
        &outside,
        &[
            "sh",
            "-c",
            "socat -t5 TCP4-LISTEN:80,fork,reuseaddr SYSTEM:'echo outside $SOCAT_PEERADDR'",
        ],
    );
    Lab::wait_for("the outside server", Duration::from_secs(5), || {
        c.lab.sh(&outside, "ss -ltn").contains(":80")
    });
    c.manifest("svc.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest(
        "eps.yaml",
        &slice("web", "IPv4", &[("10.0.0.11", "node-a")], WEB_EP_PORTS),
    );
    c.manifest("servicecidr.yaml", SERVICE_CIDR_YAML);
    c.start_proxy();
    let unallocated = |c: &Cluster| c.lab.tcp(&client_pod, "172.30.9.9", 80);
    let routed = Reply::Ok("outside 10.0.0.5".into());
    if mode == Mode::Nftables {
        assert_eq!(unallocated(&c), Reply::Timeout, "dropped on the node");
        assert_eq!(
            c.lab.tcp(&client_pod, "172.30.0.10", 81),
            Reply::Refused,
            "a ClusterIP's undefined port is still rejected"
        );
        assert!(
            c.nft("list chain ip kube-proxy-rs cluster-ips-check")
                .contains("ip daddr 172.30.0.0/16 drop")
        );
    } else {
        assert_eq!(
            unallocated(&c),
            routed,
            "iptables mode does not drop (as upstream)"
        );
    }
    assert_eq!(who(&c.lab.tcp(&client_pod, "172.30.0.10", 80)), "pod1");
    assert_eq!(
        c.lab.tcp(&client_pod, "172.31.0.9", 80),
        routed,
        "outside every ServiceCIDR: untouched"
    );
    // The ServiceCIDR goes: the drop goes with it at the next sync.
    let before = c.syncs();
    c.remove("servicecidr.yaml");
    Lab::wait_for("a sync after the change", Duration::from_secs(5), || {
        c.syncs() > before
    });
    assert_eq!(unallocated(&c), routed);
    // And comes back.
    c.apply("servicecidr.yaml", SERVICE_CIDR_YAML);
    if mode == Mode::Nftables {
        assert_eq!(unallocated(&c), Reply::Timeout);
    } else {
        assert_eq!(unallocated(&c), routed);
    }
}

/// T4.4 / T4.5.1: NodePort and LB IP from outside, masqueraded with ETP=Cluster; T4.8.1: a
/// Service without endpoints refuses at once.
fn t4_5_1_node_port_and_lb_ip_from_outside_and_t4_8_1_no_endpoints_refuse(mode: Mode) {
    let Some(mut c) = Cluster::new("t4_5_1", mode) else {
        return;
    };
    c.pod("pod1", "10.0.1.11", None);
    let lb = "  type: LoadBalancer\n";
    let ports = "[{name: http, port: 80, protocol: TCP, nodePort: 30080}]";
    let mut svc = service("web", "172.30.0.10", lb, ports);
    svc.push_str("status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n");
    c.manifest("svc.yaml", &svc);
    c.manifest(
        "eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[("10.0.1.11", "node-b")],
            "[{name: http, port: 8080, protocol: TCP}]",
        ),
    );
    c.manifest(
        "empty.yaml",
        &service(
            "empty",
            "172.30.0.20",
            "",
            "[{name: http, port: 80, protocol: TCP}]",
        ),
    );
    c.start_proxy();
    for (dst, port) in [("192.168.0.2", 30080), ("1.2.3.4", 80)] {
        let r = c.lab.tcp(&c.client, dst, port);
        assert_eq!(who(&r), "pod1", "{dst}:{port}");
        assert_ne!(peer(&r), "203.0.113.7", "ETP=Cluster masquerades ({dst})");
    }
    let pod = c.pods["pod1"].clone();
    let start = Instant::now();
    assert_eq!(c.lab.tcp(&pod, "172.30.0.20", 80), Reply::Refused);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused at once, took {:?}",
        start.elapsed()
    );
}

/// T4.2.1 / T4.2.2: ETP=Local keeps the client address; without a local endpoint, DROP.
fn t4_2_etp_local_preserves_the_client_ip_and_drops_without_local_endpoints(mode: Mode) {
    let Some(mut c) = Cluster::new("t4_2", mode) else {
        return;
    };
    c.pod("local", "10.0.0.11", None);
    c.pod("remote", "10.0.1.12", None);
    let extra =
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n";
    let mut svc = service(
        "web",
        "172.30.0.10",
        extra,
        "[{name: http, port: 80, protocol: TCP, nodePort: 30080}]",
    );
    svc.push_str("status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n");
    c.manifest("svc.yaml", &svc);
    let ports = "[{name: http, port: 8080, protocol: TCP}]";
    c.manifest(
        "eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[("10.0.0.11", "node-a"), ("10.0.1.12", "node-b")],
            ports,
        ),
    );
    c.start_proxy();
    for _ in 0..10 {
        let r = c.lab.tcp(&c.client, "1.2.3.4", 80);
        assert_eq!(who(&r), "local");
        assert_eq!(peer(&r), "203.0.113.7", "the endpoint sees the real client");
    }
    c.apply(
        "eps.yaml",
        &slice("web", "IPv4", &[("10.0.1.12", "node-b")], ports),
    );
    assert_eq!(
        c.lab.tcp(&c.client, "1.2.3.4", 80),
        Reply::Timeout,
        "DROP, not REJECT"
    );
    assert_eq!(c.lab.tcp(&c.client, "192.168.0.2", 30080), Reply::Timeout);
}

/// T4.3.1 ITP=Local with only remote endpoints drops; T5.4.1 ClientIP affinity sticks;
/// T4.9.1 hairpin.
fn t4_3_1_itp_local_t5_4_1_affinity_and_t4_9_1_hairpin(mode: Mode) {
    let Some(mut c) = Cluster::new("t4_3_1", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.pod("pod2", "10.0.0.12", None);
    c.pod("pod3", "10.0.1.13", None);
    let http = "[{name: http, port: 80, protocol: TCP}]";
    let ep_http = "[{name: http, port: 8080, protocol: TCP}]";
    c.manifest(
        "itp.yaml",
        &service(
            "itp",
            "172.30.0.30",
            "  internalTrafficPolicy: Local\n",
            http,
        ),
    );
    c.manifest(
        "itp-eps.yaml",
        &slice("itp", "IPv4", &[("10.0.1.13", "node-b")], ep_http),
    );
    c.manifest("aff.yaml", &service("aff", "172.30.0.40", "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}\n", http));
    c.manifest(
        "aff-eps.yaml",
        &slice(
            "aff",
            "IPv4",
            &[
                ("10.0.0.11", "node-a"),
                ("10.0.0.12", "node-a"),
                ("10.0.1.13", "node-b"),
            ],
            ep_http,
        ),
    );
    // A Service without affinity picks its endpoint through an endpoint map: hairpin is
    // masqueraded by the `hairpin-endpoints` pair set in postrouting.
    c.manifest("hp.yaml", &service("hp", "172.30.0.50", "", http));
    c.manifest(
        "hp-eps.yaml",
        &slice("hp", "IPv4", &[("10.0.0.11", "node-a")], ep_http),
    );
    c.start_proxy();
    assert_eq!(
        c.lab.tcp(&client, "172.30.0.30", 80),
        Reply::Timeout,
        "ITP=Local without local endpoints drops"
    );
    let first = who(&c.lab.tcp(&client, "172.30.0.40", 80));
    for _ in 0..20 {
        assert_eq!(
            who(&c.lab.tcp(&client, "172.30.0.40", 80)),
            first,
            "affinity keeps the client on one endpoint"
        );
    }
    // Hairpin: pod1 reaches itself through the Service (masqueraded so the reply comes back).
    let pod1 = c.pods["pod1"].clone();
    c.apply(
        "aff-eps.yaml",
        &slice("aff", "IPv4", &[("10.0.0.11", "node-a")], ep_http),
    );
    let r = c.lab.tcp(&pod1, "172.30.0.40", 80);
    assert_eq!(who(&r), "pod1");
    assert_ne!(peer(&r), "10.0.0.11", "hairpin traffic is masqueraded");
    let r = c.lab.tcp(&pod1, "172.30.0.50", 80);
    assert_eq!(who(&r), "pod1");
    assert_ne!(
        peer(&r),
        "10.0.0.11",
        "hairpin through an endpoint map is masqueraded"
    );
    let client_ip = peer(&c.lab.tcp(&client, "172.30.0.50", 80));
    assert_eq!(
        client_ip, "10.0.0.5",
        "a pod reaching another pod keeps its address"
    );
}

/// IPv6 ClusterIP from an IPv6 pod.
fn ipv6_cluster_ip(mode: Mode) {
    let Some(mut c) = Cluster::new("ipv6", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", Some("fd00:10::5"));
    c.pod("pod1", "10.0.0.11", Some("fd00:10::11"));
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web6, namespace: default}\nspec:\n  clusterIP: fd00:30::10\n  clusterIPs: [\"fd00:30::10\"]\n  ports: [{name: http, port: 80, protocol: TCP}]\n";
    c.manifest("svc.yaml", svc);
    c.manifest(
        "eps.yaml",
        &slice(
            "web6",
            "IPv6",
            &[("fd00:10::11", "node-a")],
            "[{name: http, port: 8080, protocol: TCP}]",
        ),
    );
    c.start_proxy();
    assert_eq!(who(&c.lab.tcp(&client, "fd00:30::10", 80)), "pod1");
}

/// Editing the manifests changes where new connections go within a couple of seconds, while an
/// established connection keeps working; deleting the Service stops DNAT.
fn manifest_edits_steer_new_connections_and_established_ones_survive(mode: Mode) {
    let Some(mut c) = Cluster::new("edits", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.pod("pod2", "10.0.0.12", None);
    c.manifest("svc.yaml", &service("web", "172.30.0.10", "", ECHO_PORTS));
    c.manifest(
        "eps.yaml",
        &slice("web", "IPv4", &[("10.0.0.11", "node-a")], ECHO_EP_PORTS),
    );
    c.start_proxy();
    // A long-lived connection to pod1's echo server through the Service.
    let echo = c.open_echo(&client, "172.30.0.10");
    // Move the Service to pod2: new connections go there within 2 s.
    let start = Instant::now();
    c.manifest(
        "eps.yaml",
        &slice("web", "IPv4", &[("10.0.0.12", "node-a")], ECHO_EP_PORTS),
    );
    Lab::wait_for(
        "new connections to reach pod2",
        Duration::from_secs(3),
        || who(&c.lab.tcp(&client, "172.30.0.10", 80)) == "pod2",
    );
    eprintln!("endpoint change effective after {:?}", start.elapsed());
    for _ in 0..10 {
        assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod2");
    }
    // The established connection to pod1 still works.
    echo.still_works();
    // Delete the Service: no more DNAT.
    c.remove("svc.yaml");
    Lab::wait_for("the Service to be gone", Duration::from_secs(3), || {
        !c.programmed("172.30.0.10")
    });
    assert!(matches!(
        c.lab.tcp(&client, "172.30.0.10", 80),
        Reply::Timeout | Reply::Refused
    ));
}

/// Active repair: a deleted or flushed table is restored within one second.
fn a_deleted_or_flushed_table_is_restored_within_a_second(mode: Mode) {
    let Some(mut c) = Cluster::new("repair", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.manifest(
        "svc.yaml",
        &service(
            "web",
            "172.30.0.10",
            "",
            "[{name: http, port: 80, protocol: TCP}]",
        ),
    );
    c.manifest(
        "eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[("10.0.0.11", "node-a")],
            "[{name: http, port: 8080, protocol: TCP}]",
        ),
    );
    // Upstream kube-proxy's nftables mode left its tables here (mode switch, §2.1 step 4).
    c.nft("add table ip kube-proxy");
    c.nft("add table ip6 kube-proxy");
    // ... and its iptables mode left chains and jumps (§13.6); kubelet's KUBE-FIREWALL stays.
    let leftovers = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y\nCOMMIT\n*filter\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n-A INPUT -j KUBE-FIREWALL\n-A FORWARD -j KUBE-FORWARD\nCOMMIT\n";
    let restore = if mode == Mode::Nftables {
        "iptables-restore".to_owned()
    } else {
        mode.tool(false, "-restore")
    };
    c.lab.sh(
        &c.node,
        &format!("printf '%s' '{leftovers}' | {restore} --noflush"),
    );
    if mode == Mode::Iptables {
        // Our own nftables table from a run in nftables mode.
        c.nft("add table ip kube-proxy-rs");
    }
    c.start_proxy();
    let tables = c.nft("list tables");
    assert!(
        !tables.contains("kube-proxy\n")
            && tables.contains("kube-proxy-rs") == (mode == Mode::Nftables),
        "upstream's tables (and ours in iptables mode) are removed on start: {tables}"
    );
    let saved = c.rules();
    if mode == Mode::Nftables {
        let saved = c.lab.sh(&c.node, "iptables-save");
        assert!(
            !saved.contains("KUBE-SERVICES")
                && !saved.contains("KUBE-SVC-")
                && !saved.contains("KUBE-FORWARD"),
            "upstream's iptables chains are removed: {saved}"
        );
        assert!(
            saved.contains("-A INPUT -j KUBE-FIREWALL"),
            "kubelet's KUBE-FIREWALL is kept: {saved}"
        );
    } else {
        assert!(
            !saved.contains("KUBE-SVC-NPX46M4PTMTKRN6Y"),
            "upstream's stale service chain is deleted: {saved}"
        );
        let v4 = c.lab.sh(&c.node, &mode.tool(false, "-save -t nat"));
        assert_eq!(
            v4.matches("-A POSTROUTING").count(),
            1,
            "one jump to KUBE-POSTROUTING, ours: {v4}"
        );
        assert!(
            saved.contains("-A INPUT -j KUBE-FIREWALL"),
            "kubelet's KUBE-FIREWALL is kept: {saved}"
        );
    }
    let attacks: &[String] = &match mode {
        Mode::Nftables => [
            "delete table ip kube-proxy-rs",
            "flush ruleset",
            "flush table ip kube-proxy-rs",
        ]
        .map(|a| format!("nft {a}"))
        .to_vec(),
        // T13.2, and what firewalld's reload does.
        mode => [
            format!("{} -t nat -F", mode.tool(false, "")),
            format!("{} -F", mode.tool(false, "")),
            format!(
                "{0} -t nat -F && {0} -t nat -X && {0} -F && {0} -X",
                mode.tool(false, "")
            ),
        ]
        .to_vec(),
    };
    for attack in attacks {
        c.lab.sh(&c.node, attack);
        let took = Lab::wait_for("the rules to be restored", Duration::from_secs(3), || {
            if mode == Mode::Nftables {
                c.lab
                    .try_sh(&c.node, "nft list map ip kube-proxy-rs service-ips")
                    .status
                    .success()
                    && c.nft("list chain ip kube-proxy-rs masquerading")
                        .contains("masquerade")
                    && c.programmed("172.30.0.10")
            } else {
                let saved = c.rules();
                saved.contains("MASQUERADE")
                    && saved.contains("-j KUBE-FORWARD")
                    && c.programmed("172.30.0.10")
            }
        });
        eprintln!("`{attack}`: rules restored after {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "`{attack}`: restored after {took:?}"
        );
        assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod1");
    }
}

/// The network safety rule: nothing was programmed in the namespace the tests run in.
#[test]
fn nothing_is_programmed_outside_the_test_namespaces() {
    let Some(_lab) = Lab::new("safety") else {
        return;
    };
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("kube-proxy-rs"),
        "a kube-proxy-rs table exists in the test's own namespace"
    );
    // The Service IP every traffic test uses, in either iptables back end.
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let out = std::process::Command::new(save).output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(
            !text.contains("172.30.0.") && !text.contains("KUBE-PROXY-CANARY"),
            "{save}: kube-proxy rules in the test's own namespace"
        );
    }
}

/// The proxy stops on SIGTERM leaving its rules in place (traffic keeps flowing while it is
/// down), and a restart adopts the table without breaking an established connection (§2,
/// issue 5's lifecycle; the data plane makes it possible).
fn rules_survive_a_restart_and_established_connections_keep_working(mode: Mode) {
    let Some(mut c) = Cluster::new("restart", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.manifest("svc.yaml", &service("web", "172.30.0.10", "", ECHO_PORTS));
    c.manifest(
        "eps.yaml",
        &slice("web", "IPv4", &[("10.0.0.11", "node-a")], ECHO_EP_PORTS),
    );
    let pid = c.start_proxy();
    let echo = c.open_echo(&client, "172.30.0.10");

    // Stop the proxy: its rules stay, new connections still work.
    c.stop_proxy(pid);
    assert!(c.programmed("172.30.0.10"), "rules kept after SIGTERM");
    assert_eq!(
        who(&c.lab.tcp(&client, "172.30.0.10", 80)),
        "pod1",
        "traffic flows while the proxy is down"
    );

    // Start it again: it adopts the table; the established connection keeps working.
    c.start_proxy();
    assert_eq!(
        who(&c.lab.tcp(&client, "172.30.0.10", 80)),
        "pod1",
        "new connections work right after start"
    );
    echo.still_works();
}

/// Issue 4 end to end: the real binary watches the test API server (serving inside the node
/// namespace) and real traffic follows what the API says: a Service and its slice become
/// reachable, scaling moves new connections, a Service of another proxy is ignored; with the
/// API server away the rules keep serving, and what was deleted meanwhile is gone after the
/// relist that the expired resourceVersion (410) forces; deleting a Service removes it.
fn api_server_source_end_to_end(mode: Mode) {
    let Some(mut c) = Cluster::new("api", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.pod("pod2", "10.0.0.12", None);
    let (rt, mut api) = c.api_server(kpr_apiserver::Options {
        token: Some("node-a-token".into()),
        // An API server from before Kubernetes 1.33: ServiceCIDRs at v1beta1 only.
        service_cidr_versions: vec!["v1beta1".into()],
        ..Default::default()
    });
    // Reached through a kubeconfig with a bearer token, as a node's kube-proxy is.
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}'}}}}]\nusers: [{{name: kube-proxy, user: {{token: node-a-token}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: kube-proxy}}}}]\ncurrent-context: x\n",
            api.url()
        ),
    )
    .unwrap();
    let obj = |yaml: &str| -> serde_json::Value { serde_saphyr::from_str(yaml).unwrap() };
    api.apply(obj(NODE_YAML));
    // A Service (with these labels) and its slice of one endpoint.
    let add = |name: &str, ip: &str, labels: &str, ep: &str| {
        let svc = service(name, ip, "", WEB_PORTS).replace(
            "namespace: default}",
            &format!("namespace: default, labels: {{{labels}}}}}"),
        );
        api.apply(obj(&svc));
        api.apply(obj(&slice(name, "IPv4", &[(ep, "node-a")], WEB_EP_PORTS)));
    };
    add("web", "172.30.0.10", "", "10.0.0.11");
    add("gone", "172.30.0.11", "", "10.0.0.12");
    add(
        "theirs",
        "172.30.0.12",
        "service.kubernetes.io/service-proxy-name: other",
        "10.0.0.12",
    );
    add(
        "hl",
        "172.30.0.13",
        "service.kubernetes.io/headless: ''",
        "10.0.0.12",
    );
    c.start_proxy_with(&format!("--kubeconfig {}", kubeconfig.display()));

    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod1");
    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.11", 80)), "pod2");
    assert!(
        !matches!(c.lab.tcp(&client, "172.30.0.12", 80), Reply::Ok(_)),
        "a Service of another proxy gets no rules"
    );
    assert!(
        !matches!(c.lab.tcp(&client, "172.30.0.13", 80), Reply::Ok(_)),
        "a headless-labelled Service gets no rules"
    );

    // A ServiceCIDR is created (§4.8): nftables mode drops its unallocated addresses from the
    // next sync on; iptables mode has no such rule.
    api.apply(obj(SERVICE_CIDR_YAML));
    if mode == Mode::Nftables {
        Lab::wait_for("the ServiceCIDR drop", Duration::from_secs(10), || {
            c.nft("list chain ip kube-proxy-rs cluster-ips-check")
                .contains("ip daddr 172.30.0.0/16 drop")
        });
        assert_eq!(c.lab.tcp(&client, "172.30.9.9", 80), Reply::Timeout);
    }

    // Scale up: new connections reach both endpoints.
    api.apply(obj(&slice(
        "web",
        "IPv4",
        &[("10.0.0.11", "node-a"), ("10.0.0.12", "node-a")],
        WEB_EP_PORTS,
    )));
    let mut seen = std::collections::BTreeSet::new();
    Lab::wait_for("both endpoints answering", Duration::from_secs(10), || {
        seen.insert(who(&c.lab.tcp(&client, "172.30.0.10", 80)));
        seen.len() == 2
    });

    // Scale down: new connections all reach the endpoint that is left.
    api.apply(obj(&slice(
        "web",
        "IPv4",
        &[("10.0.0.12", "node-a")],
        WEB_EP_PORTS,
    )));
    Lab::wait_for("only pod2 answering", Duration::from_secs(10), || {
        (0..10).all(|_| who(&c.lab.tcp(&client, "172.30.0.10", 80)) == "pod2")
    });

    // The API server goes away: the rules keep serving. Meanwhile `gone` is deleted and the
    // history forgotten, so the proxy's watch cannot resume: it must list again.
    rt.block_on(api.stop());
    assert_eq!(
        who(&c.lab.tcp(&client, "172.30.0.11", 80)),
        "pod2",
        "rules stay while the API server is away"
    );
    api.delete(kpr_apiserver::Kind::Service, "default", "gone");
    api.delete(kpr_apiserver::Kind::EndpointSlice, "default", "gone-1");
    api.compact();
    std::thread::sleep(Duration::from_secs(1));
    rt.block_on(api.restart()).unwrap();
    Lab::wait_for(
        "the deleted Service gone after the relist",
        Duration::from_secs(20),
        || !matches!(c.lab.tcp(&client, "172.30.0.11", 80), Reply::Ok(_)),
    );
    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod2");

    // Deleting a Service removes its rules (its watch may still be waiting out the reconnect
    // backoff it built up while the API server was away: up to kube-rs's backoff, not 5 s).
    api.delete(kpr_apiserver::Kind::Service, "default", "web");
    Lab::wait_for("web gone", Duration::from_secs(40), || {
        !matches!(c.lab.tcp(&client, "172.30.0.10", 80), Reply::Ok(_))
    });
}

/// Issue 13, with the real binary: objects the full API types cannot decode (a status
/// condition without lastTransitionTime, nulls in every optional field, unknown and newer
/// fields; an odd Node too) are served by the API server. At start, the odd Service is
/// programmed from its spec and so is the normal one beside it; while running, another odd
/// Service arrives and the first is deleted right after, a normal Service is added, and a
/// deletion the proxy cannot even decode (a garbled watch line) still takes effect, through
/// the relist that follows the watch error. The metrics show the requests and the watches.
fn odd_objects_from_the_api_server_are_programmed_and_never_blind_the_proxy(mode: Mode) {
    use kpr_testkit::odd;
    let Some(mut c) = Cluster::new("odd", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.pod("pod2", "10.0.0.12", None);
    let (_rt, api) = c.api_server(kpr_apiserver::Options::default());
    let obj = |yaml: &str| -> serde_json::Value { serde_saphyr::from_str(yaml).unwrap() };
    api.apply(odd::node("node-a", "192.168.0.2"));
    api.apply(odd::service("default", "odd", "172.30.0.20", 80));
    api.apply(odd::slice("default", "odd", &["10.0.0.11"], "node-a", 8080));
    api.apply(obj(&service("web", "172.30.0.10", "", WEB_PORTS)));
    api.apply(obj(&slice(
        "web",
        "IPv4",
        &[("10.0.0.12", "node-a")],
        WEB_EP_PORTS,
    )));
    c.start_proxy_with(&format!("--master {}", api.url()));
    assert_eq!(
        who(&c.lab.tcp(&client, "172.30.0.20", 80)),
        "pod1",
        "the odd Service is programmed from its spec"
    );
    assert_eq!(
        who(&c.lab.tcp(&client, "172.30.0.10", 80)),
        "pod2",
        "the Service listed beside it is programmed at start"
    );

    // While running: a second odd Service, the first one deleted right after, a normal one.
    api.apply(odd::service("default", "odd2", "172.30.0.21", 80));
    api.apply(odd::slice(
        "default",
        "odd2",
        &["10.0.0.12"],
        "node-a",
        8080,
    ));
    api.delete(kpr_apiserver::Kind::Service, "default", "odd");
    api.apply(obj(&service("late", "172.30.0.22", "", WEB_PORTS)));
    api.apply(obj(&slice(
        "late",
        "IPv4",
        &[("10.0.0.11", "node-a")],
        WEB_EP_PORTS,
    )));
    Lab::wait_for(
        "odd2 and late programmed, odd removed",
        Duration::from_secs(10),
        || {
            let answers = |ip: &str, pod: &str| matches!(c.lab.tcp(&client, ip, 80), Reply::Ok(l) if l.starts_with(pod));
            answers("172.30.0.21", "pod2")
                && answers("172.30.0.22", "pod1")
                && !matches!(c.lab.tcp(&client, "172.30.0.20", 80), Reply::Ok(_))
        },
    );

    // A deletion sent as a line nobody can decode: the watch fails, the proxy relists, and the
    // Service it never saw deleted is removed all the same.
    assert!(api.delete_garbled(kpr_apiserver::Kind::Service, "default", "web"));
    Lab::wait_for(
        "web removed after the relist",
        Duration::from_secs(10),
        || !matches!(c.lab.tcp(&client, "172.30.0.10", 80), Reply::Ok(_)),
    );
    assert!(
        c.logged("Watch failed") && c.logged("Watch restored"),
        "the outage is logged when it starts and when it ends"
    );
    let metrics = c.http_get(10249, "/metrics");
    let host = api.url().trim_start_matches("http://").to_owned();
    for series in [
        format!("rest_client_requests_total{{code=\"200\",host=\"{host}\",method=\"GET\"}}"),
        "kpr_watch_up{resource=\"services\"} 1".to_owned(),
        "kpr_watch_failures_total{resource=\"services\"} 1".to_owned(),
        "kpr_watch_up{resource=\"endpointslices\"} 1".to_owned(),
    ] {
        assert!(metrics.contains(&series), "no {series} in\n{metrics}");
    }
}

/// The in-cluster path: no --kubeconfig or --master, the service-account token and CA in
/// `/var/run/secrets/kubernetes.io/serviceaccount` (a tmpfs in the proxy's own mount
/// namespace, so nothing of the machine's is touched) and `KUBERNETES_SERVICE_HOST/PORT`, as
/// a DaemonSet pod sees them; the API server serves HTTPS and requires the token.
#[test]
fn in_cluster_service_account() {
    let Some(mut c) = Cluster::new("incluster", Mode::Nftables) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    let (_rt, api) = c.api_server(kpr_apiserver::Options {
        token: Some("sa-token".into()),
        tls: true,
        ..Default::default()
    });
    let obj = |yaml: &str| -> serde_json::Value { serde_saphyr::from_str(yaml).unwrap() };
    api.apply(obj(NODE_YAML));
    api.apply(obj(&service("web", "172.30.0.10", "", WEB_PORTS)));
    api.apply(obj(&slice(
        "web",
        "IPv4",
        &[("10.0.0.11", "node-a")],
        WEB_EP_PORTS,
    )));
    let sa = c.dir.path().join("sa");
    std::fs::create_dir(&sa).unwrap();
    std::fs::write(sa.join("token"), "sa-token").unwrap();
    std::fs::write(sa.join("ca.crt"), api.ca_pem().unwrap()).unwrap();
    std::fs::write(sa.join("namespace"), "kube-system").unwrap();
    let secrets = "/var/run/secrets/kubernetes.io/serviceaccount";
    let cmd = format!(
        "mount -t tmpfs kpr-test /run && mkdir -p {secrets} && cp {}/* {secrets}/ && KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT={} exec {} --proxy-mode nftables --hostname-override node-a --cluster-cidr 10.0.0.0/8 --iptables-min-sync-period 0s -v 2 2>>{}",
        sa.display(),
        api.port(),
        env!("CARGO_BIN_EXE_kube-proxy-rs"),
        c.log.display()
    );
    let node = c.node.clone();
    c.lab.spawn(&node, &["unshare", "-m", "sh", "-c", &cmd]);
    Lab::wait_for("the first sync", Duration::from_secs(15), || c.syncs() > 0);
    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod1");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("/api/v1/services")),
        "listed through the in-cluster config"
    );
}

impl Cluster {
    /// The test API server serving inside the node namespace (`netns` is set here), and the
    /// runtime it runs on (keep both for the test's length).
    fn api_server(
        &self,
        opts: kpr_apiserver::Options,
    ) -> (tokio::runtime::Runtime, kpr_apiserver::ApiServer) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = rt
            .block_on(kpr_apiserver::ApiServer::start(kpr_apiserver::Options {
                netns: Some(self.node.clone()),
                ..opts
            }))
            .unwrap();
        (rt, api)
    }

    /// An HTTP GET to 127.0.0.1 from inside the node namespace; the whole response.
    fn http_get(&self, port: u16, path: &str) -> String {
        self.http_get_at("127.0.0.1", port, path)
    }

    /// An HTTP GET to `ip:port` from inside the node namespace; the whole response.
    fn http_get_at(&self, ip: &str, port: u16, path: &str) -> String {
        self.lab.sh(
            &self.node,
            // The request side stays open until the reply is in: an HTTP server may drop a
            // connection whose client half-closes before it has answered.
            &format!("(printf 'GET {path} HTTP/1.1\\r\\nHost: node\\r\\nConnection: close\\r\\n\\r\\n'; sleep 0.5) | socat -t2 - TCP:{ip}:{port} || true"),
        )
    }
}

/// §7.1 with the real binary: `/healthz` and `/livez` on 10256 answer with upstream's status,
/// headers and body; other paths 404 (T7.1.4); a Node tainted for deletion by the cluster
/// autoscaler makes `/healthz` 503 with `"nodeEligible":false` while `/livez` stays 200
/// (T7.1.3).
fn t7_1_health_endpoints(mode: Mode) {
    let Some(mut c) = Cluster::new("health", mode) else {
        return;
    };
    c.pod("pod1", "10.0.0.11", None);
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    // T8.3: ITP=Local with endpoints only elsewhere.
    c.manifest(
        "itp.yaml",
        &service(
            "itp",
            "172.30.0.30",
            "  internalTrafficPolicy: Local\n",
            WEB_PORTS,
        ),
    );
    c.manifest(
        "itp-eps.yaml",
        &slice("itp", "IPv4", &[("10.0.1.13", "node-b")], WEB_EP_PORTS),
    );
    c.start_proxy();
    Lab::wait_for("the health server", Duration::from_secs(5), || {
        c.http_get(10256, "/livez").starts_with("HTTP/1.1 200")
    });
    let healthz = c.http_get(10256, "/healthz");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let lower = healthz.to_lowercase();
    assert!(
        lower.contains("content-type: application/json"),
        "{healthz}"
    );
    assert!(
        lower.contains("x-content-type-options: nosniff"),
        "{healthz}"
    );
    let body = healthz.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.starts_with(r#"{"lastUpdated":""#), "{body}");
    assert!(
        body.contains(r#","nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"#),
        "{body}"
    );
    assert!(
        c.http_get(10256, "/foo").starts_with("HTTP/1.1 404"),
        "T7.1.4"
    );

    let tainted = NODE_YAML.replace(
        "spec: {podCIDRs: [10.0.0.0/24]}",
        "spec: {podCIDRs: [10.0.0.0/24], taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}",
    );
    assert_ne!(tainted, NODE_YAML);
    c.manifest("node.yaml", &tainted);
    Lab::wait_for(
        "/healthz 503 on a node being removed",
        Duration::from_secs(10),
        || {
            let r = c.http_get(10256, "/healthz");
            r.starts_with("HTTP/1.1 503") && r.contains(r#""nodeEligible":false"#)
        },
    );
    assert!(
        c.http_get(10256, "/livez").starts_with("HTTP/1.1 200"),
        "T7.1.3: /livez stays 200"
    );

    // §8 on 127.0.0.1:10249.
    let proxy_mode = c.http_get(10249, "/proxyMode");
    assert!(
        proxy_mode.starts_with("HTTP/1.1 200") && proxy_mode.ends_with(mode.flag()),
        "T8.1: {proxy_mode}"
    );
    assert!(c.http_get(10249, "/healthz").ends_with("ok"));
    let metrics = c.http_get(10249, "/metrics");
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(
        value(r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#) > 0.0,
        "T8.2"
    );
    assert_eq!(
        value(
            r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="internal"}"#
        ),
        1.0,
        "T8.3"
    );
    assert!(
        value(r#"kubeproxy_proxy_healthz_total{code="503"}"#) >= 1.0,
        "T7.1.5"
    );
    assert!(value(r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#) >= 1.0);
    if mode == Mode::Nftables {
        assert!(
            !metrics.contains("kubeproxy_sync_proxy_rules_iptables"),
            "T8.4"
        );
    } else {
        // The iptables mode's series instead of the nftables mode's.
        assert!(
            value(r#"kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}"#)
                > 0.0
        );
        assert!(!metrics.contains("kubeproxy_sync_proxy_rules_nftables"));
    }
}

/// §7.2 with the real binary: a LoadBalancer Service with ETP=Local gets a server on its
/// healthCheckNodePort (on the node's IP): 200 with the local ready endpoint count and
/// upstream's headers and body (T7.2.1); 503 with only terminating local endpoints (T7.2.2);
/// the port closes when the Service goes (T7.2.4).
fn t7_2_health_check_node_port(mode: Mode) {
    let Some(mut c) = Cluster::new("hcnp", mode) else {
        return;
    };
    c.pod("pod1", "10.0.0.11", None);
    c.pod("pod2", "10.0.0.12", None);
    let lb = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30999\n";
    let ports = "[{name: http, port: 80, protocol: TCP, nodePort: 30080}]";
    let ep_ports = "[{name: http, port: 8080, protocol: TCP}]";
    c.manifest("lb.yaml", &service("lb", "172.30.0.40", lb, ports));
    c.manifest(
        "lb-eps.yaml",
        &slice(
            "lb",
            "IPv4",
            &[("10.0.0.11", "node-a"), ("10.0.0.12", "node-a")],
            ep_ports,
        ),
    );
    c.start_proxy();
    let mut r = String::new();
    Lab::wait_for(
        "the healthCheckNodePort server",
        Duration::from_secs(5),
        || {
            r = c.http_get_at("192.168.0.2", 30999, "/");
            r.starts_with("HTTP/1.1 200")
        },
    );
    let lower = r.to_lowercase();
    assert!(lower.contains("x-load-balancing-endpoint-weight: 2"), "{r}");
    assert!(
        lower.contains("content-type: application/json")
            && lower.contains("x-content-type-options: nosniff"),
        "{r}"
    );
    let body = r.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"lb\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}",
        "T7.2.1"
    );

    let terminating = slice("lb", "IPv4", &[("10.0.0.11", "node-a")], ep_ports).replace(
        "conditions: {ready: true}",
        "conditions: {ready: false, serving: true, terminating: true}",
    );
    c.manifest("lb-eps.yaml", &terminating);
    Lab::wait_for(
        "503 with only terminating local endpoints",
        Duration::from_secs(5),
        || {
            let r = c.http_get_at("192.168.0.2", 30999, "/any/path");
            r.starts_with("HTTP/1.1 503") && r.contains("\"localEndpoints\": 0")
        },
    );

    c.remove("lb.yaml");
    Lab::wait_for("the port closed", Duration::from_secs(5), || {
        !c.http_get_at("192.168.0.2", 30999, "/")
            .starts_with("HTTP/1.1")
    });
}

/// §2.4 `--cleanup`: after a run, and with rules of upstream kube-proxy's iptables and
/// nftables modes present, it leaves no rule of ours or theirs (checked with `nft list
/// ruleset` and `iptables-save`), keeps other tables, and exits 0.
fn cleanup_removes_every_rule_of_ours_and_upstreams(mode: Mode) {
    let Some(mut c) = Cluster::new("cleanup", mode) else {
        return;
    };
    c.pod("pod1", "10.0.0.11", None);
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest(
        "web-eps.yaml",
        &slice("web", "IPv4", &[("10.0.0.11", "node-a")], WEB_EP_PORTS),
    );
    let pid = c.start_proxy();
    c.stop_proxy(pid);
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.programmed("172.30.0.10"), "rules stay after SIGTERM");
    // Upstream's leftovers, and a table that is not ours.
    c.lab.sh(
        &c.node,
        "nft add table ip kube-proxy && nft add chain ip kube-proxy services && nft add table inet other && \
         (iptables -t nat -N KUBE-SERVICES || true) && iptables -t nat -A PREROUTING -j KUBE-SERVICES && \
         iptables -t filter -N KUBE-FIREWALL",
    );
    let out = c.lab.try_sh(
        &c.node,
        &format!("{} --cleanup -v 2", env!("CARGO_BIN_EXE_kube-proxy-rs")),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ruleset = c.nft("list ruleset");
    assert!(!ruleset.contains("kube-proxy"), "{ruleset}");
    assert!(
        ruleset.contains("table inet other"),
        "other tables stay: {ruleset}"
    );
    let saved = c.lab.sh(&c.node, "iptables-save; ip6tables-save");
    assert!(
        !saved.contains("KUBE-SERVICES")
            && !saved.contains("KUBE-SEP-")
            && !saved.contains("KUBE-PROXY-CANARY"),
        "{saved}"
    );
    assert!(
        saved.contains(":KUBE-FIREWALL"),
        "kubelet's chain stays: {saved}"
    );
}

/// §2.3: writing the `--config` file makes the process exit with upstream's message (its
/// supervisor restarts it with the new file); the rules stay in place.
#[test]
fn a_changed_config_file_makes_the_process_exit() {
    let Some(mut c) = Cluster::new("configz", Mode::Nftables) else {
        return;
    };
    c.pod("pod1", "10.0.0.11", None);
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    let conf = c
        .dir
        .path()
        .parent()
        .unwrap()
        .join(format!("kpr-config-{}.yaml", std::process::id()));
    let body = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\nclusterCIDR: 10.0.0.0/8\nnodePortAddresses: [primary]\n";
    std::fs::write(&conf, body).unwrap();
    let source = format!(
        "--config {} --manifests {}",
        conf.display(),
        c.dir.path().display()
    );
    c.start_proxy_with(&source);
    std::fs::write(&conf, format!("{body}masqueradeAll: true\n")).unwrap();
    Lab::wait_for("the proxy exiting", Duration::from_secs(10), || {
        c.logged("content of the proxy server's configuration file was updated")
    });
    let _ = std::fs::remove_file(&conf);
    assert!(
        c.nft("list ruleset").contains("table ip kube-proxy-rs"),
        "rules stay in place"
    );
}

/// T7.1.2 with the real binary: while another process owns our table (nft's `owner` flag:
/// the kernel refuses every transaction of ours), a queued change cannot be applied, and once
/// it has waited 2 x syncPeriod `/livez` and `/healthz` turn 503; when that process exits its
/// table goes with it, the next sync succeeds, and both are 200 again.
#[test]
fn t7_1_2_health_turns_unhealthy_while_syncs_fail_and_recovers() {
    let Some(mut c) = Cluster::new("stuck", Mode::Nftables) else {
        return;
    };
    c.pod("pod1", "10.0.0.11", None);
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    let source = format!(
        "--manifests {} --iptables-sync-period 1s",
        c.dir.path().display()
    );
    c.start_proxy_with(&source);
    Lab::wait_for("healthy", Duration::from_secs(5), || {
        c.http_get(10256, "/livez").starts_with("HTTP/1.1 200")
    });
    let node = c.node.clone();
    c.lab.spawn(
        &node,
        &[
            "sh",
            "-c",
            "(echo 'delete table ip kube-proxy-rs; add table ip kube-proxy-rs { flags owner ; }'; sleep 8) | nft -i",
        ],
    );
    c.manifest("web2.yaml", &service("web2", "172.30.0.20", "", WEB_PORTS));
    Lab::wait_for(
        "/livez 503 while syncs fail",
        Duration::from_secs(8),
        || c.http_get(10256, "/livez").starts_with("HTTP/1.1 503"),
    );
    assert!(c.http_get(10256, "/healthz").starts_with("HTTP/1.1 503"));
    // Issue 15: each refusal is counted and logged, naming the refused operation, in words.
    assert!(
        c.logged(
            "Sync failed, retrying as a full sync: the kernel refused `add table ip kube-proxy-rs"
        ) && c.logged("another process owns the table (nft 'flags owner')"),
        "{}",
        std::fs::read_to_string(&c.log).unwrap_or_default()
    );
    assert!(
        c.http_get(10249, "/metrics").lines().any(|l| l
            .strip_prefix(
                r#"kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} "#
            )
            .is_some_and(|n| n.trim() != "0")),
        "refusals counted"
    );
    Lab::wait_for("/livez 200 again", Duration::from_secs(15), || {
        c.http_get(10256, "/livez").starts_with("HTTP/1.1 200")
    });
    assert!(c.http_get(10256, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(
        c.nft("list ruleset").contains("172.30.0.20"),
        "the change is in"
    );
}

/// T6.2.1 / T6.2.4 with real UDP: a client keeps one UDP flow (same source port) to a
/// ClusterIP with two endpoints; the endpoint it reaches is removed; after the sync the stale
/// conntrack entry is gone, so the next datagram of the same flow reaches the remaining
/// endpoint, and the deletion is counted.
fn t6_2_stale_udp_flows_are_deleted_when_their_endpoint_goes(mode: Mode) {
    let Some(mut c) = Cluster::new("conntrack", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.pod("pod2", "10.0.0.12", None);
    let ips = [("pod1", "10.0.0.11"), ("pod2", "10.0.0.12")];
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest(
        "web-eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[(ips[0].1, "node-a"), (ips[1].1, "node-a")],
            WEB_EP_PORTS,
        ),
    );
    c.start_proxy();
    // A datagram of the flow, and the reply. On a loaded machine the pod's forking socat
    // sometimes drops one (no reply at all, with or without the proxy: it happened at the
    // commit before the current layout too); another datagram of the same flow is sent then.
    // A reply from the wrong endpoint is never retried.
    let same_flow = || {
        let mut reply = String::new();
        for _ in 0..3 {
            let out = c.lab.try_sh(
                &client,
                "echo hello | timeout 5 socat -T3 - UDP:172.30.0.10:53,sourceport=40053",
            );
            reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !reply.is_empty() {
                break;
            }
        }
        reply
    };
    let first = same_flow();
    let hit = ips
        .iter()
        .position(|(name, _)| first.starts_with(name))
        .unwrap_or_else(|| panic!("no endpoint answered: {first:?}"));
    assert!(
        same_flow().starts_with(ips[hit].0),
        "one flow, one endpoint"
    );
    let remaining = ips[1 - hit];
    c.apply(
        "web-eps.yaml",
        &slice("web", "IPv4", &[(remaining.1, "node-a")], WEB_EP_PORTS),
    );
    let reply = same_flow();
    assert!(
        reply.starts_with(remaining.0),
        "the same UDP flow reaches the remaining endpoint after the sync: {reply:?}"
    );
    let metrics = c.http_get(10249, "/metrics");
    let deleted = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} "#,
            )
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_default();
    assert!(deleted >= 1.0, "T6.2.4: {deleted}");
}

/// `kube-proxy-rs conntrack` (issue 14): run in the node namespace, it lists a Service's
/// conntrack flows with the endpoint each went to; once that endpoint leaves the EndpointSlice,
/// the established TCP connection still going to it is reported stale. Also: flows to an
/// address without the proxy, and the exit codes.
fn conntrack_command_shows_each_flows_endpoint_and_flags_stale_ones(mode: Mode) {
    let Some(mut c) = Cluster::new("ctcmd", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    let ips = [("pod1", "10.0.0.11"), ("pod2", "10.0.0.12")];
    for (name, ip) in ips {
        c.pod(name, ip, None);
    }
    let ports = "[{name: echo, port: 9000, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
    let ep_ports =
        "[{name: echo, port: 9000, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]";
    c.manifest("svc.yaml", &service("web", "172.30.0.10", "", ports));
    c.manifest(
        "eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[(ips[0].1, "node-a"), (ips[1].1, "node-a")],
            ep_ports,
        ),
    );
    c.start_proxy();
    let echo = c.open_echo(&client, "172.30.0.10");
    // Which pod the connection reached, from the pods' own sockets.
    let tcp_pod = ips
        .iter()
        .position(|(name, _)| {
            c.lab
                .sh(
                    &c.pods[*name],
                    "ss -Htn state established '( sport = :9000 )'",
                )
                .contains("10.0.0.5:")
        })
        .unwrap_or_else(|| panic!("no pod has the echo connection"));
    let out = c.lab.try_sh(
        &client,
        "echo hello | timeout 5 socat -T3 - UDP:172.30.0.10:53,sourceport=40053",
    );
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let udp_pod = ips
        .iter()
        .position(|(name, _)| reply.starts_with(name))
        .unwrap_or_else(|| panic!("no endpoint answered UDP: {reply:?}"));
    let bin = env!("CARGO_BIN_EXE_kube-proxy-rs");
    let ct = |args: &str| -> serde_json::Value {
        let out = c
            .lab
            .sh(&c.node, &format!("{bin} conntrack {args} --output json"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let find = |r: &serde_json::Value, proto: &str, client: &str| -> serde_json::Value {
        r["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["protocol"] == proto && f["client"].as_str().unwrap().starts_with(client))
            .cloned()
            .unwrap_or_else(|| panic!("no {proto} flow from {client} in {r:#}"))
    };
    let echo_ep = format!("{}:9000", ips[tcp_pod].1);
    let r = ct("--service default/web");
    let tcp = find(&r, "tcp", "10.0.0.5:");
    assert_eq!(tcp["frontend"], "172.30.0.10:9000", "{r:#}");
    assert_eq!(tcp["frontendKind"], "clusterIP");
    assert_eq!(tcp["servicePort"], "default/web:echo");
    assert_eq!(tcp["endpoint"], echo_ep.as_str());
    assert_eq!(tcp["endpointState"], "ready");
    assert_eq!(tcp["stale"], false);
    assert_eq!(tcp["state"], "ESTABLISHED");
    assert!(tcp["timeoutSeconds"].as_u64().unwrap() > 0);
    let udp = find(&r, "udp", "10.0.0.5:40053");
    assert_eq!(udp["frontend"], "172.30.0.10:53");
    assert_eq!(udp["endpoint"], format!("{}:5353", ips[udp_pod].1));
    assert_eq!(udp["stale"], false);
    assert!(udp["state"].is_null());
    let count = |r: &serde_json::Value, ep: &str| -> (String, u64) {
        let e = r["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["servicePort"] == "default/web:echo" && e["endpoint"] == ep)
            .unwrap_or_else(|| panic!("no count for {ep} in {r:#}"));
        (
            e["state"].as_str().unwrap().to_owned(),
            e["flows"].as_u64().unwrap(),
        )
    };
    assert_eq!(count(&r, &echo_ep), ("ready".to_owned(), 1));
    // Without the proxy: the flows to the endpoint, as DNATed.
    let raw = ct(&format!("--to {echo_ep} --proto tcp"));
    assert_eq!(
        find(&raw, "tcp", "10.0.0.5:")["frontend"],
        "172.30.0.10:9000"
    );

    // The echo connection's endpoint leaves the Service.
    c.apply(
        "eps.yaml",
        &slice("web", "IPv4", &[(ips[1 - tcp_pod].1, "node-a")], ep_ports),
    );
    let r = ct("--service default/web");
    let tcp = find(&r, "tcp", "10.0.0.5:");
    assert_eq!(tcp["endpoint"], echo_ep.as_str(), "{r:#}");
    assert_eq!(tcp["endpointState"], "stale");
    assert_eq!(tcp["stale"], true);
    assert_eq!(count(&r, &echo_ep), ("stale".to_owned(), 1));
    let text = c
        .lab
        .sh(&c.node, &format!("{bin} conntrack --service default/web"));
    eprintln!("{text}");
    assert!(
        text.contains("1 flow still goes to an endpoint the Service no longer has"),
        "{text}"
    );
    if udp_pod == tcp_pod {
        // The reconciler deletes UDP flows to a removed endpoint (§6.2).
        Lab::wait_for("the stale UDP flow to go", Duration::from_secs(3), || {
            let r = ct("--service default/web --port dns");
            r["flows"].as_array().unwrap().is_empty()
        });
    } else {
        let udp = find(&r, "udp", "10.0.0.5:40053");
        assert_eq!(udp["endpointState"], "ready");
    }
    echo.still_works();

    // Exit codes: 2 bad input, 1 no proxy or no privilege.
    let code = |script: &str| c.lab.try_sh(&c.node, script).status.code();
    assert_eq!(code(&format!("{bin} conntrack")), Some(2));
    assert_eq!(
        code(&format!("{bin} conntrack --service default/nosuch")),
        Some(2)
    );
    assert_eq!(
        code(&format!(
            "{bin} conntrack --service default/web --server http://127.0.0.1:1"
        )),
        Some(1)
    );
    let unprivileged = c.lab.try_sh(
        &c.node,
        &format!("setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all {bin} conntrack --to {echo_ep}"),
    );
    assert_eq!(unprivileged.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unprivileged.stderr).contains("CAP_NET_ADMIN"),
        "{unprivileged:?}"
    );
}

/// §6.1 with the real binary and the default configuration: the namespace's conntrack
/// timeouts are set (established 24h, close-wait 1h), while nf_conntrack_max and the hash
/// size, global to the machine, are left alone outside the host's network namespace.
#[test]
fn t6_1_conntrack_sysctls_of_the_namespace_are_set() {
    let Some(mut c) = Cluster::new("sysctl", Mode::Nftables) else {
        return;
    };
    c.lab.sh(&c.node, "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_established=1234 net.netfilter.nf_conntrack_tcp_timeout_close_wait=56 || true");
    c.start_proxy();
    let get = |name: &str| {
        c.lab
            .sh(&c.node, &format!("sysctl -n net.netfilter.{name}"))
            .trim()
            .to_owned()
    };
    assert_eq!(get("nf_conntrack_tcp_timeout_established"), "86400");
    assert_eq!(get("nf_conntrack_tcp_timeout_close_wait"), "3600");
    assert!(
        c.logged("not the host's network namespace"),
        "nf_conntrack_max left alone"
    );
}

/// §2.1 step 4 both ways: the proxy runs in iptables mode, is stopped and started in nftables
/// mode (the iptables rules go, the table comes, traffic flows), then back in iptables mode
/// (the table goes).
#[test]
fn switching_modes_removes_the_other_modes_rules() {
    let Some(mut c) = Cluster::new("switch", Mode::Iptables) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", None);
    c.pod("pod1", "10.0.0.11", None);
    c.manifest("svc.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest(
        "eps.yaml",
        &slice("web", "IPv4", &[("10.0.0.11", "node-a")], WEB_EP_PORTS),
    );
    let pid = c.start_proxy();
    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod1");
    c.stop_proxy(pid);

    c.mode = Mode::Nftables;
    let pid = c.start_proxy();
    let saved = c.lab.sh(&c.node, "iptables-save; ip6tables-save");
    assert!(
        !saved.contains("KUBE-SERVICES") && !saved.contains("KUBE-SEP-"),
        "the iptables mode's rules are gone: {saved}"
    );
    assert!(c.programmed("172.30.0.10"));
    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod1");
    c.stop_proxy(pid);

    c.mode = Mode::Iptables;
    c.start_proxy();
    assert!(
        !c.nft("list tables").contains("kube-proxy-rs"),
        "the nftables mode's table is gone"
    );
    assert!(c.programmed("172.30.0.10"));
    assert_eq!(who(&c.lab.tcp(&client, "172.30.0.10", 80)), "pod1");
}

/// §4.4 localhost NodePorts (iptables mode, IPv4, `nodePortAddresses` unset): a host process
/// reaches a NodePort on 127.0.0.1 (`route_localnet` is set, as upstream), and on the node IP;
/// the CVE-2020-8558 guard is in kubelet's `KUBE-FIREWALL`.
#[test]
fn t4_4_localhost_node_ports_in_iptables_mode() {
    let Some(mut c) = Cluster::new("localhost", Mode::Iptables) else {
        return;
    };
    c.node_port_addresses = "";
    c.pod("pod1", "10.0.1.11", None);
    let ports = "[{name: http, port: 80, protocol: TCP, nodePort: 30080}]";
    c.manifest(
        "svc.yaml",
        &service("web", "172.30.0.10", "  type: NodePort\n", ports),
    );
    c.manifest(
        "eps.yaml",
        &slice(
            "web",
            "IPv4",
            &[("10.0.1.11", "node-b")],
            "[{name: http, port: 8080, protocol: TCP}]",
        ),
    );
    c.start_proxy();
    assert_eq!(
        c.lab
            .sh(&c.node, "cat /proc/sys/net/ipv4/conf/all/route_localnet")
            .trim(),
        "1"
    );
    assert!(c.rules().contains("block incoming localnet connections"));
    assert_eq!(who(&c.lab.tcp(&c.node, "127.0.0.1", 30080)), "pod1");
    assert_eq!(who(&c.lab.tcp(&c.node, "192.168.0.2", 30080)), "pod1");
    assert_eq!(who(&c.lab.tcp(&c.client, "192.168.0.2", 30080)), "pod1");
}

/// Issue 14, "the kernel, not only the intent". A fresh proxy's kernel rules verify clean
/// (`kube-proxy-rs verify` exits 0): the listing parser and the iptables normaliser read the
/// real `nft` and `iptables-save` output of endpoint picks, affinity (with a live affinity
/// entry), NodePorts, source ranges, ETP Local, a Service without endpoints and IPv6. One
/// Service's ClusterIP rule deleted behind the proxy's back: verify exits 1 naming it, explain
/// says the kernel disagrees for a packet to it and agrees for another Service; the drift
/// check (every 10 s here) finds it and resyncs: verify exits 0 again, explain agrees, traffic
/// flows, `kpr_rules_drift_total` counts it.
fn verify_names_drift_explain_sees_it_and_the_drift_check_repairs_it(mode: Mode) {
    let Some(mut c) = Cluster::new("verify", mode) else {
        return;
    };
    let client = c.pod("client-pod", "10.0.0.5", Some("fd00:10::5"));
    c.pod("pod1", "10.0.0.11", Some("fd00:10::11"));
    c.pod("pod2", "10.0.0.12", None);
    let http = "[{name: http, port: 80, protocol: TCP}]";
    let ep_http = "[{name: http, port: 8080, protocol: TCP}]";
    let both = [("10.0.0.11", "node-a"), ("10.0.0.12", "node-a")];
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest("web-eps.yaml", &slice("web", "IPv4", &both, WEB_EP_PORTS));
    c.manifest(
        "aff.yaml",
        &service("aff", "172.30.0.20", "  sessionAffinity: ClientIP\n", http),
    );
    c.manifest("aff-eps.yaml", &slice("aff", "IPv4", &both, ep_http));
    let lb = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  loadBalancerSourceRanges: [203.0.113.0/24]\n";
    let mut svc = service(
        "lb",
        "172.30.0.30",
        lb,
        "[{name: http, port: 80, protocol: TCP, nodePort: 30080}]",
    );
    svc.push_str("status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n");
    c.manifest("lb.yaml", &svc);
    c.manifest(
        "lb-eps.yaml",
        &slice(
            "lb",
            "IPv4",
            &[("10.0.0.12", "node-a"), ("10.0.1.13", "node-b")],
            ep_http,
        ),
    );
    c.manifest("empty.yaml", &service("empty", "172.30.0.40", "", http));
    c.manifest("v6.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web6, namespace: default}\nspec:\n  clusterIP: fd00:30::10\n  clusterIPs: [\"fd00:30::10\"]\n  ports: [{name: http, port: 80, protocol: TCP}]\n");
    c.manifest(
        "v6-eps.yaml",
        &slice("web6", "IPv6", &[("fd00:10::11", "node-a")], ep_http),
    );
    let source = format!(
        "--manifests {} --iptables-sync-period 2s",
        c.dir.path().display()
    );
    c.start_proxy_with(&source);
    let bin = env!("CARGO_BIN_EXE_kube-proxy-rs");
    let server = "--server http://127.0.0.1:10249";
    let run = |args: &str| {
        let out = c.lab.try_sh(&c.node, &format!("{bin} {args}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    // Traffic first: an affinity entry in the kernel is traffic's, not a difference.
    assert!(["pod1", "pod2"].contains(&who(&c.lab.tcp(&client, "172.30.0.20", 80)).as_str()));
    assert_eq!(who(&c.lab.tcp(&client, "fd00:30::10", 80)), "pod1");
    let start = Instant::now();
    let (code, text) = run(&format!("verify {server}"));
    eprintln!(
        "verify of a fresh proxy, {:?} (the whole command):\n{text}",
        start.elapsed()
    );
    assert_eq!(
        code, 0,
        "a fresh proxy's kernel rules match the committed ones:\n{text}"
    );
    assert!(text.contains("IPv4: ") && text.contains("IPv6: "), "{text}");
    let (code, json) = run(&format!("verify {server} -o json"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (
            code,
            v["ok"].as_bool(),
            v["differences"].as_array().map(Vec::len)
        ),
        (0, Some(true), Some(0)),
        "{json}"
    );
    let (code, text) = run("verify --server http://127.0.0.1:1");
    assert_eq!(code, 2, "no proxy there: {text}");

    // Delete web's ClusterIP rule behind the proxy's back, then ask at once (the drift check
    // may run in between: then again).
    let (delete, object) = match mode {
        Mode::Nftables => (
            "nft delete element ip kube-proxy-rs service-ips '{ 172.30.0.10 . tcp . 80 }'"
                .to_owned(),
            "map service-ips",
        ),
        mode => (
            format!(
                "eval \"{tool} -t nat $({save} -t nat | grep -- '^-A KUBE-SERVICES .*-d 172.30.0.10/32 .*--dport 80 ' | sed 's/^-A/-D/')\"",
                tool = mode.tool(false, ""),
                save = mode.tool(false, "-save"),
            ),
            "chain KUBE-SERVICES (nat)",
        ),
    };
    let drifts = || {
        std::fs::read_to_string(&c.log)
            .unwrap_or_default()
            .matches("drifted from what was committed")
            .count()
    };
    let explain = format!("explain {server} --from 10.0.0.5 --to");
    let mut attempt = 0;
    let deleted = loop {
        attempt += 1;
        let before = drifts();
        c.lab.sh(&c.node, &delete);
        let deleted = Instant::now();
        let (code, text) = run(&format!("verify {server}"));
        let web = run(&format!("{explain} 172.30.0.10:80"));
        let aff = run(&format!("{explain} 172.30.0.20:80"));
        let web_json = run(&format!("{explain} 172.30.0.10:80 -o json"));
        if drifts() != before && attempt < 3 {
            eprintln!("the drift check ran while we looked; deleting again");
            continue;
        }
        eprintln!("verify after the deletion:\n{text}\nexplain:\n{}", web.1);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(object) && text.contains("172.30.0.10"),
            "{text}"
        );
        assert!(text.contains("missing"), "{text}");
        assert!(
            web.1.contains("Kernel: the kernel DISAGREES") && web.1.contains(object),
            "{}",
            web.1
        );
        assert!(aff.1.contains("Kernel: the kernel agrees"), "{}", aff.1);
        let v: serde_json::Value = serde_json::from_str(&web_json.1).unwrap();
        assert_eq!(v["kernel"]["status"], "disagrees", "{}", web_json.1);
        assert_eq!(v["kernel"]["agrees"], false);
        assert_eq!(
            v["verdict"]["action"], "DNAT",
            "the model's answer is unchanged"
        );
        break deleted;
    };

    // The drift check finds it and resyncs everything.
    let took = Lab::wait_for("verify to pass again", Duration::from_secs(15), || {
        run(&format!("verify {server}")).0 == 0
    });
    eprintln!("repaired {:?} after the deletion", deleted.elapsed());
    assert!(took < Duration::from_secs(15));
    assert!(
        c.logged("Kernel rules differ from the committed ones"),
        "the difference is logged"
    );
    let (_, text) = run(&format!("{explain} 172.30.0.10:80"));
    assert!(text.contains("Kernel: the kernel agrees"), "{text}");
    assert!(["pod1", "pod2"].contains(&who(&c.lab.tcp(&client, "172.30.0.10", 80)).as_str()));
    let metrics = c.http_get(10249, "/metrics");
    let drift: f64 = metrics
        .lines()
        .find(|l| l.starts_with("kpr_rules_drift_total{ip_family=\"IPv4\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(drift >= 1.0, "kpr_rules_drift_total: {drift}\n{metrics}");
    assert!(
        metrics.contains("kpr_rules_repaired_total 0"),
        "no flush repair yet"
    );
    let text = c.http_get(10249, "/debug/verify?output=text");
    assert!(
        text.contains("The kernel holds exactly the committed"),
        "{text}"
    );
    // A flush is the repair check's (within a second), counted apart.
    let flush = match mode {
        Mode::Nftables => "nft flush table ip kube-proxy-rs".to_owned(),
        mode => format!("{} -t nat -F", mode.tool(false, "")),
    };
    c.lab.sh(&c.node, &flush);
    Lab::wait_for(
        "the flush repair to be counted",
        Duration::from_secs(3),
        || {
            c.http_get(10249, "/metrics")
                .contains("kpr_rules_repaired_total 1")
        },
    );
    Lab::wait_for(
        "verify to pass after the repair",
        Duration::from_secs(3),
        || run(&format!("verify {server}")).0 == 0,
    );
}

/// Issue 15, "the kernel says no", iptables mode (both back ends).
mod refused_restore {
    #[test]
    fn iptables_nft() {
        super::a_refused_restore_is_counted_logged_retried_and_recovers(super::Mode::Iptables)
    }
    #[test]
    fn iptables_legacy() {
        super::a_refused_restore_is_counted_logged_retried_and_recovers(super::Mode::Legacy)
    }
}

/// Issue 15 in iptables mode: someone else's rule (nat OUTPUT, for an address no Service
/// uses) jumps to the service chain of `web2`, and `web2` is deleted, so the restore that
/// deletes its chain is refused. Each refusal is counted (`iptables_restore_failures_total`,
/// and `iptables_partial_restore_failures_total` once, for the partial sync that met it first)
/// and logged once, in words naming the chain; the full retries fail the same way and change
/// nothing (nat goes first in a restore, so a refused one commits nothing); `/livez` turns 503
/// once the change has waited 2 x syncPeriod. When the rule goes, the next retry deletes the
/// chain and the proxy is healthy again. Upstream behaves the same: it deletes stale chains in
/// the restore and fails every sync until nothing jumps to them.
fn a_refused_restore_is_counted_logged_retried_and_recovers(mode: Mode) {
    let Some(mut c) = Cluster::new("refused", mode) else {
        return;
    };
    c.pod("pod1", "10.0.0.11", None);
    let eps = |svc: &str| slice(svc, "IPv4", &[("10.0.0.11", "node-a")], WEB_EP_PORTS);
    c.manifest("web.yaml", &service("web", "172.30.0.10", "", WEB_PORTS));
    c.manifest("web-eps.yaml", &eps("web"));
    c.manifest("web2.yaml", &service("web2", "172.30.0.20", "", WEB_PORTS));
    c.manifest("web2-eps.yaml", &eps("web2"));
    let source = format!(
        "--manifests {} --iptables-sync-period 2s",
        c.dir.path().display()
    );
    c.start_proxy_with(&source);
    // Every table, without timestamps and packet counters.
    let save = || -> String {
        c.lab
            .sh(&c.node, &mode.tool(false, "-save"))
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.strip_prefix(':') {
                Some(decl) => decl
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let chain = save()
        .lines()
        .find(|l| l.contains("-d 172.30.0.20/32") && l.contains("-j KUBE-SVC-"))
        .and_then(|l| l.split("-j ").nth(1))
        .unwrap()
        .to_owned();
    let iptables = mode.tool(false, "");
    let foreign = format!("-t nat -A OUTPUT -d 198.51.100.1/32 -j {chain}");
    c.lab.sh(&c.node, &format!("{iptables} {foreign}"));
    let before = save();
    let failed = || {
        std::fs::read_to_string(&c.log)
            .unwrap_or_default()
            .matches("Sync failed, retrying as a full sync")
            .count()
    };
    let counter = |name: &str| -> u64 {
        let series = format!("kubeproxy_sync_proxy_rules_{name}{{ip_family=\"IPv4\"}} ");
        c.http_get(10249, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    c.remove("web2.yaml");
    c.remove("web2-eps.yaml");
    Lab::wait_for(
        "/livez 503 while restores fail",
        Duration::from_secs(12),
        || failed() >= 2 && c.http_get(10256, "/livez").starts_with("HTTP/1.1 503"),
    );
    assert_eq!(save(), before, "a refused restore changed the kernel");
    let why = match mode {
        Mode::Legacy => {
            "the tool gives no reason (iptables-legacy); a chain cannot be deleted while a rule jumps to it"
        }
        _ => "the chain is still in use: a rule that is not ours jumps to it",
    };
    assert!(
        c.logged("refused line")
            && c.logged(&format!("deleting chain {chain} in table nat: {why}")),
        "the log says what was refused, in words:\n{}",
        std::fs::read_to_string(&c.log).unwrap_or_default()
    );
    assert!(counter("iptables_restore_failures_total") >= 2);
    assert_eq!(counter("iptables_partial_restore_failures_total"), 1);
    c.lab.sh(
        &c.node,
        &format!("{iptables} {}", foreign.replace(" -A ", " -D ")),
    );
    Lab::wait_for("the retry to succeed", Duration::from_secs(5), || {
        c.logged("Sync succeeded after failing")
    });
    Lab::wait_for("/livez 200 again", Duration::from_secs(3), || {
        c.http_get(10256, "/livez").starts_with("HTTP/1.1 200")
    });
    assert!(!save().contains(&chain), "the stale chain is gone");
    assert!(!c.programmed("172.30.0.20"));
    assert_eq!(
        counter("iptables_restore_failures_total"),
        failed() as u64,
        "one log line per refused restore"
    );
    assert_eq!(
        who(&c.lab.tcp(&c.node, "172.30.0.10", 80)),
        "pod1",
        "the other Service works"
    );
}
