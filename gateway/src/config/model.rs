//! Stage two: the validated, typed configuration the gateway runs on.
//!
//! [`Config::from_raw`] checks every field of a [`RawConfig`], collects every problem
//! with its dotted path, and only returns a [`Config`] when there is none. Defaults
//! are the named constants below; the shipped `config/isthmus.toml` documents them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use isthmus_federation::catalog::{
    EndpointInfo, Export, HeadlessEndpoint, LocalService, PeerCatalog, Protocol, RemoteGateway,
    ServiceKey, ServicePort, Subset,
};
use isthmus_federation::trust::PeerPolicy;
use isthmus_federation::{
    ClusterName, GatewayName, Locality, LocalityError, SpiffeId, TrustDomain,
};
use serde::Serialize;

pub use super::discovery::DiscoveryConfig;
use super::error::{ConfigError, ConfigErrors};
pub use super::federation::{FederationConfig, FederationPeer};
use super::raw::{
    RawAdmin, RawBundleEndpoint, RawConfig, RawFederated, RawGateway, RawIdentity, RawListeners,
    RawLocality, RawLog, RawPeer, RawRuntime, RawService, RawShutdown, RawTrust,
};
pub use super::traffic::{EndpointConfig, RouteConfig};
pub use super::upstream::{
    CircuitBreakerConfig, HealthCheckConfig, LocalityPolicy, OutlierDetectionConfig, UpstreamConfig,
};

/// Default admin listener: loopback only, so metrics and debug data stay on the host.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default longest wait for in-flight requests after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for `shutdown.drain_timeout`: systemd's default stop timeout is 90 s.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Where a new process waits for the listening sockets during a binary upgrade
/// (`RuntimeDirectory=isthmus` in the systemd unit).
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/isthmus/upgrade.sock";
/// Upper bound for `runtime.threads`.
pub const MAX_THREADS: i64 = 1024;
/// Default interval between fetches of a federated bundle without a refresh hint
/// (SPIFFE Trust Domain and Bundle §6.2 suggests five minutes).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Default `spiffe_refresh_hint` this gateway's bundle endpoint publishes.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Bounds of refresh intervals and hints.
pub const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Who this gateway is.
    pub gateway: GatewayIdentity,
    /// The admin HTTP API.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// Worker threads.
    pub runtime: RuntimeConfig,
    /// Draining on stop.
    pub shutdown: ShutdownConfig,
    /// This gateway's SVID and bundle; without it the gateway runs no mTLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// Peers and federated trust domains.
    pub trust: TrustConfig,
    /// Data plane listeners.
    pub listeners: ListenersConfig,
    /// Services of this cluster (and ports of services served by peers).
    pub services: Vec<ServiceConfig>,
    /// Peer gateways (static until federation discovers them).
    pub peers: Vec<PeerConfig>,
    /// Header matches and weighted splits, by service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Timeouts, retries and backend protection.
    pub upstream: UpstreamConfig,
    /// `[federation]`
    pub federation: FederationConfig,
    /// `[discovery]`
    pub discovery: DiscoveryConfig,
    /// `[dns]`
    pub dns: super::dns::DnsConfig,
    /// `[limits]`
    pub limits: super::limits::LimitsConfig,
}

/// `[listeners]`: each is off unless given an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenersConfig {
    /// Plain HTTP (HTTP/1.1 and h2c) for local workloads, routed by Host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<SocketAddr>,
    /// mTLS from peer gateways, routed by SNI (needs `[identity]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub east_west: Option<SocketAddr>,
}

/// `[[services]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceConfig {
    /// Namespace.
    pub namespace: isthmus_federation::Namespace,
    /// Name.
    pub name: isthmus_federation::ServiceName,
    /// Ports.
    pub ports: Vec<PortConfig>,
    /// Endpoints in this cluster.
    pub endpoints: Vec<EndpointConfig>,
    /// Named subsets of the endpoints, by labels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Visible to peer gateways.
    pub export: bool,
    /// Callers allowed through the east-west listener (with
    /// `allow_trust_domains`); both empty: every admitted peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_ids: Vec<SpiffeId>,
    /// Trust domains whose every gateway and workload may call it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_trust_domains: Vec<TrustDomain>,
    /// East-west mode.
    pub mode: EastWestMode,
    /// Passthrough only: the source networks whose connections the east-west
    /// listener splices to the endpoints; empty: any source.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_display_list"
    )]
    pub allow_sources: Vec<ipnet::IpNet>,
    /// Headless: DNS answers with the endpoints, not a clusterset IP.
    pub headless: bool,
}

