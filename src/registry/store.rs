//! The registry's one state file, `state.json` in the state directory.
//!
//! Every save writes a temporary file, fsyncs it, renames it over the old
//! one and fsyncs the directory, so a crash at any instant leaves either
//! the previous or the new registry on disk, never a torn one. A file that
//! does not parse, or carries a version this build does not know, stops
//! startup: it is the operator's data and is never overwritten silently.
//! An exclusive `flock` on `state.lock` keeps a second daemon off the same
//! directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use super::{DeviceRecord, Registry};
use crate::crashpoint::{self, Stage, StepKind};
use crate::path_error::PathError;

/// Version 2 splits a record into its parts (binding, attachment,
/// health); version 1 files are migrated when read.
pub const STATE_VERSION: u32 = 2;
const STATE_FILE: &str = "state.json";

/// Why the registry could not be loaded or saved; a load error stops startup.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The filesystem refused (read, write, fsync, rename); the path and errno
    /// are inside.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The state file does not parse, or holds duplicate ids, names or
    /// addresses.
    #[error("state file {path} is corrupt ({detail}); refusing to start. Fix or move it away; vfiod never overwrites it")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parser's message or the duplicate found.
        detail: String,
    },
    /// Written by a newer vfiod; this one will not guess at it.
    #[error("state file {path} has version {found}, this vfiod reads version {STATE_VERSION}; refusing to start")]
    UnknownVersion {
        /// The state file.
        path: PathBuf,
        /// The version it declares.
        found: u32,
    },
    /// Another vfiod holds the directory's lock; two daemons would overwrite
    /// each other's registry.
    #[error("state directory {path} is in use by another vfiod (lock held)")]
    Locked {
        /// The state directory.
        path: PathBuf,
    },
}

impl StoreError {
    /// The errno of an I/O failure, to tell a full disk from a broken one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            StoreError::Io(e) => e.errno(),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    devices: Vec<DeviceRecord>,
}

