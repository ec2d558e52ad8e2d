//! Issue 15 item 7: the manifest decoder (`--manifests DIR`) never panics, whatever a file
//! holds: each file's objects are read or skipped with a problem that says why.
//!
//! Fed, through `Snapshot::add_text` (one file's text) and `load_dir` (the entry `--dry-run`
//! and the follower use), then into the model: arbitrary bytes and YAML-alphabet text; the
//! repository's example manifests (and JSON and `kind: List` forms) mutated byte by byte
//! (flips, insertions, deletions, truncations) and line by line (duplicated, deleted, swapped
//! lines, a value replaced by an odd scalar); nesting far past the parsers' depth limits,
//! nested lists, an alias bomb and a storm of documents.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
use kpr_model::{Trackers, desired};
use kpr_testkit::mutate::{Mutation, mutate, mutations};
use kpr_testkit::{CLUSTER_CIDR, NODE};
use kpr_watch::{Problem, Snapshot, load_dir};
use proptest::prelude::*;

/// Valid manifest files to mutate.
const SEEDS: &[&str] = &[
    include_str!("../../../examples/manifests/services.yaml"),
    include_str!("../../../examples/manifests/endpointslices.yaml"),
    include_str!("../../../examples/manifests/node.yaml"),
    include_str!("../../../examples/manifests/broken.yaml"),
    r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"ns"},
         "spec":{"type":"NodePort","clusterIP":"172.30.0.1","ports":[{"name":"p","port":80,"nodePort":30001}]}},
        {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
         "metadata":{"name":"a-1","namespace":"ns","labels":{"kubernetes.io/service-name":"a"}},
         "addressType":"IPv4","endpoints":[{"addresses":["10.0.0.1"],"nodeName":"node-a"}],
         "ports":[{"name":"p","port":8080}]}]}"#,
    "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec:\n  cidrs: [172.30.0.0/16, fd00:172:30::/112]\n---\napiVersion: networking.k8s.io/v1beta1\nkind: ServiceCIDR\nmetadata: {name: extra}\nspec: {cidrs: [172.31.0.0/24]}\n",
    "apiVersion: v1\nkind: ServiceList\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: b\n    namespace: ns\n  spec:\n    clusterIPs: [172.30.0.2, fd00::2]\n    ports:\n    - {name: q, port: 53, protocol: UDP}\n",
];

/// Reads one file's text, checks every problem says what and why, and runs the model on the
/// result (a full list of each kind, the Node when there is one), as the source and the sync
/// loop do.
fn check_text(text: &str) -> Result<Snapshot, TestCaseError> {
    let mut snapshot = Snapshot::default();
    let mut problems = Vec::new();
    snapshot.add_text(Path::new("/manifests/f.yaml"), text, &mut problems);
    check_problems(&problems)?;
    run_model(snapshot.clone());
    Ok(snapshot)
}

fn check_problems(problems: &[Problem]) -> Result<(), TestCaseError> {
    for p in problems {
        prop_assert!(!p.reason.trim().is_empty(), "{p:?}");
        prop_assert!(p.to_string().starts_with("Skipping manifest "), "{p}");
    }
    Ok(())
}

fn run_model(snapshot: Snapshot) {
    let mut t = Trackers::new();
    for input in snapshot.into_inputs() {
        t.record(input);
    }
    t.checkout();
    let mode = DetectLocalMode::ClusterCidr(vec![CLUSTER_CIDR.parse().unwrap()]);
    let policy = ProxyPolicy::new(false, &mode, t.state().node());
    let _ = desired(
        t.state(),
        &NodeContext::new(NODE, t.state().node()),
        &policy,
    );
}

/// Bytes that mean something to YAML or JSON.
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    ":", ": ", "- ", "{", "}", "[", "]", ",", "\"", "'", "&a ", "*a", "!!str ", "!!binary ", "!x ",
    "\t", "\n  ", "\n", "---\n", "--- ", "---", "...\n", "\0", "\u{feff}", "#", "|", ">",
    "%YAML 1.2\n", "? ", "<<: *a", "\\", "\r", "é", "kind: List\nitems:\n",
];

/// Scalars at the edges of what the objects' fields hold.
#[rustfmt::skip]
const ODD_VALUES: &[&str] = &[
    "", "~", "null", "-1", "0", "65536", "4294967296", "9223372036854775808",
    "18446744073709551616", "-9223372036854775809", "1e400", ".nan", ".inf", "0x50", "0o17",
    "1_000", "80.5", "[]", "{}", "[a, b]", "{a: 1}", "true", "yes", "None", "\"\"", "::",
    "::ffff:172.30.0.1", "01.2.3.4", "fe80::1%eth0", "1.2.3.4/33", "0.0.0.0/0", "300.1.1.1",
    "FQDN", "ServiceCIDR", "ExternalName", "Local", "ClientIP", "SCTP", "List", "\"\\u0000\"",
    "*undefined", "&a x", "'unterminated", "\"unterminated", "|", ">-", "? x", "- - -",
    "!!binary aGVsbG8=",
];

