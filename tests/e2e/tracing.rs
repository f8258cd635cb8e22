//! Distributed tracing through real gateways: spans of one trace across two
//! hops reach an OTLP/gRPC receiver (the `TraceService` of
//! `opentelemetry-proto`, served by tonic here); OTLP/HTTP bodies decode as
//! `ExportTraceServiceRequest`; a slow collector costs requests nothing, its
//! spans are dropped and counted.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_tests::mesh::reload;
use isthmus_tests::two_clusters::TwoClusters;
use isthmus_tests::{EchoServer, curl, free_addr, metric_value, solo_gateway, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use parking_lot::Mutex;

const WAIT: Duration = Duration::from_secs(20);

/// What a receiver got: each span with its resource's `service.instance.id`
/// (the gateway that sent it).
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock();
        for rs in request.resource_spans {
            let gateway = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (gateway.clone(), s)));
            }
        }
    }

    /// The spans of trace `trace_id` (hex), once there are `n`.
    fn trace(&self, trace_id: &str, n: usize) -> Vec<(String, Span)> {
        wait_for(WAIT, "spans at the receiver", || {
            let spans: Vec<_> = self
                .0
                .lock()
                .iter()
                .filter(|(_, s)| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect();
            (spans.len() >= n).then_some(spans)
        })
        .unwrap()
    }

    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span's attributes, values as strings.
fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), string(kv.value.as_ref()?.value.as_ref()?)?)))
        .collect()
}

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a runtime of its own, for the test's lifetime.
fn grpc_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let collector = Collector(received.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    (addr, received)
}

/// An OTLP/HTTP receiver: decodes each `POST /v1/traces` body, answering
/// after `delay` (a slow collector).
fn http_receiver(delay: Duration) -> (SocketAddr, Received) {
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    let received = Received::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = received.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let sink = sink.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let ok = req.method() == hyper::Method::POST
                                    && req.uri().path() == "/v1/traces"
                                    && req.headers()["content-type"] == "application/x-protobuf";
                                let body = req.into_body().collect().await?.to_bytes();
                                tokio::time::sleep(delay).await;
                                let status = match ExportTraceServiceRequest::decode(body) {
                                    Ok(request) if ok => {
                                        sink.take(request);
                                        200
                                    }
                                    _ => 400,
                                };
                                let mut resp = hyper::Response::new(Full::new(bytes_of(
                                    &ExportTraceServiceResponse::default().encode_to_vec(),
                                )));
                                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, hyper::Error>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    (addr, received)
}

fn bytes_of(v: &[u8]) -> hyper::body::Bytes {
    hyper::body::Bytes::copy_from_slice(v)
}

fn tracing_toml(endpoint: &str, protocol: &str, extra: &str) -> String {
    format!(
        "[tracing]\nendpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\nsample_ratio = 0.0\n{extra}\n"
    )
}

/// The one span of `spans` of `kind` sent by `gateway`.
fn span_of<'a>(spans: &'a [(String, Span)], gateway: &str, kind: SpanKind) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|(g, s)| g == gateway && s.kind == kind as i32)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(found.len(), 1, "{gateway} {kind:?}: {found:?}");
    found[0]
}

