//! vfioctl and claims: `vfioctl claim` sends the claim asked for and says
//! whether the device is new or the instance's existing claim, a refusal
//! for want of capacity names every candidate with why it did not fit,
//! `vfioctl capacity` and `vfioctl vgpu-types` print the pools and the vGPU
//! types, and `vfioctl claim --mdev-type`, `detach --instance` and
//! `mdev-types` serve legacy mediated devices. Against a stand-in vfiod
//! answering with the shapes of vfiod's own types, and a real vfiod whose
//! simulated kernel makes VFs (two SR-IOV NICs on two NUMA nodes, an NVIDIA
//! board whose VFs take vGPU types).

mod vfioctl_stand_in;

use std::collections::BTreeSet;

use common::fakesys::{DeviceSpec, FakeSys};
use common::host::Host;
use common::vfioctl;
use serde_json::{json, Value};
use vfioctl_stand_in::{stand_in, stand_in_answers};
use vfiod::api::error::{to_body, ApiError};
use vfiod::core::{Capacity, VgpuTypeCount};
use vfiod::error::CoreError;
use vfiod::pci::PciAddress;

const VF0: &str = "0000:0b:10.0";
const VF1: &str = "0000:0b:10.2";
const PF: &str = "0000:0b:00.0";

fn addr(a: &str) -> PciAddress {
    a.parse().unwrap()
}

/// A VF as vfiod answers a claim: on vfio-pci, attached to `instance` for
/// uid 4242.
fn claimed_vf(name: &str, address: &str, instance: &str) -> Value {
    json!({
        "id": format!("{name}-id"), "name": name, "type": "pci", "pci_address": address,
        "vendor_id": "8086", "device_id": "10ca", "iommu_group": 21,
        "bound_to_vfio": true, "attached_to": instance,
        "created_at": "2026-12-07T04:00:00Z", "tags": {"resource": "vf"}, "present": true,
        "current_driver": "vfio-pci", "original_driver": null, "bound_by_vfiod": true,
        "vendor_name": "Intel Corporation", "device_name": "82576 Virtual Function",
        "class": "020000", "subsystem_vendor_id": "8086", "subsystem_device_id": "a03c",
        "stuck": false, "identity_mismatch": false, "attached_uid": 4242,
        "attached_pid": null, "health": "ok", "health_reason": null, "last_reset": null,
        "reset_method": null, "parent": "nic0-id", "vf_index": 1
    })
}

/// An error body exactly as vfiod sends it for `e`.
fn error_answer(e: CoreError) -> (String, String) {
    let (status, body) = to_body(&ApiError::from(e));
    (
        format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
        serde_json::to_string(&body).unwrap(),
    )
}

// ---- against a stand-in ----

#[test]
fn claim_sends_only_what_is_given_and_says_whether_the_device_is_new() {
    let vf = claimed_vf("nic0-vf1", VF1, "vm-1");
    let run = stand_in(
        &["claim", "--tag", "resource=vf", "--instance", "vm-1"],
        "201 Created",
        &vf.to_string(),
    );
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        (run.seen.method.as_str(), run.seen.path.as_str()),
        ("POST", "/devices/claim")
    );
    assert_eq!(
        run.seen.body,
        json!({"tags": {"resource": "vf"}, "instance_id": "vm-1"}),
        "the agent's defaults for uid and numa"
    );
    let (first, rest) = run.out.split_once("\n\n").unwrap();
    assert_eq!(first, "claimed nic0-vf1 (0000:0b:10.2) for instance vm-1");
    assert!(
        rest.starts_with("id:               nic0-vf1-id\n"),
        "{rest}"
    );
    assert!(rest.contains("\nattached_to:      vm-1\n"), "{rest}");
    assert!(
        rest.ends_with("may open:         root and uid 4242\n"),
        "as show prints it: {rest}"
    );

    // Everything given, and the same instance's existing claim (200).
    let run = stand_in(
        &[
            "claim",
            "--tag",
            "resource=vf",
            "--tag",
            "site=a",
            "--instance",
            "vm-1",
            "--uid",
            "4242",
            "--pid",
            "77",
            "--numa",
            "1",
            "--numa-required",
            "--vgpu-type",
            "L40S-12Q",
        ],
        "200 OK",
        &vf.to_string(),
    );
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        run.seen.body,
        json!({
            "tags": {"resource": "vf", "site": "a"}, "instance_id": "vm-1", "uid": 4242,
            "pid": 77, "numa_node": 1, "numa": "required", "vgpu_type": "L40S-12Q"
        })
    );
    assert_eq!(
        run.out.lines().next().unwrap(),
        "instance vm-1 already holds nic0-vf1 (0000:0b:10.2): its claim, unchanged"
    );

    // --json: the device as the agent answered.
    let run = stand_in(
        &[
            "--json",
            "claim",
            "--tag",
            "resource=vf",
            "--instance",
            "vm-1",
        ],
        "201 Created",
        &vf.to_string(),
    );
    assert_eq!((run.code, run.out), (0, format!("{vf}\n")));
}

