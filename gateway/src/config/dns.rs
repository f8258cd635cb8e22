//! `[dns]`: the DNS server for `clusterset.local`, clusterset IPs, and
//! forwarding of other names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_federation::dns::guard::{DEFAULT_ALLOW_SOURCES, RATE_LIMIT_SOURCES};
use isthmus_federation::dns::{DnsPolicy, ForwardConfig, IpRange, RateLimit, SourceAcl, SourceNet};
use isthmus_federation::limits::ConnectionLimits;
use serde::{Deserialize, Serialize};

use super::parse::{
    Check, int, list, parse_duration, parse_duration_between, parse_path, parse_resolver,
    parse_socket_addr, serialize_display, serialize_display_list, serialize_display_opt,
};

/// Default record TTL: short, so that clients follow failover and withdrawal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// Default clusterset IPv4 range: on loopback, so a VM needs no routing.
pub const DEFAULT_IPV4_RANGE: &str = "127.240.0.0/16";
/// Default time an upstream resolver has to answer.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of forwarded answers cached.
pub const DEFAULT_CACHE_SIZE: u64 = 10_000;
/// Default answers per second per source over UDP (response-rate limiting).
pub const DEFAULT_RATE_LIMIT: i64 = 200;
/// Default answers a quiet source may get at once.
pub const DEFAULT_RATE_LIMIT_BURST: i64 = 400;
/// Default: every 2nd limited answer is sent empty with TC, the others dropped.
pub const DEFAULT_RATE_LIMIT_SLIP: i64 = 2;
/// Default TCP connections open at once.
pub const DEFAULT_TCP_MAX_CONNECTIONS: i64 = 512;
/// Default TCP connections open at once from one source.
pub const DEFAULT_TCP_MAX_CONNECTIONS_PER_SOURCE: i64 = 16;
/// Default time a TCP connection may stay without a query.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const MIN_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(3600);
const MAX_CACHE_SIZE: u64 = 1_000_000;
const MIN_FORWARD_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// `[dns]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// `dns.listen`
    pub listen: Option<String>,
    /// `dns.ttl`
    pub ttl: Option<String>,
    /// `dns.clusterset_ipv4_range`
    pub clusterset_ipv4_range: Option<String>,
    /// `dns.clusterset_ipv6_range`
    pub clusterset_ipv6_range: Option<String>,
    /// `dns.state_file`
    pub state_file: Option<String>,
    /// `dns.clusterset_listeners`
    pub clusterset_listeners: Option<bool>,
    /// `dns.upstreams`
    pub upstreams: Option<Vec<String>>,
    /// `dns.forward_timeout`
    pub forward_timeout: Option<String>,
    /// `dns.cache_size`
    pub cache_size: Option<u64>,
    /// `dns.allow_sources`
    pub allow_sources: Option<Vec<String>>,
    /// `dns.rate_limit`
    pub rate_limit: Option<i64>,
    /// `dns.rate_limit_burst`
    pub rate_limit_burst: Option<i64>,
    /// `dns.rate_limit_slip`
    pub rate_limit_slip: Option<i64>,
    /// `dns.tcp_max_connections`
    pub tcp_max_connections: Option<i64>,
    /// `dns.tcp_max_connections_per_source`
    pub tcp_max_connections_per_source: Option<i64>,
    /// `dns.tcp_idle_timeout`
    pub tcp_idle_timeout: Option<String>,
}

/// `[dns]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsConfig {
    /// Where to answer DNS, over UDP and TCP; off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// TTL of `clusterset.local` records (and of its negative answers).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Where clusterset IPs come from.
    #[serde(serialize_with = "serialize_display")]
    pub clusterset_ipv4_range: IpRange,
    /// Where clusterset IPv6 addresses come from; no AAAA records without it.
    #[serde(
        serialize_with = "serialize_display_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub clusterset_ipv6_range: Option<IpRange>,
    /// Where allocations are kept across restarts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// Accept traffic at each service's clusterset IP and ports.
    pub clusterset_listeners: bool,
    /// Resolvers for names outside `clusterset.local`; none: REFUSED.
    pub upstreams: Vec<SocketAddr>,
    /// How long an upstream has to answer.
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// Forwarded answers cached.
    pub cache_size: u64,
    /// Networks whose hosts are answered (and get recursion); the rest get
    /// REFUSED.
    #[serde(serialize_with = "serialize_display_list")]
    pub allow_sources: Vec<SourceNet>,
    /// UDP answers per second per source; 0: no limit.
    pub rate_limit: u32,
    /// Answers a quiet source may get at once.
    pub rate_limit_burst: u32,
    /// Every n-th limited answer is sent empty with TC; 0: all dropped.
    pub rate_limit_slip: u32,
    /// TCP connections open at once.
    pub tcp_max_connections: usize,
    /// TCP connections open at once from one IPv4 address or IPv6 /64.
    pub tcp_max_connections_per_source: usize,
    /// A TCP connection without a query for this long is closed.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
}

