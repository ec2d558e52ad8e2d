//! ctnetlink: dump the conntrack table of one family and delete entries by their original
//! tuple, in the calling process's network namespace. Both need CAP_NET_ADMIN in the user
//! namespace owning that network namespace.

use crate::flow::Flow;
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const CTNETLINK: u16 = 1 << 8;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_ZONE: u16 = 18;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_SCTP: u16 = 3;
/// CTA_PROTOINFO_TCP_STATE and CTA_PROTOINFO_SCTP_STATE.
const CTA_PROTOINFO_STATE: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// Why a conntrack call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("conntrack netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("conntrack netlink: kernel error {0}")]
    Kernel(i32),
}

impl Error {
    /// The kernel refused for want of privilege (EPERM, EACCES): ctnetlink needs
    /// CAP_NET_ADMIN.
    pub fn needs_privilege(&self) -> bool {
        match self {
            Error::Io(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
            Error::Kernel(code) => *code == 1 || *code == 13,
        }
    }
}

/// An IP family, as ctnetlink names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }
}

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: Family) {
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&(CTNETLINK | kind).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family.nfproto(), 0, 0, 0]);
}

fn finish(buf: &mut [u8]) {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nest(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Attributes of a netlink payload: (type without flags, value).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// (source, destination, protocol) of a CTA_TUPLE_* nest.
fn tuple(b: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for (k, v) in attrs(b) {
        match k {
            CTA_TUPLE_IP => {
                for (k, v) in attrs(v) {
                    let ip = match v.len() {
                        4 => IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
                        16 => {
                            let o: [u8; 16] = v.try_into().ok()?;
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => continue,
                    };
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attrs(v) {
                    match (k, v) {
                        (CTA_PROTO_NUM, [p, ..]) => proto = Some(*p),
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => sport = u16::from_be_bytes([*a, *b]),
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => dport = u16::from_be_bytes([*a, *b]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        SocketAddr::new(src?, sport),
        SocketAddr::new(dst?, dport),
        proto?,
    ))
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// The TCP or SCTP state in a CTA_PROTOINFO nest.
fn proto_state(b: &[u8]) -> Option<u8> {
    attrs(b)
        .into_iter()
        .filter(|(k, _)| matches!(*k, CTA_PROTOINFO_TCP | CTA_PROTOINFO_SCTP))
        .flat_map(|(_, v)| attrs(v))
        .find_map(|(k, v)| (k == CTA_PROTOINFO_STATE).then(|| v.first().copied())?)
}

/// A flow from one conntrack message's payload (after the nfgenmsg).
fn flow(payload: &[u8]) -> Option<Flow> {
    let (mut orig, mut reply, mut zone) = (None, None, None);
    let (mut status, mut timeout, mut state) = (0, None, None);
    for (k, v) in attrs(payload) {
        match k {
            CTA_TUPLE_ORIG => orig = tuple(v),
            CTA_TUPLE_REPLY => reply = tuple(v),
            CTA_ZONE if v.len() >= 2 => zone = Some(u16::from_be_bytes([v[0], v[1]])),
            CTA_STATUS => status = be32(v).unwrap_or(0),
            CTA_TIMEOUT => timeout = be32(v),
            CTA_PROTOINFO => state = proto_state(v),
            _ => {}
        }
    }
    let (orig_src, orig_dst, proto) = orig?;
    let (reply_src, reply_dst, _) = reply?;
    Some(Flow {
        zone,
        status,
        timeout,
        state,
        ..Flow::new(proto, (orig_src, orig_dst), (reply_src, reply_dst))
    })
}

fn socket() -> Result<Socket, Error> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&NlAddr::new(0, 0))?;
    Ok(s)
}

/// Reads messages until the answer to `seq` is complete; returns the payloads of data messages.
fn exchange(s: &Socket, request: &[u8], dump: bool) -> Result<Vec<Vec<u8>>, Error> {
    s.send(request, 0)?;
    let mut out = Vec::new();
    loop {
        let (buf, _) = s.recv_from_full()?;
        let mut at = 0;
        while at + 16 <= buf.len() {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > buf.len() {
                return Ok(out);
            }
            let body = &buf[at + 16..at + len];
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                    // EINTR: the table changed during the dump; what was read is still used.
                    if code == 0 || (dump && code == -4) {
                        return Ok(out);
                    }
                    return Err(Error::Kernel(-code));
                }
                _ if body.len() >= 4 => out.push(body[4..].to_vec()),
                _ => {}
            }
            at += len.next_multiple_of(4);
        }
    }
}

/// Every conntrack entry of `family`, every protocol (in this network namespace).
pub fn list(family: Family) -> Result<Vec<Flow>, Error> {
    let s = socket()?;
    let mut req = Vec::with_capacity(20);
    header(
        &mut req,
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        family,
    );
    finish(&mut req);
    Ok(exchange(&s, &req, true)?
        .iter()
        .filter_map(|p| flow(p))
        .collect())
}

/// Deletes flows by their original tuple; returns how many the kernel deleted (a flow that is
/// already gone is not an error).
pub fn delete(family: Family, flows: &[&Flow]) -> Result<usize, Error> {
    let s = socket()?;
    let mut deleted = 0;
    for (i, f) in flows.iter().enumerate() {
        let mut req = Vec::with_capacity(96);
        header(
            &mut req,
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            i as u32 + 2,
            family,
        );
        nest(&mut req, CTA_TUPLE_ORIG, |b| {
            nest(b, CTA_TUPLE_IP, |b| {
                match (f.orig_src.ip(), f.orig_dst.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        attr(b, CTA_IP_V4_SRC, &s.octets());
                        attr(b, CTA_IP_V4_DST, &d.octets());
                    }
                    (s, d) => {
                        let v6 = |ip: IpAddr| match ip {
                            IpAddr::V6(v) => v.octets(),
                            IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                        };
                        attr(b, CTA_IP_V6_SRC, &v6(s));
                        attr(b, CTA_IP_V6_DST, &v6(d));
                    }
                }
            });
            nest(b, CTA_TUPLE_PROTO, |b| {
                attr(b, CTA_PROTO_NUM, &[f.proto]);
                attr(b, CTA_PROTO_SRC_PORT, &f.orig_src.port().to_be_bytes());
                attr(b, CTA_PROTO_DST_PORT, &f.orig_dst.port().to_be_bytes());
            });
        });
        if let Some(z) = f.zone {
            attr(&mut req, CTA_ZONE, &z.to_be_bytes());
        }
        finish(&mut req);
        match exchange(&s, &req, false) {
            Ok(_) => deleted += 1,
            Err(Error::Kernel(2)) => {} // ENOENT: already gone
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_round_trips_through_the_attribute_layout() {
        let mut b = Vec::new();
        let t = |b: &mut Vec<u8>, kind, s: [u8; 4], d: [u8; 4], sp: u16, dp: u16| {
            nest(b, kind, |b| {
                nest(b, CTA_TUPLE_IP, |b| {
                    attr(b, CTA_IP_V4_SRC, &s);
                    attr(b, CTA_IP_V4_DST, &d);
                });
                nest(b, CTA_TUPLE_PROTO, |b| {
                    attr(b, CTA_PROTO_NUM, &[17]);
                    attr(b, CTA_PROTO_SRC_PORT, &sp.to_be_bytes());
                    attr(b, CTA_PROTO_DST_PORT, &dp.to_be_bytes());
                });
            })
        };
        t(
            &mut b,
            CTA_TUPLE_ORIG,
            [10, 0, 0, 5],
            [172, 30, 0, 10],
            40000,
            53,
        );
        t(
            &mut b,
            CTA_TUPLE_REPLY,
            [10, 0, 0, 11],
            [10, 0, 0, 5],
            5353,
            40000,
        );
        let f = flow(&b).expect("a flow");
        assert_eq!(f.proto, 17);
        assert_eq!(f.orig_dst.to_string(), "172.30.0.10:53");
        assert_eq!(f.reply_src.to_string(), "10.0.0.11:5353");
        assert_eq!(f.reply_dst.to_string(), "10.0.0.5:40000");
        assert_eq!(f.zone, None);
        assert_eq!((f.status, f.timeout, f.state), (0, None, None));
    }

    #[test]
    fn status_timeout_and_tcp_state_are_read() {
        let mut b = Vec::new();
        for kind in [CTA_TUPLE_ORIG, CTA_TUPLE_REPLY] {
            nest(&mut b, kind, |b| {
                nest(b, CTA_TUPLE_IP, |b| {
                    attr(
                        b,
                        CTA_IP_V6_SRC,
                        &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                    );
                    attr(
                        b,
                        CTA_IP_V6_DST,
                        &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6],
                    );
                });
                nest(b, CTA_TUPLE_PROTO, |b| {
                    attr(b, CTA_PROTO_NUM, &[6]);
                    attr(b, CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes());
                    attr(b, CTA_PROTO_DST_PORT, &80u16.to_be_bytes());
                });
            });
        }
        attr(&mut b, CTA_STATUS, &0x1cu32.to_be_bytes());
        attr(&mut b, CTA_TIMEOUT, &86399u32.to_be_bytes());
        nest(&mut b, CTA_PROTOINFO, |b| {
            nest(b, CTA_PROTOINFO_TCP, |b| {
                attr(b, CTA_PROTOINFO_STATE, &[3]);
                attr(b, 2, &[7]); // CTA_PROTOINFO_TCP_WSCALE_ORIGINAL
            })
        });
        attr(&mut b, CTA_ZONE, &7u16.to_be_bytes());
        let f = flow(&b).expect("a flow");
        assert_eq!(f.orig_src.to_string(), "[fd00::5]:40000");
        assert_eq!(f.status, 0x1c);
        assert!(f.assured());
        assert_eq!(f.timeout, Some(86399));
        assert_eq!(f.state_name().as_deref(), Some("ESTABLISHED"));
        assert_eq!(f.zone, Some(7));
        assert!(Error::Kernel(1).needs_privilege());
        assert!(!Error::Kernel(2).needs_privilege());
    }
}
