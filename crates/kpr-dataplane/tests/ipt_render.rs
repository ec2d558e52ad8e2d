//! The iptables mode's `iptables-restore` input: snapshots of a small example cluster in both
//! families (upstream's layout, §13), what a partial sync writes after one endpoint change in
//! a large cluster (only that Service's chains), a property that partial syncs leave what one
//! full sync leaves (both as committed and as restored into a model of the kernel's chains),
//! and that the text cannot be bent by names: one rule per line, comments quoted.
#![allow(clippy::unwrap_used)]

use kpr_dataplane::iptables::{Existing, IptConfig, Rendered, Restore, Rule, Target, render};
use kpr_dataplane::nftables::NodePortAddrs;
use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{
    DesiredState, FamilyDesired, Input, IpFamily, ObjectKey, SyncPlan, Trackers, Update, desired,
    update_desired,
};
use kpr_testkit::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn mode() -> DetectLocalMode {
    DetectLocalMode::ClusterCidr(vec![
        CLUSTER_CIDR.parse().unwrap(),
        "fd00:10::/64".parse().unwrap(),
    ])
}

fn cfg(family: IpFamily) -> IptConfig {
    let ip = match family {
        IpFamily::V4 => NODE_IP,
        IpFamily::V6 => NODE_IP6,
    };
    IptConfig::new(family, 14, NodePortAddrs::List(vec![ip.parse().unwrap()]))
}

fn record(t: &mut Trackers, input: Input) {
    let skipped = t.record(input);
    assert!(skipped.is_empty(), "{skipped:?}");
}

fn desired_of(t: &Trackers) -> DesiredState {
    let ctx = NodeContext::new(NODE, None);
    let pol = ProxyPolicy::new(false, &mode(), None);
    desired(t.state(), &ctx, &pol)
}

fn full(fam: &FamilyDesired, family: IpFamily) -> (Rendered, Restore) {
    let mut r = Rendered::default();
    let out = render(fam, &cfg(family), &mut r, &SyncPlan::full(), None);
    (r, out)
}

/// The example cluster: ClusterIP with 2 endpoints, NodePort with ETP=Local, LoadBalancer with
/// source ranges, ClientIP affinity, a Service without endpoints, an IPv6 Service.
fn example() -> Trackers {
    let mut t = Trackers::new();
    let svcs = [
        service("ns1", "svc1")
            .cluster_ip("172.30.0.41")
            .port("p80", 80, "TCP"),
        service("ns2", "svc2")
            .cluster_ip("172.30.0.42")
            .node_port("p80", 80, "TCP", 3002)
            .etp_local(),
        service("ns3", "svc3")
            .cluster_ip("172.30.0.43")
            .lb(LB_IP, None)
            .source_range("203.0.113.0/25")
            .node_port("p80", 80, "TCP", 3003),
        service("ns4", "svc4")
            .cluster_ip("172.30.0.44")
            .port("p80", 80, "TCP")
            .affinity(Some(10800)),
        service("ns5", "svc5")
            .cluster_ip("172.30.0.45")
            .external_ip(EXTERNAL_IP)
            .node_port("p80", 80, "TCP", 3005),
        service("ns6", "svc6")
            .cluster_ip("fd00:30::46")
            .lb("fd00:1:2:3::4", None)
            .source_range("2001:db8::/64")
            .etp_local()
            .health_check_node_port(30006)
            .node_port("p80", 80, "TCP", 3006)
            .affinity(Some(60)),
    ];
    for s in svcs {
        record(&mut t, Input::Services(Update::Apply(s.build())));
    }
    let slices = [
        slice("ns1", "svc1", "a")
            .port("p80", 80, "TCP")
            .ready("10.180.0.1", NODE)
            .ready("10.180.1.1", OTHER_NODE),
        slice("ns2", "svc2", "a")
            .port("p80", 8080, "TCP")
            .ready("10.180.0.2", NODE)
            .ready("10.180.1.2", OTHER_NODE),
        slice("ns3", "svc3", "a")
            .port("p80", 80, "TCP")
            .ready("10.180.1.3", OTHER_NODE),
        slice("ns4", "svc4", "a")
            .port("p80", 80, "TCP")
            .ready("10.180.0.4", NODE)
            .ready("10.180.1.4", OTHER_NODE),
        slice("ns6", "svc6", "a")
            .ipv6()
            .port("p80", 80, "TCP")
            .ready("fd00:10::6", NODE)
            .ready("fd00:10::7", OTHER_NODE),
    ];
    for s in slices {
        record(&mut t, Input::Slices(Update::Apply(s.build())));
    }
    t
}

