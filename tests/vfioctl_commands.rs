//! vfioctl's commands against a real vfiod on a fake tree: the candidate
//! list, holders, resets, tables, JSON and errors as a user sees them.

use common::fakeproc::{alias_node, dev_numbers};
use common::fakesys::{DeviceSpec, FakeSys};
use common::host::{standard_daemon, Host};
use common::standard::{AMD, GPU, NIC, ROOT_PORT};
use common::vfioctl;
use serde_json::Value;

#[test]
fn available_all_lists_every_function_like_lspci() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    let (code, out, err) = vfioctl(&d.socket, &["available", "--all"]);
    assert_eq!(code, 0, "{err}");
    let all = FakeSys::standard_devices();
    assert_eq!(out.lines().count(), all.len() + 1, "{out}");
    let nic = out.lines().find(|l| l.starts_with(NIC)).expect(NIC);
    assert!(
        nic.contains("[0200]") && nic.contains("[8086:10d3]") && nic.contains("e1000e"),
        "{nic}"
    );
    let bridge = out.lines().find(|l| l.starts_with(ROOT_PORT)).unwrap();
    assert!(
        bridge.contains("pcieport") && bridge.contains("[0604]"),
        "{bridge}"
    );
    let gpu = out.lines().find(|l| l.starts_with(GPU)).unwrap();
    let id = d.get("/devices/gpu0").json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(gpu.contains(&id) && gpu.contains("nvidia"), "{gpu}");
    let (_, out, _) = vfioctl(&d.socket, &["available"]);
    assert!(!out.contains(NIC), "without --all only candidates: {out}");
    let r = d.get("/devices/available?all=maybe");
    r.expect_error(400, "invalid_request");
}

#[test]
fn holders_of_a_busy_gpu_through_vfioctl() {
    let h = Host::builder().fake_proc().start();
    let (fs, proc, d) = (&h.fs, h.proc(), &h.d);
    d.register(AMD, "amd");
    let (_, out, _) = vfioctl(&d.socket, &["holders", "amd"]);
    assert_eq!(out, "nothing holds amd\n");
    // An X server has the GPU's DRM node open.
    fs.add_class_device(AMD, "drm/card0", "drm", Some(&dev_numbers("/dev/full")));
    let node = fs.dev_path("dri/card0");
    alias_node(&node, "/dev/full");
    let mut p = proc.process(2001, "Xorg");
    p.uid(1000)
        .cgroup("0::/system.slice/display-manager.service\n");
    p.fd(&node);
    let (code, out, err) = vfioctl(&d.socket, &["holders", "amd"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].starts_with(AMD)
            && lines[1].contains("process")
            && lines[1].contains("pid 2001 (Xorg) uid 1000 has ")
            && lines[1].ends_with("dri/card0 open, unit display-manager.service"),
        "{out}"
    );
    let (code, _, err) = vfioctl(&d.socket, &["bind", "amd"]);
    assert_eq!(code, 1);
    assert!(err.contains("device_busy") && err.contains("Xorg"), "{err}");
}

#[test]
fn reset_through_vfioctl() {
    let nic = DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
        .driver("e1000e")
        .group(2)
        .reset_methods("flr pm");
    let Host {
        fs: _fs,
        sim: _sim,
        d,
        ..
    } = Host::builder().on(FakeSys::with_devices([nic])).start();
    d.register(NIC, "nic");
    let (code, out, err) = vfioctl(&d.socket, &["reset", "nic", "--method", "pm", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("dry run, nothing changed; a reset would try pm and reach:\n  {NIC} (e1000e)\n")
    );
    let (code, out, err) = vfioctl(&d.socket, &["reset", "nic", "--method", "pm"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(NIC) && out.contains("health:") && out.contains("ok"),
        "{out}"
    );
    let last = &d.get("/devices/nic").json()["last_reset"];
    assert_eq!(last["method"], "pm", "{last}");
    let (code, _, err) = vfioctl(&d.socket, &["reset", "nic", "--method", "bus"]);
    assert_eq!(code, 1, "no bus reset offered by the kernel: {err}");
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
    assert!(out.contains(AMD) && !out.contains(NIC), "{out}");
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
