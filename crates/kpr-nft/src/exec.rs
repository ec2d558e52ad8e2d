//! [`NftCli`]: an [`Executor`] that pipes a transaction's script into `nft -f -` (one
//! invocation = one atomic kernel transaction), the reference the netlink executor is checked
//! against.

use crate::executor::Executor;
use crate::fake::ApplyError;
use crate::objects::{Family, Table};
use crate::text;
use crate::transaction::Transaction;
use std::io::Write;
use std::process::{Command, Stdio};

/// Drives the `nft` binary, in this process's network namespace or (for tests) in a named one
/// through `ip netns exec`.
#[derive(Debug, Clone, Default)]
pub struct NftCli {
    pub netns: Option<String>,
}

impl NftCli {
    pub fn in_netns(name: impl Into<String>) -> NftCli {
        NftCli {
            netns: Some(name.into()),
        }
    }

    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        }
    }

    /// Runs `nft` with arguments and optional stdin; returns stdout.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
        let mut cmd = self.command();
        cmd.args(args).stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| ApplyError::Spawn(e.to_string()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| ApplyError::Spawn(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| ApplyError::Spawn(e.to_string()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(ApplyError::Kernel(
                err.lines().next().unwrap_or("nft failed").to_owned(),
            ))
        }
    }

    /// `nft list table`, or `None` when the table does not exist. Expensive on large tables:
    /// never on the hot path.
    pub fn list_table(&self, family: Family, name: &str) -> Result<Option<String>, ApplyError> {
        match self.run(&["list", "table", family.as_str(), name], None) {
            Ok(s) => Ok(Some(s)),
            Err(ApplyError::Kernel(e)) if e.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Executor for NftCli {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        self.run(&["-f", "-"], Some(&text::script(tx))).map(|_| ())
    }

    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError> {
        if self.netns.is_none() {
            // In our own namespace: one filtered netlink dump, no `nft` cache fill.
            return crate::netlink::chain_rule_count(table.family, &table.name, canary)
                .map(|n| n.unwrap_or(0) > 0);
        }
        match self.run(
            &["list", "chain", table.family.as_str(), &table.name, canary],
            None,
        ) {
            Ok(listing) => Ok(listing.lines().filter(|l| !l.trim().is_empty()).count() > 4),
            Err(ApplyError::Kernel(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
