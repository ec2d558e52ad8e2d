//! `kpr_model::explain` (issue 14): the explanation of a packet names the frontend, the policy,
//! each endpoint in or out with its reason, and the verdict; its verdict is the model's intent
//! (§4, §5), and its chosen endpoints are exactly the DNAT targets.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Harness, from_external, from_host, from_pod};
use kpr_model::explain::{Explanation, explain};
use kpr_model::intent::{Intent, Packet, intent};
use kpr_model::{IpFamily, Protocol};
use kpr_testkit::{EXTERNAL_CLIENT, LB_IP, NODE, NODE_IP, OTHER_NODE, POD, node, service, slice};
use proptest::prelude::*;

fn ask(h: &Harness, pkt: &Packet) -> Explanation {
    let fam = &h.desired().families[&IpFamily::V4];
    explain(fam, h.trackers.state(), &h.context(), &h.host, pkt)
}

fn harness() -> Harness {
    let mut h = Harness::new();
    h.node(node(NODE).zone("a").address("InternalIP", NODE_IP));
    h
}

/// §4.1, §5.1: ready endpoints are in; a terminating one is out while ready ones exist; each
/// DNAT target gets an equal share.
#[test]
fn cluster_ip_names_every_endpoint_with_its_reason() {
    let mut h = harness();
    h.service(
        service("ns", "web")
            .cluster_ip("172.30.0.10")
            .port("http", 80, "TCP"),
    );
    h.slice(
        slice("ns", "web", "a")
            .port("http", 8080, "TCP")
            .ready("10.0.0.11", NODE)
            .ready("10.0.1.12", OTHER_NODE)
            .terminating("10.0.1.13", OTHER_NODE)
            .endpoint(
                "10.0.1.14",
                OTHER_NODE,
                Some(false),
                Some(false),
                Some(false),
            ),
    );
    let e = ask(&h, &from_pod(POD).tcp("172.30.0.10", 80));
    let fe = e.frontend.as_ref().unwrap();
    assert_eq!(
        (fe.kind.as_str(), fe.service_port.as_str()),
        ("ClusterIP", "ns/web:http")
    );
    assert_eq!(e.verdict.action, "DNAT");
    assert_eq!(e.verdict.targets.len(), 2);
    assert!(
        e.verdict
            .targets
            .iter()
            .all(|t| (t.probability - 0.5).abs() < 1e-9)
    );
    let why = |addr: &str| {
        let ep = e.endpoints.iter().find(|x| x.address == addr).unwrap();
        (ep.chosen, ep.why.clone())
    };
    assert_eq!(why("10.0.0.11:8080"), (true, "ready".into()));
    assert!(!why("10.0.1.13:8080").0 && why("10.0.1.13:8080").1.contains("terminating"));
    assert_eq!(why("10.0.1.14:8080"), (false, "not ready".into()));
    let m = e.masquerade.as_ref().unwrap();
    assert!(!m.masquerade && m.why.contains("local pod"), "{m:?}");
    let text = e.to_string();
    assert!(
        text.contains("Frontend: ClusterIP 172.30.0.10:80 of ns/web:http"),
        "{text}"
    );
    assert!(text.contains("50.0%"), "{text}");
}

