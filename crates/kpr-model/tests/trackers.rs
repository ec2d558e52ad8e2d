//! Properties of the change trackers and the incremental desired state (GUIDE "Property tests
//! where upstream has none"): event order does not matter to the final state, partial updates
//! equal a fresh full build, and changes that end where they started leave nothing to sync.

#![allow(clippy::unwrap_used)]
mod common;

use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{DesiredState, Input, ObjectKey, Trackers, Update, desired, update_desired};
use kpr_model::{EndpointSlice, Service};
use kpr_testkit::*;
use proptest::prelude::*;

/// One object version, drawn from a small universe so events collide often.
#[derive(Debug, Clone)]
enum Ev {
    Svc {
        id: u8,
        variant: u8,
    },
    DelSvc(u8),
    Slice {
        svc: u8,
        idx: u8,
        eps: Vec<(u8, u8)>,
    },
    DelSlice {
        svc: u8,
        idx: u8,
    },
    ReplaceSvcs(Vec<(u8, u8)>),
    Node {
        zone: u8,
    },
    Checkout,
}

fn svc_obj(id: u8, variant: u8) -> Service {
    let mut b = service("ns", &format!("svc{id}")).cluster_ip(&format!("172.30.0.{}", id + 1));
    if variant & 1 == 1 {
        b = b.cluster_ip(&format!("fd00:30::{}", id + 1));
    }
    b = b.port("http", 80, "TCP");
    if variant & 2 == 2 {
        b = b.node_port("dns", 53, "UDP", 30053 + i32::from(id));
    }
    if variant & 4 == 4 {
        b = b
            .lb(LB_IP, None)
            .etp_local()
            .health_check_node_port(31000 + i32::from(id));
    }
    if variant & 8 == 8 {
        b = b.itp_local();
    }
    if variant & 16 == 16 {
        b = b.affinity(Some(30));
    }
    b.build()
}

/// Endpoints: (ip index, state) where state picks ready/terminating/not-ready and node.
fn slice_obj(svc: u8, idx: u8, eps: &[(u8, u8)]) -> EndpointSlice {
    let mut b = slice("ns", &format!("svc{svc}"), &format!("s{idx}"))
        .port("http", 8080, "TCP")
        .port("dns", 5353, "UDP");
    for (ip, state) in eps {
        let addr = format!("10.0.{}.{}", ip % 2, ip + 1);
        let node = if ip % 2 == 0 { NODE } else { OTHER_NODE };
        b = match state % 4 {
            0 | 1 => b.ready(&addr, node),
            2 => b.terminating(&addr, node),
            _ => b.endpoint(&addr, node, Some(false), Some(false), Some(false)),
        };
        if state % 8 >= 4 {
            b = b.zone_hints(&[if ip % 2 == 0 { "a" } else { "b" }]);
        }
    }
    b.build()
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (0u8..4, 0u8..32).prop_map(|(id, variant)| Ev::Svc { id, variant }),
        1 => (0u8..4).prop_map(Ev::DelSvc),
        5 => (0u8..4, 0u8..2, prop::collection::vec((0u8..6, 0u8..8), 0..4))
            .prop_map(|(svc, idx, eps)| Ev::Slice { svc, idx, eps }),
        1 => (0u8..4, 0u8..2).prop_map(|(svc, idx)| Ev::DelSlice { svc, idx }),
        1 => prop::collection::vec((0u8..4, 0u8..32), 0..4).prop_map(Ev::ReplaceSvcs),
        1 => (0u8..3).prop_map(|zone| Ev::Node { zone }),
        2 => Just(Ev::Checkout),
    ]
}

fn input(ev: &Ev) -> Option<Input> {
    Some(match ev {
        Ev::Svc { id, variant } => Input::Services(Update::Apply(svc_obj(*id, *variant))),
        Ev::DelSvc(id) => Input::Services(Update::Delete(ObjectKey::new("ns", format!("svc{id}")))),
        Ev::Slice { svc, idx, eps } => Input::Slices(Update::Apply(slice_obj(*svc, *idx, eps))),
        Ev::DelSlice { svc, idx } => Input::Slices(Update::Delete(ObjectKey::new(
            "ns",
            format!("svc{svc}-s{idx}"),
        ))),
        Ev::ReplaceSvcs(list) => Input::Services(Update::Replace(
            list.iter().map(|(i, v)| svc_obj(*i, *v)).collect(),
        )),
        Ev::Node { zone } => Input::Node(Some(Box::new(
            node(NODE).zone(["a", "b", "c"][*zone as usize]).into(),
        ))),
        Ev::Checkout => return None,
    })
}

