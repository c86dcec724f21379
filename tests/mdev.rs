//! Legacy mediated devices (issue 20, item 4) on the simulated kernel: a
//! claim with `mdev_type` makes a mediated device on a registered parent
//! that stays on its driver, grants its group node, and answers its UUID
//! and `sysfsdev=` path; the pick order and refusals; release with detach
//! `instance_id`; the parent protected while it has mediated devices; and
//! what a reboot, a restart and a VMM's exit do to the records.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use common::fakeproc::alias_node;
use common::fakesys::{DeviceSpec, FakeSys, NVIDIA};
use common::host::{Host, HostBuilder};
use common::{acl_users, eventually, Response};
use serde_json::{json, Value};

/// Two Tesla P40s (legacy mdev vGPU) on nvidia, NUMA nodes 0 and 1.
const P40_A: &str = "0000:3b:00.0";
const P40_B: &str = "0000:af:00.0";
/// A NIC in the same pool, no mdev parent.
const NIC: &str = "0000:20:00.0";

const Q2: &str = "nvidia-63";
const Q4: &str = "nvidia-64";
const P40_TYPES: [(&str, &str, u32); 2] = [(Q2, "GRID P40-2Q", 4), (Q4, "GRID P40-4Q", 2)];

fn p40(addr: &str, group: u32, node: i32) -> DeviceSpec {
    DeviceSpec::new(addr, 0x10de, 0x1b38, 0x030200)
        .subsystem(0x10de, 0x11d9)
        .driver(NVIDIA)
        .group(group)
        .reset_methods("flr")
        .numa_node(node)
        .mdev(&P40_TYPES)
}

fn host() -> Host {
    start(Host::builder())
}

