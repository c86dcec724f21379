//! The route table, and the router that reads it.
//!
//! [`ROUTES`] names every endpoint once: method, path template, who may
//! call it, and its handler. Everything else is derived from it: routing,
//! the `route` label of `vfiod_http_requests_total` (the template), which
//! requests need privilege and have a body read ([`Access::Change`]),
//! which listener serves a route, the `Allow` header of a 405, and the
//! test that `openapi.yaml` documents exactly these routes. Adding an
//! endpoint is one row here, a parse function, a handler in
//! [`dispatch`] and its `openapi.yaml` entry.

use std::future::Future;
use std::pin::Pin;

use hyper::{Method, Response};

use super::dispatch::{self, Call};
use super::error::ApiError;
use super::parse;
use super::respond::ResponseBody;

/// Who may call a route, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every local user, on the API socket. No body is read.
    Read,
    /// Root, the daemon's own user and the access group, on the API
    /// socket. The body is read only after the caller is allowed.
    Change,
    /// As `Read`, and also on the metrics listener, whose TCP peers are
    /// not known (and with `metrics_listen_public`, not even local).
    ReadAlsoOverTcp,
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The API's Unix socket: every route.
    Socket,
    /// The opt-in TCP listener (`metrics_listen`): only
    /// [`Access::ReadAlsoOverTcp`] routes.
    Metrics,
}

/// What a handler returns: boxed so the route table can hold plain `fn`
/// pointers.
pub type Handled<'a> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, ApiError>> + Send + 'a>>;
/// One endpoint's code; borrowed call data lives as long as the request.
pub type Handler = for<'a> fn(Call<'a>) -> Handled<'a>;

/// One row of [`ROUTES`]: how a method and path template reach a handler, and
/// who may call it.
pub struct Route {
    /// The HTTP method in upper case, as hyper spells it.
    pub method: &'static str,
    /// The path, with `{id_or_name}` for the device segment.
    pub template: &'static str,
    /// Who may call it, and over which listener.
    pub access: Access,
    /// The handler function.
    pub handler: Handler,
}

impl Route {
    /// Whether it needs the mutation policy (and a read body).
    pub fn changes(&self) -> bool {
        self.access == Access::Change
    }

    fn served_on(&self, listener: Listener) -> bool {
        listener == Listener::Socket || self.access == Access::ReadAlsoOverTcp
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

macro_rules! routes {
    ($($method:ident $template:literal $access:ident $handler:path;)*) => {
        /// Every endpoint; `openapi.yaml` documents exactly these.
        pub static ROUTES: &[Route] = &[$(Route {
            method: stringify!($method),
            template: $template,
            access: Access::$access,
            handler: |call| Box::pin($handler(call)),
        },)*];
    };
}

routes! {
    GET    "/devices"                       Read            dispatch::list;
    POST   "/devices"                       Change          dispatch::register;
    GET    "/devices/available"             Read            dispatch::available;
    POST   "/devices/claim"                 Change          dispatch::claim;
    GET    "/devices/capacity"              Read            dispatch::capacity;
    GET    "/devices/{id_or_name}"          Read            dispatch::get;
    PATCH  "/devices/{id_or_name}"          Change          dispatch::update;
    DELETE "/devices/{id_or_name}"          Change          dispatch::delete;
    POST   "/devices/{id_or_name}/bind"     Change          dispatch::bind;
    POST   "/devices/{id_or_name}/unbind"   Change          dispatch::unbind;
    POST   "/devices/{id_or_name}/attach"   Change          dispatch::attach;
    POST   "/devices/{id_or_name}/detach"   Change          dispatch::detach;
    POST   "/devices/{id_or_name}/reset"    Change          dispatch::reset;
    GET    "/devices/{id_or_name}/holders"  Read            dispatch::holders;
    GET    "/devices/{id_or_name}/sriov"    Read            dispatch::sriov;
    PUT    "/devices/{id_or_name}/sriov"    Change          dispatch::set_sriov;
    GET    "/devices/{id_or_name}/vgpu_types" Read          dispatch::vgpu_types;
    GET    "/devices/{id_or_name}/mdev_types" Read          dispatch::mdev_types;
    GET    "/events"                        Read            dispatch::events;
    GET    "/health"                        Read            dispatch::health;
    GET    "/openapi.yaml"                  Read            dispatch::openapi;
    GET    "/metrics"                       ReadAlsoOverTcp dispatch::metrics;
}

/// The `route` label of a request that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// A routed request: its row, and the decoded `{id_or_name}` (empty for
/// a template without one).
#[derive(Debug)]
pub struct Matched {
    /// The matched row.
    pub route: &'static Route,
    /// The `{id_or_name}` segment, percent-decoded.
    pub id: String,
}

/// The row for `method` on `path` among those `listener` serves. A
/// trailing slash is ignored; a literal segment beats `{id_or_name}`
/// (`/devices/available` is not a device); a path that fits a template
/// but not its method is a 405 listing the template's methods.
pub fn route(listener: Listener, method: &Method, path: &str) -> Result<Matched, ApiError> {
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let served = || {
        ROUTES
            .iter()
            .zip(template_segments())
            .filter(move |(r, _)| r.served_on(listener))
    };
    let best = served()
        .filter_map(|(r, parts)| fit(parts, &segments).map(|id| (id.is_some(), r.template, id)))
        .min_by_key(|&(has_id, template, _)| (has_id, template));
    let Some((_, template, raw_id)) = best else {
        let listener_serves = (listener != Listener::Socket).then(|| {
            served()
                .map(|(r, _)| r.template)
                .collect::<Vec<_>>()
                .join(", ")
        });
        return Err(ApiError::NoSuchEndpoint {
            path: path.to_owned(),
            listener_serves,
        });
    };
    let rows = served().map(|(r, _)| r).filter(|r| r.template == template);
    let Some(route) = rows.clone().find(|r| r.method == method.as_str()) else {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allow: rows.map(|r| r.method).collect::<Vec<_>>().join(", "),
        });
    };
    let id = match raw_id {
        Some(raw) => parse::percent_decode(raw, false).ok_or_else(|| ApiError::NoSuchEndpoint {
            path: path.to_owned(),
            listener_serves: None,
        })?,
        None => String::new(),
    };
    Ok(Matched { route, id })
}

