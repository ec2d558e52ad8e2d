//! §9.1 loading: YAML or JSON, strict first, lenient with a warning, anything else fatal.

use super::{HEADER, doc, kubeadm_config_conf};
use crate::{DecodeError, GoDuration, LENIENT_DECODING_WARNING, decode};

#[test]
fn t9_1_1_unknown_field_decodes_leniently_with_a_warning() {
    let d = decode(&doc(
        "serviceProxyName: foo\nnftables:\n  tableName: bar\n  syncPeriod: 10s\nmode: nftables\n",
    ))
    .unwrap();
    assert_eq!(d.config.mode, "nftables");
    assert_eq!(d.config.nftables.sync_period, GoDuration::from_secs(10));
    assert_eq!(d.warnings.len(), 1);
    let w = &d.warnings[0];
    assert!(w.starts_with(LENIENT_DECODING_WARNING), "{w}");
    assert!(w.contains("\"serviceProxyName\""), "{w}");
    assert!(w.contains("\"nftables.tableName\""), "{w}");
}

#[test]
fn t9_1_1_unknown_field_in_lists_and_logging_is_named() {
    let d = decode(&doc("logging:\n  vmodule:\n  - filePattern: x\n    verbosity: 2\n    extra: 1\n  options:\n    yaml: {}\n")).unwrap();
    let w = &d.warnings[0];
    assert!(w.contains("\"logging.vmodule[0].extra\""), "{w}");
    assert!(w.contains("\"logging.options.yaml\""), "{w}");
    assert_eq!(d.config.logging.vmodule[0].verbosity, 2);
}

#[test]
fn t9_1_1_duplicate_field_decodes_leniently_last_wins() {
    let d = decode(&doc("mode: iptables\nmode: nftables\n")).unwrap();
    assert_eq!(d.config.mode, "nftables");
    assert_eq!(d.warnings.len(), 1);
    assert!(d.warnings[0].starts_with(LENIENT_DECODING_WARNING));
    assert!(
        d.warnings[0].contains("key \"mode\" already set in map"),
        "{:?}",
        d.warnings
    );
}

#[test]
fn t9_1_1_feature_gates_keys_are_not_unknown_fields() {
    let d = decode(&doc("featureGates:\n  NoSuchGate: true\n")).unwrap();
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    assert_eq!(d.config.feature_gates.get("NoSuchGate"), Some(&true));
}

#[test]
fn t9_1_2_text_that_is_not_yaml_is_fatal() {
    for text in [
        "mode: [unclosed\n",
        "{\"mode\": ",
        "key: value\n  - broken: [\n",
    ] {
        assert!(
            matches!(decode(text), Err(DecodeError::Syntax { .. })),
            "{text:?}"
        );
    }
}

#[test]
fn t9_1_2_documents_that_are_not_a_configuration_are_fatal() {
    assert!(matches!(
        decode("just some words"),
        Err(DecodeError::NotAnObject { .. })
    ));
    assert!(matches!(
        decode("- a\n- b\n"),
        Err(DecodeError::NotAnObject { .. })
    ));
    assert!(matches!(decode(""), Err(DecodeError::MissingKind)));
    assert!(matches!(
        decode("mode: iptables\n"),
        Err(DecodeError::MissingKind)
    ));
    assert!(matches!(
        decode("kind: KubeProxyConfiguration\n"),
        Err(DecodeError::MissingApiVersion)
    ));
    let wrong_version =
        "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n";
    assert!(matches!(
        decode(wrong_version),
        Err(DecodeError::UnknownType { .. })
    ));
    let wrong_kind = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n";
    assert!(matches!(
        decode(wrong_kind),
        Err(DecodeError::UnknownType { .. })
    ));
}

#[test]
fn t9_1_2_wrong_value_types_are_fatal_not_lenient() {
    for body in [
        "iptables:\n  syncPeriod: 10\n",
        "iptables:\n  syncPeriod: ten seconds\n",
        "iptables:\n  masqueradeBit: many\n",
        "clientConnection: 5\n",
        "nodePortAddresses: 10.0.0.0/8\n",
        "bindAddressHardFail: maybe\n",
        "logging:\n  flushFrequency: soon\n",
    ] {
        assert!(
            matches!(decode(&doc(body)), Err(DecodeError::Value { .. })),
            "{body:?}"
        );
    }
}

