//! Runs the iptables tools: which of iptables-nft and iptables-legacy the host uses (as
//! upstream's iptables-wrapper decides), `iptables-save`, `iptables-restore --noflush` (with
//! the xtables lock), the flush check, and the removal of kube-proxy's chains. The only code
//! that runs iptables tools.

use super::cleanup::removal;
use super::refusal::RestoreError;
use kpr_model::IpFamily;
use std::io::Write;
use std::process::{Command, Stdio};

/// The two iptables back ends a host may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `iptables-nft`: the rules live in nf_tables tables `ip nat`, `ip filter`, ...
    Nft,
    /// `iptables-legacy`: the x_tables kernel interface.
    Legacy,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Nft => "nft",
            Variant::Legacy => "legacy",
        }
    }

    /// `iptables-nft-restore`-style names; plain `iptables-restore` when the host has only that.
    fn tool(self, family: IpFamily, what: &str) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let named = format!("{base}-{}{what}", self.as_str());
        if which(&named) {
            named
        } else {
            format!("{base}{what}")
        }
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Which back end the host uses, as upstream's `iptables-wrapper`: the one holding kubelet's
/// chains (`KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` in mangle); otherwise the one with
/// more rules; nft when tied or when only one is installed. `KPR_IPTABLES_BACKEND=nft|legacy`
/// overrides (tests use it to run both).
pub fn detect() -> Variant {
    match std::env::var("KPR_IPTABLES_BACKEND").as_deref() {
        Ok("legacy") => return Variant::Legacy,
        Ok("nft") => return Variant::Nft,
        _ => {}
    }
    if !which("iptables-legacy-save") || !which("iptables-nft-save") {
        return if which("iptables-legacy-save") && !which("iptables-nft-save") {
            Variant::Legacy
        } else {
            Variant::Nft
        };
    }
    let save = |tool: &str, args: &[&str]| {
        Command::new(tool)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let hint = |s: &str| s.contains("KUBE-IPTABLES-HINT") || s.contains("KUBE-KUBELET-CANARY");
    for (variant, tools) in [
        (Variant::Nft, ["iptables-nft-save", "ip6tables-nft-save"]),
        (
            Variant::Legacy,
            ["iptables-legacy-save", "ip6tables-legacy-save"],
        ),
    ] {
        if tools.iter().any(|t| hint(&save(t, &["-t", "mangle"]))) {
            return variant;
        }
    }
    let rules = |tools: [&str; 2]| -> usize {
        tools
            .iter()
            .map(|t| save(t, &[]).lines().filter(|l| l.starts_with("-A")).count())
            .sum()
    };
    if rules(["iptables-legacy-save", "ip6tables-legacy-save"])
        > rules(["iptables-nft-save", "ip6tables-nft-save"])
    {
        Variant::Legacy
    } else {
        Variant::Nft
    }
}

/// The iptables tools of one back end.
#[derive(Debug, Clone, Copy)]
pub struct Tools {
    pub variant: Variant,
}

impl Tools {
    pub fn new(variant: Variant) -> Tools {
        Tools { variant }
    }

    /// `iptables-save` of the tables this backend uses (filter, nat, mangle).
    pub fn save(&self, family: IpFamily) -> Result<String, String> {
        let tool = self.variant.tool(family, "-save");
        let mut all = String::new();
        for table in ["filter", "nat", "mangle"] {
            let out = Command::new(&tool)
                .args(["-t", table])
                .output()
                .map_err(|e| format!("{tool}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{tool} -t {table}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            all.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        Ok(all)
    }

    /// `iptables-restore --noflush` of `input`, waiting up to 5 s for the xtables lock. Each
    /// table's part commits atomically, in the input's order, and the tool stops at the first
    /// refused table (so the tables before it stay committed); the error names the refused
    /// line and says why.
    pub fn restore(&self, family: IpFamily, input: &str) -> Result<(), RestoreError> {
        let tool = self.variant.tool(family, "-restore");
        restore_with(&tool, &["-w", "5", "--noflush"], input)
    }

    /// Whether our rules are still there: nat `KUBE-POSTROUTING` and filter `KUBE-FORWARD`
    /// hold rules (a `-F` of either table or a firewalld reload empties them) and mangle's
    /// canary chain exists.
    pub fn intact(&self, family: IpFamily) -> bool {
        let tool = self.variant.tool(family, "");
        // The chain's `-S` listing, `None` when the chain is missing.
        let listing = |table: &str, chain: &str| {
            Command::new(&tool)
                .args(["-w", "5", "-t", table, "-S", chain])
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let has_rules = |table: &str, chain: &str| {
            listing(table, chain).is_some_and(|l| l.lines().any(|l| l.starts_with("-A")))
        };
        let exists = |table: &str, chain: &str| listing(table, chain).is_some();
        has_rules("nat", super::render::POSTROUTING)
            && has_rules("filter", super::render::FORWARD)
            && exists("mangle", super::render::CANARY)
    }
}

fn restore_with(tool: &str, args: &[&str], input: &str) -> Result<(), RestoreError> {
    let spawn = |e: std::io::Error| RestoreError::spawn(tool, &e);
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let res = child.wait_with_output().map_err(spawn)?;
    if res.status.success() {
        return Ok(());
    }
    // The tool names a line of the input: the error quotes it and says why, in words.
    Err(RestoreError::from_output(
        tool,
        input,
        &String::from_utf8_lossy(&res.stderr),
    ))
}

/// Removes kube-proxy's iptables chains and jumps (§13.6; ours have the same names) in both
/// families and both back ends that are installed. Returns what was cleaned
/// (`IPv4/nft`, ...); errors are returned as text for the caller to log.
pub fn remove_upstream_leftovers() -> Result<Vec<String>, String> {
    let mut cleaned = Vec::new();
    let mut seen = Vec::new();
    for variant in [Variant::Nft, Variant::Legacy] {
        for family in [IpFamily::V4, IpFamily::V6] {
            let (save, restore) = (
                variant.tool(family, "-save"),
                variant.tool(family, "-restore"),
            );
            // Only `iptables-save` exists: it is one of the two; do not clean it twice.
            if seen.contains(&save) {
                continue;
            }
            seen.push(save.clone());
            let out = match Command::new(&save).stderr(Stdio::null()).output() {
                Ok(o) if o.status.success() => o,
                // Legacy tables absent from this kernel, or no iptables tools on this host:
                // nothing of kube-proxy's can be there either.
                Ok(_) | Err(_) => continue,
            };
            let Some(input) = removal(&String::from_utf8_lossy(&out.stdout)) else {
                continue;
            };
            restore_with(&restore, &["-w", "5", "--noflush"], &input).map_err(|e| e.to_string())?;
            cleaned.push(format!("{family}/{}", variant.as_str()));
        }
    }
    Ok(cleaned)
}
