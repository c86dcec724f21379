# registry: `vfioctl available` and `list` agree with what the guest kernel reports:
# the PCI functions, their IDs, IOMMU groups and drivers. Also the registry
# basics (register/show/update/delete, error codes) on real devices.
. /vm/lib.sh
vfiod_start

hex4() { sed 's/^0x//' "/sys/bus/pci/devices/$1/$2"; }
json_driver() { local d; d=$(drv "$1"); [ "$d" = none ] && echo null || echo "$d"; }
# The documented rule for candidates: display (class 0x03) and processing
# accelerators (0x12), or any function of an accelerator vendor; never a bridge.
is_candidate() {
    local c v
    c=$(attr "$1" class); v=$(attr "$1" vendor)
    case $c in 0x0604*|0x0600*|0x0601*|0x0609*) return 1 ;; esac
    case $c in 0x03*|0x12*) return 0 ;; esac
    case $v in 0x10de|0x1002|0x1da3|0x1e52|0x1de0|0x10ee) return 0 ;; esac
    return 1
}

vc_ok health
say "health: $OUT"
[ "$(jget .vfio_pci_available)" = true ] || fail "health: vfio_pci_available is not true: $OUT"
[ "$(jget .iommu_enabled)" = true ] || fail "health: iommu_enabled is not true: $OUT"

