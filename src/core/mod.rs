//! The core: the one owner of the registry and of every driver move.
//!
//! Concurrency model:
//! - Readers take an `Arc` snapshot of the registry and never wait for disk
//!   or hardware.
//! - Mutations of the registry go through `Core::commit`: one at a time
//!   (an async mutex), applied to a copy, saved durably, and only then made
//!   visible. A failed save changes nothing, so an acknowledged change is
//!   always on disk and an unacknowledged one never shows.
//! - Driver moves are serialised per IOMMU group (the kernel's unit of
//!   isolation) by an async mutex per group; moves in different groups run
//!   in parallel. The intent of a move is committed before the hardware is
//!   touched, so a crash at any point is finished at the next start.
//! - Hotplug and driver events arrive through [`Core::handle_hotplug`],
//!   from the udev watcher or anything else that produces them.
//!
//! Every change is an [`Operation`], run by one executor (`operation`:
//! the task, the lock, the log, the metric, the events). One file per
//! stage of a device's life: `types` (requests validated at the edge),
//! `registry_ops` (register, rename, unregister), `moves` (binding to vfio
//! and giving back, and settling slow writes), `attach` (attachments and
//! their grants), `reset` (reset, its scope check, device health and
//! quarantine), `release` (the one sequence that ends a device's use:
//! attachment, reset, give-back), `claim` (a free device picked and handed
//! out atomically), `sriov` (a PF's VF count and its VFs as
//! devices), `reconcile` (startup and hotplug).

mod attach;
mod claim;
mod holders;
mod mdev;
mod moves;
mod operation;
mod reconcile;
mod registry_ops;
mod release;
mod reset;
mod sriov;
mod types;

pub use mdev::mdev_sysfs_path;
pub use operation::{OpKind, Operation, Outcome};
pub use reconcile::HotplugEvent;
pub use types::*;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::CoreError;
use crate::events::EventBus;
use crate::pci::{is_passthrough_candidate, PciAddress, PciFunction, PciIds, Sysfs};
use crate::registry::store::Store;
use crate::registry::{DeviceRecord, Registry};

use crate::pci::VFIO_PCI;

/// Who asked, from the connection's peer credentials; logged with every
/// mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// From `SO_PEERCRED`; decides who may attach for whom.
    pub uid: u32,
    /// From `SO_PEERCRED`; logged with each mutation, never trusted for access
    /// (a pid can be reused).
    pub pid: i32,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Caller::AGENT {
            f.write_str("vfiod itself")
        } else {
            write!(f, "uid {} pid {}", self.uid, self.pid)
        }
    }
}

impl Caller {
    /// vfiod itself (startup reconcile, hotplug).
    pub const AGENT: Caller = Caller {
        uid: u32::MAX,
        pid: 0,
    };
}

/// Operational facts for `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// The crate version of the running binary.
    pub version: Cow<'static, str>,
    /// Seconds since the core started.
    pub uptime_s: u64,
    /// `vfio-pci` is loaded now (its driver directory exists); binds may still
    /// load it.
    pub vfio_pci_available: bool,
    /// The kernel has IOMMU groups; without them no device can be passed
    /// through.
    pub iommu_enabled: bool,
    /// The daemon may write sysfs and chown nodes; false refuses every driver move
    /// with `not_privileged`.
    pub privileged: bool,
    /// Records in the registry, companions not counted.
    pub registered_devices: usize,
    /// Where uevents come from (`udev`, `kernel (no udevd running)`, `fifo
    /// PATH`, `off`); `none` before the watcher starts.
    pub hotplug: String,
    /// The `pci.ids` file names come from; `None` when none was found.
    pub pci_ids: Option<String>,
    /// The newest event's sequence number: `GET /events?since=` with it
    /// follows the stream from this moment without a gap.
    pub last_event_seq: u64,
    /// Whether every local user may open `/dev/vfio/vfio` (the VFIO
    /// container), which an unprivileged VMM needs besides the group node
    /// it is granted.
    pub vfio_container_usable_by_all: bool,
}

