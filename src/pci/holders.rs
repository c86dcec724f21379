//! Who holds a PCI function: the scan vfiod runs before it takes a function
//! away from its driver, so that it can refuse (and name the holder)
//! instead of writing `unbind` and hanging in the kernel.
//!
//! The scan is blocking and reads only: sysfs through a [`Sysfs`], `/proc`
//! through a [`ProcFs`] (tests give both a fake tree). It never opens a
//! device node.
//!
//! # What is detected, and how
//!
//! **The function's nodes.** Every node the kernel created for the function
//! is found in sysfs and identified by its device number, never by its
//! name, so that a process inside a container (whose `/dev` is another
//! tmpfs with other names) is found too:
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
//! **Processes** (`<proc>/PID`, thread-group leaders only):
//! - an open descriptor whose target is one of those nodes: the descriptor
//!   is `readlink`ed first, and only targets that are paths (starting with
//!   `/`) are `stat`ed, which skips sockets, pipes and anonymous inodes
//!   without a second system call; the stat's file type and `st_rdev` must
//!   match a node of the function;
//! - an open VFIO device descriptor (`anon_inode:[vfio-device]`): the kernel
//!   (6.18 and later) names the device in `fdinfo/N` as
//!   `vfio-device-syspath: /sys/devices/.../<address>`; on older kernels
//!   the descriptor is attributed to a function only when the same process
//!   also holds that function's group node;
//! - a mapping of the function's `resourceN` files: a line of `maps` whose
//!   path is the function's canonical sysfs directory followed by
//!   `/resource`.
//!
//! For each, the holder says `pid`, `comm`, the real uid (from `status`),
//! the path as the process sees it (the `readlink` text, or the mapped
//! path) and the systemd unit: the last `.service` or `.scope` component of
//! the process's unified (or `name=systemd`) cgroup path.
//!
//! **Kernel consumers:**
//! - a block device of the function, or one of its partitions, that is
//!   mounted (`<proc>/1/mountinfo`, else `<proc>/self/mountinfo`, matched on
//!   `major:minor`, or on a `/dev/NAME` mount source for filesystems such as
//!   btrfs that report an anonymous device number), used as swap
//!   (`<proc>/swaps`: the path's device number, or its `/dev/NAME`), or with
//!   entries in its sysfs `holders/` (md, dm, LVM). With NVMe multipath the
//!   function's disk is the hidden path device `nvmeXcYnZ`; the disk that is
//!   mounted is the head `nvmeXnZ`, found as the `class/block/*` disk whose
//!   `multipath/` names the path device (Linux 6.14 and later), or else in
//!   the `class/nvme-subsystem/*` that links to the function's controller;
//!   its partitions count too;
//! - a network interface of the function (`net/IFNAME` below it) that is up
//!   (`flags` has IFF_UP) with an address other than IPv6 link-local
//!   (`<proc>/net/if_inet6`), or that carries a route (`<proc>/net/route`,
//!   `<proc>/net/ipv6_route` without link-local, multicast and local
//!   entries). IPv4 addresses are not listed in `/proc`; an IPv4 address
//!   shows through the prefix route the kernel adds for it;
//! - a framebuffer console: the function has a framebuffer and a
//!   `class/vtconsole/vtconN` whose `name` contains "frame buffer" is bound
//!   (`bind` is 1). Not a refusal: [`Holder::vtconsole_bind_path`] is the
//!   file the caller writes 0 to before the move and 1 after giving the
//!   device back.
//!
//! # Cost
//!
//! There is no kernel interface that lists who has a character device
//! open, so the scan reads every descriptor of every process, as `fuser`
//! and `lsof` do: one `readlink` per descriptor, a `stat` only for targets
//! that are paths, one read of `maps` per process. Each process is read
//! relative to its own `/proc/PID` directory (`openat`, `readlinkat`,
//! `fstatat`), and processes are shared out over one thread per CPU (at
//! most [`MAX_SCAN_THREADS`]). The benchmark (`benches/vfiod.rs`, section
//! 5) measures it on a fake `/proc` of 2,000 processes with 100
//! descriptors each: 475 ms of CPU per scan on the 2-vCPU development VM
//! when quiet (247 ms wall on two threads), 550 to 650 ms under heavy load
//! (load average 14), of which listing the `fd` directories and one
//! `readlink` per descriptor alone take about 430 ms. A host with 200,000
//! open descriptors pays hundreds of milliseconds per move. The same VM's
//! own `/proc` (70 to 120 processes, 300 to 750 descriptors) costs 2 to
//! 11 ms of CPU, most of it reading `maps`.
//!
//! # Limits (what the kernel does not expose, or what is not looked at)
//!
//! - Reading another user's `fd/`, `fdinfo/` and `maps` needs the
//!   ptrace-read permission (CAP_SYS_PTRACE, and CAP_DAC_READ_SEARCH for
//!   the directory); the processes that could not be inspected are counted
//!   in [`ScanReport::uninspected`] rather than failing the scan.
//! - A mapping of a device node whose descriptor was closed (a DRM buffer
//!   mmap'ed from `/dev/dri/card0`) is not seen: `maps` gives the device
//!   number of the filesystem holding the node, not the node's own.
//! - Threads that unshared their file table (clone without CLONE_FILES) are
//!   not listed under `/proc/PID`; only thread-group leaders are read.
//! - On kernels before 6.18 a VFIO device descriptor whose process closed
//!   the group descriptor cannot be attributed to a device.
//! - Network interfaces moved into another network namespace are not in
//!   our view of sysfs, and `/proc/net` is our namespace's.
//! - With several framebuffers the kernel does not say (in sysfs) which one
//!   carries the console; any bound fbcon counts for every function with a
//!   framebuffer. Boot framebuffers (efifb, simplefb, vesafb) belong to a
//!   platform device, not to the PCI function, and are not found.
//! - A multi-device btrfs shows only one of its devices in `mountinfo`.
//! - The scan is a snapshot: a process may open a node right after it.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{makedev, Mode, SFlag};
use serde::{Deserialize, Serialize};

