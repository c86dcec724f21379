//! The kit's fakes act like the kernel they stand in for: the fake sysfs
//! builder (`fakesys`) lays out the kernel's PCI tree and never touches the
//! real `/sys`; the simulated kernel (`simkernel`) reacts to each write as
//! Linux does, and fails or hangs one on demand.

use nix::errno::Errno;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vfiod_test_support::fakesys::{self, DeviceSpec, FakeSys, TempDir};
use vfiod_test_support::simkernel::{self, SimKernel};
use vfiod_test_support::standard::{EDU, GPU, GPU_AUDIO, NIC, ROOT_PORT, T4};

fn link_name(p: &Path) -> String {
    fs::read_link(p)
        .unwrap_or_else(|e| panic!("read_link {}: {e}", p.display()))
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------

#[test]
fn empty_tree_layout() {
    let fs = FakeSys::new();
    assert!(fs.sysfs.starts_with(fs.tmp_root()));
    assert!(fs.devfs.starts_with(fs.tmp_root()));
    assert!(fs
        .tmp_root()
        .starts_with(fs::canonicalize(std::env::temp_dir()).unwrap()));
    for d in [
        "bus/pci/devices",
        "bus/pci/drivers",
        "kernel/iommu_groups",
        "devices/pci0000:00",
    ] {
        assert!(fs.path(d).is_dir(), "{d}");
    }
    assert!(fs.path("bus/pci/drivers_probe").is_file());
    assert!(fs.path("bus/pci/rescan").is_file());
    assert!(fs.devfs.is_dir());
    // vfio not loaded
    assert!(!fs.path("module/vfio_pci").exists());
    assert!(!fs.path("bus/pci/drivers/vfio-pci").exists());
    assert!(!fs.devfs.join("vfio/vfio").exists());
    assert!(!fs.vfio_loaded());
    assert!(fs.devices().is_empty());
}

#[test]
fn standard_host_device_attributes() {
    let fs = FakeSys::standard_host();
    let gpu = fs.path("bus/pci/devices").join(GPU);
    assert_eq!(read(&gpu.join("vendor")), "0x10de\n");
    assert_eq!(read(&gpu.join("device")), "0x2236\n");
    assert_eq!(read(&gpu.join("subsystem_vendor")), "0x10de\n");
    assert_eq!(read(&gpu.join("subsystem_device")), "0x1482\n");
    assert_eq!(read(&gpu.join("class")), "0x030200\n");
    assert_eq!(
        read(&gpu.join("modalias")),
        "pci:v000010DEd00002236sv000010DEsd00001482bc03sc02i00\n"
    );
    assert_eq!(read(&gpu.join("driver_override")), "(null)\n");
    for attr in ["enable", "numa_node", "irq", "revision"] {
        assert!(!read(&gpu.join(attr)).trim().is_empty(), "{attr}");
    }
    assert_eq!(fs.driver_override_of(GPU), None);
    let expected = [
        ("0000:00:00.0", None, Some(0)),
        (ROOT_PORT, Some("pcieport"), Some(1)),
        (GPU, Some("nvidia"), Some(1)),
        (GPU_AUDIO, Some("snd_hda_intel"), Some(1)),
        (NIC, Some("e1000e"), Some(2)),
        (EDU, None, Some(3)),
        (T4, Some("vfio-pci"), Some(4)),
        ("0000:00:05.0", Some("amdgpu"), Some(5)),
        ("0000:00:06.0", Some("nvme"), Some(6)),
    ];
    let mut addrs: Vec<String> = expected.iter().map(|e| e.0.to_string()).collect();
    addrs.sort();
    assert_eq!(fs.devices(), addrs);
    for (addr, driver, group) in expected {
        assert_eq!(fs.driver_of(addr).as_deref(), driver, "{addr}");
        assert_eq!(fs.iommu_group_of(addr), group, "{addr}");
        assert_eq!(fs.native_driver_of(addr).as_deref(), driver, "{addr}");
        let dir = fs.path("bus/pci/devices").join(addr);
        assert_eq!(dir.join("driver").exists(), driver.is_some(), "{addr}");
    }
    assert_eq!(
        read(&fs.path("bus/pci/devices/0000:00:01.0/class")),
        "0x060400\n"
    );
    assert_eq!(
        read(&fs.path("bus/pci/devices/0000:00:06.0/class")),
        "0x010802\n"
    );
    assert_eq!(
        read(&fs.path("bus/pci/devices/0000:00:03.0/modalias")),
        "pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00\n"
    );
}

#[test]
fn symlinks_are_relative_and_resolve_like_the_kernels() {
    let fs = FakeSys::standard_host();
    let root = &fs.sysfs;

    // Bus links.
    for addr in fs.devices() {
        let link = fs.path("bus/pci/devices").join(&addr);
        let target = fs::read_link(&link).unwrap();
        assert!(target.is_relative(), "{}", target.display());
        assert!(
            target.starts_with("../../../devices/pci0000:00"),
            "{}",
            target.display()
        );
        let canon = fs::canonicalize(&link).unwrap();
        assert_eq!(canon, fs.device_dir(&addr).unwrap());
        assert_eq!(canon.file_name().unwrap().to_str().unwrap(), addr);
        assert!(canon.starts_with(root.join("devices/pci0000:00")));
    }
    // Exact forms on the root bus, as on a real machine.
    assert_eq!(
        fs::read_link(fs.path("bus/pci/devices/0000:00:02.0")).unwrap(),
        Path::new("../../../devices/pci0000:00/0000:00:02.0")
    );
    assert_eq!(
        fs::read_link(fs.path("devices/pci0000:00/0000:00:02.0/driver")).unwrap(),
        Path::new("../../../bus/pci/drivers/e1000e")
    );
    assert_eq!(
        fs::read_link(fs.path("devices/pci0000:00/0000:00:02.0/iommu_group")).unwrap(),
        Path::new("../../../kernel/iommu_groups/2")
    );
    assert_eq!(
        fs::read_link(fs.path("bus/pci/drivers/e1000e/0000:00:02.0")).unwrap(),
        Path::new("../../../../devices/pci0000:00/0000:00:02.0")
    );
    assert_eq!(
        fs::read_link(fs.path("kernel/iommu_groups/2/devices/0000:00:02.0")).unwrap(),
        Path::new("../../../../devices/pci0000:00/0000:00:02.0")
    );

    // Devices behind the root port nest in its directory.
    let gpu_dir = root.join("devices/pci0000:00/0000:00:01.0/0000:01:00.0");
    assert!(gpu_dir.is_dir());
    assert_eq!(fs.device_dir(GPU).unwrap(), gpu_dir);
    assert_eq!(
        fs::read_link(gpu_dir.join("driver")).unwrap(),
        Path::new("../../../../bus/pci/drivers/nvidia")
    );
    assert_eq!(
        fs::canonicalize(gpu_dir.join("driver")).unwrap(),
        root.join("bus/pci/drivers/nvidia")
    );
    assert_eq!(link_name(&gpu_dir.join("driver")), "nvidia");
    assert_eq!(link_name(&gpu_dir.join("iommu_group")), "1");
    assert_eq!(
        fs::canonicalize(gpu_dir.join("iommu_group")).unwrap(),
        root.join("kernel/iommu_groups/1")
    );
    // Through the bus link, like a user would.
    let via_bus = fs.path("bus/pci/devices").join(GPU);
    assert_eq!(link_name(&via_bus.join("driver")), "nvidia");
    assert_eq!(link_name(&via_bus.join("iommu_group")), "1");
    assert_eq!(
        fs::canonicalize(via_bus.join("subsystem")).unwrap(),
        root.join("bus/pci")
    );
    // Driver -> device links.
    assert_eq!(
        fs::canonicalize(fs.path("bus/pci/drivers/nvidia").join(GPU)).unwrap(),
        gpu_dir
    );
    assert_eq!(
        fs::canonicalize(fs.path("bus/pci/drivers/snd_hda_intel").join(GPU_AUDIO)).unwrap(),
        fs.device_dir(GPU_AUDIO).unwrap()
    );
}

#[test]
fn iommu_groups_and_drivers() {
    let fs = FakeSys::standard_host();
    assert_eq!(fs.group_members(1), vec![ROOT_PORT, GPU, GPU_AUDIO]);
    let mut listed: Vec<String> = fs::read_dir(fs.path("kernel/iommu_groups/1/devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, vec![ROOT_PORT, GPU, GPU_AUDIO]);
    for addr in &listed {
        assert_eq!(
            fs::canonicalize(fs.path("kernel/iommu_groups/1/devices").join(addr)).unwrap(),
            fs.device_dir(addr).unwrap()
        );
    }
    let mut groups: Vec<u32> = fs::read_dir(fs.path("kernel/iommu_groups"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .into_string()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    groups.sort();
    assert_eq!(groups, vec![0, 1, 2, 3, 4, 5, 6]);

    for d in [
        "pcieport",
        "nvidia",
        "snd_hda_intel",
        "e1000e",
        "vfio-pci",
        "amdgpu",
        "nvme",
    ] {
        let dir = fs.path("bus/pci/drivers").join(d);
        assert!(dir.is_dir(), "{d}");
        for attr in fakesys::DRIVER_ATTRS {
            assert!(dir.join(attr).exists(), "{d}/{attr}");
        }
    }
    // Exactly the bound device is listed in a driver dir.
    let nvidia_links: Vec<String> = fs::read_dir(fs.path("bus/pci/drivers/nvidia"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_symlink())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(nvidia_links, vec![GPU]);

    // vfio is loaded, T4 already on it with its group node.
    assert!(fs.vfio_loaded());
    assert!(fs.path("module/vfio_pci").is_dir());
    assert!(fs.devfs.join("vfio/vfio").exists());
    assert!(fs.vfio_group_node_exists(4));
    for g in [0, 1, 2, 3, 5, 6] {
        assert!(!fs.vfio_group_node_exists(g), "{g}");
    }
    assert_eq!(
        fs::canonicalize(fs.path("bus/pci/drivers/vfio-pci/module")).unwrap(),
        fs.path("module/vfio_pci")
    );
}

#[test]
fn add_and_remove_device() {
    let fs = FakeSys::new();
    fs.add_device(DeviceSpec::new("0000:00:1f.0", 0x8086, 0x2918, 0x060100).driver("lpc_ich"));
    assert_eq!(fs.driver_of("0000:00:1f.0").as_deref(), Some("lpc_ich"));
    assert_eq!(fs.iommu_group_of("0000:00:1f.0"), None);
    assert!(!fs.path("bus/pci/devices/0000:00:1f.0/iommu_group").exists());
    assert_eq!(
        read(&fs.path("bus/pci/devices/0000:00:1f.0/subsystem_vendor")),
        "0x8086\n"
    );

    let fs = FakeSys::standard_host();
    let gpu_dir = fs.device_dir(GPU).unwrap();
    fs.remove_device(GPU);
    assert!(!gpu_dir.exists());
    assert!(fs::symlink_metadata(fs.path("bus/pci/devices").join(GPU)).is_err());
    assert!(fs::symlink_metadata(fs.path("bus/pci/drivers/nvidia").join(GPU)).is_err());
    assert!(fs::symlink_metadata(fs.path("kernel/iommu_groups/1/devices").join(GPU)).is_err());
    assert_eq!(fs.group_members(1), vec![ROOT_PORT, GPU_AUDIO]);
    assert_eq!(fs.driver_of(GPU), None);
    assert!(
        fs.path("bus/pci/drivers/nvidia").is_dir(),
        "driver stays loaded"
    );

    // Last member of a group: the group dir goes, and so does /dev/vfio/N.
    fs.remove_device(T4);
    assert!(!fs.path("kernel/iommu_groups/4").exists());
    assert!(!fs.vfio_group_node_exists(4));
    assert!(fs::symlink_metadata(fs.path("bus/pci/drivers/vfio-pci").join(T4)).is_err());

    // Removing a bridge removes what is behind it.
    fs.remove_device(ROOT_PORT);
    assert!(fs.device_dir(GPU_AUDIO).is_none());
    assert!(!fs.path("kernel/iommu_groups/1").exists());
    assert!(
        fs::symlink_metadata(fs.path("bus/pci/drivers/snd_hda_intel").join(GPU_AUDIO)).is_err()
    );
    assert_eq!(
        fs.devices(),
        vec!["0000:00:00.0", NIC, EDU, "0000:00:05.0", "0000:00:06.0"]
    );

    // Re-plug it.
    fs.add_device(
        DeviceSpec::new(ROOT_PORT, 0x8086, 0x7c10, 0x060400)
            .driver("pcieport")
            .group(1),
    );
    fs.add_device(
        DeviceSpec::new(GPU, 0x10de, 0x2236, 0x030200)
            .subsystem(0x10de, 0x1482)
            .driver("nvidia")
            .group(1)
            .parent(ROOT_PORT),
    );
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    assert_eq!(fs.group_members(1), vec![ROOT_PORT, GPU]);
    assert!(fs
        .device_dir(GPU)
        .unwrap()
        .ends_with("devices/pci0000:00/0000:00:01.0/0000:01:00.0"));
}

#[test]
#[should_panic(expected = "already exists")]
fn add_device_twice_panics() {
    let fs = FakeSys::standard_host();
    fs.add_device(DeviceSpec::new(GPU, 0x10de, 0x2236, 0x030200));
}

#[test]
fn vfio_load_unload_and_override_helpers() {
    let fs = FakeSys::new();
    fs.add_device(DeviceSpec::new("0000:00:03.0", 0x1234, 0x11e8, 0x00ff00).group(3));
    fs.load_vfio();
    assert!(fs.vfio_loaded());
    assert!(fs.devfs.join("vfio/vfio").is_file());
    fs.load_vfio(); // idempotent
    fs.set_driver_override(EDU, Some("vfio-pci"));
    assert_eq!(
        read(&fs.path("bus/pci/devices/0000:00:03.0/driver_override")),
        "vfio-pci\n"
    );
    assert_eq!(fs.driver_override_of(EDU).as_deref(), Some("vfio-pci"));
    fs.set_driver_override(EDU, None);
    assert_eq!(fs.driver_override_of(EDU), None);
    fs.unload_vfio();
    assert!(!fs.vfio_loaded());
    assert!(!fs.devfs.join("vfio").exists());
    fs.add_driver("foo");
    fs.add_driver("foo");
    assert!(fs.path("bus/pci/drivers/foo/bind").exists());
    fs.remove_driver("foo");
    assert!(!fs.path("bus/pci/drivers/foo").exists());
}

#[test]
fn tree_is_removed_on_drop() {
    let fs = FakeSys::standard_host();
    let root = fs.tmp_root().to_path_buf();
    assert!(root.is_dir());
    drop(fs);
    if std::env::var("VFIOD_KEEP_TMP").as_deref() != Ok("1") {
        assert!(!root.exists());
    }
}

#[test]
fn parallel_trees_are_independent() {
    let handles: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let fs = FakeSys::standard_host();
                let addr = format!("0000:00:1{i}.0");
                fs.add_device(
                    DeviceSpec::new(&addr, 0x1af4, 0x1000 + i, 0x020000).driver("virtio-pci"),
                );
                fs.remove_device(NIC);
                (fs.tmp_root().to_path_buf(), fs.devices().len())
            })
        })
        .collect();
    let mut roots = std::collections::HashSet::new();
    for h in handles {
        let (root, n) = h.join().unwrap();
        assert_eq!(n, 9);
        assert!(roots.insert(root), "two trees share a root");
    }
}

// ---------------------------------------------------------------------------
// Safety
// ---------------------------------------------------------------------------

#[test]
#[should_panic(expected = "REFUSING")]
fn refuses_real_sys() {
    let _ = FakeSys::new_in(Path::new("/sys"));
}

#[test]
#[should_panic(expected = "REFUSING")]
fn refuses_under_real_sys() {
    let _ = FakeSys::new_in(Path::new("/sys/bus/pci"));
}

#[test]
#[should_panic(expected = "REFUSING")]
fn refuses_dotdot_into_sys() {
    fakesys::assert_not_real_sysfs(Path::new("/tmp/../sys/bus/pci/drivers_probe"));
}

#[test]
#[should_panic(expected = "REFUSING")]
fn refuses_symlink_to_sys() {
    let tmp = TempDir::new("fakesys-selftest").unwrap();
    let link = tmp.path().join("sneaky");
    std::os::unix::fs::symlink("/sys", &link).unwrap();
    let _ = FakeSys::new_in(&link);
}

#[test]
fn accepts_temp_paths() {
    fakesys::assert_not_real_sysfs(&std::env::temp_dir());
    fakesys::assert_not_real_sysfs(Path::new("/system-not-sys"));
    let tmp = TempDir::new("fakesys-selftest").unwrap();
    let fs = FakeSys::new_in(tmp.path());
    assert!(fs.sysfs.starts_with(tmp.path()));
}

#[test]
#[should_panic(expected = "outside the fake tree")]
fn tree_helpers_refuse_paths_outside_the_tree() {
    let fs = FakeSys::new();
    let other = TempDir::new("fakesys-selftest").unwrap();
    let _ = fs.tree().write_file(&other.path().join("x"), "1");
}

// ---------------------------------------------------------------------------
// Simulated kernel
// ---------------------------------------------------------------------------

const IDLE: Duration = Duration::from_secs(10);

/// A sysfs write the way vfiod (and `echo`) does it: existing file,
/// truncated, one write(2).
fn write_attr(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    let n = f.write(value.as_bytes())?;
    assert_eq!(n, value.len(), "short write");
    Ok(())
}

fn w(fs: &FakeSys, rel: &str, value: &str) {
    write_attr(&fs.path(rel), value).unwrap_or_else(|e| panic!("write {rel} <- {value:?}: {e}"));
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

fn override_path(addr: &str) -> String {
    format!("bus/pci/devices/{addr}/driver_override")
}

/// The design's bind sequence, by plain writes.
fn move_to_vfio(fs: &FakeSys, addr: &str, from: &str) {
    w(fs, &override_path(addr), "vfio-pci");
    w(fs, &format!("bus/pci/drivers/{from}/unbind"), addr);
    w(fs, "bus/pci/drivers_probe", addr);
}

/// The design's unbind sequence, by plain writes.
fn move_back(fs: &FakeSys, addr: &str) {
    w(fs, &override_path(addr), "\n");
    w(fs, "bus/pci/drivers/vfio-pci/unbind", addr);
    w(fs, "bus/pci/drivers_probe", addr);
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn sim_moves_gpu_to_vfio_and_back() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let gpu_dir = fs.path("bus/pci/devices").join(GPU);

    w(&fs, &override_path(GPU), "vfio-pci");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(read(&gpu_dir.join("driver_override")), "vfio-pci\n");
    assert_eq!(fs.driver_override_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(
        fs.driver_of(GPU).as_deref(),
        Some("nvidia"),
        "override alone moves nothing"
    );

    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None);
    assert!(!gpu_dir.join("driver").exists());
    assert!(fs::symlink_metadata(fs.path("bus/pci/drivers/nvidia").join(GPU)).is_err());

    w(&fs, "bus/pci/drivers_probe", GPU);
    // Poll like vfiod verifies, without wait_idle.
    assert!(wait_until(IDLE, || fs.driver_of(GPU).as_deref() == Some("vfio-pci")));
    assert!(wait_until(IDLE, || fs.vfio_group_node_exists(1)));
    assert!(fs.devfs.join("vfio/1").exists());
    assert_eq!(link_name(&gpu_dir.join("driver")), "vfio-pci");
    assert_eq!(
        fs::canonicalize(fs.path("bus/pci/drivers/vfio-pci").join(GPU)).unwrap(),
        fs.device_dir(GPU).unwrap()
    );
    // The audio function was not touched.
    assert_eq!(fs.driver_of(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));

    // And back.
    move_back(&fs, GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(read(&gpu_dir.join("driver_override")), "(null)\n");
    assert_eq!(fs.driver_override_of(GPU), None);
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    assert!(!fs.vfio_group_node_exists(1));
    assert!(fs.vfio_group_node_exists(4), "T4's node is unrelated");

    assert_eq!(
        sim.writes(),
        pairs(&[
            ("bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci"),
            ("bus/pci/drivers/nvidia/unbind", GPU),
            ("bus/pci/drivers_probe", GPU),
            ("bus/pci/devices/0000:01:00.0/driver_override", "\n"),
            ("bus/pci/drivers/vfio-pci/unbind", GPU),
            ("bus/pci/drivers_probe", GPU),
        ])
    );
    assert!(!sim.writes().iter().any(|(p, _)| p.ends_with("new_id")));
}

#[test]
fn sim_back_to_back_writes_of_one_attribute_are_all_applied() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    // Whole group, writes batched per step: two probes in a row.
    w(&fs, &override_path(GPU), "vfio-pci\n");
    w(&fs, &override_path(GPU_AUDIO), "vfio-pci\n");
    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU);
    w(&fs, "bus/pci/drivers/snd_hda_intel/unbind", GPU_AUDIO);
    w(&fs, "bus/pci/drivers_probe", GPU);
    w(&fs, "bus/pci/drivers_probe", GPU_AUDIO);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(fs.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
    assert_eq!(fs.driver_of(ROOT_PORT).as_deref(), Some("pcieport"));
    assert!(fs.vfio_group_node_exists(1));
    let probes: Vec<String> = sim
        .writes()
        .into_iter()
        .filter(|(p, _)| p == "bus/pci/drivers_probe")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(probes, vec![GPU, GPU_AUDIO]);

    // /dev/vfio/1 stays while one function of group 1 is on vfio-pci.
    w(&fs, "bus/pci/drivers/vfio-pci/unbind", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None);
    assert!(fs.vfio_group_node_exists(1));
    w(&fs, "bus/pci/drivers/vfio-pci/unbind", GPU_AUDIO);
    assert!(sim.wait_idle(IDLE));
    assert!(!fs.vfio_group_node_exists(1));
}

#[test]
fn sim_keeps_the_order_of_rapid_writes() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    // Each sequence is written back to back; each step only works if the
    // previous one was applied first. Between sequences we poll for the
    // result, as vfiod's verify step does (a device's driver_override must
    // not be rewritten before the probe that depends on it took effect).
    const ROUNDS: usize = 25;
    for i in 0..ROUNDS {
        move_to_vfio(&fs, GPU, "nvidia");
        assert!(
            wait_until(IDLE, || fs.driver_of(GPU).as_deref() == Some("vfio-pci")),
            "round {i}: not on vfio-pci: {:?}",
            fs.driver_of(GPU)
        );
        move_back(&fs, GPU);
        assert!(
            wait_until(IDLE, || fs.driver_of(GPU).as_deref() == Some("nvidia")),
            "round {i}: not back on nvidia: {:?}",
            fs.driver_of(GPU)
        );
    }
    assert!(sim.wait_idle(IDLE));
    assert!(!fs.vfio_group_node_exists(1));
    assert_eq!(sim.writes().len(), 6 * ROUNDS);

    // Without any waiting: unbind/bind pairs through FIFO attributes, in
    // several files; the log must be exactly the write order.
    sim.clear_writes();
    let mut expected = Vec::new();
    for i in 0..30 {
        for (addr, drv) in [(NIC, "e1000e"), ("0000:00:06.0", "nvme")] {
            w(&fs, &format!("bus/pci/drivers/{drv}/unbind"), addr);
            expected.push((format!("bus/pci/drivers/{drv}/unbind"), addr.to_string()));
            if i % 3 == 0 {
                w(&fs, "bus/pci/drivers_probe", addr);
                expected.push(("bus/pci/drivers_probe".to_string(), addr.to_string()));
            } else {
                w(&fs, &format!("bus/pci/drivers/{drv}/bind"), addr);
                expected.push((format!("bus/pci/drivers/{drv}/bind"), addr.to_string()));
            }
        }
    }
    w(&fs, "bus/pci/drivers/e1000e/unbind", NIC);
    expected.push(("bus/pci/drivers/e1000e/unbind".to_string(), NIC.to_string()));
    assert!(sim.wait_idle(IDLE));
    assert_eq!(sim.writes(), expected);
    assert_eq!(fs.driver_of(NIC), None);
    assert_eq!(fs.driver_of("0000:00:06.0").as_deref(), Some("nvme"));
}

#[test]
fn sim_normalising_driver_override_never_loses_a_write() {
    // vfiod's rollback writes the override and clears it again within
    // microseconds; the simulator's rewrite to "vfio-pci\n" must never
    // clobber the later clear.
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let rel = override_path(NIC);
    for i in 0..300 {
        w(&fs, &rel, "vfio-pci");
        if i % 2 == 0 {
            std::thread::yield_now();
        }
        w(&fs, &rel, "\n");
        assert_eq!(fs.driver_override_of(NIC), None, "round {i}");
    }
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_override_of(NIC), None);
    assert_eq!(read(&fs.path(&rel)), "(null)\n");
    // And the other way round.
    for i in 0..300 {
        w(&fs, &rel, "");
        w(&fs, &rel, "vfio-pci");
        assert_eq!(
            fs.driver_override_of(NIC).as_deref(),
            Some("vfio-pci"),
            "round {i}"
        );
    }
    assert!(sim.wait_idle(IDLE));
    assert_eq!(read(&fs.path(&rel)), "vfio-pci\n");
}

#[test]
fn sim_ignores_closes_without_a_write() {
    // A descriptor inherited by a process forked meanwhile is closed late,
    // without a new write; that must not look like a write.
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    for rel in [
        override_path(NIC),
        "bus/pci/drivers/e1000e/unbind".to_string(),
        "bus/pci/drivers_probe".to_string(),
    ] {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(fs.path(&rel))
            .unwrap();
        drop(f);
    }
    assert!(sim.wait_idle(IDLE));
    assert!(sim.writes().is_empty(), "{:?}", sim.writes());
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("e1000e"));
    // A write, then a late close of a second descriptor opened before it.
    let late = fs::OpenOptions::new()
        .write(true)
        .open(fs.path(&override_path(NIC)))
        .unwrap();
    w(&fs, &override_path(NIC), "vfio-pci");
    assert!(sim.wait_idle(IDLE));
    drop(late);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(
        sim.writes(),
        pairs(&[("bus/pci/devices/0000:00:02.0/driver_override", "vfio-pci")])
    );
}

