//! vfiod as a service: one daemon per socket, a stale socket file
//! replaced, a socket passed by systemd used, systemd's notifications
//! (READY, WATCHDOG, STOPPING), and a stop that still answers the
//! connections that raced it.

use std::process::Command;
use std::time::Duration;

use common::host::standard_daemon;

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let (_fs, d) = standard_daemon();
    let mut cmd = d.command();
    // Another state dir, same socket.
    cmd.arg("--state-dir").arg(d.dir().join("other-state"));
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        d.get("/health").status,
        200,
        "the first daemon keeps serving"
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    assert!(d.socket.exists(), "kill -9 leaves the socket file behind");
    d.spawn();
    assert_eq!(d.get("/health").status, 200);
}

/// READY, STATUS, WATCHDOG and STOPPING, as systemd's notify socket sees them.
#[test]
fn systemd_notifications() {
    use std::os::unix::net::UnixDatagram;
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    let notify_path = d.dir().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000");
    let child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let socket = d.socket.clone();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(
        first.contains("READY=1") && first.contains("STATUS=serving"),
        "{first}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "READY before the socket was bound"
    );
    let ping = recv();
    assert!(ping.contains("WATCHDOG=1"), "{ping}");
    d.child = Some(child);
    let status = d.terminate();
    assert!(status.success());
    let mut saw_stopping = false;
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        saw_stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(saw_stopping);
}

/// A socket passed by systemd (LISTEN_FDS) is used instead of binding one.
#[test]
fn socket_activation() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate not installed");
        return;
    };
    let (_fs, mut d) = standard_daemon();
    d.kill9();
    let passed = d.dir().join("passed.sock");
    let own = d.command();
    let mut cmd = Command::new(activate);
    cmd.arg("-l").arg(&passed).arg(own.get_program());
    cmd.args(own.get_args());
    let _ = std::fs::remove_file(&d.socket);
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(cmd.stderr(std::process::Stdio::null()).spawn().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        if passed.exists() {
            if let Ok(r) =
                std::panic::catch_unwind(|| common::request(&passed, "GET", "/health", None))
            {
                break r;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "activated vfiod never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.status, 200);
    assert!(
        !d.socket.exists(),
        "with a passed socket vfiod binds none of its own"
    );
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .ok_or(())
}

/// A client that connected before SIGTERM and sends its request right
/// after still gets an answer (the connection is not dropped unanswered).
#[test]
fn shutdown_answers_connections_that_raced_it() {
    use std::io::{Read, Write};
    let (_fs, mut d) = standard_daemon();
    let streams: Vec<std::os::unix::net::UnixStream> = (0..20)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let pid = nix::unistd::Pid::from_raw(d.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                String::from_utf8_lossy(&out)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
        })
        .collect();
    let statuses: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| s.starts_with("HTTP/1.1 200")),
        "{statuses:?}"
    );
    let status = d.terminate_wait();
    assert!(status.success());
}
