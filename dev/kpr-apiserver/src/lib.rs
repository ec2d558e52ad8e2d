//! A test Kubernetes API server: real HTTP list and watch of Services, EndpointSlices and Nodes,
//! faithful where a client (kube-rs's watcher, kube-proxy-rs) depends on it.
//!
//! No kube-apiserver package can be installed here, so the repository carries this one. It
//! keeps objects as JSON text with a global resourceVersion, and serves:
//! - lists (`items` plus the list's resourceVersion), with label and field selectors, in pages
//!   when asked (`limit`, `continue`; every page carries the first page's resourceVersion);
//! - watches from a resourceVersion: the events after it, then live ones, as newline-delimited
//!   JSON; bookmarks when asked for (`allowWatchBookmarks`); `410 Gone` (an `ERROR` event with
//!   an `Expired` Status) for a resourceVersion older than the kept history (bounded, as the
//!   API server's watch cache is: [`Options::history`]); `timeoutSeconds`;
//! - an optional bearer token (401 without it), over plain HTTP or HTTPS with a certificate of
//!   its own test CA for 127.0.0.1 ([`ApiServer::ca_pem`], for a kubeconfig or `ca.crt`);
//! - the creation of `events.k8s.io/v1` Events (`events`: validated as the API server does;
//!   refused or never answered on demand, [`ApiServer::answer_events`]), listed and watched
//!   like the other resources ([`ApiServer::events`]).
//!
//! Tests drive it in process: [`ApiServer::apply`] and [`ApiServer::delete`] change objects,
//! [`ApiServer::compact`] forgets history, [`ApiServer::drop_watches`] cuts every watch,
//! [`ApiServer::stop`] and [`ApiServer::restart`] take it away and bring it back on the same
//! port. [`ApiServer::inject`] breaks what it sends ([`Fault`]: truncated, corrupt, endless or
//! silent watches, truncated or stalled lists, objects of the wrong kind) and
//! [`ApiServer::flood`] writes changes as fast as it can. It listens on 127.0.0.1 only,
//! optionally inside a network namespace the test created.

mod events;
mod fault;

pub use events::EventsAnswer;
pub use fault::{Fault, Flood};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// The resources served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// `networking.k8s.io` ServiceCIDR, served at the versions [`Options::service_cidr_versions`]
    /// names.
    ServiceCidr,
    /// `events.k8s.io/v1` Event: created by clients (`POST`), listed and watched.
    Event,
}

impl Kind {
    fn of(kind: &str) -> Option<Kind> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            "ServiceCIDR" => Some(Kind::ServiceCidr),
            "Event" => Some(Kind::Event),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
            Kind::Event => "Event",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// An object as stored and sent: its metadata (for selectors and faults) and its JSON text,
/// shared by the store, the history and every watch that sends it, so a large object costs
/// its text once.
#[derive(Debug, Clone)]
struct Stored {
    meta: Arc<Value>,
    json: Arc<str>,
}

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    kind_of_change: &'static str,
    object: Stored,
    /// Sent as a line no client can decode (see [`ApiServer::delete_garbled`]).
    garbled: bool,
}

/// (kind, namespace, name).
type Key = (Kind, String, String);

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    /// Every change since `compacted`.
    log: Vec<Event>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    requests: Vec<String>,
    /// Faults turned on.
    faults: Vec<Fault>,
    /// How requests to create an Event are answered.
    events_answer: EventsAnswer,
}

