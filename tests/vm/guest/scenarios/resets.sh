# resets: resets on a real kernel (issue 11).
#
# - the igb (if the harness has an igb root port, PORT_igb0) on vfio-pci is
#   reset with FLR and verified: config space answers, the driver stays;
# - the e1000e (nic0, reset_method "pm bus") is reset with pm;
# - of the two functions behind the PCIe-to-PCI bridge (one group; the e1000
#   lists "bus", the HDA function nothing), a bus reset of the e1000 while the
#   other function is attached is refused with reset_scope_conflict naming
#   it, and nothing is written to reset;
# - that reset, once allowed, fails in the kernel (ENOTTY) three times: the
#   device is quarantined, attach is refused, and it stays quarantined across
#   a restart;
# - detach of the e1000e resets it (reset on release) while on vfio-pci.
# - vfiod's bus-reset scope, which it reads from the sysfs topology, is the
#   list the kernel gives through VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, for the
#   igb behind its root port and for the function behind the bridge.
# Reset durations per method are reported as metrics.
. /vm/lib.sh
need_vfiod

NIC=$(dev_under "$PORT_nic0")
BR=$(dev_under "$PORT_br0")
set -- $(devs_under "$BR")
F1=$1 F2=$2
# Which of the two behind the bridge has a bus reset (the e1000, per the
# measurement); the other has no reset method at all.
if [ -n "$(cat /sys/bus/pci/devices/$F1/reset_method 2>/dev/null)" ]; then
    BUSDEV=$F1 OTHER=$F2
else
    BUSDEV=$F2 OTHER=$F1
fi
say "nic0 $NIC: reset_method '$(attr "$NIC" reset_method)'; behind $BR: $BUSDEV '$(attr "$BUSDEV" reset_method 2>/dev/null)', $OTHER '$(attr "$OTHER" reset_method 2>/dev/null)'"
grep -qw pm "/sys/bus/pci/devices/$NIC/reset_method" || fail "precondition: $NIC has no pm reset"
grep -qw bus "/sys/bus/pci/devices/$BUSDEV/reset_method" || fail "precondition: $BUSDEV has no bus reset"

vendor_ok() { # ADDR: config space answers
    [ "$(od -An -tx1 -N2 "/sys/bus/pci/devices/$1/config" | tr -d ' \n')" != ffff ]
}
# reset_ms NAME: the duration vfiod measured for the last reset
reset_ms() { vc_ok show "$1"; jget .last_reset.duration_ms; }

# scope_matches_kernel NAME ADDR: the functions vfiod's dry run of a bus reset
# of ADDR names are those the kernel's VFIO hot-reset info names (ADDR on
# vfio-pci, its group viable and not open elsewhere).
scope_matches_kernel() {
    vc_ok reset "$1" --method bus --dry-run
    local ours kernel grp
    ours=$(echo "$OUT" | jq -r '[.plan.scope[].pci_address] | sort | join(" ")')
    grp=$(basename "$(readlink "/sys/bus/pci/devices/$2/iommu_group")")
    vmtool hotreset "$grp" "$2" >/tmp/vm.r.hotreset 2>&1 || fail "VFIO hot-reset info of $2: $(cat /tmp/vm.r.hotreset)"
    kernel=$(cut -d' ' -f1 /tmp/vm.r.hotreset | sort | tr '\n' ' ' | sed 's/ $//')
    [ -n "$kernel" ] && [ "$ours" = "$kernel" ] ||
        fail "bus reset scope of $2: vfiod says [$ours], the kernel's VFIO hot-reset info [$kernel]"
    say "bus reset scope of $2 is the kernel's VFIO hot-reset list: [$kernel]"
}

vfiod_start --op-timeout-ms 10000
events_start

# --- igb with FLR, on vfio-pci ------------------------------------------------
if [ -n "$PORT_igb0" ] && IGB=$(dev_under "$PORT_igb0") && [ -n "$IGB" ]; then
    grep -qw flr "/sys/bus/pci/devices/$IGB/reset_method" || fail "precondition: igb $IGB has no flr"
    vc_ok register "$IGB" --name igb0
    vc_ok bind igb0
    BEFORE=$(attr "$IGB" reset_method)
    vc_ok reset igb0 --method flr
    [ "$(jget .last_reset.result)" = ok ] || fail "igb flr: last_reset $(echo "$OUT" | jq -c .last_reset)"
    [ "$(jget .health)" = ok ] || fail "igb flr: health $(jget .health)"
    has_driver "$IGB" vfio-pci || fail "igb flr: now on $(drv "$IGB")"
    vendor_ok "$IGB" || fail "igb flr: config space reads all ones"
    [ "$(attr "$IGB" reset_method)" = "$BEFORE" ] || fail "igb: reset_method left as '$(attr "$IGB" reset_method)', was '$BEFORE'"
    say "igb power_state after flr: $(attr "$IGB" power_state)"
    metric reset_flr_igb_ms "$(reset_ms igb0)" ms "igb on vfio-pci"
    if grep -qw bus "/sys/bus/pci/devices/$IGB/reset_method"; then
        scope_matches_kernel igb0 "$IGB"
    else
        say "igb has no bus reset ($(attr "$IGB" reset_method)): scope not compared"
    fi
    vc_ok unbind igb0
