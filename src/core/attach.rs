//! Attachments: marking a device as a VM's, and releasing it.

use super::{BindRequest, Caller, Core, InstanceId};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::registry::{is_vfio_driver, DeviceRecord};

impl Core {
    pub async fn attach(
        &self,
        caller: Caller,
        id_or_name: &str,
        instance: InstanceId,
    ) -> Result<DeviceRecord, CoreError> {
        let id = id_or_name.to_owned();
        self.owned(move |core| async move { core.attach_owned(caller, &id, instance).await })
            .await
    }

    async fn attach_owned(
        &self,
        caller: Caller,
        id_or_name: &str,
        instance: InstanceId,
    ) -> Result<DeviceRecord, CoreError> {
        let (_group, record) = self.lock_device_for_move(id_or_name).await?;
        match &record.attached_to {
            Some(current) if *current == instance.0 => return Ok(record),
            Some(current) => {
                return Err(CoreError::InUse {
                    device: record.name.clone(),
                    instance: current.clone(),
                })
            }
            None => {}
        }
        let on_vfio = self
            .sysfs()
            .driver(&record.pci_address)
            .as_deref()
            .is_some_and(is_vfio_driver);
        if !on_vfio {
            self.bind_locked(caller, &record, BindRequest::default())
                .await?;
        }
        let addr = record.pci_address;
        let instance_id = instance.0.clone();
        let device = self
            .update_device(addr, |d| d.attached_to = Some(instance_id))
            .await?
            .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %instance.0, "attached {addr} to instance {} for {caller}", instance.0);
        self.events.publish(
            self.publish(EventKind::Attach, &device)
                .instance(Some(instance.0)),
        );
        Ok(device)
    }

    pub async fn detach(
        &self,
        caller: Caller,
        id_or_name: &str,
        keep_bound: bool,
    ) -> Result<DeviceRecord, CoreError> {
        let id = id_or_name.to_owned();
        self.owned(move |core| async move { core.detach_owned(caller, &id, keep_bound).await })
            .await
    }

    async fn detach_owned(
        &self,
        caller: Caller,
        id_or_name: &str,
        keep_bound: bool,
    ) -> Result<DeviceRecord, CoreError> {
        let (_group, record) = self.lock_device_for_move(id_or_name).await?;
        let addr = record.pci_address;
        let mut device = record.clone();
        if let Some(instance) = record.attached_to.clone() {
            device = self
                .update_device(addr, |d| d.attached_to = None)
                .await?
                .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %instance, "detached {addr} from instance {instance} for {caller}");
            self.events.publish(
                self.publish(EventKind::Detach, &device)
                    .instance(Some(instance)),
            );
        }
        if !keep_bound && device.bound_by_vfiod && device.present {
            device = self.unbind_locked(caller, &device).await?;
        }
        Ok(device)
    }
}

pub(super) fn ensure_not_attached(record: &DeviceRecord) -> Result<(), CoreError> {
    match &record.attached_to {
        Some(instance) => Err(CoreError::InUse {
            device: record.name.clone(),
            instance: instance.clone(),
        }),
        None => Ok(()),
    }
}
