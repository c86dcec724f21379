//! Kernel consumers: the function's disks and interfaces in use by the
//! kernel itself, with no process holding a node. Nothing in a process's
//! descriptors shows them; the system's tables do.
//!
//! - A block device of the function, or one of its partitions, that is
//!   mounted (`<proc>/1/mountinfo`, else `<proc>/self/mountinfo`, matched on
//!   `major:minor`, or on a `/dev/NAME` mount source for filesystems such as
//!   btrfs that report an anonymous device number), used as swap
//!   (`<proc>/swaps`: the path's device number, or its `/dev/NAME`), or with
//!   entries in its sysfs `holders/` (md, dm, LVM). With NVMe multipath the
//!   function's disk is the hidden path device `nvmeXcYnZ`; the disk that is
//!   mounted is the head `nvmeXnZ`, found as the `class/block/*` disk whose
//!   `multipath/` names the path device (Linux 6.14 and later), or else in
//!   the `class/nvme-subsystem/*` that links to the function's controller;
//!   its partitions count too (both found in [`super::nodes`]).
//! - A network interface of the function (`net/IFNAME` below it) that is up
//!   (`flags` has IFF_UP) with an address other than IPv6 link-local
//!   (`<proc>/net/if_inet6`), or that carries a route (`<proc>/net/route`,
//!   `<proc>/net/ipv6_route` without link-local, multicast and local
//!   entries). IPv4 addresses are not listed in `/proc`; an IPv4 address
//!   shows through the prefix route the kernel adds for it.
//! - A framebuffer console: the function has a framebuffer and a
//!   `class/vtconsole/vtconN` whose `name` contains "frame buffer" is bound
//!   (`bind` is 1). Not a refusal: [`Holder::vtconsole_bind_path`] is the
//!   file the caller writes 0 to before the move and 1 after giving the
//!   device back.
//!
//! Each table is read only when some function has a device of its kind,
//! and once for all of them.
//!
//! # Limits
//!
//! - Network interfaces moved into another network namespace are not in
//!   our view of sysfs, and `/proc/net` is our namespace's.
//! - With several framebuffers the kernel does not say (in sysfs) which one
//!   carries the console; any bound fbcon counts for every function with a
//!   framebuffer. Boot framebuffers (efifb, simplefb, vesafb) belong to a
//!   platform device, not to the PCI function, and are not found.
//! - A multi-device btrfs shows only one of its devices in `mountinfo`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use super::nodes::{node_of, parse_dev, FunctionNodes, NodeKind};
use super::{Holder, HolderScanError, ProcFs};
use crate::path_error::PathError;
use crate::pci::sysfs::parse_hex;
use crate::pci::{PciAddress, Sysfs};

fn read_optional(path: &Path) -> Result<Option<String>, HolderScanError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError {
            op: "read",
            path: path.to_owned(),
            source: e,
        }),
    }
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

pub(super) fn kernel_consumers(
    sysfs: &Sysfs,
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    if functions.iter().any(|f| !f.blocks.is_empty()) {
        storage_consumers(proc, functions, out)?;
    }
    if functions.iter().any(|f| !f.nets.is_empty()) {
        net_consumers(proc, functions, out)?;
    }
    if functions.iter().any(|f| !f.framebuffers.is_empty()) {
        console_consumers(sysfs, functions, out);
    }
    Ok(())
}

fn storage_consumers(
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    // Block device number or `/dev/NAME` → (function, device name).
    let mut by_rdev: HashMap<u64, (PciAddress, &str)> = HashMap::new();
    let mut by_name: HashMap<&str, PciAddress> = HashMap::new();
    for f in functions {
        for b in &f.blocks {
            if let Some((NodeKind::Block, rdev)) = b.node {
                by_rdev.insert(rdev, (f.addr, &b.name));
            }
            by_name.insert(&b.name, f.addr);
            let holders = fs::read_dir(b.dir.join("holders"))
                .map(|d| d.flatten().collect::<Vec<_>>())
                .unwrap_or_default();
            for h in holders {
                out.push(Holder::BlockStack {
                    pci_address: f.addr,
                    device: b.name.clone(),
                    holder: h.file_name().to_string_lossy().into_owned(),
                });
            }
        }
    }
    let by_dev_path = |source: &str| {
        let name = source.strip_prefix("/dev/")?;
        by_name.get_key_value(name).map(|(n, a)| (*a, *n))
    };

    // The init process's mount namespace is the host's; ours may be a
    // private one (ProtectSystem= and friends give the unit its own).
    let mountinfo_paths = [
        proc.root().join("1/mountinfo"),
        proc.root().join("self/mountinfo"),
    ];
    let mut mountinfo = None;
    let mut last_error = None;
    for path in &mountinfo_paths {
        match fs::read_to_string(path) {
            Ok(text) => {
                mountinfo = Some(text);
                break;
            }
            Err(e) => last_error = Some((path.clone(), e)),
        }
    }
    let Some(mountinfo) = mountinfo else {
        let (path, source) = last_error.expect("two paths were tried");
        return Err(PathError {
            op: "read",
            path,
            source,
        });
    };
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let mut right = right.split(' ');
        let (Some(fstype), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        if fields.len() < 5 {
            continue;
        }
        let source = unescape_octal(source);
        let found = parse_dev(fields[2])
            .and_then(|rdev| by_rdev.get(&rdev).copied())
            .or_else(|| by_dev_path(&source));
        if let Some((addr, device)) = found {
            out.push(Holder::Mount {
                pci_address: addr,
                device: device.to_owned(),
                mount_point: unescape_octal(fields[4]),
                fstype: fstype.to_owned(),
            });
        }
    }

    let swaps_path = proc.root().join("swaps");
    let swaps = read_optional(&swaps_path)?.unwrap_or_default();
    for line in swaps.lines().skip(1) {
        let Some(field) = line.split_whitespace().next() else {
            continue;
        };
        let path = unescape_octal(field);
        let found = fs::metadata(&path)
            .ok()
            .as_ref()
            .and_then(node_of)
            .and_then(|(kind, rdev)| (kind == NodeKind::Block).then_some(rdev))
            .and_then(|rdev| by_rdev.get(&rdev).copied())
            .or_else(|| by_dev_path(&path));
        if let Some((addr, device)) = found {
            out.push(Holder::Swap {
                pci_address: addr,
                device: device.to_owned(),
            });
        }
    }
    Ok(())
}

