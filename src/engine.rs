//! The driver-rebinding engine: the exact sysfs sequences that move PCI
//! functions to a vfio driver and back, each step checked, with rollback.
//!
//! Moving to vfio, per function: write `driver_override`, unbind from the
//! current driver and wait for the `driver` link to go, write
//! `drivers_probe`, and wait for the `driver` link to name the vfio driver;
//! once every function is moved, the VFIO group node must exist under the
//! devfs root. `new_id` is never used: it would capture every device with
//! the same IDs. Restoring reverses it: clear the override, unbind from
//! vfio, probe, and verify the recorded driver is back (explicitly `bind`ing
//! it if the probe picked another).
//!
//! Every write runs on its own thread with a timeout. A write the kernel
//! does not return from (a driver refusing to let go) is reported as
//! [`EngineError::Timeout`] and no rollback is attempted: further writes
//! would queue behind the kernel's device lock. The thread is left to
//! finish on its own; the caller gets a [`LateWrite`] to learn when it does.
//!
//! Resetting a function: if a method is chosen, write it to `reset_method`
//! (the kernel then tries only the methods listed, in that order), write
//! `1` to `reset` (the kernel returns once the reset is done, or failed),
//! and put the previous `reset_method` list back. The same timeout and
//! late-write handling applies as to the moves.
//!
//! The engine holds no state and takes no locks; the core serialises
//! operations per IOMMU group.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::crashpoint::{self, Stage, StepKind};
use crate::pci::{is_vfio_driver, MdevUuid, PciAddress, Sysfs, SysfsError, VFIO_PCI};

/// The sysfs step a move or reset was at; the wire's `step` field on a failed
/// move, so a caller can tell where the kernel balked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Writing the vfio driver's name to `driver_override`, so only it may
    /// probe the function.
    SetOverride,
    /// Writing the address to the current driver's `unbind`; where a driver
    /// refusing to let go hangs.
    Unbind,
    /// Writing the address to `/sys/bus/pci/drivers_probe`.
    Probe,
    /// Reading the `driver` link after a probe or bind to see who took the
    /// function.
    VerifyDriver,
    /// Waiting for `/dev/vfio/N` to appear once the group is on vfio.
    VerifyGroupNode,
    /// Writing an empty `driver_override` so the original driver may probe
    /// again.
    ClearOverride,
    /// Writing the address to the original driver's `bind` when the probe
    /// picked another.
    Bind,
    /// Writing the chosen method(s) to `reset_method`.
    SelectResetMethod,
    /// Writing `1` to `reset`; returns when the kernel finished or gave up.
    Reset,
    /// Writing the previous `reset_method` list back.
    RestoreResetMethod,
    /// Unbinding the framebuffer console from a device's framebuffer.
    ReleaseConsole,
    /// Binding it back once the device is returned.
    RestoreConsole,
    /// Writing a PF's `sriov_drivers_autoprobe` (0 before VFs are made, so
    /// no host driver probes them; the old value once they are gone).
    SetAutoprobe,
    /// Writing a PF's `sriov_numvfs` (0, or the count wanted).
    SetNumVfs,
    /// Waiting for the VFs the count asks for to appear, or to go.
    VerifyVfs,
    /// Writing a VF's `nvidia/current_vgpu_type`.
    SetVgpuType,
    /// Writing a UUID to a parent's `mdev_supported_types/<type>/create`.
    CreateMdev,
    /// Writing `1` to a mediated device's `remove`.
    RemoveMdev,
    /// Waiting for a mediated device (and its group node) to appear after
    /// its create, or to go after its remove.
    VerifyMdev,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Step::SetOverride => "set driver_override",
            Step::Unbind => "unbind",
            Step::Probe => "drivers_probe",
            Step::VerifyDriver => "verify driver",
            Step::VerifyGroupNode => "verify VFIO group node",
            Step::ClearOverride => "clear driver_override",
            Step::Bind => "bind",
            Step::SelectResetMethod => "select reset_method",
            Step::Reset => "reset",
            Step::RestoreResetMethod => "restore reset_method",
            Step::ReleaseConsole => "release framebuffer console",
            Step::RestoreConsole => "restore framebuffer console",
            Step::SetAutoprobe => "set sriov_drivers_autoprobe",
            Step::SetNumVfs => "set sriov_numvfs",
            Step::VerifyVfs => "verify VFs",
            Step::SetVgpuType => "set current_vgpu_type",
            Step::CreateMdev => "create mdev",
            Step::RemoveMdev => "remove mdev",
            Step::VerifyMdev => "verify mdev",
        };
        f.write_str(name)
    }
}

