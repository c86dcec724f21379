//! Driver moves: planning, binding to vfio, giving back, and settling moves the kernel was slow to finish.

use std::time::Instant;

use super::operation::{ensure_fit, ensure_not_attached, OpContext, OpKind, Operation};
use super::release::Release;
use super::{BindOutcome, BindPlan, BindRequest, Caller, Core, VFIO_PCI};
use crate::engine::{EngineError, Move};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::metrics::{self, MoveResult};
use crate::pci::holders::vtconsole_bind_path;
use crate::pci::{is_vfio_driver, PciAddress, PciFunction, Sysfs};
use crate::registry::{Binding, Companion, DeviceRecord, PendingOp};

fn plan_steps(sysfs: &Sysfs, moves: &[Move], group: u32) -> Vec<String> {
    let mut steps = Vec::new();
    for m in moves {
        let a = m.pci_address;
        let vfio = m.vfio_driver();
        if m.from.as_deref() == Some(vfio) {
            continue;
        }
        steps.push(format!(
            "write {vfio:?} to {}",
            sysfs.driver_override_path(&a).display()
        ));
        // The driver it is on now, which for a device found driverless is
        // not the recorded one it is given back to (`from`).
        if let Some(d) = sysfs.driver(&a) {
            steps.push(format!(
                "write {a} to {}",
                sysfs.driver_dir(&d).join("unbind").display()
            ));
        }
        steps.push(format!(
            "write {a} to {}",
            sysfs.drivers_probe_path().display()
        ));
        steps.push(format!("check {a} is bound to {vfio}"));
    }
    if !steps.is_empty() {
        steps.push(format!(
            "check {} exists",
            sysfs.vfio_group_node(group).display()
        ));
    }
    steps
}
impl Core {
    /// A loaded driver provided by `module` (driver names use '-' where
    /// module names use '_', or not, depending on the driver).
    fn loaded_driver_of_module(&self, module: &str) -> Option<String> {
        let drivers = std::fs::read_dir(self.sysfs().root().join("bus/pci/drivers")).ok()?;
        drivers
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .find(|name| name.replace('-', "_") == module)
    }

    async fn modprobe(&self, module: &str) -> bool {
        if !self.options.load_modules {
            return false;
        }
        match tokio::process::Command::new("modprobe")
            .arg(module)
            .status()
            .await
        {
            Ok(s) if s.success() => true,
            Ok(s) => {
                tracing::warn!(module, status = %s, "modprobe failed");
                false
            }
            Err(e) => {
                tracing::warn!(module, error = %e, "could not run modprobe");
                false
            }
        }
    }

    /// The vfio driver for `function`: a vendor variant driver if the
    /// kernel's module aliases name one for it (and it is loaded or can be
    /// loaded), else vfio-pci, loaded if configured to.
    async fn vfio_driver_for(&self, function: &PciFunction) -> Result<String, CoreError> {
        let variant = function
            .modalias
            .as_deref()
            .and_then(|m| self.options.vfio_aliases.variant_for(m));
        if let Some(module) = variant {
            if let Some(driver) = self.loaded_driver_of_module(module) {
                return Ok(driver);
            }
            if self.modprobe(module).await {
                if let Some(driver) = self.loaded_driver_of_module(module) {
                    return Ok(driver);
                }
            }
            tracing::warn!(device = %function.address, module, "a vfio variant driver matches this device but is not loaded; using plain vfio-pci");
        }
        if self.sysfs().driver_loaded(VFIO_PCI) {
            return Ok(VFIO_PCI.into());
        }
        if self.modprobe(VFIO_PCI).await && self.sysfs().driver_loaded(VFIO_PCI) {
            return Ok(VFIO_PCI.into());
        }
        Err(CoreError::VfioUnavailable(format!(
            "the vfio-pci driver is not loaded ({} does not exist): run `modprobe vfio-pci`, or set load_modules = true in the config",
            self.sysfs().driver_dir(VFIO_PCI).display()
        )))
    }

