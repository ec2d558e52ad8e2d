//! `kube-proxy-rs sandbox` (issue 8), as CI runs it: it exits 0 only when traffic reached every
//! pod through the ClusterIP and the NodePort and followed the live edit; interrupted, it
//! still removes every namespace it made. Root only (it builds network namespaces).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&out.stdout).trim() == "0";
    if !root {
        eprintln!("SKIPPED (needs root): the sandbox builds network namespaces");
    }
    root
}

/// Sandbox runs one at a time (each builds a whole world of namespaces).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn leftovers(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_sandbox_shows_traffic_reaching_every_pod_and_cleans_up() {
    if !root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .arg("sandbox")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pod in ["pod-a", "pod-b", "pod-c"] {
        assert!(stdout.contains(pod), "{stdout}");
    }
    assert!(stdout.contains("Every pod answered"), "{stdout}");
    let node = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("node"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    let prefix = node.trim_end_matches("-node");
    assert!(
        leftovers(prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(prefix)
    );
}

#[test]
fn an_interrupted_sandbox_still_removes_its_namespaces() {
    if !root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .arg("sandbox")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut prefix = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("node") {
            prefix = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches("-node")
                .to_owned();
        }
        if line.contains("programmed the rules") {
            break;
        }
    }
    assert!(!prefix.is_empty());
    assert!(
        !leftovers(&prefix).is_empty(),
        "the world exists while it runs"
    );
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        leftovers(&prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(&prefix)
    );
}
