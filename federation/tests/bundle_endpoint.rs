//! SPIFFE federation over real TLS: a bundle endpoint (served here by a small
//! hyper server, as any SPIFFE implementation would) fetched with the
//! `https_spiffe` and `https_web` profiles.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use common::{HOUR, domain, id, serve_tcp, svid, td};
use http::{Response, Uri};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use isthmus_federation::trust::ca::{self, CaMaterial};
use isthmus_federation::trust::endpoint::FetchOutcome;
use isthmus_federation::trust::tls::{crypto_provider, svid_server_config};
use isthmus_federation::trust::{
    BundleEndpoint, BundleError, BundleFetcher, BundleSource, EndpointProfile, FetchError,
    FetchMetrics, TlsMaterial, TrustBundle, TrustStore,
};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const ENDPOINT_ID: &str = "spiffe://remote.example/isthmus/gateway/gw-remote";

/// Serves whatever `doc` holds at any path, over TLS with `config`.
async fn serve(config: ServerConfig, doc: Arc<ArcSwap<String>>) -> std::net::SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    serve_tcp(move |tcp| {
        let (acceptor, doc) = (acceptor.clone(), doc.clone());
        async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |_req| {
                let body = doc.load().as_str().to_owned();
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await
}

fn bundle_json(cas: &[&CaMaterial], sequence: u64, hint_secs: u64) -> String {
    let pem: String = cas.iter().map(|c| c.cert_pem.as_str()).collect();
    TrustBundle::parse(td("remote.example"), pem.as_bytes())
        .unwrap()
        .to_spiffe_json(sequence, Some(Duration::from_secs(hint_secs)))
        .unwrap()
}

#[tokio::test]
async fn https_spiffe_bootstraps_follows_rotation_and_refuses_rollback() {
    let local_ca = ca::create_ca(&td("local.example"), HOUR).unwrap();
    let remote1 = ca::create_ca(&td("remote.example"), HOUR).unwrap();
    let remote2 = ca::create_ca(&td("remote.example"), HOUR).unwrap();

    // The remote endpoint serves with an SVID from its first root.
    let remote_material = TlsMaterial::new(
        svid(&remote1, ENDPOINT_ID),
        TrustStore::default().with(domain("remote.example", &[&remote1])),
        crypto_provider(),
    );
    let doc = Arc::new(ArcSwap::from_pointee(bundle_json(
        &[&remote1, &remote2],
        5,
        1,
    )));
    let addr = serve(svid_server_config(&remote_material).unwrap(), doc.clone()).await;

    // Locally, remote.example starts from a bootstrap bundle (first root only).
    let local = TlsMaterial::new(
        svid(&local_ca, "spiffe://local.example/isthmus/gateway/gw"),
        TrustStore::default()
            .with(domain("local.example", &[&local_ca]))
            .with(domain("remote.example", &[&remote1])),
        crypto_provider(),
    );
    let metrics = FetchMetrics::new(&prometheus::Registry::new()).unwrap();
    let endpoint = |endpoint_id: &str| BundleEndpoint {
        trust_domain: td("remote.example"),
        url: format!("https://127.0.0.1:{}/", addr.port())
            .parse::<Uri>()
            .unwrap(),
        profile: EndpointProfile::HttpsSpiffe {
            endpoint_id: id(endpoint_id),
        },
    };
    let fetcher = BundleFetcher::new(
        local.clone(),
        endpoint(ENDPOINT_ID),
        metrics.clone(),
        Duration::from_secs(300),
        Duration::from_secs(5),
    );

    // First fetch: authenticated with the bootstrap bundle, replaces it.
    assert_eq!(fetcher.fetch_once().await.unwrap(), FetchOutcome::Updated);
    let trust = local.trust();
    let remote = trust.get("remote.example").unwrap();
    assert_eq!(remote.bundle.authorities.len(), 2);
    assert_eq!(remote.bundle.sequence, Some(5));
    assert!(matches!(remote.source, BundleSource::Endpoint(_)));
    // Same sequence again: unchanged.
    assert_eq!(fetcher.fetch_once().await.unwrap(), FetchOutcome::Unchanged);

    // The remote rotates: it now serves with the second root and retires the first.
    remote_material.set_svid(svid(&remote2, ENDPOINT_ID));
    doc.store(Arc::new(bundle_json(&[&remote2], 6, 1)));
    // The fetched bundle (with root 2) authenticates the rotated endpoint.
    assert_eq!(fetcher.fetch_once().await.unwrap(), FetchOutcome::Updated);
    assert_eq!(
        local
            .trust()
            .get("remote.example")
            .unwrap()
            .bundle
            .authorities
            .len(),
        1
    );

    // A replayed older bundle is refused; the current one stays.
    doc.store(Arc::new(bundle_json(&[&remote1, &remote2], 5, 1)));
    let err = fetcher.fetch_once().await.unwrap_err();
    assert!(
        matches!(err, FetchError::Rollback { got: 5, have: 6 }),
        "{err}"
    );
    assert_eq!(
        local.trust().get("remote.example").unwrap().bundle.sequence,
        Some(6)
    );
    assert_eq!(metrics.count("remote.example", "rollback"), 1);

    // A bundle without any sequence cannot replace one that had one.
    let unsequenced = {
        let mut doc: serde_json::Value =
            serde_json::from_str(&bundle_json(&[&remote1, &remote2], 7, 1)).unwrap();
        doc.as_object_mut().unwrap().remove("spiffe_sequence");
        doc.to_string()
    };
    doc.store(Arc::new(unsequenced));
    let err = fetcher.fetch_once().await.unwrap_err();
    assert!(
        matches!(err, FetchError::MissingSequence { have: 6 }),
        "{err}"
    );
    assert_eq!(
        local.trust().get("remote.example").unwrap().bundle.sequence,
        Some(6)
    );
    assert_eq!(metrics.count("remote.example", "rollback"), 2);

    // Garbage from the endpoint: refused, last good bundle kept.
    doc.store(Arc::new("{\"keys\": 7}".to_owned()));
    assert!(matches!(
        fetcher.fetch_once().await.unwrap_err(),
        FetchError::Bundle(_)
    ));
    assert_eq!(
        local.trust().get("remote.example").unwrap().bundle.sequence,
        Some(6)
    );

    // An x509-svid JWK whose "x" is another key's than its certificate's:
    // refused whole (go-jose refuses it too), the last good bundle kept.
    let json = |cas: &[&CaMaterial]| -> serde_json::Value {
        serde_json::from_str(&bundle_json(cas, 7, 1)).unwrap()
    };
    let mut forged = json(&[&remote2]);
    forged["keys"][0]["x"] = json(&[&remote1])["keys"][0]["x"].clone();
    doc.store(Arc::new(forged.to_string()));
    let err = fetcher.fetch_once().await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Bundle(BundleError::KeyMismatch { index: 0, .. })
        ),
        "{err}"
    );
    assert_eq!(
        local.trust().get("remote.example").unwrap().bundle.sequence,
        Some(6)
    );
    assert_eq!(metrics.count("remote.example", "invalid_bundle"), 2);

    // JWT-SVID keys beside the X.509 one, as SPIRE serves them: the bundle is
    // taken, its X.509 authority only.
    let mut spire = json(&[&remote2]);
    let mut jwt_key = json(&[&remote1])["keys"][0].clone();
    let jwt = jwt_key.as_object_mut().unwrap();
    jwt.remove("x5c");
    jwt.insert("use".into(), "jwt-svid".into());
    jwt.insert("kid".into(), "C6vs25welZOx6WksNYfbMfiw9l96pMnD".into());
    spire["keys"].as_array_mut().unwrap().insert(0, jwt_key);
    doc.store(Arc::new(spire.to_string()));
    assert_eq!(fetcher.fetch_once().await.unwrap(), FetchOutcome::Updated);
    let taken = local.trust().get("remote.example").unwrap().bundle.clone();
    assert_eq!(taken.sequence, Some(7));
    assert_eq!(
        taken.authorities,
        domain("remote.example", &[&remote2]).bundle.authorities
    );

    // An endpoint that is not the configured SPIFFE ID is refused at TLS.
    let wrong = BundleFetcher::new(
        local.clone(),
        endpoint("spiffe://remote.example/other"),
        metrics.clone(),
        Duration::from_secs(300),
        Duration::from_secs(5),
    );
    doc.store(Arc::new(bundle_json(&[&remote2], 7, 1)));
    assert!(matches!(
        wrong.fetch_once().await.unwrap_err(),
        FetchError::Tls(_)
    ));
    assert_eq!(metrics.count("remote.example", "tls_error"), 1);
    assert_eq!(metrics.count("remote.example", "updated"), 3);
}

