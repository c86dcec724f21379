//! SR-IOV: a PF's declared VF count, kept across restarts ("reboots") and
//! re-plugs, VFs registered as devices and bound straight to vfio-pci,
//! every refusal, and the PF protected while its VFs are in use, on the
//! simulated kernel (which knows `sriov_numvfs`, autoprobe, `virtfnN`
//! links and VF uevents, and records every write Linux would refuse).

use common::fakesys::{DeviceSpec, FakeSys};
use common::host::Host;
use common::{eventually, EventStream};
use serde_json::{json, Value};

/// The QEMU guest's igb: 8086:10c9, VFs 8086:10ca, at most 7.
const PF: &str = "0000:0b:00.0";
const VF0: &str = "0000:0b:10.0";
const VF1: &str = "0000:0b:10.2";
const ROOT_PORT: &str = "0000:00:1c.0";
const PLAIN_NIC: &str = "0000:0c:00.0";

fn root_port() -> DeviceSpec {
    DeviceSpec::new(ROOT_PORT, 0x8086, 0x7c10, 0x060400)
        .driver("pcieport")
        .group(10)
}

fn igb() -> DeviceSpec {
    DeviceSpec::new(PF, 0x8086, 0x10c9, 0x020000)
        .subsystem(0x8086, 0xa03c)
        .driver("igb")
        .group(11)
        .parent(ROOT_PORT)
        .reset_methods("flr bus")
        .sriov(7, 0x10ca)
        .vf_driver("igbvf")
}

fn plain_nic() -> DeviceSpec {
    DeviceSpec::new(PLAIN_NIC, 0x8086, 0x10d3, 0x020000)
        .driver("e1000e")
        .group(12)
}

fn host_with(pf: DeviceSpec) -> Host {
    let fs = FakeSys::with_devices([root_port(), pf, plain_nic()]);
    let h = Host::builder().on(fs).uevent_fifo().start();
    let r = h.d.post(
        "/devices",
        &json!({"pci_address": PF, "name": "nic", "tags": {"resource": "example.com/vf", "pool": "a"}})
            .to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    h
}

fn host() -> Host {
    host_with(igb())
}

fn put_vfs(h: &Host, body: Value) -> common::Response {
    h.d.req("PUT", "/devices/nic/sriov", Some(&body.to_string()))
}

/// The registered VFs of the PF, in vf_index order.
fn vf_records(h: &Host) -> Vec<Value> {
    let pf_id = h.device("nic")["id"].as_str().unwrap().to_owned();
    let mut vfs: Vec<Value> =
        h.d.get("/devices")
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["parent"] == pf_id.as_str())
            .cloned()
            .collect();
    vfs.sort_by_key(|d| d["vf_index"].as_u64());
    vfs
}

