//! The netlink executor against the `nft` CLI, in the real kernel: one transaction holding
//! every match, statement, set, map and element kind `kpr-nft` can express (both families) is
//! loaded with `nft -f` in one network namespace and through netlink in another; the kernel
//! must then list the same table and the same bytecode (`nft --debug=netlink list table`) in
//! both, equal to what the strict fake holds. Then the deleting operations, the same way.
//! Root only (CI runs as root); namespaces are the test's own and always removed.
#![allow(clippy::unwrap_used)]

use kpr_nft::*;
use kpr_testkit::lab::Lab;
use std::net::{IpAddr, SocketAddr};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn chain(name: &str, base: Option<BaseChain>, comment: Option<&str>) -> Op {
    Op::AddChain(Chain {
        name: name.into(),
        base,
        comment: comment.map(Into::into),
    })
}

fn el(set: &str, key: Key, verdict: Option<Verdict>, comment: Option<&str>) -> Element {
    Element {
        set: set.into(),
        key,
        verdict,
        target: None,
        comment: comment.map(Into::into),
    }
}

fn bucket(map: &str, b: u32, to: SocketAddr) -> Element {
    Element {
        target: Some(to),
        ..el(map, Key::Bucket(b), None, None)
    }
}

/// Every variant, for one family.
fn everything(family: Family) -> Transaction {
    let v6 = family == Family::Ip6;
    let a = |v4: &str, v6s: &str| if v6 { ip(v6s) } else { ip(v4) };
    let n = |v4: &str, v6s: &str| (if v6 { v6s } else { v4 }).parse().unwrap();
    let table = Table {
        family,
        name: "kpr-test".into(),
        comment: Some("rules for \"kpr\"; test".into()),
    };
    let mut tx = Transaction::new(table.clone());
    tx.push(Op::AddTable(table));
    let base = |chain_type, hook, priority| {
        Some(BaseChain {
            chain_type,
            hook,
            priority,
        })
    };
    tx.push(chain(
        "nat-pre",
        base(ChainType::Nat, Hook::Prerouting, priority::DSTNAT),
        None,
    ));
    tx.push(chain(
        "nat-post",
        base(ChainType::Nat, Hook::Postrouting, priority::SRCNAT),
        Some("post"),
    ));
    tx.push(chain(
        "filter-fwd",
        base(ChainType::Filter, Hook::Forward, priority::DSTNAT - 10),
        None,
    ));
    tx.push(chain(
        "filter-in",
        base(ChainType::Filter, Hook::Input, priority::FILTER),
        None,
    ));
    tx.push(chain(
        "filter-out",
        base(ChainType::Filter, Hook::Output, priority::DSTNAT + 10),
        None,
    ));
    tx.push(chain("svc", None, Some("ns/svc:p")));
    tx.push(chain("ep", None, None));
    tx.push(chain("gone", None, None));
    for (name, key) in [
        ("vips", KeyType::AddrProtoPort),
        ("nodeports", KeyType::ProtoPort),
        ("by-addr", KeyType::Addr),
    ] {
        tx.push(Op::AddMap(Map {
            name: name.into(),
            key,
            comment: Some(format!("map {name}")),
        }));
    }
    tx.push(Op::AddSet(Set {
        name: "aff".into(),
        key: KeyType::Addr,
        interval: false,
        timeout: Some(10800),
        comment: None,
    }));
    tx.push(Op::AddSet(Set {
        name: "ranges".into(),
        key: KeyType::Addr,
        interval: true,
        timeout: None,
        comment: Some("ranges".into()),
    }));
    tx.push(Op::AddMap(Map {
        name: "eps".into(),
        key: KeyType::Bucket(L4Proto::Udp),
        comment: Some("ns/svc:p endpoints".into()),
    }));
    tx.push(Op::AddMap(Map {
        name: "vip-eps".into(),
        key: KeyType::VipBucket(L4Proto::Tcp),
        comment: None,
    }));
    tx.push(Op::AddSet(Set {
        name: "pairs".into(),
        key: KeyType::AddrPair,
        interval: false,
        timeout: None,
        comment: None,
    }));
    tx.push(Op::AddSet(Set {
        name: "plain".into(),
        key: KeyType::Addr,
        interval: false,
        timeout: None,
        comment: None,
    }));
    let vip = a("172.30.0.1", "fd00:30::1");
    for (i, p) in [L4Proto::Tcp, L4Proto::Udp, L4Proto::Sctp]
        .into_iter()
        .enumerate()
    {
        tx.push(Op::AddElement(el(
            "vips",
            Key::AddrProtoPort(vip, p, 80 + i as u16),
            Some(Verdict::Goto("svc".into())),
            Some("ns/svc:p"),
        )));
        tx.push(Op::AddElement(el(
            "nodeports",
            Key::ProtoPort(p, 30080 + i as u16),
            Some(Verdict::Jump("svc".into())),
            None,
        )));
    }
    tx.push(Op::AddElement(el(
        "by-addr",
        Key::Addr(vip),
        Some(Verdict::Drop),
        None,
    )));
    tx.push(Op::AddElement(el(
        "ranges",
        Key::Net(n("10.0.0.0/8", "fd00::/8")),
        None,
        None,
    )));
    tx.push(Op::AddElement(el(
        "ranges",
        Key::Net(n("192.168.1.1/32", "2001:db8::1/128")),
        None,
        None,
    )));
    let ep = |i: u16| SocketAddr::new(a(&format!("10.0.0.{i}"), &format!("fd00::{i}")), 8000 + i);
    // One endpoint set at offset 0, one of three at offset 16384.
    tx.push(Op::AddElement(bucket("eps", 0, ep(4))));
    for i in 0..3u16 {
        tx.push(Op::AddElement(bucket(
            "eps",
            16384 + u32::from(i),
            ep(1 + i),
        )));
    }
    // A Service address and port with two endpoints in the shared endpoint map.
    for i in 0..2u16 {
        tx.push(Op::AddElement(Element {
            target: Some(ep(5 + i)),
            ..el(
                "vip-eps",
                Key::VipBucket(a("10.96.0.10", "fd00:96::10"), 80, u32::from(i)),
                None,
                None,
            )
        }));
    }
    tx.push(Op::AddElement(el(
        "pairs",
        Key::AddrPair(ep(1).ip(), ep(1).ip()),
        None,
        None,
    )));
    tx.push(Op::AddElement(el(
        "plain",
        Key::Addr(a("10.9.9.9", "fd00::9")),
        None,
        None,
    )));
    let r = |c: &str| Rule::new(c);
    let rules = vec![
        r("nat-pre").s(Statement::Vmap {
            key: KeyType::AddrProtoPort,
            map: "vips".into(),
        }),
        r("nat-pre")
            .m(Match::FibLocal(Addr::Daddr))
            .s(Statement::Vmap {
                key: KeyType::ProtoPort,
                map: "nodeports".into(),
            }),
        r("filter-fwd").s(Statement::Vmap {
            key: KeyType::Addr,
            map: "by-addr".into(),
        }),
        r("nat-post")
            .m(Match::MarkClear(0x4000))
            .s(Statement::Verdict(Verdict::Return)),
        r("nat-post")
            .s(Statement::MarkXor(0x4000))
            .s(Statement::Masquerade)
            .comment("masquerade"),
        r("svc")
            .m(Match::Net {
                addr: Addr::Saddr,
                negate: true,
                net: n("10.244.0.0/16", "fd00:10::/48"),
            })
            .s(Statement::MarkOr(0x4000)),
        r("svc")
            .m(Match::Net {
                addr: Addr::Saddr,
                negate: false,
                net: n("10.16.0.0/12", "fd00:10::/28"),
            })
            .m(Match::Net {
                addr: Addr::Daddr,
                negate: true,
                net: n("127.0.0.1/32", "::1/128"),
            })
            .s(Statement::Verdict(Verdict::Accept)),
        r("svc")
            .m(Match::InSet {
                addr: Addr::Saddr,
                negate: false,
                set: "aff".into(),
            })
            .s(Statement::Verdict(Verdict::Goto("ep".into()))),
        r("svc")
            .m(Match::InSet {
                addr: Addr::Daddr,
                negate: true,
                set: "ranges".into(),
            })
            .s(Statement::Verdict(Verdict::Jump("ep".into()))),
        r("svc")
            .m(Match::NotInNets {
                addr: Addr::Saddr,
                nets: vec![
                    n("203.0.113.0/24", "2001:db8::/32"),
                    n("1.2.3.4/32", "fd00::1/128"),
                ],
            })
            .s(Statement::Verdict(Verdict::Drop)),
        r("svc")
            .m(Match::NotInNets {
                addr: Addr::Daddr,
                nets: vec![n("198.51.100.0/24", "2001:db8:1::/48")],
            })
            .s(Statement::Verdict(Verdict::Drop)),
        r("svc")
            .m(Match::RandomOneIn(3))
            .s(Statement::Verdict(Verdict::Goto("ep".into()))),
        r("ep")
            .m(Match::IifName {
                name: "cbr0".into(),
                prefix: false,
                negate: false,
            })
            .m(Match::IifName {
                name: "veth".into(),
                prefix: true,
                negate: true,
            })
            .s(Statement::Verdict(Verdict::Accept)),
        r("ep")
            .m(Match::FibLocal(Addr::Saddr))
            .s(Statement::UpdateSaddr { set: "aff".into() }),
        r("ep")
            .m(Match::L4Proto(L4Proto::Tcp))
            .s(Statement::Dnat {
                addr: a("10.0.0.2", "fd00::2"),
                port: 8080,
            })
            .comment("ns/svc:p -> 10.0.0.2:8080"),
        r("filter-in")
            .m(Match::CtStateNew)
            .m(Match::L4Proto(L4Proto::Udp))
            .m(Match::Dport(53))
            .s(Statement::Reject),
        r("filter-out")
            .m(Match::L4Proto(L4Proto::Sctp))
            .s(Statement::Verdict(Verdict::Drop)),
        r("ep")
            .m(Match::L4Proto(L4Proto::Udp))
            .s(Statement::DnatMap {
                map: "eps".into(),
                offset: 16384,
                modulus: 3,
            }),
        r("ep")
            .m(Match::L4Proto(L4Proto::Udp))
            .s(Statement::DnatMap {
                map: "eps".into(),
                offset: 0,
                modulus: 1,
            }),
        r("ep")
            .m(Match::L4Proto(L4Proto::Tcp))
            .s(Statement::DnatVipMap {
                map: "vip-eps".into(),
                proto: L4Proto::Tcp,
                modulus: 2,
            }),
        r("nat-post")
            .m(Match::CtStatusDnat)
            .m(Match::PairInSet {
                set: "pairs".into(),
            })
            .s(Statement::MarkOr(0x4000)),
        r("gone").s(Statement::Verdict(Verdict::Return)),
    ];
    tx.ops.extend(rules.into_iter().map(Op::AddRule));
    tx
}

