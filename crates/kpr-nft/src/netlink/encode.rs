//! A typed [`Transaction`] as one nf_tables netlink batch (`NFNL_MSG_BATCH_BEGIN`, the
//! `NFT_MSG_NEW*`/`DEL*` messages, `NFNL_MSG_BATCH_END`). Pure.
//!
//! The bytecode is what nft 1.0.6 emits for the transaction's canonical text (`text::script`),
//! attribute for attribute, as read from its messages with `strace -xx` and checked with
//! `nft --debug=netlink`; user data (comments, set key byte order) is nft's too. So
//! `nft list ruleset` shows operators exactly the rules `nft -f` would have loaded, and the
//! kernel-agreement tests compare the kernel's listing with the [`crate::Fake`]'s.
//!
//! Element keys: a [`Key::Net`] is an interval (start, and end + 1 flagged as an interval end,
//! as nft sends it); every other key is a plain value.

use super::wire::{Buf, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, Udata};
use crate::objects::*;
use crate::text::{clean_comment, clean_ifname};
use crate::transaction::{Op, Transaction};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

// Message types (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_*) and batch delimiters.
const SUBSYS: u16 = 10 << 8;
const NEWTABLE: u16 = SUBSYS;
const DELTABLE: u16 = SUBSYS | 2;
const NEWCHAIN: u16 = SUBSYS | 3;
const DELCHAIN: u16 = SUBSYS | 5;
const NEWRULE: u16 = SUBSYS | 6;
const DELRULE: u16 = SUBSYS | 8;
const NEWSET: u16 = SUBSYS | 9;
const DELSET: u16 = SUBSYS | 11;
const NEWSETELEM: u16 = SUBSYS | 12;
const DELSETELEM: u16 = SUBSYS | 14;
const BATCH_BEGIN: u16 = 0x10;
const BATCH_END: u16 = 0x11;

// Attribute numbers (linux/netfilter/nf_tables.h).
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;

/// Registers: the verdict register, the 16-byte `NFT_REG_1..4`, the 4-byte `NFT_REG32_00..`.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// The register nft picks for the concatenation field at `offset` bytes: a 16-byte register
/// where it is aligned to one, else a 4-byte one.
fn concat_reg(offset: usize) -> u32 {
    if offset.is_multiple_of(16) {
        REG_1 + (offset / 16) as u32
    } else {
        8 + (offset / 4) as u32
    }
}

/// Elements per NEWSETELEM message: keeps the nested element list under its 64 KiB length.
const ELEMS_PER_MSG: usize = 256;

/// nft's datatype ids, for set key types (concatenations: 6 bits per field).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

/// The netfilter protocol number of a table family.
pub(crate) fn nfproto(f: Family) -> u8 {
    match f {
        Family::Ip => 2,   // NFPROTO_IPV4
        Family::Ip6 => 10, // NFPROTO_IPV6
    }
}

