//! SR-IOV in the fake tree and the simulated kernel: a PF's `sriov_*`
//! attributes, VFs created and removed by `sriov_numvfs` writes with
//! Linux's refusals, `sriov_drivers_autoprobe` on every probe path, the
//! VFs' links and IOMMU groups, uevents, unplug and reboot.

use nix::errno::Errno;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vfiod_test_support::fakesys::{DeviceSpec, FakeSys, VFIO_PCI};
use vfiod_test_support::simkernel::SimKernel;

const IDLE: Duration = Duration::from_secs(10);

/// The igb of the QEMU guest: 8086:10c9, VFs 8086:10ca, 7 of them.
const PF: &str = "0000:0b:00.0";
/// igb's VF addresses for [`PF`] (offset 128, stride 2).
const VFS: [&str; 7] = [
    "0000:0b:10.0",
    "0000:0b:10.2",
    "0000:0b:10.4",
    "0000:0b:10.6",
    "0000:0b:11.0",
    "0000:0b:11.2",
    "0000:0b:11.4",
];
const ROOT_PORT: &str = "0000:00:1c.0";
const PF_GROUP: u32 = 10;

fn root_port() -> DeviceSpec {
    DeviceSpec::new(ROOT_PORT, 0x8086, 0x7c10, 0x060400)
        .driver("pcieport")
        .group(PF_GROUP)
}

fn igb() -> DeviceSpec {
    DeviceSpec::new(PF, 0x8086, 0x10c9, 0x020000)
        .subsystem(0x8086, 0xa03c)
        .driver("igb")
        .group(PF_GROUP)
        .parent(ROOT_PORT)
        .reset_methods("flr bus")
        .sriov(7, 0x10ca)
        .vf_driver("igbvf")
}

/// A host with vfio-pci loaded, a root port and `pf` behind it, and a
/// simulated kernel.
fn host(pf: DeviceSpec) -> (FakeSys, SimKernel) {
    let fs = FakeSys::with_devices([root_port(), pf]);
    let sim = SimKernel::start(&fs);
    (fs, sim)
}

