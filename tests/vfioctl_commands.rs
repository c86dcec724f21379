//! What vfioctl's commands send (against a stand-in server that records
//! them) and what they print, against a real vfiod on a fake tree:
//! tables, JSON, holders, resets, and errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;

use common::fakeproc::{alias_node, dev_numbers};
use common::fakesys::{DeviceSpec, FakeSys, TempDir};
use common::host::{standard_daemon, Host};
use common::standard::{AMD, GPU, NIC, ROOT_PORT};
use common::vfioctl;
use serde_json::{json, Value};

/// What a stand-in server saw of one request.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    body: Value,
}

/// Runs vfioctl against a socket that answers one request with `reply`,
/// and returns what vfioctl sent and printed.
fn against_stand_in(args: &[&str], reply: Value) -> (Seen, i32, String) {
    let dir = TempDir::new("vfioctl-stand-in").unwrap();
    let socket = dir.path().join("s.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let reply = reply.to_string();
        write!(
            reader.get_mut(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
            reply.len()
        )
        .unwrap();
        let mut parts = request_line.split_whitespace();
        Seen {
            method: parts.next().unwrap().to_owned(),
            path: parts.next().unwrap().to_owned(),
            body: if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body).unwrap()
            },
        }
    });
    let (code, out, err) = vfioctl(&socket, args);
    let seen = server.join().unwrap();
    assert_eq!(code, 0, "{args:?}: {err}");
    (seen, code, out)
}

#[test]
fn new_commands_send_the_bodies_of_the_contract() {
    let device = json!({"id": "d1", "name": "gpu0", "pci_address": GPU});
    let (seen, _, _) = against_stand_in(&["bind", "gpu0", "--force"], device.clone());
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/devices/gpu0/bind")
    );
    assert_eq!(
        seen.body,
        json!({"with_group": false, "dry_run": false, "force": true})
    );
    let (seen, _, _) = against_stand_in(&["bind", "gpu0"], device.clone());
    assert_eq!(seen.body, json!({"with_group": false, "dry_run": false}));

    let (seen, _, out) = against_stand_in(
        &["attach", "gpu 0", "vm-7", "--uid", "64055", "--pid", "4242"],
        device.clone(),
    );
    assert_eq!(seen.path, "/devices/gpu%200/attach");
    assert_eq!(
        seen.body,
        json!({"instance_id": "vm-7", "uid": 64055, "pid": 4242})
    );
    assert!(out.contains("gpu0"), "{out}");

    let (seen, _, _) = against_stand_in(
        &["reset", "gpu0", "--method", "af_flr", "--dry-run"],
        json!({"dry_run": true, "method": "af_flr", "scope": [GPU]}),
    );
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/devices/gpu0/reset")
    );
    assert_eq!(seen.body, json!({"method": "af_flr", "dry_run": true}));
    let (seen, _, _) = against_stand_in(&["reset", "gpu0"], device.clone());
    assert_eq!(
        seen.body,
        json!({"dry_run": false}),
        "no method: the agent's default"
    );

    let holders = json!({"holders": [
        {"kind": "process", "pci_address": GPU, "pid": 812, "comm": "Xorg", "uid": 0,
         "path": "/dev/dri/card0", "unit": "gdm.service"},
        {"kind": "mount", "pci_address": "0000:02:00.0", "device": "/dev/nvme0n1p2",
         "mount_point": "/", "fstype": "ext4"},
        {"kind": "net_interface", "pci_address": NIC, "interface": "eno1",
         "addresses": ["192.0.2.4/24"], "routes": 2},
        {"kind": "framebuffer_console", "pci_address": GPU, "vtconsole": "vtcon1",
         "framebuffer": "fb0"},
    ]});
    let (seen, _, out) = against_stand_in(&["holders", "gpu0"], holders);
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/devices/gpu0/holders")
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("FUNCTION") && lines[0].contains("HOLDER"),
        "{out}"
    );
    assert!(
        lines[1].contains(GPU)
            && lines[1].contains("pid 812 (Xorg)")
            && lines[1].contains("gdm.service"),
        "{out}"
    );
    assert!(
        lines[2].contains("/dev/nvme0n1p2 mounted on / (ext4)"),
        "{out}"
    );
    assert!(
        lines[3].contains("eno1 addresses: 192.0.2.4/24; routes: 2"),
        "{out}"
    );
    assert!(
        lines[4].contains("vtcon1") && lines[4].contains("fb0"),
        "{out}"
    );
    let (_, _, out) = against_stand_in(&["holders", "gpu0"], json!({"holders": []}));
    assert_eq!(out, "nothing holds gpu0\n");
}

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
