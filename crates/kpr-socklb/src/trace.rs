//! Where a `connect()` or `sendmsg()` from a socket in the balanced cgroup goes, read from the
//! maps' contents byte for byte as `bpf/socklb.c` reads them: the socket hooks' packet tracer,
//! which tests check against the model's intent (`kpr_model::intent`), as the nftables and
//! iptables modes' tracers are.

use crate::plan::{
    ADDR_PORT_LEN, BE_KEY_LEN, Frontend, MEMBER_KEY_LEN, MEMBER_VAL_LEN, Op, Programmed,
    SVC_F_REFUSE, SVC_KEY_LEN, SVC_VAL_LEN, SvcVal, addr_port, be_key, decode_addr_port,
    decode_svc_val, member_key, member_val, svc_key, svc_val,
};
use kpr_model::names::{IpFamily, Protocol};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// The `services`, `backends` and `members` maps as bytes, written by the same operations the
/// loader writes to the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maps {
    pub(crate) services: BTreeMap<[u8; SVC_KEY_LEN], [u8; SVC_VAL_LEN]>,
    pub(crate) backends: BTreeMap<[u8; BE_KEY_LEN], [u8; ADDR_PORT_LEN]>,
    pub(crate) members: BTreeMap<[u8; MEMBER_KEY_LEN], [u8; MEMBER_VAL_LEN]>,
}

impl Maps {
    /// Applies one operation.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend { id, slot, addr } => {
                self.members.insert(member_key(id, addr), member_val(slot));
                self.backends.insert(be_key(id, slot), addr_port(addr));
            }
            Op::PutService {
                frontend,
                id,
                count,
                affinity,
                flags,
            } => {
                let v = SvcVal {
                    id,
                    count,
                    affinity,
                    flags,
                };
                self.services.insert(svc_key(&frontend), svc_val(&v));
            }
            Op::DeleteService { frontend } => {
                self.services.remove(&svc_key(&frontend));
            }
            Op::DeleteBackend { id, slot, addr } => {
                self.backends.remove(&be_key(id, slot));
                self.members.remove(&member_key(id, addr));
            }
            Op::DeleteMember { id, addr } => {
                self.members.remove(&member_key(id, addr));
            }
        }
    }

    /// A Service entry that names a slot its list lacks (id, slot): a half-written list.
    pub fn half_written(&self) -> Option<(u32, u32)> {
        self.services.values().map(decode_svc_val).find_map(|v| {
            if v.flags & SVC_F_REFUSE != 0 {
                return None;
            }
            (0..v.count)
                .find(|slot| !self.backends.contains_key(&be_key(v.id, *slot)))
                .map(|slot| (v.id, slot))
        })
    }

    /// What they hold, read back as the loader reads the kernel's maps.
    pub fn read(&self) -> Programmed {
        let s: Vec<_> = self.services.iter().map(|(k, v)| (*k, *v)).collect();
        let b: Vec<_> = self.backends.iter().map(|(k, v)| (*k, *v)).collect();
        let m: Vec<_> = self.members.iter().map(|(k, v)| (*k, *v)).collect();
        Programmed::from_maps(&s, &b, &m)
    }
}

/// What the hooks do with a new connection (or an unconnected datagram).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// Sent to one of these endpoints, chosen at the socket (no NAT).
    Endpoints(BTreeSet<SocketAddr>),
    /// `connect()`/`sendmsg()` fails with ECONNREFUSED.
    Refused,
    /// Left alone: the nftables rules decide.
    Untouched,
    /// The service entry names a slot that has no backend: the program leaves it to the rules
    /// too, but the maps should never be so (a half-written list).
    Broken,
}

/// Traces a socket's first send to `dst` over `protocol` through `maps`.
pub fn connect(maps: &Maps, dst: SocketAddr, protocol: Protocol) -> Fate {
    if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Fate::Untouched;
    }
    let key = svc_key(&Frontend {
        vip: dst.ip(),
        port: dst.port(),
        protocol,
    });
    let Some(val) = maps.services.get(&key).map(decode_svc_val) else {
        return Fate::Untouched;
    };
    if val.flags & SVC_F_REFUSE != 0 {
        return Fate::Refused;
    }
    let family = IpFamily::of(&dst.ip());
    let mut out = BTreeSet::new();
    for slot in 0..val.count {
        match maps.backends.get(&be_key(val.id, slot)) {
            Some(b) => {
                out.insert(decode_addr_port(b, family));
            }
            None => return Fate::Broken,
        }
    }
    if out.is_empty() {
        Fate::Broken
    } else {
        Fate::Endpoints(out)
    }
}
