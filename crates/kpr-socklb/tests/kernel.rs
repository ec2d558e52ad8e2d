//! Socket-lb against the real kernel (root only): programs attached to a dedicated test cgroup,
//! clients in that cgroup and in a network namespace of their own, endpoints in another
//! namespace over a veth pair.
//!
//! Network safety: rules and traffic only inside namespaces this test creates; the programs
//! are attached to a test cgroup made here (never the machine's root cgroup) and removed at
//! the end, even on failure. The client is this test binary run again with
//! `KPR_SOCKLB_CLIENT` set (the `client_mode` test), so it needs no other tool.

use kpr_model::desired::{Endpoint, FamilyDesired, InternalAction, PortMap, ServicePortDesired};
use kpr_model::names::{IpFamily, Protocol, ServiceName, ServicePortName};
use kpr_model::node::LocalDetector;
use kpr_netlab::Lab;
use kpr_socklb::SocketLb;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const CLIENT_ENV: &str = "KPR_SOCKLB_CLIENT";

// ---- The client (runs inside the test cgroup and namespace) ----

/// Not a test of its own: the client the real test runs in its cgroup and namespace.
#[test]
fn client_mode() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let words: Vec<&str> = spec.split_whitespace().collect();
    let addr: SocketAddr = words[1].parse().expect("client address");
    let n: usize = words.get(2).map_or(1, |w| w.parse().expect("count"));
    if words[0] == "udpmany" {
        // One unconnected socket, n datagrams.
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(3))).ok();
        for _ in 0..n {
            sock.send_to(b"hi\n", addr).expect("send");
            let mut buf = [0u8; 256];
            let line = match sock.recv_from(&mut buf) {
                Ok((len, from)) => format!(
                    "ok from={from} reply={}",
                    String::from_utf8_lossy(&buf[..len]).trim()
                ),
                Err(e) => format!("err kind={:?}", e.kind()),
            };
            println!("RESULT {line}");
        }
        return;
    }
    let pause = Duration::from_millis(words.get(3).map_or(0, |w| w.parse().expect("pause ms")));
    for i in 0..n {
        if i > 0 {
            std::thread::sleep(pause);
        }
        let line = match words[0] {
            "tcp" => tcp(addr),
            "udp" => udp(addr, false),
            "udpc" => udp(addr, true),
            other => panic!("unknown client mode {other}"),
        };
        println!("RESULT {line}");
    }
}

fn tcp(addr: SocketAddr) -> String {
    let start = Instant::now();
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(s) => {
            let peer = s
                .peer_addr()
                .map_or_else(|e| e.to_string(), |p| p.to_string());
            s.set_read_timeout(Some(Duration::from_secs(3))).ok();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).ok();
            format!("ok peer={peer} reply={}", line.trim())
        }
        Err(e) => format!("err kind={:?} ms={}", e.kind(), start.elapsed().as_millis()),
    }
}

fn udp(addr: SocketAddr, connected: bool) -> String {
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(any).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let sent = if connected {
        sock.connect(addr).and_then(|()| sock.send(b"hi\n"))
    } else {
        sock.send_to(b"hi\n", addr)
    };
    if let Err(e) = sent {
        return format!("err kind={:?}", e.kind());
    }
    let mut buf = [0u8; 256];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => {
            let peer = sock
                .peer_addr()
                .map_or("none".to_owned(), |p| p.to_string());
            let reply = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
            format!("ok from={from} peer={peer} reply={reply}")
        }
        Err(e) => format!("err kind={:?}", e.kind()),
    }
}

// ---- Guards ----

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 directory of this test's own; on drop its processes move to the hierarchy's
/// root and it is removed.
struct TestCgroup {
    path: PathBuf,
    root: PathBuf,
}

