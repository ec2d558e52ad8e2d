//! Issue 13: objects are decoded leniently (`kpr_model::objects`), so what an object carries
//! beyond the fields the proxy reads cannot change or break anything.
//!
//! Property: a random mutation of a valid object's JSON (a value replaced by any JSON value, a
//! key added or removed, at any depth) where the proxy reads nothing never changes the desired
//! state; anywhere else it never panics, never fails the list it is in, and changes nothing
//! for the other Services (§3.2, §3.3, §3.4).
#![allow(clippy::unwrap_used)]

use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{DesiredState, EndpointSlice, Input, Node, Service, Trackers, Update, desired};
use kpr_testkit::{CLUSTER_CIDR, NODE, odd};
use proptest::prelude::*;
use serde_json::{Value, json};

/// The fields the model reads, as paths (`[]` for any array index). A mutation at a path that
/// is neither inside one of these nor above one leaves the desired state unchanged.
const USED: &[&str] = &[
    // Service (§3.2)
    "svc.metadata.name",
    "svc.metadata.namespace",
    "svc.metadata.labels",
    "svc.spec.type",
    "svc.spec.clusterIP",
    "svc.spec.clusterIPs",
    "svc.spec.ports.[].name",
    "svc.spec.ports.[].protocol",
    "svc.spec.ports.[].port",
    "svc.spec.ports.[].nodePort",
    "svc.spec.externalIPs",
    "svc.spec.loadBalancerSourceRanges",
    "svc.spec.sessionAffinity",
    "svc.spec.sessionAffinityConfig.clientIP.timeoutSeconds",
    "svc.spec.externalTrafficPolicy",
    "svc.spec.internalTrafficPolicy",
    "svc.spec.healthCheckNodePort",
    "svc.status.loadBalancer.ingress.[].ip",
    "svc.status.loadBalancer.ingress.[].ipMode",
    // EndpointSlice (§3.3)
    "eps.metadata.name",
    "eps.metadata.namespace",
    "eps.metadata.labels",
    "eps.metadata.annotations",
    "eps.addressType",
    "eps.endpoints.[].addresses",
    "eps.endpoints.[].conditions.ready",
    "eps.endpoints.[].conditions.serving",
    "eps.endpoints.[].conditions.terminating",
    "eps.endpoints.[].nodeName",
    "eps.endpoints.[].hints.forZones.[].name",
    "eps.endpoints.[].hints.forNodes.[].name",
    "eps.ports.[].name",
    "eps.ports.[].protocol",
    "eps.ports.[].port",
    // Node (§2.2, §3.4)
    "node.metadata.name",
    "node.metadata.labels",
    "node.metadata.deletionTimestamp",
    "node.spec.podCIDR",
    "node.spec.podCIDRs",
    "node.spec.taints.[].key",
    "node.status.addresses.[].type",
    "node.status.addresses.[].address",
];

