//! Unit tests, one file per concern, named after the reference sections they cover
//! (kube-proxy-behaviour.md §2.1, §2.2, §9).

use std::path::PathBuf;

use crate::{ConfigError, Flags, Resolved, resolve_with};

mod decode;
mod defaults;
mod duration;
mod flags;
mod resolve;
mod validate;
mod yaml;

/// The header every test document starts with.
const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

/// A v1alpha1 document: the header plus `body` (YAML lines).
fn doc(body: &str) -> String {
    format!("{HEADER}{body}")
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// examples/kubeadm/config.conf, unchanged.
fn kubeadm_config_conf() -> String {
    std::fs::read_to_string(examples_dir().join("kubeadm/config.conf")).unwrap()
}

/// Parses a command line (without the program name).
fn flags(args: &[&str]) -> Flags {
    Flags::try_parse_args(std::iter::once("kube-proxy-rs").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Resolves a command line; `config` is the content of the --config file (which must be named
/// in `args` for the flag precedence to apply).
fn resolve_args(args: &[&str], config: Option<&str>) -> Result<Resolved, ConfigError> {
    resolve_with(&flags(args), config)
}

/// The validation errors of a document after defaulting, rendered.
fn errors_of(body: &str) -> Vec<String> {
    match resolve_args(&["--config", "f"], Some(&doc(body))) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(errs)) => errs.iter().map(ToString::to_string).collect(),
        Err(other) => panic!("expected validation errors, got {other}"),
    }
}
