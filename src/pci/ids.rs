//! Vendor and device names from the system's `pci.ids` database, the same
//! names `lspci` prints. Without the database vfiod works, just nameless.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where Debian (`pci.ids` package) and other distributions keep the file.
pub const DEFAULT_LOCATIONS: &[&str] = &[
    "/usr/share/misc/pci.ids",
    "/usr/share/hwdata/pci.ids",
    "/usr/share/pci.ids",
];

/// Vendor and device names from the `pci.ids` database, for display only; an
/// empty one when the host has none.
#[derive(Debug, Default)]
pub struct PciIds {
    vendors: HashMap<u16, Vendor>,
    source: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Vendor {
    name: String,
    devices: HashMap<u16, String>,
}

impl PciIds {
    /// Loads the first database found; an empty one if there is none.
    pub fn load_default() -> PciIds {
        DEFAULT_LOCATIONS
            .iter()
            .map(Path::new)
            .find_map(|p| {
                let text = std::fs::read(p).ok()?;
                let mut ids = PciIds::parse(&String::from_utf8_lossy(&text));
                ids.source = Some(p.to_owned());
                Some(ids)
            })
            .unwrap_or_default()
    }

    /// The file the names came from; `None` when none was found.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Parses the vendor/device part of the format; subsystem lines and the
    /// class section (after the first `C ` line) are skipped.
    pub fn parse(text: &str) -> PciIds {
        let mut vendors = HashMap::new();
        let mut current: Option<(u16, Vendor)> = None;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with("C ") {
                break;
            }
            if let Some(rest) = line.strip_prefix('\t') {
                if rest.starts_with('\t') {
                    continue;
                }
                if let (Some((_, vendor)), Some((id, name))) = (current.as_mut(), split_entry(rest))
                {
                    vendor.devices.insert(id, name.to_owned());
                }
            } else if let Some((id, name)) = split_entry(line) {
                if let Some((vid, vendor)) = current.take() {
                    vendors.insert(vid, vendor);
                }
                current = Some((
                    id,
                    Vendor {
                        name: name.to_owned(),
                        devices: HashMap::new(),
                    },
                ));
            }
        }
        if let Some((vid, vendor)) = current {
            vendors.insert(vid, vendor);
        }
        PciIds {
            vendors,
            source: None,
        }
    }

    /// `None` when the database lacks the vendor.
    pub fn vendor_name(&self, vendor: u16) -> Option<&str> {
        self.vendors.get(&vendor).map(|v| v.name.as_str())
    }

    /// `None` when the database lacks the vendor or device.
    pub fn device_name(&self, vendor: u16, device: u16) -> Option<&str> {
        self.vendors
            .get(&vendor)?
            .devices
            .get(&device)
            .map(String::as_str)
    }
}

fn split_entry(line: &str) -> Option<(u16, &str)> {
    let (id, name) = line.split_once("  ")?;
    Some((u16::from_str_radix(id, 16).ok()?, name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# comment
10de  NVIDIA Corporation
\t2236  GA102GL [A10]
\t\t10de 1482  A10
\t1aef  GA102 High Definition Audio Controller
8086  Intel Corporation
\t10d3  82574L Gigabit Network Connection
C 03  Display controller
\t00  VGA compatible controller
";

    #[test]
    fn names_vendors_and_devices_like_lspci() {
        let ids = PciIds::parse(SAMPLE);
        assert_eq!(ids.vendor_name(0x10de), Some("NVIDIA Corporation"));
        assert_eq!(ids.device_name(0x10de, 0x2236), Some("GA102GL [A10]"));
        assert_eq!(
            ids.device_name(0x8086, 0x10d3),
            Some("82574L Gigabit Network Connection")
        );
        assert_eq!(
            ids.device_name(0x10de, 0x1482),
            None,
            "subsystem line taken as a device"
        );
        assert_eq!(
            ids.vendor_name(0x0003),
            None,
            "class section taken as a vendor"
        );
    }
}