#[derive(Debug)]
pub(crate) struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
    token: Option<String>,
    bookmark_every: Duration,
    history: usize,
    service_cidr_versions: Vec<String>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`ApiServer::apply`].
    pub(crate) fn apply(&self, mut object: Value) -> u64 {
        let kind = object["kind"]
            .as_str()
            .and_then(Kind::of)
            .unwrap_or_else(|| panic!("the test API server does not serve {}", object["kind"]));
        let key = key_of(kind, &object);
        let mut store = self.store();
        let stored = Self::stamp(&mut store, kind, &mut object);
        drop(object);
        let kind_of_change = if store.objects.insert(key, stored.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record_event(&mut store, kind, kind_of_change, stored, false);
        store.rv
    }

    /// Stores `object` unless one of its name exists (a create); returns it as stored.
    pub(crate) fn insert_new(&self, kind: Kind, mut object: Value) -> Option<Value> {
        let key = key_of(kind, &object);
        let mut store = self.store();
        if store.objects.contains_key(&key) {
            return None;
        }
        let stored = Self::stamp(&mut store, kind, &mut object);
        store.objects.insert(key, stored.clone());
        self.record_event(&mut store, kind, "ADDED", stored, false);
        Some(object)
    }

    /// The next resourceVersion, written into `object` with its `apiVersion`.
    fn stamp(store: &mut Store, kind: Kind, object: &mut Value) -> Stored {
        store.rv += 1;
        object["apiVersion"] = json!(kind.api_version());
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        Stored {
            meta: Arc::new(object["metadata"].clone()),
            json: object.to_string().into(),
        }
    }

    fn record_event(
        &self,
        store: &mut Store,
        kind: Kind,
        kind_of_change: &'static str,
        object: Stored,
        garbled: bool,
    ) {
        let event = Event {
            rv: store.rv,
            kind,
            kind_of_change,
            object,
            garbled,
        };
        store.log.push(event.clone());
        // Forget the oldest tenth at once when the history is full (a watch from before it
        // gets 410 Gone), so trimming costs little per change.
        if store.log.len() > self.history {
            let drop = store.log.len() - self.history + self.history / 10;
            let drop = drop.min(store.log.len());
            store.compacted = store.log[drop - 1].rv;
            store.log.drain(..drop);
        }
        let _ = self.events.send(event);
    }

    fn faulty(&self, fault: Fault) -> bool {
        self.store().faults.contains(&fault)
    }

    /// Takes the one-shot fault waiting for the next watch event of `kind`, if any.
    fn take_one_shot(&self, kind: Kind) -> Option<Fault> {
        let mut store = self.store();
        let i = store
            .faults
            .iter()
            .position(|f| f.one_shot() && f.kind() == kind)?;
        Some(store.faults.remove(i))
    }
}

/// Settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Serve inside this network namespace (`/run/netns/NAME`) instead of the caller's.
    pub netns: Option<String>,
    /// Require `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_every: Duration,
    /// Serve HTTPS with a certificate for 127.0.0.1 signed by a CA made for this server.
    pub tls: bool,
    /// How many changes are kept for watches to resume from (older resourceVersions get 410
    /// Gone), as the API server's watch cache keeps a bounded window.
    pub history: usize,
    /// The `networking.k8s.io` versions ServiceCIDRs are served at (`v1` since Kubernetes
    /// 1.33, `v1beta1` before; none on older servers).
    pub service_cidr_versions: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            netns: None,
            token: None,
            bookmark_every: Duration::from_secs(1),
            tls: false,
            history: 100_000,
            service_cidr_versions: vec!["v1".into()],
        }
    }
}

