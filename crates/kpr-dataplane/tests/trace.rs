//! The rules of both backends do what the model intends: every behaviour-reference case of §4
//! and §5 is rendered with the nftables and with the iptables backend, traced through each
//! backend's typed rules, and gives exactly the model's intent (DNAT targets with masquerade,
//! DROP, REJECT, PASS). The two intents differ in two places (§4.8): an undefined port on a
//! ClusterIP is REJECTed by nftables and PASSed by iptables, and an address of a ServiceCIDR
//! that no Service uses is DROPped by nftables and PASSed by iptables. Plus a property: for random clusters and packets, each backend's tracer agrees with the model.
#![allow(clippy::unwrap_used)]

use kpr_dataplane::iptables::{IptConfig, Rendered as IptRendered, render as ipt_render};
use kpr_dataplane::nftables::trace::{Outcome, TracePacket, TxView, trace};
use kpr_dataplane::nftables::{NftConfig, NodePortAddrs, Rendered, render};
use kpr_model::intent::{HostView, Intent, Packet, intent};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{Input, IpFamily, Protocol, SyncPlan, Trackers, Update, desired, update_desired};
use kpr_nft::{L4Proto, Op, Verdict};
use kpr_testkit::*;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The outcomes of one packet: (nftables, iptables).
type Both = (BTreeSet<Outcome>, BTreeSet<Outcome>);

/// The same outcomes for both backends.
fn same(o: BTreeSet<Outcome>) -> Both {
    (o.clone(), o)
}

fn to_outcomes(want: Intent) -> BTreeSet<Outcome> {
    match want {
        Intent::Dnat(ts) => ts
            .into_iter()
            .map(|t| Outcome::Dnat {
                to: t.addr,
                masquerade: t.masquerade,
            })
            .collect(),
        Intent::Drop => [Outcome::Drop].into(),
        Intent::Reject => [Outcome::Reject].into(),
        Intent::Pass => [Outcome::Pass { masquerade: false }].into(),
    }
}

struct H {
    t: Trackers,
    mode: DetectLocalMode,
    masquerade_all: bool,
    /// `nodePortAddresses` unset (every local address but loopback) instead of the node IP.
    node_ports_all: bool,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl H {
    fn new() -> H {
        H {
            t: Trackers::new(),
            mode: DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]),
            masquerade_all: false,
            node_ports_all: false,
        }
    }
    fn svc(&mut self, s: ServiceBuilder) -> &mut Self {
        assert!(
            self.t
                .record(Input::Services(Update::Apply(s.build())))
                .is_empty()
        );
        self
    }
    fn slice(&mut self, s: SliceBuilder) -> &mut Self {
        assert!(
            self.t
                .record(Input::Slices(Update::Apply(s.build())))
                .is_empty()
        );
        self
    }
    fn service_cidr(&mut self, cidrs: &[&str]) -> &mut Self {
        let c = service_cidr("kubernetes", cidrs);
        assert!(
            self.t
                .record(Input::ServiceCidrs(Update::Apply(c)))
                .is_empty()
        );
        self
    }
    fn local_ips() -> Vec<IpAddr> {
        vec![ip(NODE_IP), ip("127.0.0.1"), ip("192.168.1.2")]
    }
    /// Checks one packet with both backends: each one's rules give that backend's intent.
    fn check(
        &self,
        src: &str,
        iif: Option<&str>,
        from_host: bool,
        dst: &str,
        port: u16,
        proto: Protocol,
    ) -> Both {
        let node = self.t.state().node();
        let ctx = NodeContext::new(NODE, node);
        let policy = ProxyPolicy::new(self.masquerade_all, &self.mode, node);
        let d = desired(self.t.state(), &ctx, &policy);
        let fam = &d.families[&IpFamily::V4];
        let node_ports = if self.node_ports_all {
            NodePortAddrs::All
        } else {
            NodePortAddrs::List(vec![ip(NODE_IP)])
        };
        let pkt = TracePacket {
            src: ip(src),
            iif: iif.map(str::to_owned),
            from_host,
            dst: ip(dst),
            proto: kpr_dataplane::nftables::layout::l4(proto),
            port,
            local_ips: H::local_ips(),
        };
        let packet = Packet {
            src: ip(src),
            iif: iif.map(str::to_owned),
            from_host,
            dst: ip(dst),
            protocol: proto,
            port,
        };
        let host = |reject_unknown_cluster_ports| HostView {
            node_port_ips: (!self.node_ports_all).then(|| vec![ip(NODE_IP)]),
            local_ips: H::local_ips(),
            reject_unknown_cluster_ports,
        };
        let what = format!("{src} -> {dst}:{port}/{proto}");

        let cfg = NftConfig::new(IpFamily::V4, 14, node_ports.clone());
        let tx = render(fam, &cfg, &mut Rendered::default(), &SyncPlan::full());
        let nft = trace(&TxView::from_full(&tx), &pkt);
        let want = to_outcomes(intent(fam, &host(true), &packet));
        assert_eq!(nft, want, "nftables: {what}");

        let cfg = IptConfig::new(IpFamily::V4, 14, node_ports);
        let mut rendered = IptRendered::default();
        ipt_render(fam, &cfg, &mut rendered, &SyncPlan::full(), None);
        let chains = kpr_dataplane::iptables::trace::chains(&rendered);
        let ipt = kpr_dataplane::iptables::trace::trace(&chains, &pkt);
        let want = to_outcomes(intent(fam, &host(false), &packet));
        assert_eq!(ipt, want, "iptables: {what}");
        (nft, ipt)
    }
}

