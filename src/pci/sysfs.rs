//! Read and write access to the kernel's PCI sysfs tree under a given root.
//!
//! Every path vfiod touches is built here from a validated [`PciAddress`],
//! a driver name read back from the kernel, or a group number, so nothing a
//! caller sends is ever joined into a path. Reads are synchronous and cheap;
//! writes go through [`Sysfs::write_attr`], which the engine runs on a
//! dedicated thread with a timeout (a write into a driver's `unbind` can
//! block in the kernel for as long as the driver wants).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::PciAddress;

/// What sysfs says about one PCI function right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// The directory name under `bus/pci/devices`.
    pub address: PciAddress,
    /// sysfs `vendor`.
    pub vendor_id: u16,
    /// sysfs `device`.
    pub device_id: u16,
    /// sysfs `subsystem_vendor`: the board maker, where `vendor` is the chip's.
    pub subsystem_vendor_id: u16,
    /// sysfs `subsystem_device`.
    pub subsystem_device_id: u16,
    /// 24-bit class code: base class, subclass, programming interface.
    pub class: u32,
    /// The `driver` link's target name; `None` when unbound.
    pub driver: Option<String>,
    /// The `iommu_group` link's number; `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// sysfs `modalias`, which variant vfio drivers are matched against; `None`
    /// if unreadable.
    pub modalias: Option<String>,
    /// Its driver, not a vfio one, is its own VFIO provider (a vGPU VF on
    /// `nvidia`): usable by a VMM as it is.
    pub own_vfio_provider: bool,
}

impl PciFunction {
    /// Bridges never count for IOMMU-group viability (the kernel's vfio
    /// does not require them to be on vfio-pci) and are never candidates.
    pub fn is_bridge(&self) -> bool {
        self.class >> 16 == 0x06
    }
}

/// Buses with at least this many functions are read by several threads.
const PARALLEL_SCAN_MIN: usize = 512;

/// `read` for each of `addresses`, in their order, keeping what it found.
/// Many functions (thousands of SR-IOV functions) are read by as many
/// threads as the holder scan uses: each costs a dozen small reads, and
/// startup waits for all of them.
pub fn per_function<T: Send>(
    addresses: &[PciAddress],
    read: impl Fn(&PciAddress) -> Option<T> + Sync,
) -> Vec<T> {
    let read_all = |chunk: &[PciAddress]| chunk.iter().filter_map(&read).collect::<Vec<T>>();
    let threads = super::holders::default_threads().get();
    if threads < 2 || addresses.len() < PARALLEL_SCAN_MIN {
        return read_all(addresses);
    }
    std::thread::scope(|s| {
        let parts: Vec<_> = addresses
            .chunks(addresses.len().div_ceil(threads))
            .map(|part| s.spawn(|| read_all(part)))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().expect("a sysfs reader thread panicked"))
            .collect()
    })
}

/// A sysfs read or write that failed: which file, and why.
pub type SysfsError = crate::path_error::PathError;

/// The kernel's sysfs (or a fake tree with the same layout) and the matching
/// devfs, for `/dev/vfio/N`.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    devfs: PathBuf,
}

pub(super) fn read_trimmed(path: &Path) -> Result<String, SysfsError> {
    read_attribute(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SysfsError {
            op: "read",
            path: path.to_owned(),
            source,
        })
}

