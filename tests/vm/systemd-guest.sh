#!/bin/bash
# systemd-guest check: one QEMU guest running Debian 12 with systemd installs
# the vfiod .deb and, through the installed, hardened vfiod.service, moves an
# e1000e to vfio-pci (checked in the guest's sysfs and /dev/vfio) and sees a
# hotplug_add event for an e1000e hot-added over QMP: proof that the unit's
# sandbox lets both driver moves and udev/netlink events through.
#
# Run as root on Debian 12:  tests/vm/systemd-guest.sh
#
# Reuses: the guest kernel cached by tests/vm/run.sh (same package resolution;
# its vmlinux when run.sh's cache has it, else extracted here), the .deb of
# packaging/build-deb.sh (run every time, incremental), the bookworm mmdebstrap
# tree cached by tests/pkg/run.sh (else mmdebstrap here, cached under
# $CACHE/systemd-guest/rootfs-<recipe hash>).
# Builds per run: a copy of the tree + the .deb + kernel modules (vfio-pci,
# vfio_iommu_type1, e1000e; depmod) + the oneshot test unit, as an ext4 image
# (mke2fs -d, no loop mount); a busybox initramfs (virtio_blk, ext4) that
# switch_roots. Boots with -snapshot. Guest side: systemd-guest/guest-test.sh;
# QEMU and the console: systemd-guest/boot.py, on the machine and with the
# QEMU/console/QMP code of tests/vm/harness.py (q35, IOMMU with interrupt
# remapping, qboot).
#
# Nothing here writes to this machine's /sys: driver moves happen in the guest
# only (the guest script refuses to run without /etc/vfiod-sg-guest and
# vfiodsg.guest=1 on the kernel command line).
#
# Environment:
#   VFIOD_VM_CACHE        cache directory (default tests/vm/.cache, shared with run.sh)
#   VFIOD_PKG_CACHE       tests/pkg's tree cache (default tests/pkg/.cache)
#   VFIOD_SG_TIMEOUT      seconds for the whole guest run (default 300)
#   VFIOD_SG_VERBOSE=1    stream the guest console
#   VFIOD_SG_SKIP_BUILD=1 use build/deb/vfiod_*.deb as it is
# Logs of the last run: $CACHE/systemd-guest/last-run/ (console.log, qmp-events.jsonl).
# Exit: 0 pass, 1 fail, 2 setup error.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SG=$HERE/systemd-guest
CACHE=${VFIOD_VM_CACHE:-$HERE/.cache}
mkdir -p "$CACHE"; CACHE=$(cd "$CACHE" && pwd)
SGC=$CACHE/systemd-guest
OUT=$SGC/last-run
PKG_CACHE=${VFIOD_PKG_CACHE:-$REPO/tests/pkg/.cache}
MIRROR=http://deb.debian.org/debian
# Modules in the guest: the root disk (initramfs) and what the test moves.
INITRD_MODULES="virtio_pci virtio_blk crc32c_generic ext4"
ROOT_MODULES="vfio-pci vfio_iommu_type1 e1000e"

T_START=$(date +%s.%N)
now() { awk -v a="$(date +%s.%N)" -v b="$T_START" 'BEGIN{printf "%.1f", a-b}'; }
log() { printf '[sg %6ss] %s\n' "$(now)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root"

WORK=$(mktemp -d /var/tmp/vfiod-sg.XXXXXX)
BOOT_PID=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$BOOT_PID" ] && kill -0 "$BOOT_PID" 2>/dev/null; then
        kill -TERM "$BOOT_PID" 2>/dev/null || true   # boot.py kills QEMU (and QEMU has PDEATHSIG)
        wait "$BOOT_PID" 2>/dev/null || true
    fi
    rm -rf --one-file-system "$WORK" "$SGC"/tmp.*.$$
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 1. tools (as tests/vm/run.sh installs QEMU: from backports when qemu-utils is) --
pkg_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3=="installed"{print $4}'; }
APT_OPTS=(-o DPkg::Lock::Timeout=600)
need=()
for p in busybox-static kmod cpio e2fsprogs mmdebstrap python3; do [ -n "$(pkg_version "$p")" ] || need+=("$p"); done
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    apt-get "${APT_OPTS[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt_src=$SGC/apt-sources; rm -rf "$apt_src"; mkdir -p "$apt_src"
    qopts=("${APT_OPTS[@]}") t=()
    case $(pkg_version qemu-utils) in 1:7.2*|"") ;; *)
        [ -s /etc/apt/sources.list ] && cp /etc/apt/sources.list "$apt_src/00-main.list"
        for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do [ -e "$f" ] && cp "$f" "$apt_src/"; done
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$MIRROR" >"$apt_src/zz-bpo.sources"
        qopts+=(-o "Dir::Etc::SourceParts=$apt_src" -o Dir::Etc::SourceList=/dev/null); t=(-t bookworm-backports) ;;
    esac
    log "apt-get install qemu-system-x86 ${t[*]}"
    apt-get "${qopts[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive apt-get "${qopts[@]}" install -y -qq --no-install-recommends "${t[@]}" qemu-system-x86 >/dev/null
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not installed"
mkdir -p "$SGC"

