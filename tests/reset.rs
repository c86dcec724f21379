//! Reset end to end: the real `vfiod` over a fake sysfs whose simulated
//! kernel does resets (a reset write returns once the reset is done), can
//! leave a function broken after one, and can fail or hang the write.
//! Assertions read the tree and the simulated kernel's record of resets,
//! not only vfiod's answer.

use common::fakeproc::alias_node;
use common::fakesys::{DeviceSpec, FakeSys};
use common::host::Host;
use common::simkernel::ResetOutcome;
use common::standard::{GPU, GPU_AUDIO, NIC};
use common::{eventually, EventStream};
use nix::errno::Errno;
use serde_json::Value;

/// Alone behind a root port, every method.
const IGB: &str = "0000:03:00.0";
/// Two conventional functions behind a PCIe-to-PCI bridge, one group.
const E1000_A: &str = "0000:06:01.0";
const E1000_B: &str = "0000:06:02.0";
/// A multi-function device whose functions have their own groups (ACS).
const SPLIT_A: &str = "0000:08:00.0";
const SPLIT_B: &str = "0000:08:00.1";

const ALL_METHODS: &str = "device_specific acpi flr af_flr pm bus";

/// The fake host:
///
/// ```text
/// 00:00.0 host bridge                                   group 0
/// 00:01.0 root port ── 01:00.0 GPU (nvidia, flr bus)    group 1
///                   └─ 01:00.1 audio (flr bus)          group 1
/// 00:02.0 NIC (e1000e, pm bus)                          group 2
/// 00:03.0 root port ── 03:00.0 igb (all methods)        group 3
/// 00:1c.0 root port ── 05:00.0 PCIe-to-PCI bridge       group 7
///                       ├─ 06:01.0 e1000 (bus)          group 7
///                       └─ 06:02.0 e1000 (none)         group 7
/// 00:1d.0 root port ── 08:00.0 NIC (bus)                group 9
///                   └─ 08:00.1 NIC                      group 10
/// ```
fn reset_host() -> FakeSys {
    let fs = FakeSys::new();
    fs.load_vfio();
    let specs = [
        DeviceSpec::new("0000:00:00.0", 0x8086, 0x29c0, 0x060000).group(0),
        DeviceSpec::new("0000:00:01.0", 0x1b36, 0x000c, 0x060400)
            .driver("pcieport")
            .group(1),
        DeviceSpec::new(GPU, 0x10de, 0x2236, 0x030200)
            .driver("nvidia")
            .group(1)
            .parent("0000:00:01.0")
            .reset_methods("flr bus"),
        DeviceSpec::new(GPU_AUDIO, 0x10de, 0x1aef, 0x040300)
            .driver("snd_hda_intel")
            .group(1)
            .parent("0000:00:01.0")
            .reset_methods("flr bus"),
        DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(2)
            .reset_methods("pm bus"),
        DeviceSpec::new("0000:00:03.0", 0x1b36, 0x000c, 0x060400)
            .driver("pcieport")
            .group(3),
        DeviceSpec::new(IGB, 0x8086, 0x10c9, 0x020000)
            .driver("igb")
            .group(3)
            .parent("0000:00:03.0")
            .reset_methods(ALL_METHODS),
        DeviceSpec::new("0000:00:1c.0", 0x1b36, 0x000c, 0x060400)
            .driver("pcieport")
            .group(7),
        DeviceSpec::new("0000:05:00.0", 0x1b36, 0x000e, 0x060400)
            .group(7)
            .parent("0000:00:1c.0"),
        DeviceSpec::new(E1000_A, 0x8086, 0x100e, 0x020000)
            .driver("e1000")
            .group(7)
            .parent("0000:05:00.0")
            .reset_methods("bus"),
        DeviceSpec::new(E1000_B, 0x8086, 0x100e, 0x020000)
            .driver("e1000")
            .group(7)
            .parent("0000:05:00.0"),
        DeviceSpec::new("0000:00:1d.0", 0x1b36, 0x000c, 0x060400)
            .driver("pcieport")
            .group(8),
        DeviceSpec::new(SPLIT_A, 0x8086, 0x1521, 0x020000)
            .driver("igb")
            .group(9)
            .parent("0000:00:1d.0")
            .reset_methods("bus"),
        DeviceSpec::new(SPLIT_B, 0x8086, 0x1521, 0x020000)
            .driver("igb")
            .group(10)
            .parent("0000:00:1d.0"),
    ];
    for spec in specs {
        fs.add_device(spec);
    }
    fs
}

