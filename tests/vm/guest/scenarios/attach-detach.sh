# attach-detach: attach binds if needed; while attached, a second instance,
# unbind and delete are refused (in_use) and the kernel keeps the e1000e on
# vfio-pci; the same attach again is a no-op; detach --keep-bound leaves it on
# vfio-pci, detach gives it back to e1000e (netdev back); the event stream
# shows attach, bind, detach, unbind, driver_bound and driver_unbound with
# the device's id.
. /vm/lib.sh
vfiod_start
NIC=$(dev_under "$PORT_nic0")
G=$(grp "$NIC")
has_driver "$NIC" e1000e || fail "precondition: $NIC is on $(drv "$NIC")"
vc_ok register "$NIC" --name nic0

# attach binds if needed; while attached, unbind and delete are refused (in_use)
# and the kernel keeps the device on vfio-pci; detach restores e1000e.
events_start
vc_ok attach nic0 vm-1
has_driver "$NIC" vfio-pci || fail "attach: kernel has $NIC on $(drv "$NIC")"
vfio_node "$NIC" || fail "attach: /dev/vfio/$G missing"
jload
[ "$J_attached_to" = vm-1 ] || fail "attach: attached_to=$J_attached_to"
vc_ok attach nic0 vm-1
vc_err in_use attach nic0 vm-2
vc_err in_use unbind nic0
vc_err in_use delete nic0
has_driver "$NIC" vfio-pci || fail "a refused unbind/delete moved $NIC to $(drv "$NIC")"
vc_ok detach nic0 --keep-bound
has_driver "$NIC" vfio-pci || fail "detach --keep-bound: kernel has $NIC on $(drv "$NIC")"
vc_ok attach nic0 vm-2
vc_ok detach nic0
has_driver "$NIC" e1000e || fail "detach: kernel has $NIC on $(drv "$NIC")"
wait_until 5 has_netdev "$NIC" || fail "detach: no netdev"
jload
[ "$J_attached_to" = null ] || fail "detach: attached_to=$J_attached_to"
# The event stream saw all of it, with the device id.
vc_ok show nic0
ID=$(jget .id)
for t in attach bind detach unbind driver_bound driver_unbound; do
    wait_until 5 has_event $t "$NIC" || fail "no '$t' event for $NIC; events: $(cat $EVENTS)"
done
jq -e -s --arg id "$ID" --arg a "$NIC" 'map(select(.pci_address == $a and (.type == "attach" or .type == "bind"))) | all(.device_id == $id)' $EVENTS >/dev/null ||
    fail "attach/bind events without device_id $ID: $(cat $EVENTS)"
say "events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
kill $EVENTS_PID
exit 0
