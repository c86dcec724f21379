//! Attachments: handing a device to one VM's VMM, and taking it back.
//!
//! An attachment names the instance, the uid the VMM runs as, and
//! optionally the VMM's pid. While it lasts, that uid (and no other
//! unprivileged user) may open the device's VFIO nodes, through a POSIX
//! ACL entry (`pci::vfio_access`). It ends by detach, or by the VMM's exit:
//! the pid is followed with a pidfd, whose readiness is the kernel telling
//! us the process is gone (no polling). The pid's start time is recorded
//! with it, so a restart never mistakes a reused pid for the VMM.
//!
//! All functions of one IOMMU group share the group node, so they can only
//! be attached to one uid at a time; a group node's entry is revoked only
//! when no device of the group is attached to that uid any more (and
//! `/dev/iommu`'s when no device at all is).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;

use super::operation::{ensure_fit, OpContext, Operation};
use super::release::Release;
use super::{AttachRequest, BindRequest, Caller, Core};
use crate::crashpoint::{self, Stage, StepKind};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::pci::{vfio_access, PciAddress};
use crate::proc::ProcFs;
use crate::registry::{AttachedProcess, Attachment, DeviceRecord};

/// Whether `process` is still the process that was attached.
pub(super) fn still_running(proc_root: &Path, process: AttachedProcess) -> bool {
    ProcFs::new(proc_root)
        .process_identity(process.pid)
        .is_some_and(|p| p.start_time == process.start_time && !p.zombie)
}

impl Core {
    /// The uid an attachment is for: the caller's own unless root names
    /// another.
    pub(super) fn attachment_uid(caller: Caller, requested: Option<u32>) -> Result<u32, CoreError> {
        match requested {
            Some(uid) if uid != caller.uid && caller.uid != 0 => {
                Err(CoreError::Forbidden(format!(
                "uid {} may attach a device for itself only; attaching for uid {uid} needs root",
                caller.uid
            )))
            }
            Some(uid) => Ok(uid),
            None => Ok(caller.uid),
        }
    }

    pub(super) fn vmm_process(&self, pid: u32, uid: u32) -> Result<AttachedProcess, CoreError> {
        let identity = ProcFs::new(&self.options.proc_root)
            .process_identity(pid)
            .ok_or_else(|| CoreError::InvalidPid(format!("no process with pid {pid}")))?;
        if identity.uid != uid {
            return Err(CoreError::InvalidPid(format!(
                "process {pid} runs as uid {}, not as uid {uid} that the attachment is for",
                identity.uid
            )));
        }
        Ok(AttachedProcess {
            pid,
            start_time: identity.start_time,
        })
    }

