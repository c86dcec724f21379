//! The JSON shapes on the wire. `Device` carries hypeman's fields exactly
//! (names, types, `null`s) followed by vfiod's extensions.
//!
//! vfiod serialises these borrowing from its records (`Cow::Borrowed`, no
//! copies); vfioctl deserialises the same types, owned. Field order is the
//! order on the wire.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

use crate::core::{BindPlan, Health, ResetPlan};
use crate::pci::holders::Holder;
use crate::pci::{is_vfio_driver, DeviceType, PciAddress, PciFunction, PciIds};
use crate::registry::{
    DeviceRecord, Health as DeviceHealth, LastReset, MediatedDevice, PendingOp, ResetResult,
};

/// A registered device as `GET /devices` shows it: hypeman's fields, then
/// vfiod's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device<'a> {
    /// Generated at registration; stable across renames.
    pub id: Cow<'a, str>,
    /// Unique; usable wherever an id is.
    pub name: Cow<'a, str>,
    /// `gpu` or `pci`, derived from the class code.
    #[serde(rename = "type")]
    pub kind: DeviceType,
    /// Domain:bus:device.function, as sysfs names it.
    pub pci_address: PciAddress,
    /// Four lower-case hex digits, no `0x` (hypeman's form).
    pub vendor_id: String,
    /// Four lower-case hex digits, no `0x`.
    pub device_id: String,
    /// -1 when the device has no IOMMU group (IOMMU off).
    pub iommu_group: i64,
    /// Usable by a VMM through VFIO now, whether or not vfiod put it there:
    /// on a vfio driver, or a vGPU VF on its own provider (`nvidia`).
    pub bound_to_vfio: bool,
    /// The instance holding it; null when detached.
    pub attached_to: Option<Cow<'a, str>>,
    /// Registration time, RFC 3339 UTC to the second.
    pub created_at: String,
    /// The caller's labels, in key order.
    pub tags: Cow<'a, BTreeMap<String, String>>,
    // Extensions.
    /// False while unplugged; the record stays.
    pub present: bool,
    /// Null when the function has no driver or is absent.
    pub current_driver: Option<Cow<'a, str>>,
    /// Where a release gives it back; null if it had no driver or was on vfio
    /// when registered.
    pub original_driver: Option<Cow<'a, str>>,
    /// vfiod owes it a give-back; false for a device found already on vfio.
    pub bound_by_vfiod: bool,
    /// From `pci.ids`; null when the host's database lacks it.
    pub vendor_name: Option<Cow<'a, str>>,
    /// From `pci.ids`; null when the host's database lacks it.
    pub device_name: Option<Cow<'a, str>>,
    /// 24-bit class code, six hex digits.
    pub class: String,
    /// Four hex digits; tells apart boards that share a chip.
    pub subsystem_vendor_id: String,
    /// Four hex digits.
    pub subsystem_device_id: String,
    /// Left out unless a move is recorded and unfinished (a crash, or one in
    /// flight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// A sysfs write for it is hung in the kernel; moves are refused until it
    /// returns.
    pub stuck: bool,
    /// A different device answers at the address now; delete and re-register.
    pub identity_mismatch: bool,
    /// Functions moved with it by `with_group`; left out when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_companions: Vec<PciAddress>,
    /// The uid the attachment opens the VFIO nodes to; null when detached.
    pub attached_uid: Option<u32>,
    /// The VMM process whose exit ends the attachment, if one was named.
    pub attached_pid: Option<u32>,
    /// `ok`, `needs_reset`, `quarantined` or `needs_host_reboot`.
    pub health: DeviceHealth,
    /// Why health is not `ok`; null when it is.
    pub health_reason: Option<Cow<'a, str>>,
    /// Null until vfiod has reset it once.
    pub last_reset: Option<LastResetWire<'a>>,
    /// The device's own reset method order (PATCH), or null for the
    /// kernel's.
    pub reset_method: Option<Cow<'a, [String]>>,
    /// On a VF vfiod made: its PF's id; left out otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Cow<'a, str>>,
    /// On a VF vfiod made: N of its PF's `virtfnN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vf_index: Option<u32>,
    /// On a PF with a declared VF count: the count and `vf_driver`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sriov: Option<SriovWire>,
    /// On an mdev parent: the mediated devices vfiod made on it; left out
    /// when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mdevs: Vec<MdevWire>,
}

