# rawhold: what holds a device, seen from the kernel, no vfiod. The facts the
# holder scan of vfiod (issue 9) relies on, checked on this guest's kernel:
#   - a process with an e1000e's VFIO device fd (container + group + device,
#     as a VM holds it) blocks the kernel's vfio-pci unbind until it exits;
#     what that process looks like in /proc (fd links, fdinfo);
#   - the group fd alone does not block the unbind;
#   - the bochs-display's DRM node, its framebuffer and the framebuffer
#     console; an open /dev/dri/card0 and the unbind of bochs-drm;
#   - the NVMe's namespace, block device and mount as vfiod can find them.
# Every wait is bounded: a blocked write is released by killing its holder.
. /vm/lib.sh
NIC=$(dev_under "$PORT_nic0") || fail "no e1000e"
GPU=$(dev_under "$PORT_gpu0") || fail "no bochs-display"
NVME=$(dev_under "$PORT_nvme0") || fail "no NVMe below $PORT_nvme0"
REPORT=$OUTDIR/rawhold.proc.txt
: >$REPORT
note() { echo "$*" >>$REPORT; }

# --- a VFIO device fd blocks the unbind -------------------------------------
sysfs_to_vfio "$NIC"
has_driver "$NIC" vfio-pci || fail "$NIC on $(drv "$NIC") after the move to vfio-pci"
G=$(grp "$NIC")
holder_start vfiohold "$G" "$NIC"
note "== kernel $(uname -r); holder of $NIC (group $G): $(cat "$HOLD_OUT")"
note "$(ls -l /proc/$HOLD/fd | sed 1d)"
DEVFD=
for fd in /proc/$HOLD/fd/*; do
    n=${fd##*/}
    l=$(readlink "$fd")
    note "-- fd $n -> $l"
    note "$(cat /proc/$HOLD/fdinfo/$n)"
    case $l in *vfio-device*) DEVFD=$n ;; esac
done
[ -n "$DEVFD" ] || fail "no anon_inode:[vfio-device] among the holder's fds: $(ls -l /proc/$HOLD/fd)"
say "device fd $DEVFD -> $(readlink /proc/$HOLD/fd/$DEVFD); fdinfo: $(tr '\n' ' ' </proc/$HOLD/fdinfo/$DEVFD)"
if grep -q "$NIC" /proc/$HOLD/fdinfo/$DEVFD; then
    FDINFO_NAMES=yes
else
    FDINFO_NAMES=no
fi
say "the device fd's fdinfo names the device: $FDINFO_NAMES (kernel $(uname -r))"
metric rawhold_fdinfo_names_device "$FDINFO_NAMES" - "fdinfo of an anon_inode:[vfio-device] fd names $NIC (kernel $(uname -r))"
# The group and container nodes as device numbers (how a scan matches them).
note "-- /dev/vfio: $(ls -l /dev/vfio | sed 1d | tr '\n' ';')"

# The unbind, in a child whose write is stamped by the kernel on return.
mark ub0
pci_write_stamped "$NIC" drivers/vfio-pci/unbind ub1
usleep 2000000
kill -0 $UNB 2>/dev/null || fail "the unbind returned although the VFIO device fd is open"
state=$(sed -n 's/^State:[[:space:]]*//p' /proc/$UNB/status 2>/dev/null)
# Only the driver link is safe to look at now: reading driver_override takes
# the device lock the blocked unbind holds.
say "after 2 s the unbind is still blocked (writer state: $state; driver link: $(drv "$NIC")); kernel: $(dmesg | grep -i 'blocked until\|in use' | tail -1)"
note "-- blocked unbind writer: state $state; stack: $(cat /proc/$UNB/stack 2>/dev/null | head -8 | tr '\n' ' ')"
mark k0
kill $HOLD
wait $HOLD 2>/dev/null
wait_until 10 eval '! kill -0 $UNB 2>/dev/null' || fail "the unbind did not return within 10 s of the holder's exit"
wait $UNB 2>/dev/null
metric rawhold_unbind_blocked_ms "$(mark_ms ub0 ub1)" ms "vfio-pci unbind with a VFIO device fd open; holder killed after 2 s"
metric rawhold_release_to_unbind_ms "$(mark_ms k0 ub1)" ms "holder killed -> blocked unbind returns"
has_driver "$NIC" none || fail "after the unbind $NIC is on $(drv "$NIC")"
pci_write "" "devices/$NIC/driver_override"
pci_write "$NIC" drivers_probe
has_driver "$NIC" e1000e || fail "$NIC did not get back to e1000e: $(drv "$NIC")"

# --- the group fd alone does not block -------------------------------------
sysfs_to_vfio "$NIC"
G=$(grp "$NIC")
holder_start hold "/dev/vfio/$G"
mark ug0
pci_write_stamped "$NIC" drivers/vfio-pci/unbind ug1
if ! wait_until 10 eval '! kill -0 $UNB 2>/dev/null'; then
    kill $HOLD; wait_until 10 eval '! kill -0 $UNB 2>/dev/null'
    fail "the unbind blocked with only the group node /dev/vfio/$G open"
fi
metric rawhold_group_only_unbind_ms "$(mark_ms ug0 ug1)" ms "vfio-pci unbind while only /dev/vfio/N is open (does not block)"
kill $HOLD; wait $HOLD 2>/dev/null
pci_write "" "devices/$NIC/driver_override"
pci_write "$NIC" drivers_probe
has_driver "$NIC" e1000e || fail "$NIC did not get back to e1000e: $(drv "$NIC")"

