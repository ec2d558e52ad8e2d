//! A packet tracer over the typed rules: where does a new connection go?
//!
//! Walks the base chains of the hooks a packet traverses, in priority order, evaluating every
//! match and statement of the typed representation (and failing loudly on nothing: every variant
//! is understood). Random picks are explored both ways, so the result is the set of possible
//! outcomes — for a Service, one DNAT per endpoint. Tests compare it with the model's intent
//! (`kpr_model::intent`), which states what should happen; this says what the rules do.

use kpr_nft::{
    Addr, Chain, ChainType, Hook, Key, KeyType, L4Proto, Match, Op, Rule, Statement, Transaction,
    Verdict,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// A ruleset the tracer can walk.
pub trait RulesetView {
    fn base_chains(&self) -> Vec<Chain>;
    fn rules(&self, chain: &str) -> &[Rule];
    fn map_get(&self, map: &str, key: &Key) -> Option<Verdict>;
    fn set_contains(&self, set: &str, ip: IpAddr) -> bool;
    /// Whether a set holds exactly this key.
    fn has_key(&self, set: &str, key: &Key) -> bool;
    /// The DNAT targets of an endpoint map, with their buckets.
    fn targets(&self, map: &str) -> Vec<(SocketAddr, u32)>;
    /// The DNAT target of one key of an endpoint map.
    fn target(&self, map: &str, key: &Key) -> Option<SocketAddr>;
}

/// A view of the objects a transaction adds (enough for a full render).
#[derive(Debug, Default)]
pub struct TxView {
    chains: BTreeMap<String, Chain>,
    rules: BTreeMap<String, Vec<Rule>>,
    elements: BTreeMap<(String, Key), (Option<Verdict>, Option<SocketAddr>)>,
}

impl TxView {
    /// Collects what a full transaction adds; deletes before the last `AddTable` are ignored.
    pub fn from_full(tx: &Transaction) -> TxView {
        let mut v = TxView::default();
        v.apply(tx);
        v
    }

    /// What the table holds once `tx` is applied too (a partial sync after a full one).
    pub fn apply(&mut self, tx: &Transaction) {
        for op in &tx.ops {
            match op {
                Op::DeleteTable => *self = TxView::default(),
                Op::AddChain(c) => {
                    self.chains.insert(c.name.clone(), c.clone());
                }
                Op::FlushChain(c) => {
                    self.rules.remove(c);
                }
                Op::DeleteChain(c) => self.remove_chain(c),
                Op::AddRule(r) => self
                    .rules
                    .entry(r.chain.clone())
                    .or_default()
                    .push(r.clone()),
                Op::AddElement(e) => {
                    self.elements
                        .insert((e.set.clone(), e.key), (e.verdict.clone(), e.target));
                }
                Op::DeleteElement(e) => {
                    self.elements.remove(&(e.set.clone(), e.key));
                }
                Op::FlushSet(s) | Op::DeleteSet(s) => self.remove_elements(s, |_| true),
                Op::AddTable(_) | Op::AddSet(_) | Op::AddMap(_) => {}
            }
        }
    }
}

impl TxView {
    /// The chains it declares.
    pub fn chains(&self) -> impl Iterator<Item = &Chain> {
        self.chains.values()
    }

    /// The rules of one chain, in order.
    pub fn chain_rules(&self, chain: &str) -> &[Rule] {
        self.rules.get(chain).map_or(&[], Vec::as_slice)
    }

    /// Forgets a chain and its rules (what a kernel without that chain holds).
    pub fn remove_chain(&mut self, name: &str) {
        self.chains.remove(name);
        self.rules.remove(name);
    }

    /// Forgets the first rule of `chain` that `is` picks; whether one was.
    pub fn remove_rule(&mut self, chain: &str, is: impl Fn(&Rule) -> bool) -> bool {
        let Some(rules) = self.rules.get_mut(chain) else {
            return false;
        };
        match rules.iter().position(is) {
            Some(i) => {
                rules.remove(i);
                true
            }
            None => false,
        }
    }

    /// Forgets the elements of `set` whose key `is` picks.
    pub fn remove_elements(&mut self, set: &str, is: impl Fn(&Key) -> bool) {
        self.elements.retain(|(s, k), _| s != set || !is(k));
    }
}

impl RulesetView for TxView {
    fn base_chains(&self) -> Vec<Chain> {
        self.chains
            .values()
            .filter(|c| c.base.is_some())
            .cloned()
            .collect()
    }
    fn rules(&self, chain: &str) -> &[Rule] {
        self.rules.get(chain).map_or(&[], Vec::as_slice)
    }
    fn map_get(&self, map: &str, key: &Key) -> Option<Verdict> {
        self.elements
            .get(&(map.to_owned(), *key))
            .and_then(|(v, _)| v.clone())
    }
    fn has_key(&self, set: &str, key: &Key) -> bool {
        self.elements.contains_key(&(set.to_owned(), *key))
    }
    fn targets(&self, map: &str) -> Vec<(SocketAddr, u32)> {
        self.elements
            .iter()
            .filter(|((m, _), _)| m == map)
            .filter_map(|((_, k), (_, t))| match (k, t) {
                (Key::Bucket(b), Some(t)) => Some((*t, *b)),
                _ => None,
            })
            .collect()
    }
    fn target(&self, map: &str, key: &Key) -> Option<SocketAddr> {
        self.elements
            .get(&(map.to_owned(), *key))
            .and_then(|(_, t)| *t)
    }
    fn set_contains(&self, set: &str, ip: IpAddr) -> bool {
        self.elements.keys().any(|(s, k)| {
            s == set
                && match k {
                    Key::Addr(a) => *a == ip,
                    Key::Net(n) => n.contains(&ip),
                    _ => false,
                }
        })
    }
}

/// A new connection's first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePacket {
    pub src: IpAddr,
    pub iif: Option<String>,
    /// Generated on this host (output path).
    pub from_host: bool,
    pub dst: IpAddr,
    pub proto: L4Proto,
    pub port: u16,
    /// This host's addresses (for `fib ... type local`).
    pub local_ips: Vec<IpAddr>,
}

