# mdev: the legacy mediated-device sysfs ABI on the real kernel, no vfiod.
# The parent is the kernel's mtty sample (samples/vfio-mdev/mtty.c, built by
# run.sh against the guest kernel; 24 serial ports shared by its two types).
# It checks, on this kernel, each fact vfiod's simulated kernel models: the
# parent and its types' attributes, what creating an mdev makes (links,
# IOMMU group, /dev/vfio/N), how the types share the parent's ports, the
# errno of each refused write, what a holder of the group or of the device
# fd does to a remove and to an rmmod, and a POSIX ACL entry on the group
# node. Every fact is checked and printed; all differences are listed before
# the scenario fails.
# vm-needs: mtty
. /vm/lib.sh

KREL=$(uname -r)
[ -e "/lib/modules/$KREL/extra/mtty.ko" ] && [ -e "/lib/modules/$KREL/extra/mdpy.ko" ] ||
    fail "no mtty.ko/mdpy.ko in the guest: tests/vm/run.sh could not build it (its log says why)"

P=/sys/devices/virtual/mtty/mtty
T=$P/mdev_supported_types
U1=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001
U2=83b8f4f2-509f-382f-3c1e-e6bfe0fa1002
U3=83b8f4f2-509f-382f-3c1e-e6bfe0fa1003
HOLDER=

MISMATCH=/tmp/vm.mdev.mismatch
: >$MISMATCH
# check WHAT ACTUAL EXPECTED: print the fact, remember a difference.
check() {
    if [ "$2" = "$3" ]; then
        say "ok: $1 = $2"
    else
        say "DIFFERS: $1 = '$2', expected '$3'"
        echo "$1 = '$2' (expected '$3')" >>$MISMATCH
    fi
}
# The kernel's answer to writing VALUE(s) to PATH: "open OK / write EINVAL"
# flattened to "OK EINVAL" (open result, then one per value).
kw() { vmtool mttywrite "$@" 2>&1 | awk '{printf "%s%s", (NR>1 ? " " : ""), $2}'; }
avail() { cat "$T/$1/available_instances"; }
rel() { readlink "$1"; }
group_of() { basename "$(readlink "$P/$1/iommu_group")"; }

