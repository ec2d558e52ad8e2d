//! The network lab of real-kernel tests (see `kpr_netlab`, shared with the sandbox command).

pub use kpr_netlab::*;
