# kubelet: vfiod-kubelet-plugin allocates the e1000e on a real kernel. A
# minimal kubelet (kubelet-standin, from kubelet-plugin/examples) serves
# Registration, dials the plugin's endpoint and allocates nic0; the kernel
# must then have the NIC on vfio-pci, vfiod must have it attached to the
# allocation, and every host path in the DeviceSpecs must be a device node.
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
kubelet-standin $DIR intel.com/e1000e nic0 >/tmp/standin.out 2>/tmp/standin.err &
STANDIN=$!
wait_until 20 test -S $DIR/kubelet.sock || fail "the stand-in did not serve kubelet.sock: $(cat /tmp/standin.err)"
vfiod-kubelet-plugin --vfiod-socket $SOCK --plugin-dir $DIR >/tmp/plugin.log 2>&1 &
PLUGIN=$!
wait $STANDIN
rc=$?
cp /tmp/plugin.log "$OUTDIR/$VM_SCENARIO.plugin.log" 2>/dev/null
while read -r line; do say "kubelet saw: $line"; done </tmp/standin.out
[ $rc = 0 ] || fail "allocation failed (rc=$rc): $(cat /tmp/standin.err) $(grep '^error' /tmp/standin.out); plugin: $(tail -5 /tmp/plugin.log)"

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

kill -TERM $PLUGIN
wait $PLUGIN || fail "the plugin did not exit cleanly on SIGTERM: $(tail -5 /tmp/plugin.log)"
exit 0
