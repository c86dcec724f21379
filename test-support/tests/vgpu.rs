//! NVIDIA vGPU VFs in the fake tree and the simulated kernel: the files
//! `nvidia` gives a VF it binds (`nvidia/creatable_vgpu_types`,
//! `nvidia/current_vgpu_type`, `vfio-dev/`, `/dev/vfio/N`), type writes set
//! and read back, 0 first, the driver's refusals recorded, sibling
//! revocation and its lifting, a write that fails for the writer, and what
//! unbinding, disabling and a simulator restart do.

use nix::errno::Errno;
use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;
use vfiod_test_support::dir_names;
use vfiod_test_support::fakesys::{DeviceSpec, FakeSys, NVIDIA, VFIO_PCI};
use vfiod_test_support::simkernel::SimKernel;

const IDLE: Duration = Duration::from_secs(10);

/// An L40S-like board: PF behind a root port, VFs at offset 4, stride 1.
const PF: &str = "0000:41:00.0";
const VFS: [&str; 4] = [
    "0000:41:00.4",
    "0000:41:00.5",
    "0000:41:00.6",
    "0000:41:00.7",
];
const ROOT_PORT: &str = "0000:40:01.0";
const PF_GROUP: u32 = 30;

const B1: u32 = 1155;
const Q12: u32 = 1162;
const Q24: u32 = 1163;
const Q48: u32 = 1164;
/// (ID, name, framebuffer share) of a 48 GB board.
const TYPES: [(u32, &str, u32); 4] = [
    (B1, "NVIDIA L40S-1B", 32),
    (Q12, "NVIDIA L40S-12Q", 4),
    (Q24, "NVIDIA L40S-24Q", 2),
    (Q48, "NVIDIA L40S-48Q", 1),
];
const ALL: [u32; 4] = [B1, Q12, Q24, Q48];

fn root_port() -> DeviceSpec {
    DeviceSpec::new(ROOT_PORT, 0x8086, 0x7c10, 0x060400)
        .driver("pcieport")
        .group(PF_GROUP)
}

fn l40s() -> DeviceSpec {
    DeviceSpec::new(PF, 0x10de, 0x26b9, 0x030200)
        .subsystem(0x10de, 0x1851)
        .driver(NVIDIA)
        .group(PF_GROUP)
        .parent(ROOT_PORT)
        .reset_methods("flr bus")
        .sriov(32, 0x26b9)
        .sriov_layout(4, 1)
        .vgpu(&TYPES)
}

fn host(pf: DeviceSpec) -> (FakeSys, SimKernel) {
    let fs = FakeSys::with_devices([root_port(), pf]);
    let sim = SimKernel::start(&fs);
    (fs, sim)
}

/// A host whose PF has `n` VFs enabled (autoprobe on: all on nvidia).
fn host_with_vfs(n: usize) -> (FakeSys, SimKernel) {
    let (fs, sim) = host(l40s());
    fs.echo(
        &format!("bus/pci/devices/{PF}/sriov_numvfs"),
        &n.to_string(),
    )
    .unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.vfs_of(PF), VFS[..n].to_vec());
    (fs, sim)
}

fn current_rel(vf: &str) -> String {
    format!("bus/pci/devices/{vf}/nvidia/current_vgpu_type")
}

fn creatable_rel(vf: &str) -> String {
    format!("bus/pci/devices/{vf}/nvidia/creatable_vgpu_types")
}

/// Writes `value` to `vf`'s `current_vgpu_type` and waits until the
/// simulated kernel acted on it.
fn set_type(fs: &FakeSys, sim: &SimKernel, vf: &str, value: &str) {
    fs.echo(&current_rel(vf), value)
        .unwrap_or_else(|e| panic!("write {vf} <- {value}: {e}"));
    assert!(sim.wait_idle(IDLE));
}