/// A sysfs write the way vfiod (and `echo`) does it: existing file,
/// truncated, one write(2).
fn w(fs: &FakeSys, rel: &str, value: &str) {
    let path = fs.path(rel);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {rel}: {e}"));
    let n = f
        .write(value.as_bytes())
        .unwrap_or_else(|e| panic!("write {rel} <- {value:?}: {e}"));
    assert_eq!(n, value.len(), "short write");
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn attr(fs: &FakeSys, addr: &str, name: &str) -> String {
    read(&fs.path(&format!("bus/pci/devices/{addr}/{name}")))
}

fn pf_attr(fs: &FakeSys, name: &str) -> String {
    attr(fs, PF, name)
}

fn numvfs_path() -> String {
    format!("bus/pci/devices/{PF}/sriov_numvfs")
}

fn autoprobe_path() -> String {
    format!("bus/pci/devices/{PF}/sriov_drivers_autoprobe")
}

/// Writes `sriov_numvfs` and waits for the simulated kernel to act.
fn set_numvfs(fs: &FakeSys, sim: &SimKernel, n: &str) {
    w(fs, &numvfs_path(), n);
    assert!(sim.wait_idle(IDLE));
}

fn set_autoprobe(fs: &FakeSys, sim: &SimKernel, on: bool) {
    w(fs, &autoprobe_path(), if on { "1" } else { "0" });
    assert!(sim.wait_idle(IDLE));
}

fn link_target(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|e| panic!("resolve {}: {e}", p.display()))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------
// The PF before any VF
// ---------------------------------------------------------------------------

#[test]
fn pf_shows_its_sriov_attributes_like_linux() {
    let fs = FakeSys::with_devices([root_port(), igb().numa_node(1)]);
    assert_eq!(pf_attr(&fs, "sriov_totalvfs"), "7\n");
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
    assert_eq!(pf_attr(&fs, "sriov_drivers_autoprobe"), "1\n");
    // "%x": no 0x, no padding.
    assert_eq!(pf_attr(&fs, "sriov_vf_device"), "10ca\n");
    assert_eq!(pf_attr(&fs, "sriov_offset"), "128\n");
    assert_eq!(pf_attr(&fs, "sriov_stride"), "2\n");
    assert_eq!(pf_attr(&fs, "numa_node"), "1\n");
    assert_eq!(fs.sriov_numvfs(PF), 0);
    assert!(fs.vfs_of(PF).is_empty());
    assert!(fs.autoprobe_of(PF));
    // Functions that are no PF have none of it.
    let rp = fs.path(&format!("bus/pci/devices/{ROOT_PORT}"));
    assert!(!rp.join("sriov_numvfs").exists());
    assert_eq!(read(&rp.join("numa_node")), "-1\n");
    assert_eq!(fs.sriov_numvfs(ROOT_PORT), 0);
    // vfio-pci's parameter, off by default.
    assert_eq!(
        read(&fs.path("module/vfio_pci/parameters/enable_sriov")),
        "N\n"
    );
    fs.set_vfio_enable_sriov(true);
    assert_eq!(
        read(&fs.path("module/vfio_pci/parameters/enable_sriov")),
        "Y\n"
    );
}

#[test]
fn vf_addresses_follow_routing_id_offset_and_stride() {
    let pf = igb();
    let addrs: Vec<String> = (0..7).map(|i| pf.vf_addr(i).unwrap()).collect();
    assert_eq!(addrs, strings(&VFS));
    // Another layout: offset 1, stride 1 from function 0 (multi-function
    // style), and a carry into the next bus.
    let pf = DeviceSpec::new("0001:3a:00.0", 0x15b3, 0x101d, 0x020000)
        .sriov(8, 0x101e)
        .sriov_layout(1, 1);
    assert_eq!(pf.vf_addr(0).unwrap(), "0001:3a:00.1");
    assert_eq!(pf.vf_addr(7).unwrap(), "0001:3a:01.0");
    let pf = DeviceSpec::new("0000:0b:1f.0", 0x8086, 0x10c9, 0x020000).sriov(7, 0x10ca);
    assert_eq!(pf.vf_addr(0).unwrap(), "0000:0c:0f.0");
    assert_eq!(DeviceSpec::new(PF, 1, 2, 3).vf_addr(0), None);
}

// ---------------------------------------------------------------------------
// Enabling
// ---------------------------------------------------------------------------

#[test]
fn enabling_creates_vfs_next_to_the_pf_with_links_ids_and_own_groups() {
    let (fs, sim) = host(igb().numa_node(1));
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "4");
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "4\n");
    assert_eq!(fs.sriov_numvfs(PF), 4);
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..4]));
    assert!(
        sim.refused_writes().is_empty(),
        "{:?}",
        sim.refused_writes()
    );
    let pf_dir = fs.device_dir(PF).unwrap();
    let mut groups = Vec::new();
    for (i, vf) in VFS[..4].iter().enumerate() {
        assert_eq!(fs.pf_of(vf).as_deref(), Some(PF));
        let dir = fs
            .device_dir(vf)
            .unwrap_or_else(|| panic!("{vf} on the bus"));
        // A sibling of the PF, not below it.
        assert_eq!(dir.parent(), pf_dir.parent(), "{vf}");
        assert_eq!(link_target(&dir.join("physfn")), pf_dir);
        assert_eq!(link_target(&pf_dir.join(format!("virtfn{i}"))), dir);
        // Relative links, like the kernel's.
        assert!(fs::read_link(dir.join("physfn")).unwrap().is_relative());
        assert_eq!(attr(&fs, vf, "vendor"), "0x8086\n");
        assert_eq!(attr(&fs, vf, "device"), "0x10ca\n");
        assert_eq!(attr(&fs, vf, "class"), "0x020000\n");
        assert_eq!(attr(&fs, vf, "subsystem_vendor"), "0x8086\n");
        assert_eq!(attr(&fs, vf, "subsystem_device"), "0xa03c\n");
        assert_eq!(
            attr(&fs, vf, "modalias"),
            "pci:v00008086d000010CAsv00008086sd0000A03Cbc02sc00i00\n"
        );
        assert_eq!(attr(&fs, vf, "numa_node"), "1\n");
        assert_eq!(attr(&fs, vf, "driver_override"), "(null)\n");
        assert_eq!(fs.reset_method_of(vf).as_deref(), Some("flr"));
        assert!(dir.join("reset").exists());
        let config = fs::read(dir.join("config")).unwrap();
        assert_eq!(&config[0..4], &[0x86, 0x80, 0xca, 0x10]);
        // No SR-IOV attributes of its own.
        assert!(!dir.join("sriov_numvfs").exists());
        assert_eq!(fs.driver_of(vf), None, "autoprobe 0: {vf} stays driverless");
        let g = fs.iommu_group_of(vf).expect("a group");
        assert_eq!(fs.group_members(g), strings(&[vf]));
        groups.push(g);
    }
    // Each VF a new group: the lowest free numbers, as Linux's IDA.
    assert_eq!(groups, vec![0, 1, 2, 3]);
    assert_eq!(
        fs.group_members(PF_GROUP),
        strings(&[ROOT_PORT, PF]),
        "the PF's group is unchanged"
    );
    assert!(!pf_dir.join("virtfn4").exists());
    assert!(fs.devices().contains(&VFS[3].to_string()));
    assert!(!fs.devices().contains(&VFS[4].to_string()));
}

