//! ARCHITECTURE.md's dependency invariants, checked against `cargo metadata`: the model does no
//! IO and knows no runtime; only the daemon wires crates together.

#![allow(clippy::unwrap_used)]
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Normal (non-dev) dependencies of each workspace crate, transitively.
fn closure() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| names[d["pkg"].as_str().unwrap()].clone())
            .collect();
        direct.insert(names[node["id"].as_str().unwrap()].clone(), deps);
    }
    let mut all = BTreeMap::new();
    for krate in direct.keys().filter(|k| k.starts_with("kpr-")) {
        let mut seen = BTreeSet::new();
        let mut stack = direct[krate].clone();
        while let Some(d) = stack.pop() {
            if seen.insert(d.clone()) {
                stack.extend(direct.get(&d).cloned().unwrap_or_default());
            }
        }
        all.insert(krate.clone(), seen);
    }
    all
}

#[test]
fn the_model_does_no_io_and_knows_no_runtime() {
    let deps = closure();
    let model = &deps["kpr-model"];
    for banned in [
        "tokio",
        "kube",
        "kube-client",
        "hyper",
        "reqwest",
        "mio",
        "tracing",
        "kpr-watch",
        "kpr-config",
        "kpr-daemon",
    ] {
        assert!(
            !model.contains(banned),
            "kpr-model must not depend on {banned}"
        );
    }
}

#[test]
fn only_the_daemon_wires_crates_together() {
    let deps = closure();
    for (krate, d) in &deps {
        if krate != "kpr-daemon" {
            assert!(!d.contains("kpr-daemon"), "{krate} depends on the daemon");
        }
        if krate != "kpr-testkit" {
            assert!(
                !d.contains("kpr-testkit"),
                "{krate} has the dev-only test kit as a normal dependency"
            );
        }
    }
    assert!(
        !deps["kpr-config"].iter().any(|d| d.starts_with("kpr-")),
        "config is a leaf"
    );
    assert!(!deps["kpr-config"].contains("tokio"), "config is pure");
}
