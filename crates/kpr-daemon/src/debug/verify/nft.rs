//! `nft list table` listings, parsed into their objects and compared object by object, rule by
//! rule and element by element. Pure.
//!
//! The parser reads what nft prints (and what `kpr_nft::Fake::listing` prints, the same text):
//! `table FAMILY NAME {`, then per object `chain|set|map NAME {` ... `}`. A chain's body is its
//! declaration lines (`comment "..."`, `type ... hook ... priority ...; policy ...;`) and one
//! rule per line; a set's or map's body is its declaration lines and `elements = { a, b, ... }`,
//! which the kernel wraps over lines and prints in hash order. Elements are compared as a set,
//! keyed by their key (`172.30.0.10 . tcp . 80`), so a map element pointing elsewhere is one
//! "different" element. Elements of dynamic sets (`flags dynamic,timeout`: session affinity)
//! are traffic's, not ours, and are not compared.

use super::{Kind, seq_diff};
use kpr_nft::{Fake, Key, Op, Transaction, text};
use std::collections::BTreeMap;

/// One table of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableListing {
    /// `ip` or `ip6`.
    pub family: String,
    pub name: String,
    /// Lines of the table itself (`comment "..."`).
    pub header: Vec<String>,
    /// By (kind, name): `("chain", "services")`, `("map", "service-ips")`.
    pub objects: BTreeMap<(String, String), Object>,
}

/// A chain, set or map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Object {
    /// Declaration lines: `type ...`, `flags ...`, `comment ...`, a base chain's hook line.
    pub header: Vec<String>,
    /// A chain's rules, in order.
    pub rules: Vec<String>,
    /// A set's or map's elements, as printed.
    pub elements: Vec<String>,
}

impl Object {
    /// A base chain (it has a hook: every packet of that hook runs through it).
    pub fn is_base(&self) -> bool {
        self.header
            .iter()
            .any(|h| h.starts_with("type ") && h.contains(" hook "))
    }

    /// Elements added by traffic, not by us (`update @set`): a set with timeouts.
    pub fn is_dynamic(&self) -> bool {
        self.header
            .iter()
            .any(|h| h.starts_with("flags ") && (h.contains("dynamic") || h.contains("timeout")))
    }

    fn size(&self, kind: &str) -> String {
        match kind {
            "chain" => plural(self.rules.len(), "rule"),
            _ => plural(self.elements.len(), "element"),
        }
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Parses a listing of one or more tables.
pub fn parse(text: &str) -> Result<Vec<TableListing>, String> {
    let mut tables = Vec::new();
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    while let Some(line) = lines.next() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [t, family, name, "{"] = words.as_slice() else {
            return Err(format!("expected `table FAMILY NAME {{`, found {line:?}"));
        };
        if *t != "table" {
            return Err(format!("expected `table FAMILY NAME {{`, found {line:?}"));
        }
        let mut table = TableListing {
            family: (*family).to_owned(),
            name: (*name).to_owned(),
            ..TableListing::default()
        };
        loop {
            let line = lines
                .next()
                .ok_or_else(|| format!("table {family} {name}: no closing brace"))?;
            if line == "}" {
                break;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [kind, obj, "{"] => {
                    let o = parse_object(&mut lines, kind, obj)?;
                    table
                        .objects
                        .insert(((*kind).to_owned(), (*obj).to_owned()), o);
                }
                _ => table.header.push(line.to_owned()),
            }
        }
        tables.push(table);
    }
    Ok(tables)
}

fn parse_object<'a>(
    lines: &mut impl Iterator<Item = &'a str>,
    kind: &str,
    name: &str,
) -> Result<Object, String> {
    let mut o = Object::default();
    loop {
        let line = lines
            .next()
            .ok_or_else(|| format!("{kind} {name}: no closing brace"))?;
        if line == "}" {
            return Ok(o);
        }
        if let Some(rest) = line.strip_prefix("elements = {") {
            // One pass over the list, however many lines the kernel wraps it on.
            let mut scan = ElementScan::default();
            let mut part = rest;
            while !scan.feed(part, &mut o.elements) {
                part = lines
                    .next()
                    .ok_or_else(|| format!("{kind} {name}: unterminated elements"))?;
            }
        } else if kind != "chain"
            || (o.rules.is_empty()
                && (line.starts_with("comment ")
                    || (line.starts_with("type ") && line.contains(" hook "))
                    || line.starts_with("policy ")))
        {
            o.header.push(line.to_owned());
        } else {
            o.rules.push(line.to_owned());
        }
    }
}

