# modules-missing: vfio-pci not loaded. Without --load-modules a bind fails with a clear
# 503 vfio_unavailable and changes nothing, and health says so; with
# --load-modules vfiod loads the module itself (modprobe) and binds.
. /vm/lib.sh
EDU=$(dev_under "$PORT_edu0")
NIC=$(dev_under "$PORT_nic0")
# Unload vfio-pci (nothing is bound to it at this point).
modprobe -r vfio-pci 2>/dev/null || rmmod vfio-pci 2>/dev/null || rmmod vfio_pci 2>/dev/null
[ -e /sys/bus/pci/drivers/vfio-pci ] && fail "could not unload vfio-pci"
vfiod_start
vc_ok health
jload
[ "$J_vfio_pci_available" = false ] || fail "health says vfio_pci_available=$J_vfio_pci_available with the module unloaded"
vc_ok register "$NIC" --name nic0
vc_err vfio_unavailable bind nic0
say "without --load-modules: $ERR"
has_driver "$NIC" e1000e || fail "a refused bind moved $NIC to $(drv "$NIC")"
ov=$(cat /sys/bus/pci/devices/$NIC/driver_override)
[ "$ov" = "(null)" ] || [ -z "$ov" ] || fail "a refused bind left driver_override '$ov'"
vfiod_stop

vfiod_start --load-modules
vc_ok bind nic0
[ -e /sys/bus/pci/drivers/vfio-pci ] || fail "bind succeeded but vfio-pci is not loaded"
has_driver "$NIC" vfio-pci || fail "bind with --load-modules: kernel has $NIC on $(drv "$NIC")"
vfio_node "$NIC" || fail "bind with --load-modules: no /dev/vfio/$(grp "$NIC")"
vc_ok health
jload
[ "$J_vfio_pci_available" = true ] || fail "health says vfio_pci_available=$J_vfio_pci_available after loading"
vc_ok unbind nic0
has_driver "$NIC" e1000e || fail "unbind: $NIC on $(drv "$NIC")"

# The original driver's module is gone when the device is given back.
vc_ok bind nic0
rmmod e1000e || fail "could not unload e1000e"
if vc unbind nic0; then
    fail "unbind answered success with e1000e unloaded (kernel: $NIC on $(drv "$NIC")): $OUT"
fi
say "unbind with e1000e unloaded: rc=$RC $ERR; kernel: $(drv "$NIC"), override '$(cat /sys/bus/pci/devices/$NIC/driver_override)'"
vc_ok show nic0
jload
k=$(drv "$NIC"); [ "$k" = none ] && k=null
[ "$J_current_driver" = "$k" ] || fail "after the failed unbind vfiod says current_driver=$J_current_driver, the kernel $(drv "$NIC")"
modprobe e1000e
if has_driver "$NIC" e1000e; then
    say "note: loading e1000e picked the device up by itself (override was '$(cat /sys/bus/pci/devices/$NIC/driver_override)')"
fi
if ! has_driver "$NIC" e1000e; then vc_ok unbind nic0; fi
has_driver "$NIC" e1000e || fail "with e1000e back, unbind left $NIC on $(drv "$NIC")"
vc_ok show nic0
jload
[ "$J_current_driver" = e1000e ] && [ "$J_bound_to_vfio" = false ] || fail "vfiod: current_driver=$J_current_driver bound_to_vfio=$J_bound_to_vfio"
exit 0
