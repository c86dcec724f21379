# sriov: VFs that vfiod makes, keeps and hands out, on a real kernel (issue 19).
# vm-boot: sriov
#
# The igb behind a plain root port (igb0, 7 VFs at most), with igbvf loaded
# beforehand (a real host's udev loads it from the VF's modalias), so a VF
# that a host driver could probe would be probed:
#   a. PUT num_vfs 4: 4 VFs registered (parent, vf_index), each on vfio-pci
#      (the kernel's driver link), in 4 distinct IOMMU groups; autoprobe 0;
#      no VF ever on igbvf, no igbvf probe line in the kernel log, no new
#      netdev; PUT -> all 4 on vfio-pci measured;
#   b. one VF attached to uid 1000 with the pid of a sleeping process:
#      PUT 2 -> 409 vfs_in_use naming that VF, the kernel still has 4;
#   c. after the detach (the VF is not given to igbvf), PUT 2 -> 200, 2 VFs
#      on vfio-pci;
#   d. sriov_numvfs 0 written behind vfiod's back (it drops the VF records),
#      vfiod restarted: it makes the 2 again, on vfio-pci, registered;
#   e. PUT 8 -> 400 invalid_vf_count (total 7); DELETE of the PF with a VF
#      attached -> 409 pf_has_vfs; after the detach, DELETE of the PF: no
#      VFs (sriov_numvfs 0), no VF records, autoprobe 1 again;
#   f. the igb behind the root port without ACS: its VFs share the root
#      port's and the PF's group, so PUT num_vfs 2 leaves them off vfio
#      (warnings), a bind of a VF is refused (409 iommu_group_conflict naming
#      the PF; with_group 409 pf_has_vfs), and the PF stays on igb;
#   g. control: with vf_driver native (autoprobe stays on) igbvf does probe
#      a VF and a netdev appears, so the checks of a. can fail.
# Each refusal's code and message goes to the console and out/sriov.refusals.txt.
. /vm/lib.sh
need_vfiod
[ "${VM_BOOT_FLAVOUR:-}" = sriov ] && [ -n "${PORT_igbnoacs:-}" ] ||
    fail "needs the sriov boot flavour (harness.py FLAVOURS), not '${VM_BOOT_FLAVOUR:-standard}'"
PF=$(dev_under "$PORT_igb0") || fail "no igb behind $PORT_igb0"
PFA=$(dev_under "$PORT_igbnoacs") || fail "no igb behind $PORT_igbnoacs"
PFN=$(dev_under "$PORT_igbnuma") || fail "no igb behind $PORT_igbnuma"
REFUSALS=$OUTDIR/sriov.refusals.txt
: >$REFUSALS

# The boot flavour, as the claims scenario will rely on it.
say "NUMA nodes: $(ls -d /sys/devices/system/node/node* | xargs -n1 basename | tr '\n' ' ')"
[ -d /sys/devices/system/node/node1 ] || fail "the sriov boot has no NUMA node 1"
[ "$(attr "$PFN" numa_node)" = 1 ] || fail "igb $PFN behind the pxb-pcie has numa_node $(attr "$PFN" numa_node), not 1"
say "igb behind the expander: $PFN numa_node 1; igb0 $PF numa_node $(attr "$PF" numa_node)"
[ "$(grp "$PFA")" = "$(grp "$PORT_igbnoacs")" ] ||
    fail "without ACS the root port $PORT_igbnoacs (group $(grp "$PORT_igbnoacs")) and the igb $PFA (group $(grp "$PFA")) should share a group"
for p in "$PF" "$PFA" "$PFN"; do
    has_driver "$p" igb || fail "precondition: $p on $(drv "$p"), not igb"
    [ "$(attr "$p" sriov_numvfs)" = 0 ] && [ "$(attr "$p" sriov_drivers_autoprobe)" = 1 ] ||
        fail "precondition: $p has sriov_numvfs $(attr "$p" sriov_numvfs), autoprobe $(attr "$p" sriov_drivers_autoprobe)"
