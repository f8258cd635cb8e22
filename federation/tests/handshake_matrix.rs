//! The handshake matrix: real TCP, real rustls peers, one server. Every bad client
//! certificate is rejected with its own reason, counted, and the server keeps
//! accepting valid peers after each.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use common::{HOUR, id, serve_tcp, store, svid, td};
use isthmus_federation::trust::ca::{self, CaMaterial, KeyUsagePurpose, LeafSpec};
use isthmus_federation::trust::tls::{SpiffeServerVerifier, crypto_provider, mtls_server_config};
use isthmus_federation::trust::{
    HandshakeMetrics, PeerPolicy, SpiffeAcceptor, SpiffeConnector, TlsMaterial,
};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

struct Pki {
    a: CaMaterial,
    b: CaMaterial,
    evil: CaMaterial,
    rogue_a: CaMaterial,
}

impl Pki {
    fn new() -> Self {
        Self {
            a: ca::create_ca(&td("a.example"), HOUR).unwrap(),
            b: ca::create_ca(&td("b.example"), HOUR).unwrap(),
            evil: ca::create_ca(&td("evil.example"), HOUR).unwrap(),
            // A CA nobody trusts that claims to issue for a.example.
            rogue_a: ca::create_ca(&td("a.example"), HOUR).unwrap(),
        }
    }
}

/// A certificate and its key, PEM.
type CertAndKey = (String, String);

const SERVER_ID: &str = "spiffe://a.example/isthmus/gateway/server";
const PEER_B: &str = "spiffe://b.example/isthmus/gateway/gw-b";

/// Starts the server: trusts a.example and b.example; allows gw-b exactly and
/// all of a.example. Reports each handshake's result label.
async fn start_server(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    HandshakeMetrics,
    mpsc::UnboundedReceiver<String>,
) {
    let material = TlsMaterial::new(
        svid(&pki.a, SERVER_ID),
        store(&[("a.example", &pki.a), ("b.example", &pki.b)]),
        crypto_provider(),
    );
    let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::new(
        [id(PEER_B)],
        [td("a.example")],
    )));
    let config = mtls_server_config(&material, policy, vec![]).unwrap();
    let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
    let acceptor = SpiffeAcceptor::new(Arc::new(config), metrics.clone(), Duration::from_secs(5));
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve_tcp(move |tcp| {
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        async move {
            match acceptor.accept(tcp).await {
                Ok((mut tls, peer)) => {
                    let _ = tx.send(format!("ok {}", peer.unwrap()));
                    // Echo one message so the client sees a working channel.
                    let mut buf = [0u8; 64];
                    if let Ok(n) = tls.read(&mut buf).await {
                        let _ = tls.write_all(&buf[..n]).await;
                        let _ = tls.flush().await;
                    }
                }
                Err(e) => {
                    let _ = tx.send(e.result.label().to_owned());
                }
            }
        }
    })
    .await;
    (addr, metrics, rx)
}

/// A client presenting `cert_pem`/`key_pem` (or nothing), verifying the server
/// as SERVER_ID against a.example's real bundle.
fn client_config(pki: &Pki, client: Option<(&str, &str)>) -> ClientConfig {
    let provider = crypto_provider();
    let material = TlsMaterial::new(
        svid(&pki.a, "spiffe://a.example/client-trust-only"),
        store(&[("a.example", &pki.a)]),
        provider.clone(),
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            material,
            PeerPolicy::exact(id(SERVER_ID)),
        )));
    match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

/// Connects with `config`, tries one echo, returns what the server recorded.
async fn attempt(
    addr: std::net::SocketAddr,
    config: ClientConfig,
    results: &mut mpsc::UnboundedReceiver<String>,
) -> (String, bool) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let echoed = match connector
        .connect(
            ServerName::try_from("outbound_.443_._.svc.ns.svc.cluster.local").unwrap(),
            tcp,
        )
        .await
    {
        Ok(mut tls) => {
            // In TLS 1.3 the client finishes first; a rejection arrives as an alert.
            let ok = tls.write_all(b"ping").await.is_ok() && tls.flush().await.is_ok();
            let mut buf = [0u8; 4];
            ok && tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok())
                && &buf == b"ping"
        }
        Err(_) => false,
    };
    let result = tokio::time::timeout(Duration::from_secs(5), results.recv())
        .await
        .expect("server reports every handshake")
        .unwrap();
    (result, echoed)
}

