//! The outbound listener: local workloads' HTTP/1.1 and h2c, routed by
//! `Host`/`:authority` to an endpoint in this cluster or to a peer gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use isthmus_federation::ClusterName;
use isthmus_federation::catalog::{Catalog, Protocol, east_west_sni, parse_authority};
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};
use rustls::pki_types::ServerName;
use tracing::info;

use super::headers;
use super::metrics::{ProxyMetrics, RequestLabels};
use super::routing::{NoRoute, Routed, Target, pick, resolve};
use crate::mesh::{MeshAlpn, mesh_peer};

/// How many upstreams one request may try when connecting fails.
pub const MAX_ATTEMPTS: usize = 3;
/// Connect timeout to an upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    routed: Option<Routed>,
    target: Option<Target>,
    attempts: usize,
    spread: usize,
}

impl RequestCtx {
    /// The request id sent upstream and logged.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The routed service, once routed.
    pub fn routed(&self) -> Option<&Routed> {
        self.routed.as_ref()
    }
}

/// Shared by the outbound and east-west proxies.
pub(crate) struct Common {
    pub(crate) catalog: Arc<ArcSwap<Catalog>>,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) cluster: ClusterName,
    spread: AtomicUsize,
}

impl Common {
    pub(crate) fn new(
        catalog: Arc<ArcSwap<Catalog>>,
        metrics: ProxyMetrics,
        cluster: ClusterName,
    ) -> Self {
        Self {
            catalog,
            metrics,
            cluster,
            spread: AtomicUsize::new(0),
        }
    }

