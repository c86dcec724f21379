# random-walk: a seeded random walk of operations against vfiod on the real
# guest kernel (issue 18, item 4), over the e1000e (nic0), the igb (igb0),
# the NVMe (nvme0, no filesystem mounted) and edu (edu0, no driver).
#
# Each step is one of: register, delete, bind (with_group at random), unbind,
# attach (uid 1000, tied to the pid of a sleeping uid-1000 process that stands
# for the VMM), detach (keep_bound at random), reset, kill -9 of vfiod while
# idle (sometimes with a device re-plugged while it is down), kill -9 while an
# operation is in flight, SIGTERM (idle or in the middle of a move), a device
# removed and re-added (`remove`, then `rescan`), a holder started (a process
# holding the group node, or container + group + device fd as a VMM does) or
# stopped, and a VMM kill (the attached pid killed). vfiod is restarted after
# every kill.
#
# The walk keeps a model of what vfiod should hold: which names are
# registered, which devices it keeps on vfio-pci, which are attached to
# which pid, which are held. Each step's answer is checked against the model
# (success, or the one refusal the model predicts, with its code); a step
# killed in flight may end either way (the model then takes what vfiod
# reports, within the two outcomes). After every step that ends with vfiod
# up, against what the KERNEL reports (driver links, /dev/vfio/N ACLs):
#   1. no present registered device without a driver unless its record says
#      so (original driver none, not bound by vfiod);
#   2. the registry's present, current_driver, bound_to_vfio, iommu_group and
#      stuck/pending agree with the kernel;
#   3. every named-user ACL entry on /dev/vfio/N belongs to a live
#      attachment (its pid running) of a device in group N, and every live
#      attachment has its entry; no attachment outlives its pid;
#   4. no registration lost or doubled: the model's names are GET /devices';
#   5. no vfio-pci driver_override is left on a device on its native driver;
#   and the model: each device on the driver the model says, attached as it
#   says.
# Synchronous steps are checked at once; steps the kernel or vfiod finish
# asynchronously (a re-plug, a VMM's exit) get VM_WALK_SETTLE seconds (20)
# to converge, and the time they took is logged.
#
# Knobs (host: VFIOD_VM_WALK_*): VM_WALK_SEED (default: random, printed
# first), VM_WALK_STEPS (default 250), VM_WALK_BUDGET seconds (default 190:
# the walk stops early, saying how many steps ran, so that it ends inside the
# scenario timeout; raise both for the full walk, see tests/vm/README.md).
# A failure prints the seed and the whole step log; VFIOD_VM_WALK_SEED=S
# replays the same choices (as long as the outcomes of killed steps fall the
# same way).
# Many driver moves: single-threaded TCG (see vm-testing.md).
# vm-boot: tcg-single
. /vm/lib.sh

