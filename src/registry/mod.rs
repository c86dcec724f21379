//! The device registry: what vfiod has been asked to set aside, and what it
//! did to each device. Held in memory, indexed by id, name and address; the
//! core persists every version of it through [`store::Store`] before anyone
//! sees it.

pub mod store;
mod v1;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pci::{is_vfio_driver, PciAddress};

/// A function that vfiod moved together with a registered device because
/// they share its IOMMU group (`with_group`); restored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Companion {
    pub pci_address: PciAddress,
    pub original_driver: Option<String>,
}

/// The process an attachment follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProcess {
    pub pid: u32,
    pub start_time: u64,
}

/// A driver move that was recorded before vfiod touched the hardware and
/// has not been confirmed finished: after a crash, startup finishes or
/// undoes it according to this record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum PendingOp {
    /// A move to vfio: the functions it takes along and the consoles it
    /// releases are recorded with it, so that a crash can be undone.
    Bind {
        vfio_driver: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        companions: Vec<Companion>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        released_consoles: Vec<String>,
    },
    Unbind,
    /// A reset; `restore_reset_method` is the kernel's `reset_method` list
    /// to put back if vfiod changed it to select a method.
    Reset {
        #[serde(default)]
        restore_reset_method: Option<String>,
    },
}

/// Whether a device is fit to be handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    Ok,
    /// Released (or a reset failed) and not reset successfully since: it is
    /// reset before it is attached again.
    NeedsReset,
    /// Too many consecutive failed resets: never attached or bound until a
    /// successful explicit reset.
    Quarantined,
    /// Config space read all ones: the function is gone until the host
    /// reboots (or it is re-plugged and answers again).
    NeedsHostReboot,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::NeedsReset => "needs_reset",
            Health::Quarantined => "quarantined",
            Health::NeedsHostReboot => "needs_host_reboot",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetResult {
    Ok,
    Failed,
    /// The write did not return in time; the device was marked stuck.
    Timeout,
}

/// The wire name (`timeout`), serde's own so the two cannot differ.
impl std::fmt::Display for ResetResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.serialize(f)
    }
}

/// The last reset vfiod did (or tried) on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReset {
    /// The method asked for (`auto` or a kernel method name).
    pub method: String,
    pub at: DateTime<Utc>,
    pub result: ResetResult,
    pub duration_ms: u64,
}

/// vfiod's own binding of a device to vfio: there exactly when vfiod put
/// the device on vfio and owes it a give-back. A device found on vfio-pci
/// at registration has none: it is not vfiod's to undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The vfio driver vfiod bound (plain vfio-pci or a variant).
    pub vfio_driver: String,
    /// Functions of the device's IOMMU group moved with it (`with_group`),
    /// given back with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<Companion>,
    /// Framebuffer consoles (`vtconN`) vfiod took off the device's
    /// framebuffer to move it; bound again when the device is given back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released_consoles: Vec<String>,
}

/// The device is handed to one instance: there exactly while it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub instance: String,
    /// The uid the attachment grants the VFIO nodes to (the VMM's user);
    /// `None` only in records from before grants existed.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The VMM process whose exit ends the attachment, with its start time
    /// (clock ticks since boot, /proc/PID/stat) so that a reused pid is
    /// never taken for it.
    #[serde(default)]
    pub pid: Option<AttachedProcess>,
}

/// How fit the device is to be handed out, with why, and its resets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    #[serde(default)]
    pub state: Health,
    /// Why it is not `ok` (none when it is).
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub last_reset: Option<LastReset>,
    /// Failed resets since the last successful one.
    #[serde(default)]
    pub reset_failures: u32,
}

impl HealthRecord {
    /// Sets the state and its reason together (back to `ok` clears it).
    pub fn set(&mut self, state: Health, reason: Option<String>) {
        self.state = state;
        self.reason = if state == Health::Ok { None } else { reason };
    }
}