/// The IDs `vf`'s `creatable_vgpu_types` file lists, checked against the
/// header line and the row format the NVIDIA driver prints.
fn creatable_file(fs: &FakeSys, vf: &str) -> Vec<u32> {
    let text = fs.cat(&creatable_rel(vf));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ID    : vGPU Name"), "{vf}: {text:?}");
    lines
        .map(|row| {
            let (id, name) = row
                .split_once(" : ")
                .unwrap_or_else(|| panic!("row {row:?}"));
            let id: u32 = id
                .trim_end()
                .parse()
                .unwrap_or_else(|_| panic!("row {row:?}"));
            let spec = TYPES.iter().find(|t| t.0 == id).expect("a known type");
            assert_eq!(name, spec.1, "row {row:?}");
            assert_eq!(row.find(':'), Some(6), "IDs padded to 6 columns: {row:?}");
            id
        })
        .collect()
}

/// Every VF's creatable list, from the file and from the kernel's state,
/// which must agree.
fn creatable_all(fs: &FakeSys, n: usize) -> Vec<Vec<u32>> {
    VFS[..n]
        .iter()
        .map(|vf| {
            let from_file = creatable_file(fs, vf);
            assert_eq!(from_file, fs.creatable_vgpu_types(vf), "{vf}");
            from_file
        })
        .collect()
}

fn current(fs: &FakeSys, vf: &str) -> u32 {
    let text = fs.cat(&current_rel(vf));
    let id = text
        .strip_suffix('\n')
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{vf}: current_vgpu_type reads {text:?}"));
    assert_eq!(id, fs.current_vgpu_type(vf), "{vf}: file and state");
    id
}

fn vfio_dev_entries(fs: &FakeSys, vf: &str) -> Vec<String> {
    dir_names(&fs.path(&format!("bus/pci/devices/{vf}/vfio-dev")))
}

fn no_refusals(sim: &SimKernel) {
    assert!(
        sim.refused_writes().is_empty(),
        "{:?}",
        sim.refused_writes()
    );
}

fn group(fs: &FakeSys, vf: &str) -> u32 {
    fs.iommu_group_of(vf)
        .unwrap_or_else(|| panic!("{vf} has a group"))
}

// ---------------------------------------------------------------------------
// What nvidia gives a VF
// ---------------------------------------------------------------------------

#[test]
fn each_vf_nvidia_binds_gets_its_vgpu_files_vfio_dev_and_group_node() {
    let (fs, sim) = host_with_vfs(4);
    no_refusals(&sim);
    let mut cdevs = Vec::new();
    for vf in VFS {
        assert_eq!(fs.driver_of(vf).as_deref(), Some(NVIDIA), "{vf}");
        assert!(fs.is_vgpu_vf(vf));
        assert_eq!(fs.cat(&current_rel(vf)), "0\n");
        assert_eq!(fs.current_vgpu_type(vf), 0);
        assert_eq!(creatable_file(&fs, vf), ALL.to_vec());
        let entries = vfio_dev_entries(&fs, vf);
        assert_eq!(entries.len(), 1, "{vf}: {entries:?}");
        let index = entries[0].strip_prefix("vfio").expect("vfioN");
        let cdev = format!("bus/pci/devices/{vf}/vfio-dev/{}", entries[0]);
        assert_eq!(fs.cat(&format!("{cdev}/dev")), format!("511:{index}\n"));
        cdevs.push(entries[0].clone());
        // nvidia.ko is the VF's VFIO provider: its group has a node.
        assert!(fs.vfio_group_node_exists(group(&fs, vf)), "{vf}");
    }
    assert_eq!(cdevs, ["vfio0", "vfio1", "vfio2", "vfio3"]);
    // The PF itself is no vGPU VF, its group no VFIO group.
    assert!(!fs.is_vgpu_vf(PF));
    assert!(!fs.path(&format!("bus/pci/devices/{PF}/nvidia")).exists());
    assert!(!fs.vfio_group_node_exists(PF_GROUP));
}

