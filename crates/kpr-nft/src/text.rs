//! Canonical nftables text: the `nft -f` script of a transaction, and the listing form
//! (`nft list table`, as nft 1.0.6 prints it) of rules and objects.
//!
//! User-derived strings (comments, interface names) are reduced to a safe alphabet before they
//! reach rule text; names are checked by `validate_name`. So no Kubernetes object can inject
//! nftables syntax.

use crate::objects::*;
use crate::transaction::{Op, Transaction};
use ipnet::IpNet;
use std::fmt::Write;
use std::net::IpAddr;

/// Longest comment nft accepts (NFT_USERDATA_MAXLEN is 256; nft limits comments to 128).
pub const MAX_COMMENT: usize = 128;

/// A comment reduced to `[A-Za-z0-9 ./:_-]`, other characters replaced by `_`, at most
/// [`MAX_COMMENT`] characters: what both executors store, so listings compare.
pub fn clean_comment(s: &str) -> String {
    s.chars()
        .take(MAX_COMMENT)
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ./:_-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// [`clean_comment`], quoted.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", clean_comment(s))
}

/// An interface name reduced to `[A-Za-z0-9._-]`, at most 15 characters (IFNAMSIZ - 1).
pub fn clean_ifname(name: &str) -> String {
    name.chars()
        .take(15)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether a chain, set or map name is one nft accepts unquoted: `[A-Za-z_][A-Za-z0-9_./-]*`,
/// at most 255 bytes.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 255
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
}

fn fam(f: Family) -> &'static str {
    match f {
        Family::Ip => "ip",
        Family::Ip6 => "ip6",
    }
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::Ip => "ipv4_addr",
        Family::Ip6 => "ipv6_addr",
    }
}

fn key_type(f: Family, k: KeyType) -> String {
    match k {
        KeyType::Addr => addr_type(f).to_owned(),
        KeyType::AddrProtoPort => format!("{} . inet_proto . inet_service", addr_type(f)),
        KeyType::ProtoPort => "inet_proto . inet_service".to_owned(),
        KeyType::AddrPair => format!("{} . {}", addr_type(f), addr_type(f)),
        KeyType::Bucket(_) | KeyType::VipBucket(_) => "integer".to_owned(),
    }
}

/// The declaration of an endpoint map's key and value.
pub(crate) fn bucket_typeof(f: Family, p: L4Proto) -> String {
    format!(
        "typeof numgen random mod {BUCKETS} : {} daddr . {} dport",
        fam(f),
        p.as_str()
    )
}

/// The declaration of a [`KeyType::VipBucket`] endpoint map's key and value.
pub(crate) fn vip_bucket_typeof(f: Family, p: L4Proto) -> String {
    let (ip, th) = (fam(f), p.as_str());
    format!(
        "typeof {ip} daddr . {th} dport . numgen random mod {BUCKETS} : {ip} daddr . {th} dport"
    )
}

/// The declaration of an endpoint map (either kind), `None` for other key types.
pub(crate) fn endpoint_map_typeof(f: Family, k: KeyType) -> Option<String> {
    match k {
        KeyType::Bucket(p) => Some(bucket_typeof(f, p)),
        KeyType::VipBucket(p) => Some(vip_bucket_typeof(f, p)),
        _ => None,
    }
}

/// A DNAT target as an endpoint map value (`10.0.0.1 . 8080`).
pub fn target(t: &std::net::SocketAddr) -> String {
    format!("{} . {}", t.ip(), t.port())
}

/// An address or prefix as nft prints it (host prefixes without a length).
pub fn net(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.trunc().to_string()
    }
}

/// A set or map key.
pub fn key(k: &Key) -> String {
    match k {
        Key::Addr(a) => a.to_string(),
        Key::Net(n) => net(n),
        Key::AddrProtoPort(a, p, port) => format!("{a} . {} . {port}", p.as_str()),
        Key::ProtoPort(p, port) => format!("{} . {port}", p.as_str()),
        Key::AddrPair(a, b) => format!("{a} . {b}"),
        Key::Bucket(b) => b.to_string(),
        Key::VipBucket(a, port, b) => format!("{a} . {port} . {b}"),
    }
}

/// An element as it appears inside `{ }`.
pub fn element(e: &Element) -> String {
    let mut s = key(&e.key);
    if let Some(c) = &e.comment {
        let _ = write!(s, " comment {}", quote(c));
    }
    if let Some(v) = &e.verdict {
        let _ = write!(s, " : {v}");
    }
    if let Some(t) = &e.target {
        let _ = write!(s, " : {}", target(t));
    }
    s
}