#[test]
fn sim_concurrent_writers_on_drivers_probe() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let targets = [
        (NIC, "e1000e"),
        ("0000:00:05.0", "amdgpu"),
        ("0000:00:06.0", "nvme"),
    ];
    for (addr, drv) in targets {
        w(&fs, &override_path(addr), "vfio-pci");
        w(&fs, &format!("bus/pci/drivers/{drv}/unbind"), addr);
    }
    assert!(sim.wait_idle(IDLE));
    let probe = fs.path("bus/pci/drivers_probe");
    std::thread::scope(|s| {
        for (addr, _) in targets {
            let probe = probe.clone();
            s.spawn(move || {
                for _ in 0..3 {
                    write_attr(&probe, addr).unwrap();
                }
            });
        }
    });
    assert!(sim.wait_idle(IDLE));
    for (addr, _) in targets {
        assert_eq!(fs.driver_of(addr).as_deref(), Some("vfio-pci"), "{addr}");
    }
    for g in [2, 5, 6] {
        assert!(fs.vfio_group_node_exists(g), "{g}");
    }
    let probes = sim
        .writes()
        .iter()
        .filter(|(p, _)| p == "bus/pci/drivers_probe")
        .count();
    assert_eq!(probes, 9);
}

#[test]
fn sim_override_rules_and_bind_file() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    // Unbind without override, bind back through the bind file.
    w(&fs, "bus/pci/drivers/e1000e/unbind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None);
    // Unbinding from a driver it is not bound to does nothing.
    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU_AUDIO);
    w(&fs, "bus/pci/drivers/e1000e/bind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("e1000e"));
    assert_eq!(fs.driver_of(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));
    // Binding an already-bound device does nothing.
    w(&fs, "bus/pci/drivers/vfio-pci/bind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("e1000e"));

    // With an override, only that driver may bind.
    w(&fs, &override_path(NIC), "vfio-pci");
    w(&fs, "bus/pci/drivers/e1000e/unbind", NIC);
    w(&fs, "bus/pci/drivers/e1000e/bind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None);
    w(&fs, "bus/pci/drivers/vfio-pci/bind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert!(fs.vfio_group_node_exists(2));

    // A probe of a bound device, or of a device with no native driver and
    // no override, does nothing.
    w(&fs, "bus/pci/drivers_probe", NIC);
    w(&fs, "bus/pci/drivers_probe", EDU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(fs.driver_of(EDU), None);
    // The edu device with an override goes to vfio-pci.
    w(&fs, &override_path(EDU), "vfio-pci");
    w(&fs, "bus/pci/drivers_probe", EDU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(EDU).as_deref(), Some("vfio-pci"));
    assert!(fs.vfio_group_node_exists(3));

    // new_id is recorded and does nothing.
    w(&fs, "bus/pci/drivers/vfio-pci/new_id", "10de 2236");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    assert!(sim.writes().contains(&(
        "bus/pci/drivers/vfio-pci/new_id".to_string(),
        "10de 2236".to_string()
    )));
    // An override to a driver that is not loaded leaves the device unbound.
    w(&fs, &override_path(GPU), "nouveau");
    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU);
    w(&fs, "bus/pci/drivers_probe", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None);
    assert_eq!(read(&fs.path(&override_path(GPU))), "nouveau\n");
}

#[test]
fn sim_vfio_not_loaded_then_loaded() {
    let fs = FakeSys::new();
    fs.add_device(
        DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(2),
    );
    fs.add_device(DeviceSpec::new("0000:00:07.0", 0x8086, 0x10d3, 0x020000).driver("e1000e"));
    let sim = SimKernel::start(&fs);
    assert!(!fs.path("bus/pci/drivers/vfio-pci").exists());
    w(&fs, &override_path(NIC), "vfio-pci");
    w(&fs, "bus/pci/drivers/e1000e/unbind", NIC);
    w(&fs, "bus/pci/drivers_probe", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None, "vfio-pci is not loaded");
    assert!(!fs.devfs.join("vfio").exists());
    // modprobe: the driver registers and picks up the waiting device.
    fs.load_vfio();
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert!(fs.vfio_group_node_exists(2));
    // The new driver dir is watched.
    w(&fs, "bus/pci/drivers/vfio-pci/unbind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None);
    assert!(!fs.vfio_group_node_exists(2));
    // vfio-pci needs an IOMMU group.
    w(&fs, &override_path("0000:00:07.0"), "vfio-pci");
    w(&fs, "bus/pci/drivers/e1000e/unbind", "0000:00:07.0");
    w(&fs, "bus/pci/drivers_probe", "0000:00:07.0");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of("0000:00:07.0"), None);
}

#[test]
fn sim_fail_write_gives_the_errno() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let cases = [
        ("bus/pci/drivers/nvidia/unbind", Errno::ENOSPC),
        ("bus/pci/drivers_probe", Errno::EISDIR),
        (
            "bus/pci/devices/0000:01:00.0/driver_override",
            Errno::ENOENT,
        ),
        ("bus/pci/drivers/vfio-pci/bind", Errno::ENOSPC),
        (
            "bus/pci/devices/0000:01:00.1/driver_override",
            Errno::EISDIR,
        ),
        (
            "bus/pci/devices/0000:00:02.0/driver_override",
            Errno::ENOSPC,
        ),
    ];
    for (rel, errno) in cases {
        sim.fail_write(rel, errno);
        let err = write_attr(&fs.path(rel), GPU).expect_err(rel);
        assert_eq!(err.raw_os_error(), Some(errno as i32), "{rel}: {err}");
        // Still failing on the next write.
        let err = write_attr(&fs.path(rel), GPU).expect_err(rel);
        assert_eq!(err.raw_os_error(), Some(errno as i32), "{rel}: {err}");
    }
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    // While driver_override is faulted, the kernel still knows its value.
    assert!(sim.writes().is_empty(), "{:?}", sim.writes());

    for (rel, _) in cases {
        sim.release(rel);
    }
    for addr in [GPU, GPU_AUDIO, NIC] {
        assert_eq!(read(&fs.path(&override_path(addr))), "(null)\n");
    }
    assert!(fs.path("bus/pci/drivers_probe").exists());
    move_to_vfio(&fs, GPU, "nvidia");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(sim.writes().len(), 3);
}

#[test]
fn sim_fail_write_mid_sequence() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    sim.fail_write("bus/pci/drivers_probe", Errno::ENOENT);
    w(&fs, &override_path(GPU), "vfio-pci");
    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU);
    let err = write_attr(&fs.path("bus/pci/drivers_probe"), GPU).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_enoent()));
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None);
    // Rollback: clear the override, probe again once it works.
    sim.release("bus/pci/drivers_probe");
    w(&fs, &override_path(GPU), "");
    w(&fs, "bus/pci/drivers_probe", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    assert_eq!(fs.driver_override_of(GPU), None);
}

