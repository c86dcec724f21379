//! The holder scan (`vfiod::pci::holders`) on a fake sysfs and a fake
//! `/proc`: each kind of holder, and the look-alikes that are not holders.
//!
//! Device numbers come from real character nodes of this machine (see
//! `test-support/src/fakeproc.rs`); the NVIDIA test needs `mknod` (root) for a
//! 195:N node and says so when it cannot run.

use std::fs;
use std::path::{Path, PathBuf};

use common::fakeproc::{alias_node, dev_numbers, FakeProc};
use common::fakesys::FakeSys;
use common::standard::{AMD, GPU, NIC, NVME, T4};
use vfiod::pci::holders::{self, Disposition, Holder, ProcFs};
use vfiod::pci::{PciAddress, Sysfs};

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn scan(fs: &FakeSys, proc: &FakeProc, functions: &[&str]) -> Vec<Holder> {
    let functions: Vec<PciAddress> = functions.iter().map(|f| addr(f)).collect();
    holders::scan(
        &Sysfs::new(&fs.sysfs, &fs.devfs),
        &ProcFs::new(&proc.root),
        &functions,
    )
    .expect("scan")
}

fn process(pci: &str, pid: u32, comm: &str, path: &Path, unit: Option<&str>) -> Holder {
    Holder::Process {
        pci_address: addr(pci),
        pid,
        comm: comm.into(),
        uid: 0,
        path: path.display().to_string(),
        unit: unit.map(str::to_owned),
    }
}

/// Background processes every host has: sockets, pipes, anonymous inodes,
/// regular files, `/dev/null`.
fn add_noise(proc: &FakeProc) {
    for pid in [1, 2, 300] {
        let mut p = proc.process(pid, &format!("noise{pid}"));
        p.fd("/dev/null");
        p.fd("socket:[4711]");
        p.fd("pipe:[4712]");
        p.fd("anon_inode:[eventfd]");
        p.fd("/etc/hostname");
        p.fd("/nonexistent/deleted-log (deleted)");
        p.maps("55d0c0000000-55d0c0021000 r-xp 00000000 fe:01 1234    /usr/bin/noise\n");
    }
}

/// The T4 (group 4, on vfio-pci) with a group node of its own number.
fn t4_group_node(fs: &FakeSys) -> PathBuf {
    let node = fs.dev_path("vfio/4");
    alias_node(&node, "/dev/urandom");
    node
}

#[test]
fn process_holding_the_vfio_group_node_is_named_with_its_unit() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    add_noise(&proc);
    let node = t4_group_node(&fs);
    let mut qemu = proc.process(4242, "qemu-system-x86");
    qemu.fd("/dev/null");
    qemu.fd(&node);
    qemu.cgroup("0::/machine.slice/machine-qemu\\x2d1\\x2dvm.scope/libvirt/emulator\n")
        .uid(107);

    let found = scan(&fs, &proc, &[T4]);
    assert_eq!(
        found,
        vec![Holder::Process {
            pci_address: addr(T4),
            pid: 4242,
            comm: "qemu-system-x86".into(),
            uid: 107,
            path: node.display().to_string(),
            unit: Some("machine-qemu\\x2d1\\x2dvm.scope".into()),
        }]
    );
    assert_eq!(found[0].disposition(), Disposition::Refuse);
    // The group node belongs to the T4 only: the AMD GPU is not held.
    assert_eq!(scan(&fs, &proc, &[AMD]), vec![]);
}

#[test]
fn matching_is_on_device_numbers_not_names() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    t4_group_node(&fs);
    // A container sees the same node under its own /dev.
    let container_dev = proc
        .root
        .parent()
        .unwrap()
        .join("container-root/dev/vfio/4");
    alias_node(&container_dev, "/dev/urandom");
    let mut p = proc.process(77, "ctr-app");
    p.fd(&container_dev);
    // A different node under the group node's name is not it.
    let impostor = proc.root.parent().unwrap().join("other-root/dev/vfio/4");
    alias_node(&impostor, "/dev/zero");
    let mut q = proc.process(78, "impostor");
    q.fd(&impostor);

    assert_eq!(
        scan(&fs, &proc, &[T4]),
        vec![process(
            T4,
            77,
            "ctr-app",
            &container_dev,
            Some("ctr-app.service")
        )]
    );
}

