//! Test fixtures of the sync loop: its configuration for the test node, and numbered Services.

use super::SyncConfig;
use kpr_model::node::DetectLocalMode;
use std::time::Duration;

/// The loop's configuration for node `kpr_testkit::NODE`: no local-traffic detector,
/// syncPeriod 30 s, syncs at least `min_sync_period` apart.
pub(crate) fn config(min_sync_period: Duration) -> SyncConfig {
    SyncConfig {
        node_name: kpr_testkit::NODE.into(),
        masquerade_all: false,
        detect_local: DetectLocalMode::ClusterCidr(vec![]),
        bind_address: None,
        min_sync_period,
        sync_period: Duration::from_secs(30),
        wait_for_node: false,
    }
}

/// Service `ns/s<i>`, one TCP port 80, a ClusterIP of its own.
pub(crate) fn svc(i: u32) -> kpr_model::Service {
    kpr_testkit::service("ns", &format!("s{i}"))
        .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
        .port("p", 80, "TCP")
        .build()
}
