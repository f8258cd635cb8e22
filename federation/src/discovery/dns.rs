//! DNS discovery: a service's endpoints from SRV records (each target's A and
//! AAAA records, the port from the SRV record) or from A and AAAA records with
//! a configured port, through `hickory-resolver`.
//!
//! The answer is re-resolved when its shortest TTL runs out, clamped to
//! `[min_ttl, max_ttl]` so a TTL of 0 does not turn into a query loop and a
//! day-long TTL does not hide a change for a day. The resolver's own cache is
//! cleared before each round: this source *is* the cache.
//!
//! What counts as an answer and what as a failure follows Envoy's
//! `STRICT_DNS` clusters:
//! - an answer, including an authoritative "no such name" (NXDOMAIN) or "no
//!   such record" (NODATA), replaces the endpoints — a service whose records
//!   are gone has no endpoints here (its export is withdrawn); the negative
//!   answer is re-checked after its negative TTL, clamped the same way;
//! - a failure (timeout, SERVFAIL, REFUSED, an unreachable resolver) keeps
//!   the last known endpoints, is logged and counted
//!   (`isthmus_discovery_errors_total{kind="resolve"}`), and is retried with
//!   exponential backoff from 1 s to 30 s.
//!
//! SRV records: only the targets of the lowest priority value are used (the
//! others are backups, RFC 2782); weights are left to the data plane's load
//! balancing, which spreads requests evenly. A target of `.` means "no
//! service here" and is skipped.
//!
//! Nameservers are configured explicitly (`discovery.dns_resolvers`); without
//! them the `nameserver` lines of `/etc/resolv.conf` are used (read when the
//! source starts), port 53, UDP with TCP fallback.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::{Backoff, FailureKind, SourceHandle};
use crate::ClusterName;
use crate::catalog::{HeadlessEndpoint, LocalService};

/// Default shortest time between two resolutions of a name.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
/// Default longest time between two resolutions of a name.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);
/// Default time one query may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// First retry after a failure.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between retries after failures.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Where the system's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Which records hold the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsRecords {
    /// SRV records; each target's A/AAAA records with the SRV record's port.
    Srv,
    /// A and AAAA records, each address with this port.
    Ip {
        /// The port the endpoints listen on.
        port: u16,
    },
}

/// One service whose endpoints come from DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// The service as it is published, endpoints aside.
    pub service: LocalService,
    /// The name queried (absolute).
    pub query: String,
    /// Which records.
    pub records: DnsRecords,
    /// This gateway's cluster, for a headless service's endpoints.
    pub cluster: ClusterName,
}

/// How DNS sources resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Nameservers; empty: those of `/etc/resolv.conf`.
    pub resolvers: Vec<SocketAddr>,
    /// Shortest time between two resolutions.
    pub min_ttl: Duration,
    /// Longest time between two resolutions.
    pub max_ttl: Duration,
    /// Time one query may take.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            resolvers: Vec::new(),
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Checks a name to query and makes it absolute (`ledger.example.internal`
/// becomes `ledger.example.internal.`): no search domains apply.
pub fn parse_query(s: &str) -> Result<String, String> {
    let name = Name::from_ascii(s).map_err(|e| format!("{s:?} is not a DNS name ({e})"))?;
    if name.is_root() || name.num_labels() == 0 {
        return Err(format!(
            "{s:?} is not a DNS name such as \"ledger.example.internal\""
        ));
    }
    let mut name = name;
    name.set_fqdn(true);
    Ok(name.to_ascii())
}

/// The nameservers of a `resolv.conf` text: its `nameserver` lines, port 53
/// (a `%zone` suffix is dropped).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            let addr = addr.split('%').next()?;
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// A resolver asking `servers` (UDP, TCP on truncation), answers uncached
/// between rounds, no hosts file, both address families.
pub fn resolver(servers: &[SocketAddr], timeout: Duration) -> Result<TokioResolver, String> {
    if servers.is_empty() {
        return Err(format!(
            "no resolvers: set discovery.dns_resolvers or list nameservers in {RESOLV_CONF}"
        ));
    }
    let name_servers = servers
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    options.attempts = 2;
    options.use_hosts_file = ResolveHosts::Never;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.ndots = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(name_servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
    .map_err(|e| format!("cannot build the resolver: {e}"))
}

/// What one round of queries found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The endpoints (none for a negative answer).
    pub endpoints: Vec<SocketAddr>,
    /// The shortest TTL seen (unclamped); `None` when the answer carried none.
    pub ttl: Option<Duration>,
}

impl Resolution {
    fn empty(negative: &NoRecords) -> Self {
        Self {
            endpoints: Vec::new(),
            ttl: negative.negative_ttl.map(secs),
        }
    }

    fn lower_ttl(&mut self, ttl: u32) {
        let ttl = secs(ttl);
        self.ttl = Some(self.ttl.map_or(ttl, |t| t.min(ttl)));
    }
}

fn secs(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl))
}

