//! The HTTP layer: HTTP/1.1 over a Unix socket, JSON bodies.
//!
//! It is a thin translation: [`route`] names the endpoint, a parse function
//! in [`parse`] turns the request into a typed core request, the core does
//! the work, and [`error`] turns any `CoreError` into a status and code.
//! Peer credentials are read once per connection; mutating routes check
//! them against the [`AccessPolicy`] before reading the body.

pub mod error;
pub mod limits;
pub mod list_cache;
pub mod parse;
pub mod peer;
pub mod server;
pub mod wire;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};

use crate::core::{Caller, Core};
use crate::error::CoreError;
use crate::events::Event;
pub use limits::{Accounting, Limits};
pub use peer::{AccessPolicy, Peer};
pub use server::serve;

pub const MAX_BODY: usize = 64 * 1024;
/// A request body of at most [`MAX_BODY`] from a local process arrives in
/// microseconds; one that takes this long is stalled or malicious.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const OPENAPI_YAML: &str = include_str!("openapi.yaml");
/// The newest event's sequence number when a list was taken, so a client
/// can follow `GET /events?since=` without a gap.
pub const EVENT_SEQ_HEADER: &str = "x-vfiod-event-seq";

type ResponseBody = BoxBody<Bytes, Infallible>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    ListDevices,
    Register,
    Available,
    GetDevice(String),
    DeleteDevice(String),
    UpdateDevice(String),
    Bind(String),
    Unbind(String),
    Attach(String),
    Detach(String),
    Reset(String),
    Holders(String),
    Events,
    Health,
    OpenApi,
    Metrics,
}

impl Route {
    fn mutates(&self) -> bool {
        !matches!(
            self,
            Route::ListDevices
                | Route::Available
                | Route::GetDevice(_)
                | Route::Holders(_)
                | Route::Events
                | Route::Health
                | Route::OpenApi
                | Route::Metrics
        )
    }

    /// The route's path template in [`ROUTES`]: the `route` label of
    /// `vfiod_http_requests_total`.
    pub fn template(&self) -> &'static str {
        match self {
            Route::ListDevices | Route::Register => "/devices",
            Route::Available => "/devices/available",
            Route::GetDevice(_) | Route::UpdateDevice(_) | Route::DeleteDevice(_) => {
                "/devices/{id_or_name}"
            }
            Route::Bind(_) => "/devices/{id_or_name}/bind",
            Route::Unbind(_) => "/devices/{id_or_name}/unbind",
            Route::Attach(_) => "/devices/{id_or_name}/attach",
            Route::Detach(_) => "/devices/{id_or_name}/detach",
            Route::Holders(_) => "/devices/{id_or_name}/holders",
            Route::Reset(_) => "/devices/{id_or_name}/reset",
            Route::Events => "/events",
            Route::Health => "/health",
            Route::OpenApi => "/openapi.yaml",
            Route::Metrics => "/metrics",
        }
    }
}

/// The `route` label of a request that matched no route.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Every route as `(method, path template)`; the OpenAPI file must match.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/devices"),
    ("POST", "/devices"),
    ("GET", "/devices/available"),
    ("GET", "/devices/{id_or_name}"),
    ("PATCH", "/devices/{id_or_name}"),
    ("DELETE", "/devices/{id_or_name}"),
    ("POST", "/devices/{id_or_name}/bind"),
    ("POST", "/devices/{id_or_name}/unbind"),
    ("POST", "/devices/{id_or_name}/attach"),
    ("POST", "/devices/{id_or_name}/detach"),
    ("POST", "/devices/{id_or_name}/reset"),
    ("GET", "/devices/{id_or_name}/holders"),
    ("GET", "/events"),
    ("GET", "/health"),
    ("GET", "/openapi.yaml"),
    ("GET", "/metrics"),
];

#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    MethodNotAllowed(&'static str),
}

