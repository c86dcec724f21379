//! One parse function per endpoint: raw body bytes or query strings in,
//! a typed core request or an error with the right code out. Nothing
//! here touches state; every value is validated before the core sees it.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::core::{
    AttachRequest, BindRequest, DetachRequest, DeviceName, InstanceId, RegisterRequest,
    ResetMethod, ResetRequest, SriovRequest, Tags, UpdateRequest,
};
use crate::core::{ClaimRequest, NumaPolicy};
use crate::error::CoreError;
use crate::pci::PciAddress;
use crate::registry::VfDriver;

/// Parses a JSON object body; an empty body is `{}` when `empty_ok`.
fn object(body: &[u8], empty_ok: bool) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(Map::new())
        } else {
            Err(ApiError::InvalidJson(
                "request body is empty; expected a JSON object".into(),
            ))
        };
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson(
            "request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// Extension endpoints reject unknown fields so a typo is not ignored.
fn deny_unknown(map: &Map<String, Value>, known: &[&str]) -> Result<(), CoreError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(CoreError::InvalidRequest(format!(
            "unknown field {:?}; expected {}",
            k.chars().take(40).collect::<String>(),
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

fn optional_bool(map: &Map<String, Value>, field: &str) -> Result<bool, CoreError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(CoreError::InvalidRequest(format!(
            "{field} must be true or false"
        ))),
    }
}

fn name_field(map: &Map<String, Value>) -> Result<Option<DeviceName>, CoreError> {
    match map.get("name") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DeviceName::parse(s).map(Some),
        Some(_) => Err(CoreError::InvalidName("name must be a string".into())),
    }
}

fn tags_field(map: &Map<String, Value>) -> Result<Option<Tags>, CoreError> {
    match map.get("tags") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(obj)) => {
            let mut tags = BTreeMap::new();
            for (k, v) in obj {
                let Value::String(v) = v else {
                    return Err(CoreError::InvalidTags(format!(
                        "tag {:?} must have a string value",
                        k.chars().take(40).collect::<String>()
                    )));
                };
                tags.insert(k.clone(), v.clone());
            }
            Tags::parse(tags).map(Some)
        }
        Some(_) => Err(CoreError::InvalidTags(
            "tags must be an object of strings".into(),
        )),
    }
}

/// A path or body address; a bad one is 400 `invalid_pci_address`, not a 404.
pub fn pci_address(s: &str) -> Result<PciAddress, ApiError> {
    s.parse()
        .map_err(|e: crate::pci::InvalidPciAddress| ApiError::InvalidPciAddress(e.to_string()))
}

/// `POST /devices`. Unknown fields are ignored, as hypeman does.
pub fn register(body: &[u8]) -> Result<RegisterRequest, ApiError> {
    let map = object(body, false)?;
    let pci_address = match map.get("pci_address") {
        Some(Value::String(s)) => pci_address(s)?,
        None | Some(Value::Null) => {
            return Err(ApiError::InvalidPciAddress(
                "pci_address is required, e.g. \"0000:a2:00.0\"".into(),
            ))
        }
        Some(_) => {
            return Err(ApiError::InvalidPciAddress(
                "pci_address must be a string".into(),
            ))
        }
    };
    Ok(RegisterRequest {
        pci_address,
        name: name_field(&map)?,
        tags: tags_field(&map)?.unwrap_or_default(),
    })
}

/// `PATCH /devices/{id_or_name}`.
pub fn update(body: &[u8]) -> Result<UpdateRequest, ApiError> {
    let map = object(body, false)?;
    deny_unknown(&map, &["name", "tags", "reset_method"])?;
    Ok(UpdateRequest {
        name: name_field(&map)?,
        tags: tags_field(&map)?,
        reset_method: reset_method_field(&map)?,
    })
}

