//! Direct nf_tables netlink queries, without the `nft` CLI (which fills its cache with the whole
//! ruleset before every command: 80 ms to list one chain at 10,000 Services). First use: the
//! active-repair check, a filtered dump of one chain's rules.

use super::encode::nfproto;
use super::wire::{Buf, NLM_F_REQUEST};
use crate::fake::ApplyError;
use crate::objects::Family;
use netlink_sys::Socket;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const ENOENT: i32 = 2;

/// The request: a rule dump filtered by table and chain.
pub fn get_rules_request(family: Family, table: &str, chain: &str, seq: u32) -> Vec<u8> {
    let mut b = Buf::with_capacity(64);
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE;
    let m = b.begin_msg(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, nfproto(family), 0);
    b.str(NFTA_RULE_TABLE, table);
    b.str(NFTA_RULE_CHAIN, chain);
    b.end_msg(m);
    b.bytes
}

/// Outcome of parsing one datagram of the reply.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    More(usize),
    Done(usize),
    Missing,
}

fn parse(buf: &[u8]) -> Result<Chunk, ApplyError> {
    let mut rules = 0;
    let mut at = 0;
    while at + 16 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < 16 || at + len > buf.len() {
            return Err(ApplyError::Kernel(format!(
                "malformed netlink message of {len} bytes"
            )));
        }
        let code = || if len >= 20 { word(at + 16) as i32 } else { 0 };
        match kind {
            NLMSG_DONE if code() == -ENOENT => return Ok(Chunk::Missing),
            NLMSG_DONE => return Ok(Chunk::Done(rules)),
            NLMSG_ERROR if code() == -ENOENT => return Ok(Chunk::Missing),
            NLMSG_ERROR if code() == 0 => {}
            NLMSG_ERROR => return Err(ApplyError::Kernel(format!("netlink error {}", -code()))),
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => rules += 1,
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    Ok(Chunk::More(rules))
}

/// The number of rules in a chain, or `None` when the table or chain does not exist, asked on
/// `socket` (a bound nf_tables socket; see `super::open_socket`).
pub(crate) fn chain_rule_count_on(
    socket: &Socket,
    family: Family,
    table: &str,
    chain: &str,
    seq: u32,
) -> Result<Option<usize>, ApplyError> {
    let err = |e: std::io::Error| ApplyError::Spawn(format!("netlink: {e}"));
    socket
        .send(&get_rules_request(family, table, chain, seq), 0)
        .map_err(err)?;
    let mut total = 0;
    loop {
        let (buf, _) = socket.recv_from_full().map_err(err)?;
        match parse(&buf)? {
            Chunk::More(n) => total += n,
            Chunk::Done(n) => return Ok(Some(total + n)),
            Chunk::Missing => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_filtered_rule_dump() {
        let m = get_rules_request(Family::Ip, "kube-proxy-rs", "masquerading", 7);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0a07);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x301);
        assert_eq!(m[16], 2, "NFPROTO_IPV4");
        assert!(m.windows(14).any(|w| w == b"kube-proxy-rs\0"));
        assert!(m.windows(13).any(|w| w == b"masquerading\0"));
    }

    #[test]
    fn replies_are_counted_and_errors_classified() {
        let msg = |kind: u16, extra: &[u8]| {
            let mut v = ((16 + extra.len()) as u32).to_ne_bytes().to_vec();
            v.extend_from_slice(&kind.to_ne_bytes());
            v.extend_from_slice(&[0; 10]);
            v.extend_from_slice(extra);
            v
        };
        let mut two = msg(0x0a06, &[0; 4]);
        two.extend(msg(0x0a06, &[0; 4]));
        assert_eq!(parse(&two).unwrap(), Chunk::More(2));
        two.extend(msg(NLMSG_DONE, &0i32.to_ne_bytes()));
        assert_eq!(parse(&two).unwrap(), Chunk::Done(2));
        assert_eq!(
            parse(&msg(NLMSG_ERROR, &(-ENOENT).to_ne_bytes())).unwrap(),
            Chunk::Missing
        );
        assert!(parse(&msg(NLMSG_ERROR, &(-1i32).to_ne_bytes())).is_err());
        assert!(
            parse(&[200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
            "length past the buffer"
        );
    }
}