#[test]
fn vfio_device_descriptor_is_attributed_through_fdinfo() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    add_noise(&proc);
    let mut vmm = proc.process(500, "cloud-hypervisor");
    vmm.vfio_device_fd(Some("/sys/devices/pci0000:00/0000:00:04.0"));
    let mut other = proc.process(501, "other-vmm");
    other.vfio_device_fd(Some("/sys/devices/pci0000:00/0000:00:03.0"));

    assert_eq!(
        scan(&fs, &proc, &[T4]),
        vec![process(
            T4,
            500,
            "cloud-hypervisor",
            Path::new("anon_inode:[vfio-device]"),
            Some("cloud-hypervisor.service")
        )]
    );
}

#[test]
fn vfio_device_descriptor_without_syspath_counts_only_with_the_group_held() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let node = t4_group_node(&fs);
    let mut with_group = proc.process(600, "qemu");
    with_group.fd(&node);
    with_group.vfio_device_fd(None);
    // An old-kernel descriptor of some other device, no group of ours.
    let mut without_group = proc.process(601, "dpdk");
    without_group.vfio_device_fd(None);

    assert_eq!(
        scan(&fs, &proc, &[T4]),
        vec![
            process(T4, 600, "qemu", &node, Some("qemu.service")),
            process(
                T4,
                600,
                "qemu",
                Path::new("anon_inode:[vfio-device]"),
                Some("qemu.service")
            ),
        ]
    );
}

#[test]
fn vfio_cdev_drm_and_framebuffer_nodes_are_found_by_their_dev_files() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    add_noise(&proc);
    let nodes = [
        (
            "vfio-dev/vfio0",
            "vfio-dev",
            "vfio/devices/vfio0",
            "/dev/zero",
        ),
        ("drm/card0", "drm", "dri/card0", "/dev/full"),
        ("drm/renderD128", "drm", "dri/renderD128", "/dev/random"),
        ("graphics/fb0", "graphics", "fb0", "/dev/tty"),
    ];
    let mut expected = Vec::new();
    for (i, (rel, subsystem, dev, real)) in nodes.iter().enumerate() {
        fs.add_class_device(AMD, rel, subsystem, Some(&dev_numbers(real)));
        let node = fs.dev_path(dev);
        alias_node(&node, real);
        let pid = 1000 + i as u32;
        let mut p = proc.process(pid, "Xorg");
        p.fd("/dev/null");
        p.fd(&node);
        expected.push(process(AMD, pid, "Xorg", &node, Some("Xorg.service")));
    }
    assert_eq!(scan(&fs, &proc, &[AMD]), expected);
    // None of these nodes is the NIC's.
    assert_eq!(scan(&fs, &proc, &[NIC]), vec![]);
}

#[test]
fn nvidia_node_minor_comes_from_proc_driver_nvidia() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    proc.nvidia_gpu(GPU, 3);
    let node = proc.root.parent().unwrap().join("dev/nvidia3");
    let other = proc.root.parent().unwrap().join("dev/nvidia2");
    fs::create_dir_all(node.parent().unwrap()).unwrap();
    let mknod = |path: &Path, minor| {
        nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(195, minor),
        )
    };
    if let Err(e) = mknod(&node, 3) {
        eprintln!("SKIPPED: mknod of a 195:3 node needs root ({e})");
        return;
    }
    mknod(&other, 2).unwrap();
    let mut persistenced = proc.process(900, "nvidia-persistenced");
    persistenced.fd(&node);
    let mut exporter = proc.process(901, "dcgm-exporter");
    exporter.fd(&other);

    assert_eq!(
        scan(&fs, &proc, &[GPU]),
        vec![process(
            GPU,
            900,
            "nvidia-persistenced",
            &node,
            Some("nvidia-persistenced.service")
        )]
    );
}

