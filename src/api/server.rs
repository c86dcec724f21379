//! Connection handling, the same for both of vfiod's listeners (the API
//! socket, and the opt-in TCP metrics listener): accepting, admitting,
//! serving HTTP/1.1 with bounded time and buffers, and shutting down
//! without dropping a request that was already promised an answer. What
//! differs is a `Transport`: the API socket reads each peer's
//! credentials and admits the connection against its uid's fair share
//! ([`limits`](super::limits)); the metrics listener knows no peer, serves
//! [`METRICS_CONNECTIONS`] at a time and leaves the rest in the backlog,
//! and is routed to its own rows of the route table.
//!
//! Bounds on one connection:
//! - on the API socket, over its uid's share, a connection is answered 429
//!   `too_many_connections` at once, without reading its request, and
//!   closed: it costs one accept and one write;
//! - the request head must be complete within the header timeout
//!   (`header_timeout_ms`). Hyper starts that timer whenever the connection
//!   waits for a request, so it is also the idle keep-alive timeout: an
//!   idle connection, new or kept alive, is closed when it runs out;
//! - the head may be at most [`MAX_HEADER_BYTES`]; hyper stops reading
//!   there and answers 431, which `JsonAutoErrors` turns into JSON;
//! - a body must arrive within [`BODY_READ_TIMEOUT`](super::BODY_READ_TIMEOUT).
//!
//! Large cached answers leave through [`zero_copy`](super::zero_copy):
//! `sendfile` from a sealed memory file instead of a copy per socket.
//!
//! Concurrency: the accept loop and privileged callers' connections run on
//! the daemon's runtime; unprivileged callers' connections run on a
//! runtime thread of their own (`unprivileged_runtime`), so the CPU they
//! make vfiod spend is shared with, not taken from, everyone else.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::error::ApiError;
use super::respond;
use super::routes::Listener;
use super::zero_copy::{SendfileTarget, ZeroCopy};
use super::{Api, Peer};

/// Largest request head (request line and headers) read: 8 KiB, hyper's
/// initial read buffer, so a head never makes a connection's buffer grow.
/// vfiod's clients send heads of a few hundred bytes (a bearer token
/// included); this bounds what one connection makes the daemon hold.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The default time a connection has to deliver a complete request head,
/// counted from when it starts waiting for one (so also the idle
/// keep-alive timeout). A local client sends its head in microseconds.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the metrics listener serves at once; more wait in the
/// backlog. A scraper needs one.
pub const METRICS_CONNECTIONS: usize = 8;

/// Accept failures (EMFILE, ENFILE, ENOBUFS) back off from this...
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// ...doubling up to this, until an accept succeeds.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a connection accepted just before shutdown may take to deliver
/// its first request; it is then answered rather than dropped.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);

/// Serves the API socket until vfiod stops; see `accept_loop`.
pub async fn serve(listener: UnixListener, api: Api, grace: Duration) {
    accept_loop(ApiSocket(listener), api, grace).await
}

/// Serves the metrics listener (`metrics_listen`) until vfiod stops; see
/// `accept_loop`.
pub async fn serve_metrics(listener: TcpListener, api: Api, grace: Duration) {
    let transport = MetricsTcp {
        listener,
        slots: Arc::new(Semaphore::new(METRICS_CONNECTIONS)),
    };
    accept_loop(transport, api, grace).await
}

/// What differs between vfiod's listeners.
trait Transport: Send + 'static {
    /// Names the listener in the accept loop's log lines.
    const NAME: &'static str;
    type Accepted: Send;
    /// The next connection, with whatever it holds while it is served.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Accepted>> + Send;
    /// Admits an accepted connection and starts serving it on a task
    /// `tasks` tracks, or refuses it.
    fn start(&self, accepted: Self::Accepted, api: &Api, tasks: &TaskTracker);
}

/// Serves connections until `api.shutdown` is cancelled, then stops
/// accepting, lets in-flight requests finish (up to `grace`), and returns.
///
/// Shutdown is per connection: an idle keep-alive connection closes at
/// once; one with a request in progress finishes it first; and one that
/// was accepted but has not delivered its first request yet (the client
/// connected and is writing) gets [`FIRST_REQUEST_GRACE`] to do so and is
/// answered. Without that, a client whose connect raced the shutdown would
/// see its connection closed with no answer.
async fn accept_loop<T: Transport>(transport: T, api: Api, grace: Duration) {
    let span = tracing::info_span!("accept", listener = T::NAME);
    accept_until_shutdown(transport, api, grace)
        .instrument(span)
        .await
}

