//! T2.1.3 `--write-config-to` output: upstream's layout, and reading it back is lossless.

use super::{doc, kubeadm_config_conf, resolve_args};
use crate::{GoDuration, KubeProxyConfiguration, VModuleItem, decode, load, set_defaults, to_yaml};

fn round_trip(cfg: &KubeProxyConfiguration) {
    let text = to_yaml(cfg);
    let back = decode(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(back.warnings.is_empty(), "{:?}\n{text}", back.warnings);
    assert_eq!(&back.config, cfg, "\n{text}");
}

/// Upstream's `--write-config-to` output for an empty configuration (v1.33 layout, with the
/// ipvs minSyncPeriod of the v1alpha1 defaults).
const UPSTREAM_DEFAULTS: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 30s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

#[test]
fn t2_1_3_write_config_to_writes_the_defaults_in_upstream_layout() {
    let r = resolve_args(&["--write-config-to=/tmp/out.yaml"], None).unwrap();
    assert_eq!(to_yaml(&r.file_config), UPSTREAM_DEFAULTS);
    round_trip(&r.file_config);
}

#[test]
fn kubeadm_config_conf_round_trips_verbatim() {
    let raw = decode(&kubeadm_config_conf()).unwrap().config;
    assert_eq!(to_yaml(&raw), kubeadm_config_conf());
    round_trip(&raw);
    round_trip(&load(&kubeadm_config_conf()).unwrap().config);
}

#[test]
fn a_configuration_with_every_field_set_round_trips() {
    let mut c = load(&kubeadm_config_conf()).unwrap().config;
    c.feature_gates.insert("AllAlpha".into(), true);
    c.feature_gates.insert("NFTablesProxyMode".into(), true);
    c.client_connection.accept_content_types = "application/json".into();
    c.client_connection.qps = 0.1;
    c.logging.vmodule = vec![VModuleItem {
        file_pattern: "proxier*".into(),
        verbosity: 4,
    }];
    c.logging.verbosity = 2;
    c.logging.options.json.split_stream = true;
    c.logging.options.text.info_buffer_size = "64Ki".into();
    c.logging.flush_frequency.serialize_as_string = false;
    c.hostname_override = "node-1".into();
    c.bind_address = "::".into();
    c.healthz_bind_address = "[::]:10256".into();
    c.bind_address_hard_fail = true;
    c.enable_profiling = true;
    c.show_hidden_metrics_for_version = "1.32".into();
    c.mode = "nftables".into();
    c.iptables.masquerade_all = true;
    c.ipvs.exclude_cidrs = Some(vec!["10.0.0.0/8".into(), "fd00::/8".into()]);
    c.ipvs.scheduler = "rr".into();
    c.ipvs.strict_arp = true;
    c.ipvs.tcp_timeout = GoDuration::from_nanos(1_500_000);
    c.nftables.min_sync_period = GoDuration::from_secs(0);
    c.winkernel.network_name = "true".into();
    c.winkernel.source_vip = "10.0.0.1".into();
    c.winkernel.enable_dsr = true;
    c.detect_local_mode = "BridgeInterface".into();
    c.detect_local.bridge_interface = "cbr0".into();
    c.detect_local.interface_name_prefix = "-veth: #x".into();
    c.cluster_cidr = "10.244.0.0/16,fd00:10:244::/56".into();
    c.node_port_addresses = Some(vec!["primary".into()]);
    c.oom_score_adj = Some(0);
    c.conntrack.udp_timeout = GoDuration::from_secs(30);
    c.conntrack.tcp_be_liberal = true;
    c.port_range = "300-2000".into();
    c.windows_run_as_service = true;
    round_trip(&c);
    let text = to_yaml(&c);
    assert!(
        text.contains("featureGates:\n  AllAlpha: true\n  NFTablesProxyMode: true\n"),
        "{text}"
    );
    assert!(
        text.contains("  excludeCIDRs:\n  - 10.0.0.0/8\n  - fd00::/8\n"),
        "{text}"
    );
    assert!(
        text.contains("  vmodule:\n  - filePattern: proxier*\n    verbosity: 4\n"),
        "{text}"
    );
    assert!(
        text.contains("showHiddenMetricsForVersion: \"1.32\"\n"),
        "{text}"
    );
    assert!(text.contains("  networkName: \"true\"\n"), "{text}");
    assert!(text.contains("  qps: 0.1\n"), "{text}");
    assert!(text.contains("windowsRunAsService: true\n"), "{text}");
}

#[test]
fn empty_lists_and_ambiguous_strings_survive() {
    let mut c = load(&doc("nodePortAddresses: []\n")).unwrap().config;
    c.hostname_override = "null".into();
    c.port_range = "0".into();
    c.detect_local.bridge_interface = "10:30".into();
    c.winkernel.root_hns_endpoint_name = "2001-12-14".into();
    c.winkernel.network_name = "yes".into();
    c.client_connection.kubeconfig = "/path with spaces/kube config".into();
    c.client_connection.content_type = "1e3".into();
    round_trip(&c);
    assert!(to_yaml(&c).contains("nodePortAddresses: []\n"));
}

#[test]
fn output_is_deterministic_and_sorted() {
    let mut c = KubeProxyConfiguration::default();
    set_defaults(&mut c);
    let text = to_yaml(&c);
    assert_eq!(text, to_yaml(&c.clone()));
    let top: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    let mut sorted = top.clone();
    sorted.sort();
    assert_eq!(top, sorted);
}