    /// The attach operation: plan (who for, fit, group), bind if needed,
    /// reset if the last release was not, then record the attachment and
    /// grant its nodes.
    pub(super) async fn attach_device(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        req: AttachRequest,
    ) -> Result<DeviceRecord, CoreError> {
        let caller = ctx.caller;
        let id_or_name = record.id.as_str();
        let record = record.clone();
        let uid = Self::attachment_uid(caller, req.uid)?;
        let process = req.pid.map(|pid| self.vmm_process(pid, uid)).transpose()?;
        let instance = req.instance.0;
        if let Some(current) = &record.attachment {
            let same = current.instance == instance
                && current.uid.unwrap_or(0) == uid
                && current.pid.map(|p| p.pid) == req.pid;
            return if same {
                Ok(record)
            } else {
                Err(CoreError::InUse {
                    device: record.name.clone(),
                    instance: current.instance.clone(),
                })
            };
        }
        ensure_fit(&record)?;
        self.ensure_group_attachable_by(&record, uid)?;
        let addr = record.pci_address;
        // A vGPU VF is ready as it is: its own driver is its VFIO provider.
        let on_vfio = self.sysfs().ready_for_vfio(&addr);
        if !on_vfio {
            self.apply_bind(ctx, &record, BindRequest::default())
                .await?;
        }
        let current = self.resolve(&record.id)?;
        self.reset_before_attach(ctx, &current).await?;
        // The attachment is on disk before its grant is written: a crash in
        // between restarts into a recorded attachment, whose grant startup
        // re-applies (or revokes with it, if its VMM is gone). The other
        // order could leave an entry on the node that no record explains.
        let device = self
            .update_device(addr, |d| {
                d.attachment = Some(Attachment {
                    instance: instance.clone(),
                    uid: Some(uid),
                    pid: process,
                });
            })
            .await?
            .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
        if let Err(e) = self.apply_grant(&device).await {
            // Undo both halves: the entries written so far, then the record.
            if let Err(revoke) = self.revoke_grant(&device).await {
                tracing::error!(device = %addr, error = %revoke, "could not take back a partly written grant");
            }
            self.update_device(addr, |d| d.attachment = None).await?;
            return Err(e);
        }
        if let Some(process) = process {
            self.follow_vmm(addr, process, uid);
        }
        let vmm = match process {
            Some(p) => format!("uid {uid}, VMM pid {}", p.pid),
            None => format!("uid {uid}"),
        };
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %instance, granted_uid = uid, vmm_pid = ?req.pid, "attached {addr} to instance {instance} ({vmm}) for {caller}");
        ctx.publish(
            ctx.event(EventKind::Attach, &device)
                .instance(Some(instance))
                .detail(format!("VFIO nodes open to {vmm}")),
        );
        Ok(device)
    }

    /// Functions of one IOMMU group share its node: all attachments in the
    /// group must be for the same uid.
    fn ensure_group_attachable_by(&self, record: &DeviceRecord, uid: u32) -> Result<(), CoreError> {
        let Some(group) = record.iommu_group else {
            return Ok(());
        };
        let others: Vec<(PciAddress, u32)> = self
            .snapshot()
            .iter()
            .filter(|d| d.pci_address != record.pci_address && d.iommu_group == Some(group))
            .filter_map(|d| match (d.attached_to(), d.attached_uid()) {
                (Some(_), Some(other)) if other != uid => Some((d.pci_address, other)),
                (Some(_), None) if uid != 0 => Some((d.pci_address, 0)),
                _ => None,
            })
            .collect();
        if others.is_empty() {
            Ok(())
        } else {
            Err(CoreError::GroupAttachedToOtherUid {
                device: record.pci_address,
                group,
                uid,
                others,
            })
        }
    }

    /// The nodes `record`'s attachment opens, for its uid: every VFIO node
    /// of the device that exists now. Root needs no grant.
    fn grant_nodes(&self, record: &DeviceRecord) -> Option<(u32, Vec<PathBuf>)> {
        let uid = record.attached_uid().filter(|uid| *uid != 0)?;
        let group = self.sysfs().iommu_group(&record.pci_address)?;
        Some((
            uid,
            vfio_access::vfio_nodes(self.sysfs(), &record.pci_address, group),
        ))
    }

    /// Opens the device's VFIO nodes to the attachment's uid (again: after
    /// a re-plug or a restart the nodes may be new).
    pub(super) async fn apply_grant(&self, record: &DeviceRecord) -> Result<(), CoreError> {
        let Some((uid, nodes)) = self.grant_nodes(record) else {
            return Ok(());
        };
        change_nodes(record.pci_address, nodes, uid, NodeChange::Grant).await
    }

    /// Takes the attachment's uid off the device's nodes, except the
    /// shared ones another attachment of that uid still needs.
    async fn revoke_grant(&self, record: &DeviceRecord) -> Result<(), CoreError> {
        let Some((uid, nodes)) = self.grant_nodes(record) else {
            return Ok(());
        };
        let registry = self.snapshot();
        let group_shared = registry.iter().any(|other| {
            other.pci_address != record.pci_address
                && other.attached_uid() == Some(uid)
                && other.iommu_group == record.iommu_group
        });
        let iommu_shared = self.uid_holds_other_attachment(uid, Some(record.pci_address), None);
        let group_node = record.iommu_group.map(|g| self.sysfs().vfio_group_node(g));
        let iommu_node = self.sysfs().devfs().join("iommu");
        let nodes: Vec<PathBuf> = nodes
            .into_iter()
            .filter(|n| !(group_shared && Some(n) == group_node.as_ref()))
            .filter(|n| !(iommu_shared && *n == iommu_node))
            .collect();
        change_nodes(record.pci_address, nodes, uid, NodeChange::Revoke).await
    }

    /// Revokes and clears an attachment (lock held). `why` goes to the log
    /// and the event.
    pub(super) async fn end_attachment(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        kind: EventKind,
        why: String,
    ) -> Result<DeviceRecord, CoreError> {
        let addr = record.pci_address;
        // The end is on disk before the grant is taken back, as an attach
        // records before it grants: a crash in between leaves an entry no
        // record explains, which startup revokes. The other order restarted
        // into a live attachment whose grant was gone, or, with a failed
        // revoke, recorded no attachment over a tenant's entry.
        let device = self
            .update_device(addr, |d| {
                d.attachment = None;
                d.claim = None;
            })
            .await?
            .unwrap_or_else(|| record.clone());
        if record.claim.as_ref().is_some_and(|c| c.vgpu_type.is_some()) {
            self.clear_vgpu_type(addr).await;
        }
        if let Err(e) = self.revoke_grant(record).await {
            // The attachment still ends: keeping a VM's label on a device
            // because a node could not be changed helps nobody. The entry
            // is taken back as soon as the node lets it.
            tracing::error!(device = %addr, error = %e, "could not revoke the VFIO node grant; trying again");
            self.revoke_later(record.clone());
        }
        ctx.publish(
            ctx.event(kind, &device)
                .instance(record.attached_to().map(str::to_owned))
                .detail(why),
        );
        Ok(device)
    }

    /// The detach operation: the release sequence, giving the device back
    /// unless `keep_bound`.
    pub(super) async fn detach_device(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        keep_bound: bool,
    ) -> Result<DeviceRecord, CoreError> {
        let caller = ctx.caller;
        if let Some(instance) = record.attached_to() {
            let addr = record.pci_address;
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %instance, "detaching {addr} from instance {instance} for {caller}");
        }
        let how = Release {
            why: "detach".into(),
            ends_attachment: Some((EventKind::Detach, format!("detached for {caller}"))),
            give_back: !keep_bound,
        };
        self.release(ctx, record, how).await
    }

    /// Takes an ended attachment's grant back in the background (group
    /// lock held for each try), unless the device is attached to that uid
    /// again meanwhile. Tries for about 6 s; after that the next start
    /// revokes it (`revoke_unexplained_grants`).
    fn revoke_later(&self, ended: DeviceRecord) {
        let Some(core) = self.me.upgrade() else {
            return;
        };
        self.operations.spawn(async move {
            let addr = ended.pci_address;
            for attempt in 1..=REVOKE_ATTEMPTS {
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                let lock = core.op_lock(Self::lock_key(&ended));
                let _group = lock.lock().await;
                let again = core.snapshot().iter().any(|d| {
                    d.attachment.is_some()
                        && d.attached_uid() == ended.attached_uid()
                        && d.iommu_group == ended.iommu_group
                });
                if again {
                    return;
                }
                match core.revoke_grant(&ended).await {
                    Ok(()) => {
                        tracing::info!(device = %addr, attempt, "revoked the VFIO node grant of an ended attachment");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(device = %addr, error = %e, attempt, "could not revoke the VFIO node grant")
                    }
                }
            }
        });
    }

    /// Ends the attachment when its VMM exits. Waiting for the exit is not
    /// an operation (shutdown does not wait for a VM); ending it is.
    fn follow_vmm(&self, addr: PciAddress, process: AttachedProcess, uid: u32) {
        self.when_vmm_exits(process, uid, move |why| Operation::EndAttachment {
            address: addr,
            process,
            why,
        });
    }

    /// Runs vfiod's own operation `end(why)` once `process` has exited.
    pub(super) fn when_vmm_exits(
        &self,
        process: AttachedProcess,
        uid: u32,
        end: impl FnOnce(String) -> Operation + Send + 'static,
    ) {
        let Some(core) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let exited = wait_for_exit(&core.options.proc_root, process).await;
            if let Err(e) = &exited {
                tracing::warn!(pid = process.pid, error = %e, "cannot follow the VMM with a pidfd; checking whether it still runs");
            }
            let why = format!("VMM pid {} (uid {uid}) exited", process.pid);
            // An end the state file refused is tried again shortly (the
            // executor sees its own operations through): the VMM is gone
            // all the same, and an attachment nobody holds should not wait
            // for a restart.
            core.execute_in_background(end(why));
        });
    }

    /// The end-attachment operation (vfiod's own): if `record` is still
    /// attached to `process` and that process is gone, its attachment ends
    /// and the device is released as configured (reset on release, and
    /// given back with `unbind_on_vmm_exit`).
    pub(super) async fn end_attachment_of_exited_vmm(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        process: AttachedProcess,
        why: String,
    ) {
        if record.attached_pid() != Some(process) || still_running(&self.options.proc_root, process)
        {
            return;
        }
        let addr = record.pci_address;
        tracing::info!(device = %addr, instance = ?record.attached_to(), "attachment of {addr} ended: {why}");
        let how = Release {
            why: "its VMM exited".into(),
            ends_attachment: Some((EventKind::AttachmentEnded, why)),
            give_back: self.options.unbind_on_vmm_exit,
        };
        if let Err(e) = self.release(ctx, record, how).await {
            tracing::error!(device = %addr, error = %e, "could not release the device after its VMM exited");
        }
    }

    /// At startup: attachments whose VMM is gone end; the others are
    /// followed again, and every live grant is re-applied (udev may have
    /// recreated the nodes).
    pub(super) async fn resume_attachments(&self) {
        let attached: Vec<DeviceRecord> = self
            .snapshot()
            .iter()
            .filter(|d| d.attachment.is_some())
            .cloned()
            .collect();
        for record in attached {
            let addr = record.pci_address;
            match record.attached_pid() {
                Some(process) if !still_running(&self.options.proc_root, process) => {
                    let why = format!("VMM pid {} exited while vfiod was not running", process.pid);
                    let op = Operation::EndAttachment {
                        address: addr,
                        process,
                        why,
                    };
                    if let Err(e) = self.execute(Caller::AGENT, op).await {
                        tracing::error!(device = %addr, error = %e, "could not end the attachment of a VMM that exited");
                    }
                    continue;
                }
                Some(process) => self.follow_vmm(addr, process, record.attached_uid().unwrap_or(0)),
                None => {}
            }
            if record.present {
                if let Err(e) = self.apply_grant(&record).await {
                    tracing::error!(device = %addr, error = %e, "could not re-apply the VFIO node grant of an attachment");
                }
            }
        }
        self.revoke_unexplained_grants().await;
    }

    /// Takes away every named-user entry on a registered device's VFIO
    /// nodes that no live attachment explains. vfiod owns access to the
    /// nodes of the devices it manages, and an entry nobody can account
    /// for is a tenant that kept access after its attachment ended (a
    /// crash between a revoke and its record, an older vfiod's crash
    /// between a grant and its record, or someone's hand).
    async fn revoke_unexplained_grants(&self) {
        let registry = self.snapshot();
        // Who may hold what, from the attachments: a uid attached to a
        // device may hold that device's nodes, its group's node, and the
        // shared /dev/iommu. Looked up per grant found, so a host with
        // thousands of attachments is not checked attachment by attachment.
        let mut by_group = HashSet::new();
        let mut attached_uids = HashSet::new();
        for d in registry.iter() {
            if let Some(uid) = d.attached_uid() {
                attached_uids.insert(uid);
                if let Some(group) = d.iommu_group {
                    by_group.insert((uid, group));
                }
            }
            attached_uids.extend(d.mdevs.iter().filter_map(super::mdev::mdev_uid));
        }
        let iommu_node = self.sysfs().devfs().join("iommu");
        let mut seen = HashSet::new();
        let mut stray: Vec<(PciAddress, PathBuf, u32)> = Vec::new();
        // The group as the reconcile pass just read it from the bus.
        for record in registry.iter().filter(|d| d.present) {
            let Some(group) = record.iommu_group else {
                continue;
            };
            let group_node = self.sysfs().vfio_group_node(group);
            for node in vfio_access::vfio_nodes(self.sysfs(), &record.pci_address, group) {
                // The group's and /dev/iommu's entries are read once, not
                // once per device that shares them.
                if !seen.insert(node.clone()) {
                    continue;
                }
                for uid in vfio_access::granted_uids(&node) {
                    let explained = if node == group_node {
                        by_group.contains(&(uid, group))
                    } else if node == iommu_node {
                        attached_uids.contains(&uid)
                    } else {
                        record.attached_uid() == Some(uid)
                    };
                    if !explained {
                        stray.push((record.pci_address, node.clone(), uid));
                    }
                }
            }
        }
        // Mediated devices vfiod made: their nodes open to their
        // attachment's uid only (others' mediated devices are theirs).
        for parent in registry.iter().filter(|d| d.present) {
            for m in &parent.mdevs {
                for node in self.sysfs().mdev_vfio_nodes(&m.uuid) {
                    if node == iommu_node || !seen.insert(node.clone()) {
                        continue;
                    }
                    for uid in vfio_access::granted_uids(&node) {
                        if super::mdev::mdev_uid(m) != Some(uid) {
                            stray.push((parent.pci_address, node.clone(), uid));
                        }
                    }
                }
            }
        }
        for (addr, node, uid) in stray {
            tracing::warn!(device = %addr, node = %node.display(), granted_uid = uid, "revoking a VFIO node grant that no live attachment explains");
            if let Err(e) = change_nodes(addr, vec![node], uid, NodeChange::Revoke).await {
                tracing::error!(device = %addr, error = %e, "could not revoke a stray VFIO node grant");
            }
        }
    }
}

