# rawvmm: a real VMM uses a device on vfio-pci, no vfiod. The host's QEMU
# (/opt/vmm, put into the initramfs by run.sh) starts stopped (-S) with the
# e1000e as a vfio-pci device: realising it opens the group, sets up a type1
# container, maps guest RAM for DMA and reads config space, so its QMP
# query-pci showing the device's ids proves the device was usable. Then the
# same as uid 1000: refused while /dev/vfio/N is 0600 root, working after a
# POSIX ACL entry for uid 1000 (what vfiod's attach will grant), while uid
# 1001 is still refused; and removing the entries leaves the node as before.
. /vm/lib.sh
vmm_available || fail "no VMM in the guest (/opt/vmm; VFIOD_VM_NO_VMM set?)"
NIC=$(dev_under "$PORT_nic0") || fail "no e1000e"
VID=$(attr "$NIC" vendor) DID=$(attr "$NIC" device)
sysfs_to_vfio "$NIC"
has_driver "$NIC" vfio-pci || fail "$NIC on $(drv "$NIC")"
G=$(grp "$NIC")
NODE=/dev/vfio/$G
say "$NIC ($VID:$DID) on vfio-pci, group $G: $(ls -l $NODE)"
MODE0=$(stat -c %A $NODE)

# As root.
vmm_start root root "$NIC" || fail "QEMU as root: $VMM_ERR"
vmm_query_has "$VID" "$DID" || fail "QEMU as root: query-pci does not show $VID:$DID: $VMM_PCI"
metric rawvmm_root_start_ms "$VMM_START_MS" ms "QEMU -S with vfio-pci,host=$NIC started -> query-pci answered (root)"
say "root QEMU pid $VMM_PID: query-pci $VMM_DEV; its VFIO fds: $(vmm_fds)"
vmm_stop

# As uid 1000 with the node 0600 root: a permission error.
if vmm_start op 1000 "$NIC"; then
    vmm_stop
    fail "QEMU as uid 1000 started although $NODE is $(stat -c %A $NODE)"
fi
echo "$VMM_ERR" | grep -qi 'permission denied' || fail "QEMU as uid 1000 failed, but not with a permission error: $VMM_ERR"
say "uid 1000, node $(stat -c %A $NODE): refused: $VMM_ERR"

# Grant uid 1000 an ACL entry: it can use the device, uid 1001 still cannot.
mark g0
setfacl -m u:1000:rw $NODE || fail "setfacl on $NODE failed"
mark g1
say "after setfacl: $(stat -c %A $NODE); $(getfacl -p $NODE 2>/dev/null | grep -v '^#' | tr '\n' ' ')"
vmm_start op 1000 "$NIC" || fail "QEMU as uid 1000 after setfacl u:1000:rw: $VMM_ERR"
vmm_query_has "$VID" "$DID" || fail "QEMU as uid 1000: query-pci does not show $VID:$DID: $VMM_PCI"
metric rawvmm_user_start_ms "$VMM_START_MS" ms "QEMU as uid 1000 (ACL entry on $NODE) started -> query-pci answered"
metric rawvmm_setfacl_ms "$(mark_ms g0 g1)" ms "setfacl -m u:1000:rw $NODE"
vmtool runas 1001 1001 - vmtool hold $NODE >/tmp/vm.o1001 2>&1
rc=$?
[ $rc = 13 ] || fail "uid 1001 opening $NODE while uid 1000 has an entry: rc=$rc $(cat /tmp/vm.o1001) (want a permission error)"
say "uid 1001 while uid 1000 is granted: $(cat /tmp/vm.o1001)"
vmtool hold $NODE >/tmp/vm.oroot 2>&1 &
p=$!
usleep 300000
kill $p 2>/dev/null
say "root opening $NODE while QEMU has it: $(cat /tmp/vm.oroot) (one opener per group)"
vmm_stop

# Without the raised memlock limit the DMA mapping of guest RAM fails.
if VMM_MEMLOCK_KB=default vmm_start op 1000 "$NIC"; then
    say "uid 1000 with the default memlock limit ($(ulimit -l) KiB) started too"
    vmm_stop
else
    say "uid 1000 with the default memlock limit ($(ulimit -l) KiB): $VMM_ERR"
fi

# Revoke: removing the entries (and the mask they added) restores the node.
setfacl -b $NODE || fail "setfacl -b $NODE failed"
[ "$(stat -c %A $NODE)" = "$MODE0" ] || fail "after setfacl -b the node is $(stat -c %A $NODE), was $MODE0"
if vmm_start op 1000 "$NIC"; then
    vmm_stop
    fail "QEMU as uid 1000 started after the ACL was removed"
fi
say "after setfacl -b: $(stat -c %A $NODE); uid 1000 refused again"
sysfs_from_vfio "$NIC"
has_driver "$NIC" e1000e || fail "$NIC did not return to e1000e: $(drv "$NIC")"
exit 0
