//! Startup reconcile and hotplug: bringing the registry in line with the bus, and putting returning devices back on vfio.

use std::collections::HashMap;

use super::operation::{device_event, OpContext, Operation, Outcome};
use super::reset::apply_config_space;
use super::{BindRequest, Caller, Core};
use crate::error::CoreError;
use crate::events::{Event, EventKind};
use crate::pci::{is_vfio_driver, PciAddress};
use crate::registry::DeviceRecord;

/// Passes of [`Core::resync_later`], 100 ms apart more each time.
const RESYNC_ATTEMPTS: u64 = 10;

/// What a hotplug or driver uevent says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotplugEvent {
    /// A function appeared: rescan it, and put a returning registered device
    /// back on vfio.
    Add(PciAddress),
    /// A function went away: its record stays, marked not present.
    Remove(PciAddress),
    /// A driver took a function.
    Bind {
        /// The function bound.
        address: PciAddress,
        /// The uevent's `DRIVER`; `None` if it had none (then sysfs is read).
        driver: Option<String>,
    },
    /// A function lost its driver.
    Unbind(PciAddress),
    /// Attributes changed (e.g. after a driver reload): handled like `Add`, a
    /// rescan of the function.
    Change(PciAddress),
}

impl HotplugEvent {
    /// The kernel's name for the uevent action.
    pub fn action(&self) -> &'static str {
        match self {
            HotplugEvent::Add(_) => "add",
            HotplugEvent::Remove(_) => "remove",
            HotplugEvent::Bind { .. } => "bind",
            HotplugEvent::Unbind(_) => "unbind",
            HotplugEvent::Change(_) => "change",
        }
    }
}

impl Core {
    /// Brings the registry in line with the bus: presence and drivers,
    /// health from config space, unfinished operations, and devices that
    /// should be on vfio but are not (after a reboot). Never unbinds a
    /// device from vfio.
    ///
    /// One pass, one commit: the bus and every registered device's config
    /// space are read first (off the runtime), then applied to the registry
    /// in one change, so startup costs one registry copy and one save
    /// whatever the number of devices.
    pub async fn reconcile(&self) -> Result<(), CoreError> {
        let sysfs = self.sysfs().clone();
        let registered: Vec<PciAddress> = self.snapshot().iter().map(|d| d.pci_address).collect();
        let (bus, config, providers) = tokio::task::spawn_blocking(move || {
            let bus = sysfs.scan()?;
            // No config attribute to read: nothing to conclude.
            let present: Vec<PciAddress> = registered
                .into_iter()
                .filter(|a| bus.contains_key(a))
                .collect();
            let config: HashMap<PciAddress, u16> = crate::pci::sysfs::per_function(&present, |a| {
                sysfs.config_vendor_id(a).ok().map(|v| (*a, v))
            })
            .into_iter()
            .collect();
            let providers: HashMap<PciAddress, String> = present
                .iter()
                .filter_map(|a| Some((*a, sysfs.own_vfio_provider(a)?)))
                .collect();
            Ok::<_, crate::pci::SysfsError>((bus, config, providers))
        })
        .await
        .map_err(|e| CoreError::Internal(format!("scan: {e}")))?
        .map_err(|e| CoreError::Internal(e.to_string()))?;
        let (changed, gone_vfs) = self
            .commit_if_changed(|reg| {
                let mut changed = Vec::new();
                let mut gone_vfs = Vec::new();
                let addrs: Vec<PciAddress> = reg.iter().map(|d| d.pci_address).collect();
                for addr in addrs {
                    let d = reg.get_mut_by_address(&addr).expect("listed");
                    let before = d.clone();
                    match bus.get(&addr) {
                        Some(f) => {
                            d.present = true;
                            d.current_driver = f.driver.clone();
                            d.note_vfio_provider(providers.get(&addr).cloned());
                            d.iommu_group = f.iommu_group;
                            d.stuck = false;
                            d.identity_mismatch = !d.is_same_device(f);
                            if let Some(&vendor) = config.get(&addr) {
                                apply_config_space(d, vendor, "at startup");
                            }
                        }
                        None => {
                            d.present = false;
                            d.current_driver = None;
                            d.stuck = false;
                        }
                    }
                    if d.vf.is_some() && !d.present {
                        // A VF lives as long as its PF's count: gone after
                        // a reboot, made again below.
                        gone_vfs.extend(reg.remove(&addr));
                        continue;
                    }
                    if *d != before {
                        changed.push((before.health.state, d.clone()));
                    }
                }
                let any = !changed.is_empty() || !gone_vfs.is_empty();
                Ok(((changed, gone_vfs), any))
            })
            .await?;
        for d in &gone_vfs {
            tracing::info!(device = %d.pci_address, id = %d.id, "VF {} is not on the bus; its record is dropped", d.name);
            self.events.publish(
                device_event(EventKind::Unregistered, d)
                    .detail("VF not on the bus at startup".to_string()),
            );
        }
        for (health_before, d) in &changed {
            tracing::info!(device = %d.pci_address, present = d.present, driver = ?d.current_driver, "reconciled with the bus");
            self.publish_health_change(Some(*health_before), Some(d));
        }
        self.drop_unfinished_claims().await;
        // Only devices with an operation to finish or a binding to
        // restore need more than that pass.
        let unfinished: Vec<PciAddress> = self
            .snapshot()
            .iter()
            .filter(|d| d.pending.is_some() || (self.wants_vfio(d) && !d.bound_to_vfio()))
            .map(|d| d.pci_address)
            .collect();
        for address in unfinished {
            if self
                .snapshot()
                .get_by_address(&address)
                .is_some_and(|d| d.pending.is_some())
            {
                self.run_own(Operation::Settle { address }).await;
            }
            // Settling (a reset, say) does not put a device back on vfio;
            // whatever it left, a device vfiod holds goes back there.
            let Some(record) = self.snapshot().get_by_address(&address).cloned() else {
                continue;
            };
            if record.pending.is_none() && self.wants_vfio(&record) && !record.bound_to_vfio() {
                self.run_own(Operation::Rebind { address }).await;
            }
        }
        // PFs with a declared VF count: made again after a reboot, and
        // their VFs registered and bound.
        let managed: Vec<PciAddress> = self
            .snapshot()
            .iter()
            .filter(|d| d.present && d.sriov.is_some())
            .map(|d| d.pci_address)
            .collect();
        for address in managed {
            self.run_own(Operation::ConvergeVfs { address }).await;
        }
        self.resume_attachments().await;
        self.resume_mdevs().await;
        Ok(())
    }

