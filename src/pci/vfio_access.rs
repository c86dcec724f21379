//! Who may open a device's VFIO nodes.
//!
//! udev creates `/dev/vfio/N` root-only (0600). An attachment hands the
//! device to one unprivileged VMM by adding a POSIX ACL entry for its uid
//! (`user:UID:rw-`) and nothing else: owner, mode and every other entry
//! stay as udev made them. A named-user entry forces a mask entry, which
//! the kernel shows in the group permission bits (the node then reads
//! 0660), so a revoke that leaves no named entry removes the whole access
//! ACL and puts the group bits back to the ACL's `group::` entry: the node
//! is then exactly as it was before the grant.
//!
//! Nodes that do not exist are skipped (a hot-unplugged device, a kernel
//! without `/dev/iommu`); a grant is re-applied when the node comes back.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use posix_acl::{PosixACL, Qualifier, ACL_READ, ACL_WRITE};

use super::{PciAddress, Sysfs};
use crate::path_error::PathError;

const ACCESS_ACL_XATTR: &str = "system.posix_acl_access";

fn acl_error(op: &'static str, path: &Path, e: posix_acl::ACLError) -> PathError {
    let source = match e.as_io_error() {
        Some(io) => std::io::Error::new(io.kind(), io.to_string()),
        None => std::io::Error::other(e.to_string()),
    };
    PathError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The nodes through which a VMM uses `addr`: the group node, the cdev of
/// the device (`/dev/vfio/devices/vfioX`, with iommufd) and `/dev/iommu`,
/// those that exist now.
pub fn vfio_nodes(sysfs: &Sysfs, addr: &PciAddress, group: u32) -> Vec<PathBuf> {
    nodes_of(sysfs, &sysfs.device_dir(addr), group)
}

/// [`vfio_nodes`] of the device whose sysfs directory is `device_dir` (a
/// PCI function's, or a mediated device's).
pub fn nodes_of(sysfs: &Sysfs, device_dir: &Path, group: u32) -> Vec<PathBuf> {
    let mut nodes = vec![sysfs.vfio_group_node(group)];
    if let Ok(entries) = std::fs::read_dir(device_dir.join("vfio-dev")) {
        for e in entries.flatten() {
            let name = e.file_name();
            nodes.push(sysfs.devfs().join("vfio/devices").join(name));
        }
    }
    nodes.push(sysfs.devfs().join("iommu"));
    nodes.retain(|n| n.exists());
    nodes
}

/// Lets `uid` read and write `node`.
pub fn grant(node: &Path, uid: u32) -> Result<(), PathError> {
    let mut acl = PosixACL::read_acl(node).map_err(|e| acl_error("read ACL of", node, e))?;
    if acl.get(Qualifier::User(uid)) == Some(ACL_READ | ACL_WRITE) {
        return Ok(());
    }
    acl.set(Qualifier::User(uid), ACL_READ | ACL_WRITE);
    acl.write_acl(node)
        .map_err(|e| acl_error("write ACL of", node, e))
}

/// Takes `uid`'s entry away from `node`, leaving it as it was before
/// [`grant`] (see the module docs). A missing node or entry is fine.
pub fn revoke(node: &Path, uid: u32) -> Result<(), PathError> {
    if !node.exists() {
        return Ok(());
    }
    let mut acl = PosixACL::read_acl(node).map_err(|e| acl_error("read ACL of", node, e))?;
    if acl.remove(Qualifier::User(uid)).is_none() {
        return Ok(());
    }
    let others_named = acl
        .entries()
        .iter()
        .any(|e| matches!(e.qual, Qualifier::User(_) | Qualifier::Group(_)));
    if others_named {
        return acl
            .write_acl(node)
            .map_err(|e| acl_error("write ACL of", node, e));
    }
    // Only the base entries are left: drop the ACL, and with it the mask
    // that the group bits show, restoring them from `group::`.
    let group_perm = acl.get(Qualifier::GroupObj).unwrap_or(0);
    let mode = std::fs::metadata(node)
        .map_err(PathError::at("stat", node))?
        .permissions()
        .mode();
    let restored = (mode & !0o070 & 0o7777) | ((group_perm & 0o7) << 3);
    match rustix::fs::removexattr(node, ACCESS_ACL_XATTR) {
        Ok(()) | Err(rustix::io::Errno::NODATA) => {}
        Err(e) => {
            return Err(PathError {
                op: "remove ACL of",
                path: node.to_owned(),
                source: e.into(),
            })
        }
    }
    std::fs::set_permissions(node, std::fs::Permissions::from_mode(restored))
        .map_err(PathError::at("chmod", node))
}

/// The uids with a named entry on `node` (those vfiod or anyone granted).
pub fn granted_uids(node: &Path) -> Vec<u32> {
    let Ok(acl) = PosixACL::read_acl(node) else {
        return Vec::new();
    };
    acl.entries()
        .iter()
        .filter_map(|e| match e.qual {
            Qualifier::User(uid) => Some(uid),
            _ => None,
        })
        .collect()
}

/// Whether any local user may open the VFIO container node
/// (`/dev/vfio/vfio`, world read-write on Debian): a VMM needs it besides
/// the group node.
pub fn container_usable_by_all(sysfs: &Sysfs) -> bool {
    std::fs::metadata(sysfs.devfs().join("vfio/vfio"))
        .map(|m| m.permissions().mode() & 0o006 == 0o006)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn has_acl(p: &Path) -> bool {
        rustix::fs::getxattr(p, ACCESS_ACL_XATTR, &mut [0u8; 256]).is_ok()
    }

    #[test]
    fn grant_then_revoke_leaves_the_node_as_it_was() {
        let dir = std::env::temp_dir().join(format!("vfiod-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let node = dir.join("7");
        std::fs::write(&node, "").unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
        if grant(&node, 4242).is_err() {
            eprintln!("skipped: no POSIX ACLs on {}", dir.display());
            return;
        }
        assert_eq!(granted_uids(&node), vec![4242]);
        assert_eq!(mode(&node), 0o660, "the mask shows in the group bits");
        grant(&node, 4242).unwrap();
        grant(&node, 4343).unwrap();
        revoke(&node, 4242).unwrap();
        assert_eq!(granted_uids(&node), vec![4343]);
        revoke(&node, 4343).unwrap();
        assert!(granted_uids(&node).is_empty());
        assert_eq!(mode(&node), 0o600);
        assert!(!has_acl(&node), "an access ACL was left behind");
        revoke(&node, 4343).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
