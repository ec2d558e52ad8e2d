//! nftables for kube-proxy-rs: typed objects, transactions, and the executors that apply them.
//!
//! Backends build a [`Transaction`] of typed operations on typed objects ([`objects`]); an
//! [`Executor`] applies it atomically (all or nothing). [`Fake`] is as strict as the kernel
//! (dangling jumps, missing sets or maps, and duplicates are errors; a failed transaction changes
//! nothing) and dumps its state in `nft list table` form, so tests can compare it with the
//! kernel. [`Netlink`] speaks nf_tables netlink directly (the daemon's executor); [`NftCli`] drives
//! `nft -f -` (the reference it is checked against). Only executors touch the kernel.
//! [`Faulty`] wraps any executor and refuses chosen transactions, for tests of refusals, whose
//! errors say in words what the kernel refused ([`refusal`]).

pub mod exec;
pub mod executor;
pub mod fake;
pub mod faulty;
pub mod netlink;
pub mod objects;
pub mod refusal;
pub mod text;
pub mod transaction;

pub use exec::NftCli;
pub use executor::Executor;
pub use fake::{ApplyError, Fake, normalize};
pub use faulty::{Faults, Faulty};
pub use netlink::Netlink;
pub use objects::*;
pub use refusal::Errno;
pub use transaction::{Op, Transaction};