done
[ "$(attr "$PF" sriov_totalvfs)" = 7 ] || fail "igb0 sriov_totalvfs is $(attr "$PF" sriov_totalvfs), not 7"

# What a real host has: the VF driver loaded (udev loads it from the VF's
# modalias whatever autoprobe says). Only autoprobe 0 keeps it off the VFs.
modprobe igbvf || fail "cannot load igbvf"
NETS0=$(ls /sys/class/net | sort | tr '\n' ' ')
igbvf_probed() { # the kernel log has a line of igbvf about a device
    dmesg | grep -q 'igbvf [0-9a-f]\{4\}:'
}
igbvf_devices() { ls /sys/bus/pci/drivers/igbvf 2>/dev/null | grep '^[0-9a-f]\{4\}:' | tr '\n' ' '; }
igbvf_probed && fail "igbvf probed a device before any VF existed: $(dmesg | grep igbvf)"
say "igbvf loaded; netdevs: $NETS0"

# refused CODE HTTP WHAT: the last api call failed with that code and
# status; its code and message are printed and kept for the closing note.
refused() {
    local code
    code=$(printf '%s' "$ERR" | jq -r .code 2>/dev/null)
    [ "$RC" != 0 ] && [ "$code" = "$1" ] && [ "$STATUS" = "$2" ] ||
        fail "$3: expected $2 $1, got rc=$RC status=$STATUS: $OUT $ERR"
    say "refused: $3 -> $STATUS $code: $(printf '%s' "$ERR" | jq -r .message)"
    printf '%s\t%s %s\t%s\n' "$3" "$STATUS" "$code" "$(printf '%s' "$ERR" | jq -c 'del(.code)')" >>$REFUSALS
}
# The VFs of PF, by index (virtfn0..virtfn6: one digit on the igb).
vfs_of() { ls -d "/sys/bus/pci/devices/$1"/virtfn* 2>/dev/null | while read -r l; do basename "$(readlink "$l")"; done | tr '\n' ' '; }
all_on() { # DRIVER ADDR...: every ADDR is on DRIVER
    local d=$1 a
    shift
    for a in "$@"; do has_driver "$a" "$d" || return 1; done
}
# vf_records PF-ID: "index address name" of every registered VF of PF-ID, by index.
vf_records() {
    vc_ok list
    printf '%s' "$OUT" | jq -r --arg p "$1" '[.[] | select(.parent == $p)] | sort_by(.vf_index) | .[] | "\(.vf_index) \(.pci_address) \(.name)"'
}
# check_vfs PF PF-ID PF-NAME N: the kernel has N VFs, each on vfio-pci in a
# group of its own with /dev/vfio/N, registered as PF-NAME-vfI with parent
# PF-ID and vf_index I; no igbvf anywhere.
check_vfs() {
    local pf=$1 id=$2 name=$3 n=$4 vfs i=0 a groups= g want got
    [ "$(attr "$pf" sriov_numvfs)" = "$n" ] || fail "$name: sriov_numvfs is $(attr "$pf" sriov_numvfs), not $n"
    vfs=$(vfs_of "$pf")
    set -- $vfs
    [ $# = "$n" ] || fail "$name: $# virtfn links ($vfs), not $n"
    want=
    for a in $vfs; do
        has_driver "$a" vfio-pci || fail "$name VF $i ($a) on $(drv "$a"), not vfio-pci"
        vfio_node "$a" || fail "$name VF $i ($a): no /dev/vfio/$(grp "$a")"
        g=$(grp "$a")
        [ "$g" != "$(grp "$pf")" ] || fail "$name VF $i ($a) shares the PF's group $g"
        case " $groups " in *" $g "*) fail "$name VF $i ($a) shares group $g with another VF" ;; esac
        groups="$groups $g"
        want="$want$i $a $name-vf$i
"
        i=$((i + 1))
    done
    bad=$(vc_ok list; printf '%s' "$OUT" | jq -r --arg p "$id" '.[] | select(.parent == $p and .health != "ok") | "\(.name) \(.health) (\(.health_reason))"')
    [ -z "$bad" ] || fail "$name: VF records not healthy: $bad (VF config space starts $(od -An -tx1 -N4 "/sys/bus/pci/devices/${vfs%% *}/config"), as the SR-IOV spec has it)"
    got=$(vf_records "$id")
    [ "$got" = "$(printf '%s' "$want")" ] || fail "$name: VF records [$got], the kernel's VFs [$want]"
    [ -z "$(igbvf_devices)" ] || fail "igbvf has $(igbvf_devices)"
    igbvf_probed && fail "igbvf probed a VF: $(dmesg | grep 'igbvf [0-9a-f]')"
    say "$name: $n VFs [$vfs] on vfio-pci, groups [$groups ], registered"
}
put_vfs() { # NAME N [VF_DRIVER]
    api PUT "/devices/$1/sriov" "{\"num_vfs\": $2${3:+, \"vf_driver\": \"$3\"}}"
}

