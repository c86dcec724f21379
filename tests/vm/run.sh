#!/bin/bash
# Real-kernel test tier for vfiod: boots a Debian kernel under QEMU (TCG) with
# emulated PCI devices behind an emulated Intel IOMMU, and runs scenario
# scripts inside the guest that move devices between drivers for real.
#
# Nothing here writes to this machine's /sys: every driver move happens in the
# guest (the guest scripts refuse to run anywhere else).
#
# Environment:
#   VFIOD_VM_SCENARIOS  "all" (default), "enabled" (tests/vm/scenarios.enabled)
#                       or a list like "raw bind-unbind hotplug"
#   VFIOD_VM_GATE       "selected" (default: every selected scenario must pass)
#                       or "enabled" (only failures of scenarios listed in
#                       scenarios.enabled make the exit code non-zero)
#   VFIOD_VM_CACHE      cache directory (default tests/vm/.cache)
#   VFIOD_VM_OUT        where logs of this run go (default $VFIOD_VM_CACHE/last-run)
#   VFIOD_BIN_DIR       where vfiod and vfioctl are (default target/release,
#                       brought up to date with `cargo build --release`; an
#                       explicit directory is only built into if the binaries
#                       are missing; VFIOD_VM_NO_BUILD=1 never builds)
#   VFIOD_VM_ROUNDS     bind/unbind rounds for latency medians (default 7)
#   VFIOD_VM_VERBOSE=1  echo the whole guest console while running
#   VFIOD_VM_SMP, VFIOD_VM_MEM   guest vCPUs (2) and MiB (1024)
#   VFIOD_VM_BIOS       qboot (default, if QEMU ships it), seabios, or a path
#   VFIOD_VM_BZIMAGE=1  boot the bzImage instead of the extracted vmlinux (PVH)
#   VFIOD_VM_SCENARIO_TIMEOUT, VFIOD_VM_BOOT_TIMEOUT  seconds (240, 180)
#   VFIOD_VM_KERNEL     6.12 (default: bookworm's linux-image-6.12-amd64) or 6.1
#                       (bookworm's linux-image-amd64); VFIOD_VM_KERNEL_PKG
#                       names an exact linux-image-*-amd64 package instead
#   VFIOD_VM_NO_VMM=1   do not put the host's QEMU into the guest (scenarios
#                       that run a VMM inside the guest then fail)
#   VFIOD_VM_REPLUG_ROUNDS, VFIOD_VM_REPLUG_BUDGET, VFIOD_VM_ATTACH_KILL_TRIES,
#   VFIOD_VM_ATTACH_KILL_MAX_US, VFIOD_VM_ATTACH_KILL_ONGRANT, VFIOD_VM_WALK_SEED,
#   VFIOD_VM_WALK_STEPS, VFIOD_VM_WALK_BUDGET, VFIOD_VM_WALK_SETTLE
#                       scenario knobs, passed to the guest as VM_* (see the
#                       scenario's header and GUEST_KNOBS in harness.py)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VFIOD_VM_CACHE:-$HERE/.cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=${VFIOD_VM_OUT:-$CACHE/last-run}
BIN_DIR=${VFIOD_BIN_DIR:-target/release}
case $BIN_DIR in /*) ;; *) BIN_DIR=$REPO/$BIN_DIR ;; esac

# Bump when the layout of the cached base initramfs changes.
BASE_FORMAT=5
# Kernel modules the guest needs (the closure is computed with modprobe).
# igbvf is carried but not loaded at boot: the sriov scenario loads it, as
# udev would on a real host, so that "no VF driver probed" can fail.
# mdev (the mediated device core) is carried for the mdev scenario, which
# loads it with the out-of-tree mtty sample (step 4c).
MODULES="vfio-pci vfio_iommu_type1 e1000e e1000 igb igbvf virtio_pci virtio_rng snd_hda_intel bochs nvme ext4 9p 9pnet_virtio mdev"

T_START=$(date +%s.%N)
trap 'rm -rf "$CACHE"/tmp.*.$$' EXIT
log() { printf '[vm %6.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T_START" 'BEGIN{print a-b}')" "$*" >&2; }
die() { echo "tests/vm/run.sh: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------
# 1. Packages from apt.
# ---------------------------------------------------------------------------
APT_SRC=$CACHE/apt-sources
APT_OPTS=(-o DPkg::Lock::Timeout=600)

# bookworm's qemu-system-x86 (7.2) conflicts with the qemu-utils 10.0 from
# bookworm-backports that these machines carry: take qemu-system-x86 from
# backports in that case (same version as qemu-utils), bookworm's otherwise.
setup_backports() {
    rm -rf "$APT_SRC"; mkdir -p "$APT_SRC"
    local f
    [ -s /etc/apt/sources.list ] && cp /etc/apt/sources.list "$APT_SRC/00-main.list"
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] && cp "$f" "$APT_SRC/"
    done
    cat >"$APT_SRC/zz-vfiod-vm-backports.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_OPTS+=(-o "Dir::Etc::SourceParts=$APT_SRC" -o Dir::Etc::SourceList=/dev/null)
}

pkg_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3=="installed"{print $4}'; }

apt_retry() {
    local i
    for i in 1 2 3 4 5; do
        if "$@"; then return 0; fi
        log "apt failed (try $i), retrying in 5s"; sleep 5
    done
    return 1
}

APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    log "apt-get update"
    apt_retry apt-get "${APT_OPTS[@]}" update -qq
    APT_UPDATED=1
}

install_packages() {
    local need=() p qemu=0
    # make, gcc-12 (the compiler the guest kernel was built with) and
    # libelf1 (objtool) build the mtty sample module against the guest
    # kernel's headers (step 4c).
    for p in busybox-static kmod cpio pci.ids zstd xz-utils e2fsprogs make gcc-12 libelf1; do
        [ -n "$(pkg_version "$p")" ] || need+=("$p")
    done
    command -v qemu-system-x86_64 >/dev/null || qemu=1
    [ ${#need[@]} -eq 0 ] && [ $qemu = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing packages (${need[*]} qemu=$qemu); run as root"
    local qutils use_bpo=0
    qutils=$(pkg_version qemu-utils)
    case $qutils in 1:7.2*|"") ;; *) use_bpo=1 ;; esac
    [ $qemu = 1 ] && [ $use_bpo = 1 ] && setup_backports
    apt_update
    if [ ${#need[@]} -gt 0 ]; then
        log "apt-get install ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt_retry apt-get "${APT_OPTS[@]}" install -y -qq \
            --no-install-recommends "${need[@]}" >/dev/null
    fi
    if [ $qemu = 1 ]; then
        local t=()
        [ $use_bpo = 1 ] && t=(-t bookworm-backports)
        log "apt-get install qemu-system-x86 ${t[*]} (qemu-utils is ${qutils:-absent})"
        DEBIAN_FRONTEND=noninteractive apt_retry apt-get "${APT_OPTS[@]}" install -y -qq \
            --no-install-recommends "${t[@]}" qemu-system-x86 >/dev/null
    fi
}

install_packages
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not installed"

# ---------------------------------------------------------------------------
# 2. The vfiod binaries.
# ---------------------------------------------------------------------------
# With the default target/release, always let cargo bring the binaries up to
# date (a no-op when they are): testing stale binaries is a trap. An explicit
# VFIOD_BIN_DIR is used as it is, built only if missing.
if [ "${VFIOD_VM_NO_BUILD:-0}" != 1 ] && { [ -z "${VFIOD_BIN_DIR:-}" ] || [ ! -x "$BIN_DIR/vfiod" ] || [ ! -x "$BIN_DIR/vfioctl" ]; }; then
    log "cargo build --release --workspace --bins; the kubelet stand-in example"
    (cd "$REPO" && cargo build --release --workspace --bins --quiet &&
        cargo build --release -p vfiod-kubelet-plugin --examples --quiet) >&2 ||
        log "WARNING: cargo build failed; scenarios that need vfiod will fail"
fi

# ---------------------------------------------------------------------------
# 3. Guest kernel (cached by package name and version).
# ---------------------------------------------------------------------------
# Debian 12 carries two kernels: 6.1 (linux-image-amd64) and 6.12
# (linux-image-6.12-amd64, from bookworm-security). 6.12 is the default: the
# measured facts in the docs are from it, and only newer kernels name the
# device in the fdinfo of a VFIO device descriptor.
KSERIES=${VFIOD_VM_KERNEL:-6.12}
case $KSERIES in
    6.12) KMETA=linux-image-6.12-amd64 ;;
    6.1) KMETA=linux-image-amd64 ;;
    *) die "VFIOD_VM_KERNEL must be 6.12 or 6.1, not '$KSERIES'" ;;
esac
resolve_kernel() {
    if [ -n "${VFIOD_VM_KERNEL_PKG:-}" ]; then
        KPKG=$VFIOD_VM_KERNEL_PKG
    else
        KPKG=$(apt-cache depends "$KMETA" 2>/dev/null |
            awk -v p="linux-image-$KSERIES." '$1=="Depends:" && index($2, p) == 1 && $2 ~ /-amd64$/ {print $2; exit}')
    fi
    [ -n "$KPKG" ] && KVER=$(apt-cache policy "$KPKG" 2>/dev/null | awk '/Candidate:/{print $2}')
    if [ -z "${KPKG:-}" ] || [ -z "${KVER:-}" ] || [ "$KVER" = "(none)" ]; then
        return 1
    fi
}
if ! resolve_kernel; then
    apt_update
    resolve_kernel || die "cannot resolve the bookworm $KMETA package (a linux-image-$KSERIES.*-amd64)"
fi
KREL=${KPKG#linux-image-}                      # e.g. 6.1.0-56-amd64
MODHASH=$(echo "$MODULES" | sha256sum | cut -c1-12)
KDIR=$CACHE/kernel/${KPKG}_${KVER}_$MODHASH

build_kernel() {
    local tmp=$CACHE/tmp.kernel.$$
    rm -rf "$tmp"; mkdir -p "$tmp"
    log "downloading $KPKG $KVER"
    (cd "$tmp" && apt_retry apt-get "${APT_OPTS[@]}" download -qq "$KPKG=$KVER" 2>/dev/null)
    log "extracting kernel and computing the module closure"
    dpkg-deb -x "$tmp"/*.deb "$tmp/root"
    depmod -b "$tmp/root" "$KREL"
    mkdir -p "$tmp/out/modroot/lib/modules/$KREL"
    cp "$tmp/root/boot/vmlinuz-$KREL" "$tmp/out/vmlinuz"
    cp "$tmp/root/boot/config-$KREL" "$tmp/out/config"
    # vmlinux for PVH boot: the XZ payload of the bzImage is the ELF kernel.
    python3 "$HERE/extract-vmlinux.py" "$tmp/out/vmlinuz" "$tmp/out/vmlinux" || true
    local m f
    for m in $MODULES; do
        modprobe -d "$tmp/root" -S "$KREL" --show-depends "$m" |
            awk '$1=="insmod"{print $2}'
    done | sort -u | while read -r f; do
        local rel=${f#"$tmp/root"}
        mkdir -p "$tmp/out/modroot$(dirname "$rel")"
        cp "$f" "$tmp/out/modroot$rel"
    done
    # 6.12's modules are XZ-compressed; busybox's modprobe loads plain .ko
    # only, so store them decompressed (depmod below indexes the new names).
    find "$tmp/out/modroot" -name '*.ko.xz' -exec xz -d {} +
    find "$tmp/out/modroot" -name '*.ko.zst' -exec zstd -q -d --rm {} +
    for f in modules.order modules.builtin modules.builtin.modinfo; do
        [ -e "$tmp/root/lib/modules/$KREL/$f" ] && cp "$tmp/root/lib/modules/$KREL/$f" "$tmp/out/modroot/lib/modules/$KREL/"
    done
    depmod -b "$tmp/out/modroot" "$KREL"
    echo "$KPKG $KVER" >"$tmp/out/id"
    rm -rf "$KDIR"; mkdir -p "$(dirname "$KDIR")"
    mv "$tmp/out" "$KDIR"
    rm -rf "$tmp"
}
[ -e "$KDIR/id" ] || build_kernel
if [ -e "$KDIR/vmlinux" ] && [ "${VFIOD_VM_BZIMAGE:-0}" != 1 ]; then
    KERNEL=$KDIR/vmlinux
else
    KERNEL=$KDIR/vmlinuz
fi

# ---------------------------------------------------------------------------
# 4. Base initramfs (cached): busybox, modules, udev, jq, vmtool.
# ---------------------------------------------------------------------------
BB_VER=$(pkg_version busybox-static)
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/{print $2}'; }
UDEV_VER=$(candidate udev)
[ -n "$UDEV_VER" ] && [ "$UDEV_VER" != "(none)" ] || { apt_update; UDEV_VER=$(candidate udev); }
# The guest's jq is gojq (a static Go binary): jq 1.6 takes 0.3-0.5 s to
# start under TCG, gojq a tenth of that.
GOJQ_VER=$(candidate gojq)
# setfacl/getfacl: to grant a uid access to /dev/vfio/N by hand (what vfiod's
# attach does), and to read the ACL vfiod leaves.
ACL_VER=$(candidate acl)
BASE_KEY=$( { echo "$BASE_FORMAT $KPKG $KVER $MODHASH $BB_VER $GOJQ_VER $UDEV_VER $ACL_VER"; cat "$HERE/guest/vmtool.c"; } | sha256sum | cut -c1-16)
BASE=$CACHE/initramfs/base-$BASE_KEY.cpio

# Copy ELF binaries' shared libraries (as ldd resolves them) into ROOT.
copy_libs() {
    local root=$1; shift
    local lib
    for lib in $(LD_LIBRARY_PATH=${EXTRA_LIBPATH:-} ldd "$@" 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | sort -u); do
        local dest=$root/lib/x86_64-linux-gnu/$(basename "$lib")
        case $lib in */ld-linux-x86-64.so.2) dest=$root/lib64/ld-linux-x86-64.so.2 ;; esac
        [ -e "$dest" ] && continue
        mkdir -p "$(dirname "$dest")"
        cp -L "$lib" "$dest"
    done
}