    /// After a commit failed: in the background, brings every device's
    /// record back in line with the bus as a restart would (presence,
    /// driver, an operation left pending, a device vfiod holds put back on
    /// vfio), each under its group's lock, until a pass records all of it
    /// (about 6 s of tries; after that the next start does it).
    pub(super) fn resync_later(&self) {
        use std::sync::atomic::Ordering;
        let Some(core) = self.me.upgrade() else {
            return;
        };
        if self.resync_scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        self.operations.spawn(async move {
            for attempt in 1..=RESYNC_ATTEMPTS {
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                if core.resync().await {
                    tracing::info!(
                        attempt,
                        "the registry is in line with the bus again after a failed commit"
                    );
                    break;
                }
            }
            core.resync_scheduled.store(false, Ordering::SeqCst);
        });
    }

    /// One pass of [`Core::resync_later`]; true if nothing is left to do.
    async fn resync(&self) -> bool {
        let mut done = true;
        let addrs: Vec<PciAddress> = self.snapshot().iter().map(|d| d.pci_address).collect();
        for addr in addrs {
            let Some(record) = self.snapshot().get_by_address(&addr).cloned() else {
                continue;
            };
            let lock = self.op_lock(Self::lock_key(&record));
            let group = lock.lock().await;
            let Some(record) = self.snapshot().get_by_address(&addr).cloned() else {
                continue;
            };
            if record.stuck {
                // The stuck write's return settles it.
                continue;
            }
            let present = self.sysfs().is_present(&addr);
            let driver = self.sysfs().driver(&addr);
            let Ok(Some(record)) = self
                .update_device(addr, |d| {
                    d.present = present;
                    d.current_driver = driver.clone();
                })
                .await
            else {
                done = false;
                continue;
            };
            drop(group);
            if record.pending.is_some() {
                self.run_own(Operation::Settle { address: addr }).await;
            }
            let Some(record) = self.snapshot().get_by_address(&addr).cloned() else {
                continue;
            };
            if record.pending.is_some() && record.present {
                done = false;
            } else if record.pending.is_none()
                && self.wants_vfio(&record)
                && !record.bound_to_vfio()
            {
                self.run_own(Operation::Rebind { address: addr }).await;
            }
        }
        done
    }

