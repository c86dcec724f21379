//! Attachments hand the device to an unprivileged VMM: a POSIX ACL entry
//! for the VMM's uid on the fake devfs's VFIO nodes (the temporary
//! directory's filesystem must support ACLs, as tmpfs and ext4 do), taken
//! away on detach or when the VMM's process exits, kept across restarts.
//!
//! These tests run processes and requests as other uids, so they need root
//! (CI runs as root); as another user they say so and pass nothing.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::host::Host;
use common::standard::{AMD, GPU, GPU_AUDIO, NIC};
use common::{acl_users, eventually, Daemon};
use serde_json::Value;

const VMM_UID: u32 = 4242;
const OTHER_UID: u32 = 4343;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What an unprivileged user would notice: mode bits and ACL entries.
fn node_state(node: &Path) -> (u32, Vec<u32>) {
    let mode = std::fs::metadata(node).unwrap().permissions().mode() & 0o7777;
    (mode, acl_users(node))
}

/// A long-running process as `uid`: the stand-in for a VMM.
fn vmm_as(uid: u32) -> Child {
    Command::new("sleep")
        .arg("300")
        .uid(uid)
        .gid(uid)
        .spawn()
        .unwrap()
}

/// A request sent as `uid` (with the access group as a supplementary
/// A request sent as `uid` (with supplementary `groups`), through curl.
fn request_as(
    d: &Daemon,
    uid: u32,
    groups: &[u32],
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&d.socket)
        .args([
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            "--data",
            body,
        ])
        .arg(format!("http://vfiod{path}"));
    common::run_as(&mut cmd, uid, groups);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl output");
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn host() -> Option<Host> {
    if !is_root() {
        eprintln!("skipped: attachments to other uids need root");
        return None;
    }
    // Group 65534 (nogroup) is the access group for the unprivileged callers.
    Some(Host::standard(&["--group", "nogroup"]))
}

fn attach(d: &Daemon, name: &str, body: &str) -> common::Response {
    d.post(&format!("/devices/{name}/attach"), body)
}

