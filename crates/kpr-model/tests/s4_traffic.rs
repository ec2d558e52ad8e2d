//! §4 of the behaviour reference: where new connections go, per frontend and policy, stated as
//! intent (DNAT with or without masquerade, DROP, REJECT, PASS).

#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use kpr_model::intent::Intent;
use kpr_model::node::DetectLocalMode;
use kpr_model::{Input, IpFamily, ObjectKey, Protocol, Update};
use kpr_testkit::*;

const CIP: &str = "172.30.0.41";
const REMOTE_EP: &str = "10.0.1.2";
const LOCAL_EP: &str = "10.0.0.2";

fn svc() -> ServiceBuilder {
    service("ns2", "svc2").cluster_ip(CIP)
}

fn eps(local: bool, remote: bool) -> SliceBuilder {
    let mut s = slice("ns2", "svc2", "a").port("p80", 80, "TCP");
    if local {
        s = s.ready(LOCAL_EP, NODE);
    }
    if remote {
        s = s.ready(REMOTE_EP, OTHER_NODE);
    }
    s
}

fn lb_local() -> ServiceBuilder {
    svc()
        .lb(LB_IP, None)
        .etp_local()
        .node_port("p80", 80, "TCP", 3001)
        .health_check_node_port(30000)
}

#[test]
fn t4_1_1_cluster_ip_dnats_to_every_endpoint() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP").port("dns", 53, "UDP"));
    h.slice(
        eps(true, true)
            .port("dns", 5353, "UDP")
            .ready("10.0.1.3", OTHER_NODE),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80", "10.0.1.2:80", "10.0.1.3:80"], false)
    );
    assert_eq!(
        h.trace(from_pod(POD).to(CIP, 53, Protocol::Udp)),
        dnat(&["10.0.0.2:5353", "10.0.1.2:5353", "10.0.1.3:5353"], false)
    );
}

#[test]
fn t4_1_2_host_process_to_cluster_ip_is_masqueraded_with_a_cluster_cidr() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP"))
        .slice(eps(false, true));
    assert_eq!(
        h.trace(from_host(NODE_IP).tcp(CIP, 80)),
        dnat(&["10.0.1.2:80"], true)
    );
    assert_eq!(
        h.trace(from_external("192.168.0.3").tcp(CIP, 80)),
        dnat(&["10.0.1.2:80"], true),
        "off-node client"
    );
    // No detector and no masqueradeAll: no masquerade (§4.10).
    h.mode = DetectLocalMode::ClusterCidr(vec![]);
    assert_eq!(
        h.trace(from_host(NODE_IP).tcp(CIP, 80)),
        dnat(&["10.0.1.2:80"], false)
    );
}

#[test]
fn t4_2_1_etp_local_with_local_endpoint_preserves_the_client_ip() {
    let mut h = Harness::new();
    h.service(lb_local()).slice(eps(true, true));
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(NODE_IP, 3001)),
        dnat(&["10.0.0.2:80"], false)
    );
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(LB_IP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
}

#[test]
fn t4_2_2_etp_local_without_local_endpoint_drops_external_traffic() {
    let mut h = Harness::new();
    h.service(lb_local()).slice(eps(false, true));
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(LB_IP, 80)),
        Intent::Drop
    );
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(NODE_IP, 3001)),
        Intent::Drop
    );
    let d = h.desired();
    assert_eq!(
        d.families[&IpFamily::V4].no_local_endpoints(),
        (0, 1),
        "T8.3 external gauge"
    );
}

#[test]
fn t4_2_3_local_pod_short_circuits_to_the_cluster_set() {
    let mut h = Harness::new();
    h.service(lb_local()).slice(eps(false, true));
    assert_eq!(
        h.trace(from_pod(POD).tcp(LB_IP, 80)),
        dnat(&["10.0.1.2:80"], false)
    );
}