impl ServiceConfig {
    /// The service as the catalog has it, in `cluster`.
    pub fn local_service(&self, cluster: &ClusterName) -> LocalService {
        let headless_endpoints = if self.headless {
            self.endpoints
                .iter()
                .map(|e| HeadlessEndpoint {
                    cluster: cluster.clone(),
                    hostname: None,
                    address: e.address.ip(),
                })
                .collect()
        } else {
            Vec::new()
        };
        LocalService {
            export: Export {
                key: self.key(),
                ports: self.service_ports(),
                // The hub stamps the time it first sees the export.
                export_time_millis: 0,
                headless: self.headless,
                endpoints: headless_endpoints,
                subsets: Vec::new(),
            },
            endpoints: self.endpoints.iter().map(|e| e.address).collect(),
            endpoint_info: self
                .endpoints
                .iter()
                .filter(|e| e.info != EndpointInfo::default())
                .map(|e| (e.address, e.info.clone()))
                .collect(),
            subsets: self.subsets.clone(),
            exported: self.export,
            allowed_callers: (!self.allow_ids.is_empty() || !self.allow_trust_domains.is_empty())
                .then(|| {
                    PeerPolicy::new(
                        self.allow_ids.iter().cloned(),
                        self.allow_trust_domains.iter().cloned(),
                    )
                }),
            passthrough: self.mode == EastWestMode::Passthrough,
        }
    }

    /// Whether a passthrough connection from `source` may reach it.
    pub fn admits_source(&self, source: IpAddr) -> bool {
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        self.allow_sources.is_empty() || self.allow_sources.iter().any(|n| n.contains(&source))
    }

    /// Its `namespace/name`.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Its ports as the catalog has them.
    pub fn service_ports(&self) -> Vec<ServicePort> {
        self.ports
            .iter()
            .map(|p| ServicePort {
                port: p.port,
                protocol: p.protocol,
                name: p.name.clone(),
            })
            .collect()
    }
}

/// How the east-west listener handles a service's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EastWestMode {
    /// Terminate the peer gateway's mTLS; route each request (L7).
    Terminate,
    /// Route the peer's TLS by SNI without terminating it (Istio AUTO_PASSTHROUGH).
    Passthrough,
}

impl FromStr for EastWestMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "terminate" => Ok(Self::Terminate),
            "passthrough" => Ok(Self::Passthrough),
            other => Err(format!(
                "unknown mode {other:?}; expected \"terminate\" or \"passthrough\""
            )),
        }
    }
}

/// `services[].ports[]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortConfig {
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// For `tcp` ports: where local workloads connect to reach the service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Its name, for DNS SRV records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<isthmus_federation::PortName>,
}

/// `[[peers]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerConfig {
    /// The peer's cluster.
    pub cluster: ClusterName,
    /// The SPIFFE ID it must present.
    pub spiffe_id: SpiffeId,
    /// Its east-west listener.
    pub address: SocketAddr,
    /// Where it runs, `region[/zone[/subzone]]`.
    #[serde(serialize_with = "serialize_display")]
    pub locality: Locality,
    /// Services it serves, `namespace/name`.
    #[serde(serialize_with = "serialize_keys")]
    pub services: Vec<ServiceKey>,
}

/// Serializes a value as its `Display` form (names, keys, localities).
fn serialize_display_list<S: serde::Serializer, T: Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

/// A network (`10.0.0.0/8`, `fd00::/8`) or one address (`10.1.2.3`).
pub(super) fn parse_network(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip.into());
    }
    s.parse::<ipnet::IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a network such as \"10.0.0.0/8\" or an address"))
}

pub(super) fn serialize_display<S: serde::Serializer, T: Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn serialize_keys<S: serde::Serializer>(keys: &[ServiceKey], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(keys.iter().map(ToString::to_string))
}

/// `[identity]`: file paths, never key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityConfig {
    /// X509-SVID certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// This trust domain's bundle, PEM or SPIFFE JSON.
    pub bundle: PathBuf,
}

/// `[trust]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustConfig {
    /// SPIFFE IDs allowed to connect to this gateway.
    pub allow_ids: Vec<SpiffeId>,
    /// Trust domains whose every identity may connect to this gateway.
    pub allow_trust_domains: Vec<TrustDomain>,
    /// Fetch interval for bundles that carry no refresh hint.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Federated trust domains.
    pub federated: Vec<FederatedDomain>,
    /// This gateway's SPIFFE bundle endpoint, if served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_endpoint: Option<BundleEndpointConfig>,
}

/// `[[trust.federated]]`: a foreign trust domain and where its bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederatedDomain {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// A static bundle file, or the bootstrap bundle for `https_spiffe`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Its bundle endpoint, if fetched.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<FederationEndpoint>,
    /// Configured peers of this trust domain may push its bundle, which then
    /// replaces `bundle` (a bootstrap bundle). Off by default: the file or
    /// the endpoint is the only source.
    pub accept_peer_bundles: bool,
}

/// A bundle endpoint to fetch from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationEndpoint {
    /// `https://host[:port][/path]`.
    pub endpoint_url: String,
    /// How it is authenticated.
    #[serde(flatten)]
    pub profile: EndpointProfileConfig,
}

/// SPIFFE bundle endpoint profiles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "endpoint_profile", rename_all = "snake_case")]
pub enum EndpointProfileConfig {
    /// The endpoint presents an X509-SVID with this ID.
    HttpsSpiffe {
        /// The endpoint's SPIFFE ID.
        endpoint_spiffe_id: SpiffeId,
    },
    /// Web PKI, against `endpoint_ca` or the system's roots.
    HttpsWeb {
        /// Roots for the endpoint's certificate; the system's when absent.
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint_ca: Option<PathBuf>,
    },
}

