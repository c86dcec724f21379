//! The API's errors, and the one place any error becomes an HTTP status
//! and a stable code.
//!
//! [`ApiError`] is what a request can fail with: the core's refusal
//! ([`CoreError`]), or what only the HTTP layer can get wrong (the path,
//! the method, the body, the head, the caller's share of the socket). The
//! core never sees a transport error, so its error type has none.

use std::time::Duration;

use hyper::StatusCode;
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::engine::Step;
use crate::error::{CoreError, ResetCheck};
use crate::registry::store::StoreError;

/// What a request can fail with; [`status_and_code`] maps each to its status
/// and stable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The core's refusal; status and code from the core's variant.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// No route's path template matches the path.
    #[error("no such endpoint: {path}{}", listener_note(.listener_serves))]
    NoSuchEndpoint {
        /// The path as sent, for the message.
        path: String,
        /// On a listener that serves only some routes: which.
        listener_serves: Option<String>,
    },
    /// A template matches the path, but none with this method.
    #[error("{method} is not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        /// The method as sent.
        method: String,
        /// The path as sent.
        path: String,
        /// The methods the path has, as the `Allow` header lists them.
        allow: String,
    },
    /// 413 `body_too_large`; the limit in bytes.
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// 408 `request_timeout`: a slow client may not hold a connection open; the
    /// limit that passed.
    #[error("the request body did not arrive within {} s", .0.as_secs())]
    BodyTimeout(Duration),
    /// Not HTTP/1.1 as hyper reads it, or a body that broke off.
    #[error("{0}")]
    Malformed(String),
    /// 431 `header_too_large`; the limit in bytes.
    #[error("the request head is larger than {0} bytes")]
    HeaderTooLarge(usize),
    /// 400 `invalid_json`: the body does not parse as JSON; the parser's
    /// message.
    #[error("{0}")]
    InvalidJson(String),
    /// 400 `invalid_query`: an unknown or malformed query parameter.
    #[error("{0}")]
    InvalidQuery(String),
    /// The core takes typed addresses: only a request's text can be wrong.
    #[error("{0}")]
    InvalidPciAddress(String),
    /// The caller's uid holds as many connections as it may.
    #[error("{0}")]
    TooManyConnections(String),
    /// The caller's uid holds as many event streams as it may.
    #[error("{0}")]
    TooManyEventStreams(String),
}

fn listener_note(serves: &Option<String>) -> String {
    serves
        .as_ref()
        .map(|s| format!("; this listener serves {s} only"))
        .unwrap_or_default()
}

/// Every error body: `{"code", "message"}` plus optional detail.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable; clients switch on it, never on `message`.
    pub code: Cow<'static, str>,
    /// For people; wording may change.
    pub message: String,
    /// The engine step a failed move stopped at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// The OS errno of a failed write, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// For `iommu_group_conflict` and `reset_scope_conflict`: the functions in
    /// the way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicting_functions: Vec<ConflictingFunction>,
    /// After a reset: the check that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_check: Option<ResetCheck>,
    /// For `device_busy`: what holds the device, each with a `kind`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<crate::pci::holders::Holder>,
}

/// A function that blocks a bind or reset of its group or bus.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConflictingFunction {
    /// Domain:bus:device.function.
    pub pci_address: String,
    /// Its driver, for a group conflict (absent when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Why a reset may not touch it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ErrorBody {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorBody {
            code: Cow::Borrowed(code),
            message: message.into(),
            step: None,
            errno: None,
            conflicting_functions: Vec::new(),
            failed_check: None,
            holders: Vec::new(),
        }
    }
}

