# Shared helpers for the guest scenarios (busybox sh). Sourced, never run.
#
# Safety: every helper here that writes to sysfs or drives vfiod refuses to
# run unless this is the vfiod test guest: /etc/vfiod-vm-guest (only in the
# guest initramfs) and vfiodvm.guest=1 on the kernel command line.
if [ ! -e /etc/vfiod-vm-guest ] || ! grep -q 'vfiodvm.guest=1' /proc/cmdline 2>/dev/null; then
    echo "lib.sh: not inside the vfiod test guest; refusing to run" >&2
    exit 99
fi

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
SOCK=/run/vfiod.sock
STATE=/var/lib/vfiod
HOST=/mnt/host
OUTDIR=$HOST/out
VFIOD_LOG=/tmp/vm.vfiod.log
: "${VM_ROUNDS:=7}"
: "${VM_SCENARIO:=adhoc}"
[ -e $HOST/topology.sh ] && . $HOST/topology.sh

say() { echo "[$VM_SCENARIO] $*"; }
fail() {
    echo "[$VM_SCENARIO] FAIL: $*"
    echo "FAILMSG $VM_SCENARIO $*" >>$HOST/results
    exit 1
}
# A scenario that needs a vfiod feature that is not there yet.
pending() {
    echo "[$VM_SCENARIO] PENDING: $*"
    echo "FAILMSG $VM_SCENARIO pending: $*" >>$HOST/results
    exit 77
}
metric() { # NAME VALUE UNIT NOTE...
    local n=$1 v=$2 u=$3; shift 3
    echo "[$VM_SCENARIO] metric $n = $v $u $*"
    echo "METRIC $n $v $u $*" >>$HOST/results
}

# --- clocks ----------------------------------------------------------------
now() { vmtool now; }                       # realtime, seconds.nanoseconds
# Interval timing without forking: a builtin echo to /dev/kmsg, stamped by the
# kernel (printk clock, microseconds; needs printk.devkmsg=on). mark NAME, then
# mark_ms A B gives the milliseconds between the last marks A and B.
mark() { echo "<6>vmmark $1" >/dev/kmsg; }
mark_ts() { dmesg | sed -n "s/.*\[ *\([0-9.]*\)\] vmmark $1\$/\1/p" | tail -1; }
mark_ms() { ms_between "$(mark_ts "$1")" "$(mark_ts "$2")"; }
# round_ms X: for each of the VM_ROUNDS rounds i, the milliseconds between the
# marks X0.i and X1.i, space-separated (with a leading space).
round_ms() {
    local i=0 out=
    while [ $i -lt "$VM_ROUNDS" ]; do
        i=$((i + 1))
        out="$out $(mark_ms "${1}0.$i" "${1}1.$i")"
    done
    echo "$out"
}
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", (b-a)*1000}'; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END{if(NR==0){print "nan"} else if(NR%2){print v[(NR+1)/2]} else {printf "%.2f", (v[NR/2]+v[NR/2+1])/2}}'; }
# RFC 3339 (with fraction, any offset) -> epoch seconds with fraction.
rfc3339_epoch() {
    local s=$1 base frac off=0 sign hh mm
    base=$(echo "$s" | sed -E 's/^([0-9-]+)T([0-9:]+).*/\1 \2/')
    frac=$(echo "$s" | sed -nE 's/^[^.]*(\.[0-9]+).*/\1/p')
    case $s in
        *Z) off=0 ;;
        *[+-][0-9][0-9]:[0-9][0-9])
            sign=$(echo "$s" | sed -E 's/.*([+-])[0-9][0-9]:[0-9][0-9]$/\1/')
            hh=$(echo "$s" | sed -E 's/.*[+-]([0-9][0-9]):[0-9][0-9]$/\1/')
            mm=$(echo "$s" | sed -E 's/.*[+-][0-9][0-9]:([0-9][0-9])$/\1/')
            off=$(( (1${hh} - 100) * 3600 + (1${mm} - 100) * 60 ))
            [ "$sign" = - ] && off=$((-off)) ;;
    esac
    local e
    e=$(TZ=UTC date -u -d "$base" +%s) || return 1
    awk -v e="$e" -v f="${frac:-0}" -v o="$off" 'BEGIN{printf "%.6f", e - o + f}'
}

