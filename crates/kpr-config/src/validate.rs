//! Validation (§9.3) and conversion to [`ProxyConfig`] in one pass, so a value is parsed once
//! and every problem is reported: each rule either yields a typed value or pushes `FieldError`s
//! (and a placeholder) and the whole configuration is rejected at the end.
//!
//! Field paths use the JSON names under `KubeProxyConfiguration` (e.g.
//! `KubeProxyConfiguration.iptables.masqueradeBit`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::error::{ConfigError, FieldError};
use crate::feature_gates::check_feature_gates;
use crate::proxy::{ClientSettings, ConntrackSettings, LogSettings, ProxyConfig, ProxyMode};
use crate::rules::{
    ROOT, count, detect_local, host_port, masquerade_bit, node_port_addresses, non_negative,
    parse_cluster_cidrs, path, positive, render_gates, timeout, valid_metrics_version,
    valid_port_range,
};
use crate::types::KubeProxyConfiguration;

const SUPPORTED_MODES: &[&str] = &["iptables", "nftables"];

/// All validation errors of a defaulted configuration (empty when valid).
pub fn validate(cfg: &KubeProxyConfiguration) -> Vec<FieldError> {
    build(cfg).err().unwrap_or_default()
}

/// Validates and converts; flag-only fields of the result are unset.
pub(crate) fn build(cfg: &KubeProxyConfiguration) -> Result<ProxyConfig, Vec<FieldError>> {
    let mut errs = Vec::new();
    let e = &mut errs;

    if !cfg.feature_gates.is_empty() {
        let rendered = render_gates(cfg);
        for problem in check_feature_gates(&cfg.feature_gates) {
            e.push(FieldError::invalid_raw(
                path("featureGates"),
                &rendered,
                problem,
            ));
        }
    }

    let mode = match cfg.mode.as_str() {
        "" | "iptables" => ProxyMode::Iptables,
        "nftables" => ProxyMode::Nftables,
        other => {
            let note = format!("proxy mode {other:?} is not supported by kube-proxy-rs");
            e.push(FieldError::not_supported(path("mode"), other, SUPPORTED_MODES).with_note(note));
            ProxyMode::Iptables
        }
    };
    let (block, masquerade_all) = match mode {
        ProxyMode::Nftables => ("nftables", cfg.nftables.masquerade_all),
        ProxyMode::Iptables => ("iptables", cfg.iptables.masquerade_all),
    };
    let (sync, min_sync) = match mode {
        ProxyMode::Nftables => (cfg.nftables.sync_period, cfg.nftables.min_sync_period),
        ProxyMode::Iptables => (cfg.iptables.sync_period, cfg.iptables.min_sync_period),
    };
    let sync_period = positive(e, &path(&format!("{block}.syncPeriod")), sync);
    let min_sync_path = path(&format!("{block}.minSyncPeriod"));
    let min_sync_period = non_negative(e, &min_sync_path, min_sync);
    if min_sync > sync && sync.as_nanos() > 0 {
        let detail = format!("must be less than or equal to {ROOT}.{block}.syncPeriod");
        e.push(FieldError::invalid_str(
            min_sync_path,
            &min_sync.to_string(),
            detail,
        ));
    }
    let ipt_bit = masquerade_bit(e, "iptables", cfg.iptables.masquerade_bit);
    let nft_bit = masquerade_bit(e, "nftables", cfg.nftables.masquerade_bit);
    let masquerade_bit = if mode == ProxyMode::Nftables {
        nft_bit
    } else {
        ipt_bit
    };

    let ct = &cfg.conntrack;
    let conntrack = ConntrackSettings {
        max_per_core: count(e, "conntrack.maxPerCore", ct.max_per_core),
        min: count(e, "conntrack.min", ct.min),
        tcp_established_timeout: timeout(
            e,
            "conntrack.tcpEstablishedTimeout",
            ct.tcp_established_timeout,
        ),
        tcp_close_wait_timeout: timeout(
            e,
            "conntrack.tcpCloseWaitTimeout",
            ct.tcp_close_wait_timeout,
        ),
        tcp_be_liberal: ct.tcp_be_liberal,
        udp_timeout: timeout(e, "conntrack.udpTimeout", Some(ct.udp_timeout)),
        udp_stream_timeout: timeout(e, "conntrack.udpStreamTimeout", Some(ct.udp_stream_timeout)),
    };

    let client = &cfg.client_connection;
    let burst = u32::try_from(client.burst).unwrap_or_else(|_| {
        e.push(FieldError::invalid_raw(
            path("clientConnection.burst"),
            client.burst.to_string(),
            "must be greater than or equal to 0",
        ));
        0
    });

    let oom_score_adj = cfg
        .oom_score_adj
        .unwrap_or(crate::defaults::DEFAULT_OOM_SCORE_ADJ);
    if !(-1000..=1000).contains(&oom_score_adj) {
        let detail = "must be within the range [-1000, 1000]";
        e.push(FieldError::invalid_raw(
            path("oomScoreAdj"),
            oom_score_adj.to_string(),
            detail,
        ));
    }
    let config_sync_period = positive(e, &path("configSyncPeriod"), cfg.config_sync_period);

    let bind_address = cfg.bind_address.parse::<IpAddr>().unwrap_or_else(|_| {
        let detail = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
        e.push(FieldError::invalid_str(
            path("bindAddress"),
            &cfg.bind_address,
            detail,
        ));
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let healthz_bind_address = host_port(e, "healthzBindAddress", &cfg.healthz_bind_address);
    let metrics_bind_address = host_port(e, "metricsBindAddress", &cfg.metrics_bind_address);

    let cluster_cidrs = parse_cluster_cidrs(&cfg.cluster_cidr).unwrap_or_else(|detail| {
        e.push(FieldError::invalid_str(
            path("clusterCIDR"),
            &cfg.cluster_cidr,
            detail,
        ));
        Vec::new()
    });
    if !valid_port_range(&cfg.port_range) {
        let detail = "must be a valid port range (e.g. 300-2000)";
        e.push(FieldError::invalid_str(
            path("portRange"),
            &cfg.port_range,
            detail,
        ));
    }
    let node_port_addresses = node_port_addresses(e, cfg.node_port_addresses.as_deref(), mode);
    if !valid_metrics_version(&cfg.show_hidden_metrics_for_version) {
        let detail = "must be of the form <major>.<minor>, e.g. 1.32";
        let v = &cfg.show_hidden_metrics_for_version;
        e.push(FieldError::invalid_str(
            path("showHiddenMetricsForVersion"),
            v,
            detail,
        ));
    }
    let detect_local = detect_local(e, cfg);

    let log = &cfg.logging;
    if !["text", "json"].contains(&log.format.as_str()) {
        e.push(FieldError::not_supported(
            path("logging.format"),
            &log.format,
            &["json", "text"],
        ));
    }
    let flush_frequency = positive(
        e,
        &path("logging.flushFrequency"),
        log.flush_frequency.duration,
    );

    let trimmed = cfg.hostname_override.trim();
    let proxy = ProxyConfig {
        mode,
        sync_period,
        min_sync_period,
        masquerade_all,
        masquerade_bit,
        cluster_cidrs,
        detect_local,
        node_port_addresses,
        healthz_bind_address,
        metrics_bind_address,
        bind_address,
        bind_address_hard_fail: cfg.bind_address_hard_fail,
        hostname_override: (!trimmed.is_empty()).then(|| trimmed.to_lowercase()),
        client: ClientSettings {
            kubeconfig: (!client.kubeconfig.is_empty()).then(|| PathBuf::from(&client.kubeconfig)),
            master: None,
            content_type: client.content_type.clone(),
            accept_content_types: client.accept_content_types.clone(),
            qps: client.qps,
            burst,
        },
        conntrack,
        config_sync_period,
        oom_score_adj,
        localhost_node_ports: cfg.iptables.localhost_node_ports.unwrap_or(true),
        enable_profiling: cfg.enable_profiling,
        show_hidden_metrics_for_version: cfg.show_hidden_metrics_for_version.clone(),
        feature_gates: cfg.feature_gates.clone(),
        logging: LogSettings {
            format: log.format.clone(),
            verbosity: log.verbosity,
            vmodule: log.vmodule.clone(),
            flush_frequency,
            split_stream: if log.format == "json" {
                log.options.json.split_stream
            } else {
                log.options.text.split_stream
            },
        },
        cleanup: false,
        init_only: false,
        write_config_to: None,
        manifests: None,
        dry_run: false,
        socket_lb: Default::default(),
        config_path: None,
    };
    if errs.is_empty() {
        Ok(proxy)
    } else {
        Err(errs)
    }
}

impl ProxyConfig {
    /// Validates a defaulted configuration (§9.3) and converts it, applying the platform
    /// defaults. Flag-only options are left unset (`false` / `None`).
    pub fn from_config(cfg: &KubeProxyConfiguration) -> Result<ProxyConfig, ConfigError> {
        build(cfg).map_err(ConfigError::Invalid)
    }

    /// The settings of upstream's defaults (what an empty configuration gives).
    pub fn defaults() -> Result<ProxyConfig, ConfigError> {
        let mut cfg = KubeProxyConfiguration::default();
        crate::defaults::set_defaults(&mut cfg);
        Self::from_config(&cfg)
    }
}