#[test]
fn claim_is_refused_here_without_a_tag_an_instance_or_a_node_to_require() {
    for (args, says) in [
        (&["claim", "--instance", "vm-1"][..], "--tag <KEY=VALUE>"),
        (
            &["claim", "--tag", "resource=vf"][..],
            "--instance <INSTANCE>",
        ),
        (
            &[
                "claim",
                "--tag",
                "resource=vf",
                "--instance",
                "vm-1",
                "--numa-required",
            ][..],
            "--numa <N>",
        ),
        (
            &["claim", "--tag", "resource", "--instance", "vm-1"][..],
            "KEY=VALUE",
        ),
    ] {
        let runs = stand_in_answers(args, &[("201 Created", "{}")]);
        assert_eq!(runs.code, 1, "{args:?}");
        assert!(runs.seen.is_empty(), "{args:?}: no request");
        assert!(runs.err.contains(says), "{args:?}: {}", runs.err);
    }
}

#[test]
fn no_capacity_prints_one_line_per_candidate_with_its_name_and_why() {
    let (status, body) = error_answer(CoreError::NoCapacity {
        refused: vec![
            (addr(PF), "a PF with VFs: its VFs are the candidates".into()),
            (addr(VF0), "attached to instance \"vm-1\"".into()),
            (addr(VF1), "on NUMA node 0".into()),
        ],
    });
    let registry = json!([
        claimed_vf("nic0-vf0", VF0, "vm-1"),
        claimed_vf("nic0-vf1", VF1, "vm-1")
    ]);
    let args = [
        "claim",
        "--tag",
        "resource=vf",
        "--instance",
        "vm-2",
        "--numa",
        "1",
        "--numa-required",
    ];
    let runs = stand_in_answers(
        &args,
        &[(&status, &body), ("200 OK", &registry.to_string())],
    );
    assert_eq!((runs.code, runs.out.as_str()), (1, ""));
    let paths: Vec<&str> = runs.seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/devices/claim", "/devices"], "names looked up");
    assert_eq!(
        runs.err,
        "\
vfioctl: no_capacity (409): no free device fits the claim; 3 candidates considered:
ADDRESS       NAME      WHY NOT
0000:0b:00.0  -         a PF with VFs: its VFs are the candidates
0000:0b:10.0  nic0-vf0  attached to instance \"vm-1\"
0000:0b:10.2  nic0-vf1  on NUMA node 0
"
    );

    // Names that cannot be looked up are left out, the reasons stay.
    let runs = stand_in_answers(
        &args,
        &[(&status, &body), ("500 Internal Server Error", "{}")],
    );
    assert_eq!(runs.code, 1);
    assert_eq!(
        runs.err.lines().nth(1),
        Some("ADDRESS       WHY NOT"),
        "{}",
        runs.err
    );
    assert_eq!(runs.err.lines().count(), 5, "{}", runs.err);

    // --json: the agent's body, no lookup.
    let runs = stand_in_answers(
        &[&["--json"][..], &args].concat(),
        &[(&status, &body), ("200 OK", &registry.to_string())],
    );
    assert_eq!((runs.code, runs.err), (1, format!("{body}\n")));
    assert_eq!(runs.seen.len(), 1);

    // Nothing has the tags: the agent's message, as for any refusal.
    let (status, body) = error_answer(CoreError::NoCapacity { refused: vec![] });
    let run = stand_in(
        &["claim", "--tag", "resource=x", "--instance", "vm-2"],
        &status,
        &body,
    );
    assert_eq!(
        run.err,
        "vfioctl: no_capacity (409): no free device fits the claim; no registered device has \
         the tags asked for\n"
    );
    let (status, body) = error_answer(CoreError::ClaimConflict {
        instance: "vm-1".into(),
        device: "nic0-vf1".into(),
    });
    let run = stand_in(
        &["claim", "--tag", "resource=x", "--instance", "vm-1"],
        &status,
        &body,
    );
    assert_eq!(run.code, 1);
    assert!(
        run.err.starts_with(
            "vfioctl: claim_conflict (409): instance \"vm-1\" already claimed nic0-vf1"
        ),
        "{}",
        run.err
    );
}

