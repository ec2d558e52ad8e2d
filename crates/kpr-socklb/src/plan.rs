//! What the socket-lb maps must hold (pure): the entries a family's desired state asks for, the
//! byte layout of every map key and value (the C structs of `bpf/socklb.c`), and the map
//! operations that take the maps from what they hold to what they must hold, in an order that
//! never shows a `connect()` a half-written backend list.
//!
//! Invariant: nothing here performs IO; the same input always gives the same operations.
//!
//! # Map layout
//!
//! Addresses and ports are in network byte order (as the kernel hands them to the programs);
//! ids, counts, slots, seconds and flags in host byte order. An IPv4 address fills the first 4 of
//! its 16 bytes, the other 12 are zero.
//!
//! | map | key | value |
//! |---|---|---|
//! | `services` (hash) | `svc_key` 20 B: family u8 (4/6), proto u8 (6/17), port be16, addr 16 B | `svc_val` 16 B: id u32, count u32, affinity seconds u32, flags u32 (1 = refuse) |
//! | `backends` (hash) | `be_key` 8 B: id u32, slot u32 | `addr_port` 20 B: addr 16 B, port be16, pad u16 |
//! | `members` (hash) | `member_key` 24 B: id u32, port be16, pad u16, addr 16 B | slot u32 |
//! | `revnat` (LRU, written by the programs) | 32 B: socket cookie u64, `addr_port` of the endpoint, pad u32 | `addr_port` of the ClusterIP |
//! | `affinity` (LRU, written by the programs) | 32 B: owner u64 (netns cookie for ClientIP affinity, socket cookie for an unconnected UDP socket), `svc_key`, kind u32 (0 ClientIP, 1 socket) | 32 B: last use ns u64, `addr_port`, pad u32 |
//!
//! # Safe order
//!
//! A Service whose endpoints change gets its backends (and members) written under a new id
//! first; then its `services` entry is switched to the new id in one update; then the old id's
//! backends are deleted. [`diff`] emits every backend write of a sync before every switch, and
//! every switch before every deletion, so a failure part-way leaves each Service on a complete
//! list, old or new.

use kpr_model::desired::{FamilyDesired, InternalAction, ServicePortDesired};
use kpr_model::names::{IpFamily, Protocol, ServiceName, ServicePortName};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `svc_key.family` of an IPv4 frontend.
pub const FAMILY_V4: u8 = 4;
/// `svc_key.family` of an IPv6 frontend.
pub const FAMILY_V6: u8 = 6;
/// `svc_key.proto` of TCP.
pub const PROTO_TCP: u8 = 6;
/// `svc_key.proto` of UDP.
pub const PROTO_UDP: u8 = 17;
/// `svc_val.flags`: no usable endpoint, `connect()` and `sendmsg()` fail with ECONNREFUSED.
pub const SVC_F_REFUSE: u32 = 1;

/// Size of a `services` key.
pub const SVC_KEY_LEN: usize = 20;
/// Size of a `services` value.
pub const SVC_VAL_LEN: usize = 16;
/// Size of a `backends` key.
pub const BE_KEY_LEN: usize = 8;
/// Size of an `addr_port` (a `backends` value).
pub const ADDR_PORT_LEN: usize = 20;
/// Size of a `members` key.
pub const MEMBER_KEY_LEN: usize = 24;
/// Size of a `members` value.
pub const MEMBER_VAL_LEN: usize = 4;

/// A Service frontend as the programs see it: a ClusterIP, port and protocol (TCP or UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What one frontend must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The endpoints, sorted; empty = refuse (`connect()` fails with ECONNREFUSED).
    pub backends: Vec<SocketAddr>,
    /// ClientIP affinity timeout in seconds; 0 = none.
    pub affinity: u32,
}

impl Entry {
    /// A Service without endpoints.
    pub fn refuses(&self) -> bool {
        self.backends.is_empty()
    }
}

