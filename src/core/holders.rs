//! Before a move: who holds the functions it would take from a driver.
//!
//! Every path that takes a function from a driver (bind and its group
//! companions, unbind, detach and delete through unbind, re-plug and
//! reclaim through bind, settling a recorded move) scans first and writes
//! nothing if anything refuses the move (409 `device_busy`, naming every
//! holder). A framebuffer console is not a refusal: it is taken off the
//! framebuffer as the first step of the bind and put back when the device
//! is given back.

use std::collections::BTreeSet;
use std::time::Instant;

use super::{Caller, Core};
use crate::error::CoreError;
use crate::pci::holders::vtconsole_bind_path;
use crate::pci::holders::{self, Disposition, Holder, HolderScanError, ProcFs};
use crate::pci::{is_vfio_driver, MdevUuid, PciAddress, Sysfs};
use crate::registry::DeviceRecord;

impl Core {
    /// What holds `functions` now. Runs off the runtime and is bounded by
    /// the op timeout: reading a device's attributes blocks while a write
    /// to it is stuck in the kernel.
    pub(super) async fn scan_holders(
        &self,
        functions: Vec<PciAddress>,
    ) -> Result<Vec<Holder>, CoreError> {
        if functions.is_empty() {
            return Ok(Vec::new());
        }
        self.bounded_scan(move |sysfs, proc| holders::scan(sysfs, proc, &functions))
            .await
    }

    /// What holds mediated device `uuid` of `parent` open now (as
    /// [`Core::scan_holders`]).
    pub(super) async fn scan_mdev_holders(
        &self,
        parent: PciAddress,
        uuid: MdevUuid,
    ) -> Result<Vec<Holder>, CoreError> {
        self.bounded_scan(move |sysfs, proc| holders::scan_mdev(sysfs, proc, parent, &uuid))
            .await
    }

    /// Runs `scan` off the runtime, bounded by the op timeout.
    async fn bounded_scan(
        &self,
        scan: impl FnOnce(&Sysfs, &ProcFs) -> Result<Vec<Holder>, HolderScanError> + Send + 'static,
    ) -> Result<Vec<Holder>, CoreError> {
        let sysfs = self.sysfs().clone();
        let proc = ProcFs::new(self.options.proc_root.clone());
        let started = Instant::now();
        let limit = self.engine.op_timeout();
        let scan = tokio::task::spawn_blocking(move || scan(&sysfs, &proc));
        let holders = match tokio::time::timeout(limit, scan).await {
            Ok(Ok(Ok(holders))) => holders,
            Ok(Ok(Err(e))) => return Err(CoreError::HolderScan(e.to_string())),
            Ok(Err(e)) => return Err(CoreError::HolderScan(format!("scan task: {e}"))),
            Err(_) => {
                return Err(CoreError::HolderScan(format!(
                    "the scan did not finish within {} ms (a device attribute read blocked)",
                    limit.as_millis()
                )))
            }
        };
        let scan_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(scan_ms, holders = holders.len(), "holder scan");
        Ok(holders)
    }

    /// Refuses a move of `device` while a holder refuses it; `force` lets
    /// a network interface in use go (and is logged with the caller).
    pub(super) fn refuse_if_held(
        device: PciAddress,
        holders: &[Holder],
        force: bool,
        caller: Caller,
    ) -> Result<(), CoreError> {
        let blocking: Vec<Holder> = holders
            .iter()
            .filter(|h| match h.disposition() {
                Disposition::Refuse => true,
                Disposition::RefuseUnlessForced => !force,
                Disposition::PlanStep => false,
            })
            .cloned()
            .collect();
        if !blocking.is_empty() {
            return Err(CoreError::DeviceBusy {
                device,
                holders: blocking,
            });
        }
        for h in holders {
            if let Holder::NetInterface { interface, .. } = h {
                tracing::warn!(uid = caller.uid, pid = caller.pid, device = %device, interface, "forced: taking network interface {interface} in use off its driver for {caller}");
            }
        }
        Ok(())
    }

    /// The framebuffer consoles (`vtconN`) a move releases, each once (a
    /// console shows up once per framebuffer of the moved functions).
    pub(super) fn released_consoles(&self, holders: &[Holder]) -> Vec<String> {
        let sysfs = self.sysfs();
        let names: BTreeSet<String> = holders
            .iter()
            .filter_map(|h| match h {
                Holder::FramebufferConsole { vtconsole, .. }
                    if vtconsole_bind_path(sysfs, vtconsole).is_some() =>
                {
                    Some(vtconsole.clone())
                }
                _ => None,
            })
            .collect();
        names.into_iter().collect()
    }

    /// The functions of `record` (with its companions) that a give-back
    /// would take from a vfio driver now.
    pub(super) fn functions_on_vfio(&self, record: &DeviceRecord) -> Vec<PciAddress> {
        std::iter::once(record.pci_address)
            .chain(record.companions().iter().map(|c| c.pci_address))
            .filter(|a| {
                self.sysfs()
                    .driver(a)
                    .as_deref()
                    .is_some_and(is_vfio_driver)
            })
            .collect()
    }

    /// `GET /devices/{id_or_name}/holders`: what holds the device and the
    /// functions vfiod moved with it, whatever driver they are on.
    pub async fn holders(
        &self,
        id_or_name: &str,
    ) -> Result<(DeviceRecord, Vec<Holder>), CoreError> {
        let record = self.resolve(id_or_name)?;
        let functions = std::iter::once(record.pci_address)
            .chain(record.companions().iter().map(|c| c.pci_address))
            .filter(|a| self.sysfs().is_present(a))
            .collect();
        let holders = self.scan_holders(functions).await?;
        Ok((record, holders))
    }
}