fn pool(resource: Option<&str>, counts: [u32; 5], vgpu: &[(&str, u32)]) -> Capacity {
    let [total, free, attached, quarantined, needs_reset] = counts;
    Capacity {
        resource: resource.map(str::to_owned),
        total,
        free,
        attached,
        quarantined,
        needs_reset,
        vgpu_types: vgpu.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
        ..Capacity::default()
    }
}

#[test]
fn capacity_prints_a_row_per_pool_and_the_vgpu_types_free_vfs_can_take() {
    let answer = json!({"resources": [
        pool(None, [1, 1, 0, 0, 0], &[]),
        pool(Some("vf"), [8, 5, 2, 1, 1], &[]),
        pool(Some("vgpu"), [4, 2, 2, 0, 0], &[("NVIDIA L40S-12Q", 2), ("NVIDIA L40S-24Q", 1)]),
    ]});
    let run = stand_in(&["capacity"], "200 OK", &answer.to_string());
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        (run.seen.method.as_str(), run.seen.path.as_str()),
        ("GET", "/devices/capacity")
    );
    assert_eq!(
        run.out,
        "\
RESOURCE  TOTAL  FREE  ATTACHED  QUARANTINED  NEEDS_RESET
-         1      1     0         0            0
vf        8      5     2         1            1
vgpu      4      2     2         0            0

RESOURCE  VGPU TYPE        FREE VFS
vgpu      NVIDIA L40S-12Q  2
vgpu      NVIDIA L40S-24Q  1
"
    );
    let run = stand_in(&["--json", "capacity"], "200 OK", &answer.to_string());
    assert_eq!(run.out, format!("{answer}\n"));

    let run = stand_in(
        &["capacity", "--tag", "resource=vf", "--tag", "site=a b"],
        "200 OK",
        r#"{"resources": []}"#,
    );
    assert_eq!(
        run.seen.path,
        "/devices/capacity?tags%5Bresource%5D=vf&tags%5Bsite%5D=a%20b"
    );
    assert_eq!(run.out, "no registered devices with these tags\n");
}

#[test]
fn vgpu_types_prints_each_type_with_the_free_vfs_that_can_take_it() {
    let types = vec![
        VgpuTypeCount {
            id: 1162,
            name: "NVIDIA L40S-12Q".into(),
            available: 3,
        },
        VgpuTypeCount {
            id: 1165,
            name: "NVIDIA L40S-48Q".into(),
            available: 0,
        },
    ];
    let answer = serde_json::to_string(&types).unwrap();
    let run = stand_in(&["vgpu-types", "l40s"], "200 OK", &answer);
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(run.seen.path, "/devices/l40s/vgpu_types");
    assert_eq!(
        run.out,
        "\
ID    NAME             FREE VFS
1162  NVIDIA L40S-12Q  3
1165  NVIDIA L40S-48Q  0
"
    );
    let run = stand_in(&["vgpu-types", "nic0"], "200 OK", "[]");
    assert_eq!(
        run.out,
        "no vGPU types: no VF of nic0 lists a creatable vGPU type\n"
    );
}

// ---- against a real vfiod whose simulated kernel makes VFs ----

const PF_A: &str = "0000:0b:00.0";
const PF_B: &str = "0000:0d:00.0";

