//! Measures vfiod, it does not judge it: run with `cargo bench --bench vfiod`
//! and read the table. Everything runs on this machine over Unix sockets,
//! against a fake sysfs tree (never the real /sys).
//!
//! 1. API throughput and latency: 1,000 registered devices, 64 concurrent
//!    keep-alive connections, `GET /devices` and `GET /devices/{name}`,
//!    side by side with a minimal hyper server (a second process, same
//!    kind of socket) answering a fixed body of the same size: the ceiling.
//! 2. Peak RSS of vfiod, and time from exec to READY (sd_notify) with
//!    1,000 registered devices.
//! 3. Bind/unbind cycles on the simulated kernel, versus the same sysfs
//!    writes done directly: vfiod's overhead per cycle.
//! 4. Uevent to visible state: an injected event until `GET /devices` and
//!    the event stream show it.
//! 5. Fair share (as root only): what root and an access group member get
//!    (answered, p99) and vfiod's RSS, without a flood and under floods of
//!    unprivileged uids (`test-support/src/flood.rs`, the same scenarios
//!    `tests/fairshare.rs` asserts on).
//! 6. The holder scan a move pays before it writes: a fake `/proc` of 2,000
//!    processes with 100 descriptors each (sockets, pipes, anonymous
//!    inodes, regular files, `/dev/null`, a few device nodes) and a maps
//!    file each; then, for scale, the real `/proc` of this machine (read
//!    only, like every scan).
//!
//! `VFIOD_BENCH_ONLY=holders` (or `api`, `bind`, `events`, `fairshare`,
//! comma-separated) runs only those sections.

use std::convert::Infallible;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::net::UnixDatagram;
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
    let seconds: u64 = std::env::var("VFIOD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "vfiod benchmark ({} cores, {seconds} s per load run)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let only = std::env::var("VFIOD_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    if run("api") {
        api_benchmark(seconds);
    }
    if run("bind") {
        bind_benchmark();
    }
    if run("events") {
        event_benchmark();
    }
    if run("fairshare") {
        fair_share_benchmark();
    }
    if run("holders") {
        holder_scan_benchmark();
    }
}

fn fair_share_benchmark() {
    println!("\n5. Fair share: root and an access group member asking while unprivileged uids flood the socket");
    if !common::flood::is_root() {
        println!("  skipped: needs root to start the flooding clients as other uids");
        return;
    }
    let (_fs, d, group_gid) = common::flood::start_daemon();
    let baseline = common::flood::status_kib(d.pid(), "VmRSS:");
    let rows = common::flood::run_floods(&d, group_gid);
    common::flood::print_table(baseline, &rows);
}

