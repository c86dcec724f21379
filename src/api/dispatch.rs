//! One handler per route: parse the request (see [`parse`]), make the
//! core call, shape the answer (see [`wire`]). Nothing here decides
//! anything the core should.

use std::borrow::Cow;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::error::ApiError;
use super::respond::{self, ResponseBody};
use super::{event_stream, parse, wire, zero_copy, Api, Peer, EVENT_SEQ_HEADER, OPENAPI_YAML};
use crate::core::{Caller, Core, Operation, Outcome};
use crate::error::CoreError;
use crate::registry::DeviceRecord;

/// A request as its handler gets it: routed, allowed, its body read
/// (empty for a route that changes nothing).
pub struct Call<'a> {
    /// The server's shared state: core, policy, accounting, list cache.
    pub api: &'a Api,
    /// The caller's socket credentials, taken once per connection.
    pub peer: &'a Peer,
    /// The path's `{id_or_name}`, decoded; empty if the template has none.
    pub id: String,
    /// The raw query string, undecoded; each handler parses its own.
    pub query: Option<&'a str>,
    /// Only `/metrics` reads it, to choose OpenMetrics over Prometheus text.
    pub accept: Option<&'a HeaderValue>,
    /// Already bounded by size and time when the handler gets it.
    pub body: Bytes,
}

type Answer = Result<Response<ResponseBody>, ApiError>;

impl Call<'_> {
    fn core(&self) -> &Core {
        &self.api.core
    }

    fn caller(&self) -> Caller {
        Caller {
            uid: self.peer.uid,
            pid: self.peer.pid,
        }
    }

    /// Runs `op` for this call's caller.
    async fn execute(&self, op: Operation) -> Result<Outcome, ApiError> {
        Ok(self.core().execute(self.caller(), op).await?)
    }

    fn device(&self, status: StatusCode, d: &DeviceRecord) -> Response<ResponseBody> {
        respond::json(status, &wire::Device::new(d, self.core().ids()))
    }

    /// A change that may be a dry run: the plan then, else the device.
    fn planned<Plan: Serialize + Clone>(
        &self,
        dry_run: bool,
        d: &DeviceRecord,
        plan: &Plan,
    ) -> Response<ResponseBody> {
        if !dry_run {
            return self.device(StatusCode::OK, d);
        }
        let device = wire::Device::new(d, self.core().ids());
        respond::json(StatusCode::OK, &wire::DryRun::new(device, plan))
    }
}

/// `GET /devices`: the cached serialisation for this registry version, with the
/// newest event's seq in a header so a client can follow on from it.
pub async fn list(c: Call<'_>) -> Answer {
    let core = c.core();
    let filter = parse::list_query(c.query)?;
    let seq = core.events().last_seq();
    let body = c.api.lists().filtered(&filter);
    let mut resp = respond::bytes(StatusCode::OK, "application/json", body);
    resp.headers_mut()
        .insert(EVENT_SEQ_HEADER, HeaderValue::from(seq));
    Ok(resp)
}

/// `POST /devices`: 201 with the new record.
pub async fn register(c: Call<'_>) -> Answer {
    let req = parse::register(&c.body)?;
    let d = c.execute(Operation::Register(req)).await?.device()?;
    Ok(c.device(StatusCode::CREATED, &d))
}

/// `GET /devices/available`: candidates on the bus now (`?all` for every
/// function), each with its registered id if any. Concurrent requests
/// share one scan that started after they came (see [`coalesce`](super::coalesce)).
pub async fn available(c: Call<'_>) -> Answer {
    let all = parse::available_query(c.query)?;
    let core = c.api.core.clone();
    let body = c.api.available[usize::from(all)]
        .get(move || async move {
            let functions = core.available(all).await.map_err(|e| match e {
                CoreError::Internal(message) => message,
                other => other.to_string(),
            })?;
            let registry = core.snapshot();
            let wire: Vec<_> = functions
                .iter()
                .map(|f| {
                    let id = registry.get_by_address(&f.address).map(|d| d.id.as_str());
                    wire::AvailableDevice::new(f, core.ids(), id)
                })
                .collect();
            let mut body = serde_json::to_vec(&wire).expect("wire types serialise");
            body.push(b'\n');
            Ok(zero_copy::seal(body))
        })
        .await
        .map_err(CoreError::Internal)?;
    Ok(respond::bytes(StatusCode::OK, "application/json", body))
}

