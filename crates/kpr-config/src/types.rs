//! The `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration` document, field for field.
//!
//! Mirrors kubernetes/kube-proxy `config/v1alpha1/types.go` and component-base's
//! `LoggingConfiguration`. Go pointers are `Option` (they may be `null` in a file); every other
//! field takes its zero value when absent or `null`, as Go's JSON decoder does. Nothing here
//! defaults or validates: see `defaults.rs` and `validate.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};

use crate::duration::GoDuration;
use crate::logging::LoggingConfiguration;

/// The only `apiVersion` kube-proxy ships.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The document's `kind`.
pub const KIND: &str = "KubeProxyConfiguration";

/// Everything necessary to configure the proxy (v1alpha1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    /// Always [`API_VERSION`] for a decoded document.
    pub api_version: String,
    /// Always [`KIND`] for a decoded document.
    pub kind: String,
    /// Feature name to enabled (omitted when empty).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub feature_gates: BTreeMap<String, bool>,
    /// API server connection settings.
    pub client_connection: ClientConnectionConfiguration,
    /// Logging settings (component-base).
    pub logging: LoggingConfiguration,
    /// Node name override; empty means the OS hostname.
    pub hostname_override: String,
    /// Overrides the primary node IP; nothing binds to it.
    pub bind_address: String,
    /// `IP:port` of the health server.
    pub healthz_bind_address: String,
    /// `IP:port` of the metrics server.
    pub metrics_bind_address: String,
    /// Treat a failure to bind the health or metrics port as fatal.
    pub bind_address_hard_fail: bool,
    /// Serve /debug/pprof on the metrics server.
    pub enable_profiling: bool,
    /// Version whose hidden metrics are shown ("1.32").
    pub show_hidden_metrics_for_version: String,
    /// "", "iptables", "ipvs", "nftables" (or "kernelspace" on Windows).
    pub mode: String,
    /// iptables mode settings.
    pub iptables: KubeProxyIPTablesConfiguration,
    /// ipvs mode settings (accepted, unused by kube-proxy-rs).
    pub ipvs: KubeProxyIPVSConfiguration,
    /// nftables mode settings.
    pub nftables: KubeProxyNFTablesConfiguration,
    /// Windows settings (accepted, unused).
    pub winkernel: KubeProxyWinkernelConfiguration,
    /// "" (ClusterCIDR), "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix".
    pub detect_local_mode: String,
    /// Settings for the interface-based local-traffic detectors.
    pub detect_local: DetectLocalConfiguration,
    /// Pod CIDR(s), comma-separated, at most one per family.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    /// CIDRs of node IPs that accept NodePorts, or `["primary"]`; `null` = unset.
    pub node_port_addresses: Option<Vec<String>>,
    /// oom_score_adj of the process.
    pub oom_score_adj: Option<i32>,
    /// Conntrack sysctls.
    pub conntrack: KubeProxyConntrackConfiguration,
    /// How often informers resync.
    pub config_sync_period: GoDuration,
    /// Unused since the userspace proxy was removed.
    pub port_range: String,
    /// Windows only (omitted when false).
    #[serde(skip_serializing_if = "is_false")]
    pub windows_run_as_service: bool,
}

impl Default for KubeProxyConfiguration {
    /// An empty document with its type fields set (what an empty file decodes to, undefaulted).
    fn default() -> Self {
        KubeProxyConfiguration {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            feature_gates: BTreeMap::new(),
            client_connection: ClientConnectionConfiguration::default(),
            logging: LoggingConfiguration::default(),
            hostname_override: String::new(),
            bind_address: String::new(),
            healthz_bind_address: String::new(),
            metrics_bind_address: String::new(),
            bind_address_hard_fail: false,
            enable_profiling: false,
            show_hidden_metrics_for_version: String::new(),
            mode: String::new(),
            iptables: KubeProxyIPTablesConfiguration::default(),
            ipvs: KubeProxyIPVSConfiguration::default(),
            nftables: KubeProxyNFTablesConfiguration::default(),
            winkernel: KubeProxyWinkernelConfiguration::default(),
            detect_local_mode: String::new(),
            detect_local: DetectLocalConfiguration::default(),
            cluster_cidr: String::new(),
            node_port_addresses: None,
            oom_score_adj: None,
            conntrack: KubeProxyConntrackConfiguration::default(),
            config_sync_period: GoDuration::ZERO,
            port_range: String::new(),
            windows_run_as_service: false,
        }
    }
}

