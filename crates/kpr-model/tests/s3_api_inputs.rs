//! §3 of the behaviour reference: which objects and fields the proxy reads, and how.

#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use kpr_model::{IpFamily, Protocol};
use kpr_testkit::*;

const SVC_IP: &str = "172.30.0.41";

fn web() -> ServiceBuilder {
    service("ns1", "svc1")
        .cluster_ip(SVC_IP)
        .port("p80", 80, "TCP")
}

fn web_slice() -> SliceBuilder {
    slice("ns1", "svc1", "a")
        .port("p80", 8080, "TCP")
        .ready("10.0.0.2", NODE)
}

#[test]
fn t3_1_1_service_proxy_name_and_headless_labels_are_ignored() {
    let mut h = Harness::new();
    h.service(web().label("service.kubernetes.io/service-proxy-name", "foo"))
        .slice(web_slice());
    assert!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80").is_none(),
        "any value of service-proxy-name hands it away"
    );

    let mut h = Harness::new();
    h.service(web())
        .slice(web_slice().label("service.kubernetes.io/headless", ""));
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
    assert!(
        sp.endpoints.is_empty(),
        "a headless-labelled slice contributes nothing"
    );

    // Labelling a live Service later removes it.
    let mut h = Harness::new();
    h.service(web()).slice(web_slice());
    assert!(h.port(IpFamily::V4, "ns1", "svc1", "p80").is_some());
    h.service(web().label("service.kubernetes.io/service-proxy-name", "other"));
    assert!(h.port(IpFamily::V4, "ns1", "svc1", "p80").is_none());
}

#[test]
fn t3_2_1_headless_and_external_name_get_no_rules() {
    let cases = [
        (
            "clusterIP None",
            service("ns1", "svc1")
                .cluster_ip("None")
                .port("p80", 80, "TCP"),
        ),
        (
            "no clusterIP",
            service("ns1", "svc1").port("p80", 80, "TCP"),
        ),
        ("ExternalName", web().type_("ExternalName")),
    ];
    for (what, svc) in cases {
        let mut h = Harness::new();
        h.service(svc);
        assert!(
            h.desired().families.values().all(|f| f.ports.is_empty()),
            "{what}"
        );
        assert!(
            h.skipped.is_empty(),
            "{what} is not an error: {:?}",
            h.skipped
        );
    }
}

#[test]
fn t3_2_2_single_stack_service_on_dual_stack_node_gets_its_family_only() {
    let mut h = Harness::new();
    h.service(web());
    assert!(h.port(IpFamily::V4, "ns1", "svc1", "p80").is_some());
    assert!(h.port(IpFamily::V6, "ns1", "svc1", "p80").is_none());

    let mut h = Harness::new();
    h.service(web().cluster_ip("fd00:30::41"));
    assert_eq!(
        h.port(IpFamily::V6, "ns1", "svc1", "p80")
            .unwrap()
            .cluster_ip
            .to_string(),
        "fd00:30::41"
    );
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .cluster_ip
            .to_string(),
        SVC_IP
    );
}

#[test]
fn t3_2_3_ip_mode_proxy_gets_no_vip_rules() {
    let table = [(Some("Proxy"), false), (None, true), (Some("VIP"), true)];
    for (mode, has_vip) in table {
        let mut h = Harness::new();
        h.service(web().lb(LB_IP, mode)).slice(web_slice());
        let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
        assert_eq!(!sp.load_balancer_ips.is_empty(), has_vip, "ipMode {mode:?}");
        let verdict = h.trace(from_external(EXTERNAL_CLIENT).tcp(LB_IP, 80));
        if has_vip {
            assert_eq!(verdict, dnat(&["10.0.0.2:8080"], true));
        } else {
            assert_eq!(verdict, kpr_model::intent::Intent::Pass);
        }
    }
}

#[test]
fn t3_2_4_hostname_only_ingress_keeps_the_node_port() {
    let mut h = Harness::new();
    h.service(
        web()
            .lb_hostname("lb.example.com")
            .node_port("np", 81, "TCP", 30081),
    );
    h.slice(web_slice().port("np", 8081, "TCP"));
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "np").unwrap();
    assert!(sp.load_balancer_ips.is_empty());
    assert_eq!(
        h.trace(from_external(EXTERNAL_CLIENT).tcp(NODE_IP, 30081)),
        dnat(&["10.0.0.2:8081"], true)
    );
}

