//! Releasing the devices of pods that are gone.
//!
//! The Device Plugin API tells a plugin when kubelet allocates devices but
//! never when the pod holding them ends. Left alone, a device would stay
//! attached to its `kubelet:` instance (and unreset, with the last tenant's
//! state on it) until kubelet happened to allocate it again. So the
//! plugin asks kubelet's PodResources API, every `interval`, which device
//! ids of each resource the pods it still runs hold, and detaches (keeping
//! it on vfio) every device of a `kubelet:` allocation that no pod holds
//! any more. vfiod then resets it on release (`reset_on_release`), before
//! any next tenant gets it.
//!
//! Safety rules, because a wrong release would take a device from under a
//! running VM's bookkeeping:
//! - nothing is released unless `List` answered: an unreachable or failing
//!   PodResources socket (an older kubelet, the API turned off) releases
//!   nothing;
//! - an allocation younger than `grace` is left alone: kubelet records the
//!   devices of a container only after Allocate has returned, so a fresh
//!   allocation can be missing from `List` for a moment;
//! - only attachments this plugin made (their instance id starts with
//!   [`INSTANCE_PREFIX`](crate::inventory::INSTANCE_PREFIX) and names the resource) are ever touched, and only
//!   when the device is still tagged with that resource.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::allocate::{parse_instance, unix_ms};
use crate::plugin::{dial, AttachmentLock};
use crate::podresources::pod_resources_lister_client::PodResourcesListerClient;
use crate::podresources::ListPodResourcesRequest;
use crate::vfiod::{Device, VfiodClient};

/// How long one `List` call may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Releaser {
    pub vfiod: VfiodClient,
    /// Kubelet's PodResources socket.
    pub pod_resources: PathBuf,
    pub tag_key: String,
    pub interval: Duration,
    pub grace: Duration,
    /// Held from the last look at a device to its detach.
    pub attachments: AttachmentLock,
}

/// (resource name, device id) pairs that kubelet's pods hold.
pub type Held = BTreeSet<(String, String)>;

