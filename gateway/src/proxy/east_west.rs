//! The east-west listener: SPIFFE mTLS from peer gateways, terminated here and
//! routed to endpoints of exported services in this cluster.
//!
//! The listener is a plain TCP Pingora service whose app runs our
//! `SpiffeAcceptor` (every handshake outcome counted, the caller authenticated
//! by SPIFFE ID and allowed by the peer policy), then hands the stream to
//! Pingora's HTTP proxy (h2 or HTTP/1.1 by ALPN). Requests go only to endpoints
//! in this cluster, never onwards, so nothing loops between gateways.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use isthmus_federation::catalog::{Protocol, ServiceEntry, ServiceKey, parse_east_west_sni};
use isthmus_federation::limits::ConnectionLimiter;
use isthmus_federation::trust::{HandshakeResult, HandshakeSide, PeerPolicy, SpiffeAcceptor};
use isthmus_federation::{Catalog, ClusterName, SpiffeId};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{Ssl, Stream};
use pingora_core::server::ShutdownWatch;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{HttpProxy, ProxyHttp, Session};
use prometheus::IntCounterVec;
use tracing::{debug, warn};

use super::common::{self, Common, RequestCtx};
use super::metrics::{L4Result, Source};
use super::{Runtime, headers, tcp};
use crate::config::Config;
use crate::limits::{ListenerGuard, RefusalReason};
use crate::mesh::{HelloRecorder, MeshTlsStream};
use crate::metrics::Listener;

/// The SPIFFE ID behind each peer certificate seen (by SHA-256 of the leaf).
///
/// Pingora hands proxy phases the connection's TLS digest but no way to attach
/// our data to it, so the caller's ID is looked up by the certificate digest.
/// Entries are added only after a successful authentication; reads are
/// lock-free; the map holds one entry per distinct peer certificate.
pub struct Callers {
    /// This gateway, named in the XFCC header it sends.
    own_id: SpiffeId,
    by_cert: ArcSwap<HashMap<Vec<u8>, Arc<Caller>>>,
}

/// A verified east-west caller, with what each of its requests needs
/// computed once per certificate rather than per request.
#[derive(Debug)]
pub struct Caller {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// The `x-forwarded-client-cert` value sent to endpoints for it.
    xfcc: http::HeaderValue,
}

/// Most certificates remembered before the map starts over (rotations add
/// entries; a peer reconnecting simply adds its current one back).
const MAX_CALLERS: usize = 4096;

impl Callers {
    /// No callers yet; `own_id` is this gateway's SPIFFE ID.
    pub fn new(own_id: SpiffeId) -> Self {
        Self {
            own_id,
            by_cert: ArcSwap::default(),
        }
    }

    fn remember(&self, cert_digest: &[u8], id: &SpiffeId) {
        if self
            .by_cert
            .load()
            .get(cert_digest)
            .is_some_and(|c| &c.id == id)
        {
            return;
        }
        // SPIFFE IDs are URIs: always a valid header value.
        let Ok(xfcc) = http::HeaderValue::try_from(format!("By={};URI={id}", self.own_id)) else {
            return;
        };
        let caller = Arc::new(Caller {
            id: id.clone(),
            xfcc,
        });
        self.by_cert.rcu(|map| {
            let mut map = if map.len() >= MAX_CALLERS {
                HashMap::new()
            } else {
                HashMap::clone(map)
            };
            map.insert(cert_digest.to_vec(), caller.clone());
            map
        });
    }

    fn lookup(&self, cert_digest: &[u8]) -> Option<Arc<Caller>> {
        self.by_cert.load().get(cert_digest).cloned()
    }
}

/// Whether `caller` may reach a service whose allowed callers are `policy`.
pub fn authorize(
    policy: Option<&PeerPolicy>,
    caller: Option<&SpiffeId>,
) -> Result<(), &'static str> {
    match (policy, caller) {
        (None, _) => Ok(()),
        (Some(_), None) => Err("caller identity unknown"),
        (Some(p), Some(c)) if p.allows(c) => Ok(()),
        (Some(_), Some(_)) => Err("caller not allowed for this service"),
    }
}