async fn accept_until_shutdown(transport: impl Transport, api: Api, grace: Duration) {
    let shutdown = api.shutdown.clone();
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = transport.accept() => match accepted {
                Ok(accepted) => {
                    backoff.succeeded();
                    transport.start(accepted, &api, &connections);
                }
                Err(e) => {
                    // The listener stays readable while accept fails for
                    // lack of descriptors: retrying at once would spin.
                    let delay = backoff.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
        }
    }
    // Connections already queued on the socket were promised an answer by
    // their successful connect(): take and serve them before closing.
    while let Ok(Ok(accepted)) = tokio::time::timeout(Duration::ZERO, transport.accept()).await {
        transport.start(accepted, &api, &connections);
    }
    drop(transport);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {grace:?}; exiting anyway");
    }
}

/// The API socket: every route, for local peers known by their
/// credentials and admitted against their uid's share.
struct ApiSocket(UnixListener);

impl Transport for ApiSocket {
    const NAME: &'static str = "api_socket";
    type Accepted = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Ok(self.0.accept().await?.0)
    }

    fn start(&self, stream: UnixStream, api: &Api, tasks: &TaskTracker) {
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read peer credentials; dropping connection");
                return;
            }
        };
        let privileged = api.policy.may_mutate(&peer);
        let permit = match api.accounting.open_connection(peer.uid, privileged) {
            Ok(permit) => permit,
            Err(e) => return refuse(stream, &peer, &e),
        };
        let held = (permit, crate::metrics::connection_opened(privileged));
        let api = api.clone();
        if privileged {
            let served = serve_connection(stream, api, Listener::Socket, peer, held);
            tasks.spawn(served);
            return;
        }
        // Re-registered with the other runtime's reactor, so that its events
        // are handled there too.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not hand a connection over; dropping it");
                return;
            }
        };
        unprivileged_runtime().spawn(tasks.track_future(async move {
            match UnixStream::from_std(std_stream) {
                Ok(stream) => serve_connection(stream, api, Listener::Socket, peer, held).await,
                Err(e) => {
                    tracing::warn!(error = %e, "could not register a connection; dropping it")
                }
            }
        }));
    }
}

/// The metrics listener: its own rows of the route table, for peers it
/// knows nothing about. It reads no credentials: what it serves is
/// readable by every local user on the socket as well.
struct MetricsTcp {
    listener: TcpListener,
    /// A connection holds one while served; the next accept waits for one.
    slots: Arc<Semaphore>,
}

impl Transport for MetricsTcp {
    const NAME: &'static str = "metrics_listener";
    type Accepted = (TcpStream, OwnedSemaphorePermit);

    async fn accept(&self) -> io::Result<Self::Accepted> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        Ok((self.listener.accept().await?.0, slot))
    }

    fn start(&self, (stream, slot): Self::Accepted, api: &Api, tasks: &TaskTracker) {
        let served = serve_connection(
            stream,
            api.clone(),
            Listener::Metrics,
            Peer::unknown(),
            slot,
        );
        tasks.spawn(served);
    }
}

/// Says how long to wait before the next accept after a failure, and
/// keeps the log quiet: the first failure is logged, then at most one line
/// per [`ACCEPT_LOG_INTERVAL`] (with how many went unlogged), and one line
/// when accepting works again after a logged failure. Descriptors running
/// out tends to flap (one freed, one taken), which must not flood the log.
#[derive(Default)]
struct AcceptBackoff {
    /// Failures since the last successful accept: sets the delay.
    consecutive: u32,
    last_logged: Option<Instant>,
    unlogged: u64,
    /// A failure was logged and its recovery not yet.
    recovery_due: bool,
}

