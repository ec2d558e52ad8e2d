//! Names of per-service-port and per-endpoint chains and sets.
//!
//! Like upstream (§12.5): `<H8>-<ns>/<svc>/<proto>/<port>`, where H8 is the first 8 characters
//! of base32(SHA-256) of the rest, so names are unique even when the readable part is cut.
//! Endpoint names append `__<ip>/<port>` (IPv6 colons become dots). Names longer than the
//! limit are cut and end in `...`. A `/` in a chain name marks it as service-owned.

use kpr_model::ServicePortName;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;

/// Longest name we emit (the kernel allows 255 bytes; upstream cuts at 240).
pub const MAX_NAME: usize = 240;

/// The per-service-port base name.
pub fn service_base(name: &ServicePortName) -> String {
    let readable = format!(
        "{}/{}/{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.lower(),
        name.port
    );
    hashed(&readable)
}

/// The per-endpoint base name.
pub fn endpoint_base(name: &ServicePortName, ep: SocketAddr) -> String {
    let ip = ep.ip().to_string().replace(':', ".");
    let readable = format!(
        "{}/{}/{}/{}__{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.lower(),
        name.port,
        ip,
        ep.port()
    );
    hashed(&readable)
}

/// `prefix-base`, cut to [`MAX_NAME`].
pub fn chain(prefix: &str, base: &str) -> String {
    let full = format!("{prefix}-{base}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let mut cut = MAX_NAME - 3;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &full[..cut])
}

/// The first 32 bits of SHA-256 of a name (endpoint-map slots).
pub fn hash32(name: &str) -> u32 {
    let d = Sha256::digest(name.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn hashed(readable: &str) -> String {
    let digest = Sha256::digest(readable.as_bytes());
    format!("{}-{readable}", &base32(&digest)[..8])
}

/// RFC 4648 base32, upper case, no padding.
pub(crate) fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buf, mut bits) = (0u32, 0u32);
    for b in bytes {
        buf = (buf << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpr_model::{Protocol, ServiceName};

    /// §12.5's examples: upstream's names, so operators recognise them.
    #[test]
    fn s12_5_names_match_upstream() {
        let p = ServicePortName::new(ServiceName::new("ns1", "svc1"), "p80", Protocol::Tcp);
        assert_eq!(service_base(&p), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            endpoint_base(&p, "10.180.0.1:80".parse().unwrap()),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn long_names_are_cut_within_the_limit() {
        let long = "x".repeat(300);
        let p = ServicePortName::new(ServiceName::new("ns", long.as_str()), "p", Protocol::Udp);
        let c = chain(
            "endpoint",
            &endpoint_base(&p, "[fd00::1]:53".parse().unwrap()),
        );
        assert_eq!(c.len(), MAX_NAME);
        assert!(c.ends_with("..."));
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }
}
