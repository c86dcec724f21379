//! Legacy mediated devices (mdev) handed out by claims with `mdev_type`.
//!
//! Such a claim gets a mediated device made on a registered parent (which
//! stays on its own driver), not a whole device. The parent's record holds
//! one [`MediatedDevice`] per mdev vfiod made on it, each keyed by its
//! claim's instance: one parent carries several claims at once.
//!
//! Protocol; every step is recorded before the write it stands for:
//! 1. Pick, under the claim lock: a parent offering the type with an
//!    instance available. `{uuid, type, claim, attachment: None}` is
//!    committed, then the UUID written to the type's `create`, still under
//!    the claim lock (the kernel's `available_instances` is what the next
//!    pick reads).
//! 2. Hand-out, under the parent's group lock: the attachment (uid, pid) is
//!    committed, then the mdev's VFIO nodes are opened to the uid (a POSIX
//!    ACL entry, as for a whole device).
//! 3. End (detach with `instance_id`, the VMM's exit): refused while a
//!    process holds the mdev open (the kernel's `remove` would wait for
//!    it); else the attachment is cleared and committed, the entry
//!    revoked, `1` written to `remove`, and the record dropped.
//!
//! vfiod's own pass (`ConvergeMdevs`: startup, the parent bound to its
//! driver again, a VMM's exit) makes the kernel match the records: a record
//! without an attachment is an unfinished hand-out (or end), so its mdev
//! is removed if the kernel has it and the record dropped; one whose VMM is
//! gone ends; a live one whose mdev the kernel lost (a reboot, a re-plug,
//! the parent's driver reloaded) is made again with the same UUID, so the
//! VM's `sysfsdev=` path stays valid, and its grant applied again.
//!
//! Mediated devices someone else made are left alone, but no parent with
//! any mediated device is taken off its driver (that destroys them).

use std::cmp::Reverse;

use super::attach::{change_nodes, still_running, NodeChange};
use super::claim::has_tags;
use super::operation::{device_event, OpContext, Operation};
use super::{ClaimRequest, Core, InstanceId};
use crate::engine::EngineError;
use crate::error::{CoreError, MdevFailure};
use crate::events::EventKind;
use crate::pci::{MdevType, MdevUuid, PciAddress};
use crate::registry::{AttachedProcess, Attachment, DeviceRecord, MediatedDevice};

/// The path QEMU takes as `sysfsdev=` for a mediated device on the host.
pub fn mdev_sysfs_path(uuid: &MdevUuid) -> String {
    format!("/sys/bus/mdev/devices/{uuid}")
}

impl Core {
    /// Why `d` cannot get a mediated device of type `asked` now, or the
    /// type it offers under that name.
    fn mdev_parent_fit(&self, d: &DeviceRecord, asked: &str) -> Result<MdevType, String> {
        if let Some(why) = self.hand_out_blocker(d) {
            return Err(why);
        }
        let types = self.sysfs().mdev_types(&d.pci_address);
        if types.is_empty() {
            return Err("not an mdev parent now (no mdev_supported_types)".into());
        }
        let Some(t) = types.into_iter().find(|t| t.matches(asked)) else {
            return Err(format!("offers no mdev type {asked}"));
        };
        if t.available_instances == 0 {
            return Err(format!(
                "mdev type {} has no instance available (available_instances 0)",
                t.id
            ));
        }
        Ok(t)
    }

    /// The parent for `req` (claim lock held): NUMA node first, then the
    /// parent with the most instances of the type available, then the
    /// address; `NoCapacity` with one reason per candidate otherwise.
    fn pick_mdev_parent(
        &self,
        req: &ClaimRequest,
        asked: &str,
    ) -> Result<(DeviceRecord, MdevType), CoreError> {
        let registry = self.snapshot();
        let mut refused: Vec<(PciAddress, String)> = Vec::new();
        let mut eligible: Vec<(&DeviceRecord, MdevType)> = Vec::new();
        for d in registry.iter().filter(|d| has_tags(d, &req.tags)) {
            if let Some(why) = self.numa_refusal(d, req) {
                refused.push((d.pci_address, why));
                continue;
            }
            match self.mdev_parent_fit(d, asked) {
                Ok(t) => eligible.push((d, t)),
                Err(why) => refused.push((d.pci_address, why)),
            }
        }
        let best = eligible.into_iter().min_by_key(|(d, t)| {
            let off_node = req
                .numa_node
                .is_some_and(|n| self.sysfs().numa_node(&d.pci_address) != Some(n));
            (off_node, Reverse(t.available_instances), d.pci_address)
        });
        match best {
            Some((d, t)) => Ok((d.clone(), t)),
            None => {
                refused.sort();
                Err(CoreError::NoCapacity { refused })
            }
        }
    }

