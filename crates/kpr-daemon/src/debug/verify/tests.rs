//! The comparison and the kernel's view of a packet, with a listing edited the way a person
//! editing the kernel behind the proxy's back would (the real kernel: `tests/traffic.rs`).

use super::*;
use crate::debug::fixtures::{self, sync_config, synced};
use crate::sync::SyncState;
use kpr_dataplane::nftables::trace::TracePacket;
use kpr_testkit::{NODE, NODE_IP, POD, node, service, slice};

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))
}

/// Two Services: web (172.30.0.10:80, two endpoints), api (172.30.0.20:80, one).
fn state() -> (DesiredState, NodeContext) {
    let s = SyncState::new(sync_config(&["10.0.0.0/8"]));
    let services = vec![
        service("default", "web")
            .cluster_ip("172.30.0.10")
            .port("http", 80, "TCP")
            .build(),
        service("default", "api")
            .cluster_ip("172.30.0.20")
            .port("http", 80, "TCP")
            .build(),
    ];
    let slices = vec![
        slice("default", "web", "1")
            .port("http", 8080, "TCP")
            .ready("10.0.0.11", NODE)
            .ready("10.0.0.12", NODE)
            .build(),
        slice("default", "api", "1")
            .port("http", 8080, "TCP")
            .ready("10.0.0.21", NODE)
            .build(),
    ];
    let s = synced(
        s,
        Some(node(NODE).address("InternalIP", NODE_IP).build()),
        services,
        slices,
    );
    (s.desired().clone(), s.node_context())
}

fn setup(iptables: bool) -> Setup {
    Setup {
        mode: if iptables { "iptables" } else { "nftables" },
        masquerade_bit: 14,
        node_ports: NodePortAddresses::Primary,
        localhost_node_ports: false,
        iptables: iptables.then(|| IptHost {
            tools: Tools::new(kpr_dataplane::iptables::exec::Variant::Nft),
            drop_invalid: true,
        }),
    }
}

fn committed_v4(iptables: bool) -> Committed {
    let (desired, node) = state();
    match committed(&setup(iptables), &desired, &node, IpFamily::V4) {
        Some(Ok(c)) => c,
        other => panic!("no committed rules: {other:?}"),
    }
}

fn to(dst: &str) -> TracePacket {
    TracePacket {
        src: ip(POD),
        iif: None,
        from_host: false,
        dst: ip(dst),
        proto: kpr_nft::L4Proto::Tcp,
        port: 80,
        local_ips: vec![ip(NODE_IP)],
    }
}

/// The committed listing with `edit` applied, as the kernel's.
fn nft_kernel(c: &Committed, edit: impl Fn(&mut nft::TableListing)) -> KernelRules {
    let Committed::Nft { listing, .. } = c else {
        panic!("not nftables");
    };
    let mut k = listing.clone();
    edit(&mut k);
    KernelRules::Nft(Some(k))
}

fn drop_element(k: &mut nft::TableListing, map: &str, key: &str) {
    if let Some(o) = k.objects.get_mut(&("map".to_owned(), map.to_owned())) {
        o.elements.retain(|e| nft::element_key(e) != key);
    }
}

#[test]
fn sequences_differ_by_missing_extra_changed_or_order() {
    let d = seq_diff(&["a", "b", "c"], &["a", "b", "c"]);
    assert_eq!(d, SeqDiff::default());
    let d = seq_diff(&["a", "b", "c"], &["a", "c"]);
    assert_eq!((d.missing, d.extra), (vec![1], vec![]));
    let d = seq_diff(&["a", "b"], &["a", "b", "b"]);
    assert_eq!((d.missing, d.extra), (vec![], vec![2]));
    let d = seq_diff(&["a", "b", "c"], &["a", "x", "c"]);
    assert_eq!(
        (d.different, d.missing, d.extra),
        (vec![(1, 1)], vec![], vec![])
    );
    let d = seq_diff(&["a", "b"], &["b", "a"]);
    assert!(d.reordered && d.missing.is_empty() && d.extra.is_empty());
}

