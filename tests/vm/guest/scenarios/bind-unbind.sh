# bind-unbind: bind and unbind of the e1000e through the API, checked against
# the kernel: the driver link is vfio-pci and /dev/vfio/N exists after bind;
# after unbind the native driver is back, the netdev reappears and
# driver_override is clear; vfiod's record agrees each time. A dry run
# changes nothing. VM_ROUNDS rounds, timed (printk-stamped around each
# vfioctl call, and vfiod's own log), to compare with the raw writes.
. /vm/lib.sh
vfiod_start

NIC=$(dev_under "$PORT_nic0")
G=$(grp "$NIC")
has_driver "$NIC" e1000e || fail "precondition: $NIC is on $(drv "$NIC")"
vc_ok register "$NIC" --name nic0
[ "$(jget .original_driver)" = e1000e ] || say "note: original_driver right after register is $(jget .original_driver)"

# dry run: a plan, and no change in the kernel
vc_ok bind nic0 --dry-run
say "dry-run plan: $OUT"
has_driver "$NIC" e1000e || fail "bind --dry-run moved $NIC to $(drv "$NIC")"
has_netdev "$NIC" || fail "bind --dry-run removed the netdev"

i=0
while [ $i -lt "$VM_ROUNDS" ]; do
    i=$((i + 1))
    mark b0.$i
    vc bind nic0
    rc=$?
    mark b1.$i
    [ $rc = 0 ] || fail "round $i: bind failed: $ERR (kernel: driver $(drv "$NIC"))"
    has_driver "$NIC" vfio-pci || fail "round $i: bind returned, but the kernel has $NIC on $(drv "$NIC")"
    vfio_node "$NIC" || fail "round $i: bind returned, but /dev/vfio/$G does not exist"
    has_netdev "$NIC" && fail "round $i: netdev $(netdev_of "$NIC") still there while on vfio-pci"
    jload
    [ "$J_bound_to_vfio" = true ] || fail "round $i: bind answered bound_to_vfio=$J_bound_to_vfio: $OUT"
    vc_ok show nic0
    jload
    [ "$J_current_driver" = vfio-pci ] || fail "round $i: show says current_driver $J_current_driver"
    [ "$J_original_driver" = e1000e ] || fail "round $i: show says original_driver $J_original_driver"
    [ "$(cat /sys/bus/pci/devices/$NIC/driver_override)" = vfio-pci ] || say "note: driver_override is '$(cat /sys/bus/pci/devices/$NIC/driver_override)' while bound"

    mark u0.$i
    vc unbind nic0
    rc=$?
    mark u1.$i
    [ $rc = 0 ] || fail "round $i: unbind failed: $ERR (kernel: driver $(drv "$NIC"))"
    has_driver "$NIC" e1000e || fail "round $i: unbind returned, but the kernel has $NIC on $(drv "$NIC")"
    wait_until 5 has_netdev "$NIC" || fail "round $i: the netdev did not come back after unbind"
    ov=$(cat /sys/bus/pci/devices/$NIC/driver_override)
    [ "$ov" = "(null)" ] || [ -z "$ov" ] || fail "round $i: driver_override left as '$ov' after unbind"
    vc_ok show nic0
    jload
    [ "$J_bound_to_vfio" = false ] || fail "round $i: show says bound_to_vfio=$J_bound_to_vfio after unbind"
    [ "$J_current_driver" = e1000e ] || fail "round $i: show says current_driver $J_current_driver after unbind"
done
i=0
while [ $i -lt "$VM_ROUNDS" ]; do
    i=$((i + 1))
    mark h0.$i; vc health >/dev/null; mark h1.$i
done
binds=$(round_ms b) unbinds=$(round_ms u) healths=$(round_ms h)
say "API bind ms:$binds"
say "API unbind ms:$unbinds"
say "vfioctl health ms:$healths"
metric api_bind_ms "$(echo $binds | median)" ms "median of $VM_ROUNDS, e1000e -> vfio-pci, one vfioctl call"
metric api_unbind_ms "$(echo $unbinds | median)" ms "median of $VM_ROUNDS, vfio-pci -> e1000e, one vfioctl call"
metric vfioctl_health_ms "$(echo $healths | median)" ms "median of $VM_ROUNDS, vfioctl health (client start + one request)"
# The same moves timed inside vfiod (its own log: from the request's checks to
# the durable result, sysfs writes and verification included, no client
# process): the figure to compare with raw_bind_ms / raw_unbind_ms.
vbinds=$(sed -n "s/.* bound $NIC to [^ ]* for .* in \([0-9.]*\) ms.*/\1/p" $VFIOD_LOG | tr '\n' ' ')
vunbinds=$(sed -n "s/.* gave $NIC back to [^ ]* for .* in \([0-9.]*\) ms.*/\1/p" $VFIOD_LOG | tr '\n' ' ')
say "vfiod's own bind ms:$vbinds"
say "vfiod's own unbind ms:$vunbinds"
metric vfiod_bind_ms "$(echo $vbinds | median)" ms "median, e1000e -> vfio-pci, inside vfiod (checks, 2 registry saves, writes, verify)"
metric vfiod_unbind_ms "$(echo $vunbinds | median)" ms "median, vfio-pci -> e1000e, inside vfiod"
exit 0
