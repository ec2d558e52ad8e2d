//! A network lab for real-kernel tests and the sandbox command: network namespaces joined by
//! veth pairs, each created with a unique name and always removed (processes killed,
//! namespaces deleted) when the lab is dropped, even when the test fails.
//!
//! Network safety rule: everything happens inside namespaces the lab created; nothing is
//! configured in, or sent from, the namespace the tests run in. Without root the lab is not
//! built and the test prints a loud SKIPPED line.

mod cgroup;

pub use cgroup::{TestCgroup, mount_fs, unmount};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Namespaces and processes owned by one test.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

/// The result of a client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The server's reply line.
    Ok(String),
    /// Connection refused (REJECT).
    Refused,
    /// No answer in time (DROP).
    Timeout,
    /// Connected, but the server closed without a reply line.
    Closed,
    Other(String),
}

impl Lab {
    /// A new lab, or `None` (after printing SKIPPED) when not root.
    pub fn new(test: &str) -> Option<Lab> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let tools = Command::new("socat")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !root || !tools {
            eprintln!("SKIPPED (needs root, ip netns and socat): {test}");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        Some(Lab {
            prefix: format!("kpr{}x{n}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            children: Vec::new(),
        })
    }

    /// The prefix of every namespace this lab creates (for [`remove_namespaces`] from a
    /// signal handler that cannot reach the lab).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates a namespace with `lo` up; returns its name.
    pub fn netns(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        // No duplicate address detection: tentative IPv6 addresses would delay the first
        // packets of a test by a second or two.
        self.sh(&name, "ip link set lo up && sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0");
        name
    }

    /// Runs a shell command inside a namespace; panics on failure.
    pub fn sh(&self, ns: &str, script: &str) -> String {
        let out = self.try_sh(ns, script);
        assert!(
            out.status.success(),
            "in {ns}: `{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, ns: &str, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", script])
            .output()
            .expect("ip netns exec runs")
    }

    /// Starts a long-running process inside a namespace; it is killed when the lab drops.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in netns");
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// A veth pair between two namespaces; returns the interface names (a side, b side).
    pub fn link(&mut self, a: &str, b: &str) -> (String, String) {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (ea, eb) = (
            format!("kv{n}a{}", std::process::id() % 10_000),
            format!("kv{n}b{}", std::process::id() % 10_000),
        );
        run(&[
            "ip", "link", "add", &ea, "netns", a, "type", "veth", "peer", "name", &eb, "netns", b,
        ]);
        self.sh(a, &format!("ip link set {ea} up"));
        self.sh(b, &format!("ip link set {eb} up"));
        (ea, eb)
    }

    /// Sends one TCP request from a namespace; the server's first line is the reply.
    pub fn tcp(&self, ns: &str, dst: &str, port: u16) -> Reply {
        // One-way (server to stdout): the client never half-closes first, so a server that
        // forks its reply process cannot see EOF before it has answered.
        self.request(
            ns,
            "-u",
            &format!("TCP:{}:{port},connect-timeout=2 -", bracket(dst)),
        )
    }

    /// [`Lab::tcp`] from a process in the cgroup v2 directory `cgroup` (a test's own).
    pub fn tcp_in_cgroup(&self, ns: &str, cgroup: &Path, dst: &str, port: u16) -> Reply {
        self.request_from(
            ns,
            &enter(cgroup),
            "-u",
            &format!("TCP:{}:{port},connect-timeout=2 -", bracket(dst)),
        )
    }

    /// [`Lab::udp`] from a process in the cgroup v2 directory `cgroup` (a test's own).
    pub fn udp_in_cgroup(&self, ns: &str, cgroup: &Path, dst: &str, port: u16) -> Reply {
        self.request_from(
            ns,
            &enter(cgroup),
            "-t2",
            &format!("- UDP:{}:{port}", bracket(dst)),
        )
    }

    /// Sends one UDP datagram from a namespace and waits for one reply.
    pub fn udp(&self, ns: &str, dst: &str, port: u16) -> Reply {
        // UDP has no close: wait up to 2 s for the reply after sending.
        self.request(ns, "-t2", &format!("- UDP:{}:{port}", bracket(dst)))
    }

    /// Sends `n` UDP datagrams at once, each from its own socket (a new flow each); returns the
    /// reply lines received (one per answered datagram).
    pub fn udp_burst(&self, ns: &str, dst: &str, port: u16, n: usize) -> Vec<String> {
        let script = format!(
            "for i in $(seq {n}); do (echo hello | timeout 6 socat -T4 -t3 - UDP:{}:{port} 2>/dev/null &); done; sleep 4",
            bracket(dst)
        );
        let out = self.try_sh(ns, &script);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn request(&self, ns: &str, opts: &str, target: &str) -> Reply {
        self.request_from(ns, "", opts, target)
    }

    fn request_from(&self, ns: &str, prefix: &str, opts: &str, target: &str) -> Reply {
        let out = self.try_sh(
            ns,
            &format!("{prefix}echo hello | timeout 8 socat -T5 {opts} {target}"),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stdout.is_empty() {
            Reply::Ok(stdout)
        } else if stderr.contains("refused") {
            Reply::Refused
        } else if stderr.contains("timed out") || out.status.code() == Some(124) {
            Reply::Timeout
        } else if stderr.is_empty() && out.status.success() {
            Reply::Closed
        } else if stderr.is_empty() {
            Reply::Timeout
        } else {
            Reply::Other(stderr.into_owned())
        }
    }

    /// Waits (bounded) until `check` is true; returns how long it took.
    pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            remove_namespace(ns);
        }
    }
}

/// Kills what runs in a namespace (socat children too) and deletes it.
fn remove_namespace(ns: &str) {
    let _ = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// Removes every namespace whose name starts with `prefix` (what a lab created).
pub fn remove_namespaces(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if !name.is_empty() && name.starts_with(prefix) {
            remove_namespace(name);
        }
    }
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command runs");
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A shell prefix that moves the shell (and so what it runs) into `cgroup`.
fn enter(cgroup: &Path) -> String {
    format!("echo $$ > '{}/cgroup.procs' && ", cgroup.display())
}