# ---- 2. the .deb (incremental) ---------------------------------------------------
t=$(date +%s.%N)
if [ "${VFIOD_SG_SKIP_BUILD:-0}" != 1 ]; then
    log "packaging/build-deb.sh"
    "$REPO/packaging/build-deb.sh" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; die "package build failed"; }
fi
DEB=$(ls "$REPO"/build/deb/vfiod_*.deb 2>/dev/null | grep -v dbgsym | head -n1)
[ -f "$DEB" ] || die "no build/deb/vfiod_*.deb"
log "package: ${DEB##*/} ($(awk -v t="$t" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n-t}') s)"

# ---- 3. kernel: the package run.sh resolves; its cached vmlinux if present --------
resolve_kernel() {   # as tests/vm/run.sh
    if [ -n "${VFIOD_VM_KERNEL_PKG:-}" ]; then KPKG=$VFIOD_VM_KERNEL_PKG; else
        KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1\..*-amd64$/{print $2; exit}'); fi
    [ -n "$KPKG" ] && KVER=$(apt-cache policy "$KPKG" 2>/dev/null | awk '/Candidate:/{print $2}')
    [ -n "${KPKG:-}" ] && [ -n "${KVER:-}" ] && [ "$KVER" != "(none)" ]
}
resolve_kernel || { apt-get "${APT_OPTS[@]}" update -qq; resolve_kernel; } || die "cannot resolve linux-image-6.1.*-amd64"
KREL=${KPKG#linux-image-}
BB_VER=$(pkg_version busybox-static)
KKEY=$( { echo "sg-kernel-v1 $KPKG $KVER $BB_VER $INITRD_MODULES / $ROOT_MODULES"; cat "$SG/init"; } | sha256sum | cut -c1-16)
KC=$SGC/kernel-$KKEY
if [ ! -e "$KC/done" ]; then
    t=$(date +%s.%N)
    tmp=$SGC/tmp.kernel.$$; rm -rf "$tmp"; mkdir -p "$tmp/dl" "$tmp/out/modroot" "$tmp/out/initrd/bin"
    log "downloading $KPKG $KVER (modules for the root disk and the test)"
    (cd "$tmp/dl" && apt-get "${APT_OPTS[@]}" download -qq "$KPKG=$KVER" 2>/dev/null) || die "apt-get download $KPKG"
    dpkg-deb -x "$tmp"/dl/*.deb "$tmp/root"
    depmod -b "$tmp/root" "$KREL"
    cp "$tmp/root/boot/vmlinuz-$KREL" "$tmp/out/vmlinuz"
    closure() { local m; for m in "$@"; do modprobe -d "$tmp/root" -S "$KREL" --show-depends "$m" | awk '$1=="insmod"{print $2}'; done | awk '!seen[$0]++'; }
    # Root image: the modules and depmod, so modprobe@vfio_pci and udev's autoload work.
    closure $INITRD_MODULES $ROOT_MODULES | while read -r f; do
        rel=${f#"$tmp/root"}; mkdir -p "$tmp/out/modroot$(dirname "$rel")"; cp "$f" "$tmp/out/modroot$rel"
    done
    for f in modules.order modules.builtin modules.builtin.modinfo; do
        cp "$tmp/root/lib/modules/$KREL/$f" "$tmp/out/modroot/lib/modules/$KREL/"
    done
    depmod -b "$tmp/out/modroot" "$KREL"
    # initramfs: busybox, the root-disk modules in load order, /init.
    r=$tmp/out/initrd
    cp /bin/busybox "$r/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"; done
    mkdir -p "$r/proc" "$r/sys" "$r/dev" "$r/mod"
    closure $INITRD_MODULES | while read -r f; do cp "$f" "$r/mod/"; echo "/mod/${f##*/}"; done >"$r/modules.list"
    cp "$SG/init" "$r/init"; chmod 755 "$r/init"
    (cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/out/initrd.cpio"
    rm -rf "$r"
    touch "$tmp/out/done"
    rm -rf "$SGC"/kernel-*; mv "$tmp/out" "$KC"; rm -rf "$tmp"
    log "kernel modules and initramfs cached ($(awk -v t="$t" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n-t}') s)"
fi
KERNEL=
for d in "$CACHE"/kernel/"${KPKG}_${KVER}"_*/; do
    [ -e "$d/id" ] || continue
    if [ -e "$d/vmlinux" ]; then KERNEL=$d/vmlinux; break; fi
done
if [ -z "$KERNEL" ]; then
    # run.sh has not cached this kernel (yet): extract the vmlinux (PVH) here, once.
    if [ ! -e "$KC/vmlinux" ]; then
        python3 "$HERE/extract-vmlinux.py" "$KC/vmlinuz" "$KC/vmlinux"
    fi
    KERNEL=$KC/vmlinux
fi
log "kernel $KPKG $KVER: $KERNEL"

# ---- 4. rootfs tree: tests/pkg's cached bookworm tree, else our own -----------
TREE=
for d in "$PKG_CACHE"/bookworm-*/; do
    d=${d%/}
    [ -f "$d/.vfiod-pkg-complete" ] && [ -x "$d/lib/systemd/systemd" ] && [ -x "$d/sbin/modprobe" ] &&
        [ -x "$d/bin/udevadm" ] && ls "$d"/usr/lib/x86_64-linux-gnu/libudev.so.1 >/dev/null 2>&1 || continue
    TREE=$d; break
done
if [ -z "$TREE" ]; then
    recipe() { printf '%s\n' --variant=minbase --include=systemd-sysv,udev,kmod,libudev1 --format=directory; }
    RKEY=$( { echo "sg-rootfs-v1 bookworm $MIRROR"; recipe; } | sha256sum | cut -c1-16)
    TREE=$SGC/rootfs-$RKEY
    if [ ! -f "$TREE/.complete" ]; then
        t=$(date +%s.%N)
        log "mmdebstrap bookworm (no usable tree in $PKG_CACHE)"
        rm -rf --one-file-system "$SGC"/rootfs-*
        mapfile -t args < <(recipe)
        mmdebstrap --mode=root --quiet "${args[@]}" bookworm "$TREE.tmp" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1 ||
            { cat "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
        mv "$TREE.tmp" "$TREE"; touch "$TREE/.complete"
        log "rootfs tree built ($(awk -v t="$t" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n-t}') s)"
    fi
fi
log "rootfs tree: $TREE"

# ---- 5. the image -----------------------------------------------------------------
T_IMG=$(date +%s.%N)
R=$WORK/root
cp -a "$TREE" "$R"
rm -f "$R/.vfiod-pkg-complete" "$R/.complete"
cp -a "$KC/modroot/lib/modules" "$R/lib/"
cp "$DEB" "$R/root/"
install -m 0755 "$SG/guest-test.sh" "$R/usr/local/sbin/vfiod-sg-test"
install -m 0644 "$SG/vfiod-sg-test.service" "$R/etc/systemd/system/vfiod-sg-test.service"
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf ../vfiod-sg-test.service "$R/etc/systemd/system/multi-user.target.wants/vfiod-sg-test.service"
ln -sf /dev/null "$R/etc/systemd/system/serial-getty@ttyS0.service"
: >"$R/etc/vfiod-sg-guest"          # marker: only the guest has it
echo vfiod-sg >"$R/etc/hostname"
printf '/dev/vda / ext4 rw 0 1\n' >"$R/etc/fstab"
mke2fs -q -t ext4 -d "$R" "$WORK/root.img" 1G || die "mke2fs failed"
rm -rf --one-file-system "$R"
IMG_S=$(awk -v t="$T_IMG" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n-t}')
log "ext4 image built (${IMG_S} s)"

# ---- 6. boot -----------------------------------------------------------------------
rm -rf "$OUT"; mkdir -p "$OUT"
v=(); [ "${VFIOD_SG_VERBOSE:-0}" = 1 ] && v=(--verbose)
rc=0
python3 "$SG/boot.py" --kernel "$KERNEL" --initrd "$KC/initrd.cpio" --image "$WORK/root.img" \
    --out "$OUT" --timeout "${VFIOD_SG_TIMEOUT:-300}" ${v[@]+"${v[@]}"} &
BOOT_PID=$!
wait "$BOOT_PID" || rc=$?
BOOT_PID=
TOTAL=$(now)
grep -a 'VFIOD-SG' "$OUT/console.log" | sed 's/^/  /' >&2 || true
if [ "$rc" != 0 ]; then
    echo "----- guest console ($OUT/console.log) -----" >&2
    cat "$OUT/console.log" >&2
    log "timings: image ${IMG_S} s, $(cat "$OUT/timing" 2>/dev/null), total ${TOTAL} s"
    log "systemd-guest: FAIL"
    exit 1
fi
log "timings: image ${IMG_S} s, $(cat "$OUT/timing"), total ${TOTAL} s"
log "systemd-guest: PASS"
