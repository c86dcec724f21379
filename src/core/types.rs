//! Request types of the core, validated at the edge: names, tags, instance ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::Move;
use crate::error::CoreError;
use crate::pci::holders::Holder;
use crate::pci::PciAddress;
use crate::registry::DeviceRecord;

/// hypeman sets no length limit for names; this one only keeps logs and
/// paths sane.
pub const MAX_NAME: usize = 255;

/// Names no device can have: they are paths under `/devices`.
pub const RESERVED_NAMES: &[&str] = &["available", "claim", "capacity"];

/// A device name, validated: hypeman's `^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`, at
/// most [`MAX_NAME`] characters, and not a word the API uses as a path
/// segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceName(pub(crate) String);

impl DeviceName {
    /// Refuses, with a message naming the rule, anything hypeman would refuse,
    /// and `available`.
    pub fn parse(s: &str) -> Result<DeviceName, CoreError> {
        let mut chars = s.chars();
        let valid = s.len() >= 2
            && s.len() <= MAX_NAME
            && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(CoreError::InvalidName(format!(
                "invalid name {:?}: 2 to {MAX_NAME} characters, letters, digits, '_', '.', '-', starting with a letter or digit",
                s.chars().take(80).collect::<String>()
            )));
        }
        if let Some(path) = RESERVED_NAMES.iter().find(|r| **r == s) {
            return Err(CoreError::InvalidName(format!(
                "the name {path:?} is reserved: /devices/{path} is a path of the API"
            )));
        }
        Ok(DeviceName(s.to_owned()))
    }

    /// The validated name, for the registry.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// hypeman's Tags schema, so that tags registered here are valid there too.
/// Most tags on one device (hypeman's limit).
pub const MAX_TAGS: usize = 50;
/// Longest tag key, in bytes (hypeman's limit).
pub const MAX_TAG_KEY: usize = 128;
/// Longest tag value, in bytes; empty values are allowed.
pub const MAX_TAG_VALUE: usize = 256;

/// The characters hypeman allows in tag keys and values:
/// `[A-Za-z0-9 _.:/=+@-]`.
fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '.' | ':' | '/' | '=' | '+' | '@' | '-')
}

/// Tags, validated as hypeman's schema has them: at most 50; keys of 1-128
/// and values of up to 256 characters from `[A-Za-z0-9 _.:/=+@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tags(BTreeMap<String, String>);

impl Tags {
    /// Refuses the whole map on the first bad key or value; the message names
    /// it.
    pub fn parse(map: BTreeMap<String, String>) -> Result<Tags, CoreError> {
        if map.len() > MAX_TAGS {
            return Err(CoreError::InvalidTags(format!(
                "{} tags given, at most {MAX_TAGS} allowed",
                map.len()
            )));
        }
        let shown = |s: &str| s.chars().take(40).collect::<String>();
        for (k, v) in &map {
            if k.is_empty() || k.len() > MAX_TAG_KEY || !k.chars().all(is_tag_char) {
                return Err(CoreError::InvalidTags(format!(
                    "tag key {:?} must be 1 to {MAX_TAG_KEY} characters from A-Z a-z 0-9 and \" _.:/=+@-\"",
                    shown(k)
                )));
            }
            if v.len() > MAX_TAG_VALUE || !v.chars().all(is_tag_char) {
                return Err(CoreError::InvalidTags(format!(
                    "value of tag {:?} must be at most {MAX_TAG_VALUE} characters from A-Z a-z 0-9 and \" _.:/=+@-\"",
                    shown(k)
                )));
            }
        }
        Ok(Tags(map))
    }

    /// The map for the registry record.
    pub fn into_inner(self) -> BTreeMap<String, String> {
        self.0
    }
}

/// An instance id for attach: 1-256 printable characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId(pub(crate) String);

impl InstanceId {
    /// Refuses empty, over-long, or control-character ids, which would garble
    /// logs and events.
    pub fn parse(s: &str) -> Result<InstanceId, CoreError> {
        if s.is_empty() || s.chars().count() > 256 || s.chars().any(char::is_control) {
            return Err(CoreError::InvalidRequest(
                "instance_id must be 1 to 256 characters without control characters".into(),
            ));
        }
        Ok(InstanceId(s.to_owned()))
    }
}

/// `POST /devices/{id_or_name}/attach`: the instance, the uid the VMM
/// runs as (default: the caller's), and the VMM's pid to follow.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// Opaque to vfiod; the caller's handle for the VM.
    pub instance: InstanceId,
    /// The uid to chown the VFIO nodes to; `None`: the caller's own (only root
    /// may name another).
    pub uid: Option<u32>,
    /// The VMM's pid, whose exit detaches the device; `None`: attached until
    /// detached.
    pub pid: Option<u32>,
}

