//! Request metrics of the data plane.

use isthmus_federation::ServiceKey;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::metrics::{self, Listener};

isthmus_federation::label_enum! {
    /// Why a request failed in the gateway: the `reason` label of
    /// `isthmus_request_errors_total`.
    pub enum RequestError {
        /// The backend refused the connection.
        ConnectRefused => "connect_refused",
        /// The connection to the backend timed out.
        ConnectTimeout => "connect_timeout",
        /// The TLS handshake with the backend or peer gateway failed.
        Tls => "tls",
        /// The backend did not answer in time.
        UpstreamTimeout => "upstream_timeout",
        /// The backend closed the connection or failed otherwise.
        UpstreamClosed => "upstream_closed",
        /// Every backend was at a circuit-breaker limit.
        Overloaded => "overloaded",
        /// No backend to try.
        NoRoute => "no_route",
        /// The client went away before the response was complete: it closed
        /// the connection, reset the HTTP/2 stream (a gRPC deadline, say) or
        /// stopped reading or sending. Not a failure of the gateway.
        ClientClosed => "client_closed",
        /// The client sent something the gateway could not take.
        ClientError => "client_error",
        /// Anything else.
        Internal => "internal",
    }
}

isthmus_federation::label_enum! {
    /// How an L4 connection was handled: the `result` label of
    /// `isthmus_tcp_connections_total`.
    pub enum L4Result {
        /// Spliced to a backend.
        Ok => "ok",
        /// No backend could be connected to.
        ConnectError => "connect_error",
        /// The service is unknown or has no backend.
        NoRoute => "no_route",
        /// Every backend was at a circuit-breaker limit.
        Overloaded => "overloaded",
        /// The client is outside a passthrough service's `allow_sources`.
        SourceNotAllowed => "source_not_allowed",
        /// The caller is not allowed by the service's `allow_*` lists.
        Denied => "denied",
    }
}

isthmus_federation::label_enum! {
    /// Which way spliced bytes went: the `direction` label of
    /// `isthmus_tcp_bytes_total`.
    pub enum Direction {
        /// From the client to the backend.
        FromClient => "from_client",
        /// From the backend to the client.
        ToClient => "to_client",
    }
}

/// Labels shared by the request metrics.
const LABELS: &[&str] = &[
    "listener",
    "service",
    "namespace",
    "source_cluster",
    "source_trust_domain",
    "destination_cluster",
];

/// The `source_cluster` of an east-west caller that is no known peer
/// gateway: a label value, so the series stay bounded by the peers.
pub(crate) const UNKNOWN_CLUSTER: &str = "unknown";

/// Who sent a request or opened an L4 connection: the `source_cluster` and
/// `source_trust_domain` labels.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    /// The caller's cluster name, or [`UNKNOWN_CLUSTER`].
    pub(crate) cluster: &'a str,
    /// The caller's trust domain; empty when no identity was verified.
    pub(crate) trust_domain: &'a str,
}

impl Source<'static> {
    /// A caller not identified: a passthrough connection, whose TLS is the
    /// workload's and not terminated here.
    pub(crate) const UNKNOWN: Self = Self {
        cluster: UNKNOWN_CLUSTER,
        trust_domain: "",
    };
}

/// `isthmus_requests_total`, `isthmus_request_duration_seconds`,
/// `isthmus_request_errors_total` and the load gauges
/// `isthmus_requests_in_flight` and `isthmus_upstream_requests_waiting`.
#[derive(Clone)]
pub struct ProxyMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    errors: IntCounterVec,
    forged: IntCounterVec,
    in_flight: IntGaugeVec,
    waiting: IntGaugeVec,
}

/// One listener's load gauges, resolved once so that a request only touches
/// atomics (see [`Held`]).
#[derive(Clone)]
pub(crate) struct ListenerLoad {
    /// `isthmus_requests_in_flight{listener}`.
    pub(crate) in_flight: IntGauge,
    /// `isthmus_upstream_requests_waiting{listener}`.
    pub(crate) waiting: IntGauge,
}

/// One unit of a gauge, held until dropped: whatever way a request ends
/// (error, retry, client gone, panic), what it added is taken back.
pub(crate) struct Held(IntGauge);

impl Held {
    /// Adds one to `gauge` until the result is dropped.
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The labels of one request.
pub(crate) struct RequestLabels<'a> {
    pub(crate) listener: Listener,
    pub(crate) service: &'a str,
    pub(crate) namespace: &'a str,
    pub(crate) source: Source<'a>,
    pub(crate) destination_cluster: &'a str,
}

