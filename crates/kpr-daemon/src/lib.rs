//! The kube-proxy-rs daemon: configuration to running proxy. The binary `kube-proxy-rs` is a
//! thin `main` over [`app::main`]; the modules are a library so tests can drive them.

pub mod app;
pub mod commands;
pub mod dataplane;
pub mod debug;
pub mod latency;
pub mod logging;
pub mod report;
pub mod sandbox;
pub mod socket_lb;
pub mod sync;
