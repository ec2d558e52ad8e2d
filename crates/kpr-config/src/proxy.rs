//! `ProxyConfig`: the typed, validated settings the daemon runs with.
//!
//! Built from a defaulted `KubeProxyConfiguration` by [`ProxyConfig::from_config`], which applies
//! the platform defaults of §2.1 step 2 (`mode: ""` is iptables, `detectLocalMode: ""` is
//! ClusterCIDR, nftables with unset `nodePortAddresses` is `primary`) and validation (§9.3).
//! Process options that only flags carry (`--cleanup`, `--master`, ...) are filled by `resolve`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::logging::VModuleItem;

/// The proxy backends kube-proxy-rs implements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// `iptables` (also what `mode: ""` means).
    #[default]
    Iptables,
    /// `nftables`.
    Nftables,
}

impl ProxyMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        }
    }
}

/// How "traffic from a local pod" is recognised (§4.10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectLocal {
    /// Source inside the first `clusterCIDR` of the family (default).
    ClusterCidr,
    /// Source inside the node's first `spec.podCIDRs` entry of the family.
    NodeCidr,
    /// Input interface equals this bridge.
    BridgeInterface(String),
    /// Input interface name starts with this prefix.
    InterfaceNamePrefix(String),
}

/// Which node addresses accept NodePort traffic (§4.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset: all local addresses (iptables). Never produced for nftables, where unset means
    /// [`NodePortAddresses::Primary`] (§2.1 step 2).
    Default,
    /// The node's primary IP of each family (from the Node object).
    Primary,
    /// Local addresses inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

/// Conntrack sysctl settings (§6.1). `None` means "leave the kernel's value as is" (a 0 in the
/// configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// Entries per CPU core.
    pub max_per_core: Option<u32>,
    /// Lower bound of nf_conntrack_max.
    pub min: Option<u32>,
    /// nf_conntrack_tcp_timeout_established.
    pub tcp_established_timeout: Option<Duration>,
    /// nf_conntrack_tcp_timeout_close_wait.
    pub tcp_close_wait_timeout: Option<Duration>,
    /// nf_conntrack_tcp_be_liberal = 1.
    pub tcp_be_liberal: bool,
    /// nf_conntrack_udp_timeout.
    pub udp_timeout: Option<Duration>,
    /// nf_conntrack_udp_timeout_stream.
    pub udp_stream_timeout: Option<Duration>,
}

/// API server client settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSettings {
    /// Kubeconfig path; `None` means in-cluster (unless `master` is set).
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: overrides the kubeconfig's server.
    pub master: Option<String>,
    /// Content-Type of requests.
    pub content_type: String,
    /// Accept header; empty means the client's default.
    pub accept_content_types: String,
    /// Requests per second.
    pub qps: f32,
    /// Burst.
    pub burst: u32,
}

/// Logging settings (the daemon owns the logger).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// "text" or "json".
    pub format: String,
    /// klog verbosity.
    pub verbosity: u32,
    /// Per-file verbosity.
    pub vmodule: Vec<VModuleItem>,
    /// Flush interval.
    pub flush_frequency: Duration,
    /// Info messages to stdout, errors to stderr (the format's `splitStream` option); else
    /// everything to stderr.
    pub split_stream: bool,
}

/// Everything the daemon needs, typed and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Backend.
    pub mode: ProxyMode,
    /// Full resync interval (from the `nftables:` block in nftables mode, else `iptables:`).
    pub sync_period: Duration,
    /// Minimum interval between syncs (same block as `sync_period`).
    pub min_sync_period: Duration,
    /// SNAT all ClusterIP traffic (same block as `sync_period`).
    pub masquerade_all: bool,
    /// fwmark bit for masquerading, 0-31 (same block as `sync_period`).
    pub masquerade_bit: u8,
    /// Pod CIDRs, at most one per family, in configuration order.
    pub cluster_cidrs: Vec<IpNet>,
    /// Local-traffic detector.
    pub detect_local: DetectLocal,
    /// NodePort addresses.
    pub node_port_addresses: NodePortAddresses,
    /// Health server address; `None` when disabled.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Metrics server address; `None` when disabled.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Primary-IP override; unspecified (0.0.0.0 / ::) means "from the Node".
    pub bind_address: IpAddr,
    /// Exit when the health or metrics port cannot be bound.
    pub bind_address_hard_fail: bool,
    /// Node name override, trimmed and lower-cased; `None` means the OS hostname.
    pub hostname_override: Option<String>,
    /// API server client.
    pub client: ClientSettings,
    /// Conntrack sysctls.
    pub conntrack: ConntrackSettings,
    /// Informer resync interval.
    pub config_sync_period: Duration,
    /// oom_score_adj.
    pub oom_score_adj: i32,
    /// Allow NodePorts on 127.0.0.1 (iptables, IPv4).
    pub localhost_node_ports: bool,
    /// Serve /debug/pprof.
    pub enable_profiling: bool,
    /// `showHiddenMetricsForVersion`, empty when unset.
    pub show_hidden_metrics_for_version: String,
    /// Gates given in the configuration (only known gates; see `feature_gates`).
    pub feature_gates: BTreeMap<String, bool>,
    /// Logging.
    pub logging: LogSettings,
    /// `--cleanup`: remove all rules and exit.
    pub cleanup: bool,
    /// `--init-only`: do privileged setup and exit.
    pub init_only: bool,
    /// `--write-config-to`: write the effective v1alpha1 document there and exit.
    pub write_config_to: Option<PathBuf>,
    /// `--manifests`: read objects from this directory instead of an API server.
    pub manifests: Option<PathBuf>,
    /// `--dry-run`: compute once, print, exit.
    pub dry_run: bool,
    /// `--socket-lb`, `--socket-lb-cgroup`, `--socket-lb-pin-dir`.
    pub socket_lb: SocketLb,
    /// `--config`: the file read, watched for changes (§2.3).
    pub config_path: Option<PathBuf>,
}

/// Socket-level load balancing (nftables mode; kube-proxy-rs only, not in the
/// `KubeProxyConfiguration` file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketLb {
    /// `--socket-lb`.
    pub enabled: bool,
    /// `--socket-lb-cgroup`; `None`: the host's cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
    /// `--socket-lb-pin-dir`; `None`: the default under /sys/fs/bpf.
    pub pin_dir: Option<PathBuf>,
}

impl ProxyConfig {
    /// How long the health server waits for a sync before reporting unhealthy (2 x syncPeriod).
    pub fn health_timeout(&self) -> Duration {
        self.sync_period.saturating_mul(2)
    }
}
