//! vfioctl and SR-IOV: `vfioctl sriov` shows a PF's VFs and sets their
//! count, `vfioctl list` draws VFs under their PF, refusals print the
//! agent's code and the VFs in the way. Against a stand-in vfiod answering
//! with the shapes of vfiod's own types, and a real vfiod on a fake tree
//! whose simulated kernel makes VFs.

mod vfioctl_stand_in;

use std::collections::BTreeSet;

use common::fakesys::{DeviceSpec, FakeSys};
use common::host::{standard_daemon, Host};
use common::standard::{GPU, NIC};
use common::vfioctl;
use serde_json::{json, Value};
use vfioctl_stand_in::{stand_in, stand_in_answers};
use vfiod::api::error::{to_body, ApiError};
use vfiod::core::{SriovStatus, VfStatus};
use vfiod::error::CoreError;
use vfiod::pci::PciAddress;
use vfiod::registry::VfDriver;

const PF_ID: &str = "p3f0q1r2s3t4u5v6w7x8y9z0";
const VF0: &str = "0000:00:10.0";
const VF1: &str = "0000:00:10.2";
const VF2: &str = "0000:00:10.4";

fn addr(a: &str) -> PciAddress {
    a.parse().unwrap()
}

/// A VF as `GET .../sriov` lists it, registered and on `driver`.
fn vf(index: u32, address: &str, driver: Option<&str>) -> VfStatus {
    VfStatus {
        index,
        pci_address: addr(address),
        id: Some(format!("vf{index}id")),
        name: Some(format!("nic0-vf{index}")),
        driver: driver.map(str::to_owned),
        error: None,
    }
}

/// `GET /devices/nic0/sriov` as vfiod answers it (serialised from its own
/// type): 7 VFs possible, `vfs` enabled.
fn sriov_answer(desired: Option<u32>, vfs: Vec<VfStatus>, warnings: Vec<String>) -> Value {
    let status = SriovStatus {
        id: PF_ID.into(),
        name: "nic0".into(),
        pci_address: addr(NIC),
        total_vfs: 7,
        num_vfs: vfs.len() as u32,
        desired_vfs: desired,
        vf_device_id: Some("10ca".into()),
        vf_driver: VfDriver::VfioPci,
        drivers_autoprobe: Some(desired.unwrap_or(0) == 0),
        vfs,
        warnings,
    };
    serde_json::to_value(status).unwrap()
}

/// Runs `args` against a stand-in answering `200 OK` with `reply`; returns
/// the request's method, path and body, and stdout.
#[track_caller]
fn ok(args: &[&str], reply: &Value) -> (String, String, Value, String) {
    let run = stand_in(args, "200 OK", &reply.to_string());
    assert_eq!(run.code, 0, "{args:?}: {}", run.err);
    assert_eq!(run.err, "", "{args:?}");
    (run.seen.method, run.seen.path, run.seen.body, run.out)
}

const SRIOV_VIEW: &str = "\
name:              nic0
id:                p3f0q1r2s3t4u5v6w7x8y9z0
pci_address:       0000:00:02.0
total_vfs:         7
num_vfs:           3
desired_vfs:       3
vf_device_id:      10ca
vf_driver:         vfio-pci
drivers_autoprobe: false

VF  ADDRESS       NAME      DRIVER
0   0000:00:10.0  nic0-vf0  vfio-pci
1   0000:00:10.2  nic0-vf1  vfio-pci
2   0000:00:10.4  nic0-vf2  vfio-pci
";

#[test]
fn sriov_shows_the_pf_s_counts_and_one_line_per_vf() {
    let answer = sriov_answer(
        Some(3),
        vec![
            vf(0, VF0, Some("vfio-pci")),
            vf(1, VF1, Some("vfio-pci")),
            vf(2, VF2, Some("vfio-pci")),
        ],
        Vec::new(),
    );
    let (method, path, body, out) = ok(&["sriov", "nic0"], &answer);
    assert_eq!(
        (method.as_str(), path.as_str(), body),
        ("GET", "/devices/nic0/sriov", Value::Null)
    );
    assert_eq!(out, SRIOV_VIEW);
    let (_, _, _, out) = ok(&["--json", "sriov", "nic0"], &answer);
    assert_eq!(out, format!("{answer}\n"), "--json: the answer as it came");

    // Never declared, none enabled: nothing is kept, autoprobe is the
    // kernel's.
    let (_, _, _, out) = ok(&["sriov", "nic0"], &sriov_answer(None, vec![], vec![]));
    assert_eq!(
        out,
        "\
name:              nic0
id:                p3f0q1r2s3t4u5v6w7x8y9z0
pci_address:       0000:00:02.0
total_vfs:         7
num_vfs:           0
desired_vfs:       -
vf_device_id:      10ca
vf_driver:         vfio-pci
drivers_autoprobe: true

no VFs enabled
"
    );
}

