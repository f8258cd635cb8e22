//! [`MeshTlsStream`]: an accepted, SPIFFE-authenticated TLS stream that Pingora's
//! HTTP server can run on.

use std::sync::Arc;

use async_trait::async_trait;
use isthmus_federation::SpiffeId;
use pingora_core::protocols::tls::{ALPN, SslDigest};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, IO, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::AsyncWriteExt;
use tokio_rustls::server::TlsStream;

use super::HelloRecorder;

/// What the east-west listener's TLS runs on: the accepted stream, with its
/// ClientHello recorder (no longer recording once TLS is terminated here).
pub type EastWestIo = HelloRecorder<Box<dyn IO>>;

/// An accepted connection from a peer gateway, authenticated by SPIFFE ID.
#[derive(Debug)]
pub struct MeshTlsStream {
    tls: TlsStream<EastWestIo>,
    peer: SpiffeId,
    digest: Arc<SslDigest>,
    alpn: Option<ALPN>,
}

impl MeshTlsStream {
    /// Wraps an accepted stream whose peer was authenticated as `peer`.
    pub fn new(tls: TlsStream<EastWestIo>, peer: SpiffeId) -> Self {
        let (_, conn) = tls.get_ref();
        let version = conn
            .protocol_version()
            .map_or("", |v| v.as_str().unwrap_or(""))
            .to_owned();
        let cipher = conn
            .negotiated_cipher_suite()
            .map_or("", |c| c.suite().as_str().unwrap_or(""))
            .to_owned();
        let cert_digest = conn
            .peer_certificates()
            .and_then(<[_]>::first)
            .map(|leaf| {
                ring::digest::digest(&ring::digest::SHA256, leaf)
                    .as_ref()
                    .to_vec()
            })
            .unwrap_or_default();
        let alpn = match conn.alpn_protocol() {
            Some(b"h2") => Some(ALPN::H2),
            Some(b"http/1.1") => Some(ALPN::H1),
            _ => None,
        };
        let digest = Arc::new(SslDigest::new(cipher, version, None, None, cert_digest));
        Self {
            tls,
            peer,
            digest,
            alpn,
        }
    }

    /// The authenticated SPIFFE ID of the other side.
    pub fn peer(&self) -> &SpiffeId {
        &self.peer
    }

    fn transport(&self) -> &dyn IO {
        self.tls.get_ref().0.inner().as_ref()
    }
}

delegate_async_io!(MeshTlsStream, tls);

#[async_trait]
impl Shutdown for MeshTlsStream {
    async fn shutdown(&mut self) {
        // Sends close_notify; an error means the peer is gone already.
        let _ = AsyncWriteExt::shutdown(&mut self.tls).await;
    }
}

impl UniqueID for MeshTlsStream {
    fn id(&self) -> UniqueIDType {
        self.transport().id()
    }
}

impl Ssl for MeshTlsStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

impl GetTimingDigest for MeshTlsStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for MeshTlsStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for MeshTlsStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.transport().get_socket_digest()
    }
}

#[async_trait]
impl Peek for MeshTlsStream {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arc_swap::ArcSwap;
    use isthmus_federation::trust::tls::mtls_server_config;
    use isthmus_federation::trust::{
        HandshakeMetrics, PeerPolicy, SpiffeAcceptor, SpiffeConnector, TlsMaterial, ca,
    };
    use pingora_core::protocols::http::ServerSession;
    use rustls::pki_types::ServerName;

    use super::*;

    /// Material for `id` (issued by `cas[0]`), trusting each `(trust domain, CA)`.
    fn material(id: &str, cas: [(&str, &ca::CaMaterial); 2]) -> Arc<TlsMaterial> {
        ca::dev_material(
            cas[0].1,
            &id.parse().unwrap(),
            &cas,
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    /// Pingora's HTTP server runs on an accepted MeshTlsStream and sees what the
    /// handshake established.
    #[tokio::test]
    async fn pingora_http_server_runs_on_an_accepted_mesh_stream() {
        let hour = Duration::from_secs(3600);
        let own_ca = ca::create_ca(&"own.example".parse().unwrap(), hour).unwrap();
        let peer_ca = ca::create_ca(&"peer.example".parse().unwrap(), hour).unwrap();
        let server = material(
            "spiffe://own.example/isthmus/gateway/gw",
            [("own.example", &own_ca), ("peer.example", &peer_ca)],
        );
        let client = material(
            "spiffe://peer.example/isthmus/gateway/caller",
            [("peer.example", &peer_ca), ("own.example", &own_ca)],
        );
        let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::gateways_of([
            "peer.example".parse().unwrap(),
        ])));
        let config = mtls_server_config(&server, policy, vec![b"http/1.1".to_vec()]).unwrap();
        let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
        let acceptor =
            SpiffeAcceptor::new(Arc::new(config), metrics.clone(), Duration::from_secs(5));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let client_task = tokio::spawn(async move {
            let connector = SpiffeConnector::new(
                client,
                metrics,
                Duration::from_secs(5),
                vec![b"http/1.1".to_vec()],
            );
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut tls, _) = connector
                .connect(
                    tcp,
                    ServerName::try_from("outbound_.80_._.web.shop.svc.cluster.local").unwrap(),
                    PeerPolicy::exact("spiffe://own.example/isthmus/gateway/gw".parse().unwrap()),
                )
                .await
                .unwrap();
            tls.write_all(b"GET /cart HTTP/1.1\r\nHost: web.shop\r\n\r\n")
                .await
                .unwrap();
            tls.flush().await.unwrap();
            tls
        });

        let (tcp, _) = listener.accept().await.unwrap();
        let raw: Box<dyn IO> = Box::new(pingora_core::protocols::l4::stream::Stream::from(tcp));
        let mut start = acceptor
            .read_client_hello(HelloRecorder::new(raw))
            .await
            .unwrap();
        start.io.stop_recording();
        let (tls, peer) = acceptor.finish(start).await.unwrap();
        let stream = MeshTlsStream::new(tls, peer.unwrap());
        assert_eq!(
            stream.peer().as_str(),
            "spiffe://peer.example/isthmus/gateway/caller"
        );
        assert_eq!(stream.selected_alpn_proto(), Some(ALPN::H1));
        let digest = stream.get_ssl_digest().unwrap();
        assert_eq!(digest.cert_digest.len(), 32, "SHA-256 of the caller's leaf");
        assert!(digest.version.contains("TLS"), "{}", digest.version);

        let mut session = ServerSession::new_http1(Box::new(stream));
        assert!(session.read_request().await.unwrap());
        assert_eq!(session.req_header().uri.path(), "/cart");
        let ssl = session.digest().and_then(|d| d.ssl_digest.clone()).unwrap();
        assert_eq!(ssl.cert_digest, digest.cert_digest);
        drop(client_task.await.unwrap());
    }
}
