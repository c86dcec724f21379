# interrupted-move: a move belongs to vfiod, not to the connection that asked for it
# (issue 9). vfiod runs in a cgroup limited to a few percent of one CPU, so a
# bind (whose sysfs writes run in vfiod's threads) takes seconds and "the
# middle" of it can be hit on purpose: the signal is sent once the kernel has
# taken the device from its driver (the driver link is gone) and before
# vfio-pci has it.
#   - `vfioctl bind` of the e1000e killed with SIGINT in the middle: the
#     move still ends, on vfio-pci or rolled back to e1000e, never without a
#     driver; vfiod's record agrees and the outcome is published as an event;
#   - vfiod sent SIGTERM in the middle of a bind of the igb: it finishes the
#     move, answers the client that stayed, exits 0; the device is on
#     vfio-pci or igb;
#   - after a restart, vfiod's registry agrees with the kernel for both;
#   - SIGINT in the middle of a bind whose unbind write then outlasts the op
#     timeout (vfiod's CPU cut to 1% once the device has left its driver):
#     when the write returns, vfiod still settles the device (on vfio-pci or
#     e1000e, driver_override matching, its record agreeing); nothing may
#     stay without a driver with vfiod's driver_override behind.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0") || fail "no e1000e"
IGB=$(dev_under "$PORT_igb0") || fail "no igb below $PORT_igb0"
has_driver "$IGB" igb || fail "precondition: $IGB is on $(drv "$IGB")"
QUOTA=${VM_SLOW_QUOTA:-15000}   # microseconds of CPU per 100 ms for vfiod

CG=/sys/fs/cgroup
mkdir -p $CG
grep -q "^cgroup2 $CG " /proc/mounts || mount -t cgroup2 none $CG || fail "cannot mount cgroup2"
echo +cpu >$CG/cgroup.subtree_control || fail "cannot enable the cpu controller"
mkdir -p $CG/vm-slow
echo "$QUOTA 100000" >$CG/vm-slow/cpu.max || fail "cannot set cpu.max"
slow_vfiod() { echo "$VFIOD_PID" >$CG/vm-slow/cgroup.procs || fail "cannot move vfiod into $CG/vm-slow"; }

# settled ADDR NAME NATIVE: the kernel has ADDR on vfio-pci or NATIVE (with
# driver_override matching) and vfiod's record says the same.
settled() {
    local a=$1 name=$2 native=$3 k
    k=$(drv "$a")
    case $k in vfio-pci | "$native") ;; *) return 1 ;; esac
    vc show "$name" || return 1
    jload
    [ "$J_current_driver" = "$k" ] || return 1
    if [ "$k" = vfio-pci ]; then
        [ "$J_bound_to_vfio" = true ] && vfio_node "$a"
    else
        [ "$J_bound_to_vfio" = false ] && [ -z "$(override_of "$a")" ]
    fi
}
state_of() { echo "kernel driver=$(drv "$1"); vfiod: $(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, stuck, pending}' 2>/dev/null)"; }
# in_the_middle ADDR PID: wait until ADDR has no driver (the unbind began)
# while PID (who asked for the move) is still there. Fails if the move ended
# first (then the throttle is too generous: lower VM_SLOW_QUOTA).
in_the_middle() {
    MID_ADDR=$1 MID_PID=$2
    wait_until 30 eval '[ ! -e /sys/bus/pci/devices/$MID_ADDR/driver ] || ! kill -0 $MID_PID 2>/dev/null'
    [ ! -e "/sys/bus/pci/devices/$1/driver" ] && kill -0 "$2" 2>/dev/null
}

# The throttled writes must not run into the op timeout: this is about who
# owns a move, not about slow kernels (scenario driver-timeout).
vfiod_start --op-timeout-ms 60000
vc_ok register "$NIC" --name nic0
vc_ok register "$IGB" --name igb0
events_start
slow_vfiod
say "vfiod (pid $VFIOD_PID) limited to $QUOTA us per 100 ms"

# --- SIGINT to the client in the middle of a bind ---------------------------
# start_bind NAME ADDR OUTFILE: `vfioctl bind NAME` in the background (CL),
# caught in the middle; up to 3 tries (a try that missed it is undone).
start_bind() {
    local try=0
    while [ $try -lt 3 ]; do
        try=$((try + 1))
        mark a0
        vfioctl --socket $SOCK --json bind "$1" >"$3" 2>"$3.err" &
        CL=$!
        in_the_middle "$2" $CL && return 0
        wait $CL
        say "try $try missed the middle of bind $1 ($(drv "$2"): $(cat "$3.err"))"
        wait_until 60 eval 'has_driver "$MID_ADDR" vfio-pci' && vc_ok unbind "$1"
    done
    fail "missed the middle of the bind of $1 three times (kernel: $(drv "$2"))"
}
start_bind nic0 "$NIC" /tmp/vm.o.out
mark a1
kill -INT $CL
wait $CL 2>/dev/null
say "SIGINT to vfioctl bind nic0 $(mark_ms a0 a1) ms after it started, with $NIC on no driver"
if ! wait_until 60 settled "$NIC" nic0 e1000e; then
    fail "after the client's SIGINT nic0 did not settle in 60 s: $(state_of "$NIC")"