    /// Checks and plans a bind of `record` (group lock held).
    pub(super) async fn plan_bind(
        &self,
        record: &DeviceRecord,
        with_group: bool,
    ) -> Result<BindPlan, CoreError> {
        let sysfs = self.sysfs();
        let addr = record.pci_address;
        if record.stuck {
            return Err(CoreError::DeviceStuck(addr));
        }
        if record.identity_mismatch {
            return Err(CoreError::IdentityMismatch(addr));
        }
        // Here, not at the API: vfiod's own rebinds (startup, re-plug,
        // reclaim) must not put an unfit device on vfio either.
        ensure_fit(record)?;
        let function = sysfs
            .read_function(&addr)
            .map_err(|e| CoreError::Internal(e.to_string()))?
            .ok_or(CoreError::NotPresent(addr))?;
        // Registered by an older vfiod, or a bridge now where a device was.
        if function.is_bridge() {
            return Err(CoreError::Bridge(addr, function.class));
        }
        let vfio_driver = self.vfio_driver_for(&function).await?;
        let group = function.iommu_group.ok_or(CoreError::NoIommuGroup(addr))?;
        // A device found without a driver (re-plugged before the kernel
        // probed it, or left so by a failed rollback) still belongs to the
        // driver recorded for it: that is what a rollback gives it back to.
        let from = function
            .driver
            .clone()
            .or_else(|| record.original_driver.clone());
        let mut moves = vec![Move {
            pci_address: addr,
            from,
            to: Some(vfio_driver.clone()),
        }];
        let mut others = Vec::new();
        for member in sysfs.group_members(group) {
            if member == addr {
                continue;
            }
            let Ok(Some(f)) = sysfs.read_function(&member) else {
                continue;
            };
            match &f.driver {
                Some(d) if !f.is_bridge() && !is_vfio_driver(d) => {
                    let vfs = sysfs.virtfns(&member);
                    if with_group && !vfs.is_empty() {
                        // Taking a PF from its driver tears its VFs down,
                        // this one's among them.
                        let why = format!("VF of {member}, which shares IOMMU group {group} and cannot leave its driver {d} while it has VFs");
                        return Err(CoreError::PfHasVfs {
                            pf: member.to_string(),
                            vfs: vfs.into_iter().map(|v| (v, why.clone())).collect(),
                        });
                    }
                    others.push((member, d.clone()));
                    let to = Some(self.vfio_driver_for(&f).await?);
                    moves.push(Move {
                        pci_address: member,
                        from: Some(d.clone()),
                        to,
                    });
                }
                _ => {}
            }
        }
        if !others.is_empty() && !with_group {
            return Err(CoreError::GroupConflict {
                device: addr,
                group,
                others,
            });
        }
        // A vGPU VF's own driver is its VFIO provider: never rebound.
        let already_bound = (function.driver.as_deref().is_some_and(is_vfio_driver)
            && moves.len() == 1)
            || sysfs.is_vgpu_vf(&addr);
        Ok(BindPlan {
            steps: plan_steps(sysfs, &moves, group),
            holders: Vec::new(),
            vfio_driver,
            iommu_group: group,
            moves,
            already_bound,
        })
    }