    pub(crate) fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            routed: None,
            target: None,
            attempts: 0,
            spread: self.spread.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Adopts or assigns the request id, resolves the service; answers the
    /// client itself (and returns true) when there is no route.
    pub(crate) async fn route(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        exported_only: bool,
    ) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(headers::new_request_id, str::to_owned);
        let authority = req
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let resolved = parse_authority(&authority)
            .ok_or(NoRoute::UnknownService)
            .and_then(|a| resolve(&self.catalog.load(), &a))
            .and_then(|r| {
                if exported_only && !r.entry.exported {
                    Err(NoRoute::UnknownService)
                } else {
                    Ok(r)
                }
            });
        match resolved {
            Ok(routed) => {
                ctx.routed = Some(routed);
                Ok(false)
            }
            Err(no_route) => {
                let body = serde_json::json!({
                    "error": no_route.to_string(),
                    "authority": authority,
                    "request_id": ctx.request_id,
                })
                .to_string();
                session
                    .respond_error_with_body(no_route.status(), Bytes::from(body))
                    .await?;
                Ok(true)
            }
        }
    }

    /// Adds `x-request-id` and a valid `traceparent` to the upstream request.
    pub(crate) fn stamp(&self, upstream: &mut RequestHeader, ctx: &RequestCtx) -> Result<()> {
        upstream.insert_header("x-request-id", &ctx.request_id)?;
        let valid = upstream
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(headers::trace_id)
            .is_some();
        if !valid {
            upstream.insert_header("traceparent", headers::new_traceparent())?;
        }
        Ok(())
    }

    /// Picks the next upstream for this request: `relay` (the mesh relay's
    /// socket) reaches peer gateways; without it only local endpoints qualify.
    pub(crate) fn next_peer(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        relay: Option<&Path>,
    ) -> Result<Box<HttpPeer>> {
        let routed = ctx
            .routed
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request was not routed"))?;
        let target = pick(&routed.entry, relay.is_none(), ctx.spread, ctx.attempts)
            .map_err(|e| Error::explain(ErrorType::ConnectNoRoute, e.to_string()))?;
        ctx.attempts += 1;
        let peer = match (&target, relay) {
            (Target::Local(addr), _) => local_peer(*addr, routed.protocol),
            (Target::Remote(gw), Some(relay)) => {
                let sni = east_west_sni(&routed.entry.key, routed.port, None);
                let sni = ServerName::try_from(sni)
                    .map_err(|e| Error::explain(ErrorType::InternalError, e.to_string()))?;
                // HTTP/2 here cannot carry an upgrade (no RFC 8441 in
                // Pingora): WebSockets get an HTTP/1.1 connection of their own.
                let alpn = if session.is_upgrade_req() {
                    MeshAlpn::Http1
                } else {
                    MeshAlpn::H2
                };
                mesh_peer(
                    relay,
                    gw.address,
                    gw.spiffe_id.clone(),
                    sni,
                    alpn,
                    CONNECT_TIMEOUT,
                )?
            }
            (Target::Remote(_), None) => unreachable!("pick routes locally without a relay"),
        };
        ctx.target = Some(target);
        Ok(Box::new(peer))
    }

    /// Lets a failed connect be retried on the next target while attempts remain.
    pub(crate) fn connect_failed(&self, ctx: &RequestCtx, mut e: Box<Error>) -> Box<Error> {
        e.set_retry(ctx.attempts < MAX_ATTEMPTS);
        e
    }

    /// Records metrics and the access log line.
    pub(crate) fn log(
        &self,
        listener: &str,
        session: &Session,
        e: Option<&Error>,
        ctx: &RequestCtx,
        source_cluster: &str,
    ) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(if e.is_some() { 502 } else { 0 });
        let (service, namespace) = ctx.routed.as_ref().map_or(("", ""), |r| {
            (r.entry.key.name.as_str(), r.entry.key.namespace.as_str())
        });
        let destination = match &ctx.target {
            Some(Target::Local(_)) => self.cluster.as_str(),
            Some(Target::Remote(g)) => g.cluster.as_str(),
            None => "",
        };
        let elapsed = ctx.started.elapsed();
        self.metrics.record(
            &RequestLabels {
                listener,
                service,
                namespace,
                source_cluster,
                destination_cluster: destination,
            },
            status,
            elapsed.as_secs_f64(),
        );
        let req = session.req_header();
        info!(
            target: "isthmus::access",
            request_id = %ctx.request_id,
            listener,
            method = %req.method,
            path = %req.uri.path(),
            status,
            service,
            namespace,
            source_cluster,
            destination_cluster = destination,
            upstream = ctx.target.as_ref().map(|t| match t {
                Target::Local(a) => a.to_string(),
                Target::Remote(g) => g.address.to_string(),
            }),
            attempts = ctx.attempts,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            error = e.map(|e| e.to_string()),
            "request"
        );
    }
}

/// An upstream in this cluster: HTTP/1.1, or h2c for gRPC ports.
pub(crate) fn local_peer(addr: std::net::SocketAddr, protocol: Protocol) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.alpn = match protocol {
        Protocol::Grpc => ALPN::H2,
        Protocol::Http | Protocol::Tcp => ALPN::H1,
    };
    peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
    peer
}

/// The outbound proxy.
pub struct OutboundProxy {
    common: Common,
    relay: Option<PathBuf>,
}

impl OutboundProxy {
    /// A proxy routing with `catalog`; `relay` (the mesh relay's socket) is
    /// needed to reach peer gateways.
    pub fn new(
        catalog: Arc<ArcSwap<Catalog>>,
        metrics: ProxyMetrics,
        cluster: ClusterName,
        relay: Option<PathBuf>,
    ) -> Self {
        Self {
            common: Common::new(catalog, metrics, cluster),
            relay,
        }
    }
}

#[async_trait]
impl ProxyHttp for OutboundProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.common.new_ctx()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.common.route(session, ctx, false).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.common.next_peer(session, ctx, self.relay.as_deref())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.common.stamp(upstream, ctx)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        self.common.connect_failed(ctx, e)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let cluster = self.common.cluster.clone();
        self.common
            .log("outbound", session, e, ctx, cluster.as_str());
    }
}
