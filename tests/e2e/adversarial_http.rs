//! Attacks on the HTTP listeners, against the real binary: forged internal
//! headers, slow-header (slowloris) floods, per-source and handshake caps, and
//! passthrough from a source outside a service's `allow_sources`. Each test
//! proves the refusal (what the attacker sees and a metric) and that a normal
//! client from another loopback source kept being served meanwhile.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_tests::two_clusters::TwoClusters;
use isthmus_tests::{
    DevPki, EchoServer, Gateway, OpensslMode, OpensslServer, curl, free_addr, metric_sum,
    solo_gateway, wait_for,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `limits.header_timeout` of the slow-header tests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(8);
/// Slow connections opened against each listener.
const SLOW: usize = 1000;
/// `connections_per_source` of each attacked listener: the rest of the slow
/// connections are refused at once.
const PER_SOURCE: usize = 600;
/// How often a slow client sends one more header byte: far under any per-read
/// timeout, so only a total deadline cuts it.
const TRICKLE: Duration = Duration::from_millis(1000);
/// Where the attacker connects from, and the normal client.
const ATTACKER: &str = "127.0.0.3";
const NORMAL: &str = "127.0.0.2";

fn limits(extra: &str) -> String {
    format!(
        r#"[limits]
header_timeout = "{}s"
[limits.outbound]
connections_per_source = {PER_SOURCE}
[limits.admin]
connections = 2000
connections_per_source = {PER_SOURCE}
{extra}"#,
        HEADER_TIMEOUT.as_secs()
    )
}

fn metrics(gw: &Gateway) -> String {
    gw.admin_get("/metrics").body
}

fn refused(gw: &Gateway, listener: &str, reason: &str) -> f64 {
    metric_sum(
        &metrics(gw),
        "isthmus_connections_refused_total",
        &[("listener", listener), ("reason", reason)],
    )
}

fn header_timeouts(gw: &Gateway, listener: &str) -> f64 {
    metric_sum(
        &metrics(gw),
        "isthmus_header_timeouts_total",
        &[("listener", listener)],
    )
}

/// A TCP connection to `to` from `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))?;
    socket.connect(to).await
}

/// How a slow connection ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Closed before it could send anything: at the accept (TCP, within a
    /// second) or in its TLS handshake.
    Refused,
    /// Closed this long after it started sending its headers.
    Closed(Duration),
    /// Still open when the client gave up.
    Open,
}

/// Sends `prefix`, then one byte per [`TRICKLE`], never ending the headers;
/// says how long after `prefix` the gateway closed the connection.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    prefix: &[u8],
    give_up: Duration,
) -> End {
    let start = Instant::now();
    let closed = |start: Instant| End::Closed(start.elapsed());
    if s.write_all(prefix).await.is_err() || s.flush().await.is_err() {
        return closed(start);
    }
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return closed(start),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(TRICKLE) => {
                if s.write_all(b"a").await.is_err() || s.flush().await.is_err() {
                    return closed(start);
                }
            }
        }
        if start.elapsed() > give_up {
            return End::Open;
        }
    }
}

