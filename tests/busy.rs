//! Holders found before any write: the real `vfiod` with a fake `/proc`
//! (`--proc`) refuses to take a held function from its driver with 409
//! `device_busy`, names every holder, and writes nothing; a framebuffer
//! console becomes a step of the move and comes back with the device.

use common::fakeproc::{alias_node, dev_numbers};
use common::host::Host;
use common::standard::{AMD, NIC};
use serde_json::Value;

/// The AMD GPU's DRM card node, held open by an X server.
fn x_server_holds_the_gpu(h: &Host) -> u32 {
    h.fs.add_class_device(AMD, "drm/card0", "drm", Some(&dev_numbers("/dev/full")));
    let node = h.fs.dev_path("dri/card0");
    alias_node(&node, "/dev/full");
    let mut p = h.proc().process(2001, "Xorg");
    p.uid(1000)
        .cgroup("0::/system.slice/display-manager.service\n");
    p.fd("/dev/null");
    p.fd(&node);
    2001
}

#[test]
fn a_held_gpu_is_refused_with_every_holder_named_and_nothing_written() {
    let h = Host::builder().fake_proc().start();
    h.d.register(AMD, "amd");
    let pid = x_server_holds_the_gpu(&h);
    h.sim.clear_writes();
    let r = h.d.post("/devices/amd/bind", "{}");
    r.expect_error(409, "device_busy")
        .expect_message_contains("Xorg");
    let body = r.json();
    let holders = body["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 1, "{body}");
    assert_eq!(holders[0]["kind"], "process");
    assert_eq!(holders[0]["pid"], pid);
    assert_eq!(holders[0]["comm"], "Xorg");
    assert_eq!(holders[0]["uid"], 1000);
    assert_eq!(holders[0]["unit"], "display-manager.service");
    assert_eq!(holders[0]["pci_address"], AMD);
    assert!(holders[0]["path"].as_str().unwrap().ends_with("dri/card0"));
    assert!(h.sim.writes().is_empty(), "wrote: {:?}", h.sim.writes());
    assert_eq!(h.fs.driver_of(AMD).as_deref(), Some("amdgpu"));
    let dev = h.d.get("/devices/amd").json();
    assert_eq!(dev["pending"], Value::Null);
    assert_eq!(dev["original_driver"], "amdgpu");

    // The dry run lists the same holders; the holders route too.
    let plan = h.d.post("/devices/amd/bind", r#"{"dry_run":true}"#).json();
    assert_eq!(plan["plan"]["holders"], body["holders"], "{plan}");
    let listed = h.d.get("/devices/amd/holders").json();
    assert_eq!(listed["holders"], body["holders"]);
    assert_eq!(listed["pci_address"], AMD);
    // Attach goes through the same check.
    h.d.post("/devices/amd/attach", r#"{"instance_id":"vm-1"}"#)
        .expect_error(409, "device_busy");
    assert!(h.sim.writes().is_empty());
}

#[test]
fn a_vmm_holding_the_vfio_group_blocks_unbind_detach_and_delete_until_it_exits() {
    let h = Host::builder().fake_proc().start();
    h.d.register(NIC, "nic");
    assert_eq!(h.d.post("/devices/nic/bind", "{}").status, 200);
    // The group node the kernel made, as a character node a VMM holds.
    let node = h.fs.dev_path("vfio/2");
    std::fs::remove_file(&node).unwrap();
    alias_node(&node, "/dev/urandom");
    let mut vmm = h.proc().process(3001, "qemu-system-x86");
    vmm.uid(64055);
    vmm.fd("/dev/vfio/vfio");
    vmm.fd(&node);
    vmm.vfio_device_fd(None);
    h.sim.clear_writes();
    let r = h.d.post("/devices/nic/unbind", "");
    r.expect_error(409, "device_busy")
        .expect_message_contains("qemu-system-x86");
    let holders = r.json()["holders"].as_array().unwrap().clone();
    assert!(holders.iter().all(|h| h["pid"] == 3001), "{holders:?}");
    h.d.req("DELETE", "/devices/nic", None)
        .expect_error(409, "device_busy");
    h.d.post("/devices/nic/detach", "{}")
        .expect_error(409, "device_busy");
    assert!(h.sim.writes().is_empty(), "wrote: {:?}", h.sim.writes());
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(h.d.get("/devices/nic").json()["bound_by_vfiod"], true);

    vmm.exit();
    let r = h.d.post("/devices/nic/unbind", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn a_nic_in_use_is_refused_unless_forced() {
    let h = Host::builder().fake_proc().start();
    h.d.register(NIC, "nic");
    let dir = h.fs.add_class_device(NIC, "net/enp0s2", "net", None);
    h.fs.write_attr(&dir.join("flags"), "0x1003\n");
    h.proc().append_line(
        "net/if_inet6",
        "20010db8000000000000000000000042 02 40 00 80    enp0s2",
    );
    let r = h.d.post("/devices/nic/bind", "{}");
    r.expect_error(409, "device_busy")
        .expect_message_contains("enp0s2");
    assert_eq!(r.json()["holders"][0]["kind"], "net_interface");
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
    let r = h.d.post("/devices/nic/bind", r#"{"force":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert!(
        h.d.log_text()
            .contains("forced: taking network interface enp0s2"),
        "the forced move is logged"
    );
}

#[test]
fn the_framebuffer_console_is_released_for_the_move_and_given_back() {
    let h = Host::builder().fake_proc().start();
    h.d.register(AMD, "amd");
    h.fs.add_class_device(AMD, "graphics/fb0", "graphics", Some("29:0"));
    h.fs.add_vtconsole(0, "(S) dummy device", true);
    h.fs.add_vtconsole(1, "(M) frame buffer device", true);
    let bind = h.fs.path("class/vtconsole/vtcon1/bind");
    let plan = h.d.post("/devices/amd/bind", r#"{"dry_run":true}"#).json();
    let steps = plan["plan"]["steps"].as_array().unwrap();
    assert!(
        steps[0].as_str().unwrap().contains("vtcon1/bind"),
        "the console is released first: {steps:?}"
    );
    assert_eq!(plan["plan"]["holders"][0]["kind"], "framebuffer_console");

    let r = h.d.post("/devices/amd/bind", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(std::fs::read_to_string(&bind).unwrap().trim(), "0");
    assert_eq!(h.fs.driver_of(AMD).as_deref(), Some("vfio-pci"));
    let r = h.d.post("/devices/amd/unbind", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(AMD).as_deref(), Some("amdgpu"));
    assert_eq!(
        std::fs::read_to_string(&bind).unwrap().trim(),
        "1",
        "the console is back"
    );
}

#[test]
fn holders_of_an_idle_device_are_an_empty_list() {
    let h = Host::builder().fake_proc().start();
    h.d.register(NIC, "nic");
    let r = h.d.get("/devices/nic/holders");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["holders"], serde_json::json!([]));
    h.d.get("/devices/nope/holders")
        .expect_error(404, "not_found");
}
