# bind-driverless: a device with no driver (edu) binds to vfio-pci
# (/dev/vfio/N appears) and unbind leaves it without a driver, as it was.
. /vm/lib.sh
vfiod_start
# A device with no driver (edu): bind, then unbind leaves it without one.
EDU=$(dev_under "$PORT_edu0")
has_driver "$EDU" none || fail "precondition: edu $EDU has driver $(drv "$EDU")"
vc_ok register "$EDU" --name edu0
vc_ok bind edu0
has_driver "$EDU" vfio-pci || fail "edu: bind returned but the driver is $(drv "$EDU")"
vfio_node "$EDU" || fail "edu: /dev/vfio/$(grp "$EDU") missing"
vc_ok unbind edu0
has_driver "$EDU" none || fail "edu: after unbind the driver is $(drv "$EDU"), it had none"
exit 0
