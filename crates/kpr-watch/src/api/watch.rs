//! The watch loop of each kind: list, then watch; after any error, list again.
//!
//! A list (the first, and every relist) becomes an `Update::Apply` per object as it arrives,
//! then one `Update::Keep` naming them all: objects that vanished while the watch was down are
//! deleted by it, although no `Delete` was seen for them, and a 10,000-object list never sits
//! in memory whole. Any error (API server unreachable, 410 Gone, a broken stream) ends the
//! watcher; after a backoff a new one relists, so an event the stream lost can never leave a
//! stale object behind. Meanwhile nothing is sent, so the rules in the kernel stay as they are.
//! Each outage is logged once when it starts and once when it ends, and reported to the
//! [`Observer`].
//!
//! Nothing waits forever ([`Settings`]): a list page that takes longer than `list_timeout` has
//! failed; a watch asks the API server to end it after `watch_timeout` (then kube-rs resumes
//! it from its resourceVersion, no relist) and fails if it has sent nothing for that long
//! plus [`super::WATCH_SILENCE_GRACE`] (a stuck server or connection; `guard`); any other
//! request whose answer stops for [`super::READ_TIMEOUT`] fails. Meanwhile the last good state
//! stays.

use super::SELECTOR;
use super::lean::{Beta, Served, Watched};
use super::observe::Observer;
use futures_util::StreamExt;
use kpr_model::objects::{EndpointSlice, Node, Service, ServiceCidr};
use kpr_model::{Input, ObjectKey, Update};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The first wait before a relist after an error; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A watch that stayed up this long starts its next backoff from the minimum again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// How long the source waits for the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Each watch's `timeoutSeconds` (whole seconds, at least 1): the API server ends the
    /// watch then and kube-rs resumes it from its resourceVersion. A watch that has sent
    /// nothing, not even a bookmark, for this plus [`super::WATCH_SILENCE_GRACE`] fails.
    /// Keep it under [`super::READ_TIMEOUT`].
    pub watch_timeout: Duration,
    /// The longest one page of a list may take (the API server gives up on a request after
    /// 60 s itself).
    pub list_timeout: Duration,
    /// How often the source asks again whether ServiceCIDRs can be read, when they could not
    /// (an API server upgraded under a running proxy, RBAC granted later).
    pub service_cidr_recheck: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            // kube-rs's default; client-go picks 5 to 10 minutes.
            watch_timeout: Duration::from_secs(290),
            list_timeout: Duration::from_secs(120),
            service_cidr_recheck: Duration::from_secs(300),
        }
    }
}

/// Watches Services, EndpointSlices, the Node named `node_name` and the ServiceCIDRs (where
/// the API server serves them; they never hold up the first sync), sending `Input`s until
/// `shutdown` turns true (or the receiver is gone), with the default [`Settings`].
pub async fn run(
    client: Client,
    node_name: String,
    tx: mpsc::Sender<Input>,
    shutdown: watch::Receiver<bool>,
    observer: Arc<dyn Observer>,
) {
    run_with(
        client,
        node_name,
        tx,
        shutdown,
        observer,
        Settings::default(),
    )
    .await;
}