/// A running test API server.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    netns: Option<String>,
    tls: Option<(Arc<rustls::ServerConfig>, String)>,
    serving: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 at a free port. Must be called inside a tokio runtime.
    pub async fn start(opts: Options) -> std::io::Result<ApiServer> {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            events,
            cut: watch::channel(0).0,
            token: opts.token,
            bookmark_every: opts.bookmark_every,
            history: opts.history.max(1),
            service_cidr_versions: opts.service_cidr_versions.clone(),
        });
        let listener = bind(opts.netns.clone(), 0)?;
        let addr = listener.local_addr()?;
        let tls = if opts.tls { Some(tls_config()?) } else { None };
        let mut server = ApiServer {
            shared,
            addr,
            netns: opts.netns,
            tls,
            serving: None,
        };
        server.serve(listener)?;
        Ok(server)
    }

    /// Accepts connections until stopped; every connection is ended when it stops (as a
    /// server that goes away ends them), watches included.
    fn serve(&mut self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.shared.clone());
        let acceptor = self
            .tls
            .as_ref()
            .map(|(cfg, _)| tokio_rustls::TlsAcceptor::from(cfg.clone()));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let tcp = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    got = listener.accept() => match got {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                // As a Go API server does: watch events written within ~40 ms of each other
                // are not held back by Nagle and the client's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let (app, acceptor) = (app.clone(), acceptor.clone());
                conns.spawn(async move {
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let io = hyper_util::rt::TokioIo::new(tls);
                                let _ = http.serve_connection(io, service).await;
                            }
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(tcp);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        });
        self.serving = Some((stop, task));
        Ok(())
    }

    /// `http://127.0.0.1:PORT`, or `https://` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The port served.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The PEM certificate of the CA that signed the server's certificate (TLS only).
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|(_, ca)| ca.as_str())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Every request served so far (`METHOD path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.store().requests.clone()
    }

    /// Creates or replaces an object (its `kind` field says which resource); returns its new
    /// resourceVersion. Panics on a kind this server does not serve (a test error).
    pub fn apply(&self, object: Value) -> u64 {
        self.shared.apply(object)
    }

    /// The objects of `kind` as they are now, as a list would return them.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        let store = self.shared.store();
        store
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .filter_map(|(_, o)| serde_json::from_str(&o.json).ok())
            .collect()
    }

    /// The Events created so far (by `POST`, or [`apply`](Self::apply)), oldest name first.
    pub fn events(&self) -> Vec<Value> {
        self.objects(Kind::Event)
    }

    /// How requests to create an Event are answered from now on (the default:
    /// [`EventsAnswer::Create`]).
    pub fn answer_events(&self, answer: EventsAnswer) {
        self.shared.store().events_answer = answer;
    }

    /// Deletes an object; `false` if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.remove(kind, namespace, name, false)
    }

    /// Deletes an object, but watches receive a line that is not JSON in place of its
    /// `DELETED` event (a stream corrupted on the way): a client that skips what it cannot
    /// decode never learns of the deletion; one that relists after the error does.
    pub fn delete_garbled(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.remove(kind, namespace, name, true)
    }

    fn remove(&self, kind: Kind, namespace: &str, name: &str, garbled: bool) -> bool {
        let mut store = self.shared.store();
        let Some(old) = store
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        store.rv += 1;
        let mut object: Value = serde_json::from_str(&old.json).unwrap_or_default();
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let stored = Stored {
            meta: Arc::new(object["metadata"].clone()),
            json: object.to_string().into(),
        };
        self.shared
            .record_event(&mut store, kind, "DELETED", stored, garbled);
        true
    }

    /// Forgets the history: a watch from any resourceVersion before now gets 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.compacted = store.rv;
        store.log.clear();
    }

    /// Ends every open watch (as a load balancer dropping connections would).
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Turns a fault on (see [`Fault`]; injecting one that is on already does nothing).
    pub fn inject(&self, fault: Fault) {
        let mut store = self.shared.store();
        if !store.faults.contains(&fault) {
            store.faults.push(fault);
        }
    }

    /// Turns a fault off; `false` if it was not on (a one-shot fault already sent is off).
    pub fn clear(&self, fault: Fault) -> bool {
        let mut store = self.shared.store();
        let before = store.faults.len();
        store.faults.retain(|f| *f != fault);
        store.faults.len() != before
    }

    /// Turns every fault off.
    pub fn clear_faults(&self) {
        self.shared.store().faults.clear();
    }

    /// The faults on now.
    pub fn faults(&self) -> Vec<Fault> {
        self.shared.store().faults.clone()
    }

    /// Writes `objects` (as [`apply`](Self::apply) does) one after the other, round and
    /// round, as fast as one thread can, until the returned [`Flood`] is stopped (or dropped).
    /// Watches that fall more than a few thousand events behind are ended, as the API server
    /// ends a watcher that cannot keep up; they resume from their last resourceVersion.
    pub fn flood(&self, objects: Vec<Value>) -> Flood {
        Flood::start(self.shared.clone(), objects)
    }

    /// Stops serving: open watches end and new connections are refused. Objects are kept.
    pub async fn stop(&mut self) {
        self.drop_watches();
        if let Some((stop, task)) = self.serving.take() {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        let listener = bind(self.netns.clone(), self.addr.port())?;
        self.serve(listener)
    }
}

/// A CA made for this server, and a certificate it signed for 127.0.0.1 and localhost.
fn tls_config() -> std::io::Result<(Arc<rustls::ServerConfig>, String)> {
    let err = |e: rcgen::Error| std::io::Error::other(format!("making the test certificate: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kpr-apiserver test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).map_err(err)?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
            127, 0, 0, 1,
        ])));
    let cert = params.signed_by(&key, &ca).map_err(err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(std::io::Error::other)?;
    Ok((Arc::new(config), ca.pem()))
}

/// Binds 127.0.0.1:`port`, in `netns` when given (from a thread that enters it: the socket
/// stays in that namespace).
fn bind(netns: Option<String>, port: u16) -> std::io::Result<std::net::TcpListener> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
        }
        std::net::TcpListener::bind(("127.0.0.1", port))
    })
    .join()
    .map_err(|_| std::io::Error::other("bind thread panicked"))?
}

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let ns = match kind {
        Kind::Node | Kind::ServiceCidr => String::new(),
        _ => meta["namespace"].as_str().unwrap_or("default").to_owned(),
    };
    (
        kind,
        ns,
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A parsed request path: the resource, and the namespace or name it is limited to.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(path: &str, service_cidr_versions: &[String]) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let [
        "apis",
        "networking.k8s.io",
        version,
        "servicecidrs",
        rest @ ..,
    ] = parts.as_slice()
        && service_cidr_versions.iter().any(|v| v == version)
        && rest.len() <= 1
    {
        return Some(Target {
            kind: Kind::ServiceCidr,
            namespace: None,
            name: rest.first().map(|n| (*n).to_owned()),
        });
    }
    // (API group, resource, namespace, name); "" is the core group.
    let (group, resource, namespace, name) = match parts.as_slice() {
        ["api", "v1", r] => ("", *r, None, None),
        ["apis", g, "v1", r] => (*g, *r, None, None),
        ["api", "v1", "namespaces", ns, r] => ("", *r, Some(*ns), None),
        ["apis", g, "v1", "namespaces", ns, r] => (*g, *r, Some(*ns), None),
        ["api", "v1", "nodes", n] => ("", "nodes", None, Some(*n)),
        ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", n] => {
            ("events.k8s.io", "events", Some(*ns), Some(*n))
        }
        _ => return None,
    };
    let kind = match (group, resource) {
        ("", "services") => Kind::Service,
        ("", "nodes") => Kind::Node,
        ("discovery.k8s.io", "endpointslices") => Kind::EndpointSlice,
        ("events.k8s.io", "events") => Kind::Event,
        _ => return None,
    };
    Some(Target {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

/// One requirement of a label selector (`key`, `!key`, `key=value`, `key==value`,
/// `key!=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Exists(String),
    Absent(String),
    Eq(String, String),
    Ne(String, String),
}

