//! The install paths (issue "monitoring and packaging", part 3), each tried the way an operator
//! takes it:
//!
//! - completions and man pages: `kube-proxy-rs completions bash|zsh|fish` and `kube-proxy-rs
//!   man` name every visible flag of the daemon and of each subcommand; the subcommands'
//!   declarations agree with their hand-written usage texts; bash really completes flags,
//!   subcommands and values; groff renders every page without a warning.
//! - kustomize: `deploy/kubernetes` (the base, the same objects as `kube-proxy-rs.yaml`) and
//!   the overlays `deploy/overlays/{nftables,iptables,socket-lb}` render with `kubectl
//!   kustomize`, each ConfigMap's configuration passes our decoder in its mode and differs from
//!   the base in the mode only (socket-lb's DaemonSet: privileged, `--socket-lb`, the host's
//!   cgroup v2 hierarchy and bpffs mounted), and `kubectl apply --dry-run=client -k` accepts every one against a discovery
//!   stub on 127.0.0.1 (kubectl needs an API server's discovery even for a client dry run).
//! - the Debian package: `scripts/build-deb.sh` packages this test's binary; `dpkg --root`
//!   installs it into a throwaway root (never the machine's), the files, modes, conffile and
//!   control fields are checked, the installed binary answers `--version`/`--help`, resolves the
//!   installed configuration and dry-runs the unit's own command line; `systemd-analyze verify
//!   --root` accepts the installed unit without a warning; the installed proxy, started with the
//!   unit's command line inside a network namespace this test creates, programs its table and
//!   `kube-proxy-rs verify` finds the kernel equal to what it committed; `dpkg -r` and `--purge`
//!   remove it all, the maintainer scripts honouring DPKG_ROOT.
//!
//! What a machine lacks is skipped with a loud SKIPPED line naming the package: kubectl (Debian:
//! kubernetes-client), root (dpkg into a root directory, network namespaces), systemd
//! (systemd-analyze), groff, zsh, fish.
#![allow(clippy::unwrap_used)]

