//! The function's nodes, from sysfs: what the other two parts of the scan
//! look for.
//!
//! Every node the kernel created for the function is found in sysfs and
//! identified by its device number, never by its name, so that a process
//! inside a container (whose `/dev` is another tmpfs with other names) is
//! found too:
//! - the VFIO group node `<devfs>/vfio/N` (and `vfio/noiommu-N`), N being
//!   the function's `iommu_group`: stat'ed for its device number;
//! - every child device under the function's sysfs directory that has a
//!   `dev` file (`major:minor`): DRM nodes (`drm/cardN`, `drm/renderDN`),
//!   framebuffers (`graphics/fbN`), the VFIO cdev (`vfio-dev/vfioX`, that is
//!   `/dev/vfio/devices/vfioX`), block devices and partitions, and any
//!   other class device (sound, hidraw, the nvme controller's char node).
//!   A child whose `subsystem` is `block` is a block node, any other a
//!   character node. Child PCI functions (behind a bridge) are not
//!   descended into: they are functions of their own;
//! - the NVIDIA node: `<proc>/driver/nvidia/gpus/<address>/information`
//!   gives `Device Minor: N`, the node is character 195:N (`/dev/nvidiaN`).
//!
//! The same walk sorts the children the kernel consumers look at: block
//! devices (with NVMe multipath heads, which live elsewhere in sysfs),
//! network interfaces and framebuffers.

use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{makedev, SFlag};

use crate::pci::sysfs::{link_name, parse_device_number};
use crate::pci::{MdevUuid, PciAddress, Sysfs};
use crate::proc::ProcFs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum NodeKind {
    Char,
    Block,
}

/// A device node as the kernel identifies it: its type and `st_rdev`.
pub(super) type NodeKey = (NodeKind, u64);

const NVIDIA_MAJOR: u64 = 195;
/// Child directories of a device that never contain devices and can be
/// large (a block device's `mq/N/cpuM`, a NIC's `queues/`).
const NOT_DEVICES: &[&str] = &[
    "power",
    "queue",
    "mq",
    "holders",
    "slaves",
    "trace",
    "integrity",
    "msi_irqs",
    "queues",
    "statistics",
    "multipath",
];
const MAX_DEPTH: usize = 8;

/// A device below the function's sysfs directory.
#[derive(Debug)]
pub(super) struct ChildDevice {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    subsystem: Option<String>,
    pub(super) node: Option<NodeKey>,
}

/// What the scan looks for, for one function.
#[derive(Debug)]
pub(super) struct FunctionNodes {
    pub(super) addr: PciAddress,
    /// Device nodes of the function (group node included).
    pub(super) nodes: Vec<NodeKey>,
    /// The group node, alone: it attributes VFIO device descriptors on
    /// kernels that do not name their device.
    pub(super) group_node: Option<NodeKey>,
    /// Block devices and partitions (multipath heads included).
    pub(super) blocks: Vec<ChildDevice>,
    pub(super) nets: Vec<ChildDevice>,
    pub(super) framebuffers: Vec<String>,
    /// `<canonical device dir>/resource`, as `maps` shows it.
    pub(super) resource_prefix: Option<Vec<u8>>,
}

pub(super) fn node_of(meta: &fs::Metadata) -> Option<NodeKey> {
    let file_type = meta.file_type();
    if file_type.is_char_device() {
        Some((NodeKind::Char, meta.rdev()))
    } else if file_type.is_block_device() {
        Some((NodeKind::Block, meta.rdev()))
    } else {
        None
    }
}

fn read_child(dir: &Path, name: &str) -> ChildDevice {
    let subsystem = link_name(&dir.join("subsystem"));
    let node = fs::read_to_string(dir.join("dev"))
        .ok()
        .and_then(|t| parse_device_number(&t))
        .map(|rdev| {
            let kind = if subsystem.as_deref() == Some("block") {
                NodeKind::Block
            } else {
                NodeKind::Char
            };
            (kind, rdev)
        });
    ChildDevice {
        name: name.to_owned(),
        dir: dir.to_owned(),
        subsystem,
        node,
    }
}

/// Devices below `dir`, depth first. Symlinks (`driver`, `subsystem`,
/// `iommu_group`, ...) are not followed, and child PCI functions are
/// functions of their own.
fn collect_children(dir: &Path, depth: usize, out: &mut Vec<ChildDevice>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if NOT_DEVICES.contains(&name.as_str()) || name.parse::<PciAddress>().is_ok() {
            continue;
        }
        let path = entry.path();
        let child = read_child(&path, &name);
        if child.node.is_some() || child.subsystem.is_some() {
            out.push(child);
        }
        collect_children(&path, depth + 1, out);
    }
}

/// NVMe multipath: the function's disk `nvmeXcYnZ` is a hidden path of the
/// head disk `nvmeXnZ`, which lists it in its `multipath/` directory.
fn multipath_heads(sysfs: &Sysfs, path_disks: &[&str]) -> Vec<ChildDevice> {
    let class = sysfs.root().join("class/block");
    let Ok(entries) = fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut heads = Vec::new();
    for entry in entries.flatten() {
        let link = entry.path();
        let is_head = path_disks
            .iter()
            .any(|p| fs::symlink_metadata(link.join("multipath").join(p)).is_ok());
        if !is_head {
            continue;
        }
        let (Ok(dir), Some(name)) = (
            fs::canonicalize(&link),
            entry.file_name().to_str().map(str::to_owned),
        ) else {
            continue;
        };
        heads.extend(disk_with_partitions(&dir, &name));
    }
    heads
}

