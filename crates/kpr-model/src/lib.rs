//! The pure service model of kube-proxy-rs.
//!
//! Kubernetes objects (Services, EndpointSlices, this node's Node), decoded leniently into lean
//! types holding only what the proxy reads ([`objects`]), go in as [`Input`] events;
//! [`Trackers`] fold them into a [`ClusterState`] and record which service ports changed between
//! syncs; [`desired()`] turns the state plus [`NodeContext`] and [`ProxyPolicy`] into the
//! [`DesiredState`] every backend renders: per IP family, per service port, which frontends exist
//! and which endpoints (or drop / reject) each kind of traffic gets.
//!
//! Invariant: nothing in this crate performs IO, observes time, spawns tasks or panics on input.
//! Invalid objects are skipped and reported as [`Skipped`] values for the caller to log.

pub mod desired;
pub mod explain;
pub mod input;
pub mod intent;
pub mod intern;
pub mod names;
pub mod node;
pub mod objects;
pub mod parse;
pub mod state;
pub mod topology;

pub use desired::{
    DesiredState, Endpoint, ExternalAction, FamilyDesired, InternalAction, PortMap,
    ServicePortDesired, desired, update_desired,
};
pub use input::{Input, ObjectKey, Update};
pub use names::{IpFamily, Protocol, ServiceName, ServicePortName};
pub use node::{LocalDetector, NodeContext, ProxyPolicy};
pub use objects::{EndpointSlice, Node, Service};
pub use parse::{ParsedService, ParsedSlice, Skipped};
pub use state::{ClusterState, SyncPlan, Trackers};
