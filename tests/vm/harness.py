#!/usr/bin/env python3
"""Boot the vfiod test guest under QEMU and collect scenario results.

Python 3 standard library only. Started by tests/vm/run.sh, which builds the
kernel and initramfs. The harness:

- starts QEMU (TCG, q35, intel-iommu) with the PCI topology below, the serial
  console on a pipe and QMP on a Unix socket;
- shares a directory with the guest over 9p: the guest writes its results
  there and asks for host actions (QMP device_add / device_del) by dropping
  request files that the harness answers;
- watches the console for markers, enforces timeouts, kills QEMU whatever
  happens (and QEMU dies with the harness: PR_SET_PDEATHSIG);
- boots again for the remaining scenarios when one hangs or crashes the guest;
- prints results and measurements, and the console log on failure.

The machine (`machine_args`, `KERNEL_APPEND`) and one QEMU process with its
console and QMP (`Guest`) are also what systemd-guest/boot.py boots the
systemd guest with.
"""
import argparse
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

# The guest's PCI topology. Root ports sit at fixed slots on pcie.0 so the
# guest finds each device below its port (topology.sh in the share).
ROOT_PORTS = [
    # (qemu id, slot on pcie.0, what is plugged in)
    ("rp1", 0x02, "nic0"),
    ("rp2", 0x03, "rng0"),
    ("rp3", 0x04, "edu0"),
    ("rp4", 0x05, "gpu0"),
    ("rp5", 0x06, "br0"),
    ("rp6", 0x07, "hp0"),   # empty: hotplug
    ("rp7", 0x08, "hp1"),   # empty: hotplug
    ("rp8", 0x0a, "nvme0"),
    ("rp9", 0x0b, "igb0"),
]
DEVICES = [
    "-device", "e1000e,id=nic0,bus=rp1",
    "-device", "virtio-rng-pci,id=rng0,bus=rp2",
    "-device", "edu,id=edu0,bus=rp3",
    "-device", "bochs-display,id=gpu0,bus=rp4",
    # Two functions behind a PCIe-to-PCI bridge: one IOMMU group.
    "-device", "pcie-pci-bridge,id=br0,bus=rp5",
    "-device", "ich9-intel-hda,id=hda0,bus=br0,addr=0x1",
    "-device", "e1000,id=nic1,bus=br0,addr=0x2",
    # NVMe on a drive image made for each boot (Boot.nvme_image).
    "-device", "nvme,id=nvme0,serial=vfiodvm-nvme0,drive=nvmedrv0,bus=rp8",
    # SR-IOV capable NIC (PF with up to 7 VFs), for resets and VFs.
    "-device", "igb,id=igb0,bus=rp9",
]
# Boot flavours: a scenario whose script says "# vm-boot: NAME" runs in a
# guest of that flavour (scenarios of one flavour share one boot); the rest
# run in the standard guest above, which the flavours leave as it is.
#   tcg-single: the standard guest under single-threaded TCG (many driver
#     moves: multi-threaded TCG aborted or froze over hundreds, vm-testing.md).
#   sriov: the standard guest plus two NUMA nodes (one vCPU and half the
#     memory each) and two more igb PFs: one behind a root port without ACS
#     (the port, the PF and its VFs share one IOMMU group) and one behind a
#     root port on a pxb-pcie expander on NUMA node 1 (its VFs are on node 1).
#     Every root port names its bus: QEMU may otherwise put one behind the
#     expander.
SRIOV_PXB_BUS = 0x80
FLAVOURS = {
    "standard": {},
    "tcg-single": {"single_thread": True},
    "sriov": {
        "numa_nodes": 2,
        # qboot leaves the expander's buses unnumbered: QEMU's ACPI then
        # gives the pxb the bus range 0x80-0x80 and the kernel finds no
        # device behind its root port. SeaBIOS numbers them (~4 s more).
        "bios": "seabios",
        # (qemu id, bus, slot on that bus, what is plugged in, extra options)
        "ports": [
            ("rp10", "pcie.0", 0x0c, "igbnoacs", ",disable-acs=on"),
            ("rp11", "pxb1", 0x00, "igbnuma", ""),
        ],
        "pre_devices": [
            "-device", f"pxb-pcie,id=pxb1,bus_nr=0x{SRIOV_PXB_BUS:x},numa_node=1,bus=pcie.0,addr=0xd",
        ],
        "devices": [
            "-device", "igb,id=igbnoacs,bus=rp10",
            "-device", "igb,id=igbnuma,bus=rp11",
        ],
        # The guest address of each bus's slot 0 function, for topology.sh.
        "bus_numbers": {"pcie.0": 0, "pxb1": SRIOV_PXB_BUS},
    },
}
# Console lines the guest's /init and scenarios mark: "@@KIND REST".
MARKER = re.compile(r"@@(\S+)\s*(.*)")
NVME_IMAGE_MIB = 16
NINEP_SLOT = 0x09
# Scenario knobs the host may set: VFIOD_VM_<NAME> here is VM_<NAME> in the
# guest (through vfiodvm.env.VM_<NAME>=VALUE on the kernel command line).
GUEST_KNOBS = ("REPLUG_ROUNDS", "REPLUG_BUDGET", "ATTACH_KILL_TRIES", "ATTACH_KILL_MAX_US",
               "ATTACH_KILL_ONGRANT")


