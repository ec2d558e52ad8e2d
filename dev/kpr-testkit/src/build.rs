//! Builders for Services, EndpointSlices, Nodes and ServiceCIDRs as the model's lean API objects.
//!
//! Tests describe objects in one line each (`service("ns", "svc").cluster_ip("172.30.0.1")
//! .port("p80", 80, "TCP")`) and get exactly what the API server would hand the proxy.

use kpr_model::objects::{
    ClientIpConfig, Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForName, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec, NodeStatus,
    ObjectMeta, Service, ServiceCidr, ServiceCidrSpec, ServicePort, ServiceSpec, ServiceStatus,
    SessionAffinityConfig, Taint,
};
use std::collections::BTreeMap;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: (!ns.is_empty()).then(|| ns.to_owned()),
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

/// Starts a ClusterIP Service.
pub fn service(ns: &str, name: &str) -> ServiceBuilder {
    ServiceBuilder(Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Builds a Service.
#[derive(Debug, Clone)]
pub struct ServiceBuilder(pub Service);

impl ServiceBuilder {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    pub fn build(self) -> Service {
        self.0
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    /// Sets `spec.clusterIP` and appends to `spec.clusterIPs`.
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        let spec = self.spec();
        if spec.cluster_ip.is_none() {
            spec.cluster_ip = Some(ip.into());
        }
        spec.cluster_ips
            .get_or_insert_with(Vec::new)
            .push(ip.into());
        self
    }

    pub fn type_(mut self, t: &str) -> Self {
        self.spec().type_ = Some(t.into());
        self
    }

    /// Adds a port (`protocol` in Kubernetes spelling).
    pub fn port(self, name: &str, port: i32, protocol: &str) -> Self {
        self.port_np(name, port, protocol, 0)
    }

    /// Adds a port with a nodePort (and makes the Service a NodePort if it is a ClusterIP).
    pub fn node_port(mut self, name: &str, port: i32, protocol: &str, node_port: i32) -> Self {
        if self.spec().type_.as_deref() == Some("ClusterIP") {
            self.spec().type_ = Some("NodePort".into());
        }
        self.port_np(name, port, protocol, node_port)
    }

    fn port_np(mut self, name: &str, port: i32, protocol: &str, node_port: i32) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port: Some(port.into()),
                protocol: Some(protocol.into()),
                node_port: (node_port != 0).then_some(node_port.into()),
            });
        self
    }

    /// Makes it a LoadBalancer with an ingress IP (`ip_mode` `None` = unset).
    pub fn lb(self, ip: &str, ip_mode: Option<&str>) -> Self {
        self.ingress(LoadBalancerIngress {
            ip: Some(ip.into()),
            ip_mode: ip_mode.map(str::to_owned),
            ..LoadBalancerIngress::default()
        })
    }

    /// Makes it a LoadBalancer whose ingress has only a hostname.
    pub fn lb_hostname(self, host: &str) -> Self {
        self.ingress(LoadBalancerIngress {
            hostname: Some(host.into()),
            ..LoadBalancerIngress::default()
        })
    }

    /// Makes it a LoadBalancer and adds a status.loadBalancer.ingress entry.
    fn ingress(mut self, ingress: LoadBalancerIngress) -> Self {
        self.spec().type_ = Some("LoadBalancer".into());
        let status = self.0.status.get_or_insert_with(ServiceStatus::default);
        let lb = status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default);
        lb.ingress.get_or_insert_with(Vec::new).push(ingress);
        self
    }

    pub fn external_ip(mut self, ip: &str) -> Self {
        self.spec()
            .external_ips
            .get_or_insert_with(Vec::new)
            .push(ip.into());
        self
    }

    pub fn source_range(mut self, range: &str) -> Self {
        self.spec()
            .load_balancer_source_ranges
            .get_or_insert_with(Vec::new)
            .push(range.into());
        self
    }

    pub fn etp_local(mut self) -> Self {
        self.spec().external_traffic_policy = Some("Local".into());
        self
    }

    pub fn itp_local(mut self) -> Self {
        self.spec().internal_traffic_policy = Some("Local".into());
        self
    }

    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port.into());
        self
    }

    /// ClientIP affinity; `None` leaves the timeout to the API default.
    pub fn affinity(mut self, timeout: Option<i32>) -> Self {
        let spec = self.spec();
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = timeout.map(|t| SessionAffinityConfig {
            client_ip: Some(ClientIpConfig {
                timeout_seconds: Some(t.into()),
            }),
        });
        self
    }
}

impl From<ServiceBuilder> for Service {
    fn from(b: ServiceBuilder) -> Service {
        b.0
    }
}

/// Starts an EndpointSlice for Service `ns/svc`, named `<svc>-<suffix>`, of the IP's family.
pub fn slice(ns: &str, svc: &str, suffix: &str) -> SliceBuilder {
    let mut m = meta(ns, &format!("{svc}-{suffix}"));
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_owned(),
        svc.to_owned(),
    )]));
    SliceBuilder(EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: Vec::new(),
        metadata: m,
        ports: None,
    })
}

