//! Legacy mdev in the fake tree and the simulated kernel: a parent's
//! `mdev_supported_types/` while it is on its native driver, `create` and
//! `remove` making and undoing the kernel's layout (links, a new IOMMU
//! group, `/dev/vfio/N`), NVIDIA's one-type-per-parent accounting, every
//! refusal recorded and changing nothing, what unbinding, removal, a reboot
//! and a simulator restart do, and faults on `create` and `remove`.

use nix::errno::Errno;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vfiod_test_support::dir_names;
use vfiod_test_support::fakesys::{DeviceSpec, FakeSys, NVIDIA, VFIO_PCI};
use vfiod_test_support::simkernel::{ResetOutcome, SimKernel, MDEV_NO_INSTANCE_ERRNO};

const IDLE: Duration = Duration::from_secs(10);

/// A Tesla P40 (Pascal: legacy mdev vGPU) on nvidia, group 0.
const P40: &str = "0000:3b:00.0";
/// An Intel iGPU (GVT-g) on i915, group 1.
const IGD: &str = "0000:00:02.0";
/// A NIC, group 2: no mdev parent.
const NIC: &str = "0000:00:03.0";

const Q2: &str = "nvidia-63";
const Q4: &str = "nvidia-64";
const Q24: &str = "nvidia-65";
const P40_TYPES: [(&str, &str, u32); 3] = [
    (Q2, "GRID P40-2Q", 12),
    (Q4, "GRID P40-4Q", 6),
    (Q24, "GRID P40-24Q", 1),
];
const GVT: &str = "i915-GVTg_V5_4";

const U1: &str = "aa6b2a0c-5d3f-4c8e-9a1b-0123456789ab";
const U2: &str = "bb6b2a0c-5d3f-4c8e-9a1b-0123456789ab";
const U3: &str = "cc6b2a0c-5d3f-4c8e-9a1b-0123456789ab";
const U4: &str = "dd6b2a0c-5d3f-4c8e-9a1b-0123456789ab";
const U5: &str = "ee6b2a0c-5d3f-4c8e-9a1b-0123456789ab";
const U6: &str = "ff6b2a0c-5d3f-4c8e-9a1b-0123456789ab";
const U7: &str = "006b2a0c-5d3f-4c8e-9a1b-0123456789ab";

fn p40() -> DeviceSpec {
    DeviceSpec::new(P40, 0x10de, 0x1b38, 0x030200)
        .subsystem(0x10de, 0x11d9)
        .driver(NVIDIA)
        .group(0)
        .mdev(&P40_TYPES)
}

fn igd() -> DeviceSpec {
    DeviceSpec::new(IGD, 0x8086, 0x3e92, 0x030000)
        .driver("i915")
        .group(1)
        .mdev(&[(GVT, "GVTg_V5_4", 2)])
}

fn nic() -> DeviceSpec {
    DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
        .driver("e1000e")
        .group(2)
}

fn host() -> (FakeSys, SimKernel) {
    let fs = FakeSys::with_devices([p40(), igd(), nic()]);
    let sim = SimKernel::start(&fs);
    (fs, sim)
}

fn type_rel(parent: &str, type_id: &str) -> String {
    format!("bus/pci/devices/{parent}/mdev_supported_types/{type_id}")
}

fn create_rel(parent: &str, type_id: &str) -> String {
    format!("{}/create", type_rel(parent, type_id))
}

fn remove_rel(uuid: &str) -> String {
    format!("bus/mdev/devices/{uuid}/remove")
}

/// Writes `uuid` to `type_id`'s `create` of `parent` and waits until the
/// simulated kernel acted on it.
fn create(fs: &FakeSys, sim: &SimKernel, parent: &str, type_id: &str, uuid: &str) {
    fs.echo(&create_rel(parent, type_id), uuid)
        .unwrap_or_else(|e| panic!("create {type_id} {uuid:?} on {parent}: {e}"));
    assert!(sim.wait_idle(IDLE));
}