/// The host on `builder`, the three devices registered in pool `grid`.
fn start(builder: HostBuilder) -> Host {
    let fs = FakeSys::with_devices([
        p40(P40_A, 40, 0),
        p40(P40_B, 41, 1),
        DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(42)
            .reset_methods("flr"),
    ]);
    let h = builder.on(fs).uevent_fifo().start();
    for (addr, name) in [(P40_A, "p40a"), (P40_B, "p40b"), (NIC, "nic")] {
        let r = h.d.post(
            "/devices",
            &json!({"pci_address": addr, "name": name, "tags": {"resource": "grid"}}).to_string(),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    h
}

/// The uid the VMM runs as: another user's when the tests run as root
/// (as in CI: root's own access needs no grant), else our own.
fn me() -> u32 {
    if nix::unistd::geteuid().is_root() {
        4242
    } else {
        nix::unistd::getuid().as_raw()
    }
}

fn claim(h: &Host, body: Value) -> Response {
    h.d.post("/devices/claim", &body.to_string())
}

fn claim_mdev(h: &Host, instance: &str, mdev_type: &str) -> Response {
    claim(
        h,
        json!({"tags": {"resource": "grid"}, "instance_id": instance, "uid": me(), "mdev_type": mdev_type}),
    )
}

fn detach_instance(h: &Host, parent: &str, instance: &str) -> Response {
    h.d.post(
        &format!("/devices/{parent}/detach"),
        &json!({ "instance_id": instance }).to_string(),
    )
}

/// A long-running process as [`me`]: the stand-in for a VMM.
fn vmm() -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    if nix::unistd::geteuid().is_root() {
        cmd.uid(me()).gid(me());
    }
    cmd.spawn().unwrap()
}

/// The answer's mediated device: its UUID and parent address.
fn made(r: &Response) -> (String, String) {
    let d = r.json();
    let uuid = d["mdev"]["uuid"]
        .as_str()
        .expect("an mdev in the answer")
        .to_owned();
    (uuid, d["pci_address"].as_str().unwrap().to_owned())
}

#[test]
fn an_mdev_claim_makes_a_mediated_device_on_its_parent_and_opens_it_to_the_vmm_uid() {
    let h = host();
    let r = claim_mdev(&h, "vm-1", "GRID P40-2Q");
    assert_eq!(r.status, 201, "{}", r.body);
    let d = r.json();
    let (uuid, parent) = made(&r);
    assert_eq!(
        d["mdev"]["mdev_type"], Q2,
        "the type is recorded by id: {d}"
    );
    assert_eq!(
        d["mdev"]["sysfs_path"],
        format!("/sys/bus/mdev/devices/{uuid}"),
        "what QEMU takes as sysfsdev="
    );
    assert_eq!(d["mdev"]["attached_uid"], me());
    assert_eq!(
        d["attached_to"],
        Value::Null,
        "the parent is not attached whole"
    );
    // The parent stays on its driver; the kernel has the mediated device.
    assert_eq!(h.fs.driver_of(&parent).as_deref(), Some(NVIDIA));
    assert_eq!(h.fs.mdevs(&parent), vec![(uuid.clone(), Q2.to_owned())]);
    let group = h.fs.mdev_group(&uuid).unwrap();
    let node = h.fs.tree().vfio_node(group);
    assert!(node.exists());
    assert_eq!(acl_users(&node), vec![me()], "granted to the VMM's uid");
    // The parent's record shows it; vfioctl and the API read it there.
    let shown = h.device(if parent == P40_A { "p40a" } else { "p40b" });
    assert_eq!(shown["mdevs"][0]["uuid"], uuid.as_str());
    assert_eq!(shown["mdevs"][0]["instance_id"], "vm-1");

    // The same request again: the same mediated device, 200, nothing made.
    let again = claim_mdev(&h, "vm-1", "GRID P40-2Q");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(made(&again).0, uuid);
    assert_eq!(h.fs.mdevs(&parent).len(), 1);
    // Another request under the same instance: refused, naming it.
    claim_mdev(&h, "vm-1", Q4)
        .expect_error(409, "claim_conflict")
        .expect_message_contains(&uuid);
    assert!(
        h.sim.refused_writes().is_empty(),
        "{:?}",
        h.sim.refused_writes()
    );
}

#[test]
fn releasing_by_instance_removes_the_mediated_device_and_only_it() {
    let h = host();
    let first = claim_mdev(&h, "vm-1", Q2);
    let second = claim_mdev(&h, "vm-2", Q2);
    assert_eq!((first.status, second.status), (201, 201));
    let (u1, p1) = made(&first);
    let (u2, p2) = made(&second);
    let name = |p: &str| if p == P40_A { "p40a" } else { "p40b" };
    let node1 = h.fs.tree().vfio_node(h.fs.mdev_group(&u1).unwrap());

    let r = detach_instance(&h, name(&p1), "vm-1");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !h.fs.mdevs(&p1).iter().any(|(u, _)| *u == u1),
        "the mediated device is gone from the kernel"
    );
    assert!(!node1.exists(), "and its group node with it");
    assert!(r.json()["mdevs"]
        .as_array()
        .is_none_or(|m| m.iter().all(|m| m["uuid"] != u1.as_str())));
    // The other instance's is untouched.
    assert!(h.fs.mdevs(&p2).iter().any(|(u, _)| *u == u2));
    // Nothing left for vm-1 there: 404, and the parent is not touched.
    detach_instance(&h, name(&p1), "vm-1")
        .expect_error(404, "not_found")
        .expect_message_contains("instance \"vm-1\" holds no mediated device and no attachment");
    // vm-1 may claim anew.
    assert_eq!(claim_mdev(&h, "vm-1", Q2).status, 201);
    assert!(
        h.sim.refused_writes().is_empty(),
        "{:?}",
        h.sim.refused_writes()
    );
}

