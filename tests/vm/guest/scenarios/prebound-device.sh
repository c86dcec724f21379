# prebound-device: a device that was on vfio-pci before vfiod saw it
# (virtio-rng moved by hand) registers as bound_to_vfio, and vfiod's unbind
# never moves it off vfio-pci: vfiod gives back only what it took.
. /vm/lib.sh
vfiod_start
# A device that was on vfio-pci before vfiod saw it stays there on unbind.
RNG=$(dev_under "$PORT_rng0")
sysfs_to_vfio "$RNG"
has_driver "$RNG" vfio-pci || fail "precondition: could not put $RNG on vfio-pci by hand"
vc_ok register "$RNG" --name rng0
[ "$(jget .bound_to_vfio)" = true ] || fail "rng0 registered while on vfio-pci but bound_to_vfio=$(jget .bound_to_vfio)"
if vc unbind rng0; then
    say "unbind of a device vfiod did not bind answered: $OUT"
else
    say "unbind of a device vfiod did not bind: rc=$RC $ERR"
fi
has_driver "$RNG" vfio-pci || fail "vfiod moved rng0 ($RNG) off vfio-pci, which it never bound (now $(drv "$RNG"))"
exit 0
