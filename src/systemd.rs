//! systemd integration: the listening socket (passed by `vfiod.socket`, or
//! bound here), readiness and status notifications, the watchdog, and
//! logging to the journal.
//!
//! When vfiod binds its own socket it takes an exclusive lock on
//! `<socket>.lock` first; holding it, a socket file left by a crashed
//! daemon can be removed safely, while a live daemon (which holds the lock)
//! is never displaced.

use std::fs::{self, File};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::Flock;
use sd_notify::NotifyState;
use tokio::net::UnixListener;

use crate::path_error::PathError;

/// Mode of a socket vfiod binds itself: anyone may connect (reads are
/// open); the API checks peer credentials before any change.
pub const SOCKET_MODE: u32 = 0o666;

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Creating, binding or chmodding the socket failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// Another vfiod holds the socket's lock; removing its socket would cut it
    /// off.
    #[error("another vfiod is already serving {0} (its lock is held)")]
    InUse(PathBuf),
    /// The fd systemd passed is not a listening Unix stream socket (a unit file
    /// mistake).
    #[error("systemd passed a socket that is not a listening Unix socket: {0}")]
    BadPassedSocket(io::Error),
}

/// Keeps a self-bound socket's lock, and removes the socket file when
/// dropped; empty for a socket systemd passed.
pub struct SocketGuard {
    /// The socket came from systemd: vfiod neither locks nor removes it.
    pub activated: bool,
    _lock: Option<Flock<File>>,
    path: Option<PathBuf>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// Takes the socket systemd passed, if any (LISTEN_FDS), else binds
/// `path` with [`SOCKET_MODE`] and group `gid`.
pub fn listen(path: &Path, gid: Option<u32>) -> Result<(UnixListener, SocketGuard), SocketError> {
    let passed: Vec<i32> = sd_notify::listen_fds()
        .map(|fds| fds.collect())
        .unwrap_or_default();
    // Children (modprobe) must not see them.
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDNAMES");
    if let Some(&fd) = passed.first() {
        // SAFETY: systemd hands us fd 3 (SD_LISTEN_FDS_START) for this
        // process only, checked through LISTEN_PID above; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let std_listener = std::os::unix::net::UnixListener::from(owned);
        std_listener
            .set_nonblocking(true)
            .map_err(SocketError::BadPassedSocket)?;
        let listener =
            UnixListener::from_std(std_listener).map_err(SocketError::BadPassedSocket)?;
        return Ok((
            listener,
            SocketGuard {
                activated: true,
                _lock: None,
                path: None,
            },
        ));
    }
    bind_own(path, gid)
}

fn bind_own(path: &Path, gid: Option<u32>) -> Result<(UnixListener, SocketGuard), SocketError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(PathError::at("create directory", parent))?;
    }
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = crate::lockfile::try_lock(&lock_path)
        .map_err(PathError::at("lock", &lock_path))?
        .ok_or_else(|| SocketError::InUse(path.to_owned()))?;
    // We hold the lock, so whatever is at `path` belongs to no live vfiod.
    match fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(SocketError::Io(PathError {
                    op: "replace",
                    path: path.to_owned(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "exists and is not a socket; refusing to remove it",
                    ),
                }));
            }
            tracing::info!(path = %path.display(), "removing a stale socket");
            fs::remove_file(path).map_err(PathError::at("remove stale socket", path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PathError::at("stat", path)(e).into()),
    }
    let listener = UnixListener::bind(path).map_err(PathError::at("bind", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(PathError::at("chmod", path))?;
    if let Some(gid) = gid {
        if let Err(e) = nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))) {
            // Not fatal: the mode already lets everyone connect, and the
            // API checks the caller's groups itself.
            tracing::warn!(path = %path.display(), gid, error = %e, "could not set the socket's group");
        }
    }
    Ok((
        listener,
        SocketGuard {
            activated: false,
            _lock: Some(lock),
            path: Some(path.to_owned()),
        },
    ))
}

/// Notifications to systemd; all no-ops outside systemd.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Tells systemd shutdown has begun, so it waits instead of declaring a hang.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// One watchdog ping; see [`watchdog_interval`] for how often.
pub fn notify_watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half its interval, if enabled.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// True when stderr is connected to the journal (systemd sets
/// JOURNAL_STREAM to its device and inode).
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Logs the error that ends the process. Under systemd it goes through
/// stderr with a syslog priority prefix rather than the native journal
/// socket: journald attributes a native entry to its unit by reading
/// `/proc/<pid>` when it gets to the datagram, and a process that has already
/// exited by then leaves an entry `journalctl -u vfiod` does not show. A
/// stream carries its unit from the moment it was connected.
pub fn log_fatal(message: &str) {
    if stderr_is_journal() {
        // One entry: a newline would start an entry without the prefix.
        eprintln!("<3>{}", message.replace('\n', " "));
    } else {
        tracing::error!("{message}");
    }
}

/// Structured logs: to the journal under systemd (one entry per event with
/// fields), else one line per event on stderr.
pub fn init_logging(level: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VFIOD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("vfiod={level},{level}")));
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("vfiod".into()))
                .init();
            return;
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}