/// One HTTP/1.1 request from [`NORMAL`] on a fresh connection; the status.
async fn normal_request(to: SocketAddr, host: &str, path: &str) -> u16 {
    let Ok(mut s) = connect_from(NORMAL, to).await else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// What became of the slow connections.
struct Outcome {
    /// Closed within a second: refused at once.
    refused: usize,
    /// Closed between the header deadline and a few seconds after it.
    cut_at_deadline: usize,
    /// Anything else (closed early but not at once, or late, or never).
    other: Vec<End>,
}

fn outcome(ends: Vec<End>) -> Outcome {
    let mut o = Outcome {
        refused: 0,
        cut_at_deadline: 0,
        other: Vec::new(),
    };
    for end in ends {
        match end {
            End::Refused => o.refused += 1,
            End::Closed(d) if d < Duration::from_secs(1) => o.refused += 1,
            // The deadline runs from the accept (TCP) or the handshake (TLS),
            // a moment before `prefix`.
            End::Closed(d)
                if d >= HEADER_TIMEOUT - Duration::from_millis(500)
                    && d < HEADER_TIMEOUT + Duration::from_secs(4) =>
            {
                o.cut_at_deadline += 1
            }
            other => o.other.push(other),
        }
    }
    o
}

/// Floods `listener` (reached at `target` by `slow`, which opens one slow
/// connection) with [`SLOW`] slow-header connections from [`ATTACKER`], and
/// meanwhile sends 100 requests from [`NORMAL`] with `normal`; checks every
/// normal request got 200, that [`PER_SOURCE`] slow connections were held and
/// cut at the header deadline and the rest refused at once, all counted.
fn flood_while_serving<F, N>(gw: &Gateway, listener: &str, slow: F, normal: N)
where
    F: Fn() -> Pin<Box<dyn Future<Output = End> + Send>>,
    N: Fn() -> Pin<Box<dyn Future<Output = u16> + Send>>,
{
    let rt = tokio::runtime::Runtime::new().unwrap();
    let flood: Vec<_> = (0..SLOW).map(|_| rt.spawn(slow())).collect();
    // Every slow connection was accepted and either admitted or refused.
    wait_for(
        Duration::from_secs(30),
        "the over-cap connections to be refused",
        || (refused(gw, listener, "per_source") >= (SLOW - PER_SOURCE) as f64).then_some(()),
    )
    .unwrap();
    let held_from = Instant::now();
    let statuses: Vec<u16> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..100 {
            out.push(normal().await);
        }
        out
    });
    let served_in = held_from.elapsed();
    let cut_meanwhile = header_timeouts(gw, listener);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        100,
        "{listener}: the normal client got {statuses:?}"
    );
    assert_eq!(
        cut_meanwhile, 0.0,
        "{listener}: the 100 requests ({served_in:?}) were served while the slow connections were held"
    );
    let ends: Vec<End> = flood.into_iter().map(|h| rt.block_on(h).unwrap()).collect();
    let cut_times: Vec<Duration> = ends
        .iter()
        .filter_map(|e| match e {
            End::Closed(d) if *d >= Duration::from_secs(1) => Some(*d),
            _ => None,
        })
        .collect();
    eprintln!(
        "{listener}: 100 normal requests served in {served_in:?} while held; slow connections cut after {:?} to {:?}",
        cut_times.iter().min(),
        cut_times.iter().max()
    );
    let o = outcome(ends);
    assert_eq!(o.refused, SLOW - PER_SOURCE, "{listener}: {:?}", o.other);
    assert_eq!(o.cut_at_deadline, PER_SOURCE, "{listener}: {:?}", o.other);
    assert!(o.other.is_empty(), "{listener}: {:?}", o.other);
    assert_eq!(
        refused(gw, listener, "per_source"),
        (SLOW - PER_SOURCE) as f64,
        "{listener}"
    );
    assert_eq!(
        header_timeouts(gw, listener),
        PER_SOURCE as f64,
        "{listener}"
    );
}

/// The request headers the echo upstream reports, for a request with curl
/// `args` carrying forged internal headers; asserts it succeeded.
fn forged_request(what: &str, args: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    let mut all = vec![
        "-H",
        "X-Forwarded-Client-Cert: By=spiffe://x/y;URI=spiffe://b.example/isthmus/gateway/gw-b",
        "-H",
        "x-isthmus-subset: canary",
        "-H",
        "X-Isthmus-Overloaded: true",
        "-H",
        "x-isthmus-anything-new: 1",
        "-H",
        "x-request-id: kept-by-the-gateway",
    ];
    all.extend(args);
    let r = curl(&all);
    assert_eq!(r.status, 200, "{what}: {}", r.body);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let headers = echo["headers"].as_object().unwrap().clone();
    let internal: Vec<&String> = headers
        .keys()
        .filter(|k| *k == "x-forwarded-client-cert" || k.starts_with("x-isthmus-"))
        .collect();
    assert!(
        internal.is_empty(),
        "{what}: {internal:?} reached the endpoint"
    );
    assert_eq!(headers["x-request-id"], "kept-by-the-gateway", "{what}");
    headers
}

