# Shared helpers for the scripts in this folder: find the repo, install what is missing.
# Sourced, not run.

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

# ensure_packages PKG...: installs the Debian packages that are missing (as root, or via sudo).
ensure_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "!! missing packages ${missing[*]} and not root: install them, then re-run" >&2
      return 1
    fi
  fi
  echo "== installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_cargo: a Rust toolchain new enough for the workspace (rust-version 1.89: kube 5).
ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "!! cargo not found: install Rust (https://rustup.rs: curl -sSf https://sh.rustup.rs | sh -s -- -y), then re-run" >&2
    return 1
  fi
}
