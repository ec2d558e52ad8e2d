//! Flags + optional `--config` file -> the effective configuration, with upstream's precedence
//! (§2.1 step 1, §9.1, §9.4).
//!
//! Without `--config`, upstream's defaults are applied first and the given flags overwrite them
//! (so `--iptables-min-sync-period=0` really is 0). With `--config`, the defaulted file replaces
//! every flag except `--hostname-override` and the logging flags, which win; any other flag given
//! is ignored and reported as a warning naming it.

use std::path::Path;

use crate::decode::decode;
use crate::defaults::{
    DEFAULT_HEALTHZ_PORT, DEFAULT_METRICS_PORT, append_port_if_needed, set_defaults,
    split_host_port,
};
use crate::error::ConfigError;
use crate::flags::Flags;
use crate::logging::FlushFrequency;
use crate::proxy::ProxyConfig;
use crate::types::KubeProxyConfiguration;

/// The outcome of resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The effective, defaulted v1alpha1 document (`--write-config-to` writes it as upstream
    /// does: [`crate::written`]).
    pub file_config: KubeProxyConfiguration,
    /// Typed, validated settings.
    pub proxy: ProxyConfig,
    /// Non-fatal problems, in the order found (lenient decoding, ignored or deprecated flags).
    pub warnings: Vec<String>,
}

/// Flags honoured even with `--config`: process options and the ones upstream lets win.
const HONOURED_WITH_CONFIG: &[&str] = &[
    "config",
    "write-config-to",
    "cleanup",
    "init-only",
    "master",
    "hostname-override",
    "v",
    "vmodule",
    "logging-format",
    "log-flush-frequency",
    "log-json-split-stream",
    "log-json-info-buffer-size",
    "log-text-split-stream",
    "log-text-info-buffer-size",
    "version",
    "manifests",
    "dry-run",
    "socket-lb",
    "socket-lb-cgroup",
    "socket-lb-pin-dir",
];

/// Resolves `flags`, reading the `--config` file if one is given.
pub fn resolve(flags: &Flags) -> Result<Resolved, ConfigError> {
    let text = match &flags.config {
        Some(path) => Some(read_config(path)?),
        None => None,
    };
    resolve_with(flags, text.as_deref())
}

/// Resolves `flags` with `config_text` as the content of the `--config` file (`None`: no file).
pub fn resolve_with(flags: &Flags, config_text: Option<&str>) -> Result<Resolved, ConfigError> {
    let mut warnings = Vec::new();
    let mut cfg = match config_text {
        Some(text) => {
            let decoded = decode(text)?;
            warnings.extend(decoded.warnings);
            let mut cfg = decoded.config;
            set_defaults(&mut cfg);
            for long in &flags.explicit {
                if !HONOURED_WITH_CONFIG.contains(&long.as_str()) {
                    warnings.push(format!(
                        "flag --{long} is ignored because a configuration file is given by --config"
                    ));
                }
            }
            cfg
        }
        None => {
            let mut cfg = KubeProxyConfiguration::default();
            set_defaults(&mut cfg);
            apply_flags(flags, &mut cfg, &mut warnings);
            cfg
        }
    };
    apply_logging_flags(flags, &mut cfg);
    if let Some(name) = &flags.hostname_override {
        let trimmed = name.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::EmptyHostnameOverride);
        }
        cfg.hostname_override = trimmed.to_lowercase();
    }

    let mut proxy = ProxyConfig::from_config(&cfg)?;
    proxy.client.master = flags.master.clone().filter(|m| !m.is_empty());
    proxy.cleanup = flags.cleanup.unwrap_or(false);
    proxy.init_only = flags.init_only.unwrap_or(false);
    proxy.write_config_to = flags.write_config_to.clone();
    proxy.manifests = flags.manifests.clone();
    proxy.dry_run = flags.dry_run.unwrap_or(false);
    proxy.socket_lb = crate::proxy::SocketLb {
        enabled: flags.socket_lb.unwrap_or(false),
        cgroup: flags.socket_lb_cgroup.clone(),
        pin_dir: flags.socket_lb_pin_dir.clone(),
    };
    proxy.config_path = flags.config.clone();
    Ok(Resolved {
        file_config: cfg,
        proxy,
        warnings,
    })
}

