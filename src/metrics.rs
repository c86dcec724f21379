//! Prometheus metrics.
//!
//! Two kinds of families, kept apart on purpose:
//! - **Event counts** (driver moves and their durations, hotplug events,
//!   HTTP requests, open connections, event subscribers) are recorded as
//!   they happen, into one process-wide set, by small calls from the core
//!   and the API ([`record_move`], [`record_hotplug`], ...). A process-wide
//!   set because every recording site would otherwise need a handle
//!   threaded through it, and a daemon has exactly one set of counters.
//! - **State** (the per-device gauges and the `process_*` families) is
//!   computed at scrape time from the registry snapshot and `/proc/self`,
//!   so it can never drift from what `GET /devices` shows.
//!
//! [`render`] writes both in the Prometheus text format (0.0.4), or in
//! OpenMetrics when the scraper's `Accept` asks for it.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::registry::{Health, Registry as DeviceRegistry};

/// Sent when `Accept` asks for OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus text format 0.0.4, the default.
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Move durations: a bind takes milliseconds when nothing is in the way and
/// up to the op timeout (5 s by default) when a driver drags its feet.
const MOVE_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MoveLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrivilegedLabels {
    privileged: &'static str,
}

struct Recorded {
    registry: Registry,
    driver_moves: Family<MoveLabels, Counter>,
    operations: Family<MoveLabels, Counter>,
    move_duration: Family<OpLabels, Histogram>,
    hotplug_events: Family<ActionLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    connections: Family<PrivilegedLabels, Gauge>,
    event_subscribers: Gauge,
}

static RECORDED: LazyLock<Recorded> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let build_info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    build_info
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
        .set(1);
    registry.register(
        "vfiod_build_info",
        "The running vfiod's version (always 1)",
        build_info,
    );
    let driver_moves = Family::<MoveLabels, Counter>::default();
    registry.register(
        "vfiod_driver_moves",
        "Driver moves of a function (op bind or unbind) by result (ok, error, timeout)",
        driver_moves.clone(),
    );
    let move_duration: Family<OpLabels, Histogram> =
        Family::new_with_constructor(|| Histogram::new(MOVE_BUCKETS));
    registry.register_with_unit(
        "vfiod_driver_move_duration",
        "Time a driver move took inside vfiod, from the first sysfs write to the verified result",
        Unit::Seconds,
        move_duration.clone(),
    );
    let operations = Family::<MoveLabels, Counter>::default();
    registry.register(
        "vfiod_operations",
        "Operations run (API requests that change something, and vfiod's own), by operation and result",
        operations.clone(),
    );
    let hotplug_events = Family::<ActionLabels, Counter>::default();
    registry.register(
        "vfiod_hotplug_events",
        "PCI uevents handled, by action",
        hotplug_events.clone(),
    );
    let http_requests = Family::<HttpLabels, Counter>::default();
    registry.register(
        "vfiod_http_requests",
        "API requests answered, by route template and HTTP status",
        http_requests.clone(),
    );
    let connections = Family::<PrivilegedLabels, Gauge>::default();
    registry.register(
        "vfiod_http_connections",
        "Open connections on the API socket, by whether the peer may change things",
        connections.clone(),
    );
    let event_subscribers = Gauge::default();
    registry.register(
        "vfiod_event_subscribers",
        "Clients following GET /events",
        event_subscribers.clone(),
    );
    Recorded {
        registry,
        driver_moves,
        move_duration,
        operations,
        hotplug_events,
        http_requests,
        connections,
        event_subscribers,
    }
});

/// How a driver move ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveResult {
    /// Moved and verified.
    Ok,
    /// The kernel refused or the result did not verify; rolled back.
    Error,
    /// A sysfs write did not return within the op timeout.
    Timeout,
}

impl MoveResult {
    /// `Timeout` if the write hung, else `Error`.
    pub fn failed(timed_out: bool) -> MoveResult {
        if timed_out {
            MoveResult::Timeout
        } else {
            MoveResult::Error
        }
    }