#[test]
fn t4_2_4_host_to_node_port_masquerades_to_the_cluster_set() {
    let mut h = Harness::new();
    h.service(lb_local()).slice(eps(false, true));
    assert_eq!(
        h.trace(from_host(NODE_IP).tcp(NODE_IP, 3001)),
        dnat(&["10.0.1.2:80"], true)
    );
}

#[test]
fn t4_2_5_no_cluster_cidr_disables_the_pod_short_circuit() {
    let mut h = Harness::new();
    h.mode = DetectLocalMode::ClusterCidr(vec![]);
    h.service(lb_local()).slice(eps(false, true));
    assert_eq!(h.trace(from_pod(POD).tcp(LB_IP, 80)), Intent::Drop);
}

#[test]
fn t4_3_1_itp_local_with_only_remote_endpoints_drops() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP").itp_local())
        .slice(eps(false, true));
    assert_eq!(h.trace(from_pod(POD).tcp(CIP, 80)), Intent::Drop);
    assert_eq!(
        h.desired().families[&IpFamily::V4].no_local_endpoints(),
        (1, 0),
        "T8.3 internal gauge"
    );
    h.slice(eps(true, true));
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
}

#[test]
fn t4_3_2_itp_local_without_any_endpoint_rejects() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP").itp_local())
        .slice(eps(false, false));
    assert_eq!(h.trace(from_pod(POD).tcp(CIP, 80)), Intent::Reject);
    assert_eq!(
        h.desired().families[&IpFamily::V4].no_local_endpoints(),
        (0, 0)
    );
}

#[test]
fn t4_4_1_node_port_on_a_secondary_address_passes_with_primary_default() {
    let mut h = Harness::new();
    h.service(svc().node_port("p80", 80, "TCP", 3001))
        .slice(eps(true, false));
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp("192.168.1.2", 3001)),
        Intent::Pass
    );
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp("127.0.0.1", 3001)),
        Intent::Pass,
        "T4.4.2 no localhost NodePorts"
    );
    // Match-all (iptables default): every local address except loopback.
    h.host.node_port_ips = None;
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp("192.168.1.2", 3001)),
        dnat(&["10.0.0.2:80"], true)
    );
}

#[test]
fn t4_4_4_node_ports_ignore_source_ranges() {
    let mut h = Harness::new();
    h.service(
        svc()
            .lb(LB_IP, None)
            .source_range("192.0.2.0/24")
            .node_port("p80", 80, "TCP", 3001),
    )
    .slice(eps(true, false));
    assert_eq!(
        h.trace(from_external("198.51.100.7").tcp(NODE_IP, 3001)),
        dnat(&["10.0.0.2:80"], true)
    );
}

#[test]
fn t4_5_1_lb_vip_with_etp_cluster_masquerades() {
    let mut h = Harness::new();
    h.service(svc().lb(LB_IP, None).node_port("p80", 80, "TCP", 3001))
        .slice(eps(false, true));
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(LB_IP, 80)),
        dnat(&["10.0.1.2:80"], true)
    );
}

#[test]
fn t4_6_1_source_outside_ranges_is_dropped_at_the_vip_only() {
    let mut h = Harness::new();
    h.service(
        svc()
            .lb(LB_IP, None)
            .source_range("192.0.2.0/24")
            .node_port("p80", 80, "TCP", 3001),
    )
    .slice(eps(true, false));
    assert_eq!(
        h.trace(from_external("198.51.100.7").tcp(LB_IP, 80)),
        Intent::Drop
    );
    assert_eq!(
        h.trace(from_external("192.0.2.9").tcp(LB_IP, 80)),
        dnat(&["10.0.0.2:80"], true)
    );
}