use clap::CommandFactory;
use kpr_config::{Flags, resolve_with};
use kpr_daemon::commands;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn has(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

// ---------------------------------------------------------------------------------------
// Completions and man pages

/// The visible long flags of a command (its own, not its subcommands').
fn longs(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect()
}

fn hidden_longs(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter(|a| a.is_hide_set())
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect()
}

/// Whether `text` names `word` as a whole word (`--from` is not named by `--from-node`).
fn names(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        !text[i + word.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// How a shell's script spells a long flag: fish declares `-l name`, the others `--name`.
fn spelled(shell: &str, flag: &str) -> String {
    match shell {
        "fish" => format!("-l {}", &flag[2..]),
        _ => flag.to_owned(),
    }
}

/// Roff with its escapes undone far enough to search for flags (`\-` is a hyphen).
fn unroff(roff: &str) -> String {
    roff.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
}

#[test]
fn completions_and_man_pages_name_every_flag() {
    let mut cmd = commands::command();
    cmd.build();
    // Every visible flag of the parser itself, none of its hidden ones.
    let mut parser = Flags::command();
    parser.build();
    let top = longs(&parser);
    let hidden = hidden_longs(&parser);
    assert!(top.len() > 50, "the daemon's flags: {top:?}");
    assert!(hidden.contains("--ipvs-scheduler"), "{hidden:?}");
    assert_eq!(longs(&cmd), top);
    for flag in [
        "--config",
        "--proxy-mode",
        "--hostname-override",
        "--manifests",
    ] {
        assert!(top.contains(flag), "{flag}");
    }
    let subs: BTreeMap<String, BTreeSet<String>> = cmd
        .get_subcommands()
        .map(|s| (s.get_name().to_owned(), longs(s)))
        .collect();
    assert_eq!(
        subs.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "completions",
            "conntrack",
            "explain",
            "man",
            "sandbox",
            "verify"
        ]
    );

    for shell in ["bash", "zsh", "fish"] {
        let script = ok(Command::new(BIN).args(["completions", shell]));
        for flag in &top {
            assert!(names(&script, &spelled(shell, flag)), "{shell}: {flag}");
        }
        for (sub, flags) in &subs {
            assert!(names(&script, sub), "{shell}: {sub}");
            for flag in flags {
                assert!(
                    names(&script, &spelled(shell, flag)),
                    "{shell}: {sub} {flag}"
                );
            }
        }
        // Hidden compatibility flags (ipvs) are accepted but never offered.
        for flag in &hidden {
            assert!(
                !names(&script, &spelled(shell, flag)),
                "{shell} offers {flag}"
            );
        }
    }
    for shell in ["elvish", "powershell"] {
        assert!(ok(Command::new(BIN).args(["completions", shell])).contains("--proxy-mode"));
    }
    let bad = run(Command::new(BIN).args(["completions", "tcsh"]));
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tcsh"));

    // `man` prints kube-proxy-rs(8); `man --dir` writes it and one page per subcommand.
    let page = ok(Command::new(BIN).arg("man"));
    let text = unroff(&page);
    assert!(text.contains(".TH kube-proxy-rs 8"), "{page}");
    for flag in &top {
        assert!(names(&text, flag), "man page: {flag}");
    }
    for flag in &hidden {
        assert!(!names(&text, flag), "man page documents {flag}");
    }
    for section in [
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "SUBCOMMANDS",
        "FILES",
        "EXIT STATUS",
        "SEE ALSO",
    ] {
        assert!(
            page.contains(&format!(".SH {section}"))
                || page.contains(&format!(".SH \"{section}\"")),
            "section {section}"
        );
    }
    assert!(text.contains("/etc/kube-proxy-rs/kube-proxy-config.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let listed = ok(Command::new(BIN).args(["man", "--dir"]).arg(dir.path()));
    let mut written: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    let mut want: Vec<String> = std::iter::once("kube-proxy-rs.8".to_owned())
        .chain(subs.keys().map(|s| format!("kube-proxy-rs-{s}.8")))
        .collect();
    want.sort();
    assert_eq!(written, want);
    assert_eq!(listed.lines().count(), want.len());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("kube-proxy-rs.8")).unwrap(),
        page,
        "`man` prints the page `man --dir` writes"
    );
    for (sub, flags) in &subs {
        let p = unroff(
            &std::fs::read_to_string(dir.path().join(format!("kube-proxy-rs-{sub}.8"))).unwrap(),
        );
        assert!(p.contains(&format!("kube-proxy-rs-{sub}")), "{sub}");
        for flag in flags {
            assert!(names(&p, flag), "kube-proxy-rs-{sub}(8): {flag}");
        }
    }

    // groff renders every page without a warning (-ww: all of them).
    if has("groff", "--version") {
        for name in &want {
            let out = run(Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(dir.path().join(name)));
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "groff {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rendered = ok(Command::new("groff")
            .args(["-man", "-Tascii", "-P-cbou"])
            .arg(dir.path().join("kube-proxy-rs.8")));
        assert!(rendered.contains("--proxy-mode"), "{rendered}");
    } else {
        eprintln!("SKIPPED: rendering the man pages needs groff (apt-get install groff-base)");
    }
}

/// The subcommands parse their own arguments by hand; their clap declarations (for completion
/// and the pages only) name exactly the flags their usage texts name.
#[test]
fn subcommand_declarations_match_their_usage_texts() {
    let mut cmd = commands::command();
    cmd.build();
    for name in ["explain", "verify", "conntrack"] {
        let out = run(Command::new(BIN).args([name, "--help"]));
        let usage = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(usage.contains("usage: kube-proxy-rs"), "{name}: {usage}");
        let named: BTreeSet<String> = usage
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect();
        let sub = cmd.find_subcommand(name).unwrap();
        let declared = longs(sub);
        for flag in &named {
            assert!(
                declared.contains(flag),
                "{name}: usage names {flag}, not declared"
            );
        }
        // Every flag of its own (not the proxy's flags explain passes on) is in the usage.
        for arg in sub
            .get_arguments()
            .filter(|a| a.get_help_heading().is_none())
        {
            if let Some(long) = arg.get_long().filter(|l| *l != "help") {
                assert!(
                    named.contains(&format!("--{long}")),
                    "{name}: --{long} not in its usage"
                );
            }
        }
    }
}

/// Bash itself completes with the generated script: flags, subcommands, values.
#[test]
fn bash_completes_flags_subcommands_and_values() {
    if !has("bash", "--version") {
        eprintln!("SKIPPED: bash_completes_flags_subcommands_and_values needs bash");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("kube-proxy-rs.bash");
    std::fs::write(&script, ok(Command::new(BIN).args(["completions", "bash"]))).unwrap();
    let complete = |words: &str| -> Vec<String> {
        let line = format!(
            r#"source {script}
words=({words})
COMP_WORDS=("${{words[@]}}"); COMP_CWORD=$(( ${{#words[@]}} - 1 ))
_kube__proxy__rs kube-proxy-rs "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
            script = script.display()
        );
        ok(Command::new("bash").args(["--norc", "-c", &line]))
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let has_all = |words: &str, want: &[&str]| {
        let got = complete(words);
        for w in want {
            assert!(
                got.iter().any(|g| g == w),
                "`{words}` completes to {got:?}, not {w}"
            );
        }
    };
    has_all("kube-proxy-rs --proxy-m", &["--proxy-mode"]);
    has_all("kube-proxy-rs --hostname", &["--hostname-override"]);
    has_all("kube-proxy-rs ex", &["explain"]);
    has_all(
        "kube-proxy-rs ''",
        &[
            "explain",
            "verify",
            "conntrack",
            "completions",
            "man",
            "sandbox",
        ],
    );
    has_all("kube-proxy-rs explain --fr", &["--from", "--from-node"]);
    has_all("kube-proxy-rs explain --proto ''", &["tcp", "udp", "sctp"]);
    has_all("kube-proxy-rs explain --proxy", &["--proxy-mode"]);
    has_all("kube-proxy-rs verify -o ''", &["text", "json"]);
    has_all("kube-proxy-rs completions ''", &["bash", "zsh", "fish"]);
}

/// zsh and fish read their scripts without a syntax error, where installed.
#[test]
fn zsh_and_fish_scripts_parse() {
    for (shell, check) in [("zsh", vec!["-n"]), ("fish", vec!["--no-execute"])] {
        if !has(shell, "--version") {
            eprintln!(
                "SKIPPED: checking the {shell} completions' syntax needs {shell} (apt-get install {shell})"
            );
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("script");
        std::fs::write(&file, ok(Command::new(BIN).args(["completions", shell]))).unwrap();
        ok(Command::new(shell).args(&check).arg(&file));
    }
}

// ---------------------------------------------------------------------------------------
// kustomize

/// kubectl, or a loud SKIPPED.
fn kubectl() -> Option<&'static str> {
    let client = Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    if client.is_ok_and(|o| o.status.success()) {
        return Some("kubectl");
    }
    eprintln!(
        "SKIPPED: the kustomize overlays need kubectl (Debian: apt-get install kubernetes-client; scripts/test.sh installs it when no kubectl is there)"
    );
    None
}

/// YAML documents as JSON values (comments and empty documents dropped).
fn documents(text: &str) -> Vec<Value> {
    text.split("\n---")
        .map(|d| d.trim().trim_start_matches("---").trim())
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

fn by_kind(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .map(|d| {
            (
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                ),
                d.clone(),
            )
        })
        .collect()
}

/// The ConfigMap's configuration, resolved by our own decoder (no warning allowed).
fn config_of(objects: &BTreeMap<String, Value>) -> kpr_config::Resolved {
    let text = objects["ConfigMap/kube-proxy-rs"]["data"]["config.conf"]
        .as_str()
        .unwrap();
    let flags = Flags::try_parse_args(["kube-proxy-rs"]).unwrap();
    let r = resolve_with(&flags, Some(text)).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    r
}

/// A tiny API server's discovery for the five kinds the manifests hold, and 404 for every
/// object (kube-system exists): what `kubectl apply --dry-run=client` asks before printing
/// "created (dry run)". Serves on 127.0.0.1 only; records each request's path.
fn discovery_stub() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || serve(conn, &log));
        }
    });
    (port, seen)
}

fn serve(conn: TcpStream, log: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        let path = request
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_owned();
        log.lock().unwrap().push(path.clone());
        let (status, body) = match discovery(&path) {
            Some(v) => ("200 OK", v.to_string()),
            None => (
                "404 Not Found",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": format!("{path} not found")})
                .to_string(),
            ),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn discovery(path: &str) -> Option<Value> {
    let group = |name: &str| {
        let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
        json!({"name": name, "versions": [gv], "preferredVersion": gv})
    };
    let resource = |name: &str, kind: &str, namespaced: bool| {
        json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
               "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
    };
    let list = |gv: &str, resources: Vec<Value>| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources});
    Some(match path {
        "/version" => json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0"}),
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1",
                          "groups": [group("apps"), group("rbac.authorization.k8s.io")]}),
        "/api/v1" => list(
            "v1",
            vec![
                resource("configmaps", "ConfigMap", true),
                resource("namespaces", "Namespace", false),
                resource("serviceaccounts", "ServiceAccount", true),
            ],
        ),
        "/apis/apps/v1" => list("apps/v1", vec![resource("daemonsets", "DaemonSet", true)]),
        "/apis/rbac.authorization.k8s.io/v1" => list(
            "rbac.authorization.k8s.io/v1",
            vec![
                resource("clusterroles", "ClusterRole", false),
                resource("clusterrolebindings", "ClusterRoleBinding", false),
            ],
        ),
        "/api/v1/namespaces/kube-system" => json!({"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": "kube-system"}, "status": {"phase": "Active"}}),
        _ => return None,
    })
}

