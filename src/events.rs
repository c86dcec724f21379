//! The event bus behind `GET /events`.
//!
//! Every event gets a sequence number and goes into a bounded ring (for
//! `?since=SEQ` replays) and a broadcast channel (for live subscribers).
//! Publishing never waits for a subscriber: a subscriber that falls more
//! than the channel's capacity behind is told how many events it missed
//! (a `lagged` event) and carries on from the oldest it can still get.
//! Subscribing takes the ring's lock, so a replay and the live feed join
//! without a gap or a duplicate.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::broadcast;

use crate::pci::PciAddress;

/// The event's `type` on the wire; clients switch on it, so names are never
/// changed, only added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// udev reported a function added; `pci_address` set, `device_id` only if
    /// it is registered.
    HotplugAdd,
    /// udev reported a function removed; a registered one stays in the
    /// registry, not present.
    HotplugRemove,
    /// A driver took a function (udev `bind`), whoever caused it; `driver`
    /// names it.
    DriverBound,
    /// A function lost its driver (udev `unbind`).
    DriverUnbound,
    /// A device vfiod holds on vfio was moved away by someone else.
    DriverStolen,
    /// `POST /devices` succeeded.
    Registered,
    /// `DELETE` succeeded; the device is no longer registered.
    Unregistered,
    /// `PATCH` succeeded (name, tags or reset order).
    Updated,
    /// vfiod moved the device to vfio; `driver` is the vfio driver.
    Bind,
    /// A move to vfio failed; `detail` says the step and how the rollback went.
    BindFailed,
    /// vfiod gave the device back; `driver` is the original driver.
    Unbind,
    /// A give-back failed; `detail` says the step.
    UnbindFailed,
    /// The device was handed to `instance_id`.
    Attach,
    /// An attachment was ended by a caller.
    Detach,
    /// An attachment ended by itself: its VMM exited.
    AttachmentEnded,
    /// A different device answers at a registered address after a re-plug; it
    /// is not touched.
    IdentityMismatch,
    /// A sysfs write for the device did not return in time; moves are refused
    /// until it does.
    DeviceStuck,
    /// The stuck write returned; the device is settled and usable again.
    DeviceUnstuck,
    /// A reset done and verified (detail: method and duration).
    Reset,
    /// A reset that failed or failed verification (detail: why).
    ResetFailed,
    /// `health` changed (detail: the new health and its reason).
    HealthChanged,
    /// A PF's VF count changed, or vfiod made its VFs again (detail: desired
    /// and enabled counts).
    SriovChanged,
    /// A VF count change failed (detail: the step and errno).
    SriovFailed,
    /// vfiod made a mediated device on the parent for `instance_id`
    /// (detail: its UUID, type and who may open it), or made it again
    /// after a reboot or re-plug.
    MdevCreated,
    /// vfiod removed a mediated device (detail: its UUID and why: released,
    /// its VMM exited, its hand-out did not finish).
    MdevRemoved,
    /// Sent to one subscriber in place of `missed` events it was too slow to
    /// take.
    Lagged,
}

/// The wire name (`driver_bound`), serde's own so the two cannot differ.
impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.serialize(f)
    }
}

/// An event's time as the wire carries it: RFC 3339, microseconds, UTC.
pub fn wire_time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn serialize_time<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&wire_time(at))
}

/// One line of `GET /events`; `seq` orders them and `?since=` resumes after
/// one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Set by [`EventBus::publish`], from 1, with no gaps; 0 until then.
    pub seq: u64,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// `None` only for `lagged`.
    pub pci_address: Option<PciAddress>,
    /// The registered device's id; `None` for an unregistered function or
    /// `lagged`.
    pub device_id: Option<String>,
    /// When the event was made, sent as RFC 3339 UTC with microseconds.
    #[serde(serialize_with = "serialize_time")]
    pub at: DateTime<Utc>,
    /// The driver involved, on driver and move events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The instance, on attach and detach events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Free text for people: a step, an errno, a reason. Not for parsing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Only on `lagged`: how many events this subscriber lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

impl Event {
    /// An event stamped now; `seq` is set on publishing.
    pub fn new(
        kind: EventKind,
        pci_address: Option<PciAddress>,
        device_id: Option<String>,
    ) -> Event {
        Event {
            seq: 0,
            kind,
            pci_address,
            device_id,
            at: Utc::now(),
            driver: None,
            instance_id: None,
            detail: None,
            missed: None,
        }
    }

