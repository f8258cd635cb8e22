//! DNS is not an open door: attacks against the real binary's DNS server,
//! each proving the refusal (a metric and what the attacker's client sees)
//! and that a legitimate client of the same gateway, at another source
//! address, got every answer right meanwhile.
//!
//! Sources are loopback addresses: the attacker is 127.0.0.1 (or 127.0.0.3),
//! the legitimate client 127.0.0.2 (`dig -b`), all on `lo`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use isthmus_tests::dns::{DigOutput, Nsd, dig, kdig, upstream_zone};
use isthmus_tests::{EchoServer, Gateway, free_addr, metric_sum, minimal_config, wait_for};

/// The upstream's zone, with records an ANY query would amplify.
fn upstream() -> String {
    upstream_zone(
        "www IN TXT \"a long text record that an ANY query would amplify\"
www IN MX 10 mail.upstream.test.
",
    )
}

const WEB: &str = "web.shop.svc.clusterset.local";

/// A gateway serving shop/web (exported) with DNS on a fresh address, the
/// clusterset range `range` and `dns_keys` added to `[dns]`.
fn start(range: &str, dns_keys: &str) -> Result<(Gateway, SocketAddr, EchoServer)> {
    let web = EchoServer::start("web");
    let dns = free_addr();
    let admin = free_addr();
    let config = format!(
        "{}[dns]\nlisten = \"{dns}\"\nclusterset_ipv4_range = \"{range}\"\n{dns_keys}\n\
         [[services]]\nnamespace = \"shop\"\nname = \"web\"\nports = [{{ port = 8080, name = \"http\" }}]\nendpoints = [\"{}\"]\nexport = true\n",
        minimal_config("gw-dns-adv", admin),
        web.addr
    );
    let mut gw = Gateway::start(&config, admin, &[])?;
    gw.wait_ready(Duration::from_secs(20))?;
    Ok((gw, dns, web))
}

/// `dig` from the source address `from`.
fn dig_from(from: &str, dns: SocketAddr, args: &[&str]) -> DigOutput {
    let mut all = vec!["-b", from];
    all.extend_from_slice(args);
    dig(dns, &all)
}

/// shop/web's clusterset IP, asked from 127.0.0.2.
fn web_ip(dns: SocketAddr) -> Result<String> {
    let a = dig_from("127.0.0.2", dns, &[WEB, "A"]);
    a.data("A")
        .first()
        .cloned()
        .with_context(|| format!("an A record for {WEB}: {}", a.raw))
}

fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&gw.admin_get("/metrics").body, name, labels)
}

/// A DNS query for `name` of type `qtype`, with id `id`, asking recursion.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// What the header of a response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    id: u16,
    truncated: bool,
    rcode: u8,
    answers: u16,
}

fn header(packet: &[u8]) -> Option<Header> {
    (packet.len() >= 12 && packet[2] & 0x80 != 0).then(|| Header {
        id: u16::from_be_bytes([packet[0], packet[1]]),
        truncated: packet[2] & 0x02 != 0,
        rcode: packet[3] & 0x0f,
        answers: u16::from_be_bytes([packet[6], packet[7]]),
    })
}

const REFUSED: u8 = 5;
const TYPE_A: u16 = 1;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;

/// One query over a new TCP connection; the response, or `None` when the
/// connection was closed without one.
fn tcp_query(dns: SocketAddr, packet: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut tcp = TcpStream::connect(dns)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let len = u16::try_from(packet.len())?;
    tcp.write_all(&len.to_be_bytes())?;
    tcp.write_all(packet)?;
    let mut len = [0u8; 2];
    if tcp.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let mut response = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut response)?;
    Ok(Some(response))
}