/// `GET /devices/{id_or_name}`.
pub async fn get(c: Call<'_>) -> Answer {
    let body = c
        .api
        .lists()
        .device(&c.id)
        .ok_or_else(|| CoreError::NotFound(c.id.chars().take(80).collect()))?;
    Ok(respond::bytes(StatusCode::OK, "application/json", body))
}

/// `PATCH /devices/{id_or_name}`.
pub async fn update(c: Call<'_>) -> Answer {
    let req = parse::update(&c.body)?;
    let device = c.id.clone();
    let d = c
        .execute(Operation::Update { device, req })
        .await?
        .device()?;
    Ok(c.device(StatusCode::OK, &d))
}

/// `DELETE /devices/{id_or_name}`: 204, after giving back any driver vfiod
/// took.
pub async fn delete(c: Call<'_>) -> Answer {
    let device = c.id.clone();
    c.execute(Operation::Delete { device }).await?;
    Ok(respond::no_content())
}

/// `POST /devices/{id_or_name}/bind`: the device, or the plan on `dry_run`.
pub async fn bind(c: Call<'_>) -> Answer {
    let req = parse::bind(&c.body)?;
    let device = c.id.clone();
    let outcome = c.execute(Operation::Bind { device, req }).await?.bound()?;
    Ok(c.planned(req.dry_run, &outcome.device, &outcome.plan))
}

/// `POST /devices/{id_or_name}/unbind`.
pub async fn unbind(c: Call<'_>) -> Answer {
    parse::unbind(&c.body)?;
    let device = c.id.clone();
    let d = c.execute(Operation::Unbind { device }).await?.device()?;
    Ok(c.device(StatusCode::OK, &d))
}

/// `POST /devices/{id_or_name}/attach`.
pub async fn attach(c: Call<'_>) -> Answer {
    let req = parse::attach(&c.body)?;
    let device = c.id.clone();
    let d = c
        .execute(Operation::Attach { device, req })
        .await?
        .device()?;
    Ok(c.device(StatusCode::OK, &d))
}

/// `POST /devices/{id_or_name}/detach`.
pub async fn detach(c: Call<'_>) -> Answer {
    let req = parse::detach(&c.body)?;
    let device = c.id.clone();
    let d = c
        .execute(Operation::Detach { device, req })
        .await?
        .device()?;
    Ok(c.device(StatusCode::OK, &d))
}

/// `POST /devices/{id_or_name}/reset`: the device, or the plan on `dry_run`.
pub async fn reset(c: Call<'_>) -> Answer {
    let req = parse::reset(&c.body)?;
    let device = c.id.clone();
    let outcome = c.execute(Operation::Reset { device, req }).await?.reset()?;
    Ok(c.planned(req.dry_run, &outcome.device, &outcome.plan))
}

/// `GET /devices/{id_or_name}/holders`: a fresh scan, nothing changed.
pub async fn holders(c: Call<'_>) -> Answer {
    let (record, holders) = c.core().holders(&c.id).await?;
    let body = wire::Holders {
        id: Cow::Borrowed(&record.id),
        name: Cow::Borrowed(&record.name),
        pci_address: record.pci_address,
        holders: Cow::Borrowed(&holders),
    };
    Ok(respond::json(StatusCode::OK, &body))
}

/// `GET /devices/{id_or_name}/sriov`: the kernel's VF count and the
/// declared one, fresh from sysfs.
pub async fn sriov(c: Call<'_>) -> Answer {
    let status = c.core().sriov_status(&c.id).await?;
    Ok(respond::json(StatusCode::OK, &status))
}

/// `PUT /devices/{id_or_name}/sriov`: sets the VF count; idempotent.
pub async fn set_sriov(c: Call<'_>) -> Answer {
    let req = parse::sriov(&c.body)?;
    let device = c.id.clone();
    let status = c
        .execute(Operation::SetVfs { device, req })
        .await?
        .sriov()?;
    Ok(respond::json(StatusCode::OK, &status))
}

