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
//! R/module/vfio_pci/parameters/enable_sriov   "N\n" / "Y\n"
//! D/vfio/vfio                      (iff vfio-pci is "loaded")
//! D/vfio/<N>                       (while a device of group N is on vfio-pci,
//!                                   or is a vGPU VF on nvidia: see below)
//! <device dir>/<rel>/{uevent,dev,subsystem}   class devices (add_class_device:
//!     drm/card0, graphics/fb0, net/eth0, nvme/nvme0/nvme0n1, ...)
//! R/class/<subsystem>/<name>       -> the class device's directory
//! R/class/vtconsole/vtcon<N>/{name,bind}      (add_vtconsole)
//! ```
//!
//! An SR-IOV physical function ([`DeviceSpec::sriov`]) also has
//!
//! ```text
//! <PF dir>/sriov_totalvfs sriov_numvfs ("0\n") sriov_drivers_autoprobe ("1\n")
//!          sriov_vf_device ("10ca\n") sriov_offset sriov_stride
//! <PF dir>/virtfn<i>  -> ../<VF addr>        (while VF i exists)
//! <VF dir>/physfn     -> ../<PF addr>
//! ```
//!
//! VF directories are siblings of the PF's (same parent), at routing ID =
//! PF's + offset + stride * i. A VF has the PF's vendor, class and
//! subsystem IDs, device ID `sriov_vf_device`, the PF's `numa_node`,
//! `reset_method` "flr", and its own new IOMMU group (the lowest free
//! number, as Linux's IDA gives) or, with [`DeviceSpec::vfs_share_group`],
//! the PF's. VFs are created and removed only by a simulated kernel
//! reacting to `sriov_numvfs` writes, by [`FakeSys::remove_device`] of the
//! PF (VFs first, a `remove` uevent each) and by [`FakeSys::reboot_sriov`]
//! (no uevents). What the kernel holds (the VF list, autoprobe) lives in
//! [`State::sriov`]; [`FakeSys::sriov_numvfs`], [`FakeSys::vfs_of`] and
//! [`FakeSys::autoprobe_of`] read it there, never from the files (a
//! `sriov_numvfs` armed with `hang_write` blocks readers).
//!
//! An NVIDIA vGPU GPU ([`DeviceSpec::vgpu`]: an SR-IOV PF whose VF driver
//! is `nvidia`, Ada/Hopper/Blackwell under R550+) gives each VF bound to
//! `nvidia` (by the simulated kernel's probe) what that driver makes:
//!
//! ```text
//! <VF dir>/nvidia/creatable_vgpu_types   "ID    : vGPU Name\n1162  : NVIDIA L40S-12Q\n..."
//! <VF dir>/nvidia/current_vgpu_type      "0\n" (0: no vGPU)
//! <VF dir>/vfio-dev/vfio<N>/{dev,uevent}  N: lowest free, as Linux's vfio cdev IDA
//! D/vfio/<VF group>                       (nvidia is the VF's VFIO provider)
//! ```
//!
//! The type set on each such VF lives in [`State::vgpu`]; the creatable
//! lists are computed from it ([`State::vgpu_creatable`]: all vGPUs of a GPU
//! share its framebuffer and its type) and rewritten on every change.
//! Unbinding the VF from `nvidia` (or removing it) takes all of it away,
//! the group node when no other member of the group still provides VFIO.
//! [`FakeSys::current_vgpu_type`] and [`FakeSys::creatable_vgpu_types`]
//! read the state, not the files.
//!
//! A legacy mdev parent ([`DeviceSpec::mdev`]: NVIDIA pre-Ada vGPU, Intel
//! GVT-g) registers with the mdev core while it is bound to its native
//! driver (the spec's `driver`; not while unbound or on vfio-pci), as
//! `drivers/vfio/mdev/mdev_sysfs.c` lays it out:
//!
//! ```text
//! <dev>/mdev_supported_types/<type>/name                "GRID P40-2Q\n"
//!                                  /description         "..."
//!                                  /device_api          "vfio-pci\n"
//!                                  /available_instances "N\n"
//!                                  /create              write-only: a UUID
//!                                  /devices/<uuid>      -> ../../../<uuid>
//! <dev>/<uuid>/mdev_type   -> ../mdev_supported_types/<type>
//!              iommu_group -> ../../../kernel/iommu_groups/<N>  (N: lowest free, a new group)
//!              driver      -> ../../../bus/mdev/drivers/<parent's driver>
//!              subsystem   -> ../../../bus/mdev
//!              remove      write-only: "1" removes the mdev
//!              uevent      "MDEV_TYPE=<type>\n"
//! R/bus/mdev/devices/<uuid>          -> the mdev's directory
//! R/bus/mdev/drivers/<name>/<uuid>   -> the mdev's directory
//! R/kernel/iommu_groups/<N>/devices/<uuid>, .../type ("unknown\n": an
//!                                   emulated IOMMU group has no domain)
//! D/vfio/<N>                         (made last: when it exists, the rest does)
//! ```
//!
//! Mdevs are created and removed only by a simulated kernel reacting to
//! writes to `create` and `remove`; they all go when the parent leaves its
//! driver (unbind, a reset that loses it, removal), and with
//! [`FakeSys::reboot_mdev`]. Resource model (NVIDIA's): all mdevs of one
//! parent are of one type; that type's `available_instances` is its
//! maximum minus the live count, every other type's 0 while the parent
//! has any ([`State::mdev_available`]). What the kernel holds lives in
//! [`State::mdev_parents`] and [`State::mdevs`]; [`FakeSys::mdevs`],
//! [`FakeSys::mdev_group`] and [`FakeSys::mdev_available_instances`] read
//! it there. No uevents are sent for mdevs (the uevent FIFO speaks of PCI
//! addresses only).
//!
//! `<tmp root>/uevents`: when a FIFO exists there (vfiod's
//! `--uevent-fifo`), VF changes are written to it as uevent lines, `add
//! ADDR`, `remove ADDR`, `bind ADDR DRIVER` ([`Tree::send_uevent`]).
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
/// The major number `vfio-dev/vfio<N>/dev` shows (dynamic in Linux).
const VFIO_CDEV_MAJOR: u32 = 511;
/// The NVIDIA driver: the VFIO provider of its vGPU VFs ([`DeviceSpec::vgpu`]).
pub const NVIDIA: &str = "nvidia";
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
    /// The `numa_node` attribute (-1: unknown, as on a one-node machine).
    pub numa_node: i32,
    /// Set for an SR-IOV physical function.
    pub sriov: Option<SriovSpec>,
    /// A VF: its Vendor and Device ID registers read 0xffff in config
    /// space, as the SR-IOV spec has them (sysfs `vendor`/`device` still
    /// say the real IDs).
    pub is_vf: bool,
    /// Legacy mdev types it offers while bound to its native driver
    /// ([`DeviceSpec::mdev`]); empty: no mdev parent.
    pub mdev_types: Vec<MdevTypeSpec>,
}

/// One legacy mdev type of a parent (see [`DeviceSpec::mdev`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdevTypeSpec {
    /// Its directory under `mdev_supported_types` ("nvidia-63", "i915-GVTg_V5_4").
    pub id: String,
    /// Its `name` ("GRID P40-2Q").
    pub name: String,
    /// Its `description`, newline included.
    pub description: String,
    /// `available_instances` while the parent has no mdev.
    pub max_instances: u32,
}

