//! nginx from Debian as the benchmark's ceiling: the static file server a
//! user already trusts, serving vfiod's own answers as files over the same
//! kind of Unix socket.
//!
//! The benchmark installs it when it is missing (`apt-get install nginx`,
//! as root); when that cannot be done it says why and goes on without it.
//! Its instance is the benchmark's own: a configuration in a temporary
//! directory, `daemon off`, stopped when dropped. Installing the package
//! may also enable Debian's own nginx service (port 80); the benchmark
//! never talks to that one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Finds nginx, installing Debian's package if it is missing.
pub fn ensure_installed() -> Result<PathBuf, String> {
    if let Some(found) = find() {
        return Ok(found);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "nginx is not installed and installing it needs root: `sudo apt-get install -y nginx`"
                .into(),
        );
    }
    if find_in_path("apt-get").is_none() {
        return Err("nginx is not installed and this machine has no apt-get".into());
    }
    println!("  nginx is not installed: installing Debian's package (apt-get install nginx)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    let mut result = install();
    if !matches!(&result, Ok(o) if o.status.success()) {
        // A fresh machine may not have read the package lists yet.
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        result = install();
    }
    match result {
        Ok(o) if o.status.success() => find().ok_or_else(|| {
            "apt-get installed nginx but no nginx binary is in /usr/sbin or on PATH".into()
        }),
        Ok(o) => Err(format!(
            "apt-get install nginx failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("could not run apt-get: {e}")),
    }
}

fn find() -> Option<PathBuf> {
    let sbin = Path::new("/usr/sbin/nginx");
    if sbin.exists() {
        return Some(sbin.to_owned());
    }
    find_in_path("nginx")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// One nginx master with `workers` worker processes serving `root` on the
/// Unix socket `socket`, as configured by a user who tuned it for this:
/// keep-alive without a request limit, no access log, and `sendfile` on as
/// in Debian's own `nginx.conf`.
pub struct Nginx {
    child: Child,
    pub socket: PathBuf,
}

impl Nginx {
    pub fn start(binary: &Path, dir: &Path, root: &Path, workers: usize) -> Result<Nginx, String> {
        let socket = dir.join("nginx.sock");
        let conf = dir.join("nginx.conf");
        // Workers switch to `user`; as root, keep root so they can read
        // the benchmark's temporary files.
        let user = if nix::unistd::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "{user}
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    types {{ text/plain txt; }}
    default_type application/json;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen unix:{socket};
        root {root};
    }}
}}
",
                socket = socket.display(),
                root = root.display(),
            ),
        )
        .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let mut nginx = Nginx { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&nginx.socket).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited at startup ({status}): {log}"));
            }
            if Instant::now() > deadline {
                return Err("nginx did not open its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(nginx)
    }
}

impl Nginx {
    /// The master and its workers (the processes that serve).
    pub fn pids(&self) -> Vec<i32> {
        let master = self.child.id() as i32;
        let mut pids = vec![master];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers at once and exits (a
        // SIGKILL would leave the workers behind).
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