/// Resolves when a write that timed out finally returns from the kernel.
pub type LateWrite = oneshot::Receiver<Result<(), SysfsError>>;

/// A failed step, with the device and what was seen; the core adds the rollback
/// outcome.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The kernel refused a write; the errno is in `source`.
    #[error("{step} failed for {device}: {source}")]
    Write {
        /// The step whose write failed.
        step: Step,
        /// The function written for.
        device: PciAddress,
        /// The write's error, with path and errno.
        #[source]
        source: SysfsError,
    },
    /// The write did not return within the bound; no rollback is tried, since
    /// later writes would queue behind it.
    #[error("{step} for {device}: write to {path} did not return within {timeout_ms} ms")]
    Timeout {
        /// The step whose write hung.
        step: Step,
        /// The function written for.
        device: PciAddress,
        /// The sysfs file the write is stuck in.
        path: PathBuf,
        /// The bound that passed, in milliseconds.
        timeout_ms: u64,
        /// Learns when the write finally returns; taken once with
        /// [`EngineError::take_late_write`].
        late: Option<LateWriteSlot>,
    },
    #[error(
        "{step} for {device}: expected driver {}, found {}",
        show(expected),
        show(found)
    )]
    /// The write went through but the `driver` link names another driver than
    /// intended.
    Verify {
        /// The step that checked.
        step: Step,
        /// The function checked.
        device: PciAddress,
        /// The driver the step meant to leave it on (`None`: no driver).
        expected: Option<String>,
        /// The driver the `driver` link names (`None`: none).
        found: Option<String>,
    },
    /// The original driver is not in `/sys/bus/pci/drivers`, so a give-back
    /// cannot bind it.
    #[error("{step} for {device}: the original driver {driver} is not loaded; the device is left without a driver until it is (modprobe it, and the kernel binds it)")]
    DriverNotLoaded {
        /// The step that needed it.
        step: Step,
        /// The function left without a driver.
        device: PciAddress,
        /// The driver that would have taken it back.
        driver: String,
    },
    /// The group is on vfio but its `/dev/vfio/N` node never appeared under the
    /// devfs root.
    #[error("{step} for {device}: {path} did not appear")]
    GroupNode {
        /// The step that waited.
        step: Step,
        /// The function whose group it is.
        device: PciAddress,
        /// The node waited for.
        path: PathBuf,
    },
    /// A mediated device did not appear (with its group node) after its
    /// create, or did not go after its remove.
    #[error("{step} for {device}: {} did not {}", .path.display(), if *.appear { "appear" } else { "go" })]
    Mdev {
        /// The step that waited.
        step: Step,
        /// The parent function.
        device: PciAddress,
        /// The mediated device's directory.
        path: PathBuf,
        /// Waited for it to appear (else to go).
        appear: bool,
    },
    /// A PF's VF count was written but its VFs did not all go.
    #[error("verify VFs for {device}: expected {expected} VFs, found {found}")]
    Vfs {
        /// The PF.
        device: PciAddress,
        /// The count written.
        expected: u32,
        /// The `virtfnN` links left.
        found: u32,
    },
}

