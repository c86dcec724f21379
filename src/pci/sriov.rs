//! SR-IOV as sysfs shows it: a physical function's (PF) VF count and the
//! virtual functions (VFs) it has made.
//!
//! The kernel's rules vfiod works with (measured on 6.12, see the VM
//! tier):
//! - `sriov_numvfs` goes from 0 to N or from N to 0; N to M answers EBUSY,
//!   a count above `sriov_totalvfs` ERANGE, a PF whose driver cannot make
//!   VFs (none, or vfio-pci without `enable_sriov`) ENOENT. A driver may
//!   enable fewer than asked: the count read back is the truth.
//! - Each VF is probed by a host driver as it appears unless the PF's
//!   `sriov_drivers_autoprobe` is 0; then only a VF with a
//!   `driver_override` is probed (`pci_device_can_probe`).
//! - While a write of 0 waits for a VF someone holds, reading
//!   `sriov_numvfs` blocks too; `sriov_totalvfs`, the autoprobe flag and the
//!   `virtfnN` links stay readable. So the VFs are counted from the links.

use std::fs;
use std::path::PathBuf;

use super::sysfs::{parse_hex, read_trimmed};
use super::{PciAddress, Sysfs};

/// What a PF's SR-IOV attributes say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovState {
    /// `sriov_totalvfs`: the most VFs the PF can have.
    pub total_vfs: u32,
    /// VFs that exist now (`virtfnN` links), in index order.
    pub vfs: Vec<PciAddress>,
    /// `sriov_vf_device`: the device ID every VF has.
    pub vf_device_id: Option<u16>,
    /// `sriov_drivers_autoprobe`: whether a new VF is probed by a host
    /// driver.
    pub drivers_autoprobe: Option<bool>,
}

impl SriovState {
    /// VFs enabled now.
    pub fn num_vfs(&self) -> u32 {
        self.vfs.len() as u32
    }
}

impl Sysfs {
    /// `sriov_numvfs` of `pf`: what the VF count is written to.
    pub fn sriov_numvfs_path(&self, pf: &PciAddress) -> PathBuf {
        self.device_dir(pf).join("sriov_numvfs")
    }

    /// `sriov_drivers_autoprobe` of `pf`.
    pub fn sriov_autoprobe_path(&self, pf: &PciAddress) -> PathBuf {
        self.device_dir(pf).join("sriov_drivers_autoprobe")
    }

    /// The SR-IOV state of `pf`; `None` when it is not an SR-IOV PF (no
    /// `sriov_totalvfs`) or is gone. Never reads `sriov_numvfs`, which
    /// blocks while a count change waits in the kernel.
    pub fn sriov(&self, pf: &PciAddress) -> Option<SriovState> {
        let dir = self.device_dir(pf);
        let total_vfs = read_trimmed(&dir.join("sriov_totalvfs"))
            .ok()?
            .parse()
            .ok()?;
        Some(SriovState {
            total_vfs,
            vfs: self.virtfns(pf),
            vf_device_id: read_trimmed(&dir.join("sriov_vf_device"))
                .ok()
                .and_then(|s| parse_hex(&s))
                .map(|v| v as u16),
            drivers_autoprobe: read_trimmed(&dir.join("sriov_drivers_autoprobe"))
                .ok()
                .map(|s| s != "0"),
        })
    }

    /// The VFs of `pf` in index order (its `virtfn0`, `virtfn1`, ... links).
    pub fn virtfns(&self, pf: &PciAddress) -> Vec<PciAddress> {
        let mut found: Vec<(u32, PciAddress)> = fs::read_dir(self.device_dir(pf))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name();
                        let index = name.to_str()?.strip_prefix("virtfn")?.parse().ok()?;
                        let target = fs::read_link(e.path()).ok()?;
                        let addr = target.file_name()?.to_str()?.parse().ok()?;
                        Some((index, addr))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found.into_iter().map(|(_, a)| a).collect()
    }

    /// The PF of a VF (its `physfn` link) and the VF's index there; `None`
    /// for anything that is not a VF.
    pub fn physfn(&self, vf: &PciAddress) -> Option<(PciAddress, u32)> {
        let target = fs::read_link(self.device_dir(vf).join("physfn")).ok()?;
        let pf: PciAddress = target.file_name()?.to_str()?.parse().ok()?;
        let index = self.virtfns(&pf).iter().position(|a| a == vf)? as u32;
        Some((pf, index))
    }

    /// Whether vfio-pci was loaded with `enable_sriov=1`: without it, a PF
    /// on vfio-pci cannot make VFs.
    pub fn vfio_pci_enables_sriov(&self) -> bool {
        read_trimmed(&self.root().join("module/vfio_pci/parameters/enable_sriov"))
            .is_ok_and(|v| v == "Y" || v == "1")
    }

    /// The NUMA node the function is attached to; `None` when the platform
    /// does not say (`-1`).
    pub fn numa_node(&self, addr: &PciAddress) -> Option<u32> {
        read_trimmed(&self.device_dir(addr).join("numa_node"))
            .ok()?
            .parse::<i64>()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
    }
}
