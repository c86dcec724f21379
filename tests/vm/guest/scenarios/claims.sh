# claims: POST /devices/claim on a real kernel with two NUMA nodes (issue 20).
# vm-boot: sriov
#
# igb0 (pcie.0: numa_node -1) and igbnuma (behind the pxb-pcie: numa_node 1)
# registered with {"resource": "vf"}, 2 VFs each (4 candidates):
#   1. each VF's sysfs numa_node: 1 under the expander, -1 on pcie.0;
#   2. a claim with numa_node 1 gets a VF whose sysfs numa_node is 1, on
#      vfio-pci; the same request again is 200 with the same VF, another
#      request under the same instance_id 409 claim_conflict;
#   3. node 1's two VFs claimed: numa required with node 1 -> 409
#      no_capacity naming every VF with its reason (printed); preferred
#      falls back to a VF of igb0;
#   4. all detached (each VF stays on vfio-pci with its /dev/vfio/N, ready
#      for the next VM), 8 claims at once (8 processes released by one gate)
#      for the 4 VFs: exactly 4 x 201 on 4 distinct VFs, 4 x 409
#      no_capacity, the 4 VFs on vfio-pci;
#   5. a claim with uid 1000 and the pid of a sleeping uid-1000 process:
#      before it uid 1000 is refused every VF's /dev/vfio/N; after it uid
#      1000 opens the claimed VF's node and uid 1001 is refused; after the
#      detach uid 1000 is refused again;
#   6. 20 sequential claim+detach cycles: claim latency p50/p99 (metrics).
# Clean-up: VFs back to 0 through the API, both PFs deleted.
. /vm/lib.sh
need_vfiod
[ "${VM_BOOT_FLAVOUR:-}" = sriov ] && [ -n "${PORT_igbnuma:-}" ] ||
    fail "needs the sriov boot flavour (harness.py FLAVOURS), not '${VM_BOOT_FLAVOUR:-standard}'"
PF0=$(dev_under "$PORT_igb0") || fail "no igb behind $PORT_igb0"
PFN=$(dev_under "$PORT_igbnuma") || fail "no igb behind $PORT_igbnuma"
: "${VM_CLAIM_CYCLES:=20}"
for p in "$PF0" "$PFN"; do
    has_driver "$p" igb || fail "precondition: $p on $(drv "$p"), not igb"
    [ "$(attr "$p" sriov_numvfs)" = 0 ] || fail "precondition: $p has sriov_numvfs $(attr "$p" sriov_numvfs)"
done

vfs_of() { ls -d "/sys/bus/pci/devices/$1"/virtfn* 2>/dev/null | while read -r l; do basename "$(readlink "$l")"; done | tr '\n' ' '; }
all_on() { # DRIVER ADDR...
    local d=$1 a
    shift
    for a in "$@"; do has_driver "$a" "$d" || return 1; done
}
# claim INSTANCE [EXTRA-JSON-FIELDS]: POST /devices/claim for the vf pool.
claim() {
    api POST /devices/claim "{\"tags\": {\"resource\": \"vf\"}, \"instance_id\": \"$1\"${2:+, $2}}"
}
code_of() { printf '%s' "$ERR" | jq -r .code 2>/dev/null; }

vfiod_start
api_ok POST /devices "{\"pci_address\": \"$PF0\", \"name\": \"igb0\", \"tags\": {\"resource\": \"vf\"}}"
api_ok POST /devices "{\"pci_address\": \"$PFN\", \"name\": \"igbnuma\", \"tags\": {\"resource\": \"vf\"}}"

# --- 1. 2 VFs on each PF; their NUMA nodes as the kernel has them ------------
for pf in igb0 igbnuma; do
    api PUT "/devices/$pf/sriov" '{"num_vfs": 2}' || fail "PUT $pf num_vfs 2: status $STATUS $ERR"
