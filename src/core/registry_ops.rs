//! Registry edits: register, rename/retag, unregister.

use super::operation::{ensure_not_attached, OpContext};
use super::release::Release;
use super::{Core, RegisterRequest, SriovRequest, UpdateRequest};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::registry::{DeviceRecord, RegistryConflict};

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
        let record =
            DeviceRecord::registered(cuid2::create_id(), name, &function, req.tags.into_inner());
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
        let updated = self
            .commit(|reg| {
                if let Some(name) = &req.name {
                    reg.rename(&addr, name.as_str()).map_err(conflict)?;
                }
                let d = reg
                    .get_mut_by_address(&addr)
                    .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
                if let Some(tags) = req.tags {
                    d.tags = tags.into_inner();
                }
                if let Some(methods) = req.reset_method {
                    d.reset_method =
                        methods.map(|list| list.iter().map(|m| m.as_str().to_owned()).collect());
                }
                Ok(d.clone())
            })
            .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, name = %updated.name, "updated {addr} ({}) for {caller}", updated.name);
        ctx.publish(ctx.event(EventKind::Updated, &updated));
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
