//! vfiod's API as vfioctl calls it: HTTP/1.1 over the agent's Unix socket
//! (hyperlocal), JSON bodies, and what a failed call reports.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde::de::DeserializeOwned;
use serde_json::Value;

const DEFAULT_SOCKET: &str = "/run/vfiod/vfiod.sock";

/// The system agent's socket, or the per-user one when only that exists.
pub fn default_socket() -> String {
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

/// `/devices/{id_or_name}{action}`, e.g. `action` `/bind` or `` for the
/// device itself.
pub fn device_path(device: &str, action: &str) -> String {
    format!("/devices/{}{action}", encode(device))
}

/// `GET /devices`, filtered by every tag given.
pub fn list_path(tags: &[(String, String)]) -> String {
    tags_path("/devices", tags)
}

/// `path` with a `tags[KEY]=VALUE` query for every tag given (the filter
/// of `GET /devices` and `GET /devices/capacity`).
pub fn tags_path(path: &str, tags: &[(String, String)]) -> String {
    let query: Vec<String> = tags
        .iter()
        .map(|(k, v)| format!("{}={}", encode(&format!("tags[{k}]")), encode(v)))
        .collect();
    if query.is_empty() {
        path.into()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Why a command failed: here (no agent, a broken answer), or at the
/// agent, with its status and error body; or a refusal the command has
/// already printed in its own way.
pub enum Failure {
    Local(String),
    Server(StatusCode, String),
    Printed,
}

/// A successful answer: its status (a claim tells a new hand-out, 201,
/// from the instance's existing one, 200) and its body.
pub struct Answer {
    pub status: StatusCode,
    body: Bytes,
}

impl Answer {
    /// The body as the daemon's wire type `T`.
    pub fn read<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Failure::Local(format!(
                "vfiod sent an answer this vfioctl cannot read: {e} (is the agent the same \
                 version? `vfioctl --json health` shows its version)"
            ))
        })
    }

    /// The body for `--json`: compact, keys in alphabetical order (as
    /// vfioctl has always printed it), `null` for none.
    pub fn json(&self) -> Result<String, Failure> {
        if self.body.is_empty() {
            return Ok(Value::Null.to_string());
        }
        serde_json::from_slice::<Value>(&self.body)
            .map(|v| v.to_string())
            .map_err(|e| Failure::Local(format!("vfiod sent invalid JSON: {e}")))
    }
}

pub struct Client {
    http: HttpClient<UnixConnector, Full<Bytes>>,
    socket: String,
}

impl Client {
    pub fn new(socket: String) -> Client {
        Client {
            http: HttpClient::unix(),
            socket,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Incoming), String> {
        let uri: hyper::Uri = Uri::new(&self.socket, path).into();
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder().method(method).uri(uri);
        if !bytes.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = self.http.request(req).await.map_err(|e| {
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

    /// A whole request; an HTTP error becomes [`Failure::Server`] with the
    /// server's body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, Failure> {
        let (status, body) = self
            .send(method, path, body)
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
        Ok(Answer {
            status,
            body: bytes,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        self.request(Method::GET, path, None).await?.read()
    }

    /// A GET whose answer streams one JSON document per line (`/events`):
    /// `each` gets every line, trimmed, as it arrives, until the agent
    /// ends the stream.
    pub async fn each_line(&self, path: &str, mut each: impl FnMut(&str)) -> Result<(), Failure> {
        let (status, mut body) = self
            .send(Method::GET, path, None)
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
                each(String::from_utf8_lossy(&line).trim());
            }
        }
        Ok(())
    }
}
