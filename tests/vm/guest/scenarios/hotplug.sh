# hotplug: PCI hotplug through QMP device_add/device_del on empty root ports.
#  1. a display device (bochs-display) is hot-added: `available` lists it and
#     `vfioctl events` shows hotplug_add; hot-removed: gone from `available`,
#     hotplug_remove. The kernel uevent -> vfiod event latency is measured.
#  2. PENDING until vfiod restores bindings on re-plug: a registered e1000e,
#     bound to vfio-pci by vfiod, is removed (stays registered, present=false)
#     and re-added at the same address: it must come back on vfio-pci by itself.
. /vm/lib.sh
vfiod_start
uevmon_start
events_start

in_available() { vc available && echo "$OUT" | jq -e --arg a "$1" 'any(.[]; .pci_address == $a)' >/dev/null; }
not_in_available() { vc available && ! echo "$OUT" | jq -e --arg a "$1" 'any(.[]; .pci_address == $a)' >/dev/null; }

# ---- 1. hot-add / hot-remove a display device --------------------------------
device_add hpg1 "$QPORT_hp0" bochs-display >/dev/null || fail "QMP device_add bochs-display failed"
wait_until 15 dev_under "$PORT_hp0" || fail "hot-added bochs-display did not appear below $PORT_hp0"
GPU=$(dev_under "$PORT_hp0")
# (with qboot the kernel finds no room for its 16 MiB BAR and bochs-drm's probe fails)
wait_until 10 eval 'has_driver "$GPU" bochs-drm || dmesg | grep -q "probe of $GPU failed"'
has_driver "$GPU" bochs-drm || say "note: hot-added $GPU has driver $(drv "$GPU")"
say "hot-added $GPU (group $(grp "$GPU"), driver $(drv "$GPU"))"
wait_until 10 in_available "$GPU" || fail "available does not list the hot-added $GPU: $OUT"
wait_until 10 has_event hotplug_add "$GPU" || fail "no hotplug_add event for $GPU; events: $(cat $EVENTS)"
e=$(jq -c -s --arg a "$GPU" 'map(select(.type == "hotplug_add" and .pci_address == $a)) | last' $EVENTS)
say "event: $e"
echo "$e" | jq -e '.at | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9:]+)$")' >/dev/null || fail "event 'at' is not RFC 3339: $e"
if has_driver "$GPU" bochs-drm && wait_until 5 has_event driver_bound "$GPU"; then
    BIND_LAT=$(uevent_latency_ms bind driver_bound "$GPU")
else
    say "note: no driver_bound event for $GPU (driver: $(drv "$GPU"))"
    BIND_LAT=n/a
fi
ADD_LAT=$(uevent_latency_ms add hotplug_add "$GPU")

device_del hpg1 >/dev/null || fail "QMP device_del failed"
wait_until 15 absent "$GPU" || fail "$GPU still present after device_del"
wait_until 10 not_in_available "$GPU" || fail "available still lists the removed $GPU: $OUT"
wait_until 10 has_event hotplug_remove "$GPU" || fail "no hotplug_remove event for $GPU; events: $(cat $EVENTS)"
REM_LAT=$(uevent_latency_ms remove hotplug_remove "$GPU")
say "kernel uevent -> vfiod event: add $ADD_LAT ms, bind $BIND_LAT ms, remove $REM_LAT ms"
metric uevent_add_to_event_ms "$ADD_LAT" ms "kernel add uevent (netlink listener) -> vfiod hotplug_add 'at', $(vc health && jget .hotplug)"
metric uevent_bind_to_event_ms "$BIND_LAT" ms "kernel bind uevent -> vfiod driver_bound 'at'"
metric uevent_remove_to_event_ms "$REM_LAT" ms "kernel remove uevent -> vfiod hotplug_remove 'at'"

# ---- 2. a vfio-bound registered device is unplugged and plugged back ---------------
device_add hpn1 "$QPORT_hp1" e1000e >/dev/null || fail "QMP device_add e1000e failed"
wait_until 15 dev_under "$PORT_hp1" || fail "hot-added e1000e did not appear below $PORT_hp1"
NIC=$(dev_under "$PORT_hp1")
wait_until 10 has_driver "$NIC" e1000e || fail "hot-added $NIC is on $(drv "$NIC"), expected e1000e"
wait_until 10 has_event hotplug_add "$NIC" || fail "no hotplug_add event for $NIC"
vc_ok register "$NIC" --name hpnic
vc_ok bind hpnic
has_driver "$NIC" vfio-pci || fail "bind hpnic: kernel has $NIC on $(drv "$NIC")"
vfio_node "$NIC" || fail "bind hpnic: /dev/vfio/$(grp "$NIC") missing"

