//! The device registry: what vfiod has been asked to set aside, and what it
//! did to each device. Held in memory, indexed by id, name and address; the
//! core persists every version of it through [`store::Store`] before anyone
//! sees it.

pub mod store;
mod v1;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pci::{is_vfio_driver, MdevUuid, PciAddress};

/// A function that vfiod moved together with a registered device because
/// they share its IOMMU group (`with_group`); restored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Companion {
    /// The companion's own address; it has no record of its own.
    pub pci_address: PciAddress,
    /// The driver to give it back to; `None` if it had none.
    pub original_driver: Option<String>,
}

/// The process an attachment follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProcess {
    /// The VMM's pid; alone it could name a later process that reused it.
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot): with `pid`, names
    /// one process for good.
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
        /// The vfio driver being bound (vfio-pci or a variant driver).
        vfio_driver: String,
        /// Group functions moved with it, with the drivers to give back.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        companions: Vec<Companion>,
        /// `vtconN` consoles unbound so the framebuffer lets go.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        released_consoles: Vec<String>,
    },
    /// A give-back to the original driver; the record's `original_driver` says
    /// where to.
    Unbind,
    /// A reset; `restore_reset_method` is the kernel's `reset_method` list
    /// to put back if vfiod changed it to select a method.
    Reset {
        /// `None`: vfiod left the kernel's `reset_method` alone.
        #[serde(default)]
        restore_reset_method: Option<String>,
    },
}

/// Whether a device is fit to be handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Fit to be handed out; no reason recorded.
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
    /// The wire and metrics spelling, as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::NeedsReset => "needs_reset",
            Health::Quarantined => "quarantined",
            Health::NeedsHostReboot => "needs_host_reboot",
        }
    }
}

/// How the last reset ended, as shown in `last_reset.result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetResult {
    /// The reset went through.
    Ok,
    /// The reset was refused or failed; counts in `reset_failures`.
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
    /// When the reset returned (UTC).
    pub at: DateTime<Utc>,
    /// How it ended.
    pub result: ResetResult,
    /// Wall time of the engine's reset, in milliseconds.
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
    /// The caller's instance id, opaque to vfiod; `InUse` errors name it.
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
    /// `Ok` unless a reset is owed or failed; gates attach and bind.
    #[serde(default)]
    pub state: Health,
    /// Why it is not `ok` (none when it is).
    #[serde(default)]
    pub reason: Option<String>,
    /// `None` until vfiod first resets the device.
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

/// What a PF's new VFs are given (`vf_driver` of `PUT .../sriov`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfDriver {
    /// Bound straight to vfio-pci; no host driver ever probes them.
    #[default]
    #[serde(rename = "vfio-pci")]
    VfioPci,
    /// Left without a driver until bound or claimed.
    #[serde(rename = "none")]
    None,
    /// Probed by their host driver, as the kernel does by itself.
    #[serde(rename = "native")]
    Native,
}

impl VfDriver {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VfDriver::VfioPci => "vfio-pci",
            VfDriver::None => "none",
            VfDriver::Native => "native",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<VfDriver> {
        [VfDriver::VfioPci, VfDriver::None, VfDriver::Native]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// A PF's declared VF count: kept across reboots and re-plugs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovConfig {
    /// The VF count asked for; vfiod makes the kernel's count equal it.
    pub desired_vfs: u32,
    /// What the VFs are given once made.
    #[serde(default)]
    pub vf_driver: VfDriver,
    /// The PF's `sriov_drivers_autoprobe` before vfiod set it to 0,
    /// recorded before the write: put back when the count returns to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_autoprobe: Option<bool>,
}

/// How a claim's `numa_node` binds the pick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumaPolicy {
    /// Only devices on that node are considered.
    Required,
    /// Devices on that node first, then the others.
    #[default]
    Preferred,
}