/// Whether the peer has closed `stream` (EOF or reset), reading for at most
/// `wait`.
fn closed(stream: &mut TcpStream, wait: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(wait));
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn idle_tcp_connections_from_one_source_do_not_exhaust_dns_over_tcp_for_another() -> Result<()> {
    // The default caps (16 per source, 512 in total); a short idle timeout
    // so the test also sees idle connections evicted.
    let (gw, dns, _web) = start("127.249.0.0/16", "tcp_idle_timeout = \"5s\"")?;
    let ip = web_ip(dns)?;

    // The attacker: 300 idle connections from 127.0.0.1 (the default source
    // towards a 127.0.0.1 address), then more while the client asks.
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(dns))
        .collect::<std::io::Result<_>>()?;
    wait_for(
        Duration::from_secs(10),
        "the connections over the per-source cap refused",
        || {
            (metric(
                &gw,
                "isthmus_dns_tcp_connections_refused_total",
                &[("reason", "per_source")],
            ) >= 284.0)
                .then_some(())
        },
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let more = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut opened = Vec::new();
            while !stop.load(Ordering::Relaxed) && opened.len() < 300 {
                if let Ok(s) = TcpStream::connect(dns) {
                    opened.push(s);
                }
            }
            opened.len()
        })
    };

    // The client at 127.0.0.2, over TCP, meanwhile: every answer right.
    let mut failures = Vec::new();
    let started = Instant::now();
    for i in 0..30 {
        let a = dig_from("127.0.0.2", dns, &["+tcp", WEB, "A"]);
        if a.status != "NOERROR" || a.data("A") != [ip.as_str()] {
            failures.push(format!("query {i}: {}", a.raw));
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let opened_meanwhile = more
        .join()
        .map_err(|_| anyhow::anyhow!("attacker thread"))?;
    assert!(
        failures.is_empty(),
        "legitimate TCP queries failed: {failures:?}"
    );
    println!(
        "30 TCP queries from 127.0.0.2 in {took:?} while 127.0.0.1 opened {opened_meanwhile} more"
    );

    // The attacker holds 16; the rest were closed at once.
    let mut open = 0;
    let mut shut = 0;
    for s in &mut idle {
        if closed(s, Duration::from_millis(50)) {
            shut += 1;
        } else {
            open += 1;
        }
    }
    assert_eq!(open, 16, "{shut} closed");
    wait_for(
        Duration::from_secs(5),
        "only the attacker's admitted connections open",
        || (metric(&gw, "isthmus_dns_tcp_connections", &[]) == 16.0).then_some(()),
    )?;

    // Idle ones are evicted after tcp_idle_timeout, and the source may
    // connect again.
    wait_for(Duration::from_secs(10), "idle connections closed", || {
        (metric(&gw, "isthmus_dns_tcp_connections", &[]) == 0.0).then_some(())
    })?;
    assert!(metric(&gw, "isthmus_dns_tcp_idle_closed_total", &[]) >= 16.0);
    for s in &mut idle {
        assert!(closed(s, Duration::from_secs(5)), "evicted");
    }
    let again = dig(dns, &["+tcp", WEB, "A"]);
    assert_eq!(again.data("A"), [ip.as_str()], "{}", again.raw);
    Ok(())
}

#[test]
fn sources_outside_allow_sources_are_refused_and_get_no_recursion() -> Result<()> {
    let upstream = Nsd::start(&[("upstream.test.", &upstream())], "")?;
    let (gw, dns, _web) = start(
        "127.245.0.0/16",
        &format!(
            "allow_sources = [\"127.0.0.1/32\"]\nupstreams = [\"{}\"]",
            upstream.addr
        ),
    )?;
    let ip = {
        let a = dig_from("127.0.0.1", dns, &[WEB, "A"]);
        a.data("A").first().cloned().context(a.raw)?
    };
    let mut failures = Vec::new();
    for i in 0..20 {
        // The outsider: REFUSED for a forwarded name and for ours, nothing
        // answered.
        for name in ["www.upstream.test", WEB] {
            let out = dig_from("127.0.0.3", dns, &[name, "A"]);
            ensure!(
                out.status == "REFUSED" && out.answers.is_empty(),
                "{name} from 127.0.0.3: {}",
                out.raw
            );
        }
        // The allowed client: recursion and our names.
        let fwd = dig_from("127.0.0.1", dns, &["www.upstream.test", "A"]);
        if fwd.data("A") != ["192.0.2.10"] || !fwd.has_flag("ra") {
            failures.push(format!("forwarded {i}: {}", fwd.raw));
        }
        let own = dig_from("127.0.0.1", dns, &[WEB, "A"]);
        if own.data("A") != [ip.as_str()] {
            failures.push(format!("own {i}: {}", own.raw));
        }
    }
    assert!(
        failures.is_empty(),
        "the allowed source failed: {failures:?}"
    );
    // Over TCP the outsider's connection is closed without an answer.
    let out_tcp = dig_from("127.0.0.3", dns, &["+tcp", "www.upstream.test", "A"]);
    assert!(
        out_tcp.status.is_empty() && out_tcp.answers.is_empty(),
        "{}",
        out_tcp.raw
    );
    let in_tcp = dig_from("127.0.0.1", dns, &["+tcp", "www.upstream.test", "A"]);
    assert_eq!(in_tcp.data("A"), ["192.0.2.10"], "{}", in_tcp.raw);
    assert!(metric(&gw, "isthmus_dns_refused_total", &[("reason", "source")]) >= 40.0);
    assert!(
        metric(
            &gw,
            "isthmus_dns_tcp_connections_refused_total",
            &[("reason", "source")]
        ) >= 1.0
    );
    // The refusals never reached the upstream: only the allowed source's
    // 21 forwarded queries were answered from it (or its cache).
    assert_eq!(
        metric(
            &gw,
            "isthmus_dns_queries_total",
            &[("source", "forward"), ("rcode", "NOERROR")]
        ),
        21.0
    );
    Ok(())
}

#[test]
fn any_is_answered_minimally_and_zone_transfers_are_refused() -> Result<()> {
    let upstream = Nsd::start(&[("upstream.test.", &upstream())], "")?;
    let (gw, dns, _web) = start(
        "127.246.0.0/16",
        &format!(
            "clusterset_ipv6_range = \"fd00:246::/112\"\nupstreams = [\"{}\"]",
            upstream.addr
        ),
    )?;
    let ip = web_ip(dns)?;
    // The name has A and AAAA; ANY gets one RRset.
    let any = dig_from("127.0.0.2", dns, &[WEB, "ANY"]);
    assert_eq!(any.status, "NOERROR", "{}", any.raw);
    assert_eq!(any.answers.len(), 1, "{}", any.raw);
    assert!(any.answers[0].rtype == "A" || any.answers[0].rtype == "AAAA");
    // A forwarded name: the synthesised HINFO, not the upstream's A, TXT and MX.
    let any_fwd = dig_from("127.0.0.2", dns, &["www.upstream.test", "ANY"]);
    assert_eq!(any_fwd.status, "NOERROR", "{}", any_fwd.raw);
    assert_eq!(any_fwd.answers.len(), 1, "{}", any_fwd.raw);
    assert_eq!(any_fwd.answers[0].rtype, "HINFO", "{}", any_fwd.raw);
    assert_eq!(
        any_fwd.answers[0].data, "\"RFC8482\" \"\"",
        "{}",
        any_fwd.raw
    );

    // AXFR over TCP (dig), and AXFR and IXFR as raw queries over UDP and TCP.
    let axfr = dig_from("127.0.0.2", dns, &["clusterset.local", "AXFR"]);
    assert!(
        axfr.answers.is_empty() && axfr.raw.contains("Transfer failed"),
        "{}",
        axfr.raw
    );
    let udp = UdpSocket::bind("127.0.0.2:0")?;
    udp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut failures = Vec::new();
    for (i, qtype) in [TYPE_AXFR, TYPE_IXFR].into_iter().enumerate() {
        let id = 100 + u16::try_from(i)?;
        let refused = tcp_query(dns, &query(id, "clusterset.local", qtype))?
            .and_then(|r| header(&r))
            .context("a TCP answer to a transfer")?;
        assert_eq!(
            (refused.id, refused.rcode, refused.answers),
            (id, REFUSED, 0)
        );
        udp.send_to(&query(id, "clusterset.local", qtype), dns)?;
        let mut buf = [0u8; 512];
        let (n, _) = udp.recv_from(&mut buf)?;
        let refused = header(&buf[..n]).context("a UDP answer")?;
        assert_eq!(
            (refused.id, refused.rcode, refused.answers),
            (id, REFUSED, 0)
        );
        // Legitimate queries between the attempts, all answered.
        let a = dig_from("127.0.0.2", dns, &[WEB, "A"]);
        if a.data("A") != [ip.as_str()] {
            failures.push(a.raw);
        }
    }
    // Every zone this server answers for, and a forwarded one, over both
    // transports, with kdig: AXFR and IXFR (with its SOA in the authority
    // section) are REFUSED, never an empty NOERROR.
    let reverse_apex = "246.127.in-addr.arpa";
    for zone in [
        "clusterset.local",
        WEB,
        reverse_apex,
        "www.upstream.test",
        "upstream.test",
    ] {
        for transport in ["+tcp", "+notcp"] {
            for qtype in ["AXFR", "IXFR=1"] {
                let out = kdig(dns, &["-b", "127.0.0.2", transport, zone, qtype])?;
                if !out.contains("'REFUSED'") {
                    failures.push(format!("{zone} {qtype} {transport}: {out}"));
                }
            }
        }
    }
    // The reverse zone is ours: its SOA is answered, authoritatively.
    let soa = dig_from("127.0.0.2", dns, &[reverse_apex, "SOA"]);
    assert!(soa.has_flag("aa") && soa.answers.len() == 1, "{}", soa.raw);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(metric(&gw, "isthmus_dns_refused_total", &[("reason", "transfer")]) >= 25.0);
    assert_eq!(
        metric(
            &gw,
            "isthmus_dns_queries_total",
            &[("type", "ANY"), ("source", "rfc8482")]
        ),
        1.0
    );
    Ok(())
}

#[test]
fn response_rate_limiting_holds_back_a_udp_flood_while_another_source_is_served() -> Result<()> {
    let (gw, dns, _web) = start(
        "127.247.0.0/16",
        "rate_limit = 50\nrate_limit_burst = 60\nrate_limit_slip = 2",
    )?;
    let ip = web_ip(dns)?;

    // The flood: 127.0.0.1 asks 1,000 times a second (20 times its limit)
    // for as long as the client below asks, and counts what comes back.
    let flood = UdpSocket::bind("127.0.0.1:0")?;
    flood.set_read_timeout(Some(Duration::from_millis(500)))?;
    let receiver = {
        let socket = flood.try_clone()?;
        std::thread::spawn(move || {
            let (mut full, mut slipped) = (0u32, 0u32);
            let mut buf = [0u8; 512];
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                match header(&buf[..n]) {
                    Some(h) if h.truncated && h.answers == 0 => slipped += 1,
                    Some(h) if h.answers == 1 => full += 1,
                    _ => {}
                }
            }
            (full, slipped)
        })
    };
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = stop.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<u32> {
        let packet = query(7, WEB, TYPE_A);
        let mut sent = 0;
        let pace = Duration::from_millis(1);
        while !flooding.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            flood.send_to(&packet, dns)?;
            sent += 1;
            let next = started + pace * sent;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(sent)
    });

    // The client at 127.0.0.2 meanwhile: 40 queries over UDP, every one
    // answered right (within its own limit).
    let mut failures = Vec::new();
    let asked = 40;
    for _ in 0..asked {
        let a = dig_from("127.0.0.2", dns, &[WEB, "A"]);
        if a.data("A") != [ip.as_str()] || a.has_flag("tc") {
            failures.push(a.raw);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread"))??;
    let elapsed = started.elapsed();
    let (full, slipped) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread"))?;
    assert!(
        failures.is_empty(),
        "legitimate queries failed: {failures:?}"
    );
    assert!(
        sent >= 100,
        "the flood ran while the client asked ({sent} sent)"
    );
    println!(
        "flood: {sent} queries in {elapsed:?}; {full} answered, {slipped} slipped; client: {asked} of {asked} answered"
    );
    // The flood got its burst and its rate, no more (a margin for timing).
    let allowed = 60.0 + 50.0 * elapsed.as_secs_f64() + 10.0;
    assert!(
        f64::from(full) <= allowed,
        "{full} answers to the flood, allowed {allowed}"
    );
    assert!(sent > full + slipped, "some of the flood was dropped");
    assert!(slipped > 0, "some answers slipped with TC");
    let dropped = metric(&gw, "isthmus_dns_rate_limited_total", &[("action", "drop")]);
    let slips = metric(&gw, "isthmus_dns_rate_limited_total", &[("action", "slip")]);
    // Every other limited answer is dropped, the rest slipped (slip = 2).
    assert!(
        dropped > 0.0 && (dropped - slips).abs() <= 1.0,
        "dropped {dropped}, slipped {slips}"
    );
    assert!(slips >= f64::from(slipped), "slipped {slips}");
    // A slipped client retries over TCP and is answered there.
    let tcp = tcp_query(dns, &query(9, WEB, TYPE_A))?
        .and_then(|r| header(&r))
        .context("a TCP answer")?;
    assert_eq!((tcp.rcode, tcp.answers, tcp.truncated), (0, 1, false));
    Ok(())
}

/// A Kubernetes API server on loopback that lists fixed Services,
/// EndpointSlices and ServiceExports and holds watches open with no events:
/// enough for the gateway's Kubernetes discovery (kube-rs list, then watch).
struct FakeApiServer {
    addr: SocketAddr,
}

impl FakeApiServer {
    fn start(services: String, slices: String, exports: String) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let lists = Arc::new([services, slices, exports]);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let lists = lists.clone();
                std::thread::spawn(move || Self::serve(stream, &lists));
            }
        });
        Ok(Self { addr })
    }

    /// Answers the requests of one connection (kube-rs keeps them alive).
    fn serve(mut stream: TcpStream, lists: &[String; 3]) {
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            let target = head.split_whitespace().nth(1).unwrap_or_default();
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let body = match path {
                "/api/v1/services" => Some(&lists[0]),
                "/apis/discovery.k8s.io/v1/endpointslices" => Some(&lists[1]),
                "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports" => Some(&lists[2]),
                _ => None,
            };
            let watch = query
                .split('&')
                .any(|p| p == "watch=true" || p == "watch=1");
            let response = match body {
                // A watch with nothing to say: held open until the client
                // goes away.
                Some(_) if watch => {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if stream.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                    return;
                }
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
                None => {
                    let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
                    format!(
                        "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                }
            };
            if stream.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// A kubeconfig pointing at it.
    fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        )
    }
}