/// One possible fate of the packet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Dnat {
        to: SocketAddr,
        masquerade: bool,
    },
    /// Not rewritten (masquerade only if marked).
    Pass {
        masquerade: bool,
    },
    Drop,
    Reject,
}

#[derive(Debug, Clone)]
struct State {
    dst: SocketAddr,
    dnat: bool,
    mark: u32,
    masquerade: bool,
}

enum Flow {
    /// Fell off the end or returned.
    Continue,
    Accept,
    Drop,
    Reject,
}

/// What a packet's trace looked at: the chains it ran through, the verdict-map and set lookups
/// it made, and the endpoint-map buckets the rules it ran through can draw. Only these parts
/// of a ruleset can change its fate (the rest it never reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path {
    pub chains: BTreeSet<String>,
    /// Exact-key lookups: verdict maps, and pair sets (`ip saddr . ip daddr @set`).
    pub lookups: BTreeSet<(String, Key)>,
    /// Address-membership tests (`ip daddr @set`), with the address tested.
    pub addr_tests: BTreeSet<(String, IpAddr)>,
    /// Endpoint maps drawn from, with the bucket ranges (`offset .. offset + mod`) of every
    /// `numgen` rule in the chains run through.
    pub buckets: BTreeMap<String, Vec<std::ops::Range<u64>>>,
}

impl Path {
    /// Whether the trace read set or map `name` at all.
    pub fn reads(&self, name: &str) -> bool {
        self.lookups.iter().any(|(s, _)| s == name)
            || self.addr_tests.iter().any(|(s, _)| s == name)
            || self.buckets.contains_key(name)
    }
}

/// A view that remembers what the tracer asks of it.
struct Recorder<'a> {
    inner: &'a dyn RulesetView,
    path: std::cell::RefCell<Path>,
}