impl TestCgroup {
    fn new() -> TestCgroup {
        let root = kpr_socklb::default_cgroup().expect("a cgroup v2 mount");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = root.join(format!("kpr-socklb-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).expect("create the test cgroup");
        TestCgroup { path, root }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "WARNING: could not remove the test cgroup {}",
            self.path.display()
        );
    }
}

/// A bpffs pin directory of this test's own, removed (programs detached) on drop.
struct TestPins(PathBuf);

impl TestPins {
    fn new() -> TestPins {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        TestPins(PathBuf::from(format!(
            "/sys/fs/bpf/kpr-socklb-test-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = SocketLb::remove(&self.0) {
            eprintln!("WARNING: removing {}: {e}", self.0.display());
        }
    }
}

fn skip_reason() -> Option<&'static str> {
    if !kpr_socklb::built_with_bpf() {
        return Some("kpr-socklb was built without BPF (install clang and libbpf-dev)");
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("needs root");
    }
    if kpr_socklb::default_cgroup().is_none() {
        return Some("no cgroup v2 mount");
    }
    None
}

// ---- The world ----

struct World {
    lab: Lab,
    cli: String,
    cg: TestCgroup,
}

impl World {
    /// Runs the client in the test cgroup and the client namespace; its RESULT lines.
    fn client(&self, spec: &str) -> Vec<String> {
        let exe = std::env::current_exe().expect("test binary");
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} {} --exact client_mode --nocapture --test-threads=1",
            self.cg.path.display(),
            self.cli,
            exe.display()
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .env(CLIENT_ENV, spec)
            .output()
            .expect("client runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<String> = stdout
            .lines()
            .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_owned()))
            .collect();
        assert!(
            !lines.is_empty(),
            "client `{spec}` printed no result: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    }

    fn one(&self, spec: &str) -> String {
        self.client(spec).remove(0)
    }
}

fn ep(addr: &str) -> Endpoint {
    Endpoint {
        addr: addr.parse().expect("endpoint"),
        local: false,
        ready: true,
    }
}

fn svc_port(
    svc: &str,
    vip: &str,
    port: u16,
    protocol: Protocol,
    eps: &[&str],
    affinity: Option<u32>,
) -> ServicePortDesired {
    let eps: Arc<[Endpoint]> = eps.iter().map(|a| ep(a)).collect();
    ServicePortDesired {
        name: ServicePortName::new(ServiceName::new("test", svc), "p", protocol),
        cluster_ip: vip.parse().expect("vip"),
        port,
        protocol,
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        firewall_allow: Vec::new(),
        affinity_timeout: affinity,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        endpoints: eps.clone(),
        has_any_endpoints: !eps.is_empty(),
        internal: if eps.is_empty() {
            InternalAction::Reject
        } else {
            InternalAction::Cluster
        },
        cluster_endpoints: eps,
        local_endpoints: Vec::new(),
        external: None,
    }
}

fn family(family: IpFamily, ports: &[ServicePortDesired]) -> FamilyDesired {
    let mut map = PortMap::new();
    for p in ports {
        map.insert(p.name.clone(), Arc::new(p.clone()));
    }
    FamilyDesired {
        family,
        detector: LocalDetector::None,
        masquerade_all: false,
        node_ip: None,
        ports: map,
        service_cidrs: Vec::new(),
    }
}

fn replies(lines: &[String]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| {
            assert!(l.starts_with("ok "), "{l}");
            l.rsplit("reply=").next().unwrap_or("").to_owned()
        })
        .collect()
}

// ---- The test ----

#[test]
fn socket_lb_balances_clusterip_traffic_without_nat() {
    if std::env::var(CLIENT_ENV).is_ok() {
        return;
    }
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED (socket-lb kernel test): {why}");
        return;
    }
    let Some(mut lab) = Lab::new("socket_lb_balances_clusterip_traffic_without_nat") else {
        return;
    };
    let cli = lab.netns("cli");
    let srv = lab.netns("srv");
    let (ea, eb) = lab.link(&cli, &srv);
    lab.sh(
        &cli,
        &format!(
            "ip addr add 10.0.0.1/24 dev {ea} && ip -6 addr add fd00::1/64 dev {ea} nodad && \
         ip addr add 172.30.0.10/32 dev lo && \
         nft add table inet kprt && \
         nft add chain inet kprt out '{{ type filter hook output priority 0; }}' && \
         nft add rule inet kprt out ct state new counter"
        ),
    );
    lab.sh(
        &srv,
        &format!(
            "ip addr add 10.0.0.2/24 dev {eb} && ip addr add 10.0.0.3/24 dev {eb} && \
         ip -6 addr add fd00::2/64 dev {eb} nodad"
        ),
    );
    for (ip, name) in [("10.0.0.2", "ep2"), ("10.0.0.3", "ep3")] {
        let tcp = format!("TCP-LISTEN:8080,bind={ip},fork,reuseaddr");
        lab.spawn(&srv, &["socat", &tcp, &format!("SYSTEM:echo {name}")]);
        let udp = format!("UDP-RECVFROM:5353,bind={ip},fork");
        // Read the datagram before answering: a reply written while socat still feeds the
        // datagram to an exited shell is lost to EPIPE.
        lab.spawn(
            &srv,
            &["socat", &udp, &format!("SYSTEM:read l; echo udp-{name}")],
        );
    }
    lab.spawn(
        &srv,
        &[
            "socat",
            "TCP6-LISTEN:8080,bind=[fd00::2],fork,reuseaddr",
            "SYSTEM:echo ep6",
        ],
    );
    lab.spawn(
        &srv,
        &[
            "socat",
            "UDP6-RECVFROM:5353,bind=[fd00::2],fork",
            "SYSTEM:read l; echo udp-ep6",
        ],
    );
    // Not a Service port: answered in the client's namespace at the VIP itself.
    lab.spawn(
        &cli,
        &[
            "socat",
            "TCP-LISTEN:81,bind=172.30.0.10,fork,reuseaddr",
            "SYSTEM:echo direct",
        ],
    );
    Lab::wait_for("servers", Duration::from_secs(10), || {
        lab.try_sh(
            &srv,
            "ss -ltn | grep -q 10.0.0.3:8080 && ss -ltn | grep -q '\\[fd00::2\\]:8080' \
             && ss -lun | grep -q '\\[fd00::2\\]:5353' && ss -lun | grep -q 10.0.0.2:5353 && ss -lun | grep -q 10.0.0.3:5353",
        )
        .status
        .success()
            && lab
                .try_sh(&cli, "ss -ltn | grep -q 172.30.0.10:81")
                .status
                .success()
    });