/// `[trust.bundle_endpoint]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleEndpointConfig {
    /// Listen address (HTTPS, `https_spiffe` profile).
    pub listen: SocketAddr,
    /// `spiffe_refresh_hint` published with the bundle.
    #[serde(with = "humantime_serde")]
    pub refresh_hint: Duration,
}

/// `[gateway]`: the identity of this gateway in the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayIdentity {
    /// Gateway name, the last segment of its SPIFFE ID.
    pub name: GatewayName,
    /// The cluster (or VM fleet) this gateway fronts.
    pub cluster: ClusterName,
    /// The SPIFFE trust domain of this cluster.
    pub trust_domain: TrustDomain,
    /// Where this gateway runs.
    pub locality: Locality,
    /// Its labels, announced to peers; the default labels of its endpoints.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: isthmus_federation::catalog::Labels,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener.
    pub listen: SocketAddr,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald under systemd, text on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            other => Err(format!(
                "unknown format {other:?}; expected \"auto\", \"json\" or \"text\""
            )),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `info,isthmus_gateway=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Worker threads for each traffic-carrying service.
    pub threads: usize,
    /// The Unix socket over which a running gateway hands its listening
    /// sockets to the new process of a binary upgrade.
    pub upgrade_socket: PathBuf,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShutdownConfig {
    /// Longest wait for in-flight requests to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Collects problems while fields are checked one by one.
#[derive(Default)]
pub(crate) struct Check {
    pub(super) errors: Vec<ConfigError>,
}

impl Check {
    /// Parses a required field; records an error when it is missing or invalid.
    pub(super) fn required<T, E: Display>(
        &mut self,
        path: &str,
        value: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        match value {
            None => {
                self.errors.push(ConfigError::new(path, "is required"));
                None
            }
            Some(v) => self.parsed(path, parse(v)),
        }
    }

    /// Parses an optional field, falling back to `default` when absent.
    pub(super) fn or_default<T, E: Display>(
        &mut self,
        path: &str,
        value: Option<&str>,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        self.parsed(path, parse(value.unwrap_or(default)))
    }

    pub(super) fn parsed<T, E: Display>(&mut self, path: &str, result: Result<T, E>) -> Option<T> {
        result
            .map_err(|e| self.errors.push(ConfigError::new(path, e)))
            .ok()
    }
}

pub(super) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an address such as \"127.0.0.1:15000\" or \"[::]:15000\"")
    })
}

/// A DNS server: `ip:port`, or `ip` for port 53.
pub(super) fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    parse_socket_addr(s).map_err(|_| {
        format!("{s:?} is not a nameserver address such as \"10.0.0.2\" or \"127.0.0.1:5353\"")
    })
}

pub(super) fn parse_duration(s: &str, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"10s\" or \"1m 30s\" ({e})"))?;
    if d > max {
        return Err(format!(
            "{s:?} is longer than the maximum of {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| {
            format!(
                "{s:?} is not a log filter such as \"info\" or \"warn,isthmus_gateway=debug\" ({e})"
            )
        })
}

impl Config {
    /// Validates a raw configuration, returning every problem found.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigErrors> {
        let mut check = Check::default();
        let gateway = gateway(&mut check, &raw.gateway);
        let admin = admin(&mut check, &raw.admin);
        let log = log(&mut check, &raw.log);
        let runtime = runtime(&mut check, &raw.runtime);
        let shutdown = shutdown(&mut check, &raw.shutdown);
        let upstream = super::upstream::upstream(&mut check, &raw.upstream);
        let identity = raw.identity.as_ref().and_then(|i| identity(&mut check, i));
        let own_td = gateway.as_ref().map(|g| &g.trust_domain);
        let trust = trust(&mut check, &raw.trust, own_td, raw.identity.is_some());
        let listeners = listeners(&mut check, &raw.listeners, raw.identity.is_some());
        let services = services(&mut check, raw.services.as_deref().unwrap_or_default());
        let peers = peers(
            &mut check,
            raw.peers.as_deref().unwrap_or_default(),
            &services,
            own_td,
            trust.as_ref(),
        );
        let local_subsets: BTreeMap<ServiceKey, Vec<String>> = services
            .iter()
            .map(|s| (s.key(), s.subsets.iter().map(|x| x.name.clone()).collect()))
            .collect();
        let routes = super::traffic::routes(&mut check, raw.routes.as_deref(), &local_subsets);
        let federation = super::federation::federation(
            &mut check,
            &raw.federation,
            listeners.as_ref(),
            raw.identity.is_some(),
            own_td,
            trust.as_ref(),
        );
        let dns = super::dns::dns(&mut check, &raw.dns);
        let discovery = super::discovery::discovery(&mut check, &raw.discovery);
        let limits = super::limits::limits(&mut check, &raw.limits);
        if let (Some(admin), Some(trust), Some(listeners)) = (&admin, &trust, &listeners) {
            let mut tcp = tcp_listeners(trust, listeners, &services);
            tcp.push((
                "federation.listen".into(),
                federation.as_ref().and_then(|f| f.listen),
            ));
            tcp.push(("dns.listen".into(), dns.as_ref().and_then(|d| d.listen)));
            distinct_listeners(&mut check, admin, &tcp);
            if let Some(dns) = &dns {
                tcp.push(("admin.listen".into(), Some(admin.listen)));
                super::dns::outside_ranges(&mut check, dns, &tcp);
            }
        }
        match (
            (gateway, admin, log, runtime, shutdown),
            (trust, listeners, upstream, federation, dns, limits),
        ) {
            (
                (Some(gateway), Some(admin), Some(log), Some(runtime), Some(shutdown)),
                (
                    Some(trust),
                    Some(listeners),
                    Some(upstream),
                    Some(federation),
                    Some(dns),
                    Some(limits),
                ),
            ) if check.errors.is_empty() => Ok(Self {
                gateway,
                admin,
                log,
                runtime,
                shutdown,
                identity,
                trust,
                listeners,
                services,
                peers,
                routes,
                upstream,
                federation,
                discovery,
                dns,
                limits,
            }),
            _ => Err(ConfigErrors(check.errors)),
        }
    }

    /// The SPIFFE ID this gateway presents: `spiffe://<td>/isthmus/gateway/<name>`.
    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId::gateway(&self.gateway.trust_domain, &self.gateway.name)
    }

    /// The services of `[[services]]`: the `config` discovery source.
    pub fn local_services(&self) -> Vec<LocalService> {
        self.services
            .iter()
            .map(|svc| svc.local_service(&self.gateway.cluster))
            .collect()
    }

    /// The gateways of `[[peers]]`, which serve the listed services without
    /// peering; each service's ports come from its `[[services]]` entry.
    pub fn static_peers(&self) -> Vec<PeerCatalog> {
        self.peers
            .iter()
            .map(|p| PeerCatalog {
                gateway: RemoteGateway {
                    cluster: p.cluster.clone(),
                    spiffe_id: p.spiffe_id.clone(),
                    address: p.address,
                    locality: p.locality.clone(),
                    labels: Default::default(),
                    // No lease: only health checks and outlier detection speak for it.
                    live: true,
                    subsets: Vec::new(),
                },
                services: p
                    .services
                    .iter()
                    .map(|key| {
                        let ports = self
                            .services
                            .iter()
                            .find(|s| &s.key() == key)
                            .map(ServiceConfig::service_ports)
                            .unwrap_or_default();
                        let export = Export {
                            key: key.clone(),
                            ports,
                            // Oldest possible: configured by the operator.
                            export_time_millis: 0,
                            headless: false,
                            endpoints: Vec::new(),
                            subsets: Vec::new(),
                        };
                        (key.clone(), export)
                    })
                    .collect(),
            })
            .collect()
    }

    /// Makes every relative file path absolute, relative to `base` (the
    /// configuration file's directory), so the effective configuration says
    /// exactly which files are used whatever the working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.discovery.resolve_paths(base);
        resolve(&mut self.runtime.upgrade_socket);
        if let Some(identity) = &mut self.identity {
            resolve(&mut identity.cert);
            resolve(&mut identity.key);
            resolve(&mut identity.bundle);
        }
        for fed in &mut self.trust.federated {
            if let Some(bundle) = &mut fed.bundle {
                resolve(bundle);
            }
            if let Some(FederationEndpoint {
                profile:
                    EndpointProfileConfig::HttpsWeb {
                        endpoint_ca: Some(ca),
                    },
                ..
            }) = &mut fed.endpoint
            {
                resolve(ca);
            }
        }
    }
}

