//! vfioctl as a client, against a stand-in vfiod that records the request
//! and answers with vfiod's own shapes: the request each command sends, and
//! what it prints for each answer (tables, `show`, `--json`, dry runs,
//! events, errors). The stand-in answers are checked against a real vfiod.

mod vfioctl_stand_in;

use std::collections::BTreeSet;

use common::host::Host;
use common::standard::{EDU, GPU, NIC, T4};
use serde_json::{json, Value};
use vfioctl_stand_in::{stand_in, Seen};

/// [`stand_in`] answering `200 OK` with `reply`, for a command that must
/// succeed.
fn against_stand_in(args: &[&str], reply: Value) -> (Seen, i32, String) {
    let run = stand_in(args, "200 OK", &reply.to_string());
    assert_eq!(run.code, 0, "{args:?}: {}", run.err);
    (run.seen, run.code, run.out)
}

#[test]
fn new_commands_send_the_bodies_of_the_contract() {
    let device = gpu_device();
    let (seen, _, _) = against_stand_in(&["bind", "gpu0", "--force"], device.clone());
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/devices/gpu0/bind")
    );
    assert_eq!(
        seen.body,
        json!({"with_group": false, "dry_run": false, "force": true})
    );
    let (seen, _, _) = against_stand_in(&["bind", "gpu0"], device.clone());
    assert_eq!(seen.body, json!({"with_group": false, "dry_run": false}));

    let (seen, _, out) = against_stand_in(
        &["attach", "gpu 0", "vm-7", "--uid", "64055", "--pid", "4242"],
        device.clone(),
    );
    assert_eq!(seen.path, "/devices/gpu%200/attach");
    assert_eq!(
        seen.body,
        json!({"instance_id": "vm-7", "uid": 64055, "pid": 4242})
    );
    assert!(out.contains("gpu0"), "{out}");

    let (seen, _, _) = against_stand_in(
        &["reset", "gpu0", "--method", "af_flr", "--dry-run"],
        reset_dry_run(),
    );
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/devices/gpu0/reset")
    );
    assert_eq!(seen.body, json!({"method": "af_flr", "dry_run": true}));
    let (seen, _, _) = against_stand_in(&["reset", "gpu0"], device.clone());
    assert_eq!(
        seen.body,
        json!({"dry_run": false}),
        "no method: the agent's default"
    );

    let holders = json!({"id": "m2lp93h0ru0rrfojug4e64rk", "name": "gpu0", "pci_address": GPU,
        "holders": [
        {"kind": "process", "pci_address": GPU, "pid": 812, "comm": "Xorg", "uid": 0,
         "path": "/dev/dri/card0", "unit": "gdm.service"},
        {"kind": "mount", "pci_address": "0000:02:00.0", "device": "/dev/nvme0n1p2",
         "mount_point": "/", "fstype": "ext4"},
        {"kind": "net_interface", "pci_address": NIC, "interface": "eno1",
         "addresses": ["192.0.2.4/24"], "routes": 2},
        {"kind": "framebuffer_console", "pci_address": GPU, "vtconsole": "vtcon1",
         "framebuffer": "fb0"},
    ]});
    let (seen, _, out) = against_stand_in(&["holders", "gpu0"], holders);
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/devices/gpu0/holders")
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("FUNCTION") && lines[0].contains("HOLDER"),
        "{out}"
    );
    assert!(
        lines[1].contains(GPU)
            && lines[1].contains("pid 812 (Xorg)")
            && lines[1].contains("gdm.service"),
        "{out}"
    );
    assert!(
        lines[2].contains("/dev/nvme0n1p2 mounted on / (ext4)"),
        "{out}"
    );
    assert!(
        lines[3].contains("eno1 addresses: 192.0.2.4/24; routes: 2"),
        "{out}"
    );
    assert!(
        lines[4].contains("vtcon1") && lines[4].contains("fb0"),
        "{out}"
    );
    let none = json!({"id": "m2lp93h0ru0rrfojug4e64rk", "name": "gpu0", "pci_address": GPU,
        "holders": []});
    let (_, _, out) = against_stand_in(&["holders", "gpu0"], none);
    assert_eq!(out, "nothing holds gpu0\n");
}

