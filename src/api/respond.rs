//! Building responses: every body vfiod sends is JSON, YAML, Prometheus
//! text or an event stream, and every error goes through [`error()`].

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::error::{self, ApiError};

/// One body type for every answer, from a fixed buffer to the event stream.
pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// `body` whole, with its content type.
pub fn bytes(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `value` as one line of JSON.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec(value).expect("wire types serialise");
    body.push(b'\n');
    bytes(status, "application/json", body)
}

/// 204: done, nothing to say.
pub fn no_content() -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

/// The error's status and JSON body; a 405 also lists the allowed methods.
pub fn error(e: &ApiError) -> Response<ResponseBody> {
    let (status, body) = error::to_body(e);
    let mut resp = json(status, &body);
    if let ApiError::MethodNotAllowed { allow, .. } = e {
        if let Ok(allow) = HeaderValue::from_str(allow) {
            resp.headers_mut().insert(ALLOW, allow);
        }
    }
    resp
}

/// A whole HTTP/1.1 error response, for a connection answered outside
/// hyper. It closes the connection.
pub fn raw_error(e: &ApiError) -> Vec<u8> {
    let (status, body) = error::to_body(e);
    let mut json = serde_json::to_vec(&body).expect("error bodies serialise");
    json.push(b'\n');
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        json.len()
    )
    .into_bytes();
    out.extend_from_slice(&json);
    out
}
