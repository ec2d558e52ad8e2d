//! What the soak samples: the daemon's memory, file descriptors and threads (/proc), our
//! objects in the node namespace's kernel (counted, and a canonical form to compare whole
//! rulesets), and the namespace's conntrack entries.

use crate::Mode;
use crate::netns::Netns;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The daemon process, from /proc/PID (KiB).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Proc {
    pub(crate) rss: u64,
    pub(crate) hwm: u64,
    /// RssAnon: the heap proxy (the daemon uses the system allocator, which keeps no stats).
    pub(crate) anon: u64,
    pub(crate) fds: u64,
    /// Open descriptors by kind (`socket`, `anon_inode:[eventpoll]`, a path, ...).
    pub(crate) fd_kinds: BTreeMap<String, u64>,
    pub(crate) threads: u64,
}

pub(crate) fn process(pid: u32) -> Proc {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e} (the daemon exited?)"));
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut fd_kinds = BTreeMap::new();
    let mut fds = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            fds += 1;
            let target = std::fs::read_link(entry.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into());
            // `socket:[123]` -> `socket`; `pipe:[9]` -> `pipe`; anon inodes keep their kind.
            let kind = match target.split_once(":[") {
                Some((k, _)) => k.to_owned(),
                None => target,
            };
            *fd_kinds.entry(kind).or_insert(0) += 1;
        }
    }
    Proc {
        rss: field("VmRSS"),
        hwm: field("VmHWM"),
        anon: field("RssAnon"),
        fds,
        fd_kinds,
        threads: field("Threads"),
    }
}

