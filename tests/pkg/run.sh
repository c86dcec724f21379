#!/bin/bash
# Package tier. Run as root on Debian 12 (apt must work):
#
#   tests/pkg/run.sh
#
# 1. installs the tools it needs from apt (debhelper, dpkg-dev, fakeroot,
#    lintian, mmdebstrap, systemd-container, ...),
# 2. builds the .deb with packaging/build-deb.sh,
# 3. runs lintian (as an unprivileged user) and fails on any error/warning,
# 4. checks `systemd-analyze security` of systemd/vfiod.service <= 1.5,
# 5. for Debian 12 (bookworm) and 13 (trixie): boots a cached mmdebstrap
#    minbase tree with systemd in `systemd-nspawn -b` whose oneshot unit runs
#    tests/pkg/guest-test.sh: install, unit state, socket owner/mode, access
#    control, shell completion, metrics scraped by Debian's Prometheus,
#    socket activation, upgrade restart, remove, purge.
#
# Environment:
#   VFIOD_PKG_CACHE        where base trees are cached (default tests/pkg/.cache)
#   VFIOD_PKG_SUITES       suites to test (default "bookworm trixie")
#   VFIOD_PKG_MIRROR       Debian mirror (default http://deb.debian.org/debian)
#   VFIOD_PKG_CACHE_DAYS   rebuild cached trees older than this (default 30)
#   VFIOD_PKG_SKIP_BUILD=1 test build/deb/vfiod_*.deb as it is
#   VFIOD_PKG_PIUPARTS=0   skip piuparts (install/purge leftovers check, bookworm)
# Exit status: 0 when every step passed, 1 otherwise.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/tests/pkg
cache=${VFIOD_PKG_CACHE:-$here/.cache}
suites=${VFIOD_PKG_SUITES:-bookworm trixie}
mirror=${VFIOD_PKG_MIRROR:-http://deb.debian.org/debian}
max_days=${VFIOD_PKG_CACHE_DAYS:-30}
guest_timeout=240

T0=$(date +%s)
log() { printf '[pkg %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (systemd-nspawn, mmdebstrap --mode=root)"

work=$(mktemp -d /var/tmp/vfiod-pkg.XXXXXX)
chmod 0755 "$work"
bg_pids=()
cleanup() {
	local rc=$? p m
	trap - EXIT INT TERM
	# Background jobs run in their own process groups (setsid): end each
	# group, politely first.
	for p in "${bg_pids[@]}"; do
		kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${bg_pids[@]}"; do
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
		kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	# Whatever is still mounted under the work directory (the overlays,
	# and piuparts' /proc, /dev/pts... if it was interrupted), deepest first.
	while read -r m; do
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
	done < <(awk -v w="$work/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
	rm -rf --one-file-system "$work"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- tools -------------------------------------------------------------------
tools=(debhelper dpkg-dev fakeroot lintian mmdebstrap systemd-container systemd pkg-config libudev-dev)
piuparts=${VFIOD_PKG_PIUPARTS:-1}
[ "$piuparts" != 1 ] || tools+=(piuparts)
missing=()
for t in "${tools[@]}"; do
	dpkg-query -W -f='${db:Status-Status}' "$t" 2>/dev/null | grep -qx installed || missing+=("$t")
done
if ((${#missing[@]})); then
	log "apt-get install ${missing[*]}"
	apt-get -o DPkg::Lock::Timeout=300 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
		"${missing[@]}" >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; die "apt-get install failed"; }
fi
log "tools ready"

# ---- base trees (cached, built in the background while the package builds) --
# Everything that goes into a tree is in this recipe, and the cache key is its
# hash: change the recipe and the tree is rebuilt.
recipe() {
	printf '%s\n' --variant=minbase \
		--include=systemd-sysv,udev,kmod,dbus,pci.ids,libudev1,bash-completion,prometheus \
		'--customize-hook=mkdir -p "$1/var/log/journal"' \
		'--customize-hook=rm -f "$1/etc/hostname"' \
		'--customize-hook=systemctl --root="$1" mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer prometheus.service' \
		--format=directory
}
recipe_key() { { echo recipe-v1 "$1" "$mirror"; recipe; } | sha256sum | cut -c1-16; }
mkdir -p "$cache"
declare -A tree mmd_pid
for s in $suites; do
	key=$(recipe_key "$s")
	tree[$s]=$cache/$s-$key
	if [ -f "${tree[$s]}/.vfiod-pkg-complete" ] && [ -z "$(find "${tree[$s]}/.vfiod-pkg-complete" -mtime "+$max_days")" ]; then
		log "base tree $s: cached ${tree[$s]##*/}"
		continue
	fi
	rm -rf --one-file-system "$cache/$s-"*
	log "base tree $s: mmdebstrap (background)"
	mapfile -t args < <(recipe)
	setsid bash -c 'mmdebstrap --mode=root --quiet "${@:3}" "$1" "$2.tmp" "$0" && mv "$2.tmp" "$2" && touch "$2/.vfiod-pkg-complete"' \
		"$mirror" "$s" "${tree[$s]}" "${args[@]}" >"$work/mmdebstrap-$s.log" 2>&1 &
	mmd_pid[$s]=$!
	bg_pids+=("$!")
done

# ---- package ----------------------------------------------------------------
if [ "${VFIOD_PKG_SKIP_BUILD:-0}" = 1 ]; then
	log "using the existing build/deb/*.deb"
else
	log "packaging/build-deb.sh"
	"$repo/packaging/build-deb.sh" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; die "package build failed"; }
	grep '^\[build-deb\] cargo' "$work/build.log" >&2 || true
fi
mkdir -p "$work/debs"
cp "$repo"/build/deb/vfiod_*.deb "$work/debs/"
chmod 0644 "$work"/debs/*.deb
deb=$(ls "$work"/debs/vfiod_*.deb | head -n1)
[ -f "$deb" ] || die "no vfiod_*.deb in build/deb"
log "built ${deb##*/}"
# The same payload with a higher version, for the guests' upgrade step
# (prerm upgrade / postinst configure OLD-VERSION, as a real upgrade runs).
mkdir -p "$work/upgrade/pkg" "$work/debs/upgrade"
dpkg-deb -R "$deb" "$work/upgrade/pkg"
sed -i 's/^Version: .*/&+upgradetest1/' "$work/upgrade/pkg/DEBIAN/control"
dpkg-deb --root-owner-group -Zgzip -z1 -b "$work/upgrade/pkg" "$work/debs/upgrade/" >/dev/null
chmod 0644 "$work"/debs/upgrade/*.deb

# ---- lintian (as an unprivileged user) ---------------------------------------
log "lintian --fail-on error,warning --pedantic -I"
# Copies in a world-readable directory: the checkout may not be readable
# by nobody (a clone under /root, say).
mkdir -p "$work/lintian"
cp "$repo"/build/deb/*.deb "$work/lintian/"
chmod 0644 "$work"/lintian/*.deb
if ! (cd "$work/lintian" && runuser -u nobody -- env HOME="$work/lintian" TMPDIR=/tmp \
	lintian --fail-on error,warning --pedantic -I ./*.deb) >"$work/lintian.log" 2>&1; then
	cat "$work/lintian.log" >&2
	die "lintian"
fi
cat "$work/lintian.log" >&2
log "lintian: clean"

# ---- unit hardening score ----------------------------------------------------
score=$(systemd-analyze security --offline=yes --no-pager "$repo/systemd/vfiod.service" 2>/dev/null |
	sed -n 's/.*Overall exposure level for vfiod.service: \([0-9.]*\).*/\1/p')
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' || die "systemd-analyze security: '$score' (> 1.5)"
log "systemd-analyze security (offline, host systemd $(systemctl --version | awk 'NR==1{print $2}')): $score"

# ---- boot each suite and run the guest test ---------------------------------
for s in $suites; do
	if [ -n "${mmd_pid[$s]:-}" ]; then
		wait "${mmd_pid[$s]}" || { cat "$work/mmdebstrap-$s.log" >&2; die "mmdebstrap $s"; }
		log "base tree $s: built ($(du -sh "${tree[$s]}" | cut -f1))"
	fi
done

# piuparts (install, remove, purge in a chroot, checking for leftovers) runs
# beside the guests.
if [ "$piuparts" = 1 ]; then
	pbase=$cache/piuparts-bookworm-$(echo piuparts-v1 "$mirror" | sha256sum | cut -c1-16).tar.gz
	log "piuparts (bookworm, background)"
	# shellcheck disable=SC2016
	setsid bash -c '
		pbase=$1 cache=$2 mirror=$3 max_days=$4 work=$5 deb=$6
		set -e
		if [ ! -f "$pbase" ] || [ -n "$(find "$pbase" -mtime "+$max_days")" ]; then
			rm -f "$cache"/piuparts-bookworm-*.tar.gz
			mmdebstrap --mode=root --quiet --variant=minbase --include=systemd-sysv,pci.ids \
				bookworm "$pbase.tmp.tar.gz" "$mirror"
			mv "$pbase.tmp.tar.gz" "$pbase"
		fi
		exec piuparts --basetgz="$pbase" --distribution=bookworm --mirror="$mirror" --no-eatmydata \
			--tmpdir="$work" "$deb"
	' piuparts "$pbase" "$cache" "$mirror" "$max_days" "$work" "$deb" >"$work/piuparts.log" 2>&1 &
	pp_pid=$!
	bg_pids+=("$!")
fi

declare -A ns_pid
for s in $suites; do
	root=$work/$s/root res=$work/$s/results
	mkdir -p "$root" "$res" "$work/$s/upper" "$work/$s/ovwork"
	# A throw-away overlay over the cached tree; a copy where overlayfs
	# is not available.
	if ! mount -t overlay "vfiod-pkg-$s" -o "lowerdir=${tree[$s]},upperdir=$work/$s/upper,workdir=$work/$s/ovwork" "$root" 2>/dev/null; then
		cp -a "${tree[$s]}/." "$root/"
	fi
	install -m 0755 "$here/guest-test.sh" "$root/usr/local/sbin/vfiod-pkg-test"
	cat >"$root/etc/systemd/system/vfiod-pkg-test.service" <<-'EOF'
	[Unit]
	Description=vfiod package test
	After=multi-user.target
	SuccessAction=poweroff
	FailureAction=poweroff
	[Service]
	Type=oneshot
	ExecStart=/usr/local/sbin/vfiod-pkg-test
	TimeoutStartSec=200
	[Install]
	WantedBy=multi-user.target
	EOF
	ln -sf ../vfiod-pkg-test.service "$root/etc/systemd/system/multi-user.target.wants/vfiod-pkg-test.service"
	log "$s: systemd-nspawn -b"
	setsid timeout -k 10 "$guest_timeout" systemd-nspawn --quiet --boot --register=no --keep-unit \
		--directory="$root" --machine="vfiod-pkg-$s-$$" --console=pipe --private-network \
		--resolv-conf=off --timezone=off --link-journal=no \
		--bind="$res:/results" --bind-ro="$work/debs:/pkg" \
		</dev/null >"$work/$s/nspawn.log" 2>&1 &
	ns_pid[$s]=$!
	bg_pids+=("$!")
	echo "$(date +%s)" >"$work/$s/start"
done

fail=0
rm -rf "$repo/build/pkg-results"
for s in $suites; do
	rc=0
	wait "${ns_pid[$s]}" || rc=$?
	took=$(($(date +%s) - $(cat "$work/$s/start")))
	res=$work/$s/results
	mkdir -p "$repo/build/pkg-results"
	cp -r "$res" "$repo/build/pkg-results/$s"
	echo "----- $s: guest test ($took s, nspawn exit $rc) -----" >&2
	cat "$res/test.log" >&2 2>/dev/null || echo "(no test.log)" >&2
	if [ "$(cat "$res/status" 2>/dev/null)" = 0 ] && [ "$rc" = 0 ]; then
		log "$s: PASS in ${took}s"
	else
		fail=1
		log "$s: FAIL (status '$(cat "$res/status" 2>/dev/null)', nspawn exit $rc); guest journal:"
		if [ -s "$res/journal.txt" ]; then
			grep -v -e 'kernel:' -e pam_unix "$res/journal.txt" | tail -n 250 >&2
		else
			journalctl -D "$work/$s/root/var/log/journal" --no-pager 2>&1 | grep -v pam_unix | tail -n 250 >&2
		fi
		echo "----- $s: nspawn output -----" >&2
		tail -n 40 "$work/$s/nspawn.log" >&2
	fi
done

if [ -n "${pp_pid:-}" ]; then
	if wait "$pp_pid"; then
		piuparts_ok=1; log "piuparts: PASS ($(grep -o 'PASS: All tests' "$work/piuparts.log" | head -n1))"
	else
		piuparts_ok=0; fail=1
		grep -E 'ERROR|FAIL' "$work/piuparts.log" | head -n 40 >&2
		tail -n 60 "$work/piuparts.log" >&2
		log "piuparts: FAIL"
	fi
	cp "$work/piuparts.log" "$repo/build/pkg-results/" 2>/dev/null || true
fi

log "guest logs and journals: build/pkg-results/"
# One closing line for the whole tier: the host steps (build, lintian,
# security score) plus every guest check.
passed=3 failed=0
for s in $suites; do
	line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$repo/build/pkg-results/$s/test.log" 2>/dev/null | tail -n1)
	if [ -n "$line" ]; then
		passed=$((passed + ${line%% *})); f=${line#*, }; failed=$((failed + ${f%% *}))
	else
		failed=$((failed + 1))
	fi
done
case ${piuparts_ok:-} in 1) passed=$((passed + 1)) ;; 0) failed=$((failed + 1)) ;; esac
((failed > 0)) || [ "$fail" = 0 ] || failed=1
[ "$fail" = 0 ] || { echo "pkg: $passed passed, $failed failed"; die "package tier failed"; }
log "package tier: all passed"
echo "pkg: $passed passed, $failed failed"
