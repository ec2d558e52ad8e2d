//! Serves HTTP to clients that may be hostile: the one accept loop of the health, metrics and
//! healthCheckNodePort servers, with a connection cap and per-connection time limits.
//!
//! Load balancers, and anyone who can reach the node, connect to these servers, so each holds up
//! as a well-configured production HTTP server does ([`Limits`] has the numbers):
//! - a request's head must arrive within `header_read_timeout`, which is also how long an idle
//!   keep-alive connection stays open; a client trickling its head (slowloris) is closed then;
//! - a head over `max_header_bytes` gets 431, a malformed one 400 (hyper answers both, then
//!   closes); a body declared over `max_body_bytes` gets 413, and a longer one is cut there;
//! - a handler has `request_timeout` to answer (then 503), and a response that cannot be written
//!   for `write_stall_timeout` (a client that stopped reading) closes its connection;
//! - the servers of a process share one [`Connections`] cap, well below its file-descriptor
//!   limit. At the cap, a new connection closes the least recently active idle one (no request
//!   in flight), so a prober's fresh connection is always taken while thousands of idle ones are
//!   held; only when every connection is in the middle of a request is the new one refused;
//! - accept errors never end the loop: a connection that failed before it was taken is skipped;
//!   other errors, out of file descriptors (EMFILE, ENFILE) among them, pause accepting for
//!   100 ms instead of spinning, and running out of descriptors also closes one idle connection.
//!
//! Nothing here blocks: everything runs as tasks of the runtime that runs [`serve`], so a flood
//! takes that runtime's CPU time but never holds its thread.

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::{Frame, SizeHint};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most connections the servers of one process hold together.
pub const MAX_CONNECTIONS: usize = 1000;

/// How long a stopped server lets its connections finish the request they are in.
const GRACE: Duration = Duration::from_secs(5);

/// How long accepting pauses after an error that is not one connection's.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a server grants each client.
#[derive(Debug, Clone)]
pub struct Limits {
    /// To receive a request's head, from the connection's start or the previous response's end
    /// (so also the keep-alive idle time).
    pub header_read_timeout: Duration,
    /// For the handler to produce the response's head.
    pub request_timeout: Duration,
    /// For a blocked write to make progress.
    pub write_stall_timeout: Duration,
    /// Request line and headers together.
    pub max_header_bytes: usize,
    /// A request body, declared (413 at once) or read (the handler's read fails there).
    pub max_body_bytes: usize,
    /// The cap, shared with the process's other servers.
    pub connections: Arc<Connections>,
}

