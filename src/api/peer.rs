//! Who is on the other end of a connection, from the kernel: SO_PEERCRED
//! for uid, gid and pid, SO_PEERGROUPS for the supplementary groups. Both
//! are captured by the kernel at connect time, so they cannot be spoofed or
//! raced the way reading `/proc/PID/status` could be.

use std::os::fd::AsRawFd;

use nix::libc;

/// The caller's credentials as the kernel recorded them at `connect()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid; root and the daemon's own uid may mutate.
    pub uid: u32,
    /// Primary gid; counts for the mutation group like `groups`.
    pub gid: u32,
    /// 0 when the kernel could not say (a peer in another pid namespace).
    pub pid: i32,
    /// Supplementary groups; empty if `SO_PEERGROUPS` failed, so only `gid`
    /// counts then.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Reads both socket options; fails only if `SO_PEERCRED` does.
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().unwrap_or(0),
            groups: peer_groups(stream.as_raw_fd()),
        })
    }

    /// A peer the kernel vouches for nothing about (the metrics listener's,
    /// over TCP): uid and gid (uid_t)-1, which no process can have, and no
    /// groups, so it is never privileged.
    pub fn unknown() -> Peer {
        Peer {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: 0,
            groups: Vec::new(),
        }
    }
}

fn peer_groups(fd: i32) -> Vec<u32> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is valid for `len` bytes and the kernel writes
        // at most that many, reporting the size it needed in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return groups;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
            groups.resize(count, 0);
            continue;
        }
        tracing::warn!(error = %err, "SO_PEERGROUPS failed; only the primary group counts");
        return Vec::new();
    }
}

/// Reads are open to everyone; changes need root, the daemon's own user,
/// or membership of the configured group.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Members of this group may mutate (the socket's group); `None`: root and
    /// `owner_uid` only.
    pub group_gid: Option<u32>,
    /// The daemon's own uid, which may always mutate.
    pub owner_uid: u32,
}

impl AccessPolicy {
    /// Whether `peer` may call a route that changes something.
    pub fn may_mutate(&self, peer: &Peer) -> bool {
        peer.uid == 0
            || peer.uid == self.owner_uid
            || self
                .group_gid
                .is_some_and(|g| peer.gid == g || peer.groups.contains(&g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_owner_and_group_members_may_mutate() {
        let policy = AccessPolicy {
            group_gid: Some(990),
            owner_uid: 0,
        };
        assert!(policy.may_mutate(&peer(0, 0, &[])));
        assert!(policy.may_mutate(&peer(1000, 990, &[])));
        assert!(policy.may_mutate(&peer(1000, 1000, &[27, 990])));
        assert!(!policy.may_mutate(&peer(1000, 1000, &[27])));
        let no_group = AccessPolicy {
            group_gid: None,
            owner_uid: 1000,
        };
        assert!(no_group.may_mutate(&peer(1000, 1000, &[])));
        assert!(!no_group.may_mutate(&peer(1001, 1001, &[])));
        assert!(!policy.may_mutate(&Peer::unknown()));
        assert!(!no_group.may_mutate(&Peer::unknown()));
    }

    #[tokio::test]
    async fn reads_own_credentials_over_a_socketpair() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(p.pid, std::process::id() as i32);
    }
}