impl DnsConfig {
    /// The forwarding settings, when there are upstreams.
    pub fn forward(&self) -> Option<ForwardConfig> {
        (!self.upstreams.is_empty()).then(|| ForwardConfig {
            upstreams: self.upstreams.clone(),
            timeout: self.forward_timeout,
            cache_size: self.cache_size,
        })
    }

    /// The server's protection settings.
    pub fn policy(&self) -> DnsPolicy {
        DnsPolicy {
            allow_sources: SourceAcl::new(self.allow_sources.clone()),
            rate_limit: RateLimit {
                per_second: self.rate_limit,
                burst: self.rate_limit_burst,
                slip: self.rate_limit_slip,
                max_sources: RATE_LIMIT_SOURCES,
            },
            tcp: ConnectionLimits {
                total: self.tcp_max_connections,
                per_source: self.tcp_max_connections_per_source,
            },
            tcp_idle_timeout: self.tcp_idle_timeout,
        }
    }

    /// The configured clusterset ranges.
    pub fn ranges(&self) -> Vec<IpRange> {
        std::iter::once(self.clusterset_ipv4_range)
            .chain(self.clusterset_ipv6_range)
            .collect()
    }
}

fn parse_range(s: &str, v4: bool) -> Result<IpRange, String> {
    let range: IpRange = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match (v4, range.is_ipv4()) {
        (true, false) => Err(format!("{s:?} is an IPv6 range; use clusterset_ipv6_range")),
        (false, true) => Err(format!("{s:?} is an IPv4 range; use clusterset_ipv4_range")),
        _ => Ok(range),
    }
}

