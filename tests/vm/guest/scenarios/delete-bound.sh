# delete-bound: deleting the registration of a device vfiod bound to vfio-pci
# gives its driver back first (the API: "Unregister a device, giving back a
# driver vfiod took"): the e1000e returns to e1000e with its netdev, the edu
# to no driver, and neither is in the registry afterwards.
. /vm/lib.sh
vfiod_start
NIC=$(dev_under "$PORT_nic0")
EDU=$(dev_under "$PORT_edu0")
has_driver "$NIC" e1000e && has_driver "$EDU" none ||
    fail "precondition: $NIC on $(drv "$NIC"), $EDU on $(drv "$EDU")"
vc_ok register "$NIC" --name nic0
vc_ok register "$EDU" --name edu0
for n in nic0 edu0; do
    vc_ok bind $n
done
has_driver "$NIC" vfio-pci && has_driver "$EDU" vfio-pci ||
    fail "bind: $NIC on $(drv "$NIC"), $EDU on $(drv "$EDU")"
vc_ok delete nic0
say "delete of the vfio-bound nic0: kernel then has $NIC on $(drv "$NIC")"
has_driver "$NIC" e1000e || fail "delete nic0 (vfio-bound): kernel has $NIC on $(drv "$NIC"), expected e1000e back"
wait_until 5 has_netdev "$NIC" || fail "delete nic0: no netdev after the give-back"
[ -z "$(override_of "$NIC")" ] || fail "delete nic0: driver_override left as '$(override_of "$NIC")'"
vc_ok delete edu0
say "delete of the vfio-bound edu0: kernel then has $EDU on $(drv "$EDU")"
has_driver "$EDU" none || fail "delete edu0 (vfio-bound): kernel has $EDU on $(drv "$EDU"), it had no driver"
vc_err not_found show nic0
vc_err not_found show edu0
exit 0