fn remove(fs: &FakeSys, sim: &SimKernel, uuid: &str, value: &str) {
    fs.echo(&remove_rel(uuid), value)
        .unwrap_or_else(|e| panic!("remove {uuid}: {e}"));
    assert!(sim.wait_idle(IDLE));
}

/// `available_instances` of every type of the P40, from the files and the
/// kernel's state, which must agree.
fn p40_available(fs: &FakeSys) -> Vec<u32> {
    P40_TYPES
        .iter()
        .map(|(id, _, _)| {
            let text = fs.cat(&format!("{}/available_instances", type_rel(P40, id)));
            let n: u32 = text
                .strip_suffix('\n')
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("{id}: available_instances reads {text:?}"));
            assert_eq!(
                n,
                fs.mdev_available_instances(P40, id),
                "{id}: file and state"
            );
            n
        })
        .collect()
}

fn uuids(fs: &FakeSys, parent: &str) -> Vec<String> {
    fs.mdevs(parent).into_iter().map(|(u, _)| u).collect()
}

fn no_refusals(sim: &SimKernel) {
    assert!(
        sim.refused_writes().is_empty(),
        "{:?}",
        sim.refused_writes()
    );
}

fn link(path: &Path) -> PathBuf {
    fs::read_link(path).unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()))
}

fn canon(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|e| panic!("canonicalize {}: {e}", path.display()))
}

fn groups(fs: &FakeSys) -> Vec<String> {
    dir_names(&fs.path("kernel/iommu_groups"))
}

/// Everything mdev `uuid` of `parent` leaves behind, none of which must
/// exist once it is gone.
fn traces(fs: &FakeSys, parent: &str, uuid: &str, group: u32) -> Vec<PathBuf> {
    let mut out = vec![
        fs.path(&format!("bus/pci/devices/{parent}/{uuid}")),
        fs.path(&format!("bus/mdev/devices/{uuid}")),
        fs.path(&format!("bus/mdev/drivers/{NVIDIA}/{uuid}")),
        fs.path(&format!("kernel/iommu_groups/{group}")),
        fs.dev_path(&format!("vfio/{group}")),
    ];
    for (id, _, _) in P40_TYPES {
        out.push(fs.path(&format!("{}/devices/{uuid}", type_rel(parent, id))));
    }
    out.into_iter()
        .filter(|p| fs::symlink_metadata(p).is_ok())
        .collect()
}

// ---------------------------------------------------------------------------
// The parent
// ---------------------------------------------------------------------------

#[test]
fn a_parent_on_its_driver_shows_its_types() {
    let (fs, sim) = host();
    assert!(fs.is_mdev_parent(P40));
    assert!(fs.is_mdev_parent(IGD));
    assert!(!fs.is_mdev_parent(NIC));
    assert_eq!(
        dir_names(&fs.path(&format!("bus/pci/devices/{P40}/mdev_supported_types"))),
        [Q2, Q4, Q24]
    );
    for (id, name, max) in P40_TYPES {
        let t = type_rel(P40, id);
        assert_eq!(fs.cat(&format!("{t}/name")), format!("{name}\n"));
        assert!(fs.cat(&format!("{t}/description")).ends_with('\n'));
        assert_eq!(fs.cat(&format!("{t}/device_api")), "vfio-pci\n");
        assert_eq!(
            fs.cat(&format!("{t}/available_instances")),
            format!("{max}\n")
        );
        assert!(fs.path(&format!("{t}/create")).exists());
        assert!(dir_names(&fs.path(&format!("{t}/devices"))).is_empty());
    }
    assert_eq!(
        fs.cat(&format!("{}/name", type_rel(IGD, GVT))),
        "GVTg_V5_4\n"
    );
    assert!(!fs
        .path(&format!("bus/pci/devices/{NIC}/mdev_supported_types"))
        .exists());
    assert!(fs.path("bus/mdev/devices").is_dir());
    assert!(fs.mdevs(P40).is_empty());
    no_refusals(&sim);
}

