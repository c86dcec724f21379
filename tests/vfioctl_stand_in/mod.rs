//! A stand-in vfiod for vfioctl's tests: a Unix socket that answers each
//! request with the next canned answer and records what it was asked.
//! One connection per request (`connection: close`), so a command that
//! makes several requests is answered in order.

// Each test file uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::fakesys::TempDir;
use common::vfioctl;
use serde_json::Value;

/// What a stand-in server saw of one request.
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// What vfioctl did against a stand-in server that answered one request.
pub struct Run {
    pub seen: Seen,
    pub code: i32,
    pub out: String,
    pub err: String,
}

/// What vfioctl did against a stand-in server, every request it made.
pub struct Runs {
    pub seen: Vec<Seen>,
    pub code: i32,
    pub out: String,
    pub err: String,
}

/// Runs vfioctl against a socket that answers one request with `status`
/// (e.g. `200 OK`) and `body`, and returns what vfioctl sent and printed.
pub fn stand_in(args: &[&str], status: &str, body: &str) -> Run {
    let runs = stand_in_answers(args, &[(status, body)]);
    let seen = runs
        .seen
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{args:?} made no request: {}", runs.err));
    Run {
        seen,
        code: runs.code,
        out: runs.out,
        err: runs.err,
    }
}

/// Runs vfioctl against a socket that answers its requests, in order,
/// with `answers` (status, body); a request beyond them is left
/// unanswered. Returns every request vfioctl made.
pub fn stand_in_answers(args: &[&str], answers: &[(&str, &str)]) -> Runs {
    let server = StandIn::start(answers);
    let (code, out, err) = vfioctl(&server.socket, args);
    Runs {
        seen: server.finish(),
        code,
        out,
        err,
    }
}

/// A stand-in serving on its socket until [`StandIn::finish`].
pub struct StandIn {
    pub socket: PathBuf,
    client_done: Arc<AtomicBool>,
    server: JoinHandle<Vec<Seen>>,
    _dir: TempDir,
}

impl StandIn {
    /// Serves `answers` (status, body), one request each, in order.
    pub fn start(answers: &[(&str, &str)]) -> StandIn {
        let dir = TempDir::new("vfioctl-stand-in").unwrap();
        let socket = dir.path().join("s.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // Non-blocking, so that the server stops when its client is done
        // having made fewer requests than there are answers.
        listener.set_nonblocking(true).unwrap();
        let answers: Vec<(String, String)> = answers
            .iter()
            .map(|(s, b)| (s.to_string(), b.to_string()))
            .collect();
        let client_done = Arc::new(AtomicBool::new(false));
        let done = client_done.clone();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, reply) in answers {
                let stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break Some(stream),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            if done.load(Ordering::SeqCst) {
                                break None;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("stand-in accept: {e}"),
                    }
                };
                let Some(stream) = stream else { break };
                stream.set_nonblocking(false).unwrap();
                seen.push(answer(stream, &status, &reply));
            }
            seen
        });
        StandIn {
            socket,
            client_done,
            server,
            _dir: dir,
        }
    }

    /// Once the client has exited: the requests it made.
    pub fn finish(self) -> Vec<Seen> {
        self.client_done.store(true, Ordering::SeqCst);
        self.server.join().unwrap()
    }
}

/// Reads one request from `stream` and answers it.
fn answer(stream: std::os::unix::net::UnixStream, status: &str, reply: &str) -> Seen {
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
    // One write: vfioctl may close as soon as it has read the head (an
    // events request refused), and a later piece of a write! would then
    // fail with EPIPE.
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    );
    reader.get_mut().write_all(answer.as_bytes()).unwrap();
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
}