/// The listing of what a full transaction builds, as `nft list table` prints it (and
/// `kpr_nft::Fake::listing`: the sets' and maps' declarations are the fake's own). Rules and
/// elements are spelled from the typed objects directly, without the fake's checks, which cost
/// seconds at 10,000 Services.
pub fn from_tx(tx: &Transaction) -> Result<TableListing, String> {
    let mut decl = Transaction::new(tx.table.clone());
    decl.ops = tx
        .ops
        .iter()
        .filter(|op| {
            matches!(
                op,
                Op::AddTable(_)
                    | Op::DeleteTable
                    | Op::AddSet(_)
                    | Op::AddMap(_)
                    | Op::DeleteSet(_)
            )
        })
        .cloned()
        .collect();
    let mut fake = Fake::default();
    fake.apply(&decl)
        .map_err(|e| format!("the committed sets do not load: {e}"))?;
    let mut table = parse(&fake.listing())?
        .pop()
        .ok_or_else(|| "the committed table is empty".to_owned())?;
    let f = tx.table.family;
    let mut chains: BTreeMap<String, Object> = BTreeMap::new();
    let mut elements: BTreeMap<String, BTreeMap<Key, String>> = BTreeMap::new();
    for op in &tx.ops {
        match op {
            Op::DeleteTable => {
                chains.clear();
                elements.clear();
            }
            Op::AddChain(c) => {
                chains.entry(c.name.clone()).or_insert_with(|| {
                    let mut header = Vec::new();
                    if let Some(cm) = &c.comment {
                        header.push(format!("comment {}", text::quote(cm)));
                    }
                    if let Some(b) = &c.base {
                        header.push(text::base_decl(b, true));
                    }
                    Object {
                        header,
                        ..Object::default()
                    }
                });
            }
            Op::FlushChain(c) => {
                if let Some(o) = chains.get_mut(c) {
                    o.rules.clear();
                }
            }
            Op::DeleteChain(c) => {
                chains.remove(c);
            }
            Op::AddRule(r) => chains
                .get_mut(&r.chain)
                .ok_or_else(|| format!("a committed rule in a missing chain {}", r.chain))?
                .rules
                .push(text::rule(r, f, true)),
            Op::AddElement(e) => {
                elements
                    .entry(e.set.clone())
                    .or_default()
                    .entry(e.key)
                    .or_insert_with(|| text::element(e));
            }
            Op::DeleteElement(e) => {
                if let Some(els) = elements.get_mut(&e.set) {
                    els.remove(&e.key);
                }
            }
            Op::FlushSet(s) | Op::DeleteSet(s) => {
                elements.remove(s);
            }
            Op::AddTable(_) | Op::AddSet(_) | Op::AddMap(_) => {}
        }
    }
    for ((kind, name), o) in table.objects.iter_mut() {
        if kind != "chain" {
            o.elements = elements
                .remove(name)
                .map(|e| e.into_values().collect())
                .unwrap_or_default();
        }
    }
    if let Some(set) = elements.keys().next() {
        return Err(format!("committed elements of a missing set {set}"));
    }
    table.objects.extend(
        chains
            .into_iter()
            .map(|(n, o)| (("chain".to_owned(), n), o)),
    );
    Ok(table)
}

/// Splits an element list (what follows `elements = {`) at commas outside quotes and braces,
/// up to its closing brace, fed a line at a time.
#[derive(Debug, Default)]
struct ElementScan {
    cur: String,
    depth: u32,
    quoted: bool,
    escaped: bool,
}

impl ElementScan {
    /// Feeds one line; whether the list ended in it.
    fn feed(&mut self, line: &str, out: &mut Vec<String>) -> bool {
        if !self.cur.is_empty() {
            self.cur.push(' ');
        }
        for c in line.chars() {
            match c {
                _ if self.escaped => self.escaped = false,
                '\\' if self.quoted => self.escaped = true,
                '"' => self.quoted = !self.quoted,
                '{' if !self.quoted => self.depth += 1,
                '}' if !self.quoted && self.depth == 0 => {
                    self.push(out);
                    return true;
                }
                '}' if !self.quoted => self.depth -= 1,
                ',' if !self.quoted && self.depth == 0 => {
                    self.push(out);
                    continue;
                }
                _ => {}
            }
            self.cur.push(c);
        }
        false
    }

