//! What vfioctl prints without `--json`: tables and `key: value` lines,
//! read from the daemon's own wire types. `-` stands for none.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;

use hyper::StatusCode;
use serde::Deserialize;
use vfiod::api::error::ConflictingFunction;
use vfiod::api::wire::{
    AvailableDevice, ClaimAnswer, Device, HealthBody, Holders, LastResetWire, MdevTypes,
};
use vfiod::core::{BindPlan, Capacity, ResetPlan, SriovStatus, VgpuTypeCount};
use vfiod::events::{wire_time, Event};
use vfiod::pci::holders::Holder;

fn or_dash(value: Option<impl Display>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

/// Columns as wide as their widest cell, two spaces apart.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r, &mut out);
    }
    out
}

/// `key:` padded to `width`, then the value (a key as long as the width
/// runs into its value, as it always has).
fn field(out: &mut String, width: usize, key: &str, value: impl Display) {
    out.push_str(&format!("{:<width$}{value}\n", format!("{key}:")));
}

/// The vendor's and device's names from pci.ids, the ids where it has none.
fn names(vendor_name: Option<&str>, device_name: Option<&str>, ids: (&str, &str)) -> String {
    let (vendor_id, device_id) = ids;
    match (vendor_name.unwrap_or(""), device_name.unwrap_or("")) {
        ("", "") => format!("{vendor_id}:{device_id}"),
        (vendor, "") => format!("{vendor} {vendor_id}:{device_id}"),
        (vendor, device) => format!("{vendor} {device}"),
    }
}

fn device_names(d: &Device) -> String {
    names(
        d.vendor_name.as_deref(),
        d.device_name.as_deref(),
        (&d.vendor_id, &d.device_id),
    )
}

pub fn available_names(d: &AvailableDevice) -> String {
    names(
        d.vendor_name.as_deref(),
        d.device_name.as_deref(),
        (&d.vendor_id, &d.device_id),
    )
}

/// The VFs each PF has now, by the PF's id (see `enabled_vfs` in main).
#[derive(Debug, Default)]
pub struct EnabledVfs(HashMap<String, usize>);

impl EnabledVfs {
    /// Counts the VF records in `devices` that are on the bus.
    pub fn count(devices: &[Device]) -> EnabledVfs {
        let mut by_parent = HashMap::new();
        for d in devices.iter().filter(|d| d.present) {
            if let Some(parent) = &d.parent {
                *by_parent.entry(parent.to_string()).or_insert(0) += 1;
            }
        }
        EnabledVfs(by_parent)
    }

    fn of(&self, pf_id: &str) -> usize {
        self.0.get(pf_id).copied().unwrap_or(0)
    }
}

/// The list in the agent's order, except that a VF whose PF is listed
/// comes right after it (its PF's VFs in `vf_index` order) and is drawn
/// as a branch of it.
fn tree_order<'l, 'a>(list: &'l [Device<'a>]) -> Vec<(&'l Device<'a>, Option<Branch>)> {
    let listed: HashSet<&str> = list.iter().map(|d| d.id.as_ref()).collect();
    let mut children: BTreeMap<&str, Vec<&Device>> = BTreeMap::new();
    for d in list {
        if let Some(parent) = d.parent.as_deref().filter(|p| listed.contains(p)) {
            children.entry(parent).or_default().push(d);
        }
    }
    for vfs in children.values_mut() {
        vfs.sort_by_key(|d| (d.vf_index, d.pci_address));
    }
    let mut rows = Vec::with_capacity(list.len());
    for d in list {
        if d.parent.as_deref().is_some_and(|p| listed.contains(p)) {
            continue;
        }
        rows.push((d, None));
        if let Some(vfs) = children.get(d.id.as_ref()) {
            for (i, vf) in vfs.iter().enumerate() {
                let branch = if i + 1 == vfs.len() {
                    Branch::Last
                } else {
                    Branch::Middle
                };
                rows.push((*vf, Some(branch)));
            }
        }
    }
    rows
}

/// How a VF row hangs off its PF's row.
#[derive(Debug, Clone, Copy)]
enum Branch {
    Middle,
    Last,
}

