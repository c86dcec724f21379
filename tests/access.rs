//! Who may change what: a caller outside the access group reads but
//! cannot change; a vfiod running unprivileged serves reads and refuses
//! every move before it writes.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::fakesys::FakeSys;
use common::standard::GPU;
use common::Daemon;
use serde_json::Value;

/// Runs `vfioctl` as another user (and optionally with supplementary groups).
fn vfioctl_as(d: &Daemon, uid: u32, groups: &[u32], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(common::vfioctl_bin());
    cmd.arg("--socket").arg(&d.socket).args(args);
    common::run_as(&mut cmd, uid, groups);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn callers_outside_the_group_read_but_cannot_change() {
    let fs = FakeSys::standard_host();
    // Group "nogroup" (65534) is the access group; uid 4242 is in it only
    // through a supplementary group, uid 4243 not at all.
    let d = Daemon::start(&fs, &["--group", "nogroup"]);
    // The temp dir must be reachable for other users.
    let (code, out, err) = vfioctl_as(&d, 4243, &[], &["--json", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "[]");
    let (code, _, err) = vfioctl_as(&d, 4243, &[], &["--json", "register", GPU]);
    assert_eq!(code, 1);
    let e: Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(e["code"], "forbidden");
    let (code, out, err) = vfioctl_as(&d, 4242, &[65534], &["--json", "register", GPU]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["pci_address"],
        GPU
    );
    assert!(
        d.log_text().contains("uid=4242"),
        "mutation logged with the caller's uid"
    );
    let (code, _, _) = vfioctl_as(&d, 4243, &[], &["delete", "pci-0000-01-00-0"]);
    assert_eq!(code, 1);
    assert_eq!(d.get("/devices").json().as_array().unwrap().len(), 1);
}

#[test]
fn unprivileged_daemon_on_the_real_sys_serves_reads_and_refuses_binds() {
    // Read-only: as uid 65534 the kernel refuses any sysfs write anyway,
    // and vfiod refuses before trying.
    let dir = common::fakesys::TempDir::new("vfiod-unpriv").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let run = dir.path().join("run");
    let state = dir.path().join("state");
    let mut child = Command::new(common::vfiod_bin())
        .uid(65534)
        .gid(65534)
        .env("XDG_RUNTIME_DIR", &run)
        .env("XDG_STATE_HOME", &state)
        .env("HOME", dir.path())
        .args(["--config", "/dev/null"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let socket = run.join("vfiod/vfiod.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "unprivileged vfiod did not come up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let health = common::request(&socket, "GET", "/health", None).json();
    assert_eq!(health["privileged"], false);
    let r = common::request(&socket, "GET", "/devices/available", None);
    assert_eq!(r.status, 200);
    // Register whatever is first on this machine's bus (a registry entry
    // only), then a bind is refused without touching anything.
    let first = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .next()
        .unwrap();
    let addr = first.file_name().into_string().unwrap();
    let r = common::request(
        &socket,
        "POST",
        "/devices",
        Some(&format!(r#"{{"pci_address":"{addr}"}}"#)),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let before = std::fs::read_link(first.path().join("driver")).ok();
    let r = common::request(
        &socket,
        "POST",
        &format!("/devices/{}/bind", r.json()["id"].as_str().unwrap()),
        Some("{}"),
    );
    assert!(r.status >= 400, "{}", r.body);
    assert!(
        ["not_privileged", "no_iommu_group", "vfio_unavailable"].contains(&r.code().as_str()),
        "{}",
        r.body
    );
    assert_eq!(std::fs::read_link(first.path().join("driver")).ok(), before);
    assert!(state.join("vfiod/state.json").exists());
    let _ = child.kill();
    let _ = child.wait();
}