/// What a claim got.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The device handed out, or the parent of the mediated device.
    pub device: DeviceRecord,
    /// False when the same instance's claim was asked again.
    pub created: bool,
    /// The mediated device made for a claim with `mdev_type`.
    pub mdev: Option<crate::registry::MediatedDevice>,
}

/// `POST /devices/{id_or_name}/detach`.
#[derive(Debug, Clone, Default)]
pub struct DetachRequest {
    /// Stay on vfio afterwards instead of going back to the original
    /// driver.
    pub keep_bound: bool,
    /// On an mdev parent: the instance whose mediated device to release;
    /// `None`: the whole device's attachment.
    pub instance: Option<InstanceId>,
}

/// `POST /devices`: a function to set aside for passthrough.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    /// Must be a function present on the host.
    pub pci_address: PciAddress,
    /// `None`: named after the address (`PciAddress::default_name`).
    pub name: Option<DeviceName>,
    /// Empty when none are given.
    pub tags: Tags,
}

/// `PATCH /devices/{id_or_name}`: each `None` field is left as it is.
#[derive(Debug, Clone, Default)]
pub struct UpdateRequest {
    /// A new unique name.
    pub name: Option<DeviceName>,
    /// Replaces the whole tag map, not merged.
    pub tags: Option<Tags>,
    /// `Some(None)`: back to the kernel's order.
    pub reset_method: Option<Option<Vec<ResetMethod>>>,
}

/// A reset method as the kernel names it in `reset_method`, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResetMethod {
    /// The kernel's order for the function (or the device's own list).
    #[default]
    Auto,
    /// A device-specific quirk in the kernel.
    DeviceSpecific,
    /// The ACPI `_RST` method.
    Acpi,
    /// PCIe Function Level Reset: this function only.
    Flr,
    /// Advanced Features FLR, for conventional PCI functions.
    AfFlr,
    /// D3hot and back to D0; offered only where the function does not advertise
    /// No_Soft_Reset.
    Pm,
    /// Secondary bus reset at the bridge above: resets every function below it.
    Bus,
}

impl ResetMethod {
    /// The kernel's methods, in the kernel's default order of preference.
    pub const KERNEL: [ResetMethod; 6] = [
        ResetMethod::DeviceSpecific,
        ResetMethod::Acpi,
        ResetMethod::Flr,
        ResetMethod::AfFlr,
        ResetMethod::Pm,
        ResetMethod::Bus,
    ];

    /// The spelling in sysfs `reset_method` and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetMethod::Auto => "auto",
            ResetMethod::DeviceSpecific => "device_specific",
            ResetMethod::Acpi => "acpi",
            ResetMethod::Flr => "flr",
            ResetMethod::AfFlr => "af_flr",
            ResetMethod::Pm => "pm",
            ResetMethod::Bus => "bus",
        }
    }

    /// Accepts exactly the names [`ResetMethod::as_str`] gives.
    pub fn parse(s: &str) -> Result<ResetMethod, CoreError> {
        std::iter::once(ResetMethod::Auto)
            .chain(ResetMethod::KERNEL)
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                CoreError::InvalidRequest(format!(
                    "unknown reset method {:?}; expected auto, device_specific, acpi, flr, af_flr, pm or bus",
                    s.chars().take(40).collect::<String>()
                ))
            })
    }
}

/// `POST /devices/{id_or_name}/reset`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResetRequest {
    /// `Auto` leaves the order to the kernel (or the device's PATCHed list).
    pub method: ResetMethod,
    /// Answer the plan and change nothing.
    pub dry_run: bool,
}

/// One function a reset touches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScopeFunction {
    /// Its address.
    pub pci_address: PciAddress,
    /// Its driver now; a function on a host driver in scope of a bus reset may
    /// refuse the reset.
    pub driver: Option<String>,
    /// `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
}

/// What a reset does or would do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResetPlan {
    /// The method asked for.
    pub method: String,
    /// The methods the kernel will try, in order.
    pub methods: Vec<String>,
    /// Every function the reset may reset, the device first. For a bus
    /// reset: every function below the bridge the device sits behind, as
    /// sysfs shows the topology.
    pub scope: Vec<ScopeFunction>,
    /// The sysfs writes, in order.
    pub steps: Vec<String>,
}

