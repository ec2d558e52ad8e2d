//! Issue 15 item 7: decoding API objects (`kpr_model::objects`) and everything the model does
//! with them (parse, trackers, desired state, packet intent) never panics, whatever the bytes.
//!
//! Fed: arbitrary bytes as a Service, EndpointSlice, Node, ServiceCIDR and list of Services;
//! valid objects'
//! JSON mutated byte by byte (flips, insertions, deletions, truncations); a value anywhere in
//! a valid object replaced by odd JSON text (numbers past every integer and float type, lone
//! surrogates, long strings, odd IPs, nesting past serde_json's recursion limit); nesting 10,000
//! and 100,000 levels deep. `s3_lenient_decoding.rs` covers structured (value-level) mutations.
#![allow(clippy::unwrap_used)]

use kpr_model::explain::explain;
use kpr_model::intent::{HostView, Packet, intent};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::objects::ServiceCidr;
use kpr_model::parse::{parse_service, parse_service_cidr, parse_slice};
use kpr_model::{
    DesiredState, EndpointSlice, Input, IpFamily, Node, ObjectKey, Protocol, Service, Trackers,
    Update, desired, update_desired,
};
use kpr_testkit::mutate::{Mutation, mutate, mutations};
use kpr_testkit::{CLUSTER_CIDR, NODE, NODE_IP, NODE_IP6, POD, odd};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Which kind an object's bytes are decoded as.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Service,
    Slice,
    Node,
    ServiceCidr,
}

/// Valid objects as an API server serves them: a dual-stack LoadBalancer Service using nearly
/// every field, its IPv4 and IPv6 slices, the odd objects of `kpr_testkit::odd`, this node and
/// the cluster's ServiceCIDR.
fn seeds() -> Vec<(Kind, Value)> {
    let lb = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lb", "namespace": "ns", "uid": "1234", "resourceVersion": "7",
            "labels": {"app": "lb"}, "annotations": {"note": "x"}},
        "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.1",
            "clusterIPs": ["172.30.0.1", "fd00:172:30::1"], "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                 "nodePort": 30080},
                {"name": "dns", "protocol": "UDP", "port": 53, "nodePort": 30053},
                {"name": "sctp", "protocol": "SCTP", "port": 9999}],
            "externalIPs": ["192.168.99.11", "fd00:99::11"],
            "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8::/32"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
            "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster",
            "healthCheckNodePort": 32000},
        "status": {"loadBalancer": {"ingress": [
            {"ip": "1.2.3.4", "ipMode": "VIP"}, {"ip": "5.6.7.8", "ipMode": "Proxy"},
            {"hostname": "lb.example.com"}]}}
    });
    let endpoints = |ips: &[&str]| -> Vec<Value> {
        ips.iter()
            .enumerate()
            .map(|(i, ip)| {
                json!({"addresses": [ip], "nodeName": if i == 0 { NODE } else { "node-b" },
                    "zone": "a",
                    "conditions": {"ready": i == 0, "serving": true, "terminating": i != 0},
                    "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": NODE}]}})
            })
            .collect()
    };
    let slice = |name: &str, family: &str, ips: &[&str]| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "ns",
                "labels": {"kubernetes.io/service-name": "lb"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                    "2026-01-01T00:00:00Z"}},
            "addressType": family,
            "endpoints": endpoints(ips),
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080},
                      {"name": "dns", "protocol": "UDP", "port": 5353},
                      {"name": "sctp", "protocol": "SCTP", "port": 9999}]
        })
    };
    let mut node = odd::node(NODE, NODE_IP);
    node["status"]["addresses"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "InternalIP", "address": NODE_IP6}));
    node["spec"]["podCIDRs"] = json!(["10.0.1.0/24", "fd00:10::/64"]);
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("a");
    vec![
        (Kind::Service, lb),
        (
            Kind::Slice,
            slice("lb-4", "IPv4", &["10.0.0.1", "10.0.0.2"]),
        ),
        (
            Kind::Slice,
            slice("lb-6", "IPv6", &["fd00:10::1", "fd00:10::2"]),
        ),
        (Kind::Service, odd::service("ns", "odd", "172.30.0.9", 80)),
        (
            Kind::Slice,
            odd::slice("ns", "odd", &["10.0.0.3", "10.0.0.4"], NODE, 8080),
        ),
        (Kind::Node, node),
        (
            Kind::ServiceCidr,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                "metadata": {"name": "kubernetes"},
                "spec": {"cidrs": ["172.30.0.0/16", "fd00:172:30::/112"]},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
    ]
}

