//! What each resource's endpoint advertises, rebuilt from vfiod's device
//! list: which devices carry the resource tag, whether kubelet may hand
//! each one out, and where it sits (NUMA node, IOMMU group).

use std::collections::BTreeMap;
use std::path::Path;

use crate::vfiod::Device;

/// Attachments this plugin makes carry this prefix; a device attached to
/// anything else belongs to someone outside kubelet.
pub const INSTANCE_PREFIX: &str = "kubelet:";

pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// The vfiod device name: stable across restarts of everything.
    pub id: String,
    pub pci_address: String,
    /// `None` when the device has no IOMMU group.
    pub iommu_group: Option<u32>,
    /// `None` when the platform reports none (`numa_node` is -1).
    pub numa_node: Option<i64>,
    pub healthy: bool,
    /// Why it is unhealthy, for the log.
    pub reason: Option<String>,
}

/// Resource name -> its devices, sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub resources: BTreeMap<String, Vec<Advertised>>,
}

impl Inventory {
    pub fn build(devices: &[Device], tag_key: &str, sysfs: &Path) -> Inventory {
        let mut resources: BTreeMap<String, Vec<Advertised>> = BTreeMap::new();
        for d in devices {
            let Some(resource) = d.tags.get(tag_key) else {
                continue;
            };
            if let Err(why) = check_resource_name(resource) {
                tracing::warn!(device = %d.name, resource = %resource, "not advertising {}: {why}", d.name);
                continue;
            }
            let reason = unhealthy_reason(d);
            resources
                .entry(resource.clone())
                .or_default()
                .push(Advertised {
                    id: d.name.clone(),
                    pci_address: d.pci_address.clone(),
                    iommu_group: u32::try_from(d.iommu_group).ok(),
                    numa_node: if d.present {
                        numa_node(sysfs, &d.pci_address)
                    } else {
                        None
                    },
                    healthy: reason.is_none(),
                    reason,
                });
        }
        for list in resources.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Inventory { resources }
    }

    pub fn devices(&self, resource: &str) -> &[Advertised] {
        self.resources.get(resource).map_or(&[], Vec::as_slice)
    }

    pub fn find(&self, resource: &str, id: &str) -> Option<&Advertised> {
        self.devices(resource).iter().find(|d| d.id == id)
    }
}

/// `None` when kubelet may hand the device out.
pub fn unhealthy_reason(d: &Device) -> Option<String> {
    if !d.present {
        return Some("not present on the bus".into());
    }
    if d.stuck {
        return Some("a driver move is stuck in the kernel".into());
    }
    if d.identity_mismatch {
        return Some("a different device sits at its address".into());
    }
    if let Some(h @ ("quarantined" | "needs_host_reboot")) = d.health.as_deref() {
        return Some(format!("health {h}"));
    }
    match d.attached_to.as_deref() {
        Some(other) if !other.starts_with(INSTANCE_PREFIX) => {
            Some(format!("attached to {other}, outside kubelet"))
        }
        _ => None,
    }
}

/// The device's NUMA node from `<sysfs>/bus/pci/devices/ADDR/numa_node`.
pub fn numa_node(sysfs: &Path, pci_address: &str) -> Option<i64> {
    let path = sysfs
        .join("bus/pci/devices")
        .join(pci_address)
        .join("numa_node");
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse::<i64>().ok().filter(|n| *n >= 0)
}

