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
use std::net::Ipv6Addr;

use super::nodes::{node_of, FunctionNodes, NodeKind};
use super::{Holder, HolderScanError};
use crate::pci::sysfs::parse_hex;
use crate::pci::{PciAddress, Sysfs};
use crate::proc::{self, ProcFs, RTF_LOCAL};

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

    for mount in proc::mounts(&proc.host_mountinfo()?) {
        let found = mount
            .device_number
            .and_then(|rdev| by_rdev.get(&rdev).copied())
            .or_else(|| by_dev_path(&mount.source));
        if let Some((addr, device)) = found {
            out.push(Holder::Mount {
                pci_address: addr,
                device: device.to_owned(),
                mount_point: mount.mount_point,
                fstype: mount.fstype.to_owned(),
            });
        }
    }

    let swaps = proc.read_optional("swaps")?.unwrap_or_default();
    for path in proc::swap_paths(&swaps) {
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

fn is_link_local_or_multicast(addr: &Ipv6Addr) -> bool {
    let first = addr.segments()[0];
    first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00
}

fn net_consumers(
    proc: &ProcFs,
    functions: &[FunctionNodes],
    out: &mut Vec<Holder>,
) -> Result<(), HolderScanError> {
    // Each file is missing when its protocol is not built in (IPv6
    // disabled): that is "no addresses, no routes", not an error.
    let if_inet6 = proc.read_optional("net/if_inet6")?.unwrap_or_default();
    let route = proc.read_optional("net/route")?.unwrap_or_default();
    let ipv6_route = proc.read_optional("net/ipv6_route")?.unwrap_or_default();

    for f in functions {
        for nic in &f.nets {
            let name = nic.name.as_str();
            let up = fs::read_to_string(nic.dir.join("flags"))
                .ok()
                .and_then(|t| parse_hex(&t))
                .is_some_and(|flags| flags & IFF_UP != 0);
            let addresses: Vec<String> = proc::ipv6_addresses(&if_inet6)
                .filter(|(interface, a)| *interface == name && !is_link_local_or_multicast(a))
                .map(|(_, a)| a.to_string())
                .collect();
            let v4_routes = proc::ipv4_route_interfaces(&route)
                .filter(|interface| *interface == name)
                .count();
            let v6_routes = proc::ipv6_routes(&ipv6_route)
                .filter(|r| {
                    r.interface == name
                        && r.flags & RTF_LOCAL == 0
                        && !is_link_local_or_multicast(&r.destination)
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
    fn link_local_and_multicast_are_not_addresses() {
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let mc: Ipv6Addr = "ff02::1".parse().unwrap();
        let global: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert!(is_link_local_or_multicast(&ll));
        assert!(is_link_local_or_multicast(&mc));
        assert!(!is_link_local_or_multicast(&global));
    }
}