const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// The one mapping from error to HTTP status and stable code; tests pin every
/// pair.
pub fn status_and_code(e: &ApiError) -> (StatusCode, &'static str) {
    use ApiError::*;
    match e {
        Core(e) => core_status_and_code(e),
        NoSuchEndpoint { .. } => (StatusCode::NOT_FOUND, "not_found"),
        MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
        BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
        Malformed(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        HeaderTooLarge(_) => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
        ),
        InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
        InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
        InvalidPciAddress(_) => (StatusCode::BAD_REQUEST, "invalid_pci_address"),
        TooManyConnections(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_connections"),
        TooManyEventStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_event_streams"),
    }
}

fn core_status_and_code(e: &CoreError) -> (StatusCode, &'static str) {
    use CoreError::*;
    match e {
        InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
        InvalidTags(_) => (StatusCode::BAD_REQUEST, "invalid_tags"),
        InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        PciDeviceNotFound(_) => (StatusCode::NOT_FOUND, "device_not_found"),
        Bridge(..) => (StatusCode::BAD_REQUEST, "unsupported_device"),
        NotFound(_) | NothingHeld { .. } => (StatusCode::NOT_FOUND, "not_found"),
        Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        InUse { .. } => (StatusCode::CONFLICT, "in_use"),
        Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        VfioUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "vfio_unavailable"),
        NotPrivileged(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_privileged"),
        NoIommuGroup(_) => (StatusCode::CONFLICT, "no_iommu_group"),
        GroupConflict { .. } | GroupAttachedToOtherUid { .. } => {
            (StatusCode::CONFLICT, "iommu_group_conflict")
        }
        InvalidPid(_) => (StatusCode::BAD_REQUEST, "invalid_pid"),
        GrantFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "grant_failed"),
        HolderScan(_) => (StatusCode::INTERNAL_SERVER_ERROR, "holder_scan_failed"),
        NotBoundByVfiod(_) => (StatusCode::CONFLICT, "not_bound_by_vfiod"),
        NotPresent(_) => (StatusCode::CONFLICT, "device_not_present"),
        DeviceStuck(_) => (StatusCode::CONFLICT, "device_stuck"),
        DeviceBusy { .. } => (StatusCode::CONFLICT, "device_busy"),
        IdentityMismatch(_) => (StatusCode::CONFLICT, "identity_mismatch"),
        DriverMoveFailed(f) => {
            if f.error.is_timeout() {
                (StatusCode::GATEWAY_TIMEOUT, "driver_timeout")
            } else if f.op == "bind" {
                (StatusCode::INTERNAL_SERVER_ERROR, "bind_failed")
            } else if f.op == "reset" {
                (StatusCode::INTERNAL_SERVER_ERROR, "reset_failed")
            } else if f.op == "sriov" || f.op == "converge_vfs" {
                (StatusCode::INTERNAL_SERVER_ERROR, "sriov_failed")
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, "unbind_failed")
            }
        }
        ResetScopeConflict { .. } => (StatusCode::CONFLICT, "reset_scope_conflict"),
        SriovUnsupported(_) => (StatusCode::CONFLICT, "sriov_unsupported"),
        InvalidVfCount { .. } => (StatusCode::BAD_REQUEST, "invalid_vf_count"),
        VfsInUse { .. } => (StatusCode::CONFLICT, "vfs_in_use"),
        ClaimConflict { .. } => (StatusCode::CONFLICT, "claim_conflict"),
        VfTagsFollowPf { .. } => (StatusCode::CONFLICT, "vf_tags_follow_pf"),
        NoCapacity { .. } => (StatusCode::CONFLICT, "no_capacity"),
        VgpuTypeUnavailable { .. } => (StatusCode::CONFLICT, "vgpu_type_unavailable"),
        PfHasVfs { .. } => (StatusCode::CONFLICT, "pf_has_vfs"),
        MdevsInUse { .. } => (StatusCode::CONFLICT, "mdevs_in_use"),
        MdevFailed(f) if f.error.is_timeout() => (StatusCode::GATEWAY_TIMEOUT, "driver_timeout"),
        MdevFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "mdev_failed"),
        ResetMethodUnsupported(_) => (StatusCode::CONFLICT, "reset_method_unsupported"),
        DeviceQuarantined { .. } => (StatusCode::CONFLICT, "device_quarantined"),
        NeedsHostReboot { .. } => (StatusCode::CONFLICT, "device_needs_host_reboot"),
        ResetVerifyFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "reset_failed"),
        Storage(StoreError::Io(e)) if matches!(e.errno(), Some(ENOSPC) | Some(EDQUOT)) => {
            (StatusCode::INSUFFICIENT_STORAGE, "storage_full")
        }
        Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
        Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}

