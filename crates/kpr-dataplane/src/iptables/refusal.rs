//! What a refused `iptables-restore` said, in words: the line it names, resolved to our input's text, and why.
//!
//! The tools name a line of their input and sometimes a reason, each back end in its own
//! spelling:
//!
//! ```text
//! iptables-nft-restore v1.8.9 (nf_tables):
//! line 5: CHAIN_DEL failed (Device or resource busy): chain KUBE-SVC-AAAA
//! iptables-restore: line 5 failed                                   (legacy: no reason)
//! ... Couldn't load match `nosuchmatch':No such file or directory
//! Error occurred at line: 3
//! ```
//!
//! [`RestoreError::from_output`] reads that once into a typed error (the line number, the
//! line we sent, its table, the reason in words); nothing downstream matches on the text.

use std::fmt;

/// Why `iptables-restore` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreError {
    /// The tool (`iptables-nft-restore`, ...).
    pub tool: String,
    pub kind: RestoreErrorKind,
    /// The 1-based line of our input the tool named, and that line.
    pub line: Option<(usize, String)>,
    /// The table section that line is in (`nat`, ...).
    pub table: Option<String>,
    /// The tool's own message, on one line.
    pub message: String,
}

/// The classes of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreErrorKind {
    /// The tool could not be run (missing binary, pipe error).
    Spawn,
    /// Another program held the xtables lock for longer than we wait.
    Lock,
    /// A chain that something still references could not be deleted.
    InUse,
    /// A match, target or jump target is unknown (a missing kernel module or extension, or a
    /// chain that does not exist).
    Missing,
    /// Not permitted (CAP_NET_ADMIN).
    Permission,
    /// The kernel ran out of memory.
    Memory,
    /// The kernel does not accept the rule as written.
    Invalid,
    /// The kernel refused the line without a reason the tool reports (iptables-legacy).
    Unexplained,
    /// Anything else.
    Other,
}

impl RestoreError {
    /// The tool could not be run at all.
    pub fn spawn(tool: &str, err: &std::io::Error) -> RestoreError {
        RestoreError {
            tool: tool.to_owned(),
            kind: RestoreErrorKind::Spawn,
            line: None,
            table: None,
            message: err.to_string(),
        }
    }

    /// Reads a failed run's stderr, resolving the line it names in `input`.
    pub fn from_output(tool: &str, input: &str, stderr: &str) -> RestoreError {
        let message = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
            .collect::<Vec<_>>()
            .join(" ");
        let number = line_number(stderr);
        let line = number.and_then(|n| Some((n, input.lines().nth(n.checked_sub(1)?)?.to_owned())));
        let table = number.and_then(|n| {
            input
                .lines()
                .take(n)
                .filter_map(|l| l.strip_prefix('*'))
                .last()
                .map(|t| t.trim().to_owned())
        });
        let has = |s: &str| message.contains(s);
        let kind = if has("xtables lock") || has("Resource temporarily unavailable") {
            RestoreErrorKind::Lock
        } else if has("Device or resource busy") || has("Too many links") {
            RestoreErrorKind::InUse
        } else if has("Couldn't load")
            || has("does not exist")
            || has("No chain/target/match")
            || has("No such file or directory")
            || has("not supported")
        {
            RestoreErrorKind::Missing
        } else if has("Operation not permitted") || has("Permission denied") {
            RestoreErrorKind::Permission
        } else if has("Cannot allocate memory") || has("No space left") {
            RestoreErrorKind::Memory
        } else if has("Invalid argument") {
            RestoreErrorKind::Invalid
        } else if line.is_some() && message.ends_with("failed") {
            RestoreErrorKind::Unexplained
        } else {
            RestoreErrorKind::Other
        };
        RestoreError {
            tool: tool.to_owned(),
            kind,
            line,
            table,
            message,
        }
    }

    /// What the line asked for, in words (`deleting chain KUBE-SVC-… in table nat`).
    fn action(&self) -> Option<String> {
        let (_, text) = self.line.as_ref()?;
        let table = self.table.as_deref().unwrap_or("?");
        let mut words = text.split_whitespace();
        let first = words.next()?;
        let chain = words.next().unwrap_or("");
        Some(match first {
            "-X" => format!("deleting chain {chain} in table {table}"),
            "-A" | "-I" => format!("adding the rule `{text}` in table {table}"),
            "-D" => format!("deleting the rule `{text}` in table {table}"),
            "COMMIT" => format!("committing table {table}"),
            _ if first.starts_with(':') => {
                format!(
                    "declaring (and so flushing) chain {} in table {table}",
                    &first[1..]
                )
            }
            _ if first.starts_with('*') => format!("opening table {}", &first[1..]),
            _ => format!("`{text}` in table {table}"),
        })
    }

