//! Hotplug and what changed while vfiod was down: a device that leaves and
//! comes back, a driver that binds or unbinds under vfiod, a different
//! device at a registered address. Uevents are injected through
//! vfiod's test FIFO (`--uevent-fifo`), which feeds the same channel the
//! udev watcher does; the udev adapter itself runs in the QEMU tier.

use std::time::{Duration, Instant};

use common::fakesys::{DeviceSpec, FakeSys};
use common::host::Host;
use common::standard::{AMD, GPU, NIC};
use common::{eventually, EventStream};
use serde_json::Value;

/// The standard host, vfiod reading uevents from the test's FIFO.
fn host(extra: &[&str]) -> Host {
    Host::builder().uevent_fifo().args(extra).start()
}

/// Registers the NIC as "nic", binds it, then pulls it out of the bus;
/// returns the event stream, opened before the unplug, and the
/// hotplug_remove event.
fn bound_nic_unplugged(h: &Host) -> (EventStream, Value) {
    h.d.register(NIC, "nic");
    assert_eq!(h.d.post("/devices/nic/bind", "").status, 200);
    let mut events = EventStream::open(&h.d.socket, "");
    h.fs.remove_device(NIC);
    h.uevent(&format!("remove {NIC}"));
    let removed = events.until(|e| e["type"] == "hotplug_remove");
    (events, removed)
}

#[test]
fn removed_device_stays_registered_and_comes_back_on_vfio() {
    let h = host(&[]);
    let (mut events, e) = bound_nic_unplugged(&h);
    assert_eq!(e["pci_address"], NIC);
    assert_eq!(e["device_id"], h.device("nic")["id"]);
    let dev = h.device("nic");
    assert_eq!(dev["present"], false);
    assert_eq!(dev["bound_to_vfio"], false);
    assert_eq!(dev["bound_by_vfiod"], true, "intent survives the unplug");

    // Back in the slot, the kernel gives it to e1000e; vfiod takes it back.
    h.fs.add_device(FakeSys::standard_device(NIC));
    h.uevent(&format!("add {NIC}"));
    events.until(|e| e["type"] == "hotplug_add");
    events.until(|e| e["type"] == "bind" && e["pci_address"] == NIC);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    let dev = h.device("nic");
    assert_eq!(dev["present"], true);
    assert_eq!(dev["bound_to_vfio"], true);
    assert_eq!(dev["original_driver"], "e1000e");
}

/// The bound NIC pulled and back on the bus, its `add` uevent sent before
/// the kernel probed it: the next `drivers_probe` binds `probe_binds`
/// (the native probe winning the race, or a driver nobody has). Returns
/// the event stream opened before the unplug.
fn replugged_before_its_probe(h: &Host, probe_binds: &str) -> EventStream {
    let (events, _) = bound_nic_unplugged(h);
    h.fs.add_device(FakeSys::standard_device(NIC));
    {
        let _state = h.fs.lock_state();
        h.fs.tree().unbind(NIC).unwrap();
    }
    h.sim.bind_wrong_driver(NIC, probe_binds);
    h.uevent(&format!("add {NIC}"));
    events
}