# --- display: DRM node, framebuffer, console --------------------------------
has_driver "$GPU" bochs-drm || fail "$GPU is on $(drv "$GPU"), expected bochs-drm"
D=/sys/bus/pci/devices/$GPU
CARD=$(ls "$D/drm" | grep '^card' | head -1)
FB=$(ls "$D/graphics" 2>/dev/null | head -1)
[ -n "$CARD" ] || fail "no drm/card* under $GPU"
say "$GPU: drm $(ls "$D/drm" | tr '\n' ' ')(dev $(cat "$D/drm/$CARD/dev")), graphics ${FB:-none}"
vtcons() { for v in /sys/class/vtconsole/vtcon*; do printf '%s:%s:bind=%s ' "${v##*/}" "$(cat "$v/name")" "$(cat "$v/bind")"; done; }
FBCON=no
grep -q 1 $(grep -l 'frame buffer' /sys/class/vtconsole/vtcon*/name 2>/dev/null | sed 's/name$/bind/') /dev/null && FBCON=yes
say "vt consoles: $(vtcons)"
metric rawhold_fbcon_on_bochs "$FBCON" - "a framebuffer console is bound at boot (bochs-display fb ${FB:-none}), kernel $(uname -r)"
note "== display $GPU: $(ls "$D/drm" | tr '\n' ' '); graphics ${FB:-none}; $(vtcons)"
holder_start hold "/dev/dri/$CARD"
note "-- holder of /dev/dri/$CARD: $(ls -l /proc/$HOLD/fd | sed 1d | tr '\n' ';') fdinfo: $(tr '\n' ' ' </proc/$HOLD/fdinfo/3)"
# Does an open DRM node (an X server, a compositor) block bochs' unbind?
mark gu0
pci_write_stamped "$GPU" drivers/bochs-drm/unbind gu1
if wait_until 10 eval '! kill -0 $UNB 2>/dev/null'; then
    GPU_BLOCKS=no
    metric rawhold_drm_held_unbind_ms "$(mark_ms gu0 gu1)" ms "bochs-drm unbind while /dev/dri/$CARD is open (the kernel does not wait for it)"
else
    GPU_BLOCKS=yes
fi
kill $HOLD; wait $HOLD 2>/dev/null
wait_until 10 eval '! kill -0 $UNB 2>/dev/null' || fail "the bochs-drm unbind did not return after the holder exited"
say "open /dev/dri/$CARD blocks the unbind of bochs-drm: $GPU_BLOCKS; after it: driver $(drv "$GPU"), consoles $(vtcons)"
note "-- bochs-drm unbind with card open: blocks=$GPU_BLOCKS; after: $(vtcons)"
pci_write "$GPU" drivers/bochs-drm/bind
has_driver "$GPU" bochs-drm || fail "$GPU did not go back to bochs-drm"
say "rebound bochs-drm: graphics $(ls "$D/graphics" 2>/dev/null | tr '\n' ' '), consoles $(vtcons)"
note "-- after rebind: $(vtcons)"

# --- NVMe: namespace, block device, mount ----------------------------------
has_driver "$NVME" nvme || fail "$NVME is on $(drv "$NVME"), expected nvme"
wait_until 10 test -b /dev/nvme0n1 || fail "no /dev/nvme0n1"
mkdir -p /tmp/vm.nvme
mount -t ext4 /dev/nvme0n1 /tmp/vm.nvme || fail "mount /dev/nvme0n1: $(dmesg | tail -3)"
echo hello >/tmp/vm.nvme/hello
say "$NVME: controller $(ls "/sys/bus/pci/devices/$NVME/nvme" | tr '\n' ' '); namespaces under it: $(ls -d /sys/bus/pci/devices/$NVME/nvme/*/nvme*n* 2>/dev/null | sed 's|.*/||' | tr '\n' ' '); /dev/nvme0n1 is $(cat /sys/block/nvme0n1/dev), mounted: $(grep nvme0n1 /proc/mounts)"
note "== nvme $NVME: block: $(readlink -f /sys/block/nvme0n1); mount: $(grep nvme0n1 /proc/mounts)"
# Where the disks sit: the function's hidden path disk and the mounted head.
note "-- under the function: $(cd /sys/bus/pci/devices/$NVME && find nvme -maxdepth 3 -name 'nvme*' | tr '\n' ' ')"
note "-- class/block: $(for b in /sys/class/block/nvme*; do printf '%s -> %s; ' "${b##*/}" "$(readlink "$b")"; done)"
note "-- nvme-subsystem: $(for d in /sys/class/nvme-subsystem/*/*; do printf '%s -> %s; ' "${d#/sys/class/nvme-subsystem/}" "$(readlink "$d")"; done 2>/dev/null)"
note "-- controller nvme0: $(ls /sys/bus/pci/devices/$NVME/nvme/nvme0 | tr '\n' ' ')"
note "-- nvme0n1/multipath (6.14+): $(ls /sys/class/block/nvme0n1/multipath 2>&1 | tr '\n' ' '); nvme0c0n1 dev: $(cat /sys/class/block/nvme0c0n1/dev 2>&1); hidden: $(cat /sys/class/block/nvme0c0n1/hidden 2>&1)"
umount /tmp/vm.nvme
exit 0
