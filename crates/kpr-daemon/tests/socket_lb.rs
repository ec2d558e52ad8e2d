//! Issue 18, through the real binary: `kube-proxy-rs --proxy-mode nftables --socket-lb` in a
//! node namespace, with its programs attached to a cgroup of the test's own (never the
//! machine's root cgroup) and its maps pinned in a directory of the test's own. Processes in
//! that cgroup reach ClusterIPs with no NAT at all (conntrack sees the endpoint as the
//! destination); everything else still goes through the nftables rules; turning the flag off
//! or `--cleanup` removes the programs and maps. Without root, or in a binary built without
//! BPF support (no clang), the tests print SKIPPED.
#![allow(clippy::unwrap_used)]

use kpr_testkit::lab::{Lab, Reply, TestCgroup};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDRs: [10.0.0.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";

fn service(name: &str, ip: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n{extra}  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

fn slice(svc: &str, eps: &[&str]) -> String {
    let eps: String = eps
        .iter()
        .map(|ip| {
            format!("- {{addresses: ['{ip}'], conditions: {{ready: true}}, nodeName: node-a}}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints:\n{eps}ports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\n"
    )
}

/// A bpf filesystem of the test's own (outside `/sys`, which `ip netns exec` mounts anew, so
/// the proxy in the node namespace sees it), where the proxy pins its maps and links; removed
/// with them even when the test fails.
struct Pins {
    mount: PathBuf,
    dir: PathBuf,
}

impl Pins {
    fn new(name: &str) -> Pins {
        let mount = std::env::temp_dir().join(format!("{name}-bpffs"));
        std::fs::create_dir_all(&mount).unwrap();
        kpr_testkit::lab::mount_fs("bpf", &mount).unwrap();
        let dir = mount.join("socklb");
        Pins { mount, dir }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = kpr_socklb::SocketLb::remove(&self.dir);
        kpr_testkit::lab::unmount(&self.mount);
    }
}

struct Node {
    // Dropped in this order: the proxy and clients first (the lab), then the maps, then the
    // cgroup.
    lab: Lab,
    pins: Pins,
    cgroup: TestCgroup,
    node: String,
    client: String,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Node {
    fn new(test: &str) -> Option<Node> {
        if !kpr_socklb::built_with_bpf() {
            eprintln!(
                "SKIPPED: {test}: this build has no BPF programs (clang and libbpf-dev were not installed)"
            );
            return None;
        }
        let mut lab = Lab::new(test)?;
        let cgroup = TestCgroup::new(test).unwrap();
        let pins = Pins::new(lab.prefix());
        let node = lab.netns("node");
        let client = lab.netns("client");
        let (up_node, up_client) = lab.link(&node, &client);
        lab.sh(&node, &format!("sysctl -qw net.ipv4.ip_forward=1 && ip addr add 203.0.113.1/24 dev {up_node} && ip addr add 192.168.0.2/32 dev {up_node}"));
        lab.sh(
            &client,
            &format!(
                "ip addr add 203.0.113.7/24 dev {up_client} && ip route add 192.168.0.0/24 via 203.0.113.1"
            ),
        );
        lab.sh(&node, "ip route add default via 203.0.113.7");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.yaml"), NODE_YAML).unwrap();
        let log = dir.path().join("proxy.log");
        let mut n = Node {
            lab,
            pins,
            cgroup,
            node,
            client,
            dir,
            log,
        };
        for (name, ip) in [("pod-a", "10.0.0.10"), ("pod-b", "10.0.0.11")] {
            n.pod(name, ip);
        }
        Some(n)
    }

    /// A pod serving TCP 8080 and UDP 5353, each reply `<name> <peer address>`.
    fn pod(&mut self, name: &str, ip: &str) {
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
        for server in [
            format!("socat -t5 TCP4-LISTEN:8080,fork,reuseaddr {reply}"),
            format!("socat -t5 UDP4-RECVFROM:5353,fork {reply}"),
        ] {
            self.lab.spawn(&ns, &["sh", "-c", &server]);
        }
        Lab::wait_for("pod servers", Duration::from_secs(5), || {
            self.lab.sh(&ns, "ss -ltn").contains(":8080")
                && self.lab.sh(&ns, "ss -lun").contains(":5353")
        });
    }

    fn manifest(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.path().join(file), yaml).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn syncs(&self) -> usize {
        self.log().matches("Synced nftables rules").count()
    }

    /// Starts the proxy (with socket-lb when `socket_lb`) and waits for its first sync.
    fn start(&mut self, socket_lb: bool) -> u32 {
        let cgroup = self.cgroup.path().to_owned();
        self.start_with(socket_lb, &cgroup)
    }

    /// [`Node::start`], attaching to `cgroup`.
    fn start_with(&mut self, socket_lb: bool, cgroup: &Path) -> u32 {
        let lb = if socket_lb {
            format!(
                "--socket-lb --socket-lb-cgroup {} --socket-lb-pin-dir {}",
                cgroup.display(),
                self.pins.dir.display()
            )
        } else {
            format!("--socket-lb-pin-dir {}", self.pins.dir.display())
        };
        let cmd = format!(
            "exec {} --proxy-mode nftables --manifests {} --hostname-override node-a --cluster-cidr 10.0.0.0/8 --nodeport-addresses primary --iptables-min-sync-period 0s {lb} -v 4 2>>{}",
            env!("CARGO_BIN_EXE_kube-proxy-rs"),
            self.dir.path().display(),
            self.log.display()
        );
        let before = self.syncs();
        let node = self.node.clone();
        let pid = self.lab.spawn(&node, &["sh", "-c", &cmd]).id();
        Lab::wait_for("the first sync", Duration::from_secs(10), || {
            self.syncs() > before
        });
        pid
    }

    fn stop(&self, pid: u32) {
        let stops = || self.log().matches("Shutting down").count();
        let before = stops();
        self.lab.sh(&self.node, &format!("kill -TERM {pid}"));
        Lab::wait_for("the proxy to stop", Duration::from_secs(5), || {
            stops() > before
        });
    }

    /// Writes a manifest and waits for the sync of it.
    fn apply(&self, file: &str, yaml: &str) {
        let before = self.syncs();
        self.manifest(file, yaml);
        Lab::wait_for("a sync after the change", Duration::from_secs(5), || {
            self.syncs() > before
        });
    }

    /// Conntrack entries of the node whose original destination is `ip`.
    fn conntrack_to(&self, ip: &str) -> usize {
        let out = self
            .lab
            .try_sh(&self.node, &format!("conntrack -L -d {ip} 2>/dev/null"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    }

    fn flush_conntrack(&self) {
        let _ = self.lab.try_sh(&self.node, "conntrack -F 2>/dev/null");
    }

    fn cg(&self) -> &Path {
        self.cgroup.path()
    }
}

fn pod_of(r: &Reply) -> String {
    match r {
        Reply::Ok(line) => line.split_whitespace().next().unwrap_or("").to_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn socket_lb_balances_at_connect_without_nat_and_nftables_keeps_the_rest() {
    let Some(mut n) = Node::new("socklb") else {
        return;
    };
    n.manifest(
        "web.yaml",
        &service("web", "172.30.0.10", "  type: NodePort\n"),
    );
    n.manifest("web-eps.yaml", &slice("web", &["10.0.0.10", "10.0.0.11"]));
    n.manifest("empty.yaml", &service("empty", "172.30.0.20", ""));
    let pid = n.start(true);
    assert!(
        n.log().contains("Socket-level load balancing on"),
        "socket-lb started: {}",
        n.log()
    );
    assert!(n.pins.dir.exists(), "maps and links pinned");

    // From the node's processes in the cgroup: TCP reaches both pods, with no NAT: conntrack
    // never sees the ClusterIP as a destination.
    n.flush_conntrack();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80);
        seen.insert(pod_of(&r));
    }
    assert_eq!(
        seen,
        ["pod-a", "pod-b"].map(String::from).into(),
        "TCP spread over both endpoints"
    );
    assert_eq!(n.conntrack_to("172.30.0.10"), 0, "no flow to the ClusterIP");
    assert!(n.conntrack_to("10.0.0.10") + n.conntrack_to("10.0.0.11") > 0);
    // UDP (a connected socket) too.
    // (A reply slower than the client's 2 s wait, on a loaded machine, is asked again.)
    let udp = (0..3)
        .map(|_| n.lab.udp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 53))
        .find(|r| pod_of(r).starts_with("pod-"));
    assert!(udp.is_some(), "UDP answered");
    assert_eq!(
        n.conntrack_to("172.30.0.10"),
        0,
        "no UDP flow to the ClusterIP"
    );
    // No endpoints: refused at once.
    let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.20", 80);
    assert_eq!(r, Reply::Refused);
    // A port the Service does not have is left alone (nothing listens: the nftables rules
    // have no such port either, so the connection times out or is refused, never balanced).
    let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 81);
    assert!(!matches!(r, Reply::Ok(_)), "{r:?}");

    // Outside the cgroup, the same node goes through the nftables rules (DNAT: conntrack's
    // original destination is the ClusterIP); from outside the node, the NodePort works.
    let r = n.lab.tcp(&n.node, "172.30.0.10", 80);
    assert!(pod_of(&r).starts_with("pod-"), "{r:?}");
    assert!(n.conntrack_to("172.30.0.10") > 0, "nftables DNATed it");
    let r = n.lab.tcp(&n.client, "192.168.0.2", 30080);
    assert!(
        pod_of(&r).starts_with("pod-"),
        "NodePort from outside: {r:?}"
    );

    // explain says which connections the socket hooks take.
    let out = n.lab.try_sh(
        &n.node,
        &format!(
            "{} explain --server http://127.0.0.1:10249 --from 10.0.0.10 --to 172.30.0.10:80 2>&1",
            env!("CARGO_BIN_EXE_kube-proxy-rs")
        ),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Socket-lb: a connect() or sendmsg() from a process in cgroup")
            && text.contains(&n.cg().display().to_string()),
        "{text}"
    );

    // An endpoint removed: new connections avoid it.
    n.apply("web-eps.yaml", &slice("web", &["10.0.0.10"]));
    for _ in 0..10 {
        let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80);
        assert_eq!(pod_of(&r), "pod-a");
    }

    // The flag off: the next run removes the programs and maps, and the cgroup's traffic
    // goes through the nftables rules again.
    n.stop(pid);
    let pid = n.start(false);
    assert!(
        n.log()
            .contains("Removed the socket-lb programs and maps an earlier run attached"),
        "{}",
        n.log()
    );
    assert!(!n.pins.dir.exists(), "nothing left pinned");
    n.flush_conntrack();
    let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80);
    assert_eq!(pod_of(&r), "pod-a");
    assert!(n.conntrack_to("172.30.0.10") > 0, "DNAT again");
    n.stop(pid);
}

#[test]
fn cleanup_removes_the_socket_lb_programs_and_maps() {
    let Some(mut n) = Node::new("socklb-clean") else {
        return;
    };
    n.manifest("web.yaml", &service("web", "172.30.0.10", ""));
    n.manifest("web-eps.yaml", &slice("web", &["10.0.0.10"]));
    let pid = n.start(true);
    assert!(n.pins.dir.exists());
    assert_eq!(
        pod_of(&n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80)),
        "pod-a"
    );
    // A restart keeps balancing: the new process takes over the pinned maps.
    n.stop(pid);
    let pid = n.start(true);
    assert_eq!(
        pod_of(&n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80)),
        "pod-a"
    );
    n.stop(pid);
    let out = n.lab.try_sh(
        &n.node,
        &format!(
            "{} --cleanup --socket-lb-pin-dir {} 2>&1",
            env!("CARGO_BIN_EXE_kube-proxy-rs"),
            n.pins.dir.display()
        ),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!n.pins.dir.exists(), "--cleanup removed the pins: {text}");
    // Without the programs (and without our table), nothing balances the ClusterIP.
    let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80);
    assert!(!matches!(r, Reply::Ok(_)), "{r:?}");
}