#[test]
fn example_cluster_ipv4() {
    let d = desired_of(&example());
    let (_, out) = full(&d.families[&IpFamily::V4], IpFamily::V4);
    assert!(out.full);
    check_text(&out.text);
    insta::assert_snapshot!("example_ipv4", out.text);
}

#[test]
fn example_cluster_ipv6() {
    let d = desired_of(&example());
    let (_, out) = full(&d.families[&IpFamily::V6], IpFamily::V6);
    check_text(&out.text);
    insta::assert_snapshot!("example_ipv6", out.text);
}

/// A partial sync of the example after svc1 swaps one endpoint: its SVC chain and the new
/// SEP chain are written, the old SEP chain deleted; nothing else.
#[test]
fn example_partial_after_an_endpoint_change() {
    let mut t = example();
    let ctx = NodeContext::new(NODE, None);
    let pol = ProxyPolicy::new(false, &mode(), None);
    let plan = t.checkout();
    let mut d = DesiredState::default();
    update_desired(&mut d, t.state(), &ctx, &pol, &plan);
    let mut r = Rendered::default();
    render(
        &d.families[&IpFamily::V4],
        &cfg(IpFamily::V4),
        &mut r,
        &plan,
        None,
    );
    record(
        &mut t,
        Input::Slices(Update::Apply(
            slice("ns1", "svc1", "a")
                .port("p80", 80, "TCP")
                .ready("10.180.0.1", NODE)
                .ready("10.180.1.9", OTHER_NODE)
                .build(),
        )),
    );
    let plan = t.checkout();
    assert!(!plan.full);
    update_desired(&mut d, t.state(), &ctx, &pol, &plan);
    let out = render(
        &d.families[&IpFamily::V4],
        &cfg(IpFamily::V4),
        &mut r,
        &plan,
        None,
    );
    assert!(!out.full);
    check_text(&out.text);
    insta::assert_snapshot!("example_partial_ipv4", out.text);
}

fn big_svc(i: u32) -> ServiceBuilder {
    service("ns", &format!("svc{i}"))
        .cluster_ip(&format!("172.30.{}.{}", i / 250, i % 250 + 1))
        .node_port("http", 80, "TCP", 30000 + i as i32)
}

fn big_slice(i: u32, second: u32) -> SliceBuilder {
    slice("ns", &format!("svc{i}"), "a")
        .port("http", 8080, "TCP")
        .ready(&format!("10.1.{}.{}", i / 250, i % 250 + 1), NODE)
        .ready(&format!("10.2.{}.{}", i / 250, second), OTHER_NODE)
}

