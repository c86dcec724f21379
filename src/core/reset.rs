//! Reset and health: resetting a function with a scope check, verifying it
//! afterwards, and keeping each device's `health` (with quarantine).
//!
//! Scope. A function-level method (`flr`, `af_flr`, `pm`, `acpi`,
//! `device_specific`) resets the function alone; `bus` (a secondary bus
//! reset) resets every function below the bridge the function sits behind.
//! vfiod computes that set from the sysfs topology (the device directory's
//! parent bridge and everything below it), not from VFIO's hot-reset info:
//! that needs a device fd, and getting one takes the group exclusively
//! (a VMM starting then would get EBUSY) and makes vfio-pci reset the
//! function on open. The real-kernel scenario `resets` checks that both give
//! the same functions (behind a root port, and behind a PCIe-to-PCI
//! bridge). A reset is refused (409
//! `reset_scope_conflict`) when its scope holds a function outside the
//! device's IOMMU group, one that is attached, or one that something holds
//! (the holder scan of the moves: processes, mounts, swap, block stacks,
//! interfaces in use, a framebuffer console); a bus reset is never done
//! on a root bus. `auto` follows the kernel's `reset_method` order (or the
//! device's own list set with PATCH), leaving `bus` out when its scope
//! conflicts and another method remains.
//!
//! Health. `needs_reset` is set when a device is released (detach, unbind
//! of a device vfiod bound) before the release reset runs, and whenever a
//! reset fails; it is cleared by a successful reset, and a device that
//! still has it is reset before its next attach. `quarantine_after`
//! consecutive failed resets make it `quarantined`: attach and bind are
//! refused until a successful explicit reset. Config space reading all
//! ones, after a reset or when the device (re)appears, makes it
//! `needs_host_reboot`. Health lives in the registry record, so it survives
//! restarts; each change is an event.
//!
//! All of it runs under the device's IOMMU group operation lock, like the
//! moves; the reset write has the moves' timeout and stuck handling.

use std::time::Instant;

use chrono::Utc;

use super::operation::{device_event, OpContext, OpKind};
use super::{Core, ResetMethod, ResetOutcome, ResetPlan, ResetRequest, ScopeFunction};
use crate::error::{CoreError, ResetCheck, ResetVerifyFailure};
use crate::events::EventKind;
use crate::pci::PciAddress;
use crate::registry::{DeviceRecord, Health, LastReset, PendingOp, ResetResult};

/// Why a reset runs; only an explicit one lifts a quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    Explicit,
    Release,
    BeforeAttach,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Explicit => "requested",
            Trigger::Release => "on release",
            Trigger::BeforeAttach => "before attach",
        }
    }
}

/// The `reset_method` writes around the reset: `select` before, `restore`
/// after. Both `None` when the kernel's own order is what was asked for.
struct Selection {
    select: Option<String>,
    restore: Option<String>,
}

/// Health after a failed reset. `reason` says what failed.
fn apply_failure(d: &mut DeviceRecord, reason: &str, all_ones: bool, quarantine_after: u32) {
    if all_ones {
        d.health.state = Health::NeedsHostReboot;
        d.health.reason = Some(format!(
            "config space reads all ones after a reset: {reason}"
        ));
    } else if d.health.reset_failures >= quarantine_after {
        d.health.state = Health::Quarantined;
        d.health.reason = Some(format!(
            "{} consecutive failed resets; last: {reason}",
            d.health.reset_failures
        ));
    } else if !matches!(
        d.health.state,
        Health::Quarantined | Health::NeedsHostReboot
    ) {
        d.health.state = Health::NeedsReset;
        d.health.reason = Some(format!("the last reset failed: {reason}"));
    }
}

/// Methods that reset the whole secondary bus below the function's bridge:
/// `bus`, and `cxl_bus` (newer kernels, CXL ports) which is one too.
fn resets_bus(method: &str) -> bool {
    matches!(method, "bus" | "cxl_bus")
}

/// Health from a registered device's config space, read when it is (back)
/// on the bus (`vendor`: its first two bytes): reading all ones means the
/// function is gone until the host reboots; one that answers again after
/// that needs a reset. Applied inside the commit that records the device's
/// presence (startup reconcile, a re-plug), not in a commit of its own.
pub(super) fn apply_config_space(d: &mut DeviceRecord, vendor: u16, when: &str) {
    if vendor == 0xffff {
        if d.health.state != Health::NeedsHostReboot {
            d.health.state = Health::NeedsHostReboot;
            d.health.reason = Some(format!("config space reads all ones ({when})"));
        }
    } else if d.health.state == Health::NeedsHostReboot {
        d.health.state = Health::NeedsReset;
        d.health.reason = Some(format!(
            "config space answers again ({when}); it is reset before it is handed out"
        ));
    }
}

