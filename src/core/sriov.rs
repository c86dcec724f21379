//! SR-IOV: a PF's declared VF count, and its VFs as registered devices.
//!
//! One operation makes the kernel's VFs equal what is declared
//! ([`Core::converge_vfs`]): `PUT .../sriov` runs it with a new count,
//! vfiod runs it by itself at startup, when a PF is plugged in again, and
//! when a stuck count write returns. It runs one way:
//! 1. check: the count fits `sriov_totalvfs`, the PF's driver can make VFs,
//!    and, when the count changes, no VF is in use (a change goes through
//!    0 and destroys them all; the kernel does not undo a half-done 0);
//! 2. record the intent: the desired count and the PF's autoprobe value
//!    before vfiod touches it, on disk before any write;
//! 3. write 0 (the kernel answers EBUSY to N to M), autoprobe 0 (so no
//!    host driver probes a new VF), then N;
//! 4. register the kernel's VFs and drop the records of VFs that are gone
//!    (a VF's record lives exactly as long as the VF);
//! 5. bind each VF straight to vfio-pci (`vf_driver`), as any bind.
//!
//! A crash anywhere restarts into step 1 with the recorded count: the
//! count is the intent, so the next start finishes it.
//!
//! Locks: the PF's group lock for the whole operation; the groups of its
//! VFs while they are checked and destroyed; each VF's group while it is
//! bound. Always PF first, then VFs in address order.

use std::collections::BTreeSet;

use super::operation::{OpContext, Outcome};
use super::{BindRequest, Core, LockKey, SriovRequest, SriovStatus, VfStatus};
use crate::engine::EngineError;
use crate::error::CoreError;
use crate::events::{Event, EventKind};
use crate::pci::holders::Disposition;
use crate::pci::{is_vfio_driver, PciAddress, SriovState, VFIO_PCI};
use crate::registry::{DeviceRecord, SriovConfig, VfDriver, VirtualFunction};

const ENOENT: i32 = 2;
/// NVIDIA's driver, the VFIO provider of its vGPU VFs.
const NVIDIA: &str = crate::pci::vgpu::NVIDIA_DRIVER;
const ERANGE: i32 = 34;

impl Core {
    /// `GET /devices/{id_or_name}/sriov`.
    pub async fn sriov_status(&self, id_or_name: &str) -> Result<SriovStatus, CoreError> {
        let pf = self.resolve(id_or_name)?;
        let state = self.read_sriov(&pf).await?;
        Ok(self.status_of(&pf, &state, Vec::new()))
    }

    /// The PF's SR-IOV attributes, read off the runtime.
    async fn read_sriov(&self, pf: &DeviceRecord) -> Result<SriovState, CoreError> {
        if let Some(vf) = &pf.vf {
            return Err(CoreError::SriovUnsupported(format!(
                "{} is VF {} of {}: a VF cannot have VFs",
                pf.name, vf.index, vf.parent_address
            )));
        }
        let sysfs = self.sysfs().clone();
        let addr = pf.pci_address;
        let state =
            tokio::task::spawn_blocking(move || (sysfs.is_present(&addr), sysfs.sriov(&addr)))
                .await
                .map_err(|e| CoreError::Internal(format!("sriov read: {e}")))?;
        match state {
            (false, _) => Err(CoreError::NotPresent(addr)),
            (true, None) => Err(CoreError::SriovUnsupported(format!(
                "{} ({addr}) is not an SR-IOV physical function: it has no sriov_totalvfs",
                pf.name
            ))),
            (true, Some(state)) => Ok(state),
        }
    }

