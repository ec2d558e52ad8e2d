//! Upstream's hashed iptables chain names (§13.3): `KUBE-SVC-` (and `SVL`, `EXT`, `FW`) plus
//! the first 16 characters of base32(SHA-256(`<ns>/<name>[:<port>]` + protocol)); `KUBE-SEP-`
//! hashes the same with `ip:port` (`[ip]:port` for IPv6) appended. Chain names are limited to
//! 28 characters, hence the hash.

use crate::nftables::naming::base32;
use kpr_model::ServicePortName;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;

fn hash16(input: &str) -> String {
    let mut h = base32(&Sha256::digest(input.as_bytes()));
    h.truncate(16);
    h
}

fn port_proto(name: &ServicePortName) -> String {
    format!("{name}{}", name.protocol.lower())
}

/// `KUBE-SVC-…`, `KUBE-SVL-…`, `KUBE-EXT-…` or `KUBE-FW-…` of a service port (`kind` is
/// `SVC`, `SVL`, `EXT` or `FW`).
pub fn service_chain(kind: &str, name: &ServicePortName) -> String {
    format!("KUBE-{kind}-{}", hash16(&port_proto(name)))
}

/// `KUBE-SEP-…` of one endpoint of a service port.
pub fn endpoint_chain(name: &ServicePortName, ep: SocketAddr) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{}{ep}", port_proto(name))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpr_model::{Protocol, ServiceName};

    /// T13.1: `default/kubernetes:https` + `tcp` is `KUBE-SVC-NPX46M4PTMTKRN6Y`, as upstream.
    #[test]
    fn t13_1_names_match_upstream() {
        let p = ServicePortName::new(
            ServiceName::new("default", "kubernetes"),
            "https",
            Protocol::Tcp,
        );
        assert_eq!(service_chain("SVC", &p), "KUBE-SVC-NPX46M4PTMTKRN6Y");
        let sep = endpoint_chain(&p, "[fd00::1]:6443".parse().unwrap());
        assert!(sep.starts_with("KUBE-SEP-") && sep.len() == 25, "{sep}");
        assert!(service_chain("EXT", &p).len() <= 28);
        // Upstream's proxier tests.
        let p = ServicePortName::new(ServiceName::new("ns1", "svc1"), "p80", Protocol::Tcp);
        assert_eq!(service_chain("SVC", &p), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            endpoint_chain(&p, "10.180.0.1:80".parse().unwrap()),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }
}
