//! Fair share: local users without privileges flood the socket (idle
//! connections, slow heads, heads just under the size limit, event
//! streams, then all at once) while root and a member of the access group
//! keep asking. Their requests must all be answered quickly, vfiod must
//! stay small, and it must serve everyone again when the flood ends.
//!
//! The test runs as root and drops privileges in child processes: it runs
//! its own binary again (the ignored `flood_helper` test) with another uid
//! and gid (see `common::flood`). Without root it is skipped with a message.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::fakesys::{DeviceSpec, FakeSys};
use common::flood;
use common::Daemon;

const RSS_BOUND_KIB: u64 = 64 * 1024;
const P99_BOUND: Duration = Duration::from_millis(100);

#[test]
#[ignore = "a helper that fair_share_under_flood runs in child processes as other uids"]
fn flood_helper() {
    if let Ok(spec) = std::env::var(flood::HELPER_ENV) {
        flood::helper_main(&spec);
    }
}

#[test]
fn fair_share_under_flood() {
    if !flood::is_root() {
        eprintln!("SKIPPED fair_share_under_flood: it must run as root to start clients as other uids (CI runs as root)");
        return;
    }
    let _ = flood::HELPER_ARGS.set(
        [
            "--exact",
            "flood_helper",
            "--include-ignored",
            "--nocapture",
            "--test-threads",
            "1",
            "-q",
        ]
        .map(String::from)
        .to_vec(),
    );
    let (_fs, d, group_gid) = flood::start_daemon();
    // Started with a soft limit of 1024 under a higher hard one, vfiod
    // raised the soft one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(nofile[0], nofile[1], "soft fd limit not raised: {nofile:?}");
    // A head over the limit is refused with a JSON answer, not hyper's
    // empty one.
    let mut big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    big.resize(64 * 1024, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    common::raw_request(&d.socket, &big).expect_error(431, "header_too_large");

    let baseline_rss = flood::status_kib(d.pid(), "VmRSS:");
    let rows = flood::run_floods(&d, group_gid);
    println!();
    flood::print_table(baseline_rss, &rows);
    for r in &rows {
        assert!(
            r.root_p99 < P99_BOUND && r.member_p99 < P99_BOUND,
            "{}: p99 root {:?}, group member {:?}",
            r.what,
            r.root_p99,
            r.member_p99
        );
        assert!(
            r.rss_max_kib < RSS_BOUND_KIB,
            "{}: vfiod's RSS reached {} KiB",
            r.what,
            r.rss_max_kib
        );
    }
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of file descriptors, vfiod waits instead of spinning on accept,
/// logs once, and answers the waiting request when descriptors come back.
/// Needs no root: the daemon's own uid is privileged and not limited.
#[test]
fn out_of_descriptors_backs_off_and_recovers() {
    let fs = FakeSys::new();
    let d = Daemon::start_with_nofile(&fs, &[], Some((64, 64)));
    assert!(
        d.log_text()
            .contains("leaves room for 1 unprivileged connections"),
        "{}",
        d.log_text()
    );
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(UnixStream::connect(&d.socket).unwrap());
    }
    common::eventually(10, "accept to fail for lack of descriptors", || {
        d.log_text().contains("accept failed").then_some(())
    });
    let socket = d.socket.clone();
    let waiting = std::thread::spawn(move || {
        let t = Instant::now();
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (out, t.elapsed())
    });
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent_ms = (cpu_ticks(d.pid()) - before) * 1000
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as u64;
    let log = d.log_text();
    assert_eq!(
        log.matches("accept failed").count(),
        1,
        "one log line per burst:\n{log}"
    );
    drop(held);
    let (answer, waited) = waiting.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(d.log_text().contains("accepting connections again"));
    println!(
        "out of descriptors: vfiod used {spent_ms} ms of CPU in 2 s; the waiting request was answered {} ms after it connected",
        waited.as_millis()
    );
    assert!(spent_ms < 500, "vfiod spun: {spent_ms} ms of CPU in 2 s");
}

/// A connection that sends nothing, new or kept alive after an answer, is
/// closed when the header timeout runs out; one that is busy is not.
#[test]
fn idle_connections_are_closed_after_the_header_timeout() {
    let fs = FakeSys::new();
    fs.add_device(DeviceSpec::new("0000:00:02.0", 0x8086, 0x10d3, 0x020000).group(2));
    let d = Daemon::start(&fs, &["--header-timeout-ms", "400"]);
    let closed_after = |s: &mut UnixStream| {
        let t = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        (t.elapsed(), rest)
    };
    let mut fresh = UnixStream::connect(&d.socket).unwrap();
    let (waited, said) = closed_after(&mut fresh);
    assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "a fresh idle connection closed after {waited:?}"
    );

    let mut kept = UnixStream::connect(&d.socket).unwrap();
    write!(kept, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let (waited, _) = closed_after(&mut kept);
    assert!(
        waited < Duration::from_secs(5),
        "a kept-alive idle connection stayed open {waited:?}"
    );

    // An event stream is a response in progress, not an idle connection.
    let mut events = common::EventStream::open(&d.socket, "");
    std::thread::sleep(Duration::from_millis(900));
    d.register("0000:00:02.0", "nic");
    let event = events.next_event();
    assert_eq!(event["pci_address"], "0000:00:02.0", "{event}");
}
