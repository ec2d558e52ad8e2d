//! The daemon's side of socket-level load balancing (`--socket-lb`, nftables mode): attach
//! the programs at start or remove what an earlier run attached, say once why it is off, and
//! bring the maps up to date after each sync of the nftables rules.
//!
//! The nftables rules stay in every case: they handle whatever the socket hooks do not see
//! (traffic from outside the node, NodePorts, external and load-balancer IPs), and all of it
//! when socket-lb is off or failed to start.

use kpr_config::{ProxyMode, SocketLb as Settings};
use kpr_model::{DesiredState, IpFamily, ServicePortName, SyncPlan};
use kpr_socklb::SocketLb;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the maps and links are pinned.
pub fn pin_dir(settings: &Settings) -> PathBuf {
    settings
        .pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(kpr_socklb::DEFAULT_PIN_DIR))
}

/// `--socket-lb` asked of a binary built without the BPF programs (no clang at build time):
/// an error to exit with, as for any flag the binary cannot honour. (A kernel that cannot
/// run them is different: one warning, and plain nftables.)
pub fn check_built(settings: &Settings, built_with_bpf: bool) -> Result<(), String> {
    if settings.enabled && !built_with_bpf {
        return Err(format!("--socket-lb: {}", kpr_socklb::Error::NotBuilt));
    }
    Ok(())
}

/// Starts socket-lb when the flag asks for it and the mode allows it (with the cgroup it
/// balances); otherwise removes what an earlier run left pinned (the flag turned off). `None`
/// means plain nftables, with one warning saying why when it was asked for.
pub fn setup(settings: &Settings, mode: ProxyMode) -> Option<(SocketLb, PathBuf)> {
    let pins = pin_dir(settings);
    if !settings.enabled || mode != ProxyMode::Nftables {
        if settings.enabled {
            tracing::warn!(
                mode = mode.as_str(),
                "--socket-lb works on top of the nftables mode only: ignored"
            );
        }
        remove(&pins);
        return None;
    }
    let Some(cgroup) = settings.cgroup.clone().or_else(kpr_socklb::default_cgroup) else {
        tracing::warn!(
            "Socket-level load balancing is off: no cgroup v2 mount found (give --socket-lb-cgroup); plain nftables handles ClusterIP traffic"
        );
        return None;
    };
    match SocketLb::start(&cgroup, &pins) {
        Ok(lb) => {
            tracing::info!(cgroup = %cgroup.display(), pins = %pins.display(), "Socket-level load balancing on: ClusterIP connections from this cgroup are balanced at connect(), without NAT");
            Some((lb, cgroup))
        }
        Err(e) => {
            tracing::warn!(cgroup = %cgroup.display(), "Socket-level load balancing is off: {e}; plain nftables handles ClusterIP traffic");
            None
        }
    }
}

/// Detaches the programs and deletes the maps pinned in `pins` (`--cleanup`, or the flag
/// off); returns false when something could not be removed.
pub fn remove(pins: &Path) -> bool {
    match SocketLb::remove(pins) {
        Ok(true) => {
            tracing::info!(pins = %pins.display(), "Removed the socket-lb programs and maps an earlier run attached");
            true
        }
        Ok(false) => true,
        Err(e) => {
            tracing::warn!(pins = %pins.display(), "Could not remove the socket-lb programs and maps: {e}");
            false
        }
    }
}

/// Socket-lb as the data plane keeps it: the programs, and the families whose maps missed a
/// sync (their rules failed to apply), so their next sync rewrites every entry.
#[derive(Debug)]
pub struct Balancer {
    lb: SocketLb,
    behind: BTreeSet<IpFamily>,
}

impl Balancer {
    pub fn new(lb: SocketLb) -> Balancer {
        Balancer {
            lb,
            behind: BTreeSet::new(),
        }
    }

    /// After a sync of the nftables rules: the same changes in the maps of each family whose
    /// rules were applied (only the plan's ports, or everything on a full sync or when the
    /// family missed one). A failure is logged; the next sync of that family rewrites every
    /// entry.
    pub fn after_sync(&mut self, desired: &DesiredState, plan: &SyncPlan, failed: &[IpFamily]) {
        let changed: Vec<ServicePortName> = if plan.full {
            Vec::new()
        } else {
            plan.changed_ports.iter().cloned().collect()
        };
        for (family, fam) in &desired.families {
            if failed.contains(family) {
                self.behind.insert(*family);
                continue;
            }
            let full = plan.full || self.behind.remove(family);
            let ports = (!full).then_some(changed.as_slice());
            match self.lb.sync(fam, ports) {
                Ok(stats) => tracing::debug!(
                    family = family.label(),
                    full = stats.full,
                    services = stats.services_written,
                    backends = stats.backends_written,
                    deleted = stats.services_deleted + stats.backends_deleted,
                    "Socket-lb maps updated"
                ),
                Err(e) => tracing::warn!(
                    family = family.label(),
                    "Could not update the socket-lb maps (the next sync rewrites them): {e}"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_lb_asked_of_a_binary_without_bpf_is_an_error_naming_what_to_install() {
        let on = Settings {
            enabled: true,
            ..Settings::default()
        };
        let err = check_built(&on, false).unwrap_err();
        assert!(err.contains("built without BPF support"), "{err}");
        assert!(err.contains("clang libbpf-dev"), "{err}");
        assert!(check_built(&on, true).is_ok());
        assert!(check_built(&Settings::default(), false).is_ok());
    }
}