impl Releaser {
    pub async fn run(self, cancel: CancellationToken) {
        let mut unreachable_said = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let held = match self.held_by_pods().await {
                Ok(held) => {
                    if unreachable_said {
                        tracing::info!(socket = %self.pod_resources.display(), "kubelet's PodResources API answers again");
                        unreachable_said = false;
                    }
                    held
                }
                Err(e) => {
                    if !unreachable_said {
                        tracing::warn!(socket = %self.pod_resources.display(), "cannot tell which pods hold devices, so none is released: {e}");
                        unreachable_said = true;
                    }
                    continue;
                }
            };
            let devices = match self.vfiod.devices().await {
                Ok((devices, _)) => devices,
                Err(e) => {
                    tracing::debug!("listing vfiod's devices: {e}");
                    continue;
                }
            };
            for d in devices {
                if self.releasable(&d, &held, unix_ms()) {
                    self.release(&d.name, &held).await;
                }
            }
        }
    }

    /// Whether `d` is attached to an allocation of this plugin, older than
    /// the grace time, whose device no pod holds.
    pub fn releasable(&self, d: &Device, held: &Held, now_ms: u128) -> bool {
        let Some(instance) = d.attached_to.as_deref() else {
            return false;
        };
        let Some((resource, allocated_ms)) = parse_instance(instance) else {
            return false;
        };
        if d.tags.get(&self.tag_key).map(String::as_str) != Some(resource) {
            return false;
        }
        if now_ms.saturating_sub(allocated_ms) < self.grace.as_millis() {
            return false;
        }
        !held.contains(&(resource.to_owned(), d.name.clone()))
    }

    /// Detaches `name` if it is still releasable once no allocation can
    /// run: an Allocate may have given it to a new pod since the list.
    async fn release(&self, name: &str, held: &Held) {
        let _one_at_a_time = self.attachments.lock().await;
        let d = match self.vfiod.device(name).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(device = %name, "reading {name} before releasing it: {e}");
                return;
            }
        };
        if !self.releasable(&d, held, unix_ms()) {
            return;
        }
        let instance = d.attached_to.as_deref().unwrap_or_default();
        match self.vfiod.detach_keep_bound(name).await {
            Ok(_) => {
                tracing::info!(device = %name, instance = %instance, "released {name}: no pod holds it any more")
            }
            Err(e) => tracing::warn!(device = %name, instance = %instance, "releasing {name}: {e}"),
        }
    }

    async fn held_by_pods(&self) -> Result<Held, String> {
        let call = async {
            let channel = dial(&self.pod_resources)
                .await
                .map_err(|e| format!("dialing: {e}"))?;
            let answer = PodResourcesListerClient::new(channel)
                .list(ListPodResourcesRequest {})
                .await
                .map_err(|s| format!("List: {}", s.message()))?
                .into_inner();
            let mut held = Held::new();
            for pod in answer.pod_resources {
                for container in pod.containers {
                    for devices in container.devices {
                        for id in devices.device_ids {
                            held.insert((devices.resource_name.clone(), id));
                        }
                    }
                }
            }
            Ok(held)
        };
        tokio::time::timeout(LIST_TIMEOUT, call)
            .await
            .map_err(|_| format!("List did not answer within {LIST_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocate::instance_id;

    fn releaser() -> Releaser {
        Releaser {
            vfiod: VfiodClient::new(std::path::Path::new("/nonexistent")),
            pod_resources: PathBuf::from("/nonexistent"),
            tag_key: "resource".into(),
            interval: Duration::from_secs(10),
            grace: Duration::from_secs(60),
            attachments: AttachmentLock::default(),
        }
    }

    fn device(name: &str, resource: &str, attached_to: Option<String>) -> Device {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "pci_address": "0000:01:00.0",
            "iommu_group": 1,
            "attached_to": attached_to,
            "tags": {"resource": resource},
        }))
        .unwrap()
    }

    #[test]
    fn the_instance_ids_allocate_makes_parse_back() {
        let id = instance_id("nvidia.com/L4", &["l4-0".into(), "l4-1".into()]);
        let (resource, ms) = parse_instance(&id).unwrap();
        assert_eq!(resource, "nvidia.com/L4");
        assert!(unix_ms() - ms < 10_000);
        // Many devices: the ids are cut, the resource and time are kept.
        let many: Vec<String> = (0..100).map(|i| format!("gpu-{i:03}")).collect();
        let id = instance_id("nvidia.com/L4", &many);
        assert_eq!(id.len(), 256);
        assert_eq!(parse_instance(&id).map(|(r, _)| r), Some("nvidia.com/L4"));
        assert_eq!(parse_instance("vm-1"), None);
        assert_eq!(parse_instance("kubelet:x.io/a:notms:a"), None);
    }

    #[test]
    fn only_old_allocations_of_this_plugin_that_no_pod_holds_are_released() {
        let r = releaser();
        let now = unix_ms();
        let old = |res: &str| Some(format!("kubelet:{res}:{}:gpu0", now - 120_000));
        let held: Held = [("x.io/gpu".to_owned(), "gpu1".to_owned())].into();
        assert!(r.releasable(&device("gpu0", "x.io/gpu", old("x.io/gpu")), &held, now));
        // A pod still holds it.
        assert!(!r.releasable(&device("gpu1", "x.io/gpu", old("x.io/gpu")), &held, now));
        // Allocated a moment ago: kubelet may not list it yet.
        let fresh = Some(format!("kubelet:x.io/gpu:{}:gpu0", now - 1_000));
        assert!(!r.releasable(&device("gpu0", "x.io/gpu", fresh), &held, now));
        // Not this plugin's attachment, or not attached at all.
        assert!(!r.releasable(&device("gpu0", "x.io/gpu", Some("vm-1".into())), &held, now));
        assert!(!r.releasable(&device("gpu0", "x.io/gpu", None), &held, now));
        // Tagged with another resource since: not ours to judge.
        assert!(!r.releasable(&device("gpu0", "x.io/other", old("x.io/gpu")), &held, now));
    }
}