fn leaf(
    ca: &CaMaterial,
    uris: &[&str],
    not_before: SystemTime,
    not_after: SystemTime,
) -> (String, String) {
    let issued = ca::issue_leaf(
        ca,
        &LeafSpec {
            uris: uris.iter().map(|s| (*s).to_owned()).collect(),
            not_before,
            not_after,
            is_ca: false,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
        },
    )
    .unwrap();
    (issued.cert_pem, issued.key_pem)
}

/// A leaf for `spiffe_id` from `ca` with `key_usages` (and `is_ca`): valid in
/// every other way, so only the X509-SVID leaf check can refuse it.
fn leaf_with(
    ca: &CaMaterial,
    spiffe_id: &str,
    is_ca: bool,
    key_usages: Vec<KeyUsagePurpose>,
) -> CertAndKey {
    let issued = ca::issue_leaf(
        ca,
        &LeafSpec {
            is_ca,
            key_usages,
            ..LeafSpec::svid(&id(spiffe_id), HOUR)
        },
    )
    .unwrap();
    (issued.cert_pem, issued.key_pem)
}

#[tokio::test]
async fn every_bad_client_is_rejected_counted_and_the_server_keeps_serving() {
    let pki = Pki::new();
    let (addr, metrics, mut results) = start_server(&pki).await;
    let now = SystemTime::now();
    let valid = leaf(&pki.b, &[PEER_B], now - HOUR, now + HOUR);

    use KeyUsagePurpose::{CrlSign, DigitalSignature, KeyCertSign, KeyEncipherment};
    let ca_leaf = leaf_with(&pki.b, PEER_B, true, vec![DigitalSignature]);

    let cases: Vec<(&str, Option<CertAndKey>, &str)> = vec![
        (
            "unknown CA",
            Some(leaf(&pki.evil, &[PEER_B], now - HOUR, now + HOUR)),
            "unknown_ca",
        ),
        (
            "unknown CA with the trusted CA's name",
            Some(leaf(
                &pki.rogue_a,
                &["spiffe://a.example/workload"],
                now - HOUR,
                now + HOUR,
            )),
            "bad_signature",
        ),
        (
            "expired",
            Some(leaf(&pki.b, &[PEER_B], now - 3 * HOUR, now - HOUR)),
            "expired",
        ),
        (
            "not yet valid",
            Some(leaf(&pki.b, &[PEER_B], now + HOUR, now + 3 * HOUR)),
            "not_yet_valid",
        ),
        (
            "trust domain without a bundle",
            Some(leaf(
                &pki.evil,
                &["spiffe://evil.example/isthmus/gateway/x"],
                now - HOUR,
                now + HOUR,
            )),
            "unknown_trust_domain",
        ),
        (
            "b's CA issuing an a.example identity",
            Some(leaf(
                &pki.b,
                &["spiffe://a.example/isthmus/gateway/impostor"],
                now - HOUR,
                now + HOUR,
            )),
            "unknown_ca",
        ),
        (
            "authenticated but not authorised",
            Some(leaf(
                &pki.b,
                &["spiffe://b.example/isthmus/gateway/other"],
                now - HOUR,
                now + HOUR,
            )),
            "unauthorized",
        ),
        ("no client certificate", None, "no_client_cert"),
        (
            "two URI SANs",
            Some(leaf(
                &pki.b,
                &[PEER_B, "spiffe://b.example/second"],
                now - HOUR,
                now + HOUR,
            )),
            "multiple_uri_sans",
        ),
        (
            "no URI SAN",
            Some(leaf(&pki.b, &[], now - HOUR, now + HOUR)),
            "no_uri_san",
        ),
        (
            "URI SAN that is not a SPIFFE ID",
            Some(leaf(
                &pki.b,
                &["https://b.example/gw"],
                now - HOUR,
                now + HOUR,
            )),
            "bad_spiffe_id",
        ),
        // X509-SVID §4.1/§4.3/§5.2, each from the trusted CA for an allowed ID.
        ("CA certificate used as a leaf", Some(ca_leaf), "leaf_is_ca"),
        (
            "leaf with keyCertSign",
            Some(leaf_with(
                &pki.b,
                PEER_B,
                false,
                vec![DigitalSignature, KeyCertSign],
            )),
            "leaf_signing_key_usage",
        ),
        (
            "leaf with cRLSign",
            Some(leaf_with(
                &pki.b,
                PEER_B,
                false,
                vec![DigitalSignature, CrlSign],
            )),
            "leaf_signing_key_usage",
        ),
        (
            "leaf without digitalSignature",
            Some(leaf_with(&pki.b, PEER_B, false, vec![KeyEncipherment])),
            "leaf_no_digital_signature",
        ),
        (
            "leaf without a keyUsage extension",
            Some(leaf_with(&pki.b, PEER_B, false, vec![])),
            "leaf_no_digital_signature",
        ),
        (
            "leaf whose SPIFFE ID has no path",
            Some(leaf(
                &pki.b,
                &["spiffe://b.example"],
                now - HOUR,
                now + HOUR,
            )),
            "bad_spiffe_id",
        ),
    ];

    // A valid peer first.
    let (result, echoed) = attempt(
        addr,
        client_config(&pki, Some((&valid.0, &valid.1))),
        &mut results,
    )
    .await;
    assert_eq!(result, format!("ok {PEER_B}"));
    assert!(echoed);

    for (name, cert, want) in &cases {
        let config = client_config(&pki, cert.as_ref().map(|(c, k)| (c.as_str(), k.as_str())));
        let (result, echoed) = attempt(addr, config, &mut results).await;
        assert_eq!(result, *want, "case {name:?}");
        assert!(
            !echoed,
            "case {name:?}: a rejected client must not get data through"
        );
        // ...and a valid peer still gets in right after.
        let (result, echoed) = attempt(
            addr,
            client_config(&pki, Some((&valid.0, &valid.1))),
            &mut results,
        )
        .await;
        assert_eq!(result, format!("ok {PEER_B}"), "after case {name:?}");
        assert!(echoed, "after case {name:?}");
    }

    // A workload of the server's own trust domain is allowed by the domain rule.
    let own = leaf(
        &pki.a,
        &["spiffe://a.example/ns/default/sa/app"],
        now - HOUR,
        now + HOUR,
    );
    let (result, _) = attempt(
        addr,
        client_config(&pki, Some((&own.0, &own.1))),
        &mut results,
    )
    .await;
    assert_eq!(result, "ok spiffe://a.example/ns/default/sa/app");

    // Every outcome was counted under its own label.
    assert_eq!(metrics.count("server", "ok"), cases.len() as u64 + 2);
    for (name, _, want) in &cases {
        let expected = cases.iter().filter(|(_, _, w)| w == want).count() as u64;
        assert_eq!(
            metrics.count("server", want),
            expected,
            "label {want} ({name})"
        );
    }

    // Garbage instead of a ClientHello is rejected too, and counted.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), results.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result, "malformed");
}