/// The SR-IOV capability of a physical function (see [`DeviceSpec::sriov`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovSpec {
    /// `sriov_totalvfs`.
    pub total_vfs: u16,
    /// The VFs' device ID (`sriov_vf_device`).
    pub vf_device: u16,
    /// `sriov_offset`: routing ID of VF 0 minus the PF's.
    pub offset: u16,
    /// `sriov_stride`: routing-ID distance between consecutive VFs.
    pub stride: u16,
    /// The native VF driver (e.g. "igbvf") a VF is probed by.
    pub vf_driver: Option<String>,
    /// Whether the PF's native driver implements `sriov_configure`.
    /// (vfio-pci's answer depends on its `enable_sriov` parameter instead.)
    pub native_driver_configures: bool,
    /// VFs join the PF's IOMMU group (a root port without ACS) instead of
    /// each getting a new one.
    pub vfs_share_group: bool,
    /// NVIDIA vGPU types its VFs can take ([`DeviceSpec::vgpu`]); empty: no
    /// vGPU.
    pub vgpu_types: Vec<VgpuTypeSpec>,
}

/// One NVIDIA vGPU type a PF's VFs can take (see [`DeviceSpec::vgpu`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VgpuTypeSpec {
    /// What `current_vgpu_type` takes (never 0: that means none).
    pub id: u32,
    /// As the driver names it, e.g. "NVIDIA L40S-12Q".
    pub name: String,
    /// How many VFs of the PF can hold this type at once: the PF's
    /// framebuffer divided by the type's (L40S-12Q on a 48 GB L40S: 4).
    pub share: u32,
}

impl Default for SriovSpec {
    /// igb's layout, no VFs.
    fn default() -> Self {
        SriovSpec {
            total_vfs: 0,
            vf_device: 0,
            offset: 128,
            stride: 2,
            vf_driver: None,
            native_driver_configures: true,
            vfs_share_group: false,
            vgpu_types: Vec::new(),
        }
    }
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
            numa_node: -1,
            sriov: None,
            is_vf: false,
            mdev_types: Vec::new(),
        }
    }

    fn sriov_mut(&mut self) -> &mut SriovSpec {
        self.sriov.get_or_insert_with(SriovSpec::default)
    }

    /// Makes the function an SR-IOV PF with `total_vfs` VFs of device ID
    /// `vf_device`, at igb's offset 128 and stride 2 (PF 0000:0b:00.0 has
    /// VFs 0000:0b:10.0, 0b:10.2, ...). The other SR-IOV settings may be
    /// given before or after this.
    pub fn sriov(mut self, total_vfs: u16, vf_device: u16) -> Self {
        let s = self.sriov_mut();
        s.total_vfs = total_vfs;
        s.vf_device = vf_device;
        self
    }

    /// `sriov_offset` and `sriov_stride` (default 128 and 2).
    pub fn sriov_layout(mut self, offset: u16, stride: u16) -> Self {
        let s = self.sriov_mut();
        s.offset = offset;
        s.stride = stride;
        self
    }

    /// The native VF driver (e.g. "igbvf") that probes a VF. A simulated
    /// kernel loads it when it creates VFs, as udev would from the VF's
    /// modalias.
    pub fn vf_driver(mut self, name: &str) -> Self {
        self.sriov_mut().vf_driver = Some(name.to_string());
        self
    }

    /// Whether the PF's native driver implements `sriov_configure`
    /// (default: it does). vfio-pci does only while
    /// `module/vfio_pci/parameters/enable_sriov` reads "Y"
    /// ([`FakeSys::set_vfio_enable_sriov`]); any other driver never does.
    pub fn sriov_capable_driver(mut self, capable: bool) -> Self {
        self.sriov_mut().native_driver_configures = capable;
        self
    }

    /// VFs join the PF's IOMMU group (behind a root port without ACS).
    /// Default: each VF gets a new group, the lowest free number.
    pub fn vfs_share_group(mut self) -> Self {
        self.sriov_mut().vfs_share_group = true;
        self
    }

    /// Makes the PF an NVIDIA vGPU GPU (Ada, Hopper, Blackwell under driver
    /// R550 and later): its VF driver is `nvidia`, which is also their VFIO
    /// provider, and a VF bound to it can take one of `types`, each given as
    /// (ID, name, share): the type's ID in `current_vgpu_type`, its name as
    /// `creatable_vgpu_types` shows it ("NVIDIA L40S-12Q"), and how many VFs
    /// of the PF can hold it at once (its framebuffer share: 4 for L40S-12Q
    /// on a 48 GB board). What a simulated kernel makes of it is in its
    /// module docs. Panics on an ID of 0, a share of 0 or a repeated ID.
    pub fn vgpu(mut self, types: &[(u32, &str, u32)]) -> Self {
        let mut seen = std::collections::HashSet::new();
        for &(id, name, share) in types {
            assert!(id != 0, "fakesys: vGPU type {name:?}: ID 0 means no type");
            assert!(share != 0, "fakesys: vGPU type {name:?}: share 0");
            assert!(seen.insert(id), "fakesys: vGPU type ID {id} given twice");
        }
        let s = self.sriov_mut();
        s.vf_driver = Some(NVIDIA.to_string());
        s.vgpu_types = types
            .iter()
            .map(|&(id, name, share)| VgpuTypeSpec {
                id,
                name: name.to_string(),
                share,
            })
            .collect();
        self
    }

    /// Makes the function a legacy mdev parent (NVIDIA pre-Ada vGPU, Intel
    /// GVT-g) offering `types`, each (type directory, name, maximum
    /// instances), e.g. `("nvidia-63", "GRID P40-2Q", 12)`. It is a parent
    /// only while bound to its native driver (the spec's `driver`, which
    /// must be set and not vfio-pci); what a simulated kernel makes of it
    /// is in the module docs. Panics on an empty or repeated type
    /// directory, one with a `/`, or a maximum of 0.
    pub fn mdev(mut self, types: &[(&str, &str, u32)]) -> Self {
        let mut seen = std::collections::HashSet::new();
        for &(id, name, max) in types {
            assert!(
                !id.is_empty() && !id.contains('/') && id != "." && id != "..",
                "fakesys: bad mdev type directory {id:?}"
            );
            assert!(seen.insert(id), "fakesys: mdev type {id:?} given twice");
            assert!(max != 0, "fakesys: mdev type {id:?} ({name}): 0 instances");
        }
        self.mdev_types = types
            .iter()
            .map(|&(id, name, max)| MdevTypeSpec {
                id: id.to_string(),
                name: name.to_string(),
                description: format!("{name}, max_instance={max}\n"),
                max_instances: max,
            })
            .collect();
        self
    }

    /// The `numa_node` attribute (default -1); VFs inherit the PF's.
    pub fn numa_node(mut self, n: i32) -> Self {
        self.numa_node = n;
        self
    }

    /// The address of VF `index` of this PF, from its routing ID plus
    /// `offset + stride * index`; `None` if not a PF or the ID overflows.
    pub fn vf_addr(&self, index: u16) -> Option<String> {
        let s = self.sriov.as_ref()?;
        let domain = u32::from_str_radix(self.addr.get(0..4)?, 16).ok()?;
        let bus = u32::from_str_radix(self.addr.get(5..7)?, 16).ok()?;
        let dev = u32::from_str_radix(self.addr.get(8..10)?, 16).ok()?;
        let func = u32::from_str_radix(self.addr.get(11..12)?, 16).ok()?;
        let rid = (bus << 8) | (dev << 3) | func;
        let vf = rid + u32::from(s.offset) + u32::from(s.stride) * u32::from(index);
        (vf <= 0xffff).then(|| {
            format!(
                "{domain:04x}:{:02x}:{:02x}.{:x}",
                vf >> 8,
                (vf >> 3) & 0x1f,
                vf & 7
            )
        })
    }

    pub fn reset_methods(mut self, methods: &str) -> Self {
        self.reset_methods = Some(methods.to_string());
        self
    }

    /// The first 64 bytes of config space (type 0 header): IDs, class,
    /// subsystem IDs, little-endian as the `config` attribute shows them.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 64];
        let (vendor, device) = if self.is_vf {
            (0xffff, 0xffff)
        } else {
            (self.vendor, self.device)
        };
        c[0..2].copy_from_slice(&vendor.to_le_bytes());
        c[2..4].copy_from_slice(&device.to_le_bytes());
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