/// (a) One endpoint change among 200 Services writes only that Service's chains.
#[test]
fn one_endpoint_change_writes_only_that_services_chains() {
    let mut t = Trackers::new();
    for i in 0..200 {
        record(&mut t, Input::Services(Update::Apply(big_svc(i).build())));
        record(
            &mut t,
            Input::Slices(Update::Apply(big_slice(i, i % 250 + 1).build())),
        );
    }
    let ctx = NodeContext::new(NODE, None);
    let pol = ProxyPolicy::new(false, &mode(), None);
    let mut d = DesiredState::default();
    let plan = t.checkout();
    assert!(plan.full);
    update_desired(&mut d, t.state(), &ctx, &pol, &plan);
    let mut r = Rendered::default();
    let cfg4 = cfg(IpFamily::V4);
    let full_out = render(&d.families[&IpFamily::V4], &cfg4, &mut r, &plan, None);
    assert!(full_out.full);

    // svc77's remote endpoint moves.
    record(
        &mut t,
        Input::Slices(Update::Apply(big_slice(77, 250).build())),
    );
    let plan = t.checkout();
    assert!(!plan.full);
    update_desired(&mut d, t.state(), &ctx, &pol, &plan);
    let out = render(&d.families[&IpFamily::V4], &cfg4, &mut r, &plan, None);
    assert!(!out.full);
    check_text(&out.text);

    let fam = &d.families[&IpFamily::V4];
    let port = fam
        .ports
        .keys()
        .find(|p| &*p.service.name == "svc77")
        .unwrap()
        .clone();
    let svc = kpr_dataplane::iptables::naming::service_chain("SVC", &port);
    let ext = kpr_dataplane::iptables::naming::service_chain("EXT", &port);
    let sep = |ip: &str| {
        kpr_dataplane::iptables::naming::endpoint_chain(
            &port,
            format!("{ip}:8080").parse().unwrap(),
        )
    };
    let (old, new) = (sep("10.2.0.78"), sep("10.2.0.250"));
    let declared: BTreeSet<String> = out
        .text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|l| l.strip_suffix(" - [0:0]").unwrap().to_owned())
        .collect();
    let deleted: BTreeSet<String> = out
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("-X "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        declared,
        [svc.clone(), old.clone(), new.clone()].into(),
        "{}",
        out.text
    );
    assert_eq!(deleted, [old].into(), "{}", out.text);
    assert!(!declared.contains(&ext), "the EXT chain did not change");
    for l in out.text.lines().filter(|l| l.starts_with("-A ")) {
        let chain = l.split_whitespace().nth(1).unwrap();
        assert!(chain == svc || chain == new, "{l}");
    }
    assert_eq!(
        out.text.lines().filter(|l| l.starts_with('*')).count(),
        1,
        "only nat is written: {}",
        out.text
    );
    println!(
        "iptables-restore input: full sync {} bytes, partial sync after one endpoint change {} bytes",
        full_out.text.len(),
        out.text.len()
    );
    assert!(out.text.len() < 2048, "{} bytes", out.text.len());
    assert!(
        full_out.text.len() > 50 * out.text.len(),
        "full {} bytes vs partial {} bytes",
        full_out.text.len(),
        out.text.len()
    );
    // And what the kernel would hold afterwards is what one full sync of the new state leaves.
    let mut kernel = Kernel::default();
    kernel.restore(&full_out.text);
    kernel.restore(&out.text);
    let (_, fresh) = full(&desired_of(&t).families[&IpFamily::V4], IpFamily::V4);
    let mut reference = Kernel::default();
    reference.restore(&fresh.text);
    assert_eq!(kernel, reference);
}

/// A model of the chains `iptables-restore --noflush` leaves: per (table, chain), rule texts
/// in order (each without its `-A chain` prefix). Built-in chains always exist. Refuses what
/// the kernel refuses: a rule in an undeclared chain, a jump to a missing chain, deleting a
/// chain that is still referenced or not empty, deleting a rule that is not there.
#[derive(Debug, Default, PartialEq, Eq)]
struct Kernel {
    chains: BTreeMap<(String, String), Vec<String>>,
}

const BUILTIN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
const TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "MARK",
    "MASQUERADE",
];

fn target_of(args: &str) -> Option<String> {
    let words = tokens(args);
    let i = words.iter().position(|w| w == "-j")?;
    words.get(i + 1).cloned()
}

impl Kernel {
    fn has(&self, table: &str, chain: &str) -> bool {
        BUILTIN.contains(&chain) || self.chains.contains_key(&(table.into(), chain.into()))
    }

    fn referenced(&self, table: &str, chain: &str) -> bool {
        self.chains
            .iter()
            .filter(|((t, _), _)| t == table)
            .flat_map(|(_, rules)| rules)
            .any(|r| target_of(r).as_deref() == Some(chain))
    }