/// The reverse zone of 192.0.2.0/24 at the upstream: the address's real owner.
const REVERSE_ZONE: &str = "$ORIGIN 2.0.192.in-addr.arpa.
$TTL 300
@ IN SOA ns.upstream.test. hostmaster.upstream.test. 1 3600 600 86400 60
@ IN NS ns.upstream.test.
10 IN PTR www.upstream.test.
";

#[test]
fn ptr_for_an_address_outside_the_clusterset_ranges_is_not_answered_from_the_catalog() -> Result<()>
{
    // A headless service whose endpoints claim hostnames: `mail` at
    // 192.0.2.10 (someone else's address) and `inside` at an address of the
    // clusterset range.
    let services = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"10"},"items":[
        {"metadata":{"name":"claims","namespace":"evil","resourceVersion":"5","creationTimestamp":"2026-01-01T00:00:00Z"},
         "spec":{"clusterIP":"None","ports":[{"name":"smtp","protocol":"TCP","port":25}]}}]}"#;
    let slices = r#"{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"11"},"items":[
        {"metadata":{"name":"claims-1","namespace":"evil","resourceVersion":"6","labels":{"kubernetes.io/service-name":"claims"}},
         "addressType":"IPv4",
         "endpoints":[{"addresses":["192.0.2.10"],"hostname":"mail","conditions":{"ready":true}},
                      {"addresses":["127.248.9.9"],"hostname":"inside","conditions":{"ready":true}}],
         "ports":[{"name":"smtp","protocol":"TCP","port":25}]}]}"#;
    let exports = r#"{"kind":"ServiceExportList","apiVersion":"multicluster.x-k8s.io/v1alpha1","metadata":{"resourceVersion":"12"},"items":[
        {"apiVersion":"multicluster.x-k8s.io/v1alpha1","kind":"ServiceExport",
         "metadata":{"name":"claims","namespace":"evil","resourceVersion":"7","creationTimestamp":"2026-01-01T00:00:00Z"}}]}"#;
    let api = FakeApiServer::start(services.to_owned(), slices.to_owned(), exports.to_owned())?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;

    let upstream = Nsd::start(
        &[
            ("upstream.test.", &upstream()),
            ("2.0.192.in-addr.arpa.", REVERSE_ZONE),
        ],
        "",
    )?;
    let (gw, dns, _web) = start(
        "127.248.0.0/16",
        &format!(
            // No health checks: they would probe 192.0.2.10, outside
            // loopback, and hold both claims out of DNS.
            "upstreams = [\"{}\"]\n[upstream.health_check]\ninterval = \"0s\"\n[discovery.kubernetes]\nkubeconfig = \"{}\"\n",
            upstream.addr,
            kubeconfig.display()
        ),
    )?;
    // The claim is in the catalog: the forward name has its address.
    let mail = "mail.test-cluster.claims.evil.svc.clusterset.local";
    wait_for(
        Duration::from_secs(15),
        "the headless service in DNS",
        || (dig_from("127.0.0.2", dns, &[mail, "A"]).data("A") == ["192.0.2.10"]).then_some(()),
    )
    .with_context(|| gw.log())?;
    let ip = web_ip(dns)?;

    let mut failures = Vec::new();
    for i in 0..10 {
        // The address outside the ranges: the upstream's PTR, not the claim.
        let ptr = dig_from("127.0.0.2", dns, &["-x", "192.0.2.10"]);
        ensure!(
            ptr.data("PTR") == ["www.upstream.test."] && !ptr.has_flag("aa"),
            "PTR 192.0.2.10: {}",
            ptr.raw
        );
        // Inside the range: ours, authoritative (the clusterset IP and the
        // endpoint inside the range).
        let own = dig_from("127.0.0.2", dns, &["-x", &ip]);
        if own.data("PTR") != [format!("{WEB}.")] || !own.has_flag("aa") {
            failures.push(format!("PTR {ip} ({i}): {}", own.raw));
        }
        let inside = dig_from("127.0.0.2", dns, &["-x", "127.248.9.9"]);
        if inside.data("PTR") != ["inside.test-cluster.claims.evil.svc.clusterset.local."] {
            failures.push(format!("PTR 127.248.9.9 ({i}): {}", inside.raw));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        metric(
            &gw,
            "isthmus_dns_queries_total",
            &[("type", "PTR"), ("source", "forward"), ("rcode", "NOERROR")]
        ) >= 10.0
    );
    assert!(
        metric(
            &gw,
            "isthmus_dns_queries_total",
            &[
                ("type", "PTR"),
                ("source", "clusterset"),
                ("rcode", "NOERROR")
            ]
        ) >= 20.0
    );
    Ok(())
}