/// True for a UUID in its canonical 36-character form
/// (`8-4-4-4-12` hex digits, either case), what the mdev core's `create`
/// takes and names an mdev by (in lower case).
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
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

    /// Creates `spec`'s device directory in `parent_dir`, complete with
    /// its attributes, `subsystem` link and IOMMU group membership, but not
    /// yet on the bus (no `bus/pci/devices` link) and not bound.
    pub fn create_device_dir(
        &self,
        spec: &DeviceSpec,
        parent_dir: &Path,
        driver_override: Option<&str>,
    ) -> PathBuf {
        let dir = parent_dir.join(&spec.addr);
        let tree = self;
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
            (
                "driver_override",
                format!("{}\n", driver_override.unwrap_or("(null)")),
            ),
            (
                "enable",
                if spec.driver.is_some() { "1\n" } else { "0\n" }.to_string(),
            ),
            ("numa_node", format!("{}\n", spec.numa_node)),
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
        if let Some(sriov) = &spec.sriov {
            files.extend([
                ("sriov_totalvfs", format!("{}\n", sriov.total_vfs)),
                ("sriov_numvfs", "0\n".to_string()),
                ("sriov_drivers_autoprobe", "1\n".to_string()),
                // Linux prints these with "%x" and "%u".
                ("sriov_vf_device", format!("{:x}\n", sriov.vf_device)),
                ("sriov_offset", format!("{}\n", sriov.offset)),
                ("sriov_stride", format!("{}\n", sriov.stride)),
            ]);
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
        dir
    }

    /// The lowest IOMMU group number not in use, which is the one Linux
    /// gives a new group (an IDA).
    pub fn lowest_free_group(&self) -> u32 {
        let used: std::collections::HashSet<u32> =
            fs::read_dir(self.sysfs.join("kernel/iommu_groups"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
        (0..)
            .find(|g| !used.contains(g))
            .expect("a free group number")
    }

    /// Unbinds `addr` and removes it: group membership (the group dir and
    /// `D/vfio/<group>` go with its last member), its PF's `virtfn<i>` link
    /// if it is a VF, bus link, directory, and what `state` knows of it.
    /// Calls no hook and sends no uevent.
    pub fn remove_device_entry(&self, state: &mut State, addr: &str, dir: &Path) {
        // The driver's remove unregisters an mdev parent: its mdevs go
        // first. (Whoever watched files below `dir` forgot them already.)
        self.mdev_unregister(state, addr, &mut |_| {});
        self.unbind(addr).expect("fakesys: unbind on removal");
        if let Some(g) = self.group_of(addr) {
            let gdir = self.group_dir(g);
            self.remove(&gdir.join("devices").join(addr))
                .expect("fakesys: remove group link");
            if self.group_members(g).is_empty() {
                self.remove(&gdir).expect("fakesys: remove group dir");
                self.remove(&self.vfio_node(g))
                    .expect("fakesys: remove vfio node");
            }
        }
        if let Some(pf) = state.pf_of(addr).map(str::to_string) {
            let pf_state = state.sriov.get_mut(&pf).expect("PF state");
            if let Some(i) = pf_state.vfs.iter().position(|v| v == addr) {
                if let Some(pf_dir) = self.device_dir(&pf) {
                    self.remove(&pf_dir.join(format!("virtfn{i}")))
                        .expect("fakesys: remove virtfn link");
                }
            }
            pf_state.vfs.retain(|v| v != addr);
            // Its vGPU goes with it, which may give its siblings types back.
            if state.vgpu.remove(addr).is_some() {
                self.vgpu_refresh(state, &pf);
            }
        }
        self.remove(&self.bus_link(addr))
            .expect("fakesys: remove bus link");
        self.remove(dir).expect("fakesys: remove device dir");
        state.native.remove(addr);
        state.config.remove(addr);
        state.sriov.remove(addr);
        state.mdev_parents.remove(addr);
    }

    /// Creates VF number `state.sriov[pf].vfs.len()` of `pf` as Linux's
    /// `pci_iov_add_virtfn` does, up to but excluding its appearance on the
    /// bus: directory next to the PF's (same parent), IDs from the PF
    /// (device ID = `sriov_vf_device`), `numa_node` inherited, reset by
    /// FLR, its IOMMU group (the PF's or a new one). The caller then
    /// makes it visible with [`Tree::publish_vf`] (after setting up
    /// whatever must see it first). Returns its address and directory.
    pub fn create_vf(
        &self,
        state: &mut State,
        pf: &str,
        driver_override: Option<&str>,
    ) -> io::Result<(String, PathBuf)> {
        let pf_dir = self
            .device_dir(pf)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no PF {pf}")))?;
        let pf_state = state.sriov.get(pf).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{pf} is not a PF"))
        })?;
        let index = pf_state.vfs.len();
        let pf_spec = &pf_state.spec;
        let sriov = pf_spec.sriov.clone().expect("PF spec has SR-IOV");
        let addr = u16::try_from(index)
            .ok()
            .and_then(|i| pf_spec.vf_addr(i))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("VF {index} of {pf}: routing ID out of range"),
                )
            })?;
        if fs::symlink_metadata(self.bus_link(&addr)).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("VF {index} of {pf}: address {addr} is taken"),
            ));
        }
        let group = if sriov.vfs_share_group {
            self.group_of(pf)
        } else {
            Some(self.lowest_free_group())
        };
        let mut vf = DeviceSpec::new(&addr, pf_spec.vendor, sriov.vf_device, pf_spec.class)
            .subsystem(pf_spec.subsystem_vendor, pf_spec.subsystem_device)
            .reset_methods("flr")
            .numa_node(pf_spec.numa_node);
        vf.iommu_group = group;
        vf.is_vf = true;
        let parent = pf_dir.parent().expect("PF dir has a parent").to_path_buf();
        let dir = self.create_device_dir(&vf, &parent, driver_override);
        state.native.insert(addr.clone(), sriov.vf_driver.clone());
        state.config.insert(addr.clone(), vf.config_space());
        state
            .sriov
            .get_mut(pf)
            .expect("PF state")
            .vfs
            .push(addr.clone());
        Ok((addr, dir))
    }

    /// Puts VF `index` of `pf` (made by [`Tree::create_vf`]) on the bus, as
    /// `pci_iov_add_virtfn` does: the device first (`device_add`), then the
    /// `physfn` and `virtfn<index>` links, so whoever counts a PF's
    /// `virtfnN` links finds each VF complete.
    pub fn publish_vf(&self, pf: &str, index: usize, addr: &str, dir: &Path) -> io::Result<()> {
        let pf_dir = self
            .device_dir(pf)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no PF {pf}")))?;
        self.symlink(&self.bus_link(addr), dir)?;
        self.symlink(&dir.join("physfn"), &pf_dir)?;
        self.symlink(&pf_dir.join(format!("virtfn{index}")), dir)
    }

    /// The FIFO a uevent listener (vfiod's `--uevent-fifo`) reads.
    pub fn uevent_fifo(&self) -> PathBuf {
        self.root.join("uevents")
    }

    /// Sends one uevent line (`add ADDR`, `remove ADDR`, `bind ADDR DRIVER`)
    /// to [`Tree::uevent_fifo`] if it exists. With no reader (the listener
    /// is down) the line is lost, as a real uevent nobody listens to; a
    /// full FIFO is retried for up to a second, then the line is dropped.
    ///
    /// The write end stays open between lines (in `state`), so a reader
    /// that reopens the FIFO at end-of-file never sees one between two
    /// lines of a burst and cannot miss the second (an open with
    /// O_NONBLOCK fails with ENXIO while no reader has it open). It is
    /// reopened when the FIFO was replaced or its reader went away.
    pub fn send_uevent(&self, state: &mut State, line: &str) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
        let path = self.uevent_fifo();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            state.uevent_writer = None;
            return;
        };
        if !meta.file_type().is_fifo() {
            return;
        }
        let same_fifo = |f: &fs::File| {
            f.metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
        };
        let msg = format!("{line}\n");
        for attempt in 0..2 {
            if !state.uevent_writer.as_ref().is_some_and(same_fifo) {
                let opened = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(&path);
                // ENXIO: no reader, the line is lost.
                state.uevent_writer = opened.ok();
            }
            let Some(fifo) = state.uevent_writer.as_mut() else {
                return;
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            loop {
                match io::Write::write(fifo, msg.as_bytes()) {
                    // Short writes cannot happen: a line is below PIPE_BUF.
                    Ok(_) => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    // EPIPE: the reader that had it went away; a new one
                    // may have opened it since.
                    Err(_) => {
                        state.uevent_writer = None;
                        if attempt == 1 {
                            return;
                        }
                        break;
                    }
                }
            }
        }
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

    /// Unlinks `addr` from its driver; from `nvidia`, also removes its
    /// `nvidia/` and `vfio-dev/` (a vGPU VF's). Removes `D/vfio/<group>`
    /// when it was the last VFIO provider of its group (see
    /// [`Tree::is_vfio_provider`]). Returns the old driver. Leaves
    /// [`State::vgpu`] alone: a caller holding the state follows with
    /// [`Tree::vgpu_unbound`], so that the siblings' lists are updated.
    /// An mdev parent's mdevs are left too: a caller holding the state
    /// calls [`Tree::mdev_unregister`] first, as the driver's remove does.
    pub fn unbind(&self, addr: &str) -> io::Result<Option<String>> {
        let Some(driver) = self.driver_of(addr) else {
            return Ok(None);
        };
        let was_provider = self.is_vfio_provider(addr);
        let dev = self.device_dir(addr);
        if let Some(dev) = &dev {
            self.remove(&dev.join("driver"))?;
        }
        self.remove(&self.driver_dir(&driver).join(addr))?;
        // nvidia's remove takes its vGPU files and its VFIO device away.
        if let (Some(dev), true) = (&dev, driver == NVIDIA) {
            self.remove(&dev.join(NVIDIA))?;
            self.remove(&dev.join("vfio-dev"))?;
        }
        if was_provider {
            if let Some(g) = self.group_of(addr) {
                let still = self
                    .group_members(g)
                    .iter()
                    .any(|m| m != addr && self.is_vfio_provider(m));
                if !still {
                    self.remove(&self.vfio_node(g))?;
                }
            }
        }
        Ok(Some(driver))
    }

    /// Whether `addr`'s driver gives it a VFIO device: vfio-pci, or a
    /// driver that is its own VFIO provider (`nvidia` on a vGPU VF, which
    /// then has `vfio-dev/`).
    pub fn is_vfio_provider(&self, addr: &str) -> bool {
        match self.driver_of(addr).as_deref() {
            Some(VFIO_PCI) => true,
            Some(_) => self
                .device_dir(addr)
                .is_some_and(|d| d.join("vfio-dev").is_dir()),
            None => false,
        }
    }

    /// What `nvidia`'s probe of a vGPU VF makes, once `addr` is bound to
    /// it: `nvidia/creatable_vgpu_types` and `nvidia/current_vgpu_type`
    /// ("0"), `vfio-dev/vfio<N>` (the lowest free N) and `D/vfio/<group>`;
    /// the VF is entered in [`State::vgpu`]. `before_publish(staged,
    /// final)` is called with the `nvidia/` directory, complete but still
    /// in scratch, and where it goes, so that a simulated kernel watches
    /// it before anyone can write to it. Returns false (nothing done) for
    /// anything but a vGPU VF bound to `nvidia`.
    pub fn vgpu_bound(
        &self,
        state: &mut State,
        addr: &str,
        before_publish: &mut dyn FnMut(&Path, &Path),
    ) -> io::Result<bool> {
        if state.vgpu_types_of(addr).is_empty() || self.driver_of(addr).as_deref() != Some(NVIDIA) {
            return Ok(false);
        }
        let dir = self
            .device_dir(addr)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no device {addr}")))?;
        state.vgpu.insert(addr.to_string(), 0);
        let creatable = state.vgpu_creatable(addr).unwrap_or_default();
        let nvidia = dir.join(NVIDIA);
        self.assert_inside(&nvidia);
        let staged = self.scratch_path();
        fs::create_dir(&staged)?;
        self.stage_file(
            &staged.join("creatable_vgpu_types"),
            &creatable_vgpu_text(&creatable),
        )?;
        self.stage_file(&staged.join("current_vgpu_type"), "0\n")?;
        before_publish(&staged, &nvidia);
        fs::rename(&staged, &nvidia)?;
        let index = self.lowest_free_vfio_dev();
        let vfio_dev = dir.join("vfio-dev");
        self.assert_inside(&vfio_dev);
        let staged = self.scratch_path();
        let cdev = staged.join(format!("vfio{index}"));
        fs::create_dir_all(&cdev)?;
        self.stage_file(&cdev.join("dev"), &format!("{VFIO_CDEV_MAJOR}:{index}\n"))?;
        self.stage_file(
            &cdev.join("uevent"),
            &format!("MAJOR={VFIO_CDEV_MAJOR}\nMINOR={index}\nDEVNAME=vfio/devices/vfio{index}\n"),
        )?;
        fs::rename(&staged, &vfio_dev)?;
        if let Some(g) = self.group_of(addr) {
            let node = self.vfio_node(g);
            self.mkdir(node.parent().expect("vfio dir"))?;
            if !node.exists() {
                self.write_file(&node, "")?;
            }
        }
        Ok(true)
    }

    /// `addr` lost its vGPU files (unbound from `nvidia`): forgets its
    /// vGPU and updates its siblings' `creatable_vgpu_types`.
    pub fn vgpu_unbound(&self, state: &mut State, addr: &str) {
        if state.vgpu.remove(addr).is_some() {
            if let Some(pf) = state.pf_of(addr).map(str::to_string) {
                self.vgpu_refresh(state, &pf);
            }
        }
    }

    /// Rewrites `creatable_vgpu_types` of every vGPU VF of `pf` from
    /// `state` (a VF whose file is gone is skipped).
    pub fn vgpu_refresh(&self, state: &State, pf: &str) {
        let Some(p) = state.sriov.get(pf) else { return };
        for vf in &p.vfs {
            let (Some(types), Some(dir)) = (state.vgpu_creatable(vf), self.device_dir(vf)) else {
                continue;
            };
            let path = dir.join(NVIDIA).join("creatable_vgpu_types");
            if path.is_file() {
                let _ = self.write_file(&path, &creatable_vgpu_text(&types));
            }
        }
    }

    // -----------------------------------------------------------------------
    // Legacy mdev
    // -----------------------------------------------------------------------

    /// `addr`'s `mdev_supported_types` directory.
    pub fn mdev_types_dir(&self, addr: &str) -> Option<PathBuf> {
        Some(self.device_dir(addr)?.join("mdev_supported_types"))
    }

    /// The directory of mdev `uuid` (below its parent's).
    pub fn mdev_dir(&self, state: &State, uuid: &str) -> Option<PathBuf> {
        let m = state.mdev(uuid)?;
        Some(self.device_dir(&m.parent)?.join(&m.uuid))
    }

    /// What registering with the mdev core does, once `addr` is bound: if
    /// it is an mdev parent bound to its native driver and not registered
    /// yet, makes `mdev_supported_types/` (every type at its maximum, no
    /// mdev) and `bus/mdev/{devices,drivers/<driver>}`, and marks it
    /// registered. `before_publish(staged, final)` is called with each
    /// type directory, complete but still in scratch, and where it goes,
    /// so that a simulated kernel watches it (and makes `create` its FIFO)
    /// before anyone can write to it. Returns whether it registered.
    pub fn mdev_register(
        &self,
        state: &mut State,
        addr: &str,
        before_publish: &mut dyn FnMut(&Path, &Path),
    ) -> io::Result<bool> {
        let Some(parent) = state.mdev_parents.get(addr) else {
            return Ok(false);
        };
        let driver = self.driver_of(addr);
        let native = state.native.get(addr).cloned().flatten();
        if parent.registered || driver.is_none() || driver != native {
            return Ok(false);
        }
        let driver = driver.expect("checked above");
        let dir = self
            .device_dir(addr)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no device {addr}")))?;
        let types_dir = dir.join("mdev_supported_types");
        self.assert_inside(&types_dir);
        let staged = self.scratch_path();
        fs::create_dir(&staged)?;
        for t in &parent.types {
            let tdir = staged.join(&t.id);
            fs::create_dir_all(tdir.join("devices"))?;
            self.stage_file(&tdir.join("name"), &format!("{}\n", t.name))?;
            self.stage_file(&tdir.join("description"), &t.description)?;
            self.stage_file(&tdir.join("device_api"), "vfio-pci\n")?;
            self.stage_file(
                &tdir.join("available_instances"),
                &format!("{}\n", t.max_instances),
            )?;
            self.stage_file(&tdir.join("create"), "")?;
            before_publish(&tdir, &types_dir.join(&t.id));
        }
        fs::rename(&staged, &types_dir)?;
        self.mkdir(&self.sysfs.join("bus/mdev/devices"))?;
        self.mkdir(&self.sysfs.join("bus/mdev/drivers").join(&driver))?;
        state
            .mdev_parents
            .get_mut(addr)
            .expect("checked above")
            .registered = true;
        Ok(true)
    }

    /// What unregistering from the mdev core does (the parent's driver
    /// unbinds): every mdev of `addr` is removed, newest first, then
    /// `mdev_supported_types/`. `forget(dir)` is called with each
    /// directory about to go, so that a simulated kernel stops watching
    /// it. No-op for a parent not registered.
    pub fn mdev_unregister(&self, state: &mut State, addr: &str, forget: &mut dyn FnMut(&Path)) {
        if !state.mdev_parents.get(addr).is_some_and(|p| p.registered) {
            return;
        }
        let uuids: Vec<String> = state.mdevs_of(addr).map(|m| m.uuid.clone()).collect();
        for uuid in uuids.iter().rev() {
            self.mdev_destroy(state, uuid, forget);
        }
        if let Some(types_dir) = self.mdev_types_dir(addr) {
            forget(&types_dir);
            let _ = self.remove(&types_dir);
        }
        if let Some(p) = state.mdev_parents.get_mut(addr) {
            p.registered = false;
        }
    }

    /// Creates mdev `uuid` (lower case) of type `type_id` on `parent`, as
    /// `mdev_device_create` and then its vfio driver's probe do: its
    /// directory with `remove` (staged, `before_publish(staged, final)`
    /// called as in [`Tree::mdev_register`]), `mdev_type`, the bus and the
    /// type's `devices/` links, every type's new `available_instances`,
    /// a new IOMMU group (the lowest free number) with the mdev in it, the
    /// driver links, and `D/vfio/<group>` last. Checks nothing: the caller
    /// decided the kernel would create it. Returns the group.
    pub fn mdev_create(
        &self,
        state: &mut State,
        parent: &str,
        type_id: &str,
        uuid: &str,
        before_publish: &mut dyn FnMut(&Path, &Path),
    ) -> io::Result<u32> {
        let pdir = self.device_dir(parent).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no device {parent}"))
        })?;
        let driver = self.driver_of(parent).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{parent} has no driver"))
        })?;
        let dir = pdir.join(uuid);
        let type_dir = pdir.join("mdev_supported_types").join(type_id);
        self.assert_inside(&dir);
        let staged = self.scratch_path();
        fs::create_dir(&staged)?;
        self.stage_file(&staged.join("remove"), "")?;
        self.stage_file(&staged.join("uevent"), &format!("MDEV_TYPE={type_id}\n"))?;
        before_publish(&staged, &dir);
        fs::rename(&staged, &dir)?;
        self.symlink(&dir.join("mdev_type"), &type_dir)?;
        let bus = self.sysfs.join("bus/mdev");
        self.symlink(&dir.join("subsystem"), &bus)?;
        self.symlink(&bus.join("devices").join(uuid), &dir)?;
        self.symlink(&type_dir.join("devices").join(uuid), &dir)?;
        let group = self.lowest_free_group();
        state.mdevs.push(Mdev {
            uuid: uuid.to_string(),
            parent: parent.to_string(),
            type_id: type_id.to_string(),
            group,
        });
        self.mdev_refresh_available(state, parent);
        let gdir = self.group_dir(group);
        self.mkdir(&gdir.join("devices"))?;
        self.write_file(&gdir.join("type"), "unknown\n")?;
        self.symlink(&gdir.join("devices").join(uuid), &dir)?;
        self.symlink(&dir.join("iommu_group"), &gdir)?;
        let ddir = bus.join("drivers").join(&driver);
        self.mkdir(&ddir)?;
        self.symlink(&ddir.join(uuid), &dir)?;
        self.symlink(&dir.join("driver"), &ddir)?;
        let node = self.vfio_node(group);
        self.mkdir(node.parent().expect("vfio dir"))?;
        self.write_file(&node, "")?;
        Ok(group)
    }

    /// Removes mdev `uuid` and everything [`Tree::mdev_create`] made, in
    /// reverse order (`D/vfio/<group>` first), and forgets it; its
    /// parent's types get their instances back. `forget(dir)` is called
    /// with its directory before it goes. No-op for an unknown UUID.
    pub fn mdev_destroy(&self, state: &mut State, uuid: &str, forget: &mut dyn FnMut(&Path)) {
        let Some(pos) = state.mdevs.iter().position(|m| m.uuid == uuid) else {
            return;
        };
        let m = state.mdevs.remove(pos);
        let bus = self.sysfs.join("bus/mdev");
        let _ = self.remove(&self.vfio_node(m.group));
        let dir = self.device_dir(&m.parent).map(|d| d.join(uuid));
        if let Some(driver) = dir
            .as_ref()
            .and_then(|d| Tree::link_name(&d.join("driver")))
        {
            let _ = self.remove(&bus.join("drivers").join(driver).join(uuid));
        }
        let _ = self.remove(&self.group_dir(m.group));
        if let Some(types_dir) = self.mdev_types_dir(&m.parent) {
            let _ = self.remove(&types_dir.join(&m.type_id).join("devices").join(uuid));
        }
        let _ = self.remove(&bus.join("devices").join(uuid));
        if let Some(dir) = dir {
            forget(&dir);
            let _ = self.remove(&dir);
        }
        self.mdev_refresh_available(state, &m.parent);
    }

    /// Rewrites every type's `available_instances` of `parent` from
    /// `state` (see [`State::mdev_available`]).
    pub fn mdev_refresh_available(&self, state: &State, parent: &str) {
        let (Some(p), Some(types_dir)) =
            (state.mdev_parents.get(parent), self.mdev_types_dir(parent))
        else {
            return;
        };
        for t in &p.types {
            let path = types_dir.join(&t.id).join("available_instances");
            if let Some(n) = state.mdev_available(parent, &t.id) {
                if path.is_file() {
                    let _ = self.write_file(&path, &format!("{n}\n"));
                }
            }
        }
    }

    /// The lowest `vfio<N>` index no device's `vfio-dev/` uses (an IDA, as
    /// Linux's vfio cdev numbering).
    fn lowest_free_vfio_dev(&self) -> u32 {
        let used: std::collections::HashSet<u32> = self
            .devices()
            .iter()
            .filter_map(|a| fs::read_dir(self.device_dir(a)?.join("vfio-dev")).ok())
            .flat_map(|d| d.flatten())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("vfio")?.parse().ok())
            .collect();
        (0..).find(|i| !used.contains(i)).expect("a free index")
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
    /// A directory holding write-only mdev attributes (a type directory
    /// with `create`, an mdev's with `remove`), complete in scratch at
    /// `staged`, is about to be renamed to `dest` by a builder call.
    fn mdev_dir_staged(&self, _tree: &Tree, _staged: &Path, _dest: &Path) {}
    /// An mdev directory or a parent's `mdev_supported_types` is about to
    /// be removed by a builder call.
    fn mdev_dir_removing(&self, _tree: &Tree, _dir: &Path) {}
}