fn gateway(check: &mut Check, raw: &RawGateway) -> Option<GatewayIdentity> {
    let name = check.required("gateway.name", raw.name.as_deref(), GatewayName::from_str);
    let cluster = check.required(
        "gateway.cluster",
        raw.cluster.as_deref(),
        ClusterName::from_str,
    );
    let trust_domain = check.required(
        "gateway.trust_domain",
        raw.trust_domain.as_deref(),
        TrustDomain::from_str,
    );
    let locality = locality(check, &raw.locality);
    let labels = super::traffic::labels(check, "gateway.labels", raw.labels.as_ref());
    Some(GatewayIdentity {
        name: name?,
        cluster: cluster?,
        trust_domain: trust_domain?,
        locality: locality?,
        labels,
    })
}

fn locality(check: &mut Check, raw: &RawLocality) -> Option<Locality> {
    let Some(region) = raw.region.as_deref() else {
        check
            .errors
            .push(ConfigError::new("gateway.locality.region", "is required"));
        return None;
    };
    let result = Locality::new(region, raw.zone.as_deref(), raw.subzone.as_deref());
    result
        .map_err(|e| {
            let error = match e {
                LocalityError::Part { part, source } => {
                    ConfigError::new(format!("gateway.locality.{part}"), source)
                }
                LocalityError::MissingParent { part, .. } => {
                    ConfigError::new(format!("gateway.locality.{part}"), e)
                }
                LocalityError::TooManyParts => ConfigError::new("gateway.locality", e),
            };
            check.errors.push(error);
        })
        .ok()
}

fn admin(check: &mut Check, raw: &RawAdmin) -> Option<AdminConfig> {
    let listen = check.or_default(
        "admin.listen",
        raw.listen.as_deref(),
        DEFAULT_ADMIN_LISTEN,
        parse_socket_addr,
    )?;
    Some(AdminConfig { listen })
}