    fn status_of(
        &self,
        pf: &DeviceRecord,
        state: &SriovState,
        warnings: Vec<String>,
    ) -> SriovStatus {
        let registry = self.snapshot();
        let vfs = state
            .vfs
            .iter()
            .enumerate()
            .map(|(index, addr)| {
                let record = registry.get_by_address(addr);
                VfStatus {
                    index: index as u32,
                    pci_address: *addr,
                    id: record.map(|r| r.id.clone()),
                    name: record.map(|r| r.name.clone()),
                    driver: self.sysfs().driver(addr),
                    error: None,
                }
            })
            .collect();
        let config = pf.sriov.as_ref();
        SriovStatus {
            id: pf.id.clone(),
            name: pf.name.clone(),
            pci_address: pf.pci_address,
            total_vfs: state.total_vfs,
            num_vfs: state.num_vfs(),
            desired_vfs: config.map(|c| c.desired_vfs),
            vf_device_id: state.vf_device_id.map(|d| format!("{d:04x}")),
            vf_driver: config.map(|c| c.vf_driver).unwrap_or_default(),
            drivers_autoprobe: state.drivers_autoprobe,
            vfs,
            warnings,
        }
    }

    /// Why the PF's driver cannot make VFs now, if it cannot (the kernel's
    /// ENOENT, said before the write).
    fn sriov_blocker(&self, pf: &DeviceRecord) -> Option<String> {
        match self.sysfs().driver(&pf.pci_address) {
            None => Some(format!(
                "{} has no driver, and only a PF's driver can make VFs; bind it to its driver first",
                pf.name
            )),
            Some(d) if d == VFIO_PCI && !self.sysfs().vfio_pci_enables_sriov() => Some(format!(
                "{} is on vfio-pci, which makes VFs only when loaded with enable_sriov=1",
                pf.name
            )),
            Some(_) => None,
        }
    }

    /// The VFs among `vfs` that a count change would take from someone,
    /// each with how: attached, a write stuck or unfinished, or held (the
    /// holder scan).
    pub(super) async fn vfs_in_use(
        &self,
        vfs: &[PciAddress],
    ) -> Result<Vec<(PciAddress, String)>, CoreError> {
        let registry = self.snapshot();
        let mut in_use: Vec<(PciAddress, String)> = Vec::new();
        for addr in vfs {
            let Some(record) = registry.get_by_address(addr) else {
                continue;
            };
            if let Some(instance) = record.attached_to() {
                in_use.push((*addr, format!("attached to instance {instance:?}")));
            } else if record.stuck {
                in_use.push((*addr, "a sysfs write is stuck in the kernel".into()));
            } else if record.pending.is_some() {
                in_use.push((*addr, "an operation on it is unfinished".into()));
            }
        }
        let held = self.scan_holders(vfs.to_vec()).await?;
        for h in held {
            if h.disposition() == Disposition::PlanStep {
                continue;
            }
            let addr = h.pci_address();
            if !in_use.iter().any(|(a, _)| *a == addr) {
                in_use.push((addr, h.to_string()));
            }
        }
        in_use.sort();
        Ok(in_use)
    }

    /// What a delete, bind, unbind or reset may not do to SR-IOV:
    /// - a VF's record follows its PF's count, so it is not deleted by
    ///   itself;
    /// - a PF whose VFs are in use is not taken from its driver, reset or
    ///   deleted under them;
    /// - a PF with VFs, or with a count vfiod keeps, is not bound to vfio:
    ///   its driver leaving tears the VFs down, and vfio-pci cannot make
    ///   them again.
    pub(super) async fn ensure_vfs_undisturbed(
        &self,
        record: &DeviceRecord,
        op: super::OpKind,
    ) -> Result<(), CoreError> {
        if let Some(vf) = &record.vf {
            if op == super::OpKind::Delete {
                return Err(CoreError::Conflict(format!(
                    "{} is VF {} of {}: VF records follow the PF's VF count; change it with PUT /devices/{}/sriov",
                    record.name, vf.index, vf.parent_address, vf.parent_id
                )));
            }
            return Ok(());
        }
        let vfs = self.sysfs().virtfns(&record.pci_address);
        let declared = record.sriov.as_ref().map(|c| c.desired_vfs).unwrap_or(0);
        if op == super::OpKind::Bind && (!vfs.is_empty() || declared > 0) {
            let why = format!(
                "binding the PF to vfio tears down its VFs and vfiod keeps {declared} on it; set its VF count to 0 first"
            );
            return Err(CoreError::PfHasVfs {
                pf: record.name.clone(),
                vfs: vfs.into_iter().map(|a| (a, why.clone())).collect(),
            });
        }
        if vfs.is_empty() {
            return Ok(());
        }
        let in_use = self.vfs_in_use(&vfs).await?;
        if in_use.is_empty() {
            return Ok(());
        }
        Err(CoreError::PfHasVfs {
            pf: record.name.clone(),
            vfs: in_use,
        })
    }

