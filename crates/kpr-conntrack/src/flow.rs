//! One conntrack entry as ctnetlink reports it: both tuples, status bits, protocol state and
//! the seconds it has left. The stale-UDP reconciler reads the tuples; `kube-proxy-rs
//! conntrack` shows the rest.

use std::net::SocketAddr;

/// IP protocol numbers of the protocols Services use.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

/// `IPS_*` status bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_SRC_NAT: u32 = 1 << 4;
const IPS_DST_NAT: u32 = 1 << 5;

/// One conntrack entry. The original tuple is the packet as the client sent it; the reply
/// tuple is what the answer looks like, so after DNAT its source is the DNAT target (the
/// endpoint) and after SNAT (masquerade) its destination is the address the client was
/// rewritten to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    /// IP protocol number ([`TCP`], [`UDP`], [`SCTP`], ...).
    pub proto: u8,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: SocketAddr,
    pub reply_dst: SocketAddr,
    pub zone: Option<u16>,
    /// `IPS_*` bits; 0 when the kernel did not say.
    pub status: u32,
    /// Seconds until the entry expires.
    pub timeout: Option<u32>,
    /// The TCP or SCTP state number (`tcp_conntrack`, `sctp_conntrack`); see [`Flow::state_name`].
    pub state: Option<u8>,
}

impl Flow {
    /// A flow with both tuples and nothing else known (no zone, status, timeout or state).
    pub fn new(proto: u8, orig: (SocketAddr, SocketAddr), reply: (SocketAddr, SocketAddr)) -> Flow {
        Flow {
            proto,
            orig_src: orig.0,
            orig_dst: orig.1,
            reply_src: reply.0,
            reply_dst: reply.1,
            zone: None,
            status: 0,
            timeout: None,
            state: None,
        }
    }

    /// Whether the destination was rewritten: the reply comes from another address than the
    /// one the client sent to. (Judged from the tuples, so it holds for synthetic flows too;
    /// the kernel's `IPS_DST_NAT` bit says the same for the flows it reports.)
    pub fn dnat(&self) -> bool {
        self.status & IPS_DST_NAT != 0 || self.reply_src != self.orig_dst
    }

    /// Whether the source was rewritten (masquerade): the reply goes to another address than
    /// the client's.
    pub fn snat(&self) -> bool {
        self.status & IPS_SRC_NAT != 0 || self.reply_dst != self.orig_src
    }

    /// Traffic was seen both ways and the kernel will not evict the entry early.
    pub fn assured(&self) -> bool {
        self.status & IPS_ASSURED != 0
    }

    pub fn seen_reply(&self) -> bool {
        self.status & IPS_SEEN_REPLY != 0
    }

    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, or the number.
    pub fn proto_name(&self) -> String {
        match self.proto {
            TCP => "tcp".into(),
            UDP => "udp".into(),
            SCTP => "sctp".into(),
            1 => "icmp".into(),
            58 => "icmpv6".into(),
            n => n.to_string(),
        }
    }

    /// The protocol state as `conntrack -L` spells it (`ESTABLISHED`, `TIME_WAIT`, ...);
    /// `None` for protocols without one (UDP) or when the kernel did not say.
    pub fn state_name(&self) -> Option<String> {
        const TCP_STATES: [&str; 10] = [
            "NONE",
            "SYN_SENT",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT",
            "CLOSE_WAIT",
            "LAST_ACK",
            "TIME_WAIT",
            "CLOSE",
            "SYN_SENT2",
        ];
        const SCTP_STATES: [&str; 10] = [
            "NONE",
            "CLOSED",
            "COOKIE_WAIT",
            "COOKIE_ECHOED",
            "ESTABLISHED",
            "SHUTDOWN_SENT",
            "SHUTDOWN_RECD",
            "SHUTDOWN_ACK_SENT",
            "HEARTBEAT_SENT",
            "HEARTBEAT_ACKED",
        ];
        let s = self.state?;
        let names: &[&str] = match self.proto {
            TCP => &TCP_STATES,
            SCTP => &SCTP_STATES,
            _ => &[],
        };
        Some(
            names
                .get(usize::from(s))
                .map_or_else(|| format!("STATE_{s}"), |n| (*n).to_owned()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    #[test]
    fn nat_and_state_are_read_from_the_tuples_and_numbers() {
        let mut f = Flow::new(
            TCP,
            (sa("10.0.0.5:40000"), sa("172.30.0.10:80")),
            (sa("10.0.0.11:8080"), sa("10.0.0.5:40000")),
        );
        assert!(f.dnat());
        assert!(!f.snat());
        assert_eq!(f.state_name(), None);
        f.state = Some(3);
        assert_eq!(f.state_name().as_deref(), Some("ESTABLISHED"));
        f.state = Some(42);
        assert_eq!(f.state_name().as_deref(), Some("STATE_42"));
        f.proto = SCTP;
        f.state = Some(4);
        assert_eq!(f.state_name().as_deref(), Some("ESTABLISHED"));
        assert_eq!(f.proto_name(), "sctp");
        let plain = Flow::new(
            UDP,
            (sa("10.0.0.5:40000"), sa("10.0.0.11:53")),
            (sa("10.0.0.11:53"), sa("10.0.0.5:40000")),
        );
        assert!(!plain.dnat() && !plain.snat());
        assert!(!plain.assured() && !plain.seen_reply());
    }
}
