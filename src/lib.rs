#![warn(missing_docs)]
//! vfiod: a PCI passthrough host agent.
//!
//! The crate is laid out by concern:
//! - [`pci`]: addresses, the sysfs model (functions, drivers, IOMMU
//!   groups) over a configurable root, and `pci.ids` names;
//! - [`proc`]: the `/proc` file formats, for the holder scan, the
//!   processes attachments follow and the agent's own metrics;
//! - [`engine`]: the exact sysfs sequences that move a device to vfio and
//!   back, with timeouts, verification and rollback;
//! - [`registry`]: the device records and their durable store;
//! - [`core`]: the one owner of the registry and of every driver move,
//!   serialising per IOMMU group;
//! - [`events`]: the event bus behind `GET /events`;
//! - [`hotplug`]: the udev watcher feeding the core;
//! - [`udev_rule`]: the generated rule that claims vfio devices at boot;
//! - [`api`]: HTTP over a Unix socket, a thin translation to the core;
//! - [`systemd`]: socket activation, readiness, watchdog, journald;
//! - [`config`]: defaults, config file and flags;
//! - [`crashpoint`]: numbered steps for the crash-point tests.

/// Worker threads of the daemon's async runtime: the API, the core and
/// the hotplug loop share them (blocking work goes to tokio's blocking
/// pool). The benchmark gives its ceilings as many.
pub const RUNTIME_WORKER_THREADS: usize = 2;

pub mod api;
pub mod config;
pub mod core;
pub mod crashpoint;
pub mod engine;
pub mod error;
pub mod events;
pub mod hotplug;
pub mod lockfile;
pub mod metrics;
pub mod path_error;
pub mod pci;
pub mod proc;
pub mod registry;
pub mod systemd;
pub mod udev_rule;
