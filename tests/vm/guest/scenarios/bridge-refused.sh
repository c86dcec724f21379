# bridge-refused: what must be refused without touching the kernel. A PCIe root port (on
# pcieport, carrying hotplug) and a PCIe-to-PCI bridge (no driver) must not be
# moved: vfio-pci cannot drive a bridge, and unbinding pcieport, even for a
# moment, takes hotplug and AER away from everything below. The check is on
# the kernel's uevents: no unbind/bind of the port at all.
. /vm/lib.sh
PORT=$PORT_hp1
BR=$(dev_under "$PORT_br0")
has_driver "$PORT" pcieport || fail "precondition: $PORT is on $(drv "$PORT")"
uevmon_start
vfiod_start
PROBLEMS=
problem() { say "PROBLEM: $*"; PROBLEMS="$PROBLEMS [$*]"; }
if vc register "$PORT" --name port; then
    say "registering the root port $PORT was accepted"
    mark p0
    if vc bind port; then problem "bind of the root port $PORT succeeded (kernel: $(drv "$PORT"))"; fi
    mark p1
    say "bind of the root port: rc=$RC in $(mark_ms p0 p1) ms: $ERR"
    vc bind port --with-group >/dev/null 2>&1 && problem "bind --with-group of the root port $PORT succeeded"
else
    say "registering the root port $PORT refused: $ERR"
fi
has_driver "$PORT" pcieport || problem "the root port $PORT is now on $(drv "$PORT")"
usleep 500000
if grep -qE " (unbind|bind) .*/$PORT( |\$)" $UEVENTS; then
    problem "the kernel unbound/rebound the root port $PORT (pcieport: hotplug, AER, PME) during the refused binds: $(grep "/$PORT" $UEVENTS | awk '{printf "%s %s; ", $1, $2}')"
fi
: >$UEVENTS
if vc register "$BR" --name bridge; then
    say "registering the bridge $BR was accepted"
    mark b0
    vc bind bridge && problem "bind of the PCI bridge $BR succeeded (kernel: $(drv "$BR"))"
    mark b1
    say "bind of the bridge: rc=$RC in $(mark_ms b0 b1) ms: $ERR"
    set -- $(devs_under "$BR")
    d1=$(drv "$1") d2=$(drv "$2")
    mark b2
    vc bind bridge --with-group && problem "bind --with-group of the PCI bridge $BR succeeded (kernel: $(drv "$BR"))"
    mark b3
    say "bind --with-group of the bridge: rc=$RC in $(mark_ms b2 b3) ms: $ERR"
    has_driver "$1" "$d1" || problem "after the bridge's group bind, $1 is on $(drv "$1") (was $d1)"
    has_driver "$2" "$d2" || problem "after the bridge's group bind, $2 is on $(drv "$2") (was $d2)"
    if grep -qE " unbind " $UEVENTS; then
        problem "refusing the bridge's group bind unbound the functions below it first: $(grep -E ' (unbind|bind) ' $UEVENTS | awk '{n=split($3,p,"/"); printf "%s %s %s; ", $2, p[n], $4}')"
    fi
else
    say "registering the bridge $BR refused: $ERR"
fi
has_driver "$BR" none || problem "the bridge $BR is now on $(drv "$BR")"
ov=$(cat "/sys/bus/pci/devices/$BR/driver_override")
[ "$ov" = "(null)" ] || [ -z "$ov" ] || problem "the bridge $BR was left with driver_override '$ov'"
# hotplug below the port still works
device_add hpk "$QPORT_hp1" e1000e >/dev/null || fail "device_add below $PORT failed"
wait_until 15 dev_under "$PORT" || fail "hotplug below $PORT broken after the refused bind"
device_del hpk >/dev/null
wait_until 15 eval '[ -z "$(devs_under "$PORT")" ]' || fail "hot-unplug below $PORT broken"
[ -z "$PROBLEMS" ] || fail "bridges are not refused up front:$PROBLEMS"
exit 0
