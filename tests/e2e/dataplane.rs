//! The data plane through two real gateways: curl → gateway A (outbound) →
//! SPIFFE mTLS → gateway B (east-west) → an upstream in B's cluster.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::time::Duration;

use isthmus_tests::two_clusters::{TwoClusters, TwoDomains, tcp_exchange};
use isthmus_tests::{
    Behaviour, EchoServer, Gateway, OpensslMode, OpensslServer, curl, free_addr, metric_value,
};

const START: Duration = Duration::from_secs(20);

/// A has an outbound listener and knows B serves shop/web, shop/hidden,
/// shop/admin and shop/grpc; B serves shop/web from `upstream` (exported),
/// shop/hidden (not exported), shop/admin (exported to another caller only) and
/// shop/grpc from `grpc_upstream` (gRPC, exported), and has A as a peer.
fn two_clusters(
    upstream: std::net::SocketAddr,
    grpc_upstream: std::net::SocketAddr,
) -> TwoClusters {
    TwoClusters::builder()
        .shop_web(upstream)
        .a(r#"[[services]]
namespace = "shop"
name = "hidden"
ports = [{ port = 80 }]
[[services]]
namespace = "shop"
name = "admin"
ports = [{ port = 80 }]
[[services]]
namespace = "shop"
name = "grpc"
ports = [{ port = 9090, protocol = "grpc" }]
"#)
        .peer_services(&["shop/hidden", "shop/admin", "shop/grpc"])
        .b(&format!(
            r#"[[services]]
namespace = "shop"
name = "hidden"
ports = [{{ port = 80 }}]
endpoints = ["{upstream}"]
[[services]]
namespace = "shop"
name = "admin"
ports = [{{ port = 80 }}]
endpoints = ["{upstream}"]
export = true
allow_ids = ["spiffe://a.example/isthmus/gateway/ops"]
[[services]]
namespace = "shop"
name = "grpc"
ports = [{{ port = 9090, protocol = "grpc" }}]
endpoints = ["{grpc_upstream}"]
export = true
"#
        ))
        .b_peers_a()
        .start()
}

#[test]
fn http1_and_h2c_cross_two_gateways_over_spiffe_mtls() {
    let upstream = EchoServer::start("pod-in-b");
    let c = two_clusters(upstream.addr, upstream.addr);
    let url = format!("http://{}/cart?x=1", c.outbound_a);
    let host = "Host: web.shop.svc.clusterset.local:8080";
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    for (proto, extra) in [("HTTP/1.1", None), ("h2c", Some("--http2-prior-knowledge"))] {
        let mut args = vec![
            "-H",
            host,
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        args.extend(extra);
        args.push(&url);
        let r = curl(&args);
        assert_eq!(r.status, 200, "{proto}: {}", r.body);
        let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(echo["served_by"], "pod-in-b", "{proto}");
        assert_eq!(echo["path"], "/cart?x=1", "{proto}");
        let headers = &echo["headers"];
        assert_eq!(
            headers["x-forwarded-client-cert"],
            "By=spiffe://b.example/isthmus/gateway/gw-b;URI=spiffe://a.example/isthmus/gateway/gw-a",
            "{proto}: B says who called"
        );
        assert_eq!(headers["traceparent"], trace, "{proto}: trace propagated");
        assert_eq!(
            headers["x-request-id"].as_str().unwrap().len(),
            32,
            "{proto}: request id added"
        );
    }

    // A request id from the client is kept; a forged XFCC is replaced.
    let r = curl(&[
        "-H",
        host,
        "-H",
        "x-request-id: client-chosen-id",
        "-H",
        "x-forwarded-client-cert: By=evil",
        &url,
    ]);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(echo["headers"]["x-request-id"], "client-chosen-id");
    assert!(
        echo["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap()
            .starts_with("By=spiffe://b.example")
    );
    // A traceparent that is not W3C-valid is replaced by a new trace.
    let r = curl(&["-H", host, "-H", "traceparent: garbage", &url]);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_ne!(echo["headers"]["traceparent"], "garbage");

    // Unknown names are 404 at A; a service B does not export is 404 at B.
    assert_eq!(
        curl(&["-H", "Host: nope.shop.svc.clusterset.local", &url]).status,
        404
    );
    assert_eq!(
        curl(&["-H", "Host: hidden.shop.svc.clusterset.local", &url]).status,
        404
    );

    // A service exported only to another caller: refused at B, logged, counted.
    let r = curl(&["-H", "Host: admin.shop.svc.clusterset.local", &url]);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("not allowed"), "{}", r.body);
    c.b.wait_log("east-west request denied", Duration::from_secs(5))
        .unwrap();

    // Both sides counted, labelled with source and destination clusters.
    let metrics_a = c.a.admin_get("/metrics").body;
    let series_a = "isthmus_requests_total{code=\"200\",destination_cluster=\"gw-b-cluster\",listener=\"outbound\",namespace=\"shop\",service=\"web\",source_cluster=\"gw-a-cluster\",source_trust_domain=\"a.example\"}";
    assert_eq!(metric_value(&metrics_a, series_a), Some(4.0), "{metrics_a}");
    let metrics_b = c.b.admin_get("/metrics").body;
    let series_b = "isthmus_requests_total{code=\"200\",destination_cluster=\"gw-b-cluster\",listener=\"east_west\",namespace=\"shop\",service=\"web\",source_cluster=\"gw-a-cluster\",source_trust_domain=\"a.example\"}";
    assert_eq!(metric_value(&metrics_b, series_b), Some(4.0), "{metrics_b}");
    let denied =
        "isthmus_authz_denied_total{caller_trust_domain=\"a.example\",service=\"shop/admin\"}";
    assert_eq!(metric_value(&metrics_b, denied), Some(1.0), "{metrics_b}");
    // The gateways multiplex over pooled mTLS: one connection per service (the
    // SNI names the service, so each has its own pool), not one per request:
    // 8 requests to 3 services.
    let handshakes = metric_value(
        &metrics_a,
        "isthmus_tls_handshakes_total{result=\"ok\",side=\"client\"}",
    )
    .unwrap();
    assert_eq!(
        handshakes, 3.0,
        "{handshakes} handshakes for 8 requests to 3 services"
    );
    // Access log lines carry the request id.
    c.a.access_lines(&["client-chosen-id"]).unwrap();
}

#[test]
fn passthrough_routes_the_workloads_own_tls_by_sni() {
    let domains = TwoDomains::new();
    let ca_b = &domains.ca_b;
    // The workload's own identity, which only the workload presents.
    let workload = domains
        .pki
        .issue(ca_b, "spiffe://b.example/ns/shop/sa/ledger", "workload");
    let server = OpensslServer::start(&workload, OpensslMode::Reverse);
    let (admin_b, east_west_b) = (free_addr(), free_addr());
    let config = domains.b_config(
        admin_b,
        &format!(
            r#"[listeners]
east_west = "{east_west_b}"
[[services]]
namespace = "shop"
name = "ledger"
ports = [{{ port = 8443, protocol = "tcp" }}]
endpoints = ["{upstream}"]
export = true
mode = "passthrough"
"#,
            upstream = server.addr,
        ),
    );
    let mut b = Gateway::start(&config, admin_b, &[]).unwrap();
    b.wait_ready(START).unwrap();

    let s_client = |sni: &str| {
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &east_west_b.to_string(),
                "-servername",
                sni,
                "-CAfile",
            ])
            .arg(ca_b.join("ca.crt"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"isthmus\n").unwrap();
        // Give the reply time to arrive before closing our side.
        std::thread::sleep(Duration::from_millis(500));
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // The workload's certificate comes back through B, verified end to end, and
    // data flows both ways.
    let out = s_client("outbound_.8443_._.ledger.shop.svc.cluster.local");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains("CN = ledger"),
        "the workload's certificate, not B's: {out}"
    );
    assert!(
        out.contains("sumhtsi"),
        "the workload echoed our line reversed: {out}"
    );

    // Another SNI is not passed through: B terminates and wants a client SVID.
    let out = s_client("outbound_.80_._.web.shop.svc.cluster.local");
    assert!(!out.contains("sumhtsi"), "{out}");

    let metrics = b.admin_get("/metrics").body;
    // The TLS is the workload's: the gateway never sees who called.
    let ok = "isthmus_tcp_connections_total{listener=\"east_west\",namespace=\"shop\",result=\"ok\",service=\"ledger\",source_cluster=\"unknown\",source_trust_domain=\"\"}";
    assert_eq!(metric_value(&metrics, ok), Some(1.0), "{metrics}");
    let passthrough = "isthmus_tls_handshakes_total{result=\"passthrough\",side=\"server\"}";
    assert_eq!(metric_value(&metrics, passthrough), Some(1.0), "{metrics}");
    let no_cert = "isthmus_tls_handshakes_total{result=\"no_client_cert\",side=\"server\"}";
    assert_eq!(metric_value(&metrics, no_cert), Some(1.0), "{metrics}");

    // Garbage instead of a ClientHello is refused and counted; B keeps serving.
    let mut tcp = std::net::TcpStream::connect(east_west_b).unwrap();
    std::io::Write::write_all(&mut tcp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    isthmus_tests::wait_for(Duration::from_secs(5), "the garbage to be counted", || {
        let m = b.admin_get("/metrics").body;
        metric_value(
            &m,
            "isthmus_tls_handshakes_total{result=\"malformed\",side=\"server\"}",
        )
        .map(|_| ())
    })
    .unwrap();
    let out = s_client("outbound_.8443_._.ledger.shop.svc.cluster.local");
    assert!(out.contains("sumhtsi"), "{out}");
}

#[test]
fn grpc_unary_and_streaming_cross_two_gateways() {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;

    let rt = tokio::runtime::Runtime::new().unwrap();
    // A real gRPC server in B's cluster: grpc.health.v1 (unary Check, streaming Watch).
    let (grpc_addr, reporter) = isthmus_tests::grpc_health_server(&rt, "shop.Ledger");
    let http = EchoServer::start("pod-in-b");
    let c = two_clusters(http.addr, grpc_addr);

    rt.block_on(async {
        let channel = isthmus_tests::grpc_channel_via(
            &format!("http://{}", c.outbound_a),
            "http://grpc.shop.svc.clusterset.local:9090",
        )
        .await;
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: "shop.Ledger".into(),
        };

        // Unary.
        let reply = client.check(request()).await.unwrap().into_inner();
        assert_eq!(reply.status(), Status::Serving);
        // A gRPC error status crosses both gateways as trailers.
        let err = client
            .check(HealthCheckRequest {
                service: "shop.Unknown".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);

        // Server streaming: the first status, then a change pushed by the server.
        let mut stream = client.watch(request()).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status(), Status::Serving);
        reporter
            .set_service_status("shop.Ledger", ServingStatus::NotServing)
            .await;
        let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the update crosses both gateways while the stream stays open")
            .unwrap()
            .unwrap();
        assert_eq!(second.status(), Status::NotServing);
    });

    let metrics = c.b.admin_get("/metrics").body;
    let grpc = "isthmus_requests_total{code=\"200\",destination_cluster=\"gw-b-cluster\",listener=\"east_west\",namespace=\"shop\",service=\"grpc\",source_cluster=\"gw-a-cluster\",source_trust_domain=\"a.example\"}";
    assert!(metric_value(&metrics, grpc) >= Some(2.0), "{metrics}");
}

#[test]
fn websocket_upgrades_cross_two_gateways() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Runtime::new().unwrap();
    // A WebSocket echo server in B's cluster.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let ws_addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let c = two_clusters(ws_addr, ws_addr);

    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(c.outbound_a).await.unwrap();
        let (mut ws, response) =
            tokio_tungstenite::client_async("ws://web.shop.svc.clusterset.local:8080/chat", tcp)
                .await
                .unwrap_or_else(|e| {
                    let warn = |log: String| {
                        log.lines()
                            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    };
                    panic!(
                        "upgrade failed: {e}\nA:\n{}\nB:\n{}",
                        warn(c.a.log()),
                        warn(c.b.log())
                    )
                });
        assert_eq!(response.status(), 101);
        for i in 0..3 {
            let text = format!("message {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(echoed.into_text().unwrap().as_str(), text);
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_data().as_ref(), &[0u8, 1, 2, 255]);
        ws.close(None).await.unwrap();
    });
}

