//! §9.3 validation: every rule rejects with the field path, and all errors are reported.

use super::{doc, errors_of, resolve_args};
use crate::{ConfigError, FieldErrorKind, KubeProxyConfiguration, load, validate};

/// Asserts the document is rejected with exactly one error equal to `want`.
fn assert_single_error(body: &str, want: &str) {
    assert_eq!(errors_of(body), vec![want.to_string()], "{body:?}");
}

#[test]
fn t9_3_1_primary_mixed_with_cidrs_is_fatal() {
    assert_single_error(
        "nodePortAddresses: [primary, 10.0.0.0/8]\n",
        "KubeProxyConfiguration.nodePortAddresses[0]: Invalid value: \"primary\": can't use both 'primary' and CIDRs",
    );
    assert_eq!(
        errors_of("nodePortAddresses: [10.0.0.0/8, primary]\n").len(),
        1
    );
}

#[test]
fn t9_3_2_masquerade_bit_32_is_fatal() {
    assert_single_error(
        "iptables:\n  masqueradeBit: 32\n",
        "KubeProxyConfiguration.iptables.masqueradeBit: Invalid value: 32: must be within the range [0, 31]",
    );
    assert_eq!(errors_of("nftables:\n  masqueradeBit: -1\n").len(), 1);
    assert!(errors_of("iptables:\n  masqueradeBit: 31\n").is_empty());
    assert!(errors_of("iptables:\n  masqueradeBit: 0\n").is_empty());
}

#[test]
fn t9_3_3_unknown_feature_gate_is_fatal() {
    assert_single_error(
        "featureGates:\n  NoSuchGate: true\n",
        "KubeProxyConfiguration.featureGates: Invalid value: map[NoSuchGate:true]: unrecognized feature gate: NoSuchGate",
    );
}

