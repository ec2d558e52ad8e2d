//! The API-server source: kube-rs watchers for Services, EndpointSlices (both with upstream's
//! label selector, §3.1) and this node's Node (field selector on its name), turned into
//! `Input` events.
//!
//! Objects are decoded into the model's lean types (`kpr_model::objects`), which never fail on
//! an object's shape, so one odd object cannot fail a list or a watch (`lean`). The watch loop
//! (`watch`) relists after any error, so no event is ever lost; `guard` turns what kube-rs
//! would skip silently or wait for forever (a truncated event, an endless line, a silent
//! watch, a list of another kind) into errors; `observe` reports requests and outages to the
//! metrics; `event` records kube-proxy's `Starting` event about the Node.

pub mod event;
mod guard;
mod lean;
pub mod observe;
mod watch;

pub use guard::{MAX_EVENT_BYTES, WATCH_SILENCE_GRACE};
pub use observe::{NoObserver, Observer};
pub use watch::{BACKOFF_MAX, BACKOFF_MIN, Settings, run, run_with};

use kube::Client;
use std::path::PathBuf;
use std::sync::Arc;

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

/// Any response that stops coming for this long has failed (a request whose answer never
/// starts, or stops half-way): longer than any healthy watch stays silent (its timeout, 290 s,
/// and bookmarks come every minute), so only a stuck server or connection reaches it.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(330);

/// A client from [`config`], reporting every request it makes to `observer` (upstream's
/// `rest_client_*` metrics), with [`READ_TIMEOUT`], its responses checked by `guard`.
pub async fn client(c: &Connect, observer: Arc<dyn Observer>) -> Result<Client, ConnectError> {
    let mut cfg = config(c).await?;
    if cfg.read_timeout.is_none() {
        cfg.read_timeout = Some(READ_TIMEOUT);
        // The timeout counts from the request, not from when its pooled connection went idle.
        cfg.reset_reader_on_write = true;
    }
    let host = cfg
        .cluster_url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let builder = kube::client::ClientBuilder::try_from(cfg).map_err(ConnectError::Client)?;
    Ok(builder
        .with_layer(&guard::GuardLayer::new(&lean::RESOURCES))
        .with_layer(&observe::RequestLayer::new(observer, &host))
        .build())
}
