//! The `kube-proxy-rs` command line: upstream kube-proxy's flags (§9.4) plus our own
//! (`--manifests`, `--dry-run`, `--nftables-*-sync-period`, `--socket-lb*`), parsed
//! pflag-style.
//!
//! Booleans take `--flag` or `--flag=true|false`; lists are comma-separated and may repeat;
//! `-v 2`, `-v=2` and `--v=2` all set the verbosity. Every flag that maps to configuration is an
//! `Option`, so "not given" is distinguishable from "given the default". [`Flags::try_parse_args`]
//! also records which flags were given on the command line (clap's value source).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

use crate::defaults::split_host_port;
use crate::duration::GoDuration;
use crate::logging::VModuleItem;

/// `kube-proxy-rs` flags.
#[derive(Clone, Debug, Default, Parser)]
#[command(
    name = "kube-proxy-rs",
    about = "A drop-in replacement for Kubernetes' kube-proxy (iptables and nftables modes).",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Flags {
    /// The path to the configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// If set, write the effective configuration to this file and exit.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,
    /// If true cleanup iptables and nftables rules and exit.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub cleanup: Option<bool>,
    /// If true, perform privileged initialization and exit.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub init_only: Option<bool>,
    /// key=value pairs that enable or disable features (ignored with --config).
    #[arg(long, value_name = "K=V,...", action = ArgAction::Append, value_parser = parse_gate_list)]
    pub feature_gates: Vec<GateList>,
    /// Path to kubeconfig file with authorization information.
    #[arg(long)]
    pub kubeconfig: Option<String>,
    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long)]
    pub master: Option<String>,
    /// Content type of requests sent to apiserver.
    #[arg(long)]
    pub kube_api_content_type: Option<String>,
    /// Burst to use while talking with kubernetes apiserver.
    #[arg(long, allow_hyphen_values = true)]
    pub kube_api_burst: Option<i32>,
    /// QPS to use while talking with kubernetes apiserver.
    #[arg(long, allow_hyphen_values = true)]
    pub kube_api_qps: Option<f32>,
    /// If non-empty, will be used as the name of the Node (honoured with --config).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Overrides kube-proxy's idea of what its node's primary IP is.
    #[arg(long, value_parser = parse_ip_flag)]
    pub bind_address: Option<String>,
    /// The IP address (and port) for the health check server.
    #[arg(long, value_parser = parse_ip_port_flag)]
    pub healthz_bind_address: Option<String>,
    /// The IP address (and port) for the metrics server; empty disables it.
    #[arg(long, value_parser = parse_ip_port_flag)]
    pub metrics_bind_address: Option<String>,
    /// If true kube-proxy will treat failure to bind to a port as fatal and exit.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub bind_address_hard_fail: Option<bool>,
    /// If true enables profiling via web interface on /debug/pprof handler.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub profiling: Option<bool>,
    /// The previous version for which you want to show hidden metrics.
    #[arg(long)]
    pub show_hidden_metrics_for_version: Option<String>,
    /// Which proxy mode to use: 'iptables' (default) or 'nftables'.
    #[arg(long)]
    pub proxy_mode: Option<String>,
    /// The bit of the fwmark space to mark packets requiring SNAT with (iptables mode).
    #[arg(long, allow_hyphen_values = true)]
    pub iptables_masquerade_bit: Option<i32>,
    /// SNAT all traffic sent via Service cluster IPs.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub masquerade_all: Option<bool>,
    /// If false, NodePorts are not accepted on localhost (iptables mode, IPv4).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub iptables_localhost_nodeports: Option<bool>,
    /// Full resync interval of the iptables and nftables modes.
    #[arg(long, allow_hyphen_values = true)]
    pub iptables_sync_period: Option<GoDuration>,
    /// Minimum interval between syncs of the iptables and nftables modes.
    #[arg(long, allow_hyphen_values = true)]
    pub iptables_min_sync_period: Option<GoDuration>,
    /// Full resync interval of the nftables mode (kube-proxy-rs extension).
    #[arg(long, allow_hyphen_values = true)]
    pub nftables_sync_period: Option<GoDuration>,
    /// Minimum interval between nftables syncs (kube-proxy-rs extension).
    #[arg(long, allow_hyphen_values = true)]
    pub nftables_min_sync_period: Option<GoDuration>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub ipvs_sync_period: Option<GoDuration>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub ipvs_min_sync_period: Option<GoDuration>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, hide = true)]
    pub ipvs_scheduler: Option<String>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, value_delimiter = ',', hide = true)]
    pub ipvs_exclude_cidrs: Option<Vec<String>>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool, hide = true)]
    pub ipvs_strict_arp: Option<bool>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub ipvs_tcp_timeout: Option<GoDuration>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub ipvs_tcpfin_timeout: Option<GoDuration>,
    /// Accepted for compatibility; ipvs is not implemented.
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub ipvs_udp_timeout: Option<GoDuration>,
    /// Mode to use to detect local traffic.
    #[arg(long)]
    pub detect_local_mode: Option<String>,
    /// Bridge interface name for --detect-local-mode=BridgeInterface.
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// Interface name prefix for --detect-local-mode=InterfaceNamePrefix.
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// The CIDR range(s) of the pods in the cluster (comma-separated dual-stack pair).
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// CIDRs of node IPs that accept NodePorts, or 'primary'.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<String>>,
    /// The oom-score-adj value for kube-proxy process, in [-1000, 1000].
    #[arg(long, allow_hyphen_values = true)]
    pub oom_score_adj: Option<i32>,
    /// Maximum number of NAT connections to track per CPU core (0 to leave as-is).
    #[arg(long, allow_hyphen_values = true)]
    pub conntrack_max_per_core: Option<i32>,
    /// Minimum number of conntrack entries to allocate.
    #[arg(long, allow_hyphen_values = true)]
    pub conntrack_min: Option<i32>,
    /// Idle timeout for established TCP connections (0 to leave as-is).
    #[arg(long, allow_hyphen_values = true)]
    pub conntrack_tcp_timeout_established: Option<GoDuration>,
    /// NAT timeout for TCP connections in the CLOSE_WAIT state.
    #[arg(long, allow_hyphen_values = true)]
    pub conntrack_tcp_timeout_close_wait: Option<GoDuration>,
    /// Enable liberal mode for tracking TCP packets.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// Idle timeout for UNREPLIED UDP connections (0 to leave as-is).
    #[arg(long, allow_hyphen_values = true)]
    pub conntrack_udp_timeout: Option<GoDuration>,
    /// Idle timeout for ASSURED UDP connections (0 to leave as-is).
    #[arg(long, allow_hyphen_values = true)]
    pub conntrack_udp_timeout_stream: Option<GoDuration>,
    /// How often configuration from the apiserver is refreshed.
    #[arg(long, allow_hyphen_values = true)]
    pub config_sync_period: Option<GoDuration>,
    /// Deprecated: the port of the health server; 0 disables it (without --config).
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub healthz_port: Option<i32>,
    /// Deprecated: the port of the metrics server; 0 disables it (without --config).
    #[arg(long, allow_hyphen_values = true, hide = true)]
    pub metrics_port: Option<i32>,
    /// Log verbosity.
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub v: Option<u32>,
    /// pattern=N,... settings for file-filtered logging.
    #[arg(long, value_parser = parse_vmodule)]
    pub vmodule: Option<VModuleList>,
    /// Log format: "text" or "json".
    #[arg(long)]
    pub logging_format: Option<String>,
    /// Maximum number of seconds between log flushes.
    #[arg(long)]
    pub log_flush_frequency: Option<GoDuration>,
    /// [Alpha] JSON: info messages to stdout, errors to stderr.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub log_json_split_stream: Option<bool>,
    /// [Alpha] JSON: buffer size of the info stream with split streams.
    #[arg(long)]
    pub log_json_info_buffer_size: Option<String>,
    /// [Alpha] text: info messages to stdout, errors to stderr.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub log_text_split_stream: Option<bool>,
    /// [Alpha] text: buffer size of the info stream with split streams.
    #[arg(long)]
    pub log_text_info_buffer_size: Option<String>,
    /// Print "kube-proxy-rs v<version>" and exit.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub version: Option<bool>,
    /// Read Services, EndpointSlices and the Node from this directory instead of an API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Compute the ruleset once, print it and exit.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub dry_run: Option<bool>,
    /// [nftables mode] Balance ClusterIP connections from this node's processes and pods at
    /// connect() with cgroup eBPF programs: no NAT for them. Falls back to plain nftables when
    /// the kernel lacks the hooks. Off removes what an earlier run attached.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_go_bool)]
    pub socket_lb: Option<bool>,
    /// The cgroup v2 directory the socket-lb programs are attached to (default: the host's
    /// cgroup v2 mount, /sys/fs/cgroup or /sys/fs/cgroup/unified).
    #[arg(long, value_name = "DIR")]
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Where the socket-lb maps and links are pinned (a bpf filesystem), so a restart replaces
    /// them without a gap.
    #[arg(long, value_name = "DIR")]
    pub socket_lb_pin_dir: Option<PathBuf>,
    /// Long names of the flags given on the command line (filled by `try_parse_args`).
    #[arg(skip)]
    pub explicit: BTreeSet<String>,
}

