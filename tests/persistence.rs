//! What was acknowledged stays: across a clean restart and a kill -9 in
//! the middle of a burst; a corrupt state file stops startup and is left
//! alone; a full disk refuses the change and loses nothing.

use std::collections::BTreeSet;
use std::process::Command;

use common::fakesys::{DeviceSpec, FakeSys};
use common::host::standard_daemon;
use common::standard::{GPU, NIC};
use common::Daemon;

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
        fs.add_device(DeviceSpec::new(a, 0x10de, 0x2236, 0x030200).group(100 + i as u32));
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