vfiod_start
events_start
vc_ok register "$PF" --name igb0
PFID=$(jget .id)

# --- a. 4 VFs straight onto vfio-pci ------------------------------------------
mark p0
put_vfs igb0 4 || fail "PUT igb0 num_vfs 4: status $STATUS $ERR"
mark p1
PUT_OUT=$OUT
VFS=$(vfs_of "$PF")
wait_until 10 all_on vfio-pci $VFS || fail "VFs [$VFS] not all on vfio-pci 10 s after the PUT answered"
mark p2
jload "$PUT_OUT"
[ "$J_num_vfs" = 4 ] && [ "$J_desired_vfs" = 4 ] && [ "$J_total_vfs" = 7 ] && [ "$J_vf_driver" = vfio-pci ] ||
    fail "PUT answered num_vfs=$J_num_vfs desired_vfs=$J_desired_vfs total_vfs=$J_total_vfs vf_driver=$J_vf_driver"
[ "$(printf '%s' "$PUT_OUT" | jq '.warnings // [] | length')" = 0 ] || fail "PUT 4 warned: $(printf '%s' "$PUT_OUT" | jq -c .warnings)"
check_vfs "$PF" "$PFID" igb0 4
[ "$(attr "$PF" sriov_drivers_autoprobe)" = 0 ] || fail "autoprobe is $(attr "$PF" sriov_drivers_autoprobe) with VFs made, not 0"
[ "$(ls /sys/class/net | sort | tr '\n' ' ')" = "$NETS0" ] || fail "netdevs before [$NETS0], now [$(ls /sys/class/net | tr '\n' ' ')]"
wait_until 5 has_event sriov_changed "$PF" || fail "no sriov_changed event for $PF"
for a in $VFS; do has_event registered "$a" || fail "no registered event for VF $a"; done
api_ok GET /devices/igb0/sriov
say "GET sriov: $(printf '%s' "$OUT" | jq -c '{total_vfs, num_vfs, desired_vfs, vf_device_id, vf_driver, drivers_autoprobe}')"
metric sriov_put4_answer_ms "$(mark_ms p0 p1)" ms "PUT num_vfs 4 -> answer (vmtool http)"
metric sriov_put4_vfio_ms "$(mark_ms p0 p2)" ms "PUT num_vfs 4 -> all 4 VFs on vfio-pci (kernel driver link)"
set -- $VFS
VF0=$1 VF1=$2

# --- b. a VF in use: the count stays ------------------------------------------
vmtool runas 1000 1000 - sleep 600 &
SLEEPER=$!
wait_until 10 eval 'grep -q "^Uid:[[:space:]]*1000[[:space:]]" /proc/$SLEEPER/status' || fail "sleeper $SLEEPER is not uid 1000"
vc_ok attach igb0-vf1 vm-sriov --uid 1000 --pid "$SLEEPER"
put_vfs igb0 2
refused vfs_in_use 409 "PUT igb0 num_vfs 2 while igb0-vf1 is attached"
printf '%s' "$ERR" | jq -e --arg a "$VF1" '[.conflicting_functions[]?.pci_address] == [$a]' >/dev/null ||
    fail "vfs_in_use does not name exactly $VF1: $ERR"
check_vfs "$PF" "$PFID" igb0 4