#[test]
fn processes_mapping_the_resource_files_are_holders() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    add_noise(&proc);
    let dir = fs.device_dir(NIC).unwrap();
    let bar0 = format!("{}/resource0", dir.display());
    let p = proc.process(700, "dpdk-testpmd");
    p.map(&bar0);
    p.map(&format!("{}/resource2_wc", dir.display()));
    // Another function's BAR, and a path that merely contains ours.
    let q = proc.process(701, "lookalike");
    q.map(&format!(
        "{}/resource0",
        fs.device_dir(T4).unwrap().display()
    ));
    q.map(&format!("/home/u/copy{bar0}"));

    assert_eq!(
        scan(&fs, &proc, &[NIC]),
        vec![
            process(
                NIC,
                700,
                "dpdk-testpmd",
                Path::new(&bar0),
                Some("dpdk-testpmd.service")
            ),
            process(
                NIC,
                700,
                "dpdk-testpmd",
                &dir.join("resource2_wc"),
                Some("dpdk-testpmd.service")
            ),
        ]
    );
}

#[test]
fn gone_processes_and_unreadable_entries_do_not_fail_the_scan() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let node = t4_group_node(&fs);
    // Listed, but its fd directory is gone (exited between readdir and
    // the read).
    let zombie = proc.process(800, "zombie");
    fs::remove_dir_all(zombie.dir.join("fd")).unwrap();
    // Found holding the node, then gone before its comm/status are read.
    let mut late = proc.process(801, "late");
    late.fd(&node);
    fs::remove_file(late.dir.join("comm")).unwrap();
    fs::remove_file(late.dir.join("status")).unwrap();
    // A descriptor whose target no longer exists, and a fully gone one.
    let mut dangling = proc.process(802, "dangling");
    dangling.fd(proc.root.parent().unwrap().join("dev/removed"));
    let mut exited = proc.process(803, "exited");
    exited.fd(&node);
    exited.exit();
    // A holder that stays.
    let mut stays = proc.process(804, "stays");
    stays.fd(&node);
    // Garbage that is not a process directory.
    proc.write("sys/kernel/x", "1\n");

    assert_eq!(
        scan(&fs, &proc, &[T4]),
        vec![process(T4, 804, "stays", &node, Some("stays.service"))]
    );
}

#[test]
fn missing_proc_root_is_an_error_naming_it() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let missing = proc.root.join("nope");
    let err = holders::scan(
        &Sysfs::new(&fs.sysfs, &fs.devfs),
        &ProcFs::new(&missing),
        &[addr(T4)],
    )
    .unwrap_err();
    assert_eq!(err.path, missing);
    assert_eq!(err.errno(), Some(nix::libc::ENOENT));
}

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

/// The NVMe function's controller, disk and two partitions.
fn nvme_disk(fs: &FakeSys) -> PathBuf {
    fs.add_class_device(NVME, "nvme/nvme0", "nvme", Some("241:0"));
    let disk = fs.add_class_device(NVME, "nvme/nvme0/nvme0n1", "block", Some("259:0"));
    for (n, minor) in [(1, 1), (2, 2)] {
        let part = fs.add_class_device(
            NVME,
            &format!("nvme/nvme0/nvme0n1/nvme0n1p{n}"),
            "block",
            Some(&format!("259:{minor}")),
        );
        fs.write_attr(&part.join("partition"), &format!("{n}\n"));
    }
    disk
}

#[test]
fn unmounted_disk_has_no_holders_and_mounted_partitions_do() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let disk = nvme_disk(&fs);
    assert_eq!(scan(&fs, &proc, &[NVME]), vec![]);

    proc.append_line(
        "1/mountinfo",
        "40 22 259:1 / /srv/my\\040data rw,relatime shared:2 - xfs /dev/nvme0n1p1 rw",
    );
    // btrfs reports an anonymous device number; its source names the disk.
    proc.append_line(
        "1/mountinfo",
        "41 22 0:45 /@home /home rw,relatime shared:3 - btrfs /dev/nvme0n1p2 rw,subvol=/@home",
    );
    // Another disk's mount.
    proc.append_line(
        "1/mountinfo",
        "42 22 259:7 / /other rw - ext4 /dev/nvme1n1 rw",
    );
    let found = scan(&fs, &proc, &[NVME]);
    assert_eq!(
        found,
        vec![
            Holder::Mount {
                pci_address: addr(NVME),
                device: "nvme0n1p1".into(),
                mount_point: "/srv/my data".into(),
                fstype: "xfs".into(),
            },
            Holder::Mount {
                pci_address: addr(NVME),
                device: "nvme0n1p2".into(),
                mount_point: "/home".into(),
                fstype: "btrfs".into(),
            },
        ]
    );
    assert!(found.iter().all(|h| h.disposition() == Disposition::Refuse));
    let _ = disk;
}

