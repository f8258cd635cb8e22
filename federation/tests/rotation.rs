//! Rotation under traffic: the trust domain's root is rotated (overlap, new SVID,
//! old root retired) through file changes picked up by the watcher, while an
//! established connection keeps exchanging messages. New handshakes follow the
//! new material; corrupted replacement files change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::{HOUR, domain, id, serve_tcp, svid, td};
use isthmus_federation::trust::ca::{self, CaMaterial};
use isthmus_federation::trust::tls::{crypto_provider, mtls_server_config};
use isthmus_federation::trust::{
    BundleFile, BundleRole, FileMaterial, HandshakeMetrics, MaterialFiles, MaterialMetrics,
    PeerPolicy, SpiffeAcceptor, SpiffeConnector, Svid, TlsMaterial, TrustStore,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVER_ID: &str = "spiffe://a.example/isthmus/gateway/server";
const CLIENT_ID: &str = "spiffe://b.example/isthmus/gateway/client";

/// Writes like real tools do: a temporary file renamed over the target.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `cond` until it holds, or fails after 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client of b.example whose view of a.example's bundle is `a_roots`.
fn client(b: &CaMaterial, a_roots: &[&CaMaterial], metrics: &HandshakeMetrics) -> SpiffeConnector {
    let store = TrustStore::default()
        .with(domain("a.example", a_roots))
        .with(domain("b.example", &[b]));
    let material = TlsMaterial::new(svid(b, CLIENT_ID), store, crypto_provider());
    SpiffeConnector::new(material, metrics.clone(), Duration::from_secs(5), vec![])
}

async fn handshake(connector: &SpiffeConnector, addr: std::net::SocketAddr) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let sni = ServerName::try_from("outbound_.80_._.svc.ns.svc.cluster.local").unwrap();
    let (mut tls, _) = connector
        .connect(tcp, sni, PeerPolicy::exact(id(SERVER_ID)))
        .await
        .map_err(|e| e.result.label().to_owned())?;
    // The server may still refuse our certificate after the client side finished.
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_mid_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca::create_ca(&td("a.example"), HOUR).unwrap();
    let ca2 = ca::create_ca(&td("a.example"), HOUR).unwrap();
    let cab = ca::create_ca(&td("b.example"), HOUR).unwrap();
    let (bundle_a, bundle_b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
    let (svid_cert, svid_key) = (dir.path().join("svid.crt"), dir.path().join("svid.key"));
    std::fs::write(&bundle_a, &ca1.cert_pem).unwrap();
    std::fs::write(&bundle_b, &cab.cert_pem).unwrap();
    let svid1 = ca::issue_svid(&ca1, &id(SERVER_ID), HOUR).unwrap();
    std::fs::write(&svid_cert, &svid1.cert_pem).unwrap();
    std::fs::write(&svid_key, &svid1.key_pem).unwrap();

    let registry = prometheus::Registry::new();
    let files = MaterialFiles {
        svid_cert: svid_cert.clone(),
        svid_key: svid_key.clone(),
        expected_id: id(SERVER_ID),
        bundles: vec![
            BundleFile {
                trust_domain: td("a.example"),
                path: bundle_a.clone(),
                field: "identity.bundle".into(),
                role: BundleRole::Static,
            },
            BundleFile {
                trust_domain: td("b.example"),
                path: bundle_b.clone(),
                field: "trust.federated[0].bundle".into(),
                role: BundleRole::Static,
            },
        ],
    };
    let fm = FileMaterial::load(
        files,
        crypto_provider(),
        MaterialMetrics::new(&registry).unwrap(),
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(fm.clone().watch(stop_rx));

    // Server: trusts a.example (own) and b.example; allows both domains.
    let policy = Arc::new(ArcSwap::from_pointee(PeerPolicy::new(
        [],
        [td("a.example"), td("b.example")],
    )));
    let config = mtls_server_config(fm.material(), policy, vec![]).unwrap();
    let server_metrics = HandshakeMetrics::new(&registry).unwrap();
    let acceptor = SpiffeAcceptor::new(
        Arc::new(config),
        server_metrics.clone(),
        Duration::from_secs(5),
    );
    let addr = serve_tcp(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok((mut tls, _)) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 4];
                while tls.read_exact(&mut buf).await.is_ok() {
                    if tls.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;

    // An established connection from b.example that pings throughout.
    let metrics = HandshakeMetrics::new(&prometheus::Registry::new()).unwrap();
    let old_view = client(&cab, &[&ca1], &metrics);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut live, _) = old_view
        .connect(
            tcp,
            ServerName::try_from("svc").unwrap(),
            PeerPolicy::exact(id(SERVER_ID)),
        )
        .await
        .unwrap();
    let pings = Arc::new(AtomicU64::new(0));
    let pinger = tokio::spawn({
        let pings = pings.clone();
        async move {
            let mut buf = [0u8; 4];
            loop {
                live.write_all(b"ping")
                    .await
                    .expect("established connection broke");
                live.read_exact(&mut buf)
                    .await
                    .expect("established connection broke");
                pings.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let pings_now = || pings.load(Ordering::SeqCst);
    eventually("first pings", || pings_now() > 3).await;

    let material = fm.material().clone();
    let a_authorities = || {
        material
            .trust()
            .get("a.example")
            .unwrap()
            .bundle
            .authorities
            .len()
    };

    // 1. Publish the new root beside the old one.
    replace(&bundle_a, &format!("{}{}", ca1.cert_pem, ca2.cert_pem));
    eventually("overlap bundle applied", || a_authorities() == 2).await;

    // 2. Switch the server to an SVID from the new root.
    let old_fp = material.svid().fingerprint.clone();
    let svid2 = ca::issue_svid(&ca2, &id(SERVER_ID), HOUR).unwrap();
    replace(&svid_key, &svid2.key_pem);
    replace(&svid_cert, &svid2.cert_pem);
    eventually("new SVID applied", || material.svid().fingerprint != old_fp).await;
    // New handshakes need the new root on the client side...
    assert_eq!(
        handshake(&old_view, addr).await,
        Err("bad_signature".to_owned())
    );
    let new_view = client(&cab, &[&ca2], &metrics);
    assert_eq!(handshake(&new_view, addr).await, Ok(()));

    // 3. Retire the old root: a.example workloads with old-root SVIDs are refused.
    replace(&bundle_a, &ca2.cert_pem);
    eventually("old root retired", || a_authorities() == 1).await;
    let old_workload = ca::issue_svid(&ca1, &id("spiffe://a.example/app"), HOUR).unwrap();
    let new_workload = ca::issue_svid(&ca2, &id("spiffe://a.example/app"), HOUR).unwrap();
    for (workload, want) in [(&old_workload, false), (&new_workload, true)] {
        let provider = crypto_provider();
        let svid = Svid::from_pem(
            workload.cert_pem.as_bytes(),
            workload.key_pem.as_bytes(),
            None,
            &provider,
        )
        .unwrap();
        let store = TrustStore::default().with(domain("a.example", &[&ca2]));
        let c = SpiffeConnector::new(
            TlsMaterial::new(svid, store, provider),
            metrics.clone(),
            Duration::from_secs(5),
            vec![],
        );
        assert_eq!(
            handshake(&c, addr).await.is_ok(),
            want,
            "workload with new root: {want}"
        );
    }

    // 4. Corrupted replacements change nothing, and are counted.
    let fp = material.svid().fingerprint.clone();
    let errors_before = (
        fm.metrics().reload_errors("bundle"),
        fm.metrics().reload_errors("svid"),
    );
    replace(
        &bundle_a,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    eventually("bad bundle counted", || {
        fm.metrics().reload_errors("bundle") > errors_before.0
    })
    .await;
    replace(&svid_cert, "garbage");
    eventually("bad SVID counted", || {
        fm.metrics().reload_errors("svid") > errors_before.1
    })
    .await;
    assert_eq!(material.svid().fingerprint, fp);
    assert_eq!(a_authorities(), 1);
    assert_eq!(handshake(&new_view, addr).await, Ok(()));
    // A key that does not belong to the certificate is refused too.
    replace(
        &svid_cert,
        &ca::issue_svid(&ca2, &id(SERVER_ID), HOUR).unwrap().cert_pem,
    );
    eventually("mismatched key counted", || {
        fm.metrics().reload_errors("svid") > errors_before.1 + 1
    })
    .await;
    assert_eq!(material.svid().fingerprint, fp);

    // The established connection never stopped.
    let before = pings_now();
    eventually("pings continue", || pings_now() > before + 3).await;
    assert!(!pinger.is_finished(), "the established connection broke");
    pinger.abort();
    stop_tx.send(true).unwrap();
    watcher.await.unwrap();
}