impl Core {
    /// The reset operation.
    pub(super) async fn reset_device(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        req: ResetRequest,
    ) -> Result<ResetOutcome, CoreError> {
        self.reset_locked(ctx, record, req, Trigger::Explicit).await
    }

    /// Functions in `scope` that a reset of `record` may not touch, and why:
    /// outside its IOMMU group, attached, or held (any holder: a reset under
    /// a process, a mount or an interface in use pulls the device from
    /// under it, whatever driver it is on).
    async fn scope_conflicts(
        &self,
        record: &DeviceRecord,
        group: Option<u32>,
        scope: &[PciAddress],
    ) -> Result<Vec<(PciAddress, String)>, CoreError> {
        let sysfs = self.sysfs();
        let registry = self.snapshot();
        let mut conflicts = Vec::new();
        for f in scope {
            if *f != record.pci_address {
                let theirs = sysfs.iommu_group(f);
                if theirs.is_none() || theirs != group {
                    let shown = |g: Option<u32>| g.map_or("none".to_owned(), |g| g.to_string());
                    conflicts.push((
                        *f,
                        format!(
                            "outside IOMMU group {} of {} (its group: {})",
                            shown(group),
                            record.pci_address,
                            shown(theirs)
                        ),
                    ));
                }
            }
            if let Some(owner) = registry.owner_of(f) {
                if let Some(instance) = &owner.attached_to() {
                    let via = if owner.pci_address == *f {
                        String::new()
                    } else {
                        format!(" with {}", owner.name)
                    };
                    conflicts.push((*f, format!("attached to instance {instance:?}{via}")));
                }
            }
        }
        for holder in self.scan_holders(scope.to_vec()).await? {
            conflicts.push((holder.pci_address(), holder.to_string()));
        }
        Ok(conflicts)
    }

