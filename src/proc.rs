//! `/proc`: the one module that knows its file formats.
//!
//! vfiod reads `/proc` for three things: the holder scan
//! ([`crate::pci::holders`]: which processes have a PCI function's nodes
//! open or mapped, which of its disks are mounted or swapped on, which of
//! its interfaces carry addresses or routes), the process an attachment
//! follows (its real uid and start time, so that a reused pid is never
//! taken for the VMM), and the agent itself (its capabilities at startup,
//! the `process_*` metrics). Each of them used to parse what it read on
//! its own, and the same `Uid:` line had two parsers. Here every format is
//! a function over the text (or over the few files it takes), and the
//! others only decide what the values mean to them.
//!
//! Two ways of reading, on purpose:
//! - Other processes and the system tables are read under a [`ProcFs`]
//!   root, which tests point at a fake tree (`--proc`). They are parsed by
//!   hand: the `procfs` crate's parsers want every field of a real kernel
//!   (its `status` needs `Tgid`, `FDSize`, `SigQ` and more) and the fake
//!   trees write only what vfiod reads; and the holder scan reads each
//!   process relative to its own directory descriptor, for speed (see its
//!   module), handing the text to these functions.
//! - The agent's own `/proc/self` is always the real one: there the
//!   `procfs` crate does the parsing ([`own_usage`],
//!   [`own_effective_capabilities`]).

use std::fs;
use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use crate::path_error::PathError;
use crate::pci::sysfs::parse_device_number;

/// The `/proc` filesystem (or a fake tree with the same layout).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    /// `root` stands for `/proc`; tests pass a fake tree.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    /// The tree standing for `/proc`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file `relative` under the root; `None` when it does not exist
    /// (a protocol not built into the kernel, no swap configured), an
    /// error for any other failure.
    pub fn read_optional(&self, relative: &str) -> Result<Option<String>, PathError> {
        let path = self.root.join(relative);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PathError {
                op: "read",
                path,
                source: e,
            }),
        }
    }

    /// The host's mount table: the init process's `mountinfo`, else our
    /// own. The init process's mount namespace is the host's; ours may be
    /// a private one (ProtectSystem= and friends give the unit its own).
    pub fn host_mountinfo(&self) -> Result<String, PathError> {
        let mut last_error = None;
        for path in [
            self.root.join("1/mountinfo"),
            self.root.join("self/mountinfo"),
        ] {
            match fs::read_to_string(&path) {
                Ok(text) => return Ok(text),
                Err(e) => last_error = Some((path, e)),
            }
        }
        let (path, source) = last_error.expect("two paths were tried");
        Err(PathError {
            op: "read",
            path,
            source,
        })
    }

    /// The minor number of the NVIDIA driver's node for the GPU at
    /// `address` (`/dev/nvidiaN`), from the driver's `information` file.
    pub fn nvidia_device_minor(&self, address: &str) -> Option<u64> {
        let info = fs::read_to_string(
            self.root
                .join("driver/nvidia/gpus")
                .join(address)
                .join("information"),
        )
        .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Device Minor:"))?
            .trim()
            .parse()
            .ok()
    }

    /// The real uid and start time of `pid`, or `None` if there is no
    /// such process.
    pub fn process_identity(&self, pid: u32) -> Option<ProcessIdentity> {
        let dir = self.root.join(pid.to_string());
        let status = fs::read_to_string(dir.join("status")).ok()?;
        let uid = real_uid(&status)?;
        let stat = fs::read_to_string(dir.join("stat")).ok()?;
        let (state, start_time) = state_and_start_time(&stat)?;
        Some(ProcessIdentity {
            uid,
            start_time,
            zombie: matches!(state, "Z" | "X"),
        })
    }
}

/// What `/proc/PID` says about a process vfiod may follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The real uid (first field of `Uid:` in `status`).
    pub uid: u32,
    /// Clock ticks since boot (field 22 of `stat`).
    pub start_time: u64,
    /// Exited, and only waiting for its parent to reap it.
    pub zombie: bool,
}

/// The real uid, the first of the `Uid:` line of `status`.
pub fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The state letter and the start time (field 22) of a `stat` line.
/// Fields are counted after the command name, which may itself hold
/// spaces and parentheses: the split is after the last ')'.
fn state_and_start_time(stat: &str) -> Option<(&str, u64)> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// A process's name as `comm` gives it (without the newline).
pub fn comm(text: &str) -> &str {
    text.trim_end_matches('\n')
}

