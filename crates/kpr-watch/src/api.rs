//! The API-server source: kube-rs watchers for Services, EndpointSlices (both with upstream's
//! label selector, §3.1) and this node's Node (field selector on its name), turned into
//! `Input` events.
//!
//! A watcher's `Init .. InitDone` (the first list, and every relist after a 410 Gone or a
//! reconnect) becomes one `Update::Replace` with the whole list: objects that vanished while the
//! watch was down are deleted by the replacement, although kube-rs sends no `Delete` for them.
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
        |u| Some(Input::Services(u)),
    );
    let slices = watch_kind::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(SELECTOR),
        tx.clone(),
        |u| Some(Input::Slices(u)),
    );
    let node = watch_kind::<Node>(
        Api::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        tx,
        |u| match u {
            Update::Apply(n) => Some(Input::Node(Some(Box::new(n)))),
            Update::Delete(_) => Some(Input::Node(None)),
            Update::Replace(mut nodes) => Some(Input::Node(nodes.pop().map(Box::new))),
        },
    );
    tokio::select! {
        _ = services => {}
        _ = slices => {}
        _ = node => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
}

/// One watcher: events folded into `Update`s (a relist into one `Replace`), sent through `to`.
async fn watch_kind<K>(
    api: Api<K>,
    cfg: watcher::Config,
    tx: mpsc::Sender<Input>,
    to: impl Fn(Update<K>) -> Option<Input>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut listing: Option<Vec<K>> = None;
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
            Ok(Event::InitApply(obj)) => {
                listing.get_or_insert_with(Vec::new).push(obj);
                continue;
            }
            Ok(Event::InitDone) => {
                let all = listing.take().unwrap_or_default();
                tracing::debug!(kind = %kind, objects = all.len(), "Listed");
                Update::Replace(all)
            }
            Ok(Event::Apply(obj)) => Update::Apply(obj),
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
