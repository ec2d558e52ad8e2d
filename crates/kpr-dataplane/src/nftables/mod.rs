//! The nftables backend: layout and names ([`layout`], [`naming`]), the pure renderer
//! ([`render`]) and a packet tracer over the typed rules ([`trace`]).

pub mod layout;
pub mod naming;
pub mod render;
pub mod trace;

pub use render::{
    NftConfig, NodePortAddrs, Rendered, SLOTS, render, render_cold, render_cold_each,
    render_full_stream,
};
