//! Test harness for the model: feed objects, sync, and ask where packets go.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use kpr_model::intent::{HostView, Intent, Packet, Target, intent};
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{
    DesiredState, Input, IpFamily, Protocol, ServicePortDesired, Skipped, Trackers, Update, desired,
};
use kpr_model::{EndpointSlice, Node, Service};
use kpr_testkit::{CLUSTER_CIDR, NODE, NODE_IP, NODE_IP6};

pub struct Harness {
    pub trackers: Trackers,
    pub mode: DetectLocalMode,
    pub masquerade_all: bool,
    pub host: HostView,
    pub skipped: Vec<Skipped>,
}

impl Harness {
    /// ClusterCIDR detection with 10.0.0.0/8, NodePorts on the node IPs (nftables defaults).
    pub fn new() -> Harness {
        Harness {
            trackers: Trackers::new(),
            mode: DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]),
            masquerade_all: false,
            host: HostView {
                node_port_ips: Some(vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()]),
                local_ips: vec![
                    NODE_IP.parse().unwrap(),
                    "127.0.0.1".parse().unwrap(),
                    "192.168.1.2".parse().unwrap(),
                ],
                reject_unknown_cluster_ports: true,
            },
            skipped: Vec::new(),
        }
    }

    pub fn service(&mut self, svc: impl Into<Service>) -> &mut Self {
        let notes = self
            .trackers
            .record(Input::Services(Update::Apply(svc.into())));
        self.skipped.extend(notes);
        self
    }

    pub fn slice(&mut self, s: impl Into<EndpointSlice>) -> &mut Self {
        let notes = self.trackers.record(Input::Slices(Update::Apply(s.into())));
        self.skipped.extend(notes);
        self
    }

    /// Adds or changes a ServiceCIDR.
    pub fn service_cidr(&mut self, c: kpr_model::objects::ServiceCidr) -> &mut Self {
        let notes = self.trackers.record(Input::ServiceCidrs(Update::Apply(c)));
        self.skipped.extend(notes);
        self
    }

    pub fn node(&mut self, n: impl Into<Node>) -> &mut Self {
        self.trackers.record(Input::Node(Some(Box::new(n.into()))));
        self
    }

    pub fn policy(&self) -> ProxyPolicy {
        ProxyPolicy::new(
            self.masquerade_all,
            &self.mode,
            self.trackers.state().node(),
        )
    }

    pub fn context(&self) -> NodeContext {
        NodeContext::new(NODE, self.trackers.state().node())
    }

    pub fn desired(&self) -> DesiredState {
        desired(self.trackers.state(), &self.context(), &self.policy())
    }

    /// The desired state of one service port (`ns/svc:port`), IPv4 unless the name ends `@v6`.
    pub fn port(
        &self,
        family: IpFamily,
        ns: &str,
        svc: &str,
        port: &str,
    ) -> Option<ServicePortDesired> {
        let d = self.desired();
        d.families[&family]
            .ports
            .iter()
            .find(|(k, _)| {
                *k.service.namespace == *ns && *k.service.name == *svc && *k.port == *port
            })
            .map(|(_, v)| (**v).clone())
    }

    pub fn trace(&self, pkt: Packet) -> Intent {
        let fam = if pkt.dst.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        };
        intent(&self.desired().families[&fam], &self.host, &pkt)
    }
}

/// A packet builder: `from_pod("10.0.0.5").to("172.30.0.1", 80, Protocol::Tcp)`.
#[derive(Clone)]
pub struct From {
    src: String,
    from_host: bool,
    iif: Option<String>,
}

pub fn from_pod(ip: &str) -> From {
    From {
        src: ip.into(),
        from_host: false,
        iif: Some("veth1234".into()),
    }
}

pub fn from_external(ip: &str) -> From {
    From {
        src: ip.into(),
        from_host: false,
        iif: Some("eth0".into()),
    }
}

pub fn from_host(ip: &str) -> From {
    From {
        src: ip.into(),
        from_host: true,
        iif: None,
    }
}

impl From {
    pub fn iif(mut self, iif: &str) -> Self {
        self.iif = Some(iif.into());
        self
    }

    pub fn to(self, dst: &str, port: u16, protocol: Protocol) -> Packet {
        Packet {
            src: self.src.parse().unwrap(),
            iif: self.iif,
            from_host: self.from_host,
            dst: dst.parse().unwrap(),
            protocol,
            port,
        }
    }

    pub fn tcp(self, dst: &str, port: u16) -> Packet {
        self.to(dst, port, Protocol::Tcp)
    }
}

/// DNAT to these `ip:port` endpoints, all with the same masquerade flag.
pub fn dnat(eps: &[&str], masquerade: bool) -> Intent {
    Intent::Dnat(
        eps.iter()
            .map(|e| Target {
                addr: e.parse().unwrap(),
                masquerade,
            })
            .collect(),
    )
}
