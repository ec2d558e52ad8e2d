//! `kube-proxy-rs sandbox`: a small world of network namespaces (a node, three pods with real
//! servers, a client pod, an outside client) where the real kube-proxy-rs runs in the node with
//! a Service and its EndpointSlice as manifests; real TCP connections go to the ClusterIP and
//! the NodePort, the answers show which pod served each and the spread; then the manifest is
//! edited live and the traffic follows. Everything it creates is removed at the end, also on
//! Ctrl-C. It succeeds only when traffic really reached every pod.

use kpr_netlab::{Lab, Reply};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PODS: [(&str, &str); 3] = [
    ("pod-a", "10.244.0.11"),
    ("pod-b", "10.244.0.12"),
    ("pod-c", "10.244.0.13"),
];
const CLUSTER_IP: &str = "10.96.0.10";
const NODE_IP: &str = "192.168.0.2";
const NODE_PORT: u16 = 30080;
const REQUESTS: usize = 30;

fn service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  ports: [{{name: http, port: 80, protocol: TCP, nodePort: {NODE_PORT}}}]\n"
    )
}

fn slice(pods: &[(&str, &str)]) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: hello-1, namespace: default, labels: {kubernetes.io/service-name: hello}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n",
    );
    for (_, ip) in pods {
        s.push_str(&format!(
            "  - {{addresses: [\"{ip}\"], nodeName: sandbox-node, conditions: {{ready: true}}}}\n"
        ));
    }
    s
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: sandbox-node}\nspec: {podCIDRs: [10.244.0.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n";

/// Runs the sandbox; `Ok(true)` when every pod answered as expected.
pub fn run(exe: &Path) -> anyhow::Result<bool> {
    let Some(mut lab) = Lab::new("kube-proxy-rs sandbox") else {
        anyhow::bail!("the sandbox needs root, iproute2 and socat (sudo kube-proxy-rs sandbox)");
    };
    let prefix = lab.prefix().to_owned();
    let dir = std::env::temp_dir().join(format!("kube-proxy-rs-sandbox-{}", std::process::id()));
    on_interrupt(prefix, dir.clone());
    let result = world(&mut lab, exe, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
    println!("\nRemoved every namespace, process and file the sandbox created.");
    result
}

/// Ctrl-C: remove what the sandbox created, then exit 130.
fn on_interrupt(prefix: String, dir: PathBuf) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            eprintln!("\nInterrupted: removing the sandbox");
            kpr_netlab::remove_namespaces(&prefix);
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(130);
        }
    });
}

