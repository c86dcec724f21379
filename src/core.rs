//! The core: the one owner of the registry and of every driver move.
//!
//! Concurrency model:
//! - Readers take an `Arc` snapshot of the registry and never wait for disk
//!   or hardware.
//! - Mutations of the registry go through [`Core::commit`]: one at a time
//!   (an async mutex), applied to a copy, saved durably, and only then made
//!   visible. A failed save changes nothing, so an acknowledged change is
//!   always on disk and an unacknowledged one never shows.
//! - Driver moves are serialised per IOMMU group (the kernel's unit of
//!   isolation) by an async mutex per group; moves in different groups run
//!   in parallel. The intent of a move is committed before the hardware is
//!   touched, so a crash at any point is finished at the next start.
//! - Hotplug and driver events arrive through [`Core::handle_hotplug`],
//!   from the udev watcher or anything else that produces them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use chrono::Utc;
use serde::Serialize;

use crate::engine::{Engine, EngineError, Move};
use crate::error::CoreError;
use crate::events::{Event, EventBus, EventKind};
use crate::pci::{is_passthrough_candidate, PciAddress, PciFunction, PciIds, Sysfs};
use crate::registry::store::Store;
use crate::registry::{
    is_vfio_driver, Companion, DeviceRecord, PendingOp, Registry, RegistryConflict,
};

pub use crate::engine::VFIO_PCI;

/// Who asked, from the connection's peer credentials; logged with every
/// mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
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

/// hypeman sets no length limit for names; this one only keeps logs and
/// paths sane.
pub const MAX_NAME: usize = 255;

/// A device name, validated: hypeman's `^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`, at
/// most [`MAX_NAME`] characters, and not a word the API uses as a path
/// segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceName(String);

impl DeviceName {
    pub fn parse(s: &str) -> Result<DeviceName, CoreError> {
        let mut chars = s.chars();
        let valid = s.len() >= 2
            && s.len() <= MAX_NAME
            && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(CoreError::InvalidName(format!(
                "invalid name {:?}: 2 to {MAX_NAME} characters, letters, digits, '_', '.', '-', starting with a letter or digit",
                s.chars().take(80).collect::<String>()
            )));
        }
        if s == "available" {
            return Err(CoreError::InvalidName(
                "the name \"available\" is reserved (GET /devices/available)".into(),
            ));
        }
        Ok(DeviceName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// hypeman's Tags schema, so that tags registered here are valid there too.
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;

/// The characters hypeman allows in tag keys and values:
/// `[A-Za-z0-9 _.:/=+@-]`.
fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '.' | ':' | '/' | '=' | '+' | '@' | '-')
}

/// Tags, validated as hypeman's schema has them: at most 50; keys of 1-128
/// and values of up to 256 characters from `[A-Za-z0-9 _.:/=+@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tags(BTreeMap<String, String>);

impl Tags {
    pub fn parse(map: BTreeMap<String, String>) -> Result<Tags, CoreError> {
        if map.len() > MAX_TAGS {
            return Err(CoreError::InvalidTags(format!(
                "{} tags given, at most {MAX_TAGS} allowed",
                map.len()
            )));
        }
        let shown = |s: &str| s.chars().take(40).collect::<String>();
        for (k, v) in &map {
            if k.is_empty() || k.len() > MAX_TAG_KEY || !k.chars().all(is_tag_char) {
                return Err(CoreError::InvalidTags(format!(
                    "tag key {:?} must be 1 to {MAX_TAG_KEY} characters from A-Z a-z 0-9 and \" _.:/=+@-\"",
                    shown(k)
                )));
            }
            if v.len() > MAX_TAG_VALUE || !v.chars().all(is_tag_char) {
                return Err(CoreError::InvalidTags(format!(
                    "value of tag {:?} must be at most {MAX_TAG_VALUE} characters from A-Z a-z 0-9 and \" _.:/=+@-\"",
                    shown(k)
                )));
            }
        }
        Ok(Tags(map))
    }

    pub fn into_inner(self) -> BTreeMap<String, String> {
        self.0
    }
}

