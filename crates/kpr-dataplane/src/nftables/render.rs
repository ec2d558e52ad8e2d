//! Rendering: desired state + what was committed + plan -> one nftables transaction.
//!
//! Pure and deterministic. A full render replaces the whole table atomically (add, delete, add
//! in one transaction: established connections keep their conntrack NAT mappings). A partial
//! render touches only the service ports the plan names: their map and set elements are diffed
//! against the committed copy kept in [`Rendered`] (never listed from the kernel), their chains
//! are rewritten only when their rules changed, and chains and sets no longer used are flushed
//! and deleted in the same transaction (kernels since 6.2 release a chain from a deleted map
//! element within the transaction; this backend requires 6.2 or later for partial syncs).

mod shared;
mod slots;

use super::layout::{self, NodePortMatch, l4};
use super::naming;
use ipnet::IpNet;
use kpr_model::desired::{
    Endpoint, ExternalAction, FamilyDesired, InternalAction, ServicePortDesired,
};
use kpr_model::node::LocalDetector;
use kpr_model::{IpFamily, ServicePortName, SyncPlan};
use kpr_nft::{
    Addr, BUCKETS, Chain, Element, Family, Key, KeyType, Match, Op, Rule, Set, Statement, Table,
    Transaction, Verdict,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use shared::{Counts, Shared};
pub use slots::SLOTS;
use slots::{assign_slots, changes_slotted, kept_home, reassign_slots};

/// Which addresses accept NodePort traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddrs {
    /// Every local address except loopback.
    All,
    /// Exactly these (the `primary` node IPs, or the interface addresses inside the configured
    /// CIDRs).
    List(Vec<IpAddr>),
}

impl NodePortAddrs {
    /// The listed addresses of one family, loopback left out, sorted, once each.
    pub(crate) fn listed(&self, family: IpFamily) -> Vec<IpAddr> {
        let NodePortAddrs::List(ips) = self else {
            return Vec::new();
        };
        let mut ips: Vec<IpAddr> = ips
            .iter()
            .filter(|ip| IpFamily::of(ip) == family && !ip.is_loopback())
            .copied()
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

/// A family's loopback network (127.0.0.0/8, ::1/128): never accepts NodePorts (§4.4).
pub(crate) fn loopback(family: IpFamily) -> IpNet {
    match family {
        IpFamily::V4 => IpNet::V4(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(127, 0, 0, 0),
            8,
        )),
        IpFamily::V6 => IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    }
}

/// Backend settings for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    pub family: IpFamily,
    /// `1 << masqueradeBit`.
    pub masquerade_mark: u32,
    pub node_port_addrs: NodePortAddrs,
    /// Slots in the endpoint maps ([`SLOTS`]; tests use a handful to force collisions). A
    /// port that finds no free slot picks endpoints with per-endpoint chains instead.
    pub endpoint_slots: u32,
}

impl NftConfig {
    pub fn new(family: IpFamily, masquerade_bit: u8, node_port_addrs: NodePortAddrs) -> NftConfig {
        NftConfig {
            family,
            masquerade_mark: 1u32 << (masquerade_bit.min(31)),
            node_port_addrs,
            endpoint_slots: SLOTS,
        }
    }

    /// The table this backend owns.
    pub fn table(&self) -> Table {
        let family = match self.family {
            IpFamily::V4 => Family::Ip,
            IpFamily::V6 => Family::Ip6,
        };
        Table {
            family,
            name: layout::TABLE.into(),
            comment: Some(layout::TABLE_COMMENT.into()),
        }
    }
}

/// The objects one service port contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortObjects {
    chains: BTreeMap<String, Vec<Rule>>,
    sets: BTreeSet<Set>,
    elements: BTreeSet<Element>,
    /// What other ports may need too (its ClusterIP in `cluster-ips`, its endpoints' hairpin
    /// pairs, its endpoint map): in the kernel while any port needs it.
    shared: BTreeSet<Shared>,
}

/// What a port was rendered from: enough to rebuild its objects exactly, so the committed
/// copy costs a pointer per port instead of every rule and element (the desired state's
/// `Arc` is shared with the model).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortRecord {
    sp: Arc<ServicePortDesired>,
    slot: Option<u32>,
    /// [`home`] of its name, kept so adding a port does not hash every other one again.
    home: u32,
    /// Element keys another port owns, left out of this port's objects.
    lost: Vec<(String, Key)>,
}

/// The family-wide facts a port's rules depend on (§4.9, §4.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortCtx {
    pub(crate) detector: LocalDetector,
    pub(crate) masquerade_all: bool,
}

impl PortCtx {
    pub(crate) fn of(fam: &FamilyDesired) -> PortCtx {
        PortCtx {
            detector: fam.detector.clone(),
            masquerade_all: fam.masquerade_all,
        }
    }
}