/// A mediated device vfiod made for a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdevWire {
    /// Its UUID.
    pub uuid: String,
    /// The type's id (`nvidia-63`).
    pub mdev_type: String,
    /// What QEMU takes as `-device vfio-pci,sysfsdev=...`.
    pub sysfs_path: String,
    /// The claim's instance.
    pub instance_id: String,
    /// The uid its VFIO nodes are open to; null while it is being made.
    pub attached_uid: Option<u32>,
    /// The VMM whose exit ends it, if one was named.
    pub attached_pid: Option<u32>,
}

impl MdevWire {
    /// The wire form of a recorded mediated device.
    pub fn new(m: &MediatedDevice) -> MdevWire {
        MdevWire {
            uuid: m.uuid.to_string(),
            mdev_type: m.mdev_type.clone(),
            sysfs_path: crate::core::mdev_sysfs_path(&m.uuid),
            instance_id: m.claim.instance_id.clone(),
            attached_uid: m.attachment.as_ref().and_then(|a| a.uid),
            attached_pid: m.attachment.as_ref().and_then(|a| a.pid.map(|p| p.pid)),
        }
    }
}

/// `GET /devices/{id_or_name}/mdev_types`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MdevTypes<'a> {
    /// The parent's id.
    pub id: Cow<'a, str>,
    /// The parent's name.
    pub name: Cow<'a, str>,
    /// The parent's address.
    pub pci_address: PciAddress,
    /// What it offers now (empty: no mdev parent now).
    pub mdev_types: Vec<crate::pci::MdevType>,
    /// The mediated devices vfiod made on it.
    pub mdevs: Vec<MdevWire>,
}

/// `POST /devices/claim`: the device handed out (or the parent of the
/// mediated device), and the mediated device for an `mdev_type` claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimAnswer<'a> {
    /// The device, as `GET /devices/{id}` shows it.
    #[serde(flatten)]
    pub device: Device<'a>,
    /// Left out for a whole device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdev: Option<MdevWire>,
}

/// A PF's declared VF count, as its device shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovWire {
    /// The count vfiod keeps.
    pub desired_vfs: u32,
    /// What new VFs are given.
    pub vf_driver: crate::registry::VfDriver,
}

/// The driver move a device has recorded and not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pending {
    /// Moving to vfio.
    Bind,
    /// Giving back to the original driver.
    Unbind,
    /// A reset, possibly with `reset_method` changed for it.
    Reset,
}

/// The last reset as sent: the time as an RFC 3339 string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastResetWire<'a> {
    /// The method asked for (`auto` or a kernel method name).
    pub method: Cow<'a, str>,
    /// RFC 3339 UTC with milliseconds.
    pub at: String,
    /// `ok`, `failed` or `timeout`.
    pub result: ResetResult,
    /// Milliseconds the reset took.
    pub duration_ms: u64,
}

impl<'a> LastResetWire<'a> {
    fn new(r: &'a LastReset) -> Self {
        LastResetWire {
            method: Cow::Borrowed(&r.method),
            at: r.at.to_rfc3339_opts(SecondsFormat::Millis, true),
            result: r.result,
            duration_ms: r.duration_ms,
        }
    }
}

fn hex4(v: u16) -> String {
    format!("{v:04x}")
}

fn hex6(v: u32) -> String {
    format!("{v:06x}")
}

