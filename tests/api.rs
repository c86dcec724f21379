//! API tests: HTTP over a real Unix socket to the real `vfiod` binary on a
//! fake sysfs tree. Each test gets its own tree, state and socket.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::fakesys::FakeSys;
use common::host::standard_daemon;
use common::standard::{GPU, NIC};
use common::{parse_response, raw_request, vfioctl, Daemon};
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
fn protocol_errors_are_json_too() {
    let (_fs, d) = standard_daemon();
    let r = d.get("/nope");
    r.expect_error(404, "not_found");
    let r = d.get("/devices/does-not-exist");
    r.expect_error(404, "not_found");
    let r = d.req("PUT", "/devices", Some("{}"));
    r.expect_error(405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, POST"));
    let r = d.req("DELETE", "/devices/available", None);
    r.expect_error(405, "method_not_allowed");
    let big = format!(
        r#"{{"pci_address":"0000:00:02.0","tags":{{"k":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    let r = d.post("/devices", &big);
    r.expect_error(413, "body_too_large");
    // Chunked body over the limit, without a Content-Length.
    let chunk = "x".repeat(40 * 1024);
    let raw = format!(
        "POST /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let r = raw_request(&d.socket, raw.as_bytes());
    r.expect_error(413, "body_too_large");
    // Garbage instead of HTTP: the server answers 400 or closes; it stays up.
    let _ = std::panic::catch_unwind(|| raw_request(&d.socket, b"\x00\x01garbage\r\n\r\n"));
    assert_eq!(d.get("/health").status, 200);
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
fn available_lists_candidates_only() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    let r = d.get("/devices/available");
    assert_eq!(r.status, 200);
    let list = r.json();
    let addrs: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pci_address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addrs,
        [
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:00:04.0",
            "0000:00:05.0"
        ]
        .into_iter()
        .collect()
    );
    let gpu = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pci_address"] == GPU)
        .unwrap();
    assert_eq!(gpu["current_driver"], "nvidia");
    assert_eq!(gpu["iommu_group"], 1);
    assert!(gpu["registered_id"].is_string());
    let t4 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pci_address"] == "0000:00:04.0")
        .unwrap();
    assert_eq!(t4["bound_to_vfio"], true);
}

/// hypeman's AvailableDevice has the names as strings that are never null:
/// a name `pci.ids` does not know (or no `pci.ids` at all) is left out.
#[test]
fn available_leaves_out_names_pci_ids_does_not_know() {
    let (fs, d) = standard_daemon();
    // An NVIDIA device ID no pci.ids lists.
    fs.add_device(
        common::fakesys::DeviceSpec::new("0000:00:1e.0", 0x10de, 0xfffe, 0x030200).group(9),
    );
    let list = d.get("/devices/available").json();
    let unknown = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pci_address"] == "0000:00:1e.0")
        .expect("the new GPU is a candidate");
    assert!(unknown.get("device_name").is_none(), "{unknown}");
    for v in list.as_array().unwrap() {
        for k in ["vendor_name", "device_name"] {
            assert!(v.get(k).is_none_or(Value::is_string), "{k} in {v}");
        }
    }
}

#[test]
fn health_and_openapi() {
    let (_fs, d) = standard_daemon();
    let h = d.get("/health");
    assert_eq!(h.status, 200);
    let h = h.json();
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(h["vfio_pci_available"], true);
    assert_eq!(h["iommu_enabled"], true);
    assert!(h["uptime_s"].is_u64());
    let spec = d.get("/openapi.yaml");
    assert_eq!(spec.status, 200);
    assert!(spec.body.starts_with("openapi: 3"));
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (_fs, d) = standard_daemon();
    let stream = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..20 {
        writer
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut len = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
    }
}

#[test]
fn restart_keeps_the_registry() {
    let (_fs, mut d) = standard_daemon();
    let dev = d.register(GPU, "gpu0");
    d.register(NIC, "nic0");
    let status = d.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(!d.socket.exists(), "socket removed on clean exit");
    d.spawn();
    let again = d.get("/devices/gpu0").json();
    assert_eq!(again["id"], dev["id"]);
    assert_eq!(again["created_at"], dev["created_at"]);
    assert_eq!(d.get("/devices").json().as_array().unwrap().len(), 2);
}

#[test]
fn kill_9_during_a_burst_keeps_every_acknowledged_registration() {
    let fs = FakeSys::new();
    fs.load_vfio();
    let addrs: Vec<String> = (0..64)
        .map(|i| format!("0000:{:02x}:00.0", i + 0x10))
        .collect();
    for (i, a) in addrs.iter().enumerate() {
        fs.add_device(
            common::fakesys::DeviceSpec::new(a, 0x10de, 0x2236, 0x030200).group(100 + i as u32),
        );
    }
    let mut d = Daemon::start(&fs, &[]);
    let socket = d.socket.clone();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = addrs
        .chunks(16)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let socket = socket.clone();
            let acked = acked.clone();
            std::thread::spawn(move || {
                for a in chunk {
                    let r = std::panic::catch_unwind(|| {
                        common::request(
                            &socket,
                            "POST",
                            "/devices",
                            Some(&format!(r#"{{"pci_address":"{a}"}}"#)),
                        )
                    });
                    match r {
                        Ok(r) if r.status == 201 => acked.lock().unwrap().push(a),
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // Kill it mid-burst: once some registrations are acknowledged, while
    // others are in flight.
    common::eventually(20, "a few acknowledged registrations", || {
        (acked.lock().unwrap().len() >= 5).then_some(())
    });
    d.kill9();
    for w in workers {
        let _ = w.join();
    }
    d.spawn();
    let listed: BTreeSet<String> = d
        .get("/devices")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pci_address"].as_str().unwrap().to_owned())
        .collect();
    let acked = acked.lock().unwrap();
    assert!(
        !acked.is_empty(),
        "the burst should have registered something before the kill"
    );
    for a in acked.iter() {
        assert!(listed.contains(a), "acknowledged {a} lost after kill -9");
    }
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

#[test]
fn corrupt_state_stops_startup_and_is_left_alone() {
    let (_fs, mut d) = standard_daemon();
    d.register(GPU, "gpu0");
    d.kill9();
    let path = d.state_dir.join("state.json");
    std::fs::write(&path, b"{\"version\":1,\"devices\":[{").unwrap();
    let out = d.command().output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a restart cannot fix it: exit like a config error"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("state.json") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("saving"),
        "it is a load, not a save: {stderr}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"{\"version\":1,\"devices\":[{"
    );
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let (_fs, d) = standard_daemon();
    let mut cmd = d.command();
    // Another state dir, same socket.
    cmd.arg("--state-dir").arg(d.dir().join("other-state"));
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        d.get("/health").status,
        200,
        "the first daemon keeps serving"
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    assert!(d.socket.exists(), "kill -9 leaves the socket file behind");
    d.spawn();
    assert_eq!(d.get("/health").status, 200);
}

/// Runs `vfioctl` as another user (and optionally with supplementary groups).
fn vfioctl_as(d: &Daemon, uid: u32, groups: &[u32], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(common::vfioctl_bin());
    cmd.arg("--socket").arg(&d.socket).args(args);
    common::run_as(&mut cmd, uid, groups);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn callers_outside_the_group_read_but_cannot_change() {
    let fs = FakeSys::standard_host();
    // Group "nogroup" (65534) is the access group; uid 4242 is in it only
    // through a supplementary group, uid 4243 not at all.
    let d = Daemon::start(&fs, &["--group", "nogroup"]);
    // The temp dir must be reachable for other users.
    let (code, out, err) = vfioctl_as(&d, 4243, &[], &["--json", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "[]");
    let (code, _, err) = vfioctl_as(&d, 4243, &[], &["--json", "register", GPU]);
    assert_eq!(code, 1);
    let e: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(e["code"], "forbidden");
    let (code, out, err) = vfioctl_as(&d, 4242, &[65534], &["--json", "register", GPU]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["pci_address"],
        GPU
    );
    assert!(
        d.log_text().contains("uid=4242"),
        "mutation logged with the caller's uid"
    );
    let (code, _, _) = vfioctl_as(&d, 4243, &[], &["delete", "pci-0000-01-00-0"]);
    assert_eq!(code, 1);
    assert_eq!(d.get("/devices").json().as_array().unwrap().len(), 1);
}

#[test]
fn vfioctl_tables_json_and_errors() {
    let (_fs, d) = standard_daemon();
    let (code, out, err) = vfioctl(
        &d.socket,
        &["register", GPU, "--name", "gpu0", "--tag", "team=ml"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gpu0") && out.contains("team=ml"), "{out}");
    let (code, out, _) = vfioctl(&d.socket, &["list"]);
    assert_eq!(code, 0);
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("ADDRESS"),
        "{out}"
    );
    assert!(
        out.contains("gpu0") && out.contains(GPU) && out.contains("nvidia"),
        "{out}"
    );
    let (code, out, _) = vfioctl(&d.socket, &["--json", "list", "--tag", "team=ml"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim())
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (code, out, _) = vfioctl(&d.socket, &["--json", "list", "--tag", "team=other"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "[]");
    let (code, out, _) = vfioctl(&d.socket, &["update", "gpu0", "--name", "gpu1"]);
    assert_eq!(code, 0);
    assert!(out.contains("gpu1"));
    let (code, out, _) = vfioctl(&d.socket, &["available"]);
    assert_eq!(code, 0);
    assert!(out.contains("0000:00:05.0") && !out.contains(NIC), "{out}");
    let (code, _, err) = vfioctl(&d.socket, &["show", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not_found"), "{err}");
    let (code, _, err) = vfioctl(&d.socket, &["register", "bogus"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid_pci_address"), "{err}");
    let (code, out, _) = vfioctl(&d.socket, &["health"]);
    assert_eq!(code, 0);
    assert!(out.contains("vfio_pci_available"), "{out}");
    let (code, _, _) = vfioctl(&d.socket, &["delete", "gpu1"]);
    assert_eq!(code, 0);
    let (code, out, _) = vfioctl(&d.socket, &["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("no registered devices"));
    let (code, _, err) = vfioctl(&d.dir().join("missing.sock"), &["list"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach vfiod"), "{err}");
}

#[test]
fn unprivileged_daemon_on_the_real_sys_serves_reads_and_refuses_binds() {
    // Read-only: as uid 65534 the kernel refuses any sysfs write anyway,
    // and vfiod refuses before trying.
    let dir = common::fakesys::TempDir::new("vfiod-unpriv").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let run = dir.path().join("run");
    let state = dir.path().join("state");
    let mut child = Command::new(common::vfiod_bin())
        .uid(65534)
        .gid(65534)
        .env("XDG_RUNTIME_DIR", &run)
        .env("XDG_STATE_HOME", &state)
        .env("HOME", dir.path())
        .args(["--config", "/dev/null"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let socket = run.join("vfiod/vfiod.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "unprivileged vfiod did not come up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let health = common::request(&socket, "GET", "/health", None).json();
    assert_eq!(health["privileged"], false);
    let r = common::request(&socket, "GET", "/devices/available", None);
    assert_eq!(r.status, 200);
    // Register whatever is first on this machine's bus (a registry entry
    // only), then a bind is refused without touching anything.
    let first = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .next()
        .unwrap();
    let addr = first.file_name().into_string().unwrap();
    let r = common::request(
        &socket,
        "POST",
        "/devices",
        Some(&format!(r#"{{"pci_address":"{addr}"}}"#)),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let before = std::fs::read_link(first.path().join("driver")).ok();
    let r = common::request(
        &socket,
        "POST",
        &format!("/devices/{}/bind", r.json()["id"].as_str().unwrap()),
        Some("{}"),
    );
    assert!(r.status >= 400, "{}", r.body);
    assert!(
        ["not_privileged", "no_iommu_group", "vfio_unavailable"].contains(&r.code().as_str()),
        "{}",
        r.body
    );
    assert_eq!(std::fs::read_link(first.path().join("driver")).ok(), before);
    assert!(state.join("vfiod/state.json").exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn raw_response_parser_sanity() {
    let r = parse_response(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(r.status, 204);
}

#[test]
fn hundreds_of_concurrent_connections() {
    let (_fs, d) = standard_daemon();
    let socket = d.socket.clone();
    // Open them all first, then use them: 300 connections at once.
    let streams: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(b"GET /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                parse_response(&out).status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// READY, STATUS, WATCHDOG and STOPPING, as systemd's notify socket sees them.
#[test]
fn systemd_notifications() {
    use std::os::unix::net::UnixDatagram;
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    let notify_path = d.dir().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000");
    let child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let socket = d.socket.clone();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(
        first.contains("READY=1") && first.contains("STATUS=serving"),
        "{first}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "READY before the socket was bound"
    );
    let ping = recv();
    assert!(ping.contains("WATCHDOG=1"), "{ping}");
    d.child = Some(child);
    let status = d.terminate();
    assert!(status.success());
    let mut saw_stopping = false;
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        saw_stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(saw_stopping);
}

/// A socket passed by systemd (LISTEN_FDS) is used instead of binding one.
#[test]
fn socket_activation() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate not installed");
        return;
    };
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    let passed = d.dir().join("passed.sock");
    let own = d.command();
    let mut cmd = Command::new(activate);
    cmd.arg("-l").arg(&passed).arg(own.get_program());
    cmd.args(own.get_args());
    let _ = std::fs::remove_file(&d.socket);
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(cmd.stderr(std::process::Stdio::null()).spawn().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        if passed.exists() {
            if let Ok(r) =
                std::panic::catch_unwind(|| common::request(&passed, "GET", "/health", None))
            {
                break r;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "activated vfiod never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.status, 200);
    assert!(
        !d.socket.exists(),
        "with a passed socket vfiod binds none of its own"
    );
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .ok_or(())
}

/// A full disk refuses the change with 507 and loses nothing: the running
/// registry and the state file keep what was acknowledged before.
#[test]
fn full_disk_refuses_changes_and_loses_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    let small = d.dir().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    d.state_dir = small.join("state");
    d.spawn();
    d.register(GPU, "gpu0");
    // Fill the filesystem, leaving the state file as it is.
    let filler = small.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    drop(f);
    let r = d.post(
        "/devices",
        &format!(
            r#"{{"pci_address":"{NIC}","name":"nic0","tags":{{"pad1":"{0}","pad2":"{0}","pad3":"{0}","pad4":"{0}"}}}}"#,
            "x".repeat(225)
        ),
    );
    r.expect_error(507, "storage_full");
    r.expect_message_contains("state.json");
    let list = d.get("/devices").json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the refused change is not visible"
    );
    assert_eq!(d.get("/health").status, 200);
    // Space again: the change goes through; a restart still has everything.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        d.post(
            "/devices",
            &format!(r#"{{"pci_address":"{NIC}","name":"nic0"}}"#)
        )
        .status,
        201
    );
    d.restart();
    assert_eq!(d.get("/devices").json().as_array().unwrap().len(), 2);
}

/// A client that connected before SIGTERM and sends its request right
/// after still gets an answer (the connection is not dropped unanswered).
#[test]
fn shutdown_answers_connections_that_raced_it() {
    use std::io::{Read, Write};
    let (_fs, mut d) = standard_daemon();
    let streams: Vec<std::os::unix::net::UnixStream> = (0..20)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let pid = nix::unistd::Pid::from_raw(d.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                String::from_utf8_lossy(&out)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
        })
        .collect();
    let statuses: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| s.starts_with("HTTP/1.1 200")),
        "{statuses:?}"
    );
    let status = d.terminate_wait();
    assert!(status.success());
}
