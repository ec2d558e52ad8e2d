//! Tests of the plan: entries from the desired state, the byte layout, and the safe order
//! checked op by op against an in-memory copy of the maps.

use super::*;
use kpr_model::desired::{Endpoint, PortMap, ServicePortDesired};
use kpr_model::names::ServiceName;
use kpr_model::node::LocalDetector;
use std::sync::Arc;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn name(svc: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName::new(ServiceName::new("ns", svc), port, protocol)
}

fn ep(addr: &str, local: bool) -> Endpoint {
    Endpoint {
        addr: sa(addr),
        local,
        ready: true,
    }
}

fn port(
    svc: &str,
    vip: &str,
    port: u16,
    protocol: Protocol,
    eps: &[Endpoint],
) -> ServicePortDesired {
    let all: Arc<[Endpoint]> = eps.iter().copied().collect();
    ServicePortDesired {
        name: name(svc, "p", protocol),
        cluster_ip: vip.parse().expect("ip"),
        port,
        protocol,
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        firewall_allow: Vec::new(),
        affinity_timeout: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        endpoints: all.clone(),
        cluster_endpoints: all,
        local_endpoints: eps.iter().filter(|e| e.local).copied().collect(),
        has_any_endpoints: !eps.is_empty(),
        internal: if eps.is_empty() {
            InternalAction::Reject
        } else {
            InternalAction::Cluster
        },
        external: None,
    }
}

fn family(family: IpFamily, ports: Vec<ServicePortDesired>) -> FamilyDesired {
    let mut map = PortMap::new();
    for p in ports {
        map.insert(p.name.clone(), Arc::new(p));
    }
    FamilyDesired {
        family,
        detector: LocalDetector::None,
        masquerade_all: false,
        node_ip: None,
        ports: map,
        service_cidrs: Vec::new(),
    }
}

fn fe(vip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        vip: vip.parse().expect("ip"),
        port,
        protocol,
    }
}

// ---- Encoding ----

#[test]
fn svc_key_layout_matches_the_c_struct() {
    let k = svc_key(&fe("172.30.0.10", 80, Protocol::Tcp));
    let mut want = [0u8; 20];
    want[..8].copy_from_slice(&[4, 6, 0, 80, 172, 30, 0, 10]);
    assert_eq!(k, want);
    assert_eq!(
        decode_svc_key(&k),
        Some(fe("172.30.0.10", 80, Protocol::Tcp))
    );

    let k6 = svc_key(&fe("fd00::1:53", 5353, Protocol::Udp));
    assert_eq!(&k6[..4], &[6, 17, 0x14, 0xe9]);
    assert_eq!(
        &k6[4..],
        &"fd00::1:53".parse::<Ipv6Addr>().expect("ip").octets()
    );
    assert_eq!(
        decode_svc_key(&k6),
        Some(fe("fd00::1:53", 5353, Protocol::Udp))
    );

    let mut bad = k;
    bad[1] = 132; // SCTP is never written
    assert_eq!(decode_svc_key(&bad), None);
}

#[test]
fn values_are_host_order_numbers_and_network_order_addresses() {
    let v = SvcVal {
        id: 7,
        count: 3,
        affinity: 10800,
        flags: SVC_F_REFUSE,
    };
    let b = svc_val(&v);
    assert_eq!(&b[..4], &7u32.to_ne_bytes());
    assert_eq!(&b[4..8], &3u32.to_ne_bytes());
    assert_eq!(&b[8..12], &10800u32.to_ne_bytes());
    assert_eq!(&b[12..], &1u32.to_ne_bytes());
    assert_eq!(decode_svc_val(&b), v);

    assert_eq!(be_key(7, 2)[..4], 7u32.to_ne_bytes());
    assert_eq!(be_key(7, 2)[4..], 2u32.to_ne_bytes());
    assert_eq!(decode_be_key(&be_key(7, 2)), (7, 2));

    let ap = addr_port(sa("10.0.0.2:8080"));
    assert_eq!(&ap[..4], &[10, 0, 0, 2]);
    assert!(ap[4..16].iter().all(|b| *b == 0));
    assert_eq!(&ap[16..], &[0x1f, 0x90, 0, 0]);
    assert_eq!(decode_addr_port(&ap, IpFamily::V4), sa("10.0.0.2:8080"));
    let ap6 = addr_port(sa("[fd00::2]:80"));
    assert_eq!(decode_addr_port(&ap6, IpFamily::V6), sa("[fd00::2]:80"));

    let m = member_key(9, sa("10.0.0.2:8080"));
    assert_eq!(&m[..4], &9u32.to_ne_bytes());
    assert_eq!(&m[4..8], &[0x1f, 0x90, 0, 0]);
    assert_eq!(&m[8..12], &[10, 0, 0, 2]);
    assert_eq!(member_val(4), 4u32.to_ne_bytes());
}

