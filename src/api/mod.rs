//! The HTTP layer: HTTP/1.1 over a Unix socket, JSON bodies.
//!
//! It is a thin translation. A request goes: [`server`] (accept, peer
//! credentials, fair share, HTTP/1) → [`routes`] (the one route table:
//! which row, who may call it) → the body, read only for a change its
//! caller may make → the row's handler in [`dispatch`] ([`parse`] into a
//! typed core request, the core call, [`wire`] shapes) → [`respond`], with
//! every failure turned into a status and code in [`error`]. Shutdown is
//! one `CancellationToken` that the accept loops, connections and event
//! streams all watch.

pub mod coalesce;
pub mod dispatch;
pub mod error;
pub mod event_stream;
pub mod limits;
pub mod list_cache;
pub mod parse;
pub mod peer;
pub mod respond;
pub mod routes;
pub mod server;
pub mod wire;
pub mod zero_copy;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::error::CoreError;
use error::ApiError;
pub use limits::{Accounting, Limits};
pub use peer::{AccessPolicy, Peer};
use respond::ResponseBody;
use routes::{Listener, Matched};
pub use server::{serve, serve_metrics};

/// Largest request body read, in bytes; requests are small JSON objects.
pub const MAX_BODY: usize = 64 * 1024;
/// A request body of at most [`MAX_BODY`] from a local process arrives in
/// microseconds; one that takes this long is stalled or malicious.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The spec served at `/openapi.yaml`, compiled in so it always matches the
/// binary's routes.
pub const OPENAPI_YAML: &str = include_str!("openapi.yaml");
/// The newest event's sequence number when a list was taken, so a client
/// can follow `GET /events?since=` without a gap.
pub const EVENT_SEQ_HEADER: &str = "x-vfiod-event-seq";

/// Everything a request handler needs.
#[derive(Clone)]
pub struct Api {
    core: Arc<Core>,
    policy: AccessPolicy,
    /// Cancelled when vfiod stops: listeners stop accepting, connections
    /// finish, event streams end.
    shutdown: CancellationToken,
    /// The device list of the current registry version, serialised once:
    /// `GET /devices` (filtered or not) and `GET /devices/{id_or_name}`.
    lists: Arc<list_cache::ListCache>,
    /// `GET /devices/available` (indexed by `?all`) and `/metrics`
    /// (indexed by OpenMetrics): one scan or render at a time, shared by
    /// the requests waiting for it.
    available: [Arc<coalesce::Coalesced>; 2],
    metrics: [Arc<coalesce::Coalesced>; 2],
    /// Connections and event streams held per uid.
    accounting: Arc<Accounting>,
    /// See [`server`]: the time to deliver a request head, and to idle.
    header_timeout: Duration,
}

impl Api {
    /// Default limits and timeouts; `shutdown` ends listeners, connections and
    /// event streams.
    pub fn new(core: Arc<Core>, policy: AccessPolicy, shutdown: CancellationToken) -> Api {
        Api {
            core,
            policy,
            shutdown,
            lists: Arc::default(),
            available: Default::default(),
            metrics: Default::default(),
            accounting: Accounting::new(Limits::default()),
            header_timeout: server::DEFAULT_HEADER_TIMEOUT,
        }
    }

    /// The serialised device lists of the current registry version.
    fn lists(&self) -> Arc<list_cache::ListVersion> {
        self.lists.version(|| self.core.snapshot(), self.core.ids())
    }

    /// Bounds per unprivileged uid, and the header/idle timeout.
    pub fn with_limits(mut self, limits: Limits, header_timeout: Duration) -> Api {
        self.accounting = Accounting::new(limits);
        self.header_timeout = header_timeout;
        self
    }

    /// Answers one request that came in on `listener`, and counts it
    /// under its route's template.
    async fn handle(
        &self,
        listener: Listener,
        peer: &Peer,
        req: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let routed = routes::route(listener, req.method(), req.uri().path());
        let label = match &routed {
            Ok(m) => m.route.template,
            Err(_) => routes::UNMATCHED,
        };
        let resp = match routed {
            Ok(matched) => self.answer(peer, req, matched).await,
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| respond::error(&e));
        crate::metrics::record_request(label, resp.status().as_u16());
        resp
    }

    async fn answer(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        Matched { route, id }: Matched,
    ) -> Result<Response<ResponseBody>, ApiError> {
        if route.changes() && !self.policy.may_mutate(peer) {
            if refusals_log_budget() {
                tracing::warn!(uid = peer.uid, pid = peer.pid, method = %req.method(), path = req.uri().path(), "refused {} {} from uid {} pid {}: not root and not in the access group", req.method(), req.uri().path(), peer.uid, peer.pid);
            }
            return Err(CoreError::Forbidden(format!(
                "uid {} may read but not change anything: changes need root or membership of the vfiod access group",
                peer.uid
            ))
            .into());
        }
        let query = req.uri().query().map(str::to_owned);
        let accept = req.headers().get(hyper::header::ACCEPT).cloned();
        let body = if route.changes() {
            read_body(req).await?
        } else {
            Bytes::new()
        };
        let call = dispatch::Call {
            api: self,
            peer,
            id,
            query: query.as_deref(),
            accept: accept.as_ref(),
            body,
        };
        (route.handler)(call).await
    }
}

/// The whole body, bounded in size ([`MAX_BODY`]) and time
/// ([`BODY_READ_TIMEOUT`]).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    if req.body().size_hint().lower() > MAX_BODY as u64 {
        return Err(ApiError::BodyTooLarge(MAX_BODY));
    }
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::BodyTooLarge(MAX_BODY))
        }
        Ok(Err(e)) => Err(ApiError::Malformed(format!("reading the body failed: {e}"))),
        Err(_) => Err(ApiError::BodyTimeout(BODY_READ_TIMEOUT)),
    }
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
