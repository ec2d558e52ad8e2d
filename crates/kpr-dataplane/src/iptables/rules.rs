//! Typed iptables rules and their `iptables-restore` text, in upstream kube-proxy's spelling
//! (`-m comment --comment "..." -m tcp -p tcp -d 10.0.0.1 --dport 80 -j KUBE-SVC-...`), so an
//! operator's `iptables-save` looks the way it does under upstream. Pure.
//!
//! Every string that reaches the text is either ours (chain names, fixed comments) or a
//! Kubernetes name that the model has validated (namespace/name/port name: DNS labels); it is
//! quoted anyway, with `"` and `\` escaped, so no input can add an option.

use ipnet::IpNet;
use kpr_model::Protocol;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

/// The tables this backend writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IptTable {
    Filter,
    Nat,
    Mangle,
}

impl IptTable {
    pub const ALL: [IptTable; 3] = [IptTable::Filter, IptTable::Nat, IptTable::Mangle];

    pub fn as_str(self) -> &'static str {
        match self {
            IptTable::Filter => "filter",
            IptTable::Nat => "nat",
            IptTable::Mangle => "mangle",
        }
    }
}

/// One match of a rule.
#[derive(Debug, Clone, PartialEq)]
pub enum M {
    /// `[!] -s net`
    Src { net: IpNet, negate: bool },
    /// `[!] -d net`
    Dst { net: IpNet, negate: bool },
    /// `-m proto -p proto` (written before the addresses, as upstream).
    Proto(Protocol),
    /// `--dport port` (needs a `Proto` match before it).
    Dport(u16),
    /// `-m addrtype [!] --src-type LOCAL` / `--dst-type LOCAL`.
    AddrTypeLocal { src: bool, negate: bool },
    /// `[!] -i name` (`name+` is a prefix match).
    InIface { name: String, negate: bool },
    /// `-m conntrack [!] --ctstate STATES`.
    CtState { states: &'static str, negate: bool },
    /// `-m mark [!] --mark mark/mark`.
    Mark { mark: u32, negate: bool },
    /// `-m recent --name NAME --rcheck --seconds S --reap`.
    RecentCheck { name: String, seconds: u32 },
    /// `-m recent --set --name NAME --mask M --rsource`.
    RecentSet { name: String, v6: bool },
    /// `-m statistic --mode random --probability P` (P printed with 10 decimals).
    Probability(f64),
}

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Jump(String),
    Accept,
    Drop,
    Return,
    Reject,
    Dnat(SocketAddr),
    MarkOr(u32),
    MarkXor(u32),
    Masquerade { random_fully: bool },
}

/// One rule: `-A chain [comment] matches -j target`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub chain: String,
    pub comment: Option<String>,
    pub matches: Vec<M>,
    pub target: Target,
}

impl Rule {
    pub fn new(chain: &str, target: Target) -> Rule {
        Rule {
            chain: chain.into(),
            comment: None,
            matches: Vec::new(),
            target,
        }
    }

    pub fn m(mut self, m: M) -> Rule {
        self.matches.push(m);
        self
    }

    pub fn comment(mut self, c: impl Into<String>) -> Rule {
        self.comment = Some(c.into());
        self
    }

    /// `-p proto --dport port` to `dst`.
    pub fn to(self, dst: IpAddr, proto: Protocol, port: u16) -> Rule {
        self.m(M::Proto(proto))
            .m(M::Dst {
                net: IpNet::from(dst),
                negate: false,
            })
            .m(M::Dport(port))
    }

    /// The restore line, without the trailing newline.
    pub fn text(&self) -> String {
        let mut s = format!("-A {}", self.chain);
        if let Some(c) = &self.comment {
            let _ = write!(s, " -m comment --comment {}", quote(c));
        }
        for m in &self.matches {
            s.push(' ');
            write_match(&mut s, m);
        }
        s.push_str(" -j ");
        write_target(&mut s, &self.target);
        s
    }
}

/// A comment as upstream writes it: bare when it is one word, else double-quoted.
fn quote(c: &str) -> String {
    let safe = !c.is_empty()
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_./:".contains(ch));
    if safe {
        return c.to_owned();
    }
    let mut q = String::with_capacity(c.len() + 2);
    q.push('"');
    for ch in c.chars() {
        match ch {
            '"' | '\\' => {
                q.push('\\');
                q.push(ch);
            }
            // iptables comments are one line of printable text.
            ch if ch.is_control() => q.push(' '),
            ch => q.push(ch),
        }
    }
    q.push('"');
    q
}