pub fn devices(list: &[Device], enabled: &EnabledVfs) -> String {
    if list.is_empty() {
        return "no registered devices\n".into();
    }
    table(
        &[
            "NAME", "ADDRESS", "TYPE", "GROUP", "DRIVER", "VFIO", "ATTACHED", "HEALTH", "DEVICE",
            "ID",
        ],
        tree_order(list)
            .into_iter()
            .map(|(d, branch)| {
                let name = match branch {
                    None => d.name.to_string(),
                    Some(Branch::Middle) => format!("\u{251c} {}", d.name),
                    Some(Branch::Last) => format!("\u{2514} {}", d.name),
                };
                let mut description = device_names(d);
                if let Some(sriov) = &d.sriov {
                    description.push_str(&format!(
                        " ({}/{} VFs)",
                        enabled.of(&d.id),
                        sriov.desired_vfs
                    ));
                }
                match d.mdevs.len() {
                    0 => {}
                    1 => description.push_str(" (1 mediated device)"),
                    n => description.push_str(&format!(" ({n} mediated devices)")),
                }
                vec![
                    name,
                    d.pci_address.to_string(),
                    d.kind.as_str().into(),
                    d.iommu_group.to_string(),
                    if d.present {
                        or_dash(d.current_driver.as_deref())
                    } else {
                        "(absent)".into()
                    },
                    yes_no(d.bound_to_vfio),
                    or_dash(d.attached_to.as_deref()),
                    d.health.as_str().into(),
                    description,
                    d.id.to_string(),
                ]
            })
            .collect(),
    )
}

/// `vfioctl sriov`: the PF's SR-IOV state, one field a line, then one row
/// per VF and what did not go as asked.
pub fn sriov(s: &SriovStatus) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &dyn Display| field(&mut out, 19, key, value);
    line("name", &s.name);
    line("id", &s.id);
    line("pci_address", &s.pci_address);
    line("total_vfs", &s.total_vfs);
    line("num_vfs", &s.num_vfs);
    line("desired_vfs", &or_dash(s.desired_vfs));
    line("vf_device_id", &or_dash(s.vf_device_id.as_deref()));
    line("vf_driver", &s.vf_driver.as_str());
    line("drivers_autoprobe", &or_dash(s.drivers_autoprobe));
    out.push('\n');
    if s.vfs.is_empty() {
        out.push_str("no VFs enabled\n");
    } else {
        let problems = s.vfs.iter().any(|v| v.error.is_some());
        let mut headers = vec!["VF", "ADDRESS", "NAME", "DRIVER"];
        if problems {
            headers.push("PROBLEM");
        }
        let rows = s
            .vfs
            .iter()
            .map(|v| {
                let mut row = vec![
                    v.index.to_string(),
                    v.pci_address.to_string(),
                    or_dash(v.name.as_deref()),
                    or_dash(v.driver.as_deref()),
                ];
                if problems {
                    row.push(or_dash(v.error.as_deref()));
                }
                row
            })
            .collect();
        out.push_str(&table(&headers, rows));
    }
    for w in &s.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// Every field of a device, one per line, then what the fields mean
/// together: tags, companions, the last reset, who may open it.
pub fn device(d: &Device) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &dyn Display| field(&mut out, 18, key, value);
    line("id", &d.id);
    line("name", &d.name);
    line("type", &d.kind.as_str());
    line("pci_address", &d.pci_address);
    line("vendor_id", &d.vendor_id);
    line("device_id", &d.device_id);
    line("vendor_name", &or_dash(d.vendor_name.as_deref()));
    line("device_name", &or_dash(d.device_name.as_deref()));
    line("class", &d.class);
    line("iommu_group", &d.iommu_group);
    line("present", &d.present);
    line("current_driver", &or_dash(d.current_driver.as_deref()));
    line("original_driver", &or_dash(d.original_driver.as_deref()));
    line("bound_to_vfio", &d.bound_to_vfio);
    line("bound_by_vfiod", &d.bound_by_vfiod);
    line("attached_to", &or_dash(d.attached_to.as_deref()));
    line("created_at", &d.created_at);
    line("stuck", &d.stuck);
    line("identity_mismatch", &d.identity_mismatch);
    line("health", &d.health.as_str());
    line("health_reason", &or_dash(d.health_reason.as_deref()));
    let tags: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    line(
        "tags",
        &or_dash((!tags.is_empty()).then(|| tags.join(", "))),
    );
    if let Some(parent) = &d.parent {
        line("parent", &parent);
    }
    if let Some(index) = d.vf_index {
        line("vf_index", &index);
    }
    if let Some(sriov) = &d.sriov {
        line(
            "sriov",
            &format!(
                "{} VFs kept, given {} (vfioctl sriov {})",
                sriov.desired_vfs,
                sriov.vf_driver.as_str(),
                d.name
            ),
        );
    }
    if !d.group_companions.is_empty() {
        let companions: Vec<String> = d.group_companions.iter().map(|a| a.to_string()).collect();
        line("moved with", &companions.join(", "));
    }
    line(
        "last reset",
        &or_dash(d.last_reset.as_ref().map(last_reset)),
    );
    line("may open", &who_may_open(d));
    for m in &d.mdevs {
        line(
            "mdev",
            &format!(
                "{} ({}) for instance {}, {}",
                m.uuid,
                m.mdev_type,
                m.instance_id,
                match m.attached_uid {
                    Some(uid) => format!("open to uid {uid}"),
                    None => "being made or removed".into(),
                }
            ),
        );
    }
    out
}