#[test]
fn kustomize_base_and_overlays_render_and_pass_a_client_dry_run() {
    let Some(kubectl) = kubectl() else {
        return;
    };
    let root = repo();
    let plain = by_kind(&documents(
        &std::fs::read_to_string(root.join("deploy/kubernetes/kube-proxy-rs.yaml")).unwrap(),
    ));
    let base_config = config_of(&plain);
    let (port, seen) = discovery_stub();
    let home = tempfile::tempdir().unwrap();
    let kubectl_cmd = || {
        let mut c = Command::new(kubectl);
        c.current_dir(&root)
            .env("HOME", home.path())
            .env("KUBECONFIG", home.path().join("no-kubeconfig"))
            .arg(format!("--server=http://127.0.0.1:{port}"))
            .arg(format!(
                "--cache-dir={}",
                home.path().join("cache").display()
            ))
            .arg("--request-timeout=30s");
        c
    };

    for (dir, mode) in [
        ("deploy/kubernetes", "nftables"),
        ("deploy/overlays/nftables", "nftables"),
        ("deploy/overlays/iptables", "iptables"),
        ("deploy/overlays/socket-lb", "nftables"),
    ] {
        let out = run(kubectl_cmd().args(["kustomize", dir]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl kustomize {dir}: {stderr}");
        // Newer kubectl warns that kubectl 1.20's fields are deprecated; nothing else.
        for line in stderr.lines() {
            assert!(
                line.starts_with("# Warning:") && line.contains("deprecated"),
                "{dir}: {line}"
            );
        }
        let rendered = by_kind(&documents(&String::from_utf8_lossy(&out.stdout)));
        assert_eq!(
            rendered.keys().collect::<Vec<_>>(),
            plain.keys().collect::<Vec<_>>(),
            "{dir}: the objects of kube-proxy-rs.yaml"
        );
        let socket_lb = dir.ends_with("socket-lb");
        for (key, object) in &rendered {
            if key == "DaemonSet/kube-proxy-rs" && socket_lb {
                // The base's DaemonSet, privileged, with --socket-lb and the host's cgroup v2
                // hierarchy and bpffs mounted.
                let c = &object["spec"]["template"]["spec"]["containers"][0];
                let command: Vec<&str> = c["command"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                assert!(command.contains(&"--socket-lb"), "{command:?}");
                let flags = Flags::try_parse_args(&command).unwrap();
                assert_eq!(flags.socket_lb, Some(true));
                let cgroup = flags.socket_lb_cgroup.unwrap();
                let mounts = c["volumeMounts"].to_string();
                assert!(mounts.contains(&*cgroup.to_string_lossy()), "{mounts}");
                assert!(mounts.contains("/sys/fs/bpf"), "{mounts}");
                assert_eq!(c["securityContext"]["privileged"], true);
                let base = &plain[key]["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(c["image"], base["image"]);
                assert_eq!(c["env"], base["env"]);
            } else if key != "ConfigMap/kube-proxy-rs" {
                assert_eq!(object, &plain[key], "{dir}: {key} as in kube-proxy-rs.yaml");
            }
        }
        let config = config_of(&rendered);
        assert_eq!(config.proxy.mode.as_str(), mode, "{dir}");
        let mut same_mode = config.file_config.clone();
        same_mode.mode = base_config.file_config.mode.clone();
        assert_eq!(
            same_mode, base_config.file_config,
            "{dir}: only the mode differs from the base"
        );

        seen.lock().unwrap().clear();
        let out =
            run(kubectl_cmd().args(["apply", "--dry-run=client", "--validate=false", "-k", dir]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl apply -k {dir}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for object in [
            "serviceaccount/kube-proxy-rs",
            "clusterrole.rbac.authorization.k8s.io/system:kube-proxy-rs",
            "clusterrolebinding.rbac.authorization.k8s.io/system:kube-proxy-rs",
            "configmap/kube-proxy-rs",
            "daemonset.apps/kube-proxy-rs",
        ] {
            assert!(
                stdout.contains(&format!("{object} created (dry run)")),
                "{dir}: {object}\n{stdout}"
            );
        }
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|p| p == "/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy-rs"),
            "kubectl asked the stub for the DaemonSet"
        );
    }
    // The single file applies the same way.
    let out = ok(kubectl_cmd().args([
        "apply",
        "--dry-run=client",
        "--validate=false",
        "-f",
        "deploy/kubernetes/kube-proxy-rs.yaml",
    ]));
    assert_eq!(out.matches("created (dry run)").count(), 5, "{out}");
}

// ---------------------------------------------------------------------------------------
// The Debian package

const UNIT: &str = "lib/systemd/system/kube-proxy-rs.service";
const CONFIG: &str = "etc/kube-proxy-rs/kube-proxy-config.yaml";

fn build_deb(out: &Path) -> PathBuf {
    let printed = ok(Command::new("bash")
        .arg(repo().join("scripts/build-deb.sh"))
        .args(["--binary", BIN, "--compress", "gzip", "--out"])
        .arg(out));
    let deb = PathBuf::from(printed.lines().last().unwrap());
    assert!(deb.is_file(), "{printed}");
    deb
}

/// `dpkg --root=ROOT ARGS` for a throwaway root: scripts run on the host with DPKG_ROOT set
/// (the root has no shell to chroot into), and the root has no libc6 to satisfy Depends.
fn dpkg(root: &Path, args: &[&str]) -> String {
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args))
}

/// The unit's ExecStart arguments with absolute paths moved into `root`.
fn exec_start(root: &Path) -> Vec<String> {
    let unit = std::fs::read_to_string(root.join(UNIT)).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    line.split_whitespace()
        .map(|a| match a.split_once("=/") {
            Some((flag, path)) if flag.starts_with("--") => {
                format!("{flag}={}", root.join(path).display())
            }
            None if a.starts_with('/') => root.join(&a[1..]).display().to_string(),
            _ => a.to_owned(),
        })
        .collect()
}

#[test]
fn the_deb_installs_into_a_throwaway_root_verifies_runs_and_removes() {
    if !has("dpkg-deb", "--version") {
        eprintln!("SKIPPED: the Debian package needs dpkg-deb (package dpkg)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(tmp.path());
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        deb.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("kube-proxy-rs_{version}_")),
        "{}",
        deb.display()
    );

    // Control fields and the file list, as dpkg-deb reads them.
    let info = ok(Command::new("dpkg-deb").args(["--field"]).arg(&deb));
    for field in [
        "Package: kube-proxy-rs".to_owned(),
        format!("Version: {version}"),
        "Recommends: nftables, iptables".to_owned(),
    ] {
        assert!(info.contains(&field), "{field}\n{info}");
    }
    let depends = info.lines().find(|l| l.starts_with("Depends:")).unwrap();
    assert!(depends.contains("libc6"), "{depends}");
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let mode_of = |path: &str| -> String {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!("./{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"));
        assert!(line.contains("root/root"), "{line}");
        line.split_whitespace().next().unwrap().to_owned()
    };
    assert_eq!(mode_of("usr/bin/kube-proxy-rs"), "-rwxr-xr-x");
    for path in [
        UNIT,
        CONFIG,
        "usr/share/man/man8/kube-proxy-rs.8.gz",
        "usr/share/man/man8/kube-proxy-rs-explain.8.gz",
        "usr/share/bash-completion/completions/kube-proxy-rs",
        "usr/share/zsh/vendor-completions/_kube-proxy-rs",
        "usr/share/fish/vendor_completions.d/kube-proxy-rs.fish",
        "usr/share/doc/kube-proxy-rs/copyright",
    ] {
        assert_eq!(mode_of(path), "-rw-r--r--", "{path}");
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .args(["--info"])
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), format!("/{CONFIG}"));

    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let installed = is_root();
    if installed {
        dpkg(&root, &["--install", deb.to_str().unwrap()]);
        let status = dpkg(&root, &["--status", "kube-proxy-rs"]);
        assert!(status.contains("Status: install ok installed"), "{status}");
        assert!(
            status.contains(&format!("/{CONFIG}")),
            "conffile recorded: {status}"
        );
    } else {
        eprintln!(
            "SKIPPED (needs root): dpkg --root install and removal, the maintainer scripts and the run in a network namespace; checking the unpacked files only"
        );
        ok(Command::new("dpkg-deb")
            .arg("--extract")
            .arg(&deb)
            .arg(&root));
    }

    // The files: what the repository's deploy/ holds, and what the binary generates.
    let bin = root.join("usr/bin/kube-proxy-rs");
    let repo = repo();
    assert_eq!(
        std::fs::read(root.join(CONFIG)).unwrap(),
        std::fs::read(repo.join("deploy/systemd/kube-proxy-config.yaml")).unwrap()
    );
    let unit = std::fs::read_to_string(root.join(UNIT)).unwrap();
    let repo_unit =
        std::fs::read_to_string(repo.join("deploy/systemd/kube-proxy-rs.service")).unwrap();
    let pick = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        pick(&unit),
        pick(
            &repo_unit
                .replace("ExecStart=/usr/local/bin/", "ExecStart=/usr/bin/")
                .replace(
                    "--config=/var/lib/kube-proxy/kube-proxy-config.yaml",
                    &format!("--config=/{CONFIG}")
                )
        ),
        "the package's unit is deploy/systemd's with the package's paths"
    );
    for (shell, path) in [
        (
            "bash",
            "usr/share/bash-completion/completions/kube-proxy-rs",
        ),
        ("zsh", "usr/share/zsh/vendor-completions/_kube-proxy-rs"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/kube-proxy-rs.fish",
        ),
    ] {
        assert_eq!(
            std::fs::read_to_string(root.join(path)).unwrap(),
            ok(Command::new(BIN).args(["completions", shell])),
            "{shell}"
        );
    }
    for (name, roff) in commands::pages() {
        let gz = root.join(format!("usr/share/man/man8/{name}.gz"));
        let text = ok(Command::new("gzip").arg("-dc").arg(&gz));
        assert_eq!(text.as_bytes(), roff.as_slice(), "{name}");
    }

    // The installed binary runs: version, help, the installed configuration, the unit's
    // command line in a dry run (which programs nothing).
    assert_eq!(
        ok(Command::new(&bin).arg("--version")).trim(),
        format!("kube-proxy-rs v{version}")
    );
    assert!(ok(Command::new(&bin).arg("--help")).contains("--proxy-mode"));
    let effective = tmp.path().join("effective.yaml");
    ok(Command::new(&bin)
        .arg(format!("--config={}", root.join(CONFIG).display()))
        .arg(format!("--write-config-to={}", effective.display())));
    let written = std::fs::read_to_string(&effective).unwrap();
    assert!(written.contains("mode: nftables"), "{written}");
    let args = exec_start(&root);
    assert_eq!(args[0], bin.display().to_string());
    let examples = repo.join("examples/manifests");
    let dry = ok(Command::new(&args[0])
        .args(&args[1..])
        .arg(format!("--manifests={}", examples.display()))
        .args(["--hostname-override=node-a", "--dry-run"]));
    assert!(dry.contains("table ip kube-proxy-rs"), "{dry}");

    if !installed {
        return;
    }

    // systemd's own check of the installed unit: --root resolves ExecStart's binary inside the
    // throwaway root; the targets the unit names are copied in from the host.
    if has("systemd-analyze", "--version") {
        let units = root.join("usr/lib/systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
            .into_iter()
            .find(|d| Path::new(d).join("multi-user.target").exists())
            .unwrap();
        for entry in std::fs::read_dir(host_units).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|e| e == "target" || e == "slice")
            {
                std::fs::copy(&path, units.join(path.file_name().unwrap())).unwrap();
            }
        }
        let out = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("kube-proxy-rs.service"));
        assert!(
            out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
            "systemd-analyze verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!(
            "SKIPPED: systemd-analyze verify of the installed unit needs systemd (apt-get install systemd)"
        );
    }

    // Started as the unit starts it, inside a network namespace of this test only, with the
    // example manifests as its source: its table goes in, and `verify` (the installed binary)
    // finds the kernel equal to what it committed.
    match kpr_netlab::Lab::new("the installed proxy in a network namespace") {
        Some(mut lab) if has("nft", "--version") => {
            let ns = lab.netns("pkg");
            let mut argv: Vec<String> = vec![];
            argv.extend(args.iter().cloned());
            argv.push(format!("--manifests={}", examples.display()));
            argv.push("--hostname-override=node-a".into());
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            lab.spawn(&ns, &argv);
            let verify = format!("{} verify", bin.display());
            kpr_netlab::Lab::wait_for(
                "the installed proxy's first sync",
                Duration::from_secs(20),
                || lab.try_sh(&ns, &verify).status.success(),
            );
            let table = lab.sh(&ns, "nft list table ip kube-proxy-rs");
            assert!(
                table.contains("172.30.0.10"),
                "the example Service web: {table}"
            );
        }
        Some(_) => {
            eprintln!("SKIPPED: the installed proxy's run needs nft (apt-get install nftables)")
        }
        None => {}
    }

    // Removal keeps the configuration; purge removes it, and the link `systemctl enable` made
    // (the maintainer script, under DPKG_ROOT, touches only the throwaway root).
    dpkg(&root, &["--remove", "kube-proxy-rs"]);
    assert!(!bin.exists() && !root.join(UNIT).exists());
    assert!(!root.join("usr/share/man/man8/kube-proxy-rs.8.gz").exists());
    assert!(root.join(CONFIG).exists(), "dpkg -r keeps the conffile");
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(format!("/{UNIT}"), wants.join("kube-proxy-rs.service")).unwrap();
    dpkg(&root, &["--purge", "kube-proxy-rs"]);
    assert!(!root.join(CONFIG).exists() && !root.join("etc/kube-proxy-rs").exists());
    assert!(
        wants
            .join("kube-proxy-rs.service")
            .symlink_metadata()
            .is_err(),
        "postrm purge removes the enable link"
    );
    let status = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--status", "kube-proxy-rs"]));
    assert!(!String::from_utf8_lossy(&status.stdout).contains("install ok installed"));
}