/// A driver for a message: its name, or "no driver".
pub(crate) fn show(driver: &Option<String>) -> &str {
    driver.as_deref().unwrap_or("no driver")
}

/// Wrapper so the error stays `Debug` while carrying the receiver.
pub struct LateWriteSlot(pub LateWrite);

impl fmt::Debug for LateWriteSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LateWrite")
    }
}

impl EngineError {
    /// Where it failed, for the wire's `step` field.
    pub fn step(&self) -> Step {
        match self {
            EngineError::Write { step, .. }
            | EngineError::Timeout { step, .. }
            | EngineError::Verify { step, .. }
            | EngineError::DriverNotLoaded { step, .. }
            | EngineError::GroupNode { step, .. }
            | EngineError::Mdev { step, .. } => *step,
            EngineError::Vfs { .. } => Step::VerifyVfs,
        }
    }

    /// The function the failing step acted on (may be a group companion, not
    /// the requested device).
    pub fn device(&self) -> PciAddress {
        match self {
            EngineError::Write { device, .. }
            | EngineError::Timeout { device, .. }
            | EngineError::Verify { device, .. }
            | EngineError::DriverNotLoaded { device, .. }
            | EngineError::GroupNode { device, .. }
            | EngineError::Mdev { device, .. }
            | EngineError::Vfs { device, .. } => *device,
        }
    }

    /// Only a refused write has one; a timeout or a wrong driver does not.
    pub fn errno(&self) -> Option<i32> {
        match self {
            EngineError::Write { source, .. } => source.errno(),
            _ => None,
        }
    }

    /// A hung write: the device is stuck, and the wire code is
    /// `driver_timeout`.
    pub fn is_timeout(&self) -> bool {
        matches!(self, EngineError::Timeout { .. })
    }

    /// Takes the late-completion receiver of a timed-out write.
    pub fn take_late_write(&mut self) -> Option<LateWrite> {
        match self {
            EngineError::Timeout { late, .. } => late.take().map(|slot| slot.0),
            _ => None,
        }
    }
}

/// One function to move: the driver it had before (and gets back), and
/// the vfio driver it goes to (`None`: plain vfio-pci).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The function moved.
    pub pci_address: PciAddress,
    /// The driver it had, and is given back to; `None`: it had none.
    pub from: Option<String>,
    /// The vfio variant driver to bind; `None`: plain vfio-pci.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl Move {
    /// A give-back of `pci_address` to `from`; `to` does not matter for a
    /// restore.
    pub fn restore(pci_address: PciAddress, from: Option<String>) -> Move {
        Move {
            pci_address,
            from,
            to: None,
        }
    }

    /// The driver the move binds, defaulting to vfio-pci.
    pub fn vfio_driver(&self) -> &str {
        self.to.as_deref().unwrap_or(VFIO_PCI)
    }
}

/// A failed move to vfio: what failed, and how the rollback went.
#[derive(Debug)]
pub struct BindFailure {
    /// The first step that failed.
    pub error: EngineError,
    /// `None` when no rollback was attempted (timeouts).
    pub rollback: Option<Result<(), EngineError>>,
}

/// Runs the sysfs sequences; stateless and cheap to clone, so each operation
/// carries its own.
#[derive(Debug, Clone)]
pub struct Engine {
    sysfs: Sysfs,
    write_timeout: Duration,
    settle_timeout: Duration,
}

const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How often a move to vfio takes a device off a driver whose probe raced
/// the override (see `move_one_to_vfio`); one race per add is all the
/// kernel can produce, the second retry is margin.
const NATIVE_PROBE_RACE_RETRIES: usize = 2;
/// Writes of a function's own `reset_method` list back, before vfiod gives
/// up and leaves its choice in place (logged).
const RESTORE_RESET_METHOD_ATTEMPTS: usize = 3;