#[tokio::test]
async fn the_fetch_loop_honours_the_refresh_hint() {
    let local_ca = ca::create_ca(&td("local.example"), HOUR).unwrap();
    let remote = ca::create_ca(&td("remote.example"), HOUR).unwrap();
    let remote_material = TlsMaterial::new(
        svid(&remote, ENDPOINT_ID),
        TrustStore::default().with(domain("remote.example", &[&remote])),
        crypto_provider(),
    );
    let doc = Arc::new(ArcSwap::from_pointee(bundle_json(&[&remote], 1, 1)));
    let addr = serve(svid_server_config(&remote_material).unwrap(), doc.clone()).await;
    let local = TlsMaterial::new(
        svid(&local_ca, "spiffe://local.example/isthmus/gateway/gw"),
        TrustStore::default().with(domain("remote.example", &[&remote])),
        crypto_provider(),
    );
    let metrics = FetchMetrics::new(&prometheus::Registry::new()).unwrap();
    let fetcher = BundleFetcher::new(
        local.clone(),
        BundleEndpoint {
            trust_domain: td("remote.example"),
            url: format!("https://127.0.0.1:{}/bundle", addr.port())
                .parse()
                .unwrap(),
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_id: id(ENDPOINT_ID),
            },
        },
        metrics.clone(),
        // Without the 1 s hint, the next fetch would be an hour away.
        Duration::from_secs(3600),
        Duration::from_secs(5),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(fetcher.run(stop_rx));
    let seq = || local.trust().get("remote.example").unwrap().bundle.sequence;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seq() != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "first fetch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doc.store(Arc::new(bundle_json(&[&remote], 2, 1)));
    while seq() != Some(2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refetch after the 1 s hint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn https_web_checks_the_host_name_against_web_roots() {
    // A Web PKI CA and a server certificate for "localhost".
    let web_key = rcgen::KeyPair::generate().unwrap();
    let mut web_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    web_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let web_ca = web_params.self_signed(&web_key).unwrap();
    let issuer = rcgen::Issuer::new(web_params, web_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    let remote = ca::create_ca(&td("remote.example"), HOUR).unwrap();
    let doc = Arc::new(ArcSwap::from_pointee(bundle_json(&[&remote], 1, 60)));
    let addr = serve(config, doc).await;

    let local_ca = ca::create_ca(&td("local.example"), HOUR).unwrap();
    let local = TlsMaterial::new(
        svid(&local_ca, "spiffe://local.example/isthmus/gateway/gw"),
        TrustStore::default(),
        crypto_provider(),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(web_ca.der().to_vec()))
        .unwrap();
    let roots = Arc::new(roots);
    let metrics = FetchMetrics::new(&prometheus::Registry::new()).unwrap();
    let fetch = |host: &str| {
        BundleFetcher::new(
            local.clone(),
            BundleEndpoint {
                trust_domain: td("remote.example"),
                url: format!("https://{host}:{}/", addr.port()).parse().unwrap(),
                profile: EndpointProfile::HttpsWeb {
                    roots: roots.clone(),
                },
            },
            metrics.clone(),
            Duration::from_secs(300),
            Duration::from_secs(5),
        )
    };
    // By an IP address the certificate does not name: refused.
    assert!(matches!(
        fetch("127.0.0.1").fetch_once().await.unwrap_err(),
        FetchError::Tls(_)
    ));
    // By the name it carries: accepted, no bootstrap bundle needed.
    assert_eq!(
        fetch("localhost").fetch_once().await.unwrap(),
        FetchOutcome::Updated
    );
    assert_eq!(
        local.trust().get("remote.example").unwrap().bundle.sequence,
        Some(1)
    );
}