/// What the kernel holds after the last successful transaction, as far as this backend knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    ports: BTreeMap<ServicePortName, PortRecord>,
    ctx: Option<PortCtx>,
    /// Which port owns each element key (two Services claiming one externalIP:port: the first
    /// in name order wins; an element is never added twice). Endpoint-map buckets are not
    /// listed: slots make them unique.
    owners: BTreeMap<(String, Key), ServicePortName>,
    /// Each port's slot in the endpoint maps (see [`assign_slots`]).
    slots: BTreeMap<ServicePortName, u32>,
    /// Reference counts of shared elements (ports of one Service share a ClusterIP; Services
    /// share endpoints).
    shared: Counts,
    config: Option<NftConfig>,
    /// The ServiceCIDR ranges `cluster-ips-check` drops.
    service_cidrs: Vec<ipnet::IpNet>,
}

impl Rendered {
    /// Nothing committed yet: the next render is full.
    pub fn is_empty(&self) -> bool {
        self.config.is_none()
    }

    /// The backend settings of the committed rendering.
    pub fn config(&self) -> Option<&NftConfig> {
        self.config.as_ref()
    }

    /// Number of service ports rendered.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }
}

/// Renders one family and updates `committed` to what the kernel holds once the transaction
/// is applied, so a partial sync costs O(changes) with no copy of the whole state. If the
/// transaction is not applied, the caller must reset `committed` to `Rendered::default()`,
/// which makes the next render full. A full render happens when the plan says so, when nothing
/// was committed yet, or when the backend configuration changed.
pub fn render(
    fam: &FamilyDesired,
    cfg: &NftConfig,
    committed: &mut Rendered,
    plan: &SyncPlan,
) -> Transaction {
    let ctx = PortCtx::of(fam);
    if plan.full || committed.config.as_ref() != Some(cfg) || committed.ctx.as_ref() != Some(&ctx) {
        let (tx, next) = render_full(fam, cfg);
        *committed = next;
        return tx;
    }
    let next = committed;
    // Shared objects touched by this sync, and whether each was in the kernel before it.
    let mut touched: BTreeMap<Shared, bool> = BTreeMap::new();
    let mut tx = Transaction::new(cfg.table());
    let (mut del_elems, mut add_elems) = (Vec::new(), Vec::new());
    let (mut new_chains, mut rewrite, mut stale_chains) = (Vec::new(), Vec::new(), Vec::new());
    let (mut new_sets, mut stale_sets) = (Vec::new(), Vec::new());
    let mut new_maps = Vec::new();
    // Ports added or removed: slots are worked out again, and ports that moved are rendered
    // again too (rare: only a collision of their hashes moves one).
    let mut todo = plan.changed_ports.clone();
    if changes_slotted(fam, next, &plan.changed_ports) {
        reassign_slots(
            fam,
            cfg.endpoint_slots,
            next,
            &plan.changed_ports,
            &mut todo,
        );
    }
    // Every port in the plan lets go of its objects before any claims its new ones, so an
    // element or slot can pass from one port to another in one sync.
    let mut olds = Vec::with_capacity(todo.len());
    for name in &todo {
        let old = next.objects(name);
        next.ports.remove(name);
        for e in &old.shared {
            let present = next.shared.contains(e);
            touched.entry(*e).or_insert(present);
        }
        next.release(name, &old);
        olds.push(old);
    }
    for (name, old) in todo.iter().zip(olds) {
        let built = fam
            .ports
            .get(name)
            .map(|sp| build_port(sp, &ctx, next.slots.get(name).copied()));
        for e in built.iter().flat_map(|b| &b.shared) {
            let present = next.shared.contains(e);
            touched.entry(*e).or_insert(present);
        }
        let slot = next.slots.get(name).copied();
        let (new, lost) = built.map(|b| next.claim(name, b)).unwrap_or_default();
        del_elems.extend(old.elements.difference(&new.elements).cloned());
        add_elems.extend(new.elements.difference(&old.elements).cloned());
        for (chain, rules) in &new.chains {
            match old.chains.get(chain) {
                None => {
                    new_chains.push(chain.clone());
                    rewrite.push(rules.clone());
                }
                Some(r) if r != rules => rewrite.push(rules.clone()),
                Some(_) => {}
            }
        }
        stale_chains.extend(
            old.chains
                .keys()
                .filter(|c| !new.chains.contains_key(*c))
                .cloned(),
        );
        new_sets.extend(new.sets.difference(&old.sets).cloned());
        stale_sets.extend(old.sets.difference(&new.sets).map(|s| s.name.clone()));
        if let Some(sp) = fam.ports.get(name) {
            next.ports.insert(
                name.clone(),
                PortRecord {
                    sp: sp.clone(),
                    slot,
                    home: kept_home(name, sp),
                    lost,
                },
            );
        }
    }
    for (s, before) in touched {
        let now = next.shared.contains(&s);
        match (s, before, now) {
            (s @ (Shared::ClusterIp(_) | Shared::Hairpin(_)), true, false) => {
                del_elems.extend(s.element())
            }
            (s @ (Shared::ClusterIp(_) | Shared::Hairpin(_)), false, true) => {
                add_elems.extend(s.element())
            }
            (s @ (Shared::Map(..) | Shared::ClusterMap(_)), true, false) => {
                stale_sets.extend(s.map().map(|m| m.name));
            }
            (s @ (Shared::Map(..) | Shared::ClusterMap(_)), false, true) => {
                new_maps.extend(s.map());
            }
            (s @ Shared::Pick(..), true, false) => {
                stale_chains.extend(s.chain(&ctx).map(|(name, _)| name));
            }
            (s @ Shared::Pick(..), false, true) => {
                if let Some((name, rules)) = s.chain(&ctx) {
                    new_chains.push(name);
                    rewrite.push(rules);
                }
            }
            _ => {}
        }
    }

    tx.ops.extend(del_elems.into_iter().map(Op::DeleteElement));
    tx.ops.extend(new_sets.into_iter().map(Op::AddSet));
    tx.ops.extend(new_maps.into_iter().map(Op::AddMap));
    tx.ops.extend(new_chains.into_iter().map(|c| {
        Op::AddChain(Chain {
            name: c,
            base: None,
            comment: None,
        })
    }));
    // A ServiceCIDR change rewrites the one chain that drops their unallocated addresses.
    if fam.service_cidrs != next.service_cidrs {
        next.service_cidrs = fam.service_cidrs.clone();
        rewrite.push(layout::cluster_ips_check(&next.service_cidrs));
    }
    for rules in rewrite {
        if let Some(first) = rules.first() {
            tx.push(Op::FlushChain(first.chain.clone()));
        }
        tx.ops.extend(rules.into_iter().map(Op::AddRule));
    }
    tx.ops.extend(add_elems.into_iter().map(Op::AddElement));
    tx.ops
        .extend(stale_chains.iter().cloned().map(Op::FlushChain));
    tx.ops.extend(stale_chains.into_iter().map(Op::DeleteChain));
    tx.ops.extend(stale_sets.into_iter().map(Op::DeleteSet));
    tx
}

