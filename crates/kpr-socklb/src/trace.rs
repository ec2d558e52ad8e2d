//! Where a `connect()` or `sendmsg()` from a socket in the balanced cgroup goes, read from the
//! maps' contents byte for byte as `bpf/socklb.c` reads them: the socket hooks' packet tracer,
//! which tests check against the model's intent (`kpr_model::intent`), as the nftables and
//! iptables modes' tracers are.

use crate::plan::{
    ADDR_PORT_LEN, BE_KEY_LEN, Frontend, Op, SVC_F_REFUSE, SVC_KEY_LEN, SVC_VAL_LEN, SvcVal,
    addr_port, be_key, decode_addr_port, decode_svc_val, svc_key, svc_val,
};
use kpr_model::names::{IpFamily, Protocol};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// The `services` and `backends` maps as bytes, written by the same operations the loader
/// writes to the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maps {
    services: BTreeMap<[u8; SVC_KEY_LEN], [u8; SVC_VAL_LEN]>,
    backends: BTreeMap<[u8; BE_KEY_LEN], [u8; ADDR_PORT_LEN]>,
}

impl Maps {
    /// Applies one operation (`members` is the affinity check's, not the choice's: left out).
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend { id, slot, addr } => {
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
            Op::DeleteBackend { id, slot, .. } => {
                self.backends.remove(&be_key(id, slot));
            }
            Op::DeleteMember { .. } => {}
        }
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
