# kubelet: vfiod-kubelet-plugin allocates the e1000e on a real kernel. A
# minimal kubelet (kubelet-standin, from kubelet-plugin/examples) serves
# Registration, dials the plugin's endpoint and allocates nic0; the kernel
# must then have the NIC on vfio-pci, vfiod must have it attached to the
# allocation, and every host path in the DeviceSpecs must be a device node.
# Then the stand-in's PodResources API says the pod has ended: the plugin
# must release nic0 (detached, still on vfio-pci) and vfiod reset it.
. /vm/lib.sh
[ -x /usr/bin/vfiod-kubelet-plugin ] && [ -x /usr/bin/kubelet-standin ] ||
    fail "vfiod-kubelet-plugin or kubelet-standin is not in the guest (cargo build --release -p vfiod-kubelet-plugin --bins --examples)"
vfiod_start

NIC=$(dev_under "$PORT_nic0")
G=$(grp "$NIC")
has_driver "$NIC" e1000e || fail "precondition: $NIC is on $(drv "$NIC")"
vc_ok register "$NIC" --name nic0 --tag resource=intel.com/e1000e

DIR=/tmp/device-plugins
mkdir -p $DIR
PODRES=/tmp/pod-resources.sock
# The pod holds nic0 for 10 s (the checks below run meanwhile), then ends.
kubelet-standin $DIR intel.com/e1000e nic0 --pod-resources $PODRES 10000 >/tmp/standin.out 2>/tmp/standin.err &
STANDIN=$!
wait_until 20 test -S $DIR/kubelet.sock || fail "the stand-in did not serve kubelet.sock: $(cat /tmp/standin.err)"
vfiod-kubelet-plugin --vfiod-socket $SOCK --plugin-dir $DIR \
    --pod-resources-socket $PODRES --release-interval-ms 200 --release-grace-ms 1000 >/tmp/plugin.log 2>&1 &
PLUGIN=$!
standin_done() { grep -q '^pod_running' /tmp/standin.out || ! kill -0 $STANDIN 2>/dev/null; }
wait_until 60 standin_done || fail "no allocation within 60 s: $(cat /tmp/standin.err)"
while read -r line; do say "kubelet saw: $line"; done </tmp/standin.out
if ! grep -q '^pod_running' /tmp/standin.out; then
    wait $STANDIN
    rc=$?
    cp /tmp/plugin.log "$OUTDIR/$VM_SCENARIO.plugin.log" 2>/dev/null
    fail "allocation failed (rc=$rc): $(cat /tmp/standin.err) $(grep '^error' /tmp/standin.out); plugin: $(tail -5 /tmp/plugin.log)"
fi

grep -qx "list nic0 Healthy" /tmp/standin.out || fail "ListAndWatch did not list nic0 Healthy"
grep -qx "env PCI_RESOURCE_INTEL_COM_E1000E=$NIC" /tmp/standin.out || fail "no PCI_RESOURCE_INTEL_COM_E1000E=$NIC"
grep -qx "spec /dev/vfio/vfio /dev/vfio/vfio mrw" /tmp/standin.out || fail "no DeviceSpec for /dev/vfio/vfio"
grep -qx "spec /dev/vfio/$G /dev/vfio/$G mrw" /tmp/standin.out || fail "no DeviceSpec for /dev/vfio/$G"
for host in $(awk '$1 == "spec" { print $3 }' /tmp/standin.out); do
    [ -c "$host" ] || fail "DeviceSpec host path $host is not a character device"
done
has_driver "$NIC" vfio-pci || fail "after Allocate the kernel has $NIC on $(drv "$NIC")"
vfio_node "$NIC" || fail "/dev/vfio/$G does not exist after Allocate"
vc_ok show nic0
case $(jget .attached_to) in
    kubelet:intel.com/e1000e:*:nic0) ;;
    *) fail "nic0 is attached to '$(jget .attached_to)', not to the allocation" ;;
esac
metric kubelet_allocate_ms "$(awk '$1 == "allocate_ms" { print $2 }' /tmp/standin.out)" ms "Allocate of the e1000e through the plugin: bind to vfio-pci + attach"
grep -q '^pod_ended' /tmp/standin.out && fail "the stand-in's pod ended before the checks were done (raise its hold time)"
[ "$(jget .attached_to)" != null ] || fail "nic0 was released while its pod runs"

# The pod ends: the plugin releases nic0 and vfiod resets it on release.
wait_until 30 grep -q '^pod_ended' /tmp/standin.out || fail "the stand-in's pod did not end"
ENDED_MS=$(awk '$1 == "pod_ended" { print $2 }' /tmp/standin.out)
released() { vc show nic0 && [ "$(jget .attached_to)" = null ] && [ "$(jget .last_reset)" != null ]; }
wait_until 20 released || fail "nic0 not released and reset 20 s after its pod ended: $(echo "$OUT" | jq -c '{attached_to, last_reset, health}'); plugin: $(tail -5 /tmp/plugin.log)"
NOW_MS=$(vmtool now | sed 's/\.\([0-9][0-9][0-9]\).*/\1/')
[ "$(jget .last_reset.result)" = ok ] || fail "the reset on release failed: $(echo "$OUT" | jq -c .last_reset)"
[ "$(jget .health)" = ok ] || fail "health after the release: $(jget .health) ($(jget .health_reason))"
has_driver "$NIC" vfio-pci || fail "after the release the kernel has $NIC on $(drv "$NIC")"
grep -q 'no pod holds it' /tmp/plugin.log || fail "the plugin did not log the release"
say "released: $(echo "$OUT" | jq -c '{attached_to, health, last_reset}')"
metric kubelet_release_ms "$((NOW_MS - ENDED_MS))" ms "pod ended -> nic0 detached and reset (200 ms release interval; upper bound, polled)"
kill $STANDIN 2>/dev/null
cp /tmp/plugin.log "$OUTDIR/$VM_SCENARIO.plugin.log" 2>/dev/null

kill -TERM $PLUGIN
wait $PLUGIN || fail "the plugin did not exit cleanly on SIGTERM: $(tail -5 /tmp/plugin.log)"
exit 0