    pub(super) fn wants_vfio(&self, record: &DeviceRecord) -> bool {
        record.present
            && !record.identity_mismatch
            && (record.bound_by_vfiod() || record.attached_to().is_some())
    }

    /// Runs one of vfiod's own operations at startup and waits for it; a
    /// failure is logged by the executor and left for the next start.
    async fn run_own(&self, op: Operation) {
        let _ = self.execute(Caller::AGENT, op).await;
    }

    /// The rebind operation: puts a device vfiod holds back on vfio after
    /// it came back (boot, hotplug, a reclaim), with the full checks of a
    /// bind, and gives an attached device's VMM its access back (a
    /// re-plug or a restart may have made the nodes anew).
    pub(super) async fn rebind_device(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
    ) -> Result<Outcome, CoreError> {
        if !self.options.privileged || !self.wants_vfio(record) || record.bound_to_vfio() {
            return Ok(Outcome::Nothing);
        }
        let addr = record.pci_address;
        // Never forced: vfiod's own moves respect every holder.
        let req = BindRequest {
            with_group: !record.companions().is_empty(),
            ..BindRequest::default()
        };
        tracing::info!(device = %addr, "restoring the vfio binding vfiod holds for this device (vfiod's own action: after a restart, a re-plug or a reclaim)");
        let outcome = self.apply_bind(ctx, record, req).await?;
        if let Err(e) = self.apply_grant(&outcome.device).await {
            tracing::error!(device = %addr, error = %e, "could not re-apply the VFIO node grant of the attachment");
        }
        Ok(Outcome::Bound(outcome))
    }

    /// Rebinds in the background so the event loop keeps up with the bus.
    pub(super) fn spawn_rebind(&self, record: DeviceRecord) {
        self.execute_in_background(Operation::Rebind {
            address: record.pci_address,
        });
    }