#[test]
fn one_trace_crosses_both_gateways_parented_hop_by_hop() {
    let (collector, received) = grpc_receiver();
    let upstream = EchoServer::start("pod-in-b");
    let endpoint = format!("http://{collector}");
    let c = TwoClusters::builder()
        .shop_web(upstream.addr)
        .a(&tracing_toml(
            &endpoint,
            "grpc",
            "headers = { x-tenant = \"isthmus\" }",
        ))
        .b(&tracing_toml(&endpoint, "grpc", ""))
        // B names A's cluster (the source on its spans, as on its metrics).
        .b_peers_a()
        .start();
    let url = format!("http://{}/cart", c.outbound_a);
    let host = "Host: web.shop.svc.clusterset.local:8080";
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";

    // A caller's sampled trace is traced, though the ratio for new ones is 0.
    let r = curl(&[
        "-H",
        host,
        "-H",
        &format!("traceparent: 00-{trace}-{caller_span}-01"),
        "-H",
        "x-request-id: traced-1",
        &url,
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let spans = received.trace(trace, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");

    let a_server = span_of(&spans, "gw-a", SpanKind::Server);
    let a_client = span_of(&spans, "gw-a", SpanKind::Client);
    let b_server = span_of(&spans, "gw-b", SpanKind::Server);
    let b_client = span_of(&spans, "gw-b", SpanKind::Client);
    // Parented hop by hop: caller → A server → A attempt → B server → B attempt.
    assert_eq!(hex(&a_server.parent_span_id), caller_span);
    assert_eq!(a_client.parent_span_id, a_server.span_id);
    assert_eq!(
        b_server.parent_span_id, a_client.span_id,
        "B's server span is A's attempt's child"
    );
    assert_eq!(b_client.parent_span_id, b_server.span_id);
    // The workload sees B's attempt as its parent.
    assert_eq!(
        echo["headers"]["traceparent"],
        format!("00-{trace}-{}-01", hex(&b_client.span_id))
    );
    for s in [a_server, a_client, b_server, b_client] {
        assert!(s.start_time_unix_nano <= s.end_time_unix_nano && s.start_time_unix_nano > 0);
        assert_eq!(s.name, "GET");
    }

    let a = attributes(a_server);
    for (key, value) in [
        ("http.request.method", "GET"),
        ("http.response.status_code", "200"),
        ("url.path", "/cart"),
        ("server.address", "web.shop.svc.clusterset.local"),
        ("isthmus.listener", "outbound"),
        ("isthmus.request_id", "traced-1"),
        ("isthmus.service", "web"),
        ("isthmus.namespace", "shop"),
        ("isthmus.source_cluster", "gw-a-cluster"),
        ("isthmus.source_trust_domain", "a.example"),
        ("isthmus.destination_cluster", "gw-b-cluster"),
        ("isthmus.attempts", "1"),
    ] {
        assert_eq!(
            a.get(key).map(String::as_str),
            Some(value),
            "A server {key}: {a:?}"
        );
    }
    let a = attributes(a_client);
    for (key, value) in [
        (
            "isthmus.peer.spiffe_id",
            "spiffe://b.example/isthmus/gateway/gw-b",
        ),
        ("isthmus.destination_cluster", "gw-b-cluster"),
        ("server.address", "127.0.0.1"),
        ("server.port", &c.east_west_b.port().to_string()),
        ("http.response.status_code", "200"),
        ("isthmus.attempt", "1"),
    ] {
        assert_eq!(
            a.get(key).map(String::as_str),
            Some(value),
            "A client {key}: {a:?}"
        );
    }
    let b = attributes(b_server);
    for (key, value) in [
        ("isthmus.listener", "east_west"),
        (
            "isthmus.peer.spiffe_id",
            "spiffe://a.example/isthmus/gateway/gw-a",
        ),
        ("isthmus.source_cluster", "gw-a-cluster"),
        ("isthmus.source_trust_domain", "a.example"),
        ("isthmus.destination_cluster", "gw-b-cluster"),
        ("isthmus.request_id", "traced-1"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(
            b.get(key).map(String::as_str),
            Some(value),
            "B server {key}: {b:?}"
        );
    }
    let b = attributes(b_client);
    assert_eq!(b["server.port"], upstream.addr.port().to_string());
    assert!(
        !b.contains_key("isthmus.peer.spiffe_id"),
        "a local endpoint: {b:?}"
    );

    // Logs name the request and its trace.
    let lines = c.a.access_lines(&["traced-1"]).unwrap();
    assert_eq!(lines[0]["trace_id"], trace, "{lines:?}");

    // A trace the caller did not sample gets no span, and stays unsampled.
    let before = received.len();
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let r = curl(&[
        "-H",
        host,
        "-H",
        &format!("traceparent: 00-{unsampled}-b7ad6b7169203331-00"),
        &url,
    ]);
    assert_eq!(r.status, 200);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        echo["headers"]["traceparent"],
        format!("00-{unsampled}-b7ad6b7169203331-00")
    );
    // A new trace at ratio 0 is not sampled either, and says so downstream.
    let r = curl(&["-H", host, &url]);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        echo["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .ends_with("-00"),
        "{echo}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(received.len(), before, "sampled-out requests make no span");
    let metrics = c.a.admin_get("/metrics").body;
    assert_eq!(
        metric_value(&metrics, "isthmus_tracing_spans_exported_total"),
        Some(2.0)
    );
}

#[test]
fn http_protobuf_export_and_a_slow_collector_drops_spans_not_requests() {
    let (collector, received) = http_receiver(Duration::ZERO);
    let upstream = EchoServer::start("pod");
    let traced = tracing_toml(
        &format!("http://{collector}"),
        "http/protobuf",
        "sample_ratio = 1.0",
    )
    .replace("sample_ratio = 0.0\n", "");
    let (gw, outbound) = solo_gateway(&[upstream.addr], &traced).unwrap();
    let url = format!("http://{outbound}/");
    let host = "Host: web.shop.svc.clusterset.local";

    // Every new trace is sampled at ratio 1: server and client span arrive.
    let r = curl(&["-H", host, "-H", "x-request-id: posted", &url]);
    assert_eq!(r.status, 200);
    let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let sent = echo["headers"]["traceparent"].as_str().unwrap().to_owned();
    let trace = &sent[3..35];
    let spans = received.trace(trace, 2);
    let server = span_of(&spans, "gw-solo", SpanKind::Server);
    let client = span_of(&spans, "gw-solo", SpanKind::Client);
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(sent, format!("00-{trace}-{}-01", hex(&client.span_id)));
    assert_eq!(attributes(server)["isthmus.request_id"], "posted");

    // Reloaded onto a collector that takes 5 s per batch, one span per batch
    // and a queue of two: requests go on at full speed, spans are dropped.
    let (slow, _) = http_receiver(Duration::from_secs(5));
    let config = std::fs::read_to_string(gw.config_path())
        .unwrap()
        .replace(&collector.to_string(), &slow.to_string())
        .replace("[tracing]\n", "[tracing]\nbatch_size = 1\nqueue_size = 2\n");
    reload(&gw, &config).unwrap();
    gw.wait_log("configuration reloaded", WAIT).unwrap();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(curl(&["-H", host, &url]).status, 200);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "requests waited on the collector: {took:?}"
    );
    let metrics = gw.admin_get("/metrics").body;
    let dropped = metric_value(
        &metrics,
        r#"isthmus_tracing_spans_dropped_total{reason="queue_full"}"#,
    )
    .unwrap();
    assert!(
        dropped >= 30.0,
        "40 spans, 1 in export and 2 queued: {dropped} dropped"
    );

    // A collector that is down: its batches fail, are counted, requests pass.
    let down = free_addr();
    let config = config.replace(&slow.to_string(), &down.to_string());
    reload(&gw, &config).unwrap();
    assert_eq!(curl(&["-H", host, &url]).status, 200);
    wait_for(WAIT, "a failed export", || {
        let metrics = gw.admin_get("/metrics").body;
        let failed = metric_value(&metrics, "isthmus_tracing_export_failures_total")?;
        let dropped = metric_value(
            &metrics,
            r#"isthmus_tracing_spans_dropped_total{reason="export_failed"}"#,
        )?;
        (failed >= 1.0 && dropped >= 2.0).then_some(())
    })
    .unwrap();
}
