//! Input sources of kube-proxy-rs: they turn the outside world into `kpr_model::Input` events.
//!
//! Today: the manifest directory (`--manifests DIR`), the standalone mode and the source of every
//! test that needs no cluster. The API-server watchers join it (issue 4) and speak the same
//! `Input`, so the model and the sync loop do not know where objects come from.

pub mod decode;
pub mod manifests;

pub use decode::{Problem, Snapshot};
pub use manifests::{DEFAULT_POLL_INTERVAL, WatchError, load_dir, run};