#[test]
fn the_committed_rules_match_themselves() {
    for iptables in [false, true] {
        let c = committed_v4(iptables);
        let kernel = match &c {
            Committed::Nft { .. } => nft_kernel(&c, |_| {}),
            Committed::Ipt { chains } => KernelRules::Ipt(save_of(chains)),
        };
        assert_eq!(
            compare(IpFamily::V4, &c, &kernel),
            [],
            "iptables: {iptables}"
        );
        let s = summary(IpFamily::V4, &c);
        assert!(s.starts_with("IPv4: "), "{s}");
    }
}

/// The nftables mode: one Service's map element deleted behind the proxy's back.
#[test]
fn nftables_a_missing_element_on_the_path_changes_the_packets_fate() {
    let c = committed_v4(false);
    let kernel = nft_kernel(&c, |k| {
        drop_element(k, "service-ips", "172.30.0.20 . tcp . 80")
    });
    let diffs = compare(IpFamily::V4, &c, &kernel);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(
        (diffs[0].object.as_str(), diffs[0].kind),
        ("map service-ips", Kind::Missing)
    );
    assert!(
        diffs[0]
            .detail
            .starts_with("missing element `172.30.0.20 . tcp . 80 comment")
    );
    // web's packets never read api's element.
    let web = judge(&c, &diffs, &to("172.30.0.10"), IpFamily::V4);
    assert_eq!(
        (web.status, web.agrees, web.elsewhere),
        ("agrees", Some(true), 1)
    );
    assert_eq!(
        web.committed,
        ["DNAT to 10.0.0.11:8080", "DNAT to 10.0.0.12:8080"]
    );
    assert_eq!(web.kernel, web.committed);
    // api's do: the ClusterIP without a service-ips element is rejected.
    let api = judge(&c, &diffs, &to("172.30.0.20"), IpFamily::V4);
    assert_eq!((api.status, api.agrees), ("disagrees", Some(false)));
    assert_eq!(api.committed, ["DNAT to 10.0.0.21:8080"]);
    assert_eq!(api.kernel, ["REJECT"]);
    assert_eq!(api.differences, diffs);
    let text = api.to_string();
    assert!(text.starts_with("Kernel: the kernel DISAGREES"), "{text}");
    assert!(
        text.contains("IPv4 map service-ips: missing element"),
        "{text}"
    );
}

#[test]
fn nftables_an_endpoint_bucket_and_a_foreign_rule() {
    let c = committed_v4(false);
    // One of web's two endpoint-map elements goes: the other endpoint still answers, and
    // some packets fall through to the ClusterIP reject.
    let Committed::Nft { listing, .. } = &c else {
        panic!("not nftables");
    };
    let (map, bucket) = listing
        .objects
        .iter()
        .filter(|((k, n), _)| k == "map" && n.contains("endpoints-"))
        .flat_map(|((_, n), o)| o.elements.iter().map(move |e| (n.clone(), e.clone())))
        .find(|(_, e)| e.contains("10.0.0.12"))
        .map(|(n, e)| (n, nft::element_key(&e).to_owned()))
        .unwrap_or_default();
    let kernel = nft_kernel(&c, |k| drop_element(k, &map, &bucket));
    let diffs = compare(IpFamily::V4, &c, &kernel);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    let web = judge(&c, &diffs, &to("172.30.0.10"), IpFamily::V4);
    assert_eq!(web.status, "disagrees");
    assert!(
        web.kernel.contains(&"DNAT to 10.0.0.11:8080".to_owned()),
        "{web:?}"
    );
    assert!(
        !web.kernel.contains(&"DNAT to 10.0.0.12:8080".to_owned()),
        "{web:?}"
    );
    let api = judge(&c, &diffs, &to("172.30.0.20"), IpFamily::V4);
    assert_eq!(
        (api.status, api.elsewhere),
        ("agrees", 1),
        "another bucket range"
    );
    // A rule nobody committed in a chain every Service packet runs through: uncertain.
    let kernel = nft_kernel(&c, |k| {
        if let Some(o) = k
            .objects
            .get_mut(&("chain".to_owned(), "services".to_owned()))
        {
            o.rules.insert(0, "ip daddr 172.30.0.20 drop".into());
        }
    });
    let diffs = compare(IpFamily::V4, &c, &kernel);
    let api = judge(&c, &diffs, &to("172.30.0.20"), IpFamily::V4);
    assert_eq!((api.status, api.agrees), ("uncertain", None));
    assert!(
        api.to_string()
            .contains("extra rule 1: `ip daddr 172.30.0.20 drop`")
    );
    // A missing table: everything differs.
    let diffs = compare(IpFamily::V4, &c, &KernelRules::Nft(None));
    let web = judge(&c, &diffs, &to("172.30.0.10"), IpFamily::V4);
    assert_eq!(
        (web.status, web.kernel.clone()),
        ("disagrees", vec!["PASS".to_owned()])
    );
}