/// An instance id for attach: 1-256 printable characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn parse(s: &str) -> Result<InstanceId, CoreError> {
        if s.is_empty() || s.chars().count() > 256 || s.chars().any(char::is_control) {
            return Err(CoreError::InvalidRequest(
                "instance_id must be 1 to 256 characters without control characters".into(),
            ));
        }
        Ok(InstanceId(s.to_owned()))
    }
}

#[derive(Debug, Clone)]
pub struct RegisterRequest {
    pub pci_address: PciAddress,
    pub name: Option<DeviceName>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct UpdateRequest {
    pub name: Option<DeviceName>,
    pub tags: Option<Tags>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BindRequest {
    pub with_group: bool,
    pub dry_run: bool,
}

/// What a bind does or would do.
#[derive(Debug, Clone, Serialize)]
pub struct BindPlan {
    pub vfio_driver: String,
    pub iommu_group: u32,
    /// Every function that moves, the device first; `from` is the driver it
    /// leaves (and gets back on unbind).
    pub moves: Vec<Move>,
    /// The sysfs writes, in order, for the operator to read.
    pub steps: Vec<String>,
    /// Nothing to do: the device is on vfio already.
    pub already_bound: bool,
}

#[derive(Debug, Clone)]
pub struct BindOutcome {
    pub device: DeviceRecord,
    pub plan: BindPlan,
}

/// Operational facts for `GET /health`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub version: &'static str,
    pub uptime_s: u64,
    pub vfio_pci_available: bool,
    pub iommu_enabled: bool,
    pub privileged: bool,
    pub registered_devices: usize,
    pub hotplug: String,
    pub pci_ids: Option<String>,
    /// The newest event's sequence number: `GET /events?since=` with it
    /// follows the stream from this moment without a gap.
    pub last_event_seq: u64,
}

#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub load_modules: bool,
    pub reclaim: bool,
    /// Whether this process may write to the hardware (root, or a fake
    /// tree in tests).
    pub privileged: bool,
    /// Where to keep the boot-time udev rule; `None` disables it.
    pub udev_rules_dir: Option<std::path::PathBuf>,
    /// `vfio_pci:` aliases of vendor variant drivers.
    pub vfio_aliases: crate::pci::VfioAliases,
}

/// What a hotplug or driver uevent says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotplugEvent {
    Add(PciAddress),
    Remove(PciAddress),
    Bind {
        address: PciAddress,
        driver: Option<String>,
    },
    Unbind(PciAddress),
    Change(PciAddress),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LockKey {
    Group(u32),
    Device(PciAddress),
}

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
    udev_rule_written: Mutex<Option<String>>,
}