/// A cgroup the programs cannot be attached to (as a kernel without the hooks): one warning,
/// and plain nftables handles the traffic; the proxy keeps running.
#[test]
fn a_failed_attach_logs_one_warning_and_runs_plain_nftables() {
    let Some(mut n) = Node::new("socklb-fail") else {
        return;
    };
    n.manifest("web.yaml", &service("web", "172.30.0.10", ""));
    n.manifest("web-eps.yaml", &slice("web", &["10.0.0.10"]));
    let missing = n.cg().join("not-there");
    let pid = n.start_with(true, &missing);
    assert_eq!(
        n.log()
            .matches("Socket-level load balancing is off")
            .count(),
        1,
        "{}",
        n.log()
    );
    n.flush_conntrack();
    let r = n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80);
    assert_eq!(pod_of(&r), "pod-a");
    assert!(n.conntrack_to("172.30.0.10") > 0, "plain nftables DNAT");
    n.apply("web-eps.yaml", &slice("web", &["10.0.0.11"]));
    assert_eq!(
        pod_of(&n.lab.tcp_in_cgroup(&n.node, n.cg(), "172.30.0.10", 80)),
        "pod-b"
    );
    assert_eq!(
        n.log()
            .matches("Socket-level load balancing is off")
            .count(),
        1
    );
    assert!(!n.pins.dir.exists(), "nothing pinned");
    n.stop(pid);
}