# --- waiting ---------------------------------------------------------------
# wait_until SECONDS CMD...: poll CMD every 20 ms until it succeeds.
wait_until() {
    local limit=$1; shift
    local end
    end=$(awk -v t="$(cut -d' ' -f1 /proc/uptime)" -v l="$limit" 'BEGIN{print t+l}')
    while ! "$@"; do
        if awk -v t="$(cut -d' ' -f1 /proc/uptime)" -v e="$end" 'BEGIN{exit !(t>e)}'; then
            return 1
        fi
        usleep 20000
    done
}

# --- PCI, from the kernel's point of view ---------------------------------
drv() { # ADDR -> driver name or "none"
    if [ -e "/sys/bus/pci/devices/$1/driver" ]; then
        basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
    else
        echo none
    fi
}
grp() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }
has_driver() { [ "$(drv "$1")" = "$2" ]; }
present() { [ -e "/sys/bus/pci/devices/$1" ]; }
absent() { [ ! -e "/sys/bus/pci/devices/$1" ]; }
vfio_node() { [ -c "/dev/vfio/$(grp "$1")" ]; }
netdev_of() { ls "/sys/bus/pci/devices/$1/net" 2>/dev/null | head -1; }
has_netdev() { [ -n "$(netdev_of "$1")" ]; }
# The first PCI function below a bridge or root port (empty if none).
dev_under() {
    local p
    for p in /sys/bus/pci/devices/$1/0000:*; do
        [ -e "$p/vendor" ] && { basename "$p"; return 0; }
    done
    return 1
}
devs_under() {
    local p
    for p in /sys/bus/pci/devices/$1/0000:*; do
        [ -e "$p/vendor" ] && basename "$p"
    done
}
attr() { cat "/sys/bus/pci/devices/$1/$2"; }   # ADDR ATTR
group_members() { ls "/sys/kernel/iommu_groups/$1/devices"; }

# Every write to PCI sysfs in the guest goes through pci_write, which exists
# only past the guest check at the top of this file: the one place a driver
# is moved by hand, never reachable on the host.
PCI=/sys/bus/pci
pci_write() { echo "$1" >"$PCI/$2"; }   # VALUE PATH-UNDER-/sys/bus/pci

# Move ADDR to vfio-pci with plain sysfs writes (what vfiod is expected to do).
sysfs_to_vfio() {
    local a=$1 cur
    cur=$(drv "$a")
    pci_write vfio-pci "devices/$a/driver_override"
    [ "$cur" != none ] && pci_write "$a" "drivers/$cur/unbind"
    pci_write "$a" drivers_probe
}
# Give ADDR back to its native driver: clear the override, unbind, reprobe.
sysfs_from_vfio() {
    local a=$1
    pci_write "" "devices/$a/driver_override"
    pci_write "$a" drivers/vfio-pci/unbind
    pci_write "$a" drivers_probe
}

# --- the host (QMP through the 9p share) ----------------------------------
# host_req CMD [JSON-ARGS]: the harness runs it and answers with JSON.
host_req() {
    local cmd=$1 args=${2:-"{}"} f i=0 ok=1
    f=$HOST/req/$(cut -d' ' -f1 /proc/uptime | tr -d .)_$$_$RANDOM
    printf '{"cmd": "%s", "args": %s}\n' "$cmd" "$args" >"$f.tmp"
    mv "$f.tmp" "$f.req"
    while [ ! -e "$f.resp" ]; do
        i=$((i + 1))
        [ $i -gt 1500 ] && { echo '{"ok": false, "error": "host did not answer in 30 s"}'; return 1; }
        usleep 20000
    done
    cat "$f.resp"
    jq -e .ok "$f.resp" >/dev/null 2>&1 && ok=0
    rm -f "$f.resp"
    return $ok
}
device_add() { # ID PORT DRIVER
    host_req device_add "{\"driver\": \"$3\", \"id\": \"$1\", \"bus\": \"$2\"}"
}
device_del() { host_req device_del "{\"id\": \"$1\"}"; }

