//! vfioctl: the command-line client of vfiod's Unix-socket API.
//!
//! [`args`] is the command line, [`client`] the HTTP calls, [`render`] the
//! tables and text printed from the daemon's own wire types
//! (`vfiod::api::wire`), [`complete`] shell completion. This file runs a
//! command: one request, then its answer printed (as JSON with `--json`).

mod args;
mod client;
mod complete;
mod render;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use clap_complete::CompleteEnv;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use vfiod::api::error::ErrorBody;
use vfiod::api::wire::{
    AvailableDevice, ClaimAnswer, Device, DryRun, HealthBody, Holders, MdevTypes, ResetDryRun,
};
use vfiod::core::{SriovStatus, VgpuTypeCount};
use vfiod::events::Event;

use args::{Cli, Command, NameAndTags};
use client::{default_socket, device_path, list_path, tags_path, Answer, Client, Failure};

/// Prints answers: with `--json` as the agent's JSON, else rendered from
/// the wire type `T` the answer is read as.
struct Output {
    json: bool,
}

impl Output {
    fn print<T: DeserializeOwned>(
        &self,
        answer: &Answer,
        render: impl FnOnce(&T) -> String,
    ) -> Result<(), Failure> {
        if self.json {
            println!("{}", answer.json()?);
        } else {
            print!("{}", render(&answer.read::<T>()?));
        }
        Ok(())
    }

    fn device(&self, answer: &Answer) -> Result<(), Failure> {
        self.print::<Device>(answer, render::device)
    }
}

/// `name` and `tags` of a register or update body, when given.
fn name_tags_body(body: &mut Value, nt: &NameAndTags) {
    if let Some(n) = &nt.name {
        body["name"] = json!(n);
    }
    if !nt.tags.is_empty() {
        body["tags"] = Value::Object(
            nt.tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        );
    }
}

