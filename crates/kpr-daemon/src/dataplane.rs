//! The daemon's data plane: renders each family's desired state and applies it through the
//! mode's one kernel path (nftables: the netlink executor; iptables: `iptables-restore`),
//! keeps what was committed, and checks the rules are still there (active repair: a table
//! deleted or flushed by another tool is detected within a second).
//!
//! When the kernel refuses a transaction, nothing of it is applied (nftables commits a batch
//! all or nothing; `iptables-restore` commits table by table, nat first, and stops at the
//! refused one), the family's committed copy is dropped so its next sync is full, and the
//! other family is still synced. A cold start that is refused after some of its chunks went in
//! deletes our half-built table in one transaction, so the kernel holds none of our rules, as
//! before it began ([`apply_cold`]).

use kpr_config::NodePortAddresses;
use kpr_dataplane::iptables::{self as ipt, exec::Tools};
use kpr_dataplane::nftables::{
    NftConfig, NodePortAddrs, Rendered, layout, render, render_cold_each, render_full_stream,
};
use kpr_model::node::NodeContext;
use kpr_model::{DesiredState, IpFamily, SyncPlan};
use kpr_nft::{Executor, Fake, Family, Op, Table, Transaction};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The largest cold-start transaction, in operations (about 800 Services of 2 endpoints).
pub const COLD_START_MAX_OPS: usize = 10_000;

/// What one successful sync did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Per family: (operations sent, or chains written in iptables mode; full render?).
    pub families: Vec<(IpFamily, usize, bool)>,
    /// Bytes of `iptables-restore` input (iptables mode).
    pub bytes: usize,
    /// Per family and table: rules owned, and rules written by this sync (iptables mode).
    pub iptables_rules: Vec<(IpFamily, ipt::IptTable, usize, usize)>,
    pub elapsed: Duration,
}

/// Why one family's sync failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyFailure {
    pub family: IpFamily,
    /// The failed render was a full one (else partial).
    pub full: bool,
    pub kind: FailureKind,
    /// What was refused and why, in words.
    pub message: String,
}

/// The classes of family failure (they are counted in different metrics, §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The kernel refused a transaction (nftables), or `iptables-restore` failed.
    Refused,
    /// `iptables-save` failed before a full sync, so nothing was sent.
    Listing,
}

impl std::fmt::Display for FamilyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.full { "full" } else { "partial" };
        write!(f, "{} {kind} sync: {}", self.family, self.message)
    }
}

/// A sync in which at least one family failed.
#[derive(Debug, Clone)]
pub struct SyncFailure {
    pub failed: Vec<FamilyFailure>,
    /// What the other families did.
    pub done: ApplyReport,
}

impl std::fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, failure) in self.failed.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

impl SyncFailure {
    /// Whether `family` failed.
    pub fn failed(&self, family: IpFamily) -> bool {
        self.failed.iter().any(|f| f.family == family)
    }
}

/// Settings only the iptables mode has.
#[derive(Debug, Clone)]
pub struct IptSettings {
    pub tools: Tools,
    /// `iptables.localhostNodePorts` (§4.4).
    pub localhost_node_ports: bool,
    /// DROP ctstate INVALID in `KUBE-FORWARD` (§6.3).
    pub drop_invalid: bool,
}

enum Backend {
    Nft {
        exec: Box<dyn Executor + Send>,
        rendered: BTreeMap<IpFamily, Rendered>,
    },
    Ipt {
        settings: IptSettings,
        /// nf_tables netlink, for the 40 µs flush check when the host uses iptables-nft.
        netlink: Option<Box<dyn Executor + Send>>,
        rendered: BTreeMap<IpFamily, ipt::Rendered>,
    },
}

/// The data plane of both families, in one mode.
pub struct Dataplane {
    backend: Backend,
    masquerade_bit: u8,
    node_ports: NodePortAddresses,
    /// The largest cold-start transaction, in operations.
    cold_max_ops: usize,
    /// Socket-level load balancing on top of the nftables mode (`--socket-lb`), when on.
    socket_lb: Option<crate::socket_lb::Balancer>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: Vec<usize> = match &self.backend {
            Backend::Nft { rendered, .. } => rendered.values().map(Rendered::port_count).collect(),
            Backend::Ipt { rendered, .. } => {
                rendered.values().map(ipt::Rendered::port_count).collect()
            }
        };
        f.debug_struct("Dataplane")
            .field("mode", &self.mode())
            .field("rendered_ports", &ports)
            .finish()
    }
}