// ---- vfioctl's output for each command, table and --json ----
//
// The stand-in answers are vfiod's own (captured from a daemon on a fake
// tree, `fixtures_carry_the_fields_vfiod_sends` keeps them so), chosen to
// reach every branch of the renderers: attached or not, on vfio or not,
// absent, unknown names, a last reset, tags and group companions.

/// On vfio, attached to vm-7 for uid 64055 and its VMM pid, moved with its
/// audio function, reset once.
fn gpu_device() -> Value {
    json!({
        "id": "m2lp93h0ru0rrfojug4e64rk", "name": "gpu0", "type": "gpu", "pci_address": GPU,
        "vendor_id": "10de", "device_id": "2236", "iommu_group": 1, "bound_to_vfio": true,
        "attached_to": "vm-7", "created_at": "2026-12-07T01:34:48Z",
        "tags": {"pool": "a b", "team": "ml"}, "present": true,
        "current_driver": "vfio-pci", "original_driver": "nvidia", "bound_by_vfiod": true,
        "vendor_name": "NVIDIA Corporation", "device_name": "GA102GL [A10]", "class": "030200",
        "subsystem_vendor_id": "10de", "subsystem_device_id": "1482", "stuck": false,
        "identity_mismatch": false, "group_companions": ["0000:01:00.1"],
        "attached_uid": 64055, "attached_pid": 4242, "health": "ok", "health_reason": null,
        "last_reset": {"method": "flr", "at": "2026-12-07T01:40:02.125Z", "result": "ok",
                       "duration_ms": 139},
        "reset_method": null
    })
}

/// On its own driver, no device name in pci.ids, no IOMMU group, a failed
/// reset pending and stuck.
fn nic_device() -> Value {
    json!({
        "id": "kcxxnjc9fpi40a4jvh16kedd", "name": "nic0", "type": "pci", "pci_address": NIC,
        "vendor_id": "8086", "device_id": "10d3", "iommu_group": -1, "bound_to_vfio": false,
        "attached_to": null, "created_at": "2026-12-06T22:03:11Z", "tags": {},
        "present": true, "current_driver": "e1000e", "original_driver": null,
        "bound_by_vfiod": false, "vendor_name": "Intel Corporation", "device_name": null,
        "class": "020000", "subsystem_vendor_id": "8086", "subsystem_device_id": "a01f",
        "pending": "reset", "stuck": true, "identity_mismatch": false,
        "attached_uid": null, "attached_pid": null, "health": "needs_reset",
        "health_reason": "released by vm-3: reset before the next attach",
        "last_reset": {"method": "auto", "at": "2026-12-06T23:00:00.000Z",
                       "result": "timeout", "duration_ms": 2000},
        "reset_method": ["flr", "pm"]
    })
}

/// Unplugged while on vfio and attached for a uid without a VMM pid; no
/// names at all.
fn absent_device() -> Value {
    json!({
        "id": "q0v4x7yd1p2oq8m5lbn3zr6c", "name": "qemu-edu", "type": "pci",
        "pci_address": EDU, "vendor_id": "1234", "device_id": "11e8", "iommu_group": 3,
        "bound_to_vfio": true, "attached_to": "vm-9", "created_at": "2026-12-05T08:00:00Z",
        "tags": {"owner": "qa"}, "present": false, "current_driver": null,
        "original_driver": null, "bound_by_vfiod": true, "vendor_name": null,
        "device_name": null, "class": "00ff00", "subsystem_vendor_id": "1af4",
        "subsystem_device_id": "1100", "stuck": false, "identity_mismatch": true,
        "attached_uid": 1000, "attached_pid": null, "health": "quarantined",
        "health_reason": "3 failed resets in a row", "last_reset": null,
        "reset_method": null
    })
}

