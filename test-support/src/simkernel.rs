//! A simulated kernel for a [`FakeSys`] tree: a background thread that
//! reacts to writes into the fake sysfs the way Linux does.
//!
//! # What it does
//!
//! * `<dev>/driver_override`: "vfio-pci" (one trailing newline stripped)
//!   sets the override; "" or "\n" resets it. The file is rewritten to the
//!   kernel's form ("vfio-pci\n" / "(null)\n").
//! * `drivers/<d>/unbind` `<addr>`: if bound to `d`, removes the device's
//!   `driver` link and the driver's `<addr>` link; for vfio-pci, removes
//!   `D/vfio/<group>` when no other device of the group is left on vfio-pci.
//!   Not bound to `d`: nothing (the real kernel says ENODEV).
//! * `drivers/<d>/bind` `<addr>`: binds if the device has no driver, `d` is
//!   loaded, and `driver_override` is unset or names `d` (as Linux refuses a
//!   driver the override excludes). vfio-pci needs an IOMMU group.
//! * `drivers_probe` `<addr>`: if unbound, binds the override driver if an
//!   override is set (and that driver is loaded), else the device's "native"
//!   driver (the one it had in `add_device`; none = stays unbound). Binding
//!   vfio-pci creates `D/vfio/<group>`.
//! * `<PF>/sriov_numvfs` `N` (Linux 6.12's `sriov_numvfs_store`, checks in
//!   its order): not a number: EINVAL; above `sriov_totalvfs`: ERANGE;
//!   the current count: nothing; PF without a driver, or whose driver has
//!   no `sriov_configure`: ENOENT (the native driver has one unless
//!   [`DeviceSpec::sriov_capable_driver`]`(false)`; vfio-pci only while
//!   `module/vfio_pci/parameters/enable_sriov` is "Y"; any other driver
//!   never); 0: every VF is unbound and removed, last first (its group
//!   dir and `D/vfio/<group>` go with their last member), a `remove`
//!   uevent each; N while VFs are enabled: EBUSY; else N VFs are created
//!   (at most [`SimKernel::limit_vfs`], as a driver that enables fewer),
//!   one after the other: on the bus, an `add` uevent, then probed if
//!   `pci_device_can_probe` allows it (below), a `bind` uevent if that
//!   bound it. The file then reads the count enabled.
//! * `<PF>/sriov_drivers_autoprobe`: a kernel boolean (1/0/y/n/on/off)
//!   sets it; anything else is EINVAL. It reads back "1\n"/"0\n".
//! * **VF probing** follows `pci_device_can_probe`: a VF is probed (at its
//!   creation, by `drivers_probe`, `bind` or a driver registering) only
//!   when it has a `driver_override` or its PF's autoprobe is 1. vfio-pci
//!   owning the PF sets each new VF's override to vfio-pci (its bus
//!   notifier does), so those are probed at creation whatever autoprobe
//!   says. The PF's [`DeviceSpec::vf_driver`] is "loaded" (driver dir
//!   created) when VFs are created, as udev loads it from their modalias on
//!   a real host: it is there, and autoprobe 0 is what keeps it off.
//! * Unbinding a PF with VFs enabled removes them first (igb's and
//!   vfio-pci's remove disable SR-IOV); autoprobe keeps its value.
//! * **NVIDIA vGPU VFs** (a PF with [`DeviceSpec::vgpu`]): binding one to
//!   `nvidia` (any probe path) makes its `nvidia/` files, `vfio-dev/vfioN`
//!   and `D/vfio/<group>` (see the fakesys module docs); vfio-pci's probe
//!   of one fails (it stays unbound), as nvidia.ko is its only VFIO
//!   provider. Unbinding it destroys its vGPU and removes all of that.
//! * `<VF>/nvidia/current_vgpu_type` `N` (the driver's store): 0 destroys
//!   the VF's vGPU (none: nothing); an ID creates one if the VF has none
//!   (else EBUSY: the driver wants 0 first, also for the same ID) and its
//!   `creatable_vgpu_types` lists it now (else EINVAL, as for a value that
//!   is no number). The file then reads the type set ("1162\n"). After a
//!   change, every VF of the PF gets its `creatable_vgpu_types` rewritten:
//!   while siblings of a VF hold type T (all vGPUs of a GPU are of one
//!   type), it lists only T, and only while fewer than T's share hold it;
//!   once none holds one, every type again. A VF's own vGPU does not
//!   count for its own list (it says what the VF can take once cleared).
//!   Refused writes are recorded as SR-IOV ones are (below).
//! * **Legacy mdev parents** ([`DeviceSpec::mdev`]): binding one to its
//!   native driver (any probe path, or `add_device`) registers it, making
//!   its `mdev_supported_types/` (see the fakesys module docs); unbinding
//!   it (or a reset losing its driver, or its removal) first removes every
//!   mdev it has, then that directory.
//! * `<parent>/mdev_supported_types/<type>/create` `UUID` (the mdev core's
//!   `create_store`): 36 or 37 bytes whose first 36 are a canonical UUID,
//!   either case (the 37th, a newline from `echo`, is not looked at);
//!   anything else: EINVAL. A UUID any mdev has already (case
//!   ignored): EEXIST. The type's `available_instances` 0 (another type in
//!   use, or all taken): [`MDEV_NO_INSTANCE_ERRNO`]. Else the mdev is made
//!   (named in lower case), with a new IOMMU group and `D/vfio/<group>`,
//!   and every type's `available_instances` is rewritten.
//! * `<parent>/<uuid>/remove` (also reached as `bus/mdev/devices/<uuid>/remove`,
//!   logged under that name): `kstrtoul`, so not a number: EINVAL; 0:
//!   nothing; anything else removes the mdev, its group and node.
//!   Refused `create` and `remove` writes are recorded as SR-IOV ones are
//!   (below). A write hung on either ([`SimKernel::hang_write`]) when the
//!   attribute goes away (its parent unbound, its mdev removed) is let
//!   through and dropped, so its writer never blocks for good.
//! * `new_id`, `remove_id`, `rescan`, any other attribute: logged only.
//! * A driver directory that appears while running (`add_driver`,
//!   `load_vfio`) triggers a probe of the unbound devices it matches
//!   (override names it, or no override and it is the native driver), as
//!   driver registration does in Linux.
//!
//! # How
//!
//! Writes are seen with inotify. The write-only attributes (`bind`,
//! `unbind`, `new_id`, `remove_id`, `drivers_probe`, `rescan`) are turned
//! into FIFOs that the simulator keeps open for reading, so every single
//! write's value is received, even when a client writes the same attribute
//! twice in a row (a regular file would only hold the last one). Their
//! `IN_CLOSE_WRITE` events, interleaved in one inotify queue with those of
//! `driver_override` (a regular file, as it is readable), give the order in
//! which writes happened; values are applied in that order. (`IN_OPEN` is
//! watched on those directories to stop the kernel from merging two
//! consecutive close events of the same file, and to tell a write from the
//! late close of a descriptor inherited by a process forked meanwhile.)
//! Writers never block on these
//! FIFOs: the simulator always holds a reader. Reading one of them (nobody
//! should: they are write-only in sysfs) would block.
//!
//! When the simulator is dropped, the FIFOs become empty regular files
//! again, faults are undone, and writers blocked by `hang_write` are let
//! through; the tree (kept alive by the simulator's own handle) stays
//! usable.
//!
//! # Differences from Linux a test must know
//!
//! * **Asynchronous.** A write returns before the simulator acted on it
//!   (usually within a millisecond). Code under test must poll for the
//!   result (the `driver` link, `/dev/vfio/N`) with a timeout, which is what
//!   verifying against a real kernel needs too (udev, async probing). Tests
//!   can call [`SimKernel::wait_idle`].
//! * `driver_override` is a regular file (it must stay readable): its value
//!   is read when its event is processed, so two writes in quick succession
//!   may be logged as the last value twice, and a probe uses the override
//!   current when the probe is processed. So do not rewrite a device's
//!   override before the probe that depends on it took effect (vfiod's
//!   verify step waits for that anyway). The rewrite to the kernel's form is
//!   done in place under a write lease (`F_SETLEASE`), which can never
//!   overwrite a client's write: a client opening the file meanwhile waits
//!   a few microseconds. (Lease-break signals are set to SIGURG, ignored by
//!   default, and the lease owner is cleared.)
//! * Writes that fail in Linux (ENODEV on a bad unbind, EINVAL, ...) succeed
//!   here and are ignored; use [`SimKernel::fail_write`] to make a write
//!   fail.
//! * **SR-IOV, vGPU and mdev refusals cannot reach the writer.** The
//!   simulator sees a write to `sriov_numvfs` / `sriov_drivers_autoprobe` /
//!   `current_vgpu_type` / an mdev `create` or `remove` after the writer's
//!   `write()` returned, so a write
//!   Linux or the NVIDIA driver refuses (EBUSY, ERANGE, ENOENT, EINVAL)
//!   succeeds for the writer; the simulator changes nothing, puts the old
//!   content back and records it: [`SimKernel::refused_writes`]. A test
//!   asserts that list is empty to show the code under test never made a
//!   write the kernel would refuse (and uses a real kernel, tests/vm, to
//!   see its handling of the errno). A write that must fail for the
//!   writer is armed with [`SimKernel::fail_write`] (`current_vgpu_type`
//!   included). These are regular files (they must stay readable): until
//!   the simulator processed a write, a reader sees the value as written,
//!   so a read-back right after a refused write can still show it (a
//!   read-back check cannot catch a refusal here; `refused_writes` can),
//!   and a second write before that may hide the first, as for
//!   `driver_override`. While a write is acted on, the file is leased, so
//!   a concurrent open waits (as a read of `sriov_numvfs` blocks in Linux
//!   during a change).
//! * VF creation is instant (about 0.5 s for two under TCG in Linux), and
//!   a 4 -> 0 write that hangs ([`SimKernel::hang_write`]) has not started
//!   removing VFs, where Linux has already taken the ones before the held
//!   VF off their driver.
//!
//! # Faults
//!
//! * [`SimKernel::fail_write`]: ENOENT removes the attribute, EISDIR replaces
//!   it with an empty directory, ENOSPC with a symlink to `/dev/full`
//!   (reading the attribute then returns endless zeros: do not read a file
//!   you armed with ENOSPC). Other errnos panic.
//! * [`SimKernel::hang_write`]: writers block in `open()` (a FIFO nobody
//!   reads). For `driver_override`, a *reader* would block too.
//! * [`SimKernel::release`]: undoes either. A writer blocked by `hang_write`
//!   is let through and **its write is applied** (the stuck kernel operation
//!   finally completes: e.g. a hung unbind does unbind), in order with other
//!   writes, like any other write. `release` returns once the released
//!   writers have written (bounded wait), so `wait_idle` after it covers
//!   them.
//! * [`SimKernel::release_completing`]: the same, but if the blocked writer
//!   is gone (its process was killed: in Linux the stuck operation would
//!   still complete in the kernel), applies a given value instead. A writer
//!   blocked in `open()` has not handed over its value yet, so the simulator
//!   cannot know it by itself.
//!
//! Set `VFIOD_SIM_DEBUG=1` for a trace on stderr (`simkernel:` prefix).

