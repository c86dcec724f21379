# driver-stolen: someone else moves a device that vfiod bound. An operator gives the
# e1000e back to its driver with plain sysfs writes behind vfiod's back:
# vfiod must notice from the kernel's uevents (driver_stolen, current_driver,
# bound_to_vfio false). Started with --reclaim, it takes the device back to
# vfio-pci by itself.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0")
vfiod_start
events_start
vc_ok register "$NIC" --name nic0
vc_ok bind nic0
has_driver "$NIC" vfio-pci || fail "bind: $NIC on $(drv "$NIC")"
sysfs_from_vfio "$NIC"
has_driver "$NIC" e1000e || fail "precondition: the manual move left $NIC on $(drv "$NIC")"
cur() { vc show nic0 && jload && [ "$J_current_driver" = "$1" ]; }
wait_until 10 cur e1000e || fail "vfiod did not notice the move: current_driver=$J_current_driver"
[ "$J_bound_to_vfio" = false ] || fail "bound_to_vfio=$J_bound_to_vfio after the device left vfio-pci"
wait_until 5 has_event driver_stolen "$NIC" || say "note: no driver_stolen event; events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
usleep 1500000
has_driver "$NIC" e1000e || fail "without --reclaim vfiod moved $NIC to $(drv "$NIC")"
# vfiod still knows the original driver: bind and unbind work.
vc_ok bind nic0
has_driver "$NIC" vfio-pci || fail "bind after the steal: $NIC on $(drv "$NIC")"
vfiod_stop

vfiod_start --reclaim
events_start
sysfs_from_vfio "$NIC"
say "moved $NIC to $(drv "$NIC") by hand with --reclaim on"
wait_until 10 has_driver "$NIC" vfio-pci || fail "--reclaim: $NIC stayed on $(drv "$NIC")"
vfio_node "$NIC" || fail "--reclaim: /dev/vfio/$(grp "$NIC") missing"
wait_until 5 cur vfio-pci || fail "--reclaim: current_driver=$J_current_driver"
say "reclaimed; events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
vc_ok unbind nic0
has_driver "$NIC" e1000e || fail "final unbind: $NIC on $(drv "$NIC")"

# The same while vfiod is down. At startup vfiod restores the bindings it
# made (what brings devices back to vfio-pci after a reboot), --reclaim or
# not; either way, what it reports must match the kernel.
vfiod_stop
vfiod_start
vc_ok bind nic0
vfiod_stop
sysfs_from_vfio "$NIC"
has_driver "$NIC" e1000e || fail "precondition: manual move while vfiod is down: $(drv "$NIC")"
vfiod_start
usleep 1000000
consistent() {
    vc show nic0 && jload || return 1
    case $(drv "$NIC") in
        vfio-pci) [ "$J_current_driver" = vfio-pci ] && [ "$J_bound_to_vfio" = true ] && vfio_node "$NIC" ;;
        e1000e) [ "$J_current_driver" = e1000e ] && [ "$J_bound_to_vfio" = false ] ;;
        *) return 1 ;;
    esac
}
wait_until 10 consistent || fail "after a move while vfiod was down: kernel $(drv "$NIC"), vfiod current_driver=$J_current_driver bound_to_vfio=$J_bound_to_vfio"
say "a device moved off vfio-pci while vfiod was down is, after its start (no --reclaim), on $(drv "$NIC")"
if has_driver "$NIC" vfio-pci; then vc_ok unbind nic0; fi
has_driver "$NIC" e1000e || fail "final unbind: $NIC on $(drv "$NIC")"
exit 0
