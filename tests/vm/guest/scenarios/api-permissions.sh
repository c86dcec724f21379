# api-permissions: who may call. vfiod runs with --group vfiod; user "op" (uid 1000, in
# group vfiod) may mutate; user "guest" (uid 1001, not in the group) can read
# (list, available, show, health) but gets 403 forbidden on every mutation,
# and the kernel state does not change. Users run vfioctl through busybox su.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0")
vfiod_start --group vfiod
say "socket: $(ls -l $SOCK)"

# as USER ARGS...: vfioctl as USER; same $OUT/$ERR/$RC as vc.
as() {
    local u=$1; shift
    OUT=$(su -s /bin/sh "$u" -c "vfioctl --socket $SOCK --json $*" 2>/tmp/vm.as.err)
    RC=$?
    ERR=$(cat /tmp/vm.as.err)
    return $RC
}
as_ok() { local u=$1; shift; as "$u" "$@" || fail "as $u: vfioctl $* failed (rc=$RC): $ERR"; }
as_forbidden() {
    local u=$1; shift
    if as "$u" "$@"; then fail "as $u: vfioctl $* succeeded, expected 403 forbidden: $OUT"; fi
    [ "$(echo "$ERR" | jq -r .code 2>/dev/null)" = forbidden ] || fail "as $u: vfioctl $* failed with '$ERR', expected code forbidden"
}
[ "$(su -s /bin/sh op -c 'id -G')" = "1000 990" ] || fail "precondition: op's groups are $(su -s /bin/sh op -c 'id -G')"
[ "$(su -s /bin/sh guest -c 'id -G')" = "1001" ] || fail "precondition: guest's groups are $(su -s /bin/sh guest -c 'id -G')"

# The operator (group vfiod) registers and binds.
as_ok op register "$NIC" --name nic0
as_ok op bind nic0
has_driver "$NIC" vfio-pci || fail "bind by op returned, kernel has $NIC on $(drv "$NIC")"
vfio_node "$NIC" || fail "bind by op: /dev/vfio/$(grp "$NIC") missing"

# A user outside the group reads...
as_ok guest list
[ "$(echo "$OUT" | jq length)" = 1 ] || fail "guest's list: $OUT"
as_ok guest show nic0
as_ok guest available
as_ok guest health
# ...and may not change anything.
as_forbidden guest unbind nic0
has_driver "$NIC" vfio-pci || fail "a forbidden unbind moved $NIC to $(drv "$NIC")"
as_forbidden guest update nic0 --name stolen
as_forbidden guest delete nic0
as_forbidden guest register "$(dev_under "$PORT_edu0")"
as_forbidden guest attach nic0 vm-1
as_ok guest show nic0
[ "$(jget .attached_to)" = null ] || fail "a forbidden attach changed attached_to to $(jget .attached_to)"

# The operator again: attach, detach (restores the driver), delete.
as_ok op attach nic0 vm-1
[ "$(jget .attached_to)" = vm-1 ] || fail "attach by op: attached_to=$(jget .attached_to)"
as_forbidden guest detach nic0
as_ok op detach nic0
has_driver "$NIC" e1000e || fail "detach by op: kernel has $NIC on $(drv "$NIC")"
as_ok op delete nic0
# root may do everything
vc_ok register "$NIC" --name nic0
vc_ok delete nic0
# vfiod itself run by a non-root user (no flags): paths under
# $XDG_RUNTIME_DIR/$XDG_STATE_HOME, reads work, binds are refused clearly.
mkdir -p /tmp/oprun /tmp/opstate && chown op:op /tmp/oprun /tmp/opstate && chmod 700 /tmp/oprun
su -s /bin/sh op -c 'XDG_RUNTIME_DIR=/tmp/oprun XDG_STATE_HOME=/tmp/opstate exec vfiod' >/dev/null 2>/tmp/vm.opd.log &
OPD=$!
wait_until 30 eval 'ls /tmp/oprun/vfiod/*.sock >/dev/null 2>&1' || fail "non-root vfiod did not create its socket under XDG_RUNTIME_DIR: $(cat /tmp/vm.opd.log)"
OPSOCK=$(ls /tmp/oprun/vfiod/*.sock | head -1)
opvc() { OUT=$(su -s /bin/sh op -c "vfioctl --socket $OPSOCK --json $*" 2>/tmp/vm.as.err); RC=$?; ERR=$(cat /tmp/vm.as.err); return $RC; }
opvc health || fail "non-root vfiod: health failed: $ERR"
opvc available || fail "non-root vfiod: available failed: $ERR"
opvc register "$NIC" --name nic0 || fail "non-root vfiod: register failed: $ERR"
if opvc bind nic0; then fail "non-root vfiod: bind succeeded (kernel: $(drv "$NIC"))"; fi
say "non-root vfiod refuses bind: $ERR"
has_driver "$NIC" e1000e || fail "non-root vfiod moved $NIC to $(drv "$NIC")"
kill $OPD 2>/dev/null
# Every mutation is logged with the caller's uid.
grep -q '1000' $VFIOD_LOG || fail "vfiod's log does not mention uid 1000 for op's mutations"
exit 0
