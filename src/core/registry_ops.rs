//! Registry edits: register, rename/retag, unregister.

use std::collections::BTreeMap;

use super::operation::{ensure_not_attached, OpContext};
use super::release::Release;
use super::{Core, RegisterRequest, SriovRequest, UpdateRequest};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::pci::PciAddress;
use crate::registry::{DeviceRecord, Registry, RegistryConflict};

fn conflict(e: RegistryConflict) -> CoreError {
    CoreError::Conflict(e.to_string())
}

impl Core {
    pub(super) async fn register_device(
        &self,
        ctx: &OpContext<'_>,
        req: RegisterRequest,
    ) -> Result<DeviceRecord, CoreError> {
        let caller = ctx.caller;
        let addr = req.pci_address;
        let function = self
            .sysfs()
            .read_function(&addr)
            .map_err(|e| CoreError::Internal(e.to_string()))?
            .ok_or(CoreError::PciDeviceNotFound(addr))?;
        if function.is_bridge() {
            return Err(CoreError::Bridge(addr, function.class));
        }
        let name = req.name.map(|n| n.0).unwrap_or_else(|| addr.default_name());
        let mut record =
            DeviceRecord::registered(cuid2::create_id(), name, &function, req.tags.into_inner());
        record.note_vfio_provider(self.sysfs().own_vfio_provider(&addr));
        let stored = record.clone();
        self.commit(move |reg| reg.insert(stored).map_err(conflict))
            .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, id = %record.id, name = %record.name, "registered {addr} as {} (id {}) for {caller}", record.name, record.id);
        ctx.publish(ctx.event(EventKind::Registered, &record));
        Ok(record)
    }

    pub(super) async fn update_device_record(
        &self,
        ctx: &OpContext<'_>,
        id_or_name: &str,
        req: UpdateRequest,
    ) -> Result<DeviceRecord, CoreError> {
        let caller = ctx.caller;
        let addr = self.resolve(id_or_name)?.pci_address;
        let (updated, retagged_vfs) = self
            .commit(|reg| {
                let new_tags = req.tags.map(|t| t.into_inner());
                if let Some(tags) = &new_tags {
                    ensure_vf_keeps_pf_tags(reg, &addr, tags)?;
                }
                if let Some(name) = &req.name {
                    reg.rename(&addr, name.as_str()).map_err(conflict)?;
                }
                let d = reg
                    .get_mut_by_address(&addr)
                    .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
                if let Some(tags) = &new_tags {
                    d.tags = tags.clone();
                }
                if let Some(methods) = req.reset_method {
                    d.reset_method =
                        methods.map(|list| list.iter().map(|m| m.as_str().to_owned()).collect());
                }
                let updated = d.clone();
                // A PF's tags are its VFs' pool: new ones reach every VF in
                // this same commit, or claims and capacity would keep
                // handing VFs out of the old pool.
                let retagged_vfs = match new_tags {
                    Some(tags) => retag_vfs_of(reg, &addr, &tags),
                    None => Vec::new(),
                };
                Ok((updated, retagged_vfs))
            })
            .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, name = %updated.name, "updated {addr} ({}) for {caller}", updated.name);
        ctx.publish(ctx.event(EventKind::Updated, &updated));
        for vf in &retagged_vfs {
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %vf.pci_address, pf = %addr, "VF {} of {} takes its PF's new tags", vf.name, updated.name);
            ctx.publish(
                ctx.event(EventKind::Updated, vf)
                    .detail(format!("tags of its PF {}", updated.name)),
            );
        }
        Ok(updated)
    }

    /// Unregisters a device, first giving back a driver vfiod took (the
    /// release sequence). If that fails the device stays registered.
    pub(super) async fn delete_device(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
    ) -> Result<(), CoreError> {
        let caller = ctx.caller;
        ensure_not_attached(record)?;
        if record.sriov.is_some() && self.sysfs().is_present(&record.pci_address) {
            // The VFs vfiod made go with the PF's registration, and the
            // PF's autoprobe is put back.
            let lowered = SriovRequest {
                num_vfs: 0,
                vf_driver: None,
            };
            self.converge_vfs(ctx, record, Some(lowered)).await?;
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %record.pci_address, "lowered the VF count of {} to 0 before unregistering it", record.name);
        }
        let record = self
            .release(ctx, record, Release::give_back("delete"))
            .await?;
        if record.bound_by_vfiod() && !record.present && !record.companions().is_empty() {
            // Off the bus itself, its group's other functions vfiod moved
            // with it are not: they go back to their drivers now, or the
            // record that holds them stays. Forgotten, they would stay on
            // vfio with vfiod's override for good.
            let sysfs = self.sysfs();
            let moves: Vec<_> = super::moves::restore_moves(&record)
                .into_iter()
                .skip(1)
                .filter(|m| sysfs.is_present(&m.pci_address))
                .collect();
            if !moves.is_empty() {
                self.require_privileged()?;
                self.engine
                    .restore(&moves)
                    .await
                    .map_err(|e| CoreError::move_failed("delete", record.pci_address, e, None))?;
            }
        }
        let addr = record.pci_address;
        self.commit(|reg| {
            reg.remove(&addr);
            Ok(())
        })
        .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, id = %record.id, "unregistered {addr} ({}) for {caller}", record.name);
        ctx.publish(ctx.event(EventKind::Unregistered, &record));
        Ok(())
    }
}

/// Refuses tags for a VF record other than its PF's. Its current tags are
/// let through too: a client that reads a device, changes its name and
/// sends the whole of it back is not refused (a VF registered by hand
/// before vfiod managed its PF may still carry tags of its own).
fn ensure_vf_keeps_pf_tags(
    reg: &Registry,
    addr: &PciAddress,
    tags: &BTreeMap<String, String>,
) -> Result<(), CoreError> {
    let Some(d) = reg.get_by_address(addr) else {
        return Ok(());
    };
    let Some(pf) =
        d.vf.as_ref()
            .and_then(|v| reg.get_by_address(&v.parent_address))
    else {
        return Ok(());
    };
    if tags == &d.tags || tags == &pf.tags {
        return Ok(());
    }
    Err(CoreError::VfTagsFollowPf {
        vf: d.name.clone(),
        pf: pf.name.clone(),
    })
}

/// Gives every VF record of the PF at `pf` the PF's `tags`; the records
/// that changed, as they are now.
fn retag_vfs_of(
    reg: &mut Registry,
    pf: &PciAddress,
    tags: &BTreeMap<String, String>,
) -> Vec<DeviceRecord> {
    let vfs: Vec<PciAddress> = reg
        .iter()
        .filter(|d| d.vf.as_ref().is_some_and(|v| &v.parent_address == pf) && &d.tags != tags)
        .map(|d| d.pci_address)
        .collect();
    let mut retagged = Vec::with_capacity(vfs.len());
    for a in &vfs {
        if let Some(d) = reg.get_mut_by_address(a) {
            d.tags = tags.clone();
            retagged.push(d.clone());
        }
    }
    retagged
}
