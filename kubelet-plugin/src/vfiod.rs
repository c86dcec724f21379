//! The plugin's side of vfiod's Unix-socket API (HTTP/1.1 + JSON): the
//! device list with its event sequence number, the event stream, and the
//! bind/attach/detach calls an allocation makes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde::Deserialize;
use serde_json::{json, Value};

/// Bound on one request/response exchange (not on the event stream). A
/// bind waits for vfiod's own sysfs timeouts, which default to 5 s per
/// write, so this is generous.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A registered device, as much of vfiod's `Device` as the plugin reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Device {
    pub name: String,
    pub pci_address: String,
    /// -1 when the device has no IOMMU group.
    pub iommu_group: i64,
    #[serde(default)]
    pub bound_to_vfio: bool,
    #[serde(default)]
    pub attached_to: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default = "present_by_default")]
    pub present: bool,
    #[serde(default)]
    pub stuck: bool,
    #[serde(default)]
    pub identity_mismatch: bool,
    /// `ok`, `needs_reset`, `quarantined` or `needs_host_reboot` on a
    /// vfiod that tracks health; absent on one that does not.
    #[serde(default, deserialize_with = "health_state")]
    pub health: Option<String>,
}

/// The health state, whether vfiod sends it as a string or as an object
/// with a `state` field; any other shape is read as "no health", so a
/// change of its form can never stop the plugin from reading devices.
fn health_state<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Value::deserialize(d)?;
    let state = match &v {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o.get("state").and_then(Value::as_str),
        _ => None,
    };
    Ok(state.map(str::to_owned))
}

fn present_by_default() -> bool {
    true
}

/// One line of `GET /events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VfiodError {
    #[error("cannot reach vfiod at {socket}: {detail}")]
    Unreachable { socket: String, detail: String },
    /// vfiod answered with an error object; `message` is its own words.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from vfiod to {what}: {detail}")]
    Protocol { what: String, detail: String },
    #[error("vfiod did not answer {what} within {}s", CALL_TIMEOUT.as_secs())]
    Timeout { what: String },
}

#[derive(Clone)]
pub struct VfiodClient {
    client: Client<UnixConnector, Full<Bytes>>,
    socket: PathBuf,
}

impl VfiodClient {
    pub fn new(socket: &Path) -> VfiodClient {
        VfiodClient {
            client: Client::unix(),
            socket: socket.to_owned(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<hyper::Response<Incoming>, VfiodError> {
        let uri: hyper::Uri = Uri::new(&self.socket, path).into();
        let mut req = Request::builder().method(method).uri(uri);
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| VfiodError::Protocol {
                what: path.to_owned(),
                detail: e.to_string(),
            })?;
        self.client.request(req).await.map_err(|e| {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail.push_str(&format!(": {s}"));
                source = s.source();
            }
            VfiodError::Unreachable {
                socket: self.socket.display().to_string(),
                detail,
            }
        })
    }

    /// A whole exchange; an HTTP error status becomes `VfiodError::Api`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(hyper::HeaderMap, Value), VfiodError> {
        let what = format!("{method} {path}");
        let exchange = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| VfiodError::Unreachable {
                    socket: self.socket.display().to_string(),
                    detail: format!("reading the answer to {what}: {e}"),
                })?
                .to_bytes();
            let value: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).map_err(|e| VfiodError::Protocol {
                    what: what.clone(),
                    detail: format!("not JSON ({e})"),
                })?
            };
            if !status.is_success() {
                return Err(api_error(status, &value));
            }
            Ok((headers, value))
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| VfiodError::Timeout { what: what.clone() })?
    }

    fn decode<T: for<'de> Deserialize<'de>>(what: &str, v: Value) -> Result<T, VfiodError> {
        serde_json::from_value(v).map_err(|e| VfiodError::Protocol {
            what: what.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Every registered device and the sequence number of the newest event
    /// they reflect (`X-Vfiod-Event-Seq`).
    pub async fn devices(&self) -> Result<(Vec<Device>, u64), VfiodError> {
        let (headers, body) = self.call(Method::GET, "/devices", None).await?;
        let seq = headers
            .get("x-vfiod-event-seq")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| VfiodError::Protocol {
                what: "GET /devices".into(),
                detail: "no X-Vfiod-Event-Seq header".into(),
            })?;
        Ok((Self::decode("GET /devices", body)?, seq))
    }

    pub async fn device(&self, name: &str) -> Result<Device, VfiodError> {
        let path = format!("/devices/{name}");
        let (_, body) = self.call(Method::GET, &path, None).await?;
        Self::decode(&path, body)
    }

    pub async fn bind(&self, name: &str, with_group: bool) -> Result<Device, VfiodError> {
        let path = format!("/devices/{name}/bind");
        let body = if with_group {
            json!({"with_group": true})
        } else {
            json!({})
        };
        let (_, body) = self.call(Method::POST, &path, Some(body)).await?;
        Self::decode(&path, body)
    }

    pub async fn attach(&self, name: &str, instance_id: &str) -> Result<Device, VfiodError> {
        let path = format!("/devices/{name}/attach");
        let (_, body) = self
            .call(
                Method::POST,
                &path,
                Some(json!({"instance_id": instance_id})),
            )
            .await?;
        Self::decode(&path, body)
    }

    /// Clears the attachment and leaves the device on vfio.
    pub async fn detach_keep_bound(&self, name: &str) -> Result<Device, VfiodError> {
        let path = format!("/devices/{name}/detach");
        let (_, body) = self
            .call(Method::POST, &path, Some(json!({"keep_bound": true})))
            .await?;
        Self::decode(&path, body)
    }

    /// Opens `GET /events?since=SEQ`: retained events after `since` first,
    /// then live ones.
    pub async fn events(&self, since: u64) -> Result<EventStream, VfiodError> {
        let path = format!("/events?since={since}");
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.send(Method::GET, &path, None))
            .await
            .map_err(|_| VfiodError::Timeout {
                what: format!("GET {path}"),
            })??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(api_error(status, &value));
        }
        Ok(EventStream {
            body: resp.into_body(),
            pending: BytesMut::new(),
        })
    }
}

fn api_error(status: StatusCode, body: &Value) -> VfiodError {
    VfiodError::Api {
        status: status.as_u16(),
        code: body["code"].as_str().unwrap_or("unknown").to_owned(),
        message: body["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status} without an error message")),
    }
}

/// The newline-delimited JSON body of `GET /events`.
pub struct EventStream {
    body: Incoming,
    pending: BytesMut,
}

impl EventStream {
    /// The next event; `Ok(None)` when vfiod ended the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, VfiodError> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line = self.pending.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| VfiodError::Protocol {
                        what: "GET /events".into(),
                        detail: format!("bad event line ({e})"),
                    });
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(VfiodError::Protocol {
                        what: "GET /events".into(),
                        detail: e.to_string(),
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_health_is_read_as_a_string_or_an_object_state_or_not_at_all() {
        let base = json!({"name": "g", "pci_address": "0000:01:00.0", "iommu_group": 1});
        let with = |h: Value| {
            let mut v = base.clone();
            v["health"] = h;
            serde_json::from_value::<Device>(v).unwrap().health
        };
        assert_eq!(with(json!("quarantined")).as_deref(), Some("quarantined"));
        assert_eq!(
            with(json!({"state": "needs_host_reboot", "reason": "x"})).as_deref(),
            Some("needs_host_reboot")
        );
        assert_eq!(with(json!(7)), None);
        assert_eq!(serde_json::from_value::<Device>(base).unwrap().health, None);
    }
}
