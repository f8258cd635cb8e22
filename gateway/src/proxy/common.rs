//! What the HTTP listeners (outbound and east-west) share: the per-request
//! state ([`RequestCtx`]) and the request phases they run alike ([`Common`]):
//! routing, choosing each attempt's peer, retries, the error answer, metrics
//! and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use isthmus_federation::catalog::{
    Addressed, CLUSTERSET_ZONE, Protocol, east_west_sni, parse_authority,
};
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, Session};
use rustls::pki_types::ServerName;
use tracing::{debug, info};

use super::Runtime;
use super::headers::{self, SUBSET as SUBSET_HEADER, TraceContext};
use super::metrics::{Held, ListenerLoad, RequestError, RequestLabels, Source};
use super::routing::{NoRoute, Routed, resolve};
use crate::config::traffic::{RouteConfig, SplitTarget};
use crate::config::upstream::UpstreamConfig;
use crate::health::InFlight;
use crate::logging;
use crate::mesh::{MeshAlpn, MeshConnector};
use crate::metrics::Listener;
use crate::telemetry::{self, Sampling, Tracer};
use crate::upstream::balance::{
    Draws, NoTarget, PlanRequest, Scope, Slot, Target, plan_or_fall_back,
};
use crate::upstream::outlier::Outcome;
use crate::upstream::{RequestLease, RetryReason, ServiceBackends, Use};

/// The error a request gets when every backend is at its circuit-breaker limits.
const OVERLOADED: ErrorType = ErrorType::Custom("every backend is at its limits");

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    routed: Option<Routed>,
    /// The routed service's backends.
    backends: Option<Arc<ServiceBackends>>,
    /// The policy in force when the request arrived.
    policy: Arc<UpstreamConfig>,
    /// The current attempt's target.
    pub(super) target: Option<Target>,
    /// The current attempt's place in its backend's counters.
    lease: Option<RequestLease>,
    /// Whether the current attempt's outcome was recorded.
    recorded: bool,
    /// Targets (slots of the routed entry) tried so far, so retries go to
    /// another backend identity.
    tried: Vec<Slot>,
    /// The current attempt's response status from upstream.
    upstream_status: Option<u16>,
    spread: usize,
    /// The route destination chosen for this request (subset and/or cluster).
    pub(super) destination: Option<SplitTarget>,
    /// The service's name, sent upstream as the authority when the client
    /// addressed it by clusterset IP (peers route by name, not by our IPs).
    pub(super) authority_override: Option<String>,
    /// The request's W3C trace context, adopted or started when routed.
    trace: TraceContext,
    /// The request's spans, when it is sampled (none otherwise: free).
    span: Option<Box<RequestSpan>>,
    /// Holds the stop (and the old process of an upgrade) until the request ends.
    _in_flight: InFlight,
    /// Counts the request in `isthmus_requests_in_flight` until it is logged
    /// (or dropped, however it ends).
    counted: Option<Held>,
    /// Counts the current attempt in `isthmus_upstream_requests_waiting`
    /// from choosing its upstream until connected or failed.
    waiting: Option<Held>,
}

/// A sampled request's server span and its upstream attempts' client spans,
/// sent when the request ends.
struct RequestSpan {
    tracer: Arc<Tracer>,
    id: u64,
    start: u64,
    /// The verified east-west caller.
    caller: Option<String>,
    attempts: Vec<AttemptSpan>,
}

/// One upstream attempt: a client span, the parent of the next hop's server span.
struct AttemptSpan {
    id: u64,
    start: u64,
    end: u64,
    address: SocketAddr,
    cluster: String,
    /// The peer gateway's SPIFFE ID, when the attempt went through the mesh.
    peer: Option<String>,
    /// The cluster of the attempt before, when this one failed over from it.
    failover_from: Option<String>,
    status: Option<u16>,
    error: Option<RequestError>,
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

    /// The trace id logged with the request (zeros before it is routed).
    pub fn trace_id(&self) -> &str {
        self.trace.trace_id()
    }

