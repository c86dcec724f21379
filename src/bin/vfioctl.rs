//! vfioctl: the command-line client of vfiod's Unix-socket API.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde_json::{json, Value};

const DEFAULT_SOCKET: &str = "/run/vfiod/vfiod.sock";

const USAGE: &str = "\
vfioctl: command-line client for vfiod, the PCI passthrough host agent

USAGE: vfioctl [--socket PATH] [--json] COMMAND [ARGS]

COMMANDS:
  list [--tag KEY=VALUE]...        registered devices (all tags must match)
  available                        passthrough candidates on this host
  register ADDRESS [--name NAME] [--tag KEY=VALUE]...
                                   set a PCI device aside (e.g. 0000:a2:00.0)
  show ID|NAME                     one registered device
  update ID|NAME [--name NAME] [--tag KEY=VALUE]...
                                   rename, or replace all tags
  delete ID|NAME                   unregister (gives back a driver vfiod took)
  bind ID|NAME [--with-group] [--dry-run]
                                   move the device to vfio-pci
  unbind ID|NAME                   give it back to its original driver
  attach ID|NAME INSTANCE          bind if needed, mark attached to INSTANCE
  detach ID|NAME [--keep-bound]    clear the attachment, restore the driver
  events [--since SEQ]             follow the event stream (Ctrl-C to stop); with
                                   --since, first replay the retained events after
                                   SEQ (0: all of them; see X-Vfiod-Event-Seq)
  health                           agent version, IOMMU and vfio-pci status

OPTIONS:
  --socket PATH   vfiod's socket [env VFIOD_SOCKET; default /run/vfiod/vfiod.sock,
                  or $XDG_RUNTIME_DIR/vfiod/vfiod.sock when that exists and the default does not]
  --json          print the API's JSON instead of tables
  -h, --help      this text

Reads work for any local user; changes need root or membership of the
vfiod group. Errors print the server's code and message and exit 1.
";

struct Cli {
    socket: String,
    json: bool,
    command: String,
    args: Vec<String>,
}

fn default_socket() -> String {
    if let Ok(s) = std::env::var("VFIOD_SOCKET") {
        return s;
    }
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

fn parse_cli(args: Vec<String>) -> Result<Option<Cli>, String> {
    let mut socket = None;
    let mut json = false;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" | "help" if rest.is_empty() => return Ok(None),
            "--socket" => socket = Some(it.next().ok_or("--socket needs a path")?),
            "--json" => json = true,
            _ if a.starts_with("--socket=") => socket = Some(a["--socket=".len()..].to_owned()),
            _ => rest.push(a),
        }
    }
    if rest.is_empty() {
        return Ok(None);
    }
    let command = rest.remove(0);
    Ok(Some(Cli {
        socket: socket.unwrap_or_else(default_socket),
        json,
        command,
        args: rest,
    }))
}

/// Splits a command's arguments into positionals, `--flag`s and repeated
/// `--tag K=V`/`--name N` values.
#[derive(Default)]
struct Args {
    positional: Vec<String>,
    flags: Vec<String>,
    tags: Vec<(String, String)>,
    name: Option<String>,
}

fn split_args(
    args: &[String],
    allowed_flags: &[&str],
    allow_name_tags: bool,
) -> Result<Args, String> {
    let mut out = Args::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tag" if allow_name_tags => {
                let kv = it.next().ok_or("--tag needs KEY=VALUE")?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--tag {kv:?}: expected KEY=VALUE"))?;
                out.tags.push((k.to_owned(), v.to_owned()));
            }
            "--name" if allow_name_tags => {
                out.name = Some(it.next().ok_or("--name needs a value")?.clone())
            }
            f if f.starts_with("--") => {
                if !allowed_flags.contains(&f) {
                    return Err(format!("unknown option {f}; see vfioctl --help"));
                }
                out.flags.push(f.to_owned());
            }
            _ => out.positional.push(a.clone()),
        }
    }
    Ok(out)
}

fn one_positional(a: &Args, what: &str) -> Result<String, String> {
    match a.positional.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!("expected exactly one {what}; see vfioctl --help")),
    }
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
    out
}