pub fn route(method: &Method, path: &str) -> Result<Route, RouteError> {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let id = |s: &str| parse::percent_decode(s, false).ok_or(RouteError::NotFound);
    let m = method.clone();
    match segments.as_slice() {
        ["devices"] => match m {
            Method::GET => Ok(Route::ListDevices),
            Method::POST => Ok(Route::Register),
            _ => Err(RouteError::MethodNotAllowed("GET, POST")),
        },
        ["devices", "available"] => match m {
            Method::GET => Ok(Route::Available),
            _ => Err(RouteError::MethodNotAllowed("GET")),
        },
        ["devices", d] if !d.is_empty() => match m {
            Method::GET => Ok(Route::GetDevice(id(d)?)),
            Method::PATCH => Ok(Route::UpdateDevice(id(d)?)),
            Method::DELETE => Ok(Route::DeleteDevice(id(d)?)),
            _ => Err(RouteError::MethodNotAllowed("GET, PATCH, DELETE")),
        },
        ["devices", d, "holders"] if !d.is_empty() => match m {
            Method::GET => Ok(Route::Holders(id(d)?)),
            _ => Err(RouteError::MethodNotAllowed("GET")),
        },
        ["devices", d, action] if !d.is_empty() => {
            let make: fn(String) -> Route = match *action {
                "bind" => Route::Bind,
                "unbind" => Route::Unbind,
                "attach" => Route::Attach,
                "detach" => Route::Detach,
                "reset" => Route::Reset,
                _ => return Err(RouteError::NotFound),
            };
            match m {
                Method::POST => Ok(make(id(d)?)),
                _ => Err(RouteError::MethodNotAllowed("POST")),
            }
        }
        ["events"] | ["health"] | ["openapi.yaml"] | ["metrics"] => match m {
            Method::GET => Ok(match segments[0] {
                "events" => Route::Events,
                "health" => Route::Health,
                "metrics" => Route::Metrics,
                _ => Route::OpenApi,
            }),
            _ => Err(RouteError::MethodNotAllowed("GET")),
        },
        _ => Err(RouteError::NotFound),
    }
}

fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec(value).expect("wire types serialise");
    body.push(b'\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &CoreError) -> Response<ResponseBody> {
    let (status, body) = error::to_body(e);
    json_response(status, &body)
}

fn plain_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response<ResponseBody> {
    json_response(status, &error::ErrorBody::new(code, message))
}

/// Refused changes are logged, but at most 10 a second: any local user
/// can send them, and must not be able to flood the journal.
fn refusals_log_budget() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if WINDOW.swap(second, Ordering::Relaxed) != second {
        COUNT.store(0, Ordering::Relaxed);
    }
    COUNT.fetch_add(1, Ordering::Relaxed) < 10
}

/// An event stream body fed by a per-subscriber task.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn event_line(e: &Event) -> Bytes {
    let mut line = serde_json::to_vec(e).expect("events serialise");
    line.push(b'\n');
    Bytes::from(line)
}

/// Everything a request handler needs.
#[derive(Clone)]
pub struct Api {
    core: Arc<Core>,
    policy: AccessPolicy,
    shutdown: watch::Receiver<bool>,
    /// The device list of the current registry version, serialised once:
    /// `GET /devices` (filtered or not) and `GET /devices/{id_or_name}`.
    lists: Arc<list_cache::ListCache>,
    /// Connections and event streams held per uid.
    accounting: Arc<Accounting>,
    /// See [`server`]: the time to deliver a request head, and to idle.
    header_timeout: Duration,
}

impl Api {
    pub fn new(core: Arc<Core>, policy: AccessPolicy, shutdown: watch::Receiver<bool>) -> Api {
        Api {
            core,
            policy,
            shutdown,
            lists: Arc::default(),
            accounting: Accounting::new(Limits::default()),
            header_timeout: server::DEFAULT_HEADER_TIMEOUT,
        }
    }

    /// Bounds per unprivileged uid, and the header/idle timeout.
    pub fn with_limits(mut self, limits: Limits, header_timeout: Duration) -> Api {
        self.accounting = Accounting::new(limits);
        self.header_timeout = header_timeout;
        self
    }