fi
mark a2
say "settled $(mark_ms a1 a2) ms after the SIGINT: $(state_of "$NIC")"
wait_until 10 eval 'has_event bind "$NIC" || has_event bind_failed "$NIC"' ||
    fail "no bind or bind_failed event for $NIC after the client went away; events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
NIC_END=$(drv "$NIC")

# --- SIGTERM to vfiod in the middle of a bind --------------------------------
start_bind igb0 "$IGB" /tmp/vm.o.out2
mark t0
kill -TERM "$VFIOD_PID"
wait_until 60 eval '! kill -0 $VFIOD_PID 2>/dev/null' || fail "vfiod did not exit within 60 s of SIGTERM (kernel: $(drv "$IGB"))"
wait "$VFIOD_PID"
vrc=$?
mark t1
VFIOD_PID=
wait $CL
crc=$?
say "SIGTERM in the middle of bind igb0: vfiod exited $vrc after $(mark_ms t0 t1) ms; the client got rc=$crc $(cat /tmp/vm.o.out2 /tmp/vm.o.out2.err | tr '\n' ' ')"
metric sigterm_mid_bind_exit_ms "$(mark_ms t0 t1)" ms "SIGTERM during a throttled bind -> vfiod exits (it finishes the move first)"
[ $vrc = 0 ] || fail "vfiod exited $vrc on SIGTERM during a bind"
case $(drv "$IGB") in
    vfio-pci | igb) ;;
    *) fail "after vfiod's SIGTERM during the bind $IGB is on $(drv "$IGB")" ;;
esac
if [ "$(drv "$IGB")" = vfio-pci ]; then
    [ $crc = 0 ] && jq -e '.bound_to_vfio == true' /tmp/vm.o.out2 >/dev/null ||
        fail "the bind completed, but the client that stayed got rc=$crc: $(cat /tmp/vm.o.out2 /tmp/vm.o.out2.err)"
else
    [ -z "$(override_of "$IGB")" ] || fail "$IGB back on igb with driver_override '$(override_of "$IGB")'"
    [ $crc != 0 ] || fail "the bind was rolled back, but the client got success: $(cat /tmp/vm.o.out2)"
fi
IGB_END=$(drv "$IGB")

# --- after a restart the registry agrees with the kernel --------------------
# The throttled writes must not run into the op timeout: this is about who
# owns a move, not about slow kernels (scenario driver-timeout).
vfiod_start --op-timeout-ms 60000
wait_until 10 settled "$NIC" nic0 e1000e || fail "after restart nic0 disagrees: $(state_of "$NIC")"
[ "$(drv "$NIC")" = "$NIC_END" ] || fail "the restart moved nic0 from $NIC_END to $(drv "$NIC")"
wait_until 10 settled "$IGB" igb0 igb || fail "after restart igb0 disagrees: $(state_of "$IGB")"
[ "$(drv "$IGB")" = "$IGB_END" ] || fail "the restart moved igb0 from $IGB_END to $(drv "$IGB")"
say "after restart: nic0 on $NIC_END, igb0 on $IGB_END, vfiod agrees"
for n in nic0 igb0; do
    vc_ok show $n
    [ "$(jget .bound_to_vfio)" = true ] && vc_ok unbind $n
done
has_driver "$NIC" e1000e && has_driver "$IGB" igb || fail "final unbinds: $NIC on $(drv "$NIC"), $IGB on $(drv "$IGB")"

# --- the client goes away and the write outlasts the op timeout -------------
vfiod_stop
vfiod_start --op-timeout-ms 1500
slow_vfiod
start_bind nic0 "$NIC" /tmp/vm.o.out3
echo "1000 100000" >$CG/vm-slow/cpu.max
kill -INT $CL
wait $CL 2>/dev/null
mark s0
usleep 3000000
at3s=$(drv "$NIC")
echo "max 100000" >$CG/vm-slow/cpu.max
if ! wait_until 60 settled "$NIC" nic0 e1000e; then
    fail "the bind's client left and its write outlasted the op timeout: not settled 60 s later: $(state_of "$NIC") override='$(override_of "$NIC")'"
fi
mark s1
say "client gone, write past the op timeout: driver at +3 s '$at3s', settled on $(drv "$NIC") $(mark_ms s0 s1) ms after the SIGINT; vfiod: $(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, stuck}')"
exit 0
