//! The Kubernetes objects the proxy reads, holding only the fields it uses.
//!
//! Services, EndpointSlices, Nodes and ServiceCIDRs are decoded from the API server and manifest files into
//! these lean types instead of the full API types: everything else an object carries (status
//! conditions, fields of a newer Kubernetes, managed fields) is skipped unread, and a field the
//! proxy does use but that holds a value of the wrong kind (a null, a number where a string
//! belongs) reads as absent. Decoding never fails on an object's shape, so one odd object can
//! neither fail a list or watch nor hide the objects around it; whether what was read makes
//! sense is [`crate::parse`]'s job, which skips the object (or the bad entry) with a reason.
//!
//! Field names and nesting mirror the API (`spec.ports[].nodePort` is
//! `spec.ports[i].node_port`), and the types serialize back to API JSON, so test fixtures can
//! be served by a test API server.

pub mod lenient;

use lenient::lenient_struct;
use std::collections::BTreeMap;

lenient_struct! {
    /// `metadata`: identity, labels and the annotations the proxy reads.
    pub struct ObjectMeta {
        "name" => name: Option<String>,
        "namespace" => namespace: Option<String>,
        /// Kept for the watch protocol (resuming a watch), not for the model.
        "resourceVersion" => resource_version: Option<String>,
        "labels" => labels: Option<BTreeMap<String, String>>,
        "annotations" => annotations: Option<BTreeMap<String, String>>,
        /// Only its presence is used (a Node being deleted, §7.1).
        "deletionTimestamp" => deletion_timestamp: Option<String>,
    }
}

lenient_struct! {
    api = ("v1", "Service");
    /// A `v1` Service: what §3.2 reads.
    pub struct Service {
        "metadata" => metadata: ObjectMeta,
        "spec" => spec: Option<ServiceSpec>,
        "status" => status: Option<ServiceStatus>,
    }
}

lenient_struct! {
    pub struct ServiceSpec {
        "type" => type_: Option<String>,
        "clusterIP" => cluster_ip: Option<String>,
        "clusterIPs" => cluster_ips: Option<Vec<String>>,
        "ports" => ports: Option<Vec<ServicePort>>,
        "externalIPs" => external_ips: Option<Vec<String>>,
        "loadBalancerSourceRanges" => load_balancer_source_ranges: Option<Vec<String>>,
        "sessionAffinity" => session_affinity: Option<String>,
        "sessionAffinityConfig" => session_affinity_config: Option<SessionAffinityConfig>,
        "externalTrafficPolicy" => external_traffic_policy: Option<String>,
        "internalTrafficPolicy" => internal_traffic_policy: Option<String>,
        "healthCheckNodePort" => health_check_node_port: Option<i64>,
    }
}

lenient_struct! {
    pub struct ServicePort {
        "name" => name: Option<String>,
        "protocol" => protocol: Option<String>,
        "port" => port: Option<i64>,
        "nodePort" => node_port: Option<i64>,
    }
}

lenient_struct! {
    pub struct SessionAffinityConfig {
        "clientIP" => client_ip: Option<ClientIpConfig>,
    }
}

lenient_struct! {
    pub struct ClientIpConfig {
        "timeoutSeconds" => timeout_seconds: Option<i64>,
    }
}

lenient_struct! {
    pub struct ServiceStatus {
        "loadBalancer" => load_balancer: Option<LoadBalancerStatus>,
    }
}

lenient_struct! {
    pub struct LoadBalancerStatus {
        "ingress" => ingress: Option<Vec<LoadBalancerIngress>>,
    }
}

lenient_struct! {
    pub struct LoadBalancerIngress {
        "ip" => ip: Option<String>,
        "hostname" => hostname: Option<String>,
        "ipMode" => ip_mode: Option<String>,
    }
}

lenient_struct! {
    api = ("discovery.k8s.io/v1", "EndpointSlice");
    /// A `discovery.k8s.io/v1` EndpointSlice: what §3.3 reads.
    pub struct EndpointSlice {
        "metadata" => metadata: ObjectMeta,
        "addressType" => address_type: String,
        "endpoints" => endpoints: Vec<Endpoint>,
        "ports" => ports: Option<Vec<EndpointPort>>,
    }
}

lenient_struct! {
    pub struct Endpoint {
        "addresses" => addresses: Vec<String>,
        "conditions" => conditions: Option<EndpointConditions>,
        "nodeName" => node_name: Option<String>,
        "zone" => zone: Option<String>,
        "hints" => hints: Option<EndpointHints>,
    }
}

lenient_struct! {
    pub struct EndpointConditions {
        "ready" => ready: Option<bool>,
        "serving" => serving: Option<bool>,
        "terminating" => terminating: Option<bool>,
    }
}

lenient_struct! {
    pub struct EndpointHints {
        "forZones" => for_zones: Option<Vec<ForName>>,
        "forNodes" => for_nodes: Option<Vec<ForName>>,
    }
}

lenient_struct! {
    /// A zone or node hint.
    pub struct ForName {
        "name" => name: String,
    }
}

lenient_struct! {
    pub struct EndpointPort {
        "name" => name: Option<String>,
        "protocol" => protocol: Option<String>,
        "port" => port: Option<i64>,
    }
}

lenient_struct! {
    api = ("v1", "Node");
    /// A `v1` Node: what §2.2 and §3.4 read.
    pub struct Node {
        "metadata" => metadata: ObjectMeta,
        "spec" => spec: Option<NodeSpec>,
        "status" => status: Option<NodeStatus>,
    }
}

lenient_struct! {
    pub struct NodeSpec {
        "podCIDR" => pod_cidr: Option<String>,
        "podCIDRs" => pod_cidrs: Option<Vec<String>>,
        "taints" => taints: Option<Vec<Taint>>,
    }
}

lenient_struct! {
    pub struct Taint {
        "key" => key: String,
        "effect" => effect: String,
    }
}

lenient_struct! {
    pub struct NodeStatus {
        "addresses" => addresses: Option<Vec<NodeAddress>>,
    }
}

lenient_struct! {
    pub struct NodeAddress {
        "type" => type_: String,
        "address" => address: String,
    }
}

lenient_struct! {
    api = ("networking.k8s.io/v1", "ServiceCIDR");
    /// A `networking.k8s.io/v1` (or `v1beta1`, the same fields) ServiceCIDR: a range
    /// ClusterIPs are allocated from (§4.8).
    pub struct ServiceCidr {
        "metadata" => metadata: ObjectMeta,
        "spec" => spec: Option<ServiceCidrSpec>,
    }
}

lenient_struct! {
    pub struct ServiceCidrSpec {
        "cidrs" => cidrs: Option<Vec<String>>,
    }
}

/// A top-level API object: its `apiVersion` and `kind`, and its metadata.
pub trait ApiObject {
    const API_VERSION: &'static str;
    const KIND: &'static str;
    fn metadata(&self) -> &ObjectMeta;
}

#[cfg(test)]
mod tests;