/// One registered device. What vfiod did to it is in parts that are there
/// or absent ([`Binding`], [`Attachment`], a [`PendingOp`]), so the record
/// cannot say a device is attached without saying to whom, or bound by
/// vfiod without the driver to give it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub name: String,
    pub pci_address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    pub class: u32,
    pub iommu_group: Option<u32>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The driver to give the device back to; recorded before a bind.
    #[serde(default)]
    pub original_driver: Option<String>,
    #[serde(default)]
    pub binding: Option<Binding>,
    #[serde(default)]
    pub attachment: Option<Attachment>,
    #[serde(default)]
    pub pending: Option<PendingOp>,
    /// Last observed state of the hardware; refreshed from sysfs at startup
    /// and by hotplug and driver events.
    #[serde(default)]
    pub present: bool,
    #[serde(default)]
    pub current_driver: Option<String>,
    /// A sysfs write for this device timed out in the kernel; vfiod does not
    /// know which driver it ends up on until the kernel answers.
    #[serde(default)]
    pub stuck: bool,
    /// Something else answered at this address after a hot-unplug.
    #[serde(default)]
    pub identity_mismatch: bool,
    #[serde(default)]
    pub health: HealthRecord,
    /// The operator's reset method order for this device (`PATCH
    /// reset_method`), used instead of the kernel's for `auto`.
    #[serde(default)]
    pub reset_method: Option<Vec<String>>,
}

impl DeviceRecord {
    /// The record of function `f` as it is registered: identity and driver
    /// as sysfs shows them now, nothing attached, moved or reset yet.
    pub fn registered(
        id: String,
        name: String,
        f: &crate::pci::PciFunction,
        tags: BTreeMap<String, String>,
    ) -> DeviceRecord {
        DeviceRecord {
            id,
            name,
            pci_address: f.address,
            vendor_id: f.vendor_id,
            device_id: f.device_id,
            subsystem_vendor_id: f.subsystem_vendor_id,
            subsystem_device_id: f.subsystem_device_id,
            class: f.class,
            iommu_group: f.iommu_group,
            created_at: Utc::now(),
            tags,
            original_driver: f.driver.clone().filter(|d| !is_vfio_driver(d)),
            binding: None,
            attachment: None,
            pending: None,
            present: true,
            current_driver: f.driver.clone(),
            stuck: false,
            identity_mismatch: false,
            health: HealthRecord::default(),
            reset_method: None,
        }
    }

    /// Whether `f` is the device that was registered (vendor, device and
    /// subsystem IDs); checked when something reappears at its address.
    pub fn is_same_device(&self, f: &crate::pci::PciFunction) -> bool {
        self.vendor_id == f.vendor_id
            && self.device_id == f.device_id
            && self.subsystem_vendor_id == f.subsystem_vendor_id
            && self.subsystem_device_id == f.subsystem_device_id
    }

    pub fn bound_to_vfio(&self) -> bool {
        self.present && self.current_driver.as_deref().is_some_and(is_vfio_driver)
    }

    /// vfiod put the device on vfio and owes it a give-back.
    pub fn bound_by_vfiod(&self) -> bool {
        self.binding.is_some()
    }

    /// The instance the device is attached to.
    pub fn attached_to(&self) -> Option<&str> {
        self.attachment.as_ref().map(|a| a.instance.as_str())
    }

    /// The uid an attachment grants the VFIO nodes to.
    pub fn attached_uid(&self) -> Option<u32> {
        self.attachment.as_ref().and_then(|a| a.uid)
    }

    /// The VMM process an attachment follows.
    pub fn attached_pid(&self) -> Option<AttachedProcess> {
        self.attachment.as_ref().and_then(|a| a.pid)
    }

    /// The functions moved with the device: those of its binding, or of the
    /// bind it has pending.
    pub fn companions(&self) -> &[Companion] {
        match (&self.pending, &self.binding) {
            (Some(PendingOp::Bind { companions, .. }), _) => companions,
            (_, Some(b)) => &b.companions,
            _ => &[],
        }
    }

    /// The consoles released for the device's binding, or its pending bind.
    pub fn released_consoles(&self) -> &[String] {
        match (&self.pending, &self.binding) {
            (
                Some(PendingOp::Bind {
                    released_consoles, ..
                }),
                _,
            ) => released_consoles,
            (_, Some(b)) => &b.released_consoles,
            _ => &[],
        }
    }
}

/// The registry proper. `devices` is keyed by address (unique on a host);
/// the id and name indexes point into it.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    devices: BTreeMap<PciAddress, DeviceRecord>,
    by_id: HashMap<String, PciAddress>,
    by_name: HashMap<String, PciAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryConflict {
    #[error("name {0:?} is already taken")]
    Name(String),
    #[error("PCI address {0} is already registered")]
    Address(PciAddress),
    #[error("id {0:?} is already taken")]
    Id(String),
}