fn addr_len(f: Family) -> usize {
    match f {
        Family::Ip => 4,
        Family::Ip6 => 16,
    }
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn proto_num(p: L4Proto) -> u8 {
    match p {
        L4Proto::Tcp => 6,
        L4Proto::Udp => 17,
        L4Proto::Sctp => 132,
    }
}

fn key_type(f: Family, k: KeyType) -> (u32, u32) {
    let (addr, alen) = match f {
        Family::Ip => (TYPE_IPADDR, 4),
        Family::Ip6 => (TYPE_IP6ADDR, 16),
    };
    match k {
        KeyType::Addr => (addr, alen),
        KeyType::AddrProtoPort => (
            (addr << 12) | (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE,
            alen + 8,
        ),
        KeyType::ProtoPort => ((TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE, 8),
        KeyType::AddrPair => ((addr << 6) | addr, 2 * alen),
        KeyType::Bucket(_) => (TYPE_INTEGER, 4),
        KeyType::VipBucket(_) => (
            (addr << 12) | (TYPE_INET_SERVICE << 6) | TYPE_INTEGER,
            alen + 8,
        ),
    }
}

/// An endpoint map's value type: `ipv4_addr . inet_service` (or ipv6), and its length.
fn target_type(f: Family) -> (u32, u32) {
    match f {
        Family::Ip => ((TYPE_IPADDR << 6) | TYPE_INET_SERVICE, 8),
        Family::Ip6 => ((TYPE_IP6ADDR << 6) | TYPE_INET_SERVICE, 20),
    }
}

/// A DNAT target as a map value: the address, then the port padded to 4 bytes.
fn target_bytes(t: &SocketAddr) -> Vec<u8> {
    let mut v = ip_bytes(&t.ip());
    let [hi, lo] = t.port().to_be_bytes();
    v.extend_from_slice(&[hi, lo, 0, 0]);
    v
}

/// A key's bytes as the kernel stores it (concatenation fields padded to 4 bytes).
fn key_bytes(k: &Key) -> Vec<u8> {
    let pp = |p: L4Proto, port: u16| {
        let [hi, lo] = port.to_be_bytes();
        [proto_num(p), 0, 0, 0, hi, lo, 0, 0]
    };
    match k {
        Key::Addr(a) => ip_bytes(a),
        Key::Net(n) => ip_bytes(&n.trunc().addr()),
        Key::AddrProtoPort(a, p, port) => {
            let mut v = ip_bytes(a);
            v.extend_from_slice(&pp(*p, *port));
            v
        }
        Key::ProtoPort(p, port) => pp(*p, *port).to_vec(),
        Key::AddrPair(a, b) => {
            let mut v = ip_bytes(a);
            v.extend(ip_bytes(b));
            v
        }
        // `numgen` values are host-order integers.
        Key::Bucket(b) => b.to_ne_bytes().to_vec(),
        Key::VipBucket(a, port, b) => {
            let mut v = ip_bytes(a);
            let [hi, lo] = port.to_be_bytes();
            v.extend_from_slice(&[hi, lo, 0, 0]);
            v.extend_from_slice(&b.to_ne_bytes());
            v
        }
    }
}

/// The first address after a prefix, or `None` when the prefix reaches the top of the space.
fn after(n: &IpNet) -> Option<Vec<u8>> {
    match n.trunc() {
        IpNet::V4(v) => u32::from(v.broadcast())
            .checked_add(1)
            .map(|x| x.to_be_bytes().to_vec()),
        IpNet::V6(v) => u128::from(v.broadcast())
            .checked_add(1)
            .map(|x| x.to_be_bytes().to_vec()),
    }
}

/// One element on the wire.
#[derive(Debug)]
struct Wire {
    key: Vec<u8>,
    interval_end: bool,
    verdict: Option<Verdict>,
    /// A value that is not a verdict (an endpoint map's DNAT target).
    data: Option<Vec<u8>>,
    udata: Option<Vec<u8>>,
}

impl Wire {
    fn value(key: Vec<u8>) -> Wire {
        Wire {
            key,
            interval_end: false,
            verdict: None,
            data: None,
            udata: None,
        }
    }
}

/// The wire elements of one interval (start; end + 1 flagged as an end, or an "open" flag on
/// the start when nothing follows the prefix).
fn interval(n: &IpNet, udata: Option<Vec<u8>>) -> Vec<Wire> {
    let start = key_bytes(&Key::Net(*n));
    match after(n) {
        Some(end) => vec![
            Wire {
                udata,
                ..Wire::value(start)
            },
            Wire {
                interval_end: true,
                ..Wire::value(end)
            },
        ],
        None => {
            let mut u = Udata::default();
            if let Some(c) = udata {
                u.bytes = c;
            }
            u.u32(1, 1); // NFTNL_UDATA_SET_ELEM_FLAGS: NFTNL_SET_ELEM_F_INTERVAL_OPEN
            vec![Wire {
                udata: Some(u.bytes),
                ..Wire::value(start)
            }]
        }
    }
}

fn element_wire(e: &Element, with_data: bool) -> Vec<Wire> {
    let udata = e
        .comment
        .as_ref()
        .filter(|_| with_data)
        .map(|c| Udata::default().str(0, &clean_comment(c)).bytes.clone());
    match &e.key {
        Key::Net(n) => interval(n, udata),
        k @ (Key::Bucket(_) | Key::VipBucket(..)) => vec![Wire {
            data: e.target.as_ref().filter(|_| with_data).map(target_bytes),
            udata,
            ..Wire::value(key_bytes(k))
        }],
        k => vec![Wire {
            key: key_bytes(k),
            interval_end: false,
            verdict: e.verdict.clone().filter(|_| with_data),
            data: None,
            udata,
        }],
    }
}

fn verdict_nest(b: &mut Buf, v: &Verdict) {
    b.nest(DATA_VERDICT, |b| {
        let (code, chain) = match v {
            Verdict::Accept => (1i32, None),
            Verdict::Drop => (0, None),
            Verdict::Return => (-5, None),
            Verdict::Jump(c) => (-3, Some(c)),
            Verdict::Goto(c) => (-4, Some(c)),
        };
        b.attr(VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            b.str(VERDICT_CHAIN, c);
        }
    });
}

fn elements_attr(b: &mut Buf, wires: &[Wire]) {
    b.nest(3, |b| {
        for (i, w) in wires.iter().enumerate() {
            b.nest((i + 1) as u16, |b| {
                if w.interval_end {
                    b.u32(3, 1); // NFTA_SET_ELEM_FLAGS: NFT_SET_ELEM_INTERVAL_END
                }
                b.nest(1, |b| b.attr(DATA_VALUE, &w.key));
                if let Some(v) = &w.verdict {
                    b.nest(2, |b| verdict_nest(b, v));
                }
                if let Some(d) = &w.data {
                    b.nest(2, |b| b.attr(DATA_VALUE, d));
                }
                if let Some(u) = &w.udata {
                    b.attr(6, u);
                }
            });
        }
    });
}

/// Writes expressions of one rule.
struct Exprs<'a> {
    b: &'a mut Buf,
    family: Family,
}

impl Exprs<'_> {
    fn expr(&mut self, name: &str, f: impl FnOnce(&mut Buf)) {
        self.b.nest(LIST_ELEM, |b| {
            b.str(EXPR_NAME, name);
            b.nest(EXPR_DATA, f);
        });
    }

    fn payload(&mut self, dreg: u32, base: u32, offset: u32, len: u32) {
        self.expr("payload", |b| {
            b.u32(1, dreg);
            b.u32(2, base);
            b.u32(3, offset);
            b.u32(4, len);
        });
    }

    /// `ip saddr` / `ip6 daddr` … loaded in full into `dreg`.
    fn addr(&mut self, a: Addr, dreg: u32) {
        let (off, len) = self.addr_field(a);
        self.payload(dreg, 1, off, len);
    }

    fn addr_field(&self, a: Addr) -> (u32, u32) {
        match (self.family, a) {
            (Family::Ip, Addr::Saddr) => (12, 4),
            (Family::Ip, Addr::Daddr) => (16, 4),
            (Family::Ip6, Addr::Saddr) => (8, 16),
            (Family::Ip6, Addr::Daddr) => (24, 16),
        }
    }

    fn cmp(&mut self, neq: bool, data: &[u8]) {
        self.expr("cmp", |b| {
            b.u32(1, REG_1);
            b.u32(2, u32::from(neq));
            b.nest(3, |b| b.attr(DATA_VALUE, data));
        });
    }

    /// `reg 1 = (reg 1 & mask) ^ xor`; nft names the boolean operation for meta expressions.
    fn bitwise(&mut self, mask: &[u8], xor: &[u8], with_op: bool) {
        self.expr("bitwise", |b| {
            b.u32(1, REG_1);
            b.u32(2, REG_1);
            if with_op {
                b.u32(6, 0); // NFT_BITWISE_BOOL
            }
            b.u32(3, mask.len() as u32);
            b.nest(4, |b| b.attr(DATA_VALUE, mask));
            b.nest(5, |b| b.attr(DATA_VALUE, xor));
        });
    }

    fn meta_load(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            b.u32(2, key);
            b.u32(1, dreg);
        });
    }

    fn meta_set_mark(&mut self) {
        self.expr("meta", |b| {
            b.u32(2, META_MARK);
            b.u32(3, REG_1);
        });
    }

    /// A set lookup; with `dreg`, a map lookup whose value lands there.
    fn lookup(&mut self, set: &str, set_id: Option<u32>, dreg: Option<u32>, negate: bool) {
        self.expr("lookup", |b| {
            b.u32(2, REG_1);
            if let Some(d) = dreg {
                b.u32(3, d);
            }
            b.str(1, set);
            if let Some(id) = set_id {
                b.u32(4, id);
            }
            if negate {
                b.u32(5, 1); // NFT_LOOKUP_F_INV
            }
        });
    }

    fn immediate(&mut self, dreg: u32, data: &[u8]) {
        self.expr("immediate", |b| {
            b.u32(1, dreg);
            b.nest(2, |b| b.attr(DATA_VALUE, data));
        });
    }

    fn verdict(&mut self, v: &Verdict) {
        self.expr("immediate", |b| {
            b.u32(1, REG_VERDICT);
            b.nest(2, |b| verdict_nest(b, v));
        });
    }

    /// `numgen random mod N offset O`.
    fn bucket(&mut self, modulus: u32, offset: u32) {
        self.expr("numgen", |b| {
            b.u32(1, REG_1);
            b.u32(2, modulus);
            b.u32(3, 1); // NFT_NG_RANDOM
            b.u32(4, offset);
        });
    }

    fn l4proto_port(&mut self, first_reg: u32, second_reg: u32) {
        self.meta_load(META_L4PROTO, first_reg);
        self.payload(second_reg, 2, 2, 2);
    }

    fn net(&mut self, a: Addr, negate: bool, n: &IpNet) {
        let (off, len) = self.addr_field(a);
        let plen = u32::from(n.prefix_len());
        let bytes = ip_bytes(&n.trunc().addr());
        if plen > 0 && plen.is_multiple_of(8) {
            // nft loads only the prefix's bytes when it ends on a byte boundary.
            self.payload(REG_1, 1, off, plen / 8);
            self.cmp(negate, &bytes[..(plen / 8) as usize]);
        } else {
            self.payload(REG_1, 1, off, len);
            self.bitwise(&ip_bytes(&n.netmask()), &vec![0; len as usize], false);
            self.cmp(negate, &bytes);
        }
    }

    fn matches(&mut self, r: &Rule, anon: &mut impl Iterator<Item = u32>) {
        for m in &r.matches {
            match m {
                Match::Net { addr, negate, net } => self.net(*addr, *negate, net),
                Match::InSet { addr, negate, set } => {
                    self.addr(*addr, REG_1);
                    self.lookup(set, None, None, *negate);
                }
                Match::NotInNets { addr, nets } if single(nets).is_some() => {
                    // nft turns a one-element anonymous set into a comparison.
                    if let Some(n) = single(nets) {
                        self.net(*addr, true, &n);
                    }
                }
                Match::NotInNets { addr, .. } => {
                    self.addr(*addr, REG_1);
                    let id = anon.next().unwrap_or_default();
                    self.lookup(ANON_SET, Some(id), None, true);
                }
                Match::L4Proto(p) => {
                    self.meta_load(META_L4PROTO, REG_1);
                    self.cmp(false, &[proto_num(*p)]);
                }
                Match::Dport(port) => {
                    self.payload(REG_1, 2, 2, 2);
                    self.cmp(false, &port.to_be_bytes());
                }
                Match::FibLocal(a) => {
                    let flags = if *a == Addr::Saddr { 1 } else { 2 };
                    self.expr("fib", |b| {
                        b.u32(3, flags);
                        b.u32(2, 3); // NFT_FIB_RESULT_ADDRTYPE
                        b.u32(1, REG_1);
                    });
                    self.cmp(false, &2u32.to_ne_bytes()); // RTN_LOCAL
                }
                Match::IifName {
                    name,
                    prefix,
                    negate,
                } => {
                    self.meta_load(6, REG_1); // NFT_META_IIFNAME
                    let mut v = clean_ifname(name).into_bytes();
                    if !prefix {
                        v.resize(16, 0);
                    }
                    self.cmp(*negate, &v);
                }
                Match::MarkClear(bit) => {
                    self.meta_load(META_MARK, REG_1);
                    self.bitwise(&bit.to_ne_bytes(), &[0; 4], true);
                    self.cmp(false, &[0; 4]);
                }
                Match::RandomOneIn(n) => {
                    self.expr("numgen", |b| {
                        b.u32(1, REG_1);
                        b.u32(2, *n);
                        b.u32(3, 1); // NFT_NG_RANDOM
                        b.u32(4, 0);
                    });
                    self.cmp(false, &[0; 4]);
                }
                Match::CtStatusDnat => {
                    self.expr("ct", |b| {
                        b.u32(2, 2); // NFT_CT_STATUS
                        b.u32(1, REG_1);
                    });
                    self.bitwise(&0x20u32.to_ne_bytes(), &[0; 4], false); // IPS_DST_NAT
                    self.cmp(true, &[0; 4]);
                }
                Match::PairInSet { set } => {
                    self.addr(Addr::Saddr, REG_1);
                    self.addr(Addr::Daddr, concat_reg(addr_len(self.family)));
                    self.lookup(set, None, None, false);
                }
                Match::CtStateNew => {
                    self.expr("ct", |b| {
                        b.u32(2, 0); // NFT_CT_STATE
                        b.u32(1, REG_1);
                    });
                    self.bitwise(&8u32.to_ne_bytes(), &[0; 4], false); // IP_CT_NEW bit
                    self.cmp(true, &[0; 4]);
                }
            }
        }
    }

    /// Looks the key in the registers up in endpoint map `map` and DNATs to the target found
    /// (address in register 1, port after it); no target continues.
    fn dnat_looked_up(&mut self, map: &str, alen: usize) {
        self.lookup(map, None, Some(REG_1), false);
        let fam = nfproto(self.family);
        self.expr("nat", |b| {
            b.u32(1, 1); // NFT_NAT_DNAT
            b.u32(2, u32::from(fam));
            b.u32(3, REG_1);
            b.u32(5, concat_reg(alen));
        });
    }

    fn statements(&mut self, r: &Rule) {
        let alen = addr_len(self.family);
        for s in &r.statements {
            match s {
                Statement::Vmap { key, map } => {
                    match key {
                        KeyType::Addr => self.addr(Addr::Daddr, REG_1),
                        KeyType::AddrProtoPort => {
                            self.addr(Addr::Daddr, REG_1);
                            self.l4proto_port(concat_reg(alen), concat_reg(alen + 4));
                        }
                        KeyType::ProtoPort => self.l4proto_port(REG_1, concat_reg(4)),
                        KeyType::AddrPair => {
                            self.addr(Addr::Saddr, REG_1);
                            self.addr(Addr::Daddr, concat_reg(alen));
                        }
                        KeyType::Bucket(_) | KeyType::VipBucket(_) => self.bucket(BUCKETS, 0),
                    }
                    self.lookup(map, None, Some(REG_VERDICT), false);
                }
                Statement::MarkOr(bit) => {
                    self.meta_load(META_MARK, REG_1);
                    self.bitwise(&(!bit).to_ne_bytes(), &bit.to_ne_bytes(), true);
                    self.meta_set_mark();
                }
                Statement::MarkXor(bit) => {
                    self.meta_load(META_MARK, REG_1);
                    self.bitwise(&[0xff; 4], &bit.to_ne_bytes(), true);
                    self.meta_set_mark();
                }
                Statement::UpdateSaddr { set } => {
                    self.addr(Addr::Saddr, REG_1);
                    self.expr("dynset", |b| {
                        b.u32(4, REG_1);
                        b.u32(3, 1); // NFT_DYNSET_OP_UPDATE
                        b.str(1, set);
                    });
                }
                Statement::Masquerade => self.expr("masq", |b| b.u32(1, 0x10)), // fully-random
                Statement::Dnat { addr, port } => {
                    self.immediate(REG_1, &ip_bytes(addr));
                    self.immediate(REG_2, &port.to_be_bytes());
                    let fam = if addr.is_ipv4() { 2 } else { 10 };
                    self.expr("nat", |b| {
                        b.u32(1, 1); // NFT_NAT_DNAT
                        b.u32(2, fam);
                        b.u32(3, REG_1);
                        b.u32(5, REG_2);
                        b.u32(7, 2); // NF_NAT_RANGE_PROTO_SPECIFIED
                    });
                }
                Statement::DnatMap {
                    map,
                    offset,
                    modulus,
                } => {
                    self.bucket(*modulus, *offset);
                    self.dnat_looked_up(map, alen);
                }
                Statement::DnatVipMap { map, modulus, .. } => {
                    // `ip daddr . th dport . numgen random mod N`, as nft loads it: each field
                    // in the register its offset in the concatenation names.
                    self.addr(Addr::Daddr, REG_1);
                    self.payload(concat_reg(alen), 2, 2, 2);
                    self.expr("numgen", |b| {
                        b.u32(1, concat_reg(alen + 4));
                        b.u32(2, *modulus);
                        b.u32(3, 1); // NFT_NG_RANDOM
                        b.u32(4, 0);
                    });
                    self.dnat_looked_up(map, alen);
                }
                Statement::Reject => {
                    let code = match self.family {
                        Family::Ip => 3,  // ICMP port unreachable
                        Family::Ip6 => 4, // ICMPv6 port unreachable
                    };
                    self.expr("reject", |b| {
                        b.u32(1, 0); // NFT_REJECT_ICMP_UNREACH
                        b.attr(2, &[code]);
                    });
                }
                Statement::Verdict(v) => self.verdict(v),
            }
        }
    }
}