#[test]
fn a_vf_left_driverless_by_autoprobe_0_gets_the_files_once_bound() {
    let (fs, sim) = host(l40s());
    fs.echo(
        &format!("bus/pci/devices/{PF}/sriov_drivers_autoprobe"),
        "0",
    )
    .unwrap();
    fs.echo(&format!("bus/pci/devices/{PF}/sriov_numvfs"), "2")
        .unwrap();
    assert!(sim.wait_idle(IDLE));
    for vf in &VFS[..2] {
        assert_eq!(fs.driver_of(vf), None, "{vf}");
        assert!(!fs.is_vgpu_vf(vf));
        assert!(!fs.path(&current_rel(vf)).exists());
        assert!(vfio_dev_entries(&fs, vf).is_empty());
        assert!(!fs.vfio_group_node_exists(group(&fs, vf)));
    }
    // autoprobe back on, then a probe of one VF: nvidia takes it.
    fs.echo(
        &format!("bus/pci/devices/{PF}/sriov_drivers_autoprobe"),
        "1",
    )
    .unwrap();
    fs.echo("bus/pci/drivers_probe", VFS[1]).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[1]).as_deref(), Some(NVIDIA));
    assert_eq!(current(&fs, VFS[1]), 0);
    assert_eq!(creatable_file(&fs, VFS[1]), ALL.to_vec());
    assert!(fs.vfio_group_node_exists(group(&fs, VFS[1])));
    assert_eq!(vfio_dev_entries(&fs, VFS[1]), ["vfio0"]);
    // The other is untouched.
    assert_eq!(fs.driver_of(VFS[0]), None);
    assert!(!fs.vfio_group_node_exists(group(&fs, VFS[0])));
    no_refusals(&sim);
}

// ---------------------------------------------------------------------------
// Setting a type
// ---------------------------------------------------------------------------

#[test]
fn a_type_is_set_read_back_and_cleared_with_0() {
    let (fs, sim) = host_with_vfs(2);
    sim.clear_writes();
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(fs.cat(&current_rel(VFS[0])), "1162\n");
    assert_eq!(current(&fs, VFS[0]), Q12);
    // A trailing newline (echo) and the kernel's other bases are accepted.
    set_type(&fs, &sim, VFS[0], "0\n");
    assert_eq!(current(&fs, VFS[0]), 0);
    set_type(&fs, &sim, VFS[0], "0x48c\n");
    assert_eq!(current(&fs, VFS[0]), 1164);
    set_type(&fs, &sim, VFS[0], "0");
    assert_eq!(fs.cat(&current_rel(VFS[0])), "0\n");
    // Clearing a VF without a vGPU is no error.
    set_type(&fs, &sim, VFS[1], "0");
    assert_eq!(current(&fs, VFS[1]), 0);
    no_refusals(&sim);
    let logged: Vec<(String, String)> = sim.writes();
    let rel = current_rel(VFS[0]);
    assert_eq!(
        logged,
        vec![
            (rel.clone(), "1162".to_string()),
            (rel.clone(), "0\n".to_string()),
            (rel.clone(), "0x48c\n".to_string()),
            (rel, "0".to_string()),
            (current_rel(VFS[1]), "0".to_string()),
        ]
    );
}

#[test]
fn a_vf_carrying_another_type_must_be_cleared_first() {
    let (fs, sim) = host_with_vfs(2);
    set_type(&fs, &sim, VFS[0], &Q24.to_string());
    // Its own list still offers the other types: what it can take once
    // cleared (no sibling holds anything).
    assert_eq!(creatable_file(&fs, VFS[0]), ALL.to_vec());
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(current(&fs, VFS[0]), Q24, "a new type without 0 first");
    // The same type again is no new vGPU either.
    set_type(&fs, &sim, VFS[0], &Q24.to_string());
    assert_eq!(current(&fs, VFS[0]), Q24);
    let rel = current_rel(VFS[0]);
    assert_eq!(
        sim.refused_writes(),
        vec![
            (rel.clone(), "1162".to_string(), Errno::EBUSY),
            (rel, "1163".to_string(), Errno::EBUSY),
        ]
    );
    // 0, read back, then the new type: what the driver wants.
    set_type(&fs, &sim, VFS[0], "0");
    assert_eq!(current(&fs, VFS[0]), 0);
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(current(&fs, VFS[0]), Q12);
    assert_eq!(sim.refused_writes().len(), 2);
}

