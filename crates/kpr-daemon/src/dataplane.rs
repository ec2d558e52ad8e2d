//! The daemon's data plane: renders each family's desired state and applies it through the one
//! kernel executor, keeps what was committed, and checks the table is still there (active
//! repair: a table deleted or flushed by another tool is detected within a second).

use kpr_config::NodePortAddresses;
use kpr_dataplane::nftables::{NftConfig, NodePortAddrs, Rendered, layout, render, render_cold};
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
    /// Per family: (operations sent, full render?).
    pub families: Vec<(IpFamily, usize, bool)>,
    pub elapsed: Duration,
}

/// The nftables data plane of both families.
pub struct Dataplane {
    exec: Box<dyn Executor + Send>,
    masquerade_bit: u8,
    node_ports: NodePortAddresses,
    rendered: BTreeMap<IpFamily, Rendered>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field(
                "rendered_ports",
                &self
                    .rendered
                    .values()
                    .map(Rendered::port_count)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Dataplane {
    pub fn new(
        exec: Box<dyn Executor + Send>,
        masquerade_bit: u8,
        node_ports: NodePortAddresses,
    ) -> Dataplane {
        Dataplane {
            exec,
            masquerade_bit,
            node_ports,
            rendered: BTreeMap::new(),
        }
    }

    /// Removes the tables upstream kube-proxy's nftables mode leaves behind (mode switch, §2.1
    /// step 4). Errors are only logged, as upstream.
    pub fn remove_upstream_tables(&mut self) {
        self.remove_tables("kube-proxy");
    }

    /// Removes `table ip|ip6 NAME` (a missing table is not an error); returns whether every
    /// removal succeeded.
    pub fn remove_tables(&mut self, name: &str) -> bool {
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
            if let Err(e) = self.exec.apply(&tx) {
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

    /// Removes the iptables chains and jumps upstream kube-proxy's iptables mode leaves
    /// behind (§2.1 step 4, §13.6). Errors are only logged, as upstream.
    pub fn remove_upstream_iptables(&mut self) {
        match kpr_dataplane::iptables::exec::remove_upstream_leftovers() {
            Ok(families) if !families.is_empty() => {
                tracing::info!(families = ?families, "Removed upstream kube-proxy's iptables rules")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("Could not remove upstream kube-proxy's iptables rules: {e}"),
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
        for (family, fam) in &desired.families {
            let committed = self.rendered.entry(*family).or_default();
            let full = plan.full || committed.is_empty();
            // NodePort addresses (which may mean listing interfaces) are worked out on full
            // syncs only; a node IP change makes the sync loop plan a full one.
            let cfg = match committed.config() {
                Some(cfg) if !full => cfg.clone(),
                _ => NftConfig::new(
                    *family,
                    self.masquerade_bit,
                    node_port_addrs(&self.node_ports, *family, ctx),
                ),
            };
            // Cold start (no table of ours in the kernel): bounded transactions, so no single
            // one holds the nftables mutex for long. Otherwise one atomic transaction.
            let cold = committed.is_empty()
                && !self
                    .exec
                    .table_intact(&table(*family), layout::MASQUERADING)
                    .unwrap_or(false);
            let txs = if cold {
                render_cold(fam, &cfg, committed, COLD_START_MAX_OPS)
            } else {
                vec![render(fam, &cfg, committed, plan)]
            };
            let mut ops = 0;
            for tx in txs.iter().filter(|tx| !tx.is_empty()) {
                if let Err(e) = self.exec.apply(tx) {
                    // What the kernel holds is unknown now: the next render is full.
                    self.rendered.remove(family);
                    return Err(format!("{family}: {e}"));
                }
                ops += tx.len();
            }
            if ops > 0 {
                report.families.push((*family, ops, full));
            }
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Whether every family's table is still as we left it (present, rules not flushed).
    pub fn verify(&mut self) -> bool {
        let families: Vec<IpFamily> = self.rendered.keys().copied().collect();
        families.into_iter().all(|f| {
            let table = table(f);
            self.exec
                .table_intact(&table, layout::MASQUERADING)
                .unwrap_or(false)
        })
    }
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

/// This host's interface addresses (for `nodePortAddresses` CIDRs), read with `ip -o addr`.
fn local_addresses() -> Vec<IpAddr> {
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