const META_MARK: u32 = 3;
const META_L4PROTO: u32 = 16;
/// The name nft gives anonymous sets; the kernel numbers them.
const ANON_SET: &str = "__set%d";

/// An encoded batch and where its messages came from.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// `(sequence number, index of the operation)` of every message between the delimiters.
    pub origin: Vec<(u32, usize)>,
    /// The sequence number of the last message, the one that asks for an acknowledgement.
    pub ack_seq: u32,
}

struct Encoder {
    buf: Buf,
    table: Table,
    seq: u32,
    next_set_id: u32,
    origin: Vec<(u32, usize)>,
    /// Start of the last message, to set its ACK flag.
    last: Option<usize>,
    /// Interval sets created in this batch that have had no elements yet.
    new_interval_sets: BTreeSet<String>,
    /// A run of element operations on one set not written yet (a run shares messages).
    run: Option<Run>,
}

/// Consecutive element operations on one set, as wire elements.
struct Run {
    add: bool,
    set: String,
    /// The index of the run's first operation.
    op: usize,
    wires: Vec<Wire>,
    /// Whether the set was created in this batch as an interval set and had no elements yet.
    new_interval: bool,
}

impl Encoder {
    fn msg(&mut self, op: usize, kind: u16, flags: u16, f: impl FnOnce(&mut Buf)) {
        self.seq += 1;
        let family = nfproto(self.table.family);
        let start = self
            .buf
            .begin_msg(kind, NLM_F_REQUEST | flags, self.seq, family, 0);
        f(&mut self.buf);
        self.buf.end_msg(start);
        self.origin.push((self.seq, op));
        self.last = Some(start);
    }