fn host(extra: &[&str]) -> Host {
    Host::builder().on(reset_host()).args(extra).start()
}

/// Reset requests, and the simulated kernel's record of the writes they make.
trait Resets {
    fn reset(&self, name: &str, body: &str) -> common::Response;
    /// The writes to `reset` and `reset_method` of `addr`, in order.
    fn reset_writes(&self, addr: &str) -> Vec<(String, String)>;
}

impl Resets for Host {
    fn reset(&self, name: &str, body: &str) -> common::Response {
        self.d.post(&format!("/devices/{name}/reset"), body)
    }

    fn reset_writes(&self, addr: &str) -> Vec<(String, String)> {
        let prefix = format!("bus/pci/devices/{addr}/");
        self.sim
            .writes()
            .into_iter()
            .filter_map(|(p, v)| {
                let attr = p.strip_prefix(&prefix)?;
                matches!(attr, "reset" | "reset_method").then(|| (attr.to_owned(), v))
            })
            .collect()
    }
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn dry_run_shows_method_and_scope_and_changes_nothing() {
    let h = host(&[]);
    h.d.register(GPU, "gpu");
    let r = h.reset("gpu", r#"{"method":"bus","dry_run":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["plan"]["methods"], serde_json::json!(["bus"]));
    let scope: Vec<&str> = v["plan"]["scope"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["pci_address"].as_str().unwrap())
        .collect();
    assert_eq!(
        scope,
        [GPU, GPU_AUDIO],
        "a bus reset also resets the audio function"
    );
    assert_eq!(v["plan"]["scope"][1]["driver"], "snd_hda_intel");

    let v = h.reset("gpu", r#"{"method":"flr","dry_run":true}"#).json();
    assert_eq!(v["plan"]["scope"].as_array().unwrap().len(), 1);
    assert_eq!(v["plan"]["scope"][0]["pci_address"], GPU);

    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert!(h.sim.resets().is_empty());
    assert!(h.reset_writes(GPU).is_empty(), "{:?}", h.sim.writes());
    assert_eq!(h.device("gpu")["last_reset"], Value::Null);
}

#[test]
fn auto_follows_the_kernel_order_and_leaves_out_a_bus_reset_it_may_not_do() {
    let h = host(&[]);
    let dev = h.d.register(IGB, "igb");
    assert_eq!(dev["health"], "ok");
    assert_eq!(dev["last_reset"], Value::Null);
    let r = h.reset("igb", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let dev = r.json();
    assert_eq!(h.sim.resets(), pairs(&[(IGB, "device_specific")]));
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert_eq!(
        h.reset_writes(IGB),
        pairs(&[("reset", "1")]),
        "the kernel's own order needs no reset_method write"
    );
    assert_eq!(dev["health"], "ok");
    assert_eq!(dev["last_reset"]["method"], "auto");
    assert_eq!(dev["last_reset"]["result"], "ok");
    assert!(dev["last_reset"]["duration_ms"].as_u64().is_some());
    assert_eq!(
        h.fs.driver_of(IGB).as_deref(),
        Some("igb"),
        "the driver stays"
    );

    // On the root bus, "pm bus" becomes "pm": no bus reset there, ever.
    h.d.register(NIC, "nic");
    let r = h.reset("nic", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.sim.resets()[1], (NIC.to_string(), "pm".to_string()));
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert_eq!(
        h.reset_writes(NIC),
        pairs(&[
            ("reset_method", "pm"),
            ("reset", "1"),
            ("reset_method", "pm bus")
        ])
    );
}

#[test]
fn each_method_is_selected_through_reset_method_and_the_list_is_put_back() {
    let h = host(&[]);
    h.d.register(IGB, "igb");
    for method in ALL_METHODS.split(' ') {
        h.sim.clear_writes();
        let r = h.reset("igb", &format!(r#"{{"method":"{method}"}}"#));
        assert_eq!(r.status, 200, "{method}: {}", r.body);
        assert_eq!(
            h.sim.resets().last().unwrap(),
            &(IGB.to_string(), method.to_string()),
            "the kernel saw {method} selected when the reset ran"
        );
        assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
        assert_eq!(
            h.reset_writes(IGB),
            pairs(&[
                ("reset_method", method),
                ("reset", "1"),
                ("reset_method", ALL_METHODS)
            ]),
            "{method}"
        );
        assert_eq!(h.fs.reset_method_of(IGB).as_deref(), Some(ALL_METHODS));
        assert_eq!(r.json()["last_reset"]["method"], method);
    }
    assert_eq!(h.sim.resets().len(), 6);
}

#[test]
fn a_method_the_function_lacks_is_refused_before_any_write() {
    let h = host(&[]);
    h.d.register(NIC, "nic");
    h.reset("nic", r#"{"method":"flr"}"#)
        .expect_error(409, "reset_method_unsupported")
        .expect_message_contains("pm bus");
    h.reset("nic", r#"{"method":"bus"}"#)
        .expect_error(409, "reset_method_unsupported")
        .expect_message_contains("root bus");
    h.reset("nic", r#"{"method":"warm"}"#)
        .expect_error(400, "invalid_request");
    h.d.register(E1000_B, "e1000-b");
    h.reset("e1000-b", "")
        .expect_error(409, "reset_method_unsupported")
        .expect_message_contains("no reset method");
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert!(h.sim.resets().is_empty());
    assert!(h.reset_writes(NIC).is_empty());
}

#[test]
fn bus_reset_of_the_gpu_resets_its_audio_function_and_verifies_both() {
    let h = host(&[]);
    h.d.register(GPU, "gpu");
    let r = h.reset("gpu", r#"{"method":"bus"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.sim.resets(), pairs(&[(GPU, "bus")]));
    // A bus reset is verified on every function it reached: the audio
    // function came back in D3cold.
    h.fs.set_power_state(GPU_AUDIO, "D3cold");
    let r = h.reset("gpu", r#"{"method":"bus"}"#);
    r.expect_error(500, "reset_failed")
        .expect_message_contains(&format!("power state failed for {GPU_AUDIO}"));
    assert_eq!(r.json()["failed_check"], "power_state");
    // A function-level reset does not reach it, so it passes.
    let r = h.reset("gpu", r#"{"method":"flr"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn bus_reset_behind_the_bridge_is_refused_while_the_other_function_is_attached() {
    let h = host(&[]);
    h.d.register(E1000_B, "e1000-b");
    let r = h.d.post("/devices/e1000-b/bind", r#"{"with_group":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let r =
        h.d.post("/devices/e1000-b/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    h.d.register(E1000_A, "e1000-a");
    for body in [
        r#"{"method":"bus"}"#,
        "",
        r#"{"method":"bus","dry_run":true}"#,
    ] {
        let r = h.reset("e1000-a", body);
        r.expect_error(409, "reset_scope_conflict")
            .expect_message_contains(E1000_B);
        let e = r.json();
        assert_eq!(e["conflicting_functions"][0]["pci_address"], E1000_B);
        assert!(
            e["conflicting_functions"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("attached to instance \"vm-1\""),
            "{e}"
        );
    }
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert!(h.sim.resets().is_empty());
    assert!(h.reset_writes(E1000_A).is_empty());
    // Released while its neighbour is attached: not reset, and it says why;
    // the next attach must reset it first, so it is refused too.
    let r =
        h.d.post("/devices/e1000-a/attach", r#"{"instance_id":"vm-2"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let r =
        h.d.post("/devices/e1000-a/detach", r#"{"keep_bound":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let dev = r.json();
    assert_eq!(dev["health"], "needs_reset");
    assert!(
        dev["health_reason"]
            .as_str()
            .unwrap()
            .contains("not reset: a bus reset"),
        "{dev}"
    );
    h.d.post("/devices/e1000-a/attach", r#"{"instance_id":"vm-2"}"#)
        .expect_error(409, "reset_scope_conflict");
    assert!(h.sim.resets().is_empty());
    // Once it is detached, the same reset goes through.
    let r =
        h.d.post("/devices/e1000-b/detach", r#"{"keep_bound":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = h.reset("e1000-a", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.sim.resets(), pairs(&[(E1000_A, "bus")]));
}

#[test]
fn bus_reset_reaching_another_iommu_group_is_refused() {
    let h = host(&[]);
    h.d.register(SPLIT_A, "split-a");
    let r = h.reset("split-a", "");
    r.expect_error(409, "reset_scope_conflict")
        .expect_message_contains(SPLIT_B);
    let e = r.json();
    assert_eq!(e["conflicting_functions"][0]["pci_address"], SPLIT_B);
    assert!(e["conflicting_functions"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("outside IOMMU group 9"));
    assert!(h.sim.resets().is_empty());
}

#[test]
fn an_attached_device_is_not_reset_under_its_vm() {
    let h = host(&[]);
    h.d.register(IGB, "igb");
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-7"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    h.reset("igb", r#"{"method":"flr"}"#)
        .expect_error(409, "reset_scope_conflict")
        .expect_message_contains("vm-7");
    assert!(h.sim.resets().is_empty());
}

#[test]
fn verification_failures_name_the_failing_check() {
    let cases = [
        (ResetOutcome::D3cold, "power_state", "needs_reset", "D3cold"),
        (
            ResetOutcome::LosesDriver,
            "driver",
            "needs_reset",
            "no driver",
        ),
        (
            ResetOutcome::AllOnes,
            "config_space",
            "needs_host_reboot",
            "0xffff",
        ),
    ];
    for (outcome, check, health, words) in cases {
        let h = host(&[]);
        h.d.register(IGB, "igb");
        h.sim.set_reset_outcome(IGB, Some(outcome));
        let r = h.reset("igb", r#"{"method":"flr"}"#);
        r.expect_error(500, "reset_failed")
            .expect_message_contains(words);
        assert_eq!(r.json()["failed_check"], check, "{outcome:?}");
        let dev = h.device("igb");
        assert_eq!(dev["health"], health, "{outcome:?}: {dev}");
        assert!(dev["health_reason"].as_str().unwrap().contains(words));
        assert_eq!(dev["last_reset"]["result"], "failed");
        assert_eq!(
            h.fs.reset_method_of(IGB).as_deref(),
            Some(ALL_METHODS),
            "put back after a failed reset too"
        );
    }
}

#[test]
fn a_failing_reset_write_reports_step_and_errno() {
    let h = host(&[]);
    h.d.register(NIC, "nic");
    h.sim
        .fail_write(&format!("bus/pci/devices/{NIC}/reset"), Errno::ENOSPC);
    let r = h.reset("nic", "");
    r.expect_error(500, "reset_failed");
    let e = r.json();
    assert_eq!(e["step"], "reset");
    assert_eq!(e["errno"], 28);
    assert_eq!(h.device("nic")["health"], "needs_reset");
    h.sim.release(&format!("bus/pci/devices/{NIC}/reset"));
    let r = h.reset("nic", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
}

#[test]
fn three_failed_resets_quarantine_until_an_explicit_reset_succeeds_also_across_a_restart() {
    let mut h = host(&[]);
    h.d.register(IGB, "igb");
    let mut events = EventStream::open(&h.d.socket, "");
    h.sim.set_reset_outcome(IGB, Some(ResetOutcome::D3cold));
    for attempt in 1..=3 {
        h.reset("igb", "").expect_error(500, "reset_failed");
        let dev = h.device("igb");
        let expected = if attempt < 3 {
            "needs_reset"
        } else {
            "quarantined"
        };
        assert_eq!(dev["health"], expected, "after {attempt} failures: {dev}");
    }
    assert!(h.device("igb")["health_reason"]
        .as_str()
        .unwrap()
        .contains("3 consecutive failed resets"));
    let e = events.until(|e| {
        e["type"] == "health_changed"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("quarantined"))
    });
    assert_eq!(e["pci_address"], IGB);

    h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-1"}"#)
        .expect_error(409, "device_quarantined");
    h.d.post("/devices/igb/bind", "")
        .expect_error(409, "device_quarantined");
    assert_eq!(h.fs.driver_of(IGB).as_deref(), Some("igb"), "nothing moved");

    h.d.restart();
    assert_eq!(
        h.device("igb")["health"],
        "quarantined",
        "kept across a restart"
    );
    h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-1"}"#)
        .expect_error(409, "device_quarantined");

    h.sim.set_reset_outcome(IGB, None);
    let r = h.reset("igb", r#"{"method":"flr"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
    assert_eq!(r.json()["health_reason"], Value::Null);
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_detach_resets_the_device_on_vfio_before_giving_it_back() {
    let h = host(&[]);
    h.d.register(IGB, "igb");
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        h.sim.resets().is_empty(),
        "a healthy device is not reset to attach"
    );
    h.sim.clear_writes();
    let r = h.d.post("/devices/igb/detach", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    let dev = r.json();
    assert_eq!(h.sim.resets(), pairs(&[(IGB, "device_specific")]));
    assert_eq!(dev["health"], "ok");
    assert_eq!(dev["last_reset"]["result"], "ok");
    assert_eq!(h.fs.driver_of(IGB).as_deref(), Some("igb"));
    // The reset came before the unbind from vfio-pci.
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    let writes = h.sim.writes();
    let at = |pred: &dyn Fn(&(String, String)) -> bool| writes.iter().position(pred);
    let reset = at(&|(p, _)| p.ends_with("/reset")).expect("reset written");
    let unbind = at(&|(p, v)| p == "bus/pci/drivers/vfio-pci/unbind" && v.starts_with(IGB))
        .expect("unbound from vfio-pci");
    assert!(reset < unbind, "{writes:?}");
}

#[test]
fn a_release_whose_reset_failed_is_reset_before_the_next_attach() {
    let h = host(&[]);
    h.d.register(IGB, "igb");
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    h.sim.set_reset_outcome(IGB, Some(ResetOutcome::D3cold));
    let r = h.d.post("/devices/igb/detach", r#"{"keep_bound":true}"#);
    assert_eq!(
        r.status, 200,
        "a failed reset does not fail the detach: {}",
        r.body
    );
    let dev = r.json();
    assert_eq!(dev["attached_to"], Value::Null);
    assert_eq!(dev["health"], "needs_reset");
    // Still broken: the attach resets first, and fails with it.
    h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-2"}"#)
        .expect_error(500, "reset_failed");
    assert_eq!(h.device("igb")["attached_to"], Value::Null);
    assert_eq!(h.sim.resets().len(), 2);
    h.sim.set_reset_outcome(IGB, None);
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-2"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
    assert_eq!(r.json()["attached_to"], "vm-2");
    assert_eq!(h.sim.resets().len(), 3);
}

#[test]
fn a_release_marked_but_not_reset_survives_a_restart() {
    let mut h = host(&[]);
    h.d.register(IGB, "igb");
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-1"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    h.sim
        .fail_write(&format!("bus/pci/devices/{IGB}/reset"), Errno::ENOENT);
    let r = h.d.post("/devices/igb/detach", r#"{"keep_bound":true}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "needs_reset");
    h.d.restart();
    assert_eq!(h.device("igb")["health"], "needs_reset");
    h.sim.release(&format!("bus/pci/devices/{IGB}/reset"));
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm-2"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
    assert_eq!(h.sim.resets().len(), 1);
}

#[test]
fn an_unbind_or_delete_of_a_device_vfiod_bound_resets_it_and_never_policy_does_not() {
    let h = host(&[]);
    h.d.register(NIC, "nic");
    assert_eq!(h.d.post("/devices/nic/bind", "").status, 200);
    let r = h.d.post("/devices/nic/unbind", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.sim.resets(), pairs(&[(NIC, "pm")]));
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));

    // DELETE gives a device vfiod bound back: a release too.
    assert_eq!(h.d.post("/devices/nic/bind", "").status, 200);
    assert_eq!(h.d.req("DELETE", "/devices/nic", None).status, 204);
    assert_eq!(h.sim.resets(), pairs(&[(NIC, "pm"), (NIC, "pm")]));
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));

    let h = host(&["--reset-on-release", "never"]);
    h.d.register(NIC, "nic");
    assert_eq!(
        h.d.post("/devices/nic/attach", r#"{"instance_id":"vm"}"#)
            .status,
        200
    );
    let r = h.d.post("/devices/nic/detach", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
    assert!(h.sim.resets().is_empty());
}

#[test]
fn a_hung_reset_answers_504_leaves_the_device_stuck_and_settles_when_it_returns() {
    let h = host(&["--op-timeout-ms", "400"]);
    h.d.register(IGB, "igb");
    let attr = format!("bus/pci/devices/{IGB}/reset");
    h.sim.hang_write(&attr);
    let r = h.reset("igb", r#"{"method":"flr"}"#);
    r.expect_error(504, "driver_timeout");
    assert_eq!(r.json()["step"], "reset");
    let dev = h.device("igb");
    assert_eq!(dev["stuck"], true);
    assert_eq!(dev["pending"], "reset");
    assert_eq!(dev["last_reset"]["result"], "timeout");
    h.reset("igb", "").expect_error(409, "device_stuck");
    h.d.post("/devices/igb/bind", "")
        .expect_error(409, "device_stuck");
    assert_eq!(h.fs.reset_method_of(IGB).as_deref(), Some("flr"));

    h.sim.release(&attr);
    let dev = eventually(10, "the stuck reset to settle", || {
        let d = h.device("igb");
        (d["stuck"] == false && d.get("pending").is_none()).then_some(d)
    });
    assert_eq!(dev["health"], "needs_reset", "{dev}");
    assert!(dev["health_reason"].as_str().unwrap().contains("unknown"));
    assert_eq!(
        h.fs.reset_method_of(IGB).as_deref(),
        Some(ALL_METHODS),
        "reset_method put back once the kernel answered"
    );
    assert_eq!(h.sim.resets(), pairs(&[(IGB, "flr")]));
    let r = h.reset("igb", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
}

#[test]
fn a_device_reset_method_list_set_with_patch_is_used_for_auto() {
    let h = host(&[]);
    h.d.register(IGB, "igb");
    let r = h.d.req(
        "PATCH",
        "/devices/igb",
        Some(r#"{"reset_method":["pm","flr"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["reset_method"], serde_json::json!(["pm", "flr"]));
    let r = h.reset("igb", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(h.sim.resets(), pairs(&[(IGB, "pm")]));
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert_eq!(
        h.reset_writes(IGB),
        pairs(&[
            ("reset_method", "pm flr"),
            ("reset", "1"),
            ("reset_method", ALL_METHODS)
        ])
    );
    h.d.register(NIC, "nic");
    let r =
        h.d.req("PATCH", "/devices/nic", Some(r#"{"reset_method":["flr"]}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    h.reset("nic", "")
        .expect_error(409, "reset_method_unsupported")
        .expect_message_contains("flr");
    let r =
        h.d.req("PATCH", "/devices/nic", Some(r#"{"reset_method":null}"#));
    assert_eq!(r.json()["reset_method"], Value::Null);
    assert_eq!(h.reset("nic", "").status, 200);
    h.d.req(
        "PATCH",
        "/devices/nic",
        Some(r#"{"reset_method":["auto"]}"#),
    )
    .expect_error(400, "invalid_request");
}

#[test]
fn all_ones_config_space_at_startup_needs_a_host_reboot() {
    let mut h = host(&[]);
    h.d.register(IGB, "igb");
    h.fs.set_config_all_ones(IGB, true);
    h.d.restart();
    let dev = h.device("igb");
    assert_eq!(dev["health"], "needs_host_reboot", "{dev}");
    h.d.post("/devices/igb/attach", r#"{"instance_id":"vm"}"#)
        .expect_error(409, "device_needs_host_reboot");
    // Answering again (a reboot, a re-plug): reset before it is handed out.
    h.fs.set_config_all_ones(IGB, false);
    h.d.restart();
    assert_eq!(h.device("igb")["health"], "needs_reset");
    let r = h.d.post("/devices/igb/attach", r#"{"instance_id":"vm"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "ok");
    assert_eq!(h.sim.resets().len(), 1);
}

#[test]
fn vfioctl_list_shows_health() {
    let h = host(&[]);
    h.d.register(IGB, "igb");
    h.sim.set_reset_outcome(IGB, Some(ResetOutcome::D3cold));
    h.reset("igb", "").expect_error(500, "reset_failed");
    let (code, out, err) = common::vfioctl(&h.d.socket, &["list"]);
    assert_eq!(code, 0, "{err}");
    let header = out.lines().next().unwrap();
    let row = out.lines().find(|l| l.starts_with("igb")).unwrap();
    let col = header.find("HEALTH").expect("HEALTH column");
    assert!(row[col..].starts_with("needs_reset"), "{out}");
    // show says how the last reset went.
    let (code, out, err) = common::vfioctl(&h.d.socket, &["show", "igb"]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with("last reset:")).unwrap();
    assert!(line.contains("auto: failed in "), "{out}");
    h.sim.set_reset_outcome(IGB, None);
    assert_eq!(h.reset("igb", "").status, 200);
    let (_, out, _) = common::vfioctl(&h.d.socket, &["show", "igb"]);
    let line = out.lines().find(|l| l.starts_with("last reset:")).unwrap();
    assert!(line.contains("auto: ok in "), "{out}");
}

#[test]
fn a_reset_under_a_process_that_holds_the_function_is_refused() {
    let h = Host::builder().on(reset_host()).fake_proc().start();
    let (fs, proc, sim, d) = (&h.fs, h.proc(), &h.sim, &h.d);
    d.register(NIC, "nic");
    assert_eq!(d.post("/devices/nic/bind", "").status, 200);
    // A VMM that still has the group open (the VM did not stop yet).
    let node = fs.dev_path("vfio/2");
    std::fs::remove_file(&node).unwrap();
    alias_node(&node, "/dev/urandom");
    let mut vmm = proc.process(3001, "qemu-system-x86");
    vmm.fd(&node);
    vmm.vfio_device_fd(None);
    let r = d.post("/devices/nic/reset", "");
    r.expect_error(409, "reset_scope_conflict")
        .expect_message_contains("qemu-system-x86");
    assert_eq!(r.json()["conflicting_functions"][0]["pci_address"], NIC);
    assert!(sim.resets().is_empty());
    vmm.exit();
    let r = d.post("/devices/nic/reset", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(sim.resets(), pairs(&[(NIC, "pm")]));
}

#[test]
fn a_quarantined_device_is_not_put_back_on_vfio_at_startup() {
    let mut h = host(&[]);
    h.d.register(IGB, "igb");
    assert_eq!(h.d.post("/devices/igb/bind", "").status, 200);
    h.sim.set_reset_outcome(IGB, Some(ResetOutcome::D3cold));
    for _ in 0..3 {
        h.reset("igb", "").expect_error(500, "reset_failed");
    }
    assert_eq!(h.device("igb")["health"], "quarantined");
    h.d.kill9();
    // While vfiod is down the device comes back on its own driver, as
    // after a reboot without vfiod's udev rule.
    std::fs::write(
        h.fs.path(&format!("bus/pci/devices/{IGB}/driver_override")),
        "\n",
    )
    .unwrap();
    std::fs::write(h.fs.path("bus/pci/drivers/vfio-pci/unbind"), IGB).unwrap();
    std::fs::write(h.fs.path("bus/pci/drivers_probe"), IGB).unwrap();
    eventually(5, "igb back on its driver", || {
        (h.fs.driver_of(IGB).as_deref() == Some("igb")).then_some(())
    });
    h.d.spawn();
    let dev = h.device("igb");
    assert_eq!(dev["health"], "quarantined", "{dev}");
    assert_eq!(
        h.fs.driver_of(IGB).as_deref(),
        Some("igb"),
        "vfiod's startup rebind put a quarantined device on vfio"
    );
}

/// Issue 18's re-plug defect, at a restart: reconcile used to settle a
/// pending reset *instead of* putting a device vfiod holds back on vfio, so
/// a device that came out of that reset without a driver stayed so.
#[test]
fn a_restart_settles_a_pending_reset_and_then_puts_the_device_back_on_vfio() {
    let mut h = host(&["--op-timeout-ms", "400"]);
    h.d.register(IGB, "igb");
    assert_eq!(h.d.post("/devices/igb/bind", "").status, 200);
    let attr = format!("bus/pci/devices/{IGB}/reset");
    h.sim.hang_write(&attr);
    h.reset("igb", r#"{"method":"flr"}"#)
        .expect_error(504, "driver_timeout");
    assert_eq!(h.device("igb")["pending"], "reset");
    h.d.kill9();
    // The reset completes while vfiod is down and leaves the function
    // without its driver.
    h.sim
        .set_reset_outcome(IGB, Some(ResetOutcome::LosesDriver));
    h.sim.release_completing(&attr, "1");
    assert!(h.sim.wait_idle(std::time::Duration::from_secs(5)));
    assert_eq!(h.fs.driver_of(IGB), None);
    h.sim.set_reset_outcome(IGB, None);
    h.d.spawn();
    let dev = eventually(10, "igb back on vfio", || {
        let d = h.device("igb");
        (d["bound_to_vfio"] == true).then_some(d)
    });
    assert!(dev.get("pending").is_none(), "{dev}");
    assert_eq!(h.fs.driver_of(IGB).as_deref(), Some("vfio-pci"));
}