impl Dataplane {
    /// The nftables mode, applying through `exec`.
    pub fn new(
        exec: Box<dyn Executor + Send>,
        masquerade_bit: u8,
        node_ports: NodePortAddresses,
    ) -> Dataplane {
        Dataplane {
            backend: Backend::Nft {
                exec,
                rendered: BTreeMap::new(),
            },
            masquerade_bit,
            node_ports,
            cold_max_ops: COLD_START_MAX_OPS,
            socket_lb: None,
        }
    }

    /// The iptables mode. `netlink` (when the host uses iptables-nft) makes the flush check a
    /// netlink query instead of running `iptables -S`.
    pub fn iptables(
        settings: IptSettings,
        netlink: Option<Box<dyn Executor + Send>>,
        masquerade_bit: u8,
        node_ports: NodePortAddresses,
    ) -> Dataplane {
        Dataplane {
            backend: Backend::Ipt {
                settings,
                netlink,
                rendered: BTreeMap::new(),
            },
            masquerade_bit,
            node_ports,
            cold_max_ops: COLD_START_MAX_OPS,
            socket_lb: None,
        }
    }

    /// Splits a cold start into transactions of at most `max_ops` operations (tests use small
    /// ones to have several).
    pub fn with_cold_start_max_ops(mut self, max_ops: usize) -> Dataplane {
        self.cold_max_ops = max_ops.max(1);
        self
    }

    /// Keeps socket-lb's maps in step with the nftables rules (nftables mode: each family's
    /// maps are written after its rules were applied).
    pub fn with_socket_lb(mut self, lb: Option<kpr_socklb::SocketLb>) -> Dataplane {
        self.socket_lb = lb.map(crate::socket_lb::Balancer::new);
        self
    }

    /// Whether socket-level load balancing is on.
    pub fn socket_lb(&self) -> bool {
        self.socket_lb.is_some()
    }

