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

/// A device name, validated: hypeman's `^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`, at
/// most [`MAX_NAME`] characters, and not a word the API uses as a path
/// segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceName(pub(crate) String);

impl DeviceName {
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
        if s == "available" {
            return Err(CoreError::InvalidName(
                "the name \"available\" is reserved (GET /devices/available)".into(),
            ));
        }
        Ok(DeviceName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// hypeman's Tags schema, so that tags registered here are valid there too.
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY: usize = 128;
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

    pub fn into_inner(self) -> BTreeMap<String, String> {
        self.0
    }
}

/// An instance id for attach: 1-256 printable characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId(pub(crate) String);

impl InstanceId {
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
    pub instance: InstanceId,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct RegisterRequest {
    pub pci_address: PciAddress,
    pub name: Option<DeviceName>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct UpdateRequest {
    pub name: Option<DeviceName>,
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
    DeviceSpecific,
    Acpi,
    Flr,
    AfFlr,
    Pm,
    Bus,
}

impl ResetMethod {
    pub const KERNEL: [ResetMethod; 6] = [
        ResetMethod::DeviceSpecific,
        ResetMethod::Acpi,
        ResetMethod::Flr,
        ResetMethod::AfFlr,
        ResetMethod::Pm,
        ResetMethod::Bus,
    ];

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

#[derive(Debug, Clone, Copy, Default)]
pub struct ResetRequest {
    pub method: ResetMethod,
    pub dry_run: bool,
}

/// One function a reset touches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScopeFunction {
    pub pci_address: PciAddress,
    pub driver: Option<String>,
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

#[derive(Debug, Clone)]
pub struct ResetOutcome {
    pub device: DeviceRecord,
    pub plan: ResetPlan,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BindRequest {
    pub with_group: bool,
    pub dry_run: bool,
    /// Take a network interface that is in use (up with an address or a
    /// route) off its driver anyway.
    pub force: bool,
}

/// What a bind does or would do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindPlan {
    pub vfio_driver: String,
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

#[derive(Debug, Clone)]
pub struct BindOutcome {
    pub device: DeviceRecord,
    pub plan: BindPlan,
}
