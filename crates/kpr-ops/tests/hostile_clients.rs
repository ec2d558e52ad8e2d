//! Servers facing the network hold up (issue 15): the `/healthz` server and a healthCheckNodePort
//! server under 10,000 idle connections, slowloris, oversized and malformed requests and a flood
//! keep answering, close what they must, and hold their file descriptors and memory.
//!
//! Each server runs on a current-thread runtime of its own thread, as in the daemon; clients are
//! std `TcpStream`s in threads. Traffic goes to 127.0.0.1 only. Every test prints its figures
//! (`cargo test -p kpr-ops --test hostile_clients -- --nocapture`). Timing bounds are generous.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use kpr_ops::health::HealthModel;
use kpr_ops::listen::{Connections, Limits, MAX_CONNECTIONS};
use kpr_ops::server::Health;
use kpr_ops::service_health::{ServiceHealth, Wanted};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// One test at a time: they count the process's descriptors and memory.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `/healthz` and `/livez` (kpr_ops::server).
    Healthz,
    /// One healthCheckNodePort (kpr_ops::service_health), 2 local endpoints.
    NodePort,
    /// A router of a test's own on `kpr_ops::listen::serve`.
    Router(fn() -> axum::Router),
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Healthz, Kind::NodePort];

    fn path(self) -> &'static str {
        match self {
            Kind::Healthz => "/healthz",
            Kind::NodePort | Kind::Router(_) => "/",
        }
    }

    /// What a correct 200 answer's body says.
    fn healthy_body(self) -> &'static str {
        match self {
            Kind::Healthz => r#""nodeEligible":true,"healthy":true"#,
            Kind::NodePort => "\"localEndpoints\": 2,",
            Kind::Router(_) => "",
        }
    }
}

/// A server on 127.0.0.1 with a connection cap of its own.
struct Server {
    kind: Kind,
    addr: SocketAddr,
    conns: Arc<Connections>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(kind: Kind, cap: usize) -> Server {
        let limits = Limits {
            connections: Connections::new(cap),
            ..Limits::health()
        };
        Server::start_with(kind, limits)
    }