/// The entry a service port needs, or `None` when the socket hooks leave it to the nftables
/// rules: SCTP, an ITP=Local port without local endpoints (nftables drops), an empty set.
pub fn entry(sp: &ServicePortDesired) -> Option<(Frontend, Entry)> {
    if !matches!(sp.protocol, Protocol::Tcp | Protocol::Udp) {
        return None;
    }
    let backends: Vec<SocketAddr> = match sp.internal {
        InternalAction::Cluster => sp.cluster_endpoints.iter().map(|e| e.addr).collect(),
        InternalAction::Local => sp.local_endpoints.iter().map(|e| e.addr).collect(),
        InternalAction::Reject => Vec::new(),
        InternalAction::Drop => return None,
    };
    if backends.is_empty() && sp.internal != InternalAction::Reject {
        return None;
    }
    let frontend = Frontend {
        vip: sp.cluster_ip,
        port: sp.port,
        protocol: sp.protocol,
    };
    let affinity = sp.affinity_timeout.unwrap_or(0);
    Some((frontend, Entry { backends, affinity }))
}

/// Which frontend each service port of a family owns, and what each frontend must do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub owners: BTreeMap<ServicePortName, Frontend>,
    pub entries: BTreeMap<Frontend, Entry>,
}

/// The whole target of one family.
pub fn target(fam: &FamilyDesired) -> Target {
    let mut t = Target::default();
    for (name, sp) in fam.ports.iter() {
        if let Some((f, e)) = entry(sp) {
            // Two ports on one frontend (not valid in the API): the first by name wins.
            if t.entries.contains_key(&f) {
                continue;
            }
            t.owners.insert(name.clone(), f);
            t.entries.insert(f, e);
        }
    }
    t
}

/// The changes a partial sync of `changed` ports makes: each frontend those ports owned before
/// (`owners`, updated in place) or own now, with its new entry or `None` to delete it. Every
/// port of a named port's Service is looked at, so a port the Service lost goes even when the
/// caller names only the ports it has now.
pub fn changes(
    fam: &FamilyDesired,
    owners: &mut BTreeMap<ServicePortName, Frontend>,
    changed: &[ServicePortName],
) -> BTreeMap<Frontend, Option<Entry>> {
    let mut names: BTreeSet<ServicePortName> = changed.iter().cloned().collect();
    let services: BTreeSet<&ServiceName> = changed.iter().map(|n| &n.service).collect();
    for svc in services {
        let first = ServicePortName::new(svc.clone(), "", Protocol::Tcp);
        names.extend(
            owners
                .range(first.clone()..)
                .take_while(|(k, _)| k.service == *svc)
                .map(|(k, _)| k.clone()),
        );
        names.extend(
            fam.ports
                .range(first..)
                .take_while(|(k, _)| k.service == *svc)
                .map(|(k, _)| k.clone()),
        );
    }
    let mut out = BTreeMap::new();
    for name in &names {
        if let Some(f) = owners.remove(name) {
            out.insert(f, None);
        }
    }
    for name in names {
        if let Some((f, e)) = fam.ports.get(&name).and_then(|sp| entry(sp)) {
            out.insert(f, Some(e));
            owners.insert(name, f);
        }
    }
    out
}

/// One frontend as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The backend list's id (0 for a refuse entry, which has none).
    pub id: u32,
    pub entry: Entry,
}

/// What the maps hold, as this process wrote them or read them back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: BTreeMap<Frontend, Written>,
    /// Backends and members no Service refers to (left by a process that stopped part-way):
    /// deleted by the next full sync.
    pub orphans: Vec<Op>,
    ids: BTreeSet<u32>,
    last_id: u32,
}

/// One map operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `backends[{id, slot}] = addr` and `members[{id, addr}] = slot`.
    PutBackend {
        id: u32,
        slot: u32,
        addr: SocketAddr,
    },
    /// `services[frontend] = {id, count, affinity, flags}`.
    PutService {
        frontend: Frontend,
        id: u32,
        count: u32,
        affinity: u32,
        flags: u32,
    },
    /// Removes `services[frontend]`.
    DeleteService { frontend: Frontend },
    /// Removes `backends[{id, slot}]` and `members[{id, addr}]`.
    DeleteBackend {
        id: u32,
        slot: u32,
        addr: SocketAddr,
    },
    /// Removes `members[{id, addr}]` alone (an orphan).
    DeleteMember { id: u32, addr: SocketAddr },
}

