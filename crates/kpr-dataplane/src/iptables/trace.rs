//! Packet tracer over the typed iptables rules: where a new connection's first packet goes
//! (DNAT to which endpoint, masquerade, DROP, REJECT, PASS), following the kernel's order of
//! tables and hooks. Checked against the model's intent, like the nftables tracer.
//!
//! The order is the kernel's for the first packet of a connection. From outside: nat
//! PREROUTING, then routing on the (possibly DNATed) destination: filter INPUT when it is
//! local, else filter FORWARD and nat POSTROUTING. From this host: nat OUTPUT, filter OUTPUT,
//! nat POSTROUTING, and filter INPUT when the destination is local. Built-in chains have
//! policy ACCEPT and may be absent (empty). A jump to a chain that is not there is a rendering
//! bug (`iptables-restore` would refuse it) and panics.
//!
//! Random picks (`statistic`) and affinity checks (`recent --rcheck`) are explored both ways,
//! so the result is the set of possible outcomes. The conntrack state of a first packet is NEW,
//! never INVALID, RELATED or ESTABLISHED, and DNAT once a nat rule rewrote it.

use super::render::{ChainKey, Rendered};
use super::rules::{IptTable, M, Rule, Target};
use crate::nftables::layout::l4;
use crate::nftables::trace::{Outcome, TracePacket};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Every chain of a rendering, by (table, name).
pub fn chains(r: &Rendered) -> BTreeMap<ChainKey, Vec<Rule>> {
    r.all_chains()
}

/// The chains the kernel creates; the others must be declared before a jump.
const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Deeper than this is a loop (the kernel refuses loops at load time).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone)]
struct State {
    dst: SocketAddr,
    dnat: bool,
    mark: u32,
    masquerade: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Fell off the end of the chain or hit RETURN.
    Continue,
    /// ACCEPT (or a terminal NAT target): the rest of this table's hook is skipped.
    Accept,
    Drop,
    Reject,
}

/// Every possible outcome for the packet.
pub fn trace(chains: &BTreeMap<ChainKey, Vec<Rule>>, pkt: &TracePacket) -> BTreeSet<Outcome> {
    trace_path(chains, pkt).0
}

/// What a trace ran through: only these chains' rules can change the packet's fate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path {
    /// The chains run through, built-in ones included (even when absent).
    pub chains: BTreeSet<ChainKey>,
    /// The rules (chain, index) whose matches held for the packet on some branch: a rule
    /// missing from the kernel changes the packet's fate only if it is one of these.
    pub matched: BTreeSet<(ChainKey, usize)>,
}

/// [`trace`], also saying what the packet ran through.
pub fn trace_path(
    chains: &BTreeMap<ChainKey, Vec<Rule>>,
    pkt: &TracePacket,
) -> (BTreeSet<Outcome>, Path) {
    let w = Walk {
        chains,
        pkt,
        path: Default::default(),
    };
    let out = walk(&w);
    (out, w.path.into_inner())
}

/// One trace: the rules, the packet, and what it ran through so far.
struct Walk<'a> {
    chains: &'a BTreeMap<ChainKey, Vec<Rule>>,
    pkt: &'a TracePacket,
    path: std::cell::RefCell<Path>,
}