SEED=${VM_WALK_SEED:-$(($(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % 2147483647 + 1))}
STEPS=${VM_WALK_STEPS:-250}
BUDGET=${VM_WALK_BUDGET:-190}
SETTLE=${VM_WALK_SETTLE:-20}
say "seed $SEED (replay: VFIOD_VM_WALK_SEED=$SEED), steps $STEPS, budget $BUDGET s"
need_vfiod

# --- the devices -----------------------------------------------------------
N=4 PCISPECS=
NAME_0=nic0 NATIVE_0=e1000e PORTV_0=$PORT_nic0
NAME_1=igb0 NATIVE_1=igb PORTV_1=$PORT_igb0
NAME_2=nvme0 NATIVE_2=nvme PORTV_2=$PORT_nvme0
NAME_3=edu0 NATIVE_3=none PORTV_3=$PORT_edu0
i=0
while [ $i -lt $N ]; do
    eval "p=\$PORTV_$i; n=\$NAME_$i; nat=\$NATIVE_$i"
    a=$(dev_under "$p") || fail "no device below $p for $n"
    eval "ADDR_$i=$a"
    has_driver "$a" "$nat" || fail "precondition: $n $a is on $(drv "$a"), not $nat"
    # The model: registered, kept on vfio-pci by vfiod, attached (instance),
    # the attachment's VMM pid, the holder's pid, removed from the bus.
    eval "REG_$i=0 VFIO_$i=0 ATT_$i= APID_$i= HOLD_$i= GONE_$i=0"
    PCISPECS="$PCISPECS $n=$a=$nat"
    i=$((i + 1))
done
mounted=$(awk '$1 ~ "^/dev/nvme" {print $1 " on " $2}' /proc/mounts)
[ -z "$mounted" ] || fail "precondition: the NVMe has a mounted filesystem: $mounted"
v() { eval "echo \"\$$1_$2\""; }   # v FIELD I

# --- seeded choices ----------------------------------------------------------
# Park and Miller's minimal standard generator (x = x * 48271 mod 2^31-1,
# products below 2^47: plain shell arithmetic, the same on every busybox),
# scaled rather than taken modulo: R = a number in [0, N) from the high
# bits. (A power-of-two LCG's low bits made consecutive small draws
# correlated.) The choices depend only on the seed and the model, so a
# replay makes the same ones as long as the outcomes of killed steps fall
# the same way (the step log says how they fell).
RNG=$((SEED % 2147483647))
[ $RNG = 0 ] && RNG=1
rnd() {
    RNG=$((RNG * 48271 % 2147483647))
    R=$((RNG * $1 / 2147483647))
}

# --- the step log --------------------------------------------------------------
WLOG=/tmp/vm.walk.log
: >$WLOG
STEP=0
log_step() { echo "step $STEP: $*" >>$WLOG; say "step $STEP: $*"; }
# lib.sh's fail, with the seed and the step log first: every failure, also
# those of lib.sh's helpers (vfiod_start, ...), can be replayed.
fail() {
    echo "----- random walk: seed $SEED, failed at step $STEP of $STEPS; the steps -----"
    cat $WLOG
    echo "----- end of the steps (replay: VFIOD_VM_WALK_SEED=$SEED VFIOD_VM_WALK_STEPS=$STEP) -----"
    cp $WLOG "$OUTDIR/$VM_SCENARIO.steps.txt"
    echo "[$VM_SCENARIO] FAIL: $*"
    echo "FAILMSG $VM_SCENARIO $*" >>$HOST/results
    exit 1
}
walk_fail() { fail "seed $SEED step $STEP: $*"; }
# Whatever ends the walk (a failure, the timeout's TERM), removed devices
# come back: /init puts present devices back on their drivers between
# scenarios, but cannot bring back one the walk took off the bus.
walk_exit() {
    local rc=$? i=0
    pci_write 1 rescan 2>/dev/null
    while [ $i -lt ${N:-0} ]; do
        wait_until 10 present "$(v ADDR $i)"
        i=$((i + 1))
    done
    (exit $rc)
    scenario_exit
}
trap walk_exit EXIT

# --- vfiod, started and stopped by the walk ------------------------------------
RESTARTS=0
restart_vfiod() {
    VFIOD_PID=
    vfiod_start
    RESTARTS=$((RESTARTS + 1))
}
vfiod_kill9() {
    kill -9 "$VFIOD_PID" 2>/dev/null
    wait "$VFIOD_PID" 2>/dev/null
}

# --- what the kernel says ------------------------------------------------------
# KJ: {name: {addr, present, driver, native, group, override}} for the four
# devices (driver_override read only on a device on its native driver: a
# read blocks while an unbind waits in the kernel); AJ: {group: [uid, ...]}
# of the named-user ACL entries on every /dev/vfio/N. One vmtool process
# each: forking a dozen readlinks per check cost about a second under TCG.
kernel_json() {
    KJ=$(vmtool pcistate $PCISPECS) || walk_fail "vmtool pcistate $PCISPECS failed"
    AJ=$(vmtool vfioacls) || walk_fail "vmtool vfioacls failed"
}
model_json() {
    local i n reg vfio att pid
    MJ={
    i=0
    while [ $i -lt $N ]; do
        eval "n=\$NAME_$i reg=\$REG_$i vfio=\$VFIO_$i att=\$ATT_$i pid=\$APID_$i"
        [ -n "$att" ] && att="\"$att\"" || att=null
        [ "$reg" = 1 ] && reg=true || reg=false
        [ "$vfio" = 1 ] && vfio=true || vfio=false
        MJ="$MJ\"$n\": {\"reg\": $reg, \"vfio\": $vfio, \"att\": $att, \"pid\": ${pid:-null}}"
        i=$((i + 1))
        [ $i -lt $N ] && MJ="$MJ, "
    done
    MJ="$MJ}"
}
# Pids of the walk's uid-1000 sleepers that still run (a killed VMM is
# reaped at once, so kill -0 is the truth).
live_pids() {
    local i p out=
    i=0
    while [ $i -lt $N ]; do
        eval "p=\$APID_$i"
        [ -n "$p" ] && kill -0 "$p" 2>/dev/null && out="$out${out:+, }$p"
        i=$((i + 1))
    done
    PJ="[$out]"
}

# The invariants and the model, in one jq call (jq costs ~0.1 s under TCG).
CHECK_JQ='
def has_uid($l; $u): any($l[]; . == $u);
def live($p): $p == null or has_uid($P; $p);
[
  # 4. registrations: the model names = GET /devices names, once each
  ( ($R | map(.name) | sort) as $rn
    | ($M | to_entries | map(select(.value.reg) | .key) | sort) as $mn
    | if $rn != $mn then "inv4: vfiod has \($rn | join(",")), the model \($mn | join(","))" else empty end ),
  ( $R | group_by(.pci_address)[] | select(length > 1) | "inv4: \(.[0].pci_address) registered \(length) times" ),
  # per registered device, against the kernel
  ( $R[] | . as $r | $K[$r.name] as $k | select($k != null)
    | ( if $k.present != ($r.present // false) then "inv2 \($r.name): vfiod present=\($r.present), kernel present=\($k.present)" else empty end ),
      ( select($k.present)
        | ( if $k.driver == "none" and (($r.original_driver == null and ($r.bound_by_vfiod | not)) | not)
              then "inv1 \($r.name): the kernel has no driver on \($k.addr), but its record says original_driver=\($r.original_driver) bound_by_vfiod=\($r.bound_by_vfiod) stuck=\($r.stuck)" else empty end ),
          ( if (if $k.driver == "none" then null else $k.driver end) != $r.current_driver
              then "inv2 \($r.name): vfiod current_driver=\($r.current_driver), kernel driver=\($k.driver)" else empty end ),
          ( if ($k.driver == "vfio-pci") != $r.bound_to_vfio then "inv2 \($r.name): vfiod bound_to_vfio=\($r.bound_to_vfio), kernel driver=\($k.driver)" else empty end ),
          ( if ($r.stuck // false) or ($r.pending != null) then "inv2 \($r.name): vfiod says stuck=\($r.stuck) pending=\($r.pending) with no write in the kernel (driver \($k.driver))" else empty end ),
          ( if $r.iommu_group != $k.group then "inv2 \($r.name): vfiod iommu_group=\($r.iommu_group), kernel \($k.group)" else empty end ) ) ),
  # 5. no override of vfiod left on a device on its native driver
  ( $K | to_entries[] | select(.value.present and .value.driver == .value.native and .value.override != "")
    | "inv5 \(.key): on its native driver \(.value.native) with driver_override=\(.value.override)" ),
  # 3. grants = live attachments
  ( $A | to_entries[] | (.key | tonumber) as $g | .value[] as $u
    | if any($R[]; .iommu_group == $g and .attached_to != null and .attached_uid == $u and live(.attached_pid)) then empty
      else "inv3 /dev/vfio/\($g): user:\($u) has an ACL entry that no live attachment explains" end ),
  ( $R[] | select(.attached_to != null) | . as $r
    | ( if live($r.attached_pid) | not then "inv3 \($r.name): attached to \($r.attached_to) with VMM pid \($r.attached_pid), which is not running" else empty end ),
      ( if $r.present and ($r.attached_uid // 0) != 0 and (has_uid($A[$r.iommu_group | tostring] // []; $r.attached_uid) | not)
          then "inv3 \($r.name): attached for uid \($r.attached_uid), but /dev/vfio/\($r.iommu_group) has no entry for it" else empty end ),
      ( $K[$r.name] as $k | if $k.present and $k.driver != "vfio-pci" then "inv3 \($r.name): attached to \($r.attached_to), but the kernel has it on \($k.driver)" else empty end ) ),
  # the model: drivers and attachments
  ( $M | to_entries[] | .key as $n | .value as $m | $K[$n] as $k
    | ( select($k.present)
        | (if $m.reg and $m.vfio then "vfio-pci" else $k.native end) as $want
        | if $k.driver != $want then "model \($n): expected on \($want), the kernel has \($k.driver)" else empty end ),
      ( select($m.reg) | ([$R[] | select(.name == $n)] | first) as $r | select($r != null)
        | ( if $r.attached_to != $m.att then "model \($n): attached_to=\($r.attached_to), expected \($m.att)" else empty end ),
          ( if $m.att != null and $r.attached_pid != $m.pid then "model \($n): attached_pid=\($r.attached_pid), expected \($m.pid)" else empty end ),
          ( if $r.bound_by_vfiod != $m.vfio then "model \($n): bound_by_vfiod=\($r.bound_by_vfiod), expected \($m.vfio)" else empty end ) ) )
] | .[]'

# check_once: VIOL is empty when everything holds.
check_once() {
    VIOL=
    if ! vc list; then
        VIOL="GET /devices failed (rc=$RC): $ERR"
        return 1
    fi
    LIST=$OUT
    kernel_json
    model_json
    live_pids
    VIOL=$(jq -n -r --argjson R "$LIST" --argjson K "$KJ" --argjson A "$AJ" --argjson M "$MJ" --argjson P "$PJ" \
        "$CHECK_JQ" 2>&1) || VIOL="jq failed: $VIOL"
    [ -z "$VIOL" ]
}
state_dump() {
    echo "kernel: $KJ"
    echo "acl: $AJ"
    echo "model: $MJ"
    echo "live VMM pids: $PJ"
    echo "vfiod: $(printf '%s' "$LIST" | jq -c '[.[] | {name, pci_address, present, current_driver, original_driver, bound_to_vfio, bound_by_vfiod, stuck, pending, attached_to, attached_uid, attached_pid, health, iommu_group}]' 2>/dev/null)"
}
# check WAIT: the invariants hold now (WAIT 0), or within WAIT seconds.
CHECKS=0 SETTLED_LATE=0
check() {
    local wait=${1:-0} t0 took
    CHECKS=$((CHECKS + 1))
    check_once && return 0
    if [ "$wait" -gt 0 ]; then
        t0=$(cut -d' ' -f1 /proc/uptime)
        if wait_until "$wait" check_once; then
            took=$(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.1f", b - a}')
            SETTLED_LATE=$((SETTLED_LATE + 1))
            echo "        (settled after ${took} s)" >>$WLOG
            return 0
        fi
    fi
    {
        echo "VIOLATIONS after step $STEP:"
        echo "$VIOL" | sed 's/^/  /'
        state_dump | sed 's/^/  /'
    } >>$WLOG
    walk_fail "$(echo "$VIOL" | head -3 | tr '\n' ';')"
}

# --- processes the walk starts -------------------------------------------------
# A uid-1000 process standing for a VMM (SLEEPER = its pid).
start_sleeper() {
    vmtool runas 1000 1000 - sleep 1000000 &
    SLEEPER=$!
    wait_until 10 eval 'grep -q "^Uid:[[:space:]]*1000[[:space:]]" /proc/$SLEEPER/status' ||
        walk_fail "the uid-1000 process $SLEEPER did not switch to uid 1000"
}
reap() { [ -n "$1" ] && { kill -9 "$1" 2>/dev/null; wait "$1" 2>/dev/null; }; return 0; }

# --- expectations ------------------------------------------------------------------
# plan OP I: what the model predicts for OP on device I: EXP ("ok" or the
# refusal's code), and the model after it (N_REG, N_VFIO, N_ATT; N_ATT "-"
# keeps the attachment). PARTIAL=1: the refusal still ends the attachment.
plan() {
    local op=$1 i=$2 reg vfio att hold
    reg=$(v REG $i) vfio=$(v VFIO $i) att=$(v ATT $i) hold=$(v HOLD $i)
    N_REG=$reg N_VFIO=$vfio N_ATT=- PARTIAL=0 EXP=ok ALSO=
    if [ "$reg" = 0 ]; then
        case $op in
            register) N_REG=1; [ "$(v GONE $i)" = 1 ] && EXP=device_not_found ;;
            *) EXP=not_found ;;
        esac
        return
    fi
    if [ "$(v GONE $i)" = 1 ]; then
        # Removed from the bus: nothing moves; the record keeps the intent,
        # carried out when the device returns.
        case $op in
            # Either refusal says something true: the address is taken,
            # and there is no device at it now.
            register) EXP=conflict ALSO=device_not_found ;;
            delete)
                if [ -n "$att" ]; then EXP=in_use; else N_REG=0 N_VFIO=0; fi ;;
            bind|reset) EXP=device_not_present ;;
            # Attached to another instance and off the bus: either refusal
            # is true.
            attach)
                if [ -n "$att" ]; then EXP=in_use ALSO=device_not_present
                else EXP=device_not_present
                fi ;;
            unbind)
                if [ -n "$att" ]; then EXP=in_use
                elif [ "$vfio" = 1 ]; then EXP=device_not_present
                fi ;;
            detach|detach-keep)
                [ -n "$att" ] && N_ATT=
                [ $op = detach ] && N_VFIO=0 ;;
        esac
        return
    fi
    case $op in
        register) EXP=conflict ;;
        delete)
            if [ -n "$att" ]; then EXP=in_use
            elif [ -n "$hold" ]; then EXP=device_busy
            else N_REG=0 N_VFIO=0
            fi ;;
        bind) N_VFIO=1 ;;
        unbind)
            if [ -n "$att" ]; then EXP=in_use
            elif [ "$vfio" = 0 ]; then :
            elif [ -n "$hold" ]; then EXP=device_busy
            else N_VFIO=0
            fi ;;
        attach)
            if [ -n "$att" ]; then EXP=in_use
            else
                N_ATT=new N_VFIO=1
                # A device released under a holder still needs its reset,
                # which the holder refuses.
                [ -n "$hold" ] && ALSO=reset_scope_conflict
            fi ;;
        detach|detach-keep)
            [ -n "$att" ] && N_ATT=
            if [ $op = detach-keep ] || [ "$vfio" = 0 ]; then :
            elif [ -n "$hold" ]; then
                # Refused before anything changes: the attachment stays.
                EXP=device_busy N_ATT=-
            else N_VFIO=0
            fi ;;
        reset)
            if [ -n "$att" ] || [ -n "$hold" ]; then EXP=reset_scope_conflict; fi ;;
    esac
}
# op_args OP I INSTANCE: the vfioctl arguments of OP.
op_args() {
    local n
    n=$(v NAME "$2")
    case $1 in
        register) ARGS="register $(v ADDR "$2") --name $n" ;;
        delete) ARGS="delete $n" ;;
        bind) ARGS="bind $n"; [ "$WITH_GROUP" = 1 ] && ARGS="$ARGS --with-group" ;;
        unbind) ARGS="unbind $n" ;;
        attach) ARGS="attach $n $3 --uid 1000 --pid $SLEEPER" ;;
        detach) ARGS="detach $n" ;;
        detach-keep) ARGS="detach $n --keep-bound" ;;
        reset) ARGS="reset $n" ;;
    esac
}
# The code of a refusal in $ERR (vfioctl --json prints the server's JSON).
err_code() { printf '%s' "$ERR" | jq -r '.code // empty' 2>/dev/null; }
# apply I: the model after OP's effect (N_*), with the new attachment's
# instance and pid.
apply() {
    local i=$1
    eval "REG_$i=$N_REG VFIO_$i=$N_VFIO"
    case $N_ATT in
        -) ;;
        new) eval "ATT_$i=$INST APID_$i=$SLEEPER" ;;
        *) reap "$(v APID "$i")"; eval "ATT_$i= APID_$i=" ;;
    esac
}

