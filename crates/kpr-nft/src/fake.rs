//! `Fake`: an in-memory nftables as strict as the kernel, for tests and `--dry-run`.
//!
//! A transaction is applied to a copy and swapped in only if every operation and the final
//! validation succeed (the kernel's all-or-nothing commit). It refuses what the kernel refuses:
//! missing objects (ENOENT), deleting a chain that has rules or is referenced (EBUSY), a jump or
//! map element to a missing chain, a reference to a missing set or map, an element of the wrong
//! key type, a changed verdict for an existing map key (EEXIST). `dump()` prints the table in
//! `nft list table` form, normalised by [`normalize`] so it compares with the kernel's listing.

use crate::objects::*;
use crate::text;
use crate::transaction::{Op, Transaction};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Why a transaction was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("no such {kind} {name:?}")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} is in use: {why}")]
    Busy {
        kind: &'static str,
        name: String,
        why: String,
    },
    #[error("{kind} {name:?} exists with other properties")]
    Exists { kind: &'static str, name: String },
    #[error("invalid {kind} {name:?}: {why}")]
    Invalid {
        kind: &'static str,
        name: String,
        why: String,
    },
    /// The kernel refused the transaction, so nothing of it was applied. `op` is the `nft`
    /// line of the operation it named (or what else it refused, such as the whole batch).
    #[error(
        "the kernel refused `{op}`: {} ({})",
        crate::refusal::explain(*errno),
        crate::refusal::label(*errno)
    )]
    Refused { errno: i32, op: String },
    #[error("nft failed: {0}")]
    Kernel(String),
    #[error("could not run nft: {0}")]
    Spawn(String),
}

impl ApplyError {
    /// The error number the kernel gives (or, from the fake, would give) for this refusal.
    pub fn errno(&self) -> Option<i32> {
        use crate::refusal::Errno;
        Some(match self {
            ApplyError::Refused { errno, .. } => *errno,
            ApplyError::NotFound { .. } => Errno::NOENT.raw_os_error(),
            ApplyError::Busy { .. } => Errno::BUSY.raw_os_error(),
            ApplyError::Exists { .. } => Errno::EXIST.raw_os_error(),
            ApplyError::Invalid { .. } => Errno::INVAL.raw_os_error(),
            ApplyError::Kernel(_) | ApplyError::Spawn(_) => return None,
        })
    }
}