impl Programmed {
    /// What the maps hold, rebuilt from their decoded contents (at start, over pinned maps).
    /// A Service whose list is missing a slot keeps its id but an empty list, so the next sync
    /// rewrites it; backends and members of no Service become orphans.
    pub fn from_maps(
        services: &[([u8; SVC_KEY_LEN], [u8; SVC_VAL_LEN])],
        backends: &[([u8; BE_KEY_LEN], [u8; ADDR_PORT_LEN])],
        members: &[([u8; MEMBER_KEY_LEN], [u8; MEMBER_VAL_LEN])],
    ) -> Programmed {
        let mut p = Programmed::default();
        let mut families: BTreeMap<u32, (IpFamily, u32)> = BTreeMap::new();
        for (k, v) in services {
            let (Some(frontend), val) = (decode_svc_key(k), decode_svc_val(v)) else {
                continue;
            };
            if val.flags & SVC_F_REFUSE == 0 && val.id != 0 {
                families.insert(val.id, (IpFamily::of(&frontend.vip), val.count));
                p.ids.insert(val.id);
                p.last_id = p.last_id.max(val.id);
            }
            let id = if val.flags & SVC_F_REFUSE != 0 {
                0
            } else {
                val.id
            };
            p.services.insert(
                frontend,
                Written {
                    id,
                    entry: Entry {
                        backends: Vec::new(),
                        affinity: val.affinity,
                    },
                },
            );
        }
        // Every id in the maps stays reserved (orphans' too, until their deletes have run):
        // a new list must never be written under an id whose old entries are still to go.
        let seen = backends.iter().map(|(k, _)| decode_be_key(k).0).chain(
            members
                .iter()
                .map(|(k, _)| u32::from_ne_bytes([k[0], k[1], k[2], k[3]])),
        );
        for id in seen {
            p.ids.insert(id);
            p.last_id = p.last_id.max(id);
        }
        let mut lists: BTreeMap<u32, BTreeMap<u32, SocketAddr>> = BTreeMap::new();
        let mut sorted: Vec<_> = backends
            .iter()
            .map(|(k, v)| (decode_be_key(k), v))
            .collect();
        sorted.sort_by_key(|(k, _)| *k);
        for ((id, slot), v) in sorted {
            match families.get(&id) {
                Some((family, count)) if slot < *count => {
                    let addr = decode_addr_port(v, *family);
                    lists.entry(id).or_default().insert(slot, addr);
                }
                _ => {
                    let family = families.get(&id).map_or_else(|| guess_family(v), |f| f.0);
                    let addr = decode_addr_port(v, family);
                    p.orphans.push(Op::DeleteBackend { id, slot, addr });
                }
            }
        }
        for w in p.services.values_mut() {
            let Some((_, count)) = families.get(&w.id) else {
                continue;
            };
            let list = lists.remove(&w.id).unwrap_or_default();
            if list.len() == *count as usize {
                w.entry.backends = list.into_values().collect();
            } else {
                // Incomplete: the next sync writes a new list; these go with the orphans.
                for (slot, addr) in list {
                    p.orphans.push(Op::DeleteBackend {
                        id: w.id,
                        slot,
                        addr,
                    });
                }
            }
        }
        let mut sorted: Vec<_> = members.iter().map(|(k, _)| k).collect();
        sorted.sort();
        for k in sorted {
            let id = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
            if !families.contains_key(&id) {
                let mut ap = [0u8; ADDR_PORT_LEN];
                ap[..16].copy_from_slice(&k[8..24]);
                ap[16..18].copy_from_slice(&k[4..6]);
                let addr = decode_addr_port(&ap, guess_family(&ap));
                p.orphans.push(Op::DeleteMember { id, addr });
            }
        }
        p
    }

    /// The ids in use.
    pub fn ids(&self) -> &BTreeSet<u32> {
        &self.ids
    }

    fn alloc(&mut self) -> u32 {
        loop {
            self.last_id = self.last_id.wrapping_add(1);
            if self.last_id != 0 && !self.ids.contains(&self.last_id) {
                self.ids.insert(self.last_id);
                return self.last_id;
            }
        }
    }

