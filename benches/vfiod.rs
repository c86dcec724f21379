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
//!    unprivileged uids (`tests/common/flood.rs`, the same scenarios
//!    `tests/fairshare.rs` asserts on).

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
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
    api_benchmark(seconds);
    bind_benchmark();
    event_benchmark();
    fair_share_benchmark();
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
