//! Shell completion: the scripts `vfioctl completion SHELL` prints, and the
//! candidates a script asks vfioctl for at each TAB (run with
//! [`COMPLETE_VAR`] set): commands and options from clap, device names and
//! addresses from the running agent.

use std::collections::BTreeMap;
use std::io::Write;

use clap::CommandFactory;
use clap_complete::engine::CompletionCandidate;
use clap_complete::env::EnvCompleter;
use serde::de::DeserializeOwned;
use vfiod::api::wire::{AvailableDevice, Device};

use crate::args::{Cli, CompletionShell};
use crate::client::{default_socket, Client};
use crate::render::{available_names, CapacityAnswer};

/// The environment variable that turns a run into a completion request
/// (set by the scripts `vfioctl completion SHELL` prints).
pub const COMPLETE_VAR: &str = "VFIOCTL_COMPLETE";

pub fn print_script(shell: CompletionShell, static_script: bool, completer: Option<&str>) {
    let mut stdout = std::io::stdout().lock();
    if static_script {
        let shell = match shell {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        };
        clap_complete::generate(shell, &mut Cli::command(), "vfioctl", &mut stdout);
        return;
    }
    let completer = completer.unwrap_or("vfioctl");
    let registration: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &clap_complete::env::Bash,
        CompletionShell::Zsh => &clap_complete::env::Zsh,
        CompletionShell::Fish => &clap_complete::env::Fish,
    };
    let _ =
        registration.write_registration(COMPLETE_VAR, "vfioctl", "vfioctl", completer, &mut stdout);
    if matches!(shell, CompletionShell::Zsh) {
        // Autoloaded from fpath as `_vfioctl`, the file's body runs on the
        // first TAB: it must complete then too, not only register.
        let _ = writeln!(
            stdout,
            "if [ \"$funcstack[1]\" = \"_vfioctl\" ]; then\n    _clap_dynamic_completer_vfioctl \"$@\"\nfi"
        );
    }
}

/// The socket a completion request asks: the `--socket` among the words
/// being completed, else `VFIOD_SOCKET`, else the default.
fn completion_socket() -> String {
    let words: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .skip_while(|a| a != "--")
        .collect();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if w == "--socket" {
            if let Some(v) = it.next() {
                return v.clone();
            }
        } else if let Some(v) = w.strip_prefix("--socket=") {
            return v.to_owned();
        }
    }
    std::env::var("VFIOD_SOCKET").unwrap_or_else(|_| default_socket())
}

/// A GET for a completion whose answer is a list.
fn completion_get<T: DeserializeOwned>(path: &str) -> Vec<T> {
    completion_get_as::<Vec<T>>(path).unwrap_or_default()
}

/// A GET for a completion: a second at most, and nothing on any failure
/// (no agent means no candidates, never an error under the cursor).
fn completion_get_as<T: DeserializeOwned>(path: &str) -> Option<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let client = Client::new(completion_socket());
    runtime.block_on(async {
        match tokio::time::timeout(std::time::Duration::from_secs(1), client.get(path)).await {
            Ok(Ok(answer)) => Some(answer),
            _ => None,
        }
    })
}

/// Names first; ids are offered only when no name matches what is typed.
pub fn registered_devices() -> Vec<CompletionCandidate> {
    device_candidates(completion_get("/devices"))
}

/// The devices `sriov` can take: every registered device but the VFs
/// (a VF cannot have VFs).
pub fn registered_pfs() -> Vec<CompletionCandidate> {
    let list: Vec<Device> = completion_get("/devices");
    device_candidates(list.into_iter().filter(|d| d.parent.is_none()).collect())
}

fn device_candidates(list: Vec<Device>) -> Vec<CompletionCandidate> {
    let names = list.iter().map(|d| {
        CompletionCandidate::new(d.name.as_ref())
            .help(Some(format!("{} {}", d.pci_address, d.id).into()))
    });
    let ids = list.iter().map(|d| {
        CompletionCandidate::new(d.id.as_ref())
            .help(Some(format!("{} {}", d.pci_address, d.name).into()))
            .hide(true)
    });
    names.chain(ids).collect()
}

/// The `KEY=VALUE` tags the registered devices carry, each with how many
/// carry it (what `claim --tag` and `capacity --tag` filter on).
pub fn registered_tags() -> Vec<CompletionCandidate> {
    let list: Vec<Device> = completion_get("/devices");
    let mut tags: BTreeMap<String, usize> = BTreeMap::new();
    for d in &list {
        for (k, v) in d.tags.iter() {
            *tags.entry(format!("{k}={v}")).or_default() += 1;
        }
    }
    tags.into_iter()
        .map(|(tag, n)| {
            let help = if n == 1 {
                "1 device".to_owned()
            } else {
                format!("{n} devices")
            };
            CompletionCandidate::new(tag).help(Some(help.into()))
        })
        .collect()
}

/// The vGPU types free VFs can take now, over every pool (one request:
/// `GET /devices/capacity`), with how many can.
pub fn vgpu_type_names() -> Vec<CompletionCandidate> {
    let pools = completion_get_as::<CapacityAnswer>("/devices/capacity")
        .map(|a| a.resources)
        .unwrap_or_default();
    let mut types: BTreeMap<String, u32> = BTreeMap::new();
    for pool in &pools {
        for (name, n) in &pool.vgpu_types {
            *types.entry(name.clone()).or_default() += n;
        }
    }
    types
        .into_iter()
        .map(|(name, n)| {
            CompletionCandidate::new(name).help(Some(format!("{n} free VFs can take it").into()))
        })
        .collect()
}

/// The functions `register` can take: candidates not registered yet.
pub fn unregistered_candidates() -> Vec<CompletionCandidate> {
    let list: Vec<AvailableDevice> = completion_get("/devices/available");
    list.iter()
        .filter(|d| d.registered_id.is_none())
        .map(|d| {
            CompletionCandidate::new(d.pci_address.to_string())
                .help(Some(available_names(d).into()))
        })
        .collect()
}