    /// Names the verified east-west caller on the request's span, if sampled.
    pub(crate) fn note_caller(&mut self, caller: &dyn std::fmt::Display) {
        if let Some(span) = self.span.as_mut() {
            span.caller = Some(caller.to_string());
        }
    }

    /// The current attempt's span, if the request is sampled.
    fn attempt_span(&mut self) -> Option<&mut AttemptSpan> {
        self.span.as_mut().and_then(|s| s.attempts.last_mut())
    }
}

/// What the outbound and east-west proxies share: the data plane's
/// [`Runtime`] and the request phases they run alike.
pub struct Common {
    pub(crate) runtime: Arc<Runtime>,
    /// The load gauges of the listener this proxy serves.
    load: ListenerLoad,
    /// Numbers this listener's requests, spreading their draws (see
    /// [`Draws`]).
    spread: AtomicUsize,
}

impl Common {
    /// Proxy phases over `runtime`'s catalog and backends; every request is
    /// in flight in its drain until it ends, and in `listener`'s load gauges.
    pub fn new(runtime: Arc<Runtime>, listener: Listener) -> Self {
        Self {
            load: runtime.metrics.load(listener),
            runtime,
            spread: AtomicUsize::new(0),
        }
    }

    /// Counts this proxy's requests under `listener` from now on.
    pub(crate) fn set_listener(&mut self, listener: Listener) {
        self.load = self.runtime.metrics.load(listener);
    }

