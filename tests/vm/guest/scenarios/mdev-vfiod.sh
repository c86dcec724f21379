# mdev-vfiod: vfiod's mdev claims on the real kernel, with a PCI parent.
# vm-needs: mtty
#
# The parent is QEMU's edu device (rp3) on edu_mdev.ko (tests/vm/guest/edu-mdev,
# built by run.sh with the mtty samples): two types, edu_mdev-1 and
# edu_mdev-2, sharing 4 instances counted by the mdev core. Through vfioctl
# and the API, as root:
#   1. edu registered with {"resource": "edu"}; `vfioctl mdev-types` shows
#      both types with 4 available;
#   2. a claim with mdev_type edu_mdev-1 for uid 1000 and a VMM pid (a sleep
#      run as uid 1000) -> 201 with mdev.uuid: /sys/bus/mdev/devices/<uuid>
#      exists under the edu function, of that type; its /dev/vfio/N opens for
#      uid 1000 and not for uid 1001; edu stays on edu_mdev; both types'
#      available_instances drop to 3; the same claim again -> 200, same uuid;
#   3. bind, unbind and delete of the parent -> 409 mdevs_in_use, nothing moved;
#   4. vfiod restarted: the mdev and uid 1000's access are still there;
#   5. edu unbound from edu_mdev (the kernel drops the mdev) and bound again:
#      vfiod, told by the kernel's bind uevent, makes it again with the same
#      UUID and grants it again (timed);
#   6. the VMM killed -> the mdev is removed and vfiod's record dropped;
#   7. a claim without pid by type name (vfioctl), capacity shows 3 and 3;
#      uid 1000 opens its VFIO device fd (container, group, device) and
#      `vfioctl detach edu0 --instance` is refused (device_busy) until that
#      process is gone, then removes it;
#   8. 4 claims fill the parent, a 5th -> 409 no_capacity; all detached.
# Timings: claim latency, re-create after the reload, removal after the kill.
. /vm/lib.sh
need_vfiod
KREL=$(uname -r)
[ -e "/lib/modules/$KREL/extra/edu_mdev.ko" ] ||
    fail "no edu_mdev.ko in the guest: tests/vm/run.sh could not build it (its log says why)"
EDU=$(dev_under "$PORT_edu0") || fail "no edu behind $PORT_edu0"
D=/sys/bus/pci/devices/$EDU
T=$D/mdev_supported_types
DRV=/sys/bus/pci/drivers/edu_mdev
SLEEPER= HOLD=

