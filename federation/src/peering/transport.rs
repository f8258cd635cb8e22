//! The peering protocol over mTLS: the gRPC server that accepts peers and the
//! client that dials each configured peer, reconnecting with jittered
//! exponential backoff.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tracing::{debug, info, warn};

use super::hub::Hub;
use super::proto::PeerMessage;
use super::proto::federation_client::FederationClient;
use super::proto::federation_server::{Federation, FederationServer};
use super::session::{self, Role, SessionEnd};
use crate::SpiffeId;
use crate::limits::{ConnectionLimiter, ConnectionLimits, ConnectionPermit, LogLimit};
use crate::trust::{PeerPolicy, SpiffeAcceptor, SpiffeConnector};

/// Refused federation handshakes are logged at WARN at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive pings, so a dead TCP connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Messages buffered per direction before the sender waits.
const OUTBOUND_BUFFER: usize = 64;
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A peer gateway this gateway dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTarget {
    /// Its federation listener.
    pub address: SocketAddr,
    /// The SPIFFE ID it must prove.
    pub spiffe_id: SpiffeId,
}

/// What a server-side connection tells the gRPC handler: who the peer is.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The SPIFFE ID proved in the handshake.
    pub spiffe_id: SpiffeId,
    /// Where it connected from.
    pub remote: SocketAddr,
}

/// An accepted, authenticated connection.
struct PeerConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// Its place under the listener's connection caps, freed when it closes.
    _permit: ConnectionPermit,
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The gRPC service: each call is one session.
struct FederationService {
    hub: Arc<Hub>,
    stop: watch::Receiver<bool>,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<PeerMessage, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    type PeerStream = OutStream;

    async fn peer(
        &self,
        request: tonic::Request<tonic::Streaming<PeerMessage>>,
    ) -> Result<tonic::Response<OutStream>, tonic::Status> {
        let info = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("no peer identity"))?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let hub = self.hub.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let ended = session::run(
                hub.clone(),
                Role::Server,
                info.spiffe_id.clone(),
                inbound,
                tx,
                stop,
            )
            .await;
            log_end(&hub, Role::Server, &info.spiffe_id, &ended);
        });
        Ok(tonic::Response::new(Box::pin(
            ReceiverStream::new(rx).map(Ok),
        )))
    }
}

fn log_end(hub: &Hub, role: Role, peer: &SpiffeId, ended: &SessionEnd) {
    hub.metrics()
        .sessions
        .with_label_values(&[role.label(), ended.result])
        .inc();
    match ended.result {
        "shutdown" => debug!(peer = %peer, role = role.label(), "peering session ended"),
        _ => warn!(peer = %peer, role = role.label(), result = ended.result,
            detail = %ended.detail, "peering session ended"),
    }
}

/// Accepts peers on `listener` until `stop`. Handshakes run concurrently, so
/// a slow or hostile client never holds up the others; each failure is
/// counted in `isthmus_tls_handshakes_total` by the acceptor. The hub's
/// [`PeeringLimits`](super::PeeringLimits) cap connections (in total and per
/// source), handshakes in progress, streams per connection and message size:
/// over a cap a connection is closed at once and counted in
/// `isthmus_federation_refused_total`.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    acceptor: SpiffeAcceptor,
    mut stop: watch::Receiver<bool>,
) {
    let limits = *hub.limits();
    let connections = ConnectionLimiter::new(ConnectionLimits {
        total: limits.max_connections,
        per_source: limits.max_connections_per_source,
    });
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    let log = Arc::new(LogLimit::new(REFUSAL_LOG_EVERY));
    let (conns_tx, conns_rx) = mpsc::channel::<Result<PeerConn, std::io::Error>>(16);
    let accept_stop = stop.clone();
    let accept_hub = hub.clone();
    let accepting = tokio::spawn(async move {
        let (mut stop, hub) = (accept_stop, accept_hub);
        let refuse = |reason: &str| hub.metrics().refused.with_label_values(&[reason]).inc();
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "federation listener accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let permit = match connections.try_acquire(remote.ip()) {
                Ok(permit) => permit,
                Err(refused) => {
                    refuse(match refused {
                        crate::limits::Refused::Total => "connections_total",
                        crate::limits::Refused::PerSource => "connections_per_source",
                    });
                    debug!(%remote, "federation connection refused: {refused}");
                    continue; // dropping `tcp` closes it
                }
            };
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                refuse("handshakes");
                debug!(%remote, "federation connection refused: too many handshakes in progress");
                continue;
            };
            let (acceptor, conns_tx, log) = (acceptor.clone(), conns_tx.clone(), log.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let accepted = acceptor.accept(tcp).await;
                drop(handshake);
                match accepted {
                    Ok((tls, Some(spiffe_id))) => {
                        let _ = conns_tx
                            .send(Ok(PeerConn {
                                tls,
                                info: PeerInfo { spiffe_id, remote },
                                _permit: permit,
                            }))
                            .await;
                    }
                    // Anyone can make these: WARN now and then, the rest at
                    // DEBUG (isthmus_tls_handshakes_total counts them all).
                    Ok((_, None)) => match log.allow() {
                        Some(held_back) => {
                            warn!(%remote, held_back, "federation client sent no certificate")
                        }
                        None => debug!(%remote, "federation client sent no certificate"),
                    },
                    Err(e) => match log.allow() {
                        Some(held_back) => warn!(%remote, result = %e.result, error = %e.message,
                            held_back, "federation handshake refused"),
                        None => debug!(%remote, result = %e.result, error = %e.message,
                            "federation handshake refused"),
                    },
                }
            });
        }
    });
    let service = FederationServer::new(FederationService {
        hub: hub.clone(),
        stop: stop.clone(),
    })
    .max_decoding_message_size(limits.max_message_bytes)
    .max_encoding_message_size(limits.max_message_bytes);
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(service)
        .serve_with_incoming_shutdown(ReceiverStream::new(conns_rx), async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = result {
        warn!(error = %e, "federation server stopped");
    }
    accepting.abort();
}

