//! A state file written by the last release with the flat device record
//! (version 1, `tests/fixtures/state-v1.json`) still starts vfiod: the
//! devices come back as they were registered, bound and attached, and the
//! file is rewritten as version 2 at the next change.

use common::eventually;
use common::host::Host;
use common::standard::GPU_AUDIO;
use serde_json::Value;

#[test]
fn a_version_1_state_file_starts_vfiod_with_every_device_as_it_was() {
    let Host {
        fs,
        sim: _sim,
        mut d,
        ..
    } = Host::standard(&[]);
    d.kill9();
    let state = d.state_dir.join("state.json");
    std::fs::write(&state, include_str!("fixtures/state-v1.json")).unwrap();
    d.spawn();
    let device = |name: &str| d.get(&format!("/devices/{name}")).json();
    // Bound by vfiod in the old file: put back on vfio at startup, with the
    // companion it was moved with.
    let gpu = eventually(10, "gpu back on vfio", || {
        let g = device("gpu");
        (g["bound_to_vfio"] == true).then_some(g)
    });
    assert_eq!(gpu["bound_by_vfiod"], true);
    assert_eq!(gpu["group_companions"], serde_json::json!([GPU_AUDIO]));
    assert_eq!(gpu["original_driver"], "nvidia");
    assert_eq!(fs.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
    // Attached for root without a VMM pid: still attached.
    let amd = device("amd");
    assert_eq!(amd["attached_to"], "vm-2");
    assert_eq!(amd["attached_uid"], 0);
    // Attached to a VMM pid that no longer runs: the attachment ended.
    let nic = eventually(10, "nic's attachment to end", || {
        let n = device("nic");
        n["attached_to"].is_null().then_some(n)
    });
    assert_eq!(nic["attached_uid"], Value::Null);
    // Registered only, with tags and a reset method order.
    let nvme = device("nvme");
    assert_eq!(nvme["tags"]["pool"], "a");
    assert_eq!(nvme["reset_method"], serde_json::json!(["flr", "bus"]));
    assert_eq!(nvme["bound_by_vfiod"], false);
    // Found on vfio-pci, never vfiod's to undo.
    let t4 = device("t4");
    assert_eq!(t4["bound_by_vfiod"], false);
    d.post("/devices/t4/unbind", "")
        .expect_error(409, "not_bound_by_vfiod");
    let written: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(written["version"], 2, "rewritten once something changed");
}
