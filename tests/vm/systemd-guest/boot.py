#!/usr/bin/env python3
"""Boot the systemd guest of tests/vm/systemd-guest.sh under QEMU and follow it.

The machine, the QEMU process, its console and QMP are tests/vm/harness.py's
(machine_args, KERNEL_APPEND, Guest): the systemd guest runs on the same
q35 + IOMMU (interrupt remapping on) as the scenario guest; only its disk,
its devices and the markers differ. Markers on the serial console:
  VFIOD-SG-TEST-START        the test unit started (boot-to-test time)
  VFIOD-SG-HOTPLUG-REQUEST   QMP device_add e1000e on the empty root port rp2
  VFIOD-SG-RESULT: PASS|FAIL the verdict; QEMU should then power off
Exit 0 on PASS, 1 on FAIL or timeout. QEMU never outlives this process
(PR_SET_PDEATHSIG, finally, signal handlers).
"""
import argparse
import os
import queue
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import KERNEL_APPEND, Guest, exit_on_signals, machine_args  # noqa: E402

T0 = time.monotonic()
MARKER = re.compile(r"(VFIOD-SG-TEST-START|VFIOD-SG-HOTPLUG-REQUEST|VFIOD-SG-RESULT):?\s*(.*)")


def log(msg):
    print(f"[sg-boot {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--smp", default="2")
    ap.add_argument("--mem", default="1024")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    qmp_path = Guest.qmp_path(a.out)
    if os.path.exists(qmp_path):
        os.unlink(qmp_path)
    append = " ".join(KERNEL_APPEND + ["root=/dev/vda", "rw", "vfiodsg.guest=1", "systemd.show_status=auto"])
    cmd = ["qemu-system-x86_64"] + machine_args(a.smp, a.mem, qmp_path) + [
        "-kernel", a.kernel, "-initrd", a.initrd, "-append", append,
        "-snapshot",
        "-drive", f"file={a.image},format=raw,if=none,id=disk0",
        "-device", "virtio-blk-pci,drive=disk0,bus=pcie.0,addr=0x4",
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x2",
        "-device", "pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0,addr=0x3,mem-reserve=8M",
        "-device", "e1000e,id=nic0,bus=rp1",
    ]
    log("qemu: " + " ".join(cmd))
    exit_on_signals()
    guest = Guest(cmd, a.out, MARKER, name="guest", verbose=a.verbose)
    result, test_start = None, None
    try:
        guest.start()
        if guest.qmp is None:
            log("QMP did not answer within 30 s (a hotplug request will fail)")
        deadline = guest.start_time + a.timeout
        while result is None:
            left = deadline - time.monotonic()
            if left <= 0:
                log(f"TIMEOUT after {a.timeout:.0f} s")
                break
            try:
                t, kind, rest = guest.markers.get(timeout=min(left, 1))
            except queue.Empty:
                if guest.exited() and guest.markers.empty():
                    log("QEMU exited without a result")
                    break
                continue
            since = t - guest.start_time
            if kind == "VFIOD-SG-TEST-START" and test_start is None:
                test_start = since
                log(f"test unit started ({since:.1f} s after QEMU start)")
            elif kind == "VFIOD-SG-HOTPLUG-REQUEST":
                if guest.qmp is None:
                    log("hotplug requested but QMP is not connected")
                else:
                    r = guest.qmp.execute("device_add", {"driver": "e1000e", "id": "hp1", "bus": "rp2"})
                    log(f"QMP device_add e1000e id=hp1 bus=rp2 -> {r}")
            elif kind == "VFIOD-SG-RESULT":
                result = rest.strip()
                log(f"guest result: {result} ({since:.1f} s)")
            elif kind == "EOF":
                log("the console closed without a result")
                break
        # Give the guest time to power off by itself.
        if result is not None and not guest.wait_exit(30):
            log("guest did not power off within 30 s after its result")
    finally:
        guest.stop()
    total = time.monotonic() - guest.start_time if guest.start_time else 0.0
    log(f"timing: boot to test unit {test_start:.1f} s, whole guest run {total:.1f} s" if test_start is not None
        else f"timing: test unit never started; whole guest run {total:.1f} s")
    with open(os.path.join(a.out, "timing"), "w") as f:
        f.write(f"boot_to_test={'' if test_start is None else f'{test_start:.1f}'} guest_total={total:.1f}\n")
    return 0 if result == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