impl ProxyMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let mut labels = LABELS.to_vec();
        labels.push("code");
        let requests = metrics::counter_vec(
            registry,
            "requests_total",
            "HTTP requests by listener, service, namespace, source cluster and trust domain, destination cluster, and status code.",
            &labels,
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request to the end of the response, by listener, service, namespace, source cluster and trust domain, and destination cluster.",
            )
            .namespace(metrics::NAMESPACE)
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            LABELS,
        )
        .expect("static metric definition is valid");
        metrics::register(registry, duration.clone());
        let errors = metrics::counter_vec(
            registry,
            "request_errors_total",
            "HTTP requests that failed in the gateway, by listener, service, namespace and reason \
             (connect_refused, connect_timeout, tls, upstream_timeout, upstream_closed, overloaded, \
             no_route, client_closed, client_error, internal).",
            &["listener", "service", "namespace", "reason"],
        );
        let forged = metrics::counter_vec(
            registry,
            "forged_headers_total",
            "Requests from clients that carried headers only gateways set \
             (x-forwarded-client-cert, x-isthmus-*), by listener; the headers were stripped.",
            &["listener"],
        );
        let in_flight = metrics::gauge_vec(
            registry,
            "requests_in_flight",
            "HTTP requests being proxied now, from their arrival to their log line, by listener.",
            &["listener"],
        );
        let waiting = metrics::gauge_vec(
            registry,
            "upstream_requests_waiting",
            "HTTP requests that chose an upstream and wait for a connection to it, by listener.",
            &["listener"],
        );
        Self {
            requests,
            duration,
            errors,
            forged,
            in_flight,
            waiting,
        }
    }

    /// The load gauges of `listener`.
    pub(crate) fn load(&self, listener: Listener) -> ListenerLoad {
        let label = [listener.label()];
        ListenerLoad {
            in_flight: self.in_flight.with_label_values(&label),
            waiting: self.waiting.with_label_values(&label),
        }
    }

    /// A request on `listener` carried `names` internal headers, now stripped.
    pub(crate) fn stripped(&self, listener: Listener, names: usize) {
        // A client can send these on every request: debug, not WARN.
        let listener = listener.label();
        tracing::debug!(listener, names, "stripped internal headers a client sent");
        self.forged.with_label_values(&[listener]).inc();
    }

    pub(crate) fn error(&self, labels: &RequestLabels<'_>, reason: RequestError) {
        self.errors
            .with_label_values(&[
                labels.listener.label(),
                labels.service,
                labels.namespace,
                reason.label(),
            ])
            .inc();
    }

    pub(crate) fn record(&self, labels: &RequestLabels<'_>, code: u16, seconds: f64) {
        let base = [
            labels.listener.label(),
            labels.service,
            labels.namespace,
            labels.source.cluster,
            labels.source.trust_domain,
            labels.destination_cluster,
        ];
        let mut digits = [0u8; 3];
        let [b0, b1, b2, b3, b4, b5] = base;
        self.requests
            .with_label_values(&[b0, b1, b2, b3, b4, b5, status_label(code, &mut digits)])
            .inc();
        self.duration.with_label_values(&base).observe(seconds);
    }
}

/// `code` as a label, written into `digits` without the formatting machinery
/// (HTTP status codes have three digits; 0 is a request that got no
/// response; anything else cannot be a status and is "other").
fn status_label(code: u16, digits: &mut [u8; 3]) -> &str {
    if code == 0 {
        return "0";
    }
    if !(100..=999).contains(&code) {
        return "other";
    }
    *digits = [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ];
    std::str::from_utf8(digits).unwrap_or("other")
}

/// `isthmus_tcp_connections_total` and `isthmus_tcp_bytes_total` for connections
/// proxied at L4 (TCP ports, east-west passthrough).
#[derive(Clone)]
pub struct TcpMetrics {
    connections: IntCounterVec,
    bytes: IntCounterVec,
    spread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TcpMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let connections = metrics::counter_vec(
            registry,
            "tcp_connections_total",
            "L4 connections by listener, service, namespace, source cluster and trust domain, and \
             result (ok, connect_error, no_route, overloaded, source_not_allowed, denied).",
            &[
                "listener",
                "service",
                "namespace",
                "source_cluster",
                "source_trust_domain",
                "result",
            ],
        );
        let bytes = metrics::counter_vec(
            registry,
            "tcp_bytes_total",
            "Bytes spliced at L4 by listener, service, namespace and direction (from_client, to_client).",
            &["listener", "service", "namespace", "direction"],
        );
        Self {
            connections,
            bytes,
            spread: Default::default(),
        }
    }

    pub(crate) fn connection(
        &self,
        listener: Listener,
        key: &ServiceKey,
        source: Source<'_>,
        result: L4Result,
    ) {
        self.connections
            .with_label_values(&[
                listener.label(),
                key.name.as_str(),
                key.namespace.as_str(),
                source.cluster,
                source.trust_domain,
                result.label(),
            ])
            .inc();
    }

    pub(crate) fn bytes(
        &self,
        listener: Listener,
        key: &ServiceKey,
        from_client: u64,
        to_client: u64,
    ) {
        let (listener, name, ns) = (listener.label(), key.name.as_str(), key.namespace.as_str());
        self.bytes
            .with_label_values(&[listener, name, ns, Direction::FromClient.label()])
            .inc_by(from_client);
        self.bytes
            .with_label_values(&[listener, name, ns, Direction::ToClient.label()])
            .inc_by(to_client);
    }

    /// A rotating counter to spread connections over endpoints.
    pub(crate) fn next_spread(&self) -> usize {
        self.spread
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_the_codes_digits() {
        let mut digits = [0; 3];
        for code in [100, 200, 204, 431, 503, 999] {
            assert_eq!(status_label(code, &mut digits), code.to_string());
        }
        assert_eq!(status_label(0, &mut digits), "0");
        assert_eq!(status_label(42, &mut digits), "other");
        assert_eq!(status_label(1000, &mut digits), "other");
    }

    #[test]
    fn held_gauges_go_back_when_dropped() {
        let registry = Registry::new();
        let m = ProxyMetrics::new(&registry);
        let load = m.load(Listener::EastWest);
        let (a, b) = (Held::new(&load.in_flight), Held::new(&load.in_flight));
        let mut waiting = Some(Held::new(&load.waiting));
        assert_eq!(load.in_flight.get(), 2);
        assert!(waiting.is_some());
        // A retry replaces the attempt's place in the queue.
        waiting = Some(Held::new(&load.waiting));
        assert_eq!(load.waiting.get(), 1);
        drop((a, waiting));
        assert_eq!((load.in_flight.get(), load.waiting.get()), (1, 0));
        drop(b);
        assert_eq!(m.load(Listener::EastWest).in_flight.get(), 0);
        assert_eq!(m.load(Listener::Outbound).in_flight.get(), 0);
    }
}