fn nf(kind: &'static str, name: &str) -> ApplyError {
    ApplyError::NotFound {
        kind,
        name: name.to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SetKind {
    Set(Set),
    Map(Map),
}

impl SetKind {
    fn key(&self) -> KeyType {
        match self {
            SetKind::Set(s) => s.key,
            SetKind::Map(m) => m.key,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TableState {
    comment: Option<String>,
    /// Sets and maps in creation order, with their elements.
    sets: Vec<(String, SetKind, BTreeMap<Key, Element>)>,
    /// Chains in creation order, with their rules.
    chains: Vec<(Chain, Vec<Rule>)>,
}

impl TableState {
    fn chain_mut(&mut self, name: &str) -> Result<&mut (Chain, Vec<Rule>), ApplyError> {
        self.chains
            .iter_mut()
            .find(|(c, _)| c.name == name)
            .ok_or_else(|| nf("chain", name))
    }
    fn set_mut(
        &mut self,
        name: &str,
    ) -> Result<&mut (String, SetKind, BTreeMap<Key, Element>), ApplyError> {
        self.sets
            .iter_mut()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| nf("set", name))
    }
    fn chain_refs(&self, name: &str) -> Option<String> {
        let by_rule = self
            .chains
            .iter()
            .flat_map(|(_, rs)| rs)
            .find(|r| r.targets().any(|t| t == name));
        if let Some(r) = by_rule {
            return Some(format!("a rule in {}", r.chain));
        }
        self.sets.iter().find_map(|(s, _, els)| {
            els.values()
                .any(|e| matches!(&e.verdict, Some(Verdict::Jump(c) | Verdict::Goto(c)) if c == name))
                .then(|| format!("an element of {s}"))
        })
    }
}

/// Sets a rule reads or writes.
fn rule_sets(r: &Rule) -> impl Iterator<Item = &str> {
    let m = r.matches.iter().filter_map(|m| match m {
        Match::InSet { set, .. } | Match::PairInSet { set } => Some(set.as_str()),
        _ => None,
    });
    let s = r.statements.iter().filter_map(|s| match s {
        Statement::Vmap { map, .. }
        | Statement::DnatMap { map, .. }
        | Statement::DnatVipMap { map, .. } => Some(map.as_str()),
        Statement::UpdateSaddr { set } => Some(set.as_str()),
        _ => None,
    });
    m.chain(s)
}

/// An in-memory nftables.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    tables: BTreeMap<(Family, String), TableState>,
}

impl Fake {
    /// Applies a transaction all or nothing.
    pub fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        let key = (tx.table.family, tx.table.name.clone());
        let mut table = self.tables.get(&key).cloned();
        for op in &tx.ops {
            apply_op(&mut table, tx, op)?;
        }
        if let Some(t) = &table {
            validate(t, tx.table.family)?;
        }
        match table {
            Some(t) => self.tables.insert(key, t),
            None => self.tables.remove(&key),
        };
        Ok(())
    }

    pub fn has_table(&self, family: Family, name: &str) -> bool {
        self.tables.contains_key(&(family, name.to_owned()))
    }

    /// Rules of a chain (empty when the chain or table is missing).
    pub fn rules(&self, family: Family, table: &str, chain: &str) -> &[Rule] {
        self.tables
            .get(&(family, table.to_owned()))
            .and_then(|t| t.chains.iter().find(|(c, _)| c.name == chain))
            .map_or(&[], |(_, r)| r.as_slice())
    }

    /// All chains of a table, in creation order.
    pub fn chains(&self, family: Family, table: &str) -> Vec<Chain> {
        self.tables
            .get(&(family, table.to_owned()))
            .map(|t| t.chains.iter().map(|(c, _)| c.clone()).collect())
            .unwrap_or_default()
    }

    /// The verdict of a map element.
    pub fn map_get(&self, family: Family, table: &str, map: &str, key: &Key) -> Option<Verdict> {
        let t = self.tables.get(&(family, table.to_owned()))?;
        let (_, _, els) = t.sets.iter().find(|(n, _, _)| n == map)?;
        els.get(key)?.verdict.clone()
    }

    /// Whether an address is in a set (by address or prefix).
    pub fn set_contains(&self, family: Family, table: &str, set: &str, ip: IpAddr) -> bool {
        let Some(t) = self.tables.get(&(family, table.to_owned())) else {
            return false;
        };
        t.sets
            .iter()
            .filter(|(n, _, _)| n == set)
            .flat_map(|(_, _, els)| els.keys())
            .any(|k| match k {
                Key::Addr(a) => *a == ip,
                Key::Net(n) => n.contains(&ip),
                _ => false,
            })
    }

    /// The tables as `nft list table` prints them.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        for ((family, name), t) in &self.tables {
            out.push_str(&dump_table(*family, name, t));
        }
        out
    }

    /// The listing normalised (see [`normalize`]): what tests compare with the kernel.
    pub fn dump(&self) -> String {
        normalize(&self.listing())
    }
}