#[test]
fn an_unbound_parent_or_one_on_vfio_pci_has_no_types_and_create_fails() {
    let (fs, sim) = host();
    let types = fs.path(&format!("bus/pci/devices/{P40}/mdev_supported_types"));
    fs.echo("bus/pci/drivers/nvidia/unbind", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(P40), None);
    assert!(!fs.is_mdev_parent(P40));
    assert!(!types.exists());
    // The directory is gone: the writer itself gets ENOENT.
    let err = fs
        .echo(&create_rel(P40, Q2), U1)
        .expect_err("no create while unbound");
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    // On vfio-pci it is no parent either.
    fs.set_driver_override(P40, Some(VFIO_PCI));
    fs.echo("bus/pci/drivers_probe", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(P40).as_deref(), Some(VFIO_PCI));
    assert!(!fs.is_mdev_parent(P40));
    assert!(!types.exists());
    assert!(fs.echo(&create_rel(P40, Q2), U1).is_err());
    // Back on nvidia: registered again, every type at its maximum.
    fs.echo("bus/pci/drivers/vfio-pci/unbind", P40).unwrap();
    fs.set_driver_override(P40, None);
    fs.echo("bus/pci/drivers_probe", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(P40).as_deref(), Some(NVIDIA));
    assert!(fs.is_mdev_parent(P40));
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    create(&fs, &sim, P40, Q2, U1);
    assert_eq!(uuids(&fs, P40), [U1]);
    assert!(fs.mdevs(IGD).is_empty());
    no_refusals(&sim);
}

// ---------------------------------------------------------------------------
// Create and remove
// ---------------------------------------------------------------------------

#[test]
fn create_makes_the_kernels_layout_and_remove_undoes_all_of_it() {
    let (fs, sim) = host();
    sim.clear_writes();
    let groups_before = groups(&fs);
    assert_eq!(groups_before, ["0", "1", "2"]);
    create(&fs, &sim, P40, Q4, &format!("{U1}\n"));
    assert_eq!(fs.mdevs(P40), [(U1.to_string(), Q4.to_string())]);
    let group = fs.mdev_group(U1).expect("a group");
    assert_eq!(group, 3, "a new group, the lowest free number");
    assert_eq!(fs.mdev_parent_of(U1).as_deref(), Some(P40));

    let pdir = fs.device_dir(P40).unwrap();
    let dir = pdir.join(U1);
    assert!(dir.is_dir());
    assert_eq!(
        link(&dir.join("mdev_type")),
        Path::new("../mdev_supported_types").join(Q4)
    );
    assert_eq!(
        canon(&dir.join("mdev_type")),
        pdir.join("mdev_supported_types").join(Q4)
    );
    let gdir = fs.path(&format!("kernel/iommu_groups/{group}"));
    assert!(link(&dir.join("iommu_group")).is_relative());
    assert_eq!(canon(&dir.join("iommu_group")), canon(&gdir));
    assert_eq!(dir_names(&gdir.join("devices")), [U1]);
    assert_eq!(canon(&gdir.join("devices").join(U1)), dir);
    assert_eq!(fs.group_members(group), [U1]);
    assert!(fs.path(&remove_rel(U1)).exists());
    assert_eq!(
        canon(&dir.join("driver")),
        canon(&fs.path(&format!("bus/mdev/drivers/{NVIDIA}")))
    );
    assert_eq!(canon(&fs.path(&format!("bus/mdev/devices/{U1}"))), dir);
    let in_type = fs.path(&format!("{}/devices/{U1}", type_rel(P40, Q4)));
    assert_eq!(link(&in_type), Path::new("../../..").join(U1));
    assert_eq!(canon(&in_type), dir);
    assert!(fs.vfio_group_node_exists(group));
    // The PCI function's own group is untouched.
    assert_eq!(fs.iommu_group_of(P40), Some(0));
    assert_eq!(fs.group_members(0), [P40]);

    remove(&fs, &sim, U1, "1\n");
    assert!(fs.mdevs(P40).is_empty());
    assert_eq!(fs.mdev_group(U1), None);
    assert_eq!(traces(&fs, P40, U1, group), Vec::<PathBuf>::new());
    assert_eq!(groups(&fs), groups_before);
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    assert!(fs.is_mdev_parent(P40));
    no_refusals(&sim);
    assert_eq!(
        sim.writes(),
        vec![
            (create_rel(P40, Q4), format!("{U1}\n")),
            (remove_rel(U1), "1\n".to_string()),
        ]
    );
}

