//! East-west connections: [`MeshConnector`] opens SPIFFE-verified mTLS
//! connections to peer gateways as Pingora custom L4 streams, and cuts them
//! when a peer is declared dead; [`MeshConnector::peer`] builds the `HttpPeer`
//! a request to a peer gateway goes to.
//!
//! Pingora drives HTTP/2 (or HTTP/1.1 for upgrades) over the authenticated
//! TLS stream itself and pools and multiplexes it; the patched pingora-core
//! (vendor/PATCHES.md) is what lets it reuse such a virtual stream at all.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr as InetSocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use isthmus_federation::SpiffeId;
use isthmus_federation::trust::{PeerPolicy, SpiffeConnector};
use parking_lot::Mutex;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::ALPN;
use pingora_core::protocols::l4::ext::TcpKeepalive;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use crate::upstream::{BackendId, BackendRef};

/// The protocol spoken over an east-west connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeshAlpn {
    /// HTTP/2, multiplexed: the default.
    H2,
    /// HTTP/1.1: for requests HTTP/2 cannot carry here (WebSocket upgrades).
    Http1,
}

impl MeshAlpn {
    fn protocol_id(self) -> &'static [u8] {
        match self {
            Self::H2 => b"h2",
            Self::Http1 => b"http/1.1",
        }
    }
}

/// Opens and cuts this gateway's connections to peer gateways.
pub struct MeshConnector {
    tls: SpiffeConnector,
    /// Peer gateways declared dead are announced here (by the upstreams).
    cuts: broadcast::Sender<BackendId>,
    open: Arc<OpenConnections>,
}

impl fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConnector").finish_non_exhaustive()
    }
}

impl MeshConnector {
    /// A connector authenticating with `tls`; a peer gateway announced on
    /// `cuts` has its connections, and connection attempts, ended at once
    /// (once [`Self::serve_cuts`] runs), so requests waiting on a dead peer fail
    /// now and are retried elsewhere instead of waiting for a timeout. Only
    /// connections to that address expecting that SPIFFE ID are cut: another
    /// peer claiming the same address keeps its connections.
    pub fn new(tls: SpiffeConnector, cuts: broadcast::Sender<BackendId>) -> Arc<Self> {
        Arc::new(Self {
            tls,
            cuts,
            open: Arc::default(),
        })
    }

    /// The upstream for a request to `peer` (a gateway's east-west address)
    /// authenticated as `expected`, with `sni` naming the service. Pingora
    /// speaks `alpn` over the authenticated stream and pools per (peer,
    /// expected ID, SNI, protocol).
    pub fn peer(
        self: &Arc<Self>,
        peer: InetSocketAddr,
        expected: SpiffeId,
        sni: ServerName<'static>,
        alpn: MeshAlpn,
        timeout: Duration,
    ) -> HttpPeer {
        let mut http_peer = HttpPeer::new(peer, false, sni.to_str().into_owned());
        // The SNI and address are in Pingora's pool key already; the identity
        // and protocol are not.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&expected, alpn).hash(&mut hasher);
        http_peer.group_key = hasher.finish();
        http_peer.options.alpn = match alpn {
            MeshAlpn::H2 => ALPN::H2,
            MeshAlpn::Http1 => ALPN::H1,
        };
        http_peer.options.max_h2_streams = 100;
        http_peer.options.connection_timeout = Some(timeout);
        http_peer.options.custom_l4 = Some(Arc::new(MeshConnect {
            connector: self.clone(),
            peer,
            expected,
            sni,
            alpn,
            timeout,
        }));
        http_peer
    }

