//! The load and expiry gauges with real clients: idle keep-alive connections
//! held by Python's `http.client`, concurrent `curl`s against a slow upstream
//! and against one whose accept queue is full (its connects never complete),
//! and the SVID and bundle expiry checked against `openssl x509 -enddate`.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_tests::two_clusters::{TwoDomains, federated};
use isthmus_tests::{
    Behaviour, EchoServer, Gateway, free_addr, gateway_config, metric_value, python_client,
    solo_gateway, undocumented_metrics, wait_for,
};

const HOST: &str = "Host: web.shop.svc.clusterset.local";
const STUCK_HOST: &str = "Host: stuck.shop.svc.clusterset.local";

fn metrics(gw: &Gateway) -> String {
    let text = gw.admin_get("/metrics").body;
    let missing = undocumented_metrics(&text);
    assert!(
        missing.is_empty(),
        "undocumented in docs/metrics.md: {missing:?}"
    );
    text
}

/// `name{listener="<listener>"}` on `gw`, or -1 when it is not exported.
fn gauge(gw: &Gateway, name: &str, listener: &str) -> i64 {
    metric_value(&metrics(gw), &format!("{name}{{listener=\"{listener}\"}}"))
        .map_or(-1, |v| v as i64)
}

/// The status each of `clients` (from [`curls`]) got.
fn statuses(clients: Vec<Child>) -> Vec<String> {
    clients
        .into_iter()
        .map(|c| String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap())
        .collect()
}

/// Starts `n` concurrent `curl`s of `url` with `host`, each giving up after
/// `max_time` seconds.
fn curls(n: usize, host: &'static str, url: &str, max_time: &str) -> Vec<Child> {
    (0..n)
        .map(|_| {
            Command::new("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    max_time,
                ])
                .args(["-H", host, url])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// A listener whose accept queue is full and never drained: the kernel drops
/// further SYNs, so a connect to it neither succeeds nor fails until its
/// timeout. Returns it with the connection that fills the queue.
fn stalled_listener() -> (std::net::TcpListener, std::net::TcpStream) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let listener = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.listen(0).unwrap().into_std().unwrap()
    });
    let filler = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    (listener, filler)
}

#[test]
fn in_flight_and_waiting_follow_slow_and_stalled_upstreams() {
    let slow = EchoServer::start("slow");
    slow.set(Behaviour::Delay(Duration::from_secs(3)));
    let (stuck, _filler) = stalled_listener();
    let extra = format!(
        r#"[[services]]
namespace = "shop"
name = "stuck"
ports = [{{ port = 80 }}]
endpoints = ["{}"]
[upstream]
connect_timeout = "2s"
"#,
        stuck.local_addr().unwrap()
    );
    let (gw, outbound) = solo_gateway(&[slow.addr], &extra).unwrap();
    let url = format!("http://{outbound}/");
    let (in_flight, waiting) = (
        "isthmus_requests_in_flight",
        "isthmus_upstream_requests_waiting",
    );
    assert_eq!(gauge(&gw, in_flight, "outbound"), 0);
    assert_eq!(gauge(&gw, waiting, "outbound"), 0);

    // Four requests held by the upstream: in flight, connected (not waiting).
    let clients = curls(4, HOST, &url, "20");
    wait_for(Duration::from_secs(3), "4 requests in flight", || {
        (gauge(&gw, in_flight, "outbound") == 4).then_some(())
    })
    .unwrap();
    assert_eq!(gauge(&gw, waiting, "outbound"), 0);
    assert_eq!(statuses(clients), ["200"; 4]);
    assert_eq!(gauge(&gw, in_flight, "outbound"), 0);

    // Clients that give up before the upstream answers: counted until the
    // gateway is done with them, then given back.
    let quitters = curls(2, HOST, &url, "1");
    wait_for(Duration::from_secs(3), "2 requests in flight", || {
        (gauge(&gw, in_flight, "outbound") == 2).then_some(())
    })
    .unwrap();
    assert_eq!(statuses(quitters), ["000"; 2], "curl gave up");
    wait_for(Duration::from_secs(10), "aborted requests to end", || {
        (gauge(&gw, in_flight, "outbound") == 0).then_some(())
    })
    .unwrap();

    // Three requests whose connects hang: waiting, then failed at the
    // connect timeout, and no longer counted anywhere.
    let clients = curls(3, STUCK_HOST, &url, "20");
    wait_for(Duration::from_secs(3), "3 requests waiting", || {
        let counts = (
            gauge(&gw, waiting, "outbound"),
            gauge(&gw, in_flight, "outbound"),
        );
        (counts == (3, 3)).then_some(())
    })
    .unwrap();
    let started = std::time::Instant::now();
    let got = statuses(clients);
    eprintln!("stuck requests: {got:?} after {:?}", started.elapsed());
    assert!(got.iter().all(|s| s.starts_with('5')), "{got:?}");
    assert_eq!(gauge(&gw, waiting, "outbound"), 0);
    assert_eq!(gauge(&gw, in_flight, "outbound"), 0);
    // The east-west listener is not configured: it has no series.
    assert_eq!(gauge(&gw, in_flight, "east_west"), -1);
}

