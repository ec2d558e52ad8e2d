//! v1alpha1 defaulting, as upstream's `SetDefaults_KubeProxyConfiguration` plus component-base's
//! `SetRecommendedLoggingConfiguration`.
//!
//! Zero values count as unset (kubeadm writes `syncPeriod: 0s`, `qps: 0`, `healthzBindAddress: ""`),
//! `null` pointers get their defaults, and bind addresses without a port get the default port
//! (`AppendPortIfNeeded`). Platform defaults (`mode: ""` means iptables, §2.1 step 2) are not
//! applied here: they belong to resolution, so the defaulted document keeps `mode: ""`.

use std::net::{IpAddr, SocketAddr};

use crate::duration::GoDuration;
use crate::logging::OutputRoutingOptions;
use crate::types::KubeProxyConfiguration;

/// Port of the health server (`ports.ProxyHealthzPort`).
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;
/// Port of the metrics server (`ports.ProxyStatusPort`).
pub const DEFAULT_METRICS_PORT: u16 = 10249;
/// `qos.KubeProxyOOMScoreAdj`.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -999;
/// Default fwmark bit for masquerading.
pub const DEFAULT_MASQUERADE_BIT: i32 = 14;

/// Fills unset (zero or `null`) fields with upstream's v1alpha1 defaults. Idempotent.
pub fn set_defaults(cfg: &mut KubeProxyConfiguration) {
    if cfg.bind_address.is_empty() {
        cfg.bind_address = "0.0.0.0".to_string();
    }
    let (healthz_host, metrics_host) = default_hosts(&cfg.bind_address);
    if cfg.healthz_bind_address.is_empty() {
        cfg.healthz_bind_address = format!("{healthz_host}:{DEFAULT_HEALTHZ_PORT}");
    } else {
        cfg.healthz_bind_address =
            append_port_if_needed(&cfg.healthz_bind_address, DEFAULT_HEALTHZ_PORT);
    }
    if cfg.metrics_bind_address.is_empty() {
        cfg.metrics_bind_address = format!("{metrics_host}:{DEFAULT_METRICS_PORT}");
    } else {
        cfg.metrics_bind_address =
            append_port_if_needed(&cfg.metrics_bind_address, DEFAULT_METRICS_PORT);
    }

    cfg.oom_score_adj.get_or_insert(DEFAULT_OOM_SCORE_ADJ);

    let ipt = &mut cfg.iptables;
    default_duration(&mut ipt.sync_period, 30);
    default_duration(&mut ipt.min_sync_period, 1);
    ipt.localhost_node_ports.get_or_insert(true);
    ipt.masquerade_bit.get_or_insert(DEFAULT_MASQUERADE_BIT);

    // Upstream defaults only the ipvs syncPeriod; its minSyncPeriod stays 0s.
    default_duration(&mut cfg.ipvs.sync_period, 30);

    let nft = &mut cfg.nftables;
    default_duration(&mut nft.sync_period, 30);
    default_duration(&mut nft.min_sync_period, 1);
    nft.masquerade_bit.get_or_insert(DEFAULT_MASQUERADE_BIT);

    let ct = &mut cfg.conntrack;
    ct.max_per_core.get_or_insert(32 * 1024);
    ct.min.get_or_insert(128 * 1024);
    ct.tcp_established_timeout
        .get_or_insert(GoDuration::from_secs(24 * 3600));
    ct.tcp_close_wait_timeout
        .get_or_insert(GoDuration::from_secs(3600));

    default_duration(&mut cfg.config_sync_period, 15 * 60);

    let client = &mut cfg.client_connection;
    if client.content_type.is_empty() {
        client.content_type = "application/vnd.kubernetes.protobuf".to_string();
    }
    if client.qps == 0.0 {
        client.qps = 5.0;
    }
    if client.burst == 0 {
        client.burst = 10;
    }

    let logging = &mut cfg.logging;
    if logging.format.is_empty() {
        logging.format = "text".to_string();
    }
    if logging.flush_frequency.duration.is_zero() {
        logging.flush_frequency.duration = GoDuration::from_secs(5);
        logging.flush_frequency.serialize_as_string = true;
    }
    default_output_routing(&mut logging.options.text);
    default_output_routing(&mut logging.options.json);
}

/// Upstream's `proxyutil.AppendPortIfNeeded`: an `IP` becomes `IP:port` (`[IP]:port` for IPv6);
/// anything already `host:port`, or not an IP, is returned unchanged for validation to judge.
pub fn append_port_if_needed(addr: &str, port: u16) -> String {
    if split_host_port(addr).is_some() {
        return addr.to_string();
    }
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => format!("{addr}:{port}"),
        Ok(IpAddr::V6(_)) => format!("[{addr}]:{port}"),
        Err(_) => addr.to_string(),
    }
}

/// Go's `net.SplitHostPort` for the forms we accept: `host:port` or `[host]:port`.
pub(crate) fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return (!port.contains(':')).then_some((host, port));
    }
    let (host, port) = addr.rsplit_once(':')?;
    (!host.contains(':')).then_some((host, port))
}

/// Parses `IP:port` / `[IPv6]:port`.
pub(crate) fn parse_socket_addr(addr: &str) -> Option<SocketAddr> {
    let (host, port) = split_host_port(addr)?;
    let ip: IpAddr = host.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

/// Default health and metrics hosts for a bind address: IPv4 (or unparsable-as-IPv4 empty
/// default) gives `0.0.0.0` / `127.0.0.1`, anything else `[::]` / `[::1]`, as upstream.
fn default_hosts(bind_address: &str) -> (&'static str, &'static str) {
    match bind_address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => ("0.0.0.0", "127.0.0.1"),
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => ("0.0.0.0", "127.0.0.1"),
        _ => ("[::]", "[::1]"),
    }
}

fn default_duration(d: &mut GoDuration, secs: i64) {
    if d.is_zero() {
        *d = GoDuration::from_secs(secs);
    }
}

fn default_output_routing(o: &mut OutputRoutingOptions) {
    if o.info_buffer_size.is_empty() {
        o.info_buffer_size = "0".to_string();
    }
}