/// A reset done: the record after it and the plan it followed.
#[derive(Debug, Clone)]
pub struct ResetOutcome {
    /// The record with the reset's outcome in `health`.
    pub device: DeviceRecord,
    /// What was done.
    pub plan: ResetPlan,
}

/// `POST /devices/{id_or_name}/bind`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BindRequest {
    /// Move the group's other functions to vfio too; without it, a group with
    /// functions on other drivers is refused.
    pub with_group: bool,
    /// Answer the plan and change nothing.
    pub dry_run: bool,
    /// Take a network interface that is in use (up with an address or a
    /// route) off its driver anyway.
    pub force: bool,
}

/// What a bind does or would do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindPlan {
    /// The driver the device goes to (vfio-pci or a variant driver for it).
    pub vfio_driver: String,
    /// Its group: `/dev/vfio/N` is the node the VMM opens.
    pub iommu_group: u32,
    /// Every function that moves, the device first; `from` is the driver it
    /// leaves (and gets back on unbind).
    pub moves: Vec<Move>,
    /// The sysfs writes, in order, for the operator to read.
    pub steps: Vec<String>,
    /// What holds the functions that would move: a bind is refused while
    /// any of these refuses it (409 device_busy); a framebuffer console
    /// is released as a step of the plan.
    pub holders: Vec<Holder>,
    /// Nothing to do: the device is on vfio already.
    pub already_bound: bool,
}

/// A bind done: the record after it and the plan it followed.
#[derive(Debug, Clone)]
pub struct BindOutcome {
    /// The record with its binding.
    pub device: DeviceRecord,
    /// What was done.
    pub plan: BindPlan,
}

/// `PUT /devices/{id_or_name}/sriov`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovRequest {
    /// The VF count wanted (0 removes them all).
    pub num_vfs: u32,
    /// What new VFs are given; `None` keeps the recorded choice (vfio-pci
    /// at first).
    pub vf_driver: Option<crate::registry::VfDriver>,
}

/// One VF of a PF, as `GET .../sriov` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VfStatus {
    /// N of the PF's `virtfnN`.
    pub index: u32,
    /// The VF's address.
    pub pci_address: PciAddress,
    /// Its registry id, once registered.
    pub id: Option<String>,
    /// Its registry name, once registered.
    pub name: Option<String>,
    /// Its driver now.
    pub driver: Option<String>,
    /// Why it is not on the driver `vf_driver` asks for, if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A PF's SR-IOV state: the kernel's and the declared one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SriovStatus {
    /// The PF's id.
    pub id: String,
    /// The PF's name.
    pub name: String,
    /// The PF's address.
    pub pci_address: PciAddress,
    /// `sriov_totalvfs`.
    pub total_vfs: u32,
    /// VFs enabled now.
    pub num_vfs: u32,
    /// The count vfiod keeps; `None` until one is set.
    pub desired_vfs: Option<u32>,
    /// The VFs' device ID, four hex digits.
    pub vf_device_id: Option<String>,
    /// What new VFs are given.
    pub vf_driver: crate::registry::VfDriver,
    /// The PF's `sriov_drivers_autoprobe` now.
    pub drivers_autoprobe: Option<bool>,
    /// Each VF, in index order.
    pub vfs: Vec<VfStatus>,
    /// What did not go as asked (fewer VFs enabled than asked, a VF left off
    /// vfio), for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

pub use crate::registry::{Claim as ClaimRequest, NumaPolicy};

/// One vGPU type of a PF's VFs (`GET /devices/{pf}/vgpu_types`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VgpuTypeCount {
    /// What `current_vgpu_type` takes.
    pub id: u32,
    /// As the driver names it.
    pub name: String,
    /// Free VFs of the PF that can take it now.
    pub available: u32,
}

/// `GET /devices/capacity`: one pool's counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// The pool's `resource` tag (`null` for devices without one).
    pub resource: Option<String>,
    /// Registered devices and VFs in the pool (PFs with VFs count as their
    /// VFs).
    pub total: u32,
    /// Claimable now: present, fit, not attached, claimed, stuck or busy.
    pub free: u32,
    /// Attached or claimed.
    pub attached: u32,
    /// Quarantined or needing a host reboot.
    pub quarantined: u32,
    /// Free but owed a reset (done before the next hand-out).
    pub needs_reset: u32,
    /// vGPU types and how many free VFs can take each now.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vgpu_types: BTreeMap<String, u32>,
    /// Mediated devices vfiod made on the pool's parents (claimed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mdevs: u32,
    /// Legacy mdev types (by id) and how many more mediated devices the
    /// pool's parents would make of each now.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mdev_types: BTreeMap<String, u32>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
