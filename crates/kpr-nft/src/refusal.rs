//! What the kernel's error numbers mean for a refused nf_tables transaction, in words.
//!
//! The kernel answers a refused batch with one errno per refused message and nothing else;
//! "Device or resource busy" does not tell an operator that another process owns the table or
//! that something still jumps to a chain we delete. [`explain`] says what the kernel refuses
//! with each errno in nf_tables (net/netfilter/nf_tables_api.c, Linux 5.x-6.x), [`name`] gives
//! its symbolic name, and an [`crate::ApplyError::Refused`] carries both with the refused
//! operation's `nft` line.

pub use rustix::io::Errno;

const PERM: i32 = Errno::PERM.raw_os_error();
const ACCES: i32 = Errno::ACCESS.raw_os_error();
const NOENT: i32 = Errno::NOENT.raw_os_error();
const BUSY: i32 = Errno::BUSY.raw_os_error();
const EXIST: i32 = Errno::EXIST.raw_os_error();
const INVAL: i32 = Errno::INVAL.raw_os_error();
const NOMEM: i32 = Errno::NOMEM.raw_os_error();
const NOSPC: i32 = Errno::NOSPC.raw_os_error();
const TOOBIG: i32 = Errno::TOOBIG.raw_os_error();
const OPNOTSUPP: i32 = Errno::OPNOTSUPP.raw_os_error();
const AFNOSUPPORT: i32 = Errno::AFNOSUPPORT.raw_os_error();
const PROTONOSUPPORT: i32 = Errno::PROTONOSUPPORT.raw_os_error();
const MSGSIZE: i32 = Errno::MSGSIZE.raw_os_error();
const NOBUFS: i32 = Errno::NOBUFS.raw_os_error();
const LOOP: i32 = Errno::LOOP.raw_os_error();
const MLINK: i32 = Errno::MLINK.raw_os_error();
const AGAIN: i32 = Errno::AGAIN.raw_os_error();
const INTR: i32 = Errno::INTR.raw_os_error();
const RANGE: i32 = Errno::RANGE.raw_os_error();
const NAMETOOLONG: i32 = Errno::NAMETOOLONG.raw_os_error();
const OVERFLOW: i32 = Errno::OVERFLOW.raw_os_error();

/// What the kernel refuses with `errno` in an nf_tables transaction, in words.
pub fn explain(errno: i32) -> &'static str {
    match errno {
        PERM => {
            "not permitted: another process owns the table (nft 'flags owner'), or this process lacks CAP_NET_ADMIN in its network namespace"
        }
        ACCES => "permission denied: this process lacks CAP_NET_ADMIN in its network namespace",
        BUSY => {
            "an object is in use: a chain, set or map that something still references (a rule or map element that is not ours jumps to it or reads it) cannot be deleted"
        }
        NOENT => {
            "an object the operation refers to is missing (a table, chain, set, map or element someone else deleted), or the kernel lacks the module for one of the rule's expressions"
        }
        EXIST => {
            "an object with that name or key exists already with other properties (another program created it, or an element's value changed)"
        }
        INVAL => {
            "the kernel does not accept the operation as written (an expression, attribute or value this kernel rejects)"
        }
        NOMEM => "the kernel ran out of memory",
        NOSPC | TOOBIG | OVERFLOW => {
            "a set or map is full (it reached its size limit), or the kernel ran out of room for the object"
        }
        OPNOTSUPP | AFNOSUPPORT | PROTONOSUPPORT => {
            "the kernel does not support it (the module for an expression or a set type is missing, or the kernel is too old)"
        }
        MSGSIZE | NOBUFS => {
            "the batch was too large for one netlink message (or the socket's buffer was too small)"
        }
        LOOP => "a jump or goto would make chains loop",
        MLINK => "chains jump too deep (the kernel allows 16 levels of jumps)",
        RANGE | NAMETOOLONG => "a name or value is longer than the kernel allows",
        AGAIN | INTR => {
            "the ruleset changed while the batch was being committed (another program wrote to nftables at the same time); a retry normally succeeds"
        }
        _ => "the kernel refused it",
    }
}

/// The symbolic name of `errno` ("EBUSY"), for the errnos the kernel uses on nf_tables.
pub fn name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        PERM => "EPERM",
        ACCES => "EACCES",
        NOENT => "ENOENT",
        BUSY => "EBUSY",
        EXIST => "EEXIST",
        INVAL => "EINVAL",
        NOMEM => "ENOMEM",
        NOSPC => "ENOSPC",
        TOOBIG => "E2BIG",
        OVERFLOW => "EOVERFLOW",
        OPNOTSUPP => "EOPNOTSUPP",
        AFNOSUPPORT => "EAFNOSUPPORT",
        PROTONOSUPPORT => "EPROTONOSUPPORT",
        MSGSIZE => "EMSGSIZE",
        NOBUFS => "ENOBUFS",
        LOOP => "ELOOP",
        MLINK => "EMLINK",
        AGAIN => "EAGAIN",
        INTR => "EINTR",
        RANGE => "ERANGE",
        NAMETOOLONG => "ENAMETOOLONG",
        _ => return None,
    })
}

/// `EBUSY: Device or resource busy` (the name, when known, and the C library's text).
pub fn label(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .rsplit_once(" (os error")
        .map_or(text.as_str(), |(t, _)| t);
    match name(errno) {
        Some(n) => format!("{n}: {text}"),
        None => format!("errno {errno}: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_errno_has_words_of_its_own() {
        for e in [
            Errno::PERM,
            Errno::BUSY,
            Errno::NOENT,
            Errno::OPNOTSUPP,
            Errno::NOSPC,
            Errno::TOOBIG,
            Errno::INVAL,
            Errno::MSGSIZE,
        ] {
            let n = e.raw_os_error();
            assert!(name(n).is_some(), "{n}");
            assert_ne!(explain(n), explain(0), "{n}");
        }
        assert_eq!(
            label(Errno::BUSY.raw_os_error()),
            "EBUSY: Device or resource busy"
        );
        assert_eq!(explain(4000), "the kernel refused it");
        assert!(label(4000).starts_with("errno 4000: "));
    }
}