fn label_selector(s: &str) -> Vec<Req> {
    s.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            if let Some((k, v)) = r.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = r.strip_prefix('!') {
                Req::Absent(k.trim().into())
            } else {
                Req::Exists(r.into())
            }
        })
        .collect()
}

#[derive(Debug, Default)]
struct Filter {
    namespace: Option<String>,
    name: Option<String>,
    labels: Vec<Req>,
}

impl Filter {
    fn new(t: &Target, q: &HashMap<String, String>) -> Filter {
        let mut f = Filter {
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            labels: label_selector(q.get("labelSelector").map_or("", String::as_str)),
        };
        for field in q.get("fieldSelector").map_or("", String::as_str).split(',') {
            match field.split_once('=') {
                Some(("metadata.name", v)) => f.name = Some(v.trim_start_matches('=').into()),
                Some(("metadata.namespace", v)) => {
                    f.namespace = Some(v.trim_start_matches('=').into())
                }
                _ => {}
            }
        }
        f
    }

    #[cfg(test)]
    fn matches(&self, object: &Value) -> bool {
        self.matches_meta(&object["metadata"])
    }

    fn matches_meta(&self, meta: &Value) -> bool {
        let label = |k: &str| meta["labels"][k].as_str();
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta["namespace"].as_str() == Some(ns))
            && self
                .name
                .as_deref()
                .is_none_or(|n| meta["name"].as_str() == Some(n))
            && self.labels.iter().all(|r| match r {
                Req::Exists(k) => label(k).is_some(),
                Req::Absent(k) => label(k).is_none(),
                Req::Eq(k, v) => label(k) == Some(v.as_str()),
                Req::Ne(k, v) => label(k) != Some(v.as_str()),
            })
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn reply(code: StatusCode, body: Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn reply_text(code: StatusCode, body: Body) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    shared.store().requests.push(format!(
        "{method} {}{}",
        uri.path(),
        uri.query().map(|q| format!("?{q}")).unwrap_or_default()
    ));
    if let Some(token) = &shared.token {
        let ok = headers
            .get("authorization")
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h == format!("Bearer {token}"));
        if !ok {
            return reply(
                StatusCode::UNAUTHORIZED,
                status(401, "Unauthorized", "Unauthorized"),
            );
        }
    }
    let Some(t) = target(uri.path(), &shared.service_cidr_versions) else {
        return reply(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    if method == Method::POST {
        return events::create(&shared, &t, &body).await;
    }
    if method != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        );
    }
    let filter = Filter::new(&t, &q);
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        return stream(shared, t.kind, filter, from, bookmarks, timeout);
    }
    if let Some(name) = &t.name {
        let store = shared.store();
        let key = (
            t.kind,
            t.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        return match store.objects.get(&key) {
            Some(o) => reply_text(StatusCode::OK, Body::from(o.json.to_string())),
            None => reply(
                StatusCode::NOT_FOUND,
                status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", t.kind.name()),
                ),
            ),
        };
    }
    list(&shared, t.kind, &filter, &q)
}

