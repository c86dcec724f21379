//! Claims: "a free device like this, for this instance", picked and handed
//! out as one operation.
//!
//! Concurrency model: picks are serialised by one lock (`claim_lock`), held
//! only while a device is chosen and its claim recorded; the hand-out (bind,
//! reset, grant: exactly an attach) then runs under the device's group lock
//! like any attach, so claims of different devices proceed in parallel. A
//! device with a claim recorded is no candidate for another, so two claims
//! never get the same device.
//!
//! Crash safety: the claim is on disk before any write. A restart finds
//! either the claim with its attachment (handed out; its grant is
//! re-applied, or it ends with its VMM) or a claim without one (the
//! hand-out never finished): that claim is dropped and the device is free.
//!
//! Order of preference among the candidates: the VM's NUMA node; the
//! least-loaded parent (the PF with the most free VFs); a device whose
//! last reset succeeded before one never reset; the address.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use super::operation::OpContext;
use super::{
    AttachRequest, Capacity, ClaimRequest, Claimed, Core, InstanceId, NumaPolicy, VgpuTypeCount,
};
use crate::error::CoreError;
use crate::pci::holders::Disposition;
use crate::pci::{is_vfio_driver, PciAddress, VgpuType};
use crate::registry::{AttachedProcess, DeviceRecord, Health, MediatedDevice, ResetResult};

/// What the pick (under the claim lock) leaves for the hand-out.
enum Picked {
    /// A whole device, its claim recorded.
    Device(Box<DeviceRecord>, tokio::sync::OwnedMutexGuard<()>),
    /// A mediated device made on its parent, for `uid` (and `process`).
    Mdev {
        mdev: Box<MediatedDevice>,
        uid: u32,
        process: Option<AttachedProcess>,
        guard: tokio::sync::OwnedMutexGuard<()>,
    },
}

/// Whether `d` carries every tag of `filter`.
pub(super) fn has_tags(d: &DeviceRecord, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| d.tags.get(k) == Some(v))
}

impl Core {
    /// Why nothing can be handed out of `d` now, neither whole nor as a
    /// mediated device (before NUMA and holders are looked at).
    pub(super) fn hand_out_blocker(&self, d: &DeviceRecord) -> Option<String> {
        if !d.present {
            return Some("not on the bus".into());
        }
        if d.identity_mismatch {
            return Some("a different device answers at its address".into());
        }
        match d.health.state {
            Health::Quarantined => return Some("quarantined".into()),
            Health::NeedsHostReboot => return Some("needs a host reboot".into()),
            Health::Ok | Health::NeedsReset => {}
        }
        if let Some(instance) = d.attached_to() {
            return Some(format!("attached to instance {instance:?}"));
        }
        if let Some(c) = &d.claim {
            return Some(format!(
                "claimed by instance {:?}, being handed out",
                c.instance_id
            ));
        }
        if d.stuck {
            return Some("a sysfs write is stuck in the kernel".into());
        }
        if d.pending.is_some() {
            return Some("an operation on it is unfinished".into());
        }
        None
    }

    /// Why `d` cannot be claimed whole, if it cannot.
    fn claim_blocker(&self, d: &DeviceRecord) -> Option<String> {
        if let Some(why) = self.hand_out_blocker(d) {
            return Some(why);
        }
        if d.vf.is_none()
            && (d.sriov.as_ref().is_some_and(|c| c.desired_vfs > 0)
                || !self.sysfs().virtfns(&d.pci_address).is_empty())
        {
            return Some("a PF with VFs: its VFs are the candidates".into());
        }
        if !d.mdevs.is_empty() || !self.sysfs().mdevs_of(&d.pci_address).is_empty() {
            return Some("an mdev parent with mediated devices: claim its mdev type".into());
        }
        None
    }

