//! Distributed tracing: the spans of sampled requests, exported over OTLP
//! (gRPC or HTTP/protobuf) in batches from a bounded queue.
//!
//! The data plane never waits on the collector: a finished span is offered to
//! the queue with `try_send` and dropped (and counted) when the queue is full.
//! One exporter thread per configuration, with a runtime of its own, takes
//! spans off the queue in batches; a reload starts a new one, and the old one
//! sends what it holds once the last request using it has ended.
//!
//! Tracing off costs a request one atomic load: no span, no allocation.
//! Sampled-out requests make no span either; only their `traceparent` is
//! decided (see [`Sampling`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prometheus::{IntCounter, IntCounterVec, Registry};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::model::{OtlpProtocol, TracingConfig};
use crate::metrics;

isthmus_federation::label_enum! {
    /// Why spans were lost: the `reason` label of `isthmus_tracing_spans_dropped_total`.
    pub enum DropReason {
        /// The export queue was full (the collector is slow, down or too far).
        QueueFull => "queue_full",
        /// The collector refused or did not take a batch in time.
        ExportFailed => "export_failed",
    }
}

/// The tracing metrics, shared by every exporter a reload starts.
#[derive(Clone)]
struct TracingMetrics {
    dropped: IntCounterVec,
    exported: IntCounter,
    failures: IntCounter,
}

impl TracingMetrics {
    fn new(registry: &Registry) -> Self {
        let dropped = metrics::counter_vec(
            registry,
            "tracing_spans_dropped_total",
            "Spans lost before reaching the collector, by reason (queue_full, export_failed).",
            &["reason"],
        );
        for reason in DropReason::ALL {
            dropped.with_label_values(&[reason.label()]);
        }
        let exported = metrics::counter(
            registry,
            "tracing_spans_exported_total",
            "Spans the OTLP collector accepted.",
        );
        let failures = metrics::counter(
            registry,
            "tracing_export_failures_total",
            "OTLP export requests that failed or timed out (their spans are dropped).",
        );
        Self {
            dropped,
            exported,
            failures,
        }
    }

    fn drop(&self, reason: DropReason, spans: usize) {
        self.dropped
            .with_label_values(&[reason.label()])
            .inc_by(spans as u64);
    }
}

/// Who makes the spans: the OTLP resource of every batch.
pub struct Origin {
    /// `gateway.name`
    pub gateway: String,
    /// `gateway.cluster`
    pub cluster: String,
    /// `gateway.trust_domain`
    pub trust_domain: String,
}

/// The tracer in force (none when tracing is off), swapped on reload.
pub struct Telemetry {
    current: ArcSwapOption<Tracer>,
    metrics: TracingMetrics,
    resource: Resource,
}

impl Telemetry {
    /// Registers the metrics and starts exporting when `config` is set.
    pub fn new(config: Option<&TracingConfig>, origin: &Origin, registry: &Registry) -> Arc<Self> {
        let resource = Resource {
            attributes: vec![
                kv("service.name", "isthmus"),
                kv("service.version", env!("CARGO_PKG_VERSION")),
                kv("service.instance.id", &origin.gateway),
                kv("isthmus.cluster", &origin.cluster),
                kv("isthmus.trust_domain", &origin.trust_domain),
            ],
            ..Default::default()
        };
        let telemetry = Arc::new(Self {
            current: ArcSwapOption::empty(),
            metrics: TracingMetrics::new(registry),
            resource,
        });
        telemetry.apply(config);
        telemetry
    }

    /// Puts `config` in force: a new exporter (the old one flushes and ends),
    /// or none.
    pub fn apply(&self, config: Option<&TracingConfig>) {
        let next = config.and_then(|c| match Tracer::start(c, &self.resource, &self.metrics) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                warn!(error = %e, "cannot start the span exporter; tracing is off");
                None
            }
        });
        if let Some(c) = config.filter(|_| next.is_some()) {
            info!(endpoint = %c.endpoint, protocol = ?c.protocol, sample_ratio = c.sample_ratio, "tracing on");
        }
        self.current.store(next);
    }

    /// Whether a request is sampled: by its caller's flag, or for a new
    /// trace by the configured ratio.
    pub(crate) fn sample(&self, sampling: Sampling) -> Sampled {
        let guard = self.current.load();
        let Some(tracer) = guard.as_ref() else {
            return Sampled::Off;
        };
        let sampled = match sampling {
            Sampling::Parent(sampled) => sampled,
            Sampling::Root(low_bits) => tracer.sample_root(low_bits),
        };
        if sampled {
            Sampled::Yes(tracer.clone())
        } else {
            Sampled::No
        }
    }
}

/// The sampling decision for one request.
pub(crate) enum Sampled {
    /// Tracing is off.
    Off,
    /// Not sampled: no span.
    No,
    /// Sampled: its spans go to this tracer.
    Yes(Arc<Tracer>),
}

/// What decides whether a request is sampled.
#[derive(Clone, Copy)]
pub(crate) enum Sampling {
    /// Its `traceparent`'s sampled flag (parent-based sampling).
    Parent(bool),
    /// A new trace with this id: the configured ratio.
    Root(u64),
}

/// One configuration's sampler and export queue.
pub struct Tracer {
    /// Root traces whose id's low 64 bits are below this are sampled.
    threshold: u64,
    queue: mpsc::Sender<Span>,
    metrics: TracingMetrics,
}