build_base() {
    local tmp=$CACHE/tmp.base.$$
    rm -rf "$tmp"; mkdir -p "$tmp/root" "$tmp/dl"
    local r=$tmp/root
    log "building the base initramfs ($BASE_KEY)"
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc,proc,sys,dev,run,tmp,mnt/host,var/lib,root}
    cp /bin/busybox "$r/bin/busybox"
    local a
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"
    done
    cp -a "$KDIR/modroot/lib/modules" "$r/lib/"
    gcc -O2 -static -Wall -o "$r/bin/vmtool" "$HERE/guest/vmtool.c"
    # udev: from the Debian package, not installed on this machine (a udevd
    # here would be of no use and not harmless).
    (cd "$tmp/dl" && apt_retry apt-get "${APT_OPTS[@]}" download -qq "udev=$UDEV_VER" "gojq=$GOJQ_VER" "acl=$ACL_VER" 2>/dev/null)
    dpkg-deb -x "$tmp"/dl/udev_*.deb "$tmp/udev"
    dpkg-deb -x "$tmp"/dl/gojq_*.deb "$tmp/gojq"
    dpkg-deb -x "$tmp"/dl/acl_*.deb "$tmp/acl"
    cp "$tmp/acl/bin/setfacl" "$tmp/acl/bin/getfacl" "$r/usr/bin/"
    copy_libs "$r" "$r/usr/bin/setfacl" "$r/usr/bin/getfacl"
    cp "$tmp/udev/bin/udevadm" "$r/bin/udevadm"
    mkdir -p "$r/lib/systemd" "$r/lib/udev" "$r/etc/udev"
    ln -s /bin/udevadm "$r/lib/systemd/systemd-udevd"
    cp -a "$tmp/udev/lib/udev/rules.d" "$r/lib/udev/"
    cp "$tmp"/udev/lib/udev/*_id "$r/lib/udev/" 2>/dev/null || true
    cp "$tmp/udev/etc/udev/udev.conf" "$r/etc/udev/"
    cp "$tmp/gojq/usr/bin/gojq" "$r/usr/bin/jq"
    EXTRA_LIBPATH=$tmp/udev/lib/x86_64-linux-gnu copy_libs "$r" "$r/bin/udevadm"
    mkdir -p "$(dirname "$BASE")"
    (cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/base.cpio"
    mv "$tmp/base.cpio" "$BASE"
    rm -rf "$tmp"
}
[ -e "$BASE" ] || build_base

# ---------------------------------------------------------------------------
# 4b. The host's QEMU for the guest (a VMM that uses a device through VFIO):
# the binary, the libraries ldd names and the firmware it boots, under
# /opt/vmm, as a cpio of its own (~60 MB) appended to the initramfs only when
# a selected scenario runs a VMM. (Read over 9p instead, QEMU takes ~7 s just
# to print its version; from the initramfs, under 1 s.) Cached by content.
# ---------------------------------------------------------------------------
VMM_CPIO=
build_vmm() {
    local qemu libs key tmp fw
    qemu=$(command -v qemu-system-x86_64)
    libs=$(ldd "$qemu" | awk '/=> \//{print $3}' | sort -u)
    fw="/usr/share/qemu/qboot.rom /usr/share/qemu/kvmvapic.bin"
    key=$( { echo 2; sha256sum "$qemu" $fw $libs; } | sha256sum | cut -c1-16)
    VMM_CPIO=$CACHE/vmm/vmm-$key.cpio
    [ -e "$VMM_CPIO" ] && return 0
    log "building the guest's VMM cpio ($key)"
    tmp=$CACHE/tmp.vmm.$$
    rm -rf "$tmp"; mkdir -p "$tmp/opt/vmm/bin" "$tmp/opt/vmm/lib" "$tmp/opt/vmm/share"
    cp "$qemu" "$tmp/opt/vmm/bin/"
    cp -L $libs "$tmp/opt/vmm/lib/"
    cp -L $fw "$tmp/opt/vmm/share/"
    mkdir -p "$(dirname "$VMM_CPIO")"
    (cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp.cpio"
    mv "$tmp.cpio" "$VMM_CPIO"
    rm -rf "$tmp"
}
if [ "${VFIOD_VM_NO_VMM:-0}" != 1 ]; then
    build_vmm || { log "WARNING: no VMM for the guest"; VMM_CPIO=; }
fi
# ---------------------------------------------------------------------------
# 4c. mtty.ko and mdpy.ko, the kernel's mdev sample drivers, for the guest
# kernel. Debian builds its kernels without CONFIG_SAMPLES, and a sample
# parent is the only mdev parent a QEMU guest can have, so they are built
# here out of tree: samples/vfio-mdev/{mtty.c,mdpy.c,mdpy-defs.h} from
# linux-source-6.12 at the guest kernel's exact version (mtty counts its
# instances itself, mdpy leaves that to the mdev core: the two ways a parent
# driver can), against that version's linux-headers/linux-kbuild, with the host's
# gcc-12 (the guest kernel's compiler). Nothing is installed on this machine:
# the packages are downloaded and unpacked into a scratch directory. The
# result is a cpio of lib/modules/KREL/extra/{mtty,mdpy}.ko plus the depmod indexes
# of the base's modules and it, appended after the base (its index files
# replace the base's) only when a selected scenario says "# vm-needs: mtty".
# Cached by the kernel package, gcc-12's version and this function's text.
# The same cpio carries edu_mdev.ko (guest/edu-mdev/, our own module: QEMU's
# edu PCI device as an mdev parent, for vfiod's claims on a PCI parent),
# built in the same step against the same headers; the key includes its
# source's hash.
# ---------------------------------------------------------------------------
MTTY_CPIO=
build_mtty() {
    local key tmp hdr kbuild common src t0 t1 t2 t3 t4
    key=$( { echo "$KPKG $KVER $(pkg_version gcc-12)"; declare -f build_mtty; cat "$HERE"/guest/edu-mdev/*; } | sha256sum | cut -c1-16)
    MTTY_CPIO=$CACHE/mtty/mtty-$key.cpio
    [ -e "$MTTY_CPIO" ] && return 0
    log "building mtty.ko for $KREL ($key)"
    tmp=$CACHE/tmp.mtty.$$
    rm -rf "$tmp"; mkdir -p "$tmp/dl" "$tmp/root" "$tmp/src" "$tmp/build"
    # The headers package names its -common and linux-kbuild siblings.
    hdr=linux-headers-$KREL
    common=$(apt-cache depends "$hdr=$KVER" 2>/dev/null | awk '$1=="Depends:" && $2 ~ /^linux-headers-.*-common$/ {print $2; exit}')
    kbuild=$(apt-cache depends "$hdr=$KVER" 2>/dev/null | awk '$1=="Depends:" && $2 ~ /^linux-kbuild-/ {print $2; exit}')
    src=linux-source-$KSERIES
    [ -n "$common" ] && [ -n "$kbuild" ] || { log "mtty: cannot resolve the dependencies of $hdr=$KVER"; return 1; }
    t0=$(date +%s.%N)
    (cd "$tmp/dl" && apt_retry apt-get "${APT_OPTS[@]}" download -qq "$src=$KVER" "$hdr=$KVER" "$common=$KVER" "$kbuild=$KVER" 2>/dev/null) ||
        { log "mtty: apt-get download $src $hdr $common $kbuild (=$KVER) failed"; return 1; }
    t1=$(date +%s.%N)
    local f
    for f in "$tmp/dl/${hdr}_"*.deb "$tmp/dl/${common}_"*.deb "$tmp/dl/${kbuild}_"*.deb; do
        dpkg-deb -x "$f" "$tmp/root"
    done
    # The headers point at /usr/src and /usr/lib as installed: the amd64
    # tree's Makefile includes the -common one by absolute path, and the
    # lib/modules build/source links are absolute. Point them into the tree.
    local H=$tmp/root/usr/src/$hdr l
    sed -i "s|^include /usr/src/|include $tmp/root/usr/src/|" "$H/Makefile"
    find "$tmp/root" -type l -lname '/*' | while read -r l; do
        ln -sfn "$tmp/root$(readlink "$l")" "$l"
    done
    t2=$(date +%s.%N)
    # Only the samples' files from the source tarball; xz has to decompress
    # the whole stream to get to them.
    local sm=$src/samples/vfio-mdev
    dpkg-deb --fsys-tarfile "$tmp/dl/${src}_"*.deb | tar -xO "./usr/src/$src.tar.xz" | xz -dc |
        tar -x -C "$tmp/src" "$sm/mtty.c" "$sm/mdpy.c" "$sm/mdpy-defs.h" ||
        { log "mtty: samples/vfio-mdev/{mtty.c,mdpy.c,mdpy-defs.h} not found in $src=$KVER"; return 1; }
    t3=$(date +%s.%N)
    cp "$tmp/src/$sm/mtty.c" "$tmp/src/$sm/mdpy.c" "$tmp/src/$sm/mdpy-defs.h" "$HERE/guest/edu-mdev/edu_mdev.c" "$tmp/build/"
    echo 'obj-m := mtty.o mdpy.o edu_mdev.o' >"$tmp/build/Kbuild"
    # No BTF for the module: that step needs pahole, and nothing here reads it.
    make -s -C "$H" M="$tmp/build" CONFIG_DEBUG_INFO_BTF_MODULES= modules >"$tmp/make.log" 2>&1 ||
        { cat "$tmp/make.log" >&2; log "mtty: make modules failed"; return 1; }
    t4=$(date +%s.%N)
    log "mtty: download $(du -cb "$tmp"/dl/*.deb | awk 'END{printf "%.0f MB", $1/1e6}') in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s," \
        "headers unpacked in $(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.1f", b-a}') s," \
        "the samples out of the source in $(awk -v a="$t2" -v b="$t3" 'BEGIN{printf "%.1f", b-a}') s," \
        "built in $(awk -v a="$t3" -v b="$t4" 'BEGIN{printf "%.1f", b-a}') s"
    # A copy of the base's module tree (12 MB) plus the samples, indexed together.
    local m=$tmp/mods
    mkdir -p "$m/lib/modules"
    cp -a "$KDIR/modroot/lib/modules/$KREL" "$m/lib/modules/"
    mkdir -p "$m/lib/modules/$KREL/extra"
    objcopy --strip-debug "$tmp/build/mtty.ko" "$m/lib/modules/$KREL/extra/mtty.ko"
    objcopy --strip-debug "$tmp/build/mdpy.ko" "$m/lib/modules/$KREL/extra/mdpy.ko"
    objcopy --strip-debug "$tmp/build/edu_mdev.ko" "$m/lib/modules/$KREL/extra/edu_mdev.ko"
    depmod -b "$m" "$KREL"
    for f in mtty mdpy edu_mdev; do
        modprobe -d "$m" -S "$KREL" --show-depends $f | grep -q 'kernel/drivers/vfio/mdev/mdev.ko' ||
            { log "mtty: depmod does not resolve $f -> mdev"; return 1; }
    done
    mkdir -p "$(dirname "$MTTY_CPIO")"
    (cd "$m" && { echo "lib/modules/$KREL/extra"; ls "lib/modules/$KREL"/extra/*.ko "lib/modules/$KREL"/modules.*; } |
        cpio -o -H newc --quiet -R 0:0) >"$tmp/mtty.cpio"
    mv "$tmp/mtty.cpio" "$MTTY_CPIO"
    rm -rf "$tmp"
}

# Drop cache entries of other inputs (older kernels, older base layouts).
for d in "$CACHE"/kernel/*; do [ "$d" = "$KDIR" ] || rm -rf "$d"; done
for f in "$CACHE"/initramfs/base-*.cpio; do [ "$f" = "$BASE" ] || rm -f "$f"; done
for f in "$CACHE"/vmm/*; do [ -e "$f" ] && [ "$f" != "$VMM_CPIO" ] && rm -rf "$f"; done

# ---------------------------------------------------------------------------
# 5. Per-run overlay: vfiod binaries, scripts, users.
# ---------------------------------------------------------------------------
mkdir -p "$OUT"
rm -rf "$OUT/overlay" "$OUT/share"
mkdir -p "$OUT/overlay" "$OUT/share"
ov=$OUT/overlay
mkdir -p "$ov/usr/bin" "$ov/vm" "$ov/etc" "$ov/usr/share/misc"
for b in vfiod vfioctl vfiod-kubelet-plugin examples/kubelet-standin; do
    if [ -x "$BIN_DIR/$b" ]; then
        objcopy --strip-debug "$BIN_DIR/$b" "$ov/usr/bin/${b#examples/}"
    fi
done
if [ -x "$ov/usr/bin/vfiod" ]; then
    copy_libs "$ov" "$ov/usr/bin/vfiod" "$ov/usr/bin/vfioctl"
fi
if [ -x "$ov/usr/bin/vfiod-kubelet-plugin" ] && [ -x "$ov/usr/bin/kubelet-standin" ]; then
    copy_libs "$ov" "$ov/usr/bin/vfiod-kubelet-plugin" "$ov/usr/bin/kubelet-standin"
fi
[ -e /usr/share/misc/pci.ids ] && cp /usr/share/misc/pci.ids "$ov/usr/share/misc/pci.ids"
cp "$HERE/guest/init" "$ov/init"; chmod 755 "$ov/init"
cp "$HERE/guest/lib.sh" "$ov/vm/lib.sh"
cp -r "$HERE/guest/scenarios" "$ov/vm/scenarios"
cp "$HERE/guest/passwd" "$ov/etc/passwd"
cp "$HERE/guest/group" "$ov/etc/group"
: >"$ov/etc/vfiod-vm-guest"            # marker: only the guest has it
(cd "$ov" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$OUT/overlay.cpio"
cat "$BASE" "$OUT/overlay.cpio" >"$OUT/initrd.cpio"
rm -rf "$ov"

# ---------------------------------------------------------------------------
# 6. Scenarios and the run.
# ---------------------------------------------------------------------------
ALL_SCENARIOS=$(cd "$HERE/guest/scenarios" && ls *.sh | sed 's/\.sh$//' | sort | tr '\n' ' ')
ENABLED=$(grep -v '^\s*#' "$HERE/scenarios.enabled" 2>/dev/null | tr -s ' \n' ' ' || true)
sel=${VFIOD_VM_SCENARIOS:-all}
case $sel in
    all) sel=$ALL_SCENARIOS ;;
    enabled) sel=$ENABLED ;;
esac
# "raw" first, then the rest in alphabetical order.
sel=$(for s in $sel; do [ -e "$HERE/guest/scenarios/$s.sh" ] || die "unknown scenario '$s' (have: $ALL_SCENARIOS)"; echo "$s"; done |
    awk '{print ($1=="raw" ? "0" : "1") " " $1}' | sort -u | cut -d' ' -f2 | tr '\n' ' ')
# The VMM cpio only when a selected scenario starts a VMM (vmm_start, vmm_spawn).
if [ -n "$VMM_CPIO" ] && (cd "$HERE/guest/scenarios" && for x in $sel; do echo "$x.sh"; done | xargs grep -l -q -e vmm_start -e vmm_spawn); then
    cat "$VMM_CPIO" >>"$OUT/initrd.cpio"
fi
# mtty.ko, mdpy.ko (and the module indexes that know them) only when a selected
# scenario needs it. If it cannot be built, the guest has no mtty and such a
# scenario fails saying so: never a silent skip.
if (cd "$HERE/guest/scenarios" && for x in $sel; do echo "$x.sh"; done | xargs grep -l -q -x '# vm-needs: mtty'); then
    if build_mtty; then
        cat "$MTTY_CPIO" >>"$OUT/initrd.cpio"
    else
        rm -rf "$CACHE"/tmp.mtty.$$
        log "ERROR: could not build mtty.ko for $KREL (above); scenarios that need it will fail"
    fi
    for f in "$CACHE"/mtty/*; do [ -e "$f" ] && [ "$f" != "$MTTY_CPIO" ] && rm -f "$f"; done
fi
# A scenario that says "# vm-boot: FLAVOUR" runs in a guest of that flavour
# (harness.py FLAVOURS: tcg-single for many driver moves, sriov for more
# SR-IOV PFs and NUMA); scenarios of one flavour share a boot.
flavours=$(cd "$HERE/guest/scenarios" && for x in $sel; do
    f=$(sed -n 's/^# vm-boot: \([a-z0-9-]*\)$/\1/p' "$x.sh" | head -1)
    [ -z "$f" ] || echo "$x=$f"
done | tr '\n' ' ')
gate=()
if [ "${VFIOD_VM_GATE:-selected}" = enabled ]; then
    gate=(--gate "$ENABLED")
fi
log "kernel $KPKG $KVER ($(basename "$KERNEL")); scenarios: $sel${flavours:+(boot flavours: $flavours)}"
exec python3 "$HERE/harness.py" \
    --kernel "$KERNEL" --initrd "$OUT/initrd.cpio" --out "$OUT" \
    --scenarios "$sel" --rounds "${VFIOD_VM_ROUNDS:-7}" \
    --smp "${VFIOD_VM_SMP:-2}" --mem "${VFIOD_VM_MEM:-1024}" \
    --flavours "$flavours" --tier-start "$T_START" ${gate[@]+"${gate[@]}"}