/// One gateway with an outbound listener in front of `endpoints` of shop/web.
fn single_gateway(endpoints: &[std::net::SocketAddr]) -> (Gateway, std::net::SocketAddr) {
    isthmus_tests::solo_gateway(endpoints, "").unwrap()
}

#[test]
fn a_dead_endpoint_costs_no_request() {
    let live = EchoServer::start("live");
    // A port nothing listens on: connections are refused.
    let dead = free_addr();
    let (gw, outbound) = single_gateway(&[dead, live.addr]);
    let url = format!("http://{outbound}/");
    let ids: Vec<String> = (0..20).map(|i| format!("dead-endpoint-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = curl(&[
            "-H",
            "Host: web.shop.svc.clusterset.local",
            "-H",
            &format!("x-request-id: {id}"),
            &url,
        ]);
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    // Half the requests hit the dead endpoint first and were retried.
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let lines = gw.access_lines(&ids).unwrap();
    let retried = lines.iter().filter(|l| l["attempts"] == 2).count();
    assert!(retried >= 5, "{retried} requests retried:\n{}", gw.log());
}

#[test]
fn the_access_log_samples_keeps_failures_and_is_written_out_at_stop() {
    let upstream = EchoServer::start("web");
    let (admin, outbound) = (free_addr(), free_addr());
    let endpoints = format!("\"{}\"", upstream.addr);
    let config = isthmus_tests::solo_config(admin, outbound, &endpoints, "");
    let sampled =
        |ratio: &str| config.replace("[log]\n", &format!("[log]\naccess_sample = {ratio}\n"));
    let mut gw = Gateway::start(&sampled("0.0"), admin, &[]).unwrap();
    gw.wait_ready(START).unwrap();
    let url = format!("http://{outbound}/");
    let get = |id: &str| {
        curl(&[
            "-H",
            "Host: web.shop.svc.clusterset.local",
            "-H",
            &format!("x-request-id: {id}"),
            &url,
        ])
        .status
    };
    // access_sample = 0: successes are not logged, failures are.
    for i in 0..5 {
        assert_eq!(get(&format!("unsampled-{i}")), 200);
    }
    upstream.set(Behaviour::Status(503));
    assert_eq!(get("failed"), 503);
    upstream.set(Behaviour::Status(200));
    let failed = gw.access_lines(&["failed"]).unwrap();
    assert_eq!(failed[0]["status"], 503, "{}", failed[0]);
    // Lines are written in order: the earlier successes would be there by now.
    assert!(!gw.log().contains("unsampled-"), "{}", gw.log());

    // Back to every request on reload; then a request right before SIGTERM.
    std::fs::write(gw.config_path(), sampled("1.0")).unwrap();
    gw.signal("HUP").unwrap();
    gw.wait_log("configuration reloaded", START).unwrap();
    assert_eq!(get("before-stop"), 200);
    gw.signal("TERM").unwrap();
    let (status, _) = gw.wait_exit(START).unwrap();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    let log = gw.log_json();
    let logged = |id: &str| log.iter().any(|l| l["request_id"] == id);
    assert!(logged("before-stop"), "{}", gw.log());
    // The line logged just before the process exits made it out too.
    assert!(
        log.iter().any(|l| l["message"] == "isthmus stopped"),
        "{}",
        gw.log()
    );
}