/// The status and the JSON body, with the structured detail the error carries.
pub fn to_body(e: &ApiError) -> (StatusCode, ErrorBody) {
    let (status, code) = status_and_code(e);
    let mut body = ErrorBody::new(code, e.to_string());
    let ApiError::Core(e) = e else {
        return (status, body);
    };
    body.step = e.step();
    body.errno = e.errno();
    body.failed_check = e.failed_check();
    if let CoreError::DeviceBusy { holders, .. } = e {
        body.holders = holders.clone();
    }
    if let CoreError::GroupConflict { others, .. } = e {
        body.conflicting_functions = others
            .iter()
            .map(|(a, d)| ConflictingFunction {
                pci_address: a.to_string(),
                driver: Some(d.clone()),
                reason: None,
            })
            .collect();
    }
    if let CoreError::ResetScopeConflict { conflicts, .. }
    | CoreError::VfsInUse { vfs: conflicts, .. }
    | CoreError::PfHasVfs { vfs: conflicts, .. }
    | CoreError::NoCapacity { refused: conflicts } = e
    {
        body.conflicting_functions = conflicts
            .iter()
            .map(|(a, why)| ConflictingFunction {
                pci_address: a.to_string(),
                driver: None,
                reason: Some(why.clone()),
            })
            .collect();
    }
    (status, body)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::*;
    use crate::engine::EngineError;
    use crate::pci::SysfsError;

    fn addr() -> crate::pci::PciAddress {
        "0000:01:00.0".parse().unwrap()
    }

    /// The kernel refusing an unbind with EBUSY.
    fn unbind_ebusy() -> EngineError {
        EngineError::Write {
            step: Step::Unbind,
            device: addr(),
            source: SysfsError {
                op: "write",
                path: PathBuf::from("/sys/bus/pci/drivers/nvidia/unbind"),
                source: io::Error::from_raw_os_error(16),
            },
        }
    }

    #[test]
    fn every_variant_has_its_documented_status_and_code() {
        let io_err = |errno| {
            StoreError::Io(SysfsError {
                op: "write",
                path: PathBuf::from("/var/lib/vfiod/state.json.tmp"),
                source: io::Error::from_raw_os_error(errno),
            })
        };
        let write_failed = unbind_ebusy();
        let timeout = EngineError::Timeout {
            step: Step::Unbind,
            device: addr(),
            path: PathBuf::from("/sys/bus/pci/drivers/nvidia/unbind"),
            timeout_ms: 5000,
            late: None,
        };
        let transport: Vec<(ApiError, u16, &str)> = vec![
            (
                ApiError::NoSuchEndpoint {
                    path: "/x".into(),
                    listener_serves: None,
                },
                404,
                "not_found",
            ),
            (
                ApiError::MethodNotAllowed {
                    method: "PUT".into(),
                    path: "/devices".into(),
                    allow: "GET, POST".into(),
                },
                405,
                "method_not_allowed",
            ),
            (ApiError::BodyTooLarge(1), 413, "body_too_large"),
            (
                ApiError::BodyTimeout(Duration::from_secs(1)),
                408,
                "request_timeout",
            ),
            (ApiError::Malformed("x".into()), 400, "invalid_request"),
            (ApiError::HeaderTooLarge(1), 431, "header_too_large"),
            (ApiError::InvalidJson("x".into()), 400, "invalid_json"),
            (ApiError::InvalidQuery("x".into()), 400, "invalid_query"),
            (
                ApiError::InvalidPciAddress("x".into()),
                400,
                "invalid_pci_address",
            ),
            (
                ApiError::TooManyConnections("x".into()),
                429,
                "too_many_connections",
            ),
            (
                ApiError::TooManyEventStreams("x".into()),
                429,
                "too_many_event_streams",
            ),
        ];
        let core: Vec<(CoreError, u16, &str)> = vec![
            (CoreError::InvalidName("x".into()), 400, "invalid_name"),
            (CoreError::InvalidTags("x".into()), 400, "invalid_tags"),
            (
                CoreError::InvalidRequest("x".into()),
                400,
                "invalid_request",
            ),
            (CoreError::InvalidPid("x".into()), 400, "invalid_pid"),
            (
                CoreError::Bridge(addr(), 0x060400),
                400,
                "unsupported_device",
            ),
            (
                CoreError::PciDeviceNotFound(addr()),
                404,
                "device_not_found",
            ),
            (CoreError::NotFound("x".into()), 404, "not_found"),
            (CoreError::Conflict("x".into()), 409, "conflict"),
            (
                CoreError::InUse {
                    device: "g".into(),
                    instance: "i".into(),
                },
                409,
                "in_use",
            ),
            (CoreError::Forbidden("x".into()), 403, "forbidden"),
            (
                CoreError::VfioUnavailable("x".into()),
                503,
                "vfio_unavailable",
            ),
            (CoreError::NotPrivileged("x".into()), 503, "not_privileged"),
            (CoreError::NoIommuGroup(addr()), 409, "no_iommu_group"),
            (
                CoreError::GroupConflict {
                    device: addr(),
                    group: 1,
                    others: vec![("0000:01:00.1".parse().unwrap(), "snd_hda_intel".into())],
                },
                409,
                "iommu_group_conflict",
            ),
            (
                CoreError::NotBoundByVfiod("g".into()),
                409,
                "not_bound_by_vfiod",
            ),
            (CoreError::NotPresent(addr()), 409, "device_not_present"),
            (CoreError::DeviceStuck(addr()), 409, "device_stuck"),
            (
                CoreError::IdentityMismatch(addr()),
                409,
                "identity_mismatch",
            ),
            (
                CoreError::move_failed("bind", addr(), write_failed, Some(Ok(()))),
                500,
                "bind_failed",
            ),
            (
                CoreError::move_failed("unbind", addr(), timeout, None),
                504,
                "driver_timeout",
            ),
            (
                CoreError::ResetScopeConflict {
                    device: addr(),
                    method: "bus".into(),
                    conflicts: vec![(
                        "0000:01:00.1".parse().unwrap(),
                        "attached to instance vm-1".into(),
                    )],
                },
                409,
                "reset_scope_conflict",
            ),
            (
                CoreError::ResetMethodUnsupported("x".into()),
                409,
                "reset_method_unsupported",
            ),
            (
                CoreError::DeviceQuarantined {
                    device: "g".into(),
                    reason: "r".into(),
                },
                409,
                "device_quarantined",
            ),
            (
                CoreError::NeedsHostReboot {
                    device: "g".into(),
                    reason: "r".into(),
                },
                409,
                "device_needs_host_reboot",
            ),
            (
                CoreError::ResetVerifyFailed(Box::new(crate::error::ResetVerifyFailure {
                    device: addr(),
                    method: "flr".into(),
                    function: addr(),
                    check: ResetCheck::PowerState,
                    detail: "D3cold".into(),
                })),
                500,
                "reset_failed",
            ),
            (CoreError::Storage(io_err(28)), 507, "storage_full"),
            (CoreError::Storage(io_err(5)), 500, "storage_error"),
            (CoreError::Internal("x".into()), 500, "internal_error"),
            (
                CoreError::GroupAttachedToOtherUid {
                    device: addr(),
                    group: 1,
                    uid: 1000,
                    others: vec![("0000:01:00.1".parse().unwrap(), 1001)],
                },
                409,
                "iommu_group_conflict",
            ),
            (
                CoreError::VfTagsFollowPf {
                    vf: "nic-vf1".into(),
                    pf: "nic".into(),
                },
                409,
                "vf_tags_follow_pf",
            ),
            (CoreError::GrantFailed("x".into()), 500, "grant_failed"),
            (CoreError::HolderScan("x".into()), 500, "holder_scan_failed"),
            (
                CoreError::DeviceBusy {
                    device: addr(),
                    holders: Vec::new(),
                },
                409,
                "device_busy",
            ),
        ];
        let spec = crate::api::OPENAPI_YAML;
        let documented: Vec<String> = spec
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("enum: [invalid_pci_address"))
            .map(|rest| format!("invalid_pci_address{rest}"))
            .expect("error code enum in openapi.yaml")
            .trim_end_matches(']')
            .split(", ")
            .map(str::to_owned)
            .collect();
        let cases = transport.into_iter().chain(
            core.into_iter()
                .map(|(e, status, code)| (ApiError::Core(e), status, code)),
        );
        for (err, status, code) in cases {
            let (s, body) = to_body(&err);
            assert_eq!((s.as_u16(), &*body.code), (status, code), "{err:?}");
            assert!(!body.message.is_empty());
            assert!(
                documented.iter().any(|c| c == code),
                "{code} is not in openapi.yaml's Error.code enum"
            );
        }
    }

    #[test]
    fn bind_failure_names_step_errno_and_rollback() {
        let err = CoreError::move_failed("bind", addr(), unbind_ebusy(), Some(Ok(())));
        let (_, body) = to_body(&err.into());
        assert_eq!(body.step, Some(Step::Unbind));
        assert_eq!(body.errno, Some(16));
        assert!(
            body.message.contains("/sys/bus/pci/drivers/nvidia/unbind"),
            "{}",
            body.message
        );
        assert!(body.message.contains("rolled back"), "{}", body.message);
    }

    #[test]
    fn group_conflict_lists_each_function_and_driver() {
        let err = CoreError::GroupConflict {
            device: addr(),
            group: 1,
            others: vec![("0000:01:00.1".parse().unwrap(), "snd_hda_intel".into())],
        };
        let (_, body) = to_body(&err.into());
        assert_eq!(body.conflicting_functions.len(), 1);
        assert!(body.message.contains("0000:01:00.1 on snd_hda_intel"));
    }

    #[test]
    fn error_body_wire_bytes() {
        let mut body = ErrorBody::new("device_busy", "0000:01:00.0 is in use");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"device_busy","message":"0000:01:00.0 is in use"}"#
        );
        body.step = Some(Step::Unbind);
        body.errno = Some(16);
        body.failed_check = Some(ResetCheck::PowerState);
        body.conflicting_functions = vec![ConflictingFunction {
            pci_address: "0000:01:00.1".into(),
            driver: Some("snd_hda_intel".into()),
            reason: None,
        }];
        body.holders = vec![crate::pci::holders::Holder::Swap {
            pci_address: addr(),
            device: "/dev/nvme0n1p3".into(),
        }];
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"device_busy","message":"0000:01:00.0 is in use","step":"unbind","errno":16,"conflicting_functions":[{"pci_address":"0000:01:00.1","driver":"snd_hda_intel"}],"failed_check":"power_state","holders":[{"kind":"swap","pci_address":"0000:01:00.0","device":"/dev/nvme0n1p3"}]}"#
        );
        let text = serde_json::to_string(&body).unwrap();
        let read: ErrorBody = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&read).unwrap(), text);
    }
}
