//! Decoding tests: multi-document YAML, JSON, lists, defaults, duplicates and broken documents.

use super::*;

fn load(text: &str) -> (Snapshot, Vec<Problem>) {
    let mut s = Snapshot::default();
    let mut p = Vec::new();
    s.add_text(Path::new("f.yaml"), text, &mut p);
    (s, p)
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 172.30.0.1, ports: [{port: 80}]}\n";

#[test]
fn multi_document_yaml_with_comments_and_other_kinds() {
    let text = format!(
        "# header\n---\n{SVC}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n--- # trailing\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n...\n"
    );
    let (s, p) = load(&text);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(s.services.len(), 1);
    assert_eq!(s.node.unwrap().metadata.name.as_deref(), Some("n1"));
}

#[test]
fn json_and_lists_are_read() {
    let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"s","namespace":"ns"},"addressType":"IPv4","endpoints":[]}]}"#;
    let (s, p) = load(json);
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(s.slices.len(), 1);
}

#[test]
fn a_missing_namespace_means_default() {
    let (s, _) =
        load("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 172.30.0.1}\n");
    let svc = s.services.values().next().unwrap();
    assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
}

#[test]
fn a_broken_document_costs_only_itself() {
    let text = format!(
        "{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: b, namespace: ns}}\nspec: {{clusterIP: 172.30.0.2, ports: [{{port: \"abc\"}}]}}\n---\nkey: [unclosed\n---\n{}",
        SVC.replace("name: a", "name: c")
    );
    let (s, p) = load(&text);
    // b decodes (a port that is not a number reads as absent) and the model skips it with one
    // line of its own; only the document that is not YAML at all is a decoding problem.
    assert_eq!(s.services.len(), 3, "a, b and c are read");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].to_string().contains("not valid YAML"), "{}", p[0]);
    assert!(p[0].to_string().contains("document 3"), "{}", p[0]);
    let mut trackers = kpr_model::Trackers::new();
    let skipped: Vec<String> = s
        .into_inputs()
        .into_iter()
        .flat_map(|i| trackers.record(i))
        .map(|s| s.to_string())
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(
        skipped[0].contains("Service ns/b") && skipped[0].contains("missing port"),
        "{}",
        skipped[0]
    );
}

#[test]
fn the_same_object_twice_warns_and_the_later_wins() {
    let (s, p) = load(&format!(
        "{SVC}---\n{}",
        SVC.replace("172.30.0.1", "172.30.0.2")
    ));
    assert_eq!(p.len(), 1);
    assert!(p[0].reason.contains("later definition wins"));
    let spec = s.services.values().next().unwrap().spec.clone().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("172.30.0.2"));
}

#[test]
fn hostile_input_does_not_panic() {
    for text in [
        "{",
        "[1,2",
        "a: &a [*a]",
        "- - - - - -",
        "\u{0}",
        "apiVersion: v1\nkind: Service\nmetadata: 7\n",
    ] {
        let _ = load(text);
    }
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let _ = load(&deep);
}
