//! vfioctl: the command-line client of vfiod's Unix-socket API.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum, ValueHint};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use clap_complete::env::EnvCompleter;
use clap_complete::CompleteEnv;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde_json::{json, Value};
use vfiod::core::ResetMethod;

const DEFAULT_SOCKET: &str = "/run/vfiod/vfiod.sock";
/// The environment variable that turns a run into a completion request
/// (set by the scripts `vfioctl completion SHELL` prints).
const COMPLETE_VAR: &str = "VFIOCTL_COMPLETE";

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
struct Cli {
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
    socket: Option<String>,
    /// Print the API's JSON instead of tables
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// A registered device, completed from the running agent.
#[derive(Debug, Args)]
struct DeviceArg {
    /// Registry id or name of the device
    #[arg(value_name = "ID|NAME", add = ArgValueCandidates::new(registered_devices))]
    device: String,
}

#[derive(Debug, Args)]
struct NameAndTags {
    /// Device name (taken as given, even if it starts with '-': the agent
    /// says what is wrong with it)
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    name: Option<String>,
    /// A tag; repeat for more
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
}

/// The method names the agent takes: `auto` and the kernel's.
fn reset_methods() -> clap::builder::PossibleValuesParser {
    let names = std::iter::once(ResetMethod::Auto)
        .chain(ResetMethod::KERNEL)
        .map(ResetMethod::as_str);
    clap::builder::PossibleValuesParser::new(names)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Clear the attachment, restore the driver
    Detach {
        #[command(flatten)]
        device: DeviceArg,
        /// Leave the device on vfio-pci
        #[arg(long)]
        keep_bound: bool,
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

fn default_socket() -> String {
    if !std::path::Path::new(DEFAULT_SOCKET).exists() {
        if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
            let user = std::path::Path::new(&run).join("vfiod/vfiod.sock");
            if user.exists() {
                return user.display().to_string();
            }
        }
    }
    DEFAULT_SOCKET.into()
}

/// Percent-encodes a path segment or query component.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Conn {
    client: Client<UnixConnector, Full<Bytes>>,
    socket: String,
}

impl Conn {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, hyper::body::Incoming), String> {
        let uri: hyper::Uri = Uri::new(&self.socket, path).into();
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder().method(method).uri(uri);
        if !bytes.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| {
            let mut msg = format!("cannot reach vfiod at {}: {e}", self.socket);
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            msg + " (is it running? see `systemctl status vfiod`; --socket or VFIOD_SOCKET pick another socket)"
        })?;
        let status = resp.status();
        Ok((status, resp.into_body()))
    }

    /// A whole request; an HTTP error becomes `Err` with the server's body.
    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let (status, body) = self
            .call(method, path, body)
            .await
            .map_err(Failure::Local)?;
        let bytes = body
            .collect()
            .await
            .map_err(|e| Failure::Local(format!("reading the response: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(Failure::Server(
                status,
                String::from_utf8_lossy(&bytes).trim().to_owned(),
            ));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Failure::Local(format!("vfiod sent invalid JSON: {e}")))
    }
}

enum Failure {
    Local(String),
    Server(StatusCode, String),
}