#[test]
fn writes_the_driver_refuses_change_nothing_and_are_recorded() {
    let (fs, sim) = host_with_vfs(2);
    set_type(&fs, &sim, VFS[1], &Q48.to_string());
    let before = creatable_all(&fs, 2);
    for bad in ["L40S-12Q", "", "-1", "9999", "1162abc", "4294967296"] {
        set_type(&fs, &sim, VFS[0], bad);
        assert_eq!(current(&fs, VFS[0]), 0, "after {bad:?}");
        assert_eq!(fs.cat(&current_rel(VFS[0])), "0\n", "after {bad:?}");
    }
    // Creatable on another board, not now on this one (VFS[1] holds the
    // whole framebuffer).
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(current(&fs, VFS[0]), 0);
    assert_eq!(creatable_all(&fs, 2), before);
    assert_eq!(current(&fs, VFS[1]), Q48);
    let refused = sim.refused_writes();
    let expected: Vec<(String, String, Errno)> = [
        "L40S-12Q",
        "",
        "-1",
        "9999",
        "1162abc",
        "4294967296",
        "1162",
    ]
    .iter()
    .map(|v| (current_rel(VFS[0]), v.to_string(), Errno::EINVAL))
    .collect();
    assert_eq!(refused, expected);
}

// ---------------------------------------------------------------------------
// Siblings
// ---------------------------------------------------------------------------

#[test]
fn siblings_lose_other_types_and_then_capacity_and_get_them_back() {
    let (fs, sim) = host_with_vfs(4);
    // One 24Q (share 2): siblings can take only 24Q now; VFS[0] itself
    // could still take anything once cleared.
    set_type(&fs, &sim, VFS[0], &Q24.to_string());
    assert_eq!(
        creatable_all(&fs, 4),
        vec![ALL.to_vec(), vec![Q24], vec![Q24], vec![Q24]]
    );
    // Another type on a sibling is refused.
    set_type(&fs, &sim, VFS[2], &Q12.to_string());
    assert_eq!(current(&fs, VFS[2]), 0);
    // The second 24Q fills the board: the others can take nothing.
    set_type(&fs, &sim, VFS[1], &Q24.to_string());
    assert_eq!(
        creatable_all(&fs, 4),
        vec![vec![Q24], vec![Q24], vec![], vec![]]
    );
    set_type(&fs, &sim, VFS[3], &Q24.to_string());
    assert_eq!(current(&fs, VFS[3]), 0, "a third 24Q on a 2-share board");
    let rel2 = current_rel(VFS[2]);
    let rel3 = current_rel(VFS[3]);
    assert_eq!(
        sim.refused_writes(),
        vec![
            (rel2, "1162".to_string(), Errno::EINVAL),
            (rel3, "1163".to_string(), Errno::EINVAL),
        ]
    );
    // Clearing one gives the others room for one 24Q again; the one left
    // holding 24Q could take anything once cleared.
    set_type(&fs, &sim, VFS[0], "0");
    assert_eq!(
        creatable_all(&fs, 4),
        vec![vec![Q24], ALL.to_vec(), vec![Q24], vec![Q24]]
    );
    set_type(&fs, &sim, VFS[3], &Q24.to_string());
    assert_eq!(current(&fs, VFS[3]), Q24);
    assert_eq!(
        creatable_all(&fs, 4),
        vec![vec![], vec![Q24], vec![], vec![Q24]]
    );
    // All cleared: every type everywhere.
    set_type(&fs, &sim, VFS[1], "0");
    set_type(&fs, &sim, VFS[3], "0");
    assert_eq!(creatable_all(&fs, 4), vec![ALL.to_vec(); 4]);
    // Now another type fits.
    set_type(&fs, &sim, VFS[2], &Q48.to_string());
    assert_eq!(current(&fs, VFS[2]), Q48);
    assert_eq!(
        creatable_all(&fs, 4),
        vec![vec![], vec![], ALL.to_vec(), vec![]]
    );
    assert_eq!(sim.refused_writes().len(), 2);
}