/// The settings the core acts on, taken from [`crate::config`].
#[derive(Debug, Clone)]
pub struct CoreOptions {
    /// `modprobe vfio-pci` when a bind needs it and it is not loaded.
    pub load_modules: bool,
    /// Take back a device another actor moves off vfio while vfiod holds it.
    pub reclaim: bool,
    /// Whether this process may write to the hardware (root, or a fake
    /// tree in tests).
    pub privileged: bool,
    /// Where to keep the boot-time udev rule; `None` disables it.
    pub udev_rules_dir: Option<std::path::PathBuf>,
    /// `vfio_pci:` aliases of vendor variant drivers.
    pub vfio_aliases: crate::pci::VfioAliases,
    /// Reset a device when it is released (detach, unbind).
    pub reset_on_release: bool,
    /// Consecutive failed resets that quarantine a device.
    pub quarantine_after: u32,
    /// procfs root, for VMM processes (and holders).
    pub proc_root: std::path::PathBuf,
    /// Give a device back to its driver when its VMM exits.
    pub unbind_on_vmm_exit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum LockKey {
    Group(u32),
    Device(PciAddress),
}

/// The one owner of the registry and of every driver move; see the module docs
/// for the locking.
pub struct Core {
    engine: Engine,
    ids: Arc<PciIds>,
    store: Arc<Store>,
    registry: RwLock<Arc<Registry>>,
    commit_lock: tokio::sync::Mutex<()>,
    op_locks: Mutex<HashMap<LockKey, Arc<tokio::sync::Mutex<()>>>>,
    events: EventBus,
    options: CoreOptions,
    started: Instant,
    hotplug_source: Mutex<String>,
    /// For tasks that outlive a request (late-write watchers).
    me: std::sync::Weak<Core>,
    /// Every operation that writes to the kernel or the registry, as a
    /// task of the daemon (see [`Core::owned`]).
    operations: TaskTracker,
    udev_rule_written: Mutex<Option<String>>,
    /// A resync after a failed commit is scheduled (`resync_later`).
    resync_scheduled: std::sync::atomic::AtomicBool,
    /// PFs with a pass over their VFs queued (`converge_later`).
    vf_passes_queued: Mutex<std::collections::HashSet<PciAddress>>,
    /// One claim picks at a time (`claim`).
    claim_lock: tokio::sync::Mutex<()>,
}

impl Core {
    /// Loads the registry from `store`; reconcile with the hardware
    /// separately with [`Core::reconcile`] once hotplug is subscribed.
    pub fn new(
        engine: Engine,
        store: Store,
        ids: PciIds,
        options: CoreOptions,
    ) -> Result<Arc<Core>, crate::registry::store::StoreError> {
        let registry = store.load()?;
        Ok(Arc::new_cyclic(|me| Core {
            me: me.clone(),
            operations: TaskTracker::new(),
            udev_rule_written: Mutex::new(None),
            resync_scheduled: std::sync::atomic::AtomicBool::new(false),
            vf_passes_queued: Mutex::new(Default::default()),
            claim_lock: tokio::sync::Mutex::new(()),
            engine,
            ids: Arc::new(ids),
            store: Arc::new(store),
            registry: RwLock::new(Arc::new(registry)),
            commit_lock: tokio::sync::Mutex::new(()),
            op_locks: Mutex::new(HashMap::new()),
            events: EventBus::default(),
            options,
            started: Instant::now(),
            hotplug_source: Mutex::new("none".into()),
        }))
    }

    /// The sysfs tree the engine acts on.
    pub fn sysfs(&self) -> &Sysfs {
        self.engine.sysfs()
    }

    /// Vendor and device names for display.
    pub fn ids(&self) -> &PciIds {
        &self.ids
    }

    /// The bus every operation and hotplug event publishes to.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The registry as last committed: readers never wait for a writer, and
    /// never see an unsaved version.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records where uevents come from, for `GET /health`.
    pub fn set_hotplug_source(&self, source: &str) {
        *self
            .hotplug_source
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = source.to_owned();
    }

