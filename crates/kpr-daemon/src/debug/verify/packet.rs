//! The kernel's view of one packet, for `/debug/explain`: does the kernel do with it what the
//! model says?
//!
//! The packet is traced through the committed rules while the tracer records what it visits
//! (chains; the map and set entries it looks up; in the iptables mode the rules that matched
//! it; the bucket ranges of the endpoint maps it draws from). The differences found there are
//! the ones that can matter: none, and the kernel agrees. Otherwise the packet is traced again
//! through the committed rules minus what the kernel lacks; rules or elements the kernel has
//! beyond ours cannot be traced, so with one on the path the answer is "uncertain".

use super::super::routes::{ExplainQuery, explain_in, parse_packet};
use super::super::{Hub, Snapshot};
use super::{
    At, Committed, Difference, Kind, READING_TTL, Reading, Setup, check, ipt, nft, nft_family,
    wrote_since,
};
use kpr_dataplane::iptables::render::ChainKey;
use kpr_dataplane::iptables::{self as ipt_backend};
use kpr_dataplane::nftables::layout;
use kpr_dataplane::nftables::trace::{Outcome, Path, TracePacket, TxView};
use kpr_model::IpFamily;
use kpr_model::explain::Explanation;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An explanation of the running proxy: the model's, and whether the kernel agrees.
#[derive(Debug, Clone, Serialize)]
pub struct LiveExplanation {
    #[serde(flatten)]
    pub explanation: Explanation,
    /// What the socket hooks do with a connection to this frontend, when socket-lb is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_lb: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelView>,
}

impl fmt::Display for LiveExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.explanation)?;
        if let Some(s) = &self.socket_lb {
            writeln!(f, "Socket-lb: {s}")?;
        }
        match &self.kernel {
            Some(k) => write!(f, "{k}"),
            None => Ok(()),
        }
    }
}

/// Whether the kernel does with a packet what the model says.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelView {
    /// `agrees`, `disagrees`, `uncertain` (rules the proxy did not commit are on the packet's
    /// path) or `unknown` (the kernel could not be read).
    pub status: &'static str,
    /// `None` when uncertain or unknown.
    pub agrees: Option<bool>,
    pub summary: String,
    /// Where the packet may go by the committed rules (the model's verdict).
    pub committed: Vec<String>,
    /// Where it may go by the kernel's rules: the committed ones minus what the kernel lacks.
    pub kernel: Vec<String>,
    /// The differences on the packet's path: the chains it runs through, the map and set
    /// entries it looks up.
    pub differences: Vec<Difference>,
    /// Differences elsewhere, which this packet never reads.
    pub elsewhere: usize,
}

