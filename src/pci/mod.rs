//! The PCI model: addresses, what sysfs says about each function, IOMMU
//! groups, which driver is vfio, what holds a function, and `pci.ids`
//! names.

mod address;
pub mod holders;
pub mod ids;
pub mod mdev;
pub mod sriov;
pub mod sysfs;
pub mod variant;
pub mod vfio_access;
mod vfio_driver;
pub mod vgpu;

pub use address::{InvalidPciAddress, PciAddress};
pub use holders::{Disposition, Holder, HolderScanError, ProcFs, ScanReport};
pub use ids::PciIds;
pub use mdev::{MdevType, MdevUuid};
pub use sriov::SriovState;
pub use sysfs::{PciFunction, Sysfs, SysfsError};
pub use variant::VfioAliases;
pub use vfio_driver::{is_vfio_driver, VFIO_PCI, VFIO_PCI_MODULE};
pub use vgpu::VgpuType;

/// Vendors whose every function is worth offering for passthrough
/// (accelerator makers: a GPU's audio or USB-C function goes with it).
const ACCELERATOR_VENDORS: &[u16] = &[
    0x10de, // NVIDIA
    0x1002, // AMD/ATI graphics
    0x1da3, // Habana Labs (Intel Gaudi)
    0x1e52, // Tenstorrent
    0x1de0, // Groq
    0x10ee, // Xilinx/AMD FPGA accelerators
];

/// Class 03h subclass 00h (VGA) or 02h (3D controller); other display
/// subclasses (XGA, 80h "other") count as `pci`.
pub fn is_gpu_class(class: u32) -> bool {
    matches!(class >> 8, 0x0300 | 0x0302)
}

/// A function's `type` as the API and the metrics name it: hypeman's
/// `gpu` for a VGA or 3D controller, `pci` for every other function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceType {
    /// A VGA or 3D controller.
    Gpu,
    /// Any other function.
    Pci,
}

impl DeviceType {
    /// The wire and metrics spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Gpu => "gpu",
            DeviceType::Pci => "pci",
        }
    }
}

/// The [`DeviceType`] of a function of PCI class `class`.
pub fn device_type(class: u32) -> DeviceType {
    if is_gpu_class(class) {
        DeviceType::Gpu
    } else {
        DeviceType::Pci
    }
}

/// Whether a function belongs in `GET /devices/available`: display and 3D
/// controllers, processing accelerators, and anything from an accelerator
/// vendor; never a bridge.
pub fn is_passthrough_candidate(f: &PciFunction) -> bool {
    if f.is_bridge() {
        return false;
    }
    let base_class = f.class >> 16;
    base_class == 0x03 || base_class == 0x12 || ACCELERATOR_VENDORS.contains(&f.vendor_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(vendor: u16, class: u32) -> PciFunction {
        PciFunction {
            address: "0000:01:00.0".parse().unwrap(),
            vendor_id: vendor,
            device_id: 1,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class,
            driver: None,
            iommu_group: None,
            modalias: None,
            own_vfio_provider: false,
        }
    }

    #[test]
    fn gpu_type_is_vga_and_3d_only() {
        assert!(is_gpu_class(0x030000));
        assert!(is_gpu_class(0x030200));
        assert!(!is_gpu_class(0x038000));
        assert!(!is_gpu_class(0x040300));
        assert_eq!(device_type(0x030200).as_str(), "gpu");
        assert_eq!(device_type(0x038000).as_str(), "pci");
    }

    #[test]
    fn candidates_are_display_accelerators_and_accelerator_vendors_but_no_bridges() {
        assert!(is_passthrough_candidate(&function(0x8086, 0x030000)));
        assert!(is_passthrough_candidate(&function(0x10de, 0x040300)));
        assert!(is_passthrough_candidate(&function(0x1234, 0x120000)));
        assert!(!is_passthrough_candidate(&function(0x8086, 0x020000)));
        assert!(!is_passthrough_candidate(&function(0x10de, 0x060400)));
    }
}
