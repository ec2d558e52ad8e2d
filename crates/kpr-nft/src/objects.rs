//! Typed nftables objects: tables, chains, rules (matches + statements), sets, maps, elements.
//!
//! Only what kube-proxy-rs emits is representable, and every variant has one canonical text form
//! (see `text`), so a rendered ruleset is walkable by a packet tracer and comparable with what
//! the kernel lists.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The most endpoints one endpoint set can have in a [`KeyType::Bucket`] map: a set of `n`
/// endpoints at `offset` is drawn by `numgen random mod n offset offset`, bucket
/// `offset + i` being endpoint `i`; each set owns `BUCKETS` consecutive buckets.
pub const BUCKETS: u32 = 16384;

/// The address family of a table. kube-proxy-rs uses one `ip` and one `ip6` table (no `inet`:
/// no address type spans both families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }
}

/// A transport protocol as nftables names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Proto {
    Tcp,
    Udp,
    Sctp,
}

impl L4Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
            L4Proto::Sctp => "sctp",
        }
    }
}

/// Base-chain types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainType {
    Filter,
    Nat,
}

/// Netfilter hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

/// Well-known priorities (`dstnat` = -100, `srcnat` = 100, `filter` = 0).
pub mod priority {
    pub const DSTNAT: i32 = -100;
    pub const SRCNAT: i32 = 100;
    pub const FILTER: i32 = 0;
}

/// A base chain's attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BaseChain {
    pub chain_type: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// A table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub comment: Option<String>,
}

/// A chain (regular, or a base chain when `base` is set).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub comment: Option<String>,
}

/// What a set or map is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyType {
    /// `ipv4_addr` / `ipv6_addr` (the table's family).
    Addr,
    /// `ipv4_addr . inet_proto . inet_service`.
    AddrProtoPort,
    /// `inet_proto . inet_service`.
    ProtoPort,
    /// `ipv4_addr . ipv4_addr` (source . destination: the hairpin set).
    AddrPair,
    /// `typeof numgen random mod 16384 : ip daddr . tcp dport` (the protocol's `dport`): an
    /// endpoint map, from `numgen` buckets to DNAT targets (a hash map). Only for maps.
    Bucket(L4Proto),
    /// `typeof ip daddr . tcp dport . numgen random mod 16384 : ip daddr . tcp dport`: an
    /// endpoint map keyed by the Service address and port the packet was sent to and a
    /// `numgen` bucket, so one shared rule serves every Service with the same endpoint count.
    /// Only for maps.
    VipBucket(L4Proto),
}

impl KeyType {
    /// Whether a map of this key holds DNAT targets (an endpoint map), not verdicts.
    pub fn is_endpoint_map(self) -> bool {
        matches!(self, KeyType::Bucket(_) | KeyType::VipBucket(_))
    }
}

/// One key of a set or map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Addr(IpAddr),
    /// A prefix (for `interval` sets).
    Net(IpNet),
    AddrProtoPort(IpAddr, L4Proto, u16),
    ProtoPort(L4Proto, u16),
    AddrPair(IpAddr, IpAddr),
    /// A `numgen` bucket.
    Bucket(u32),
    /// A Service address, its port and a `numgen` bucket ([`KeyType::VipBucket`]).
    VipBucket(IpAddr, u16, u32),
}

/// A named set (of addresses or tuples).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Set {
    pub name: String,
    pub key: KeyType,
    /// `flags interval`: elements may be prefixes.
    pub interval: bool,
    /// `flags dynamic,timeout` with this default timeout in seconds (affinity sets).
    pub timeout: Option<u32>,
    pub comment: Option<String>,
}

/// A named map: a verdict map, or (keyed by [`KeyType::Bucket`]) an endpoint map whose values
/// are DNAT targets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Map {
    pub name: String,
    pub key: KeyType,
    pub comment: Option<String>,
}

/// A verdict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

/// A map or set element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    /// The set or map it belongs to.
    pub set: String,
    pub key: Key,
    /// `Some` for verdict map elements.
    pub verdict: Option<Verdict>,
    /// `Some` for endpoint map elements: the DNAT target.
    pub target: Option<SocketAddr>,
    pub comment: Option<String>,
}

