//! Operations: every change to a device is one typed [`Operation`], run by
//! [`Core::execute`].
//!
//! The executor is the one place that, for every operation alike:
//! - owns the task: the operation runs as a task of the daemon, so a client
//!   that hangs up (its request future dropped) cannot stop it half-way;
//!   shutdown waits for these tasks ([`Core::finish_operations`]);
//! - takes the lock the operation needs (see [`Operation::lock`]);
//! - logs who asked, and how it ended;
//! - counts it in the metrics;
//! - hands the stages an [`OpContext`] through which every event of the
//!   operation is published, in the order things happened.
//!
//! Inside, the stages run one way: plan (checks, what would be written),
//! apply (driver moves, reset, grant), release (reset on release, give
//! back), record (the registry commit that makes the outcome durable). No
//! stage calls back into the one that called it. Adding an operation means
//! a variant here, its stage code, a route-table row and its parse
//! function in the API, and its OpenAPI entry.

use std::time::Instant;

use super::{
    AttachRequest, BindOutcome, BindRequest, Caller, ClaimRequest, Claimed, Core, DetachRequest,
    RegisterRequest, ResetOutcome, ResetRequest, SriovRequest, SriovStatus, UpdateRequest,
};
use crate::error::CoreError;
use crate::events::{Event, EventKind};
use crate::metrics;
use crate::pci::PciAddress;
use crate::registry::{AttachedProcess, DeviceRecord, Health};

/// What an operation is, for logs, metrics and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `POST /devices`.
    Register,
    /// `PATCH /devices/{id}`.
    Update,
    /// `DELETE /devices/{id}`.
    Delete,
    /// `POST /devices/{id}/bind`.
    Bind,
    /// `POST /devices/{id}/unbind`.
    Unbind,
    /// `POST /devices/{id}/attach`.
    Attach,
    /// `POST /devices/{id}/detach`.
    Detach,
    /// `POST /devices/{id}/reset`.
    Reset,
    /// `PUT /devices/{id}/sriov`.
    SetVfs,
    /// `POST /devices/claim`.
    Claim,
    /// vfiod's own: making a PF's declared VF count again (startup, re-plug,
    /// a stuck count write returning).
    ConvergeVfs,
    /// vfiod's own: finishing an operation a crash or a stuck write left
    /// unfinished.
    Settle,
    /// vfiod's own: putting a device it holds back on vfio (restart,
    /// re-plug, reclaim).
    Rebind,
    /// vfiod's own: ending an attachment whose VMM exited.
    EndAttachment,
    /// vfiod's own: bringing a parent's mediated devices in line with their
    /// records (startup, the parent back on its driver, a VMM's exit).
    ConvergeMdevs,
}

impl OpKind {
    /// The `op` label of the metrics and the log; stable, as dashboards key on
    /// it.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Register => "register",
            OpKind::Update => "update",
            OpKind::Delete => "delete",
            OpKind::Bind => "bind",
            OpKind::Unbind => "unbind",
            OpKind::Attach => "attach",
            OpKind::Detach => "detach",
            OpKind::Reset => "reset",
            OpKind::SetVfs => "sriov",
            OpKind::Claim => "claim",
            OpKind::ConvergeVfs => "converge_vfs",
            OpKind::Settle => "settle",
            OpKind::Rebind => "rebind",
            OpKind::EndAttachment => "end_attachment",
            OpKind::ConvergeMdevs => "converge_mdevs",
        }
    }
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change, typed. `device` is an id or a name as the caller gave it;
/// vfiod's own operations name the device by address.
#[derive(Debug, Clone)]
pub enum Operation {
    /// Set a function aside; no driver is touched.
    Register(RegisterRequest),
    /// Rename, retag or set the reset order.
    Update {
        /// Id or name as the caller gave it.
        device: String,
        /// The fields to change.
        req: UpdateRequest,
    },
    /// Unregister, giving back a driver vfiod took.
    Delete {
        /// Id or name as the caller gave it.
        device: String,
    },
    /// Move the device (and with `with_group` its group) to vfio.
    Bind {
        /// Id or name as the caller gave it.
        device: String,
        /// Group, dry-run and force options.
        req: BindRequest,
    },
    /// Give the device back to its original driver.
    Unbind {
        /// Id or name as the caller gave it.
        device: String,
    },
    /// Hand the device to an instance, binding it first if needed.
    Attach {
        /// Id or name as the caller gave it.
        device: String,
        /// Instance, uid and pid.
        req: AttachRequest,
    },
    /// End the attachment (or, with an instance, that instance's mediated
    /// device on this parent).
    Detach {
        /// Id or name as the caller gave it.
        device: String,
        /// `keep_bound` and the instance.
        req: DetachRequest,
    },
    /// Reset the device (and whatever the method's scope takes with it).
    Reset {
        /// Id or name as the caller gave it.
        device: String,
        /// Method and dry-run.
        req: ResetRequest,
    },
    /// Pick a free device like the one asked for and hand it out.
    Claim(ClaimRequest),
    /// Set a PF's VF count and what its VFs are given.
    SetVfs {
        /// Id or name as the caller gave it.
        device: String,
        /// The count and `vf_driver`.
        req: SriovRequest,
    },
    /// Make a PF's declared VF count again.
    ConvergeVfs {
        /// The registered PF's address.
        address: PciAddress,
    },
    /// Finish or undo a recorded move after a crash or a stuck write returning.
    Settle {
        /// The registered device's address.
        address: PciAddress,
    },
    /// Put a device vfiod holds back on vfio.
    Rebind {
        /// The registered device's address.
        address: PciAddress,
    },
    /// Detach because the followed VMM exited.
    EndAttachment {
        /// The registered device's address.
        address: PciAddress,
        /// The process that exited; a newer attachment (another pid or start
        /// time) is left alone.
        process: AttachedProcess,
        /// Why it ended (for the log).
        why: String,
    },
    /// Make, grant again or remove a parent's mediated devices as their
    /// records say.
    ConvergeMdevs {
        /// The registered parent's address.
        address: PciAddress,
    },
}

