//! The kernel, not only the intent: the rules in the kernel now against what the proxy
//! committed (issue 14).
//!
//! What was committed is rebuilt from a snapshot's desired state (a full render; partial syncs
//! equal full ones), typed (for the tracers) and as text. The kernel is read back with the
//! tools an operator would use: `nft list table ip|ip6 kube-proxy-rs` in the nftables mode,
//! `iptables-save` (and `ip6tables-save`) of the back end the proxy writes in the iptables mode.
//! `nft` compares per object and per rule or element line; `ipt` per chain of ours and per rule
//! in a normal form. Served as `/debug/verify` (JSON, or `?output=text`) and
//! `kube-proxy-rs verify` (exit 0 equal, 1 different, 2 unreachable or unreadable); the sync
//! loop runs [`DriftJob`] every syncPeriod off its thread and resyncs on a difference; and
//! `/debug/explain` adds [`KernelView`] (`packet`): whether the kernel agrees with the model
//! for the packet asked about, from the chains, maps and sets its trace visits.

pub mod ipt;
pub mod nft;
pub mod packet;

pub use packet::{KernelView, LiveExplanation, explain_live, judge, kernel_view};

use super::cli::http_get;
use super::routes::{error, json_response};
use super::{Hub, Snapshot};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kpr_config::NodePortAddresses;
use kpr_dataplane::iptables::exec::Tools;
use kpr_dataplane::iptables::render::ChainKey;
use kpr_dataplane::iptables::{self as ipt_backend, IptTable};
use kpr_dataplane::nftables::{NftConfig, Rendered, layout};
use kpr_model::node::NodeContext;
use kpr_model::{DesiredState, IpFamily, SyncPlan};
use kpr_nft::{Family, NftCli, Transaction};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a part of the kernel's rules differs from what was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Committed, not in the kernel.
    Missing,
    /// In the kernel, not committed.
    Extra,
    /// In both, not the same.
    Different,
}

/// One difference between the kernel and the committed rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// `chain services`, `map service-ips`, `table ip kube-proxy-rs`,
    /// `chain KUBE-SVC-XXXX (nat)`.
    pub object: String,
    pub kind: Kind,
    pub detail: String,
    /// Where it is, for matching it with a packet's path.
    #[serde(skip)]
    at: At,
}

#[derive(Debug, Clone, Default, PartialEq)]
enum At {
    #[default]
    Unknown,
    Nft(nft::Diff),
    Ipt(ipt::Diff),
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.family, self.object, self.detail)
    }
}

/// The answer of `/debug/verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The kernel holds exactly what was committed (as far as our rules go).
    pub ok: bool,
    pub differences: Vec<Difference>,
    /// `nftables` or `iptables`.
    pub mode: String,
    /// What was compared, per family.
    pub compared: Vec<String>,
    /// The number of syncs done when the committed state was taken.
    pub generation: u64,
    pub elapsed_seconds: f64,
    /// Why differences may be expected (the last sync failed; nothing synced yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok {
            writeln!(
                f,
                "The kernel holds exactly the committed {} rules ({:.3} s).",
                self.mode, self.elapsed_seconds
            )?;
        } else {
            writeln!(
                f,
                "The kernel's {} rules differ from the committed ones: {} difference{} ({:.3} s).",
                self.mode,
                self.differences.len(),
                if self.differences.len() == 1 { "" } else { "s" },
                self.elapsed_seconds
            )?;
        }
        for c in &self.compared {
            writeln!(f, "  compared {c}")?;
        }
        if let Some(n) = &self.note {
            writeln!(f, "  note: {n}")?;
        }
        for d in &self.differences {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The iptables back end the proxy writes, and whether it drops INVALID packets (§6.3): what
/// the committed rules depend on beyond the configuration.
#[derive(Debug, Clone, Copy)]
pub struct IptHost {
    pub tools: Tools,
    pub drop_invalid: bool,
}

impl Hub {
    /// The iptables mode's host facts, once known (set at start).
    pub fn set_iptables(&self, host: IptHost) {
        let _ = self.ipt.set(host);
    }
}

/// What rebuilding the committed rules and reading the kernel need: the proxy's settings.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `nftables` or `iptables`.
    pub mode: &'static str,
    pub masquerade_bit: u8,
    pub node_ports: NodePortAddresses,
    pub localhost_node_ports: bool,
    /// The iptables mode's back end (`None` in the nftables mode).
    pub iptables: Option<IptHost>,
}