    /// Checks and plans a reset of `record` (group lock held).
    async fn plan_reset(
        &self,
        record: &DeviceRecord,
        method: ResetMethod,
    ) -> Result<(ResetPlan, Selection), CoreError> {
        let sysfs = self.sysfs();
        let addr = record.pci_address;
        if record.identity_mismatch {
            return Err(CoreError::IdentityMismatch(addr));
        }
        if !sysfs.is_present(&addr) {
            return Err(CoreError::NotPresent(addr));
        }
        let supported = sysfs.reset_methods(&addr);
        if supported.is_empty() {
            return Err(CoreError::ResetMethodUnsupported(format!(
                "the kernel offers no reset method for {addr} ({} is missing or empty)",
                sysfs.reset_method_path(&addr).display()
            )));
        }
        let mut methods: Vec<String> = match method {
            ResetMethod::Auto => record
                .reset_method
                .clone()
                .unwrap_or_else(|| supported.clone()),
            m => vec![m.as_str().to_owned()],
        };
        if let Some(missing) = methods.iter().find(|m| !supported.contains(m)) {
            return Err(CoreError::ResetMethodUnsupported(format!(
                "{addr} has no {missing} reset; the kernel offers: {}",
                supported.join(" ")
            )));
        }
        let group = sysfs.iommu_group(&addr).or(record.iommu_group);
        let mut scope = vec![addr];
        // The conflicts of `scope`, once known: a bus scope's check covers
        // the function itself too, so its holders are scanned only once.
        let mut scope_checked: Option<Vec<(PciAddress, String)>> = None;
        if methods.iter().any(|m| resets_bus(m)) {
            let below = sysfs
                .bus_reset_scope(&addr)
                .map_err(|e| CoreError::Internal(e.to_string()))?;
            let refusal = match below {
                None => Some(CoreError::ResetMethodUnsupported(format!(
                    "{addr} is on a root bus: vfiod never resets a root bus"
                ))),
                Some(functions) => {
                    let conflicts = self.scope_conflicts(record, group, &functions).await?;
                    // Were bus left out, the function alone would meet
                    // these (the group check never counts the function).
                    scope_checked = Some(
                        conflicts
                            .iter()
                            .filter(|(f, _)| *f == addr)
                            .cloned()
                            .collect(),
                    );
                    if conflicts.is_empty() {
                        scope.extend(functions.into_iter().filter(|f| *f != addr));
                        None
                    } else {
                        Some(CoreError::ResetScopeConflict {
                            device: addr,
                            method: methods
                                .iter()
                                .filter(|m| resets_bus(m))
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(" "),
                            conflicts,
                        })
                    }
                }
            };
            if let Some(refusal) = refusal {
                // auto may still reset the function alone.
                methods.retain(|m| !resets_bus(m));
                if method != ResetMethod::Auto || methods.is_empty() {
                    return Err(refusal);
                }
                tracing::info!(device = %addr, reason = %refusal, "leaving bus out of the reset methods");
            }
        }
        let conflicts = match scope_checked {
            Some(conflicts) => conflicts,
            None => self.scope_conflicts(record, group, &scope).await?,
        };
        if !conflicts.is_empty() {
            return Err(CoreError::ResetScopeConflict {
                device: addr,
                method: methods.join(" "),
                conflicts,
            });
        }
        let selection = if methods == supported {
            Selection {
                select: None,
                restore: None,
            }
        } else {
            Selection {
                select: Some(methods.join(" ")),
                restore: Some(supported.join(" ")),
            }
        };
        let mut steps = Vec::new();
        let method_path = sysfs.reset_method_path(&addr);
        if let Some(select) = &selection.select {
            steps.push(format!("write {select:?} to {}", method_path.display()));
        }
        steps.push(format!(
            "write \"1\" to {}",
            sysfs.reset_path(&addr).display()
        ));
        if let Some(restore) = &selection.restore {
            steps.push(format!("write {restore:?} to {}", method_path.display()));
        }
        steps.push(format!(
            "check config space, power state and driver of {}",
            scope
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let plan = ResetPlan {
            method: method.as_str().to_owned(),
            methods,
            scope: scope
                .iter()
                .map(|f| ScopeFunction {
                    pci_address: *f,
                    driver: sysfs.driver(f),
                    iommu_group: sysfs.iommu_group(f),
                })
                .collect(),
            steps,
        };
        Ok((plan, selection))
    }

    /// Resets `record` (group lock held), verifies, and records the result
    /// and the device's health.
    pub(super) async fn reset_locked(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        req: ResetRequest,
        trigger: Trigger,
    ) -> Result<ResetOutcome, CoreError> {
        let caller = ctx.caller;
        let (plan, selection) = self.plan_reset(record, req.method).await?;
        if req.dry_run {
            return Ok(ResetOutcome {
                device: record.clone(),
                plan,
            });
        }
        self.require_privileged()?;
        let addr = record.pci_address;
        let before: Vec<(PciAddress, Option<String>)> = plan
            .scope
            .iter()
            .map(|f| (f.pci_address, f.driver.clone()))
            .collect();
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, methods = ?plan.methods, scope = before.len(), "resetting {addr} ({}) for {caller}: {} over {} function(s)", trigger.as_str(), plan.methods.join(" "), before.len());
        let restore = selection.restore.clone();
        self.update_device(addr, |d| {
            d.pending = Some(PendingOp::Reset {
                restore_reset_method: restore,
            })
        })
        .await?;
        let started = Instant::now();
        let written = self
            .engine
            .reset(
                addr,
                selection.select.as_deref(),
                selection.restore.as_deref(),
            )
            .await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let last = |result| LastReset {
            method: plan.method.clone(),
            at: Utc::now(),
            result,
            duration_ms,
        };
        let outcome = match written {
            Ok(()) => self.verify_after_reset(addr, &plan.methods.join(" "), &before),
            Err(error) if error.is_timeout() => {
                // Stuck like a hung move: the late write's return settles
                // it (settle_pending), which puts reset_method back.
                let reason = error.to_string();
                let quarantine_after = self.options.quarantine_after;
                let last = last(ResetResult::Timeout);
                self.update_health(addr, |d| {
                    d.health.last_reset = Some(last);
                    d.health.reset_failures += 1;
                    apply_failure(d, &reason, false, quarantine_after);
                })
                .await?;
                return Err(self
                    .record_failed_move(ctx, record, OpKind::Reset, error, None, |_| {})
                    .await);
            }
            Err(error) => Err(CoreError::move_failed(
                OpKind::Reset.as_str(),
                addr,
                error,
                None,
            )),
        };
        let mut health_before = None;
        let result = if outcome.is_ok() {
            ResetResult::Ok
        } else {
            ResetResult::Failed
        };
        let all_ones = matches!(&outcome, Err(CoreError::ResetVerifyFailed(f)) if f.check == ResetCheck::ConfigSpace);
        let reason = outcome.as_ref().err().map(ToString::to_string);
        let quarantine_after = self.options.quarantine_after;
        let current = self.sysfs().driver(&addr);
        let last = last(result);
        let device = self
            .update_device(addr, |d| {
                health_before = Some(d.health.state);
                d.pending = None;
                d.current_driver = current;
                d.health.last_reset = Some(last);
                match &reason {
                    None => {
                        d.health.reset_failures = 0;
                        if d.health.state != Health::Quarantined || trigger == Trigger::Explicit {
                            d.health.state = Health::Ok;
                            d.health.reason = None;
                        }
                    }
                    Some(reason) => {
                        d.health.reset_failures += 1;
                        apply_failure(d, reason, all_ones, quarantine_after);
                    }
                }
            })
            .await?
            .unwrap_or_else(|| record.clone());
        match &outcome {
            Ok(()) => {
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, duration_ms, "reset {addr} by {} for {caller} in {duration_ms} ms", plan.methods.join(" "));
                ctx.publish(
                    ctx.event(EventKind::Reset, &device)
                        .detail(format!("{} in {duration_ms} ms", plan.methods.join(" "))),
                );
            }
            Err(e) => {
                tracing::error!(uid = caller.uid, pid = caller.pid, device = %addr, error = %e, "reset of {addr} failed for {caller}: {e}");
                ctx.publish(
                    ctx.event(EventKind::ResetFailed, &device)
                        .detail(e.to_string()),
                );
            }
        }
        self.publish_health_change(health_before, Some(&device));
        outcome.map(|()| ResetOutcome { device, plan })
    }