# --- the steps ---------------------------------------------------------------------
OPS="register delete bind unbind attach detach reset"
# pick_dev OP: from a random device on, the first on which OP succeeds and
# changes something (in the model), else the first on which it succeeds
# (a no-op), else the random one (the step then checks the refusal).
pick_dev() {
    local op=$1 k j ok=
    rnd $N
    for pass in change ok; do
        k=0
        while [ $k -lt $N ]; do
            j=$(((R + k) % N))
            plan "$op" $j
            if [ "$EXP" = ok ]; then
                if [ $pass = ok ] || [ "$N_REG" != "$(v REG $j)" ] || [ "$N_VFIO" != "$(v VFIO $j)" ] || [ "$N_ATT" != - ]; then
                    DEV=$j
                    return
                fi
            fi
            k=$((k + 1))
        done
    done
    DEV=$R
    plan "$op" $DEV
}
# An API step: OP on a device, answered, checked against plan.
api_step() {
    local op=$1 i t0 code
    pick_dev "$op"
    i=$DEV
    rnd 2; WITH_GROUP=$R
    [ "$op" = detach ] && [ "$R" = 1 ] && op=detach-keep && plan detach-keep $i
    INST=walk-$STEP
    [ "$op" = attach ] && start_sleeper
    op_args $op $i "$INST"
    mark ws0.$STEP
    # shellcheck disable=SC2086
    vc $ARGS
    mark ws1.$STEP
    code=ok
    [ $RC = 0 ] || code=$(err_code)
    log_step "$op $(v NAME $i)$([ $op = bind ] && [ $WITH_GROUP = 1 ] && echo ' (with_group)') -> ${code:-rc=$RC: $ERR} (expected $EXP${ALSO:+ or $ALSO}) $(mark_ms ws0.$STEP ws1.$STEP) ms"
    if [ "$code" = "$EXP" ]; then
        if [ "$code" = ok ] || [ "$PARTIAL" = 1 ]; then
            apply $i
            [ "$PARTIAL" = 1 ] && log_step "note: $op $(v NAME $i) answered $code but ended the attachment"
        fi
    elif [ -n "$ALSO" ] && [ "$code" = "$ALSO" ]; then
        :
    else
        [ "$op" = attach ] && reap "$SLEEPER"
        walk_fail "$op $(v NAME $i): got ${code:-rc=$RC} ($ERR $OUT), the model expected $EXP${ALSO:+ or $ALSO}"
    fi
    # A sleeper not taken by an attachment is not needed.
    if [ "$op" = attach ] && [ "$code" != ok ]; then [ -n "$SLEEPER" ] && [ "$SLEEPER" != "$(v APID $i)" ] && reap "$SLEEPER"; fi
    SLEEPER=
    check 0
}

