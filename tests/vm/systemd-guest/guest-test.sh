#!/bin/bash
# Runs inside the systemd guest of tests/vm/systemd-guest.sh, as a oneshot
# unit after multi-user.target. Installs the vfiod .deb, then through the
# installed, hardened vfiod.service: registers the e1000e below root port
# 00:02.0, binds it to vfio-pci (checked in sysfs and /dev/vfio), asks the host
# (serial marker) to hot-add an e1000e below the empty port 00:03.0, expects a
# hotplug_add event from `vfioctl --json events`, unbinds (back on e1000e).
# Prints "VFIOD-SG-RESULT: PASS" or "VFIOD-SG-RESULT: FAIL ..." on the console.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
T0=$(date +%s%N)
ms() { echo $((($(date +%s%N) - T0) / 1000000)); }
say() { echo "VFIOD-SG: [$(ms) ms] $*"; }
NFAIL=0 NPASS=0
ok() { NPASS=$((NPASS + 1)); say "ok: $*"; }
bad() { NFAIL=$((NFAIL + 1)); say "NOT OK: $*"; }
finish() {
    say "--- vfiod journal ---"
    journalctl -b -u vfiod.service -u vfiod.socket -u modprobe@vfio_pci.service --no-pager -o short-monotonic 2>&1 | tail -n 80
    say "--- events stream ---"; cat /tmp/events.jsonl 2>/dev/null; cat /tmp/events.err 2>/dev/null
    [ -n "${EVPID:-}" ] && kill "$EVPID" 2>/dev/null
    say "$NPASS passed, $NFAIL failed"
    if [ "$NFAIL" = 0 ] && [ "$NPASS" -gt 0 ]; then echo "VFIOD-SG-RESULT: PASS"; else echo "VFIOD-SG-RESULT: FAIL"; fi
    exit 0
}
die() { bad "$*"; finish; }
wait_until() { # SECONDS CMD...
    local end=$(($(date +%s) + $1)); shift
    until "$@"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}
[ -e /etc/vfiod-sg-guest ] && grep -qw vfiodsg.guest=1 /proc/cmdline || { echo "VFIOD-SG-RESULT: FAIL (not the test guest)"; exit 1; }
echo "VFIOD-SG-TEST-START"
say "kernel $(uname -r), systemd $(systemctl --version | awk 'NR==1{print $2}'), $(systemctl is-system-running 2>&1)"

dev_under() { local d; for d in /sys/bus/pci/devices/$1/0000:*; do [ -e "$d/vendor" ] && { basename "$d"; return 0; }; done; return 1; }
drv() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)" 2>/dev/null || echo none; }
has_driver() { [ "$(drv "$1")" = "$2" ]; }
vc() { OUT=$(vfioctl "$@" 2>/tmp/vc.err); RC=$?; ERR=$(cat /tmp/vc.err); say "vfioctl $* -> rc=$RC $OUT $ERR"; return $RC; }

NIC=$(dev_under 0000:00:02.0) || die "no device below root port 0000:00:02.0"
wait_until 20 has_driver "$NIC" e1000e || die "$NIC is on $(drv "$NIC"), expected e1000e (udev/modules)"
ok "$NIC on e1000e at boot"

# ---- install ------------------------------------------------------------------
DEB=$(ls /root/vfiod_*.deb | head -n1)
if DEBIAN_FRONTEND=noninteractive dpkg -i "$DEB" >/tmp/dpkg.log 2>&1; then
    ok "dpkg -i $(basename "$DEB")"
else
    cat /tmp/dpkg.log; die "dpkg -i failed"
fi
systemctl -q is-active vfiod.socket && ok "vfiod.socket active after install" || bad "vfiod.socket $(systemctl is-active vfiod.socket) after install"
# The postinst starts the service; if it did not, a connection does (socket activation).
if ! wait_until 10 systemctl -q is-active vfiod.service; then
    say "note: vfiod.service $(systemctl is-active vfiod.service) 10 s after dpkg -i; connecting to the socket"
    vfioctl health >/dev/null 2>&1
fi
if wait_until 30 systemctl -q is-active vfiod.service; then
    ok "vfiod.service active ($(systemctl show -p MainPID --value vfiod.service) $(systemctl show -p ActiveEnterTimestampMonotonic --value vfiod.service))"
else
    systemctl status --no-pager vfiod.service vfiod.socket; die "vfiod.service not active: $(systemctl is-active vfiod.service)"
fi
# modprobe@.service is a oneshot without RemainAfterExit: inactive with Result=success.
r=$(systemctl show -p Result --value modprobe@vfio_pci.service)
[ -d /sys/module/vfio_pci ] && [ "$r" = success ] && ok "vfio_pci loaded by modprobe@vfio_pci.service" ||
    bad "vfio_pci: /sys/module/vfio_pci $([ -d /sys/module/vfio_pci ] && echo present || echo absent), modprobe@vfio_pci.service Result=$r"

vc --json health && ok "health" || bad "vfioctl health failed"
echo "$OUT" | grep -q '"hotplug" *: *"udev"' && ok "vfiod listens for udev events" || say "note: health does not say hotplug=udev"

# ---- register + bind ----------------------------------------------------------
vc --json register "$NIC" --name sgnic && ok "register $NIC" || die "register $NIC failed"
t=$(date +%s%N)
vc bind sgnic && ok "bind sgnic ($((($(date +%s%N) - t) / 1000000)) ms)" || die "bind failed"
has_driver "$NIC" vfio-pci && ok "kernel: $NIC driver -> vfio-pci" || bad "kernel: $NIC driver is $(drv "$NIC"), expected vfio-pci"
GRP=$(basename "$(readlink /sys/bus/pci/devices/$NIC/iommu_group)")
[ -c "/dev/vfio/$GRP" ] && ok "/dev/vfio/$GRP exists" || bad "/dev/vfio/$GRP missing ($(ls /dev/vfio 2>&1 | tr '\n' ' '))"

