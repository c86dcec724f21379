//! Measures vfiod, it does not judge it: run with `cargo bench --bench vfiod`
//! and read the tables. Everything runs on this machine over Unix sockets,
//! against a fake sysfs tree (never the real /sys).
//!
//! 1. API throughput and latency against nginx: 1,000 registered devices,
//!    64 concurrent keep-alive connections, six kinds of request (the full
//!    list; one device by name; a tag-filtered list matching half of the
//!    devices; one matching a single device; `GET /devices/available` on a
//!    host of 1,000 functions; `/metrics`). The ceiling is nginx from Debian
//!    (installed if missing) serving vfiod's own answers as static files
//!    over the same kind of socket, with as many workers as vfiod has
//!    runtime threads; a minimal hyper server answering the same bytes is a
//!    second column. vfiod, nginx and hyper take turns request kind by
//!    request kind, in rounds whose order rotates, so that noise from the
//!    rest of the machine falls on all three; the table shows the medians
//!    of the rounds and vfiod's peak RSS under all of it.
//! 2. Startup with 1,000 and 10,000 registered devices: exec to READY
//!    (sd_notify) and exec to the first answer on the socket.
//! 3. A move's own cost: bind/unbind cycles through the API on the
//!    simulated kernel (holder scan included), against the same sysfs
//!    writes done directly.
//! 4. Uevent to visible state: an injected event until `GET /devices` and
//!    the event stream show it.
//! 5. Event fan-out: 1,000 subscribers of `GET /events`, a burst of 1,000
//!    registry changes; delay from change to delivery, and whether every
//!    subscriber got every event.
//! 6. Fair share (as root only): what root and an access group member get
//!    (answered, p99) and vfiod's RSS, without a flood and under floods of
//!    unprivileged uids (`test-support/src/flood.rs`, the same scenarios
//!    `tests/fairshare.rs` asserts on).
//! 7. The holder scan a move pays before it writes: a fake `/proc` of 2,000
//!    processes with 100 descriptors each (sockets, pipes, anonymous
//!    inodes, regular files, `/dev/null`, a few device nodes) and a maps
//!    file each; then, for scale, the real `/proc` of this machine (read
//!    only, like every scan).
//!
//! `VFIOD_BENCH_ONLY=api` (or `startup`, `bind`, `events`, `fanout`,
//! `fairshare`, `holders`, comma-separated) runs only those sections;
//! `VFIOD_BENCH_SECONDS` is the length of one load run (default 2),
//! `VFIOD_BENCH_ROUNDS` the number of rounds (default 3), and
//! `VFIOD_BENCH_KINDS` (words of the request labels, comma-separated)
//! keeps only some request kinds of section 1.

mod nginx;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fakeproc::{alias_node, dev_numbers, FakeProc};
use common::fakesys::{DeviceSpec, FakeSys, TempDir};
use common::simkernel::SimKernel;
use common::Daemon;
use http_body_util::{BodyExt, Full};
use hyper::Request;

const CONNECTIONS: usize = 64;
const DEVICES: usize = 1000;