fn libc_enoent() -> i32 {
    Errno::ENOENT as i32
}

#[test]
#[should_panic(expected = "cannot produce")]
fn sim_fail_write_refuses_other_errnos() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    sim.fail_write("bus/pci/drivers/nvidia/unbind", Errno::EBUSY);
}

/// Writes in a thread; the receiver gets the result when the write returns.
/// Returns once the writer is blocked in `open()` (the attribute must be
/// hung).
fn spawn_hung_writer(
    path: std::path::PathBuf,
    value: &'static str,
) -> mpsc::Receiver<io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    let (tid_tx, tid_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tid_tx.send(nix::unistd::gettid().as_raw());
        let _ = tx.send(write_attr(&path, value));
    });
    let tid = tid_rx.recv().unwrap();
    assert!(
        wait_until(IDLE, || simkernel::thread_blocked_in_fifo_open(tid)),
        "the writer never blocked"
    );
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the write should hang"
    );
    rx
}

#[test]
fn sim_hang_write_blocks_until_release() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    w(&fs, &override_path(GPU), "vfio-pci");
    sim.hang_write("bus/pci/drivers/nvidia/unbind");
    let rx = spawn_hung_writer(fs.path("bus/pci/drivers/nvidia/unbind"), GPU);
    assert!(
        sim.wait_idle(IDLE),
        "a hung write does not keep the sim busy"
    );
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    // Other attributes keep working meanwhile.
    w(&fs, "bus/pci/drivers/e1000e/unbind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None);

    sim.release("bus/pci/drivers/nvidia/unbind");
    rx.recv_timeout(IDLE)
        .expect("released writer returns")
        .expect("write succeeds");
    // The stuck unbind completes.
    assert!(wait_until(IDLE, || fs.driver_of(GPU).is_none()));
    assert!(sim.wait_idle(IDLE));
    // The attribute works normally again.
    w(&fs, "bus/pci/drivers_probe", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    w(&fs, "bus/pci/drivers/vfio-pci/unbind", GPU);
    w(&fs, "bus/pci/drivers/nvidia/bind", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None, "override still says vfio-pci");
}

#[test]
fn sim_release_waits_for_the_released_writer() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    sim.hang_write("bus/pci/drivers/e1000e/unbind");
    let rx = spawn_hung_writer(fs.path("bus/pci/drivers/e1000e/unbind"), NIC);
    sim.release("bus/pci/drivers/e1000e/unbind");
    // No polling: release returned after the writer wrote.
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None);
    rx.recv_timeout(IDLE).unwrap().unwrap();
    assert_eq!(
        sim.writes(),
        pairs(&[("bus/pci/drivers/e1000e/unbind", NIC)])
    );
}

