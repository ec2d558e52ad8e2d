#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and the whole test suite. Installs the system
# packages the tests need (nftables, iptables, iproute2, conntrack, socat, chromium) when missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
ensure_packages nftables iptables iproute2 conntrack socat chromium
ensure_cargo
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