    fn table(&self) -> &str {
        &self.table.name
    }

    fn set_id(&mut self) -> u32 {
        self.next_set_id += 1;
        self.next_set_id
    }

    fn add_set(
        &mut self,
        op: usize,
        name: &str,
        key: KeyType,
        map: bool,
        s: Option<&Set>,
        comment: Option<&String>,
    ) {
        let f = self.table.family;
        let table = self.table().to_owned();
        let id = self.set_id();
        let (ktype, klen) = key_type(f, key);
        let interval = s.is_some_and(|s| s.interval);
        let timeout = s.and_then(|s| s.timeout);
        let mut flags = 0;
        if map {
            flags |= 0x8; // NFT_SET_MAP
        }
        if interval {
            flags |= 0x4;
        }
        if timeout.is_some() {
            flags |= 0x10 | 0x20; // NFT_SET_TIMEOUT | NFT_SET_EVAL ("dynamic")
        }
        let mut u = Udata::default();
        let data = match key {
            KeyType::Bucket(proto) => {
                bucket_udata(&mut u, f, proto);
                Some(target_type(f))
            }
            KeyType::VipBucket(proto) => {
                vip_bucket_udata(&mut u, f, proto);
                Some(target_type(f))
            }
            _ => {
                let concat = key != KeyType::Addr;
                // Key byte order: big endian, none for a concatenation.
                u.u32(0, if concat { 0 } else { 2 });
                if map {
                    u.u32(1, 0); // data byte order
                }
                if concat {
                    // nft's (empty) typeof record of a concatenation.
                    u.raw(3, &[0, 4, 13, 0, 0, 0, 1, 0]);
                }
                if map {
                    u.u32(6, 0); // data is not an interval
                }
                map.then_some((0xffff_ff00, 0)) // NFT_DATA_VERDICT
            }
        };
        if let Some(c) = comment {
            u.str(7, &clean_comment(c));
        }
        self.msg(op, NEWSET, NLM_F_CREATE, |b| {
            b.str(1, &table);
            b.str(2, name);
            b.u32(3, flags);
            b.u32(4, ktype);
            b.u32(5, klen);
            if let Some((dtype, dlen)) = data {
                b.u32(6, dtype);
                b.u32(7, dlen);
            }
            b.u32(10, id);
            if let Some(t) = timeout {
                b.u64(11, u64::from(t) * 1000);
            }
            b.attr(13, &u.bytes);
        });
    }