/// A list, or one page of it (`limit`, `continue`), with the list faults applied.
fn list(shared: &Shared, kind: Kind, filter: &Filter, q: &HashMap<String, String>) -> Response {
    use std::ops::Bound;
    let store = shared.store();
    let limit = q
        .get("limit")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(usize::MAX);
    // A continued list is served at the first page's resourceVersion (the objects themselves
    // are the current ones: this server keeps no old versions; a client watching from that
    // resourceVersion replays whatever changed meanwhile).
    let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => (store.rv, None),
        Some(c) => match parse_continue(c) {
            None => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", "invalid continue token"),
                );
            }
            Some((rv, _)) if rv < store.compacted => {
                return reply(
                    StatusCode::GONE,
                    status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                );
            }
            Some((rv, key)) => (rv, Some(key)),
        },
    };
    let start = match after {
        Some((ns, name)) => Bound::Excluded((kind, ns, name)),
        None => Bound::Included((kind, String::new(), String::new())),
    };
    let mut matching = store
        .objects
        .range((start, Bound::Unbounded))
        .take_while(|((k, _, _), _)| *k == kind)
        .filter(|(_, o)| filter.matches_meta(&o.meta));
    let page: Vec<(&Key, &Stored)> = matching.by_ref().take(limit).collect();
    let more = matching.next().is_some();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let (true, Some(((_, ns, name), _))) = (more, page.last()) {
        meta["continue"] = json!(format!("{rv}|{ns}|{name}"));
    }
    let wrong_kind = store.faults.contains(&Fault::WrongKind(kind));
    let truncate = !more && store.faults.contains(&Fault::TruncateLists(kind));
    let stall = !more && store.faults.contains(&Fault::StallLists(kind));
    let (list_kind, api_version) = if wrong_kind {
        ("ConfigMapList".to_owned(), "v1")
    } else {
        (format!("{}List", kind.name()), kind.api_version())
    };
    let size: usize = page.iter().map(|(_, o)| o.json.len() + 1).sum();
    let mut body = String::with_capacity(size + 256);
    body.push_str(&format!(
        r#"{{"kind":"{list_kind}","apiVersion":"{api_version}","metadata":{meta},"items":["#
    ));
    for (i, (_, o)) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        if wrong_kind {
            body.push_str(&fault::config_map(&o.meta, false).to_string());
        } else {
            body.push_str(&o.json);
        }
    }
    body.push_str("]}");
    drop(store);
    let body = Bytes::from(body);
    let half = body.slice(..body.len() / 2);
    if stall {
        use futures_util::StreamExt;
        let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) });
        return reply_text(
            StatusCode::OK,
            Body::from_stream(first.chain(futures_util::stream::pending())),
        );
    }
    reply_text(
        StatusCode::OK,
        Body::from(if truncate { half } else { body }),
    )
}

