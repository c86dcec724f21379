//! `GET /events`: newline-delimited JSON, the backlog after `since` first,
//! then live events, until the client goes away or vfiod stops.
//!
//! Each stream is one task between the event bus and the response body,
//! joined by a channel of 16 lines: a client that reads slowly fills the
//! channel and then the task waits, while the bus's broadcast channel
//! absorbs the difference; a client that falls further behind than that
//! holds gets one `lagged` event saying how many it missed (see
//! [`crate::events`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::limits::Permit;
use super::respond::ResponseBody;
use crate::events::{Event, EventBus};

/// The stream of `bus` from `since` on. It holds `permit` (its slot in the
/// caller's share) until the client goes away or `shutdown` is cancelled.
pub fn respond(
    bus: &EventBus,
    since: Option<u64>,
    permit: Permit,
    shutdown: CancellationToken,
) -> Response<ResponseBody> {
    let (backlog, mut live) = bus.subscribe(since);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let subscriber = crate::metrics::subscriber_added();
    tokio::spawn(async move {
        let _subscriber = subscriber;
        let _permit = permit;
        for e in backlog {
            if tx.send(line(&e)).await.is_err() {
                return;
            }
        }
        loop {
            let line = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                r = live.recv() => match r {
                    Ok(e) => line(&e),
                    Err(broadcast::error::RecvError::Lagged(n)) => line(&Event::lagged(n)),
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

fn line(e: &Event) -> Bytes {
    let mut line = serde_json::to_vec(e).expect("events serialise");
    line.push(b'\n');
    Bytes::from(line)
}

/// A response body fed by the stream's task.
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