#[test]
fn mountinfo_falls_back_to_self_when_init_is_not_readable() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    nvme_disk(&fs);
    fs::remove_file(proc.path("1/mountinfo")).unwrap();
    proc.write(
        "self/mountinfo",
        "40 22 259:0 / /data rw - ext4 /dev/nvme0n1 rw\n",
    );
    assert_eq!(
        scan(&fs, &proc, &[NVME]),
        vec![Holder::Mount {
            pci_address: addr(NVME),
            device: "nvme0n1".into(),
            mount_point: "/data".into(),
            fstype: "ext4".into(),
        }]
    );
}

#[test]
fn swap_and_device_mapper_stacks_are_holders() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let disk = nvme_disk(&fs);
    proc.append_line(
        "swaps",
        "/dev/nvme0n1p2                          partition\t8388604\t\t0\t\t-2",
    );
    fs.add_block_holder(&disk.join("nvme0n1p1"), "dm-0");
    assert_eq!(
        scan(&fs, &proc, &[NVME]),
        vec![
            Holder::Swap {
                pci_address: addr(NVME),
                device: "nvme0n1p2".into(),
            },
            Holder::BlockStack {
                pci_address: addr(NVME),
                device: "nvme0n1p1".into(),
                holder: "dm-0".into(),
            },
        ]
    );
}

#[test]
fn nvme_multipath_resolves_the_path_device_to_its_mounted_head() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    // The function shows the hidden path disk; the head disk and its
    // partition live under the subsystem and are what is mounted.
    fs.add_class_device(NVME, "nvme/nvme0", "nvme", Some("241:0"));
    let path_disk = fs.add_class_device(NVME, "nvme/nvme0/nvme0c0n1", "block", None);
    let subsys = fs.path("devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1");
    fs.write_attr(&subsys.join("dev"), "259:0\n");
    fs.write_attr(&subsys.join("nvme0n1p1/dev"), "259:1\n");
    fs.write_attr(&subsys.join("nvme0n1p1/partition"), "1\n");
    let tree = fs.tree();
    tree.symlink(&subsys.join("subsystem"), &fs.path("class/block"))
        .unwrap();
    tree.symlink(&subsys.join("nvme0n1p1/subsystem"), &fs.path("class/block"))
        .unwrap();
    tree.mkdir(&subsys.join("multipath")).unwrap();
    tree.symlink(&subsys.join("multipath/nvme0c0n1"), &path_disk)
        .unwrap();
    tree.symlink(&fs.path("class/block/nvme0n1"), &subsys)
        .unwrap();
    tree.symlink(&fs.path("class/block/nvme0n1p1"), &subsys.join("nvme0n1p1"))
        .unwrap();

    proc.append_line(
        "1/mountinfo",
        "40 22 259:1 / /var/lib/data rw - ext4 /dev/nvme0n1p1 rw",
    );
    assert_eq!(
        scan(&fs, &proc, &[NVME]),
        vec![Holder::Mount {
            pci_address: addr(NVME),
            device: "nvme0n1p1".into(),
            mount_point: "/var/lib/data".into(),
            fstype: "ext4".into(),
        }]
    );
}