/// The systemd unit a process runs in, from its `cgroup` file: the last
/// `.service` or `.scope` component of its cgroup path (the unified
/// hierarchy's, else systemd's named v1 hierarchy's).
pub fn systemd_unit(cgroup: &str) -> Option<String> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            cgroup
                .lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })?;
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// The `vfio-device-syspath:` of a VFIO device descriptor's `fdinfo`
/// (kernels 6.18 and later name the device there): the device's sysfs
/// path, or `None` when the kernel does not say.
pub fn fdinfo_vfio_device_syspath(fdinfo: &str) -> Option<&str> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("vfio-device-syspath:"))
        .map(str::trim)
}

/// The mapped paths in `maps` that start with `prefix`, from there to
/// the end of the line. The path is a line's last field: a match must
/// start it, not sit inside some other path that happens to contain it.
/// Searched as bytes: `maps` of a big process is long and read for every
/// process.
pub fn mapped_paths_with_prefix<'a>(
    maps: &'a [u8],
    prefix: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let anywhere = memchr::memmem::find(maps, prefix).is_some();
    maps.split(|b| *b == b'\n')
        .take_while(move |_| anywhere)
        .filter_map(move |line| {
            let at = memchr::memmem::find(line, prefix)?;
            (at > 0 && line[at - 1] == b' ').then(|| &line[at..])
        })
}

/// One line of `mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount<'a> {
    /// `major:minor` of the mounted filesystem (an anonymous number for
    /// btrfs and others that span devices).
    pub device_number: Option<u64>,
    /// Where it is mounted, with mountinfo's octal escapes (`\040`) undone.
    pub mount_point: String,
    /// The filesystem type.
    pub fstype: &'a str,
    /// The mount source, e.g. `/dev/nvme0n1p2`.
    pub source: String,
}

/// The mounts of a `mountinfo` text; malformed lines are skipped.
pub fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        let mut right = right.split(' ');
        let (Some(fstype), Some(source)) = (right.next(), right.next()) else {
            return None;
        };
        if fields.len() < 5 {
            return None;
        }
        Some(Mount {
            device_number: parse_device_number(fields[2]),
            mount_point: unescape_octal(fields[4]),
            fstype,
            source: unescape_octal(source),
        })
    })
}

/// The paths in use as swap, from `swaps` (its first line is a header).
pub fn swap_paths(swaps: &str) -> impl Iterator<Item = String> + '_ {
    swaps
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape_octal)
}

/// `\040` and friends: how `mountinfo` and `swaps` escape spaces, tabs,
/// newlines and backslashes in paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                u8::try_from(value).ok()
            });
        match escape {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The IPv6 addresses of `net/if_inet6`, each with its interface.
/// (IPv4 addresses are not listed anywhere in `/proc`.)
pub fn ipv6_addresses(if_inet6: &str) -> impl Iterator<Item = (&str, Ipv6Addr)> {
    if_inet6.lines().filter_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        if fields.len() != 6 {
            return None;
        }
        Some((fields[5], ipv6_from_hex(fields[0])?))
    })
}

/// The interface of each IPv4 route of `net/route` (its first line is a
/// header).
pub fn ipv4_route_interfaces(route: &str) -> impl Iterator<Item = &str> {
    route
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
}

/// One route of `net/ipv6_route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Route<'a> {
    /// The route's destination prefix.
    pub destination: Ipv6Addr,
    /// `RTF_*` flags.
    pub flags: u32,
    /// The device the route goes out of.
    pub interface: &'a str,
}

/// A local route (`RTF_LOCAL`): the kernel's own entry for an address of
/// this host, not a route anyone set up.
pub const RTF_LOCAL: u32 = 0x8000_0000;

/// The routes of `net/ipv6_route`; malformed lines are skipped.
pub fn ipv6_routes(ipv6_route: &str) -> impl Iterator<Item = Ipv6Route<'_>> {
    ipv6_route.lines().filter_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        if fields.len() != 10 {
            return None;
        }
        Some(Ipv6Route {
            destination: ipv6_from_hex(fields[0])?,
            flags: u32::from_str_radix(fields[8].trim_start_matches("0x"), 16).ok()?,
            interface: fields[9],
        })
    })
}

/// An IPv6 address as `/proc/net` writes it: 32 hex digits.
fn ipv6_from_hex(hex: &str) -> Option<Ipv6Addr> {
    u128::from_str_radix(hex, 16)
        .ok()
        .filter(|_| hex.len() == 32)
        .map(Ipv6Addr::from)
}

/// What `/proc/self` says about the agent's use of the machine, for the
/// `process_*` metrics. A part the kernel would not give is `None`.
#[derive(Debug, Clone, Default)]
pub struct OwnUsage {
    /// `None` when `/proc/self/stat` could not be read.
    pub stat: Option<OwnStat>,
    /// Entries of `/proc/self/fd`; `None` when it could not be listed.
    pub open_fds: Option<usize>,
    /// The soft limit on open descriptors, when there is one.
    pub max_open_files: Option<u64>,
}