/// Kubelet accepts only extended resource names `DOMAIN/NAME` outside the
/// kubernetes.io domains; checking here gives a clear log line instead of
/// a refused registration.
pub fn check_resource_name(name: &str) -> Result<(), String> {
    let Some((domain, short)) = name.split_once('/') else {
        return Err("an extended resource name is DOMAIN/NAME, e.g. nvidia.com/L4".into());
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err(format!("{domain:?} is not a DNS subdomain"));
    }
    if domain == "kubernetes.io"
        || domain.ends_with(".kubernetes.io")
        || domain == "requests"
        || domain.starts_with("requests.")
    {
        return Err(format!("the {domain} domain is kubernetes' own"));
    }
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let bytes = short.as_bytes();
    if short.is_empty()
        || short.len() > 63
        || !alnum(bytes[0])
        || !alnum(bytes[bytes.len() - 1])
        || !bytes
            .iter()
            .all(|&b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "{short:?} must be 1-63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// The environment variable KubeVirt reads the PCI addresses from.
pub fn env_var_name(resource: &str) -> String {
    let tail: String = resource
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PCI_RESOURCE_{tail}")
}

/// The endpoint's socket file name in the device-plugins directory.
pub fn endpoint_socket_name(resource: &str) -> String {
    let tail: String = resource
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("vfiod-{tail}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, resource: Option<&str>) -> Device {
        Device {
            name: name.into(),
            pci_address: "0000:00:02.0".into(),
            iommu_group: 2,
            bound_to_vfio: false,
            attached_to: None,
            tags: resource
                .map(|r| [("resource".to_owned(), r.to_owned())].into())
                .unwrap_or_default(),
            present: true,
            stuck: false,
            identity_mismatch: false,
            health: None,
        }
    }

    #[test]
    fn env_var_name_is_what_kubevirt_reads() {
        assert_eq!(
            env_var_name("nvidia.com/GA102GL_A10"),
            "PCI_RESOURCE_NVIDIA_COM_GA102GL_A10"
        );
        assert_eq!(
            env_var_name("intel.com/e1000e-nic"),
            "PCI_RESOURCE_INTEL_COM_E1000E_NIC"
        );
    }

    #[test]
    fn resource_names_kubelet_would_refuse_are_refused() {
        assert!(check_resource_name("nvidia.com/L4").is_ok());
        assert!(check_resource_name("L4").is_err());
        assert!(check_resource_name("kubernetes.io/gpu").is_err());
        assert!(check_resource_name("Nvidia.com/L4").is_err());
        assert!(check_resource_name("nvidia.com/-L4").is_err());
        assert!(check_resource_name("nvidia.com/a/b").is_err());
    }

    #[test]
    fn health_follows_presence_stuck_health_and_foreign_attachment() {
        let ok = device("a", Some("x.io/a"));
        assert_eq!(unhealthy_reason(&ok), None);
        for (change, word) in [
            (
                Box::new(|d: &mut Device| d.present = false) as Box<dyn Fn(&mut Device)>,
                "present",
            ),
            (Box::new(|d: &mut Device| d.stuck = true), "stuck"),
            (
                Box::new(|d: &mut Device| d.identity_mismatch = true),
                "different",
            ),
            (
                Box::new(|d: &mut Device| d.health = Some("quarantined".into())),
                "quarantined",
            ),
            (
                Box::new(|d: &mut Device| d.health = Some("needs_host_reboot".into())),
                "reboot",
            ),
            (
                Box::new(|d: &mut Device| d.attached_to = Some("vm-1".into())),
                "vm-1",
            ),
        ] {
            let mut d = ok.clone();
            change(&mut d);
            let why = unhealthy_reason(&d).expect("unhealthy");
            assert!(why.contains(word), "{why}");
        }
        let mut ours = ok.clone();
        ours.attached_to = Some(format!("{INSTANCE_PREFIX}x.io/a:1:a"));
        ours.health = Some("needs_reset".into());
        assert_eq!(unhealthy_reason(&ours), None);
    }

    #[test]
    fn untagged_devices_and_bad_names_are_not_advertised() {
        let inv = Inventory::build(
            &[
                device("b", Some("x.io/a")),
                device("a", Some("x.io/a")),
                device("c", None),
                device("d", Some("nodomain")),
            ],
            "resource",
            Path::new("/nonexistent"),
        );
        assert_eq!(inv.resources.len(), 1);
        let ids: Vec<_> = inv
            .devices("x.io/a")
            .iter()
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(inv.devices("x.io/a")[0].numa_node, None);
    }
}