fn dnat(eps: &[&str], masquerade: bool) -> BTreeSet<Outcome> {
    eps.iter()
        .map(|e| Outcome::Dnat {
            to: e.parse().unwrap(),
            masquerade,
        })
        .collect()
}

const CIP: &str = "172.30.0.41";

fn lb_local() -> ServiceBuilder {
    service("ns", "svc")
        .cluster_ip(CIP)
        .lb(LB_IP, None)
        .etp_local()
        .node_port("p80", 80, "TCP", 3001)
        .health_check_node_port(30000)
}

fn eps(local: bool, remote: bool) -> SliceBuilder {
    let mut s = slice("ns", "svc", "a").port("p80", 8080, "TCP");
    if local {
        s = s.ready("10.0.0.2", NODE);
    }
    if remote {
        s = s.ready("10.0.1.2", OTHER_NODE);
    }
    s
}

#[test]
fn t4_1_cluster_ip_pods_hosts_and_unknown_ports() {
    let mut h = H::new();
    h.svc(service("ns", "svc").cluster_ip(CIP).port("p80", 80, "TCP"))
        .slice(eps(true, true));
    assert_eq!(
        h.check(POD, Some("veth1"), false, CIP, 80, Protocol::Tcp),
        same(dnat(&["10.0.0.2:8080", "10.0.1.2:8080"], false))
    );
    h.check(NODE_IP, None, true, CIP, 80, Protocol::Tcp);
    h.check("10.0.0.2", Some("veth2"), false, CIP, 80, Protocol::Tcp); // hairpin
    // An undefined port on a ClusterIP (§4.8): nftables REJECTs, iptables PASSes.
    let unknown_port = (
        [Outcome::Reject].into(),
        [Outcome::Pass { masquerade: false }].into(),
    );
    assert_eq!(
        h.check(POD, Some("veth1"), false, CIP, 81, Protocol::Tcp),
        unknown_port
    );
    assert_eq!(
        h.check(NODE_IP, None, true, CIP, 81, Protocol::Tcp),
        unknown_port
    );
    h.masquerade_all = true;
    h.check(POD, Some("veth1"), false, CIP, 80, Protocol::Tcp);
}