fn bang(negate: bool) -> &'static str {
    if negate { "! " } else { "" }
}

/// An address as iptables prints it: a host without its prefix length.
fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

pub fn proto_str(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn write_match(s: &mut String, m: &M) {
    let _ = match m {
        M::Src { net, negate } => write!(s, "{}-s {}", bang(*negate), net_text(net)),
        M::Dst { net, negate } => write!(s, "{}-d {}", bang(*negate), net_text(net)),
        M::Proto(p) => write!(s, "-m {0} -p {0}", proto_str(*p)),
        M::Dport(p) => write!(s, "--dport {p}"),
        M::AddrTypeLocal { src, negate } => write!(
            s,
            "-m addrtype {}--{}-type LOCAL",
            bang(*negate),
            if *src { "src" } else { "dst" }
        ),
        M::InIface { name, negate } => write!(s, "{}-i {name}", bang(*negate)),
        M::CtState { states, negate } => {
            write!(s, "-m conntrack {}--ctstate {states}", bang(*negate))
        }
        M::Mark { mark, negate } => {
            write!(s, "-m mark {}--mark {mark:#x}/{mark:#x}", bang(*negate))
        }
        M::RecentCheck { name, seconds } => write!(
            s,
            "-m recent --name {name} --rcheck --seconds {seconds} --reap"
        ),
        M::RecentSet { name, v6 } => write!(
            s,
            "-m recent --set --name {name} --mask {} --rsource",
            if *v6 {
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            } else {
                "255.255.255.255"
            }
        ),
        M::Probability(p) => write!(s, "-m statistic --mode random --probability {p:.10}"),
    };
}

fn write_target(s: &mut String, t: &Target) {
    let _ = match t {
        Target::Jump(c) => write!(s, "{c}"),
        Target::Accept => write!(s, "ACCEPT"),
        Target::Drop => write!(s, "DROP"),
        Target::Return => write!(s, "RETURN"),
        Target::Reject => write!(s, "REJECT"),
        Target::Dnat(to) => write!(s, "DNAT --to-destination {to}"),
        Target::MarkOr(m) => write!(s, "MARK --or-mark {m:#x}"),
        Target::MarkXor(m) => write!(s, "MARK --xor-mark {m:#x}"),
        Target::Masquerade { random_fully } => write!(
            s,
            "MASQUERADE{}",
            if *random_fully { " --random-fully" } else { "" }
        ),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_spelling() {
        let r = Rule::new("KUBE-SERVICES", Target::Jump("KUBE-SVC-X".into()))
            .comment("ns1/svc1:p80 cluster IP")
            .to("172.30.0.41".parse().unwrap(), Protocol::Tcp, 80);
        assert_eq!(
            r.text(),
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-X"
        );
        let r = Rule::new("KUBE-SEP-X", Target::Dnat("[fd00::1]:80".parse().unwrap()))
            .comment("ns1/svc1:p80")
            .m(M::RecentSet {
                name: "KUBE-SEP-X".into(),
                v6: true,
            })
            .m(M::Proto(Protocol::Tcp));
        assert_eq!(
            r.text(),
            "-A KUBE-SEP-X -m comment --comment ns1/svc1:p80 -m recent --set --name KUBE-SEP-X --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp -p tcp -j DNAT --to-destination [fd00::1]:80"
        );
        let r = Rule::new("KUBE-POSTROUTING", Target::Return).m(M::Mark {
            mark: 0x4000,
            negate: true,
        });
        assert_eq!(
            r.text(),
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
        );
        let r =
            Rule::new("KUBE-SVC-X", Target::Jump("KUBE-SEP-Y".into())).m(M::Probability(1.0 / 3.0));
        assert!(r.text().contains("--probability 0.3333333333 "));
    }

    #[test]
    fn comments_cannot_add_options() {
        let r = Rule::new("C", Target::Accept).comment("a\" -j DROP \\\nx");
        assert_eq!(
            r.text(),
            "-A C -m comment --comment \"a\\\" -j DROP \\\\ x\" -j ACCEPT"
        );
    }
}