    /// The anonymous interval set of a `NotInNets` match; returns its id.
    fn anon_set(&mut self, op: usize, a: Addr, nets: &[IpNet]) -> u32 {
        let f = self.table.family;
        let table = self.table().to_owned();
        let id = self.set_id();
        let wires = anon_elements(nets);
        let (ktype, klen) = key_type(f, KeyType::Addr);
        let mut u = Udata::default();
        u.u32(0, 2).u32(2, 1); // big endian; merge elements
        let (desc, field) = match (f, a) {
            (Family::Ip, Addr::Saddr) => (12, 11),
            (Family::Ip, Addr::Daddr) => (12, 12),
            (Family::Ip6, Addr::Saddr) => (13, 8),
            (Family::Ip6, Addr::Daddr) => (13, 9),
        };
        u.nest(3, |t| payload_typeof(t, desc, field));
        self.msg(op, NEWSET, NLM_F_CREATE, |b| {
            b.str(1, &table);
            b.str(2, ANON_SET);
            b.u32(3, 0x1 | 0x2 | 0x4); // anonymous, constant, interval
            b.u32(4, ktype);
            b.u32(5, klen);
            b.u32(10, id);
            b.nest(9, |b| b.u32(1, wires.len() as u32));
            b.attr(13, &u.bytes);
        });
        self.msg(op, NEWSETELEM, NLM_F_CREATE, |b| {
            b.str(1, &table);
            b.str(2, ANON_SET);
            b.u32(4, id);
            elements_attr(b, &wires);
        });
        id
    }

    fn elements(&mut self, op: usize, kind: u16, set: &str, wires: &[Wire]) {
        let table = self.table().to_owned();
        let flags = if kind == NEWSETELEM { NLM_F_CREATE } else { 0 };
        for chunk in wires.chunks(ELEMS_PER_MSG) {
            self.msg(op, kind, flags, |b| {
                b.str(1, &table);
                b.str(2, set);
                elements_attr(b, chunk);
            });
        }
    }