fn s(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

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

fn names(v: &Value) -> String {
    let vendor = v["vendor_name"].as_str().unwrap_or("");
    let device = v["device_name"].as_str().unwrap_or("");
    match (vendor, device) {
        ("", "") => format!("{}:{}", s(v, "vendor_id"), s(v, "device_id")),
        (vn, "") => format!("{vn} {}:{}", s(v, "vendor_id"), s(v, "device_id")),
        (vn, dn) => format!("{vn} {dn}"),
    }
}

fn devices_table(list: &[Value]) -> String {
    table(
        &[
            "NAME", "ADDRESS", "TYPE", "GROUP", "DRIVER", "VFIO", "ATTACHED", "HEALTH", "DEVICE",
            "ID",
        ],
        list.iter()
            .map(|d| {
                vec![
                    s(d, "name"),
                    s(d, "pci_address"),
                    s(d, "type"),
                    s(d, "iommu_group"),
                    if d["present"] == Value::Bool(false) {
                        "(absent)".into()
                    } else {
                        s(d, "current_driver")
                    },
                    if d["bound_to_vfio"] == Value::Bool(true) {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                    s(d, "attached_to"),
                    s(d, "health"),
                    names(d),
                    s(d, "id"),
                ]
            })
            .collect(),
    )
}

fn show_device(d: &Value) -> String {
    let mut out = String::new();
    for key in [
        "id",
        "name",
        "type",
        "pci_address",
        "vendor_id",
        "device_id",
        "vendor_name",
        "device_name",
        "class",
        "iommu_group",
        "present",
        "current_driver",
        "original_driver",
        "bound_to_vfio",
        "bound_by_vfiod",
        "attached_to",
        "created_at",
        "stuck",
        "identity_mismatch",
        "health",
        "health_reason",
    ] {
        out.push_str(&format!("{:<18}{}\n", format!("{key}:"), s(d, key)));
    }
    let tags = d["tags"].as_object().map(|t| {
        t.iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ")
    });
    out.push_str(&format!(
        "{:<18}{}\n",
        "tags:",
        tags.filter(|t| !t.is_empty()).unwrap_or("-".into())
    ));
    if let Some(c) = d["group_companions"].as_array() {
        let c: Vec<String> = c
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        out.push_str(&format!("{:<18}{}\n", "moved with:", c.join(", ")));
    }
    out.push_str(&format!("{:<18}{}\n", "last reset:", last_reset(d)));
    out.push_str(&format!("{:<18}{}\n", "may open:", who_may_open(d)));
    out
}

/// `flr: ok in 139 ms at 2026-12-01T07:12:41Z`, or `-` before any reset.
fn last_reset(d: &Value) -> String {
    let r = &d["last_reset"];
    if r.is_null() {
        return "-".into();
    }
    let duration = r["duration_ms"]
        .as_u64()
        .map(|ms| format!(" in {ms} ms"))
        .unwrap_or_default();
    format!(
        "{}: {}{duration} at {}",
        s(r, "method"),
        s(r, "result"),
        s(r, "at")
    )
}

/// Who may open the device's VFIO nodes: root always; while attached,
/// the attachment's uid through its ACL grant (and its VMM's pid).
fn who_may_open(d: &Value) -> String {
    if !d["bound_to_vfio"].as_bool().unwrap_or(false) {
        return "nobody: not on vfio".into();
    }
    match d["attached_uid"].as_u64() {
        Some(0) | None => "root only".into(),
        Some(uid) => match d["attached_pid"].as_u64() {
            Some(pid) => format!("root and uid {uid} (until VMM pid {pid} exits)"),
            None => format!("root and uid {uid}"),
        },
    }
}

fn tags_object(tags: &[(String, String)]) -> Value {
    Value::Object(
        tags.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// One line per holder: what it is, and the details that identify it.
fn holders_table(holders: &[Value]) -> String {
    let detail = |h: &Value| -> String {
        let field = |k: &str| s(h, k);
        match h["kind"].as_str().unwrap_or("") {
            "process" => {
                let mut d = format!(
                    "pid {} ({}) uid {} has {} open",
                    field("pid"),
                    field("comm"),
                    field("uid"),
                    field("path")
                );
                if !h["unit"].is_null() {
                    d.push_str(&format!(", unit {}", field("unit")));
                }
                d
            }
            "mount" => format!(
                "{} mounted on {} ({})",
                field("device"),
                field("mount_point"),
                field("fstype")
            ),
            "swap" => format!("{} is swap in use", field("device")),
            "block_stack" => format!("{} is held by {}", field("device"), field("holder")),
            "net_interface" => {
                let addresses = h["addresses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .filter(|l| !l.is_empty())
                    .unwrap_or_else(|| "none".into());
                format!(
                    "{} addresses: {addresses}; routes: {}",
                    field("interface"),
                    field("routes")
                )
            }
            "framebuffer_console" => format!(
                "{} on framebuffer {}",
                field("vtconsole"),
                field("framebuffer")
            ),
            // A kind this client does not know yet: show what it carries.
            _ => h
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| *k != "kind" && *k != "pci_address")
                        .map(|(k, _)| format!("{k}={}", s(h, k)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
        }
    };
    table(
        &["FUNCTION", "KIND", "HOLDER"],
        holders
            .iter()
            .map(|h| vec![s(h, "pci_address"), s(h, "kind"), detail(h)])
            .collect(),
    )
}

/// Key/value lines for an answer whose shape this client does not know.
fn key_values(v: &Value) -> String {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, _)| format!("{:<20}{}\n", format!("{k}:"), s(v, k)))
                .collect()
        })
        .unwrap_or_default()
}

fn available_table(list: &[Value], all: bool) -> String {
    if all {
        // lspci -nn's columns, plus what passthrough needs to know.
        let rows = list
            .iter()
            .map(|d| {
                let class = s(d, "class");
                vec![
                    s(d, "pci_address"),
                    format!("{} [{}]", s(d, "type"), class.get(..4).unwrap_or(&class)),
                    format!("{} [{}:{}]", names(d), s(d, "vendor_id"), s(d, "device_id")),
                    s(d, "current_driver"),
                    s(d, "iommu_group"),
                    s(d, "registered_id"),
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
                s(d, "pci_address"),
                s(d, "type"),
                s(d, "iommu_group"),
                s(d, "current_driver"),
                if d["registered_id"].is_null() {
                    "no".into()
                } else {
                    "yes".into()
                },
                names(d),
            ]
        })
        .collect();
    table(
        &["ADDRESS", "TYPE", "GROUP", "DRIVER", "REGISTERED", "DEVICE"],
        rows,
    )
}

fn name_tags_body(body: &mut Value, nt: &NameAndTags) {
    if let Some(n) = &nt.name {
        body["name"] = json!(n);
    }
    if !nt.tags.is_empty() {
        body["tags"] = tags_object(&nt.tags);
    }
}

fn dry_run_steps(v: &Value) -> Vec<String> {
    v["plan"]["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(|x| format!("  {x}\n")))
                .collect()
        })
        .unwrap_or_default()
}

async fn run(conn: Conn, json_out: bool, command: Command) -> Result<(), Failure> {
    let dev_path = |id: &str, action: &str| format!("/devices/{}{action}", encode(id));
    let out = |v: &Value, human: String| {
        if json_out {
            println!("{v}");
        } else {
            print!("{human}");
        }
    };
    match command {
        Command::List { tags } => {
            let query: Vec<String> = tags
                .iter()
                .map(|(k, v)| format!("{}={}", encode(&format!("tags[{k}]")), encode(v)))
                .collect();
            let path = if query.is_empty() {
                "/devices".into()
            } else {
                format!("/devices?{}", query.join("&"))
            };
            let v = conn.json(Method::GET, &path, None).await?;
            let list = v.as_array().cloned().unwrap_or_default();
            out(
                &v,
                if list.is_empty() {
                    "no registered devices\n".into()
                } else {
                    devices_table(&list)
                },
            );
        }
        Command::Available { all } => {
            let path = if all {
                "/devices/available?all=true"
            } else {
                "/devices/available"
            };
            let v = conn.json(Method::GET, path, None).await?;
            let list = v.as_array().cloned().unwrap_or_default();
            out(&v, available_table(&list, all));
        }
        Command::Register { address, name_tags } => {
            let mut body = json!({"pci_address": address});
            name_tags_body(&mut body, &name_tags);
            let v = conn.json(Method::POST, "/devices", Some(body)).await?;
            out(&v, show_device(&v));
        }
        Command::Show(d) => {
            let v = conn
                .json(Method::GET, &dev_path(&d.device, ""), None)
                .await?;
            out(&v, show_device(&v));
        }
        Command::Update { device, name_tags } => {
            let mut body = json!({});
            name_tags_body(&mut body, &name_tags);
            let v = conn
                .json(Method::PATCH, &dev_path(&device.device, ""), Some(body))
                .await?;
            out(&v, show_device(&v));
        }
        Command::Delete(d) => {
            let id = d.device;
            conn.json(Method::DELETE, &dev_path(&id, ""), None).await?;
            out(&json!({"deleted": id}), format!("deleted {id}\n"));
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
            let v = conn
                .json(Method::POST, &dev_path(&device.device, "/bind"), Some(body))
                .await?;
            let human = if dry_run {
                let steps = dry_run_steps(&v);
                if steps.is_empty() {
                    "nothing to do: already on vfio\n".into()
                } else {
                    format!(
                        "dry run, nothing changed; a bind would:\n{}",
                        steps.concat()
                    )
                }
            } else {
                show_device(&v)
            };
            out(&v, human);
        }
        Command::Unbind(d) => {
            let v = conn
                .json(Method::POST, &dev_path(&d.device, "/unbind"), None)
                .await?;
            out(&v, show_device(&v));
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
            let v = conn
                .json(
                    Method::POST,
                    &dev_path(&device.device, "/attach"),
                    Some(body),
                )
                .await?;
            out(&v, show_device(&v));
        }
        Command::Detach { device, keep_bound } => {
            let body = json!({"keep_bound": keep_bound});
            let v = conn
                .json(
                    Method::POST,
                    &dev_path(&device.device, "/detach"),
                    Some(body),
                )
                .await?;
            out(&v, show_device(&v));
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
            let v = conn
                .json(
                    Method::POST,
                    &dev_path(&device.device, "/reset"),
                    Some(body),
                )
                .await?;
            let human = if dry_run {
                let list = |k: &str| {
                    v["plan"][k]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| match x.as_str() {
                                    Some(m) => m.to_owned(),
                                    // A function of the scope.
                                    None => format!("{} ({})", s(x, "pci_address"), s(x, "driver")),
                                })
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default()
                };
                format!(
                    "dry run, nothing changed; a reset would try {} and reach:\n{}",
                    list("methods").join(", "),
                    list("scope")
                        .iter()
                        .map(|f| format!("  {f}\n"))
                        .collect::<String>()
                )
            } else {
                show_device(&v)
            };
            out(&v, human);
        }
        Command::Holders(d) => {
            let v = conn
                .json(Method::GET, &dev_path(&d.device, "/holders"), None)
                .await?;
            let holders = v["holders"].as_array().cloned().unwrap_or_default();
            out(
                &v,
                if holders.is_empty() {
                    format!("nothing holds {}\n", d.device)
                } else {
                    holders_table(&holders)
                },
            );
        }
        Command::Health => {
            let v = conn.json(Method::GET, "/health", None).await?;
            out(&v, key_values(&v));
        }
        Command::Events { since } => follow_events(&conn, json_out, since).await?,
        Command::Completion { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

async fn follow_events(conn: &Conn, json_out: bool, since: Option<u64>) -> Result<(), Failure> {
    let path = match since {
        Some(seq) => format!("/events?since={seq}"),
        None => "/events".to_owned(),
    };
    let (status, mut body) = conn
        .call(Method::GET, &path, None)
        .await
        .map_err(Failure::Local)?;
    if !status.is_success() {
        return Err(Failure::Server(status, String::new()));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Local(format!("event stream broke: {e}")))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if json_out {
                println!("{text}");
            } else if let Ok(e) = serde_json::from_str::<Value>(text) {
                let mut extra = BTreeMap::new();
                for k in ["driver", "instance_id", "detail", "missed"] {
                    if !e[k].is_null() {
                        extra.insert(k, s(&e, k));
                    }
                }
                let extra: Vec<String> = extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
                // The sequence number first: `--since` resumes from it.
                println!(
                    "{:>6}  {}  {:<18} {:<13} {}",
                    s(&e, "seq"),
                    s(&e, "at"),
                    s(&e, "type"),
                    s(&e, "pci_address"),
                    extra.join(" ")
                );
            }
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

// ---- shell completion ----

fn print_completion(shell: CompletionShell, static_script: bool, completer: Option<&str>) {
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

/// A GET for a completion: a second at most, and nothing on any failure
/// (no agent means no candidates, never an error under the cursor).
fn completion_get(path: &str) -> Vec<Value> {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let conn = Conn {
        client: Client::unix(),
        socket: completion_socket(),
    };
    runtime.block_on(async {
        match tokio::time::timeout(
            std::time::Duration::from_secs(1),
            conn.json(Method::GET, path, None),
        )
        .await
        {
            Ok(Ok(Value::Array(list))) => list,
            _ => Vec::new(),
        }
    })
}

/// Names first; ids are offered only when no name matches what is typed.
fn registered_devices() -> Vec<CompletionCandidate> {
    let list = completion_get("/devices");
    let names = list.iter().filter_map(|d| {
        let name = d["name"].as_str()?;
        Some(CompletionCandidate::new(name).help(Some(
            format!("{} {}", s(d, "pci_address"), s(d, "id")).into(),
        )))
    });
    let ids = list.iter().filter_map(|d| {
        let id = d["id"].as_str()?;
        Some(
            CompletionCandidate::new(id)
                .help(Some(
                    format!("{} {}", s(d, "pci_address"), s(d, "name")).into(),
                ))
                .hide(true),
        )
    });
    names.chain(ids).collect()
}

fn unregistered_candidates() -> Vec<CompletionCandidate> {
    completion_get("/devices/available")
        .iter()
        .filter(|d| d["registered_id"].is_null())
        .filter_map(|d| {
            let addr = d["pci_address"].as_str()?;
            Some(CompletionCandidate::new(addr).help(Some(names(d).into())))
        })
        .collect()
}

/// Exit 2 for an option before the command (the global ones), 1 for
/// everything about a command, as before clap: scripts tell a broken
/// invocation of vfioctl from a refused request that way.
fn usage_exit_code(e: &clap::Error) -> u8 {
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

fn main() -> ExitCode {
    CompleteEnv::with_factory(Cli::command)
        .var(COMPLETE_VAR)
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
                _ => ExitCode::from(usage_exit_code(&e)),
            };
        }
    };
    if let Command::Completion {
        shell,
        static_script,
        completer,
    } = &cli.command
    {
        print_completion(*shell, *static_script, completer.as_deref());
        return ExitCode::SUCCESS;
    }
    let json_mode = cli.json;
    let conn = Conn {
        client: Client::unix(),
        socket: cli.socket.unwrap_or_else(default_socket),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(conn, json_mode, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Local(msg)) => {
            eprintln!("vfioctl: {msg}");
            ExitCode::FAILURE
        }
        Err(Failure::Server(status, body)) => {
            if json_mode {
                eprintln!("{body}");
            } else {
                match serde_json::from_str::<Value>(&body) {
                    Ok(v) => eprintln!(
                        "vfioctl: {} ({}): {}",
                        s(&v, "code"),
                        status.as_u16(),
                        s(&v, "message")
                    ),
                    Err(_) => eprintln!("vfioctl: HTTP {status}: {body}"),
                }
            }
            ExitCode::FAILURE
        }
    }
}
