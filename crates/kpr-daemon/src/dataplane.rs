//! The daemon's data plane: renders each family's desired state and applies it through the
//! mode's one kernel path (nftables: the netlink executor; iptables: `iptables-restore`),
//! keeps what was committed, and checks the rules are still there (active repair: a table
//! deleted or flushed by another tool is detected within a second).

use kpr_config::NodePortAddresses;
use kpr_dataplane::iptables::{self as ipt, exec::Tools};
use kpr_dataplane::nftables::{
    NftConfig, NodePortAddrs, Rendered, layout, render, render_cold_each,
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
        }
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

    /// Renders and applies both families. On failure the family's committed copy is dropped,
    /// so the next sync is a full one.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        plan: &SyncPlan,
        ctx: &NodeContext,
    ) -> Result<ApplyReport, String> {
        let start = Instant::now();
        let mut report = ApplyReport::default();
        let (bit, node_ports) = (self.masquerade_bit, self.node_ports.clone());
        match &mut self.backend {
            Backend::Nft { exec, rendered } => sync_nft(
                exec.as_mut(),
                rendered,
                bit,
                &node_ports,
                desired,
                plan,
                ctx,
                &mut report,
            )?,
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
            )?,
        }
        report.elapsed = start.elapsed();
        Ok(report)
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
    masquerade_bit: u8,
    node_ports: &NodePortAddresses,
    desired: &DesiredState,
    plan: &SyncPlan,
    ctx: &NodeContext,
    report: &mut ApplyReport,
) -> Result<(), String> {
    for (family, fam) in &desired.families {
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
            && !exec
                .table_intact(&table(*family), layout::MASQUERADING)
                .unwrap_or(false);
        // Each cold-start transaction is applied as soon as it is rendered: one chunk in
        // memory at a time.
        let applied = if cold {
            render_cold_each(fam, &cfg, committed, COLD_START_MAX_OPS, &mut |tx| {
                exec.apply(&tx).map_err(|e| e.to_string())
            })
        } else {
            let tx = render(fam, &cfg, committed, plan);
            match tx.is_empty() {
                true => Ok(0),
                false => exec
                    .apply(&tx)
                    .map(|()| tx.len())
                    .map_err(|e| e.to_string()),
            }
        };
        let ops = match applied {
            Ok(ops) => ops,
            Err(e) => {
                // What the kernel holds is unknown now: the next render is full.
                rendered.remove(family);
                return Err(format!("{family}: {e}"));
            }
        };
        if ops > 0 {
            report.families.push((*family, ops, full));
        }
    }
    Ok(())
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
) -> Result<(), String> {
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
            let save = settings
                .tools
                .save(*family)
                .map_err(|e| format!("{family}: {e}"))?;
            Some(ipt::Existing::parse(&save))
        } else {
            None
        };
        let restore = ipt::render(fam, &cfg, committed, plan, existing.as_ref());
        if !restore.text.is_empty() {
            if let Err(e) = settings.tools.restore(*family, &restore.text) {
                rendered.remove(family);
                let kind = if restore.full { "full" } else { "partial" };
                return Err(format!("{family}: {kind} restore: {e}"));
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
    Ok(())
}

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
