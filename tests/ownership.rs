//! A move belongs to vfiod, not to the connection that asked for it: a
//! client that hangs up, and SIGTERM, never leave a device half-moved; a
//! device whose write is still in the kernel refuses every move; SIGTERM
//! is a graceful stop from the moment the socket exists.
//!
//! The simulated kernel pauses the move between unbind and probe (a hung
//! `drivers_probe` write), which is exactly the state the first round left
//! behind: no driver, vfiod's `driver_override` in place.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::fakesys::FakeSys;
use common::host::Host;
use common::simkernel::SimKernel;
use common::standard::NIC;
use common::{eventually, Daemon};
use serde_json::Value;

const PROBE: &str = "bus/pci/drivers_probe";

/// Sends a request on a raw connection and returns it unread.
fn send(socket: &std::path::Path, method: &str, path: &str, body: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Waits until the simulated kernel has the NIC off e1000e with vfiod's
/// override in place and the probe write hanging: the middle of a bind.
fn wait_mid_bind(fs: &FakeSys) {
    eventually(10, "the bind to reach the hung probe", || {
        (fs.driver_of(NIC).is_none() && fs.tree().override_of(NIC).as_deref() == Some("vfio-pci"))
            .then_some(())
    });
}

fn last_seq(d: &Daemon) -> u64 {
    d.get("/health").json()["last_event_seq"].as_u64().unwrap()
}

/// Events after `since`, from the retained ring (the stream is cut after a
/// short read: it never ends by itself).
fn events_since(d: &Daemon, since: u64) -> Vec<Value> {
    let mut s = send(&d.socket, "GET", &format!("/events?since={since}"), "");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Starts a bind of the NIC, waits until it is in the middle (probe hung)
/// and hangs up, as a control plane that timed out would; returns the
/// event sequence number from before the bind.
fn bind_and_hang_up_mid_way(d: &Daemon, fs: &FakeSys, sim: &SimKernel) -> u64 {
    d.register(NIC, "nic");
    let since = last_seq(d);
    sim.hang_write(PROBE);
    let client = send(&d.socket, "POST", "/devices/nic/bind", "{}");
    wait_mid_bind(fs);
    drop(client);
    since
}

#[test]
fn a_client_that_hangs_up_mid_bind_does_not_cancel_it() {
    let Host { fs, sim, d, .. } = Host::standard(&["--op-timeout-ms", "10000"]);
    let since = bind_and_hang_up_mid_way(&d, &fs, &sim);
    std::thread::sleep(Duration::from_millis(300));
    sim.release(PROBE);
    let dev = eventually(10, "the bind to finish without its client", || {
        let dev = d.get("/devices/nic").json();
        (dev["pending"].is_null() && dev["bound_to_vfio"] == true).then_some(dev)
    });
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert_eq!(dev["current_driver"], "vfio-pci");
    assert_eq!(dev["bound_by_vfiod"], true);
    assert_eq!(dev["stuck"], false);
    let events = events_since(&d, since);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "bind" && e["pci_address"] == NIC),
        "no bind event published: {events:?}"
    );
    // It is vfiod's to give back, as after any bind.
    assert_eq!(d.post("/devices/nic/unbind", "").status, 200);
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn a_client_that_hangs_up_mid_failed_bind_still_gets_the_rollback() {
    // The failed verification waits one op timeout: keep it short.
    let Host { fs, sim, d, .. } = Host::standard(&["--op-timeout-ms", "4000"]);
    let since = bind_and_hang_up_mid_way(&d, &fs, &sim);
    // Every probe binds the wrong driver: the bind fails and rolls back.
    sim.bind_wrong_driver_always(NIC, "e1000e");
    sim.release(PROBE);
    let dev = eventually(30, "the failed bind to be rolled back", || {
        let dev = d.get("/devices/nic").json();
        (dev["pending"].is_null() && dev["current_driver"] == "e1000e").then_some(dev)
    });
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("e1000e"));
    assert_eq!(
        fs.tree().override_of(NIC),
        None,
        "vfiod's override left behind"
    );
    assert_eq!(dev["bound_by_vfiod"], false);
    let events = events_since(&d, since);
    assert!(
        events.iter().any(|e| e["type"] == "bind_failed"),
        "no bind_failed event: {events:?}"
    );
}

#[test]
fn sigterm_mid_bind_finishes_the_move_then_exits_0() {
    let Host { fs, sim, mut d, .. } = Host::standard(&["--op-timeout-ms", "10000"]);
    d.register(NIC, "nic");
    sim.hang_write(PROBE);
    let socket = d.socket.clone();
    let client = std::thread::spawn(move || {
        common::request(&socket, "POST", "/devices/nic/bind", Some("{}"))
    });
    wait_mid_bind(&fs);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "vfiod exited with a move half-done"
    );
    sim.release(PROBE);
    let status = d.terminate_wait();
    assert!(status.success(), "exit after SIGTERM: {status}");
    // The client that stayed got the answer.
    let r = client.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    // And the registry agrees with the kernel after a restart.
    d.spawn();
    let dev = d.get("/devices/nic").json();
    assert_eq!(dev["bound_to_vfio"], true, "{dev}");
    assert_eq!(dev["pending"], Value::Null);
    assert_eq!(dev["original_driver"], "e1000e");
}

#[test]
fn a_stuck_device_refuses_every_move_and_delete_then_settles() {
    let Host { fs, sim, d, .. } = Host::standard(&["--op-timeout-ms", "1000"]);
    d.register(NIC, "nic");
    sim.hang_write("bus/pci/drivers/e1000e/unbind");
    d.post("/devices/nic/bind", "{}")
        .expect_error(504, "driver_timeout");
    assert_eq!(d.get("/devices/nic").json()["stuck"], true);
    d.req("DELETE", "/devices/nic", None)
        .expect_error(409, "device_stuck");
    for action in ["bind", "unbind", "attach", "detach"] {
        let body = if action == "attach" {
            r#"{"instance_id":"vm-1"}"#
        } else {
            "{}"
        };
        d.post(&format!("/devices/nic/{action}"), body)
            .expect_error(409, "device_stuck");
    }
    // Registry-only edits do not race the kernel and stay allowed.
    assert_eq!(
        d.req("PATCH", "/devices/nic", Some(r#"{"tags":{"a":"b"}}"#))
            .status,
        200
    );
    // The kernel returns: vfiod settles the recorded bind by itself, and
    // the device is never left without a driver with vfiod's override.
    sim.release("bus/pci/drivers/e1000e/unbind");
    let dev = eventually(10, "the stuck bind to settle", || {
        let dev = d.get("/devices/nic").json();
        (dev["stuck"] == false && dev["pending"].is_null()).then_some(dev)
    });
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("vfio-pci"), "{dev}");
    assert_eq!(d.req("DELETE", "/devices/nic", None).status, 204);
    assert_eq!(fs.driver_of(NIC).as_deref(), Some("e1000e"));
    assert_eq!(fs.tree().override_of(NIC), None);
}

/// SIGTERM as soon as the socket exists is a graceful stop (exit 0), never
/// death by the signal's default action.
#[test]
fn sigterm_right_after_the_socket_appears_exits_0() {
    let Host {
        fs: _fs,
        sim: _sim,
        mut d,
        ..
    } = Host::standard(&[]);
    d.kill9();
    for round in 0..8 {
        let _ = std::fs::remove_file(&d.socket);
        let child = d
            .command()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        d.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            assert!(Instant::now() < deadline, "socket never appeared");
            std::thread::yield_now();
        }
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = d.terminate_wait();
        assert_eq!(status.code(), Some(0), "round {round}: {status}");
    }
}
