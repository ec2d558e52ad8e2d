//! §9.2 defaults and T2.1.3: zero values and nulls are defaulted as upstream's v1alpha1
//! `SetDefaults_KubeProxyConfiguration` does.

use super::{doc, kubeadm_config_conf};
use crate::{GoDuration, KubeProxyConfiguration, append_port_if_needed, load, set_defaults};

fn defaulted(body: &str) -> KubeProxyConfiguration {
    load(&doc(body)).unwrap().config
}

/// Asserts every §9.2 default.
fn assert_upstream_defaults(c: &KubeProxyConfiguration) {
    assert!(c.feature_gates.is_empty());
    assert_eq!(
        c.client_connection.content_type,
        "application/vnd.kubernetes.protobuf"
    );
    assert_eq!(c.client_connection.accept_content_types, "");
    assert_eq!(c.client_connection.qps, 5.0);
    assert_eq!(c.client_connection.burst, 10);
    assert_eq!(c.logging.format, "text");
    assert_eq!(c.logging.flush_frequency.duration, GoDuration::from_secs(5));
    assert!(c.logging.flush_frequency.serialize_as_string);
    assert_eq!(c.logging.verbosity, 0);
    assert_eq!(c.logging.options.text.info_buffer_size, "0");
    assert_eq!(c.logging.options.json.info_buffer_size, "0");
    assert_eq!(c.bind_address, "0.0.0.0");
    assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
    assert_eq!(c.metrics_bind_address, "127.0.0.1:10249");
    assert!(!c.bind_address_hard_fail && !c.enable_profiling);
    assert_eq!(c.mode, "");
    assert_eq!(c.iptables.masquerade_bit, Some(14));
    assert!(!c.iptables.masquerade_all);
    assert_eq!(c.iptables.localhost_node_ports, Some(true));
    assert_eq!(c.iptables.sync_period, GoDuration::from_secs(30));
    assert_eq!(c.iptables.min_sync_period, GoDuration::from_secs(1));
    assert_eq!(c.nftables.masquerade_bit, Some(14));
    assert_eq!(c.nftables.sync_period, GoDuration::from_secs(30));
    assert_eq!(c.nftables.min_sync_period, GoDuration::from_secs(1));
    assert_eq!(c.ipvs.sync_period, GoDuration::from_secs(30));
    assert_eq!(c.ipvs.min_sync_period, GoDuration::ZERO);
    assert_eq!(c.ipvs.exclude_cidrs, None);
    assert_eq!(c.detect_local_mode, "");
    assert_eq!(c.node_port_addresses, None);
    assert_eq!(c.oom_score_adj, Some(-999));
    assert_eq!(c.conntrack.max_per_core, Some(32768));
    assert_eq!(c.conntrack.min, Some(131072));
    assert_eq!(
        c.conntrack.tcp_established_timeout,
        Some(GoDuration::from_secs(24 * 3600))
    );
    assert_eq!(
        c.conntrack.tcp_close_wait_timeout,
        Some(GoDuration::from_secs(3600))
    );
    assert_eq!(c.conntrack.udp_timeout, GoDuration::ZERO);
    assert_eq!(c.conntrack.udp_stream_timeout, GoDuration::ZERO);
    assert_eq!(c.config_sync_period, GoDuration::from_secs(15 * 60));
    assert_eq!(c.port_range, "");
}

#[test]
fn t2_1_3_empty_configuration_gets_the_upstream_defaults() {
    assert_upstream_defaults(&defaulted(""));
}

#[test]
fn t2_1_3_kubeadm_zero_values_are_defaulted() {
    let c = load(&kubeadm_config_conf()).unwrap().config;
    assert_upstream_defaults(&KubeProxyConfiguration {
        cluster_cidr: String::new(),
        client_connection: crate::ClientConnectionConfiguration {
            kubeconfig: String::new(),
            ..c.client_connection.clone()
        },
        ..c.clone()
    });
    assert_eq!(c.cluster_cidr, "10.244.0.0/16");
    assert_eq!(
        c.client_connection.kubeconfig,
        "/var/lib/kube-proxy/kubeconfig.conf"
    );
}

#[test]
fn defaulting_is_idempotent() {
    let mut c = load(&kubeadm_config_conf()).unwrap().config;
    let once = c.clone();
    set_defaults(&mut c);
    assert_eq!(c, once);
}

#[test]
fn explicit_values_are_kept() {
    let c = defaulted(
        "iptables:\n  masqueradeBit: 0\n  localhostNodePorts: false\n  minSyncPeriod: 5s\nconntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 0s\noomScoreAdj: 0\nclientConnection:\n  qps: 0.5\n",
    );
    assert_eq!(c.iptables.masquerade_bit, Some(0));
    assert_eq!(c.iptables.localhost_node_ports, Some(false));
    assert_eq!(c.iptables.min_sync_period, GoDuration::from_secs(5));
    assert_eq!(c.conntrack.max_per_core, Some(0));
    assert_eq!(c.conntrack.tcp_established_timeout, Some(GoDuration::ZERO));
    assert_eq!(c.oom_score_adj, Some(0));
    assert_eq!(c.client_connection.qps, 0.5);
}

#[test]
fn ipv6_bind_address_gives_ipv6_server_defaults() {
    let c = defaulted("bindAddress: \"::\"\n");
    assert_eq!(c.healthz_bind_address, "[::]:10256");
    assert_eq!(c.metrics_bind_address, "[::1]:10249");
    let c = defaulted("bindAddress: 10.0.0.9\n");
    assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
}

#[test]
fn bind_addresses_without_a_port_get_the_default_port() {
    let c = defaulted("healthzBindAddress: 0.0.0.0\nmetricsBindAddress: \"::1\"\n");
    assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
    assert_eq!(c.metrics_bind_address, "[::1]:10249");
}

#[test]
fn append_port_if_needed_matches_upstream() {
    let cases = [
        ("0.0.0.0", "0.0.0.0:10256"),
        ("1.2.3.4:99", "1.2.3.4:99"),
        ("::", "[::]:10256"),
        ("[::]:99", "[::]:99"),
        ("fd00::1", "[fd00::1]:10256"),
        ("not-an-ip", "not-an-ip"),
        ("", ""),
    ];
    for (input, want) in cases {
        assert_eq!(append_port_if_needed(input, 10256), want, "{input}");
    }
}

#[test]
fn flush_frequency_in_nanoseconds_is_kept_as_nanoseconds() {
    let c = defaulted("logging:\n  flushFrequency: 1000000000\n");
    assert_eq!(c.logging.flush_frequency.duration, GoDuration::from_secs(1));
    assert!(!c.logging.flush_frequency.serialize_as_string);
}