device_del hpn1 >/dev/null || fail "QMP device_del hpn1 failed"
wait_until 15 absent "$NIC" || fail "$NIC still present after device_del"
wait_until 10 has_event hotplug_remove "$NIC" || fail "no hotplug_remove event for the registered $NIC"
vc_ok show hpnic
say "after unplug: $(echo "$OUT" | jq -c '{present, bound_to_vfio, current_driver, original_driver}')"
[ "$(jget .present)" = false ] || fail "hpnic present=$(jget .present) after unplug"

device_add hpn2 "$QPORT_hp1" e1000e >/dev/null || fail "QMP device_add (re-plug) failed"
wait_until 15 present "$NIC" || fail "the re-plugged e1000e did not come back at $NIC (below $PORT_hp1: $(devs_under "$PORT_hp1"))"
wait_until 10 eval '[ "$(count_events hotplug_add "$NIC")" -ge 2 ]' ||
    fail "no second hotplug_add event for $NIC"
if ! wait_until 15 has_driver "$NIC" vfio-pci; then
    kill -0 "$VFIOD_PID" 2>/dev/null || fail "vfiod died after the re-plug"
    vc show hpnic
    pending "re-plugged $NIC stayed on $(drv "$NIC"); vfiod did not restore vfio-pci (show: $(echo "$OUT" | jq -c '{present, bound_to_vfio, current_driver}'))"
fi
usleep 1000000
has_driver "$NIC" vfio-pci || fail "re-plugged $NIC went to vfio-pci, then to $(drv "$NIC")"
vfio_node "$NIC" || fail "re-plugged $NIC on vfio-pci but /dev/vfio/$(grp "$NIC") missing"
vc_ok show hpnic
[ "$(jget .present)" = true ] || fail "hpnic present=$(jget .present) after re-plug"
[ "$(jget .bound_to_vfio)" = true ] || fail "hpnic bound_to_vfio=$(jget .bound_to_vfio) after re-plug"
# and it can still be given back to its native driver
vc_ok unbind hpnic
has_driver "$NIC" e1000e || fail "unbind after re-plug: $NIC on $(drv "$NIC")"

# ---- 3. a different device plugged in at a registered, vfio-bound address -------------
# vfiod must check identity (vendor/device/subsystem) and leave it alone.
vc_ok bind hpnic
device_del hpn2 >/dev/null || fail "QMP device_del hpn2 failed"
wait_until 15 absent "$NIC" || fail "$NIC still present after device_del hpn2"
device_add hpx "$QPORT_hp1" e1000 >/dev/null || fail "QMP device_add e1000 failed"
wait_until 15 present "$NIC" || fail "the e1000 did not appear at $NIC"
say "plugged an e1000 ($(attr "$NIC" vendor):$(attr "$NIC" device)) where hpnic (8086:10d3) was"
wait_until 10 has_driver "$NIC" e1000 || say "note: the e1000 at $NIC is on $(drv "$NIC")"
usleep 2000000
has_driver "$NIC" vfio-pci && fail "vfiod moved a different device (e1000) at hpnic's address to vfio-pci"
has_driver "$NIC" e1000 || fail "the e1000 at $NIC ended on $(drv "$NIC")"
vc_ok show hpnic
say "hpnic with a stranger at its address: $(echo "$OUT" | jq -c '{present, bound_to_vfio, current_driver, identity_mismatch}')"
has_event identity_mismatch "$NIC" || say "note: no identity_mismatch event for $NIC; events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
if vc bind hpnic; then fail "bind hpnic succeeded with a different device (e1000) at its address: $OUT"; fi
say "bind hpnic with a stranger at its address: rc=$RC $ERR"
has_driver "$NIC" e1000 || fail "after a bind attempt, the stranger at $NIC is on $(drv "$NIC")"
device_del hpx >/dev/null
exit 0