/// Found on vfio-pci at registration, not attached: only root may open it.
fn t4_device() -> Value {
    json!({
        "id": "t9a3kqv0b8c7d6e5f4g3h2j1", "name": "t4", "type": "gpu", "pci_address": T4,
        "vendor_id": "10de", "device_id": "1eb8", "iommu_group": 4, "bound_to_vfio": true,
        "attached_to": null, "created_at": "2026-12-07T01:00:00Z", "tags": {},
        "present": true, "current_driver": "vfio-pci", "original_driver": "vfio-pci",
        "bound_by_vfiod": false, "vendor_name": "NVIDIA Corporation",
        "device_name": "TU104GL [Tesla T4]", "class": "030200",
        "subsystem_vendor_id": "10de", "subsystem_device_id": "12a2", "stuck": false,
        "identity_mismatch": false, "attached_uid": null, "attached_pid": null,
        "health": "ok", "health_reason": null, "last_reset": null, "reset_method": null
    })
}

/// `GET /devices/available?all=true`: a bridge with only a vendor name, a
/// function with no names and no driver, a registered one.
fn available_all() -> Value {
    json!([
        {"pci_address": "0000:00:01.0", "vendor_id": "8086", "device_id": "7c10",
         "vendor_name": "Intel Corporation", "iommu_group": 1,
         "current_driver": "pcieport", "type": "pci", "class": "060400",
         "bound_to_vfio": false, "registered_id": null},
        {"pci_address": EDU, "vendor_id": "1234", "device_id": "11e8", "iommu_group": 3,
         "current_driver": null, "type": "pci", "class": "00ff00", "bound_to_vfio": false,
         "registered_id": null},
        {"pci_address": "0000:00:05.0", "vendor_id": "1002", "device_id": "73bf",
         "vendor_name": "Advanced Micro Devices, Inc. [AMD/ATI]",
         "device_name": "Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]", "iommu_group": 5,
         "current_driver": "amdgpu", "type": "gpu", "class": "030000",
         "bound_to_vfio": false, "registered_id": null},
        {"pci_address": GPU, "vendor_id": "10de", "device_id": "2236",
         "vendor_name": "NVIDIA Corporation", "device_name": "GA102GL [A10]",
         "iommu_group": 1, "current_driver": "vfio-pci", "type": "gpu", "class": "030200",
         "bound_to_vfio": true, "registered_id": "m2lp93h0ru0rrfojug4e64rk"}
    ])
}

/// Every kind of holder, a process with and without its unit, an interface
/// with and without addresses.
fn holders_answer() -> Value {
    json!({
        "id": "m2lp93h0ru0rrfojug4e64rk", "name": "gpu0", "pci_address": GPU,
        "holders": [
            {"kind": "process", "pci_address": GPU, "pid": 812, "comm": "Xorg", "uid": 0,
             "path": "/dev/dri/card0", "unit": "gdm.service"},
            {"kind": "process", "pci_address": GPU, "pid": 4410, "comm": "nvidia-smi",
             "uid": 1000, "path": "/dev/nvidia0"},
            {"kind": "mount", "pci_address": "0000:02:00.0", "device": "/dev/nvme0n1p2",
             "mount_point": "/", "fstype": "ext4"},
            {"kind": "swap", "pci_address": "0000:02:00.0", "device": "/dev/nvme0n1p3"},
            {"kind": "block_stack", "pci_address": "0000:02:00.0", "device": "nvme0n1p4",
             "holder": "dm-0"},
            {"kind": "net_interface", "pci_address": NIC, "interface": "eno1",
             "addresses": ["192.0.2.4/24", "2001:db8::4/64"], "routes": 2},
            {"kind": "net_interface", "pci_address": NIC, "interface": "eno2",
             "addresses": [], "routes": 1},
            {"kind": "framebuffer_console", "pci_address": GPU, "vtconsole": "vtcon1",
             "framebuffer": "fb0"}
        ]
    })
}