// ---- Entries ----

#[test]
fn entries_follow_the_internal_action() {
    let eps = [ep("10.0.0.2:80", true), ep("10.0.0.3:80", false)];
    let cluster = port("a", "172.30.0.10", 80, Protocol::Tcp, &eps);
    let (f, e) = entry(&cluster).expect("an entry");
    assert_eq!(f, fe("172.30.0.10", 80, Protocol::Tcp));
    assert_eq!(e.backends, vec![sa("10.0.0.2:80"), sa("10.0.0.3:80")]);
    assert_eq!(e.affinity, 0);

    let mut local = cluster.clone();
    local.internal = InternalAction::Local;
    local.affinity_timeout = Some(60);
    let (_, e) = entry(&local).expect("an entry");
    assert_eq!(e.backends, vec![sa("10.0.0.2:80")]);
    assert_eq!(e.affinity, 60);

    let none = port("b", "172.30.0.11", 80, Protocol::Udp, &[]);
    let (_, e) = entry(&none).expect("a refuse entry");
    assert!(e.refuses());

    let mut drop = cluster.clone();
    drop.internal = InternalAction::Drop;
    assert_eq!(entry(&drop), None, "left to nftables, which drops");

    let sctp = port("c", "172.30.0.12", 80, Protocol::Sctp, &eps);
    assert_eq!(entry(&sctp), None);
}

#[test]
fn the_target_names_the_owner_of_every_frontend() {
    let fam = family(
        IpFamily::V4,
        vec![
            port(
                "a",
                "172.30.0.10",
                80,
                Protocol::Tcp,
                &[ep("10.0.0.2:80", false)],
            ),
            port("b", "172.30.0.11", 53, Protocol::Udp, &[]),
        ],
    );
    let t = target(&fam);
    assert_eq!(t.entries.len(), 2);
    assert_eq!(
        t.owners.get(&name("a", "p", Protocol::Tcp)),
        Some(&fe("172.30.0.10", 80, Protocol::Tcp))
    );
}

// ---- The safe order, against an in-memory copy of the maps ----

/// The maps in memory (`crate::trace::Maps`), checked after every operation.
#[derive(Default)]
struct Fake(crate::trace::Maps);

impl Fake {
    /// Applies the ops one by one; after each, every Service's list is whole.
    fn apply_checked(&mut self, ops: &[Op]) {
        for op in ops {
            self.0.apply(op);
            if let Some((id, slot)) = self.0.half_written() {
                panic!("after {op:?}: service id {id} misses slot {slot}");
            }
        }
    }

    fn read(&self) -> Programmed {
        self.0.read()
    }
}

fn full(prev: &mut Programmed, fam: &FamilyDesired) -> Vec<Op> {
    let t = target(fam);
    let changes = full_changes(prev, &t, fam.family);
    diff(prev, &changes, true)
}

fn phase(op: &Op) -> u8 {
    match op {
        Op::PutBackend { .. } => 0,
        Op::PutService { .. } | Op::DeleteService { .. } => 1,
        Op::DeleteBackend { .. } | Op::DeleteMember { .. } => 2,
    }
}

