//! The synthetic cluster every measurement uses: N Services of one TCP port, E endpoints each
//! alternating between this node (`node-a`) and another, as API objects (JSON, for the test
//! API server) and as the k8s-openapi objects the library consumes.
//!
//! Service `i` is `bench/s<i>` (zero-padded: name order is index order, so the last index is
//! the last Service in upstream's chain order) with ClusterIP 172.16.0.0 + 1 + i, port 80 to
//! endpoint port 8080. Endpoint `k` of Service `i` is 10.64.0.0 + `stride(e)` i + an offset:
//! 5 + k for k >= 1, and for k = 0 the generation mod 6, so each generation moves one endpoint
//! (the stride is 16 up to 10 endpoints, the next power of two above E + 5 beyond).

use kpr_model::{EndpointSlice, Service};
use serde_json::{Value, json};
use std::net::Ipv4Addr;

pub(crate) const NAMESPACE: &str = "bench";
pub(crate) const NODE: &str = "node-a";
pub(crate) const NODE_IP: &str = "192.168.0.2";
/// The pod behind the data-plane target Service.
pub(crate) const POD_IP: &str = "10.0.0.11";
pub(crate) const POD_PORT: u16 = 8080;
pub(crate) const SERVICE_PORT: u16 = 80;

pub(crate) fn name(i: u32) -> String {
    format!("s{i:06}")
}

pub(crate) fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xAC10_0000u32 + 1 + i)
}

pub(crate) fn service(i: u32) -> Value {
    let ip = cluster_ip(i).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name(i), "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "p", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": POD_PORT}],
        },
    })
}

/// The addresses of one Service's endpoints: its `e` endpoints and the 5 spare ones endpoint 0
/// moves through.
pub(crate) fn stride(e: u32) -> u32 {
    (e + 6).next_power_of_two().max(16)
}

/// The most Services of `e` endpoints whose endpoints fit in 10.64.0.0 - 10.255.255.255.
pub(crate) fn max_services(e: u32) -> u32 {
    (0xFF_FFFF - 0x40_0000) / stride(e)
}

fn endpoint_ip(i: u32, e: u32, k: u32, generation: u32) -> Ipv4Addr {
    let offset = if k == 0 { generation % 6 } else { 5 + k };
    Ipv4Addr::from(0x0A40_0000u32 + i * stride(e) + offset)
}

/// Service `i`'s slice of `e` ready endpoints; `trigger` sets the
/// `endpoints.kubernetes.io/last-change-trigger-time` annotation.
pub(crate) fn slice(i: u32, e: u32, generation: u32, trigger: Option<&str>) -> Value {
    let endpoints: Vec<Value> = (0..e)
        .map(|k| {
            let node = if k % 2 == 0 { NODE } else { "node-b" };
            endpoint(&endpoint_ip(i, e, k, generation).to_string(), node)
        })
        .collect();
    slice_of(i, endpoints, trigger)
}

/// The `k`th address of the data-plane pod: 10.0.0.11 + `k` (`POD_IP` first).
pub(crate) fn pod_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0A00_000Bu32 + k)
}

/// Service `i`'s slice with `live` endpoints, all of them addresses of the data-plane pod.
pub(crate) fn live_slice(i: u32, live: u32) -> Value {
    let endpoints = (0..live)
        .map(|k| endpoint(&pod_ip(k).to_string(), NODE))
        .collect();
    slice_of(i, endpoints, None)
}

fn endpoint(ip: &str, node: &str) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true, "serving": true, "terminating": false}})
}

fn slice_of(i: u32, endpoints: Vec<Value>, trigger: Option<&str>) -> Value {
    let mut meta = json!({
        "name": format!("{}-a", name(i)),
        "namespace": NAMESPACE,
        "labels": {"kubernetes.io/service-name": name(i)},
    });
    if let Some(t) = trigger {
        meta["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": t});
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": POD_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// This node: InternalIP 192.168.0.2, podCIDR 10.0.0.0/24.
pub(crate) fn node() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "spec": {"podCIDR": "10.0.0.0/24", "podCIDRs": ["10.0.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    })
}

pub(crate) fn typed_service(v: Value) -> Service {
    serde_json::from_value(v).expect("the generated Service is valid")
}

pub(crate) fn typed_slice(v: Value) -> EndpointSlice {
    serde_json::from_value(v).expect("the generated EndpointSlice is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_of_two_services_never_meet() {
        assert_eq!(
            stride(10),
            16,
            "the sizes up to 10 endpoints keep their addresses"
        );
        assert_eq!(stride(50), 64);
        for e in [1, 10, 11, 50, 100] {
            let last = |i| {
                (0..6)
                    .map(move |g| endpoint_ip(i, e, 0, g))
                    .chain((1..e).map(move |k| endpoint_ip(i, e, k, 0)))
            };
            let top = last(0).max().expect("addresses");
            let next = last(1).min().expect("addresses");
            assert!(top < next, "E = {e}: {top} < {next}");
        }
        let top = endpoint_ip(max_services(10) - 1, 10, 9, 0);
        assert!(top.octets()[0] == 10, "{top} within 10.0.0.0/8");
    }
}