#[test]
fn sim_release_completing_after_the_writer_was_killed() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let rel = "bus/pci/drivers/e1000e/unbind";
    sim.hang_write(rel);
    // A writer process, killed while blocked in open().
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf %s {NIC} > '{}'", fs.path(rel).display()))
        .spawn()
        .expect("spawn sh");
    assert!(wait_until(
        IDLE,
        || simkernel::process_blocked_in_fifo_open(child.id())
    ));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the writer should hang"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !sim.release_completing(rel, NIC),
        "nobody was blocked any more"
    );
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None, "the stuck unbind completed");
    assert_eq!(sim.writes(), pairs(&[(rel, NIC)]));

    // With the writer still blocked, its own value is what gets applied.
    sim.clear_writes();
    let rel = "bus/pci/drivers/amdgpu/unbind";
    sim.hang_write(rel);
    let rx = spawn_hung_writer(fs.path(rel), "0000:00:05.0");
    assert!(sim.release_completing(rel, "0000:00:99.0"));
    rx.recv_timeout(IDLE).unwrap().unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of("0000:00:05.0"), None);
    assert_eq!(sim.writes(), pairs(&[(rel, "0000:00:05.0")]));
}

#[test]
fn sim_hang_and_release_driver_override() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let rel = override_path(GPU);
    sim.hang_write(&rel);
    let rx = spawn_hung_writer(fs.path(&rel), "vfio-pci");
    sim.release(&rel);
    rx.recv_timeout(IDLE).unwrap().unwrap();
    assert!(wait_until(IDLE, || fs.path(&rel).is_file()
        && fs.driver_override_of(GPU).as_deref() == Some("vfio-pci")));
    assert!(sim.wait_idle(IDLE));
    assert_eq!(read(&fs.path(&rel)), "vfio-pci\n");
    // Release with no writer waiting: just restored.
    sim.hang_write(&override_path(GPU_AUDIO));
    sim.release(&override_path(GPU_AUDIO));
    assert!(fs.path(&override_path(GPU_AUDIO)).is_file());
    assert_eq!(read(&fs.path(&override_path(GPU_AUDIO))), "(null)\n");
    w(&fs, &override_path(GPU_AUDIO), "vfio-pci");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(read(&fs.path(&override_path(GPU_AUDIO))), "vfio-pci\n");
}