fn read_config(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Overwrites the defaulted configuration with the flags that were given (no `--config`).
fn apply_flags(f: &Flags, cfg: &mut KubeProxyConfiguration, warnings: &mut Vec<String>) {
    fn set<T: Clone>(target: &mut T, value: &Option<T>) {
        if let Some(v) = value {
            *target = v.clone();
        }
    }
    for list in &f.feature_gates {
        cfg.feature_gates
            .extend(list.0.iter().map(|(k, v)| (k.clone(), *v)));
    }
    let client = &mut cfg.client_connection;
    set(&mut client.kubeconfig, &f.kubeconfig);
    set(&mut client.content_type, &f.kube_api_content_type);
    set(&mut client.burst, &f.kube_api_burst);
    set(&mut client.qps, &f.kube_api_qps);

    set(&mut cfg.bind_address, &f.bind_address);
    if let Some(addr) = &f.healthz_bind_address {
        cfg.healthz_bind_address = append_port_if_needed(addr, DEFAULT_HEALTHZ_PORT);
    }
    if let Some(addr) = &f.metrics_bind_address {
        cfg.metrics_bind_address = append_port_if_needed(addr, DEFAULT_METRICS_PORT);
    }
    // Deprecated ports apply only without --config and --write-config-to, as upstream.
    if f.write_config_to.is_none() {
        apply_port(&mut cfg.healthz_bind_address, f.healthz_port);
        apply_port(&mut cfg.metrics_bind_address, f.metrics_port);
    }
    for (long, replacement) in [
        ("healthz-port", "--healthz-bind-address"),
        ("metrics-port", "--metrics-bind-address"),
    ] {
        if f.is_explicit(long) {
            warnings.push(format!("Flag --{long} has been deprecated, This flag is deprecated and will be removed in a future release. Please use {replacement} instead."));
        }
    }
    set(&mut cfg.bind_address_hard_fail, &f.bind_address_hard_fail);
    set(&mut cfg.enable_profiling, &f.profiling);
    set(
        &mut cfg.show_hidden_metrics_for_version,
        &f.show_hidden_metrics_for_version,
    );
    set(&mut cfg.mode, &f.proxy_mode);

    if f.iptables_masquerade_bit.is_some() {
        cfg.iptables.masquerade_bit = f.iptables_masquerade_bit;
    }
    set(&mut cfg.iptables.masquerade_all, &f.masquerade_all);
    set(&mut cfg.nftables.masquerade_all, &f.masquerade_all);
    if f.iptables_localhost_nodeports.is_some() {
        cfg.iptables.localhost_node_ports = f.iptables_localhost_nodeports;
    }
    // Upstream's --iptables-*sync-period set the common sync period of every mode but ipvs.
    set(&mut cfg.iptables.sync_period, &f.iptables_sync_period);
    set(&mut cfg.nftables.sync_period, &f.iptables_sync_period);
    set(
        &mut cfg.iptables.min_sync_period,
        &f.iptables_min_sync_period,
    );
    set(
        &mut cfg.nftables.min_sync_period,
        &f.iptables_min_sync_period,
    );
    set(&mut cfg.nftables.sync_period, &f.nftables_sync_period);
    set(
        &mut cfg.nftables.min_sync_period,
        &f.nftables_min_sync_period,
    );

    set(&mut cfg.ipvs.scheduler, &f.ipvs_scheduler);
    if f.ipvs_exclude_cidrs.is_some() {
        cfg.ipvs.exclude_cidrs = f.ipvs_exclude_cidrs.clone();
    }
    set(&mut cfg.ipvs.strict_arp, &f.ipvs_strict_arp);
    set(&mut cfg.ipvs.tcp_timeout, &f.ipvs_tcp_timeout);
    set(&mut cfg.ipvs.tcp_fin_timeout, &f.ipvs_tcpfin_timeout);
    set(&mut cfg.ipvs.udp_timeout, &f.ipvs_udp_timeout);
    for long in f.explicit.iter().filter(|l| l.starts_with("ipvs-")) {
        warnings.push(format!(
            "flag --{long} has no effect: kube-proxy-rs does not implement the ipvs mode"
        ));
    }

    set(&mut cfg.detect_local_mode, &f.detect_local_mode);
    set(
        &mut cfg.detect_local.bridge_interface,
        &f.pod_bridge_interface,
    );
    set(
        &mut cfg.detect_local.interface_name_prefix,
        &f.pod_interface_name_prefix,
    );
    set(&mut cfg.cluster_cidr, &f.cluster_cidr);
    if let Some(list) = &f.nodeport_addresses {
        let list: Vec<String> = list
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        cfg.node_port_addresses = (!list.is_empty()).then_some(list);
    }
    if f.oom_score_adj.is_some() {
        cfg.oom_score_adj = f.oom_score_adj;
    }
    let ct = &mut cfg.conntrack;
    if f.conntrack_max_per_core.is_some() {
        ct.max_per_core = f.conntrack_max_per_core;
    }
    if f.conntrack_min.is_some() {
        ct.min = f.conntrack_min;
    }
    if f.conntrack_tcp_timeout_established.is_some() {
        ct.tcp_established_timeout = f.conntrack_tcp_timeout_established;
    }
    if f.conntrack_tcp_timeout_close_wait.is_some() {
        ct.tcp_close_wait_timeout = f.conntrack_tcp_timeout_close_wait;
    }
    set(&mut ct.tcp_be_liberal, &f.conntrack_tcp_be_liberal);
    set(&mut ct.udp_timeout, &f.conntrack_udp_timeout);
    set(&mut ct.udp_stream_timeout, &f.conntrack_udp_timeout_stream);
    set(&mut cfg.config_sync_period, &f.config_sync_period);
}

/// `--healthz-port` / `--metrics-port`: 0 disables the server, another port replaces the port.
fn apply_port(addr: &mut String, port: Option<i32>) {
    match port {
        None => {}
        Some(0) => addr.clear(),
        Some(p) => {
            let host = split_host_port(addr).map(|(h, _)| h.to_string());
            let host = host.unwrap_or_else(|| addr.clone());
            *addr = if host.contains(':') {
                format!("[{host}]:{p}")
            } else {
                format!("{host}:{p}")
            };
        }
    }
}

/// The logging flags win over the file (upstream's `copyLogsFromFlags`): `--vmodule` entries go
/// first, the file's after them.
fn apply_logging_flags(f: &Flags, cfg: &mut KubeProxyConfiguration) {
    let log = &mut cfg.logging;
    if let Some(v) = f.v {
        log.verbosity = v;
    }
    if let Some(list) = &f.vmodule {
        let mut items = list.0.clone();
        items.append(&mut log.vmodule);
        log.vmodule = items;
    }
    if let Some(format) = &f.logging_format {
        log.format = format.clone();
    }
    if let Some(d) = f.log_flush_frequency {
        log.flush_frequency = FlushFrequency {
            duration: d,
            serialize_as_string: true,
        };
    }
    if let Some(b) = f.log_json_split_stream {
        log.options.json.split_stream = b;
    }
    if let Some(b) = f.log_text_split_stream {
        log.options.text.split_stream = b;
    }
    if let Some(s) = &f.log_json_info_buffer_size {
        log.options.json.info_buffer_size = s.clone();
    }
    if let Some(s) = &f.log_text_info_buffer_size {
        log.options.text.info_buffer_size = s.clone();
    }
}