/// What deletes and flushes look like after `everything`.
fn deletions(family: Family) -> Transaction {
    let full = everything(family);
    let mut tx = Transaction::new(full.table.clone());
    let elements: Vec<Element> = full
        .ops
        .iter()
        .filter_map(|o| match o {
            Op::AddElement(e) if e.set != "plain" => Some(e.clone()),
            _ => None,
        })
        .collect();
    // Two of the three VIP elements and both range elements go; the rest of `vips` stays.
    for e in elements
        .iter()
        .filter(|e| e.set == "ranges")
        .chain(elements.iter().filter(|e| e.set == "vips").take(2))
    {
        tx.push(Op::DeleteElement(e.clone()));
    }
    for e in elements.iter().filter(|e| e.set == "nodeports") {
        tx.push(Op::DeleteElement(e.clone()));
    }
    tx.push(Op::FlushSet("plain".into()));
    tx.push(Op::FlushChain("gone".into()));
    tx.push(Op::DeleteChain("gone".into()));
    tx.push(Op::DeleteElement(el(
        "by-addr",
        elements.iter().find(|e| e.set == "by-addr").unwrap().key,
        None,
        None,
    )));
    tx.push(Op::FlushChain("filter-fwd".into()));
    tx.push(Op::DeleteSet("plain".into()));
    // An endpoint leaves: the last one takes its bucket.
    let eps: Vec<Element> = full
        .ops
        .iter()
        .filter_map(|o| match o {
            Op::AddElement(e) if e.set == "eps" => Some(e.clone()),
            _ => None,
        })
        .collect();
    tx.push(Op::DeleteElement(eps[2].clone()));
    tx.push(Op::DeleteElement(eps[3].clone()));
    tx.push(Op::AddElement(Element {
        key: Key::Bucket(16385),
        ..eps[3].clone()
    }));
    tx
}