/// The objects as decoded: the seeds with the one at `replaced` swapped for `bytes` decoded as
/// its kind (`None` when the bytes are not JSON, as a watch drops an undecodable event).
struct Cluster {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    node: Option<Node>,
    service_cidrs: Vec<ServiceCidr>,
}

fn cluster(replaced: Option<(usize, &[u8])>) -> Cluster {
    let mut c = Cluster {
        services: Vec::new(),
        slices: Vec::new(),
        node: None,
        service_cidrs: Vec::new(),
    };
    for (i, (kind, value)) in seeds().into_iter().enumerate() {
        let bytes = match replaced {
            Some((r, bytes)) if r == i => bytes.to_vec(),
            _ => serde_json::to_vec(&value).unwrap(),
        };
        match kind {
            Kind::Service => c.services.extend(serde_json::from_slice(&bytes).ok()),
            Kind::Slice => c.slices.extend(serde_json::from_slice(&bytes).ok()),
            Kind::Node => c.node = serde_json::from_slice(&bytes).ok(),
            Kind::ServiceCidr => c.service_cidrs.extend(serde_json::from_slice(&bytes).ok()),
        }
    }
    c
}

/// Runs the model on `c` the way the daemon does: parse, a full sync, then events one by one
/// (incremental syncs must agree with a full one), and asks where a packet to each frontend
/// goes. Every skip note says what it skipped.
fn run_model(c: Cluster) -> Result<(), TestCaseError> {
    let mut notes = Vec::new();
    for svc in &c.services {
        if let Err(skip) = parse_service(svc, &mut notes) {
            notes.push(skip);
        }
    }
    for slice in &c.slices {
        if let Err(skip) = parse_slice(slice, &mut notes) {
            notes.push(skip);
        }
    }
    for cidr in &c.service_cidrs {
        let _ = parse_service_cidr(cidr, &mut notes);
    }
    let mut t = Trackers::new();
    notes.extend(t.record(Input::Node(c.node.clone().map(Box::new))));
    notes.extend(t.record(Input::ServiceCidrs(Update::Replace(
        c.service_cidrs.clone(),
    ))));
    notes.extend(t.record(Input::Services(Update::Replace(c.services.clone()))));
    notes.extend(t.record(Input::Slices(Update::Replace(c.slices.clone()))));
    let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
    let sync = |t: &mut Trackers, d: &mut DesiredState| {
        let plan = t.checkout();
        let node = NodeContext::new(NODE, t.state().node());
        let policy = ProxyPolicy::new(false, &mode, t.state().node());
        update_desired(d, t.state(), &node, &policy, &plan);
        let full = desired(t.state(), &node, &policy);
        (full, node)
    };
    let mut d = DesiredState::default();
    let (full, node) = sync(&mut t, &mut d);
    prop_assert_eq!(&d, &full);
    check_intents(&d, &t, &node);

    // Incremental: each object again, then the first of each kind deleted.
    for svc in &c.services {
        notes.extend(t.record(Input::Services(Update::Apply(svc.clone()))));
    }
    for slice in &c.slices {
        notes.extend(t.record(Input::Slices(Update::Apply(slice.clone()))));
    }
    if let Some(svc) = c.services.first() {
        let key = ObjectKey::of(&svc.metadata);
        t.record(Input::Services(Update::Delete(key)));
    }
    if let Some(slice) = c.slices.first() {
        let key = ObjectKey::of(&slice.metadata);
        t.record(Input::Slices(Update::Delete(key)));
    }
    for cidr in &c.service_cidrs {
        notes.extend(t.record(Input::ServiceCidrs(Update::Apply(cidr.clone()))));
    }
    let (full, node) = sync(&mut t, &mut d);
    prop_assert_eq!(&d, &full, "incremental sync differs from a full one");
    check_intents(&d, &t, &node);

    for n in notes {
        prop_assert!(!n.reason.trim().is_empty(), "{n:?}");
        prop_assert!(!n.to_string().is_empty());
    }
    Ok(())
}