fn bind_dry_run() -> Value {
    json!({
        "dry_run": true, "device": gpu_device(),
        "plan": {
            "vfio_driver": "vfio-pci", "iommu_group": 1,
            "moves": [{"pci_address": GPU, "from": "nvidia", "to": "vfio-pci"},
                      {"pci_address": "0000:01:00.1", "from": "snd_hda_intel",
                       "to": "vfio-pci"}],
            "steps": [
                "write \"vfio-pci\" to /sys/bus/pci/devices/0000:01:00.0/driver_override",
                "write 0000:01:00.0 to /sys/bus/pci/drivers/nvidia/unbind",
                "write 0000:01:00.0 to /sys/bus/pci/drivers_probe",
                "check 0000:01:00.0 is bound to vfio-pci",
                "check /dev/vfio/1 exists"
            ],
            "holders": [{"kind": "framebuffer_console", "pci_address": GPU,
                         "vtconsole": "vtcon1", "framebuffer": "fb0"}],
            "already_bound": false
        }
    })
}

fn bind_dry_run_already_bound() -> Value {
    json!({
        "dry_run": true, "device": t4_device(),
        "plan": {
            "vfio_driver": "vfio-pci", "iommu_group": 4,
            "moves": [{"pci_address": T4, "from": "vfio-pci", "to": "vfio-pci"}],
            "steps": [], "holders": [], "already_bound": true
        }
    })
}

fn reset_dry_run() -> Value {
    json!({
        "dry_run": true, "device": gpu_device(),
        "plan": {
            "method": "auto", "methods": ["flr", "pm"],
            "scope": [{"pci_address": GPU, "driver": "vfio-pci", "iommu_group": 1},
                      {"pci_address": "0000:01:00.1", "driver": null, "iommu_group": 1}],
            "steps": ["write \"1\" to /sys/bus/pci/devices/0000:01:00.0/reset",
                      "check config space, power state and driver of 0000:01:00.0"]
        }
    })
}

fn health_answer() -> &'static str {
    r#"{"status":"ok","version":"0.1.0","uptime_s":5012,"vfio_pci_available":true,"iommu_enabled":true,"privileged":true,"registered_devices":2,"hotplug":"udev","pci_ids":null,"last_event_seq":41,"vfio_container_usable_by_all":false}"#
}

/// Runs `args` against a stand-in answering `reply`, and returns stdout.
#[track_caller]
fn output(args: &[&str], reply: &Value) -> String {
    let run = stand_in(args, "200 OK", &reply.to_string());
    assert_eq!(run.code, 0, "{args:?}: {}", run.err);
    assert_eq!(run.err, "", "{args:?}");
    run.out
}

/// `--json` prints the answer compact, keys in alphabetical order
/// (serde_json's map), one line.
#[track_caller]
fn assert_json_output(args: &[&str], reply: &Value) {
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    assert_eq!(output(&with_json, reply), format!("{reply}\n"), "{args:?}");
}

const LIST_TABLE: &str = "\
NAME      ADDRESS       TYPE  GROUP  DRIVER    VFIO  ATTACHED  HEALTH       DEVICE                                 ID
gpu0      0000:01:00.0  gpu   1      vfio-pci  yes   vm-7      ok           NVIDIA Corporation GA102GL [A10]       m2lp93h0ru0rrfojug4e64rk
nic0      0000:00:02.0  pci   -1     e1000e    no    -         needs_reset  Intel Corporation 8086:10d3            kcxxnjc9fpi40a4jvh16kedd
qemu-edu  0000:00:03.0  pci   3      (absent)  yes   vm-9      quarantined  1234:11e8                              q0v4x7yd1p2oq8m5lbn3zr6c
t4        0000:00:04.0  gpu   4      vfio-pci  yes   -         ok           NVIDIA Corporation TU104GL [Tesla T4]  t9a3kqv0b8c7d6e5f4g3h2j1
";

