//! `iptables-save` output compared with the chains the proxy committed. Pure.
//!
//! Only our chains are compared: every chain the proxy committed, the chains that are ours by
//! name (a stale `KUBE-SVC-…` is extra), and in the built-in chains only the rules that jump to
//! one of ours (the rest belong to others). Rules are compared in a normal form, because
//! `iptables-save` does not print what `iptables-restore` was fed: it adds `/32`, moves
//! `-m tcp` after `-p tcp`, prints `--or-mark M` as `--set-xmark M/M`, adds the default
//! `--reject-with`, `--mask` and `--rsource`, prints probabilities with 11 decimals of the
//! kernel's fixed-point value, and the nft and legacy back ends order options differently.
//! [`normalize`] turns a rule into its sorted option groups (an option with its negation and
//! values, comments unquoted), spelled one way.

use super::{Kind, seq_diff};
use kpr_dataplane::iptables::render::{
    CANARY, ChainKey, EXTERNAL_SERVICES, FORWARD, MARK_MASQ, NODEPORTS, POSTROUTING,
    PROXY_FIREWALL, SERVICE_CHAIN_PREFIXES, SERVICES,
};
use kpr_dataplane::iptables::{IptTable, Rule};
use std::collections::{BTreeMap, BTreeSet};

/// The chains the kernel creates.
pub const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// One table of an `iptables-save` dump: chain -> its rules (`-A CHAIN ...` lines), in order.
pub type SaveTable = BTreeMap<String, Vec<String>>;

/// Parses `iptables-save` output (any tables, in any order).
pub fn parse_save(text: &str) -> BTreeMap<IptTable, SaveTable> {
    let mut out: BTreeMap<IptTable, SaveTable> = BTreeMap::new();
    let mut table = None;
    for line in text.lines().map(str::trim_end) {
        if let Some(t) = line.strip_prefix('*') {
            table = IptTable::ALL.into_iter().find(|x| x.as_str() == t.trim());
        } else if let (Some(t), Some(decl)) = (table, line.strip_prefix(':')) {
            let name = decl.split_whitespace().next().unwrap_or("").to_owned();
            out.entry(t).or_default().entry(name).or_default();
        } else if let (Some(t), Some(rule)) = (table, line.strip_prefix("-A ")) {
            let chain = rule.split_whitespace().next().unwrap_or("").to_owned();
            out.entry(t)
                .or_default()
                .entry(chain)
                .or_default()
                .push(line.to_owned());
        }
    }
    out
}

/// Whether a chain is ours by its name (as `--cleanup` decides, §13.6): what the proxy did
/// not commit but finds there is a stale leftover of ours.
pub fn ours(table: IptTable, chain: &str) -> bool {
    match table {
        IptTable::Nat => {
            [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, CANARY].contains(&chain)
                || SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
        }
        IptTable::Filter => [
            SERVICES,
            EXTERNAL_SERVICES,
            FORWARD,
            NODEPORTS,
            PROXY_FIREWALL,
            CANARY,
        ]
        .contains(&chain),
        IptTable::Mangle => chain == CANARY,
    }
}

/// A rule's normal form: its option groups, each spelled one way, sorted. Two spellings of the
/// same rule (restore input, either back end's save output) give the same normal form.
pub fn normalize(line: &str) -> String {
    let mut groups: Vec<String> = Vec::new();
    let mut negate = false;
    let mut cur: Option<(String, Vec<String>)> = None;
    let flush = |cur: &mut Option<(String, Vec<String>)>, groups: &mut Vec<String>| {
        if let Some((opt, vals)) = cur.take()
            && let Some(g) = canonical(&opt, &vals)
        {
            groups.push(g);
        }
    };
    for (tok, quoted) in tokens(line) {
        if !quoted && tok == "!" {
            flush(&mut cur, &mut groups);
            negate = true;
        } else if !quoted && tok.starts_with('-') && tok.len() > 1 && !is_number(&tok) {
            flush(&mut cur, &mut groups);
            let opt = if negate { format!("!{tok}") } else { tok };
            negate = false;
            cur = Some((opt, Vec::new()));
        } else if let Some((_, vals)) = cur.as_mut() {
            vals.push(tok);
        } else {
            groups.push(tok);
        }
    }
    flush(&mut cur, &mut groups);
    groups.sort();
    groups.join(" ; ")
}

