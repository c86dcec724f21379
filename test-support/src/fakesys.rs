//! A fake sysfs + devfs tree with the kernel's exact PCI layout, built in a
//! fresh temporary directory.
//!
//! Layout (R = `FakeSys::sysfs`, D = `FakeSys::devfs`, both inside one
//! temporary directory):
//!
//! ```text
//! R/devices/pci0000:00/<addr>/                    device dir (bridged devices nest in their bridge's dir)
//!     vendor device subsystem_vendor subsystem_device class revision
//!     modalias driver_override enable numa_node irq
//!     driver      -> ../../../bus/pci/drivers/<name>        (only when bound)
//!     iommu_group -> ../../../kernel/iommu_groups/<N>       (only with a group)
//!     subsystem   -> ../../../bus/pci
//! R/bus/pci/devices/<addr>        -> ../../../devices/pci0000:00/.../<addr>
//! R/bus/pci/drivers/<name>/{bind,unbind,new_id,remove_id}
//! R/bus/pci/drivers/<name>/<addr> -> ../../../../devices/pci0000:00/.../<addr>
//! R/bus/pci/{drivers_probe,rescan,drivers_autoprobe}
//! R/kernel/iommu_groups/<N>/devices/<addr> -> ../../../../devices/...
//! R/kernel/iommu_groups/<N>/type
//! R/module/vfio_pci/               (iff vfio-pci is "loaded")
//! D/vfio/vfio                      (iff vfio-pci is "loaded")
//! D/vfio/<N>                       (while a device of group N is on vfio-pci)
//! <device dir>/<rel>/{uevent,dev,subsystem}   class devices (add_class_device:
//!     drm/card0, graphics/fb0, net/eth0, nvme/nvme0/nvme0n1, ...)
//! R/class/<subsystem>/<name>       -> the class device's directory
//! R/class/vtconsole/vtcon<N>/{name,bind}      (add_vtconsole)
//! ```
//!
//! Every symlink is relative, like the kernel's, so `read_link` +
//! `file_name()` yields the driver name / group number and `canonicalize`
//! lands on the device directory.
//!
//! The builder itself is static: writing `unbind` does nothing until a
//! `SimKernel` (see `simkernel.rs`) is started on the tree.
//!
//! All mutations of the tree (builder calls and the simulated kernel's
//! reactions) happen under one lock, so a test may call `add_device` /
//! `remove_device` while a simulated kernel is running.
//!
//! SAFETY: nothing here ever touches the real `/sys`: every tree lives in a
//! fresh directory under `std::env::temp_dir()` (or a caller-given base), and
//! a root that resolves to `/sys` or anything under it is refused with a
//! panic before anything is created. Every write helper also asserts that its
//! target lies inside the tree's temporary directory.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Name of the vfio-pci driver directory.
pub const VFIO_PCI: &str = "vfio-pci";
/// Write-only attribute files of a driver directory.
pub const DRIVER_ATTRS: [&str; 4] = ["bind", "unbind", "new_id", "remove_id"];
/// Write-only attribute files of `bus/pci`.
pub const BUS_ATTRS: [&str; 2] = ["drivers_probe", "rescan"];

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Safety check
// ---------------------------------------------------------------------------