#[test]
fn an_upper_case_uuid_names_the_mdev_in_lower_case_and_groups_are_reused() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q2, &U1.to_uppercase());
    create(&fs, &sim, P40, Q2, U2);
    assert_eq!(uuids(&fs, P40), [U1, U2]);
    assert_eq!(fs.mdev_group(&U1.to_uppercase()), Some(3));
    assert_eq!(fs.mdev_group(U2), Some(4));
    assert!(fs.path(&format!("bus/mdev/devices/{U1}")).is_dir());
    // The first group number is free again, and the next mdev gets it.
    remove(&fs, &sim, U1, "1");
    create(&fs, &sim, P40, Q2, U3);
    assert_eq!(fs.mdev_group(U3), Some(3));
    assert!(fs.vfio_group_node_exists(3) && fs.vfio_group_node_exists(4));
    // `create_store` takes 37 bytes and parses the first 36: the last
    // byte need not be a newline.
    create(&fs, &sim, P40, Q2, &format!("{U5}x"));
    assert_eq!(uuids(&fs, P40), [U2, U3, U5]);
    remove(&fs, &sim, U5, "1");
    // Two parents' mdevs are told apart.
    create(&fs, &sim, IGD, GVT, U4);
    assert_eq!(fs.mdevs(IGD), [(U4.to_string(), GVT.to_string())]);
    assert_eq!(uuids(&fs, P40), [U2, U3]);
    assert_eq!(
        canon(&fs.path(&format!("bus/mdev/devices/{U4}/driver"))),
        canon(&fs.path("bus/mdev/drivers/i915"))
    );
    no_refusals(&sim);
}

// ---------------------------------------------------------------------------
// Accounting
// ---------------------------------------------------------------------------

