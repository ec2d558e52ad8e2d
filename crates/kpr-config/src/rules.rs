//! The individual field rules of validation (§9.3): each parses one value into its typed form or
//! pushes `FieldError`s naming the field (and returns a placeholder), so `validate.rs` can report
//! every problem at once.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::defaults::{parse_socket_addr, split_host_port};
use crate::duration::GoDuration;
use crate::error::FieldError;
use crate::proxy::{DetectLocal, NodePortAddresses, ProxyMode};
use crate::types::KubeProxyConfiguration;

pub(crate) const ROOT: &str = "KubeProxyConfiguration";
const GE_ZERO: &str = "must be greater than or equal to 0";
const LOCAL_MODES: &[&str] = &[
    "ClusterCIDR",
    "NodeCIDR",
    "BridgeInterface",
    "InterfaceNamePrefix",
    "",
];

/// `KubeProxyConfiguration.<p>`.
pub(crate) fn path(p: &str) -> String {
    format!("{ROOT}.{p}")
}

/// Parses `clusterCIDR`: empty, one CIDR, or a comma-separated pair of different families.
pub(crate) fn parse_cluster_cidrs(text: &str) -> Result<Vec<IpNet>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = text.split(',').collect();
    if parts.len() > 2 {
        return Err("only one CIDR allowed or a valid DualStack CIDR (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)".to_string());
    }
    let nets: Vec<IpNet> = parts
        .iter()
        .map(|p| p.parse::<IpNet>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            if parts.len() == 2 {
                "must be a valid DualStack CIDR (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"
                    .to_string()
            } else {
                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)".to_string()
            }
        })?;
    if let [a, b] = nets.as_slice()
        && matches!(a, IpNet::V4(_)) == matches!(b, IpNet::V4(_))
    {
        return Err("must be a valid DualStack CIDR (at most one CIDR per IP family, e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)".to_string());
    }
    Ok(nets)
}

/// `nodePortAddresses`: CIDRs, or the single keyword `primary`; unset is `primary` in nftables.
pub(crate) fn node_port_addresses(
    e: &mut Vec<FieldError>,
    list: Option<&[String]>,
    mode: ProxyMode,
) -> NodePortAddresses {
    let list = match list {
        None | Some([]) if mode == ProxyMode::Nftables => return NodePortAddresses::Primary,
        None | Some([]) => return NodePortAddresses::Default,
        Some(list) => list,
    };
    if list.iter().any(|a| a == "primary") {
        if list.len() != 1 {
            let i = list.iter().position(|a| a == "primary").unwrap_or(0);
            let field = path(&format!("nodePortAddresses[{i}]"));
            e.push(FieldError::invalid_str(
                field,
                "primary",
                "can't use both 'primary' and CIDRs",
            ));
        }
        return NodePortAddresses::Primary;
    }
    let mut cidrs = Vec::new();
    for (i, a) in list.iter().enumerate() {
        match a.parse::<IpNet>() {
            Ok(net) => cidrs.push(net),
            Err(_) => {
                let detail = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
                e.push(FieldError::invalid_str(
                    path(&format!("nodePortAddresses[{i}]")),
                    a,
                    detail,
                ));
            }
        }
    }
    NodePortAddresses::Cidrs(cidrs)
}

/// `detectLocalMode` with the interface name its interface modes need.
pub(crate) fn detect_local(e: &mut Vec<FieldError>, cfg: &KubeProxyConfiguration) -> DetectLocal {
    let mut named = |field: &str, name: &str, make: fn(String) -> DetectLocal| {
        if name.is_empty() {
            e.push(FieldError::invalid_str(
                path(field),
                name,
                "must not be empty",
            ));
        }
        make(name.to_string())
    };
    match cfg.detect_local_mode.as_str() {
        "" | "ClusterCIDR" => DetectLocal::ClusterCidr,
        "NodeCIDR" => DetectLocal::NodeCidr,
        "BridgeInterface" => named(
            "detectLocal.bridgeInterface",
            &cfg.detect_local.bridge_interface,
            DetectLocal::BridgeInterface,
        ),
        "InterfaceNamePrefix" => named(
            "detectLocal.interfaceNamePrefix",
            &cfg.detect_local.interface_name_prefix,
            DetectLocal::InterfaceNamePrefix,
        ),
        other => {
            e.push(FieldError::not_supported(
                path("detectLocalMode"),
                other,
                LOCAL_MODES,
            ));
            DetectLocal::ClusterCidr
        }
    }
}

