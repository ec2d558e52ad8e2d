#!/usr/bin/env bash
# The main job on the embedded default: read the example cluster in examples/manifests and show
# what kube-proxy-rs would program for this node (until the data plane lands: the desired state).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(repo_root)"
ensure_cargo
cargo build -q --bin kube-proxy-rs
exec target/debug/kube-proxy-rs --manifests examples/manifests --hostname-override node-a --proxy-mode nftables --cluster-cidr 10.0.0.0/8 --dry-run "$@"