/// Tries of [`Core::revoke_later`], 100 ms apart more each time.
const REVOKE_ATTEMPTS: u64 = 10;

#[derive(Debug, Clone, Copy)]
pub(super) enum NodeChange {
    Grant,
    Revoke,
}

/// Grants or revokes `uid`'s access to `nodes` of `addr`, off the runtime.
pub(super) async fn change_nodes(
    addr: PciAddress,
    nodes: Vec<PathBuf>,
    uid: u32,
    change: NodeChange,
) -> Result<(), CoreError> {
    let (apply, what): (fn(&Path, u32) -> _, _) = match change {
        NodeChange::Grant => (vfio_access::grant, "opening"),
        NodeChange::Revoke => (vfio_access::revoke, "closing"),
    };
    tokio::task::spawn_blocking(move || {
        nodes.iter().try_for_each(|node| {
            let step = crashpoint::begin(StepKind::Acl);
            let applied = match step.injected(Stage::Write) {
                Some(source) => Err(crate::path_error::PathError {
                    op: "change ACL of",
                    path: node.clone(),
                    source,
                }),
                None => apply(node, uid),
            };
            step.made(format_args!(
                "{what} {} to uid {uid}{}",
                node.display(),
                if applied.is_err() { " (failed)" } else { "" }
            ));
            applied
        })
    })
    .await
    .map_err(|e| CoreError::Internal(format!("VFIO node access task: {e}")))?
    .map_err(|e| {
        CoreError::GrantFailed(format!("{what} the VFIO nodes of {addr} to uid {uid}: {e}"))
    })
}

/// Resolves when `process` has exited. Errors when no pidfd can be had
/// (then the caller checks /proc once).
async fn wait_for_exit(proc_root: &Path, process: AttachedProcess) -> std::io::Result<()> {
    let pid = rustix::process::Pid::from_raw(process.pid as i32)
        .ok_or_else(|| std::io::Error::other("pid 0"))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    // The pid may have been reused between the attach and the open: the
    // start time tells.
    if !still_running(proc_root, process) {
        return Ok(());
    }
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open
    // and the same for the AsyncFd's whole life.
    let watched = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let _ = watched.readable().await?;
    Ok(())
}
