//! Rendering for the iptables mode: desired state + what was committed + plan -> one
//! `iptables-restore --noflush` input per family (§13), in upstream's layout and names.
//!
//! Pure and deterministic. Each service port owns its nat chains (`KUBE-SVC/SVL/EXT/FW/SEP-…`)
//! and contributes rules to the top-level chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`,
//! `KUBE-EXTERNAL-SERVICES`, `KUBE-PROXY-FIREWALL`). A full render declares (and so flushes)
//! every chain of ours, rewrites it, fixes the jumps from the built-in chains and deletes the
//! stale service chains found in the kernel. A partial render writes only the chains of the
//! ports the plan names whose rules changed, and a top-level chain only when a contribution to
//! it changed: one endpoint change writes that Service's chains and nothing else (upstream
//! rewrites every top-level chain on every sync, §14 #11).

use super::naming::{endpoint_chain, service_chain};
use super::rules::{IptTable, M, Rule, Target};
use crate::nftables::NodePortAddrs;
use crate::nftables::render::{PortCtx, loopback, needed_endpoints, uses_local};
use ipnet::IpNet;
use kpr_model::desired::{
    Endpoint, ExternalAction, FamilyDesired, InternalAction, ServicePortDesired,
};
use kpr_model::node::LocalDetector;
use kpr_model::{IpFamily, Protocol, ServicePortName, SyncPlan};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

pub const SERVICES: &str = "KUBE-SERVICES";
pub const EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "KUBE-NODEPORTS";
pub const POSTROUTING: &str = "KUBE-POSTROUTING";
pub const MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const FORWARD: &str = "KUBE-FORWARD";
pub const PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const FIREWALL: &str = "KUBE-FIREWALL";
pub const CANARY: &str = "KUBE-PROXY-CANARY";

/// The per-service chain prefixes (all in `nat`).
pub const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// A chain of ours in one table.
pub type ChainKey = (IptTable, String);

/// Backend settings for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptConfig {
    pub family: IpFamily,
    /// `1 << masqueradeBit`.
    pub masquerade_mark: u32,
    pub node_port_addrs: NodePortAddrs,
    /// Localhost NodePorts (IPv4, match-all NodePort addresses, `iptables.localhostNodePorts`):
    /// 127.0.0.0/8 accepts NodePorts and kubelet's `KUBE-FIREWALL` gets the CVE-2020-8558
    /// guard (§4.4).
    pub localhost_node_ports: bool,
    /// DROP ctstate INVALID in `KUBE-FORWARD` (off when the host's `tcp_be_liberal` is set, §6.3).
    pub drop_invalid: bool,
    /// `MASQUERADE --random-fully`.
    pub random_fully: bool,
}

impl IptConfig {
    pub fn new(family: IpFamily, masquerade_bit: u8, node_port_addrs: NodePortAddrs) -> IptConfig {
        IptConfig {
            family,
            masquerade_mark: 1u32 << masquerade_bit.min(31),
            localhost_node_ports: false,
            node_port_addrs,
            drop_invalid: true,
            random_fully: true,
        }
    }

    fn loopback(&self) -> IpNet {
        loopback(self.family)
    }

    fn localhost(&self) -> bool {
        self.localhost_node_ports
            && self.family == IpFamily::V4
            && self.node_port_addrs == NodePortAddrs::All
    }
}