/// [`run`] with other [`Settings`].
pub async fn run_with(
    client: Client,
    node_name: String,
    tx: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
    observer: Arc<dyn Observer>,
    settings: Settings,
) {
    let secs = u32::try_from(settings.watch_timeout.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    let base = watcher::Config::default().timeout(secs);
    let services = watch_kind::<Service>(
        Api::all(client.clone()),
        base.clone().labels(SELECTOR),
        settings,
        tx.clone(),
        observer.clone(),
        |u| Some(Input::Services(u)),
    );
    let slices = watch_kind::<EndpointSlice>(
        Api::all(client.clone()),
        base.clone().labels(SELECTOR),
        settings,
        tx.clone(),
        observer.clone(),
        |u| Some(Input::Slices(u)),
    );
    let cidrs = watch_service_cidrs(
        client.clone(),
        base.clone(),
        settings,
        tx.clone(),
        observer.clone(),
    );
    let node = watch_kind::<Node>(
        Api::all(client),
        base.fields(&format!("metadata.name={node_name}")),
        settings,
        tx,
        observer,
        |u| match u {
            Update::Apply(n) => Some(Input::Node(Some(Box::new(n)))),
            Update::Delete(_) => Some(Input::Node(None)),
            Update::Replace(mut nodes) => Some(Input::Node(nodes.pop().map(Box::new))),
            // The list's Node (if any) came as `Apply` already.
            Update::Keep(keys) => keys.is_empty().then_some(Input::Node(None)),
        },
    );
    tokio::select! {
        _ = services => {}
        _ = slices => {}
        _ = node => {}
        _ = cidrs => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
}

/// Where ServiceCIDRs are read from: `networking.k8s.io/v1` (Kubernetes 1.33 and later), else
/// `v1beta1`. `Ok(None)` when neither is served; `Err` with the API's code (403: not allowed)
/// or 0 (no answer) and its message otherwise.
async fn service_cidr_version(client: &Client) -> Result<Option<&'static str>, (u16, String)> {
    let probe = kube::api::ListParams::default().limit(1);
    let v1 = Api::<Watched<ServiceCidr>>::all(client.clone());
    let beta = Api::<Watched<Beta<ServiceCidr>>>::all(client.clone());
    let code = |e: kube::Error| match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => (0, other.to_string()),
    };
    match v1.list(&probe).await.map_err(code) {
        Ok(_) => return Ok(Some(ServiceCidr::VERSION)),
        Err((404, _)) => {}
        Err(e) => return Err(e),
    }
    match beta.list(&probe).await.map_err(code) {
        Ok(_) => Ok(Some(Beta::<ServiceCidr>::VERSION)),
        Err((404, _)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The ServiceCIDR watch (§4.8), at the version the API server serves. While they cannot be
/// read (not served, not allowed) nothing is sent, so nothing is dropped; it asks again every
/// `service_cidr_recheck`, and sooner (with backoff) when the API server did not answer.
async fn watch_service_cidrs(
    client: Client,
    cfg: watcher::Config,
    settings: Settings,
    tx: mpsc::Sender<Input>,
    observer: Arc<dyn Observer>,
) {
    let mut delay = BACKOFF_MIN;
    let mut said = String::new();
    loop {
        let (wait, why) = match service_cidr_version(&client).await {
            Ok(Some(version)) => {
                tracing::info!(version, "Watching ServiceCIDRs: new connections to their unallocated addresses are dropped (nftables mode)");
                if version == ServiceCidr::VERSION {
                    let to = |u| Some(Input::ServiceCidrs(u));
                    watch_kind::<ServiceCidr>(Api::all(client), cfg, settings, tx, observer, to)
                        .await;
                } else {
                    let to = |u| Some(Input::ServiceCidrs(unwrap_beta(u)));
                    let api = Api::all(client);
                    watch_kind::<Beta<ServiceCidr>>(api, cfg, settings, tx, observer, to).await;
                }
                return;
            }
            Ok(None) => (
                settings.service_cidr_recheck,
                "ServiceCIDRs are not served by this API server (networking.k8s.io v1 or v1beta1): nothing is dropped for unallocated ClusterIPs".to_owned(),
            ),
            Err((403, msg)) => (
                settings.service_cidr_recheck,
                format!("Not allowed to list ServiceCIDRs (grant list and watch on networking.k8s.io servicecidrs, as system:node-proxier does): nothing is dropped for unallocated ClusterIPs: {msg}"),
            ),
            Err((_, msg)) => {
                delay = (delay * 2).min(BACKOFF_MAX);
                (delay, format!("Cannot tell whether ServiceCIDRs are served, asking again: {msg}"))
            }
        };
        if why != said {
            tracing::warn!("{why}");
            said = why;
        }
        tokio::time::sleep(wait).await;
        if tx.is_closed() {
            return;
        }
    }
}

fn unwrap_beta(u: Update<Beta<ServiceCidr>>) -> Update<ServiceCidr> {
    match u {
        Update::Apply(b) => Update::Apply(b.0),
        Update::Delete(k) => Update::Delete(k),
        Update::Replace(v) => Update::Replace(v.into_iter().map(|b| b.0).collect()),
        Update::Keep(k) => Update::Keep(k),
    }
}

fn key_of<T: kpr_model::objects::ApiObject>(obj: &T) -> ObjectKey {
    ObjectKey::of(obj.metadata())
}

/// One kind: watchers one after the other, each ended by its first error; returns when the
/// receiver is gone.
async fn watch_kind<T>(
    api: Api<Watched<T>>,
    cfg: watcher::Config,
    settings: Settings,
    tx: mpsc::Sender<Input>,
    observer: Arc<dyn Observer>,
    to: impl Fn(Update<T>) -> Option<Input>,
) where
    T: Served + Clone + Debug + Send + Sync + 'static,
    Watched<T>: DeserializeOwned,
{
    let resource = T::PLURAL;
    let mut delay = BACKOFF_MIN;
    let mut outage: Option<Instant> = None;
    loop {
        let mut stream = watcher::watcher(api.clone(), cfg.clone()).boxed();
        let mut listing: Option<Vec<ObjectKey>> = None;
        let mut up_since: Option<Instant> = None;
        let error = loop {
            // While listing, each step may wait for a page from the API server.
            let next = if listing.is_some() {
                match tokio::time::timeout(settings.list_timeout, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        break format!(
                            "a page of the list took longer than {} s",
                            settings.list_timeout.as_secs_f32()
                        );
                    }
                }
            } else {
                stream.next().await
            };
            let update = match next {
                None => break "the watch stream ended".to_owned(),
                Some(Err(e)) => break e.to_string(),
                Some(Ok(Event::Init)) => {
                    listing = Some(Vec::new());
                    continue;
                }
                Some(Ok(Event::InitApply(w))) => {
                    listing.get_or_insert_with(Vec::new).push(key_of(&w.object));
                    Update::Apply(w.object)
                }
                Some(Ok(Event::InitDone)) => {
                    let all = listing.take().unwrap_or_default();
                    tracing::debug!(resource, objects = all.len(), "Listed");
                    if let Some(since) = outage.take() {
                        tracing::info!(
                            resource,
                            down_ms = since.elapsed().as_millis() as u64,
                            "Watch restored: relisted, objects deleted meanwhile are removed"
                        );
                    }
                    observer.watch(resource, true);
                    up_since = Some(Instant::now());
                    Update::Keep(all)
                }
                Some(Ok(Event::Apply(w))) => Update::Apply(w.object),
                Some(Ok(Event::Delete(w))) => Update::Delete(key_of(&w.object)),
            };
            if let Some(input) = to(update)
                && tx.send(input).await.is_err()
            {
                return;
            }
        };
        observer.watch(resource, false);
        if up_since.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER) {
            delay = BACKOFF_MIN;
        }
        if outage.is_none() {
            // One line per outage, not one per retry.
            tracing::warn!(
                resource,
                "Watch failed, keeping the current rules and relisting with backoff: {error}"
            );
            outage = Some(Instant::now());
        } else {
            tracing::debug!(
                resource,
                retry_ms = delay.as_millis() as u64,
                "Watch still failing: {error}"
            );
        }
        drop(stream);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
        if tx.is_closed() {
            return;
        }
    }
}
