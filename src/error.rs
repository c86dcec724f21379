//! The one error type the core returns. The HTTP layer maps each variant to
//! a status and a stable machine `code` in exactly one place
//! (`api::error`); everything a typed request can get wrong or the host can
//! refuse is a variant here, so nothing reaches the wire as a bare 500.
//! What only the HTTP layer can get wrong (a body, a head, a path, JSON
//! syntax, the caller's share of the socket) is `api::error::ApiError`.

use crate::engine::{EngineError, Step};
use crate::pci::holders::{Disposition, Holder};
use crate::pci::PciAddress;
use crate::registry::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidTags(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0} is a PCI bridge (class {1:06x}): bridges cannot be passed through, and taking one from its driver would take hotplug and error reporting from everything below it")]
    Bridge(PciAddress, u32),
    #[error("no PCI device at {0} on this host")]
    PciDeviceNotFound(PciAddress),
    #[error("no registered device with id or name {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("device {device} is attached to instance {instance:?}")]
    InUse { device: String, instance: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    VfioUnavailable(String),
    #[error("{0}")]
    NotPrivileged(String),
    #[error("device {0} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) and check the firmware's VT-d/AMD-Vi setting")]
    NoIommuGroup(PciAddress),
    #[error("IOMMU group {group} of {device} has functions on other drivers: {}; move them too with with_group, or unbind them first", list_functions(.others))]
    GroupConflict {
        device: PciAddress,
        group: u32,
        others: Vec<(PciAddress, String)>,
    },
    #[error("{0}")]
    InvalidPid(String),
    #[error("IOMMU group {group} of {device} is attached to another user ({}); all functions of a group share one VFIO node, so they can only be handed to one uid, here {uid}", list_uids(.others))]
    GroupAttachedToOtherUid {
        device: PciAddress,
        group: u32,
        uid: u32,
        others: Vec<(PciAddress, u32)>,
    },
    #[error("{0}")]
    GrantFailed(String),
    #[error("finding what holds the device failed, nothing was changed: {0}")]
    HolderScan(String),
    #[error("device {0} was not bound to vfio by vfiod, so vfiod leaves its driver alone")]
    NotBoundByVfiod(String),
    #[error("device {0} is not present on the bus")]
    NotPresent(PciAddress),
    #[error("a different device now answers at {0} than the one registered there; delete and register it again to use it")]
    IdentityMismatch(PciAddress),
    #[error("{device} is in use, nothing was changed: {}", list_holders(.device, .holders))]
    DeviceBusy {
        device: PciAddress,
        holders: Vec<Holder>,
    },
    #[error("device {0} has a sysfs write still stuck in the kernel; retry when it returns (see GET /events)")]
    DeviceStuck(PciAddress),
    #[error("{0}")]
    DriverMoveFailed(Box<MoveFailure>),
    #[error("a {method} reset of {device} would also reset {}; refused", list_functions(.conflicts))]
    ResetScopeConflict {
        device: PciAddress,
        method: String,
        /// Each function in the scope that may not be reset, and why.
        conflicts: Vec<(PciAddress, String)>,
    },
    #[error("{0}")]
    ResetMethodUnsupported(String),
    #[error("device {device} is quarantined ({reason}); a successful POST /devices/{device}/reset clears it")]
    DeviceQuarantined { device: String, reason: String },
    #[error("device {device} needs a host reboot ({reason})")]
    NeedsHostReboot { device: String, reason: String },
    #[error("{0}")]
    ResetVerifyFailed(Box<ResetVerifyFailure>),
    #[error("saving the registry failed, nothing was changed: {0}")]
    Storage(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A driver move that failed: which operation, on which device, what
/// went wrong, and how the rollback went (`None`: not attempted).
#[derive(Debug, thiserror::Error)]
#[error("{op} {device}: {error}{}", rollback_note(.rollback))]
pub struct MoveFailure {
    pub op: &'static str,
    pub device: PciAddress,
    pub error: EngineError,
    pub rollback: Option<Result<(), EngineError>>,
}

/// Which check after a reset failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetCheck {
    /// Config space does not answer (vendor ID 0xffff, or unreadable).
    ConfigSpace,
    /// `power_state` is D3cold or error.
    PowerState,
    /// The function is not on the driver it had before the reset.
    Driver,
}

impl std::fmt::Display for ResetCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResetCheck::ConfigSpace => "config space",
            ResetCheck::PowerState => "power state",
            ResetCheck::Driver => "driver",
        })
    }
}