    /// The frontends of one family.
    pub fn frontends(&self, family: IpFamily) -> impl Iterator<Item = &Frontend> {
        self.services
            .keys()
            .filter(move |f| IpFamily::of(&f.vip) == family)
    }
}

/// The changes of a full sync of one family: every frontend of that family the maps hold or
/// the target names, with its entry, or `None` to delete it.
pub fn full_changes(
    prev: &Programmed,
    target: &Target,
    family: IpFamily,
) -> BTreeMap<Frontend, Option<Entry>> {
    let mut out: BTreeMap<Frontend, Option<Entry>> =
        prev.frontends(family).map(|f| (*f, None)).collect();
    for (f, e) in &target.entries {
        out.insert(*f, Some(e.clone()));
    }
    out
}

/// The operations that apply `changes` to `prev`, in the safe order (all backend writes, then
/// all `services` writes and deletes, then all backend deletes), and updates `prev` to what the
/// maps hold once they are all done. With `orphans`, the orphans' deletes come last.
pub fn diff(
    prev: &mut Programmed,
    changes: &BTreeMap<Frontend, Option<Entry>>,
    orphans: bool,
) -> Vec<Op> {
    let (mut puts, mut switches, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    for (frontend, next) in changes {
        let old = prev.services.get(frontend).cloned();
        if old.as_ref().map(|w| &w.entry) == next.as_ref() {
            continue;
        }
        let Some(next) = next else {
            if let Some(old) = old {
                switches.push(Op::DeleteService {
                    frontend: *frontend,
                });
                release(&old, &mut deletes);
                prev.services.remove(frontend);
            }
            continue;
        };
        let same_list = old
            .as_ref()
            .is_some_and(|w| w.entry.backends == next.backends);
        let id = match &old {
            Some(w) if same_list => w.id,
            _ if next.refuses() => 0,
            _ => {
                let id = prev.alloc();
                for (slot, addr) in next.backends.iter().enumerate() {
                    puts.push(Op::PutBackend {
                        id,
                        slot: slot as u32,
                        addr: *addr,
                    });
                }
                id
            }
        };
        switches.push(Op::PutService {
            frontend: *frontend,
            id,
            count: next.backends.len() as u32,
            affinity: next.affinity,
            flags: if next.refuses() { SVC_F_REFUSE } else { 0 },
        });
        if let Some(old) = old
            && !same_list
        {
            release(&old, &mut deletes);
        }
        prev.services.insert(
            *frontend,
            Written {
                id,
                entry: next.clone(),
            },
        );
    }
    let mut ops = puts;
    ops.append(&mut switches);
    ops.append(&mut deletes);
    if orphans {
        ops.append(&mut prev.orphans);
    }
    // Ids whose lists are deleted by now, and no longer any Service's, are free again.
    let live: BTreeSet<u32> = prev.services.values().map(|w| w.id).collect();
    let gone: Vec<u32> = ops
        .iter()
        .filter_map(|op| match op {
            Op::DeleteBackend { id, .. } | Op::DeleteMember { id, .. } => Some(*id),
            _ => None,
        })
        .filter(|id| !live.contains(id))
        .collect();
    for id in gone {
        prev.ids.remove(&id);
    }
    ops
}

/// Queues the deletes of an old list. Its id stays reserved until the whole diff is planned,
/// so no list of the same sync is written under it before these deletes run.
fn release(old: &Written, deletes: &mut Vec<Op>) {
    if old.id == 0 {
        return;
    }
    for (slot, addr) in old.entry.backends.iter().enumerate() {
        deletes.push(Op::DeleteBackend {
            id: old.id,
            slot: slot as u32,
            addr: *addr,
        });
    }
}

/// The family of an orphan's address, whose Service is gone: IPv4 leaves the last 12 bytes
/// zero. (A wrong guess for an IPv6 address with only 4 leading non-zero bytes still encodes
/// back to the same key bytes, which is all a delete needs.)
fn guess_family(ap: &[u8; ADDR_PORT_LEN]) -> IpFamily {
    if ap[4..16].iter().any(|b| *b != 0) {
        IpFamily::V6
    } else {
        IpFamily::V4
    }
}

// ---- Encoding ----

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_of(a: &[u8], family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        IpFamily::V6 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a[..16]);
            IpAddr::V6(Ipv6Addr::from(b))
        }
    }
}