/// Renders a cold start (no table in the kernel yet) as several transactions of at most about
/// `max_ops` operations each, split between service ports, so no single transaction holds the
/// kernel's nftables mutex for long (performance-anchors §4.3). Each transaction is
/// self-contained; applied in order they build the same table as one full render.
///
/// The verdict map elements that make service ports reachable come last, after every chain
/// exists: each commit that adds a jump makes the kernel walk every chain reachable from the
/// base chains, and until then there is almost nothing to walk.
pub fn render_cold(
    fam: &FamilyDesired,
    cfg: &NftConfig,
    committed: &mut Rendered,
    max_ops: usize,
) -> Vec<Transaction> {
    let mut out = Vec::new();
    let _ = render_cold_each(fam, cfg, committed, max_ops, &mut |tx| {
        out.push(tx);
        Ok::<(), ()>(())
    });
    out
}

/// [`render_cold`], handing each transaction to `apply` as soon as it is complete, so only one
/// chunk (and the deferred elements) is in memory at a time. Stops applying at the first error
/// and returns it; otherwise returns the number of operations applied.
pub fn render_cold_each<E>(
    fam: &FamilyDesired,
    cfg: &NftConfig,
    committed: &mut Rendered,
    max_ops: usize,
    apply: &mut dyn FnMut(Transaction) -> Result<(), E>,
) -> Result<usize, E> {
    let table = cfg.table();
    let mut err = None;
    let mut sent = 0;
    let mut flush = |ops: Vec<Op>| {
        if err.is_none() && !ops.is_empty() {
            sent += ops.len();
            if let Err(e) = apply(Transaction {
                table: table.clone(),
                ops,
            }) {
                err = Some(e);
            }
        }
    };
    let (mut current, mut reach) = (Vec::new(), Vec::new());
    let (next, tail) = render_full_with(fam, cfg, &mut |group: Vec<Op>| {
        let (verdicts, defs): (Vec<Op>, Vec<Op>) = group
            .into_iter()
            .partition(|op| matches!(op, Op::AddElement(e) if e.verdict.is_some()));
        if !current.is_empty() && current.len() + defs.len() > max_ops {
            flush(std::mem::take(&mut current));
        }
        current.extend(defs);
        reach.extend(verdicts);
    });
    *committed = next;
    for op in tail.into_ops().chain(reach) {
        if current.len() >= max_ops {
            flush(std::mem::take(&mut current));
        }
        current.push(op);
    }
    flush(current);
    match err {
        Some(e) => Err(e),
        None => Ok(sent),
    }
}