fn log(check: &mut Check, raw: &RawLog) -> Option<LogConfig> {
    let level = check.or_default(
        "log.level",
        raw.level.as_deref(),
        DEFAULT_LOG_LEVEL,
        parse_log_filter,
    );
    let format = check.or_default(
        "log.format",
        raw.format.as_deref(),
        "auto",
        LogFormat::from_str,
    );
    Some(LogConfig {
        level: level?,
        format: format?,
    })
}

fn runtime(check: &mut Check, raw: &RawRuntime) -> Option<RuntimeConfig> {
    let threads = match raw.threads {
        None => std::thread::available_parallelism().map_or(1, usize::from),
        Some(n) if (1..=MAX_THREADS).contains(&n) => n as usize,
        Some(n) => {
            check.errors.push(ConfigError::new(
                "runtime.threads",
                format!("{n} is out of range; expected 1 to {MAX_THREADS}"),
            ));
            return None;
        }
    };
    let upgrade_socket = match raw.upgrade_socket.as_deref().map(parse_path) {
        None => PathBuf::from(DEFAULT_UPGRADE_SOCKET),
        Some(Ok(path)) => path,
        Some(Err(e)) => {
            check
                .errors
                .push(ConfigError::new("runtime.upgrade_socket", e));
            return None;
        }
    };
    Some(RuntimeConfig {
        threads,
        upgrade_socket,
    })
}

pub(super) fn parse_path(s: &str) -> Result<PathBuf, &'static str> {
    if s.trim().is_empty() {
        Err("must not be empty")
    } else {
        Ok(PathBuf::from(s))
    }
}

fn identity(check: &mut Check, raw: &RawIdentity) -> Option<IdentityConfig> {
    let cert = check.required("identity.cert", raw.cert.as_deref(), parse_path);
    let key = check.required("identity.key", raw.key.as_deref(), parse_path);
    let bundle = check.required("identity.bundle", raw.bundle.as_deref(), parse_path);
    Some(IdentityConfig {
        cert: cert?,
        key: key?,
        bundle: bundle?,
    })
}

/// Parses each element of a list, recording errors as `path[i]`.
pub(super) fn list<T, E: Display>(
    check: &mut Check,
    path: &str,
    values: Option<&[String]>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Vec<T> {
    values
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, v)| check.parsed(&format!("{path}[{i}]"), parse(v)))
        .collect()
}

fn trust(
    check: &mut Check,
    raw: &RawTrust,
    own_td: Option<&TrustDomain>,
    has_identity: bool,
) -> Option<TrustConfig> {
    let errors_before = check.errors.len();
    let allow_ids = list(
        check,
        "trust.allow_ids",
        raw.allow_ids.as_deref(),
        SpiffeId::from_str,
    );
    let allow_trust_domains = list(
        check,
        "trust.allow_trust_domains",
        raw.allow_trust_domains.as_deref(),
        TrustDomain::from_str,
    );
    let refresh_interval = match raw.refresh_interval.as_deref() {
        None => Some(DEFAULT_REFRESH_INTERVAL),
        Some(s) => check.parsed("trust.refresh_interval", parse_refresh(s)),
    };
    let mut federated = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, f) in raw.federated.iter().flatten().enumerate() {
        if let Some(fed) = federated_domain(check, &format!("trust.federated[{i}]"), f, own_td) {
            if !seen.insert(fed.trust_domain.clone()) {
                check.errors.push(ConfigError::new(
                    format!("trust.federated[{i}].trust_domain"),
                    format!(
                        "{} is listed twice; a trust domain has one bundle",
                        fed.trust_domain
                    ),
                ));
            }
            federated.push(fed);
        }
    }
    // Every trust domain allowed in must have a bundle to authenticate it with.
    for (i, td) in allow_trust_domains.iter().enumerate() {
        if Some(td) != own_td && !seen.contains(td) {
            check.errors.push(ConfigError::new(
                format!("trust.allow_trust_domains[{i}]"),
                format!("{td} has no bundle: add it to [[trust.federated]]"),
            ));
        }
    }
    for (i, id) in allow_ids.iter().enumerate() {
        let td = id.trust_domain();
        if Some(&td) != own_td && !seen.contains(&td) {
            check.errors.push(ConfigError::new(
                format!("trust.allow_ids[{i}]"),
                format!("trust domain {td} has no bundle: add it to [[trust.federated]]"),
            ));
        }
    }
    let bundle_endpoint = raw
        .bundle_endpoint
        .as_ref()
        .and_then(|b| bundle_endpoint(check, b));
    if !has_identity {
        for (present, path) in [
            (!federated.is_empty(), "trust.federated"),
            (raw.bundle_endpoint.is_some(), "trust.bundle_endpoint"),
            (!allow_ids.is_empty(), "trust.allow_ids"),
            (!allow_trust_domains.is_empty(), "trust.allow_trust_domains"),
        ] {
            if present {
                check.errors.push(ConfigError::new(
                    path,
                    "needs [identity]: this gateway has no SVID to authenticate with",
                ));
            }
        }
    }
    if check.errors.len() > errors_before {
        return None;
    }
    Some(TrustConfig {
        allow_ids,
        allow_trust_domains,
        refresh_interval: refresh_interval?,
        federated,
        bundle_endpoint,
    })
}

