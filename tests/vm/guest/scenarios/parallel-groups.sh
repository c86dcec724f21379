# parallel-groups: binds of three devices in three IOMMU groups (e1000e, edu,
# bochs-display) sent at the same time all end on vfio-pci; unbinds at the
# same time give each its own driver back (e1000e, none, bochs-drm).
. /vm/lib.sh
vfiod_start
NIC=$(dev_under "$PORT_nic0")
EDU=$(dev_under "$PORT_edu0")
GPU=$(dev_under "$PORT_gpu0")
has_driver "$NIC" e1000e && has_driver "$EDU" none && has_driver "$GPU" bochs-drm ||
    fail "precondition: $NIC on $(drv "$NIC"), $EDU on $(drv "$EDU"), $GPU on $(drv "$GPU")"
vc_ok register "$NIC" --name nic0
vc_ok register "$EDU" --name edu0
vc_ok register "$GPU" --name gpu0
# Binds on different IOMMU groups at the same time, then unbinds.
pids=
for n in nic0 edu0 gpu0; do vfioctl --socket $SOCK --json bind $n >/tmp/vm.par.$n 2>&1 & pids="$pids $!"; done
wait $pids
for a in $NIC $EDU $GPU; do has_driver "$a" vfio-pci || fail "parallel bind: $a on $(drv "$a"): $(cat /tmp/vm.par.*)"; done
pids=
for n in nic0 edu0 gpu0; do vfioctl --socket $SOCK --json unbind $n >/tmp/vm.par.$n 2>&1 & pids="$pids $!"; done
wait $pids
has_driver "$NIC" e1000e && has_driver "$EDU" none && has_driver "$GPU" bochs-drm ||
    fail "parallel unbind: $NIC on $(drv "$NIC"), $EDU on $(drv "$EDU"), $GPU on $(drv "$GPU"): $(cat /tmp/vm.par.*)"
exit 0