/// Issue 18's re-plug defect. After a rescan the kernel sends a device's
/// `add` uevent before it probes the native driver, so vfiod can find the
/// device driverless and plan its rebind "from no driver" while the
/// kernel's own probe is already on its way to e1000e; vfiod's
/// `drivers_probe` then finds the device taken. vfiod used to fail the
/// verification, "roll back" by unbinding e1000e, and leave the device
/// with no driver at all, still marked as vfiod's.
#[test]
fn a_replugged_device_whose_native_probe_wins_the_race_still_ends_on_vfio() {
    let h = host(&[]);
    // The kernel's probe, already under way, picks e1000e whatever the
    // override says by the time it runs.
    let mut events = replugged_before_its_probe(&h, "e1000e");
    let outcome = events.until(|e| {
        matches!(e["type"].as_str(), Some("bind" | "bind_failed")) && e["pci_address"] == NIC
    });
    assert_eq!(outcome["type"], "bind", "{outcome}");
    assert!(h.sim.wait_idle(Duration::from_secs(5)));
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    let dev = h.device("nic");
    assert_eq!(dev["bound_to_vfio"], true, "{dev}");
    assert_eq!(dev["original_driver"], "e1000e", "{dev}");
    // Given back, it goes to e1000e: the recorded driver survived the race.
    let r = h.d.post("/devices/nic/unbind", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

/// A bind that fails on a device found driverless gives it back to its
/// recorded driver, not to "no driver" (the same re-plug, with vfio-pci's
/// probe failing this time).
#[test]
fn a_failed_rebind_of_a_replugged_device_gives_it_its_recorded_driver() {
    let h = host(&[]);
    // vfio-pci will not take it: the probe binds nothing.
    let mut events = replugged_before_its_probe(&h, "no-such-driver");
    let outcome = events.until(|e| e["type"] == "bind_failed" && e["pci_address"] == NIC);
    assert!(h.sim.wait_idle(Duration::from_secs(5)));
    assert_eq!(
        h.fs.driver_of(NIC).as_deref(),
        Some("e1000e"),
        "left driverless: {outcome}"
    );
    let dev = h.device("nic");
    assert_eq!(dev["current_driver"], "e1000e", "{dev}");
}

#[test]
fn a_device_that_comes_back_reading_all_ones_needs_a_host_reboot() {
    let h = host(&[]);
    let (mut events, _) = bound_nic_unplugged(&h);
    h.fs.add_device(FakeSys::standard_device(NIC));
    h.fs.set_config_all_ones(NIC, true);
    h.uevent(&format!("add {NIC}"));
    let e = events.until(|e| e["type"] == "health_changed");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .starts_with("needs_host_reboot: config space reads all ones"),
        "{e}"
    );
    let dev = h.device("nic");
    assert_eq!(dev["health"], "needs_host_reboot");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        h.fs.driver_of(NIC).as_deref(),
        Some("e1000e"),
        "a dead function is not moved"
    );
    h.d.post("/devices/nic/attach", r#"{"instance_id":"vm"}"#)
        .expect_error(409, "device_needs_host_reboot");
}

#[test]
fn a_different_device_at_a_registered_address_is_left_alone() {
    let h = host(&[]);
    let (mut events, _) = bound_nic_unplugged(&h);
    h.fs.add_device(
        DeviceSpec::new(NIC, 0x8086, 0x1533, 0x020000)
            .driver("igb")
            .group(2),
    );
    h.uevent(&format!("add {NIC}"));
    let e = events.until(|e| e["type"] == "identity_mismatch");
    assert!(e["detail"].as_str().unwrap().contains("8086:1533"), "{e}");
    let dev = h.device("nic");
    assert_eq!(dev["identity_mismatch"], true);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        h.fs.driver_of(NIC).as_deref(),
        Some("igb"),
        "not captured for vfio"
    );
    let r = h.d.post("/devices/nic/bind", "");
    r.expect_error(409, "identity_mismatch");
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("igb"));
}

#[test]
fn driver_events_update_current_driver_and_a_stolen_device_is_reported_and_reclaimed() {
    let h = host(&["--reclaim"]);
    h.d.register(NIC, "nic");
    let mut events = EventStream::open(&h.d.socket, "");
    // Someone else unbinds the NIC.
    std::fs::write(h.fs.path("bus/pci/drivers/e1000e/unbind"), NIC).unwrap();
    eventually(5, "unbind by the simulated kernel", || {
        h.fs.driver_of(NIC).is_none().then_some(())
    });
    h.uevent(&format!("unbind {NIC}"));
    events.until(|e| e["type"] == "driver_unbound");
    assert_eq!(h.device("nic")["current_driver"], Value::Null);
    std::fs::write(h.fs.path("bus/pci/drivers_probe"), NIC).unwrap();
    eventually(5, "reprobe", || h.fs.driver_of(NIC).map(|_| ()));
    h.uevent(&format!("bind {NIC} e1000e"));
    events.until(|e| e["type"] == "driver_bound");
    assert_eq!(h.device("nic")["current_driver"], "e1000e");

    // Now vfiod holds it; another actor moves it back to e1000e.
    assert_eq!(h.d.post("/devices/nic/bind", "").status, 200);
    std::fs::write(
        h.fs.path(&format!("bus/pci/devices/{NIC}/driver_override")),
        "\n",
    )
    .unwrap();
    std::fs::write(h.fs.path("bus/pci/drivers/vfio-pci/unbind"), NIC).unwrap();
    eventually(5, "unbind", || h.fs.driver_of(NIC).is_none().then_some(()));
    std::fs::write(h.fs.path("bus/pci/drivers_probe"), NIC).unwrap();
    eventually(5, "e1000e", || {
        (h.fs.driver_of(NIC).as_deref() == Some("e1000e")).then_some(())
    });
    h.uevent(&format!("bind {NIC} e1000e"));
    let e = events.until(|e| e["type"] == "driver_stolen");
    assert_eq!(e["driver"], "e1000e");
    eventually(5, "reclaimed", || {
        (h.fs.driver_of(NIC).as_deref() == Some("vfio-pci")).then_some(())
    });
}