/// `vfioctl claim`: whether the device is newly handed out (201) or the
/// instance's existing claim (200), then the device as `show` prints it;
/// for a mediated device, its UUID and path first.
pub fn claimed(c: &ClaimAnswer, instance: &str, created: bool) -> String {
    let d = &c.device;
    if let Some(m) = &c.mdev {
        let headline = if created {
            format!(
                "made mediated device {} ({}) on {} ({}) for instance {instance}",
                m.uuid, m.mdev_type, d.name, d.pci_address
            )
        } else {
            format!(
                "instance {instance} already holds mediated device {} ({}) on {}: its claim, unchanged",
                m.uuid, m.mdev_type, d.name
            )
        };
        return format!(
            "{headline}\nQEMU: -device vfio-pci,sysfsdev={}\n\n{}",
            m.sysfs_path,
            device(d)
        );
    }
    let headline = if created {
        format!(
            "claimed {} ({}) for instance {instance}",
            d.name, d.pci_address
        )
    } else {
        format!(
            "instance {instance} already holds {} ({}): its claim, unchanged",
            d.name, d.pci_address
        )
    };
    format!("{headline}\n\n{}", device(d))
}

/// A refused claim's candidates: the error line, then one row per
/// candidate and why it did not fit, with its registry name when known.
pub fn no_capacity(
    status: StatusCode,
    candidates: &[ConflictingFunction],
    names: &HashMap<String, String>,
) -> String {
    let mut out = format!(
        "vfioctl: no_capacity ({}): no free device fits the claim; {} considered:\n",
        status.as_u16(),
        match candidates.len() {
            1 => "1 candidate".to_owned(),
            n => format!("{n} candidates"),
        }
    );
    let with_names = !names.is_empty();
    let mut headers = vec!["ADDRESS"];
    if with_names {
        headers.push("NAME");
    }
    headers.push("WHY NOT");
    let rows = candidates
        .iter()
        .map(|c| {
            let mut row = vec![c.pci_address.clone()];
            if with_names {
                row.push(or_dash(names.get(&c.pci_address)));
            }
            row.push(or_dash(c.reason.as_deref()));
            row
        })
        .collect();
    out.push_str(&table(&headers, rows));
    out
}

/// `GET /devices/capacity` as it answers.
#[derive(Debug, Deserialize)]
pub struct CapacityAnswer {
    pub resources: Vec<Capacity>,
}