#[test]
fn sriov_with_a_count_puts_it_and_prints_the_state_and_the_warnings() {
    let answer = sriov_answer(
        Some(3),
        vec![
            vf(0, VF0, Some("vfio-pci")),
            vf(1, VF1, Some("vfio-pci")),
            vf(2, VF2, Some("vfio-pci")),
        ],
        Vec::new(),
    );
    let (method, path, body, out) = ok(&["sriov", "nic0", "3"], &answer);
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("PUT", "/devices/nic0/sriov")
    );
    assert_eq!(
        body,
        json!({"num_vfs": 3}),
        "no vf_driver unless given: the agent keeps the recorded one"
    );
    assert_eq!(out, SRIOV_VIEW);
    let (_, _, body, _) = ok(&["sriov", "nic0", "0", "--vf-driver", "native"], &answer);
    assert_eq!(body, json!({"num_vfs": 0, "vf_driver": "native"}));
    let (_, _, body, _) = ok(&["sriov", "--vf-driver=none", "nic0", "2"], &answer);
    assert_eq!(body, json!({"num_vfs": 2, "vf_driver": "none"}));

    // The driver made 2 of 4, and one VF could not go to vfio-pci.
    let mut stuck = vf(1, VF1, None);
    stuck.error = Some("its IOMMU group 9 holds 0000:00:09.0 on e1000e".into());
    let answer = sriov_answer(
        Some(4),
        vec![vf(0, VF0, Some("vfio-pci")), stuck],
        vec![
            "the driver of nic0 enabled 2 of the 4 VFs asked for".into(),
            "nic0-vf1 (0000:00:10.2) is not on vfio: its IOMMU group 9 holds 0000:00:09.0 on e1000e"
                .into(),
        ],
    );
    let (_, _, _, out) = ok(&["sriov", "nic0", "4"], &answer);
    assert_eq!(
        out,
        "\
name:              nic0
id:                p3f0q1r2s3t4u5v6w7x8y9z0
pci_address:       0000:00:02.0
total_vfs:         7
num_vfs:           2
desired_vfs:       4
vf_device_id:      10ca
vf_driver:         vfio-pci
drivers_autoprobe: false

VF  ADDRESS       NAME      DRIVER    PROBLEM
0   0000:00:10.0  nic0-vf0  vfio-pci  -
1   0000:00:10.2  nic0-vf1  -         its IOMMU group 9 holds 0000:00:09.0 on e1000e
warning: the driver of nic0 enabled 2 of the 4 VFs asked for
warning: nic0-vf1 (0000:00:10.2) is not on vfio: its IOMMU group 9 holds 0000:00:09.0 on e1000e
"
    );
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

#[test]
fn sriov_refusals_print_the_code_and_the_vfs_in_the_way() {
    let (status, body) = error_answer(CoreError::VfsInUse {
        pf: "nic0".into(),
        vfs: vec![
            (addr(VF0), "attached to vm-7".into()),
            (addr(VF2), "held by pid 4242 (qemu)".into()),
        ],
    });
    assert!(body.contains("conflicting_functions"), "{body}");
    let run = stand_in(&["sriov", "nic0", "2"], &status, &body);
    assert_eq!((run.code, run.out.as_str()), (1, ""));
    assert_eq!(
        run.err,
        "vfioctl: vfs_in_use (409): the VF count of nic0 cannot change while its VFs are in \
         use (a change destroys them all): 0000:00:10.0 (attached to vm-7), 0000:00:10.4 \
         (held by pid 4242 (qemu))\n"
    );
    let run = stand_in(&["--json", "sriov", "nic0", "2"], &status, &body);
    assert_eq!((run.code, run.err), (1, format!("{body}\n")));

    let (status, body) = error_answer(CoreError::InvalidVfCount {
        device: "nic0".into(),
        requested: 9,
        total: 7,
    });
    let run = stand_in(&["sriov", "nic0", "9"], &status, &body);
    assert_eq!(
        (run.code, run.err.as_str()),
        (
            1,
            "vfioctl: invalid_vf_count (400): nic0 can have at most 7 VFs (sriov_totalvfs); 9 \
             asked for\n"
        )
    );

    // Refused here, before any request.
    let runs = stand_in_answers(
        &["sriov", "nic0", "2", "--vf-driver", "igbvf"],
        &[("200 OK", "{}")],
    );
    assert_eq!(runs.code, 1);
    assert!(runs.seen.is_empty(), "{:?}", runs.seen);
    assert!(
        runs.err.contains("vfio-pci") && runs.err.contains("none") && runs.err.contains("native"),
        "{}",
        runs.err
    );
    let runs = stand_in_answers(&["sriov", "nic0", "--vf-driver", "none"], &[]);
    assert_eq!(runs.code, 1);
    assert!(runs.err.contains("<COUNT>"), "{}", runs.err);
}