done
VFS0=$(vfs_of "$PF0")
VFSN=$(vfs_of "$PFN")
ALL="$VFS0 $VFSN"
set -- $ALL
[ $# = 4 ] || fail "expected 4 VFs, the kernel has [$ALL]"
wait_until 10 all_on vfio-pci $ALL || fail "VFs not all on vfio-pci: $(for a in $ALL; do printf '%s=%s ' $a "$(drv $a)"; done)"
for a in $VFSN; do
    [ "$(attr "$a" numa_node)" = 1 ] || fail "VF $a of igbnuma (behind the pxb-pcie) has numa_node $(attr "$a" numa_node), not 1"
done
for a in $VFS0; do
    [ "$(attr "$a" numa_node)" = -1 ] || fail "VF $a of igb0 (pcie.0) has numa_node $(attr "$a" numa_node), not -1"
done
say "VFs: igb0 [$VFS0] numa_node -1; igbnuma [$VFSN] numa_node 1; all on vfio-pci"
api_ok GET '/devices/capacity?tags%5Bresource%5D=vf'
say "capacity: $(printf '%s' "$OUT" | jq -c .resources)"
printf '%s' "$OUT" | jq -e '[.resources[] | select(.resource == "vf") | .total == 4 and .free == 4 and .attached == 0] == [true]' >/dev/null ||
    fail "capacity before any claim: $OUT"

# --- 2. numa_node 1 -> a VF on node 1 ----------------------------------------
claim vm-n1a '"numa_node": 1' || fail "claim numa_node 1: status $STATUS $ERR"
[ "$STATUS" = 201 ] || fail "claim numa_node 1 answered $STATUS, not 201"
jload
A1=$J_pci_address N1=$J_name
case " $VFSN " in *" $A1 "*) ;; *) fail "claim numa_node 1 got $N1 ($A1), not a VF of igbnuma [$VFSN]" ;; esac
[ "$(attr "$A1" numa_node)" = 1 ] || fail "claimed VF $A1 has sysfs numa_node $(attr "$A1" numa_node)"
has_driver "$A1" vfio-pci && vfio_node "$A1" || fail "claimed VF $A1 on $(drv "$A1"), /dev/vfio/$(grp "$A1") $(ls /dev/vfio)"
[ "$J_attached_to" = vm-n1a ] || fail "claimed VF attached_to $J_attached_to"
say "claim numa_node 1 -> $N1 ($A1), sysfs numa_node 1, on vfio-pci, group $(grp "$A1")"
claim vm-n1a '"numa_node": 1' || fail "the same claim again: status $STATUS $ERR"
[ "$STATUS" = 200 ] && [ "$(jget .pci_address)" = "$A1" ] || fail "the same claim again: $STATUS $(jget .pci_address), not 200 $A1"
claim vm-n1a '"numa_node": 0'
[ "$RC" != 0 ] && [ "$STATUS" = 409 ] && [ "$(code_of)" = claim_conflict ] ||
    fail "another request under instance vm-n1a: expected 409 claim_conflict, got $STATUS $OUT $ERR"
say "same request again -> 200 $A1; another under the same instance -> 409 claim_conflict: $(printf '%s' "$ERR" | jq -r .message)"

# --- 3. node 1 exhausted ------------------------------------------------------
claim vm-n1b '"numa_node": 1, "numa": "required"' || fail "second claim numa_node 1 required: status $STATUS $ERR"
A2=$(jget .pci_address)
[ "$A2" != "$A1" ] && [ "$(attr "$A2" numa_node)" = 1 ] || fail "second node-1 claim got $A2 (numa_node $(attr "$A2" numa_node))"
claim vm-n1c '"numa_node": 1, "numa": "required"'
[ "$RC" != 0 ] && [ "$STATUS" = 409 ] && [ "$(code_of)" = no_capacity ] ||
    fail "node 1 exhausted, numa required: expected 409 no_capacity, got $STATUS $OUT $ERR"
say "numa required, node 1 exhausted -> 409 no_capacity: $(printf '%s' "$ERR" | jq -r .message)"
printf '%s' "$ERR" | jq -r '.conflicting_functions[] | "  candidate \(.pci_address): \(.reason)"'
for a in $ALL; do
    why=$(printf '%s' "$ERR" | jq -r --arg a "$a" '.conflicting_functions[] | select(.pci_address == $a) | .reason')
    [ -n "$why" ] || fail "no_capacity does not name VF $a: $ERR"
    case " $VFSN :$why" in
        *" $a "*:*attached*) ;;
        *" $a "*:*) fail "VF $a of node 1 refused for '$why', not for being attached" ;;
        *:*NUMA*) ;;
        *) fail "VF $a of igb0 refused for '$why', not for its NUMA node" ;;
    esac
done
claim vm-pref '"numa_node": 1' || fail "claim numa_node 1 preferred with node 1 full: status $STATUS $ERR"
AP=$(jget .pci_address)
case " $VFS0 " in *" $AP "*) ;; *) fail "preferred claim with node 1 full got $AP, not a VF of igb0 [$VFS0]" ;; esac
say "numa preferred, node 1 full -> $(jget .name) ($AP, numa_node $(attr "$AP" numa_node))"

# --- 4. 8 claims at once for 4 VFs --------------------------------------------
for n in $(vc_ok list; printf '%s' "$OUT" | jq -r '.[] | select(.attached_to != null) | .name'); do
    vc_ok detach "$n"