fn conflict(e: RegistryConflict) -> CoreError {
    CoreError::Conflict(e.to_string())
}

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
        if let Some(d) = &m.from {
            steps.push(format!(
                "write {a} to {}",
                sysfs.driver_dir(d).join("unbind").display()
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
            udev_rule_written: Mutex::new(None),
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

    pub fn sysfs(&self) -> &Sysfs {
        self.engine.sysfs()
    }

    pub fn ids(&self) -> &PciIds {
        &self.ids
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    pub fn snapshot(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

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
        let _one_writer = self.commit_lock.lock().await;
        let mut next = (*self.snapshot()).clone();
        let (out, changed) = change(&mut next)?;
        if !changed {
            return Ok(out);
        }
        let next = Arc::new(next);
        let store = self.store.clone();
        let to_save = next.clone();
        tokio::task::spawn_blocking(move || store.save(&to_save))
            .await
            .map_err(|e| CoreError::Internal(format!("state writer: {e}")))??;
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        self.sync_udev_rule(&next).await;
        Ok(out)
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
        self.commit_if_changed(|reg| {
            let Some(d) = reg.get_mut_by_address(&addr) else {
                return Ok((None, false));
            };
            let before = d.clone();
            change(d);
            let changed = *d != before;
            Ok((Some(d.clone()), changed))
        })
        .await
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

    /// Records a failed bind or unbind and reports it. The device keeps the
    /// driver it is found on now. If the kernel did not answer in time the
    /// device is marked `stuck` and keeps its recorded `pending` operation,
    /// for the late write's return or the next start to settle; otherwise
    /// `settle` says what the failure leaves behind for this operation.
    async fn record_failed_move(
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

    fn resolve(&self, id_or_name: &str) -> Result<DeviceRecord, CoreError> {
        self.snapshot()
            .resolve(id_or_name)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(id_or_name.chars().take(80).collect()))
    }

    fn publish(&self, kind: EventKind, d: &DeviceRecord) -> Event {
        Event::new(kind, Some(d.pci_address), Some(d.id.clone()))
    }

    // ---- reads ----

    pub fn list(&self, tag_filter: &[(String, String)]) -> Vec<DeviceRecord> {
        self.snapshot()
            .iter()
            .filter(|d| tag_filter.iter().all(|(k, v)| d.tags.get(k) == Some(v)))
            .cloned()
            .collect()
    }

    pub fn get(&self, id_or_name: &str) -> Result<DeviceRecord, CoreError> {
        self.resolve(id_or_name)
    }

    /// Passthrough candidates on the bus now, registered or not.
    /// The passthrough candidates, or with `all` every function of the bus.
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

    pub fn health(&self) -> Health {
        let sysfs = self.sysfs();
        Health {
            version: env!("CARGO_PKG_VERSION"),
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
        }
    }

    // ---- registry mutations ----

    pub async fn register(
        &self,
        caller: Caller,
        req: RegisterRequest,
    ) -> Result<DeviceRecord, CoreError> {
        let addr = req.pci_address;
        let function = self
            .sysfs()
            .read_function(&addr)
            .map_err(|e| CoreError::Internal(e.to_string()))?
            .ok_or(CoreError::PciDeviceNotFound(addr))?;
        if function.is_bridge() {
            return Err(CoreError::Bridge(addr, function.class));
        }
        let name = req.name.map(|n| n.0).unwrap_or_else(|| addr.default_name());
        let driver = function.driver.clone();
        let record = DeviceRecord {
            id: cuid2::create_id(),
            name,
            pci_address: addr,
            vendor_id: function.vendor_id,
            device_id: function.device_id,
            subsystem_vendor_id: function.subsystem_vendor_id,
            subsystem_device_id: function.subsystem_device_id,
            class: function.class,
            iommu_group: function.iommu_group,
            created_at: Utc::now(),
            tags: req.tags.into_inner(),
            attached_to: None,
            original_driver: driver.clone().filter(|d| !is_vfio_driver(d)),
            bound_by_vfiod: false,
            vfio_driver: None,
            companions: vec![],
            pending: None,
            present: true,
            current_driver: driver,
            stuck: false,
            identity_mismatch: false,
        };
        let stored = record.clone();
        self.commit(move |reg| reg.insert(stored).map_err(conflict))
            .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, id = %record.id, name = %record.name, "registered {addr} as {} (id {}) for {caller}", record.name, record.id);
        self.events
            .publish(self.publish(EventKind::Registered, &record));
        Ok(record)
    }

    pub async fn update(
        &self,
        caller: Caller,
        id_or_name: &str,
        req: UpdateRequest,
    ) -> Result<DeviceRecord, CoreError> {
        let addr = self.resolve(id_or_name)?.pci_address;
        let updated = self
            .commit(|reg| {
                if let Some(name) = &req.name {
                    reg.rename(&addr, name.as_str()).map_err(conflict)?;
                }
                let d = reg
                    .get_mut_by_address(&addr)
                    .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
                if let Some(tags) = req.tags {
                    d.tags = tags.into_inner();
                }
                Ok(d.clone())
            })
            .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, name = %updated.name, "updated {addr} ({}) for {caller}", updated.name);
        self.events
            .publish(self.publish(EventKind::Updated, &updated));
        Ok(updated)
    }

    /// Unregisters a device, first giving back a driver vfiod took. If that
    /// fails the device stays registered.
    pub async fn delete(&self, caller: Caller, id_or_name: &str) -> Result<(), CoreError> {
        let (_group, record) = self.lock_device(id_or_name).await?;
        ensure_not_attached(&record)?;
        if record.bound_by_vfiod && record.present {
            self.unbind_locked(caller, &record).await?;
        }
        let addr = record.pci_address;
        self.commit(|reg| {
            reg.remove(&addr);
            Ok(())
        })
        .await?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, id = %record.id, "unregistered {addr} ({}) for {caller}", record.name);
        self.events
            .publish(self.publish(EventKind::Unregistered, &record));
        Ok(())
    }

    // ---- driver moves ----

    fn require_privileged(&self) -> Result<(), CoreError> {
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
    async fn plan_bind(
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
        let mut moves = vec![Move {
            pci_address: addr,
            from: function.driver.clone(),
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
        let (_group, record) = self.lock_device(id_or_name).await?;
        self.bind_locked(caller, &record, req).await
    }

    async fn bind_locked(
        &self,
        caller: Caller,
        record: &DeviceRecord,
        req: BindRequest,
    ) -> Result<BindOutcome, CoreError> {
        // Time inside vfiod from here to the durable result, for the log.
        let started = Instant::now();
        let plan = self.plan_bind(record, req.with_group).await?;
        if req.dry_run || plan.already_bound {
            return Ok(BindOutcome {
                device: record.clone(),
                plan,
            });
        }
        self.require_privileged()?;
        let addr = record.pci_address;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, group = plan.iommu_group, moves = plan.moves.len(), "binding {addr} to {} for {caller} ({} function(s) in IOMMU group {})", plan.vfio_driver, plan.moves.len(), plan.iommu_group);
        // The intent and the drivers to restore are on disk before any write.
        let device_from = plan.moves[0].from.clone();
        let companions: Vec<Companion> = plan.moves[1..]
            .iter()
            .map(|m| Companion {
                pci_address: m.pci_address,
                original_driver: m.from.clone(),
            })
            .collect();
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
        })
        .await?;
        let result = self.engine.to_vfio(&plan.moves, plan.iommu_group).await;
        let current = self.sysfs().driver(&addr);
        match result {
            Ok(()) => {
                let vfio = plan.vfio_driver.clone();
                let device = self
                    .update_device(addr, |d| {
                        d.pending = None;
                        d.bound_by_vfiod = true;
                        d.vfio_driver = Some(vfio);
                        d.current_driver = current.clone();
                        d.present = true;
                    })
                    .await?
                    .unwrap_or_else(|| record.clone());
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, driver = ?current, elapsed_ms, "bound {addr} to {} for {caller} in {elapsed_ms:.1} ms", current.as_deref().unwrap_or("no driver"));
                self.events
                    .publish(self.publish(EventKind::Bind, &device).driver(current));
                Ok(BindOutcome { device, plan })
            }
            Err(failure) => Err(self
                .record_failed_move(
                    caller,
                    record,
                    "bind",
                    failure.error,
                    failure.rollback,
                    |d| {
                        d.pending = None;
                        d.companions.clear();
                    },
                )
                .await),
        }
    }

    pub async fn unbind(
        &self,
        caller: Caller,
        id_or_name: &str,
    ) -> Result<DeviceRecord, CoreError> {
        let (_group, record) = self.lock_device(id_or_name).await?;
        ensure_not_attached(&record)?;
        self.unbind_locked(caller, &record).await
    }

    async fn unbind_locked(
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
                        d.current_driver = current.clone();
                    })
                    .await?
                    .unwrap_or_else(|| record.clone());
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, driver = ?current, elapsed_ms, "gave {addr} back to {} for {caller} in {elapsed_ms:.1} ms", current.as_deref().unwrap_or("no driver"));
                self.events
                    .publish(self.publish(EventKind::Unbind, &device).driver(current));
                Ok(device)
            }
            Err(error) => Err(self
                .record_failed_move(caller, record, "unbind", error, None, |d| {
                    d.pending = None;
                    d.bound_by_vfiod = d.current_driver.as_deref().is_some_and(is_vfio_driver);
                })
                .await),
        }
    }

    pub async fn attach(
        &self,
        caller: Caller,
        id_or_name: &str,
        instance: InstanceId,
    ) -> Result<DeviceRecord, CoreError> {
        let (_group, record) = self.lock_device(id_or_name).await?;
        match &record.attached_to {
            Some(current) if *current == instance.0 => return Ok(record),
            Some(current) => {
                return Err(CoreError::InUse {
                    device: record.name.clone(),
                    instance: current.clone(),
                })
            }
            None => {}
        }
        let on_vfio = self
            .sysfs()
            .driver(&record.pci_address)
            .as_deref()
            .is_some_and(is_vfio_driver);
        if !on_vfio {
            self.bind_locked(caller, &record, BindRequest::default())
                .await?;
        }
        let addr = record.pci_address;
        let instance_id = instance.0.clone();
        let device = self
            .update_device(addr, |d| d.attached_to = Some(instance_id))
            .await?
            .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
        tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %instance.0, "attached {addr} to instance {} for {caller}", instance.0);
        self.events.publish(
            self.publish(EventKind::Attach, &device)
                .instance(Some(instance.0)),
        );
        Ok(device)
    }

    pub async fn detach(
        &self,
        caller: Caller,
        id_or_name: &str,
        keep_bound: bool,
    ) -> Result<DeviceRecord, CoreError> {
        let (_group, record) = self.lock_device(id_or_name).await?;
        let addr = record.pci_address;
        let mut device = record.clone();
        if let Some(instance) = record.attached_to.clone() {
            device = self
                .update_device(addr, |d| d.attached_to = None)
                .await?
                .ok_or_else(|| CoreError::NotFound(id_or_name.to_owned()))?;
            tracing::info!(uid = caller.uid, pid = caller.pid, device = %addr, instance = %instance, "detached {addr} from instance {instance} for {caller}");
            self.events.publish(
                self.publish(EventKind::Detach, &device)
                    .instance(Some(instance)),
            );
        }
        if !keep_bound && device.bound_by_vfiod && device.present {
            device = self.unbind_locked(caller, &device).await?;
        }
        Ok(device)
    }

    /// When a write that timed out finally returns, re-reads the device,
    /// clears `stuck` and settles the recorded operation.
    fn watch_late_write(&self, addr: PciAddress, late: crate::engine::LateWrite) {
        let Some(core) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let result = late.await;
            tracing::warn!(device = %addr, result = ?result.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())), "stuck sysfs write returned");
            let Some(record) = core.snapshot().get_by_address(&addr).cloned() else {
                return;
            };
            let lock = core.op_lock(Self::lock_key(&record));
            let _group = lock.lock().await;
            let current = core.sysfs().driver(&addr);
            if let Ok(Some(d)) = core
                .update_device(addr, |d| {
                    d.stuck = false;
                    d.current_driver = current.clone();
                })
                .await
            {
                core.events
                    .publish(core.publish(EventKind::DeviceUnstuck, &d).driver(current));
                core.settle_pending(&d).await;
            }
        });
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
                        }
                        d.current_driver = current;
                    })
                    .await;
            }
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
                        }
                        d.current_driver = current;
                    })
                    .await;
            }
        }
    }

    // ---- startup and hotplug ----

    /// Brings the registry in line with the bus: presence and drivers,
    /// unfinished operations, and devices that should be on vfio but are
    /// not (after a reboot). Never unbinds a device from vfio.
    pub async fn reconcile(&self) -> Result<(), CoreError> {
        let sysfs = self.sysfs().clone();
        let bus = tokio::task::spawn_blocking(move || sysfs.scan())
            .await
            .map_err(|e| CoreError::Internal(format!("scan: {e}")))?
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let changed = self
            .commit_if_changed(|reg| {
                let mut changed = Vec::new();
                let addrs: Vec<PciAddress> = reg.iter().map(|d| d.pci_address).collect();
                for addr in addrs {
                    let d = reg.get_mut_by_address(&addr).expect("listed");
                    let before = d.clone();
                    match bus.get(&addr) {
                        Some(f) => {
                            d.present = true;
                            d.current_driver = f.driver.clone();
                            d.iommu_group = f.iommu_group;
                            d.stuck = false;
                            d.identity_mismatch = !d.is_same_device(f);
                        }
                        None => {
                            d.present = false;
                            d.current_driver = None;
                            d.stuck = false;
                        }
                    }
                    if *d != before {
                        changed.push(d.clone());
                    }
                }
                let any = !changed.is_empty();
                Ok((changed, any))
            })
            .await?;
        for d in &changed {
            tracing::info!(device = %d.pci_address, present = d.present, driver = ?d.current_driver, "reconciled with the bus");
        }
        for record in self.snapshot().iter().cloned().collect::<Vec<_>>() {
            if record.pending.is_some() {
                self.settle_pending(&record).await;
            } else if self.wants_vfio(&record) && !record.bound_to_vfio() {
                self.rebind_to_vfio(&record).await;
            }
        }
        Ok(())
    }

    fn wants_vfio(&self, record: &DeviceRecord) -> bool {
        record.present
            && !record.identity_mismatch
            && (record.bound_by_vfiod || record.attached_to.is_some())
    }

    /// Puts a device back on vfio after it came back (boot, hotplug), with
    /// the full checks of a bind.
    async fn rebind_to_vfio(&self, record: &DeviceRecord) {
        if !self.options.privileged {
            return;
        }
        let lock = self.op_lock(Self::lock_key(record));
        let _group = lock.lock().await;
        let Some(current) = self.snapshot().get_by_address(&record.pci_address).cloned() else {
            return;
        };
        let with_group = !current.companions.is_empty();
        // It is ours again to restore: take the driver it came back with as
        // the one to return to only if we have none recorded.
        let req = BindRequest {
            with_group,
            dry_run: false,
        };
        tracing::info!(device = %record.pci_address, "restoring the vfio binding vfiod holds for this device (vfiod's own action: after a restart, a re-plug or a reclaim)");
        let mut current = current;
        current.bound_by_vfiod = false;
        if let Err(e) = self.bind_locked(Caller::AGENT, &current, req).await {
            tracing::error!(device = %record.pci_address, error = %e, "could not put a returning device back on vfio");
        }
    }

    /// Rebinds in the background so the event loop keeps up with the bus.
    fn spawn_rebind(&self, record: DeviceRecord) {
        if let Some(core) = self.me.upgrade() {
            tokio::spawn(async move { core.rebind_to_vfio(&record).await });
        }
    }

    pub async fn handle_hotplug(&self, event: HotplugEvent) {
        match event {
            HotplugEvent::Remove(addr) => {
                let device = self
                    .update_device(addr, |d| {
                        d.present = false;
                        d.current_driver = None;
                    })
                    .await
                    .ok()
                    .flatten();
                if let Some(d) = &device {
                    tracing::warn!(device = %addr, id = %d.id, attached_to = ?d.attached_to, "registered device left the bus");
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
                let device = self
                    .update_device(addr, |d| {
                        d.present = true;
                        d.current_driver = function.driver.clone();
                        d.iommu_group = function.iommu_group;
                        d.identity_mismatch = !d.is_same_device(&function);
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
                let Some(device) = device else { return };
                if device.identity_mismatch {
                    tracing::error!(device = %addr, expected = format!("{:04x}:{:04x}", device.vendor_id, device.device_id), found = format!("{:04x}:{:04x}", function.vendor_id, function.device_id), "a different device answers at a registered address; leaving it alone");
                    self.events
                        .publish(self.publish(EventKind::IdentityMismatch, &device).detail(
                            format!(
                                "found {:04x}:{:04x} subsystem {:04x}:{:04x}",
                                function.vendor_id,
                                function.device_id,
                                function.subsystem_vendor_id,
                                function.subsystem_device_id
                            ),
                        ));
                } else if is_add && self.wants_vfio(&device) && !device.bound_to_vfio() {
                    self.spawn_rebind(device);
                }
            }
            HotplugEvent::Bind { address, driver } => {
                let driver = driver.or_else(|| self.sysfs().driver(&address));
                let device = self
                    .update_device(address, |d| d.current_driver = driver.clone())
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
                    let stolen = d.bound_by_vfiod
                        && d.pending.is_none()
                        && !d.stuck
                        && !driver.as_deref().is_some_and(is_vfio_driver);
                    if stolen {
                        tracing::warn!(device = %address, driver = ?driver, "a device vfiod holds on vfio was bound to another driver by someone else");
                        self.events
                            .publish(self.publish(EventKind::DriverStolen, &d).driver(driver));
                        if self.options.reclaim {
                            self.spawn_rebind(d);
                        }
                    }
                }
            }
            HotplugEvent::Unbind(addr) => {
                let device = self
                    .update_device(addr, |d| d.current_driver = None)
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

fn ensure_not_attached(record: &DeviceRecord) -> Result<(), CoreError> {
    match &record.attached_to {
        Some(instance) => Err(CoreError::InUse {
            device: record.name.clone(),
            instance: instance.clone(),
        }),
        None => Ok(()),
    }
}

fn restore_moves(record: &DeviceRecord) -> Vec<Move> {
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
