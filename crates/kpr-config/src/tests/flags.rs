//! §9.4 flag forms: pflag-style booleans, `=` and space-separated values, comma lists, `-v`.

use super::flags;
use crate::{Flags, GoDuration};

#[test]
fn boolean_flags_take_no_value_or_an_equals_value() {
    assert_eq!(flags(&["--masquerade-all"]).masquerade_all, Some(true));
    assert_eq!(flags(&["--masquerade-all=true"]).masquerade_all, Some(true));
    assert_eq!(
        flags(&["--masquerade-all=false"]).masquerade_all,
        Some(false)
    );
    assert_eq!(flags(&["--masquerade-all=0"]).masquerade_all, Some(false));
    assert_eq!(flags(&["--masquerade-all=T"]).masquerade_all, Some(true));
    assert_eq!(flags(&[]).masquerade_all, None);
    assert_eq!(
        flags(&["--cleanup", "--init-only=false"]).cleanup,
        Some(true)
    );
    // pflag does not take a separate word as a boolean's value.
    assert!(Flags::try_parse_args(["kube-proxy-rs", "--masquerade-all", "false"]).is_err());
    assert!(Flags::try_parse_args(["kube-proxy-rs", "--masquerade-all=maybe"]).is_err());
}

#[test]
fn verbosity_accepts_v_forms() {
    for args in [
        &["--v=4"][..],
        &["-v", "4"],
        &["-v=4"],
        &["--v", "4"],
        &["-v4"],
    ] {
        assert_eq!(flags(args).v, Some(4), "{args:?}");
    }
}

#[test]
fn values_take_equals_or_a_separate_word() {
    assert_eq!(
        flags(&["--proxy-mode", "nftables"]).proxy_mode.as_deref(),
        Some("nftables")
    );
    assert_eq!(
        flags(&["--proxy-mode=nftables"]).proxy_mode.as_deref(),
        Some("nftables")
    );
    assert_eq!(
        flags(&["--iptables-sync-period=1m30s"]).iptables_sync_period,
        Some(GoDuration::from_secs(90))
    );
    assert_eq!(
        flags(&["--oom-score-adj", "-999"]).oom_score_adj,
        Some(-999)
    );
    assert_eq!(flags(&["--oom-score-adj=-500"]).oom_score_adj, Some(-500));
}

#[test]
fn lists_are_comma_separated_and_accumulate() {
    let f = flags(&["--nodeport-addresses=10.0.0.0/8,fd00::/8"]);
    assert_eq!(
        f.nodeport_addresses,
        Some(vec!["10.0.0.0/8".to_string(), "fd00::/8".to_string()])
    );
    let f = flags(&[
        "--nodeport-addresses",
        "10.0.0.0/8",
        "--nodeport-addresses=192.168.0.0/16",
    ]);
    assert_eq!(f.nodeport_addresses.map(|v| v.len()), Some(2));
    let f = flags(&[
        "--feature-gates=AllAlpha=false,NFTablesProxyMode=true",
        "--feature-gates",
        "AllBeta=true",
    ]);
    let merged: Vec<(String, bool)> = f.feature_gates.iter().flat_map(|g| g.0.clone()).collect();
    assert_eq!(merged.len(), 3);
    assert!(Flags::try_parse_args(["kube-proxy-rs", "--feature-gates=Foo"]).is_err());
    assert!(Flags::try_parse_args(["kube-proxy-rs", "--feature-gates=Foo=yes"]).is_err());
}

#[test]
fn vmodule_parses_pattern_equals_level() {
    let f = flags(&["--vmodule=proxier=4,server*=2"]);
    let items = f.vmodule.unwrap().0;
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[1].file_pattern.as_str(), items[1].verbosity),
        ("server*", 2)
    );
    assert!(Flags::try_parse_args(["kube-proxy-rs", "--vmodule=proxier"]).is_err());
}