fn parse_refresh(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s, REFRESH_BOUNDS.1)?;
    if d < REFRESH_BOUNDS.0 {
        return Err(format!("{s:?} is shorter than the minimum of 1s"));
    }
    Ok(d)
}

fn parse_https_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(format!("{s:?} must be an https:// URL with a host"));
    }
    Ok(s.to_owned())
}

fn federated_domain(
    check: &mut Check,
    path: &str,
    raw: &RawFederated,
    own_td: Option<&TrustDomain>,
) -> Option<FederatedDomain> {
    let at = |field: &str| format!("{path}.{field}");
    let errors_before = check.errors.len();
    let trust_domain = check.required(
        &at("trust_domain"),
        raw.trust_domain.as_deref(),
        TrustDomain::from_str,
    );
    if let (Some(td), Some(own)) = (&trust_domain, own_td)
        && td == own
    {
        check.errors.push(ConfigError::new(
            at("trust_domain"),
            format!("{td} is this gateway's own trust domain; its bundle is identity.bundle"),
        ));
    }
    let bundle = raw
        .bundle
        .as_deref()
        .and_then(|b| check.parsed(&at("bundle"), parse_path(b)));
    let url = raw
        .endpoint_url
        .as_deref()
        .and_then(|u| check.parsed(&at("endpoint_url"), parse_https_url(u)));
    let endpoint_id = raw
        .endpoint_spiffe_id
        .as_deref()
        .and_then(|id| check.parsed(&at("endpoint_spiffe_id"), SpiffeId::from_str(id)));
    let endpoint_ca = raw
        .endpoint_ca
        .as_deref()
        .and_then(|c| check.parsed(&at("endpoint_ca"), parse_path(c)));
    let endpoint = if raw.endpoint_url.is_none() {
        for (set, field) in [
            (raw.endpoint_profile.is_some(), "endpoint_profile"),
            (raw.endpoint_spiffe_id.is_some(), "endpoint_spiffe_id"),
            (raw.endpoint_ca.is_some(), "endpoint_ca"),
        ] {
            if set {
                check
                    .errors
                    .push(ConfigError::new(at(field), "needs endpoint_url"));
            }
        }
        if raw.bundle.is_none() {
            check.errors.push(ConfigError::new(
                at("bundle"),
                "is required unless endpoint_url is set",
            ));
        }
        None
    } else {
        match raw.endpoint_profile.as_deref().unwrap_or("https_spiffe") {
            "https_spiffe" => {
                if raw.endpoint_spiffe_id.is_none() {
                    check.errors.push(ConfigError::new(
                        at("endpoint_spiffe_id"),
                        "is required for endpoint_profile \"https_spiffe\"",
                    ));
                }
                if raw.bundle.is_none() {
                    check.errors.push(ConfigError::new(
                        at("bundle"),
                        "is required for endpoint_profile \"https_spiffe\": the bootstrap bundle that authenticates the endpoint until its first fetch",
                    ));
                }
                if raw.endpoint_ca.is_some() {
                    check.errors.push(ConfigError::new(
                        at("endpoint_ca"),
                        "applies to endpoint_profile \"https_web\" only",
                    ));
                }
                if let (Some(id), Some(td)) = (&endpoint_id, &trust_domain)
                    && id.trust_domain_str() != td.as_str()
                {
                    check.errors.push(ConfigError::new(
                        at("endpoint_spiffe_id"),
                        format!("{id} is not in trust domain {td}"),
                    ));
                }
                endpoint_id.map(|endpoint_spiffe_id| EndpointProfileConfig::HttpsSpiffe {
                    endpoint_spiffe_id,
                })
            }
            "https_web" => {
                if raw.endpoint_spiffe_id.is_some() {
                    check.errors.push(ConfigError::new(
                        at("endpoint_spiffe_id"),
                        "applies to endpoint_profile \"https_spiffe\" only",
                    ));
                }
                Some(EndpointProfileConfig::HttpsWeb { endpoint_ca })
            }
            other => {
                check.errors.push(ConfigError::new(
                    at("endpoint_profile"),
                    format!("unknown profile {other:?}; expected \"https_spiffe\" or \"https_web\""),
                ));
                None
            }
        }
        .zip(url)
        .map(|(profile, endpoint_url)| FederationEndpoint {
            endpoint_url,
            profile,
        })
    };
    let accept_peer_bundles = raw.accept_peer_bundles.unwrap_or(false);
    if accept_peer_bundles && raw.endpoint_url.is_some() {
        check.errors.push(ConfigError::new(
            at("accept_peer_bundles"),
            "a trust domain's bundle has one source: with endpoint_url it is the endpoint, which peers never override",
        ));
    }
    if check.errors.len() > errors_before {
        return None;
    }
    Some(FederatedDomain {
        trust_domain: trust_domain?,
        bundle,
        endpoint,
        accept_peer_bundles,
    })
}

