//! T2.1.3 `--write-config-to` output: upstream's document for the same flags (goldens), its
//! layout, and reading it back is lossless.

use super::{doc, kubeadm_config_conf, resolve_args};
use crate::{
    GoDuration, KubeProxyConfiguration, VModuleItem, decode, load, set_defaults, to_yaml, written,
    written_yaml,
};

fn round_trip(cfg: &KubeProxyConfiguration) {
    let text = to_yaml(cfg);
    let back = decode(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(back.warnings.is_empty(), "{:?}\n{text}", back.warnings);
    assert_eq!(&back.config, cfg, "\n{text}");
}

/// The defaulted v1alpha1 document of an empty configuration, upstream's scheme test data
/// (`pkg/proxy/apis/config/scheme/testdata/KubeProxyConfiguration/after/v1alpha1.yaml`, v1.33
/// layout): what `--config` gives before the platform defaults and the internal round trip.
const V1ALPHA1_DEFAULTED: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
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
fn the_defaulted_document_has_upstreams_layout() {
    let r = resolve_args(&["--write-config-to=/tmp/out.yaml"], None).unwrap();
    assert_eq!(to_yaml(&r.file_config), V1ALPHA1_DEFAULTED);
    round_trip(&r.file_config);
}

/// What upstream's `kube-proxy --write-config-to=FILE` writes on Linux, with no other flag
/// (kubernetes/kubernetes `cmd/kube-proxy/app/options.go`, `writeConfigFile`: the internal
/// configuration after `Complete`, encoded as v1alpha1 YAML, keys sorted). Where each value
/// comes from:
/// - `apiVersion`, `kind`: the v1alpha1 encoder;
/// - `bindAddress`, `healthzBindAddress`, `metricsBindAddress`, `oomScoreAdj`, `clientConnection`
///   (`contentType`, `qps`, `burst`), `conntrack` (`maxPerCore`, `min`, `tcp*Timeout`),
///   `configSyncPeriod`, `iptables.masqueradeBit`, `iptables.localhostNodePorts`,
///   `nftables.masqueradeBit`: `SetDefaults_KubeProxyConfiguration`
///   (`pkg/proxy/apis/config/v1alpha1/defaults.go`);
/// - `logging` (`format: text`, `flushFrequency: 5s`, `infoBufferSize: "0"`): component-base's
///   `SetRecommendedLoggingConfiguration`;
/// - `mode: iptables`, `detectLocalMode: ClusterCIDR`: `platformApplyDefaults`
///   (`cmd/kube-proxy/app/server_linux.go`), applied in `Complete` before writing;
/// - `iptables.syncPeriod: 30s`, `iptables.minSyncPeriod: 1s`: the internal `syncPeriod` and
///   `minSyncPeriod` (read from the defaulted iptables block), written back to the block of the
///   mode only (`Convert_config_KubeProxyConfiguration_To_v1alpha1_KubeProxyConfiguration`,
///   `pkg/proxy/apis/config/v1alpha1/conversion.go`); so `ipvs` and `nftables` get `0s`;
/// - `portRange: ""`: the internal configuration has no such field;
/// - `featureGates` (an empty map), `windowsRunAsService` (false): `omitempty`, left out.
const UPSTREAM_WRITTEN_NO_FLAGS: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
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
detectLocalMode: ClusterCIDR
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
  syncPeriod: 0s
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
mode: iptables
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 0s
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

/// Upstream's output for `--proxy-mode=nftables --masquerade-all --iptables-sync-period=10s
/// --iptables-min-sync-period=0s --cluster-cidr=10.244.0.0/16,fd00:10:244::/56
/// --hostname-override=Node-A --v=2 --logging-format=json --healthz-port=0`. Beyond the
/// defaults above:
/// - `mode: nftables` and `clusterCIDR` (joined back from the internal list): the flags;
/// - `nodePortAddresses: [primary]`: `platformApplyDefaults` (nftables, none given);
/// - `nftables.syncPeriod: 10s`, `minSyncPeriod: 0s`: `--iptables-*sync-period` set the
///   internal periods of every mode but ipvs (`processV1Alpha1Flags`), written to the nftables
///   block; `iptables` and `ipvs` get `0s`;
/// - `nftables.masqueradeAll: true`: `--masquerade-all` sets the internal
///   `linux.masqueradeAll`, written to the nftables block only;
/// - `hostnameOverride: node-a`: `processHostnameOverrideFlag` (trimmed, lower-cased);
/// - `logging.format`, `logging.verbosity`: the logging flags, bound to the configuration;
/// - `healthzBindAddress` unchanged: `--healthz-port` is ignored with `--write-config-to`
///   (`Complete`).
const UPSTREAM_WRITTEN_NFTABLES: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
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
detectLocalMode: ClusterCIDR
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: node-a
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: json
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 2
metricsBindAddress: 127.0.0.1:10249
mode: nftables
nftables:
  masqueradeAll: true
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 10s
nodePortAddresses:
- primary
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
fn t2_1_3_write_config_to_without_config_writes_what_upstream_writes() {
    let r = resolve_args(&["--write-config-to=/tmp/out.yaml"], None).unwrap();
    assert_eq!(written_yaml(&r.file_config), UPSTREAM_WRITTEN_NO_FLAGS);
    let r = resolve_args(
        &[
            "--write-config-to=/tmp/out.yaml",
            "--proxy-mode=nftables",
            "--masquerade-all",
            "--iptables-sync-period=10s",
            "--iptables-min-sync-period=0s",
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
            "--hostname-override=Node-A",
            "--v=2",
            "--logging-format=json",
            "--healthz-port=0",
        ],
        None,
    )
    .unwrap();
    assert_eq!(written_yaml(&r.file_config), UPSTREAM_WRITTEN_NFTABLES);
}

#[test]
fn the_written_document_reads_back_to_the_same_configuration_and_is_stable() {
    for (args, config) in [
        (&["--write-config-to=x"][..], None),
        (
            &[
                "--write-config-to=x",
                "--proxy-mode=nftables",
                "--masquerade-all",
            ][..],
            None,
        ),
        (
            &["--config=f", "--write-config-to=x"][..],
            Some(kubeadm_config_conf()),
        ),
        (
            &["--config=f", "--write-config-to=x"][..],
            Some(doc(
                "mode: nftables\nportRange: 100-200\nnftables:\n  syncPeriod: 7s\n",
            )),
        ),
    ] {
        let r = resolve_args(args, config.as_deref()).unwrap();
        let text = written_yaml(&r.file_config);
        // Read back (as --config), it gives the same typed settings and the same document.
        let again = resolve_args(&["--config=f", "--write-config-to=y"], Some(&text)).unwrap();
        assert_eq!(again.proxy.sync_period, r.proxy.sync_period, "{text}");
        assert_eq!(again.proxy.min_sync_period, r.proxy.min_sync_period);
        assert_eq!(again.proxy.masquerade_all, r.proxy.masquerade_all);
        assert_eq!(again.proxy.mode, r.proxy.mode);
        assert_eq!(again.proxy.node_port_addresses, r.proxy.node_port_addresses);
        assert_eq!(again.proxy.detect_local, r.proxy.detect_local);
        assert_eq!(written_yaml(&again.file_config), text, "{args:?}");
        assert_eq!(written(&written(&r.file_config)), written(&r.file_config));
    }
    let r = resolve_args(
        &["--config=f", "--write-config-to=x"],
        Some(&doc(
            "mode: nftables\nportRange: 100-200\nnftables:\n  syncPeriod: 7s\n",
        )),
    )
    .unwrap();
    let text = written_yaml(&r.file_config);
    assert!(text.contains("portRange: \"\"\n"), "{text}");
    assert!(text.contains("nftables:\n  masqueradeAll: false\n  masqueradeBit: 14\n  minSyncPeriod: 1s\n  syncPeriod: 7s\n"), "{text}");
    assert!(text.contains("iptables:\n  localhostNodePorts: true\n  masqueradeAll: false\n  masqueradeBit: 14\n  minSyncPeriod: 0s\n  syncPeriod: 0s\n"), "{text}");
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