use super::sysfs::{link_name, parse_hex};
use super::{PciAddress, Sysfs};
use crate::path_error::PathError;

/// The `/proc` filesystem (or a fake tree with the same layout).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Something that holds a PCI function. Serialised with a `kind` tag for
/// the API's `holders` lists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Holder {
    /// A process with a descriptor open on (or a mapping of) one of the
    /// function's nodes.
    Process {
        pci_address: PciAddress,
        pid: u32,
        comm: String,
        uid: u32,
        path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
    },
    /// A mounted block device (or partition) of the function.
    Mount {
        pci_address: PciAddress,
        device: String,
        mount_point: String,
        fstype: String,
    },
    /// A block device (or partition) of the function in use as swap.
    Swap {
        pci_address: PciAddress,
        device: String,
    },
    /// A block device of the function under an md/dm/LVM device.
    BlockStack {
        pci_address: PciAddress,
        device: String,
        holder: String,
    },
    /// A network interface of the function that is in use.
    NetInterface {
        pci_address: PciAddress,
        interface: String,
        addresses: Vec<String>,
        routes: u32,
    },
    /// The framebuffer console drawn on the function's framebuffer.
    FramebufferConsole {
        pci_address: PciAddress,
        vtconsole: String,
        framebuffer: String,
    },
}

/// What a move does about a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The move is refused.
    Refuse,
    /// The move is refused unless the request forces it.
    RefuseUnlessForced,
    /// The move goes on, with a step that releases the holder first.
    PlanStep,
}

impl Holder {
    pub fn pci_address(&self) -> PciAddress {
        match self {
            Holder::Process { pci_address, .. }
            | Holder::Mount { pci_address, .. }
            | Holder::Swap { pci_address, .. }
            | Holder::BlockStack { pci_address, .. }
            | Holder::NetInterface { pci_address, .. }
            | Holder::FramebufferConsole { pci_address, .. } => *pci_address,
        }
    }

    /// Processes and storage always refuse (taking a disk from under a
    /// mount is data loss, and an unbind under an open descriptor hangs);
    /// a network interface only cuts connectivity, so a caller may force
    /// it; the console can be moved off and back by vfiod itself.
    pub fn disposition(&self) -> Disposition {
        match self {
            Holder::Process { .. }
            | Holder::Mount { .. }
            | Holder::Swap { .. }
            | Holder::BlockStack { .. } => Disposition::Refuse,
            Holder::NetInterface { .. } => Disposition::RefuseUnlessForced,
            Holder::FramebufferConsole { .. } => Disposition::PlanStep,
        }
    }

    /// For a framebuffer console: the `bind` file of its vtconsole, to
    /// write `0` to before the move and `1` to when the device is given
    /// back. `None` for other holders.
    pub fn vtconsole_bind_path(&self, sysfs: &Sysfs) -> Option<PathBuf> {
        let Holder::FramebufferConsole { vtconsole, .. } = self else {
            return None;
        };
        vtconsole_bind_path(sysfs, vtconsole)
    }
}