/// §4.2: ETP=Local from outside uses this node's endpoints, keeps the client IP; without a
/// local endpoint it drops and says why. §4.6: an LB IP with source ranges names the range.
#[test]
fn etp_local_firewall_and_drop_are_explained() {
    let mut h = harness();
    h.service(
        service("ns", "lb")
            .cluster_ip("172.30.0.20")
            .node_port("http", 80, "TCP", 30080)
            .lb(LB_IP, None)
            .source_range("203.0.113.0/24")
            .etp_local()
            .health_check_node_port(32000),
    );
    h.slice(
        slice("ns", "lb", "a")
            .port("http", 8080, "TCP")
            .ready("10.0.0.21", NODE)
            .ready("10.0.1.22", OTHER_NODE),
    );
    let e = ask(&h, &from_external(EXTERNAL_CLIENT).tcp(LB_IP, 80));
    assert_eq!(e.frontend.as_ref().unwrap().kind, "LoadBalancer");
    let fw = e.firewall.as_ref().unwrap();
    assert!(fw.allowed && fw.matched.as_deref() == Some("203.0.113.0/24"));
    assert_eq!(e.policy.as_ref().unwrap().set, "Local");
    assert_eq!(e.verdict.targets.len(), 1);
    assert!(!e.masquerade.as_ref().unwrap().masquerade);
    let remote = e
        .endpoints
        .iter()
        .find(|x| x.address == "10.0.1.22:8080")
        .unwrap();
    assert!(!remote.chosen && remote.why.contains("not on this node"));

    let e = ask(&h, &from_external("198.51.100.1").tcp(LB_IP, 80));
    assert_eq!(e.verdict.action, "DROP");
    assert!(
        e.verdict.why.contains("loadBalancerSourceRanges"),
        "{}",
        e.verdict.why
    );

    // The node's only local endpoint goes away: external traffic is dropped, not refused.
    h.slice(
        slice("ns", "lb", "a")
            .port("http", 8080, "TCP")
            .ready("10.0.1.22", OTHER_NODE),
    );
    let e = ask(&h, &from_external(EXTERNAL_CLIENT).tcp(NODE_IP, 30080));
    assert_eq!(e.frontend.as_ref().unwrap().kind, "NodePort");
    assert_eq!(e.verdict.action, "DROP");
    assert!(e.verdict.why.contains("Local"), "{}", e.verdict.why);
    // From the node itself, external frontends of a Local Service use the Cluster set.
    let e = ask(&h, &from_host(NODE_IP).tcp(NODE_IP, 30080));
    assert_eq!(e.policy.as_ref().unwrap().set, "Cluster");
    assert!(e.masquerade.unwrap().masquerade);
    // The LB IP from the node: the node's IP is in none of the source ranges.
    let e = ask(&h, &from_host(NODE_IP).tcp(LB_IP, 80));
    assert_eq!(e.verdict.action, "DROP");
    assert!(!e.firewall.unwrap().allowed);
}

/// §5.2: topology hints for another zone are a reason; §4.8: no endpoints is REJECT; an
/// address that is no Service is left alone.
#[test]
fn hints_rejects_and_non_service_addresses() {
    let mut h = harness();
    h.service(
        service("ns", "zoned")
            .cluster_ip("172.30.0.30")
            .port("p", 80, "TCP"),
    );
    h.slice(
        slice("ns", "zoned", "a")
            .port("p", 8080, "TCP")
            .ready("10.0.0.31", NODE)
            .zone_hints(&["a"])
            .ready("10.0.1.32", OTHER_NODE)
            .zone_hints(&["b"]),
    );
    h.service(
        service("ns", "empty")
            .cluster_ip("172.30.0.40")
            .port("p", 80, "TCP"),
    );
    let e = ask(&h, &from_pod(POD).tcp("172.30.0.30", 80));
    assert_eq!(e.topology.as_deref(), Some("PreferSameZone"));
    let other = e
        .endpoints
        .iter()
        .find(|x| x.address == "10.0.1.32:8080")
        .unwrap();
    assert!(
        !other.chosen && other.why.contains("other zones (b)"),
        "{}",
        other.why
    );
    let e = ask(&h, &from_pod(POD).tcp("172.30.0.40", 80));
    assert_eq!(e.verdict.action, "REJECT");
    let e = ask(&h, &from_pod(POD).tcp("172.30.0.99", 80));
    assert!(e.frontend.is_none());
    assert_eq!(e.verdict.action, "PASS");
    assert!(e.note.unwrap().contains("not a Service address"));
    let e = ask(&h, &from_pod(POD).tcp("172.30.0.30", 81));
    assert_eq!(
        e.verdict.action, "REJECT",
        "an undefined port of a ClusterIP (nftables)"
    );
}