#[test]
fn invalid_values_are_flag_errors() {
    for args in [
        &["--iptables-sync-period=10"][..],
        &["--bind-address=nowhere"],
        &["--healthz-bind-address=1.2.3.4:x"],
        &["--conntrack-min=lots"],
        &["--no-such-flag"],
    ] {
        let argv = std::iter::once("kube-proxy-rs").chain(args.iter().copied());
        assert!(Flags::try_parse_args(argv).is_err(), "{args:?}");
    }
}

#[test]
fn every_upstream_flag_is_accepted() {
    let f = flags(&[
        "--config=/etc/kp.yaml",
        "--kubeconfig=/k",
        "--master=https://a:6443",
        "--hostname-override=n",
        "--proxy-mode=iptables",
        "--cluster-cidr=10.0.0.0/8",
        "--nodeport-addresses=primary",
        "--masquerade-all",
        "--healthz-bind-address=0.0.0.0:10256",
        "--metrics-bind-address=127.0.0.1",
        "--bind-address=0.0.0.0",
        "--bind-address-hard-fail",
        "--config-sync-period=15m",
        "--iptables-sync-period=30s",
        "--iptables-min-sync-period=1s",
        "--iptables-masquerade-bit=14",
        "--iptables-localhost-nodeports=false",
        "--nftables-sync-period=30s",
        "--nftables-min-sync-period=1s",
        "--detect-local-mode=ClusterCIDR",
        "--pod-interface-name-prefix=veth",
        "--pod-bridge-interface=cbr0",
        "--conntrack-max-per-core=0",
        "--conntrack-min=1",
        "--conntrack-tcp-timeout-established=24h",
        "--conntrack-tcp-timeout-close-wait=1h",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=30s",
        "--conntrack-udp-timeout-stream=2m",
        "--cleanup=false",
        "--init-only=false",
        "--write-config-to=/tmp/x",
        "--feature-gates=AllAlpha=false",
        "--kube-api-content-type=application/json",
        "--kube-api-qps=20",
        "--kube-api-burst=30",
        "--oom-score-adj=-999",
        "--profiling",
        "--show-hidden-metrics-for-version=1.32",
        "--healthz-port=10256",
        "--metrics-port=10249",
        "--ipvs-scheduler=rr",
        "--ipvs-sync-period=30s",
        "--ipvs-min-sync-period=0s",
        "--ipvs-exclude-cidrs=10.0.0.0/8",
        "--ipvs-strict-arp",
        "--ipvs-tcp-timeout=0s",
        "--ipvs-tcpfin-timeout=0s",
        "--ipvs-udp-timeout=0s",
        "-v=2",
        "--vmodule=a=1",
        "--logging-format=text",
        "--log-flush-frequency=5s",
        "--version=false",
        "--manifests=/srv/objects",
        "--dry-run",
    ]);
    assert!(f.is_explicit("masquerade-all"));
    assert!(f.is_explicit("v"));
    assert!(f.is_explicit("dry-run"));
    assert!(!f.is_explicit("logging-format") || f.logging_format.is_some());
    assert!(!f.wants_version());
    assert_eq!(f.dry_run, Some(true));
    assert_eq!(f.kube_api_qps, Some(20.0));
}

#[test]
fn explicit_records_only_given_flags() {
    let f = flags(&["--proxy-mode=nftables"]);
    assert_eq!(f.explicit.iter().collect::<Vec<_>>(), vec!["proxy-mode"]);
}

#[test]
fn version_is_our_own_flag() {
    assert!(flags(&["--version"]).wants_version());
    assert_eq!(
        Flags::version_string(),
        format!("kube-proxy-rs v{}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn flags_command_is_well_formed() {
    use clap::CommandFactory;
    Flags::command().debug_assert();
    let help = Flags::command().render_help().to_string();
    assert!(help.contains("--masquerade-all"), "{help}");
    assert!(!help.contains("--ipvs-scheduler"), "ipvs flags are hidden");
}