    /// Applies one uevent to the registry and publishes the matching event;
    /// never fails, a lost event is repaired by the next reconcile.
    pub async fn handle_hotplug(&self, event: HotplugEvent) {
        crate::metrics::record_hotplug(event.action());
        match event {
            HotplugEvent::Remove(addr) => {
                let is_vf = self
                    .snapshot()
                    .get_by_address(&addr)
                    .is_some_and(|d| d.vf.is_some());
                if is_vf {
                    if self.forget_vf(addr).await.is_some() {
                        self.events
                            .publish(Event::new(EventKind::HotplugRemove, Some(addr), None));
                    }
                    return;
                }
                let device = self
                    .update_device(addr, |d| {
                        d.present = false;
                        d.current_driver = None;
                    })
                    .await
                    .ok()
                    .flatten();
                if let Some(d) = &device {
                    tracing::warn!(device = %addr, id = %d.id, attached_to = ?d.attached_to(), "registered device left the bus");
                }
                self.events.publish(Event::new(
                    EventKind::HotplugRemove,
                    Some(addr),
                    device.map(|d| d.id),
                ));
            }
            HotplugEvent::Add(addr) | HotplugEvent::Change(addr) => {
                let Ok(Some(function)) = self.sysfs().read_function(&addr) else {
                    return;
                };
                let is_add = matches!(event, HotplugEvent::Add(_));
                // A re-plugged device's config space is read now and its
                // health recorded in the same commit as its presence.
                let vendor = is_add
                    .then(|| self.sysfs().config_vendor_id(&addr).ok())
                    .flatten();
                let mut health_before = None;
                let device = self
                    .update_device(addr, |d| {
                        health_before = Some(d.health.state);
                        d.present = true;
                        d.current_driver = function.driver.clone();
                        d.iommu_group = function.iommu_group;
                        d.identity_mismatch = !d.is_same_device(&function);
                        if let (Some(vendor), false) = (vendor, d.identity_mismatch) {
                            apply_config_space(d, vendor, "after a re-plug");
                        }
                    })
                    .await
                    .ok()
                    .flatten();
                if is_add {
                    self.events.publish(
                        Event::new(
                            EventKind::HotplugAdd,
                            Some(addr),
                            device.as_ref().map(|d| d.id.clone()),
                        )
                        .driver(function.driver.clone()),
                    );
                }
                let Some(device) = device else {
                    // A VF of a PF whose count vfiod keeps, not registered
                    // yet: the PF's pass registers (and binds) it.
                    if let Some((pf, _)) = self.sysfs().physfn(&addr) {
                        if self
                            .snapshot()
                            .get_by_address(&pf)
                            .is_some_and(|p| p.sriov.is_some())
                        {
                            self.converge_later(pf);
                        }
                    }
                    return;
                };
                self.publish_health_change(health_before, Some(&device));
                if device.identity_mismatch {
                    tracing::error!(device = %addr, expected = format!("{:04x}:{:04x}", device.vendor_id, device.device_id), found = format!("{:04x}:{:04x}", function.vendor_id, function.device_id), "a different device answers at a registered address; leaving it alone");
                    self.events
                        .publish(device_event(EventKind::IdentityMismatch, &device).detail(
                            format!(
                                "found {:04x}:{:04x} subsystem {:04x}:{:04x}",
                                function.vendor_id,
                                function.device_id,
                                function.subsystem_vendor_id,
                                function.subsystem_device_id
                            ),
                        ));
                } else if device.health.state == crate::registry::Health::NeedsHostReboot {
                    tracing::error!(device = %addr, "a registered device came back but its config space reads all ones; leaving it alone until the host reboots");
                } else {
                    if is_add && self.wants_vfio(&device) && !device.bound_to_vfio() {
                        self.spawn_rebind(device.clone());
                    }
                    // A PF plugged in again gets its declared VFs back.
                    if is_add && device.sriov.is_some() {
                        self.converge_later(addr);
                    }
                }
            }
            HotplugEvent::Bind {
                address,
                driver: said,
            } => {
                // A uevent is history: read by the time it is handled, the
                // device may have moved on (vfiod took it to vfio after the
                // kernel's own probe). sysfs says where it is now.
                let driver = self.sysfs().driver(&address);
                if said.is_some() && said != driver {
                    tracing::debug!(device = %address, uevent = ?said, now = ?driver, "a bind uevent older than the device's driver");
                }
                let provider = self.sysfs().own_vfio_provider(&address);
                let device = self
                    .update_device(address, |d| {
                        d.current_driver = driver.clone();
                        d.note_vfio_provider(provider.clone());
                    })
                    .await
                    .ok()
                    .flatten();
                self.events.publish(
                    Event::new(
                        EventKind::DriverBound,
                        Some(address),
                        device.as_ref().map(|d| d.id.clone()),
                    )
                    .driver(driver.clone()),
                );
                if let Some(d) = device {
                    // A parent back on its driver gets its mediated devices
                    // back (a driver reload or re-plug destroyed them).
                    if !d.mdevs.is_empty() && !self.mdevs_converged(&d) {
                        self.execute_in_background(Operation::ConvergeMdevs { address });
                    }
                    let stolen = d.bound_by_vfiod()
                        && d.pending.is_none()
                        && !d.stuck
                        && !driver.as_deref().is_some_and(is_vfio_driver);
                    if stolen {
                        tracing::warn!(device = %address, driver = ?driver, "a device vfiod holds on vfio was bound to another driver by someone else");
                        self.events
                            .publish(device_event(EventKind::DriverStolen, &d).driver(driver));
                        if self.options.reclaim {
                            self.spawn_rebind(d);
                        }
                    }
                }
            }
            HotplugEvent::Unbind(addr) => {
                let driver = self.sysfs().driver(&addr);
                let device = self
                    .update_device(addr, |d| d.current_driver = driver.clone())
                    .await
                    .ok()
                    .flatten();
                self.events.publish(Event::new(
                    EventKind::DriverUnbound,
                    Some(addr),
                    device.map(|d| d.id),
                ));
            }
        }
    }
}
