//! What `--write-config-to` writes: the effective configuration as upstream's
//! `writeConfigFile` encodes it (kubernetes/kubernetes `cmd/kube-proxy/app/options.go`), so a
//! diff against upstream's file for the same flags, or the same `--config` file, is empty.
//!
//! Upstream writes its *internal* configuration back as v1alpha1, after `Complete` has applied
//! the Linux platform defaults; both change the document:
//! - `platformApplyDefaults` (`cmd/kube-proxy/app/server_linux.go`): `mode: ""` becomes
//!   `iptables`; nftables with no `nodePortAddresses` gets `[primary]`; `detectLocalMode: ""`
//!   becomes `ClusterCIDR`.
//! - The internal form (`pkg/proxy/apis/config/types.go`) holds one `syncPeriod`,
//!   `minSyncPeriod` and `masqueradeAll`, read from the mode's block and written back to that
//!   block only (`pkg/proxy/apis/config/v1alpha1/conversion.go`): ipvs, nftables, else
//!   iptables for the periods; nftables, else iptables for `masqueradeAll`. The other blocks
//!   are written with `0s` periods and `masqueradeAll: false`. It has no `portRange`, which is
//!   written `""`.

use crate::duration::GoDuration;
use crate::types::KubeProxyConfiguration;
use crate::yaml::to_yaml;

/// The document upstream writes for the effective configuration `cfg` (flags merged, defaults
/// applied, as [`crate::Resolved::file_config`]).
pub fn written(cfg: &KubeProxyConfiguration) -> KubeProxyConfiguration {
    let mut out = cfg.clone();

    // v1alpha1 -> internal: the mode's block, before the platform default of the mode ("" is
    // read as iptables, the default branch).
    let (sync, min_sync) = match cfg.mode.as_str() {
        "ipvs" => (cfg.ipvs.sync_period, cfg.ipvs.min_sync_period),
        "nftables" => (cfg.nftables.sync_period, cfg.nftables.min_sync_period),
        _ => (cfg.iptables.sync_period, cfg.iptables.min_sync_period),
    };
    let masquerade_all = match cfg.mode.as_str() {
        "nftables" => cfg.nftables.masquerade_all,
        _ => cfg.iptables.masquerade_all,
    };
    out.port_range = String::new();

    // platformApplyDefaults (Linux).
    if out.mode.is_empty() {
        out.mode = "iptables".to_owned();
    }
    if out.mode == "nftables" && out.node_port_addresses.as_ref().is_none_or(Vec::is_empty) {
        out.node_port_addresses = Some(vec!["primary".to_owned()]);
    }
    if out.detect_local_mode.is_empty() {
        out.detect_local_mode = "ClusterCIDR".to_owned();
    }

    // internal -> v1alpha1.
    for (period, min) in [
        (
            &mut out.iptables.sync_period,
            &mut out.iptables.min_sync_period,
        ),
        (&mut out.ipvs.sync_period, &mut out.ipvs.min_sync_period),
        (
            &mut out.nftables.sync_period,
            &mut out.nftables.min_sync_period,
        ),
    ] {
        *period = GoDuration::ZERO;
        *min = GoDuration::ZERO;
    }
    out.iptables.masquerade_all = false;
    out.nftables.masquerade_all = false;
    match out.mode.as_str() {
        "ipvs" => {
            out.ipvs.sync_period = sync;
            out.ipvs.min_sync_period = min_sync;
        }
        "nftables" => {
            out.nftables.sync_period = sync;
            out.nftables.min_sync_period = min_sync;
        }
        _ => {
            out.iptables.sync_period = sync;
            out.iptables.min_sync_period = min_sync;
        }
    }
    match out.mode.as_str() {
        "nftables" => out.nftables.masquerade_all = masquerade_all,
        _ => out.iptables.masquerade_all = masquerade_all,
    }
    out
}

/// [`written`] as the YAML upstream writes (see [`to_yaml`]).
pub fn written_yaml(cfg: &KubeProxyConfiguration) -> String {
    to_yaml(&written(cfg))
}