    pub(crate) fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            routed: None,
            backends: None,
            policy: self.runtime.upstreams.policy(),
            target: None,
            lease: None,
            recorded: true,
            tried: Vec::new(),
            upstream_status: None,
            spread: self.spread.fetch_add(1, Ordering::Relaxed),
            destination: None,
            authority_override: None,
            trace: TraceContext::UNSET,
            span: None,
            _in_flight: self.runtime.drain.track(),
            counted: Some(Held::new(&self.load.in_flight)),
            waiting: None,
        }
    }

    /// Adopts or assigns the request id, resolves the service; answers the
    /// client itself (and returns true) when there is no route.
    /// `by_address` is the service whose clusterset IP the client connected
    /// to; it applies when the authority names no service.
    pub(crate) async fn route(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        exported_only: bool,
        by_address: Option<Addressed>,
    ) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(headers::new_request_id, str::to_owned);
        self.start_trace(req, ctx);
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
        let named = parse_authority(&authority);
        if named.is_none()
            && let Some(a) = &by_address
        {
            ctx.authority_override = Some(format!(
                "{}.{}.{CLUSTERSET_ZONE}:{}",
                a.key.name,
                a.key.namespace,
                a.port.unwrap_or(80)
            ));
        }
        let resolved = named
            .or(by_address)
            .ok_or(NoRoute::UnknownService)
            .and_then(|a| resolve(&self.runtime.catalog.load(), &a))
            .and_then(|r| {
                if exported_only && !r.entry.exported {
                    Err(NoRoute::UnknownService)
                } else {
                    Ok(r)
                }
            });
        match resolved {
            Ok(routed) => {
                // Idle kept-alive clients are closed after the idle timeout.
                // Keep-alive stays off where it is off: the client sent
                // `Connection: close`, or the gateway is stopping (its listener
                // closed) and answers with `Connection: close`.
                if session.get_keepalive().is_some() {
                    session.set_keepalive(Some(ctx.policy.idle_timeout.as_secs().max(1)));
                }
                let backends = self.runtime.upstreams.service(&routed.entry.key);
                backends.budget.request(ctx.started);
                ctx.destination = if exported_only {
                    // From a peer gateway: it chose the subset already.
                    header_str(session.req_header(), SUBSET_HEADER).map(|s| SplitTarget {
                        subset: Some(s.to_owned()),
                        cluster: None,
                        weight: 1,
                    })
                } else if self.runtime.upstreams.has_routes() {
                    self.runtime
                        .upstreams
                        .routes(&routed.entry.key)
                        .and_then(|r| choose_destination(&r, session.req_header(), ctx.spread))
                } else {
                    None
                };
                ctx.backends = Some(backends);
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

    /// Adopts the request's `traceparent` or starts a trace, and decides
    /// whether it is sampled: parent-based, with the configured ratio for
    /// new traces. Only a sampled request gets a span.
    fn start_trace(&self, req: &RequestHeader, ctx: &mut RequestCtx) {
        let incoming = req
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        ctx.trace = incoming.unwrap_or_else(TraceContext::root);
        let sampling = if ctx.trace.adopted {
            Sampling::Parent(ctx.trace.sampled())
        } else {
            Sampling::Root(ctx.trace.low_bits())
        };
        match self.runtime.telemetry.sample(sampling) {
            telemetry::Sampled::Yes(tracer) => {
                let age = ctx.started.elapsed().as_nanos() as u64;
                ctx.span = Some(Box::new(RequestSpan {
                    tracer,
                    id: headers::new_span_id(),
                    start: telemetry::unix_nanos().saturating_sub(age),
                    caller: None,
                    attempts: Vec::new(),
                }));
            }
            // A new trace this gateway does not sample says so downstream.
            telemetry::Sampled::No if !ctx.trace.adopted => ctx.trace.set_sampled(false),
            // Tracing off: new traces are marked sampled, as they always were.
            telemetry::Sampled::No | telemetry::Sampled::Off => {}
        }
    }

    /// Adds `x-request-id` and a valid `traceparent` to the upstream request:
    /// the caller's when this gateway adds no span, else naming the current
    /// attempt's span as the parent of the next hop's.
    pub(crate) fn stamp(&self, upstream: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<()> {
        upstream.insert_header("x-request-id", &ctx.request_id)?;
        if !ctx.trace.is_set() {
            ctx.trace = TraceContext::root();
        }
        let trace = ctx.trace;
        if let Some(attempt) = ctx.attempt_span() {
            upstream.insert_header("traceparent", trace.traceparent(Some(attempt.id)))?;
        } else if !trace.adopted {
            upstream.insert_header("traceparent", trace.traceparent(None))?;
        }
        Ok(())
    }

    /// Picks the next upstream for this request: `mesh` (the mesh connector)
    /// reaches peer gateways; without it only local endpoints qualify.
    pub(crate) fn next_peer(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        mesh: Option<&Arc<MeshConnector>>,
    ) -> Result<Box<HttpPeer>> {
        let (Some(routed), Some(backends)) = (ctx.routed.as_ref(), ctx.backends.as_ref()) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "request was not routed",
            ));
        };
        let policy = &ctx.policy;
        let (slot, fell_back) = self.choose_target(routed, backends, ctx, mesh.is_none());
        if fell_back {
            // Later attempts, and the peer, serve the whole service.
            ctx.destination = None;
        }
        let slot = match slot {
            Ok(s) => s,
            Err(NoTarget::Overloaded) => {
                self.runtime.upstreams.overloaded(&routed.entry.key);
                return Err(Error::explain(OVERLOADED, "circuit breakers open"));
            }
            Err(e) => return Err(Error::explain(ErrorType::ConnectNoRoute, e.to_string())),
        };
        let target = slot.target(&routed.entry);
        let mut peer = match (&target, mesh) {
            (Target::Local(addr), _) => local_peer(*addr, routed.protocol),
            (Target::Remote(gw), Some(mesh)) => {
                let subset = ctx.destination.as_ref().and_then(|d| d.subset.as_deref());
                let sni = east_west_sni(&routed.entry.key, routed.port, subset);
                let sni = ServerName::try_from(sni)
                    .map_err(|e| Error::explain(ErrorType::InternalError, e.to_string()))?;
                // HTTP/2 here cannot carry an upgrade (no RFC 8441 in
                // Pingora): WebSockets get an HTTP/1.1 connection of their own.
                let alpn = if session.is_upgrade_req() {
                    MeshAlpn::Http1
                } else {
                    MeshAlpn::H2
                };
                mesh.peer(
                    gw.address,
                    gw.spiffe_id.clone(),
                    sni,
                    alpn,
                    policy.connect_timeout,
                )
            }
            (Target::Remote(_), None) => {
                unreachable!("pick routes locally without a mesh connector")
            }
        };
        peer.options.connection_timeout = Some(policy.connect_timeout);
        peer.options.read_timeout = Some(policy.request_timeout);
        peer.options.write_timeout = Some(policy.request_timeout);
        peer.options.idle_timeout = Some(policy.idle_timeout);
        let backend = self.runtime.upstreams.backend(backends, target.backend());
        let mut failover_from = None;
        if let Some(previous) = &ctx.target {
            let (from, to) = (self.cluster_of(previous), self.cluster_of(&target));
            if from != to {
                self.runtime
                    .upstreams
                    .failed_over(&routed.entry.key, from, to);
                debug!(
                    request_id = ctx.request_id.as_str(),
                    trace_id = ctx.trace.trace_id(),
                    service = %routed.entry.key,
                    from,
                    to,
                    "request fails over to another cluster"
                );
                failover_from = Some(from);
            }
        }
        if let Some(span) = ctx.span.as_mut() {
            let now = telemetry::unix_nanos();
            if let Some(previous) = span.attempts.last_mut() {
                previous.end = now;
            }
            span.attempts.push(AttemptSpan {
                id: headers::new_span_id(),
                start: now,
                end: 0,
                address: target.addr(),
                cluster: self.cluster_of(&target).to_owned(),
                peer: match &target {
                    Target::Remote(g) => Some(g.spiffe_id.to_string()),
                    Target::Local(_) => None,
                },
                failover_from: failover_from.map(str::to_owned),
                status: None,
                error: None,
            });
        }
        // The previous attempt's lease, if any, ends before this one starts.
        ctx.lease = None;
        ctx.lease = Some(self.runtime.upstreams.lease_request(backend));
        // Replaces (and so ends) the previous attempt's wait, if any.
        ctx.waiting = Some(Held::new(&self.load.waiting));
        ctx.recorded = false;
        ctx.upstream_status = None;
        ctx.tried.push(slot);
        ctx.target = Some(target);
        Ok(Box::new(peer))
    }

    /// Plans and chooses the next attempt's target (its slot in the routed
    /// entry) within the request's route destination, or the whole service
    /// when nothing in it is available (the second value says so; see
    /// [`plan_or_fall_back`]).
    fn choose_target(
        &self,
        routed: &Routed,
        backends: &ServiceBackends,
        ctx: &RequestCtx,
        local_only: bool,
    ) -> (Result<Slot, NoTarget>, bool) {
        let destination = ctx.destination.as_ref();
        let scope = Scope {
            subset: destination.and_then(|d| d.subset.as_deref()),
            cluster: destination.and_then(|d| d.cluster.as_ref()),
        };
        let request = PlanRequest {
            entry: &routed.entry,
            scope,
            local_only,
            tried: &ctx.tried,
        };
        let (planned, fell_back) = plan_or_fall_back(scope, |scope| {
            let request = PlanRequest { scope, ..request };
            self.runtime
                .upstreams
                .plan(backends, request, Use::Http, &ctx.policy)
        });
        let draws = Draws::new(ctx.spread as u64, ctx.tried.len() as u64);
        (planned.pick(draws.level, draws.member), fell_back)
    }

    /// The cluster a target is in.
    fn cluster_of<'a>(&'a self, target: &'a Target) -> &'a str {
        match target {
            Target::Local(_) => self.runtime.cluster.as_str(),
            Target::Remote(g) => g.cluster.as_str(),
        }
    }

    /// The current attempt has its connection.
    pub(crate) fn connected(&self, ctx: &mut RequestCtx) {
        ctx.waiting = None;
        if let Some(lease) = ctx.lease.as_mut() {
            lease.connected();
        }
    }

    /// Notes the upstream's status for outlier detection.
    pub(crate) fn upstream_responded(&self, ctx: &mut RequestCtx, status: u16) {
        ctx.upstream_status = Some(status);
        if let Some(attempt) = ctx.attempt_span() {
            attempt.status = Some(status);
        }
    }

    /// Feeds the current attempt's outcome to outlier detection, once.
    fn record(&self, ctx: &mut RequestCtx, outcome: Outcome) {
        if std::mem::replace(&mut ctx.recorded, true) {
            return;
        }
        let (Some(backends), Some(lease), Some(routed)) = (&ctx.backends, &ctx.lease, &ctx.routed)
        else {
            return;
        };
        let targets = routed.entry.endpoints.len() + routed.entry.remote.len();
        self.runtime
            .upstreams
            .record(backends, lease.backend(), outcome, targets);
    }

    /// A failed connect counts against the backend and is retried on the next
    /// target while attempts remain: nothing was sent, so any method may be
    /// retried, and the retry budget (which guards backends against load)
    /// does not apply.
    pub(crate) fn connect_failed(&self, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        ctx.waiting = None;
        self.record(ctx, Outcome::Failure);
        if let Some(attempt) = ctx.attempt_span() {
            attempt.error = Some(error_reason(&e));
        }
        let retry = ctx.tried.len() < ctx.policy.max_attempts;
        if let (true, Some(r)) = (retry, &ctx.routed) {
            self.runtime
                .upstreams
                .retried(&r.entry.key, RetryReason::Connect);
            debug!(
                request_id = ctx.request_id.as_str(),
                trace_id = ctx.trace.trace_id(),
                error = %e,
                "connect failed; the request is retried"
            );
        }
        e.set_retry(retry);
        e
    }

    /// A failure after the request was sent: retried elsewhere only when the
    /// client has seen nothing yet, the method is idempotent, the request body
    /// is still buffered, attempts remain and the retry budget allows (or the
    /// backend was declared dead meanwhile).
    pub(crate) fn failed_after_send(
        &self,
        peer: &HttpPeer,
        session: &Session,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        ctx.waiting = None;
        let mut e = e.more_context(format!("Peer: {peer}"));
        if let Some(attempt) = ctx.attempt_span() {
            attempt.error = Some(error_reason(&e));
        }
        if client_side(&e) {
            // The client went away (or misbehaved): nothing to hold against
            // the backend, and nobody to retry for.
            e.set_retry(false);
            return e;
        }
        self.record(ctx, Outcome::Failure);
        let eligible = session.response_written().is_none()
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && ctx.tried.len() < ctx.policy.max_attempts;
        let mut retry = false;
        if let (true, Some(routed), Some(backends)) = (eligible, &ctx.routed, &ctx.backends) {
            let key = &routed.entry.key;
            // Away from a backend declared dead meanwhile (its lease lost,
            // its health checks failing: the relay cut its connections), a
            // retry cannot pile onto an overloaded backend, so the budget,
            // which guards against exactly that, does not apply.
            let dead = ctx
                .target
                .as_ref()
                .is_some_and(|t| self.runtime.upstreams.declared_dead(t.backend()));
            let reason = if dead {
                retry = true;
                RetryReason::DeadBackend
            } else {
                retry = backends.budget.try_retry(
                    Instant::now(),
                    ctx.policy.retry_budget_percent,
                    ctx.policy.retry_min_per_second,
                );
                if retry {
                    RetryReason::AfterSend
                } else {
                    RetryReason::BudgetExhausted
                }
            };
            self.runtime.upstreams.retried(key, reason);
            debug!(
                request_id = ctx.request_id.as_str(),
                trace_id = ctx.trace.trace_id(),
                reason = reason.label(),
                retry,
                error = %e,
                "upstream failed after the request was sent"
            );
        }
        e.set_retry(retry);
        e
    }

    /// Answers the client when proxying failed for good: 503 with
    /// `x-isthmus-overloaded` when circuit breakers refused, 504 when the
    /// upstream went silent, 502 for other upstream failures; nothing to a
    /// client that went away. The client's own failures are logged here at
    /// INFO (see [`quiet_error`]).
    pub(crate) async fn fail(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &RequestCtx,
    ) -> FailToProxy {
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (t, _) if *t == OVERLOADED => 503,
            (ErrorType::ConnectNoRoute, _) => 503,
            (ErrorType::ReadTimedout | ErrorType::WriteTimedout, ErrorSource::Upstream) => 504,
            (_, ErrorSource::Upstream) => 502,
            _ if client_aborted(e) => 0,
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if client_side(e) {
            info!(
                request_id = ctx.request_id.as_str(),
                trace_id = ctx.trace.trace_id(),
                reason = error_reason(e).label(),
                error = %e,
                "request ended by the client"
            );
        }
        if code > 0 && session.response_written().is_none() {
            let body = serde_json::json!({
                "error": e.to_string(),
                "request_id": ctx.request_id,
            })
            .to_string();
            let written = async {
                let mut resp = ResponseHeader::build(code, Some(3))?;
                resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
                resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
                if *e.etype() == OVERLOADED {
                    resp.insert_header("x-isthmus-overloaded", "true")?;
                }
                session.write_response_header(Box::new(resp), false).await?;
                session
                    .write_response_body(Some(Bytes::from(body)), true)
                    .await
            };
            if let Err(err) = written.await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Records metrics and the access log line.
    pub(crate) fn log(
        &self,
        listener: Listener,
        session: &Session,
        e: Option<&Error>,
        ctx: &mut RequestCtx,
        source: Source<'_>,
    ) {
        // Logged: no longer in flight, nor waiting for anything.
        ctx.waiting = None;
        ctx.counted = None;
        let status = match (session.response_written(), e) {
            (Some(r), _) => r.status.as_u16(),
            (None, Some(e)) if client_aborted(e) => CLIENT_CLOSED_STATUS,
            (None, Some(_)) => 502,
            (None, None) => 0,
        };
        let outcome = match (ctx.upstream_status, e) {
            (Some(s), _) if s >= 500 => Some(Outcome::Failure),
            (Some(_), _) => Some(Outcome::Success),
            (None, Some(e)) if *e.esource() == ErrorSource::Upstream => Some(Outcome::Failure),
            // The client went away or nothing was sent: says nothing of the backend.
            _ => None,
        };
        if let Some(outcome) = outcome {
            self.record(ctx, outcome);
        }
        let (service, namespace) = ctx.routed.as_ref().map_or(("", ""), |r| {
            (r.entry.key.name.as_str(), r.entry.key.namespace.as_str())
        });
        let destination = match &ctx.target {
            Some(Target::Local(_)) => self.runtime.cluster.as_str(),
            Some(Target::Remote(g)) => g.cluster.as_str(),
            None => "",
        };
        let elapsed = ctx.started.elapsed();
        let labels = RequestLabels {
            listener,
            service,
            namespace,
            source,
            destination_cluster: destination,
        };
        self.runtime
            .metrics
            .record(&labels, status, elapsed.as_secs_f64());
        if let Some(e) = e {
            self.runtime.metrics.error(&labels, error_reason(e));
        }
        if let Some(span) = ctx.span.take() {
            send_spans(
                *span,
                &ctx.trace,
                session,
                &labels,
                status,
                e,
                &ctx.request_id,
            );
        }
        // Failed requests are always logged; the others as `log.access_sample` says.
        let failed = status >= 500 || e.is_some();
        let sample = self.runtime.config.load().log.access_sample_ppm;
        if !logging::access_sampled(&ctx.request_id, sample, failed) {
            return;
        }
        // Borrowed strings and `display` values: the JSON layer writes them
        // straight into its line buffer, with no `String` per field.
        let req = session.req_header();
        info!(
            target: "isthmus::access",
            request_id = ctx.request_id.as_str(),
            trace_id = ctx.trace.trace_id(),
            listener = listener.label(),
            method = req.method.as_str(),
            path = req.uri.path(),
            status,
            service,
            namespace,
            source_cluster = source.cluster,
            source_trust_domain = source.trust_domain,
            destination_cluster = destination,
            upstream = ctx.target.as_ref().map(|t| display(t.addr())),
            attempts = ctx.tried.len(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            error = e.map(display),
            "request"
        );
    }
}

/// Sends a sampled request's server span and its attempts' client spans,
/// with OpenTelemetry's HTTP attribute names where they exist.
fn send_spans(
    span: RequestSpan,
    trace: &TraceContext,
    session: &Session,
    labels: &RequestLabels<'_>,
    status: u16,
    e: Option<&Error>,
    request_id: &str,
) {
    use opentelemetry_proto::tonic::trace::v1::{Span, Status, span::SpanKind, status::StatusCode};
    use telemetry::{kv, kv_int};
    let end = telemetry::unix_nanos();
    let trace_id = trace.trace_id_bytes();
    let req = session.req_header();
    let method = req.method.as_str();
    let error_status = |failed: bool, message: String| {
        Some(Status {
            code: if failed {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
            message,
        })
    };
    let mut attributes = vec![
        kv("http.request.method", method),
        kv("url.path", req.uri.path()),
        kv("isthmus.listener", labels.listener.label()),
        kv("isthmus.request_id", request_id),
        kv("isthmus.service", labels.service),
        kv("isthmus.namespace", labels.namespace),
        kv("isthmus.source_cluster", labels.source.cluster),
        kv("isthmus.source_trust_domain", labels.source.trust_domain),
        kv("isthmus.destination_cluster", labels.destination_cluster),
        kv_int("isthmus.attempts", span.attempts.len() as i64),
    ];
    if let Some(authority) = req
        .uri
        .authority()
        .map(|a| a.host())
        .or_else(|| header_str(req, "host").map(|h| h.split(':').next().unwrap_or(h)))
    {
        attributes.push(kv("server.address", authority));
    }
    if status > 0 {
        attributes.push(kv_int("http.response.status_code", i64::from(status)));
    }
    if let Some(caller) = &span.caller {
        attributes.push(kv("isthmus.peer.spiffe_id", caller));
    }
    if let Some(e) = e {
        attributes.push(kv("error.type", error_reason(e).label()));
    }
    let failed = status >= 500 || e.is_some_and(|e| !client_side(e));
    span.tracer.submit(Span {
        trace_id: trace_id.clone(),
        span_id: span.id.to_be_bytes().to_vec(),
        parent_span_id: trace.parent_id_bytes(),
        name: method.to_owned(),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: span.start,
        end_time_unix_nano: end,
        attributes,
        status: error_status(failed, e.map(ToString::to_string).unwrap_or_default()),
        ..Default::default()
    });
    for (n, attempt) in span.attempts.iter().enumerate() {
        let mut attributes = vec![
            kv("http.request.method", method),
            kv("server.address", &attempt.address.ip().to_string()),
            kv_int("server.port", i64::from(attempt.address.port())),
            kv_int("isthmus.attempt", n as i64 + 1),
            kv("isthmus.service", labels.service),
            kv("isthmus.namespace", labels.namespace),
            kv("isthmus.destination_cluster", &attempt.cluster),
        ];
        if let Some(peer) = &attempt.peer {
            attributes.push(kv("isthmus.peer.spiffe_id", peer));
        }
        if let Some(from) = &attempt.failover_from {
            attributes.push(kv("isthmus.failover_from", from));
        }
        if let Some(status) = attempt.status {
            attributes.push(kv_int("http.response.status_code", i64::from(status)));
        }
        if let Some(error) = attempt.error {
            attributes.push(kv("error.type", error.label()));
        }
        let failed = attempt.error.is_some() || attempt.status.is_some_and(|s| s >= 500);
        span.tracer.submit(Span {
            trace_id: trace_id.clone(),
            span_id: attempt.id.to_be_bytes().to_vec(),
            parent_span_id: span.id.to_be_bytes().to_vec(),
            name: method.to_owned(),
            kind: SpanKind::Client as i32,
            start_time_unix_nano: attempt.start,
            end_time_unix_nano: if attempt.end == 0 { end } else { attempt.end },
            attributes,
            status: error_status(failed, String::new()),
            ..Default::default()
        });
    }
}

fn header_str<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// The destination of the first rule of `route` whose headers `req` matches,
/// chosen by weight; `None` when no rule matches (the whole service).
fn choose_destination(
    route: &RouteConfig,
    req: &RequestHeader,
    spread: usize,
) -> Option<SplitTarget> {
    let rule = route.rules.iter().find(|rule| {
        rule.headers
            .iter()
            .all(|m| m.matches(req.headers.get(m.name.as_str()).map(|v| v.as_bytes())))
    })?;
    let total: u64 = rule.split.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return None;
    }
    // The split's own sequence: independent of the level and member draws.
    let mut point = (Draws::new(spread as u64, 0).split * total as f64) as u64;
    rule.split
        .iter()
        .find(|t| {
            let hit = point < u64::from(t.weight);
            point = point.saturating_sub(u64::from(t.weight));
            hit
        })
        .cloned()
}

/// The status logged and counted for a request whose client went away before
/// a response header was sent (nginx's "client closed request"); never sent.
pub(crate) const CLIENT_CLOSED_STATUS: u16 = 499;

/// Whether `e` is the client's doing (it went away, or sent what the gateway
/// could not take) rather than a failure of the gateway or the backend.
fn client_side(e: &Error) -> bool {
    *e.esource() == ErrorSource::Downstream
}

/// Whether the client went away before its response was complete: it closed
/// the connection, reset its HTTP/2 stream (`RST_STREAM`, e.g. `CANCEL` on a
/// gRPC deadline) or stopped reading or sending until a timeout.
fn client_aborted(e: &Error) -> bool {
    use ErrorType::*;
    client_side(e)
        && matches!(
            e.etype(),
            ReadError | WriteError | ConnectionClosed | H2Error | ReadTimedout | WriteTimedout
        )
}

/// Whether Pingora's ERROR line for `e` is left out: the client's failures
/// are not the gateway's, and [`Common::fail`] logs them at INFO instead.
pub(crate) fn quiet_error(e: &Error) -> bool {
    client_side(e)
}

/// The `reason` label of `isthmus_request_errors_total` for `e`.
fn error_reason(e: &Error) -> RequestError {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (t, _) if *t == OVERLOADED => RequestError::Overloaded,
        (ConnectNoRoute, _) => RequestError::NoRoute,
        (ConnectRefused, _) => RequestError::ConnectRefused,
        (ConnectTimedout, _) => RequestError::ConnectTimeout,
        (TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError, _) => {
            RequestError::Tls
        }
        (ReadTimedout | WriteTimedout, ErrorSource::Upstream) => RequestError::UpstreamTimeout,
        (_, ErrorSource::Upstream) => RequestError::UpstreamClosed,
        _ if client_aborted(e) => RequestError::ClientClosed,
        (_, ErrorSource::Downstream) => RequestError::ClientError,
        _ => RequestError::Internal,
    }
}

/// An upstream in this cluster: HTTP/1.1, or h2c for gRPC ports.
pub(crate) fn local_peer(addr: SocketAddr, protocol: Protocol) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.alpn = match protocol {
        Protocol::Grpc => ALPN::H2,
        Protocol::Http | Protocol::Tcp => ALPN::H1,
    };
    peer
}