#[test]
fn one_type_per_parent_takes_the_others_away_until_the_last_goes() {
    let (fs, sim) = host();
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    create(&fs, &sim, P40, Q4, U1);
    assert_eq!(p40_available(&fs), [0, 5, 0]);
    create(&fs, &sim, P40, Q4, U2);
    assert_eq!(p40_available(&fs), [0, 4, 0]);
    // Another type cannot be had now.
    create(&fs, &sim, P40, Q2, U3);
    create(&fs, &sim, P40, Q24, U3);
    assert_eq!(uuids(&fs, P40), [U1, U2]);
    for u in [U3, U4, U5, U6] {
        create(&fs, &sim, P40, Q4, u);
    }
    assert_eq!(p40_available(&fs), [0, 0, 0]);
    // Full.
    create(&fs, &sim, P40, Q4, U7);
    assert_eq!(uuids(&fs, P40), [U1, U2, U3, U4, U5, U6]);
    assert_eq!(
        sim.refused_writes(),
        vec![
            (create_rel(P40, Q2), U3.to_string(), MDEV_NO_INSTANCE_ERRNO),
            (create_rel(P40, Q24), U3.to_string(), MDEV_NO_INSTANCE_ERRNO),
            (create_rel(P40, Q4), U7.to_string(), MDEV_NO_INSTANCE_ERRNO),
        ]
    );
    assert_eq!(MDEV_NO_INSTANCE_ERRNO, Errno::EUSERS);
    // Removing one gives one back, of that type only.
    remove(&fs, &sim, U3, "1");
    assert_eq!(p40_available(&fs), [0, 1, 0]);
    for u in [U1, U2, U4, U5] {
        remove(&fs, &sim, u, "1");
    }
    assert_eq!(p40_available(&fs), [0, 5, 0]);
    // The last one gone: every type at its maximum, and another fits.
    remove(&fs, &sim, U6, "1");
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    create(&fs, &sim, P40, Q24, U7);
    assert_eq!(p40_available(&fs), [0, 0, 0]);
    assert_eq!(fs.mdevs(P40), [(U7.to_string(), Q24.to_string())]);
    // Another parent's accounting is its own.
    assert_eq!(fs.mdev_available_instances(IGD, GVT), 2);
    assert_eq!(sim.refused_writes().len(), 3);
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn refused_creates_and_removes_change_nothing_and_are_recorded() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q2, U1);
    let available = p40_available(&fs);
    let groups_before = groups(&fs);
    let node_dir = dir_names(&fs.dev_path("vfio"));
    // (An empty write never reaches a sysfs store: not a refusal.)
    let malformed = [
        "\n",
        "not-a-uuid",
        &U2[..35],
        &format!("{U2}00"),
        &U2.replace('-', ""),
        &U2.replacen('b', "g", 1),
        &format!(" {U2}"),
        &format!("{{{U2}}}"),
    ];
    for bad in &malformed {
        create(&fs, &sim, P40, Q2, bad);
    }
    // The same UUID again, in either case, on this parent or another.
    create(&fs, &sim, P40, Q2, U1);
    create(&fs, &sim, P40, Q2, &format!("{}\n", U1.to_uppercase()));
    create(&fs, &sim, IGD, GVT, U1);
    // remove: not a number; 0 is no error and does nothing.
    remove(&fs, &sim, U1, "yes");
    remove(&fs, &sim, U1, "0");
    remove(&fs, &sim, U1, "0\n");

    assert_eq!(fs.mdevs(P40), [(U1.to_string(), Q2.to_string())]);
    assert!(fs.mdevs(IGD).is_empty());
    assert_eq!(p40_available(&fs), available);
    assert_eq!(fs.mdev_available_instances(IGD, GVT), 2);
    assert_eq!(groups(&fs), groups_before);
    assert_eq!(dir_names(&fs.dev_path("vfio")), node_dir);
    assert_eq!(dir_names(&fs.path("bus/mdev/devices")), [U1]);
    let mut expected: Vec<(String, String, Errno)> = malformed
        .iter()
        .map(|v| (create_rel(P40, Q2), v.to_string(), Errno::EINVAL))
        .collect();
    expected.extend([
        (create_rel(P40, Q2), U1.to_string(), Errno::EEXIST),
        (
            create_rel(P40, Q2),
            format!("{}\n", U1.to_uppercase()),
            Errno::EEXIST,
        ),
        (create_rel(IGD, GVT), U1.to_string(), Errno::EEXIST),
        (remove_rel(U1), "yes".to_string(), Errno::EINVAL),
    ]);
    assert_eq!(sim.refused_writes(), expected);
    // Still usable.
    remove(&fs, &sim, U1, "1");
    assert!(fs.mdevs(P40).is_empty());
    assert_eq!(sim.refused_writes().len(), expected.len());
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

#[test]
fn unbinding_the_parent_removes_its_mdevs_first() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q2, U1);
    create(&fs, &sim, P40, Q2, U2);
    create(&fs, &sim, IGD, GVT, U3);
    let g: Vec<u32> = [U1, U2].iter().map(|u| fs.mdev_group(u).unwrap()).collect();
    fs.echo("bus/pci/drivers/nvidia/unbind", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(P40), None);
    assert!(fs.mdevs(P40).is_empty());
    for (u, g) in [U1, U2].iter().zip(&g) {
        assert_eq!(fs.mdev_group(u), None);
        assert_eq!(traces(&fs, P40, u, *g), Vec::<PathBuf>::new(), "{u}");
    }
    assert!(!fs
        .path(&format!("bus/pci/devices/{P40}/mdev_supported_types"))
        .exists());
    // The other parent keeps its own.
    assert_eq!(uuids(&fs, IGD), [U3]);
    assert!(fs.vfio_group_node_exists(fs.mdev_group(U3).unwrap()));
    // Bound again: a parent with no mdevs.
    fs.echo("bus/pci/drivers/nvidia/bind", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert!(fs.is_mdev_parent(P40));
    assert!(fs.mdevs(P40).is_empty());
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    no_refusals(&sim);
}