    /// Why, in words.
    fn reason(&self) -> &'static str {
        let deleting = self
            .line
            .as_ref()
            .is_some_and(|(_, t)| t.starts_with("-X "));
        match self.kind {
            RestoreErrorKind::Spawn => "the tool could not be run",
            RestoreErrorKind::Lock => {
                "another program held the xtables lock (/run/xtables.lock) for longer than we wait (5 s)"
            }
            RestoreErrorKind::InUse if deleting => {
                "the chain is still in use: a rule that is not ours jumps to it (see iptables-save); it can be deleted once that rule is gone"
            }
            RestoreErrorKind::InUse => "an object is in use",
            RestoreErrorKind::Unexplained if deleting => {
                "the tool gives no reason (iptables-legacy); a chain cannot be deleted while a rule jumps to it, so a rule that is not ours probably still references it (see iptables-save)"
            }
            RestoreErrorKind::Unexplained => {
                "the tool gives no reason (iptables-legacy does not report the kernel's)"
            }
            RestoreErrorKind::Missing => {
                "something it names is missing: the kernel module or iptables extension for a match or target, or the chain it jumps to"
            }
            RestoreErrorKind::Permission => {
                "not permitted: this process lacks CAP_NET_ADMIN in its network namespace"
            }
            RestoreErrorKind::Memory => "the kernel ran out of memory or room for the rules",
            RestoreErrorKind::Invalid => "the kernel does not accept the rule as written",
            RestoreErrorKind::Other => "the tool refused the input",
        }
    }
}

/// The first line number in the tool's message: `line 5 failed`, `line 5: …`,
/// `Error occurred at line: 3`.
fn line_number(stderr: &str) -> Option<usize> {
    let mut rest = stderr;
    while let Some(at) = rest.find("line") {
        rest = &rest[at + 4..];
        let digits: String = rest
            .trim_start_matches([':', ' '])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    None
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, self.action()) {
            (Some((n, _)), Some(action)) => write!(
                f,
                "{} refused line {n} of our input, {action}: {} ({})",
                self.tool,
                self.reason(),
                self.message
            ),
            _ => write!(f, "{}: {} ({})", self.tool, self.reason(), self.message),
        }
    }
}

impl std::error::Error for RestoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = "*nat\n:KUBE-SVC-AAAA - [0:0]\n:KUBE-BAR - [0:0]\n-A KUBE-BAR -j RETURN\n-X KUBE-SVC-AAAA\nCOMMIT\n*filter\n:KUBE-FOO - [0:0]\n-A KUBE-FOO -m nosuchmatch -j RETURN\nCOMMIT\n";

    #[test]
    fn each_back_ends_spelling_names_the_line_we_sent_and_why() {
        let nft = RestoreError::from_output(
            "iptables-nft-restore",
            INPUT,
            "iptables-nft-restore v1.8.9 (nf_tables): \nline 5: CHAIN_DEL failed (Device or resource busy): chain KUBE-SVC-AAAA\n",
        );
        assert_eq!(nft.kind, RestoreErrorKind::InUse);
        assert_eq!(
            nft.to_string(),
            "iptables-nft-restore refused line 5 of our input, deleting chain KUBE-SVC-AAAA in table nat: the chain is still in use: a rule that is not ours jumps to it (see iptables-save); it can be deleted once that rule is gone (iptables-nft-restore v1.8.9 (nf_tables): line 5: CHAIN_DEL failed (Device or resource busy): chain KUBE-SVC-AAAA)"
        );
        let legacy = RestoreError::from_output(
            "iptables-restore",
            INPUT,
            "iptables-restore: line 5 failed\n",
        );
        assert_eq!(legacy.kind, RestoreErrorKind::Unexplained);
        assert!(
            legacy
                .to_string()
                .contains("deleting chain KUBE-SVC-AAAA in table nat: the tool gives no reason"),
            "{legacy}"
        );
        let missing = RestoreError::from_output(
            "iptables-restore",
            INPUT,
            "iptables-restore v1.8.9 (legacy): Couldn't load match `nosuchmatch':No such file or directory\n\nError occurred at line: 9\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
        );
        assert_eq!(missing.kind, RestoreErrorKind::Missing);
        assert_eq!(missing.table.as_deref(), Some("filter"));
        assert!(
            missing.to_string().starts_with(
                "iptables-restore refused line 9 of our input, adding the rule `-A KUBE-FOO -m nosuchmatch -j RETURN` in table filter: something it names is missing"
            ),
            "{missing}"
        );
        assert!(!missing.to_string().contains("Try `"));
        let lock = RestoreError::from_output(
            "iptables-restore",
            INPUT,
            "Another app is currently holding the xtables lock. Stopped waiting after 5s.\n",
        );
        assert_eq!(lock.kind, RestoreErrorKind::Lock);
        assert_eq!(lock.line, None);
    }
}
