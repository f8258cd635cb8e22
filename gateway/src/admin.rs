//! The admin HTTP API (default `127.0.0.1:15000`), served by a Pingora listener:
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when ready, 503 otherwise; JSON with every condition |
//! | `GET /debug/config` | the effective configuration as JSON |
//! | `GET /debug/trust` | SVID, trust bundles per trust domain, peer policy |
//! | `GET /debug/upstreams` | backends that carried traffic: health, ejections, load |
//! | `GET /debug/catalog` | the federated catalog, with clusterset IPs |
//! | `GET /debug/peers` | peer gateways: sessions, leases, syncs |
//! | `GET /debug/explain?service=<ns>/<svc>` | where the service's requests go now, and why |
//!
//! Routing is a pure function ([`route`]) so it is tested without sockets.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{Method, Response, StatusCode, header};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{IntCounterVec, Registry};
use serde::Serialize;

use crate::config::Config;

/// The content type of every debug answer.
const JSON: &str = "application/json";
use crate::health::{Drain, Readiness};
use crate::metrics;

isthmus_federation::label_enum! {
    /// What an admin request asks for: the `route` label of
    /// `isthmus_admin_requests_total` (bounded: never the raw path).
    pub enum Route {
        /// `/metrics`
        Metrics => "/metrics",
        /// `/healthz`
        Healthz => "/healthz",
        /// `/readyz`
        Readyz => "/readyz",
        /// `/debug/config`
        DebugConfig => "/debug/config",
        /// `/debug/trust`
        DebugTrust => "/debug/trust",
        /// `/debug/upstreams`
        DebugUpstreams => "/debug/upstreams",
        /// `/debug/catalog`
        DebugCatalog => "/debug/catalog",
        /// `/debug/peers`
        DebugPeers => "/debug/peers",
        /// `/debug/explain`
        DebugExplain => "/debug/explain",
        /// A known path with a method other than GET or HEAD.
        MethodNotAllowed => "method_not_allowed",
        /// Anything else.
        NotFound => "not_found",
    }
}

/// Maps a method and path (query ignored) to a [`Route`].
pub fn route(method: &Method, path: &str) -> Route {
    let known = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/debug/config" => Route::DebugConfig,
        "/debug/trust" => Route::DebugTrust,
        "/debug/upstreams" => Route::DebugUpstreams,
        "/debug/catalog" => Route::DebugCatalog,
        "/debug/peers" => Route::DebugPeers,
        "/debug/explain" => Route::DebugExplain,
        _ => return Route::NotFound,
    };
    if method == Method::GET || method == Method::HEAD {
        known
    } else {
        Route::MethodNotAllowed
    }
}

/// Shared state the admin API reads.
pub struct AdminState {
    /// The process metrics registry.
    pub registry: Registry,
    /// Process readiness.
    pub readiness: Arc<Readiness>,
    /// The configuration in force (swapped on reload).
    pub config: Arc<ArcSwap<Config>>,
    /// In-flight tracking for graceful drain.
    pub drain: Arc<Drain>,
    /// Identity and trust, when configured.
    pub trust: Option<Arc<crate::trust::Trust>>,
    /// Backends and their protection state.
    pub upstreams: Arc<crate::upstream::Upstreams>,
    /// The federation hub: the catalog and the peers.
    pub hub: Arc<isthmus_federation::peering::Hub>,
    /// The clusterset IPs, when DNS is on.
    pub clusterset_ips:
        Option<tokio::sync::watch::Receiver<Arc<isthmus_federation::dns::Allocations>>>,
}