impl RulesetView for Recorder<'_> {
    fn base_chains(&self) -> Vec<Chain> {
        self.inner.base_chains()
    }
    fn rules(&self, chain: &str) -> &[Rule] {
        self.path.borrow_mut().chains.insert(chain.to_owned());
        self.inner.rules(chain)
    }
    fn map_get(&self, map: &str, key: &Key) -> Option<Verdict> {
        self.path
            .borrow_mut()
            .lookups
            .insert((map.to_owned(), *key));
        self.inner.map_get(map, key)
    }
    fn set_contains(&self, set: &str, ip: IpAddr) -> bool {
        self.path
            .borrow_mut()
            .addr_tests
            .insert((set.to_owned(), ip));
        self.inner.set_contains(set, ip)
    }
    fn has_key(&self, set: &str, key: &Key) -> bool {
        self.path
            .borrow_mut()
            .lookups
            .insert((set.to_owned(), *key));
        self.inner.has_key(set, key)
    }
    fn targets(&self, map: &str) -> Vec<(SocketAddr, u32)> {
        self.path
            .borrow_mut()
            .buckets
            .entry(map.to_owned())
            .or_default();
        self.inner.targets(map)
    }
    fn target(&self, map: &str, key: &Key) -> Option<SocketAddr> {
        self.path
            .borrow_mut()
            .lookups
            .insert((map.to_owned(), *key));
        self.inner.target(map, key)
    }
}

/// [`trace`], also saying what the trace looked at.
pub fn trace_path(view: &dyn RulesetView, pkt: &TracePacket) -> (BTreeSet<Outcome>, Path) {
    let rec = Recorder {
        inner: view,
        path: Default::default(),
    };
    let outcomes = trace(&rec, pkt);
    let mut path = rec.path.into_inner();
    // The bucket ranges of the endpoint maps drawn from, from the rules that draw them.
    for chain in &path.chains {
        for rule in view.rules(chain) {
            for s in &rule.statements {
                if let Statement::DnatMap {
                    map,
                    offset,
                    modulus,
                } = s
                    && let Some(ranges) = path.buckets.get_mut(map)
                {
                    let start = u64::from(*offset);
                    ranges.push(start..start + u64::from(*modulus));
                }
            }
        }
    }
    (outcomes, path)
}

/// Every possible outcome for the packet.
pub fn trace(view: &dyn RulesetView, pkt: &TracePacket) -> BTreeSet<Outcome> {
    let start = State {
        dst: SocketAddr::new(pkt.dst, pkt.port),
        dnat: false,
        mark: 0,
        masquerade: false,
    };
    let first: &[Hook] = if pkt.from_host {
        &[Hook::Output]
    } else {
        &[Hook::Prerouting]
    };
    let mut out = BTreeSet::new();
    for st in run_hooks(view, pkt, first, start) {
        let Ok(st) = st else {
            out.insert(st.err().unwrap_or(Outcome::Drop));
            continue;
        };
        // Routing decision after DNAT: local destination -> input, otherwise forward.
        // Locally generated packets to a local address come back in through input.
        let local = pkt.local_ips.contains(&st.dst.ip());
        let second: &[Hook] = if pkt.from_host && local {
            &[Hook::Postrouting, Hook::Input]
        } else if pkt.from_host {
            &[Hook::Postrouting]
        } else if local {
            &[Hook::Input]
        } else {
            &[Hook::Forward, Hook::Postrouting]
        };
        for st in run_hooks(view, pkt, second, st) {
            out.insert(match st {
                Err(o) => o,
                Ok(s) if s.dnat => Outcome::Dnat {
                    to: s.dst,
                    masquerade: s.masquerade,
                },
                Ok(s) => Outcome::Pass {
                    masquerade: s.masquerade,
                },
            });
        }
    }
    out
}

fn run_hooks(
    view: &dyn RulesetView,
    pkt: &TracePacket,
    hooks: &[Hook],
    st: State,
) -> Vec<Result<State, Outcome>> {
    let mut chains: Vec<Chain> = view
        .base_chains()
        .into_iter()
        .filter(|c| c.base.is_some_and(|b| hooks.contains(&b.hook)))
        .collect();
    chains.sort_by_key(|c| {
        c.base.map(|b| {
            (
                hooks.iter().position(|h| *h == b.hook),
                b.priority,
                b.chain_type == ChainType::Filter,
            )
        })
    });
    let mut states = vec![Ok(st)];
    for chain in chains {
        let mut next = Vec::new();
        for s in states {
            let Ok(s) = s else {
                next.push(s);
                continue;
            };
            for (s, flow) in eval_chain(view, pkt, &chain.name, s, 0) {
                next.push(match flow {
                    Flow::Drop => Err(Outcome::Drop),
                    Flow::Reject => Err(Outcome::Reject),
                    Flow::Continue | Flow::Accept => Ok(s),
                });
            }
        }
        states = next;
    }
    states
}