    fn rule(&mut self, op: usize, r: &Rule) {
        let anon: Vec<u32> = r
            .matches
            .iter()
            .filter_map(|m| match m {
                Match::NotInNets { addr, nets } if single(nets).is_none() => Some((*addr, nets)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(a, nets)| self.anon_set(op, a, nets))
            .collect();
        let family = self.table.family;
        let table = self.table().to_owned();
        self.msg(op, NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |b| {
            b.str(1, &table);
            b.str(2, &r.chain);
            b.nest(4, |b| {
                let mut e = Exprs { b, family };
                e.matches(r, &mut anon.into_iter());
                e.statements(r);
            });
            if let Some(c) = &r.comment {
                b.attr(7, &Udata::default().str(0, &clean_comment(c)).bytes);
            }
        });
    }
}

/// nft's user data for `typeof numgen random mod 16384 : ip daddr . tcp dport`: key in host
/// byte order, no data byte order, the key's and the value's `typeof` records, value not an
/// interval.
fn bucket_udata(u: &mut Udata, f: Family, proto: L4Proto) {
    u.u32(0, 1).u32(1, 0);
    // numgen (expression 23): type random, the modulus, offset 0.
    u.nest(3, |t| {
        t.u32(0, 23).nest(1, |n| {
            n.u32(0, 1).u32(1, BUCKETS).u32(2, 0);
        });
    });
    let (desc, field) = daddr_typeof(f);
    let th = th_typeof(proto);
    // A concatenation (13) of `ip daddr` and `tcp dport`.
    u.nest(4, |t| {
        t.u32(0, 13).nest(1, |c| {
            c.nest(0, |e| payload_typeof(e, desc, field));
            c.nest(1, |e| payload_typeof(e, th, 2));
        });
    });
    u.u32(6, 0);
}

/// nft's `typeof` records of a [`KeyType::VipBucket`] map: the key `ip daddr . tcp dport .
/// numgen random mod 16384`, the value `ip daddr . tcp dport`.
fn vip_bucket_udata(u: &mut Udata, f: Family, proto: L4Proto) {
    // Byte order: none for concatenations, key and value.
    u.u32(0, 0).u32(1, 0);
    let (desc, field) = daddr_typeof(f);
    let th = th_typeof(proto);
    u.nest(3, |t| {
        t.u32(0, 13).nest(1, |c| {
            c.nest(0, |e| payload_typeof(e, desc, field));
            c.nest(1, |e| payload_typeof(e, th, 2));
            c.nest(2, |e| {
                e.u32(0, 23).nest(1, |n| {
                    n.u32(0, 1).u32(1, BUCKETS).u32(2, 0);
                });
            });
        });
    });
    u.nest(4, |t| {
        t.u32(0, 13).nest(1, |c| {
            c.nest(0, |e| payload_typeof(e, desc, field));
            c.nest(1, |e| payload_typeof(e, th, 2));
        });
    });
    u.u32(6, 0);
}

/// nft's protocol description and field of the family's `daddr`.
fn daddr_typeof(f: Family) -> (u32, u32) {
    match f {
        Family::Ip => (12, 12), // ip daddr
        Family::Ip6 => (13, 9), // ip6 daddr
    }
}

/// nft's protocol description of a transport protocol (`dport` is field 2 of each).
fn th_typeof(proto: L4Proto) -> u32 {
    match proto {
        L4Proto::Tcp => 8,
        L4Proto::Udp => 6,
        L4Proto::Sctp => 10,
    }
}

/// The `typeof` record of a payload expression (7): protocol description `desc`, field
/// `field` (nft's numbering).
fn payload_typeof(u: &mut Udata, desc: u32, field: u32) {
    u.u32(0, 7).nest(1, |p| {
        p.u32(0, desc).u32(1, field);
    });
}

/// The one prefix of a list that has one (after removing duplicates).
fn single(nets: &[IpNet]) -> Option<IpNet> {
    let first = nets.first()?.trunc();
    nets.iter().all(|n| n.trunc() == first).then_some(first)
}

/// The elements of an anonymous interval set as nft sends them: overlapping or adjacent
/// prefixes merged, an interval end at address zero first when no range starts there.
fn anon_elements(nets: &[IpNet]) -> Vec<Wire> {
    let mut ranges: Vec<(u128, Option<u128>, usize)> = nets
        .iter()
        .map(|n| {
            let (s, e, w) = match n.trunc() {
                IpNet::V4(v) => (
                    u128::from(u32::from(v.network())),
                    u128::from(u32::from(v.broadcast())),
                    4,
                ),
                IpNet::V6(v) => (u128::from(v.network()), u128::from(v.broadcast()), 16),
            };
            let top = if w == 4 {
                u128::from(u32::MAX)
            } else {
                u128::MAX
            };
            (s, (e < top).then(|| e + 1), w)
        })
        .collect();
    ranges.sort();
    let mut merged: Vec<(u128, Option<u128>, usize)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.1.is_none_or(|end| r.0 <= end) => {
                last.1 = match (last.1, r.1) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            _ => merged.push(r),
        }
    }
    let bytes = |v: u128, w: usize| v.to_be_bytes()[16 - w..].to_vec();
    let mut out = Vec::new();
    if let Some(&(first, _, w)) = merged.first()
        && first != 0
    {
        out.push(Wire {
            interval_end: true,
            ..Wire::value(bytes(0, w))
        });
    }
    for (s, e, w) in merged {
        match e {
            Some(e) => {
                out.push(Wire::value(bytes(s, w)));
                out.push(Wire {
                    interval_end: true,
                    ..Wire::value(bytes(e, w))
                });
            }
            None => {
                let mut u = Udata::default();
                u.u32(1, 1);
                out.push(Wire {
                    udata: Some(u.bytes),
                    ..Wire::value(bytes(s, w))
                });
            }
        }
    }
    out
}

/// Encodes a transaction as one batch; message sequence numbers start after `first_seq`.
pub fn batch(tx: &Transaction, first_seq: u32) -> Batch {
    let mut s = Stream::new(&tx.table, first_seq, tx.ops.len());
    for op in &tx.ops {
        s.push(op);
    }
    s.finish()
}

/// A batch encoded one operation at a time, so a large transaction (a full resync) need not
/// exist as typed operations: only its bytes are held. [`batch`] is this over a transaction.
pub struct Stream {
    e: Encoder,
    /// Operations pushed so far (the index of the next one).
    ops: usize,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("ops", &self.ops)
            .field("bytes", &self.e.buf.bytes.len())
            .finish()
    }
}