impl<'a> Device<'a> {
    /// Borrows from the record; only the hex strings and timestamps are built.
    /// `ids` supplies the names.
    pub fn new(d: &'a DeviceRecord, ids: &'a PciIds) -> Device<'a> {
        let borrowed = |s: &'a Option<String>| s.as_deref().map(Cow::Borrowed);
        Device {
            id: Cow::Borrowed(&d.id),
            name: Cow::Borrowed(&d.name),
            kind: crate::pci::device_type(d.class),
            pci_address: d.pci_address,
            vendor_id: hex4(d.vendor_id),
            device_id: hex4(d.device_id),
            iommu_group: d.iommu_group.map_or(-1, i64::from),
            bound_to_vfio: d.usable_through_vfio(),
            attached_to: d.attached_to().map(Cow::Borrowed),
            created_at: d.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            tags: Cow::Borrowed(&d.tags),
            present: d.present,
            current_driver: borrowed(&d.current_driver),
            original_driver: borrowed(&d.original_driver),
            bound_by_vfiod: d.bound_by_vfiod(),
            vendor_name: ids.vendor_name(d.vendor_id).map(Cow::Borrowed),
            device_name: ids.device_name(d.vendor_id, d.device_id).map(Cow::Borrowed),
            class: hex6(d.class),
            subsystem_vendor_id: hex4(d.subsystem_vendor_id),
            subsystem_device_id: hex4(d.subsystem_device_id),
            pending: d.pending.as_ref().map(|p| match p {
                PendingOp::Bind { .. } => Pending::Bind,
                PendingOp::Unbind => Pending::Unbind,
                PendingOp::Reset { .. } => Pending::Reset,
            }),
            stuck: d.stuck,
            identity_mismatch: d.identity_mismatch,
            group_companions: d.companions().iter().map(|c| c.pci_address).collect(),
            health: d.health.state,
            health_reason: borrowed(&d.health.reason),
            last_reset: d.health.last_reset.as_ref().map(LastResetWire::new),
            reset_method: d.reset_method.as_deref().map(Cow::Borrowed),
            attached_uid: d.attached_uid(),
            attached_pid: d.attached_pid().map(|p| p.pid),
            parent: d.vf.as_ref().map(|v| Cow::Borrowed(v.parent_id.as_str())),
            vf_index: d.vf.as_ref().map(|v| v.index),
            sriov: d.sriov.as_ref().map(|c| SriovWire {
                desired_vfs: c.desired_vfs,
                vf_driver: c.vf_driver,
            }),
            mdevs: d.mdevs.iter().map(MdevWire::new).collect(),
        }
    }
}

/// A function of `GET /devices/available`: any PCI function on the host,
/// registered or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AvailableDevice<'a> {
    /// Domain:bus:device.function.
    pub pci_address: PciAddress,
    /// Four lower-case hex digits, no `0x`.
    pub vendor_id: String,
    /// Four lower-case hex digits, no `0x`.
    pub device_id: String,
    /// Left out, not `null`, when `pci.ids` has no name: hypeman's schema
    /// has these as optional strings that are never null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor_name: Option<Cow<'a, str>>,
    /// Left out, not `null`, when `pci.ids` has no name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_name: Option<Cow<'a, str>>,
    /// -1 when the device has no IOMMU group.
    pub iommu_group: i64,
    /// Null when no driver is bound.
    pub current_driver: Option<Cow<'a, str>>,
    // Extensions.
    /// `gpu` or `pci`, derived from the class code.
    #[serde(rename = "type")]
    pub kind: DeviceType,
    /// 24-bit class code, six hex digits.
    pub class: String,
    /// On a vfio driver now.
    pub bound_to_vfio: bool,
    /// The registered device's id, if any.
    pub registered_id: Option<Cow<'a, str>>,
}

impl<'a> AvailableDevice<'a> {
    /// `registered_id` is the record at this address, if there is one.
    pub fn new(f: &'a PciFunction, ids: &'a PciIds, registered_id: Option<&'a str>) -> Self {
        AvailableDevice {
            pci_address: f.address,
            vendor_id: hex4(f.vendor_id),
            device_id: hex4(f.device_id),
            vendor_name: ids.vendor_name(f.vendor_id).map(Cow::Borrowed),
            device_name: ids.device_name(f.vendor_id, f.device_id).map(Cow::Borrowed),
            iommu_group: f.iommu_group.map_or(-1, i64::from),
            current_driver: f.driver.as_deref().map(Cow::Borrowed),
            kind: crate::pci::device_type(f.class),
            class: hex6(f.class),
            bound_to_vfio: f.driver.as_deref().is_some_and(is_vfio_driver) || f.own_vfio_provider,
            registered_id: registered_id.map(Cow::Borrowed),
        }
    }
}

/// A change asked for with `dry_run`: the device, the plan, nothing done.
/// `POST .../bind` answers a [`BindPlan`] (the default), `POST .../reset`
/// a [`ResetPlan`] ([`ResetDryRun`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(
    serialize = "Plan: Serialize",
    deserialize = "Plan: Deserialize<'de> + Clone"
))]
pub struct DryRun<'a, Plan: Clone = BindPlan> {
    /// Always true: says the answer is a plan, not a result.
    pub dry_run: bool,
    /// The device as it is now, before the plan.
    pub device: Device<'a>,
    /// What would be done, step by step.
    pub plan: Cow<'a, Plan>,
}