/// The jumps from built-in chains to ours (§13.1), in the order they must open each chain:
/// (table, built-in chain, target, only ctstate NEW, comment).
pub const JUMPS: &[(IptTable, &str, &str, bool, &str)] = &[
    (
        IptTable::Filter,
        "INPUT",
        PROXY_FIREWALL,
        true,
        "kubernetes load balancer firewall",
    ),
    (
        IptTable::Filter,
        "INPUT",
        NODEPORTS,
        false,
        "kubernetes health check service ports",
    ),
    (
        IptTable::Filter,
        "INPUT",
        EXTERNAL_SERVICES,
        true,
        "kubernetes externally-visible service portals",
    ),
    (
        IptTable::Filter,
        "FORWARD",
        PROXY_FIREWALL,
        true,
        "kubernetes load balancer firewall",
    ),
    (
        IptTable::Filter,
        "FORWARD",
        FORWARD,
        false,
        "kubernetes forwarding rules",
    ),
    (
        IptTable::Filter,
        "FORWARD",
        SERVICES,
        true,
        "kubernetes service portals",
    ),
    (
        IptTable::Filter,
        "FORWARD",
        EXTERNAL_SERVICES,
        true,
        "kubernetes externally-visible service portals",
    ),
    (
        IptTable::Filter,
        "OUTPUT",
        PROXY_FIREWALL,
        true,
        "kubernetes load balancer firewall",
    ),
    (
        IptTable::Filter,
        "OUTPUT",
        SERVICES,
        true,
        "kubernetes service portals",
    ),
    (
        IptTable::Nat,
        "PREROUTING",
        SERVICES,
        false,
        "kubernetes service portals",
    ),
    (
        IptTable::Nat,
        "OUTPUT",
        SERVICES,
        false,
        "kubernetes service portals",
    ),
    (
        IptTable::Nat,
        "POSTROUTING",
        POSTROUTING,
        false,
        "kubernetes postrouting rules",
    ),
];

/// The jump rules for this configuration, in order.
pub fn jumps(cfg: &IptConfig) -> Vec<(IptTable, Rule)> {
    let mut out: Vec<(IptTable, Rule)> = JUMPS
        .iter()
        .map(|(table, from, to, new, comment)| {
            let r = Rule::new(from, Target::Jump((*to).into())).comment(*comment);
            let r = if *new {
                r.m(M::CtState {
                    states: "NEW",
                    negate: false,
                })
            } else {
                r
            };
            (*table, r)
        })
        .collect();
    if cfg.localhost() {
        for from in ["INPUT", "OUTPUT"] {
            out.push((
                IptTable::Filter,
                Rule::new(from, Target::Jump(FIREWALL.into())),
            ));
        }
    }
    out
}

/// What one service port contributes.
#[derive(Debug, Clone, Default, PartialEq)]
struct PortOut {
    /// Its own nat chains.
    chains: BTreeMap<String, Vec<Rule>>,
    /// Its rules in top-level chains.
    top: Vec<(IptTable, Rule)>,
}

/// A committed port: what it was rendered from (its chains are rebuilt from it when
/// needed, so the copy costs a pointer per port), its top-level rules and its rule count.
#[derive(Debug, Clone, PartialEq)]
struct PortRecord {
    sp: Arc<ServicePortDesired>,
    top: Vec<(IptTable, Rule)>,
    chain_rules: usize,
}

/// What the kernel holds after the last successful restore, as far as this backend knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    config: Option<IptConfig>,
    ctx: Option<PortCtx>,
    ports: BTreeMap<ServicePortName, PortRecord>,
    /// The top-level chains as committed.
    top: BTreeMap<ChainKey, Vec<Rule>>,
}

impl Rendered {
    /// Nothing committed yet: the next render is full.
    pub fn is_empty(&self) -> bool {
        self.config.is_none()
    }

    pub fn config(&self) -> Option<&IptConfig> {
        self.config.as_ref()
    }

    /// Rules per table (for `sync_proxy_rules_iptables_total{table}`).
    pub fn rule_counts(&self) -> BTreeMap<IptTable, usize> {
        let mut out: BTreeMap<IptTable, usize> = IptTable::ALL.iter().map(|t| (*t, 0)).collect();
        for ((t, _), rules) in &self.top {
            *out.entry(*t).or_default() += rules.len();
        }
        for p in self.ports.values() {
            *out.entry(IptTable::Nat).or_default() += p.chain_rules;
        }
        out
    }

    /// A committed port's objects, rebuilt (empty when not committed).
    fn port_out(&self, name: &ServicePortName) -> PortOut {
        match (self.ports.get(name), &self.ctx, &self.config) {
            (Some(r), Some(ctx), Some(cfg)) => build_port(&r.sp, ctx, cfg),
            _ => PortOut::default(),
        }
    }

    fn record(&mut self, name: &ServicePortName, sp: &Arc<ServicePortDesired>, o: &PortOut) {
        self.ports.insert(
            name.clone(),
            PortRecord {
                sp: sp.clone(),
                top: o.top.clone(),
                chain_rules: o.chains.values().map(Vec::len).sum(),
            },
        );
    }