fn eval_chain(
    view: &dyn RulesetView,
    pkt: &TracePacket,
    chain: &str,
    st: State,
    depth: usize,
) -> Vec<(State, Flow)> {
    assert!(depth < 64, "chain recursion too deep at {chain}");
    eval_rules(view, pkt, view.rules(chain), 0, st, depth)
}

fn eval_rules(
    view: &dyn RulesetView,
    pkt: &TracePacket,
    rules: &[Rule],
    i: usize,
    st: State,
    depth: usize,
) -> Vec<(State, Flow)> {
    let Some(rule) = rules.get(i) else {
        return vec![(st, Flow::Continue)];
    };
    let mut out = Vec::new();
    for (st, matched) in eval_matches(view, pkt, &rule.matches, st) {
        if !matched {
            out.extend(eval_rules(view, pkt, rules, i + 1, st, depth));
            continue;
        }
        for (st, flow) in exec(view, pkt, &rule.statements, st, depth) {
            match flow {
                None => out.extend(eval_rules(view, pkt, rules, i + 1, st, depth)),
                Some(f) => out.push((st, f)),
            }
        }
    }
    out
}

/// Evaluates a rule's matches; random matches fork.
fn eval_matches(
    view: &dyn RulesetView,
    pkt: &TracePacket,
    matches: &[Match],
    st: State,
) -> Vec<(State, bool)> {
    let mut branches = vec![(st, true)];
    for m in matches {
        let mut next = Vec::new();
        for (st, ok) in branches {
            if !ok {
                next.push((st, false));
                continue;
            }
            let addr = |a: &Addr| {
                if *a == Addr::Saddr {
                    pkt.src
                } else {
                    st.dst.ip()
                }
            };
            let result = match m {
                Match::Net {
                    addr: a,
                    negate,
                    net,
                } => net.contains(&addr(a)) != *negate,
                Match::InSet {
                    addr: a,
                    negate,
                    set,
                } => view.set_contains(set, addr(a)) != *negate,
                Match::NotInNets { addr: a, nets } => !nets.iter().any(|n| n.contains(&addr(a))),
                Match::L4Proto(p) => *p == pkt.proto,
                Match::Dport(p) => *p == st.dst.port(),
                Match::FibLocal(a) => pkt.local_ips.contains(&addr(a)),
                Match::IifName {
                    name,
                    prefix,
                    negate,
                } => {
                    let hit = pkt.iif.as_deref().is_some_and(|i| {
                        if *prefix {
                            i.starts_with(name.as_str())
                        } else {
                            i == name
                        }
                    });
                    hit != *negate
                }
                Match::MarkClear(bit) => st.mark & bit == 0,
                Match::CtStateNew => true,
                Match::CtStatusDnat => st.dnat,
                Match::PairInSet { set } => view.has_key(set, &Key::AddrPair(pkt.src, st.dst.ip())),
                Match::RandomOneIn(n) => {
                    if *n > 1 {
                        next.push((st.clone(), false));
                    }
                    true
                }
            };
            next.push((st, result));
        }
        branches = next;
    }
    branches
}

/// The fates of a draw from an endpoint map: every target of a bucket that can be drawn is a
/// possible pick; unless `all` buckets have one, a drawn bucket without a target stops the
/// rule, and the next one runs.
fn draws(st: State, mut targets: Vec<SocketAddr>, all: bool) -> Vec<(State, Option<Flow>)> {
    targets.sort();
    targets.dedup();
    let mut out = if all || targets.is_empty() {
        Vec::new()
    } else {
        vec![(st.clone(), None)]
    };
    if targets.is_empty() {
        return vec![(st, None)];
    }
    out.extend(targets.into_iter().map(|to| {
        let mut s = st.clone();
        s.dst = to;
        s.dnat = true;
        (s, Some(Flow::Accept))
    }));
    out
}

