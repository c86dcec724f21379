//! Processes: descriptors open on, and mappings of, the function's nodes
//! (`<proc>/PID`, thread-group leaders only).
//!
//! - An open descriptor whose target is one of those nodes: the descriptor
//!   is `readlink`ed first, and only targets that are paths (starting with
//!   `/`) are `stat`ed, which skips sockets, pipes and anonymous inodes
//!   without a second system call; the stat's file type and `st_rdev` must
//!   match a node of the function.
//! - An open VFIO device descriptor (`anon_inode:[vfio-device]`): the kernel
//!   (6.18 and later) names the device in `fdinfo/N` as
//!   `vfio-device-syspath: /sys/devices/.../<address>`; on older kernels
//!   the descriptor is attributed to a function only when the same process
//!   also holds that function's group node.
//! - A mapping of the function's `resourceN` files: a line of `maps` whose
//!   path is the function's canonical sysfs directory followed by
//!   `/resource`.
//!
//! For each, the holder says `pid`, `comm`, the real uid (from `status`),
//! the path as the process sees it (the `readlink` text, or the mapped
//! path) and the systemd unit: the last `.service` or `.scope` component of
//! the process's unified (or `name=systemd`) cgroup path.
//!
//! # Cost
//!
//! There is no kernel interface that lists who has a character device
//! open, so the scan reads every descriptor of every process, as `fuser`
//! and `lsof` do: one `readlink` per descriptor, a `stat` only for targets
//! that are paths, one read of `maps` per process. Each process is read
//! relative to its own `/proc/PID` directory (`openat`, `readlinkat`,
//! `fstatat`), and processes are shared out over one thread per CPU (at
//! most [`MAX_SCAN_THREADS`]). The file formats are [`crate::proc`]'s; only
//! the reading is done here, the fast way. The benchmark
//! (`benches/vfiod/main.rs`, section 5) measures it on a fake `/proc` of 2,000
//! processes with 100 descriptors each: 475 ms of CPU per scan on the
//! 2-vCPU development VM when quiet (247 ms wall on two threads), 550 to
//! 650 ms under heavy load (load average 14), of which listing the `fd`
//! directories and one `readlink` per descriptor alone take about 430 ms.
//! A host with 200,000 open descriptors pays hundreds of milliseconds per
//! move. The same VM's own `/proc` (70 to 120 processes, 300 to 750
//! descriptors) costs 2 to 11 ms of CPU, most of it reading `maps`.
//!
//! # Limits
//!
//! - Reading another user's `fd/`, `fdinfo/` and `maps` needs the
//!   ptrace-read permission (CAP_SYS_PTRACE, and CAP_DAC_READ_SEARCH for
//!   the directory); the processes that could not be inspected are counted
//!   in [`ScanReport::uninspected`](super::ScanReport::uninspected) rather
//!   than failing the scan.
//! - A mapping of a device node whose descriptor was closed (a DRM buffer
//!   mmap'ed from `/dev/dri/card0`) is not seen: `maps` gives the device
//!   number of the filesystem holding the node, not the node's own.
//! - Threads that unshared their file table (clone without CLONE_FILES) are
//!   not listed under `/proc/PID`; only thread-group leaders are read.
//! - On kernels before 6.18 a VFIO device descriptor whose process closed
//!   the group descriptor cannot be attributed to a device.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use super::nodes::{node_of_stat, FunctionNodes, NodeKey};
use super::{Holder, HolderScanError};
use crate::path_error::PathError;
use crate::pci::PciAddress;
use crate::proc::{self, ProcFs};

/// The number of threads [`scan_report`](super::scan_report) reads `/proc`
/// with: one per CPU, at most [`MAX_SCAN_THREADS`].
pub fn default_threads() -> NonZeroUsize {
    std::thread::available_parallelism()
        .map(|n| n.min(NonZeroUsize::new(MAX_SCAN_THREADS).expect("non-zero")))
        .unwrap_or(NonZeroUsize::MIN)
}

/// Beyond this, more threads only contend for the same kernel locks.
pub const MAX_SCAN_THREADS: usize = 4;

/// The nodes, group nodes and `resource` paths of the functions asked
/// about, indexed for the per-descriptor lookups.
pub(super) struct Targets {
    nodes: HashMap<NodeKey, Vec<PciAddress>>,
    group_nodes: HashMap<NodeKey, Vec<PciAddress>>,
    addresses: Vec<PciAddress>,
    resource_prefixes: Vec<(Vec<u8>, PciAddress)>,
}

impl Targets {
    pub(super) fn new(functions: &[FunctionNodes]) -> Targets {
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

/// The function a VFIO device descriptor's `fdinfo` names: `None` when
/// the kernel does not name it, `Some(None)` when it names a device that is
/// no PCI function.
fn fdinfo_syspath_address(text: &str) -> Option<Option<PciAddress>> {
    let syspath = proc::fdinfo_vfio_device_syspath(text)?;
    Some(
        Path::new(syspath)
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
        for path in proc::mapped_paths_with_prefix(maps, prefix) {
            holds.push(Hold {
                addr: *addr,
                path: String::from_utf8_lossy(path).into_owned(),
            });
        }
    }
}

/// Processes per thread below which another thread costs more than it
/// saves.
const PROCESSES_PER_THREAD: usize = 256;

pub(super) fn scan_processes(
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
        let Some(uid) = proc::real_uid(&String::from_utf8_lossy(&status)) else {
            continue;
        };
        let unit = read_at(&pid_dir, c"cgroup")
            .ok()
            .and_then(|t| proc::systemd_unit(&String::from_utf8_lossy(&t)));
        let comm = proc::comm(&String::from_utf8_lossy(&comm)).to_owned();
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
    fn fdinfo_names_the_function_by_its_syspath() {
        let text = "pos:\t0\nvfio-device-syspath: /sys/devices/pci0000:00/0000:00:02.0\n";
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
}