fn world(lab: &mut Lab, exe: &Path, dir: &Path) -> anyhow::Result<bool> {
    println!(
        "kube-proxy-rs sandbox: a node, three pods and two clients, each in a network namespace of its own\n"
    );
    let node = lab.netns("node");
    let outside = lab.netns("outside");
    let (up_node, up_outside) = lab.link(&node, &outside);
    lab.sh(&node, &format!("sysctl -qw net.ipv4.ip_forward=1 && ip addr add 203.0.113.1/24 dev {up_node} && ip addr add {NODE_IP}/32 dev {up_node}"));
    lab.sh(&outside, &format!("ip addr add 203.0.113.7/24 dev {up_outside} && ip route add {NODE_IP}/32 via 203.0.113.1"));
    let client = pod(lab, &node, "client", "10.244.0.5", false);
    for (name, ip) in PODS {
        pod(lab, &node, name, ip, true);
    }
    println!(
        "  node        {node} (node IP {NODE_IP}), running kube-proxy-rs --proxy-mode nftables"
    );
    for (name, ip) in PODS {
        println!("  {name}       {ip}, a TCP server on :8080 answering with its name");
    }
    println!("  client pod  10.244.0.5; outside client 203.0.113.7\n");

    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("node.yaml"), NODE)?;
    std::fs::write(dir.join("service.yaml"), service())?;
    std::fs::write(dir.join("slice.yaml"), slice(&PODS))?;
    println!(
        "Service default/hello: ClusterIP {CLUSTER_IP}:80, NodePort {NODE_PORT}, endpoints pod-a pod-b pod-c (manifests in {})",
        dir.display()
    );
    let exe = exe.display().to_string();
    let dir_s = dir.display().to_string();
    lab.spawn(
        &node,
        &[
            &exe,
            "--proxy-mode",
            "nftables",
            "--manifests",
            &dir_s,
            "--hostname-override",
            "sandbox-node",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--nodeport-addresses",
            "primary",
            "--iptables-min-sync-period",
            "0s",
        ],
    );
    let start = Instant::now();
    while !matches!(lab.tcp(&client, CLUSTER_IP, 80), Reply::Ok(_)) {
        if start.elapsed() > Duration::from_secs(15) {
            anyhow::bail!("kube-proxy-rs did not program the Service within 15 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "kube-proxy-rs programmed the rules in {:?}\n",
        start.elapsed()
    );

    let all: Vec<&str> = PODS.iter().map(|(n, _)| *n).collect();
    let cluster = round(
        lab,
        &client,
        CLUSTER_IP,
        80,
        "client pod -> ClusterIP 10.96.0.10:80",
    );
    let nodeport = round(
        lab,
        &outside,
        NODE_IP,
        NODE_PORT,
        "outside client -> NodePort 192.168.0.2:30080",
    );

    println!("Editing the EndpointSlice live: pod-c removed");
    std::fs::write(dir.join("slice.yaml"), slice(&PODS[..2]))?;
    let start = Instant::now();
    let mut after = round_quiet(lab, &client, CLUSTER_IP, 80);
    while after.contains_key("pod-c") && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        after = round_quiet(lab, &client, CLUSTER_IP, 80);
    }
    show("client pod -> ClusterIP after the edit", &after);

    let every = |t: &BTreeMap<String, usize>, want: &[&str]| {
        want.iter().all(|p| t.contains_key(*p)) && t.keys().all(|k| want.contains(&k.as_str()))
    };
    let ok = every(&cluster, &all) && every(&nodeport, &all) && every(&after, &all[..2]);
    if ok {
        println!(
            "\nEvery pod answered through the ClusterIP and the NodePort, and after the edit only pod-a and pod-b did."
        );
    } else {
        println!("\nNot every pod answered as expected (see above).");
    }
    Ok(ok)
}

/// A pod namespace routed via the node; with `serve`, a server on :8080 answering its name.
fn pod(lab: &mut Lab, node: &str, name: &str, ip: &str, serve: bool) -> String {
    let ns = lab.netns(name);
    let (host, inside) = lab.link(node, &ns);
    lab.sh(&ns, &format!("ip addr add {ip}/32 dev {inside} && ip route add 10.244.0.1 dev {inside} scope link && ip route add default via 10.244.0.1 dev {inside}"));
    lab.sh(
        node,
        &format!(
            "ip addr add 10.244.0.1/32 dev {host} 2>/dev/null; ip route add {ip}/32 dev {host}"
        ),
    );
    if serve {
        let reply = format!("SYSTEM:'echo {name}'");
        lab.spawn(
            &ns,
            &[
                "sh",
                "-c",
                &format!("socat -t5 TCP4-LISTEN:8080,fork,reuseaddr {reply}"),
            ],
        );
        let start = Instant::now();
        while !lab.sh(&ns, "ss -ltn").contains(":8080") && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    ns
}

fn round_quiet(lab: &Lab, from: &str, ip: &str, port: u16) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for _ in 0..REQUESTS {
        let who = match lab.tcp(from, ip, port) {
            Reply::Ok(line) => line.split_whitespace().next().unwrap_or("?").to_owned(),
            other => format!("({other:?})"),
        };
        *tally.entry(who).or_insert(0) += 1;
    }
    tally
}

fn round(lab: &Lab, from: &str, ip: &str, port: u16, what: &str) -> BTreeMap<String, usize> {
    let tally = round_quiet(lab, from, ip, port);
    show(what, &tally);
    tally
}

fn show(what: &str, tally: &BTreeMap<String, usize>) {
    println!("{what}: {REQUESTS} new connections");
    for (who, n) in tally {
        println!("  {who:<8} {n:>3}  {}", "#".repeat(*n));
    }
    println!();
}
