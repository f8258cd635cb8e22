//! Attacks on SVID conformance and the development PKI, against the real binary.
//!
//! - A peer whose certificate the trusted CA did issue, for an allowed SPIFFE ID,
//!   but which is not an X509-SVID leaf (CA:TRUE, keyCertSign, no
//!   digitalSignature) is refused on the east-west listener, each refusal counted
//!   under its own label and logged, while a real peer gateway's traffic and a
//!   conforming client keep going through the same listener.
//! - Our own SVID failing the same check is an `identity.cert` error at start
//!   and on reload (the old SVID stays, traffic goes on).
//! - `isthmus ca` issues X509-SVID-shaped certificates (checked by openssl) and
//!   writes keys 0600 even over an existing 0644 key.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test reports failure

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use isthmus_federation::trust::ca::{self, CaMaterial, KeyUsagePurpose, LeafSpec};
use isthmus_federation::trust::tls::{SpiffeServerVerifier, crypto_provider};
use isthmus_federation::trust::{
    BundleSource, DomainTrust, PeerPolicy, Svid, TlsMaterial, TrustBundle, TrustStore,
};
use isthmus_federation::{SpiffeId, TrustDomain};
use isthmus_tests::two_clusters::{GW_A, GW_B, TwoClusters, tcp_exchange};
use isthmus_tests::{
    DevPki, Gateway, check_config, free_addr, gateway_config, isthmus, metric_sum, replace_file,
    tcp_echo, wait_for,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const START: Duration = Duration::from_secs(20);
/// B's exported TCP service shop/db, as a peer gateway names it.
const DB_SNI: &str = "outbound_.5432_._.db.shop.svc.cluster.local";

fn read_ca(dir: &Path) -> CaMaterial {
    CaMaterial {
        cert_pem: std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
        key_pem: std::fs::read_to_string(dir.join("ca.key")).unwrap(),
    }
}

/// A leaf for gw-a's own SPIFFE ID from a.example's real CA, with `key_usages`
/// and `is_ca`: everything else about it is right, so only the X509-SVID leaf
/// check can tell it from gw-a's SVID.
fn gw_a_leaf(ca: &CaMaterial, is_ca: bool, key_usages: Vec<KeyUsagePurpose>) -> (String, String) {
    let id: SpiffeId = GW_A.parse().unwrap();
    let issued = ca::issue_leaf(
        ca,
        &LeafSpec {
            is_ca,
            key_usages,
            ..LeafSpec::svid(&id, Duration::from_secs(3600))
        },
    )
    .unwrap();
    (issued.cert_pem, issued.key_pem)
}

/// A TLS client to B's east-west listener presenting `cert` and authenticating
/// B as gw-b with b.example's bundle (the way a peer gateway does).
struct PeerClient {
    config: Arc<rustls::ClientConfig>,
}

impl PeerClient {
    fn new(b_bundle: &Path, own: &(String, String), cert: &(String, String)) -> Self {
        let provider = crypto_provider();
        let td: TrustDomain = "b.example".parse().unwrap();
        let bundle = TrustBundle::parse(td, &std::fs::read(b_bundle).unwrap()).unwrap();
        let domain = DomainTrust::new(bundle, BundleSource::File("b".into()), &provider).unwrap();
        // The verifier reads trust from TlsMaterial, which needs an SVID of ours;
        // the certificate presented is `cert`, set below.
        let svid = Svid::from_pem(own.0.as_bytes(), own.1.as_bytes(), None, &provider).unwrap();
        let material = TlsMaterial::new(svid, TrustStore::default().with(domain), provider.clone());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                material,
                PeerPolicy::exact(GW_B.parse().unwrap()),
            )))
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.0.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap(),
            )
            .unwrap();
        Self {
            config: Arc::new(config),
        }
    }

    /// Connects to shop/db on `east_west` and echoes one line; whether the line
    /// came back.
    async fn echo(&self, east_west: SocketAddr, line: &str) -> bool {
        let tcp = tokio::net::TcpStream::connect(east_west).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let Ok(mut tls) = connector
            .connect(ServerName::try_from(DB_SNI).unwrap(), tcp)
            .await
        else {
            return false;
        };
        // TLS 1.3: the client finishes first; a refusal arrives as an alert.
        if tls.write_all(line.as_bytes()).await.is_err() || tls.flush().await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; line.len()];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) && buf == line.as_bytes()
    }
}

