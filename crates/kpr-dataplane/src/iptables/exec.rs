//! Runs `iptables-save` / `iptables-restore` (and the ip6 variants) to remove upstream
//! kube-proxy's leftovers. The only code here that runs iptables tools.

use super::cleanup::removal;
use std::io::Write;
use std::process::{Command, Stdio};

/// Removes upstream kube-proxy's iptables chains and jumps in both families. Returns the
/// families cleaned; errors are returned as text for the caller to log (upstream only logs).
pub fn remove_upstream_leftovers() -> Result<Vec<&'static str>, String> {
    let mut cleaned = Vec::new();
    for (save, restore, family) in [
        ("iptables-save", "iptables-restore", "IPv4"),
        ("ip6tables-save", "ip6tables-restore", "IPv6"),
    ] {
        let out = match Command::new(save).output() {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                return Err(format!(
                    "{save}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            // No iptables tools on this host: nothing of upstream's can be there either.
            Err(_) => continue,
        };
        let Some(input) = removal(&String::from_utf8_lossy(&out.stdout)) else {
            continue;
        };
        let mut child = Command::new(restore)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{restore}: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| format!("{restore}: {e}"))?;
        }
        let res = child
            .wait_with_output()
            .map_err(|e| format!("{restore}: {e}"))?;
        if !res.status.success() {
            return Err(format!(
                "{restore}: {}",
                String::from_utf8_lossy(&res.stderr).trim()
            ));
        }
        cleaned.push(family);
    }
    Ok(cleaned)
}