fn svc(id: u8, v: u8) -> kpr_testkit::ServiceBuilder {
    let mut b = service("ns", &format!("s{id}")).cluster_ip(&format!("172.30.0.{}", id + 1));
    b = if v & 1 == 1 {
        b.node_port("p", 80, "TCP", 3000 + i32::from(id))
    } else {
        b.port("p", 80, "TCP")
    };
    if v & 2 == 2 {
        b = b.lb(&format!("1.2.3.{}", id + 1), None);
    }
    if v & 4 == 4 {
        b = b.etp_local();
    }
    if v & 8 == 8 {
        b = b.itp_local();
    }
    if v & 16 == 16 {
        b = b.source_range("203.0.113.0/25");
    }
    if v & 32 == 32 {
        b = b.affinity(Some(60));
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// For random Services and packets: the verdict is intent's, the chosen endpoints of a DNAT
    /// are exactly its targets with probabilities summing to 1, and a packet with no frontend
    /// is passed (or refused for an undefined ClusterIP port).
    #[test]
    fn explanations_agree_with_intent(
        services in prop::collection::vec((0u8..4, 0u8..64, prop::collection::vec((0u8..5, 0u8..3), 0..4)), 1..4),
    ) {
        let mut h = harness();
        for (id, v, eps) in &services {
            h.service(svc(*id, *v));
            let mut s = slice("ns", &format!("s{id}"), "a").port("p", 8080, "TCP");
            for (i, st) in eps {
                let addr = format!("10.0.{}.{}", i % 2, i + 10);
                let n = if i % 2 == 0 { NODE } else { OTHER_NODE };
                s = match st { 0 => s.ready(&addr, n), 1 => s.terminating(&addr, n),
                    _ => s.endpoint(&addr, n, Some(false), Some(false), Some(false)) };
            }
            h.slice(s);
        }
        let d = h.desired();
        let fam = &d.families[&IpFamily::V4];
        let sources = [from_pod(POD), from_external(EXTERNAL_CLIENT), from_host(NODE_IP)];
        for (id, _, _) in &services {
            for src in &sources {
                for (dst, port) in [(format!("172.30.0.{}", id + 1), 80), (format!("172.30.0.{}", id + 1), 99),
                        (format!("1.2.3.{}", id + 1), 80), (NODE_IP.to_owned(), 3000 + u16::from(*id)), ("10.9.9.9".to_owned(), 80)] {
                    let pkt = src.clone().to(&dst, port, Protocol::Tcp);
                    let want = intent(fam, &h.host, &pkt);
                    let e = explain(fam, h.trackers.state(), &h.context(), &h.host, &pkt);
                    match &want {
                        Intent::Dnat(t) => {
                            prop_assert_eq!(&e.verdict.action, "DNAT");
                            let mut targets: Vec<String> = t.iter().map(|t| t.addr.to_string()).collect();
                            targets.sort();
                            let mut chosen: Vec<String> = e.endpoints.iter().filter(|x| x.chosen).map(|x| x.address.clone()).collect();
                            chosen.sort();
                            prop_assert_eq!(&chosen, &targets, "{}", e);
                            let sum: f64 = e.verdict.targets.iter().map(|t| t.probability).sum();
                            prop_assert!((sum - 1.0).abs() < 1e-9);
                            prop_assert!(e.masquerade.is_some());
                        }
                        Intent::Drop => prop_assert_eq!(&e.verdict.action, "DROP"),
                        Intent::Reject => prop_assert_eq!(&e.verdict.action, "REJECT"),
                        Intent::Pass => {
                            prop_assert_eq!(&e.verdict.action, "PASS");
                            prop_assert!(e.frontend.is_none());
                        }
                    }
                    prop_assert!(!e.verdict.why.is_empty(), "{}", e);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