fn handshakes(gw: &Gateway, side: &str, result: &str) -> f64 {
    metric_sum(
        &gw.admin_get("/metrics").body,
        "isthmus_tls_handshakes_total",
        &[("side", side), ("result", result)],
    )
}

#[test]
fn leaves_that_are_not_x509_svid_leaves_are_refused_while_peers_keep_flowing() {
    use KeyUsagePurpose::{CrlSign, DigitalSignature, KeyCertSign, KeyEncipherment};
    let echo = tcp_echo();
    let db_listen = free_addr();
    let TwoClusters {
        mut a,
        mut b,
        east_west_b,
        domains,
        ..
    } = TwoClusters::builder()
        .without_outbound()
        .shop_db(db_listen, echo)
        .start();
    let (ca_a, ca_b) = (&domains.ca_a, &domains.ca_b);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let a_ca = read_ca(ca_a);
    let conforming = gw_a_leaf(&a_ca, false, vec![DigitalSignature]);
    let client =
        |cert: &(String, String)| PeerClient::new(&ca_b.join("bundle.pem"), &conforming, cert);
    let good = client(&conforming);
    // Control: the same client code with a conforming leaf gets through, and so
    // does the real peer gateway.
    assert!(rt.block_on(good.echo(east_west_b, "hello\n")));
    tcp_exchange(db_listen, 3);

    let cases = [
        (
            "CA:TRUE",
            gw_a_leaf(&a_ca, true, vec![DigitalSignature]),
            "leaf_is_ca",
        ),
        (
            "keyCertSign",
            gw_a_leaf(&a_ca, false, vec![DigitalSignature, KeyCertSign]),
            "leaf_signing_key_usage",
        ),
        (
            "cRLSign",
            gw_a_leaf(&a_ca, false, vec![DigitalSignature, CrlSign]),
            "leaf_signing_key_usage",
        ),
        (
            "no digitalSignature",
            gw_a_leaf(&a_ca, false, vec![KeyEncipherment]),
            "leaf_no_digital_signature",
        ),
    ];
    let mut legit = 0;
    for (name, cert, label) in &cases {
        let before = handshakes(&b, "server", label);
        let attacker = client(cert);
        assert!(
            !rt.block_on(attacker.echo(east_west_b, "attack\n")),
            "{name}: a non-conforming leaf got data through"
        );
        wait_for(Duration::from_secs(5), "the refusal to be counted", || {
            (handshakes(&b, "server", label) == before + 1.0).then_some(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}: {}", b.admin_get("/metrics").body));
        // Legitimate traffic right after each attempt, through the same listener.
        assert!(
            rt.block_on(good.echo(east_west_b, "still here\n")),
            "{name}"
        );
        tcp_exchange(db_listen, 2);
        legit += 2;
    }
    // Every refusal under its own label, and nothing else failed: the four
    // attempts are B's only failed handshakes, A had none. (Health probes add
    // handshakes of their own, so `ok` is at least the legitimate ones.)
    assert_eq!(handshakes(&b, "server", "leaf_is_ca"), 1.0);
    assert_eq!(handshakes(&b, "server", "leaf_signing_key_usage"), 2.0);
    assert_eq!(handshakes(&b, "server", "leaf_no_digital_signature"), 1.0);
    let failed = |gw: &Gateway, side: &str| {
        let m = gw.admin_get("/metrics").body;
        metric_sum(&m, "isthmus_tls_handshakes_total", &[("side", side)])
            - metric_sum(
                &m,
                "isthmus_tls_handshakes_total",
                &[("side", side), ("result", "ok")],
            )
    };
    assert_eq!(
        failed(&b, "server"),
        cases.len() as f64,
        "{}",
        b.admin_get("/metrics").body
    );
    assert_eq!(
        failed(&a, "client"),
        0.0,
        "{}",
        a.admin_get("/metrics").body
    );
    assert!(handshakes(&b, "server", "ok") >= f64::from(legit + 2));
    // The refusal is logged with its reason (the first at WARN; the next ones
    // within the interval at DEBUG, so a flood cannot fill the journal).
    let warned: Vec<_> = b
        .log_json()
        .into_iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l.to_string()
                    .contains("the peer's certificate is not an X509-SVID leaf")
        })
        .collect();
    assert_eq!(warned.len(), 1, "{}", b.log());
    let line = warned[0].to_string();
    assert!(
        line.contains("leaf_is_ca") && line.contains("CA:TRUE"),
        "the log says why: {line}"
    );
    assert_eq!(b.admin_get("/readyz").status, 200);
    for gw in [&mut a, &mut b] {
        gw.signal("TERM").unwrap();
        let (status, _) = gw.wait_exit(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(0));
    }
}