/// Two igb PFs, A on NUMA node 0 and B on node 1, each with `vfs` VFs in
/// pool `vf`.
fn vf_host(vfs: u32) -> Host {
    let pf = |addr: &str, group: u32, node: i32| {
        DeviceSpec::new(addr, 0x8086, 0x10c9, 0x020000)
            .driver("igb")
            .group(group)
            .reset_methods("flr")
            .sriov(7, 0x10ca)
            .vf_driver("igbvf")
            .numa_node(node)
    };
    let h = Host::builder()
        .on(FakeSys::with_devices([pf(PF_A, 30, 0), pf(PF_B, 31, 1)]))
        .uevent_fifo()
        .start();
    for (addr, name) in [(PF_A, "pfa"), (PF_B, "pfb")] {
        let (code, _, err) = vfioctl(
            &h.d.socket,
            &["register", addr, "--name", name, "--tag", "resource=vf"],
        );
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = vfioctl(&h.d.socket, &["sriov", name, &vfs.to_string()]);
        assert_eq!(code, 0, "{err}");
    }
    h
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn claims_through_vfioctl_hand_out_distinct_vfs_repeat_and_run_out() {
    let h = vf_host(1);
    let socket = &h.d.socket;
    let claim = |instance: &str, extra: &[&str]| {
        let mut args = vec![
            "claim",
            "--tag",
            "resource=vf",
            "--instance",
            instance,
            "--uid",
            "4242",
        ];
        args.extend_from_slice(extra);
        vfioctl(socket, &args)
    };
    let vf_a = h.fs.vfs_of(PF_A)[0].clone();
    let vf_b = h.fs.vfs_of(PF_B)[0].clone();

    // Node 1 asked for: pfb's VF, though pfa's sorts first.
    let (code, out, err) = claim("vm-1", &["--numa", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().next().unwrap(),
        format!("claimed pfb-vf0 ({vf_b}) for instance vm-1")
    );
    assert!(out.contains("\ncurrent_driver:   vfio-pci\n"), "{out}");
    assert!(out.contains("\nattached_to:      vm-1\n"), "{out}");
    assert!(
        out.ends_with("may open:         root and uid 4242\n"),
        "{out}"
    );
    assert_eq!(h.fs.driver_of(&vf_b).as_deref(), Some("vfio-pci"));

    // The same request again: the same device, said so.
    let (code, again, err) = claim("vm-1", &["--numa", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        again.lines().next().unwrap(),
        format!("instance vm-1 already holds pfb-vf0 ({vf_b}): its claim, unchanged")
    );
    assert_eq!(
        again.split_once("\n\n").unwrap().1,
        out.split_once("\n\n").unwrap().1
    );
    // Something else under the same instance: refused.
    let (code, _, err) = claim("vm-1", &[]);
    assert_eq!(code, 1);
    assert!(err.starts_with("vfioctl: claim_conflict (409): "), "{err}");

    // Node 1 required, and its one VF taken: every candidate and why.
    let (code, out, err) = claim("vm-2", &["--numa", "1", "--numa-required"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!(
            "\
vfioctl: no_capacity (409): no free device fits the claim; 4 candidates considered:
ADDRESS       NAME     WHY NOT
{PF_A}  pfa      a PF with VFs: its VFs are the candidates
{vf_a}  pfa-vf0  on NUMA node 0
{PF_B}  pfb      a PF with VFs: its VFs are the candidates
{vf_b}  pfb-vf0  attached to instance \"vm-1\"
"
        )
    );

    // Preferred only: node 0's VF; then nothing is left.
    let (code, out, err) = claim("vm-2", &["--numa", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("claimed pfa-vf0 ({vf_a}) for instance vm-2\n")),
        "{out}"
    );
    let (code, _, err) = claim("vm-3", &[]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("vfioctl: no_capacity (409): no free device fits the claim; 4 candidates"),
        "{err}"
    );

    let (code, out, err) = vfioctl(socket, &["capacity"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "\
RESOURCE  TOTAL  FREE  ATTACHED  QUARANTINED  NEEDS_RESET
vf        2      0     2         0            0
"
    );
    // Released by detach: free again.
    let (code, _, err) = vfioctl(socket, &["detach", "pfa-vf0"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = vfioctl(socket, &["capacity", "--tag", "resource=vf"]);
    assert!(
        out.ends_with("\nvf        2      1     1         0            0\n"),
        "{out}"
    );
    let (_, out, _) = vfioctl(socket, &["capacity", "--tag", "resource=none"]);
    assert_eq!(out, "no registered devices with these tags\n");

    // The stand-in's shapes are the ones this vfiod sends.
    let (_, json_out, _) = vfioctl(
        socket,
        &[
            "--json",
            "claim",
            "--tag",
            "resource=vf",
            "--instance",
            "vm-1",
            "--uid",
            "4242",
            "--numa",
            "1",
        ],
    );
    let real: Value = serde_json::from_str(json_out.trim()).unwrap();
    assert_eq!(keys(&real), keys(&claimed_vf("x", VF0, "vm-1")), "{real}");
    let (_, json_out, _) = vfioctl(socket, &["--json", "capacity"]);
    let real: Value = serde_json::from_str(json_out.trim()).unwrap();
    let fixture = serde_json::to_value(pool(Some("vf"), [0; 5], &[])).unwrap();
    assert_eq!(keys(&real["resources"][0]), keys(&fixture), "{real}");
}

/// An NVIDIA L40S-like board whose VFs take vGPU types and stay on
/// `nvidia`, with `vfs` VFs in pool `vgpu`.
fn vgpu_host(vfs: u32) -> Host {
    let gpu = DeviceSpec::new("0000:41:00.0", 0x10de, 0x26b9, 0x030200)
        .driver("nvidia")
        .group(40)
        .reset_methods("flr")
        .sriov(4, 0x26b9)
        .vgpu(&[
            (1162, "NVIDIA L40S-12Q", 4),
            (1164, "NVIDIA L40S-24Q", 2),
            (1165, "NVIDIA L40S-48Q", 1),
        ]);
    let h = Host::builder()
        .on(FakeSys::with_devices([gpu]))
        .uevent_fifo()
        .start();
    let socket = &h.d.socket;
    let (code, _, err) = vfioctl(
        socket,
        &[
            "register",
            "0000:41:00.0",
            "--name",
            "l40s",
            "--tag",
            "resource=vgpu",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vfioctl(socket, &["sriov", "l40s", &vfs.to_string()]);
    assert_eq!(code, 0, "{err}");
    h
}

#[test]
fn vgpu_types_and_a_vgpu_claim_through_vfioctl() {
    let h = vgpu_host(2);
    let socket = &h.d.socket;
    let (code, out, err) = vfioctl(socket, &["vgpu-types", "l40s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "\
ID    NAME             FREE VFS
1162  NVIDIA L40S-12Q  2
1164  NVIDIA L40S-24Q  2
1165  NVIDIA L40S-48Q  2
",
        "each VF can take any type while none is set"
    );

    let (code, out, err) = vfioctl(
        socket,
        &[
            "claim",
            "--tag",
            "resource=vgpu",
            "--instance",
            "vm-1",
            "--vgpu-type",
            "L40S-24Q",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("claimed l40s-vf"), "{out}");
    assert!(
        out.contains("\ncurrent_driver:   nvidia\n"),
        "never rebound: {out}"
    );
    // The board holds two 24Q: the sibling can still take one, and no
    // other type.
    let (_, out, _) = vfioctl(socket, &["vgpu-types", "l40s"]);
    assert_eq!(
        out,
        "\
ID    NAME             FREE VFS
1162  NVIDIA L40S-12Q  0
1164  NVIDIA L40S-24Q  1
1165  NVIDIA L40S-48Q  0
"
    );
    let (code, out, err) = vfioctl(socket, &["capacity"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(
            "RESOURCE  TOTAL  FREE  ATTACHED  QUARANTINED  NEEDS_RESET\nvgpu      2      1     1         0            0\n\nRESOURCE  VGPU TYPE        FREE VFS\n"
        ),
        "{out}"
    );
    assert!(out.contains("\nvgpu      NVIDIA L40S-24Q  1\n"), "{out}");

    // No second 48Q, and no 12Q beside a 24Q: the candidates say why.
    let (code, _, err) = vfioctl(
        socket,
        &[
            "claim",
            "--tag",
            "resource=vgpu",
            "--instance",
            "vm-2",
            "--vgpu-type",
            "L40S-12Q",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("vGPU type L40S-12Q is not creatable on it now"),
        "{err}"
    );
    assert!(err.contains("attached to instance \"vm-1\""), "{err}");
}

/// A P40 as vfiod answers an mdev claim: its record with the mediated
/// device, and the claim's `mdev`.
fn p40_with_mdev(uuid: &str, instance: &str) -> (Value, Value) {
    let mdev = json!({
        "uuid": uuid, "mdev_type": "nvidia-63",
        "sysfs_path": format!("/sys/bus/mdev/devices/{uuid}"),
        "instance_id": instance, "attached_uid": 4242, "attached_pid": null
    });
    let mut device = claimed_vf("p40", "0000:3b:00.0", instance);
    device["attached_to"] = Value::Null;
    device["attached_uid"] = Value::Null;
    device["bound_to_vfio"] = json!(false);
    device["bound_by_vfiod"] = json!(false);
    device["current_driver"] = json!("nvidia");
    device["original_driver"] = json!("nvidia");
    device.as_object_mut().unwrap().remove("parent");
    device.as_object_mut().unwrap().remove("vf_index");
    device["mdevs"] = json!([mdev.clone()]);
    (device, mdev)
}

#[test]
fn an_mdev_claim_prints_the_uuid_and_the_qemu_option_and_detach_names_the_instance() {
    let uuid = "a4bca2b7-9a66-4ff7-a7b4-4c42decb7d15";
    let (device, mdev) = p40_with_mdev(uuid, "vm-4");
    let mut answer = device.clone();
    answer["mdev"] = mdev;
    let run = stand_in(
        &[
            "claim",
            "--tag",
            "resource=grid",
            "--instance",
            "vm-4",
            "--mdev-type",
            "nvidia-63",
        ],
        "201 Created",
        &answer.to_string(),
    );
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        run.seen.body,
        json!({"tags": {"resource": "grid"}, "instance_id": "vm-4", "mdev_type": "nvidia-63"})
    );
    let mut lines = run.out.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("made mediated device {uuid} (nvidia-63) on p40 (0000:3b:00.0) for instance vm-4")
    );
    assert_eq!(
        lines.next().unwrap(),
        format!("QEMU: -device vfio-pci,sysfsdev=/sys/bus/mdev/devices/{uuid}")
    );
    assert!(
        run.out.contains(&format!(
            "\nmdev:             {uuid} (nvidia-63) for instance vm-4, open to uid 4242\n"
        )),
        "{}",
        run.out
    );
    // --vgpu-type and --mdev-type exclude each other, before any request.
    let args = [
        "claim",
        "--tag",
        "a=b",
        "--instance",
        "x",
        "--mdev-type",
        "t",
        "--vgpu-type",
        "v",
    ];
    let runs = stand_in_answers(&args, &[("201 Created", "{}")]);
    assert_eq!(runs.code, 1);
    assert!(runs.seen.is_empty(), "no request");
    assert!(runs.err.contains("cannot be used with"), "{}", runs.err);

    // The list says how many a parent carries.
    let run = stand_in(&["list"], "200 OK", &json!([device.clone()]).to_string());
    assert_eq!(run.code, 0, "{}", run.err);
    assert!(run.out.contains("(1 mediated device)"), "{}", run.out);

    // Release: detach names the instance.
    let run = stand_in(
        &["detach", "p40", "--instance", "vm-4"],
        "200 OK",
        &device.to_string(),
    );
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        (run.seen.method.as_str(), run.seen.path.as_str()),
        ("POST", "/devices/p40/detach")
    );
    assert_eq!(
        run.seen.body,
        json!({"keep_bound": false, "instance_id": "vm-4"})
    );
}

#[test]
fn mdev_types_prints_the_types_then_vfiods_mediated_devices() {
    let uuid = "a4bca2b7-9a66-4ff7-a7b4-4c42decb7d15";
    let answer = json!({
        "id": "p40-id", "name": "p40", "pci_address": "0000:3b:00.0",
        "mdev_types": [
            {"id": "nvidia-63", "name": "GRID P40-2Q", "description": null, "device_api": "vfio-pci", "available_instances": 11},
            {"id": "nvidia-64", "name": "GRID P40-4Q", "description": null, "device_api": "vfio-pci", "available_instances": 0}
        ],
        "mdevs": [p40_with_mdev(uuid, "vm-4").1]
    });
    let run = stand_in(&["mdev-types", "p40"], "200 OK", &answer.to_string());
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        (run.seen.method.as_str(), run.seen.path.as_str()),
        ("GET", "/devices/p40/mdev_types")
    );
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TYPE", "NAME", "API", "AVAILABLE"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["nvidia-63", "GRID", "P40-2Q", "vfio-pci", "11"]
    );
    assert!(lines[2].starts_with("nvidia-64"), "{}", run.out);
    assert!(lines[4].starts_with("UUID"), "{}", run.out);
    assert_eq!(
        lines[5].split_whitespace().collect::<Vec<_>>(),
        [
            uuid,
            "nvidia-63",
            "vm-4",
            "4242",
            &format!("/sys/bus/mdev/devices/{uuid}")
        ]
    );
    // A device that is no parent says so.
    let none = json!({"id": "n", "name": "nic", "pci_address": "0000:20:00.0", "mdev_types": [], "mdevs": []});
    let run = stand_in(&["mdev-types", "nic"], "200 OK", &none.to_string());
    assert!(
        run.out
            .starts_with("no mdev types: nic has no mdev_supported_types now"),
        "{}",
        run.out
    );
}