fn any_mutation() -> BoxedStrategy<Mutation> {
    mutations(TOKENS, ODD_VALUES)
}

fn mutated(seed: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut doc = SEEDS[seed].as_bytes().to_vec();
    for m in mutations {
        mutate(&mut doc, m);
    }
    doc
}

fn any_mutated_seed() -> impl Strategy<Value = (usize, Vec<Mutation>)> {
    (0..SEEDS.len(), prop::collection::vec(any_mutation(), 1..5))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_are_read_or_skipped(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_text(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn yaml_alphabet_text_is_read_or_skipped(
        text in "[a-zA-Z0-9 :,{}\\[\\]\\-\\n\"'&*!|>#%?@`~.\\t\\\\]{0,200}"
    ) {
        check_text(&text)?;
        check_text(&format!("apiVersion: v1\nkind: Service\n{text}"))?;
    }

    #[test]
    fn mutated_manifests_are_read_or_skipped((seed, ms) in any_mutated_seed()) {
        check_text(&String::from_utf8_lossy(&mutated(seed, &ms)))?;
    }
}

proptest! {
    // Each case writes a directory: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The whole source: a directory of mutated files (bytes as written, so some are not UTF-8
    /// and cannot be read: a problem for that file, not an error for the directory).
    #[test]
    fn a_directory_of_mutated_files_loads(files in prop::collection::vec(any_mutated_seed(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        for (i, (seed, ms)) in files.iter().enumerate() {
            let ext = ["yaml", "yml", "json"][i % 3];
            std::fs::write(dir.path().join(format!("f{i}.{ext}")), mutated(*seed, ms)).unwrap();
        }
        let (snapshot, problems) = load_dir(dir.path()).unwrap();
        check_problems(&problems)?;
        run_model(snapshot);
    }
}

/// Nesting far past serde-saphyr's depth budget (64) and serde_json's recursion limit (128), in
/// the forms YAML and JSON allow, at the top and inside objects: a problem, never a stack
/// overflow. Nested `kind: List`s are bounded the same way.
#[test]
fn deep_nesting_is_a_problem_not_a_stack_overflow() {
    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\n";
    for depth in [65, 129, 10_000, 100_000] {
        let block_depth = depth.min(2_000); // block nesting needs n^2 bytes of indentation
        let forms = [
            "[".repeat(depth) + &"]".repeat(depth),
            "[".repeat(depth),
            "{a: ".repeat(depth) + "1" + &"}".repeat(depth),
            "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth),
            "- ".repeat(depth) + "1",
            (0..block_depth)
                .map(|i| format!("{}a:\n", " ".repeat(i)))
                .collect(),
            r#"{"kind":"List","items":["#.repeat(depth) + &"]}".repeat(depth),
            "{kind: List, items: [".repeat(depth) + &"]}".repeat(depth),
        ];
        for deep in forms {
            for text in [
                deep.clone(),
                format!("{SVC}spec: {deep}\n"),
                format!("{SVC}spec:\n  ports: {deep}\n"),
                format!("{SVC}unknownField: {deep}\n"),
                format!("{SVC}---\n{deep}\n---\n{SVC}"),
            ] {
                let snapshot = check_text(&text).unwrap();
                if depth > 128 && text.starts_with(SVC) {
                    assert!(snapshot.services.len() <= 1);
                }
            }
        }
    }
}

/// The seeds are read whole (the broken Service of `broken.yaml` is the model's to skip), so
/// mutations start from objects that are read.
#[test]
fn the_seeds_are_read() {
    for (i, seed) in SEEDS.iter().enumerate() {
        let mut snapshot = Snapshot::default();
        let mut problems = Vec::new();
        snapshot.add_text(Path::new("seed.yaml"), seed, &mut problems);
        assert!(problems.is_empty(), "seed {i}: {problems:?}");
        let read = snapshot.services.len()
            + snapshot.slices.len()
            + snapshot.service_cidrs.len()
            + usize::from(snapshot.node.is_some());
        assert!(read > 0, "seed {i}");
    }
}

/// An alias bomb (a billion laughs) is refused by the YAML budget, not expanded.
#[test]
fn an_alias_bomb_is_a_problem() {
    let mut text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nx0: &a0 [x, x, x, x, x, x, x, x, x, x]\n".to_owned();
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!("x{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("spec: {clusterIP: 172.30.0.1, externalIPs: *a9}\n");
    let mut snapshot = Snapshot::default();
    let mut problems = Vec::new();
    snapshot.add_text(Path::new("bomb.yaml"), &text, &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(snapshot.services.is_empty());
}

/// Many documents in one file (serde-saphyr's own limit is per parse; we split first): each is
/// read, and the same object defined again is one problem each.
#[test]
fn a_storm_of_documents_is_read() {
    let one = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 172.30.0.1, ports: [{port: 80}]}\n";
    let text = vec![one; 5_000].join("---\n") + &"---\n".repeat(5_000);
    let snapshot = check_text(&text).unwrap();
    assert_eq!(snapshot.services.len(), 1);
}