fn policy(t: &Trackers) -> (NodeContext, ProxyPolicy) {
    let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
    (
        NodeContext::new(NODE, t.state().node()),
        ProxyPolicy::new(false, &mode, t.state().node()),
    )
}

fn full(t: &Trackers) -> DesiredState {
    let (ctx, pol) = policy(t);
    desired(t.state(), &ctx, &pol)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any sequence of partial syncs yields the same desired state as one full build.
    #[test]
    fn partial_updates_equal_a_fresh_full_build(events in prop::collection::vec(event(), 0..40)) {
        let mut t = Trackers::new();
        let mut current = DesiredState::default();
        for ev in events.iter().chain(std::iter::once(&Ev::Checkout)) {
            match input(ev) {
                Some(i) => { t.record(i); }
                None => {
                    let plan = t.checkout();
                    let (ctx, pol) = policy(&t);
                    update_desired(&mut current, t.state(), &ctx, &pol, &plan);
                    prop_assert_eq!(&current, &full(&t));
                }
            }
        }
    }

    /// The final state depends only on the final objects, not on the order of the events
    /// that led there: each object's last version, applied in any interleaving.
    #[test]
    fn event_order_does_not_matter(events in prop::collection::vec(event(), 0..30), seed in any::<u64>()) {
        let objects: Vec<Ev> = events.into_iter().filter(|e| matches!(e, Ev::Svc{..} | Ev::Slice{..} | Ev::DelSvc(_) | Ev::DelSlice{..})).collect();
        // Per object key, the history in order; interleave histories by a seeded shuffle that
        // keeps each object's own order (events on different objects commute).
        let key = |e: &Ev| match e {
            Ev::Svc { id, .. } | Ev::DelSvc(id) => (0, *id, 0),
            Ev::Slice { svc, idx, .. } | Ev::DelSlice { svc, idx } => (1, *svc, *idx),
            _ => (9, 0, 0),
        };
        let mut a = Trackers::new();
        for e in &objects { a.record(input(e).unwrap()); }
        let mut queues: std::collections::BTreeMap<_, std::collections::VecDeque<&Ev>> = Default::default();
        for e in &objects { queues.entry(key(e)).or_default().push_back(e); }
        let mut b = Trackers::new();
        let mut rng = seed;
        while !queues.is_empty() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let k = *queues.keys().nth((rng >> 33) as usize % queues.len()).unwrap();
            let q = queues.get_mut(&k).unwrap();
            b.record(input(q.pop_front().unwrap()).unwrap());
            if q.is_empty() { queues.remove(&k); }
        }
        prop_assert_eq!(a.state(), b.state());
        prop_assert_eq!(full(&a), full(&b));
    }

    /// A change followed by its reverse leaves nothing to sync.
    #[test]
    fn reverted_changes_are_dropped(variant in 0u8..32, other in 0u8..32, eps in prop::collection::vec((0u8..6, 0u8..8), 0..4), eps2 in prop::collection::vec((0u8..6, 0u8..8), 0..4)) {
        let mut t = Trackers::new();
        t.record(Input::Services(Update::Apply(svc_obj(0, variant))));
        t.record(Input::Slices(Update::Apply(slice_obj(0, 0, &eps))));
        let _ = t.checkout();
        t.record(Input::Services(Update::Apply(svc_obj(0, other))));
        t.record(Input::Slices(Update::Apply(slice_obj(0, 0, &eps2))));
        t.record(Input::Slices(Update::Apply(slice_obj(0, 0, &eps))));
        t.record(Input::Services(Update::Apply(svc_obj(0, variant))));
        prop_assert_eq!(t.pending_counts(), (0, 0));
        prop_assert!(t.checkout().is_empty());
    }
}