#[test]
fn attach_opens_the_group_node_to_the_vmm_uid_and_detach_restores_it() {
    let Some(Host {
        fs, sim: _sim, d, ..
    }) = host()
    else {
        return;
    };
    d.register(NIC, "nic");
    let node = fs.tree().vfio_node(2);
    assert_eq!(d.post("/devices/nic/bind", "{}").status, 200);
    // The node as the kernel made it: what detach must give back.
    let made = node_state(&node);
    assert!(has_no_access_acl(&node));
    let r = attach(
        &d,
        "nic",
        &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID}}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let dev = r.json();
    assert_eq!(dev["attached_to"], "vm-1");
    assert_eq!(dev["attached_uid"], VMM_UID);
    assert_eq!(dev["attached_pid"], Value::Null);
    let (mode, users) = node_state(&node);
    assert_eq!(users, vec![VMM_UID], "the VMM's uid may open the node");
    assert_eq!(mode & 0o070, 0o060, "the ACL mask shows in the group bits");
    let (code, out, err) = common::vfioctl(&d.socket, &["show", "nic"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("may open:") && l.ends_with(&format!("root and uid {VMM_UID}"))),
        "{out}"
    );
    // Same request again: a no-op. Another instance or uid: in use.
    assert_eq!(
        attach(
            &d,
            "nic",
            &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID}}}"#)
        )
        .status,
        200
    );
    attach(
        &d,
        "nic",
        &format!(r#"{{"instance_id":"vm-1","uid":{OTHER_UID}}}"#),
    )
    .expect_error(409, "in_use");
    attach(&d, "nic", r#"{"instance_id":"vm-2"}"#).expect_error(409, "in_use");

    let r = d.post("/devices/nic/detach", r#"{"keep_bound":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["attached_uid"], Value::Null);
    assert_eq!(node_state(&node), made, "the node is not as it was");
    assert!(
        has_no_access_acl(&node),
        "an access ACL is left on the node"
    );
}

/// Whether the node carries no access ACL at all (the xattr tells).
fn has_no_access_acl(node: &Path) -> bool {
    rustix::fs::getxattr(node, "system.posix_acl_access", &mut [0u8; 512]).is_err()
}

#[test]
fn only_root_attaches_for_another_uid_and_the_pid_must_be_that_users() {
    let Some(Host {
        fs: _fs,
        sim: _sim,
        d,
        ..
    }) = host()
    else {
        return;
    };
    d.register(NIC, "nic");
    let (code, body) = request_as(
        &d,
        VMM_UID,
        &[65534],
        "POST",
        "/devices/nic/attach",
        &format!(r#"{{"instance_id":"vm-1","uid":{OTHER_UID}}}"#),
    );
    assert_eq!(
        (code, body["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    // A root-owned process is not uid 4242's VMM.
    let mine = std::process::id();
    attach(
        &d,
        "nic",
        &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID},"pid":{mine}}}"#),
    )
    .expect_error(400, "invalid_pid")
    .expect_message_contains("runs as uid 0");
    attach(
        &d,
        "nic",
        &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID},"pid":4000000}}"#),
    )
    .expect_error(400, "invalid_pid");
    attach(&d, "nic", r#"{"instance_id":"vm-1","pid":0}"#).expect_error(400, "invalid_pid");
    attach(&d, "nic", r#"{"instance_id":"vm-1","uid":-1}"#).expect_error(400, "invalid_request");
    assert_eq!(d.get("/devices/nic").json()["attached_to"], Value::Null);
    // The caller's own uid is the default.
    let (code, body) = request_as(
        &d,
        VMM_UID,
        &[65534],
        "POST",
        "/devices/nic/attach",
        r#"{"instance_id":"vm-1"}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["attached_uid"], VMM_UID);
}

#[test]
fn the_attachment_ends_when_the_vmm_exits() {
    let Some(Host {
        fs, sim: _sim, d, ..
    }) = host()
    else {
        return;
    };
    d.register(NIC, "nic");
    let mut vmm = vmm_as(VMM_UID);
    let since = d.get("/health").json()["last_event_seq"].as_u64().unwrap();
    let r = attach(
        &d,
        "nic",
        &format!(
            r#"{{"instance_id":"vm-1","uid":{VMM_UID},"pid":{}}}"#,
            vmm.id()
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["attached_pid"], vmm.id());
    assert_eq!(acl_users(&fs.tree().vfio_node(2)), vec![VMM_UID]);
    vmm.kill().unwrap();
    let killed = Instant::now();
    vmm.wait().unwrap();
    let dev = eventually(5, "the attachment to end with the VMM", || {
        let dev = d.get("/devices/nic").json();
        dev["attached_to"].is_null().then_some(dev)
    });
    let ended_after = killed.elapsed();
    eprintln!("VMM exit to revoke: {} ms", ended_after.as_millis());
    assert!(ended_after < Duration::from_secs(1), "took {ended_after:?}");
    assert_eq!(dev["attached_uid"], Value::Null);
    assert!(acl_users(&fs.tree().vfio_node(2)).is_empty());
    // The next VM will want it: it stays on vfio.
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    let mut events = common::EventStream::open(&d.socket, &format!("?since={since}"));
    let ended = events.until(|e| e["type"] == "attachment_ended");
    assert!(
        ended["detail"].as_str().unwrap_or("").contains("exited"),
        "{ended}"
    );
}

#[test]
fn a_restart_keeps_live_attachments_and_ends_those_whose_vmm_is_gone() {
    let Some(Host {
        fs,
        sim: _sim,
        mut d,
        ..
    }) = host()
    else {
        return;
    };
    d.register(NIC, "nic");
    d.register(AMD, "amd");
    let mut live = vmm_as(VMM_UID);
    let mut dead = vmm_as(OTHER_UID);
    for (name, uid, pid) in [("nic", VMM_UID, live.id()), ("amd", OTHER_UID, dead.id())] {
        let r = attach(
            &d,
            name,
            &format!(r#"{{"instance_id":"vm-{name}","uid":{uid},"pid":{pid}}}"#),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    d.kill9();
    dead.kill().unwrap();
    dead.wait().unwrap();
    // udev recreated the live device's node meanwhile: no grant on it.
    let node = fs.tree().vfio_node(2);
    std::fs::remove_file(&node).unwrap();
    std::fs::write(&node, "").unwrap();
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.spawn();
    let nic = d.get("/devices/nic").json();
    assert_eq!(nic["attached_to"], "vm-nic", "{nic}");
    assert_eq!(nic["attached_pid"], live.id());
    assert_eq!(
        acl_users(&node),
        vec![VMM_UID],
        "grant re-applied after restart"
    );
    let amd = d.get("/devices/amd").json();
    assert_eq!(amd["attached_to"], Value::Null, "{amd}");
    assert!(acl_users(&fs.tree().vfio_node(5)).is_empty());
    // And the live one is still followed.
    live.kill().unwrap();
    live.wait().unwrap();
    eventually(5, "the resumed attachment to end", || {
        d.get("/devices/nic").json()["attached_to"]
            .is_null()
            .then_some(())
    });
    assert!(acl_users(&node).is_empty());
}

#[test]
fn functions_of_one_group_are_handed_to_one_uid_only() {
    let Some(Host {
        fs, sim: _sim, d, ..
    }) = host()
    else {
        return;
    };
    d.register(GPU, "gpu");
    d.register(GPU_AUDIO, "audio");
    assert_eq!(
        d.post("/devices/gpu/bind", r#"{"with_group":true}"#).status,
        200
    );
    let node = fs.tree().vfio_node(1);
    assert_eq!(
        attach(
            &d,
            "gpu",
            &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID}}}"#)
        )
        .status,
        200
    );
    attach(
        &d,
        "audio",
        &format!(r#"{{"instance_id":"vm-1","uid":{OTHER_UID}}}"#),
    )
    .expect_error(409, "iommu_group_conflict")
    .expect_message_contains(GPU);
    assert_eq!(
        attach(
            &d,
            "audio",
            &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID}}}"#)
        )
        .status,
        200
    );
    // The group node is shared: detaching one function keeps the other's
    // access.
    assert_eq!(
        d.post("/devices/gpu/detach", r#"{"keep_bound":true}"#)
            .status,
        200
    );
    assert_eq!(acl_users(&node), vec![VMM_UID]);
    assert_eq!(
        d.post("/devices/audio/detach", r#"{"keep_bound":true}"#)
            .status,
        200
    );
    assert!(acl_users(&node).is_empty());
}

#[test]
fn health_says_whether_the_vfio_container_is_usable_by_everyone() {
    let Some(Host {
        fs, sim: _sim, d, ..
    }) = host()
    else {
        return;
    };
    let container = fs.devfs.join("vfio/vfio");
    std::fs::write(&container, "").unwrap();
    std::fs::set_permissions(&container, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        d.get("/health").json()["vfio_container_usable_by_all"],
        true
    );
    std::fs::set_permissions(&container, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        d.get("/health").json()["vfio_container_usable_by_all"],
        false
    );
}

#[test]
fn a_vmm_gone_while_vfiod_was_down_gives_the_device_back_with_unbind_on_vmm_exit() {
    if !is_root() {
        eprintln!("skipped: attachments to other uids need root");
        return;
    }
    let Host {
        fs,
        sim: _sim,
        mut d,
        ..
    } = Host::standard(&["--group", "nogroup", "--unbind-on-vmm-exit"]);
    d.register(NIC, "nic");
    let mut vmm = vmm_as(VMM_UID);
    let r = attach(
        &d,
        "nic",
        &format!(
            r#"{{"instance_id":"vm-1","uid":{VMM_UID},"pid":{}}}"#,
            vmm.id()
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    d.kill9();
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    d.spawn();
    // The same as when the VMM exits while vfiod runs.
    eventually(5, "the NIC given back to e1000e", || {
        (fs.driver_of(NIC).as_deref() == Some("e1000e")).then_some(())
    });
    assert_eq!(d.get("/devices/nic").json()["attached_to"], Value::Null);
}

/// A grant no live attachment explains (left by an older vfiod's crash
/// between the grant and its record, or by hand) is taken away at
/// startup, on every registered device; nodes of devices vfiod does not
/// manage are not its business.
#[test]
fn startup_revokes_grants_that_no_live_attachment_explains() {
    let Some(Host {
        fs,
        sim: _sim,
        mut d,
        ..
    }) = host()
    else {
        return;
    };
    d.register(NIC, "nic");
    d.register(AMD, "amd");
    assert_eq!(d.post("/devices/nic/bind", "{}").status, 200);
    assert_eq!(d.post("/devices/amd/bind", "{}").status, 200);
    let r = attach(
        &d,
        "amd",
        &format!(r#"{{"instance_id":"vm-1","uid":{VMM_UID}}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    d.kill9();
    let nic_node = fs.tree().vfio_node(2);
    let amd_node = fs.tree().vfio_node(5);
    // Not registered: the Tesla T4 on vfio-pci since boot, group 4.
    let foreign_node = fs.tree().vfio_node(4);
    for node in [&nic_node, &amd_node, &foreign_node] {
        grant(node, OTHER_UID);
    }
    grant(&nic_node, VMM_UID);
    d.spawn();
    assert_eq!(acl_users(&nic_node), Vec::<u32>::new(), "stray grants kept");
    assert_eq!(
        acl_users(&amd_node),
        vec![VMM_UID],
        "only the live attachment's entry stays"
    );
    assert_eq!(acl_users(&foreign_node), vec![OTHER_UID]);
    assert!(d.log_text().contains("no live attachment explains"));
}

fn grant(node: &Path, uid: u32) {
    let mut acl = posix_acl::PosixACL::read_acl(node).unwrap();
    acl.set(
        posix_acl::Qualifier::User(uid),
        posix_acl::ACL_READ | posix_acl::ACL_WRITE,
    );
    acl.write_acl(node).unwrap();
}