/// Runs statements; `None` flow means "continue with the next rule".
fn exec(
    view: &dyn RulesetView,
    pkt: &TracePacket,
    stmts: &[Statement],
    st: State,
    depth: usize,
) -> Vec<(State, Option<Flow>)> {
    let Some((first, rest)) = stmts.split_first() else {
        return vec![(st, None)];
    };
    let mut st = st;
    let verdict = match first {
        Statement::Vmap { key, map } => {
            let k = match key {
                KeyType::AddrProtoPort => Key::AddrProtoPort(st.dst.ip(), pkt.proto, st.dst.port()),
                KeyType::ProtoPort => Key::ProtoPort(pkt.proto, st.dst.port()),
                KeyType::Addr => Key::Addr(st.dst.ip()),
                KeyType::AddrPair => Key::AddrPair(pkt.src, st.dst.ip()),
                // A bucket-keyed verdict map is never rendered.
                KeyType::Bucket(_) | KeyType::VipBucket(_) => return vec![(st, None)],
            };
            match view.map_get(map, &k) {
                Some(v) => v,
                None => return vec![(st, None)],
            }
        }
        Statement::MarkOr(b) => {
            st.mark |= b;
            return exec(view, pkt, rest, st, depth);
        }
        Statement::MarkXor(b) => {
            st.mark ^= b;
            return exec(view, pkt, rest, st, depth);
        }
        Statement::UpdateSaddr { .. } => return exec(view, pkt, rest, st, depth),
        Statement::Masquerade => {
            st.masquerade = true;
            return vec![(st, Some(Flow::Accept))];
        }
        Statement::Dnat { addr, port } => {
            st.dst = SocketAddr::new(*addr, *port);
            st.dnat = true;
            return vec![(st, Some(Flow::Accept))];
        }
        Statement::DnatMap {
            map,
            offset,
            modulus,
        } => {
            // Every target of a bucket that can be drawn is a possible pick; a drawn bucket
            // without a target stops the rule, and the next one runs.
            let range = u64::from(*offset)..u64::from(*offset) + u64::from(*modulus);
            let hits: BTreeMap<u32, SocketAddr> = view
                .targets(map)
                .into_iter()
                .filter(|(_, b)| range.contains(&u64::from(*b)))
                .map(|(t, b)| (b, t))
                .collect();
            let targets: Vec<SocketAddr> = hits.values().copied().collect();
            let all = hits.len() as u64 >= u64::from(*modulus);
            return draws(st, targets, all);
        }
        Statement::DnatVipMap { map, modulus, .. } => {
            // Keyed by the address and port the packet was sent to, and the bucket drawn.
            let (ip, port) = (st.dst.ip(), st.dst.port());
            let targets: Vec<SocketAddr> = (0..*modulus)
                .filter_map(|b| view.target(map, &Key::VipBucket(ip, port, b)))
                .collect();
            let all = targets.len() as u64 >= u64::from(*modulus);
            return draws(st, targets, all);
        }
        Statement::Reject => return vec![(st, Some(Flow::Reject))],
        Statement::Verdict(v) => v.clone(),
    };
    match verdict {
        Verdict::Accept => vec![(st, Some(Flow::Accept))],
        Verdict::Drop => vec![(st, Some(Flow::Drop))],
        Verdict::Return => vec![(st, Some(Flow::Continue))],
        Verdict::Jump(c) => eval_chain(view, pkt, &c, st, depth + 1)
            .into_iter()
            .flat_map(|(s, f)| match f {
                Flow::Continue => exec(view, pkt, rest, s, depth),
                f => vec![(s, Some(f))],
            })
            .collect(),
        // A goto'd chain that ends returns to this chain's caller.
        Verdict::Goto(c) => eval_chain(view, pkt, &c, st, depth + 1)
            .into_iter()
            .map(|(s, f)| (s, Some(f)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpr_nft::{BaseChain, Element, Family, Table};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// A prerouting chain looking up a verdict map, one service chain drawing from buckets
    /// 10..12 of an endpoint map another service shares.
    fn view() -> TxView {
        let table = Table {
            family: Family::Ip,
            name: "t".into(),
            comment: None,
        };
        let mut tx = Transaction::new(table.clone());
        tx.push(Op::AddTable(table));
        tx.push(Op::AddChain(Chain {
            name: "pre".into(),
            base: Some(BaseChain {
                chain_type: ChainType::Nat,
                hook: Hook::Prerouting,
                priority: -100,
            }),
            comment: None,
        }));
        for c in ["svc", "other"] {
            tx.push(Op::AddChain(Chain {
                name: c.into(),
                base: None,
                comment: None,
            }));
        }
        tx.push(Op::AddRule(Rule::new("pre").s(Statement::Vmap {
            key: KeyType::AddrProtoPort,
            map: "ips".into(),
        })));
        tx.push(Op::AddRule(
            Rule::new("svc")
                .m(Match::L4Proto(L4Proto::Tcp))
                .s(Statement::DnatMap {
                    map: "eps".into(),
                    offset: 10,
                    modulus: 2,
                }),
        ));
        let el = |set: &str, key, verdict, target| {
            Op::AddElement(Element {
                set: set.into(),
                key,
                verdict,
                target,
                comment: None,
            })
        };
        tx.push(el(
            "ips",
            Key::AddrProtoPort(ip("172.30.0.1"), L4Proto::Tcp, 80),
            Some(Verdict::Goto("svc".into())),
            None,
        ));
        for (b, t) in [
            (10, "10.0.0.1:80"),
            (11, "10.0.0.2:80"),
            (50, "10.0.0.9:80"),
        ] {
            tx.push(el("eps", Key::Bucket(b), None, t.parse().ok()));
        }
        TxView::from_full(&tx)
    }

    fn pkt(dst: &str) -> TracePacket {
        TracePacket {
            src: ip("10.0.0.5"),
            iif: None,
            from_host: false,
            dst: ip(dst),
            proto: L4Proto::Tcp,
            port: 80,
            local_ips: vec![],
        }
    }

    #[test]
    fn the_path_names_chains_lookups_and_bucket_ranges() {
        let v = view();
        let (out, path) = trace_path(&v, &pkt("172.30.0.1"));
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            path.chains,
            ["pre", "svc"].map(str::to_owned).into(),
            "not the chain nothing reaches"
        );
        assert!(path.lookups.contains(&(
            "ips".to_owned(),
            Key::AddrProtoPort(ip("172.30.0.1"), L4Proto::Tcp, 80)
        )));
        let want: Vec<std::ops::Range<u64>> = std::iter::once(10..12).collect();
        assert_eq!(path.buckets.get("eps"), Some(&want));
        assert!(path.reads("eps") && path.reads("ips") && !path.reads("other"));
        // A miss is a lookup too: an element added there would change the packet's fate.
        let (out, path) = trace_path(&v, &pkt("172.30.0.2"));
        assert_eq!(out, [Outcome::Pass { masquerade: false }].into());
        assert_eq!(path.chains, ["pre"].map(str::to_owned).into());
        assert!(path.buckets.is_empty());
    }

    #[test]
    fn a_view_without_what_the_kernel_lacks() {
        let mut v = view();
        v.remove_elements("eps", |k| *k == Key::Bucket(10));
        let out = trace(&v, &pkt("172.30.0.1"));
        // Bucket 10 has no target now: those packets fall through, undisturbed.
        assert!(
            out.contains(&Outcome::Pass { masquerade: false }),
            "{out:?}"
        );
        assert!(v.remove_rule("svc", |r| r.statements.len() == 1));
        assert!(!v.remove_rule("svc", |_| true));
        v.remove_chain("svc");
        assert_eq!(v.chains().count(), 2);
        assert_eq!(
            trace(&v, &pkt("172.30.0.1")),
            [Outcome::Pass { masquerade: false }].into()
        );
    }
}