    fn label(self) -> &'static str {
        match self {
            MoveResult::Ok => "ok",
            MoveResult::Error => "error",
            MoveResult::Timeout => "timeout",
        }
    }
}

/// One driver move of one function: `op` is `"bind"` or `"unbind"`.
pub fn record_move(op: &'static str, result: MoveResult, took: Duration) {
    let m = &*RECORDED;
    m.driver_moves
        .get_or_create(&MoveLabels {
            op,
            result: result.label(),
        })
        .inc();
    m.move_duration
        .get_or_create(&OpLabels { op })
        .observe(took.as_secs_f64());
}

/// One operation run by the core's executor: `op` is its kind (`bind`,
/// `attach`, `settle`, ...), `ok` whether it succeeded (a refusal counts
/// as an error: it did not do what was asked).
pub fn record_operation(op: &'static str, ok: bool) {
    RECORDED
        .operations
        .get_or_create(&MoveLabels {
            op,
            result: if ok { "ok" } else { "error" },
        })
        .inc();
}

/// One PCI uevent handled: `action` is the kernel's (`add`, `remove`, ...).
pub fn record_hotplug(action: &'static str) {
    RECORDED
        .hotplug_events
        .get_or_create(&ActionLabels { action })
        .inc();
}

/// One answered request; `route` is a template from the route table, never
/// the raw path (a label per device name would grow without bound).
pub fn record_request(route: &'static str, code: u16) {
    RECORDED
        .http_requests
        .get_or_create(&HttpLabels { route, code })
        .inc();
}

/// Counts a connection as open until the guard is dropped.
pub fn connection_opened(privileged: bool) -> GaugeGuard {
    let gauge = RECORDED
        .connections
        .get_or_create(&PrivilegedLabels {
            privileged: if privileged { "true" } else { "false" },
        })
        .clone();
    GaugeGuard::new(gauge)
}

/// Counts an event subscriber until the guard is dropped.
pub fn subscriber_added() -> GaugeGuard {
    GaugeGuard::new(RECORDED.event_subscribers.clone())
}

/// Raises a gauge while alive, so that every way out of a connection or a
/// stream (end, error, panic, cancellation) lowers it again.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every health a device can have: each is a series, 1 for the current one.
const HEALTH_STATES: [Health; 4] = [
    Health::Ok,
    Health::NeedsReset,
    Health::Quarantined,
    Health::NeedsHostReboot,
];

/// A 0/1 state of a registered device.
type DeviceFlag = fn(&crate::registry::DeviceRecord) -> bool;

/// The 0/1 per-device families: name, help, value.
const DEVICE_FLAGS: [(&str, &str, DeviceFlag); 4] = [
    (
        "vfiod_device_present",
        "Whether the registered function is on the bus (0/1)",
        |d| d.present,
    ),
    (
        "vfiod_device_bound_to_vfio",
        "Whether the function's driver is vfio-pci or a vfio variant (0/1)",
        |d| d.bound_to_vfio(),
    ),
    (
        "vfiod_device_attached",
        "Whether the device is attached to a virtual machine (0/1)",
        |d| d.attached_to().is_some(),
    ),
    (
        "vfiod_device_stuck",
        "Whether a sysfs write for the device timed out in the kernel (0/1)",
        |d| d.stuck,
    ),
];

const DEVICE_INFO: (&str, &str) = (
    "vfiod_device_info",
    "A registered device and its identity (always 1)",
);
const SRIOV_VFS: (&str, &str) = (
    "vfiod_sriov_vfs",
    "VFs of a PF whose count vfiod keeps: the count declared (desired) and the VFs there now (enabled)",
);
const MDEVS: (&str, &str) = (
    "vfiod_mdevs",
    "Mediated devices vfiod made on a parent for claims, per mdev type",
);
const DEVICE_HEALTH: (&str, &str) = (
    "vfiod_device_health",
    "The device's health (ok, needs_reset, quarantined, needs_host_reboot): 1 for the current one",
);