#[test]
fn list_prints_a_table_of_the_devices() {
    let list = json!([gpu_device(), nic_device(), absent_device(), t4_device()]);
    let run = stand_in(&["list", "--tag", "team=ml"], "200 OK", &list.to_string());
    assert_eq!(run.seen.path, "/devices?tags%5Bteam%5D=ml");
    assert_eq!(run.out, LIST_TABLE);
    assert_json_output(&["list"], &list);
    assert_eq!(output(&["list"], &json!([])), "no registered devices\n");
    assert_json_output(&["list"], &json!([]));
}

const SHOW_GPU: &str = "\
id:               m2lp93h0ru0rrfojug4e64rk
name:             gpu0
type:             gpu
pci_address:      0000:01:00.0
vendor_id:        10de
device_id:        2236
vendor_name:      NVIDIA Corporation
device_name:      GA102GL [A10]
class:            030200
iommu_group:      1
present:          true
current_driver:   vfio-pci
original_driver:  nvidia
bound_to_vfio:    true
bound_by_vfiod:   true
attached_to:      vm-7
created_at:       2026-12-07T01:34:48Z
stuck:            false
identity_mismatch:false
health:           ok
health_reason:    -
tags:             pool=a b, team=ml
moved with:       0000:01:00.1
last reset:       flr: ok in 139 ms at 2026-12-07T01:40:02.125Z
may open:         root and uid 64055 (until VMM pid 4242 exits)
";

const SHOW_NIC: &str = "\
id:               kcxxnjc9fpi40a4jvh16kedd
name:             nic0
type:             pci
pci_address:      0000:00:02.0
vendor_id:        8086
device_id:        10d3
vendor_name:      Intel Corporation
device_name:      -
class:            020000
iommu_group:      -1
present:          true
current_driver:   e1000e
original_driver:  -
bound_to_vfio:    false
bound_by_vfiod:   false
attached_to:      -
created_at:       2026-12-06T22:03:11Z
stuck:            true
identity_mismatch:false
health:           needs_reset
health_reason:    released by vm-3: reset before the next attach
tags:             -
last reset:       auto: timeout in 2000 ms at 2026-12-06T23:00:00.000Z
may open:         nobody: not on vfio
";

const SHOW_ABSENT: &str = "\
id:               q0v4x7yd1p2oq8m5lbn3zr6c
name:             qemu-edu
type:             pci
pci_address:      0000:00:03.0
vendor_id:        1234
device_id:        11e8
vendor_name:      -
device_name:      -
class:            00ff00
iommu_group:      3
present:          false
current_driver:   -
original_driver:  -
bound_to_vfio:    true
bound_by_vfiod:   true
attached_to:      vm-9
created_at:       2026-12-05T08:00:00Z
stuck:            false
identity_mismatch:true
health:           quarantined
health_reason:    3 failed resets in a row
tags:             owner=qa
last reset:       -
may open:         root and uid 1000
";

const SHOW_T4: &str = "\
id:               t9a3kqv0b8c7d6e5f4g3h2j1
name:             t4
type:             gpu
pci_address:      0000:00:04.0
vendor_id:        10de
device_id:        1eb8
vendor_name:      NVIDIA Corporation
device_name:      TU104GL [Tesla T4]
class:            030200
iommu_group:      4
present:          true
current_driver:   vfio-pci
original_driver:  vfio-pci
bound_to_vfio:    true
bound_by_vfiod:   false
attached_to:      -
created_at:       2026-12-07T01:00:00Z
stuck:            false
identity_mismatch:false
health:           ok
health_reason:    -
tags:             -
last reset:       -
may open:         root only
";

#[test]
fn show_prints_every_field_of_a_device() {
    for (device, expected) in [
        (gpu_device(), SHOW_GPU),
        (nic_device(), SHOW_NIC),
        (absent_device(), SHOW_ABSENT),
        (t4_device(), SHOW_T4),
    ] {
        let name = device["name"].as_str().unwrap().to_owned();
        assert_eq!(output(&["show", &name], &device), expected, "{name}");
        assert_json_output(&["show", &name], &device);
    }
}