impl Engine {
    /// `write_timeout` bounds each sysfs write and the settling after it (the
    /// config's `op_timeout`).
    pub fn new(sysfs: Sysfs, write_timeout: Duration) -> Self {
        Engine {
            sysfs,
            write_timeout,
            settle_timeout: write_timeout,
        }
    }

    /// The sysfs tree it writes to (real, or a test's fake root).
    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    /// The bound on one sysfs write, and on the kernel settling after it.
    pub fn op_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Moves `moves` (one IOMMU group) to their vfio drivers, rolling every
    /// touched function back to its `from` driver on failure.
    pub async fn to_vfio(&self, moves: &[Move], group: u32) -> Result<(), BindFailure> {
        let mut touched: Vec<&Move> = Vec::new();
        let mut result = Ok(());
        for m in moves {
            touched.push(m);
            result = self.move_one_to_vfio(m).await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            if let Some(first) = moves.first() {
                result = self.wait_for_group_node(first.pci_address, group).await;
            }
        }
        let Err(error) = result else {
            return Ok(());
        };
        if error.is_timeout() {
            return Err(BindFailure {
                error,
                rollback: None,
            });
        }
        let mut rollback = Ok(());
        for m in touched.iter().rev() {
            if let Err(e) = self.restore_one(m).await {
                tracing::error!(device = %m.pci_address, error = %e, "rollback failed");
                if rollback.is_ok() {
                    rollback = Err(e);
                }
            }
        }
        Err(BindFailure {
            error,
            rollback: Some(rollback),
        })
    }

    /// Writes a vtconsole's `bind` (`false`: take the console off its
    /// framebuffer before the device moves; `true`: put it back).
    pub async fn bind_console(
        &self,
        device: PciAddress,
        bind_path: PathBuf,
        bound: bool,
    ) -> Result<(), EngineError> {
        let (step, value) = if bound {
            (Step::RestoreConsole, "1")
        } else {
            (Step::ReleaseConsole, "0")
        };
        self.write(step, device, bind_path, value).await
    }

    /// Gives each function back to its `from` driver (or leaves it with no
    /// driver if it had none). Stops at the first failure.
    pub async fn restore(&self, moves: &[Move]) -> Result<(), EngineError> {
        for m in moves {
            self.restore_one(m).await?;
        }
        Ok(())
    }

    /// Resets `addr`. With `select`, writes it to `reset_method` first and
    /// `restore` back afterwards, also when the reset failed (not after a
    /// timeout: the kernel holds the device lock, and the write would queue
    /// behind it; whoever settles the stuck write restores it).
    pub async fn reset(
        &self,
        addr: PciAddress,
        select: Option<&str>,
        restore: Option<&str>,
    ) -> Result<(), EngineError> {
        let method_path = self.sysfs.reset_method_path(&addr);
        if let Some(methods) = select {
            self.write(Step::SelectResetMethod, addr, method_path.clone(), methods)
                .await?;
        }
        let result = self
            .write(Step::Reset, addr, self.sysfs.reset_path(&addr), "1")
            .await;
        if matches!(&result, Err(e) if e.is_timeout()) {
            return result;
        }
        if let (Some(_), Some(previous)) = (select, restore) {
            self.restore_reset_method(addr, previous).await?;
        }
        result
    }

