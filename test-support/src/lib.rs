//! vfiod's test kit, shared by the integration tests, the benchmark and the
//! kubelet plugin's tests: the fake sysfs tree ([`fakesys`]), the simulated
//! kernel ([`simkernel`]), the standard host's device addresses
//! ([`standard`]), a fake `/proc` ([`fakeproc`]), floods from unprivileged
//! uids ([`flood`]), a real `vfiod` process on a real Unix socket
//! ([`Daemon`]), a tree, its kernel and vfiod together ([`host::Host`]),
//! and a raw HTTP/1.1 client (raw so tests can also send what no
//! well-behaved client would).

pub mod fakeproc;
pub mod fakesys;
pub mod flood;
pub mod host;
pub mod simkernel;
pub mod standard;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fakesys::{FakeSys, TempDir};
use serde_json::Value;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {:?}", self.status, self.body))
    }

    /// The error code of an error response.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_owned()
    }

    /// The human message of an error response.
    pub fn message(&self) -> String {
        self.json()["message"].as_str().unwrap_or("").to_owned()
    }

    /// Asserts an error answer: this status, this code and some message.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(
            (self.status, self.code().as_str()),
            (status, code),
            "{}",
            self.body
        );
        assert!(!self.message().is_empty(), "no message: {}", self.body);
        self
    }

    /// Asserts that the error message mentions `needle`.
    #[track_caller]
    pub fn expect_message_contains(&self, needle: &str) -> &Self {
        assert!(
            self.message().contains(needle),
            "no {needle:?} in {}",
            self.body
        );
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn decode_chunked(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(pos) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..pos]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[pos + 2..pos + 2 + size]);
        body = &body[pos + 2 + size + 2..];
    }
}

/// Parses one HTTP/1.1 response from `raw`.
pub fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        decode_chunked(body)
    } else {
        body.to_vec()
    };
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends raw bytes on a fresh connection and reads the response to EOF.
pub fn raw_request(socket: &Path, raw: &[u8]) -> Response {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer (413) and close before taking the whole body;
    // the answer is what counts, so a failed write is not fatal.
    let _ = stream.write_all(raw);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if out.is_empty() => panic!("reading the response: {e}"),
            Err(_) => break,
        }
    }
    parse_response(&out)
}

pub fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    let body = body.unwrap_or("");
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: vfiod\r\nAuthorization: Bearer ignored\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(socket, raw.as_bytes())
}

/// The `vfiod` binary of the build the running test belongs to.
pub fn vfiod_bin() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| built_bin("vfiod"))
}

/// The `vfioctl` binary of the build the running test belongs to.
pub fn vfioctl_bin() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| built_bin("vfioctl"))
}

/// Cargo names the binaries (`CARGO_BIN_EXE_*`) only when compiling the
/// vfiod package's own tests and benchmarks, never a library such as this
/// kit; every user (vfiod's tests and benchmark, the kubelet plugin's
/// tests) finds them in the profile directory its own executable sits
/// under (`target/PROFILE/deps/..`), where cargo puts the workspace's
/// binaries before it runs a test or a benchmark.
fn built_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable under target/PROFILE/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: `cargo build --bin {name}` (cargo test --workspace builds it)",
        path.display()
    );
    path.display().to_string()
}

/// A `vfiod` process on a fake tree, killed when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub sysfs: PathBuf,
    pub devfs: PathBuf,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    /// Extra environment of the next (re)start, e.g. the crash-point
    /// variables (`vfiod::crashpoint`).
    pub env: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft, hard) to start the daemon with; None inherits.
    pub nofile: Option<(u64, u64)>,
    _dir: std::sync::Arc<TempDir>,
    dir_path: PathBuf,
}

impl Daemon {
    /// Starts vfiod on `fs` with a fresh state directory.
    pub fn start(fs: &FakeSys, extra: &[&str]) -> Daemon {
        Daemon::start_with_nofile(fs, extra, None)
    }