#[tokio::test]
async fn the_client_side_accepts_only_the_expected_peer() {
    let pki = Pki::new();
    let (addr, metrics_server, mut results) = start_server(&pki).await;
    let provider = crypto_provider();
    // The client is gw-b, trusting both domains.
    let material = TlsMaterial::new(
        svid(&pki.b, PEER_B),
        store(&[("a.example", &pki.a), ("b.example", &pki.b)]),
        provider,
    );
    let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
    let connector = SpiffeConnector::new(material, metrics.clone(), Duration::from_secs(5), vec![]);
    let sni = ServerName::try_from("outbound_.8080_._.echo.default.svc.cluster.local").unwrap();

    // Expecting the right ID: connected, and the SNI name did not get in the way.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (_tls, peer) = connector
        .connect(tcp, sni.clone(), PeerPolicy::exact(id(SERVER_ID)))
        .await
        .unwrap();
    assert_eq!(peer.as_str(), SERVER_ID);
    assert_eq!(results.recv().await.unwrap(), format!("ok {PEER_B}"));

    // Expecting another gateway of the same trust domain: refused by the client.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = connector
        .connect(
            tcp,
            sni.clone(),
            PeerPolicy::exact(id("spiffe://a.example/isthmus/gateway/other")),
        )
        .await
        .unwrap_err();
    assert_eq!(err.result.label(), "unauthorized");
    assert_eq!(metrics.count("client", "unauthorized"), 1);
    // The server sees the client's alert.
    assert_eq!(results.recv().await.unwrap(), "peer_rejected");

    // A server whose CA the client does not know for its domain: refused.
    let stranger = TlsMaterial::new(
        svid(&pki.b, PEER_B),
        store(&[("a.example", &pki.rogue_a), ("b.example", &pki.b)]),
        crypto_provider(),
    );
    let connector = SpiffeConnector::new(stranger, metrics.clone(), Duration::from_secs(5), vec![]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = connector
        .connect(tcp, sni, PeerPolicy::exact(id(SERVER_ID)))
        .await
        .unwrap_err();
    assert_eq!(err.result.label(), "bad_signature");
    assert_eq!(metrics.count("client", "ok"), 1);
    assert!(metrics_server.count("server", "ok") >= 1);
}

/// A bare rustls server presenting `cert` (bypassing this crate's own SVID
/// check, as a misbehaving peer would), answering one echo per connection.
async fn raw_server(cert: &CertAndKey) -> std::net::SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            CertificateDer::pem_slice_iter(cert.0.as_bytes())
                .map(Result::unwrap)
                .collect(),
            PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    serve_tcp(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 64];
                if let Ok(n) = tls.read(&mut buf).await {
                    let _ = tls.write_all(&buf[..n]).await;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn the_client_side_refuses_a_server_leaf_that_is_not_an_svid_leaf() {
    use KeyUsagePurpose::{CrlSign, DigitalSignature, KeyCertSign, KeyEncipherment};
    let pki = Pki::new();
    let material = TlsMaterial::new(
        svid(&pki.b, PEER_B),
        store(&[("a.example", &pki.a), ("b.example", &pki.b)]),
        crypto_provider(),
    );
    let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
    let connector = SpiffeConnector::new(material, metrics.clone(), Duration::from_secs(5), vec![]);
    let sni = ServerName::try_from("outbound_.8080_._.echo.default.svc.cluster.local").unwrap();
    let connect = |addr| {
        let (connector, sni) = (connector.clone(), sni.clone());
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector
                .connect(tcp, sni, PeerPolicy::exact(id(SERVER_ID)))
                .await
        }
    };
    // The expected server, with a conforming SVID: connected and echoing.
    let good = raw_server(&leaf_with(&pki.a, SERVER_ID, false, vec![DigitalSignature])).await;
    let cases = [
        (vec![DigitalSignature], true, "leaf_is_ca"),
        (
            vec![DigitalSignature, KeyCertSign],
            false,
            "leaf_signing_key_usage",
        ),
        (
            vec![DigitalSignature, CrlSign],
            false,
            "leaf_signing_key_usage",
        ),
        (vec![KeyEncipherment], false, "leaf_no_digital_signature"),
    ];
    for (key_usages, is_ca, want) in cases {
        // Issued by the right CA for exactly the expected ID: only the leaf
        // check stands between this server and an authenticated channel.
        let bad = raw_server(&leaf_with(&pki.a, SERVER_ID, is_ca, key_usages)).await;
        let err = connect(bad).await.unwrap_err();
        assert_eq!(err.result.label(), want, "{}", err.message);
        let (mut tls, peer) = connect(good).await.unwrap();
        assert_eq!(peer.as_str(), SERVER_ID);
        tls.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    assert_eq!(metrics.count("client", "leaf_is_ca"), 1);
    assert_eq!(metrics.count("client", "leaf_signing_key_usage"), 2);
    assert_eq!(metrics.count("client", "leaf_no_digital_signature"), 1);
    assert_eq!(metrics.count("client", "ok"), 4);
}

#[test]
fn our_own_svid_must_be_an_svid_leaf_too() {
    use KeyUsagePurpose::{DigitalSignature, KeyCertSign, KeyEncipherment};
    let pki = Pki::new();
    let load = |(cert, key): CertAndKey| {
        isthmus_federation::trust::Svid::from_pem(
            cert.as_bytes(),
            key.as_bytes(),
            Some(&id(SERVER_ID)),
            &crypto_provider(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    load(leaf_with(&pki.a, SERVER_ID, false, vec![DigitalSignature])).unwrap();
    let err = load(leaf_with(&pki.a, SERVER_ID, true, vec![DigitalSignature])).unwrap_err();
    assert!(err.contains("CA:TRUE"), "{err}");
    let err = load(leaf_with(
        &pki.a,
        SERVER_ID,
        false,
        vec![DigitalSignature, KeyCertSign],
    ))
    .unwrap_err();
    assert!(err.contains("keyCertSign"), "{err}");
    let err = load(leaf_with(&pki.a, SERVER_ID, false, vec![KeyEncipherment])).unwrap_err();
    assert!(err.contains("digitalSignature"), "{err}");
}