/// `vfioctl capacity`: one row per pool (`-` for devices without a
/// `resource` tag), then for the pools of vGPU VFs one row per type with
/// the free VFs that can take it now.
pub fn capacity(pools: &[Capacity], filtered: bool) -> String {
    if pools.is_empty() {
        return if filtered {
            "no registered devices with these tags\n".into()
        } else {
            "no registered devices\n".into()
        };
    }
    let resource = |p: &Capacity| or_dash(p.resource.as_deref());
    let rows = pools
        .iter()
        .map(|p| {
            vec![
                resource(p),
                p.total.to_string(),
                p.free.to_string(),
                p.attached.to_string(),
                p.quarantined.to_string(),
                p.needs_reset.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "RESOURCE",
            "TOTAL",
            "FREE",
            "ATTACHED",
            "QUARANTINED",
            "NEEDS_RESET",
        ],
        rows,
    );
    let vgpu: Vec<Vec<String>> = pools
        .iter()
        .flat_map(|p| {
            p.vgpu_types
                .iter()
                .map(move |(t, n)| vec![resource(p), t.clone(), n.to_string()])
        })
        .collect();
    if !vgpu.is_empty() {
        out.push('\n');
        out.push_str(&table(&["RESOURCE", "VGPU TYPE", "FREE VFS"], vgpu));
    }
    let mdev: Vec<Vec<String>> = pools
        .iter()
        .flat_map(|p| {
            p.mdev_types
                .iter()
                .map(move |(t, n)| vec![resource(p), t.clone(), n.to_string()])
        })
        .collect();
    if !mdev.is_empty() {
        out.push('\n');
        out.push_str(&table(&["RESOURCE", "MDEV TYPE", "AVAILABLE"], mdev));
    }
    out
}

/// `vfioctl mdev-types`: the types a parent offers now, then vfiod's
/// mediated devices on it.
pub fn mdev_types(t: &MdevTypes) -> String {
    let mut out = if t.mdev_types.is_empty() {
        format!(
            "no mdev types: {} has no mdev_supported_types now (not an mdev parent, or not on its driver)\n",
            t.name
        )
    } else {
        table(
            &["TYPE", "NAME", "API", "AVAILABLE"],
            t.mdev_types
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        or_dash(m.name.as_deref()),
                        or_dash(m.device_api.as_deref()),
                        m.available_instances.to_string(),
                    ]
                })
                .collect(),
        )
    };
    if !t.mdevs.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["UUID", "TYPE", "INSTANCE", "UID", "SYSFSDEV"],
            t.mdevs
                .iter()
                .map(|m| {
                    vec![
                        m.uuid.clone(),
                        m.mdev_type.clone(),
                        m.instance_id.clone(),
                        or_dash(m.attached_uid),
                        m.sysfs_path.clone(),
                    ]
                })
                .collect(),
        ));
    }
    out
}

/// `vfioctl vgpu-types`: each type the PF's VFs can take, with how many
/// free VFs can take it now.
pub fn vgpu_types(types: &[VgpuTypeCount], pf: &str) -> String {
    if types.is_empty() {
        return format!("no vGPU types: no VF of {pf} lists a creatable vGPU type\n");
    }
    table(
        &["ID", "NAME", "FREE VFS"],
        types
            .iter()
            .map(|t| vec![t.id.to_string(), t.name.clone(), t.available.to_string()])
            .collect(),
    )
}

/// `flr: ok in 139 ms at 2026-12-01T07:12:41.000Z`.
fn last_reset(r: &LastResetWire) -> String {
    format!(
        "{}: {} in {} ms at {}",
        r.method, r.result, r.duration_ms, r.at
    )
}

/// Who may open the device's VFIO nodes: root always; while attached,
/// the attachment's uid through its ACL grant (and its VMM's pid).
fn who_may_open(d: &Device) -> String {
    if !d.bound_to_vfio {
        return "nobody: not on vfio".into();
    }
    match d.attached_uid {
        Some(0) | None => "root only".into(),
        Some(uid) => match d.attached_pid {
            Some(pid) => format!("root and uid {uid} (until VMM pid {pid} exits)"),
            None => format!("root and uid {uid}"),
        },
    }
}

/// Candidates, or with `all` every function with lspci -nn's columns plus
/// what passthrough needs to know.
pub fn available(list: &[AvailableDevice], all: bool) -> String {
    if all {
        let rows = list
            .iter()
            .map(|d| {
                let class = d.class.get(..4).unwrap_or(&d.class);
                vec![
                    d.pci_address.to_string(),
                    format!("{} [{class}]", d.kind.as_str()),
                    format!("{} [{}:{}]", available_names(d), d.vendor_id, d.device_id),
                    or_dash(d.current_driver.as_deref()),
                    d.iommu_group.to_string(),
                    or_dash(d.registered_id.as_deref()),
                ]
            })
            .collect();
        return table(
            &[
                "ADDRESS",
                "CLASS",
                "DEVICE",
                "DRIVER",
                "GROUP",
                "REGISTERED",
            ],
            rows,
        );
    }
    let rows = list
        .iter()
        .map(|d| {
            vec![
                d.pci_address.to_string(),
                d.kind.as_str().into(),
                d.iommu_group.to_string(),
                or_dash(d.current_driver.as_deref()),
                yes_no(d.registered_id.is_some()),
                available_names(d),
            ]
        })
        .collect();
    table(
        &["ADDRESS", "TYPE", "GROUP", "DRIVER", "REGISTERED", "DEVICE"],
        rows,
    )
}

