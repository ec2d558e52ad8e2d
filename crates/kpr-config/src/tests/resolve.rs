//! §2.1 steps 1-3, §2.2 and §9.1/§9.4: flag and file precedence, and the typed result.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use super::{doc, flags, kubeadm_config_conf, resolve_args};
use crate::{
    ConfigError, DetectLocal, GoDuration, NodePortAddresses, ProxyConfig, ProxyMode, resolve,
};

fn addr(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn t9_1_3_nftables_mode_takes_the_nftables_block() {
    let r = resolve_args(
        &["--config", "f"],
        Some(&doc("mode: nftables\nnftables:\n  syncPeriod: 10s\n  masqueradeBit: 3\n  masqueradeAll: true\niptables:\n  syncPeriod: 99s\n")),
    )
    .unwrap();
    assert_eq!(r.proxy.mode, ProxyMode::Nftables);
    assert_eq!(r.proxy.sync_period, Duration::from_secs(10));
    assert_eq!(r.proxy.health_timeout(), Duration::from_secs(20));
    assert_eq!(r.proxy.masquerade_bit, 3);
    assert!(r.proxy.masquerade_all);
    // nftables with unset nodePortAddresses means primary (§2.1 step 2).
    assert_eq!(r.proxy.node_port_addresses, NodePortAddresses::Primary);
}

#[test]
fn t9_1_3_iptables_mode_takes_the_iptables_block() {
    let r = resolve_args(
        &["--config", "f"],
        Some(&doc(
            "nftables:\n  syncPeriod: 10s\niptables:\n  syncPeriod: 99s\n  minSyncPeriod: 2s\n",
        )),
    )
    .unwrap();
    assert_eq!(r.proxy.mode, ProxyMode::Iptables);
    assert_eq!(r.file_config.mode, "");
    assert_eq!(r.proxy.sync_period, Duration::from_secs(99));
    assert_eq!(r.proxy.min_sync_period, Duration::from_secs(2));
    assert_eq!(r.proxy.node_port_addresses, NodePortAddresses::Default);
}

#[test]
fn t9_1_4_masquerade_all_is_ignored_with_config_and_warned() {
    let r = resolve_args(
        &["--config", "f", "--masquerade-all", "--kube-api-qps=50"],
        Some(&doc("")),
    )
    .unwrap();
    assert!(!r.proxy.masquerade_all);
    assert_eq!(r.proxy.client.qps, 5.0);
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(r.warnings.iter().any(|w| w.contains("--masquerade-all")));
    assert!(r.warnings.iter().any(|w| w.contains("--kube-api-qps")));
}

#[test]
fn t9_1_5_hostname_override_flag_wins_and_is_lower_cased() {
    let r = resolve_args(
        &["--config", "f", "--hostname-override= NODE1 "],
        Some(&doc("hostnameOverride: other\n")),
    )
    .unwrap();
    assert_eq!(r.proxy.hostname_override.as_deref(), Some("node1"));
    assert_eq!(r.file_config.hostname_override, "node1");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn hostname_override_from_the_file_is_trimmed_and_lower_cased() {
    let r = resolve_args(
        &["--config", "f"],
        Some(&doc("hostnameOverride: \" Node-A \"\n")),
    )
    .unwrap();
    assert_eq!(r.proxy.hostname_override.as_deref(), Some("node-a"));
    let r = resolve_args(&[], None).unwrap();
    assert_eq!(r.proxy.hostname_override, None);
}

#[test]
fn empty_hostname_override_flag_is_an_error() {
    for value in ["--hostname-override=", "--hostname-override=   "] {
        let err = resolve_args(&[value], None).unwrap_err();
        assert!(matches!(err, ConfigError::EmptyHostnameOverride), "{err}");
    }
}

#[test]
fn t9_4_1_iptables_sync_period_flag_applies_to_nftables_mode() {
    let r = resolve_args(
        &["--proxy-mode", "nftables", "--iptables-sync-period", "5s"],
        None,
    )
    .unwrap();
    assert_eq!(r.proxy.mode, ProxyMode::Nftables);
    assert_eq!(r.proxy.sync_period, Duration::from_secs(5));
    assert_eq!(r.file_config.iptables.sync_period, GoDuration::from_secs(5));
    assert_eq!(r.file_config.nftables.sync_period, GoDuration::from_secs(5));
}

#[test]
fn nftables_sync_flags_set_only_the_nftables_block() {
    let r = resolve_args(
        &[
            "--iptables-sync-period=20s",
            "--nftables-sync-period=7s",
            "--nftables-min-sync-period=0s",
        ],
        None,
    )
    .unwrap();
    assert_eq!(
        r.file_config.iptables.sync_period,
        GoDuration::from_secs(20)
    );
    assert_eq!(r.file_config.nftables.sync_period, GoDuration::from_secs(7));
    assert_eq!(r.file_config.nftables.min_sync_period, GoDuration::ZERO);
    assert_eq!(r.proxy.sync_period, Duration::from_secs(20));
}

#[test]
fn flags_not_given_keep_upstream_defaults_and_zero_flags_are_kept() {
    let r = resolve_args(
        &["--iptables-min-sync-period=0", "--conntrack-max-per-core=0"],
        None,
    )
    .unwrap();
    assert_eq!(r.proxy.min_sync_period, Duration::ZERO);
    assert_eq!(r.proxy.conntrack.max_per_core, None);
    assert_eq!(r.proxy.conntrack.min, Some(131072));
    assert_eq!(r.proxy.sync_period, Duration::from_secs(30));
    assert_eq!(r.proxy.healthz_bind_address, addr("0.0.0.0:10256"));
    assert_eq!(r.proxy.metrics_bind_address, addr("127.0.0.1:10249"));
    assert!(r.warnings.is_empty());
}

#[test]
fn flags_set_the_configuration_without_config() {
    let r = resolve_args(
        &[
            "--masquerade-all",
            "--cluster-cidr=10.0.0.0/8,fd00::/48",
            "--nodeport-addresses=10.0.0.0/8,fd00::/8",
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=veth",
            "--iptables-masquerade-bit=3",
            "--bind-address=10.0.0.9",
            "--kubeconfig=/k",
            "--master=https://api:6443",
            "--feature-gates=AllAlpha=false",
            "--oom-score-adj=-100",
            "--conntrack-tcp-timeout-established=0s",
        ],
        None,
    )
    .unwrap();
    let p = &r.proxy;
    assert!(p.masquerade_all && r.file_config.nftables.masquerade_all);
    assert_eq!(
        p.cluster_cidrs,
        vec!["10.0.0.0/8".parse().unwrap(), "fd00::/48".parse().unwrap()]
    );
    assert_eq!(
        p.node_port_addresses,
        NodePortAddresses::Cidrs(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap()
        ])
    );
    assert_eq!(
        p.detect_local,
        DetectLocal::InterfaceNamePrefix("veth".into())
    );
    assert_eq!(p.masquerade_bit, 3);
    assert_eq!(
        p.bind_address,
        "10.0.0.9".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(
        p.client.kubeconfig.as_deref(),
        Some(std::path::Path::new("/k"))
    );
    assert_eq!(p.client.master.as_deref(), Some("https://api:6443"));
    assert_eq!(p.feature_gates.get("AllAlpha"), Some(&false));
    assert_eq!(p.oom_score_adj, -100);
    assert_eq!(p.conntrack.tcp_established_timeout, None);
}

#[test]
fn proxy_mode_ipvs_flag_is_rejected() {
    let err = resolve_args(&["--proxy-mode", "ipvs"], None).unwrap_err();
    assert!(
        err.to_string().contains("not supported by kube-proxy-rs"),
        "{err}"
    );
}

#[test]
fn deprecated_port_flags_disable_or_replace_without_config() {
    let r = resolve_args(&["--healthz-port=0", "--metrics-port=9999"], None).unwrap();
    assert_eq!(r.proxy.healthz_bind_address, None);
    assert_eq!(r.proxy.metrics_bind_address, addr("127.0.0.1:9999"));
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    let r = resolve_args(
        &[
            "--bind-address=::",
            "--healthz-bind-address=::",
            "--healthz-port=8080",
        ],
        None,
    )
    .unwrap();
    assert_eq!(r.proxy.healthz_bind_address, addr("[::]:8080"));
    // Ignored with --config.
    let r = resolve_args(&["--config", "f", "--healthz-port=0"], Some(&doc(""))).unwrap();
    assert_eq!(r.proxy.healthz_bind_address, addr("0.0.0.0:10256"));
    assert_eq!(r.warnings.len(), 1);
}

#[test]
fn logging_flags_win_over_the_file() {
    let r = resolve_args(
        &[
            "--config",
            "f",
            "-v",
            "4",
            "--vmodule=flag=5",
            "--logging-format=json",
        ],
        Some(&doc(
            "logging:\n  verbosity: 1\n  vmodule:\n  - filePattern: file\n    verbosity: 2\n",
        )),
    )
    .unwrap();
    assert_eq!(r.proxy.logging.verbosity, 4);
    assert_eq!(r.proxy.logging.format, "json");
    let patterns: Vec<&str> = r
        .proxy
        .logging
        .vmodule
        .iter()
        .map(|i| i.file_pattern.as_str())
        .collect();
    assert_eq!(patterns, vec!["flag", "file"]);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn kubeadm_config_resolves_without_warnings() {
    let r = resolve_args(
        &[
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=$(NODE_NAME)",
        ],
        Some(&kubeadm_config_conf()),
    );
    let r = r.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let p = &r.proxy;
    assert_eq!(p.mode, ProxyMode::Iptables);
    assert_eq!(p.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
    assert_eq!(p.detect_local, DetectLocal::ClusterCidr);
    assert_eq!(p.node_port_addresses, NodePortAddresses::Default);
    assert_eq!(
        p.config_path.as_deref(),
        Some(std::path::Path::new("/var/lib/kube-proxy/config.conf"))
    );
    assert_eq!(p.conntrack.max_per_core, Some(32768));
    assert_eq!(
        p.conntrack.tcp_close_wait_timeout,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(p.config_sync_period, Duration::from_secs(900));
    assert_eq!(p.client.burst, 10);
    assert!(p.localhost_node_ports);
}

#[test]
fn resolve_reads_the_config_file() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(doc("mode: nftables\n").as_bytes()).unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let r = resolve(&flags(&[
        "--config",
        &path,
        "--dry-run",
        "--manifests=/srv",
    ]))
    .unwrap();
    assert_eq!(r.proxy.mode, ProxyMode::Nftables);
    assert!(r.proxy.dry_run);
    assert_eq!(
        r.proxy.manifests.as_deref(),
        Some(std::path::Path::new("/srv"))
    );
    let err = resolve(&flags(&["--config", "/nonexistent/kube-proxy.yaml"])).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }), "{err}");
}

#[test]
fn proxy_config_defaults_match_an_empty_command_line() {
    let r = resolve_args(&[], None).unwrap();
    assert_eq!(r.proxy, ProxyConfig::defaults().unwrap());
}

/// Issue 18: the socket-lb flags are ours, honoured beside `--config`, off by default, and
/// never part of the `KubeProxyConfiguration` document.
#[test]
fn socket_lb_flags_are_ours_and_off_by_default() {
    let off = resolve(&flags(&[])).unwrap();
    assert_eq!(off.proxy.socket_lb, crate::SocketLb::default());
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(doc("mode: nftables\n").as_bytes()).unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let r = resolve(&flags(&[
        "--config",
        &path,
        "--socket-lb",
        "--socket-lb-cgroup=/sys/fs/cgroup/unified",
        "--socket-lb-pin-dir",
        "/sys/fs/bpf/test",
    ]))
    .unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(
        r.proxy.socket_lb,
        crate::SocketLb {
            enabled: true,
            cgroup: Some("/sys/fs/cgroup/unified".into()),
            pin_dir: Some("/sys/fs/bpf/test".into()),
        }
    );
    assert!(
        !format!("{:?}", r.file_config)
            .to_lowercase()
            .contains("socket")
    );
    let explicit_off = resolve(&flags(&["--socket-lb=false"])).unwrap();
    assert!(!explicit_off.proxy.socket_lb.enabled);
}
