# vmm-handover: hand the device to an unprivileged VMM (issue 10). The host's QEMU runs
# as uid 1000 (op) with the e1000e as vfio-pci,host=ADDR, stopped (-S): its
# query-pci over QMP showing the device's ids proves it opened the group,
# set up the container and mapped its RAM for DMA.
#   - not attached: it fails with a permission error (/dev/vfio/N 0600 root);
#   - after `attach --uid 1000` it starts (attached_uid 1000 in the record, an
#     ACL entry for uid 1000 on the node), while uid 1001 (guest) still gets
#     a permission error on the node;
#   - detach revokes: uid 1000 refused again, the node exactly as before;
#   - attached with --pid: killing that QEMU ends the attachment within 1 s
#     (attached_to cleared, an attachment_ended event, the grant revoked), the
#     device stays on vfio-pci and the node is closed to uid 1000 again.
. /vm/lib.sh
vmm_available || fail "no VMM in the guest (/opt/vmm; VFIOD_VM_NO_VMM set?)"
NIC=$(dev_under "$PORT_nic0")
VID=$(attr "$NIC" vendor) DID=$(attr "$NIC" device)
vfiod_start
vc_ok register "$NIC" --name nic0
need_attach_grants nic0
vc_ok bind nic0
has_driver "$NIC" vfio-pci || fail "bind nic0: kernel has $(drv "$NIC")"
G=$(grp "$NIC")
NODE=/dev/vfio/$G
acl_of() { getfacl -p -n "$NODE" 2>/dev/null | grep -v '^#' | grep . | tr '\n' ' '; }
MODE0=$(stat -c '%a %u %g' $NODE) ACL0=$(acl_of)
say "node $NODE: $MODE0, acl: $ACL0"
uid1000_refused() { # the node is closed to uid 1000 (and says why)
    vmtool runas 1000 1000 - vmtool hold $NODE >/tmp/vm.p.o 2>&1
    [ $? = 13 ]
}

# Not attached: a permission error.
if vmm_start unattached 1000 "$NIC"; then
    vmm_stop
    fail "QEMU as uid 1000 started without an attachment ($NODE: $(stat -c %A $NODE))"
fi
echo "$VMM_ERR" | grep -qi 'permission denied' || fail "unattached QEMU failed, but not with a permission error: $VMM_ERR"
say "unattached: $VMM_ERR"

# Attached to uid 1000.
mark a0
attach_uid() { # INSTANCE UID [PID]
    vc_ok attach nic0 "$1" --uid "$2" ${3:+--pid "$3"}
}
attach_uid vm-p 1000
mark a1
jload
[ "$J_attached_uid" = 1000 ] && [ "$J_attached_to" = vm-p ] || fail "attach --uid 1000 answered attached_uid=$J_attached_uid attached_to=$J_attached_to"
acl_of | grep -q 'user:1000:rw' || fail "after attach --uid 1000 the node's ACL is: $(acl_of)"
say "attached in $(mark_ms a0 a1) ms; $NODE: $(stat -c %A $NODE), acl: $(acl_of)"
vmm_start attached 1000 "$NIC" || fail "QEMU as uid 1000 after attach --uid 1000: $VMM_ERR"
vmm_query_has "$VID" "$DID" || fail "QEMU as uid 1000: query-pci does not show $VID:$DID: $VMM_PCI"
metric attach_ms "$(mark_ms a0 a1)" ms "attach with uid 1000 (vfioctl; device already on vfio-pci)"
metric vmm_user_start_ms "$VMM_START_MS" ms "uid-1000 QEMU started -> query-pci answered"
say "uid-1000 QEMU pid $VMM_PID: $VMM_DEV; fds $(vmm_fds)"
vmtool runas 1001 1001 - vmtool hold $NODE >/tmp/vm.p.o 2>&1
rc=$?
[ $rc = 13 ] || fail "uid 1001 on $NODE while attached to uid 1000: rc=$rc $(cat /tmp/vm.p.o)"
vmm_stop

