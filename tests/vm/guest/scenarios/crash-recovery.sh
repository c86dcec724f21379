# crash-recovery: crash safety. vfiod is killed with SIGKILL while a bind (then an
# unbind) of the e1000e is in flight, at several delays; after a restart the
# registry loads and the device ends fully on one driver, in agreement with
# what vfiod reports:
#   - on vfio-pci: /dev/vfio/N exists, bound_to_vfio=true, and a later unbind
#     returns it to e1000e (the original driver survived the crash); or
#   - on e1000e: the netdev exists, driver_override is clear, bound_to_vfio=false.
# Never without a driver, never with a stale driver_override.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0")
vfiod_start
vc_ok register "$NIC" --name nic0

override() { local o; o=$(cat "/sys/bus/pci/devices/$NIC/driver_override"); [ "$o" = "(null)" ] && o=; echo "$o"; }
settled() {
    vc show nic0 || return 1
    jload
    case $(drv "$NIC") in
        vfio-pci) vfio_node "$NIC" && [ "$J_bound_to_vfio" = true ] && [ "$J_current_driver" = vfio-pci ] ;;
        e1000e) has_netdev "$NIC" && [ -z "$(override)" ] && [ "$J_bound_to_vfio" = false ] && [ "$J_current_driver" = e1000e ] ;;
        *) return 1 ;;
    esac
}
# crash OP DELAY_MS: start OP, SIGKILL vfiod DELAY_MS later, restart, check.
crash() {
    local op=$1 delay=$2 k
    vfioctl --socket $SOCK --json "$op" nic0 >/tmp/vm.e.out 2>&1 &
    local cpid=$!
    [ "$delay" -gt 0 ] && usleep $((delay * 1000))
    kill -9 "$VFIOD_PID"
    wait "$VFIOD_PID" 2>/dev/null
    wait "$cpid" 2>/dev/null
    k="driver=$(drv "$NIC") override='$(override)'"
    VFIOD_PID=
    vfiod_start
    vc show nic0 || fail "$op killed after ${delay} ms: after restart nic0 is not in the registry: $ERR"
    if ! wait_until 10 settled; then
        fail "$op killed after ${delay} ms (kernel then: $k): not settled after restart: kernel driver=$(drv "$NIC") override='$(override)' netdev=$(netdev_of "$NIC") vfio_node=$(vfio_node "$NIC" && echo yes || echo no); vfiod: $(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, original_driver}')"
    fi
    say "$op killed after ${delay} ms: at kill $k; after restart $(drv "$NIC") ($(echo "$OUT" | jq -c '{bound_to_vfio, current_driver, original_driver}'))"
    RESULTS="$RESULTS $op@$delay:$(drv "$NIC")"
}

RESULTS=
for d in 0 20 50 100; do
    # from e1000e
    if has_driver "$NIC" vfio-pci; then vc_ok unbind nic0; fi
    has_driver "$NIC" e1000e || fail "could not get $NIC back to e1000e before round $d"
    crash bind $d
done
for d in 0 20 50 100; do
    # from vfio-pci
    if has_driver "$NIC" e1000e; then vc_ok bind nic0; fi
    has_driver "$NIC" vfio-pci || fail "could not get $NIC on vfio-pci before round $d"
    crash unbind $d
done
say "outcomes:$RESULTS"
# A graceful stop (SIGTERM) and a restart never unbind a bound device.
if has_driver "$NIC" e1000e; then vc_ok bind nic0; fi
vc_ok attach nic0 vm-1
vfiod_stop
has_driver "$NIC" vfio-pci || fail "SIGTERM of vfiod moved $NIC to $(drv "$NIC")"
vfiod_start
usleep 1000000
has_driver "$NIC" vfio-pci || fail "restarting vfiod moved $NIC to $(drv "$NIC")"
vc_ok show nic0
jload
[ "$J_attached_to" = vm-1 ] && [ "$J_bound_to_vfio" = true ] || fail "after restart: attached_to=$J_attached_to bound_to_vfio=$J_bound_to_vfio"
vc_ok detach nic0

# A corrupt state file stops startup with a clear message and is kept.
vfiod_stop
f=$(ls $STATE/* | head -1)
[ -n "$f" ] || fail "no state file in $STATE"
cp "$f" /tmp/vm.state.good
echo '{"version": 1, "devices": [' >"$f"
cp "$f" /tmp/vm.state.bad
: >/tmp/vm.corrupt.log
vfiod --socket $SOCK --state-dir $STATE >/dev/null 2>/tmp/vm.corrupt.log &
p=$!
if wait_until 20 eval '! kill -0 $p 2>/dev/null'; then
    wait $p; prc=$?
    say "vfiod on a corrupt state file exited $prc: $(tail -2 /tmp/vm.corrupt.log)"
    [ $prc != 0 ] || fail "vfiod exited 0 on a corrupt state file"
else
    kill -9 $p
    fail "vfiod started on a corrupt state file: $(tail -3 /tmp/vm.corrupt.log)"
fi
cmp -s "$f" /tmp/vm.state.bad || fail "vfiod changed the corrupt state file"
grep -qi "$(basename "$f")\|state\|corrupt\|parse" /tmp/vm.corrupt.log || fail "no clear message about the state file: $(cat /tmp/vm.corrupt.log)"
cp /tmp/vm.state.good "$f"
vfiod_start

# Whatever happened, the original driver is still known: end on e1000e.
if has_driver "$NIC" vfio-pci; then vc_ok unbind nic0; fi
has_driver "$NIC" e1000e || fail "final unbind: $NIC is on $(drv "$NIC")"
wait_until 5 has_netdev "$NIC" || fail "final unbind: no netdev"
vc_ok show nic0
[ "$(jget .original_driver)" = e1000e ] || fail "original_driver is $(jget .original_driver) after the crashes"
exit 0
