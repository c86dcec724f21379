//! The host the crash-point and soak tests run on, and the invariants of
//! issue 18 they check after every crash, fault and restart:
//!
//! 1. no present registered device is left without a driver unless its
//!    record says it has none to go back to;
//! 2. the registry's driver, `bound_to_vfio` and `stuck` agree with the
//!    (simulated) kernel;
//! 3. no `driver_override` of vfiod's is left on a device that is on its
//!    native driver, or that vfiod does not hold (a registered device or a
//!    companion of one), and no device is left with a `reset_method` list
//!    other than its own;
//! 4. an ACL entry on a VFIO node exists exactly for live attachments, and
//!    no attachment outlives its VMM;
//! 5. no registered device was lost or registered twice;
//! 6. (per operation, see the tests) it took effect completely or left no
//!    trace;
//! 7. vfiod answers `/health`;
//! 8. the VF records of a PF whose count vfiod keeps are the kernel's
//!    VFs, in order, and no VF record outlives its VF;
//! 9. the mediated devices of a registered parent are exactly its records'
//!    (each handed out: no record of an unfinished hand-out or release is
//!    left), each open to its attachment's uid alone, none of a VMM that is
//!    gone.
//!
//! vfiod's test variables (`vfiod::crashpoint`) arm its kills, faults and
//! pauses; uevents go through its `--uevent-fifo`. These tests run a VMM
//! as another uid, so they need root, as CI has.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fakesys::{DeviceSpec, FakeSys, TempDir};
use common::simkernel::SimKernel;
use common::{parse_response, Daemon, Response};
use serde_json::Value;

pub use common::acl_users;
pub use common::standard::{GPU, GPU_AUDIO as AUDIO, NIC};
/// An SR-IOV PF (the QEMU guest's igb: 7 VFs, 8086:10ca).
pub const PF: &str = "0000:0b:00.0";
/// A legacy mdev parent (a Tesla P40 on nvidia).
pub const MDEV_PARENT: &str = "0000:3b:00.0";
/// Its type for claims: 4 instances.
pub const MDEV_TYPE: &str = "nvidia-63";
pub const VMM_UID: u32 = 4242;
pub const VFIO: &str = "vfio-pci";

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The standard host's devices, the NIC and the GPU's two functions with
/// function-level resets (so that reset on release has work to do).
pub fn host_devices() -> Vec<DeviceSpec> {
    let mut specs: Vec<DeviceSpec> = common::fakesys::FakeSys::standard_devices()
        .into_iter()
        .map(|spec| match spec.addr.as_str() {
            NIC | GPU => spec.reset_methods("flr pm"),
            AUDIO => spec.reset_methods("flr"),
            _ => spec,
        })
        .collect();
    specs.push(
        DeviceSpec::new(PF, 0x8086, 0x10c9, 0x020000)
            .driver("igb")
            .group(40)
            .reset_methods("flr")
            .sriov(7, 0x10ca)
            .vf_driver("igbvf"),
    );
    specs.push(
        DeviceSpec::new(MDEV_PARENT, 0x10de, 0x1b38, 0x030200)
            .driver(common::fakesys::NVIDIA)
            .group(41)
            .mdev(&[
                (MDEV_TYPE, "GRID P40-2Q", 4),
                ("nvidia-64", "GRID P40-4Q", 2),
            ]),
    );
    specs
}

pub fn spec_of(addr: &str) -> DeviceSpec {
    host_devices()
        .into_iter()
        .find(|s| s.addr == addr)
        .unwrap_or_else(|| panic!("no device {addr} on the test host"))
}

/// Whether `pid` is a running process (not gone, not a zombie).
pub fn process_running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// A stand-in VMM: a long sleep as [`VMM_UID`], killed when dropped.
pub struct Vmm(Mutex<Option<Child>>);

impl Vmm {
    pub fn start() -> Vmm {
        let child = Command::new("sleep")
            .arg("300")
            .uid(VMM_UID)
            .gid(VMM_UID)
            .spawn()
            .expect("start the stand-in VMM");
        Vmm(Mutex::new(Some(child)))
    }

    /// Its pid (0 once killed).
    pub fn pid(&self) -> u32 {
        self.0.lock().unwrap().as_ref().map(Child::id).unwrap_or(0)
    }