/// The minimal hyper server: every request gets the same body.
fn ceiling_server(spec: &str) {
    let (socket, body_file) = spec.split_once(',').unwrap();
    let body = Bytes::from(std::fs::read(body_file).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut resp = hyper::Response::new(Full::new(body));
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

struct LoadResult {
    requests: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    bytes_per_response: usize,
}

/// `CONNECTIONS` keep-alive connections hammering `paths` (round robin).
fn load(socket: &Path, paths: &[String], seconds: u64) -> LoadResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let paths = Arc::new(paths.to_vec());
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for c in 0..CONNECTIONS {
            let socket = socket.to_owned();
            let paths = paths.clone();
            tasks.push(tokio::spawn(async move {
                let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut latencies = Vec::new();
                let mut size = 0;
                let mut i = c;
                while Instant::now() < deadline {
                    let path = &paths[i % paths.len()];
                    i += 1;
                    let req = Request::get(path.as_str())
                        .header("host", "x")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let t = Instant::now();
                    let resp = sender.send_request(req).await.unwrap();
                    assert!(resp.status().is_success(), "{path}: {}", resp.status());
                    size = resp.into_body().collect().await.unwrap().to_bytes().len();
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
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            bytes_per_response: size,
        }
    })
}

fn print_load(label: &str, r: &LoadResult) {
    println!(
        "  {label:<34} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   {:>7} B/resp",
        r.requests as f64 / r.seconds,
        r.p50_us / 1000.0,
        r.p99_us / 1000.0,
        r.bytes_per_response
    );
}

fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn big_host() -> FakeSys {
    let fs = FakeSys::new();
    fs.load_vfio();
    for i in 0..DEVICES {
        let addr = format!("0000:{:02x}:{:02x}.{}", 0x10 + i / 64, (i % 64) / 2, i % 2);
        fs.add_device(
            DeviceSpec::new(&addr, 0x10de, 0x2236, 0x030200)
                .driver("nvidia")
                .group(100 + i as u32),
        );
    }
    fs
}

/// Time from exec to READY=1 on a notify socket.
fn time_to_ready(d: &mut Daemon) -> Duration {
    let dir = TempDir::new("vfiod-bench-notify").unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    d.kill9();
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("VFIOD_LOG", "warn");
    let t = Instant::now();
    let child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    let elapsed = t.elapsed();
    d.child = Some(child);
    d.wait_ready();
    elapsed
}

fn api_benchmark(seconds: u64) {
    println!("\n1. API over the Unix socket: {DEVICES} registered devices, {CONNECTIONS} keep-alive connections");
    let fs = big_host();
    let mut d = Daemon::start(&fs, &[]);
    let addrs: Vec<String> = std::fs::read_dir(fs.path("bus/pci/devices"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let t = Instant::now();
    for (i, a) in addrs.iter().enumerate() {
        let r = d.post(
            "/devices",
            &format!(
                r#"{{"pci_address":"{a}","name":"gpu{i}","tags":{{"pool":"p{}"}}}}"#,
                i % 8
            ),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let reg = t.elapsed();
    println!(
        "  registering {DEVICES} devices one by one: {:.2} s ({:.2} ms each, durable)",
        reg.as_secs_f64(),
        reg.as_secs_f64() * 1000.0 / DEVICES as f64
    );
    let ready: Vec<Duration> = (0..5).map(|_| time_to_ready(&mut d)).collect();
    let mut sorted = ready.clone();
    sorted.sort();
    println!(
        "  exec to READY with {DEVICES} devices: median {:.1} ms (of 5: {:?})",
        sorted[2].as_secs_f64() * 1000.0,
        ready
            .iter()
            .map(|r| format!("{:.1}", r.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
    );

    let list = load(&d.socket, &["/devices".to_string()], seconds);
    let names: Vec<String> = (0..DEVICES).map(|i| format!("/devices/gpu{i}")).collect();
    let one = load(&d.socket, &names, seconds);
    let rss = peak_rss_kib(d.pid());

    // The ceiling: same kind of socket, fixed bodies of the same sizes.
    let dir = TempDir::new("vfiod-bench-ceiling").unwrap();
    let list_body = d.get("/devices").body;
    let one_body = d.get("/devices/gpu1").body;
    let mut ceilings = Vec::new();
    for (tag, body) in [("list", &list_body), ("one", &one_body)] {
        let body_file = dir.path().join(format!("{tag}.json"));
        std::fs::File::create(&body_file)
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let socket = dir.path().join(format!("{tag}.sock"));
        let mut server = std::process::Command::new(std::env::current_exe().unwrap())
            .env(
                "VFIOD_BENCH_CEILING",
                format!("{},{}", socket.display(), body_file.display()),
            )
            .spawn()
            .unwrap();
        common::eventually(10, "ceiling server", || {
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        });
        let r = load(&socket, &["/".to_string()], seconds);
        let _ = server.kill();
        let _ = server.wait();
        ceilings.push(r);
    }
    print_load("vfiod GET /devices", &list);
    print_load("ceiling, same body size", &ceilings[0]);
    print_load("vfiod GET /devices/{name}", &one);
    print_load("ceiling, same body size", &ceilings[1]);
    println!(
        "  throughput vs ceiling: list {:.0}%, one device {:.0}%",
        100.0 * (list.requests as f64 / list.seconds)
            / (ceilings[0].requests as f64 / ceilings[0].seconds),
        100.0 * (one.requests as f64 / one.seconds)
            / (ceilings[1].requests as f64 / ceilings[1].seconds)
    );
    println!(
        "  vfiod peak RSS (VmHWM) after the load: {:.1} MiB",
        rss as f64 / 1024.0
    );
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
    println!("\n2. Bind/unbind cycle on the simulated kernel (one NIC-like function)");
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
        "  through the API (bind + unbind, 2 requests, 4 registry saves): median {:.2} ms",
        a.as_secs_f64() * 1000.0
    );
    println!(
        "  same writes done directly:                                     median {:.2} ms",
        r.as_secs_f64() * 1000.0
    );
    println!(
        "  vfiod's overhead per cycle: {:.2} ms",
        (a.as_secs_f64() - r.as_secs_f64()) * 1000.0
    );
}

fn event_benchmark() {
    println!("\n3. Uevent to visible state (registered device, remove/add alternating)");
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
        "\n6. Holder scan: fake /proc of {SCAN_PROCESSES} processes x {SCAN_FDS_PER_PROCESS} descriptors"
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