    /// The checks after a reset the kernel reported done, for every
    /// function in its scope. An idle function on vfio-pci sits in D3hot
    /// under runtime power management, before and after; that is fine.
    fn verify_after_reset(
        &self,
        device: PciAddress,
        method: &str,
        before: &[(PciAddress, Option<String>)],
    ) -> Result<(), CoreError> {
        let sysfs = self.sysfs();
        let fail = |function, check, detail: String| {
            Err(CoreError::ResetVerifyFailed(Box::new(ResetVerifyFailure {
                device,
                method: method.to_owned(),
                function,
                check,
                detail,
            })))
        };
        for (f, driver) in before {
            match sysfs.config_vendor_id(f) {
                Ok(0xffff) => {
                    return fail(
                        *f,
                        ResetCheck::ConfigSpace,
                        "vendor ID reads 0xffff: the function does not answer".into(),
                    )
                }
                Err(e) => return fail(*f, ResetCheck::ConfigSpace, e.to_string()),
                Ok(_) => {}
            }
            if let Some(state) = sysfs.power_state(f) {
                if state == "D3cold" || state == "error" {
                    return fail(
                        *f,
                        ResetCheck::PowerState,
                        format!("power_state is {state}"),
                    );
                }
            }
            let now = sysfs.driver(f);
            if now != *driver {
                return fail(
                    *f,
                    ResetCheck::Driver,
                    format!(
                        "bound to {} before the reset, to {} after",
                        crate::engine::show(driver),
                        crate::engine::show(&now)
                    ),
                );
            }
        }
        Ok(())
    }