    /// Locks the groups of `vfs` that are not the PF's own (whose lock the
    /// operation holds), in address order.
    async fn lock_vf_groups(
        &self,
        pf: &DeviceRecord,
        vfs: &[PciAddress],
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let own = Self::lock_key(pf);
        let keys: BTreeSet<(PciAddress, LockKey)> = vfs
            .iter()
            .map(|a| {
                let key = match self.sysfs().iommu_group(a) {
                    Some(g) => LockKey::Group(g),
                    None => LockKey::Device(*a),
                };
                (*a, key)
            })
            .filter(|(_, k)| *k != own)
            .collect();
        let mut seen = Vec::new();
        let mut guards = Vec::new();
        for (_, key) in keys {
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            guards.push(self.op_lock(key).lock_owned().await);
        }
        guards
    }

    /// Maps a failed count or autoprobe write to what the caller is told,
    /// marking the PF stuck if the kernel did not return.
    async fn sriov_write_failed(
        &self,
        ctx: &OpContext<'_>,
        pf: &DeviceRecord,
        total: u32,
        requested: u32,
        error: EngineError,
    ) -> CoreError {
        match error.errno() {
            Some(ERANGE) => {
                return CoreError::InvalidVfCount {
                    device: pf.name.clone(),
                    requested,
                    total,
                }
            }
            Some(ENOENT) => {
                return CoreError::SriovUnsupported(format!(
                    "the kernel refused to make VFs on {} (ENOENT: its driver {} cannot make VFs)",
                    pf.name,
                    self.sysfs()
                        .driver(&pf.pci_address)
                        .as_deref()
                        .unwrap_or("none")
                ))
            }
            _ => {}
        }
        self.record_failed_move(ctx, pf, super::OpKind::SetVfs, error, None, |_| {})
            .await
    }