/// The `bind` file of framebuffer console `vtconsole` (`vtconN`), or `None`
/// for any other name.
pub fn vtconsole_bind_path(sysfs: &Sysfs, vtconsole: &str) -> Option<PathBuf> {
    // The name was read from a directory listing or the state file; it is
    // checked again so that nothing but `vtconN` is ever joined into a
    // write path.
    let number = vtconsole.strip_prefix("vtcon")?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        sysfs
            .root()
            .join("class/vtconsole")
            .join(vtconsole)
            .join("bind"),
    )
}

/// A failed read the scan cannot do without (listing `/proc`, the mount
/// table): which file, and why.
pub type HolderScanError = PathError;

/// The holders, and how complete the answer is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Sorted by the order of the functions asked about, then by kind.
    pub holders: Vec<Holder>,
    /// Processes whose descriptors or mappings could not be read (no
    /// permission): they may hold a function without being listed.
    pub uninspected: Vec<u32>,
}

/// What holds each of `functions`. See the module documentation for what
/// is detected. Processes that vanish mid-scan and unreadable entries are
/// skipped; processes that could not be inspected are logged.
pub fn scan(
    sysfs: &Sysfs,
    proc: &ProcFs,
    functions: &[PciAddress],
) -> Result<Vec<Holder>, HolderScanError> {
    let report = scan_report(sysfs, proc, functions)?;
    if !report.uninspected.is_empty() {
        tracing::warn!(
            count = report.uninspected.len(),
            pids = ?&report.uninspected[..report.uninspected.len().min(10)],
            "holder scan could not read the descriptors of some processes (missing CAP_SYS_PTRACE?)"
        );
    }
    Ok(report.holders)
}

/// [`scan`], also saying which processes could not be inspected.
pub fn scan_report(
    sysfs: &Sysfs,
    proc: &ProcFs,
    functions: &[PciAddress],
) -> Result<ScanReport, HolderScanError> {
    scan_report_with_threads(sysfs, proc, functions, default_threads())
}

/// The number of threads [`scan_report`] reads `/proc` with: one per CPU,
/// at most [`MAX_SCAN_THREADS`].
pub fn default_threads() -> NonZeroUsize {
    std::thread::available_parallelism()
        .map(|n| n.min(NonZeroUsize::new(MAX_SCAN_THREADS).expect("non-zero")))
        .unwrap_or(NonZeroUsize::MIN)
}

/// Beyond this, more threads only contend for the same kernel locks.
pub const MAX_SCAN_THREADS: usize = 4;

/// [`scan_report`] with the processes read by `threads` threads (the
/// calling one included).
pub fn scan_report_with_threads(
    sysfs: &Sysfs,
    proc: &ProcFs,
    functions: &[PciAddress],
    threads: NonZeroUsize,
) -> Result<ScanReport, HolderScanError> {
    let mut seen = BTreeSet::new();
    let functions: Vec<PciAddress> = functions
        .iter()
        .copied()
        .filter(|f| seen.insert(*f))
        .collect();
    let nodes: Vec<FunctionNodes> = functions
        .iter()
        .map(|addr| FunctionNodes::discover(sysfs, proc, *addr))
        .collect();
    let mut holders = Vec::new();
    kernel_consumers(sysfs, proc, &nodes, &mut holders)?;
    let targets = Targets::new(&nodes);
    let uninspected = scan_processes(proc, &targets, threads, &mut holders)?;
    let rank = |h: &Holder| {
        functions
            .iter()
            .position(|f| *f == h.pci_address())
            .unwrap_or(usize::MAX)
    };
    holders.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    holders.dedup();
    Ok(ScanReport {
        holders,
        uninspected,
    })
}

// ---------------------------------------------------------------------------
// The function's nodes, from sysfs
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NodeKind {
    Char,
    Block,
}

/// A device node as the kernel identifies it: its type and `st_rdev`.
type NodeKey = (NodeKind, u64);

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
struct ChildDevice {
    name: String,
    dir: PathBuf,
    subsystem: Option<String>,
    node: Option<NodeKey>,
}