# Re-plug device I: remove, a pause, rescan (the kernel sends add before it
# probes the native driver).
replug() {
    local i=$1 pause
    rnd 6; pause=$((R * 100000))
    remove_dev $i
    [ $pause -gt 0 ] && usleep $pause
    rescan
    REPLUG_NOTE="removed, $((pause / 1000)) ms, rescan"
}
remove_dev() {
    local a
    a=$(v ADDR $1)
    pci_write 1 "devices/$a/remove"
    wait_until 15 absent "$a" || walk_fail "remove $(v NAME $1): $a did not go away"
    eval "GONE_$1=1"
}
# rescan: every removed device comes back.
rescan() {
    local i=0
    pci_write 1 rescan
    while [ $i -lt $N ]; do
        if [ "$(v GONE $i)" = 1 ]; then
            wait_until 15 present "$(v ADDR $i)" || walk_fail "$(v NAME $i) $(v ADDR $i) did not come back after the rescan"
            eval "GONE_$i=0"
        fi
        i=$((i + 1))
    done
}
# A device that may be removed: not held (a removal waits for the holder).
pick_unheld() {
    local k=0 j
    rnd $N
    while [ $k -lt $N ]; do
        j=$(((R + k) % N))
        [ -z "$(v HOLD $j)" ] && [ "$(v GONE $j)" = 0 ] && { DEV=$j; return 0; }
        k=$((k + 1))
    done
    DEV=
    return 1
}