/// A full render (the whole table replaced in one transaction), handed to `emit` one
/// operation at a time in the order [`render`] would put them in its transaction, so the
/// kernel executor can encode them as they come and the transaction never exists as typed
/// operations (a full resync at 10,000 x 10 is about 220,000). Returns the committed copy
/// for once it is applied.
pub fn render_full_stream(
    fam: &FamilyDesired,
    cfg: &NftConfig,
    emit: &mut dyn FnMut(Op),
) -> Rendered {
    let (next, tail) = render_full_with(fam, cfg, &mut |group| {
        group.into_iter().for_each(&mut *emit)
    });
    tail.into_ops().for_each(emit);
    next
}

fn render_full(fam: &FamilyDesired, cfg: &NftConfig) -> (Transaction, Rendered) {
    let mut tx = Transaction::new(cfg.table());
    let (next, tail) = render_full_with(fam, cfg, &mut |group| tx.ops.extend(group));
    tx.ops.extend(tail.into_ops());
    (tx, next)
}

/// The full table, handed to `emit` in groups: the fixed part, then one group per service port
/// (its sets, chains, rules and elements). Returns the committed copy and the endpoint-map
/// elements of every port, which go after all groups.
fn render_full_with(
    fam: &FamilyDesired,
    cfg: &NftConfig,
    emit: &mut dyn FnMut(Vec<Op>),
) -> (Rendered, Buckets) {
    let table = cfg.table();
    let mut tx = Transaction::new(table.clone());
    tx.push(Op::AddTable(table.clone()));
    tx.push(Op::DeleteTable);
    tx.push(Op::AddTable(table));
    let loopback = loopback(cfg.family);
    let np = match cfg.node_port_addrs {
        NodePortAddrs::All => NodePortMatch::AllLocal { loopback },
        NodePortAddrs::List(_) => NodePortMatch::Set,
    };
    let (maps, sets) = layout::fixed_maps_and_sets();
    tx.ops.extend(maps.into_iter().map(Op::AddMap));
    tx.ops.extend(sets.into_iter().map(Op::AddSet));
    let fixed: Vec<(Chain, Vec<Rule>)> =
        layout::fixed_chains(cfg.masquerade_mark, &np, &fam.service_cidrs)
            .into_iter()
            .chain(layout::base_chains())
            .collect();
    tx.ops
        .extend(fixed.iter().map(|(c, _)| Op::AddChain(c.clone())));
    tx.ops
        .extend(fixed.into_iter().flat_map(|(_, r)| r).map(Op::AddRule));
    {
        tx.ops.extend(
            cfg.node_port_addrs
                .listed(cfg.family)
                .into_iter()
                .map(|ip| Op::AddElement(set_elem(layout::NODEPORT_IPS, Key::Addr(ip)))),
        );
    }
    let ctx = PortCtx::of(fam);
    let mut next = Rendered {
        config: Some(cfg.clone()),
        ctx: Some(ctx.clone()),
        service_cidrs: fam.service_cidrs.clone(),
        slots: assign_slots(fam, cfg.endpoint_slots),
        shared: Counts::with_capacity(
            fam.family,
            fam.ports.len(),
            fam.ports.values().map(|sp| sp.endpoints.len()).sum(),
        ),
        ..Rendered::default()
    };
    // A rule that starts using a map makes the kernel walk the elements the map has at that
    // moment: the pick chains of plain ports (a few, one per protocol and endpoint count) come
    // first, so those ports' endpoint elements can go with them; the sharded maps' elements
    // go last, after every rule that uses them.
    let picks: BTreeSet<Shared> = fam
        .ports
        .values()
        .filter(|sp| plain(sp))
        .flat_map(|sp| {
            let proto = l4(sp.protocol);
            let n = sp.cluster_endpoints.len().min(BUCKETS as usize) as u32;
            [Shared::ClusterMap(proto), Shared::Pick(proto, n)]
        })
        .collect();
    tx.ops.extend(
        picks
            .iter()
            .filter(|s| s.map().is_some())
            .flat_map(|s| s.ops(&ctx)),
    );
    tx.ops.extend(
        picks
            .iter()
            .filter(|s| s.map().is_none())
            .flat_map(|s| s.ops(&ctx)),
    );
    emit(std::mem::take(&mut tx.ops));
    let mut tail = Buckets::default();
    for (name, sp) in &fam.ports {
        let slot = next.slots.get(name).copied();
        let built = build_port(sp, &ctx, slot);
        let (mut fresh_maps, mut fresh_chains, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
        for s in built
            .shared
            .iter()
            .filter(|s| !next.shared.contains(s) && !picks.contains(*s))
        {
            match s {
                Shared::Map(..) | Shared::ClusterMap(_) => fresh_maps.extend(s.ops(&ctx)),
                Shared::Pick(..) => fresh_chains.extend(s.ops(&ctx)),
                Shared::ClusterIp(_) | Shared::Hairpin(_) => fresh.extend(s.ops(&ctx)),
            }
        }
        let (objs, lost) = next.claim(name, built);
        tx.ops.extend(fresh_maps);
        tx.ops.extend(fresh_chains);
        tx.ops.extend(objs.sets.into_iter().map(Op::AddSet));
        tx.ops.extend(objs.chains.keys().map(|c| {
            Op::AddChain(Chain {
                name: c.clone(),
                base: None,
                comment: None,
            })
        }));
        tx.ops
            .extend(objs.chains.into_values().flatten().map(Op::AddRule));
        let (buckets, others): (Vec<Element>, Vec<Element>) = objs
            .elements
            .into_iter()
            .partition(|e| matches!(e.key, Key::Bucket(_)));
        tx.ops.extend(others.into_iter().map(Op::AddElement));
        tail.extend(buckets);
        tx.ops.extend(fresh);
        next.ports.insert(
            name.clone(),
            PortRecord {
                sp: sp.clone(),
                slot,
                home: kept_home(name, sp),
                lost,
            },
        );
        emit(std::mem::take(&mut tx.ops));
    }
    (next, tail)
}

/// Endpoint-map elements held back until every rule exists, in a compact form (a cold start
/// at 10,000 x 10 holds 100,000 of them): the map's name once, then (map, key, target).
#[derive(Default)]
struct Buckets {
    maps: Vec<String>,
    index: std::collections::HashMap<String, u16>,
    elements: Vec<(u16, u32, std::net::SocketAddr)>,
}

impl Buckets {
    fn extend(&mut self, elements: Vec<Element>) {
        for e in elements {
            let (Key::Bucket(b), Some(to)) = (e.key, e.target) else {
                continue;
            };
            let next = self.maps.len() as u16;
            let map = *self.index.entry(e.set).or_insert_with_key(|name| {
                self.maps.push(name.clone());
                next
            });
            self.elements.push((map, b, to));
        }
    }

    fn into_ops(self) -> impl Iterator<Item = Op> {
        let maps = self.maps;
        self.elements.into_iter().map(move |(m, b, to)| {
            Op::AddElement(Element {
                set: maps.get(usize::from(m)).cloned().unwrap_or_default(),
                key: Key::Bucket(b),
                verdict: None,
                target: Some(to),
                comment: None,
            })
        })
    }
}

impl Rendered {
    /// Takes ownership of a port's element keys; keys another port owns are dropped from it
    /// (and returned).
    fn claim(
        &mut self,
        name: &ServicePortName,
        mut objs: PortObjects,
    ) -> (PortObjects, Vec<(String, Key)>) {
        let mut lost = Vec::new();
        objs.elements.retain(|e| {
            if e.target.is_some() {
                return true;
            }
            let owner = self
                .owners
                .entry((e.set.clone(), e.key))
                .or_insert_with(|| name.clone());
            if owner != name {
                lost.push((e.set.clone(), e.key));
            }
            owner == name
        });
        drop_lost(&mut objs, &lost);
        for e in &objs.shared {
            self.shared.add(*e);
        }
        (objs, lost)
    }

    /// The objects a committed port holds in the kernel, rebuilt from what it was rendered
    /// from (empty for a port not committed).
    fn objects(&self, name: &ServicePortName) -> PortObjects {
        let (Some(r), Some(ctx)) = (self.ports.get(name), &self.ctx) else {
            return PortObjects::default();
        };
        let mut o = build_port(&r.sp, ctx, r.slot);
        drop_lost(&mut o, &r.lost);
        o
    }

    fn release(&mut self, name: &ServicePortName, objs: &PortObjects) {
        for e in &objs.elements {
            if self.owners.get(&(e.set.clone(), e.key)) == Some(name) {
                self.owners.remove(&(e.set.clone(), e.key));
            }
        }
        for e in &objs.shared {
            self.shared.release(e);
        }
    }
}

fn set_elem(set: &str, key: Key) -> Element {
    Element {
        set: set.into(),
        key,
        verdict: None,
        target: None,
        comment: None,
    }
}

fn map_elem(map: &str, key: Key, verdict: Verdict, comment: &str) -> Element {
    Element {
        set: map.into(),
        key,
        verdict: Some(verdict),
        target: None,
        comment: Some(comment.into()),
    }
}

fn goto(chain: &str) -> Statement {
    Statement::Verdict(Verdict::Goto(chain.into()))
}

/// "From a local pod" as a match (§4.10), or its negation; `None` without a detector.
fn local_match(detector: &LocalDetector, negate: bool) -> Option<Match> {
    match detector {
        LocalDetector::None => None,
        LocalDetector::Cidr(net) => Some(Match::Net {
            addr: Addr::Saddr,
            negate,
            net: *net,
        }),
        LocalDetector::BridgeInterface(b) => Some(Match::IifName {
            name: b.clone(),
            prefix: false,
            negate,
        }),
        LocalDetector::InterfaceNamePrefix(p) => Some(Match::IifName {
            name: p.clone(),
            prefix: true,
            negate,
        }),
    }
}

/// A plain ClusterIP port: endpoints, no session affinity, no external frontends (NodePort,
/// externalIPs, load-balancer IPs) and internal traffic policy Cluster. It has no chain of its
/// own: its ClusterIP goes to the shared pick chain for its endpoint count, which draws from
/// the protocol's `cluster-endpoints` map by ClusterIP, port and bucket. Adding or removing
/// one, or changing its endpoints, is map elements only (a new endpoint count adds that
/// count's chain once).
pub(crate) fn plain(sp: &ServicePortDesired) -> bool {
    sp.affinity_timeout.is_none()
        && sp.external.is_none()
        && sp.internal == InternalAction::Cluster
        && !sp.cluster_endpoints.is_empty()
}

/// Drops from a port's objects the element keys another port owns; a plain port that lost
/// its ClusterIP and port to another loses its endpoints under that key too.
fn drop_lost(objs: &mut PortObjects, lost: &[(String, Key)]) {
    if lost.is_empty() {
        return;
    }
    let vip_lost = lost.iter().any(|(s, _)| s == layout::SERVICE_IPS);
    objs.elements.retain(|e| {
        let under_lost_vip = vip_lost && matches!(e.key, Key::VipBucket(..));
        let owned_by_another = lost.iter().any(|(s, k)| *s == e.set && *k == e.key);
        !under_lost_vip && !owned_by_another
    });
}

/// Whether anything uses the Local set: ITP=Local, or external frontends with ETP=Local.
/// Otherwise it gets no chain (half the chains of a typical table).
pub(crate) fn uses_local(sp: &ServicePortDesired) -> bool {
    sp.internal == InternalAction::Local || sp.external == Some(ExternalAction::Local)
}

/// The endpoints some used set holds (the Cluster set, and the Local set when used).
pub(crate) fn needed_endpoints(sp: &ServicePortDesired) -> impl Iterator<Item = &Endpoint> {
    let local = uses_local(sp);
    sp.endpoints.iter().filter(move |ep| {
        sp.cluster_endpoints.contains(ep) || (local && sp.local_endpoints.contains(ep))
    })
}

/// The chains, sets and elements of one service port (§4, §5 as decided by the model), in
/// endpoint-map slot `slot`.
fn build_port(sp: &ServicePortDesired, fam: &PortCtx, slot: Option<u32>) -> PortObjects {
    let base = naming::service_base(&sp.name);
    let comment = sp.name.to_string();
    let proto = l4(sp.protocol);
    let svc_chain = naming::chain("service", &base);
    let local_chain = naming::chain("local", &base);
    let ext_chain = naming::chain("external", &base);
    let fw_chain = naming::chain("firewall", &base);
    let mut o = PortObjects::default();
    o.shared.insert(Shared::ClusterIp(sp.cluster_ip));
    for ep in needed_endpoints(sp) {
        o.shared.insert(Shared::Hairpin(ep.addr.ip()));
    }
    let vip = |ip: IpAddr| Key::AddrProtoPort(ip, proto, sp.port);
    if plain(sp) {
        // Elements only: its endpoints under its ClusterIP and port in the protocol's
        // `cluster-endpoints` map, and a `service-ips` element to the shared chain for its
        // endpoint count. Past BUCKETS endpoints a set cannot grow: the rest are not used.
        let set = &sp.cluster_endpoints[..sp.cluster_endpoints.len().min(BUCKETS as usize)];
        let n = set.len() as u32;
        let map = layout::cluster_endpoints_map(proto);
        for (i, ep) in set.iter().enumerate() {
            o.elements.insert(Element {
                set: map.clone(),
                key: Key::VipBucket(sp.cluster_ip, sp.port, i as u32),
                verdict: None,
                target: Some(ep.addr),
                comment: None,
            });
        }
        o.shared.insert(Shared::ClusterMap(proto));
        o.shared.insert(Shared::Pick(proto, n));
        o.elements.insert(map_elem(
            layout::SERVICE_IPS,
            vip(sp.cluster_ip),
            Verdict::Goto(layout::pick_chain(proto, n)),
            &comment,
        ));
        return o;
    }
    // Without affinity, an endpoint is picked by a map from random buckets to DNAT targets:
    // endpoint changes then touch only map elements, which the kernel commits without
    // revalidating the table (a rule or a verdict element makes it walk every chain).
    let by_map = sp.affinity_timeout.is_none() && slot.is_some();

    // Endpoint chains (with affinity) for the union of both sets.
    let mut ep_chain = BTreeMap::new();
    for ep in needed_endpoints(sp).filter(|_| !by_map) {
        let ep_base = naming::endpoint_base(&sp.name, ep.addr);
        let chain = naming::chain("endpoint", &ep_base);
        let aff = sp
            .affinity_timeout
            .map(|t| (naming::chain("affinity", &ep_base), t));
        let mut rules = vec![
            Rule::new(&chain)
                .m(Match::Net {
                    addr: Addr::Saddr,
                    negate: false,
                    net: IpNet::from(ep.addr.ip()),
                })
                .s(Statement::Verdict(Verdict::Jump(
                    layout::MARK_FOR_MASQUERADE.into(),
                ))),
        ];
        if let Some((set, timeout)) = &aff {
            o.sets.insert(Set {
                name: set.clone(),
                key: KeyType::Addr,
                interval: false,
                timeout: Some(*timeout),
                comment: None,
            });
            rules.push(Rule::new(&chain).s(Statement::UpdateSaddr { set: set.clone() }));
        }
        rules.push(
            Rule::new(&chain)
                .m(Match::L4Proto(proto))
                .s(Statement::Dnat {
                    addr: ep.addr.ip(),
                    port: ep.addr.port(),
                }),
        );
        ep_chain.insert(ep.addr, (chain.clone(), aff.map(|a| a.0)));
        o.chains.insert(chain, rules);
    }

    // The ClusterIP masquerade rule (§4.9): masqueradeAll, or traffic not from a local pod.
    let masq_rule = |chain: &str| -> Option<Rule> {
        let r = Rule::new(chain)
            .m(Match::Net {
                addr: Addr::Daddr,
                negate: false,
                net: IpNet::from(sp.cluster_ip),
            })
            .m(Match::L4Proto(proto))
            .m(Match::Dport(sp.port));
        let r = if fam.masquerade_all {
            r
        } else {
            r.m(local_match(&fam.detector, true)?)
        };
        Some(r.s(Statement::Verdict(Verdict::Jump(
            layout::MARK_FOR_MASQUERADE.into(),
        ))))
    };
    let pod_match = || local_match(&fam.detector, false);
    // A set chain: affinity checks, then a uniform random pick (§5.3, §5.4): through this
    // protocol's endpoint map from the buckets at `offset`, or (with affinity) `numgen` rules
    // to endpoint chains.
    let map = layout::endpoint_map(
        proto,
        slot.unwrap_or_default() % layout::ENDPOINT_MAP_SHARDS,
    );
    let map = map.as_str();
    let mut uses_map = false;
    let mut set_chain = |name: &str, offset: u32, set: &[Endpoint], internal: bool| -> Vec<Rule> {
        let mut rules = Vec::new();
        if internal && let Some(r) = masq_rule(name) {
            rules.push(r);
        }
        if by_map {
            uses_map = true;
            // Past BUCKETS endpoints a set cannot grow: the rest are not used.
            let set = &set[..set.len().min(BUCKETS as usize)];
            for (i, ep) in set.iter().enumerate() {
                o.elements.insert(Element {
                    set: map.into(),
                    key: Key::Bucket(offset + i as u32),
                    verdict: None,
                    target: Some(ep.addr),
                    comment: None,
                });
            }
            rules.push(
                Rule::new(name)
                    .m(Match::L4Proto(proto))
                    .s(Statement::DnatMap {
                        map: map.into(),
                        offset,
                        modulus: set.len() as u32,
                    }),
            );
            return rules;
        }
        for ep in set {
            if let Some((chain, Some(aff))) = ep_chain.get(&ep.addr) {
                rules.push(
                    Rule::new(name)
                        .m(Match::InSet {
                            addr: Addr::Saddr,
                            negate: false,
                            set: aff.clone(),
                        })
                        .s(goto(chain)),
                );
            }
        }
        let n = set.len();
        for (i, ep) in set.iter().enumerate() {
            let chain = &ep_chain[&ep.addr].0;
            let r = Rule::new(name);
            let r = if i + 1 < n {
                r.m(Match::RandomOneIn((n - i) as u32))
            } else {
                r
            };
            rules.push(r.s(goto(chain)));
        }
        rules
    };

    let uses_cluster_internally = sp.internal == InternalAction::Cluster;
    let mut set_chains = Vec::new();
    let offset = slot.unwrap_or_default() * 2 * BUCKETS;
    if !sp.cluster_endpoints.is_empty() {
        let rules = set_chain(
            &svc_chain,
            offset,
            &sp.cluster_endpoints,
            uses_cluster_internally,
        );
        set_chains.push((svc_chain.clone(), rules));
    }
    if uses_local(sp) && !sp.local_endpoints.is_empty() {
        let internal = sp.internal == InternalAction::Local;
        let rules = set_chain(
            &local_chain,
            offset + BUCKETS,
            &sp.local_endpoints,
            internal,
        );
        set_chains.push((local_chain.clone(), rules));
    }
    o.chains.extend(set_chains);
    if uses_map {
        o.shared.insert(Shared::Map(
            proto,
            slot.unwrap_or_default() % layout::ENDPOINT_MAP_SHARDS,
        ));
    }

    // ClusterIP.
    let (map, verdict) = match sp.internal {
        InternalAction::Cluster => (layout::SERVICE_IPS, Verdict::Goto(svc_chain.clone())),
        InternalAction::Local => (layout::SERVICE_IPS, Verdict::Goto(local_chain.clone())),
        InternalAction::Drop => (layout::SERVICE_IPS, Verdict::Drop),
        InternalAction::Reject => (
            layout::NO_ENDPOINT_SERVICES,
            Verdict::Goto(layout::REJECT_CHAIN.into()),
        ),
    };
    o.elements
        .insert(map_elem(map, vip(sp.cluster_ip), verdict, &comment));

    // External frontends.
    let Some(external) = sp.external else {
        return o;
    };
    // Source ranges for LB IPs (§4.6), whether or not endpoints exist: disallowed sources are
    // dropped before they could learn anything from a REJECT.
    if !sp.firewall_allow.is_empty() && !sp.load_balancer_ips.is_empty() {
        let rule = Rule::new(&fw_chain)
            .m(Match::NotInNets {
                addr: Addr::Saddr,
                nets: sp.firewall_allow.clone(),
            })
            .s(Statement::Verdict(Verdict::Drop));
        o.chains.insert(fw_chain.clone(), vec![rule]);
        for ip in &sp.load_balancer_ips {
            o.elements.insert(map_elem(
                layout::FIREWALL_IPS,
                vip(*ip),
                Verdict::Goto(fw_chain.clone()),
                &comment,
            ));
        }
    }
    let ext_ips = sp.external_ips.iter().chain(&sp.load_balancer_ips);
    if external == ExternalAction::Reject {
        for ip in ext_ips {
            o.elements.insert(map_elem(
                layout::NO_ENDPOINT_SERVICES,
                vip(*ip),
                Verdict::Goto(layout::REJECT_CHAIN.into()),
                &comment,
            ));
        }
        if let Some(np) = sp.node_port {
            o.elements.insert(map_elem(
                layout::NO_ENDPOINT_NODEPORTS,
                Key::ProtoPort(proto, np),
                Verdict::Goto(layout::REJECT_CHAIN.into()),
                &comment,
            ));
        }
        return o;
    }
    let mut ext_rules = Vec::new();
    let masq = || Statement::Verdict(Verdict::Jump(layout::MARK_FOR_MASQUERADE.into()));
    if external == ExternalAction::Cluster {
        ext_rules.push(Rule::new(&ext_chain).s(masq()));
        ext_rules.push(Rule::new(&ext_chain).s(goto(&svc_chain)));
    } else {
        if let Some(m) = pod_match() {
            ext_rules.push(
                Rule::new(&ext_chain)
                    .m(m)
                    .s(goto(&svc_chain))
                    .comment("short-circuit pod traffic"),
            );
        }
        ext_rules.push(
            Rule::new(&ext_chain)
                .m(Match::FibLocal(Addr::Saddr))
                .s(masq())
                .comment("masquerade local traffic"),
        );
        ext_rules.push(
            Rule::new(&ext_chain)
                .m(Match::FibLocal(Addr::Saddr))
                .s(goto(&svc_chain))
                .comment("short-circuit local traffic"),
        );
        if sp.local_endpoints.is_empty() {
            ext_rules.push(
                Rule::new(&ext_chain)
                    .s(Statement::Verdict(Verdict::Drop))
                    .comment("no local endpoints"),
            );
        } else {
            ext_rules.push(Rule::new(&ext_chain).s(goto(&local_chain)));
        }
    }
    o.chains.insert(ext_chain.clone(), ext_rules);
    for ip in ext_ips {
        o.elements.insert(map_elem(
            layout::SERVICE_IPS,
            vip(*ip),
            Verdict::Goto(ext_chain.clone()),
            &comment,
        ));
    }
    if let Some(np) = sp.node_port {
        o.elements.insert(map_elem(
            layout::SERVICE_NODEPORTS,
            Key::ProtoPort(proto, np),
            Verdict::Goto(ext_chain.clone()),
            &comment,
        ));
    }
    o
}