/// A small cluster as an API server would serve it: a LoadBalancer Service that uses nearly
/// every field (and carries many the proxy does not read), the odd objects of `kpr_testkit::odd`,
/// their slices, and this node.
fn cluster() -> (Vec<Value>, Vec<Value>, Value) {
    let lb = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lb", "namespace": "ns", "uid": "1234", "generation": 3,
            "labels": {"app": "lb"}, "annotations": {"note": "x"},
            "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.1", "clusterIPs": ["172.30.0.1"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "selector": {"app": "lb"},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                 "nodePort": 30080, "appProtocol": "http"},
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": "dns",
                 "nodePort": 30053}],
            "externalIPs": ["192.168.99.11"], "loadBalancerSourceRanges": ["203.0.113.0/24"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
            "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster",
            "healthCheckNodePort": 32000, "allocateLoadBalancerNodePorts": true,
            "loadBalancerClass": "example.com/lb", "trafficDistribution": "PreferClose"},
        "status": {"loadBalancer": {"ingress": [
            {"ip": "1.2.3.4", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
            {"hostname": "lb.example.com"}]},
            "conditions": [{"type": "Ready", "status": "True",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    });
    let lb_slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "lb-1", "namespace": "ns", "generation": 1,
            "labels": {"kubernetes.io/service-name": "lb"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "lb", "uid": "1234"}]},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.1"], "nodeName": NODE, "zone": "a", "hostname": "h1",
             "conditions": {"ready": true, "serving": true, "terminating": false},
             "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": NODE}]},
             "targetRef": {"kind": "Pod", "name": "lb-1", "namespace": "ns"}},
            {"addresses": ["10.0.0.2"], "nodeName": "node-b", "zone": "b",
             "conditions": {"ready": false, "serving": true, "terminating": true},
             "hints": {"forZones": [{"name": "b"}]}}],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
                  {"name": "dns", "protocol": "UDP", "port": 5353}]
    });
    (
        vec![lb, odd::service("ns", "odd", "172.30.0.9", 80)],
        vec![
            lb_slice,
            odd::slice("ns", "odd", &["10.0.0.3", "10.0.0.4"], NODE, 8080),
        ],
        odd::node(NODE, "192.168.0.2"),
    )
}

