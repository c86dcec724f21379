//! Legacy mediated devices (mdev): a parent function on its own driver
//! (an NVIDIA GPU before Ada under the vGPU host driver, an Intel iGPU
//! under GVT-g) offers types in `mdev_supported_types/<type>/`; writing a
//! UUID to a type's `create` makes a mediated device `<parent>/<uuid>/`,
//! with its own IOMMU group and `/dev/vfio/N`, which QEMU takes as
//! `-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/<uuid>`. Writing `1`
//! to its `remove` destroys it. The parent never leaves its driver; the
//! kernel keeps `available_instances` of each type (creating one instance
//! can take others away, as NVIDIA allows one type per GPU).
//!
//! Mediated devices do not survive a reboot or the parent's unbind: vfiod
//! records each one it makes and makes it again with the same UUID.

use std::fmt;
use std::path::PathBuf;

use super::sysfs::{link_name, read_trimmed};
use super::{PciAddress, Sysfs};

/// A mediated device's UUID, in the kernel's canonical lower-case form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MdevUuid(String);

impl MdevUuid {
    /// A new random (version 4) UUID.
    pub fn random() -> MdevUuid {
        MdevUuid(uuid::Uuid::new_v4().hyphenated().to_string())
    }

    /// Accepts the hyphenated form only (what `create` takes and sysfs
    /// shows); any case, kept lower-case.
    pub fn parse(s: &str) -> Option<MdevUuid> {
        let s = s.trim();
        if s.len() != 36 {
            return None;
        }
        let parsed = uuid::Uuid::try_parse(s).ok()?;
        Some(MdevUuid(parsed.hyphenated().to_string()))
    }

    /// The 36-character form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for MdevUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for MdevUuid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        MdevUuid::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "not a UUID: {:?}",
                s.chars().take(40).collect::<String>()
            ))
        })
    }
}

impl fmt::Display for MdevUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of a parent's `mdev_supported_types`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MdevType {
    /// The directory's name (`nvidia-63`, `i915-GVTg_V5_4`): what is
    /// recorded and matched first.
    pub id: String,
    /// `name`, when the driver gives one (`GRID P40-2Q`).
    pub name: Option<String>,
    /// `description`, when the driver gives one.
    pub description: Option<String>,
    /// `device_api` (`vfio-pci`).
    pub device_api: Option<String>,
    /// How many more the kernel would make now; 0 when unreadable.
    pub available_instances: u32,
}

impl MdevType {
    /// Whether `asked` names this type: its id, or its name,
    /// case-insensitively.
    pub fn matches(&self, asked: &str) -> bool {
        let asked = asked.trim();
        asked.eq_ignore_ascii_case(&self.id)
            || self
                .name
                .as_deref()
                .is_some_and(|n| asked.eq_ignore_ascii_case(n.trim()))
    }
}

impl Sysfs {
    fn mdev_types_dir(&self, parent: &PciAddress) -> PathBuf {
        self.device_dir(parent).join("mdev_supported_types")
    }

    /// Whether `parent` offers mdev types now (it is on a driver that
    /// registered it as a parent).
    pub fn is_mdev_parent(&self, parent: &PciAddress) -> bool {
        self.mdev_types_dir(parent).is_dir()
    }