done
vc_ok list
[ -z "$(printf '%s' "$OUT" | jq -r '.[] | select(.attached_to != null) | .name')" ] || fail "still attached after detach: $OUT"
# VFs made for vfio-pci stay there between VMs (autoprobe 0: no native
# driver would take them anyway).
for a in $ALL; do
    has_driver "$a" vfio-pci && vfio_node "$a" ||
        fail "after the detach VF $a is on $(drv "$a") (/dev/vfio/$(grp "$a") $([ -e "/dev/vfio/$(grp "$a")" ] && echo present || echo absent)), not on vfio-pci"
done
say "all detached: the 4 VFs stay on vfio-pci with their nodes"
PAR=/tmp/vm.claimpar
rm -rf $PAR; mkdir -p $PAR
mkfifo $PAR/gate
exec 4<>$PAR/gate # held read-write: the readers' opens never block
PIDS=
for i in 1 2 3 4 5 6 7 8; do
    VMTOOL_HTTP_STATUS=$PAR/$i.status sh -c 'read go; exec vmtool http "$@"' - \
        $SOCK POST /devices/claim "{\"tags\": {\"resource\": \"vf\"}, \"instance_id\": \"par-$i\"}" \
        <$PAR/gate >$PAR/$i.out 2>$PAR/$i.err &
    PIDS="$PIDS $!"
done
usleep 300000
mark par0
printf 'go\ngo\ngo\ngo\ngo\ngo\ngo\ngo\n' >&4
for p in $PIDS; do wait "$p"; done
mark par1
exec 4>&-
OK=0 NOCAP=0 GOT=
for i in 1 2 3 4 5 6 7 8; do
    s=$(cat $PAR/$i.status 2>/dev/null)
    case $s in
        201) OK=$((OK + 1)); a=$(jq -r .pci_address $PAR/$i.out); GOT="$GOT $a"
             say "  par-$i: 201 $(jq -r .name $PAR/$i.out) ($a)" ;;
        409) c=$(jq -r .code $PAR/$i.err)
             [ "$c" = no_capacity ] || fail "par-$i: 409 $c, not no_capacity: $(cat $PAR/$i.err)"
             NOCAP=$((NOCAP + 1))
             say "  par-$i: 409 no_capacity ($(jq -r '[.conflicting_functions[].reason] | unique | join("; ")' $PAR/$i.err))" ;;
        *) fail "par-$i: status '$s': $(cat $PAR/$i.out $PAR/$i.err)" ;;
    esac
done
DISTINCT=$(echo $GOT | tr ' ' '\n' | sort -u | grep -c .)
[ $OK = 4 ] && [ $NOCAP = 4 ] && [ "$DISTINCT" = 4 ] ||
    fail "8 parallel claims for 4 VFs: $OK x 201 on $DISTINCT distinct VFs [$GOT ], $NOCAP x no_capacity"
all_on vfio-pci $GOT || fail "claimed VFs not all on vfio-pci"
for a in $ALL; do case " $GOT " in *" $a "*) ;; *) fail "VF $a was not handed out [$GOT ]" ;; esac; done
say "8 parallel claims for 4 VFs: 4 x 201 on 4 distinct VFs, 4 x 409 no_capacity, in $(mark_ms par0 par1) ms"
metric claims_parallel_8_ms "$(mark_ms par0 par1)" ms "8 claims at once for 4 VFs -> all answered (4 x 201, 4 x no_capacity)"
api_ok GET '/devices/capacity?tags%5Bresource%5D=vf'
printf '%s' "$OUT" | jq -e '[.resources[] | select(.resource == "vf") | .free == 0 and .attached == 4] == [true]' >/dev/null ||
    fail "capacity with all 4 claimed: $OUT"
for i in 1 2 3 4 5 6 7 8; do
    [ "$(cat $PAR/$i.status)" = 201 ] && vc_ok detach "$(jq -r .name $PAR/$i.out)"
done

# --- 5. the uid's grant --------------------------------------------------------
vmtool runas 1000 1000 - sleep 600 &
SLEEPER=$!
wait_until 10 eval 'grep -q "^Uid:[[:space:]]*1000[[:space:]]" /proc/$SLEEPER/status' || fail "sleeper $SLEEPER is not uid 1000"
for a in $ALL; do
    has_driver "$a" vfio-pci && vfio_node "$a" || fail "before the uid claim VF $a is on $(drv "$a") without its node"
    uid_can_open 1000 "/dev/vfio/$(grp "$a")"
    [ $? = 1 ] || fail "before the claim uid 1000 is not refused /dev/vfio/$(grp "$a") of $a: $OPEN_ERR"
