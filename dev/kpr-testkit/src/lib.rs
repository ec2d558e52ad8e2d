//! Dev-only test kit: the project's test IP conventions and builders for Kubernetes objects.
//!
//! Test IPs follow upstream's tests so their cases port easily (GUIDE §4): Pod IPs 10.0.0.0/8,
//! ClusterIPs 172.30.0.0/16, node IPs 192.168.0.0/24 (this node 192.168.0.2), external IPs
//! 192.168.99.0/24, LB IPs 1.2.3.4 and 5.6.7.8, outside clients 203.0.113.0/24. Real-traffic
//! tests use them only inside network namespaces they created.
#![allow(clippy::unwrap_used)]

pub mod build;
pub mod lab;
pub mod mutate;
pub mod odd;

pub use build::{NodeBuilder, ServiceBuilder, SliceBuilder, node, service, service_cidr, slice};

/// The ServiceCIDR the test ClusterIPs come from.
pub const SERVICE_CIDR: &str = "172.30.0.0/16";

/// This node's name in tests.
pub const NODE: &str = "node-a";
/// Another node's name.
pub const OTHER_NODE: &str = "node-b";
/// This node's IPv4 address.
pub const NODE_IP: &str = "192.168.0.2";
/// This node's IPv6 address.
pub const NODE_IP6: &str = "fd00:168::2";
/// A pod on this node (inside the cluster CIDR).
pub const POD: &str = "10.0.0.5";
/// The cluster CIDR used in tests.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";
/// An off-cluster client.
pub const EXTERNAL_CLIENT: &str = "203.0.113.7";
/// Load-balancer ingress IPs.
pub const LB_IP: &str = "1.2.3.4";
pub const LB_IP2: &str = "5.6.7.8";
/// An external IP.
pub const EXTERNAL_IP: &str = "192.168.99.11";