/// See [`AcceptBackoff`].
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl AcceptBackoff {
    fn failed(&mut self, e: &io::Error) -> Duration {
        if self
            .last_logged
            .is_none_or(|t| t.elapsed() >= ACCEPT_LOG_INTERVAL)
        {
            tracing::warn!(error = %e, unlogged = self.unlogged, "accept failed: {e}; backing off ({} failures since the last report; the next one is logged in {} s at the earliest)", self.unlogged, ACCEPT_LOG_INTERVAL.as_secs());
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
            self.recovery_due = true;
        } else {
            self.unlogged += 1;
        }
        let delay = ACCEPT_BACKOFF_MIN
            .saturating_mul(1 << self.consecutive.min(16))
            .min(ACCEPT_BACKOFF_MAX);
        self.consecutive = self.consecutive.saturating_add(1);
        delay
    }

    fn succeeded(&mut self) {
        if self.recovery_due {
            tracing::warn!(
                failures = self.consecutive,
                "accepting connections again (after {} failed accepts in a row)",
                self.consecutive
            );
            self.recovery_due = false;
        }
        self.consecutive = 0;
    }
}

/// Answers a connection over its uid's share and closes it, without
/// waiting for anything: one non-blocking write into a fresh socket
/// buffer always fits. What the client already sent is read off first,
/// so closing does not turn into ECONNRESET before it reads the answer.
fn refuse(stream: UnixStream, peer: &Peer, e: &ApiError) {
    if super::refusals_log_budget() {
        tracing::warn!(
            uid = peer.uid,
            pid = peer.pid,
            "refused a connection from uid {} pid {}: {e}",
            peer.uid,
            peer.pid
        );
    }
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut sink) {
            Ok(n) if n == sink.len() => continue,
            _ => break,
        }
    }
    let _ = stream.try_write(&respond::raw_error(e));
}

/// Where unprivileged callers' connections are served: a runtime on a
/// thread of its own, with at most two threads for blocking work. However
/// much work they cause (oversized heads, reconnecting in a loop, many
/// reads), the kernel shares the CPU between that thread and the daemon's
/// own workers, which stay free for the accept loop, root, the access
/// group and hotplug. Falls back to the daemon's runtime if the thread
/// cannot be started.
fn unprivileged_runtime() -> tokio::runtime::Handle {
    static HANDLE: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    let handle = HANDLE.get_or_init(|| {
        let started = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(2)
            .thread_name("vfiod-unprivileged")
            .build()
            .and_then(|rt| {
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name("vfiod-unprivileged".into())
                    .spawn(move || rt.block_on(std::future::pending::<()>()))
                    .map(|_| handle)
            });
        match started {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the runtime for unprivileged callers; serving them with everyone else");
                None
            }
        }
    });
    handle
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current)
}

/// HTTP/1 as every listener of vfiod serves it: the head's timeout and
/// size bound.
fn http1_builder(api: &Api) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(api.header_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    builder
}