# --- available ------------------------------------------------------------
vc_ok available
echo "$OUT" | jq -e 'type == "array"' >/dev/null || fail "available is not an array: $OUT"
got=$(echo "$OUT" | jq -r '.[].pci_address' | sort)
want=$(for d in /sys/bus/pci/devices/*; do a=$(basename "$d"); is_candidate "$a" && echo "$a"; done | sort)
[ -n "$want" ] || fail "the guest has no passthrough candidate (bochs-display missing?)"
[ "$got" = "$want" ] || fail "available lists [$(echo $got)], the kernel's candidates are [$(echo $want)]"
AVAIL=$OUT
for a in $want; do
    e=$(echo "$AVAIL" | jq -c ".[] | select(.pci_address == \"$a\")")
    jload "$e"
    [ "$J_vendor_id" = "$(hex4 "$a" vendor)" ] || fail "available $a: vendor_id $J_vendor_id != $(hex4 "$a" vendor)"
    [ "$J_device_id" = "$(hex4 "$a" device)" ] || fail "available $a: device_id mismatch: $e"
    [ "$J_iommu_group" = "$(grp "$a")" ] || fail "available $a: iommu_group $J_iommu_group != $(grp "$a")"
    [ "$J_current_driver" = "$(json_driver "$a")" ] || fail "available $a: current_driver $J_current_driver != $(drv "$a")"
    say "available $a ok: $e"
done

# --- register real devices and compare each record with sysfs ----------------
vc_ok list
[ "$OUT" = "[]" ] || fail "fresh registry is not []: $OUT"
NIC=$(dev_under "$PORT_nic0"); EDU=$(dev_under "$PORT_edu0"); GPU=$(dev_under "$PORT_gpu0"); RNG=$(dev_under "$PORT_rng0")
vc_ok register "$NIC" --name nic0 --tag role=net --tag rack=r1
vc_ok register "$EDU" --tag role=edu
vc_ok register "$GPU" --name gpu0 --tag role=gpu
vc_ok register "$(echo "$RNG" | tr a-f A-F)"    # upper case is accepted and normalised
[ "$(jget .pci_address)" = "$RNG" ] || fail "upper-case address not normalised: $(jget .pci_address)"
vc_ok list
[ "$(echo "$OUT" | jq length)" = 4 ] || fail "list has $(echo "$OUT" | jq length) devices, expected 4"
LIST=$OUT
for a in $NIC $EDU $GPU $RNG; do
    e=$(echo "$LIST" | jq -c ".[] | select(.pci_address == \"$a\")")
    [ -n "$e" ] || fail "$a missing from list"
    jload "$e"
    chk() { eval "got=\$J_$1"; [ "$got" = "$2" ] || fail "device $a: $1 is '$got', the kernel says '$2'"; }
    chk vendor_id "$(hex4 "$a" vendor)"
    chk device_id "$(hex4 "$a" device)"
    chk iommu_group "$(grp "$a")"
    chk current_driver "$(json_driver "$a")"
    chk bound_to_vfio false
    chk present true
    chk attached_to null
    echo "$J_id" | grep -qE '^[a-z0-9]{24}$' || fail "device $a: id '$J_id' is not a cuid2"
    echo "$J_created_at" | grep -qE '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9:]+)$' || fail "device $a: created_at '$J_created_at' is not RFC 3339"
    cls=$(sed 's/^0x//' "/sys/bus/pci/devices/$a/class")
    gotcls=$(echo "$J_class" | sed 's/^0x//' | tr A-F a-f)
    case $cls in "$gotcls"*) ;; *) fail "device $a: class $gotcls, the kernel says $cls" ;; esac
    case $cls in 0300*|0302*) chk type gpu ;; *) chk type pci ;; esac
    # vendor_name: as pci.ids has it (null if the vendor is not there)
    v=$(hex4 "$a" vendor)
    vn_want=$(grep "^$v  " /usr/share/misc/pci.ids | head -1 | sed "s/^$v  //")
    [ -n "$vn_want" ] || vn_want=null
    chk vendor_name "$vn_want"
    say "list $a ok: $J_name $J_type group=$J_iommu_group driver=$J_current_driver vendor=$J_vendor_name device=$J_device_name class=$J_class"
done
[ "$(echo "$LIST" | jq -r ".[] | select(.pci_address == \"$EDU\") | .name")" = "pci-$(echo "$EDU" | tr ':.' '--')" ] ||
    fail "default name of $EDU is not pci-$(echo "$EDU" | tr ':.' '--')"
[ "$(echo "$LIST" | jq -r ".[] | select(.pci_address == \"$NIC\") | .vendor_name")" = "Intel Corporation" ] ||
    fail "e1000e vendor_name is not 'Intel Corporation'"

# --- lookups, filters, update, delete ------------------------------------------
vc_ok show nic0
ID=$(jget .id)
vc_ok show "$ID"
[ "$(jget .name)" = nic0 ] || fail "show by id gives name $(jget .name)"
vc_ok list --tag role=net
[ "$(echo "$OUT" | jq -r '[.[].name] | join(",")')" = nic0 ] || fail "list --tag role=net: $OUT"
vc_ok list --tag role=net --tag rack=r2
[ "$OUT" = "[]" ] || fail "list with two tags must match all of them: $OUT"
vc_ok update nic0 --name nic-zero
vc_ok show nic-zero
vc_err not_found show nic0
vc_err conflict register "$NIC"
HDA=$(devs_under "$(dev_under "$PORT_br0")" | head -1)
vc_err conflict register "$HDA" --name gpu0
vc_err device_not_found register 0000:7f:1f.7
vc_err invalid_pci_address register 00:zz.0
vc_err invalid_name register "$HDA" --name '-bad/name'
vc_ok delete nic-zero
vc_err not_found show nic-zero
vc_ok list
[ "$(echo "$OUT" | jq length)" = 3 ] || fail "after delete, list has $(echo "$OUT" | jq length) devices"

# Nothing above may have moved a driver.
while read -r a want; do
    [ -e "/sys/bus/pci/devices/$a" ] || continue
    [ "$(drv "$a")" = "$want" ] || fail "$a moved from $want to $(drv "$a") during read/registry calls"
done </run/baseline

# --- the registry survives a restart ------------------------------------------------
vfiod_stop
vfiod_start
vc_ok list
[ "$(echo "$OUT" | jq length)" = 3 ] || fail "after restart, list has $(echo "$OUT" | jq length) devices: $OUT"
vc_ok show gpu0
[ "$(jget .current_driver)" = "$(json_driver "$GPU")" ] || fail "after restart gpu0 current_driver $(jget .current_driver)"
exit 0