async fn run(client: Client, out: Output, command: Command) -> Result<(), Failure> {
    match command {
        Command::List { tags } => {
            let answer = client.request(Method::GET, &list_path(&tags), None).await?;
            if out.json {
                println!("{}", answer.json()?);
            } else {
                let list: Vec<Device> = answer.read()?;
                let enabled = enabled_vfs(&client, &list, !tags.is_empty()).await?;
                print!("{}", render::devices(&list, &enabled));
            }
        }
        Command::Available { all } => {
            let path = if all {
                "/devices/available?all=true"
            } else {
                "/devices/available"
            };
            let answer = client.request(Method::GET, path, None).await?;
            out.print::<Vec<AvailableDevice>>(&answer, |list| render::available(list, all))?;
        }
        Command::Register { address, name_tags } => {
            let mut body = json!({"pci_address": address});
            name_tags_body(&mut body, &name_tags);
            let answer = client.request(Method::POST, "/devices", Some(body)).await?;
            out.device(&answer)?;
        }
        Command::Show(d) => {
            let answer = client
                .request(Method::GET, &device_path(&d.device, ""), None)
                .await?;
            out.device(&answer)?;
        }
        Command::Update { device, name_tags } => {
            let mut body = json!({});
            name_tags_body(&mut body, &name_tags);
            let answer = client
                .request(Method::PATCH, &device_path(&device.device, ""), Some(body))
                .await?;
            out.device(&answer)?;
        }
        Command::Delete(d) => {
            let id = d.device;
            client
                .request(Method::DELETE, &device_path(&id, ""), None)
                .await?;
            if out.json {
                println!("{}", json!({"deleted": id}));
            } else {
                println!("deleted {id}");
            }
        }
        Command::Bind {
            device,
            with_group,
            dry_run,
            force,
        } => {
            let mut body = json!({"with_group": with_group, "dry_run": dry_run});
            // Only when asked for, so that a plain bind sends the body it
            // always did.
            if force {
                body["force"] = json!(true);
            }
            let answer = client
                .request(
                    Method::POST,
                    &device_path(&device.device, "/bind"),
                    Some(body),
                )
                .await?;
            if dry_run {
                out.print::<DryRun>(&answer, |d| render::bind_plan(&d.plan))?;
            } else {
                out.device(&answer)?;
            }
        }
        Command::Unbind(d) => {
            let answer = client
                .request(Method::POST, &device_path(&d.device, "/unbind"), None)
                .await?;
            out.device(&answer)?;
        }
        Command::Attach {
            device,
            instance,
            uid,
            pid,
        } => {
            let mut body = json!({"instance_id": instance});
            if let Some(uid) = uid {
                body["uid"] = json!(uid);
            }
            if let Some(pid) = pid {
                body["pid"] = json!(pid);
            }
            let answer = client
                .request(
                    Method::POST,
                    &device_path(&device.device, "/attach"),
                    Some(body),
                )
                .await?;
            out.device(&answer)?;
        }
        Command::Detach {
            device,
            keep_bound,
            instance,
        } => {
            let mut body = json!({"keep_bound": keep_bound});
            if let Some(instance) = instance {
                body["instance_id"] = json!(instance);
            }
            let answer = client
                .request(
                    Method::POST,
                    &device_path(&device.device, "/detach"),
                    Some(body),
                )
                .await?;
            out.device(&answer)?;
        }
        Command::Claim {
            tags,
            instance,
            uid,
            pid,
            numa,
            numa_required,
            vgpu_type,
            mdev_type,
        } => {
            let tags: serde_json::Map<String, Value> = tags
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let mut body = json!({"tags": tags, "instance_id": instance});
            // Only what is given: the agent's defaults (the caller's uid,
            // numa "preferred") are the API's to choose.
            for (key, value) in [("uid", uid), ("pid", pid), ("numa_node", numa)] {
                if let Some(v) = value {
                    body[key] = json!(v);
                }
            }
            if numa_required {
                body["numa"] = json!("required");
            }
            if let Some(t) = vgpu_type {
                body["vgpu_type"] = json!(t);
            }
            if let Some(t) = mdev_type {
                body["mdev_type"] = json!(t);
            }
            let answer = match client
                .request(Method::POST, "/devices/claim", Some(body))
                .await
            {
                Ok(answer) => answer,
                Err(Failure::Server(status, body)) if !out.json => {
                    return Err(no_capacity(&client, status, body).await);
                }
                Err(e) => return Err(e),
            };
            let created = answer.status == hyper::StatusCode::CREATED;
            out.print::<ClaimAnswer>(&answer, |c| render::claimed(c, &instance, created))?;
        }
        Command::Capacity { tags } => {
            let answer = client
                .request(Method::GET, &tags_path("/devices/capacity", &tags), None)
                .await?;
            out.print::<render::CapacityAnswer>(&answer, |c| {
                render::capacity(&c.resources, !tags.is_empty())
            })?;
        }
        Command::MdevTypes(device) => {
            let answer = client
                .request(
                    Method::GET,
                    &device_path(&device.device, "/mdev_types"),
                    None,
                )
                .await?;
            out.print::<MdevTypes>(&answer, render::mdev_types)?;
        }
        Command::VgpuTypes { device } => {
            let answer = client
                .request(Method::GET, &device_path(&device, "/vgpu_types"), None)
                .await?;
            out.print::<Vec<VgpuTypeCount>>(&answer, |t| render::vgpu_types(t, &device))?;
        }
        Command::Reset {
            device,
            method,
            dry_run,
        } => {
            let mut body = json!({"dry_run": dry_run});
            if let Some(m) = method {
                body["method"] = json!(m);
            }
            let answer = client
                .request(
                    Method::POST,
                    &device_path(&device.device, "/reset"),
                    Some(body),
                )
                .await?;
            if dry_run {
                out.print::<ResetDryRun>(&answer, |d| render::reset_plan(&d.plan))?;
            } else {
                out.device(&answer)?;
            }
        }
        Command::Holders(d) => {
            let answer = client
                .request(Method::GET, &device_path(&d.device, "/holders"), None)
                .await?;
            out.print::<Holders>(&answer, |h| render::holders(h, &d.device))?;
        }
        Command::Sriov {
            device,
            num_vfs,
            vf_driver,
        } => {
            let path = device_path(&device, "/sriov");
            let answer = match num_vfs {
                None => client.request(Method::GET, &path, None).await?,
                Some(n) => {
                    let mut body = json!({"num_vfs": n});
                    // Only when given: the agent keeps the recorded choice
                    // otherwise.
                    if let Some(d) = vf_driver {
                        body["vf_driver"] = json!(d);
                    }
                    client.request(Method::PUT, &path, Some(body)).await?
                }
            };
            out.print::<SriovStatus>(&answer, render::sriov)?;
        }
        Command::Health => {
            let answer = client.request(Method::GET, "/health", None).await?;
            out.print::<HealthBody>(&answer, render::health)?;
        }
        Command::Events { since } => {
            let path = match since {
                Some(seq) => format!("/events?since={seq}"),
                None => "/events".to_owned(),
            };
            client
                .each_line(&path, |line| {
                    if out.json {
                        println!("{line}");
                    } else if let Ok(e) = serde_json::from_str::<Event>(line) {
                        println!("{}", render::event(&e));
                    }
                    let _ = std::io::stdout().flush();
                })
                .await?;
        }
        Command::Completion { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

/// A refused claim: `no_capacity` naming candidates is printed here, one
/// line per candidate with its name (looked up in the registry; left out
/// if that fails) and why it did not fit; any other refusal is left to
/// the usual error line.
async fn no_capacity(client: &Client, status: hyper::StatusCode, body: String) -> Failure {
    let Ok(error) = serde_json::from_str::<ErrorBody>(&body) else {
        return Failure::Server(status, body);
    };
    if error.code != "no_capacity" || error.conflicting_functions.is_empty() {
        return Failure::Server(status, body);
    }
    let names: HashMap<String, String> = client
        .get::<Vec<Device>>(&list_path(&[]))
        .await
        .map(|list| {
            list.iter()
                .map(|d| (d.pci_address.to_string(), d.name.to_string()))
                .collect()
        })
        .unwrap_or_default();
    eprint!(
        "{}",
        render::no_capacity(status, &error.conflicting_functions, &names)
    );
    Failure::Printed
}

/// How many VFs each PF with a declared count has now, by the PF's id:
/// its VF records, which live exactly as long as the kernel's VFs. A list
/// filtered by tags may leave some VFs out (a VF's tags can be changed),
/// so then the VFs are counted in the whole registry.
async fn enabled_vfs(
    client: &Client,
    listed: &[Device<'static>],
    filtered: bool,
) -> Result<render::EnabledVfs, Failure> {
    if !listed.iter().any(|d| d.sriov.is_some()) {
        return Ok(render::EnabledVfs::default());
    }
    if filtered {
        let all: Vec<Device> = client.get(&list_path(&[])).await?;
        return Ok(render::EnabledVfs::count(&all));
    }
    Ok(render::EnabledVfs::count(listed))
}

fn main() -> ExitCode {
    CompleteEnv::with_factory(Cli::command)
        .var(complete::COMPLETE_VAR)
        .complete();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Without a command, the help goes to stdout like --help's.
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = Cli::command().print_help();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(args::usage_exit_code(&e)),
            };
        }
    };
    if let Command::Completion {
        shell,
        static_script,
        completer,
    } = &cli.command
    {
        complete::print_script(*shell, *static_script, completer.as_deref());
        return ExitCode::SUCCESS;
    }
    let json_mode = cli.json;
    let client = Client::new(cli.socket.unwrap_or_else(default_socket));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(client, Output { json: json_mode }, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Printed) => ExitCode::FAILURE,
        Err(Failure::Local(msg)) => {
            eprintln!("vfioctl: {msg}");
            ExitCode::FAILURE
        }
        Err(Failure::Server(status, body)) => {
            if json_mode {
                eprintln!("{body}");
            } else {
                match serde_json::from_str::<ErrorBody>(&body) {
                    Ok(e) => eprintln!("vfioctl: {} ({}): {}", e.code, status.as_u16(), e.message),
                    Err(_) => eprintln!("vfioctl: HTTP {status}: {body}"),
                }
            }
            ExitCode::FAILURE
        }
    }
}