/// Dials `target` and keeps a session with it until `stop`, reconnecting
/// with jittered exponential backoff.
pub async fn dial(
    hub: Arc<Hub>,
    target: PeerTarget,
    connector: SpiffeConnector,
    connect_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    loop {
        let ended = connect_and_run(&hub, &target, &connector, connect_timeout, stop.clone()).await;
        log_end(&hub, Role::Client, &target.spiffe_id, &ended);
        if ended.result == "shutdown" || *stop.borrow() {
            return;
        }
        failures = if ended.established {
            1
        } else {
            failures.saturating_add(1)
        };
        let delay = backoff(failures, random_u64());
        debug!(peer = %target.spiffe_id, delay_ms = delay.as_millis(), "reconnecting to peer");
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The delay before reconnect attempt after `failures` failures in a row:
/// exponential, capped, and jittered into its upper half so that gateways
/// restarted together do not reconnect in lockstep.
pub fn backoff(failures: u32, random: u64) -> Duration {
    let exp = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let half = exp / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    half + Duration::from_millis(random % jitter_ms)
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut buf = [0u8; 8];
    // A failed read leaves zeroes: the delay is then the lower bound.
    let _ = ring::rand::SystemRandom::new().fill(&mut buf);
    u64::from_le_bytes(buf)
}

/// A random process incarnation.
pub fn incarnation() -> u64 {
    random_u64() | 1
}

/// A gRPC client of the peer `target` over mTLS, which must prove its
/// SPIFFE ID; messages larger than `max_message_bytes` are refused either
/// way. The error says why the connection failed.
pub async fn client(
    target: &PeerTarget,
    connector: &SpiffeConnector,
    connect_timeout: Duration,
    max_message_bytes: usize,
) -> Result<FederationClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", target.address))
        .map_err(|e| e.to_string())?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true);
    let (address, expected, connector) = (
        target.address,
        PeerPolicy::exact(target.spiffe_id.clone()),
        connector.clone(),
    );
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (expected, connector) = (expected.clone(), connector.clone());
            async move {
                let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(address))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                    })??;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::IpAddress(address.ip().into());
                let (tls, _) = connector
                    .connect_with_alpn(tcp, name, expected, vec![b"h2".to_vec()])
                    .await
                    .map_err(|e| std::io::Error::other(format!("{}: {}", e.result, e.message)))?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)
        })?;
    Ok(FederationClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

async fn connect_and_run(
    hub: &Arc<Hub>,
    target: &PeerTarget,
    connector: &SpiffeConnector,
    connect_timeout: Duration,
    stop: watch::Receiver<bool>,
) -> SessionEnd {
    let fail = |result, detail: String| SessionEnd {
        result,
        detail,
        established: false,
    };
    let max_message_bytes = hub.limits().max_message_bytes;
    let mut client = match client(target, connector, connect_timeout, max_message_bytes).await {
        Ok(c) => c,
        Err(e) => return fail("connect_failed", e),
    };
    let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
    // The session sends the hello first; the call starts with it queued.
    let (inbound_tx, inbound_rx) = tokio::sync::oneshot::channel();
    let session = {
        let (hub, peer) = (hub.clone(), target.spiffe_id.clone());
        tokio::spawn(async move {
            let Ok(inbound) = inbound_rx.await else {
                return fail_end();
            };
            session::run(hub, Role::Client, peer, inbound, tx, stop).await
        })
    };
    match client.peer(ReceiverStream::new(rx)).await {
        Ok(response) => {
            let _ = inbound_tx.send(response.into_inner());
        }
        Err(status) => {
            session.abort();
            return fail("call_failed", status.to_string());
        }
    }
    info!(peer = %target.spiffe_id, address = %target.address, "connected to peer");
    session
        .await
        .unwrap_or_else(|e| fail("panicked", e.to_string()))
}

fn fail_end() -> SessionEnd {
    SessionEnd {
        result: "call_failed",
        detail: "the call did not start".into(),
        established: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_in_the_upper_half() {
        assert_eq!(backoff(1, 0), Duration::from_millis(100));
        assert_eq!(backoff(1, 99), Duration::from_millis(199));
        assert_eq!(backoff(2, 0), Duration::from_millis(200));
        assert_eq!(backoff(40, 0), MAX_BACKOFF / 2);
        assert!(backoff(40, u64::MAX) < MAX_BACKOFF);
    }
}