#[test]
fn t3_2_5_source_ranges_are_trimmed() {
    let mut h = Harness::new();
    h.service(web().lb(LB_IP, None).source_range(" 10.0.0.0/8 "))
        .slice(web_slice());
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
    assert_eq!(sp.firewall_allow, vec!["10.0.0.0/8".parse().unwrap()]);
}

#[test]
fn t3_2_6_etp_local_applies_to_external_ips_of_cluster_ip_services_only() {
    let mut h = Harness::new();
    h.service(web().external_ip(EXTERNAL_IP).etp_local());
    assert!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .external_policy_local
    );
    let mut h = Harness::new();
    h.service(web().etp_local());
    assert!(
        !h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .external_policy_local
    );
}

#[test]
fn t3_2_7_node_port_zero_means_none() {
    let mut h = Harness::new();
    h.service(web().lb(LB_IP, None).node_port("np", 81, "TCP", 0));
    assert_eq!(
        h.port(IpFamily::V4, "ns1", "svc1", "np").unwrap().node_port,
        None
    );
}

#[test]
fn t3_3_1_slice_ports_match_by_name_and_protocol() {
    let mut h = Harness::new();
    h.service(
        service("ns1", "svc1")
            .cluster_ip(SVC_IP)
            .port("http", 80, "UDP"),
    );
    h.slice(
        slice("ns1", "svc1", "a")
            .port("http", 80, "TCP")
            .ready("10.0.0.2", NODE),
    );
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "http").unwrap();
    assert_eq!(sp.protocol, Protocol::Udp);
    assert!(sp.endpoints.is_empty());
}

#[test]
fn t3_3_2_nil_conditions_mean_ready_serving_not_terminating() {
    let mut h = Harness::new();
    h.service(web()).slice(
        slice("ns1", "svc1", "a")
            .port("p80", 8080, "TCP")
            .endpoint("10.0.0.2", NODE, None, None, None),
    );
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
    assert_eq!(sp.cluster_endpoints.len(), 1);
    assert!(sp.cluster_endpoints[0].ready);
}

#[test]
fn t3_3_3_duplicate_endpoint_prefers_the_non_terminating_entry() {
    for order in [false, true] {
        let mut h = Harness::new();
        let a = slice("ns1", "svc1", "a")
            .port("p80", 8080, "TCP")
            .terminating("10.0.0.2", NODE);
        let b = slice("ns1", "svc1", "b")
            .port("p80", 8080, "TCP")
            .ready("10.0.0.2", NODE);
        h.service(web());
        if order {
            h.slice(a).slice(b);
        } else {
            h.slice(b).slice(a);
        }
        let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
        assert_eq!(sp.cluster_endpoints.len(), 1);
        assert!(sp.cluster_endpoints[0].ready, "order {order}");
    }
}

#[test]
fn t3_3_4_only_the_first_address_is_used() {
    let mut s = web_slice().build();
    s.endpoints[0].addresses.push("10.0.0.3".into());
    let mut h = Harness::new();
    h.service(web()).slice(s);
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
    assert_eq!(
        sp.endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect::<Vec<_>>(),
        ["10.0.0.2:8080"]
    );
}

#[test]
fn t3_3_slices_of_the_other_family_and_unowned_slices_are_ignored() {
    let mut h = Harness::new();
    h.service(web());
    h.slice(
        slice("ns1", "svc1", "v6")
            .ipv6()
            .port("p80", 8080, "TCP")
            .ready("fd00::2", NODE),
    );
    let mut unowned = web_slice().build();
    unowned.metadata.labels = None;
    h.slice(unowned);
    assert!(
        h.port(IpFamily::V4, "ns1", "svc1", "p80")
            .unwrap()
            .endpoints
            .is_empty()
    );
}

