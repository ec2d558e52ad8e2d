//! kube-proxy's configuration: the `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`
//! document and upstream's command-line flags, decoded, defaulted, merged and validated into the
//! typed [`ProxyConfig`] the daemon runs with (reference §2.1 steps 1-3, §2.2, §9).
//!
//! The daemon's entry points:
//! ```no_run
//! let flags = kpr_config::Flags::parse_args(std::env::args_os());
//! if flags.wants_version() {
//!     println!("{}", kpr_config::Flags::version_string());
//!     return;
//! }
//! let resolved = kpr_config::resolve(&flags).expect("invalid configuration");
//! if let Some(path) = &resolved.proxy.write_config_to {
//!     // What upstream writes: platform defaults applied, the mode's block only.
//!     std::fs::write(path, kpr_config::written_yaml(&resolved.file_config)).expect("write");
//! }
//! ```
//! This crate does no IO beyond reading the `--config` file, and no logging: warnings are data.

mod decode;
mod defaults;
mod duration;
mod error;
mod feature_gates;
mod flags;
mod logging;
mod proxy;
mod resolve;
mod rules;
mod types;
mod validate;
mod write;
mod yaml;

pub use decode::{Decoded, LENIENT_DECODING_WARNING, decode};
pub use defaults::{
    DEFAULT_HEALTHZ_PORT, DEFAULT_MASQUERADE_BIT, DEFAULT_METRICS_PORT, DEFAULT_OOM_SCORE_ADJ,
    append_port_if_needed, set_defaults,
};
pub use duration::{DurationError, GoDuration};
pub use error::{ConfigError, DecodeError, FieldError, FieldErrorKind};
pub use feature_gates::{KNOWN_GATES, KnownGate, check_feature_gates, effective_gates, known_gate};
pub use flags::{Flags, GateList, VModuleList};
pub use logging::{
    FlushFrequency, FormatOptions, LoggingConfiguration, OutputRoutingOptions, VModuleItem,
};
pub use proxy::{
    ClientSettings, ConntrackSettings, DetectLocal, LogSettings, NodePortAddresses, ProxyConfig,
    ProxyMode, SocketLb,
};
pub use resolve::{Resolved, resolve, resolve_with};
pub use types::{
    API_VERSION, ClientConnectionConfiguration, DetectLocalConfiguration, KIND,
    KubeProxyConfiguration, KubeProxyConntrackConfiguration, KubeProxyIPTablesConfiguration,
    KubeProxyIPVSConfiguration, KubeProxyNFTablesConfiguration, KubeProxyWinkernelConfiguration,
};
pub use validate::validate;
pub use write::{written, written_yaml};
pub use yaml::to_yaml;

/// Decodes `text` and applies upstream's defaults: the configuration a `--config` file gives
/// before flags are merged (warnings as in [`decode`]).
pub fn load(text: &str) -> Result<Decoded, ConfigError> {
    let mut decoded = decode(text)?;
    set_defaults(&mut decoded.config);
    Ok(decoded)
}

#[cfg(test)]
mod tests;