#[test]
fn vfs_share_the_pf_group_behind_a_port_without_acs() {
    let (fs, sim) = host(igb().vfs_share_group());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "3");
    for vf in &VFS[..3] {
        assert_eq!(fs.iommu_group_of(vf), Some(PF_GROUP));
    }
    let mut expected = strings(&[ROOT_PORT, PF]);
    expected.extend(strings(&VFS[..3]));
    expected.sort();
    assert_eq!(fs.group_members(PF_GROUP), expected);
    // A VF bound to vfio-pci makes the shared group's node; the kernel
    // does not refuse that (only opening the group would fail).
    w(
        &fs,
        &format!("bus/pci/devices/{}/driver_override", VFS[0]),
        "vfio-pci",
    );
    w(&fs, "bus/pci/drivers_probe", VFS[0]);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[0]).as_deref(), Some(VFIO_PCI));
    assert!(fs.vfio_group_node_exists(PF_GROUP));
    assert_eq!(
        fs.driver_of(PF).as_deref(),
        Some("igb"),
        "the PF did not move"
    );
    // Disabling leaves the group to the root port and the PF.
    set_numvfs(&fs, &sim, "0");
    assert_eq!(fs.group_members(PF_GROUP), strings(&[ROOT_PORT, PF]));
    assert!(!fs.vfio_group_node_exists(PF_GROUP));
}

// ---------------------------------------------------------------------------
// Autoprobe and probing
// ---------------------------------------------------------------------------

#[test]
fn with_autoprobe_on_new_vfs_go_to_their_native_driver() {
    let (fs, sim) = host(igb());
    assert!(!fs.tree().driver_loaded("igbvf"));
    set_numvfs(&fs, &sim, "2");
    // Loaded as udev would from the modalias, then bound at creation.
    assert!(fs.tree().driver_loaded("igbvf"));
    for vf in &VFS[..2] {
        assert_eq!(fs.driver_of(vf).as_deref(), Some("igbvf"), "{vf}");
        assert!(fs.path(&format!("bus/pci/drivers/igbvf/{vf}")).exists());
    }
}