fn priority(hook: Hook, p: i32) -> String {
    let (name, base) = match hook {
        Hook::Prerouting => ("dstnat", priority::DSTNAT),
        Hook::Postrouting => ("srcnat", priority::SRCNAT),
        _ if p == priority::FILTER => return "filter".to_owned(),
        _ => return p.to_string(),
    };
    match p - base {
        0 => name.to_owned(),
        d if d > 0 => format!("{name} + {d}"),
        d => format!("{name} - {}", -d),
    }
}

fn hook_name(h: Hook) -> &'static str {
    match h {
        Hook::Prerouting => "prerouting",
        Hook::Input => "input",
        Hook::Forward => "forward",
        Hook::Output => "output",
        Hook::Postrouting => "postrouting",
    }
}

/// A base chain's declaration line (`type nat hook output priority -100; policy accept;`).
pub fn base_decl(b: &BaseChain, listing: bool) -> String {
    let t = match b.chain_type {
        ChainType::Filter => "filter",
        ChainType::Nat => "nat",
    };
    let prio = if listing {
        priority(b.hook, b.priority)
    } else {
        b.priority.to_string()
    };
    format!(
        "type {t} hook {} priority {prio}; policy accept;",
        hook_name(b.hook)
    )
}

/// A rule's body (matches, statements, comment). `listing` selects nft's output spelling where
/// it differs from what we feed it (only `numgen`).
pub fn rule(r: &Rule, f: Family, listing: bool) -> String {
    let ip = fam(f);
    let a = |x: &Addr| match x {
        Addr::Saddr => format!("{ip} saddr"),
        Addr::Daddr => format!("{ip} daddr"),
    };
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < r.matches.len() {
        let m = &r.matches[i];
        parts.push(match m {
            Match::Net {
                addr,
                negate,
                net: n,
            } => format!("{} {}{}", a(addr), if *negate { "!= " } else { "" }, net(n)),
            Match::InSet { addr, negate, set } => {
                format!("{} {}@{set}", a(addr), if *negate { "!= " } else { "" })
            }
            Match::NotInNets { addr, nets } => {
                let mut sorted: Vec<&IpNet> = nets.iter().collect();
                sorted.sort();
                let items: Vec<String> = sorted.iter().map(|n| net(n)).collect();
                // nft prints a one-element anonymous set without braces.
                match items.as_slice() {
                    [one] => format!("{} != {one}", a(addr)),
                    _ => format!("{} != {{ {} }}", a(addr), items.join(", ")),
                }
            }
            Match::L4Proto(p) => {
                if let Some(Match::Dport(port)) = r.matches.get(i + 1) {
                    i += 1;
                    format!("{} dport {port}", p.as_str())
                } else if listing
                    && r.statements
                        .iter()
                        .any(|s| matches!(s, Statement::DnatVipMap { proto, .. } if proto == p))
                {
                    // nft lists the match as the dependency of the key's `tcp dport`.
                    i += 1;
                    continue;
                } else {
                    format!("meta l4proto {}", p.as_str())
                }
            }
            Match::Dport(port) => format!("th dport {port}"),
            Match::FibLocal(addr) => format!(
                "fib {} type local",
                if *addr == Addr::Saddr {
                    "saddr"
                } else {
                    "daddr"
                }
            ),
            Match::IifName {
                name,
                prefix,
                negate,
            } => {
                let clean = clean_ifname(name);
                format!(
                    "iifname {}\"{clean}{}\"",
                    if *negate { "!= " } else { "" },
                    if *prefix { "*" } else { "" }
                )
            }
            Match::MarkClear(b) => format!("meta mark & {b:#010x} == 0x00000000"),
            Match::RandomOneIn(n) => {
                if listing {
                    format!("numgen random mod {n} 0")
                } else {
                    format!("numgen random mod {n} == 0")
                }
            }
            Match::CtStateNew => "ct state new".to_owned(),
            Match::CtStatusDnat => "ct status dnat".to_owned(),
            Match::PairInSet { set } => format!("{ip} saddr . {ip} daddr @{set}"),
        });
        i += 1;
    }
    for s in &r.statements {
        parts.push(match s {
            Statement::Vmap {
                key: KeyType::ProtoPort,
                map,
            } => format!("meta l4proto . th dport vmap @{map}"),
            Statement::Vmap {
                key: KeyType::Addr,
                map,
            } => format!("{ip} daddr vmap @{map}"),
            Statement::Vmap {
                key: KeyType::AddrProtoPort,
                map,
            } => format!("{ip} daddr . meta l4proto . th dport vmap @{map}"),
            Statement::Vmap {
                key: KeyType::AddrPair,
                map,
            } => format!("{ip} saddr . {ip} daddr vmap @{map}"),
            Statement::Vmap {
                key: KeyType::Bucket(_),
                map,
            } => format!("numgen random mod {BUCKETS} vmap @{map}"),
            // nft lists the map's value type without naming its fields.
            Statement::DnatMap {
                map,
                offset,
                modulus,
            } => format!(
                "dnat {ip}{} to numgen random mod {modulus}{} map @{map}",
                if listing { "" } else { " addr . port" },
                if *offset == 0 {
                    String::new()
                } else {
                    format!(" offset {offset}")
                }
            ),
            Statement::Vmap {
                key: KeyType::VipBucket(_),
                map,
            } => format!("numgen random mod {BUCKETS} vmap @{map}"),
            Statement::DnatVipMap {
                map,
                proto,
                modulus,
            } => format!(
                "dnat {ip}{} to {ip} daddr . {} dport . numgen random mod {modulus} map @{map}",
                if listing { "" } else { " addr . port" },
                proto.as_str()
            ),
            Statement::MarkOr(b) => format!("meta mark set meta mark | {b:#010x}"),
            Statement::MarkXor(b) => format!("meta mark set meta mark ^ {b:#010x}"),
            Statement::UpdateSaddr { set } => format!("update @{set} {{ {ip} saddr }}"),
            Statement::Masquerade => "masquerade fully-random".to_owned(),
            Statement::Dnat {
                addr: IpAddr::V4(v4),
                port,
            } => format!("dnat to {v4}:{port}"),
            Statement::Dnat {
                addr: IpAddr::V6(v6),
                port,
            } => format!("dnat to [{v6}]:{port}"),
            Statement::Reject => "reject".to_owned(),
            Statement::Verdict(v) => v.to_string(),
        });
    }
    if let Some(c) = &r.comment {
        parts.push(format!("comment {}", quote(c)));
    }
    parts.join(" ")
}