/// One line per holder, worded by `Holder`'s own `Display` (as vfiod's
/// busy errors word it), or that nothing holds `device` (as the command
/// named it).
pub fn holders(answer: &Holders, device: &str) -> String {
    if answer.holders.is_empty() {
        return format!("nothing holds {device}\n");
    }
    table(
        &["FUNCTION", "KIND", "HOLDER"],
        answer
            .holders
            .iter()
            .map(|h| vec![h.pci_address().to_string(), kind(h).into(), h.to_string()])
            .collect(),
    )
}

/// A holder's `kind` on the wire.
fn kind(h: &Holder) -> &'static str {
    match h {
        Holder::Process { .. } => "process",
        Holder::Mount { .. } => "mount",
        Holder::Swap { .. } => "swap",
        Holder::BlockStack { .. } => "block_stack",
        Holder::NetInterface { .. } => "net_interface",
        Holder::FramebufferConsole { .. } => "framebuffer_console",
    }
}

/// `bind --dry-run`: the sysfs writes a bind would do.
pub fn bind_plan(plan: &BindPlan) -> String {
    if plan.steps.is_empty() {
        return "nothing to do: already on vfio\n".into();
    }
    let steps: String = plan.steps.iter().map(|s| format!("  {s}\n")).collect();
    format!("dry run, nothing changed; a bind would:\n{steps}")
}

/// `reset --dry-run`: the methods a reset would try and every function it
/// would reach.
pub fn reset_plan(plan: &ResetPlan) -> String {
    let scope: String = plan
        .scope
        .iter()
        .map(|f| format!("  {} ({})\n", f.pci_address, or_dash(f.driver.as_deref())))
        .collect();
    format!(
        "dry run, nothing changed; a reset would try {} and reach:\n{scope}",
        plan.methods.join(", ")
    )
}

/// Every field of `GET /health`, in alphabetical order.
pub fn health(body: &HealthBody) -> String {
    let h = &body.health;
    let mut out = String::new();
    let mut line = |key: &str, value: &dyn Display| field(&mut out, 20, key, value);
    line("hotplug", &h.hotplug);
    line("iommu_enabled", &h.iommu_enabled);
    line("last_event_seq", &h.last_event_seq);
    line("pci_ids", &or_dash(h.pci_ids.as_deref()));
    line("privileged", &h.privileged);
    line("registered_devices", &h.registered_devices);
    line("status", &body.status);
    line("uptime_s", &h.uptime_s);
    line("version", &h.version);
    line(
        "vfio_container_usable_by_all",
        &h.vfio_container_usable_by_all,
    );
    line("vfio_pci_available", &h.vfio_pci_available);
    out
}

/// One event: its number first (what `--since` resumes from), then time,
/// type, function and the details it carries, by name.
pub fn event(e: &Event) -> String {
    let mut details = Vec::new();
    if let Some(detail) = &e.detail {
        details.push(format!("detail={detail}"));
    }
    if let Some(driver) = &e.driver {
        details.push(format!("driver={driver}"));
    }
    if let Some(instance) = &e.instance_id {
        details.push(format!("instance_id={instance}"));
    }
    if let Some(missed) = e.missed {
        details.push(format!("missed={missed}"));
    }
    format!(
        "{:>6}  {}  {:<18} {:<13} {}",
        e.seq,
        wire_time(&e.at),
        e.kind.to_string(),
        or_dash(e.pci_address),
        details.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_s_kind_is_its_wire_tag() {
        let holders: Vec<Holder> = serde_json::from_str(
            r#"[
            {"kind": "process", "pci_address": "0000:01:00.0", "pid": 1, "comm": "x",
             "uid": 0, "path": "/dev/x"},
            {"kind": "mount", "pci_address": "0000:01:00.0", "device": "/dev/x",
             "mount_point": "/", "fstype": "ext4"},
            {"kind": "swap", "pci_address": "0000:01:00.0", "device": "/dev/x"},
            {"kind": "block_stack", "pci_address": "0000:01:00.0", "device": "x",
             "holder": "dm-0"},
            {"kind": "net_interface", "pci_address": "0000:01:00.0", "interface": "x",
             "addresses": [], "routes": 0},
            {"kind": "framebuffer_console", "pci_address": "0000:01:00.0",
             "vtconsole": "vtcon1", "framebuffer": "fb0"}
        ]"#,
        )
        .unwrap();
        for h in &holders {
            assert_eq!(serde_json::to_value(h).unwrap()["kind"], kind(h), "{h:?}");
        }
    }
}