impl Registry {
    pub fn from_records(
        records: impl IntoIterator<Item = DeviceRecord>,
    ) -> Result<Self, RegistryConflict> {
        let mut registry = Registry::default();
        for r in records {
            registry.insert(r)?;
        }
        Ok(registry)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn get_by_address(&self, addr: &PciAddress) -> Option<&DeviceRecord> {
        self.devices.get(addr)
    }

    pub fn get_mut_by_address(&mut self, addr: &PciAddress) -> Option<&mut DeviceRecord> {
        self.devices.get_mut(addr)
    }

    /// Looks up by id first, then by name, as hypeman does.
    pub fn resolve(&self, id_or_name: &str) -> Option<&DeviceRecord> {
        let addr = self
            .by_id
            .get(id_or_name)
            .or_else(|| self.by_name.get(id_or_name))?;
        self.devices.get(addr)
    }

    pub fn insert(&mut self, record: DeviceRecord) -> Result<(), RegistryConflict> {
        if self.devices.contains_key(&record.pci_address) {
            return Err(RegistryConflict::Address(record.pci_address));
        }
        if self.by_name.contains_key(&record.name) {
            return Err(RegistryConflict::Name(record.name));
        }
        if self.by_id.contains_key(&record.id) {
            return Err(RegistryConflict::Id(record.id));
        }
        self.by_id.insert(record.id.clone(), record.pci_address);
        self.by_name.insert(record.name.clone(), record.pci_address);
        self.devices.insert(record.pci_address, record);
        Ok(())
    }

    pub fn remove(&mut self, addr: &PciAddress) -> Option<DeviceRecord> {
        let record = self.devices.remove(addr)?;
        self.by_id.remove(&record.id);
        self.by_name.remove(&record.name);
        Some(record)
    }

    pub fn rename(&mut self, addr: &PciAddress, new_name: &str) -> Result<(), RegistryConflict> {
        match self.by_name.get(new_name) {
            Some(owner) if owner == addr => return Ok(()),
            Some(_) => return Err(RegistryConflict::Name(new_name.to_owned())),
            None => {}
        }
        let Some(record) = self.devices.get_mut(addr) else {
            return Ok(());
        };
        self.by_name.remove(&record.name);
        record.name = new_name.to_owned();
        self.by_name.insert(new_name.to_owned(), *addr);
        Ok(())
    }

    /// The registered device that `addr` belongs to: itself, or the device
    /// it was moved with as a group companion.
    pub fn owner_of(&self, addr: &PciAddress) -> Option<&DeviceRecord> {
        self.devices.get(addr).or_else(|| {
            self.devices
                .values()
                .find(|d| d.companions().iter().any(|c| &c.pci_address == addr))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(addr: &str, name: &str, id: &str) -> DeviceRecord {
        let gpu = crate::pci::PciFunction {
            address: addr.parse().unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2236,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x030200,
            driver: Some("nvidia".into()),
            iommu_group: Some(1),
            modalias: None,
        };
        DeviceRecord::registered(id.into(), name.into(), &gpu, BTreeMap::new())
    }

    #[test]
    fn resolves_by_id_before_name() {
        let mut r = Registry::default();
        r.insert(record("0000:01:00.0", "gpu0", "aaaa")).unwrap();
        // A device whose *name* equals the other's id: id wins.
        r.insert(record("0000:02:00.0", "aaaa", "bbbb")).unwrap();
        assert_eq!(r.resolve("aaaa").unwrap().name, "gpu0");
        assert_eq!(r.resolve("bbbb").unwrap().name, "aaaa");
        assert_eq!(r.resolve("gpu0").unwrap().id, "aaaa");
        assert!(r.resolve("nope").is_none());
    }

    #[test]
    fn rejects_duplicate_address_and_name_and_keeps_indexes_in_step() {
        let mut r = Registry::default();
        r.insert(record("0000:01:00.0", "gpu0", "a")).unwrap();
        assert!(matches!(
            r.insert(record("0000:01:00.0", "other", "b")),
            Err(RegistryConflict::Address(_))
        ));
        assert!(matches!(
            r.insert(record("0000:02:00.0", "gpu0", "b")),
            Err(RegistryConflict::Name(_))
        ));
        let addr = "0000:01:00.0".parse().unwrap();
        r.rename(&addr, "renamed").unwrap();
        assert!(r.resolve("gpu0").is_none());
        assert!(r.resolve("renamed").is_some());
        r.remove(&addr).unwrap();
        assert!(r.resolve("a").is_none() && r.resolve("renamed").is_none());
        assert!(r.is_empty());
    }
}