// ---- vfioctl list: VFs under their PF ----

/// A registered device as `GET /devices` lists it.
fn device(name: &str, id: &str, address: &str, driver: &str) -> Value {
    json!({
        "id": id, "name": name, "type": "pci", "pci_address": address,
        "vendor_id": "8086", "device_id": "10c9", "iommu_group": 7,
        "bound_to_vfio": driver == "vfio-pci", "attached_to": null,
        "created_at": "2026-12-07T04:00:00Z", "tags": {"pool": "nics"}, "present": true,
        "current_driver": driver, "original_driver": null, "bound_by_vfiod": false,
        "vendor_name": "Intel Corporation", "device_name": "82576 Gigabit Network Connection",
        "class": "020000", "subsystem_vendor_id": "8086", "subsystem_device_id": "a03c",
        "stuck": false, "identity_mismatch": false, "attached_uid": null,
        "attached_pid": null, "health": "ok", "health_reason": null, "last_reset": null,
        "reset_method": null
    })
}

/// The PF, with 3 VFs declared.
fn pf_device() -> Value {
    let mut pf = device("nic0", PF_ID, NIC, "igb");
    pf["sriov"] = json!({"desired_vfs": 3, "vf_driver": "vfio-pci"});
    pf
}

/// VF `index` of the PF, on vfio-pci and attached to `attached`.
fn vf_device(index: u32, address: &str, attached: Option<&str>) -> Value {
    let mut vf = device(
        &format!("nic0-vf{index}"),
        &format!("vf{index}id"),
        address,
        "vfio-pci",
    );
    vf["device_id"] = json!("10ca");
    vf["device_name"] = json!("82576 Virtual Function");
    vf["iommu_group"] = json!(20 + index);
    vf["attached_to"] = json!(attached);
    vf["parent"] = json!(PF_ID);
    vf["vf_index"] = json!(index);
    vf
}

/// A device that is neither.
fn other_device() -> Value {
    let mut d = device("gpu0", "g0id", GPU, "nvidia");
    d["type"] = json!("gpu");
    d["vendor_name"] = json!("NVIDIA Corporation");
    d["device_name"] = json!("GA102GL [A10]");
    d
}

/// The agent's order is by address, so the VFs come after the GPU; vfioctl
/// puts them under their PF, by index.
fn registry_list() -> Value {
    json!([
        pf_device(),
        other_device(),
        vf_device(2, VF2, None),
        vf_device(0, VF0, Some("vm-7")),
        vf_device(1, VF1, None),
    ])
}

const LIST_WITH_VFS: &str = "\
NAME        ADDRESS       TYPE  GROUP  DRIVER    VFIO  ATTACHED  HEALTH  DEVICE                                                        ID
nic0        0000:00:02.0  pci   7      igb       no    -         ok      Intel Corporation 82576 Gigabit Network Connection (3/3 VFs)  p3f0q1r2s3t4u5v6w7x8y9z0
├ nic0-vf0  0000:00:10.0  pci   20     vfio-pci  yes   vm-7      ok      Intel Corporation 82576 Virtual Function                      vf0id
├ nic0-vf1  0000:00:10.2  pci   21     vfio-pci  yes   -         ok      Intel Corporation 82576 Virtual Function                      vf1id
└ nic0-vf2  0000:00:10.4  pci   22     vfio-pci  yes   -         ok      Intel Corporation 82576 Virtual Function                      vf2id
gpu0        0000:01:00.0  gpu   7      nvidia    no    -         ok      NVIDIA Corporation GA102GL [A10]                              g0id
";