/// Bad input (DEVELOPERS "Bad input and faults"): each invalid object is skipped with one note
/// naming it, and the valid objects around it keep working.
#[test]
fn invalid_objects_are_skipped_with_one_note_each() {
    let bad_services = [
        (
            "invalid clusterIP",
            service("ns1", "bad")
                .cluster_ip("300.1.2.3")
                .port("p", 80, "TCP"),
        ),
        (
            "port 0",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .port("p", 0, "TCP"),
        ),
        (
            "port > 65535",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .port("p", 70000, "TCP"),
        ),
        (
            "negative nodePort",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .node_port("p", 80, "TCP", -5),
        ),
        (
            "unknown protocol",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .port("p", 80, "ICMP"),
        ),
        (
            "duplicate port",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .port("p", 80, "TCP")
                .port("p", 81, "TCP"),
        ),
        (
            "bad source range",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .port("p", 80, "TCP")
                .source_range("10.0.0.0/40"),
        ),
        (
            "affinity timeout",
            service("ns1", "bad")
                .cluster_ip("172.30.0.99")
                .port("p", 80, "TCP")
                .affinity(Some(0)),
        ),
    ];
    for (what, bad) in bad_services.into_iter().chain([(
        "injection in a name",
        service("ns1", "bad\"; flush ruleset")
            .cluster_ip("172.30.0.99")
            .port("p", 80, "TCP"),
    )]) {
        let mut h = Harness::new();
        h.service(web()).slice(web_slice()).service(bad);
        assert_eq!(h.skipped.len(), 1, "{what}: {:?}", h.skipped);
        let note = h.skipped[0].to_string();
        assert!(
            note.contains("ns1/bad"),
            "{what}: the note names the object: {note}"
        );
        assert!(h.port(IpFamily::V4, "ns1", "bad", "p").is_none(), "{what}");
        assert_eq!(
            h.port(IpFamily::V4, "ns1", "svc1", "p80")
                .unwrap()
                .endpoints
                .len(),
            1,
            "{what}"
        );
    }

    let mut huge = slice("ns1", "svc1", "huge").port("p80", 8080, "TCP");
    for i in 0..1001 {
        huge = huge.ready(&format!("10.1.{}.{}", i / 250, i % 250), NODE);
    }
    let bad_slices = [
        ("too many endpoints", huge.build()),
        ("bad address type", slice("ns1", "svc1", "x").build()).map_type("IPv5"),
        (
            "bad port",
            slice("ns1", "svc1", "x").port("p80", 99999, "TCP").build(),
        ),
        (
            "unknown protocol",
            slice("ns1", "svc1", "x").port("p80", 80, "XTP").build(),
        ),
    ];
    for (what, bad) in bad_slices {
        let mut h = Harness::new();
        h.service(web()).slice(web_slice()).slice(bad);
        assert_eq!(h.skipped.len(), 1, "{what}: {:?}", h.skipped);
        assert_eq!(
            h.port(IpFamily::V4, "ns1", "svc1", "p80")
                .unwrap()
                .endpoints
                .len(),
            1,
            "{what}"
        );
    }

    // Bad entries inside a good object: the entry is dropped, the object kept.
    let mut h = Harness::new();
    h.service(web().external_ip("not-an-ip").external_ip(EXTERNAL_IP));
    h.slice(web_slice().ready("10.0.0.300", NODE));
    let sp = h.port(IpFamily::V4, "ns1", "svc1", "p80").unwrap();
    assert_eq!(sp.external_ips.len(), 1);
    assert_eq!(sp.endpoints.len(), 1);
    assert_eq!(h.skipped.iter().filter(|s| !s.whole).count(), 2);

    // A broken update of a good object keeps the last good version.
    let mut h = Harness::new();
    h.service(web()).service(
        service("ns1", "svc1")
            .cluster_ip("bogus")
            .port("p80", 80, "TCP"),
    );
    assert!(h.port(IpFamily::V4, "ns1", "svc1", "p80").is_some());
}

trait MapType {
    fn map_type(self, t: &str) -> Self;
}

impl MapType for (&'static str, kpr_model::EndpointSlice) {
    fn map_type(mut self, t: &str) -> Self {
        self.1.address_type = t.into();
        self
    }
}