/// A claim as asked (`POST /devices/claim`), recorded on the device it
/// picked before anything is written: the same instance asking the same
/// again gets the same device, asking something else is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Every tag must match (the `resource` tag names a pool).
    pub tags: BTreeMap<String, String>,
    /// The claim's key: the same instance asking again gets the same device.
    pub instance_id: String,
    /// The uid the VFIO nodes are opened to (default: the caller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The VMM whose exit ends the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The VM's NUMA node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Whether `numa_node` is a must or a preference.
    #[serde(default)]
    pub numa: NumaPolicy,
    /// An NVIDIA vGPU type (name or ID) the device must be able to take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vgpu_type: Option<String>,
    /// A legacy mdev type (id or name): the claim gets a mediated device of
    /// that type made on a parent, not a whole device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev_type: Option<String>,
}

/// A mediated device vfiod made on its parent for a claim. Recorded, with
/// `attachment: None`, before the UUID is written to `create`; the
/// attachment is recorded once the device exists, before its grant. A
/// record without an attachment is an unfinished hand-out: a restart
/// removes the device if the kernel made it, and drops the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediatedDevice {
    /// Chosen by vfiod before the create; the same across re-creations, so
    /// the VM's `sysfsdev=` path stays valid.
    pub uuid: MdevUuid,
    /// The type directory's name (`nvidia-63`).
    pub mdev_type: String,
    /// The claim as asked (its `instance_id` is the key).
    pub claim: Claim,
    /// Who it is handed to; `None` while it is being made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
}

/// A VF vfiod made: its record lives exactly as long as the kernel's VF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualFunction {
    /// The PF's registry id (the wire's `parent`).
    pub parent_id: String,
    /// The PF's address.
    pub parent_address: PciAddress,
    /// N of the PF's `virtfnN`.
    pub index: u32,
}