# ---- hotplug event ------------------------------------------------------------
# --since 0: an event that comes before the client has subscribed is replayed.
vfioctl --json events --since 0 >/tmp/events.jsonl 2>/tmp/events.err &
EVPID=$!
sleep 1
kill -0 "$EVPID" 2>/dev/null || bad "vfioctl events exited: $(cat /tmp/events.err)"
echo "VFIOD-SG-HOTPLUG-REQUEST"
if wait_until 30 dev_under 0000:00:03.0 >/dev/null; then
    HP=$(dev_under 0000:00:03.0)
    ok "hot-added device $HP below 0000:00:03.0"
    if wait_until 15 grep -q "\"hotplug_add\".*\"$HP\"\|\"$HP\".*\"hotplug_add\"" /tmp/events.jsonl; then
        ok "hotplug_add event for $HP: $(grep hotplug_add /tmp/events.jsonl | head -n1)"
    else
        bad "no hotplug_add event for $HP from vfiod (events: $(cat /tmp/events.jsonl))"
    fi
    wait_until 10 has_driver "$HP" e1000e && say "hot-added $HP on e1000e" || say "note: hot-added $HP on $(drv "$HP")"
else
    bad "no device appeared below 0000:00:03.0 (host device_add failed?)"
fi

# ---- hand-over to an unprivileged VMM, and a holder of another uid --------------
as_uid() { local u=$1; shift; setpriv --reuid="$u" --regid="$u" --clear-groups "$@"; }
node_mode() { stat -c %a "/dev/vfio/$GRP" 2>&1; }
MODE0=$(node_mode)
as_uid 1000 sh -c "exec 3<>/dev/vfio/$GRP" 2>/dev/null && bad "uid 1000 opened /dev/vfio/$GRP before any grant" || ok "uid 1000 cannot open /dev/vfio/$GRP ($MODE0) before the attach"
if vc --json attach sgnic vm-sg --uid 1000; then
    ok "attach sgnic for uid 1000"
    echo "$OUT" | grep -q '"attached_uid" *: *1000' && ok "attached_uid 1000" || bad "attached_uid not 1000: $OUT"
    as_uid 1000 sh -c "exec 3<>/dev/vfio/$GRP" && ok "uid 1000 opens /dev/vfio/$GRP through the grant ($(node_mode))" || bad "uid 1000 cannot open /dev/vfio/$GRP after the attach ($(node_mode))"
    as_uid 1001 sh -c "exec 3<>/dev/vfio/$GRP" 2>/dev/null && bad "uid 1001 opened /dev/vfio/$GRP while it is uid 1000's" || ok "uid 1001 still cannot open /dev/vfio/$GRP"
    # The VMM (uid 1000) keeps the group open across the detach below.
    # setpriv directly, not the as_uid function: a backgrounded function is a
    # forked subshell, so $! would not be the holder's pid.
    setpriv --reuid=1000 --regid=1000 --clear-groups sh -c "exec 3<>/dev/vfio/$GRP; exec sleep 300" &
    HOLDER=$!
    sleep 0.5
    vc detach sgnic --keep-bound && ok "detach --keep-bound" || bad "detach failed"
    [ "$(node_mode)" = "$MODE0" ] && ok "revoke leaves /dev/vfio/$GRP as it was ($MODE0)" || bad "/dev/vfio/$GRP is $(node_mode) after the revoke, was $MODE0"
    as_uid 1000 sh -c "exec 3<>/dev/vfio/$GRP" 2>/dev/null && bad "uid 1000 still opens /dev/vfio/$GRP after detach" || ok "uid 1000 cannot open /dev/vfio/$GRP after detach"
    # The installed unit sees a holder of another uid before writing anything.
    if vc --json unbind sgnic; then
        bad "unbind succeeded while uid 1000's pid $HOLDER holds /dev/vfio/$GRP"
    else
        echo "$ERR" | grep -q device_busy && echo "$ERR" | grep -q "$HOLDER" &&
            ok "unbind refused: device_busy naming pid $HOLDER (uid 1000)" || bad "unbind refused without naming the holder: $ERR"
    fi
    has_driver "$NIC" vfio-pci && ok "kernel: $NIC still on vfio-pci after the refusal" || bad "kernel: $NIC on $(drv "$NIC") after a refused unbind"
    kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null
else
    bad "attach --uid 1000 failed"
fi

# ---- unbind -------------------------------------------------------------------
vc unbind sgnic && ok "unbind sgnic" || bad "unbind failed"
wait_until 10 has_driver "$NIC" e1000e && ok "kernel: $NIC back on e1000e" || bad "kernel: $NIC driver is $(drv "$NIC") after unbind"

# ---- sandbox score ------------------------------------------------------------
score=$(systemd-analyze security --no-pager vfiod.service 2>/dev/null | sed -n 's/.*Overall exposure level for vfiod.service: \([0-9.]*\).*/\1/p')
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' && ok "systemd-analyze security: $score" || bad "systemd-analyze security: '$score' (> 1.5)"
say "vfiod runs as user $(stat -c %U "/proc/$(systemctl show -p MainPID --value vfiod.service)" 2>&1)"
systemctl -q is-active vfiod.service && ok "vfiod.service still active" || bad "vfiod.service $(systemctl is-active vfiod.service) at the end"
finish