fn tags_object(tags: &[(String, String)]) -> Value {
    Value::Object(
        tags.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let conn = Conn {
        client: Client::unix(),
        socket: cli.socket.clone(),
    };
    let local = Failure::Local;
    let dev_path = |id: &str, action: &str| format!("/devices/{}{action}", encode(id));
    let out = |v: &Value, human: String| {
        if cli.json {
            println!("{v}");
        } else {
            print!("{human}");
        }
    };
    let a =
        |flags: &[&str], name_tags: bool| split_args(&cli.args, flags, name_tags).map_err(local);
    match cli.command.as_str() {
        "list" => {
            let args = a(&[], true)?;
            let query: Vec<String> = args
                .tags
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
        "available" => {
            a(&[], false)?;
            let v = conn.json(Method::GET, "/devices/available", None).await?;
            let list = v.as_array().cloned().unwrap_or_default();
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
            out(
                &v,
                table(
                    &["ADDRESS", "TYPE", "GROUP", "DRIVER", "REGISTERED", "DEVICE"],
                    rows,
                ),
            );
        }
        "register" => {
            let args = a(&[], true)?;
            let addr = one_positional(&args, "PCI address").map_err(local)?;
            let mut body = json!({"pci_address": addr});
            if let Some(n) = &args.name {
                body["name"] = json!(n);
            }
            if !args.tags.is_empty() {
                body["tags"] = tags_object(&args.tags);
            }
            let v = conn.json(Method::POST, "/devices", Some(body)).await?;
            out(&v, show_device(&v));
        }
        "show" => {
            let id = one_positional(&a(&[], false)?, "device id or name").map_err(local)?;
            let v = conn.json(Method::GET, &dev_path(&id, ""), None).await?;
            out(&v, show_device(&v));
        }
        "update" => {
            let args = a(&[], true)?;
            let id = one_positional(&args, "device id or name").map_err(local)?;
            let mut body = json!({});
            if let Some(n) = &args.name {
                body["name"] = json!(n);
            }
            if !args.tags.is_empty() {
                body["tags"] = tags_object(&args.tags);
            }
            let v = conn
                .json(Method::PATCH, &dev_path(&id, ""), Some(body))
                .await?;
            out(&v, show_device(&v));
        }
        "delete" => {
            let id = one_positional(&a(&[], false)?, "device id or name").map_err(local)?;
            conn.json(Method::DELETE, &dev_path(&id, ""), None).await?;
            out(&json!({"deleted": id}), format!("deleted {id}\n"));
        }
        "bind" => {
            let args = a(&["--with-group", "--dry-run"], false)?;
            let id = one_positional(&args, "device id or name").map_err(local)?;
            let dry_run = args.flags.iter().any(|f| f == "--dry-run");
            let body = json!({
                "with_group": args.flags.iter().any(|f| f == "--with-group"),
                "dry_run": dry_run,
            });
            let v = conn
                .json(Method::POST, &dev_path(&id, "/bind"), Some(body))
                .await?;
            let human = if dry_run {
                let steps: Vec<String> = v["plan"]["steps"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .filter_map(|x| x.as_str().map(|x| format!("  {x}\n")))
                            .collect()
                    })
                    .unwrap_or_default();
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
        "unbind" => {
            let id = one_positional(&a(&[], false)?, "device id or name").map_err(local)?;
            let v = conn
                .json(Method::POST, &dev_path(&id, "/unbind"), None)
                .await?;
            out(&v, show_device(&v));
        }
        "attach" => {
            let args = a(&[], false)?;
            let [id, instance] = args.positional.as_slice() else {
                return Err(local("usage: vfioctl attach ID|NAME INSTANCE".into()));
            };
            let v = conn
                .json(
                    Method::POST,
                    &dev_path(id, "/attach"),
                    Some(json!({"instance_id": instance})),
                )
                .await?;
            out(&v, show_device(&v));
        }
        "detach" => {
            let args = a(&["--keep-bound"], false)?;
            let id = one_positional(&args, "device id or name").map_err(local)?;
            let body = json!({"keep_bound": args.flags.iter().any(|f| f == "--keep-bound")});
            let v = conn
                .json(Method::POST, &dev_path(&id, "/detach"), Some(body))
                .await?;
            out(&v, show_device(&v));
        }
        "health" => {
            a(&[], false)?;
            let v = conn.json(Method::GET, "/health", None).await?;
            let human = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, _)| format!("{:<20}{}\n", format!("{k}:"), s(&v, k)))
                        .collect()
                })
                .unwrap_or_default();
            out(&v, human);
        }
        "events" => {
            let path = match cli.args.as_slice() {
                [] => "/events".to_owned(),
                [flag, seq] if flag == "--since" => {
                    let seq: u64 = seq.parse().map_err(|_| {
                        local(format!(
                            "--since {seq:?}: expected an event sequence number"
                        ))
                    })?;
                    format!("/events?since={seq}")
                }
                _ => return Err(local("usage: vfioctl events [--since SEQ]".into())),
            };
            let (status, mut body) = conn.call(Method::GET, &path, None).await.map_err(local)?;
            if !status.is_success() {
                return Err(Failure::Server(status, String::new()));
            }
            let mut pending = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| local(format!("event stream broke: {e}")))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim();
                    if cli.json {
                        println!("{text}");
                    } else if let Ok(e) = serde_json::from_str::<Value>(text) {
                        let mut extra = BTreeMap::new();
                        for k in ["driver", "instance_id", "detail", "missed"] {
                            if !e[k].is_null() {
                                extra.insert(k, s(&e, k));
                            }
                        }
                        let extra: Vec<String> =
                            extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
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
        }
        other => {
            return Err(local(format!(
                "unknown command {other:?}; see vfioctl --help"
            )))
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match parse_cli(std::env::args().skip(1).collect()) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vfioctl: {e}");
            return ExitCode::from(2);
        }
    };
    let json_mode = cli.json;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(cli)) {
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
