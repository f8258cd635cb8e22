//! [`MeshConnect`]: Pingora's custom L4 connector for the east-west hop, and
//! [`mesh_peer`], the `HttpPeer` that uses it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr as InetSocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use isthmus_federation::SpiffeId;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::ALPN;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use rustls::pki_types::ServerName;

use super::relay::{self, MeshAlpn, RelayRequest};

/// Opens an east-west connection to one peer gateway through the mesh relay.
pub struct MeshConnect {
    relay: PathBuf,
    request: RelayRequest,
    timeout: Duration,
}

impl fmt::Debug for MeshConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConnect")
            .field("peer", &self.request.peer)
            .field("expected", &self.request.expected)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for MeshConnect {
    async fn connect(&self, _relay_addr: &SocketAddr) -> Result<Stream> {
        let opened = tokio::time::timeout(self.timeout, relay::open(&self.relay, &self.request))
            .await
            .map_err(|_| {
                Error::explain(
                    ErrorType::ConnectTimedout,
                    format!("east-west connection to {}", self.request.peer),
                )
            })?;
        match opened {
            Ok(stream) => Ok(Stream::from(stream)),
            Err(why) => {
                let etype = if why.starts_with("tls") {
                    ErrorType::TLSHandshakeFailure
                } else {
                    ErrorType::ConnectError
                };
                let mut err = Error::explain(etype, format!("to {}: {why}", self.request.peer));
                // Nothing was sent: another peer gateway may be tried.
                err.set_retry(true);
                Err(err)
            }
        }
    }
}