/// `POST /devices/claim`: 201 with the device handed out, 200 with the
/// same device when the same instance asks the same again.
pub async fn claim(c: Call<'_>) -> Answer {
    let req = parse::claim(&c.body)?;
    match c.execute(Operation::Claim(req)).await? {
        Outcome::Claimed(claimed) => {
            let status = if claimed.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = wire::ClaimAnswer {
                device: wire::Device::new(&claimed.device, c.core().ids()),
                mdev: claimed.mdev.as_ref().map(wire::MdevWire::new),
            };
            Ok(respond::json(status, &body))
        }
        other => {
            Err(crate::error::CoreError::Internal(format!("a claim ended as {other:?}")).into())
        }
    }
}

/// `GET /devices/capacity`: counts per `resource` tag.
pub async fn capacity(c: Call<'_>) -> Answer {
    let filter = parse::capacity_query(c.query)?;
    let pools = c.core().capacity(&filter);
    Ok(respond::json(
        StatusCode::OK,
        &serde_json::json!({ "resources": pools }),
    ))
}

/// `GET /devices/{id_or_name}/vgpu_types`: the vGPU types of a PF's VFs and
/// how many free VFs can take each now.
pub async fn vgpu_types(c: Call<'_>) -> Answer {
    let types = c.core().vgpu_types(&c.id)?;
    Ok(respond::json(StatusCode::OK, &types))
}

/// `GET /devices/{id_or_name}/mdev_types`: the legacy mdev types the
/// parent offers now, and the mediated devices vfiod made on it.
pub async fn mdev_types(c: Call<'_>) -> Answer {
    let (record, types) = c.core().mdev_types(&c.id)?;
    let body = wire::MdevTypes {
        id: Cow::Borrowed(&record.id),
        name: Cow::Borrowed(&record.name),
        pci_address: record.pci_address,
        mdev_types: types,
        mdevs: record.mdevs.iter().map(wire::MdevWire::new).collect(),
    };
    Ok(respond::json(StatusCode::OK, &body))
}

/// `GET /events`: a streaming response; the per-uid stream limit is taken here
/// and held for the stream's life.
pub async fn events(c: Call<'_>) -> Answer {
    let since = parse::events_query(c.query)?;
    let api = c.api;
    let permit = api
        .accounting
        .open_event_stream(c.peer.uid, api.policy.may_mutate(c.peer))?;
    let bus = c.core().events();
    Ok(event_stream::respond(
        bus,
        since,
        permit,
        api.shutdown.clone(),
    ))
}

/// `GET /health`.
pub async fn health(c: Call<'_>) -> Answer {
    let health = c.core().health();
    let body = wire::HealthBody {
        status: Cow::Borrowed("ok"),
        health: Cow::Borrowed(&health),
    };
    Ok(respond::json(StatusCode::OK, &body))
}

/// `GET /openapi.yaml`: the spec compiled into the binary.
pub async fn openapi(_: Call<'_>) -> Answer {
    Ok(respond::bytes(
        StatusCode::OK,
        "application/yaml",
        OPENAPI_YAML,
    ))
}

/// `GET /metrics`: OpenMetrics when `Accept` asks for it, else Prometheus
/// text. Concurrent scrapes share one render that started after they came
/// (see [`coalesce`](super::coalesce)).
pub async fn metrics(c: Call<'_>) -> Answer {
    let accept = c.accept.and_then(|a| a.to_str().ok());
    let openmetrics = crate::metrics::wants_openmetrics(accept);
    let core = c.api.core.clone();
    let text = c.api.metrics[usize::from(openmetrics)]
        .get(move || async move {
            let (_, text) = crate::metrics::render(&core.snapshot(), openmetrics);
            Ok(Bytes::from(text))
        })
        .await
        .map_err(CoreError::Internal)?;
    let content_type = crate::metrics::content_type(openmetrics);
    Ok(respond::bytes(StatusCode::OK, content_type, text))
}
