//! Talking to nf_tables over netlink, without the `nft` CLI (which lists the whole ruleset into
//! its cache before every command: ~120 ms for a one-element change at 10,000 Services).
//!
//! [`Netlink`] is the kernel executor: a transaction becomes one batch ([`encode`]), sent in one
//! `sendmsg`, committed or aborted by the kernel as a whole. The socket lives in the network
//! namespace it was opened in ([`Netlink::open`], or [`Netlink::in_netns`] for tests).

pub mod encode;
mod query;
mod wire;

pub use query::get_rules_request;

use crate::executor::{Executor, OpSource};
use crate::fake::ApplyError;
use crate::objects::{Family, Table};
use crate::transaction::Transaction;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::os::fd::AsFd;

const NLMSG_ERROR: u16 = 2;

fn io(what: &str) -> impl Fn(std::io::Error) -> ApplyError + '_ {
    move |e| ApplyError::Spawn(format!("netlink {what}: {e}"))
}

/// A bound nf_tables socket in the calling thread's network namespace.
fn open_socket() -> Result<Socket, ApplyError> {
    let mut s = Socket::new(NETLINK_NETFILTER).map_err(io("socket"))?;
    s.bind_auto().map_err(io("bind"))?;
    s.connect(&SocketAddr::new(0, 0)).map_err(io("connect"))?;
    // Only the header of a failed message comes back, not the whole message.
    s.set_cap_ack(true).map_err(io("NETLINK_CAP_ACK"))?;
    // Room for the replies of a large batch that fails in many places.
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(s.as_fd(), 4 << 20);
    Ok(s)
}

/// The number of rules in a chain, or `None` when the table or chain does not exist (one
/// filtered rule dump, in this process's network namespace).
pub fn chain_rule_count(
    family: Family,
    table: &str,
    chain: &str,
) -> Result<Option<usize>, ApplyError> {
    query::chain_rule_count_on(&open_socket()?, family, table, chain, 1)
}

/// The netlink executor.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
    sndbuf: usize,
}

impl Netlink {
    /// An executor in this process's network namespace.
    pub fn open() -> Result<Netlink, ApplyError> {
        Ok(Netlink {
            socket: open_socket()?,
            seq: 0,
            sndbuf: 0,
        })
    }

    /// An executor in the named network namespace (`/run/netns/NAME`, as `ip netns add` makes
    /// it): the socket is opened by a short-lived thread that enters the namespace, and keeps
    /// working there from any thread.
    pub fn in_netns(name: &str) -> Result<Netlink, ApplyError> {
        let path = format!("/run/netns/{name}");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(io("open netns"))?;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| io("setns")(e.into()))?;
            Netlink::open()
        })
        .join()
        .map_err(|_| ApplyError::Spawn("netlink: namespace thread panicked".into()))?
    }

    fn next_seq(&mut self, n: usize) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(n as u32 + 2);
        first
    }

    /// Reads every reply queued for the batch (the kernel processes a batch inside `sendmsg`,
    /// so they are all there when it returns) and returns the errors with their sequence
    /// numbers, and whether the final acknowledgement came.
    fn replies(&self, ack_seq: u32) -> Result<(Vec<(u32, i32)>, bool), ApplyError> {
        self.socket.set_non_blocking(true).map_err(io("nonblock"))?;
        let mut errors = Vec::new();
        let mut acked = false;
        let mut buf = vec![0u8; 1 << 16];
        let outcome = loop {
            let n = match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(io("recv")(e)),
            };
            let mut at = 0;
            while at + 16 <= n {
                let word =
                    |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let len = word(at) as usize;
                if len < 16 || at + len > n {
                    break;
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(at + 8);
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = word(at + 16) as i32;
                    if code != 0 {
                        errors.push((seq, code));
                    }
                    if seq == ack_seq {
                        acked = true;
                    }
                }
                at += len.next_multiple_of(4);
            }
        };
        self.socket.set_non_blocking(false).map_err(io("block"))?;
        outcome.map(|()| (errors, acked))
    }
}

impl Netlink {
    /// Sends one encoded batch of `ops` operations and reads the kernel's answer; a refusal
    /// names the operation by `describe` (its index).
    fn send_batch(
        &mut self,
        batch: encode::Batch,
        ops: usize,
        describe: &mut dyn FnMut(usize) -> String,
    ) -> Result<(), ApplyError> {
        self.seq = batch.ack_seq.wrapping_add(1);
        if batch.bytes.len() + 4096 > self.sndbuf {
            // The whole batch must fit in one datagram (the kernel commits what one skb holds).
            let size = (batch.bytes.len() + (1 << 16)).next_power_of_two();
            rustix::net::sockopt::set_socket_send_buffer_size_force(self.socket.as_fd(), size)
                .map_err(|e| io("SO_SNDBUFFORCE")(e.into()))?;
            self.sndbuf = size;
        }
        let whole = || {
            format!(
                "the whole batch ({} operations, {} bytes)",
                ops,
                batch.bytes.len()
            )
        };
        let sent = self
            .socket
            .send(&batch.bytes, 0)
            .map_err(|e| match e.raw_os_error() {
                // The kernel processes the batch inside `sendmsg`: an errno here refuses all of it.
                Some(errno) if errno > 0 => ApplyError::Refused { errno, op: whole() },
                _ => io("send")(e),
            })?;
        if sent != batch.bytes.len() {
            return Err(ApplyError::Kernel(format!(
                "netlink: sent {sent} of {} bytes",
                batch.bytes.len()
            )));
        }
        let (errors, acked) = self.replies(batch.ack_seq)?;
        if let Some((seq, code)) = errors.first() {
            // The first error names the operation the kernel refused; later ones follow from
            // the abort. A negative code is an errno; anything else is not one.
            let op = batch
                .origin
                .iter()
                .find(|(s, _)| s == seq)
                .map(|(_, op)| describe(*op))
                .unwrap_or_else(whole);
            return Err(ApplyError::Refused {
                errno: code.checked_neg().unwrap_or(0),
                op,
            });
        }
        if !acked {
            return Err(ApplyError::Kernel(
                "netlink: the kernel did not acknowledge the batch".into(),
            ));
        }
        Ok(())
    }
}

impl Executor for Netlink {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        let first = self.next_seq(0);
        let batch = encode::batch(tx, first);
        self.send_batch(batch, tx.len(), &mut |op| tx.describe(op))
    }

    /// Encodes each operation as `ops` hands it out: only the batch's bytes are held. A
    /// refusal runs `ops` again to name the refused operation.
    fn apply_stream(
        &mut self,
        table: &Table,
        size_hint: usize,
        ops: &mut OpSource<'_>,
    ) -> Result<usize, ApplyError> {
        let first = self.next_seq(0);
        let mut stream = encode::Stream::new(table, first, size_hint);
        ops(&mut |op| stream.push(&op));
        let n = stream.len();
        if n == 0 {
            return Ok(0);
        }
        let batch = stream.finish();
        let mut describe = |i: usize| {
            let mut found = None;
            let mut at = 0;
            ops(&mut |op| {
                if at == i {
                    found = Some(op);
                }
                at += 1;
            });
            let one = Transaction {
                table: table.clone(),
                ops: found.into_iter().collect(),
            };
            one.describe(0)
        };
        self.send_batch(batch, n, &mut describe).map(|()| n)
    }

    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError> {
        let seq = self.next_seq(0);
        query::chain_rule_count_on(&self.socket, table.family, &table.name, canary, seq)
            .map(|n| n.unwrap_or(0) > 0)
    }
}