/// `"reset_method": ["flr", "pm"]` (the kernel's names, in the order to
/// try them), or `null` for the kernel's own order.
fn reset_method_field(
    map: &Map<String, Value>,
) -> Result<Option<Option<Vec<ResetMethod>>>, CoreError> {
    let bad = || {
        CoreError::InvalidRequest(
            "reset_method must be null or a non-empty list of distinct methods from device_specific, acpi, flr, af_flr, pm, bus".into(),
        )
    };
    match map.get("reset_method") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Array(items)) => {
            let mut methods = Vec::new();
            for item in items {
                let Value::String(s) = item else {
                    return Err(bad());
                };
                let m = ResetMethod::parse(s)?;
                if m == ResetMethod::Auto || methods.contains(&m) {
                    return Err(bad());
                }
                methods.push(m);
            }
            if methods.is_empty() {
                return Err(bad());
            }
            Ok(Some(Some(methods)))
        }
        Some(_) => Err(bad()),
    }
}

/// `POST /devices/{id_or_name}/reset`; an empty body means `auto`.
pub fn reset(body: &[u8]) -> Result<ResetRequest, ApiError> {
    let map = object(body, true)?;
    deny_unknown(&map, &["method", "dry_run"])?;
    let method = match map.get("method") {
        None | Some(Value::Null) => ResetMethod::Auto,
        Some(Value::String(s)) => ResetMethod::parse(s)?,
        Some(_) => return Err(CoreError::InvalidRequest("method must be a string".into()).into()),
    };
    Ok(ResetRequest {
        method,
        dry_run: optional_bool(&map, "dry_run")?,
    })
}

/// `POST /devices/{id_or_name}/bind`; an empty body means the defaults.
pub fn bind(body: &[u8]) -> Result<BindRequest, ApiError> {
    let map = object(body, true)?;
    deny_unknown(&map, &["with_group", "dry_run", "force"])?;
    Ok(BindRequest {
        with_group: optional_bool(&map, "with_group")?,
        dry_run: optional_bool(&map, "dry_run")?,
        force: optional_bool(&map, "force")?,
    })
}

/// `POST /devices/{id_or_name}/unbind`: no fields.
pub fn unbind(body: &[u8]) -> Result<(), ApiError> {
    let map = object(body, true)?;
    Ok(deny_unknown(&map, &[])?)
}

/// The `instance_id` (required) and `pid` (optional, not 0) an attach and
/// a claim both take.
fn instance_and_pid(map: &Map<String, Value>) -> Result<(InstanceId, Option<u32>), CoreError> {
    let instance = match map.get("instance_id") {
        Some(Value::String(s)) => InstanceId::parse(s)?,
        None | Some(Value::Null) => {
            return Err(CoreError::InvalidRequest("instance_id is required".into()))
        }
        Some(_) => {
            return Err(CoreError::InvalidRequest(
                "instance_id must be a string".into(),
            ))
        }
    };
    let pid = optional_u32(map, "pid").map_err(|e| CoreError::InvalidPid(e.to_string()))?;
    if pid == Some(0) {
        return Err(CoreError::InvalidPid(
            "pid must be a process id, not 0".into(),
        ));
    }
    Ok((instance, pid))
}

/// `POST /devices/{id_or_name}/attach`.
pub fn attach(body: &[u8]) -> Result<AttachRequest, ApiError> {
    let map = object(body, false)?;
    deny_unknown(&map, &["instance_id", "uid", "pid"])?;
    let (instance, pid) = instance_and_pid(&map)?;
    Ok(AttachRequest {
        instance,
        uid: optional_u32(&map, "uid")?,
        pid,
    })
}

/// `PUT /devices/{id_or_name}/sriov`: `num_vfs` required, `vf_driver`
/// optional.
pub fn sriov(body: &[u8]) -> Result<SriovRequest, ApiError> {
    let map = object(body, false)?;
    deny_unknown(&map, &["num_vfs", "vf_driver"])?;
    let num_vfs = match map.get("num_vfs") {
        None | Some(Value::Null) => {
            return Err(CoreError::InvalidRequest("num_vfs is required".into()).into())
        }
        Some(v) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| {
                CoreError::InvalidRequest("num_vfs must be an integer from 0 to 65535".into())
            })?,
    };
    let vf_driver = match map.get("vf_driver") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(VfDriver::parse(s).ok_or_else(|| {
            CoreError::InvalidRequest(format!(
                "vf_driver must be \"vfio-pci\", \"none\" or \"native\", not {:?}",
                s.chars().take(40).collect::<String>()
            ))
        })?),
        Some(_) => {
            return Err(CoreError::InvalidRequest("vf_driver must be a string".into()).into())
        }
    };
    Ok(SriovRequest {
        num_vfs: u32::from(num_vfs),
        vf_driver,
    })
}