step_kill9() {
    rnd 3
    local while_down=$R note=
    vfiod_kill9
    if [ "$while_down" = 0 ] && pick_unheld; then
        replug $DEV
        note=", $(v NAME $DEV) re-plugged while it was down ($REPLUG_NOTE)"
    else
        rnd $N
    fi
    restart_vfiod
    log_step "kill -9 vfiod (idle)$note, restarted"
    check "$([ -n "$note" ] && echo "$SETTLE" || echo 0)"
}

# kill -9 (or SIGTERM) while OP is in flight.
# A killed step may end either way; a SIGTERMed one must finish what it
# accepted (vfiod lets moves end) and answer, or refuse the connection.
inflight_step() {
    local sig=$1 op i d code vrc crc obs
    rnd 7
    set -- $OPS
    shift $R
    op=$1
    [ "$sig" = TERM ] && { rnd 2; [ $R = 0 ] && op=bind || op=unbind; }
    pick_dev "$op"
    i=$DEV
    rnd 5; d=$((R * 80000))
    WITH_GROUP=0
    INST=walk-$STEP
    [ "$op" = attach ] && start_sleeper
    op_args $op $i "$INST"
    # shellcheck disable=SC2086
    vfioctl --socket $SOCK --json $ARGS >/tmp/vm.walk.out 2>/tmp/vm.walk.err &
    local cl=$!
    [ $d -gt 0 ] && usleep $d
    if [ "$sig" = KILL ]; then
        vfiod_kill9
        vrc=killed
    else
        kill -TERM "$VFIOD_PID"
        wait_until 60 eval '! kill -0 $VFIOD_PID 2>/dev/null' || walk_fail "vfiod did not exit within 60 s of SIGTERM during $op $(v NAME $i)"
        wait "$VFIOD_PID"
        vrc=$?
    fi
    wait $cl
    crc=$?
    OUT=$(cat /tmp/vm.walk.out) ERR=$(cat /tmp/vm.walk.err)
    code=ok
    [ $crc = 0 ] || code=$(err_code)
    restart_vfiod
    log_step "SIG$sig vfiod $((d / 1000)) ms into $op $(v NAME $i) (model: $EXP): client ${code:-rc=$crc: $(echo "$ERR" | head -1 | sed 's/.*client error/client error/' | cut -c1-90)}; vfiod exit $vrc; restarted"
    [ "$sig" = TERM ] && [ "$vrc" != 0 ] && walk_fail "vfiod exited $vrc on SIGTERM (expected 0)"
    # An answer is what happened.
    if [ -n "$code" ] && [ "$code" = "$EXP" ]; then
        { [ "$code" = ok ] || [ "$PARTIAL" = 1 ]; } && apply $i
    elif [ -n "$code" ] && [ "$code" = "$ALSO" ]; then
        :
    elif [ -n "$code" ]; then
        walk_fail "$op $(v NAME $i) answered $code during SIG$sig, the model expected $EXP${ALSO:+ or $ALSO}"
    elif [ "$sig" = TERM ]; then
        # No answer after a SIGTERM: vfiod never took the request (one it
        # took runs to its end and is answered), so nothing may change.
        :
    elif [ "$EXP" = ok ]; then
        # Killed before it answered: the old state or the new one, as vfiod
        # reports it after the restart (the kernel checks below hold it to
        # that).
        observe $op $i || walk_fail "$op $(v NAME $i) killed: $OBS_WHY"
        log_step "  ($op $(v NAME $i) killed unanswered: $OBS)"
    fi
    if [ "$op" = attach ] && [ -n "$SLEEPER" ] && [ "$SLEEPER" != "$(v APID $i)" ]; then reap "$SLEEPER"; fi
    SLEEPER=
    check 0
}
# observe OP I: after a kill, take vfiod's word for device I where each of
# registered, bound_by_vfiod and attached_to is what it was before (the
# model now) or what OP leads to (N_*): an operation of several steps may
# stop between them (delete after its give-back, detach after the end of the
# attachment, attach after its bind), and each such state is whole. The
# kernel checks that follow hold vfiod to what it reports.
observe() {
    local op=$1 i=$2 j reg vfio att new_att
    vc list || { OBS_WHY="GET /devices: $ERR"; return 1; }
    j=$(printf '%s' "$OUT" | jq -r --arg n "$(v NAME $i)" '[.[] | select(.name == $n)] | first | if . == null then "0 0 -" else "1 \(if .bound_by_vfiod then 1 else 0 end) \(.attached_to // "-")" end')
    set -- $j
    reg=$1 vfio=$2 att=$3
    [ "$att" = - ] && att=
    case $N_ATT in -) new_att=$(v ATT $i) ;; new) new_att=$INST ;; *) new_att= ;; esac
    OBS="registered $reg, bound_by_vfiod $vfio, attached_to '$att'"
    if { [ "$reg" != "$(v REG $i)" ] && [ "$reg" != "$N_REG" ]; } ||
        { [ "$reg" = 1 ] && [ "$vfio" != "$(v VFIO $i)" ] && [ "$vfio" != "$N_VFIO" ]; } ||
        { [ "$att" != "$(v ATT $i)" ] && [ "$att" != "$new_att" ]; }; then
        OBS_WHY="vfiod reports $OBS; before: $(v REG $i) $(v VFIO $i) '$(v ATT $i)', after: $N_REG $N_VFIO '$new_att'"
        return 1
    fi
    [ "$reg" = 0 ] && vfio=0
    if [ "$reg $vfio $att" = "$(v REG $i) $(v VFIO $i) $(v ATT $i)" ]; then OBS="$OBS: as before"
    elif [ "$reg $vfio $att" = "$N_REG $N_VFIO $new_att" ]; then OBS="$OBS: took effect"
    else OBS="$OBS: in part"
    fi
    eval "REG_$i=$reg VFIO_$i=$vfio"
    if [ "$att" != "$(v ATT $i)" ]; then
        if [ -n "$att" ]; then
            eval "ATT_$i=$att APID_$i=$SLEEPER"
        else
            reap "$(v APID $i)"
            eval "ATT_$i= APID_$i="
        fi
    fi
    return 0
}