/// The agent's `stat`, in units a reader needs no page size or clock
/// tick rate for.
#[derive(Debug, Clone, Copy)]
pub struct OwnStat {
    /// User and system CPU time.
    pub cpu_seconds: f64,
    /// Resident set size, from pages times the page size.
    pub resident_bytes: u64,
    /// Virtual memory size.
    pub virtual_bytes: u64,
    /// When the agent started, in seconds after boot.
    pub started_after_boot_seconds: f64,
}

/// The agent's own usage; `None` when `/proc/self` cannot be read at all.
pub fn own_usage() -> Option<OwnUsage> {
    let me = procfs::process::Process::myself().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let stat = me.stat().ok().map(|stat| OwnStat {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        resident_bytes: stat.rss * procfs::page_size(),
        virtual_bytes: stat.vsize,
        started_after_boot_seconds: stat.starttime as f64 / ticks,
    });
    let max_open_files =
        me.limits()
            .ok()
            .and_then(|limits| match limits.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(max) => Some(max),
                procfs::process::LimitValue::Unlimited => None,
            });
    Some(OwnUsage {
        stat,
        open_fds: me.fd_count().ok(),
        max_open_files,
    })
}

/// The agent's effective capability set (`CapEff` of its `status`), one
/// bit per `CAP_*` number; `None` when it cannot be read.
pub fn own_effective_capabilities() -> Option<u64> {
    procfs::process::Process::myself()
        .and_then(|me| me.status())
        .ok()
        .map(|status| status.capeff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_the_last_service_or_scope_component() {
        assert_eq!(
            systemd_unit("0::/system.slice/nvidia-persistenced.service\n").as_deref(),
            Some("nvidia-persistenced.service")
        );
        assert_eq!(
            systemd_unit(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.scope\n"
            )
            .as_deref(),
            Some("app-x.scope")
        );
        assert_eq!(
            systemd_unit("12:cpu:/x\n1:name=systemd:/system.slice/dcgm.service/sub\n").as_deref(),
            Some("dcgm.service")
        );
        assert_eq!(systemd_unit("0::/init.scope-not\n"), None);
        assert_eq!(systemd_unit("0::/\n"), None);
    }

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape_octal("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape_octal("/a\\134b"), "/a\\b");
        assert_eq!(unescape_octal("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }

    #[test]
    fn fdinfo_names_the_device_by_its_syspath() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nvfio-device-syspath: /sys/devices/pci0000:00/0000:00:02.0\n";
        assert_eq!(
            fdinfo_vfio_device_syspath(text),
            Some("/sys/devices/pci0000:00/0000:00:02.0")
        );
        assert_eq!(fdinfo_vfio_device_syspath("pos:\t0\n"), None);
    }

    #[test]
    fn ipv6_addresses_are_32_hex_digits() {
        let global = ipv6_from_hex("20010db8000000000000000000000001").unwrap();
        assert_eq!(global.to_string(), "2001:db8::1");
        assert_eq!(ipv6_from_hex("20010db8"), None);
        let if_inet6 = "20010db8000000000000000000000042 02 40 00 80    enp0s2\nbad line\n";
        assert_eq!(
            ipv6_addresses(if_inet6).collect::<Vec<_>>(),
            vec![("enp0s2", "2001:db8::42".parse().unwrap())]
        );
    }

    #[test]
    fn status_stat_and_mountinfo_fields() {
        assert_eq!(real_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(1000));
        assert_eq!(real_uid("Name:\tx\n"), None);
        // A command name with spaces and a ')' does not shift the fields.
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(state_and_start_time(stat), Some(("S", 98765)));
        let mountinfo =
            "36 35 259:2 / /mnt/my\\040disk rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
                         garbage\n";
        let all: Vec<Mount> = mounts(mountinfo).collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].mount_point, "/mnt/my disk");
        assert_eq!(all[0].fstype, "ext4");
        assert_eq!(all[0].source, "/dev/nvme0n1p2");
        assert_eq!(all[0].device_number, Some(nix::sys::stat::makedev(259, 2)));
    }

    #[test]
    fn a_mapped_path_must_start_its_field() {
        let maps = b"7f00-7f01 rw-s 0 00:05 1 /sys/devices/x/resource0\n\
                     7f02-7f03 rw-s 0 00:05 1 /other/sys/devices/x/resource0\n";
        let found: Vec<&[u8]> =
            mapped_paths_with_prefix(maps, b"/sys/devices/x/resource").collect();
        assert_eq!(found, vec![&b"/sys/devices/x/resource0"[..]]);
        assert_eq!(mapped_paths_with_prefix(maps, b"/nope").count(), 0);
    }
}