/// component-base `ClientConnectionConfiguration`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientConnectionConfiguration {
    /// Path to a kubeconfig; empty means in-cluster (unless `--master`).
    pub kubeconfig: String,
    /// Accept header.
    pub accept_content_types: String,
    /// Content type of requests.
    pub content_type: String,
    /// Client-side rate limit.
    #[serde(serialize_with = "serialize_f32_short")]
    pub qps: f32,
    /// Client-side burst.
    pub burst: i32,
}

/// `iptables:` block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPTablesConfiguration {
    /// fwmark bit for SNAT, 0-31.
    pub masquerade_bit: Option<i32>,
    /// SNAT all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// Allow NodePorts on 127.0.0.1 (IPv4 iptables only).
    pub localhost_node_ports: Option<bool>,
    /// Full resync interval.
    pub sync_period: GoDuration,
    /// Minimum interval between syncs.
    pub min_sync_period: GoDuration,
}

/// `ipvs:` block (accepted, unused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPVSConfiguration {
    /// Full resync interval.
    pub sync_period: GoDuration,
    /// Minimum interval between syncs.
    pub min_sync_period: GoDuration,
    /// IPVS scheduler.
    pub scheduler: String,
    /// CIDRs ipvs cleanup must not touch; `null` = unset.
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    /// arp_ignore / arp_announce.
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    /// Idle TCP timeout.
    pub tcp_timeout: GoDuration,
    /// TCP timeout after FIN.
    pub tcp_fin_timeout: GoDuration,
    /// UDP timeout.
    pub udp_timeout: GoDuration,
}

/// `nftables:` block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyNFTablesConfiguration {
    /// fwmark bit for SNAT, 0-31.
    pub masquerade_bit: Option<i32>,
    /// SNAT all traffic to ClusterIPs.
    pub masquerade_all: bool,
    /// Full resync interval.
    pub sync_period: GoDuration,
    /// Minimum interval between syncs.
    pub min_sync_period: GoDuration,
}

/// `winkernel:` block (Windows; accepted, unused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyWinkernelConfiguration {
    /// HNS network name.
    pub network_name: String,
    /// Source VIP.
    pub source_vip: String,
    /// Direct server return.
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    /// Root HNS endpoint.
    pub root_hns_endpoint_name: String,
    /// Forward the health check VIP.
    pub forward_health_check_vip: bool,
}

/// `detectLocal:` block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DetectLocalConfiguration {
    /// Bridge for `BridgeInterface` mode.
    pub bridge_interface: String,
    /// Prefix for `InterfaceNamePrefix` mode.
    pub interface_name_prefix: String,
}

/// `conntrack:` block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyConntrackConfiguration {
    /// Entries per CPU (0 = leave nf_conntrack_max as is).
    pub max_per_core: Option<i32>,
    /// Minimum nf_conntrack_max.
    pub min: Option<i32>,
    /// Established TCP timeout (0 = leave as is).
    pub tcp_established_timeout: Option<GoDuration>,
    /// CLOSE_WAIT timeout (0 = leave as is).
    pub tcp_close_wait_timeout: Option<GoDuration>,
    /// nf_conntrack_tcp_be_liberal.
    pub tcp_be_liberal: bool,
    /// Unreplied UDP timeout (0 = leave as is).
    pub udp_timeout: GoDuration,
    /// Assured UDP timeout (0 = leave as is).
    pub udp_stream_timeout: GoDuration,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// Writes an f32 as the shortest decimal that reads back as the same f32 ("5", "0.1").
fn serialize_f32_short<S: Serializer>(v: &f32, serializer: S) -> Result<S::Ok, S::Error> {
    let shortest: f64 = v.to_string().parse().unwrap_or(f64::from(*v));
    serializer.serialize_f64(shortest)
}