/// Mutable state shared by the builder and a simulated kernel.
pub struct State {
    /// The driver each device had when added ("native"); `None` = none.
    pub native: HashMap<String, Option<String>>,
    /// Each device's healthy config space, which a good reset restores.
    pub config: HashMap<String, Vec<u8>>,
    /// Every SR-IOV PF in the tree, by address.
    pub sriov: HashMap<String, PfState>,
    /// The vGPU type set on each vGPU VF bound to `nvidia` (0: none), by
    /// address; a VF is here exactly while it has its `nvidia/` files.
    pub vgpu: HashMap<String, u32>,
    /// Every legacy mdev parent in the tree ([`DeviceSpec::mdev`]), by
    /// address.
    pub mdev_parents: HashMap<String, MdevParent>,
    /// Every live mdev, oldest first.
    pub mdevs: Vec<Mdev>,
    /// The write end of the uevent FIFO (see [`Tree::send_uevent`]).
    pub uevent_writer: Option<fs::File>,
    pub hook: Option<Arc<dyn Hook>>,
}

/// What the kernel knows of one SR-IOV physical function.
#[derive(Clone, Debug)]
pub struct PfState {
    /// The spec it was added with (its `sriov` is set).
    pub spec: DeviceSpec,
    /// Its VFs' addresses, by index; the length is `sriov_numvfs`.
    pub vfs: Vec<String>,
    /// `sriov_drivers_autoprobe`.
    pub autoprobe: bool,
}