#[test]
fn t4_6_2_ranges_apply_to_pods_and_node_ip_in_range_allows_the_vip() {
    let mut h = Harness::new();
    h.node(node(NODE).address("InternalIP", NODE_IP));
    h.service(
        svc()
            .lb(LB_IP, None)
            .source_range("192.168.0.0/24")
            .port("p80", 80, "TCP"),
    )
    .slice(eps(true, false));
    assert_eq!(
        h.trace(from_pod(POD).tcp(LB_IP, 80)),
        Intent::Drop,
        "pod CIDR outside the ranges"
    );
    assert_eq!(
        h.trace(from_host(LB_IP).tcp(LB_IP, 80)),
        dnat(&["10.0.0.2:80"], true),
        "VIP-sourced"
    );
}

#[test]
fn t4_7_1_external_ips_dnat_for_any_source_ignoring_ranges() {
    let mut h = Harness::new();
    h.service(
        svc()
            .external_ip(EXTERNAL_IP)
            .source_range("192.0.2.0/24")
            .port("p80", 80, "TCP"),
    )
    .slice(eps(true, false));
    assert_eq!(
        h.trace(from_external("198.51.100.7").tcp(EXTERNAL_IP, 80)),
        dnat(&["10.0.0.2:80"], true)
    );
    assert_eq!(
        h.trace(from_external("198.51.100.7").tcp(EXTERNAL_IP, 81)),
        Intent::Pass,
        "undefined port on an externalIP"
    );
}

#[test]
fn t4_8_1_no_endpoints_rejects_every_frontend_and_terminating_endpoints_serve() {
    let mut h = Harness::new();
    h.service(
        svc()
            .lb(LB_IP, None)
            .external_ip(EXTERNAL_IP)
            .node_port("p80", 80, "TCP", 3001),
    );
    h.slice(eps(false, false));
    for dst in [(CIP, 80), (LB_IP, 80), (EXTERNAL_IP, 80), (NODE_IP, 3001)] {
        assert_eq!(
            h.trace(from_external(EXTERNAL_CLIENT).tcp(dst.0, dst.1)),
            Intent::Reject,
            "{dst:?}"
        );
    }
    h.slice(
        slice("ns2", "svc2", "a")
            .port("p80", 80, "TCP")
            .terminating(REMOTE_EP, OTHER_NODE),
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.1.2:80"], false)
    );
}

#[test]
fn t4_8_2_undefined_cluster_ip_port_rejects_in_nftables_and_passes_in_iptables() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP"))
        .slice(eps(true, false));
    assert_eq!(h.trace(from_pod(POD).tcp(CIP, 81)), Intent::Reject);
    h.host.reject_unknown_cluster_ports = false;
    assert_eq!(h.trace(from_pod(POD).tcp(CIP, 81)), Intent::Pass);
}

/// §4.8: an address of a ServiceCIDR that no Service uses is dropped in nftables mode and
/// passed in iptables mode; allocated ClusterIPs keep their own verdicts, and addresses
/// outside every ServiceCIDR stay untouched.
#[test]
fn t4_8_3_unallocated_service_cidr_address_drops_in_nftables_and_passes_in_iptables() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP"))
        .slice(eps(true, false));
    // No ServiceCIDR known (none served, or none yet): nothing is dropped.
    assert_eq!(h.trace(from_pod(POD).tcp("172.30.9.9", 80)), Intent::Pass);
    h.service_cidr(kpr_testkit::service_cidr(
        "kubernetes",
        &[kpr_testkit::SERVICE_CIDR, "fd00:30::/108"],
    ));
    assert_eq!(h.trace(from_pod(POD).tcp("172.30.9.9", 80)), Intent::Drop);
    assert_eq!(
        h.trace(from_host(NODE_IP).tcp("172.30.9.9", 443)),
        Intent::Drop,
        "host-originated traffic too (filter-output-post-dnat)"
    );
    assert_eq!(h.trace(from_pod(POD).tcp(CIP, 81)), Intent::Reject);
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
    assert_eq!(h.trace(from_pod(POD).tcp("172.31.0.1", 80)), Intent::Pass);
    h.host.reject_unknown_cluster_ports = false;
    assert_eq!(h.trace(from_pod(POD).tcp("172.30.9.9", 80)), Intent::Pass);
}

