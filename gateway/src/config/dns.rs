//! `[dns]`: the DNS server for `clusterset.local`, clusterset IPs, and
//! forwarding of other names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_federation::dns::{ForwardConfig, IpRange};
use serde::Serialize;

use super::error::ConfigError;
use super::model::{Check, parse_duration, parse_resolver, parse_socket_addr};
use super::raw::RawDns;

/// Default record TTL: short, so that clients follow failover and withdrawal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// Default clusterset IPv4 range: on loopback, so a VM needs no routing.
pub const DEFAULT_IPV4_RANGE: &str = "127.240.0.0/16";
/// Default time an upstream resolver has to answer.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of forwarded answers cached.
pub const DEFAULT_CACHE_SIZE: u64 = 10_000;
const MAX_TTL: Duration = Duration::from_secs(3600);
const MAX_CACHE_SIZE: u64 = 1_000_000;
const MIN_FORWARD_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[serde(serialize_with = "super::model::serialize_display")]
    pub clusterset_ipv4_range: IpRange,
    /// Where clusterset IPv6 addresses come from; no AAAA records without it.
    #[serde(
        serialize_with = "display_opt",
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
}

fn display_opt<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
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
    let listen = raw
        .listen
        .as_deref()
        .and_then(|a| check.parsed("dns.listen", parse_socket_addr(a)));
    let ttl = check.or_default("dns.ttl", raw.ttl.as_deref(), "5s", |s| {
        parse_duration(s, MAX_TTL)
    });
    let v4 = check.or_default(
        "dns.clusterset_ipv4_range",
        raw.clusterset_ipv4_range.as_deref(),
        DEFAULT_IPV4_RANGE,
        |s| parse_range(s, true),
    );
    let v6 = raw
        .clusterset_ipv6_range
        .as_deref()
        .and_then(|s| check.parsed("dns.clusterset_ipv6_range", parse_range(s, false)));
    let state_file = match raw.state_file.as_deref() {
        Some("") => {
            check
                .errors
                .push(ConfigError::new("dns.state_file", "must not be empty"));
            None
        }
        other => other.map(PathBuf::from),
    };
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
            check.errors.push(ConfigError::new(
                &path,
                format!("{addr} is this server (dns.listen): forwarding to it would loop"),
            ));
        } else {
            upstreams.push(addr);
        }
    }
    let forward_timeout = check.or_default(
        "dns.forward_timeout",
        raw.forward_timeout.as_deref(),
        "2s",
        |s| {
            parse_duration(s, MAX_FORWARD_TIMEOUT).and_then(|d| {
                if d < MIN_FORWARD_TIMEOUT {
                    Err(format!(
                        "{s:?} is shorter than the minimum of {}",
                        humantime::format_duration(MIN_FORWARD_TIMEOUT)
                    ))
                } else {
                    Ok(d)
                }
            })
        },
    );
    let cache_size = raw.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
    if cache_size > MAX_CACHE_SIZE {
        check.errors.push(ConfigError::new(
            "dns.cache_size",
            format!("{cache_size} is more than the maximum of {MAX_CACHE_SIZE}"),
        ));
    }
    let (Some(ttl), Some(v4), Some(forward_timeout)) = (ttl, v4, forward_timeout) else {
        return None;
    };
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
            check.errors.push(ConfigError::new(
                path,
                format!("{addr} is inside dns.clusterset range {range}, whose addresses are given to services"),
            ));
        }
    }
}