/// Our kernel objects: counts by kind, and a canonical form of the whole ruleset (sorted
/// lines; rules keep their position in their chain; handles, counters and timeouts dropped).
#[derive(Debug, Clone, Default)]
pub(crate) struct Kernel {
    pub(crate) counts: Vec<(&'static str, u64)>,
    pub(crate) canonical: Vec<String>,
}

impl Kernel {
    pub(crate) fn count(&self, what: &str) -> u64 {
        self.counts
            .iter()
            .find(|(k, _)| *k == what)
            .map_or(0, |(_, v)| *v)
    }
}

/// nftables mode: `nft -j list ruleset` (only our table lives in the node namespace);
/// iptables mode: `iptables-nft-save` and `ip6tables-nft-save`.
pub(crate) fn kernel(ns: &Netns, mode: Mode) -> Kernel {
    match mode {
        Mode::Nftables => nft(&ns.sh("nft -j list ruleset")),
        Mode::Iptables => iptables(&ns.sh("iptables-nft-save; ip6tables-nft-save")),
    }
}

fn nft(json: &str) -> Kernel {
    let v: Value = serde_json::from_str(json).expect("nft -j prints JSON");
    let mut n: Vec<(&'static str, u64)> = ["tables", "chains", "rules", "sets", "maps", "elements"]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
    fn add(n: &mut Vec<(&'static str, u64)>, key: &'static str, by: u64) {
        match n.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v += by,
            None => n.push((key, by)),
        }
    }
    let mut canonical = Vec::new();
    let mut position = BTreeMap::<String, u64>::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        strip(&mut body);
        let key = match kind.as_str() {
            "metainfo" => continue,
            "table" => "tables",
            "chain" => "chains",
            "rule" => "rules",
            "set" => "sets",
            "map" => "maps",
            _ => "other objects",
        };
        add(&mut n, key, 1);
        if let Some(elems) = body.get_mut("elem").and_then(Value::as_array_mut) {
            add(&mut n, "elements", elems.len() as u64);
            let mut sorted: Vec<String> = elems.iter().map(Value::to_string).collect();
            sorted.sort();
            body["elem"] = Value::from(sorted);
        }
        let line = if kind == "rule" {
            let chain = format!("{} {} {}", body["family"], body["table"], body["chain"]);
            let at = position.entry(chain.clone()).or_insert(0);
            *at += 1;
            format!("rule {chain} #{at:06} {body}")
        } else {
            format!("{kind} {body}")
        };
        canonical.push(line);
    }
    canonical.sort();
    Kernel {
        counts: n,
        canonical,
    }
}

/// Drops what changes without the ruleset changing: handles, counter values, timeouts.
fn strip(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("handle");
            o.remove("expires");
            if let Some(Value::Object(c)) = o.get_mut("counter") {
                c.remove("packets");
                c.remove("bytes");
            }
            for x in o.values_mut() {
                strip(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn iptables(save: &str) -> Kernel {
    let (mut tables, mut chains, mut rules) = (0, 0, 0);
    let mut canonical = Vec::new();
    let mut table = String::new();
    let mut position = BTreeMap::<(String, String), u64>::new();
    for line in save.lines() {
        if line.starts_with('#') || line == "COMMIT" || line.is_empty() {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            tables += 1;
            table = t.to_owned();
            canonical.push(format!("table {t}"));
        } else if let Some(c) = line.strip_prefix(':') {
            chains += 1;
            // `:KUBE-SERVICES - [0:0]`: drop the counters.
            let c = c.split(" [").next().unwrap_or(c);
            canonical.push(format!("chain {table} {c}"));
        } else {
            rules += 1;
            // `-A CHAIN ...`: numbered within its chain (chains list in creation order).
            let chain = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let at = position
                .entry((table.clone(), chain.clone()))
                .or_insert(0u64);
            *at += 1;
            canonical.push(format!("rule {table} {chain} #{at:06} {line}"));
        }
    }
    canonical.sort();
    Kernel {
        counts: vec![("tables", tables), ("chains", chains), ("rules", rules)],
        canonical,
    }
}

/// The node namespace's conntrack entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Conntrack {
    pub(crate) total: u64,
    /// The daemon's own connections to the API server, established.
    pub(crate) api: u64,
    /// UDP flows to a permanent Service's UDP port (the soak's traffic).
    pub(crate) udp: u64,
    /// Of those, flows whose DNAT target is not a serving endpoint of a Service that has one:
    /// the entries conntrack cleanup (§6.2) should have deleted.
    pub(crate) stale: u64,
}

/// `conntrack -L` in the namespace, classified.
pub(crate) fn conntrack(
    ns: &Netns,
    api_port: u16,
    serving: &BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>,
    udp_port: u16,
) -> Conntrack {
    // A dump can fail while entries change; the kernel's own count says how many there are.
    let mut listing = None;
    for _ in 0..3 {
        let out = ns.try_sh("conntrack -L");
        if out.status.success() {
            listing = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        eprintln!(
            "   conntrack -L failed, retrying: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let text = listing.expect("conntrack -L in the node namespace");
    let counted = ns.sh("conntrack -C").trim().parse::<u64>().unwrap_or(0);
    let mut c = Conntrack::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        c.total += 1;
        let f = Flow::parse(line);
        match f.proto.as_str() {
            // Either direction: conntrack starts tracking the namespace when the daemon's first
            // sync loads nat chains, after the watches connected, and picks each connection
            // up from whichever side sends next.
            "tcp"
                if (f.dport == Some(api_port) || f.sport == Some(api_port))
                    && line.contains("ESTABLISHED") =>
            {
                c.api += 1
            }
            "udp" if f.dport == Some(udp_port) => {
                let Some(dst) = f.dst else { continue };
                let Some(endpoints) = serving.get(&dst) else {
                    continue;
                };
                c.udp += 1;
                if !f.reply_src.is_some_and(|r| endpoints.contains(&r)) {
                    c.stale += 1;
                }
            }
            _ => {}
        }
    }
    if c.total.abs_diff(counted) > c.total / 10 + 5 {
        eprintln!(
            "   conntrack -L listed {} entries, conntrack -C counts {counted}",
            c.total
        );
    }
    c
}

/// The fields of a `conntrack -L` line the soak reads.
#[derive(Debug, Default)]
struct Flow {
    proto: String,
    dst: Option<Ipv4Addr>,
    sport: Option<u16>,
    dport: Option<u16>,
    reply_src: Option<Ipv4Addr>,
}

impl Flow {
    /// `udp 17 29 src=A dst=B sport=P dport=Q [UNREPLIED] src=C dst=D sport=R dport=S ...`:
    /// the first `dst`/`dport` are the original direction's, the second `src` the reply's.
    fn parse(line: &str) -> Flow {
        let mut f = Flow {
            proto: line.split_whitespace().next().unwrap_or("").to_owned(),
            ..Flow::default()
        };
        let mut srcs = 0;
        for tok in line.split_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            match k {
                "src" => {
                    srcs += 1;
                    if srcs == 2 {
                        f.reply_src = v.parse().ok();
                    }
                }
                "dst" if f.dst.is_none() => f.dst = v.parse().ok(),
                "sport" if f.sport.is_none() => f.sport = v.parse().ok(),
                "dport" if f.dport.is_none() => f.dport = v.parse().ok(),
                _ => {}
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse() {
        let f = Flow::parse(
            "udp      17 29 src=192.168.0.2 dst=172.16.0.1 sport=40000 dport=53 [UNREPLIED] src=10.64.0.3 dst=192.168.0.2 sport=5353 dport=40000 mark=0 use=1",
        );
        assert_eq!(f.proto, "udp");
        assert_eq!(f.dst, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(f.dport, Some(53));
        assert_eq!(f.sport, Some(40000));
        assert_eq!(f.reply_src, Some(Ipv4Addr::new(10, 64, 0, 3)));
    }

    #[test]
    fn nft_counts_and_canonical_form_ignore_handles_counters_and_order() {
        let a = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "t", "handle": 1}},
            {"chain": {"family": "ip", "table": "t", "name": "c", "handle": 2}},
            {"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 5, "expr": [{"counter": {"packets": 3, "bytes": 9}}]}},
            {"map": {"family": "ip", "table": "t", "name": "m", "handle": 3, "elem": [["1.1.1.1", "x"], ["2.2.2.2", "y"]]}}]}"#;
        let b = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "t", "handle": 7}},
            {"map": {"family": "ip", "table": "t", "name": "m", "handle": 9, "elem": [["2.2.2.2", "y"], ["1.1.1.1", "x"]]}},
            {"chain": {"family": "ip", "table": "t", "name": "c", "handle": 8}},
            {"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 11, "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}]}"#;
        let (a, b) = (nft(a), nft(b));
        assert_eq!(a.canonical, b.canonical);
        assert_eq!(a.count("maps"), 1);
        assert_eq!(a.count("elements"), 2);
        assert_eq!(a.count("rules"), 1);
    }
}