#[test]
fn sim_drop_lets_hung_writers_go_and_restores_files() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    sim.hang_write("bus/pci/drivers/amdgpu/unbind");
    sim.fail_write("bus/pci/drivers/nvme/unbind", Errno::EISDIR);
    let rx = spawn_hung_writer(fs.path("bus/pci/drivers/amdgpu/unbind"), "0000:00:05.0");
    drop(sim);
    rx.recv_timeout(IDLE).unwrap().unwrap();
    for rel in [
        "bus/pci/drivers_probe",
        "bus/pci/rescan",
        "bus/pci/drivers/nvidia/unbind",
        "bus/pci/drivers/amdgpu/unbind",
        "bus/pci/drivers/nvme/unbind",
        "bus/pci/drivers/vfio-pci/bind",
    ] {
        assert!(fs.path(rel).is_file(), "{rel}");
    }
    // Without a simulator, writes go nowhere and never block.
    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU);
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
    // A new simulator can start on the same tree.
    let sim = SimKernel::start(&fs);
    w(&fs, "bus/pci/drivers/nvidia/unbind", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None);
}

#[test]
fn sim_outlives_its_fakesys_handle() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    let root = fs.tmp_root().to_path_buf();
    drop(fs);
    assert!(root.is_dir(), "the simulator keeps the tree alive");
    let fs = sim.fakesys();
    w(fs, "bus/pci/drivers/nvidia/unbind", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU), None);
    drop(sim);
    if std::env::var("VFIOD_KEEP_TMP").as_deref() != Ok("1") {
        assert!(!root.exists());
    }
}

