//! `[limits]`: what clients can make the listeners hold open.
//!
//! Every listener outsiders reach admits a connection only within its caps:
//! `connections` open at once in total and `connections_per_source` from one
//! source (an IPv4 address or an IPv6 /64). Over a cap the connection is
//! closed at once and counted; nobody waits. A request's headers must arrive
//! within `header_timeout` whatever the client's pace. The east-west listener
//! also caps TLS handshakes in flight, and every downstream HTTP/2 connection
//! its concurrent streams.

use std::time::Duration;

use isthmus_federation::limits::ConnectionLimits;
use serde::{Deserialize, Serialize};

use super::parse::{Check, int, parse_duration_between};

/// Default total time for a request's headers (HTTP/1.1), or for an HTTP/2
/// connection's preface and each header block.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(300);
/// Default most bytes of one request's headers: what Envoy allows (60 KiB)
/// and the HTTP/2 limit Pingora sets, rounded to 64 KiB; large enough for
/// several JWTs and cookies.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: i64 = 64 * 1024;
const MIN_MAX_REQUEST_HEADER_BYTES: i64 = 4 * 1024;
/// Pingora's own HTTP/1 ceiling (1 MiB less a byte).
const MAX_MAX_REQUEST_HEADER_BYTES: i64 = 1024 * 1024 - 1;
/// Default concurrent streams on one downstream HTTP/2 connection (Pingora's
/// own default, and what most servers advertise).
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: i64 = 100;
const MAX_H2_MAX_CONCURRENT_STREAMS: i64 = 10_000;
/// Default caps of the outbound listener (and, counted apart, of all the
/// clusterset listeners together). On an edge VM every local workload is one
/// source (loopback), so the per-source cap is generous.
pub const DEFAULT_OUTBOUND: ConnectionLimits = connection_caps(16_384, 4_096);
/// Default caps of the east-west listener: peer gateways multiplex HTTP/2, so
/// a few connections per peer is normal.
pub const DEFAULT_EAST_WEST: ConnectionLimits = connection_caps(16_384, 1_024);
/// Default caps on east-west TLS handshakes in flight. A peer gateway failing
/// over to this cluster opens one connection per request waiting on it (356 at
/// once in the partition test at 250 requests/s), all from one source: the
/// per-source cap must stay above such a burst, so it matches the per-source
/// connection cap, and the total leaves room for four such peers at once.
pub const DEFAULT_EAST_WEST_HANDSHAKES: ConnectionLimits = connection_caps(4_096, 1_024);
/// Default caps of the admin API (probes and scrapers).
pub const DEFAULT_ADMIN: ConnectionLimits = connection_caps(256, 64);
/// Default caps of the SPIFFE bundle endpoint (peers fetch every few minutes).
pub const DEFAULT_BUNDLE_ENDPOINT: ConnectionLimits = connection_caps(1_024, 64);
/// `total` connections at once, `per_source` of them from one source.
const fn connection_caps(total: usize, per_source: usize) -> ConnectionLimits {
    ConnectionLimits { total, per_source }
}
/// Upper bound of every connection cap.
const MAX_CONNECTIONS: i64 = 1_000_000;

/// `[limits]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// `limits.header_timeout`
    pub header_timeout: Option<String>,
    /// `limits.h2_max_concurrent_streams`
    pub h2_max_concurrent_streams: Option<i64>,
    /// `limits.max_request_header_bytes`
    pub max_request_header_bytes: Option<i64>,
    /// `[limits.outbound]`
    pub outbound: Option<RawConnectionLimits>,
    /// `[limits.east_west]`
    pub east_west: Option<RawEastWestLimits>,
    /// `[limits.admin]`
    pub admin: Option<RawConnectionLimits>,
    /// `[limits.bundle_endpoint]`
    pub bundle_endpoint: Option<RawConnectionLimits>,
}

/// `[limits.<listener>]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnectionLimits {
    /// `limits.<listener>.connections`
    pub connections: Option<i64>,
    /// `limits.<listener>.connections_per_source`
    pub connections_per_source: Option<i64>,
}

/// `[limits.east_west]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEastWestLimits {
    /// `limits.east_west.connections`
    pub connections: Option<i64>,
    /// `limits.east_west.connections_per_source`
    pub connections_per_source: Option<i64>,
    /// `limits.east_west.handshakes`
    pub handshakes: Option<i64>,
    /// `limits.east_west.handshakes_per_source`
    pub handshakes_per_source: Option<i64>,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Total time for a request's headers.
    pub header_timeout: Duration,
    /// Concurrent streams per downstream HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Most bytes of one request's headers, on every HTTP listener.
    pub max_request_header_bytes: u32,
    /// `[limits.outbound]`
    pub outbound: ConnectionLimits,
    /// `[limits.east_west]` connections.
    pub east_west: ConnectionLimits,
    /// `[limits.east_west]` handshakes in flight.
    pub east_west_handshakes: ConnectionLimits,
    /// `[limits.admin]`
    pub admin: ConnectionLimits,
    /// `[limits.bundle_endpoint]`
    pub bundle_endpoint: ConnectionLimits,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS as u32,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES as u32,
            outbound: DEFAULT_OUTBOUND,
            east_west: DEFAULT_EAST_WEST,
            east_west_handshakes: DEFAULT_EAST_WEST_HANDSHAKES,
            admin: DEFAULT_ADMIN,
            bundle_endpoint: DEFAULT_BUNDLE_ENDPOINT,
        }
    }
}