#[test]
fn a_small_type_fills_only_its_share() {
    let (fs, sim) = host_with_vfs(4);
    for vf in VFS {
        set_type(&fs, &sim, vf, &Q12.to_string());
        assert_eq!(current(&fs, vf), Q12);
    }
    no_refusals(&sim);
    // Four 12Q on a 4-share board: full.
    assert_eq!(creatable_all(&fs, 4), vec![vec![Q12]; 4]);
    assert_eq!(
        VFS.iter()
            .map(|vf| fs.current_vgpu_type(vf))
            .collect::<Vec<_>>(),
        vec![Q12; 4]
    );
}

// ---------------------------------------------------------------------------
// A write that fails for the writer
// ---------------------------------------------------------------------------

#[test]
fn fail_write_makes_a_type_write_fail_until_released() {
    let (fs, sim) = host_with_vfs(2);
    let rel = current_rel(VFS[0]);
    for (errno, kind) in [
        (Errno::EISDIR, io::ErrorKind::IsADirectory),
        (Errno::ENOENT, io::ErrorKind::NotFound),
    ] {
        sim.fail_write(&rel, errno);
        let err = fs
            .echo(&rel, &Q12.to_string())
            .expect_err("the write fails");
        assert_eq!(err.kind(), kind, "{errno:?}: {err}");
        assert!(sim.wait_idle(IDLE));
        assert_eq!(fs.current_vgpu_type(VFS[0]), 0);
        sim.release(&rel);
        assert_eq!(fs.cat(&rel), "0\n", "{errno:?}: restored");
    }
    // ENOSPC: the write reaches /dev/full (do not read the file meanwhile).
    sim.fail_write(&rel, Errno::ENOSPC);
    let err = fs
        .echo(&rel, &Q12.to_string())
        .expect_err("the write fails");
    assert_eq!(err.raw_os_error(), Some(Errno::ENOSPC as i32));
    sim.release(&rel);
    assert!(sim.wait_idle(IDLE));
    // Nothing was created, and the attribute works again.
    assert_eq!(creatable_all(&fs, 2), vec![ALL.to_vec(); 2]);
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(current(&fs, VFS[0]), Q12);
    no_refusals(&sim);
}

#[test]
fn a_hung_type_write_is_applied_when_released() {
    let (fs, sim) = host_with_vfs(2);
    let rel = current_rel(VFS[0]);
    sim.hang_write(&rel);
    let path: PathBuf = fs.path(&rel);
    let writer = std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .expect("open after release");
        f.write_all(b"1162").expect("write");
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "the writer hangs");
    assert_eq!(fs.current_vgpu_type(VFS[0]), 0);
    sim.release(&rel);
    writer.join().unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(current(&fs, VFS[0]), Q12);
    assert_eq!(creatable_file(&fs, VFS[1]), vec![Q12]);
    no_refusals(&sim);
}

// ---------------------------------------------------------------------------
// Unbinding, disabling, restarting
// ---------------------------------------------------------------------------

#[test]
fn unbinding_destroys_the_vgpu_and_vfio_pci_refuses_the_vf() {
    let (fs, sim) = host_with_vfs(2);
    set_type(&fs, &sim, VFS[0], &Q48.to_string());
    assert_eq!(creatable_all(&fs, 2), vec![ALL.to_vec(), vec![]]);
    let g0 = group(&fs, VFS[0]);
    fs.echo("bus/pci/drivers/nvidia/unbind", VFS[0]).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[0]), None);
    assert!(!fs.is_vgpu_vf(VFS[0]));
    assert!(!fs
        .path(&format!("bus/pci/devices/{}/nvidia", VFS[0]))
        .exists());
    assert!(vfio_dev_entries(&fs, VFS[0]).is_empty());
    assert!(!fs.vfio_group_node_exists(g0));
    // Its vGPU is gone: the sibling can take anything again.
    assert_eq!(creatable_file(&fs, VFS[1]), ALL.to_vec());
    assert_eq!(fs.creatable_vgpu_types(VFS[1]), ALL.to_vec());
    // vfio-pci will not have it.
    fs.set_driver_override(VFS[0], Some(VFIO_PCI));
    fs.echo("bus/pci/drivers_probe", VFS[0]).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[0]), None);
    assert!(!fs.vfio_group_node_exists(g0));
    // Back on nvidia: a fresh VF without a type.
    fs.set_driver_override(VFS[0], None);
    fs.echo("bus/pci/drivers_probe", VFS[0]).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(fs.driver_of(VFS[0]).as_deref(), Some(NVIDIA));
    assert_eq!(current(&fs, VFS[0]), 0);
    assert!(fs.vfio_group_node_exists(g0));
    assert_eq!(vfio_dev_entries(&fs, VFS[0]), ["vfio0"]);
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(current(&fs, VFS[0]), Q12);
    no_refusals(&sim);
}