/// One registered device. What vfiod did to it is in parts that are there
/// or absent ([`Binding`], [`Attachment`], a [`PendingOp`]), so the record
/// cannot say a device is attached without saying to whom, or bound by
/// vfiod without the driver to give it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Stable id given at registration, never reused; unique in the registry.
    pub id: String,
    /// Operator-chosen, unique, changeable with PATCH; `resolve` tries it after
    /// the id.
    pub name: String,
    /// Unique key of the registry: one record per function.
    pub pci_address: PciAddress,
    /// From config space at registration; with the three below, the identity
    /// checked when the address reappears.
    pub vendor_id: u16,
    /// From config space at registration.
    pub device_id: u16,
    /// Tells apart boards that share a chip.
    pub subsystem_vendor_id: u16,
    /// Tells apart boards that share a chip.
    pub subsystem_device_id: u16,
    /// 24-bit class code (class, subclass, prog-if), as in sysfs `class`.
    pub class: u32,
    /// `None` when the IOMMU is off; such a device cannot go to vfio.
    pub iommu_group: Option<u32>,
    /// Registration time (UTC); never changed afterwards.
    pub created_at: DateTime<Utc>,
    /// The caller's labels; checked by `core::types` before they get here.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The driver to give the device back to; recorded before a bind.
    #[serde(default)]
    pub original_driver: Option<String>,
    /// Present exactly while vfiod owes the device a give-back.
    #[serde(default)]
    pub binding: Option<Binding>,
    /// Present exactly while the device is handed to an instance.
    #[serde(default)]
    pub attachment: Option<Attachment>,
    /// A move written down before it started; startup finishes or undoes it.
    #[serde(default)]
    pub pending: Option<PendingOp>,
    /// Last observed state of the hardware; refreshed from sysfs at startup
    /// and by hotplug and driver events.
    #[serde(default)]
    pub present: bool,
    /// The driver sysfs showed last; `None` when unbound or absent.
    #[serde(default)]
    pub current_driver: Option<String>,
    /// A driver other than a vfio one that the kernel showed to be the
    /// function's own VFIO provider (`nvidia` of a vGPU VF, which makes its
    /// `vfio-dev/`), noted whenever vfiod reads the function's driver.
    /// Compared with `current_driver`, so a move away needs no clearing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_provider: Option<String>,
    /// A sysfs write for this device timed out in the kernel; vfiod does not
    /// know which driver it ends up on until the kernel answers.
    #[serde(default)]
    pub stuck: bool,
    /// Something else answered at this address after a hot-unplug.
    #[serde(default)]
    pub identity_mismatch: bool,
    /// Reset bookkeeping; persisted so that quarantine survives restarts.
    #[serde(default)]
    pub health: HealthRecord,
    /// The operator's reset method order for this device (`PATCH
    /// reset_method`), used instead of the kernel's for `auto`.
    #[serde(default)]
    pub reset_method: Option<Vec<String>>,
    /// On a PF: the VF count vfiod keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sriov: Option<SriovConfig>,
    /// On a VF vfiod made: its PF and index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf: Option<VirtualFunction>,
    /// The claim that picked the device: recorded before it was bound and
    /// granted, kept while its attachment lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// On an mdev parent: the mediated devices vfiod made on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mdevs: Vec<MediatedDevice>,
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
            vfio_provider: None,
            stuck: false,
            identity_mismatch: false,
            health: HealthRecord::default(),
            reset_method: None,
            sriov: None,
            vf: None,
            claim: None,
            mdevs: Vec::new(),
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

    /// On a vfio driver now, whoever put it there (see
    /// [`DeviceRecord::bound_by_vfiod`]); what the move logic asks. A vGPU
    /// VF on its own provider is not, yet usable (see
    /// [`DeviceRecord::usable_through_vfio`]).
    pub fn bound_to_vfio(&self) -> bool {
        self.present && self.current_driver.as_deref().is_some_and(is_vfio_driver)
    }

    /// Usable by a VMM through VFIO as it is: on a vfio driver, or on a
    /// driver that is its own VFIO provider. The wire's `bound_to_vfio`
    /// (hypeman's meaning); the move logic asks [`DeviceRecord::bound_to_vfio`].
    pub fn usable_through_vfio(&self) -> bool {
        self.bound_to_vfio()
            || (self.present
                && self.current_driver.is_some()
                && self.current_driver == self.vfio_provider)
    }

    /// Notes what the kernel showed with the driver just recorded in
    /// `current_driver`: `provider` is that driver when it is the
    /// function's own VFIO provider ([`crate::pci::Sysfs::own_vfio_provider`]).
    /// A non-vfio driver that no longer provides VFIO is forgotten; a read
    /// under a vfio driver or none says nothing about the native one.
    pub fn note_vfio_provider(&mut self, provider: Option<String>) {
        if provider.is_some() {
            self.vfio_provider = provider;
        } else if self
            .current_driver
            .as_deref()
            .is_some_and(|d| !is_vfio_driver(d))
            && self.current_driver == self.vfio_provider
        {
            self.vfio_provider = None;
        }
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

/// Why a record cannot go in: each of id, name and address is unique.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryConflict {
    /// Another device has the name.
    #[error("name {0:?} is already taken")]
    Name(String),
    /// The function is already registered (under whatever name).
    #[error("PCI address {0} is already registered")]
    Address(PciAddress),
    /// Only on loading a hand-edited or corrupt store: ids are generated
    /// unique.
    #[error("id {0:?} is already taken")]
    Id(String),
}

impl Registry {
    /// Rebuilds the indexes from stored records; a duplicate means a corrupt
    /// store.
    pub fn from_records(
        records: impl IntoIterator<Item = DeviceRecord>,
    ) -> Result<Self, RegistryConflict> {
        let mut registry = Registry::default();
        for r in records {
            registry.insert(r)?;
        }
        Ok(registry)
    }

    /// Registered devices, companions not counted.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// No device registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Records in address order, which the device list keeps.
    pub fn iter(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    /// By the record's own address only; companions are found with
    /// [`Registry::owner_of`].
    pub fn get_by_address(&self, addr: &PciAddress) -> Option<&DeviceRecord> {
        self.devices.get(addr)
    }

    /// Callers must not change `id`, `name` or `pci_address` through this: the
    /// indexes would go stale (use `rename`).
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

    /// Adds a record, refusing a taken address, name or id; nothing changes on
    /// refusal.
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

    /// Drops the record and its index entries.
    pub fn remove(&mut self, addr: &PciAddress) -> Option<DeviceRecord> {
        let record = self.devices.remove(addr)?;
        self.by_id.remove(&record.id);
        self.by_name.remove(&record.name);
        Some(record)
    }

    /// Renames keeping the name index true; renaming to its own name is a
    /// no-op, an unknown address too.
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
            own_vfio_provider: false,
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