    /// `update_device` for a change that may move the device's health: the
    /// health before is read in the same commit, and a change is logged and
    /// published.
    async fn update_health(
        &self,
        addr: PciAddress,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>, CoreError> {
        let mut before = None;
        let updated = self
            .update_device(addr, |d| {
                before = Some(d.health.state);
                change(d);
            })
            .await?;
        self.publish_health_change(before, updated.as_ref());
        Ok(updated)
    }

    pub(super) fn publish_health_change(
        &self,
        before: Option<Health>,
        after: Option<&DeviceRecord>,
    ) {
        let Some(d) = after else { return };
        if before == Some(d.health.state) {
            return;
        }
        let detail = match &d.health.reason {
            Some(r) => format!("{}: {r}", d.health.state.as_str()),
            None => d.health.state.as_str().to_owned(),
        };
        tracing::warn!(device = %d.pci_address, health = d.health.state.as_str(), "health of {} is now {detail}", d.pci_address);
        self.events
            .publish(device_event(EventKind::HealthChanged, d).detail(detail));
    }

    /// The release reset (`reset_on_release = "auto"`), after a detach or
    /// before giving back a device vfiod bound (group lock held). The
    /// device is marked `needs_reset` first, so that if the reset fails, or
    /// vfiod stops meanwhile, its next attach resets it. A failure does not
    /// fail the release: it is recorded in `health` and published.
    pub(super) async fn reset_on_release(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        why: &str,
    ) -> DeviceRecord {
        let addr = record.pci_address;
        if !self.options.reset_on_release || !record.present || !self.options.privileged {
            return record.clone();
        }
        if self.sysfs().reset_methods(&addr).is_empty() {
            tracing::info!(device = %addr, "the kernel offers no reset method for {addr}; not reset on release");
            return record.clone();
        }
        let marked_why = why.to_owned();
        let marked = match self
            .update_health(addr, |d| {
                if d.health.state == Health::Ok {
                    d.health.state = Health::NeedsReset;
                    d.health.reason = Some(format!("released ({marked_why}) and not reset yet"));
                }
            })
            .await
        {
            Ok(Some(d)) => d,
            Ok(None) => return record.clone(),
            Err(e) => {
                tracing::error!(device = %addr, error = %e, "could not record the release");
                return record.clone();
            }
        };
        match self
            .reset_locked(ctx, &marked, ResetRequest::default(), Trigger::Release)
            .await
        {
            Ok(outcome) => outcome.device,
            Err(e) => {
                tracing::warn!(device = %addr, error = %e, "reset on release failed; the device is reset again before its next attach");
                // A refusal before any write is not recorded by the reset
                // itself: say in the health reason why it was not reset.
                let refused = matches!(
                    e,
                    CoreError::ResetScopeConflict { .. }
                        | CoreError::ResetMethodUnsupported(_)
                        | CoreError::HolderScan(_)
                );
                if refused {
                    let reason = format!("released ({why}) and not reset: {e}");
                    let _ = self
                        .update_device(addr, |d| {
                            if d.health.state == Health::NeedsReset {
                                d.health.reason = Some(reason);
                            }
                        })
                        .await;
                }
                self.snapshot()
                    .get_by_address(&addr)
                    .cloned()
                    .unwrap_or(marked)
            }
        }
    }

    /// Before an attach (group lock held, device on vfio): a device whose
    /// last release was not followed by a successful reset is reset now,
    /// and the attach fails if that fails.
    pub(super) async fn reset_before_attach(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
    ) -> Result<(), CoreError> {
        if record.health.state != Health::NeedsReset || !self.options.privileged {
            return Ok(());
        }
        self.reset_locked(ctx, record, ResetRequest::default(), Trigger::BeforeAttach)
            .await
            .map(|_| ())
    }

    /// Settles a reset whose write timed out (after it returned, or at the
    /// next start): puts `reset_method` back, and since nobody knows how
    /// the reset went, leaves the device `needs_reset` (or
    /// `needs_host_reboot` if config space reads all ones).
    pub(super) async fn settle_reset(&self, record: &DeviceRecord, restore: Option<String>) {
        let addr = record.pci_address;
        if let Some(previous) = restore {
            if let Err(e) = self.engine.restore_reset_method(addr, &previous).await {
                tracing::error!(device = %addr, error = %e, "could not put reset_method back after a stuck reset");
            }
        }
        let all_ones = matches!(self.sysfs().config_vendor_id(&addr), Ok(0xffff));
        let current = self.sysfs().driver(&addr);
        let updated = self
            .update_health(addr, |d| {
                d.pending = None;
                d.current_driver = current;
                if all_ones {
                    d.health.state = Health::NeedsHostReboot;
                    d.health.reason =
                        Some("config space reads all ones after a reset that hung".into());
                } else if d.health.state != Health::Quarantined {
                    d.health.state = Health::NeedsReset;
                    d.health.reason = Some(
                        "a reset did not return within the time limit and finished later; its outcome is unknown".into(),
                    );
                }
            })
            .await;
        if let Err(e) = updated {
            tracing::error!(device = %addr, error = %e, "could not record how a stuck reset ended");
        }
    }
}