pub(super) fn dns(check: &mut Check, raw: &RawDns) -> Option<DnsConfig> {
    let before = check.errors.len();
    let listen = check.optional("dns.listen", raw.listen.as_deref(), parse_socket_addr);
    let ttl = check.or_value("dns.ttl", raw.ttl.as_deref(), DEFAULT_TTL, |s| {
        parse_duration(s, MAX_TTL)
    });
    let v4 = check.or_default(
        "dns.clusterset_ipv4_range",
        raw.clusterset_ipv4_range.as_deref(),
        DEFAULT_IPV4_RANGE,
        |s| parse_range(s, true),
    );
    let v6 = check.optional(
        "dns.clusterset_ipv6_range",
        raw.clusterset_ipv6_range.as_deref(),
        |s| parse_range(s, false),
    );
    let state_file = check.optional("dns.state_file", raw.state_file.as_deref(), parse_path);
    let mut upstreams = Vec::new();
    for (i, u) in raw
        .upstreams
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = format!("dns.upstreams[{i}]");
        let Some(addr) = check.parsed(&path, parse_resolver(u)) else {
            continue;
        };
        let loops = listen.is_some_and(|l| {
            l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified())
        });
        if loops {
            check.fail(
                &path,
                format!("{addr} is this server (dns.listen): forwarding to it would loop"),
            );
        } else {
            upstreams.push(addr);
        }
    }
    let forward_timeout = check.or_value(
        "dns.forward_timeout",
        raw.forward_timeout.as_deref(),
        DEFAULT_FORWARD_TIMEOUT,
        |s| parse_duration_between(s, MIN_FORWARD_TIMEOUT, MAX_FORWARD_TIMEOUT),
    );
    let cache_size = raw.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
    if cache_size > MAX_CACHE_SIZE {
        check.fail(
            "dns.cache_size",
            format!("{cache_size} is more than the maximum of {MAX_CACHE_SIZE}"),
        );
    }
    let allow_sources = match raw.allow_sources.as_deref() {
        None => DEFAULT_ALLOW_SOURCES
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        Some([]) => {
            check.fail(
                "dns.allow_sources",
                "must not be empty (it would refuse everyone); [\"0.0.0.0/0\", \"::/0\"] answers everyone",
            );
            Vec::new()
        }
        Some(sources) => list(
            check,
            "dns.allow_sources",
            Some(sources),
            str::parse::<SourceNet>,
        ),
    };
    let int = |check: &mut Check, key: &str, value, default, min, max| {
        int(check, &format!("dns.{key}"), value, default, min, max)
    };
    let rate_limit = int(
        check,
        "rate_limit",
        raw.rate_limit,
        DEFAULT_RATE_LIMIT,
        0,
        1_000_000,
    );
    let burst = int(
        check,
        "rate_limit_burst",
        raw.rate_limit_burst,
        DEFAULT_RATE_LIMIT_BURST.max(rate_limit.unwrap_or(0)),
        1,
        10_000_000,
    );
    let slip = int(
        check,
        "rate_limit_slip",
        raw.rate_limit_slip,
        DEFAULT_RATE_LIMIT_SLIP,
        0,
        10,
    );
    let tcp_total = int(
        check,
        "tcp_max_connections",
        raw.tcp_max_connections,
        DEFAULT_TCP_MAX_CONNECTIONS,
        1,
        1_000_000,
    );
    let tcp_per_source = int(
        check,
        "tcp_max_connections_per_source",
        raw.tcp_max_connections_per_source,
        DEFAULT_TCP_MAX_CONNECTIONS_PER_SOURCE.min(tcp_total.unwrap_or(i64::MAX)),
        1,
        1_000_000,
    );
    if let (Some(total), Some(per_source)) = (tcp_total, tcp_per_source)
        && per_source > total
    {
        check.fail(
            "dns.tcp_max_connections_per_source",
            format!("{per_source} is more than dns.tcp_max_connections ({total})"),
        );
    }
    let tcp_idle_timeout = check.or_value(
        "dns.tcp_idle_timeout",
        raw.tcp_idle_timeout.as_deref(),
        DEFAULT_TCP_IDLE_TIMEOUT,
        |s| parse_duration_between(s, MIN_TCP_IDLE_TIMEOUT, MAX_TCP_IDLE_TIMEOUT),
    );
    let (
        Some(ttl),
        Some(v4),
        Some(forward_timeout),
        Some(rate_limit),
        Some(burst),
        Some(slip),
        Some(tcp_total),
        Some(tcp_per_source),
        Some(tcp_idle_timeout),
    ) = (
        ttl,
        v4,
        forward_timeout,
        rate_limit,
        burst,
        slip,
        tcp_total,
        tcp_per_source,
        tcp_idle_timeout,
    )
    else {
        return None;
    };
    // In range, checked above.
    let narrow = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
    let size = |n: i64| usize::try_from(n).unwrap_or(usize::MAX);
    (check.errors.len() == before).then_some(DnsConfig {
        listen,
        ttl,
        clusterset_ipv4_range: v4,
        clusterset_ipv6_range: v6,
        state_file,
        clusterset_listeners: raw.clusterset_listeners.unwrap_or(true),
        upstreams,
        forward_timeout,
        cache_size,
        allow_sources,
        rate_limit: narrow(rate_limit),
        rate_limit_burst: narrow(burst),
        rate_limit_slip: narrow(slip),
        tcp_max_connections: size(tcp_total),
        tcp_max_connections_per_source: size(tcp_per_source),
        tcp_idle_timeout,
    })
}

/// Listeners inside the clusterset range would collide with the addresses
/// handed to services.
pub(super) fn outside_ranges(
    check: &mut Check,
    dns: &DnsConfig,
    listeners: &[(String, Option<SocketAddr>)],
) {
    if dns.listen.is_none() || !dns.clusterset_listeners {
        return;
    }
    for (path, addr) in listeners {
        let Some(addr) = addr else { continue };
        if let Some(range) = dns.ranges().into_iter().find(|r| r.covers(addr.ip())) {
            check.fail(
                path,
                format!("{addr} is inside dns.clusterset range {range}, whose addresses are given to services"),
            );
        }
    }
}