/// Holds `n` kept-alive connections to `outbound`, each after one request,
/// until its stdin closes.
fn idle_clients(outbound: SocketAddr, n: usize) -> Child {
    let script = format!(
        r#"
import http.client, sys
conns = []
for _ in range({n}):
    c = http.client.HTTPConnection("{ip}", {port}, timeout=10)
    c.request("GET", "/", headers={{"Host": "web.shop.svc.clusterset.local"}})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    conns.append(c)
print("open", flush=True)
sys.stdin.read()
"#,
        ip = outbound.ip(),
        port = outbound.port()
    );
    python_client()
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn open_connections_follow_idle_keep_alive_clients() {
    let echo = EchoServer::start("web");
    let (gw, outbound) = solo_gateway(&[echo.addr], "").unwrap();
    let open = "isthmus_connections_open";
    assert_eq!(gauge(&gw, open, "outbound"), 0);
    // The scrape itself is a connection of the admin listener.
    assert_eq!(gauge(&gw, open, "admin"), 1);

    let mut clients = idle_clients(outbound, 5);
    let mut line = String::new();
    BufReader::new(clients.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "open", "the Python clients connected");
    assert_eq!(gauge(&gw, open, "outbound"), 5);
    // Idle connections hold no request.
    assert_eq!(gauge(&gw, "isthmus_requests_in_flight", "outbound"), 0);

    let mut stdin = clients.stdin.take().unwrap();
    stdin.flush().unwrap();
    drop(stdin);
    assert!(clients.wait().unwrap().success());
    wait_for(Duration::from_secs(5), "the connections to close", || {
        (gauge(&gw, open, "outbound") == 0).then_some(())
    })
    .unwrap();
}

/// `notAfter` of the certificate in `pem`, as Unix seconds, read by openssl
/// and converted by GNU date.
fn not_after(pem: &Path) -> i64 {
    let out = Command::new("openssl")
        .args(["x509", "-enddate", "-noout", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let date = text.trim().strip_prefix("notAfter=").unwrap().to_owned();
    let out = Command::new("date")
        .args(["-u", "-d", &date, "+%s"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn expiry_gauges_count_down_to_the_svid_and_each_trust_domains_earliest_authority() {
    // `_pki` holds the files until the test ends.
    let TwoDomains {
        pki: _pki,
        ca_a,
        ca_b,
        tls_a,
        ..
    } = TwoDomains::new();
    let admin = free_addr();
    let config = gateway_config(
        "gw-a",
        "a.example",
        admin,
        &tls_a,
        &ca_a.join("bundle.pem"),
        &federated("b.example", &ca_b.join("bundle.pem")),
    );
    let mut gw = Gateway::start(&config, admin, &[]).unwrap();
    gw.wait_ready(Duration::from_secs(20)).unwrap();

    let text = metrics(&gw);
    let near = |series: &str, cert: &Path| {
        let got = metric_value(&text, series).unwrap_or_else(|| panic!("{series} in {text}"));
        let want = not_after(cert) - now();
        assert!(
            (got as i64 - want).abs() <= 10,
            "{series} = {got}, openssl says {want}"
        );
    };
    near("isthmus_tls_svid_expiry_seconds", &tls_a.join("svid.crt"));
    near(
        "isthmus_trust_bundle_expiry_seconds{trust_domain=\"a.example\"}",
        &ca_a.join("ca.crt"),
    );
    near(
        "isthmus_trust_bundle_expiry_seconds{trust_domain=\"b.example\"}",
        &ca_b.join("ca.crt"),
    );
    // The SVID's absolute expiry stays exported beside the countdown.
    let svid_at = metric_value(&text, "isthmus_tls_svid_expiry_timestamp_seconds").unwrap();
    assert_eq!(svid_at as i64, not_after(&tls_a.join("svid.crt")));
    // Computed at each scrape: it counts down.
    std::thread::sleep(Duration::from_millis(2100));
    let later = metric_value(&metrics(&gw), "isthmus_tls_svid_expiry_seconds").unwrap();
    let first = metric_value(&text, "isthmus_tls_svid_expiry_seconds").unwrap();
    assert!(later <= first - 2.0, "{first} then {later}");
}