#[derive(Debug)]
struct FunctionNodes {
    addr: PciAddress,
    /// Device nodes of the function (group node included).
    nodes: Vec<NodeKey>,
    /// The group node, alone: it attributes VFIO device descriptors on
    /// kernels that do not name their device.
    group_node: Option<NodeKey>,
    /// Block devices and partitions (multipath heads included).
    blocks: Vec<ChildDevice>,
    nets: Vec<ChildDevice>,
    framebuffers: Vec<String>,
    /// `<canonical device dir>/resource`, as `maps` shows it.
    resource_prefix: Option<Vec<u8>>,
}

fn parse_dev(text: &str) -> Option<u64> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(makedev(major.parse().ok()?, minor.parse().ok()?))
}

fn node_of(meta: &fs::Metadata) -> Option<NodeKey> {
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
        .and_then(|t| parse_dev(&t))
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
    let info = fs::read_to_string(
        proc.root()
            .join("driver/nvidia/gpus")
            .join(addr.to_string())
            .join("information"),
    )
    .ok()?;
    let minor = info
        .lines()
        .find_map(|l| l.strip_prefix("Device Minor:"))?
        .trim()
        .parse()
        .ok()?;
    Some((NodeKind::Char, makedev(NVIDIA_MAJOR, minor)))
}

impl FunctionNodes {
    fn discover(sysfs: &Sysfs, proc: &ProcFs, addr: PciAddress) -> FunctionNodes {
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

// ---------------------------------------------------------------------------
// Kernel consumers
// ---------------------------------------------------------------------------

fn read_optional(path: &Path) -> Result<Option<String>, HolderScanError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError {
            op: "read",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// `\040` and friends: how `mountinfo` and `swaps` escape spaces, tabs,
/// newlines and backslashes in paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                u8::try_from(value).ok()
            });
        match escape {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn kernel_consumers(
    sysfs: &Sysfs,
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    if functions.iter().any(|f| !f.blocks.is_empty()) {
        storage_consumers(proc, functions, out)?;
    }
    if functions.iter().any(|f| !f.nets.is_empty()) {
        net_consumers(proc, functions, out)?;
    }
    if functions.iter().any(|f| !f.framebuffers.is_empty()) {
        console_consumers(sysfs, functions, out);
    }
    Ok(())
}

fn storage_consumers(
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    // Block device number or `/dev/NAME` → (function, device name).
    let mut by_rdev: HashMap<u64, (PciAddress, &str)> = HashMap::new();
    let mut by_name: HashMap<&str, PciAddress> = HashMap::new();
    for f in functions {
        for b in &f.blocks {
            if let Some((NodeKind::Block, rdev)) = b.node {
                by_rdev.insert(rdev, (f.addr, &b.name));
            }
            by_name.insert(&b.name, f.addr);
            let holders = fs::read_dir(b.dir.join("holders"))
                .map(|d| d.flatten().collect::<Vec<_>>())
                .unwrap_or_default();
            for h in holders {
                out.push(Holder::BlockStack {
                    pci_address: f.addr,
                    device: b.name.clone(),
                    holder: h.file_name().to_string_lossy().into_owned(),
                });
            }
        }
    }
    let by_dev_path = |source: &str| {
        let name = source.strip_prefix("/dev/")?;
        by_name.get_key_value(name).map(|(n, a)| (*a, *n))
    };

    // The init process's mount namespace is the host's; ours may be a
    // private one (ProtectSystem= and friends give the unit its own).
    let mountinfo_paths = [
        proc.root().join("1/mountinfo"),
        proc.root().join("self/mountinfo"),
    ];
    let mut mountinfo = None;
    let mut last_error = None;
    for path in &mountinfo_paths {
        match fs::read_to_string(path) {
            Ok(text) => {
                mountinfo = Some(text);
                break;
            }
            Err(e) => last_error = Some((path.clone(), e)),
        }
    }
    let Some(mountinfo) = mountinfo else {
        let (path, source) = last_error.expect("two paths were tried");
        return Err(PathError {
            op: "read",
            path,
            source,
        });
    };
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let mut right = right.split(' ');
        let (Some(fstype), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        if fields.len() < 5 {
            continue;
        }
        let source = unescape_octal(source);
        let found = parse_dev(fields[2])
            .and_then(|rdev| by_rdev.get(&rdev).copied())
            .or_else(|| by_dev_path(&source));
        if let Some((addr, device)) = found {
            out.push(Holder::Mount {
                pci_address: addr,
                device: device.to_owned(),
                mount_point: unescape_octal(fields[4]),
                fstype: fstype.to_owned(),
            });
        }
    }

    let swaps_path = proc.root().join("swaps");
    let swaps = read_optional(&swaps_path)?.unwrap_or_default();
    for line in swaps.lines().skip(1) {
        let Some(field) = line.split_whitespace().next() else {
            continue;
        };
        let path = unescape_octal(field);
        let found = fs::metadata(&path)
            .ok()
            .as_ref()
            .and_then(node_of)
            .and_then(|(kind, rdev)| (kind == NodeKind::Block).then_some(rdev))
            .and_then(|rdev| by_rdev.get(&rdev).copied())
            .or_else(|| by_dev_path(&path));
        if let Some((addr, device)) = found {
            out.push(Holder::Swap {
                pci_address: addr,
                device: device.to_owned(),
            });
        }
    }
    Ok(())
}

const IFF_UP: u32 = 0x1;
const RTF_LOCAL: u32 = 0x8000_0000;

/// An IPv6 address as `/proc/net` writes it: 32 hex digits.
fn ipv6_from_hex(hex: &str) -> Option<std::net::Ipv6Addr> {
    u128::from_str_radix(hex, 16)
        .ok()
        .filter(|_| hex.len() == 32)
        .map(std::net::Ipv6Addr::from)
}

fn is_link_local_or_multicast(addr: &std::net::Ipv6Addr) -> bool {
    let first = addr.segments()[0];
    first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00
}

fn net_consumers(
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    let net = proc.root().join("net");
    // Each file is missing when its protocol is not built in (IPv6
    // disabled): that is "no addresses, no routes", not an error.
    let if_inet6 = read_optional(&net.join("if_inet6"))?.unwrap_or_default();
    let route = read_optional(&net.join("route"))?.unwrap_or_default();
    let ipv6_route = read_optional(&net.join("ipv6_route"))?.unwrap_or_default();

    for f in functions {
        for nic in &f.nets {
            let name = nic.name.as_str();
            let up = fs::read_to_string(nic.dir.join("flags"))
                .ok()
                .and_then(|t| parse_hex(&t))
                .is_some_and(|flags| flags & IFF_UP != 0);
            let addresses: Vec<String> = if_inet6
                .lines()
                .filter_map(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    (fields.len() == 6 && fields[5] == name).then(|| ipv6_from_hex(fields[0]))?
                })
                .filter(|a| !is_link_local_or_multicast(a))
                .map(|a| a.to_string())
                .collect();
            let v4_routes = route
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().next() == Some(name))
                .count();
            let v6_routes = ipv6_route
                .lines()
                .filter(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    fields.len() == 10
                        && fields[9] == name
                        && parse_hex(fields[8]).is_some_and(|flags| flags & RTF_LOCAL == 0)
                        && ipv6_from_hex(fields[0]).is_some_and(|d| !is_link_local_or_multicast(&d))
                })
                .count();
            let routes = u32::try_from(v4_routes + v6_routes).unwrap_or(u32::MAX);
            if (up && !addresses.is_empty()) || routes > 0 {
                out.push(Holder::NetInterface {
                    pci_address: f.addr,
                    interface: name.to_owned(),
                    addresses,
                    routes,
                });
            }
        }
    }
    Ok(())
}