fn bundle_endpoint(check: &mut Check, raw: &RawBundleEndpoint) -> Option<BundleEndpointConfig> {
    let listen = check.required(
        "trust.bundle_endpoint.listen",
        raw.listen.as_deref(),
        parse_socket_addr,
    );
    let refresh_hint = match raw.refresh_hint.as_deref() {
        None => Some(DEFAULT_REFRESH_HINT),
        Some(s) => check.parsed("trust.bundle_endpoint.refresh_hint", parse_refresh(s)),
    };
    Some(BundleEndpointConfig {
        listen: listen?,
        refresh_hint: refresh_hint?,
    })
}

fn listeners(check: &mut Check, raw: &RawListeners, has_identity: bool) -> Option<ListenersConfig> {
    let before = check.errors.len();
    let outbound = raw
        .outbound
        .as_deref()
        .and_then(|a| check.parsed("listeners.outbound", parse_socket_addr(a)));
    let east_west = raw
        .east_west
        .as_deref()
        .and_then(|a| check.parsed("listeners.east_west", parse_socket_addr(a)));
    if raw.east_west.is_some() && !has_identity {
        check.errors.push(ConfigError::new(
            "listeners.east_west",
            "needs [identity]: peers authenticate this gateway by its SVID",
        ));
    }
    (check.errors.len() == before).then_some(ListenersConfig {
        outbound,
        east_west,
    })
}

/// No two listeners on the same address.
/// The TCP listeners of the data plane sections, by config path.
fn tcp_listeners(
    trust: &TrustConfig,
    listeners: &ListenersConfig,
    services: &[ServiceConfig],
) -> Vec<(String, Option<SocketAddr>)> {
    let mut out: Vec<(String, Option<SocketAddr>)> = vec![
        (
            "trust.bundle_endpoint.listen".into(),
            trust.bundle_endpoint.as_ref().map(|b| b.listen),
        ),
        ("listeners.outbound".into(), listeners.outbound),
        ("listeners.east_west".into(), listeners.east_west),
    ];
    for (i, svc) in services.iter().enumerate() {
        for (j, port) in svc.ports.iter().enumerate() {
            out.push((format!("services[{i}].ports[{j}].listen"), port.listen));
        }
    }
    out
}

/// No two listeners (`others`, and the admin API) on one address.
fn distinct_listeners(
    check: &mut Check,
    admin: &AdminConfig,
    others: &[(String, Option<SocketAddr>)],
) {
    let mut seen: Vec<(String, SocketAddr)> = vec![("admin.listen".into(), admin.listen)];
    for (path, addr) in others.iter().cloned() {
        let Some(addr) = addr else { continue };
        if let Some((other, _)) = seen.iter().find(|(_, a)| *a == addr) {
            check.errors.push(ConfigError::new(
                &path,
                format!("{addr} is already {other}"),
            ));
        }
        seen.push((path, addr));
    }
}

pub(super) fn services(check: &mut Check, raw: &[RawService]) -> Vec<ServiceConfig> {
    let mut out: Vec<ServiceConfig> = Vec::new();
    for (i, svc) in raw.iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        let before = check.errors.len();
        let namespace = check.required(&at("namespace"), svc.namespace.as_deref(), str::parse);
        let name = check.required(&at("name"), svc.name.as_deref(), str::parse);
        let mut ports: Vec<PortConfig> = Vec::new();
        let raw_ports = svc.ports.as_deref().unwrap_or_default();
        if raw_ports.is_empty() {
            check
                .errors
                .push(ConfigError::new(at("ports"), "needs at least one port"));
        }
        for (j, p) in raw_ports.iter().enumerate() {
            let port = match p.port {
                Some(n) if (1..=65535).contains(&n) => Some(n as u16),
                Some(n) => {
                    check.errors.push(ConfigError::new(
                        at(&format!("ports[{j}].port")),
                        format!("{n} is not a port number (1-65535)"),
                    ));
                    None
                }
                None => {
                    check.errors.push(ConfigError::new(
                        at(&format!("ports[{j}].port")),
                        "is required",
                    ));
                    None
                }
            };
            let protocol = check.or_default(
                &at(&format!("ports[{j}].protocol")),
                p.protocol.as_deref(),
                "http",
                Protocol::from_str,
            );
            let listen = p.listen.as_deref().and_then(|a| {
                check.parsed(&at(&format!("ports[{j}].listen")), parse_socket_addr(a))
            });
            if p.listen.is_some() && protocol.is_some_and(|proto| proto != Protocol::Tcp) {
                check.errors.push(ConfigError::new(
                    at(&format!("ports[{j}].listen")),
                    "applies to tcp ports only; HTTP and gRPC use listeners.outbound",
                ));
            }
            let name = p.name.as_deref().and_then(|n| {
                check.parsed(
                    &at(&format!("ports[{j}].name")),
                    n.parse::<isthmus_federation::PortName>(),
                )
            });
            if let (Some(port), Some(protocol)) = (port, protocol) {
                if ports.iter().any(|q| q.port == port) {
                    check.errors.push(ConfigError::new(
                        at(&format!("ports[{j}].port")),
                        format!("{port} is listed twice"),
                    ));
                }
                ports.push(PortConfig {
                    port,
                    protocol,
                    listen,
                    name,
                });
            }
        }
        let endpoints =
            super::traffic::endpoints(check, &at("endpoints"), svc.endpoints.as_deref());
        let subsets = super::traffic::subsets(check, &at("subsets"), svc.subsets.as_deref());
        let allow_ids = list(
            check,
            &at("allow_ids"),
            svc.allow_ids.as_deref(),
            SpiffeId::from_str,
        );
        let allow_trust_domains = list(
            check,
            &at("allow_trust_domains"),
            svc.allow_trust_domains.as_deref(),
            TrustDomain::from_str,
        );
        let mode = check.or_default(
            &at("mode"),
            svc.mode.as_deref(),
            "terminate",
            EastWestMode::from_str,
        );
        if mode == Some(EastWestMode::Passthrough)
            && (!allow_ids.is_empty() || !allow_trust_domains.is_empty())
        {
            check.errors.push(ConfigError::new(
                at("mode"),
                "passthrough does not terminate TLS, so allow_ids/allow_trust_domains cannot be enforced; the workloads authorize",
            ));
        }
        let allow_sources = list(
            check,
            &at("allow_sources"),
            svc.allow_sources.as_deref(),
            parse_network,
        );
        if svc.allow_sources.is_some() && mode != Some(EastWestMode::Passthrough) {
            check.errors.push(ConfigError::new(
                at("allow_sources"),
                "applies to mode = \"passthrough\" only; terminated services authorize callers by SPIFFE ID (allow_ids, allow_trust_domains)",
            ));
        } else if svc.allow_sources.as_ref().is_some_and(Vec::is_empty) {
            check.errors.push(ConfigError::new(
                at("allow_sources"),
                "is empty, which would refuse every source; leave it out to admit any source",
            ));
        }
        if check.errors.len() > before {
            continue;
        }
        let (Some(namespace), Some(name), Some(mode)) = (namespace, name, mode) else {
            continue;
        };
        if out
            .iter()
            .any(|s| s.namespace == namespace && s.name == name)
        {
            check.errors.push(ConfigError::new(
                at("name"),
                format!("{namespace}/{name} is listed twice"),
            ));
            continue;
        }
        out.push(ServiceConfig {
            namespace,
            name,
            ports,
            endpoints,
            subsets,
            export: svc.export.unwrap_or(false),
            allow_ids,
            allow_trust_domains,
            mode,
            allow_sources,
            headless: svc.headless.unwrap_or(false),
        });
    }
    out
}