/// `RV|namespace|name`: the first page's resourceVersion and the last key sent.
fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let mut parts = token.splitn(3, '|');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_owned();
    let name = parts.next()?.to_owned();
    Some((rv, (ns, name)))
}

/// What a watch's connection carries: data, or an error that cuts the connection there.
type Chunk = Result<Bytes, std::io::Error>;

/// A watch: the history after `from`, then live events, until the timeout or a cut.
fn stream(
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    from: u64,
    bookmarks: bool,
    timeout: Option<Duration>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Chunk>(256);
    let live = shared.events.subscribe();
    let cut = shared.cut.subscribe();
    let backlog: Result<Vec<Event>, u64> = {
        let store = shared.store();
        if from < store.compacted {
            Err(store.compacted)
        } else {
            Ok(store.log.iter().filter(|e| e.rv > from).cloned().collect())
        }
    };
    let w = Watch {
        shared,
        kind,
        filter,
        tx,
        stuck: false,
    };
    tokio::spawn(w.run(from, backlog, live, cut, bookmarks, timeout));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    reply_text(StatusCode::OK, Body::from_stream(body))
}

/// One open watch.
struct Watch {
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    tx: mpsc::Sender<Chunk>,
    /// A [`Fault::SilentWatch`] reached it: it sends nothing ever again.
    stuck: bool,
}