impl Stream {
    /// An empty batch for `table`; `ops` is a hint of how many operations will come.
    pub fn new(table: &Table, first_seq: u32, ops: usize) -> Stream {
        let mut e = Encoder {
            buf: Buf::with_capacity(64 + ops.min(1 << 23) * 64),
            table: table.clone(),
            seq: first_seq,
            next_set_id: 0,
            origin: Vec::new(),
            last: None,
            new_interval_sets: BTreeSet::new(),
            run: None,
        };
        let begin = e
            .buf
            .begin_msg(BATCH_BEGIN, NLM_F_REQUEST, first_seq, 0, 10);
        e.buf.end_msg(begin);
        Stream { e, ops: 0 }
    }

    /// The operations pushed so far.
    pub fn len(&self) -> usize {
        self.ops
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Appends one operation.
    pub fn push(&mut self, op: &Op) {
        let i = self.ops;
        self.ops += 1;
        let e = &mut self.e;
        if let Op::AddElement(el) | Op::DeleteElement(el) = op {
            let add = matches!(op, Op::AddElement(_));
            let same = e
                .run
                .as_ref()
                .is_some_and(|run| run.add == add && run.set == el.set);
            if !same {
                e.flush_run();
                let new_interval = add && e.new_interval_sets.remove(el.set.as_str());
                e.run = Some(Run {
                    add,
                    set: el.set.clone(),
                    op: i,
                    wires: Vec::new(),
                    new_interval,
                });
            }
            let Some(run) = &mut e.run else {
                return;
            };
            run.wires.extend(element_wire(el, add));
            // A full message's worth is written at once (an interval set's first run waits:
            // nft looks at all of it).
            if run.wires.len() >= ELEMS_PER_MSG && !run.new_interval {
                let wires: Vec<Wire> = run.wires.drain(..ELEMS_PER_MSG).collect();
                let (kind, set, first) = (run.kind(), run.set.clone(), run.op);
                e.elements(first, kind, &set, &wires);
            }
            return;
        }
        e.flush_run();
        let table = e.table.name.clone();
        match op {
            Op::AddTable(t) => e.msg(i, NEWTABLE, 0, |b| {
                b.str(1, &table);
                b.u32(2, 0);
                if let Some(c) = &t.comment {
                    b.attr(6, &Udata::default().str(0, &clean_comment(c)).bytes);
                }
            }),
            Op::DeleteTable => e.msg(i, DELTABLE, 0, |b| b.str(1, &table)),
            Op::AddChain(c) => e.msg(i, NEWCHAIN, NLM_F_CREATE, |b| {
                b.str(1, &table);
                b.str(3, &c.name);
                if let Some(base) = &c.base {
                    b.str(
                        7,
                        match base.chain_type {
                            ChainType::Filter => "filter",
                            ChainType::Nat => "nat",
                        },
                    );
                    b.u32(5, 1); // policy accept
                    b.nest(4, |b| {
                        let hook = match base.hook {
                            Hook::Prerouting => 0,
                            Hook::Input => 1,
                            Hook::Forward => 2,
                            Hook::Output => 3,
                            Hook::Postrouting => 4,
                        };
                        b.u32(1, hook);
                        b.attr(2, &base.priority.to_be_bytes());
                    });
                }
                if let Some(cm) = &c.comment {
                    b.attr(12, &Udata::default().str(0, &clean_comment(cm)).bytes);
                }
            }),
            // Flushing a chain deletes its rules; flushing a set deletes its elements.
            Op::FlushChain(c) => e.named(i, DELRULE, 2, c),
            Op::DeleteChain(c) => e.named(i, DELCHAIN, 3, c),
            Op::AddRule(r) => e.rule(i, r),
            Op::AddSet(s) => {
                if s.interval {
                    e.new_interval_sets.insert(s.name.clone());
                }
                e.add_set(i, &s.name, s.key, false, Some(s), s.comment.as_ref());
            }
            Op::AddMap(m) => {
                e.add_map(i, m);
            }
            Op::FlushSet(s) => e.named(i, DELSETELEM, 2, s),
            Op::DeleteSet(s) => e.named(i, DELSET, 2, s),
            Op::AddElement(_) | Op::DeleteElement(_) => {}
        }
    }

    /// The batch: the operations pushed, between the batch delimiters, the last one asking
    /// for an acknowledgement.
    pub fn finish(mut self) -> Batch {
        let e = &mut self.e;
        e.flush_run();
        if let Some(last) = e.last {
            let flags =
                u16::from_ne_bytes([e.buf.bytes[last + 6], e.buf.bytes[last + 7]]) | NLM_F_ACK;
            e.buf.bytes[last + 6..last + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        let ack_seq = e.seq;
        let end = e.buf.begin_msg(BATCH_END, NLM_F_REQUEST, e.seq + 1, 0, 10);
        e.buf.end_msg(end);
        Batch {
            bytes: std::mem::take(&mut e.buf.bytes),
            origin: std::mem::take(&mut e.origin),
            ack_seq,
        }
    }
}

impl Run {
    fn kind(&self) -> u16 {
        if self.add { NEWSETELEM } else { DELSETELEM }
    }
}

impl Encoder {
    /// Writes the pending run of element operations, if any.
    fn flush_run(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        // nft opens the first elements of an interval set it creates in the same batch with
        // an interval end at address zero (unless a range starts there).
        if run.new_interval {
            let zero = run
                .wires
                .iter()
                .filter(|w| !w.interval_end)
                .all(|w| w.key.iter().any(|b| *b != 0));
            if let (true, Some(first)) = (zero, run.wires.first()) {
                let key = vec![0; first.key.len()];
                run.wires.insert(
                    0,
                    Wire {
                        interval_end: true,
                        ..Wire::value(key)
                    },
                );
            }
        }
        if !run.wires.is_empty() {
            self.elements(run.op, run.kind(), &run.set, &run.wires);
        }
    }
}

impl Encoder {
    /// A message naming the table and one object (its name in attribute `attr`).
    fn named(&mut self, op: usize, kind: u16, attr: u16, name: &str) {
        let table = self.table().to_owned();
        self.msg(op, kind, 0, |b| {
            b.str(1, &table);
            b.str(attr, name);
        });
    }

    fn add_map(&mut self, op: usize, m: &Map) {
        self.add_set(op, &m.name, m.key, true, None, m.comment.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("a prefix")
    }

    #[test]
    fn concatenation_registers_are_nfts() {
        // ipv4_addr . inet_proto . inet_service: reg 1, reg 9, reg 10; ipv6: reg 1, reg 2, reg 13.
        assert_eq!([concat_reg(0), concat_reg(4), concat_reg(8)], [1, 9, 10]);
        assert_eq!([concat_reg(16), concat_reg(20)], [2, 13]);
    }

    #[test]
    fn keys_pad_each_field_to_four_bytes() {
        let k = Key::AddrProtoPort("10.0.0.1".parse().expect("ip"), L4Proto::Tcp, 80);
        assert_eq!(key_bytes(&k), [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(
            key_bytes(&Key::ProtoPort(L4Proto::Sctp, 30000)),
            [132, 0, 0, 0, 0x75, 0x30, 0, 0]
        );
        assert_eq!(key_type(Family::Ip, KeyType::AddrProtoPort), (0x730d, 12));
        assert_eq!(key_type(Family::Ip6, KeyType::AddrProtoPort), (0x830d, 24));
    }

    #[test]
    fn anonymous_intervals_are_merged_and_open_at_zero() {
        let w = anon_elements(&[net("10.1.0.0/16"), net("10.0.0.0/8"), net("1.2.3.4/32")]);
        let keys: Vec<(Vec<u8>, bool)> =
            w.iter().map(|w| (w.key.clone(), w.interval_end)).collect();
        assert_eq!(
            keys,
            [
                (vec![0, 0, 0, 0], true),
                (vec![1, 2, 3, 4], false),
                (vec![1, 2, 3, 5], true),
                (vec![10, 0, 0, 0], false),
                (vec![11, 0, 0, 0], true),
            ]
        );
        // A range reaching the top of the space has no end element, only the open flag.
        let top = anon_elements(&[net("128.0.0.0/1"), net("0.0.0.0/1")]);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].udata.as_deref(), Some(&[1, 4, 1, 0, 0, 0][..]));
        assert_eq!(
            single(&[net("10.0.0.0/8"), net("10.1.2.3/8")]),
            Some(net("10.0.0.0/8"))
        );
    }

    #[test]
    fn a_batch_is_delimited_and_acknowledged_once() {
        let table = Table {
            family: Family::Ip,
            name: "t".into(),
            comment: None,
        };
        let mut tx = Transaction::new(table.clone());
        tx.push(Op::AddTable(table));
        for i in 0..600u16 {
            tx.push(Op::AddElement(Element {
                set: "m".into(),
                key: Key::ProtoPort(L4Proto::Tcp, i),
                verdict: Some(Verdict::Accept),
                target: None,
                comment: None,
            }));
        }
        tx.push(Op::FlushChain("c".into()));
        let b = batch(&tx, 41);
        // begin(41), table(42), 600 elements in 3 messages (43..45), flush(46), end(47).
        assert_eq!(
            b.origin.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [42, 43, 44, 45, 46]
        );
        assert_eq!(
            b.origin[1..4].iter().map(|(_, op)| *op).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert_eq!(b.ack_seq, 46);
        let mut at = 0;
        let mut acks = 0;
        let mut kinds = Vec::new();
        while at < b.bytes.len() {
            let len = u32::from_ne_bytes(b.bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            kinds.push(u16::from_ne_bytes([b.bytes[at + 4], b.bytes[at + 5]]));
            acks += usize::from(
                u16::from_ne_bytes([b.bytes[at + 6], b.bytes[at + 7]]) & NLM_F_ACK != 0,
            );
            at += len;
        }
        assert_eq!(at, b.bytes.len());
        assert_eq!(
            kinds,
            [
                BATCH_BEGIN,
                NEWTABLE,
                NEWSETELEM,
                NEWSETELEM,
                NEWSETELEM,
                DELRULE,
                BATCH_END
            ]
        );
        assert_eq!(acks, 1);
    }
}