#[test]
fn forged_internal_headers_from_a_workload_never_reach_the_endpoint() {
    let upstream = EchoServer::start("pod");
    let dns = free_addr();
    let (gw, outbound) = solo_gateway(
        &[upstream.addr],
        // Exported: clusterset.local names exported services only.
        &format!(
            "export = true\n[dns]\nlisten = \"{dns}\"\nclusterset_ipv4_range = \"127.246.0.0/16\"\n"
        ),
    )
    .unwrap();
    let url = format!("http://{outbound}/pay");
    let host = "Host: web.shop.svc.clusterset.local";
    forged_request("HTTP/1.1", &["-H", host, &url]);
    forged_request("h2c", &["-H", host, "--http2-prior-knowledge", &url]);
    let forged = |listener: &str| {
        metric_sum(
            &metrics(&gw),
            "isthmus_forged_headers_total",
            &[("listener", listener)],
        )
    };
    assert_eq!(forged("outbound"), 2.0, "one per request that carried them");
    // A request without them is not counted.
    let r = curl(&["-H", host, &url]);
    assert_eq!(r.status, 200);
    assert_eq!(forged("outbound"), 2.0);

    // The listener at the service's clusterset IP strips them the same way.
    let ip = wait_for(Duration::from_secs(10), "a clusterset IP", || {
        isthmus_tests::dns::dig(dns, &["web.shop.svc.clusterset.local", "A"])
            .data("A")
            .pop()
    })
    .unwrap();
    let clusterset_url = format!("http://{ip}:80/pay");
    wait_for(Duration::from_secs(10), "the clusterset listener", || {
        (curl(&[&clusterset_url]).status == 200).then_some(())
    })
    .unwrap();
    forged_request("clusterset", &[&clusterset_url]);
    // Counted as the outbound listener's, as its requests are.
    assert_eq!(forged("outbound"), 3.0);
}

#[test]
fn slow_headers_on_outbound_are_cut_at_the_deadline_while_others_are_served() {
    let upstream = EchoServer::start("pod");
    let (gw, outbound) = solo_gateway(&[upstream.addr], &limits("")).unwrap();
    let give_up = HEADER_TIMEOUT + Duration::from_secs(10);
    flood_while_serving(
        &gw,
        "outbound",
        || {
            Box::pin(async move {
                let Ok(s) = connect_from(ATTACKER, outbound).await else {
                    return End::Refused;
                };
                trickle(
                    s,
                    b"GET / HTTP/1.1\r\nHost: web.shop.svc.clusterset.local\r\nX-Slow: ",
                    give_up,
                )
                .await
            })
        },
        || {
            Box::pin(normal_request(
                outbound,
                "web.shop.svc.clusterset.local",
                "/",
            ))
        },
    );
    // Kept-alive connections still work after the flood.
    assert_eq!(
        curl(&[
            "-H",
            "Host: web.shop.svc.clusterset.local",
            &format!("http://{outbound}/")
        ])
        .status,
        200
    );
}

#[test]
fn slow_headers_on_admin_are_cut_at_the_deadline_while_probes_are_served() {
    let upstream = EchoServer::start("pod");
    let (gw, _) = solo_gateway(&[upstream.addr], &limits("")).unwrap();
    let admin = gw.admin;
    let give_up = HEADER_TIMEOUT + Duration::from_secs(10);
    flood_while_serving(
        &gw,
        "admin",
        || {
            Box::pin(async move {
                let Ok(s) = connect_from(ATTACKER, admin).await else {
                    return End::Refused;
                };
                trickle(s, b"GET /metrics HTTP/1.1\r\nX-Slow: ", give_up).await
            })
        },
        || Box::pin(normal_request(admin, "localhost", "/healthz")),
    );
}

