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

use super::SELECTOR;
use super::lean::{Served, Watched};
use super::observe::Observer;
use futures_util::StreamExt;
use kpr_model::objects::{EndpointSlice, Node, Service};
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

/// Watches Services, EndpointSlices and the Node named `node_name`, sending `Input`s until
/// `shutdown` turns true (or the receiver is gone).
pub async fn run(
    client: Client,
    node_name: String,
    tx: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
    observer: Arc<dyn Observer>,
) {
    let services = watch_kind::<Service>(
        Api::all(client.clone()),
        watcher::Config::default().labels(SELECTOR),
        tx.clone(),
        observer.clone(),
        |u| Some(Input::Services(u)),
    );
    let slices = watch_kind::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(SELECTOR),
        tx.clone(),
        observer.clone(),
        |u| Some(Input::Slices(u)),
    );
    let node = watch_kind::<Node>(
        Api::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
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
        _ = shutdown.wait_for(|s| *s) => {}
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
    tx: mpsc::Sender<Input>,
    observer: Arc<dyn Observer>,
    to: impl Fn(Update<T>) -> Option<Input>,
) where
    T: Served + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let resource = T::PLURAL;
    let mut delay = BACKOFF_MIN;
    let mut outage: Option<Instant> = None;
    loop {
        let mut stream = watcher::watcher(api.clone(), cfg.clone()).boxed();
        let mut listing: Option<Vec<ObjectKey>> = None;
        let mut up_since: Option<Instant> = None;
        let error = loop {
            let update = match stream.next().await {
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