/// `POST /devices/claim`: `tags` and `instance_id` required; `uid`,
/// `pid`, `numa_node`, `numa` and `vgpu_type` optional.
pub fn claim(body: &[u8]) -> Result<ClaimRequest, ApiError> {
    let map = object(body, false)?;
    deny_unknown(
        &map,
        &[
            "tags",
            "instance_id",
            "uid",
            "pid",
            "numa_node",
            "numa",
            "vgpu_type",
            "mdev_type",
        ],
    )?;
    let tags = tags_field(&map)?
        .ok_or_else(|| {
            CoreError::InvalidRequest("tags is required (an object, may be empty)".into())
        })?
        .into_inner();
    let (instance, pid) = instance_and_pid(&map)?;
    let numa = match map.get("numa") {
        None | Some(Value::Null) => NumaPolicy::Preferred,
        Some(Value::String(s)) if s == "preferred" => NumaPolicy::Preferred,
        Some(Value::String(s)) if s == "required" => NumaPolicy::Required,
        Some(_) => {
            return Err(CoreError::InvalidRequest(
                "numa must be \"required\" or \"preferred\"".into(),
            )
            .into())
        }
    };
    let numa_node = optional_u32(&map, "numa_node")?;
    if numa == NumaPolicy::Required && numa_node.is_none() {
        return Err(CoreError::InvalidRequest("numa \"required\" needs a numa_node".into()).into());
    }
    let vgpu_type = match map.get("vgpu_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 128 => {
            Some(s.trim().to_owned())
        }
        Some(_) => {
            return Err(CoreError::InvalidRequest(
                "vgpu_type must be a type name (L40S-12Q) or ID, 1 to 128 characters".into(),
            )
            .into())
        }
    };
    let mdev_type = match map.get("mdev_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 128 => {
            Some(s.trim().to_owned())
        }
        Some(_) => return Err(CoreError::InvalidRequest(
            "mdev_type must be a type id (nvidia-63) or name (GRID P40-2Q), 1 to 128 characters"
                .into(),
        )
        .into()),
    };
    if vgpu_type.is_some() && mdev_type.is_some() {
        return Err(CoreError::InvalidRequest(
            "vgpu_type (a type on an SR-IOV VF) and mdev_type (a mediated device) exclude each other"
                .into(),
        )
        .into());
    }
    Ok(ClaimRequest {
        tags,
        instance_id: instance.0,
        uid: optional_u32(&map, "uid")?,
        pid,
        numa_node,
        numa,
        vgpu_type,
        mdev_type,
    })
}

/// `GET /devices/capacity?tags[KEY]=VALUE&...`: the tag filter.
pub fn capacity_query(
    query: Option<&str>,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    Ok(list_query(query)?.into_iter().collect())
}

/// A non-negative integer that fits a uid or pid, or absent/null.
fn optional_u32(map: &Map<String, Value>, field: &str) -> Result<Option<u32>, CoreError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n != u32::MAX)
            .map(Some)
            .ok_or_else(|| {
                CoreError::InvalidRequest(format!(
                    "{field} must be an integer from 0 to 4294967294"
                ))
            }),
    }
}

/// `POST /devices/{id_or_name}/detach`: `keep_bound`, and the instance
/// whose mediated device on this parent to release (`instance_id`; none:
/// the whole device's attachment).
pub fn detach(body: &[u8]) -> Result<DetachRequest, ApiError> {
    let map = object(body, true)?;
    deny_unknown(&map, &["keep_bound", "instance_id"])?;
    let instance = match map.get("instance_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(InstanceId::parse(s)?),
        Some(_) => {
            return Err(CoreError::InvalidRequest("instance_id must be a string".into()).into())
        }
    };
    Ok(DetachRequest {
        keep_bound: optional_bool(&map, "keep_bound")?,
        instance,
    })
}

