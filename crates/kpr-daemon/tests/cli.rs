//! The binary as an operator runs it: configuration errors exit 1 with one clear message,
//! kubeadm's config.conf is accepted unchanged, `--write-config-to` round-trips, and
//! `--dry-run` on the example manifests prints the desired state (snapshot) while skipping the
//! one broken object with one log line.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn kpr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .args(args)
        .current_dir(repo())
        .env_remove("NODE_NAME")
        .output()
        .unwrap()
}

/// `--dry-run` on the example manifests as this node, with extra flags.
fn dry_run_examples(extra: &[&str]) -> Output {
    let base = [
        "--manifests",
        "examples/manifests",
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        "10.0.0.0/8",
        "--dry-run",
    ];
    kpr(&[&base[..], extra].concat())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn unsupported_modes_fail_with_one_clear_message_and_exit_1() {
    for args in [
        &["--proxy-mode", "ipvs"][..],
        &["--proxy-mode=kernelspace"][..],
    ] {
        let out = kpr(&[args, &["--manifests", "examples/manifests", "--dry-run"]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("mode") && err.contains("\"iptables\"") && err.contains("\"nftables\""),
            "{err}"
        );
        assert!(
            out.stdout.is_empty(),
            "nothing computed or printed: {}",
            text(&out.stdout)
        );
    }
}

#[test]
fn a_config_with_mode_bogus_fails_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: bogus\n",
    )
    .unwrap();
    let out = kpr(&[
        "--config",
        cfg.to_str().unwrap(),
        "--manifests",
        "examples/manifests",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("KubeProxyConfiguration.mode") && err.contains("bogus"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn kubeadm_config_is_accepted_unchanged_and_write_config_to_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.yaml");
    let second = dir.path().join("second.yaml");
    let out = kpr(&[
        "--config",
        "examples/kubeadm/config.conf",
        "--write-config-to",
        first.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("lenient"),
        "strict decoding succeeds: {}",
        text(&out.stderr)
    );
    let out = kpr(&[
        "--config",
        first.to_str().unwrap(),
        "--write-config-to",
        second.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (a, b) = (
        std::fs::read_to_string(&first).unwrap(),
        std::fs::read_to_string(&second).unwrap(),
    );
    assert_eq!(
        a, b,
        "the written configuration reads back to the same values"
    );
    assert!(
        a.contains("clusterCIDR: 10.244.0.0/16") && a.contains("syncPeriod: 30s"),
        "{a}"
    );

    let out = kpr(&[
        "--config",
        "examples/kubeadm/config.conf",
        "--hostname-override",
        "node-a",
        "--manifests",
        "examples/manifests",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn version_prints_ours() {
    let out = kpr(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("kube-proxy-rs v{}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn no_source_is_a_clear_error() {
    let out = kpr(&["--hostname-override", "node-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--manifests"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn dry_run_on_the_examples_prints_the_desired_state_and_skips_the_broken_object() {
    let out = dry_run_examples(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let skipped: Vec<&str> = stderr.lines().filter(|l| l.starts_with('W')).collect();
    assert_eq!(
        skipped.len(),
        1,
        "exactly one warning, for the broken object: {stderr}"
    );
    insta::assert_snapshot!("dry_run_examples", stdout);
}

/// The long-running mode follows the manifest directory and stops cleanly on SIGTERM. It runs
/// in a network namespace of its own: the proxy programs the namespace it runs in, and the
/// network safety rule keeps tests out of the machine's.
#[test]
fn running_follows_the_directory_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let Some(mut lab) = kpr_testkit::lab::Lab::new("cli-running") else {
        return;
    };
    let ns = lab.netns("node");
    let dir = tempfile::tempdir().unwrap();
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 172.30.0.1, ports: [{name: p, port: 80}]}\n";
    std::fs::write(dir.path().join("a.yaml"), svc).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_kube-proxy-rs")])
        .args([
            "--proxy-mode",
            "nftables",
            "--manifests",
            dir.path().to_str().unwrap(),
            "--hostname-override",
            "node-a",
            "--iptables-min-sync-period",
            "0s",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut wait_for = |needle: &str| -> String {
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the process ended before logging {needle:?}");
    };
    let first = wait_for("Synced nftables rules");
    assert!(
        first.contains("full=true") && first.contains("IPv4=1"),
        "{first}"
    );
    std::fs::write(
        dir.path().join("b.yaml"),
        svc.replace("name: a,", "name: b,")
            .replace("172.30.0.1", "172.30.0.2"),
    )
    .unwrap();
    let second = wait_for("Synced nftables rules");
    assert!(
        second.contains("full=false")
            && second.contains("changed_services=1")
            && second.contains("IPv4=2"),
        "{second}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("Shutting down");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The whole nftables ruleset for the example cluster, as `--dry-run` prints it (snapshot).
#[test]
fn dry_run_prints_the_nftables_ruleset_of_the_examples() {
    let out = dry_run_examples(&["--proxy-mode", "nftables"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let ruleset = stdout
        .split("# the nftables ruleset")
        .nth(1)
        .expect("a ruleset section");
    insta::assert_snapshot!("dry_run_nftables_ruleset", ruleset);
}

/// Issue 14: `explain` offline on the example manifests answers in text and JSON; bad input
/// exits 2 with a message naming the field, an unreachable proxy exits 1, nothing panics.
#[test]
fn explain_offline_answers_and_refuses_bad_input() {
    let offline = [
        "--manifests",
        "examples/manifests",
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        "10.0.0.0/8",
        "--proxy-mode",
        "nftables",
    ];
    let explain = |q: &[&str]| kpr(&[&["explain"][..], q, &offline[..]].concat());
    let out = explain(&["--from", "203.0.113.7", "--to", "192.168.0.2:30081"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer = text(&out.stdout);
    assert!(
        answer.contains("Frontend: NodePort 192.168.0.2:30081 of shop/frontend:http"),
        "{answer}"
    );
    assert!(answer.contains("not on this node"), "{answer}");
    let out = explain(&["--from=10.0.0.5", "--to=172.30.0.10:80", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"]["action"], "DNAT");
    assert_eq!(v["verdict"]["targets"].as_array().map(Vec::len), Some(3));
    for (q, says) in [
        (&["--from", "10.0.0.5"][..], "--to"),
        (&["--to", "172.30.0.10"][..], "to:"),
        (
            &["--to", "172.30.0.10:70000", "--from", "10.0.0.5"][..],
            "to:",
        ),
        (
            &[
                "--to",
                "172.30.0.10:80",
                "--from",
                "10.0.0.5",
                "--proto",
                "icmp",
            ][..],
            "proto",
        ),
        (
            &["--to", "172.30.0.10:80", "--from", "10.0.0.999"][..],
            "from",
        ),
        (
            &["--to", "172.30.0.10:80", "--from", "10.0.0.5", "-o", "yaml"][..],
            "--output",
        ),
    ] {
        let out = explain(q);
        assert_eq!(out.status.code(), Some(2), "{q:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(says),
            "{q:?}: {}",
            text(&out.stderr)
        );
    }
    // Live mode against a port where nothing listens: cannot reach the proxy.
    let out = kpr(&[
        "explain",
        "--to",
        "172.30.0.10:80",
        "--from",
        "10.0.0.5",
        "--server",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot ask the proxy"));
}

/// Issue 14: `explain --master URL` lists the cluster from the API server (the test API server
/// on 127.0.0.1) and answers offline, programming nothing.
#[test]
fn explain_offline_from_the_api_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = rt
        .block_on(kpr_apiserver::ApiServer::start(
            kpr_apiserver::Options::default(),
        ))
        .unwrap();
    let json = |v: serde_json::Value| v;
    api.apply(json(kpr_testkit::odd::node("node-a", "192.168.0.2")));
    api.apply(kpr_testkit::odd::service(
        "default",
        "odd",
        "172.30.0.9",
        80,
    ));
    api.apply(kpr_testkit::odd::slice(
        "default",
        "odd",
        &["10.0.0.11", "10.0.0.12"],
        "node-a",
        8080,
    ));
    let out = kpr(&[
        "explain",
        "--from",
        "10.0.0.5",
        "--to",
        "172.30.0.9:80",
        "-o",
        "json",
        "--master",
        &api.url(),
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        "10.0.0.0/8",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["frontend"]["servicePort"], "default/odd:p");
    let targets: Vec<&str> = v["verdict"]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["endpoint"].as_str())
        .collect();
    assert_eq!(targets, ["10.0.0.11:8080", "10.0.0.12:8080"]);
    assert!(v.get("kernel").is_none(), "offline: no kernel section");
}
