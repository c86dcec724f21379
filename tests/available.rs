//! `GET /devices/available`: which functions are candidates for
//! passthrough, and the names they carry.

use std::collections::BTreeSet;

use common::fakesys::DeviceSpec;
use common::host::standard_daemon;
use common::standard::{AMD, GPU, GPU_AUDIO, T4};
use serde_json::Value;

#[test]
fn available_lists_candidates_only() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    let r = d.get("/devices/available");
    assert_eq!(r.status, 200);
    let list = r.json();
    let addrs: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pci_address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, [GPU, GPU_AUDIO, T4, AMD].into_iter().collect());
    let gpu = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pci_address"] == GPU)
        .unwrap();
    assert_eq!(gpu["current_driver"], "nvidia");
    assert_eq!(gpu["iommu_group"], 1);
    assert!(gpu["registered_id"].is_string());
    let t4 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pci_address"] == T4)
        .unwrap();
    assert_eq!(t4["bound_to_vfio"], true);
}

/// hypeman's AvailableDevice has the names as strings that are never null:
/// a name `pci.ids` does not know (or no `pci.ids` at all) is left out.
#[test]
fn available_leaves_out_names_pci_ids_does_not_know() {
    let (fs, d) = standard_daemon();
    // An NVIDIA device ID no pci.ids lists.
    fs.add_device(DeviceSpec::new("0000:00:1e.0", 0x10de, 0xfffe, 0x030200).group(9));
    let list = d.get("/devices/available").json();
    let unknown = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pci_address"] == "0000:00:1e.0")
        .expect("the new GPU is a candidate");
    assert!(unknown.get("device_name").is_none(), "{unknown}");
    for v in list.as_array().unwrap() {
        for k in ["vendor_name", "device_name"] {
            assert!(v.get(k).is_none_or(Value::is_string), "{k} in {v}");
        }
    }
}
