//! Claims: a free device or VF handed out atomically, by NUMA node, load of
//! its PF and reset history; idempotent per instance; refusals that say why
//! each candidate did not fit; capacity; and a burst of parallel claims,
//! also across a kill -9 in its middle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::fakesys::{DeviceSpec, FakeSys};
use common::host::Host;
use common::Response;
use serde_json::{json, Value};

/// Two SR-IOV NICs, one per NUMA node (VFs inherit the node).
const PF_A: &str = "0000:0b:00.0";
const PF_B: &str = "0000:0d:00.0";
/// Two plain NICs for whole-device claims.
const NIC_1: &str = "0000:20:00.0";
const NIC_2: &str = "0000:21:00.0";
const VMM_UID: u32 = 4242;

fn pf(addr: &str, group: u32, node: i32) -> DeviceSpec {
    DeviceSpec::new(addr, 0x8086, 0x10c9, 0x020000)
        .driver("igb")
        .group(group)
        .reset_methods("flr")
        .sriov(7, 0x10ca)
        .vf_driver("igbvf")
        .numa_node(node)
}

fn nic(addr: &str, group: u32) -> DeviceSpec {
    DeviceSpec::new(addr, 0x8086, 0x10d3, 0x020000)
        .driver("e1000e")
        .group(group)
        .reset_methods("flr")
}

fn host() -> Host {
    let fs = FakeSys::with_devices([
        pf(PF_A, 30, 0),
        pf(PF_B, 31, 1),
        nic(NIC_1, 32),
        nic(NIC_2, 33),
    ]);
    Host::builder().on(fs).uevent_fifo().start()
}