fn apply_op(table: &mut Option<TableState>, tx: &Transaction, op: &Op) -> Result<(), ApplyError> {
    let tname = &tx.table.name;
    if let Op::AddTable(t) = op {
        table.get_or_insert_with(|| TableState {
            comment: t.comment.clone(),
            ..TableState::default()
        });
        return Ok(());
    }
    if let Op::DeleteTable = op {
        return table.take().map(|_| ()).ok_or_else(|| nf("table", tname));
    }
    let t = table.as_mut().ok_or_else(|| nf("table", tname))?;
    match op {
        Op::AddTable(_) | Op::DeleteTable => {}
        Op::AddChain(c) => {
            if !text::valid_name(&c.name) {
                return Err(ApplyError::Invalid {
                    kind: "chain",
                    name: c.name.clone(),
                    why: "not a valid nftables name".into(),
                });
            }
            match t.chains.iter().find(|(x, _)| x.name == c.name) {
                Some((x, _)) if x.base != c.base => {
                    return Err(ApplyError::Exists {
                        kind: "chain",
                        name: c.name.clone(),
                    });
                }
                Some(_) => {}
                None => t.chains.push((c.clone(), Vec::new())),
            }
        }
        Op::FlushChain(c) => t.chain_mut(c)?.1.clear(),
        Op::DeleteChain(c) => {
            if !t.chain_mut(c)?.1.is_empty() {
                return Err(ApplyError::Busy {
                    kind: "chain",
                    name: c.clone(),
                    why: "it has rules".into(),
                });
            }
            if let Some(why) = t.chain_refs(c) {
                return Err(ApplyError::Busy {
                    kind: "chain",
                    name: c.clone(),
                    why: format!("referenced by {why}"),
                });
            }
            t.chains.retain(|(x, _)| x.name != *c);
        }
        Op::AddRule(r) => t.chain_mut(&r.chain)?.1.push(r.clone()),
        Op::AddSet(s) => add_set(t, &s.name, SetKind::Set(s.clone()))?,
        Op::AddMap(m) => add_set(t, &m.name, SetKind::Map(m.clone()))?,
        Op::FlushSet(s) => t.set_mut(s)?.2.clear(),
        Op::DeleteSet(s) => {
            t.set_mut(s)?;
            if let Some(r) = t
                .chains
                .iter()
                .flat_map(|(_, rs)| rs)
                .find(|r| rule_sets(r).any(|x| x == s))
            {
                return Err(ApplyError::Busy {
                    kind: "set",
                    name: s.clone(),
                    why: format!("used by a rule in {}", r.chain),
                });
            }
            t.sets.retain(|(n, _, _)| n != s);
        }
        Op::AddElement(e) => {
            let (_, kind, els) = t.set_mut(&e.set)?;
            check_key(kind, e, tx.table.family)?;
            match els.get(&e.key) {
                Some(old) if old.verdict != e.verdict || old.target != e.target => {
                    return Err(ApplyError::Exists {
                        kind: "element",
                        name: text::key(&e.key),
                    });
                }
                Some(_) => {}
                None => {
                    els.insert(e.key, e.clone());
                }
            }
        }
        Op::DeleteElement(e) => {
            let (_, _, els) = t.set_mut(&e.set)?;
            els.remove(&e.key)
                .ok_or_else(|| nf("element", &text::key(&e.key)))?;
        }
    }
    Ok(())
}

fn add_set(t: &mut TableState, name: &str, kind: SetKind) -> Result<(), ApplyError> {
    if !text::valid_name(name) {
        return Err(ApplyError::Invalid {
            kind: "set",
            name: name.to_owned(),
            why: "not a valid nftables name".into(),
        });
    }
    match t.sets.iter().find(|(n, _, _)| n == name) {
        Some((_, k, _)) if *k != kind => Err(ApplyError::Exists {
            kind: "set",
            name: name.to_owned(),
        }),
        Some(_) => Ok(()),
        None => {
            t.sets.push((name.to_owned(), kind, BTreeMap::new()));
            Ok(())
        }
    }
}