/// One `--feature-gates` value: `Name=true,Other=false`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GateList(pub BTreeMap<String, bool>);

/// One `--vmodule` value: `pattern=N,...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VModuleList(pub Vec<VModuleItem>);

impl Flags {
    /// Parses `args` (program name first), recording which flags were given explicitly.
    pub fn try_parse_args<I, T>(args: I) -> Result<Flags, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let command = Flags::command();
        let matches = command.clone().try_get_matches_from(args)?;
        let mut flags = Flags::from_arg_matches(&matches)?;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches.try_contains_id(id).unwrap_or(false)
                && matches.value_source(id) == Some(ValueSource::CommandLine)
                && let Some(long) = arg.get_long()
            {
                flags.explicit.insert(long.to_string());
            }
        }
        Ok(flags)
    }

    /// Like [`Flags::try_parse_args`], printing the error (or help) and exiting on failure.
    pub fn parse_args<I, T>(args: I) -> Flags
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Flags::try_parse_args(args).unwrap_or_else(|e| e.exit())
    }

    /// Whether `--<long>` was given on the command line.
    pub fn is_explicit(&self, long: &str) -> bool {
        self.explicit.contains(long)
    }

    /// True when `--version` was given (and not `--version=false`).
    pub fn wants_version(&self) -> bool {
        self.version == Some(true)
    }

    /// The `--version` output.
    pub fn version_string() -> String {
        format!("kube-proxy-rs v{}", env!("CARGO_PKG_VERSION"))
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

fn parse_gate_list(s: &str) -> Result<GateList, String> {
    let mut gates = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("missing bool value for {item}"))?;
        let value = parse_go_bool(v.trim()).map_err(|_| format!("invalid value of {k}={v}"))?;
        gates.insert(k.trim().to_string(), value);
    }
    Ok(GateList(gates))
}

fn parse_vmodule(s: &str) -> Result<VModuleList, String> {
    let mut items = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (pattern, level) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} does not have the pattern=N format"))?;
        let verbosity = level
            .parse::<u32>()
            .map_err(|_| format!("parsing verbosity in {item:?}: {level:?} is not a number"))?;
        items.push(VModuleItem {
            file_pattern: pattern.to_string(),
            verbosity,
        });
    }
    Ok(VModuleList(items))
}

/// upstream's `IPVar`: an IP address.
fn parse_ip_flag(s: &str) -> Result<String, String> {
    s.parse::<IpAddr>()
        .map(|_| s.to_string())
        .map_err(|_| format!("{s:?} is not a valid IP address"))
}

/// upstream's `IPPortVar`: empty, an IP, or IP:port.
fn parse_ip_port_flag(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.parse::<IpAddr>().is_ok() {
        return Ok(s.to_string());
    }
    match split_host_port(s) {
        Some((host, port)) if host.parse::<IpAddr>().is_ok() && port.parse::<u16>().is_ok() => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not in a valid format (ip or ip:port)")),
    }
}