fn walk(w: &Walk<'_>) -> BTreeSet<Outcome> {
    let pkt = w.pkt;
    let start = State {
        dst: SocketAddr::new(pkt.dst, pkt.port),
        dnat: false,
        mark: 0,
        masquerade: false,
    };
    let first: &[(IptTable, &str)] = if pkt.from_host {
        &[(IptTable::Nat, "OUTPUT"), (IptTable::Filter, "OUTPUT")]
    } else {
        &[(IptTable::Nat, "PREROUTING")]
    };
    let mut out = BTreeSet::new();
    for st in run_hooks(w, first, start) {
        let st = match st {
            Ok(st) => st,
            Err(o) => {
                out.insert(o);
                continue;
            }
        };
        // Routing on the destination after DNAT; a host's packet to a local address comes
        // back in through INPUT.
        let local = pkt.local_ips.contains(&st.dst.ip());
        let second: &[(IptTable, &str)] = match (pkt.from_host, local) {
            (true, true) => &[(IptTable::Nat, "POSTROUTING"), (IptTable::Filter, "INPUT")],
            (true, false) => &[(IptTable::Nat, "POSTROUTING")],
            (false, true) => &[(IptTable::Filter, "INPUT")],
            (false, false) => &[
                (IptTable::Filter, "FORWARD"),
                (IptTable::Nat, "POSTROUTING"),
            ],
        };
        for st in run_hooks(w, second, st) {
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

/// Runs the built-in chains in order; `Err` is a final DROP or REJECT.
fn run_hooks(w: &Walk<'_>, hooks: &[(IptTable, &str)], st: State) -> Vec<Result<State, Outcome>> {
    let mut states = vec![Ok(st)];
    for (table, chain) in hooks {
        let mut next = Vec::new();
        for s in states {
            let Ok(s) = s else {
                next.push(s);
                continue;
            };
            // Policy ACCEPT: falling off the end of a built-in chain accepts.
            for (s, flow) in eval_chain(w, *table, chain, s, 0) {
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
    w: &Walk<'_>,
    table: IptTable,
    chain: &str,
    st: State,
    depth: usize,
) -> Vec<(State, Flow)> {
    assert!(depth < MAX_DEPTH, "chain recursion too deep at {chain}");
    let key = (table, chain.to_owned());
    w.path.borrow_mut().chains.insert(key.clone());
    let rules: &[Rule] = match w.chains.get(&key) {
        Some(rules) => rules,
        None if BUILTIN.contains(&chain) => &[],
        None => panic!(
            "jump to {chain} in {}, which the rendering does not declare",
            table.as_str()
        ),
    };
    let mut live = vec![st];
    let mut done = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if live.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for st in live {
            for (st, matched) in eval_matches(w.pkt, &rule.matches, st) {
                if !matched {
                    next.push(st);
                    continue;
                }
                w.path.borrow_mut().matched.insert((key.clone(), i));
                for (st, flow) in exec(w, table, &rule.target, st, depth) {
                    match flow {
                        None => next.push(st),
                        Some(f) => done.push((st, f)),
                    }
                }
            }
        }
        live = next;
    }
    done.extend(live.into_iter().map(|s| (s, Flow::Continue)));
    done
}

/// A conntrack state of a new connection's first packet.
fn ct_state(state: &str, st: &State) -> bool {
    match state {
        "NEW" => true,
        "DNAT" => st.dnat,
        "INVALID" | "RELATED" | "ESTABLISHED" | "UNTRACKED" | "SNAT" => false,
        other => panic!("unknown conntrack state {other}"),
    }
}

/// Evaluates a rule's matches; random and affinity matches fork.
fn eval_matches(pkt: &TracePacket, matches: &[M], st: State) -> Vec<(State, bool)> {
    let mut branches = vec![(st, true)];
    for m in matches {
        let mut next = Vec::new();
        for (st, ok) in branches {
            if !ok {
                next.push((st, false));
                continue;
            }
            let result = match m {
                M::Src { net, negate } => net.contains(&pkt.src) != *negate,
                M::Dst { net, negate } => net.contains(&st.dst.ip()) != *negate,
                M::Proto(p) => l4(*p) == pkt.proto,
                M::Dport(p) => *p == st.dst.port(),
                M::AddrTypeLocal { src, negate } => {
                    let ip = if *src { pkt.src } else { st.dst.ip() };
                    pkt.local_ips.contains(&ip) != *negate
                }
                M::InIface { name, negate } => {
                    let hit = pkt
                        .iif
                        .as_deref()
                        .is_some_and(|i| match name.strip_suffix('+') {
                            Some(prefix) => i.starts_with(prefix),
                            None => i == name,
                        });
                    hit != *negate
                }
                M::CtState { states, negate } => {
                    states.split(',').any(|s| ct_state(s, &st)) != *negate
                }
                M::Mark { mark, negate } => (st.mark & mark == *mark) != *negate,
                // The client may or may not have a live affinity entry for this endpoint.
                M::RecentCheck { .. } => {
                    next.push((st.clone(), false));
                    true
                }
                M::RecentSet { .. } => true,
                M::Probability(p) => {
                    if *p <= 0.0 {
                        false
                    } else {
                        if *p < 1.0 {
                            next.push((st.clone(), false));
                        }
                        true
                    }
                }
            };
            next.push((st, result));
        }
        branches = next;
    }
    branches
}

/// Runs a target; `None` flow means "continue with the next rule".
fn exec(
    w: &Walk<'_>,
    table: IptTable,
    target: &Target,
    mut st: State,
    depth: usize,
) -> Vec<(State, Option<Flow>)> {
    let flow = match target {
        Target::Jump(c) => {
            return eval_chain(w, table, c, st, depth + 1)
                .into_iter()
                .map(|(s, f)| (s, (f != Flow::Continue).then_some(f)))
                .collect();
        }
        Target::Accept => Flow::Accept,
        Target::Drop => Flow::Drop,
        Target::Reject => Flow::Reject,
        Target::Return => Flow::Continue,
        Target::Dnat(to) => {
            assert_eq!(table, IptTable::Nat, "DNAT outside the nat table");
            st.dst = *to;
            st.dnat = true;
            Flow::Accept
        }
        Target::MarkOr(m) => {
            st.mark |= m;
            return vec![(st, None)];
        }
        Target::MarkXor(m) => {
            st.mark ^= m;
            return vec![(st, None)];
        }
        Target::Masquerade { .. } => {
            assert_eq!(table, IptTable::Nat, "MASQUERADE outside the nat table");
            st.masquerade = true;
            Flow::Accept
        }
    };
    vec![(st, Some(flow))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use kpr_nft::L4Proto;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pkt(src: &str, dst: &str, port: u16) -> TracePacket {
        TracePacket {
            src: ip(src),
            iif: Some("eth0".into()),
            from_host: false,
            dst: ip(dst),
            proto: L4Proto::Tcp,
            port,
            local_ips: vec![ip("192.168.0.2")],
        }
    }

    fn table(rules: Vec<(IptTable, Rule)>) -> BTreeMap<ChainKey, Vec<Rule>> {
        let mut out: BTreeMap<ChainKey, Vec<Rule>> = BTreeMap::new();
        for (t, r) in rules {
            out.entry((t, r.chain.clone())).or_default().push(r);
        }
        out
    }

    fn dst(s: &str) -> M {
        M::Dst {
            net: IpNet::from(ip(s)),
            negate: false,
        }
    }

    #[test]
    fn jumps_return_and_random_picks() {
        let nat = IptTable::Nat;
        let c = table(vec![
            (nat, Rule::new("PREROUTING", Target::Jump("A".into()))),
            (nat, Rule::new("A", Target::Return).m(dst("10.9.9.9"))),
            (
                nat,
                Rule::new("A", Target::Jump("B".into())).m(M::Probability(0.5)),
            ),
            (nat, Rule::new("A", Target::MarkOr(0x4000))),
            (
                nat,
                Rule::new("A", Target::Dnat("10.0.0.2:80".parse().unwrap())),
            ),
            (
                nat,
                Rule::new("B", Target::Dnat("10.0.0.1:80".parse().unwrap())),
            ),
            (
                nat,
                Rule::new("POSTROUTING", Target::Masquerade { random_fully: true }).m(M::Mark {
                    mark: 0x4000,
                    negate: false,
                }),
            ),
        ]);
        let got = trace(&c, &pkt("203.0.113.7", "172.30.0.1", 80));
        let want: BTreeSet<Outcome> = [
            Outcome::Dnat {
                to: "10.0.0.1:80".parse().unwrap(),
                masquerade: false,
            },
            Outcome::Dnat {
                to: "10.0.0.2:80".parse().unwrap(),
                masquerade: true,
            },
        ]
        .into();
        assert_eq!(got, want);
        // RETURN from A: nothing else in PREROUTING, policy ACCEPT.
        let got = trace(&c, &pkt("203.0.113.7", "10.9.9.9", 80));
        assert_eq!(got, [Outcome::Pass { masquerade: false }].into());
    }

    #[test]
    fn the_path_names_every_chain_run_through() {
        let nat = IptTable::Nat;
        let c = table(vec![
            (nat, Rule::new("PREROUTING", Target::Jump("A".into()))),
            (nat, Rule::new("A", Target::Return).m(dst("10.9.9.9"))),
            (nat, Rule::new("A", Target::Jump("B".into()))),
            (nat, Rule::new("B", Target::Return)),
            (nat, Rule::new("C", Target::Return)),
        ]);
        let (_, path) = trace_path(&c, &pkt("203.0.113.7", "10.9.9.9", 80));
        let matched: Vec<(&str, usize)> = path
            .matched
            .iter()
            .map(|((_, c), i)| (c.as_str(), *i))
            .collect();
        assert_eq!(
            matched,
            [("A", 0), ("PREROUTING", 0)],
            "the RETURN, not the jump to B"
        );
        let path = path.chains;
        let want: BTreeSet<ChainKey> = [
            (nat, "PREROUTING"),
            (nat, "A"),
            (IptTable::Filter, "FORWARD"),
            (nat, "POSTROUTING"),
        ]
        .map(|(t, c)| (t, c.to_owned()))
        .into();
        // Not B (RETURN before its jump), not C (nothing jumps to it); the built-in chains of
        // the packet's hooks, even where absent.
        assert_eq!(path, want);
        let (_, path) = trace_path(&c, &pkt("203.0.113.7", "10.1.1.1", 80));
        assert!(path.chains.contains(&(nat, "B".to_owned())));
    }

    #[test]
    fn accept_ends_only_its_hook_and_filter_sees_the_dnat() {
        let (nat, filter) = (IptTable::Nat, IptTable::Filter);
        let to: SocketAddr = "192.168.0.2:8080".parse().unwrap();
        let c = table(vec![
            (
                nat,
                Rule::new("PREROUTING", Target::Dnat(to)).m(dst("1.2.3.4")),
            ),
            (filter, Rule::new("FORWARD", Target::Reject)),
            (filter, Rule::new("INPUT", Target::Accept).m(M::Dport(8080))),
            (filter, Rule::new("INPUT", Target::Drop)),
        ]);
        // DNATed to a local address: INPUT, not FORWARD.
        let got = trace(&c, &pkt("203.0.113.7", "1.2.3.4", 80));
        assert_eq!(
            got,
            [Outcome::Dnat {
                to,
                masquerade: false
            }]
            .into()
        );
        assert_eq!(
            trace(&c, &pkt("203.0.113.7", "5.6.7.8", 80)),
            [Outcome::Reject].into()
        );
        assert_eq!(
            trace(&c, &pkt("203.0.113.7", "192.168.0.2", 22)),
            [Outcome::Drop].into()
        );
    }

    #[test]
    #[should_panic(expected = "does not declare")]
    fn a_jump_to_a_missing_chain_is_a_bug() {
        let c = table(vec![(
            IptTable::Nat,
            Rule::new("PREROUTING", Target::Jump("KUBE-NOPE".into())),
        )]);
        trace(&c, &pkt("203.0.113.7", "1.2.3.4", 80));
    }
}