/// The `services` key of a frontend.
pub fn svc_key(f: &Frontend) -> [u8; SVC_KEY_LEN] {
    let mut k = [0u8; SVC_KEY_LEN];
    k[0] = match f.vip {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    };
    k[1] = match f.protocol {
        Protocol::Udp => PROTO_UDP,
        _ => PROTO_TCP,
    };
    k[2..4].copy_from_slice(&f.port.to_be_bytes());
    k[4..20].copy_from_slice(&addr16(f.vip));
    k
}

/// The frontend of a `services` key, if it is one this crate writes.
pub fn decode_svc_key(k: &[u8; SVC_KEY_LEN]) -> Option<Frontend> {
    let family = match k[0] {
        FAMILY_V4 => IpFamily::V4,
        FAMILY_V6 => IpFamily::V6,
        _ => return None,
    };
    let protocol = match k[1] {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(Frontend {
        vip: ip_of(&k[4..20], family),
        port: u16::from_be_bytes([k[2], k[3]]),
        protocol,
    })
}

/// A decoded `services` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvcVal {
    pub id: u32,
    pub count: u32,
    pub affinity: u32,
    pub flags: u32,
}

/// The `services` value.
pub fn svc_val(v: &SvcVal) -> [u8; SVC_VAL_LEN] {
    let mut b = [0u8; SVC_VAL_LEN];
    for (i, x) in [v.id, v.count, v.affinity, v.flags].into_iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
    }
    b
}

/// Decodes a `services` value.
pub fn decode_svc_val(b: &[u8; SVC_VAL_LEN]) -> SvcVal {
    let w = |i: usize| u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    SvcVal {
        id: w(0),
        count: w(1),
        affinity: w(2),
        flags: w(3),
    }
}

/// The `backends` key.
pub fn be_key(id: u32, slot: u32) -> [u8; BE_KEY_LEN] {
    let mut k = [0u8; BE_KEY_LEN];
    k[..4].copy_from_slice(&id.to_ne_bytes());
    k[4..].copy_from_slice(&slot.to_ne_bytes());
    k
}

/// Decodes a `backends` key into (id, slot).
pub fn decode_be_key(k: &[u8; BE_KEY_LEN]) -> (u32, u32) {
    (
        u32::from_ne_bytes([k[0], k[1], k[2], k[3]]),
        u32::from_ne_bytes([k[4], k[5], k[6], k[7]]),
    )
}

/// An `addr_port` (a `backends` value; also what `revnat` and `affinity` hold).
pub fn addr_port(a: SocketAddr) -> [u8; ADDR_PORT_LEN] {
    let mut b = [0u8; ADDR_PORT_LEN];
    b[..16].copy_from_slice(&addr16(a.ip()));
    b[16..18].copy_from_slice(&a.port().to_be_bytes());
    b
}

/// Decodes an `addr_port` of a family.
pub fn decode_addr_port(b: &[u8; ADDR_PORT_LEN], family: IpFamily) -> SocketAddr {
    SocketAddr::new(ip_of(&b[..16], family), u16::from_be_bytes([b[16], b[17]]))
}

/// The `members` key: endpoint `a` in list `id`.
pub fn member_key(id: u32, a: SocketAddr) -> [u8; MEMBER_KEY_LEN] {
    let mut k = [0u8; MEMBER_KEY_LEN];
    k[..4].copy_from_slice(&id.to_ne_bytes());
    k[4..6].copy_from_slice(&a.port().to_be_bytes());
    k[8..24].copy_from_slice(&addr16(a.ip()));
    k
}

/// The `members` value: the slot.
pub fn member_val(slot: u32) -> [u8; MEMBER_VAL_LEN] {
    slot.to_ne_bytes()
}

#[cfg(test)]
mod tests;