/// Runs of one of vfiod's own operations before it is left to the next
/// hotplug event or start (`execute_in_background`).
const OWN_OP_ATTEMPTS: u64 = 10;

/// The lock an operation runs under.
pub(super) enum Lock<'a> {
    /// Registry edits only: the commit lock serialises them.
    None,
    /// The device's IOMMU group lock, refused while a write to the device
    /// is still in the kernel (`device_stuck`): that write's return
    /// settles the device, and anything done meanwhile would race it.
    Move(&'a str),
    /// The group lock of a device vfiod itself acts on; a vanished device
    /// makes the operation a no-op.
    Own(PciAddress),
}

impl Operation {
    /// For logs and metrics, without the request's payload.
    pub fn kind(&self) -> OpKind {
        match self {
            Operation::Register(_) => OpKind::Register,
            Operation::Update { .. } => OpKind::Update,
            Operation::Delete { .. } => OpKind::Delete,
            Operation::Bind { .. } => OpKind::Bind,
            Operation::Unbind { .. } => OpKind::Unbind,
            Operation::Attach { .. } => OpKind::Attach,
            Operation::Detach { .. } => OpKind::Detach,
            Operation::Reset { .. } => OpKind::Reset,
            Operation::SetVfs { .. } => OpKind::SetVfs,
            Operation::Claim(_) => OpKind::Claim,
            Operation::ConvergeVfs { .. } => OpKind::ConvergeVfs,
            Operation::Settle { .. } => OpKind::Settle,
            Operation::Rebind { .. } => OpKind::Rebind,
            Operation::EndAttachment { .. } => OpKind::EndAttachment,
            Operation::ConvergeMdevs { .. } => OpKind::ConvergeMdevs,
        }
    }