fn is_number(s: &str) -> bool {
    s[1..].chars().all(|c| c.is_ascii_digit())
}

/// Shell-like words: whitespace-separated, `"..."` one word (with `\"` and `\\`); whether
/// each was quoted.
fn tokens(line: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        let (mut quoted, mut was_quoted) = (false, false);
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() && !quoted {
                break;
            }
            chars.next();
            match c {
                '"' => {
                    quoted = !quoted;
                    was_quoted = true;
                }
                '\\' if quoted => {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
                c => word.push(c),
            }
        }
        out.push((word, was_quoted));
    }
    out
}

/// One option group, spelled one way; `None` for what carries no meaning of its own.
fn canonical(opt: &str, vals: &[String]) -> Option<String> {
    let (neg, name) = match opt.strip_prefix('!') {
        Some(n) => ("!", n),
        None => ("", opt),
    };
    let name = match name {
        "--source" | "--src" => "-s",
        "--destination" | "--dst" => "-d",
        "--protocol" => "-p",
        "--in-interface" => "-i",
        "--jump" => "-j",
        "--destination-port" => "--dport",
        n => n,
    };
    let v = vals.join(" ");
    let value = match name {
        // The chain is compared by the caller; `-m tcp` and the like only load what the
        // options after them use.
        "-A" | "-m" | "--match" | "--rsource" => return None,
        "--reject-with" if v.ends_with("port-unreachable") => return None,
        "--mask" if v == "255.255.255.255" || v == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" => {
            return None;
        }
        "-s" | "-d" => net(&v),
        "-p" => v.to_ascii_lowercase(),
        "--probability" => v.parse::<f64>().map(|p| format!("{p:.6}")).unwrap_or(v),
        "--mark" => mark(&v),
        "--ctstate" | "--state" => {
            let mut states: Vec<&str> = v.split(',').collect();
            states.sort_unstable();
            states.join(",")
        }
        "--to-destination" => v
            .parse::<std::net::SocketAddr>()
            .map(|a| a.to_string())
            .unwrap_or(v),
        "--or-mark" | "--xor-mark" => hex(&v).map(|m| format!("{m:#x}")).unwrap_or(v),
        "--set-xmark" => {
            let (value, mask) = v.split_once('/').unwrap_or((&v, "0xffffffff"));
            return Some(match (hex(value), hex(mask)) {
                (Some(x), Some(m)) if x == m => format!("{neg}--or-mark {x:#x}"),
                (Some(x), Some(0)) => format!("{neg}--xor-mark {x:#x}"),
                (Some(x), Some(m)) => format!("{neg}--set-xmark {x:#x}/{m:#x}"),
                _ => format!("{neg}--set-xmark {v}"),
            });
        }
        _ => v,
    };
    Some(if value.is_empty() {
        format!("{neg}{name}")
    } else {
        format!("{neg}{name} {value}")
    })
}

/// An address or prefix: hosts without their length, prefixes truncated.
fn net(v: &str) -> String {
    if let Ok(n) = v.parse::<ipnet::IpNet>() {
        if n.prefix_len() == n.max_prefix_len() {
            return n.addr().to_string();
        }
        return n.trunc().to_string();
    }
    v.parse::<std::net::IpAddr>()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| v.to_owned())
}

fn hex(v: &str) -> Option<u32> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// `--mark VALUE[/MASK]`, the mask all ones when absent.
fn mark(v: &str) -> String {
    let (value, mask) = v.split_once('/').unwrap_or((v, "0xffffffff"));
    match (hex(value), hex(mask)) {
        (Some(x), Some(m)) => format!("{x:#x}/{m:#x}"),
        _ => v.to_owned(),
    }
}

/// One difference in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub kind: Kind,
    pub chain: ChainKey,
    /// The rule's normal form (missing or different: the committed rule's), for a rule.
    pub rule: Option<String>,
    /// The same rules in another order.
    pub order: bool,
    pub detail: String,
}