#[test]
fn t9_3_3_disabling_a_locked_gate_is_fatal_and_known_gates_pass() {
    let errs = errors_of("featureGates:\n  LoadBalancerIPMode: false\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains("locked to true"), "{errs:?}");
    let ok = "featureGates:\n  AllAlpha: false\n  AllBeta: true\n  AllowServiceExternalIPs: false\n  MultiCIDRServiceAllocator: true\n  TopologyAwareHints: true\n  ServiceTrafficDistribution: true\n  PreferSameTrafficDistribution: true\n  KubeProxyDrainingTerminatingNodes: true\n  NFTablesProxyMode: true\n  LoadBalancerIPMode: true\n";
    assert!(errors_of(ok).is_empty());
}

#[test]
fn mode_bogus_is_unsupported_and_lists_the_modes() {
    assert_single_error(
        "mode: bogus\n",
        "KubeProxyConfiguration.mode: Unsupported value: \"bogus\": supported values: \"iptables\", \"nftables\" (proxy mode \"bogus\" is not supported by kube-proxy-rs)",
    );
}

#[test]
fn mode_ipvs_and_kernelspace_are_not_supported_by_kube_proxy_rs() {
    for mode in ["ipvs", "kernelspace", "userspace", "IPTables"] {
        let errs = errors_of(&format!("mode: {mode}\n"));
        assert_eq!(errs.len(), 1, "{mode}: {errs:?}");
        assert!(
            errs[0].contains("not supported by kube-proxy-rs"),
            "{errs:?}"
        );
        assert!(
            errs[0].contains("supported values: \"iptables\", \"nftables\""),
            "{errs:?}"
        );
    }
    for mode in ["\"\"", "iptables", "nftables"] {
        assert!(errors_of(&format!("mode: {mode}\n")).is_empty(), "{mode}");
    }
}

#[test]
fn each_validation_rule_rejects_with_its_field_path() {
    let cases: &[(&str, &str)] = &[
        (
            "iptables:\n  syncPeriod: -1s\n",
            "KubeProxyConfiguration.iptables.syncPeriod: Invalid value: \"-1s\": must be greater than 0",
        ),
        (
            "iptables:\n  minSyncPeriod: -1s\n",
            "KubeProxyConfiguration.iptables.minSyncPeriod: Invalid value: \"-1s\": must be greater than or equal to 0",
        ),
        (
            "iptables:\n  syncPeriod: 5s\n  minSyncPeriod: 10s\n",
            "KubeProxyConfiguration.iptables.minSyncPeriod: Invalid value: \"10s\": must be less than or equal to KubeProxyConfiguration.iptables.syncPeriod",
        ),
        (
            "mode: nftables\nnftables:\n  syncPeriod: -5s\n",
            "KubeProxyConfiguration.nftables.syncPeriod: Invalid value: \"-5s\": must be greater than 0",
        ),
        (
            "configSyncPeriod: -1m\n",
            "KubeProxyConfiguration.configSyncPeriod: Invalid value: \"-1m0s\": must be greater than 0",
        ),
        (
            "oomScoreAdj: 1001\n",
            "KubeProxyConfiguration.oomScoreAdj: Invalid value: 1001: must be within the range [-1000, 1000]",
        ),
        (
            "oomScoreAdj: -1001\n",
            "KubeProxyConfiguration.oomScoreAdj: Invalid value: -1001: must be within the range [-1000, 1000]",
        ),
        (
            "conntrack:\n  maxPerCore: -1\n",
            "KubeProxyConfiguration.conntrack.maxPerCore: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            "conntrack:\n  min: -1\n",
            "KubeProxyConfiguration.conntrack.min: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            "conntrack:\n  tcpEstablishedTimeout: -1s\n",
            "KubeProxyConfiguration.conntrack.tcpEstablishedTimeout: Invalid value: \"-1s\": must be greater than or equal to 0",
        ),
        (
            "conntrack:\n  tcpCloseWaitTimeout: -1s\n",
            "KubeProxyConfiguration.conntrack.tcpCloseWaitTimeout: Invalid value: \"-1s\": must be greater than or equal to 0",
        ),
        (
            "conntrack:\n  udpTimeout: -1s\n",
            "KubeProxyConfiguration.conntrack.udpTimeout: Invalid value: \"-1s\": must be greater than or equal to 0",
        ),
        (
            "conntrack:\n  udpStreamTimeout: -1s\n",
            "KubeProxyConfiguration.conntrack.udpStreamTimeout: Invalid value: \"-1s\": must be greater than or equal to 0",
        ),
        (
            "clientConnection:\n  burst: -1\n",
            "KubeProxyConfiguration.clientConnection.burst: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            "bindAddress: 1.2.3\n",
            "KubeProxyConfiguration.bindAddress: Invalid value: \"1.2.3\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
        ),
        (
            "healthzBindAddress: localhost:10256\n",
            "KubeProxyConfiguration.healthzBindAddress: Invalid value: \"localhost\": must be a valid IP",
        ),
        (
            "healthzBindAddress: 0.0.0.0:0\n",
            "KubeProxyConfiguration.healthzBindAddress: Invalid value: \"0\": must be a valid port",
        ),
        (
            "metricsBindAddress: 127.0.0.1:65536\n",
            "KubeProxyConfiguration.metricsBindAddress: Invalid value: \"65536\": must be a valid port",
        ),
        (
            "metricsBindAddress: nonsense\n",
            "KubeProxyConfiguration.metricsBindAddress: Invalid value: \"nonsense\": must be IP:port",
        ),
        (
            "clusterCIDR: 10.0.0.0/33\n",
            "KubeProxyConfiguration.clusterCIDR: Invalid value: \"10.0.0.0/33\": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
        ),
        (
            "clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n",
            "KubeProxyConfiguration.clusterCIDR: Invalid value: \"10.0.0.0/8,10.1.0.0/16\": must be a valid DualStack CIDR (at most one CIDR per IP family, e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
        ),
        (
            "clusterCIDR: 10.0.0.0/8,fd00::/48,10.1.0.0/16\n",
            "KubeProxyConfiguration.clusterCIDR: Invalid value: \"10.0.0.0/8,fd00::/48,10.1.0.0/16\": only one CIDR allowed or a valid DualStack CIDR (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
        ),
        (
            "nodePortAddresses: [10.0.0.0/8, not-a-cidr]\n",
            "KubeProxyConfiguration.nodePortAddresses[1]: Invalid value: \"not-a-cidr\": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
        ),
        (
            "detectLocalMode: Magic\n",
            "KubeProxyConfiguration.detectLocalMode: Unsupported value: \"Magic\": supported values: \"ClusterCIDR\", \"NodeCIDR\", \"BridgeInterface\", \"InterfaceNamePrefix\", \"\"",
        ),
        (
            "detectLocalMode: BridgeInterface\n",
            "KubeProxyConfiguration.detectLocal.bridgeInterface: Invalid value: \"\": must not be empty",
        ),
        (
            "detectLocalMode: InterfaceNamePrefix\n",
            "KubeProxyConfiguration.detectLocal.interfaceNamePrefix: Invalid value: \"\": must not be empty",
        ),
        (
            "portRange: 2000-300\n",
            "KubeProxyConfiguration.portRange: Invalid value: \"2000-300\": must be a valid port range (e.g. 300-2000)",
        ),
        (
            "showHiddenMetricsForVersion: v1\n",
            "KubeProxyConfiguration.showHiddenMetricsForVersion: Invalid value: \"v1\": must be of the form <major>.<minor>, e.g. 1.32",
        ),
        (
            "logging:\n  format: xml\n",
            "KubeProxyConfiguration.logging.format: Unsupported value: \"xml\": supported values: \"json\", \"text\"",
        ),
        (
            "logging:\n  flushFrequency: -1s\n",
            "KubeProxyConfiguration.logging.flushFrequency: Invalid value: \"-1s\": must be greater than 0",
        ),
    ];
    for (body, want) in cases {
        assert_single_error(body, want);
    }
}

#[test]
fn valid_values_of_each_rule_pass() {
    for body in [
        "clusterCIDR: 10.0.0.0/8,fd00::/48\n",
        "clusterCIDR: fd00::/48\n",
        "nodePortAddresses: [primary]\n",
        "nodePortAddresses: [10.0.0.0/8, fd00::/8]\n",
        "nodePortAddresses: []\n",
        "detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cbr0\n",
        "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: veth\n",
        "detectLocalMode: NodeCIDR\n",
        "portRange: 300-2000\n",
        "portRange: 300+10\n",
        "showHiddenMetricsForVersion: \"1.32\"\n",
        "iptables:\n  minSyncPeriod: 0s\n  syncPeriod: 1s\n",
        "bindAddress: \"::\"\n",
        "healthzBindAddress: \"[::1]:8080\"\n",
        "logging:\n  format: json\n",
        "conntrack:\n  maxPerCore: 0\n  min: 0\n",
    ] {
        assert!(
            errors_of(body).is_empty(),
            "{body:?}: {:?}",
            errors_of(body)
        );
    }
}

#[test]
fn all_errors_are_reported_together() {
    let err = resolve_args(
        &["--config", "f"],
        Some(&doc(
            "mode: ipvs\niptables:\n  masqueradeBit: 40\noomScoreAdj: 5000\nclusterCIDR: x\n",
        )),
    )
    .unwrap_err();
    let ConfigError::Invalid(errs) = &err else {
        panic!("{err}")
    };
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert!(
        errs.iter()
            .any(|e| matches!(e.kind, FieldErrorKind::NotSupported { .. }))
    );
    let text = err.to_string();
    assert!(text.starts_with('[') && text.ends_with(']'), "{text}");
}

#[test]
fn validate_returns_nothing_for_the_defaults() {
    let mut c = KubeProxyConfiguration::default();
    crate::set_defaults(&mut c);
    assert!(validate(&c).is_empty());
    assert!(validate(&load(&super::kubeadm_config_conf()).unwrap().config).is_empty());
}