fn check_key(kind: &SetKind, e: &Element, family: Family) -> Result<(), ApplyError> {
    let fam_ok = |ip: &IpAddr| {
        matches!(
            (family, ip),
            (Family::Ip, IpAddr::V4(_)) | (Family::Ip6, IpAddr::V6(_))
        )
    };
    let ok = match (kind.key(), &e.key) {
        (KeyType::Addr, Key::Addr(a)) => fam_ok(a),
        (KeyType::Addr, Key::Net(n)) => {
            matches!(kind, SetKind::Set(s) if s.interval) && fam_ok(&n.addr())
        }
        (KeyType::AddrProtoPort, Key::AddrProtoPort(a, _, _)) => fam_ok(a),
        (KeyType::ProtoPort, Key::ProtoPort(_, _)) => true,
        (KeyType::AddrPair, Key::AddrPair(a, b)) => fam_ok(a) && fam_ok(b),
        (KeyType::Bucket(_), Key::Bucket(_)) => e.target.is_some_and(|t| fam_ok(&t.ip())),
        (KeyType::VipBucket(_), Key::VipBucket(a, _, _)) => {
            fam_ok(a) && e.target.is_some_and(|t| fam_ok(&t.ip()))
        }
        _ => false,
    } && match kind {
        SetKind::Map(m) if m.key.is_endpoint_map() => e.verdict.is_none(),
        SetKind::Map(_) => e.verdict.is_some() && e.target.is_none(),
        SetKind::Set(_) => e.verdict.is_none() && e.target.is_none(),
    };
    if ok {
        Ok(())
    } else {
        Err(ApplyError::Invalid {
            kind: "element",
            name: text::key(&e.key),
            why: format!("does not fit set {}", e.set),
        })
    }
}

/// The kernel's commit-time checks: every jump target and every referenced set exists.
fn validate(t: &TableState, _family: Family) -> Result<(), ApplyError> {
    let chain_exists = |n: &str| t.chains.iter().any(|(c, _)| c.name == n);
    for (chain, rules) in &t.chains {
        for r in rules {
            for target in r.targets() {
                if !chain_exists(target) {
                    return Err(nf("chain", target));
                }
                if t.chains
                    .iter()
                    .any(|(c, _)| c.name == target && c.base.is_some())
                {
                    return Err(ApplyError::Invalid {
                        kind: "rule",
                        name: chain.name.clone(),
                        why: format!("jumps to base chain {target}"),
                    });
                }
            }
            for s in rule_sets(r) {
                if !t.sets.iter().any(|(n, _, _)| n == s) {
                    return Err(nf("set", s));
                }
            }
            for st in &r.statements {
                let (name, ok): (&str, fn(&SetKind) -> bool) = match st {
                    Statement::Vmap { map, .. } => (
                        map,
                        |k| matches!(k, SetKind::Map(m) if !m.key.is_endpoint_map()),
                    ),
                    Statement::DnatMap { map, .. } => (
                        map,
                        |k| matches!(k, SetKind::Map(m) if matches!(m.key, KeyType::Bucket(_))),
                    ),
                    Statement::DnatVipMap { map, .. } => (
                        map,
                        |k| matches!(k, SetKind::Map(m) if matches!(m.key, KeyType::VipBucket(_))),
                    ),
                    _ => continue,
                };
                if t.sets.iter().any(|(n, k, _)| n == name && !ok(k)) {
                    return Err(ApplyError::Invalid {
                        kind: "rule",
                        name: chain.name.clone(),
                        why: format!("map {name} has the wrong kind of value"),
                    });
                }
            }
        }
    }
    for (s, _, els) in &t.sets {
        for e in els.values() {
            if let Some(Verdict::Jump(c) | Verdict::Goto(c)) = &e.verdict
                && !chain_exists(c)
            {
                return Err(ApplyError::Busy {
                    kind: "element",
                    name: s.clone(),
                    why: format!("points to missing chain {c}"),
                });
            }
        }
    }
    Ok(())
}

