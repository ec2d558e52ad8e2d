//! ARCHITECTURE.md's dependency invariants, checked against `cargo metadata`: the model does no
//! IO and knows no runtime; only the daemon wires crates together; and, from the sources, no
//! two modules of a crate import each other.

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
    // What ships (crates/) never needs a dev-only crate (dev/: the test API server, the
    // benchmarks, the test kit) to build.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let dev = names("dev");
    assert!(dev.contains("kpr-testkit") && dev.contains("kpr-apiserver"));
    for shipped in names("crates") {
        for d in &deps[&shipped] {
            assert!(
                !dev.contains(d),
                "{shipped} ships but depends on the dev-only {d}"
            );
        }
    }
    assert!(
        !deps["kpr-config"].iter().any(|d| d.starts_with("kpr-")),
        "config is a leaf"
    );
    assert!(!deps["kpr-config"].contains("tokio"), "config is pure");
}

/// The top-level modules each `use crate::…` in one crate's sources (test modules and
/// comments left out).
fn module_imports(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    // Modules declared `#[cfg(test)] mod name;` are tests: they may use anything.
    let mut test_only = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for w in lines.windows(2) {
            if w[0].trim() == "#[cfg(test)]"
                && let Some(name) = w[1].trim().strip_prefix("mod ")
                && let Some(name) = name.strip_suffix(';')
            {
                test_only.insert(name.to_owned());
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let top = rel.iter().next().unwrap().to_string_lossy().into_owned();
        if ["lib", "main"].contains(&top.as_str())
            || rel
                .iter()
                .any(|c| test_only.contains(c.to_string_lossy().as_ref()))
        {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for part in line.split("crate::").skip(1) {
                let module: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                if !module.is_empty() && module != top {
                    graph.entry(top.clone()).or_default().insert(module);
                }
            }
        }
    }
    graph
}

/// Modules depend on each other one way: no two modules of a crate import each other, directly
/// or through others (each module can be read knowing only what it imports).
#[test]
fn no_module_import_circles_in_any_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut circles = Vec::new();
    let dirs = ["crates", "dev"].map(|d| std::fs::read_dir(root.join(d)).unwrap());
    for e in dirs.into_iter().flatten() {
        let src = e.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let graph = module_imports(&src);
        for start in graph.keys() {
            // Depth-first from each module: reaching it again is a circle.
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            while let Some((at, path)) = stack.pop() {
                for next in graph.get(&at).into_iter().flatten() {
                    if next == start {
                        circles.push(format!("{}: {}", src.display(), path.join(" -> ")));
                    } else if !path.contains(next) && path.len() < 6 {
                        let mut p = path.clone();
                        p.push(next.clone());
                        stack.push((next.clone(), p));
                    }
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "module import circles:\n{}",
        circles.join("\n")
    );
}