#[test]
fn parents_are_picked_by_numa_node_then_by_instances_available_and_refusals_say_why() {
    let h = host();
    // NUMA node 1 required: the parent on node 1.
    let r = claim(
        &h,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-n1", "uid": me(),
               "mdev_type": Q2, "numa_node": 1, "numa": "required"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(made(&r).1, P40_B);
    // Without a node: the parent with the most instances available (A has
    // 4, B 3 now), and then B again once A has fewer.
    let a = claim_mdev(&h, "vm-a", Q2);
    assert_eq!(made(&a).1, P40_A);
    let b = claim_mdev(&h, "vm-b", Q2);
    let c = claim_mdev(&h, "vm-c", Q2);
    let picked: Vec<String> = [&b, &c].iter().map(|r| made(r).1).collect();
    assert!(picked.contains(&P40_A.to_owned()) && picked.contains(&P40_B.to_owned()));
    // One type per GPU (NVIDIA): with 2Q instances on both, no 4Q is left,
    // and the refusal names every candidate and why.
    let refused = claim_mdev(&h, "vm-4q", "GRID P40-4Q");
    refused.expect_error(409, "no_capacity");
    let reasons = refused.json()["conflicting_functions"].clone();
    let reason_of = |addr: &str| {
        reasons
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["pci_address"] == addr)
            .map(|c| c["reason"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert!(
        reason_of(P40_A).contains("no instance available"),
        "{reasons}"
    );
    assert!(
        reason_of(P40_B).contains("no instance available"),
        "{reasons}"
    );
    assert!(reason_of(NIC).contains("not an mdev parent"), "{reasons}");
    // An unknown type is named as such.
    let unknown = claim_mdev(&h, "vm-x", "nvidia-999");
    unknown.expect_error(409, "no_capacity");
    assert!(
        unknown.body.contains("offers no mdev type nvidia-999"),
        "{}",
        unknown.body
    );
    // vgpu_type and mdev_type together are a malformed request.
    claim(
        &h,
        json!({"tags": {}, "instance_id": "vm-y", "mdev_type": Q2, "vgpu_type": "L40S-12Q"}),
    )
    .expect_error(400, "invalid_request");
    // Capacity counts what is left per type.
    let cap = h.d.get("/devices/capacity").json();
    let pool = &cap["resources"][0];
    assert_eq!(pool["mdevs"], 4, "{cap}");
    assert_eq!(
        pool["mdev_types"][Q2], 4,
        "8 instances in all, 4 made: {cap}"
    );
    assert!(pool["mdev_types"].get(Q4).is_none(), "{cap}");
    let metrics = h.d.get("/metrics").body;
    assert!(
        metrics.contains("vfiod_mdevs{parent=\"p40a\",mdev_type=\"nvidia-63\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("vfiod_mdevs{parent=\"p40b\",mdev_type=\"nvidia-63\"} 2"));
    let types = h.d.get("/devices/p40a/mdev_types").json();
    assert_eq!(types["mdev_types"].as_array().unwrap().len(), 2, "{types}");
    assert_eq!(types["mdevs"].as_array().unwrap().len(), 2, "{types}");
}

#[test]
fn a_parent_with_mediated_devices_is_not_moved_deleted_or_handed_out_whole() {
    let h = host();
    let r = claim(
        &h,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-1", "uid": me(),
               "mdev_type": Q2, "numa_node": 0, "numa": "required"}),
    );
    assert_eq!(made(&r).1, P40_A);
    for (method, path, body) in [
        ("POST", "/devices/p40a/bind", "{}"),
        ("POST", "/devices/p40a/reset", "{}"),
        ("DELETE", "/devices/p40a", ""),
        (
            "POST",
            "/devices/p40a/attach",
            r#"{"instance_id":"vm-whole"}"#,
        ),
    ] {
        let r = h.d.req(method, path, Some(body));
        r.expect_error(409, "mdevs_in_use")
            .expect_message_contains("vm-1");
    }
    assert_eq!(h.fs.driver_of(P40_A).as_deref(), Some(NVIDIA));
    assert_eq!(h.fs.mdevs(P40_A).len(), 1);
    // A whole-device claim skips it, saying why.
    let whole = claim(
        &h,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-w", "uid": me(),
               "numa_node": 0, "numa": "required"}),
    );
    whole.expect_error(409, "no_capacity");
    assert!(
        whole.body.contains("an mdev parent with mediated devices"),
        "{}",
        whole.body
    );
    // Once released, the parent is an ordinary device again.
    assert_eq!(detach_instance(&h, "p40a", "vm-1").status, 200);
    let bound = h.d.post("/devices/p40a/bind", "{}");
    assert_eq!(bound.status, 200, "{}", bound.body);
    assert!(
        !h.fs.is_mdev_parent(P40_A),
        "on vfio-pci it offers no types"
    );
}