#[test]
fn a_reset_that_loses_the_driver_takes_the_mdevs_with_it() {
    let fs = FakeSys::with_devices([p40().reset_methods("bus"), igd(), nic()]);
    let sim = SimKernel::start(&fs);
    create(&fs, &sim, P40, Q24, U1);
    let g = fs.mdev_group(U1).unwrap();
    sim.set_reset_outcome(P40, Some(ResetOutcome::LosesDriver));
    fs.echo(&format!("bus/pci/devices/{P40}/reset"), "1")
        .unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(P40), None);
    assert!(fs.mdevs(P40).is_empty());
    assert!(!fs.is_mdev_parent(P40));
    assert_eq!(traces(&fs, P40, U1, g), Vec::<PathBuf>::new());
}

#[test]
fn a_removed_parent_takes_its_mdevs_and_comes_back_without_any() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q4, U1);
    create(&fs, &sim, P40, Q4, U2);
    let g: Vec<u32> = [U1, U2].iter().map(|u| fs.mdev_group(u).unwrap()).collect();
    fs.remove_device(P40);
    assert!(sim.wait_idle(IDLE));
    assert!(fs.mdevs(P40).is_empty());
    assert!(!fs.is_mdev_parent(P40));
    for (u, g) in [U1, U2].iter().zip(&g) {
        assert_eq!(traces(&fs, P40, u, *g), Vec::<PathBuf>::new(), "{u}");
    }
    assert!(dir_names(&fs.path("bus/mdev/devices")).is_empty());
    assert_eq!(groups(&fs), ["1", "2"]);
    // Re-plugged: on its driver again, no mdev, every type at its maximum,
    // and the simulated kernel acts on its new `create`.
    fs.add_device(p40());
    assert!(fs.is_mdev_parent(P40));
    assert!(fs.mdevs(P40).is_empty());
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    create(&fs, &sim, P40, Q24, U1);
    assert_eq!(fs.mdevs(P40), [(U1.to_string(), Q24.to_string())]);
    no_refusals(&sim);
}

#[test]
fn a_reboot_leaves_no_mdev() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q2, U1);
    create(&fs, &sim, IGD, GVT, U2);
    let g1 = fs.mdev_group(U1).unwrap();
    let g2 = fs.mdev_group(U2).unwrap();
    // While the simulator runs.
    fs.reboot_mdev(P40);
    assert!(fs.mdevs(P40).is_empty());
    assert_eq!(traces(&fs, P40, U1, g1), Vec::<PathBuf>::new());
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    assert!(fs.is_mdev_parent(P40), "still on its driver");
    create(&fs, &sim, P40, Q2, U1);
    assert_eq!(uuids(&fs, P40), [U1]);
    // While nobody watches: a new simulator finds the parent clean.
    drop(sim);
    fs.reboot_mdev(P40);
    fs.reboot_mdev(IGD);
    assert!(fs.mdevs(IGD).is_empty());
    assert!(!fs.vfio_group_node_exists(g2));
    let sim = SimKernel::start(&fs);
    assert!(fs.mdevs(P40).is_empty());
    create(&fs, &sim, IGD, GVT, U2);
    assert_eq!(uuids(&fs, IGD), [U2]);
    no_refusals(&sim);
}

#[test]
fn a_restarted_simulator_keeps_the_mdevs_and_acts_on_writes() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q4, U1);
    drop(sim);
    // Without a simulator, `create` and `remove` are plain files.
    assert!(fs.path(&create_rel(P40, Q4)).is_file());
    assert!(fs.path(&remove_rel(U1)).is_file());
    let sim = SimKernel::start(&fs);
    assert_eq!(uuids(&fs, P40), [U1]);
    create(&fs, &sim, P40, Q4, U2);
    create(&fs, &sim, P40, Q2, U3);
    assert_eq!(uuids(&fs, P40), [U1, U2]);
    remove(&fs, &sim, U1, "1");
    assert_eq!(uuids(&fs, P40), [U2]);
    assert_eq!(p40_available(&fs), [0, 5, 0]);
    assert_eq!(
        sim.refused_writes(),
        vec![(create_rel(P40, Q2), U3.to_string(), MDEV_NO_INSTANCE_ERRNO)]
    );
}