    /// Step 1 of the protocol (claim lock held by the caller): picks a
    /// parent, records the mediated device and makes it. Returns the
    /// parent's group lock, held for the hand-out.
    pub(super) async fn make_mdev(
        &self,
        ctx: &OpContext<'_>,
        req: &ClaimRequest,
        asked: &str,
    ) -> Result<(MediatedDevice, tokio::sync::OwnedMutexGuard<()>), CoreError> {
        let (parent, mdev_type) = self.pick_mdev_parent(req, asked)?;
        let addr = parent.pci_address;
        let guard = self.op_lock(Self::lock_key(&parent)).lock_owned().await;
        // Read again under the lock: a move of the parent may have run
        // between the pick and the lock.
        let parent = self.resolve(&parent.id)?;
        if let Err(why) = self.mdev_parent_fit(&parent, asked) {
            return Err(CoreError::NoCapacity {
                refused: vec![(addr, why)],
            });
        }
        let mdev = MediatedDevice {
            uuid: MdevUuid::random(),
            mdev_type: mdev_type.id.clone(),
            claim: req.clone(),
            attachment: None,
        };
        let recorded = mdev.clone();
        self.update_device(addr, |d| d.mdevs.push(recorded))
            .await?
            .ok_or_else(|| CoreError::NotFound(parent.id.clone()))?;
        if let Err(mut error) = self
            .engine
            .create_mdev(addr, &mdev.mdev_type, &mdev.uuid)
            .await
        {
            // Undone now, or, while the write is stuck in the kernel, by
            // vfiod's own pass once it returns (the record stays until then).
            if !self.converge_mdevs_when_returned(addr, &mdev.uuid, true, &mut error) {
                self.undo_mdev(ctx, addr, &mdev.uuid, "its creation failed")
                    .await;
            }
            let failed = mdev_failed("creating", &parent.name, &mdev.mdev_type, &mdev.uuid, error);
            return Err(failed);
        }
        tracing::info!(device = %addr, mdev = %mdev.uuid, mdev_type = %mdev.mdev_type, "made mediated device {} ({}) on {addr}", mdev.uuid, mdev.mdev_type);
        Ok((mdev, guard))
    }