#[test]
fn sim_bind_wrong_driver_and_ignore_probe() {
    let fs = FakeSys::standard_host();
    fs.add_driver("nouveau");
    let sim = SimKernel::start(&fs);
    sim.bind_wrong_driver(GPU, "nouveau");
    move_to_vfio(&fs, GPU, "nvidia");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nouveau"));
    assert!(!fs.vfio_group_node_exists(1));
    // One-shot: the next probe is right again.
    w(&fs, "bus/pci/drivers/nouveau/unbind", GPU);
    w(&fs, "bus/pci/drivers_probe", GPU);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));

    sim.ignore_probe(NIC);
    move_to_vfio(&fs, NIC, "e1000e");
    w(&fs, "bus/pci/drivers/vfio-pci/bind", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC), None);
    sim.allow_probe(NIC);
    w(&fs, "bus/pci/drivers_probe", NIC);
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
}

#[test]
fn sim_follows_hotplug() {
    let fs = FakeSys::standard_host();
    let sim = SimKernel::start(&fs);
    move_to_vfio(&fs, GPU, "nvidia");
    assert!(sim.wait_idle(IDLE));
    assert!(fs.vfio_group_node_exists(1));
    // Unplug the GPU while on vfio-pci.
    fs.remove_device(GPU);
    assert!(fs.device_dir(GPU).is_none());
    assert!(fs::symlink_metadata(fs.path("bus/pci/drivers/vfio-pci").join(GPU)).is_err());
    assert!(!fs.vfio_group_node_exists(1));
    // Writes naming a vanished device are harmless.
    w(&fs, "bus/pci/drivers_probe", GPU);
    w(&fs, "bus/pci/drivers/vfio-pci/unbind", GPU);
    assert!(sim.wait_idle(IDLE));
    // A device plugged in while running is watched.
    fs.add_device(
        DeviceSpec::new("0000:00:08.0", 0x1af4, 0x1041, 0x020000)
            .driver("virtio-pci")
            .group(8),
    );
    move_to_vfio(&fs, "0000:00:08.0", "virtio-pci");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of("0000:00:08.0").as_deref(), Some("vfio-pci"));
    assert_eq!(read(&fs.path(&override_path("0000:00:08.0"))), "vfio-pci\n");
    assert!(fs.vfio_group_node_exists(8));
    move_back(&fs, "0000:00:08.0");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of("0000:00:08.0").as_deref(), Some("virtio-pci"));
    // Re-plugging the GPU brings it back on its native driver.
    fs.add_device(
        DeviceSpec::new(GPU, 0x10de, 0x2236, 0x030200)
            .driver("nvidia")
            .group(1)
            .parent(ROOT_PORT),
    );
    move_to_vfio(&fs, GPU, "nvidia");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
}

