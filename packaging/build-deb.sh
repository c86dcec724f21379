#!/bin/bash
# Build the vfiod Debian package from this repository.
#
#   packaging/build-deb.sh            -> build/deb/vfiod_<version>_<arch>.deb
#                                        build/deb/vfiod-kubelet-plugin_<version>_<arch>.deb
#
# Steps: install the Debian build tools if missing (needs root and apt),
# `cargo build --release --locked` (a no-op when target/release is fresh),
# stage a source tree whose debian/ is packaging/debian and whose bin/ holds
# the binaries just built, then `dpkg-buildpackage -b -us -uc` in it.
#
# Environment:
#   VFIOD_DEB_VERSION   override the Debian version (default: the top entry
#                       of packaging/debian/changelog); a stanza is added to
#                       the staged changelog only
#   VFIOD_SKIP_CARGO=1  do not run cargo; use target/release as it is
#   VFIOD_DEB_FORCE=1   run dpkg-buildpackage even when no input changed
#   CARGO_TARGET_DIR    as for cargo (default: target)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$repo/build/deb
stage_root=$out/stage
target_dir=${CARGO_TARGET_DIR:-$repo/target}
log() { printf '[build-deb] %s\n' "$*" >&2; }

need=()
for tool in dpkg-buildpackage:dpkg-dev dh:debhelper dh_installsysusers:debhelper fakeroot:fakeroot pkg-config:pkg-config; do
	command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
# The udev crate links libudev through pkg-config.
if [ "${VFIOD_SKIP_CARGO:-0}" != 1 ] && ! pkg-config --exists libudev 2>/dev/null; then
	need+=(libudev-dev)
fi
# The kubelet plugin's build generates its gRPC code with protoc.
if [ "${VFIOD_SKIP_CARGO:-0}" != 1 ] && [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null; then
	need+=(protobuf-compiler)
fi
# posix-acl links libacl (the VFIO node grants of attachments).
if [ "${VFIOD_SKIP_CARGO:-0}" != 1 ] && ! pkg-config --exists libacl 2>/dev/null; then
	need+=(libacl1-dev)
fi
if ((${#need[@]})); then
	if [ "$(id -u)" != 0 ]; then
		log "missing build tools: ${need[*]} (apt-get install them as root)"; exit 1
	fi
	log "installing ${need[*]}"
	apt-get -o DPkg::Lock::Timeout=300 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
		"${need[@]}" >/dev/null
fi

t0=$(date +%s)
if [ "${VFIOD_SKIP_CARGO:-0}" != 1 ]; then
	command -v cargo >/dev/null || { log "cargo not found (install Rust with rustup, or set VFIOD_SKIP_CARGO=1 to package target/release as it is)"; exit 1; }
	log "cargo build --release --locked --workspace"
	(cd "$repo" && cargo build --release --locked --workspace --bins)
fi
for b in vfiod vfioctl vfiod-kubelet-plugin; do
	[ -x "$target_dir/release/$b" ] || { log "missing $target_dir/release/$b"; exit 1; }
done
t1=$(date +%s)

version=$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Version)
cargo_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
if [ "${version%-*}" != "$cargo_version" ]; then
	log "warning: packaging/debian/changelog says $version but Cargo.toml says $cargo_version"
fi
if [ -n "${VFIOD_DEB_VERSION:-}" ]; then
	version=$VFIOD_DEB_VERSION
fi

# Skip dpkg-buildpackage when nothing that goes into the package changed
# since the last build (same binaries, same packaging files, same version).
stamp=$( {
	echo "$version"
	cd "$repo" && find packaging systemd man -type f ! -name '*.md' -print0 | sort -z | xargs -0 sha256sum
	sha256sum "$target_dir/release/vfiod" "$target_dir/release/vfioctl" "$target_dir/release/vfiod-kubelet-plugin" | cut -d' ' -f1
} | sha256sum | cut -c1-32)
if [ "${VFIOD_DEB_FORCE:-0}" != 1 ] && [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] &&
	ls "$out"/vfiod_"${version#*:}"_*.deb >/dev/null 2>&1; then
	log "package up to date (inputs unchanged since the last build; VFIOD_DEB_FORCE=1 rebuilds)"
	log "cargo $((t1 - t0))s, dpkg-buildpackage skipped"
	ls -1 "$out"/*.deb
	exit 0
fi

rm -rf "$stage_root"
src=$stage_root/vfiod-${version%-*}
mkdir -p "$src/bin" "$src/conf"
cp -a "$repo/packaging/debian" "$src/debian"
install -m 0755 "$target_dir/release/vfiod" "$target_dir/release/vfioctl" "$target_dir/release/vfiod-kubelet-plugin" "$src/bin/"
cp -a "$repo/systemd" "$repo/man" "$src/"
install -m 0644 "$repo/packaging/config.toml" "$src/conf/config.toml"
if [ -n "${VFIOD_DEB_VERSION:-}" ]; then
	{
		printf 'vfiod (%s) unstable; urgency=medium\n\n  * Local rebuild.\n\n -- %s  %s\n\n' \
			"$version" "$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)" "$(date -R)"
		cat "$repo/packaging/debian/changelog"
	} >"$src/debian/changelog"
fi
# Reproducible timestamps: the changelog date, not the build time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$src/debian/changelog" -S Timestamp)}

log "dpkg-buildpackage -b -us -uc ($src)"
(cd "$src" && dpkg-buildpackage -b -us -uc) >"$stage_root/dpkg-buildpackage.log" 2>&1 || {
	tail -n 60 "$stage_root/dpkg-buildpackage.log" >&2
	log "dpkg-buildpackage failed; full log: $stage_root/dpkg-buildpackage.log"
	exit 1
}
mkdir -p "$out"
rm -f "$out"/*.deb "$out"/*.ddeb "$out"/*.changes "$out"/*.buildinfo "$out/.stamp"
mv "$stage_root"/*.deb "$stage_root"/*.buildinfo "$stage_root"/*.changes "$out/"
mv "$stage_root"/*.ddeb "$out/" 2>/dev/null || true
echo "$stamp" >"$out/.stamp"
t2=$(date +%s)
log "cargo $((t1 - t0))s, dpkg-buildpackage $((t2 - t1))s"
ls -1 "$out"/*.deb
