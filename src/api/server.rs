//! Connection handling: accepting on the listener, reading each peer's
//! credentials, serving HTTP/1.1 on the connection, and shutting down
//! without dropping a request that was already promised an answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::{Api, Peer};

/// How long a connection accepted just before shutdown may take to deliver
/// its first request; it is then answered rather than dropped.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);

/// Serves connections until `shutdown` turns true, then stops accepting,
/// lets in-flight requests finish (up to `grace`), and returns.
///
/// Shutdown is per connection: an idle keep-alive connection closes at
/// once; one with a request in progress finishes it first; and one that
/// was accepted but has not delivered its first request yet (the client
/// connected and is writing) gets [`FIRST_REQUEST_GRACE`] to do so and is
/// answered. Without that, a client whose connect raced the shutdown would
/// see its connection closed with no answer.
pub async fn serve(listener: UnixListener, api: Api, grace: Duration) {
    let mut shutdown = api.shutdown.clone();
    // Every connection task holds a clone; when all are gone, recv() ends.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(stream, &api, alive_tx.clone()),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Connections already queued on the socket were promised an answer by
    // their successful connect(): take and serve them before closing.
    while let Ok(Ok((stream, _))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        spawn_connection(stream, &api, alive_tx.clone());
    }
    drop(listener);
    drop(alive_tx);
    if tokio::time::timeout(grace, alive_rx.recv()).await.is_err() {
        tracing::warn!("in-flight requests did not finish within {grace:?}; exiting anyway");
    }
}

fn spawn_connection(stream: tokio::net::UnixStream, api: &Api, alive: mpsc::Sender<()>) {
    let peer = match Peer::of(&stream) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::warn!(error = %e, "could not read peer credentials; dropping connection");
            return;
        }
    };
    let first_request = Arc::new(tokio::sync::Notify::new());
    let notify = first_request.clone();
    let api_for_requests = api.clone();
    let service = hyper::service::service_fn(move |req| {
        notify.notify_one();
        let api = api_for_requests.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(api.handle(&peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service);
    let mut shutdown = api.shutdown.clone();
    tokio::spawn(async move {
        let _alive = alive;
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
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
    });
}
