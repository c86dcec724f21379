//! Keeps the inventory in step with vfiod.
//!
//! A (re)connection reads `GET /devices`, whose `X-Vfiod-Event-Seq` names
//! the newest event that list reflects, then follows
//! `GET /events?since=SEQ`: nothing published after the list was taken is
//! missed. Events are only a signal: each burst of them re-reads the list,
//! so the inventory is always vfiod's own view, never a replay of deltas.
//! While vfiod is unreachable the last inventory stays as it was (a vfiod
//! restart must not look to kubelet like devices going away); each
//! reconnection after an outage bumps `reconnects`, on which the endpoints
//! register again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::inventory::Inventory;
use crate::vfiod::{EventStream, VfiodClient, VfiodError};

/// How long to keep reading a burst of events before re-reading the list.
const BURST: Duration = Duration::from_millis(20);
const BURST_MAX: Duration = Duration::from_millis(200);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

pub struct Follower {
    pub vfiod: VfiodClient,
    pub tag_key: String,
    pub sysfs: PathBuf,
    pub inventory: watch::Sender<Arc<Inventory>>,
    /// Ticks once per reconnection after vfiod was lost.
    pub reconnects: watch::Sender<u64>,
}

impl Follower {
    pub async fn run(self, cancel: CancellationToken) {
        let mut retry = RETRY_MIN;
        let mut lost = false;
        loop {
            let result = tokio::select! {
                r = self.follow_once(&mut lost) => r,
                _ = cancel.cancelled() => return,
            };
            let e = match result {
                Ok(()) => VfiodError::Protocol {
                    what: "GET /events".into(),
                    detail: "stream ended".into(),
                },
                Err(e) => e,
            };
            if !lost {
                tracing::warn!("lost vfiod ({e}); keeping the last device list and reconnecting");
                lost = true;
                retry = RETRY_MIN;
            } else {
                tracing::debug!("vfiod still unreachable: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = cancel.cancelled() => return,
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// One connection's worth: the list, then the stream until it ends.
    async fn follow_once(&self, lost: &mut bool) -> Result<(), VfiodError> {
        let seq = self.refresh().await?;
        let mut events = self.vfiod.events(seq).await?;
        if *lost {
            *lost = false;
            tracing::info!("vfiod is back; registering the endpoints again");
            self.reconnects.send_modify(|n| *n += 1);
        }
        loop {
            let Some(first) = events.next().await? else {
                return Ok(());
            };
            tracing::debug!(seq = first.seq, kind = %first.kind, "vfiod event");
            if !drain_burst(&mut events).await? {
                self.refresh().await?;
                return Ok(());
            }
            self.refresh().await?;
        }
    }

    /// Re-reads the device list; returns its event sequence number.
    async fn refresh(&self) -> Result<u64, VfiodError> {
        let (devices, seq) = self.vfiod.devices().await?;
        let tag_key = self.tag_key.clone();
        let sysfs = self.sysfs.clone();
        // numa_node reads are file reads: off the runtime.
        let inventory =
            tokio::task::spawn_blocking(move || Inventory::build(&devices, &tag_key, &sysfs))
                .await
                .map_err(|e| VfiodError::Protocol {
                    what: "building the inventory".into(),
                    detail: e.to_string(),
                })?;
        self.inventory.send_if_modified(|current| {
            if **current == inventory {
                return false;
            }
            *current = Arc::new(inventory);
            true
        });
        Ok(seq)
    }
}

/// Reads the events that follow within [`BURST`] of each other (at most
/// [`BURST_MAX`] in all); `false` when the stream ended meanwhile.
async fn drain_burst(events: &mut EventStream) -> Result<bool, VfiodError> {
    let deadline = tokio::time::Instant::now() + BURST_MAX;
    loop {
        let until = (tokio::time::Instant::now() + BURST).min(deadline);
        match tokio::time::timeout_at(until, events.next()).await {
            Err(_) => return Ok(true),
            Ok(Ok(Some(e))) => tracing::debug!(seq = e.seq, kind = %e.kind, "vfiod event"),
            Ok(Ok(None)) => return Ok(false),
            Ok(Err(e)) => return Err(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(true);
        }
    }
}