    fn push(&mut self, out: &mut Vec<String>) {
        let e = std::mem::take(&mut self.cur);
        let e = e.split_whitespace().collect::<Vec<_>>().join(" ");
        if !e.is_empty() {
            out.push(e);
        }
    }
}

/// An element's key: the text before its comment, value or timeout (`172.30.0.10 . tcp . 80`).
pub fn element_key(element: &str) -> &str {
    let mut quoted = false;
    for (i, c) in element.char_indices() {
        if c == '"' {
            quoted = !quoted;
        }
        if quoted || c != ' ' {
            continue;
        }
        let rest = &element[i..];
        if [" : ", " comment ", " timeout ", " expires "]
            .iter()
            .any(|w| rest.starts_with(w))
        {
            return &element[..i];
        }
    }
    element
}

/// One difference between two listings of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub kind: Kind,
    /// `table`, `chain`, `set` or `map`.
    pub obj_kind: String,
    /// The object's name (the table's `FAMILY NAME` for the table).
    pub name: String,
    pub item: Item,
    pub detail: String,
}

/// What a difference is about, within its object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The whole object (missing or extra); `base` for a chain with a hook.
    Whole { base: bool },
    /// Its declaration lines.
    Header,
    /// A rule, as committed (missing, different) or as the kernel has it (extra).
    Rule(String),
    /// The same rules in another order.
    Order,
    /// An element, by key.
    Element(String),
}

/// What the kernel lacks or has beyond `committed`. `kernel` is `None` when the table is not
/// in the kernel.
pub fn diff(committed: &TableListing, kernel: Option<&TableListing>) -> Vec<Diff> {
    let table_name = format!("{} {}", committed.family, committed.name);
    let Some(kernel) = kernel else {
        return vec![Diff {
            kind: Kind::Missing,
            obj_kind: "table".into(),
            name: table_name,
            item: Item::Whole { base: true },
            detail: format!(
                "missing: the table is not in the kernel ({} objects committed)",
                committed.objects.len()
            ),
        }];
    };
    let mut out = Vec::new();
    if committed.header != kernel.header {
        out.push(Diff {
            kind: Kind::Different,
            obj_kind: "table".into(),
            name: table_name,
            item: Item::Header,
            detail: format!(
                "different declaration: kernel `{}`, committed `{}`",
                kernel.header.join("; "),
                committed.header.join("; ")
            ),
        });
    }
    for ((kind, name), c) in &committed.objects {
        let d = |kind2: Kind, item: Item, detail: String| Diff {
            kind: kind2,
            obj_kind: kind.clone(),
            name: name.clone(),
            item,
            detail,
        };
        let Some(k) = kernel.objects.get(&(kind.clone(), name.clone())) else {
            out.push(d(
                Kind::Missing,
                Item::Whole { base: c.is_base() },
                format!("missing (the whole {kind}, {} committed)", c.size(kind)),
            ));
            continue;
        };
        if c.header != k.header {
            out.push(d(
                Kind::Different,
                Item::Header,
                format!(
                    "different declaration: kernel `{}`, committed `{}`",
                    k.header.join("; "),
                    c.header.join("; ")
                ),
            ));
        }
        if kind == "chain" {
            let s = seq_diff(&c.rules, &k.rules);
            for i in s.missing {
                let r = &c.rules[i];
                out.push(d(
                    Kind::Missing,
                    Item::Rule(r.clone()),
                    format!("missing rule {}: `{r}`", i + 1),
                ));
            }
            for j in s.extra {
                let r = &k.rules[j];
                out.push(d(
                    Kind::Extra,
                    Item::Rule(r.clone()),
                    format!("extra rule {}: `{r}`", j + 1),
                ));
            }
            for (i, j) in s.different {
                out.push(d(
                    Kind::Different,
                    Item::Rule(c.rules[i].clone()),
                    format!(
                        "rule {} differs: kernel `{}`, committed `{}`",
                        i + 1,
                        k.rules[j],
                        c.rules[i]
                    ),
                ));
            }
            if s.reordered {
                out.push(d(
                    Kind::Different,
                    Item::Order,
                    "the same rules in another order".into(),
                ));
            }
        } else if !c.is_dynamic() {
            out.extend(
                element_diff(&c.elements, &k.elements)
                    .into_iter()
                    .map(|(kind2, key, detail)| d(kind2, Item::Element(key), detail)),
            );
        }
    }
    for ((kind, name), k) in &kernel.objects {
        if !committed
            .objects
            .contains_key(&(kind.clone(), name.clone()))
        {
            let base = k.is_base();
            out.push(Diff {
                kind: Kind::Extra,
                obj_kind: kind.clone(),
                name: name.clone(),
                item: Item::Whole { base },
                detail: format!(
                    "extra {kind}, not committed ({}{})",
                    k.size(kind),
                    if base {
                        format!("; {}", k.header.join("; "))
                    } else {
                        String::new()
                    }
                ),
            });
        }
    }
    out
}