/// What the mdev core knows of one parent.
#[derive(Clone, Debug)]
pub struct MdevParent {
    /// Its types, as given to [`DeviceSpec::mdev`].
    pub types: Vec<MdevTypeSpec>,
    /// Registered now (bound to its native driver): it has
    /// `mdev_supported_types/`.
    pub registered: bool,
}

/// One live mdev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mdev {
    /// Lower case, as the kernel names it.
    pub uuid: String,
    /// The parent's PCI address.
    pub parent: String,
    /// Its type's directory name.
    pub type_id: String,
    /// Its own (emulated) IOMMU group.
    pub group: u32,
}

impl State {
    /// The mdevs of `parent`, oldest first.
    pub fn mdevs_of<'a>(&'a self, parent: &'a str) -> impl Iterator<Item = &'a Mdev> + 'a {
        self.mdevs.iter().filter(move |m| m.parent == parent)
    }

    /// Mdev `uuid` (either case).
    pub fn mdev(&self, uuid: &str) -> Option<&Mdev> {
        let uuid = uuid.to_ascii_lowercase();
        self.mdevs.iter().find(|m| m.uuid == uuid)
    }

    /// What `type_id`'s `available_instances` of `parent` reads: `None`
    /// unless `parent` is a registered mdev parent with that type.
    ///
    /// NVIDIA's model: all mdevs of one parent are of one type. With none,
    /// every type offers its maximum; with some of type T, T offers its
    /// maximum minus their count and every other type 0.
    pub fn mdev_available(&self, parent: &str, type_id: &str) -> Option<u32> {
        let p = self.mdev_parents.get(parent).filter(|p| p.registered)?;
        let t = p.types.iter().find(|t| t.id == type_id)?;
        let mut live = self.mdevs_of(parent).peekable();
        let Some(first) = live.peek() else {
            return Some(t.max_instances);
        };
        if first.type_id != type_id {
            return Some(0);
        }
        let count = live.count() as u32;
        Some(t.max_instances.saturating_sub(count))
    }

    /// The PF of `vf`, if it is a VF.
    pub fn pf_of(&self, vf: &str) -> Option<&str> {
        self.sriov
            .iter()
            .find(|(_, pf)| pf.vfs.iter().any(|v| v == vf))
            .map(|(addr, _)| addr.as_str())
    }

    /// The vGPU types of `vf`'s PF; empty if `vf` is no VF of a vGPU PF.
    pub fn vgpu_types_of(&self, vf: &str) -> &[VgpuTypeSpec] {
        self.pf_of(vf)
            .and_then(|pf| self.sriov.get(pf)?.spec.sriov.as_ref())
            .map_or(&[], |s| s.vgpu_types.as_slice())
    }

    /// What `vf`'s `creatable_vgpu_types` lists now; `None` while it has no
    /// `nvidia/` files (no vGPU VF, or not bound to `nvidia`).
    ///
    /// The VFs of one PF share its framebuffer, and all vGPUs on one GPU
    /// are of the same type: with no vGPU on the VF's siblings, every type
    /// is creatable; once siblings hold type T, only T, and only while
    /// fewer of them than T's share hold it. The VF's own vGPU is left out
    /// of the count: its list says what it could take once cleared (a
    /// write of another type still needs 0 first).
    pub fn vgpu_creatable(&self, vf: &str) -> Option<Vec<VgpuTypeSpec>> {
        self.vgpu.get(vf)?;
        let types = self.vgpu_types_of(vf);
        let pf = self.pf_of(vf)?;
        let held: Vec<u32> = self.sriov[pf]
            .vfs
            .iter()
            .filter(|s| s.as_str() != vf)
            .filter_map(|s| self.vgpu.get(s).copied())
            .filter(|id| *id != 0)
            .collect();
        let Some(&first) = held.first() else {
            return Some(types.to_vec());
        };
        Some(
            types
                .iter()
                .filter(|t| t.id == first && (held.len() as u32) < t.share)
                .cloned()
                .collect(),
        )
    }
}

