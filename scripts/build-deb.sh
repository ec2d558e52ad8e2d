#!/usr/bin/env bash
# Builds the Debian package of kube-proxy-rs with dpkg-deb alone (no cargo-deb, no debhelper):
#   /usr/bin/kube-proxy-rs                          the binary, stripped
#   /lib/systemd/system/kube-proxy-rs.service       deploy/systemd/kube-proxy-rs.service, with the
#                                                   package's paths (/usr/bin, /etc/kube-proxy-rs)
#   /etc/kube-proxy-rs/kube-proxy-config.yaml       deploy/systemd/kube-proxy-config.yaml (a conffile)
#   /usr/share/man/man8/kube-proxy-rs*.8.gz         `kube-proxy-rs man --dir`
#   bash, zsh and fish completions                  `kube-proxy-rs completions SHELL`
# plus deploy/debian's maintainer scripts and copyright. The pages and completions come from
# the binary being packaged, so they always describe its flags.
#
#   scripts/build-deb.sh                  cargo build --release, then target/debian/kube-proxy-rs_VERSION_ARCH.deb
#   scripts/build-deb.sh --binary PATH    package PATH instead of building (tests use the debug binary)
#   scripts/build-deb.sh --out DIR        write the .deb into DIR
#   scripts/build-deb.sh --compress gzip  dpkg-deb's compressor (default xz; gzip is faster)
# Prints the path of the .deb on its last line. Needs dpkg-deb (package dpkg); dpkg-shlibdeps
# (package dpkg-dev) for an exact Depends line, else it falls back to "libc6".
set -euo pipefail
. "$(dirname "$0")/lib.sh"
root=$(repo_root)
binary="" out="$root/target/debian" compress=xz
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --compress) compress=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  ensure_cargo
  (cd "$root" && cargo build --release -q -p kpr-daemon --bin kube-proxy-rs)
  binary="$root/target/release/kube-proxy-rs"
fi
[ -x "$binary" ] || { echo "build-deb.sh: $binary is not an executable" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "build-deb.sh: dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }

# "kube-proxy-rs v0.1.0" -> 0.1.0
version=$("$binary" --version | sed -n 's/^kube-proxy-rs v//p')
[ -n "$version" ] || { echo "build-deb.sh: cannot read the version from $binary --version" >&2; exit 1; }
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/pkg"

install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/kube-proxy-rs" \
  "$pkg/usr/share/man/man8" "$pkg/usr/share/doc/kube-proxy-rs" \
  "$pkg/usr/share/bash-completion/completions" "$pkg/usr/share/zsh/vendor-completions" \
  "$pkg/usr/share/fish/vendor_completions.d"

install -m 0755 "$binary" "$pkg/usr/bin/kube-proxy-rs"
if command -v strip >/dev/null; then
  strip --remove-section=.comment --remove-section=.note --strip-unneeded "$pkg/usr/bin/kube-proxy-rs"
fi

# The unit as deploy/systemd has it, with the package's paths; fail if either is not there.
unit="$pkg/lib/systemd/system/kube-proxy-rs.service"
sed -e 's#^ExecStart=/usr/local/bin/kube-proxy-rs #ExecStart=/usr/bin/kube-proxy-rs #' \
    -e 's#--config=/var/lib/kube-proxy/kube-proxy-config.yaml#--config=/etc/kube-proxy-rs/kube-proxy-config.yaml#' \
    -e 's#^\# DaemonSet\. Install: see README.md ("Deploy it")\.#\# DaemonSet. Installed by the Debian package kube-proxy-rs (README.md, "Install").#' \
    "$root/deploy/systemd/kube-proxy-rs.service" > "$unit"
chmod 0644 "$unit"
grep -q '^ExecStart=/usr/bin/kube-proxy-rs --config=/etc/kube-proxy-rs/kube-proxy-config.yaml' "$unit" || {
  echo "build-deb.sh: deploy/systemd/kube-proxy-rs.service no longer has the ExecStart line this script rewrites" >&2
  exit 1
}
install -m 0644 "$root/deploy/systemd/kube-proxy-config.yaml" "$pkg/etc/kube-proxy-rs/kube-proxy-config.yaml"
echo /etc/kube-proxy-rs/kube-proxy-config.yaml > "$pkg/DEBIAN/conffiles"

"$binary" man --dir "$pkg/usr/share/man/man8" >/dev/null
gzip -9n "$pkg"/usr/share/man/man8/*.8
"$binary" completions bash > "$pkg/usr/share/bash-completion/completions/kube-proxy-rs"
"$binary" completions zsh > "$pkg/usr/share/zsh/vendor-completions/_kube-proxy-rs"
"$binary" completions fish > "$pkg/usr/share/fish/vendor_completions.d/kube-proxy-rs.fish"
install -m 0644 "$root/deploy/debian/copyright" "$pkg/usr/share/doc/kube-proxy-rs/copyright"
for s in postinst prerm postrm; do
  install -m 0755 "$root/deploy/debian/$s" "$pkg/DEBIAN/$s"
done

# Depends: what the binary links, as dpkg-shlibdeps reads it (it wants a debian/control).
depends="libc6"
if command -v dpkg-shlibdeps >/dev/null; then
  mkdir -p "$stage/src/debian"
  printf 'Source: kube-proxy-rs\n\nPackage: kube-proxy-rs\nArchitecture: any\n' > "$stage/src/debian/control"
  if shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O "$pkg/usr/bin/kube-proxy-rs" 2>/dev/null); then
    depends=${shlibs#shlibs:Depends=}
  fi
else
  echo "build-deb.sh: dpkg-shlibdeps not found (package dpkg-dev): Depends: libc6" >&2
fi

size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<EOF
Package: kube-proxy-rs
Version: $version
Architecture: $arch
Maintainer: ${DEB_MAINTAINER:-kube-proxy-rs developers <kube-proxy-rs@users.noreply.github.com>}
Installed-Size: $size
Depends: $depends
Recommends: nftables, iptables
Section: net
Priority: optional
Homepage: https://github.com/kube-proxy-rs/kube-proxy-rs
Description: Kubernetes service proxy, a drop-in replacement for kube-proxy
 kube-proxy-rs programs a node's nftables or iptables rules so that the cluster's
 Services reach their endpoints, as kube-proxy does, from the same
 KubeProxyConfiguration file and flags, with the same ports, health semantics and
 metric names; and it explains where a packet goes (kube-proxy-rs explain).
 .
 The systemd unit kube-proxy-rs.service reads
 /etc/kube-proxy-rs/kube-proxy-config.yaml; it is not enabled on install.
EOF

mkdir -p "$out"
deb="$out/kube-proxy-rs_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$pkg" "$deb" >/dev/null
echo "$deb"