/// A disk and its partitions (the directories below it with a `partition`).
fn disk_with_partitions(dir: &Path, name: &str) -> Vec<ChildDevice> {
    let partitions = fs::read_dir(dir).into_iter().flatten().flatten();
    std::iter::once(read_child(dir, name))
        .chain(
            partitions
                .filter(|e| e.path().join("partition").exists())
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_owned();
                    Some(read_child(&e.path(), &name))
                }),
        )
        .collect()
}

/// NVMe multipath before Linux 6.14 (no `multipath/` directory): the head
/// disks `nvmeXnZ` (and their generic nodes `ngXnZ`) live in the
/// controller's subsystem, `class/nvme-subsystem/nvme-subsysN/`, which
/// links back to each of its controllers by name.
fn nvme_subsystem_heads(sysfs: &Sysfs, controllers: &[&str]) -> Vec<ChildDevice> {
    let class = sysfs.root().join("class/nvme-subsystem");
    let Ok(subsystems) = fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut heads = Vec::new();
    for subsystem in subsystems.flatten() {
        let Ok(dir) = fs::canonicalize(subsystem.path()) else {
            continue;
        };
        let ours = controllers
            .iter()
            .any(|c| fs::symlink_metadata(dir.join(c)).is_ok());
        if !ours {
            continue;
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            // Controllers are links back to the PCI functions; the heads
            // and generic nodes are directories of the subsystem.
            if fs::symlink_metadata(&path).map_or(true, |m| !m.is_dir()) {
                continue;
            }
            let child = read_child(&path, &name);
            match child.subsystem.as_deref() {
                Some("block") => heads.extend(disk_with_partitions(&path, &name)),
                Some("nvme-generic") if child.node.is_some() => heads.push(child),
                _ => {}
            }
        }
    }
    heads
}

fn nvidia_node(proc: &ProcFs, addr: PciAddress) -> Option<NodeKey> {
    let minor = proc.nvidia_device_minor(&addr.to_string())?;
    Some((NodeKind::Char, makedev(NVIDIA_MAJOR, minor)))
}

impl FunctionNodes {
    /// What holds mediated device `uuid` of `parent`: its group node and
    /// cdev, reported as the parent's (the mdev is not a PCI function).
    pub(super) fn of_mdev(sysfs: &Sysfs, parent: PciAddress, uuid: &MdevUuid) -> FunctionNodes {
        let mut nodes: Vec<NodeKey> = sysfs
            .mdev_vfio_nodes(uuid)
            .iter()
            .filter(|p| !p.ends_with("iommu"))
            .filter_map(|p| fs::metadata(p).ok().as_ref().and_then(node_of))
            .collect();
        nodes.sort_by_key(|(kind, rdev)| (*kind as u8, *rdev));
        let group_node = sysfs
            .mdev_iommu_group(uuid)
            .and_then(|g| fs::metadata(sysfs.vfio_group_node(g)).ok())
            .as_ref()
            .and_then(node_of);
        FunctionNodes {
            addr: parent,
            nodes,
            group_node,
            blocks: Vec::new(),
            nets: Vec::new(),
            framebuffers: Vec::new(),
            resource_prefix: None,
        }
    }

    pub(super) fn discover(sysfs: &Sysfs, proc: &ProcFs, addr: PciAddress) -> FunctionNodes {
        let dir = sysfs.device_dir(&addr);
        let mut nodes = Vec::new();
        let group_node = sysfs.iommu_group(&addr).and_then(|group| {
            let devfs_vfio = sysfs.vfio_group_node(group);
            let noiommu = devfs_vfio.with_file_name(format!("noiommu-{group}"));
            [devfs_vfio, noiommu]
                .iter()
                .find_map(|p| fs::metadata(p).ok().as_ref().and_then(node_of))
        });
        nodes.extend(group_node);
        nodes.extend(nvidia_node(proc, addr));

        let mut children = Vec::new();
        collect_children(&dir, 0, &mut children);
        let path_disks: Vec<&str> = children
            .iter()
            .filter(|c| c.subsystem.as_deref() == Some("block"))
            .map(|c| c.name.as_str())
            .collect();
        let mut heads = if path_disks.is_empty() {
            Vec::new()
        } else {
            multipath_heads(sysfs, &path_disks)
        };
        let controllers: Vec<&str> = children
            .iter()
            .filter(|c| c.subsystem.as_deref() == Some("nvme"))
            .map(|c| c.name.as_str())
            .collect();
        if heads.is_empty() && !controllers.is_empty() {
            heads = nvme_subsystem_heads(sysfs, &controllers);
        }
        children.extend(heads);
        nodes.extend(children.iter().filter_map(|c| c.node));

        let mut blocks = Vec::new();
        let mut nets = Vec::new();
        let mut framebuffers = Vec::new();
        for child in children {
            match child.subsystem.as_deref() {
                Some("block") => blocks.push(child),
                Some("net") => nets.push(child),
                Some("graphics") if child.name.starts_with("fb") => framebuffers.push(child.name),
                _ => {}
            }
        }
        let resource_prefix = fs::canonicalize(&dir).ok().map(|canonical| {
            let mut prefix = canonical.into_os_string().into_vec();
            prefix.extend_from_slice(b"/resource");
            prefix
        });
        nodes.sort_by_key(|(kind, rdev)| (*kind as u8, *rdev));
        nodes.dedup();
        FunctionNodes {
            addr,
            nodes,
            group_node,
            blocks,
            nets,
            framebuffers,
            resource_prefix,
        }
    }
}

/// The node a descriptor's `fstatat` shows, if it is a device node.
pub(super) fn node_of_stat(stat: &nix::sys::stat::FileStat) -> Option<NodeKey> {
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFCHR => Some((NodeKind::Char, stat.st_rdev)),
        SFlag::S_IFBLK => Some((NodeKind::Block, stat.st_rdev)),
        _ => None,
    }
}