    /// Sets the driver involved.
    pub fn driver(mut self, driver: Option<String>) -> Event {
        self.driver = driver;
        self
    }

    /// Sets the instance involved.
    pub fn instance(mut self, instance_id: Option<String>) -> Event {
        self.instance_id = instance_id;
        self
    }

    /// Sets the free-text detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = Some(detail.into());
        self
    }

    /// What a subscriber gets in place of `missed` events it was too slow
    /// to take.
    pub fn lagged(missed: u64) -> Event {
        let mut e = Event::new(EventKind::Lagged, None, None);
        e.missed = Some(missed);
        e
    }
}

/// Events kept for `?since=` replays; a `since` older than the ring's oldest
/// gets what is left.
pub const RING_CAPACITY: usize = 1024;
/// Per-subscriber backlog before it is told it lagged.
pub const CHANNEL_CAPACITY: usize = 256;

/// Publishes events in one order to every subscriber, with a replay ring so
/// reconnecting clients miss nothing recent.
pub struct EventBus {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Arc<Event>>,
}

struct Ring {
    next_seq: u64,
    events: VecDeque<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            ring: Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::with_capacity(RING_CAPACITY),
            }),
            live: broadcast::channel(CHANNEL_CAPACITY).0,
        }
    }
}

impl EventBus {
    /// Numbers the event and sends it; never blocks on slow subscribers.
    pub fn publish(&self, mut event: Event) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        event.seq = ring.next_seq;
        ring.next_seq += 1;
        tracing::debug!(kind = ?event.kind, device = ?event.pci_address, seq = event.seq, "event");
        let event = Arc::new(event);
        if ring.events.len() == RING_CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // No subscribers is not an error.
        let _ = self.live.send(event);
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).next_seq - 1
    }

    /// Live events from now on, preceded by the retained ones after `since`.
    pub fn subscribe(
        &self,
        since: Option<u64>,
    ) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let backlog = match since {
            Some(seq) => ring
                .events
                .iter()
                .filter(|e| e.seq > seq)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (backlog, self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_wire_bytes() {
        let mut e = Event::new(
            EventKind::ResetFailed,
            Some("0000:00:02.0".parse().unwrap()),
            Some("kcxxnjc9fpi40a4jvh16kedd".into()),
        )
        .driver(Some("e1000e".into()))
        .detail("flr: config space reads all ones");
        e.seq = 8;
        e.at = "2026-12-07T01:35:00.5Z".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"seq":8,"type":"reset_failed","pci_address":"0000:00:02.0","device_id":"kcxxnjc9fpi40a4jvh16kedd","at":"2026-12-07T01:35:00.500000Z","driver":"e1000e","detail":"flr: config space reads all ones"}"#
        );
        let mut lagged = Event::lagged(12);
        lagged.seq = 9;
        lagged.at = "2026-12-07T01:36:00Z".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&lagged).unwrap(),
            r#"{"seq":9,"type":"lagged","pci_address":null,"device_id":null,"at":"2026-12-07T01:36:00.000000Z","missed":12}"#
        );
        for sent in [e, lagged] {
            let text = serde_json::to_string(&sent).unwrap();
            let read: Event = serde_json::from_str(&text).unwrap();
            assert_eq!(read, sent);
            assert_eq!(wire_time(&read.at), wire_time(&sent.at));
        }
    }

    #[test]
    fn since_replays_then_live_feed_continues_without_gap() {
        let bus = EventBus::default();
        for _ in 0..3 {
            bus.publish(Event::new(EventKind::Registered, None, None));
        }
        let (backlog, mut rx) = bus.subscribe(Some(1));
        assert_eq!(
            backlog.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        bus.publish(Event::new(EventKind::Bind, None, None));
        assert_eq!(rx.try_recv().unwrap().seq, 4);
    }

    #[test]
    fn slow_subscriber_lags_instead_of_blocking_publisher() {
        let bus = EventBus::default();
        let (_, mut rx) = bus.subscribe(None);
        for _ in 0..(CHANNEL_CAPACITY + 10) {
            bus.publish(Event::new(EventKind::HotplugAdd, None, None));
        }
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("expected lag, got {other:?}"),
        }
    }
}
