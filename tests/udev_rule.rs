//! The boot-time udev rule vfiod writes: it names exactly the devices
//! vfiod holds on vfio, so that they go there again at the next boot
//! before any host driver probes them.

use common::fakesys::TempDir;
use common::host::Host;
use common::standard::GPU;

#[test]
fn udev_rule_lists_the_devices_vfiod_holds() {
    let fs_dir = TempDir::new("vfiod-rules").unwrap();
    let rules = fs_dir.path().join("rules.d");
    let rules_arg = rules.display().to_string();
    let h = Host::builder()
        .uevent_fifo()
        .args(&["--udev-rules-dir", &rules_arg])
        .start();
    h.d.register(GPU, "gpu");
    assert_eq!(
        h.d.post("/devices/gpu/bind", r#"{"with_group":true}"#)
            .status,
        200
    );
    let text = std::fs::read_to_string(rules.join("70-vfiod.rules")).unwrap();
    assert!(
        text.contains(r#"KERNEL=="0000:01:00.0", ATTR{vendor}=="0x10de", ATTR{device}=="0x2236", ATTR{driver_override}="vfio-pci""#),
        "{text}"
    );
    assert!(
        text.contains(r#"KERNEL=="0000:01:00.1", ATTR{driver_override}="vfio-pci""#),
        "{text}"
    );
    assert_eq!(h.d.post("/devices/gpu/unbind", "").status, 200);
    let text = std::fs::read_to_string(rules.join("70-vfiod.rules")).unwrap();
    assert!(!text.contains("KERNEL=="), "{text}");
}