    /// The types `parent` offers now, by id; empty when it is no parent.
    pub fn mdev_types(&self, parent: &PciAddress) -> Vec<MdevType> {
        let Ok(entries) = std::fs::read_dir(self.mdev_types_dir(parent)) else {
            return Vec::new();
        };
        let mut types: Vec<MdevType> = entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_owned();
                let dir = e.path();
                let read = |f: &str| read_trimmed(&dir.join(f)).ok().filter(|s| !s.is_empty());
                Some(MdevType {
                    name: read("name"),
                    description: read("description"),
                    device_api: read("device_api"),
                    available_instances: read("available_instances")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    id,
                })
            })
            .collect();
        types.sort_by(|a, b| a.id.cmp(&b.id));
        types
    }

    /// `mdev_supported_types/<type>/create` of `parent`.
    pub fn mdev_create_path(&self, parent: &PciAddress, type_id: &str) -> PathBuf {
        self.mdev_types_dir(parent).join(type_id).join("create")
    }

    /// `bus/mdev/devices/<uuid>`: the path QEMU's `sysfsdev=` takes.
    pub fn mdev_dir(&self, uuid: &MdevUuid) -> PathBuf {
        self.root().join("bus/mdev/devices").join(uuid.as_str())
    }

    /// `<mdev>/remove`: writing `1` destroys it.
    pub fn mdev_remove_path(&self, uuid: &MdevUuid) -> PathBuf {
        self.mdev_dir(uuid).join("remove")
    }

    /// Whether the kernel has the mediated device now.
    pub fn mdev_exists(&self, uuid: &MdevUuid) -> bool {
        self.mdev_dir(uuid).exists()
    }

    /// The type id of an existing mediated device (its `mdev_type` link).
    pub fn mdev_type_of(&self, uuid: &MdevUuid) -> Option<String> {
        link_name(&self.mdev_dir(uuid).join("mdev_type"))
    }

    /// The IOMMU group of an existing mediated device.
    pub fn mdev_iommu_group(&self, uuid: &MdevUuid) -> Option<u32> {
        link_name(&self.mdev_dir(uuid).join("iommu_group"))?
            .parse()
            .ok()
    }

    /// The mediated devices under `parent` now (each child directory with
    /// an `mdev_type` link), whoever made them.
    pub fn mdevs_of(&self, parent: &PciAddress) -> Vec<MdevUuid> {
        // Only a registered parent has any (the kernel removes them when
        // it unregisters): one stat for every other function, instead of
        // a walk of its directory, on each claim and move.
        if !self.is_mdev_parent(parent) {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir(self.device_dir(parent)) else {
            return Vec::new();
        };
        let mut found: Vec<MdevUuid> = entries
            .flatten()
            .filter(|e| e.path().join("mdev_type").exists())
            .filter_map(|e| MdevUuid::parse(e.file_name().to_str()?))
            .collect();
        found.sort();
        found
    }

    /// The VFIO nodes a VMM opens for a mediated device: its group node,
    /// its cdev (with iommufd) and `/dev/iommu`, those that exist now.
    pub fn mdev_vfio_nodes(&self, uuid: &MdevUuid) -> Vec<PathBuf> {
        let Some(group) = self.mdev_iommu_group(uuid) else {
            return Vec::new();
        };
        super::vfio_access::nodes_of(self, &self.mdev_dir(uuid), group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_taken_in_the_hyphenated_form_only_and_kept_lower_case() {
        let u = MdevUuid::parse("A2E5C1C6-3F0B-4D7E-9A55-0123456789AB\n").unwrap();
        assert_eq!(u.as_str(), "a2e5c1c6-3f0b-4d7e-9a55-0123456789ab");
        for bad in [
            "",
            "a2e5c1c63f0b4d7e9a550123456789ab",
            "a2e5c1c6-3f0b-4d7e-9a55-0123456789a",
            "a2e5c1c6-3f0b-4d7e-9a55-0123456789ag",
            "../../../../etc/passwd-0000-0000-00",
            "{a2e5c1c6-3f0b-4d7e-9a55-0123456789ab}",
        ] {
            assert!(MdevUuid::parse(bad).is_none(), "{bad:?} accepted");
        }
        let r = MdevUuid::random();
        assert_eq!(MdevUuid::parse(r.as_str()), Some(r.clone()));
        assert_ne!(r, MdevUuid::random());
    }

    #[test]
    fn a_type_matches_its_id_or_its_name_in_any_case() {
        let t = MdevType {
            id: "nvidia-63".into(),
            name: Some("GRID P40-2Q".into()),
            description: None,
            device_api: Some("vfio-pci".into()),
            available_instances: 12,
        };
        assert!(t.matches("nvidia-63"));
        assert!(t.matches("NVIDIA-63"));
        assert!(t.matches("grid p40-2q"));
        assert!(!t.matches("nvidia-64"));
        assert!(!t.matches("P40-2Q"));
    }
}