#[test]
fn a_first_sync_writes_backends_then_services() {
    let fam = family(
        IpFamily::V4,
        vec![
            port(
                "a",
                "172.30.0.10",
                80,
                Protocol::Tcp,
                &[ep("10.0.0.2:80", false), ep("10.0.0.3:80", false)],
            ),
            port(
                "b",
                "172.30.0.11",
                53,
                Protocol::Udp,
                &[ep("10.0.0.4:53", false)],
            ),
            port("c", "172.30.0.12", 80, Protocol::Tcp, &[]),
        ],
    );
    let mut p = Programmed::default();
    let ops = full(&mut p, &fam);
    assert!(
        ops.windows(2).all(|w| phase(&w[0]) <= phase(&w[1])),
        "{ops:?}"
    );
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::PutBackend { .. }))
            .count(),
        3
    );
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::PutService { .. }))
            .count(),
        3
    );
    assert!(ops.contains(&Op::PutService {
        frontend: fe("172.30.0.12", 80, Protocol::Tcp),
        id: 0,
        count: 0,
        affinity: 0,
        flags: SVC_F_REFUSE,
    }));
    let mut fake = Fake::default();
    fake.apply_checked(&ops);
    // Read back, the maps say what was planned.
    assert_eq!(fake.read().services, p.services);
    assert!(fake.read().orphans.is_empty());
    // The same state again: nothing to do.
    assert_eq!(full(&mut p, &fam), Vec::<Op>::new());
}

#[test]
fn a_changed_list_goes_in_under_a_new_id_then_the_old_one_goes() {
    let a = |eps: &[Endpoint]| port("a", "172.30.0.10", 80, Protocol::Tcp, eps);
    let mut p = Programmed::default();
    let mut fake = Fake::default();
    fake.apply_checked(&full(
        &mut p,
        &family(
            IpFamily::V4,
            vec![a(&[ep("10.0.0.2:80", false), ep("10.0.0.3:80", false)])],
        ),
    ));
    let old_id = p.services[&fe("172.30.0.10", 80, Protocol::Tcp)].id;

    let ops = full(
        &mut p,
        &family(IpFamily::V4, vec![a(&[ep("10.0.0.3:80", false)])]),
    );
    let new_id = p.services[&fe("172.30.0.10", 80, Protocol::Tcp)].id;
    assert_ne!(old_id, new_id);
    assert_eq!(
        ops,
        vec![
            Op::PutBackend {
                id: new_id,
                slot: 0,
                addr: sa("10.0.0.3:80")
            },
            Op::PutService {
                frontend: fe("172.30.0.10", 80, Protocol::Tcp),
                id: new_id,
                count: 1,
                affinity: 0,
                flags: 0
            },
            Op::DeleteBackend {
                id: old_id,
                slot: 0,
                addr: sa("10.0.0.2:80")
            },
            Op::DeleteBackend {
                id: old_id,
                slot: 1,
                addr: sa("10.0.0.3:80")
            },
        ]
    );
    fake.apply_checked(&ops);
    assert_eq!(fake.0.backends.len(), 1);
    assert_eq!(fake.0.members.len(), 1);
    assert_eq!(p.ids().iter().copied().collect::<Vec<_>>(), vec![new_id]);
}

#[test]
fn an_affinity_change_alone_switches_in_place() {
    let mut sp = port(
        "a",
        "172.30.0.10",
        80,
        Protocol::Tcp,
        &[ep("10.0.0.2:80", false)],
    );
    let mut p = Programmed::default();
    full(&mut p, &family(IpFamily::V4, vec![sp.clone()]));
    let id = p.services[&fe("172.30.0.10", 80, Protocol::Tcp)].id;
    sp.affinity_timeout = Some(10800);
    let ops = full(&mut p, &family(IpFamily::V4, vec![sp]));
    assert_eq!(
        ops,
        vec![Op::PutService {
            frontend: fe("172.30.0.10", 80, Protocol::Tcp),
            id,
            count: 1,
            affinity: 10800,
            flags: 0
        }]
    );
}