/// A sysfs attribute's text. An attribute is at most a page, so it is read
/// into a page-sized buffer with no size query first (`fs::read_to_string`
/// asks for the size, which sysfs gives as 4096 for every attribute): a
/// scan of 10,000 functions reads some 80,000 attributes, and this makes
/// it a fifth cheaper.
fn read_attribute(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut page = [0u8; 4096];
    let mut len = 0;
    while len < page.len() {
        match file.read(&mut page[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(page[..len].to_vec())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(super) fn parse_hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// A device number as sysfs `dev` files and `mountinfo` write it:
/// `major:minor`.
pub(crate) fn parse_device_number(text: &str) -> Option<u64> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(nix::sys::stat::makedev(
        major.parse().ok()?,
        minor.parse().ok()?,
    ))
}

pub(super) fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_str()?.to_owned())
}

impl Sysfs {
    /// `root` stands for `/sys` and `devfs` for `/dev`; tests pass a fake tree
    /// for both.
    pub fn new(root: impl Into<PathBuf>, devfs: impl Into<PathBuf>) -> Self {
        Sysfs {
            root: root.into(),
            devfs: devfs.into(),
        }
    }

    /// The tree standing for `/sys`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The tree standing for `/dev`, where `vfio/N` nodes appear.
    pub fn devfs(&self) -> &Path {
        &self.devfs
    }

    /// True when this is the machine's real sysfs, where a mistake moves a
    /// live disk or NIC; test helpers use it to refuse mutating runs.
    pub fn is_real(&self) -> bool {
        fs::canonicalize(&self.root)
            .map(|p| p == Path::new("/sys"))
            .unwrap_or(false)
    }

    /// `bus/pci/devices/ADDR`: a symlink into the device tree, whose real path
    /// shows the topology.
    pub fn device_dir(&self, addr: &PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(addr.to_string())
    }

    /// `bus/pci/drivers/NAME`: exists exactly while the driver is loaded.
    pub fn driver_dir(&self, driver: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(driver)
    }

    /// Writing an address here makes the kernel probe drivers for it, honouring
    /// `driver_override`.
    pub fn drivers_probe_path(&self) -> PathBuf {
        self.root.join("bus/pci/drivers_probe")
    }

    /// While set, only the named driver may bind the function.
    pub fn driver_override_path(&self, addr: &PciAddress) -> PathBuf {
        self.device_dir(addr).join("driver_override")
    }

    /// Writing `1` resets the function; the write returns when the reset is
    /// done.
    pub fn reset_path(&self, addr: &PciAddress) -> PathBuf {
        self.device_dir(addr).join("reset")
    }

    /// The methods `reset` tries, in order; absent when the function has none.
    pub fn reset_method_path(&self, addr: &PciAddress) -> PathBuf {
        self.device_dir(addr).join("reset_method")
    }

    /// The kernel's reset methods for a function, in the order it tries
    /// them; empty when it has none (Linux then hides `reset_method`).
    pub fn reset_methods(&self, addr: &PciAddress) -> Vec<String> {
        read_trimmed(&self.reset_method_path(addr))
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The vendor ID as config space answers it now (the first two bytes
    /// of `config`): 0xffff when the function does not answer. A VF's own
    /// Vendor ID register reads 0xffff by the SR-IOV spec whatever its
    /// state, so for a VF its PF's is read, as the kernel's
    /// `pci_device_is_present` does.
    pub fn config_vendor_id(&self, addr: &PciAddress) -> Result<u16, SysfsError> {
        use std::io::Read;
        let addr = self.physfn(addr).map(|(pf, _)| pf).unwrap_or(*addr);
        let path = self.device_dir(&addr).join("config");
        let err = |op, source| SysfsError {
            op,
            path: path.clone(),
            source,
        };
        let mut bytes = [0u8; 2];
        fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| err("read", e))?;
        Ok(u16::from_le_bytes(bytes))
    }

    /// `power_state` (D0, D3hot, D3cold, error, ...); `None` if the kernel
    /// does not show it.
    pub fn power_state(&self, addr: &PciAddress) -> Option<String> {
        read_trimmed(&self.device_dir(addr).join("power_state")).ok()
    }

    /// The functions a secondary bus reset of `addr`'s bus would reset:
    /// every function below the bridge `addr` sits behind, at any depth,
    /// in address order. `None` when `addr` is on a root bus (its parent in
    /// the device tree is a `pciDDDD:BB` host bridge, not a function), where
    /// there is no bridge to reset the bus with.
    pub fn bus_reset_scope(
        &self,
        addr: &PciAddress,
    ) -> Result<Option<Vec<PciAddress>>, SysfsError> {
        let link = self.device_dir(addr);
        let dir = fs::canonicalize(&link).map_err(|source| SysfsError {
            op: "resolve",
            path: link.clone(),
            source,
        })?;
        let Some(parent) = dir.parent() else {
            return Ok(None);
        };
        let parent_is_bridge = parent
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.parse::<PciAddress>().is_ok());
        if !parent_is_bridge {
            return Ok(None);
        }
        let mut found = Vec::new();
        let mut pending = vec![parent.to_path_buf()];
        while let Some(d) = pending.pop() {
            let entries = fs::read_dir(&d).map_err(|source| SysfsError {
                op: "list",
                path: d.clone(),
                source,
            })?;
            for e in entries.flatten() {
                let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let function = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<PciAddress>().ok());
                if let (true, Some(f)) = (is_dir, function) {
                    found.push(f);
                    pending.push(e.path());
                }
            }
        }
        found.sort();
        Ok(Some(found))
    }

    /// `/dev/vfio/N` under the devfs root: what a VMM opens for group `N`.
    pub fn vfio_group_node(&self, group: u32) -> PathBuf {
        self.devfs.join("vfio").join(group.to_string())
    }

    /// Whether the function is on the bus now (its directory exists).
    pub fn is_present(&self, addr: &PciAddress) -> bool {
        self.device_dir(addr).exists()
    }

    /// The bound driver's name; `None` when unbound or absent.
    pub fn driver(&self, addr: &PciAddress) -> Option<String> {
        link_name(&self.device_dir(addr).join("driver"))
    }

    /// `None` when the IOMMU is off or the function is absent.
    pub fn iommu_group(&self, addr: &PciAddress) -> Option<u32> {
        link_name(&self.device_dir(addr).join("iommu_group"))?
            .parse()
            .ok()
    }

    /// `None` when unset; the kernel shows an unset override as `(null)`.
    pub fn driver_override(&self, addr: &PciAddress) -> Option<String> {
        let value = read_trimmed(&self.driver_override_path(addr)).ok()?;
        (!value.is_empty() && value != "(null)").then_some(value)
    }

    /// Whether the driver's module is loaded (its directory under
    /// `bus/pci/drivers` exists).
    pub fn driver_loaded(&self, driver: &str) -> bool {
        self.driver_dir(driver).is_dir()
    }

    /// Whether the kernel has a working IOMMU: it then populates
    /// `kernel/iommu_groups`.
    pub fn iommu_enabled(&self) -> bool {
        fs::read_dir(self.root.join("kernel/iommu_groups"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }

    /// Reads one function; `Ok(None)` when it is not on the bus.
    pub fn read_function(&self, addr: &PciAddress) -> Result<Option<PciFunction>, SysfsError> {
        let dir = self.device_dir(addr);
        if !dir.exists() {
            return Ok(None);
        }
        let hex = |attr: &str| -> Result<u32, SysfsError> {
            let path = dir.join(attr);
            let text = read_trimmed(&path)?;
            parse_hex(&text).ok_or_else(|| SysfsError {
                op: "parse",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, format!("not hex: {text:?}")),
            })
        };
        let function = PciFunction {
            address: *addr,
            vendor_id: hex("vendor")? as u16,
            device_id: hex("device")? as u16,
            subsystem_vendor_id: hex("subsystem_vendor").unwrap_or(0) as u16,
            subsystem_device_id: hex("subsystem_device").unwrap_or(0) as u16,
            class: hex("class")?,
            driver: self.driver(addr),
            iommu_group: self.iommu_group(addr),
            modalias: read_trimmed(&dir.join("modalias")).ok(),
            own_vfio_provider: false,
        };
        // Only nvidia is such a provider: a start over thousands of
        // functions reads nothing more for the others.
        let function = PciFunction {
            own_vfio_provider: function.driver.as_deref() == Some(super::vgpu::NVIDIA_DRIVER)
                && self.is_vgpu_vf(addr),
            ..function
        };
        Ok(Some(function))
    }

    /// Every function on the bus, in address order. Entries that are not PCI
    /// addresses or vanish mid-scan (hot-unplug) are skipped. A big bus is
    /// read by several threads ([`per_function`]).
    pub fn scan(&self) -> Result<BTreeMap<PciAddress, PciFunction>, SysfsError> {
        let dir = self.root.join("bus/pci/devices");
        let entries = fs::read_dir(&dir).map_err(|source| SysfsError {
            op: "list",
            path: dir.clone(),
            source,
        })?;
        let addresses: Vec<PciAddress> = entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        let functions = per_function(&addresses, |addr| match self.read_function(addr) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(device = %addr, error = %e, "skipping unreadable PCI function");
                None
            }
        });
        Ok(functions.into_iter().map(|f| (f.address, f)).collect())
    }

    /// The functions in an IOMMU group, in address order.
    pub fn group_members(&self, group: u32) -> Vec<PciAddress> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let mut members: Vec<PciAddress> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        members.sort();
        members
    }

    /// One sysfs attribute write, the way `echo value > attr` does it: the
    /// file must exist (never created), and the whole value goes in one
    /// `write(2)`. Blocking: callers run it off the async runtime.
    pub fn write_attr(path: &Path, value: &str) -> Result<(), SysfsError> {
        let err = |op, source| SysfsError {
            op,
            path: path.to_owned(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| err("open", e))?;
        let written = file.write(value.as_bytes()).map_err(|e| err("write", e))?;
        if written != value.len() {
            return Err(err(
                "write",
                io::Error::new(io::ErrorKind::WriteZero, "short write"),
            ));
        }
        Ok(())
    }
}
