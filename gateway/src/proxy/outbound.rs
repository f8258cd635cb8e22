//! The outbound listener: local workloads' HTTP/1.1 and h2c, routed by
//! `Host`/`:authority` to an endpoint in this cluster or to a peer gateway.

use std::sync::Arc;

use async_trait::async_trait;
use isthmus_federation::catalog::Addressed;
use isthmus_federation::dns::Allocations;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::sync::watch;

use super::Runtime;
use super::common::{self, Common, RequestCtx};
use super::headers::{self, SUBSET as SUBSET_HEADER};
use crate::metrics::Listener;
use crate::upstream::balance::Target;

/// Replaces the request's authority (Host, and the URI's when it has one).
fn set_authority(upstream: &mut RequestHeader, authority: &str) -> Result<()> {
    upstream.insert_header(http::header::HOST, authority)?;
    if upstream.uri.authority().is_some() {
        let mut parts = upstream.uri.clone().into_parts();
        parts.authority = authority.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            upstream.set_uri(uri);
        }
    }
    Ok(())
}

/// The outbound proxy.
pub struct OutboundProxy {
    common: Common,
    clusterset: Option<watch::Receiver<Arc<Allocations>>>,
}

impl OutboundProxy {
    /// A proxy routing with `runtime`'s catalog; it reaches peer gateways
    /// through `runtime`'s mesh relay, when there is one.
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Self {
            common: Common::new(runtime, Listener::Outbound),
            clusterset: None,
        }
    }

    /// Also routes a request by the clusterset IP its connection reached,
    /// when its authority names no service (`curl http://127.240.0.7:8080/`).
    /// Its load gauges count under `clusterset`.
    pub fn with_clusterset(mut self, allocations: watch::Receiver<Arc<Allocations>>) -> Self {
        self.clusterset = Some(allocations);
        self.common.set_listener(Listener::Clusterset);
        self
    }

    fn by_address(&self, session: &Session) -> Option<Addressed> {
        let allocations = self.clusterset.as_ref()?;
        let local = session.server_addr()?.as_inet()?;
        let key = allocations.borrow().service(local.ip())?.clone();
        Some(Addressed {
            key,
            port: Some(local.port()),
        })
    }
}

#[async_trait]
impl ProxyHttp for OutboundProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.common.new_ctx()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        crate::limits::headers_read(session.as_ref().stream());
        // HTTP/1.0 has no 1xx responses (RFC 9110 §15.2): an origin's 103 or
        // 100 is not relayed to such a client.
        if session.req_header().version == http::Version::HTTP_10 {
            session.as_downstream_mut().set_ignore_info_resp(true);
        }
        // Workloads never set the gateways' own headers: dropped before routing
        // sees them, so they reach neither local endpoints nor peers.
        let forged = headers::strip_internal(session.req_header_mut());
        if forged > 0 {
            self.common
                .runtime
                .metrics
                .stripped(Listener::Outbound, forged);
        }
        let by_address = self.by_address(session);
        self.common.route(session, ctx, false, by_address).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let mesh = self.common.runtime.mesh.as_ref();
        self.common.next_peer(session, ctx, mesh)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(authority) = &ctx.authority_override {
            set_authority(upstream, authority)?;
        }
        // Only this gateway names subsets to its peers (the client's internal
        // headers went in `request_filter`).
        if let (Some(Target::Remote(_)), Some(subset)) = (
            &ctx.target,
            ctx.destination.as_ref().and_then(|d| d.subset.as_deref()),
        ) {
            upstream.insert_header(SUBSET_HEADER, subset)?;
        }
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

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.common.connected(ctx);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.common
            .upstream_responded(ctx, upstream.status.as_u16());
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        self.common.failed_after_send(peer, session, ctx, e)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.common.fail(session, e, ctx).await
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        common::quiet_error(e)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        crate::limits::request_done(session.as_ref().stream());
        let source = self.common.runtime.local_source();
        self.common.log(Listener::Outbound, session, e, ctx, source);
    }
}