impl Limits {
    /// For `/healthz`, `/livez` and the healthCheckNodePorts: probes are small and answered at
    /// once, so a client gets 5 s to send a head and a handler 5 s to answer.
    pub fn health() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            write_stall_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
            connections: Connections::process(),
        }
    }

    /// For the metrics address: browsers (the status page; their cookies make heads larger),
    /// scrapers and the debug readers (`/debug/verify` lists the kernel's rules: seconds on a
    /// large ruleset).
    pub fn metrics() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            ..Limits::health()
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves; then stops accepting,
/// closes the listener at once (its port can be bound again), lets open requests finish for up
/// to 5 s and closes the rest. Always `Ok`: no error of a client or of `accept` ends it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) + 16 * 1024);
    let limits = Arc::new(limits);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut failing = false;
    let mut taken = 0u32;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failing = false;
                // In a burst, let the runtime's other tasks (the sync loop) in every 32
                // connections, not only when tokio's budget of 128 operations runs out.
                taken = taken.wrapping_add(1);
                if taken.is_multiple_of(32) {
                    tokio::task::yield_now().await;
                }
                stream
            }
            Err(e) => {
                accept_failed(&listener, &e, &limits.connections, &mut failing).await;
                continue;
            }
        };
        // Refused: dropping the stream closes it at once.
        let Some(slot) = limits.connections.admit() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(Stalled::new(stream, limits.write_stall_timeout));
        let service = {
            let (app, limits) = (app.clone(), limits.clone());
            let (conns, id) = (slot.conns.clone(), slot.id);
            hyper::service::service_fn(move |req| {
                let busy = Busy::start(&conns, id);
                let (app, limits) = (app.clone(), limits.clone());
                async move {
                    let response = respond(app, req, &limits).await;
                    Ok::<_, Infallible>(response.map(|inner| Tracked { inner, _busy: busy }))
                }
            })
        };
        let conn = http.serve_connection(io, service);
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            let close = slot.close.clone();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = close.notified() => {}
                () = async { drop(stopped.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(GRACE, conn).await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let _ = tokio::time::timeout(GRACE + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.shutdown().await;
    Ok(())
}

/// Binds a listener for [`serve`] with the longest accept queue the kernel allows
/// (`net.core.somaxconn`, as Go's servers do): tokio's and std's 1,024 and 128 overflow when a
/// burst of connections outruns the accept loop, and a load balancer's SYN dropped then costs
/// its probe a second. Must run inside a tokio runtime.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // The kernel caps it at net.core.somaxconn.
    socket.listen(u32::from(u16::MAX))
}

/// The connections the servers of a process hold, and the cap on them.
#[derive(Debug)]
pub struct Connections {
    cap: usize,
    table: Mutex<Table>,
}

impl Connections {
    /// A cap of its own (tests; a server that must not share).
    pub fn new(cap: usize) -> Arc<Connections> {
        Arc::new(Connections {
            cap: cap.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    /// The process's cap, shared by every server that does not bring its own: a quarter of
    /// the file descriptors the process may open when first asked (`RLIMIT_NOFILE`'s soft
    /// limit), at most [`MAX_CONNECTIONS`]: 256 under the common soft limit of 1,024.
    pub fn process() -> Arc<Connections> {
        static PROCESS: OnceLock<Arc<Connections>> = OnceLock::new();
        PROCESS
            .get_or_init(|| {
                let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
                Connections::new(cap_for(soft))
            })
            .clone()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Idle connections closed so far to make room, and new ones refused because every
    /// connection was in the middle of a request.
    pub fn pressure(&self) -> (u64, u64) {
        let t = self.lock();
        (t.evicted, t.refused)
    }

    /// Takes a new connection, closing the least recently active idle one at the cap; `None`
    /// when every connection is busy.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut t = self.lock();
        if t.open.len() >= self.cap {
            if t.evict_one() {
                t.evicted += 1;
            } else {
                t.refused += 1;
            }
            t.warn_pressure(self.cap);
            if t.open.len() >= self.cap {
                return None;
            }
        }
        let id = t.next;
        t.next += 1;
        let close = Arc::new(tokio::sync::Notify::new());
        t.open.insert(
            id,
            Entry {
                stamp: id,
                busy: 0,
                close: close.clone(),
            },
        );
        t.idle.insert(id, id);
        Some(Slot {
            conns: self.clone(),
            id,
            close,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn cap_for(nofile_soft: Option<u64>) -> usize {
    nofile_soft
        .map_or(MAX_CONNECTIONS, |n| {
            usize::try_from(n / 4).unwrap_or(MAX_CONNECTIONS)
        })
        .clamp(8, MAX_CONNECTIONS)
}

#[derive(Debug, Default)]
struct Table {
    /// The next connection id and activity stamp (one counter: both only grow).
    next: u64,
    open: HashMap<u64, Entry>,
    /// Idle connections by last activity (stamp -> id), least recent first.
    idle: BTreeMap<u64, u64>,
    evicted: u64,
    refused: u64,
    warned: Option<tokio::time::Instant>,
}

#[derive(Debug)]
struct Entry {
    stamp: u64,
    /// Requests whose response has not been written to the end.
    busy: u32,
    close: Arc<tokio::sync::Notify>,
}

impl Table {
    /// Closes the least recently active idle connection, if any. It leaves the table now; its
    /// socket closes when its task next runs.
    fn evict_one(&mut self) -> bool {
        let Some((_, id)) = self.idle.pop_first() else {
            return false;
        };
        if let Some(e) = self.open.remove(&id) {
            e.close.notify_one();
        }
        true
    }

    fn warn_pressure(&mut self, cap: usize) {
        let now = tokio::time::Instant::now();
        if self
            .warned
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
        {
            self.warned = Some(now);
            tracing::warn!(
                cap,
                evicted = self.evicted,
                refused = self.refused,
                "HTTP servers at their connection cap: closing the least recently active idle connections (logged at most once a minute)"
            );
        }
    }
}

/// A connection's place in the table; leaving it on drop.
#[derive(Debug)]
struct Slot {
    conns: Arc<Connections>,
    id: u64,
    close: Arc<tokio::sync::Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        if let Some(e) = t.open.remove(&self.id) {
            t.idle.remove(&e.stamp);
        }
    }
}

/// A request in flight on a connection, from its head until its response is written (or
/// dropped); the connection cannot be evicted meanwhile.
#[derive(Debug)]
struct Busy {
    conns: Arc<Connections>,
    id: u64,
}

impl Busy {
    fn start(conns: &Arc<Connections>, id: u64) -> Busy {
        let mut t = conns.lock();
        let t = &mut *t;
        if let Some(e) = t.open.get_mut(&id) {
            if e.busy == 0 {
                t.idle.remove(&e.stamp);
            }
            e.busy += 1;
        }
        Busy {
            conns: conns.clone(),
            id,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        let t = &mut *t;
        if let Some(e) = t.open.get_mut(&self.id) {
            e.busy = e.busy.saturating_sub(1);
            if e.busy == 0 {
                e.stamp = t.next;
                t.next += 1;
                t.idle.insert(e.stamp, self.id);
            }
        }
    }
}

/// A response body that keeps its connection busy until it is written.
#[derive(Debug)]
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The router's answer within the body and time limits.
async fn respond(
    mut app: axum::Router,
    req: Request<hyper::body::Incoming>,
    limits: &Limits,
) -> Response<Body> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return refusal(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, limits.max_body_bytes)));
    let call = tower_service::Service::call(&mut app, req);
    match tokio::time::timeout(limits.request_timeout, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => refusal(StatusCode::SERVICE_UNAVAILABLE, "request timed out\n"),
    }
}

/// A plain-text answer that closes the connection.
fn refusal(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// Logs (once per run of failures) and waits after an accept error that is not one
/// connection's; out of file descriptors, closes an idle connection too.
async fn accept_failed(
    listener: &tokio::net::TcpListener,
    e: &io::Error,
    conns: &Connections,
    failing: &mut bool,
) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    let errno = e.raw_os_error();
    let out_of_fds = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
        .iter()
        .any(|n| errno == Some(n.raw_os_error()));
    if out_of_fds {
        let mut t = conns.lock();
        if t.evict_one() {
            t.evicted += 1;
        }
    }
    if !*failing {
        *failing = true;
        let address = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::warn!(%address, "Cannot accept connections: {e}; retrying every 100 ms");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// A TCP stream whose writes fail once blocked for longer than a limit.
#[derive(Debug)]
struct Stalled {
    io: tokio::net::TcpStream,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl Stalled {
    fn new(io: tokio::net::TcpStream, limit: Duration) -> Stalled {
        Stalled {
            io,
            limit,
            timer: None,
            armed: false,
        }
    }

    fn check(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.armed {
            self.armed = true;
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Stalled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stalled {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_quarter_of_the_fd_limit_at_most_a_thousand() {
        assert_eq!(cap_for(Some(1024)), 256);
        assert_eq!(cap_for(Some(1_048_576)), MAX_CONNECTIONS);
        assert_eq!(cap_for(None), MAX_CONNECTIONS);
        assert_eq!(cap_for(Some(10)), 8);
    }

    #[test]
    fn at_the_cap_the_least_recently_active_idle_connection_goes() {
        let conns = Connections::new(2);
        let a = conns.admit();
        let b = conns.admit();
        let (Some(a), Some(b)) = (a, b) else {
            panic!("two connections fit under a cap of 2")
        };
        // `a` served a request since `b` connected: `b` is now the least recently active.
        drop(Busy::start(&conns, a.id));
        let c = conns.admit();
        assert!(c.is_some());
        assert_eq!(conns.open(), 2);
        assert_eq!(conns.pressure(), (1, 0));
        let t = conns.lock();
        assert!(t.open.contains_key(&a.id) && !t.open.contains_key(&b.id));
    }

    #[test]
    fn busy_connections_are_kept_and_a_new_one_is_refused() {
        let conns = Connections::new(1);
        let Some(a) = conns.admit() else {
            panic!("one connection fits")
        };
        let busy = Busy::start(&conns, a.id);
        assert!(conns.admit().is_none());
        assert_eq!(conns.pressure(), (0, 1));
        drop(busy);
        let b = conns.admit();
        assert!(b.is_some(), "idle again: evicted for the new one");
        assert_eq!(conns.open(), 1);
        assert_eq!(conns.pressure(), (1, 1));
    }
}
