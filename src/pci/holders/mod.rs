//! Who holds a PCI function: the scan vfiod runs before it takes a function
//! away from its driver, so that it can refuse (and name the holder)
//! instead of writing `unbind` and hanging in the kernel.
//!
//! The scan is blocking and reads only: sysfs through a [`Sysfs`], `/proc`
//! through a [`ProcFs`] (tests give both a fake tree). It never opens a
//! device node.
//!
//! It is split by what it looks at, because each part reads a different
//! source, at a different cost, and has limits of its own; what each
//! detects and how, its cost and its limits are documented in its file:
//! - `nodes`: the function's device nodes and child devices, from sysfs.
//!   Cheap (one directory walk per function), and what the other two
//!   parts look for.
//! - `kernel`: kernel consumers of those devices, from the system's
//!   tables: mounts, swap, md/dm stacks, network interfaces in use, the
//!   framebuffer console. A few small files, each read once per scan.
//! - `processes`: the descriptors and mappings of every process. The
//!   expensive part (every descriptor of every process), the one bounded
//!   by permissions, and the only one that runs on several threads.
//!
//! This module holds what the parts share: the [`Holder`] they report, in
//! the API's wire form and in the words an operator reads (its `Display`,
//! used by busy errors, reset refusals and clients), what a move does
//! about each kind ([`Disposition`]), and the entry points.
//!
//! The scan is a snapshot: a process may open a node right after it.

mod kernel;
mod nodes;
mod processes;

use std::collections::BTreeSet;
use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{MdevUuid, PciAddress, Sysfs};
use crate::path_error::PathError;
/// The scan's callers pass one; it is [`crate::proc`]'s.
pub use crate::proc::ProcFs;
pub use processes::{default_threads, MAX_SCAN_THREADS};

/// Something that holds a PCI function. Serialised with a `kind` tag for
/// the API's `holders` lists; clients read the same form back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Holder {
    /// A process with a descriptor open on (or a mapping of) one of the
    /// function's nodes.
    Process {
        /// The function whose node it holds (the device or a group companion).
        pci_address: PciAddress,
        /// The holding process.
        pid: u32,
        /// `/proc/PID/comm`: the name the kernel shows, at most 15 bytes.
        comm: String,
        /// The real uid, from `/proc/PID/status`.
        uid: u32,
        /// The node held, e.g. `/dev/vfio/12` or `/dev/nvme0n1`.
        path: String,
        /// The systemd unit (`.service` or `.scope`) from its cgroup, to tell
        /// the operator what to stop; absent outside systemd.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
    },
    /// A mounted block device (or partition) of the function.
    Mount {
        /// The function whose block device it is.
        pci_address: PciAddress,
        /// The kernel's block device name (`nvme0n1p2`).
        device: String,
        /// Where it is mounted, as the host's mountinfo shows it.
        mount_point: String,
        /// The filesystem type.
        fstype: String,
    },
    /// A block device (or partition) of the function in use as swap.
    Swap {
        /// The function whose block device it is.
        pci_address: PciAddress,
        /// The block device name.
        device: String,
    },
    /// A block device of the function under an md/dm/LVM device.
    BlockStack {
        /// The function whose block device it is.
        pci_address: PciAddress,
        /// The block device that is a member.
        device: String,
        /// The device stacked on it (its `holders/` entry, e.g. `dm-0`,
        /// `md127`).
        holder: String,
    },
    /// A network interface of the function that is in use.
    NetInterface {
        /// The function the interface belongs to.
        pci_address: PciAddress,
        /// The kernel interface name.
        interface: String,
        /// Its IPv4 and IPv6 addresses; may be empty when routes alone make it
        /// in use.
        addresses: Vec<String>,
        /// IPv4 and IPv6 routes through it.
        routes: u32,
    },
    /// The framebuffer console drawn on the function's framebuffer.
    FramebufferConsole {
        /// The function with the framebuffer.
        pci_address: PciAddress,
        /// The `vtconN` console bound to the framebuffer; vfiod unbinds it as a
        /// plan step.
        vtconsole: String,
        /// The function's framebuffer (`fbN`).
        framebuffer: String,
    },
}