    /// Puts a function's `reset_method` list back (an empty list is how the
    /// kernel shows "no method"; writing "default" restores its own order).
    pub async fn restore_reset_method(
        &self,
        addr: PciAddress,
        previous: &str,
    ) -> Result<(), EngineError> {
        let value = if previous.trim().is_empty() {
            "default"
        } else {
            previous
        };
        let path = self.sysfs.reset_method_path(&addr);
        // A method list left behind outlives vfiod (the kernel then resets
        // the device only the way vfiod chose, for everyone): a refused
        // write is tried again before it is given up on.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .write(Step::RestoreResetMethod, addr, path.clone(), value)
                .await
            {
                Err(e) if !e.is_timeout() && attempt < RESTORE_RESET_METHOD_ATTEMPTS => {
                    tracing::warn!(device = %addr, error = %e, attempt, "could not put reset_method back; trying again");
                    tokio::time::sleep(Duration::from_millis(10 * attempt as u64)).await;
                }
                Err(e) if !e.is_timeout() => {
                    tracing::error!(device = %addr, error = %e, "could not put reset_method back");
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// Writes a VF's `nvidia/current_vgpu_type` (0 clears it).
    pub async fn set_vgpu_type(&self, vf: PciAddress, id: u32) -> Result<(), EngineError> {
        let path = self.sysfs.current_vgpu_type_path(&vf);
        self.write(Step::SetVgpuType, vf, path, &id.to_string())
            .await
    }

    /// Makes mediated device `uuid` of `type_id` on `parent` and waits for
    /// it and its `/dev/vfio/N` (the kernel makes both before the write
    /// returns; udev and a simulated kernel may be later).
    pub async fn create_mdev(
        &self,
        parent: PciAddress,
        type_id: &str,
        uuid: &MdevUuid,
    ) -> Result<(), EngineError> {
        let path = self.sysfs.mdev_create_path(&parent, type_id);
        self.write(Step::CreateMdev, parent, path, uuid.as_str())
            .await?;
        let ready = || {
            self.sysfs
                .mdev_iommu_group(uuid)
                .is_some_and(|g| self.sysfs.vfio_group_node(g).exists())
        };
        self.wait_for_mdev(parent, uuid, true, ready).await
    }

    /// Destroys mediated device `uuid` of `parent` (nothing to do when it
    /// is gone already) and waits for it to go.
    pub async fn remove_mdev(
        &self,
        parent: PciAddress,
        uuid: &MdevUuid,
    ) -> Result<(), EngineError> {
        if !self.sysfs.mdev_exists(uuid) {
            return Ok(());
        }
        let path = self.sysfs.mdev_remove_path(uuid);
        self.write(Step::RemoveMdev, parent, path, "1").await?;
        self.wait_for_mdev(parent, uuid, false, || !self.sysfs.mdev_exists(uuid))
            .await
    }

    async fn wait_for_mdev(
        &self,
        parent: PciAddress,
        uuid: &MdevUuid,
        appear: bool,
        done: impl Fn() -> bool,
    ) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        while !done() {
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::Mdev {
                    step: Step::VerifyMdev,
                    device: parent,
                    path: self.sysfs.mdev_dir(uuid),
                    appear,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(())
    }

    /// Writes `pf`'s `sriov_drivers_autoprobe`.
    pub async fn set_sriov_autoprobe(&self, pf: PciAddress, on: bool) -> Result<(), EngineError> {
        let path = self.sysfs.sriov_autoprobe_path(&pf);
        self.write(Step::SetAutoprobe, pf, path, if on { "1" } else { "0" })
            .await
    }

    /// Writes `count` to `pf`'s `sriov_numvfs` and returns how many VFs
    /// exist once the kernel is done. The kernel's write returns when the
    /// VFs are made; the `virtfnN` links are polled all the same (udev and
    /// a simulated kernel are asynchronous). A driver that enables fewer
    /// than asked shows as a smaller count after the settle time; VFs that
    /// do not all go after a write of 0 are a `Verify` error.
    pub async fn set_num_vfs(&self, pf: PciAddress, count: u32) -> Result<u32, EngineError> {
        let path = self.sysfs.sriov_numvfs_path(&pf);
        self.write(Step::SetNumVfs, pf, path, &count.to_string())
            .await?;
        let enabled = || self.sysfs.virtfns(&pf).len() as u32;
        match self
            .wait_until(Step::VerifyVfs, pf, None, || enabled() == count)
            .await
        {
            Ok(()) => Ok(count),
            Err(_) if count > 0 => Ok(enabled()),
            Err(_) => Err(EngineError::Vfs {
                device: pf,
                expected: 0,
                found: enabled(),
            }),
        }
    }

    async fn move_one_to_vfio(&self, m: &Move) -> Result<(), EngineError> {
        let vfio_driver = m.vfio_driver();
        let addr = m.pci_address;
        let current = self.sysfs.driver(&addr);
        if current.as_deref() == Some(vfio_driver) {
            return Ok(());
        }
        self.write(
            Step::SetOverride,
            addr,
            self.sysfs.driver_override_path(&addr),
            vfio_driver,
        )
        .await?;
        if let Some(driver) = current {
            self.unbind(addr, &driver).await?;
        }
        // The kernel's own probe of a device that was just added (its `add`
        // uevent comes before the probe) can still be running when the
        // override is written: that probe has already chosen the native
        // driver, and ours then finds the device taken. The override is in
        // place now, so taking the device off that driver once more and
        // probing again lands it on vfio.
        for attempt in 0..=NATIVE_PROBE_RACE_RETRIES {
            self.write(
                Step::Probe,
                addr,
                self.sysfs.drivers_probe_path(),
                &addr.to_string(),
            )
            .await?;
            let found = self.wait_for_any_driver(addr, vfio_driver).await?;
            if found == vfio_driver {
                return Ok(());
            }
            if attempt == NATIVE_PROBE_RACE_RETRIES {
                return Err(EngineError::Verify {
                    step: Step::VerifyDriver,
                    device: addr,
                    expected: Some(vfio_driver.to_owned()),
                    found: Some(found),
                });
            }
            tracing::warn!(device = %addr, driver = %found, "another probe bound the device while it was being moved to {vfio_driver}; taking it off {found} again");
            self.unbind(addr, &found).await?;
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Waits until `addr` has a driver (polling: the probe may be
    /// asynchronous) and returns its name; `Verify` if it has none in time.
    async fn wait_for_any_driver(
        &self,
        addr: PciAddress,
        expected: &str,
    ) -> Result<String, EngineError> {
        self.wait_until(Step::VerifyDriver, addr, Some(expected), || {
            self.sysfs.driver(&addr).is_some()
        })
        .await?;
        self.sysfs.driver(&addr).ok_or_else(|| EngineError::Verify {
            step: Step::VerifyDriver,
            device: addr,
            expected: Some(expected.to_owned()),
            found: None,
        })
    }

    async fn restore_one(&self, m: &Move) -> Result<(), EngineError> {
        let addr = m.pci_address;
        // A newline is how `echo > driver_override` clears it.
        self.write(
            Step::ClearOverride,
            addr,
            self.sysfs.driver_override_path(&addr),
            "\n",
        )
        .await?;
        let current = self.sysfs.driver(&addr);
        if current == m.from {
            return Ok(());
        }
        // Restoring "no driver" never takes a device off its native driver:
        // a host driver that bound meanwhile (the kernel's own probe after a
        // re-plug) is where the device belongs, not nowhere.
        if m.from.is_none() && current.as_deref().is_some_and(|d| !is_vfio_driver(d)) {
            return Ok(());
        }
        if let Some(driver) = current {
            self.unbind(addr, &driver).await?;
        }
        let Some(original) = m.from.as_deref() else {
            // It had no driver: probing could hand it to one.
            return Ok(());
        };
        let probe_path = self.sysfs.drivers_probe_path();
        match self
            .write(Step::Probe, addr, probe_path, &addr.to_string())
            .await
        {
            Ok(()) => {
                if self.wait_for_driver(addr, Some(original)).await.is_ok() {
                    return Ok(());
                }
            }
            Err(e) if e.is_timeout() => return Err(e),
            Err(e) => {
                tracing::warn!(device = %addr, error = %e, "probe failed; binding the original driver by name");
            }
        }
        // The probe failed or picked another driver (or none): ask for the
        // original one by name.
        if let Some(other) = self.sysfs.driver(&addr) {
            self.unbind(addr, &other).await?;
        }
        if !self.sysfs.driver_loaded(original) {
            return Err(EngineError::DriverNotLoaded {
                step: Step::Bind,
                device: addr,
                driver: original.to_owned(),
            });
        }
        let bind_path = self.sysfs.driver_dir(original).join("bind");
        self.write(Step::Bind, addr, bind_path, &addr.to_string())
            .await?;
        self.wait_for_driver(addr, Some(original)).await
    }

    async fn unbind(&self, addr: PciAddress, driver: &str) -> Result<(), EngineError> {
        let path = self.sysfs.driver_dir(driver).join("unbind");
        self.write(Step::Unbind, addr, path, &addr.to_string())
            .await?;
        self.wait_until(Step::Unbind, addr, None, || {
            self.sysfs.driver(&addr).is_none()
        })
        .await
    }

    async fn wait_for_driver(
        &self,
        addr: PciAddress,
        expected: Option<&str>,
    ) -> Result<(), EngineError> {
        self.wait_until(Step::VerifyDriver, addr, expected, || {
            self.sysfs.driver(&addr).as_deref() == expected
        })
        .await
    }

    async fn wait_until(
        &self,
        step: Step,
        addr: PciAddress,
        expected: Option<&str>,
        done: impl Fn() -> bool,
    ) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        loop {
            if done() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::Verify {
                    step,
                    device: addr,
                    expected: expected.map(str::to_owned),
                    found: self.sysfs.driver(&addr),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_for_group_node(&self, addr: PciAddress, group: u32) -> Result<(), EngineError> {
        let path = self.sysfs.vfio_group_node(group);
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        while !path.exists() {
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::GroupNode {
                    step: Step::VerifyGroupNode,
                    device: addr,
                    path,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(())
    }

    /// One attribute write on a dedicated thread, bounded by the timeout.
    async fn write(
        &self,
        step: Step,
        device: PciAddress,
        path: PathBuf,
        value: &str,
    ) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        let (late_tx, late_rx) = oneshot::channel();
        let thread_path = path.clone();
        let value = value.to_owned();
        let spawned = std::thread::Builder::new()
            .name("sysfs-write".into())
            .spawn(move || {
                let step = crashpoint::begin(StepKind::SysfsWrite);
                let result = match step.injected(Stage::Write) {
                    Some(source) => Err(SysfsError {
                        op: "write",
                        path: thread_path.clone(),
                        source,
                    }),
                    None => Sysfs::write_attr(&thread_path, &value),
                };
                step.made(format_args!(
                    "{} {value:?}{}",
                    thread_path.display(),
                    if result.is_err() { " (failed)" } else { "" }
                ));
                // Whoever is still listening gets the result: the caller
                // within the timeout, the late-write watcher after it.
                if let Err(result) = tx.send(result) {
                    let _ = late_tx.send(result);
                }
            });
        if let Err(e) = spawned {
            return Err(EngineError::Write {
                step,
                device,
                source: SysfsError {
                    op: "spawn writer for",
                    path,
                    source: e,
                },
            });
        }
        match tokio::time::timeout(self.write_timeout, rx).await {
            Ok(Ok(Ok(()))) => {
                tracing::debug!(device = %device, %step, path = %path.display(), "sysfs write");
                Ok(())
            }
            Ok(Ok(Err(source))) => Err(EngineError::Write {
                step,
                device,
                source,
            }),
            Ok(Err(_)) => Err(EngineError::Write {
                step,
                device,
                source: SysfsError {
                    op: "write (writer thread died)",
                    path,
                    source: std::io::Error::other("sysfs writer thread ended without a result"),
                },
            }),
            Err(_) => Err(EngineError::Timeout {
                step,
                device,
                path,
                timeout_ms: self.write_timeout.as_millis() as u64,
                late: Some(LateWriteSlot(late_rx)),
            }),
        }
    }
}
