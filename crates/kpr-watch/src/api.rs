//! The API-server source: kube-rs watchers for Services, EndpointSlices (both with upstream's
//! label selector, §3.1) and this node's Node (field selector on its name), turned into
//! `Input` events.
//!
//! A watcher's `Init .. InitDone` (the first list, and every relist after a 410 Gone or a
//! reconnect) becomes an `Update::Apply` per object as it arrives, then one `Update::Keep`
//! naming them all: objects that vanished while the watch was down are deleted by it, although
//! kube-rs sends no `Delete` for them, and a 10,000-object list never sits in memory whole.
//! Errors (API server unreachable, 410, timeouts) are logged and retried with kube-rs's
//! default backoff; meanwhile nothing is sent, so the rules in the kernel stay as they are.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kpr_model::{Input, ObjectKey, Update};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::PathBuf;
use tokio::sync::{mpsc, watch};

/// Upstream's label selector for Services and EndpointSlices (§3.1): Services of another
/// proxy, and headless ones, are not ours.
pub const SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How to reach the API server, as upstream's flags say it.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: overrides the kubeconfig's server; alone, an unauthenticated URL.
    pub master: Option<String>,
}

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("--master {0:?} is not a valid URL")]
    Master(String),
    #[error(
        "no --kubeconfig or --master, and not in a cluster ({0}); pass --kubeconfig, --master or --manifests"
    )]
    InCluster(kube::config::InClusterError),
    #[error("creating the API client: {0}")]
    Client(kube::Error),
}

/// The kube client configuration: `--kubeconfig` (with `--master` overriding its server),
/// else `--master` alone, else the in-cluster service account, as upstream.
pub async fn config(c: &Connect) -> Result<kube::Config, ConnectError> {
    let master = c
        .master
        .as_ref()
        .map(|m| {
            m.parse::<http::Uri>()
                .map_err(|_| ConnectError::Master(m.clone()))
        })
        .transpose()?;
    let mut cfg = match (&c.kubeconfig, &master) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ConnectError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| ConnectError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        (None, Some(url)) => kube::Config::new(url.clone()),
        (None, None) => kube::Config::incluster().map_err(ConnectError::InCluster)?,
    };
    if let Some(url) = master {
        cfg.cluster_url = url;
    }
    Ok(cfg)
}

/// A client from [`config`].
pub async fn client(c: &Connect) -> Result<Client, ConnectError> {
    Client::try_from(config(c).await?).map_err(ConnectError::Client)
}

/// Watches Services, EndpointSlices and the Node named `node_name`, sending `Input`s until
/// `shutdown` turns true (or the receiver is gone).
pub async fn run(
    client: Client,
    node_name: String,
    tx: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
) {
    let services = watch_kind::<Service>(
        Api::all(client.clone()),
        watcher::Config::default().labels(SELECTOR),
        tx.clone(),
        lean_service,
        |u| Some(Input::Services(u)),
    );
    let slices = watch_kind::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(SELECTOR),
        tx.clone(),
        lean_slice,
        |u| Some(Input::Slices(u)),
    );
    let node = watch_kind::<Node>(
        Api::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        tx,
        lean_node,
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

/// Drops what the proxy never reads from an object before it is kept (upstream's informers
/// strip managed fields the same way): managed fields, owner references, finalizers, and every
/// annotation but the EndpointSlice trigger time (`kubectl apply`'s last-applied copy alone
/// can double an object). Labels are kept (selectors, topology).
fn lean_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(a) = &mut meta.annotations {
        a.retain(|k, _| k == "endpoints.kubernetes.io/last-change-trigger-time");
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

fn lean_slice(s: &mut EndpointSlice) {
    lean_meta(&mut s.metadata);
    for e in &mut s.endpoints {
        e.target_ref = None;
        e.deprecated_topology = None;
        e.hostname = None;
    }
}

fn lean_service(s: &mut Service) {
    lean_meta(&mut s.metadata);
}

fn lean_node(n: &mut Node) {
    lean_meta(&mut n.metadata);
    if let Some(st) = &mut n.status {
        st.images = None;
        st.volumes_attached = None;
        st.volumes_in_use = None;
    }
}

/// One watcher: events folded into `Update`s (a relist into one `Replace`), sent through `to`;
/// each object is made lean first.
async fn watch_kind<K>(
    api: Api<K>,
    cfg: watcher::Config,
    tx: mpsc::Sender<Input>,
    lean: fn(&mut K),
    to: impl Fn(Update<K>) -> Option<Input>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    // A relist's objects are sent one by one as they arrive, then the list of their keys
    // (`Update::Keep`): the whole list never sits in memory at once.
    let mut listing: Option<Vec<ObjectKey>> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let update = match event {
            Err(e) => {
                // One line per outage, not one per retry.
                if !failing {
                    tracing::warn!(kind = %kind, "Watch failed, keeping the current rules and retrying: {e}");
                    failing = true;
                }
                continue;
            }
            Ok(Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(Event::InitApply(mut obj)) => {
                lean(&mut obj);
                let meta = obj.meta();
                listing.get_or_insert_with(Vec::new).push(ObjectKey::new(
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                ));
                Update::Apply(obj)
            }
            Ok(Event::InitDone) => {
                let all = listing.take().unwrap_or_default();
                tracing::debug!(kind = %kind, objects = all.len(), "Listed");
                Update::Keep(all)
            }
            Ok(Event::Apply(mut obj)) => {
                lean(&mut obj);
                Update::Apply(obj)
            }
            Ok(Event::Delete(obj)) => {
                let meta = obj.meta();
                Update::Delete(ObjectKey::new(
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                ))
            }
        };
        if failing {
            tracing::info!(kind = %kind, "Watch restored");
            failing = false;
        }
        if let Some(input) = to(update)
            && tx.send(input).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the model reads survives; the rest (managed fields, other annotations, target
    /// references) is gone.
    #[test]
    fn lean_objects_keep_what_the_model_reads() {
        let mut s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {
                    "endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T08:00:00Z",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}"
                },
                "managedFields": [{"manager": "kube-controller-manager"}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u"}]
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "node-a", "zone": "a",
                "targetRef": {"kind": "Pod", "name": "web-abc", "namespace": "default"},
                "conditions": {"ready": true}}]
        }))
        .unwrap();
        lean_slice(&mut s);
        let m = &s.metadata;
        assert!(m.managed_fields.is_none() && m.owner_references.is_none());
        assert_eq!(
            m.annotations
                .as_ref()
                .map(|a| a.keys().cloned().collect::<Vec<_>>()),
            Some(vec![
                "endpoints.kubernetes.io/last-change-trigger-time".to_owned()
            ])
        );
        assert_eq!(m.labels.as_ref().map(|l| l.len()), Some(1));
        let e = &s.endpoints[0];
        assert!(e.target_ref.is_none());
        assert_eq!(e.node_name.as_deref(), Some("node-a"));
        assert_eq!(e.zone.as_deref(), Some("a"));
        assert_eq!(e.conditions.as_ref().and_then(|c| c.ready), Some(true));
    }
}