#[test]
#[should_panic(expected = "already runs")]
fn sim_only_one_per_tree() {
    let fs = FakeSys::standard_host();
    let _a = SimKernel::start(&fs);
    let _b = SimKernel::start(&fs);
}

#[test]
fn sim_parallel_trees() {
    let handles: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(|| {
                let fs = FakeSys::standard_host();
                let sim = SimKernel::start(&fs);
                for _ in 0..5 {
                    move_to_vfio(&fs, GPU, "nvidia");
                    assert!(wait_until(IDLE, || fs.driver_of(GPU).as_deref() == Some("vfio-pci")));
                    move_back(&fs, GPU);
                    assert!(wait_until(IDLE, || fs.driver_of(GPU).as_deref() == Some("nvidia")));
                }
                assert!(sim.wait_idle(IDLE));
                (fs.driver_of(GPU), sim.writes())
            })
        })
        .collect();
    for h in handles {
        let (driver, writes) = h.join().unwrap();
        assert_eq!(driver.as_deref(), Some("nvidia"));
        assert_eq!(writes.len(), 30, "{writes:#?}");
    }
}

/// A fake tree with an e1000e at 0000:00:02.0 whose kernel lists the reset
/// methods "flr pm bus".
fn with_resettable_nic() -> FakeSys {
    let fs = FakeSys::new();
    fs.add_device(
        DeviceSpec::new("0000:00:02.0", 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(2)
            .reset_methods("flr pm bus"),
    );
    fs
}

#[test]
fn sim_reset_returns_only_once_done_and_sees_the_selected_method() {
    let fs = with_resettable_nic();
    fs.add_device(DeviceSpec::new("0000:00:03.0", 0x1234, 0x11e8, 0x00ff00).group(3));
    let dir = fs.device_dir("0000:00:02.0").unwrap();
    assert_eq!(read(&dir.join("reset_method")), "flr pm bus\n");
    assert_eq!(read(&dir.join("power_state")), "D0\n");
    let config = fs::read(dir.join("config")).unwrap();
    assert_eq!(&config[..4], &[0x86, 0x80, 0xd3, 0x10]);
    let plain = fs.device_dir("0000:00:03.0").unwrap();
    assert!(!plain.join("reset").exists() && !plain.join("reset_method").exists());

    let sim = SimKernel::start(&fs);
    let all_ones = |d: &Path| fs::read(d.join("config")).unwrap()[..2] == [0xff, 0xff];
    for round in 0..20 {
        sim.set_reset_outcome("0000:00:02.0", Some(simkernel::ResetOutcome::AllOnes));
        fs::write(dir.join("reset_method"), "pm").unwrap();
        fs::write(dir.join("reset"), "1").unwrap();
        // No waiting: the write returned, so the reset is done.
        assert!(
            all_ones(&dir),
            "round {round}: the write returned before the reset"
        );
        sim.set_reset_outcome("0000:00:02.0", None);
        fs::write(dir.join("reset_method"), "flr pm bus").unwrap();
        fs::write(dir.join("reset"), "1").unwrap();
        assert!(
            !all_ones(&dir),
            "round {round}: a good reset restores config space"
        );
    }
    let resets = sim.resets();
    assert_eq!(resets.len(), 40);
    for pair in resets.chunks(2) {
        assert_eq!(pair[0], ("0000:00:02.0".to_string(), "pm".to_string()));
        assert_eq!(pair[1], ("0000:00:02.0".to_string(), "flr".to_string()));
    }
    assert!(sim.wait_idle(Duration::from_secs(5)));
    let logged = sim
        .writes()
        .iter()
        .filter(|(p, _)| p.ends_with("/reset"))
        .count();
    assert_eq!(logged, 40);
}

#[test]
fn sim_hung_reset_uses_the_method_in_effect_while_it_hung() {
    let fs = with_resettable_nic();
    let dir = fs.device_dir("0000:00:02.0").unwrap();
    let sim = SimKernel::start(&fs);
    let rel = "bus/pci/devices/0000:00:02.0/reset";
    for round in 0..10 {
        fs::write(dir.join("reset_method"), "pm").unwrap();
        sim.hang_write(rel);
        let reset = dir.join("reset");
        let writer = std::thread::spawn(move || fs::write(reset, "1"));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !writer.is_finished(),
            "round {round}: a hung reset returned"
        );
        sim.release(rel);
        writer.join().unwrap().unwrap();
        // What vfiod does once the write returns: put the list back. The
        // reset was done with the method selected while it hung.
        fs::write(dir.join("reset_method"), "flr pm bus").unwrap();
        assert!(sim.wait_idle(Duration::from_secs(5)));
        assert_eq!(
            sim.resets().last(),
            Some(&("0000:00:02.0".to_string(), "pm".to_string())),
            "round {round}"
        );
    }
    assert_eq!(sim.resets().len(), 10);
}