# --- c. detached: 2 -----------------------------------------------------------
vc_ok detach igb0-vf1
kill "$SLEEPER"; wait "$SLEEPER" 2>/dev/null
vc_ok show igb0-vf1
say "after detach igb0-vf1 ($VF1) is on $(drv "$VF1"), health $(jget .health)"
has_driver "$VF1" igbvf && fail "detach gave $VF1 to igbvf"
[ "$(jget .health)" = ok ] ||
    fail "igb0-vf1 after detach (reset on release): health $(jget .health) ($(jget .health_reason)); its config space starts $(od -An -tx1 -N4 "/sys/bus/pci/devices/$VF1/config") (a VF's Vendor ID reads ffff by the SR-IOV spec)"
put_vfs igb0 2 || fail "PUT igb0 num_vfs 2 after the detach: status $STATUS $ERR"
check_vfs "$PF" "$PFID" igb0 2
[ "$(attr "$PF" sriov_drivers_autoprobe)" = 0 ] || fail "autoprobe $(attr "$PF" sriov_drivers_autoprobe) after 4 -> 2"

# --- d. the count reset behind vfiod's back; a restart makes it again ---------
pci_write 0 "devices/$PF/sriov_numvfs"
[ -z "$(vfs_of "$PF")" ] || fail "sriov_numvfs 0 left VFs: $(vfs_of "$PF")"
wait_until 10 eval '[ -z "$(vf_records "$PFID")" ]' || fail "vfiod kept VF records of VFs that are gone: $(vf_records "$PFID")"
say "records follow the kernel: no VF records; sriov_numvfs stays $(attr "$PF" sriov_numvfs) while vfiod runs"
vfiod_stop
mark r0
vfiod_start
mark r1
check_vfs "$PF" "$PFID" igb0 2
metric sriov_restart_remake_ms "$(mark_ms r0 r1)" ms "vfiod start (2 VFs to make and bind) -> ready"

# --- e. refusals; DELETE of the PF --------------------------------------------
put_vfs igb0 8
refused invalid_vf_count 400 "PUT igb0 num_vfs 8"
printf '%s' "$ERR" | jq -r .message | grep -qw 7 || fail "invalid_vf_count does not say the total 7: $ERR"
check_vfs "$PF" "$PFID" igb0 2
set -- $(vfs_of "$PF")
VF0=$1
vc_ok attach igb0-vf0 vm-sriov2
api DELETE /devices/igb0
refused pf_has_vfs 409 "DELETE igb0 while igb0-vf0 is attached"
printf '%s' "$ERR" | jq -e --arg a "$VF0" '[.conflicting_functions[]?.pci_address] | index($a) != null' >/dev/null ||
    fail "pf_has_vfs does not name $VF0: $ERR"
check_vfs "$PF" "$PFID" igb0 2
vc_ok detach igb0-vf0
api DELETE /devices/igb0 || fail "DELETE igb0 with its VFs free: status $STATUS $ERR"
[ "$STATUS" = 204 ] || fail "DELETE igb0 answered $STATUS"
[ "$(attr "$PF" sriov_numvfs)" = 0 ] && [ -z "$(vfs_of "$PF")" ] || fail "after DELETE igb0 still has VFs: $(vfs_of "$PF")"
[ "$(attr "$PF" sriov_drivers_autoprobe)" = 1 ] || fail "after DELETE igb0 autoprobe is $(attr "$PF" sriov_drivers_autoprobe), not 1"
has_driver "$PF" igb || fail "after DELETE igb0 is on $(drv "$PF")"
vc_ok list
[ "$(printf '%s' "$OUT" | jq 'length')" = 0 ] || fail "records left after DELETE igb0: $(printf '%s' "$OUT" | jq -c '[.[].name]')"
say "DELETE igb0: VFs gone, autoprobe 1, PF on igb; vfiod's log: $(grep 'before unregistering' $VFIOD_LOG | tail -1 | cut -c29-110)"