fn dump_table(family: Family, name: &str, t: &TableState) -> String {
    let mut out = format!("table {} {name} {{\n", family.as_str());
    if let Some(c) = &t.comment {
        out.push_str(&format!("\tcomment {}\n", text::quote(c)));
    }
    let mut blocks = Vec::new();
    for (n, kind, els) in &t.sets {
        let mut b = format!(
            "\t{} {n} {{\n",
            if matches!(kind, SetKind::Map(_)) {
                "map"
            } else {
                "set"
            }
        );
        let addr = if family == Family::Ip {
            "ipv4_addr"
        } else {
            "ipv6_addr"
        };
        let ty = match kind.key() {
            KeyType::Addr => addr.to_owned(),
            KeyType::AddrProtoPort => format!("{addr} . inet_proto . inet_service"),
            KeyType::ProtoPort => "inet_proto . inet_service".to_owned(),
            KeyType::AddrPair => format!("{addr} . {addr}"),
            KeyType::Bucket(_) | KeyType::VipBucket(_) => String::new(),
        };
        let (verdict, interval, timeout, comment) = match kind {
            SetKind::Set(s) => ("", s.interval, s.timeout, s.comment.as_ref()),
            SetKind::Map(m) => (" : verdict", false, None, m.comment.as_ref()),
        };
        if let Some(t) = text::endpoint_map_typeof(family, kind.key()) {
            b.push_str(&format!("\t\t{t}\n"));
        } else {
            b.push_str(&format!("\t\ttype {ty}{verdict}\n"));
        }
        if timeout.is_some() {
            b.push_str("\t\tsize 65535\n\t\tflags dynamic,timeout\n");
            b.push_str(&format!(
                "\t\ttimeout {}\n",
                go_like_duration(timeout.unwrap_or(0))
            ));
        }
        if interval {
            b.push_str("\t\tflags interval\n");
        }
        if let Some(c) = comment {
            b.push_str(&format!("\t\tcomment {}\n", text::quote(c)));
        }
        if !els.is_empty() {
            let items: Vec<String> = els.values().map(text::element).collect();
            b.push_str(&format!(
                "\t\telements = {{ {} }}\n",
                items.join(",\n\t\t\t     ")
            ));
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    for (c, rules) in &t.chains {
        let mut b = format!("\tchain {} {{\n", c.name);
        if let Some(cm) = &c.comment {
            b.push_str(&format!("\t\tcomment {}\n", text::quote(cm)));
        }
        if let Some(base) = &c.base {
            b.push_str(&format!("\t\t{}\n", text::base_decl(base, true)));
        }
        for r in rules {
            b.push_str(&format!("\t\t{}\n", text::rule(r, family, true)));
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    out.push_str(&blocks.join("\n"));
    out.push_str("}\n");
    out
}

/// nft's timeout spelling: `3h`, `10m`, `1h30m`, `45s`.
fn go_like_duration(secs: u32) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Normalises a listing so the fake's dump and the kernel's listing compare: element lists
/// (which the kernel prints in hash order, wrapped) become one sorted `element` line each;
/// leading and trailing whitespace of every line is dropped; the sets, maps and chains of a
/// table are sorted by name (their creation order has no meaning). Rules and their order
/// within a chain are kept verbatim.
pub fn normalize(listing: &str) -> String {
    let lines = flatten_elements(listing);
    let mut out = Vec::new();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut depth = 0;
    for line in lines {
        let opens = line.ends_with('{');
        let closes = line == "}";
        match (depth, opens, closes) {
            (1, true, _) => {
                blocks.push(vec![line]);
                depth = 2;
            }
            (2, _, true) => {
                if let Some(b) = blocks.last_mut() {
                    b.push(line);
                }
                depth = 1;
            }
            (2, _, _) => {
                if let Some(b) = blocks.last_mut() {
                    b.push(line);
                }
            }
            (1, _, true) => {
                blocks.sort();
                out.extend(blocks.drain(..).flatten());
                out.push(line);
                depth = 0;
            }
            (0, true, _) => {
                out.push(line);
                depth = 1;
            }
            _ => out.push(line),
        }
    }
    out.join("\n") + "\n"
}

fn flatten_elements(listing: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = listing.lines().map(str::trim).filter(|l| !l.is_empty());
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("elements = {") else {
            out.push(line.to_owned());
            continue;
        };
        let mut body = rest.to_owned();
        while !body.trim_end().ends_with('}') {
            match lines.next() {
                Some(more) => {
                    body.push(' ');
                    body.push_str(more);
                }
                None => break,
            }
        }
        let body = body.trim().trim_end_matches('}');
        let mut items: Vec<String> = body
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        items.sort();
        out.extend(items.into_iter().map(|i| format!("element {i}")));
    }
    out
}