impl Tracer {
    fn start(
        config: &TracingConfig,
        resource: &Resource,
        metrics: &TracingMetrics,
    ) -> std::io::Result<Self> {
        let (queue, spans) = mpsc::channel(config.queue_size);
        let exporter = Exporter {
            config: config.clone(),
            resource: resource.clone(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn(move || exporter.run(spans))?;
        Ok(Self {
            threshold: ratio_threshold(config.sample_ratio),
            queue,
            metrics: metrics.clone(),
        })
    }

    fn sample_root(&self, low_bits: u64) -> bool {
        low_bits < self.threshold || self.threshold == u64::MAX
    }

    /// Queues a finished span, or drops and counts it: never waits.
    pub(crate) fn submit(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.metrics.drop(DropReason::QueueFull, 1);
        }
    }
}

/// The share `ratio` of the 64-bit space, as the bound of [`Tracer::sample_root`].
fn ratio_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

/// How long spans wait for a batch to fill before they are sent anyway.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the exporter collects queued spans while a batch fills: at
/// 20,000 spans/s a tick gathers 200, well within the smallest sane queue.
const COLLECT_TICK: Duration = Duration::from_millis(10);

/// Takes spans off the queue and sends them in batches.
struct Exporter {
    config: TracingConfig,
    resource: Resource,
    metrics: TracingMetrics,
}

impl Exporter {
    fn run(self, spans: mpsc::Receiver<Span>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "span exporter cannot start; spans are dropped");
                return;
            }
        };
        runtime.block_on(self.export_all(spans));
    }

    async fn export_all(self, mut spans: mpsc::Receiver<Span>) {
        let mut client = match self.config.protocol {
            OtlpProtocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from(self.config.endpoint.clone())
                    .connect_timeout(self.config.export_timeout)
                    .timeout(self.config.export_timeout);
                Client::Grpc(TraceServiceClient::new(endpoint.connect_lazy()))
            }
            OtlpProtocol::HttpProtobuf => Client::Http,
        };
        let mut batch = Vec::with_capacity(self.config.batch_size);
        loop {
            // Waits for a first span, then up to the flush interval for more.
            // The rest are collected every COLLECT_TICK rather than awaited
            // one by one: a receiver waiting on the queue is woken by every
            // span, a thread wake-up (and context switch) per request at 100 %
            // sampling; one that sleeps is woken by none.
            let Some(first) = spans.recv().await else {
                return;
            };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
            let mut closed = false;
            while batch.len() < self.config.batch_size {
                match spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let now = tokio::time::Instant::now();
                        if now >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(deadline.min(now + COLLECT_TICK)).await;
                    }
                }
            }
            let count = batch.len();
            let request = self.request(std::mem::take(&mut batch));
            let sent =
                tokio::time::timeout(self.config.export_timeout, self.send(&mut client, request))
                    .await
                    .unwrap_or_else(|_| Err("timed out".to_owned()));
            match sent {
                Ok(()) => self.metrics.exported.inc_by(count as u64),
                Err(e) => {
                    self.metrics.failures.inc();
                    self.metrics.drop(DropReason::ExportFailed, count);
                    warn!(endpoint = %self.config.endpoint, spans = count, error = %e, "span export failed");
                }
            }
            if closed {
                return;
            }
        }
    }

    fn request(&self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "isthmus".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    async fn send(
        &self,
        client: &mut Client,
        request: ExportTraceServiceRequest,
    ) -> Result<(), String> {
        match client {
            Client::Grpc(grpc) => {
                let mut request = tonic::Request::new(request);
                for (name, value) in &self.config.headers {
                    if let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_bytes()) {
                        let name =
                            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes())
                                .map_err(|e| e.to_string())?;
                        request.metadata_mut().insert(name, value);
                    }
                }
                grpc.export(request)
                    .await
                    .map(drop)
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))
            }
            Client::Http => post(&self.config, request).await,
        }
    }
}

enum Client {
    Grpc(TraceServiceClient<tonic::transport::Channel>),
    Http,
}

/// OTLP/HTTP: one `POST` of the protobuf-encoded request, on a connection of
/// its own (one per batch, at most one a second under light load).
async fn post(config: &TracingConfig, request: ExportTraceServiceRequest) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    let authority = config
        .endpoint
        .authority()
        .ok_or("the endpoint has no host")?
        .clone();
    let path = match config.endpoint.path() {
        "" | "/" => "/v1/traces",
        p => p,
    };
    let stream = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut builder = http::Request::post(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf");
    for (name, value) in &config.headers {
        builder = builder.header(name, value);
    }
    let req = builder
        .body(Full::new(bytes::Bytes::from(request.encode_to_vec())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read the body so the collector's error message is not lost to a reset.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Now, in nanoseconds since the Unix epoch (spans' clock).
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A string attribute.
pub(crate) fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub(crate) fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_samples_its_share_of_root_traces() {
        for (ratio, expected) in [(0.0, 0.0), (0.01, 0.01), (0.5, 0.5), (1.0, 1.0)] {
            let threshold = ratio_threshold(ratio);
            let tracer_samples = |bits: u64| bits < threshold || threshold == u64::MAX;
            let mut state = 0x1234_5678_u64;
            let n = 100_000;
            let hits = (0..n)
                .filter(|_| {
                    // SplitMix64: uniform draws standing in for trace ids.
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    tracer_samples(z ^ (z >> 31))
                })
                .count();
            let share = hits as f64 / f64::from(n);
            assert!((share - expected).abs() < 0.005, "{ratio}: {share}");
        }
    }
}
