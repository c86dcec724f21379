# racing-requests: two requests on one device at the same time (bind+bind,
# unbind+bind, unbind+unbind, twice each) are serialised: whatever wins, the
# e1000e ends on vfio-pci (with /dev/vfio/N and bound_to_vfio) or on e1000e,
# never elsewhere, and vfiod's current_driver is the kernel's.
. /vm/lib.sh
vfiod_start
NIC=$(dev_under "$PORT_nic0")
G=$(grp "$NIC")
has_driver "$NIC" e1000e || fail "precondition: $NIC is on $(drv "$NIC")"
vc_ok register "$NIC" --name nic0

# Racing requests on one device are serialised: whatever wins, the kernel and
# vfiod agree afterwards.
race() { # OP1 OP2
    vfioctl --socket $SOCK --json "$1" nic0 >/tmp/vm.r1 2>&1 & local p1=$!
    vfioctl --socket $SOCK --json "$2" nic0 >/tmp/vm.r2 2>&1 & local p2=$!
    wait $p1; local r1=$?; wait $p2; local r2=$?
    vc_ok show nic0
    jload
    local k; k=$(drv "$NIC")
    [ "$J_current_driver" = "$k" ] || fail "race $1+$2: vfiod says $J_current_driver, the kernel $k ($r1: $(head -c 200 /tmp/vm.r1); $r2: $(head -c 200 /tmp/vm.r2))"
    case $k in
        vfio-pci) [ "$J_bound_to_vfio" = true ] && vfio_node "$NIC" || fail "race $1+$2: on vfio-pci but bound_to_vfio=$J_bound_to_vfio" ;;
        e1000e) [ "$J_bound_to_vfio" = false ] || fail "race $1+$2: on e1000e but bound_to_vfio=$J_bound_to_vfio" ;;
        *) fail "race $1+$2: $NIC left on $k" ;;
    esac
    RACES="$RACES $1+$2:$r1/$r2->$k"
}
RACES=
for r in 1 2; do race bind bind; race unbind bind; race unbind unbind; done
say "races (rc/rc -> driver):$RACES"
[ "$(drv "$NIC")" = e1000e ] || vc_ok unbind nic0
has_driver "$NIC" e1000e || fail "after the races $NIC is on $(drv "$NIC")"
exit 0