#[cfg(doc)]
use crate::fakesys::DeviceSpec;
use crate::fakesys::{self, FakeSys, Hook, State, Tree, BUS_ATTRS, DRIVER_ATTRS, NVIDIA, VFIO_PCI};

/// The errno of an mdev `create` on a type whose `available_instances` is
/// 0: the mdev core's own count (`mdev_device_create`) says EUSERS.
pub const MDEV_NO_INSTANCE_ERRNO: Errno = Errno::EUSERS;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn debug_enabled() -> bool {
    std::env::var_os("VFIOD_SIM_DEBUG").is_some_and(|v| !v.is_empty() && v != "0")
}

macro_rules! dbg_log {
    ($sh:expr, $($arg:tt)*) => {
        if $sh.debug {
            eprintln!("simkernel: {}", format!($($arg)*));
        }
    };
}

/// Opens a FIFO for reading without blocking (always succeeds on a FIFO),
/// through a hard link in the scratch directory, so that our open raises no
/// IN_OPEN where writers' opens are counted.
fn open_reader(tree: &Tree, path: &Path) -> io::Result<File> {
    let link = tree.scratch_path();
    fs::hard_link(path, &link)?;
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(&link);
    let _ = fs::remove_file(&link);
    opened
}

enum Drain {
    /// No writer has the FIFO open.
    Eof,
    /// A writer has it open (possibly after writing).
    WriterPresent,
}

/// Reads everything currently in a non-blocking FIFO reader.
fn read_available(reader: &mut File, out: &mut Vec<u8>) -> Drain {
    let mut buf = [0u8; 65536];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Drain::Eof,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drain::WriterPresent,
            Err(_) => return Drain::Eof,
        }
    }
}