fn register(h: &Host, addr: &str, name: &str, resource: &str) {
    let r = h.d.post(
        "/devices",
        &json!({"pci_address": addr, "name": name, "tags": {"resource": resource}}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// Both PFs with `a` and `b` VFs, in pool `vf`.
fn vf_host(a: u32, b: u32) -> Host {
    let h = host();
    register(&h, PF_A, "pfa", "vf");
    register(&h, PF_B, "pfb", "vf");
    for (name, n) in [("pfa", a), ("pfb", b)] {
        let r = h.d.req(
            "PUT",
            &format!("/devices/{name}/sriov"),
            Some(&json!({"num_vfs": n}).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    h
}

fn claim(h: &Host, body: Value) -> Response {
    h.d.post("/devices/claim", &body.to_string())
}

fn claim_vf(h: &Host, instance: &str) -> Response {
    claim(
        h,
        json!({"tags": {"resource": "vf"}, "instance_id": instance, "uid": VMM_UID}),
    )
}

fn numa_of(h: &Host, addr: &str) -> String {
    std::fs::read_to_string(h.fs.path(&format!("bus/pci/devices/{addr}/numa_node")))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn a_claim_hands_out_a_vf_bound_and_granted_and_is_idempotent_per_instance() {
    let h = vf_host(2, 0);
    let r = claim_vf(&h, "vm-1");
    assert_eq!(r.status, 201, "{}", r.body);
    let d = r.json();
    assert_eq!(d["attached_to"], "vm-1");
    assert_eq!(d["attached_uid"], VMM_UID);
    assert_eq!(d["current_driver"], "vfio-pci");
    assert!(d["parent"].is_string(), "a VF: {d}");
    let addr = d["pci_address"].as_str().unwrap().to_owned();
    assert_eq!(h.fs.driver_of(&addr).as_deref(), Some("vfio-pci"));

    // The same request again: the same device, 200.
    let again = claim_vf(&h, "vm-1");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["pci_address"], addr.as_str());
    // Another request under the same instance: refused.
    claim(
        &h,
        json!({"tags": {"resource": "vf"}, "instance_id": "vm-1", "uid": VMM_UID, "numa_node": 0}),
    )
    .expect_error(409, "claim_conflict")
    .expect_message_contains("vm-1");

    // Released by detach, the device is free again (reset on release as
    // configured), and the instance may claim anew.
    let name = d["name"].as_str().unwrap();
    let detached = h.d.post(&format!("/devices/{name}/detach"), "{}");
    assert_eq!(detached.status, 200, "{}", detached.body);
    // vfio-pci is where the PF's vf_driver puts its VFs: released, the VF
    // stays there for the next VM, not given back to no driver.
    assert_eq!(h.fs.driver_of(&addr).as_deref(), Some("vfio-pci"));
    let anew = claim_vf(&h, "vm-1");
    assert_eq!(anew.status, 201, "{}", anew.body);
}

#[test]
fn the_numa_node_comes_first_and_required_refuses_naming_each_candidate() {
    let h = vf_host(1, 1);
    let r = claim(
        &h,
        json!({"tags": {"resource": "vf"}, "instance_id": "vm-1", "numa_node": 1}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let on_1 = r.json()["pci_address"].as_str().unwrap().to_owned();
    assert_eq!(
        numa_of(&h, &on_1),
        "1",
        "picked on node 1 though node 0's VF sorts first"
    );

    let refused = claim(
        &h,
        json!({"tags": {"resource": "vf"}, "instance_id": "vm-2", "numa_node": 1, "numa": "required"}),
    );
    refused.expect_error(409, "no_capacity");
    let reasons: BTreeMap<String, String> = refused.json()["conflicting_functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["pci_address"].as_str().unwrap().to_owned(),
                f["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 4, "both PFs and both VFs: {reasons:?}");
    assert!(
        reasons[&on_1].contains("attached to instance \"vm-1\""),
        "{reasons:?}"
    );
    assert!(reasons[PF_A].contains("a PF with VFs"), "{reasons:?}");
    let other_vf = reasons
        .iter()
        .find(|(a, _)| a.as_str() != on_1 && a.as_str() != PF_A && a.as_str() != PF_B)
        .unwrap();
    assert_eq!(other_vf.1, "on NUMA node 0");

    // Preferred falls back to the other node.
    let r = claim(
        &h,
        json!({"tags": {"resource": "vf"}, "instance_id": "vm-3", "numa_node": 1}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(numa_of(&h, r.json()["pci_address"].as_str().unwrap()), "0");
}

#[test]
fn the_pf_with_the_most_free_vfs_is_picked_first() {
    let h = vf_host(2, 4);
    let mut parents = Vec::new();
    for i in 0..4 {
        let r = claim_vf(&h, &format!("vm-{i}"));
        assert_eq!(r.status, 201, "{}", r.body);
        let addr = r.json()["pci_address"].as_str().unwrap().to_owned();
        parents.push(if addr.starts_with("0000:0b") {
            "a"
        } else {
            "b"
        });
    }
    // b (4 free) before a (2 free); from 2 and 2 on, the lower address.
    assert_eq!(parents, vec!["b", "b", "a", "b"]);
}

#[test]
fn a_device_whose_last_reset_succeeded_comes_before_one_never_reset() {
    let h = host();
    register(&h, NIC_1, "nic1", "nic");
    register(&h, NIC_2, "nic2", "nic");
    let reset = h.d.post("/devices/nic2/reset", "{}");
    assert_eq!(reset.status, 200, "{}", reset.body);
    let r = claim(
        &h,
        json!({"tags": {"resource": "nic"}, "instance_id": "vm-1"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.json()["name"],
        "nic2",
        "the clean device, though nic1's address sorts first"
    );
    let r = claim(
        &h,
        json!({"tags": {"resource": "nic"}, "instance_id": "vm-2"}),
    );
    assert_eq!(r.json()["name"], "nic1");
}

#[test]
fn malformed_claims_and_reserved_names_are_refused() {
    let h = host();
    for body in [
        r#"{}"#,
        r#"{"tags": {}}"#,
        r#"{"instance_id": "x"}"#,
        r#"{"tags": {}, "instance_id": 3}"#,
        r#"{"tags": {}, "instance_id": "x", "numa": "strict", "numa_node": 1}"#,
        r#"{"tags": {}, "instance_id": "x", "numa": "required"}"#,
        r#"{"tags": {}, "instance_id": "x", "numa_node": -1}"#,
        r#"{"tags": {}, "instance_id": "x", "vgpu_type": ""}"#,
        r#"{"tags": {}, "instance_id": "x", "color": "red"}"#,
    ] {
        let r = h.d.post("/devices/claim", body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    h.d.post("/devices/claim", "{")
        .expect_error(400, "invalid_json");
    // Nothing registered has the tags: no_capacity, saying so.
    claim(
        &h,
        json!({"tags": {"resource": "none"}, "instance_id": "x"}),
    )
    .expect_error(409, "no_capacity")
    .expect_message_contains("no registered device has the tags");
    for name in ["claim", "capacity", "available"] {
        let r = h.d.post(
            "/devices",
            &json!({"pci_address": NIC_1, "name": name}).to_string(),
        );
        r.expect_error(400, "invalid_name");
    }
}

#[test]
fn capacity_counts_each_pool() {
    let h = vf_host(3, 0);
    register(&h, NIC_1, "nic1", "nic");
    assert_eq!(claim_vf(&h, "vm-1").status, 201);
    let all = h.d.get("/devices/capacity").json();
    let pools: BTreeMap<String, Value> = all["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["resource"].as_str().unwrap().to_owned(), p.clone()))
        .collect();
    let vf = &pools["vf"];
    // pfa counts as its 3 VFs; pfb, with none, as a whole device.
    assert_eq!(vf["total"], 4, "{all}");
    assert_eq!(vf["attached"], 1);
    assert_eq!(vf["free"], 3);
    assert_eq!(pools["nic"]["free"], 1);
    let only_nic = h.d.get("/devices/capacity?tags[resource]=nic").json();
    assert_eq!(only_nic["resources"].as_array().unwrap().len(), 1);
}

/// A request that may get no answer (vfiod killed meanwhile): `None` then.
fn try_request(socket: &std::path::Path, body: &str) -> Option<Response> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let raw = format!(
        "POST /devices/claim HTTP/1.1\r\nHost: vfiod\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(raw.as_bytes()).ok()?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).ok()?;
    out.windows(4)
        .any(|w| w == b"\r\n\r\n")
        .then(|| common::parse_response(&out))
}

/// `n` claims at once, each with its own instance id; the answers.
/// `granted` counts the 201s as they come.
fn burst(h: &Host, n: usize, granted: &AtomicUsize) -> Vec<(String, Option<Response>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let instance = format!("vm-{i}");
                let socket = h.d.socket.clone();
                s.spawn(move || {
                    let body = json!({"tags": {"resource": "vf"}, "instance_id": instance, "uid": VMM_UID})
                        .to_string();
                    let r = try_request(&socket, &body);
                    if r.as_ref().is_some_and(|r| r.status == 201) {
                        granted.fetch_add(1, Ordering::SeqCst);
                    }
                    (instance, r)
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Instance -> device for every attachment in the registry.
fn holders(h: &Host) -> BTreeMap<String, String> {
    h.d.get("/devices")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| {
            Some((
                d["attached_to"].as_str()?.to_owned(),
                d["pci_address"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[test]
fn fifty_parallel_claims_for_eight_vfs_get_exactly_eight_distinct_devices() {
    let h = vf_host(4, 4);
    let answers = burst(&h, 50, &AtomicUsize::new(0));
    let mut got = BTreeSet::new();
    let mut refused = 0;
    for (instance, r) in &answers {
        let r = r.as_ref().expect("an answer");
        match r.status {
            201 => {
                assert!(got.insert(r.json()["pci_address"].as_str().unwrap().to_owned()));
            }
            409 => {
                assert_eq!(r.code(), "no_capacity", "{instance}: {}", r.body);
                refused += 1;
            }
            s => panic!("{instance}: {s} {}", r.body),
        }
    }
    assert_eq!(got.len(), 8, "exactly 8 distinct devices");
    assert_eq!(refused, 42);
    assert_eq!(holders(&h).len(), 8);
}

#[test]
fn a_kill_in_the_middle_of_a_claim_burst_leaves_exactly_eight_distinct_claims() {
    let mut h = vf_host(4, 4);
    let pid = h.d.pid();
    let granted = AtomicUsize::new(0);
    let answers = std::thread::scope(|s| {
        // Killed once three claims are handed out: the others are picking,
        // recorded, or half handed out.
        let killer = s.spawn(|| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while granted.load(Ordering::SeqCst) < 3 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        let answers = burst(&h, 50, &granted);
        killer.join().unwrap();
        answers
    });
    let answered_201 = answers
        .iter()
        .filter(|(_, r)| r.as_ref().is_some_and(|r| r.status == 201))
        .count();
    let unanswered = answers.iter().filter(|(_, r)| r.is_none()).count();
    eprintln!(
        "claims: before the kill, {answered_201} claims answered 201, {unanswered} unanswered"
    );
    assert!(
        unanswered > 0,
        "the kill came after the whole burst: nothing was tested"
    );
    h.d.restart();
    // What was answered 201 before the kill is held after it, by that
    // instance.
    let after = holders(&h);
    for (instance, r) in &answers {
        if let Some(r) = r.as_ref().filter(|r| r.status == 201) {
            assert_eq!(
                after.get(instance).map(String::as_str),
                r.json()["pci_address"].as_str(),
                "{instance}: answered 201 before the kill"
            );
        }
    }
    let distinct: BTreeSet<&String> = after.values().collect();
    assert_eq!(distinct.len(), after.len(), "no device twice: {after:?}");
    // Every instance asks again: those holding a device get it back (200),
    // the rest fill up to exactly 8.
    let again = burst(&h, 50, &AtomicUsize::new(0));
    let mut total = BTreeSet::new();
    for (instance, r) in &again {
        let r = r.as_ref().expect("an answer after the restart");
        match r.status {
            200 | 201 => {
                if r.status == 200 {
                    assert!(
                        after.contains_key(instance),
                        "{instance}: 200 without a claim"
                    );
                }
                assert!(total.insert(r.json()["pci_address"].as_str().unwrap().to_owned()));
            }
            409 => assert_eq!(r.code(), "no_capacity", "{}", r.body),
            s => panic!("{instance}: {s} {}", r.body),
        }
    }
    assert_eq!(total.len(), 8, "exactly 8 distinct devices in all");
    assert_eq!(holders(&h).len(), 8);
}

#[test]
fn a_claim_whose_vmm_is_gone_at_restart_ends_like_an_attachment() {
    let mut h = vf_host(1, 0);
    use std::os::unix::process::CommandExt;
    let mut vmm = std::process::Command::new("sleep")
        .arg("300")
        .uid(VMM_UID)
        .gid(VMM_UID)
        .spawn()
        .unwrap();
    let r = claim(
        &h,
        json!({"tags": {"resource": "vf"}, "instance_id": "vm-1", "uid": VMM_UID, "pid": vmm.id()}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let addr = r.json()["pci_address"].as_str().unwrap().to_owned();
    h.d.terminate();
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    h.d.spawn();
    common::eventually(10, "the claim to end with its VMM", || {
        holders(&h).is_empty().then_some(())
    });
    // The device is free: a new instance gets it.
    let r = claim_vf(&h, "vm-2");
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["pci_address"], addr.as_str());
    // And the old instance's claim is gone: asking again is a new claim
    // (pfb, with no VFs, is a whole device of the pool), not the old one.
    let again = claim_vf(&h, "vm-1");
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.json()["name"], "pfb");
}

/// An NVIDIA L40S-like board whose VFs take vGPU types (R550+): each VF
/// stays on `nvidia`, its own VFIO provider.
const GPU_PF: &str = "0000:41:00.0";
const L40S_12Q: u32 = 1162;
const L40S_24Q: u32 = 1164;
const L40S_48Q: u32 = 1165;

fn vgpu_host(vfs: u32) -> Host {
    let gpu = DeviceSpec::new(GPU_PF, 0x10de, 0x26b9, 0x030200)
        .driver("nvidia")
        .group(40)
        .reset_methods("flr")
        .sriov(4, 0x26b9)
        .vgpu(&[
            (L40S_12Q, "NVIDIA L40S-12Q", 4),
            (L40S_24Q, "NVIDIA L40S-24Q", 2),
            (L40S_48Q, "NVIDIA L40S-48Q", 1),
        ]);
    let fs = FakeSys::with_devices([gpu]);
    let h = Host::builder().on(fs).uevent_fifo().start();
    register(&h, GPU_PF, "l40s", "vgpu");
    let r = h.d.req(
        "PUT",
        "/devices/l40s/sriov",
        Some(&json!({"num_vfs": vfs}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["vf_driver"],
        "native",
        "an nvidia PF's VFs keep nvidia"
    );
    h
}

fn claim_vgpu(h: &Host, instance: &str, vgpu_type: &str) -> Response {
    claim(
        h,
        json!({"tags": {"resource": "vgpu"}, "instance_id": instance, "uid": VMM_UID, "vgpu_type": vgpu_type}),
    )
}

#[test]
fn a_vgpu_claim_sets_the_type_on_a_vf_that_can_take_it_and_its_release_clears_it() {
    let h = vgpu_host(3);
    // Each VF shows its types once nvidia has probed it (the bind uevent
    // follows the count write).
    common::eventually(10, "the three VFs to take 24Q", || {
        let types = h.d.get("/devices/l40s/vgpu_types").json();
        types
            .as_array()?
            .iter()
            .any(|t| t["name"] == "NVIDIA L40S-24Q" && t["available"] == 3)
            .then_some(())
    });

    let first = claim_vgpu(&h, "vm-1", "L40S-24Q");
    assert_eq!(first.status, 201, "{}", first.body);
    let vf1 = first.json()["pci_address"].as_str().unwrap().to_owned();
    assert_eq!(h.fs.current_vgpu_type(&vf1), L40S_24Q);
    assert_eq!(
        h.fs.driver_of(&vf1).as_deref(),
        Some("nvidia"),
        "never rebound"
    );
    // By ID works too; the board holds two 24Q.
    let second = claim_vgpu(&h, "vm-2", &L40S_24Q.to_string());
    assert_eq!(second.status, 201, "{}", second.body);
    // Full: siblings can take no other type, and no third 24Q.
    for (instance, t) in [("vm-3", "L40S-24Q"), ("vm-4", "L40S-12Q")] {
        let r = claim_vgpu(&h, instance, t);
        r.expect_error(409, "no_capacity")
            .expect_message_contains("is not creatable on it now");
    }
    let capacity = h.d.get("/devices/capacity?tags[resource]=vgpu").json();
    assert_eq!(capacity["resources"][0]["attached"], 2, "{capacity}");

    let name = first.json()["name"].as_str().unwrap().to_owned();
    assert_eq!(
        h.d.post(&format!("/devices/{name}/detach"), "{}").status,
        200
    );
    assert_eq!(
        h.fs.current_vgpu_type(&vf1),
        0,
        "the release clears the type"
    );
    assert_eq!(
        h.sim.refused_writes(),
        vec![],
        "no write the driver would refuse"
    );
}

/// Ignored in CI: the simulated kernel reads a regular attribute when it
/// handles the write, so vfiod's `0` and the ID written right after it can
/// reach it as one write (its docs: "a second write before that may hide
/// the first"), which it then refuses as the driver would. Run it with
/// `--ignored` on a quiet machine; the real driver's store is synchronous.
#[test]
#[ignore]
fn a_vf_carrying_another_type_is_cleared_first() {
    let h = vgpu_host(1);
    let vf = h.fs.vfs_of(GPU_PF)[0].clone();
    // Set by someone else while the VF is free.
    std::fs::write(
        h.fs.path(&format!("bus/pci/devices/{vf}/nvidia/current_vgpu_type")),
        L40S_48Q.to_string(),
    )
    .unwrap();
    common::eventually(5, "the type to be set", || {
        (h.fs.current_vgpu_type(&vf) == L40S_48Q).then_some(())
    });
    h.sim.clear_writes();
    let r = claim_vgpu(&h, "vm-1", "L40S-12Q");
    assert_eq!(r.status, 201, "{}", r.body);
    let writes: Vec<String> = h
        .sim
        .writes()
        .into_iter()
        .filter(|(p, _)| p.ends_with("current_vgpu_type"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        writes,
        vec!["0".to_owned(), L40S_12Q.to_string()],
        "0 first"
    );
    assert_eq!(h.fs.current_vgpu_type(&vf), L40S_12Q);
    assert_eq!(h.sim.refused_writes(), vec![]);
}

#[test]
fn a_failed_type_write_frees_the_vf() {
    let h = vgpu_host(1);
    let vf = h.fs.vfs_of(GPU_PF)[0].clone();
    // The driver refuses the write: the claim says so and the VF is free.
    h.sim.fail_write(
        &format!("bus/pci/devices/{vf}/nvidia/current_vgpu_type"),
        nix::errno::Errno::ENOSPC,
    );
    let r = claim_vgpu(&h, "vm-2", "L40S-12Q");
    r.expect_error(409, "vgpu_type_unavailable");
    h.sim
        .release(&format!("bus/pci/devices/{vf}/nvidia/current_vgpu_type"));
    assert!(holders(&h).is_empty(), "no claim left behind");
    let again = claim_vgpu(&h, "vm-2", "L40S-12Q");
    assert_eq!(again.status, 201, "{}", again.body);
}

/// A GPU whose VFs sit on `nvidia` without being VFIO devices themselves
/// (Ampere's vGPU makes mediated devices on them instead): being a VF on
/// `nvidia` is not what makes a function usable through VFIO.
const AMPERE_PF: &str = "0000:42:00.0";

#[test]
fn a_vgpu_vf_on_its_own_vfio_provider_shows_bound_to_vfio_and_stays_vfiods_to_leave_alone() {
    let ampere = DeviceSpec::new(AMPERE_PF, 0x10de, 0x20b5, 0x030200)
        .driver("nvidia")
        .group(41)
        .reset_methods("flr")
        .sriov(4, 0x20b5)
        .vf_driver("nvidia");
    let h = vgpu_host(2);
    h.fs.add_device(ampere);
    register(&h, AMPERE_PF, "a100", "ampere");
    let r = h.d.req(
        "PUT",
        "/devices/a100/sriov",
        Some(&json!({"num_vfs": 1, "vf_driver": "native"}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let on_nvidia = |name: &str| {
        let d = h.device(name);
        (d["current_driver"] == "nvidia").then_some(d)
    };
    for vf in ["l40s-vf0", "l40s-vf1"] {
        let d = common::eventually(10, "nvidia to probe the VF", || on_nvidia(vf));
        assert_eq!(d["bound_to_vfio"], true, "{d}");
        assert_eq!(d["bound_by_vfiod"], false, "vfiod moved nothing: {d}");
    }
    let ampere_vf = common::eventually(10, "nvidia to probe a100's VF", || on_nvidia("a100-vf0"));
    assert_eq!(ampere_vf["bound_to_vfio"], false, "{ampere_vf}");
    assert_eq!(
        h.device("l40s")["bound_to_vfio"],
        false,
        "the PF is no VFIO device"
    );
    // Discovery says the same of the live functions.
    let all = h.d.get("/devices/available?all=true").json();
    let live = |addr: &Value| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|f| f["pci_address"] == *addr)
            .map(|f| f["bound_to_vfio"].clone())
    };
    let vgpu_vf = h.device("l40s-vf0")["pci_address"].clone();
    assert_eq!(live(&vgpu_vf), Some(json!(true)), "{all}");
    assert_eq!(live(&ampere_vf["pci_address"]), Some(json!(false)), "{all}");

    // What an operator reads: who may open it, not "not on vfio".
    let (code, out, err) = common::vfioctl(&h.d.socket, &["show", "l40s-vf0"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("not on vfio"), "{out}");
    let claimed = claim_vgpu(&h, "vm-1", "L40S-24Q");
    assert_eq!(claimed.status, 201, "{}", claimed.body);
    let name = claimed.json()["name"].as_str().unwrap().to_owned();
    let (_, out, _) = common::vfioctl(&h.d.socket, &["show", &name]);
    assert!(out.contains(&format!("uid {VMM_UID}")), "{out}");
    assert_eq!(
        h.d.post(&format!("/devices/{name}/detach"), "{}").status,
        200
    );
    assert_eq!(
        h.fs.driver_of(h.device(&name)["pci_address"].as_str().unwrap())
            .as_deref(),
        Some("nvidia"),
        "the release left it on its provider"
    );

    // Kept across a restart; gone once the VF leaves its provider.
    let mut h = h;
    h.d.restart();
    assert_eq!(h.device("l40s-vf1")["bound_to_vfio"], true);
    let vf1 = h.device("l40s-vf1")["pci_address"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(h.fs.path("bus/pci/drivers/nvidia/unbind"), &vf1).unwrap();
    common::eventually(5, "unbind by the simulated kernel", || {
        h.fs.driver_of(&vf1).is_none().then_some(())
    });
    h.uevent(&format!("unbind {vf1}"));
    let d = common::eventually(10, "the unbind to be seen", || {
        let d = h.device("l40s-vf1");
        d["current_driver"].is_null().then_some(d)
    });
    assert_eq!(d["bound_to_vfio"], false, "{d}");
    assert_eq!(h.sim.refused_writes(), vec![]);
}