/// The upstream for a request to `peer` (a gateway's east-west address)
/// authenticated as `expected`, with `sni` naming the service. Pingora speaks
/// `alpn` (HTTP/2, or HTTP/1.1 for upgrades) over the relay's authenticated
/// stream and pools per (peer, expected ID, SNI, protocol).
pub fn mesh_peer(
    relay_path: &std::path::Path,
    peer: InetSocketAddr,
    expected: SpiffeId,
    sni: ServerName<'static>,
    alpn: MeshAlpn,
    timeout: Duration,
) -> Result<HttpPeer> {
    let path = relay_path
        .to_str()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "relay path is not UTF-8"))?;
    let sni_str = sni.to_str().into_owned();
    let mut http_peer = HttpPeer::new_uds(path, false, sni_str)?;
    // All peers share the relay's address: keep their pools apart.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (peer, &expected, alpn).hash(&mut hasher);
    http_peer.group_key = hasher.finish();
    http_peer.options.alpn = match alpn {
        MeshAlpn::H2 => ALPN::H2,
        MeshAlpn::Http1 => ALPN::H1,
    };
    http_peer.options.max_h2_streams = 100;
    http_peer.options.connection_timeout = Some(timeout);
    http_peer.options.custom_l4 = Some(std::sync::Arc::new(MeshConnect {
        relay: relay_path.to_owned(),
        request: RelayRequest {
            peer,
            expected,
            sni,
            alpn,
        },
        timeout,
    }));
    Ok(http_peer)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arc_swap::ArcSwap;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use isthmus_federation::trust::ca;
    use isthmus_federation::trust::tls::mtls_server_config;
    use isthmus_federation::trust::{
        HandshakeMetrics, PeerPolicy, SpiffeAcceptor, SpiffeConnector, TlsMaterial,
    };
    use pingora_core::connectors::http::Connector;
    use pingora_http::RequestHeader;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const SERVER: &str = "spiffe://a.example/isthmus/gateway/gw-a";
    const CLIENT: &str = "spiffe://b.example/isthmus/gateway/gw-b";
    const SNI: &str = "outbound_.8080_._.echo.default.svc.cluster.local";

    fn material(
        own: &ca::CaMaterial,
        id: &str,
        cas: &[(&str, &ca::CaMaterial)],
    ) -> Arc<TlsMaterial> {
        ca::dev_material(own, &id.parse().unwrap(), cas, HOUR).unwrap()
    }

    /// An h2 server behind SPIFFE mTLS that answers with the SNI it was reached by.
    async fn server(material: Arc<TlsMaterial>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::gateways_of([
            "b.example".parse().unwrap(),
        ])));
        let config = mtls_server_config(&material, policy, vec![b"h2".to_vec()]).unwrap();
        let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
        let acceptor = SpiffeAcceptor::new(Arc::new(config), metrics, Duration::from_secs(5));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok((tls, _)) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                    let service = service_fn(move |_req| {
                        let body = format!("hello via {sni}");
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    /// Starts a relay for `client` on the test runtime; returns its socket path.
    fn start_relay(client: &Arc<TlsMaterial>) -> (PathBuf, tokio::sync::watch::Sender<bool>) {
        let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
        let connector = SpiffeConnector::new(
            client.clone(),
            metrics,
            Duration::from_secs(5),
            vec![b"h2".to_vec()],
        );
        let relay = super::super::MeshRelay::bind(
            connector,
            Duration::from_secs(5),
            tokio::sync::broadcast::channel(1).0,
        )
        .unwrap();
        let path = relay.path();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(relay.serve(stopped));
        (path, stop)
    }

    fn test_peer(relay: &std::path::Path, addr: std::net::SocketAddr, expected: &str) -> HttpPeer {
        mesh_peer(
            relay,
            addr,
            expected.parse().unwrap(),
            ServerName::try_from(SNI).unwrap(),
            MeshAlpn::H2,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    async fn get(connector: &Connector, peer: &HttpPeer) -> Result<(String, bool)> {
        let (mut session, reused) = connector.get_http_session(peer).await?;
        let mut req = RequestHeader::build("GET", b"/", None)?;
        req.insert_header("host", "echo.default.svc.clusterset.local")?;
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let mut body = Vec::new();
        while let Some(chunk) = session.read_response_body().await? {
            body.extend_from_slice(&chunk);
        }
        connector.release_http_session(session, peer, None).await;
        Ok((String::from_utf8_lossy(&body).into_owned(), reused))
    }

    #[tokio::test]
    async fn pingora_speaks_pooled_h2_over_our_spiffe_mtls() {
        let (ca_a, ca_b) = (
            ca::create_ca(&"a.example".parse().unwrap(), HOUR).unwrap(),
            ca::create_ca(&"b.example".parse().unwrap(), HOUR).unwrap(),
        );
        let server_material =
            material(&ca_a, SERVER, &[("a.example", &ca_a), ("b.example", &ca_b)]);
        let client_material =
            material(&ca_b, CLIENT, &[("a.example", &ca_a), ("b.example", &ca_b)]);
        let (addr, connections) = server(server_material).await;
        let (relay, _stop) = start_relay(&client_material);
        let connector = Connector::new(None);
        let peer = test_peer(&relay, addr, SERVER);
        for i in 0..5 {
            let (body, reused) = get(&connector, &peer).await.unwrap();
            assert_eq!(body, format!("hello via {SNI}"));
            assert_eq!(reused, i > 0, "request {i}: pooled h2 connection reused");
        }
        // Concurrent requests multiplex over the pooled connection.
        let results = futures::future::join_all((0..20).map(|_| get(&connector, &peer))).await;
        assert!(results.iter().all(Result::is_ok));
        assert!(
            connections.load(Ordering::SeqCst) <= 3,
            "{} TCP+TLS connections for 25 requests",
            connections.load(Ordering::SeqCst)
        );

        // A peer that is not the expected gateway is refused before any request.
        let wrong = test_peer(&relay, addr, "spiffe://a.example/isthmus/gateway/other");
        let err = get(&Connector::new(None), &wrong).await.unwrap_err();
        assert_eq!(err.etype(), &ErrorType::TLSHandshakeFailure, "{err}");
        assert!(err.retry(), "another peer may be tried");
    }
}