/// The east-west proxy's routing.
pub struct EastWestProxy {
    common: Common,
    denied: IntCounterVec,
    callers: Arc<Callers>,
}

impl EastWestProxy {
    /// A proxy to endpoints of exported services in `runtime`'s catalog.
    pub fn new(
        runtime: Arc<Runtime>,
        callers: Arc<Callers>,
        registry: &prometheus::Registry,
    ) -> Self {
        let denied = crate::metrics::counter_vec(
            registry,
            "authz_denied_total",
            "East-west requests refused by a service's allowed callers, by service and caller trust domain.",
            &["service", "caller_trust_domain"],
        );
        Self {
            common: Common::new(runtime, Listener::EastWest),
            denied,
            callers,
        }
    }

    fn caller(&self, session: &Session) -> Option<Arc<Caller>> {
        let digest = session.digest()?.ssl_digest.as_ref()?;
        self.callers.lookup(&digest.cert_digest)
    }
}

#[async_trait]
impl ProxyHttp for EastWestProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.common.new_ctx()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        crate::limits::headers_read(session.as_ref().stream());
        if self.common.route(session, ctx, true, None).await? {
            return Ok(true);
        }
        let caller = self.caller(session);
        let caller = caller.as_ref().map(|c| &c.id);
        if let Some(id) = caller {
            ctx.note_caller(id);
        }
        let policy = ctx.routed().and_then(|r| r.entry.allowed_callers.as_ref());
        match authorize(policy, caller) {
            Ok(()) => Ok(false),
            Err(reason) => {
                let service = ctx
                    .routed()
                    .map(|r| r.entry.key.to_string())
                    .unwrap_or_default();
                warn!(
                    request_id = %ctx.request_id(),
                    trace_id = ctx.trace_id(),
                    caller = caller.map(ToString::to_string),
                    service,
                    reason,
                    "east-west request denied"
                );
                let caller_td = caller.map_or("", |c| c.trust_domain_str());
                self.denied
                    .with_label_values(&[service.as_str(), caller_td])
                    .inc();
                let body = serde_json::json!({
                    "error": "forbidden",
                    "reason": reason,
                    "request_id": ctx.request_id(),
                })
                .to_string();
                session
                    .respond_error_with_body(403, bytes::Bytes::from(body))
                    .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // No mesh connector: east-west traffic goes to this cluster's endpoints only.
        self.common.next_peer(session, ctx, None)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.common.stamp(upstream, ctx)?;
        // The subset was for this gateway (routing has used it), not the
        // workload; no other internal header, and no XFCC sent in, is trusted.
        let named_subset = upstream.headers.contains_key(headers::SUBSET);
        let forged = headers::strip_internal(upstream) - usize::from(named_subset);
        if forged > 0 {
            self.common
                .runtime
                .metrics
                .stripped(Listener::EastWest, forged);
        }
        // Tell the workload who called, as Envoy does, from the verified peer.
        if let Some(caller) = self.caller(session) {
            upstream.insert_header(headers::XFCC, caller.xfcc.clone())?;
        }
        Ok(())
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

    // The upstream phases below delegate to `Common` exactly as the outbound
    // proxy's do; #[async_trait] cannot see through a macro to share them.
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
        upstream: &mut pingora_http::ResponseHeader,
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
    ) -> pingora_proxy::FailToProxy {
        self.common.fail(session, e, ctx).await
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        common::quiet_error(e)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        crate::limits::request_done(session.as_ref().stream());
        let caller = self.caller(session);
        let catalog = self.common.runtime.catalog.load();
        let source = caller_source(&catalog, caller.as_ref().map(|c| &c.id));
        self.common.log(Listener::EastWest, session, e, ctx, source);
    }
}