#[test]
fn vfs_sharing_the_pf_group_keep_its_node_while_one_is_on_nvidia() {
    let (fs, sim) = host(l40s().vfs_share_group());
    fs.echo(&format!("bus/pci/devices/{PF}/sriov_numvfs"), "2")
        .unwrap();
    assert!(sim.wait_idle(IDLE));
    assert_eq!(group(&fs, VFS[0]), PF_GROUP);
    assert!(fs.vfio_group_node_exists(PF_GROUP));
    fs.echo("bus/pci/drivers/nvidia/unbind", VFS[0]).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert!(
        fs.vfio_group_node_exists(PF_GROUP),
        "VFS[1] still provides it"
    );
    fs.echo("bus/pci/drivers/nvidia/unbind", VFS[1]).unwrap();
    assert!(sim.wait_idle(IDLE));
    assert!(!fs.vfio_group_node_exists(PF_GROUP));
    // The PF (on nvidia, no vfio-dev) never counted.
    assert_eq!(fs.driver_of(PF).as_deref(), Some(NVIDIA));
}

#[test]
fn disabling_the_vfs_takes_their_vgpus_and_nodes_away() {
    let (fs, sim) = host_with_vfs(3);
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    set_type(&fs, &sim, VFS[2], &Q12.to_string());
    let groups: Vec<u32> = VFS[..3].iter().map(|vf| group(&fs, vf)).collect();
    fs.echo(&format!("bus/pci/devices/{PF}/sriov_numvfs"), "0")
        .unwrap();
    assert!(sim.wait_idle(IDLE));
    assert!(fs.vfs_of(PF).is_empty());
    for g in &groups {
        assert!(!fs.vfio_group_node_exists(*g));
    }
    assert!(fs.lock_state().vgpu.is_empty());
    // Enabled again: fresh VFs, nothing set, every type creatable.
    fs.echo(&format!("bus/pci/devices/{PF}/sriov_numvfs"), "3")
        .unwrap();
    assert!(sim.wait_idle(IDLE));
    for vf in &VFS[..3] {
        assert_eq!(current(&fs, vf), 0);
    }
    assert_eq!(creatable_all(&fs, 3), vec![ALL.to_vec(); 3]);
    no_refusals(&sim);
}

#[test]
fn a_restarted_simulator_keeps_the_vgpus_and_acts_on_writes() {
    let (fs, sim) = host_with_vfs(2);
    set_type(&fs, &sim, VFS[0], &Q24.to_string());
    drop(sim);
    let sim = SimKernel::start(&fs);
    assert_eq!(current(&fs, VFS[0]), Q24);
    set_type(&fs, &sim, VFS[1], &Q24.to_string());
    assert_eq!(current(&fs, VFS[1]), Q24);
    set_type(&fs, &sim, VFS[0], &Q12.to_string());
    assert_eq!(current(&fs, VFS[0]), Q24);
    assert_eq!(
        sim.refused_writes(),
        vec![(current_rel(VFS[0]), "1162".to_string(), Errno::EBUSY)]
    );
    assert_eq!(creatable_all(&fs, 2), vec![vec![Q24], vec![Q24]]);
}

#[test]
#[should_panic(expected = "ID 0 means no type")]
fn a_type_with_id_0_is_refused_by_the_builder() {
    let _ = DeviceSpec::new(PF, 0x10de, 0x26b9, 0x030200)
        .sriov(4, 0x26b9)
        .vgpu(&[(0, "NVIDIA L40S-12Q", 4)]);
}