#[test]
fn with_autoprobe_off_no_vf_driver_binds_on_any_path_without_an_override() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    assert_eq!(pf_attr(&fs, "sriov_drivers_autoprobe"), "0\n");
    assert!(!fs.autoprobe_of(PF));
    set_numvfs(&fs, &sim, "2");
    // igbvf is loaded (udev does that whatever autoprobe says) yet probed
    // nothing.
    assert!(fs.tree().driver_loaded("igbvf"));
    for vf in &VFS[..2] {
        assert_eq!(fs.driver_of(vf), None, "{vf}");
    }
    // drivers_probe, an explicit bind and a driver registration all go
    // through pci_device_can_probe.
    w(&fs, "bus/pci/drivers_probe", VFS[0]);
    w(&fs, "bus/pci/drivers/igbvf/bind", VFS[1]);
    w(&fs, "bus/pci/drivers/vfio-pci/bind", VFS[1]);
    assert!(sim.wait_idle(IDLE));
    fs.remove_driver("igbvf");
    fs.add_driver("igbvf");
    assert!(sim.wait_idle(IDLE));
    for vf in &VFS[..2] {
        assert_eq!(fs.driver_of(vf), None, "{vf}");
    }
    // An override lets the VF be probed: straight to vfio-pci.
    w(
        &fs,
        &format!("bus/pci/devices/{}/driver_override", VFS[0]),
        "vfio-pci",
    );
    w(&fs, "bus/pci/drivers_probe", VFS[0]);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[0]).as_deref(), Some(VFIO_PCI));
    let g = fs.iommu_group_of(VFS[0]).unwrap();
    assert!(fs.vfio_group_node_exists(g));
    // An override also allows an explicit bind.
    w(
        &fs,
        &format!("bus/pci/devices/{}/driver_override", VFS[1]),
        "igbvf",
    );
    w(&fs, "bus/pci/drivers/igbvf/bind", VFS[1]);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[1]).as_deref(), Some("igbvf"));
    // Autoprobe back on: a plain probe binds the native VF driver again.
    w(&fs, "bus/pci/drivers/igbvf/unbind", VFS[1]);
    w(
        &fs,
        &format!("bus/pci/devices/{}/driver_override", VFS[1]),
        "\n",
    );
    set_autoprobe(&fs, &sim, true);
    assert_eq!(fs.driver_of(VFS[1]), None);
    w(&fs, "bus/pci/drivers_probe", VFS[1]);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[1]).as_deref(), Some("igbvf"));
    assert!(sim.refused_writes().is_empty());
}

#[test]
fn autoprobe_accepts_kernel_booleans_and_refuses_anything_else() {
    let (fs, sim) = host(igb());
    for (value, expected) in [("n", false), ("Y\n", true), ("0\n", false), ("on", true)] {
        w(&fs, &autoprobe_path(), value);
        assert!(sim.wait_idle(IDLE));
        assert_eq!(fs.autoprobe_of(PF), expected, "{value:?}");
        assert_eq!(
            pf_attr(&fs, "sriov_drivers_autoprobe"),
            if expected { "1\n" } else { "0\n" }
        );
    }
    w(&fs, &autoprobe_path(), "maybe");
    assert!(sim.wait_idle(IDLE));
    assert!(fs.autoprobe_of(PF));
    assert_eq!(pf_attr(&fs, "sriov_drivers_autoprobe"), "1\n");
    assert_eq!(
        sim.refused_writes(),
        vec![(autoprobe_path(), "maybe".to_string(), Errno::EINVAL)]
    );
}

#[test]
fn a_pf_without_a_vf_driver_leaves_its_vfs_driverless_even_with_autoprobe() {
    let pf = DeviceSpec::new(PF, 0x8086, 0x10c9, 0x020000)
        .driver("igb")
        .group(PF_GROUP)
        .parent(ROOT_PORT)
        .sriov(7, 0x10ca);
    let (fs, sim) = host(pf);
    set_numvfs(&fs, &sim, "2");
    assert_eq!(fs.vfs_of(PF).len(), 2);
    for vf in &VFS[..2] {
        assert_eq!(fs.driver_of(vf), None);
    }
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Writes `value`, waits, and checks that the kernel refused it with
/// `errno` and that nothing changed.
#[track_caller]
fn assert_refused(fs: &FakeSys, sim: &SimKernel, value: &str, errno: Errno) {
    let vfs = fs.vfs_of(PF);
    let shown = pf_attr(fs, "sriov_numvfs");
    let before = sim.refused_writes().len();
    set_numvfs(fs, sim, value);
    let refused = sim.refused_writes();
    assert_eq!(
        refused.get(before),
        Some(&(numvfs_path(), value.to_string(), errno)),
        "{refused:?}"
    );
    assert_eq!(refused.len(), before + 1);
    assert_eq!(fs.vfs_of(PF), vfs, "VFs changed by a refused {value:?}");
    assert_eq!(pf_attr(fs, "sriov_numvfs"), shown, "file changed");
}

#[test]
fn n_to_m_is_ebusy_and_above_total_is_erange_state_unchanged() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    assert_refused(&fs, &sim, "3", Errno::EBUSY);
    assert_refused(&fs, &sim, "1\n", Errno::EBUSY);
    // ERANGE is checked first, even while VFs are enabled.
    assert_refused(&fs, &sim, "9", Errno::ERANGE);
    assert_refused(&fs, &sim, "two", Errno::EINVAL);
    assert_refused(&fs, &sim, "-1", Errno::EINVAL);
    // The same count is a no-op, not a refusal.
    set_numvfs(&fs, &sim, "2");
    assert_eq!(sim.refused_writes().len(), 5);
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..2]));
    // Through 0, the change works.
    set_numvfs(&fs, &sim, "0");
    set_numvfs(&fs, &sim, "3");
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..3]));
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "3\n");
    // Every write is in the log, refused or not.
    let numvfs_writes: Vec<String> = sim
        .writes()
        .into_iter()
        .filter(|(p, _)| *p == numvfs_path())
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        numvfs_writes,
        strings(&["2", "3", "1\n", "9", "two", "-1", "2", "0", "3"])
    );
}

