#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine, as root:
#   1. build dependencies from apt (protobuf-compiler: the kubelet plugin's
#      build generates its gRPC code with protoc);
#   2. cargo fmt --check, cargo clippy -D warnings, over the whole workspace;
#   3. the fast tier: cargo test --workspace (real vfiod over a fake sysfs +
#      simulated kernel; the kubelet plugin against a kubelet stand-in);
#   4. the real-kernel tier: tests/vm/run.sh (QEMU guest with an IOMMU);
#   5. the package tier: tests/pkg/run.sh (lintian, systemd-nspawn installs);
#   6. the installed package in a QEMU guest booted with systemd.
# VFIOD_SKIP_VM=1 / VFIOD_SKIP_PKG=1 skip a slow tier (never in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

need_apt=()
# zsh and fish: the completion tests run them; prometheus: promtool lints
# the metrics exposition in the fast tier; protobuf-compiler: the kubelet
# plugin's build generates its gRPC code with protoc.
for pkg in libudev-dev libacl1-dev pkg-config pci.ids curl zsh fish prometheus protobuf-compiler; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    step "installing ${need_apt[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages ${need_apt[*]}; run as root or install them" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "fast tier: cargo test --workspace"
cargo build --release --locked --workspace --bins
cargo test --workspace --locked

if [ "${VFIOD_SKIP_VM:-0}" != 1 ]; then
    step "real-kernel tier: tests/vm/run.sh"
    # The scenarios listed in tests/vm/scenarios.enabled must pass.
    VFIOD_VM_SCENARIOS=enabled tests/vm/run.sh
fi

if [ "${VFIOD_SKIP_PKG:-0}" != 1 ]; then
    step "package tier: tests/pkg/run.sh"
    tests/pkg/run.sh
fi

if [ "${VFIOD_SKIP_VM:-0}" != 1 ] && [ "${VFIOD_SKIP_PKG:-0}" != 1 ]; then
    # The installed, hardened unit moves a device and sees a hotplug event
    # in a QEMU guest booted with systemd.
    step "systemd guest: tests/vm/systemd-guest.sh"
    tests/vm/systemd-guest.sh
fi

step "all tiers passed"
