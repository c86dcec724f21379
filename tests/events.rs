//! The event stream (`GET /events`): every subscriber sees each event or
//! is told how many it missed, a slow one holds up nobody, `?since=`
//! replays; `vfioctl events` follows it. Events are made by registrations
//! and by uevents injected through vfiod's test FIFO (`--uevent-fifo`).

use std::io::Write;
use std::time::{Duration, Instant};

use common::host::Host;
use common::standard::{GPU, NIC};
use common::EventStream;

#[test]
fn event_stream_two_subscribers_one_slow_and_since() {
    let h = Host::builder().uevent_fifo().start();
    let mut fast = EventStream::open(&h.d.socket, "");
    // The slow one subscribes and then does not read at all for a while.
    let mut slow = EventStream::open(&h.d.socket, "");
    let dev = h.d.register(NIC, "nic");
    let e = fast.next_event();
    assert_eq!(e["type"], "registered");
    assert_eq!(e["pci_address"], NIC);
    assert_eq!(e["device_id"], dev["id"]);
    chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap();
    let first_seq = e["seq"].as_u64().unwrap();

    // A flood of uevents: far more than a subscriber's buffer.
    let n: u64 = 6000;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(h.uevent_fifo())
        .unwrap();
    let flood: String = (0..n).map(|_| format!("add {GPU}\n")).collect();
    f.write_all(flood.as_bytes()).unwrap();
    drop(f);
    let t = Instant::now();
    // The fast reader sees every event, or is told exactly how many it
    // missed if the machine was too slow: nothing vanishes silently.
    let (mut seen, mut missed, mut last_seq) = (0u64, 0u64, first_seq);
    while seen + missed < n {
        let e = fast.next_event();
        if e["type"] == "lagged" {
            missed += e["missed"].as_u64().unwrap();
            continue;
        }
        assert_eq!(e["type"], "hotplug_add");
        let seq = e["seq"].as_u64().unwrap();
        assert!(seq > last_seq);
        last_seq = seq;
        seen += 1;
    }
    assert_eq!(seen + missed, n);
    // The agent kept serving while the slow subscriber sat on its events.
    assert_eq!(h.d.get("/health").status, 200);
    assert!(t.elapsed() < Duration::from_secs(30));
    // The slow one gets what it can, then learns how much it missed.
    let lag = slow.until(|e| e["type"] == "lagged");
    assert!(lag["missed"].as_u64().unwrap() > 0, "{lag}");

    // ?since= replays what came after a given event.
    let mut replay = EventStream::open(&h.d.socket, &format!("?since={}", last_seq - 1));
    assert_eq!(replay.next_event()["seq"].as_u64().unwrap(), last_seq);
    let list = h.d.get("/devices");
    let seq_header: u64 = list.header("x-vfiod-event-seq").unwrap().parse().unwrap();
    assert!(seq_header >= last_seq);
    // /health gives the same position, for clients that do not list first.
    let health = h.d.get("/health").json();
    assert_eq!(health["last_event_seq"].as_u64(), Some(seq_header));
}

#[test]
fn vfioctl_events_follows_the_stream() {
    let h = Host::builder().uevent_fifo().start();
    // --since makes the test independent of when vfioctl subscribes: the
    // registration is replayed if it happened before.
    let seq =
        h.d.get("/devices")
            .header("x-vfiod-event-seq")
            .unwrap()
            .to_owned();
    h.d.register(NIC, "nic");
    let mut child = std::process::Command::new(common::vfioctl_bin())
        .arg("--socket")
        .arg(&h.d.socket)
        .args(["events", "--since", &seq])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let line = lines.next().unwrap().unwrap();
    assert!(line.contains("registered") && line.contains(NIC), "{line}");
    // Each line starts with the event's number, to resume from with --since.
    let first: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
    assert!(first > seq.parse().unwrap(), "{line}");
    // ...and the live feed follows the replay.
    assert_eq!(h.d.req("DELETE", "/devices/nic", None).status, 204);
    let line = lines.next().unwrap().unwrap();
    assert!(
        line.contains("unregistered") && line.contains(NIC),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let (code, _, err) = common::vfioctl(&h.d.socket, &["events", "--since", "soon"]);
    assert_eq!(code, 1);
    assert!(err.contains("--since"), "{err}");
}