# A holder of a device on vfio-pci: as root, the container + group + device
# fd (as a VMM) or the group node alone; or as uid 1000, the VMM's user:
# that one must get in exactly when the device is attached (the grant works
# on the real node, not only in getfacl), and be refused (EACCES) otherwise.
step_holder_start() {
    local k=0 j a g kind start rc
    rnd $N; start=$R
    rnd 3; kind=$R
    DEV=
    while [ $k -lt $N ]; do
        j=$(((start + k) % N))
        a=$(v ADDR $j)
        if [ -z "$(v HOLD $j)" ] && has_driver "$a" vfio-pci; then DEV=$j; break; fi
        k=$((k + 1))
    done
    if [ -z "$DEV" ]; then
        log_step "holder: no device on vfio-pci to hold"
        return
    fi
    a=$(v ADDR $DEV) g=$(grp "$a")
    HOLDERS=$((HOLDERS + 1))
    HOLD_OUT=/tmp/vm.hold.$HOLDERS
    case $kind in
        0) vmtool vfiohold "$g" "$a" >"$HOLD_OUT" 2>&1 & ;;
        1) vmtool hold "/dev/vfio/$g" >"$HOLD_OUT" 2>&1 & ;;
        2) vmtool runas 1000 1000 - vmtool vfiohold "$g" "$a" >"$HOLD_OUT" 2>&1 & ;;
    esac
    eval "HOLD_$DEV=$!"
    # Until it holds or says why not (it then exits).
    wait_until 10 eval '[ -s "$HOLD_OUT" ]'
    usleep 50000
    if [ $kind = 2 ] && [ -z "$(v ATT $DEV)" ]; then
        wait "$(v HOLD $DEV)"
        rc=$?
        eval "HOLD_$DEV="
        [ $rc = 13 ] || walk_fail "uid 1000 opened $(v NAME $DEV)'s VFIO group $g though nothing is attached (rc=$rc): $(cat "$HOLD_OUT")"
        log_step "holder as uid 1000, $(v NAME $DEV) not attached: refused ($(tr '\n' ' ' <"$HOLD_OUT"))"
        check 0
        return
    fi
    grep -q holding "$HOLD_OUT" || walk_fail "holder of $(v NAME $DEV)$([ $kind = 2 ] && echo " as uid 1000, attached to $(v ATT $DEV)"): $(cat "$HOLD_OUT")"
    log_step "holder$([ $kind = 2 ] && echo ' as uid 1000 (the attachment'"'"'s user)'): $(cat "$HOLD_OUT")"
    check 0
}
step_holder_stop() {
    local k=0 j
    rnd $N
    while [ $k -lt $N ]; do
        j=$(((R + k) % N))
        if [ -n "$(v HOLD $j)" ]; then
            reap "$(v HOLD $j)"
            eval "HOLD_$j="
            log_step "holder of $(v NAME $j) exits"
            check 0
            return
        fi
        k=$((k + 1))
    done
    log_step "holder exit: nothing held"
}
step_vmm_kill() {
    local k=0 j
    rnd $N
    while [ $k -lt $N ]; do
        j=$(((R + k) % N))
        if [ -n "$(v APID $j)" ]; then
            log_step "VMM kill: pid $(v APID $j) of $(v NAME $j)'s attachment $(v ATT $j)"
            reap "$(v APID $j)"
            # Its attachment ends by itself; the device stays on vfio.
            eval "ATT_$j= APID_$j="
            check "$SETTLE"
            return
        fi
        k=$((k + 1))
    done
    log_step "VMM kill: nothing attached"
}
# A re-plug: remove and rescan, sometimes with vfiod killed (-9) or stopped
# (TERM) in the middle of its rebind after the rescan; or a removal whose
# rescan comes in a later step (the device stays absent meanwhile).
step_replug() {
    local how d vrc
    rnd 6; how=$R
    rnd 5; d=$((R * 60000))
    if ! pick_unheld; then
        log_step "re-plug: every device is held or gone"
        return
    fi
    case $how in
        0|1)
            remove_dev $DEV
            log_step "remove $(v NAME $DEV) (rescan later)"
            check "$SETTLE" ;;
        2)
            remove_dev $DEV
            pci_write 1 rescan
            [ $d -gt 0 ] && usleep $d
            vfiod_kill9
            rescan
            restart_vfiod
            log_step "re-plug $(v NAME $DEV), vfiod killed (-9) $((d / 1000)) ms after the rescan, restarted"
            check "$SETTLE" ;;
        3)
            remove_dev $DEV
            pci_write 1 rescan
            [ $d -gt 0 ] && usleep $d
            kill -TERM "$VFIOD_PID"
            wait_until 60 eval '! kill -0 $VFIOD_PID 2>/dev/null' || walk_fail "vfiod did not exit within 60 s of SIGTERM after a rescan"
            wait "$VFIOD_PID"
            vrc=$?
            [ $vrc = 0 ] || walk_fail "vfiod exited $vrc on SIGTERM after a rescan"
            rescan
            restart_vfiod
            log_step "re-plug $(v NAME $DEV), vfiod stopped (TERM) $((d / 1000)) ms after the rescan, restarted"
            check "$SETTLE" ;;
        *)
            replug $DEV
            log_step "re-plug $(v NAME $DEV) ($REPLUG_NOTE)"
            check "$SETTLE" ;;
    esac
}
step_rescan() {
    local i=0 gone=
    while [ $i -lt $N ]; do
        [ "$(v GONE $i)" = 1 ] && gone="$gone $(v NAME $i)"
        i=$((i + 1))
    done
    if [ -z "$gone" ]; then
        step_replug
        return
    fi
    rescan
    log_step "rescan:$gone back"
    check "$SETTLE"
}