/// The text of a `creatable_vgpu_types` file: a header line, then one
/// `ID : Name` row per type, as the NVIDIA driver prints them.
pub fn creatable_vgpu_text(types: &[VgpuTypeSpec]) -> String {
    let mut out = format!("{:<6}: vGPU Name\n", "ID");
    for t in types {
        out.push_str(&format!("{:<6}: {}\n", t.id, t.name));
    }
    out
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
                    sriov: HashMap::new(),
                    vgpu: HashMap::new(),
                    mdev_parents: HashMap::new(),
                    mdevs: Vec::new(),
                    uevent_writer: None,
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
        if !spec.mdev_types.is_empty() {
            assert!(
                spec.driver.as_deref().is_some_and(|d| d != VFIO_PCI),
                "fakesys: mdev parent {} needs a native driver (not vfio-pci) to register with",
                spec.addr
            );
        }
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
        let dir = tree.create_device_dir(&spec, &parent_dir, None);
        if spec.sriov.is_some() {
            state.sriov.insert(
                spec.addr.clone(),
                PfState {
                    spec: spec.clone(),
                    vfs: Vec::new(),
                    autoprobe: true,
                },
            );
        }
        if !spec.mdev_types.is_empty() {
            state.mdev_parents.insert(
                spec.addr.clone(),
                MdevParent {
                    types: spec.mdev_types.clone(),
                    registered: false,
                },
            );
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
            let hook = state.hook.clone();
            tree.mdev_register(&mut state, &spec.addr, &mut |staged, dest| {
                if let Some(hook) = &hook {
                    hook.mdev_dir_staged(tree, staged, dest);
                }
            })
            .expect("fakesys: mdev parent registration");
        }
    }

    /// Hot-unplug: the device (and anything behind it, if it is a bridge,
    /// and its VFs, if it is an SR-IOV PF) disappears: driver binding,
    /// group membership (group dir removed when empty), bus link, device
    /// dir. Each VF removed sends a `remove` uevent. Panics if the device
    /// does not exist, or is a VF (which goes only with its PF).
    pub fn remove_device(&self, addr: &str) {
        let mut state = self.lock_state();
        let tree = self.tree();
        let dir = tree
            .device_dir(addr)
            .unwrap_or_else(|| panic!("fakesys: remove_device: no device {addr}"));
        if let Some(pf) = state.pf_of(addr) {
            panic!(
                "fakesys: remove_device: {addr} is a VF of {pf}; it goes with its PF \
                 or when sriov_numvfs is set to 0"
            );
        }
        self.remove_device_locked(&mut state, addr, &dir);
    }

    fn remove_device_locked(&self, state: &mut State, addr: &str, dir: &Path) {
        let tree = self.tree();
        // VFs are not below their PF's directory but next to it; they go
        // first, last one first, as when SR-IOV is disabled.
        self.remove_vfs_locked(state, addr, true);
        // Children first (functions behind a bridge). A VF among them goes
        // with its PF.
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
            if state.pf_of(&child).is_none() && cdir.is_dir() {
                self.remove_device_locked(state, &child, &cdir);
            }
        }
        if let Some(hook) = state.hook.clone() {
            hook.device_removing(tree, state, addr, dir);
        }
        tree.remove_device_entry(state, addr, dir);
    }

    /// Removes every VF of `pf` (none if it is no PF), last one first,
    /// telling the hook; with `uevents`, sends a `remove` uevent for each.
    fn remove_vfs_locked(&self, state: &mut State, pf: &str, uevents: bool) {
        let tree = self.tree();
        let vfs: Vec<String> = state
            .sriov
            .get(pf)
            .map(|p| p.vfs.clone())
            .unwrap_or_default();
        for vf in vfs.iter().rev() {
            let Some(vdir) = tree.device_dir(vf) else {
                continue;
            };
            if let Some(hook) = state.hook.clone() {
                hook.device_removing(tree, state, vf, &vdir);
            }
            tree.remove_device_entry(state, vf, &vdir);
            if uevents {
                tree.send_uevent(state, &format!("remove {vf}"));
            }
        }
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
        tree.mkdir(&module.join("parameters"))
            .expect("fakesys: module parameters dir");
        if !module.join("parameters/enable_sriov").exists() {
            tree.write_file(&module.join("parameters/enable_sriov"), "N\n")
                .expect("fakesys: enable_sriov");
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
        // Group nodes of nvidia's vGPU VFs stay, and with them the directory.
        tree.remove(&tree.devfs.join("vfio/vfio"))
            .expect("fakesys: remove /dev/vfio/vfio");
        let _ = fs::remove_dir(tree.devfs.join("vfio"));
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

    /// The vGPU type set on `vf` as the driver holds it (0: none). Panics
    /// if `vf` has no vGPU files (no VF of a [`DeviceSpec::vgpu`] PF, or
    /// not bound to `nvidia`).
    #[track_caller]
    pub fn current_vgpu_type(&self, vf: &str) -> u32 {
        *self
            .lock_state()
            .vgpu
            .get(vf)
            .unwrap_or_else(|| panic!("fakesys: {vf} is no vGPU VF bound to nvidia"))
    }

    /// The IDs `vf`'s `creatable_vgpu_types` lists now, in the PF's order
    /// (see [`State::vgpu_creatable`]). Panics as
    /// [`FakeSys::current_vgpu_type`] does.
    #[track_caller]
    pub fn creatable_vgpu_types(&self, vf: &str) -> Vec<u32> {
        self.lock_state()
            .vgpu_creatable(vf)
            .unwrap_or_else(|| panic!("fakesys: {vf} is no vGPU VF bound to nvidia"))
            .iter()
            .map(|t| t.id)
            .collect()
    }

    /// Whether `vf` has its vGPU files now (a VF of a [`DeviceSpec::vgpu`]
    /// PF, bound to `nvidia`).
    pub fn is_vgpu_vf(&self, vf: &str) -> bool {
        self.lock_state().vgpu.contains_key(vf)
    }

    /// The mdevs of `parent` as the mdev core holds them, oldest first:
    /// (UUID in lower case, type directory name).
    pub fn mdevs(&self, parent: &str) -> Vec<(String, String)> {
        self.lock_state()
            .mdevs_of(parent)
            .map(|m| (m.uuid.clone(), m.type_id.clone()))
            .collect()
    }

    /// The IOMMU group of mdev `uuid` (either case); `None` if there is no
    /// such mdev.
    pub fn mdev_group(&self, uuid: &str) -> Option<u32> {
        self.lock_state().mdev(uuid).map(|m| m.group)
    }

    /// The parent of mdev `uuid` (either case).
    pub fn mdev_parent_of(&self, uuid: &str) -> Option<String> {
        self.lock_state().mdev(uuid).map(|m| m.parent.clone())
    }

    /// Whether `addr` is a registered mdev parent now (an mdev parent
    /// bound to its native driver, with `mdev_supported_types/`).
    pub fn is_mdev_parent(&self, addr: &str) -> bool {
        self.lock_state()
            .mdev_parents
            .get(addr)
            .is_some_and(|p| p.registered)
    }

    /// `type_id`'s `available_instances` of `parent` as the mdev core
    /// holds it (see [`State::mdev_available`]). Panics unless `parent` is
    /// a registered mdev parent with that type.
    #[track_caller]
    pub fn mdev_available_instances(&self, parent: &str, type_id: &str) -> u32 {
        self.lock_state()
            .mdev_available(parent, type_id)
            .unwrap_or_else(|| {
                panic!("fakesys: {parent} is no registered mdev parent with type {type_id}")
            })
    }

    /// What a reboot does to mdev parent `parent` while nobody watches:
    /// its mdevs are gone (their groups and `D/vfio` nodes with them), its
    /// types back at their maximum. Its binding is left as it is. Panics if
    /// `parent` is no mdev parent.
    pub fn reboot_mdev(&self, parent: &str) {
        let mut state = self.lock_state();
        assert!(
            state.mdev_parents.contains_key(parent),
            "fakesys: reboot_mdev: {parent} is no mdev parent"
        );
        let tree = self.tree();
        let hook = state.hook.clone();
        let uuids: Vec<String> = state.mdevs_of(parent).map(|m| m.uuid.clone()).collect();
        for uuid in uuids.iter().rev() {
            tree.mdev_destroy(&mut state, uuid, &mut |dir| {
                if let Some(hook) = &hook {
                    hook.mdev_dir_removing(tree, dir);
                }
            });
        }
    }

    /// vfio-pci's `enable_sriov` module parameter ("Y"/"N"), which decides
    /// whether a PF on vfio-pci can enable VFs. Panics unless vfio-pci is
    /// loaded.
    pub fn set_vfio_enable_sriov(&self, on: bool) {
        let _state = self.lock_state();
        let tree = self.tree();
        let dir = tree.sysfs.join("module/vfio_pci/parameters");
        assert!(dir.is_dir(), "fakesys: vfio-pci is not loaded");
        tree.write_file(&dir.join("enable_sriov"), if on { "Y\n" } else { "N\n" })
            .expect("fakesys: write enable_sriov");
    }

    /// The number of VFs `pf` has enabled now (what `sriov_numvfs` reads
    /// once the simulated kernel is idle); 0 for a function that is no PF.
    pub fn sriov_numvfs(&self, pf: &str) -> u32 {
        self.vfs_of(pf).len() as u32
    }

    /// The addresses of `pf`'s VFs, in index order (`virtfn0` first).
    pub fn vfs_of(&self, pf: &str) -> Vec<String> {
        self.lock_state()
            .sriov
            .get(pf)
            .map(|p| p.vfs.clone())
            .unwrap_or_default()
    }

    /// `pf`'s `sriov_drivers_autoprobe` as the kernel holds it. Panics if
    /// `pf` is no SR-IOV PF.
    pub fn autoprobe_of(&self, pf: &str) -> bool {
        self.lock_state()
            .sriov
            .get(pf)
            .unwrap_or_else(|| panic!("fakesys: {pf} is not an SR-IOV PF"))
            .autoprobe
    }

    /// The PF of `vf`, if it is a VF.
    pub fn pf_of(&self, vf: &str) -> Option<String> {
        self.lock_state().pf_of(vf).map(str::to_string)
    }

    /// What a reboot does to `pf` while nobody watches: its VFs are gone
    /// (no uevents), `sriov_numvfs` reads 0 and `sriov_drivers_autoprobe`
    /// 1 again. Panics if `pf` is no SR-IOV PF.
    pub fn reboot_sriov(&self, pf: &str) {
        let mut state = self.lock_state();
        assert!(
            state.sriov.contains_key(pf),
            "fakesys: reboot_sriov: {pf} is not an SR-IOV PF"
        );
        self.remove_vfs_locked(&mut state, pf, false);
        state.sriov.get_mut(pf).expect("PF state").autoprobe = true;
        let tree = self.tree();
        let dir = tree
            .device_dir(pf)
            .unwrap_or_else(|| panic!("fakesys: no device {pf}"));
        tree.write_file(&dir.join("sriov_numvfs"), "0\n")
            .expect("fakesys: write sriov_numvfs");
        tree.write_file(&dir.join("sriov_drivers_autoprobe"), "1\n")
            .expect("fakesys: write sriov_drivers_autoprobe");
    }

    /// Where a uevent listener's FIFO goes (`<tmp_root>/uevents`); see
    /// [`Tree::send_uevent`].
    pub fn uevent_fifo(&self) -> PathBuf {
        self.tree().uevent_fifo()
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

    /// Writes `value` to attribute `rel` as vfiod and `echo` do (the file
    /// must exist, truncated, one write(2)): a write a simulated kernel
    /// sees and may refuse.
    pub fn echo(&self, rel: &str, value: &str) -> io::Result<()> {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.path(rel))?;
        let n = f.write(value.as_bytes())?;
        assert_eq!(n, value.len(), "fakesys: short write to {rel}");
        Ok(())
    }

    /// Reads attribute `rel`; panics naming it if it cannot.
    #[track_caller]
    pub fn cat(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
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
