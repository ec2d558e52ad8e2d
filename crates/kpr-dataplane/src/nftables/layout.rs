//! The fixed part of the nftables layout: base chains with their hooks and priorities, the
//! dispatch chains, maps and sets. This table is the contract other components order themselves
//! against (docs/nftables.md): DNAT at `dstnat` on prerouting and output, masquerade at `srcnat`
//! on postrouting, no-endpoint REJECT and firewall DROP at `dstnat - 10`.
//!
//! Unlike upstream (§12), no per-Service anonymous set is used for load balancing (they make a
//! large transaction quadratic in the kernel, performance-anchors §1.6): endpoints are picked
//! from endpoint maps (plain ClusterIP ports through shared pick chains, docs/nftables.md),
//! with affinity by `numgen random mod (N-i) == 0` rules. DROP for an ETP=Local Service without local
//! endpoints is the last rule of its `external-` chain, so host-originated traffic, which takes
//! the short-circuit, is never dropped by a pre-DNAT filter.

use ipnet::IpNet;
use kpr_nft::{
    Addr, BaseChain, Chain, ChainType, Hook, KeyType, L4Proto, Map, Match, Rule, Set, Statement,
    Verdict, priority,
};

pub const TABLE: &str = "kube-proxy-rs";
pub const TABLE_COMMENT: &str = "rules for kube-proxy-rs";

pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const REJECT_CHAIN: &str = "reject-chain";

pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
/// Endpoint maps per protocol (`endpoints-tcp-0` ..), each in the table while a port uses it:
/// a rule that starts using a map makes the kernel walk every element of it, so each holds
/// only a share of the endpoints; there are few enough that the kernel's linear search for a
/// set by name stays cheap.
pub const ENDPOINT_MAP_SHARDS: u32 = 128;

/// The endpoint map of a protocol's shard (their `typeof` names the protocol's `dport`).
pub fn endpoint_map(p: L4Proto, shard: u32) -> String {
    format!("endpoints-{}-{shard}", p.as_str())
}

/// The endpoint map of a protocol's plain ClusterIP ports (no affinity, no external
/// frontends, traffic policy Cluster): keyed by `ClusterIP . port . bucket`, so one rule per
/// endpoint count serves them all.
pub fn cluster_endpoints_map(p: L4Proto) -> String {
    format!("cluster-endpoints-{}", p.as_str())
}

/// The chain that picks one of `n` endpoints for the plain ClusterIP ports of a protocol
/// (`service-ips` elements `goto` it; it draws from [`cluster_endpoints_map`]).
pub fn pick_chain(p: L4Proto, n: u32) -> String {
    format!("pick-{}-{n}", p.as_str())
}

/// `endpoint . endpoint` pairs: a connection DNATed back to its own source (hairpin) is
/// masqueraded.
pub const HAIRPIN: &str = "hairpin-endpoints";

/// Base chains: name, type, hook, priority, and the chains they jump to (`ct state new` first
/// in filter chains, as upstream).
pub const BASE_CHAINS: &[(&str, ChainType, Hook, i32, &[&str])] = &[
    (
        "filter-prerouting",
        ChainType::Filter,
        Hook::Prerouting,
        priority::DSTNAT - 10,
        &[FIREWALL_CHECK],
    ),
    (
        "filter-input",
        ChainType::Filter,
        Hook::Input,
        priority::DSTNAT - 10,
        &[NODEPORT_ENDPOINTS_CHECK, SERVICE_ENDPOINTS_CHECK],
    ),
    (
        "filter-forward",
        ChainType::Filter,
        Hook::Forward,
        priority::DSTNAT - 10,
        &[SERVICE_ENDPOINTS_CHECK, CLUSTER_IPS_CHECK],
    ),
    (
        "filter-output",
        ChainType::Filter,
        Hook::Output,
        priority::DSTNAT - 10,
        &[SERVICE_ENDPOINTS_CHECK, FIREWALL_CHECK],
    ),
    (
        "filter-output-post-dnat",
        ChainType::Filter,
        Hook::Output,
        priority::DSTNAT + 10,
        &[CLUSTER_IPS_CHECK],
    ),
    (
        "nat-prerouting",
        ChainType::Nat,
        Hook::Prerouting,
        priority::DSTNAT,
        &[SERVICES],
    ),
    (
        "nat-output",
        ChainType::Nat,
        Hook::Output,
        priority::DSTNAT,
        &[SERVICES],
    ),
    (
        "nat-postrouting",
        ChainType::Nat,
        Hook::Postrouting,
        priority::SRCNAT,
        &[MASQUERADING],
    ),
];

