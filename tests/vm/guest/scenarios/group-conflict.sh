# group-conflict: IOMMU group viability with two functions behind one PCIe-to-PCI bridge
# (ich9-intel-hda on snd_hda_intel, e1000 on e1000; the bridge is in the group
# too). bind without --with-group fails with iommu_group_conflict naming the
# other function, and changes nothing; with --with-group both move to
# vfio-pci; unbind brings both back.
. /vm/lib.sh
vfiod_start

BR=$(dev_under "$PORT_br0")
set -- $(devs_under "$BR")
A=$1 B=$2
G=$(grp "$A")
[ "$(grp "$B")" = "$G" ] || fail "precondition: $A and $B are not in one group"
DA=$(drv "$A") DB=$(drv "$B")
[ "$DA" != none ] && [ "$DB" != none ] || fail "precondition: both functions need a driver ($A: $DA, $B: $DB)"
say "group $G: $(group_members "$G" | tr '\n' ' '); $A on $DA, $B on $DB"

vc_ok register "$A" --name fa
vc_err iommu_group_conflict bind fa
say "conflict error: $ERR"
echo "$ERR" | grep -q "$B" || fail "the iommu_group_conflict error does not name $B: $ERR"
echo "$ERR" | grep -q "$BR" && fail "the error names the bridge $BR, which has no driver and must be ignored: $ERR"
has_driver "$A" "$DA" || fail "failed bind moved $A to $(drv "$A")"
has_driver "$B" "$DB" || fail "failed bind moved $B to $(drv "$B")"
[ -e "/dev/vfio/$G" ] && fail "/dev/vfio/$G exists after a refused bind"
vc_ok show fa
[ "$(jget .bound_to_vfio)" = false ] || fail "fa bound_to_vfio after a refused bind"

# dry run with the group: a plan, no change
vc_ok bind fa --with-group --dry-run
say "dry-run plan: $OUT"
echo "$OUT" | grep -q "$B" || say "note: the dry-run plan does not mention $B"
has_driver "$A" "$DA" && has_driver "$B" "$DB" || fail "dry run moved a driver"

vc_ok bind fa --with-group
has_driver "$A" vfio-pci || fail "with-group bind: $A is on $(drv "$A")"
has_driver "$B" vfio-pci || fail "with-group bind: the companion $B is on $(drv "$B")"
[ -c "/dev/vfio/$G" ] || fail "with-group bind: /dev/vfio/$G missing"
has_driver "$BR" none || fail "the bridge $BR got driver $(drv "$BR")"

vc_ok unbind fa
has_driver "$A" "$DA" || fail "unbind: $A is on $(drv "$A"), expected $DA"
has_driver "$B" "$DB" || fail "unbind: the companion $B is on $(drv "$B"), expected $DB"
for x in $A $B; do
    ov=$(cat /sys/bus/pci/devices/$x/driver_override)
    [ "$ov" = "(null)" ] || [ -z "$ov" ] || fail "driver_override of $x left as '$ov'"
done

# Registering the second function too, then binding it alone, is also a conflict.
vc_ok register "$B" --name fb
vc_err iommu_group_conflict bind fb
echo "$ERR" | grep -q "$A" || fail "conflict for fb does not name $A: $ERR"
exit 0