fn peers(
    check: &mut Check,
    raw: &[RawPeer],
    services: &[ServiceConfig],
    own_td: Option<&TrustDomain>,
    trust: Option<&TrustConfig>,
) -> Vec<PeerConfig> {
    let mut out = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let at = |field: &str| format!("peers[{i}].{field}");
        let before = check.errors.len();
        let cluster = check.required(&at("cluster"), p.cluster.as_deref(), ClusterName::from_str);
        let spiffe_id =
            check.required(&at("spiffe_id"), p.spiffe_id.as_deref(), SpiffeId::from_str);
        let address = check.required(&at("address"), p.address.as_deref(), parse_socket_addr);
        let locality = check.required(&at("locality"), p.locality.as_deref(), Locality::from_str);
        let keys = list(
            check,
            &at("services"),
            p.services.as_deref(),
            ServiceKey::from_str,
        );
        for (j, key) in keys.iter().enumerate() {
            if !services
                .iter()
                .any(|s| s.namespace == key.namespace && s.name == key.name)
            {
                check.errors.push(ConfigError::new(
                    format!("peers[{i}].services[{j}]"),
                    format!("{key} is not in [[services]], which gives its ports"),
                ));
            }
        }
        if let Some(id) = &spiffe_id {
            require_bundle(check, &at("spiffe_id"), id, own_td, trust);
        }
        if check.errors.len() > before {
            continue;
        }
        if let (Some(cluster), Some(spiffe_id), Some(address), Some(locality)) =
            (cluster, spiffe_id, address, locality)
        {
            out.push(PeerConfig {
                cluster,
                spiffe_id,
                address,
                locality,
                services: keys,
            });
        }
    }
    out
}

/// Records an error unless `id`'s trust domain is this gateway's or federated:
/// without its bundle the peer can never be authenticated.
pub(super) fn require_bundle(
    check: &mut Check,
    path: &str,
    id: &SpiffeId,
    own_td: Option<&TrustDomain>,
    trust: Option<&TrustConfig>,
) {
    let td = id.trust_domain();
    let known = Some(&td) == own_td
        || trust.is_some_and(|t| t.federated.iter().any(|f| f.trust_domain == td));
    if !known {
        check.errors.push(ConfigError::new(
            path,
            format!("trust domain {td} has no bundle: add it to [[trust.federated]]"),
        ));
    }
}

fn shutdown(check: &mut Check, raw: &RawShutdown) -> Option<ShutdownConfig> {
    let drain_timeout = match raw.drain_timeout.as_deref() {
        None => DEFAULT_DRAIN_TIMEOUT,
        Some(s) => check.parsed(
            "shutdown.drain_timeout",
            parse_duration(s, MAX_DRAIN_TIMEOUT),
        )?,
    };
    Some(ShutdownConfig { drain_timeout })
}