/// iptables-save of committed chains (in the restore spelling, which normalises the same).
fn save_of(
    chains: &BTreeMap<ChainKey, Vec<ipt_backend::Rule>>,
) -> BTreeMap<IptTable, ipt::SaveTable> {
    let mut out: BTreeMap<IptTable, ipt::SaveTable> = BTreeMap::new();
    for ((t, c), rules) in chains {
        out.entry(*t)
            .or_default()
            .insert(c.clone(), rules.iter().map(|r| r.text()).collect());
    }
    out
}

#[test]
fn iptables_a_deleted_endpoint_chain_and_a_foreign_rule() {
    let c = committed_v4(true);
    let Committed::Ipt { chains } = &c else {
        panic!("not iptables");
    };
    let mut save = save_of(chains);
    // `iptables -t nat -F KUBE-SEP-… && -X` after deleting the rule jumping to it.
    let sep = chains
        .iter()
        .find(|((_, name), rules)| {
            name.starts_with("KUBE-SEP-") && rules.iter().any(|r| r.text().contains("10.0.0.12"))
        })
        .map(|((_, name), _)| name.clone())
        .unwrap_or_default();
    let nat = save.entry(IptTable::Nat).or_default();
    nat.remove(&sep);
    for rules in nat.values_mut() {
        rules.retain(|r| !r.ends_with(&format!("-j {sep}")));
    }
    let diffs = compare(IpFamily::V4, &c, &KernelRules::Ipt(save.clone()));
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert!(
        diffs
            .iter()
            .any(|d| d.object == format!("chain {sep} (nat)")
                && d.detail == "missing (the whole chain, 2 rules committed)")
    );
    let web = judge(&c, &diffs, &to("172.30.0.10"), IpFamily::V4);
    assert_eq!(
        (web.status, web.differences.len()),
        ("disagrees", 2),
        "{web:?}"
    );
    // The first endpoint's rule, a 1-in-2 pick, is last now: half the packets fall through.
    assert_eq!(web.kernel, ["DNAT to 10.0.0.11:8080", "PASS"]);
    let api = judge(&c, &diffs, &to("172.30.0.20"), IpFamily::V4);
    assert_eq!((api.status, api.elsewhere), ("agrees", 2));
    // A stale service chain of ours is extra, off every path; a foreign rule in
    // KUBE-SERVICES is on every Service packet's path.
    let nat = save.entry(IptTable::Nat).or_default();
    nat.insert("KUBE-SVC-STALE".into(), Vec::new());
    if let Some(r) = nat.get_mut("KUBE-SERVICES") {
        r.insert(0, "-A KUBE-SERVICES -d 172.30.0.20/32 -j DROP".into());
    }
    let diffs = compare(IpFamily::V4, &c, &KernelRules::Ipt(save));
    assert!(
        diffs
            .iter()
            .any(|d| d.object == "chain KUBE-SVC-STALE (nat)" && d.kind == Kind::Extra)
    );
    let api = judge(&c, &diffs, &to("172.30.0.20"), IpFamily::V4);
    assert_eq!(api.status, "uncertain");
    assert!(
        api.differences
            .iter()
            .all(|d| d.object != "chain KUBE-SVC-STALE (nat)"),
        "{api:?}"
    );
}

