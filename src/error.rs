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

/// Everything the core can refuse or fail at; `api::error` gives each variant
/// its status and stable `code`, so a new variant needs a mapping there.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// 400 `invalid_name`: the name breaks the naming rules (the message says
    /// which).
    #[error("{0}")]
    InvalidName(String),
    /// 400 `invalid_tags`: a tag or tag filter breaks the key/value rules or
    /// the count limit.
    #[error("{0}")]
    InvalidTags(String),
    /// 400 `invalid_request`: an unknown field, or a field of the wrong type,
    /// in a request body.
    #[error("{0}")]
    InvalidRequest(String),
    /// 400 `unsupported_device`: the class code (second field) says PCI-to-PCI
    /// bridge.
    #[error("{0} is a PCI bridge (class {1:06x}): bridges cannot be passed through, and taking one from its driver would take hotplug and error reporting from everything below it")]
    Bridge(PciAddress, u32),
    /// 404 `device_not_found`: nothing under `/sys/bus/pci/devices` at that
    /// address; unlike [`CoreError::NotFound`], the registry is not involved.
    #[error("no PCI device at {0} on this host")]
    PciDeviceNotFound(PciAddress),
    /// 404 `not_found`: no registry record matches; the string is what the
    /// caller asked for.
    #[error("no registered device with id or name {0:?}")]
    NotFound(String),
    /// 409 `conflict`: the registry refuses the edit (`RegistryConflict`: a
    /// taken name, an address already registered).
    #[error("{0}")]
    Conflict(String),
    /// 409 `in_use`: the device holds an attachment, which must be detached
    /// first.
    #[error("device {device} is attached to instance {instance:?}")]
    InUse {
        /// The device's name.
        device: String,
        /// The instance holding it, as the attaching caller named it.
        instance: String,
    },
    /// 403 `forbidden`: the caller's uid may not act on this device or
    /// instance.
    #[error("{0}")]
    Forbidden(String),
    /// 503 `vfio_unavailable`: `vfio-pci` is not loaded and could not be
    /// loaded.
    #[error("{0}")]
    VfioUnavailable(String),
    /// 503 `not_privileged`: the daemon runs without the rights to write sysfs
    /// or chown device nodes.
    #[error("{0}")]
    NotPrivileged(String),
    /// 409 `no_iommu_group`: without a group the kernel will not let vfio-pci
    /// bind.
    #[error("device {0} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) and check the firmware's VT-d/AMD-Vi setting")]
    NoIommuGroup(PciAddress),
    /// 409 `iommu_group_conflict`: vfio only hands out a group whole, so every
    /// function in it must be on vfio (or no driver) first.
    #[error("IOMMU group {group} of {device} has functions on other drivers: {}; move them too with with_group, or unbind them first", list_functions(.others))]
    GroupConflict {
        /// The function the caller asked for.
        device: PciAddress,
        /// Kernel IOMMU group number (`/sys/kernel/iommu_groups/N`).
        group: u32,
        /// Each other function of the group and the driver holding it.
        others: Vec<(PciAddress, String)>,
    },
    /// 400 `invalid_pid`: the pid is 0, not a number, or names no live process.
    #[error("{0}")]
    InvalidPid(String),
    /// 409 `iommu_group_conflict`: the group's `/dev/vfio/N` node has one
    /// owner, so two uids cannot share a group.
    #[error("IOMMU group {group} of {device} is attached to another user ({}); all functions of a group share one VFIO node, so they can only be handed to one uid, here {uid}", list_uids(.others))]
    GroupAttachedToOtherUid {
        /// The function the caller asked for.
        device: PciAddress,
        /// Kernel IOMMU group number.
        group: u32,
        /// The uid this request would hand the group to.
        uid: u32,
        /// Functions of the group already attached, each with the uid holding
        /// it.
        others: Vec<(PciAddress, u32)>,
    },
    /// 500 `grant_failed`: chown/chmod of the VFIO nodes failed; the message
    /// names node, uid and errno.
    #[error("{0}")]
    GrantFailed(String),
    /// 500 `holder_scan_failed`: `/proc` could not be read, so "nobody holds
    /// it" cannot be claimed and the move is not tried.
    #[error("finding what holds the device failed, nothing was changed: {0}")]
    HolderScan(String),
    /// 409 `not_bound_by_vfiod`: releasing would hand back a driver vfiod never
    /// took, so it refuses.
    #[error("device {0} was not bound to vfio by vfiod, so vfiod leaves its driver alone")]
    NotBoundByVfiod(String),
    /// 409 `device_not_present`: registered, but currently unplugged.
    #[error("device {0} is not present on the bus")]
    NotPresent(PciAddress),
    /// 409 `identity_mismatch`: vendor/device/subsystem IDs at the address
    /// differ from the record's (a swapped card).
    #[error("a different device now answers at {0} than the one registered there; delete and register it again to use it")]
    IdentityMismatch(PciAddress),
    /// 409 `device_busy`: something holds the device (or a group companion) and
    /// the move was not started.
    #[error("{device} is in use, nothing was changed: {}", list_holders(.device, .holders))]
    DeviceBusy {
        /// The function the caller asked for.
        device: PciAddress,
        /// Every holder found, across the whole group; each says whether
        /// `force` would override it.
        holders: Vec<Holder>,
    },
    /// 409 `device_stuck`: an earlier `unbind`/`bind` write has not returned
    /// from the kernel; another write would queue behind it.
    #[error("device {0} has a sysfs write still stuck in the kernel; retry when it returns (see GET /events)")]
    DeviceStuck(PciAddress),
    /// A move that failed part-way; the code depends on the step
    /// (`driver_timeout`, `bind_failed`, `unbind_failed`, `reset_failed`).
    #[error("{0}")]
    DriverMoveFailed(Box<MoveFailure>),
    /// 409 `reset_scope_conflict`: the chosen reset method (a bus or slot
    /// reset) reaches functions that are in use.
    #[error("a {method} reset of {device} would also reset {}; refused", list_functions(.conflicts))]
    ResetScopeConflict {
        /// The function the caller asked to reset.
        device: PciAddress,
        /// The kernel reset method, as in `reset_method` (`flr`, `bus`, ...).
        method: String,
        /// Each function in the scope that may not be reset, and why.
        conflicts: Vec<(PciAddress, String)>,
    },
    /// 409 `reset_method_unsupported`: the kernel does not offer the requested
    /// method for this function.
    #[error("{0}")]
    ResetMethodUnsupported(String),
    /// 409 `device_quarantined`: too many resets failed in a row; only an
    /// explicit reset that verifies lifts it.
    #[error("device {device} is quarantined ({reason}); a successful POST /devices/{device}/reset clears it")]
    DeviceQuarantined {
        /// The device's registered name.
        device: String,
        /// The recorded health reason.
        reason: String,
    },
    /// 409 `device_needs_host_reboot`: config space read all ones; no reset
    /// helps, only a reboot or a re-plug that answers again.
    #[error("device {device} needs a host reboot ({reason})")]
    NeedsHostReboot {
        /// The device's registered name.
        device: String,
        /// The recorded health reason.
        reason: String,
    },
    /// 500 `reset_failed`: the kernel reported the reset done but a check
    /// afterwards failed.
    #[error("{0}")]
    ResetVerifyFailed(Box<ResetVerifyFailure>),
    /// 409 `sriov_unsupported`: the device cannot make VFs now (not an
    /// SR-IOV PF, no driver, or vfio-pci without `enable_sriov`); the
    /// message says which.
    #[error("{0}")]
    SriovUnsupported(String),
    /// 400 `invalid_vf_count`: more VFs than the PF's `sriov_totalvfs`.
    #[error("{device} can have at most {total} VFs (sriov_totalvfs); {requested} asked for")]
    InvalidVfCount {
        /// The PF's name.
        device: String,
        /// The count asked for.
        requested: u32,
        /// `sriov_totalvfs`.
        total: u32,
    },
    /// 409 `vfs_in_use`: changing the VF count destroys every VF, and these
    /// are in use.
    #[error("the VF count of {pf} cannot change while its VFs are in use (a change destroys them all): {}", list_functions_why(.vfs))]
    VfsInUse {
        /// The PF's name.
        pf: String,
        /// Each VF in use, and how.
        vfs: Vec<(PciAddress, String)>,
    },
    /// 409 `pf_has_vfs`: the operation would tear down or disturb the PF's
    /// VFs, and these are in use (or vfiod keeps a VF count on it).
    #[error("{pf} has VFs that this would tear down: {}", list_functions_why(.vfs))]
    PfHasVfs {
        /// The PF's name.
        pf: String,
        /// Each VF in the way, and why.
        vfs: Vec<(PciAddress, String)>,
    },
    /// 409 `claim_conflict`: the instance already holds a claim made with
    /// another request.
    #[error("instance {instance:?} already claimed {device} with another request; detach it first to claim anew")]
    ClaimConflict {
        /// The instance id of the claim.
        instance: String,
        /// The device its earlier claim got.
        device: String,
    },
    /// 409 `vf_tags_follow_pf`: a PATCH would give a VF vfiod made tags
    /// other than its PF's. A VF's pool is its PF's (a PATCH of the PF's
    /// tags moves them all), so the VF cannot leave it alone, and a VF made
    /// again after a reboot would not keep such tags anyway.
    #[error("{vf} is a VF of {pf}: its tags are its PF's and follow them; PATCH the tags of {pf} to move all its VFs to another pool")]
    VfTagsFollowPf {
        /// The VF's name.
        vf: String,
        /// Its PF's name.
        pf: String,
    },
    /// 409 `no_capacity`: no device fits the claim; why each candidate did
    /// not.
    #[error("no free device fits the claim{}", refused_note(.refused))]
    NoCapacity {
        /// Each device with the tags asked for, and why it was not taken.
        refused: Vec<(PciAddress, String)>,
    },
    /// 409 `vgpu_type_unavailable`: the VF cannot take the vGPU type now.
    #[error("{device} cannot take vGPU type {vgpu_type}: {detail}")]
    VgpuTypeUnavailable {
        /// The VF's name.
        device: String,
        /// The type asked for.
        vgpu_type: String,
        /// What the driver said.
        detail: String,
    },
    /// 404 `not_found`: a detach names an instance that holds nothing on
    /// the device.
    #[error("instance {instance:?} holds no mediated device and no attachment on {device}")]
    NothingHeld {
        /// The instance named.
        instance: String,
        /// The device's name.
        device: String,
    },
    /// 409 `mdevs_in_use`: the operation would take an mdev parent off its
    /// driver, which destroys its mediated devices, and it has some.
    #[error("{device} has mediated devices that this would destroy: {}", .mdevs.iter().map(|(u, why)| format!("{u} ({why})")).collect::<Vec<_>>().join(", "))]
    MdevsInUse {
        /// The parent's name.
        device: String,
        /// Each mediated device, and whose it is.
        mdevs: Vec<(String, String)>,
    },
    /// 500 `mdev_failed` (504 `driver_timeout` when the write hung): making
    /// or removing a mediated device failed; what was made is undone.
    #[error("{0}")]
    MdevFailed(Box<MdevFailure>),
    /// 507 `storage_full` on ENOSPC/EDQUOT, else 500 `storage_error`; the
    /// in-memory registry is left as it was.
    #[error("saving the registry failed, nothing was changed: {0}")]
    Storage(#[from] StoreError),
    /// 500 `internal_error`: a broken invariant inside vfiod, never the
    /// caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A driver move that failed: which operation, on which device, what
/// went wrong, and how the rollback went (`None`: not attempted).
#[derive(Debug, thiserror::Error)]
#[error("{op} {device}: {error}{}", rollback_note(.rollback))]
pub struct MoveFailure {
    /// The engine operation (`bind`, `unbind`, `reset`); `api::error` picks the
    /// wire code from it.
    pub op: &'static str,
    /// The function being moved.
    pub device: PciAddress,
    /// The first step that failed.
    pub error: EngineError,
    /// `None`: rollback not attempted (nothing had changed yet); `Some(Err)`:
    /// the device is left mid-move.
    pub rollback: Option<Result<(), EngineError>>,
}

/// A mediated device that could not be made or removed.
#[derive(Debug, thiserror::Error)]
#[error("{action} mediated device {uuid} of type {mdev_type} on {device}: {error}")]
pub struct MdevFailure {
    /// `creating` or `removing`.
    pub action: &'static str,
    /// The parent's name.
    pub device: String,
    /// The mdev type id.
    pub mdev_type: String,
    /// The mediated device.
    pub uuid: String,
    /// The failed step, with path and errno.
    pub error: EngineError,
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
    /// The function the caller asked to reset.
    pub device: PciAddress,
    /// The kernel reset method used (`flr`, `pm`, `bus`, ...).
    pub method: String,
    /// The function that failed the check; may be a companion reset along with
    /// `device`.
    pub function: PciAddress,
    /// Which check failed.
    pub check: ResetCheck,
    /// What was read, for the operator (e.g. the vendor ID or power state
    /// seen).
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

fn list_functions_why(functions: &[(PciAddress, String)]) -> String {
    functions
        .iter()
        .map(|(a, why)| format!("{a} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn refused_note(refused: &[(PciAddress, String)]) -> String {
    if refused.is_empty() {
        "; no registered device has the tags asked for".into()
    } else {
        format!(": {}", list_functions_why(refused))
    }
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
    /// Boxes the failure so `CoreError` stays small on the happy path's
    /// `Result`.
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

    /// Whether the same operation may succeed if tried again unchanged: a
    /// write the kernel refused, a commit the disk refused, a scan that
    /// failed. A refusal (the device is held, attached, unfit, ...) or a
    /// write stuck in the kernel (its return settles the device) is not.
    pub fn may_pass(&self) -> bool {
        match self {
            CoreError::DriverMoveFailed(f) => !f.error.is_timeout(),
            CoreError::MdevFailed(f) => !f.error.is_timeout(),
            CoreError::Storage(_)
            | CoreError::HolderScan(_)
            | CoreError::GrantFailed(_)
            | CoreError::Internal(_) => true,
            _ => false,
        }
    }

    /// For a failed driver move: which step, errno, as structured detail.
    pub fn step(&self) -> Option<Step> {
        match self {
            CoreError::DriverMoveFailed(f) => Some(f.error.step()),
            CoreError::MdevFailed(f) => Some(f.error.step()),
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

    /// The OS errno behind a failed move or store write, for the wire's `errno`
    /// field.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CoreError::DriverMoveFailed(f) => f.error.errno(),
            CoreError::MdevFailed(f) => f.error.errno(),
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