else
    say "no igb root port in this harness (PORT_igb0 unset): FLR case skipped"
fi

# --- e1000e with pm, on its own driver ---------------------------------------
vc_ok register "$NIC" --name nic0
vc_ok reset nic0 --method pm
[ "$(jget .last_reset.method)" = pm ] || fail "nic0: last_reset $(echo "$OUT" | jq -c .last_reset)"
[ "$(jget .last_reset.result)" = ok ] || fail "nic0 pm: last_reset $(echo "$OUT" | jq -c .last_reset)"
has_driver "$NIC" e1000e || fail "nic0 pm: now on $(drv "$NIC")"
vendor_ok "$NIC" || fail "nic0 pm: config space reads all ones"
[ "$(attr "$NIC" reset_method)" = "pm bus" ] || fail "nic0: reset_method left as '$(attr "$NIC" reset_method)'"
metric reset_pm_e1000e_ms "$(reset_ms nic0)" ms "e1000e on e1000e"
# The root port's bus would be a bus reset of the root port's secondary bus:
# allowed only because nic0 is alone there; dry run shows the scope.
vc_ok reset nic0 --method bus --dry-run
say "nic0 bus reset scope: $(echo "$OUT" | jq -c '[.plan.scope[].pci_address]')"
[ "$(jget '.plan.scope | length')" = 1 ] || fail "nic0 bus scope: $(echo "$OUT" | jq -c .plan.scope)"

# --- bus reset behind the bridge, the other function attached -----------------
vc_ok register "$BUSDEV" --name busdev
vc_ok register "$OTHER" --name other
vc_ok bind other --with-group
scope_matches_kernel busdev "$BUSDEV"
vc_ok attach other vm-r
vc_err reset_scope_conflict reset busdev --method bus
echo "$ERR" | grep -q "$OTHER" || fail "the refusal does not name $OTHER: $ERR"
say "refused: $(echo "$ERR" | jq -c '.conflicting_functions')"
[ "$(count_events reset "$BUSDEV")" = 0 ] || fail "a refused reset was done"
[ "$(count_events reset_failed "$BUSDEV")" = 0 ] || fail "a refused reset was tried"

# --- three kernel failures: quarantine, across a restart ---------------------
vc_ok detach other --keep-bound
for i in 1 2 3; do
    vc_err reset_failed reset busdev --method bus
    say "attempt $i: $(echo "$ERR" | jq -c '{step, errno}')"
done
vc_ok show busdev
[ "$(jget .health)" = quarantined ] || fail "after 3 failed resets: health $(jget .health) ($(jget .health_reason))"
vc_err device_quarantined attach busdev vm-q
vc_err device_quarantined bind busdev
vfiod_stop
vfiod_start --op-timeout-ms 10000
vc_ok show busdev
[ "$(jget .health)" = quarantined ] || fail "after a restart: health $(jget .health)"
vc_err device_quarantined attach busdev vm-q

# --- reset on release after a detach ------------------------------------------
vc_ok attach nic0 vm-1
has_driver "$NIC" vfio-pci || fail "attach nic0: on $(drv "$NIC")"
vc_ok detach nic0
[ "$(jget .last_reset.result)" = ok ] || fail "detach nic0: last_reset $(echo "$OUT" | jq -c .last_reset)"
[ "$(jget .last_reset.method)" = auto ] || fail "detach nic0: last_reset $(echo "$OUT" | jq -c .last_reset)"
[ "$(jget .health)" = ok ] || fail "detach nic0: health $(jget .health) ($(jget .health_reason))"
has_driver "$NIC" e1000e || fail "detach nic0: on $(drv "$NIC")"
metric reset_on_release_e1000e_ms "$(jget .last_reset.duration_ms)" ms "auto (pm), on vfio-pci"
exit 0
