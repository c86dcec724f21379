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
        } else if how.give_back && device.bound_by_vfiod() && device.companions().is_empty() {
            // Off the bus there is nothing to move: the record keeps the
            // give-back instead, so that the device returns to the driver
            // the kernel probes for it. Left bound, vfiod would take it
            // back to vfio on its return, undoing what was asked. (With
            // companions the binding also says what to give back of the
            // rest of the group; it stays until the device returns.)
            device = self
                .update_device(device.pci_address, |d| d.binding = None)
                .await?
                .unwrap_or(device);
        }
        Ok(device)
    }
}
