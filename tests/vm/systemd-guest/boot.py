#!/usr/bin/env python3
"""Boot the systemd guest of tests/vm/systemd-guest.sh under QEMU and follow it.

Reads the serial console for markers:
  VFIOD-SG-TEST-START        the test unit started (boot-to-test time)
  VFIOD-SG-HOTPLUG-REQUEST   QMP device_add e1000e on the empty root port rp2
  VFIOD-SG-RESULT: PASS|FAIL the verdict; QEMU should then power off
Exit 0 on PASS, 1 on FAIL or timeout. QEMU never outlives this process
(PR_SET_PDEATHSIG, finally, signal handlers). QMP client: tests/vm/harness.py.
"""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import QMP, set_pdeathsig  # noqa: E402

T0 = time.monotonic()


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
    qmp_path = os.path.join(a.out, "qmp.sock")
    if os.path.exists(qmp_path):
        os.unlink(qmp_path)
    append = ("console=ttyS0 intel_iommu=on root=/dev/vda rw loglevel=4 panic=-1 "
              "8250.nr_uarts=1 mitigations=off vfiodsg.guest=1 systemd.show_status=auto")
    cmd = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
        "-smp", a.smp, "-m", a.mem, "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-device", "intel-iommu,intremap=off",
        "-kernel", a.kernel, "-initrd", a.initrd, "-append", append,
        "-snapshot",
        "-drive", f"file={a.image},format=raw,if=none,id=disk0",
        "-device", "virtio-blk-pci,drive=disk0,bus=pcie.0,addr=0x4",
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x2",
        "-device", "pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0,addr=0x3,mem-reserve=8M",
        "-device", "e1000e,id=nic0,bus=rp1",
    ]
    if os.path.exists("/usr/share/qemu/qboot.rom") and os.environ.get("VFIOD_VM_BIOS", "qboot") == "qboot":
        cmd += ["-bios", "/usr/share/qemu/qboot.rom"]
    log("qemu: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig)

    def kill(*_):
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def on_signal(signum, _frame):
        kill()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    state = {"result": None, "test_start": None, "qmp": None}
    qmp_holder = {}

    def connect_qmp():
        try:
            qmp_holder["q"] = QMP(qmp_path, time.monotonic() + 30,
                                  open(os.path.join(a.out, "qmp-events.jsonl"), "w"))
        except Exception as e:  # noqa: BLE001
            log(f"QMP: {e}")
    threading.Thread(target=connect_qmp, daemon=True).start()

    def hotplug():
        for _ in range(100):
            if "q" in qmp_holder:
                break
            time.sleep(0.1)
        q = qmp_holder.get("q")
        if q is None:
            log("hotplug requested but QMP is not connected")
            return
        r = q.execute("device_add", {"driver": "e1000e", "id": "hp1", "bus": "rp2"})
        log(f"QMP device_add e1000e id=hp1 bus=rp2 -> {r}")

    def reader():
        with open(os.path.join(a.out, "console.log"), "w", buffering=1) as out:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                t = time.monotonic() - T0
                out.write(f"[{t:7.2f}] {line}\n")
                if a.verbose:
                    print(f"[guest {t:6.1f}] {line}", file=sys.stderr, flush=True)
                if "VFIOD-SG-TEST-START" in line and state["test_start"] is None:
                    state["test_start"] = t
                    log(f"test unit started ({t:.1f} s after QEMU start)")
                elif "VFIOD-SG-HOTPLUG-REQUEST" in line:
                    threading.Thread(target=hotplug, daemon=True).start()
                elif "VFIOD-SG-RESULT:" in line:
                    state["result"] = line.split("VFIOD-SG-RESULT:", 1)[1].strip()
                    log(f"guest result: {state['result']} ({t:.1f} s)")
    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    deadline = T0 + a.timeout
    rc = 1
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if state["result"] is not None:
                # Give the guest time to power off by itself.
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log("guest did not power off within 30 s after its result; killing QEMU")
                break
            time.sleep(0.2)
        else:
            log(f"TIMEOUT after {a.timeout:.0f} s")
        kill()
        rt.join(timeout=5)
        total = time.monotonic() - T0
        ts = state["test_start"]
        log(f"timing: boot to test unit {ts:.1f} s, whole guest run {total:.1f} s" if ts is not None
            else f"timing: test unit never started; whole guest run {total:.1f} s")
        with open(os.path.join(a.out, "timing"), "w") as f:
            f.write(f"boot_to_test={'' if ts is None else f'{ts:.1f}'} guest_total={total:.1f}\n")
        rc = 0 if state["result"] == "PASS" else 1
    finally:
        kill()
    return rc


if __name__ == "__main__":
    sys.exit(main())