/// `POST .../reset` with `dry_run`: the method and scope, nothing done.
pub type ResetDryRun<'a> = DryRun<'a, ResetPlan>;

impl<'a, Plan: Clone> DryRun<'a, Plan> {
    /// Marks the answer `dry_run: true`.
    pub fn new(device: Device<'a>, plan: &'a Plan) -> Self {
        DryRun {
            dry_run: true,
            device,
            plan: Cow::Borrowed(plan),
        }
    }
}

/// `GET /health`: a status plus the daemon's facts flattened beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthBody<'a> {
    /// Always `ok`: the daemon answered; the fields beside it say what works.
    pub status: Cow<'a, str>,
    /// Version, uptime, VFIO and IOMMU availability, flattened into the body.
    #[serde(flatten)]
    pub health: Cow<'a, Health>,
}

/// `GET /devices/{id_or_name}/holders`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holders<'a> {
    /// The registered device's id.
    pub id: Cow<'a, str>,
    /// The registered device's name.
    pub name: Cow<'a, str>,
    /// The device's address; holders may sit on group companions.
    pub pci_address: PciAddress,
    /// Empty when nothing holds it or its group.
    pub holders: Cow<'a, [Holder]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ScopeFunction;
    use crate::engine::Move;
    use crate::pci::holders::Holder;
    use crate::registry::tests::record;
    use crate::registry::{
        AttachedProcess, Attachment, Binding, Companion, Health as DeviceHealth, PendingOp,
    };

    fn ids() -> PciIds {
        PciIds::parse("10de  NVIDIA Corporation\n\t2236  GA102GL [A10]\n8086  Intel Corporation\n")
    }

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    /// Every optional part of a device set: attached for a uid and a VMM,
    /// moved with a companion, a reset pending after one that timed out.
    fn attached() -> DeviceRecord {
        let mut d = record("0000:01:00.0", "gpu0", "m2lp93h0ru0rrfojug4e64rk");
        d.created_at = "2026-12-07T01:34:48Z".parse().unwrap();
        d.tags = [("team".to_owned(), "ml".to_owned())].into();
        d.attachment = Some(Attachment {
            instance: "vm-7".into(),
            uid: Some(64055),
            pid: Some(AttachedProcess {
                pid: 4242,
                start_time: 99,
            }),
        });
        d.binding = Some(Binding {
            vfio_driver: "vfio-pci".into(),
            companions: vec![Companion {
                pci_address: addr("0000:01:00.1"),
                original_driver: Some("snd_hda_intel".into()),
            }],
            released_consoles: vec![],
        });
        d.current_driver = Some("vfio-pci".into());
        d.pending = Some(PendingOp::Reset {
            restore_reset_method: None,
        });
        d.present = true;
        d.stuck = true;
        d.health.state = DeviceHealth::NeedsReset;
        d.health.reason = Some("reset timed out".into());
        d.health.last_reset = Some(LastReset {
            method: "flr".into(),
            at: "2026-12-07T01:40:02.125Z".parse().unwrap(),
            result: ResetResult::Timeout,
            duration_ms: 139,
        });
        d.reset_method = Some(vec!["flr".into(), "pm".into()]);
        d
    }

    /// Nothing optional: unnamed in pci.ids, no IOMMU group, never moved,
    /// unplugged.
    fn bare() -> DeviceRecord {
        let mut d = record("0000:00:03.0", "edu", "q0v4x7yd1p2oq8m5lbn3zr6c");
        d.created_at = "2026-12-05T08:00:00Z".parse().unwrap();
        d.vendor_id = 0x1234;
        d.device_id = 0x11e8;
        d.class = 0x00ff00;
        d.iommu_group = None;
        d.original_driver = None;
        d.current_driver = None;
        d.present = false;
        d
    }

    const ATTACHED: &str = r#"{"id":"m2lp93h0ru0rrfojug4e64rk","name":"gpu0","type":"gpu","pci_address":"0000:01:00.0","vendor_id":"10de","device_id":"2236","iommu_group":1,"bound_to_vfio":true,"attached_to":"vm-7","created_at":"2026-12-07T01:34:48Z","tags":{"team":"ml"},"present":true,"current_driver":"vfio-pci","original_driver":"nvidia","bound_by_vfiod":true,"vendor_name":"NVIDIA Corporation","device_name":"GA102GL [A10]","class":"030200","subsystem_vendor_id":"0000","subsystem_device_id":"0000","pending":"reset","stuck":true,"identity_mismatch":false,"group_companions":["0000:01:00.1"],"attached_uid":64055,"attached_pid":4242,"health":"needs_reset","health_reason":"reset timed out","last_reset":{"method":"flr","at":"2026-12-07T01:40:02.125Z","result":"timeout","duration_ms":139},"reset_method":["flr","pm"]}"#;

    const BARE: &str = r#"{"id":"q0v4x7yd1p2oq8m5lbn3zr6c","name":"edu","type":"pci","pci_address":"0000:00:03.0","vendor_id":"1234","device_id":"11e8","iommu_group":-1,"bound_to_vfio":false,"attached_to":null,"created_at":"2026-12-05T08:00:00Z","tags":{},"present":false,"current_driver":null,"original_driver":null,"bound_by_vfiod":false,"vendor_name":null,"device_name":null,"class":"00ff00","subsystem_vendor_id":"0000","subsystem_device_id":"0000","stuck":false,"identity_mismatch":false,"attached_uid":null,"attached_pid":null,"health":"ok","health_reason":null,"last_reset":null,"reset_method":null}"#;

    fn json(value: &impl Serialize) -> String {
        serde_json::to_string(value).unwrap()
    }

    #[test]
    fn device_wire_bytes() {
        let ids = ids();
        assert_eq!(json(&Device::new(&attached(), &ids)), ATTACHED);
        assert_eq!(json(&Device::new(&bare(), &ids)), BARE);
    }

    #[test]
    fn available_device_leaves_out_missing_names() {
        let ids = ids();
        let function = |address: &str, vendor_id, device_id, driver: Option<&str>| PciFunction {
            address: addr(address),
            vendor_id,
            device_id,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x030200,
            driver: driver.map(str::to_owned),
            iommu_group: Some(1),
            modalias: None,
            own_vfio_provider: false,
        };
        let named = function("0000:01:00.0", 0x10de, 0x2236, Some("vfio-pci"));
        assert_eq!(
            json(&AvailableDevice::new(
                &named,
                &ids,
                Some("m2lp93h0ru0rrfojug4e64rk")
            )),
            r#"{"pci_address":"0000:01:00.0","vendor_id":"10de","device_id":"2236","vendor_name":"NVIDIA Corporation","device_name":"GA102GL [A10]","iommu_group":1,"current_driver":"vfio-pci","type":"gpu","class":"030200","bound_to_vfio":true,"registered_id":"m2lp93h0ru0rrfojug4e64rk"}"#
        );
        let vendor_only = function("0000:00:02.0", 0x8086, 0x10d3, None);
        assert_eq!(
            json(&AvailableDevice::new(&vendor_only, &ids, None)),
            r#"{"pci_address":"0000:00:02.0","vendor_id":"8086","device_id":"10d3","vendor_name":"Intel Corporation","iommu_group":1,"current_driver":null,"type":"gpu","class":"030200","bound_to_vfio":false,"registered_id":null}"#
        );
    }

    fn console() -> Holder {
        Holder::FramebufferConsole {
            pci_address: addr("0000:01:00.0"),
            vtconsole: "vtcon1".into(),
            framebuffer: "fb0".into(),
        }
    }

    #[test]
    fn dry_run_wire_bytes() {
        let ids = ids();
        let record = bare();
        let plan = BindPlan {
            vfio_driver: "vfio-pci".into(),
            iommu_group: 3,
            moves: vec![
                Move {
                    pci_address: addr("0000:00:03.0"),
                    from: None,
                    to: Some("vfio-pci".into()),
                },
                Move::restore(addr("0000:00:03.1"), Some("snd_hda_intel".into())),
            ],
            steps: vec!["write 0000:00:03.0 to /sys/bus/pci/drivers_probe".into()],
            holders: vec![console()],
            already_bound: false,
        };
        let dry_run = DryRun {
            dry_run: true,
            device: Device::new(&record, &ids),
            plan: Cow::Borrowed(&plan),
        };
        assert_eq!(
            json(&dry_run),
            format!(
                r#"{{"dry_run":true,"device":{BARE},"plan":{{"vfio_driver":"vfio-pci","iommu_group":3,"moves":[{{"pci_address":"0000:00:03.0","from":null,"to":"vfio-pci"}},{{"pci_address":"0000:00:03.1","from":"snd_hda_intel"}}],"steps":["write 0000:00:03.0 to /sys/bus/pci/drivers_probe"],"holders":[{{"kind":"framebuffer_console","pci_address":"0000:01:00.0","vtconsole":"vtcon1","framebuffer":"fb0"}}],"already_bound":false}}}}"#
            )
        );
        let plan = ResetPlan {
            method: "auto".into(),
            methods: vec!["flr".into(), "pm".into()],
            scope: vec![
                ScopeFunction {
                    pci_address: addr("0000:00:03.0"),
                    driver: None,
                    iommu_group: None,
                },
                ScopeFunction {
                    pci_address: addr("0000:00:03.1"),
                    driver: Some("snd_hda_intel".into()),
                    iommu_group: Some(3),
                },
            ],
            steps: vec!["write \"1\" to /sys/bus/pci/devices/0000:00:03.0/reset".into()],
        };
        let dry_run = ResetDryRun {
            dry_run: true,
            device: Device::new(&record, &ids),
            plan: Cow::Borrowed(&plan),
        };
        assert_eq!(
            json(&dry_run),
            format!(
                r#"{{"dry_run":true,"device":{BARE},"plan":{{"method":"auto","methods":["flr","pm"],"scope":[{{"pci_address":"0000:00:03.0","driver":null,"iommu_group":null}},{{"pci_address":"0000:00:03.1","driver":"snd_hda_intel","iommu_group":3}}],"steps":["write \"1\" to /sys/bus/pci/devices/0000:00:03.0/reset"]}}}}"#
            )
        );
    }

    fn every_holder() -> Vec<Holder> {
        let gpu = addr("0000:01:00.0");
        vec![
            Holder::Process {
                pci_address: gpu,
                pid: 812,
                comm: "Xorg".into(),
                uid: 0,
                path: "/dev/dri/card0".into(),
                unit: Some("gdm.service".into()),
            },
            Holder::Process {
                pci_address: gpu,
                pid: 4410,
                comm: "nvidia-smi".into(),
                uid: 1000,
                path: "/dev/nvidia0".into(),
                unit: None,
            },
            Holder::Mount {
                pci_address: gpu,
                device: "/dev/nvme0n1p2".into(),
                mount_point: "/".into(),
                fstype: "ext4".into(),
            },
            Holder::Swap {
                pci_address: gpu,
                device: "/dev/nvme0n1p3".into(),
            },
            Holder::BlockStack {
                pci_address: gpu,
                device: "nvme0n1p4".into(),
                holder: "dm-0".into(),
            },
            Holder::NetInterface {
                pci_address: gpu,
                interface: "eno1".into(),
                addresses: vec!["192.0.2.4/24".into()],
                routes: 2,
            },
            console(),
        ]
    }

    #[test]
    fn holders_wire_bytes() {
        let holders = every_holder();
        let answer = Holders {
            id: "m2lp93h0ru0rrfojug4e64rk".into(),
            name: "gpu0".into(),
            pci_address: addr("0000:01:00.0"),
            holders: Cow::Borrowed(&holders),
        };
        assert_eq!(
            json(&answer),
            r#"{"id":"m2lp93h0ru0rrfojug4e64rk","name":"gpu0","pci_address":"0000:01:00.0","holders":[{"kind":"process","pci_address":"0000:01:00.0","pid":812,"comm":"Xorg","uid":0,"path":"/dev/dri/card0","unit":"gdm.service"},{"kind":"process","pci_address":"0000:01:00.0","pid":4410,"comm":"nvidia-smi","uid":1000,"path":"/dev/nvidia0"},{"kind":"mount","pci_address":"0000:01:00.0","device":"/dev/nvme0n1p2","mount_point":"/","fstype":"ext4"},{"kind":"swap","pci_address":"0000:01:00.0","device":"/dev/nvme0n1p3"},{"kind":"block_stack","pci_address":"0000:01:00.0","device":"nvme0n1p4","holder":"dm-0"},{"kind":"net_interface","pci_address":"0000:01:00.0","interface":"eno1","addresses":["192.0.2.4/24"],"routes":2},{"kind":"framebuffer_console","pci_address":"0000:01:00.0","vtconsole":"vtcon1","framebuffer":"fb0"}]}"#
        );
    }

    fn health() -> Health {
        Health {
            version: "0.1.0".into(),
            uptime_s: 5012,
            vfio_pci_available: true,
            iommu_enabled: true,
            privileged: false,
            registered_devices: 2,
            hotplug: "udev".into(),
            pci_ids: None,
            last_event_seq: 41,
            vfio_container_usable_by_all: false,
        }
    }

    #[test]
    fn health_wire_bytes() {
        let health = health();
        let body = HealthBody {
            status: "ok".into(),
            health: Cow::Borrowed(&health),
        };
        assert_eq!(
            json(&body),
            r#"{"status":"ok","version":"0.1.0","uptime_s":5012,"vfio_pci_available":true,"iommu_enabled":true,"privileged":false,"registered_devices":2,"hotplug":"udev","pci_ids":null,"last_event_seq":41,"vfio_container_usable_by_all":false}"#
        );
    }

    /// What vfioctl reads back from `text`, serialised again.
    fn reread<T: Serialize + serde::de::DeserializeOwned>(text: &str) -> (T, String) {
        let read: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let again = json(&read);
        (read, again)
    }

    #[test]
    fn device_deserialises_to_the_value_serialised() {
        let ids = ids();
        for record in [attached(), bare()] {
            let sent = Device::new(&record, &ids);
            let text = json(&sent);
            let (read, again) = reread::<Device<'static>>(&text);
            assert_eq!(read, sent);
            assert_eq!(again, text);
        }
    }

    #[test]
    fn every_answer_reads_back_to_its_own_bytes() {
        let ids = ids();
        let record = attached();
        let function = PciFunction {
            address: addr("0000:00:02.0"),
            vendor_id: 0x8086,
            device_id: 0x10d3,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x020000,
            driver: None,
            iommu_group: None,
            modalias: None,
            own_vfio_provider: false,
        };
        let available = AvailableDevice::new(&function, &ids, None);
        let (read, again) = reread::<AvailableDevice<'static>>(&json(&available));
        assert_eq!(read, available);
        assert_eq!(again, json(&available));

        let bind_plan = BindPlan {
            vfio_driver: "vfio-pci".into(),
            iommu_group: 1,
            moves: vec![Move::restore(addr("0000:01:00.0"), None)],
            steps: vec!["check /dev/vfio/1 exists".into()],
            holders: every_holder(),
            already_bound: false,
        };
        let text = json(&DryRun {
            dry_run: true,
            device: Device::new(&record, &ids),
            plan: Cow::Borrowed(&bind_plan),
        });
        assert_eq!(reread::<DryRun<'static>>(&text).1, text);

        let reset_plan = ResetPlan {
            method: "flr".into(),
            methods: vec!["flr".into()],
            scope: vec![ScopeFunction {
                pci_address: addr("0000:01:00.0"),
                driver: None,
                iommu_group: Some(1),
            }],
            steps: vec![],
        };
        let text = json(&ResetDryRun {
            dry_run: true,
            device: Device::new(&record, &ids),
            plan: Cow::Borrowed(&reset_plan),
        });
        assert_eq!(reread::<ResetDryRun<'static>>(&text).1, text);

        let holders = every_holder();
        let text = json(&Holders {
            id: "m2lp93h0ru0rrfojug4e64rk".into(),
            name: "gpu0".into(),
            pci_address: addr("0000:01:00.0"),
            holders: Cow::Borrowed(&holders),
        });
        let (read, again) = reread::<Holders<'static>>(&text);
        assert_eq!(read.holders, holders);
        assert_eq!(again, text);

        let health = health();
        let text = json(&HealthBody {
            status: "ok".into(),
            health: Cow::Borrowed(&health),
        });
        assert_eq!(reread::<HealthBody<'static>>(&text).1, text);
    }
}