/// Before Linux 6.14 the head has no `multipath/` directory (measured on
/// 6.12): it is found through the controller's NVMe subsystem, which links
/// back to the controller by name.
#[test]
fn nvme_head_is_found_through_the_subsystem_on_kernels_without_multipath_links() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let controller = fs.add_class_device(NVME, "nvme/nvme0", "nvme", Some("241:0"));
    fs.add_class_device(NVME, "nvme/nvme0/nvme0c0n1", "block", None);
    let subsys = fs.path("devices/virtual/nvme-subsystem/nvme-subsys0");
    let head = subsys.join("nvme0n1");
    fs.write_attr(&head.join("dev"), "259:0\n");
    fs.write_attr(&subsys.join("ng0n1/dev"), "240:0\n");
    let tree = fs.tree();
    tree.symlink(&head.join("subsystem"), &fs.path("class/block"))
        .unwrap();
    tree.mkdir(&fs.path("class/nvme-generic")).unwrap();
    tree.symlink(
        &subsys.join("ng0n1/subsystem"),
        &fs.path("class/nvme-generic"),
    )
    .unwrap();
    tree.symlink(&subsys.join("nvme0"), &controller).unwrap();
    tree.mkdir(&fs.path("class/nvme-subsystem")).unwrap();
    tree.symlink(&fs.path("class/nvme-subsystem/nvme-subsys0"), &subsys)
        .unwrap();

    proc.append_line(
        "1/mountinfo",
        "40 22 259:0 / /mnt rw - ext4 /dev/nvme0n1 rw",
    );
    assert_eq!(
        scan(&fs, &proc, &[NVME]),
        vec![Holder::Mount {
            pci_address: addr(NVME),
            device: "nvme0n1".into(),
            mount_point: "/mnt".into(),
            fstype: "ext4".into(),
        }]
    );
    // Another function's controller is not in this subsystem.
    assert_eq!(scan(&fs, &proc, &[NIC]), vec![]);
}

// ---------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------

fn nic(fs: &FakeSys, flags: &str) {
    let dir = fs.add_class_device(NIC, "net/enp0s2", "net", None);
    fs.write_attr(&dir.join("flags"), &format!("{flags}\n"));
}

const LINK_LOCAL: &str = "fe80000000000000505400fffe123456 02 40 20 80    enp0s2";
const GLOBAL: &str = "20010db8000000000000000000000042 02 40 00 80    enp0s2";
const V4_ROUTE: &str = "enp0s2\t0002000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0";

#[test]
fn nic_with_only_link_local_is_not_a_holder() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    nic(&fs, "0x1003");
    proc.append_line("net/if_inet6", LINK_LOCAL);
    proc.append_line(
        "net/ipv6_route",
        "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001   enp0s2",
    );
    proc.append_line(
        "net/ipv6_route",
        "ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001   enp0s2",
    );
    proc.append_line(
        "net/ipv6_route",
        "fe80000000000000505400fffe123456 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001   enp0s2",
    );
    assert_eq!(scan(&fs, &proc, &[NIC]), vec![]);
}

#[test]
fn nic_that_is_up_with_a_global_address_is_refused_unless_forced() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    nic(&fs, "0x1003");
    proc.append_line("net/if_inet6", LINK_LOCAL);
    proc.append_line("net/if_inet6", GLOBAL);
    // Another interface's address is not ours.
    proc.append_line(
        "net/if_inet6",
        "20010db8000000000000000000000099 03 40 00 80    eth9",
    );
    let found = scan(&fs, &proc, &[NIC]);
    assert_eq!(
        found,
        vec![Holder::NetInterface {
            pci_address: addr(NIC),
            interface: "enp0s2".into(),
            addresses: vec!["2001:db8::42".into()],
            routes: 0,
        }]
    );
    assert_eq!(found[0].disposition(), Disposition::RefuseUnlessForced);
}

#[test]
fn nic_that_is_down_with_an_address_is_not_a_holder_but_one_with_a_route_is() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    nic(&fs, "0x1002");
    proc.append_line("net/if_inet6", GLOBAL);
    assert_eq!(scan(&fs, &proc, &[NIC]), vec![]);

    // An IPv4 address shows as its prefix route.
    proc.append_line("net/route", V4_ROUTE);
    assert_eq!(
        scan(&fs, &proc, &[NIC]),
        vec![Holder::NetInterface {
            pci_address: addr(NIC),
            interface: "enp0s2".into(),
            addresses: vec!["2001:db8::42".into()],
            routes: 1,
        }]
    );
}

// ---------------------------------------------------------------------------
// Framebuffer console
// ---------------------------------------------------------------------------