/// With a fresh reader on a FIFO: waits (up to 3 s) until every writer
/// that was blocked in `open()` has written and closed. Returns whether
/// there was any.
fn wait_for_writers(reader: &mut File, data: &mut Vec<u8>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = false;
    loop {
        match read_available(reader, data) {
            Drain::Eof => return seen || !data.is_empty(),
            Drain::WriterPresent => seen = true,
        }
        if Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Splits what was read from an attribute FIFO into single writes. Pipe
/// writes are atomic, so a read holds whole writes; consecutive ones are
/// told apart by a trailing newline or, for address attributes, by the
/// fixed length of a PCI address.
fn split_values(attr: &str, chunk: &str) -> Vec<String> {
    // Fixed-length values (length, validity): a PCI address, an mdev's UUID.
    type Fixed = (usize, fn(&str) -> bool);
    let fixed: Option<Fixed> = match attr {
        "bind" | "unbind" | "drivers_probe" => Some((12, fakesys::is_pci_addr)),
        "create" => Some((36, fakesys::is_uuid)),
        _ => None,
    };
    let mut out = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        let head = fixed.and_then(|(len, valid)| rest.get(..len).filter(|h| valid(h)));
        let to_newline = rest.find('\n').map(|i| i + 1).unwrap_or(rest.len());
        let end = match head {
            Some(head) => {
                let len = head.len();
                let after = &rest[len..];
                if after.starts_with('\n') {
                    len + 1
                } else if after.is_empty()
                    || fixed.is_some_and(|(n, valid)| after.get(..n).is_some_and(valid))
                {
                    len
                } else {
                    // Not followed by another value: one write with more
                    // after it ("<uuid>x"), for the store to judge.
                    to_newline
                }
            }
            None => to_newline,
        };
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

/// The reset method a reset of the function in `dir` uses now: the first
/// one its `reset_method` lists.
fn reset_method_in_effect(dir: &Path) -> String {
    fs::read_to_string(dir.join("reset_method"))
        .ok()
        .and_then(|m| m.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// One FIFO-backed attribute.
struct Pipe {
    /// `None` while a fault is armed on it.
    reader: Option<File>,
    /// Received values not yet applied, oldest first.
    values: VecDeque<String>,
    /// Values applied ahead of their close event (see `flush`).
    credits: usize,
    /// For a regular attribute whose hung writer was released: the content
    /// to restore once that write arrives.
    restore: Option<String>,
    /// Writers that opened it (IN_OPEN) and have not closed yet. A close
    /// with none outstanding is a descriptor inherited by a forked process,
    /// closed late: not a write. (Our own reader opens go through a scratch
    /// link and are not seen here.)
    opens: usize,
    /// A `reset` attribute: Linux returns from a reset write only once the
    /// reset is done, so the writer must not get past its write before the
    /// simulator has acted. `filler` is our own writer that keeps the pipe
    /// full: a client's write blocks until we drain it, which we do on the
    /// client's IN_OPEN, after doing the reset.
    sync: bool,
    filler: Option<File>,
    /// The method a hung `reset` write that was released uses: the one in
    /// effect while it hung, read before its writer was let through. Linux
    /// picks the method before the write returns; the writer's IN_OPEN is
    /// processed later, when the writer may already have put the list back.
    released_reset_method: Option<String>,
}

impl Pipe {
    fn new(reader: Option<File>) -> Pipe {
        Pipe {
            reader,
            values: VecDeque::new(),
            credits: 0,
            restore: None,
            opens: 0,
            sync: false,
            filler: None,
            released_reset_method: None,
        }
    }

    fn fill(&mut self, attr: &str) {
        // A full sync pipe holds only our filler: reading would empty it
        // and let the next writer through before its reset.
        if self.filler.is_some() {
            return;
        }
        if let Some(r) = self.reader.as_mut() {
            let mut data = Vec::new();
            read_available(r, &mut data);
            // The filler of a sync pipe is NUL bytes, never part of a value.
            data.retain(|b| *b != 0);
            if !data.is_empty() {
                let text = String::from_utf8_lossy(&data);
                self.values.extend(split_values(attr, &text));
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Saved {
    /// A write-only attribute (a FIFO of ours).
    Fifo,
    /// A regular attribute with its content before the fault.
    Regular(String),
}

#[derive(Clone, Debug)]
enum Fault {
    /// A write fails (the errno is in the tree's shape: no file, a
    /// directory, a link to `/dev/full`).
    Fail(Saved),
    Hang(Saved),
}

impl Fault {
    fn saved(&self) -> &Saved {
        match self {
            Fault::Fail(s) | Fault::Hang(s) => s,
        }
    }
}

/// What identifies the state of a regular file's content. (Not ctime: the
/// hard link taken for a lease changes it.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

#[derive(Default)]
struct Sim {
    /// Regular attributes as last seen (see `regular_written`).
    stamps: HashMap<PathBuf, Stamp>,
    wds: HashMap<WatchDescriptor, PathBuf>,
    pipes: HashMap<PathBuf, Pipe>,
    faults: HashMap<PathBuf, Fault>,
    wrong_driver: HashMap<String, String>,
    always_wrong_driver: HashMap<String, String>,
    ignore_probe: HashSet<String>,
    /// Highest wait_idle marker seen in the event stream.
    marker_seen: u64,
    /// Every reset done: (address, method in effect).
    resets: Vec<(String, String)>,
    /// What a reset of a device leaves behind (absent: a healthy function).
    reset_outcome: HashMap<String, ResetOutcome>,
    /// Writes Linux would have refused: (path as logged, value, errno).
    refused: Vec<(String, String, Errno)>,
    /// The most VFs a PF's driver enables (`limit_vfs`).
    vf_limit: HashMap<String, u16>,
}

/// What a reset leaves behind; see [`SimKernel::set_reset_outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetOutcome {
    /// Config space reads all ones (the function fell off the bus).
    AllOnes,
    /// `power_state` reads D3cold.
    D3cold,
    /// The function comes back without its driver.
    LosesDriver,
}

struct Shared {
    tree: Tree,
    inotify: Inotify,
    /// Lock order: the FakeSys state lock first, then this.
    sim: Mutex<Sim>,
    log: Mutex<Vec<(String, String)>>,
    /// Highest wait_idle marker fully processed.
    idle: Mutex<u64>,
    idle_cv: Condvar,
    next_marker: AtomicU64,
    stop: AtomicBool,
    debug: bool,
}

const FIFO_DIR_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE.union(AddWatchFlags::IN_OPEN);

/// The simulated kernel. Runs a thread until dropped.
pub struct SimKernel {
    fs: FakeSys,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SimKernel {
    /// Starts simulating on `fs`. Panics if a simulator already runs on it.
    pub fn start(fs: &FakeSys) -> SimKernel {
        let fs = fs.share();
        let tree = fs.tree().clone();
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC).expect("simkernel: inotify_init1 failed");
        let shared = Arc::new(Shared {
            tree: tree.clone(),
            inotify,
            sim: Mutex::new(Sim::default()),
            log: Mutex::new(Vec::new()),
            idle: Mutex::new(0),
            idle_cv: Condvar::new(),
            next_marker: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            debug: debug_enabled(),
        });
        {
            let mut state = fs.lock_state();
            assert!(
                state.hook.is_none(),
                "simkernel: a simulated kernel already runs on this tree"
            );
            let mut sim = lock(&shared.sim);
            shared
                .watch(&mut sim, &tree.ctl, AddWatchFlags::IN_CLOSE_WRITE)
                .expect("simkernel: watch ctl dir");
            let bus = tree.sysfs.join("bus/pci");
            for attr in BUS_ATTRS {
                shared
                    .make_pipe(&mut sim, &bus.join(attr))
                    .expect("simkernel: bus attribute FIFO");
            }
            shared
                .watch(&mut sim, &bus, FIFO_DIR_MASK)
                .expect("simkernel: watch bus/pci");
            let drivers: Vec<String> = fs::read_dir(tree.sysfs.join("bus/pci/drivers"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            for d in drivers {
                shared
                    .setup_driver_dir(&mut sim, &d)
                    .expect("simkernel: driver dir");
            }
            for addr in tree.devices() {
                if let Some(dir) = tree.device_dir(&addr) {
                    shared
                        .setup_device_dir(&mut sim, &dir)
                        .expect("simkernel: watch device dir");
                }
            }
            drop(sim);
            state.hook = Some(Arc::new(SimHook {
                shared: Arc::downgrade(&shared),
            }));
        }
        let thread_fs = fs.share();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("simkernel".into())
            .spawn(move || run(thread_fs, thread_shared))
            .expect("simkernel: spawn thread");
        dbg_log!(shared, "started on {}", tree.sysfs.display());
        SimKernel {
            fs,
            shared,
            thread: Some(thread),
        }
    }

    /// The physical path of attribute `rel` (relative to sysfs; may go
    /// through symlinks such as `bus/pci/devices/<addr>/...`).
    fn resolve(&self, rel: &str) -> PathBuf {
        let p = self.fs.sysfs.join(rel.trim_start_matches('/'));
        let name = p
            .file_name()
            .unwrap_or_else(|| panic!("simkernel: bad attribute path {rel:?}"));
        let parent = fs::canonicalize(p.parent().expect("parent"))
            .unwrap_or_else(|e| panic!("simkernel: {rel}: parent directory: {e}"));
        let out = parent.join(name);
        self.shared.tree.assert_inside(&out);
        out
    }

    /// Makes every write to `rel_path` fail with `errno` (ENOENT, EISDIR or
    /// ENOSPC) until [`SimKernel::release`].
    pub fn fail_write(&self, rel_path: &str, errno: Errno) {
        assert!(
            matches!(errno, Errno::ENOENT | Errno::EISDIR | Errno::ENOSPC),
            "simkernel: cannot produce {errno:?} on a write (ENOENT, EISDIR, ENOSPC only)"
        );
        let path = self.resolve(rel_path);
        let _state = self.fs.lock_state();
        let mut sim = lock(&self.shared.sim);
        self.shared.release_locked(&mut sim, &path);
        let saved = self.shared.take_attr(&mut sim, &path, rel_path);
        let tree = &self.shared.tree;
        tree.remove(&path).expect("simkernel: remove attribute");
        match errno {
            Errno::ENOENT => {}
            Errno::EISDIR => tree.mkdir(&path).expect("simkernel: mkdir"),
            Errno::ENOSPC => {
                std::os::unix::fs::symlink("/dev/full", &path).expect("simkernel: symlink")
            }
            _ => unreachable!(),
        }
        dbg_log!(self.shared, "fail_write {rel_path} -> {errno:?}");
        sim.faults.insert(path, Fault::Fail(saved));
    }

    /// Makes writes to `rel_path` block in `open()` until
    /// [`SimKernel::release`].
    pub fn hang_write(&self, rel_path: &str) {
        let path = self.resolve(rel_path);
        let _state = self.fs.lock_state();
        let mut sim = lock(&self.shared.sim);
        self.shared.release_locked(&mut sim, &path);
        let saved = self.shared.take_attr(&mut sim, &path, rel_path);
        if let Saved::Regular(_) = saved {
            self.shared
                .tree
                .make_fifo(&path)
                .expect("simkernel: mkfifo");
        }
        dbg_log!(self.shared, "hang_write {rel_path}");
        sim.faults.insert(path, Fault::Hang(saved));
    }

    /// Undoes `fail_write` / `hang_write` on `rel_path` (no-op if none).
    /// Writers blocked by `hang_write` are let through, and this waits (up to
    /// 3 s) until they have written; their writes are then applied in order
    /// like any other (the stuck kernel operation completes), so a
    /// `wait_idle` after `release` covers them.
    pub fn release(&self, rel_path: &str) {
        self.release_inner(rel_path);
    }

    /// Like [`SimKernel::release`], but if no writer was blocked (the process
    /// that wrote was killed meanwhile: in Linux the stuck operation still
    /// completes in the kernel), applies `value` as if it had been written.
    /// Returns true if a blocked writer was let through instead.
    pub fn release_completing(&self, rel_path: &str, value: &str) -> bool {
        if self.release_inner(rel_path) {
            return true;
        }
        let path = self.fs.sysfs.join(rel_path.trim_start_matches('/'));
        if let Err(e) = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| io::Write::write_all(&mut f, value.as_bytes()))
        {
            panic!("simkernel: release_completing {rel_path}: {e}");
        }
        false
    }

    fn release_inner(&self, rel_path: &str) -> bool {
        let path = self.resolve(rel_path);
        let _state = self.fs.lock_state();
        let mut sim = lock(&self.shared.sim);
        let seen = self.shared.release_locked(&mut sim, &path);
        dbg_log!(
            self.shared,
            "release {rel_path} (writer let through: {seen})"
        );
        seen
    }

    /// On the next `drivers_probe` of `addr`, bind `driver` instead of the
    /// right one (if `driver` is loaded; otherwise the device stays unbound):
    /// the kernel's own probe of a device just added winning the race
    /// against vfiod's override.
    pub fn bind_wrong_driver(&self, addr: &str, driver: &str) {
        lock(&self.shared.sim)
            .wrong_driver
            .insert(addr.to_string(), driver.to_string());
    }

    /// On every `drivers_probe` of `addr` from now on, bind `driver`
    /// instead of the right one: a driver that keeps taking the device (a
    /// dynamic id, a misconfigured host), which no retry gets past, unlike
    /// the one-off race [`SimKernel::bind_wrong_driver`] models.
    pub fn bind_wrong_driver_always(&self, addr: &str, driver: &str) {
        lock(&self.shared.sim)
            .always_wrong_driver
            .insert(addr.to_string(), driver.to_string());
    }

    /// From now on, probes of `addr` (`drivers_probe`, `bind`, driver
    /// registration) do nothing.
    pub fn ignore_probe(&self, addr: &str) {
        lock(&self.shared.sim).ignore_probe.insert(addr.to_string());
    }

    /// Undoes [`SimKernel::ignore_probe`].
    pub fn allow_probe(&self, addr: &str) {
        lock(&self.shared.sim).ignore_probe.remove(addr);
    }

    /// Every write seen so far, in order: (path relative to sysfs, value as
    /// written, newline included if any). Device attributes are named
    /// `bus/pci/devices/<addr>/<attr>`, others by their real path
    /// (`bus/pci/drivers/nvidia/unbind`, `bus/pci/drivers_probe`).
    pub fn writes(&self) -> Vec<(String, String)> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the write log.
    pub fn clear_writes(&self) {
        lock(&self.shared.log).clear();
    }

    /// Waits until every write that completed before this call has been
    /// processed. False on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let seq = self.shared.next_marker.fetch_add(1, Ordering::SeqCst) + 1;
        let marker = self.shared.tree.ctl.join(format!("idle-{seq}"));
        if fs::write(&marker, seq.to_string()).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut done = lock(&self.shared.idle);
        while *done < seq {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = self
                .shared
                .idle_cv
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Every reset the simulated kernel did, in order: (address, the
    /// method in effect, i.e. the first one `reset_method` listed then).
    pub fn resets(&self) -> Vec<(String, String)> {
        lock(&self.shared.sim).resets.clone()
    }

    /// What every following reset of `addr` leaves behind; `None`: a good
    /// reset, which also undoes what an earlier bad one left (config space
    /// answers again, D0).
    pub fn set_reset_outcome(&self, addr: &str, outcome: Option<ResetOutcome>) {
        let mut sim = lock(&self.shared.sim);
        match outcome {
            Some(o) => sim.reset_outcome.insert(addr.to_string(), o),
            None => sim.reset_outcome.remove(addr),
        };
    }

    /// Every write to an SR-IOV attribute (`sriov_numvfs`,
    /// `sriov_drivers_autoprobe`), to a vGPU VF's `current_vgpu_type`
    /// (named `bus/pci/devices/<vf>/nvidia/current_vgpu_type`) or to an
    /// mdev `create` (`bus/pci/devices/<parent>/mdev_supported_types/<type>/create`)
    /// or `remove` (`bus/mdev/devices/<uuid>/remove`) that Linux or the
    /// NVIDIA driver would have failed, in order:
    /// (path as in [`SimKernel::writes`], value as written, the errno the
    /// writer would have got). The write itself succeeded here (see the
    /// module docs), but changed nothing.
    pub fn refused_writes(&self) -> Vec<(String, String, Errno)> {
        lock(&self.shared.sim).refused.clone()
    }

    /// From now on `pf`'s driver enables at most `n` VFs, whatever is
    /// asked (as a driver short of resources does); `sriov_numvfs` then
    /// reads how many it enabled.
    pub fn limit_vfs(&self, pf: &str, n: u16) {
        lock(&self.shared.sim).vf_limit.insert(pf.to_string(), n);
    }

    /// The tree this simulator runs on.
    pub fn fakesys(&self) -> &FakeSys {
        &self.fs
    }
}

impl Drop for SimKernel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = fs::write(self.shared.tree.ctl.join("stop"), "1");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut state = self.fs.lock_state();
        state.hook = None;
        let mut sim = lock(&self.shared.sim);
        let faulted: Vec<PathBuf> = sim.faults.keys().cloned().collect();
        for path in faulted {
            self.shared.release_locked(&mut sim, &path);
        }
        // Let released hung writers finish, then turn every FIFO back into a
        // regular file.
        let pipes: Vec<(PathBuf, Pipe)> = sim.pipes.drain().collect();
        for (path, mut pipe) in pipes {
            pipe.filler = None;
            if let Some(mut r) = pipe.reader.take() {
                let deadline = Instant::now() + Duration::from_millis(500);
                let mut sink = Vec::new();
                while let Drain::WriterPresent = read_available(&mut r, &mut sink) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let content = pipe.restore.take().unwrap_or_default();
            if fs::symlink_metadata(&path).is_ok() {
                let _ = self.shared.tree.write_file(&path, &content);
            }
        }
        dbg_log!(self.shared, "stopped");
    }
}

// ---------------------------------------------------------------------------
// Shared: the simulation proper (all called with both locks held)
// ---------------------------------------------------------------------------

impl Shared {
    fn watch(&self, sim: &mut Sim, dir: &Path, mask: AddWatchFlags) -> nix::Result<()> {
        let wd = self.inotify.add_watch(dir, mask)?;
        sim.wds.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// Turns `path` into a FIFO we hold open for reading.
    fn make_pipe(&self, sim: &mut Sim, path: &Path) -> io::Result<()> {
        self.tree.make_fifo(path)?;
        let reader = open_reader(&self.tree, path)?;
        sim.pipes
            .insert(path.to_path_buf(), Pipe::new(Some(reader)));
        Ok(())
    }

    /// Watches a device directory (IN_OPEN too, for a `reset` attribute)
    /// and turns its `reset` into a sync pipe.
    fn setup_device_dir(&self, sim: &mut Sim, dir: &Path) -> io::Result<()> {
        let reset = dir.join("reset");
        if fs::symlink_metadata(&reset).is_ok_and(|m| m.is_file()) {
            self.make_pipe(sim, &reset)?;
            if let Some(pipe) = sim.pipes.get_mut(&reset) {
                pipe.sync = true;
            }
            self.refill(sim, &reset);
        }
        self.watch(sim, dir, FIFO_DIR_MASK)
            .map_err(io::Error::from)?;
        // A vGPU VF bound to nvidia before this simulator started.
        let nvidia = dir.join(NVIDIA);
        if nvidia.join("current_vgpu_type").is_file() {
            self.watch(sim, &nvidia, AddWatchFlags::IN_CLOSE_WRITE)
                .map_err(io::Error::from)?;
        }
        // An mdev parent registered (and its mdevs made) before.
        let subdirs = |d: &Path| -> Vec<PathBuf> {
            fs::read_dir(d)
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut mdev_dirs: Vec<(PathBuf, &str)> = subdirs(&dir.join("mdev_supported_types"))
            .into_iter()
            .map(|t| (t, "create"))
            .collect();
        mdev_dirs.extend(
            subdirs(dir)
                .into_iter()
                .filter(|d| {
                    d.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(fakesys::is_uuid)
                })
                .map(|d| (d, "remove")),
        );
        for (d, attr) in mdev_dirs {
            if fs::symlink_metadata(d.join(attr)).is_ok_and(|m| m.is_file()) {
                self.make_pipe(sim, &d.join(attr))?;
                self.watch(sim, &d, FIFO_DIR_MASK)
                    .map_err(io::Error::from)?;
            }
        }
        self.stamp_device(sim, dir);
        Ok(())
    }

    /// Fills a sync pipe (see [`Pipe::sync`]) so that the next writer
    /// blocks. Only while no writer has it open.
    fn refill(&self, sim: &mut Sim, path: &Path) {
        if sim.pipes.get(path).is_some_and(|p| p.opens == 0) {
            self.refill_now(sim, path);
        }
    }

    /// [`Shared::refill`] also while a writer has it open (one that has
    /// written already).
    fn refill_now(&self, sim: &mut Sim, path: &Path) {
        let Some(pipe) = sim.pipes.get_mut(path) else {
            return;
        };
        if !pipe.sync || pipe.filler.is_some() || pipe.reader.is_none() {
            return;
        }
        let link = self.tree.scratch_path();
        if fs::hard_link(path, &link).is_err() {
            return;
        }
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(&link);
        let _ = fs::remove_file(&link);
        let Ok(mut filler) = opened else { return };
        // One page: the smallest pipe; a full one blocks any write.
        let _ = fcntl(&filler, FcntlArg::F_SETPIPE_SZ(4096));
        let zeros = [0u8; 4096];
        let mut filled = 0;
        loop {
            match io::Write::write(&mut filler, &zeros) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        dbg_log!(self, "{}: filled with {filled} bytes", path.display());
        pipe.filler = Some(filler);
    }

    /// A client opened a device's `reset`: do the reset now, then let its
    /// write through (drain the filler), so the write returns after it.
    fn reset_started(&self, state: &mut State, sim: &mut Sim, path: &Path) {
        let Some(dir) = path.parent() else { return };
        let Some(addr) = dir.file_name().and_then(|a| a.to_str()).map(str::to_string) else {
            return;
        };
        let method = sim
            .pipes
            .get_mut(path)
            .and_then(|pipe| pipe.released_reset_method.take())
            .unwrap_or_else(|| reset_method_in_effect(dir));
        dbg_log!(self, "reset {addr} by {method:?}");
        sim.resets.push((addr.clone(), method));
        let tree = &self.tree;
        match sim.reset_outcome.get(&addr) {
            None => {
                if let Some(good) = state.config.get(&addr) {
                    let _ = tree.write_bytes(&dir.join("config"), good);
                }
                let _ = tree.write_file(&dir.join("power_state"), "D0\n");
            }
            Some(ResetOutcome::AllOnes) => {
                let len = state.config.get(&addr).map_or(64, Vec::len);
                let _ = tree.write_bytes(&dir.join("config"), &vec![0xff; len]);
            }
            Some(ResetOutcome::D3cold) => {
                let _ = tree.write_file(&dir.join("power_state"), "D3cold\n");
            }
            Some(ResetOutcome::LosesDriver) => {
                self.mdev_unregister(state, sim, &addr);
                let _ = tree.unbind(&addr);
                self.vgpu_unbound(state, sim, &addr, dir);
            }
        }
        let Some(pipe) = sim.pipes.get_mut(path) else {
            return;
        };
        let had_filler = pipe.filler.take().is_some();
        // Take the writer's value as soon as it is in the pipe (its write
        // has then returned), and fill the pipe again right away, before
        // the next writer can come: the close may be processed much later.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut data = Vec::new();
        if let Some(reader) = pipe.reader.as_mut() {
            loop {
                let drain = read_available(reader, &mut data);
                data.retain(|b| *b != 0);
                if !data.is_empty() || matches!(drain, Drain::Eof) || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        if !data.is_empty() {
            pipe.values
                .extend(split_values("reset", &String::from_utf8_lossy(&data)));
        }
        if had_filler && !data.is_empty() {
            self.refill_now(sim, path);
        }
    }

    fn setup_driver_dir(&self, sim: &mut Sim, name: &str) -> io::Result<()> {
        let dir = self.tree.driver_dir(name);
        for attr in DRIVER_ATTRS {
            let p = dir.join(attr);
            if !sim.pipes.contains_key(&p) {
                self.make_pipe(sim, &p)?;
            }
        }
        self.watch(sim, &dir, FIFO_DIR_MASK)
            .map_err(io::Error::from)
    }

    /// Detaches `path` from normal processing before a fault: returns what
    /// to restore later.
    fn take_attr(&self, sim: &mut Sim, path: &Path, rel: &str) -> Saved {
        if let Some(pipe) = sim.pipes.get_mut(path) {
            pipe.filler = None;
            pipe.fill(&attr_name(path));
            pipe.reader = None;
            Saved::Fifo
        } else {
            let meta = fs::symlink_metadata(path)
                .unwrap_or_else(|e| panic!("simkernel: no attribute {rel}: {e}"));
            assert!(meta.is_file(), "simkernel: {rel} is not a regular file");
            Saved::Regular(fs::read_to_string(path).unwrap_or_default())
        }
    }

    /// Undoes a fault on `path`, if any. For a hang, blocked writers are let
    /// through and waited for (up to a few seconds) until they have written
    /// and closed, so their close events are queued when this returns.
    /// Returns whether any writer was let through.
    fn release_locked(&self, sim: &mut Sim, path: &Path) -> bool {
        let Some(fault) = sim.faults.remove(path) else {
            return false;
        };
        let tree = &self.tree;
        let attr = attr_name(path);
        match fault {
            Fault::Fail(saved) => {
                let _ = tree.remove(path);
                match saved {
                    Saved::Fifo => {
                        let _ = tree.make_fifo(path);
                        if let Some(pipe) = sim.pipes.get_mut(path) {
                            pipe.reader = open_reader(&self.tree, path).ok();
                        }
                        self.refill(sim, path);
                    }
                    Saved::Regular(content) => {
                        let _ = tree.write_file(path, &content);
                    }
                }
                false
            }
            Fault::Hang(Saved::Fifo) => {
                // Blocked writers go through; their close events are
                // processed like any write.
                let Some(pipe) = sim.pipes.get_mut(path) else {
                    return false;
                };
                let method_now = pipe
                    .sync
                    .then(|| path.parent().map(reset_method_in_effect))
                    .flatten();
                let Ok(mut reader) = open_reader(&self.tree, path) else {
                    return false;
                };
                let mut data = Vec::new();
                let seen = wait_for_writers(&mut reader, &mut data);
                if seen {
                    pipe.released_reset_method = method_now;
                }
                pipe.values
                    .extend(split_values(&attr, &String::from_utf8_lossy(&data)));
                pipe.reader = Some(reader);
                seen
            }
            // (A released `reset` writer's IN_OPEN does the reset; the
            // filler comes back once its close is processed.)
            Fault::Hang(Saved::Regular(content)) => {
                let Ok(mut reader) = open_reader(&self.tree, path) else {
                    let _ = tree.write_file(path, &content);
                    return false;
                };
                let mut data = Vec::new();
                if !wait_for_writers(&mut reader, &mut data) {
                    let _ = tree.write_file(path, &content);
                    return false;
                }
                // Its close event restores the file and applies the value.
                let mut pipe = Pipe::new(Some(reader));
                pipe.restore = Some(content);
                pipe.values
                    .extend(split_values(&attr, &String::from_utf8_lossy(&data)));
                sim.pipes.insert(path.to_path_buf(), pipe);
                true
            }
        }
    }

    /// The name a write to `path` is logged under.
    fn display(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.tree.sysfs).unwrap_or(path);
        if rel.starts_with("devices") {
            // The innermost device directory (`nvidia/current_vgpu_type`
            // is two levels below its VF's).
            let mut dir = path.parent();
            while let Some(d) = dir {
                if let Some(addr) = d.file_name().and_then(|a| a.to_str()) {
                    if fakesys::is_uuid(addr) {
                        let attr = path.strip_prefix(d).unwrap_or(path);
                        return format!("bus/mdev/devices/{addr}/{}", attr.to_string_lossy());
                    }
                    if fakesys::is_pci_addr(addr) {
                        let attr = path.strip_prefix(d).unwrap_or(path);
                        return format!("bus/pci/devices/{addr}/{}", attr.to_string_lossy());
                    }
                }
                dir = d.parent();
            }
        }
        rel.to_string_lossy().into_owned()
    }

    fn record(&self, path: &Path, value: &str) {
        let name = self.display(path);
        dbg_log!(self, "write {name} <- {value:?}");
        lock(&self.log).push((name, value.to_string()));
    }

    fn handle_event(&self, state: &mut State, sim: &mut Sim, ev: &InotifyEvent) {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            eprintln!("simkernel: inotify queue overflow: writes were lost");
            return;
        }
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            sim.wds.remove(&ev.wd);
            return;
        }
        let Some(dir) = sim.wds.get(&ev.wd).cloned() else {
            return;
        };
        let Some(name) = ev.name.as_ref() else {
            return;
        };
        let path = dir.join(name);
        if dir == self.tree.ctl {
            if let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("idle-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                sim.marker_seen = sim.marker_seen.max(seq);
                let _ = fs::remove_file(&path);
            }
            return;
        }
        let closed = ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE);
        if let Some(pipe) = sim.pipes.get_mut(&path) {
            if pipe.restore.is_none() {
                if ev.mask.contains(AddWatchFlags::IN_OPEN) {
                    pipe.opens += 1;
                    if pipe.sync {
                        self.reset_started(state, sim, &path);
                    }
                    return;
                }
                if closed {
                    if pipe.opens == 0 {
                        // Keep whatever is in the pipe: it belongs to a write
                        // whose own events were merged or are still to come;
                        // `flush` applies it once everything before is done.
                        pipe.fill(&attr_name(&path));
                        dbg_log!(self, "{}: late close, not a write", path.display());
                        return;
                    }
                    pipe.opens -= 1;
                }
            }
            if closed {
                self.pipe_closed(state, sim, &path);
                self.refill(sim, &path);
            }
            return;
        }
        if !closed {
            return;
        }
        if sim.faults.contains_key(&path) {
            return;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return; // vanished
        };
        if !meta.is_file() {
            return;
        }
        self.regular_written(state, sim, &path);
    }

    /// A writer closed FIFO attribute `path`: apply its value.
    fn pipe_closed(&self, state: &mut State, sim: &mut Sim, path: &Path) {
        let attr = attr_name(path);
        let Some(pipe) = sim.pipes.get_mut(path) else {
            return;
        };
        pipe.fill(&attr);
        if let Some(saved) = pipe.restore.clone() {
            // The released writer of a hung regular attribute.
            let mut values: Vec<String> = pipe.values.drain(..).collect();
            // The FIFO keeps its reader until the regular file has taken
            // its place: a writer opening it meanwhile (the code under test
            // writing again the moment its late write returned) must not
            // block for good on a FIFO nobody reads. What such a writer
            // wrote is taken as a write of its own.
            let mut pipe = sim.pipes.remove(path);
            let _ = self.tree.write_file(path, &saved);
            if let Some(reader) = pipe.as_mut().and_then(|p| p.reader.as_mut()) {
                let mut late = Vec::new();
                let _ = read_available(reader, &mut late);
                values.extend(split_values(&attr, &String::from_utf8_lossy(&late)));
            }
            drop(pipe);
            for v in values {
                let _ = self.tree.write_file(path, &v);
                self.regular_written(state, sim, path);
            }
            return;
        }
        if pipe.credits > 0 {
            pipe.credits -= 1;
            return;
        }
        match pipe.values.pop_front() {
            Some(v) => self.apply_value(state, sim, path, &v),
            // No data: a descriptor inherited by a forked process, closed
            // late; not a write.
            None => dbg_log!(self, "{}: close without data", path.display()),
        }
    }

    /// Applies buffered values whose close events were merged or have not
    /// arrived yet. Only called right after a drain found the inotify queue
    /// empty, with no FIFO read since: every write that finished before
    /// these values were written has then been processed, so the order is
    /// kept.
    fn flush(&self, state: &mut State, sim: &mut Sim) {
        let mut paths: Vec<PathBuf> = sim
            .pipes
            .iter()
            .filter(|(_, p)| p.restore.is_none() && !p.values.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        paths.sort();
        for path in paths {
            while let Some(v) = sim.pipes.get_mut(&path).and_then(|p| {
                let v = p.values.pop_front()?;
                p.credits += 1;
                Some(v)
            }) {
                self.apply_value(state, sim, &path, &v);
            }
        }
    }

    /// A write to a regular attribute (`driver_override`, or anything else:
    /// logged only). The content is read when the event is processed.
    ///
    /// `driver_override` is rewritten to the kernel's form ("vfio-pci\n",
    /// "(null)\n") in place, under a write lease, so that a client's write
    /// can never be overwritten: while the lease is held a client's `open()`
    /// waits, and the lease is only granted while nobody has the file open.
    /// The file is opened through a hard link in the scratch directory so
    /// this raises no inotify event in the device directory. Without a lease
    /// (busy for too long, or unsupported) the file is left as written.
    fn regular_written(&self, state: &mut State, sim: &mut Sim, path: &Path) {
        let attr = attr_name(path);
        if matches!(attr.as_str(), "sriov_numvfs" | "sriov_drivers_autoprobe") {
            let pf = path
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|a| a.to_str())
                .unwrap_or_default()
                .to_string();
            if state.sriov.contains_key(&pf) {
                self.sriov_attr_written(state, sim, path, &pf, &attr);
                return;
            }
        }
        if attr == "current_vgpu_type" {
            let vf = path
                .parent()
                .filter(|d| d.file_name().is_some_and(|n| n == NVIDIA))
                .and_then(Path::parent)
                .and_then(|d| d.file_name())
                .and_then(|a| a.to_str())
                .unwrap_or_default()
                .to_string();
            if state.vgpu.contains_key(&vf) {
                self.kernel_attr_written(state, sim, path, &mut |sh, state, sim, written| {
                    sh.vgpu_apply(state, sim, path, &vf, written)
                });
                return;
            }
        }
        let last = sim.stamps.get(path).copied();
        let (content, stamp) = if attr_name(path) == "driver_override" {
            let leased = self.with_lease(path, |f| {
                if Some(Stamp::of(&f.metadata()?)) == last {
                    return Ok(None);
                }
                let mut content = String::new();
                f.read_to_string(&mut content)?;
                let normal = match Tree::parse_override(&content) {
                    Some(v) => format!("{v}\n"),
                    None => "(null)\n".to_string(),
                };
                if normal != content {
                    f.set_len(0)?;
                    f.write_all_at(normal.as_bytes(), 0)?;
                    dbg_log!(self, "normalised {content:?} to {normal:?} under lease");
                }
                Ok(Some((content, Stamp::of(&f.metadata()?))))
            });
            match leased {
                Some(Some(found)) => found,
                Some(None) => {
                    dbg_log!(self, "{}: unchanged, a late close", path.display());
                    return;
                }
                None => {
                    let Ok(meta) = fs::metadata(path) else { return };
                    let Ok(c) = fs::read_to_string(path) else {
                        return;
                    };
                    dbg_log!(self, "no lease: {c:?} left as written");
                    (c, Stamp::of(&meta))
                }
            }
        } else {
            let Ok(meta) = fs::metadata(path) else { return };
            let Ok(c) = fs::read_to_string(path) else {
                return;
            };
            (c, Stamp::of(&meta))
        };
        if Some(stamp) == last {
            dbg_log!(self, "{}: unchanged, a late close", path.display());
            return;
        }
        sim.stamps.insert(path.to_path_buf(), stamp);
        self.record(path, &content);
    }

    /// Remembers the state of a device's regular attributes, so that a late
    /// close of a descriptor inherited by a forked process (no new write)
    /// is not taken for a write.
    fn stamp_device(&self, sim: &mut Sim, dir: &Path) {
        for attr in [
            "driver_override",
            "sriov_numvfs",
            "sriov_drivers_autoprobe",
            "nvidia/current_vgpu_type",
        ] {
            let path = dir.join(attr);
            if let Ok(meta) = fs::metadata(&path) {
                sim.stamps.insert(path, Stamp::of(&meta));
            }
        }
    }

    /// Runs `f` on `path` opened read-write while holding a write lease on
    /// it (see `regular_written`). None if no lease could be had.
    fn with_lease<T>(&self, path: &Path, f: impl FnOnce(&mut File) -> io::Result<T>) -> Option<T> {
        use nix::libc;
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        // <asm-generic/fcntl.h>; not exported by the libc crate.
        const F_SETSIG: libc::c_int = 10;
        // Busy (someone has it open: a client mid-write, a reader, a forked
        // process that inherited a descriptor) for up to ~2 s: retry.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let link = self.tree.scratch_path();
            fs::hard_link(path, &link).ok()?;
            let opened = OpenOptions::new().read(true).write(true).open(&link);
            let _ = fs::remove_file(&link);
            let mut file = opened.ok()?;
            let (fm, pm) = (file.metadata().ok()?, fs::metadata(path).ok()?);
            if (fm.dev(), fm.ino()) != (pm.dev(), pm.ino()) {
                continue; // replaced meanwhile
            }
            let fd = file.as_raw_fd();
            // A lease break signals the holder (SIGIO by default, which
            // would kill the process): use SIGURG, ignored by default, and
            // clear the owner so that nothing is sent at all.
            // SAFETY: plain fcntl calls on a file descriptor we own.
            let leased = unsafe {
                libc::fcntl(fd, F_SETSIG, libc::SIGURG);
                libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK)
            };
            if leased == 0 {
                // SAFETY: as above.
                unsafe {
                    libc::fcntl(fd, libc::F_SETOWN, 0);
                }
                // The lease goes with the file when it is closed.
                return f(&mut file).ok();
            }
            let err = Errno::last();
            drop(file);
            if err != Errno::EAGAIN && err != Errno::EBUSY {
                dbg_log!(self, "no lease on {}: {err}", path.display());
                return None;
            }
            std::thread::sleep(Duration::from_micros(300));
        }
        dbg_log!(self, "{} stayed busy: not normalised", path.display());
        None
    }

    /// One value written to a write-only attribute.
    fn apply_value(&self, state: &mut State, sim: &mut Sim, path: &Path, value: &str) {
        self.record(path, value);
        let attr = attr_name(path);
        let arg = value.trim();
        let Some(dir) = path.parent() else { return };
        if dir == self.tree.sysfs.join("bus/pci") {
            if attr == "drivers_probe" {
                self.probe(state, sim, arg);
            }
            return;
        }
        if attr == "create" && self.mdev_type_at(dir).is_some() {
            let (parent, type_id) = self.mdev_type_at(dir).expect("checked");
            self.mdev_create_store(state, sim, path, &parent, &type_id, value);
            return;
        }
        if attr == "remove" {
            let uuid = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if fakesys::is_uuid(uuid) && state.mdev(uuid).is_some() {
                let uuid = uuid.to_string();
                self.mdev_remove_store(state, sim, path, &uuid, value);
                return;
            }
        }
        if dir.parent() == Some(self.tree.sysfs.join("bus/pci/drivers").as_path()) {
            let Some(driver) = dir.file_name().and_then(|d| d.to_str()) else {
                return;
            };
            match attr.as_str() {
                "bind" => self.bind_cmd(state, sim, arg, driver),
                "unbind" if self.tree.driver_of(arg).as_deref() == Some(driver) => {
                    // A PF driver's remove disables SR-IOV (igb and
                    // vfio-pci do): the VFs go first.
                    if state.sriov.get(arg).is_some_and(|p| !p.vfs.is_empty()) {
                        dbg_log!(self, "unbind {arg}: its VFs go first");
                        self.sriov_disable(state, sim, arg);
                        self.show_sriov_state(state, sim, arg);
                    }
                    // The driver's remove unregisters an mdev parent:
                    // its mdevs go first.
                    self.mdev_unregister(state, sim, arg);
                    dbg_log!(self, "unbind {arg} from {driver}");
                    let _ = self.tree.unbind(arg);
                    if let Some(dev) = self.tree.device_dir(arg) {
                        self.vgpu_unbound(state, sim, arg, &dev);
                    }
                }
                _ => {} // unbind from another driver (ENODEV), new_id, remove_id: recorded only
            }
        }
    }

    /// The driver_override in effect, also while its file is faulted.
    fn override_for(&self, sim: &Sim, addr: &str) -> Option<String> {
        let path = self.tree.device_dir(addr)?.join("driver_override");
        if let Some(Saved::Regular(s)) = sim.faults.get(&path).map(Fault::saved) {
            return Tree::parse_override(s);
        }
        if let Some(s) = sim.pipes.get(&path).and_then(|p| p.restore.as_ref()) {
            return Tree::parse_override(s);
        }
        self.tree.override_of(addr)
    }

    fn try_bind(&self, state: &mut State, sim: &mut Sim, addr: &str, driver: &str) -> bool {
        if !self.tree.driver_loaded(driver) {
            dbg_log!(self, "{addr}: driver {driver} not loaded, stays unbound");
            return false;
        }
        if driver == VFIO_PCI && self.tree.group_of(addr).is_none() {
            dbg_log!(self, "{addr}: no IOMMU group, vfio-pci probe fails");
            return false;
        }
        if driver == VFIO_PCI && !state.vgpu_types_of(addr).is_empty() {
            dbg_log!(self, "{addr}: a vGPU VF, vfio-pci probe fails");
            return false;
        }
        dbg_log!(self, "bind {addr} to {driver}");
        if self.tree.bind(addr, driver).is_err() {
            return false;
        }
        let registered = self.tree.mdev_register(state, addr, &mut |staged, dest| {
            self.watch_staged_mdev_dir(sim, staged, dest)
        });
        match registered {
            Ok(true) => dbg_log!(self, "{addr}: mdev parent registered on {driver}"),
            Ok(false) => {}
            Err(e) => eprintln!("simkernel: {addr}: cannot register as an mdev parent: {e}"),
        }
        if driver == NVIDIA {
            let mut watch = |staged: &Path, dest: &Path| match self
                .inotify
                .add_watch(staged, AddWatchFlags::IN_CLOSE_WRITE)
            {
                Ok(wd) => {
                    sim.wds.insert(wd, dest.to_path_buf());
                }
                Err(e) => eprintln!("simkernel: cannot watch {}: {e}", dest.display()),
            };
            match self.tree.vgpu_bound(state, addr, &mut watch) {
                Ok(true) => {
                    dbg_log!(self, "{addr}: vGPU VF on nvidia, /dev/vfio node made");
                    if let Some(dir) = self.tree.device_dir(addr) {
                        self.stamp_device(sim, &dir);
                    }
                }
                Ok(false) => {}
                Err(e) => eprintln!("simkernel: {addr}: cannot make its vGPU files: {e}"),
            }
        }
        true
    }

    /// `addr` (directory `dir`) was unbound: if it was a vGPU VF, its vGPU
    /// is gone (faults armed on its `nvidia/` files with it) and its
    /// siblings may take types again.
    fn vgpu_unbound(&self, state: &mut State, sim: &mut Sim, addr: &str, dir: &Path) {
        if state.vgpu.contains_key(addr) {
            dbg_log!(self, "{addr}: left nvidia, its vGPU is gone");
            self.forget_under(sim, &dir.join(NVIDIA));
            self.tree.vgpu_unbound(state, addr);
        }
    }

    fn probe(&self, state: &mut State, sim: &mut Sim, addr: &str) {
        if self.tree.device_dir(addr).is_none() || self.tree.driver_of(addr).is_some() {
            return;
        }
        if sim.ignore_probe.contains(addr) {
            dbg_log!(self, "probe {addr} ignored");
            return;
        }
        if !self.can_probe(state, sim, addr) {
            return;
        }
        let wrong = sim
            .wrong_driver
            .remove(addr)
            .or_else(|| sim.always_wrong_driver.get(addr).cloned());
        let target = match wrong {
            Some(wrong) => Some(wrong),
            None => self
                .override_for(sim, addr)
                .or_else(|| state.native.get(addr).cloned().flatten()),
        };
        if let Some(driver) = target {
            self.try_bind(state, sim, addr, &driver);
        }
    }

    fn bind_cmd(&self, state: &mut State, sim: &mut Sim, addr: &str, driver: &str) {
        if self.tree.device_dir(addr).is_none() || self.tree.driver_of(addr).is_some() {
            return;
        }
        if sim.ignore_probe.contains(addr) || !self.can_probe(state, sim, addr) {
            return;
        }
        match self.override_for(sim, addr) {
            Some(o) if o != driver => {
                dbg_log!(self, "bind {addr} to {driver} refused: override is {o}");
            }
            _ => {
                self.try_bind(state, sim, addr, driver);
            }
        }
    }

    /// A driver registered: probe the unbound devices it matches.
    fn driver_registered(&self, state: &mut State, sim: &mut Sim, driver: &str) {
        for addr in self.tree.devices() {
            if self.tree.driver_of(&addr).is_some()
                || sim.ignore_probe.contains(&addr)
                || !self.can_probe(state, sim, &addr)
            {
                continue;
            }
            let wanted = self
                .override_for(sim, &addr)
                .or_else(|| state.native.get(&addr).cloned().flatten());
            if wanted.as_deref() == Some(driver) {
                self.try_bind(state, sim, &addr, driver);
            }
        }
    }

    fn forget_under(&self, sim: &mut Sim, dir: &Path) {
        sim.pipes.retain(|p, _| !p.starts_with(dir));
        sim.faults.retain(|p, _| !p.starts_with(dir));
        sim.stamps.retain(|p, _| !p.starts_with(dir));
    }

    /// [`Shared::forget_under`] for a directory about to go while writers
    /// may hang on its attributes: they are let through first (their writes
    /// dropped), as a FIFO unlinked with a writer blocked in `open()` would
    /// hold it for good.
    fn forget_releasing(&self, sim: &mut Sim, dir: &Path) {
        let hung: Vec<PathBuf> = sim
            .faults
            .iter()
            .filter(|(p, f)| p.starts_with(dir) && matches!(f, Fault::Hang(_)))
            .map(|(p, _)| p.clone())
            .collect();
        for path in hung {
            if self.release_locked(sim, &path) {
                dbg_log!(
                    self,
                    "{}: hung writer let through, write dropped",
                    path.display()
                );
            }
        }
        self.forget_under(sim, dir);
    }
    // -----------------------------------------------------------------------
    // SR-IOV
    // -----------------------------------------------------------------------

    /// Linux's `pci_device_can_probe`: a VF is probed (by `drivers_probe`,
    /// `bind`, driver registration or its creation) only when it has a
    /// `driver_override` or its PF's `sriov_drivers_autoprobe` is 1.
    fn can_probe(&self, state: &State, sim: &Sim, addr: &str) -> bool {
        let Some(pf) = state.pf_of(addr) else {
            return true;
        };
        if state.sriov.get(pf).is_some_and(|p| p.autoprobe)
            || self.override_for(sim, addr).is_some()
        {
            return true;
        }
        dbg_log!(
            self,
            "{addr}: VF without override, {pf}'s autoprobe is 0: not probed"
        );
        false
    }

    /// A write to a PF's `sriov_numvfs` or `sriov_drivers_autoprobe`: read
    /// what was written, act on it, and put the kernel's view back into the
    /// file, all under a write lease (see `regular_written`) so that no
    /// client write can slip in between and be overwritten.
    fn sriov_attr_written(
        &self,
        state: &mut State,
        sim: &mut Sim,
        path: &Path,
        pf: &str,
        attr: &str,
    ) {
        self.kernel_attr_written(state, sim, path, &mut |sh, state, sim, written| {
            sh.sriov_apply(state, sim, path, pf, attr, written)
        });
    }

    /// A write to a regular attribute whose store the kernel decides
    /// (`sriov_*`, `current_vgpu_type`): reads what was written, has
    /// `apply` act on it, and puts what `apply` says the attribute reads
    /// now back into the file, all under a write lease (see
    /// `regular_written`) so that no client write can slip in between and
    /// be overwritten.
    fn kernel_attr_written(
        &self,
        state: &mut State,
        sim: &mut Sim,
        path: &Path,
        apply: &mut dyn FnMut(&Self, &mut State, &mut Sim, &str) -> String,
    ) {
        let last = sim.stamps.get(path).copied();
        // What the file must show, once the write was acted on.
        let mut shown: Option<String> = None;
        let leased = self.with_lease(path, |f| {
            if Some(Stamp::of(&f.metadata()?)) == last {
                return Ok(false);
            }
            let mut written = String::new();
            f.read_to_string(&mut written)?;
            let now = apply(self, state, sim, &written);
            shown = Some(now.clone());
            f.set_len(0)?;
            f.write_all_at(now.as_bytes(), 0)?;
            Ok(true)
        });
        match (leased, shown) {
            (Some(false), _) => {
                dbg_log!(self, "{}: unchanged, a late close", path.display());
                return;
            }
            (Some(true), _) => {}
            // Acted on, but the rewrite in place failed.
            (None, Some(now)) => {
                let _ = self.tree.write_file(path, &now);
            }
            (None, None) => {
                let Ok(meta) = fs::metadata(path) else { return };
                if Some(Stamp::of(&meta)) == last {
                    return;
                }
                let Ok(written) = fs::read_to_string(path) else {
                    return;
                };
                dbg_log!(self, "{}: no lease, rewritten by rename", path.display());
                let now = apply(self, state, sim, &written);
                let _ = self.tree.write_file(path, &now);
            }
        }
        if let Ok(meta) = fs::metadata(path) {
            sim.stamps.insert(path.to_path_buf(), Stamp::of(&meta));
        }
    }

    /// Acts on `written` (a write to `attr` of `pf`) and returns what the
    /// attribute reads afterwards. A write Linux refuses changes nothing
    /// and is recorded in `refused`.
    fn sriov_apply(
        &self,
        state: &mut State,
        sim: &mut Sim,
        path: &Path,
        pf: &str,
        attr: &str,
        written: &str,
    ) -> String {
        self.record(path, written);
        let text = written.strip_suffix('\n').unwrap_or(written);
        let result = if attr == "sriov_numvfs" {
            self.sriov_numvfs_store(state, sim, pf, text)
        } else {
            match parse_kernel_bool(text) {
                Some(on) => {
                    dbg_log!(self, "{pf}: sriov_drivers_autoprobe = {on}");
                    if let Some(p) = state.sriov.get_mut(pf) {
                        p.autoprobe = on;
                    }
                    Ok(())
                }
                None => Err(Errno::EINVAL),
            }
        };
        if let Err(errno) = result {
            dbg_log!(self, "{pf}: {attr} <- {written:?} refused: {errno}");
            sim.refused
                .push((self.display(path), written.to_string(), errno));
        }
        self.sriov_shown(state, pf, attr)
    }

    /// What `attr` of `pf` reads, from the kernel's state.
    fn sriov_shown(&self, state: &State, pf: &str, attr: &str) -> String {
        let Some(p) = state.sriov.get(pf) else {
            return String::new();
        };
        if attr == "sriov_numvfs" {
            format!("{}\n", p.vfs.len())
        } else {
            format!("{}\n", u8::from(p.autoprobe))
        }
    }

    /// `sriov_numvfs_store` of Linux 6.12, checks in its order.
    fn sriov_numvfs_store(
        &self,
        state: &mut State,
        sim: &mut Sim,
        pf: &str,
        text: &str,
    ) -> Result<(), Errno> {
        let wanted = parse_kernel_u16(text).ok_or(Errno::EINVAL)?;
        let Some(p) = state.sriov.get(pf) else {
            return Err(Errno::ENODEV);
        };
        let total = p.spec.sriov.as_ref().map_or(0, |s| s.total_vfs);
        if wanted > total {
            return Err(Errno::ERANGE);
        }
        let current = p.vfs.len();
        if usize::from(wanted) == current {
            return Ok(());
        }
        let Some(driver) = self.tree.driver_of(pf) else {
            return Err(Errno::ENOENT);
        };
        if !self.driver_configures_sriov(state, pf, &driver) {
            return Err(Errno::ENOENT);
        }
        if wanted == 0 {
            self.sriov_disable(state, sim, pf);
            return Ok(());
        }
        if current != 0 {
            return Err(Errno::EBUSY);
        }
        let enabled = sim.vf_limit.get(pf).map_or(wanted, |l| wanted.min(*l));
        self.sriov_enable(state, sim, pf, &driver, enabled);
        Ok(())
    }

    /// Whether `driver`, bound to `pf`, implements `sriov_configure`.
    fn driver_configures_sriov(&self, state: &State, pf: &str, driver: &str) -> bool {
        if driver == VFIO_PCI {
            let param = self
                .tree
                .sysfs
                .join("module/vfio_pci/parameters/enable_sriov");
            return fs::read_to_string(param).is_ok_and(|v| v.trim() == "Y");
        }
        let native = state.native.get(pf).cloned().flatten();
        native.as_deref() == Some(driver)
            && state
                .sriov
                .get(pf)
                .and_then(|p| p.spec.sriov.as_ref())
                .is_some_and(|s| s.native_driver_configures)
    }

    /// Enables `count` VFs of `pf` (bound to `pf_driver`), one after the
    /// other as `sriov_enable` + `pci_iov_add_virtfn` do: each appears on
    /// the bus (uevent `add`), then is probed if it may be (uevent `bind`).
    fn sriov_enable(
        &self,
        state: &mut State,
        sim: &mut Sim,
        pf: &str,
        pf_driver: &str,
        count: u16,
    ) {
        dbg_log!(self, "{pf}: enabling {count} VFs");
        let vf_driver = state
            .sriov
            .get(pf)
            .and_then(|p| p.spec.sriov.as_ref())
            .and_then(|s| s.vf_driver.clone());
        // udev loads the VF driver's module from the VFs' modalias
        // whatever autoprobe says; autoprobe is what keeps it from binding.
        if let Some(vd) = vf_driver {
            if !self.tree.driver_loaded(&vd) && self.tree.create_driver_dir(&vd).is_ok() {
                dbg_log!(self, "loaded VF driver {vd}");
                if let Err(e) = self.setup_driver_dir(sim, &vd) {
                    eprintln!("simkernel: cannot set up driver {vd}: {e}");
                }
                self.driver_registered(state, sim, &vd);
            }
        }
        // vfio-pci's bus notifier sets the override of every VF of a PF it
        // owns ("Captured SR-IOV VF ... driver_override").
        let captured = (pf_driver == VFIO_PCI).then_some(VFIO_PCI);
        for _ in 0..count {
            let (addr, dir) = match self.tree.create_vf(state, pf, captured) {
                Ok(vf) => vf,
                Err(e) => {
                    eprintln!("simkernel: {pf}: cannot add a VF: {e}");
                    break;
                }
            };
            if let Err(e) = self.setup_device_dir(sim, &dir) {
                eprintln!("simkernel: cannot watch {}: {e}", dir.display());
            }
            let index = state.sriov.get(pf).map_or(0, |p| p.vfs.len() - 1);
            if let Err(e) = self.tree.publish_vf(pf, index, &addr, &dir) {
                eprintln!("simkernel: {addr}: cannot put it on the bus: {e}");
            }
            dbg_log!(self, "{pf}: added VF {addr}");
            self.tree.send_uevent(state, &format!("add {addr}"));
            self.probe(state, sim, &addr);
            if let Some(d) = self.tree.driver_of(&addr) {
                self.tree.send_uevent(state, &format!("bind {addr} {d}"));
            }
        }
    }

    /// Unbinds and removes every VF of `pf`, last one first (uevent
    /// `remove` each). Does not touch the PF's `sriov_numvfs` file: see
    /// [`Shared::show_sriov_state`].
    fn sriov_disable(&self, state: &mut State, sim: &mut Sim, pf: &str) {
        let vfs: Vec<String> = state
            .sriov
            .get(pf)
            .map(|p| p.vfs.clone())
            .unwrap_or_default();
        dbg_log!(self, "{pf}: removing {} VFs", vfs.len());
        for vf in vfs.iter().rev() {
            let Some(dir) = self.tree.device_dir(vf) else {
                continue;
            };
            self.forget_under(sim, &dir);
            self.tree.remove_device_entry(state, vf, &dir);
            self.tree.send_uevent(state, &format!("remove {vf}"));
        }
    }

    /// Makes `pf`'s `sriov_numvfs` read the kernel's count after a change
    /// that was no write to it (its driver unbound). While the attribute
    /// is hung, the content it gets back on release is updated instead.
    fn show_sriov_state(&self, state: &State, sim: &mut Sim, pf: &str) {
        let Some(dir) = self.tree.device_dir(pf) else {
            return;
        };
        let path = dir.join("sriov_numvfs");
        let now = self.sriov_shown(state, pf, "sriov_numvfs");
        if let Some(Fault::Hang(Saved::Regular(saved)) | Fault::Fail(Saved::Regular(saved))) =
            sim.faults.get_mut(&path)
        {
            *saved = now;
            return;
        }
        if let Some(restore) = sim.pipes.get_mut(&path).and_then(|p| p.restore.as_mut()) {
            *restore = now;
            return;
        }
        let rewritten = self.with_lease(&path, |f| {
            f.set_len(0)?;
            f.write_all_at(now.as_bytes(), 0)
        });
        if rewritten.is_none() {
            let _ = self.tree.write_file(&path, &now);
        }
        if let Ok(meta) = fs::metadata(&path) {
            sim.stamps.insert(path, Stamp::of(&meta));
        }
    }
}

impl Shared {
    // -----------------------------------------------------------------------
    // NVIDIA vGPU
    // -----------------------------------------------------------------------

    /// Acts on `written` (a write to `vf`'s `nvidia/current_vgpu_type`) and
    /// returns what the attribute reads afterwards. A write the driver
    /// refuses changes nothing and is recorded in `refused`. A change
    /// rewrites every sibling's `creatable_vgpu_types`.
    fn vgpu_apply(
        &self,
        state: &mut State,
        sim: &mut Sim,
        path: &Path,
        vf: &str,
        written: &str,
    ) -> String {
        self.record(path, written);
        let text = written.strip_suffix('\n').unwrap_or(written);
        match self.vgpu_store(state, vf, text) {
            Ok(changed) => {
                if changed {
                    if let Some(pf) = state.pf_of(vf).map(str::to_string) {
                        self.tree.vgpu_refresh(state, &pf);
                    }
                }
            }
            Err(errno) => {
                dbg_log!(
                    self,
                    "{vf}: current_vgpu_type <- {written:?} refused: {errno}"
                );
                sim.refused
                    .push((self.display(path), written.to_string(), errno));
            }
        }
        format!("{}\n", state.vgpu.get(vf).copied().unwrap_or(0))
    }

    /// The driver's store of `current_vgpu_type`: 0 destroys the VF's vGPU
    /// (nothing to do if it has none); an ID creates one, only on a VF
    /// without one (EBUSY: the driver wants 0 first) and only if the VF's
    /// `creatable_vgpu_types` lists it now (EINVAL), as does a value that is
    /// no number. Returns whether anything changed.
    fn vgpu_store(&self, state: &mut State, vf: &str, text: &str) -> Result<bool, Errno> {
        let wanted = parse_kernel_u32(text).ok_or(Errno::EINVAL)?;
        let current = state.vgpu.get(vf).copied().ok_or(Errno::ENODEV)?;
        if wanted == 0 {
            if current == 0 {
                return Ok(false);
            }
            dbg_log!(self, "{vf}: vGPU type {current} destroyed");
            state.vgpu.insert(vf.to_string(), 0);
            return Ok(true);
        }
        if current != 0 {
            return Err(Errno::EBUSY);
        }
        let creatable = state.vgpu_creatable(vf).unwrap_or_default();
        if !creatable.iter().any(|t| t.id == wanted) {
            return Err(Errno::EINVAL);
        }
        dbg_log!(self, "{vf}: vGPU type {wanted} created");
        state.vgpu.insert(vf.to_string(), wanted);
        Ok(true)
    }
}

impl Shared {
    // -----------------------------------------------------------------------
    // Legacy mdev
    // -----------------------------------------------------------------------

    /// Prepares a directory holding a write-only mdev attribute (`create`
    /// in a type directory, `remove` in an mdev's), complete in scratch at
    /// `staged`, before it is renamed to `dest`: watched (the watch follows
    /// the directory), its attribute turned into a FIFO we read. So no
    /// write to it can be missed.
    fn watch_staged_mdev_dir(&self, sim: &mut Sim, staged: &Path, dest: &Path) {
        let attr = if staged.join("create").exists() {
            "create"
        } else {
            "remove"
        };
        let prepared = (|| -> io::Result<()> {
            let wd = self.inotify.add_watch(staged, FIFO_DIR_MASK)?;
            sim.wds.insert(wd, dest.to_path_buf());
            self.tree.make_fifo(&staged.join(attr))?;
            let reader = open_reader(&self.tree, &staged.join(attr))?;
            sim.pipes.insert(dest.join(attr), Pipe::new(Some(reader)));
            Ok(())
        })();
        if let Err(e) = prepared {
            eprintln!("simkernel: cannot watch {}: {e}", dest.display());
        }
    }

    /// The (parent address, type) whose type directory `dir` is, if `dir`
    /// is one of a registered parent.
    fn mdev_type_at(&self, dir: &Path) -> Option<(String, String)> {
        let type_id = dir.file_name()?.to_str()?;
        let types_dir = dir.parent()?;
        if types_dir.file_name()? != "mdev_supported_types" {
            return None;
        }
        let parent = types_dir.parent()?.file_name()?.to_str()?;
        Some((parent.to_string(), type_id.to_string()))
    }

    /// `addr` leaves its driver: its mdevs and types go (see
    /// [`Tree::mdev_unregister`]).
    fn mdev_unregister(&self, state: &mut State, sim: &mut Sim, addr: &str) {
        if state.mdevs_of(addr).next().is_some() {
            dbg_log!(self, "{addr}: leaving its driver, its mdevs go first");
        }
        self.tree
            .mdev_unregister(state, addr, &mut |dir| self.forget_releasing(sim, dir));
    }

    /// The mdev core's `create_store` then `mdev_device_create`, checks in
    /// their order. A refused write changes nothing and is recorded.
    fn mdev_create_store(
        &self,
        state: &mut State,
        sim: &mut Sim,
        path: &Path,
        parent: &str,
        type_id: &str,
        written: &str,
    ) {
        // `create_store` checks the length, then `guid_parse` the first 36.
        let text = written.get(..36).unwrap_or(written);
        let result = if !matches!(written.len(), 36 | 37) || !fakesys::is_uuid(text) {
            Err(Errno::EINVAL)
        } else if state.mdev(text).is_some() {
            Err(Errno::EEXIST)
        } else {
            match state.mdev_available(parent, type_id) {
                // Its directory is gone: the write could not have reached it.
                None => Err(Errno::ENODEV),
                Some(0) => Err(MDEV_NO_INSTANCE_ERRNO),
                Some(_) => Ok(()),
            }
        };
        if let Err(errno) = result {
            dbg_log!(
                self,
                "{parent}: create {type_id} <- {written:?} refused: {errno}"
            );
            sim.refused
                .push((self.display(path), written.to_string(), errno));
            return;
        }
        let uuid = text.to_ascii_lowercase();
        let created = self
            .tree
            .mdev_create(state, parent, type_id, &uuid, &mut |staged, dest| {
                self.watch_staged_mdev_dir(sim, staged, dest)
            });
        match created {
            Ok(group) => dbg_log!(
                self,
                "{parent}: mdev {uuid} of {type_id} made, group {group}"
            ),
            Err(e) => eprintln!("simkernel: {parent}: cannot make mdev {uuid}: {e}"),
        }
    }

    /// The mdev core's `remove_store`: `kstrtoul`; 0 does nothing.
    fn mdev_remove_store(
        &self,
        state: &mut State,
        sim: &mut Sim,
        path: &Path,
        uuid: &str,
        written: &str,
    ) {
        let text = written.strip_suffix('\n').unwrap_or(written);
        match parse_kernel_u64(text) {
            None => {
                dbg_log!(self, "mdev {uuid}: remove <- {written:?} refused: EINVAL");
                sim.refused
                    .push((self.display(path), written.to_string(), Errno::EINVAL));
            }
            Some(0) => {}
            Some(_) => {
                dbg_log!(self, "mdev {uuid} removed");
                self.tree
                    .mdev_destroy(state, uuid, &mut |dir| self.forget_releasing(sim, dir));
            }
        }
    }
}

/// `kstrtoull(text, 0)`: decimal, `0x` hex or `0` octal, an optional `+`.
fn parse_kernel_u64(text: &str) -> Option<u64> {
    let t = text.strip_prefix('+').unwrap_or(text);
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// `kstrtouint(text, 0)`: as [`parse_kernel_u64`], in range.
fn parse_kernel_u32(text: &str) -> Option<u32> {
    parse_kernel_u64(text).and_then(|v| u32::try_from(v).ok())
}

/// `kstrtou16(text, 0)`: as [`parse_kernel_u32`], in range.
fn parse_kernel_u16(text: &str) -> Option<u16> {
    parse_kernel_u32(text).and_then(|v| u16::try_from(v).ok())
}

/// `kstrtobool`: y/Y/1/on true, n/N/0/off false.
fn parse_kernel_bool(text: &str) -> Option<bool> {
    match text.as_bytes() {
        [b'y' | b'Y' | b'1', ..] => Some(true),
        [b'n' | b'N' | b'0', ..] => Some(false),
        [b'o' | b'O', b'n' | b'N', ..] => Some(true),
        [b'o' | b'O', b'f' | b'F', ..] => Some(false),
        _ => None,
    }
}

fn attr_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Is a writer stuck yet?
// ---------------------------------------------------------------------------

/// True if task `/proc/<pid>/task/<tid>` is blocked in `open()` of a FIFO
/// with no reader, which is where [`SimKernel::hang_write`] keeps writers.
fn task_blocked_in_fifo_open(task: &Path) -> bool {
    match fs::read_to_string(task.join("wchan")) {
        Ok(w) if w.trim() == "wait_for_partner" => true,
        Ok(w) if !w.is_empty() && w.trim() != "0" => false,
        // wchan hidden: fall back to "sleeping in open/openat".
        _ => {
            let sleeping = fs::read_to_string(task.join("stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.trim_start().chars().next()?;
                    Some(after == 'S')
                })
                .unwrap_or(false);
            #[cfg(target_arch = "x86_64")]
            const OPEN: &[&str] = &["2", "257", "437"];
            #[cfg(not(target_arch = "x86_64"))]
            const OPEN: &[&str] = &["56", "437"];
            let in_open = fs::read_to_string(task.join("syscall"))
                .ok()
                .and_then(|s| s.split_whitespace().next().map(|n| OPEN.contains(&n)))
                .unwrap_or(false);
            sleeping && in_open
        }
    }
}

/// True if some thread of process `pid` (e.g. a vfiod child process) is
/// blocked writing an attribute armed with [`SimKernel::hang_write`] (more
/// precisely: blocked opening any FIFO that has no reader).
pub fn process_blocked_in_fifo_open(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().any(|t| task_blocked_in_fifo_open(&t.path())))
        .unwrap_or(false)
}

/// Like [`process_blocked_in_fifo_open`] for one thread of this process
/// (its id from `nix::unistd::gettid()`).
pub fn thread_blocked_in_fifo_open(tid: i32) -> bool {
    task_blocked_in_fifo_open(Path::new(&format!("/proc/self/task/{tid}")))
}

// ---------------------------------------------------------------------------
// Hook: follow builder changes
// ---------------------------------------------------------------------------

struct SimHook {
    shared: Weak<Shared>,
}

impl Hook for SimHook {
    fn device_added(&self, _tree: &Tree, _state: &mut State, _addr: &str, dir: &Path) {
        if let Some(sh) = self.shared.upgrade() {
            let mut sim = lock(&sh.sim);
            if let Err(e) = sh.setup_device_dir(&mut sim, dir) {
                eprintln!("simkernel: cannot watch {}: {e}", dir.display());
            }
        }
    }

    fn device_removing(&self, _tree: &Tree, _state: &mut State, _addr: &str, dir: &Path) {
        if let Some(sh) = self.shared.upgrade() {
            let mut sim = lock(&sh.sim);
            sh.forget_under(&mut sim, dir);
        }
    }

    fn driver_added(&self, _tree: &Tree, state: &mut State, name: &str) {
        if let Some(sh) = self.shared.upgrade() {
            let mut sim = lock(&sh.sim);
            if let Err(e) = sh.setup_driver_dir(&mut sim, name) {
                eprintln!("simkernel: cannot set up driver {name}: {e}");
            }
            sh.driver_registered(state, &mut sim, name);
        }
    }

    fn driver_removing(&self, tree: &Tree, _state: &mut State, name: &str) {
        if let Some(sh) = self.shared.upgrade() {
            let mut sim = lock(&sh.sim);
            sh.forget_under(&mut sim, &tree.driver_dir(name));
        }
    }

    fn mdev_dir_staged(&self, _tree: &Tree, staged: &Path, dest: &Path) {
        if let Some(sh) = self.shared.upgrade() {
            let mut sim = lock(&sh.sim);
            sh.watch_staged_mdev_dir(&mut sim, staged, dest);
        }
    }

    fn mdev_dir_removing(&self, _tree: &Tree, dir: &Path) {
        if let Some(sh) = self.shared.upgrade() {
            let mut sim = lock(&sh.sim);
            sh.forget_releasing(&mut sim, dir);
        }
    }
}

// ---------------------------------------------------------------------------
// The thread
// ---------------------------------------------------------------------------

fn set_nonblocking(inotify: &Inotify, on: bool) {
    if let Ok(bits) = fcntl(inotify, FcntlArg::F_GETFL) {
        let mut flags = OFlag::from_bits_truncate(bits);
        flags.set(OFlag::O_NONBLOCK, on);
        let _ = fcntl(inotify, FcntlArg::F_SETFL(flags));
    }
}

fn run(fs: FakeSys, sh: Arc<Shared>) {
    let mut pending: VecDeque<InotifyEvent> = VecDeque::new();
    while !sh.stop.load(Ordering::SeqCst) {
        set_nonblocking(&sh.inotify, false);
        match sh.inotify.read_events() {
            Ok(evs) => pending.extend(evs),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                dbg_log!(sh, "inotify read: {e}");
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        }
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        loop {
            set_nonblocking(&sh.inotify, true);
            while let Ok(evs) = sh.inotify.read_events() {
                if evs.is_empty() {
                    break;
                }
                pending.extend(evs);
            }
            let mut state = fs.lock_state();
            let mut sim = lock(&sh.sim);
            if pending.is_empty() {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    sh.flush(&mut state, &mut sim)
                }));
                if result.is_err() {
                    eprintln!("simkernel: internal error while flushing (ignored)");
                }
                let seen = sim.marker_seen;
                drop(sim);
                drop(state);
                let mut idle = lock(&sh.idle);
                if seen > *idle {
                    *idle = seen;
                    sh.idle_cv.notify_all();
                }
                break;
            }
            while let Some(ev) = pending.pop_front() {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    sh.handle_event(&mut state, &mut sim, &ev)
                }));
                if result.is_err() {
                    eprintln!("simkernel: internal error on {ev:?} (ignored)");
                }
            }
        }
    }
}