impl AdminState {
    /// `/debug/explain?service=<ns>/<svc>`
    fn explain(&self, query: Option<&str>) -> (StatusCode, &'static str, Vec<u8>) {
        let error = |code, message: String| {
            (
                code,
                JSON,
                to_json(&serde_json::json!({ "error": message })),
            )
        };
        let Some(service) = query
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("service="))
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "name the service: /debug/explain?service=<namespace>/<name>".into(),
            );
        };
        // `/` may come percent-encoded from some clients.
        let service = service.replace("%2F", "/").replace("%2f", "/");
        let key = match service.parse::<isthmus_federation::ServiceKey>() {
            Ok(k) => k,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("service {service:?}: {e}")),
        };
        match self.upstreams.explain(&self.hub.catalog().load(), &key) {
            Some(explain) => (StatusCode::OK, JSON, to_json(&explain)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("{key} is not in the catalog"),
            ),
        }
    }

    /// `/debug/catalog`: the hub's view, with each service's clusterset IP.
    fn debug_catalog(&self) -> serde_json::Value {
        let mut catalog = self.hub.debug_catalog();
        let Some(ips) = &self.clusterset_ips else {
            return catalog;
        };
        let ips = ips.borrow().clone();
        if let Some(services) = catalog["services"].as_array_mut() {
            for service in services {
                let ip = service["service"]
                    .as_str()
                    .and_then(|k| k.parse().ok())
                    .and_then(|k| ips.get(&k));
                if let Some(ip) = ip {
                    service["clusterset_ip"] = serde_json::json!(ip);
                }
            }
        }
        catalog
    }
}

/// The admin HTTP application.
pub struct AdminApp {
    state: Arc<AdminState>,
    requests: IntCounterVec,
}

impl AdminApp {
    /// Creates the app and registers its metrics.
    pub fn new(state: Arc<AdminState>) -> Self {
        let requests = metrics::counter_vec(
            &state.registry,
            "admin_requests_total",
            "Admin API requests by route and status code.",
            &["route", "code"],
        );
        Self { state, requests }
    }

    fn respond(&self, route: Route, query: Option<&str>) -> (StatusCode, &'static str, Vec<u8>) {
        match route {
            Route::Metrics => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(&self.state.registry),
            ),
            Route::Healthz => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            Route::Readyz => {
                let report = self.state.readiness.report();
                let code = if report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, JSON, to_json(&report))
            }
            Route::DebugConfig => (StatusCode::OK, JSON, to_json(&**self.state.config.load())),
            Route::DebugTrust => (
                StatusCode::OK,
                JSON,
                to_json(&crate::trust::debug_json(self.state.trust.as_deref())),
            ),
            Route::DebugUpstreams => (
                StatusCode::OK,
                JSON,
                to_json(&self.state.upstreams.snapshot()),
            ),
            Route::DebugCatalog => (StatusCode::OK, JSON, to_json(&self.state.debug_catalog())),
            Route::DebugPeers => (StatusCode::OK, JSON, to_json(&self.state.hub.debug_peers())),
            Route::DebugExplain => self.state.explain(query),
            Route::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                JSON,
                to_json(&serde_json::json!({"error": "only GET and HEAD are allowed"})),
            ),
            Route::NotFound => (
                StatusCode::NOT_FOUND,
                JSON,
                to_json(&serde_json::json!({
                    "error": "not found",
                    "paths": ["/metrics", "/healthz", "/readyz", "/debug/config", "/debug/trust", "/debug/upstreams", "/debug/catalog", "/debug/peers", "/debug/explain?service=<ns>/<svc>"],
                })),
            ),
        }
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut body = serde_json::to_vec_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot serialize: {e}\"}}").into_bytes());
    body.push(b'\n');
    body
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The headers are in, and nothing more of this request is read: the
        // next request on the connection is due from its first byte.
        crate::limits::request_done(session.stream());
        let _in_flight = self.state.drain.track();
        let req = session.req_header();
        let route = route(&req.method, req.uri.path());
        let is_head = req.method == Method::HEAD;
        let query = req.uri.query().map(str::to_owned);
        let (status, content_type, body) = self.respond(route, query.as_deref());
        self.requests
            .with_label_values(&[route.label(), status.as_str()])
            .inc();
        let builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::CACHE_CONTROL, "no-store");
        let body = if is_head { Vec::new() } else { body };
        builder.body(body).unwrap_or_else(|_| {
            let mut r = Response::new(Vec::new());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_known_paths_and_methods() {
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::HEAD, "/readyz"), Route::Readyz);
        assert_eq!(route(&Method::GET, "/debug/config"), Route::DebugConfig);
        assert_eq!(route(&Method::GET, "/debug/trust"), Route::DebugTrust);
        assert_eq!(
            route(&Method::GET, "/debug/upstreams"),
            Route::DebugUpstreams
        );
        assert_eq!(route(&Method::POST, "/healthz"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::GET, "/metrics/"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/"), Route::NotFound);
    }
}