def guest_env():
    out = []
    for knob in GUEST_KNOBS:
        val = os.environ.get(f"VFIOD_VM_{knob}")
        if val is None:
            continue
        if not re.fullmatch(r"[A-Za-z0-9._-]+", val):
            raise SystemExit(f"harness: VFIOD_VM_{knob}={val!r}: only letters, digits, '.', '_', '-'")
        out.append(f"vfiodvm.env.VM_{knob}={val}")
    return out


def log(msg):
    print(f"[vm-harness {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


class QMP:
    """Minimal QMP client: one reader thread, responses in a queue, events in a list."""

    def __init__(self, path, deadline, event_log=None):
        self.event_log = event_log
        self.sock = None
        while time.monotonic() < deadline:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                self.sock = s
                break
            except OSError:
                s.close()
                time.sleep(0.05)
        if self.sock is None:
            raise RuntimeError("cannot connect to QMP")
        self.file = self.sock.makefile("rwb", buffering=0)
        self.responses = queue.Queue()
        self.events = []
        self.cond = threading.Condition()
        json.loads(self.file.readline())  # greeting
        threading.Thread(target=self._reader, daemon=True).start()
        self.execute("qmp_capabilities")

    def _reader(self):
        try:
            for line in self.file:
                msg = json.loads(line)
                if "event" in msg:
                    if self.event_log:
                        self.event_log.write(json.dumps(msg) + "\n")
                        self.event_log.flush()
                    with self.cond:
                        self.events.append((time.monotonic(), msg))
                        self.cond.notify_all()
                else:
                    self.responses.put(msg)
        except (OSError, ValueError):
            pass
        self.responses.put({"error": {"class": "Disconnected", "desc": "QMP closed"}})

    def execute(self, cmd, args=None, timeout=30):
        req = {"execute": cmd}
        if args:
            req["arguments"] = args
        self.file.write(json.dumps(req).encode() + b"\n")
        return self.responses.get(timeout=timeout)

    def wait_event(self, name, pred, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for _, ev in self.events:
                    if ev["event"] == name and pred(ev):
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def set_pdeathsig():
    # QEMU dies if the harness dies, even by SIGKILL.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


# Kernel command line every guest of the tier starts with.
KERNEL_APPEND = [
    "console=ttyS0", "intel_iommu=on", "loglevel=4", "panic=-1",
    # With interrupt remapping on, the kernel panics when its early check of
    # the IO-APIC timer misses ticks, which TCG on a busy host does ("timer
    # doesn't work through Interrupt-remapped IO-APIC"); the timer works,
    # the check is what fails.
    "no_timer_check",
    "8250.nr_uarts=1", "mitigations=off",
]


def machine_args(smp, mem, qmp_path, single_thread=False, bios=None):
    """QEMU options for the machine every guest of the tier runs on: q35
    under TCG with an Intel IOMMU, the serial console on stdio, QMP on
    QMP_PATH, qboot when QEMU ships it (or BIOS). Devices, kernel and disks
    are the caller's."""
    cmd = [
        # Interrupt remapping (intremap=on, which needs the split irqchip):
        # without it VFIO_SET_IOMMU fails with EPERM, so nothing could
        # really use a device on vfio-pci.
        "-machine", "q35,kernel-irqchip=split",
        # Single-threaded TCG: slower with 2 vCPUs but stable over hundreds
        # of driver moves, where multi-threaded TCG once aborted and twice
        # froze the guest (vm-testing.md).
        "-accel", "tcg,thread=single" if single_thread else "tcg", "-cpu", "max",
        "-smp", str(smp), "-m", str(mem),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-device", "intel-iommu,intremap=on",
    ]
    # Firmware: qboot when QEMU ships it (the guest reaches init ~4 s
    # sooner than with SeaBIOS under TCG). With qboot the kernel sizes the
    # bridge windows and a hot-added bochs-display gets no room for its
    # 16 MiB BAR (no driver); SeaBIOS honours the ports' pref32-reserve.
    bios = bios or os.environ.get("VFIOD_VM_BIOS", "qboot")
    if bios == "qboot":
        bios = "/usr/share/qemu/qboot.rom" if os.path.exists("/usr/share/qemu/qboot.rom") else "seabios"
    if bios != "seabios":
        cmd += ["-bios", bios]
    return cmd


class Guest:
    """One QEMU process: its console stamped into DIR/console.log, each
    line that MARKER matches (a compiled regex) queued in `markers` as
    (monotonic time, *groups), then ("EOF",) when the console closes; QMP
    on DIR/qmp.sock, its events in DIR/qmp-events.jsonl. QEMU dies with
    this process (PR_SET_PDEATHSIG) and on stop()."""

    def __init__(self, cmd, dir, marker, name="guest", verbose=False):
        self.cmd = cmd
        self.dir = dir
        self.marker = marker
        self.name = name
        self.verbose = verbose
        self.console_path = os.path.join(dir, "console.log")
        self.markers = queue.Queue()
        self.proc = None
        self.qmp = None
        self.start_time = None

    @staticmethod
    def qmp_path(dir):
        return os.path.join(dir, "qmp.sock")

    def start(self):
        """Starts QEMU and connects QMP (None if it never answers in 30 s)."""
        with open(os.path.join(self.dir, "qemu-cmdline.txt"), "w") as f:
            f.write(" ".join(self.cmd) + "\n")
        self.start_time = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig)
        threading.Thread(target=self._console_reader, daemon=True).start()
        try:
            self.qmp = QMP(self.qmp_path(self.dir), time.monotonic() + 30,
                           open(os.path.join(self.dir, "qmp-events.jsonl"), "w"))
        except RuntimeError:
            self.qmp = None

    def _console_reader(self):
        with open(self.console_path, "w", buffering=1) as out:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                t = time.monotonic() - self.start_time
                out.write(f"[{t:7.2f}] {line}\n")
                if self.verbose:
                    print(f"  {self.name}| {line}", file=sys.stderr, flush=True)
                m = self.marker.search(line)
                if m:
                    self.markers.put((time.monotonic(), *m.groups()))
        self.markers.put((time.monotonic(), "EOF", ""))

    def exited(self):
        return self.proc is not None and self.proc.poll() is not None

    def wait_exit(self, timeout):
        """Whether QEMU exited (by itself) within TIMEOUT seconds."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self):
        if self.qmp:
            self.qmp.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            if not self.wait_exit(5):
                self.proc.kill()
                self.proc.wait()


def exit_on_signals():
    """SIGTERM, SIGINT and SIGHUP raise SystemExit, so `finally` blocks
    stop QEMU."""
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)


class Boot:
    """One QEMU run for a list of scenarios."""

    def __init__(self, args, scenarios, boot_no, flavour="standard"):
        self.args = args
        self.scenarios = scenarios
        self.flavour = flavour
        self.spec = FLAVOURS[flavour]
        self.single_thread = self.spec.get("single_thread", False)
        self.dir = os.path.join(args.out, f"boot{boot_no}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.share = os.path.join(self.dir, "share")
        os.makedirs(os.path.join(self.share, "req"))
        os.makedirs(os.path.join(self.share, "out"))
        self.console_path = os.path.join(self.dir, "console.log")
        self.added = []  # ids of hotplugged devices, for "reset"
        self.boot_secs = None
        self.wall_secs = None
        self.init_uptime = None
        self.guest = None
        self.timed_out = None
        # A fresh ext4 image each boot: scenarios mount and write it.
        self.nvme_image = os.path.join(self.dir, "nvme0.img")
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vfiodvm-nvme0",
                        self.nvme_image, f"{NVME_IMAGE_MIB}M"], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(self.share, "topology.sh"), "w") as f:
            for qid, slot, dev in ROOT_PORTS:
                f.write(f"PORT_{dev}=0000:00:{slot:02x}.0\n")
                f.write(f"QPORT_{dev}={qid}\n")
            for qid, bus, slot, dev, _ in self.spec.get("ports", []):
                f.write(f"PORT_{dev}=0000:{self.spec['bus_numbers'][bus]:02x}:{slot:02x}.0\n")
                f.write(f"QPORT_{dev}={qid}\n")
            f.write(f"VM_BOOT_FLAVOUR={self.flavour}\n")

    def cmdline(self):
        a = self.args
        append = " ".join(KERNEL_APPEND + [
            "printk.devkmsg=on",
            "vfiodvm.guest=1",
            "vfiodvm.scenarios=" + ",".join(self.scenarios),
            f"vfiodvm.rounds={a.rounds}", f"vfiodvm.timeout={a.scenario_timeout}",
        ] + guest_env())
        cmd = ["qemu-system-x86_64"] + machine_args(a.smp, a.mem, Guest.qmp_path(self.dir), self.single_thread,
                                                     self.spec.get("bios"))
        cmd += ["-kernel", a.kernel, "-initrd", a.initrd, "-append", append]
        nodes = self.spec.get("numa_nodes", 0)
        for n in range(nodes):
            first, last = n * a.smp // nodes, (n + 1) * a.smp // nodes - 1
            cpus = f"{first}" if first == last else f"{first}-{last}"
            cmd += ["-object", f"memory-backend-ram,id=m{n},size={a.mem // nodes}M",
                    "-numa", f"node,nodeid={n},cpus={cpus},memdev=m{n}"]
        for i, (qid, slot, dev) in enumerate(ROOT_PORTS, 1):
            # Hotplug ports reserve room for a 16 MiB prefetchable BAR (bochs-display).
            extra = ",pref32-reserve=64M,mem-reserve=8M" if dev.startswith("hp") else ""
            cmd += ["-device", f"pcie-root-port,id={qid},chassis={i},slot={i},bus=pcie.0,addr=0x{slot:x}{extra}"]
        cmd += self.spec.get("pre_devices", [])
        for i, (qid, bus, slot, dev, extra) in enumerate(self.spec.get("ports", []), len(ROOT_PORTS) + 1):
            cmd += ["-device", f"pcie-root-port,id={qid},chassis={i},slot={i},bus={bus},addr=0x{slot:x}{extra}"]
        cmd += ["-drive", f"if=none,id=nvmedrv0,file={self.nvme_image},format=raw"]
        cmd += DEVICES + self.spec.get("devices", [])
        cmd += [
            "-fsdev", f"local,id=fs0,path={self.share},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=fs0,mount_tag=host0,bus=pcie.0,addr=0x{NINEP_SLOT:x}",
        ]
        return cmd

    def _handle_req(self, path):
        try:
            with open(path) as f:
                req = json.load(f)
        except (OSError, ValueError):
            return  # not complete yet
        os.unlink(path)
        cmd, args = req.get("cmd"), req.get("args") or {}
        resp = {"ok": False}
        try:
            if cmd == "device_add":
                r = self.guest.qmp.execute("device_add", args)
                resp = {"ok": "return" in r, "qmp": r}
                if "return" in r:
                    self.added.append(args["id"])
            elif cmd == "device_del":
                r = self.guest.qmp.execute("device_del", args)
                resp = {"ok": "return" in r, "qmp": r}
                if "return" in r:
                    ev = self.guest.qmp.wait_event("DEVICE_DELETED", lambda e: e.get("data", {}).get("device") == args["id"], 10)
                    resp["deleted"] = ev is not None
                    if ev and args["id"] in self.added:
                        self.added.remove(args["id"])
            elif cmd == "reset":
                gone = []
                for dev in list(self.added):
                    r = self.guest.qmp.execute("device_del", {"id": dev})
                    if "return" in r:
                        self.guest.qmp.wait_event("DEVICE_DELETED", lambda e, d=dev: e.get("data", {}).get("device") == d, 20)
                    gone.append(dev)
                    self.added.remove(dev)
                resp = {"ok": True, "removed": gone}
            elif cmd == "qmp":
                r = self.guest.qmp.execute(args["execute"], args.get("arguments"))
                resp = {"ok": "return" in r, "qmp": r}
            else:
                resp = {"ok": False, "error": f"unknown request {cmd}"}
        except Exception as e:  # answer the guest whatever happens
            resp = {"ok": False, "error": repr(e)}
        log(f"host request {cmd} {json.dumps(args)} -> ok={resp.get('ok')}")
        tmp = path[:-4] + ".rtmp"
        with open(tmp, "w") as f:
            json.dump(resp, f)
            f.write("\n")
        os.rename(tmp, path[:-4] + ".resp")

    def run(self):
        log(f"boot ({self.flavour}{', single-threaded TCG' if self.single_thread else ''}): {' '.join(self.scenarios)}")
        self.guest = Guest(self.cmdline(), self.dir, MARKER, verbose=self.args.verbose)
        self.guest.start()
        start = self.guest.start_time
        deadline = start + self.args.boot_timeout
        phase = "boot"
        current = None
        reqdir = os.path.join(self.share, "req")
        while True:
            try:
                t, kind, rest = self.guest.markers.get(timeout=0.03)
                if kind == "VFIODVM" and rest.startswith("INIT"):
                    self.boot_secs = t - start
                    m = re.search(r"uptime=([\d.]+)", rest)
                    self.init_uptime = float(m.group(1)) if m else None
                    log(f"guest init after {self.boot_secs:.1f}s (guest uptime {self.init_uptime}s)")
                    deadline = t + 120
                elif kind == "VFIODVM" and rest.startswith("READY"):
                    phase = "between"
                    deadline = t + 120
                elif kind == "BEGIN":
                    current = rest.split()[0]
                    log(f"scenario {current} ...")
                    phase = "scenario"
                    deadline = t + self.args.scenario_timeout + 60
                elif kind == "RESULT":
                    log(f"scenario {rest}")
                    current = None
                    phase = "between"
                    deadline = t + 120
                elif kind == "VFIODVM" and rest.startswith("DONE"):
                    phase = "done"
                    deadline = t + 30
                elif kind == "EOF":
                    break
            except queue.Empty:
                pass
            if self.guest.qmp:
                for name in sorted(os.listdir(reqdir)):
                    if name.endswith(".req"):
                        self._handle_req(os.path.join(reqdir, name))
            if self.guest.exited() and self.guest.markers.empty():
                break
            if time.monotonic() > deadline:
                self.timed_out = (phase, current)
                log(f"TIMEOUT in phase {phase} (scenario {current}); killing QEMU")
                break
        self.stop()
        self.wall_secs = time.monotonic() - start
        return current

    def stop(self):
        if self.guest:
            self.guest.stop()

    def results(self):
        res, metrics, msgs = {}, [], {}
        try:
            with open(os.path.join(self.share, "results")) as f:
                for line in f:
                    p = line.split()
                    if p[:1] == ["RESULT"] and len(p) >= 3:
                        res[p[1]] = (p[2], " ".join(p[3:]))
                    elif p[:1] == ["METRIC"] and len(p) >= 4:
                        metrics.append((p[1], p[2], p[3], " ".join(p[4:])))
                    elif p[:1] == ["FAILMSG"] and len(p) >= 2:
                        msgs.setdefault(p[1], []).append(" ".join(p[2:]))
        except OSError:
            pass
        return res, metrics, msgs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--mem", type=int, default=1024)
    ap.add_argument("--boot-timeout", type=int, default=int(os.environ.get("VFIOD_VM_BOOT_TIMEOUT", 180)))
    ap.add_argument("--scenario-timeout", type=int, default=int(os.environ.get("VFIOD_VM_SCENARIO_TIMEOUT", 240)))
    ap.add_argument("--tier-start", type=float, default=None)
    ap.add_argument("--gate", default=None, help="only these scenarios decide the exit code")
    ap.add_argument("--flavours", default="",
                    help="SCENARIO=FLAVOUR ...: these scenarios boot a guest of that flavour (FLAVOURS)")
    ap.add_argument("--verbose", action="store_true", default=os.environ.get("VFIOD_VM_VERBOSE") == "1")
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    for old in os.listdir(args.out):
        if old.startswith("boot"):
            shutil.rmtree(os.path.join(args.out, old), ignore_errors=True)

    exit_on_signals()

    flavour_of = {}
    for item in args.flavours.split():
        scen, _, flavour = item.partition("=")
        if flavour not in FLAVOURS:
            raise SystemExit(f"harness: scenario {scen}: unknown boot flavour {flavour!r} (have: {' '.join(FLAVOURS)})")
        flavour_of[scen] = flavour
    groups = [(f, [s for s in args.scenarios.split() if flavour_of.get(s, "standard") == f]) for f in FLAVOURS]
    results, metrics, msgs, boots = {}, [], {}, []
    boot_no = 0
    try:
        for flavour, todo in groups:
            boot_no = run_group(args, todo, flavour, boot_no, results, metrics, msgs, boots)
    finally:
        for b in boots:
            b.stop()
    report(args, results, metrics, msgs, boots)


def run_group(args, todo, flavour, boot_no, results, metrics, msgs, boots):
    """Boots for TODO until each has a result (again after a guest hung or
    died, for the rest); returns the last boot number used."""
    while todo:
        boot_no += 1
        b = Boot(args, todo, boot_no, flavour)
        boots.append(b)
        try:
            hung = b.run()
        finally:
            b.stop()
        res, met, ms = b.results()
        results.update(res)
        metrics += met
        for k, v in ms.items():
            msgs.setdefault(k, []).extend(v)
        if b.boot_secs is None:
            for s in todo:
                if s not in results:
                    results[s] = ("FAIL", "guest did not boot")
            break
        rest = [s for s in todo if s not in results]
        if hung and hung in rest:
            why = "guest hung (harness timeout)" if b.timed_out else "guest died"
            results[hung] = ("FAIL", why)
            rest.remove(hung)
        elif rest and rest == todo:
            for s in rest:
                results[s] = ("FAIL", "not run (guest stopped early)")
            break
        todo = rest
    return boot_no


def report(args, results, metrics, msgs, boots):
    print("\n==== vfiod real-kernel tier: results ====")
    for s in args.scenarios.split():
        st, detail = results.get(s, ("FAIL", "no result"))
        print(f"  {s:<15} {st:<8} {detail}")
        for m in msgs.get(s, []):
            print(f"         -> {m}")
    print("\n==== measurements ====")
    for i, b in enumerate(boots, 1):
        if b.boot_secs is not None:
            print(f"  boot{i} ({b.flavour}): QEMU start -> init marker {b.boot_secs:.1f} s wall (guest uptime at init {b.init_uptime} s)"
                  + (f", QEMU start -> exit {b.wall_secs:.1f} s" if b.wall_secs is not None else ""))
    for name, val, unit, note in metrics:
        print(f"  {name:<28} {val:>10} {unit:<3} {note}")
    if args.tier_start:
        print(f"  whole tier (run.sh start -> now): {time.time() - args.tier_start:.1f} s")
    gate = set(args.gate.split()) if args.gate is not None else set(args.scenarios.split())
    bad = [s for s in args.scenarios.split() if results.get(s, ("FAIL",))[0] != "PASS"]
    gating_bad = [s for s in bad if s in gate]
    if bad:
        for i, b in enumerate(boots, 1):
            print(f"\n==== guest console, boot{i} ({b.console_path}) ====")
            try:
                with open(b.console_path) as f:
                    sys.stdout.write(f.read())
            except OSError:
                pass
    print(f"\nlogs: {args.out}")
    passed = len(args.scenarios.split()) - len(bad)
    print(f"{passed} passed, {len(bad)} failed")
    if bad and not gating_bad:
        print(f"(not gating: {' '.join(bad)})")
    sys.exit(1 if gating_bad else 0)


if __name__ == "__main__":
    main()