impl Setup {
    pub fn of(hub: &Hub) -> Setup {
        let f = &hub.fixed;
        let iptables = (f.mode == "iptables").then(|| {
            hub.ipt.get().copied().unwrap_or_else(|| IptHost {
                tools: Tools::new(kpr_dataplane::iptables::exec::detect()),
                drop_invalid: !std::fs::read_to_string(
                    "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal",
                )
                .is_ok_and(|v| v.trim() != "0"),
            })
        });
        Setup {
            mode: f.mode,
            masquerade_bit: f.masquerade_bit,
            node_ports: f.node_ports.clone(),
            localhost_node_ports: f.localhost_node_ports,
            iptables,
        }
    }
}

/// One family's committed rules, typed and (nftables) as listed.
#[derive(Debug, Clone)]
pub enum Committed {
    Nft {
        tx: Transaction,
        listing: nft::TableListing,
    },
    Ipt {
        chains: BTreeMap<ChainKey, Vec<ipt_backend::Rule>>,
    },
}

/// The committed rules of one family: a full render of `desired`.
pub fn committed(
    setup: &Setup,
    desired: &DesiredState,
    node: &NodeContext,
    family: IpFamily,
) -> Option<Result<Committed, String>> {
    let fam = desired.families.get(&family)?;
    let addrs = crate::dataplane::node_port_addrs(&setup.node_ports, family, node);
    Some(match setup.iptables {
        Some(host) => {
            let mut cfg = ipt_backend::IptConfig::new(family, setup.masquerade_bit, addrs);
            cfg.localhost_node_ports = setup.localhost_node_ports;
            cfg.drop_invalid = host.drop_invalid;
            let mut r = ipt_backend::Rendered::default();
            ipt_backend::render(
                fam,
                &cfg,
                &mut r,
                &SyncPlan::full(),
                Some(&ipt_backend::Existing::default()),
            );
            Ok(Committed::Ipt {
                chains: r.all_chains(),
            })
        }
        None => {
            let cfg = NftConfig::new(family, setup.masquerade_bit, addrs);
            let tx = kpr_dataplane::nftables::render(
                fam,
                &cfg,
                &mut Rendered::default(),
                &SyncPlan::full(),
            );
            nft::from_tx(&tx)
                .map_err(|e| format!("{family}: {e}"))
                .map(|listing| Committed::Nft { tx, listing })
        }
    })
}

/// One family's rules as the kernel has them now.
#[derive(Debug, Clone)]
pub enum KernelRules {
    /// `None`: no table of ours.
    Nft(Option<nft::TableListing>),
    Ipt(BTreeMap<IptTable, ipt::SaveTable>),
}

fn nft_family(family: IpFamily) -> Family {
    match family {
        IpFamily::V4 => Family::Ip,
        IpFamily::V6 => Family::Ip6,
    }
}

/// Reads one family's rules of ours from the kernel.
pub fn read_kernel(setup: &Setup, family: IpFamily) -> Result<KernelRules, String> {
    match setup.iptables {
        Some(host) => host
            .tools
            .save(family)
            .map(|text| KernelRules::Ipt(ipt::parse_save(&text)))
            .map_err(|e| format!("cannot read the kernel's {family} rules: {e}")),
        None => {
            let listed = NftCli::default().list_table(nft_family(family), layout::TABLE);
            let text = match listed {
                Ok(t) => t,
                Err(kpr_nft::ApplyError::Spawn(e)) => {
                    return Err(format!(
                        "cannot run `nft` to read the kernel's rules (install nftables to verify the nftables mode): {e}"
                    ));
                }
                Err(e) => return Err(format!("nft list table: {e}")),
            };
            let Some(text) = text else {
                return Ok(KernelRules::Nft(None));
            };
            let tables = nft::parse(&text).map_err(|e| format!("reading nft's listing: {e}"))?;
            Ok(KernelRules::Nft(tables.into_iter().next()))
        }
    }
}

