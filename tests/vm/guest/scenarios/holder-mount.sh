# holder-mount: a disk in use (issue 9). The NVMe's namespace (/dev/nvme0n1; with NVMe
# multipath the PCI function shows it as nvme0c0n1) carries a mounted ext4:
# bind must be refused with 409 device_busy naming the mount (kind mount,
# device, mount_point, fstype), nothing written (no uevent, still on nvme,
# the filesystem still usable); once unmounted, bind and unbind work and the
# data is still there.
. /vm/lib.sh
NVME=$(dev_under "$PORT_nvme0") || fail "no NVMe below $PORT_nvme0"
has_driver "$NVME" nvme || fail "precondition: $NVME is on $(drv "$NVME")"
wait_until 10 test -b /dev/nvme0n1 || fail "no /dev/nvme0n1"
MNT=/tmp/vm.nvme
mkdir -p $MNT
mount -t ext4 /dev/nvme0n1 $MNT || fail "mount /dev/nvme0n1: $(dmesg | tail -2)"
echo "written before the bind" >$MNT/before
sync

vfiod_start
vc_ok register "$NVME" --name disk0
need_holders_api disk0
api GET /devices/disk0/holders
say "holders while mounted: $OUT$ERR"
uevmon_start
mark b0; vc bind disk0; rc=$?; mark b1
[ $rc != 0 ] || fail "bind succeeded with /dev/nvme0n1 mounted on $MNT (kernel: $(drv "$NVME"))"
printf '%s' "$ERR" | jq -e --arg m "$MNT" '.code == "device_busy" and ([.holders[]? | select(.kind == "mount" and .mount_point == $m and (.device | test("nvme0n1")) and .fstype == "ext4")] | length > 0)' >/dev/null ||
    fail "bind refused, but not as 409 device_busy naming the mount of /dev/nvme0n1 on $MNT (ext4): $ERR"
say "refused in $(mark_ms b0 b1) ms: $ERR"
metric holders_mount_refusal_ms "$(mark_ms b0 b1)" ms "vfioctl bind -> 409 device_busy (namespace mounted)"
has_driver "$NVME" nvme || fail "after the refused bind $NVME is on $(drv "$NVME")"
[ -z "$(override_of "$NVME")" ] || fail "the refused bind left driver_override '$(override_of "$NVME")'"
[ -z "$(uevents_of "$NVME")" ] || fail "the refused bind wrote to the kernel: uevents $(uevents_of "$NVME" | tr '\n' ';')"
echo "written after the refusal" >$MNT/after && sync || fail "the filesystem is not writable after the refused bind"
# --with-group and --dry-run see it too.
vc bind disk0 --dry-run
say "dry run while mounted: rc=$RC $OUT$ERR"
holders_of disk0
echo "$OUT" | jq -e --arg m "$MNT" '[.. | objects | select(.kind == "mount" and .mount_point == $m)] | length > 0' >/dev/null ||
    fail "holders disk0 does not list the mount on $MNT: $OUT"
say "holders disk0: $(echo "$OUT" | jq -c .)"

umount $MNT || fail "umount $MNT"
vc_ok bind disk0
has_driver "$NVME" vfio-pci || fail "bind after umount: kernel has $(drv "$NVME")"
[ ! -e /dev/nvme0n1 ] || fail "/dev/nvme0n1 still there while on vfio-pci"
vc_ok unbind disk0
has_driver "$NVME" nvme || fail "unbind: kernel has $(drv "$NVME")"
wait_until 15 test -b /dev/nvme0n1 || fail "/dev/nvme0n1 did not come back"
mount -t ext4 /dev/nvme0n1 $MNT || fail "mount after the round trip: $(dmesg | tail -2)"
[ "$(cat $MNT/before $MNT/after)" = "written before the bind
written after the refusal" ] || fail "data lost: $(cat $MNT/before $MNT/after 2>&1)"
umount $MNT
exit 0