    /// Every chain of ours with its rules, by (table, name), jumps from built-in chains
    /// included (as the built-in chains' only rules).
    pub fn all_chains(&self) -> BTreeMap<ChainKey, Vec<Rule>> {
        let mut out = self.top.clone();
        for name in self.ports.keys() {
            for (c, rules) in self.port_out(name).chains {
                out.insert((IptTable::Nat, c), rules);
            }
        }
        if let Some(cfg) = &self.config {
            for (t, r) in jumps(cfg) {
                out.entry((t, r.chain.clone())).or_default().push(r);
            }
        }
        out
    }

    /// Number of service ports rendered.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }
}

/// What `iptables-save` showed before a full sync: every chain per table, and the rules of the
/// built-in chains (their save lines) that jump to one of ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: BTreeMap<IptTable, BTreeSet<String>>,
    /// (table, built-in chain) -> (target, save line) of every rule in it, in order.
    pub builtin_rules: BTreeMap<ChainKey, Vec<(String, String)>>,
}

impl Existing {
    /// Parses `iptables-save` output.
    pub fn parse(save: &str) -> Existing {
        let mut e = Existing::default();
        let mut table = None;
        let mut builtin: BTreeSet<String> = BTreeSet::new();
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = IptTable::ALL.into_iter().find(|x| x.as_str() == t.trim());
                builtin.clear();
            } else if let (Some(t), Some(decl)) = (table, line.strip_prefix(':')) {
                let mut words = decl.split_whitespace();
                let name = words.next().unwrap_or("").to_owned();
                if words.next().is_some_and(|policy| policy != "-") {
                    builtin.insert(name.clone());
                }
                e.chains.entry(t).or_default().insert(name);
            } else if let (Some(t), Some(rule)) = (table, line.strip_prefix("-A ")) {
                let chain = rule.split_whitespace().next().unwrap_or("");
                if builtin.contains(chain) {
                    let target = rule
                        .split(" -j ")
                        .nth(1)
                        .and_then(|t| t.split_whitespace().next())
                        .unwrap_or("")
                        .to_owned();
                    e.builtin_rules
                        .entry((t, chain.to_owned()))
                        .or_default()
                        .push((target, line.to_owned()));
                }
            }
        }
        e
    }
}

/// One family's restore input, and what it writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restore {
    /// `iptables-restore --noflush` input; empty when nothing changed.
    pub text: String,
    /// Chains declared (written or deleted).
    pub chains_written: usize,
    /// Rules written, per table.
    pub rules_written: BTreeMap<IptTable, usize>,
    pub full: bool,
}

/// Renders one family and updates `committed` to what the kernel holds once the input is
/// restored. If the restore fails, the caller must reset `committed` to
/// `Rendered::default()`, which makes the next render full (and list the kernel first:
/// `existing` is only read by full renders).
pub fn render(
    fam: &FamilyDesired,
    cfg: &IptConfig,
    committed: &mut Rendered,
    plan: &SyncPlan,
    existing: Option<&Existing>,
) -> Restore {
    let ctx = PortCtx::of(fam);
    let full = plan.full
        || committed.config.as_ref() != Some(cfg)
        || committed.ctx.as_ref() != Some(&ctx)
        || existing.is_some();
    if full {
        let empty = Existing::default();
        return render_full(fam, cfg, committed, existing.unwrap_or(&empty));
    }
    let mut write: BTreeMap<ChainKey, Vec<Rule>> = BTreeMap::new();
    let mut delete: BTreeSet<ChainKey> = BTreeSet::new();
    let mut top_changed: BTreeSet<ChainKey> = BTreeSet::new();
    for name in &plan.changed_ports {
        let old = committed.port_out(name);
        committed.ports.remove(name);
        let new = fam
            .ports
            .get(name)
            .map(|sp| build_port(sp, &ctx, cfg))
            .unwrap_or_default();
        for (chain, rules) in &new.chains {
            if old.chains.get(chain) != Some(rules) {
                write.insert((IptTable::Nat, chain.clone()), rules.clone());
            }
        }
        for chain in old.chains.keys().filter(|c| !new.chains.contains_key(*c)) {
            delete.insert((IptTable::Nat, chain.clone()));
        }
        if old.top != new.top {
            top_changed.extend(old.top.iter().map(|(t, r)| (*t, r.chain.clone())));
            top_changed.extend(new.top.iter().map(|(t, r)| (*t, r.chain.clone())));
        }
        if let Some(sp) = fam.ports.get(name) {
            committed.record(name, sp, &new);
        }
    }
    if !top_changed.is_empty() {
        let top = top_chains(cfg, committed);
        for key in top_changed {
            let rules = top.get(&key).cloned().unwrap_or_default();
            if committed.top.get(&key) != Some(&rules) {
                write.insert(key.clone(), rules.clone());
                committed.top.insert(key, rules);
            }
        }
    }
    Restore {
        chains_written: write.len() + delete.len(),
        rules_written: count_rules(&write),
        text: restore_text(&write, &[], &[], &delete),
        full: false,
    }
}