/// Which packet address a match reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    Saddr,
    Daddr,
}

/// A condition; every condition of a rule must hold for its statements to run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Match {
    /// `ip saddr 10.0.0.0/8`, `ip daddr != 127.0.0.0/8` (a host address is a /32 or /128).
    Net {
        addr: Addr,
        negate: bool,
        net: IpNet,
    },
    /// `ip saddr @set`, `ip daddr != @set`.
    InSet {
        addr: Addr,
        negate: bool,
        set: String,
    },
    /// `ip saddr != { 203.0.113.0/24, 1.2.3.4 }` (an anonymous interval set, used only for
    /// load-balancer source ranges).
    NotInNets { addr: Addr, nets: Vec<IpNet> },
    /// `meta l4proto tcp`.
    L4Proto(L4Proto),
    /// `th dport 80` (after an `L4Proto` match).
    Dport(u16),
    /// `fib daddr type local` / `fib saddr type local`.
    FibLocal(Addr),
    /// `iifname "cbr0"`, or with `prefix` `iifname "veth*"`; `negate` for `!=`.
    IifName {
        name: String,
        prefix: bool,
        negate: bool,
    },
    /// `meta mark & 0x00004000 == 0x00000000` (the bit is clear).
    MarkClear(u32),
    /// `numgen random mod N == 0`: true with probability 1/N, drawn afresh per rule.
    RandomOneIn(u32),
    /// `ct state new`.
    CtStateNew,
    /// `ct status dnat`: the connection's destination was rewritten.
    CtStatusDnat,
    /// `ip saddr . ip daddr @set` (a [`KeyType::AddrPair`] set).
    PairInSet { set: String },
}

/// What a rule does when it matches, in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Statement {
    /// `ip daddr . meta l4proto . th dport vmap @map` (or `meta l4proto . th dport vmap @map`
    /// for a `ProtoPort` map): the verdict found, if any; no match continues.
    Vmap {
        key: KeyType,
        map: String,
    },
    /// `meta mark set meta mark | 0x00004000`.
    MarkOr(u32),
    /// `meta mark set meta mark ^ 0x00004000`.
    MarkXor(u32),
    /// `update @set { ip saddr }` (affinity).
    UpdateSaddr {
        set: String,
    },
    /// `masquerade fully-random`.
    Masquerade,
    /// `meta l4proto tcp dnat to 10.0.0.2:80` (needs an `L4Proto` match in the rule).
    Dnat {
        addr: IpAddr,
        port: u16,
    },
    /// `dnat ip addr . port to numgen random mod N offset O map @map`: DNAT to the target of
    /// the bucket drawn from `offset..offset + modulus` (needs an `L4Proto` match in the
    /// rule); no target continues.
    DnatMap {
        map: String,
        offset: u32,
        modulus: u32,
    },
    /// `dnat ip addr . port to ip daddr . tcp dport . numgen random mod N map @map`: DNAT to
    /// the target of bucket `0..modulus` of the address and port the packet was sent to, in a
    /// [`KeyType::VipBucket`] map (needs an `L4Proto` match of `proto` in the rule); no
    /// target continues.
    DnatVipMap {
        map: String,
        proto: L4Proto,
        modulus: u32,
    },
    /// `reject` (ICMP port unreachable; TCP clients see ECONNREFUSED).
    Reject,
    Verdict(Verdict),
}

/// A rule in a chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub chain: String,
    pub matches: Vec<Match>,
    pub statements: Vec<Statement>,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(chain: impl Into<String>) -> Rule {
        Rule {
            chain: chain.into(),
            matches: Vec::new(),
            statements: Vec::new(),
            comment: None,
        }
    }

    pub fn m(mut self, m: Match) -> Rule {
        self.matches.push(m);
        self
    }

    pub fn s(mut self, s: Statement) -> Rule {
        self.statements.push(s);
        self
    }

    pub fn comment(mut self, c: impl Into<String>) -> Rule {
        self.comment = Some(c.into());
        self
    }

    /// Chains this rule can jump or go to directly (not through maps).
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.statements.iter().filter_map(|s| match s {
            Statement::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) => Some(c.as_str()),
            _ => None,
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}