#[test]
fn our_own_svid_must_be_an_x509_svid_leaf_at_start_and_on_reload() {
    use KeyUsagePurpose::{DigitalSignature, KeyCertSign};
    let pki = DevPki::new();
    let ca_dir = pki.ca("ca", "a.example");
    let ca = read_ca(&ca_dir);
    let tls = pki.issue(&ca_dir, GW_A, "tls");
    let write_svid = |dir: &Path, (cert, key): &(String, String)| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("svid.crt"), cert).unwrap();
        std::fs::write(dir.join("svid.key"), key).unwrap();
    };
    let admin = free_addr();
    let bundle = ca_dir.join("bundle.pem");
    let check = |dir: &Path| {
        check_config(
            pki.path(),
            &gateway_config("gw-a", "a.example", admin, dir, &bundle, ""),
        )
    };
    assert_eq!(check(&tls).0, Some(0), "{}", check(&tls).1);
    for (name, cert, says) in [
        (
            "ca",
            gw_a_leaf(&ca, true, vec![DigitalSignature]),
            "CA:TRUE",
        ),
        (
            "signing",
            gw_a_leaf(&ca, false, vec![DigitalSignature, KeyCertSign]),
            "keyCertSign",
        ),
        (
            "no-ds",
            gw_a_leaf(&ca, false, vec![KeyUsagePurpose::KeyAgreement]),
            "digitalSignature",
        ),
    ] {
        let dir = pki.path().join(name);
        write_svid(&dir, &cert);
        let (code, err) = check(&dir);
        assert_eq!(code, Some(78), "{name}: {err}");
        assert!(
            err.contains("identity.cert:") && err.contains(says),
            "{name}: {err}"
        );
    }

    // Running: a non-conforming SVID dropped in is rejected; the old one stays.
    let echo = tcp_echo();
    let listen = free_addr();
    let config = gateway_config(
        "gw-a",
        "a.example",
        admin,
        &tls,
        &bundle,
        &format!(
            "[[services]]\nnamespace = \"shop\"\nname = \"db\"\n\
             ports = [{{ port = 5432, protocol = \"tcp\", listen = \"{listen}\" }}]\n\
             endpoints = [\"{echo}\"]\n"
        ),
    );
    let mut gw = Gateway::start(&config, admin, &[]).unwrap();
    gw.wait_ready(START).unwrap();
    let fingerprint = gw.admin_json("/debug/trust")["identity"]["fingerprint_sha256"].clone();
    let bad = gw_a_leaf(&ca, false, vec![DigitalSignature, KeyCertSign]);
    replace_file(&tls.join("svid.key"), bad.1.as_bytes());
    replace_file(&tls.join("svid.crt"), bad.0.as_bytes());
    wait_for(Duration::from_secs(10), "the SVID to be rejected", || {
        gw.log()
            .lines()
            .any(|l| l.contains("svid rejected") && l.contains("keyCertSign"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", gw.log()));
    let metrics = gw.admin_get("/metrics").body;
    assert!(
        metric_sum(
            &metrics,
            "isthmus_tls_reload_errors_total",
            &[("kind", "svid")]
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        gw.admin_json("/debug/trust")["identity"]["fingerprint_sha256"],
        fingerprint
    );
    assert_eq!(gw.admin_get("/readyz").status, 200);
    tcp_exchange(listen, 2);
    gw.signal("TERM").unwrap();
    let (status, _) = gw.wait_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `openssl x509 -text` of `path`.
fn openssl_text(path: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(path)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The line after the extension heading `name` (its value), and whether the
/// heading says critical.
fn extension(text: &str, name: &str) -> Option<(bool, String)> {
    let mut lines = text.lines();
    let heading = lines.find(|l| l.trim_start().starts_with(name))?;
    Some((
        heading.contains("critical"),
        lines.next()?.trim().to_owned(),
    ))
}

#[test]
fn isthmus_ca_issues_x509_svid_shaped_certificates() {
    let pki = DevPki::new();
    let ca_dir = pki.ca("ca", "a.example");
    let svid_dir = pki.issue(&ca_dir, GW_A, "svid");

    let ca = openssl_text(&ca_dir.join("ca.crt"));
    assert_eq!(
        extension(&ca, "X509v3 Basic Constraints:"),
        Some((true, "CA:TRUE".to_owned())),
        "{ca}"
    );
    assert_eq!(
        extension(&ca, "X509v3 Key Usage:"),
        Some((true, "Certificate Sign, CRL Sign".to_owned())),
        "{ca}"
    );

    let leaf = openssl_text(&svid_dir.join("svid.crt"));
    assert_eq!(
        extension(&leaf, "X509v3 Basic Constraints:").map(|(_, v)| v),
        Some("CA:FALSE".to_owned()),
        "{leaf}"
    );
    assert_eq!(
        extension(&leaf, "X509v3 Key Usage:"),
        Some((true, "Digital Signature".to_owned())),
        "{leaf}"
    );
    assert_eq!(
        extension(&leaf, "X509v3 Extended Key Usage:").map(|(_, v)| v),
        Some("TLS Web Server Authentication, TLS Web Client Authentication".to_owned()),
        "{leaf}"
    );
    assert_eq!(
        extension(&leaf, "X509v3 Subject Alternative Name:").map(|(_, v)| v),
        Some(format!("URI:{GW_A}")),
        "{leaf}"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn ca_force_over_a_world_readable_key_leaves_a_0600_key() {
    let pki = DevPki::new();
    let ca_dir = pki.ca("ca", "a.example");
    let key = ca_dir.join("ca.key");
    assert_eq!(mode(&key), 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let old_key = std::fs::read(&key).unwrap();
    let out = isthmus(
        &[
            "ca",
            "init",
            "--trust-domain",
            "a.example",
            "--out",
            ca_dir.to_str().unwrap(),
            "--force",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&key), 0o600, "ca.key after ca init --force");
    assert_ne!(std::fs::read(&key).unwrap(), old_key, "a new key");
    assert_eq!(
        mode(&ca_dir.join("ca.crt")) & 0o044,
        0o044,
        "certificates stay readable"
    );

    // `DevPki::issue` passes --force: over a 0644 svid.key too.
    let svid_dir = pki.issue(&ca_dir, GW_A, "svid");
    let svid_key = svid_dir.join("svid.key");
    assert_eq!(mode(&svid_key), 0o600);
    std::fs::set_permissions(&svid_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    pki.issue(&ca_dir, GW_A, "svid");
    assert_eq!(mode(&svid_key), 0o600, "svid.key after ca issue --force");
    // Nothing but the four files: no temporary file left behind.
    let mut names: Vec<String> = std::fs::read_dir(&ca_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bundle.json", "bundle.pem", "ca.crt", "ca.key"]);
}