/// `[limits.<listener>]` as the file has it.
#[derive(Serialize)]
struct Caps {
    connections: usize,
    connections_per_source: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    handshakes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handshakes_per_source: Option<usize>,
}

impl Caps {
    fn of(l: ConnectionLimits) -> Self {
        Self {
            connections: l.total,
            connections_per_source: l.per_source,
            handshakes: None,
            handshakes_per_source: None,
        }
    }
}

impl Serialize for LimitsConfig {
    /// In the file's shape, so the effective configuration reads back.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("LimitsConfig", 7)?;
        st.serialize_field(
            "header_timeout",
            &humantime::format_duration(self.header_timeout).to_string(),
        )?;
        st.serialize_field("h2_max_concurrent_streams", &self.h2_max_concurrent_streams)?;
        st.serialize_field("max_request_header_bytes", &self.max_request_header_bytes)?;
        st.serialize_field("outbound", &Caps::of(self.outbound))?;
        st.serialize_field(
            "east_west",
            &Caps {
                handshakes: Some(self.east_west_handshakes.total),
                handshakes_per_source: Some(self.east_west_handshakes.per_source),
                ..Caps::of(self.east_west)
            },
        )?;
        st.serialize_field("admin", &Caps::of(self.admin))?;
        st.serialize_field("bundle_endpoint", &Caps::of(self.bundle_endpoint))?;
        st.end()
    }
}

/// One cap, 1 to [`MAX_CONNECTIONS`], `default` when absent.
fn cap(check: &mut Check, path: &str, value: Option<i64>, default: usize) -> Option<usize> {
    let default = i64::try_from(default).unwrap_or(MAX_CONNECTIONS);
    int(check, path, value, default, 1, MAX_CONNECTIONS)
}

/// Caps from `connections` and `per_source` at `path`, defaulting to `default`.
fn caps(
    check: &mut Check,
    path: &str,
    (total, per_source): (Option<i64>, Option<i64>),
    names: (&str, &str),
    default: ConnectionLimits,
) -> Option<ConnectionLimits> {
    let total_path = format!("{path}.{}", names.0);
    let per_path = format!("{path}.{}", names.1);
    let total = cap(check, &total_path, total, default.total);
    let per_source = cap(check, &per_path, per_source, default.per_source);
    let (total, per_source) = (total?, per_source?);
    if per_source > total {
        check.fail(
            per_path,
            format!("{per_source} is more than {total_path} ({total})"),
        );
        return None;
    }
    Some(ConnectionLimits { total, per_source })
}

fn listener(
    check: &mut Check,
    path: &str,
    raw: Option<&RawConnectionLimits>,
    default: ConnectionLimits,
) -> Option<ConnectionLimits> {
    let raw = raw.map_or((None, None), |r| (r.connections, r.connections_per_source));
    caps(
        check,
        path,
        raw,
        ("connections", "connections_per_source"),
        default,
    )
}

pub(super) fn limits(check: &mut Check, raw: &RawLimits) -> Option<LimitsConfig> {
    let before = check.errors.len();
    let header_timeout = check.or_value(
        "limits.header_timeout",
        raw.header_timeout.as_deref(),
        DEFAULT_HEADER_TIMEOUT,
        |s| parse_duration_between(s, MIN_HEADER_TIMEOUT, MAX_HEADER_TIMEOUT),
    );
    let h2_max_concurrent_streams = int(
        check,
        "limits.h2_max_concurrent_streams",
        raw.h2_max_concurrent_streams,
        DEFAULT_H2_MAX_CONCURRENT_STREAMS,
        1,
        MAX_H2_MAX_CONCURRENT_STREAMS,
    );
    let max_request_header_bytes = int(
        check,
        "limits.max_request_header_bytes",
        raw.max_request_header_bytes,
        DEFAULT_MAX_REQUEST_HEADER_BYTES,
        MIN_MAX_REQUEST_HEADER_BYTES,
        MAX_MAX_REQUEST_HEADER_BYTES,
    );
    let outbound = listener(
        check,
        "limits.outbound",
        raw.outbound.as_ref(),
        DEFAULT_OUTBOUND,
    );
    let ew = raw.east_west.as_ref();
    let ew_raw =
        |f: fn(&RawEastWestLimits) -> (Option<i64>, Option<i64>)| ew.map_or((None, None), f);
    let east_west = caps(
        check,
        "limits.east_west",
        ew_raw(|r| (r.connections, r.connections_per_source)),
        ("connections", "connections_per_source"),
        DEFAULT_EAST_WEST,
    );
    let east_west_handshakes = caps(
        check,
        "limits.east_west",
        ew_raw(|r| (r.handshakes, r.handshakes_per_source)),
        ("handshakes", "handshakes_per_source"),
        DEFAULT_EAST_WEST_HANDSHAKES,
    );
    let admin = listener(check, "limits.admin", raw.admin.as_ref(), DEFAULT_ADMIN);
    let bundle_endpoint = listener(
        check,
        "limits.bundle_endpoint",
        raw.bundle_endpoint.as_ref(),
        DEFAULT_BUNDLE_ENDPOINT,
    );
    if check.errors.len() > before {
        return None;
    }
    Some(LimitsConfig {
        header_timeout: header_timeout?,
        h2_max_concurrent_streams: h2_max_concurrent_streams?,
        max_request_header_bytes: max_request_header_bytes?,
        outbound: outbound?,
        east_west: east_west?,
        east_west_handshakes: east_west_handshakes?,
        admin: admin?,
        bundle_endpoint: bundle_endpoint?,
    })
}