    /// Starts vfiod with the file descriptor limits `nofile` (soft, hard),
    /// like the ones systemd gives a service.
    pub fn start_with_nofile(fs: &FakeSys, extra: &[&str], nofile: Option<(u64, u64)>) -> Daemon {
        let dir = std::sync::Arc::new(TempDir::new("vfiod-test").unwrap());
        let dir_path = dir.path().to_owned();
        let mut d = Daemon {
            child: None,
            socket: dir_path.join("vfiod.sock"),
            state_dir: dir_path.join("state"),
            sysfs: fs.sysfs.clone(),
            devfs: fs.devfs.clone(),
            log: dir_path.join("vfiod.log"),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            nofile,
            _dir: dir,
            dir_path,
        };
        d.spawn();
        d
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn command(&self) -> Command {
        assert_ne!(
            self.sysfs,
            Path::new("/sys"),
            "tests never run vfiod against the real /sys"
        );
        let mut cmd = Command::new(vfiod_bin());
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--sysfs")
            .arg(&self.sysfs)
            .arg("--devfs")
            .arg(&self.devfs)
            .arg("--config")
            .arg("/dev/null")
            .arg("--op-timeout-ms")
            .arg("3000")
            .arg("--udev-rules-dir")
            .arg("")
            .args(&self.extra_args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env("VFIOD_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // If the test process dies (a timeout, a panic in another thread),
        // the daemon must not outlive it.
        let nofile = self.nofile;
        // SAFETY: prctl and setrlimit are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
                if let Some((soft, hard)) = nofile {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )
                    .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        cmd
    }

    /// (Re)starts the process and waits until the socket answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn vfiod");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vfiod exited early ({status}); log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "vfiod did not come up; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        request(&self.socket, method, path, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.req("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        self.req("POST", path, Some(body))
    }

    /// Registers `addr` and returns the device JSON.
    pub fn register(&self, addr: &str, name: &str) -> Value {
        let r = self.post(
            "/devices",
            &format!(r#"{{"pci_address":"{addr}","name":"{name}"}}"#),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let c = self.child.as_ref().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.terminate_wait()
    }

    /// Waits for a process already told to stop.
    pub fn terminate_wait(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "vfiod did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- vfiod log ----\n{}", self.log_text());
        }
    }
}

/// Makes `cmd` run as `uid` (primary group `uid`) with the supplementary
/// `groups`, as a local user's client would.
pub fn run_as(cmd: &mut Command, uid: u32, groups: &[u32]) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups).map_err(std::io::Error::from)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).map_err(std::io::Error::from)?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// Runs vfioctl against `socket`; returns (exit code, stdout, stderr).
pub fn vfioctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vfioctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run vfioctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `bin` with `args` and no `VFIOD_SOCKET` from the test's
/// environment; returns (exit code, stdout, stderr).
pub fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .env_remove("VFIOD_SOCKET")
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `GET /events` subscription read incrementally (chunked encoding).
pub struct EventStream {
    reader: std::io::BufReader<UnixStream>,
    pending: Vec<u8>,
}

impl EventStream {
    pub fn open(socket: &Path, query: &str) -> EventStream {
        use std::io::BufRead;
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(stream, "GET /events{query} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        EventStream {
            reader,
            pending: Vec::new(),
        }
    }

    /// The next event, waiting up to the read timeout.
    pub fn next_event(&mut self) -> Value {
        use std::io::BufRead;
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            self.pending.extend_from_slice(&chunk[..size]);
        }
    }

    /// Events until one satisfies `pred` (which is returned).
    pub fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let e = self.next_event();
            if pred(&e) {
                return e;
            }
        }
    }
}

/// Polls `f` until it returns `Some`, for up to `secs` seconds.
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The named-user entries of a device node's access ACL (none if it has
/// none): who an attachment opened it to.
pub fn acl_users(node: &std::path::Path) -> Vec<u32> {
    let Ok(acl) = posix_acl::PosixACL::read_acl(node) else {
        return Vec::new();
    };
    let mut users: Vec<u32> = acl
        .entries()
        .iter()
        .filter_map(|e| match e.qual {
            posix_acl::Qualifier::User(uid) => Some(uid),
            _ => None,
        })
        .collect();
    users.sort_unstable();
    users
}

/// The entry names of `dir`, sorted (none if it cannot be read).
pub fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_without_a_body() {
        let r = parse_response(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(r.status, 204);
        assert_eq!(r.header("Content-Length"), Some("0"));
        assert!(r.body.is_empty());
    }

    #[test]
    fn decodes_a_chunked_body() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
    }
}