/// The source of a verified east-west `caller`: its trust domain, and the
/// cluster the catalog names for it (the peer gateways, configured or admitted
/// by their hello, followed as they change); anyone else is unknown.
fn caller_source<'a>(catalog: &'a Catalog, caller: Option<&'a SpiffeId>) -> Source<'a> {
    caller.map_or(Source::UNKNOWN, |id| Source {
        cluster: catalog
            .gateway_cluster(id)
            .map_or(Source::UNKNOWN.cluster, ClusterName::as_str),
        trust_domain: id.trust_domain_str(),
    })
}

/// The exported service port of `catalog` that a ClientHello's `sni` names,
/// with its entry; `None` when the SNI names no exported port (the connection
/// is then terminated here and routed by its HTTP requests, or refused).
///
/// Pure, so the fuzz target checks exactly what the listener routes by.
pub fn sni_target(catalog: &Catalog, sni: Option<&str>) -> Option<(Arc<ServiceEntry>, u16)> {
    let target = parse_east_west_sni(sni?)?;
    let entry = catalog.get(&target.key)?;
    (entry.exported && entry.port(Some(target.port)).is_some())
        .then(|| (entry.clone(), target.port))
}

/// The east-west listener's app: reads the ClientHello, then either splices a
/// passthrough service's TLS to its endpoint untouched, or terminates the peer
/// gateway's mTLS and runs Pingora's HTTP proxy.
pub struct EastWestApp {
    acceptor: SpiffeAcceptor,
    proxy: Arc<HttpProxy<EastWestProxy>>,
    callers: Arc<Callers>,
    /// For the L4 paths (passthrough, terminated TCP ports). TCP streams are
    /// in flight in its drain here; HTTP requests are counted by `proxy`.
    runtime: Arc<Runtime>,
    limits: EastWestLimits,
}

/// What the east-west listener lets one client hold.
pub struct EastWestLimits {
    /// Connection caps and the header deadline.
    pub guard: ListenerGuard,
    /// Caps on TLS handshakes in flight (ClientHello read to handshake done).
    pub handshakes: Arc<ConnectionLimiter>,
    /// The configuration in force, for passthrough services' `allow_sources`.
    pub config: Arc<ArcSwap<Config>>,
}

impl EastWestLimits {
    /// Whether a passthrough connection from `source` may reach `key`.
    fn admits(&self, key: &ServiceKey, source: IpAddr) -> bool {
        self.config
            .load()
            .services
            .iter()
            .find(|s| s.key() == *key)
            .is_none_or(|s| s.admits_source(source))
    }
}

impl EastWestApp {
    /// An app accepting with `acceptor` and proxying with `proxy`.
    pub fn new(
        acceptor: SpiffeAcceptor,
        proxy: HttpProxy<EastWestProxy>,
        callers: Arc<Callers>,
        runtime: Arc<Runtime>,
        limits: EastWestLimits,
    ) -> Self {
        Self {
            acceptor,
            proxy: Arc::new(proxy),
            callers,
            runtime,
            limits,
        }
    }

    /// Splices `client`, opened by `caller` (none: passthrough), to the first
    /// endpoint of `entry` that accepts, after sending `prefix` (a replayed
    /// ClientHello for passthrough).
    async fn to_endpoint<C>(
        &self,
        entry: &Arc<ServiceEntry>,
        caller: Option<&SpiffeId>,
        client: C,
        prefix: &[u8],
    ) where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let runtime = &self.runtime;
        let _in_flight = runtime.drain.track();
        let spread = runtime.tcp_metrics.next_spread();
        let connected = tcp::connect_backend(&runtime.upstreams, entry, true, spread, |t| {
            tcp::dial(t.addr())
        })
        .await;
        // The catalog snapshot is not held for the connection's lifetime.
        let count = |result| {
            let catalog = runtime.catalog.load();
            let source = caller_source(&catalog, caller);
            runtime
                .tcp_metrics
                .connection(Listener::EastWest, &entry.key, source, result);
        };
        match connected {
            Ok((upstream, _lease)) => {
                count(L4Result::Ok);
                let idle = runtime.upstreams.policy().idle_timeout;
                tcp::splice(
                    Listener::EastWest,
                    &entry.key,
                    client,
                    upstream,
                    prefix,
                    &runtime.tcp_metrics,
                    idle,
                )
                .await;
            }
            Err(refusal) => {
                warn!(service = %entry.key, result = refusal.result().label(), "no endpoint took the east-west connection");
                count(refusal.result());
            }
        }
    }
}

