//! Odd but valid objects, as an API server stores them: the kinds of content that the full
//! Kubernetes types refuse while the API server accepts them (issue 13). Each is a working
//! object for the proxy (its used fields are valid) with nulls in every optional field, a
//! status condition without `lastTransitionTime` (upstream's conformance test "service status
//! lifecycle" writes one), unknown fields, and fields of newer Kubernetes versions.

use serde_json::{Value, json};

/// A ClusterIP Service with one TCP port named `p`.
pub fn service(ns: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": ns, "uid": null, "generateName": null,
            "creationTimestamp": null, "deletionTimestamp": null, "labels": null,
            "annotations": null, "ownerReferences": null, "finalizers": null,
            "managedFields": [{"manager": "e2e.test", "operation": "Update", "time": null,
                               "fieldsV1": null}],
            "futureMetadataField": {"a": [1, null]}
        },
        "spec": {
            "type": null, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"name": "p", "protocol": "TCP", "port": port, "targetPort": null,
                       "nodePort": null, "appProtocol": null}],
            "selector": null, "externalIPs": null, "externalName": null,
            "loadBalancerIP": null, "loadBalancerSourceRanges": null,
            "loadBalancerClass": null, "allocateLoadBalancerNodePorts": null,
            "sessionAffinity": null, "sessionAffinityConfig": null,
            "externalTrafficPolicy": null, "internalTrafficPolicy": null,
            "healthCheckNodePort": null, "publishNotReadyAddresses": null,
            "ipFamilies": null, "ipFamilyPolicy": null,
            "trafficDistribution": "PreferSameNode",
            "someFieldOfKubernetes2_0": {"enabled": true, "weights": [1, 2.5, "x"]}
        },
        "status": {
            "loadBalancer": {"ingress": null},
            "conditions": [{"type": "StatusUpdate", "status": "True", "reason": "E2E",
                            "message": "Set from e2e test", "lastTransitionTime": null,
                            "observedGeneration": null}]
        }
    })
}

/// An EndpointSlice of Service `ns/svc`, named `<svc>-odd`, with ready endpoints on `node`.
pub fn slice(ns: &str, svc: &str, endpoints: &[&str], node: &str, port: u16) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|ip| {
            json!({
                "addresses": [ip], "nodeName": node, "hostname": null, "zone": null,
                "conditions": {"ready": null, "serving": null, "terminating": null},
                "hints": null, "targetRef": null, "deprecatedTopology": null,
                "futureEndpointField": [{"x": null}]
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{svc}-odd"), "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc,
                       "endpointslice.kubernetes.io/managed-by": "e2e.test"},
            "annotations": null, "creationTimestamp": null, "ownerReferences": null,
            "managedFields": null, "generation": null
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "p", "protocol": "TCP", "port": port, "appProtocol": null}]
    })
}

/// A Node with an InternalIP, a zone label, and every other field odd.
pub fn node(name: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "labels": {"kubernetes.io/hostname": name},
            "annotations": null, "creationTimestamp": null, "uid": null,
            "managedFields": [{"time": null}]
        },
        "spec": {
            "podCIDR": null, "podCIDRs": null, "providerID": null, "unschedulable": null,
            "configSource": null, "externalID": null,
            "taints": [{"key": "example.com/odd", "effect": "NoSchedule", "value": null,
                        "timeAdded": null}]
        },
        "status": {
            "addresses": [{"type": "InternalIP", "address": internal_ip},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": null,
                            "lastTransitionTime": null, "reason": null, "message": null}],
            "capacity": null, "allocatable": null, "nodeInfo": null, "images": null,
            "daemonEndpoints": null, "volumesAttached": null, "volumesInUse": null,
            "runtimeHandlers": null, "features": {"supplementalGroupsPolicy": true},
            "declaredFeatures": ["SomethingNew"]
        }
    })
}