/// Elements by key: (kind, key, detail).
fn element_diff(committed: &[String], kernel: &[String]) -> Vec<(Kind, String, String)> {
    let by_key = |els: &[String]| -> BTreeMap<String, String> {
        els.iter()
            .map(|e| (element_key(e).to_owned(), e.clone()))
            .collect()
    };
    let (c, k) = (by_key(committed), by_key(kernel));
    let mut out = Vec::new();
    for (key, ce) in &c {
        match k.get(key) {
            None => out.push((
                Kind::Missing,
                key.clone(),
                format!("missing element `{ce}`"),
            )),
            Some(ke) if ke != ce => out.push((
                Kind::Different,
                key.clone(),
                format!("element `{key}` differs: kernel `{ke}`, committed `{ce}`"),
            )),
            Some(_) => {}
        }
    }
    for (key, ke) in &k {
        if !c.contains_key(key) {
            out.push((Kind::Extra, key.clone(), format!("extra element `{ke}`")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fake prints (and the proxy commits): one element per line.
    const COMMITTED: &str = "table ip kube-proxy-rs {
\tcomment \"rules for kube-proxy-rs\"
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment \"ClusterIP ExternalIP and LoadBalancer IP traffic\"
\t\telements = { 172.30.0.10 . tcp . 80 comment \"default/web:http\" : goto service-A,
\t\t\t     172.30.0.11 . tcp . 80 comment \"default/b, c {x}:http\" : goto service-B }
\t}

\tset cluster-ips {
\t\ttype ipv4_addr
\t\tcomment \"Active ClusterIPs\"
\t\telements = { 172.30.0.10, 172.30.0.11 }
\t}

\tset affinity-X {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 3h
\t}

\tchain services {
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
\t}

\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}
}
";

    /// The same table as the kernel lists it: elements in hash order, wrapped differently,
    /// objects in creation order, a traffic-made affinity element.
    const KERNEL_SAME: &str = "table ip kube-proxy-rs {
\tcomment \"rules for kube-proxy-rs\"
\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}
\tset affinity-X {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 3h
\t\telements = { 10.0.0.5 timeout 3h expires 2h59m57s }
\t}
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment \"ClusterIP ExternalIP and LoadBalancer IP traffic\"
\t\telements = { 172.30.0.11 . tcp . 80 comment \"default/b, c {x}:http\" : goto service-B, 172.30.0.10 . tcp . 80 comment \"default/web:http\" : goto service-A }
\t}
\tset cluster-ips {
\t\ttype ipv4_addr
\t\tcomment \"Active ClusterIPs\"
\t\telements = { 172.30.0.11,
\t\t\t     172.30.0.10 }
\t}
\tchain services {
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
\t}
}
";

    fn one(text: &str) -> TableListing {
        let mut t = parse(text).unwrap_or_default();
        assert_eq!(t.len(), 1, "{text}");
        t.remove(0)
    }

    #[test]
    fn listings_parse_into_objects_rules_and_elements() {
        let t = one(COMMITTED);
        assert_eq!(
            (t.family.as_str(), t.name.as_str()),
            ("ip", "kube-proxy-rs")
        );
        assert_eq!(t.header, ["comment \"rules for kube-proxy-rs\""]);
        assert_eq!(t.objects.len(), 5);
        let m = &t.objects[&("map".to_owned(), "service-ips".to_owned())];
        assert_eq!(m.header.len(), 2);
        assert_eq!(
            m.elements,
            [
                "172.30.0.10 . tcp . 80 comment \"default/web:http\" : goto service-A",
                "172.30.0.11 . tcp . 80 comment \"default/b, c {x}:http\" : goto service-B"
            ]
        );
        assert_eq!(element_key(&m.elements[1]), "172.30.0.11 . tcp . 80");
        let c = &t.objects[&("chain".to_owned(), "nat-prerouting".to_owned())];
        assert!(c.is_base());
        assert_eq!(c.rules, ["jump services"]);
        assert!(t.objects[&("set".to_owned(), "affinity-X".to_owned())].is_dynamic());
        assert!(parse("table ip x {\n\tchain c {\n").is_err());
        assert!(parse("chain c {\n}\n").is_err());
        assert_eq!(parse("").map(|t| t.len()), Ok(0));
    }

    #[test]
    fn the_same_table_listed_by_the_kernel_has_no_differences() {
        assert_eq!(diff(&one(COMMITTED), Some(&one(KERNEL_SAME))), []);
    }

    #[test]
    fn each_kind_of_difference_is_named() {
        let c = one(COMMITTED);
        let kernel = KERNEL_SAME
            // An element deleted, one pointing elsewhere, one added.
            .replace(
                "elements = { 172.30.0.11,\n\t\t\t     172.30.0.10 }",
                "elements = { 172.30.0.11, 172.30.0.99 }",
            )
            .replace("goto service-A }", "goto service-Z }")
            // A rule deleted, one added, a chain added.
            .replace(
                "\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
                "",
            )
            .replace(
                "\t\tjump services\n",
                "\t\tjump services\n\t\tip daddr 1.1.1.1 drop\n",
            )
            .replace(
                "\tchain services {",
                "\tchain sneaky {\n\t\ttype filter hook input priority 0; policy accept;\n\t}\n\tchain services {",
            );
        let got = diff(&c, Some(&one(&kernel)));
        let seen: Vec<(Kind, &str, &str, &str)> = got
            .iter()
            .map(|d| {
                (
                    d.kind,
                    d.obj_kind.as_str(),
                    d.name.as_str(),
                    d.detail.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (
                    Kind::Extra,
                    "chain",
                    "nat-prerouting",
                    "extra rule 2: `ip daddr 1.1.1.1 drop`"
                ),
                (
                    Kind::Missing,
                    "chain",
                    "services",
                    "missing rule 2: `ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports`"
                ),
                (
                    Kind::Different,
                    "map",
                    "service-ips",
                    "element `172.30.0.10 . tcp . 80` differs: kernel `172.30.0.10 . tcp . 80 comment \"default/web:http\" : goto service-Z`, committed `172.30.0.10 . tcp . 80 comment \"default/web:http\" : goto service-A`"
                ),
                (
                    Kind::Missing,
                    "set",
                    "cluster-ips",
                    "missing element `172.30.0.10`"
                ),
                (
                    Kind::Extra,
                    "set",
                    "cluster-ips",
                    "extra element `172.30.0.99`"
                ),
                (
                    Kind::Extra,
                    "chain",
                    "sneaky",
                    "extra chain, not committed (0 rules; type filter hook input priority 0; policy accept;)"
                ),
            ]
        );
        assert_eq!(got[5].item, Item::Whole { base: true });
        assert_eq!(
            got[1].item,
            Item::Rule(
                "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".into()
            )
        );
        assert_eq!(got[2].item, Item::Element("172.30.0.10 . tcp . 80".into()));
    }

    #[test]
    fn a_missing_table_chain_or_reordered_rules() {
        let c = one(COMMITTED);
        let d = diff(&c, None);
        assert_eq!(
            (d.len(), d[0].kind, d[0].obj_kind.as_str()),
            (1, Kind::Missing, "table")
        );
        let kernel = KERNEL_SAME.replace(
            "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n",
            "",
        );
        let d = diff(&c, Some(&one(&kernel)));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].detail, "missing (the whole chain, 1 rule committed)");
        let swapped = KERNEL_SAME.replace(
            "\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
            "\t\tip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n",
        );
        let d = diff(&c, Some(&one(&swapped)));
        assert_eq!((d.len(), d[0].item.clone()), (1, Item::Order));
    }
}