    fn start_with(kind: Kind, limits: Limits) -> Server {
        let conns = limits.connections.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let model =
                    HealthModel::new(&["IPv4"], SystemTime::now(), Duration::from_secs(600));
                let health = Health::new(model);
                health.set_node_eligible(true);
                let stopped = async {
                    let _ = stopped.await;
                };
                match kind {
                    Kind::Router(make) => {
                        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
                        let l = kpr_ops::listen::bind(any).unwrap();
                        tx.send(l.local_addr().unwrap()).unwrap();
                        kpr_ops::listen::serve(l, make(), limits, stopped)
                            .await
                            .unwrap();
                    }
                    Kind::Healthz => {
                        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
                        let l = kpr_ops::listen::bind(any).unwrap();
                        tx.send(l.local_addr().unwrap()).unwrap();
                        kpr_ops::server::serve_with(l, health, limits, stopped)
                            .await
                            .unwrap();
                    }
                    Kind::NodePort => {
                        let port = std::net::TcpListener::bind("127.0.0.1:0")
                            .unwrap()
                            .local_addr()
                            .unwrap()
                            .port();
                        let mut servers = ServiceHealth::with_limits(health, limits);
                        let wanted = BTreeMap::from([(
                            port,
                            Wanted {
                                namespace: "ns".into(),
                                name: "lb".into(),
                                local_endpoints: 2,
                            },
                        )]);
                        let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
                        servers.sync(&wanted, &localhost);
                        assert_eq!(servers.ports(), [port], "the port was free a moment ago");
                        tx.send(SocketAddr::new(localhost[0], port)).unwrap();
                        stopped.await;
                        servers.sync(&BTreeMap::new(), &localhost);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        });
        let addr = rx.recv().unwrap();
        Server {
            kind,
            addr,
            conns,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A fresh connection's GET of the health path: the time to the whole answer, and it.
    fn probe(&self) -> (Duration, String) {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
            self.kind.path()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (start.elapsed(), out)
    }

    /// Probes, asserts upstream's healthy answer, returns how long it took.
    fn probe_ok(&self) -> Duration {
        let (took, answer) = self.probe();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains(self.kind.healthy_body()), "{answer}");
        assert!(
            answer
                .to_lowercase()
                .contains("content-type: application/json"),
            "{answer}"
        );
        took
    }

    /// Waits (up to `within`) until the server holds at most `n` connections.
    fn wait_open_at_most(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let open = self.conns.open();
            if open <= n || Instant::now() > deadline {
                return open;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let panicked = t.join().is_err();
            if !std::thread::panicking() {
                assert!(!panicked, "the server's thread panicked");
            }
        }
    }
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit; returns the limit now.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            eprintln!("could not raise RLIMIT_NOFILE to its hard limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Opens `n` connections from 2 threads, sending nothing; also returns how many connects took
/// over 500 ms (a SYN dropped on a full accept queue, retried after a second).
fn open_idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let count = n / 2 + usize::from(t < n % 2);
            std::thread::spawn(move || {
                let mut slow = 0;
                let conns = (0..count)
                    .map(|_| {
                        let start = Instant::now();
                        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
                        slow += usize::from(start.elapsed() > Duration::from_millis(500));
                        c
                    })
                    .collect::<Vec<_>>();
                (conns, slow)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut slow = 0;
    for t in threads {
        let (c, s) = t.join().unwrap();
        all.extend(c);
        slow += s;
    }
    (all, slow)
}

/// Reads one response from a keep-alive connection: its status and body.
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `raw` on a fresh connection and reads until the server closes it: what came back
/// and how long the close took (from the first byte sent).
fn exchange(addr: SocketAddr, raw: &[u8]) -> (String, Duration) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let start = Instant::now();
    // The server may answer and close before it has read everything: ignore a failed write.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the answer: the server closed with our bytes unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e} after {:?}", start.elapsed()),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

#[test]
fn ten_thousand_idle_connections_do_not_starve_a_probe() {
    let _heavy = heavy();
    let limit = raise_fd_limit();
    for kind in Kind::ALL {
        let server = Server::start(kind, MAX_CONNECTIONS);
        server.probe_ok();
        let (fds0, rss0) = (open_fds(), rss_kib());
        // Each client socket is a descriptor of this process; the server holds at most its cap.
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(fds0 + MAX_CONNECTIONS + 200);
        let n = room.min(10_000);
        if n < 10_000 {
            eprintln!(
                "!! {kind:?}: RLIMIT_NOFILE's hard limit is {limit}: testing with {n} idle connections instead of 10,000"
            );
        }
        let start = Instant::now();
        let (idle, slow, during) = std::thread::scope(|scope| {
            let opening = scope.spawn(|| open_idle(server.addr, n));
            // A load balancer probing while they connect.
            let mut during = Duration::ZERO;
            while !opening.is_finished() {
                during = during.max(server.probe_ok());
                std::thread::sleep(Duration::from_millis(50));
            }
            let (idle, slow) = opening.join().unwrap();
            (idle, slow, during)
        });
        let opened = start.elapsed();
        // Until the server has taken every connection and closed the ones it evicted.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.conns.pressure().0 as usize + server.conns.open() < n
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let held = server.conns.open();
        let (fds1, rss1) = (open_fds(), rss_kib());
        let probes: Vec<Duration> = (0..5).map(|_| server.probe_ok()).collect();
        let worst = probes.iter().max().copied().unwrap_or_default();
        let (evicted, refused) = server.conns.pressure();
        eprintln!(
            "{kind:?}: {n} idle connections opened in {opened:.2?} ({slow} connects over 500 ms; slowest probe meanwhile {during:.2?}); the server holds {held} (cap {MAX_CONNECTIONS}), closed {evicted} idle ones, refused {refused}; \
             fds {fds0} -> {fds1} (clients {n}); VmRSS {rss0} -> {rss1} KiB; 5 fresh probes answered, slowest {worst:.2?}"
        );
        assert!(held <= MAX_CONNECTIONS, "{held} connections held");
        // Behind a full accept queue, or after one dropped SYN (a second), within an LB's 5 s.
        assert!(
            during < Duration::from_secs(5),
            "a probe took {during:?} while {n} connections were opened"
        );
        assert!(
            fds1 <= fds0 + n + MAX_CONNECTIONS + 50,
            "fds {fds0} -> {fds1} with {n} clients"
        );
        assert!(
            worst < Duration::from_secs(2),
            "a probe took {worst:?} under {n} idle connections"
        );
        assert!(rss1 < rss0 + 256 * 1024, "VmRSS {rss0} -> {rss1} KiB");
        // The oldest idle connections were closed by the server to make room.
        if n > MAX_CONNECTIONS {
            assert!(evicted as usize >= n - MAX_CONNECTIONS, "{evicted} evicted");
            let mut first = &idle[0];
            first
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(first.read(&mut [0; 16]).unwrap(), 0, "closed by the server");
        }
        drop(idle);
        let left = server.wait_open_at_most(0, Duration::from_secs(10));
        assert_eq!(left, 0, "connections still held after the clients left");
        std::thread::sleep(Duration::from_millis(200));
        let (fds2, rss2) = (open_fds(), rss_kib());
        eprintln!("{kind:?}: after the clients closed: fds {fds2}, VmRSS {rss2} KiB");
        assert!(
            fds2 <= fds0 + 10,
            "fds {fds0} -> {fds2} after the clients closed"
        );
        assert!(rss2 < rss0 + 256 * 1024, "VmRSS {rss0} -> {rss2} KiB");
        server.probe_ok();
    }
}

#[test]
fn slowloris_and_idle_keep_alive_are_closed_after_the_header_timeout() {
    let _heavy = heavy();
    let header_timeout = Limits::health().header_read_timeout;
    let checks: Vec<_> = Kind::ALL
        .into_iter()
        .map(|kind| {
            std::thread::spawn(move || {
                let server = Server::start(kind, 100);
                // Slowloris: a head one byte a second, never finished.
                let mut s = TcpStream::connect(server.addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut w = s.try_clone().unwrap();
                let start = Instant::now();
                let trickle = std::thread::spawn(move || {
                    let head = format!("GET {} HTTP/1.1\r\nX-Slow: ", kind.path());
                    for b in head.bytes().chain(std::iter::repeat(b'a')).take(40) {
                        if w.write_all(&[b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                });
                let mut out = Vec::new();
                let closed = match s.read_to_end(&mut out) {
                    Ok(_) => "closed",
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                    Err(e) => panic!("{e}"),
                };
                let slow = start.elapsed();
                // Keep-alive: one answer, then nothing.
                let mut k = BufReader::new(TcpStream::connect(server.addr).unwrap());
                k.get_ref()
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let req = format!("GET {} HTTP/1.1\r\nHost: lb\r\n\r\n", kind.path());
                k.get_mut().write_all(req.as_bytes()).unwrap();
                assert_eq!(read_response(&mut k).unwrap().0, 200);
                let answered = Instant::now();
                assert_eq!(k.read(&mut [0; 16]).unwrap(), 0, "closed");
                let idle = answered.elapsed();
                eprintln!(
                    "{kind:?}: slowloris {closed} after {slow:.2?} with {} bytes back; idle keep-alive closed after {idle:.2?} (header timeout {header_timeout:?})",
                    out.len()
                );
                for took in [slow, idle] {
                    assert!(
                        took >= header_timeout - Duration::from_millis(500)
                            && took < header_timeout + Duration::from_secs(4),
                        "{kind:?}: closed after {took:?}"
                    );
                }
                assert!(out.is_empty(), "no answer to an unfinished head");
                trickle.join().unwrap();
                server.probe_ok();
            })
        })
        .collect();
    for c in checks {
        c.join().unwrap();
    }
}

#[test]
fn oversized_and_malformed_requests_get_4xx_and_are_closed() {
    let _heavy = heavy();
    for kind in Kind::ALL {
        let server = Server::start(kind, 100);
        let path = kind.path();
        let big = "a".repeat(Limits::health().max_header_bytes + 1024);
        let huge = "a".repeat(1024 * 1024);
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "header over the limit",
                format!("GET {path} HTTP/1.1\r\nHost: lb\r\nX-Big: {big}\r\n\r\n"),
                "431",
            ),
            (
                "1 MiB header",
                format!("GET {path} HTTP/1.1\r\nHost: lb\r\nX-Big: {huge}\r\n\r\n"),
                "431",
            ),
            (
                "many headers",
                format!(
                    "GET {path} HTTP/1.1\r\n{}\r\n",
                    (0..500)
                        .map(|i| format!("X-{i}: v\r\n"))
                        .collect::<String>()
                ),
                "431",
            ),
            (
                "garbage request line",
                "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03garbage\r\n\r\n".into(),
                "400",
            ),
            ("no version", format!("GET {path}\r\n\r\n"), "400"),
            (
                "header without a colon",
                format!("GET {path} HTTP/1.1\r\nNoColonHere\r\n\r\n"),
                "400",
            ),
            (
                "NUL in a header",
                format!("GET {path} HTTP/1.1\r\nX-A: a\0b\r\n\r\n"),
                "400",
            ),
            (
                "bad content-length",
                format!("POST {path} HTTP/1.1\r\nContent-Length: abc\r\n\r\n"),
                "400",
            ),
            (
                "two content-lengths",
                format!("POST {path} HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
                "400",
            ),
            (
                "body declared over the limit",
                format!("POST {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: 100000000\r\n\r\n"),
                "413",
            ),
            (
                "URI of 100 KiB",
                format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100 * 1024)),
                "4",
            ),
        ];
        for (what, raw, code) in cases {
            let (answer, took) = exchange(server.addr, raw.as_bytes());
            eprintln!(
                "{kind:?}: {what}: {:?} in {took:.2?}",
                answer
                    .lines()
                    .next()
                    .unwrap_or("(closed without an answer)")
            );
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {code}")),
                "{kind:?}, {what}: {answer:?}"
            );
            assert!(took < Duration::from_secs(3), "{kind:?}, {what}: {took:?}");
        }
        // An upstream-shaped POST with a small body is still answered as upstream does.
        let (answer, _) = exchange(
            server.addr,
            format!("POST {path} HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                .as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.probe_ok();
    }
}

#[test]
fn a_flood_is_answered_or_refused_cleanly() {
    let _heavy = heavy();
    raise_fd_limit();
    const PER_THREAD: usize = 5_000;
    for kind in Kind::ALL {
        let server = Server::start(kind, MAX_CONNECTIONS);
        server.probe_ok();
        let (fds0, rss0) = (open_fds(), rss_kib());
        let addr = server.addr;
        let start = Instant::now();
        // Two threads open a connection per request, two keep theirs alive.
        let flood: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let req = format!("GET {} HTTP/1.1\r\nHost: lb\r\n", kind.path());
                    let (mut ok, mut refused) = (0usize, 0usize);
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    for _ in 0..PER_THREAD {
                        let keep = t % 2 == 1;
                        let c = match conn.take() {
                            Some(c) => c,
                            None => BufReader::new(TcpStream::connect(addr).unwrap()),
                        };
                        let mut c = c;
                        let close = if keep { "" } else { "Connection: close\r\n" };
                        let sent = c
                            .get_mut()
                            .write_all(format!("{req}{close}\r\n").as_bytes());
                        match sent.and_then(|()| read_response(&mut c)) {
                            Ok((200, body)) if body.contains(kind.healthy_body()) => ok += 1,
                            Ok(other) => panic!("{other:?}"),
                            // Closed by the server (evicted while idle): a clean refusal.
                            Err(_) => refused += 1,
                        }
                        if keep {
                            conn = Some(c);
                        }
                    }
                    (ok, refused)
                })
            })
            .collect();
        // A prober meanwhile, every 100 ms.
        let mut slowest = Duration::ZERO;
        let mut probes = 0;
        while !flood.iter().all(|t| t.is_finished()) {
            slowest = slowest.max(server.probe_ok());
            probes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        let (ok, refused) = flood
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        let took = start.elapsed();
        let rss1 = rss_kib();
        let left = server.wait_open_at_most(0, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(200));
        let fds1 = open_fds();
        eprintln!(
            "{kind:?}: {} requests in {took:.2?}: {ok} answered 200, {refused} closed; {probes} probes meanwhile, slowest {slowest:.2?}; \
             fds {fds0} -> {fds1}; VmRSS {rss0} -> {rss1} KiB",
            4 * PER_THREAD
        );
        assert_eq!(ok + refused, 4 * PER_THREAD);
        assert!(ok >= 4 * PER_THREAD * 99 / 100, "{ok} answered");
        assert_eq!(left, 0, "connections held after the flood");
        assert!(fds1 <= fds0 + 10, "fds {fds0} -> {fds1}");
        assert!(rss1 < rss0 + 128 * 1024, "VmRSS {rss0} -> {rss1} KiB");
        assert!(slowest < Duration::from_secs(2), "a probe took {slowest:?}");
    }
}

/// A response body that never ends.
struct Endless;

impl hyper::body::Body for Endless {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let chunk = axum::body::Bytes::from_static(&[b'x'; 64 * 1024]);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }
}

fn limits_router() -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/endless", get(|| async { axum::body::Body::new(Endless) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route(
            "/echo",
            post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        )
}