#[test]
fn a_deleted_service_goes_before_its_backends_and_other_families_stay() {
    let v4 = port(
        "a",
        "172.30.0.10",
        80,
        Protocol::Tcp,
        &[ep("10.0.0.2:80", false)],
    );
    let v6 = port(
        "a",
        "fd00::10",
        80,
        Protocol::Tcp,
        &[ep("[fd00::2]:80", false)],
    );
    let mut p = Programmed::default();
    let mut fake = Fake::default();
    fake.apply_checked(&full(&mut p, &family(IpFamily::V4, vec![v4])));
    fake.apply_checked(&full(&mut p, &family(IpFamily::V6, vec![v6])));
    let ops = full(&mut p, &family(IpFamily::V4, vec![]));
    assert!(matches!(ops[0], Op::DeleteService { .. }));
    assert!(matches!(ops[1], Op::DeleteBackend { .. }));
    assert_eq!(ops.len(), 2);
    fake.apply_checked(&ops);
    assert_eq!(fake.0.services.len(), 1, "the IPv6 Service stays");
    assert_eq!(fake.read().services, p.services);
}

#[test]
fn a_partial_sync_follows_a_port_to_its_new_cluster_ip() {
    let a = port(
        "a",
        "172.30.0.10",
        80,
        Protocol::Tcp,
        &[ep("10.0.0.2:80", false)],
    );
    let b = port(
        "b",
        "172.30.0.11",
        80,
        Protocol::Tcp,
        &[ep("10.0.0.3:80", false)],
    );
    let fam = family(IpFamily::V4, vec![a.clone(), b.clone()]);
    let mut p = Programmed::default();
    let mut fake = Fake::default();
    let t = target(&fam);
    let mut owners = t.owners.clone();
    let ch = full_changes(&p, &t, IpFamily::V4);
    fake.apply_checked(&diff(&mut p, &ch, true));

    let mut moved = a.clone();
    moved.cluster_ip = "172.30.0.20".parse().expect("ip");
    let fam = family(IpFamily::V4, vec![moved, b]);
    let ch = changes(&fam, &mut owners, &[name("a", "p", Protocol::Tcp)]);
    assert_eq!(ch.len(), 2);
    assert_eq!(ch[&fe("172.30.0.10", 80, Protocol::Tcp)], None);
    let ops = diff(&mut p, &ch, false);
    fake.apply_checked(&ops);
    assert_eq!(fake.read().services, p.services);
    assert!(
        p.services
            .contains_key(&fe("172.30.0.20", 80, Protocol::Tcp))
    );
    assert!(
        !p.services
            .contains_key(&fe("172.30.0.10", 80, Protocol::Tcp))
    );
    assert!(
        p.services
            .contains_key(&fe("172.30.0.11", 80, Protocol::Tcp))
    );

    // A port the Service lost goes even when only its other ports are named.
    let two = port(
        "c",
        "172.30.0.30",
        80,
        Protocol::Tcp,
        &[ep("10.0.0.5:80", false)],
    );
    let mut two_b = port(
        "c",
        "172.30.0.30",
        443,
        Protocol::Tcp,
        &[ep("10.0.0.5:443", false)],
    );
    two_b.name = name("c", "q", Protocol::Tcp);
    let fam = family(IpFamily::V4, vec![two.clone(), two_b.clone()]);
    let ch = changes(&fam, &mut owners, &[two.name.clone(), two_b.name.clone()]);
    fake.apply_checked(&diff(&mut p, &ch, false));
    let fam = family(IpFamily::V4, vec![two.clone()]);
    let ch = changes(&fam, &mut owners, std::slice::from_ref(&two.name));
    assert_eq!(ch.get(&fe("172.30.0.30", 443, Protocol::Tcp)), Some(&None));
    fake.apply_checked(&diff(&mut p, &ch, false));
    assert!(
        !p.services
            .contains_key(&fe("172.30.0.30", 443, Protocol::Tcp))
    );

    // The port gone from the desired state: deleted.
    let fam = family(
        IpFamily::V4,
        vec![port(
            "b",
            "172.30.0.11",
            80,
            Protocol::Tcp,
            &[ep("10.0.0.3:80", false)],
        )],
    );
    let ch = changes(&fam, &mut owners, &[name("a", "p", Protocol::Tcp)]);
    fake.apply_checked(&diff(&mut p, &ch, false));
    assert!(
        !p.services
            .contains_key(&fe("172.30.0.20", 80, Protocol::Tcp))
    );
    assert!(!owners.contains_key(&name("a", "p", Protocol::Tcp)));
    assert_eq!(fake.read().services, p.services);
}

