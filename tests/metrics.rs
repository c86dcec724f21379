//! `GET /metrics`: the exposition parses (and passes `promtool check
//! metrics` where Prometheus is installed), and its values follow what
//! happens: a registration, a bind, an unbind, a failed bind, a hotplug
//! removal and a refused request; and the opt-in TCP listener.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::fakesys::FakeSys;
use common::host::Host;
use common::standard::NIC;
use common::{eventually, raw_request, Daemon, EventStream, Response};
use nix::errno::Errno;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};

/// A host with only the standard NIC, vfiod reading uevents from the
/// test's FIFO.
fn host(extra: &[&str]) -> Host {
    Host::builder()
        .on(FakeSys::with_devices([FakeSys::standard_device(NIC)]))
        .uevent_fifo()
        .args(extra)
        .start()
}

/// A scrape, parsed by a strict parser of the text format.
struct Metrics {
    text: String,
    exposition: MetricsExposition<PrometheusType, PrometheusValue>,
}

impl Metrics {
    fn parse(text: String) -> Metrics {
        let exposition = openmetrics_parser::prometheus::parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("the exposition does not parse: {e:?}\n{text}"));
        Metrics { text, exposition }
    }

    /// The samples of `family` whose labels include `labels`.
    fn samples(&self, family: &str, labels: &[(&str, &str)]) -> Vec<PrometheusValue> {
        let Some(f) = self.exposition.families.get(family) else {
            return Vec::new();
        };
        f.iter_samples()
            .filter(|s| {
                let set = s.get_labelset().unwrap();
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .map(|s| s.value.clone())
            .collect()
    }

    /// The value of the one series of `family` with these labels; 0 if
    /// absent (a counter that never moved has no series yet).
    fn value(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        let matching = self.samples(family, labels);
        assert!(matching.len() <= 1, "{family} {labels:?}: {matching:?}");
        match matching.first() {
            None => 0.0,
            Some(PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n)) => n.as_f64(),
            Some(PrometheusValue::Counter(c)) => c.value.as_f64(),
            Some(other) => panic!("{family}: not a plain value: {other:?}"),
        }
    }

    /// Observations of a histogram series.
    fn observations(&self, family: &str, labels: &[(&str, &str)]) -> u64 {
        match self.samples(family, labels).first() {
            None => 0,
            Some(PrometheusValue::Histogram(h)) => h.count.unwrap_or(0),
            Some(other) => panic!("{family}: not a histogram: {other:?}"),
        }
    }

    /// Every value of one label across a family's series.
    fn label_values(&self, family: &str, label: &str) -> Vec<String> {
        let Some(f) = self.exposition.families.get(family) else {
            return Vec::new();
        };
        f.iter_samples()
            .filter_map(|s| {
                s.get_labelset()
                    .unwrap()
                    .get_label_value(label)
                    .map(str::to_owned)
            })
            .collect()
    }
}

fn scrape(d: &Daemon) -> Metrics {
    let r = d.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    Metrics::parse(r.body)
}