# The table of steps (weights out of 100).
choose_step() {
    rnd 100
    if [ $R -lt 8 ]; then KIND=register
    elif [ $R -lt 14 ]; then KIND=delete
    elif [ $R -lt 27 ]; then KIND=bind
    elif [ $R -lt 36 ]; then KIND=unbind
    elif [ $R -lt 46 ]; then KIND=attach
    elif [ $R -lt 54 ]; then KIND=detach
    elif [ $R -lt 60 ]; then KIND=reset
    elif [ $R -lt 64 ]; then KIND=kill9
    elif [ $R -lt 73 ]; then KIND=kill9-inflight
    elif [ $R -lt 78 ]; then KIND=sigterm
    elif [ $R -lt 81 ]; then KIND=replug
    elif [ $R -lt 84 ]; then KIND=rescan
    elif [ $R -lt 90 ]; then KIND=holder
    elif [ $R -lt 95 ]; then KIND=holder-exit
    else KIND=vmm-kill
    fi
}

vfiod_start
check 0
T0=$(cut -d' ' -f1 /proc/uptime)
KINDS=
while [ $STEP -lt "$STEPS" ]; do
    if [ $STEP -gt 0 ] && awk -v t="$(cut -d' ' -f1 /proc/uptime)" -v s="$T0" -v b="$BUDGET" 'BEGIN{exit !(t - s > b)}'; then
        say "time budget of $BUDGET s used up after $STEP steps"
        break
    fi
    STEP=$((STEP + 1))
    choose_step
    KINDS="$KINDS $KIND"
    case $KIND in
        kill9) step_kill9 ;;
        kill9-inflight) inflight_step KILL ;;
        sigterm)
            rnd 3
            if [ $R = 0 ]; then
                kill -TERM "$VFIOD_PID"
                wait_until 60 eval '! kill -0 $VFIOD_PID 2>/dev/null' || walk_fail "vfiod did not exit within 60 s of SIGTERM"
                wait "$VFIOD_PID"
                rc=$?
                [ $rc = 0 ] || walk_fail "vfiod exited $rc on SIGTERM (idle)"
                restart_vfiod
                log_step "SIGTERM vfiod (idle), restarted"
                check 0
            else
                inflight_step TERM
            fi ;;
        replug) step_replug ;;
        rescan) step_rescan ;;
        holder) step_holder_start ;;
        holder-exit) step_holder_stop ;;
        vmm-kill) step_vmm_kill ;;
        *) api_step $KIND ;;
    esac