/// Issue 18 (found by tests/crashpoints.rs, bind with a re-plug racing the
/// native probe): a `bind` uevent can be processed after the device has
/// moved on. The kernel's own probe after a re-plug bound e1000e, vfiod
/// took the device to vfio, and only then was the uevent of that probe
/// read: vfiod recorded e1000e on a device that was on vfio-pci and
/// reported its own device as stolen. What a uevent says is history; the
/// driver is read from sysfs when the event is handled.
#[test]
fn a_late_bind_uevent_neither_overwrites_the_driver_nor_cries_stolen() {
    let h = host(&[]);
    h.d.register(NIC, "nic");
    assert_eq!(h.d.post("/devices/nic/bind", "").status, 200);
    let mut events = EventStream::open(&h.d.socket, "");
    // The uevent of a probe that happened before vfiod's move.
    h.uevent(&format!("bind {NIC} e1000e"));
    let bound = events.until(|e| e["type"] == "driver_bound");
    assert_eq!(bound["driver"], "vfio-pci", "{bound}");
    // A marker event: anything published for the late uevent came before.
    let r =
        h.d.req("PATCH", "/devices/nic", Some(r#"{"tags":{"k":"v"}}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let mut seen = Vec::new();
    loop {
        let e = events.next_event();
        seen.push(e["type"].as_str().unwrap_or("").to_owned());
        if e["type"] == "updated" {
            break;
        }
    }
    assert!(!seen.iter().any(|t| t == "driver_stolen"), "{seen:?}");
    let dev = h.device("nic");
    assert_eq!(dev["current_driver"], "vfio-pci", "{dev}");
    assert_eq!(dev["bound_to_vfio"], true, "{dev}");
}

#[test]
fn startup_reconciles_with_what_changed_while_down() {
    let mut h = host(&[]);
    h.d.register(NIC, "nic");
    h.d.register(GPU, "gpu");
    h.d.register(AMD, "amd");
    assert_eq!(h.d.post("/devices/amd/bind", "").status, 200);
    h.d.kill9();
    // While vfiod is down: the GPU is unplugged, the NIC loses its driver,
    // and the AMD card (bound by vfiod) comes back on amdgpu, as after a
    // reboot.
    h.fs.remove_device(GPU);
    std::fs::write(h.fs.path("bus/pci/drivers/e1000e/unbind"), NIC).unwrap();
    std::fs::write(
        h.fs.path("bus/pci/devices/0000:00:05.0/driver_override"),
        "\n",
    )
    .unwrap();
    std::fs::write(h.fs.path("bus/pci/drivers/vfio-pci/unbind"), AMD).unwrap();
    std::fs::write(h.fs.path("bus/pci/drivers_probe"), AMD).unwrap();
    eventually(5, "amdgpu back", || {
        (h.fs.driver_of(AMD).as_deref() == Some("amdgpu")).then_some(())
    });
    let t = Instant::now();
    h.d.spawn();
    let ready = t.elapsed();
    assert_eq!(h.device("gpu")["present"], false);
    assert_eq!(h.device("nic")["current_driver"], Value::Null);
    // Bound again before the socket answered: READY means reconciled.
    assert_eq!(
        h.fs.driver_of(AMD).as_deref(),
        Some("vfio-pci"),
        "after {ready:?}"
    );
    assert_eq!(h.device("amd")["bound_to_vfio"], true);
}

/// A re-plugged device that was attached gets its VMM's access back with
/// its vfio binding (the unplug took the node, and with it the grant).
#[test]
fn an_attached_device_gets_its_grant_back_after_a_replug() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: granting to another uid needs root");
        return;
    }
    let h = host(&[]);
    let (mut events, _) = bound_nic_unplugged(&h);
    h.fs.add_device(FakeSys::standard_device(NIC));
    h.uevent(&format!("add {NIC}"));
    events.until(|e| e["type"] == "bind" && e["pci_address"] == NIC);
    let r = h.d.post(
        "/devices/nic/attach",
        r#"{"instance_id":"vm-1","uid":4242}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let node = h.fs.tree().vfio_node(2);
    let granted = |node: &std::path::Path| {
        posix_acl::PosixACL::read_acl(node)
            .map(|acl| acl.get(posix_acl::Qualifier::User(4242)).is_some())
            .unwrap_or(false)
    };
    assert!(granted(&node));

    h.fs.remove_device(NIC);
    let _ = std::fs::remove_file(&node);
    h.uevent(&format!("remove {NIC}"));
    events.until(|e| e["type"] == "hotplug_remove");
    assert_eq!(
        h.device("nic")["attached_uid"],
        4242,
        "the attachment stays"
    );

    h.fs.add_device(FakeSys::standard_device(NIC));
    h.uevent(&format!("add {NIC}"));
    events.until(|e| e["type"] == "bind" && e["pci_address"] == NIC);
    eventually(5, "the grant on the new node", || {
        granted(&node).then_some(())
    });
    assert_eq!(h.device("nic")["attached_to"], "vm-1");
}
