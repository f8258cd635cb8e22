//! L4 proxying: TCP service ports.
//!
//! - Outbound, a `tcp` port with `listen` gets a listener of its own
//!   ([`TcpOutboundApp`]); each connection goes to an endpoint in this cluster,
//!   or over SPIFFE mTLS (one TLS connection per TCP stream, SNI naming the
//!   service port) to a peer gateway.
//! - East-west, a terminated connection whose SNI names a `tcp` port is spliced
//!   to an endpoint (see `east_west`), as is a passthrough connection.
//!
//! A failed connect tries the next target, up to [`MAX_ATTEMPTS`] in all;
//! nothing has been sent yet, so a retry is always safe.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use isthmus_federation::ServiceKey;
use isthmus_federation::catalog::{Catalog, east_west_sni};
use isthmus_federation::trust::{PeerPolicy, SpiffeConnector};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::metrics::TcpMetrics;
use super::outbound::{CONNECT_TIMEOUT, MAX_ATTEMPTS};
use super::routing::{Target, pick};

/// Connects to the first of `endpoints` (tried in order, at most
/// [`MAX_ATTEMPTS`]) that accepts within the connect timeout.
pub(crate) async fn connect_first(
    endpoints: impl IntoIterator<Item = SocketAddr>,
) -> Option<(SocketAddr, TcpStream)> {
    for endpoint in endpoints.into_iter().take(MAX_ATTEMPTS) {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Some((endpoint, stream));
            }
            Ok(Err(e)) => debug!(%endpoint, error = %e, "endpoint refused; trying the next"),
            Err(_) => debug!(%endpoint, "endpoint timed out; trying the next"),
        }
    }
    None
}

/// The endpoints of `key` in rotating order starting at `spread`.
pub(crate) fn rotated(endpoints: &[SocketAddr], spread: usize) -> Vec<SocketAddr> {
    let n = endpoints.len();
    (0..n).map(|i| endpoints[(spread + i) % n]).collect()
}

/// Copies both ways until both sides end; `prefix` is sent upstream first (a
/// replayed ClientHello). Bytes are counted for `key`.
pub(crate) async fn splice<C, U>(
    listener: &str,
    key: &ServiceKey,
    mut client: C,
    mut upstream: U,
    prefix: &[u8],
    metrics: &TcpMetrics,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((from_client, to_client)) => {
            metrics.bytes(listener, key, from_client + prefix.len() as u64, to_client);
        }
        Err(e) => debug!(service = %key, error = %e, "L4 connection ended"),
    }
}

/// The outbound listener of one `tcp` service port.
pub struct TcpOutboundApp {
    key: ServiceKey,
    port: u16,
    catalog: Arc<ArcSwap<Catalog>>,
    connector: Option<SpiffeConnector>,
    metrics: TcpMetrics,
}

impl TcpOutboundApp {
    /// Proxies `key:port`; `connector` (with an identity) reaches peer gateways.
    pub fn new(
        key: ServiceKey,
        port: u16,
        catalog: Arc<ArcSwap<Catalog>>,
        connector: Option<SpiffeConnector>,
        metrics: TcpMetrics,
    ) -> Self {
        Self {
            key,
            port,
            catalog,
            connector,
            metrics,
        }
    }

    /// Opens an mTLS connection to peer gateway `gw` for this service port.
    async fn to_peer(
        &self,
        gw: &isthmus_federation::catalog::RemoteGateway,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let connector = self
            .connector
            .as_ref()
            .ok_or("no identity to reach peers")?;
        let (_, tcp) = connect_first([gw.address])
            .await
            .ok_or("peer gateway refused")?;
        let sni = ServerName::try_from(east_west_sni(&self.key, self.port, None))
            .map_err(|e| e.to_string())?;
        connector
            .connect_with_alpn(tcp, sni, PeerPolicy::exact(gw.spiffe_id.clone()), vec![])
            .await
            .map(|(tls, _)| tls)
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl ServerApp for TcpOutboundApp {
    async fn process_new(
        self: &Arc<Self>,
        client: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(entry) = self.catalog.load().get(&self.key).cloned() else {
            self.metrics.connection("outbound", &self.key, "no_route");
            return None;
        };
        let spread = self.metrics.next_spread();
        for attempt in 0..MAX_ATTEMPTS {
            let Ok(target) = pick(&entry, self.connector.is_none(), spread, attempt) else {
                break;
            };
            match target {
                Target::Local(addr) => {
                    if let Some((_, upstream)) = connect_first([addr]).await {
                        self.metrics.connection("outbound", &self.key, "ok");
                        splice("outbound", &self.key, client, upstream, &[], &self.metrics).await;
                        return None;
                    }
                }
                Target::Remote(gw) => match self.to_peer(&gw).await {
                    Ok(tls) => {
                        self.metrics.connection("outbound", &self.key, "ok");
                        splice("outbound", &self.key, client, tls, &[], &self.metrics).await;
                        return None;
                    }
                    Err(e) => warn!(service = %self.key, peer = %gw.address, error = %e,
                        "east-west TCP connection failed; trying the next target"),
                },
            }
        }
        self.metrics
            .connection("outbound", &self.key, "connect_error");
        None
    }
}