#[test]
fn t9_1_2_value_errors_name_the_field() {
    let err = decode(&doc("iptables:\n  syncPeriod: 10\n")).unwrap_err();
    assert!(
        err.to_string().starts_with("iptables.syncPeriod: "),
        "{err}"
    );
    let err = decode(&doc("conntrack:\n  min: lots\n")).unwrap_err();
    assert!(err.to_string().starts_with("conntrack.min: "), "{err}");
}

#[test]
fn kubeadm_configmap_carries_the_same_config_conf() {
    let text =
        std::fs::read_to_string(super::examples_dir().join("kubeadm/configmap.yaml")).unwrap();
    let cm: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(cm["metadata"]["name"], "kube-proxy");
    assert_eq!(cm["metadata"]["namespace"], "kube-system");
    let embedded = cm["data"]["config.conf"].as_str().unwrap();
    assert_eq!(embedded.trim_end(), kubeadm_config_conf().trim_end());
    assert!(
        cm["data"]["kubeconfig.conf"]
            .as_str()
            .unwrap()
            .contains("kind: Config")
    );
}

#[test]
fn json_documents_decode() {
    let json = r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration",
        "mode":"nftables","nftables":{"syncPeriod":"10s","masqueradeBit":null},"conntrack":{"maxPerCore":0}}"#;
    let d = decode(json).unwrap();
    assert!(d.warnings.is_empty());
    assert_eq!(d.config.mode, "nftables");
    assert_eq!(d.config.nftables.masquerade_bit, None);
    assert_eq!(d.config.conntrack.max_per_core, Some(0));
}

#[test]
fn nulls_are_zero_values_and_pointers_stay_unset() {
    let d = decode(&doc(
        "mode: null\nhostnameOverride:\noomScoreAdj: null\niptables: null\n",
    ))
    .unwrap();
    assert_eq!(d.config.mode, "");
    assert_eq!(d.config.hostname_override, "");
    assert_eq!(d.config.oom_score_adj, None);
    assert_eq!(d.config.iptables.masquerade_bit, None);
}

#[test]
fn flush_frequency_accepts_nanoseconds_or_a_duration() {
    let nanos = decode(&doc("logging:\n  flushFrequency: 2000000000\n")).unwrap();
    assert_eq!(
        nanos.config.logging.flush_frequency.duration,
        GoDuration::from_secs(2)
    );
    assert!(!nanos.config.logging.flush_frequency.serialize_as_string);
    let text = decode(&doc("logging:\n  flushFrequency: 2s\n")).unwrap();
    assert_eq!(
        text.config.logging.flush_frequency.duration,
        GoDuration::from_secs(2)
    );
    assert!(text.config.logging.flush_frequency.serialize_as_string);
}

#[test]
fn info_buffer_size_accepts_a_number_or_a_quantity() {
    let d = decode(&doc("logging:\n  options:\n    json:\n      infoBufferSize: 0\n    text:\n      infoBufferSize: 64Ki\n")).unwrap();
    assert_eq!(d.config.logging.options.json.info_buffer_size, "0");
    assert_eq!(d.config.logging.options.text.info_buffer_size, "64Ki");
}

#[test]
fn kubeadm_config_conf_decodes_strictly() {
    let d = decode(&kubeadm_config_conf()).unwrap();
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    assert_eq!(
        d.config.client_connection.kubeconfig,
        "/var/lib/kube-proxy/kubeconfig.conf"
    );
    assert_eq!(d.config.cluster_cidr, "10.244.0.0/16");
    assert_eq!(d.config.conntrack.max_per_core, None);
    assert!(d.config.config_sync_period.is_zero());
}

#[test]
fn header_only_document_decodes_to_the_empty_configuration() {
    let d = decode(HEADER).unwrap();
    assert_eq!(d.config, crate::KubeProxyConfiguration::default());
}