fn render_full(
    fam: &FamilyDesired,
    cfg: &IptConfig,
    committed: &mut Rendered,
    existing: &Existing,
) -> Restore {
    let ctx = PortCtx::of(fam);
    let mut next = Rendered {
        config: Some(cfg.clone()),
        ctx: Some(ctx.clone()),
        ..Rendered::default()
    };
    let mut write: BTreeMap<ChainKey, Vec<Rule>> = BTreeMap::new();
    for (name, sp) in &fam.ports {
        let o = build_port(sp, &ctx, cfg);
        next.record(name, sp, &o);
        for (chain, rules) in o.chains {
            write.insert((IptTable::Nat, chain), rules);
        }
    }
    next.top = top_chains(cfg, &next);
    write.extend(next.top.clone());
    // Service chains in the kernel that nothing uses any more (a previous run, or a sync
    // whose result we lost) go in the same restore. Without a listing of the kernel, the
    // committed copy says which chains are there.
    let known: BTreeSet<String> = if existing.chains.is_empty() {
        committed
            .ports
            .keys()
            .flat_map(|n| committed.port_out(n).chains.into_keys())
            .collect()
    } else {
        BTreeSet::new()
    };
    let mut delete: BTreeSet<ChainKey> = BTreeSet::new();
    let in_kernel = existing
        .chains
        .get(&IptTable::Nat)
        .into_iter()
        .flatten()
        .chain(&known);
    for chain in in_kernel {
        let ours = SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p));
        let key = (IptTable::Nat, chain.clone());
        if ours && !write.contains_key(&key) {
            delete.insert(key);
        }
    }
    // Jumps from built-in chains: left alone when ours already open the chain in order;
    // otherwise ours are deleted wherever they are and inserted at the top.
    let (mut del_jumps, mut add_jumps) = (Vec::new(), Vec::new());
    let wanted = jumps(cfg);
    let mut builtins: Vec<ChainKey> = wanted.iter().map(|(t, r)| (*t, r.chain.clone())).collect();
    builtins.sort();
    builtins.dedup();
    let ours: BTreeSet<&str> = wanted
        .iter()
        .filter_map(|(_, r)| match &r.target {
            Target::Jump(c) => Some(c.as_str()),
            _ => None,
        })
        .collect();
    for key in builtins {
        let want: Vec<&Rule> = wanted
            .iter()
            .filter(|(t, r)| (*t, &r.chain) == (key.0, &key.1))
            .map(|(_, r)| r)
            .collect();
        let have = existing
            .builtin_rules
            .get(&key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let targets: Vec<&str> = want
            .iter()
            .map(|r| match &r.target {
                Target::Jump(c) => c.as_str(),
                _ => "",
            })
            .collect();
        let in_place = have.len() >= targets.len()
            && have.iter().zip(&targets).all(|((t, _), w)| t == w)
            && !have[targets.len()..]
                .iter()
                .any(|(t, _)| ours.contains(t.as_str()));
        if in_place {
            continue;
        }
        for (t, line) in have {
            if ours.contains(t.as_str()) {
                del_jumps.push((key.0, format!("-D{}", &line[2..])));
            }
        }
        for (i, r) in want.iter().enumerate() {
            let text = r.text();
            let rest = text.strip_prefix(&format!("-A {}", r.chain)).unwrap_or("");
            add_jumps.push((key.0, format!("-I {} {}{rest}", r.chain, i + 1)));
        }
    }
    let text = restore_text(&write, &del_jumps, &add_jumps, &delete);
    let chains_written = write.len() + delete.len();
    *committed = next;
    Restore {
        text,
        chains_written,
        rules_written: count_rules(&write),
        full: true,
    }
}