    /// Step 2 (the parent's group lock held): records who the mediated
    /// device is for, then opens its nodes to them. A failed grant ends the
    /// mediated device again.
    pub(super) async fn hand_out_mdev(
        &self,
        ctx: &OpContext<'_>,
        parent: PciAddress,
        mdev: MediatedDevice,
        uid: u32,
        process: Option<AttachedProcess>,
    ) -> Result<(DeviceRecord, MediatedDevice), CoreError> {
        let caller = ctx.caller;
        let instance = mdev.claim.instance_id.clone();
        let attachment = Attachment {
            instance: instance.clone(),
            uid: Some(uid),
            pid: process,
        };
        let recorded = self
            .update_device(parent, |d| {
                if let Some(m) = d.mdevs.iter_mut().find(|m| m.uuid == mdev.uuid) {
                    m.attachment = Some(attachment.clone());
                }
            })
            .await;
        let record = match recorded {
            Ok(Some(record)) => record,
            Ok(None) => return Err(CoreError::Internal("the mdev parent went away".into())),
            Err(e) => {
                self.undo_mdev(ctx, parent, &mdev.uuid, "recording its hand-out failed")
                    .await;
                return Err(e);
            }
        };
        let handed = MediatedDevice {
            attachment: Some(attachment),
            ..mdev
        };
        if let Err(e) = self.grant_mdev(parent, &handed).await {
            self.undo_mdev(ctx, parent, &handed.uuid, "its grant failed")
                .await;
            return Err(e);
        }
        if let Some(process) = process {
            self.follow_vmm_of_mdev(parent, process, uid);
        }
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %parent, mdev = %handed.uuid, instance = %instance, granted_uid = uid, vmm_pid = ?process.map(|p| p.pid), "handed mediated device {} on {parent} to instance {instance} (uid {uid}) for {caller}", handed.uuid);
        ctx.publish(
            device_event(EventKind::MdevCreated, &record)
                .instance(Some(instance))
                .detail(format!(
                    "mediated device {} ({}) at {}, open to uid {uid}",
                    handed.uuid,
                    handed.mdev_type,
                    mdev_sysfs_path(&handed.uuid)
                )),
        );
        Ok((record, handed))
    }

    /// Opens the mediated device's nodes to its attachment's uid (root
    /// needs no grant).
    async fn grant_mdev(&self, parent: PciAddress, m: &MediatedDevice) -> Result<(), CoreError> {
        let Some(uid) = mdev_uid(m) else {
            return Ok(());
        };
        let nodes = self.sysfs().mdev_vfio_nodes(&m.uuid);
        change_nodes(parent, nodes, uid, NodeChange::Grant).await
    }

    /// Takes the uid's entries off the mediated device's nodes, except
    /// `/dev/iommu` while that uid holds another attachment.
    async fn revoke_mdev(&self, parent: PciAddress, m: &MediatedDevice) -> Result<(), CoreError> {
        let Some(uid) = mdev_uid(m) else {
            return Ok(());
        };
        let iommu_node = self.sysfs().devfs().join("iommu");
        let iommu_shared = self.uid_holds_other_attachment(uid, None, Some(&m.uuid));
        let nodes = self
            .sysfs()
            .mdev_vfio_nodes(&m.uuid)
            .into_iter()
            .filter(|n| !(iommu_shared && *n == iommu_node))
            .collect();
        change_nodes(parent, nodes, uid, NodeChange::Revoke).await
    }

    /// Ends mediated device `uuid` of `parent` (its group lock held): the
    /// attachment cleared and committed, the grant revoked, the kernel's
    /// device removed, the record dropped. A failed remove keeps the record
    /// (without attachment) for the next pass.
    async fn end_mdev(
        &self,
        ctx: &OpContext<'_>,
        parent: &DeviceRecord,
        uuid: &MdevUuid,
        why: String,
    ) -> Result<DeviceRecord, CoreError> {
        let addr = parent.pci_address;
        let Some(m) = parent.mdevs.iter().find(|m| m.uuid == *uuid).cloned() else {
            return Ok(parent.clone());
        };
        if m.attachment.is_some() {
            self.update_device(addr, |d| {
                if let Some(r) = d.mdevs.iter_mut().find(|r| r.uuid == *uuid) {
                    r.attachment = None;
                }
            })
            .await?;
        }
        // Before the remove: should it fail or hang, the tenant has lost
        // access all the same. The node goes with the device anyway.
        if let Err(e) = self.revoke_mdev(addr, &m).await {
            tracing::error!(device = %addr, mdev = %uuid, error = %e, "could not revoke the grant of a mediated device; removing it all the same");
        }
        if let Err(mut error) = self.engine.remove_mdev(addr, uuid).await {
            self.converge_mdevs_when_returned(addr, uuid, false, &mut error);
            return Err(mdev_failed(
                "removing",
                &parent.name,
                &m.mdev_type,
                uuid,
                error,
            ));
        }
        let record = self
            .update_device(addr, |d| d.mdevs.retain(|r| r.uuid != *uuid))
            .await?
            .unwrap_or_else(|| parent.clone());
        tracing::info!(device = %addr, mdev = %uuid, instance = %m.claim.instance_id, "removed mediated device {uuid} of instance {} from {addr}: {why}", m.claim.instance_id);
        ctx.publish(
            device_event(EventKind::MdevRemoved, &record)
                .instance(Some(m.claim.instance_id.clone()))
                .detail(format!("mediated device {uuid} ({}): {why}", m.mdev_type)),
        );
        Ok(record)
    }

    /// Ends a mediated device whose hand-out failed (the parent's group
    /// lock held); if that fails too (the disk refusing the record, say),
    /// vfiod's own pass sees it through.
    async fn undo_mdev(&self, ctx: &OpContext<'_>, parent: PciAddress, uuid: &MdevUuid, why: &str) {
        let ended = match self.snapshot().get_by_address(&parent).cloned() {
            Some(record) => self.end_mdev(ctx, &record, uuid, why.to_owned()).await,
            None => return,
        };
        if let Err(e) = ended {
            tracing::error!(device = %parent, mdev = %uuid, error = %e, "could not undo a mediated device ({why}); trying again");
            self.execute_in_background(Operation::ConvergeMdevs { address: parent });
        }
    }

    /// For a create or remove of `uuid` stuck in the kernel: once the write
    /// returns and what it did shows in sysfs (udev, or a simulated kernel,
    /// may lag the write), vfiod's own pass over the parent finishes it.
    /// True if the write was stuck.
    fn converge_mdevs_when_returned(
        &self,
        parent: PciAddress,
        uuid: &MdevUuid,
        creating: bool,
        error: &mut EngineError,
    ) -> bool {
        let Some(late) = error.take_late_write() else {
            return false;
        };
        tracing::warn!(device = %parent, mdev = %uuid, error = %error, "a mediated device's create or remove is stuck in the kernel; finishing it when the write returns");
        let Some(core) = self.me.upgrade() else {
            return true;
        };
        let uuid = uuid.clone();
        tokio::spawn(async move {
            let returned = late.await;
            tracing::warn!(device = %parent, mdev = %uuid, result = ?returned.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())), "stuck mediated device write returned");
            if matches!(returned, Ok(Ok(()))) {
                let deadline = tokio::time::Instant::now() + core.engine.op_timeout();
                while core.sysfs().mdev_exists(&uuid) != creating
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
            core.execute_in_background(Operation::ConvergeMdevs { address: parent });
        });
        true
    }

    /// `POST /devices/{parent}/detach {"instance_id"}`: ends that
    /// instance's mediated device on the parent, refused while a process
    /// holds it open; an instance attached to the whole device is detached
    /// as usual.
    pub(super) async fn release_mdev_of(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        instance: &InstanceId,
        keep_bound: bool,
    ) -> Result<DeviceRecord, CoreError> {
        let caller = ctx.caller;
        let Some(m) = record
            .mdevs
            .iter()
            .find(|m| m.claim.instance_id == instance.0)
            .cloned()
        else {
            if record.attached_to() == Some(instance.0.as_str()) {
                return self.detach_device(ctx, record, keep_bound).await;
            }
            return Err(CoreError::NothingHeld {
                instance: instance.0.chars().take(80).collect(),
                device: record.name.clone(),
            });
        };
        let addr = record.pci_address;
        if self.sysfs().mdev_exists(&m.uuid) {
            let holders = self.scan_mdev_holders(addr, m.uuid.clone()).await?;
            if !holders.is_empty() {
                return Err(CoreError::DeviceBusy {
                    device: addr,
                    holders,
                });
            }
        }
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, mdev = %m.uuid, instance = %instance.0, "releasing mediated device {} of instance {} for {caller}", m.uuid, instance.0);
        let ended = self
            .end_mdev(ctx, record, &m.uuid, format!("released for {caller}"))
            .await;
        // The release is recorded (the attachment is gone, the tenant's
        // access with it): vfiod's own pass finishes a remove the kernel
        // refused (one stuck in the kernel, once it returns).
        if matches!(&ended, Err(CoreError::MdevFailed(f)) if !f.error.is_timeout())
            || matches!(&ended, Err(CoreError::Storage(_)))
        {
            self.execute_in_background(Operation::ConvergeMdevs { address: addr });
        }
        ended
    }

    /// vfiod's own pass over a parent's mediated devices (its group lock
    /// held; see the module docs).
    pub(super) async fn converge_mdevs(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
    ) -> Result<(), CoreError> {
        let addr = record.pci_address;
        let mut record = record.clone();
        let mut first_error = None;
        for m in record.mdevs.clone() {
            let why = match &m.attachment {
                None => Some("its hand-out or release did not finish".to_owned()),
                Some(a) => a
                    .pid
                    .filter(|p| !still_running(&self.options.proc_root, *p))
                    .map(|p| format!("its VMM pid {} exited", p.pid)),
            };
            if let Some(why) = why {
                match self.end_mdev(ctx, &record, &m.uuid, why).await {
                    Ok(now) => record = now,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
                continue;
            }
            // Live: made again where the kernel lost it, once the parent
            // is back on its driver.
            if !record.present || !self.sysfs().is_mdev_parent(&addr) {
                continue;
            }
            if !self.sysfs().mdev_exists(&m.uuid) {
                if let Err(error) = self.engine.create_mdev(addr, &m.mdev_type, &m.uuid).await {
                    first_error.get_or_insert(mdev_failed(
                        "creating",
                        &record.name,
                        &m.mdev_type,
                        &m.uuid,
                        error,
                    ));
                    continue;
                }
                tracing::info!(device = %addr, mdev = %m.uuid, instance = %m.claim.instance_id, "made mediated device {} of instance {} again", m.uuid, m.claim.instance_id);
                ctx.publish(
                    device_event(EventKind::MdevCreated, &record)
                        .instance(Some(m.claim.instance_id.clone()))
                        .detail(format!(
                            "mediated device {} ({}) made again at {}",
                            m.uuid,
                            m.mdev_type,
                            mdev_sysfs_path(&m.uuid)
                        )),
                );
            }
            if let Err(e) = self.grant_mdev(addr, &m).await {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether vfiod's own pass over `address`'s mediated devices has
    /// nothing left to do (or cannot do it now).
    pub(super) fn mdevs_converged(&self, record: &DeviceRecord) -> bool {
        let addr = record.pci_address;
        let parent_ready = record.present && self.sysfs().is_mdev_parent(&addr);
        record.stuck
            || record.mdevs.iter().all(|m| match &m.attachment {
                None => false,
                Some(a) => {
                    a.pid
                        .is_none_or(|p| still_running(&self.options.proc_root, p))
                        && (!parent_ready || self.sysfs().mdev_exists(&m.uuid))
                }
            })
    }

    /// Ends the mediated device when its VMM exits (see `follow_vmm`).
    fn follow_vmm_of_mdev(&self, parent: PciAddress, process: AttachedProcess, uid: u32) {
        self.when_vmm_exits(process, uid, move |_why| Operation::ConvergeMdevs {
            address: parent,
        });
    }

    /// At startup: follows the VMMs of live mediated devices and runs the
    /// pass over every parent with records.
    pub(super) async fn resume_mdevs(&self) {
        let parents: Vec<DeviceRecord> = self
            .snapshot()
            .iter()
            .filter(|d| !d.mdevs.is_empty())
            .cloned()
            .collect();
        for parent in parents {
            for m in &parent.mdevs {
                if let Some(a) = &m.attachment {
                    if let Some(p) = a.pid {
                        if still_running(&self.options.proc_root, p) {
                            self.follow_vmm_of_mdev(parent.pci_address, p, a.uid.unwrap_or(0));
                        }
                    }
                }
            }
            let address = parent.pci_address;
            if let Err(e) = self
                .execute(super::Caller::AGENT, Operation::ConvergeMdevs { address })
                .await
            {
                tracing::error!(device = %address, error = %e, "could not bring the mediated devices of {address} in line with their records");
            }
        }
    }

    /// `GET /devices/{id_or_name}/mdev_types`: the types the parent offers
    /// now (empty when it is no mdev parent), read fresh from sysfs.
    pub fn mdev_types(&self, id_or_name: &str) -> Result<(DeviceRecord, Vec<MdevType>), CoreError> {
        let record = self.resolve(id_or_name)?;
        let types = self.sysfs().mdev_types(&record.pci_address);
        Ok((record, types))
    }

    /// Refuses an operation that would take `record` off its driver (or
    /// hand it out whole) while it has mediated devices: vfiod's, or
    /// anyone's the kernel shows.
    pub(super) fn ensure_mdevs_undisturbed(&self, record: &DeviceRecord) -> Result<(), CoreError> {
        let mut mdevs: Vec<(String, String)> = record
            .mdevs
            .iter()
            .map(|m| {
                let whose = match &m.attachment {
                    Some(a) => format!("instance {:?}", a.instance),
                    None => format!("instance {:?}, being handed out", m.claim.instance_id),
                };
                (m.uuid.to_string(), whose)
            })
            .collect();
        for uuid in self.sysfs().mdevs_of(&record.pci_address) {
            if !record.mdevs.iter().any(|m| m.uuid == uuid) {
                mdevs.push((uuid.to_string(), "not made by vfiod".into()));
            }
        }
        if mdevs.is_empty() {
            return Ok(());
        }
        Err(CoreError::MdevsInUse {
            device: record.name.clone(),
            mdevs,
        })
    }

    /// Whether `uid` holds an attachment other than the whole device
    /// `except_device` and the mediated device `except_mdev` (so shared
    /// nodes such as `/dev/iommu` stay open to it).
    pub(super) fn uid_holds_other_attachment(
        &self,
        uid: u32,
        except_device: Option<PciAddress>,
        except_mdev: Option<&MdevUuid>,
    ) -> bool {
        self.snapshot().iter().any(|d| {
            (Some(d.pci_address) != except_device && d.attached_uid() == Some(uid))
                || d.mdevs
                    .iter()
                    .any(|m| Some(&m.uuid) != except_mdev && mdev_uid(m) == Some(uid))
        })
    }
}

/// The uid a mediated device's nodes are open to (none for root, or while
/// it is being made).
pub(super) fn mdev_uid(m: &MediatedDevice) -> Option<u32> {
    m.attachment
        .as_ref()
        .and_then(|a| a.uid)
        .filter(|uid| *uid != 0)
}

fn mdev_failed(
    action: &'static str,
    device: &str,
    mdev_type: &str,
    uuid: &MdevUuid,
    error: EngineError,
) -> CoreError {
    CoreError::MdevFailed(Box::new(MdevFailure {
        action,
        device: device.to_owned(),
        mdev_type: mdev_type.to_owned(),
        uuid: uuid.to_string(),
        error,
    }))
}