/// A `--debug=netlink` listing with each set's elements sorted (the kernel prints them in hash
/// order).
fn sorted_elements(listing: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for line in listing.lines() {
        if line.starts_with("\telement ") {
            run.push(line);
            continue;
        }
        run.sort();
        out.extend(run.drain(..).map(str::to_owned));
        out.push(line.to_owned());
    }
    run.sort();
    out.extend(run.drain(..).map(str::to_owned));
    out.join("\n")
}

struct Pair<'a> {
    lab: &'a Lab,
    cli_ns: String,
    nl_ns: String,
}

impl Pair<'_> {
    fn listings(&self, family: Family, debug: bool) -> (String, String) {
        let cmd = format!(
            "nft {} list table {} kpr-test",
            if debug { "--debug=netlink" } else { "" },
            family.as_str()
        );
        (
            self.lab.sh(&self.cli_ns, &cmd),
            self.lab.sh(&self.nl_ns, &cmd),
        )
    }

    fn agree(&self, family: Family, fake: &Fake, step: &str) {
        let (cli, nl) = self.listings(family, false);
        assert_eq!(
            normalize(&nl),
            normalize(&cli),
            "{step}: listings differ ({family:?})\n--- netlink ---\n{nl}\n--- nft -f ---\n{cli}"
        );
        assert_eq!(
            normalize(&nl),
            fake.dump(),
            "{step}: kernel and fake differ ({family:?})"
        );
        let (cli, nl) = self.listings(family, true);
        assert_eq!(
            sorted_elements(&nl),
            sorted_elements(&cli),
            "{step}: bytecode differs ({family:?})"
        );
    }
}