#[test]
fn commands_that_answer_a_device_print_it_as_show_does() {
    let device = gpu_device();
    for args in [
        &["register", GPU, "--name", "gpu0"][..],
        &["update", "gpu0", "--tag", "team=ml"],
        &["bind", "gpu0"],
        &["unbind", "gpu0"],
        &["attach", "gpu0", "vm-7"],
        &["detach", "gpu0"],
        &["reset", "gpu0"],
    ] {
        assert_eq!(output(args, &device), SHOW_GPU, "{args:?}");
        assert_json_output(args, &device);
    }
}

#[test]
fn delete_says_what_it_deleted() {
    let run = stand_in(&["delete", "gpu0"], "204 No Content", "");
    assert_eq!((run.seen.method.as_str(), run.code), ("DELETE", 0));
    assert_eq!(run.out, "deleted gpu0\n");
    let run = stand_in(&["--json", "delete", "gpu0"], "204 No Content", "");
    assert_eq!(
        (run.code, run.out.as_str()),
        (0, "{\"deleted\":\"gpu0\"}\n")
    );
}

#[test]
fn available_prints_candidates_and_with_all_every_function() {
    let all = available_all();
    let candidates = json!(all.as_array().unwrap()[2..].to_vec());
    assert_eq!(
        output(&["available"], &candidates),
        "\
ADDRESS       TYPE  GROUP  DRIVER    REGISTERED  DEVICE
0000:00:05.0  gpu   5      amdgpu    no          Advanced Micro Devices, Inc. [AMD/ATI] Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]
0000:01:00.0  gpu   1      vfio-pci  yes         NVIDIA Corporation GA102GL [A10]
"
    );
    assert_json_output(&["available"], &candidates);
    assert_eq!(
        output(&["available", "--all"], &all),
        "\
ADDRESS       CLASS       DEVICE                                                                                         DRIVER    GROUP  REGISTERED
0000:00:01.0  pci [0604]  Intel Corporation 8086:7c10 [8086:7c10]                                                        pcieport  1      -
0000:00:03.0  pci [00ff]  1234:11e8 [1234:11e8]                                                                          -         3      -
0000:00:05.0  gpu [0300]  Advanced Micro Devices, Inc. [AMD/ATI] Navi 21 [Radeon RX 6800/6800 XT / 6900 XT] [1002:73bf]  amdgpu    5      -
0000:01:00.0  gpu [0302]  NVIDIA Corporation GA102GL [A10] [10de:2236]                                                   vfio-pci  1      m2lp93h0ru0rrfojug4e64rk
"
    );
    assert_json_output(&["available", "--all"], &all);
}

/// The HOLDER column is `Holder`'s own `Display`, the words of vfiod's
/// busy errors.
#[test]
fn holders_prints_one_line_per_holder_of_every_kind() {
    let answer = holders_answer();
    assert_eq!(
        output(&["holders", "gpu0"], &answer),
        "\
FUNCTION      KIND                 HOLDER
0000:01:00.0  process              pid 812 (Xorg) uid 0 has /dev/dri/card0 open, unit gdm.service
0000:01:00.0  process              pid 4410 (nvidia-smi) uid 1000 has /dev/nvidia0 open
0000:02:00.0  mount                /dev/nvme0n1p2 mounted on / (ext4)
0000:02:00.0  swap                 /dev/nvme0n1p3 is in use as swap
0000:02:00.0  block_stack          nvme0n1p4 is part of dm-0 (md/dm/LVM)
0000:00:02.0  net_interface        network interface eno1 addresses: 192.0.2.4/24, 2001:db8::4/64; routes: 2
0000:00:02.0  net_interface        network interface eno2 addresses: none; routes: 1
0000:01:00.0  framebuffer_console  framebuffer console vtcon1 is on fb0
"
    );
    assert_json_output(&["holders", "gpu0"], &answer);
}