done
T1=$(cut -d' ' -f1 /proc/uptime)
SECS=$(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.1f", b - a}')
cp $WLOG "$OUTDIR/$VM_SCENARIO.steps.txt"
mix=$(echo $KINDS | tr ' ' '\n' | sort | uniq -c | awk '{printf "%s%s=%d", (NR > 1 ? " " : ""), $2, $1}')
say "seed $SEED: $STEP steps in $SECS s ($CHECKS checks, $SETTLED_LATE settled after waiting, $RESTARTS restarts): $mix"
metric walk_steps "$STEP" steps "seed $SEED, asked $STEPS: $mix"
metric walk_secs "$SECS" s "the walk's $STEP steps with the checks after each"
metric walk_step_ms "$(awk -v s="$SECS" -v n="$STEP" 'BEGIN{printf "%.0f", s * 1000 / n}')" ms "mean per step (operation + invariant check)"

# Leave the devices as found: removed ones back, holders and VMMs gone,
# everything given back.
rescan
check "$SETTLE"
i=0
while [ $i -lt $N ]; do
    reap "$(v HOLD $i)"; eval "HOLD_$i="
    reap "$(v APID $i)"
    i=$((i + 1))
done
i=0
while [ $i -lt $N ]; do
    if [ "$(v REG $i)" = 1 ]; then
        # The VMMs are gone: wait for their attachments to end first.
        wait_until "$SETTLE" eval 'vc show $(v NAME $i) && [ "$(jget .attached_to)" = null ]' ||
            walk_fail "cleanup: $(v NAME $i) still attached after its VMM was killed: $OUT"
        eval "ATT_$i= APID_$i="
        vc delete "$(v NAME $i)" || walk_fail "cleanup: delete $(v NAME $i): $ERR"
        eval "REG_$i=0 VFIO_$i=0"
    fi
    i=$((i + 1))
done
check 0
i=0
while [ $i -lt $N ]; do
    has_driver "$(v ADDR $i)" "$(v NATIVE $i)" || walk_fail "cleanup: $(v NAME $i) is on $(drv "$(v ADDR $i)"), not $(v NATIVE $i)"
    i=$((i + 1))
done
exit 0