#[test]
fn list_draws_each_vf_under_its_pf_and_the_pf_s_counts() {
    let list = registry_list();
    let (method, path, _, out) = ok(&["list"], &list);
    assert_eq!((method.as_str(), path.as_str()), ("GET", "/devices"));
    assert_eq!(out, LIST_WITH_VFS);
    let (_, _, _, out) = ok(&["--json", "list"], &list);
    assert_eq!(out, format!("{list}\n"), "--json: the answer as it came");

    // Filtered by a tag that one VF no longer carries: the count still
    // says what the PF has, from a second, unfiltered list.
    let filtered = json!([
        pf_device(),
        vf_device(0, VF0, Some("vm-7")),
        vf_device(1, VF1, None)
    ]);
    let runs = stand_in_answers(
        &["list", "--tag", "pool=nics"],
        &[
            ("200 OK", &filtered.to_string()),
            ("200 OK", &list.to_string()),
        ],
    );
    assert_eq!(runs.code, 0, "{}", runs.err);
    let paths: Vec<&str> = runs.seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/devices?tags%5Bpool%5D=nics", "/devices"]);
    let rows: Vec<&str> = runs.out.lines().collect();
    assert_eq!(rows.len(), 4, "{}", runs.out);
    assert!(
        rows[1].starts_with("nic0 ") && rows[1].contains("(3/3 VFs)"),
        "{}",
        runs.out
    );
    assert!(rows[2].starts_with("├ nic0-vf0 "), "{}", runs.out);
    assert!(rows[3].starts_with("└ nic0-vf1 "), "{}", runs.out);

    // Fewer VFs than declared (the driver made 1); a VF whose PF is not
    // listed stays where it is, unmarked.
    let partial = json!([pf_device(), vf_device(0, VF0, None)]);
    let (_, _, _, out) = ok(&["list"], &partial);
    assert!(out.contains("(1/3 VFs)"), "{out}");
    let orphan = json!([other_device(), vf_device(1, VF1, None)]);
    let (_, _, _, out) = ok(&["list"], &orphan);
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[1].starts_with("gpu0 ") && rows[2].starts_with("nic0-vf1 "),
        "{out}"
    );
}

#[test]
fn show_names_a_vf_s_pf_and_a_pf_s_kept_count() {
    let (_, _, _, out) = ok(&["show", "nic0-vf0"], &vf_device(0, VF0, Some("vm-7")));
    assert!(
        out.contains(&format!("\nparent:           {PF_ID}\n")),
        "{out}"
    );
    assert!(out.contains("\nvf_index:         0\n"), "{out}");
    let (_, _, _, out) = ok(&["show", "nic0"], &pf_device());
    assert!(
        out.contains("\nsriov:            3 VFs kept, given vfio-pci (vfioctl sriov nic0)\n"),
        "{out}"
    );
    assert!(!out.contains("parent:"), "{out}");
}

// ---- against a real vfiod on a fake tree ----

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// The stand-in devices carry the fields vfiod sends, plus the SR-IOV
/// ones it sends only for a VF or a PF with a count.
#[test]
fn stand_in_devices_carry_the_fields_vfiod_sends() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    let real = keys(&d.get("/devices/gpu0").json());
    let sriov_only = ["parent", "vf_index", "sriov"];
    for fixture in [pf_device(), vf_device(0, VF0, None), other_device()] {
        let mut fixture = keys(&fixture);
        for k in sriov_only {
            fixture.remove(k);
        }
        assert_eq!(fixture, real);
    }
}

