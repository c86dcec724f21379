//! Driver moves: planning, binding to vfio, giving back, and settling moves the kernel was slow to finish.

use std::time::Instant;

use super::attach::ensure_not_attached;
use super::reset::refuse_unhealthy;
use super::{BindOutcome, BindPlan, BindRequest, Caller, Core, VFIO_PCI};
use crate::engine::{EngineError, Move};
use crate::error::CoreError;
use crate::events::EventKind;
use crate::metrics::{self, MoveResult};
use crate::pci::holders::vtconsole_bind_path;
use crate::pci::{PciAddress, PciFunction, Sysfs};
use crate::registry::{is_vfio_driver, Companion, DeviceRecord, PendingOp};

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
    pub(super) fn require_privileged(&self) -> Result<(), CoreError> {
        if self.options.privileged {
            Ok(())
        } else {
            Err(CoreError::NotPrivileged(
                "vfiod runs without root privileges, so it serves reads and registry changes but cannot move drivers; run it as root (systemctl start vfiod)".into(),
            ))
        }
    }

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
        if self.modprobe("vfio-pci").await && self.sysfs().driver_loaded(VFIO_PCI) {
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
        refuse_unhealthy(record)?;
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
        let already_bound =
            function.driver.as_deref().is_some_and(is_vfio_driver) && moves.len() == 1;
        Ok(BindPlan {
            steps: plan_steps(sysfs, &moves, group),
            holders: Vec::new(),
            vfio_driver,
            iommu_group: group,
            moves,
            already_bound,
        })
    }

    pub async fn bind(
        &self,
        caller: Caller,
        id_or_name: &str,
        req: BindRequest,
    ) -> Result<BindOutcome, CoreError> {
        let id = id_or_name.to_owned();
        self.owned(move |core| async move {
            let (_group, record) = core.lock_device_for_move(&id).await?;
            core.bind_locked(caller, &record, req).await
        })
        .await
    }

    pub(super) async fn bind_locked(
        &self,
        caller: Caller,
        record: &DeviceRecord,
        req: BindRequest,
    ) -> Result<BindOutcome, CoreError> {
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
                .companions
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
            });
            // A device found without a driver keeps the one recorded
            // earlier (e.g. left driverless by a failed rollback): that is
            // still the driver it belongs to.
            if let Some(from) = device_from.clone().filter(|d| !is_vfio_driver(d)) {
                d.original_driver = Some(from);
            }
            d.companions = companions;
            d.released_consoles = consoles.clone();
        })
        .await?;
        for path in consoles
            .iter()
            .filter_map(|c| vtconsole_bind_path(self.sysfs(), c))
        {
            if let Err(error) = self.engine.bind_console(addr, path, false).await {
                let result = MoveResult::failed(error.is_timeout());
                metrics::record_move("bind", result, started.elapsed());
                return Err(self
                    .record_failed_move(caller, record, "bind", error, None, |d| {
                        d.pending = None;
                        d.companions.clear();
                        d.released_consoles.clear();
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
                        d.pending = None;
                        d.bound_by_vfiod = true;
                        d.vfio_driver = Some(vfio);
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
                // A device that comes back attached (re-plug, restart) gets
                // its VMM's access back with the binding.
                if let Err(e) = self.apply_grant(&device).await {
                    tracing::error!(device = %addr, error = %e, "could not re-apply the VFIO node grant of the attachment");
                }
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                metrics::record_move("bind", MoveResult::Ok, started.elapsed());
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, driver = ?current, elapsed_ms, "bound {addr} to {} for {caller} in {elapsed_ms:.1} ms", current.as_deref().unwrap_or("no driver"));
                self.events
                    .publish(self.publish(EventKind::Bind, &device).driver(current));
                Ok(BindOutcome { device, plan })
            }
            Err(failure) => {
                let result = MoveResult::failed(failure.error.is_timeout());
                metrics::record_move("bind", result, started.elapsed());
                // A rolled-back bind gives the console back too; a stuck
                // one keeps it released until the move is settled.
                let rolled_back = failure.rollback.is_some();
                let err = self
                    .record_failed_move(
                        caller,
                        record,
                        "bind",
                        failure.error,
                        failure.rollback,
                        |d| {
                            d.pending = None;
                            d.companions.clear();
                            d.released_consoles.clear();
                        },
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

    pub async fn unbind(
        &self,
        caller: Caller,
        id_or_name: &str,
    ) -> Result<DeviceRecord, CoreError> {
        let id = id_or_name.to_owned();
        self.owned(move |core| async move {
            let (_group, record) = core.lock_device_for_move(&id).await?;
            ensure_not_attached(&record)?;
            // Reset while still on vfio, before the host driver gets it back.
            let record = if record.bound_by_vfiod && !record.stuck {
                core.reset_on_release(caller, &record, "unbind").await
            } else {
                record
            };
            if record.stuck {
                return Err(CoreError::DeviceStuck(record.pci_address));
            }
            core.unbind_locked(caller, &record).await
        })
        .await
    }

    pub(super) async fn unbind_locked(
        &self,
        caller: Caller,
        record: &DeviceRecord,
    ) -> Result<DeviceRecord, CoreError> {
        let started = Instant::now();
        let addr = record.pci_address;
        if !record.bound_by_vfiod {
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
        if record.stuck {
            return Err(CoreError::DeviceStuck(addr));
        }
        if !self.sysfs().is_present(&addr) {
            return Err(CoreError::NotPresent(addr));
        }
        self.require_privileged()?;
        // A VMM that still has the device open would hang the unbind in
        // the kernel: refuse first, naming it.
        let holders = self.scan_holders(self.functions_on_vfio(record)).await?;
        Self::refuse_if_held(addr, &holders, false, caller)?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, to = ?record.original_driver, "giving {addr} back to {} for {caller}", record.original_driver.as_deref().unwrap_or("no driver"));
        self.update_device(addr, |d| d.pending = Some(PendingOp::Unbind))
            .await?;
        let moves = restore_moves(record);
        let result = self.engine.restore(&moves).await;
        let current = self.sysfs().driver(&addr);
        match result {
            Ok(()) => {
                let device = self
                    .update_device(addr, |d| {
                        d.pending = None;
                        d.bound_by_vfiod = false;
                        d.vfio_driver = None;
                        d.companions.clear();
                        d.released_consoles.clear();
                        d.current_driver = current.clone();
                    })
                    .await?
                    .unwrap_or_else(|| record.clone());
                self.restore_consoles(addr, &record.released_consoles).await;
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                metrics::record_move("unbind", MoveResult::Ok, started.elapsed());
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, driver = ?current, elapsed_ms, "gave {addr} back to {} for {caller} in {elapsed_ms:.1} ms", current.as_deref().unwrap_or("no driver"));
                self.events
                    .publish(self.publish(EventKind::Unbind, &device).driver(current));
                Ok(device)
            }
            Err(error) => {
                let result = MoveResult::failed(error.is_timeout());
                metrics::record_move("unbind", result, started.elapsed());
                Err(self
                    .record_failed_move(caller, record, "unbind", error, None, |d| {
                        d.pending = None;
                        d.bound_by_vfiod = d.current_driver.as_deref().is_some_and(is_vfio_driver);
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
        caller: Caller,
        record: &DeviceRecord,
        op: &'static str,
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
        let err = CoreError::move_failed(op, addr, error, rollback);
        tracing::error!(uid = caller.uid, pid = caller.pid, device = %addr, error = %err, "{op} failed for {caller}: {err}");
        let kind = match (timed_out, op) {
            (true, _) => EventKind::DeviceStuck,
            (false, "bind") => EventKind::BindFailed,
            (false, _) => EventKind::UnbindFailed,
        };
        self.events
            .publish(self.publish(kind, record).detail(err.to_string()));
        err
    }

    /// When a write that timed out finally returns, re-reads the device,
    /// clears `stuck` and settles the recorded operation.
    pub(super) fn watch_late_write(&self, addr: PciAddress, late: crate::engine::LateWrite) {
        let Some(core) = self.me.upgrade() else {
            return;
        };
        // Waiting for the kernel is not an operation (shutdown does not wait
        // for a write that may never return); settling once it has is.
        tokio::spawn(async move {
            let result = late.await;
            tracing::warn!(device = %addr, result = ?result.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())), "stuck sysfs write returned");
            let settling = core.clone();
            core.operations
                .spawn(async move { settling.settle_after_late_write(addr).await });
        });
    }

    async fn settle_after_late_write(&self, addr: PciAddress) {
        let Some(record) = self.snapshot().get_by_address(&addr).cloned() else {
            return;
        };
        let lock = self.op_lock(Self::lock_key(&record));
        let _group = lock.lock().await;
        let current = self.sysfs().driver(&addr);
        if let Ok(Some(d)) = self
            .update_device(addr, |d| {
                d.stuck = false;
                d.current_driver = current.clone();
            })
            .await
        {
            self.events
                .publish(self.publish(EventKind::DeviceUnstuck, &d).driver(current));
            self.settle_pending(&d).await;
        }
    }

    /// Finishes an operation recorded before a crash or a stuck write: a
    /// bind is completed, an unbind is completed. Never touches an attached
    /// device's driver unless to put it (back) on vfio.
    pub(super) async fn settle_pending(&self, record: &DeviceRecord) {
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
            PendingOp::Bind { vfio_driver } => {
                let group = self.sysfs().iommu_group(&addr).unwrap_or(u32::MAX);
                let mut moves = restore_moves(record);
                moves[0].to = Some(vfio_driver.clone());
                let result = self.engine.to_vfio(&moves, group).await;
                let current = self.sysfs().driver(&addr);
                let ok = result.is_ok();
                if let Err(f) = &result {
                    tracing::error!(device = %addr, error = %f.error, "could not finish the recorded bind; rolled back");
                }
                let _ = self
                    .update_device(addr, |d| {
                        d.pending = None;
                        d.bound_by_vfiod = ok;
                        d.vfio_driver = ok.then_some(vfio_driver.clone());
                        if !ok {
                            d.companions.clear();
                            d.released_consoles.clear();
                        }
                        d.current_driver = current;
                    })
                    .await;
                if !ok {
                    self.restore_consoles(addr, &record.released_consoles).await;
                }
            }
            PendingOp::Reset {
                restore_reset_method,
            } => self.settle_reset(record, restore_reset_method).await,
            PendingOp::Unbind => {
                if record.attached_to.is_some() {
                    return;
                }
                let result = self.engine.restore(&restore_moves(record)).await;
                let current = self.sysfs().driver(&addr);
                if let Err(e) = &result {
                    tracing::error!(device = %addr, error = %e, "could not finish the recorded unbind");
                }
                let still_vfio = current.as_deref().is_some_and(is_vfio_driver);
                let _ = self
                    .update_device(addr, |d| {
                        d.pending = None;
                        d.bound_by_vfiod = still_vfio;
                        if !still_vfio {
                            d.vfio_driver = None;
                            d.companions.clear();
                            d.released_consoles.clear();
                        }
                        d.current_driver = current;
                    })
                    .await;
                if !still_vfio {
                    self.restore_consoles(addr, &record.released_consoles).await;
                }
            }
        }
    }
}

pub(super) fn restore_moves(record: &DeviceRecord) -> Vec<Move> {
    let mut moves = vec![Move::restore(
        record.pci_address,
        record.original_driver.clone(),
    )];
    moves.extend(
        record
            .companions
            .iter()
            .map(|c| Move::restore(c.pci_address, c.original_driver.clone())),
    );
    moves
}