fn main() {
    if let Ok(spec) = std::env::var("VFIOD_BENCH_CEILING") {
        return ceiling_server(&spec);
    }
    if let Ok(spec) = std::env::var(common::flood::HELPER_ENV) {
        return common::flood::helper_main(&spec);
    }
    let seconds: f64 = std::env::var("VFIOD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("VFIOD_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(3);
    println!(
        "vfiod benchmark ({} cores, {seconds} s per load run, {rounds} rounds; load average at start: {})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load_average()
    );
    let only = std::env::var("VFIOD_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    if run("api") {
        api_benchmark(Duration::from_secs_f64(seconds), rounds);
    }
    if run("startup") {
        startup_benchmark();
    }
    if run("bind") {
        bind_benchmark();
    }
    if run("events") {
        event_benchmark();
    }
    if run("fanout") {
        fanout_benchmark();
    }
    if run("fairshare") {
        fair_share_benchmark();
    }
    if run("holders") {
        holder_scan_benchmark();
    }
    println!("\nload average at the end: {}", load_average());
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn fair_share_benchmark() {
    println!("\n6. Fair share: root and an access group member asking while unprivileged uids flood the socket");
    if !common::flood::is_root() {
        println!("  skipped: needs root to start the flooding clients as other uids");
        return;
    }
    let (_fs, d, group_gid) = common::flood::start_daemon();
    let baseline = common::flood::status_kib(d.pid(), "VmRSS:");
    let rows = common::flood::run_floods(&d, group_gid);
    common::flood::print_table(baseline, &rows);
}

/// The minimal hyper server: answers each path with the file of that name
/// under a directory (read once at start), like nginx does from disk.
fn ceiling_server(spec: &str) {
    let (socket, root) = spec.split_once(',').unwrap();
    let mut bodies = HashMap::new();
    let mut dirs = vec![PathBuf::from(root)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                bodies.insert(
                    format!("/{rel}"),
                    Bytes::from(std::fs::read(&path).unwrap()),
                );
            }
        }
    }
    let bodies = Arc::new(bodies);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(vfiod::RUNTIME_WORKER_THREADS)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = bodies.get(req.uri().path()).cloned();
                    async move {
                        let mut resp =
                            hyper::Response::new(Full::new(body.clone().unwrap_or_default()));
                        if body.is_none() {
                            *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                        }
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

#[derive(Clone, Copy)]
struct LoadResult {
    requests: u64,
    seconds: f64,
    p99_us: f64,
    bytes_per_response: usize,
    /// CPU the server's processes spent in the run: user, system (s).
    cpu: (f64, f64),
}

/// User and system CPU seconds of `pids` so far, exited threads included.
fn cpu_seconds(pids: &[i32]) -> (f64, f64) {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut total = (0.0, 0.0);
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime and stime: fields 14 and 15, the 12th and 13th after the name.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        total.0 += field(11) / tick;
        total.1 += field(12) / tick;
    }
    total
}

/// `load`, and the CPU `server` (its processes) spent serving it.
fn load_measured(
    server: &[i32],
    socket: &Path,
    paths: &[String],
    duration: Duration,
) -> LoadResult {
    let before = cpu_seconds(server);
    let mut r = load(socket, paths, duration);
    let after = cpu_seconds(server);
    r.cpu = (after.0 - before.0, after.1 - before.1);
    r
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// `CONNECTIONS` keep-alive connections hammering `paths` (round robin)
/// for `duration`.
///
/// The client is a plain HTTP/1.1 loop per connection (write the request,
/// read the head, read `Content-Length` bytes), not hyper's client: with
/// small answers the load generator shares the 2 cores with the server,
/// and hyper's client hands every request and response between two tasks,
/// which costs about as much as a small answer does to serve and hides
/// the servers' differences.
fn load(socket: &Path, paths: &[String], duration: Duration) -> LoadResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        paths
            .iter()
            .map(|p| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes())
            .collect(),
    );
    rt.block_on(async move {
        let deadline = Instant::now() + duration;
        let mut tasks = Vec::new();
        for c in 0..CONNECTIONS {
            let socket = socket.to_owned();
            let requests = requests.clone();
            tasks.push(tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                let mut latencies = Vec::new();
                let mut size = 0;
                let mut i = c;
                while Instant::now() < deadline {
                    let request = &requests[i % requests.len()];
                    i += 1;
                    let t = Instant::now();
                    stream.write_all(request).await.unwrap();
                    // The head, then the rest of the body.
                    let mut filled = 0;
                    let head_end = loop {
                        let n = stream.read(&mut buf[filled..]).await.unwrap();
                        assert!(n > 0, "the server closed the connection");
                        filled += n;
                        if let Some(end) = memchr::memmem::find(&buf[..filled], b"\r\n\r\n") {
                            break end + 4;
                        }
                        assert!(filled < buf.len(), "response head larger than 64 KiB");
                    };
                    let head = std::str::from_utf8(&buf[..head_end]).unwrap();
                    assert!(
                        head.starts_with("HTTP/1.1 200"),
                        "{}: {}",
                        String::from_utf8_lossy(&request[..request.len() - 4]),
                        head.lines().next().unwrap_or("")
                    );
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .expect("a Content-Length");
                    let mut left = length - (filled - head_end);
                    while left > 0 {
                        let want = left.min(buf.len());
                        let n = stream.read(&mut buf[..want]).await.unwrap();
                        assert!(n > 0, "the server closed the connection mid-body");
                        left -= n;
                    }
                    size = length;
                    latencies.push(t.elapsed().as_micros() as u32);
                }
                (latencies, size)
            }));
        }
        let started = Instant::now();
        let mut all = Vec::new();
        let mut size = 0;
        for t in tasks {
            let (l, s) = t.await.unwrap();
            all.extend(l);
            size = s;
        }
        let seconds = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64;
        LoadResult {
            requests: all.len() as u64,
            seconds,
            p99_us: pct(0.99),
            bytes_per_response: size,
            cpu: (0.0, 0.0),
        }
    })
}

fn peak_rss_kib(pid: i32) -> u64 {
    common::flood::status_kib(pid, "VmHWM:")
}