/// Accepts any server certificate: the attacker does not care who it talks to.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client presenting the SVID in `tls_dir` (an admitted peer gateway's).
fn peer_tls(tls_dir: &Path) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(tls_dir.join("svid.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(tls_dir.join("svid.key")).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A (outbound) reaches shop/web in B (east-west, with `b_limits` and
/// `b_services` added) over SPIFFE mTLS.
fn two_clusters(upstream: SocketAddr, b_limits: &str, b_services: &str) -> TwoClusters {
    TwoClusters::builder()
        .shop_web(upstream)
        .b(&format!("{b_services}\n{b_limits}\n"))
        .start()
}

#[test]
fn slow_headers_on_east_west_over_mtls_are_cut_while_peers_are_served() {
    let upstream = EchoServer::start("pod-in-b");
    let c = two_clusters(
        upstream.addr,
        &format!(
            r#"[limits]
header_timeout = "{}s"
[limits.east_west]
connections_per_source = {PER_SOURCE}
handshakes = 2000
handshakes_per_source = 2000
"#,
            HEADER_TIMEOUT.as_secs()
        ),
        "",
    );
    let connector = peer_tls(&c.domains.tls_a);
    let (east_west_b, outbound_a) = (c.east_west_b, c.outbound_a);
    let give_up = HEADER_TIMEOUT + Duration::from_secs(10);
    flood_while_serving(
        &c.b,
        "east_west",
        move || {
            let connector = connector.clone();
            Box::pin(async move {
                let Ok(tcp) = connect_from(ATTACKER, east_west_b).await else {
                    return End::Refused;
                };
                let sni = rustls::pki_types::ServerName::try_from(
                    "outbound_.8080_._.web.shop.svc.cluster.local",
                )
                .unwrap();
                // A connection refused at once fails its handshake.
                let Ok(tls) = connector.connect(sni, tcp).await else {
                    return End::Refused;
                };
                trickle(
                    tls,
                    b"GET / HTTP/1.1\r\nHost: web.shop.svc.cluster.local:8080\r\nX-Slow: ",
                    give_up,
                )
                .await
            })
        },
        move || {
            Box::pin(normal_request(
                outbound_a,
                "web.shop.svc.clusterset.local:8080",
                "/",
            ))
        },
    );
}

#[test]
fn east_west_handshakes_in_flight_are_capped_per_source() {
    let upstream = EchoServer::start("pod-in-b");
    let c = two_clusters(
        upstream.addr,
        "[limits.east_west]\nhandshakes = 20\nhandshakes_per_source = 10\n",
        "",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Fifteen connections that never send a ClientHello: ten hold a
    // handshake place each, five are closed at once.
    let (ends, _held): (Vec<Option<Duration>>, Vec<tokio::net::TcpStream>) = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..15 {
            held.push(connect_from(ATTACKER, c.east_west_b).await.unwrap());
        }
        let waits = held.into_iter().map(|mut s| async move {
            let start = Instant::now();
            let mut buf = [0u8; 16];
            let end = match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                Ok(_) => Some(start.elapsed()),
                Err(_) => None,
            };
            (end, s)
        });
        futures::future::join_all(waits).await.into_iter().unzip()
    });
    assert_eq!(ends.iter().filter(|e| e.is_some()).count(), 5, "{ends:?}");
    assert_eq!(refused(&c.b, "east_west", "handshakes_per_source"), 5.0);
    // Peers from other sources still get through meanwhile.
    let statuses: Vec<u16> = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..20 {
            out.push(normal_request(c.outbound_a, "web.shop.svc.clusterset.local:8080", "/").await);
        }
        out
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[test]
fn passthrough_from_a_source_outside_allow_sources_is_refused() {
    let pki = DevPki::new();
    let ca = pki.ca("ca-b", "b.example");
    let workload = pki.issue(&ca, "spiffe://b.example/ns/shop/sa/ledger", "workload");
    let server = OpensslServer::start(&workload, OpensslMode::Www);
    let upstream = EchoServer::start("pod-in-b");
    let c = two_clusters(
        upstream.addr,
        "",
        &format!(
            r#"[[services]]
namespace = "shop"
name = "ledger"
ports = [{{ port = 8443, protocol = "tcp" }}]
endpoints = ["{}"]
export = true
mode = "passthrough"
allow_sources = ["{NORMAL}/32"]
"#,
            server.addr
        ),
    );
    let sni = "outbound_.8443_._.ledger.shop.svc.cluster.local";
    let through = |from: &str| {
        curl(&[
            "-k",
            "--interface",
            from,
            "--connect-to",
            &format!("{sni}:443:{}", c.east_west_b),
            &format!("https://{sni}/"),
        ])
    };
    assert_eq!(
        through(NORMAL).status,
        200,
        "an allowed source is spliced through"
    );
    let refused_here = through(ATTACKER);
    assert_eq!(refused_here.status, 0, "{}", refused_here.body);
    assert_eq!(refused(&c.b, "east_west", "source_not_allowed"), 1.0);
    let tcp = metric_sum(
        &metrics(&c.b),
        "isthmus_tcp_connections_total",
        &[("service", "ledger"), ("result", "source_not_allowed")],
    );
    assert_eq!(tcp, 1.0);
    // The allowed source, and terminated traffic, still work.
    assert_eq!(through(NORMAL).status, 200);
    let r = curl(&[
        "-H",
        "Host: web.shop.svc.clusterset.local:8080",
        &format!("http://{}/", c.outbound_a),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(c.b.log().contains("outside shop/ledger's allow_sources"));
}

/// Reads one HTTP/2 frame: (type, flags, stream id, payload).
fn read_frame(s: &mut std::net::TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    use std::io::Read;
    let mut header = [0u8; 9];
    s.read_exact(&mut header)?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((header[3], header[4], stream, payload))
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

#[test]
fn h2_streams_over_the_cap_are_refused_while_the_others_are_served() {
    use std::io::Write;
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const REFUSED_STREAM: u32 = 0x7;
    let upstream = EchoServer::start("pod");
    // Each request waits upstream (the echo server answers one delayed
    // request at a time), so the streams are all open when the eighth arrives.
    upstream.set(isthmus_tests::Behaviour::Delay(Duration::from_millis(300)));
    let (_gw, outbound) = solo_gateway(
        &[upstream.addr],
        "[limits]\nh2_max_concurrent_streams = 7\n",
    )
    .unwrap();
    let mut s = std::net::TcpStream::connect(outbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    // The server announces the cap in its first SETTINGS.
    let (kind, _, _, payload) = read_frame(&mut s).unwrap();
    assert_eq!(kind, SETTINGS);
    let cap = payload.chunks(6).find_map(|e| {
        (u16::from_be_bytes([e[0], e[1]]) == MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
    });
    assert_eq!(cap, Some(7), "{payload:?}");
    // Its cap applies once acknowledged; then eight requests at once.
    s.write_all(&frame(SETTINGS, 0x1, 0, &[])).unwrap();
    let authority = b"web.shop.svc.clusterset.local";
    // HPACK: :method GET, :scheme http, :path /, :authority (literal).
    let mut block = vec![0x82, 0x86, 0x84, 0x41, authority.len() as u8];
    block.extend(authority);
    for i in 0..8u32 {
        s.write_all(&frame(HEADERS, 0x5, 2 * i + 1, &block))
            .unwrap();
    }
    // Meanwhile another client is served.
    let other = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: web.shop.svc.clusterset.local",
        &format!("http://{outbound}/"),
    ]);
    assert_eq!(other.status, 200, "{}", other.body);
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < 8 {
        let (kind, _, stream, payload) = read_frame(&mut s).unwrap();
        match kind {
            HEADERS => answered.push(stream),
            RST_STREAM => {
                assert_eq!(
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                    REFUSED_STREAM
                );
                refused.push(stream);
            }
            _ => {}
        }
    }
    assert_eq!(refused, [15], "the eighth stream is refused");
    answered.sort_unstable();
    assert_eq!(answered, [1, 3, 5, 7, 9, 11, 13]);
}
