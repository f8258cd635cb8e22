//! The east-west listener reads a ClientHello from anyone who can reach it,
//! before any authentication, to route passthrough services by SNI. Any bytes,
//! arriving in reads of any size, must give a ClientHello or a counted refusal,
//! never a panic; an accepted hello's recording (what a passthrough endpoint is
//! sent) must be exactly the bytes the client sent, and the SNI route must name
//! an exported port of the service the SNI spells.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_federation::Catalog;
use isthmus_federation::catalog::{
    Protocol, ServiceEntry, ServicePort, east_west_sni, parse_east_west_sni,
};
use isthmus_federation::trust::tls::mtls_server_config;
use isthmus_federation::trust::{HandshakeMetrics, PeerPolicy, SpiffeAcceptor, ca};
use isthmus_gateway::mesh::{HelloRecorder, MAX_CLIENT_HELLO};
use isthmus_gateway::proxy::east_west::sni_target;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Read sizes the client's bytes arrive in, in turn: record headers and
/// handshake headers get split across reads as well as arriving whole.
const READS: [usize; 7] = [1, 4, 2, 1500, 3, 64, 16 * 1024];

/// A client that sends `data` in reads of [`READS`] sizes, then closes.
struct Client<'a> {
    data: &'a [u8],
    sent: usize,
    reads: usize,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = READS[self.reads % READS.len()].min(buf.remaining());
        let end = (self.sent + want).min(self.data.len());
        buf.put_slice(&self.data[self.sent..end]);
        self.sent = end;
        self.reads += 1;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct Listener {
    runtime: tokio::runtime::Runtime,
    acceptor: SpiffeAcceptor,
    catalog: Catalog,
}

/// The acceptor of a gateway of own.example, and a catalog with an exported
/// HTTP service (shop/web:8080), an exported passthrough TCP service
/// (data/db:5432) and a service that is not exported (shop/private:80).
fn listener() -> &'static Listener {
    static LISTENER: OnceLock<Listener> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let hour = Duration::from_secs(3600);
        let own = ca::create_ca(&"own.example".parse().expect("td"), hour).expect("ca");
        let material = ca::dev_material(
            &own,
            &"spiffe://own.example/isthmus/gateway/gw"
                .parse()
                .expect("id"),
            &[("own.example", &own)],
            hour,
        )
        .expect("material");
        let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::gateways_of([
            "own.example".parse().expect("td"),
        ])));
        let config = mtls_server_config(&material, policy, vec![b"h2".to_vec()]).expect("config");
        let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let acceptor = SpiffeAcceptor::new(Arc::new(config), metrics, Duration::from_secs(5));
        let entry = |key: &str, port: u16, protocol, exported, passthrough| ServiceEntry {
            ports: vec![ServicePort {
                port,
                protocol,
                name: None,
            }],
            exported,
            passthrough,
            ..ServiceEntry::exported(key.parse().expect("key"))
        };
        let catalog = Catalog::new([
            entry("shop/web", 8080, Protocol::Http, true, false),
            entry("data/db", 5432, Protocol::Tcp, true, true),
            entry("shop/private", 80, Protocol::Http, false, false),
        ]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        Listener {
            runtime,
            acceptor,
            catalog,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let l = listener();
    let client = Client {
        data,
        sent: 0,
        reads: 0,
    };
    let Ok(start) = l
        .runtime
        .block_on(l.acceptor.read_client_hello(HelloRecorder::new(client)))
    else {
        return;
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let (recorded, client) = start.io.into_parts();
    assert_eq!(recorded.len(), client.sent, "every byte read is recorded");
    assert_eq!(
        recorded,
        data[..recorded.len()],
        "the replay is what was sent"
    );
    assert!(recorded.len() <= MAX_CLIENT_HELLO);

    let Some(sni) = sni else {
        assert!(sni_target(&l.catalog, None).is_none());
        return;
    };
    if let Some(target) = parse_east_west_sni(&sni) {
        let again = parse_east_west_sni(&east_west_sni(
            &target.key,
            target.port,
            target.subset.as_deref(),
        ))
        .expect("own spelling parses");
        assert_eq!(again, target);
    }
    if let Some((entry, port)) = sni_target(&l.catalog, Some(&sni)) {
        let target = parse_east_west_sni(&sni).expect("routed SNIs parse");
        assert_eq!((&entry.key, port), (&target.key, target.port));
        assert!(entry.exported, "only exported services are routed");
        assert!(entry.port(Some(port)).is_some());
    }
});
