//! The state file of version 1 (the releases before the record was split
//! into parts): read once and migrated; vfiod writes version 2 from then
//! on. `tests/fixtures/state-v1.json` is such a file, written by the last
//! release that had this format.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{
    AttachedProcess, Attachment, Binding, Companion, DeviceRecord, Health, HealthRecord, LastReset,
    PendingOp,
};
use crate::pci::PciAddress;

/// A version-1 record: every part flat, with `bound_by_vfiod` and
/// `attached_to` standing for the parts.
#[derive(Debug, Deserialize)]
pub(super) struct RecordV1 {
    id: String,
    name: String,
    pci_address: PciAddress,
    vendor_id: u16,
    device_id: u16,
    subsystem_vendor_id: u16,
    subsystem_device_id: u16,
    class: u32,
    iommu_group: Option<u32>,
    created_at: DateTime<Utc>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    attached_to: Option<String>,
    #[serde(default)]
    attached_uid: Option<u32>,
    #[serde(default)]
    attached_pid: Option<AttachedProcess>,
    #[serde(default)]
    original_driver: Option<String>,
    #[serde(default)]
    bound_by_vfiod: bool,
    #[serde(default)]
    vfio_driver: Option<String>,
    #[serde(default)]
    companions: Vec<Companion>,
    #[serde(default)]
    released_consoles: Vec<String>,
    #[serde(default)]
    pending: Option<PendingV1>,
    #[serde(default)]
    present: bool,
    #[serde(default)]
    current_driver: Option<String>,
    #[serde(default)]
    stuck: bool,
    #[serde(default)]
    identity_mismatch: bool,
    #[serde(default)]
    health: Health,
    #[serde(default)]
    health_reason: Option<String>,
    #[serde(default)]
    last_reset: Option<LastReset>,
    #[serde(default)]
    reset_failures: u32,
    #[serde(default)]
    reset_method: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
enum PendingV1 {
    Bind {
        vfio_driver: String,
    },
    Unbind,
    Reset {
        #[serde(default)]
        restore_reset_method: Option<String>,
    },
}

impl From<RecordV1> for DeviceRecord {
    fn from(v1: RecordV1) -> DeviceRecord {
        // Version 1 kept a pending bind's companions and consoles flat,
        // beside those of an earlier binding: they go with the pending bind
        // when there is one (its rollback needs them), else with the binding.
        let pending_bind = matches!(v1.pending, Some(PendingV1::Bind { .. }));
        let binding = v1.bound_by_vfiod.then(|| Binding {
            vfio_driver: v1
                .vfio_driver
                .clone()
                .unwrap_or_else(|| crate::pci::VFIO_PCI.to_owned()),
            companions: if pending_bind {
                Vec::new()
            } else {
                v1.companions.clone()
            },
            released_consoles: if pending_bind {
                Vec::new()
            } else {
                v1.released_consoles.clone()
            },
        });
        let pending = v1.pending.map(|p| match p {
            PendingV1::Bind { vfio_driver } => PendingOp::Bind {
                vfio_driver,
                companions: v1.companions,
                released_consoles: v1.released_consoles,
            },
            PendingV1::Unbind => PendingOp::Unbind,
            PendingV1::Reset {
                restore_reset_method,
            } => PendingOp::Reset {
                restore_reset_method,
            },
        });
        let attachment = v1.attached_to.map(|instance| Attachment {
            instance,
            uid: v1.attached_uid,
            pid: v1.attached_pid,
        });
        let mut health = HealthRecord {
            last_reset: v1.last_reset,
            reset_failures: v1.reset_failures,
            ..HealthRecord::default()
        };
        health.set(v1.health, v1.health_reason);
        DeviceRecord {
            id: v1.id,
            name: v1.name,
            pci_address: v1.pci_address,
            vendor_id: v1.vendor_id,
            device_id: v1.device_id,
            subsystem_vendor_id: v1.subsystem_vendor_id,
            subsystem_device_id: v1.subsystem_device_id,
            class: v1.class,
            iommu_group: v1.iommu_group,
            created_at: v1.created_at,
            tags: v1.tags,
            original_driver: v1.original_driver,
            binding,
            attachment,
            pending,
            present: v1.present,
            current_driver: v1.current_driver,
            vfio_provider: None,
            stuck: v1.stuck,
            identity_mismatch: v1.identity_mismatch,
            health,
            reset_method: v1.reset_method,
            sriov: None,
            vf: None,
            claim: None,
            mdevs: Vec::new(),
        }
    }
}