    pub(super) fn lock(&self) -> Lock<'_> {
        match self {
            // A claim takes the lock of the device it picks.
            Operation::Register(_) | Operation::Update { .. } | Operation::Claim(_) => Lock::None,
            Operation::Delete { device }
            | Operation::Bind { device, .. }
            | Operation::Unbind { device }
            | Operation::Attach { device, .. }
            | Operation::Detach { device, .. }
            | Operation::Reset { device, .. }
            | Operation::SetVfs { device, .. } => Lock::Move(device),
            Operation::Settle { address }
            | Operation::ConvergeVfs { address }
            | Operation::Rebind { address }
            | Operation::ConvergeMdevs { address }
            | Operation::EndAttachment { address, .. } => Lock::Own(*address),
        }
    }

    /// Takes the device from its driver, resets it or unregisters it: on a
    /// PF, that would tear down or disturb its VFs.
    fn disturbs_vfs(&self) -> bool {
        matches!(
            self,
            Operation::Delete { .. }
                | Operation::Bind { .. }
                | Operation::Unbind { .. }
                | Operation::Reset { .. }
        )
    }

    /// Takes the device from its driver (or would, to hand it out whole):
    /// on an mdev parent, that destroys its mediated devices.
    fn disturbs_mdevs(&self) -> bool {
        self.disturbs_vfs() || matches!(self, Operation::Attach { .. })
    }

    /// The device as the caller named it, for the log.
    pub(super) fn target(&self) -> String {
        match self {
            Operation::Register(req) => req.pci_address.to_string(),
            Operation::Claim(req) => format!(
                "a claim for instance {}",
                req.instance_id.chars().take(80).collect::<String>()
            ),
            Operation::Update { device, .. }
            | Operation::Delete { device }
            | Operation::Bind { device, .. }
            | Operation::Unbind { device }
            | Operation::Attach { device, .. }
            | Operation::Detach { device, .. }
            | Operation::Reset { device, .. }
            | Operation::SetVfs { device, .. } => device.chars().take(80).collect(),
            Operation::Settle { address }
            | Operation::ConvergeVfs { address }
            | Operation::Rebind { address }
            | Operation::ConvergeMdevs { address }
            | Operation::EndAttachment { address, .. } => address.to_string(),
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The device as the operation left it.
    Device(DeviceRecord),
    /// The device is no longer registered.
    Deleted,
    /// The device on vfio, with the plan that got it there (or would, on dry
    /// run).
    Bound(BindOutcome),
    /// The device after the reset, with the plan (or just the plan, on dry
    /// run).
    Reset(ResetOutcome),
    /// A PF's SR-IOV state after a VF count change.
    Sriov(SriovStatus),
    /// What a claim got.
    Claimed(Claimed),
    /// vfiod's own operation found nothing to do (the device went away or
    /// no longer needs it).
    Nothing,
}

impl Outcome {
    /// The plan and device of a bind.
    pub fn bound(self) -> Result<BindOutcome, CoreError> {
        match self {
            Outcome::Bound(b) => Ok(b),
            other => Err(CoreError::Internal(format!("a bind ended as {other:?}"))),
        }
    }

    /// The plan and device of a reset.
    pub fn reset(self) -> Result<ResetOutcome, CoreError> {
        match self {
            Outcome::Reset(r) => Ok(r),
            other => Err(CoreError::Internal(format!("a reset ended as {other:?}"))),
        }
    }

    /// The SR-IOV state after a VF count change.
    pub fn sriov(self) -> Result<SriovStatus, CoreError> {
        match self {
            Outcome::Sriov(s) => Ok(s),
            other => Err(CoreError::Internal(format!(
                "a VF count change ended as {other:?}"
            ))),
        }
    }

    /// The device record of an outcome that has one.
    pub fn device(self) -> Result<DeviceRecord, CoreError> {
        match self {
            Outcome::Device(d) => Ok(d),
            Outcome::Bound(b) => Ok(b.device),
            Outcome::Reset(r) => Ok(r.device),
            Outcome::Claimed(c) => Ok(c.device),
            Outcome::Deleted | Outcome::Nothing | Outcome::Sriov(_) => {
                Err(CoreError::Internal("the operation left no device".into()))
            }
        }
    }
}

/// What the stages of one operation share: who asked, and the way out
/// for its events.
pub(super) struct OpContext<'a> {
    pub caller: Caller,
    core: &'a Core,
}

impl OpContext<'_> {
    /// Publishes an event about `device` now, and returns nothing: an
    /// operation's events go out in the order its stages reach them.
    pub fn publish(&self, event: Event) {
        self.core.events.publish(event);
    }

    /// An event about `device`, to be completed and published.
    pub fn event(&self, kind: EventKind, device: &DeviceRecord) -> Event {
        device_event(kind, device)
    }
}

/// An event about a registered device.
pub(super) fn device_event(kind: EventKind, d: &DeviceRecord) -> Event {
    Event::new(kind, Some(d.pci_address), Some(d.id.clone()))
}

/// Attach and bind hand a device out: refused while it is unfit. (A
/// device that needs a reset is fit: it is reset before it is attached.)
pub(super) fn ensure_fit(record: &DeviceRecord) -> Result<(), CoreError> {
    let reason = || record.health.reason.clone().unwrap_or_default();
    match record.health.state {
        Health::Quarantined => Err(CoreError::DeviceQuarantined {
            device: record.name.clone(),
            reason: reason(),
        }),
        Health::NeedsHostReboot => Err(CoreError::NeedsHostReboot {
            device: record.name.clone(),
            reason: reason(),
        }),
        Health::Ok | Health::NeedsReset => Ok(()),
    }
}

