# udev-events: hotplug events with and without systemd-udevd.
#  1. no udevd: vfiod must fall back to the kernel's netlink group, say so in
#     `vfioctl health` (.hotplug), and still see hotplug add/remove.
#  2. systemd-udevd running (started, triggered, settled): vfiod, started
#     after it, uses udev, says so, and sees hotplug add/remove.
# Each part measures kernel uevent -> vfiod event latency.
. /vm/lib.sh

# hotplug_round LABEL QEMU-ID: add an e1000e on hp0, wait for the events, remove.
hotplug_round() {
    local label=$1 id=$2 a
    hotadd_e1000e "$id" "$label"
    a=$HOTADDED
    wait_until 10 has_event hotplug_add "$a" || fail "$label: no hotplug_add event for $a (health .hotplug=$HP); events: $(cat $EVENTS)"
    wait_until 5 has_event driver_bound "$a" || say "$label: note: no driver_bound event for $a"
    device_del "$id" >/dev/null || fail "$label: device_del failed"
    wait_until 15 absent "$a" || fail "$label: $a still present"
    wait_until 10 has_event hotplug_remove "$a" || fail "$label: no hotplug_remove event for $a; events: $(cat $EVENTS)"
    metric "${label}_add_ms" "$(uevent_latency_ms add hotplug_add "$a")" ms "kernel add uevent -> vfiod hotplug_add 'at' ($label, .hotplug=$HP)"
    metric "${label}_bind_ms" "$(uevent_latency_ms bind driver_bound "$a")" ms "kernel bind uevent -> vfiod driver_bound 'at' ($label)"
    metric "${label}_remove_ms" "$(uevent_latency_ms remove hotplug_remove "$a")" ms "kernel remove uevent -> vfiod hotplug_remove 'at' ($label)"
    if [ -n "${UDEVMON_PID:-}" ]; then
        local act type split
        for act in add remove; do
            type=hotplug_$act
            split=$(udev_split_ms $act $type "$a")
            metric "${label}_${act}_in_udevd_ms" "${split% *}" ms "kernel $act uevent -> systemd-udevd re-broadcast ($label)"
            metric "${label}_${act}_after_udevd_ms" "${split#* }" ms "systemd-udevd re-broadcast -> vfiod $type 'at' ($label)"
        done
    fi
}

# ---- 1. without udevd ----------------------------------------------------------
pidof systemd-udevd >/dev/null && fail "precondition: systemd-udevd already running"
[ -e /run/udev/control ] && fail "precondition: /run/udev/control exists"
vfiod_start
vc_ok health
HP=$(jget .hotplug)
say "without udevd: health .hotplug = '$HP'"
case $HP in *kernel*|*netlink*) ;; *) fail "without udevd, health .hotplug is '$HP', expected it to name the kernel netlink fallback" ;; esac
grep -qi 'udev' $VFIOD_LOG || say "note: vfiod's log does not mention udev"
uevmon_start
events_start
hotplug_round noudev hpf1
kill $EVENTS_PID 2>/dev/null
vfiod_stop

# ---- 2. with systemd-udevd -----------------------------------------------------------
mark u0
/lib/systemd/systemd-udevd --daemon --resolve-names=never || fail "systemd-udevd did not start"
udevadm trigger --action=add >/dev/null 2>&1
udevadm settle -t 60 || fail "udevadm settle failed"
mark u1
say "udevd started and settled in $(mark_ms u0 u1) ms"
# udev's coldplug must not have moved any driver
while read -r a want; do
    [ -e "/sys/bus/pci/devices/$a" ] || continue
    [ "$(drv "$a")" = "$want" ] || say "note: after udev coldplug $a is on $(drv "$a") (was $want)"
done </run/baseline
vfiod_start
vc_ok health
HP=$(jget .hotplug)
say "with udevd: health .hotplug = '$HP'"
case $HP in *kernel*|*netlink*|none|"") fail "with udevd running, health .hotplug is '$HP', expected udev" ;; esac
case $HP in *udev*) ;; *) fail "with udevd running, health .hotplug is '$HP', expected udev" ;; esac
: >$UEVENTS
udevmon_start
events_start
hotplug_round udev hpf2
kill $UDEVMON_PID 2>/dev/null; UDEVMON_PID=

# ---- 3. with udevd: a registered vfio-bound device is unplugged and re-plugged ----
hotadd_e1000e hpf3
A=$HOTADDED
vc_ok register "$A" --name hpf
vc_ok bind hpf
has_driver "$A" vfio-pci || fail "bind hpf: $A on $(drv "$A")"
RULES=$(grep -ls "$A" /etc/udev/rules.d/* /run/udev/rules.d/* 2>/dev/null | tr '\n' ' ')
say "udev rule files naming $A: ${RULES:-none}"
[ -n "$RULES" ] && say "rule: $(grep -h "$A" $RULES)"
device_del hpf3 >/dev/null || fail "device_del hpf3 failed"
wait_until 15 absent "$A" || fail "$A still present"
: >$UEVENTS
device_add hpf4 "$QPORT_hp0" e1000e >/dev/null || fail "device_add hpf4 failed"
wait_until 15 present "$A" || fail "re-plugged e1000e not at $A"
wait_until 15 has_driver "$A" vfio-pci || fail "with udevd, the re-plugged registered $A stayed on $(drv "$A")"
usleep 1000000
has_driver "$A" vfio-pci || fail "the re-plugged $A left vfio-pci for $(drv "$A")"
say "re-plug under udev, kernel driver changes: $(grep " /.*$A" $UEVENTS | awk '$2 == "bind" || $2 == "unbind" {printf "%s %s; ", $2, $4}')"
vc_ok unbind hpf
has_driver "$A" e1000e || fail "unbind hpf: $A on $(drv "$A")"
[ -n "$RULES" ] && grep -qs "$A" $RULES && say "note: the udev rule for $A is still there after unbind"
device_del hpf4 >/dev/null
exit 0