/// The base chains with their jump rules.
pub fn base_chains() -> Vec<(Chain, Vec<Rule>)> {
    BASE_CHAINS
        .iter()
        .map(|(name, chain_type, hook, prio, jumps)| {
            let chain = Chain {
                name: (*name).into(),
                base: Some(BaseChain {
                    chain_type: *chain_type,
                    hook: *hook,
                    priority: *prio,
                }),
                comment: None,
            };
            let rules = jumps
                .iter()
                .map(|to| {
                    let r = Rule::new(*name);
                    let r = if *chain_type == ChainType::Filter {
                        r.m(Match::CtStateNew)
                    } else {
                        r
                    };
                    r.s(Statement::Verdict(Verdict::Jump((*to).into())))
                })
                .collect();
            (chain, rules)
        })
        .collect()
}

/// How NodePort destinations are recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortMatch {
    /// Any local address except loopback (`fib daddr type local`).
    AllLocal { loopback: ipnet::IpNet },
    /// Addresses in the `nodeport-ips` set.
    Set,
}

/// `cluster-ips-check` (§4.8, §12.4): new connections to a ClusterIP on a port it does not
/// define are rejected; then those to any other address of a ServiceCIDR are dropped (one
/// `ip daddr <range> drop` per range, where upstream writes one rule with an anonymous set).
pub fn cluster_ips_check(service_cidrs: &[IpNet]) -> Vec<Rule> {
    let reject = Rule::new(CLUSTER_IPS_CHECK)
        .m(Match::InSet {
            addr: Addr::Daddr,
            negate: false,
            set: CLUSTER_IPS.into(),
        })
        .s(Statement::Reject);
    let drops = service_cidrs.iter().map(|net| {
        Rule::new(CLUSTER_IPS_CHECK)
            .m(Match::Net {
                addr: Addr::Daddr,
                negate: false,
                net: *net,
            })
            .s(Statement::Verdict(Verdict::Drop))
    });
    std::iter::once(reject).chain(drops).collect()
}