impl Watch {
    async fn run(
        mut self,
        from: u64,
        backlog: Result<Vec<Event>, u64>,
        mut live: broadcast::Receiver<Event>,
        mut cut: watch::Receiver<u64>,
        bookmarks: bool,
        timeout: Option<Duration>,
    ) {
        let mut last = from;
        if !self.silent() {
            let backlog = match backlog {
                Ok(b) => b,
                Err(oldest) => {
                    let gone = status(
                        410,
                        "Expired",
                        &format!("too old resource version: {from} ({oldest})"),
                    );
                    let _ = self
                        .send(line(json!({"type": "ERROR", "object": gone})))
                        .await;
                    return;
                }
            };
            for e in &backlog {
                if self.wanted(e) && !self.event(e).await {
                    return;
                }
            }
            if let Some(e) = backlog.last() {
                last = e.rv;
            }
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(self.shared.bookmark_every);
        tick.tick().await;
        loop {
            tokio::select! {
                got = live.recv() => match got {
                    Ok(e) if e.rv > last => {
                        last = e.rv;
                        if self.wanted(&e) && !self.event(&e).await {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // A stuck watch reads nothing anyway.
                    Err(broadcast::error::RecvError::Lagged(_)) if self.stuck => {}
                    // Fell behind or the server is gone: end the watch; the client resumes.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    if self.silent() {
                        continue;
                    }
                    let rv = self.shared.store().rv;
                    let mark = json!({"type": "BOOKMARK", "object": {
                        "kind": self.kind.name(), "apiVersion": self.kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    if !self.send(line(mark)).await {
                        return;
                    }
                }
                // A stuck server does not end its watches on time either.
                _ = &mut deadline, if !self.stuck => return,
                _ = cut.changed() => return,
                _ = self.tx.closed() => return,
            }
        }
    }

    fn wanted(&self, e: &Event) -> bool {
        e.kind == self.kind && self.filter.matches_meta(&e.object.meta)
    }

    /// Whether this watch sends nothing any more.
    fn silent(&mut self) -> bool {
        if !self.stuck && self.shared.faulty(Fault::SilentWatch(self.kind)) {
            self.stuck = true;
        }
        self.stuck
    }

    async fn send(&self, b: Bytes) -> bool {
        self.tx.send(Ok(b)).await.is_ok()
    }

    /// Sends one event, as the faults on now have it; `false` once the watch is over.
    async fn event(&mut self, e: &Event) -> bool {
        if self.silent() {
            return true;
        }
        let text = if e.garbled {
            Bytes::from(format!(
                "{{\"type\":\"{}\",\"object\":{{garbled}}\n",
                e.kind_of_change
            ))
        } else if self.shared.faulty(Fault::WrongKind(self.kind)) {
            let cm = fault::config_map(&e.object.meta, true);
            line(json!({"type": e.kind_of_change, "object": cm}))
        } else {
            Bytes::from(format!(
                "{{\"type\":\"{}\",\"object\":{}}}\n",
                e.kind_of_change, e.object.json
            ))
        };
        let half = text.slice(..text.len() / 2);
        match self.shared.take_one_shot(self.kind) {
            Some(Fault::TruncateWatchEvent(_)) => {
                let _ = self.send(half).await;
                let cut = std::io::Error::other("connection cut in the middle of an event");
                let _ = self.tx.send(Err(cut)).await;
                false
            }
            Some(Fault::CorruptWatchEvent(_)) => {
                let mut corrupt = half.to_vec();
                corrupt.push(b'\n');
                self.send(corrupt.into()).await
            }
            Some(Fault::GarbageLine(_)) => {
                self.send(Bytes::from_static(fault::GARBAGE_LINE)).await && self.send(text).await
            }
            Some(Fault::EndlessLine(_)) => {
                let chunk = Bytes::from(vec![b'x'; fault::ENDLESS_CHUNK]);
                while self.send(chunk.clone()).await {}
                false
            }
            _ => self.send(text).await,
        }
    }
}

fn line(v: Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_v1(path: &str) -> Option<Target> {
        target(path, &["v1".to_owned()])
    }

    #[test]
    fn paths_name_the_resource() {
        assert_eq!(
            target_v1("/api/v1/services").map(|t| t.kind),
            Some(Kind::Service)
        );
        assert_eq!(
            target_v1("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"),
            Some(Target {
                kind: Kind::EndpointSlice,
                namespace: Some("ns".into()),
                name: None
            })
        );
        assert_eq!(
            target_v1("/api/v1/nodes/n1").and_then(|t| t.name),
            Some("n1".into())
        );
        assert_eq!(target_v1("/api/v1/pods"), None);
        assert_eq!(target_v1("/apis/discovery.k8s.io/v1/services"), None);
        assert_eq!(target_v1("/apis/events.k8s.io/v1/endpointslices"), None);
        assert_eq!(
            target_v1("/apis/events.k8s.io/v1/namespaces/default/events"),
            Some(Target {
                kind: Kind::Event,
                namespace: Some("default".into()),
                name: None
            })
        );
        assert_eq!(
            target_v1("/apis/events.k8s.io/v1/namespaces/default/events/n.1f").and_then(|t| t.name),
            Some("n.1f".into())
        );
        assert_eq!(
            target_v1("/apis/events.k8s.io/v1/events").map(|t| t.kind),
            Some(Kind::Event)
        );
        assert_eq!(
            target_v1("/apis/networking.k8s.io/v1/servicecidrs").map(|t| t.kind),
            Some(Kind::ServiceCidr)
        );
        assert_eq!(
            target_v1("/apis/networking.k8s.io/v1beta1/servicecidrs"),
            None,
            "a version not served is 404"
        );
        assert_eq!(
            target(
                "/apis/networking.k8s.io/v1beta1/servicecidrs/kubernetes",
                &["v1beta1".into()]
            )
            .and_then(|t| t.name),
            Some("kubernetes".into())
        );
    }

    #[test]
    fn label_selectors_as_upstream_uses_them() {
        let sel = label_selector(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        );
        let f = Filter {
            labels: sel,
            ..Filter::default()
        };
        assert!(f.matches(&json!({"metadata": {"name": "a"}})));
        assert!(
            !f.matches(&json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}))
        );
        let f = Filter {
            labels: label_selector("app=web,tier!=db"),
            ..Filter::default()
        };
        assert!(f.matches(&json!({"metadata": {"labels": {"app": "web"}}})));
        assert!(!f.matches(&json!({"metadata": {"labels": {"app": "web", "tier": "db"}}})));
    }
}