/// The differences of one family.
pub fn compare(family: IpFamily, committed: &Committed, kernel: &KernelRules) -> Vec<Difference> {
    let label = family.label().to_owned();
    match (committed, kernel) {
        (Committed::Nft { listing, .. }, KernelRules::Nft(k)) => nft::diff(listing, k.as_ref())
            .into_iter()
            .map(|d| Difference {
                family: label.clone(),
                object: format!("{} {}", d.obj_kind, d.name),
                kind: d.kind,
                detail: d.detail.clone(),
                at: At::Nft(d),
            })
            .collect(),
        (Committed::Ipt { chains }, KernelRules::Ipt(save)) => ipt::diff(chains, save)
            .into_iter()
            .map(|d| Difference {
                family: label.clone(),
                object: format!("chain {} ({})", d.chain.1, d.chain.0.as_str()),
                kind: d.kind,
                detail: d.detail.clone(),
                at: At::Ipt(d),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What one comparison found.
#[derive(Debug, Clone)]
pub struct Checked {
    pub differences: Vec<Difference>,
    /// Per family, what was compared.
    pub compared: Vec<String>,
    pub committed: BTreeMap<IpFamily, Committed>,
}

/// Compares the kernel with the committed rules of every family of `desired` (or only `only`).
pub fn check(
    setup: &Setup,
    desired: &DesiredState,
    node: &NodeContext,
    only: Option<IpFamily>,
) -> Result<Checked, String> {
    let mut out = Checked {
        differences: Vec::new(),
        compared: Vec::new(),
        committed: BTreeMap::new(),
    };
    for family in desired.families.keys() {
        if only.is_some_and(|f| f != *family) {
            continue;
        }
        let Some(c) = committed(setup, desired, node, *family) else {
            continue;
        };
        let c = c?;
        let kernel = read_kernel(setup, *family)?;
        out.differences.extend(compare(*family, &c, &kernel));
        out.compared.push(summary(*family, &c));
        out.committed.insert(*family, c);
    }
    Ok(out)
}

fn summary(family: IpFamily, c: &Committed) -> String {
    match c {
        Committed::Nft { listing, .. } => {
            let chains: Vec<&nft::Object> = listing
                .objects
                .iter()
                .filter(|((k, _), _)| k == "chain")
                .map(|(_, o)| o)
                .collect();
            let rules: usize = chains.iter().map(|o| o.rules.len()).sum();
            let sets = listing.objects.len() - chains.len();
            let elements: usize = listing.objects.values().map(|o| o.elements.len()).sum();
            format!(
                "{family}: table {} {}, {} chains ({rules} rules), {sets} sets and maps ({elements} elements)",
                listing.family,
                listing.name,
                chains.len()
            )
        }
        Committed::Ipt { chains } => {
            let rules: usize = chains.values().map(Vec::len).sum();
            format!(
                "{family}: {} chains of ours ({rules} rules, jumps from built-in chains included)",
                chains.len()
            )
        }
    }
}

/// A comparison of the kernel with the committed rules of one snapshot, kept in the hub.
#[derive(Debug)]
pub struct Reading {
    pub generation: u64,
    pub at: Instant,
    /// How long rendering and reading took.
    pub took: std::time::Duration,
    pub checked: Checked,
}

/// How long explain reuses a reading of the same snapshot before reading the kernel again.
pub const READING_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl Hub {
    /// Keeps a fresh comparison for explain.
    pub fn store_reading(
        &self,
        generation: u64,
        took: std::time::Duration,
        checked: Checked,
    ) -> Arc<Reading> {
        let r = Arc::new(Reading {
            generation,
            at: Instant::now(),
            took,
            checked,
        });
        *self.kernel.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        r
    }

    /// The kept comparison of any snapshot.
    pub fn last_reading(&self) -> Option<Arc<Reading>> {
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The kept comparison, if it is of this snapshot and younger than `max_age`.
    pub fn reading(&self, generation: u64, max_age: std::time::Duration) -> Option<Arc<Reading>> {
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|r| r.generation == generation && r.at.elapsed() < max_age)
    }

    /// Marks a reading under way; `false` when one already is.
    pub(crate) fn start_reading(&self) -> bool {
        !self.reading.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    pub(crate) fn end_reading(&self) {
        self.reading
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// The report for a snapshot; `true` with it when the proxy synced meanwhile (the snapshot
/// is older than the kernel).
pub fn report(hub: &Hub, snap: &Snapshot) -> Result<(Report, bool), String> {
    let start = Instant::now();
    let checked = check(&Setup::of(hub), &snap.desired, &snap.node, None)?;
    let stale = wrote_since(hub, snap.generation);
    let checked = if stale {
        checked
    } else {
        // Explain reuses it: `verify` then `explain` read the kernel once.
        hub.store_reading(snap.generation, start.elapsed(), checked.clone());
        checked
    };
    let last = hub.syncs().last().map(|s| s.result.clone());
    let note = match last.as_deref() {
        None => Some("nothing synced yet: nothing was committed".to_owned()),
        Some(r) if !r.starts_with("ok") => Some(format!(
            "the last sync failed ({r}); the kernel may hold an older state until the retry"
        )),
        _ if stale => {
            Some("the proxy synced while the kernel was being read: ask again".to_owned())
        }
        _ => None,
    };
    Ok((
        Report {
            ok: checked.differences.is_empty(),
            differences: checked.differences,
            mode: hub.fixed.mode.to_owned(),
            compared: checked.compared,
            generation: snap.generation,
            elapsed_seconds: start.elapsed().as_secs_f64(),
            note,
        },
        stale,
    ))
}

/// Whether a sync after the snapshot of `generation` may have changed the kernel (one that
/// wrote something, or failed): then the kernel just read is newer than the snapshot. The
/// periodic syncs that write nothing do not count.
pub fn wrote_since(hub: &Hub, generation: u64) -> bool {
    let done = hub.syncs_done();
    let Ok(since) = usize::try_from(done.saturating_sub(generation)) else {
        return true;
    };
    if since == 0 {
        return false;
    }
    let syncs = hub.syncs();
    if hub.syncs_done() != done {
        return true;
    }
    since > syncs.len()
        || syncs[syncs.len() - since..]
            .iter()
            .any(|s| s.operations > 0 || !s.result.starts_with("ok"))
}

/// How long a request waits for the loop to publish a fresh snapshot.
const PATIENCE: Duration = Duration::from_millis(500);

/// `/debug/verify`, to merge into the debug router.
pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new()
        .route("/debug/verify", axum::routing::get(handler))
        .with_state(hub)
}

#[derive(Debug, Default, Deserialize)]
struct VerifyQuery {
    /// `json` (the default) or `text`.
    #[serde(default)]
    output: String,
}

async fn handler(
    State(hub): State<Arc<Hub>>,
    query: Result<Query<VerifyQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(StatusCode::BAD_REQUEST, "expected [?output=text|json]");
    };
    // A sync while the kernel is read makes the comparison meaningless: read again.
    let mut attempt = 0;
    let report = loop {
        let Some(snap) = hub.snapshot(PATIENCE).await else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sync loop has not published its state yet",
            );
        };
        let h = hub.clone();
        match tokio::task::spawn_blocking(move || report(&h, &snap)).await {
            Ok(Ok((_, true))) if attempt < 3 => attempt += 1,
            Ok(Ok((r, _))) => break r,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    };
    if q.output == "text" {
        return (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            report.to_string(),
        )
            .into_response();
    }
    json_response(
        StatusCode::OK,
        serde_json::to_string(&report).unwrap_or_default(),
    )
}

const USAGE: &str =
    "usage: kube-proxy-rs verify [--server http://127.0.0.1:10249] [--output text|json]
       exit 0: the kernel holds exactly the committed rules; 1: it differs (the differences
       are printed); 2: the proxy could not be asked, or could not read the kernel";

/// `kube-proxy-rs verify ARGS`: asks the running proxy's `/debug/verify`.
pub fn cli(args: &[String]) -> ExitCode {
    let mut server = "http://127.0.0.1:10249".to_owned();
    let mut json = false;
    let mut it = args.iter();
    let usage = |msg: &str| {
        if !msg.is_empty() {
            eprintln!("verify: {msg}");
        }
        eprintln!("{USAGE}");
        ExitCode::from(2)
    };
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned());
        match name {
            "--server" => match value() {
                Some(v) => server = v,
                None => return usage("--server needs a value"),
            },
            "--output" | "-o" => match value().as_deref() {
                Some("json") => json = true,
                Some("text") => json = false,
                other => return usage(&format!("--output: {other:?} is not text or json")),
            },
            "-h" | "--help" => return usage(""),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let (status, body) = match http_get(&server, "/debug/verify") {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verify: cannot ask the proxy at {server}: {e}");
            return ExitCode::from(2);
        }
    };
    if status != 200 {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        eprintln!("verify: the proxy answered {status}: {msg}");
        return ExitCode::from(2);
    }
    let report: Report = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verify: the proxy's answer is not a verify report ({e}): {body}");
            return ExitCode::from(2);
        }
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(out, "{}", body.trim_end())
    } else {
        write!(out, "{report}")
    };
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The sync loop's periodic comparison, run off its thread.
#[derive(Debug)]
pub struct DriftJob {
    setup: Setup,
    desired: DesiredState,
    node: NodeContext,
}

/// What a [`DriftJob`] found.
#[derive(Debug, Clone)]
pub enum Drift {
    None,
    Found(Vec<Difference>),
    /// The kernel cannot be read (no `nft`): no use trying again.
    Unavailable(String),
    /// This comparison failed.
    Failed(String),
}

impl DriftJob {
    pub fn new(hub: &Hub, desired: DesiredState, node: NodeContext) -> DriftJob {
        DriftJob {
            setup: Setup::of(hub),
            desired,
            node,
        }
    }

    /// Compares (blocking: it runs `nft` or `iptables-save`).
    pub fn run(&self) -> Drift {
        if self.setup.iptables.is_none() && !nft_installed() {
            return Drift::Unavailable("no `nft` command (install nftables)".into());
        }
        match check(&self.setup, &self.desired, &self.node, None) {
            Ok(c) if c.differences.is_empty() => Drift::None,
            Ok(c) => Drift::Found(c.differences),
            Err(e) => Drift::Failed(e),
        }
    }
}

/// Whether `nft` is on the `PATH`.
fn nft_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("nft").is_file()))
}