/// A reset the kernel reported done, after which a function failed a check.
#[derive(Debug, thiserror::Error)]
#[error("reset of {device} by {method}: check {check} failed for {function}: {detail}")]
pub struct ResetVerifyFailure {
    pub device: PciAddress,
    pub method: String,
    pub function: PciAddress,
    pub check: ResetCheck,
    pub detail: String,
}

fn list_functions(others: &[(PciAddress, String)]) -> String {
    others
        .iter()
        .map(|(a, d)| format!("{a} on {d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The holders of a busy device, each as it reads
/// ([`Holder`]'s `Display`), naming the function where it is not the
/// device itself (a group companion), and saying so where `force` would
/// let the move go.
fn list_holders(device: &PciAddress, holders: &[Holder]) -> String {
    holders
        .iter()
        .map(|h| {
            let on = match h.pci_address() {
                a if a == *device => String::new(),
                a => format!("{a}: "),
            };
            let forcible = match h.disposition() {
                Disposition::RefuseUnlessForced => " (force: true moves it anyway)",
                Disposition::Refuse | Disposition::PlanStep => "",
            };
            format!("{on}{h}{forcible}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn list_uids(others: &[(PciAddress, u32)]) -> String {
    others
        .iter()
        .map(|(a, uid)| format!("{a} for uid {uid}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rollback_note(rollback: &Option<Result<(), EngineError>>) -> String {
    match rollback {
        None => String::new(),
        Some(Ok(())) => "; rolled back to the previous driver".into(),
        Some(Err(e)) => format!("; ROLLBACK ALSO FAILED: {e}"),
    }
}

impl CoreError {
    pub fn move_failed(
        op: &'static str,
        device: PciAddress,
        error: EngineError,
        rollback: Option<Result<(), EngineError>>,
    ) -> CoreError {
        CoreError::DriverMoveFailed(Box::new(MoveFailure {
            op,
            device,
            error,
            rollback,
        }))
    }

    /// For a failed driver move: which step, errno, as structured detail.
    pub fn step(&self) -> Option<Step> {
        match self {
            CoreError::DriverMoveFailed(f) => Some(f.error.step()),
            _ => None,
        }
    }

    /// For a reset that failed verification: which check.
    pub fn failed_check(&self) -> Option<ResetCheck> {
        match self {
            CoreError::ResetVerifyFailed(f) => Some(f.check),
            _ => None,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            CoreError::DriverMoveFailed(f) => f.error.errno(),
            CoreError::Storage(e) => e.errno(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_message_names_each_holder_and_the_companion_it_holds() {
        let device: PciAddress = "0000:00:02.0".parse().unwrap();
        let companion: PciAddress = "0000:00:02.1".parse().unwrap();
        let e = CoreError::DeviceBusy {
            device,
            holders: vec![
                Holder::Process {
                    pci_address: device,
                    pid: 3001,
                    comm: "qemu-system-x86".into(),
                    uid: 0,
                    path: "/dev/vfio/2".into(),
                    unit: None,
                },
                Holder::NetInterface {
                    pci_address: companion,
                    interface: "enp0s2".into(),
                    addresses: vec!["2001:db8::42".into()],
                    routes: 1,
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "0000:00:02.0 is in use, nothing was changed: \
             pid 3001 (qemu-system-x86) uid 0 has /dev/vfio/2 open; \
             0000:00:02.1: network interface enp0s2 addresses: 2001:db8::42; routes: 1 \
             (force: true moves it anyway)"
        );
    }
}