#[test]
fn a_driverless_pf_or_a_driver_without_sriov_configure_is_enoent() {
    // No driver.
    let (fs, sim) = host(
        DeviceSpec::new(PF, 0x8086, 0x10c9, 0x020000)
            .group(PF_GROUP)
            .parent(ROOT_PORT)
            .sriov(7, 0x10ca),
    );
    assert_refused(&fs, &sim, "2", Errno::ENOENT);
    // 0 while 0 is the no-op, checked before the driver.
    set_numvfs(&fs, &sim, "0");
    assert_eq!(sim.refused_writes().len(), 1);
    drop(sim);
    drop(fs);

    // A native driver without sriov_configure.
    let (fs, sim) = host(igb().sriov_capable_driver(false));
    assert_refused(&fs, &sim, "2", Errno::ENOENT);
    drop(sim);
    drop(fs);

    // Another driver than the native one (it has no sriov_configure).
    let (fs, sim) = host(igb());
    w(&fs, "bus/pci/drivers/igb/unbind", PF);
    fs.add_driver("other");
    w(
        &fs,
        &format!("bus/pci/devices/{PF}/driver_override"),
        "other",
    );
    w(&fs, "bus/pci/drivers_probe", PF);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(PF).as_deref(), Some("other"));
    assert_refused(&fs, &sim, "2", Errno::ENOENT);
}

#[test]
fn vfio_pci_enables_vfs_only_with_enable_sriov_and_captures_their_override() {
    let (fs, sim) = host(igb());
    w(
        &fs,
        &format!("bus/pci/devices/{PF}/driver_override"),
        "vfio-pci",
    );
    w(&fs, "bus/pci/drivers/igb/unbind", PF);
    w(&fs, "bus/pci/drivers_probe", PF);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(PF).as_deref(), Some(VFIO_PCI));
    assert_refused(&fs, &sim, "2", Errno::ENOENT);
    fs.set_vfio_enable_sriov(true);
    // Autoprobe 0 does not stop them: vfio-pci set their override.
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..2]));
    for vf in &VFS[..2] {
        assert_eq!(fs.driver_override_of(vf).as_deref(), Some(VFIO_PCI));
        assert_eq!(fs.driver_of(vf).as_deref(), Some(VFIO_PCI), "{vf}");
        assert!(fs.vfio_group_node_exists(fs.iommu_group_of(vf).unwrap()));
    }
    // Without the parameter, even 0 is refused (the driver cannot).
    fs.set_vfio_enable_sriov(false);
    assert_refused(&fs, &sim, "0", Errno::ENOENT);
    fs.set_vfio_enable_sriov(true);
    set_numvfs(&fs, &sim, "0");
    assert!(fs.vfs_of(PF).is_empty());
}

#[test]
fn a_driver_that_enables_fewer_vfs_leaves_that_many() {
    let (fs, sim) = host(igb());
    sim.limit_vfs(PF, 2);
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "5");
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "2\n");
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..2]));
    assert!(
        sim.refused_writes().is_empty(),
        "partial enabling is no error"
    );
    // Now 2 are enabled: 5 again is a change, so EBUSY.
    assert_refused(&fs, &sim, "5", Errno::EBUSY);
}

// ---------------------------------------------------------------------------
// Disabling, unbinding, unplugging, rebooting
// ---------------------------------------------------------------------------