#[test]
fn a_reboot_loses_mediated_devices_and_the_next_start_makes_the_live_ones_again() {
    let mut h = host();
    let mut gone_vmm = vmm();
    let mut live_vmm = vmm();
    let with_pid = |instance: &str, pid: u32, node: u32| {
        json!({"tags": {"resource": "grid"}, "instance_id": instance, "uid": me(), "pid": pid,
               "mdev_type": Q2, "numa_node": node, "numa": "required"})
    };
    let kept = claim(&h, with_pid("vm-kept", live_vmm.id(), 0));
    let ended = claim(&h, with_pid("vm-ended", gone_vmm.id(), 0));
    let unpinned = claim_mdev(&h, "vm-nopid", Q2);
    for r in [&kept, &ended, &unpinned] {
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let (kept_uuid, _) = made(&kept);
    let (ended_uuid, _) = made(&ended);
    let (unpinned_uuid, unpinned_parent) = made(&unpinned);

    h.d.terminate();
    h.fs.reboot_mdev(P40_A);
    h.fs.reboot_mdev(P40_B);
    assert!(h.fs.mdevs(P40_A).is_empty() && h.fs.mdevs(P40_B).is_empty());
    gone_vmm.kill().unwrap();
    gone_vmm.wait().unwrap();
    h.d.spawn();

    // The live ones are back with the same UUIDs (the VMs' sysfsdev= paths
    // hold), granted again; the one whose VMM is gone is not made again.
    let a: Vec<String> = h.fs.mdevs(P40_A).into_iter().map(|(u, _)| u).collect();
    assert!(a.contains(&kept_uuid), "{a:?}");
    assert!(!a.contains(&ended_uuid), "{a:?}");
    assert!(h
        .fs
        .mdevs(&unpinned_parent)
        .iter()
        .any(|(u, _)| *u == unpinned_uuid));
    let node = h.fs.tree().vfio_node(h.fs.mdev_group(&kept_uuid).unwrap());
    assert_eq!(
        acl_users(&node),
        vec![me()],
        "granted again after the restart"
    );
    let records = h.device("p40a")["mdevs"].clone();
    assert!(
        records
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["instance_id"] != "vm-ended"),
        "{records}"
    );

    // The running VMM's exit ends its mediated device.
    live_vmm.kill().unwrap();
    live_vmm.wait().unwrap();
    eventually(
        10,
        "the mediated device of an exited VMM is removed",
        || (!h.fs.mdevs(P40_A).iter().any(|(u, _)| *u == kept_uuid)).then_some(()),
    );
    eventually(5, "and its record dropped", || {
        let m = h.device("p40a")["mdevs"].clone();
        m.as_array()
            .is_none_or(|m| m.iter().all(|m| m["instance_id"] != "vm-kept"))
            .then_some(())
    });
    assert!(!node.exists() || node.metadata().unwrap().permissions().mode() & 0o077 == 0);
    assert!(
        h.sim.refused_writes().is_empty(),
        "{:?}",
        h.sim.refused_writes()
    );
}

#[test]
fn a_parent_back_on_its_driver_gets_its_live_mediated_devices_again() {
    let h = host();
    let r = claim(
        &h,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-1", "uid": me(),
               "mdev_type": Q2, "numa_node": 1, "numa": "required"}),
    );
    let (uuid, parent) = made(&r);
    assert_eq!(parent, P40_B);
    // The driver reloaded behind vfiod's back: the kernel drops the mdevs.
    let write = |rel: &str| std::fs::write(h.fs.path(rel), P40_B).unwrap();
    write("bus/pci/drivers/nvidia/unbind");
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(10)));
    assert!(h.fs.mdevs(P40_B).is_empty());
    write("bus/pci/drivers/nvidia/bind");
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(10)));
    // udev passes the driver's bind on.
    h.uevent(&format!("bind {P40_B} {NVIDIA}"));
    eventually(10, "the mediated device is made again", || {
        h.fs.mdevs(P40_B)
            .iter()
            .any(|(u, _)| *u == uuid)
            .then_some(())
    });
}