    let cg = TestCgroup::new();
    let pins = TestPins::new();
    let mut lb = SocketLb::start(&cg.path, &pins.0).expect("socket-lb starts");
    let web = svc_port(
        "web",
        "172.30.0.10",
        80,
        Protocol::Tcp,
        &["10.0.0.2:8080", "10.0.0.3:8080"],
        None,
    );
    let dns = svc_port(
        "dns",
        "172.30.0.10",
        53,
        Protocol::Udp,
        &["10.0.0.2:5353"],
        None,
    );
    let none = svc_port("none", "172.30.0.11", 80, Protocol::Tcp, &[], None);
    let dns2 = svc_port(
        "dns2",
        "172.30.0.13",
        53,
        Protocol::Udp,
        &["10.0.0.2:5353", "10.0.0.3:5353"],
        None,
    );
    let sticky = svc_port(
        "sticky",
        "172.30.0.12",
        80,
        Protocol::Tcp,
        &["10.0.0.2:8080", "10.0.0.3:8080"],
        Some(1),
    );
    let v4 = |ports: &[ServicePortDesired]| family(IpFamily::V4, ports);
    let stats = lb
        .sync(
            &v4(&[
                web.clone(),
                dns.clone(),
                none.clone(),
                sticky.clone(),
                dns2.clone(),
            ]),
            None,
        )
        .expect("full sync");
    assert!(stats.full);
    assert_eq!(stats.services_written, 5);
    assert_eq!(stats.backends_written, 7);
    let web6 = svc_port(
        "web",
        "fd00:30::10",
        80,
        Protocol::Tcp,
        &["[fd00::2]:8080"],
        None,
    );
    let dns6 = svc_port(
        "dns",
        "fd00:30::10",
        53,
        Protocol::Udp,
        &["[fd00::2]:5353"],
        None,
    );
    lb.sync(&family(IpFamily::V6, &[web6, dns6]), None)
        .expect("IPv6 sync");
    let world = World { lab, cli, cg };

    // TCP reaches an endpoint; getpeername() says the ClusterIP.
    let line = world.one("tcp 172.30.0.10:80");
    assert!(
        line.starts_with("ok peer=172.30.0.10:80 reply=ep"),
        "{line}"
    );
    // Both endpoints are used.
    let seen = replies(&world.client("tcp 172.30.0.10:80 30"));
    assert_eq!(seen, BTreeSet::from(["ep2".to_owned(), "ep3".to_owned()]));

