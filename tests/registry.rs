//! The device registry over HTTP: register, show, list and filter by tag,
//! rename and retag, delete, each refusal with its code, and one record
//! per address however many clients ask at once.

use std::collections::BTreeSet;

use common::host::standard_daemon;
use common::standard::{GPU, NIC};
use serde_json::Value;

#[test]
fn empty_registry_lists_an_empty_array() {
    let (_fs, d) = standard_daemon();
    let r = d.get("/devices");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), "[]");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("x-vfiod-event-seq").is_some());
}

#[test]
fn register_returns_a_hypeman_device() {
    let (_fs, d) = standard_daemon();
    let r = d.post(
        "/devices",
        r#"{"pci_address":"0000:01:00.0","name":"l4-gpu","tags":{"team":"ml"}}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let dev = r.json();
    let keys: BTreeSet<&str> = dev
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in [
        "id",
        "name",
        "type",
        "pci_address",
        "vendor_id",
        "device_id",
        "iommu_group",
        "bound_to_vfio",
        "attached_to",
        "created_at",
        "tags",
    ] {
        assert!(keys.contains(k), "missing {k} in {dev}");
    }
    let id = dev["id"].as_str().unwrap();
    assert_eq!(id.len(), 24);
    assert!(
        id.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(dev["name"], "l4-gpu");
    assert_eq!(dev["type"], "gpu");
    assert_eq!(dev["pci_address"], GPU);
    assert_eq!(dev["vendor_id"], "10de");
    assert_eq!(dev["device_id"], "2236");
    assert_eq!(dev["iommu_group"], 1);
    assert_eq!(dev["bound_to_vfio"], false);
    assert_eq!(dev["attached_to"], Value::Null);
    assert_eq!(dev["tags"]["team"], "ml");
    assert_eq!(dev["current_driver"], "nvidia");
    assert_eq!(dev["present"], true);
    assert_eq!(dev["class"], "030200");
    chrono::DateTime::parse_from_rfc3339(dev["created_at"].as_str().unwrap()).unwrap();
    assert!(dev["created_at"].as_str().unwrap().ends_with('Z'));

    // Show by id and by name, then it is in the list.
    let by_id = d.get(&format!("/devices/{id}")).json();
    let by_name = d.get("/devices/l4-gpu").json();
    assert_eq!(by_id, dev);
    assert_eq!(by_name, dev);
    let list = d.get("/devices").json();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn default_name_type_and_address_normalisation() {
    let (_fs, d) = standard_daemon();
    let r = d.post("/devices", r#"{"pci_address":"0000:00:02.0"}"#);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["name"], "pci-0000-00-02-0");
    assert_eq!(r.json()["type"], "pci");
    assert_eq!(r.json()["tags"], serde_json::json!({}));
    let r = d.post("/devices", r#"{"pci_address":"0000:00:0A.0"}"#);
    assert_eq!(
        r.status, 404,
        "no such device, but the address parsed: {}",
        r.body
    );
    assert_eq!(r.code(), "device_not_found");
    let r = d.post(
        "/devices",
        r#"{"pci_address":"0000:01:00.1","name":"AUDIO"}"#,
    );
    assert_eq!(r.status, 201);
    let r = d.post("/devices", r#"{"pci_address":"0000:00:05.0"}"#);
    assert_eq!(r.status, 201);
    let upper = d.get("/devices/pci-0000-00-05-0").json();
    assert_eq!(upper["pci_address"], "0000:00:05.0");
}

#[test]
fn every_registration_error_has_its_code() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    let cases: &[(&str, u16, &str)] = &[
        (r#"{"pci_address":"zz"}"#, 400, "invalid_pci_address"),
        (
            r#"{"pci_address":"0000:01:00.0/../../x"}"#,
            400,
            "invalid_pci_address",
        ),
        (r#"{}"#, 400, "invalid_pci_address"),
        (
            r#"{"pci_address":"0000:00:02.0","name":"-bad"}"#,
            400,
            "invalid_name",
        ),
        (
            r#"{"pci_address":"0000:00:02.0","tags":{"k":7}}"#,
            400,
            "invalid_tags",
        ),
        (r#"{"pci_address":"#, 400, "invalid_json"),
        (r#"[1,2]"#, 400, "invalid_json"),
        (r#"{"pci_address":"0000:ff:1f.7"}"#, 404, "device_not_found"),
        (r#"{"pci_address":"0000:01:00.0"}"#, 409, "conflict"),
        (
            r#"{"pci_address":"0000:00:02.0","name":"gpu0"}"#,
            409,
            "conflict",
        ),
    ];
    for (body, status, code) in cases {
        let r = d.post("/devices", body);
        assert_eq!(
            (r.status, r.code().as_str()),
            (*status, *code),
            "{body} -> {}",
            r.body
        );
        assert!(!r.json()["message"].as_str().unwrap().is_empty());
    }
    // Nothing of that was registered.
    assert_eq!(d.get("/devices").json().as_array().unwrap().len(), 1);
}

#[test]
fn tags_filter_percent_encoded_like_the_sdks() {
    let (_fs, d) = standard_daemon();
    d.post(
        "/devices",
        r#"{"pci_address":"0000:01:00.0","name":"aa","tags":{"team":"ml ops","zone":"1"}}"#,
    );
    d.post(
        "/devices",
        r#"{"pci_address":"0000:00:05.0","name":"bb","tags":{"team":"ml ops","zone":"2"}}"#,
    );
    d.post("/devices", r#"{"pci_address":"0000:00:02.0","name":"cc"}"#);
    let names = |q: &str| -> Vec<String> {
        let r = d.get(&format!("/devices{q}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // Listed in PCI address order.
    assert_eq!(names("?tags%5Bteam%5D=ml%20ops"), ["bb", "aa"]);
    assert_eq!(names("?tags%5Bteam%5D=ml+ops&tags%5Bzone%5D=2"), ["bb"]);
    assert_eq!(names("?tags[team]=nobody"), Vec::<String>::new());
    assert_eq!(names("").len(), 3);
    // Unknown parameters are ignored, as hypeman does...
    assert_eq!(names("?limit=1&tagsx=2").len(), 3);
    // ...but a tag filter that is not tags[KEY]=VALUE never lists everything.
    for bad in ["?tags[team=ml", "?tags=team:ml", "?tags%5Bteam=ml"] {
        d.get(&format!("/devices{bad}"))
            .expect_error(400, "invalid_query")
            .expect_message_contains("tags[KEY]=VALUE");
    }
}

#[test]
fn patch_renames_and_replaces_tags() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    d.register(NIC, "nic0");
    let r = d.req(
        "PATCH",
        "/devices/gpu0",
        Some(r#"{"name":"gpu-a","tags":{"pool":"x"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["name"], "gpu-a");
    assert_eq!(r.json()["tags"], serde_json::json!({"pool": "x"}));
    assert_eq!(d.get("/devices/gpu0").status, 404);
    assert_eq!(d.get("/devices/gpu-a").status, 200);
    let r = d.req("PATCH", "/devices/gpu-a", Some(r#"{"name":"nic0"}"#));
    r.expect_error(409, "conflict");
    let r = d.req("PATCH", "/devices/gpu-a", Some(r#"{"tags":{"":"x"}}"#));
    r.expect_error(400, "invalid_tags");
    let r = d.req("PATCH", "/devices/nobody", Some(r#"{"name":"zz"}"#));
    r.expect_error(404, "not_found");
}

#[test]
fn delete_is_204_then_404() {
    let (_fs, d) = standard_daemon();
    let dev = d.register(GPU, "gpu0");
    let r = d.req(
        "DELETE",
        &format!("/devices/{}", dev["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let r = d.req("DELETE", "/devices/gpu0", None);
    r.expect_error(404, "not_found");
    // The address is free again.
    d.register(GPU, "gpu0");
}

#[test]
fn fifty_parallel_registrations_of_one_address_give_one_201() {
    let (_fs, d) = standard_daemon();
    let socket = d.socket.clone();
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                common::request(
                    &socket,
                    "POST",
                    "/devices",
                    Some(r#"{"pci_address":"0000:01:00.0"}"#),
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        49,
        "{statuses:?}"
    );
}