/// A holder as an operator reads it, in a message, a log line or a
/// table: what holds the function and how, with everything the record
/// carries but the function itself ([`Holder::pci_address`]), which a
/// table shows in a column of its own and a message names where it lists
/// holders of several functions.
impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Process {
                pid,
                comm,
                uid,
                path,
                unit,
                ..
            } => {
                write!(f, "pid {pid} ({comm}) uid {uid} has {path} open")?;
                match unit {
                    Some(unit) => write!(f, ", unit {unit}"),
                    None => Ok(()),
                }
            }
            Holder::Mount {
                device,
                mount_point,
                fstype,
                ..
            } => write!(f, "{device} mounted on {mount_point} ({fstype})"),
            Holder::Swap { device, .. } => write!(f, "{device} is in use as swap"),
            Holder::BlockStack { device, holder, .. } => {
                write!(f, "{device} is part of {holder} (md/dm/LVM)")
            }
            Holder::NetInterface {
                interface,
                addresses,
                routes,
                ..
            } => {
                let addresses = if addresses.is_empty() {
                    "none".to_owned()
                } else {
                    addresses.join(", ")
                };
                write!(
                    f,
                    "network interface {interface} addresses: {addresses}; routes: {routes}"
                )
            }
            Holder::FramebufferConsole {
                vtconsole,
                framebuffer,
                ..
            } => write!(f, "framebuffer console {vtconsole} is on {framebuffer}"),
        }
    }
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
    /// The function held, which may be a group companion of the device asked
    /// about.
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

/// What holds each of `functions` (what is detected: the parts' module
/// documentation). Processes that vanish mid-scan and unreadable entries are
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

/// The processes holding mediated device `uuid` of `parent` open (its
/// VFIO nodes), reported as holders of the parent: the kernel's `remove`
/// of a mediated device waits for them to close it.
pub fn scan_mdev(
    sysfs: &Sysfs,
    proc: &ProcFs,
    parent: PciAddress,
    uuid: &MdevUuid,
) -> Result<Vec<Holder>, HolderScanError> {
    let nodes = [nodes::FunctionNodes::of_mdev(sysfs, parent, uuid)];
    let targets = processes::Targets::new(&nodes);
    let mut holders = Vec::new();
    processes::scan_processes(proc, &targets, default_threads(), &mut holders)?;
    holders.sort();
    holders.dedup();
    Ok(holders)
}

/// [`scan`], also saying which processes could not be inspected.
pub fn scan_report(
    sysfs: &Sysfs,
    proc: &ProcFs,
    functions: &[PciAddress],
) -> Result<ScanReport, HolderScanError> {
    scan_report_with_threads(sysfs, proc, functions, default_threads())
}

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
    let nodes: Vec<nodes::FunctionNodes> = functions
        .iter()
        .map(|addr| nodes::FunctionNodes::discover(sysfs, proc, *addr))
        .collect();
    let mut holders = Vec::new();
    kernel::kernel_consumers(sysfs, proc, &nodes, &mut holders)?;
    let targets = processes::Targets::new(&nodes);
    let uninspected = processes::scan_processes(proc, &targets, threads, &mut holders)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_reads_as_what_holds_the_function_and_how() {
        let addr: PciAddress = "0000:00:05.0".parse().unwrap();
        let process = |unit: Option<&str>| Holder::Process {
            pci_address: addr,
            pid: 2001,
            comm: "Xorg".into(),
            uid: 1000,
            path: "/dev/dri/card0".into(),
            unit: unit.map(str::to_owned),
        };
        assert_eq!(
            process(Some("display-manager.service")).to_string(),
            "pid 2001 (Xorg) uid 1000 has /dev/dri/card0 open, unit display-manager.service"
        );
        assert_eq!(
            process(None).to_string(),
            "pid 2001 (Xorg) uid 1000 has /dev/dri/card0 open"
        );
        let nic = |addresses: &[&str]| Holder::NetInterface {
            pci_address: addr,
            interface: "eno1".into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            routes: 2,
        };
        assert_eq!(
            nic(&["2001:db8::1", "2001:db8::2"]).to_string(),
            "network interface eno1 addresses: 2001:db8::1, 2001:db8::2; routes: 2"
        );
        assert_eq!(
            nic(&[]).to_string(),
            "network interface eno1 addresses: none; routes: 2"
        );
        let mount = Holder::Mount {
            pci_address: addr,
            device: "nvme0n1p2".into(),
            mount_point: "/srv".into(),
            fstype: "ext4".into(),
        };
        assert_eq!(mount.to_string(), "nvme0n1p2 mounted on /srv (ext4)");
    }

    #[test]
    fn the_wire_form_reads_back_as_the_same_holder() {
        let addr: PciAddress = "0000:00:05.0".parse().unwrap();
        let holders = vec![
            Holder::Process {
                pci_address: addr,
                pid: 7,
                comm: "qemu".into(),
                uid: 0,
                path: "/dev/vfio/3".into(),
                unit: None,
            },
            Holder::BlockStack {
                pci_address: addr,
                device: "nvme0n1".into(),
                holder: "dm-0".into(),
            },
            Holder::FramebufferConsole {
                pci_address: addr,
                vtconsole: "vtcon1".into(),
                framebuffer: "fb0".into(),
            },
        ];
        let wire = serde_json::to_value(&holders).unwrap();
        assert_eq!(wire[0]["kind"], "process");
        assert!(wire[0].get("unit").is_none(), "{wire}");
        assert_eq!(wire[1]["kind"], "block_stack");
        let back: Vec<Holder> = serde_json::from_value(wire).unwrap();
        assert_eq!(back, holders);
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
