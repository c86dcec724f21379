//! Self-tests of the fake sysfs builder (`tests/common/fakesys.rs`) and of
//! the simulated kernel (`tests/common/simkernel.rs`).
//!
//! The two files are included as siblings of one `common` module, the way
//! other test crates include them.

mod common {
    #[path = "../common/fakesys.rs"]
    pub mod fakesys;
}

use common::fakesys::{self, DeviceSpec, FakeSys, TempDir};
use std::fs;
use std::path::Path;

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const ROOT_PORT: &str = "0000:00:01.0";
const NIC: &str = "0000:00:02.0";
const EDU: &str = "0000:00:03.0";
const T4: &str = "0000:00:04.0";

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
        (AUDIO, Some("snd_hda_intel"), Some(1)),
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
        fs::canonicalize(fs.path("bus/pci/drivers/snd_hda_intel").join(AUDIO)).unwrap(),
        fs.device_dir(AUDIO).unwrap()
    );
}

#[test]
fn iommu_groups_and_drivers() {
    let fs = FakeSys::standard_host();
    assert_eq!(fs.group_members(1), vec![ROOT_PORT, GPU, AUDIO]);
    let mut listed: Vec<String> = fs::read_dir(fs.path("kernel/iommu_groups/1/devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, vec![ROOT_PORT, GPU, AUDIO]);
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
    assert_eq!(fs.group_members(1), vec![ROOT_PORT, AUDIO]);
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
    assert!(fs.device_dir(AUDIO).is_none());
    assert!(!fs.path("kernel/iommu_groups/1").exists());
    assert!(fs::symlink_metadata(fs.path("bus/pci/drivers/snd_hda_intel").join(AUDIO)).is_err());
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