/// Starts a new peak (`VmHWM`) at the current RSS, so that a peak can be
/// told apart per request kind; false where the kernel does not allow it.
fn reset_peak_rss(pid: i32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// A fake host of `n` GPUs, each in its own IOMMU group, on nvidia.
fn big_host(n: usize) -> FakeSys {
    let fs = FakeSys::new();
    fs.load_vfio();
    for i in 0..n {
        fs.add_device(
            DeviceSpec::new(&host_address(i), 0x10de, 0x2236, 0x030200)
                .driver("nvidia")
                .group(100 + i as u32),
        );
    }
    fs
}

fn host_address(i: usize) -> String {
    format!("0000:{:02x}:{:02x}.{}", 0x10 + i / 64, (i % 64) / 2, i % 2)
}

/// The tags of the benchmark's device `i`: half are in pool `a`, and each
/// has a slot of its own.
fn bench_tags(i: usize) -> [(&'static str, String); 2] {
    [
        (
            "pool",
            if i.is_multiple_of(2) { "a" } else { "b" }.to_owned(),
        ),
        ("slot", format!("s{i}")),
    ]
}

/// Starts (again) the daemon's process with `VFIOD_LOG` at `level` and
/// waits until its socket answers.
fn respawn(d: &mut Daemon, level: &str) {
    d.kill9();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&d.log)
        .unwrap();
    let child = d
        .command()
        .env("VFIOD_LOG", level)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    d.child = Some(child);
    d.wait_ready();
}

/// One kind of request: the path vfiod is asked, the file nginx and hyper
/// answer with vfiod's own answer to it, and the target (vfiod / nginx).
struct Kind {
    label: &'static str,
    vfiod_paths: Vec<String>,
    static_paths: Vec<String>,
    target: Option<f64>,
}

fn api_benchmark(run_for: Duration, rounds: usize) {
    println!("\n1. API over the Unix socket: {DEVICES} registered devices, {CONNECTIONS} keep-alive connections");
    let fs = big_host(DEVICES);
    let mut d = Daemon::start(&fs, &[]);
    // At the level a user runs it (the test harness logs at debug).
    respawn(&mut d, "info");
    let t = Instant::now();
    for i in 0..DEVICES {
        let tags: Vec<String> = bench_tags(i)
            .iter()
            .map(|(k, v)| format!(r#""{k}":"{v}""#))
            .collect();
        let r = d.post(
            "/devices",
            &format!(
                r#"{{"pci_address":"{}","name":"gpu{i}","tags":{{{}}}}}"#,
                host_address(i),
                tags.join(",")
            ),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let reg = t.elapsed();
    let registering_peak = peak_rss_kib(d.pid());
    println!(
        "  registering {DEVICES} devices one by one: {:.2} s ({:.2} ms each, durable); vfiod peak RSS {:.1} MiB",
        reg.as_secs_f64(),
        reg.as_secs_f64() * 1000.0 / DEVICES as f64,
        registering_peak as f64 / 1024.0
    );

    let kinds = vec![
        Kind {
            label: "GET /devices (full list)",
            vfiod_paths: vec!["/devices".into()],
            static_paths: vec!["/list.json".into()],
            target: Some(0.9),
        },
        Kind {
            label: "GET /devices/{name}",
            vfiod_paths: (0..DEVICES).map(|i| format!("/devices/gpu{i}")).collect(),
            static_paths: (0..DEVICES)
                .map(|i| format!("/devices/gpu{i}.json"))
                .collect(),
            target: Some(1.2),
        },
        Kind {
            label: "GET /devices?tags[pool]=a (half)",
            vfiod_paths: vec!["/devices?tags%5Bpool%5D=a".into()],
            static_paths: vec!["/half.json".into()],
            target: Some(0.9),
        },
        Kind {
            label: "GET /devices?tags[slot]=sN (one)",
            vfiod_paths: (0..DEVICES)
                .map(|i| format!("/devices?tags%5Bslot%5D=s{i}"))
                .collect(),
            static_paths: (0..DEVICES).map(|i| format!("/slot/s{i}.json")).collect(),
            target: Some(0.9),
        },
        Kind {
            label: "GET /devices/available",
            vfiod_paths: vec!["/devices/available".into()],
            static_paths: vec!["/available.json".into()],
            target: None,
        },
        Kind {
            label: "GET /metrics",
            vfiod_paths: vec!["/metrics".into()],
            static_paths: vec!["/metrics.txt".into()],
            target: None,
        },
    ];

    // `VFIOD_BENCH_KINDS=name,tags` keeps only the kinds whose label holds
    // one of the words (for profiling one path).
    let mut kinds = kinds;
    if let Ok(words) = std::env::var("VFIOD_BENCH_KINDS") {
        kinds.retain(|k| words.split(',').any(|w| k.label.contains(w.trim())));
    }
    println!("  vfiod pid {}", d.pid());

    // vfiod's own answers, as files.
    let dir = TempDir::new("vfiod-bench-ceiling").unwrap();
    let root = dir.path().join("root");
    for kind in &kinds {
        for (asked, file) in kind.vfiod_paths.iter().zip(&kind.static_paths) {
            let r = d.get(asked);
            assert_eq!(r.status, 200, "{asked}: {}", r.body);
            let path = root.join(file.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, r.body.as_bytes()).unwrap();
        }
    }
    let half = d.get("/devices?tags%5Bpool%5D=a").json();
    assert_eq!(half.as_array().map(Vec::len), Some(DEVICES / 2));

    let nginx = match nginx::ensure_installed().and_then(|bin| {
        let ndir = dir.path().join("nginx");
        std::fs::create_dir_all(&ndir).unwrap();
        nginx::Nginx::start(&bin, &ndir, &root, vfiod::RUNTIME_WORKER_THREADS)
    }) {
        Ok(n) => Some(n),
        Err(why) => {
            println!("  no nginx ceiling: {why}");
            None
        }
    };
    let hyper_socket = dir.path().join("hyper.sock");
    let mut hyper_server = std::process::Command::new(std::env::current_exe().unwrap())
        .env(
            "VFIOD_BENCH_CEILING",
            format!("{},{}", hyper_socket.display(), root.display()),
        )
        .spawn()
        .unwrap();
    common::eventually(10, "hyper ceiling server", || {
        UnixStream::connect(&hyper_socket).ok().map(|_| ())
    });

    let nginx_pids = nginx.as_ref().map_or(vec![], |n| n.pids());
    let hyper_pid = [hyper_server.id() as i32];
    // results[kind][server] = one LoadResult per round; servers: vfiod,
    // nginx, hyper.
    let mut results: Vec<[Vec<LoadResult>; 3]> = kinds.iter().map(|_| Default::default()).collect();
    // vfiod's peak RSS while serving each kind, and overall (the peak
    // counter restarts before each vfiod run where the kernel allows it).
    let mut overall_peak = registering_peak.max(peak_rss_kib(d.pid()));
    let peaks_per_kind = reset_peak_rss(d.pid());
    let mut kind_peak = vec![0u64; kinds.len()];
    for round in 0..rounds {
        for (k, kind) in kinds.iter().enumerate() {
            for turn in 0..3 {
                let server = (turn + round + k) % 3;
                let r = match server {
                    0 => {
                        overall_peak = overall_peak.max(peak_rss_kib(d.pid()));
                        reset_peak_rss(d.pid());
                        let r = load_measured(&[d.pid()], &d.socket, &kind.vfiod_paths, run_for);
                        let peak = peak_rss_kib(d.pid());
                        kind_peak[k] = kind_peak[k].max(peak);
                        overall_peak = overall_peak.max(peak);
                        r
                    }
                    1 => match &nginx {
                        Some(n) => {
                            load_measured(&nginx_pids, &n.socket, &kind.static_paths, run_for)
                        }
                        None => continue,
                    },
                    _ => load_measured(&hyper_pid, &hyper_socket, &kind.static_paths, run_for),
                };
                results[k][server].push(r);
            }
        }
    }
    let rss = overall_peak.max(peak_rss_kib(d.pid()));
    let _ = hyper_server.kill();
    let _ = hyper_server.wait();
    drop(nginx);

    println!(
        "  medians of {rounds} rounds, {:.1} s per run; vfiod/nginx is the median of each round's ratio",
        run_for.as_secs_f64()
    );
    println!(
        "  {:<34} {:>9} | {:>9} {:>8} | {:>9} {:>8} | {:>11} {:>6} | {:>9} {:>11} | {:>8}",
        "request",
        "body",
        "vfiod/s",
        "p99 ms",
        "nginx/s",
        "p99 ms",
        "vfiod/nginx",
        "target",
        "hyper/s",
        "vfiod/hyper",
        "RSS MiB"
    );
    for ((kind, per_server), peak) in kinds.iter().zip(&results).zip(&kind_peak) {
        let [v, n, h] = per_server;
        let med = |rs: &[LoadResult], f: fn(&LoadResult) -> f64| {
            let mut xs: Vec<f64> = rs.iter().map(f).collect();
            xs.sort_by(f64::total_cmp);
            xs.get(xs.len() / 2).copied()
        };
        let ratio = |other: &[LoadResult]| {
            let mut xs: Vec<f64> = v
                .iter()
                .zip(other)
                .map(|(a, b)| a.rps() / b.rps())
                .collect();
            xs.sort_by(f64::total_cmp);
            xs.get(xs.len() / 2).copied()
        };
        let show =
            |x: Option<f64>, digits: usize| x.map_or("-".to_owned(), |x| format!("{x:.digits$}"));
        let to_nginx = ratio(n);
        let target = kind.target.map_or("-".to_owned(), |t| {
            let met = to_nginx.map_or("", |r| if r >= t { " ok" } else { " no" });
            format!(">={t}{met}")
        });
        let peak = if peaks_per_kind {
            format!("{:.1}", *peak as f64 / 1024.0)
        } else {
            "-".to_owned()
        };
        println!(
            "  {:<34} {:>9} | {:>9} {:>8} | {:>9} {:>8} | {:>11} {:>6} | {:>9} {:>11} | {:>8}",
            kind.label,
            human_bytes(v.first().map_or(0, |r| r.bytes_per_response)),
            show(med(v, LoadResult::rps), 0),
            show(med(v, |r| r.p99_us / 1000.0), 2),
            show(med(n, LoadResult::rps), 0),
            show(med(n, |r| r.p99_us / 1000.0), 2),
            show(to_nginx, 2),
            target,
            show(med(h, LoadResult::rps), 0),
            show(ratio(h), 2),
            peak,
        );
    }
    println!("  CPU per request, median of the rounds: user + system microseconds the server's processes spent per answer");
    println!(
        "  {:<34} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
        "request", "vfiod us", "sys", "nginx us", "sys", "hyper us", "sys"
    );
    for (kind, per_server) in kinds.iter().zip(&results) {
        let per_request = |rs: &[LoadResult], f: fn(&LoadResult) -> f64| {
            let mut xs: Vec<f64> = rs
                .iter()
                .map(|r| f(r) * 1e6 / r.requests.max(1) as f64)
                .collect();
            xs.sort_by(f64::total_cmp);
            xs.get(xs.len() / 2)
                .map_or("-".to_owned(), |x| format!("{x:.1}"))
        };
        let cells: Vec<String> = per_server
            .iter()
            .flat_map(|rs| {
                [
                    per_request(rs, |r| r.cpu.0 + r.cpu.1),
                    per_request(rs, |r| r.cpu.1),
                ]
            })
            .collect();
        println!(
            "  {:<34} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
            kind.label, cells[0], cells[1], cells[2], cells[3], cells[4], cells[5]
        );
    }
    println!(
        "  vfiod peak RSS (VmHWM) over registering and all of the load: {:.1} MiB (target <= 32 MiB); RSS MiB is the peak while serving that kind",
        rss as f64 / 1024.0
    );
    println!("  load average now: {}", load_average());
}

fn human_bytes(n: usize) -> String {
    if n >= 10_000 {
        format!("{} KB", n / 1000)
    } else {
        format!("{n} B")
    }
}

/// Writes a registry of `n` devices of `big_host(n)` straight into the
/// state directory (registering 10,000 through the API would take longer
/// than the benchmark is meant to).
fn write_registry(state_dir: &Path, n: usize) {
    use vfiod::registry::{store::Store, DeviceRecord, Registry};
    let records = (0..n).map(|i| {
        let f = vfiod::pci::PciFunction {
            address: host_address(i).parse().unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2236,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x030200,
            driver: Some("nvidia".into()),
            iommu_group: Some(100 + i as u32),
            modalias: None,
            own_vfio_provider: false,
        };
        let tags = bench_tags(i)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        DeviceRecord::registered(format!("bench{i:05}"), format!("gpu{i}"), &f, tags)
    });
    let registry = Registry::from_records(records).unwrap();
    Store::open(state_dir).unwrap().save(&registry).unwrap();
}

/// How long one start may take before the benchmark gives up on it.
const STARTUP_BOUND: Duration = Duration::from_secs(30);

/// User + system CPU time a process has used, from `/proc/PID/stat`.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// One start: exec to READY=1 on a notify socket, exec to the first
/// answer on the API socket, and the CPU time used until READY.
struct Start {
    ready: Duration,
    answer: Duration,
    cpu: Duration,
}

/// Measures one start; `None` if READY did not come within
/// [`STARTUP_BOUND`] (the process is then killed).
fn time_startup(d: &mut Daemon) -> Option<Start> {
    let dir = TempDir::new("vfiod-bench-notify").unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    d.kill9();
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("VFIOD_LOG", "info");
    let socket = d.socket.clone();
    let t = Instant::now();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/tmp/perf-startup-daemon.log")
        .unwrap();
    let child = cmd.stderr(log).spawn().unwrap();
    d.child = Some(child);
    let first_answer = std::thread::spawn(move || {
        while t.elapsed() < STARTUP_BOUND {
            if let Ok(mut s) = UnixStream::connect(&socket) {
                let _ =
                    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200") {
                    return Some(t.elapsed());
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        None
    });
    let mut buf = [0u8; 4096];
    let ready = loop {
        let left = STARTUP_BOUND.saturating_sub(t.elapsed());
        if left.is_zero() {
            break None;
        }
        notify.set_read_timeout(Some(left)).unwrap();
        match notify.recv(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => {
                break Some(t.elapsed())
            }
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    let cpu = cpu_time(d.pid());
    if ready.is_none() {
        d.kill9();
    }
    let answer = first_answer.join().unwrap();
    Some(Start {
        ready: ready?,
        answer: answer?,
        cpu,
    })
}

fn startup_benchmark() {
    println!("\n2. Startup: exec to READY (sd_notify) and to the first answer, registered devices all present");
    let mut medians = Vec::new();
    for n in [1000, 10_000] {
        let t = Instant::now();
        let fs = big_host(n);
        let built = t.elapsed();
        let mut d = Daemon::start(&fs, &[]);
        d.kill9();
        write_registry(&d.state_dir, n);
        let mut ready = Vec::new();
        let mut answer = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..5 {
            match time_startup(&mut d) {
                Some(start) => {
                    ready.push(start.ready);
                    answer.push(start.answer);
                    cpu.push(start.cpu);
                }
                None => break,
            }
        }
        if ready.is_empty() {
            println!(
                "  {n:>6} devices: not READY within {} s (fake tree built in {:.1} s)",
                STARTUP_BOUND.as_secs(),
                built.as_secs_f64()
            );
            medians.push(None);
            continue;
        }
        assert_eq!(
            d.get("/health").json()["registered_devices"],
            n,
            "the registry written for the benchmark was loaded"
        );
        let ms = |v: &[Duration]| {
            v.iter()
                .map(|x| format!("{:.0}", x.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (r, a) = (median(ready.clone()), median(answer.clone()));
        println!(
            "  {n:>6} devices: READY median {:>7.1} ms ({} ms), first answer median {:>7.1} ms ({} ms); CPU until READY median {:.0} ms; fake tree built in {:.1} s",
            r.as_secs_f64() * 1000.0,
            ms(&ready),
            a.as_secs_f64() * 1000.0,
            ms(&answer),
            median(cpu).as_secs_f64() * 1000.0,
            built.as_secs_f64()
        );
        medians.push(Some((r, a)));
    }
    if let [Some(small), Some(large)] = medians[..] {
        println!(
            "  10,000 / 1,000: READY {:.1}x, first answer {:.1}x (linear is 10x; target <= 12x, and 10,000 under 500 ms)",
            large.0.as_secs_f64() / small.0.as_secs_f64(),
            large.1.as_secs_f64() / small.1.as_secs_f64()
        );
    }
    println!("  load average now: {}", load_average());
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wait_driver(fs: &FakeSys, addr: &str, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs.driver_of(addr).as_deref() != want {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn bind_benchmark() {
    println!("\n3. Bind/unbind cycle on the simulated kernel (one NIC-like function)");
    let fs = FakeSys::new();
    fs.load_vfio();
    let addr = "0000:00:02.0";
    fs.add_device(
        DeviceSpec::new(addr, 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(2),
    );
    let sim = SimKernel::start(&fs);
    let d = Daemon::start(&fs, &[]);
    d.register(addr, "nic");
    let rounds = 30;
    let mut api = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        assert_eq!(d.post("/devices/nic/bind", "").status, 200);
        assert_eq!(d.post("/devices/nic/unbind", "").status, 200);
        api.push(t.elapsed());
    }
    // The same writes, done directly, waiting for the simulated kernel the
    // same way (polling the driver link).
    let w = |rel: &str, v: &str| std::fs::write(fs.path(rel), v).unwrap();
    let mut raw = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        w(
            &format!("bus/pci/devices/{addr}/driver_override"),
            "vfio-pci",
        );
        w("bus/pci/drivers/e1000e/unbind", addr);
        wait_driver(&fs, addr, None);
        w("bus/pci/drivers_probe", addr);
        wait_driver(&fs, addr, Some("vfio-pci"));
        w(&format!("bus/pci/devices/{addr}/driver_override"), "\n");
        w("bus/pci/drivers/vfio-pci/unbind", addr);
        wait_driver(&fs, addr, None);
        w("bus/pci/drivers_probe", addr);
        wait_driver(&fs, addr, Some("e1000e"));
        raw.push(t.elapsed());
    }
    drop(sim);
    let (a, r) = (median(api), median(raw));
    println!(
        "  through the API (bind + unbind, 2 requests, holder scans of this machine's /proc, 4 registry saves): median {:.2} ms",
        a.as_secs_f64() * 1000.0
    );
    println!(
        "  the same sysfs writes done directly:                                                               median {:.2} ms",
        r.as_secs_f64() * 1000.0
    );
    println!(
        "  API / direct: {:.2}x; vfiod's own cost per cycle: {:.2} ms",
        a.as_secs_f64() / r.as_secs_f64(),
        (a.as_secs_f64() - r.as_secs_f64()) * 1000.0
    );
}

fn event_benchmark() {
    println!("\n4. Uevent to visible state (registered device, remove/add alternating)");
    let fs = FakeSys::new();
    fs.load_vfio();
    let addr = "0000:00:03.0";
    fs.add_device(DeviceSpec::new(addr, 0x1234, 0x11e8, 0x00ff00).group(3));
    let fifo: PathBuf = fs.tmp_root().join("uevents");
    let fifo_arg = fifo.display().to_string();
    let d = Daemon::start(&fs, &["--uevent-fifo", &fifo_arg]);
    d.register(addr, "edu");
    let mut events = common::EventStream::open(&d.socket, "");
    let mut to_list = Vec::new();
    let mut to_stream = Vec::new();
    let mut fifo_w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    for i in 0..100 {
        let (action, present) = if i % 2 == 0 {
            ("remove", false)
        } else {
            ("add", true)
        };
        let t = Instant::now();
        writeln!(fifo_w, "{action} {addr}").unwrap();
        events.until(|e| e["type"] == format!("hotplug_{action}"));
        to_stream.push(t.elapsed());
        loop {
            let dev = d.get("/devices/edu").json();
            if dev["present"] == present {
                break;
            }
        }
        to_list.push(t.elapsed());
    }
    println!(
        "  event to the event stream: median {:.2} ms, max {:.2} ms",
        median(to_stream.clone()).as_secs_f64() * 1000.0,
        to_stream.iter().max().unwrap().as_secs_f64() * 1000.0
    );
    println!(
        "  event to GET /devices:     median {:.2} ms, max {:.2} ms",
        median(to_list.clone()).as_secs_f64() * 1000.0,
        to_list.iter().max().unwrap().as_secs_f64() * 1000.0
    );
}

const SUBSCRIBERS: usize = 1000;
const CHANGES: usize = 1000;

/// What one subscriber of `GET /events` got.
#[derive(Default)]
struct Delivered {
    seqs: Vec<u64>,
    /// Change (the event's `at`) to the moment its bytes arrived, in µs.
    delays_us: Vec<i64>,
    missed: u64,
}

#[derive(serde::Deserialize)]
struct WireEvent<'a> {
    seq: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    at: &'a str,
    missed: Option<u64>,
}

async fn subscribe(socket: PathBuf, subscribed: tokio::sync::mpsc::Sender<()>) -> Delivered {
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/events")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert!(resp.status().is_success(), "GET /events: {}", resp.status());
    subscribed.send(()).await.unwrap();
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let mut got = Delivered::default();
    while got.seqs.len() + (got.missed as usize) < CHANGES {
        let frame = match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            _ => break,
        };
        let now = chrono::Utc::now();
        if let Some(data) = frame.data_ref() {
            pending.extend_from_slice(data);
        }
        let mut consumed = 0;
        while let Some(end) = memchr::memchr(b'\n', &pending[consumed..]) {
            let line = &pending[consumed..consumed + end];
            consumed += end + 1;
            let e: WireEvent = serde_json::from_slice(line).unwrap();
            if e.kind == "lagged" {
                got.missed += e.missed.unwrap_or(0);
                continue;
            }
            let at = chrono::DateTime::parse_from_rfc3339(e.at).unwrap();
            got.delays_us.push(
                (now - at.with_timezone(&chrono::Utc))
                    .num_microseconds()
                    .unwrap(),
            );
            got.seqs.push(e.seq);
        }
        pending.drain(..consumed);
    }
    got
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn fanout_benchmark() {
    println!("\n5. Event fan-out: {SUBSCRIBERS} subscribers of GET /events, a burst of {CHANGES} registry changes (uevents written at once)");
    raise_fd_limit();
    let fs = FakeSys::new();
    fs.load_vfio();
    let addrs: Vec<String> = (0..8).map(host_address).collect();
    for (i, a) in addrs.iter().enumerate() {
        fs.add_device(
            DeviceSpec::new(a, 0x10de, 0x2236, 0x030200)
                .driver("nvidia")
                .group(100 + i as u32),
        );
    }
    let fifo: PathBuf = fs.tmp_root().join("uevents");
    let fifo_arg = fifo.display().to_string();
    let mut d = Daemon::start(&fs, &["--uevent-fifo", &fifo_arg]);
    respawn(&mut d, "info");
    for (i, a) in addrs.iter().enumerate() {
        d.register(a, &format!("gpu{i}"));
    }
    let first_seq = d.get("/health").json()["last_event_seq"].as_u64().unwrap() + 1;
    // Each line flips a registered device's presence: one registry change
    // and one event each.
    let burst: String = (0..CHANGES)
        .map(|i| {
            let action = if i % 2 == 0 { "remove" } else { "add" };
            format!("{action} {}\n", addrs[(i / 2) % addrs.len()])
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = d.socket.clone();
    let (subscribed_in, burst_took, delivered) = rt.block_on(async move {
        let t = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::channel(SUBSCRIBERS);
        let tasks: Vec<_> = (0..SUBSCRIBERS)
            .map(|_| tokio::spawn(subscribe(socket.clone(), tx.clone())))
            .collect();
        for _ in 0..SUBSCRIBERS {
            rx.recv().await.unwrap();
        }
        let subscribed_in = t.elapsed();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            w.write_all(burst.as_bytes()).unwrap();
        })
        .await
        .unwrap();
        let mut delivered = Vec::new();
        for task in tasks {
            delivered.push(task.await.unwrap());
        }
        (subscribed_in, t.elapsed(), delivered)
    });
    let expected: Vec<u64> = (first_seq..first_seq + CHANGES as u64).collect();
    let complete = delivered.iter().filter(|g| g.seqs == expected).count();
    let missed: u64 = delivered.iter().map(|g| g.missed).sum();
    let short = delivered
        .iter()
        .filter(|g| g.seqs.len() + (g.missed as usize) < CHANGES)
        .count();
    let mut delays: Vec<i64> = delivered
        .iter()
        .flat_map(|g| g.delays_us.iter().copied())
        .collect();
    delays.sort_unstable();
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)))
            .map_or(f64::NAN, |&us| us as f64 / 1000.0)
    };
    println!(
        "  {SUBSCRIBERS} subscribed in {:.2} s; the burst was delivered to all in {:.2} s ({} deliveries)",
        subscribed_in.as_secs_f64(),
        burst_took.as_secs_f64(),
        delays.len()
    );
    println!(
        "  change to delivery: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "  subscribers that got every event in order: {complete} of {SUBSCRIBERS}; events reported missed (lagged): {missed}; subscribers cut short: {short}"
    );
    println!("  load average now: {}", load_average());
}

const SCAN_PROCESSES: u32 = 2000;
const SCAN_FDS_PER_PROCESS: u32 = 100;

/// A maps file the size of a small daemon's: the binary, libc and friends.
fn background_maps(pid: u32) -> String {
    let mut maps = String::new();
    for (i, lib) in [
        "/usr/bin/daemon",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    ]
    .iter()
    .enumerate()
    {
        for (j, perms) in ["r--p", "r-xp", "r--p", "rw-p"].iter().enumerate() {
            maps.push_str(&format!(
                "7f{pid:04x}{i:02x}{j:x}000-7f{pid:04x}{i:02x}{j:x}fff {perms} 00000000 fe:01 {}    {lib}\n",
                1000 + i
            ));
        }
    }
    maps.push_str("7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0          [stack]\n");
    maps
}

fn holder_scan_benchmark() {
    use vfiod::pci::holders::{self, ProcFs};
    use vfiod::pci::{PciAddress, Sysfs};

    println!(
        "\n7. Holder scan: fake /proc of {SCAN_PROCESSES} processes x {SCAN_FDS_PER_PROCESS} descriptors"
    );
    let fs = FakeSys::standard_host();
    let proc = FakeProc::new();
    // The moved functions: the T4 on vfio-pci (its group node) and the AMD
    // GPU (DRM nodes, a framebuffer, the console on it).
    let group_node = fs.dev_path("vfio/4");
    alias_node(&group_node, "/dev/urandom");
    let amd = "0000:00:05.0";
    fs.add_class_device(amd, "drm/card0", "drm", Some(&dev_numbers("/dev/full")));
    fs.add_class_device(
        amd,
        "drm/renderD128",
        "drm",
        Some(&dev_numbers("/dev/random")),
    );
    fs.add_class_device(
        amd,
        "graphics/fb0",
        "graphics",
        Some(&dev_numbers("/dev/tty")),
    );
    fs.add_vtconsole(1, "(M) frame buffer device", true);
    let card = fs.dev_path("dri/card0");
    alias_node(&card, "/dev/full");
    let other_node = fs.dev_path("dri/card1");
    alias_node(&other_node, "/dev/zero");
    let files: Vec<PathBuf> = (0..64)
        .map(|i| {
            let path = proc.root.parent().unwrap().join(format!("files/log{i}"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "x").unwrap();
            path
        })
        .collect();

    let t = Instant::now();
    for pid in 1..=SCAN_PROCESSES {
        let mut p = proc.process(pid, &format!("proc{pid}"));
        p.maps(&background_maps(pid));
        for n in 0..SCAN_FDS_PER_PROCESS {
            match n % 20 {
                0..=6 => p.fd(format!("socket:[{}]", pid * 1000 + n)),
                7..=9 => p.fd(format!("pipe:[{}]", pid * 1000 + n)),
                10 => p.fd("anon_inode:[eventfd]"),
                11 => p.fd("anon_inode:[eventpoll]"),
                12 => p.fd("anon_inode:[timerfd]"),
                13..=16 => p.fd(&files[((pid + n) % 64) as usize]),
                17 | 18 => p.fd("/dev/null"),
                // A few device nodes, none of them the moved functions'.
                _ => p.fd(&other_node),
            };
        }
        // A handful of real holders.
        if pid % 500 == 0 {
            p.fd(&card);
        }
        if pid == 1234 {
            p.fd(&group_node);
        }
    }
    println!(
        "  building the fake tree: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let sysfs = Sysfs::new(&fs.sysfs, &fs.devfs);
    let procfs = ProcFs::new(&proc.root);
    let functions: Vec<PciAddress> = ["0000:00:04.0", amd]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    // The first scan fills the dentry cache for the fake tree (the real
    // /proc builds its entries on every lookup anyway): not counted.
    let found = holders::scan(&sysfs, &procfs, &functions).unwrap().len();
    println!("  {found} holders found (6 expected)");
    let default = holders::default_threads();
    let mut thread_counts = vec![NonZeroUsize::MIN];
    if default.get() > 1 {
        thread_counts.push(default);
    }
    for &threads in &thread_counts {
        let (wall, cpu) = time_scans(11, || {
            holders::scan_report_with_threads(&sysfs, &procfs, &functions, threads).unwrap();
        });
        println!(
            "  scan of 2 functions, {threads} thread(s): wall median {:.1} ms (min {:.1}, max {:.1}); CPU {:.1} ms per scan",
            median(wall.clone()).as_secs_f64() * 1000.0,
            wall.iter().min().unwrap().as_secs_f64() * 1000.0,
            wall.iter().max().unwrap().as_secs_f64() * 1000.0,
            cpu.as_secs_f64() * 1000.0
        );
    }

    // The same scan on this machine's real /proc (reads only), for what a
    // descriptor costs there.
    let real_proc = ProcFs::new("/proc");
    let (processes, descriptors) = count_real_descriptors();
    let (wall, cpu) = time_scans(11, || {
        holders::scan(&sysfs, &real_proc, &functions).unwrap();
    });
    println!(
        "  same scan on this machine's /proc ({processes} processes, {descriptors} descriptors): wall median {:.1} ms; CPU {:.1} ms per scan ({:.2} us per descriptor)",
        median(wall).as_secs_f64() * 1000.0,
        cpu.as_secs_f64() * 1000.0,
        cpu.as_secs_f64() * 1e6 / descriptors.max(1) as f64
    );
    println!(
        "  (load average now: {}; wall time on a shared machine includes waiting for a CPU, CPU time does not)",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// `runs` timings of `scan`, and the process CPU time (every thread) per
/// run, averaged.
fn time_scans(runs: u32, mut scan: impl FnMut()) -> (Vec<Duration>, Duration) {
    let cpu_now = || {
        Duration::from(
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap(),
        )
    };
    let mut wall = Vec::new();
    let cpu_start = cpu_now();
    for _ in 0..runs {
        let t = Instant::now();
        scan();
        wall.push(t.elapsed());
    }
    (wall, (cpu_now() - cpu_start) / runs)
}

fn count_real_descriptors() -> (usize, usize) {
    let mut processes = 0;
    let mut descriptors = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        processes += 1;
        descriptors += std::fs::read_dir(entry.path().join("fd"))
            .map(|d| d.count())
            .unwrap_or(0);
    }
    (processes, descriptors)
}