/// A device handed to an instance cannot be moved, reset or deleted
/// under it.
pub(super) fn ensure_not_attached(record: &DeviceRecord) -> Result<(), CoreError> {
    match record.attached_to() {
        Some(instance) => Err(CoreError::InUse {
            device: record.name.clone(),
            instance: instance.to_owned(),
        }),
        None => Ok(()),
    }
}

impl Core {
    /// Runs `op` for `caller` as a task of the daemon and waits for its
    /// outcome (see the module docs).
    pub async fn execute(&self, caller: Caller, op: Operation) -> Result<Outcome, CoreError> {
        let task = self.me.upgrade().map(|core| {
            self.operations
                .spawn(async move { core.run(caller, op).await })
        });
        match task {
            Some(task) => task.await.map_err(|e| {
                CoreError::Internal(format!("operation task ended abnormally: {e}"))
            })?,
            None => Err(CoreError::Internal("vfiod is shutting down".into())),
        }
    }

    /// Starts one of vfiod's own operations without waiting for it (from
    /// the hotplug loop, a late write's return, a VMM's exit) and sees it
    /// through: while it fails for a reason that may pass (a write or a
    /// commit refused, a scan that failed) and the state it is for is not
    /// reached, it runs again after a growing pause, [`OWN_OP_ATTEMPTS`]
    /// times in all (about 6 s); after that the next hotplug event or start
    /// takes it up. Its outcomes are logged by the executor.
    pub(super) fn execute_in_background(&self, op: Operation) {
        let Some(core) = self.me.upgrade() else {
            return;
        };
        self.operations.spawn(async move {
            for attempt in 1..=OWN_OP_ATTEMPTS {
                let result = core.run(Caller::AGENT, op.clone()).await;
                let again = match &result {
                    Ok(_) => !core.reached(&op),
                    Err(e) => e.may_pass() && !core.reached(&op),
                };
                if !again {
                    return;
                }
                tracing::info!(op = %op.kind(), device = %op.target(), attempt, "vfiod's own {} of {} is not done yet; trying again", op.kind(), op.target());
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
            }
        });
    }

    /// Whether the state one of vfiod's own operations is for holds now (or
    /// can no longer be reached by it: the device went away, or a write of
    /// it is stuck, whose return settles it).
    fn reached(&self, op: &Operation) -> bool {
        let registry = self.snapshot();
        let record = |a: &PciAddress| registry.get_by_address(a);
        match op {
            Operation::Rebind { address } => record(address).is_none_or(|d| {
                d.stuck
                    || !self.wants_vfio(d)
                    || self.sysfs().ready_for_vfio(address)
                    || ensure_fit(d).is_err()
            }),
            Operation::Settle { address } => {
                record(address).is_none_or(|d| d.stuck || d.pending.is_none())
            }
            Operation::EndAttachment {
                address, process, ..
            } => record(address).is_none_or(|d| d.attached_pid() != Some(*process)),
            // Its own pass changes a count only where the kernel has none
            // or too many (`converge_vfs`).
            Operation::ConvergeVfs { address } => record(address).is_none_or(|d| {
                let Some(config) = &d.sriov else { return true };
                let enabled = self.sysfs().virtfns(address).len() as u32;
                d.stuck
                    || !d.present
                    || (enabled > 0 && enabled <= config.desired_vfs)
                    || enabled == config.desired_vfs
            }),
            Operation::ConvergeMdevs { address } => {
                record(address).is_none_or(|d| self.mdevs_converged(d))
            }
            // Requests are not retried by vfiod: their callers are told.
            _ => true,
        }
    }

