//! The feature gates kube-proxy-rs recognises, and the check upstream's `SetFromMap` makes:
//! an unknown gate, or disabling a gate locked to true (GA), is fatal (§9.1, T9.3.3).
//!
//! Upstream accepts every gate of the Kubernetes tree; we list the gates that concern
//! kube-proxy (its proxiers, Services and EndpointSlices, logging and component pages).

use std::collections::BTreeMap;

/// One known gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownGate {
    /// Gate name.
    pub name: &'static str,
    /// Default in the baseline release (§1).
    pub default: bool,
    /// GA and locked to its default: setting the other value is an error.
    pub locked: bool,
}

const fn gate(name: &'static str, default: bool, locked: bool) -> KnownGate {
    KnownGate {
        name,
        default,
        locked,
    }
}

/// Gates we accept, sorted by name.
pub const KNOWN_GATES: &[KnownGate] = &[
    gate("AllAlpha", false, false),
    gate("AllBeta", false, false),
    gate("AllowServiceExternalIPs", true, false),
    gate("ComponentFlagz", false, false),
    gate("ComponentStatusz", false, false),
    gate("ContextualLogging", true, false),
    gate("KubeProxyDrainingTerminatingNodes", true, true),
    gate("LoadBalancerIPMode", true, true),
    gate("LoggingAlphaOptions", false, false),
    gate("LoggingBetaOptions", true, false),
    gate("MultiCIDRServiceAllocator", true, false),
    gate("NFTablesProxyMode", true, false),
    gate("PreferSameTrafficDistribution", true, false),
    gate("ServiceTrafficDistribution", true, false),
    gate("TopologyAwareHints", true, false),
    gate("WinDSR", false, false),
    gate("WinOverlay", true, false),
    gate("WindowsCPUAndMemoryAffinity", false, false),
];

/// Looks a gate up by exact name.
pub fn known_gate(name: &str) -> Option<&'static KnownGate> {
    KNOWN_GATES.iter().find(|g| g.name == name)
}

/// Checks a `featureGates` map; returns one message per problem, in name order, worded as
/// upstream's feature-gate errors.
pub fn check_feature_gates(gates: &BTreeMap<String, bool>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, &value) in gates {
        match known_gate(name) {
            None => problems.push(format!("unrecognized feature gate: {name}")),
            Some(g) if g.locked && value != g.default => problems.push(format!(
                "cannot set feature gate {name} to {value}, feature is locked to {}",
                g.default
            )),
            Some(_) => {}
        }
    }
    problems
}

/// The effective value of every known gate after applying `overrides` (AllAlpha / AllBeta are
/// not expanded: we do not track maturity beyond the lock).
pub fn effective_gates(overrides: &BTreeMap<String, bool>) -> BTreeMap<String, bool> {
    KNOWN_GATES
        .iter()
        .map(|g| {
            let value = overrides.get(g.name).copied().unwrap_or(g.default);
            (g.name.to_string(), value)
        })
        .collect()
}
