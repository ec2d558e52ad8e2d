#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and the whole test suite. Installs the system
# packages the tests need (nftables, iptables, iproute2, conntrack) when missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
ensure_packages nftables iptables iproute2 conntrack
ensure_cargo
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --quiet 2>&1 | tee target/test.log
grep -q "test result: ok" target/test.log
