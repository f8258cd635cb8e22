//! `[tracing]`: OpenTelemetry spans exported over OTLP (on iff `endpoint` is set).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Check, Keyword, int, keyword, parse_duration};

/// The share of root traces (requests without a `traceparent`) sampled by default.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;
/// Spans sent per export request by default.
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// Spans waiting for export by default; more are dropped and counted.
pub const DEFAULT_QUEUE_SIZE: usize = 4096;
/// How long one export request may take by default.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `tracing.export_timeout`.
pub const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for `tracing.queue_size` (a span is about a kilobyte).
pub const MAX_QUEUE_SIZE: i64 = 1 << 20;

/// `[tracing]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// `tracing.endpoint`
    pub endpoint: Option<String>,
    /// `tracing.protocol`
    pub protocol: Option<String>,
    /// `tracing.headers`
    pub headers: Option<BTreeMap<String, String>>,
    /// `tracing.sample_ratio`
    pub sample_ratio: Option<f64>,
    /// `tracing.batch_size`
    pub batch_size: Option<i64>,
    /// `tracing.queue_size`
    pub queue_size: Option<i64>,
    /// `tracing.export_timeout`
    pub export_timeout: Option<String>,
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`TraceService/Export`), the collector's port 4317.
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`), port 4318.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Keyword for OtlpProtocol {
    const KIND: &'static str = "protocol";
    const WORDS: &'static [(&'static str, Self)] =
        &[("grpc", Self::Grpc), ("http/protobuf", Self::HttpProtobuf)];
}

impl FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        keyword(s)
    }
}

/// `[tracing]` with an endpoint: spans are made and exported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingConfig {
    /// The collector: `http://host:4317` for gRPC; for HTTP the URL spans are
    /// posted to (`/v1/traces` when it has no path).
    #[serde(serialize_with = "super::parse::serialize_display")]
    pub endpoint: http::Uri,
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// Sent with every export (an API key, say); values are not shown.
    #[serde(serialize_with = "names_only")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The share of root traces sampled; a `traceparent`'s sampled flag
    /// decides for the others.
    pub sample_ratio: f64,
    /// Spans per export request.
    pub batch_size: usize,
    /// Spans waiting for export; more are dropped and counted.
    pub queue_size: usize,
    /// How long one export request may take.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

fn names_only<S: serde::Serializer>(
    headers: &[(http::HeaderName, http::HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(headers.iter().map(|(name, _)| name.as_str()))
}

/// Checks `[tracing]`: `None` inside when tracing is off (no endpoint).
pub(super) fn tracing(check: &mut Check, raw: &RawTracing) -> Option<Option<TracingConfig>> {
    let endpoint = check.optional("tracing.endpoint", raw.endpoint.as_deref(), parse_endpoint);
    let protocol = check.or_value(
        "tracing.protocol",
        raw.protocol.as_deref(),
        OtlpProtocol::Grpc,
        OtlpProtocol::from_str,
    );
    let mut headers = Vec::new();
    for (name, value) in raw.headers.iter().flatten() {
        let path = format!("tracing.headers.{name}");
        let parsed = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not an HTTP header name"))
            .and_then(|n| {
                http::HeaderValue::from_str(value)
                    .map(|v| (n, v))
                    .map_err(|_| "is not a valid HTTP header value".to_owned())
            });
        headers.extend(check.parsed(&path, parsed));
    }
    let sample_ratio = match raw.sample_ratio {
        None => Some(DEFAULT_SAMPLE_RATIO),
        Some(r) if (0.0..=1.0).contains(&r) => Some(r),
        Some(r) => {
            check.fail(
                "tracing.sample_ratio",
                format!(
                    "{r} is out of range; expected a ratio from 0.0 (only traces a caller sampled) to 1.0 (every request)"
                ),
            );
            None
        }
    };
    let batch_size = int(
        check,
        "tracing.batch_size",
        raw.batch_size,
        DEFAULT_BATCH_SIZE as i64,
        1,
        MAX_QUEUE_SIZE,
    );
    let queue_size = int(
        check,
        "tracing.queue_size",
        raw.queue_size,
        DEFAULT_QUEUE_SIZE as i64,
        1,
        MAX_QUEUE_SIZE,
    );
    let export_timeout = check.or_value(
        "tracing.export_timeout",
        raw.export_timeout.as_deref(),
        DEFAULT_EXPORT_TIMEOUT,
        |s| parse_duration(s, MAX_EXPORT_TIMEOUT),
    );
    let (protocol, sample_ratio, batch_size, queue_size, export_timeout) = (
        protocol?,
        sample_ratio?,
        batch_size?,
        queue_size?,
        export_timeout?,
    );
    let Some(endpoint) = endpoint else {
        return (raw.endpoint.is_none()).then_some(None);
    };
    Some(Some(TracingConfig {
        endpoint,
        protocol,
        headers,
        sample_ratio,
        batch_size,
        queue_size,
        export_timeout,
    }))
}

/// An `http://host:port[/path]` URL. TLS to the collector is not offered:
/// point the gateway at a collector on the same host or network.
fn parse_endpoint(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL such as \"http://127.0.0.1:4317\" ({e})"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(a)) if a.port_u16().is_some() => Ok(uri),
        (Some("https"), _) => Err(format!(
            "{s:?}: https is not supported; export to a collector over http (on this host or a trusted network)"
        )),
        _ => Err(format!(
            "{s:?} is not an http URL with a port, such as \"http://127.0.0.1:4317\""
        )),
    }
}