#[test]
fn dry_runs_print_the_plan() {
    assert_eq!(
        output(
            &["bind", "gpu0", "--with-group", "--dry-run"],
            &bind_dry_run()
        ),
        "\
dry run, nothing changed; a bind would:
  write \"vfio-pci\" to /sys/bus/pci/devices/0000:01:00.0/driver_override
  write 0000:01:00.0 to /sys/bus/pci/drivers/nvidia/unbind
  write 0000:01:00.0 to /sys/bus/pci/drivers_probe
  check 0000:01:00.0 is bound to vfio-pci
  check /dev/vfio/1 exists
"
    );
    assert_json_output(&["bind", "gpu0", "--dry-run"], &bind_dry_run());
    let already = bind_dry_run_already_bound();
    assert_eq!(
        output(&["bind", "t4", "--dry-run"], &already),
        "nothing to do: already on vfio\n"
    );
    assert_json_output(&["bind", "t4", "--dry-run"], &already);
    assert_eq!(
        output(&["reset", "gpu0", "--dry-run"], &reset_dry_run()),
        "\
dry run, nothing changed; a reset would try flr, pm and reach:
  0000:01:00.0 (vfio-pci)
  0000:01:00.1 (-)
"
    );
    assert_json_output(&["reset", "gpu0", "--dry-run"], &reset_dry_run());
}

#[test]
fn health_prints_the_answer_as_sorted_key_value_lines() {
    let answer: Value = serde_json::from_str(health_answer()).unwrap();
    assert_eq!(
        output(&["health"], &answer),
        "\
hotplug:            udev
iommu_enabled:      true
last_event_seq:     41
pci_ids:            -
privileged:         true
registered_devices: 2
status:             ok
uptime_s:           5012
version:            0.1.0
vfio_container_usable_by_all:false
vfio_pci_available: true
"
    );
    // Spelled out once: the keys in alphabetical order, not vfiod's.
    let run = stand_in(&["--json", "health"], "200 OK", health_answer());
    assert_eq!(
        run.out,
        "{\"hotplug\":\"udev\",\"iommu_enabled\":true,\"last_event_seq\":41,\"pci_ids\":null,\
         \"privileged\":true,\"registered_devices\":2,\"status\":\"ok\",\"uptime_s\":5012,\
         \"version\":\"0.1.0\",\"vfio_container_usable_by_all\":false,\"vfio_pci_available\":true}\n"
    );
}

/// Event lines as `GET /events` streams them, one of each shape: extras
/// sorted by name, a lagged event without a device.
const EVENT_LINES: &str = concat!(
    r#"{"seq":5,"type":"registered","pci_address":"0000:00:02.0","device_id":"kcxxnjc9fpi40a4jvh16kedd","at":"2026-12-07T01:34:48.123456Z"}"#,
    "\n",
    r#"{"seq":6,"type":"bind","pci_address":"0000:01:00.0","device_id":"m2lp93h0ru0rrfojug4e64rk","at":"2026-12-07T01:34:49.000001Z","driver":"vfio-pci"}"#,
    "\n",
    r#"{"seq":7,"type":"attach","pci_address":"0000:01:00.0","device_id":"m2lp93h0ru0rrfojug4e64rk","at":"2026-12-07T01:34:50.500000Z","instance_id":"vm-7"}"#,
    "\n",
    r#"{"seq":8,"type":"reset_failed","pci_address":"0000:00:02.0","device_id":"kcxxnjc9fpi40a4jvh16kedd","at":"2026-12-07T01:35:00.000000Z","driver":"e1000e","detail":"flr: config space reads all ones"}"#,
    "\n",
    r#"{"seq":123456,"type":"lagged","pci_address":null,"device_id":null,"at":"2026-12-07T01:36:00.000000Z","missed":12}"#,
    "\n",
);

