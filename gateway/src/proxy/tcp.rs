//! L4 proxying: TCP service ports.
//!
//! - Outbound, a `tcp` port with `listen` gets a listener of its own
//!   ([`TcpOutboundApp`]); each connection goes to an endpoint in this cluster,
//!   or over SPIFFE mTLS (one TLS connection per TCP stream, SNI naming the
//!   service port) to a peer gateway.
//! - East-west, a terminated connection whose SNI names a `tcp` port is spliced
//!   to an endpoint (see `east_west`), as is a passthrough connection.
//!
//! Targets are picked as for HTTP, under the same protection (circuit breaker
//! on connections, outlier detection, active health). A failed connect tries
//! the next target, up to `upstream.max_attempts` in all; nothing has been
//! sent yet, so a retry is always safe. A connection idle in both directions
//! for `upstream.idle_timeout` is closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use isthmus_federation::ServiceKey;
use isthmus_federation::catalog::{RemoteGateway, ServiceEntry, east_west_sni};
use isthmus_federation::trust::PeerPolicy;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::Runtime;
use super::metrics::{L4Result, TcpMetrics};
use crate::metrics::Listener;
use crate::upstream::balance::{Draws, NoTarget, PlanRequest, Target};
use crate::upstream::outlier::Outcome;
use crate::upstream::{ConnectionLease, RetryReason, Upstreams, Use};

/// Why no upstream connection was made; the `result` label of
/// `isthmus_tcp_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4Refusal {
    NoRoute,
    Overloaded,
    ConnectError,
}

impl L4Refusal {
    pub(crate) fn result(self) -> L4Result {
        match self {
            Self::NoRoute => L4Result::NoRoute,
            Self::Overloaded => L4Result::Overloaded,
            Self::ConnectError => L4Result::ConnectError,
        }
    }
}