#[test]
fn sriov_against_vfiod_reads_the_pf_and_refuses_a_function_without_sr_iov() {
    let (fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    // A PF as sysfs shows one that can make 7 VFs and has none.
    let dir = fs.tree().device_dir(NIC).unwrap();
    for (file, value) in [
        ("sriov_totalvfs", "7"),
        ("sriov_numvfs", "0"),
        ("sriov_vf_device", "10ca"),
        ("sriov_drivers_autoprobe", "1"),
    ] {
        fs.tree().write_file(&dir.join(file), value).unwrap();
    }
    let nic = d.register(NIC, "nic0");
    let (code, out, err) = vfioctl(&d.socket, &["sriov", "nic0"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "\
name:              nic0
id:                {}
pci_address:       {NIC}
total_vfs:         7
num_vfs:           0
desired_vfs:       -
vf_device_id:      10ca
vf_driver:         vfio-pci
drivers_autoprobe: true

no VFs enabled
",
            nic["id"].as_str().unwrap()
        )
    );
    let (code, out, _) = vfioctl(&d.socket, &["--json", "sriov", "nic0"]);
    assert_eq!(code, 0);
    let answer: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        keys(&answer),
        keys(&sriov_answer(None, vec![], vec![])),
        "{answer}"
    );

    let (code, out, err) = vfioctl(&d.socket, &["sriov", "gpu0"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("vfioctl: sriov_unsupported (409): gpu0 (0000:01:00.0) is not an SR-IOV")
            && err.contains("no sriov_totalvfs"),
        "{err}"
    );
    let (code, _, err) = vfioctl(&d.socket, &["sriov", "gpu0", "2"]);
    assert_eq!(code, 1);
    assert!(err.contains("sriov_unsupported (409)"), "{err}");
    let (code, _, err) = vfioctl(&d.socket, &["sriov", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not_found (404)"), "{err}");
    // Nothing was declared by the refusals.
    assert!(d.get("/devices/gpu0").json().get("sriov").is_none());
}

// ---- against a real vfiod whose simulated kernel makes VFs ----

/// The QEMU guest's igb (8086:10c9, VFs 8086:10ca, at most 7) behind its
/// root port, registered as `nic`.
fn igb_host() -> Host {
    const ROOT_PORT: &str = "0000:00:1c.0";
    let root_port = DeviceSpec::new(ROOT_PORT, 0x8086, 0x7c10, 0x060400)
        .driver("pcieport")
        .group(10);
    let igb = DeviceSpec::new(IGB, 0x8086, 0x10c9, 0x020000)
        .subsystem(0x8086, 0xa03c)
        .driver("igb")
        .group(11)
        .parent(ROOT_PORT)
        .sriov(7, 0x10ca)
        .vf_driver("igbvf");
    let h = Host::builder()
        .on(FakeSys::with_devices([root_port, igb]))
        .uevent_fifo()
        .start();
    let r = h.d.post(
        "/devices",
        &json!({"pci_address": IGB, "name": "nic", "tags": {"pool": "a"}}).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    h
}

const IGB: &str = "0000:0b:00.0";

#[test]
fn vfioctl_makes_vfs_lists_them_under_their_pf_and_is_refused_while_one_is_attached() {
    let h = igb_host();
    let socket = &h.d.socket;
    let (code, out, err) = vfioctl(socket, &["sriov", "nic", "3"]);
    assert_eq!(code, 0, "{err}");
    let vfs = h.fs.vfs_of(IGB);
    assert_eq!(vfs.len(), 3, "{out}");
    assert!(
        out.contains("\nnum_vfs:           3\ndesired_vfs:       3\nvf_device_id:      10ca\nvf_driver:         vfio-pci\ndrivers_autoprobe: false\n"),
        "{out}"
    );
    for (i, vf) in vfs.iter().enumerate() {
        let row = format!("{i}   {vf}  nic-vf{i}  vfio-pci\n");
        assert!(out.contains(&row), "{row:?} in\n{out}");
    }
    assert!(!out.contains("warning:"), "{out}");
    let (code, again, err) = vfioctl(socket, &["sriov", "nic"]);
    assert_eq!((code, again.as_str()), (0, out.as_str()), "{err}");

    let (code, out, err) = vfioctl(socket, &["list"]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split("  ").next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["nic", "├ nic-vf0", "├ nic-vf1", "└ nic-vf2"],
        "{out}"
    );
    assert!(out.lines().nth(1).unwrap().contains("(3/3 VFs)"), "{out}");
    let (code, out, err) = vfioctl(socket, &["list", "--tag", "pool=a"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("(3/3 VFs)") && out.contains("└ nic-vf2"),
        "{out}"
    );

    let (code, _, err) = vfioctl(socket, &["attach", "nic-vf1", "vm-7", "--uid", "0"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = vfioctl(socket, &["sriov", "nic", "1"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!(
            "vfioctl: vfs_in_use (409): the VF count of nic cannot change while its VFs are in \
             use (a change destroys them all): {} (attached to instance \"vm-7\")\n",
            vfs[1]
        )
    );
    assert_eq!(h.fs.vfs_of(IGB), vfs, "nothing changed");
    let (code, _, err) = vfioctl(socket, &["detach", "nic-vf1", "--keep-bound"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = vfioctl(socket, &["sriov", "nic", "1", "--vf-driver", "none"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(h.fs.vfs_of(IGB).len(), 1);
    assert!(out.contains("\nvf_driver:         none\n"), "{out}");

    // The stand-in answers carry the fields this vfiod sends.
    let real_vf = keys(&h.d.get("/devices/nic-vf0").json());
    assert_eq!(keys(&vf_device(0, VF0, None)), real_vf);
    assert_eq!(keys(&pf_device()), keys(&h.d.get("/devices/nic").json()));
    let real_status = h.d.get("/devices/nic/sriov").json();
    let fixture = sriov_answer(Some(1), vec![vf(0, VF0, None)], vec![]);
    assert_eq!(keys(&fixture), keys(&real_status));
    assert_eq!(
        keys(&fixture["vfs"][0]),
        keys(&real_status["vfs"][0]),
        "{real_status}"
    );
}