# --- vfiod -----------------------------------------------------------------
have_vfiod() { [ -x /usr/bin/vfiod ] && [ -x /usr/bin/vfioctl ]; }
need_vfiod() { have_vfiod || fail "vfiod/vfioctl binaries are not in the guest (build failed?)"; }

VFIOD_PID=
vfiod_start() { # extra args...
    need_vfiod
    mkdir -p $STATE
    echo "--- vfiod start $* (uptime $(cut -d' ' -f1 /proc/uptime))" >>$VFIOD_LOG
    RUST_LOG=${RUST_LOG:-info} vfiod --socket $SOCK --state-dir $STATE "$@" >>$VFIOD_LOG.stdout 2>>$VFIOD_LOG &
    VFIOD_PID=$!
    if ! wait_until 60 vfiod_ready; then
        tail -50 $VFIOD_LOG
        fail "vfiod did not become ready in 60 s"
    fi
}
vfiod_ready() {
    kill -0 "$VFIOD_PID" 2>/dev/null || { tail -30 $VFIOD_LOG; fail "vfiod exited during startup"; }
    [ -S $SOCK ] && vfioctl --socket $SOCK --json health >/dev/null 2>&1
}
vfiod_stop() {
    [ -n "$VFIOD_PID" ] || return 0
    kill -TERM "$VFIOD_PID" 2>/dev/null
    wait_until 20 eval '! kill -0 $VFIOD_PID 2>/dev/null' || kill -9 "$VFIOD_PID" 2>/dev/null
    wait "$VFIOD_PID" 2>/dev/null
    VFIOD_PID=
}

