//! Input sources of kube-proxy-rs: they turn the outside world into `kpr_model::Input` events.
//!
//! Two sources speak the same `Input`, so the model and the sync loop do not know where objects
//! come from: the API server (`api`: kube-rs watchers, what a node runs) and the manifest
//! directory (`--manifests DIR`: the standalone mode and every test that needs no cluster).

pub mod api;
pub mod decode;
pub mod manifests;

pub use decode::{Problem, Snapshot};
pub use manifests::{DEFAULT_POLL_INTERVAL, WatchError, load_dir, run};
