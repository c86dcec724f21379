# holder-vfio-fd: holders found before any write (issue 9). A process holds the VFIO
# device descriptor of the e1000e on vfio-pci (container + group + device fd,
# as a VM does). vfiod must refuse the unbind with 409 device_busy within 1 s,
# naming that process (pid, comm), write nothing (no uevent, the device stays
# on vfio-pci with /dev/vfio/N), list the same holder on GET holders, refuse
# the give-back of DELETE the same way, and once the process has exited the
# same unbind must succeed.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0")
vfiod_start
vc_ok register "$NIC" --name nic0
need_holders_api nic0
holders_of nic0
[ "$(echo "$OUT" | jq -c '[.. | objects | select(has("kind"))] | length')" = 0 ] || fail "holders of an idle e1000e: $OUT"
vc_ok bind nic0
has_driver "$NIC" vfio-pci || fail "bind nic0: kernel has $(drv "$NIC")"
G=$(grp "$NIC")

holder_start vfiohold "$G" "$NIC"
uevmon_start

i=0
while [ $i -lt "$VM_ROUNDS" ]; do
    i=$((i + 1))
    mark r0.$i
    vc unbind nic0
    rc=$?
    mark r1.$i
    [ $rc != 0 ] || fail "round $i: unbind succeeded although pid $HOLD holds the VFIO device fd (kernel: $(drv "$NIC"))"
    busy_names_pid "$HOLD" vmtool || fail "round $i: unbind refused, but not as 409 device_busy naming pid $HOLD (vmtool): $ERR"
done
ms=$(round_ms r)
say "refusal ms:$ms; body: $ERR"
awk -v m="$(echo $ms | tr ' ' '\n' | sort -n | tail -1)" 'BEGIN{exit !(m < 1000)}' || fail "a refusal took over 1 s:$ms"
metric holders_refusal_ms "$(echo $ms | median)" ms "median of $VM_ROUNDS, vfioctl unbind -> 409 device_busy (VFIO device fd held)"
has_driver "$NIC" vfio-pci || fail "after the refusals $NIC is on $(drv "$NIC")"
vfio_node "$NIC" || fail "after the refusals /dev/vfio/$G is gone"
[ -z "$(uevents_of "$NIC")" ] || fail "the refused unbind wrote to the kernel: uevents $(uevents_of "$NIC" | tr '\n' ';')"
[ "$(override_of "$NIC")" = vfio-pci ] || say "note: driver_override is '$(override_of "$NIC")' while bound"
vc_ok show nic0
jload
[ "$J_bound_to_vfio" = true ] && [ "$J_current_driver" = vfio-pci ] || fail "after the refusal vfiod says bound_to_vfio=$J_bound_to_vfio current_driver=$J_current_driver"

# The same holder through GET holders.
mark h0; holders_of nic0; mark h1
echo "$OUT" | jq -e --argjson p "$HOLD" '[.. | objects | select(.kind == "process" and .pid == $p and .comm == "vmtool")] | length > 0' >/dev/null ||
    fail "holders nic0 does not list pid $HOLD (vmtool): $OUT"
echo "$OUT" | jq -e --argjson p "$HOLD" '[.. | objects | select(.kind == "process" and .pid == $p) | .uid] | all(. == 0)' >/dev/null ||
    fail "holders nic0: the holder's uid is not 0: $OUT"
say "holders nic0 ($(mark_ms h0 h1) ms): $(echo "$OUT" | jq -c .)"
metric holders_get_ms "$(mark_ms h0 h1)" ms "GET holders (one holding process)"

# DELETE gives the device back to e1000e: refused too, and it stays registered.
vc delete nic0 && fail "delete succeeded although pid $HOLD holds the device (kernel: $(drv "$NIC"))"
busy_names_pid "$HOLD" vmtool || fail "delete refused, but not as 409 device_busy naming pid $HOLD: $ERR"
vc_ok show nic0
has_driver "$NIC" vfio-pci || fail "after the refused delete $NIC is on $(drv "$NIC")"
[ -z "$(uevents_of "$NIC")" ] || fail "the refused delete wrote to the kernel: uevents $(uevents_of "$NIC" | tr '\n' ';')"

# Once the holder is gone, the same unbind works.
kill "$HOLD"; wait "$HOLD" 2>/dev/null
holders_of nic0
[ "$(echo "$OUT" | jq -c '[.. | objects | select(.kind == "process")] | length')" = 0 ] || fail "holders after the holder exited: $OUT"
mark u0; vc_ok unbind nic0; mark u1
has_driver "$NIC" e1000e || fail "unbind after the holder exited: kernel has $(drv "$NIC")"
wait_until 5 has_netdev "$NIC" || fail "no netdev after the unbind"
say "unbind after the holder exited: $(mark_ms u0 u1) ms"
exit 0