/// Bytes of exposition per registered device, a little over what the
/// families below write for a device with short names: the buffer is
/// sized once instead of doubling its way up.
const DEVICE_EXPOSITION_BYTES: usize = 900;

/// The per-device families, written straight from one registry snapshot
/// in the registry's order, in the text both formats share for gauges
/// (what `prometheus_client` writes for them, byte for byte; a family with
/// no device is left out, as it leaves it out).
///
/// Written by hand because building them as `prometheus_client` families
/// took a map entry and its own label strings per series, nine series per
/// device: at 1,000 devices, some 5 MB built and dropped per scrape, for a
/// 760 KB answer, and most of the time a scrape took.
fn write_device_families(out: &mut String, devices: &DeviceRegistry) {
    if devices.is_empty() {
        return;
    }
    let header = |out: &mut String, (name, help): (&str, &str)| {
        let _ = write!(out, "# HELP {name} {help}.\n# TYPE {name} gauge\n");
    };
    header(out, DEVICE_INFO);
    for d in devices.iter() {
        out.push_str(DEVICE_INFO.0);
        out.push_str("{id=\"");
        push_label_value(out, &d.id);
        out.push_str("\",name=\"");
        push_label_value(out, &d.name);
        let _ = writeln!(
            out,
            "\",pci_address=\"{}\",vendor_id=\"{:04x}\",device_id=\"{:04x}\",iommu_group=\"{}\",type=\"{}\"}} 1",
            d.pci_address,
            d.vendor_id,
            d.device_id,
            d.iommu_group.map_or(-1, i64::from),
            crate::pci::device_type(d.class).as_str(),
        );
    }
    let device_labels = |out: &mut String, d: &crate::registry::DeviceRecord| {
        out.push_str("{name=\"");
        push_label_value(out, &d.name);
        let _ = write!(out, "\",pci_address=\"{}\"", d.pci_address);
    };
    for (name, help, value) in DEVICE_FLAGS {
        header(out, (name, help));
        for d in devices.iter() {
            out.push_str(name);
            device_labels(out, d);
            out.push_str(if value(d) { "} 1\n" } else { "} 0\n" });
        }
    }
    header(out, DEVICE_HEALTH);
    for d in devices.iter() {
        for state in HEALTH_STATES {
            out.push_str(DEVICE_HEALTH.0);
            device_labels(out, d);
            out.push_str(",health=\"");
            out.push_str(state.as_str());
            out.push_str(if d.health.state == state {
                "\"} 1\n"
            } else {
                "\"} 0\n"
            });
        }
    }
    if devices.iter().any(|d| d.sriov.is_some()) {
        // A VF's record lives as long as the kernel's VF: counting the
        // records counts what is enabled, without reading sysfs here.
        let mut enabled: std::collections::HashMap<_, i64> = std::collections::HashMap::new();
        for vf in devices.iter().filter(|v| v.present) {
            if let Some(of) = &vf.vf {
                *enabled.entry(of.parent_address).or_default() += 1;
            }
        }
        header(out, SRIOV_VFS);
        for d in devices.iter() {
            let Some(c) = &d.sriov else { continue };
            let there = enabled.get(&d.pci_address).copied().unwrap_or(0);
            for (state, value) in [("desired", i64::from(c.desired_vfs)), ("enabled", there)] {
                out.push_str(SRIOV_VFS.0);
                out.push_str("{pf=\"");
                push_label_value(out, &d.name);
                let _ = writeln!(out, "\",state=\"{state}\"}} {value}");
            }
        }
    }
    if devices.iter().any(|d| !d.mdevs.is_empty()) {
        header(out, MDEVS);
        for d in devices.iter() {
            let mut per_type: std::collections::BTreeMap<&str, u32> = Default::default();
            for m in &d.mdevs {
                *per_type.entry(&m.mdev_type).or_default() += 1;
            }
            for (mdev_type, n) in per_type {
                out.push_str(MDEVS.0);
                out.push_str("{parent=\"");
                push_label_value(out, &d.name);
                out.push_str("\",mdev_type=\"");
                push_label_value(out, mdev_type);
                let _ = writeln!(out, "\"}} {n}");
            }
        }
    }
}