#[test]
fn t4_2_etp_local_cases() {
    for (local, remote) in [(true, true), (false, true), (false, false)] {
        let mut h = H::new();
        h.svc(lb_local()).slice(eps(local, remote));
        for dst in [(LB_IP, 80), (NODE_IP, 3001)] {
            h.check(
                EXTERNAL_CLIENT,
                Some("eth0"),
                false,
                dst.0,
                dst.1,
                Protocol::Tcp,
            );
            h.check(POD, Some("veth1"), false, dst.0, dst.1, Protocol::Tcp);
            h.check(NODE_IP, None, true, dst.0, dst.1, Protocol::Tcp);
        }
        h.mode = DetectLocalMode::ClusterCidr(vec![]);
        h.check(POD, Some("veth1"), false, LB_IP, 80, Protocol::Tcp);
    }
}

#[test]
fn t4_3_itp_local_and_t4_8_no_endpoints() {
    for (local, remote) in [(true, true), (false, true), (false, false)] {
        let mut h = H::new();
        h.svc(
            service("ns", "svc")
                .cluster_ip(CIP)
                .external_ip(EXTERNAL_IP)
                .itp_local()
                .node_port("p80", 80, "TCP", 3001),
        )
        .slice(eps(local, remote));
        for (dst, port) in [(CIP, 80), (EXTERNAL_IP, 80), (NODE_IP, 3001)] {
            h.check(POD, Some("veth1"), false, dst, port, Protocol::Tcp);
            h.check(
                EXTERNAL_CLIENT,
                Some("eth0"),
                false,
                dst,
                port,
                Protocol::Tcp,
            );
            h.check(NODE_IP, None, true, dst, port, Protocol::Tcp);
        }
    }
}

/// §4.8 for a host process: the frontends of a Service without endpoints are REJECTed in both
/// backends, also a non-local externalIP (iptables: filter KUBE-SERVICES, as OUTPUT does not
/// reach KUBE-EXTERNAL-SERVICES) and an LB IP whose source ranges exclude the host.
#[test]
fn t4_8_host_to_the_external_frontends_of_a_service_without_endpoints() {
    let mut h = H::new();
    h.svc(
        service("ns", "svc")
            .cluster_ip(CIP)
            .external_ip(EXTERNAL_IP)
            .lb(LB_IP, None)
            .source_range("192.0.2.0/24")
            .node_port("p80", 80, "TCP", 3001),
    )
    .slice(eps(false, false));
    let reject: BTreeSet<Outcome> = [Outcome::Reject].into();
    assert_eq!(
        h.check(NODE_IP, None, true, EXTERNAL_IP, 80, Protocol::Tcp),
        same(reject.clone())
    );
    assert_eq!(
        h.check(NODE_IP, None, true, LB_IP, 80, Protocol::Tcp),
        same(reject.clone())
    );
    assert_eq!(
        h.check(NODE_IP, None, true, NODE_IP, 3001, Protocol::Tcp),
        same(reject.clone())
    );
    assert_eq!(
        h.check(NODE_IP, None, true, CIP, 80, Protocol::Tcp),
        same(reject.clone())
    );
    for dst in [EXTERNAL_IP, NODE_IP] {
        let port = if dst == NODE_IP { 3001 } else { 80 };
        assert_eq!(
            h.check(
                EXTERNAL_CLIENT,
                Some("eth0"),
                false,
                dst,
                port,
                Protocol::Tcp
            ),
            same(reject.clone())
        );
    }
    assert_eq!(
        h.check("192.0.2.9", Some("eth0"), false, LB_IP, 80, Protocol::Tcp),
        same(reject)
    );
    assert_eq!(
        h.check(
            EXTERNAL_CLIENT,
            Some("eth0"),
            false,
            LB_IP,
            80,
            Protocol::Tcp
        ),
        same([Outcome::Drop].into())
    );
}

#[test]
fn t4_4_node_ports_only_on_accepted_addresses() {
    let mut h = H::new();
    h.svc(
        service("ns", "svc")
            .cluster_ip(CIP)
            .node_port("p80", 80, "UDP", 3001),
    )
    .slice(
        slice("ns", "svc", "a")
            .port("p80", 53, "UDP")
            .ready("10.0.1.2", OTHER_NODE),
    );
    assert_eq!(
        h.check(
            EXTERNAL_CLIENT,
            Some("eth0"),
            false,
            NODE_IP,
            3001,
            Protocol::Udp
        ),
        same(dnat(&["10.0.1.2:53"], true))
    );
    assert_eq!(
        h.check(
            EXTERNAL_CLIENT,
            Some("eth0"),
            false,
            "192.168.1.2",
            3001,
            Protocol::Udp
        ),
        same([Outcome::Pass { masquerade: false }].into())
    );
    h.check(
        EXTERNAL_CLIENT,
        Some("eth0"),
        false,
        NODE_IP,
        3001,
        Protocol::Tcp,
    );
}