/// The desired state the model computes from these objects, decoded as a list from an API
/// server is (a JSON array of items: one bad item would fail the whole array).
fn model(services: &[Value], slices: &[Value], node: &Value) -> DesiredState {
    let services: Vec<Service> = serde_json::from_value(Value::Array(services.to_vec())).unwrap();
    let slices: Vec<EndpointSlice> = serde_json::from_value(Value::Array(slices.to_vec())).unwrap();
    let node: Node = serde_json::from_value(node.clone()).unwrap();
    let mut t = Trackers::new();
    t.record(Input::Node(Some(Box::new(node))));
    t.record(Input::Services(Update::Replace(services)));
    t.record(Input::Slices(Update::Replace(slices)));
    let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
    let policy = ProxyPolicy::new(false, &mode, t.state().node());
    desired(
        t.state(),
        &NodeContext::new(NODE, t.state().node()),
        &policy,
    )
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "[a-zA-Z0-9./: -]{0,12}".prop_map(Value::String),
        Just(json!("172.30.0.1")),
        Just(json!("TCP")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Op {
    /// Replace the value found by the walk.
    Replace(Value),
    /// Add a key to the object found (or an element to the array found).
    Insert(String, Value),
    /// Remove the key (or element) the walk ended on.
    Remove,
}

fn any_op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![
        "[a-zA-Z]{1,10}",
        // Keys the proxy reads, in case they are added where they are missing.
        prop::sample::select(vec![
            "port", "ready", "nodeName", "ipMode", "labels", "type"
        ])
        .prop_map(str::to_owned),
    ];
    prop_oneof![
        any_json().prop_map(Op::Replace),
        (key, any_json()).prop_map(|(k, v)| Op::Insert(k, v)),
        Just(Op::Remove),
    ]
}

/// Mutates `root` at the place `steps` lead to; returns the path of what changed (object keys,
/// `[]` for array elements), under `kind`.
fn mutate(root: &mut Value, kind: &str, steps: &[usize], op: &Op) -> Vec<String> {
    let mut path = vec![kind.to_owned()];
    let mut cur = root;
    for &s in steps {
        let next_is_container = match &*cur {
            Value::Object(m) if !m.is_empty() => true,
            Value::Array(a) if !a.is_empty() => true,
            _ => false,
        };
        if !next_is_container {
            break;
        }
        // Stop early sometimes, so shallow places are mutated too (an odd step stops).
        if s % 7 == 0 && path.len() > 1 {
            break;
        }
        cur = match cur {
            Value::Object(m) => {
                let key = m.keys().nth(s % m.len()).unwrap().clone();
                path.push(key.clone());
                m.get_mut(&key).unwrap()
            }
            Value::Array(a) => {
                let n = a.len();
                path.push("[]".into());
                &mut a[s % n]
            }
            _ => unreachable!(),
        };
    }
    match op {
        Op::Replace(v) => *cur = v.clone(),
        Op::Insert(k, v) => match cur {
            Value::Object(m) => {
                m.insert(k.clone(), v.clone());
                path.push(k.clone());
            }
            Value::Array(a) => {
                a.push(v.clone());
                path.push("[]".into());
            }
            other => *other = v.clone(),
        },
        // Removing the value found: set it to nothing at all by replacing the whole entry with
        // an absent one is the same as removing its key; for an element, emptying it.
        Op::Remove => match cur {
            Value::Object(m) => {
                if let Some(k) = m.keys().next().cloned() {
                    m.remove(&k);
                    path.push(k);
                }
            }
            Value::Array(a) => {
                a.pop();
                path.push("[]".into());
            }
            other => *other = Value::Null,
        },
    }
    path
}

/// Whether a change at `path` can reach a field the proxy reads: the path is inside a used
/// field, or a used field is inside it.
fn touches_used(path: &[String]) -> bool {
    USED.iter().any(|u| {
        let u: Vec<&str> = u.split('.').collect();
        let n = u.len().min(path.len());
        u[..n].iter().zip(&path[..n]).all(|(a, b)| a == b)
    })
}

/// The service ports of Services other than `ns/name`.
fn others(d: &DesiredState, ns: &str, name: &str) -> Vec<String> {
    d.families
        .values()
        .flat_map(|f| f.ports.iter())
        .filter(|(k, _)| !(*k.service.namespace == *ns && *k.service.name == *name))
        .map(|(k, v)| format!("{k} {v:?}"))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutations_where_the_proxy_reads_nothing_change_nothing(
        which in 0usize..5,
        steps in prop::collection::vec(0usize..1000, 0..7),
        op in any_op(),
    ) {
        let (mut services, mut slices, mut node) = cluster();
        let base = model(&services, &slices, &node);
        let (kind, target, owner) = match which {
            0 | 1 => ("svc", &mut services[which], ["lb", "odd"][which]),
            2 | 3 => ("eps", &mut slices[which - 2], ["lb", "odd"][which - 2]),
            _ => ("node", &mut node, ""),
        };
        let path = mutate(target, kind, &steps, &op);
        // Never panics, whatever the mutation (a panic fails the property).
        let after = model(&services, &slices, &node);
        if !touches_used(&path) {
            prop_assert_eq!(&after, &base, "mutation at {:?} ({:?}) changed the state", path, op);
        } else if kind != "node" && !path.iter().any(|p| p == "metadata") {
            // The object itself may change or be skipped; every other Service stays as it was.
            prop_assert_eq!(others(&after, "ns", owner), others(&base, "ns", owner),
                "mutation at {:?} ({:?}) changed other Services", path, op);
        }
    }
}

/// The base cluster is programmed as intended, so the property compares real states.
#[test]
fn the_base_cluster_is_programmed() {
    let (services, slices, node) = cluster();
    let d = model(&services, &slices, &node);
    let v4 = &d.families[&kpr_model::IpFamily::V4];
    let names: Vec<String> = v4.ports.keys().map(ToString::to_string).collect();
    assert_eq!(names, ["ns/lb:dns", "ns/lb:http", "ns/odd:p"]);
    let odd = v4
        .ports
        .values()
        .find(|p| &*p.name.service.name == "odd")
        .unwrap();
    assert_eq!(odd.endpoints.len(), 2, "{odd:?}");
    let lb = v4
        .ports
        .values()
        .find(|p| p.port == 80 && &*p.name.service.name == "lb")
        .unwrap();
    assert_eq!(lb.load_balancer_ips.len(), 1);
    assert_eq!(lb.health_check_node_port, Some(32000));
}