impl fmt::Display for KernelView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Kernel: {}", self.summary)?;
        for d in &self.differences {
            writeln!(f, "   {d}")?;
        }
        if self.status == "disagrees" || self.status == "uncertain" {
            writeln!(f, "   committed rules: {}", self.committed.join(", "))?;
            let what = if self.status == "uncertain" {
                "the kernel's rules, without the foreign ones"
            } else {
                "the kernel's rules"
            };
            writeln!(f, "   {what}: {}", self.kernel.join(", "))?;
        }
        if self.elsewhere > 0 {
            writeln!(
                f,
                "   ({} other difference{} not on this packet's path: see kube-proxy-rs verify)",
                self.elsewhere,
                if self.elsewhere == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

/// `/debug/explain` of the running proxy: the model's explanation, and the kernel's view.
pub fn explain_live(
    hub: &Arc<Hub>,
    snap: &Arc<Snapshot>,
    q: &ExplainQuery,
) -> Result<LiveExplanation, String> {
    let explanation = explain_in(hub, snap, q)?;
    let socket_lb = hub
        .socket_lb()
        .and_then(|cgroup| socket_lb_line(snap, &explanation, cgroup));
    Ok(LiveExplanation {
        explanation,
        socket_lb,
        kernel: q.kernel.then(|| kernel_view(hub, snap, q)),
    })
}

/// What the socket hooks do with a connection to the packet's ClusterIP and port (issue 18):
/// the same choice as the rules, made at `connect()`/`sendmsg()`, for sockets of processes
/// in `cgroup`. `None` when the hooks leave the frontend to the rules.
fn socket_lb_line(snap: &Snapshot, e: &Explanation, cgroup: &str) -> Option<String> {
    let f = e.frontend.as_ref()?;
    if f.kind != "ClusterIP" {
        return None;
    }
    // The port the explanation hit (its protocol is the packet's, in Kubernetes' spelling).
    let name = kpr_model::ServicePortName::new(
        kpr_model::ServiceName::new(f.namespace.as_str(), f.service.as_str()),
        f.port_name.as_str(),
        kpr_model::Protocol::from_k8s(Some(&e.packet.protocol))?,
    );
    let sp = snap.desired.families.get(&e.family)?.ports.get(&name)?;
    let (_, entry) = kpr_socklb::plan::entry(sp)?;
    Some(if entry.refuses() {
        format!(
            "a connect() from a process in cgroup {cgroup} fails at once with ECONNREFUSED (no endpoints); other sockets meet the rules below"
        )
    } else {
        format!(
            "a connect() or sendmsg() from a process in cgroup {cgroup} is given one of these {} endpoint(s) before any packet exists: no DNAT, no conntrack NAT{}; other sockets (e.g. from other nodes) meet the rules below",
            entry.backends.len(),
            if entry.affinity > 0 {
                format!(
                    ", ClientIP affinity per network namespace for {} s",
                    entry.affinity
                )
            } else {
                String::new()
            }
        )
    })
}

fn outcome_text(o: &Outcome) -> String {
    let masq = |m: bool| if m { " (masquerade)" } else { "" };
    match o {
        Outcome::Dnat { to, masquerade } => format!("DNAT to {to}{}", masq(*masquerade)),
        Outcome::Pass { masquerade } => format!("PASS{}", masq(*masquerade)),
        Outcome::Drop => "DROP".into(),
        Outcome::Reject => "REJECT".into(),
    }
}

fn unknown(summary: String) -> KernelView {
    KernelView {
        status: "unknown",
        agrees: None,
        summary,
        committed: Vec::new(),
        kernel: Vec::new(),
        differences: Vec::new(),
        elsewhere: 0,
    }
}

/// Traces the packet through the committed rules, recording its path; compares the kernel
/// with them; and traces again through the committed rules minus what the kernel lacks.
pub fn kernel_view(hub: &Arc<Hub>, snap: &Arc<Snapshot>, q: &ExplainQuery) -> KernelView {
    let pkt = match parse_packet(q, &snap.node.node_ips) {
        Ok(p) => p,
        Err(e) => return unknown(e),
    };
    let family = IpFamily::of(&pkt.dst);
    let reading = match reading(hub, snap) {
        Ok(r) => r,
        Err(e) => return unknown(format!("unknown: {e}")),
    };
    let checked = &reading.checked;
    let Some(committed) = checked.committed.get(&family) else {
        return unknown(format!("unknown: nothing committed for {family}"));
    };
    let tpkt = TracePacket {
        src: pkt.src,
        iif: pkt.iif.clone(),
        from_host: pkt.from_host,
        dst: pkt.dst,
        proto: layout::l4(pkt.protocol),
        port: pkt.port,
        local_ips: crate::dataplane::local_addresses(),
    };
    let mut view = judge(committed, &checked.differences, &tpkt, family);
    let age = reading.at.elapsed();
    if age >= Duration::from_secs(1) {
        view.summary = format!(
            "{} (the kernel's rules as read {:.0} s ago)",
            view.summary,
            age.as_secs_f64()
        );
    }
    view
}

/// How long a request waits for a reading of the kernel before answering without it (a
/// 10,000-Service table takes seconds to list; the reading goes on and serves the next ask).
const READING_WAIT: Duration = Duration::from_millis(40);

/// A comparison of the kernel with this snapshot's committed rules: the one kept from the
/// last `verify` or explain if it is recent, else a new one, read on a thread of its own and
/// waited for at most [`READING_WAIT`].
fn reading(hub: &Arc<Hub>, snap: &Arc<Snapshot>) -> Result<Arc<Reading>, String> {
    if let Some(r) = hub.reading(snap.generation, READING_TTL) {
        return Ok(r);
    }
    // Reading costs what listing every rule costs: at most a tenth of the time.
    if let Some(last) = hub.last_reading()
        && last.at.elapsed() < last.took * 10
    {
        return Err(format!(
            "the proxy synced since the kernel was last read, {:.1} s ago; a table this size takes {:.1} s to read, so it is read at most every {:.0} s: ask again then",
            last.at.elapsed().as_secs_f64(),
            last.took.as_secs_f64(),
            (last.took * 10).as_secs_f64().ceil()
        ));
    }
    if !hub.start_reading() {
        return Err("the kernel's rules are being read (a large table takes seconds); ask again in a moment".into());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (h, s) = (hub.clone(), snap.clone());
    let spawned = std::thread::Builder::new()
        .name("kernel-reading".into())
        .spawn(move || {
            let start = std::time::Instant::now();
            let result = check(&Setup::of(&h), &s.desired, &s.node, None).and_then(|checked| {
                if wrote_since(&h, s.generation) {
                    Err("the proxy synced while the kernel was being read; ask again".into())
                } else {
                    Ok(h.store_reading(s.generation, start.elapsed(), checked))
                }
            });
            h.end_reading();
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        hub.end_reading();
        return Err(format!("cannot start reading the kernel: {e}"));
    }
    match rx.recv_timeout(READING_WAIT) {
        Ok(result) => result,
        Err(_) => Err("the kernel's rules are being read (a large table takes seconds); ask again in a moment".into()),
    }
}

/// The kernel's view of a packet, from the committed rules and the differences of its family.
pub fn judge(
    committed: &Committed,
    all: &[Difference],
    tpkt: &TracePacket,
    family: IpFamily,
) -> KernelView {
    let traced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        trace_both(committed, all, tpkt, family)
    }));
    let Ok((rules, kernel, relevant)) = traced else {
        return unknown("unknown: the packet could not be traced through the rules".into());
    };
    let elsewhere = all.len() - relevant.len();
    let differences: Vec<Difference> = relevant.into_iter().map(|i| all[i].clone()).collect();
    let foreign = differences
        .iter()
        .any(|d| matches!(d.kind, Kind::Extra | Kind::Different));
    let texts = |o: &BTreeSet<Outcome>| o.iter().map(outcome_text).collect::<Vec<_>>();
    let (status, agrees, summary) = if differences.is_empty() {
        (
            "agrees",
            Some(true),
            "the kernel agrees: nothing this packet runs through or looks up differs from what was committed".to_owned(),
        )
    } else if foreign {
        (
            "uncertain",
            None,
            "uncertain: rules or elements the proxy did not commit are on this packet's path (below); the tracer cannot know what they do".to_owned(),
        )
    } else if rules == kernel {
        (
            "agrees",
            Some(true),
            "the kernel agrees: what it lacks on this packet's path (below) does not change where the packet goes".to_owned(),
        )
    } else {
        (
            "disagrees",
            Some(false),
            format!(
                "the kernel DISAGREES with the model: by the kernel's rules this packet gets {}, by the model {}",
                texts(&kernel).join(", "),
                texts(&rules).join(", ")
            ),
        )
    };
    KernelView {
        status,
        agrees,
        summary,
        committed: texts(&rules),
        kernel: texts(&kernel),
        differences,
        elsewhere,
    }
}

/// (outcomes by the committed rules, by the kernel's, indexes of the differences on the path).
fn trace_both(
    committed: &Committed,
    diffs: &[Difference],
    pkt: &TracePacket,
    family: IpFamily,
) -> (BTreeSet<Outcome>, BTreeSet<Outcome>, Vec<usize>) {
    use kpr_dataplane::nftables::trace::{trace, trace_path};
    match committed {
        Committed::Nft { tx, .. } => {
            let view = TxView::from_full(tx);
            let (rules, path) = trace_path(&view, pkt);
            let relevant = (0..diffs.len())
                .filter(|i| match &diffs[*i].at {
                    At::Nft(d) => nft_on_path(d, &path),
                    _ => false,
                })
                .collect();
            let mut kv = TxView::from_full(tx);
            for d in diffs {
                if let At::Nft(d) = &d.at {
                    nft_remove(&mut kv, d, family);
                }
            }
            (rules, trace(&kv, pkt), relevant)
        }
        Committed::Ipt { chains } => {
            use kpr_dataplane::iptables::trace::{trace, trace_path};
            let (rules, path) = trace_path(chains, pkt);
            let relevant = (0..diffs.len())
                .filter(|i| match &diffs[*i].at {
                    At::Ipt(d) => ipt_on_path(d, chains, &path),
                    _ => false,
                })
                .collect();
            let mut kv = chains.clone();
            for d in diffs {
                if let At::Ipt(d) = &d.at {
                    ipt_remove(&mut kv, d);
                }
            }
            (rules, trace(&kv, pkt), relevant)
        }
    }
}

/// Whether an nftables difference is in what the packet's trace read.
fn nft_on_path(d: &nft::Diff, path: &Path) -> bool {
    use nft::Item;
    match (d.obj_kind.as_str(), &d.item) {
        ("table", _) => true,
        // An extra base chain sees every packet of its hook; an extra regular chain is only
        // reached through an extra rule or element, reported on its own.
        ("chain", Item::Whole { base }) if d.kind == Kind::Extra => *base,
        ("chain", _) => path.chains.contains(&d.name),
        (_, Item::Element(key)) => element_on_path(&d.name, key, path),
        _ => path.reads(&d.name),
    }
}

fn element_on_path(set: &str, key: &str, path: &Path) -> bool {
    let contains = |ip: &std::net::IpAddr| {
        key.parse::<ipnet::IpNet>().is_ok_and(|n| n.contains(ip))
            || key.parse::<std::net::IpAddr>().is_ok_and(|a| a == *ip)
    };
    path.lookups
        .iter()
        .any(|(s, k)| s == set && kpr_nft::text::key(k) == key)
        || path
            .addr_tests
            .iter()
            .any(|(s, ip)| s == set && contains(ip))
        || path.buckets.get(set).is_some_and(|ranges| {
            key.parse::<u64>()
                .is_ok_and(|b| ranges.iter().any(|r| r.contains(&b)))
        })
}

/// Takes from the view what the kernel lacks (the committed side of a missing or different
/// part; extra parts cannot be added: the tracer does not know them).
fn nft_remove(view: &mut TxView, d: &nft::Diff, family: IpFamily) {
    use nft::Item;
    if d.kind == Kind::Extra {
        return;
    }
    let f = nft_family(family);
    match (d.obj_kind.as_str(), &d.item) {
        ("table", Item::Whole { .. }) => *view = TxView::default(),
        ("chain", Item::Whole { .. }) => view.remove_chain(&d.name),
        ("chain", Item::Rule(text)) => {
            view.remove_rule(&d.name, |r| kpr_nft::text::rule(r, f, true) == *text);
        }
        ("set" | "map", Item::Whole { .. }) => view.remove_elements(&d.name, |_| true),
        (_, Item::Element(key)) => view.remove_elements(&d.name, |k| kpr_nft::text::key(k) == *key),
        _ => {}
    }
}

/// Whether an iptables difference is on the packet's path: a committed rule (missing or
/// changed) whose matches held for it, anything else in a chain it ran through.
fn ipt_on_path(
    d: &ipt::Diff,
    chains: &BTreeMap<ChainKey, Vec<ipt_backend::Rule>>,
    path: &kpr_dataplane::iptables::trace::Path,
) -> bool {
    match (&d.rule, d.kind) {
        (None, Kind::Extra) if !d.order => false,
        (Some(norm), Kind::Missing | Kind::Different) => chains
            .get(&d.chain)
            .and_then(|rules| {
                rules
                    .iter()
                    .position(|r| ipt::normalize(&r.text()) == *norm)
            })
            .is_some_and(|i| path.matched.contains(&(d.chain.clone(), i))),
        _ => path.chains.contains(&d.chain),
    }
}

fn ipt_remove(chains: &mut BTreeMap<ChainKey, Vec<ipt_backend::Rule>>, d: &ipt::Diff) {
    if d.kind == Kind::Extra || d.order {
        return;
    }
    match &d.rule {
        None => {
            // A missing chain: nothing in the kernel can jump to it either.
            chains.remove(&d.chain);
            let (table, name) = (&d.chain.0, &d.chain.1);
            for ((t, _), rules) in chains.iter_mut() {
                if t == table {
                    rules.retain(
                        |r| !matches!(&r.target, ipt_backend::Target::Jump(c) if c == name),
                    );
                }
            }
        }
        Some(norm) => {
            if let Some(rules) = chains.get_mut(&d.chain)
                && let Some(i) = rules
                    .iter()
                    .position(|r| ipt::normalize(&r.text()) == *norm)
            {
                rules.remove(i);
            }
        }
    }
}