# vc ARGS...: vfioctl --json; stdout in $OUT, stderr in $ERR, exit code in $RC.
vc() {
    OUT=$(vfioctl --socket $SOCK --json "$@" 2>/tmp/vm.vc.err)
    RC=$?
    ERR=$(cat /tmp/vm.vc.err)
    return $RC
}
# vc_ok ARGS...: vfioctl must succeed.
vc_ok() {
    vc "$@" || fail "vfioctl $* failed (rc=$RC): $ERR"
}
# vc_err CODE ARGS...: vfioctl must fail with error code CODE.
vc_err() {
    local code=$1; shift
    if vc "$@"; then fail "vfioctl $* succeeded, expected error $code: $OUT"; fi
    local got
    got=$(echo "$ERR" | jq -r .code 2>/dev/null)
    [ "$got" = "$code" ] || fail "vfioctl $* failed with '$got', expected '$code': $ERR"
}
jget() { echo "$OUT" | jq -r "$1"; }
# jload [JSON]: one jq call sets J_<key> for every top-level key of the JSON
# object ($OUT by default); strings as they are, anything else as JSON (null,
# true, 12, {"k":"v"}). jq costs ~0.1-0.4 s under TCG: load once, test many.
jload() {
    local v
    for v in $(set | sed -n 's/^\(J_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
    eval "$(printf '%s' "${1:-$OUT}" | jq -r 'if type == "object" then to_entries[] | "J_\(.key)=\(.value | if type == "string" then . else tojson end | @sh)" else empty end')"
}

# Every scenario: dump the vfiod log into the share (and on failure to the console).
scenario_exit() {
    local rc=$?
    [ -e $VFIOD_LOG ] && cp $VFIOD_LOG "$OUTDIR/$VM_SCENARIO.vfiod.log"
    [ -s $EVENTS ] && cp $EVENTS "$OUTDIR/$VM_SCENARIO.events.jsonl"
    [ -s $UEVENTS ] && cp $UEVENTS "$OUTDIR/$VM_SCENARIO.uevents.txt"
    if [ $rc -ne 0 ] && [ -e $VFIOD_LOG ]; then
        echo "----- vfiod log ($VM_SCENARIO), last 60 lines -----"
        tail -60 $VFIOD_LOG
        echo "-----"
    fi
    [ -n "$VFIOD_PID" ] && kill -9 "$VFIOD_PID" 2>/dev/null
    [ -e /run/udev/control ] && udevadm control --exit 2>/dev/null
    return $rc
}
trap scenario_exit EXIT
trap 'echo "[$VM_SCENARIO] terminated (timeout)"; exit 143' TERM

# --- event streams ---------------------------------------------------------
EVENTS=/tmp/vm.events
UEVENTS=/tmp/vm.uevents
# vfioctl --json events in the background, one JSON object per line, from
# this moment: --since the newest event's number, so an event that comes
# before the client has subscribed is replayed, not lost.
events_start() {
    local seq
    : >$EVENTS
    seq=$(vfioctl --socket $SOCK --json health | jq -e .last_event_seq) || fail "no last_event_seq in /health"
    vfioctl --socket $SOCK --json events --since "$seq" >>$EVENTS 2>/tmp/vm.events.err &
    EVENTS_PID=$!
    usleep 300000
    kill -0 $EVENTS_PID 2>/dev/null || fail "vfioctl events exited: $(cat /tmp/vm.events.err)"
}
# Kernel uevents (pci), stamped on arrival with the guest's realtime clock.
# holder_start VMTOOL-ARGS...: a process that holds something open
# (`vmtool vfiohold GROUP ADDR [devonly]`: ADDR's VFIO fds, as a VM does;
# `vmtool hold PATH`: one node), started and waited for until it holds it;
# HOLD is its pid, HOLD_OUT what it printed.
HOLDERS=0
holder_start() {
    HOLDERS=$((HOLDERS + 1))
    HOLD_OUT=/tmp/vm.hold.$HOLDERS
    vmtool "$@" >"$HOLD_OUT" 2>&1 &
    HOLD=$!
    wait_until 10 grep -q holding "$HOLD_OUT" || fail "vmtool $*: $(cat "$HOLD_OUT")"
    say "$(cat "$HOLD_OUT")"
}
# pci_write_stamped VALUE PATH MARK: pci_write in a background child that
# stamps MARK in the kernel log when its write returns; UNB is its pid.
pci_write_stamped() {
    ( pci_write "$1" "$2"; mark "$3" ) &
    UNB=$!
}
uevmon_start() {
    : >$UEVENTS
    vmtool uevmon pci >>$UEVENTS 2>/tmp/vm.uevmon.err &
    UEVMON_PID=$!
    wait_until 5 grep -q listening /tmp/vm.uevmon.err || fail "uevmon did not start"
}
has_event() { # TYPE ADDR
    jq -e -s --arg t "$1" --arg a "$2" 'map(select(.type == $t and .pci_address == $a)) | length > 0' $EVENTS >/dev/null 2>&1
}
count_events() { jq -s --arg t "$1" --arg a "$2" 'map(select(.type == $t and .pci_address == $a)) | length' $EVENTS; }
# Epoch seconds of the last vfiod event TYPE for ADDR.
event_at() {
    local at
    at=$(jq -r -s --arg t "$1" --arg a "$2" 'map(select(.type == $t and .pci_address == $a)) | last | .at // empty' $EVENTS)
    [ -n "$at" ] && rfc3339_epoch "$at"
}
# The same events as systemd-udevd re-broadcasts them once its rules ran: what
# a udev listener such as vfiod can see at the earliest.
UDEVEVENTS=/tmp/vm.udevevents
udevmon_start() {
    : >$UDEVEVENTS
    vmtool uevmon pci udev >>$UDEVEVENTS 2>/tmp/vm.udevmon.err &
    UDEVMON_PID=$!
    wait_until 5 grep -q listening /tmp/vm.udevmon.err || fail "udev uevmon did not start"
}
# Epoch seconds of the last uevent ACTION for ADDR in FILE (default: kernel's).
uevent_at() { awk -v act="$1" -v a="/$2" '$2 == act && substr($3, length($3) - length(a) + 1) == a {t = $1} END {if (t) print t}' "${3:-$UEVENTS}"; }
# Milliseconds from the kernel uevent to vfiod's event (guest realtime clock).
uevent_latency_ms() { # ACTION TYPE ADDR
    local k v
    k=$(uevent_at "$1" "$3"); v=$(event_at "$2" "$3")
    [ -n "$k" ] && [ -n "$v" ] || { echo nan; return; }
    ms_between "$k" "$v"
}
# Milliseconds from the kernel uevent to udevd's re-broadcast, and from there
# to vfiod's event: where the time goes when vfiod listens to udev.
udev_split_ms() { # ACTION TYPE ADDR -> "KERNEL_TO_UDEVD UDEVD_TO_VFIOD"
    local k u v
    k=$(uevent_at "$1" "$3"); u=$(uevent_at "$1" "$3" $UDEVEVENTS); v=$(event_at "$2" "$3")
    [ -n "$k" ] && [ -n "$u" ] && [ -n "$v" ] || { echo nan nan; return; }
    echo "$(ms_between "$k" "$u") $(ms_between "$u" "$v")"
}
# hotadd_e1000e QEMU-ID [LABEL]: device_add an e1000e below the hotplug port and
# wait until the kernel has it on e1000e; its address is left in HOTADDED (not
# printed: fail must exit the scenario, not a command substitution).
hotadd_e1000e() {
    local what=${2:-$1}
    device_add "$1" "$QPORT_hp0" e1000e >/dev/null || fail "$what: device_add failed"
    wait_until 15 dev_under "$PORT_hp0" || fail "$what: hot-added device did not appear"
    HOTADDED=$(dev_under "$PORT_hp0")
    wait_until 10 has_driver "$HOTADDED" e1000e || fail "$what: $HOTADDED on $(drv "$HOTADDED")"
}

# --- a VMM inside the guest (the host's QEMU, /opt/vmm from run.sh's VMM cpio) ---
VMM=/opt/vmm
vmm_available() { [ -x $VMM/bin/qemu-system-x86_64 ] && [ -e $VMM/share/qboot.rom ]; }
# vmm_start TAG root|UID ADDR [QEMU-ARGS..]: start QEMU stopped (-S) with ADDR
# as a vfio-pci device, as root or as UID (its memlock limit raised to
# VMM_MEMLOCK_KB, 256 MiB by default, or left as it is with "default"), with
# QMP on its stdin/stdout (a fifo held open on fd 3), and wait until its
# query-pci answers. Sets VMM_PID (QEMU's own pid, for `attach --pid`),
# VMM_PCI (the query-pci answer), VMM_START_MS (start -> answer); returns 1
# with VMM_ERR (QEMU's stderr) if QEMU exits first.
vmm_start() { vmm_spawn "$@" && vmm_wait; }
# vmm_spawn ...: the first half. With VMM_GATE=1 the process already runs as
# UID under its final pid but waits (as a shell) before it execs QEMU, until
# vmm_open_gate: a test can name that pid to vfiod before QEMU opens the node.
vmm_spawn() {
    local tag=$1 who=$2 addr=$3 run=
    shift 3
    VMM_RUN=/tmp/vm.vmm.$tag
    rm -rf $VMM_RUN; mkdir -p $VMM_RUN; chmod 755 $VMM_RUN
    mkfifo $VMM_RUN/qmp.in
    mkfifo -m 666 $VMM_RUN/gate
    [ "$who" != root ] && run="vmtool runas $who $who -"
    trap '' PIPE
    VMM_ERR= VMM_PCI= VMM_START_MS=
    set -- $VMM/bin/qemu-system-x86_64 -S -nodefaults -m 64 -display none \
        -machine q35 -accel tcg -L $VMM/share -bios $VMM/share/qboot.rom \
        -device "vfio-pci,host=$addr,id=hostdev0" -qmp stdio "$@"
    [ "${VMM_GATE:-0}" = 1 ] && set -- sh -c 'read go <"$0"; exec "$@"' $VMM_RUN/gate "$@"
    mark vmm0
    (
        [ "${VMM_MEMLOCK_KB:-262144}" = default ] || ulimit -l "${VMM_MEMLOCK_KB:-262144}"
        export LD_LIBRARY_PATH=$VMM/lib
        exec $run "$@"
    ) <$VMM_RUN/qmp.in >$VMM_RUN/qmp.out 2>$VMM_RUN/err &
    VMM_PID=$!
    exec 3>$VMM_RUN/qmp.in
    if [ "${VMM_GATE:-0}" = 1 ] && [ "$who" != root ]; then
        # Named to vfiod only once it runs as UID (it starts as root in vmtool).
        wait_until 10 eval 'grep -q "^Uid:[[:space:]]*$who[[:space:]]" /proc/$VMM_PID/status' ||
            fail "the gated VMM process $VMM_PID did not switch to uid $who"
    fi
}
vmm_open_gate() { mark vmm0; echo go >$VMM_RUN/gate; }
# vmm_wait: the second half (see vmm_start).
vmm_wait() {
    echo '{"execute": "qmp_capabilities"}' >&3
    echo '{"execute": "query-pci"}' >&3
    if ! wait_until 60 eval 'grep -q "\"return\": \[" $VMM_RUN/qmp.out || ! kill -0 $VMM_PID 2>/dev/null'; then
        VMM_ERR="no query-pci answer in 60 s: $(tr '\n' ' ' <$VMM_RUN/err)"
        vmm_stop
        return 1
    fi
    mark vmm1
    if ! grep -q '"return": \[' $VMM_RUN/qmp.out; then
        wait $VMM_PID 2>/dev/null
        VMM_ERR="exit $?: $(tr '\n' ' ' <$VMM_RUN/err)"
        exec 3>&-
        VMM_PID=
        return 1
    fi
    VMM_START_MS=$(mark_ms vmm0 vmm1)
    VMM_PCI=$(grep '"return": \[' $VMM_RUN/qmp.out | head -1)
}
# vmm_query_has VENDOR DEVICE (0x....): the last query-pci lists that device;
# VMM_DEV is its entry.
vmm_query_has() {
    VMM_DEV=$(echo "$VMM_PCI" | jq -c --argjson v "$(($1))" --argjson d "$(($2))" \
        '[.return[].devices[] | select(.id.vendor == $v and .id.device == $d) | {qdev_id, bus, slot, vendor: .id.vendor, device: .id.device}] | first // empty')
    [ -n "$VMM_DEV" ]
}
vmm_fds() { ls -l /proc/$VMM_PID/fd 2>/dev/null | awk '/vfio/ {print $(NF-2), $NF}' | tr '\n' ' '; }
# vmm_stop: QMP quit, then SIGKILL if QEMU is still there after 10 s.
vmm_stop() {
    [ -n "$VMM_PID" ] || return 0
    echo '{"execute": "quit"}' >&3 2>/dev/null
    wait_until 10 eval '! kill -0 $VMM_PID 2>/dev/null' || kill -9 $VMM_PID 2>/dev/null
    wait $VMM_PID 2>/dev/null
    exec 3>&-
    VMM_PID=
}

# --- features of vfiod that scenarios written ahead of them need ------------
# api METHOD PATH [JSON]: one request straight to the API (vmtool http), for
# fields vfioctl has no option for yet; like vc: OUT, ERR, RC, and the HTTP
# status in STATUS.
api() {
    rm -f /tmp/vm.api.status
    OUT=$(VMTOOL_HTTP_STATUS=/tmp/vm.api.status vmtool http $SOCK "$@" 2>/tmp/vm.api.err)
    RC=$?
    ERR=$(cat /tmp/vm.api.err)
    STATUS=$(cat /tmp/vm.api.status 2>/dev/null)
    return $RC
}
api_ok() { api "$@" || fail "$1 $2 $3 failed (rc=$RC): $ERR"; }
# need_holders_api ID: vfiod serves GET /devices/ID/holders, or the scenario
# is PENDING (written against a contract vfiod does not have yet).
need_holders_api() {
    need_vfiod
    api GET "/devices/$1/holders" && return 0
    printf '%s' "$ERR" | grep -q 'no such endpoint' && pending "vfiod has no GET /devices/{id}/holders yet (issue 9)"
    fail "GET /devices/$1/holders failed: $ERR"
}
# need_attach_grants ID: the Device has attached_uid (attach takes a uid).
need_attach_grants() {
    need_vfiod
    api_ok GET "/devices/$1"
    printf '%s' "$OUT" | jq -e 'has("attached_uid") and has("attached_pid")' >/dev/null ||
        pending "vfiod's Device has no attached_uid/attached_pid yet (issue 10)"
}
# holders_of ID: GET /devices/ID/holders into OUT; with a vfioctl that has the
# holders command, its table must also name every process holder's pid.
holders_of() {
    local json
    api_ok GET "/devices/$1/holders"
    json=$OUT
    if vfioctl --help 2>&1 | grep -q '^ *holders'; then
        vfioctl --socket $SOCK holders "$1" >/tmp/vm.holders.txt 2>&1 || fail "vfioctl holders $1: $(cat /tmp/vm.holders.txt)"
        for p in $(printf '%s' "$json" | jq -r '.. | objects | select(.kind == "process") | .pid'); do
            grep -qw "$p" /tmp/vm.holders.txt || fail "vfioctl holders $1 does not show pid $p: $(cat /tmp/vm.holders.txt)"
        done
    fi
    OUT=$json
}
# The 409 device_busy body in $ERR (or JSON given) lists a process holder
# with pid PID and comm COMM.
busy_names_pid() { # PID COMM [JSON]
    printf '%s' "${3:-$ERR}" | jq -e --argjson p "$1" --arg c "$2" \
        '.code == "device_busy" and ([.holders[]? | select(.kind == "process" and .pid == $p and .comm == $c)] | length > 0)' >/dev/null 2>&1
}
# --- VFIO node access ---------------------------------------------------------
# acl_of NODE: the node's ACL entries on one line (no comments).
acl_of() { getfacl -p -n "$1" 2>/dev/null | grep -v '^#' | grep . | tr '\n' ' '; }
# uid_can_open UID PATH: 0 if UID opens PATH (read-write), 1 if refused for
# permissions (EACCES/EPERM), 2 on anything else (OPEN_ERR says what). The
# opener is killed at once: it must not hold the node past the check.
uid_can_open() {
    local f=/tmp/vm.canopen.$$ p rc
    vmtool runas "$1" "$1" - vmtool hold "$2" >$f 2>&1 &
    p=$!
    wait_until 10 eval 'grep -q holding $f || ! kill -0 $p 2>/dev/null'
    if grep -q holding $f; then
        kill -9 $p 2>/dev/null
        wait $p 2>/dev/null
        return 0
    fi
    if kill -0 $p 2>/dev/null; then
        kill -9 $p 2>/dev/null
        wait $p 2>/dev/null
        OPEN_ERR="no answer in 10 s: $(cat $f)"
        return 2
    fi
    wait $p
    rc=$?
    OPEN_ERR="rc=$rc $(cat $f)"
    [ $rc = 13 ] && return 1
    return 2
}
# Kernel pci uevents for ADDR since uevmon_start (one per line; none: empty).
uevents_of() { grep "/$1\( \|\$\)" $UEVENTS; }
override_of() { local o; o=$(cat "/sys/bus/pci/devices/$1/driver_override"); [ "$o" = "(null)" ] && o=; echo "$o"; }