    /// Kills and reaps it: its pid is gone from /proc afterwards.
    pub fn kill(&self) {
        if let Some(mut c) = self.0.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One host under test: the fake tree, its simulated kernel, vfiod (fed
/// uevents through a FIFO), and a VMM an attachment can name.
pub struct Host {
    pub fs: FakeSys,
    pub sim: SimKernel,
    pub d: Daemon,
    pub vmm: Mutex<Vmm>,
    pub fifo: PathBuf,
    /// Scratch space for traces and pause files.
    pub scratch: TempDir,
}

impl Host {
    /// A fresh host; `args` are extra vfiod arguments.
    pub fn new(args: &[&str]) -> Host {
        let fs = FakeSys::new();
        fs.load_vfio();
        for spec in host_devices() {
            fs.add_device(spec);
        }
        let sim = SimKernel::start(&fs);
        let fifo = fs.tmp_root().join("uevents");
        let fifo_arg = fifo.display().to_string();
        let mut all = vec!["--group", "nogroup", "--uevent-fifo", &fifo_arg];
        all.extend_from_slice(args);
        let d = Daemon::start(&fs, &all);
        Host {
            fs,
            sim,
            d,
            vmm: Mutex::new(Vmm::start()),
            fifo,
            scratch: TempDir::new("vfiod-crash").unwrap(),
        }
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vmm.lock().unwrap().pid()
    }

    pub fn kill_vmm(&self) {
        self.vmm.lock().unwrap().kill();
    }

    /// A new VMM (the old one, if any, is killed).
    pub fn new_vmm(&self) {
        *self.vmm.lock().unwrap() = Vmm::start();
    }

    /// Sends a request; `None` if vfiod is not there or the connection
    /// ended without an answer (it died meanwhile).
    pub fn try_req(&self, method: &str, path: &str, body: &str) -> Option<Response> {
        let mut stream = UnixStream::connect(&self.d.socket).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: vfiod\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(raw.as_bytes()).ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).ok()?;
        out.windows(4)
            .any(|w| w == b"\r\n\r\n")
            .then(|| parse_response(&out))
    }

    /// A request whose answer is its status; `None` as for [`Host::try_req`].
    pub fn status_of(&self, method: &str, path: &str, body: &str) -> Option<u16> {
        self.try_req(method, path, body).map(|r| r.status)
    }

    pub fn devices(&self) -> Result<Vec<Value>, String> {
        let r = self
            .try_req("GET", "/devices", "")
            .ok_or("GET /devices: no answer")?;
        match serde_json::from_str(&r.body) {
            Ok(Value::Array(list)) => Ok(list),
            _ => Err(format!("GET /devices: {} {}", r.status, r.body)),
        }
    }

    /// The record of the device registered at `addr`, if any.
    pub fn record(&self, addr: &str) -> Option<Value> {
        self.devices()
            .ok()?
            .into_iter()
            .find(|d| d["pci_address"] == addr)
    }

    pub fn alive(&self) -> bool {
        self.try_req("GET", "/health", "")
            .is_some_and(|r| r.status == 200)
    }

    /// Writes one uevent line to vfiod's FIFO; false if vfiod is not
    /// reading it (not running).
    pub fn uevent(&self, line: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&self.fifo);
            if let Ok(mut f) = opened {
                return writeln!(f, "{line}").is_ok();
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Hot-unplug of `addr` as the kernel reports it.
    pub fn unplug(&self, addr: &str) {
        // A PF's VFs go first, each with its own uevent.
        let vfs = self.fs.vfs_of(addr);
        if self.fs.device_dir(addr).is_some() {
            self.fs.remove_device(addr);
        }
        for vf in vfs.iter().rev() {
            self.uevent(&format!("remove {vf}"));
        }
        self.uevent(&format!("remove {addr}"));
    }

    /// `addr` comes back (it must be out): the kernel adds it, sends `add`
    /// before it probes a driver, then probes its native driver, which
    /// wins a race against vfiod's override if vfiod is quick; the `bind`
    /// uevent follows whatever the probe bound.
    pub fn replug_racing(&self, addr: &str) {
        let spec = spec_of(addr);
        let native = spec.driver.clone();
        self.fs.add_device(spec);
        {
            let _state = self.fs.lock_state();
            let _ = self.fs.tree().unbind(addr);
        }
        if let Some(native) = &native {
            self.sim.bind_wrong_driver(addr, native);
        }
        self.uevent(&format!("add {addr}"));
        self.kernel_probe(addr);
    }

    /// `addr` comes back and the kernel binds its native driver before
    /// anyone hears of it (the ordinary re-plug).
    pub fn replug(&self, addr: &str) {
        let spec = spec_of(addr);
        let native = spec.driver.clone();
        self.fs.add_device(spec);
        self.uevent(&format!("add {addr}"));
        if let Some(native) = native {
            self.uevent(&format!("bind {addr} {native}"));
        }
    }

    /// The kernel's own probe of `addr`, and its `bind` uevent.
    pub fn kernel_probe(&self, addr: &str) {
        let _ = std::fs::write(self.fs.path("bus/pci/drivers_probe"), addr);
        self.sim.wait_idle(Duration::from_secs(5));
        if let Some(driver) = self.fs.driver_of(addr) {
            self.uevent(&format!("bind {addr} {driver}"));
        }
    }

    /// Restarts vfiod with `env` (the crash-point variables) and waits
    /// until it answers.
    pub fn restart_with(&mut self, env: &[(&str, String)]) {
        self.d.kill9();
        self.d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.d.spawn();
    }

    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Waits (bounded) for vfiod to exit; true if it did.
    pub fn wait_dead(&mut self, within: Duration) -> bool {
        let child = self.d.child.as_mut().expect("running");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Checks every invariant of the module docs, retrying for up to
    /// `secs` while vfiod finishes what it does in the background
    /// (settling, rebinding, ending an attachment); panics with the last
    /// violation. `registered` are the allowed sets of registered names.
    pub fn check_invariants(&self, registered: &[&[&str]], context: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match self.settled(registered) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "{context}: invariant broken: {e}\nlog tail:\n{}",
                        self.log_tail(60)
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.d.log_text();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The invariants, holding over 150 ms with nothing changing in
    /// between: vfiod may pass through a state that satisfies them on its
    /// way (a re-plugged device recorded, its rebind not begun yet).
    pub fn settled(&self, registered: &[&[&str]]) -> Result<(), String> {
        self.sim.wait_idle(Duration::from_secs(5));
        self.invariants(registered)?;
        let before = (self.devices()?, self.kernel_view());
        std::thread::sleep(Duration::from_millis(150));
        self.sim.wait_idle(Duration::from_secs(5));
        self.invariants(registered)?;
        if (self.devices()?, self.kernel_view()) != before {
            return Err("still changing".into());
        }
        Ok(())
    }

    /// Drivers and overrides of every device on the bus.
    fn kernel_view(&self) -> Vec<(String, Option<String>, Option<String>)> {
        self.fs
            .devices()
            .into_iter()
            .map(|a| {
                let driver = self.fs.driver_of(&a);
                let o = self.fs.driver_override_of(&a);
                (a, driver, o)
            })
            .collect()
    }

    /// The invariants once; `Err` says which is broken and how.
    pub fn invariants(&self, registered: &[&[&str]]) -> Result<(), String> {
        // 7. vfiod answers.
        let health = self
            .try_req("GET", "/health", "")
            .ok_or("7: /health: no answer")?;
        if health.status != 200 {
            return Err(format!("7: /health: {} {}", health.status, health.body));
        }
        let devices = self.devices()?;
        // 5. Nothing lost, nothing twice.
        let mut names: Vec<&str> = devices.iter().filter_map(|d| d["name"].as_str()).collect();
        names.sort_unstable();
        let addrs: BTreeSet<&str> = devices
            .iter()
            .filter_map(|d| d["pci_address"].as_str())
            .collect();
        if addrs.len() != devices.len() {
            return Err(format!("5: an address is registered twice: {names:?}"));
        }
        let allowed = registered.iter().any(|set| {
            let mut set = set.to_vec();
            set.sort_unstable();
            set == names
        });
        if !allowed {
            return Err(format!(
                "5: registered devices are {names:?}, expected one of {registered:?}"
            ));
        }
        // 2. The registry agrees with the kernel.
        for d in &devices {
            self.agrees_with_kernel(d).map_err(|e| format!("2: {e}"))?;
        }
        // Functions vfiod holds on vfio: registered ones it bound and
        // their companions.
        let mut held: BTreeSet<String> = BTreeSet::new();
        for d in &devices {
            // A VF vfiod made lives on vfio-pci when its PF's vf_driver
            // says so, as a device found there.
            if d["bound_by_vfiod"] == true || !d["attached_to"].is_null() || !d["parent"].is_null()
            {
                held.insert(d["pci_address"].as_str().unwrap().to_owned());
                if let Some(companions) = d["group_companions"].as_array() {
                    held.extend(
                        companions
                            .iter()
                            .filter_map(|c| c.as_str().map(str::to_owned)),
                    );
                }
            }
        }
        for d in &devices {
            let addr = d["pci_address"].as_str().unwrap();
            let driver = self.fs.driver_of(addr);
            // 2. What vfiod holds and is on the bus is on vfio (a device
            //    vfiod is to put back there, after a re-plug or a restart,
            //    is not settled yet).
            let fit = matches!(d["health"].as_str(), Some("ok" | "needs_reset"));
            let holds = d["bound_by_vfiod"] == true || !d["attached_to"].is_null();
            if d["present"] == true
                && holds
                && fit
                && d["identity_mismatch"] == false
                && driver.as_deref() != Some(VFIO)
            {
                return Err(format!("2: {addr} is held by vfiod but on {driver:?}: {d}"));
            }
            // 1. A driver, unless the record says it has none to go back to.
            if d["present"] == true && driver.is_none() {
                let native = d["original_driver"].as_str();
                if native.is_some() || d["bound_by_vfiod"] == true {
                    return Err(format!("1: {addr} is left without a driver: {d}"));
                }
            }
        }
        // 3. No override of vfiod's on a device (VFs included) it does not
        //    hold on vfio, and every reset_method list as the kernel had it.
        for addr in self.fs.devices() {
            let driver = self.fs.driver_of(&addr);
            if let Some(o) = self.fs.driver_override_of(&addr) {
                let on_vfio = driver.as_deref() == Some(VFIO);
                if !on_vfio || !held.contains(&addr) {
                    return Err(format!(
                        "3: {addr} is on {driver:?} with driver_override {o:?} left (held by vfiod: {})",
                        held.contains(&addr)
                    ));
                }
            }
        }
        for spec in host_devices() {
            let addr = spec.addr.as_str();
            if self.fs.device_dir(addr).is_none() {
                continue;
            }
            if let Some(methods) = &spec.reset_methods {
                let now = self.fs.reset_method_of(addr).unwrap_or_default();
                if now != *methods {
                    return Err(format!(
                        "3: {addr}'s reset_method is {now:?}, not its own {methods:?}"
                    ));
                }
            }
        }
        // 8. VF records are the kernel's VFs.
        for d in &devices {
            if let Some(parent) = d["parent"].as_str() {
                let addr = d["pci_address"].as_str().unwrap();
                if self.fs.device_dir(addr).is_none() {
                    return Err(format!("8: VF record {addr} outlives its VF: {d}"));
                }
                if !devices.iter().any(|p| p["id"] == parent) {
                    return Err(format!("8: VF record {addr} outlives its PF's record"));
                }
            }
            if d["sriov"].is_null() || d["present"] != true {
                continue;
            }
            let id = &d["id"];
            let mut records: Vec<(u64, &str)> = devices
                .iter()
                .filter(|v| v["parent"] == *id)
                .map(|v| {
                    (
                        v["vf_index"].as_u64().unwrap_or(u64::MAX),
                        v["pci_address"].as_str().unwrap(),
                    )
                })
                .collect();
            records.sort_unstable();
            let recorded: Vec<&str> = records.into_iter().map(|(_, a)| a).collect();
            let pf = d["pci_address"].as_str().unwrap();
            let kernel = self.fs.vfs_of(pf);
            if recorded != kernel {
                return Err(format!(
                    "8: VF records of {pf} are {recorded:?}, the kernel's VFs {kernel:?}"
                ));
            }
        }
        // 9. Mediated devices are their records', handed out, granted to
        //    their uid alone.
        for d in &devices {
            let addr = d["pci_address"].as_str().unwrap();
            let records = d["mdevs"].as_array().cloned().unwrap_or_default();
            let mut recorded: Vec<&str> =
                records.iter().filter_map(|m| m["uuid"].as_str()).collect();
            recorded.sort_unstable();
            let mut kernel: Vec<String> = self.fs.mdevs(addr).into_iter().map(|(u, _)| u).collect();
            kernel.sort_unstable();
            let on_driver = self.fs.is_mdev_parent(addr);
            if on_driver && recorded != kernel {
                return Err(format!(
                    "9: mediated devices of {addr} are {kernel:?}, its records {recorded:?}"
                ));
            }
            for m in &records {
                if m["attached_uid"].is_null() {
                    return Err(format!(
                        "9: an unfinished mediated device is left recorded on {addr}: {m}"
                    ));
                }
                if let Some(pid) = m["attached_pid"].as_u64() {
                    if !process_running(pid) {
                        return Err(format!(
                            "9: mediated device {} outlives its VMM pid {pid}",
                            m["uuid"]
                        ));
                    }
                }
                let Some(group) = m["uuid"].as_str().and_then(|u| self.fs.mdev_group(u)) else {
                    continue;
                };
                let node = self.fs.tree().vfio_node(group);
                let uid = m["attached_uid"].as_u64().unwrap() as u32;
                let expected: Vec<u32> = if uid == 0 { vec![] } else { vec![uid] };
                let found = acl_users(&node);
                if node.exists() && found != expected {
                    return Err(format!(
                        "9: ACL entries on {} are for uids {found:?}, its mediated device's attachment is for {expected:?}",
                        node.display()
                    ));
                }
            }
        }
        // 4. ACL entries exactly for live attachments, and no attachment
        //    to a VMM that is gone.
        let mut by_group: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for d in &devices {
            if d["attached_to"].is_null() {
                continue;
            }
            if let Some(pid) = d["attached_pid"].as_u64() {
                if !process_running(pid) {
                    return Err(format!(
                        "4: {} is still attached to VMM pid {pid}, which is gone: {d}",
                        d["name"]
                    ));
                }
            }
            if let (Some(g), Some(uid)) = (d["iommu_group"].as_u64(), d["attached_uid"].as_u64()) {
                if uid != 0 && d["present"] == true {
                    by_group.entry(g).or_default().push(uid as u32);
                }
            }
        }
        for d in &devices {
            // Off the bus, its group number is free: the kernel gives it to
            // the next new group (a mediated device's, say), whose node is
            // then not this device's.
            if d["present"] != true {
                continue;
            }
            let Some(group) = d["iommu_group"].as_u64() else {
                continue;
            };
            let node = self.fs.tree().vfio_node(group as u32);
            if !node.exists() {
                continue;
            }
            let mut expected = by_group.get(&group).cloned().unwrap_or_default();
            expected.sort_unstable();
            expected.dedup();
            let found = acl_users(&node);
            if found != expected {
                return Err(format!(
                    "4: ACL entries on {} are for uids {found:?}, live attachments of group {group} are for {expected:?}",
                    node.display()
                ));
            }
        }
        Ok(())
    }

    /// Invariant 2 for one device.
    pub fn agrees_with_kernel(&self, d: &Value) -> Result<(), String> {
        let addr = d["pci_address"].as_str().unwrap();
        let present = self.fs.device_dir(addr).is_some();
        if d["present"] != present {
            return Err(format!("{addr}: present {} in the record", d["present"]));
        }
        if d["stuck"] == true {
            return Err(format!("{addr} is stuck"));
        }
        let driver = self.fs.driver_of(addr);
        let recorded = d["current_driver"].as_str().map(str::to_owned);
        if recorded != driver {
            return Err(format!("{addr}: record {recorded:?}, kernel {driver:?}"));
        }
        let on_vfio = driver.as_deref() == Some(VFIO);
        if d["bound_to_vfio"] != on_vfio {
            return Err(format!("{addr}: bound_to_vfio {}", d["bound_to_vfio"]));
        }
        Ok(())
    }

    // ---- what a device is like now, for the operations' effects ----

    pub fn driver(&self, addr: &str) -> Option<String> {
        self.fs.driver_of(addr)
    }

    pub fn on_vfio(&self, addr: &str) -> bool {
        self.driver(addr).as_deref() == Some(VFIO)
    }

    /// On its native driver, with no override left.
    pub fn native_clean(&self, addr: &str) -> bool {
        self.driver(addr) == spec_of(addr).driver && self.fs.driver_override_of(addr).is_none()
    }

    pub fn granted(&self, group: u32) -> bool {
        acl_users(&self.fs.tree().vfio_node(group)).contains(&VMM_UID)
    }
}

/// The step lines of a trace file.
pub fn trace_lines(trace: &Path) -> Vec<String> {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `path` exists (bounded); true if it appeared.
pub fn wait_for_file(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}
