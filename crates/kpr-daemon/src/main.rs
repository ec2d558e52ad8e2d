//! The `kube-proxy-rs` binary: see [`kpr_daemon::app`].

fn main() -> std::process::ExitCode {
    kpr_daemon::app::main()
}