# --- f. VFs behind a root port without ACS: one group with the PF -------------
vc_ok register "$PFA" --name igbnoacs
PFAID=$(jget .id)
put_vfs igbnoacs 2 || fail "PUT igbnoacs num_vfs 2: status $STATUS $ERR"
say "PUT igbnoacs 2 warnings: $(printf '%s' "$OUT" | jq -c .warnings)"
[ "$(printf '%s' "$OUT" | jq '.warnings // [] | length')" -ge 2 ] || fail "PUT igbnoacs 2: no warning for each VF left off vfio: $OUT"
printf '%s\t%s\t%s\n' "PUT igbnoacs num_vfs 2 (no ACS)" "200 warnings" "$(printf '%s' "$OUT" | jq -c .warnings)" >>$REFUSALS
AVFS=$(vfs_of "$PFA")
set -- $AVFS
[ $# = 2 ] || fail "igbnoacs: VFs [$AVFS]"
AVF0=$1
G=$(grp "$PFA")
for a in $AVFS; do
    [ "$(grp "$a")" = "$G" ] || fail "VF $a is in group $(grp "$a"), not the PF's $G"
    has_driver "$a" none || fail "VF $a of the no-ACS igb is on $(drv "$a"), not left driverless"
done
say "no ACS: group $G = [$(group_members "$G" | tr '\n' ' ')]"
has_driver "$PFA" igb || fail "PUT igbnoacs moved the PF to $(drv "$PFA")"
[ "$(vf_records "$PFAID" | wc -l)" = 2 ] || fail "igbnoacs VF records: $(vf_records "$PFAID")"
uevmon_start
api POST /devices/igbnoacs-vf0/bind '{}'
refused iommu_group_conflict 409 "bind igbnoacs-vf0 (group shared with the PF on igb)"
printf '%s' "$ERR" | jq -e --arg a "$PFA" '[.conflicting_functions[]?.pci_address] | index($a) != null' >/dev/null ||
    fail "iommu_group_conflict does not name the PF $PFA: $ERR"
api POST /devices/igbnoacs-vf0/bind '{"with_group": true}'
refused pf_has_vfs 409 "bind igbnoacs-vf0 with_group"
has_driver "$PFA" igb || fail "the PF $PFA is on $(drv "$PFA") after the refused binds"
for a in $AVFS; do has_driver "$a" none || fail "VF $a on $(drv "$a") after the refused binds"; done
[ -z "$(uevents_of "$PFA")$(uevents_of "$AVF0")" ] || fail "refused binds moved something: $(uevents_of "$PFA") $(uevents_of "$AVF0")"
put_vfs igbnoacs 0 || fail "PUT igbnoacs num_vfs 0: status $STATUS $ERR"
[ "$(attr "$PFA" sriov_numvfs)" = 0 ] && [ "$(attr "$PFA" sriov_drivers_autoprobe)" = 1 ] ||
    fail "igbnoacs after PUT 0: sriov_numvfs $(attr "$PFA" sriov_numvfs), autoprobe $(attr "$PFA" sriov_drivers_autoprobe)"

# --- g. control: autoprobe on lets igbvf take a VF -----------------------------
[ "$(ls /sys/class/net | sort | tr '\n' ' ')" = "$NETS0" ] || fail "netdevs before [$NETS0], now [$(ls /sys/class/net | tr '\n' ' ')]"
igbvf_probed && fail "igbvf probed a VF: $(dmesg | grep 'igbvf [0-9a-f]')"
put_vfs igbnoacs 1 native || fail "PUT igbnoacs num_vfs 1 native: status $STATUS $ERR"
set -- $(vfs_of "$PFA")
wait_until 15 has_driver "$1" igbvf || fail "control: with vf_driver native the VF $1 is on $(drv "$1"), not igbvf: igbvf is no proof here"
wait_until 15 has_netdev "$1" || fail "control: igbvf took $1 but no netdev appeared"
igbvf_probed || fail "control: igbvf took $1 without a kernel log line"
say "control: vf_driver native -> $1 on igbvf, netdev $(netdev_of "$1"): the checks above can fail"
put_vfs igbnoacs 0 || fail "PUT igbnoacs num_vfs 0 after the control: status $STATUS $ERR"
