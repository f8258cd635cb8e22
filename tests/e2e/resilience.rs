//! Backend protection with real gateways and real upstreams: outlier ejection
//! and return, failover away from a dead peer gateway, circuit breaking,
//! retries after the request went out (idempotent only) and timeouts.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use isthmus_tests::two_clusters::{TwoDomains, peer};
use isthmus_tests::{
    Behaviour, EchoServer, Gateway, HttpResponse, curl, free_addr, metric_sum, metric_value,
    served_by, solo_gateway, undocumented_metrics, upstream_backends, wait_for,
};

const START: Duration = Duration::from_secs(20);
const HOST: &str = "Host: web.shop.svc.clusterset.local";

/// One gateway whose outbound listener serves shop/web from `endpoints`,
/// with `upstream` as its `[upstream]` section; returns it and its URL.
fn gateway(endpoints: &[SocketAddr], upstream: &str) -> (Gateway, String) {
    let (gw, outbound) = solo_gateway(endpoints, &format!("[upstream]\n{upstream}")).unwrap();
    (gw, format!("http://{outbound}/"))
}

/// The state `/debug/upstreams` reports for `backend` of shop/web.
fn backend_state(gw: &Gateway, backend: SocketAddr) -> serde_json::Value {
    upstream_backends(gw, "shop/web")
        .into_iter()
        .find(|b| b["address"] == backend.to_string())
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn outlier_ejection_and_return() {
    let good = EchoServer::start("good");
    let flaky = EchoServer::start("flaky");
    // Passive detection alone: active checks off (a 503-answering server
    // still accepts TCP, so they would not see it anyway).
    let (gw, url) = gateway(
        &[good.addr, flaky.addr],
        r#"[upstream.outlier_detection]
consecutive_failures = 3
base_ejection_time = "1s"
max_ejection_time = "10s"
[upstream.health_check]
interval = "0s""#,
    );
    flaky.set(Behaviour::Status(503));
    let answers: Vec<HttpResponse> = (0..30).map(|_| curl(&["-H", HOST, &url])).collect();
    let failed = answers.iter().filter(|r| r.status == 503).count();
    // Three 503s eject it; everything after goes to the good endpoint.
    assert_eq!(
        failed,
        3,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(
        answers[10..]
            .iter()
            .all(|r| r.status == 200 && served_by(r) == "good")
    );
    let state = backend_state(&gw, flaky.addr);
    assert_eq!(state["ejected"], true, "{state}");
    let metrics = gw.admin_get("/metrics").body;
    let ejections = format!(
        "isthmus_upstream_ejections_total{{backend=\"{}\",identity=\"\",namespace=\"shop\",service=\"web\"}}",
        flaky.addr
    );
    assert_eq!(metric_value(&metrics, &ejections), Some(1.0), "{metrics}");

    // Healed, it gets traffic again once the ejection (1 s) is over.
    flaky.set(Behaviour::Status(200));
    let back = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "the flaky endpoint to serve again",
        || {
            let r = curl(&["-H", HOST, &url]);
            (served_by(&r) == "flaky").then_some(())
        },
    )
    .unwrap();
    let returned_after = back.elapsed();
    assert_eq!(backend_state(&gw, flaky.addr)["ejected"], false);

    // Failing again, it is ejected for twice as long.
    flaky.set(Behaviour::Status(503));
    for _ in 0..10 {
        curl(&["-H", HOST, &url]);
    }
    let state = backend_state(&gw, flaky.addr);
    let left = state["ejected_for_seconds"].as_f64().unwrap_or_default();
    assert!(left > 1.0 && left <= 2.0, "second ejection: {state}");
    assert_eq!(
        metric_value(&gw.admin_get("/metrics").body, &ejections),
        Some(2.0)
    );
    eprintln!("ejected after 3 failures; back in service {returned_after:?} after healing");
}

#[test]
fn circuit_breaker_refuses_at_once_instead_of_queueing() {
    let slow = EchoServer::start("slow");
    slow.set(Behaviour::Delay(Duration::from_millis(1500)));
    let (gw, url) = gateway(
        &[slow.addr],
        r#"[upstream.circuit_breaker]
max_requests = 2"#,
    );
    let url2 = url.clone();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = url2.clone();
            std::thread::spawn(move || curl(&["-H", HOST, &url]))
        })
        .collect();
    // Wait until both are in flight at the backend.
    wait_for(Duration::from_secs(5), "two requests in flight", || {
        (backend_state(&gw, slow.addr)["requests"] == 2).then_some(())
    })
    .unwrap();
    let started = Instant::now();
    let refused = curl(&["-i", "-H", HOST, &url]);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused
            .body
            .to_ascii_lowercase()
            .contains("x-isthmus-overloaded: true"),
        "{}",
        refused.body
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused at once"
    );
    for h in held {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // Below the limit again, requests flow.
    assert_eq!(curl(&["-H", HOST, &url]).status, 200);
    let metrics = gw.admin_get("/metrics").body;
    assert_eq!(
        metric_value(
            &metrics,
            "isthmus_upstream_overloaded_total{namespace=\"shop\",service=\"web\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn only_idempotent_requests_are_retried_after_the_request_went_out() {
    let good = EchoServer::start("good");
    let rude = EchoServer::start("rude");
    rude.set(Behaviour::Close);
    let (gw, url) = gateway(
        &[rude.addr, good.addr],
        r#"[upstream.outlier_detection]
consecutive_failures = 0
[upstream.health_check]
interval = "0s""#,
    );
    // Requests alternate between the two endpoints.
    let gets: Vec<_> = (0..6).map(|_| curl(&["-H", HOST, &url])).collect();
    let posts: Vec<_> = (0..6)
        .map(|_| curl(&["-H", HOST, "-d", "order=1", &url]))
        .collect();
    assert!(
        gets.iter().all(|r| r.status == 200),
        "GETs are retried elsewhere"
    );
    let post_codes: Vec<u16> = posts.iter().map(|r| r.status).collect();
    assert!(
        post_codes.contains(&502),
        "a POST that reached the rude endpoint is not replayed: {post_codes:?}"
    );
    assert!(post_codes.contains(&200), "{post_codes:?}");
    let metrics = gw.admin_get("/metrics").body;
    let retries = metric_value(
        &metrics,
        "isthmus_upstream_retries_total{namespace=\"shop\",reason=\"after_send\",service=\"web\"}",
    )
    .unwrap_or_default();
    assert!(retries >= 1.0, "{metrics}");
}

#[test]
fn a_silent_upstream_times_out_with_504() {
    let silent = EchoServer::start("silent");
    silent.set(Behaviour::Delay(Duration::from_secs(5)));
    let (gw, url) = gateway(
        &[silent.addr],
        r#"request_timeout = "300ms"
max_attempts = 1"#,
    );
    let started = Instant::now();
    let r = curl(&["-H", HOST, &url]);
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let metrics = gw.admin_get("/metrics").body;
    let timeouts = "isthmus_request_errors_total{listener=\"outbound\",namespace=\"shop\",reason=\"upstream_timeout\",service=\"web\"}";
    assert_eq!(metric_value(&metrics, timeouts), Some(1.0), "{metrics}");
}

/// Clients that give up are not gateway failures: curl's `--max-time` over
/// HTTP/1.1 and h2c before the slow backend answers, and a gRPC client that
/// cancels its stream (`RST_STREAM` `CANCEL`) once it has what it wanted.
/// Each is logged at INFO with its reason, counted as `client_closed` (status
/// 499 when no response had started), and never held against the backend;
/// the gateway logs no ERROR for them.
#[test]
fn a_client_that_gives_up_is_logged_at_info_and_not_held_against_the_backend() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;

    let slow = EchoServer::start("slow");
    slow.set(Behaviour::Delay(Duration::from_secs(2)));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (grpc_addr, _reporter) = isthmus_tests::grpc_health_server(&rt, "shop.Ledger");
    // Two failures in a row would eject the only backend: the aborts must
    // not count as failures.
    let (gw, url) = gateway(
        &[slow.addr],
        &format!(
            r#"[upstream.outlier_detection]
consecutive_failures = 2
[upstream.health_check]
interval = "0s"
[[services]]
namespace = "shop"
name = "grpc"
ports = [{{ port = 9090, protocol = "grpc" }}]
endpoints = ["{grpc_addr}"]"#
        ),
    );

    for (id, extra) in [
        ("abort-h1", None),
        ("abort-h2c", Some("--http2-prior-knowledge")),
    ] {
        let header = format!("x-request-id: {id}");
        let mut args = vec!["--max-time", "0.5", "-H", HOST, "-H", &header];
        args.extend(extra);
        args.push(&url);
        let r = curl(&args);
        assert_eq!(r.status, 0, "{id}: curl gave up before any answer: {r:?}");
    }
    rt.block_on(async {
        let outbound = url.trim_end_matches('/');
        let channel =
            isthmus_tests::grpc_channel_via(outbound, "http://grpc.shop.svc.clusterset.local:9090")
                .await;
        let mut client = HealthClient::new(channel);
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: "shop.Ledger".into(),
        });
        request
            .metadata_mut()
            .insert("x-request-id", "abort-grpc".parse().unwrap());
        let mut stream = client.watch(request).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some());
        // Dropping the stream cancels the call: RST_STREAM(CANCEL).
        drop(stream);
        // The connection stays up and serves the next call.
        let reply = client
            .check(HealthCheckRequest {
                service: "shop.Ledger".into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.get_ref().status(), Status::Serving);
    });

    let ids = ["abort-h1", "abort-h2c", "abort-grpc"];
    let access = gw.access_lines(&ids).unwrap();
    let statuses: Vec<_> = access.iter().map(|l| l["status"].clone()).collect();
    assert_eq!(statuses, [499, 499, 200], "{access:?}");
    for (id, line) in ids.iter().zip(&access) {
        assert!(line["error"].is_string(), "{id}: {line}");
    }
    wait_for(Duration::from_secs(5), "an INFO line per abort", || {
        let lines: Vec<serde_json::Value> = gw
            .log_json()
            .into_iter()
            .filter(|l| l["message"] == "request ended by the client")
            .collect();
        ids.iter()
            .all(|id| {
                lines.iter().any(|l| {
                    l["request_id"] == *id && l["level"] == "INFO" && l["reason"] == "client_closed"
                })
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", gw.log()));
    let loud: Vec<serde_json::Value> = gw
        .log_json()
        .into_iter()
        .filter(|l| l["level"] == "ERROR" || l["level"] == "WARN")
        .collect();
    assert!(
        loud.is_empty(),
        "no WARN or ERROR for a client abort: {loud:#?}"
    );

    let metrics = gw.admin_get("/metrics").body;
    let closed = |service: &str| {
        metric_sum(
            &metrics,
            "isthmus_request_errors_total",
            &[("service", service), ("reason", "client_closed")],
        )
    };
    assert_eq!((closed("web"), closed("grpc")), (2.0, 1.0), "{metrics}");
    let requests = |code: &str| {
        metric_sum(
            &metrics,
            "isthmus_requests_total",
            &[("service", "web"), ("code", code)],
        )
    };
    assert_eq!((requests("499"), requests("502")), (2.0, 0.0), "{metrics}");
    assert_eq!(backend_state(&gw, slow.addr)["ejected"], false);
    let missing = undocumented_metrics(&metrics);
    assert!(missing.is_empty(), "docs/metrics.md lacks:\n{missing:#?}");
}

/// A serves shop/web through two peer gateways, B1 and B2. Killing B1: requests
/// fail over to B2 without a client seeing an error, and active health checks
/// mark B1 down within a few seconds.
#[test]
fn a_dead_peer_gateway_stops_getting_requests() {
    let upstream = EchoServer::start("web");
    let domains = TwoDomains::new();
    let (admin_a, outbound_a) = (free_addr(), free_addr());
    let mut peers = String::new();
    let mut bs = Vec::new();
    for name in ["gw-b1", "gw-b2"] {
        let id = format!("spiffe://b.example/isthmus/gateway/{name}");
        let tls = domains.pki.issue(&domains.ca_b, &id, name);
        let (admin, east_west) = (free_addr(), free_addr());
        let config = domains.b_config_of(
            name,
            &tls,
            admin,
            &format!(
                r#"[listeners]
east_west = "{east_west}"
[[services]]
namespace = "shop"
name = "web"
ports = [{{ port = 80 }}]
endpoints = ["{upstream}"]
export = true
"#,
                upstream = upstream.addr,
            ),
        );
        let mut gw = Gateway::start(&config, admin, &[]).unwrap();
        gw.wait_ready(START).unwrap();
        peers.push_str(&peer(
            &format!("{name}-cluster"),
            &id,
            east_west,
            Some(&["shop/web"]),
        ));
        bs.push((gw, east_west));
    }
    let config = domains.a_outbound_config(
        admin_a,
        outbound_a,
        &format!("[upstream.health_check]\ninterval = \"500ms\"\n{peers}"),
    );
    let mut a = Gateway::start(&config, admin_a, &[]).unwrap();
    a.wait_ready(START).unwrap();
    let url = format!("http://{outbound_a}/");
    for _ in 0..6 {
        assert_eq!(curl(&["-H", HOST, &url]).status, 200);
    }

    let (b1, b1_addr) = bs.remove(0);
    drop(b1); // killed
    let killed = Instant::now();
    for i in 0..20 {
        let r = curl(&["-H", HOST, &url]);
        assert_eq!(r.status, 200, "request {i} after B1 died: {}", r.body);
    }
    // B1 is a peer gateway: its health is kept under its SPIFFE ID.
    let healthy = format!(
        "isthmus_upstream_healthy{{backend=\"{b1_addr}\",identity=\"spiffe://b.example/isthmus/gateway/gw-b1\"}}"
    );
    wait_for(
        Duration::from_secs(5),
        "health checks to mark B1 down",
        || {
            let m = a.admin_get("/metrics").body;
            (metric_value(&m, &healthy) == Some(0.0)).then_some(())
        },
    )
    .unwrap();
    let detected = killed.elapsed();
    // From now on B1 gets no attempt at all: every request is a first-try success.
    let ids: Vec<String> = (0..10).map(|i| format!("after-b1-down-{i}")).collect();
    for id in &ids {
        let r = curl(&["-H", HOST, "-H", &format!("x-request-id: {id}"), &url]);
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let retried: Vec<_> = a
        .access_lines(&ids)
        .unwrap()
        .into_iter()
        .filter(|l| l["attempts"] != 1)
        .collect();
    assert!(
        retried.is_empty(),
        "requests tried the dead gateway: {retried:?}"
    );
    eprintln!("dead peer gateway marked down {detected:?} after it was killed");
}