# Detach revokes, and leaves the node as it was.
vc_ok detach nic0 --keep-bound
has_driver "$NIC" vfio-pci || fail "detach --keep-bound: kernel has $(drv "$NIC")"
[ "$(stat -c '%a %u %g' $NODE)" = "$MODE0" ] && [ "$(acl_of)" = "$ACL0" ] ||
    fail "after detach the node is $(stat -c '%a %u %g' $NODE) acl $(acl_of); was $MODE0 acl $ACL0"
uid1000_refused || fail "after detach uid 1000 can still open $NODE: $(cat /tmp/vm.p.o)"
vc_ok show nic0
jload
[ "$J_attached_uid" = null ] && [ "$J_attached_to" = null ] || fail "after detach: attached_uid=$J_attached_uid attached_to=$J_attached_to"

# Attached with --pid: the attachment ends with the process.
events_start
VMM_GATE=1 vmm_spawn pid 1000 "$NIC"
mark p0
attach_uid vm-p2 1000 "$VMM_PID"
mark p1
jload
[ "$J_attached_pid" = "$VMM_PID" ] || fail "attach --pid $VMM_PID answered attached_pid=$J_attached_pid"
vmm_open_gate
node_open() { ls -l /proc/$VMM_PID/fd 2>/dev/null | grep -q " $NODE\$"; }
wait_until 60 eval 'node_open || ! kill -0 $VMM_PID 2>/dev/null'
mark p2
node_open || say "QEMU (pid $VMM_PID) never had $NODE open"
vmm_wait || fail "QEMU (pid $VMM_PID) as uid 1000 after attach --pid: $VMM_ERR"
metric attach_pid_ms "$(mark_ms p0 p1)" ms "attach with uid 1000 and pid (device already on vfio-pci)"
metric vmm_exec_to_node_open_ms "$(mark_ms vmm0 p2)" ms "the attached process execs QEMU -> QEMU has $NODE open (polled every 20 ms)"
vmm_query_has "$VID" "$DID" || fail "QEMU pid $VMM_PID: query-pci does not show $VID:$DID"
mark k0
kill -9 "$VMM_PID"
revoked() { ! acl_of | grep -q 'user:1000'; }
wait_until 5 revoked || fail "the grant was not revoked within 5 s of the VMM's exit: $(acl_of)"
mark k1
wait "$VMM_PID" 2>/dev/null
exec 3>&-
VMM_PID=
ended() { vc show nic0 && jload && [ "$J_attached_to" = null ] && [ "$J_attached_pid" = null ]; }
wait_until 5 ended || fail "after the VMM's exit: attached_to=$J_attached_to attached_pid=$J_attached_pid"
mark k2
say "VMM killed: grant revoked after $(mark_ms k0 k1) ms, record cleared after $(mark_ms k0 k2) ms"
metric vmm_exit_to_revoke_ms "$(mark_ms k0 k1)" ms "kill -9 of the attached VMM -> uid 1000's ACL entry gone (getfacl polled, ~20 ms + getfacl)"
awk -v m="$(mark_ms k0 k1)" 'BEGIN{exit !(m < 1000)}' || fail "the revoke took $(mark_ms k0 k1) ms (> 1 s)"
wait_until 5 has_event attachment_ended "$NIC" || fail "no attachment_ended event; events: $(jq -r -s 'map(.type) | join(" ")' $EVENTS)"
has_driver "$NIC" vfio-pci || fail "after the VMM's exit $NIC is on $(drv "$NIC") (should stay on vfio-pci)"
uid1000_refused || fail "after the VMM's exit uid 1000 can still open $NODE: $(cat /tmp/vm.p.o)"
[ "$(stat -c '%a %u %g' $NODE)" = "$MODE0" ] && [ "$(acl_of)" = "$ACL0" ] ||
    fail "after the VMM's exit the node is $(stat -c '%a %u %g' $NODE) acl $(acl_of); was $MODE0 acl $ACL0"
vc_ok unbind nic0
has_driver "$NIC" e1000e || fail "final unbind: kernel has $(drv "$NIC")"
exit 0