fn count_rules(write: &BTreeMap<ChainKey, Vec<Rule>>) -> BTreeMap<IptTable, usize> {
    let mut out: BTreeMap<IptTable, usize> = IptTable::ALL.iter().map(|t| (*t, 0)).collect();
    for ((t, _), rules) in write {
        *out.entry(*t).or_default() += rules.len();
    }
    out
}

/// The order of the tables in a restore input. `iptables-restore` commits table by table and
/// stops at the first refused one, so the tables before it stay committed: nat, where the
/// kernel refuses what it refuses in practice (deleting a stale service chain that a rule not
/// ours still jumps to), goes first, so such a refusal leaves the kernel exactly as it was.
pub const RESTORE_ORDER: [IptTable; 3] = [IptTable::Nat, IptTable::Filter, IptTable::Mangle];

/// The restore input: per table (in [`RESTORE_ORDER`]), declarations, jump deletions, rules,
/// jump insertions, chain deletions, `COMMIT`. Tables with nothing to do are left out.
fn restore_text(
    write: &BTreeMap<ChainKey, Vec<Rule>>,
    del_jumps: &[(IptTable, String)],
    add_jumps: &[(IptTable, String)],
    delete: &BTreeSet<ChainKey>,
) -> String {
    let mut out = String::new();
    for table in RESTORE_ORDER {
        let writes: Vec<(&String, &Vec<Rule>)> = write
            .iter()
            .filter(|((t, _), _)| *t == table)
            .map(|((_, c), r)| (c, r))
            .collect();
        let deletes: Vec<&String> = delete
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| c)
            .collect();
        let of = |v: &[(IptTable, String)]| -> Vec<String> {
            v.iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, l)| l.clone())
                .collect()
        };
        let (dj, aj) = (of(del_jumps), of(add_jumps));
        if writes.is_empty() && deletes.is_empty() && dj.is_empty() && aj.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", table.as_str());
        for c in writes
            .iter()
            .map(|(c, _)| *c)
            .chain(deletes.iter().copied())
        {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for l in dj {
            let _ = writeln!(out, "{l}");
        }
        for r in writes.iter().flat_map(|(_, r)| r.iter()) {
            let _ = writeln!(out, "{}", r.text());
        }
        for l in aj {
            let _ = writeln!(out, "{l}");
        }
        for c in deletes {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Every top-level chain: the fixed ones with their rules, and the service ports'
/// contributions in port order.
fn top_chains(cfg: &IptConfig, r: &Rendered) -> BTreeMap<ChainKey, Vec<Rule>> {
    let mark = cfg.masquerade_mark;
    let mut top: BTreeMap<ChainKey, Vec<Rule>> = BTreeMap::new();
    for (t, c) in [
        (IptTable::Nat, SERVICES),
        (IptTable::Nat, NODEPORTS),
        (IptTable::Filter, SERVICES),
        (IptTable::Filter, EXTERNAL_SERVICES),
        (IptTable::Filter, NODEPORTS),
        (IptTable::Filter, PROXY_FIREWALL),
        (IptTable::Filter, CANARY),
        (IptTable::Nat, CANARY),
        (IptTable::Mangle, CANARY),
    ] {
        top.insert((t, c.into()), Vec::new());
    }
    for p in r.ports.values() {
        for (t, rule) in &p.top {
            top.entry((*t, rule.chain.clone()))
                .or_default()
                .push(rule.clone());
        }
    }
    // The NodePort dispatch is the last rule of nat KUBE-SERVICES.
    let nodeports = top.entry((IptTable::Nat, SERVICES.into())).or_default();
    let last = "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
    for dst in node_port_dsts(cfg) {
        let r = Rule::new(SERVICES, Target::Jump(NODEPORTS.into())).comment(last);
        nodeports.push(dst.into_iter().fold(r, Rule::m));
    }
    top.insert(
        (IptTable::Nat, MARK_MASQ.into()),
        vec![Rule::new(MARK_MASQ, Target::MarkOr(mark))],
    );
    top.insert(
        (IptTable::Nat, POSTROUTING.into()),
        vec![
            Rule::new(POSTROUTING, Target::Return).m(M::Mark { mark, negate: true }),
            Rule::new(POSTROUTING, Target::MarkXor(mark)),
            Rule::new(
                POSTROUTING,
                Target::Masquerade {
                    random_fully: cfg.random_fully,
                },
            )
            .comment("kubernetes service traffic requiring SNAT"),
        ],
    );
    let mut forward = Vec::new();
    if cfg.drop_invalid {
        forward.push(Rule::new(FORWARD, Target::Drop).m(M::CtState {
            states: "INVALID",
            negate: false,
        }));
    }
    forward.push(
        Rule::new(FORWARD, Target::Accept)
            .comment("kubernetes forwarding rules")
            .m(M::Mark {
                mark,
                negate: false,
            }),
    );
    forward.push(
        Rule::new(FORWARD, Target::Accept)
            .comment("kubernetes forwarding conntrack rule")
            .m(M::CtState {
                states: "RELATED,ESTABLISHED",
                negate: false,
            }),
    );
    top.insert((IptTable::Filter, FORWARD.into()), forward);
    if cfg.localhost() {
        let lo = cfg.loopback();
        top.insert(
            (IptTable::Filter, FIREWALL.into()),
            vec![
                Rule::new(FIREWALL, Target::Drop)
                    .comment("block incoming localnet connections")
                    .m(M::Dst {
                        net: lo,
                        negate: false,
                    })
                    .m(M::Src {
                        net: lo,
                        negate: true,
                    })
                    .m(M::CtState {
                        states: "RELATED,ESTABLISHED,DNAT",
                        negate: true,
                    }),
            ],
        );
    }
    top
}

/// The destination matches of NodePort traffic: one list per rule (§4.4).
fn node_port_dsts(cfg: &IptConfig) -> Vec<Vec<M>> {
    match &cfg.node_port_addrs {
        NodePortAddrs::All => {
            let local = M::AddrTypeLocal {
                src: false,
                negate: false,
            };
            if cfg.localhost() {
                vec![vec![local]]
            } else {
                let not_lo = M::Dst {
                    net: cfg.loopback(),
                    negate: true,
                };
                vec![vec![not_lo, local]]
            }
        }
        NodePortAddrs::List(_) => cfg
            .node_port_addrs
            .listed(cfg.family)
            .into_iter()
            .map(|ip| {
                vec![M::Dst {
                    net: IpNet::from(ip),
                    negate: false,
                }]
            })
            .collect(),
    }
}

/// "From a local pod" as a match (§4.10), or its negation; `None` without a detector.
fn local_match(detector: &LocalDetector, negate: bool) -> Option<M> {
    match detector {
        LocalDetector::None => None,
        LocalDetector::Cidr(net) => Some(M::Src { net: *net, negate }),
        LocalDetector::BridgeInterface(b) => Some(M::InIface {
            name: b.clone(),
            negate,
        }),
        LocalDetector::InterfaceNamePrefix(p) => Some(M::InIface {
            name: format!("{p}+"),
            negate,
        }),
    }
}

fn jump(chain: &str) -> Target {
    Target::Jump(chain.into())
}

/// The chains and top-level rules of one service port (§4, §5 as decided by the model).
fn build_port(sp: &ServicePortDesired, fam: &PortCtx, cfg: &IptConfig) -> PortOut {
    let name = &sp.name;
    let comment = name.to_string();
    let proto: Protocol = sp.protocol;
    let svc = service_chain("SVC", name);
    let svl = service_chain("SVL", name);
    let ext = service_chain("EXT", name);
    let fw = service_chain("FW", name);
    let v6 = cfg.family == IpFamily::V6;
    let mut o = PortOut::default();

    // Endpoint chains for the union of both sets.
    for ep in needed_endpoints(sp) {
        let sep = endpoint_chain(name, ep.addr);
        let mut rules = vec![
            Rule::new(&sep, jump(MARK_MASQ))
                .comment(&comment)
                .m(M::Src {
                    net: IpNet::from(ep.addr.ip()),
                    negate: false,
                }),
        ];
        let mut dnat = Rule::new(&sep, Target::Dnat(ep.addr)).comment(&comment);
        if sp.affinity_timeout.is_some() {
            dnat = dnat.m(M::RecentSet {
                name: sep.clone(),
                v6,
            });
        }
        rules.push(dnat.m(M::Proto(proto)));
        o.chains.insert(sep, rules);
    }

    // A set chain: the ClusterIP masquerade rule when it serves ClusterIP traffic (§4.9),
    // affinity checks (§5.4), then a uniform random pick (§5.3).
    let set_chain = |chain: &str, set: &[Endpoint], internal: bool| -> Vec<Rule> {
        let mut rules = Vec::new();
        let masq = Rule::new(chain, jump(MARK_MASQ))
            .comment(format!("{comment} cluster IP"))
            .to(sp.cluster_ip, proto, sp.port);
        if internal {
            if fam.masquerade_all {
                rules.push(masq);
            } else if let Some(m) = local_match(&fam.detector, true) {
                rules.push(masq.m(m));
            }
        }
        if let Some(seconds) = sp.affinity_timeout {
            for ep in set {
                let sep = endpoint_chain(name, ep.addr);
                rules.push(
                    Rule::new(chain, jump(&sep))
                        .comment(format!("{comment} -> {}", ep.addr))
                        .m(M::RecentCheck {
                            name: sep.clone(),
                            seconds,
                        }),
                );
            }
        }
        let n = set.len();
        for (i, ep) in set.iter().enumerate() {
            let r = Rule::new(chain, jump(&endpoint_chain(name, ep.addr)))
                .comment(format!("{comment} -> {}", ep.addr));
            rules.push(if i + 1 < n {
                r.m(M::Probability(1.0 / (n - i) as f64))
            } else {
                r
            });
        }
        rules
    };
    if !sp.cluster_endpoints.is_empty() {
        let internal = sp.internal == InternalAction::Cluster;
        o.chains.insert(
            svc.clone(),
            set_chain(&svc, &sp.cluster_endpoints, internal),
        );
    }
    if uses_local(sp) && !sp.local_endpoints.is_empty() {
        let internal = sp.internal == InternalAction::Local;
        o.chains
            .insert(svl.clone(), set_chain(&svl, &sp.local_endpoints, internal));
    }

    let nat = |chain: &str, target: Target, what: &str, ip: IpAddr| {
        (
            IptTable::Nat,
            Rule::new(chain, target)
                .comment(format!("{comment} {what}"))
                .to(ip, proto, sp.port),
        )
    };
    let filter = |chain: &str, target: Target, what: &str, ip: IpAddr| {
        (
            IptTable::Filter,
            Rule::new(chain, target)
                .comment(format!("{comment} {what}"))
                .to(ip, proto, sp.port),
        )
    };

    // ClusterIP.
    let cip = sp.cluster_ip;
    o.top.push(match sp.internal {
        InternalAction::Cluster => nat(SERVICES, jump(&svc), "cluster IP", cip),
        InternalAction::Local => nat(SERVICES, jump(&svl), "cluster IP", cip),
        InternalAction::Drop => filter(SERVICES, Target::Drop, "has no local endpoints", cip),
        InternalAction::Reject => filter(SERVICES, Target::Reject, "has no endpoints", cip),
    });

    // The healthCheckNodePort is accepted (§4.4).
    if let Some(hc) = sp.health_check_node_port {
        o.top.push((
            IptTable::Filter,
            Rule::new(NODEPORTS, Target::Accept)
                .comment(format!("{comment} health check node port"))
                .m(M::Proto(Protocol::Tcp))
                .m(M::Dport(hc)),
        ));
    }

    let Some(external) = sp.external else {
        return o;
    };
    let firewall = !sp.firewall_allow.is_empty() && !sp.load_balancer_ips.is_empty();
    let node_port_rules = |target: Target, what: &str| -> Vec<(IptTable, Rule)> {
        let Some(np) = sp.node_port else {
            return Vec::new();
        };
        node_port_dsts(cfg)
            .into_iter()
            .map(|dst| {
                let r = Rule::new(EXTERNAL_SERVICES, target.clone())
                    .comment(format!("{comment} {what}"));
                let r = dst.into_iter().fold(r, Rule::m);
                (IptTable::Filter, r.m(M::Proto(proto)).m(M::Dport(np)))
            })
            .collect()
    };
    let ext_ips = || sp.external_ips.iter().chain(&sp.load_balancer_ips).copied();
    // Without the endpoints it needs, external traffic is refused in filter, after nat
    // had nothing to DNAT it to (nat cannot DROP).
    let refuse = match external {
        ExternalAction::Reject => Some((Target::Reject, "has no endpoints")),
        ExternalAction::Local if sp.local_endpoints.is_empty() => {
            Some((Target::Drop, "has no local endpoints"))
        }
        _ => None,
    };
    if let Some((target, what)) = &refuse {
        for ip in ext_ips() {
            o.top
                .push(filter(EXTERNAL_SERVICES, target.clone(), what, ip));
        }
        o.top.extend(node_port_rules(target.clone(), what));
        // Host processes reach external IPs through OUTPUT, which KUBE-EXTERNAL-SERVICES is
        // not hooked to: without endpoints they are refused in filter KUBE-SERVICES (§4.8).
        if external == ExternalAction::Reject {
            for ip in ext_ips() {
                o.top.push(filter(SERVICES, Target::Reject, what, ip));
            }
        }
    }
    // Source ranges (§4.6): traffic to an LB IP that KUBE-FW did not DNAT is dropped. Without
    // endpoints, allowed sources and host processes return to be refused instead.
    if firewall {
        let what = format!("traffic not accepted by {fw}");
        for ip in &sp.load_balancer_ips {
            if external == ExternalAction::Reject {
                let (t, r) = filter(PROXY_FIREWALL, Target::Return, &what, *ip);
                o.top.push((
                    t,
                    r.m(M::AddrTypeLocal {
                        src: true,
                        negate: false,
                    }),
                ));
                for net in &sp.firewall_allow {
                    let (t, r) = filter(PROXY_FIREWALL, Target::Return, &what, *ip);
                    o.top.push((
                        t,
                        r.m(M::Src {
                            net: *net,
                            negate: false,
                        }),
                    ));
                }
            }
            o.top.push(filter(PROXY_FIREWALL, Target::Drop, &what, *ip));
        }
    }
    if external == ExternalAction::Reject {
        return o;
    }

    let ext_comment = |what: &str| format!("{what} for {comment} external destinations");
    let mut ext_rules = Vec::new();
    if external == ExternalAction::Cluster {
        ext_rules.push(Rule::new(&ext, jump(MARK_MASQ)).comment(ext_comment("masquerade traffic")));
        ext_rules.push(Rule::new(&ext, jump(&svc)));
    } else {
        if let Some(m) = local_match(&fam.detector, false) {
            ext_rules.push(
                Rule::new(&ext, jump(&svc))
                    .comment(ext_comment("pod traffic"))
                    .m(m),
            );
        }
        let from_host = M::AddrTypeLocal {
            src: true,
            negate: false,
        };
        ext_rules.push(
            Rule::new(&ext, jump(MARK_MASQ))
                .comment(ext_comment("masquerade LOCAL traffic"))
                .m(from_host.clone()),
        );
        ext_rules.push(
            Rule::new(&ext, jump(&svc))
                .comment(ext_comment("route LOCAL traffic"))
                .m(from_host),
        );
        if !sp.local_endpoints.is_empty() {
            ext_rules.push(Rule::new(&ext, jump(&svl)));
        }
    }
    o.chains.insert(ext.clone(), ext_rules);
    for ip in &sp.external_ips {
        o.top.push(nat(SERVICES, jump(&ext), "external IP", *ip));
    }
    for ip in &sp.load_balancer_ips {
        let to = if firewall { &fw } else { &ext };
        o.top.push(nat(SERVICES, jump(to), "loadbalancer IP", *ip));
    }
    if firewall {
        let rules = sp
            .firewall_allow
            .iter()
            .map(|net| {
                Rule::new(&fw, jump(&ext))
                    .comment(format!("{comment} loadbalancer IP"))
                    .m(M::Src {
                        net: *net,
                        negate: false,
                    })
            })
            .collect();
        o.chains.insert(fw, rules);
    }
    if let Some(np) = sp.node_port {
        o.top.push((
            IptTable::Nat,
            Rule::new(NODEPORTS, jump(&ext))
                .comment(&comment)
                .m(M::Proto(proto))
                .m(M::Dport(np)),
        ));
    }
    o
}