/// The regular chains every table has, with their rules.
pub fn fixed_chains(
    mark: u32,
    node_ports: &NodePortMatch,
    service_cidrs: &[IpNet],
) -> Vec<(Chain, Vec<Rule>)> {
    let nodeport_dst = |r: Rule| match node_ports {
        NodePortMatch::AllLocal { loopback } => r.m(Match::FibLocal(Addr::Daddr)).m(Match::Net {
            addr: Addr::Daddr,
            negate: true,
            net: *loopback,
        }),
        NodePortMatch::Set => r.m(Match::InSet {
            addr: Addr::Daddr,
            negate: false,
            set: NODEPORT_IPS.into(),
        }),
    };
    let chain = |name: &str| Chain {
        name: name.into(),
        base: None,
        comment: None,
    };
    vec![
        (
            chain(SERVICES),
            vec![
                Rule::new(SERVICES).s(Statement::Vmap {
                    key: KeyType::AddrProtoPort,
                    map: SERVICE_IPS.into(),
                }),
                nodeport_dst(Rule::new(SERVICES)).s(Statement::Vmap {
                    key: KeyType::ProtoPort,
                    map: SERVICE_NODEPORTS.into(),
                }),
            ],
        ),
        (
            chain(SERVICE_ENDPOINTS_CHECK),
            vec![Rule::new(SERVICE_ENDPOINTS_CHECK).s(Statement::Vmap {
                key: KeyType::AddrProtoPort,
                map: NO_ENDPOINT_SERVICES.into(),
            })],
        ),
        (
            chain(NODEPORT_ENDPOINTS_CHECK),
            vec![
                nodeport_dst(Rule::new(NODEPORT_ENDPOINTS_CHECK)).s(Statement::Vmap {
                    key: KeyType::ProtoPort,
                    map: NO_ENDPOINT_NODEPORTS.into(),
                }),
            ],
        ),
        (
            chain(FIREWALL_CHECK),
            vec![Rule::new(FIREWALL_CHECK).s(Statement::Vmap {
                key: KeyType::AddrProtoPort,
                map: FIREWALL_IPS.into(),
            })],
        ),
        (chain(CLUSTER_IPS_CHECK), cluster_ips_check(service_cidrs)),
        (
            chain(REJECT_CHAIN),
            vec![Rule::new(REJECT_CHAIN).s(Statement::Reject)],
        ),
        (
            chain(MARK_FOR_MASQUERADE),
            vec![Rule::new(MARK_FOR_MASQUERADE).s(Statement::MarkOr(mark))],
        ),
        (
            chain(MASQUERADING),
            vec![
                Rule::new(MASQUERADING)
                    .m(Match::CtStatusDnat)
                    .m(Match::PairInSet {
                        set: HAIRPIN.into(),
                    })
                    .s(Statement::MarkOr(mark))
                    .comment("hairpin"),
                Rule::new(MASQUERADING)
                    .m(Match::MarkClear(mark))
                    .s(Statement::Verdict(Verdict::Return)),
                Rule::new(MASQUERADING).s(Statement::MarkXor(mark)),
                Rule::new(MASQUERADING).s(Statement::Masquerade),
            ],
        ),
    ]
}

/// The maps and sets every table has.
pub fn fixed_maps_and_sets() -> (Vec<Map>, Vec<Set>) {
    let map = |name: &str, key, comment: &str| Map {
        name: name.into(),
        key,
        comment: Some(comment.into()),
    };
    let set = |name: &str, comment: &str| Set {
        name: name.into(),
        key: KeyType::Addr,
        interval: false,
        timeout: None,
        comment: Some(comment.into()),
    };
    (
        vec![
            map(
                SERVICE_IPS,
                KeyType::AddrProtoPort,
                "ClusterIP ExternalIP and LoadBalancer IP traffic",
            ),
            map(SERVICE_NODEPORTS, KeyType::ProtoPort, "NodePort traffic"),
            map(
                NO_ENDPOINT_SERVICES,
                KeyType::AddrProtoPort,
                "vmap to reject services with no endpoints",
            ),
            map(
                NO_ENDPOINT_NODEPORTS,
                KeyType::ProtoPort,
                "vmap to reject NodePorts with no endpoints",
            ),
            map(
                FIREWALL_IPS,
                KeyType::AddrProtoPort,
                "destinations that are subject to LoadBalancerSourceRanges",
            ),
        ],
        vec![
            set(CLUSTER_IPS, "Active ClusterIPs"),
            set(NODEPORT_IPS, "IPs that accept NodePort traffic"),
            Set {
                key: KeyType::AddrPair,
                ..set(
                    HAIRPIN,
                    "endpoints that may reach themselves through a Service",
                )
            },
        ],
    )
}

/// nftables' protocol for a model protocol.
pub fn l4(p: kpr_model::Protocol) -> L4Proto {
    match p {
        kpr_model::Protocol::Tcp => L4Proto::Tcp,
        kpr_model::Protocol::Udp => L4Proto::Udp,
        kpr_model::Protocol::Sctp => L4Proto::Sctp,
    }
}
