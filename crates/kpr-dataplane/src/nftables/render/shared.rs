//! Objects several service ports share, counted by reference in the committed copy: set
//! elements (`cluster-ips`, `hairpin-endpoints`), the sharded endpoint maps, and what plain
//! ClusterIP ports go through (the `cluster-endpoints-<proto>` map and one pick chain per
//! protocol and endpoint count), so adding a plain Service adds map elements only.

use super::{PortCtx, local_match, set_elem};
use crate::nftables::layout;
use kpr_model::names::IpFamily;
use kpr_nft::{Chain, Element, Key, KeyType, L4Proto, Map, Match, Op, Rule, Statement, Verdict};
use std::collections::HashMap;
use std::net::IpAddr;

/// An object several ports may need, in a compact form (the committed copy counts
/// references to about one per endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Shared {
    /// The endpoint map of a protocol's shard.
    Map(L4Proto, u32),
    /// The endpoint map of a protocol's plain ClusterIP ports (`cluster-endpoints-tcp`).
    ClusterMap(L4Proto),
    /// The chain that picks one of `n` endpoints for a plain ClusterIP port of a protocol.
    Pick(L4Proto, u32),
    /// A ClusterIP's element of `cluster-ips` (ports of one Service share it).
    ClusterIp(IpAddr),
    /// An endpoint's element of `hairpin-endpoints` (Services share endpoints). The address
    /// alone, not the element: the committed copy counts about one per endpoint.
    Hairpin(IpAddr),
}

impl Shared {
    pub(super) fn map(self) -> Option<Map> {
        let (name, key) = match self {
            Shared::Map(proto, shard) => {
                (layout::endpoint_map(proto, shard), KeyType::Bucket(proto))
            }
            Shared::ClusterMap(proto) => (
                layout::cluster_endpoints_map(proto),
                KeyType::VipBucket(proto),
            ),
            Shared::Pick(..) | Shared::ClusterIp(_) | Shared::Hairpin(_) => return None,
        };
        Some(Map {
            name,
            key,
            comment: None,
        })
    }

    pub(super) fn element(self) -> Option<Element> {
        match self {
            Shared::ClusterIp(ip) => Some(set_elem(layout::CLUSTER_IPS, Key::Addr(ip))),
            Shared::Hairpin(ip) => Some(set_elem(layout::HAIRPIN, Key::AddrPair(ip, ip))),
            _ => None,
        }
    }

    /// A pick chain's name and rules: the ClusterIP masquerade rule (§4.9: masqueradeAll, or
    /// traffic not from a local pod; the ClusterIP and port were matched by `service-ips`),
    /// then the DNAT to the target of a bucket drawn for the address and port the packet was
    /// sent to.
    pub(super) fn chain(self, ctx: &PortCtx) -> Option<(String, Vec<Rule>)> {
        let Shared::Pick(proto, n) = self else {
            return None;
        };
        let name = layout::pick_chain(proto, n);
        let masq = Statement::Verdict(Verdict::Jump(layout::MARK_FOR_MASQUERADE.into()));
        let mut rules = Vec::new();
        if ctx.masquerade_all {
            rules.push(Rule::new(&name).s(masq));
        } else if let Some(m) = local_match(&ctx.detector, true) {
            rules.push(Rule::new(&name).m(m).s(masq));
        }
        rules.push(
            Rule::new(&name)
                .m(Match::L4Proto(proto))
                .s(Statement::DnatVipMap {
                    map: layout::cluster_endpoints_map(proto),
                    proto,
                    modulus: n,
                }),
        );
        Some((name, rules))
    }

    /// The operations that add it (a map, an element, or a chain and its rules).
    pub(super) fn ops(self, ctx: &PortCtx) -> Vec<Op> {
        if let Some(m) = self.map() {
            return vec![Op::AddMap(m)];
        }
        if let Some(e) = self.element() {
            return vec![Op::AddElement(e)];
        }
        let Some((name, rules)) = self.chain(ctx) else {
            return Vec::new();
        };
        std::iter::once(Op::AddChain(Chain {
            name,
            base: None,
            comment: None,
        }))
        .chain(rules.into_iter().map(Op::AddRule))
        .collect()
    }
}

/// Reference counts of [`Shared`] objects in the committed copy. Hairpin elements (about one
/// per endpoint) of IPv4 addresses are counted apart, keyed by the address's four bytes: an
/// eighth of the table's memory at 30,000 Services x 10 endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Counts {
    hairpin_v4: HashMap<u32, u32>,
    other: HashMap<Shared, u32>,
}

impl Counts {
    /// Room for the objects of `ports` ports with `endpoints` endpoints in all, without
    /// growing (growing holds the old and the new table at once).
    pub(super) fn with_capacity(family: IpFamily, ports: usize, endpoints: usize) -> Counts {
        // Each port's ClusterIP, a few maps and pick chains; an endpoint's hairpin element.
        let (other, v4) = match family {
            IpFamily::V4 => (ports + 64, endpoints),
            IpFamily::V6 => (ports + 64 + endpoints, 0),
        };
        Counts {
            hairpin_v4: HashMap::with_capacity(v4),
            other: HashMap::with_capacity(other),
        }
    }

    fn v4(s: &Shared) -> Option<u32> {
        match s {
            Shared::Hairpin(IpAddr::V4(a)) => Some(u32::from(*a)),
            _ => None,
        }
    }

    pub(super) fn contains(&self, s: &Shared) -> bool {
        match Self::v4(s) {
            Some(a) => self.hairpin_v4.contains_key(&a),
            None => self.other.contains_key(s),
        }
    }

    pub(super) fn add(&mut self, s: Shared) {
        match Self::v4(&s) {
            Some(a) => *self.hairpin_v4.entry(a).or_default() += 1,
            None => *self.other.entry(s).or_default() += 1,
        }
    }

    /// One reference fewer; the object is gone at zero.
    pub(super) fn release(&mut self, s: &Shared) {
        fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: &K) {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
        match Self::v4(s) {
            Some(a) => dec(&mut self.hairpin_v4, &a),
            None => dec(&mut self.other, s),
        }
    }
}