    /// Moves `record` (and, `with_group`, its group companions) to vfio
    /// (group lock held): plan, holder check, the intent on disk, the
    /// writes, the outcome on disk. Grants are not this stage's business:
    /// whoever hands the device out applies them after it returns.
    pub(super) async fn apply_bind(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        req: BindRequest,
    ) -> Result<BindOutcome, CoreError> {
        let caller = ctx.caller;
        // Time inside vfiod from here to the durable result, for the log.
        let started = Instant::now();
        let mut plan = self.plan_bind(record, req.with_group).await?;
        let addr = record.pci_address;
        let mut consoles = Vec::new();
        if !plan.already_bound {
            let taken = plan
                .moves
                .iter()
                .filter(|m| m.from.as_deref().is_some_and(|d| !is_vfio_driver(d)))
                .map(|m| m.pci_address)
                .collect();
            plan.holders = self.scan_holders(taken).await?;
            consoles = self.released_consoles(&plan.holders);
            let sysfs = self.sysfs();
            let releases = consoles
                .iter()
                .filter_map(|c| vtconsole_bind_path(sysfs, c))
                .map(|p| format!("write \"0\" to {}", p.display()));
            plan.steps = releases.chain(plan.steps.drain(..)).collect();
        }
        if req.dry_run || plan.already_bound {
            return Ok(BindOutcome {
                device: record.clone(),
                plan,
            });
        }
        self.require_privileged()?;
        Self::refuse_if_held(addr, &plan.holders, req.force, caller)?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, group = plan.iommu_group, moves = plan.moves.len(), "binding {addr} to {} for {caller} ({} function(s) in IOMMU group {})", plan.vfio_driver, plan.moves.len(), plan.iommu_group);
        // The intent and the drivers to restore are on disk before any write.
        let device_from = plan.moves[0].from.clone();
        let mut companions: Vec<Companion> = plan.moves[1..]
            .iter()
            .map(|m| Companion {
                pci_address: m.pci_address,
                original_driver: m.from.clone(),
            })
            .collect();
        // A companion vfiod moved earlier and that is still on vfio needs
        // no move now (a rebind after the device's re-plug), but is still
        // vfiod's to give back: dropping it from the record would leave it
        // on vfio for good.
        let sysfs = self.sysfs();
        companions.extend(
            record
                .companions()
                .iter()
                .filter(|c| !companions.iter().any(|n| n.pci_address == c.pci_address))
                .filter(|c| {
                    sysfs
                        .driver(&c.pci_address)
                        .as_deref()
                        .is_some_and(is_vfio_driver)
                })
                .cloned()
                .collect::<Vec<_>>(),
        );
        let vfio = plan.vfio_driver.clone();
        self.update_device(addr, |d| {
            d.pending = Some(PendingOp::Bind {
                vfio_driver: vfio.clone(),
                companions,
                released_consoles: consoles.clone(),
            });
            // A device found without a driver keeps the one recorded
            // earlier (e.g. left driverless by a failed rollback): that is
            // still the driver it belongs to.
            if let Some(from) = device_from.clone().filter(|d| !is_vfio_driver(d)) {
                d.original_driver = Some(from);
            }
        })
        .await?;
        for path in consoles
            .iter()
            .filter_map(|c| vtconsole_bind_path(self.sysfs(), c))
        {
            if let Err(error) = self.engine.bind_console(addr, path, false).await {
                let result = MoveResult::failed(error.is_timeout());
                metrics::record_move(OpKind::Bind.as_str(), result, started.elapsed());
                return Err(self
                    .record_failed_move(ctx, record, OpKind::Bind, error, None, |d| {
                        d.pending = None
                    })
                    .await);
            }
        }
        let result = self.engine.to_vfio(&plan.moves, plan.iommu_group).await;
        let current = self.sysfs().driver(&addr);
        match result {
            Ok(()) => {
                let vfio = plan.vfio_driver.clone();
                // Read, not assumed: the device may have left the bus since
                // its move (its remove uevent is then already recorded).
                let present = self.sysfs().is_present(&addr);
                let device = self
                    .update_device(addr, |d| {
                        d.binding = Some(bound(d.pending.take(), vfio));
                        d.current_driver = current.clone();
                        d.present = present;
                    })
                    .await?
                    .unwrap_or_else(|| record.clone());
                // Pulled and re-plugged while it moved, it came back on its
                // native driver; its add found it not vfiod's yet (this
                // bind had not recorded it), so nothing else puts it back.
                if present && !current.as_deref().is_some_and(is_vfio_driver) {
                    tracing::warn!(device = %addr, driver = ?current, "the device came back on another driver while it was being bound; binding it again");
                    self.spawn_rebind(device.clone());
                }
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                metrics::record_move(OpKind::Bind.as_str(), MoveResult::Ok, started.elapsed());
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, driver = ?current, elapsed_ms, "bound {addr} to {} for {caller} in {elapsed_ms:.1} ms", current.as_deref().unwrap_or("no driver"));
                ctx.publish(ctx.event(EventKind::Bind, &device).driver(current));
                Ok(BindOutcome { device, plan })
            }
            Err(failure) => {
                let result = MoveResult::failed(failure.error.is_timeout());
                metrics::record_move(OpKind::Bind.as_str(), result, started.elapsed());
                // A rolled-back bind gives the console back too; a stuck
                // one keeps it released until the move is settled.
                let rolled_back = failure.rollback.is_some();
                let err = self
                    .record_failed_move(
                        ctx,
                        record,
                        OpKind::Bind,
                        failure.error,
                        failure.rollback,
                        |d| d.pending = None,
                    )
                    .await;
                if rolled_back {
                    self.restore_consoles(addr, &consoles).await;
                }
                Err(err)
            }
        }
    }

    /// Binds framebuffer consoles back to their framebuffers once the
    /// device is back (or never left). A failure is logged: the device
    /// itself is fine, the operator gets the console back with
    /// `echo 1 > /sys/class/vtconsole/vtconN/bind`.
    async fn restore_consoles(&self, addr: PciAddress, names: &[String]) {
        for name in names {
            let Some(path) = vtconsole_bind_path(self.sysfs(), name) else {
                continue;
            };
            if let Err(e) = self.engine.bind_console(addr, path, true).await {
                tracing::error!(device = %addr, vtconsole = %name, error = %e, "could not give the framebuffer console back");
            }
        }
    }

    /// The unbind operation: the device goes back to the driver it had
    /// before vfiod bound it, through the release sequence (reset first).
    /// vfiod only undoes its own binds.
    pub(super) async fn unbind_device(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
    ) -> Result<DeviceRecord, CoreError> {
        ensure_not_attached(record)?;
        let addr = record.pci_address;
        if !record.bound_by_vfiod() {
            // Already back where vfiod would have put it: nothing to do.
            // On vfio by someone else's hand: not vfiod's to undo.
            let on_vfio = self
                .sysfs()
                .driver(&addr)
                .as_deref()
                .is_some_and(is_vfio_driver);
            return if on_vfio {
                Err(CoreError::NotBoundByVfiod(record.name.clone()))
            } else {
                Ok(record.clone())
            };
        }
        if !self.sysfs().is_present(&addr) {
            return Err(CoreError::NotPresent(addr));
        }
        self.release(ctx, record, Release::give_back("unbind"))
            .await
    }

    /// Gives a device vfiod bound back to its original driver (group lock
    /// held; the release sequence decides when).
    pub(super) async fn give_back(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
    ) -> Result<DeviceRecord, CoreError> {
        let caller = ctx.caller;
        let started = Instant::now();
        let addr = record.pci_address;
        self.require_privileged()?;
        // A VMM that still has the device open would hang the unbind in
        // the kernel: refuse first, naming it.
        let holders = self.scan_holders(self.functions_on_vfio(record)).await?;
        Self::refuse_if_held(addr, &holders, false, caller)?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, to = ?record.original_driver, "giving {addr} back to {} for {caller}", record.original_driver.as_deref().unwrap_or("no driver"));
        self.update_device(addr, |d| d.pending = Some(PendingOp::Unbind))
            .await?;
        let result = self.engine.restore(&give_back_moves(record)).await;
        let current = self.sysfs().driver(&addr);
        match result {
            Ok(()) => {
                let device = self
                    .update_device(addr, |d| {
                        d.pending = None;
                        d.binding = None;
                        d.current_driver = current.clone();
                    })
                    .await?
                    .unwrap_or_else(|| record.clone());
                self.restore_consoles(addr, record.released_consoles())
                    .await;
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                metrics::record_move(OpKind::Unbind.as_str(), MoveResult::Ok, started.elapsed());
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, driver = ?current, elapsed_ms, "gave {addr} back to {} for {caller} in {elapsed_ms:.1} ms", current.as_deref().unwrap_or("no driver"));
                ctx.publish(ctx.event(EventKind::Unbind, &device).driver(current));
                Ok(device)
            }
            Err(error) => {
                let result = MoveResult::failed(error.is_timeout());
                metrics::record_move(OpKind::Unbind.as_str(), result, started.elapsed());
                Err(self
                    .record_failed_move(ctx, record, OpKind::Unbind, error, None, |d| {
                        d.pending = None;
                        // Still on vfio: still vfiod's to give back.
                        if !d.current_driver.as_deref().is_some_and(is_vfio_driver) {
                            d.binding = None;
                        }
                    })
                    .await)
            }
        }
    }

    /// Records a failed bind or unbind and reports it. The device keeps the
    /// driver it is found on now. If the kernel did not answer in time the
    /// device is marked `stuck` and keeps its recorded `pending` operation,
    /// for the late write's return or the next start to settle; otherwise
    /// `settle` says what the failure leaves behind for this operation.
    pub(super) async fn record_failed_move(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        op: OpKind,
        mut error: EngineError,
        rollback: Option<Result<(), EngineError>>,
        settle: impl FnOnce(&mut DeviceRecord),
    ) -> CoreError {
        let addr = record.pci_address;
        let timed_out = error.is_timeout();
        if let Some(late) = error.take_late_write() {
            self.watch_late_write(addr, late);
        }
        let current = self.sysfs().driver(&addr);
        let recorded = self
            .update_device(addr, |d| {
                d.current_driver = current;
                if timed_out {
                    d.stuck = true;
                } else {
                    settle(d);
                }
            })
            .await;
        if let Err(e) = recorded {
            return e;
        }
        let caller = ctx.caller;
        let err = CoreError::move_failed(op.as_str(), addr, error, rollback);
        tracing::error!(uid = caller.uid, pid = caller.pid, device = %addr, error = %err, "{op} failed for {caller}: {err}");
        let kind = match (timed_out, op) {
            (true, _) => EventKind::DeviceStuck,
            (false, OpKind::Bind) => EventKind::BindFailed,
            (false, OpKind::SetVfs | OpKind::ConvergeVfs) => EventKind::SriovFailed,
            (false, _) => EventKind::UnbindFailed,
        };
        ctx.publish(ctx.event(kind, record).detail(err.to_string()));
        err
    }

    /// When a write that timed out finally returns, the device is settled
    /// (an operation of vfiod's own: `settle_device`).
    pub(super) fn watch_late_write(&self, addr: PciAddress, late: crate::engine::LateWrite) {
        let Some(core) = self.me.upgrade() else {
            return;
        };
        // Waiting for the kernel is not an operation (shutdown does not wait
        // for a write that may never return); settling once it has is.
        tokio::spawn(async move {
            let result = late.await;
            tracing::warn!(device = %addr, result = ?result.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())), "stuck sysfs write returned");
            core.execute_in_background(Operation::Settle { address: addr });
        });
    }

    /// A write of a settling move that timed out in its turn: the device is
    /// stuck again, keeps its pending operation, and is settled once more
    /// when that write returns. Recording the move as finished or rolled
    /// back would be a guess while the kernel still holds the device (a
    /// host under load can take longer than the op timeout for a write that
    /// does return). True if so.
    async fn stuck_again(&self, addr: PciAddress, error: &mut EngineError) -> bool {
        let Some(late) = error.take_late_write() else {
            return false;
        };
        tracing::warn!(device = %addr, error = %error, "settling the unfinished operation timed out in its turn; settling again when the kernel returns");
        self.watch_late_write(addr, late);
        let current = self.sysfs().driver(&addr);
        let _ = self
            .update_device(addr, |d| {
                d.stuck = true;
                d.current_driver = current;
            })
            .await;
        true
    }

    /// The settle operation: a device whose write was stuck is unstuck, and
    /// the operation recorded as pending is finished.
    pub(super) async fn settle_device(&self, ctx: &OpContext<'_>, record: &DeviceRecord) {
        let addr = record.pci_address;
        let mut record = record.clone();
        if record.stuck {
            let current = self.sysfs().driver(&addr);
            if let Ok(Some(d)) = self
                .update_device(addr, |d| {
                    d.stuck = false;
                    d.current_driver = current.clone();
                })
                .await
            {
                ctx.publish(ctx.event(EventKind::DeviceUnstuck, &d).driver(current));
                record = d;
            }
        }
        self.settle_pending(&record).await;
        // A bind settled for an attached device (a rebind after a re-plug
        // cut short by a failed commit, say) gives its VMM its access back:
        // the group node may be new, and nothing else re-applies the grant.
        if let Some(now) = self.snapshot().get_by_address(&addr).cloned() {
            if now.attachment.is_some()
                && now.present
                && now.pending.is_none()
                && self.sysfs().ready_for_vfio(&addr)
            {
                if let Err(e) = self.apply_grant(&now).await {
                    tracing::error!(device = %addr, error = %e, "could not re-apply the VFIO node grant of the attachment after settling");
                }
            }
        }
        // A PF whose count write was stuck: the declared count is made now.
        if record.sriov.is_some() {
            let _ = self.converge_vfs(ctx, &record, None).await;
        }
    }

    /// Finishes an operation recorded before a crash or a stuck write: a
    /// bind is completed, an unbind is completed. Never touches an attached
    /// device's driver unless to put it (back) on vfio.
    async fn settle_pending(&self, record: &DeviceRecord) {
        let addr = record.pci_address;
        let Some(op) = record.pending.clone() else {
            return;
        };
        if !self.sysfs().is_present(&addr) || !self.options.privileged {
            return;
        }
        // The functions this would take from a driver: those not on vfio
        // for a bind, those on vfio for an unbind.
        let on_vfio = self.functions_on_vfio(record);
        let taken: Vec<PciAddress> = match op {
            PendingOp::Bind { .. } => restore_moves(record)
                .iter()
                .map(|m| m.pci_address)
                .filter(|a| !on_vfio.contains(a) && self.sysfs().driver(a).is_some())
                .collect(),
            PendingOp::Unbind => on_vfio,
            // Settling a reset takes nothing from a driver.
            PendingOp::Reset { .. } => Vec::new(),
        };
        match self.scan_holders(taken).await {
            Ok(holders) => {
                if let Err(e) = Self::refuse_if_held(addr, &holders, false, Caller::AGENT) {
                    tracing::warn!(device = %addr, op = ?op, error = %e, "not settling the unfinished operation while the device is held; it is retried at the next start");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(device = %addr, error = %e, "not settling the unfinished operation");
                return;
            }
        }
        tracing::info!(device = %addr, op = ?op, "settling an operation left unfinished");
        match op {
            PendingOp::Bind { vfio_driver, .. } => {
                let group = self.sysfs().iommu_group(&addr).unwrap_or(u32::MAX);
                let mut moves = restore_moves(record);
                moves[0].to = Some(vfio_driver.clone());
                let mut result = self.engine.to_vfio(&moves, group).await;
                if let Err(failure) = &mut result {
                    if self.stuck_again(addr, &mut failure.error).await {
                        return;
                    }
                }
                let current = self.sysfs().driver(&addr);
                let ok = result.is_ok();
                if let Err(f) = &result {
                    tracing::error!(device = %addr, error = %f.error, "could not finish the recorded bind; rolled back");
                }
                let _ = self
                    .update_device(addr, |d| {
                        let pending = d.pending.take();
                        d.binding = ok.then(|| bound(pending, vfio_driver.clone()));
                        d.current_driver = current;
                    })
                    .await;
                if !ok {
                    self.restore_consoles(addr, record.released_consoles())
                        .await;
                }
            }
            PendingOp::Reset {
                restore_reset_method,
            } => self.settle_reset(record, restore_reset_method).await,
            PendingOp::Unbind => {
                if record.attachment.is_some() {
                    return;
                }
                let mut result = self.engine.restore(&give_back_moves(record)).await;
                if let Err(error) = &mut result {
                    if self.stuck_again(addr, error).await {
                        return;
                    }
                }
                let current = self.sysfs().driver(&addr);
                if let Err(e) = &result {
                    tracing::error!(device = %addr, error = %e, "could not finish the recorded unbind");
                }
                let still_vfio = current.as_deref().is_some_and(is_vfio_driver);
                let _ = self
                    .update_device(addr, |d| {
                        d.pending = None;
                        if !still_vfio {
                            d.binding = None;
                        }
                        d.current_driver = current;
                    })
                    .await;
                if !still_vfio {
                    self.restore_consoles(addr, record.released_consoles())
                        .await;
                }
            }
        }
    }
}

/// The binding a finished bind leaves: its driver, and the companions and
/// consoles its pending record carried.
fn bound(pending: Option<PendingOp>, vfio_driver: String) -> Binding {
    match pending {
        Some(PendingOp::Bind {
            companions,
            released_consoles,
            ..
        }) => Binding {
            vfio_driver,
            companions,
            released_consoles,
        },
        _ => Binding {
            vfio_driver,
            companions: Vec::new(),
            released_consoles: Vec::new(),
        },
    }
}

/// The moves of a give-back, companions first and the device last: should
/// one fail (or the device leave the bus), whatever is still on vfio is
/// the device's binding to give back later, never a companion stranded
/// on vfio-pci that no record holds.
fn give_back_moves(record: &DeviceRecord) -> Vec<Move> {
    let mut moves = restore_moves(record);
    moves.rotate_left(1);
    moves
}

pub(super) fn restore_moves(record: &DeviceRecord) -> Vec<Move> {
    let mut moves = vec![Move::restore(
        record.pci_address,
        record.original_driver.clone(),
    )];
    moves.extend(
        record
            .companions()
            .iter()
            .map(|c| Move::restore(c.pci_address, c.original_driver.clone())),
    );
    moves
}