# A process left holding an mdev's device fd would make its remove (and the
# unbind) block until the scenario's timeout: it goes first.
cleanup() {
    [ -n "$HOLD" ] && kill -9 "$HOLD" 2>/dev/null
    [ -n "$SLEEPER" ] && kill -9 "$SLEEPER" 2>/dev/null
    vfiod_stop
    local m
    for m in /sys/bus/mdev/devices/*; do
        [ -e "$m/remove" ] && echo 1 >"$m/remove" 2>/dev/null
    done
    [ -e "$D/driver" ] && [ "$(drv "$EDU")" = edu_mdev ] && echo "$EDU" >$DRV/unbind 2>/dev/null
    [ -d /sys/module/edu_mdev ] && rmmod edu_mdev 2>/dev/null
    [ -d /sys/module/mdev ] && rmmod mdev 2>/dev/null
    return 0
}
trap 'rc=$?; cleanup; (exit $rc); scenario_exit' EXIT

code_of() { printf '%s' "$ERR" | jq -r .code 2>/dev/null; }
avail() { cat "$T/$1/available_instances"; }
mdev_dir() { [ -e "/sys/bus/mdev/devices/$1" ]; }
mdev_group() { basename "$(readlink "/sys/bus/mdev/devices/$1/iommu_group")"; }
n_mdevs() { ls /sys/bus/mdev/devices | grep -c .; }
claim() { # INSTANCE TYPE [EXTRA-JSON-FIELDS]
    api POST /devices/claim "{\"tags\": {\"resource\": \"edu\"}, \"instance_id\": \"$1\", \"mdev_type\": \"$2\"${3:+, $3}}"
}
# An mdev of edu's, of TYPE, whose group node uid 1000 may open and uid 1001 not.
check_granted() { # UUID TYPE WHEN
    local node
    mdev_dir "$1" || fail "$3: /sys/bus/mdev/devices/$1 is missing ($(ls /sys/bus/mdev/devices | tr '\n' ' '))"
    [ "$(readlink -f "/sys/bus/mdev/devices/$1")" = "$(readlink -f "$D")/$1" ] ||
        fail "$3: mdev $1 is at $(readlink -f "/sys/bus/mdev/devices/$1"), not under edu $EDU"
    [ "$(basename "$(readlink "/sys/bus/mdev/devices/$1/mdev_type")")" = "$2" ] ||
        fail "$3: mdev $1 has type $(readlink "/sys/bus/mdev/devices/$1/mdev_type"), not $2"
    node=/dev/vfio/$(mdev_group "$1")
    [ -c "$node" ] || fail "$3: $node (group of mdev $1) is not a character node"
    uid_can_open 1000 "$node" || fail "$3: uid 1000 cannot open $node of mdev $1: $OPEN_ERR (ACL: $(acl_of "$node"))"
    uid_can_open 1001 "$node"
    [ $? = 1 ] || fail "$3: uid 1001 is not refused $node: $OPEN_ERR (ACL: $(acl_of "$node"))"
    has_driver "$EDU" edu_mdev || fail "$3: edu $EDU is on $(drv "$EDU"), not edu_mdev"
    say "$3: mdev $1 ($2) under $EDU, $node opens for uid 1000, uid 1001 refused; ACL: $(acl_of "$node")"
}

# --- loading: edu on edu_mdev, an mdev parent -------------------------------------
has_driver "$EDU" none || fail "precondition: edu $EDU has driver $(drv "$EDU")"
[ -d /sys/module/mdev ] && fail "precondition: mdev is loaded before the scenario loads it"
mark l0
modprobe edu_mdev || fail "modprobe edu_mdev failed: $(dmesg | tail -5)"
mark l1
# Its id table names 1234:11e8, so loading binds the driverless edu; bind by
# hand only if that did not happen.
has_driver "$EDU" edu_mdev || echo "$EDU" >$DRV/bind || fail "bind $EDU to edu_mdev failed: $(dmesg | tail -5)"
has_driver "$EDU" edu_mdev || fail "edu $EDU is on $(drv "$EDU") after loading edu_mdev"
say "modprobe edu_mdev (pulls in mdev): $(mark_ms l0 l1) ms; edu $EDU on edu_mdev"
[ "$(ls "$T" 2>/dev/null | tr '\n' ' ')" = "edu_mdev-1 edu_mdev-2 " ] || fail "edu's mdev_supported_types: [$(ls "$T" 2>&1 | tr '\n' ' ')]"
[ "$(readlink -f /sys/class/mdev_bus/$EDU)" = "$(readlink -f "$D")" ] || fail "/sys/class/mdev_bus/$EDU does not lead to edu"
for t in edu_mdev-1 edu_mdev-2; do
    [ "$(avail $t)" = 4 ] && [ "$(cat $T/$t/device_api)" = vfio-pci ] ||
        fail "$t: available_instances $(avail $t), device_api $(cat $T/$t/device_api)"
done
say "types: edu_mdev-1 ($(cat $T/edu_mdev-1/name)), edu_mdev-2 ($(cat $T/edu_mdev-2/name)); 4 available each, device_api vfio-pci"

# --- 1. registered, its types through vfioctl ---------------------------------------
vfiod_start
vc_ok register "$EDU" --name edu0 --tag resource=edu
vc_ok mdev-types edu0
[ "$(jget '[.mdev_types[] | "\(.id)=\(.available_instances)"] | join(" ")')" = "edu_mdev-1=4 edu_mdev-2=4" ] ||
    fail "vfioctl mdev-types edu0: $OUT"
[ "$(jget '.mdev_types[0].name')" = "edu slice" ] && [ "$(jget '.mdev_types[0].device_api')" = vfio-pci ] ||
    fail "vfioctl mdev-types edu0: name/device_api: $OUT"
say "vfioctl mdev-types edu0:"
vfioctl --socket $SOCK mdev-types edu0

# --- 2. a claim for uid 1000 and a VMM ----------------------------------------------
vmtool runas 1000 1000 - sleep 1000000 &
SLEEPER=$!
wait_until 10 eval 'grep -q "^Uid:[[:space:]]*1000[[:space:]]" /proc/$SLEEPER/status' || fail "sleeper $SLEEPER is not uid 1000"
mark c0
claim vm-e1 edu_mdev-1 "\"uid\": 1000, \"pid\": $SLEEPER"
mark c1
[ "$RC" = 0 ] && [ "$STATUS" = 201 ] || fail "claim edu_mdev-1 for uid 1000 pid $SLEEPER: status $STATUS $ERR"
CLAIM_MS=$(mark_ms c0 c1)
U1=$(jget .mdev.uuid)
[ "$(jget .mdev.mdev_type)" = edu_mdev-1 ] && [ "$(jget .mdev.attached_uid)" = 1000 ] && [ "$(jget .mdev.attached_pid)" = "$SLEEPER" ] &&
    [ "$(jget .mdev.instance_id)" = vm-e1 ] && [ "$(jget .pci_address)" = "$EDU" ] || fail "claim answer: $OUT"
[ "$(readlink -f "$(jget .mdev.sysfs_path)")" = "$(readlink -f "$D")/$U1" ] || fail "claim's sysfs_path $(jget .mdev.sysfs_path) is not mdev $U1 under $EDU"
say "claim vm-e1 edu_mdev-1 -> 201 in $CLAIM_MS ms: mdev $U1, sysfs_path $(jget .mdev.sysfs_path)"
check_granted "$U1" edu_mdev-1 "after the claim"
[ "$(avail edu_mdev-1) $(avail edu_mdev-2)" = "3 3" ] || fail "available after one mdev: $(avail edu_mdev-1) $(avail edu_mdev-2), not 3 3"
mark c2
claim vm-e1 edu_mdev-1 "\"uid\": 1000, \"pid\": $SLEEPER"
mark c3
[ "$STATUS" = 200 ] && [ "$(jget .mdev.uuid)" = "$U1" ] || fail "the same claim again: $STATUS $(jget .mdev.uuid) $ERR, not 200 $U1"
[ "$(n_mdevs)" = 1 ] || fail "the same claim again made another mdev: $(ls /sys/bus/mdev/devices | tr '\n' ' ')"
say "the same claim again -> 200, same uuid, in $(mark_ms c2 c3) ms; one mdev in the kernel"

# --- 3. the parent is not moved or deleted while it has one -------------------------
for op in bind unbind delete; do
    vc_err mdevs_in_use $op edu0
    has_driver "$EDU" edu_mdev && mdev_dir "$U1" || fail "after the refused $op: edu on $(drv "$EDU"), mdev $U1 $(mdev_dir "$U1" && echo present || echo gone)"
    say "$op edu0 -> 409 mdevs_in_use: $(printf '%s' "$ERR" | jq -r .message)"
done

# --- 4. vfiod restarted ----------------------------------------------------------------
vfiod_stop
vfiod_start
check_granted "$U1" edu_mdev-1 "after vfiod's restart"
vc_ok mdev-types edu0
[ "$(jget '[.mdevs[] | "\(.uuid) \(.instance_id) \(.attached_uid) \(.attached_pid)"] | join(",")')" = "$U1 vm-e1 1000 $SLEEPER" ] ||
    fail "after the restart vfiod's mdevs of edu0: $OUT"

# --- 5. the parent's driver reloaded -------------------------------------------------
mark r0
echo "$EDU" >$DRV/unbind || fail "unbind $EDU from edu_mdev failed"
mark r1
mdev_dir "$U1" && fail "the kernel kept mdev $U1 after edu's unbind"
[ -e "$T" ] && fail "edu still has mdev_supported_types after its unbind"
say "edu unbound from edu_mdev in $(mark_ms r0 r1) ms: the kernel dropped mdev $U1"
mark r2
echo "$EDU" >$DRV/bind || fail "bind $EDU to edu_mdev again failed"
mark r3
wait_until 30 mdev_dir "$U1" || fail "vfiod did not make mdev $U1 again in 30 s after edu's bind (log: $(grep -i mdev $VFIOD_LOG | tail -5))"
mark r4
NODE=/dev/vfio/$(mdev_group "$U1")
wait_until 30 eval 'acl_of $NODE | grep -q "user:1000:rw"' || fail "mdev $U1 made again but $NODE not granted to uid 1000: $(acl_of $NODE)"
mark r5
RECREATE_MS=$(mark_ms r2 r4)
REGRANT_MS=$(mark_ms r2 r5)
check_granted "$U1" edu_mdev-1 "after the driver reload"
say "bind written in $(mark_ms r2 r3) ms; mdev $U1 back $RECREATE_MS ms after the bind write, granted again after $REGRANT_MS ms"

# --- 6. the VMM exits ------------------------------------------------------------------
mark k0
kill -9 "$SLEEPER"
wait "$SLEEPER" 2>/dev/null
SLEEPER=
wait_until 30 eval '! mdev_dir $U1' || fail "mdev $U1 still there 30 s after its VMM was killed"
mark k1
wait_until 10 eval 'vc mdev-types edu0 && [ "$(jget ".mdevs | length")" = 0 ]' || fail "vfiod still records an mdev on edu0 after the VMM's exit: $OUT"
[ "$(avail edu_mdev-1) $(avail edu_mdev-2)" = "4 4" ] || fail "available after the VMM's exit: $(avail edu_mdev-1) $(avail edu_mdev-2)"
KILL_MS=$(mark_ms k0 k1)
say "VMM killed -> mdev $U1 removed after $KILL_MS ms, record dropped, 4 4 available"

# --- 7. a claim without pid, by type name; capacity; detach --instance ---------------
mark d0
vc_ok claim --tag resource=edu --instance vm-e2 --uid 1000 --mdev-type "edu slice, second type"
mark d1
U2=$(jget .mdev.uuid)
[ -n "$U2" ] && [ "$U2" != null ] && [ "$(jget .mdev.mdev_type)" = edu_mdev-2 ] || fail "vfioctl claim --mdev-type 'edu slice, second type': $OUT"
check_granted "$U2" edu_mdev-2 "vfioctl claim vm-e2 (no pid)"
api_ok GET '/devices/capacity?tags%5Bresource%5D=edu'
say "capacity: $(printf '%s' "$OUT" | jq -c .resources)"
printf '%s' "$OUT" | jq -e '[.resources[] | select(.resource == "edu") | .mdev_types == {"edu_mdev-1": 3, "edu_mdev-2": 3}] == [true]' >/dev/null ||
    fail "capacity with one mdev: $OUT"
vfioctl --socket $SOCK capacity --tag resource=edu
# uid 1000 uses its grant as a VMM does: container, group, the mdev's device fd
# (edu_mdev's open_device); vfiod then refuses to remove it under the holder.
G2=$(mdev_group "$U2")
holder_start runas 1000 1000 - vmtool vfiohold "$G2" "$U2"
vc detach edu0 --instance vm-e2
[ "$RC" != 0 ] && busy_names_pid "$HOLD" vmtool || fail "detach of vm-e2 while uid 1000 holds its device fd: rc $RC $OUT $ERR, not device_busy naming pid $HOLD"
mdev_dir "$U2" || fail "mdev $U2 gone after the refused detach"
say "detach --instance vm-e2 while uid 1000 (pid $HOLD) holds its VFIO device fd -> device_busy: $(printf '%s' "$ERR" | jq -r .message)"
kill -9 "$HOLD"; wait "$HOLD" 2>/dev/null
HOLD=
vc_ok detach edu0 --instance vm-e2
mdev_dir "$U2" && fail "mdev $U2 still there after vfioctl detach edu0 --instance vm-e2"
[ "$(avail edu_mdev-2)" = 4 ] || fail "available after the detach: $(avail edu_mdev-2)"
say "vfioctl claim by name -> $U2 in $(mark_ms d0 d1) ms (client included); detach --instance removed it"

# --- 8. the parent full --------------------------------------------------------------
i=0
while [ $i -lt 4 ]; do
    i=$((i + 1))
    mark f0.$i
    claim "fill-$i" "edu_mdev-$((i % 2 + 1))" '"uid": 1000'
    mark f1.$i
    [ "$STATUS" = 201 ] || fail "fill claim $i: status $STATUS $ERR"
    FILL_MS="$FILL_MS $(mark_ms f0.$i f1.$i)"
done
[ "$(avail edu_mdev-1) $(avail edu_mdev-2) $(n_mdevs)" = "0 0 4" ] || fail "after 4 claims: available $(avail edu_mdev-1) $(avail edu_mdev-2), $(n_mdevs) mdevs"
claim fill-5 edu_mdev-1 '"uid": 1000'
[ "$STATUS" = 409 ] && [ "$(code_of)" = no_capacity ] || fail "a 5th claim on a full parent: $STATUS $OUT $ERR, not 409 no_capacity"
say "4 claims fill edu (ms: $FILL_MS); a 5th -> 409 no_capacity: $(printf '%s' "$ERR" | jq -r .message)"
for i in 1 2 3 4; do vc_ok detach edu0 --instance "fill-$i"; done
[ "$(n_mdevs) $(avail edu_mdev-1)" = "0 4" ] || fail "after detaching all: $(n_mdevs) mdevs, $(avail edu_mdev-1) available"
vc_ok delete edu0
has_driver "$EDU" edu_mdev || fail "after delete edu0 edu is on $(drv "$EDU")"
say "all detached, edu0 deleted, edu stays on edu_mdev"

metric mdev_pci_claim_ms "$CLAIM_MS" ms "POST /devices/claim mdev_type on a PCI parent (edu_mdev) -> 201: create + grant, client start included"
metric mdev_pci_claim_fill_median_ms "$(echo $FILL_MS | median)" ms "the same, 4 claims without pid filling the parent (median)"
metric mdev_pci_recreate_ms "$RECREATE_MS" ms "parent bound to its driver again -> vfiod made the mdev again with the same UUID (polled every 20 ms)"
metric mdev_pci_regrant_ms "$REGRANT_MS" ms "the same -> the new group node granted to uid 1000 again"
metric mdev_pci_vmm_exit_remove_ms "$KILL_MS" ms "VMM SIGKILLed -> vfiod removed its mdev (polled every 20 ms)"