    fn lists(&self) -> Arc<list_cache::ListVersion> {
        self.lists.version(|| self.core.snapshot(), self.core.ids())
    }

    async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<ResponseBody>> {
        let too_large = || {
            plain_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body is larger than {MAX_BODY} bytes"),
            )
        };
        if req.body().size_hint().lower() > MAX_BODY as u64 {
            return Err(too_large());
        }
        let limited = Limited::new(req.into_body(), MAX_BODY);
        match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(too_large())
            }
            Ok(Err(e)) => Err(plain_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("reading the body failed: {e}"),
            )),
            Err(_) => Err(plain_error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    pub async fn handle(&self, peer: &Peer, req: Request<Incoming>) -> Response<ResponseBody> {
        let routed = route(req.method(), req.uri().path());
        let template = routed.as_ref().map_or(UNMATCHED_ROUTE, |r| r.template());
        let resp = self.answer(peer, req, routed).await;
        crate::metrics::record_request(template, resp.status().as_u16());
        resp
    }

    async fn answer(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        routed: Result<Route, RouteError>,
    ) -> Response<ResponseBody> {
        let route = match routed {
            Ok(r) => r,
            Err(RouteError::NotFound) => {
                return plain_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no such endpoint: {}", req.uri().path()),
                )
            }
            Err(RouteError::MethodNotAllowed(allow)) => {
                let mut resp = plain_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{} is not allowed on {}; allowed: {allow}",
                        req.method(),
                        req.uri().path()
                    ),
                );
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
                return resp;
            }
        };
        if route.mutates() && !self.policy.may_mutate(peer) {
            if refusals_log_budget() {
                tracing::warn!(uid = peer.uid, pid = peer.pid, method = %req.method(), path = req.uri().path(), "refused {} {} from uid {} pid {}: not root and not in the access group", req.method(), req.uri().path(), peer.uid, peer.pid);
            }
            return error_response(&CoreError::Forbidden(format!(
                "uid {} may read but not change anything: changes need root or membership of the vfiod access group",
                peer.uid
            )));
        }
        let query = req.uri().query().map(str::to_owned);
        let accept = req.headers().get(hyper::header::ACCEPT).cloned();
        let body = if route.mutates() {
            match Self::read_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            }
        } else {
            Bytes::new()
        };
        let caller = Caller {
            uid: peer.uid,
            pid: peer.pid,
        };
        match self
            .dispatch(
                route,
                peer,
                caller,
                query.as_deref(),
                accept.as_ref(),
                &body,
            )
            .await
        {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        }
    }

    async fn dispatch(
        &self,
        route: Route,
        peer: &Peer,
        caller: Caller,
        query: Option<&str>,
        accept: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<Response<ResponseBody>, CoreError> {
        let core = &self.core;
        let ids = core.ids();
        let device = |status, d: &crate::registry::DeviceRecord| {
            json_response(status, &wire::Device::new(d, ids))
        };
        Ok(match route {
            Route::ListDevices => {
                let filter = parse::list_query(query)?;
                let seq = core.events().last_seq();
                let body = self.lists().filtered(&filter);
                let mut resp = Response::new(full(body));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp.headers_mut()
                    .insert(EVENT_SEQ_HEADER, HeaderValue::from(seq));
                resp
            }
            Route::Register => {
                let req = parse::register(body)?;
                device(StatusCode::CREATED, &core.register(caller, req).await?)
            }
            Route::Available => {
                let functions = core.available(parse::available_query(query)?).await?;
                let registry = core.snapshot();
                let wire: Vec<_> = functions
                    .iter()
                    .map(|f| {
                        let id = registry.get_by_address(&f.address).map(|d| d.id.as_str());
                        wire::AvailableDevice::new(f, ids, id)
                    })
                    .collect();
                json_response(StatusCode::OK, &wire)
            }
            Route::GetDevice(id) => {
                let body = self
                    .lists()
                    .device(&id)
                    .ok_or_else(|| CoreError::NotFound(id.chars().take(80).collect()))?;
                let mut resp = Response::new(full(body));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp
            }
            Route::UpdateDevice(id) => {
                let req = parse::update(body)?;
                device(StatusCode::OK, &core.update(caller, &id, req).await?)
            }
            Route::DeleteDevice(id) => {
                core.delete(caller, &id).await?;
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }
            Route::Bind(id) => {
                let req = parse::bind(body)?;
                let outcome = core.bind(caller, &id, req).await?;
                if req.dry_run {
                    json_response(
                        StatusCode::OK,
                        &wire::DryRun {
                            dry_run: true,
                            device: wire::Device::new(&outcome.device, ids),
                            plan: &outcome.plan,
                        },
                    )
                } else {
                    device(StatusCode::OK, &outcome.device)
                }
            }
            Route::Unbind(id) => {
                parse::unbind(body)?;
                device(StatusCode::OK, &core.unbind(caller, &id).await?)
            }
            Route::Attach(id) => {
                let req = parse::attach(body)?;
                device(StatusCode::OK, &core.attach(caller, &id, req).await?)
            }
            Route::Detach(id) => {
                let keep_bound = parse::detach(body)?;
                device(StatusCode::OK, &core.detach(caller, &id, keep_bound).await?)
            }
            Route::Reset(id) => {
                let req = parse::reset(body)?;
                let outcome = core.reset(caller, &id, req).await?;
                if req.dry_run {
                    json_response(
                        StatusCode::OK,
                        &wire::ResetDryRun {
                            dry_run: true,
                            device: wire::Device::new(&outcome.device, ids),
                            plan: &outcome.plan,
                        },
                    )
                } else {
                    device(StatusCode::OK, &outcome.device)
                }
            }
            Route::Holders(id) => {
                let (record, holders) = core.holders(&id).await?;
                json_response(
                    StatusCode::OK,
                    &wire::Holders {
                        id: &record.id,
                        name: &record.name,
                        pci_address: record.pci_address,
                        holders: &holders,
                    },
                )
            }
            Route::Events => {
                let since = parse::events_query(query)?;
                let permit = self
                    .accounting
                    .open_event_stream(peer.uid, self.policy.may_mutate(peer))?;
                self.events(since, permit)
            }
            Route::Health => {
                let health = core.health();
                json_response(
                    StatusCode::OK,
                    &wire::HealthBody {
                        status: "ok",
                        health: &health,
                    },
                )
            }
            Route::Metrics => self.metrics(accept),
            Route::OpenApi => {
                let mut resp = Response::new(full(OPENAPI_YAML));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
                resp
            }
        })
    }

    /// `GET /metrics`, on the API socket and on the metrics listener.
    fn metrics(&self, accept: Option<&HeaderValue>) -> Response<ResponseBody> {
        let openmetrics = crate::metrics::wants_openmetrics(accept.and_then(|a| a.to_str().ok()));
        let (content_type, text) = crate::metrics::render(&self.core.snapshot(), openmetrics);
        let mut resp = Response::new(full(text));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    }

    /// The stream holds `permit` (its slot in the caller's share) until
    /// the client goes away or vfiod stops.
    fn events(&self, since: Option<u64>, permit: limits::Permit) -> Response<ResponseBody> {
        let (backlog, mut live) = self.core.events().subscribe(since);
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let mut shutdown = self.shutdown.clone();
        let subscriber = crate::metrics::subscriber_added();
        tokio::spawn(async move {
            let _subscriber = subscriber;
            let _permit = permit;
            let mut shutdown_seen = std::pin::pin!(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            });
            for e in backlog {
                if tx.send(event_line(&e)).await.is_err() {
                    return;
                }
            }
            loop {
                let line = tokio::select! {
                    _ = &mut shutdown_seen => return,
                    _ = tx.closed() => return,
                    r = live.recv() => match r {
                        Ok(e) => event_line(&e),
                        Err(broadcast::error::RecvError::Lagged(n)) => event_line(&Event::lagged(n)),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(BodyExt::boxed(ChannelBody(rx)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        resp
    }
}

/// Connections the metrics listener serves at once; more wait in the
/// backlog. A scraper needs one.
const METRICS_CONNECTIONS: usize = 8;

/// Serves `GET /metrics`, and nothing else, on the opt-in TCP listener
/// (`metrics_listen`), until shutdown. It reads no peer credentials: the
/// metrics are readable by every local user on the socket as well.
pub async fn serve_metrics(listener: tokio::net::TcpListener, api: Api) {
    let mut shutdown = api.shutdown.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let api_for_conn = api.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let api = api.clone();
                async move {
                    let resp = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => {
                            api.metrics(req.headers().get(hyper::header::ACCEPT))
                        }
                        (_, "/metrics") => {
                            let mut resp = plain_error(
                                StatusCode::METHOD_NOT_ALLOWED,
                                "method_not_allowed",
                                format!(
                                    "{} is not allowed on /metrics; allowed: GET",
                                    req.method()
                                ),
                            );
                            resp.headers_mut()
                                .insert(ALLOW, HeaderValue::from_static("GET"));
                            resp
                        }
                        (_, path) => plain_error(
                            StatusCode::NOT_FOUND,
                            "not_found",
                            format!("no such endpoint: {path}; this listener serves /metrics only"),
                        ),
                    };
                    let template = if req.uri().path() == "/metrics" {
                        Route::Metrics.template()
                    } else {
                        UNMATCHED_ROUTE
                    };
                    crate::metrics::record_request(template, resp.status().as_u16());
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = server::http1_builder(&api_for_conn)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_in_the_table_resolves() {
        for (method, template) in ROUTES {
            let path = template.replace("{id_or_name}", "gpu0");
            let m: Method = method.parse().unwrap();
            assert!(route(&m, &path).is_ok(), "{method} {path}");
            // The metrics label is the table's own template.
            assert_eq!(route(&m, &path).unwrap().template(), *template);
        }
    }

    #[test]
    fn routing_edge_cases() {
        assert_eq!(route(&Method::GET, "/devices/"), Ok(Route::ListDevices));
        assert_eq!(
            route(&Method::GET, "/devices/available"),
            Ok(Route::Available)
        );
        assert_eq!(
            route(&Method::GET, "/devices/gpu%2D0"),
            Ok(Route::GetDevice("gpu-0".into()))
        );
        assert_eq!(route(&Method::GET, "/nope"), Err(RouteError::NotFound));
        assert_eq!(
            route(&Method::GET, "/devices/x/explode"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/devices/a/b/c/d"),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            route(&Method::PUT, "/devices"),
            Err(RouteError::MethodNotAllowed("GET, POST"))
        );
        assert_eq!(
            route(&Method::GET, "/devices/x/bind"),
            Err(RouteError::MethodNotAllowed("POST"))
        );
        assert_eq!(
            route(&Method::GET, "/devices/%zz"),
            Err(RouteError::NotFound)
        );
        assert_eq!(route(&Method::GET, "/"), Err(RouteError::NotFound));
    }

    /// The checked-in OpenAPI file documents exactly the routes served.
    #[test]
    fn openapi_matches_the_router() {
        let mut documented = Vec::new();
        let mut current_path: Option<String> = None;
        let mut in_paths = false;
        for line in OPENAPI_YAML.lines() {
            if line.starts_with("paths:") {
                in_paths = true;
                continue;
            }
            if in_paths && !line.starts_with(' ') && !line.trim().is_empty() {
                in_paths = false;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                current_path = Some(format!(
                    "/{}",
                    p.trim_end_matches(':').trim_end_matches(':')
                ));
            } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
                if ["get", "post", "patch", "delete", "put"].contains(&m) {
                    documented.push((
                        m.to_uppercase(),
                        current_path.clone().expect("method under a path"),
                    ));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