    async fn run(&self, caller: Caller, op: Operation) -> Result<Outcome, CoreError> {
        let kind = op.kind();
        let target = op.target();
        let started = Instant::now();
        if caller != Caller::AGENT {
            tracing::debug!(uid = caller.uid, pid = caller.pid, op = %kind, device = %target, "{kind} of {target} requested by {caller}");
        }
        let ctx = OpContext { caller, core: self };
        let locked = match op.lock() {
            Lock::None => Ok(None),
            Lock::Move(device) => self
                .lock_device_for_move(device)
                .await
                .map(|(guard, record)| Some((guard, Some(record)))),
            Lock::Own(address) => Ok(self.lock_address(address).await),
        };
        let result = match locked {
            Err(e) => Err(e),
            Ok(held) => {
                let (_guard, record) = match held {
                    Some((guard, record)) => (Some(guard), record),
                    None => (None, None),
                };
                self.apply(&ctx, op, record).await
            }
        };
        let took = started.elapsed();
        metrics::record_operation(kind.as_str(), result.is_ok());
        let elapsed_ms = took.as_secs_f64() * 1000.0;
        match &result {
            Ok(_) => {
                tracing::debug!(uid = caller.uid, pid = caller.pid, op = %kind, device = %target, elapsed_ms, "{kind} of {target} for {caller} done in {elapsed_ms:.1} ms")
            }
            Err(e) if caller == Caller::AGENT => {
                tracing::warn!(op = %kind, device = %target, error = %e, "{kind} of {target} (vfiod's own) failed: {e}")
            }
            Err(e) => {
                tracing::info!(uid = caller.uid, pid = caller.pid, op = %kind, device = %target, error = %e, "{kind} of {target} for {caller} refused or failed: {e}")
            }
        }
        result
    }

    /// Dispatches to the operation's stages, the lock held. `record` is the
    /// device read again under the lock (`None` for operations without a
    /// device lock, or one of vfiod's own whose device went away).
    async fn apply(
        &self,
        ctx: &OpContext<'_>,
        op: Operation,
        record: Option<DeviceRecord>,
    ) -> Result<Outcome, CoreError> {
        let locked = |record: Option<DeviceRecord>| {
            record.ok_or_else(|| CoreError::Internal("operation without its device".into()))
        };
        if let (Some(record), true) = (&record, op.disturbs_vfs()) {
            self.ensure_vfs_undisturbed(record, op.kind()).await?;
        }
        // Taking a parent off its driver destroys its mediated devices.
        if let (Some(record), true) = (&record, op.disturbs_mdevs()) {
            self.ensure_mdevs_undisturbed(record)?;
        }
        match op {
            Operation::Register(req) => self.register_device(ctx, req).await.map(Outcome::Device),
            Operation::Claim(req) => self.claim(ctx, req).await.map(Outcome::Claimed),
            Operation::Update { device, req } => self
                .update_device_record(ctx, &device, req)
                .await
                .map(Outcome::Device),
            Operation::Delete { .. } => self
                .delete_device(ctx, &locked(record)?)
                .await
                .map(|()| Outcome::Deleted),
            Operation::Bind { req, .. } => self
                .apply_bind(ctx, &locked(record)?, req)
                .await
                .map(Outcome::Bound),
            Operation::Unbind { .. } => self
                .unbind_device(ctx, &locked(record)?)
                .await
                .map(Outcome::Device),
            Operation::Attach { req, .. } => self
                .attach_device(ctx, &locked(record)?, req)
                .await
                .map(Outcome::Device),
            Operation::Detach { req, .. } => match req.instance {
                Some(instance) => self
                    .release_mdev_of(ctx, &locked(record)?, &instance, req.keep_bound)
                    .await
                    .map(Outcome::Device),
                None => self
                    .detach_device(ctx, &locked(record)?, req.keep_bound)
                    .await
                    .map(Outcome::Device),
            },
            Operation::Reset { req, .. } => self
                .reset_device(ctx, &locked(record)?, req)
                .await
                .map(Outcome::Reset),
            Operation::SetVfs { req, .. } => {
                self.converge_vfs(ctx, &locked(record)?, Some(req)).await
            }
            Operation::ConvergeVfs { address } => {
                self.converge_started(&address);
                match record {
                    Some(record) => self.converge_vfs(ctx, &record, None).await,
                    None => Ok(Outcome::Nothing),
                }
            }
            Operation::Settle { .. } => match record {
                Some(record) => {
                    self.settle_device(ctx, &record).await;
                    Ok(Outcome::Nothing)
                }
                None => Ok(Outcome::Nothing),
            },
            Operation::Rebind { .. } => match record {
                Some(record) => self.rebind_device(ctx, &record).await,
                None => Ok(Outcome::Nothing),
            },
            Operation::ConvergeMdevs { .. } => match record {
                Some(record) => self
                    .converge_mdevs(ctx, &record)
                    .await
                    .map(|()| Outcome::Nothing),
                None => Ok(Outcome::Nothing),
            },
            Operation::EndAttachment { process, why, .. } => match record {
                Some(record) => {
                    self.end_attachment_of_exited_vmm(ctx, &record, process, why)
                        .await;
                    Ok(Outcome::Nothing)
                }
                None => Ok(Outcome::Nothing),
            },
        }
    }
}
