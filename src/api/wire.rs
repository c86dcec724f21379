//! The JSON shapes on the wire. `Device` carries hypeman's fields exactly
//! (names, types, `null`s) followed by vfiod's extensions.

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use serde::Serialize;

use crate::core::Health;
use crate::pci::{device_type, is_vfio_driver, PciAddress, PciFunction, PciIds};
use crate::registry::{DeviceRecord, LastReset, PendingOp, ResetResult};

#[derive(Debug, Serialize)]
pub struct Device<'a> {
    pub id: &'a str,
    pub name: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pci_address: PciAddress,
    pub vendor_id: String,
    pub device_id: String,
    /// -1 when the device has no IOMMU group (IOMMU off).
    pub iommu_group: i64,
    pub bound_to_vfio: bool,
    pub attached_to: Option<&'a str>,
    pub created_at: String,
    pub tags: &'a BTreeMap<String, String>,
    // Extensions.
    pub present: bool,
    pub current_driver: Option<&'a str>,
    pub original_driver: Option<&'a str>,
    pub bound_by_vfiod: bool,
    pub vendor_name: Option<&'a str>,
    pub device_name: Option<&'a str>,
    pub class: String,
    pub subsystem_vendor_id: String,
    pub subsystem_device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<&'static str>,
    pub stuck: bool,
    pub identity_mismatch: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub group_companions: Vec<PciAddress>,
    /// The uid the attachment opens the VFIO nodes to; null when detached.
    pub attached_uid: Option<u32>,
    /// The VMM process whose exit ends the attachment, if one was named.
    pub attached_pid: Option<u32>,
    /// ok, needs_reset, quarantined, needs_host_reboot.
    pub health: &'static str,
    pub health_reason: Option<&'a str>,
    pub last_reset: Option<LastResetWire<'a>>,
    /// The device's own reset method order (PATCH), or null for the
    /// kernel's.
    pub reset_method: Option<&'a [String]>,
}

#[derive(Debug, Serialize)]
pub struct LastResetWire<'a> {
    pub method: &'a str,
    pub at: String,
    pub result: ResetResult,
    pub duration_ms: u64,
}

impl<'a> LastResetWire<'a> {
    fn new(r: &'a LastReset) -> Self {
        LastResetWire {
            method: &r.method,
            at: r.at.to_rfc3339_opts(SecondsFormat::Millis, true),
            result: r.result,
            duration_ms: r.duration_ms,
        }
    }
}

fn hex4(v: u16) -> String {
    format!("{v:04x}")
}

fn hex6(v: u32) -> String {
    format!("{v:06x}")
}

impl<'a> Device<'a> {
    pub fn new(d: &'a DeviceRecord, ids: &'a PciIds) -> Device<'a> {
        Device {
            id: &d.id,
            name: &d.name,
            kind: device_type(d.class),
            pci_address: d.pci_address,
            vendor_id: hex4(d.vendor_id),
            device_id: hex4(d.device_id),
            iommu_group: d.iommu_group.map_or(-1, i64::from),
            bound_to_vfio: d.bound_to_vfio(),
            attached_to: d.attached_to.as_deref(),
            created_at: d.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            tags: &d.tags,
            present: d.present,
            current_driver: d.current_driver.as_deref(),
            original_driver: d.original_driver.as_deref(),
            bound_by_vfiod: d.bound_by_vfiod,
            vendor_name: ids.vendor_name(d.vendor_id),
            device_name: ids.device_name(d.vendor_id, d.device_id),
            class: hex6(d.class),
            subsystem_vendor_id: hex4(d.subsystem_vendor_id),
            subsystem_device_id: hex4(d.subsystem_device_id),
            pending: d.pending.as_ref().map(|p| match p {
                PendingOp::Bind { .. } => "bind",
                PendingOp::Unbind => "unbind",
                PendingOp::Reset { .. } => "reset",
            }),
            stuck: d.stuck,
            identity_mismatch: d.identity_mismatch,
            group_companions: d.companions.iter().map(|c| c.pci_address).collect(),
            health: d.health.as_str(),
            health_reason: d.health_reason.as_deref(),
            last_reset: d.last_reset.as_ref().map(LastResetWire::new),
            reset_method: d.reset_method.as_deref(),
            attached_uid: d.attached_to.as_ref().and(d.attached_uid),
            attached_pid: d.attached_pid.map(|p| p.pid),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AvailableDevice<'a> {
    pub pci_address: PciAddress,
    pub vendor_id: String,
    pub device_id: String,
    /// Left out, not `null`, when `pci.ids` has no name: hypeman's schema
    /// has these as optional strings that are never null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_name: Option<&'a str>,
    /// -1 when the device has no IOMMU group.
    pub iommu_group: i64,
    pub current_driver: Option<&'a str>,
    // Extensions.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub class: String,
    pub bound_to_vfio: bool,
    /// The registered device's id, if any.
    pub registered_id: Option<&'a str>,
}

impl<'a> AvailableDevice<'a> {
    pub fn new(f: &'a PciFunction, ids: &'a PciIds, registered_id: Option<&'a str>) -> Self {
        AvailableDevice {
            pci_address: f.address,
            vendor_id: hex4(f.vendor_id),
            device_id: hex4(f.device_id),
            vendor_name: ids.vendor_name(f.vendor_id),
            device_name: ids.device_name(f.vendor_id, f.device_id),
            iommu_group: f.iommu_group.map_or(-1, i64::from),
            current_driver: f.driver.as_deref(),
            kind: device_type(f.class),
            class: hex6(f.class),
            bound_to_vfio: f.driver.as_deref().is_some_and(is_vfio_driver),
            registered_id,
        }
    }
}

/// A change asked for with `dry_run` (`POST .../bind`: a `BindPlan`;
/// `POST .../reset`: a `ResetPlan`): the device, the plan, nothing done.
#[derive(Debug, Serialize)]
pub struct DryRun<'a, Plan> {
    pub dry_run: bool,
    pub device: Device<'a>,
    pub plan: &'a Plan,
}

impl<'a, Plan> DryRun<'a, Plan> {
    pub fn new(device: Device<'a>, plan: &'a Plan) -> Self {
        DryRun {
            dry_run: true,
            device,
            plan,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HealthBody<'a> {
    pub status: &'static str,
    #[serde(flatten)]
    pub health: &'a Health,
}

/// `GET /devices/{id_or_name}/holders`.
#[derive(Debug, Serialize)]
pub struct Holders<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub pci_address: PciAddress,
    pub holders: &'a [crate::pci::holders::Holder],
}
