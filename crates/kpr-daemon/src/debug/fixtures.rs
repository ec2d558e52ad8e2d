//! Test fixtures of the debug surface: a hub with the tests' settings, and a sync state fed
//! Services, EndpointSlices and this node's Node, synced once.
#![allow(clippy::unwrap_used)]

use super::{Hub, Static};
use crate::sync::{SyncConfig, SyncState};
use kpr_config::NodePortAddresses;
use kpr_model::node::DetectLocalMode;
use kpr_model::{EndpointSlice, Input, Node, Service, Update};
use std::sync::Arc;
use std::time::Duration;

/// The fixed settings of the tests (nftables mode, mark bit 14, NodePorts on every address).
pub(crate) fn fixed() -> Static {
    Static {
        mode: "nftables",
        masquerade_bit: 14,
        node_ports: NodePortAddresses::Default,
        localhost_node_ports: false,
        configz: serde_json::Value::Null,
    }
}

pub(crate) fn hub() -> Arc<Hub> {
    Hub::new(fixed())
}

/// The loop's configuration for node `kpr_testkit::NODE`, pods in `cluster_cidrs`.
pub(crate) fn sync_config(cluster_cidrs: &[&str]) -> SyncConfig {
    SyncConfig {
        detect_local: DetectLocalMode::ClusterCidr(
            cluster_cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        ),
        ..crate::sync::fixtures::config(Duration::ZERO)
    }
}

/// `state` fed these objects (and the Node, when given), then synced once.
pub(crate) fn synced(
    mut state: SyncState,
    node: Option<Node>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
) -> SyncState {
    if let Some(n) = node {
        state.record(Input::Node(Some(Box::new(n))));
    }
    state.record(Input::Services(Update::Replace(services)));
    state.record(Input::Slices(Update::Replace(slices)));
    state.sync();
    state
}
