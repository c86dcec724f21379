//! NVIDIA vGPU types on SR-IOV VFs (Ada, Hopper, Blackwell under R550 and
//! later): the VF stays on the `nvidia` driver, which is its VFIO provider
//! (it has `vfio-dev/` and `/dev/vfio/N`); a type is chosen by writing its
//! ID to `nvidia/current_vgpu_type` (0: none), and `creatable_vgpu_types`
//! lists what the VF can take now (creating a vGPU on one VF can take types
//! away from its siblings).

use super::sysfs::read_trimmed;

/// The NVIDIA driver: the VFIO provider of its vGPU VFs, and the driver
/// whose PFs' VFs keep it.
pub const NVIDIA_DRIVER: &str = "nvidia";
use super::{PciAddress, Sysfs};
use std::path::PathBuf;

/// One row of `creatable_vgpu_types`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgpuType {
    /// What `current_vgpu_type` takes.
    pub id: u32,
    /// As the driver names it (`NVIDIA L40S-12Q`).
    pub name: String,
}

impl VgpuType {
    /// Whether `asked` names this type: its ID, its full name, or its name
    /// without the `NVIDIA ` prefix, case-insensitively.
    pub fn matches(&self, asked: &str) -> bool {
        let asked = asked.trim();
        if asked.parse::<u32>().is_ok_and(|id| id == self.id) {
            return true;
        }
        let short = self.name.strip_prefix("NVIDIA ").unwrap_or(&self.name);
        asked.eq_ignore_ascii_case(&self.name) || asked.eq_ignore_ascii_case(short)
    }
}

/// Parses `creatable_vgpu_types` tolerantly: a header line (or none), then
/// `ID : Name` rows; lines that are not rows are skipped.
pub fn parse_creatable(text: &str) -> Vec<VgpuType> {
    text.lines()
        .filter_map(|line| {
            let (id, name) = line.split_once(':')?;
            let id = id.trim().parse().ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| VgpuType {
                id,
                name: name.to_owned(),
            })
        })
        .collect()
}

impl Sysfs {
    /// `nvidia/current_vgpu_type` of a vGPU-capable VF.
    pub fn current_vgpu_type_path(&self, addr: &PciAddress) -> PathBuf {
        self.device_dir(addr).join("nvidia/current_vgpu_type")
    }

    /// The types the VF can take now; `None` if it is no vGPU-capable VF.
    pub fn creatable_vgpu_types(&self, addr: &PciAddress) -> Option<Vec<VgpuType>> {
        let text = read_trimmed(&self.device_dir(addr).join("nvidia/creatable_vgpu_types")).ok()?;
        Some(parse_creatable(&text))
    }

    /// The type set now (0: none); `None` if it is no vGPU-capable VF.
    pub fn current_vgpu_type(&self, addr: &PciAddress) -> Option<u32> {
        read_trimmed(&self.current_vgpu_type_path(addr))
            .ok()?
            .parse()
            .ok()
    }

    /// Whether a VMM can use the function through VFIO as it is: on a vfio
    /// driver, or a vGPU VF on its own provider. The one test every path
    /// that would otherwise bind it asks.
    pub fn ready_for_vfio(&self, addr: &PciAddress) -> bool {
        self.driver(addr)
            .as_deref()
            .is_some_and(super::is_vfio_driver)
            || self.is_vgpu_vf(addr)
    }

    /// The function's driver when that driver, not a vfio one, is its own
    /// VFIO provider (a vGPU VF on `nvidia`); `None` otherwise.
    pub fn own_vfio_provider(&self, addr: &PciAddress) -> Option<String> {
        if !self.is_vgpu_vf(addr) {
            return None;
        }
        self.driver(addr).filter(|d| !super::is_vfio_driver(d))
    }

    /// A vGPU-capable VF on its own VFIO provider (the nvidia driver with
    /// `vfio-dev/`): ready for a VMM as it is, never to be rebound.
    pub fn is_vgpu_vf(&self, addr: &PciAddress) -> bool {
        let dir = self.device_dir(addr);
        dir.join("nvidia/creatable_vgpu_types").exists() && dir.join("vfio-dev").is_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creatable_types_are_parsed_with_or_without_a_header() {
        let text =
            "ID    : vGPU Name\n1155  : NVIDIA L40S-1B\n1162  : NVIDIA L40S-12Q\n\ngarbage\n";
        let types = parse_creatable(text);
        assert_eq!(
            types,
            vec![
                VgpuType {
                    id: 1155,
                    name: "NVIDIA L40S-1B".into()
                },
                VgpuType {
                    id: 1162,
                    name: "NVIDIA L40S-12Q".into()
                },
            ]
        );
        assert_eq!(parse_creatable("1162 : NVIDIA L40S-12Q").len(), 1);
        assert!(parse_creatable("ID : vGPU Name\n").is_empty());
        assert!(types[1].matches("L40S-12Q"));
        assert!(types[1].matches("nvidia l40s-12q"));
        assert!(types[1].matches("1162"));
        assert!(!types[1].matches("L40S-1Q"));
        assert!(!types[1].matches("116"));
    }
}