/// Builds an EndpointSlice.
#[derive(Debug, Clone)]
pub struct SliceBuilder(pub EndpointSlice);

impl SliceBuilder {
    pub fn build(self) -> EndpointSlice {
        self.0
    }

    pub fn ipv6(mut self) -> Self {
        self.0.address_type = "IPv6".into();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: Some(name.into()),
                port: Some(port.into()),
                protocol: Some(protocol.into()),
            });
        self
    }

    /// A ready endpoint on `node` (empty = no nodeName).
    pub fn ready(self, ip: &str, node: &str) -> Self {
        self.endpoint(ip, node, Some(true), Some(true), Some(false))
    }

    /// A serving, terminating endpoint on `node`.
    pub fn terminating(self, ip: &str, node: &str) -> Self {
        self.endpoint(ip, node, Some(false), Some(true), Some(true))
    }

    /// Endpoints of a generated cluster (property tests): for each `(i, state)`, address
    /// `10.0.{i % 2}.{i + 10}` on [`crate::NODE`] (even `i`) or [`crate::OTHER_NODE`], ready
    /// (`state % 3 == 0`), serving and terminating (1), or neither (2).
    pub fn mixed(self, endpoints: &[(u8, u8)]) -> Self {
        endpoints.iter().fold(self, |s, (i, state)| {
            let addr = format!("10.0.{}.{}", i % 2, i + 10);
            let node = if i % 2 == 0 {
                crate::NODE
            } else {
                crate::OTHER_NODE
            };
            match state % 3 {
                0 => s.ready(&addr, node),
                1 => s.terminating(&addr, node),
                _ => s.endpoint(&addr, node, Some(false), Some(false), Some(false)),
            }
        })
    }

    /// An endpoint with explicit conditions (`None` = nil in the API).
    pub fn endpoint(
        mut self,
        ip: &str,
        node: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        self.0.endpoints.push(Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name: (!node.is_empty()).then(|| node.to_owned()),
            ..Endpoint::default()
        });
        self
    }

    /// Sets zone hints on the last endpoint.
    pub fn zone_hints(mut self, zones: &[&str]) -> Self {
        if let Some(ep) = self.0.endpoints.last_mut() {
            let hints = ep.hints.get_or_insert_with(EndpointHints::default);
            hints.for_zones = Some(
                zones
                    .iter()
                    .map(|z| ForName { name: (*z).into() })
                    .collect(),
            );
        }
        self
    }

    /// Sets node hints on the last endpoint.
    pub fn node_hints(mut self, nodes: &[&str]) -> Self {
        if let Some(ep) = self.0.endpoints.last_mut() {
            let hints = ep.hints.get_or_insert_with(EndpointHints::default);
            hints.for_nodes = Some(
                nodes
                    .iter()
                    .map(|n| ForName { name: (*n).into() })
                    .collect(),
            );
        }
        self
    }
}

impl From<SliceBuilder> for EndpointSlice {
    fn from(b: SliceBuilder) -> EndpointSlice {
        b.0
    }
}

/// Starts a Node.
pub fn node(name: &str) -> NodeBuilder {
    NodeBuilder(Node {
        metadata: meta("", name),
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus::default()),
    })
}

/// Builds a Node.
#[derive(Debug, Clone)]
pub struct NodeBuilder(pub Node);

impl NodeBuilder {
    pub fn build(self) -> Node {
        self.0
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn zone(self, zone: &str) -> Self {
        self.label("topology.kubernetes.io/zone", zone)
    }

    /// Adds an address of a type (`InternalIP`, `ExternalIP`, `Hostname`).
    pub fn address(mut self, type_: &str, address: &str) -> Self {
        let status = self.0.status.get_or_insert_with(NodeStatus::default);
        status
            .addresses
            .get_or_insert_with(Vec::new)
            .push(NodeAddress {
                address: address.into(),
                type_: type_.into(),
            });
        self
    }

    pub fn pod_cidr(mut self, cidr: &str) -> Self {
        let spec = self.0.spec.get_or_insert_with(NodeSpec::default);
        if spec.pod_cidr.is_none() {
            spec.pod_cidr = Some(cidr.into());
        }
        spec.pod_cidrs
            .get_or_insert_with(Vec::new)
            .push(cidr.into());
        self
    }

    pub fn taint(mut self, key: &str) -> Self {
        let spec = self.0.spec.get_or_insert_with(NodeSpec::default);
        spec.taints.get_or_insert_with(Vec::new).push(Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
        });
        self
    }
}

impl From<NodeBuilder> for Node {
    fn from(b: NodeBuilder) -> Node {
        b.0
    }
}

/// A ServiceCIDR (cluster-scoped) with these ranges, e.g.
/// `service_cidr("kubernetes", &["172.30.0.0/16"])`.
pub fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCidr {
    ServiceCidr {
        metadata: meta("", name),
        spec: Some(ServiceCidrSpec {
            cidrs: Some(cidrs.iter().map(|c| (*c).to_owned()).collect()),
        }),
    }
}