#[test]
fn netlink_writes_what_nft_writes() {
    let Some(mut lab) = Lab::new("netlink executor == nft -f") else {
        return;
    };
    let cli_ns = lab.netns("cli");
    let nl_ns = lab.netns("nl");
    let pair = Pair {
        lab: &lab,
        cli_ns: cli_ns.clone(),
        nl_ns: nl_ns.clone(),
    };
    let mut cli = NftCli::in_netns(&cli_ns);
    let mut nl = Netlink::in_netns(&nl_ns).unwrap();
    for family in [Family::Ip, Family::Ip6] {
        let mut fake = Fake::default();
        for (step, tx) in [
            ("everything", everything(family)),
            ("deletions", deletions(family)),
        ] {
            fake.apply(&tx)
                .unwrap_or_else(|e| panic!("{step}: fake refused: {e}\n{}", text::script(&tx)));
            cli.apply(&tx)
                .unwrap_or_else(|e| panic!("{step}: nft refused: {e}\n{}", text::script(&tx)));
            nl.apply(&tx)
                .unwrap_or_else(|e| panic!("{step}: netlink refused: {e}"));
            pair.agree(family, &fake, step);
        }
        // The whole table goes in one operation.
        let mut del = Transaction::new(everything(family).table);
        del.push(Op::DeleteTable);
        nl.apply(&del).unwrap();
        assert!(!nl.table_intact(&del.table, "svc").unwrap());
        assert!(
            lab.try_sh(
                &nl_ns,
                &format!("nft list table {} kpr-test", family.as_str())
            )
            .status
            .code()
                != Some(0)
        );
    }
}

#[test]
fn netlink_refusals_are_atomic_and_named() {
    let Some(mut lab) = Lab::new("netlink executor refuses atomically") else {
        return;
    };
    let ns = lab.netns("nl");
    let mut nl = Netlink::in_netns(&ns).unwrap();
    let good = everything(Family::Ip);
    nl.apply(&good).unwrap();
    assert!(nl.table_intact(&good.table, "svc").unwrap());
    let before = lab.sh(&ns, "nft list ruleset");
    let mut bad = Transaction::new(good.table.clone());
    bad.push(Op::FlushChain("svc".into()));
    bad.push(chain("new", None, None));
    bad.push(Op::AddRule(
        Rule::new("new").s(Statement::Verdict(Verdict::Jump("missing".into()))),
    ));
    let err = nl.apply(&bad).unwrap_err().to_string();
    assert!(
        err.contains("missing"),
        "the refused operation is named: {err}"
    );
    assert_eq!(
        lab.sh(&ns, "nft list ruleset"),
        before,
        "a refused batch changed the kernel"
    );
    // The same refused through a stream of operations (a full resync's path): named too, by
    // running the stream again.
    let mut runs = 0;
    let err = nl
        .apply_stream(&good.table, 0, &mut |sink| {
            runs += 1;
            bad.ops.iter().cloned().for_each(&mut *sink);
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("add rule ip kpr-test new jump missing"),
        "{err}"
    );
    assert_eq!(
        runs, 2,
        "encoded once, run again to name the refused operation"
    );
    assert_eq!(lab.sh(&ns, "nft list ruleset"), before);
    // A stream applies what the transaction applies (here after deleting the table).
    let replace = [Op::AddTable(good.table.clone()), Op::DeleteTable];
    let n = nl
        .apply_stream(&good.table, 0, &mut |sink| {
            replace
                .iter()
                .chain(&good.ops)
                .cloned()
                .for_each(&mut *sink)
        })
        .unwrap();
    assert_eq!(n, good.len() + 2);
    assert_eq!(lab.sh(&ns, "nft list ruleset"), before);
    // The executor keeps working after a refusal.
    let mut ok = Transaction::new(good.table.clone());
    ok.push(Op::FlushChain("gone".into()));
    nl.apply(&ok).unwrap();
    assert!(
        !lab.sh(&ns, "nft list chain ip kpr-test gone")
            .contains("return")
    );
}