/// What the kernel (`save`, parsed) lacks or has beyond the committed chains (built-in
/// chains holding our jumps included).
pub fn diff(
    committed: &BTreeMap<ChainKey, Vec<Rule>>,
    save: &BTreeMap<IptTable, SaveTable>,
) -> Vec<Diff> {
    let mut out = Vec::new();
    let empty = SaveTable::new();
    let declared: BTreeSet<(IptTable, &str)> =
        committed.keys().map(|(t, c)| (*t, c.as_str())).collect();
    // A rule of a built-in chain is ours when it jumps to a chain of ours.
    let ours_target = |t: IptTable, line: &str| {
        line.split(" -j ")
            .nth(1)
            .and_then(|x| x.split_whitespace().next())
            .is_some_and(|target| declared.contains(&(t, target)) || ours(t, target))
    };
    for ((table, chain), rules) in committed {
        let key = (*table, chain.clone());
        let kernel_table = save.get(table).unwrap_or(&empty);
        let builtin = BUILTIN.contains(&chain.as_str());
        let kernel: Vec<&String> = match kernel_table.get(chain) {
            Some(k) if builtin => k.iter().filter(|l| ours_target(*table, l)).collect(),
            Some(k) => k.iter().collect(),
            None if builtin => Vec::new(),
            None => {
                out.push(Diff {
                    kind: Kind::Missing,
                    chain: key,
                    rule: None,
                    order: false,
                    detail: format!(
                        "missing (the whole chain, {} committed)",
                        plural(rules.len())
                    ),
                });
                continue;
            }
        };
        let c_norm: Vec<String> = rules.iter().map(|r| normalize(&r.text())).collect();
        let k_norm: Vec<String> = kernel.iter().map(|l| normalize(l)).collect();
        let s = seq_diff(&c_norm, &k_norm);
        let mut d = |kind, rule: Option<String>, order, detail| {
            out.push(Diff {
                kind,
                chain: key.clone(),
                rule,
                order,
                detail,
            })
        };
        for i in s.missing {
            let text = rules[i].text();
            d(
                Kind::Missing,
                Some(c_norm[i].clone()),
                false,
                format!("missing rule: `{text}`"),
            );
        }
        for j in s.extra {
            d(
                Kind::Extra,
                Some(k_norm[j].clone()),
                false,
                format!("extra rule: `{}`", kernel[j]),
            );
        }
        for (i, j) in s.different {
            d(
                Kind::Different,
                Some(c_norm[i].clone()),
                false,
                format!(
                    "rule {} differs: kernel `{}`, committed `{}`",
                    i + 1,
                    kernel[j],
                    rules[i].text()
                ),
            );
        }
        if s.reordered {
            d(
                Kind::Different,
                None,
                true,
                "the same rules in another order".into(),
            );
        }
    }
    for (table, chains) in save {
        for (chain, rules) in chains {
            if ours(*table, chain) && !declared.contains(&(*table, chain.as_str())) {
                out.push(Diff {
                    kind: Kind::Extra,
                    chain: (*table, chain.clone()),
                    rule: None,
                    order: false,
                    detail: format!("extra chain, not committed ({})", plural(rules.len())),
                });
            }
        }
    }
    out
}