/// Decodes `%XX` escapes (and `+` as a space in query strings). Invalid
/// escapes and non-UTF-8 results are errors, not guesses.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, CoreError> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(k, true), percent_decode(v, true)) {
                (Some(k), Some(v)) => Ok((k, v)),
                _ => Err(CoreError::InvalidRequest(
                    "query string has an invalid percent-escape".into(),
                )),
            }
        })
        .collect()
}

/// `GET /devices?tags[KEY]=VALUE&...`: every pair must match. Other
/// parameters are ignored.
pub fn list_query(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut filter = Vec::new();
    for (k, v) in query_pairs(query)? {
        // Only `tags` parameters are checked: hypeman ignores unknown ones,
        // but a malformed tag filter ignored would silently list everything.
        if k != "tags" && !k.starts_with("tags[") {
            continue;
        }
        let Some(key) = k.strip_prefix("tags[").and_then(|r| r.strip_suffix(']')) else {
            return Err(ApiError::InvalidQuery(format!(
                "query parameter {:?} is not a tag filter: write tags[KEY]=VALUE",
                k.chars().take(140).collect::<String>()
            )));
        };
        if key.is_empty() {
            return Err(CoreError::InvalidTags("tag filter tags[] needs a key".into()).into());
        }
        filter.push((key.to_owned(), v));
    }
    if filter.len() > crate::core::MAX_TAGS {
        return Err(CoreError::InvalidTags("too many tag filters".into()).into());
    }
    Ok(filter)
}

/// `GET /events?since=SEQ`.
pub fn events_query(query: Option<&str>) -> Result<Option<u64>, CoreError> {
    for (k, v) in query_pairs(query)? {
        if k == "since" {
            return v.parse().map(Some).map_err(|_| {
                CoreError::InvalidRequest("since must be an event sequence number".into())
            });
        }
    }
    Ok(None)
}

