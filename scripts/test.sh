#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and the whole test suite. Installs the system
# packages the tests need when missing: nftables, iptables, iproute2, conntrack, socat and
# chromium (the real-traffic tests, the status page); prometheus (promtool and a real
# Prometheus, tests/monitoring.rs); dpkg-dev, systemd, groff-base, zsh, fish and kubectl
# (the Debian package, unit, man pages, completions and kustomize overlays, tests/install.rs);
# clang and libbpf-dev (the socket-lb BPF programs, compiled by crates/kpr-socklb/build.rs:
# without them the binary builds without --socket-lb support and its tests say SKIPPED) and
# bpftool (a socket-lb kernel test pins a map of another layout with it).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
had_prometheus=$(dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -c "install ok installed" || true)
ensure_packages nftables iptables iproute2 conntrack socat chromium prometheus \
  dpkg-dev systemd groff-base zsh fish clang libbpf-dev bpftool
# Debian's package starts a Prometheus on :9090 where systemd runs; the tests run their own
# inside network namespaces, so one we just installed is stopped (a host's own is left alone).
if [ "$had_prometheus" = 0 ] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# Debian's kubectl is `kubernetes-client`; a host with another package's kubectl keeps it
# (installing both would conflict on /usr/bin/kubectl).
command -v kubectl >/dev/null 2>&1 || ensure_packages kubernetes-client
ensure_cargo
# clang is installed above: a failed compile of the BPF programs fails the build instead of
# leaving the socket-lb tests to print SKIPPED.
export KPR_REQUIRE_BPF=1
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
log=$(mktemp)
cargo test --workspace --quiet 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' "$log"
# The benchmark harness on tiny sizes, so it cannot rot: prints timings, asserts only correctness.
echo "== scripts/bench.sh --quick"
if [ "$(id -u)" -ne 0 ]; then
  echo "!! SKIPPED: scripts/bench.sh --quick needs root (it creates network namespaces); run scripts/test.sh as root to include it"
else
  "$(repo_root)/scripts/bench.sh" --quick
fi
