#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::json;

fn service(v: serde_json::Value) -> Service {
    serde_json::from_value(v).unwrap()
}

/// Issue 13: upstream's conformance test "service status lifecycle" leaves a status condition
/// with a null `lastTransitionTime`; the full API types refuse it, the lean ones never read it.
#[test]
fn a_status_condition_without_a_timestamp_decodes() {
    let text = r#"{"apiVersion":"v1","kind":"Service",
        "metadata":{"name":"odd","namespace":"default","resourceVersion":"7"},
        "spec":{"clusterIP":"172.30.0.9","ports":[{"port":80,"protocol":"TCP"}]},
        "status":{"conditions":[{"type":"StatusUpdate","status":"True","reason":"E2E",
            "message":"Set from e2e test","lastTransitionTime":null}],
            "loadBalancer":{}}}"#;
    let s: Service = serde_json::from_str(text).unwrap();
    assert_eq!(s.metadata.name.as_deref(), Some("odd"));
    assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
    let spec = s.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("172.30.0.9"));
    assert_eq!(spec.ports.unwrap()[0].port, Some(80));
}

/// Nulls, values of the wrong kind and unknown fields read as absent; the rest survives.
#[test]
fn wrong_kinds_read_as_absent_and_unknown_fields_are_skipped() {
    let s = service(json!({
        "metadata": {"name": "web", "namespace": "default", "labels": {"a": "b", "n": 5, "x": null},
            "annotations": null, "creationTimestamp": null, "managedFields": [{"time": null}]},
        "spec": {"clusterIP": 17, "clusterIPs": ["172.30.0.1", null, 5, {"x": 1}],
            "ports": [{"port": "80"}, {"port": 81.5}, {"port": 18446744073709551615u64}, null,
                      {"port": 443, "protocol": ["TCP"], "nodePort": null}],
            "type": {"nested": true}, "externalIPs": "1.2.3.4",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": true}},
            "trafficDistribution": "PreferSameNode", "futureField": {"a": [1, 2, {"b": null}]}},
        "status": "not an object"
    }));
    assert_eq!(
        s.metadata.labels,
        Some(BTreeMap::from([("a".into(), "b".into())]))
    );
    assert_eq!(s.metadata.annotations, None);
    let spec = s.spec.unwrap();
    assert_eq!(spec.cluster_ip, None);
    assert_eq!(spec.cluster_ips, Some(vec!["172.30.0.1".to_owned()]));
    assert_eq!(spec.type_, None);
    assert_eq!(spec.external_ips, None);
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 4, "the null port entry is dropped: {ports:?}");
    assert_eq!(ports[0].port, None, "a string is not a port");
    assert_eq!(ports[1].port, None, "a fraction is not a port");
    assert_eq!(
        ports[2].port,
        Some(i64::MAX),
        "too large saturates: still out of range"
    );
    assert_eq!(
        (ports[3].port, ports[3].protocol.as_deref()),
        (Some(443), None)
    );
    assert_eq!(
        spec.session_affinity_config.unwrap().client_ip.unwrap(),
        ClientIpConfig::default()
    );
    assert_eq!(s.status, None);
}

/// A value that is not an object at all is an empty object, not an error.
#[test]
fn anything_decodes() {
    for v in [json!(null), json!(5), json!("x"), json!([1, 2]), json!({})] {
        let s: EndpointSlice = serde_json::from_value(v).unwrap();
        assert_eq!(s, EndpointSlice::default());
    }
    // Repeated keys keep the last value.
    let n: Node = serde_json::from_str(r#"{"metadata":{"name":"a","name":"b"}}"#).unwrap();
    assert_eq!(n.metadata.name.as_deref(), Some("b"));
}

/// What the lean types serialize is API JSON with `apiVersion` and `kind`, absent fields left
/// out, and it decodes back to the same object.
#[test]
fn serialize_round_trips() {
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("web-1".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec!["10.0.0.1".into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some(String::new()),
            protocol: Some("TCP".into()),
            port: Some(80),
        }]),
    };
    let v = serde_json::to_value(&slice).unwrap();
    assert_eq!(
        v,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "", "protocol": "TCP", "port": 80}]})
    );
    assert_eq!(serde_json::from_value::<EndpointSlice>(v).unwrap(), slice);
}

/// Syntax errors are still errors: only the shape of valid text is forgiven.
#[test]
fn text_that_is_not_json_still_fails() {
    assert!(serde_json::from_str::<Service>(r#"{"metadata": {"name": }"#).is_err());
}