/// §4.8: the ranges are the union of every ServiceCIDR's, per family; an entry the API server
/// would refuse is skipped with a reason; a change makes a sync due, and deleting the object
/// lifts the drop.
#[test]
fn t4_8_4_service_cidrs_are_tracked_per_object_and_family() {
    let mut h = Harness::new();
    h.trackers.checkout();
    h.service_cidr(kpr_testkit::service_cidr(
        "kubernetes",
        &["172.30.0.0/16", "fd00:30::/108"],
    ));
    h.service_cidr(kpr_testkit::service_cidr(
        "extra",
        &["172.31.0.0/24", "172.30.0.0/16", "10.1.2.3/8", "bogus"],
    ));
    let plan = h.trackers.checkout();
    assert!(plan.service_cidrs && !plan.is_empty(), "{plan:?}");
    let d = h.desired();
    let v4: Vec<String> = d.families[&IpFamily::V4]
        .service_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(v4, ["172.30.0.0/16", "172.31.0.0/24"]);
    let v6 = &d.families[&IpFamily::V6].service_cidrs;
    assert_eq!(v6.len(), 1);
    let reasons: Vec<String> = h.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("ServiceCIDR extra") && reasons[0].contains("10.1.2.3/8"));
    // The same ranges again: nothing to do.
    h.service_cidr(kpr_testkit::service_cidr(
        "extra",
        &["172.31.0.0/24", "172.30.0.0/16"],
    ));
    assert!(!h.trackers.checkout().service_cidrs);
    h.trackers
        .record(Input::ServiceCidrs(Update::Delete(ObjectKey::new(
            "", "extra",
        ))));
    assert!(h.trackers.checkout().service_cidrs);
    assert_eq!(h.desired().families[&IpFamily::V4].service_cidrs.len(), 1);
    h.trackers
        .record(Input::ServiceCidrs(Update::Keep(Vec::new())));
    assert!(h.desired().families[&IpFamily::V4].service_cidrs.is_empty());
}

#[test]
fn t4_9_1_hairpin_and_masquerade_all() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP"))
        .slice(eps(true, false));
    assert_eq!(
        h.trace(from_pod(LOCAL_EP).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], true),
        "endpoint of its own connection"
    );
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
    h.masquerade_all = true;
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], true)
    );
}

#[test]
fn t4_10_1_interface_prefix_and_bridge_detection() {
    let mut h = Harness::new();
    h.service(svc().port("p80", 80, "TCP"))
        .slice(eps(true, false));
    h.mode = DetectLocalMode::InterfaceNamePrefix("veth".into());
    assert_eq!(
        h.trace(from_pod("172.16.0.9").iif("veth1234").tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
    assert_eq!(
        h.trace(from_pod("172.16.0.9").iif("eth0").tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], true)
    );
    h.mode = DetectLocalMode::BridgeInterface("cbr0".into());
    assert_eq!(
        h.trace(from_pod("172.16.0.9").iif("cbr0").tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
    assert_eq!(
        h.trace(from_pod("172.16.0.9").iif("cbr01").tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], true)
    );
}

#[test]
fn t4_10_node_cidr_mode_uses_the_nodes_pod_cidr() {
    let mut h = Harness::new();
    h.mode = DetectLocalMode::NodeCidr;
    h.service(svc().port("p80", 80, "TCP"))
        .slice(eps(true, false));
    // Before the Node is known: a no-op detector.
    assert_eq!(
        h.trace(from_external("10.0.5.5").tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
    h.node(node(NODE).pod_cidr("10.0.0.0/24"));
    assert_eq!(
        h.trace(from_pod(POD).tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], false)
    );
    assert_eq!(
        h.trace(from_external("10.0.5.5").tcp(CIP, 80)),
        dnat(&["10.0.0.2:80"], true)
    );
}
