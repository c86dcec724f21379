# bind-display: a display device (bochs-display on bochs-drm, the GPU-like
# case) binds to vfio-pci (/dev/vfio/N) and unbind gives it back to
# bochs-drm.
. /vm/lib.sh
vfiod_start
# A display device (bochs-drm): the GPU-like case.
GPU=$(dev_under "$PORT_gpu0")
vc_ok register "$GPU" --name gpu0
[ "$(jget .type)" = pci ] || [ "$(jget .type)" = gpu ] || fail "gpu0 type $(jget .type)"
vc_ok bind gpu0
has_driver "$GPU" vfio-pci || fail "gpu0: bind returned but the driver is $(drv "$GPU")"
vfio_node "$GPU" || fail "gpu0: /dev/vfio/$(grp "$GPU") missing"
vc_ok unbind gpu0
has_driver "$GPU" bochs-drm || fail "gpu0: after unbind the driver is $(drv "$GPU")"
exit 0
