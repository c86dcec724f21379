//! vfioctl's command line: the commands, their options and help texts
//! (clap). The man page vfioctl(1) lists the same, which tests/man_pages.rs
//! checks.

use clap::{Args, Parser, Subcommand, ValueEnum, ValueHint};
use clap_complete::engine::ArgValueCandidates;
use vfiod::core::ResetMethod;
use vfiod::registry::VfDriver;

use crate::complete::{
    registered_devices, registered_pfs, registered_tags, unregistered_candidates, vgpu_type_names,
};

#[derive(Debug, Parser)]
#[command(
    name = "vfioctl",
    args_override_self = true,
    version,
    about = "Command-line client for vfiod, the PCI passthrough host agent",
    after_help = "A device is named by its registry id or its name. Reads work for any \
        local user; changes need root or membership of the vfiod group. Errors print \
        the server's code and message and exit 1.",
    arg_required_else_help = true
)]
pub struct Cli {
    /// vfiod's socket [default: /run/vfiod/vfiod.sock, or
    /// $XDG_RUNTIME_DIR/vfiod/vfiod.sock when that exists and the default does not]
    #[arg(
        long,
        global = true,
        env = "VFIOD_SOCKET",
        value_name = "PATH",
        value_hint = ValueHint::FilePath,
        help_heading = "Global options"
    )]
    pub socket: Option<String>,
    /// Print the API's JSON instead of tables
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// A registered device, completed from the running agent.
#[derive(Debug, Args)]
pub struct DeviceArg {
    /// Registry id or name of the device
    #[arg(value_name = "ID|NAME", add = ArgValueCandidates::new(registered_devices))]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct NameAndTags {
    /// Device name (taken as given, even if it starts with '-': the agent
    /// says what is wrong with it)
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    pub name: Option<String>,
    /// A tag; repeat for more
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

/// The method names the agent takes: `auto` and the kernel's.
fn reset_methods() -> clap::builder::PossibleValuesParser {
    let names = std::iter::once(ResetMethod::Auto)
        .chain(ResetMethod::KERNEL)
        .map(ResetMethod::as_str);
    clap::builder::PossibleValuesParser::new(names)
}

/// What the agent may give new VFs, in its spelling.
fn vf_drivers() -> clap::builder::PossibleValuesParser {
    let names = [VfDriver::VfioPci, VfDriver::None, VfDriver::Native].map(VfDriver::as_str);
    clap::builder::PossibleValuesParser::new(names)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Registered devices (all given tags must match)
    List {
        /// Only devices that carry this tag; repeat for more
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Passthrough candidates on this host
    Available {
        /// Every PCI function of the host (class, names, driver, IOMMU group),
        /// like lspci -nn
        #[arg(long)]
        all: bool,
    },
    /// Set a PCI device aside (e.g. 0000:a2:00.0)
    Register {
        /// PCI address DDDD:BB:DD.F
        #[arg(value_name = "ADDRESS", add = ArgValueCandidates::new(unregistered_candidates))]
        address: String,
        #[command(flatten)]
        name_tags: NameAndTags,
    },
    /// One registered device
    Show(DeviceArg),
    /// Rename, or replace all tags
    Update {
        #[command(flatten)]
        device: DeviceArg,
        #[command(flatten)]
        name_tags: NameAndTags,
    },
    /// Unregister (gives back a driver vfiod took)
    Delete(DeviceArg),
    /// Move the device to vfio-pci
    Bind {
        #[command(flatten)]
        device: DeviceArg,
        /// Move the other functions of its IOMMU group along
        #[arg(long)]
        with_group: bool,
        /// Print the plan; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Take a network interface in use (up with an address, or carrying a
        /// route) off its driver anyway; other holders always refuse (see
        /// `vfioctl holders`)
        #[arg(long)]
        force: bool,
    },
    /// Give it back to its original driver
    Unbind(DeviceArg),
    /// Bind if needed, mark attached to INSTANCE
    #[command(
        long_about = "Bind the device if needed and mark it attached to the virtual machine \
            INSTANCE. While attached, the VMM's user (--uid, by default yours) and no other \
            unprivileged user may open the device's VFIO nodes; with --pid, the attachment \
            also ends when that process exits.",
        after_help = "VFIO pins all of the guest's memory for DMA and charges it against the \
            VMM process's RLIMIT_MEMLOCK: raise that limit to at least the guest's memory \
            size (LimitMEMLOCK= in the VMM's systemd unit, or ulimit -l), or the VMM fails \
            to map the device."
    )]
    Attach {
        #[command(flatten)]
        device: DeviceArg,
        /// Virtual machine the device goes to
        #[arg(value_name = "INSTANCE")]
        instance: String,
        /// Uid of the VMM that may open the device [default: yours; only root
        /// may name another]
        #[arg(long, value_name = "N")]
        uid: Option<u32>,
        /// Pid of the VMM (running as that uid); the attachment ends when it
        /// exits
        #[arg(long, value_name = "N")]
        pid: Option<u32>,
    },
    /// Clear the attachment, restore the driver (or, with --instance on an
    /// mdev parent, remove that instance's mediated device)
    Detach {
        #[command(flatten)]
        device: DeviceArg,
        /// Leave the device on vfio-pci
        #[arg(long)]
        keep_bound: bool,
        /// The instance whose mediated device on this parent to remove (a
        /// claim with --mdev-type)
        #[arg(long, value_name = "INSTANCE")]
        instance: Option<String>,
    },
    /// Hand out a free device or VF with the given tags to INSTANCE
    #[command(
        long_about = "Ask vfiod for a free device or VF that carries every --tag and hand it \
            out to the virtual machine --instance, in one operation: vfiod picks it under one \
            lock (never the same device twice), records the claim, then binds and grants it \
            exactly as attach does. Candidates are registered, present, fit devices and VFs \
            that are not attached, claimed, busy or held; a PF with VFs is none itself, its \
            VFs are. Preferred, in order: the --numa node, the PF with the most free VFs, a \
            device whose last reset succeeded, the lowest address.\n\n\
            The first line says whether the device is newly handed out or the instance's \
            existing claim (the same instance asking the same again gets the same device; \
            asking something else is refused with claim_conflict). When nothing fits \
            (no_capacity), each candidate is printed with why it did not. Release the device \
            with `vfioctl detach`.\n\n\
            With --mdev-type, the claim gets a legacy mediated device (mdev) made on a parent \
            that offers the type (the parent stays on its own driver): the first line then \
            gives its UUID and the path QEMU takes as -device vfio-pci,sysfsdev=PATH. \
            Release it with `vfioctl detach PARENT --instance INSTANCE`.",
        after_help = "Examples:\n  vfioctl claim --tag resource=vf --instance vm-1 --uid 64055\n  \
            vfioctl claim --tag resource=vf --instance vm-2 --numa 1 --numa-required\n  \
            vfioctl claim --tag resource=vgpu --instance vm-3 --vgpu-type L40S-12Q\n  \
            vfioctl claim --tag resource=grid --instance vm-4 --mdev-type nvidia-63"
    )]
    Claim {
        /// A tag the device must carry; repeat for more
        #[arg(
            long = "tag",
            value_name = "KEY=VALUE",
            value_parser = parse_tag,
            required = true,
            add = ArgValueCandidates::new(registered_tags)
        )]
        tags: Vec<(String, String)>,
        /// Virtual machine the device goes to; the claim's key (asking again
        /// under it gets the same device)
        #[arg(long, value_name = "INSTANCE")]
        instance: String,
        /// Uid of the VMM that may open the device [default: yours; only root
        /// may name another]
        #[arg(long, value_name = "N")]
        uid: Option<u32>,
        /// Pid of the VMM (running as that uid); the claim ends when it exits
        #[arg(long, value_name = "N")]
        pid: Option<u32>,
        /// NUMA node of the virtual machine: devices on it come first
        #[arg(long, value_name = "N")]
        numa: Option<u32>,
        /// Only devices on the --numa node; the others are not considered
        #[arg(long, requires = "numa")]
        numa_required: bool,
        /// NVIDIA vGPU type to set on the VF, by name (L40S-12Q) or ID: only
        /// VFs that can take it now are candidates
        #[arg(long, value_name = "TYPE", add = ArgValueCandidates::new(vgpu_type_names))]
        vgpu_type: Option<String>,
        /// Legacy mdev type, by id (nvidia-63) or name: a mediated device of
        /// that type is made on a parent that offers it
        #[arg(long, value_name = "TYPE", conflicts_with = "vgpu_type")]
        mdev_type: Option<String>,
    },
    /// Free, attached, quarantined devices per resource tag, and vGPU types
    #[command(
        long_about = "Count the registered devices per resource tag (devices without one \
            under -): total, free (claimable now), attached (or claimed), quarantined (or \
            needing a host reboot), needs_reset (free, reset before the next hand-out). A PF \
            with VFs counts as its VFs. Then, for pools of vGPU VFs, how many free VFs can \
            take each vGPU type now. With --tag, only the devices that carry every given tag."
    )]
    Capacity {
        /// Only devices that carry this tag; repeat for more
        #[arg(
            long = "tag",
            value_name = "KEY=VALUE",
            value_parser = parse_tag,
            add = ArgValueCandidates::new(registered_tags)
        )]
        tags: Vec<(String, String)>,
    },
    /// Reset the function
    Reset {
        #[command(flatten)]
        device: DeviceArg,
        /// Reset method [default: the agent's choice, auto: the kernel's order
        /// for the function]
        #[arg(long, value_parser = reset_methods())]
        method: Option<String>,
        /// Print the method and the functions the reset would reach; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Processes, mounts, swap, block stacks, network interfaces and consoles
    /// that use the device
    Holders(DeviceArg),
    /// A physical function's SR-IOV VFs: show them, or set how many vfiod
    /// makes and keeps
    #[command(
        long_about = "Without COUNT, show the SR-IOV state of a registered physical function \
            (PF): how many VFs it can have, how many are enabled, the count vfiod keeps, the \
            VFs' device ID, what new VFs are given, the PF's sriov_drivers_autoprobe, and \
            each VF.\n\n\
            With COUNT, declare the VF count: vfiod makes the VFs, registers each as \
            <pf-name>-vf<N> with the PF's tags, and makes them again after a reboot or a \
            re-plug. Changing a count destroys every VF first (the kernel goes through 0), \
            so it is refused while any VF is attached, held or busy. 0 removes them all. \
            Setting the count it already has changes nothing.",
        after_help = "Examples:\n  vfioctl sriov nic0\n  vfioctl sriov nic0 4\n  \
            vfioctl sriov nic0 4 --vf-driver none\n  vfioctl sriov nic0 0"
    )]
    Sriov {
        /// Registry id or name of the physical function
        #[arg(value_name = "ID|NAME", add = ArgValueCandidates::new(registered_pfs))]
        device: String,
        /// VFs to make and keep (0 removes them all); without it, only show
        #[arg(value_name = "COUNT")]
        num_vfs: Option<u32>,
        /// What new VFs are given: vfio-pci (bound straight to it, no host
        /// driver probes them), none (left driverless), native (probed by
        /// their host driver) [default: the choice recorded, vfio-pci at
        /// first]
        #[arg(long, value_name = "DRIVER", value_parser = vf_drivers(), requires = "num_vfs")]
        vf_driver: Option<String>,
    },
    /// The vGPU types a PF's VFs can take now, and how many free VFs can take
    /// each
    #[command(
        long_about = "List the NVIDIA vGPU types the VFs of a registered physical function \
            can take (each VF's creatable_vgpu_types), with how many of its free VFs can take \
            each now. Creating a vGPU can take types away from the sibling VFs, so the \
            counts change as VFs are claimed."
    )]
    VgpuTypes {
        /// Registry id or name of the physical function
        #[arg(value_name = "ID|NAME", add = ArgValueCandidates::new(registered_pfs))]
        device: String,
    },
    /// The legacy mdev types a parent offers now, and the mediated devices
    /// vfiod made on it
    #[command(
        long_about = "List the legacy mediated device (mdev) types a registered parent offers \
            now (its mdev_supported_types: id, name, device API, how many more the kernel \
            would make), then the mediated devices vfiod made on it for claims, with their \
            instance and the path QEMU takes as sysfsdev=."
    )]
    MdevTypes(DeviceArg),
    /// Follow the event stream (Ctrl-C to stop)
    Events {
        /// First replay the retained events after SEQ (0: all of them; see
        /// X-Vfiod-Event-Seq)
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// Agent version, IOMMU and vfio-pci status
    Health,
    /// Print a shell completion script
    #[command(
        long_about = "Print a completion script for SHELL. By default the script asks \
            vfioctl itself for candidates at each TAB, so the names and ids of the devices \
            registered with the running agent complete too (bash, zsh and fish). With \
            --static it prints a self-contained script that completes commands and \
            options only.\n\n\
            bash:  vfioctl completion bash > ~/.local/share/bash-completion/completions/vfioctl\n\
            zsh:   vfioctl completion zsh > ~/.zfunc/_vfioctl   (with ~/.zfunc in fpath)\n\
            fish:  vfioctl completion fish > ~/.config/fish/completions/vfioctl.fish"
    )]
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
        /// Self-contained script without device names
        #[arg(long = "static")]
        static_script: bool,
        /// Program the script runs for candidates [default: vfioctl, from PATH]
        #[arg(long, value_name = "PATH", value_hint = ValueHint::ExecutablePath)]
        completer: Option<String>,
    },
}

fn parse_tag(kv: &str) -> Result<(String, String), String> {
    kv.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{kv:?}: expected KEY=VALUE"))
}

/// Exit 2 for an option before the command (the global ones), 1 for
/// everything about a command, as before clap: scripts tell a broken
/// invocation of vfioctl from a refused request that way.
pub fn usage_exit_code(e: &clap::Error) -> u8 {
    use clap::error::{ContextKind, ContextValue};
    let global = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.starts_with("--socket") || arg.starts_with("--json"),
        _ => false,
    };
    if global {
        2
    } else {
        1
    }
}