/// Opens an L4 connection to a backend of `entry` with `connect` (which
/// dials one target), trying further targets while attempts remain. The lease
/// holds the connection's place in the backend's circuit breaker.
pub(crate) async fn connect_backend<S, F, Fut>(
    upstreams: &Upstreams,
    entry: &Arc<ServiceEntry>,
    local_only: bool,
    spread: usize,
    mut connect: F,
) -> Result<(S, ConnectionLease), L4Refusal>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = Result<S, String>>,
{
    let policy = upstreams.policy();
    let backends = upstreams.service(&entry.key);
    let targets = entry.endpoints.len() + if local_only { 0 } else { entry.remote.len() };
    let mut tried = Vec::new();
    while tried.len() < policy.max_attempts {
        let request = PlanRequest {
            local_only,
            tried: &tried,
            ..PlanRequest::whole(entry)
        };
        let plan = upstreams.plan(&backends, request, Use::Tcp, &policy);
        let draws = Draws::new(spread as u64, tried.len() as u64);
        let slot = match plan.pick(draws.level, draws.member) {
            Ok(s) => s,
            Err(NoTarget::Overloaded) => {
                upstreams.overloaded(&entry.key);
                return Err(L4Refusal::Overloaded);
            }
            Err(_) if tried.is_empty() => return Err(L4Refusal::NoRoute),
            Err(_) => break,
        };
        tried.push(slot);
        let target = slot.target(entry);
        let backend = upstreams.backend(&backends, target.backend());
        let lease = upstreams.lease_connection(backend.clone());
        let error =
            match tokio::time::timeout(policy.connect_timeout, connect(target.clone())).await {
                Ok(Ok(stream)) => {
                    upstreams.record(&backends, &backend, Outcome::Success, targets);
                    return Ok((stream, lease));
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no connection within {:?}", policy.connect_timeout),
            };
        upstreams.record(&backends, &backend, Outcome::Failure, targets);
        warn!(service = %entry.key, backend = %target.addr(), %error,
            "L4 connection to a backend failed");
        if tried.len() < policy.max_attempts {
            upstreams.retried(&entry.key, RetryReason::Connect);
        }
    }
    Err(L4Refusal::ConnectError)
}

/// Dials `addr` with TCP_NODELAY.
pub(crate) async fn dial(addr: std::net::SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Milliseconds since `epoch` of the last byte read on either side.
struct Activity {
    epoch: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// A stream that notes when it reads.
struct Watched<'a, S> {
    inner: S,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides end, or nothing moved either way for
/// `idle_timeout`; `prefix` is sent upstream first (a replayed ClientHello).
/// Bytes are counted for `key`.
pub(crate) async fn splice<C, U>(
    listener: Listener,
    key: &ServiceKey,
    client: C,
    mut upstream: U,
    prefix: &[u8],
    metrics: &TcpMetrics,
    idle_timeout: Duration,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        return;
    }
    let activity = Activity {
        epoch: Instant::now(),
        last: AtomicU64::new(0),
    };
    let mut client = Watched {
        inner: client,
        activity: &activity,
    };
    let mut upstream = Watched {
        inner: upstream,
        activity: &activity,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let watchdog = async {
        loop {
            let idle = activity.idle();
            if idle >= idle_timeout {
                return;
            }
            tokio::time::sleep(idle_timeout - idle).await;
        }
    };
    tokio::select! {
        result = copy => match result {
            Ok((from_client, to_client)) => {
                metrics.bytes(listener, key, from_client + prefix.len() as u64, to_client);
            }
            Err(e) => debug!(service = %key, error = %e, "L4 connection ended"),
        },
        () = watchdog => {
            debug!(service = %key, listener = listener.label(), ?idle_timeout, "L4 connection idle; closed");
        }
    }
}

/// The outbound listener of one `tcp` service port.
pub struct TcpOutboundApp {
    runtime: Arc<Runtime>,
    key: ServiceKey,
    port: u16,
}

impl TcpOutboundApp {
    /// Proxies `key:port` over `runtime`'s backends; its connector to peer
    /// gateways (with an identity) reaches them. Each connection is in flight
    /// in `runtime`'s drain until it closes.
    pub fn new(runtime: Arc<Runtime>, key: ServiceKey, port: u16) -> Self {
        Self { runtime, key, port }
    }

    /// Opens an mTLS connection to peer gateway `gw` for this service port.
    async fn to_peer(
        &self,
        gw: &RemoteGateway,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let connector = self
            .runtime
            .peers
            .as_ref()
            .ok_or("no identity to reach peers")?;
        let tcp = dial(gw.address).await?;
        let sni = ServerName::try_from(east_west_sni(&self.key, self.port, None))
            .map_err(|e| e.to_string())?;
        connector
            .connect_with_alpn(tcp, sni, PeerPolicy::exact(gw.spiffe_id.clone()), vec![])
            .await
            .map(|(tls, _)| tls)
            .map_err(|e| e.to_string())
    }
}

/// An L4 upstream: plain TCP to an endpoint, or mTLS to a peer gateway.
enum Upstream {
    Endpoint(TcpStream),
    Gateway(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

#[async_trait]
impl ServerApp for TcpOutboundApp {
    async fn process_new(
        self: &Arc<Self>,
        client: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let runtime = &self.runtime;
        let _in_flight = runtime.drain.track();
        let Some(entry) = runtime.catalog.load().get(&self.key).cloned() else {
            runtime.tcp_metrics.connection(
                Listener::Outbound,
                &self.key,
                runtime.local_source(),
                L4Refusal::NoRoute.result(),
            );
            return None;
        };
        let spread = runtime.tcp_metrics.next_spread();
        let connected = connect_backend(
            &runtime.upstreams,
            &entry,
            runtime.peers.is_none(),
            spread,
            |target| async move {
                match target {
                    Target::Local(addr) => dial(addr).await.map(Upstream::Endpoint),
                    Target::Remote(gw) => self
                        .to_peer(&gw)
                        .await
                        .map(|tls| Upstream::Gateway(Box::new(tls))),
                }
            },
        )
        .await;
        let idle = runtime.upstreams.policy().idle_timeout;
        match connected {
            Ok((upstream, _lease)) => {
                runtime.tcp_metrics.connection(
                    Listener::Outbound,
                    &self.key,
                    runtime.local_source(),
                    L4Result::Ok,
                );
                let (key, m) = (&self.key, &runtime.tcp_metrics);
                match upstream {
                    Upstream::Endpoint(u) => {
                        splice(Listener::Outbound, key, client, u, &[], m, idle).await
                    }
                    Upstream::Gateway(u) => {
                        splice(Listener::Outbound, key, client, u, &[], m, idle).await
                    }
                }
            }
            Err(refusal) => runtime.tcp_metrics.connection(
                Listener::Outbound,
                &self.key,
                runtime.local_source(),
                refusal.result(),
            ),
        }
        None
    }
}