/// A pod's packet to every ClusterIP, NodePort, externalIP and LB IP, and to the first and
/// last address of every ServiceCIDR range: its intent and explanation.
fn check_intents(d: &DesiredState, t: &Trackers, node: &NodeContext) {
    let host = HostView {
        node_port_ips: Some(vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()]),
        local_ips: vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()],
        reject_unknown_cluster_ports: true,
    };
    for fam in d.families.values() {
        let (src, node_ip) = match fam.family {
            IpFamily::V4 => (POD, NODE_IP),
            IpFamily::V6 => ("fd00:10::5", NODE_IP6),
        };
        let mut dsts: Vec<_> = fam
            .service_cidrs
            .iter()
            .flat_map(|net| [net.network(), net.broadcast()])
            .map(|ip| (ip, 80, Protocol::Tcp))
            .collect();
        for p in fam.ports.values() {
            dsts.push((p.cluster_ip, p.port, p.protocol));
            dsts.extend(
                p.node_port
                    .map(|n| (node_ip.parse().unwrap(), n, p.protocol)),
            );
            dsts.extend(p.external_ips.iter().map(|ip| (*ip, p.port, p.protocol)));
            dsts.extend(
                p.load_balancer_ips
                    .iter()
                    .map(|ip| (*ip, p.port, p.protocol)),
            );
        }
        for (dst, port, protocol) in dsts {
            let pkt = Packet {
                src: src.parse().unwrap(),
                iif: Some("veth1".into()),
                from_host: false,
                dst,
                protocol,
                port,
            };
            let _ = intent(fam, &host, &pkt);
            let _ = explain(fam, t.state(), node, &host, &pkt);
        }
    }
}

/// Decodes `bytes` as every kind. Decoding fails only on text that is not JSON: whatever
/// serde_json reads as a value, every lean type reads too.
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    let is_json = serde_json::from_slice::<Value>(bytes).is_ok();
    let results = [
        serde_json::from_slice::<Service>(bytes).map(|_| ()),
        serde_json::from_slice::<EndpointSlice>(bytes).map(|_| ()),
        serde_json::from_slice::<Node>(bytes).map(|_| ()),
        serde_json::from_slice::<ServiceCidr>(bytes).map(|_| ()),
    ];
    for r in results {
        if is_json {
            prop_assert!(r.is_ok(), "JSON that a lean type refused: {r:?}");
        }
        if let Err(e) = r {
            prop_assert!(!e.to_string().is_empty());
        }
    }
    let list = serde_json::from_slice::<Vec<Service>>(bytes);
    if let Ok(Value::Array(_)) = serde_json::from_slice::<Value>(bytes) {
        prop_assert!(
            list.is_ok(),
            "a JSON array that a list of Services refused: {list:?}"
        );
    }
    Ok(())
}

/// Bytes that mean something to JSON.
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "null", "-", "0", "1e400", ".",
    "e", "\0", "\u{feff}", " ", "\n", "é",
];

/// Byte changes only: lines mean nothing to JSON.
fn any_mutation() -> BoxedStrategy<Mutation> {
    mutations(TOKENS, &[])
}

/// JSON text no `Value` holds: numbers past i64/u64/f64, lone surrogates, deep nesting.
fn odd_json() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "1e400",
        "-1e400",
        "1e308",
        "4.9e-324",
        "-0",
        "0.5",
        "1.0",
        "1e2",
        "65536",
        "-1",
        "0",
        "4294967296",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "340282366920938463463374607431768211456",
        "\"\\ud800\"",
        "\"\\udc00\\ud800\"",
        "\"\\u0000\"",
        "\"80\"",
        "\"\"",
        "\"None\"",
        "\"::\"",
        "\"0.0.0.0\"",
        "\"255.255.255.255\"",
        "\"::ffff:10.0.0.1\"",
        "\"::ffff:172.30.0.1\"",
        "\"01.2.3.4\"",
        "\"fe80::1%eth0\"",
        "\"1.2.3.4/33\"",
        "\"0.0.0.0/0\"",
        "\"::/0\"",
        "\"300.1.1.1\"",
        "\"-a-\"",
        "\"FQDN\"",
        "\"ClientIP\"",
        "\"Local\"",
        "\"ExternalName\"",
        "[]",
        "{}",
        "null",
        "true",
        "[null, 1, \"x\", {}]",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        6 => fixed,
        1 => (1usize..300).prop_map(|n| "[".repeat(n) + &"]".repeat(n)),
        1 => (1usize..300).prop_map(|n| "{\"a\":".repeat(n) + "1" + &"}".repeat(n)),
        1 => (0usize..5000).prop_map(|n| format!("\"{}\"", "a".repeat(n))),
        1 => "[a-z0-9.:/-]{0,40}".prop_map(|s| format!("\"{s}\"")),
    ]
}

