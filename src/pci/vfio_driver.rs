//! Which driver is vfio: the one place that names vfio-pci.
//!
//! A function is "on vfio" when its driver is plain vfio-pci or one of its
//! vendor variants (`mlx5_vfio_pci`, `nvgrace-gpu-vfio-pci`, ...; how a
//! variant is picked for a device is [`super::variant`]'s). Drivers name
//! themselves in sysfs (`drivers/NAME`) with dashes or underscores as their
//! authors wrote them, and their modules always with underscores, so
//! names are compared with `_` and `-` taken as the same.

/// The generic vfio driver, as sysfs names it (`drivers/vfio-pci`) and as
/// vfiod writes it to `driver_override`.
pub const VFIO_PCI: &str = "vfio-pci";

/// The generic vfio driver's module, as `modules.alias` names it.
pub const VFIO_PCI_MODULE: &str = "vfio_pci";

/// The drivers vfiod treats as "on vfio": plain vfio-pci and its vendor
/// variants.
pub fn is_vfio_driver(driver: &str) -> bool {
    driver
        .replace('_', "-")
        .strip_suffix(VFIO_PCI)
        .is_some_and(|variant| variant.is_empty() || variant.ends_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_variants_count_as_vfio() {
        assert!(is_vfio_driver("vfio-pci"));
        assert!(is_vfio_driver("vfio_pci"));
        assert!(is_vfio_driver("mlx5_vfio_pci"));
        assert!(is_vfio_driver("nvgrace-gpu-vfio-pci"));
        assert!(!is_vfio_driver("nvidia"));
        assert!(!is_vfio_driver("vfio"));
        assert!(!is_vfio_driver("notvfio-pci"));
        assert_eq!(VFIO_PCI_MODULE.replace('_', "-"), VFIO_PCI);
    }
}
