//! Driver moves end to end: the real `vfiod` binary over a fake sysfs tree
//! whose simulated kernel reacts to `driver_override`, `unbind`, `bind` and
//! `drivers_probe` the way Linux does, and can fail or hang on demand.
//! Every assertion reads the tree (the "kernel"), not only vfiod's answer.

use std::time::{Duration, Instant};

use common::fakesys::FakeSys;
use common::host::Host;
use common::standard::{AMD, EDU, GPU, GPU_AUDIO, NIC, ROOT_PORT, T4};
use common::Daemon;
use nix::errno::Errno;
use serde_json::Value;

fn no_new_id_written(h: &Host) {
    assert!(
        !h.sim.writes().iter().any(|(p, _)| p.ends_with("new_id")),
        "new_id must never be written: {:?}",
        h.sim.writes()
    );
}

fn bind(d: &Daemon, name: &str, body: &str) -> common::Response {
    d.post(&format!("/devices/{name}/bind"), body)
}

#[test]
fn gpu_with_audio_function_needs_with_group_and_moves_and_restores_both() {
    let h = Host::standard(&[]);
    h.d.register(GPU, "gpu0");
    let r = bind(&h.d, "gpu0", "{}");
    r.expect_error(409, "iommu_group_conflict")
        .expect_message_contains("0000:01:00.1 on snd_hda_intel");
    let e = r.json();
    assert_eq!(e["conflicting_functions"][0]["pci_address"], GPU_AUDIO);
    assert_eq!(e["conflicting_functions"][0]["driver"], "snd_hda_intel");
    assert_eq!(
        h.fs.driver_of(GPU).as_deref(),
        Some("nvidia"),
        "a refused bind touches nothing"
    );
    assert!(h.sim.writes().is_empty(), "{:?}", h.sim.writes());

    let r = bind(&h.d, "gpu0", r#"{"with_group":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let dev = r.json();
    assert_eq!(dev["bound_to_vfio"], true);
    assert_eq!(dev["current_driver"], "vfio-pci");
    assert_eq!(dev["original_driver"], "nvidia");
    assert_eq!(dev["group_companions"][0], GPU_AUDIO);
    assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(h.fs.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
    assert!(h.fs.vfio_group_node_exists(1));
    assert_eq!(
        h.fs.driver_of(ROOT_PORT).as_deref(),
        Some("pcieport"),
        "the bridge stays"
    );

    let r = h.d.post("/devices/gpu0/unbind", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["current_driver"], "nvidia");
    assert_eq!(r.json()["bound_to_vfio"], false);
    assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("nvidia"));
    assert_eq!(h.fs.driver_of(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(h.fs.driver_override_of(GPU), None);
    assert_eq!(h.fs.driver_override_of(GPU_AUDIO), None);
    assert!(!h.fs.vfio_group_node_exists(1));
    no_new_id_written(&h);
}

#[test]
fn bind_sequence_is_override_unbind_probe_in_that_order() {
    let h = Host::standard(&[]);
    h.d.register(AMD, "amd");
    assert_eq!(bind(&h.d, "amd", "").status, 200);
    let writes: Vec<String> = h
        .sim
        .writes()
        .into_iter()
        .map(|(p, v)| format!("{p}={}", v.trim()))
        .collect();
    assert_eq!(
        writes,
        [
            format!("bus/pci/devices/{AMD}/driver_override=vfio-pci"),
            format!("bus/pci/drivers/amdgpu/unbind={AMD}"),
            format!("bus/pci/drivers_probe={AMD}"),
        ]
    );
}

#[test]
fn device_without_a_driver_goes_to_vfio_and_back_to_no_driver() {
    let h = Host::standard(&[]);
    h.d.register(EDU, "edu");
    let r = bind(&h.d, "edu", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(EDU).as_deref(), Some("vfio-pci"));
    assert!(h.fs.vfio_group_node_exists(3));
    let r = h.d.post("/devices/edu/unbind", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(EDU), None);
    assert_eq!(r.json()["current_driver"], Value::Null);
}

#[test]
fn device_already_on_vfio_is_left_there() {
    let h = Host::standard(&[]);
    let dev = h.d.register(T4, "t4");
    assert_eq!(dev["bound_to_vfio"], true);
    assert_eq!(dev["original_driver"], Value::Null);
    let r = bind(&h.d, "t4", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = h.d.post("/devices/t4/unbind", "{}");
    r.expect_error(409, "not_bound_by_vfiod");
    assert_eq!(h.d.req("DELETE", "/devices/t4", None).status, 204);
    assert_eq!(h.fs.driver_of(T4).as_deref(), Some("vfio-pci"));
    assert!(h.sim.writes().is_empty(), "{:?}", h.sim.writes());
}

#[test]
fn dry_run_returns_the_plan_and_changes_nothing() {
    let h = Host::standard(&[]);
    h.d.register(GPU, "gpu0");
    let r = bind(&h.d, "gpu0", r#"{"with_group":true,"dry_run":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let plan = &r.json()["plan"];
    assert_eq!(plan["vfio_driver"], "vfio-pci");
    assert_eq!(plan["iommu_group"], 1);
    let moves: Vec<&str> = plan["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pci_address"].as_str().unwrap())
        .collect();
    assert_eq!(moves, [GPU, GPU_AUDIO]);
    let steps = plan["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s.as_str().unwrap().contains("drivers/nvidia/unbind")),
        "{steps:?}"
    );
    assert!(h.sim.writes().is_empty());
    assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("nvidia"));
    // A dry run still reports conflicts.
    let r = bind(&h.d, "gpu0", r#"{"dry_run":true}"#);
    assert_eq!(r.code(), "iommu_group_conflict");
}

fn assert_rolled_back(h: &Host, r: &common::Response, step: &str) {
    r.expect_error(500, "bind_failed")
        .expect_message_contains("rolled back");
    let e = r.json();
    assert_eq!(e["step"], step, "{e}");
    assert_eq!(
        h.fs.driver_of(NIC).as_deref(),
        Some("e1000e"),
        "rolled back to the native driver"
    );
    assert_eq!(h.fs.driver_override_of(NIC), None);
    let dev = h.d.get("/devices/nic").json();
    assert_eq!(dev["current_driver"], "e1000e");
    assert_eq!(dev["bound_to_vfio"], false);
    assert_eq!(dev["pending"], Value::Null);
}

#[test]
fn rollback_when_the_override_write_fails() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    h.sim.fail_write(
        &format!("bus/pci/devices/{NIC}/driver_override"),
        Errno::ENOSPC,
    );
    let r = bind(&h.d, "nic", "{}");
    // The override cannot be cleared either, but nothing else moved.
    r.expect_error(500, "bind_failed");
    assert_eq!(r.json()["step"], "set_override");
    assert_eq!(r.json()["errno"], 28);
    r.expect_message_contains("driver_override");
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
    h.sim
        .release(&format!("bus/pci/devices/{NIC}/driver_override"));
    assert_eq!(
        bind(&h.d, "nic", "{}").status,
        200,
        "works once the fault is gone"
    );
}

#[test]
fn rollback_when_unbind_fails() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    h.sim
        .fail_write("bus/pci/drivers/e1000e/unbind", Errno::EISDIR);
    let r = bind(&h.d, "nic", "{}");
    assert_eq!(r.json()["errno"], 21);
    assert_rolled_back(&h, &r, "unbind");
}

#[test]
fn rollback_when_probe_fails() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    h.sim.fail_write("bus/pci/drivers_probe", Errno::ENOSPC);
    let r = bind(&h.d, "nic", "{}");
    // Rollback cannot probe either: it binds e1000e by name.
    assert_rolled_back(&h, &r, "probe");
}

#[test]
fn rollback_when_the_kernel_binds_the_wrong_driver() {
    let fs = FakeSys::standard_host();
    fs.add_driver("pci-stub");
    let h = Host::builder().on(fs).start();
    h.d.register(NIC, "nic");
    h.sim.bind_wrong_driver_always(NIC, "pci-stub");
    let r = bind(&h.d, "nic", "{}");
    r.expect_message_contains("found pci-stub");
    assert_rolled_back(&h, &r, "verify_driver");
}

#[test]
fn a_device_no_driver_will_take_is_reported_with_the_failed_rollback() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    // Neither vfio-pci nor, on rollback, e1000e will take it.
    h.sim.ignore_probe(NIC);
    let r = bind(&h.d, "nic", "{}");
    r.expect_error(500, "bind_failed");
    assert_eq!(r.json()["step"], "verify_driver");
    let msg = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("expected driver vfio-pci, found no driver"),
        "{msg}"
    );
    assert!(
        msg.contains("ROLLBACK ALSO FAILED") && msg.contains("e1000e"),
        "{msg}"
    );
    let dev = h.d.get("/devices/nic").json();
    assert_eq!(
        dev["current_driver"],
        Value::Null,
        "vfiod reports what the kernel has"
    );
    assert_eq!(
        dev["original_driver"], "e1000e",
        "and still knows what to restore"
    );
    // Once the kernel cooperates, a bind and unbind work again.
    h.sim.allow_probe(NIC);
    assert_eq!(bind(&h.d, "nic", "{}").status, 200);
    assert_eq!(h.d.post("/devices/nic/unbind", "").status, 200);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn hung_unbind_times_out_while_everything_else_keeps_working() {
    // A longer limit leaves room for the other requests on a busy machine.
    let h = Host::standard(&["--op-timeout-ms", "4000"]);
    h.d.register(GPU, "gpu0");
    h.d.register(NIC, "nic");
    h.sim.hang_write("bus/pci/drivers/nvidia/unbind");
    let socket = h.d.socket.clone();
    let started = Instant::now();
    let hung = std::thread::spawn(move || {
        common::request(
            &socket,
            "POST",
            "/devices/gpu0/bind",
            Some(r#"{"with_group":true}"#),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile: reads, a registration and a bind in another group.
    let t = Instant::now();
    assert_eq!(h.d.get("/devices").status, 200);
    assert_eq!(
        h.d.post("/devices", r#"{"pci_address":"0000:00:05.0"}"#)
            .status,
        201
    );
    let r = bind(&h.d, "nic", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    // All of that finished while the hung request was still waiting on
    // the kernel: nothing queued behind it (robust to a loaded machine,
    // unlike a fixed time bound).
    assert!(
        !hung.is_finished(),
        "other groups waited for the hung one ({:?})",
        t.elapsed()
    );
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));

    let r = hung.join().unwrap();
    r.expect_error(504, "driver_timeout");
    assert!(started.elapsed() >= Duration::from_millis(3900));
    r.expect_message_contains("drivers/nvidia/unbind");
    let dev = h.d.get("/devices/gpu0").json();
    assert_eq!(dev["stuck"], true);
    let r = bind(&h.d, "gpu0", r#"{"with_group":true}"#);
    assert_eq!(r.code(), "device_stuck");

    // The kernel finally returns: vfiod notices, unsticks and finishes.
    h.sim.release("bus/pci/drivers/nvidia/unbind");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dev = h.d.get("/devices/gpu0").json();
        if dev["stuck"] == false && dev["pending"].is_null() {
            assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("vfio-pci"), "{dev}");
            assert_eq!(dev["bound_to_vfio"], true);
            break;
        }
        assert!(Instant::now() < deadline, "never unstuck: {dev}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_binds_in_one_group_are_serialised() {
    let h = Host::standard(&[]);
    h.d.register(GPU, "gpu0");
    h.d.register(GPU_AUDIO, "audio0");
    let s1 = h.d.socket.clone();
    let s2 = h.d.socket.clone();
    let a = std::thread::spawn(move || {
        common::request(
            &s1,
            "POST",
            "/devices/gpu0/bind",
            Some(r#"{"with_group":true}"#),
        )
    });
    let b = std::thread::spawn(move || {
        common::request(
            &s2,
            "POST",
            "/devices/audio0/bind",
            Some(r#"{"with_group":true}"#),
        )
    });
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!((a.status, b.status), (200, 200), "{} / {}", a.body, b.body);
    // Whoever went second found the group already moved: each function was
    // moved exactly once, with no interleaving.
    let overrides = h
        .sim
        .writes()
        .iter()
        .filter(|(p, v)| p.ends_with("driver_override") && v.trim() == "vfio-pci")
        .count();
    assert_eq!(overrides, 2, "{:?}", h.sim.writes());
    assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(h.fs.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
}

#[test]
fn attach_and_detach() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    let r = h.d.post("/devices/nic/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["attached_to"], "vm-1");
    assert_eq!(r.json()["bound_to_vfio"], true);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    let writes_before = h.sim.writes().len();
    let r = h.d.post("/devices/nic/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "same instance again is a no-op");
    assert_eq!(h.sim.writes().len(), writes_before);
    let r = h.d.post("/devices/nic/attach", r#"{"instance_id":"vm-2"}"#);
    r.expect_error(409, "in_use");
    r.expect_message_contains("vm-1");
    assert_eq!(h.d.post("/devices/nic/unbind", "").code(), "in_use");
    assert_eq!(h.d.req("DELETE", "/devices/nic", None).code(), "in_use");

    let r = h.d.post("/devices/nic/detach", r#"{"keep_bound":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["attached_to"], Value::Null);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    h.d.post("/devices/nic/attach", r#"{"instance_id":"vm-2"}"#);
    let r = h.d.post("/devices/nic/detach", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
    assert_eq!(r.json()["current_driver"], "e1000e");
}

#[test]
fn delete_gives_the_driver_back_first() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    assert_eq!(bind(&h.d, "nic", "").status, 200);
    assert_eq!(h.d.req("DELETE", "/devices/nic", None).status, 204);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn delete_keeps_the_device_registered_when_the_restore_fails() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    assert_eq!(bind(&h.d, "nic", "").status, 200);
    h.sim
        .fail_write("bus/pci/drivers/vfio-pci/unbind", Errno::ENOSPC);
    let r = h.d.req("DELETE", "/devices/nic", None);
    r.expect_error(500, "unbind_failed");
    assert_eq!(h.d.get("/devices/nic").status, 200, "still registered");
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    let dev = h.d.get("/devices/nic").json();
    assert_eq!(dev["bound_by_vfiod"], true, "still vfiod's to give back");
    // Once the kernel accepts the write, the retried delete restores e1000e.
    h.sim.release("bus/pci/drivers/vfio-pci/unbind");
    assert_eq!(h.d.req("DELETE", "/devices/nic", None).status, 204);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn kill_9_mid_bind_is_finished_at_restart() {
    let mut h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    h.sim.hang_write("bus/pci/drivers/e1000e/unbind");
    let socket = h.d.socket.clone();
    let t = std::thread::spawn(move || {
        common::request(&socket, "POST", "/devices/nic/bind", Some("{}"))
    });
    // Wait until the intent is on disk and the unbind is stuck.
    let state = h.d.state_dir.join("state.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&state)
        .unwrap_or_default()
        .contains("\"op\": \"bind\"")
    {
        assert!(Instant::now() < deadline, "intent never persisted");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.d.kill9();
    let _ = t.join();
    // The kernel finishes the unbind after vfiod died.
    h.sim.release("bus/pci/drivers/e1000e/unbind");
    assert!(h.sim.wait_idle(Duration::from_secs(5)));
    h.d.spawn();
    let dev = h.d.get("/devices/nic").json();
    assert_eq!(dev["pending"], Value::Null, "{dev}");
    assert_eq!(
        h.fs.driver_of(NIC).as_deref(),
        Some("vfio-pci"),
        "the recorded bind is finished"
    );
    assert_eq!(dev["bound_to_vfio"], true);
    assert_eq!(dev["original_driver"], "e1000e");
    // And it can be given back normally.
    assert_eq!(h.d.post("/devices/nic/unbind", "").status, 200);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn restart_never_unbinds_an_attached_device() {
    let mut h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    assert_eq!(
        h.d.post("/devices/nic/attach", r#"{"instance_id":"vm-1"}"#)
            .status,
        200
    );
    let writes = h.sim.writes().len();
    h.d.terminate();
    h.d.spawn();
    h.d.restart();
    assert_eq!(
        h.sim.writes().len(),
        writes,
        "restarts wrote to sysfs: {:?}",
        &h.sim.writes()[writes..]
    );
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(h.d.get("/devices/nic").json()["attached_to"], "vm-1");
}

#[test]
fn vfio_unavailable_and_no_iommu_group_are_clear_errors() {
    let fs = FakeSys::new();
    fs.add_device(
        common::fakesys::DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(2),
    );
    fs.add_device(common::fakesys::DeviceSpec::new(
        EDU, 0x1234, 0x11e8, 0x00ff00,
    ));
    let Host {
        fs, sim: _sim, d, ..
    } = Host::builder().on(fs).start();
    d.register(NIC, "nic");
    let r = bind(&d, "nic", "");
    r.expect_error(503, "vfio_unavailable");
    r.expect_message_contains("modprobe vfio-pci");
    fs.load_vfio();
    d.register(EDU, "edu");
    let r = bind(&d, "edu", "");
    r.expect_error(409, "no_iommu_group");
}

#[test]
fn vfioctl_moves_devices_too() {
    let h = Host::standard(&[]);
    h.d.register(GPU, "gpu0");
    let (code, out, _) =
        common::vfioctl(&h.d.socket, &["bind", "gpu0", "--with-group", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("dry run") && out.contains("drivers/nvidia/unbind"),
        "{out}"
    );
    let (code, _, err) = common::vfioctl(&h.d.socket, &["bind", "gpu0"]);
    assert_eq!(code, 1);
    assert!(err.contains("iommu_group_conflict"), "{err}");
    let (code, _, err) = common::vfioctl(&h.d.socket, &["attach", "gpu0", "vm-9"]);
    assert_eq!(code, 1, "attach binds without with_group: conflict");
    assert!(err.contains("iommu_group_conflict"), "{err}");
    let (code, _, err) = common::vfioctl(&h.d.socket, &["bind", "gpu0", "--with-group"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = common::vfioctl(&h.d.socket, &["attach", "gpu0", "vm-9"]);
    assert_eq!(code, 0);
    let (code, _, _) = common::vfioctl(&h.d.socket, &["detach", "gpu0"]);
    assert_eq!(code, 0);
    assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("nvidia"));
    assert_eq!(h.fs.driver_of(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));
}

#[test]
fn a_vendor_vfio_variant_driver_is_preferred_when_the_kernel_names_one() {
    let fs = FakeSys::standard_host();
    fs.add_driver("nvgrace-gpu-vfio-pci");
    let modules = fs.tmp_root().join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::write(
        modules.join("modules.alias"),
        "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n\
         alias vfio_pci:v000010DEd00002236sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n",
    )
    .unwrap();
    let modules_arg = modules.display().to_string();
    let Host { fs, sim, d, .. } = Host::builder()
        .on(fs)
        .args(&["--modules-dir", &modules_arg])
        .start();
    d.register(GPU, "gpu0");
    let r = bind(&d, "gpu0", r#"{"with_group":true,"dry_run":true}"#);
    let moves = &r.json()["plan"]["moves"];
    assert_eq!(moves[0]["to"], "nvgrace-gpu-vfio-pci", "{}", r.body);
    assert_eq!(
        moves[1]["to"], "vfio-pci",
        "the audio function has no variant"
    );
    let r = bind(&d, "gpu0", r#"{"with_group":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["current_driver"], "nvgrace-gpu-vfio-pci");
    assert_eq!(r.json()["bound_to_vfio"], true);
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvgrace-gpu-vfio-pci"));
    assert_eq!(fs.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
    assert!(sim
        .writes()
        .iter()
        .any(|(p, v)| p.ends_with(&format!("{GPU}/driver_override"))
            && v.trim() == "nvgrace-gpu-vfio-pci"));
    assert_eq!(d.post("/devices/gpu0/unbind", "").status, 200);
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("nvidia"));
}

#[test]
fn bridges_are_refused_before_any_write() {
    let h = Host::standard(&[]);
    let r = h.d.post("/devices", r#"{"pci_address":"0000:00:01.0"}"#);
    r.expect_error(400, "unsupported_device");
    r.expect_message_contains("bridge");
    assert!(h.sim.writes().is_empty());
    assert_eq!(h.fs.driver_of(ROOT_PORT).as_deref(), Some("pcieport"));
}

#[test]
fn unbind_twice_is_fine_and_a_missing_original_driver_is_named() {
    let h = Host::standard(&[]);
    h.d.register(NIC, "nic");
    assert_eq!(bind(&h.d, "nic", "").status, 200);
    assert_eq!(h.d.post("/devices/nic/unbind", "").status, 200);
    let r = h.d.post("/devices/nic/unbind", "");
    assert_eq!(
        r.status, 200,
        "a second unbind has nothing to do: {}",
        r.body
    );
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));

    // The original driver's module is gone when vfiod gives the device back.
    assert_eq!(bind(&h.d, "nic", "").status, 200);
    h.sim.ignore_probe(NIC);
    std::fs::remove_dir_all(h.fs.path("bus/pci/drivers/e1000e")).ok();
    let r = h.d.post("/devices/nic/unbind", "");
    r.expect_error(500, "unbind_failed");
    r.expect_message_contains("e1000e is not loaded");
}

/// Settling a stuck bind can time out in its turn (a loaded host): the
/// device is then stuck again and settled once more when that write
/// returns, rather than recorded as rolled back while the kernel still
/// holds it, which left it with no driver and vfiod's override (seen in
/// the real-kernel scenario interrupted-move under load).
#[test]
fn a_settle_that_times_out_is_settled_again_when_the_kernel_returns() {
    let h = Host::standard(&["--op-timeout-ms", "400"]);
    h.d.register(NIC, "nic");
    h.sim.hang_write("bus/pci/drivers/e1000e/unbind");
    bind(&h.d, "nic", "{}").expect_error(504, "driver_timeout");
    assert_eq!(h.d.get("/devices/nic").json()["stuck"], true);
    // The unbind returns; the settle's first write hangs in its turn.
    let override_attr = format!("bus/pci/devices/{NIC}/driver_override");
    h.sim.hang_write(&override_attr);
    h.sim.release("bus/pci/drivers/e1000e/unbind");
    std::thread::sleep(Duration::from_millis(1500));
    h.sim.release(&override_attr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dev = h.d.get("/devices/nic").json();
        if dev["stuck"] == false && dev["pending"].is_null() {
            assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"), "{dev}");
            assert_eq!(dev["bound_to_vfio"], true, "{dev}");
            assert_eq!(dev["bound_by_vfiod"], true, "{dev}");
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {dev}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
