//! Fair share of the socket between local users.
//!
//! The socket is open to every local user, so what one of them may hold is
//! bounded: each connection and each `GET /events` stream is counted
//! against the peer's uid (from SO_PEERCRED, fixed at connect time). An
//! unprivileged uid may hold at most [`Limits::connections_per_uid`]
//! connections and [`Limits::event_streams_per_uid`] streams, and all
//! unprivileged uids together at most [`Limits::unprivileged_connections`].
//! Privileged callers (root, the daemon's own user and the access group:
//! whoever [`AccessPolicy::may_mutate`](super::AccessPolicy::may_mutate)
//! allows) are never counted against those bounds; the file descriptors
//! above the unprivileged pool are theirs (see [`fit_to_fd_limit`]).
//!
//! Counting is a mutex-protected map of uid to counts, touched once when a
//! connection or stream opens and once when its permit drops; entries at
//! zero are removed, so the map holds only uids that hold something.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::ApiError;

/// File descriptors kept back from the unprivileged pool: privileged
/// callers' connections, the listener, state and sysfs files, netlink.
pub const RESERVED_FDS: u64 = 256;

/// Bounds for unprivileged uids. Privileged callers are not limited here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections one unprivileged uid may hold.
    pub connections_per_uid: usize,
    /// Concurrent `GET /events` streams one unprivileged uid may hold.
    pub event_streams_per_uid: usize,
    /// Concurrent connections all unprivileged uids together may hold.
    pub unprivileged_connections: usize,
}

impl Default for Limits {
    /// A monitor or a dashboard holds a few connections and one or two
    /// event streams; these leave a wide margin above that while keeping
    /// the whole unprivileged pool within the memory bound (each idle
    /// connection costs about 14 KiB: its read buffer and task; one
    /// holding a head just under the 8 KiB limit about 24 KiB).
    fn default() -> Self {
        Limits {
            connections_per_uid: 64,
            event_streams_per_uid: 16,
            unprivileged_connections: 1024,
        }
    }
}

impl Limits {
    /// Every bound must allow something, and one uid cannot be allowed
    /// more than all of them together.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections_per_uid == 0
            || self.event_streams_per_uid == 0
            || self.unprivileged_connections == 0
        {
            return Err("connection and event stream limits must be at least 1".into());
        }
        if self.connections_per_uid > self.unprivileged_connections {
            return Err(format!(
                "max_connections_per_uid ({}) is larger than max_unprivileged_connections ({})",
                self.connections_per_uid, self.unprivileged_connections
            ));
        }
        Ok(())
    }
}

/// Shrinks the unprivileged pool so that it leaves [`RESERVED_FDS`]
/// descriptors under `fd_limit` for privileged callers and the daemon.
/// Returns the limits to use and whether they were shrunk.
pub fn fit_to_fd_limit(limits: Limits, fd_limit: u64) -> (Limits, bool) {
    let room = fd_limit.saturating_sub(RESERVED_FDS).max(1);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if limits.unprivileged_connections <= room {
        return (limits, false);
    }
    let fitted = Limits {
        unprivileged_connections: room,
        connections_per_uid: limits.connections_per_uid.min(room),
        event_streams_per_uid: limits.event_streams_per_uid,
    };
    (fitted, true)
}

/// At startup: raises the soft RLIMIT_NOFILE to the hard limit, so the
/// daemon has the descriptors its limits assume, and returns `configured`
/// fitted to the limit it got (both shortfalls are logged).
pub fn fit_to_descriptors(configured: Limits) -> Limits {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let fd_limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        // Already at the hard limit: nothing to gain, and the packaged unit
        // forbids setrlimit().
        Ok((soft, hard)) if soft >= hard => soft,
        Ok((soft, hard)) => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the soft file descriptor limit above {soft}: {e}");
                soft
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file descriptor limit; assuming 1024: {e}");
            1024
        }
    };
    let (limits, shrunk) = fit_to_fd_limit(configured, fd_limit);
    if shrunk {
        tracing::warn!(
            fd_limit,
            "the file descriptor limit ({fd_limit}) leaves room for {} unprivileged connections, not the {} configured; raise LimitNOFILE=",
            limits.unprivileged_connections,
            configured.unprivileged_connections
        );
    }
    limits
}

/// What one uid holds now, checked against [`Limits`] on each new connection or
/// stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Open API connections.
    pub connections: usize,
    /// Open `GET /events` streams (each also holds a connection).
    pub event_streams: usize,
}

impl Held {
    fn count_mut(&mut self, kind: Kind) -> &mut usize {
        match kind {
            Kind::Connection => &mut self.connections,
            Kind::EventStream => &mut self.event_streams,
        }
    }
}

#[derive(Default)]
struct State {
    per_uid: HashMap<u32, Held>,
    unprivileged_connections: usize,
}

/// The live counts, shared by every connection.
pub struct Accounting {
    limits: Limits,
    state: Mutex<State>,
}

