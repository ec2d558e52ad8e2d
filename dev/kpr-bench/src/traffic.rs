//! The data plane: new TCP connections per second from a client namespace to one Service VIP
//! with 1 Service installed versus many (the target is the last of them in upstream's chain
//! order: the worst case for iptables), per mode.
//!
//! Client 203.0.113.7 -> node 203.0.113.1 (forwarding on, the rules installed by the library)
//! -> pod 10.0.0.11:8080. The load client is threads inside the client namespace connecting
//! as fast as they can for a bounded time and count, closing with SO_LINGER 0 (a RST: no
//! TIME_WAIT to exhaust the ports); the server is a thread inside the pod namespace accepting
//! and closing. Conntrack is flushed in the node before each run.

use crate::Mode;
use crate::cluster;
use crate::library;
use crate::netns::{self, Netns};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One Service count's result.
#[derive(Debug, Clone)]
pub(crate) struct Rate {
    /// Median over the rounds.
    pub(crate) per_sec: f64,
    pub(crate) failed: u64,
    /// Where the target's rule is.
    pub(crate) placement: String,
}

/// A node with `n` Services installed, a client and the target's pod, with its server running.
#[derive(Debug)]
struct World {
    // Declared before the namespaces: dropped (the server stopped) first.
    server: AcceptServer,
    vip: SocketAddr,
    placement: String,
    rates: Vec<f64>,
    failed: u64,
    _pod: Netns,
    client: Netns,
    node: Netns,
}

impl World {
    fn new(mode: Mode, n: u32, e: u32) -> World {
        let tag = format!("{}-{n}", mode.short());
        let node = Netns::new(&format!("dp-node-{tag}"));
        let client = Netns::new(&format!("dp-client-{tag}"));
        let pod = Netns::new(&format!("dp-pod-{tag}"));
        let (up_node, up_client) = netns::link(&node, &client);
        node.sh(&format!(
            "sysctl -qw net.ipv4.ip_forward=1 && ip addr add 203.0.113.1/24 dev {up_node} && ip addr add {}/32 dev {up_node} && ip route add default via 203.0.113.7",
            cluster::NODE_IP
        ));
        client.sh(&format!(
            "ip addr add 203.0.113.7/24 dev {up_client} && ip route add 172.16.0.0/12 via 203.0.113.1 && sysctl -qw net.ipv4.ip_local_port_range='1024 65535'"
        ));
        let (host, pod_if) = netns::link(&node, &pod);
        pod.sh(&format!(
            "ip addr add {ip}/32 dev {pod_if} && ip route add 10.0.0.1 dev {pod_if} scope link && ip route add default via 10.0.0.1 dev {pod_if}",
            ip = cluster::POD_IP
        ));
        node.sh(&format!(
            "ip addr add 10.0.0.1/32 dev {host} && ip route add {}/32 dev {host}",
            cluster::POD_IP
        ));
        let target = n - 1;
        let placement = library::install(mode, &node, n, e, target);

        let server = AcceptServer::start(&pod, cluster::POD_PORT);
        let vip = SocketAddr::from((cluster::cluster_ip(target), cluster::SERVICE_PORT));
        // Correctness: the Service answers through the rules.
        let reached = client.run_in(|| {
            (0..50).any(|_| {
                let ok = connect(vip).is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(100));
                }
                ok
            })
        });
        assert!(reached, "no connection to {vip} through the {mode:?} rules");
        World {
            server,
            vip,
            placement,
            rates: Vec::new(),
            failed: 0,
            _pod: pod,
            client,
            node,
        }
    }

    /// One round: conntrack flushed, then `threads` clients for `run_for`.
    fn round(&mut self, run_for: Duration, threads: usize) {
        self.node.sh("conntrack -F 2>/dev/null || true");
        let stop = AtomicBool::new(false);
        let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        // Bounded in count as well as time.
        let max = 5_000_000u64;
        let vip = self.vip;
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    netns::enter(self.client.name());
                    while !stop.load(Ordering::Relaxed) {
                        if start.elapsed() >= run_for || ok.load(Ordering::Relaxed) >= max {
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                        match connect(vip) {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
            }
        });
        let took = start.elapsed();
        self.rates
            .push(ok.load(Ordering::Relaxed) as f64 / took.as_secs_f64());
        self.failed += failed.load(Ordering::Relaxed);
    }

    fn finish(mut self) -> Rate {
        assert!(self.server.stop() > 0, "the pod accepted connections");
        let mut r = std::mem::take(&mut self.rates);
        r.sort_by(f64::total_cmp);
        Rate {
            per_sec: r.get(r.len() / 2).copied().unwrap_or(0.0),
            failed: self.failed,
            placement: std::mem::take(&mut self.placement),
        }
    }
}

/// Connections per second to the last of each count of Services (`e` endpoints each): every
/// count's world is built first, then `rounds` rounds of `run_for` go through them in turn
/// (drift on a shared machine hits them all alike); the median round is reported.
pub(crate) fn measure(
    mode: Mode,
    counts: &[u32],
    e: u32,
    run_for: Duration,
    rounds: usize,
    threads: usize,
) -> Vec<(u32, Rate)> {
    let mut worlds: Vec<(u32, World)> = counts
        .iter()
        .map(|&n| {
            eprintln!("   installing {n} Services ({})", mode.flag());
            (n, World::new(mode, n, e))
        })
        .collect();
    for _ in 0..rounds {
        for (_, w) in &mut worlds {
            w.round(run_for, threads);
        }
    }
    worlds.into_iter().map(|(n, w)| (n, w.finish())).collect()
}

/// A server in a pod namespace that accepts connections and closes them, counting, until it
/// is stopped (or dropped).
#[derive(Debug)]
pub(crate) struct AcceptServer {
    stopper: TcpListener,
    thread: Option<std::thread::JoinHandle<()>>,
    accepted: Arc<AtomicU64>,
}

impl AcceptServer {
    pub(crate) fn start(pod: &Netns, port: u16) -> AcceptServer {
        let listener = pod.run_in(|| listen(port));
        let stopper = listener.try_clone().expect("clone the listener");
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = {
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                while let Ok((s, _)) = listener.accept() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
            })
        };
        AcceptServer {
            stopper,
            thread: Some(thread),
            accepted,
        }
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting (shuts the listener down and joins the thread); returns how many
    /// connections it accepted.
    pub(crate) fn stop(&mut self) -> u64 {
        let _ = rustix::net::shutdown(&self.stopper, rustix::net::Shutdown::Read);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.accepted()
    }
}

impl Drop for AcceptServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listener with a long accept queue.
fn listen(port: u16) -> TcpListener {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_reuseaddr(&fd, true).expect("SO_REUSEADDR");
    rustix::net::bind(&fd, &SocketAddr::from(([0, 0, 0, 0], port))).expect("bind");
    rustix::net::listen(&fd, 4096).expect("listen");
    TcpListener::from(fd)
}

/// One connection: handshake, then a RST.
fn connect(to: SocketAddr) -> std::io::Result<()> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO))?;
    drop(s);
    Ok(())
}