#[test]
fn zero_unbinds_and_removes_every_vf_with_its_group_and_node() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "3");
    let groups: Vec<u32> = VFS[..3]
        .iter()
        .map(|vf| fs.iommu_group_of(vf).unwrap())
        .collect();
    w(
        &fs,
        &format!("bus/pci/devices/{}/driver_override", VFS[1]),
        "vfio-pci",
    );
    w(&fs, "bus/pci/drivers_probe", VFS[1]);
    assert!(sim.wait_idle(IDLE));
    assert!(fs.vfio_group_node_exists(groups[1]));
    let pf_dir = fs.device_dir(PF).unwrap();
    let parent = pf_dir.parent().unwrap().to_path_buf();
    set_numvfs(&fs, &sim, "0\n");
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
    assert!(fs.vfs_of(PF).is_empty());
    for (vf, g) in VFS[..3].iter().zip(&groups) {
        assert!(fs.device_dir(vf).is_none(), "{vf}");
        assert!(!parent.join(vf).exists(), "{vf}'s directory");
        assert!(!fs.path(&format!("kernel/iommu_groups/{g}")).exists());
        assert!(!fs.vfio_group_node_exists(*g));
        assert_eq!(fs.pf_of(vf), None);
    }
    assert!(!fs
        .path(&format!("bus/pci/drivers/vfio-pci/{}", VFS[1]))
        .exists());
    for i in 0..3 {
        assert!(!pf_dir.join(format!("virtfn{i}")).exists());
    }
    // The PF keeps its autoprobe setting: whoever set it restores it.
    assert!(!fs.autoprobe_of(PF));
    assert_eq!(fs.driver_of(PF).as_deref(), Some("igb"));
    // And VFs come back at the same addresses.
    set_numvfs(&fs, &sim, "1");
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..1]));
    assert_eq!(fs.iommu_group_of(VFS[0]), Some(groups[0]));
    assert_eq!(
        fs.driver_override_of(VFS[0]),
        None,
        "a new VF, a new override"
    );
}

#[test]
fn unbinding_the_pf_driver_tears_its_vfs_down() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    w(&fs, "bus/pci/drivers/igb/unbind", PF);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(PF), None);
    assert!(fs.vfs_of(PF).is_empty());
    assert!(fs.device_dir(VFS[0]).is_none());
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
    assert_eq!(pf_attr(&fs, "sriov_drivers_autoprobe"), "0\n", "stays 0");
    // Back on igb, VFs can be enabled again.
    w(&fs, "bus/pci/drivers_probe", PF);
    set_numvfs(&fs, &sim, "1");
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..1]));
}

#[test]
fn pf_unplug_removes_its_vfs_first_and_replug_starts_from_zero() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "3");
    let vf_groups: Vec<u32> = VFS[..3]
        .iter()
        .map(|vf| fs.iommu_group_of(vf).unwrap())
        .collect();
    fs.remove_device(PF);
    assert!(sim.wait_idle(IDLE));
    let left = fs.devices();
    assert_eq!(left, strings(&[ROOT_PORT]), "VFs are not left behind");
    for g in vf_groups {
        assert!(fs.group_members(g).is_empty());
    }
    assert!(fs.vfs_of(PF).is_empty());
    fs.add_device(igb());
    assert!(sim.wait_idle(IDLE));
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
    assert_eq!(pf_attr(&fs, "sriov_drivers_autoprobe"), "1\n");
    assert!(fs.autoprobe_of(PF));
    // The re-added PF works like new, its writes seen by the simulator.
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    assert_eq!(fs.vfs_of(PF), strings(&VFS[..2]));
    // Unplugging the bridge above takes PF and VFs.
    fs.remove_device(ROOT_PORT);
    assert!(fs.devices().is_empty());
}

#[test]
#[should_panic(expected = "is a VF of")]
fn a_vf_cannot_be_unplugged_alone() {
    let (fs, sim) = host(igb());
    set_numvfs(&fs, &sim, "1");
    fs.remove_device(VFS[0]);
}

