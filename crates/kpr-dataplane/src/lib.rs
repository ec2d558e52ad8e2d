//! Backends: turn the model's desired state into kernel rules.
//!
//! Consumes model types only (it never sees the Kubernetes API) and knows kernel quirks. The
//! nftables backend renders typed `kpr_nft` transactions; rendering is pure and deterministic,
//! applying goes through one `kpr_nft` executor.

pub mod iptables;
pub mod nftables;
