//! §5 of the behaviour reference: which endpoints each traffic kind may use (terminating
//! fallback, topology hints) and session affinity.

#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use kpr_model::intent::Intent;
use kpr_model::{Input, IpFamily};
use kpr_testkit::*;

const CIP: &str = "172.30.0.41";

fn svc() -> ServiceBuilder {
    service("ns1", "svc1")
        .cluster_ip(CIP)
        .port("p80", 80, "TCP")
}

fn s() -> SliceBuilder {
    slice("ns1", "svc1", "a").port("p80", 80, "TCP")
}

fn addrs(eps: &[kpr_model::Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.addr.ip().to_string()).collect()
}

#[test]
fn t5_1_1_etp_local_uses_a_local_terminating_endpoint() {
    let mut h = Harness::new();
    h.service(
        svc()
            .lb(LB_IP, None)
            .etp_local()
            .health_check_node_port(30000),
    );
    h.slice(
        s().ready("10.0.1.1", OTHER_NODE)
            .ready("10.0.1.2", OTHER_NODE)
            .terminating("10.0.0.3", NODE),
    );
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(LB_IP, 80)),
        dnat(&["10.0.0.3:80"], false)
    );
}

#[test]
fn t5_1_2_neither_ready_nor_serving_rejects() {
    let mut h = Harness::new();
    h.service(svc()).slice(s().endpoint(
        "10.0.1.1",
        OTHER_NODE,
        Some(false),
        Some(false),
        Some(false),
    ));
    assert_eq!(h.trace(from_pod(POD).tcp(CIP, 80)), Intent::Reject);
}

#[test]
fn t5_1_3_all_serving_terminating_serve_cluster_traffic() {
    let mut h = Harness::new();
    h.service(svc()).slice(
        s().terminating("10.0.1.1", OTHER_NODE)
            .terminating("10.0.0.1", NODE),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.1:80", "10.0.1.1:80"], false)
    );
}

#[test]
fn t5_1_4_terminating_endpoints_are_unused_while_one_is_ready() {
    let mut h = Harness::new();
    h.service(svc()).slice(
        s().terminating("10.0.1.1", OTHER_NODE)
            .ready("10.0.1.2", OTHER_NODE),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.1.2:80"], false)
    );
}

#[test]
fn t5_2_1_zone_hints_filter_when_every_endpoint_has_one() {
    let mut h = Harness::new();
    h.node(node(NODE).zone("a"));
    h.service(svc()).slice(
        s().ready("10.0.0.1", NODE)
            .zone_hints(&["a"])
            .ready("10.0.1.1", OTHER_NODE)
            .zone_hints(&["b"]),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.1:80"], false)
    );
}

#[test]
fn t5_2_2_one_endpoint_without_hint_disables_filtering() {
    let mut h = Harness::new();
    h.node(node(NODE).zone("a"));
    h.service(svc()).slice(
        s().ready("10.0.0.1", NODE)
            .zone_hints(&["a"])
            .ready("10.0.1.1", OTHER_NODE),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.1:80", "10.0.1.1:80"], false)
    );
}

#[test]
fn t5_2_3_node_hints_for_other_nodes_fall_back_to_zone_hints() {
    let mut h = Harness::new();
    h.node(node(NODE).zone("a"));
    h.service(svc()).slice(
        s().ready("10.0.1.1", OTHER_NODE)
            .zone_hints(&["a"])
            .node_hints(&[OTHER_NODE])
            .ready("10.0.2.1", "node-c")
            .zone_hints(&["b"])
            .node_hints(&["node-c"]),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.1.1:80"], false)
    );
    // PreferSameNode when a node hint names this node.
    h.slice(
        s().ready("10.0.0.1", NODE)
            .zone_hints(&["a"])
            .node_hints(&[NODE])
            .ready("10.0.1.1", OTHER_NODE)
            .zone_hints(&["a"])
            .node_hints(&[OTHER_NODE]),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.1:80"], false)
    );
}

#[test]
fn t5_2_4_zone_label_change_forces_a_full_resync_and_applies() {
    let mut h = Harness::new();
    h.node(node(NODE).zone("a"));
    h.service(svc()).slice(
        s().ready("10.0.0.1", NODE)
            .zone_hints(&["a"])
            .ready("10.0.1.1", OTHER_NODE)
            .zone_hints(&["b"]),
    );
    let _ = h.trackers.checkout();
    h.node(node(NODE).zone("b"));
    assert!(h.trackers.checkout().full);
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.1.1:80"], false)
    );
    // A Node update that leaves the labels alone is not a full resync.
    h.node(node(NODE).zone("b").address("InternalIP", NODE_IP));
    assert!(!h.trackers.checkout().full);
    h.trackers.record(Input::Node(None));
    assert!(h.trackers.checkout().full);
}

#[test]
fn t5_2_5_hints_are_ignored_for_the_local_set() {
    let mut h = Harness::new();
    h.node(node(NODE).zone("a"));
    h.service(svc().itp_local()).slice(
        s().ready("10.0.0.1", NODE)
            .zone_hints(&["b"])
            .ready("10.0.1.1", OTHER_NODE)
            .zone_hints(&["a"]),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.1:80"], false)
    );
}

#[test]
fn t5_4_affinity_timeout_defaults_and_is_carried_per_port() {
    let mut h = Harness::new();
    h.service(svc().affinity(None));
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .affinity_timeout,
        Some(10_800)
    );
    h.service(svc().affinity(Some(10)));
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .affinity_timeout,
        Some(10)
    );
    h.service(svc());
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .affinity_timeout,
        None
    );
}

#[test]
fn t5_4_2_a_deleted_affined_endpoint_leaves_the_set() {
    let mut h = Harness::new();
    h.service(svc().affinity(Some(10))).slice(
        s().ready("10.0.1.1", OTHER_NODE)
            .ready("10.0.1.2", OTHER_NODE),
    );
    h.slice(s().ready("10.0.1.2", OTHER_NODE));
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
    assert_eq!(addrs(&sp.endpoints), ["10.0.1.2"]);
}

#[test]
fn s7_2_health_check_node_port_only_for_lb_with_etp_local() {
    let mut h = Harness::new();
    h.service(
        svc()
            .lb(LB_IP, None)
            .etp_local()
            .health_check_node_port(30000),
    );
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .health_check_node_port,
        Some(30000)
    );
    h.service(svc().lb(LB_IP, None).health_check_node_port(30000));
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .health_check_node_port,
        None
    );
    // 0 with ETP=Local: an error is noted, no server.
    h.service(svc().lb(LB_IP, None).etp_local());
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .health_check_node_port,
        None
    );
    assert_eq!(h.skipped.len(), 1);
}