mdev_cleanup() {
    [ -n "$HOLDER" ] && kill -9 "$HOLDER" 2>/dev/null
    local d
    for d in /sys/bus/mdev/devices/*; do
        [ -e "$d/remove" ] && echo 1 >"$d/remove" 2>/dev/null
    done
    [ -d /sys/module/mtty ] && rmmod mtty 2>/dev/null
    [ -d /sys/module/mdpy ] && rmmod mdpy 2>/dev/null
    [ -d /sys/module/mdev ] && rmmod mdev 2>/dev/null
    return 0
}
trap 'rc=$?; mdev_cleanup; (exit $rc); scenario_exit' EXIT

# --- loading -----------------------------------------------------------------
[ -d /sys/module/mdev ] && fail "mdev is loaded before the scenario loads it"
mark l0
modprobe mtty || fail "modprobe mtty failed: $(dmesg | tail -5)"
mark l1
metric mdev_modprobe_ms "$(mark_ms l0 l1)" ms "modprobe mtty (pulls in mdev)"
check "mdev module loaded by modprobe mtty" "$([ -d /sys/module/mdev ] && echo yes)" yes
check "mtty taints the kernel (out-of-tree, unsigned)" "$(cat /sys/module/mtty/taint)" OE
check "parent at" "$([ -d $P ] && echo $P)" $P
check "/sys/class/mdev_bus/mtty" "$(rel /sys/class/mdev_bus/mtty)" "../../devices/virtual/mtty/mtty"
check "types" "$(ls $T | tr '\n' ' ')" "mtty-1 mtty-2 "

# --- the types ---------------------------------------------------------------
# mtty has no show_description: the type has no description file.
for t in mtty-1 mtty-2; do
    check "$t files" "$(ls $T/$t | tr '\n' ' ')" "available_instances create device_api devices name "
    check "$t/device_api" "$(cat $T/$t/device_api)" vfio-pci
    check "$t/devices/ (empty)" "$(ls $T/$t/devices | wc -l)" 0
    check "$t/create mode" "$(stat -c %A $T/$t/create)" "--w-------"
    check "$t/available_instances mode" "$(stat -c %A $T/$t/available_instances)" "-r--r--r--"
done
check "mtty-1/name" "$(cat $T/mtty-1/name)" "Single port serial"
check "mtty-2/name" "$(cat $T/mtty-2/name)" "Dual port serial"
# 24 ports (MAX_MTTYS, no module parameter); a type's count is free ports
# divided by its ports per device.
check "mtty-1 available_instances (24 ports free)" "$(avail mtty-1)" 24
check "mtty-2 available_instances (24 ports free)" "$(avail mtty-2)" 12

# --- create --------------------------------------------------------------------
mark c0
r=$(kw $T/mtty-2/create $U1)
mark c1
check "create $U1 (mtty-2)" "$r" "OK OK"
metric mdev_create_ms "$(mark_ms c0 c1)" ms "write a uuid to mtty-2/create -> returned"
check "$U1 is a directory under the parent" "$([ -d $P/$U1 ] && echo yes)" yes
say "$P/$U1: $(ls $P/$U1 | tr '\n' ' ')"
check "$U1/mdev_type" "$(rel $P/$U1/mdev_type)" "../mdev_supported_types/mtty-2"
check "$U1 files" "$(ls $P/$U1 | tr '\n' ' ')" "driver iommu_group mdev_type power remove subsystem uevent vendor vfio-dev "
check "$U1/driver" "$(rel $P/$U1/driver)" "../../../../../bus/mdev/drivers/mtty"
check "$U1/subsystem" "$(rel $P/$U1/subsystem)" "../../../../../bus/mdev"
check "$U1/remove mode" "$(stat -c %A $P/$U1/remove)" "--w-------"
check "$U1/uevent" "$(tr '\n' ' ' <$P/$U1/uevent)" "DRIVER=mtty "
say "$U1/vfio-dev: $(ls $P/$U1/vfio-dev | tr '\n' ' ')"
G1=$(group_of $U1)
check "$U1/iommu_group" "$(rel $P/$U1/iommu_group)" "../../../../../kernel/iommu_groups/$G1"
check "group $G1 type (an emulated group has no IOMMU domain)" "$(cat /sys/kernel/iommu_groups/$G1/type)" unknown
check "group $G1 members" "$(ls /sys/kernel/iommu_groups/$G1/devices | tr '\n' ' ')" "$U1 "
check "/sys/kernel/iommu_groups/$G1/devices/$U1" "$(rel /sys/kernel/iommu_groups/$G1/devices/$U1)" "../../../../devices/virtual/mtty/mtty/$U1"
check "/sys/bus/mdev/devices/$U1" "$(rel /sys/bus/mdev/devices/$U1)" "../../../devices/virtual/mtty/mtty/$U1"
check "mtty-2/devices/$U1" "$(rel $T/mtty-2/devices/$U1)" "../../../$U1"
check "/dev/vfio/$G1" "$(stat -c '%F %A %U:%G' /dev/vfio/$G1 2>&1)" "character special file crw------- root:root"
say "the PCI groups: $(ls /sys/kernel/iommu_groups | tr '\n' ' '); the mdev's group $G1"
# Ports: mtty-2 takes 2 of the 24, and both types' counts drop.
check "after one mtty-2: mtty-2 available_instances" "$(avail mtty-2)" 11
check "after one mtty-2: mtty-1 available_instances" "$(avail mtty-1)" 22

# --- refused writes ----------------------------------------------------------
check "create with a malformed uuid" "$(kw $T/mtty-1/create not-a-uuid)" "OK EINVAL"
check "create with the same uuid again (same type)" "$(kw $T/mtty-2/create $U1)" "OK EEXIST"
check "create with the same uuid again (other type)" "$(kw $T/mtty-1/create $U1)" "OK EEXIST"
check "create $U2 (mtty-1)" "$(kw $T/mtty-1/create $U2)" "OK OK"
check "after mtty-2 + mtty-1: mtty-1 available_instances" "$(avail mtty-1)" 21
check "after mtty-2 + mtty-1: mtty-2 available_instances (21 ports: rounded down)" "$(avail mtty-2)" 10
# Ten more mtty-2 leave one port: mtty-2 has 0 instances, mtty-1 one.
i=10
while [ $i -lt 20 ]; do
    r=$(kw $T/mtty-2/create 83b8f4f2-509f-382f-3c1e-e6bfe0fa10$i)
    [ "$r" = "OK OK" ] || check "create filler mtty-2 #$i" "$r" "OK OK"
    i=$((i + 1))
done
check "one port left: mtty-2 available_instances" "$(avail mtty-2)" 0
check "one port left: mtty-1 available_instances" "$(avail mtty-1)" 1
check "create mtty-2 when its available_instances is 0" "$(kw $T/mtty-2/create $U3)" "OK ENOSPC"
check "a refused create leaves no directory" "$([ -e $P/$U3 ] && echo yes || echo no)" no
check "create $U3 (mtty-1, the last port)" "$(kw $T/mtty-1/create $U3)" "OK OK"
check "all ports used: mtty-1 available_instances" "$(avail mtty-1)" 0
check "create mtty-1 when its available_instances is 0" "$(kw $T/mtty-1/create 83b8f4f2-509f-382f-3c1e-e6bfe0fa1004)" "OK ENOSPC"
check "mdevs on the bus" "$(ls /sys/bus/mdev/devices | wc -l)" 13
i=10
while [ $i -lt 20 ]; do
    kw $P/83b8f4f2-509f-382f-3c1e-e6bfe0fa10$i/remove 1 >/dev/null
    i=$((i + 1))
done
check "fillers removed: mtty-1 available_instances" "$(avail mtty-1)" 20

check "remove 0" "$(kw $P/$U3/remove 0)" "OK OK"
check "after remove 0 the mdev is still there" "$([ -d $P/$U3 ] && echo yes)" yes
check "remove 2 (any non-zero number removes)" "$(kw $P/$U3/remove 2)" "OK OK"
check "after remove 2" "$([ -e $P/$U3 ] && echo present || echo gone)" gone
mark r0
check "remove 1" "$(kw $P/$U2/remove 1)" "OK OK"
mark r1
metric mdev_remove_ms "$(mark_ms r0 r1)" ms "write 1 to remove -> returned"
check "after remove 1" "$([ -e $P/$U2 ] && echo present || echo gone)" gone
check "bus link after remove" "$([ -e /sys/bus/mdev/devices/$U2 ] && echo present || echo gone)" gone
check "a second remove (a new open)" "$(kw $P/$U2/remove 1)" "ENOENT"
check "remove with an unparsable value" "$(kw $P/$U1/remove x)" "OK EINVAL"
check "ports back: mtty-1 available_instances" "$(avail mtty-1)" 22
# What `echo UUID > create` writes: 37 bytes, the newline is accepted.
v=$(printf '%s\n_' $U3)
check "create with a trailing newline" "$(kw $T/mtty-1/create "${v%_}")" "OK OK"
check "remove it" "$(kw $P/$U3/remove 1)" "OK OK"
# Two writes through one fd: the second reaches a removed attribute.
check "create $U2 again" "$(kw $T/mtty-1/create $U2)" "OK OK"
G2=$(group_of $U2)
check "remove 1 twice through one open fd" "$(kw $P/$U2/remove 1 1)" "OK OK ENODEV"
check "the group node goes with the mdev" "$([ -e /dev/vfio/$G2 ] && echo present || echo gone)" gone

# --- holders -----------------------------------------------------------------
# Only the group node open.
vmtool hold /dev/vfio/$G1 >/tmp/vm.hold 2>&1 &
HOLDER=$!
wait_until 10 grep -q holding /tmp/vm.hold || fail "could not hold /dev/vfio/$G1: $(cat /tmp/vm.hold)"
mark h0
check "remove with only /dev/vfio/$G1 open" "$(kw $P/$U1/remove 1)" "OK OK"
mark h1
metric mdev_remove_groupheld_ms "$(mark_ms h0 h1)" ms "remove with the group node held"
check "mdev gone while its group node is held" "$([ -e $P/$U1 ] && echo present || echo gone)" gone
say "/dev/vfio/$G1 while still held: $(ls -l /dev/vfio/$G1 2>&1); group dir: $(ls /sys/kernel/iommu_groups/$G1 2>&1 | tr '\n' ' ')"
kill -9 $HOLDER; wait $HOLDER 2>/dev/null; HOLDER=

# The device fd open (container + group + device, as a VMM has them).
check "create $U1 again" "$(kw $T/mtty-2/create $U1)" "OK OK"
G1=$(group_of $U1)
vmtool vfiohold $G1 $U1 >/tmp/vm.hold 2>&1 &
HOLDER=$!
wait_until 10 grep -q holding /tmp/vm.hold || fail "could not get $U1's device fd: $(cat /tmp/vm.hold)"
say "$(cat /tmp/vm.hold)"
vmtool mttywrite $P/$U1/remove 1 >/tmp/vm.rm 2>&1 &
rmpid=$!
sleep 3
check "remove with the device fd open, after 3 s" "$(kill -0 $rmpid 2>/dev/null && echo blocked || echo "returned: $(cat /tmp/vm.rm | tr '\n' ' ')")" blocked
say "the writer: $(cat /proc/$rmpid/stat 2>/dev/null | cut -d' ' -f3) in $(cat /proc/$rmpid/wchan 2>/dev/null); kernel: $(dmesg | grep -i 'blocked until\|mtty' | tail -2 | tr '\n' '|')"
check "while remove blocks: mdev dir" "$([ -e $P/$U1 ] && echo present || echo gone)" present
# Before the driver's remove waits for the holder, the kernel has taken down
# every attribute and link of the mdev but its iommu_group link: the
# directory, the group and /dev/vfio/N stay until the holder lets go.
check "while remove blocks: the mdev's files" "$(ls $P/$U1 | tr '\n' ' ')" "iommu_group "
check "while remove blocks: bus link" "$([ -e /sys/bus/mdev/devices/$U1 ] && echo present || echo gone)" gone
check "while remove blocks: driver link" "$([ -e $P/$U1/driver ] && echo present || echo gone)" gone
check "while remove blocks: mdev_type link" "$([ -e $P/$U1/mdev_type ] && echo present || echo gone)" gone
check "while remove blocks: iommu_group link" "$(rel $P/$U1/iommu_group)" "../../../../../kernel/iommu_groups/$G1"
check "while remove blocks: mtty-2/devices/$U1" "$([ -e $T/mtty-2/devices/$U1 ] && echo present || echo gone)" gone
check "while remove blocks: /dev/vfio/$G1" "$([ -c /dev/vfio/$G1 ] && echo present || echo gone)" present
check "while remove blocks: mtty-2 available_instances (ports not yet back)" "$(avail mtty-2)" 11
# A second remove meanwhile, in the background in case it waits too.
vmtool mttywrite $P/$U1/remove 1 >/tmp/vm.rm2 2>&1 &
rm2pid=$!
wait_until 2 eval '! kill -0 $rm2pid 2>/dev/null'
check "while remove blocks: a second remove" "$(kill -0 $rm2pid 2>/dev/null && echo blocked || awk '{printf "%s%s", (NR>1 ? " " : ""), $2}' /tmp/vm.rm2)" "ENOENT"
mark k0
kill -9 $HOLDER; wait $HOLDER 2>/dev/null; HOLDER=
wait_until 20 eval '! kill -0 $rmpid 2>/dev/null'
mark k1
wait $rmpid
wait_until 5 eval '! kill -0 $rm2pid 2>/dev/null'
say "the second remove: $(tr '\n' ' ' </tmp/vm.rm2)"
check "the blocked remove, once the holder is killed" "$(awk '{printf "%s%s", (NR>1 ? " " : ""), $2}' /tmp/vm.rm)" "OK OK"
metric mdev_remove_after_release_ms "$(mark_ms k0 k1)" ms "holder killed -> blocked remove returned"
check "after the holder went: mdev" "$([ -e $P/$U1 ] && echo present || echo gone)" gone

# --- a POSIX ACL entry on the group node -------------------------------------
check "create $U1 for the ACL" "$(kw $T/mtty-2/create $U1)" "OK OK"
G1=$(group_of $U1)
N=/dev/vfio/$G1
vmtool runas 1000 1000 - vmtool hold $N >/tmp/vm.o1000 2>&1
check "uid 1000 opens $N before any ACL" "$?" 13
setfacl -m u:1000:rw $N || fail "setfacl -m u:1000:rw $N failed"
say "after setfacl: $(stat -c %A $N); $(getfacl -p $N 2>/dev/null | grep -v '^#' | tr '\n' ' ')"
vmtool runas 1000 1000 - vmtool vfiohold $G1 $U1 >/tmp/vm.o1000 2>&1 &
HOLDER=$!
wait_until 10 grep -q holding /tmp/vm.o1000
check "uid 1000 with u:1000:rw gets the container, group and device fd" "$(grep -q holding /tmp/vm.o1000 && echo yes || cat /tmp/vm.o1000)" yes
kill -9 $HOLDER; wait $HOLDER 2>/dev/null; HOLDER=
vmtool runas 1001 1001 - vmtool hold $N >/tmp/vm.o1001 2>&1
check "uid 1001 opens $N (uid 1000 has an entry)" "$? $(cat /tmp/vm.o1001)" "13 open $N: Permission denied"

# --- rmmod with mdevs present ------------------------------------------------
check "create $U2 for rmmod" "$(kw $T/mtty-1/create $U2)" "OK OK"
G2=$(group_of $U2)
vmtool vfiohold $G2 $U2 >/tmp/vm.hold 2>&1 &
HOLDER=$!
wait_until 10 grep -q holding /tmp/vm.hold || fail "could not get $U2's device fd: $(cat /tmp/vm.hold)"
check "rmmod mtty while a device fd is open" "$(rmmod mtty 2>&1)" "rmmod: can't unload module 'mtty': Resource temporarily unavailable"
check "mtty still loaded" "$([ -d /sys/module/mtty ] && echo yes)" yes
check "mtty refcount with the device fd open" "$(cat /sys/module/mtty/refcnt)" 1
kill -9 $HOLDER; wait $HOLDER 2>/dev/null; HOLDER=
check "mtty refcount with mdevs but no fd" "$(cat /sys/module/mtty/refcnt)" 0
mark m0
check "rmmod mtty with 2 mdevs and no holder" "$(rmmod mtty 2>&1 && echo ok)" ok
mark m1
metric mdev_rmmod_ms "$(mark_ms m0 m1)" ms "rmmod mtty with 2 mdevs present"
check "the mdevs after rmmod" "$(ls /sys/bus/mdev/devices | wc -l)" 0
check "the parent after rmmod" "$([ -e $P ] && echo present || echo gone)" gone
check "the group nodes after rmmod" "$(ls /dev/vfio/$G1 /dev/vfio/$G2 2>/dev/null | wc -l)" 0
modprobe mtty || fail "modprobe mtty again failed"
check "mdevs after loading mtty again (none persist)" "$(ls /sys/bus/mdev/devices | wc -l)" 0
check "mtty-1 available_instances after reload" "$(avail mtty-1)" 24

# --- a parent whose instances the mdev core counts: mdpy ---------------------
# mtty counts its own (get_available); mdpy gives the core a parent-wide
# count (module parameter count), shared by all its types.
modprobe mdpy count=2 || fail "modprobe mdpy failed: $(dmesg | tail -5)"
Q=/sys/devices/virtual/mdpy/mdpy
QT=$Q/mdev_supported_types
check "mdpy types" "$(ls $QT | tr '\n' ' ')" "mdpy-hd mdpy-vga mdpy-xga "
check "mdpy-vga files" "$(ls $QT/mdpy-vga | tr '\n' ' ')" "available_instances create description device_api devices name "
check "mdpy-vga/description" "$(cat $QT/mdpy-vga/description)" "virtual display, 640x480 framebuffer"
check "mdpy-vga/name" "$(cat $QT/mdpy-vga/name)" "mdpy-vga"
check "mdpy: available_instances (count=2) vga/xga" "$(cat $QT/mdpy-vga/available_instances) $(cat $QT/mdpy-xga/available_instances)" "2 2"
check "mdpy: create vga" "$(vmtool mttywrite $QT/mdpy-vga/create $U1 | awk '{printf "%s%s", (NR>1 ? " " : ""), $2}')" "OK OK"
check "mdpy: after one vga: vga/xga available_instances" "$(cat $QT/mdpy-vga/available_instances) $(cat $QT/mdpy-xga/available_instances)" "1 1"
check "mdpy: the same uuid again" "$(vmtool mttywrite $QT/mdpy-vga/create $U1 | awk '{printf "%s%s", (NR>1 ? " " : ""), $2}')" "OK EEXIST"
check "mdpy: create xga (the last instance)" "$(vmtool mttywrite $QT/mdpy-xga/create $U2 | awk '{printf "%s%s", (NR>1 ? " " : ""), $2}')" "OK OK"
check "mdpy: full: vga/xga available_instances" "$(cat $QT/mdpy-vga/available_instances) $(cat $QT/mdpy-xga/available_instances)" "0 0"
check "mdpy: create when available_instances is 0 (the core refuses)" "$(vmtool mttywrite $QT/mdpy-vga/create $U3 | awk '{printf "%s%s", (NR>1 ? " " : ""), $2}')" "OK EUSERS"
check "mdpy: $U1/driver" "$(rel $Q/$U1/driver)" "../../../../../bus/mdev/drivers/mdpy"
check "mdpy: rmmod with 2 mdevs and no holder" "$(rmmod mdpy 2>&1 && echo ok)" ok
check "mdpy: mdevs after rmmod" "$(ls /sys/bus/mdev/devices | wc -l)" 0

if [ -s $MISMATCH ]; then
    cp $MISMATCH "$OUTDIR/mdev.mismatch.txt"
    fail "$(wc -l <$MISMATCH) facts differ: $(tr '\n' ';' <$MISMATCH)"
fi
exit 0
