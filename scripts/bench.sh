#!/usr/bin/env bash
# The benchmarks of issue 7 in one command: builds kpr-bench and the daemon, then runs kpr-bench
# as root (asking sudo when not root). It works only inside network namespaces it creates and
# always deletes, and prints the tables; a default run (release build, ~17 minutes on a 2-core
# machine) also writes them into docs/benchmarks.md. `--quick` runs tiny sizes on a debug build
# in well under a minute (scripts/test.sh runs it so the harness cannot rot, a tiny soak
# included); it prints timings, never asserts them. `--phases soak` runs issue 15's soak (no
# leaks under churn; ~2 minutes, ~10 with `--modes nftables,iptables`) and writes its own
# section of docs/benchmarks.md. Other arguments go to kpr-bench (`--help`).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
ensure_packages nftables iptables iproute2 conntrack
ensure_cargo
profile=release
for a in "$@"; do [ "$a" = "--quick" ] && profile=debug; done
if [ "$profile" = release ]; then
  cargo build --release -q -p kpr-bench -p kpr-daemon
else
  cargo build -q -p kpr-bench -p kpr-daemon
fi
bin="target/$profile/kpr-bench"
if [ "$(id -u)" = 0 ]; then
  exec "$bin" "$@"
else
  exec sudo "$bin" "$@"
fi