/// Where two rule lists differ: committed indexes missing from the kernel, kernel indexes not
/// committed, pairs at the same position that differ, or the same rules in another order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqDiff {
    pub missing: Vec<usize>,
    pub extra: Vec<usize>,
    pub different: Vec<(usize, usize)>,
    pub reordered: bool,
}

/// Compares two sequences as multisets, then pairs a missing and an extra item at the same
/// position (a rule changed in place).
pub fn seq_diff<T: Ord>(committed: &[T], kernel: &[T]) -> SeqDiff {
    let mut out = SeqDiff::default();
    if committed == kernel {
        return out;
    }
    let mut unused: BTreeMap<&T, std::collections::VecDeque<usize>> = BTreeMap::new();
    for (j, k) in kernel.iter().enumerate() {
        unused.entry(k).or_default().push_back(j);
    }
    for (i, c) in committed.iter().enumerate() {
        if unused.get_mut(c).and_then(|q| q.pop_front()).is_none() {
            out.missing.push(i);
        }
    }
    let mut extra: Vec<usize> = unused.into_values().flatten().collect();
    extra.sort_unstable();
    let mut missing = Vec::new();
    for i in std::mem::take(&mut out.missing) {
        match extra.iter().position(|j| *j == i) {
            Some(p) => {
                extra.remove(p);
                out.different.push((i, i));
            }
            None => missing.push(i),
        }
    }
    out.missing = missing;
    out.extra = extra;
    out.reordered = out.missing.is_empty() && out.extra.is_empty() && out.different.is_empty();
    out
}

#[cfg(test)]
mod tests;