#[test]
fn reports_read_as_json_and_text() {
    let c = committed_v4(false);
    let kernel = nft_kernel(&c, |k| {
        drop_element(k, "service-ips", "172.30.0.20 . tcp . 80")
    });
    let r = Report {
        ok: false,
        differences: compare(IpFamily::V4, &c, &kernel),
        mode: "nftables".into(),
        compared: vec![summary(IpFamily::V4, &c)],
        generation: 3,
        elapsed_seconds: 0.01,
        note: None,
    };
    let json = serde_json::to_value(&r).unwrap_or_default();
    assert_eq!(json["ok"], false);
    assert_eq!(json["differences"][0]["family"], "IPv4");
    assert_eq!(json["differences"][0]["object"], "map service-ips");
    assert_eq!(json["differences"][0]["kind"], "missing");
    let back: Report = serde_json::from_value(json).expect("a report reads back");
    assert_eq!(back.to_string(), r.to_string());
    let text = r.to_string();
    assert!(
        text.contains("1 difference (")
            && text.contains("\nIPv4 map service-ips: missing element `172.30.0.20 . tcp . 80"),
        "{text}"
    );
}

/// The committed listing is spelled from the typed transaction without applying it to the
/// fake: it must equal the fake's listing (which tests prove equal to the kernel's), here for
/// endpoint maps, affinity sets, a firewall, a NodePort and both families.
#[test]
fn the_committed_listing_is_the_fakes() {
    let s = SyncState::new(sync_config(&[]));
    let services = vec![
        service("default", "aff")
            .cluster_ip("172.30.0.10")
            .port("http", 80, "TCP")
            .affinity(Some(600))
            .build(),
        service("default", "lb")
            .cluster_ip("172.30.0.20")
            .lb("1.2.3.4", None)
            .source_range("203.0.113.0/24")
            .etp_local()
            .health_check_node_port(32000)
            .node_port("http", 80, "TCP", 30080)
            .build(),
        service("default", "empty")
            .cluster_ip("172.30.0.30")
            .port("dns", 53, "UDP")
            .build(),
    ];
    let slices = vec![
        slice("default", "aff", "1")
            .port("http", 8080, "TCP")
            .ready("10.0.0.11", NODE)
            .ready("10.0.0.12", NODE)
            .build(),
        slice("default", "lb", "1")
            .port("http", 8080, "TCP")
            .ready("10.0.0.11", NODE)
            .ready("10.0.1.12", "node-b")
            .build(),
    ];
    let s = synced(
        s,
        Some(node(NODE).address("InternalIP", NODE_IP).build()),
        services,
        slices,
    );
    for family in IpFamily::ALL {
        let Some(fam) = s.desired().families.get(&family) else {
            continue;
        };
        for node_ports in [
            kpr_dataplane::nftables::NodePortAddrs::All,
            kpr_dataplane::nftables::NodePortAddrs::List(vec![ip(NODE_IP)]),
        ] {
            let cfg = NftConfig::new(family, 14, node_ports);
            let tx = kpr_dataplane::nftables::render(
                fam,
                &cfg,
                &mut Rendered::default(),
                &SyncPlan::full(),
            );
            let mut fake = kpr_nft::Fake::default();
            assert_eq!(fake.apply(&tx), Ok(()));
            let listed = nft::parse(&fake.listing()).unwrap_or_default();
            let built = nft::from_tx(&tx).unwrap_or_default();
            assert_eq!(listed.len(), 1);
            assert!(built.objects.len() > 20, "{family}: {built:?}");
            assert_eq!(nft::diff(&listed[0], Some(&built)), [], "{family}");
            assert_eq!(built, listed[0], "{family}");
        }
    }
}

/// A sync that wrote nothing (the periodic ones) does not make a kernel read stale; one that
/// wrote, or failed, does.
#[test]
fn only_syncs_that_wrote_make_a_reading_stale() {
    let hub = fixtures::hub();
    let sync = |operations: usize, result: &str| super::super::SyncRecord {
        time: String::new(),
        full: false,
        changed_services: 0,
        operations,
        duration_seconds: 0.0,
        result: result.into(),
        programming_latency_seconds: None,
    };
    hub.record_sync(sync(12, "ok"));
    assert!(!wrote_since(&hub, 1));
    assert!(wrote_since(&hub, 0));
    hub.record_sync(sync(0, "ok"));
    hub.record_sync(sync(0, "ok"));
    assert!(!wrote_since(&hub, 1), "two periodic syncs");
    hub.record_sync(sync(0, "IPv4: refused"));
    assert!(wrote_since(&hub, 3), "a failed sync");
    assert!(!wrote_since(&hub, 4));
}