    fn check_jump(&self, table: &str, args: &str) {
        let target = target_of(args).unwrap_or_else(|| panic!("no target: {args}"));
        assert!(
            TARGETS.contains(&target.as_str()) || self.has(table, &target),
            "jump to missing chain {target} in {table}: {args}"
        );
    }

    /// `iptables-save` of every table.
    fn save(&self) -> String {
        let mut out = String::new();
        for (table, builtins) in [
            ("filter", &["INPUT", "FORWARD", "OUTPUT"][..]),
            ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"][..]),
            ("mangle", BUILTIN),
        ] {
            out.push_str(&format!("*{table}\n"));
            for b in builtins {
                out.push_str(&format!(":{b} ACCEPT [0:0]\n"));
            }
            let ours = self.chains.keys().filter(|(t, _)| t == table);
            for (_, c) in ours.clone().filter(|(_, c)| !BUILTIN.contains(&c.as_str())) {
                out.push_str(&format!(":{c} - [0:0]\n"));
            }
            for (_, c) in ours {
                for r in &self.chains[&(table.to_owned(), c.clone())] {
                    out.push_str(&format!("-A {c} {r}\n"));
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    fn restore(&mut self, text: &str) {
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_owned();
            } else if let Some(decl) = line.strip_prefix(':') {
                let (name, rest) = decl.split_once(' ').unwrap();
                assert_eq!(rest, "- [0:0]", "{line}");
                assert!(!BUILTIN.contains(&name), "{line}");
                // Declaring creates the chain, or flushes it.
                self.chains
                    .insert((table.clone(), name.to_owned()), Vec::new());
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, args) = rule.split_once(' ').unwrap();
                assert!(self.has(&table, chain), "append to missing chain: {line}");
                self.check_jump(&table, args);
                self.chains
                    .entry((table.clone(), chain.to_owned()))
                    .or_default()
                    .push(args.to_owned());
            } else if let Some(rule) = line.strip_prefix("-I ") {
                let (chain, rest) = rule.split_once(' ').unwrap();
                let (pos, args) = rest.split_once(' ').unwrap();
                let pos: usize = pos.parse().unwrap();
                self.check_jump(&table, args);
                let rules = self
                    .chains
                    .entry((table.clone(), chain.to_owned()))
                    .or_default();
                assert!(pos >= 1 && pos <= rules.len() + 1, "{line}");
                rules.insert(pos - 1, args.to_owned());
            } else if let Some(rule) = line.strip_prefix("-D ") {
                let (chain, args) = rule.split_once(' ').unwrap();
                let rules = self
                    .chains
                    .get_mut(&(table.clone(), chain.to_owned()))
                    .unwrap_or_else(|| panic!("{line}"));
                let i = rules
                    .iter()
                    .position(|r| r == args)
                    .unwrap_or_else(|| panic!("deleting a rule that is not there: {line}"));
                rules.remove(i);
            } else if let Some(chain) = line.strip_prefix("-X ") {
                let key = (table.clone(), chain.to_owned());
                let rules = self.chains.get(&key).unwrap_or_else(|| panic!("{line}"));
                assert!(rules.is_empty(), "deleting a non-empty chain: {line}");
                assert!(
                    !self.referenced(&table, chain),
                    "deleting a referenced chain: {line}"
                );
                self.chains.remove(&key);
            } else {
                assert_eq!(line, "COMMIT", "unexpected line");
            }
        }
        // Empty built-in chains are not worth telling apart from missing ones.
        self.chains
            .retain(|(_, c), rules| !(BUILTIN.contains(&c.as_str()) && rules.is_empty()));
    }
}

/// `iptables-restore`'s tokenizer (`add_param_to_argv`): whitespace separates; double quotes
/// group, and inside them a backslash takes the next character literally.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut have) = (false, false, false);
    for ch in line.chars() {
        if quoted {
            if escaped {
                cur.push(ch);
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                quoted = false;
                out.push(std::mem::take(&mut cur));
                have = false;
            } else {
                cur.push(ch);
            }
            continue;
        }
        match ch {
            '"' => {
                quoted = true;
                have = true;
            }
            ' ' | '\t' => {
                if have || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            _ => cur.push(ch),
        }
    }
    assert!(!quoted, "unterminated quote: {line}");
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// (c) Every line is one statement of the restore grammar, every rule one line whose
/// comment is a single argument, and every chain name fits iptables' 28 characters.
fn check_text(text: &str) {
    assert!(text.is_empty() || text.ends_with("COMMIT\n"), "{text}");
    assert!(!text.contains('\r'));
    for line in text.lines() {
        let ok = line.starts_with('*')
            || line.starts_with(':')
            || ["-A ", "-I ", "-D ", "-X "]
                .iter()
                .any(|p| line.starts_with(p))
            || line == "COMMIT";
        assert!(ok, "not a restore statement: {line:?}");
        assert!(
            !line.chars().any(char::is_control),
            "control character in {line:?}"
        );
        if line.starts_with("-A ") || line.starts_with("-I ") || line.starts_with("-D ") {
            let words = tokens(line);
            assert!(words[1].len() <= 28, "chain name too long: {line}");
            assert_eq!(
                words.iter().filter(|w| *w == "-j").count(),
                1,
                "one target per rule: {line}"
            );
            if let Some(i) = words.iter().position(|w| w == "--comment") {
                let c = &words[i + 1];
                assert!(
                    c.len() < 256,
                    "comment longer than xt_comment allows: {line}"
                );
                // The raw text has it either bare or quoted as one argument.
                assert!(
                    line.contains(&format!("--comment {c} "))
                        || line.contains(&format!("--comment \"{c}\" ")),
                    "comment not one argument: {line}"
                );
            }
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap();
            assert!(name.len() <= 28, "chain name too long: {line}");
        }
    }
}

/// (c) A comment, whatever it holds, stays one argument on one line.
#[test]
fn any_comment_is_one_argument_on_one_line() {
    proptest!(ProptestConfig::with_cases(256), |(c in any::<String>())| {
        let r = Rule::new("KUBE-SVC-X", Target::Accept).comment(c.clone());
        let text = r.text();
        prop_assert!(!text.contains('\n') && !text.contains('\r'), "{:?}", text);
        let words = tokens(&text);
        prop_assert_eq!(words.len(), 8, "{:?} -> {:?}", text, words);
        prop_assert_eq!(&words[..5], &["-A", "KUBE-SVC-X", "-m", "comment", "--comment"]);
        prop_assert_eq!(&words[6..], &["-j", "ACCEPT"]);
        // Only control characters are changed (to spaces).
        let want: String = c.chars().map(|ch| if ch.is_control() { ' ' } else { ch }).collect();
        prop_assert_eq!(&words[5], &want);
    });
}

/// (c) The longest names Kubernetes allows, in every kind of rule: comments quoted where they
/// contain spaces, each one argument, under xt_comment's 256 bytes.
#[test]
fn the_longest_names_stay_quoted_and_short_enough() {
    let ns = "n".repeat(63);
    let name = format!("s{}", "v".repeat(62));
    let port = format!("p{}", "x".repeat(14));
    let mut t = Trackers::new();
    record(
        &mut t,
        Input::Services(Update::Apply(
            service(&ns, &name)
                .cluster_ip("172.30.0.41")
                .external_ip(EXTERNAL_IP)
                .lb(LB_IP, None)
                .source_range("203.0.113.0/25")
                .etp_local()
                .health_check_node_port(30000)
                .node_port(&port, 80, "TCP", 3001)
                .affinity(Some(60))
                .build(),
        )),
    );
    let mut eps = slice(&ns, &name, "a")
        .port(&port, 80, "TCP")
        .ready("10.0.0.2", NODE)
        .ready("10.0.1.2", OTHER_NODE);
    eps.0.metadata.name = Some("eps".into());
    record(&mut t, Input::Slices(Update::Apply(eps.build())));
    let d = desired_of(&t);
    let (_, out) = full(&d.families[&IpFamily::V4], IpFamily::V4);
    check_text(&out.text);
    let full_name = format!("{ns}/{name}:{port}");
    let mut comments = 0;
    for line in out.text.lines().filter(|l| l.contains(&full_name)) {
        comments += 1;
        let words = tokens(line);
        let c = &words[words.iter().position(|w| w == "--comment").unwrap() + 1];
        assert!(c.contains(&full_name), "{line}");
        if c.contains(' ') {
            assert!(line.contains(&format!("\"{c}\"")), "unquoted: {line}");
        }
    }
    assert!(comments > 10, "{}", out.text);
    // Without endpoints, the refusing rules too.
    record(
        &mut t,
        Input::Slices(Update::Delete(ObjectKey::new(ns.clone(), "eps"))),
    );
    let d = desired_of(&t);
    let (_, out) = full(&d.families[&IpFamily::V4], IpFamily::V4);
    check_text(&out.text);
    assert!(out.text.contains("has no endpoints"), "{}", out.text);
}

// (b) Partial syncs equal one full sync.

#[derive(Debug, Clone)]
enum Ev {
    Svc(u8, u8),
    DelSvc(u8),
    Slice(u8, Vec<(u8, u8)>),
    DelSlice(u8),
    Sync,
    /// A restart: nothing committed, and a full sync that lists the kernel first.
    Restart,
}

fn svc(id: u8, v: u8) -> ServiceBuilder {
    let mut b = service("ns", &format!("s{id}"))
        .cluster_ip(&format!("172.30.0.{}", id + 1))
        .cluster_ip(&format!("fd00:30::{}", id + 1));
    b = if v & 1 == 1 {
        b.node_port("p", 80, "TCP", 3000 + i32::from(id))
    } else {
        b.port("p", 80, "TCP")
    };
    if v & 2 == 2 {
        b = b.port("u", 53, "UDP");
    }
    if v & 4 == 4 {
        b = b
            .lb(&format!("1.2.3.{}", id + 1), None)
            .etp_local()
            .health_check_node_port(31000 + i32::from(id))
            .source_range("203.0.113.0/24");
    }
    if v & 8 == 8 {
        b = b.itp_local();
    }
    if v & 16 == 16 {
        b = b.affinity(Some(60));
    }
    if v & 32 == 32 {
        b = b.external_ip(&format!("192.168.99.{}", id + 1));
    }
    if v & 64 == 64 {
        b = b.port("s", 9999, "SCTP");
    }
    b
}

fn slice_of(id: u8, eps: &[(u8, u8)], v6: bool) -> SliceBuilder {
    let mut s = slice("ns", &format!("s{id}"), if v6 { "b" } else { "a" })
        .port("p", 8080, "TCP")
        .port("u", 5353, "UDP")
        .port("s", 9999, "SCTP");
    if v6 {
        s = s.ipv6();
    }
    for (i, st) in eps {
        let node = if i % 2 == 0 { NODE } else { OTHER_NODE };
        let addr = if v6 {
            format!("fd00:10::{}:{}", i % 2, i + 10)
        } else {
            format!("10.0.{}.{}", i % 2, i + 10)
        };
        s = if st % 2 == 0 {
            s.ready(&addr, node)
        } else {
            s.terminating(&addr, node)
        };
    }
    s
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        3 => (0u8..4, 0u8..128).prop_map(|(i, v)| Ev::Svc(i, v)),
        1 => (0u8..4).prop_map(Ev::DelSvc),
        4 => (0u8..4, prop::collection::vec((0u8..6, 0u8..2), 0..4)).prop_map(|(i, e)| Ev::Slice(i, e)),
        1 => (0u8..4).prop_map(Ev::DelSlice),
        2 => Just(Ev::Sync),
        1 => Just(Ev::Restart),
    ]
}

fn apply(t: &mut Trackers, e: &Ev) {
    let inputs = match e {
        Ev::Svc(i, v) => vec![Input::Services(Update::Apply(svc(*i, *v).build()))],
        Ev::DelSvc(i) => vec![Input::Services(Update::Delete(ObjectKey::new(
            "ns",
            format!("s{i}"),
        )))],
        Ev::Slice(i, eps) => [false, true]
            .map(|v6| Input::Slices(Update::Apply(slice_of(*i, eps, v6).build())))
            .into(),
        Ev::DelSlice(i) => ["a", "b"]
            .map(|s| Input::Slices(Update::Delete(ObjectKey::new("ns", format!("s{i}-{s}")))))
            .into(),
        Ev::Sync | Ev::Restart => return,
    };
    for input in inputs {
        t.record(input);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// (b) Any sequence of changes, synced partially (and sometimes restarted: a full sync
    /// over what the kernel holds), leaves the committed chains and the restored kernel
    /// chains of one full sync of the final state, in both families.
    #[test]
    fn partial_syncs_equal_one_full_sync(events in prop::collection::vec(ev(), 0..30)) {
        let ctx = NodeContext::new(NODE, None);
        let pol = ProxyPolicy::new(false, &mode(), None);
        let mut t = Trackers::new();
        let mut d = DesiredState::default();
        let mut rendered = [Rendered::default(), Rendered::default()];
        let mut kernels = [Kernel::default(), Kernel::default()];
        for e in events.iter().chain([Ev::Sync].iter()) {
            apply(&mut t, e);
            let restart = matches!(e, Ev::Restart);
            if restart {
                t.request_full();
                rendered = Default::default();
            } else if !matches!(e, Ev::Sync) {
                continue;
            }
            let plan = t.checkout();
            update_desired(&mut d, t.state(), &ctx, &pol, &plan);
            let fresh = desired_of(&t);
            for (i, family) in IpFamily::ALL.into_iter().enumerate() {
                let existing = restart.then(|| Existing::parse(&kernels[i].save()));
                let out = render(&d.families[&family], &cfg(family), &mut rendered[i], &plan, existing.as_ref());
                prop_assert_eq!(out.full, plan.full || restart);
                check_text(&out.text);
                kernels[i].restore(&out.text);
                let (whole, whole_out) = full(&fresh.families[&family], family);
                prop_assert_eq!(rendered[i].all_chains(), whole.all_chains(), "{}", family);
                let mut reference = Kernel::default();
                reference.restore(&whole_out.text);
                prop_assert_eq!(&kernels[i], &reference, "{}", family);
            }
        }
    }
}

/// The tables a full sync writes, and the jumps from the built-in chains (§13.1), in order.
#[test]
fn full_sync_writes_the_jumps_in_upstream_order() {
    let d = desired_of(&example());
    let (_, out) = full(&d.families[&IpFamily::V4], IpFamily::V4);
    let mut k = Kernel::default();
    k.restore(&out.text);
    let jumps = |table: &str, chain: &str| -> Vec<String> {
        k.chains
            .get(&(table.into(), chain.into()))
            .unwrap()
            .iter()
            .map(|r| target_of(r).unwrap())
            .collect()
    };
    assert_eq!(
        jumps("filter", "INPUT"),
        [
            "KUBE-PROXY-FIREWALL",
            "KUBE-NODEPORTS",
            "KUBE-EXTERNAL-SERVICES"
        ]
    );
    assert_eq!(
        jumps("filter", "FORWARD"),
        [
            "KUBE-PROXY-FIREWALL",
            "KUBE-FORWARD",
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES"
        ]
    );
    assert_eq!(
        jumps("filter", "OUTPUT"),
        ["KUBE-PROXY-FIREWALL", "KUBE-SERVICES"]
    );
    assert_eq!(jumps("nat", "PREROUTING"), ["KUBE-SERVICES"]);
    assert_eq!(jumps("nat", "OUTPUT"), ["KUBE-SERVICES"]);
    assert_eq!(jumps("nat", "POSTROUTING"), ["KUBE-POSTROUTING"]);
    for table in ["filter", "nat", "mangle"] {
        assert!(k.has(table, "KUBE-PROXY-CANARY"), "{table}");
    }
}