#[test]
fn a_reboot_resets_the_count_and_autoprobe_without_uevents() {
    let (fs, sim) = host(igb());
    let mut events = UeventReader::open(&fs);
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    assert_eq!(
        events.take(2),
        strings(&["add 0000:0b:10.0", "add 0000:0b:10.2"])
    );
    fs.reboot_sriov(PF);
    assert!(sim.wait_idle(IDLE));
    assert!(fs.vfs_of(PF).is_empty());
    assert!(fs.device_dir(VFS[0]).is_none());
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
    assert_eq!(pf_attr(&fs, "sriov_drivers_autoprobe"), "1\n");
    assert!(fs.autoprobe_of(PF));
    assert!(events.nothing_more(Duration::from_millis(200)));
    // The simulator still acts on the PF after the "reboot".
    set_numvfs(&fs, &sim, "1");
    assert_eq!(
        events.take(2),
        strings(&["add 0000:0b:10.0", "bind 0000:0b:10.0 igbvf"])
    );
}

// ---------------------------------------------------------------------------
// Uevents
// ---------------------------------------------------------------------------

/// The reading end of the uevent FIFO, as vfiod's `--uevent-fifo` has it.
struct UeventReader {
    reader: BufReader<fs::File>,
}

impl UeventReader {
    fn open(fs: &FakeSys) -> UeventReader {
        let path = fs.uevent_fifo();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&path)
            .unwrap();
        UeventReader {
            reader: BufReader::new(file),
        }
    }

    /// The next `n` lines, waiting up to 10 s for them.
    fn take(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let deadline = Instant::now() + IDLE;
        let mut line = String::new();
        while out.len() < n && Instant::now() < deadline {
            match self.reader.read_line(&mut line) {
                Ok(_) if line.ends_with('\n') => {
                    out.push(line.trim_end().to_string());
                    line.clear();
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("uevent FIFO: {e}"),
            }
        }
        assert!(line.is_empty(), "a partial line {line:?}");
        out
    }

    /// True if no line comes within `wait`.
    fn nothing_more(&mut self, wait: Duration) -> bool {
        std::thread::sleep(wait);
        let mut rest = Vec::new();
        match self.reader.get_mut().read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("uevent FIFO: {e}"),
        }
        rest.is_empty() && self.reader.buffer().is_empty()
    }
}

#[test]
fn uevents_tell_each_vf_added_bound_and_removed_in_order() {
    let (fs, sim) = host(igb());
    let mut events = UeventReader::open(&fs);
    set_numvfs(&fs, &sim, "3");
    assert_eq!(
        events.take(6),
        strings(&[
            "add 0000:0b:10.0",
            "bind 0000:0b:10.0 igbvf",
            "add 0000:0b:10.2",
            "bind 0000:0b:10.2 igbvf",
            "add 0000:0b:10.4",
            "bind 0000:0b:10.4 igbvf",
        ])
    );
    set_numvfs(&fs, &sim, "0");
    assert_eq!(
        events.take(3),
        strings(&[
            "remove 0000:0b:10.4",
            "remove 0000:0b:10.2",
            "remove 0000:0b:10.0"
        ])
    );
    // Refusals and no-ops send nothing.
    set_numvfs(&fs, &sim, "0");
    set_numvfs(&fs, &sim, "8");
    assert!(events.nothing_more(Duration::from_millis(100)));
    // Autoprobe off: added, never bound.
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    assert_eq!(
        events.take(2),
        strings(&["add 0000:0b:10.0", "add 0000:0b:10.2"])
    );
    // A PF unplug removes its VFs with uevents too.
    fs.remove_device(PF);
    assert_eq!(
        events.take(2),
        strings(&["remove 0000:0b:10.2", "remove 0000:0b:10.0"])
    );
    assert!(events.nothing_more(Duration::from_millis(100)));
}

#[test]
fn uevents_nobody_reads_are_lost_and_block_nothing() {
    let (fs, sim) = host(igb());
    let path = fs.uevent_fifo();
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // No reader: the lines are dropped, the VFs still appear.
    set_numvfs(&fs, &sim, "2");
    assert_eq!(fs.vfs_of(PF).len(), 2);
    // A reader that comes later gets only what happens from then on.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
        .unwrap();
    let mut events = UeventReader {
        reader: BufReader::new(file),
    };
    set_numvfs(&fs, &sim, "0");
    assert_eq!(
        events.take(2),
        strings(&["remove 0000:0b:10.2", "remove 0000:0b:10.0"])
    );
    // The reader goes away (vfiod stops) and another comes (it restarts):
    // nothing stale, nothing lost from then on.
    drop(events);
    set_numvfs(&fs, &sim, "1");
    set_numvfs(&fs, &sim, "0");
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
        .unwrap();
    let mut events = UeventReader {
        reader: BufReader::new(file),
    };
    set_numvfs(&fs, &sim, "1");
    assert_eq!(
        events.take(2),
        strings(&["add 0000:0b:10.0", "bind 0000:0b:10.0 igbvf"])
    );
    assert!(events.nothing_more(Duration::from_millis(100)));
}