fn set_body(
    f: Family,
    key: KeyType,
    verdict: bool,
    interval: bool,
    timeout: Option<u32>,
    comment: Option<&String>,
) -> String {
    let mut b = if let Some(t) = endpoint_map_typeof(f, key) {
        format!("{t} ;")
    } else {
        format!(
            "type {}{} ;",
            key_type(f, key),
            if verdict { " : verdict" } else { "" }
        )
    };
    if interval {
        b.push_str(" flags interval ;");
    }
    if let Some(t) = timeout {
        let _ = write!(b, " flags dynamic,timeout ; timeout {t}s ;");
    }
    if let Some(c) = comment {
        let _ = write!(b, " comment {} ;", quote(c));
    }
    b
}

/// The `nft -f` script of a transaction: one command per line.
pub fn script(tx: &Transaction) -> String {
    let f = tx.table.family;
    let t = format!("{} {}", fam(f), tx.table.name);
    let mut out = String::new();
    for op in &tx.ops {
        let _ = match op {
            Op::AddTable(table) => match &table.comment {
                Some(c) => writeln!(out, "add table {t} {{ comment {} ; }}", quote(c)),
                None => writeln!(out, "add table {t}"),
            },
            Op::DeleteTable => writeln!(out, "delete table {t}"),
            Op::AddChain(c) => {
                let mut body = c
                    .base
                    .map(|b| base_decl(&b, false).replace(';', " ;"))
                    .unwrap_or_default();
                if let Some(cm) = &c.comment {
                    let _ = write!(
                        body,
                        "{}comment {} ;",
                        if body.is_empty() { "" } else { " " },
                        quote(cm)
                    );
                }
                if body.is_empty() {
                    writeln!(out, "add chain {t} {}", c.name)
                } else {
                    writeln!(out, "add chain {t} {} {{ {body} }}", c.name)
                }
            }
            Op::FlushChain(c) => writeln!(out, "flush chain {t} {c}"),
            Op::DeleteChain(c) => writeln!(out, "delete chain {t} {c}"),
            Op::AddRule(r) => writeln!(out, "add rule {t} {} {}", r.chain, rule(r, f, false)),
            Op::AddSet(s) => writeln!(
                out,
                "add set {t} {} {{ {} }}",
                s.name,
                set_body(f, s.key, false, s.interval, s.timeout, s.comment.as_ref())
            ),
            Op::AddMap(m) => writeln!(
                out,
                "add map {t} {} {{ {} }}",
                m.name,
                set_body(f, m.key, true, false, None, m.comment.as_ref())
            ),
            Op::FlushSet(s) => writeln!(out, "flush set {t} {s}"),
            Op::DeleteSet(s) => writeln!(out, "delete set {t} {s}"),
            Op::AddElement(e) => writeln!(out, "add element {t} {} {{ {} }}", e.set, element(e)),
            Op::DeleteElement(e) => {
                writeln!(out, "delete element {t} {} {{ {} }}", e.set, key(&e.key))
            }
        };
    }
    out
}

impl Transaction {
    /// The `nft` script line of operation `op` (to name what the kernel refused).
    pub fn describe(&self, op: usize) -> String {
        let one = Transaction {
            table: self.table.clone(),
            ops: self.ops.get(op).cloned().into_iter().collect(),
        };
        script(&one).trim_end().to_owned()
    }
}