/// Each row's template cut into segments, once: routing runs on every
/// request, and cutting sixteen templates each time was a tenth of what
/// serving a small answer costs.
fn template_segments() -> &'static [Vec<&'static str>] {
    static SEGMENTS: std::sync::OnceLock<Vec<Vec<&'static str>>> = std::sync::OnceLock::new();
    SEGMENTS.get_or_init(|| {
        ROUTES
            .iter()
            .map(|r| r.template.split('/').skip(1).collect())
            .collect()
    })
}

/// Whether a template (its segments) fits the path's segments: `None` if
/// not, else the raw `{id_or_name}` segment, if the template has one.
fn fit<'p>(template: &[&str], segments: &[&'p str]) -> Option<Option<&'p str>> {
    if template.len() != segments.len() {
        return None;
    }
    let mut id = None;
    for (part, segment) in template.iter().zip(segments) {
        if part.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
            id = Some(*segment);
        } else if part != segment {
            return None;
        }
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::status_and_code;

    /// The row's method and template and the id, or the error's code (and
    /// the `Allow` list of a 405).
    fn outcome(listener: Listener, method: &str, path: &str) -> Result<String, String> {
        match route(listener, &method.parse().unwrap(), path) {
            Ok(m) => Ok(format!("{:?} {}", m.route, m.id).trim_end().to_owned()),
            Err(ApiError::MethodNotAllowed { allow, .. }) => Err(format!("405 {allow}")),
            Err(e) => Err(status_and_code(&e).1.to_owned()),
        }
    }

    fn on_socket(method: &str, path: &str) -> Result<String, String> {
        outcome(Listener::Socket, method, path)
    }

    #[test]
    fn every_route_in_the_table_resolves_to_its_own_row() {
        for r in ROUTES {
            let path = r.template.replace("{id_or_name}", "gpu0");
            let id = if path == r.template { "" } else { " gpu0" };
            let expected = format!("{} {}{id}", r.method, r.template);
            assert_eq!(on_socket(r.method, &path), Ok(expected));
        }
    }

    #[test]
    fn routing_edge_cases() {
        assert_eq!(on_socket("GET", "/devices/"), Ok("GET /devices".into()));
        assert_eq!(
            on_socket("GET", "/devices/available"),
            Ok("GET /devices/available".into())
        );
        assert_eq!(
            on_socket("POST", "/devices/available"),
            Err("405 GET".into())
        );
        assert_eq!(
            on_socket("GET", "/devices/gpu%2D0"),
            Ok("GET /devices/{id_or_name} gpu-0".into())
        );
        assert_eq!(
            on_socket("POST", "/devices/available/bind"),
            Ok("POST /devices/{id_or_name}/bind available".into())
        );
        assert_eq!(on_socket("GET", "/nope"), Err("not_found".into()));
        assert_eq!(
            on_socket("GET", "/devices/x/explode"),
            Err("not_found".into())
        );
        assert_eq!(
            on_socket("GET", "/devices/a/b/c/d"),
            Err("not_found".into())
        );
        assert_eq!(on_socket("POST", "/devices//bind"), Err("not_found".into()));
        assert_eq!(on_socket("PUT", "/devices"), Err("405 GET, POST".into()));
        assert_eq!(
            on_socket("PUT", "/devices/x"),
            Err("405 GET, PATCH, DELETE".into())
        );
        assert_eq!(on_socket("GET", "/devices/x/bind"), Err("405 POST".into()));
        assert_eq!(on_socket("GET", "/devices/%zz"), Err("not_found".into()));
        assert_eq!(on_socket("GET", "/"), Err("not_found".into()));
    }

    #[test]
    fn the_metrics_listener_serves_its_rows_only_and_says_so() {
        assert_eq!(
            outcome(Listener::Metrics, "GET", "/metrics"),
            Ok("GET /metrics".into())
        );
        assert_eq!(
            outcome(Listener::Metrics, "POST", "/metrics"),
            Err("405 GET".into())
        );
        for path in ["/devices", "/devices/x", "/health", "/nope"] {
            assert_eq!(
                outcome(Listener::Metrics, "GET", path),
                Err("not_found".into())
            );
        }
        let e = route(Listener::Metrics, &Method::GET, "/devices").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no such endpoint: /devices; this listener serves /metrics only"
        );
        let e = route(Listener::Socket, &Method::GET, "/nope").unwrap_err();
        assert_eq!(e.to_string(), "no such endpoint: /nope");
    }

    /// The checked-in OpenAPI file documents exactly the routes served.
    #[test]
    fn openapi_matches_the_route_table() {
        let mut documented = Vec::new();
        let mut current_path: Option<String> = None;
        let mut in_paths = false;
        for line in crate::api::OPENAPI_YAML.lines() {
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
                current_path = Some(format!("/{}", p.trim_end_matches(':')));
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
            .map(|r| (r.method.to_owned(), r.template.to_owned()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