/// The authoritative "no such name/record" inside `e`, if that is what it is.
fn negative(e: &NetError) -> Option<&NoRecords> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => Some(no),
        _ => None,
    }
}

/// Resolves `query` to addresses; a negative answer is an empty result.
async fn addresses(
    resolver: &TokioResolver,
    query: &str,
    port: u16,
    into: &mut Resolution,
) -> Result<(), NetError> {
    match resolver.lookup_ip(query).await {
        Ok(found) => {
            for record in found.as_lookup().answers() {
                into.lower_ttl(record.ttl);
            }
            into.endpoints
                .extend(found.iter().map(|ip| SocketAddr::new(ip, port)));
            Ok(())
        }
        Err(e) => match negative(&e) {
            Some(no) => {
                if let Some(ttl) = no.negative_ttl {
                    into.lower_ttl(ttl);
                }
                Ok(())
            }
            None => Err(e),
        },
    }
}

/// One round of queries for `target`.
pub async fn resolve(resolver: &TokioResolver, target: &DnsTarget) -> Result<Resolution, NetError> {
    resolver.clear_cache();
    let mut found = Resolution {
        endpoints: Vec::new(),
        ttl: None,
    };
    match target.records {
        DnsRecords::Ip { port } => addresses(resolver, &target.query, port, &mut found).await?,
        DnsRecords::Srv => {
            let lookup = match resolver.srv_lookup(target.query.as_str()).await {
                Ok(lookup) => lookup,
                Err(e) => {
                    return match negative(&e) {
                        Some(no) => Ok(Resolution::empty(no)),
                        None => Err(e),
                    };
                }
            };
            for record in lookup.answers() {
                found.lower_ttl(record.ttl);
            }
            let srvs: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) if !srv.target.is_root() => Some(srv),
                    _ => None,
                })
                .collect();
            let best = srvs.iter().map(|s| s.priority).min();
            for srv in srvs.iter().filter(|s| Some(s.priority) == best) {
                addresses(resolver, &srv.target.to_ascii(), srv.port, &mut found).await?;
            }
        }
    }
    found.endpoints.sort();
    found.endpoints.dedup();
    Ok(found)
}

impl DnsTarget {
    /// The service with `endpoints`.
    fn with_endpoints(&self, endpoints: Vec<SocketAddr>) -> LocalService {
        let mut service = self.service.clone();
        if service.export.headless {
            service.export.endpoints = endpoints
                .iter()
                .map(|a| HeadlessEndpoint {
                    cluster: self.cluster.clone(),
                    hostname: None,
                    address: a.ip(),
                })
                .collect();
        }
        service.endpoints = endpoints;
        service
    }
}

/// The wait before the next round after an answer with `ttl`.
fn refresh_after(ttl: Option<Duration>, settings: &DnsSettings) -> Duration {
    ttl.unwrap_or(settings.min_ttl)
        .clamp(settings.min_ttl, settings.max_ttl.max(settings.min_ttl))
}

/// The nameservers to use: the configured ones, or `/etc/resolv.conf`'s.
fn nameservers(settings: &DnsSettings, resolv_conf: &Path) -> Vec<SocketAddr> {
    if !settings.resolvers.is_empty() {
        return settings.resolvers.clone();
    }
    std::fs::read_to_string(resolv_conf)
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// Resolves `target` until `stop` fires, publishing through `handle`; see
/// the module docs for what happens on failure.
pub async fn run(
    target: DnsTarget,
    settings: DnsSettings,
    mut handle: SourceHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut resolver: Option<TokioResolver> = None;
    loop {
        if resolver.is_none() {
            match self::resolver(
                &nameservers(&settings, Path::new(RESOLV_CONF)),
                settings.timeout,
            ) {
                Ok(r) => resolver = Some(r),
                Err(e) => {
                    error!(source = handle.name(), "{}: {e}", handle.name());
                    handle.failed(FailureKind::Resolvers);
                }
            }
        }
        let wait = match &resolver {
            None => backoff.next_delay(),
            Some(r) => {
                let result = tokio::select! {
                    result = resolve(r, &target) => result,
                    _ = stop.changed() => return,
                };
                match result {
                    Ok(found) => {
                        backoff.reset();
                        debug!(
                            source = handle.name(),
                            query = %target.query,
                            endpoints = found.endpoints.len(),
                            ttl = ?found.ttl,
                            "resolved"
                        );
                        let wait = refresh_after(found.ttl, &settings);
                        if found.endpoints.is_empty() {
                            warn!(
                                source = handle.name(),
                                query = %target.query,
                                "no records for {}: the service has no endpoints here",
                                target.query
                            );
                        }
                        handle.publish(vec![target.with_endpoints(found.endpoints)]);
                        wait
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        warn!(
                            source = handle.name(),
                            query = %target.query,
                            error = %e,
                            retry_in = ?wait,
                            "DNS resolution of {} failed; keeping the last known endpoints",
                            target.query
                        );
                        handle.failed(FailureKind::Resolve);
                        wait
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests;
