//! The hotplug watcher: PCI uevents from the kernel, as typed
//! [`HotplugEvent`]s on the channel the core consumes.
//!
//! The udev monitor (netlink group "udev", events after udevd processed
//! them) is the default. It carries nothing when no udevd runs, silently,
//! so without `/run/udev/control` vfiod listens to the kernel group
//! instead and says so. The monitor lives on its own thread, blocking in
//! `poll(2)` there, never on the async runtime.
//!
//! On a fake sysfs tree the host's uevents describe other devices, so the
//! watcher is off; tests feed events through a FIFO instead (`--uevent-fifo`),
//! one `ACTION ADDRESS [DRIVER]` line each, into the same channel.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::core::HotplugEvent;
use crate::pci::PciAddress;

/// Which source the watcher ended up on; shown in `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// udevd's netlink group: events after udev has processed them.
    Udev,
    /// The kernel's own uevents, when no udevd runs (containers, early boot).
    Kernel,
    /// Test hook: uevents read from a FIFO, one per line.
    Fifo(PathBuf),
    /// No watcher: a fake sysfs has no kernel behind it.
    Off,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Udev => f.write_str("udev"),
            Source::Kernel => f.write_str("kernel (no udevd running)"),
            Source::Fifo(p) => write!(f, "fifo {}", p.display()),
            Source::Off => f.write_str("off (fake sysfs)"),
        }
    }
}

/// Parses one uevent's essentials into an event.
pub fn parse_uevent(action: &str, sysname: &str, driver: Option<&str>) -> Option<HotplugEvent> {
    let address: PciAddress = sysname.parse().ok()?;
    Some(match action {
        "add" => HotplugEvent::Add(address),
        "remove" => HotplugEvent::Remove(address),
        "bind" => HotplugEvent::Bind {
            address,
            driver: driver.map(str::to_owned),
        },
        "unbind" => HotplugEvent::Unbind(address),
        "change" => HotplugEvent::Change(address),
        _ => return None,
    })
}

/// Starts the watcher; returns once it is subscribed, so that a scan after
/// this call misses nothing.
pub fn start(
    real_sysfs: bool,
    fifo: Option<&Path>,
    tx: mpsc::Sender<HotplugEvent>,
) -> std::io::Result<Source> {
    if let Some(path) = fifo {
        let path = path.to_owned();
        if !path.exists() {
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        }
        let source = Source::Fifo(path.clone());
        std::thread::Builder::new()
            .name("uevent-fifo".into())
            .spawn(move || read_fifo(&path, tx))?;
        return Ok(source);
    }
    if !real_sysfs {
        return Ok(Source::Off);
    }
    let udevd_running = Path::new("/run/udev/control").exists();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("udev-monitor".into())
        .spawn(move || {
            let builder = if udevd_running {
                udev::MonitorBuilder::new()
            } else {
                udev::MonitorBuilder::new_kernel()
            };
            let socket = builder
                .and_then(|b| b.match_subsystem("pci"))
                .and_then(|b| b.listen());
            match socket {
                Ok(socket) => {
                    let _ = ready_tx.send(Ok(()));
                    watch(socket, tx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("udev monitor thread died")))?;
    Ok(if udevd_running {
        Source::Udev
    } else {
        Source::Kernel
    })
}

fn watch(socket: udev::MonitorSocket, tx: mpsc::Sender<HotplugEvent>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let raw = socket.as_raw_fd();
    loop {
        // SAFETY: `socket` owns the fd and outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(0) => {
                if tx.is_closed() {
                    return;
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "polling the udev monitor failed; hotplug is no longer followed");
                return;
            }
        }
        for event in socket.iter() {
            let device = event.device();
            if device.subsystem().and_then(|s| s.to_str()) != Some("pci") {
                continue;
            }
            let action = device.action().and_then(|a| a.to_str()).unwrap_or("");
            let sysname = device.sysname().to_string_lossy().into_owned();
            let driver = device.driver().map(|d| d.to_string_lossy().into_owned());
            tracing::debug!(action, device = %sysname, driver = ?driver, "uevent");
            if let Some(ev) = parse_uevent(action, &sysname, driver.as_deref()) {
                if tx.blocking_send(ev).is_err() {
                    return;
                }
            }
        }
    }
}

fn read_fifo(path: &Path, tx: mpsc::Sender<HotplugEvent>) {
    loop {
        // Reopen after each writer goes away, like a long-lived netlink socket.
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open the uevent FIFO");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            let (Some(action), Some(addr)) = (words.next(), words.next()) else {
                continue;
            };
            match parse_uevent(action, addr, words.next()) {
                Some(ev) => {
                    if tx.blocking_send(ev).is_err() {
                        return;
                    }
                }
                None => tracing::warn!(line, "ignoring a malformed line on the uevent FIFO"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_pci_actions_and_ignores_others() {
        let a: PciAddress = "0000:01:00.0".parse().unwrap();
        assert_eq!(
            parse_uevent("add", "0000:01:00.0", None),
            Some(HotplugEvent::Add(a))
        );
        assert_eq!(
            parse_uevent("bind", "0000:01:00.0", Some("vfio-pci")),
            Some(HotplugEvent::Bind {
                address: a,
                driver: Some("vfio-pci".into())
            })
        );
        assert_eq!(
            parse_uevent("remove", "0000:01:00.0", None),
            Some(HotplugEvent::Remove(a))
        );
        assert_eq!(parse_uevent("online", "0000:01:00.0", None), None);
        assert_eq!(parse_uevent("add", "pci0000:00", None), None);
    }
}