#[test]
#[should_panic(expected = "needs a native driver")]
fn an_mdev_parent_without_a_driver_is_refused_by_the_builder() {
    let mut spec = p40();
    spec.driver = None;
    let _ = FakeSys::with_devices([spec]);
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[test]
fn fail_write_makes_create_and_remove_fail_until_released() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q2, U1);
    let create_at = create_rel(P40, Q2);
    // `remove` addressed through the parent's directory this time.
    let remove_at = format!("bus/pci/devices/{P40}/{U1}/remove");
    for (errno, kind) in [
        (Errno::EISDIR, Some(io::ErrorKind::IsADirectory)),
        (Errno::ENOENT, Some(io::ErrorKind::NotFound)),
        (Errno::ENOSPC, None),
    ] {
        sim.fail_write(&create_at, errno);
        sim.fail_write(&remove_at, errno);
        for (rel, value) in [(&create_at, U2), (&remove_at, "1")] {
            let err = fs.echo(rel, value).expect_err("the write fails");
            match kind {
                Some(kind) => assert_eq!(err.kind(), kind, "{rel} {errno:?}: {err}"),
                None => assert_eq!(err.raw_os_error(), Some(errno as i32), "{rel}: {err}"),
            }
        }
        assert!(sim.wait_idle(IDLE));
        assert_eq!(uuids(&fs, P40), [U1], "{errno:?}");
        sim.release(&create_at);
        sim.release(&remove_at);
    }
    // Both work again.
    create(&fs, &sim, P40, Q2, U2);
    assert_eq!(uuids(&fs, P40), [U1, U2]);
    remove(&fs, &sim, U1, "1");
    assert_eq!(uuids(&fs, P40), [U2]);
    no_refusals(&sim);
}

/// Writes `value` to `rel` from another thread, which blocks while the
/// attribute hangs.
fn hung_writer(fs: &FakeSys, rel: &str, value: &str) -> std::thread::JoinHandle<io::Result<()>> {
    let path = fs.path(rel);
    let value = value.to_string();
    let writer = std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "the writer of {rel} hangs");
    writer
}

#[test]
fn hung_create_and_remove_are_applied_when_released() {
    let (fs, sim) = host();
    let create_at = create_rel(P40, Q2);
    sim.hang_write(&create_at);
    let writer = hung_writer(&fs, &create_at, U1);
    assert!(sim.wait_idle(IDLE));
    assert!(fs.mdevs(P40).is_empty());
    sim.release(&create_at);
    writer.join().unwrap().expect("the released write");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(uuids(&fs, P40), [U1]);
    assert!(fs.vfio_group_node_exists(fs.mdev_group(U1).unwrap()));

    sim.hang_write(&remove_rel(U1));
    let writer = hung_writer(&fs, &remove_rel(U1), "1");
    assert!(sim.wait_idle(IDLE));
    assert_eq!(uuids(&fs, P40), [U1]);
    sim.release(&remove_rel(U1));
    writer.join().unwrap().expect("the released write");
    assert!(sim.wait_idle(IDLE));
    assert!(fs.mdevs(P40).is_empty());
    assert_eq!(p40_available(&fs), [12, 6, 1]);
    no_refusals(&sim);
}

#[test]
fn a_hung_remove_lets_its_writer_go_when_the_parent_unbinds() {
    let (fs, sim) = host();
    create(&fs, &sim, P40, Q2, U1);
    sim.hang_write(&remove_rel(U1));
    let writer = hung_writer(&fs, &remove_rel(U1), "1");
    fs.echo("bus/pci/drivers/nvidia/unbind", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert!(fs.mdevs(P40).is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !writer.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(writer.is_finished(), "the hung writer was let through");
    let _ = writer.join().unwrap();
    // Bound again: nothing of the dropped write is left behind.
    fs.echo("bus/pci/drivers/nvidia/bind", P40).unwrap();
    assert!(sim.wait_idle(IDLE));
    create(&fs, &sim, P40, Q2, U1);
    assert_eq!(uuids(&fs, P40), [U1]);
    no_refusals(&sim);
}