    // No NAT: conntrack saw the flows addressed to the endpoints, never to the ClusterIP.
    let ct = world.lab.sh(&world.cli, "conntrack -L 2>/dev/null || true");
    assert!(ct.contains("dport=8080"), "conntrack shows the flows: {ct}");
    assert!(
        !ct.contains("172.30.0.10"),
        "no flow names the ClusterIP: {ct}"
    );

    // IPv6, and an IPv4-mapped address on an IPv6 socket.
    let line = world.one("tcp [fd00:30::10]:80");
    assert_eq!(line, "ok peer=[fd00:30::10]:80 reply=ep6");
    let line = world.one("tcp [::ffff:172.30.0.10]:80");
    assert!(
        line.starts_with("ok peer=[::ffff:172.30.0.10]:80 reply=ep"),
        "{line}"
    );

    // UDP, unconnected and connected: the reply comes from the ClusterIP.
    let line = world.one("udp 172.30.0.10:53");
    assert_eq!(line, "ok from=172.30.0.10:53 peer=none reply=udp-ep2");
    let line = world.one("udpc 172.30.0.10:53");
    assert_eq!(
        line,
        "ok from=172.30.0.10:53 peer=172.30.0.10:53 reply=udp-ep2"
    );

    // An unconnected UDP socket keeps its endpoint, as its conntrack flow would; the replies
    // come from the ClusterIP.
    let lines = world.client("udpmany 172.30.0.13:53 10");
    let seen = replies(&lines);
    assert_eq!(seen.len(), 1, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("ok from=172.30.0.13:53 ")),
        "{lines:?}"
    );

    // IPv6 UDP, unconnected and connected.
    let line = world.one("udp [fd00:30::10]:53");
    assert_eq!(line, "ok from=[fd00:30::10]:53 peer=none reply=udp-ep6");
    let line = world.one("udpc [fd00:30::10]:53");
    assert_eq!(
        line,
        "ok from=[fd00:30::10]:53 peer=[fd00:30::10]:53 reply=udp-ep6"
    );

    // No endpoints: refused at once.
    let line = world.one("tcp 172.30.0.11:80");
    assert!(line.starts_with("err kind=ConnectionRefused"), "{line}");
    let ms: u64 = line
        .rsplit("ms=")
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(ms < 500, "refused at once: {line}");

    // A port the Service does not have is left alone.
    assert_eq!(
        world.one("tcp 172.30.0.10:81"),
        "ok peer=172.30.0.10:81 reply=direct"
    );

    // Affinity sticks within the timeout...
    let seen = replies(&world.client("tcp 172.30.0.12:80 10"));
    assert_eq!(seen.len(), 1, "{seen:?}");
    // ... and a backend no longer in the list is not reused.
    let stuck = seen.into_iter().next().expect("one");
    let other = if stuck == "ep2" {
        "10.0.0.3:8080"
    } else {
        "10.0.0.2:8080"
    };
    let sticky_one = svc_port(
        "sticky",
        "172.30.0.12",
        80,
        Protocol::Tcp,
        &[other],
        Some(1),
    );
    let changed = [sticky.name.clone()];
    lb.sync(
        &v4(&[web.clone(), dns.clone(), none.clone(), sticky_one]),
        Some(&changed[..]),
    )
    .expect("partial sync");
    let seen = replies(&world.client("tcp 172.30.0.12:80 5"));
    assert_eq!(seen.len(), 1);
    assert_ne!(seen.into_iter().next(), Some(stuck.clone()));
    // ... and expires: one connection every 1.2 s, beyond the 1 s timeout, picks anew.
    lb.sync(
        &v4(&[web.clone(), dns.clone(), none.clone(), sticky.clone()]),
        Some(&changed[..]),
    )
    .expect("partial sync");
    let seen = replies(&world.client("tcp 172.30.0.12:80 10 1200"));
    assert_eq!(
        seen.len(),
        2,
        "after expiry both endpoints are chosen: {seen:?}"
    );

    // An endpoint removed: new connections avoid it.
    let web_one = svc_port(
        "web",
        "172.30.0.10",
        80,
        Protocol::Tcp,
        &["10.0.0.3:8080"],
        None,
    );
    let stats = lb
        .sync(
            &v4(&[web_one.clone(), dns.clone(), none.clone(), sticky.clone()]),
            Some(&[web.name.clone()][..]),
        )
        .expect("partial sync");
    assert!(!stats.full);
    assert_eq!(
        (
            stats.services_written,
            stats.backends_written,
            stats.backends_deleted
        ),
        (1, 1, 2)
    );
    let seen = replies(&world.client("tcp 172.30.0.10:80 20"));
    assert_eq!(seen, BTreeSet::from(["ep3".to_owned()]));

    // A restarted proxy takes the pinned maps over: balanced before its first sync, and that
    // sync changes nothing.
    let mut lb2 = SocketLb::start(&world.cg.path, &pins.0).expect("second start");
    drop(lb);
    assert_eq!(
        world.one("tcp 172.30.0.10:80"),
        "ok peer=172.30.0.10:80 reply=ep3"
    );
    let stats = lb2
        .sync(&v4(&[web_one, dns, none, sticky, dns2]), None)
        .expect("full sync after restart");
    assert_eq!(
        (
            stats.services_written,
            stats.backends_written,
            stats.backends_deleted,
            stats.services_deleted
        ),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    let links = std::fs::read_dir(&pins.0)
        .expect("pin dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("link_"))
        })
        .count();
    assert_eq!(links, 8);
    // The old links went with their pins: one program per hook on the cgroup.
    match Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&world.cg.path)
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            for hook in [
                "cgroup_inet4_connect",
                "cgroup_udp6_sendmsg",
                "cgroup_udp4_recvmsg",
                "cgroup_inet6_getpeername",
            ] {
                let n = text
                    .lines()
                    .filter(|l| l.split_whitespace().any(|w| w == hook))
                    .count();
                assert_eq!(n, 1, "one {hook} program after the restart:\n{text}");
            }
        }
        _ => eprintln!("NOTE: bpftool not found: the count of attached programs is not checked"),
    }

    // Removed: plain behaviour again (the VIP is on lo in the client's namespace and nothing
    // listens on port 80 there).
    assert!(SocketLb::remove(&pins.0).expect("remove"));
    assert!(!pins.0.exists());
    let line = world.one("tcp 172.30.0.10:80");
    assert!(line.starts_with("err kind=ConnectionRefused"), "{line}");
    drop(lb2);
}