const IFF_UP: u32 = 0x1;
const RTF_LOCAL: u32 = 0x8000_0000;

/// An IPv6 address as `/proc/net` writes it: 32 hex digits.
fn ipv6_from_hex(hex: &str) -> Option<std::net::Ipv6Addr> {
    u128::from_str_radix(hex, 16)
        .ok()
        .filter(|_| hex.len() == 32)
        .map(std::net::Ipv6Addr::from)
}

fn is_link_local_or_multicast(addr: &std::net::Ipv6Addr) -> bool {
    let first = addr.segments()[0];
    first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00
}

fn net_consumers(
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    let net = proc.root().join("net");
    // Each file is missing when its protocol is not built in (IPv6
    // disabled): that is "no addresses, no routes", not an error.
    let if_inet6 = read_optional(&net.join("if_inet6"))?.unwrap_or_default();
    let route = read_optional(&net.join("route"))?.unwrap_or_default();
    let ipv6_route = read_optional(&net.join("ipv6_route"))?.unwrap_or_default();

    for f in functions {
        for nic in &f.nets {
            let name = nic.name.as_str();
            let up = fs::read_to_string(nic.dir.join("flags"))
                .ok()
                .and_then(|t| parse_hex(&t))
                .is_some_and(|flags| flags & IFF_UP != 0);
            let addresses: Vec<String> = if_inet6
                .lines()
                .filter_map(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    (fields.len() == 6 && fields[5] == name).then(|| ipv6_from_hex(fields[0]))?
                })
                .filter(|a| !is_link_local_or_multicast(a))
                .map(|a| a.to_string())
                .collect();
            let v4_routes = route
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().next() == Some(name))
                .count();
            let v6_routes = ipv6_route
                .lines()
                .filter(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    fields.len() == 10
                        && fields[9] == name
                        && parse_hex(fields[8]).is_some_and(|flags| flags & RTF_LOCAL == 0)
                        && ipv6_from_hex(fields[0]).is_some_and(|d| !is_link_local_or_multicast(&d))
                })
                .count();
            let routes = u32::try_from(v4_routes + v6_routes).unwrap_or(u32::MAX);
            if (up && !addresses.is_empty()) || routes > 0 {
                out.push(Holder::NetInterface {
                    pci_address: f.addr,
                    interface: name.to_owned(),
                    addresses,
                    routes,
                });
            }
        }
    }
    Ok(())
}

fn console_consumers(sysfs: &Sysfs, functions: &[FunctionNodes], out: &mut Vec<Holder>) {
    let Ok(entries) = fs::read_dir(sysfs.root().join("class/vtconsole")) else {
        return;
    };
    let mut bound_fbcons: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let dir = e.path();
            let description = fs::read_to_string(dir.join("name")).ok()?;
            let bound = fs::read_to_string(dir.join("bind")).ok()?;
            (description.contains("frame buffer") && bound.trim() == "1").then_some(name)
        })
        .collect();
    bound_fbcons.sort();
    for f in functions {
        for vtconsole in &bound_fbcons {
            for framebuffer in &f.framebuffers {
                out.push(Holder::FramebufferConsole {
                    pci_address: f.addr,
                    vtconsole: vtconsole.clone(),
                    framebuffer: framebuffer.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape_octal("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape_octal("/a\\134b"), "/a\\b");
        assert_eq!(unescape_octal("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }

    #[test]
    fn link_local_and_multicast_are_not_addresses() {
        let ll = ipv6_from_hex("fe800000000000000000000000000001").unwrap();
        let mc = ipv6_from_hex("ff020000000000000000000000000001").unwrap();
        let global = ipv6_from_hex("20010db8000000000000000000000001").unwrap();
        assert!(is_link_local_or_multicast(&ll));
        assert!(is_link_local_or_multicast(&mc));
        assert!(!is_link_local_or_multicast(&global));
        assert_eq!(global.to_string(), "2001:db8::1");
    }
}