    /// Why the hand-out, an attach (which moves the device alone, never
    /// its group), could not make `d` usable: another function of its
    /// IOMMU group on a driver that is not vfio (a GPU whose audio function
    /// is on snd_hda_intel). Picking it would be refused with
    /// `iommu_group_conflict` while another device may fit.
    fn group_held_by_other_drivers(&self, d: &DeviceRecord) -> Option<String> {
        let sysfs = self.sysfs();
        let group = sysfs.iommu_group(&d.pci_address)?;
        let others: Vec<String> = sysfs
            .group_members(group)
            .into_iter()
            .filter(|m| *m != d.pci_address)
            .filter_map(|m| {
                let f = sysfs.read_function(&m).ok()??;
                let bridge = f.is_bridge();
                let driver = f.driver.filter(|drv| !bridge && !is_vfio_driver(drv))?;
                Some(format!("{m} on {driver}"))
            })
            .collect();
        (!others.is_empty()).then(|| {
            format!(
                "IOMMU group {group} has functions on other drivers ({}): bind it with_group first",
                others.join(", ")
            )
        })
    }

    /// Why `d` is out of a claim that requires its NUMA node, if it is.
    pub(super) fn numa_refusal(&self, d: &DeviceRecord, req: &ClaimRequest) -> Option<String> {
        if req.numa != NumaPolicy::Required || req.numa_node.is_none() {
            return None;
        }
        let node = self.sysfs().numa_node(&d.pci_address);
        if node == req.numa_node {
            return None;
        }
        Some(node.map_or("no known NUMA node".to_owned(), |n| {
            format!("on NUMA node {n}")
        }))
    }

    /// Chooses the device for `req` (see the module docs for the order);
    /// `NoCapacity` with one reason per candidate considered otherwise.
    async fn pick(&self, req: &ClaimRequest) -> Result<DeviceRecord, CoreError> {
        let registry = self.snapshot();
        let mut refused: Vec<(PciAddress, String)> = Vec::new();
        let mut eligible: Vec<&DeviceRecord> = Vec::new();
        for d in registry.iter().filter(|d| has_tags(d, &req.tags)) {
            if let Some(why) = self.claim_blocker(d) {
                refused.push((d.pci_address, why));
                continue;
            }
            if let Some(why) = self.numa_refusal(d, req) {
                refused.push((d.pci_address, why));
                continue;
            }
            if let Some(t) = &req.vgpu_type {
                if let Err(why) = self.vgpu_type_creatable(d, t) {
                    refused.push((d.pci_address, why));
                    continue;
                }
            }
            if let Some(why) = self.group_held_by_other_drivers(d) {
                refused.push((d.pci_address, why));
                continue;
            }
            eligible.push(d);
        }
        let mut free_vfs: HashMap<PciAddress, usize> = HashMap::new();
        for d in &eligible {
            if let Some(vf) = &d.vf {
                *free_vfs.entry(vf.parent_address).or_default() += 1;
            }
        }
        eligible.sort_by_key(|d| {
            let off_node = req
                .numa_node
                .is_some_and(|n| self.sysfs().numa_node(&d.pci_address) != Some(n));
            let parent_free =
                d.vf.as_ref()
                    .map_or(0, |v| free_vfs.get(&v.parent_address).copied().unwrap_or(0));
            let clean = d
                .health
                .last_reset
                .as_ref()
                .is_some_and(|r| r.result == ResetResult::Ok);
            (off_node, Reverse(parent_free), !clean, d.pci_address)
        });
        for d in eligible {
            let holders = self.scan_holders(vec![d.pci_address]).await?;
            let held: Vec<String> = holders
                .iter()
                .filter(|h| h.disposition() != Disposition::PlanStep)
                .map(|h| h.to_string())
                .collect();
            if held.is_empty() {
                return Ok(d.clone());
            }
            refused.push((d.pci_address, format!("held: {}", held.join("; "))));
        }
        refused.sort();
        Err(CoreError::NoCapacity { refused })
    }