/// The VF records agree with the kernel's VFs: same addresses, in order,
/// each on the driver sysfs shows.
fn assert_records_are_the_kernels_vfs(h: &Host) {
    let kernel = h.fs.vfs_of(PF);
    let records = vf_records(h);
    let addrs: Vec<&str> = records
        .iter()
        .map(|d| d["pci_address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, kernel, "VF records vs the kernel's VFs");
    for d in &records {
        let addr = d["pci_address"].as_str().unwrap();
        assert_eq!(
            d["current_driver"].as_str(),
            h.fs.driver_of(addr).as_deref(),
            "{addr}"
        );
    }
}

fn numvfs_writes(h: &Host) -> Vec<String> {
    h.sim
        .writes()
        .into_iter()
        .filter(|(path, _)| path.ends_with("sriov_numvfs"))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

#[test]
fn vfs_are_made_registered_and_bound_to_vfio_without_a_host_driver_ever_probing_them() {
    let h = host();
    let mut events = EventStream::open(&h.d.socket, "");
    let r = put_vfs(&h, json!({"num_vfs": 4}));
    assert_eq!(r.status, 200, "{}", r.body);
    let status = r.json();
    assert_eq!(status["num_vfs"], 4);
    assert_eq!(status["desired_vfs"], 4);
    assert_eq!(status["total_vfs"], 7);
    assert_eq!(status["vf_device_id"], "10ca");
    assert_eq!(status["vf_driver"], "vfio-pci");
    assert_eq!(status["drivers_autoprobe"], false);
    assert_eq!(status["vfs"].as_array().unwrap().len(), 4);

    let vfs = vf_records(&h);
    assert_eq!(vfs.len(), 4);
    let mut groups = Vec::new();
    for (i, vf) in vfs.iter().enumerate() {
        assert_eq!(vf["name"], format!("nic-vf{i}"));
        assert_eq!(vf["vf_index"], i);
        assert_eq!(vf["tags"]["resource"], "example.com/vf");
        assert_eq!(vf["device_id"], "10ca");
        assert_eq!(vf["current_driver"], "vfio-pci");
        assert_eq!(vf["bound_to_vfio"], true);
        groups.push(vf["iommu_group"].as_i64().unwrap());
        let addr = vf["pci_address"].as_str().unwrap();
        assert_eq!(h.fs.driver_of(addr).as_deref(), Some("vfio-pci"));
    }
    groups.sort();
    groups.dedup();
    assert_eq!(groups.len(), 4, "each VF in its own group");
    assert!(
        !h.fs.autoprobe_of(PF),
        "autoprobe is 0 while vfiod keeps VFs"
    );
    // igbvf never bound: no bind of it was ever written or made.
    assert!(
        !h.sim.writes().iter().any(|(p, _)| p.contains("igbvf")),
        "{:?}",
        h.sim.writes()
    );
    assert_eq!(
        h.sim.refused_writes(),
        vec![],
        "no write Linux would refuse"
    );
    assert_eq!(h.device("nic")["sriov"]["desired_vfs"], 4);
    let changed = events.until(|e| e["type"] == "sriov_changed");
    assert!(
        changed["detail"].as_str().unwrap().contains("desired 4"),
        "{changed}"
    );

    // Idempotent: the same PUT writes nothing.
    h.sim.clear_writes();
    let again = put_vfs(&h, json!({"num_vfs": 4}));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["vfs"], status["vfs"]);
    assert_eq!(h.sim.writes(), vec![], "an unchanged count writes nothing");

    let metrics = h.d.get("/metrics").body;
    assert!(
        metrics.contains("vfiod_sriov_vfs{pf=\"nic\",state=\"desired\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vfiod_sriov_vfs{pf=\"nic\",state=\"enabled\"} 4"),
        "{metrics}"
    );
    let get = h.d.get("/devices/nic/sriov");
    assert_eq!(get.status, 200);
    assert_eq!(get.json()["num_vfs"], 4);
}

#[test]
fn a_count_change_goes_through_zero_and_is_refused_while_a_vf_is_attached() {
    let h = host();
    assert_eq!(put_vfs(&h, json!({"num_vfs": 4})).status, 200);
    let attach = h.d.post(
        "/devices/nic-vf1/attach",
        &json!({"instance_id": "vm-1", "uid": 1000}).to_string(),
    );
    assert_eq!(attach.status, 200, "{}", attach.body);
    h.sim.clear_writes();
    let refused = put_vfs(&h, json!({"num_vfs": 2}));
    refused.expect_error(409, "vfs_in_use");
    refused.expect_message_contains(VF1);
    refused.expect_message_contains("vm-1");
    let named: Vec<String> = refused.json()["conflicting_functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["pci_address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(named, vec![VF1.to_owned()]);
    assert_eq!(numvfs_writes(&h), Vec::<String>::new(), "nothing written");
    assert_eq!(h.fs.sriov_numvfs(PF), 4);

    let detach = h.d.post("/devices/nic-vf1/detach", "{}");
    assert_eq!(detach.status, 200, "{}", detach.body);
    let r = put_vfs(&h, json!({"num_vfs": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(numvfs_writes(&h), vec!["0", "2"], "through 0, never N to M");
    assert_eq!(h.sim.refused_writes(), vec![]);
    assert_eq!(h.fs.sriov_numvfs(PF), 2);
    assert_records_are_the_kernels_vfs(&h);
    assert_eq!(vf_records(&h).len(), 2);
    assert_eq!(h.d.get("/devices/nic-vf3").status, 404, "its record went");

    // Down to 0: autoprobe is put back.
    let r = put_vfs(&h, json!({"num_vfs": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(h.fs.autoprobe_of(PF), "autoprobe restored");
    assert!(vf_records(&h).is_empty());
}

#[test]
fn every_refusal_says_why_and_writes_nothing() {
    let h = host();
    let r = put_vfs(&h, json!({"num_vfs": 8}));
    r.expect_error(400, "invalid_vf_count");
    r.expect_message_contains("at most 7");
    for body in [
        "{}",
        r#"{"num_vfs": -1}"#,
        r#"{"num_vfs": "2"}"#,
        r#"{"num_vfs": 2, "vf_driver": "igbvf"}"#,
        r#"{"num_vfs": 2, "extra": 1}"#,
    ] {
        let r = h.d.req("PUT", "/devices/nic/sriov", Some(body));
        r.expect_error(400, "invalid_request");
    }
    h.d.req("PUT", "/devices/nic/sriov", Some("{"))
        .expect_error(400, "invalid_json");
    h.d.req("PUT", "/devices/nope/sriov", Some(r#"{"num_vfs": 1}"#))
        .expect_error(404, "not_found");

    // A function that is not a PF.
    assert_eq!(h.d.register(PLAIN_NIC, "plain")["name"], "plain");
    h.d.req("PUT", "/devices/plain/sriov", Some(r#"{"num_vfs": 1}"#))
        .expect_error(409, "sriov_unsupported")
        .expect_message_contains("sriov_totalvfs");
    h.d.get("/devices/plain/sriov")
        .expect_error(409, "sriov_unsupported");

    // A PF on vfio-pci without enable_sriov.
    let bound = h.d.post("/devices/nic/bind", "{}");
    assert_eq!(bound.status, 200, "{}", bound.body);
    put_vfs(&h, json!({"num_vfs": 2}))
        .expect_error(409, "sriov_unsupported")
        .expect_message_contains("enable_sriov");
    assert_eq!(h.d.post("/devices/nic/unbind", "{}").status, 200);
    assert_eq!(h.sim.refused_writes(), vec![]);
    assert_eq!(h.fs.sriov_numvfs(PF), 0);

    // A driver that enables fewer VFs than asked: the answer says so.
    h.sim.limit_vfs(PF, 2);
    h.sim.clear_writes();
    let r = put_vfs(&h, json!({"num_vfs": 4}));
    assert_eq!(r.status, 200, "{}", r.body);
    let status = r.json();
    assert_eq!(status["num_vfs"], 2);
    assert_eq!(status["desired_vfs"], 4);
    assert!(
        status["warnings"][0]
            .as_str()
            .unwrap()
            .contains("enabled 2 of the 4"),
        "{status}"
    );
    assert_records_are_the_kernels_vfs(&h);
    // vfiod's own passes (the VFs' add uevents ask for them) leave the
    // short count alone rather than destroying and making the VFs again.
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(numvfs_writes(&h), vec!["4"], "one count write");
    assert_records_are_the_kernels_vfs(&h);
}

#[test]
fn vf_driver_none_leaves_vfs_driverless_and_native_lets_the_host_driver_probe() {
    let h = host();
    let r = put_vfs(&h, json!({"num_vfs": 2, "vf_driver": "none"}));
    assert_eq!(r.status, 200, "{}", r.body);
    for vf in vf_records(&h) {
        assert_eq!(vf["current_driver"], Value::Null, "{vf}");
    }
    assert!(!h.fs.autoprobe_of(PF));
    // A driverless VF binds and is given back to no driver.
    let bound = h.d.post("/devices/nic-vf0/bind", "{}");
    assert_eq!(bound.status, 200, "{}", bound.body);
    assert_eq!(h.fs.driver_of(VF0).as_deref(), Some("vfio-pci"));
    assert_eq!(h.d.post("/devices/nic-vf0/unbind", "{}").status, 200);
    assert_eq!(h.fs.driver_of(VF0), None, "back to no driver, not igbvf");

    let r = put_vfs(&h, json!({"num_vfs": 1, "vf_driver": "native"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(h.fs.autoprobe_of(PF), "native keeps autoprobe on");
    assert_eq!(h.fs.driver_of(VF0).as_deref(), Some("igbvf"));
    // The kernel's probe may end after the count write returned: the
    // record follows it through the bind uevent.
    eventually(10, "the record to show igbvf", || {
        (h.device("nic-vf0")["current_driver"] == "igbvf").then_some(())
    });
}

#[test]
fn a_reboot_loses_the_vfs_and_the_next_start_makes_them_again() {
    let mut h = host();
    assert_eq!(put_vfs(&h, json!({"num_vfs": 3})).status, 200);
    let names_before: Vec<Value> = vf_records(&h).iter().map(|d| d["name"].clone()).collect();
    h.d.terminate();
    h.fs.reboot_sriov(PF);
    assert_eq!(h.fs.sriov_numvfs(PF), 0);
    assert!(h.fs.autoprobe_of(PF), "a reboot turns autoprobe back on");
    h.d.spawn();
    assert_eq!(h.fs.sriov_numvfs(PF), 3);
    assert!(!h.fs.autoprobe_of(PF));
    assert_records_are_the_kernels_vfs(&h);
    let vfs = vf_records(&h);
    let names: Vec<Value> = vfs.iter().map(|d| d["name"].clone()).collect();
    assert_eq!(names, names_before, "the same names after the reboot");
    for vf in &vfs {
        assert_eq!(vf["current_driver"], "vfio-pci", "{vf}");
    }
    assert!(!h.sim.writes().iter().any(|(p, _)| p.contains("igbvf")));
    assert_eq!(h.sim.refused_writes(), vec![]);
}

#[test]
fn a_pf_unplugged_takes_its_vf_records_and_gets_its_vfs_back_when_plugged_in_again() {
    let h = host();
    assert_eq!(put_vfs(&h, json!({"num_vfs": 2})).status, 200);
    let mut events = EventStream::open(&h.d.socket, "");
    let vfs = h.fs.vfs_of(PF);
    h.fs.remove_device(PF);
    for vf in &vfs {
        h.uevent(&format!("remove {vf}"));
    }
    h.uevent(&format!("remove {PF}"));
    eventually(10, "the VF records to go", || {
        vf_records(&h).is_empty().then_some(())
    });
    events.until(|e| e["type"] == "unregistered" && e["pci_address"] == VF0);
    eventually(10, "the PF to be marked absent", || {
        (h.device("nic")["present"] == false).then_some(())
    });

    h.fs.add_device(igb());
    h.uevent(&format!("add {PF}"));
    eventually(15, "the VFs to be made again", || {
        (vf_records(&h).len() == 2
            && vf_records(&h)
                .iter()
                .all(|v| v["current_driver"] == "vfio-pci"))
        .then_some(())
    });
    assert_eq!(h.fs.sriov_numvfs(PF), 2);
    assert_records_are_the_kernels_vfs(&h);
}

#[test]
fn the_pf_is_protected_while_a_vf_is_in_use_and_its_delete_lowers_the_count_first() {
    let h = host();
    assert_eq!(put_vfs(&h, json!({"num_vfs": 2})).status, 200);
    let attach = h.d.post(
        "/devices/nic-vf0/attach",
        &json!({"instance_id": "vm-7", "uid": 1000}).to_string(),
    );
    assert_eq!(attach.status, 200, "{}", attach.body);
    h.sim.clear_writes();
    for (method, path) in [
        ("POST", "/devices/nic/unbind"),
        ("POST", "/devices/nic/reset"),
        ("DELETE", "/devices/nic"),
    ] {
        h.d.req(method, path, Some("{}"))
            .expect_error(409, "pf_has_vfs")
            .expect_message_contains("vm-7");
    }
    h.d.post("/devices/nic/bind", "{}")
        .expect_error(409, "pf_has_vfs");
    h.d.req("DELETE", "/devices/nic-vf1", None)
        .expect_error(409, "conflict");
    assert_eq!(h.sim.writes(), vec![], "nothing written");
    assert_eq!(h.fs.driver_of(PF).as_deref(), Some("igb"));

    // Every operation works on a VF: reset, holders, detach.
    let reset = h.d.post("/devices/nic-vf0/reset", "{}");
    reset.expect_error(409, "reset_scope_conflict");
    assert_eq!(h.d.get("/devices/nic-vf0/holders").status, 200);
    assert_eq!(h.d.post("/devices/nic-vf0/detach", "{}").status, 200);
    let reset = h.d.post("/devices/nic-vf0/reset", "{}");
    assert_eq!(reset.status, 200, "{}", reset.body);

    let deleted = h.d.req("DELETE", "/devices/nic", None);
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert_eq!(h.fs.sriov_numvfs(PF), 0);
    assert!(h.fs.autoprobe_of(PF), "autoprobe restored on delete");
    let left = h.d.get("/devices").json();
    assert!(
        left.as_array().unwrap().is_empty(),
        "no VF record outlives its PF: {left}"
    );
    assert_eq!(h.sim.refused_writes(), vec![]);
}

#[test]
fn vfs_sharing_the_pfs_group_are_left_off_vfio_and_never_move_the_pf() {
    let h = host_with(igb().vfs_share_group());
    let r = put_vfs(&h, json!({"num_vfs": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
    let status = r.json();
    let warnings = status["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{status}");
    assert!(
        warnings[0].as_str().unwrap().contains(PF),
        "names the PF: {status}"
    );
    assert_eq!(h.fs.driver_of(VF0), None);
    let bind = h.d.post("/devices/nic-vf0/bind", "{}");
    bind.expect_error(409, "iommu_group_conflict")
        .expect_message_contains(PF);
    let with_group = h.d.post("/devices/nic-vf0/bind", r#"{"with_group": true}"#);
    with_group.expect_error(409, "pf_has_vfs");
    assert_eq!(h.fs.driver_of(PF).as_deref(), Some("igb"), "the PF stays");
    assert_eq!(h.fs.sriov_numvfs(PF), 2);
}

#[test]
fn a_bus_reset_of_a_pf_that_would_reach_its_vfs_is_refused_by_the_scope_check() {
    let h = host();
    assert_eq!(put_vfs(&h, json!({"num_vfs": 2})).status, 200);
    h.sim.clear_writes();
    let r = h.d.post("/devices/nic/reset", r#"{"method": "bus"}"#);
    r.expect_error(409, "reset_scope_conflict");
    let named: Vec<&str> = r.json()["conflicting_functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["pci_address"].as_str())
        .map(|a| if a == VF0 || a == VF1 { "vf" } else { "other" })
        .collect();
    assert!(named.contains(&"vf"), "names the VFs: {}", r.body);
    assert!(
        !h.sim.writes().iter().any(|(p, _)| p.ends_with("/reset")),
        "nothing reset"
    );
    // A function-level reset of the PF with its VFs free is fine (the
    // kernel keeps the VFs, measured on 6.12).
    let flr = h.d.post("/devices/nic/reset", r#"{"method": "flr"}"#);
    assert_eq!(flr.status, 200, "{}", flr.body);
    assert_eq!(h.fs.sriov_numvfs(PF), 2);
}

fn patch(h: &Host, device: &str, body: Value) -> common::Response {
    h.d.req(
        "PATCH",
        &format!("/devices/{device}"),
        Some(&body.to_string()),
    )
}

/// The `free` count of the pool named `resource`, 0 if there is none.
fn free_in_pool(h: &Host, resource: &str) -> u64 {
    let capacity =
        h.d.get(&format!("/devices/capacity?tags[resource]={resource}"))
            .json();
    capacity["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["resource"] == resource)
        .map_or(0, |p| p["free"].as_u64().unwrap())
}

#[test]
fn a_pfs_new_tags_reach_its_vfs_at_once_and_a_vf_cannot_leave_its_pfs_pool() {
    let mut h = host();
    assert_eq!(put_vfs(&h, json!({"num_vfs": 3})).status, 200);
    let mut events = EventStream::open(&h.d.socket, "");

    // The card moves to another pool: its VFs go with it, in the same
    // commit, each with an event.
    let new_tags = json!({"resource": "example.com/fast", "pool": "b"});
    let r = patch(&h, "nic", json!({"tags": new_tags}));
    assert_eq!(r.status, 200, "{}", r.body);
    for vf in vf_records(&h) {
        assert_eq!(vf["tags"], new_tags, "{}", vf["name"]);
        let updated = events.until(|e| e["type"] == "updated" && e["device_id"] == vf["id"]);
        assert_eq!(updated["pci_address"], vf["pci_address"]);
    }
    assert_eq!(free_in_pool(&h, "example.com/fast"), 3);
    assert_eq!(
        free_in_pool(&h, "example.com/vf"),
        0,
        "the old pool is empty"
    );
    let claimed = h.d.post(
        "/devices/claim",
        &json!({"tags": {"resource": "example.com/fast"}, "instance_id": "vm-1"}).to_string(),
    );
    assert_eq!(claimed.status, 201, "{}", claimed.body);
    assert_eq!(claimed.json()["parent"], h.device("nic")["id"]);
    let claimed = claimed.json()["name"].as_str().unwrap().to_owned();

    // A VF's own tags are refused, whole (its rename too), naming the PF.
    let r = patch(
        &h,
        "nic-vf2",
        json!({"name": "carved", "tags": {"resource": "example.com/dev"}}),
    );
    r.expect_error(409, "vf_tags_follow_pf");
    r.expect_message_contains("nic-vf2");
    r.expect_message_contains("PATCH the tags of nic");
    assert_eq!(h.device("nic-vf2")["tags"], new_tags);
    assert_eq!(h.d.get("/devices/carved").status, 404);
    // A client that sends the tags back unchanged (read, modify, write)
    // is not refused.
    let r = patch(&h, "nic-vf2", json!({"name": "carved", "tags": new_tags}));
    assert_eq!(r.status, 200, "{}", r.body);

    // Recorded: a restart keeps them, and VFs made again after a reboot
    // take the PF's tags as they are now.
    h.d.restart();
    for vf in vf_records(&h) {
        assert_eq!(vf["tags"], new_tags, "{}", vf["name"]);
    }
    let detach = h.d.post(&format!("/devices/{claimed}/detach"), "{}");
    assert_eq!(detach.status, 200, "{}", detach.body);
    h.d.terminate();
    h.fs.reboot_sriov(PF);
    h.d.spawn();
    assert_eq!(vf_records(&h).len(), 3);
    for vf in vf_records(&h) {
        assert_eq!(vf["tags"], new_tags, "{}", vf["name"]);
    }
}