pub(crate) fn positive(e: &mut Vec<FieldError>, field: &str, d: GoDuration) -> Duration {
    match d.to_std().filter(|d| !d.is_zero()) {
        Some(d) => d,
        None => {
            e.push(FieldError::invalid_str(
                field,
                &d.to_string(),
                "must be greater than 0",
            ));
            Duration::ZERO
        }
    }
}

pub(crate) fn non_negative(e: &mut Vec<FieldError>, field: &str, d: GoDuration) -> Duration {
    d.to_std().unwrap_or_else(|| {
        e.push(FieldError::invalid_str(field, &d.to_string(), GE_ZERO));
        Duration::ZERO
    })
}

/// A conntrack timeout: 0 (or unset) means "leave as is".
pub(crate) fn timeout(
    e: &mut Vec<FieldError>,
    field: &str,
    d: Option<GoDuration>,
) -> Option<Duration> {
    let d = d?;
    Some(non_negative(e, &path(field), d)).filter(|d| !d.is_zero())
}

/// A conntrack count: 0 (or unset) means "leave as is".
pub(crate) fn count(e: &mut Vec<FieldError>, field: &str, v: Option<i32>) -> Option<u32> {
    let v = v?;
    match u32::try_from(v) {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(_) => {
            e.push(FieldError::invalid_raw(path(field), v.to_string(), GE_ZERO));
            None
        }
    }
}

pub(crate) fn masquerade_bit(e: &mut Vec<FieldError>, block: &str, bit: Option<i32>) -> u8 {
    let bit = bit.unwrap_or(crate::defaults::DEFAULT_MASQUERADE_BIT);
    match u8::try_from(bit) {
        Ok(b) if b <= 31 => b,
        _ => {
            let field = path(&format!("{block}.masqueradeBit"));
            e.push(FieldError::invalid_raw(
                field,
                bit.to_string(),
                "must be within the range [0, 31]",
            ));
            0
        }
    }
}

/// An `IP:port` address; empty means disabled.
pub(crate) fn host_port(e: &mut Vec<FieldError>, field: &str, addr: &str) -> Option<SocketAddr> {
    if addr.is_empty() {
        return None;
    }
    let field = path(field);
    let Some((host, port)) = split_host_port(addr) else {
        e.push(FieldError::invalid_str(field, addr, "must be IP:port"));
        return None;
    };
    if host.parse::<IpAddr>().is_err() {
        e.push(FieldError::invalid_str(&field, host, "must be a valid IP"));
    }
    if !matches!(port.parse::<u16>(), Ok(p) if p >= 1) {
        e.push(FieldError::invalid_str(
            &field,
            port,
            "must be a valid port",
        ));
    }
    parse_socket_addr(addr)
}

/// `utilnet.ParsePortRange`: "", "low-high" or "base+size", within 0-65535.
pub(crate) fn valid_port_range(text: &str) -> bool {
    let text = text.trim();
    if text.is_empty() {
        return true;
    }
    let num = |s: &str| s.parse::<u32>().ok().filter(|n| *n <= 65535);
    if let Some((low, high)) = text.split_once('-') {
        matches!((num(low), num(high)), (Some(l), Some(h)) if l <= h)
    } else if let Some((base, size)) = text.split_once('+') {
        matches!((num(base), num(size)), (Some(b), Some(s)) if b + s <= 65536)
    } else {
        false
    }
}

pub(crate) fn valid_metrics_version(v: &str) -> bool {
    if v.is_empty() {
        return true;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    matches!(v.split_once('.'), Some((major, minor)) if digits(major) && digits(minor))
}

/// Go's `%v` of a `map[string]bool`.
pub(crate) fn render_gates(cfg: &KubeProxyConfiguration) -> String {
    let parts: Vec<String> = cfg
        .feature_gates
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect();
    format!("map[{}]", parts.join(" "))
}