impl Accounting {
    /// Behind an `Arc`: every connection of an [`Api`](super::Api) counts
    /// in the same one.
    pub fn new(limits: Limits) -> Arc<Accounting> {
        Arc::new(Accounting {
            limits,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What an unprivileged uid holds now.
    #[cfg(test)]
    fn held(&self, uid: u32) -> Held {
        self.lock().per_uid.get(&uid).copied().unwrap_or_default()
    }

    /// Admits a new connection, or says why not. The permit gives the
    /// slot back when dropped.
    pub fn open_connection(
        self: &Arc<Self>,
        uid: u32,
        privileged: bool,
    ) -> Result<Permit, ApiError> {
        self.admit(uid, privileged, Kind::Connection)
    }

    /// Admits a new event stream, or says why not.
    pub fn open_event_stream(
        self: &Arc<Self>,
        uid: u32,
        privileged: bool,
    ) -> Result<Permit, ApiError> {
        self.admit(uid, privileged, Kind::EventStream)
    }

    fn admit(self: &Arc<Self>, uid: u32, privileged: bool, kind: Kind) -> Result<Permit, ApiError> {
        if privileged {
            return Ok(Permit::unaccounted());
        }
        let mut state = self.lock();
        let mut held = state.per_uid.get(&uid).copied().unwrap_or_default();
        let (count, limit, what, refusal): (_, _, _, fn(String) -> ApiError) = match kind {
            Kind::Connection => (
                held.connections,
                self.limits.connections_per_uid,
                "connections",
                ApiError::TooManyConnections,
            ),
            Kind::EventStream => (
                held.event_streams,
                self.limits.event_streams_per_uid,
                "event streams",
                ApiError::TooManyEventStreams,
            ),
        };
        if count >= limit {
            return Err(refusal(format!(
                "uid {uid} already holds {count} {what}, the most an unprivileged user may; close some and retry"
            )));
        }
        if kind == Kind::Connection {
            if state.unprivileged_connections >= self.limits.unprivileged_connections {
                return Err(ApiError::TooManyConnections(format!(
                    "unprivileged users hold {} connections, the most vfiod serves for them at once; retry later",
                    state.unprivileged_connections
                )));
            }
            state.unprivileged_connections += 1;
        }
        *held.count_mut(kind) += 1;
        state.per_uid.insert(uid, held);
        Ok(Permit {
            accounting: Some(self.clone()),
            uid,
            kind,
        })
    }

    fn release(&self, uid: u32, kind: Kind) {
        let mut state = self.lock();
        if kind == Kind::Connection {
            state.unprivileged_connections = state.unprivileged_connections.saturating_sub(1);
        }
        if let Some(held) = state.per_uid.get_mut(&uid) {
            let count = held.count_mut(kind);
            *count = count.saturating_sub(1);
            if *held == Held::default() {
                state.per_uid.remove(&uid);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connection,
    EventStream,
}

/// One admitted connection or stream; dropping it frees the slot.
pub struct Permit {
    accounting: Option<Arc<Accounting>>,
    uid: u32,
    kind: Kind,
}

impl Permit {
    fn unaccounted() -> Permit {
        Permit {
            accounting: None,
            uid: 0,
            kind: Kind::Connection,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(accounting) = self.accounting.take() {
            accounting.release(self.uid, self.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::status_and_code;

    fn small() -> Arc<Accounting> {
        Accounting::new(Limits {
            connections_per_uid: 2,
            event_streams_per_uid: 1,
            unprivileged_connections: 3,
        })
    }

    #[test]
    fn one_uid_is_capped_and_gets_its_slots_back() {
        let acc = small();
        let a = acc.open_connection(1000, false).unwrap();
        let _b = acc.open_connection(1000, false).unwrap();
        let refused = acc.open_connection(1000, false).err().unwrap();
        assert_eq!(
            status_and_code(&refused),
            (hyper::StatusCode::TOO_MANY_REQUESTS, "too_many_connections")
        );
        assert!(refused.to_string().contains("uid 1000"), "{refused}");
        drop(a);
        let _c = acc.open_connection(1000, false).unwrap();
        assert_eq!(acc.held(1000).connections, 2);
    }

    #[test]
    fn the_unprivileged_pool_is_shared_but_privileged_callers_are_not_in_it() {
        let acc = small();
        let _a = acc.open_connection(1000, false).unwrap();
        let _b = acc.open_connection(1001, false).unwrap();
        let _c = acc.open_connection(1002, false).unwrap();
        let refused = acc.open_connection(1003, false).err().unwrap();
        assert!(
            refused.to_string().contains("unprivileged users hold 3"),
            "{refused}"
        );
        let root: Vec<_> = (0..100)
            .map(|_| acc.open_connection(0, true).unwrap())
            .collect();
        assert_eq!(root.len(), 100);
        assert_eq!(acc.held(0), Held::default());
    }

    #[test]
    fn event_streams_are_capped_per_uid_and_the_map_empties() {
        let acc = small();
        let conn = acc.open_connection(1000, false).unwrap();
        let stream = acc.open_event_stream(1000, false).unwrap();
        let refused = acc.open_event_stream(1000, false).err().unwrap();
        assert_eq!(status_and_code(&refused).1, "too_many_event_streams");
        assert!(acc.open_event_stream(1000, true).is_ok());
        drop(stream);
        drop(conn);
        assert!(acc.lock().per_uid.is_empty());
        assert_eq!(acc.lock().unprivileged_connections, 0);
    }

    #[test]
    fn the_pool_shrinks_to_leave_reserved_descriptors() {
        let limits = Limits::default();
        assert_eq!(fit_to_fd_limit(limits, 65536), (limits, false));
        let (fitted, shrunk) = fit_to_fd_limit(limits, 1024);
        assert!(shrunk);
        assert_eq!(
            fitted.unprivileged_connections,
            1024 - RESERVED_FDS as usize
        );
        let (tiny, _) = fit_to_fd_limit(limits, 100);
        assert_eq!(tiny.unprivileged_connections, 1);
        assert_eq!(tiny.connections_per_uid, 1);
        assert!(tiny.validate().is_ok());
    }

    #[test]
    fn validation() {
        assert!(Limits::default().validate().is_ok());
        let zero = Limits {
            connections_per_uid: 0,
            ..Limits::default()
        };
        assert!(zero.validate().is_err());
        let one_uid_above_all = Limits {
            connections_per_uid: 2000,
            ..Limits::default()
        };
        assert!(one_uid_above_all
            .validate()
            .unwrap_err()
            .contains("larger than"));
    }
}