#[test]
fn replace_deletes_what_is_absent_and_names_changed_ports() {
    let mut t = Trackers::new();
    t.record(Input::Services(Update::Replace(vec![
        svc_obj(0, 0),
        svc_obj(1, 2),
    ])));
    t.record(Input::Slices(Update::Replace(vec![
        slice_obj(0, 0, &[(0, 0)]),
        slice_obj(1, 0, &[(1, 0)]),
    ])));
    let first = t.checkout();
    assert!(first.full);
    assert_eq!(t.state().service_count(), 2);
    // A relist without svc1 and its slice: both vanish; svc0 is untouched.
    t.record(Input::Services(Update::Replace(vec![svc_obj(0, 0)])));
    t.record(Input::Slices(Update::Replace(vec![slice_obj(
        0,
        0,
        &[(0, 0)],
    )])));
    assert_eq!(t.state().service_count(), 1);
    assert_eq!(t.state().slice_count(), 1);
    let plan = t.checkout();
    assert!(!plan.full);
    let names: Vec<String> = plan.changed_ports.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["ns/svc1:dns", "ns/svc1:http"]);
    // The same relist again changes nothing.
    t.record(Input::Services(Update::Replace(vec![svc_obj(0, 0)])));
    assert!(t.checkout().is_empty());
}

#[test]
fn plan_carries_trigger_times_of_changed_slices() {
    let mut t = Trackers::new();
    let mut s = slice_obj(0, 0, &[(0, 0)]);
    s.metadata.annotations = Some(
        [(
            "endpoints.kubernetes.io/last-change-trigger-time".to_owned(),
            "2026-11-24T10:00:00Z".to_owned(),
        )]
        .into(),
    );
    t.record(Input::Services(Update::Apply(svc_obj(0, 0))));
    let _ = t.checkout();
    t.record(Input::Slices(Update::Apply(s)));
    let plan = t.checkout();
    assert_eq!(plan.trigger_times, ["2026-11-24T10:00:00Z"]);
    assert_eq!(t.change_totals(), (1, 1));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A list streamed as one `Apply` per object and then a `Keep` of their keys (how the API
    /// source delivers a relist) leaves the same state as one `Replace` of the list.
    #[test]
    fn a_list_streamed_then_kept_equals_a_replace(
        before in prop::collection::vec(event(), 0..20),
        list in prop::collection::vec((0u8..4, 0u8..32), 0..4),
        slices in prop::collection::vec((0u8..4, 0u8..2, prop::collection::vec((0u8..6, 0u8..8), 0..3)), 0..4),
    ) {
        let (mut a, mut b) = (Trackers::new(), Trackers::new());
        for ev in &before {
            if let Some(i) = input(ev) {
                a.record(i.clone());
                b.record(i);
            }
        }
        a.record(Input::Services(Update::Replace(
            list.iter().map(|(i, v)| svc_obj(*i, *v)).collect(),
        )));
        for (i, v) in &list {
            b.record(Input::Services(Update::Apply(svc_obj(*i, *v))));
        }
        b.record(Input::Services(Update::Keep(
            list.iter().map(|(i, _)| ObjectKey::new("ns", format!("svc{i}"))).collect(),
        )));
        a.record(Input::Slices(Update::Replace(
            slices.iter().map(|(s, i, e)| slice_obj(*s, *i, e)).collect(),
        )));
        for (s, i, e) in &slices {
            b.record(Input::Slices(Update::Apply(slice_obj(*s, *i, e))));
        }
        b.record(Input::Slices(Update::Keep(
            slices
                .iter()
                .map(|(s, i, _)| ObjectKey::new("ns", format!("svc{s}-s{i}")))
                .collect(),
        )));
        prop_assert_eq!(full(&a), full(&b));
    }
}

/// Issue 16: endpoints of different slices on one node share one copy of its place (node and
/// zone), and a parsed endpoint stays compact (a cluster holds one per endpoint).
#[test]
fn node_names_are_shared_between_slices() {
    let mut t = Trackers::new();
    for svc in ["a", "b"] {
        let s = slice("ns", svc, "x")
            .port("p", 80, "TCP")
            .ready("10.0.0.1", "node-1")
            .ready("10.0.0.2", "node-1")
            .build();
        t.record(Input::Slices(Update::Apply(s)));
    }
    let services = ["a", "b"].map(|svc| kpr_model::ServiceName::new("ns", svc));
    let names: Vec<_> = services
        .iter()
        .flat_map(|svc| t.state().slices(svc))
        .flat_map(|s| s.endpoints.iter())
        .map(|e| e.place.clone().unwrap())
        .collect();
    assert_eq!(names.len(), 4);
    assert!(names.iter().all(|p| p.node.as_deref() == Some("node-1")));
    assert!(
        names
            .windows(2)
            .all(|w| std::sync::Arc::ptr_eq(&w[0], &w[1]))
    );
    assert!(std::mem::size_of::<kpr_model::parse::SliceEndpoint>() <= 40);
}
