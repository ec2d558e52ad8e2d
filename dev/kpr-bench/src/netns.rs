//! The network namespaces of one run, named `kpr-bench-<pid>-<role>`: created with `lo` up,
//! always deleted (on drop, during a panic's unwinding, by the final sweep and on SIGINT or
//! SIGTERM), joined by veth pairs; and running code or processes inside one of them.
//!
//! Network safety rule: every rule and every packet of the benchmark lives in a namespace
//! made here; nothing is configured in the namespace the harness was started in.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static LINKS: AtomicU32 = AtomicU32::new(0);

/// What every namespace of this run starts with.
pub(crate) fn prefix() -> String {
    format!("kpr-bench-{}-", std::process::id())
}

/// A namespace of this run; deleted (with whatever runs in it) when dropped.
#[derive(Debug)]
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    /// Creates `kpr-bench-<pid>-<role>` with `lo` up.
    pub(crate) fn new(role: &str) -> Netns {
        let name = format!("{}{role}", prefix());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Runs a shell command inside; panics on failure.
    pub(crate) fn sh(&self, script: &str) -> String {
        let out = self.try_sh(script);
        assert!(
            out.status.success(),
            "in {}: `{script}` failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub(crate) fn try_sh(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec runs")
    }

    /// Runs `f` on a thread that has entered this namespace (its sockets, and the processes it
    /// starts, live there); a panic in `f` is the caller's.
    pub(crate) fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                enter(&self.name);
                f()
            });
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// Moves the calling thread into namespace `name` (only this thread: namespaces are per task).
pub(crate) fn enter(name: &str) {
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("setns {name}: {e}"));
}

/// A veth pair between two namespaces, up on both sides; returns (a side, b side).
pub(crate) fn link(a: &Netns, b: &Netns) -> (String, String) {
    let n = LINKS.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id() % 100_000;
    let (ea, eb) = (format!("kb{pid}x{n}a"), format!("kb{pid}x{n}b"));
    run(&[
        "ip",
        "link",
        "add",
        &ea,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &eb,
        "netns",
        b.name(),
    ]);
    a.sh(&format!("ip link set {ea} up"));
    b.sh(&format!("ip link set {eb} up"));
    (ea, eb)
}

/// Kills what runs in the namespace and deletes it.
fn remove(name: &str) {
    if let Ok(o) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// What else a phase leaves that must go after its namespaces (the socket-lb phase's pins,
/// mounts and cgroup): registered by the phase, run by [`sweep`].
static AFTER: std::sync::Mutex<Vec<fn()>> = std::sync::Mutex::new(Vec::new());

/// Has [`sweep`] also run `f`, after the namespaces are gone (once, however often asked).
pub(crate) fn also_sweep(f: fn()) {
    let mut after = AFTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !after.contains(&f) {
        after.push(f);
    }
}

/// Deletes every namespace of this run that is left (the last line of defence), then what the
/// phases registered with [`also_sweep`].
pub(crate) fn sweep() {
    kpr_netlab::remove_namespaces(&prefix());
    let after = AFTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for f in after {
        f();
    }
}

/// On SIGINT or SIGTERM: sweep this run's namespaces and exit (drops do not run then).
pub(crate) fn sweep_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("kpr-bench: interrupted; deleting this run's network namespaces");
            sweep();
            std::process::exit(130);
        });
    });
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