    /// Cuts the connections of every peer gateway announced on the cut
    /// channel until `stop` fires.
    pub async fn serve_cuts(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut cuts = self.cuts.subscribe();
        loop {
            tokio::select! {
                cut = cuts.recv() => match cut {
                    Ok(id) => {
                        let n = self.open.cut(&id);
                        debug!(peer = %id, connections = n, "east-west connections cut: the peer was declared dead");
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "east-west cut signals were missed; those connections end on their own");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = stop.changed() => return,
            }
        }
    }

    /// Connects to `peer` and authenticates it as `expected`.
    async fn open(
        &self,
        peer: InetSocketAddr,
        expected: &SpiffeId,
        sni: ServerName<'static>,
        alpn: MeshAlpn,
    ) -> std::result::Result<MeshStream, String> {
        let tcp = TcpStream::connect(peer)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        // Registered before the handshake, so a cut ends that too.
        let registration = self
            .open
            .register(BackendId::gateway(peer, expected.clone()), &tcp)
            .map_err(|e| format!("connect: {e}"))?;
        let (tls, _) = self
            .tls
            .connect_with_alpn(
                tcp,
                sni,
                PeerPolicy::exact(expected.clone()),
                vec![alpn.protocol_id().to_vec()],
            )
            .await
            .map_err(|e| format!("tls {}", e.to_string().replace('\n', " ")))?;
        Ok(MeshStream {
            tls,
            _registration: registration,
        })
    }
}

/// Resolves when the peer gateway at `peer` expected to prove `expected` is
/// announced on `cuts`.
async fn cut_for(
    cuts: &mut broadcast::Receiver<BackendId>,
    peer: InetSocketAddr,
    expected: &SpiffeId,
) {
    loop {
        match cuts.recv().await {
            Ok(cut) if cut.as_ref() == BackendRef::gateway(peer, expected) => return,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            // The sender is gone with the gateway's upstreams: nothing will be cut.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// Pingora's custom L4 connector for one peer gateway, identity, SNI and
/// protocol.
struct MeshConnect {
    connector: Arc<MeshConnector>,
    peer: InetSocketAddr,
    expected: SpiffeId,
    sni: ServerName<'static>,
    alpn: MeshAlpn,
    timeout: Duration,
}

impl fmt::Debug for MeshConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConnect")
            .field("peer", &self.peer)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for MeshConnect {
    async fn connect(&self, _addr: &SocketAddr) -> Result<Stream> {
        let mut cuts = self.connector.cuts.subscribe();
        let opening = self
            .connector
            .open(self.peer, &self.expected, self.sni.clone(), self.alpn);
        let opened = tokio::select! {
            opened = tokio::time::timeout(self.timeout, opening) => opened.map_err(|_| {
                Error::explain(
                    ErrorType::ConnectTimedout,
                    format!("east-west connection to {}", self.peer),
                )
            })?,
            () = cut_for(&mut cuts, self.peer, &self.expected) => {
                Err("connect: cut: the peer was declared dead".to_owned())
            }
        };
        match opened {
            Ok(stream) => Ok(Stream::from(VirtualSocketStream::new(Box::new(stream)))),
            Err(why) => {
                let etype = if why.starts_with("tls") {
                    ErrorType::TLSHandshakeFailure
                } else {
                    ErrorType::ConnectError
                };
                let mut err = Error::explain(etype, format!("to {}: {why}", self.peer));
                // Nothing was sent: another peer gateway may be tried.
                err.set_retry(true);
                Err(err)
            }
        }
    }
}

/// An authenticated east-west connection, as Pingora's virtual socket.
#[derive(Debug)]
struct MeshStream {
    tls: TlsStream<TcpStream>,
    _registration: Registration,
}

delegate_async_io!(MeshStream, tls);

impl VirtualSocket for MeshStream {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        let tcp = self.tls.get_ref().0;
        match opt {
            VirtualSockOpt::NoDelay => tcp.set_nodelay(true),
            VirtualSockOpt::KeepAlive(ka) => {
                socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive(&ka))
            }
            _ => Ok(()),
        }
    }
}

fn keepalive(ka: &TcpKeepalive) -> socket2::TcpKeepalive {
    let count = u32::try_from(ka.count).unwrap_or(u32::MAX);
    socket2::TcpKeepalive::new()
        .with_time(ka.idle)
        .with_interval(ka.interval)
        .with_retries(count)
}

/// Every open east-west connection by peer gateway, to cut them.
#[derive(Debug, Default)]
struct OpenConnections {
    next: AtomicU64,
    /// A duplicate of each connection's socket: shutting it down ends the
    /// connection's reads and writes wherever they are waiting.
    by_peer: Mutex<HashMap<BackendId, HashMap<u64, OwnedFd>>>,
}

impl OpenConnections {
    fn register(self: &Arc<Self>, peer: BackendId, tcp: &TcpStream) -> io::Result<Registration> {
        let fd = tcp.as_fd().try_clone_to_owned()?;
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_peer
            .lock()
            .entry(peer.clone())
            .or_default()
            .insert(key, fd);
        Ok(Registration {
            open: self.clone(),
            peer,
            key,
        })
    }

    /// Shuts down every connection to `peer`; returns how many.
    fn cut(&self, peer: &BackendId) -> usize {
        let Some(sockets) = self.by_peer.lock().remove(peer) else {
            return 0;
        };
        for fd in sockets.values() {
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
        sockets.len()
    }
}

/// Removes its connection from [`OpenConnections`] when the connection ends.
#[derive(Debug)]
struct Registration {
    open: Arc<OpenConnections>,
    peer: BackendId,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut by_peer = self.open.by_peer.lock();
        if let Some(sockets) = by_peer.get_mut(&self.peer) {
            sockets.remove(&self.key);
            if sockets.is_empty() {
                by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use arc_swap::ArcSwap;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use isthmus_federation::trust::ca;
    use isthmus_federation::trust::tls::mtls_server_config;
    use isthmus_federation::trust::{HandshakeMetrics, SpiffeAcceptor, TlsMaterial};
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

    /// Two trust domains' material: the server's (a.example) and the client's.
    fn both_sides() -> (Arc<TlsMaterial>, Arc<TlsMaterial>) {
        let (ca_a, ca_b) = (
            ca::create_ca(&"a.example".parse().unwrap(), HOUR).unwrap(),
            ca::create_ca(&"b.example".parse().unwrap(), HOUR).unwrap(),
        );
        let cas = [("a.example", &ca_a), ("b.example", &ca_b)];
        (material(&ca_a, SERVER, &cas), material(&ca_b, CLIENT, &cas))
    }

    /// A peer gateway stand-in: h2 and HTTP/1.1 behind SPIFFE mTLS, answering
    /// with the SNI it was reached by (`/slow` answers after a minute). Counts
    /// the TCP connections it accepted.
    async fn server(material: Arc<TlsMaterial>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::gateways_of([
            "b.example".parse().unwrap(),
        ])));
        let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = mtls_server_config(&material, policy, alpn).unwrap();
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
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let body = format!("hello via {sni}");
                        async move {
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
        (addr, connections)
    }

    /// A connector for `client`, cutting what is announced on the returned
    /// sender; `stop` ends the cut task.
    fn connector(
        client: &Arc<TlsMaterial>,
    ) -> (
        Arc<MeshConnector>,
        broadcast::Sender<BackendId>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
        let tls = SpiffeConnector::new(
            client.clone(),
            metrics,
            Duration::from_secs(5),
            vec![b"h2".to_vec()],
        );
        let cuts = broadcast::channel(8).0;
        let mesh = MeshConnector::new(tls, cuts.clone());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(mesh.clone().serve_cuts(stopped));
        (mesh, cuts, stop)
    }

    fn test_peer(
        mesh: &Arc<MeshConnector>,
        addr: std::net::SocketAddr,
        expected: &str,
        alpn: MeshAlpn,
    ) -> HttpPeer {
        mesh.peer(
            addr,
            expected.parse().unwrap(),
            ServerName::try_from(SNI).unwrap(),
            alpn,
            Duration::from_secs(5),
        )
    }

    async fn get_path(
        connector: &Connector,
        peer: &HttpPeer,
        path: &str,
    ) -> Result<(String, bool)> {
        let (mut session, reused) = connector.get_http_session(peer).await?;
        let mut req = RequestHeader::build("GET", path.as_bytes(), None)?;
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

    async fn get(connector: &Connector, peer: &HttpPeer) -> Result<(String, bool)> {
        get_path(connector, peer, "/").await
    }

    #[tokio::test]
    async fn pingora_pools_and_multiplexes_h2_over_our_spiffe_mtls_stream() {
        let (server_material, client_material) = both_sides();
        let (addr, connections) = server(server_material).await;
        let (mesh, _cuts, _stop) = connector(&client_material);
        let connector = Connector::new(None);
        let peer = test_peer(&mesh, addr, SERVER, MeshAlpn::H2);
        for i in 0..5 {
            let (body, reused) = get(&connector, &peer).await.unwrap();
            assert_eq!(body, format!("hello via {SNI}"));
            assert_eq!(reused, i > 0, "request {i}: pooled h2 connection reused");
        }
        // Concurrent requests multiplex over the pooled connection.
        let results = futures::future::join_all((0..50).map(|_| get(&connector, &peer))).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "one connection for 55 requests"
        );

        // A peer that is not the expected gateway is refused before any request.
        let wrong = test_peer(
            &mesh,
            addr,
            "spiffe://a.example/isthmus/gateway/other",
            MeshAlpn::H2,
        );
        let err = get(&Connector::new(None), &wrong).await.unwrap_err();
        assert_eq!(err.etype(), &ErrorType::TLSHandshakeFailure, "{err}");
        assert!(err.retry(), "another peer may be tried");
    }

    #[tokio::test]
    async fn http1_east_west_connections_are_pooled_one_per_request_in_flight() {
        let (server_material, client_material) = both_sides();
        let (addr, connections) = server(server_material).await;
        let (mesh, _cuts, _stop) = connector(&client_material);
        let connector = Connector::new(None);
        let peer = test_peer(&mesh, addr, SERVER, MeshAlpn::Http1);
        // Two requests in flight: two connections (two virtual streams in the
        // pool at once, kept apart by their ids), both reused afterwards.
        let first = futures::future::join_all((0..2).map(|_| get(&connector, &peer))).await;
        assert!(
            first.iter().all(|r| matches!(r, Ok((_, false)))),
            "{first:?}"
        );
        for i in 0..6 {
            let (body, reused) = get(&connector, &peer).await.unwrap();
            assert_eq!(body, format!("hello via {SNI}"));
            assert!(reused, "request {i}: pooled HTTP/1.1 connection reused");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_burst_to_a_fresh_peer_opens_one_connection_per_hundred_streams_not_one_per_request()
    {
        let (server_material, client_material) = both_sides();
        let (addr, connections) = server(server_material).await;
        let (mesh, _cuts, _stop) = connector(&client_material);
        let connector = Connector::new(None);
        let peer = test_peer(&mesh, addr, SERVER, MeshAlpn::H2);
        let results = futures::future::join_all((0..300).map(|_| get(&connector, &peer))).await;
        assert!(results.iter().all(Result::is_ok));
        // At most 100 streams per connection: three connections could be
        // needed if all 300 were in flight at once.
        let opened = connections.load(Ordering::SeqCst);
        assert!(
            (1..=3).contains(&opened),
            "{opened} connections for a burst of 300"
        );

        // A burst to a peer that fails the handshake: the requests that
        // waited for the failing attempt fail with it instead of each trying.
        let wrong = test_peer(
            &mesh,
            addr,
            "spiffe://a.example/isthmus/gateway/other",
            MeshAlpn::H2,
        );
        let before = connections.load(Ordering::SeqCst);
        let fresh = Connector::new(None);
        let results = futures::future::join_all((0..300).map(|_| get(&fresh, &wrong))).await;
        for r in &results {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.etype(), &ErrorType::TLSHandshakeFailure, "{e}");
            assert!(e.retry(), "another peer may be tried: {e}");
        }
        let attempts = connections.load(Ordering::SeqCst) - before;
        assert!(attempts <= 3, "{attempts} handshakes for a burst of 300");
    }

    #[tokio::test]
    async fn a_cut_fails_requests_in_flight_at_once_and_the_next_request_reconnects() {
        let (server_material, client_material) = both_sides();
        let (addr, connections) = server(server_material).await;
        let (mesh, cuts, _stop) = connector(&client_material);
        let connector = Arc::new(Connector::new(None));
        let peer = Arc::new(test_peer(&mesh, addr, SERVER, MeshAlpn::H2));
        get(&connector, &peer).await.unwrap();
        let in_flight = {
            let (connector, peer) = (connector.clone(), peer.clone());
            tokio::spawn(async move { get_path(&connector, &peer, "/slow").await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Another peer at the same address, and the same ID elsewhere: no cut.
        let other: SpiffeId = "spiffe://a.example/isthmus/gateway/other".parse().unwrap();
        cuts.send(BackendId::gateway(addr, other)).unwrap();
        cuts.send(BackendId::gateway(
            "127.0.0.1:1".parse().unwrap(),
            SERVER.parse().unwrap(),
        ))
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !in_flight.is_finished(),
            "only that peer's connections are cut"
        );
        cuts.send(BackendId::gateway(addr, SERVER.parse().unwrap()))
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), in_flight)
            .await
            .expect("the request in flight fails at once, not after a minute")
            .unwrap();
        assert!(ended.is_err(), "{ended:?}");
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        let (body, reused) = get(&connector, &peer).await.unwrap();
        assert_eq!(body, format!("hello via {SNI}"));
        assert!(!reused, "the cut connection is not reused");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_cut_signal_matches_only_that_address_expecting_that_identity() {
        use futures::FutureExt;
        let addr: InetSocketAddr = "127.0.0.1:15443".parse().unwrap();
        let other_addr: InetSocketAddr = "127.0.0.1:15444".parse().unwrap();
        let a: SpiffeId = "spiffe://a.example/isthmus/gateway/gw".parse().unwrap();
        let b: SpiffeId = "spiffe://b.example/isthmus/gateway/gw".parse().unwrap();
        let (cuts, mut rx) = broadcast::channel(8);
        // Another peer at the same address, the same peer at another
        // address, and an endpoint's address with no identity: no cut.
        cuts.send(BackendId::gateway(addr, b.clone())).unwrap();
        cuts.send(BackendId::gateway(other_addr, a.clone()))
            .unwrap();
        cuts.send(BackendId::endpoint(addr)).unwrap();
        assert!(cut_for(&mut rx, addr, &a).now_or_never().is_none());
        // That peer at that address: cut.
        cuts.send(BackendId::gateway(addr, a.clone())).unwrap();
        assert!(cut_for(&mut rx, addr, &a).now_or_never().is_some());
    }
}
