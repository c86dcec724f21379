//! The HTTP layer every request passes: errors are JSON with a code, one
//! connection serves many requests, hundreds of connections are served at
//! once; `/health` and the OpenAPI document.

use std::time::Duration;

use common::host::standard_daemon;
use common::{parse_response, raw_request};

#[test]
fn protocol_errors_are_json_too() {
    let (_fs, d) = standard_daemon();
    let r = d.get("/nope");
    r.expect_error(404, "not_found");
    let r = d.get("/devices/does-not-exist");
    r.expect_error(404, "not_found");
    let r = d.req("PUT", "/devices", Some("{}"));
    r.expect_error(405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, POST"));
    let r = d.req("DELETE", "/devices/available", None);
    r.expect_error(405, "method_not_allowed");
    let big = format!(
        r#"{{"pci_address":"0000:00:02.0","tags":{{"k":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    let r = d.post("/devices", &big);
    r.expect_error(413, "body_too_large");
    // Chunked body over the limit, without a Content-Length.
    let chunk = "x".repeat(40 * 1024);
    let raw = format!(
        "POST /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let r = raw_request(&d.socket, raw.as_bytes());
    r.expect_error(413, "body_too_large");
    // Garbage instead of HTTP: the server answers 400 or closes; it stays up.
    let _ = std::panic::catch_unwind(|| raw_request(&d.socket, b"\x00\x01garbage\r\n\r\n"));
    assert_eq!(d.get("/health").status, 200);
}

#[test]
fn health_and_openapi() {
    let (_fs, d) = standard_daemon();
    let h = d.get("/health");
    assert_eq!(h.status, 200);
    let h = h.json();
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(h["vfio_pci_available"], true);
    assert_eq!(h["iommu_enabled"], true);
    assert!(h["uptime_s"].is_u64());
    let spec = d.get("/openapi.yaml");
    assert_eq!(spec.status, 200);
    assert!(spec.body.starts_with("openapi: 3"));
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (_fs, d) = standard_daemon();
    let stream = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..20 {
        writer
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut len = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
    }
}

#[test]
fn hundreds_of_concurrent_connections() {
    let (_fs, d) = standard_daemon();
    let socket = d.socket.clone();
    // Open them all first, then use them: 300 connections at once.
    let streams: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(b"GET /devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                parse_response(&out).status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}