#[derive(Deserialize)]
struct StateFileV1 {
    devices: Vec<super::v1::RecordV1>,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// The registry's durable copy: `state.json` in the state directory, held under
/// an exclusive lock for the process's life.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating if needed, mode 0750) the state directory and takes
    /// its lock.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(PathError::at("create directory", dir))?;
        let lock_path = dir.join("state.lock");
        let lock = crate::lockfile::try_lock(&lock_path)
            .map_err(PathError::at("lock", &lock_path))?
            .ok_or_else(|| StoreError::Locked {
                path: dir.to_owned(),
            })?;
        Ok(Store {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The state file's path, for messages.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Loads the registry; a missing file is an empty registry.
    pub fn load(&self) -> Result<Registry, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Registry::default()),
            Err(e) => return Err(PathError::at("read", &path)(e).into()),
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.clone(),
            detail,
        };
        let version: VersionOnly =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let devices = match version.version {
            STATE_VERSION => {
                let state: StateFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                state.devices
            }
            1 => {
                let state: StateFileV1 =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                tracing::info!(path = %path.display(), devices = state.devices.len(), "migrating the state file from version 1 to {STATE_VERSION} (written at the next change)");
                state.devices.into_iter().map(DeviceRecord::from).collect()
            }
            found => return Err(StoreError::UnknownVersion { path, found }),
        };
        Registry::from_records(devices).map_err(|e| corrupt(e.to_string()))
    }

    /// Durably replaces the state file with `registry`. Blocking.
    pub fn save(&self, registry: &Registry) -> Result<(), StoreError> {
        let state = StateFile {
            version: STATE_VERSION,
            devices: registry.iter().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&state).expect("registry serialises");
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let step = crashpoint::begin(StepKind::Commit);
        let result = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(PathError::at("create", &tmp))?;
            step.run(Stage::Write, || file.write_all(&bytes))
                .map_err(PathError::at("write", &tmp))?;
            step.run(Stage::Fsync, || file.sync_all())
                .map_err(PathError::at("fsync", &tmp))?;
            let path = self.path();
            step.run(Stage::Rename, || fs::rename(&tmp, &path))
                .map_err(PathError::at("rename", &path))?;
            let dir = File::open(&self.dir).map_err(PathError::at("open", &self.dir))?;
            nix::unistd::fsync(dir.as_fd())
                .map_err(|e| PathError::at("fsync", &self.dir)(io::Error::from(e)).into())
        })();
        if result.is_err() {
            // A half-written temporary file must not linger on a full disk.
            let _ = fs::remove_file(&tmp);
        }
        step.made(format_args!(
            "{} devices{}",
            state.devices.len(),
            if result.is_err() { " (failed)" } else { "" }
        ));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::record;
    use crate::registry::PendingOp;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfiod-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trips_and_second_opener_is_locked_out() {
        let dir = temp_dir("rt");
        let store = Store::open(&dir).unwrap();
        assert!(store.load().unwrap().is_empty());
        let mut reg = Registry::default();
        reg.insert(record("0000:01:00.0", "gpu0", "id0")).unwrap();
        store.save(&reg).unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked { .. })));
        let loaded = store.load().unwrap();
        assert_eq!(loaded.resolve("gpu0"), reg.resolve("gpu0"));
        assert!(!dir.join("state.json.tmp").exists());
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The state file of the last release with the flat record (version
    /// 1) loads into the parts, and is written back as version 2.
    #[test]
    fn a_version_1_state_file_is_migrated_into_parts() {
        let dir = temp_dir("v1");
        let store = Store::open(&dir).unwrap();
        let fixture = include_str!("../../tests/fixtures/state-v1.json");
        fs::write(store.path(), fixture).unwrap();
        let reg = store.load().unwrap();
        assert_eq!(reg.len(), 5);
        let nic = reg.resolve("nic").unwrap();
        let attachment = nic.attachment.as_ref().unwrap();
        assert_eq!(attachment.instance, "vm-1");
        assert_eq!(attachment.uid, Some(4242));
        assert!(attachment.pid.is_some());
        assert_eq!(nic.binding.as_ref().unwrap().vfio_driver, "vfio-pci");
        assert_eq!(nic.original_driver.as_deref(), Some("e1000e"));
        let gpu = reg.resolve("gpu").unwrap();
        assert_eq!(
            gpu.companions()
                .iter()
                .map(|c| (c.pci_address.to_string(), c.original_driver.clone()))
                .collect::<Vec<_>>(),
            vec![("0000:01:00.1".to_owned(), Some("snd_hda_intel".to_owned()))]
        );
        assert!(gpu.attachment.is_none());
        let t4 = reg.resolve("t4").unwrap();
        assert!(t4.binding.is_none(), "found on vfio-pci: not vfiod's");
        let nvme = reg.resolve("nvme").unwrap();
        assert_eq!(nvme.tags.get("pool").map(String::as_str), Some("a"));
        assert_eq!(
            nvme.reset_method.as_deref(),
            Some(&["flr".to_owned(), "bus".to_owned()][..])
        );
        assert_eq!(nvme.health, crate::registry::HealthRecord::default());
        store.save(&reg).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(written["version"], STATE_VERSION);
        assert_eq!(store.load().unwrap().resolve("gpu"), Some(gpu));
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Version 1 kept a pending bind's companions flat; they go with the
    /// pending bind, whose rollback needs them.
    #[test]
    fn a_version_1_pending_bind_keeps_its_companions() {
        let mut v1: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/state-v1.json")).unwrap();
        let gpu = v1["devices"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|d| d["name"] == "gpu")
            .unwrap();
        gpu["bound_by_vfiod"] = false.into();
        gpu["pending"] = serde_json::json!({"op": "bind", "vfio_driver": "vfio-pci"});
        let dir = temp_dir("v1-pending");
        let store = Store::open(&dir).unwrap();
        fs::write(store.path(), v1.to_string()).unwrap();
        let reg = store.load().unwrap();
        let gpu = reg.resolve("gpu").unwrap();
        assert!(gpu.binding.is_none());
        match &gpu.pending {
            Some(PendingOp::Bind { companions, .. }) => assert_eq!(companions.len(), 1),
            other => panic!("pending: {other:?}"),
        }
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_or_future_state_is_refused_and_left_alone() {
        let dir = temp_dir("bad");
        let store = Store::open(&dir).unwrap();
        fs::write(store.path(), b"{\"version\":1,\"devices\":[{\"id\":").unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("state.json"));
        fs::write(store.path(), b"{\"version\":9,\"devices\":[]}").unwrap();
        assert!(matches!(
            store.load(),
            Err(StoreError::UnknownVersion { found: 9, .. })
        ));
        assert_eq!(
            fs::read(store.path()).unwrap(),
            b"{\"version\":9,\"devices\":[]}"
        );
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }
}