// ---------------------------------------------------------------------------
// A held VF
// ---------------------------------------------------------------------------

#[test]
fn a_hung_numvfs_write_completes_on_release() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    // A VF held open: writing 0 blocks in the kernel.
    sim.hang_write(&numvfs_path());
    let path = fs.path(&numvfs_path());
    let writer = std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(b"0").unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!writer.is_finished(), "the write blocks while a VF is held");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.vfs_of(PF).len(), 2, "nothing happened yet");
    sim.release(&numvfs_path());
    writer.join().unwrap();
    assert!(sim.wait_idle(IDLE));
    assert!(fs.vfs_of(PF).is_empty());
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
    assert!(sim.refused_writes().is_empty());
    // The attribute works normally again.
    set_numvfs(&fs, &sim, "1");
    assert_eq!(fs.vfs_of(PF).len(), 1);
}

#[test]
fn a_pf_unbind_while_numvfs_hangs_shows_zero_after_release() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    set_numvfs(&fs, &sim, "2");
    sim.hang_write(&numvfs_path());
    w(&fs, "bus/pci/drivers/igb/unbind", PF);
    assert!(sim.wait_idle(IDLE));
    assert!(fs.vfs_of(PF).is_empty());
    sim.release(&numvfs_path());
    assert!(sim.wait_idle(IDLE));
    assert_eq!(pf_attr(&fs, "sriov_numvfs"), "0\n");
}

// ---------------------------------------------------------------------------
// Many at once
// ---------------------------------------------------------------------------

#[test]
fn all_seven_vfs_and_back_quickly() {
    let (fs, sim) = host(igb());
    set_autoprobe(&fs, &sim, false);
    for _ in 0..5 {
        set_numvfs(&fs, &sim, "7");
        assert_eq!(fs.vfs_of(PF), strings(&VFS));
        set_numvfs(&fs, &sim, "0");
        assert!(fs.vfs_of(PF).is_empty());
    }
    // Quick successive writes without waiting are all acted on, in order.
    w(&fs, &numvfs_path(), "3");
    assert!(wait_until(IDLE, || fs.sriov_numvfs(PF) == 3));
    w(&fs, &numvfs_path(), "0");
    assert!(wait_until(IDLE, || fs.sriov_numvfs(PF) == 0));
    w(&fs, &numvfs_path(), "5");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.sriov_numvfs(PF), 5);
    assert!(sim.refused_writes().is_empty());
}

#[test]
fn a_reader_that_reopens_at_eof_like_vfiod_gets_every_line_of_a_burst() {
    let (fs, sim) = host(igb());
    let path = fs.uevent_fifo();
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    // vfiod's read_fifo: blocking open, lines until EOF, open again.
    let reader_path = path.clone();
    std::thread::spawn(move || loop {
        let Ok(file) = fs::File::open(&reader_path) else {
            return;
        };
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Wait until the reader is in open() (a nonblocking writer's open then
    // succeeds), then let the burst go.
    assert!(wait_until(IDLE, || fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
        .is_ok()));
    let mut expected = Vec::new();
    for _ in 0..3 {
        set_numvfs(&fs, &sim, "7");
        set_numvfs(&fs, &sim, "0");
        for vf in VFS {
            expected.push(format!("add {vf}"));
            expected.push(format!("bind {vf} igbvf"));
        }
        expected.extend(VFS.iter().rev().map(|vf| format!("remove {vf}")));
    }
    let got: Vec<String> = (0..expected.len())
        .map_while(|_| rx.recv_timeout(IDLE).ok())
        .collect();
    assert_eq!(got, expected);
    // Leave no reader thread blocked in open() behind: give it a writer.
    drop(rx);
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
        .map(|mut f| f.write_all(b"x\n"));
}