    /// "nftables" or "iptables".
    pub fn mode(&self) -> &'static str {
        match self.backend {
            Backend::Nft { .. } => "nftables",
            Backend::Ipt { .. } => "iptables",
        }
    }

    /// Removes `table ip|ip6 NAME` through `exec` (a missing table is not an error); returns
    /// whether every removal succeeded.
    pub fn remove_nft_tables(exec: &mut dyn Executor, name: &str) -> bool {
        let mut ok = true;
        for family in [Family::Ip, Family::Ip6] {
            let table = Table {
                family,
                name: name.into(),
                comment: None,
            };
            let mut tx = Transaction::new(table.clone());
            tx.push(Op::AddTable(table));
            tx.push(Op::DeleteTable);
            if let Err(e) = exec.apply(&tx) {
                tracing::warn!(
                    family = family.as_str(),
                    table = name,
                    "Could not remove an nftables table: {e}"
                );
                ok = false;
            }
        }
        ok
    }

    /// Removes the iptables chains and jumps of kube-proxy's iptables mode, upstream's and
    /// ours (same names), from both back ends (§2.1 step 4, §13.6). Errors are only logged,
    /// as upstream.
    pub fn remove_iptables_rules() -> bool {
        match ipt::exec::remove_upstream_leftovers() {
            Ok(cleaned) => {
                if !cleaned.is_empty() {
                    tracing::info!(families = ?cleaned, "Removed kube-proxy's iptables rules");
                }
                true
            }
            Err(e) => {
                tracing::warn!("Could not remove kube-proxy's iptables rules: {e}");
                false
            }
        }
    }

    /// Renders and applies each family. A family that fails has its committed copy dropped,
    /// so its next sync is a full one; the other family is synced all the same.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        plan: &SyncPlan,
        ctx: &NodeContext,
    ) -> Result<ApplyReport, SyncFailure> {
        let start = Instant::now();
        let mut report = ApplyReport::default();
        let (bit, node_ports, cold_max_ops) = (
            self.masquerade_bit,
            self.node_ports.clone(),
            self.cold_max_ops,
        );
        let failed = match &mut self.backend {
            Backend::Nft { exec, rendered } => sync_nft(
                exec.as_mut(),
                rendered,
                (bit, cold_max_ops),
                &node_ports,
                desired,
                plan,
                ctx,
                &mut report,
            ),
            Backend::Ipt {
                settings, rendered, ..
            } => sync_ipt(
                settings,
                rendered,
                bit,
                &node_ports,
                desired,
                plan,
                ctx,
                &mut report,
            ),
        };
        if let Some(lb) = &mut self.socket_lb {
            let failed: Vec<IpFamily> = failed.iter().map(|f| f.family).collect();
            lb.after_sync(desired, plan, &failed);
        }
        report.elapsed = start.elapsed();
        if failed.is_empty() {
            Ok(report)
        } else {
            Err(SyncFailure {
                failed,
                done: report,
            })
        }
    }

    /// Before a full sync (nftables mode): forgets what was committed, which the full sync
    /// replaces whole, so the old copy is not held beside the new one. The table stays in
    /// the kernel, so the sync is a full one in one transaction, not a cold start.
    pub fn forget_committed(&mut self) {
        if let Backend::Nft { rendered, .. } = &mut self.backend {
            // Kept as an empty copy: "forgotten", which the sync tells from never committed.
            rendered.values_mut().for_each(|r| *r = Rendered::default());
        }
    }

    /// Whether every family's rules are still as we left them (present, not flushed).
    pub fn verify(&mut self) -> bool {
        match &mut self.backend {
            Backend::Nft { exec, rendered } => rendered.keys().all(|f| {
                exec.table_intact(&table(*f), layout::MASQUERADING)
                    .unwrap_or(false)
            }),
            Backend::Ipt {
                settings,
                netlink,
                rendered,
            } => rendered.keys().all(|f| match netlink {
                Some(nl) => {
                    let family = match f {
                        IpFamily::V4 => Family::Ip,
                        IpFamily::V6 => Family::Ip6,
                    };
                    let t = |name: &str| Table {
                        family,
                        name: name.into(),
                        comment: None,
                    };
                    nl.table_intact(&t("nat"), ipt::render::POSTROUTING)
                        .unwrap_or(false)
                        && nl
                            .table_intact(&t("filter"), ipt::render::FORWARD)
                            .unwrap_or(false)
                }
                None => settings.tools.intact(*f),
            }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sync_nft(
    exec: &mut dyn Executor,
    rendered: &mut BTreeMap<IpFamily, Rendered>,
    (masquerade_bit, cold_max_ops): (u8, usize),
    node_ports: &NodePortAddresses,
    desired: &DesiredState,
    plan: &SyncPlan,
    ctx: &NodeContext,
    report: &mut ApplyReport,
) -> Vec<FamilyFailure> {
    let mut failed = Vec::new();
    for (family, fam) in &desired.families {
        // Committed, then forgotten for this full sync (`forget_committed`): our table is
        // there, so it is replaced in one transaction, never rebuilt as a cold start.
        let forgotten = rendered.get(family).is_some_and(Rendered::is_empty);
        let committed = rendered.entry(*family).or_default();
        let full = plan.full || committed.is_empty();
        // NodePort addresses (which may mean listing interfaces) are worked out on full
        // syncs only; a node IP change makes the sync loop plan a full one.
        let cfg = match committed.config() {
            Some(cfg) if !full => cfg.clone(),
            _ => NftConfig::new(
                *family,
                masquerade_bit,
                node_port_addrs(node_ports, *family, ctx),
            ),
        };
        // Cold start (no table of ours in the kernel): bounded transactions, so no single
        // one holds the nftables mutex for long. Otherwise one atomic transaction.
        let cold = committed.is_empty()
            && !forgotten
            && !exec
                .table_intact(&table(*family), layout::MASQUERADING)
                .unwrap_or(false);
        let applied = if cold {
            apply_cold(exec, fam, &cfg, committed, cold_max_ops)
        } else if full {
            // One atomic transaction, encoded as it is rendered: it never exists as typed
            // operations, and the old committed copy goes first (a refusal drops it anyway).
            *committed = Rendered::default();
            let (mut next, mut count) = (None, 0);
            // About one element per endpoint twice (its map entry, its hairpin pair) and a few
            // per port: the batch's buffer is sized once instead of copied as it grows.
            let hint = fam
                .ports
                .values()
                .map(|sp| 2 * sp.endpoints.len() + 4)
                .sum::<usize>()
                + 256;
            exec.apply_stream(&cfg.table(), hint, &mut |sink| {
                count = 0;
                next = Some(render_full_stream(fam, &cfg, &mut |op| {
                    count += 1;
                    sink(op);
                }));
            })
            .inspect(|_| *committed = next.take().unwrap_or_default())
            .map_err(|e| format!("{e} (a transaction of {count} operations)"))
        } else {
            let tx = render(fam, &cfg, committed, plan);
            match tx.is_empty() {
                true => Ok(0),
                false => exec
                    .apply(&tx)
                    .map(|()| tx.len())
                    .map_err(|e| format!("{e} (a transaction of {} operations)", tx.len())),
            }
        };
        match applied {
            Ok(ops) if ops > 0 => report.families.push((*family, ops, full)),
            Ok(_) => {}
            Err(message) => {
                // Nothing of the refused transaction is in the kernel, but the committed copy
                // was advanced by the render: the next render of this family is full.
                rendered.remove(family);
                failed.push(FamilyFailure {
                    family: *family,
                    full,
                    kind: FailureKind::Refused,
                    message,
                });
            }
        }
    }
    failed
}

/// Applies a cold start, each transaction as soon as it is rendered (one chunk in memory at a
/// time); returns the operations applied. The chunks commit one by one, so a refusal after
/// the first leaves a half-built table: it is deleted in one more transaction, and the kernel
/// holds none of our rules, as before the cold start (the retry is a cold start again). If
/// that deletion is refused too, the half-built table stays until the retry, which finds a
/// table and replaces it in one transaction; the verdict-map elements that send traffic to
/// Services come in the last chunks, so a refusal before them leaves nothing reachable.
pub fn apply_cold(
    exec: &mut dyn Executor,
    fam: &kpr_model::desired::FamilyDesired,
    cfg: &NftConfig,
    committed: &mut Rendered,
    max_ops: usize,
) -> Result<usize, String> {
    let mut done = 0usize;
    let result = render_cold_each(fam, cfg, committed, max_ops, &mut |tx| {
        exec.apply(&tx)
            .map(|()| done += 1)
            .map_err(|e| (tx.len(), e))
    });
    let (ops, refused) = match result {
        Ok(ops) => return Ok(ops),
        Err(e) => e,
    };
    let what = format!(
        "{refused} (the cold start's transaction {}, of {ops} operations)",
        done + 1
    );
    if done == 0 {
        return Err(what);
    }
    let table = cfg.table();
    let mut undo = Transaction::new(table.clone());
    undo.push(Op::AddTable(table));
    undo.push(Op::DeleteTable);
    Err(match exec.apply(&undo) {
        Ok(()) => format!(
            "{what}; the {done} transactions applied before it were undone (our table deleted), so none of our rules are in the kernel"
        ),
        Err(e) => format!(
            "{what}; the {done} transactions applied before it could not be undone ({e}): a half-built table of ours is in the kernel (no Service is reachable through it) until the retry"
        ),
    })
}

#[allow(clippy::too_many_arguments)]
fn sync_ipt(
    settings: &IptSettings,
    rendered: &mut BTreeMap<IpFamily, ipt::Rendered>,
    masquerade_bit: u8,
    node_ports: &NodePortAddresses,
    desired: &DesiredState,
    plan: &SyncPlan,
    ctx: &NodeContext,
    report: &mut ApplyReport,
) -> Vec<FamilyFailure> {
    let mut failed = Vec::new();
    for (family, fam) in &desired.families {
        let committed = rendered.entry(*family).or_default();
        let full = plan.full || committed.is_empty();
        let cfg = match committed.config() {
            Some(cfg) if !full => cfg.clone(),
            _ => {
                let mut cfg = ipt::IptConfig::new(
                    *family,
                    masquerade_bit,
                    node_port_addrs(node_ports, *family, ctx),
                );
                cfg.localhost_node_ports = settings.localhost_node_ports;
                cfg.drop_invalid = settings.drop_invalid;
                cfg
            }
        };
        // Full syncs list the kernel first: stale service chains and misplaced jumps are
        // fixed in the same restore.
        let existing = if full {
            match settings.tools.save(*family) {
                Ok(save) => Some(ipt::Existing::parse(&save)),
                Err(e) => {
                    // Without the listing, jumps could be inserted twice: nothing is sent.
                    rendered.remove(family);
                    failed.push(FamilyFailure {
                        family: *family,
                        full,
                        kind: FailureKind::Listing,
                        message: format!("could not list the kernel's rules first: {e}"),
                    });
                    continue;
                }
            }
        } else {
            None
        };
        let restore = ipt::render(fam, &cfg, committed, plan, existing.as_ref());
        if !restore.text.is_empty() {
            if let Err(e) = settings.tools.restore(*family, &restore.text) {
                rendered.remove(family);
                failed.push(FamilyFailure {
                    family: *family,
                    full: restore.full,
                    kind: FailureKind::Refused,
                    message: e.to_string(),
                });
                continue;
            }
            report.bytes += restore.text.len();
            report
                .families
                .push((*family, restore.chains_written, restore.full));
        }
        if let Some(committed) = rendered.get(family) {
            for (table, owned) in committed.rule_counts() {
                let written = restore.rules_written.get(&table).copied().unwrap_or(0);
                report.iptables_rules.push((*family, table, owned, written));
            }
        }
    }
    failed
}

#[cfg(test)]
mod kernel_refusals;

/// The addresses that accept NodePorts in one family (§4.4).
pub(crate) fn node_port_addrs(
    setting: &NodePortAddresses,
    family: IpFamily,
    ctx: &NodeContext,
) -> NodePortAddrs {
    match setting {
        NodePortAddresses::Default => NodePortAddrs::All,
        NodePortAddresses::Primary => {
            NodePortAddrs::List(ctx.node_ips.get(&family).copied().into_iter().collect())
        }
        NodePortAddresses::Cidrs(cidrs) => {
            let of_family: Vec<_> = cidrs
                .iter()
                .filter(|c| IpFamily::of(&c.addr()) == family)
                .collect();
            if of_family.is_empty() {
                return NodePortAddrs::All;
            }
            let ips = local_addresses()
                .into_iter()
                .filter(|ip| of_family.iter().any(|c| c.contains(ip)))
                .collect();
            NodePortAddrs::List(ips)
        }
    }
}

fn table(family: IpFamily) -> Table {
    NftConfig::new(family, 14, NodePortAddrs::All).table()
}

/// The ruleset a desired state produces, as `nft list table` would show it (for `--dry-run`).
pub fn ruleset_text(
    desired: &DesiredState,
    masquerade_bit: u8,
    node_ports: &NodePortAddresses,
    ctx: &NodeContext,
) -> String {
    let mut out = String::new();
    for (family, fam) in &desired.families {
        let cfg = NftConfig::new(
            *family,
            masquerade_bit,
            node_port_addrs(node_ports, *family, ctx),
        );
        let tx = render(fam, &cfg, &mut Rendered::default(), &SyncPlan::full());
        let mut fake = Fake::default();
        match fake.apply(&tx) {
            Ok(()) => out.push_str(&fake.listing()),
            Err(e) => out.push_str(&format!(
                "# {family}: the rendered transaction was refused: {e}\n"
            )),
        }
    }
    out
}

/// The `iptables-restore` input of a full sync of each family (for `--dry-run`).
pub fn iptables_text(
    desired: &DesiredState,
    masquerade_bit: u8,
    node_ports: &NodePortAddresses,
    localhost_node_ports: bool,
    ctx: &NodeContext,
) -> String {
    let mut out = String::new();
    for (family, fam) in &desired.families {
        let mut cfg = ipt::IptConfig::new(
            *family,
            masquerade_bit,
            node_port_addrs(node_ports, *family, ctx),
        );
        cfg.localhost_node_ports = localhost_node_ports;
        let restore = ipt::render(
            fam,
            &cfg,
            &mut ipt::Rendered::default(),
            &SyncPlan::full(),
            Some(&ipt::Existing::default()),
        );
        out.push_str(&format!("# {family}\n{}", restore.text));
    }
    out
}

/// This host's interface addresses (for `nodePortAddresses` CIDRs), read with `ip -o addr`.
pub(crate) fn local_addresses() -> Vec<IpAddr> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
    else {
        tracing::warn!("Could not run `ip -o addr show` to find NodePort addresses");
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}
