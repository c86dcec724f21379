# holder-display: a display device in use (issue 9). The bochs-display's DRM node
# /dev/dri/cardN is held open by a process (as an X server or a compositor
# holds it): bind must be refused with 409 device_busy naming that process,
# and nothing written (no uevent, still on bochs-drm, no driver_override).
# The guest kernel (Debian 6.12) puts its framebuffer console on this device
# at boot (vtconN "frame buffer device", bind=1): with only the console on
# it, the bind must succeed (unbinding the console is a step of the plan, the
# dry run shows it), and the unbind must give the console back.
. /vm/lib.sh
GPU=$(dev_under "$PORT_gpu0")
D=/sys/bus/pci/devices/$GPU
has_driver "$GPU" bochs-drm || fail "precondition: $GPU is on $(drv "$GPU")"
CARD=$(ls "$D/drm" | grep '^card' | head -1)
[ -n "$CARD" ] || fail "no drm/card* under $GPU"
fbcon_bound() { # the framebuffer console is bound (to the only framebuffer, this device's)
    local v
    for v in /sys/class/vtconsole/vtcon*; do
        grep -q 'frame buffer' "$v/name" && [ "$(cat "$v/bind")" = 1 ] && return 0
    done
    return 1
}
vtcons() { for v in /sys/class/vtconsole/vtcon*; do printf '%s:%s:bind=%s ' "${v##*/}" "$(cat "$v/name")" "$(cat "$v/bind")"; done; }
HAVE_FBCON=no
fbcon_bound && [ -e "$D/graphics" ] && HAVE_FBCON=yes
say "$GPU: $CARD, graphics $(ls "$D/graphics" 2>/dev/null | tr '\n' ' '); consoles: $(vtcons)"

vfiod_start
vc_ok register "$GPU" --name gpu0
need_holders_api gpu0
holder_start hold "/dev/dri/$CARD"
uevmon_start

mark b0; vc bind gpu0; rc=$?; mark b1
[ $rc != 0 ] || fail "bind succeeded although pid $HOLD holds /dev/dri/$CARD (kernel: $(drv "$GPU"))"
busy_names_pid "$HOLD" vmtool || fail "bind refused, but not as 409 device_busy naming pid $HOLD (vmtool): $ERR"
printf '%s' "$ERR" | jq -e --argjson p "$HOLD" --arg path "/dev/dri/$CARD" 'any(.holders[]; .pid == $p and .path == $path)' >/dev/null ||
    fail "the holder entry does not name /dev/dri/$CARD as its path: $ERR"
say "refused in $(mark_ms b0 b1) ms: $ERR"
metric holders_drm_refusal_ms "$(mark_ms b0 b1)" ms "vfioctl bind -> 409 device_busy (/dev/dri/$CARD held)"
has_driver "$GPU" bochs-drm || fail "after the refused bind $GPU is on $(drv "$GPU")"
[ -z "$(override_of "$GPU")" ] || fail "the refused bind left driver_override '$(override_of "$GPU")'"
[ -z "$(uevents_of "$GPU")" ] || fail "the refused bind wrote to the kernel: uevents $(uevents_of "$GPU" | tr '\n' ';')"
[ "$HAVE_FBCON" = no ] || fbcon_bound || fail "the refused bind unbound the framebuffer console: $(vtcons)"
vc_ok show gpu0
[ "$(jget .bound_to_vfio)" = false ] || fail "after the refusal vfiod says bound_to_vfio=$(jget .bound_to_vfio)"
holders_of gpu0
echo "$OUT" | jq -e --argjson p "$HOLD" '[.. | objects | select(.kind == "process" and .pid == $p)] | length > 0' >/dev/null ||
    fail "holders gpu0 does not list pid $HOLD: $OUT"
say "holders gpu0: $(echo "$OUT" | jq -c .)"
kill "$HOLD"; wait "$HOLD" 2>/dev/null

if [ "$HAVE_FBCON" = no ]; then
    # Say so rather than pretend: this kernel did not bind a console here.
    say "no framebuffer console on $GPU ($(vtcons)); the console part is not checked"
    vc_ok bind gpu0
    has_driver "$GPU" vfio-pci || fail "bind gpu0: kernel has $(drv "$GPU")"
    vc_ok unbind gpu0
    has_driver "$GPU" bochs-drm || fail "unbind gpu0: kernel has $(drv "$GPU")"
    exit 0
fi

# Only the framebuffer console is left: not a refusal, a step of the plan.
vc_ok bind gpu0 --dry-run
echo "$OUT" | grep -qi 'console\|vtcon' || fail "the dry-run plan does not mention the framebuffer console: $OUT"
has_driver "$GPU" bochs-drm || fail "bind --dry-run moved $GPU to $(drv "$GPU")"
fbcon_bound || fail "bind --dry-run unbound the console: $(vtcons)"
say "dry run with the console on it: $(echo "$OUT" | jq -c .)"
mark c0; vc_ok bind gpu0; mark c1
has_driver "$GPU" vfio-pci || fail "bind gpu0 with only the console on it: kernel has $(drv "$GPU")"
fbcon_bound && fail "on vfio-pci, yet a framebuffer console is still bound: $(vtcons)"
say "bound with the console on it in $(mark_ms c0 c1) ms; consoles: $(vtcons)"
vc_ok unbind gpu0
has_driver "$GPU" bochs-drm || fail "unbind gpu0: kernel has $(drv "$GPU")"
wait_until 5 fbcon_bound || fail "unbind gpu0 did not give the framebuffer console back: $(vtcons)"
say "unbound: graphics $(ls "$D/graphics" 2>/dev/null | tr '\n' ' '), consoles $(vtcons)"
exit 0