/// Replaces the value at the place `steps` lead to in `root` with `text`, returning the JSON.
fn replace_value(root: &Value, steps: &[usize], text: &str) -> String {
    const MARK: &str = "\u{1}mark\u{1}";
    let mut root = root.clone();
    let mut cur = &mut root;
    for &s in steps {
        let descend = match &*cur {
            Value::Object(m) => !m.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => false,
        };
        if !descend {
            break;
        }
        cur = match cur {
            Value::Object(m) => {
                let key = m.keys().nth(s % m.len()).unwrap().clone();
                m.get_mut(&key).unwrap()
            }
            Value::Array(a) => {
                let n = a.len();
                &mut a[s % n]
            }
            _ => unreachable!(),
        };
    }
    *cur = Value::String(MARK.to_owned());
    let json = serde_json::to_string(&root).unwrap();
    json.replacen(&serde_json::to_string(MARK).unwrap(), text, 1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_decode_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes)?;
        run_model(cluster(Some((0, &bytes))))?;
    }

    #[test]
    fn mutated_objects_decode_or_fail_and_the_model_copes(
        which in 0..seeds().len(),
        mutations in prop::collection::vec(any_mutation(), 1..3),
    ) {
        let mut bytes = serde_json::to_vec(&seeds()[which].1).unwrap();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        decode_all(&bytes)?;
        run_model(cluster(Some((which, &bytes))))?;
    }

    #[test]
    fn odd_values_anywhere_decode_or_fail_and_the_model_copes(
        which in 0..seeds().len(),
        steps in prop::collection::vec(0usize..1000, 0..7),
        text in odd_json(),
    ) {
        let json = replace_value(&seeds()[which].1, &steps, &text);
        decode_all(json.as_bytes())?;
        run_model(cluster(Some((which, json.as_bytes()))))?;
    }
}

/// The seeds are a working cluster, so the properties exercise real desired states.
#[test]
fn the_seed_cluster_is_programmed() {
    let c = cluster(None);
    assert_eq!((c.services.len(), c.slices.len()), (2, 3));
    let mut t = Trackers::new();
    let mut notes = t.record(Input::Node(c.node.map(Box::new)));
    notes.extend(t.record(Input::ServiceCidrs(Update::Replace(c.service_cidrs))));
    notes.extend(t.record(Input::Services(Update::Replace(c.services))));
    notes.extend(t.record(Input::Slices(Update::Replace(c.slices))));
    assert!(notes.is_empty(), "{notes:?}");
    let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
    let policy = ProxyPolicy::new(false, &mode, t.state().node());
    let d = desired(
        t.state(),
        &NodeContext::new(NODE, t.state().node()),
        &policy,
    );
    let count = |f: IpFamily| d.families[&f].ports.len();
    let cidrs = |f: IpFamily| d.families[&f].service_cidrs.len();
    assert_eq!((cidrs(IpFamily::V4), cidrs(IpFamily::V6)), (1, 1));
    assert_eq!((count(IpFamily::V4), count(IpFamily::V6)), (4, 3));
    let v6 = d.families[&IpFamily::V6].ports.values().next().unwrap();
    assert_eq!(v6.endpoints.len(), 1, "the ready endpoint only: {v6:?}");
}

/// Nesting far past serde_json's recursion limit (128), at the top, in a field the proxy reads
/// and in one it skips: a decode error or a skipped value, never a stack overflow. (Skipped
/// values are walked without recursion, so they decode at any depth.)
#[test]
fn deep_nesting_is_an_error_or_skipped_not_a_stack_overflow() {
    for depth in [129, 10_000, 100_000] {
        let arrays = "[".repeat(depth) + &"]".repeat(depth);
        let objects = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
        for deep in [&arrays, &objects] {
            for doc in [
                deep.clone(),
                format!(r#"{{"metadata":{{"name":"x","labels":{deep}}}}}"#),
                format!(r#"{{"spec":{{"ports":[{{"port":{deep}}}]}}}}"#),
                format!(r#"{{"spec":{{"unknownField":{deep}}}}}"#),
                format!(r#"{{"endpoints":[{{"addresses":{deep}}}]}}"#),
                format!(r#"[{deep}]"#),
            ] {
                let _ = serde_json::from_str::<Service>(&doc);
                let _ = serde_json::from_str::<EndpointSlice>(&doc);
                let _ = serde_json::from_str::<Node>(&doc);
                let _ = serde_json::from_str::<ServiceCidr>(&doc);
                let _ = serde_json::from_str::<Vec<Service>>(&doc);
            }
        }
        let skipped =
            format!(r#"{{"metadata":{{"name":"x"}},"spec":{{"unknownField":{arrays}}}}}"#);
        let svc: Service = serde_json::from_str(&skipped).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("x"));
    }
}