#[async_trait]
impl ServerApp for EastWestApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let source = crate::limits::peer_ip(&stream);
        let limits = &self.limits;
        let _permit = limits.guard.admit_from(source)?;
        let handshake = match limits.handshakes.try_acquire(source) {
            Ok(permit) => permit,
            Err(refused) => {
                let reason = RefusalReason::handshakes(refused);
                limits.guard.refused(reason, source, &refused);
                return None;
            }
        };
        // Refusals are counted by the acceptor; a scan must not flood the log.
        let mut start = match self
            .acceptor
            .read_client_hello(HelloRecorder::new(stream))
            .await
        {
            Ok(start) => start,
            Err(e) => {
                debug!(result = e.result.label(), error = %e.message, "east-west ClientHello refused");
                return None;
            }
        };
        let sni = start.client_hello().server_name().map(str::to_owned);
        let target = sni_target(&self.runtime.catalog.load(), sni.as_deref());
        if let Some((entry, _)) = target.as_ref().filter(|(e, _)| e.passthrough) {
            drop(handshake);
            if !limits.admits(&entry.key, source) {
                limits.guard.refused(
                    RefusalReason::SourceNotAllowed,
                    source,
                    &format_args!("{source} is outside {}'s allow_sources", entry.key),
                );
                self.runtime.tcp_metrics.connection(
                    Listener::EastWest,
                    &entry.key,
                    Source::UNKNOWN,
                    L4Result::SourceNotAllowed,
                );
                return None;
            }
            self.acceptor
                .metrics()
                .record(HandshakeSide::Server, HandshakeResult::Passthrough);
            let (hello, client) = start.io.into_parts();
            self.to_endpoint(entry, None, client, &hello).await;
            return None;
        }
        start.io.stop_recording();
        let (tls, caller) = match self.acceptor.finish(start).await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(result = e.result.label(), error = %e.message, "east-west handshake refused");
                return None;
            }
        };
        drop(handshake);
        let caller = caller?;
        // A terminated TCP port: splice the decrypted stream to an endpoint.
        if let Some((entry, port)) = &target
            && entry
                .port(Some(*port))
                .is_some_and(|p| p.protocol == Protocol::Tcp)
        {
            if let Err(reason) = authorize(entry.allowed_callers.as_ref(), Some(&caller)) {
                warn!(%caller, service = %entry.key, reason, "east-west TCP connection denied");
                let catalog = self.runtime.catalog.load();
                self.runtime.tcp_metrics.connection(
                    Listener::EastWest,
                    &entry.key,
                    caller_source(&catalog, Some(&caller)),
                    L4Result::Denied,
                );
                return None;
            }
            self.to_endpoint(entry, Some(&caller), tls, &[]).await;
            return None;
        }
        let mesh = MeshTlsStream::new(tls, caller.clone());
        if let Some(digest) = mesh.get_ssl_digest() {
            self.callers.remember(&digest.cert_digest, &caller);
        }
        // HTTP/1.1 keep-alive hands the stream back after each request; HTTP/2
        // serves the whole connection in one call.
        let mut stream: Stream = limits.guard.deadline(Box::new(mesh));
        loop {
            stream = self.proxy.process_new(stream, shutdown).await?;
        }
    }

    /// Closes the proxy's idle keep-alive connections, [`super::KEEPALIVE_LINGER`]
    /// after the listener closed.
    async fn cleanup(&self) {
        tokio::time::sleep(super::KEEPALIVE_LINGER).await;
        self.proxy.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use isthmus_federation::catalog::{Protocol, ServicePort};
    use isthmus_federation::trust::tls::mtls_server_config;
    use isthmus_federation::trust::{HandshakeMetrics, ca};
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn entry(key: &str, port: u16, exported: bool) -> ServiceEntry {
        ServiceEntry {
            ports: vec![ServicePort {
                port,
                protocol: Protocol::Tcp,
                name: None,
            }],
            exported,
            passthrough: true,
            ..ServiceEntry::exported(key.parse().unwrap())
        }
    }

    /// The client_hello fuzz target's seeds are real ClientHellos (openssl
    /// s_client's, one re-framed across three records) that the listener
    /// reads whole, with the SNI each names and the route that SNI takes.
    #[tokio::test]
    async fn the_client_hello_fuzz_seeds_are_the_hellos_they_claim() {
        let hour = Duration::from_secs(3600);
        let own = ca::create_ca(&"own.example".parse().unwrap(), hour).unwrap();
        let id = "spiffe://own.example/isthmus/gateway/gw".parse().unwrap();
        let material = ca::dev_material(&own, &id, &[("own.example", &own)], hour).unwrap();
        let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::gateways_of([
            "own.example".parse().unwrap(),
        ])));
        let config = mtls_server_config(&material, policy, vec![]).unwrap();
        let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
        let acceptor = SpiffeAcceptor::new(Arc::new(config), metrics, hour);
        let catalog = Catalog::new([entry("data/db", 5432, true), entry("shop/web", 8080, false)]);

        let db = "outbound_.5432_._.db.data.svc.cluster.local";
        let web = "outbound_.8080_.v2_.web.shop.svc.cluster.local";
        let seeds =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/client_hello");
        for (file, sni, routed) in [
            ("openssl_tls13_passthrough_sni", Some(db), true),
            ("openssl_tls13_split_3_records", Some(db), true),
            ("openssl_tls12_subset_sni", Some(web), false),
            ("openssl_no_sni", None, false),
        ] {
            let hello = std::fs::read(seeds.join(file)).unwrap();
            let (mut client, server) = tokio::io::duplex(1 << 16);
            client.write_all(&hello).await.unwrap();
            let start = acceptor
                .read_client_hello(HelloRecorder::new(server))
                .await
                .unwrap_or_else(|e| panic!("{file}: {}", e.message));
            assert_eq!(start.client_hello().server_name(), sni, "{file}");
            let target = sni_target(&catalog, sni);
            assert_eq!(
                target.is_some(),
                routed,
                "{file}: only exported ports route"
            );
            let (recorded, _) = start.io.into_parts();
            assert_eq!(
                recorded, hello,
                "{file}: the whole hello is kept for a replay"
            );
        }
        let wrong_port = "outbound_.5433_._.db.data.svc.cluster.local";
        assert!(sni_target(&catalog, Some(wrong_port)).is_none());
        let (entry, port) = sni_target(&catalog, Some(db)).unwrap();
        assert_eq!((entry.key.to_string(), port), ("data/db".to_owned(), 5432));
    }

    #[test]
    fn authorization_needs_a_known_allowed_caller_when_a_policy_is_set() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let policy = PeerPolicy::new([id("spiffe://a.example/isthmus/gateway/gw")], []);
        assert_eq!(authorize(None, None), Ok(()));
        assert_eq!(
            authorize(
                Some(&policy),
                Some(&id("spiffe://a.example/isthmus/gateway/gw"))
            ),
            Ok(())
        );
        assert!(
            authorize(
                Some(&policy),
                Some(&id("spiffe://a.example/isthmus/gateway/other"))
            )
            .is_err()
        );
        assert!(
            authorize(Some(&policy), None).is_err(),
            "unknown caller is refused, not waved through"
        );
    }
}