/// `promtool check metrics` on the exposition, where Prometheus is
/// installed (Debian's `prometheus` package).
fn promtool_finds_no_problem(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: exposition not linted");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn values_follow_registration_moves_hotplug_and_refusals() {
    let h = host(&[]);
    let before = scrape(&h.d);
    assert_eq!(
        before.value("vfiod_build_info", &[("version", "0.1.0")]),
        1.0
    );
    assert!(before.value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(before.value("process_open_fds", &[]) >= 3.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = before.value("process_start_time_seconds", &[]);
    assert!(
        (now - 600.0..=now + 1.0).contains(&start),
        "started {start}, now {now}"
    );
    assert_eq!(before.value("vfiod_device_info", &[("name", "nic")]), 0.0);

    let id = h.d.register(NIC, "nic")["id"].as_str().unwrap().to_owned();
    let m = scrape(&h.d);
    let nic = [("name", "nic"), ("pci_address", NIC)];
    assert_eq!(
        m.value(
            "vfiod_device_info",
            &[
                ("id", id.as_str()),
                ("name", "nic"),
                ("pci_address", NIC),
                ("vendor_id", "8086"),
                ("device_id", "10d3"),
                ("iommu_group", "2"),
                ("type", "pci"),
            ]
        ),
        1.0
    );
    assert_eq!(m.value("vfiod_device_present", &nic), 1.0);
    assert_eq!(m.value("vfiod_device_bound_to_vfio", &nic), 0.0);
    assert_eq!(m.value("vfiod_device_attached", &nic), 0.0);
    assert_eq!(m.value("vfiod_device_stuck", &nic), 0.0);
    let health = |m: &Metrics, state: &str| {
        m.value(
            "vfiod_device_health",
            &[("name", "nic"), ("pci_address", NIC), ("health", state)],
        )
    };
    assert_eq!(health(&m, "ok"), 1.0);
    assert_eq!(health(&m, "needs_reset"), 0.0);
    assert_eq!(health(&m, "quarantined"), 0.0);

    assert_eq!(h.d.post("/devices/nic/bind", "{}").status, 200);
    let m = scrape(&h.d);
    let bind_ok = [("op", "bind"), ("result", "ok")];
    assert_eq!(m.value("vfiod_driver_moves_total", &bind_ok), 1.0);
    assert_eq!(
        m.observations("vfiod_driver_move_duration_seconds", &[("op", "bind")]),
        1
    );
    assert_eq!(m.value("vfiod_device_bound_to_vfio", &nic), 1.0);

    assert_eq!(
        h.d.post("/devices/nic/attach", r#"{"instance_id":"vm-1"}"#)
            .status,
        200
    );
    assert_eq!(scrape(&h.d).value("vfiod_device_attached", &nic), 1.0);
    assert_eq!(
        h.d.post("/devices/nic/detach", r#"{"keep_bound":true}"#)
            .status,
        200
    );

    assert_eq!(h.d.post("/devices/nic/unbind", "").status, 200);
    let m = scrape(&h.d);
    assert_eq!(
        m.value(
            "vfiod_driver_moves_total",
            &[("op", "unbind"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(m.value("vfiod_device_bound_to_vfio", &nic), 0.0);
    assert_eq!(m.value("vfiod_device_attached", &nic), 0.0);

    // The kernel refuses the unbind from e1000e: a failed move, rolled back.
    h.sim
        .fail_write("bus/pci/drivers/e1000e/unbind", Errno::EISDIR);
    assert_ne!(h.d.post("/devices/nic/bind", "{}").status, 200);
    let m = scrape(&h.d);
    assert_eq!(
        m.value(
            "vfiod_driver_moves_total",
            &[("op", "bind"), ("result", "error")]
        ),
        1.0
    );
    assert_eq!(m.value("vfiod_driver_moves_total", &bind_ok), 1.0);
    assert_eq!(
        m.observations("vfiod_driver_move_duration_seconds", &[("op", "bind")]),
        2
    );
    // Every operation is counted once by the executor, its result with it.
    assert_eq!(m.value("vfiod_operations_total", &bind_ok), 1.0);
    assert_eq!(
        m.value(
            "vfiod_operations_total",
            &[("op", "bind"), ("result", "error")]
        ),
        1.0
    );
    for op in ["attach", "detach", "unbind", "register"] {
        assert_eq!(
            m.value("vfiod_operations_total", &[("op", op), ("result", "ok")]),
            1.0,
            "{op}"
        );
    }

    // Hotplug: the NIC leaves the bus.
    let mut events = EventStream::open(&h.d.socket, "");
    let m = scrape(&h.d);
    assert_eq!(m.value("vfiod_event_subscribers", &[]), 1.0);
    assert!(m.value("vfiod_http_connections", &[("privileged", "true")]) >= 2.0);
    h.fs.remove_device(NIC);
    h.uevent(&format!("remove {NIC}"));
    events.until(|e| e["type"] == "hotplug_remove");
    drop(events);
    let m = scrape(&h.d);
    assert_eq!(
        m.value("vfiod_hotplug_events_total", &[("action", "remove")]),
        1.0
    );
    assert_eq!(m.value("vfiod_device_present", &nic), 0.0);
    eventually(5, "the subscriber gauge to drop", || {
        (scrape(&h.d).value("vfiod_event_subscribers", &[]) == 0.0).then_some(())
    });

    // A request from a user outside the access group is refused.
    let refused = Command::new(common::vfioctl_bin())
        .arg("--socket")
        .arg(&h.d.socket)
        .args(["delete", "nic"])
        .uid(4243)
        .gid(4243)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let m = scrape(&h.d);
    let route = "/devices/{id_or_name}";
    assert_eq!(
        m.value(
            "vfiod_http_requests_total",
            &[("route", route), ("code", "403")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "vfiod_http_requests_total",
            &[("route", "/devices/{id_or_name}/bind"), ("code", "200")]
        ),
        1.0
    );
    assert_eq!(h.d.get("/devices/no-such").status, 404);
    assert_eq!(h.d.get("/no/such/route").status, 404);
    let m = scrape(&h.d);
    assert_eq!(
        m.value(
            "vfiod_http_requests_total",
            &[("route", route), ("code", "404")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "vfiod_http_requests_total",
            &[("route", "unmatched"), ("code", "404")]
        ),
        1.0
    );
    // Route labels are templates, never a device's name or a raw path.
    for route in m.label_values("vfiod_http_requests_total", "route") {
        assert!(
            !route.contains("nic") && !route.contains("no-such"),
            "{route}"
        );
    }
    promtool_finds_no_problem(&m.text);
}

#[test]
fn openmetrics_when_the_scraper_asks() {
    let h = host(&[]);
    h.d.register(NIC, "nic");
    let r = raw_request(
        &h.d.socket,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
    let om = openmetrics_parser::openmetrics::parse_openmetrics(&r.body)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{}", r.body));
    let requests = &om.families["vfiod_http_requests"];
    assert_eq!(
        requests.family_type,
        openmetrics_parser::OpenMetricsType::Counter
    );
    let present = &om.families["vfiod_device_present"];
    assert_eq!(present.iter_samples().count(), 1);
}

fn tcp_request(port: u16, method: &str, path: &str) -> Response {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    common::parse_response(&raw)
}

#[test]
fn tcp_listener_serves_metrics_only_and_stays_on_loopback() {
    // A free port: the kernel's pick, released for vfiod to take.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut h = host(&["--metrics-listen", &listen]);
    h.d.register(NIC, "nic");
    let r = tcp_request(port, "GET", "/metrics");
    assert_eq!(r.status, 200);
    let m = Metrics::parse(r.body);
    assert_eq!(
        m.value(
            "vfiod_device_present",
            &[("name", "nic"), ("pci_address", NIC)]
        ),
        1.0
    );
    let r = tcp_request(port, "GET", "/devices");
    r.expect_error(404, "not_found");
    assert!(r.message().contains("/metrics only"), "{}", r.body);
    // The socket's 405, Allow header included.
    let r = tcp_request(port, "DELETE", "/metrics");
    r.expect_error(405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET"));

    // Anything but loopback needs metrics_listen_public.
    let out =
        h.d.command()
            .args(["--metrics-listen", "0.0.0.0:1"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics_listen_public"), "{err}");

    // An idle scraper connection does not hold up a stop: the listener
    // and its connections stop with the socket's (else vfiod waits out
    // its 10 s grace).
    let idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let asked = std::time::Instant::now();
    assert!(h.d.terminate().success());
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    drop(idle);
}