#[test]
fn a_slow_client_does_not_stall_others() {
    use std::io::Write;
    let live = EchoServer::start("live");
    let (_gw, outbound) = single_gateway(&[live.addr]);
    // Several clients trickle a request header a byte at a time.
    let mut slow: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(outbound).unwrap())
        .collect();
    for conn in &mut slow {
        conn.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    }
    // Meanwhile everyone else is served promptly.
    let url = format!("http://{outbound}/");
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let r = curl(&["-H", "Host: web.shop.svc.clusterset.local", &url]);
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // An oversized request header (2 MiB) is refused without harming the listener.
    let mut big = std::net::TcpStream::connect(outbound).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: web.shop.svc.clusterset.local\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2 << 20)
    );
    // The gateway may close before reading it all; that is a refusal too.
    let _ = big.write_all(request.as_bytes());
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut big, &mut answer);
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a 2 MiB header must not be proxied"
    );
    assert_eq!(
        curl(&["-H", "Host: web.shop.svc.clusterset.local", &url]).status,
        200
    );
    drop(slow);
}

#[test]
fn tcp_ports_cross_two_gateways_one_tls_connection_per_stream() {
    let remote_echo = isthmus_tests::tcp_echo();
    let local_echo = isthmus_tests::tcp_echo();
    let (db_listen, cache_listen) = (free_addr(), free_addr());
    let TwoClusters { a, b, .. } = TwoClusters::builder()
        .without_outbound()
        .shop_db(db_listen, remote_echo)
        .b_peers_a()
        .a(&format!(
            r#"[[services]]
namespace = "shop"
name = "cache"
ports = [{{ port = 6379, protocol = "tcp", listen = "{cache_listen}" }}]
endpoints = ["{local_echo}"]
"#
        ))
        .start();

    // Through A's TCP listener, over mTLS to B, to B's echo; several streams.
    for _ in 0..3 {
        tcp_exchange(db_listen, 5);
    }
    // A local TCP service stays local.
    tcp_exchange(cache_listen, 2);

    // On both sides the source is A's cluster and trust domain.
    let ok = |gw: &Gateway, listener: &str, service: &str| {
        let m = gw.admin_get("/metrics").body;
        metric_value(
            &m,
            &format!(
                "isthmus_tcp_connections_total{{listener=\"{listener}\",namespace=\"shop\",result=\"ok\",service=\"{service}\",source_cluster=\"gw-a-cluster\",source_trust_domain=\"a.example\"}}"
            ),
        )
    };
    assert_eq!(ok(&a, "outbound", "db"), Some(3.0));
    assert_eq!(ok(&b, "east_west", "db"), Some(3.0));
    assert_eq!(
        ok(&a, "outbound", "cache"),
        Some(1.0),
        "one local connection"
    );
    let m = a.admin_get("/metrics").body;
    // One TLS connection per TCP stream.
    assert_eq!(
        metric_value(
            &m,
            "isthmus_tls_handshakes_total{result=\"ok\",side=\"client\"}"
        ),
        Some(3.0),
        "{m}"
    );
}
