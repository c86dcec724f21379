//! Registry edits: register, rename/retag, unregister.

use super::attach::ensure_not_attached;
use super::{Caller, Core, RegisterRequest, UpdateRequest};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::registry::{DeviceRecord, RegistryConflict};

fn conflict(e: RegistryConflict) -> CoreError {
    CoreError::Conflict(e.to_string())
}

impl Core {
    pub async fn register(
        &self,
        caller: Caller,
        req: RegisterRequest,
    ) -> Result<DeviceRecord, CoreError> {
        self.owned(move |core| async move { core.register_owned(caller, req).await })
            .await
    }

    async fn register_owned(
        &self,
        caller: Caller,
        req: RegisterRequest,
    ) -> Result<DeviceRecord, CoreError> {
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
        self.events
            .publish(self.publish(EventKind::Registered, &record));
        Ok(record)
    }

    pub async fn update(
        &self,
        caller: Caller,
        id_or_name: &str,
        req: UpdateRequest,
    ) -> Result<DeviceRecord, CoreError> {
        let id = id_or_name.to_owned();
        self.owned(move |core| async move { core.update_owned(caller, &id, req).await })
            .await
    }

    async fn update_owned(
        &self,
        caller: Caller,
        id_or_name: &str,
        req: UpdateRequest,
    ) -> Result<DeviceRecord, CoreError> {
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
        self.events
            .publish(self.publish(EventKind::Updated, &updated));
        Ok(updated)
    }

    /// Unregisters a device, first giving back a driver vfiod took. If that
    /// fails the device stays registered.
    pub async fn delete(&self, caller: Caller, id_or_name: &str) -> Result<(), CoreError> {
        let id = id_or_name.to_owned();
        self.owned(move |core| async move { core.delete_owned(caller, &id).await })
            .await
    }

    async fn delete_owned(&self, caller: Caller, id_or_name: &str) -> Result<(), CoreError> {
        let (_group, record) = self.lock_device_for_move(id_or_name).await?;
        ensure_not_attached(&record)?;
        if record.bound_by_vfiod && record.present {
            // Giving back a device vfiod bound is a release: reset it while
            // it is still on vfio.
            let record = self.reset_on_release(caller, &record, "delete").await;
            if record.stuck {
                return Err(CoreError::DeviceStuck(record.pci_address));
            }
            self.unbind_locked(caller, &record).await?;
        } else if record.bound_by_vfiod && !record.companions.is_empty() {
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
                    .map_err(|e| CoreError::move_failed("unbind", record.pci_address, e, None))?;
            }
        }
        let addr = record.pci_address;
        self.commit(|reg| {
            reg.remove(&addr);
            Ok(())
        })
        .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, id = %record.id, "unregistered {addr} ({}) for {caller}", record.name);
        self.events
            .publish(self.publish(EventKind::Unregistered, &record));
        Ok(())
    }
}
