//! The socket hooks do what the model intends (issue 18): for random clusters, the maps that
//! full and partial syncs write are traced as the programs read them (`kpr_socklb::trace`),
//! and a connection from a pod or from the node to a ClusterIP port goes to exactly the
//! endpoints the model's intent DNATs it to, is refused where the intent REJECTs, and is left
//! to the nftables rules otherwise (the intent then DROPs, REJECTs an unknown port, or PASSes).
//! After every single map operation of a sync, no Service names a missing backend.
#![allow(clippy::unwrap_used)]

use kpr_model::intent::{HostView, Intent, Packet, intent};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{
    DesiredState, Input, IpFamily, Protocol, SyncPlan, Trackers, Update, desired, update_desired,
};
use kpr_socklb::plan::{self, Programmed};
use kpr_socklb::trace::{Fate, Maps, connect};
use kpr_testkit::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Service `id` with features from the bits of `v`: a NodePort, ITP Local, affinity, and an
/// SCTP port besides its TCP and UDP ones.
fn svc(id: u8, v: u8) -> ServiceBuilder {
    let mut b = service("ns", &format!("s{id}")).cluster_ip(&format!("172.30.0.{}", id + 1));
    b = if v & 1 == 1 {
        b.node_port("p", 80, "TCP", 3000 + i32::from(id))
    } else {
        b.port("p", 80, "TCP")
    };
    b = b.port("u", 53, "UDP");
    if v & 2 == 2 {
        b = b.itp_local();
    }
    if v & 4 == 4 {
        b = b.affinity(Some(60));
    }
    if v & 8 == 8 {
        b = b.port("s", 9, "SCTP");
    }
    b
}

/// Its slice: endpoints on this node or the other, ready, terminating or neither.
fn eps(id: u8, e: &[(u8, u8)]) -> SliceBuilder {
    slice("ns", &format!("s{id}"), "a")
        .port("p", 8080, "TCP")
        .port("u", 5353, "UDP")
        .port("s", 9999, "SCTP")
        .mixed(e)
}

/// The maps after `ops`, checking after each one that no Service is half-written.
fn apply(maps: &mut Maps, ops: &[plan::Op], dsts: &[(SocketAddr, Protocol)]) -> Result<(), String> {
    for op in ops {
        maps.apply(op);
        for (dst, proto) in dsts {
            if connect(maps, *dst, *proto) == Fate::Broken {
                return Err(format!("{dst}/{proto} half-written after {op:?}"));
            }
        }
    }
    Ok(())
}

/// Every ClusterIP port of the family, and a port no Service has.
fn destinations(d: &DesiredState) -> Vec<(SocketAddr, Protocol)> {
    let mut out: BTreeSet<(SocketAddr, Protocol)> = BTreeSet::new();
    for sp in d.families[&IpFamily::V4].ports.values() {
        out.insert((SocketAddr::new(sp.cluster_ip, sp.port), sp.protocol));
        out.insert((SocketAddr::new(sp.cluster_ip, 99), Protocol::Tcp));
    }
    out.into_iter().collect()
}