/// Resolves `path` as far as it exists (symlinks included), keeping any
/// non-existent tail as written.
fn resolve_lenient(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut existing = abs.clone();
    let mut tail: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(canon) = fs::canonicalize(&existing) {
            let mut out = canon;
            for part in tail.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Panics if `path` is, or resolves to, the real `/sys` or anything under it.
/// Checked both literally (after removing `.`/`..`) and after resolving
/// symlinks.
pub fn assert_not_real_sysfs(path: &Path) {
    let mut literal = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                literal.pop();
            }
            Component::CurDir => {}
            other => literal.push(other.as_os_str()),
        }
    }
    let resolved = resolve_lenient(path);
    for candidate in [&literal, &resolved] {
        if candidate.starts_with("/sys") {
            panic!(
                "fakesys: REFUSING to use {} (resolves to {}): it is the real /sys or under it; \
                 fake trees must live in a fresh temporary directory",
                path.display(),
                candidate.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// TempDir
// ---------------------------------------------------------------------------

/// A fresh, uniquely named directory, removed (recursively) on drop unless
/// the environment has `VFIOD_KEEP_TMP=1`, in which case its path is printed
/// to stderr and it is kept for inspection.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh directory under `std::env::temp_dir()`.
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A fresh directory under `base` (which must not be `/sys`).
    pub fn new_in(base: &Path, prefix: &str) -> io::Result<TempDir> {
        assert_not_real_sysfs(base);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for _ in 0..1000 {
            let name = format!("{prefix}-{}-{}-{nanos:x}", std::process::id(), unique());
            let candidate = base.join(name);
            assert_not_real_sysfs(&candidate);
            match fs::create_dir(&candidate) {
                Ok(()) => {
                    let path = fs::canonicalize(&candidate)?;
                    assert_not_real_sysfs(&path);
                    return Ok(TempDir { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not find a fresh temporary directory name",
        ))
    }

    /// The canonical path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn keep() -> bool {
        std::env::var("VFIOD_KEEP_TMP")
            .map(|v| v == "1")
            .unwrap_or(false)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if TempDir::keep() {
            eprintln!(
                "fakesys: keeping {} (VFIOD_KEEP_TMP=1)",
                self.path.display()
            );
            return;
        }
        // Retry: something (a daemon under test) may still be writing.
        for _ in 0..5 {
            match fs::remove_dir_all(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound && self.path.exists() => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return,
            }
        }
        eprintln!("fakesys: could not remove {}", self.path.display());
    }
}

// ---------------------------------------------------------------------------
// Device description
// ---------------------------------------------------------------------------

/// One PCI function to put in the tree.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub addr: String,
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem_device: u16,
    /// 24-bit class code, e.g. `0x030000`.
    pub class: u32,
    /// Driver bound at creation; also remembered as the device's "native"
    /// driver, which a simulated `drivers_probe` binds.
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// Address of the bridge this function sits behind (must already exist).
    pub parent: Option<String>,
    /// The kernel's `reset_method` list, e.g. "flr pm bus"; `None` or empty:
    /// no reset method, so no `reset` and `reset_method` attributes.
    pub reset_methods: Option<String>,
}

impl DeviceSpec {
    pub fn new(addr: &str, vendor: u16, device: u16, class: u32) -> Self {
        DeviceSpec {
            addr: addr.to_string(),
            vendor,
            device,
            subsystem_vendor: vendor,
            subsystem_device: 0,
            class,
            driver: None,
            iommu_group: None,
            parent: None,
            reset_methods: None,
        }
    }

    pub fn reset_methods(mut self, methods: &str) -> Self {
        self.reset_methods = Some(methods.to_string());
        self
    }

    /// The first 64 bytes of config space (type 0 header): IDs, class,
    /// subsystem IDs, little-endian as the `config` attribute shows them.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 64];
        c[0..2].copy_from_slice(&self.vendor.to_le_bytes());
        c[2..4].copy_from_slice(&self.device.to_le_bytes());
        c[8] = 0xa1;
        c[9] = (self.class & 0xff) as u8;
        c[10] = ((self.class >> 8) & 0xff) as u8;
        c[11] = ((self.class >> 16) & 0xff) as u8;
        c[0x2c..0x2e].copy_from_slice(&self.subsystem_vendor.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&self.subsystem_device.to_le_bytes());
        c
    }

    pub fn driver(mut self, d: &str) -> Self {
        self.driver = Some(d.to_string());
        self
    }

    pub fn group(mut self, g: u32) -> Self {
        self.iommu_group = Some(g);
        self
    }

    pub fn parent(mut self, bridge: &str) -> Self {
        self.parent = Some(bridge.to_string());
        self
    }

    pub fn subsystem(mut self, v: u16, d: u16) -> Self {
        self.subsystem_vendor = v;
        self.subsystem_device = d;
        self
    }

    /// The modalias line the kernel would show (with trailing newline).
    pub fn modalias(&self) -> String {
        format!(
            "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}\n",
            self.vendor,
            self.device,
            self.subsystem_vendor,
            self.subsystem_device,
            (self.class >> 16) & 0xff,
            (self.class >> 8) & 0xff,
            self.class & 0xff
        )
    }
}

// ---------------------------------------------------------------------------
// Tree: path-level primitives (no locking)
// ---------------------------------------------------------------------------

/// Path-level operations on the tree. They do not lock: callers hold the
/// state lock (`FakeSys::lock_state`). Used by `FakeSys` and by the
/// simulated kernel.
#[derive(Clone, Debug)]
pub struct Tree {
    /// Canonical temporary directory holding everything.
    pub root: PathBuf,
    pub sysfs: PathBuf,
    pub devfs: PathBuf,
    /// Where files are prepared before being renamed into place (so that
    /// our own writes never raise IN_CLOSE_WRITE in watched directories).
    pub scratch: PathBuf,
    /// Free for the simulated kernel's control files.
    pub ctl: PathBuf,
}

/// Relative path from directory `from_dir` to `to` (both absolute, real).
pub fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from_dir.components().collect();
    let dest: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(dest.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &dest[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// True for a full PCI address such as `0000:01:00.0`.
pub fn is_pci_addr(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

impl Tree {
    /// Panics unless `path` lies inside this tree's temporary directory.
    pub fn assert_inside(&self, path: &Path) {
        assert_not_real_sysfs(path);
        let lexical_ok = path.starts_with(&self.root)
            && !path.components().any(|c| matches!(c, Component::ParentDir));
        assert!(
            lexical_ok,
            "fakesys: refusing to touch {} outside the fake tree {}",
            path.display(),
            self.root.display()
        );
    }

    pub fn bus_link(&self, addr: &str) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(addr)
    }

    /// The physical device directory (resolved through `bus/pci/devices`).
    pub fn device_dir(&self, addr: &str) -> Option<PathBuf> {
        let p = fs::canonicalize(self.bus_link(addr)).ok()?;
        p.is_dir().then_some(p)
    }

    pub fn driver_dir(&self, name: &str) -> PathBuf {
        self.sysfs.join("bus/pci/drivers").join(name)
    }

    pub fn group_dir(&self, group: u32) -> PathBuf {
        self.sysfs
            .join("kernel/iommu_groups")
            .join(group.to_string())
    }

    pub fn vfio_node(&self, group: u32) -> PathBuf {
        self.devfs.join("vfio").join(group.to_string())
    }

    pub fn driver_loaded(&self, name: &str) -> bool {
        self.driver_dir(name).is_dir()
    }

    fn link_name(path: &Path) -> Option<String> {
        let target = fs::read_link(path).ok()?;
        Some(target.file_name()?.to_str()?.to_string())
    }

    pub fn driver_of(&self, addr: &str) -> Option<String> {
        Tree::link_name(&self.bus_link(addr).join("driver"))
    }

    pub fn group_of(&self, addr: &str) -> Option<u32> {
        Tree::link_name(&self.bus_link(addr).join("iommu_group"))?
            .parse()
            .ok()
    }

    /// Parses a `driver_override` file content: `None` for "(null)"/empty.
    pub fn parse_override(content: &str) -> Option<String> {
        let v = content.strip_suffix('\n').unwrap_or(content);
        (!v.is_empty() && v != "(null)").then(|| v.to_string())
    }

    pub fn override_of(&self, addr: &str) -> Option<String> {
        let content = fs::read_to_string(self.bus_link(addr).join("driver_override")).ok()?;
        Tree::parse_override(&content)
    }

    /// Addresses listed in `bus/pci/devices`, sorted.
    pub fn devices(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.sysfs.join("bus/pci/devices"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| is_pci_addr(n))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Addresses of the devices in IOMMU group `group`, sorted.
    pub fn group_members(&self, group: u32) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.group_dir(group).join("devices"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// A path in the scratch directory, unique in the process.
    pub fn scratch_path(&self) -> PathBuf {
        self.scratch.join(format!("s{}", unique()))
    }

    /// Creates `dest` (which must not exist) holding `content`, such that no
    /// file description ever opened refers to the name `dest`.
    ///
    /// Why: a process forked by another thread while we have a file open
    /// inherits the descriptor and closes it later (at exec). That close
    /// raises IN_CLOSE_WRITE in the directory of the name the file was
    /// opened by, which would look like a client write to a simulated
    /// kernel if that directory is (or becomes) watched. So files are
    /// written under a scratch name, hard-linked to `dest`, and the scratch
    /// name is removed.
    pub fn stage_file(&self, dest: &Path, content: &str) -> io::Result<()> {
        self.stage_bytes(dest, content.as_bytes())
    }

    /// [`Tree::stage_file`] for binary content (`config`).
    pub fn stage_bytes(&self, dest: &Path, content: &[u8]) -> io::Result<()> {
        let tmp = self.scratch_path();
        fs::write(&tmp, content)?;
        let linked = fs::hard_link(&tmp, dest);
        let _ = fs::remove_file(&tmp);
        linked
    }

    /// Replaces `path` with a regular file holding `content`, atomically
    /// (staged in the scratch dir, then renamed), so no IN_CLOSE_WRITE is
    /// ever raised in `path`'s directory (see [`Tree::stage_file`]).
    pub fn write_file(&self, path: &Path, content: &str) -> io::Result<()> {
        self.write_bytes(path, content.as_bytes())
    }

    /// [`Tree::write_file`] for binary content.
    pub fn write_bytes(&self, path: &Path, content: &[u8]) -> io::Result<()> {
        self.assert_inside(path);
        let tmp = self.scratch_path();
        self.stage_bytes(&tmp, content)?;
        if path.is_dir() && !path.is_symlink() {
            let _ = fs::remove_dir(path);
        }
        fs::rename(&tmp, path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Replaces `path` with a FIFO (created in scratch, then renamed).
    pub fn make_fifo(&self, path: &Path) -> io::Result<()> {
        self.assert_inside(path);
        let tmp = self.scratch_path();
        nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(io::Error::from)?;
        if path.is_dir() && !path.is_symlink() {
            let _ = fs::remove_dir(path);
        }
        fs::rename(&tmp, path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Creates (or replaces) `link` as a relative symlink to `target`.
    pub fn symlink(&self, link: &Path, target: &Path) -> io::Result<()> {
        self.assert_inside(link);
        self.assert_inside(target);
        let dir = link.parent().expect("link has a parent");
        let rel = relative_path(dir, target);
        if fs::symlink_metadata(link).is_ok() {
            fs::remove_file(link)?;
        }
        std::os::unix::fs::symlink(rel, link)
    }

    /// Removes a file or symlink; a missing one is fine.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        self.assert_inside(path);
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn mkdir(&self, path: &Path) -> io::Result<()> {
        self.assert_inside(path);
        fs::create_dir_all(path)
    }

    /// Creates the driver directory with its attribute files (regular,
    /// empty). Returns true if it was created, false if it existed.
    pub fn create_driver_dir(&self, name: &str) -> io::Result<bool> {
        let dir = self.driver_dir(name);
        if dir.is_dir() {
            return Ok(false);
        }
        self.assert_inside(&dir);
        // Build it in scratch and rename it in, so that the directory
        // appears complete.
        let tmp = self.scratch_path();
        fs::create_dir(&tmp)?;
        for attr in DRIVER_ATTRS {
            self.stage_file(&tmp.join(attr), "")?;
        }
        self.stage_file(&tmp.join("uevent"), "")?;
        fs::rename(&tmp, &dir)?;
        if name == VFIO_PCI {
            let module = self.sysfs.join("module/vfio_pci");
            if module.is_dir() {
                self.symlink(&dir.join("module"), &module)?;
            }
        }
        Ok(true)
    }

    /// Links `addr` to `driver` (device `driver` link + driver's `<addr>`
    /// link); for vfio-pci also creates `D/vfio/<group>`. Does not check
    /// anything; callers decide whether the kernel would bind.
    pub fn bind(&self, addr: &str, driver: &str) -> io::Result<()> {
        let dev = self
            .device_dir(addr)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no device {addr}")))?;
        let ddir = self.driver_dir(driver);
        if !ddir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no driver {driver}"),
            ));
        }
        self.symlink(&ddir.join(addr), &dev)?;
        self.symlink(&dev.join("driver"), &ddir)?;
        if driver == VFIO_PCI {
            if let Some(g) = self.group_of(addr) {
                let node = self.vfio_node(g);
                self.mkdir(node.parent().expect("vfio dir"))?;
                if !node.exists() {
                    self.write_file(&node, "")?;
                }
            }
        }
        Ok(())
    }

    /// Unlinks `addr` from its driver; removes `D/vfio/<group>` when it was
    /// the last device of its group on vfio-pci. Returns the old driver.
    pub fn unbind(&self, addr: &str) -> io::Result<Option<String>> {
        let Some(driver) = self.driver_of(addr) else {
            return Ok(None);
        };
        if let Some(dev) = self.device_dir(addr) {
            self.remove(&dev.join("driver"))?;
        }
        self.remove(&self.driver_dir(&driver).join(addr))?;
        if driver == VFIO_PCI {
            if let Some(g) = self.group_of(addr) {
                let still = self
                    .group_members(g)
                    .iter()
                    .any(|m| m != addr && self.driver_of(m).as_deref() == Some(VFIO_PCI));
                if !still {
                    self.remove(&self.vfio_node(g))?;
                }
            }
        }
        Ok(Some(driver))
    }
}

// ---------------------------------------------------------------------------
// Hooks for a simulated kernel
// ---------------------------------------------------------------------------

/// Callbacks a simulated kernel registers to follow builder changes. All are
/// called with the state lock held.
pub trait Hook: Send + Sync {
    /// A device directory was created and populated (its `bus/pci/devices`
    /// link is created right after).
    fn device_added(&self, tree: &Tree, state: &mut State, addr: &str, dir: &Path);
    /// A device directory is about to be removed.
    fn device_removing(&self, tree: &Tree, state: &mut State, addr: &str, dir: &Path);
    /// A driver directory was created (its attribute files are regular).
    fn driver_added(&self, tree: &Tree, state: &mut State, name: &str);
    /// A driver directory is about to be removed.
    fn driver_removing(&self, tree: &Tree, state: &mut State, name: &str);
}

/// Mutable state shared by the builder and a simulated kernel.
pub struct State {
    /// The driver each device had when added ("native"); `None` = none.
    pub native: HashMap<String, Option<String>>,
    /// Each device's healthy config space, which a good reset restores.
    pub config: HashMap<String, Vec<u8>>,
    pub hook: Option<Arc<dyn Hook>>,
}

struct Inner {
    tree: Tree,
    state: Mutex<State>,
    // Last: removed after everything else is dropped.
    _tmp: TempDir,
}

// ---------------------------------------------------------------------------
// FakeSys
// ---------------------------------------------------------------------------

/// A fake sysfs (`sysfs`) and devfs (`devfs`) in a fresh temporary
/// directory, removed when the last handle (this or a `SimKernel` on it)
/// is dropped.
pub struct FakeSys {
    pub sysfs: PathBuf,
    pub devfs: PathBuf,
    inner: Arc<Inner>,
}

impl Default for FakeSys {
    fn default() -> Self {
        FakeSys::new()
    }
}

impl FakeSys {
    /// An empty tree: `bus/pci/{devices,drivers}`, `drivers_probe`,
    /// `rescan`, `kernel/iommu_groups`, `module`, an empty devfs. vfio-pci
    /// is not loaded.
    pub fn new() -> FakeSys {
        let tmp = TempDir::new("vfiod-fakesys").expect("fakesys: create temporary directory");
        FakeSys::build(tmp)
    }

    /// Like [`FakeSys::new`], but the fresh temporary directory is created
    /// under `base`. Panics if `base` is (or resolves to) `/sys` or below.
    pub fn new_in(base: &Path) -> FakeSys {
        assert_not_real_sysfs(base);
        let tmp =
            TempDir::new_in(base, "vfiod-fakesys").expect("fakesys: create temporary directory");
        FakeSys::build(tmp)
    }

    fn build(tmp: TempDir) -> FakeSys {
        let root = tmp.path().to_path_buf();
        assert_not_real_sysfs(&root);
        let tree = Tree {
            sysfs: root.join("sys"),
            devfs: root.join("dev"),
            scratch: root.join("scratch"),
            ctl: root.join("ctl"),
            root,
        };
        for dir in [
            tree.sysfs.join("devices/pci0000:00"),
            tree.sysfs.join("bus/pci/devices"),
            tree.sysfs.join("bus/pci/drivers"),
            tree.sysfs.join("bus/pci/slots"),
            tree.sysfs.join("kernel/iommu_groups"),
            tree.sysfs.join("module"),
            tree.devfs.clone(),
            tree.scratch.clone(),
            tree.ctl.clone(),
        ] {
            tree.mkdir(&dir).expect("fakesys: mkdir");
        }
        for attr in BUS_ATTRS {
            tree.write_file(&tree.sysfs.join("bus/pci").join(attr), "")
                .expect("fakesys: bus attr");
        }
        tree.write_file(&tree.sysfs.join("bus/pci/drivers_autoprobe"), "1\n")
            .expect("fakesys: drivers_autoprobe");
        FakeSys {
            sysfs: tree.sysfs.clone(),
            devfs: tree.devfs.clone(),
            inner: Arc::new(Inner {
                tree,
                state: Mutex::new(State {
                    native: HashMap::new(),
                    config: HashMap::new(),
                    hook: None,
                }),
                _tmp: tmp,
            }),
        }
    }

    /// A typical host, vfio-pci loaded (addresses named in
    /// [`crate::standard`]):
    ///
    /// | addr | ids | class | driver | group |
    /// |------|-----|-------|--------|-------|
    /// | 0000:00:00.0 host bridge | 8086:1237 | 060000 | - | 0 |
    /// | 0000:00:01.0 root port | 8086:7c10 | 060400 | pcieport | 1 |
    /// | 0000:01:00.0 (behind 00:01.0) GPU | 10de:2236 sub 10de:1482 | 030200 | nvidia | 1 |
    /// | 0000:01:00.1 (behind 00:01.0) GPU audio | 10de:1aef | 040300 | snd_hda_intel | 1 |
    /// | 0000:00:02.0 NIC | 8086:10d3 | 020000 | e1000e | 2 |
    /// | 0000:00:03.0 edu | 1234:11e8 | 00ff00 | - | 3 |
    /// | 0000:00:04.0 Tesla T4 | 10de:1eb8 | 030200 | vfio-pci | 4 (/dev/vfio/4) |
    /// | 0000:00:05.0 AMD GPU | 1002:73bf | 030000 | amdgpu | 5 |
    /// | 0000:00:06.0 NVMe | 144d:a808 | 010802 | nvme | 6 |
    pub fn standard_host() -> FakeSys {
        FakeSys::with_devices(FakeSys::standard_devices())
    }

    /// A host with vfio-pci loaded and `specs`, added in that order.
    pub fn with_devices(specs: impl IntoIterator<Item = DeviceSpec>) -> FakeSys {
        let fs = FakeSys::new();
        fs.load_vfio();
        for spec in specs {
            fs.add_device(spec);
        }
        fs
    }

    /// The standard host's device at `addr` (one of [`crate::standard`]).
    #[track_caller]
    pub fn standard_device(addr: &str) -> DeviceSpec {
        FakeSys::standard_devices()
            .into_iter()
            .find(|spec| spec.addr == addr)
            .unwrap_or_else(|| panic!("the standard host has no device at {addr}"))
    }

    /// The devices of [`FakeSys::standard_host`], in creation order.
    pub fn standard_devices() -> Vec<DeviceSpec> {
        use crate::standard::*;
        vec![
            DeviceSpec::new(HOST_BRIDGE, 0x8086, 0x1237, 0x060000)
                .subsystem(0x1af4, 0x1100)
                .group(0),
            DeviceSpec::new(ROOT_PORT, 0x8086, 0x7c10, 0x060400)
                .subsystem(0x8086, 0x7270)
                .driver("pcieport")
                .group(1),
            DeviceSpec::new(GPU, 0x10de, 0x2236, 0x030200)
                .subsystem(0x10de, 0x1482)
                .driver("nvidia")
                .group(1)
                .parent(ROOT_PORT),
            DeviceSpec::new(GPU_AUDIO, 0x10de, 0x1aef, 0x040300)
                .subsystem(0x10de, 0x1482)
                .driver("snd_hda_intel")
                .group(1)
                .parent(ROOT_PORT),
            DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
                .subsystem(0x8086, 0xa01f)
                .driver("e1000e")
                .group(2),
            DeviceSpec::new(EDU, 0x1234, 0x11e8, 0x00ff00)
                .subsystem(0x1af4, 0x1100)
                .group(3),
            DeviceSpec::new(T4, 0x10de, 0x1eb8, 0x030200)
                .subsystem(0x10de, 0x12a2)
                .driver(VFIO_PCI)
                .group(4),
            DeviceSpec::new(AMD, 0x1002, 0x73bf, 0x030000)
                .subsystem(0x1002, 0x0e3a)
                .driver("amdgpu")
                .group(5),
            DeviceSpec::new(NVME, 0x144d, 0xa808, 0x010802)
                .subsystem(0x144d, 0xa801)
                .driver("nvme")
                .group(6),
        ]
    }

    /// Path-level primitives (no locking; hold `lock_state()` around them).
    pub fn tree(&self) -> &Tree {
        &self.inner.tree
    }

    /// The lock serialising every mutation of the tree.
    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Another handle on the same tree (keeps it alive).
    pub fn share(&self) -> FakeSys {
        FakeSys {
            sysfs: self.sysfs.clone(),
            devfs: self.devfs.clone(),
            inner: Arc::clone(&self.inner),
        }
    }

    /// The temporary directory holding sysfs and devfs.
    pub fn tmp_root(&self) -> &Path {
        &self.inner.tree.root
    }

    /// `sysfs` joined with `rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.sysfs.join(rel)
    }

    /// `devfs` joined with `rel`.
    pub fn dev_path(&self, rel: &str) -> PathBuf {
        self.devfs.join(rel)
    }

    /// Hot-plugs a device: directory and attributes, bus link, group
    /// membership, driver directory if missing, driver binding.
    pub fn add_device(&self, spec: DeviceSpec) {
        assert!(
            is_pci_addr(&spec.addr),
            "fakesys: bad PCI address {:?}",
            spec.addr
        );
        let mut state = self.lock_state();
        let tree = self.tree();
        assert!(
            fs::symlink_metadata(tree.bus_link(&spec.addr)).is_err(),
            "fakesys: device {} already exists",
            spec.addr
        );
        let parent_dir = match &spec.parent {
            Some(bridge) => tree.device_dir(bridge).unwrap_or_else(|| {
                panic!(
                    "fakesys: parent bridge {bridge} of {} does not exist",
                    spec.addr
                )
            }),
            None => tree.sysfs.join("devices/pci0000:00"),
        };
        let dir = parent_dir.join(&spec.addr);
        let hex4 = |v: u16| format!("0x{v:04x}\n");
        let reset_methods = spec.reset_methods.clone().filter(|m| !m.trim().is_empty());
        let mut files: Vec<(&str, String)> = vec![
            ("vendor", hex4(spec.vendor)),
            ("device", hex4(spec.device)),
            ("subsystem_vendor", hex4(spec.subsystem_vendor)),
            ("subsystem_device", hex4(spec.subsystem_device)),
            ("class", format!("0x{:06x}\n", spec.class)),
            ("revision", "0xa1\n".to_string()),
            ("modalias", spec.modalias()),
            ("driver_override", "(null)\n".to_string()),
            (
                "enable",
                if spec.driver.is_some() { "1\n" } else { "0\n" }.to_string(),
            ),
            ("numa_node", "-1\n".to_string()),
            ("irq", format!("{}\n", 16 + (unique() % 100))),
            ("uevent", format!("PCI_SLOT_NAME={}\n", spec.addr)),
            ("power_state", "D0\n".to_string()),
        ];
        // As in Linux, `reset` and `reset_method` exist only for a function
        // with at least one reset method.
        if let Some(methods) = &reset_methods {
            files.push(("reset_method", format!("{}\n", methods.trim())));
            files.push(("reset", String::new()));
        }
        // Build the directory in scratch and rename it in, complete.
        let tmp = tree.scratch_path();
        fs::create_dir(&tmp).expect("fakesys: mkdir device");
        for (name, content) in &files {
            tree.stage_file(&tmp.join(name), content)
                .expect("fakesys: write attribute");
        }
        tree.stage_bytes(&tmp.join("config"), &spec.config_space())
            .expect("fakesys: write config");
        tree.assert_inside(&dir);
        fs::rename(&tmp, &dir).expect("fakesys: place device dir");
        tree.symlink(&dir.join("subsystem"), &tree.sysfs.join("bus/pci"))
            .expect("fakesys: subsystem link");
        if let Some(g) = spec.iommu_group {
            let gdir = tree.group_dir(g);
            tree.mkdir(&gdir.join("devices"))
                .expect("fakesys: group dir");
            if !gdir.join("type").exists() {
                tree.write_file(&gdir.join("type"), "DMA-FQ\n")
                    .expect("fakesys: group type");
            }
            tree.symlink(&gdir.join("devices").join(&spec.addr), &dir)
                .expect("fakesys: group member link");
            tree.symlink(&dir.join("iommu_group"), &gdir)
                .expect("fakesys: iommu_group link");
        }
        state.native.insert(spec.addr.clone(), spec.driver.clone());
        state.config.insert(spec.addr.clone(), spec.config_space());
        if let Some(hook) = state.hook.clone() {
            hook.device_added(tree, &mut state, &spec.addr, &dir);
        }
        tree.symlink(&tree.bus_link(&spec.addr), &dir)
            .expect("fakesys: bus link");
        if let Some(driver) = &spec.driver {
            self.add_driver_locked(&mut state, driver);
            tree.bind(&spec.addr, driver).expect("fakesys: bind");
        }
    }

    /// Hot-unplug: the device (and anything behind it, if it is a bridge)
    /// disappears: driver binding, group membership (group dir removed when
    /// empty), bus link, device dir. Panics if the device does not exist.
    pub fn remove_device(&self, addr: &str) {
        let mut state = self.lock_state();
        let tree = self.tree();
        let dir = tree
            .device_dir(addr)
            .unwrap_or_else(|| panic!("fakesys: remove_device: no device {addr}"));
        self.remove_device_locked(&mut state, addr, &dir);
    }

    fn remove_device_locked(&self, state: &mut State, addr: &str, dir: &Path) {
        let tree = self.tree();
        // Children first (functions behind a bridge).
        let mut children: Vec<(String, PathBuf)> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
                    .filter(|(n, _)| is_pci_addr(n))
                    .collect()
            })
            .unwrap_or_default();
        children.sort();
        for (child, cdir) in children {
            self.remove_device_locked(state, &child, &cdir);
        }
        if let Some(hook) = state.hook.clone() {
            hook.device_removing(tree, state, addr, dir);
        }
        tree.unbind(addr).expect("fakesys: unbind on removal");
        if let Some(g) = tree.group_of(addr) {
            let gdir = tree.group_dir(g);
            tree.remove(&gdir.join("devices").join(addr))
                .expect("fakesys: remove group link");
            if tree.group_members(g).is_empty() {
                tree.remove(&gdir).expect("fakesys: remove group dir");
                tree.remove(&tree.vfio_node(g))
                    .expect("fakesys: remove vfio node");
            }
        }
        tree.remove(&tree.bus_link(addr))
            .expect("fakesys: remove bus link");
        tree.remove(dir).expect("fakesys: remove device dir");
        state.native.remove(addr);
        state.config.remove(addr);
    }

    /// Creates `bus/pci/drivers/<name>` (no-op if present), like loading the
    /// driver's module. With a simulated kernel running, unbound devices the
    /// driver matches are probed, as the kernel does on driver registration.
    pub fn add_driver(&self, name: &str) {
        let mut state = self.lock_state();
        self.add_driver_locked(&mut state, name);
    }

    fn add_driver_locked(&self, state: &mut State, name: &str) {
        assert!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "fakesys: bad driver name {name:?}"
        );
        let tree = self.tree();
        if tree.create_driver_dir(name).expect("fakesys: driver dir") {
            if let Some(hook) = state.hook.clone() {
                hook.driver_added(tree, state, name);
            }
        }
    }

    /// Removes a driver directory ("rmmod"). Panics if a device is bound.
    pub fn remove_driver(&self, name: &str) {
        let mut state = self.lock_state();
        self.remove_driver_locked(&mut state, name);
    }

    fn remove_driver_locked(&self, state: &mut State, name: &str) {
        let tree = self.tree();
        let dir = tree.driver_dir(name);
        if !dir.is_dir() {
            return;
        }
        let bound: Vec<String> = tree
            .devices()
            .into_iter()
            .filter(|a| tree.driver_of(a).as_deref() == Some(name))
            .collect();
        assert!(
            bound.is_empty(),
            "fakesys: cannot remove driver {name}: still bound to {bound:?}"
        );
        if let Some(hook) = state.hook.clone() {
            hook.driver_removing(tree, state, name);
        }
        tree.remove(&dir).expect("fakesys: remove driver dir");
    }

    /// "modprobe vfio-pci": `module/vfio_pci`, `bus/pci/drivers/vfio-pci`,
    /// `D/vfio/vfio`. No-op if already loaded.
    pub fn load_vfio(&self) {
        let mut state = self.lock_state();
        let tree = self.tree();
        let module = tree.sysfs.join("module/vfio_pci");
        tree.mkdir(&module.join("drivers"))
            .expect("fakesys: module dir");
        if !module.join("initstate").exists() {
            tree.write_file(&module.join("initstate"), "live\n")
                .expect("fakesys: initstate");
        }
        tree.mkdir(&tree.devfs.join("vfio"))
            .expect("fakesys: devfs vfio");
        if !tree.devfs.join("vfio/vfio").exists() {
            tree.write_file(&tree.devfs.join("vfio/vfio"), "")
                .expect("fakesys: /dev/vfio/vfio");
        }
        self.add_driver_locked(&mut state, VFIO_PCI);
    }

    /// "rmmod vfio-pci": undoes [`FakeSys::load_vfio`]. Panics if a device
    /// is still bound to vfio-pci.
    pub fn unload_vfio(&self) {
        let mut state = self.lock_state();
        self.remove_driver_locked(&mut state, VFIO_PCI);
        let tree = self.tree();
        tree.remove(&tree.sysfs.join("module/vfio_pci"))
            .expect("fakesys: remove module dir");
        tree.remove(&tree.devfs.join("vfio"))
            .expect("fakesys: remove devfs vfio");
    }

    pub fn vfio_loaded(&self) -> bool {
        self.path("module/vfio_pci").is_dir() && self.tree().driver_loaded(VFIO_PCI)
    }

    /// The driver `addr` is bound to, read from its `driver` link.
    pub fn driver_of(&self, addr: &str) -> Option<String> {
        self.tree().driver_of(addr)
    }

    /// The `driver_override` of `addr`; `None` for "(null)".
    pub fn driver_override_of(&self, addr: &str) -> Option<String> {
        self.tree().override_of(addr)
    }

    /// Sets `driver_override` directly (as prepared state, not as a write
    /// the simulated kernel sees). `None` resets it to "(null)".
    pub fn set_driver_override(&self, addr: &str, value: Option<&str>) {
        let _state = self.lock_state();
        let tree = self.tree();
        let dir = tree
            .device_dir(addr)
            .unwrap_or_else(|| panic!("fakesys: no device {addr}"));
        let content = match value {
            Some(v) => format!("{v}\n"),
            None => "(null)\n".to_string(),
        };
        tree.write_file(&dir.join("driver_override"), &content)
            .expect("fakesys: write driver_override");
    }

    /// Sets `power_state` (prepared state, e.g. "D3hot", "D3cold", "error").
    pub fn set_power_state(&self, addr: &str, value: &str) {
        let _state = self.lock_state();
        let tree = self.tree();
        let dir = tree
            .device_dir(addr)
            .unwrap_or_else(|| panic!("fakesys: no device {addr}"));
        tree.write_file(&dir.join("power_state"), &format!("{value}\n"))
            .expect("fakesys: write power_state");
    }

    /// Makes config space read all ones (a function that fell off the bus)
    /// or, with `false`, what it read when added.
    pub fn set_config_all_ones(&self, addr: &str, all_ones: bool) {
        let state = self.lock_state();
        let tree = self.tree();
        let dir = tree
            .device_dir(addr)
            .unwrap_or_else(|| panic!("fakesys: no device {addr}"));
        let good = state.config.get(addr).cloned().unwrap_or_default();
        let bytes = if all_ones {
            vec![0xff; good.len()]
        } else {
            good
        };
        tree.write_bytes(&dir.join("config"), &bytes)
            .expect("fakesys: write config");
    }

    /// The content of `reset_method`, trimmed; `None` when it has none.
    pub fn reset_method_of(&self, addr: &str) -> Option<String> {
        let dir = self.tree().device_dir(addr)?;
        fs::read_to_string(dir.join("reset_method"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// The IOMMU group of `addr`, read from its `iommu_group` link.
    pub fn iommu_group_of(&self, addr: &str) -> Option<u32> {
        self.tree().group_of(addr)
    }

    /// Members of IOMMU group `group`, sorted.
    pub fn group_members(&self, group: u32) -> Vec<String> {
        self.tree().group_members(group)
    }

    /// The driver `addr` had when it was added (what a probe binds).
    pub fn native_driver_of(&self, addr: &str) -> Option<String> {
        self.lock_state().native.get(addr).cloned().flatten()
    }

    /// Physical device directory (resolved through the bus link).
    pub fn device_dir(&self, addr: &str) -> Option<PathBuf> {
        self.tree().device_dir(addr)
    }

    /// Addresses on the bus, sorted.
    pub fn devices(&self) -> Vec<String> {
        self.tree().devices()
    }

    pub fn vfio_group_node_exists(&self, group: u32) -> bool {
        self.tree().vfio_node(group).exists()
    }

    /// Adds a class device below `addr`'s directory at `rel` (`drm/card0`,
    /// `graphics/fb0`, `net/eth0`, `nvme/nvme0/nvme0n1`), laid out as the
    /// kernel does: `uevent`, `dev` (`major:minor`) when given, a
    /// `subsystem` link to `class/<subsystem>` and the link
    /// `class/<subsystem>/<name>` back to it. Returns its directory.
    pub fn add_class_device(
        &self,
        addr: &str,
        rel: &str,
        subsystem: &str,
        dev: Option<&str>,
    ) -> PathBuf {
        let _state = self.lock_state();
        let tree = self.tree();
        let parent = tree
            .device_dir(addr)
            .unwrap_or_else(|| panic!("fakesys: no device {addr}"));
        let dir = parent.join(rel);
        let name = dir.file_name().expect("class device name").to_owned();
        let class = tree.sysfs.join("class").join(subsystem);
        tree.mkdir(&dir).expect("fakesys: class device dir");
        tree.mkdir(&class).expect("fakesys: class dir");
        tree.write_file(&dir.join("uevent"), "")
            .expect("fakesys: uevent");
        if let Some(dev) = dev {
            tree.write_file(&dir.join("dev"), &format!("{dev}\n"))
                .expect("fakesys: dev");
        }
        tree.symlink(&dir.join("subsystem"), &class)
            .expect("fakesys: subsystem link");
        tree.symlink(&class.join(name), &dir)
            .expect("fakesys: class link");
        dir
    }

    /// Writes `content` to `path` inside the tree (prepared state, not a
    /// write a simulated kernel sees), creating its directory.
    pub fn write_attr(&self, path: &Path, content: &str) {
        let _state = self.lock_state();
        let tree = self.tree();
        tree.mkdir(path.parent().expect("attribute has a parent"))
            .expect("fakesys: attribute dir");
        tree.write_file(path, content)
            .expect("fakesys: write attribute");
    }

    /// `holders/<holder>` of a block device directory: the link to the
    /// md/dm device stacked on it.
    pub fn add_block_holder(&self, block_dir: &Path, holder: &str) {
        let _state = self.lock_state();
        let tree = self.tree();
        let target = tree.sysfs.join("devices/virtual/block").join(holder);
        tree.mkdir(&target).expect("fakesys: holder dir");
        tree.mkdir(&block_dir.join("holders"))
            .expect("fakesys: holders dir");
        tree.symlink(&block_dir.join("holders").join(holder), &target)
            .expect("fakesys: holder link");
    }

    /// `class/vtconsole/vtcon<n>` with its `name` and `bind`.
    pub fn add_vtconsole(&self, n: u32, name: &str, bound: bool) {
        let dir = self.path(&format!("class/vtconsole/vtcon{n}"));
        self.write_attr(&dir.join("name"), &format!("{name}\n"));
        self.write_attr(&dir.join("bind"), if bound { "1\n" } else { "0\n" });
    }
}
