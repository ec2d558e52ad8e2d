//! The iptables mode (§13): upstream's chain layout and hashed names, rendered from the same
//! desired state as the nftables mode, applied with one `iptables-restore --noflush` per family.
//!
//! `rules` (typed rules and their restore text), `naming` (hashed chain names), `render`
//! (pure: desired state + committed copy + plan -> restore input), `trace` (packet tracer over
//! the typed rules), `cleanup` (pure: which chains and jumps are kube-proxy's, from
//! `iptables-save` text) and `exec` (the only code that runs the iptables tools: which of
//! iptables-nft and iptables-legacy the host uses, save, restore, the flush check) and
//! `refusal` (a refused restore in words: the line it names, resolved to our input, and why).

pub mod cleanup;
pub mod exec;
pub mod naming;
pub mod refusal;
pub mod render;
pub mod rules;
pub mod trace;

pub use refusal::RestoreError;
pub use render::{Existing, IptConfig, Rendered, Restore, render};
pub use rules::{IptTable, M, Rule, Target};