#[test]
fn refusing_and_balancing_switch_both_ways() {
    let mut p = Programmed::default();
    let mut fake = Fake::default();
    fake.apply_checked(&full(
        &mut p,
        &family(
            IpFamily::V4,
            vec![port("a", "172.30.0.10", 80, Protocol::Tcp, &[])],
        ),
    ));
    assert_eq!(fake.0.backends.len(), 0);
    fake.apply_checked(&full(
        &mut p,
        &family(
            IpFamily::V4,
            vec![port(
                "a",
                "172.30.0.10",
                80,
                Protocol::Tcp,
                &[ep("10.0.0.2:80", false)],
            )],
        ),
    ));
    assert_eq!(fake.0.backends.len(), 1);
    let ops = full(
        &mut p,
        &family(
            IpFamily::V4,
            vec![port("a", "172.30.0.10", 80, Protocol::Tcp, &[])],
        ),
    );
    fake.apply_checked(&ops);
    assert_eq!(fake.0.backends.len(), 0);
    assert_eq!(
        decode_svc_val(fake.0.services.values().next().expect("one")).flags,
        SVC_F_REFUSE
    );
}

#[test]
fn maps_read_back_after_a_crash_name_their_orphans() {
    let mut p = Programmed::default();
    let mut fake = Fake::default();
    fake.apply_checked(&full(
        &mut p,
        &family(
            IpFamily::V4,
            vec![port(
                "a",
                "172.30.0.10",
                80,
                Protocol::Tcp,
                &[ep("10.0.0.2:80", false)],
            )],
        ),
    ));
    // A process died after writing a new list and before switching to it.
    let ops = full(
        &mut p,
        &family(
            IpFamily::V4,
            vec![port(
                "a",
                "172.30.0.10",
                80,
                Protocol::Tcp,
                &[ep("10.0.0.3:80", false), ep("[fd00::3]:80", false)],
            )],
        ),
    );
    let puts: Vec<Op> = ops.iter().copied().filter(|o| phase(o) == 0).collect();
    fake.apply_checked(&puts);
    let mut read = fake.read();
    assert_eq!(
        read.orphans.len(),
        4,
        "two backends and their members: {:?}",
        read.orphans
    );
    // The restarted process's full sync deletes them, and the ids do not collide.
    let ops = full(
        &mut read,
        &family(
            IpFamily::V4,
            vec![port(
                "a",
                "172.30.0.10",
                80,
                Protocol::Tcp,
                &[ep("10.0.0.4:80", false)],
            )],
        ),
    );
    fake.apply_checked(&ops);
    assert_eq!(fake.0.backends.len(), 1);
    assert_eq!(fake.0.members.len(), 1);
    assert_eq!(fake.read().services, read.services);
}

#[test]
fn ids_are_never_reused_while_in_use() {
    let mut p = Programmed {
        last_id: u32::MAX - 1,
        ..Programmed::default()
    };
    p.ids.insert(1);
    assert_eq!(p.alloc(), u32::MAX);
    assert_eq!(p.alloc(), 2, "0 is never an id and 1 is taken");
}