    /// Applies `change` to a copy of the registry, saves it, then publishes
    /// it. `change` returning an error leaves everything as it was.
    async fn commit<T>(
        &self,
        change: impl FnOnce(&mut Registry) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        self.commit_if_changed(|reg| change(reg).map(|out| (out, true)))
            .await
    }

    /// `commit` for changes that may turn out to be no-ops (most hotplug
    /// and driver events): those skip the disk write.
    async fn commit_if_changed<T>(
        &self,
        change: impl FnOnce(&mut Registry) -> Result<(T, bool), CoreError>,
    ) -> Result<T, CoreError> {
        let one_writer = self.commit_lock.lock().await;
        let mut next = (*self.snapshot()).clone();
        let (out, changed) = change(&mut next)?;
        if changed {
            self.save_and_publish(next, &one_writer).await?;
        }
        Ok(out)
    }

    /// Saves `next` durably, then makes it the registry everyone reads.
    /// The caller holds the commit lock (`_one_writer`) and built `next`
    /// from the snapshot it read under it.
    async fn save_and_publish(
        &self,
        next: Registry,
        _one_writer: &tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<(), CoreError> {
        let next = Arc::new(next);
        let store = self.store.clone();
        let to_save = next.clone();
        let saved = tokio::task::spawn_blocking(move || store.save(&to_save))
            .await
            .map_err(|e| CoreError::Internal(format!("state writer: {e}")))?;
        if let Err(e) = saved {
            // Whatever this commit was to record (a move's outcome, a
            // device leaving the bus) is not recorded; the hardware may
            // have changed all the same. Bring the registry back in line
            // with it once the disk takes writes again.
            self.resync_later();
            return Err(e.into());
        }
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        self.sync_udev_rule(&next).await;
        Ok(())
    }

    /// Keeps the boot-time udev rule in step with the registry (only
    /// rewritten when its content changes). A failure is logged: the rule
    /// is an optimisation of boot, not part of the registry.
    async fn sync_udev_rule(&self, registry: &Registry) {
        let Some(dir) = self.options.udev_rules_dir.clone() else {
            return;
        };
        let content = crate::udev_rule::render(registry);
        {
            let mut last = self
                .udev_rule_written
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.as_deref() == Some(content.as_str()) {
                return;
            }
            *last = Some(content.clone());
        }
        let result =
            tokio::task::spawn_blocking(move || crate::udev_rule::write(&dir, &content)).await;
        if let Ok(Err(e)) | Err(e) = result.map_err(std::io::Error::other) {
            tracing::warn!(error = %e, "could not write the udev rule for boot-time vfio binding");
            *self
                .udev_rule_written
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Like `commit`, for changes to one device that may have been deleted
    /// meanwhile (then nothing happens).
    async fn update_device(
        &self,
        addr: PciAddress,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>, CoreError> {
        let one_writer = self.commit_lock.lock().await;
        let current = self.snapshot();
        let Some(before) = current.get_by_address(&addr) else {
            return Ok(None);
        };
        let mut updated = before.clone();
        change(&mut updated);
        // Most hotplug and driver events change nothing: those copy one
        // record, not the registry.
        if updated == *before {
            return Ok(Some(updated));
        }
        let mut next = (*current).clone();
        *next.get_mut_by_address(&addr).expect("in the snapshot") = updated.clone();
        self.save_and_publish(next, &one_writer).await?;
        Ok(Some(updated))
    }

    fn op_lock(&self, key: LockKey) -> Arc<tokio::sync::Mutex<()>> {
        self.op_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    fn lock_key(record: &DeviceRecord) -> LockKey {
        match record.iommu_group {
            Some(g) => LockKey::Group(g),
            None => LockKey::Device(record.pci_address),
        }
    }

    /// Resolves a device and takes its IOMMU group's operation lock; the
    /// record is read again under the lock, as another operation on the
    /// group may have changed it while we waited.
    async fn lock_device(
        &self,
        id_or_name: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, DeviceRecord), CoreError> {
        let record = self.resolve(id_or_name)?;
        let guard = self.op_lock(Self::lock_key(&record)).lock_owned().await;
        let record = self.resolve(&record.id)?;
        Ok((guard, record))
    }

    /// [`Core::lock_device`] for an operation that may write to the
    /// device: refused while an earlier write is still in the kernel, since
    /// that write's return settles the device (`watch_late_write`) and
    /// anything done meanwhile would race it. Registry-only edits (rename,
    /// tags) do not need this.
    async fn lock_device_for_move(
        &self,
        id_or_name: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, DeviceRecord), CoreError> {
        let (guard, record) = self.lock_device(id_or_name).await?;
        if record.stuck {
            return Err(CoreError::DeviceStuck(record.pci_address));
        }
        Ok((guard, record))
    }

    /// Waits, up to `bound`, for every operation in flight (moves started
    /// by requests, hotplug rebinds) to finish; false if some did not.
    pub async fn finish_operations(&self, bound: Duration) -> bool {
        self.operations.close();
        let in_flight = self.operations.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "waiting for operations in flight to finish");
        }
        tokio::time::timeout(bound, self.operations.wait())
            .await
            .is_ok()
    }

    fn resolve(&self, id_or_name: &str) -> Result<DeviceRecord, CoreError> {
        self.snapshot()
            .resolve(id_or_name)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(id_or_name.chars().take(80).collect()))
    }

    /// Takes the group lock of a device vfiod acts on by itself, and reads
    /// the record again under it; `None` if it is not registered (then
    /// there is nothing to lock or do).
    async fn lock_address(
        &self,
        addr: PciAddress,
    ) -> Option<(tokio::sync::OwnedMutexGuard<()>, Option<DeviceRecord>)> {
        let record = self.snapshot().get_by_address(&addr).cloned()?;
        let guard = self.op_lock(Self::lock_key(&record)).lock_owned().await;
        let record = self.snapshot().get_by_address(&addr).cloned();
        Some((guard, record))
    }

    /// Moves need the hardware: refused, before any write, when vfiod
    /// runs without the privileges to make them.
    fn require_privileged(&self) -> Result<(), CoreError> {
        if self.options.privileged {
            Ok(())
        } else {
            Err(CoreError::NotPrivileged(
                "vfiod runs without root privileges, so it serves reads and registry changes but cannot move drivers; run it as root (systemctl start vfiod)".into(),
            ))
        }
    }

    // ---- reads ----

    /// By id, then by name; `NotFound` otherwise.
    pub fn get(&self, id_or_name: &str) -> Result<DeviceRecord, CoreError> {
        self.resolve(id_or_name)
    }

    /// Passthrough candidates on the bus now, registered or not.
    /// With `all`, every function of the bus.
    pub async fn available(&self, all: bool) -> Result<Vec<PciFunction>, CoreError> {
        let sysfs = self.sysfs().clone();
        let functions = tokio::task::spawn_blocking(move || sysfs.scan())
            .await
            .map_err(|e| CoreError::Internal(format!("scan: {e}")))?
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        Ok(functions
            .into_values()
            .filter(|f| all || is_passthrough_candidate(f))
            .collect())
    }

    /// Facts for `GET /health`, read fresh from sysfs on each call.
    pub fn health(&self) -> Health {
        let sysfs = self.sysfs();
        Health {
            version: Cow::Borrowed(env!("CARGO_PKG_VERSION")),
            uptime_s: self.started.elapsed().as_secs(),
            vfio_pci_available: sysfs.driver_loaded(VFIO_PCI),
            iommu_enabled: sysfs.iommu_enabled(),
            privileged: self.options.privileged,
            registered_devices: self.snapshot().len(),
            hotplug: self
                .hotplug_source
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            pci_ids: self.ids.source().map(|p| p.display().to_string()),
            last_event_seq: self.events.last_seq(),
            vfio_container_usable_by_all: crate::pci::vfio_access::container_usable_by_all(sysfs),
        }
    }
}