    /// The claim operation: the same instance's claim again (not new), or
    /// a new device picked, its claim recorded, and handed out as an attach
    /// (or, with `mdev_type`, a mediated device made on a parent picked
    /// and handed out: `mdev`).
    pub(super) async fn claim(
        &self,
        ctx: &OpContext<'_>,
        req: ClaimRequest,
    ) -> Result<Claimed, CoreError> {
        let caller = ctx.caller;
        let picked = {
            let _one_picker = self.claim_lock.lock().await;
            if let Some(claimed) = self.existing_claim(&req)? {
                return Ok(claimed);
            }
            if let Some(asked) = &req.mdev_type {
                // Who it is for is checked before anything is written.
                let uid = Self::attachment_uid(caller, req.uid)?;
                let process = req.pid.map(|pid| self.vmm_process(pid, uid)).transpose()?;
                let (mdev, guard) = self.make_mdev(ctx, &req, asked).await?;
                Picked::Mdev {
                    mdev: Box::new(mdev),
                    uid,
                    process,
                    guard,
                }
            } else {
                let picked = self.pick(&req).await?;
                // The claim, on disk before anything is written to the device.
                let claim = req.clone();
                let addr = picked.pci_address;
                let picked = self
                    .update_device(addr, |d| d.claim = Some(claim))
                    .await?
                    .ok_or_else(|| CoreError::Internal("the picked device went away".into()))?;
                let guard = self.op_lock(Self::lock_key(&picked)).lock_owned().await;
                // A vGPU type is set before the next pick: setting it can take
                // types away from the VF's siblings.
                if let Some(asked) = &req.vgpu_type {
                    if let Err(e) = self.set_vgpu_type(&picked, asked).await {
                        self.drop_claim(addr).await;
                        return Err(e);
                    }
                }
                Picked::Device(Box::new(picked), guard)
            }
        };
        let (picked, guard) = match picked {
            Picked::Device(picked, guard) => (*picked, guard),
            Picked::Mdev {
                mdev,
                uid,
                process,
                guard,
            } => {
                let parent = self
                    .snapshot()
                    .iter()
                    .find(|d| d.mdevs.iter().any(|m| m.uuid == mdev.uuid))
                    .map(|d| d.pci_address)
                    .ok_or_else(|| CoreError::Internal("the mdev parent went away".into()))?;
                let handed = self.hand_out_mdev(ctx, parent, *mdev, uid, process).await;
                drop(guard);
                let (device, mdev) = handed?;
                return Ok(Claimed {
                    device,
                    created: true,
                    mdev: Some(mdev),
                });
            }
        };
        let addr = picked.pci_address;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %req.instance_id, "claim of instance {} picked {} ({addr}) for {caller}", req.instance_id, picked.name);
        let record = self
            .snapshot()
            .get_by_address(&addr)
            .cloned()
            .ok_or_else(|| CoreError::Internal("the claimed device went away".into()))?;
        let attach = AttachRequest {
            instance: InstanceId(req.instance_id.clone()),
            uid: req.uid,
            pid: req.pid,
        };
        let handed = self.attach_device(ctx, &record, attach).await;
        if handed.is_err() && req.vgpu_type.is_some() {
            self.clear_vgpu_type(addr).await;
        }
        drop(guard);
        match handed {
            Ok(device) => Ok(Claimed {
                device,
                created: true,
                mdev: None,
            }),
            Err(e) => {
                // Not handed out: the device is free again.
                self.drop_claim(addr).await;
                Err(e)
            }
        }
    }

    /// The instance's claim, if it has one (claim lock held): the same
    /// request again answers it, another request is a conflict.
    fn existing_claim(&self, req: &ClaimRequest) -> Result<Option<Claimed>, CoreError> {
        let registry = self.snapshot();
        let conflict = |device: String| CoreError::ClaimConflict {
            instance: req.instance_id.clone(),
            device,
        };
        for d in registry.iter() {
            if let Some(asked) = d
                .claim
                .as_ref()
                .filter(|c| c.instance_id == req.instance_id)
            {
                if asked != req {
                    return Err(conflict(d.name.clone()));
                }
                return Ok(Some(Claimed {
                    device: d.clone(),
                    created: false,
                    mdev: None,
                }));
            }
            if let Some(m) = d
                .mdevs
                .iter()
                .find(|m| m.claim.instance_id == req.instance_id)
            {
                if m.claim != *req {
                    return Err(conflict(format!(
                        "mediated device {} on {}",
                        m.uuid, d.name
                    )));
                }
                return Ok(Some(Claimed {
                    device: d.clone(),
                    created: false,
                    mdev: Some(m.clone()),
                }));
            }
        }
        Ok(None)
    }

    async fn drop_claim(&self, addr: PciAddress) {
        if let Err(e) = self.update_device(addr, |d| d.claim = None).await {
            tracing::error!(device = %addr, error = %e, "could not drop a claim that failed");
        }
    }

    /// The vGPU types `addr` can take now (none if it is no vGPU VF).
    pub(super) fn creatable_vgpu_types(&self, addr: &PciAddress) -> Vec<VgpuType> {
        self.sysfs().creatable_vgpu_types(addr).unwrap_or_default()
    }

    /// Whether `d` can take vGPU type `asked` now; why not otherwise.
    fn vgpu_type_creatable(&self, d: &DeviceRecord, asked: &str) -> Result<(), String> {
        match self.sysfs().creatable_vgpu_types(&d.pci_address) {
            None => Err("not a vGPU-capable VF".into()),
            Some(types) if types.iter().any(|t| t.matches(asked)) => Ok(()),
            Some(_) => Err(format!("vGPU type {asked} is not creatable on it now")),
        }
    }

    /// Sets `asked` as the VF's vGPU type, clearing another one first, each
    /// write read back.
    async fn set_vgpu_type(&self, record: &DeviceRecord, asked: &str) -> Result<(), CoreError> {
        let addr = record.pci_address;
        let unavailable = |detail: String| CoreError::VgpuTypeUnavailable {
            device: record.name.clone(),
            vgpu_type: asked.to_owned(),
            detail,
        };
        let Some(wanted) = self
            .creatable_vgpu_types(&addr)
            .into_iter()
            .find(|t| t.matches(asked))
        else {
            return Err(unavailable(
                "it is no longer in creatable_vgpu_types".into(),
            ));
        };
        let current = self.sysfs().current_vgpu_type(&addr).unwrap_or(0);
        if current == wanted.id {
            return Ok(());
        }
        for id in [0, wanted.id] {
            if id == 0 && current == 0 {
                continue;
            }
            if let Err(e) = self.engine.set_vgpu_type(addr, id).await {
                return Err(unavailable(format!(
                    "writing {id} to current_vgpu_type failed: {e}"
                )));
            }
            let now = self.sysfs().current_vgpu_type(&addr);
            if now != Some(id) {
                return Err(unavailable(format!(
                    "current_vgpu_type reads {now:?} after writing {id}"
                )));
            }
        }
        tracing::info!(device = %addr, vgpu_type = %wanted.name, id = wanted.id, "set vGPU type {} on {addr}", wanted.name);
        Ok(())
    }

    /// Clears a VF's vGPU type (release, a failed claim, a claim dropped at
    /// startup); a failure is logged.
    pub(super) async fn clear_vgpu_type(&self, addr: PciAddress) {
        if self.sysfs().current_vgpu_type(&addr).unwrap_or(0) == 0 {
            return;
        }
        match self.engine.set_vgpu_type(addr, 0).await {
            Ok(()) => tracing::info!(device = %addr, "cleared the vGPU type"),
            Err(e) => {
                tracing::error!(device = %addr, error = %e, "could not clear the vGPU type")
            }
        }
    }

    /// At startup: a claim whose hand-out never finished (no attachment)
    /// is dropped, and its device is free.
    pub(super) async fn drop_unfinished_claims(&self) {
        let result = self
            .commit_if_changed(|reg| {
                let stale: Vec<PciAddress> = reg
                    .iter()
                    .filter(|d| d.claim.is_some() && d.attachment.is_none())
                    .map(|d| d.pci_address)
                    .collect();
                for a in &stale {
                    if let Some(d) = reg.get_mut_by_address(a) {
                        d.claim = None;
                    }
                }
                let any = !stale.is_empty();
                Ok((stale, any))
            })
            .await;
        match result {
            Ok(stale) => {
                for a in stale {
                    tracing::warn!(device = %a, "a claim whose hand-out did not finish before vfiod stopped is dropped; the device is free");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not drop unfinished claims"),
        }
        // A free VF keeps no vGPU type: one set for a claim that did not
        // finish, or whose release was cut short. Only VFs can carry one, so
        // a start with thousands of whole devices reads no attribute here.
        let free: Vec<PciAddress> = self
            .snapshot()
            .iter()
            .filter(|d| d.present && d.vf.is_some() && d.claim.is_none() && d.attachment.is_none())
            .map(|d| d.pci_address)
            .collect();
        for addr in free {
            self.clear_vgpu_type(addr).await;
        }
    }

    /// `GET /devices/{pf}/vgpu_types`: each type the PF's free VFs can take
    /// now, with how many can.
    pub fn vgpu_types(&self, id_or_name: &str) -> Result<Vec<VgpuTypeCount>, CoreError> {
        let pf = self.resolve(id_or_name)?;
        let registry = self.snapshot();
        let mut counts: BTreeMap<u32, VgpuTypeCount> = BTreeMap::new();
        let vfs = registry.iter().filter(|d| {
            d.vf.as_ref()
                .is_some_and(|v| v.parent_address == pf.pci_address)
        });
        for vf in vfs {
            let free = self.claim_blocker(vf).is_none();
            for t in self.creatable_vgpu_types(&vf.pci_address) {
                let entry = counts.entry(t.id).or_insert_with(|| VgpuTypeCount {
                    id: t.id,
                    name: t.name.clone(),
                    available: 0,
                });
                entry.available += u32::from(free);
            }
        }
        Ok(counts.into_values().collect())
    }

    /// `GET /devices/capacity`: counts per `resource` tag among the devices
    /// carrying every tag of `filter`.
    pub fn capacity(&self, filter: &BTreeMap<String, String>) -> Vec<Capacity> {
        let registry = self.snapshot();
        let mut pools: BTreeMap<Option<String>, Capacity> = BTreeMap::new();
        for d in registry.iter().filter(|d| has_tags(d, filter)) {
            let is_pf_with_vfs = d.vf.is_none()
                && (d.sriov.as_ref().is_some_and(|c| c.desired_vfs > 0)
                    || !self.sysfs().virtfns(&d.pci_address).is_empty());
            if is_pf_with_vfs {
                continue;
            }
            let resource = d.tags.get("resource").cloned();
            let pool = pools.entry(resource.clone()).or_insert_with(|| Capacity {
                resource,
                ..Capacity::default()
            });
            pool.total += 1;
            match d.health.state {
                Health::Quarantined | Health::NeedsHostReboot => {
                    pool.quarantined += 1;
                    continue;
                }
                Health::Ok | Health::NeedsReset => {}
            }
            pool.mdevs += d.mdevs.len() as u32;
            if d.attachment.is_some() || d.claim.is_some() {
                pool.attached += 1;
                continue;
            }
            if self.claim_blocker(d).is_none() {
                pool.free += 1;
                if d.health.state == Health::NeedsReset {
                    pool.needs_reset += 1;
                }
                for t in self.creatable_vgpu_types(&d.pci_address) {
                    *pool.vgpu_types.entry(t.name).or_default() += 1;
                }
            }
            // A parent's mediated devices are counted by type: how many
            // more the kernel would make now.
            for t in self.sysfs().mdev_types(&d.pci_address) {
                if t.available_instances > 0 && d.pending.is_none() && !d.stuck {
                    *pool.mdev_types.entry(t.id).or_default() += t.available_instances;
                }
            }
        }
        pools.into_values().collect()
    }
}
