# replug-race: devices vfiod holds on vfio-pci come back there after a PCI
# remove + rescan, although the native driver probes them first (issue 18).
# After `echo 1 > /sys/bus/pci/rescan` the kernel sends a device's `add`
# uevent before it probes a driver, and the native driver (e1000e, igb,
# virtio-pci) binds a moment later: a vfiod that plans its rebind from what it
# saw at `add` ("no driver") races that probe, and one that loses it used to
# roll back to "no driver" and leave the device driverless with
# bound_by_vfiod: true.
#   - three devices with native drivers (e1000e, igb, virtio-rng on
#     virtio-pci), registered and bound to vfio-pci by vfiod;
#   - VM_REPLUG_ROUNDS rounds (15; host: VFIOD_VM_REPLUG_ROUNDS), each: remove
#     all three (`remove` on each function), one bus rescan, wait until it
#     settles; stops early after VM_REPLUG_BUDGET seconds (180) and says how
#     many rounds ran;
#   - after EVERY round, against the kernel: each device is present, its
#     driver link is vfio-pci (never none, never the native one), /dev/vfio/N
#     exists; and vfiod agrees: present, current_driver vfio-pci,
#     bound_to_vfio, bound_by_vfiod, the kernel's IOMMU group; no bind_failed
#     event; still so half a second later;
#   - at the end vfiod gives each back to its native driver.
# Many driver moves: run with single-threaded TCG (see vm-testing.md).
# vm-boot: tcg-single
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0") || fail "no e1000e below $PORT_nic0"
IGB=$(dev_under "$PORT_igb0") || fail "no igb below $PORT_igb0"
RNG=$(dev_under "$PORT_rng0") || fail "no virtio-rng below $PORT_rng0"
ROUNDS=${VM_REPLUG_ROUNDS:-15}
BUDGET=${VM_REPLUG_BUDGET:-180}
NAMES="nic0 igb0 rng0"
addr_of() { case $1 in nic0) echo "$NIC" ;; igb0) echo "$IGB" ;; rng0) echo "$RNG" ;; esac; }
native_of() { case $1 in nic0) echo e1000e ;; igb0) echo igb ;; rng0) echo virtio-pci ;; esac; }
for n in $NAMES; do
    has_driver "$(addr_of $n)" "$(native_of $n)" || fail "precondition: $n $(addr_of $n) is on $(drv "$(addr_of $n)")"
done

vfiod_start
for n in $NAMES; do
    vc_ok register "$(addr_of $n)" --name $n
    vc_ok bind $n
    has_driver "$(addr_of $n)" vfio-pci || fail "bind $n: kernel has $(drv "$(addr_of $n)")"
done
events_start
failed_binds() { grep -c '"type":"bind_failed"' $EVENTS; }

kernel_state() {
    local n a
    for n in $NAMES; do
        a=$(addr_of $n)
        if present "$a"; then printf '%s=%s(group %s) ' $n "$(drv "$a")" "$(grp "$a")"; else printf '%s=absent ' $n; fi
    done
}
all_absent() { for n in $NAMES; do absent "$(addr_of $n)" || return 1; done; }
all_on_vfio() {
    local n a
    for n in $NAMES; do
        a=$(addr_of $n)
        has_driver "$a" vfio-pci && vfio_node "$a" || return 1
    done
}
# Settled, or a bind_failed event: stop waiting either way (checked after).
kernel_settled() { all_on_vfio || [ "$(failed_binds)" -gt "$FAILED0" ]; }
# vfiod's list says the same as the kernel for all three (one jq: it costs
# 0.1-0.4 s under TCG).
vfiod_agrees() {
    vc list || return 1
    local n want=
    for n in $NAMES; do want="$want\"$n\": $(grp "$(addr_of $n)"), "; done
    echo "$OUT" | jq -e --argjson want "{${want%, }}" \
        '[.[] | select(.name | in($want)) | select(.present == true and .current_driver == "vfio-pci" and .bound_to_vfio == true and .bound_by_vfiod == true and .iommu_group == $want[.name])] | length == ($want | length)' \
        >/dev/null
}
vfiod_state() { echo "$OUT" | jq -c '[.[] | {name, present, current_driver, bound_to_vfio, bound_by_vfiod, iommu_group, pending, stuck}]' 2>/dev/null; }
round_failed() { # WHAT
    fail "round $i of $ROUNDS: $1; kernel: $(kernel_state); vfiod: $(vfiod_state); bind_failed events: $(jq -c -s 'map(select(.type == "bind_failed") | {pci_address, detail})' $EVENTS)"
}

T0=$(cut -d' ' -f1 /proc/uptime)
i=0 times=
while [ $i -lt "$ROUNDS" ]; do
    if [ $i -gt 0 ] && awk -v t="$(cut -d' ' -f1 /proc/uptime)" -v s="$T0" -v b="$BUDGET" 'BEGIN{exit !(t - s > b)}'; then
        say "time budget of $BUDGET s used up after $i rounds"
        break
    fi
    i=$((i + 1))
    FAILED0=$(failed_binds)
    for n in $NAMES; do pci_write 1 "devices/$(addr_of $n)/remove"; done
    wait_until 15 all_absent || round_failed "the removed devices did not go away"
    mark rr0.$i
    pci_write 1 rescan
    mark rr1.$i
    wait_until 30 kernel_settled || round_failed "not all back on vfio-pci 30 s after the rescan"
    mark rr2.$i
    [ "$(failed_binds)" -gt "$FAILED0" ] && round_failed "vfiod's rebind failed"
    wait_until 10 vfiod_agrees || round_failed "vfiod's record disagrees with the kernel"
    usleep 500000
    all_on_vfio || round_failed "a device left vfio-pci after the rebind"
    [ "$(failed_binds)" -gt "$FAILED0" ] && round_failed "vfiod's rebind failed after all"
    ms=$(mark_ms rr0.$i rr2.$i)
    times="$times $ms"
    say "round $i: rescan took $(mark_ms rr0.$i rr1.$i) ms; all three on vfio-pci $ms ms after it began; $(kernel_state)"
done
say "rounds run: $i of $ROUNDS (remove all three + one rescan each); rescan -> all on vfio-pci ms:$times"
metric replug_rounds "$i" rounds "remove+rescan rounds of e1000e, igb, virtio-rng that all came back on vfio-pci (asked: $ROUNDS)"
metric replug_rebind_ms "$(echo $times | median)" ms "median, rescan write -> all three on vfio-pci (kernel driver links, polled)"
metric replug_rebind_max_ms "$(echo $times | tr ' ' '\n' | grep . | sort -n | tail -1)" ms "slowest round"
[ "$i" -ge 1 ] || fail "no round ran"

for n in $NAMES; do
    vc_ok unbind $n
    has_driver "$(addr_of $n)" "$(native_of $n)" || fail "final unbind $n: kernel has $(drv "$(addr_of $n)")"
done
exit 0
