//! Release: the one sequence that ends a device's use, whoever asks for it
//! (unbind, delete, detach, a VMM's exit).
//!
//! In this order, each step guarded once:
//! 1. The attachment ends: its VMM loses access to the VFIO nodes before
//!    anything else happens to the device.
//! 2. The device is reset while it is still on vfio, before a host driver
//!    gets it back: only a device that was handed out (attached) or that
//!    vfiod is giving back, and never one whose write is stuck in the
//!    kernel (that write's return settles it).
//! 3. The device goes back to the driver it had before vfiod bound it, if
//!    the caller wants it given back, vfiod bound it, and it is on the bus
//!    (an absent device is given back when it returns: the record keeps
//!    the intent).

use super::operation::OpContext;
use super::Core;
use crate::error::CoreError;
use crate::events::EventKind;
use crate::registry::DeviceRecord;

/// How a release goes.
pub(super) struct Release {
    /// Why, for the health reason and the log ("detach", "delete", ...).
    pub why: String,
    /// How an attachment, if any, ends: its event and the event's detail.
    pub ends_attachment: Option<(EventKind, String)>,
    /// Give the device back to its original driver at the end.
    pub give_back: bool,
}

impl Release {
    /// A release that gives the device back (unbind, delete).
    pub fn give_back(why: &str) -> Release {
        Release {
            why: why.to_owned(),
            ends_attachment: None,
            give_back: true,
        }
    }
}

impl Core {
    /// Releases `record` (group lock held); returns the device as left.
    pub(super) async fn release(
        &self,
        ctx: &OpContext<'_>,
        record: &DeviceRecord,
        how: Release,
    ) -> Result<DeviceRecord, CoreError> {
        let was_attached = record.attached_to().is_some();
        let mut device = record.clone();
        if let (true, Some((kind, detail))) = (was_attached, how.ends_attachment) {
            device = self.end_attachment(ctx, &device, kind, detail).await?;
        }
        if !device.stuck && (was_attached || (how.give_back && device.bound_by_vfiod())) {
            device = self.reset_on_release(ctx, &device, &how.why).await;
        }
        if how.give_back && device.bound_by_vfiod() && device.present {
            if device.stuck {
                return Err(CoreError::DeviceStuck(device.pci_address));
            }
            device = self.give_back(ctx, &device).await?;
        }
        Ok(device)
    }
}
