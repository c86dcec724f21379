# driver-timeout: an unbind that hangs in the kernel. A process holds the e1000e's VFIO
# device fd open (as a running VM would), so the kernel's vfio-pci unbind
# blocks until it is released. It keeps only the device fd: with the group
# fd open too, vfiod's holder scan refuses the unbind before writing
# (scenario holder-vfio-fd); the device fd alone is an anonymous inode that kernels
# before 6.18 do not tie to a device in /proc, the one holder the scan
# cannot see, so the write is made and hangs. vfiod must answer 504 driver_timeout for that
# request within its --op-timeout-ms, keep serving everyone else, let other
# IOMMU groups proceed, and once the holder goes away end with the device on
# one driver (and unbind must then work). Then the same with a hot-unplug
# while the device is held.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0")
EDU=$(dev_under "$PORT_edu0")
G=$(grp "$NIC")
vfiod_start --op-timeout-ms 3000
vc_ok register "$NIC" --name nic0
vc_ok register "$EDU" --name edu0
vc_ok bind nic0
has_driver "$NIC" vfio-pci || fail "bind nic0: kernel has $(drv "$NIC")"

holder_start vfiohold "$G" "$NIC" devonly

# The unbind hangs in the kernel: vfiod must give up on the request in time.
vfioctl --socket $SOCK --json unbind nic0 >/tmp/vm.h.out 2>/tmp/vm.h.err &
UNB=$!
mark t0
usleep 500000
# Meanwhile: reads answer, and another group binds and unbinds.
mark r0; vc_ok list; mark r1
mark r2; vc_ok health; mark r3
mark e0; vc bind edu0; erc=$?; mark e1
[ $erc = 0 ] || fail "bind of edu0 (another group) failed while nic0's unbind hangs: $ERR"
has_driver "$EDU" vfio-pci || fail "bind edu0 answered but the kernel has $(drv "$EDU")"
vc_ok unbind edu0
has_driver "$EDU" none || fail "unbind edu0: kernel has $(drv "$EDU")"
# The same group: must not hang forever either.
mark s0; vc bind nic0; src=$?; mark s1
say "during the hang: list $(mark_ms r0 r1) ms, health $(mark_ms r2 r3) ms, bind edu0 $(mark_ms e0 e1) ms; bind nic0 (same group) -> rc=$src $ERR$OUT in $(mark_ms s0 s1) ms"
wait $UNB
urc=$?
mark t1
code=$(jq -r .code </tmp/vm.h.err 2>/dev/null)
say "hung unbind answered after $(mark_ms t0 t1) ms: rc=$urc $(cat /tmp/vm.h.err /tmp/vm.h.out)"
[ "$code" = driver_timeout ] || fail "the hung unbind answered '$(cat /tmp/vm.h.err /tmp/vm.h.out)', expected code driver_timeout"
awk -v ms="$(mark_ms t0 t1)" 'BEGIN{exit !(ms < 10000)}' || fail "the hung unbind took $(mark_ms t0 t1) ms with --op-timeout-ms 3000"
awk -v ms="$(mark_ms r0 r1)" 'BEGIN{exit !(ms < 3000)}' || fail "list took $(mark_ms r0 r1) ms while another group's unbind hung"
vc_ok show nic0
say "while held: kernel driver=$(drv "$NIC"); vfiod: $(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, stuck, present}')"
kill -0 "$VFIOD_PID" || fail "vfiod died"

# Release the device: the kernel finishes the unbind.
kill "$HOLD"; wait "$HOLD" 2>/dev/null
settled() {
    vc show nic0 || return 1
    jload
    case $(drv "$NIC") in
        e1000e) has_netdev "$NIC" && [ "$J_current_driver" = e1000e ] && [ "$J_bound_to_vfio" = false ] ;;
        vfio-pci) [ "$J_current_driver" = vfio-pci ] && [ "$J_bound_to_vfio" = true ] ;;
        *) return 1 ;;
    esac
}
if ! wait_until 15 settled; then
    fail "after the holder exited: kernel driver=$(drv "$NIC") override='$(cat /sys/bus/pci/devices/$NIC/driver_override)'; vfiod: $(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, stuck}')"
fi
say "after release: kernel driver=$(drv "$NIC"); vfiod: $(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, stuck}')"
if has_driver "$NIC" vfio-pci; then vc_ok unbind nic0; fi
has_driver "$NIC" e1000e || fail "nic0 did not get back to e1000e: $(drv "$NIC")"
wait_until 5 has_netdev "$NIC" || fail "no netdev after the final unbind"

# Surprise removal of a device a "VM" holds open: the kernel's removal blocks
# until the fd is released. vfiod keeps answering, a request on the device
# fails in time, and once released the device is gone (present=false).
events_start
hotadd_e1000e hph
A=$HOTADDED
vc_ok register "$A" --name hph
vc_ok bind hph
holder_start vfiohold "$(grp "$A")" "$A"
HOLD2=$HOLD
device_del hph >/dev/null
usleep 2000000
present "$A" || say "note: $A went away although its VFIO fd is open"
mark x0; vc unbind hph; xrc=$?; mark x1
say "unbind during the blocked removal: rc=$xrc in $(mark_ms x0 x1) ms: $ERR"
[ $xrc != 0 ] || fail "unbind during the blocked removal answered success"
awk -v ms="$(mark_ms x0 x1)" 'BEGIN{exit !(ms < 10000)}' || fail "unbind during the blocked removal took $(mark_ms x0 x1) ms"
mark y0; vc_ok health; mark y1
awk -v ms="$(mark_ms y0 y1)" 'BEGIN{exit !(ms < 3000)}' || fail "health took $(mark_ms y0 y1) ms during the blocked removal"
kill "$HOLD2"; wait "$HOLD2" 2>/dev/null
wait_until 15 absent "$A" || fail "$A still present after the holder exited"
wait_until 10 has_event hotplug_remove "$A" || fail "no hotplug_remove event for $A; events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
gone() { vc show hph && jload && [ "$J_present" = false ]; }
wait_until 10 gone || fail "after the removal hph is present=$J_present current_driver=$J_current_driver"
say "surprise removal: events $(jq -r -s --arg a "$A" 'map(select(.pci_address == $a) | .type) | join(" ")' $EVENTS)"
exit 0
