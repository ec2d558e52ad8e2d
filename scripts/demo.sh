#!/usr/bin/env bash
# The main job: `kube-proxy-rs sandbox`, a disposable world of network namespaces (a node, three
# pods with real servers, two clients) where the real kube-proxy-rs serves a Service; real
# connections show which pod answered, then a live manifest edit moves them. Needs root (it
# asks sudo when not root). `./scripts/demo.sh --dry-run` instead prints, for the example
# cluster in examples/manifests, where traffic goes and the nftables ruleset (no root needed).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
ensure_cargo
cargo build -q --bin kube-proxy-rs
if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec target/debug/kube-proxy-rs --manifests examples/manifests --hostname-override node-a --proxy-mode nftables --cluster-cidr 10.0.0.0/8 --dry-run "$@"
fi
ensure_packages iproute2 socat nftables
if [ "$(id -u)" = 0 ]; then
  exec target/debug/kube-proxy-rs sandbox
else
  exec sudo target/debug/kube-proxy-rs sandbox
fi