#[test]
fn bound_fbcon_on_the_functions_framebuffer_is_a_plan_step_with_its_bind_path() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    fs.add_class_device(AMD, "graphics/fb0", "graphics", Some("29:0"));
    fs.add_vtconsole(0, "(S) dummy device", true);
    fs.add_vtconsole(1, "(M) frame buffer device", true);

    let found = scan(&fs, &proc, &[AMD]);
    assert_eq!(
        found,
        vec![Holder::FramebufferConsole {
            pci_address: addr(AMD),
            vtconsole: "vtcon1".into(),
            framebuffer: "fb0".into(),
        }]
    );
    assert_eq!(found[0].disposition(), Disposition::PlanStep);
    let sysfs = Sysfs::new(&fs.sysfs, &fs.devfs);
    assert_eq!(
        found[0].vtconsole_bind_path(&sysfs),
        Some(fs.path("class/vtconsole/vtcon1/bind"))
    );
    // A function without a framebuffer is not held by the console.
    assert_eq!(scan(&fs, &proc, &[NIC]), vec![]);
}

#[test]
fn unbound_fbcon_is_not_a_holder() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    fs.add_class_device(AMD, "graphics/fb0", "graphics", Some("29:0"));
    fs.add_vtconsole(0, "(S) dummy device", true);
    fs.add_vtconsole(1, "(M) frame buffer device", false);
    assert_eq!(scan(&fs, &proc, &[AMD]), vec![]);
}

// ---------------------------------------------------------------------------
// Several functions, and the JSON shape
// ---------------------------------------------------------------------------

#[test]
fn holders_come_in_the_order_of_the_functions_asked_about() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let group = t4_group_node(&fs);
    fs.add_class_device(AMD, "drm/card0", "drm", Some(&dev_numbers("/dev/full")));
    let card = fs.dev_path("dri/card0");
    alias_node(&card, "/dev/full");
    let mut a = proc.process(10, "a");
    a.fd(&card);
    let mut b = proc.process(20, "b");
    b.fd(&group);
    b.fd(&card);

    assert_eq!(
        scan(&fs, &proc, &[AMD, T4, AMD]),
        vec![
            process(AMD, 10, "a", &card, Some("a.service")),
            process(AMD, 20, "b", &card, Some("b.service")),
            process(T4, 20, "b", &group, Some("b.service")),
        ]
    );
}

#[test]
fn holders_serialise_with_a_kind_tag() {
    let h = Holder::Process {
        pci_address: addr(T4),
        pid: 1,
        comm: "x".into(),
        uid: 1000,
        path: "/dev/vfio/4".into(),
        unit: None,
    };
    assert_eq!(
        serde_json::to_value(&h).unwrap(),
        serde_json::json!({"kind": "process", "pci_address": T4, "pid": 1, "comm": "x",
                           "uid": 1000, "path": "/dev/vfio/4"})
    );
    let n = Holder::NetInterface {
        pci_address: addr(NIC),
        interface: "eth0".into(),
        addresses: vec![],
        routes: 2,
    };
    assert_eq!(
        serde_json::to_value(&n).unwrap(),
        serde_json::json!({"kind": "net_interface", "pci_address": NIC, "interface": "eth0",
                           "addresses": [], "routes": 2})
    );
}

#[test]
fn several_threads_find_what_one_thread_finds() {
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    let node = t4_group_node(&fs);
    let mut expected = Vec::new();
    for pid in 1..=1200 {
        let mut p = proc.process(pid, "p");
        p.fd("socket:[1]");
        p.fd("/dev/null");
        if pid % 97 == 0 {
            p.fd(&node);
            expected.push(process(T4, pid, "p", &node, Some("p.service")));
        }
    }
    let sysfs = Sysfs::new(&fs.sysfs, &fs.devfs);
    let procfs = ProcFs::new(&proc.root);
    for threads in [1, 2, 4] {
        let report = holders::scan_report_with_threads(
            &sysfs,
            &procfs,
            &[addr(T4)],
            std::num::NonZeroUsize::new(threads).unwrap(),
        )
        .unwrap();
        assert_eq!(report.holders, expected, "{threads} threads");
        assert!(report.uninspected.is_empty());
    }
}