fn plural(n: usize) -> String {
    format!("{n} rule{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpr_dataplane::iptables::Target;

    /// Restore input (what we write) and what each back end's save printed for it, from a
    /// proxy in a test namespace (iptables v1.8.9).
    const PAIRS: &[(&str, &str)] = &[
        (
            "-A KUBE-SERVICES -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 172.30.0.10 --dport 80 -j KUBE-SVC-X",
            "-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X",
        ),
        (
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        ),
        (
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        ),
        (
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        ),
        (
            "-A KUBE-SVC-X -m comment --comment \"default/web:http -> 10.0.0.11:8080\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-A",
            "-A KUBE-SVC-X -m comment --comment \"default/web:http -> 10.0.0.11:8080\" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-A",
        ),
        (
            "-A KUBE-SEP-A -m comment --comment default/web:http -m recent --set --name KUBE-SEP-A --mask 255.255.255.255 --rsource -m tcp -p tcp -j DNAT --to-destination 10.0.0.11:8080",
            "-A KUBE-SEP-A -p tcp -m comment --comment default/web:http -m recent --set --name KUBE-SEP-A --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.0.0.11:8080",
        ),
        (
            "-A KUBE-SVC-X -m comment --comment \"default/web:http -> 10.0.0.11:8080\" -m recent --name KUBE-SEP-A --rcheck --seconds 10800 --reap -j KUBE-SEP-A",
            "-A KUBE-SVC-X -m comment --comment \"default/web:http -> 10.0.0.11:8080\" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-A --mask 255.255.255.255 --rsource -j KUBE-SEP-A",
        ),
        (
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            "-A KUBE-SERVICES ! -d 127.0.0.0/8 -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ),
        (
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/empty:http has no endpoints\" -m tcp -p tcp -d 192.168.0.2 --dport 30080 -j REJECT",
            "-A KUBE-EXTERNAL-SERVICES -d 192.168.0.2/32 -p tcp -m comment --comment \"default/empty:http has no endpoints\" -m tcp --dport 30080 -j REJECT --reject-with icmp-port-unreachable",
        ),
        (
            "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"kubernetes forwarding conntrack rule\" -j ACCEPT",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ),
        (
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        ),
        (
            "-A KUBE-SEP-B -m comment --comment default/v6:http -m tcp -p tcp -j DNAT --to-destination [fd00:10::11]:8080",
            "-A KUBE-SEP-B -p tcp -m comment --comment default/v6:http -m tcp -j DNAT --to-destination [fd00:10::11]:8080",
        ),
        (
            "-A KUBE-SVC-X ! -s 10.0.0.0/8 -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d fd00:30::10 --dport 80 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-X ! -s 10.0.0.0/8 -d fd00:30::10/128 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ",
        ),
    ];

    #[test]
    fn restore_and_save_spellings_have_one_normal_form() {
        for (ours, saved) in PAIRS {
            assert_eq!(normalize(ours), normalize(saved), "\n{ours}\n{saved}");
        }
    }

    #[test]
    fn different_rules_have_different_normal_forms() {
        let base = "-A C -s 10.0.0.1 -d 10.0.0.2 -p tcp --dport 80 -j KUBE-SEP-A";
        for other in [
            // Source and destination swapped: the same words, another rule.
            "-A C -s 10.0.0.2 -d 10.0.0.1 -p tcp --dport 80 -j KUBE-SEP-A",
            "-A C ! -s 10.0.0.1 -d 10.0.0.2 -p tcp --dport 80 -j KUBE-SEP-A",
            "-A C -s 10.0.0.1 -d 10.0.0.2 -p udp --dport 80 -j KUBE-SEP-A",
            "-A C -s 10.0.0.1 -d 10.0.0.2 -p tcp --dport 81 -j KUBE-SEP-A",
            "-A C -s 10.0.0.1 -d 10.0.0.2 -p tcp --dport 80 -j KUBE-SEP-B",
            "-A C -s 10.0.0.1 -d 10.0.0.2 -p tcp --dport 80 -j REJECT --reject-with tcp-reset",
            "-A C -s 10.0.0.1 -d 10.0.0.2/31 -p tcp --dport 80 -j KUBE-SEP-A",
        ] {
            assert_ne!(normalize(base), normalize(other), "{other}");
        }
        assert_ne!(
            normalize("-A C -m comment --comment \"a b\" -j ACCEPT"),
            normalize("-A C -m comment --comment \"a c\" -j ACCEPT")
        );
        assert_ne!(
            normalize("-A C -m statistic --mode random --probability 0.50000000000 -j A"),
            normalize("-A C -m statistic --mode random --probability 0.33333333349 -j A")
        );
        assert_ne!(
            normalize("-A C -j MARK --set-xmark 0x4000/0x4000"),
            normalize("-A C -j MARK --set-xmark 0x4000/0x0")
        );
        // A quoted comment may hold what looks like an option.
        assert_ne!(
            normalize("-A C -m comment --comment \"x -j DROP\" -j ACCEPT"),
            normalize("-A C -m comment --comment x -j DROP")
        );
    }

    const SAVE: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-X - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-OLD - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j CNI-X
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
";

    fn committed() -> BTreeMap<ChainKey, Vec<Rule>> {
        let nat = IptTable::Nat;
        let mut c: BTreeMap<ChainKey, Vec<Rule>> = BTreeMap::new();
        let mut add = |t: IptTable, r: Rule| c.entry((t, r.chain.clone())).or_default().push(r);
        add(
            nat,
            Rule::new("PREROUTING", Target::Jump(SERVICES.into()))
                .comment("kubernetes service portals"),
        );
        add(nat, Rule::new(MARK_MASQ, Target::MarkOr(0x4000)));
        add(
            nat,
            Rule::new(SERVICES, Target::Jump("KUBE-SVC-X".into()))
                .comment("default/web:http cluster IP")
                .to(
                    "172.30.0.10"
                        .parse()
                        .unwrap_or(std::net::IpAddr::from([0; 4])),
                    kpr_model::Protocol::Tcp,
                    80,
                ),
        );
        add(
            nat,
            Rule::new("KUBE-SVC-X", Target::Jump("KUBE-SEP-A".into())),
        );
        add(
            nat,
            Rule::new(
                "KUBE-SEP-A",
                Target::Dnat("10.0.0.11:8080".parse().unwrap_or(([0; 4], 0).into())),
            ),
        );
        c
    }

    #[test]
    fn only_our_chains_and_jumps_are_compared() {
        let save = parse_save(SAVE);
        assert_eq!(save[&IptTable::Nat]["PREROUTING"].len(), 2);
        let got = diff(&committed(), &save);
        let seen: Vec<(Kind, &str, &str)> = got
            .iter()
            .map(|d| (d.kind, d.chain.1.as_str(), d.detail.as_str()))
            .collect();
        // Not CNI-X, nor kubelet's KUBE-FIREWALL and its jump.
        assert_eq!(
            seen,
            [
                (
                    Kind::Missing,
                    "KUBE-SEP-A",
                    "missing (the whole chain, 1 rule committed)"
                ),
                (
                    Kind::Missing,
                    "KUBE-SVC-X",
                    "missing (the whole chain, 1 rule committed)"
                ),
                (
                    Kind::Extra,
                    "KUBE-SVC-OLD",
                    "extra chain, not committed (0 rules)"
                ),
            ]
        );
    }

    #[test]
    fn rules_missing_extra_changed_or_reordered() {
        let c = committed();
        let mut save = parse_save(SAVE);
        let nat = save.entry(IptTable::Nat).or_default();
        nat.remove("KUBE-SVC-OLD");
        nat.insert(
            "KUBE-SVC-X".into(),
            vec!["-A KUBE-SVC-X -j KUBE-SEP-B".into()],
        );
        nat.insert(
            "KUBE-SEP-A".into(),
            vec![
                "-A KUBE-SEP-A -j DNAT --to-destination 10.0.0.11:8080".into(),
                "-A KUBE-SEP-A -j DROP".into(),
            ],
        );
        nat.insert("PREROUTING".into(), vec!["-A PREROUTING -j CNI-X".into()]);
        let got = diff(&c, &save);
        let seen: Vec<(Kind, &str, &str)> = got
            .iter()
            .map(|d| (d.kind, d.chain.1.as_str(), d.detail.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    Kind::Extra,
                    "KUBE-SEP-A",
                    "extra rule: `-A KUBE-SEP-A -j DROP`"
                ),
                (
                    Kind::Different,
                    "KUBE-SVC-X",
                    "rule 1 differs: kernel `-A KUBE-SVC-X -j KUBE-SEP-B`, committed `-A KUBE-SVC-X -j KUBE-SEP-A`"
                ),
                (
                    Kind::Missing,
                    "PREROUTING",
                    "missing rule: `-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES`"
                ),
            ]
        );
        let mut c2 = c.clone();
        if let Some(r) = c2.get_mut(&(IptTable::Nat, "KUBE-SEP-A".to_owned())) {
            r.push(Rule::new("KUBE-SEP-A", Target::Drop));
            r.reverse();
        }
        let got = diff(&c2, &save);
        assert!(
            got.iter().any(|d| d.order && d.chain.1 == "KUBE-SEP-A"),
            "{got:?}"
        );
    }
}
