//! Allocate: move each requested device to vfio through vfiod, attach it
//! to an instance id naming the allocation, and tell kubelet which device
//! nodes and which environment the container gets.
//!
//! Kubelet never says when an allocation ends; it only ever allocates a
//! device no running pod holds. So a device still attached to an earlier
//! allocation of this plugin (its instance id starts with
//! [`INSTANCE_PREFIX`]) is detached, kept on vfio, and attached anew (the
//! releaser, [`crate::release`], usually has detached it already, once
//! kubelet's PodResources API stopped listing it). A device attached to
//! anything else is reported Unhealthy and refused.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tonic::Status;

use crate::api::{ContainerAllocateResponse, DeviceSpec};
use crate::inventory::{env_var_name, Inventory, INSTANCE_PREFIX};
use crate::vfiod::{Device, VfiodClient, VfiodError};

/// vfiod's limit on an instance id.
const INSTANCE_ID_MAX: usize = 256;

pub struct Allocator<'a> {
    pub vfiod: &'a VfiodClient,
    pub resource: &'a str,
    pub with_group: bool,
    pub sysfs: &'a Path,
    pub devfs: &'a Path,
}

/// `kubelet:<resource>:<unix ms>:<device ids>`, cut to vfiod's limit:
/// the ids first, so that [`parse_instance`] still reads the rest back.
pub fn instance_id(resource: &str, ids: &[String]) -> String {
    let mut id = format!("{INSTANCE_PREFIX}{resource}:{}:", unix_ms());
    id.push_str(&ids.join(","));
    // Every part is ASCII (vfiod names and tag values are).
    id.truncate(INSTANCE_ID_MAX);
    id
}

/// The resource and allocation time of an [`instance_id`], or `None` for
/// an attachment this plugin did not make.
pub fn parse_instance(instance: &str) -> Option<(&str, u128)> {
    let rest = instance.strip_prefix(INSTANCE_PREFIX)?;
    let mut parts = rest.splitn(3, ':');
    let resource = parts.next().filter(|r| !r.is_empty())?;
    let ms = parts.next()?.parse().ok()?;
    Some((resource, ms))
}

pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl Allocator<'_> {
    pub async fn allocate_container(
        &self,
        inventory: &Inventory,
        ids: &[String],
    ) -> Result<ContainerAllocateResponse, Status> {
        if ids.is_empty() {
            return Err(Status::invalid_argument("no devices requested"));
        }
        for id in ids {
            if inventory.find(self.resource, id).is_none() {
                return Err(Status::invalid_argument(format!(
                    "{id} is not a {} device of this node",
                    self.resource
                )));
            }
        }
        let instance = instance_id(self.resource, ids);
        let started = Instant::now();
        let mut attached: Vec<Device> = Vec::new();
        for id in ids {
            match self.move_and_attach(id, &instance).await {
                Ok(d) => attached.push(d),
                Err(e) => {
                    // Leave no device attached to an allocation that failed;
                    // they stay on vfio, ready for the retry.
                    for d in &attached {
                        if let Err(undo) = self.vfiod.detach_keep_bound(&d.name).await {
                            tracing::warn!(device = %d.name, "detaching after a failed allocation: {undo}");
                        }
                    }
                    tracing::warn!(device = %id, instance = %instance, "allocation failed: {e}");
                    return Err(status_of(id, e));
                }
            }
        }
        let response = self.response(&attached).await?;
        tracing::info!(
            instance = %instance,
            devices = ?ids,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "allocated {} for {}",
            ids.join(","),
            self.resource
        );
        Ok(response)
    }

    async fn move_and_attach(&self, id: &str, instance: &str) -> Result<Device, VfiodError> {
        let current = self.vfiod.device(id).await?;
        if let Some(previous) = current.attached_to.as_deref() {
            if previous != instance && previous.starts_with(INSTANCE_PREFIX) {
                tracing::info!(device = %id, previous = %previous, "kubelet reallocates {id}; ending its earlier allocation");
                self.vfiod.detach_keep_bound(id).await?;
            }
        }
        self.vfiod.bind(id, self.with_group).await?;
        self.vfiod.attach(id, instance).await
    }

    async fn response(&self, devices: &[Device]) -> Result<ContainerAllocateResponse, Status> {
        let mut groups = BTreeSet::new();
        for d in devices {
            let g = u32::try_from(d.iommu_group).map_err(|_| {
                Status::failed_precondition(format!(
                    "{} ({}) has no IOMMU group after the move to vfio",
                    d.name, d.pci_address
                ))
            })?;
            groups.insert(g);
        }
        let mut specs = vec![self.spec("vfio/vfio")];
        specs.extend(groups.iter().map(|g| self.spec(&format!("vfio/{g}"))));
        // iommufd: the shared /dev/iommu and each device's own cdev, where
        // the kernel has them.
        if tokio::fs::try_exists(self.devfs.join("iommu"))
            .await
            .unwrap_or(false)
        {
            specs.push(self.spec("iommu"));
        }
        for d in devices {
            for cdev in self.vfio_cdevs(&d.pci_address).await {
                let rel = format!("vfio/devices/{cdev}");
                if tokio::fs::try_exists(self.devfs.join(&rel))
                    .await
                    .unwrap_or(false)
                {
                    specs.push(self.spec(&rel));
                }
            }
        }
        let addresses: Vec<&str> = devices.iter().map(|d| d.pci_address.as_str()).collect();
        Ok(ContainerAllocateResponse {
            envs: [(env_var_name(self.resource), addresses.join(","))].into(),
            devices: specs,
            ..Default::default()
        })
    }

    /// Host path under the configured devfs root; the container sees the
    /// standard /dev path.
    fn spec(&self, rel: &str) -> DeviceSpec {
        DeviceSpec {
            container_path: format!("/dev/{rel}"),
            host_path: self.devfs.join(rel).display().to_string(),
            permissions: "mrw".into(),
        }
    }

    /// The `vfioN` names under `<sysfs>/bus/pci/devices/ADDR/vfio-dev/`.
    async fn vfio_cdevs(&self, pci_address: &str) -> Vec<String> {
        let dir = self
            .sysfs
            .join("bus/pci/devices")
            .join(pci_address)
            .join("vfio-dev");
        let mut out = Vec::new();
        if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(e)) = entries.next_entry().await {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("vfio") {
                    out.push(name);
                }
            }
        }
        out.sort();
        out
    }
}

/// vfiod's own message goes to kubelet, which puts it in the pod's events.
fn status_of(id: &str, e: VfiodError) -> Status {
    let message = format!("vfiod could not give {id} to the container: {e}");
    match e {
        VfiodError::Api { status: 404, .. } => Status::not_found(message),
        VfiodError::Api { .. } => Status::failed_precondition(message),
        VfiodError::Unreachable { .. } | VfiodError::Timeout { .. } => Status::unavailable(message),
        VfiodError::Protocol { .. } => Status::internal(message),
    }
}