#[test]
fn a_failed_create_leaves_no_record_and_no_mediated_device() {
    let h = host();
    let create = format!("bus/pci/devices/{P40_B}/mdev_supported_types/{Q2}/create");
    h.sim.fail_write(&create, nix::errno::Errno::ENOSPC);
    let r = claim(
        &h,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-1", "uid": me(),
               "mdev_type": Q2, "numa_node": 1, "numa": "required"}),
    );
    r.expect_error(500, "mdev_failed")
        .expect_message_contains("create mdev");
    assert!(h.fs.mdevs(P40_B).is_empty());
    let records = h.device("p40b")["mdevs"].clone();
    assert!(records.as_array().is_none_or(Vec::is_empty), "{records}");
}

#[test]
fn a_release_is_refused_while_a_process_holds_the_mediated_device_open() {
    let h = start(Host::builder().fake_proc());
    let r = claim_mdev(&h, "vm-1", Q2);
    assert_eq!(r.status, 201, "{}", r.body);
    let (uuid, parent) = made(&r);
    let name = if parent == P40_A { "p40a" } else { "p40b" };
    // A VMM with the mediated device's group node open (the kernel's
    // remove would wait for it to close the device).
    let node = h.fs.tree().vfio_node(h.fs.mdev_group(&uuid).unwrap());
    alias_node(&node, "/dev/urandom");
    let mut qemu = h.proc().process(5150, "qemu-system-x86");
    qemu.uid(me());
    qemu.fd(&node);
    h.sim.clear_writes();
    let refused = detach_instance(&h, name, "vm-1");
    refused
        .expect_error(409, "device_busy")
        .expect_message_contains("qemu-system-x86");
    assert_eq!(refused.json()["holders"][0]["pid"], 5150);
    assert!(h.sim.writes().is_empty(), "wrote: {:?}", h.sim.writes());
    assert_eq!(h.fs.mdevs(&parent).len(), 1, "still there");
    assert_eq!(
        h.device(name)["mdevs"][0]["attached_uid"],
        me(),
        "still handed out"
    );

    // Closed, it goes. (The node is a plain file again first, so that no
    // ACL change can reach the real node it stood for.)
    qemu.exit();
    std::fs::remove_file(&node).unwrap();
    std::fs::write(&node, "").unwrap();
    let r = detach_instance(&h, name, "vm-1");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(h.fs.mdevs(&parent).is_empty());
}

#[test]
fn a_create_stuck_in_the_kernel_is_undone_when_it_returns() {
    let h = start(Host::builder().args(&["--op-timeout-ms", "400"]));
    let create = format!("bus/pci/devices/{P40_B}/mdev_supported_types/{Q2}/create");
    h.sim.hang_write(&create);
    let r = claim(
        &h,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-1", "uid": me(),
               "mdev_type": Q2, "numa_node": 1, "numa": "required"}),
    );
    r.expect_error(504, "driver_timeout")
        .expect_message_contains("create mdev");
    // Recorded as being made while the write is in the kernel.
    let records = h.device("p40b")["mdevs"].clone();
    assert_eq!(records[0]["attached_uid"], Value::Null, "{records}");
    // The kernel finishes the create late; vfiod removes what it made.
    h.sim.release(&create);
    eventually(
        10,
        "the late mediated device removed and its record dropped",
        || {
            let records = h.device("p40b")["mdevs"].clone();
            (h.fs.mdevs(P40_B).is_empty() && records.as_array().is_none_or(Vec::is_empty))
                .then_some(())
        },
    );
    // And the parent serves the next claim.
    assert_eq!(claim_mdev(&h, "vm-2", Q2).status, 201);
}