    /// The operation behind `PUT .../sriov` (`target` set) and vfiod's own
    /// re-making of a declared count (`target` `None`); see the module
    /// docs. The PF's group lock is held.
    pub(super) async fn converge_vfs(
        &self,
        ctx: &OpContext<'_>,
        pf: &DeviceRecord,
        target: Option<SriovRequest>,
    ) -> Result<Outcome, CoreError> {
        let own = target.is_none();
        let addr = pf.pci_address;
        let state = match self.read_sriov(pf).await {
            Ok(state) => state,
            // vfiod's own pass over a PF that is gone or no longer SR-IOV.
            Err(_) if own => return Ok(Outcome::Nothing),
            Err(e) => return Err(e),
        };
        let recorded = pf.sriov.clone();
        // The VFs of a PF on the nvidia driver are their own VFIO providers
        // (vGPU): vfio-pci refuses them, so by default they get theirs.
        let default_driver = match self.sysfs().driver(&pf.pci_address).as_deref() {
            Some(NVIDIA) => VfDriver::Native,
            _ => VfDriver::VfioPci,
        };
        let (wanted, vf_driver) = match (target, &recorded) {
            (Some(req), r) => (
                req.num_vfs,
                req.vf_driver
                    .or(r.as_ref().map(|c| c.vf_driver))
                    .unwrap_or(default_driver),
            ),
            (None, Some(c)) => (c.desired_vfs, c.vf_driver),
            (None, None) => return Ok(Outcome::Nothing),
        };
        if wanted > state.total_vfs {
            return Err(CoreError::InvalidVfCount {
                device: pf.name.clone(),
                requested: wanted,
                total: state.total_vfs,
            });
        }
        let enabled = state.num_vfs();
        // vfiod's own pass makes the count again where the kernel has no
        // VFs (a reboot, a re-plug, a crash after the write of 0) and
        // lowers one a crash left too high; it leaves a count the driver
        // gave short of the one asked for: asking again would only destroy
        // and make the same VFs, over and over.
        let change = enabled != wanted && !(own && enabled > 0 && enabled < wanted);
        if change && wanted > 0 {
            if let Some(why) = self.sriov_blocker(pf) {
                return Err(CoreError::SriovUnsupported(why));
            }
        }
        let mut vf_guards = Vec::new();
        if change && enabled > 0 {
            // Going through 0 destroys every VF: checked under their locks,
            // held until they are gone.
            vf_guards = self.lock_vf_groups(pf, &state.vfs).await;
            let in_use = self.vfs_in_use(&state.vfs).await?;
            if !in_use.is_empty() {
                let err = CoreError::VfsInUse {
                    pf: pf.name.clone(),
                    vfs: in_use,
                };
                if own {
                    tracing::warn!(device = %addr, error = %err, "not making the declared VF count: VFs are in use");
                }
                return Err(err);
            }
        }
        let autoprobe_on = state.drivers_autoprobe == Some(true);
        let saved_autoprobe = recorded
            .as_ref()
            .and_then(|c| c.saved_autoprobe)
            .or_else(|| {
                (change && wanted > 0 && vf_driver != VfDriver::Native && autoprobe_on)
                    .then_some(true)
            });
        let config = SriovConfig {
            desired_vfs: wanted,
            vf_driver,
            saved_autoprobe,
        };
        let writes_needed = change || (wanted == 0 && saved_autoprobe.is_some());
        if writes_needed {
            self.require_privileged()?;
        }
        // The intent, on disk before any write.
        let mut pf = pf.clone();
        if recorded.as_ref() != Some(&config) {
            let c = config.clone();
            pf = self
                .update_device(addr, |d| d.sriov = Some(c))
                .await?
                .unwrap_or(pf);
        }
        let caller = ctx.caller;
        if change {
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, from = enabled, to = wanted, vf_driver = vf_driver.as_str(), "changing the VF count of {addr} from {enabled} to {wanted} for {caller}");
        }
        let written = self
            .write_count(
                ctx,
                &pf,
                &state,
                CountChange {
                    change,
                    wanted,
                    vf_driver,
                },
                vf_guards,
            )
            .await;
        let (pf, mut warnings) = match written {
            Ok(done) => done,
            Err(e) => {
                let stuck = matches!(&e, CoreError::DriverMoveFailed(f) if f.error.is_timeout());
                if self.sysfs().virtfns(&addr).len() as u32 == wanted && wanted != enabled {
                    // The kernel has the new count: what failed after it
                    // (the autoprobe put back, a record) is finished by a
                    // pass of vfiod's own, not undone.
                    self.converge_later(addr);
                } else if !own && !stuck {
                    self.undo_count_change(ctx, addr, recorded).await;
                }
                return Err(e);
            }
        };
        let records_changed = self.sync_vf_records(ctx, &pf).await?;
        if vf_driver == VfDriver::VfioPci {
            warnings.extend(self.bind_vfs(ctx, &pf).await);
        }
        let state = self.read_sriov(&pf).await?;
        if change || records_changed {
            let detail = format!(
                "desired {wanted}, enabled {}, vf_driver {}",
                state.num_vfs(),
                vf_driver.as_str()
            );
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, desired = wanted, enabled = state.num_vfs(), "VFs of {addr} ({}): {detail}", pf.name);
            ctx.publish(ctx.event(EventKind::SriovChanged, &pf).detail(detail));
        }
        Ok(Outcome::Sriov(self.status_of(&pf, &state, warnings)))
    }

    /// The writes of a count change (see the module docs, step 3), then
    /// the PF's record as they left it and what did not go as asked.
    async fn write_count(
        &self,
        ctx: &OpContext<'_>,
        pf: &DeviceRecord,
        state: &SriovState,
        target: CountChange,
        vf_guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
    ) -> Result<(DeviceRecord, Vec<String>), CoreError> {
        let CountChange {
            change,
            wanted,
            vf_driver,
        } = target;
        let addr = pf.pci_address;
        let enabled = state.num_vfs();
        let mut pf = pf.clone();
        let mut warnings = Vec::new();
        if change && enabled > 0 {
            if let Err(e) = self.engine.set_num_vfs(addr, 0).await {
                return Err(self
                    .sriov_write_failed(ctx, &pf, state.total_vfs, 0, e)
                    .await);
            }
            self.sync_vf_records(ctx, &pf).await?;
        }
        drop(vf_guards);
        if change && wanted > 0 {
            let probe_wanted = vf_driver == VfDriver::Native;
            let autoprobe_now = self
                .sysfs()
                .sriov(&addr)
                .and_then(|s| s.drivers_autoprobe)
                .unwrap_or(true);
            if autoprobe_now != probe_wanted {
                if let Err(e) = self.engine.set_sriov_autoprobe(addr, probe_wanted).await {
                    return Err(self
                        .sriov_write_failed(ctx, &pf, state.total_vfs, wanted, e)
                        .await);
                }
            }
            match self.engine.set_num_vfs(addr, wanted).await {
                Ok(made) if made < wanted => warnings.push(format!(
                    "the driver of {} enabled {made} of the {wanted} VFs asked for",
                    pf.name
                )),
                Ok(_) => {}
                Err(e) => {
                    return Err(self
                        .sriov_write_failed(ctx, &pf, state.total_vfs, wanted, e)
                        .await)
                }
            }
        }
        if wanted == 0 {
            pf = self.restore_autoprobe(ctx, &pf, state.total_vfs).await?;
        }
        Ok((pf, warnings))
    }

    /// After a count change that failed before the kernel had the new
    /// count, for a caller: the count recorded before it is put back, and
    /// so is the PF's autoprobe if it has no VFs now; the VF records follow
    /// the kernel. A change from N to M that failed after the write of 0
    /// leaves the PF without VFs until the next start (or PUT) makes its
    /// recorded count again.
    async fn undo_count_change(
        &self,
        ctx: &OpContext<'_>,
        addr: PciAddress,
        recorded: Option<SriovConfig>,
    ) {
        let Some(pf) = self.snapshot().get_by_address(&addr).cloned() else {
            return;
        };
        let saved = pf.sriov.as_ref().and_then(|c| c.saved_autoprobe);
        let kept_saved = recorded.as_ref().and_then(|c| c.saved_autoprobe);
        if self.sysfs().virtfns(&addr).is_empty() && saved.is_some() && kept_saved.is_none() {
            if let Some(saved) = saved {
                if let Err(e) = self.engine.set_sriov_autoprobe(addr, saved).await {
                    tracing::error!(device = %addr, error = %e, "could not put sriov_drivers_autoprobe back after a failed VF count change");
                    return;
                }
            }
        }
        if let Err(e) = self.update_device(addr, |d| d.sriov = recorded).await {
            tracing::error!(device = %addr, error = %e, "could not record the VF count back after a failed change");
        }
        if let Some(pf) = self.snapshot().get_by_address(&addr).cloned() {
            let _ = self.sync_vf_records(ctx, &pf).await;
        }
    }

    /// Puts back the autoprobe value vfiod changed, once the PF has no VFs.
    async fn restore_autoprobe(
        &self,
        ctx: &OpContext<'_>,
        pf: &DeviceRecord,
        total: u32,
    ) -> Result<DeviceRecord, CoreError> {
        let Some(saved) = pf.sriov.as_ref().and_then(|c| c.saved_autoprobe) else {
            return Ok(pf.clone());
        };
        if let Err(e) = self.engine.set_sriov_autoprobe(pf.pci_address, saved).await {
            return Err(self.sriov_write_failed(ctx, pf, total, 0, e).await);
        }
        Ok(self
            .update_device(pf.pci_address, |d| {
                if let Some(c) = &mut d.sriov {
                    c.saved_autoprobe = None;
                }
            })
            .await?
            .unwrap_or_else(|| pf.clone()))
    }

    /// Makes the VF records of `pf` equal its VFs in the kernel: registers
    /// each new VF (named `<pf-name>-vf<N>`, with the PF's tags) and drops
    /// the records of VFs that are gone, in one commit, with an event each.
    /// True if a record changed.
    async fn sync_vf_records(
        &self,
        ctx: &OpContext<'_>,
        pf: &DeviceRecord,
    ) -> Result<bool, CoreError> {
        let sysfs = self.sysfs().clone();
        let pf_addr = pf.pci_address;
        let functions = tokio::task::spawn_blocking(move || {
            sysfs
                .virtfns(&pf_addr)
                .into_iter()
                .filter_map(|a| {
                    let f = sysfs.read_function(&a).ok().flatten()?;
                    Some((sysfs.own_vfio_provider(&a), f))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| CoreError::Internal(format!("VF read: {e}")))?;
        let (added, removed) = self
            .commit_if_changed(|reg| {
                let mut added = Vec::new();
                let mut removed = Vec::new();
                let stale: Vec<PciAddress> = reg
                    .iter()
                    .filter(|d| d.vf.as_ref().is_some_and(|v| v.parent_address == pf_addr))
                    .filter(|d| !functions.iter().any(|(_, f)| f.address == d.pci_address))
                    .map(|d| d.pci_address)
                    .collect();
                for a in stale {
                    removed.extend(reg.remove(&a));
                }
                for (index, (provider, f)) in functions.iter().enumerate() {
                    let vf = VirtualFunction {
                        parent_id: pf.id.clone(),
                        parent_address: pf_addr,
                        index: index as u32,
                    };
                    if let Some(d) = reg.get_mut_by_address(&f.address) {
                        // Registered by hand before vfiod managed the PF,
                        // or a VF record from before a restart.
                        if d.vf.as_ref() != Some(&vf) {
                            d.vf = Some(vf);
                            added.push(d.clone());
                        }
                        continue;
                    }
                    let mut record = DeviceRecord::registered(
                        cuid2::create_id(),
                        vf_name(&pf.name, index as u32, reg),
                        f,
                        pf.tags.clone(),
                    );
                    record.vf = Some(vf);
                    record.note_vfio_provider(provider.clone());
                    reg.insert(record.clone())
                        .map_err(|e| CoreError::Conflict(e.to_string()))?;
                    added.push(record);
                }
                let changed = !added.is_empty() || !removed.is_empty();
                Ok(((added, removed), changed))
            })
            .await?;
        for d in &removed {
            tracing::info!(device = %d.pci_address, id = %d.id, pf = %pf_addr, "VF {} of {} is gone; its record too", d.name, pf.name);
            ctx.publish(
                ctx.event(EventKind::Unregistered, d)
                    .detail(format!("VF of {} removed", pf.name)),
            );
        }
        for d in &added {
            tracing::info!(device = %d.pci_address, id = %d.id, pf = %pf_addr, "registered VF {} of {}", d.name, pf.name);
            ctx.publish(
                ctx.event(EventKind::Registered, d)
                    .detail(format!("VF of {}", pf.name)),
            );
        }
        Ok(!added.is_empty() || !removed.is_empty())
    }

    /// Binds each VF of `pf` that is not on vfio yet, as a bind of its
    /// own (each under its group's lock); a VF that cannot go is left
    /// where it is and named in the warnings returned.
    async fn bind_vfs(&self, ctx: &OpContext<'_>, pf: &DeviceRecord) -> Vec<String> {
        let own = Self::lock_key(pf);
        let vfs: Vec<DeviceRecord> = self
            .snapshot()
            .iter()
            .filter(|d| {
                d.vf.as_ref()
                    .is_some_and(|v| v.parent_address == pf.pci_address)
            })
            .cloned()
            .collect();
        let mut warnings = Vec::new();
        for vf in vfs {
            let key = Self::lock_key(&vf);
            let _guard = if key == own {
                None
            } else {
                Some(self.op_lock(key).lock_owned().await)
            };
            let Some(vf) = self.snapshot().get_by_address(&vf.pci_address).cloned() else {
                continue;
            };
            if vf.bound_to_vfio()
                || vf.stuck
                || vf.attachment.is_some()
                || self
                    .sysfs()
                    .driver(&vf.pci_address)
                    .as_deref()
                    .is_some_and(is_vfio_driver)
            {
                continue;
            }
            match self.apply_bind(ctx, &vf, BindRequest::default()).await {
                // vfio-pci is where `vf_driver` says the VF belongs, as a
                // device found on vfio at registration: a release (a
                // detach, a claim's end) leaves it there, ready for the
                // next VM, instead of giving it back to no driver.
                Ok(_) => {
                    let _ = self
                        .update_device(vf.pci_address, |d| {
                            d.binding = None;
                            d.original_driver = None;
                        })
                        .await;
                }
                Err(e) => {
                    tracing::warn!(device = %vf.pci_address, error = %e, "VF {} left off vfio: {e}", vf.name);
                    warnings.push(format!(
                        "{} ({}) is not on vfio: {e}",
                        vf.name, vf.pci_address
                    ));
                }
            }
        }
        warnings
    }

    /// A VF is gone from the bus (its PF's count was lowered, or the PF
    /// was unplugged): its record goes too.
    pub(super) async fn forget_vf(&self, addr: PciAddress) -> Option<DeviceRecord> {
        // A uevent is history: a VF removed and made again since (a count
        // change goes through 0) is on the bus now, and its record stays.
        if self.sysfs().is_present(&addr) {
            return None;
        }
        let removed = self
            .commit_if_changed(|reg| {
                let is_vf = reg.get_by_address(&addr).is_some_and(|d| d.vf.is_some());
                Ok(if is_vf {
                    (reg.remove(&addr), true)
                } else {
                    (None, false)
                })
            })
            .await
            .ok()
            .flatten()?;
        tracing::info!(device = %addr, id = %removed.id, "VF {} left the bus; its record is dropped", removed.name);
        self.events.publish(
            Event::new(
                EventKind::Unregistered,
                Some(addr),
                Some(removed.id.clone()),
            )
            .detail("VF removed from the bus".to_string()),
        );
        Some(removed)
    }

    /// Asks for vfiod's own pass over `pf`'s VFs, once per PF however many
    /// uevents ask for it meanwhile.
    pub(super) fn converge_later(&self, pf: PciAddress) {
        let mut queued = self
            .vf_passes_queued
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if queued.insert(pf) {
            self.execute_in_background(super::Operation::ConvergeVfs { address: pf });
        }
    }

    /// Marks a queued pass over `pf` as started.
    pub(super) fn converge_started(&self, pf: &PciAddress) {
        self.vf_passes_queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pf);
    }
}

/// What a pass over a PF's VFs is to write.
struct CountChange {
    /// Whether the count is written at all.
    change: bool,
    /// The count wanted.
    wanted: u32,
    /// What new VFs are given.
    vf_driver: VfDriver,
}

/// `<pf-name>-vf<N>`, or with a suffix if another device has that name; the
/// PF's part is cut so that the whole stays within the name limit.
fn vf_name(pf_name: &str, index: u32, reg: &crate::registry::Registry) -> String {
    let suffix = format!("-vf{index}");
    let keep = super::MAX_NAME.saturating_sub(suffix.len() + 5);
    let base: String = pf_name.chars().take(keep).collect();
    let name = format!("{base}{suffix}");
    if reg.resolve(&name).is_none() {
        return name;
    }
    (2..)
        .map(|n| format!("{name}-{n}"))
        .find(|n| reg.resolve(n).is_none())
        .expect("some suffix is free")
}