/// The socket hooks' fate of each destination agrees with the model's intent for a pod and
/// for the node.
fn agrees(d: &DesiredState, maps: &Maps) -> Result<(), String> {
    let fam = &d.families[&IpFamily::V4];
    let host = HostView {
        node_port_ips: Some(vec![ip(NODE_IP)]),
        local_ips: vec![ip(NODE_IP), ip("127.0.0.1")],
        reject_unknown_cluster_ports: true,
    };
    for (dst, protocol) in destinations(d) {
        let fate = connect(maps, dst, protocol);
        for (src, iif, from_host) in [(POD, Some("veth1"), false), (NODE_IP, None, true)] {
            let pkt = Packet {
                src: ip(src),
                iif: iif.map(str::to_owned),
                from_host,
                dst: dst.ip(),
                protocol,
                port: dst.port(),
            };
            let want = intent(fam, &host, &pkt);
            let ok = match (&fate, &want) {
                (Fate::Endpoints(set), Intent::Dnat(targets)) => {
                    *set == targets.iter().map(|t| t.addr).collect::<BTreeSet<_>>()
                }
                (Fate::Refused, Intent::Reject) => true,
                // Left to the rules: what they do is the rules' tracers' business, but the
                // hooks must not leave a connection the intent balances.
                (Fate::Untouched, Intent::Dnat(_)) => protocol == Protocol::Sctp,
                (Fate::Untouched, _) => true,
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "{src} -> {dst}/{protocol}: hooks {fate:?}, intent {want}"
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// A full sync, then random changes each written by a partial sync (only the plan's
    /// ports): after each, the hooks agree with the intent, and the maps equal those a full
    /// sync of the same state writes.
    #[test]
    fn the_hooks_send_connections_where_the_model_intends(
        services in prop::collection::vec((0u8..5, 0u8..16, prop::collection::vec((0u8..6, 0u8..3), 0..5)), 1..5),
        changes in prop::collection::vec((0u8..5, 0u8..16, prop::collection::vec((0u8..6, 0u8..3), 0..5), any::<bool>()), 0..6),
        masquerade_all in any::<bool>(),
    ) {
        let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
        let ctx = NodeContext::new(NODE, None);
        let pol = ProxyPolicy::new(masquerade_all, &mode, None);
        let mut t = Trackers::new();
        for (id, v, e) in &services {
            t.record(Input::Services(Update::Apply(svc(*id, *v).build())));
            t.record(Input::Slices(Update::Apply(eps(*id, e).build())));
        }
        let _ = t.checkout();
        let mut d = desired(t.state(), &ctx, &pol);
        let fam = &d.families[&IpFamily::V4];
        let mut programmed = Programmed::default();
        let target = plan::target(fam);
        let mut owners = target.owners.clone();
        let ops = plan::diff(&mut programmed, &plan::full_changes(&Programmed::default(), &target, IpFamily::V4), true);
        let mut maps = Maps::default();
        let dsts = destinations(&d);
        apply(&mut maps, &ops, &dsts).map_err(TestCaseError::fail)?;
        agrees(&d, &maps).map_err(TestCaseError::fail)?;

        for (id, v, e, delete) in &changes {
            if *delete {
                t.record(Input::Services(Update::Delete(kpr_model::ObjectKey::new("ns", format!("s{id}")))));
            } else {
                t.record(Input::Services(Update::Apply(svc(*id, *v).build())));
                t.record(Input::Slices(Update::Apply(eps(*id, e).build())));
            }
            let sync: SyncPlan = t.checkout();
            update_desired(&mut d, t.state(), &ctx, &pol, &sync);
            let fam = &d.families[&IpFamily::V4];
            let changed: Vec<_> = sync.changed_ports.iter().cloned().collect();
            let ops = plan::diff(&mut programmed, &plan::changes(fam, &mut owners, &changed), false);
            let mut dsts = destinations(&d);
            dsts.extend(every_service_port());
            apply(&mut maps, &ops, &dsts).map_err(TestCaseError::fail)?;
            agrees(&d, &maps).map_err(TestCaseError::fail)?;

            // The same state written whole.
            let mut fresh = Programmed::default();
            let whole = plan::diff(&mut fresh, &plan::full_changes(&Programmed::default(), &plan::target(fam), IpFamily::V4), true);
            let mut full_maps = Maps::default();
            apply(&mut full_maps, &whole, &[]).map_err(TestCaseError::fail)?;
            let fates = |m: &Maps| -> BTreeMap<String, Fate> {
                dsts.iter().map(|(a, p)| (format!("{a}/{p}"), connect(m, *a, *p))).collect()
            };
            prop_assert_eq!(fates(&maps), fates(&full_maps));
        }
    }
}

/// The TCP and UDP ports of every Service the test may make, present or not (a deleted
/// Service's must go from the maps).
fn every_service_port() -> Vec<(SocketAddr, Protocol)> {
    (1..=5u8)
        .flat_map(|i| {
            let vip = ip(&format!("172.30.0.{i}"));
            [
                (SocketAddr::new(vip, 80), Protocol::Tcp),
                (SocketAddr::new(vip, 53), Protocol::Udp),
            ]
        })
        .collect()
}