/// `GET /devices/available?all=true`: every PCI function of the host
/// instead of only the passthrough candidates.
pub fn available_query(query: Option<&str>) -> Result<bool, CoreError> {
    let mut all = false;
    for (k, v) in query_pairs(query)? {
        if k == "all" {
            all = match v.as_str() {
                "true" | "1" | "" => true,
                "false" | "0" => false,
                _ => {
                    return Err(CoreError::InvalidRequest(format!(
                        "all must be true or false, not {v:?}"
                    )))
                }
            };
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::status_and_code;

    fn code<T: std::fmt::Debug, E: Into<ApiError>>(r: Result<T, E>) -> &'static str {
        status_and_code(&r.unwrap_err().into()).1
    }

    #[test]
    fn register_accepts_hypeman_bodies() {
        let r = register(br#"{"pci_address":"0000:A2:00.0","name":"l4-gpu","tags":{"team":"ml"}}"#)
            .unwrap();
        assert_eq!(r.pci_address.to_string(), "0000:a2:00.0");
        assert_eq!(r.name.unwrap().as_str(), "l4-gpu");
        assert_eq!(
            r.tags.into_inner().get("team").map(String::as_str),
            Some("ml")
        );
        let r = register(br#"{"pci_address":"0000:a2:00.0","name":null,"tags":null,"future":1}"#)
            .unwrap();
        assert!(r.name.is_none());
        assert!(r.tags.into_inner().is_empty());
    }

    #[test]
    fn register_rejects_bad_bodies_with_the_right_code() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "invalid_json"),
            (b"   ", "invalid_json"),
            (b"{", "invalid_json"),
            (b"[]", "invalid_json"),
            (b"\"0000:00:00.0\"", "invalid_json"),
            (b"null", "invalid_json"),
            (
                b"{\"pci_address\":\"0000:a2:00.0\"} trailing",
                "invalid_json",
            ),
            (b"\xff\xfe", "invalid_json"),
            (b"{}", "invalid_pci_address"),
            (b"{\"pci_address\":null}", "invalid_pci_address"),
            (b"{\"pci_address\":42}", "invalid_pci_address"),
            (b"{\"pci_address\":\"a2:00.0\"}", "invalid_pci_address"),
            (
                b"{\"pci_address\":\"../../../etc/passwd\"}",
                "invalid_pci_address",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0/../x\"}",
                "invalid_pci_address",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"name\":\"-x\"}",
                "invalid_name",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"name\":\"a\"}",
                "invalid_name",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"name\":\"has space\"}",
                "invalid_name",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"name\":\"a/b\"}",
                "invalid_name",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"name\":\"available\"}",
                "invalid_name",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"name\":7}",
                "invalid_name",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"tags\":[]}",
                "invalid_tags",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"tags\":{\"k\":1}}",
                "invalid_tags",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"tags\":{\"\":\"v\"}}",
                "invalid_tags",
            ),
            (
                b"{\"pci_address\":\"0000:a2:00.0\",\"tags\":{\"k\":\"a\\nb\"}}",
                "invalid_tags",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                code(register(body)),
                *expected,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn name_length_limit() {
        let body = |n: usize| {
            serde_json::json!({"pci_address": "0000:00:00.0", "name": "n".repeat(n)}).to_string()
        };
        assert!(register(body(255).as_bytes()).is_ok());
        assert_eq!(code(register(body(256).as_bytes())), "invalid_name");
    }

    #[test]
    fn tag_limits_are_enforced() {
        let many: serde_json::Map<String, Value> = (0..51)
            .map(|i| (format!("k{i}"), Value::String("v".into())))
            .collect();
        let body = serde_json::json!({"pci_address": "0000:00:00.0", "tags": many}).to_string();
        assert_eq!(code(register(body.as_bytes())), "invalid_tags");
        let long_key = "k".repeat(129);
        let body =
            serde_json::json!({"pci_address": "0000:00:00.0", "tags": {long_key: "v"}}).to_string();
        assert_eq!(code(register(body.as_bytes())), "invalid_tags");
        let long_value = "v".repeat(257);
        let body = serde_json::json!({"pci_address": "0000:00:00.0", "tags": {"k": long_value}})
            .to_string();
        assert_eq!(code(register(body.as_bytes())), "invalid_tags");
        // At the limits, and every character hypeman allows, is accepted.
        let most: serde_json::Map<String, Value> = (0..50)
            .map(|i| (format!("k{i}"), Value::String("v".repeat(256))))
            .collect();
        let body = serde_json::json!({"pci_address": "0000:00:00.0", "tags": most}).to_string();
        assert!(register(body.as_bytes()).is_ok());
        let body = serde_json::json!({"pci_address": "0000:00:00.0",
            "tags": {"k".repeat(128): "", "a-Z 0_9.:/=+@": "team=ml/ops+1@x:y z"}})
        .to_string();
        assert!(register(body.as_bytes()).is_ok());
        // ...and what hypeman refuses is refused here too.
        for (k, v) in [
            ("k", "caf\u{e9}"),
            ("k#", "v"),
            ("k", "a,b"),
            ("[k]", "v"),
            ("k", "\""),
        ] {
            let body =
                serde_json::json!({"pci_address": "0000:00:00.0", "tags": {k: v}}).to_string();
            assert_eq!(
                code(register(body.as_bytes())),
                "invalid_tags",
                "{k:?}: {v:?}"
            );
        }
    }

    #[test]
    fn extension_bodies() {
        let b = bind(b"").unwrap();
        assert!(!b.with_group && !b.dry_run);
        let b = bind(br#"{"with_group":true,"dry_run":true}"#).unwrap();
        assert!(b.with_group && b.dry_run);
        assert_eq!(code(bind(br#"{"with_group":"yes"}"#)), "invalid_request");
        assert_eq!(code(bind(br#"{"withgroup":true}"#)), "invalid_request");
        assert_eq!(code(bind(b"{")), "invalid_json");
        assert!(unbind(b"{}").is_ok());
        assert_eq!(code(unbind(br#"{"force":true}"#)), "invalid_request");
        assert!(attach(br#"{"instance_id":"vm-1"}"#).is_ok());
        assert_eq!(code(attach(b"{}")), "invalid_request");
        assert_eq!(code(attach(br#"{"instance_id":""}"#)), "invalid_request");
        assert_eq!(code(attach(br#"{"instance_id":5}"#)), "invalid_request");
        assert_eq!(code(attach(b"")), "invalid_json");
        assert!(detach(br#"{"keep_bound":true}"#).unwrap().keep_bound);
        assert!(!detach(b"").unwrap().keep_bound);
        assert_eq!(detach(b"").unwrap().instance, None);
        let d = detach(br#"{"instance_id":"vm-7"}"#).unwrap();
        assert_eq!(d.instance.map(|i| i.0), Some("vm-7".to_owned()));
        assert!(detach(br#"{"instance_id":7}"#).is_err());
        assert!(detach(br#"{"instance_id":""}"#).is_err());
        let u = update(br#"{"name":"new-name"}"#).unwrap();
        assert!(u.tags.is_none());
        assert_eq!(code(update(br#"{"nmae":"x"}"#)), "invalid_request");
        assert_eq!(code(update(br#"{"name":"!"}"#)), "invalid_name");
        let u = update(br#"{"reset_method":["flr","pm"]}"#).unwrap();
        assert_eq!(
            u.reset_method,
            Some(Some(vec![ResetMethod::Flr, ResetMethod::Pm]))
        );
        assert_eq!(
            update(br#"{"reset_method":null}"#).unwrap().reset_method,
            Some(None)
        );
        for bad in [
            r#"{"reset_method":[]}"#,
            r#"{"reset_method":["auto"]}"#,
            r#"{"reset_method":["flr","flr"]}"#,
            r#"{"reset_method":["warm"]}"#,
            r#"{"reset_method":"flr"}"#,
            r#"{"reset_method":[1]}"#,
        ] {
            assert_eq!(code(update(bad.as_bytes())), "invalid_request", "{bad}");
        }
        let r = reset(b"").unwrap();
        assert!(r.method == ResetMethod::Auto && !r.dry_run);
        let r = reset(br#"{"method":"af_flr","dry_run":true}"#).unwrap();
        assert!(r.method == ResetMethod::AfFlr && r.dry_run);
        assert_eq!(code(reset(br#"{"method":"hard"}"#)), "invalid_request");
        assert_eq!(code(reset(br#"{"method":1}"#)), "invalid_request");
        assert_eq!(code(reset(br#"{"force":true}"#)), "invalid_request");
    }

    #[test]
    fn tag_filters_are_percent_decoded_as_sdks_send_them() {
        let f = list_query(Some("tags%5Bteam%5D=ml%20ops&tags[zone]=a+b&other=1")).unwrap();
        assert_eq!(
            f,
            vec![
                ("team".into(), "ml ops".into()),
                ("zone".into(), "a b".into())
            ]
        );
        assert!(list_query(None).unwrap().is_empty());
        assert_eq!(code(list_query(Some("tags%5B%5D=x"))), "invalid_tags");
        assert_eq!(code(list_query(Some("tags[pool=a"))), "invalid_query");
        assert_eq!(code(list_query(Some("tags=pool:a"))), "invalid_query");
        assert_eq!(code(list_query(Some("tags[a]x=1"))), "invalid_query");
        assert!(list_query(Some("tagsx=1&limit=5")).unwrap().is_empty());
        assert_eq!(code(list_query(Some("tags[a]=%zz"))), "invalid_request");
        assert_eq!(code(list_query(Some("tags[a]=%ff"))), "invalid_request");
    }

    #[test]
    fn events_since() {
        assert_eq!(events_query(Some("since=12")).unwrap(), Some(12));
        assert_eq!(events_query(None).unwrap(), None);
        assert_eq!(code(events_query(Some("since=-1"))), "invalid_request");
    }
}
