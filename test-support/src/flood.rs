//! Floods of a vfiod socket from unprivileged uids, and what root and a
//! member of the access group get meanwhile: shared by
//! `tests/fairshare.rs` (which asserts) and the benchmark (which reports).
//!
//! The caller runs as root; flooders are this executable run again with
//! another uid and gid (see [`HELPER_ARGS`], [`helper_main`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fakesys::{DeviceSpec, FakeSys};
use crate::Daemon;

pub const HELPER_ENV: &str = "VFIOD_FAIRSHARE_HELPER";
/// Unprivileged flooders get uids (and gids) from here up.
pub const FLOOD_UID_BASE: u32 = 70_000;
/// The access group member's uid.
pub const MEMBER_UID: u32 = 60_000;
/// The daemon's defaults, which the flood is meant to exceed.
pub const PER_UID: usize = 64;
pub const EVENTS_PER_UID: usize = 16;
pub const UNPRIVILEGED: usize = 1024;
pub const MEASURE: Duration = Duration::from_secs(3);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// An existing group to serve as the access group: the test must not add
/// groups to the host.
pub fn access_group() -> (String, u32) {
    for name in ["daemon", "bin", "sys", "adm", "nogroup"] {
        if let Ok(Some(g)) = nix::unistd::Group::from_name(name) {
            return (name.to_owned(), g.gid.as_raw());
        }
    }
    panic!("none of the usual system groups exists to act as the access group");
}

/// One timed `GET`, on a fresh connection: the status, or what went wrong.
pub fn timed_get(socket: &Path, path: &str) -> (Result<u16, String>, Duration) {
    let t = Instant::now();
    let result = (|| {
        let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: vfiod\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                format!(
                    "no HTTP answer: {:?}",
                    text.chars().take(80).collect::<String>()
                )
            })
    })();
    (result, t.elapsed())
}