/// A label value, escaped as the exposition formats want (`\\`, `\"`,
/// `\n`).
fn push_label_value(out: &mut String, value: &str) {
    if !value.contains(['\\', '"', '\n']) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The standard `process_*` families, read from `/proc/self` at scrape
/// time. Nothing here reads `/proc/stat` or `/proc/uptime`: the packaged
/// unit's `ProcSubset=pid` hides them, so boot time comes from the clocks.
fn process_registry() -> Registry {
    let mut registry = Registry::default();
    let Some(me) = crate::proc::own_usage() else {
        return registry;
    };
    if let Some(stat) = me.stat {
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        cpu.inc_by(stat.cpu_seconds);
        registry.register_with_unit(
            "process_cpu",
            "Total user and system CPU time spent",
            Unit::Seconds,
            cpu,
        );
        let rss = Gauge::<i64>::default();
        rss.set(stat.resident_bytes as i64);
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            rss,
        );
        let vsize = Gauge::<i64>::default();
        vsize.set(stat.virtual_bytes as i64);
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            vsize,
        );
        if let Some(boot) = boot_time() {
            let start = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            start.set(boot + stat.started_after_boot_seconds);
            registry.register_with_unit(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Unit::Seconds,
                start,
            );
        }
    }
    if let Some(n) = me.open_fds {
        let fds = Gauge::<i64>::default();
        fds.set(n as i64);
        registry.register("process_open_fds", "Open file descriptors", fds);
    }
    if let Some(max) = me.max_open_files {
        let max_fds = Gauge::<i64>::default();
        max_fds.set(max as i64);
        registry.register("process_max_fds", "Limit of open file descriptors", max_fds);
    }
    registry
}

/// Seconds since the epoch at boot: the wall clock less the time since boot.
fn boot_time() -> Option<f64> {
    use nix::time::{clock_gettime, ClockId};
    let secs = |c: ClockId| {
        clock_gettime(c)
            .ok()
            .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
    };
    Some(secs(ClockId::CLOCK_REALTIME)? - secs(ClockId::CLOCK_BOOTTIME)?)
}

/// Whether an `Accept` header asks for OpenMetrics (Prometheus sends it
/// first, with the classic text format as a fallback).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The content type of the exposition [`render`] writes.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        TEXT_CONTENT_TYPE
    }
}