/// The limits the health servers do not reach (their answers are small, at once, and read no
/// body), on a router that does, with 1 s limits.
#[test]
fn slow_handlers_stalled_readers_and_long_bodies_are_cut() {
    let _heavy = heavy();
    let limits = Limits {
        request_timeout: Duration::from_secs(1),
        write_stall_timeout: Duration::from_secs(1),
        max_body_bytes: 1024,
        connections: Connections::new(10),
        ..Limits::metrics()
    };
    let server = Server::start_with(Kind::Router(limits_router), limits);
    let addr = server.addr;
    // A handler past its time: 503.
    let (answer, took) = exchange(addr, b"GET /slow HTTP/1.1\r\nConnection: close\r\n\r\n");
    eprintln!("slow handler: {:?} after {took:.2?}", answer.lines().next());
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.ends_with("request timed out\n"), "{answer}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A chunked body over the limit: the handler reading it gets 413.
    let chunk = "a".repeat(1000);
    let chunked = format!(
        "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3e8\r\n{chunk}\r\n3e8\r\n{chunk}\r\n0\r\n\r\n"
    );
    let (answer, _) = exchange(addr, chunked.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let small = "POST /echo HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let (answer, _) = exchange(addr, small.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n5"),
        "{answer}"
    );
    // A client that asks for an endless response and never reads: closed once the socket
    // buffers are full and the write has stalled for 1 s.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\n\r\n").unwrap();
    let start = Instant::now();
    let open = server.wait_open_at_most(0, Duration::from_secs(10));
    eprintln!(
        "stalled reader: closed by the server after {:.2?}",
        start.elapsed()
    );
    assert_eq!(open, 0, "a stalled reader's connection is still held");
    drop(s);
    // A busy connection is not evicted: at the cap of 10, with 10 slow requests in flight, a
    // new connection is refused (closed at once) rather than cutting one short.
    let busy: Vec<_> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (answer, _) = exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(answer, "", "refused while every connection is busy");
    assert_eq!(server.conns.pressure().1, 1, "one refusal");
    for s in busy {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s);
        assert_eq!(
            read_response(&mut r).unwrap().0,
            503,
            "each busy request answered"
        );
    }
    let (answer, _) = exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The metrics server runs on the same loop with its own limits.
#[test]
fn the_metrics_server_answers_400_to_garbage_and_serves_on() {
    let _heavy = heavy();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
            let l = kpr_ops::listen::bind(any).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let metrics = Arc::new(kpr_ops::metrics::Metrics::new().unwrap());
            let stopped = async {
                let _ = stopped.await;
            };
            kpr_ops::server::serve_metrics(l, metrics, "nftables", axum::Router::new(), stopped)
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    let (answer, _) = exchange(addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let big = format!(
        "GET /metrics HTTP/1.1\r\nCookie: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let (answer, _) = exchange(addr, big.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let (answer, _) = exchange(
        addr,
        b"GET /proxyMode HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("nftables"),
        "{answer}"
    );
    let _ = stop.send(());
    thread.join().unwrap();
}