/// Requests every 15 ms for `duration`; the latencies and the failures.
pub fn keep_asking(socket: &Path, duration: Duration) -> (Vec<Duration>, Vec<String>) {
    let end = Instant::now() + duration;
    let (mut latencies, mut failures) = (Vec::new(), Vec::new());
    let mut i = 0;
    while Instant::now() < end {
        let path = if i % 2 == 0 { "/devices" } else { "/health" };
        i += 1;
        match timed_get(socket, path) {
            (Ok(200), t) => latencies.push(t),
            (Ok(status), _) => failures.push(format!("{path}: status {status}")),
            (Err(e), _) => failures.push(format!("{path}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    (latencies, failures)
}

pub fn p99(latencies: &[Duration]) -> Duration {
    let mut v = latencies.to_vec();
    v.sort();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

pub fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The child side: runs as the uid it was given. `KIND SOCKET N` opens N
/// connections of one kind, reports how the daemon took them, and holds
/// them until stdin closes; `member SOCKET MS` asks like the parent does.
pub fn helper_main(spec: &str) {
    let mut words = spec.split(' ');
    let (kind, socket, n) = (
        words.next().unwrap(),
        Path::new(words.next().unwrap()),
        words.next().unwrap().parse::<usize>().unwrap(),
    );
    if kind == "member" {
        let (latencies, failures) = keep_asking(socket, Duration::from_millis(n as u64));
        let us: Vec<String> = latencies
            .iter()
            .map(|l| l.as_micros().to_string())
            .collect();
        println!(
            "FLOOD latencies us={} failures={}",
            us.join(","),
            failures.len()
        );
        for f in failures {
            println!("FLOOD failure {f}");
        }
        return;
    }
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let mut held = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = UnixStream::connect(socket) else {
            continue;
        };
        s.set_nonblocking(true).unwrap();
        let _ = match kind {
            "idle" => Ok(()),
            "slow" => s.write_all(b"GET /health HTTP/1.1\r\nX"),
            "bighdr" => {
                // Just under the 8 KiB limit and never finished: the most
                // a connection can make vfiod hold (a larger head is
                // answered 431 and closed).
                let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
                head.resize(8_000, b'a');
                s.write_all(&head)
            }
            "events" => s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n"),
            other => panic!("unknown flood kind {other}"),
        };
        held.push(s);
    }
    // The parent says when the daemon has taken every connection queued
    // so far (its own request, queued after them, was answered).
    println!("FLOOD connected");
    std::io::stdout().flush().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for s in &mut held {
        let mut buf = [0u8; 12];
        let status = match s.read(&mut buf) {
            Ok(12) => String::from_utf8_lossy(&buf[9..12]).into_owned(),
            Ok(0) => "closed".into(),
            Ok(_) => "short".into(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "held".into(),
            Err(_) => "closed".into(),
        };
        *counts.entry(status).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("FLOOD ready {}", summary.join(" "));
    std::io::stdout().flush().unwrap();
    // Hold until the parent closes stdin; a slow head gets a byte a second.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    while rx.recv_timeout(Duration::from_secs(1)).is_err() {
        if kind == "slow" {
            for s in &mut held {
                let _ = s.write(b"X");
            }
        }
    }
}

/// Arguments that make this executable run [`helper_main`] (with
/// [`HELPER_ENV`] set): a test binary needs the helper test named.
pub static HELPER_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// This executable again, running [`helper_main`] as `uid` (primary
/// group `uid`) with the supplementary `groups`.
fn helper(uid: u32, groups: &[u32], spec: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    crate::run_as(&mut cmd, uid, groups);
    let mut child = cmd
        .args(HELPER_ARGS.get().cloned().unwrap_or_default())
        .env(HELPER_ENV, spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the helper");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads the helper's output up to its line starting `FLOOD {word}`.
pub fn flood_line(out: &mut BufReader<std::process::ChildStdout>, word: &str) -> String {
    let want = format!("FLOOD {word}");
    let mut collected = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!(
                "the helper ended without {want:?}; it printed: {}",
                collected.join("")
            );
        }
        if let Some(rest) = line.strip_prefix(&want) {
            return rest.trim().to_owned();
        }
        collected.push(line);
    }
}

pub struct Flooder {
    child: Child,
    summary: String,
    /// Kept open so that the helper's last words do not hit a closed pipe.
    _out: BufReader<std::process::ChildStdout>,
}

impl Drop for Flooder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `us=1,2,3 failures=N` from a member helper.
pub fn parse_latencies(line: &str) -> (&str, usize) {
    let (list, failures) = line.split_once(" failures=").unwrap();
    (
        list.trim_start_matches("us="),
        failures.trim().parse().unwrap(),
    )
}

pub fn count_of(summary: &str, key: &str) -> usize {
    summary
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub struct Row {
    pub what: String,
    pub root_answered: (usize, usize),
    pub root_p99: Duration,
    pub member_answered: (usize, usize),
    pub member_p99: Duration,
    pub rss_max_kib: u64,
    pub refused: usize,
}

pub fn measure(d: &Daemon, group_gid: u32, what: &str, flooders: &[Flooder]) -> Row {
    let pid = d.pid();
    let socket = d.socket.display().to_string();
    let (mut member, mut member_out) = helper(
        MEMBER_UID,
        &[group_gid],
        &format!("member {socket} {}", MEASURE.as_millis()),
    );
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        })
    };
    let (root, root_failures) = keep_asking(&d.socket, MEASURE);
    let member_line = flood_line(&mut member_out, "latencies");
    let mut rest = String::new();
    let _ = member_out.read_to_string(&mut rest);
    let _ = member.wait();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let rss_max_kib = sampler.join().unwrap();
    let (list, failures) = parse_latencies(&member_line);
    let member_lat: Vec<Duration> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|us| Duration::from_micros(us.parse().unwrap()))
        .collect();
    let member_failures = failures;
    assert!(
        root_failures.is_empty(),
        "{what}: root's requests failed: {root_failures:?}"
    );
    assert_eq!(
        member_failures, 0,
        "{what}: the group member's requests failed: {rest}"
    );
    Row {
        what: what.to_owned(),
        root_answered: (root.len(), root.len() + root_failures.len()),
        root_p99: p99(&root),
        member_answered: (member_lat.len(), member_lat.len() + member_failures),
        member_p99: p99(&member_lat),
        rss_max_kib,
        refused: flooders.iter().map(|f| count_of(&f.summary, "429")).sum(),
    }
}

/// Starts `uids` flooders of `kind` with `per_uid` connections each,
/// waiting until each holds what it could get.
pub fn flood(socket: &Path, kind: &str, first_uid: u32, uids: u32, per_uid: usize) -> Vec<Flooder> {
    let spec = format!("{kind} {} {per_uid}", socket.display());
    let mut started: Vec<_> = (first_uid..first_uid + uids)
        .map(|uid| helper(uid, &[], &spec))
        .collect();
    for (_, out) in &mut started {
        flood_line(out, "connected");
    }
    // The listener's queue is first in, first out: once a request sent
    // now is answered, every flood connection has been accepted and
    // admitted or refused. Answers on admitted ones get a moment more.
    let (barrier, _) = timed_get(socket, "/health");
    assert_eq!(barrier, Ok(200));
    std::thread::sleep(Duration::from_millis(200));
    started
        .into_iter()
        .map(|(mut child, mut out)| {
            writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
            let summary = flood_line(&mut out, "ready");
            Flooder {
                child,
                summary,
                _out: out,
            }
        })
        .collect()
}

/// What one flooder was let through must stay within one uid's share.
pub fn check_shares(kind: &str, flooders: &[Flooder]) {
    let mut admitted_total = 0;
    for f in flooders {
        let admitted = match kind {
            "idle" | "slow" | "bighdr" => count_of(&f.summary, "held"),
            "events" => count_of(&f.summary, "200"),
            _ => continue,
        };
        let share = if kind == "events" {
            EVENTS_PER_UID
        } else {
            PER_UID
        };
        assert!(
            admitted <= share,
            "{kind}: one uid got {admitted} through, more than its share of {share}: {}",
            f.summary
        );
        admitted_total += admitted;
    }
    assert!(
        admitted_total <= UNPRIVILEGED,
        "{kind}: {admitted_total} unprivileged connections admitted"
    );
}

/// After a flood, an unprivileged uid gets answers again (its slots came
/// back) and the daemon is healthy.
pub fn everyone_served_again(d: &Daemon) {
    let socket = d.socket.display().to_string();
    crate::eventually(
        10,
        "an unprivileged uid to be served after the flood",
        || {
            let (mut child, mut out) = helper(FLOOD_UID_BASE, &[], &format!("member {socket} 1"));
            let line = flood_line(&mut out, "latencies");
            let _ = child.wait();
            let (answered, failures) = parse_latencies(&line);
            (!answered.is_empty() && failures == 0).then_some(())
        },
    );
    assert_eq!(d.get("/health").status, 200);
}

/// A vfiod on a fake tree of 8 registered GPUs, started with the file
/// descriptor limits systemd gives a service by default (soft 1024), its
/// socket reachable by every uid; and the access group's gid.
pub fn start_daemon() -> (FakeSys, Daemon, u32) {
    let (group, group_gid) = access_group();
    let fs = FakeSys::new();
    fs.load_vfio();
    for i in 0..8 {
        fs.add_device(
            DeviceSpec::new(&format!("0000:0{i}:00.0"), 0x10de, 0x2236, 0x030200)
                .driver("nvidia")
                .group(10 + i),
        );
    }
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let d = Daemon::start_with_nofile(&fs, &["--group", &group], Some((1024.min(hard), hard)));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for i in 0..8 {
        d.register(&format!("0000:0{i}:00.0"), &format!("gpu{i}"));
    }
    (fs, d, group_gid)
}

/// The baseline, then each kind of flood, then all at once: 20 uids x 150
/// connections, so every uid is over its share of 64 and all of them over
/// the 1,024 unprivileged users share. Checks that no uid got more than
/// its share and that the limits engaged.
pub fn run_floods(d: &Daemon, group_gid: u32) -> Vec<Row> {
    let mut rows = vec![measure(d, group_gid, "nothing (baseline)", &[])];
    let kinds = [
        ("idle", "idle connections"),
        ("slow", "slow heads, a byte a second"),
        ("bighdr", "8,000-byte unfinished heads"),
        ("events", "GET /events streams, never read"),
    ];
    let (uids, per_uid) = (20, 150);
    for (kind, label) in kinds {
        let flooders = flood(&d.socket, kind, FLOOD_UID_BASE, uids, per_uid);
        check_shares(kind, &flooders);
        let row = measure(
            d,
            group_gid,
            &format!("{} x {label}", uids as usize * per_uid),
            &flooders,
        );
        assert!(
            row.refused > 0,
            "{kind}: nothing was refused: the limits did not engage"
        );
        rows.push(row);
        drop(flooders);
        everyone_served_again(d);
    }
    let all: Vec<Flooder> = kinds
        .iter()
        .enumerate()
        .flat_map(|(i, (kind, _))| {
            flood(&d.socket, kind, FLOOD_UID_BASE + 100 * i as u32, 5, per_uid)
        })
        .collect();
    rows.push(measure(
        d,
        group_gid,
        &format!("all four at once ({} connections)", all.len() * per_uid),
        &all,
    ));
    drop(all);
    everyone_served_again(d);
    rows
}

pub fn print_table(baseline_rss_kib: u64, rows: &[Row]) {
    println!(
        "vfiod under an unprivileged flood (baseline RSS {:.1} MiB; limits {PER_UID} connections / {EVENTS_PER_UID} streams per uid, {UNPRIVILEGED} unprivileged in all)",
        baseline_rss_kib as f64 / 1024.0
    );
    println!(
        "| {:<44} | {:>13} | {:>8} | {:>14} | {:>10} | {:>9} | {:>7} |",
        "the flood", "root answered", "root p99", "group answered", "group p99", "max RSS", "429s"
    );
    for r in rows {
        println!(
            "| {:<44} | {:>13} | {:>5.1} ms | {:>14} | {:>7.1} ms | {:>5.1} MiB | {:>7} |",
            r.what,
            format!("{}/{}", r.root_answered.0, r.root_answered.1),
            r.root_p99.as_secs_f64() * 1000.0,
            format!("{}/{}", r.member_answered.0, r.member_answered.1),
            r.member_p99.as_secs_f64() * 1000.0,
            r.rss_max_kib as f64 / 1024.0,
            r.refused
        );
    }
}
