# raw: sanity of the machinery, no vfiod. Checks the IOMMU and the topology,
# then moves the e1000e to vfio-pci and back with plain sysfs writes from the
# shell, several rounds, and records the kernel-only latency (the baseline the
# API numbers are compared with).
. /vm/lib.sh

[ -d /sys/kernel/iommu_groups/0 ] || fail "no IOMMU groups: is intel_iommu=on and the intel-iommu device there?"
[ -e /sys/bus/pci/drivers/vfio-pci ] || fail "vfio-pci driver is not registered"
[ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio missing"

NIC=$(dev_under "$PORT_nic0") || fail "no device below the e1000e's root port $PORT_nic0"
say "e1000e at $NIC, group $(grp "$NIC"), driver $(drv "$NIC"), netdev $(netdev_of "$NIC")"
[ "$(attr "$NIC" vendor):$(attr "$NIC" device)" = "0x8086:0x10d3" ] || fail "$NIC is not an e1000e"
has_driver "$NIC" e1000e || fail "$NIC is on $(drv "$NIC"), expected e1000e"
has_netdev "$NIC" || fail "$NIC has no netdev"

# Two functions behind the PCIe-to-PCI bridge share one IOMMU group.
BR=$(dev_under "$PORT_br0") || fail "no bridge below $PORT_br0"
set -- $(devs_under "$BR")
[ $# -eq 2 ] || fail "expected 2 functions behind the bridge $BR, found: $*"
[ "$(grp "$1")" = "$(grp "$2")" ] || fail "$1 (group $(grp "$1")) and $2 (group $(grp "$2")) are not in one IOMMU group"
say "bridge $BR: $1 ($(drv "$1")) and $2 ($(drv "$2")) share group $(grp "$1"): $(group_members "$(grp "$1")" | tr '\n' ' ')"
# And the hotplug ports are empty.
for p in "$PORT_hp0" "$PORT_hp1"; do
    [ -z "$(devs_under "$p")" ] || fail "hotplug port $p is not empty"
done

i=0
while [ $i -lt "$VM_ROUNDS" ]; do
    i=$((i + 1))
    mark b0.$i
    sysfs_to_vfio "$NIC"
    mark b1.$i
    has_driver "$NIC" vfio-pci || fail "round $i: driver is $(drv "$NIC") after the move to vfio-pci"
    vfio_node "$NIC" || fail "round $i: /dev/vfio/$(grp "$NIC") missing"
    has_netdev "$NIC" && fail "round $i: netdev still there while on vfio-pci"
    mark u0.$i
    sysfs_from_vfio "$NIC"
    mark u1.$i
    has_driver "$NIC" e1000e || fail "round $i: driver is $(drv "$NIC") after restoring"
    wait_until 5 has_netdev "$NIC" || fail "round $i: netdev did not come back"
done
binds=$(round_ms b) unbinds=$(round_ms u)
say "bind ms:$binds"
say "unbind ms:$unbinds"
mark n0; mark n1
metric raw_bind_ms "$(echo $binds | median)" ms "median of $VM_ROUNDS, e1000e -> vfio-pci, shell sysfs writes (printk-stamped)"
metric raw_unbind_ms "$(echo $unbinds | median)" ms "median of $VM_ROUNDS, vfio-pci -> e1000e, shell sysfs writes (printk-stamped)"
metric mark_overhead_ms "$(mark_ms n0 n1)" ms "two back-to-back marks (timing resolution)"
exit 0