done
say "before the claim uid 1000 is refused all 4 VF nodes"
claim vm-uid "\"uid\": 1000, \"pid\": $SLEEPER" || fail "claim uid 1000 pid $SLEEPER: status $STATUS $ERR"
jload
AU=$J_pci_address NU=$J_name NODE=/dev/vfio/$(grp "$AU")
[ "$J_attached_uid" = 1000 ] && [ "$J_attached_pid" = "$SLEEPER" ] || fail "claim answered attached_uid $J_attached_uid attached_pid $J_attached_pid"
uid_can_open 1000 $NODE || fail "uid 1000 cannot open $NODE of its claimed VF $NU ($AU): $OPEN_ERR (ACL: $(acl_of $NODE))"
uid_can_open 1001 $NODE
[ $? = 1 ] || fail "uid 1001 is not refused $NODE: $OPEN_ERR (ACL: $(acl_of $NODE))"
say "claim uid 1000 -> $NU ($AU): uid 1000 opens $NODE, uid 1001 refused; ACL: $(acl_of $NODE)"
vc_ok detach "$NU"
has_driver "$AU" vfio-pci && [ -c $NODE ] || fail "after the detach $AU is on $(drv "$AU"), $NODE $(ls -l $NODE 2>&1)"
uid_can_open 1000 $NODE
[ $? = 1 ] || fail "after the detach uid 1000 is not refused $NODE: $OPEN_ERR (ACL: $(acl_of $NODE))"
say "after the detach $AU stays on vfio-pci and uid 1000 is refused $NODE again; ACL: $(acl_of $NODE)"
kill "$SLEEPER"; wait "$SLEEPER" 2>/dev/null

# --- 6. claim latency ------------------------------------------------------------
i=0
while [ $i -lt "$VM_CLAIM_CYCLES" ]; do
    i=$((i + 1))
    mark lc0.$i
    claim "lat-$i" '"numa_node": 1, "uid": 1000'
    mark lc1.$i
    [ "$STATUS" = 201 ] || fail "latency cycle $i: claim answered $STATUS $ERR"
    has_driver "$(jget .pci_address)" vfio-pci || fail "latency cycle $i: claimed VF on $(drv "$(jget .pci_address)")"
    vc_ok detach "$(jget .name)"
done
# lat_of PREFIX: the sorted milliseconds between the marks PREFIX0.i and
# PREFIX1.i (one dmesg read: no fork between a claim's marks).
lat_of() {
    dmesg | sed -n "s/.*\[ *\([0-9.]*\)\] vmmark $1\([01]\)\.\([0-9]*\)\$/\3 \2 \1/p" |
        awk '{t[$1 "_" $2] = $3} END {for (k = 1; (k "_0") in t; k++) if ((k "_1") in t) printf "%.1f\n", (t[k "_1"] - t[k "_0"]) * 1000}' | sort -n
}
p50() { awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
p99() { awk '{v[NR] = $1} END {i = int(NR * 0.99); if (i < NR * 0.99) i++; print v[i]}'; }
LAT=$(lat_of lc)
NLAT=$(echo "$LAT" | grep -c .)
[ "$NLAT" = "$VM_CLAIM_CYCLES" ] || fail "latency: $NLAT intervals from the kernel log, not $VM_CLAIM_CYCLES"
say "claim latencies (ms, sorted): $(echo $LAT)"
metric claim_p50_ms "$(echo "$LAT" | p50)" ms "POST /devices/claim (numa_node 1, uid 1000) -> 201, VF already on vfio-pci (pick, record, grant), client process start included; $NLAT cycles with detach between"
metric claim_p99_ms "$(echo "$LAT" | p99)" ms "the same, p99 (nearest rank of $NLAT)"

# --- clean-up: VFs to 0 through the API, PFs deleted ------------------------------
for pf in igb0 igbnuma; do
    api PUT "/devices/$pf/sriov" '{"num_vfs": 0}' || fail "PUT $pf num_vfs 0: status $STATUS $ERR"
    api DELETE "/devices/$pf" || fail "DELETE $pf: status $STATUS $ERR"
done
for p in "$PF0" "$PFN"; do
    [ "$(attr "$p" sriov_numvfs)" = 0 ] && [ -z "$(vfs_of "$p")" ] || fail "after clean-up $p has VFs: $(vfs_of "$p")"
    [ "$(attr "$p" sriov_drivers_autoprobe)" = 1 ] || fail "after clean-up $p autoprobe $(attr "$p" sriov_drivers_autoprobe)"
    has_driver "$p" igb || fail "after clean-up $p is on $(drv "$p")"
done
vc_ok list
[ "$(jget 'length')" = 0 ] || fail "records left: $(jget '[.[].name]')"
say "clean: VFs 0, PFs on igb, autoprobe 1, no records"