#[test]
fn events_prints_one_line_per_event() {
    let run = stand_in(&["events", "--since", "4"], "200 OK", EVENT_LINES);
    assert_eq!(run.seen.path, "/events?since=4");
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        run.out,
        "     5  2026-12-07T01:34:48.123456Z  registered         0000:00:02.0  
     6  2026-12-07T01:34:49.000001Z  bind               0000:01:00.0  driver=vfio-pci
     7  2026-12-07T01:34:50.500000Z  attach             0000:01:00.0  instance_id=vm-7
     8  2026-12-07T01:35:00.000000Z  reset_failed       0000:00:02.0  detail=flr: config space reads all ones driver=e1000e
123456  2026-12-07T01:36:00.000000Z  lagged             -             missed=12
"
    );
    // --json: the lines as they came.
    let run = stand_in(&["--json", "events"], "200 OK", EVENT_LINES);
    assert_eq!(
        (run.seen.path.as_str(), run.out.as_str()),
        ("/events", EVENT_LINES)
    );
    let run = stand_in(&["events"], "429 Too Many Requests", r#"{"code":"x"}"#);
    assert_eq!(run.code, 1);
    assert_eq!(run.err, "vfioctl: HTTP 429 Too Many Requests: \n");
}

#[test]
fn errors_print_the_agent_s_code_and_message() {
    let not_found =
        r#"{"code":"not_found","message":"no registered device with id or name \"nope\""}"#;
    let run = stand_in(&["show", "nope"], "404 Not Found", not_found);
    assert_eq!((run.code, run.out.as_str()), (1, ""));
    assert_eq!(
        run.err,
        "vfioctl: not_found (404): no registered device with id or name \"nope\"\n"
    );
    let run = stand_in(&["--json", "show", "nope"], "404 Not Found", not_found);
    assert_eq!((run.code, run.err), (1, format!("{not_found}\n")));
    // With the details of a refused bind.
    let busy = json!({
        "code": "device_busy", "message": "0000:01:00.0 is in use: pid 812 (Xorg)",
        "holders": [{"kind": "process", "pci_address": GPU, "pid": 812, "comm": "Xorg",
                     "uid": 0, "path": "/dev/dri/card0"}]
    });
    let run = stand_in(&["bind", "gpu0"], "409 Conflict", &busy.to_string());
    assert_eq!(
        (run.code, run.err.as_str()),
        (
            1,
            "vfioctl: device_busy (409): 0000:01:00.0 is in use: pid 812 (Xorg)\n"
        )
    );
    let run = stand_in(&["list"], "502 Bad Gateway", "upstream gone");
    assert_eq!(
        (run.code, run.err.as_str()),
        (1, "vfioctl: HTTP 502 Bad Gateway: upstream gone\n")
    );
}

/// The stand-in answers above carry exactly the fields vfiod sends.
#[test]
fn fixtures_carry_the_fields_vfiod_sends() {
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    let Host {
        fs: _fs,
        sim: _sim,
        d,
        ..
    } = Host::standard(&[]);
    d.register(GPU, "gpu0");
    let real = d.get("/devices/gpu0").json();
    let optional = ["pending", "group_companions"];
    for fixture in [gpu_device(), nic_device(), absent_device(), t4_device()] {
        let mut fixture = keys(&fixture);
        for k in optional {
            fixture.remove(k);
        }
        assert_eq!(fixture, keys(&real));
    }
    let real = d.get("/devices/available?all=true").json();
    let real_gpu = real
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["pci_address"] == GPU)
        .unwrap();
    assert_eq!(keys(&available_all()[3]), keys(real_gpu));
    let real = d.get("/devices/gpu0/holders").json();
    assert_eq!(keys(&holders_answer()), keys(&real));
    let real = d.get("/health").json();
    assert_eq!(
        keys(&serde_json::from_str(health_answer()).unwrap()),
        keys(&real)
    );
    let real = d
        .post(
            "/devices/gpu0/bind",
            r#"{"with_group":true,"dry_run":true}"#,
        )
        .json();
    assert_eq!(keys(&bind_dry_run()["plan"]), keys(&real["plan"]));
}