#[test]
fn t4_6_source_ranges() {
    let mut h = H::new();
    h.svc(
        service("ns", "svc")
            .cluster_ip(CIP)
            .lb(LB_IP, None)
            .source_range("192.0.2.0/24")
            .node_port("p80", 80, "TCP", 3001),
    )
    .slice(eps(true, false));
    assert_eq!(
        h.check(
            "198.51.100.7",
            Some("eth0"),
            false,
            LB_IP,
            80,
            Protocol::Tcp
        ),
        same([Outcome::Drop].into())
    );
    h.check("192.0.2.9", Some("eth0"), false, LB_IP, 80, Protocol::Tcp);
    h.check(
        "198.51.100.7",
        Some("eth0"),
        false,
        NODE_IP,
        3001,
        Protocol::Tcp,
    );
    h.check(POD, Some("veth1"), false, LB_IP, 80, Protocol::Tcp);
}

/// §4.8: an address of a ServiceCIDR that no Service uses is dropped by nftables (from pods,
/// outside clients routed through the node, and the host) and passed by iptables, as upstream;
/// a ClusterIP in the range keeps its own verdicts.
#[test]
fn t4_8_unallocated_service_cidr_addresses() {
    let mut h = H::new();
    h.svc(service("ns", "svc").cluster_ip(CIP).port("p80", 80, "TCP"))
        .slice(eps(true, true))
        .service_cidr(&[SERVICE_CIDR, "172.29.0.0/24"]);
    let dropped = (
        [Outcome::Drop].into(),
        [Outcome::Pass { masquerade: false }].into(),
    );
    for dst in ["172.30.0.42", "172.30.255.255", "172.29.0.7"] {
        assert_eq!(
            h.check(POD, Some("veth1"), false, dst, 80, Protocol::Tcp),
            dropped
        );
        assert_eq!(
            h.check(
                EXTERNAL_CLIENT,
                Some("eth0"),
                false,
                dst,
                443,
                Protocol::Udp
            ),
            dropped
        );
        assert_eq!(
            h.check(NODE_IP, None, true, dst, 80, Protocol::Tcp),
            dropped
        );
    }
    assert_eq!(
        h.check(POD, Some("veth1"), false, CIP, 80, Protocol::Tcp),
        same(dnat(&["10.0.0.2:8080", "10.0.1.2:8080"], false))
    );
    assert_eq!(
        h.check(POD, Some("veth1"), false, CIP, 81, Protocol::Tcp).0,
        [Outcome::Reject].into()
    );
    assert_eq!(
        h.check(POD, Some("veth1"), false, "172.31.0.1", 80, Protocol::Tcp),
        same([Outcome::Pass { masquerade: false }].into())
    );
}