fn console_consumers(sysfs: &Sysfs, functions: &[FunctionNodes], out: &mut Vec<Holder>) {
    let Ok(entries) = fs::read_dir(sysfs.root().join("class/vtconsole")) else {
        return;
    };
    let mut bound_fbcons: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let dir = e.path();
            let description = fs::read_to_string(dir.join("name")).ok()?;
            let bound = fs::read_to_string(dir.join("bind")).ok()?;
            (description.contains("frame buffer") && bound.trim() == "1").then_some(name)
        })
        .collect();
    bound_fbcons.sort();
    for f in functions {
        for vtconsole in &bound_fbcons {
            for framebuffer in &f.framebuffers {
                out.push(Holder::FramebufferConsole {
                    pci_address: f.addr,
                    vtconsole: vtconsole.clone(),
                    framebuffer: framebuffer.clone(),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

struct Targets {
    nodes: HashMap<NodeKey, Vec<PciAddress>>,
    group_nodes: HashMap<NodeKey, Vec<PciAddress>>,
    addresses: Vec<PciAddress>,
    resource_prefixes: Vec<(Vec<u8>, PciAddress)>,
}

impl Targets {
    fn new(functions: &[FunctionNodes]) -> Targets {
        let mut nodes: HashMap<NodeKey, Vec<PciAddress>> = HashMap::new();
        let mut group_nodes: HashMap<NodeKey, Vec<PciAddress>> = HashMap::new();
        for f in functions {
            for key in &f.nodes {
                nodes.entry(*key).or_default().push(f.addr);
            }
            if let Some(key) = f.group_node {
                group_nodes.entry(key).or_default().push(f.addr);
            }
        }
        Targets {
            nodes,
            group_nodes,
            addresses: functions.iter().map(|f| f.addr).collect(),
            resource_prefixes: functions
                .iter()
                .filter_map(|f| Some((f.resource_prefix.clone()?, f.addr)))
                .collect(),
        }
    }
}

const VFIO_DEVICE_ANON: &[u8] = b"anon_inode:[vfio-device]";
const FDINFO_SYSPATH: &str = "vfio-device-syspath:";

/// A descriptor or mapping of a process that holds a function.
struct Hold {
    addr: PciAddress,
    path: String,
}

enum ProcessOutcome {
    Holds(Vec<Hold>),
    Gone,
    Uninspected,
}

fn is_denied(errno: Errno) -> bool {
    matches!(errno, Errno::EACCES | Errno::EPERM)
}

fn fdinfo_syspath_address(text: &str) -> Option<Option<PciAddress>> {
    let syspath = text.lines().find_map(|l| l.strip_prefix(FDINFO_SYSPATH))?;
    Some(
        Path::new(syspath.trim())
            .file_name()
            .and_then(OsStr::to_str)
            .and_then(|n| n.parse().ok()),
    )
}

fn open_dir_at(dir: impl AsFd, name: &CStr) -> nix::Result<Dir> {
    Dir::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn read_at(dir: impl AsFd, name: &CStr) -> nix::Result<Vec<u8>> {
    let fd = nix::fcntl::openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut content = Vec::new();
    fs::File::from(fd)
        .read_to_end(&mut content)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    Ok(content)
}

fn node_of_stat(stat: &nix::sys::stat::FileStat) -> Option<NodeKey> {
    match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFCHR => Some((NodeKind::Char, stat.st_rdev)),
        SFlag::S_IFBLK => Some((NodeKind::Block, stat.st_rdev)),
        _ => None,
    }
}

/// One process's descriptors and mappings. Every file is opened relative
/// to the process's directory: `/proc` paths are long, and a scan makes
/// hundreds of thousands of these calls.
fn inspect_process(pid_dir: &Dir, targets: &Targets) -> ProcessOutcome {
    let mut fd_dir = match open_dir_at(pid_dir, c"fd") {
        Ok(dir) => dir,
        Err(e) if is_denied(e) => return ProcessOutcome::Uninspected,
        Err(_) => return ProcessOutcome::Gone,
    };
    let mut names = Vec::with_capacity(64);
    for entry in fd_dir.iter() {
        match entry {
            Ok(entry) => {
                let name = entry.file_name();
                if name.to_bytes().first().is_some_and(u8::is_ascii_digit) {
                    names.push(name.to_owned());
                }
            }
            Err(e) if is_denied(e) => return ProcessOutcome::Uninspected,
            Err(_) => break,
        }
    }
    let mut holds = Vec::new();
    let mut groups_held: Vec<PciAddress> = Vec::new();
    let mut unattributed_vfio_devices = false;
    // Opened on the first VFIO device descriptor; a VMM may have several.
    let mut fdinfo: Option<Dir> = None;
    for name in &names {
        let Ok(target) = nix::fcntl::readlinkat(&fd_dir, name.as_c_str()) else {
            continue;
        };
        let bytes = target.as_bytes();
        // Sockets, pipes and anonymous inodes never start with '/': only
        // paths can be device nodes, and only they are stat'ed.
        if bytes.first() == Some(&b'/') {
            let Some(key) = nix::sys::stat::fstatat(&fd_dir, name.as_c_str(), AtFlags::empty())
                .ok()
                .as_ref()
                .and_then(node_of_stat)
            else {
                continue;
            };
            if let Some(addrs) = targets.nodes.get(&key) {
                let path = target.to_string_lossy().into_owned();
                for addr in addrs {
                    holds.push(Hold {
                        addr: *addr,
                        path: path.clone(),
                    });
                }
            }
            if let Some(addrs) = targets.group_nodes.get(&key) {
                groups_held.extend(addrs);
            }
        } else if bytes == VFIO_DEVICE_ANON {
            if fdinfo.is_none() {
                fdinfo = open_dir_at(pid_dir, c"fdinfo").ok();
            }
            let Some(fdinfo) = &fdinfo else {
                continue;
            };
            let Ok(text) = read_at(fdinfo, name.as_c_str()) else {
                continue;
            };
            match fdinfo_syspath_address(&String::from_utf8_lossy(&text)) {
                Some(Some(addr)) if targets.addresses.contains(&addr) => holds.push(Hold {
                    addr,
                    path: target.to_string_lossy().into_owned(),
                }),
                Some(_) => {}
                None => unattributed_vfio_devices = true,
            }
        }
    }
    if unattributed_vfio_devices {
        for addr in groups_held {
            holds.push(Hold {
                addr,
                path: String::from_utf8_lossy(VFIO_DEVICE_ANON).into_owned(),
            });
        }
    }
    if !targets.resource_prefixes.is_empty() {
        match read_at(pid_dir, c"maps") {
            Ok(maps) => mapped_resources(&maps, targets, &mut holds),
            Err(e) if is_denied(e) => return ProcessOutcome::Uninspected,
            Err(_) => {}
        }
    }
    ProcessOutcome::Holds(holds)
}

fn mapped_resources(maps: &[u8], targets: &Targets, holds: &mut Vec<Hold>) {
    for (prefix, addr) in &targets.resource_prefixes {
        if memchr::memmem::find(maps, prefix).is_none() {
            continue;
        }
        for line in maps.split(|b| *b == b'\n') {
            let Some(at) = memchr::memmem::find(line, prefix) else {
                continue;
            };
            // The path is the line's last field: it must start there, not
            // inside some other path that happens to contain it.
            if at == 0 || line[at - 1] != b' ' {
                continue;
            }
            holds.push(Hold {
                addr: *addr,
                path: String::from_utf8_lossy(&line[at..]).into_owned(),
            });
        }
    }
}

/// The systemd unit a process runs in: the last `.service` or `.scope`
/// component of its cgroup path (the unified hierarchy's, else systemd's
/// named v1 hierarchy's).
fn unit_from_cgroup(text: &str) -> Option<String> {
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            text.lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })?;
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

pub(crate) fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Processes per thread below which another thread costs more than it
/// saves.
const PROCESSES_PER_THREAD: usize = 256;

fn scan_processes(
    proc: &ProcFs,
    targets: &Targets,
    threads: NonZeroUsize,
    out: &mut Vec<Holder>,
) -> Result<Vec<u32>, HolderScanError> {
    let list_error = |errno: Errno| PathError {
        op: "list",
        path: proc.root().to_owned(),
        source: io::Error::from(errno),
    };
    let root = nix::fcntl::open(
        proc.root(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(list_error)?;
    let mut listing = open_dir_at(&root, c".").map_err(list_error)?;
    let mut pids: Vec<(u32, CString)> = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(list_error)?;
        let name = entry.file_name();
        if let Some(pid) = name.to_str().ok().and_then(|n| n.parse::<u32>().ok()) {
            pids.push((pid, name.to_owned()));
        }
    }
    let threads = threads.get().min(pids.len() / PROCESSES_PER_THREAD + 1);
    let mut uninspected = Vec::new();
    if threads <= 1 {
        scan_pids(&root, pids.iter(), targets, out, &mut uninspected);
    } else {
        // Striped, not split in halves: low pids are mostly kernel
        // threads, which have no descriptors.
        let results: Vec<(Vec<Holder>, Vec<u32>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (1..threads)
                .map(|t| {
                    let (root, pids) = (&root, &pids);
                    scope.spawn(move || {
                        let mut found = (Vec::new(), Vec::new());
                        let mine = pids.iter().skip(t).step_by(threads);
                        scan_pids(root, mine, targets, &mut found.0, &mut found.1);
                        found
                    })
                })
                .collect();
            let mut found = (Vec::new(), Vec::new());
            let mine = pids.iter().step_by(threads);
            scan_pids(&root, mine, targets, &mut found.0, &mut found.1);
            let mut all = vec![found];
            for worker in workers {
                // A panic in a worker is a bug in this module: pass it on.
                all.push(
                    worker
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                );
            }
            all
        });
        for (holders, missed) in results {
            out.extend(holders);
            uninspected.extend(missed);
        }
    }
    uninspected.sort_unstable();
    Ok(uninspected)
}

fn scan_pids<'a>(
    root: &OwnedFd,
    pids: impl Iterator<Item = &'a (u32, CString)>,
    targets: &Targets,
    out: &mut Vec<Holder>,
    uninspected: &mut Vec<u32>,
) {
    for (pid, name) in pids {
        let pid = *pid;
        let Ok(pid_dir) = open_dir_at(root, name) else {
            continue;
        };
        let holds = match inspect_process(&pid_dir, targets) {
            ProcessOutcome::Holds(holds) if !holds.is_empty() => holds,
            ProcessOutcome::Holds(_) | ProcessOutcome::Gone => continue,
            ProcessOutcome::Uninspected => {
                uninspected.push(pid);
                continue;
            }
        };
        // Read only for holders: a process that exits now is no holder.
        let (Ok(comm), Ok(status)) = (read_at(&pid_dir, c"comm"), read_at(&pid_dir, c"status"))
        else {
            continue;
        };
        let Some(uid) = real_uid(&String::from_utf8_lossy(&status)) else {
            continue;
        };
        let unit = read_at(&pid_dir, c"cgroup")
            .ok()
            .and_then(|t| unit_from_cgroup(&String::from_utf8_lossy(&t)));
        let comm = String::from_utf8_lossy(&comm)
            .trim_end_matches('\n')
            .to_owned();
        for hold in holds {
            out.push(Holder::Process {
                pci_address: hold.addr,
                pid,
                comm: comm.clone(),
                uid,
                path: hold.path,
                unit: unit.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_the_last_service_or_scope_component() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/nvidia-persistenced.service\n").as_deref(),
            Some("nvidia-persistenced.service")
        );
        assert_eq!(
            unit_from_cgroup(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.scope\n"
            )
            .as_deref(),
            Some("app-x.scope")
        );
        assert_eq!(
            unit_from_cgroup("12:cpu:/x\n1:name=systemd:/system.slice/dcgm.service/sub\n")
                .as_deref(),
            Some("dcgm.service")
        );
        assert_eq!(unit_from_cgroup("0::/init.scope-not\n"), None);
        assert_eq!(unit_from_cgroup("0::/\n"), None);
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape_octal("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape_octal("/a\\134b"), "/a\\b");
        assert_eq!(unescape_octal("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }

    #[test]
    fn fdinfo_names_the_device_by_its_syspath() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nvfio-device-syspath: /sys/devices/pci0000:00/0000:00:02.0\n";
        assert_eq!(
            fdinfo_syspath_address(text),
            Some(Some("0000:00:02.0".parse().unwrap()))
        );
        assert_eq!(fdinfo_syspath_address("pos:\t0\n"), None);
        assert_eq!(
            fdinfo_syspath_address("vfio-device-syspath: /sys/devices/platform/foo\n"),
            Some(None)
        );
    }

    #[test]
    fn link_local_and_multicast_are_not_addresses() {
        let ll = ipv6_from_hex("fe800000000000000000000000000001").unwrap();
        let mc = ipv6_from_hex("ff020000000000000000000000000001").unwrap();
        let global = ipv6_from_hex("20010db8000000000000000000000001").unwrap();
        assert!(is_link_local_or_multicast(&ll));
        assert!(is_link_local_or_multicast(&mc));
        assert!(!is_link_local_or_multicast(&global));
        assert_eq!(global.to_string(), "2001:db8::1");
    }

    #[test]
    fn only_the_console_holder_has_a_bind_path_and_only_for_vtcon_names() {
        let sysfs = Sysfs::new("/s", "/d");
        let addr: PciAddress = "0000:00:05.0".parse().unwrap();
        let console = |name: &str| Holder::FramebufferConsole {
            pci_address: addr,
            vtconsole: name.to_owned(),
            framebuffer: "fb0".to_owned(),
        };
        assert_eq!(
            console("vtcon1").vtconsole_bind_path(&sysfs),
            Some(PathBuf::from("/s/class/vtconsole/vtcon1/bind"))
        );
        assert_eq!(console("../x").vtconsole_bind_path(&sysfs), None);
        assert_eq!(console("vtcon").vtconsole_bind_path(&sysfs), None);
        let swap = Holder::Swap {
            pci_address: addr,
            device: "nvme0n1p3".into(),
        };
        assert_eq!(swap.vtconsole_bind_path(&sysfs), None);
        assert_eq!(swap.disposition(), Disposition::Refuse);
        assert_eq!(console("vtcon1").disposition(), Disposition::PlanStep);
    }
}