#[test]
fn removing_what_is_not_there_is_fine() {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/kpr-socklb-none-{}",
        std::process::id()
    ));
    assert!(!SocketLb::remove(&dir).expect("nothing to remove"));
}

#[test]
fn a_missing_cgroup_is_an_error_and_leaves_nothing() {
    if std::env::var(CLIENT_ENV).is_ok() {
        return;
    }
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED (socket-lb kernel test): {why}");
        return;
    }
    let pins = TestPins::new();
    let root = kpr_socklb::default_cgroup().expect("cgroup v2");
    let missing = root.join(format!("kpr-socklb-missing-{}", std::process::id()));
    let err = SocketLb::start(&missing, &pins.0).expect_err("no such cgroup");
    assert!(matches!(err, kpr_socklb::Error::Cgroup { .. }), "{err}");
    assert!(!pins.0.exists());
}

#[test]
fn pinned_maps_of_another_layout_are_replaced() {
    if std::env::var(CLIENT_ENV).is_ok() {
        return;
    }
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED (socket-lb kernel test): {why}");
        return;
    }
    let cg = TestCgroup::new();
    let pins = TestPins::new();
    std::fs::create_dir_all(&pins.0).expect("pin dir");
    // A `services` map as another version of the proxy might have left it.
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pins.0.join("services"))
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "16", "name", "services",
        ])
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED (socket-lb kernel test): needs bpftool to pin a map of another layout");
        return;
    }
    let mut lb = SocketLb::start(&cg.path, &pins.0).expect("starts over the old map");
    let info = aya::maps::MapInfo::from_pin(pins.0.join("services")).expect("pinned");
    assert_eq!((info.key_size(), info.value_size()), (20, 16));
    let web = svc_port(
        "web",
        "172.30.0.10",
        80,
        Protocol::Tcp,
        &["10.0.0.2:8080"],
        None,
    );
    let stats = lb.sync(&family(IpFamily::V4, &[web]), None).expect("sync");
    assert_eq!((stats.services_written, stats.backends_written), (1, 1));
}