#[test]
fn t5_terminating_topology_and_affinity() {
    let mut h = H::new();
    h.svc(
        service("ns", "svc")
            .cluster_ip(CIP)
            .port("p80", 80, "TCP")
            .affinity(Some(30)),
    );
    h.slice(
        slice("ns", "svc", "a")
            .port("p80", 8080, "TCP")
            .terminating("10.0.1.1", OTHER_NODE)
            .terminating("10.0.0.1", NODE),
    );
    assert_eq!(
        h.check(POD, Some("veth1"), false, CIP, 80, Protocol::Tcp),
        same(dnat(&["10.0.0.1:8080", "10.0.1.1:8080"], false))
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn svc(id: u8, v: u8) -> ServiceBuilder {
        let mut b = service("ns", &format!("s{id}")).cluster_ip(&format!("172.30.0.{}", id + 1));
        b = if v & 1 == 1 {
            b.node_port("p", 80, "TCP", 3000 + i32::from(id))
        } else {
            b.port("p", 80, "TCP")
        };
        b = b.port("u", 53, "UDP");
        if v & 2 == 2 {
            b = b
                .lb(&format!("1.2.3.{}", id + 1), None)
                .node_port("q", 81, "TCP", 3100 + i32::from(id))
                .health_check_node_port(31000);
        }
        if v & 4 == 4 {
            b = b.etp_local();
        }
        if v & 8 == 8 {
            b = b.itp_local();
        }
        if v & 16 == 16 {
            b = b.external_ip(&format!("192.168.99.{}", id + 1));
        }
        if v & 32 == 32 {
            b = b.source_range("203.0.113.0/25");
        }
        if v & 64 == 64 {
            b = b.affinity(Some(60));
        }
        b
    }

    fn eps(id: u8, e: &[(u8, u8)]) -> SliceBuilder {
        slice("ns", &format!("s{id}"), "a")
            .port("p", 8080, "TCP")
            .port("q", 8081, "TCP")
            .port("u", 5353, "UDP")
            .mixed(e)
    }

    /// Where the packets to a Service address and port go, by the rules of `view`.
    fn fates(view: &TxView, dsts: &[(String, u16)]) -> Vec<BTreeSet<Outcome>> {
        let sources = [
            (POD, Some("veth1"), false),
            (EXTERNAL_CLIENT, Some("eth0"), false),
            (NODE_IP, None, true),
        ];
        let mut out = Vec::new();
        for (src, iif, from_host) in sources {
            for (dst, port) in dsts {
                let proto = if *port == 53 {
                    L4Proto::Udp
                } else {
                    L4Proto::Tcp
                };
                let pkt = TracePacket {
                    src: ip(src),
                    iif: iif.map(str::to_owned),
                    from_host,
                    dst: ip(dst),
                    proto,
                    port: *port,
                    local_ips: H::local_ips(),
                };
                out.push(trace(view, &pkt));
            }
        }
        out
    }

    /// Issue 16: beside a plain Service with as many endpoints, a new one is elements only:
    /// its ClusterIP, its two `service-ips` elements, its endpoints under its ClusterIP and
    /// ports, and the hairpin pairs of endpoints not seen before. No chain, no rule.
    #[test]
    fn a_new_plain_service_beside_one_with_as_many_endpoints_is_elements_only() {
        let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
        let cfg = NftConfig::new(IpFamily::V4, 14, NodePortAddrs::List(vec![ip(NODE_IP)]));
        let (ctx, pol) = (
            NodeContext::new(NODE, None),
            ProxyPolicy::new(false, &mode, None),
        );
        let mut t = Trackers::new();
        t.record(Input::Services(Update::Apply(svc(0, 0).build())));
        t.record(Input::Slices(Update::Apply(
            eps(0, &[(0, 0), (1, 0)]).build(),
        )));
        let _ = t.checkout();
        let mut d = desired(t.state(), &ctx, &pol);
        let mut committed = Rendered::default();
        render(
            &d.families[&IpFamily::V4],
            &cfg,
            &mut committed,
            &SyncPlan::full(),
        );
        t.record(Input::Services(Update::Apply(svc(1, 0).build())));
        t.record(Input::Slices(Update::Apply(
            eps(1, &[(0, 0), (3, 0)]).build(),
        )));
        let plan = t.checkout();
        update_desired(&mut d, t.state(), &ctx, &pol, &plan);
        let tx = render(&d.families[&IpFamily::V4], &cfg, &mut committed, &plan);
        let script = kpr_nft::text::script(&tx);
        assert!(
            tx.ops.iter().all(|op| matches!(op, Op::AddElement(_))),
            "{script}"
        );
        let count = |set: &str| {
            script
                .lines()
                .filter(|l| l.contains(&format!(" {set} {{")))
                .count()
        };
        assert_eq!(count("service-ips"), 2, "{script}");
        assert_eq!(count("cluster-ips"), 1, "{script}");
        assert_eq!(
            count("cluster-endpoints-tcp") + count("cluster-endpoints-udp"),
            4,
            "{script}"
        );
        assert_eq!(count("hairpin-endpoints"), 1, "{script}");
        assert!(
            script.contains("172.30.0.2 . tcp . 80 comment \"ns/s1:p\" : goto pick-tcp-2"),
            "{script}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Issue 16: a plain ClusterIP Service (endpoints, no affinity, no external frontends,
        /// traffic policy Cluster) added to a running table by a partial sync is map elements
        /// only once the pick chains for its endpoint counts exist (otherwise those chains and
        /// elements), and every packet goes where it goes when the same Service comes with a
        /// full sync, which is where the model says.
        #[test]
        fn a_new_plain_service_through_elements_equals_a_full_sync(
            services in prop::collection::vec((0u8..4, 0u8..128, prop::collection::vec((0u8..5, 0u8..3), 0..4)), 0..4),
            new_eps in prop::collection::vec(0u8..6, 1..5),
            masquerade_all in any::<bool>(),
        ) {
            let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
            let cfg = NftConfig::new(IpFamily::V4, 14, NodePortAddrs::List(vec![ip(NODE_IP)]));
            let mut t = Trackers::new();
            for (id, v, e) in &services {
                t.record(Input::Services(Update::Apply(svc(*id, *v).build())));
                t.record(Input::Slices(Update::Apply(eps(*id, e).build())));
            }
            let ctx = NodeContext::new(NODE, None);
            let pol = ProxyPolicy::new(masquerade_all, &mode, None);
            let _ = t.checkout();
            let mut d = desired(t.state(), &ctx, &pol);
            let mut committed = Rendered::default();
            let first = render(&d.families[&IpFamily::V4], &cfg, &mut committed, &SyncPlan::full());
            let mut partial = TxView::from_full(&first);
            let chains_before: BTreeSet<String> = partial.chains().map(|c| c.name.clone()).collect();

            // The new Service: a TCP and a UDP port, ready endpoints on both nodes.
            let new = service("ns", "new").cluster_ip("172.30.0.100").port("p", 80, "TCP").port("u", 53, "UDP");
            let mut slice = slice("ns", "new", "a").port("p", 8080, "TCP").port("u", 5353, "UDP");
            for i in &new_eps {
                slice = slice.ready(&format!("10.0.{}.{}", i % 2, i + 10), if i % 2 == 0 { NODE } else { OTHER_NODE });
            }
            t.record(Input::Services(Update::Apply(new.build())));
            t.record(Input::Slices(Update::Apply(slice.build())));
            let plan = t.checkout();
            update_desired(&mut d, t.state(), &ctx, &pol, &plan);
            let tx = render(&d.families[&IpFamily::V4], &cfg, &mut committed, &plan);
            partial.apply(&tx);

            // Elements, and nothing but the pick chains (and their map) it is the first to need.
            let targets: BTreeSet<String> = tx.ops.iter().filter_map(|op| match op {
                Op::AddElement(e) => match &e.verdict {
                    Some(Verdict::Goto(c)) => Some(c.clone()),
                    _ => None,
                },
                _ => None,
            }).collect();
            prop_assert!(!targets.is_empty(), "no service-ips element:\n{}", kpr_nft::text::script(&tx));
            for op in &tx.ops {
                let ok = match op {
                    Op::AddElement(_) => true,
                    Op::AddChain(c) => c.name.starts_with("pick-") && !chains_before.contains(&c.name),
                    Op::FlushChain(c) => c.starts_with("pick-") && !chains_before.contains(c),
                    Op::AddRule(r) => r.chain.starts_with("pick-") && !chains_before.contains(&r.chain),
                    Op::AddMap(m) => m.name.starts_with("cluster-endpoints-"),
                    _ => false,
                };
                prop_assert!(ok, "not element-only: {}\n{}", tx.describe(tx.ops.iter().position(|o| o == op).unwrap_or(0)), kpr_nft::text::script(&tx));
            }
            if targets.iter().all(|c| chains_before.contains(c)) {
                prop_assert!(tx.ops.iter().all(|op| matches!(op, Op::AddElement(_))), "{}", kpr_nft::text::script(&tx));
            }

            // The same Service through a full sync.
            let full = render(&desired(t.state(), &ctx, &pol).families[&IpFamily::V4], &cfg, &mut Rendered::default(), &SyncPlan::full());
            let full = TxView::from_full(&full);
            let mut dsts = vec![("172.30.0.100".to_owned(), 80), ("172.30.0.100".to_owned(), 53), ("172.30.0.100".to_owned(), 99)];
            for (id, _, _) in &services {
                dsts.push((format!("172.30.0.{}", id + 1), 80));
                dsts.push((format!("172.30.0.{}", id + 1), 53));
            }
            let got = fates(&partial, &dsts);
            prop_assert_eq!(&got, &fates(&full, &dsts));
            // And the model agrees.
            let host = HostView { node_port_ips: Some(vec![ip(NODE_IP)]), local_ips: H::local_ips(), reject_unknown_cluster_ports: true };
            let fam = &d.families[&IpFamily::V4];
            let mut i = 0;
            for (src, iif, from_host) in [(POD, Some("veth1"), false), (EXTERNAL_CLIENT, Some("eth0"), false), (NODE_IP, None, true)] {
                for (dst, port) in &dsts {
                    let protocol = if *port == 53 { Protocol::Udp } else { Protocol::Tcp };
                    let packet = Packet { src: ip(src), iif: iif.map(str::to_owned), from_host, dst: ip(dst), protocol, port: *port };
                    prop_assert_eq!(&got[i], &to_outcomes(intent(fam, &host, &packet)), "{} -> {}:{}", src, dst, port);
                    i += 1;
                }
            }
        }

        /// For random Services and packets, the rules of both backends agree with their intents.
        #[test]
        fn rules_agree_with_intent(
            services in prop::collection::vec((0u8..4, 0u8..128, prop::collection::vec((0u8..5, 0u8..3), 0..4)), 1..4),
            detector in 0u8..3,
            masquerade_all in any::<bool>(),
            node_ports_all in any::<bool>(),
            with_service_cidr in any::<bool>(),
        ) {
            let mut h = H::new();
            h.masquerade_all = masquerade_all;
            h.node_ports_all = node_ports_all;
            h.mode = match detector {
                0 => DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]),
                1 => DetectLocalMode::ClusterCidr(vec![]),
                _ => DetectLocalMode::InterfaceNamePrefix("veth".into()),
            };
            for (id, v, e) in &services {
                h.svc(svc(*id, *v)).slice(eps(*id, e));
            }
            if with_service_cidr {
                h.service_cidr(&[SERVICE_CIDR]);
            }
            let sources = [(POD, Some("veth1"), false), (EXTERNAL_CLIENT, Some("eth0"), false), ("203.0.113.200", Some("eth0"), false), (NODE_IP, None, true), ("10.0.0.10", Some("veth9"), false)];
            for (id, _, _) in &services {
                let dsts = [
                    (format!("172.30.0.{}", id + 1), 80), (format!("172.30.0.{}", id + 1), 53), (format!("172.30.0.{}", id + 1), 99),
                    (format!("1.2.3.{}", id + 1), 81), (format!("192.168.99.{}", id + 1), 80),
                    (NODE_IP.to_owned(), 3000 + u16::from(*id)), (NODE_IP.to_owned(), 3100 + u16::from(*id)), ("192.168.1.2".to_owned(), 3000 + u16::from(*id)), ("127.0.0.1".to_owned(), 3000 + u16::from(*id)),
                    // Unallocated: inside the ServiceCIDR (when there is one), and outside it.
                    (format!("172.30.1.{}", id + 1), 80), (format!("172.31.0.{}", id + 1), 80),
                ];
                for (src, iif, host) in sources {
                    for (dst, port) in &dsts {
                        let proto = if *port == 53 { Protocol::Udp } else { Protocol::Tcp };
                        h.check(src, iif, host, dst, *port, proto);
                    }
                }
            }
        }
    }
}