/// The whole exposition and its content type.
pub fn render(devices: &DeviceRegistry, openmetrics: bool) -> (&'static str, String) {
    let process = process_registry();
    let mut out = String::with_capacity(devices.len() * DEVICE_EXPOSITION_BYTES + 16 * 1024);
    // Writing to a String cannot fail; an error here would be a bug in the
    // encoder, and a partial exposition is still better than none.
    if openmetrics {
        let _ = text::encode_registry(&mut out, &RECORDED.registry);
        write_device_families(&mut out, devices);
        let _ = text::encode_registry(&mut out, &process);
        let _ = text::encode_eof(&mut out);
    } else {
        use prometheus_client::encoding::prometheus_text;
        let _ = prometheus_text::encode(&mut out, &RECORDED.registry);
        write_device_families(&mut out, devices);
        let _ = prometheus_text::encode(&mut out, &process);
    }
    (content_type(openmetrics), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_carry_the_recorded_and_the_process_families() {
        record_move("bind", MoveResult::Ok, Duration::from_millis(30));
        record_hotplug("add");
        let devices = DeviceRegistry::default();
        let (ct, text) = render(&devices, false);
        assert!(ct.starts_with("text/plain"));
        assert!(
            text.contains("# TYPE vfiod_driver_moves_total counter"),
            "{text}"
        );
        assert!(
            text.contains("vfiod_driver_moves_total{op=\"bind\",result=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("vfiod_driver_move_duration_seconds_bucket{le=\"0.05\",op=\"bind\"}")
                || text
                    .contains("vfiod_driver_move_duration_seconds_bucket{op=\"bind\",le=\"0.05\"}"),
            "{text}"
        );
        assert!(text.contains("vfiod_build_info{version=\""), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
        assert!(text.contains("process_start_time_seconds "), "{text}");
        assert!(!text.contains("# EOF"));
        let (ct, om) = render(&devices, true);
        assert!(ct.starts_with("application/openmetrics-text"));
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(om.matches("# EOF").count(), 1);
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct DeviceInfoLabels {
        id: String,
        name: String,
        pci_address: String,
        vendor_id: String,
        device_id: String,
        iommu_group: String,
        r#type: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct DeviceLabels {
        name: String,
        pci_address: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct HealthLabels {
        name: String,
        pci_address: String,
        health: &'static str,
    }

    /// The per-device families as `prometheus_client` builds them: what
    /// [`write_device_families`] writes by hand must read the same.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct SriovLabels {
        pf: String,
        state: &'static str,
    }

    fn device_registry(devices: &DeviceRegistry) -> Registry {
        let mut registry = Registry::default();
        let info = Family::<DeviceInfoLabels, Gauge>::default();
        let flags = DEVICE_FLAGS;
        let families: Vec<Family<DeviceLabels, Gauge>> =
            flags.iter().map(|_| Family::default()).collect();
        let health = Family::<HealthLabels, Gauge>::default();
        let sriov = Family::<SriovLabels, Gauge>::default();
        for d in devices.iter() {
            if let Some(c) = &d.sriov {
                let enabled = devices
                    .iter()
                    .filter(|v| {
                        v.present
                            && v.vf
                                .as_ref()
                                .is_some_and(|vf| vf.parent_address == d.pci_address)
                    })
                    .count();
                for (state, value) in [
                    ("desired", c.desired_vfs as i64),
                    ("enabled", enabled as i64),
                ] {
                    sriov
                        .get_or_create(&SriovLabels {
                            pf: d.name.clone(),
                            state,
                        })
                        .set(value);
                }
            }
            info.get_or_create(&DeviceInfoLabels {
                id: d.id.clone(),
                name: d.name.clone(),
                pci_address: d.pci_address.to_string(),
                vendor_id: format!("{:04x}", d.vendor_id),
                device_id: format!("{:04x}", d.device_id),
                iommu_group: d.iommu_group.map_or("-1".into(), |g| g.to_string()),
                r#type: crate::pci::device_type(d.class).as_str(),
            })
            .set(1);
            let labels = DeviceLabels {
                name: d.name.clone(),
                pci_address: d.pci_address.to_string(),
            };
            for ((_, _, value), family) in flags.iter().zip(&families) {
                family.get_or_create(&labels).set(i64::from(value(d)));
            }
            for state in HEALTH_STATES {
                health
                    .get_or_create(&HealthLabels {
                        name: d.name.clone(),
                        pci_address: d.pci_address.to_string(),
                        health: state.as_str(),
                    })
                    .set(i64::from(d.health.state == state));
            }
        }
        registry.register(
            "vfiod_device_info",
            "A registered device and its identity (always 1)",
            info,
        );
        for ((name, help, _), family) in flags.iter().zip(families) {
            registry.register(*name, *help, family);
        }
        registry.register(
            "vfiod_device_health",
            "The device's health (ok, needs_reset, quarantined, needs_host_reboot): 1 for the current one",
            health,
        );
        registry.register(
            "vfiod_sriov_vfs",
            "VFs of a PF whose count vfiod keeps: the count declared (desired) and the VFs there now (enabled)",
            sriov,
        );
        registry
    }

    /// Splits an exposition into families (from one `# HELP` to the next),
    /// with each family's series sorted: `prometheus_client` writes a
    /// family's series in hash order.
    fn families(text: &str) -> Vec<Vec<&str>> {
        let mut out: Vec<Vec<&str>> = Vec::new();
        for line in text.lines() {
            if line.starts_with("# HELP") || out.is_empty() {
                out.push(Vec::new());
            }
            out.last_mut().unwrap().push(line);
        }
        for family in &mut out {
            family.sort_by_key(|l| (!l.starts_with('#'), *l));
        }
        out
    }

    fn device(i: usize, rng: &mut u64) -> crate::registry::DeviceRecord {
        let mut next = || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        let f = crate::pci::PciFunction {
            address: format!("0000:{:02x}:{:02x}.{}", 0x10 + i / 64, (i % 64) / 2, i % 2)
                .parse()
                .unwrap(),
            vendor_id: 0x10de,
            device_id: if next() % 2 == 0 { 0x2236 } else { 0x00a1 },
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: if next() % 2 == 0 { 0x030200 } else { 0x020000 },
            driver: Some(
                if next() % 2 == 0 {
                    "nvidia"
                } else {
                    "vfio-pci"
                }
                .into(),
            ),
            iommu_group: (next() % 4 != 0).then_some(i as u32),
            modalias: None,
            own_vfio_provider: false,
        };
        // Now and then a name and an id that need escaping.
        let (id, name) = match next() % 5 {
            0 => (format!("id\"{i}\\"), format!("gpu\n{i}")),
            _ => (format!("id{i}"), format!("gpu{i}")),
        };
        let mut d = crate::registry::DeviceRecord::registered(id, name, &f, Default::default());
        d.present = next() % 3 != 0;
        d.stuck = next() % 5 == 0;
        if next() % 2 == 0 {
            d.attachment = Some(crate::registry::Attachment {
                instance: format!("vm{i}"),
                uid: Some(1000),
                pid: None,
            });
        }
        d.health.state = HEALTH_STATES[(next() % 4) as usize];
        // Devices 0 and 1 keep a VF count; some others are their VFs.
        if i < 2 {
            d.sriov = Some(crate::registry::SriovConfig {
                desired_vfs: 4 + i as u32,
                vf_driver: Default::default(),
                saved_autoprobe: None,
            });
        } else if next() % 3 == 0 {
            let parent = i % 2;
            d.vf = Some(crate::registry::VirtualFunction {
                parent_id: format!("id{parent}"),
                parent_address: format!("0000:10:00.{parent}").parse().unwrap(),
                index: i as u32,
            });
        }
        d
    }

    /// The hand-written per-device families read exactly as those
    /// `prometheus_client` built, in both formats, names needing escapes
    /// included.
    #[test]
    fn per_device_families_match_prometheus_clients_encoding() {
        let mut rng = 0x9e37_79b9_7f4a_7c15;
        for n in [0, 1, 2, 50] {
            let devices =
                DeviceRegistry::from_records((0..n).map(|i| device(i, &mut rng))).unwrap();
            let mut ours = String::new();
            write_device_families(&mut ours, &devices);
            let reference = device_registry(&devices);
            let mut text = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut text, &reference).unwrap();
            assert_eq!(
                families(&ours),
                families(&text),
                "{n} devices, Prometheus text"
            );
            let mut om = String::new();
            text::encode_registry(&mut om, &reference).unwrap();
            assert_eq!(families(&ours), families(&om), "{n} devices, OpenMetrics");
            if n == 50 {
                assert!(ours.contains(r#"name="gpu\n"#), "an escaped name: {ours}");
                assert_eq!(ours.lines().count(), 7 * 2 + 50 * 9 + 2 * 2);
                assert!(ours.contains("vfiod_sriov_vfs{pf="), "{ours}");
            }
        }
    }

    #[test]
    fn accept_header_picks_the_format() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