/// Serves one admitted connection until it ends or vfiod stops; `held`
/// (its slot, and the like) is kept until then.
async fn serve_connection<S>(
    stream: S,
    api: Api,
    listener: Listener,
    peer: Peer,
    held: impl Send + 'static,
) where
    S: AsyncRead + AsyncWrite + SendfileTarget + std::os::fd::AsFd + Unpin + Send + 'static,
{
    let _held = held;
    let peer = Arc::new(peer);
    let first_request = Arc::new(tokio::sync::Notify::new());
    let notify = first_request.clone();
    // Shared by the connection's requests: cloning an `Api` per request
    // (its cancellation token takes a lock) was a visible part of serving
    // a small answer.
    let api_for_requests = Arc::new(api.clone());
    let service = hyper::service::service_fn(move |req| {
        notify.notify_one();
        let api = api_for_requests.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(api.handle(listener, &peer, req).await) }
    });
    let io = TokioIo::new(JsonAutoErrors::new(ZeroCopy::new(stream)));
    let conn = http1_builder(&api).serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = api.shutdown.cancelled() => {
            // A connection that already delivered a request has a stored
            // permit and goes on at once; a fresh one gets a moment, with
            // the connection still polled so it can read that request.
            let first = tokio::time::timeout(FIRST_REQUEST_GRACE, first_request.notified());
            tokio::select! {
                r = conn.as_mut() => r,
                _ = first => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The connection's stream, with hyper's own error answers made JSON.
///
/// Hyper answers a request it cannot parse itself, before any service
/// runs: 431 for a head over [`MAX_HEADER_BYTES`], 400 for one that is not
/// HTTP/1.1, always with an empty body, and then closes. Every vfiod error
/// is a JSON body with a code, so this recognises such an answer as it is
/// written (a 4xx head with no body and no content type, which vfiod's own
/// handlers never send) and writes the JSON error in its place.
///
/// It wraps [`ZeroCopy`] and is not merged into it, though the two read
/// alike (both spell out `AsyncWrite` as a pass-through): only that
/// spelling is shared. This one changes *what* is written (one answer of
/// hyper's, swapped for another, which it must finish writing before
/// anything else) and needs nothing of the stream but `AsyncWrite`, so it
/// is tested on plain bytes; `ZeroCopy` changes only *how* bytes leave
/// (`sendfile` for slices of sealed answers), needs a socket's descriptor,
/// and owns its send-buffer state. One wrapper doing both would check each
/// write for both (an answer to swap, a sealed slice to send) and tie an
/// HTTP rule to a socket optimisation, for no gain in speed: the extra
/// layer costs a prefix check per write, next to a syscall. Stacked, the
/// swapped answer reaches the socket through `ZeroCopy` like any other.
struct JsonAutoErrors<S> {
    inner: S,
    /// A replacement answer not yet fully written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S: AsyncWrite + Unpin> JsonAutoErrors<S> {
    fn new(inner: S) -> Self {
        JsonAutoErrors {
            inner,
            pending: None,
        }
    }

    /// Writes what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The JSON answer that replaces `head`, if `head` is one of hyper's
/// bodiless automatic error answers.
fn json_replacement(head: &[u8]) -> Option<Vec<u8>> {
    // Checked first: this runs on every write, event chunks included.
    if !(head.starts_with(b"HTTP/1.1 4") || head.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != head.len() {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?.to_ascii_lowercase();
    if text.contains("\r\ncontent-type:") || !text.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let error = match &text[9..12] {
        "431" => ApiError::HeaderTooLarge(MAX_HEADER_BYTES),
        status => ApiError::Malformed(format!(
            "the request is not valid HTTP/1.1 (hyper answered {status})"
        )),
    };
    Some(respond::raw_error(&error))
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonAutoErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonAutoErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if let Some(replacement) = json_replacement(buf) {
            self.pending = Some((replacement, 0));
            // Hyper's bytes count as written; ours go out in their place.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if let [only] = bufs {
            if let Some(replacement) = json_replacement(only) {
                self.pending = Some((replacement, 0));
                let _ = self.poll_pending(cx)?;
                return Poll::Ready(Ok(only.len()));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_error_answers_are_replaced() {
        let auto = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 03:00:00 GMT\r\n\r\n";
        let replaced = String::from_utf8(json_replacement(auto).unwrap()).unwrap();
        assert!(replaced.starts_with("HTTP/1.1 431 "), "{replaced}");
        assert!(replaced.contains("content-type: application/json"));
        assert!(
            replaced.contains(r#""code":"header_too_large""#),
            "{replaced}"
        );
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let replaced = String::from_utf8(json_replacement(bad).unwrap()).unwrap();
        assert!(
            replaced.contains(r#""code":"invalid_request""#),
            "{replaced}"
        );
        // vfiod's own answers carry a content type and a body.
        let ours = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(json_replacement(ours).is_none());
        let with_body = b"HTTP/1.1 431 X\r\ncontent-length: 0\r\n\r\n{}";
        assert!(json_replacement(with_body).is_none());
        let ok = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
        assert!(json_replacement(ok).is_none());
    }

    #[test]
    fn accept_backoff_grows_bounded_and_resets() {
        let mut b = AcceptBackoff::default();
        let e = io::Error::from_raw_os_error(24);
        let delays: Vec<Duration> = (0..12).map(|_| b.failed(&e)).collect();
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), ACCEPT_BACKOFF_MAX);
        assert!(b.recovery_due);
        b.succeeded();
        assert!(!b.recovery_due);
        assert_eq!(b.failed(&e), ACCEPT_BACKOFF_MIN);
        // A failure right after a recovery is not logged again.
        assert!(!b.recovery_due);
        assert_eq!(b.unlogged, 12);
    }
}
