//! Stage two: the validated, typed configuration the gateway runs on.
//!
//! [`Config::from_raw`] checks every section of a [`RawConfig`] with that
//! section's own checker (one file per section, each beside its raw and typed
//! structs), passes each the values it needs from the others, runs the checks
//! that span sections (no two listeners on one address, none inside the
//! clusterset ranges), and only returns a [`Config`] when no section reported
//! a problem. Defaults are named constants in the section files; the shipped
//! `config/isthmus.toml` documents them.
//!
//! The section types are re-exported here, where callers have always found them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use isthmus_federation::SpiffeId;
use isthmus_federation::catalog::{Export, LocalService, PeerCatalog, RemoteGateway, ServiceKey};
use isthmus_federation::peering::PeerAuthority;
use serde::Serialize;

pub use super::admin::{AdminConfig, DEFAULT_ADMIN_LISTEN};
pub use super::discovery::DiscoveryConfig;
pub use super::dns::DnsConfig;
use super::error::ConfigErrors;
pub use super::federation::{FederationConfig, FederationPeer};
pub use super::gateway::GatewayIdentity;
pub use super::identity::IdentityConfig;
pub use super::limits::LimitsConfig;
pub use super::listeners::ListenersConfig;
pub use super::log::{DEFAULT_LOG_LEVEL, LogConfig, LogFormat};
use super::parse::{Bundles, Check, resolve_path};
pub use super::peers::PeerConfig;
use super::raw::RawConfig;
pub use super::routes::RouteConfig;
pub use super::runtime::{DEFAULT_UPGRADE_SOCKET, MAX_THREADS, RuntimeConfig};
pub use super::services::{EastWestMode, EndpointConfig, PortConfig, ServiceConfig};
pub use super::shutdown::{DEFAULT_DRAIN_TIMEOUT, MAX_DRAIN_TIMEOUT, ShutdownConfig};
pub use super::tracing::{OtlpProtocol, TracingConfig};
pub use super::trust::{
    BundleEndpointConfig, DEFAULT_REFRESH_HINT, DEFAULT_REFRESH_INTERVAL, EndpointProfileConfig,
    FederatedDomain, FederationEndpoint, REFRESH_BOUNDS, TrustConfig,
};
pub use super::upstream::{
    CircuitBreakerConfig, HealthCheckConfig, LocalityPolicy, OutlierDetectionConfig, UpstreamConfig,
};
use super::{
    admin, discovery, dns, federation, gateway, identity, limits, listeners, log, peers, routes,
    runtime, services, shutdown, tracing, trust, upstream,
};

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
    pub dns: DnsConfig,
    /// `[limits]`
    pub limits: LimitsConfig,
    /// `[tracing]`: off (`None`) without an endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
}

impl Config {
    /// Validates a raw configuration, returning every problem found.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigErrors> {
        let mut check = Check::default();
        let has_identity = raw.identity.is_some();
        let gateway = gateway::gateway(&mut check, &raw.gateway);
        let admin = admin::admin(&mut check, &raw.admin);
        let log = log::log(&mut check, &raw.log);
        let runtime = runtime::runtime(&mut check, &raw.runtime);
        let shutdown = shutdown::shutdown(&mut check, &raw.shutdown);
        let tracing = tracing::tracing(&mut check, &raw.tracing);
        let upstream = upstream::upstream(&mut check, &raw.upstream);
        let identity = raw
            .identity
            .as_ref()
            .and_then(|i| identity::identity(&mut check, i));
        let own_td = gateway.as_ref().map(|g| &g.trust_domain);
        let trust = trust::trust(&mut check, &raw.trust, own_td, has_identity);
        let bundles = Bundles::new(
            own_td,
            trust
                .iter()
                .flat_map(|t| &t.federated)
                .map(|f| &f.trust_domain),
        );
        let listeners = listeners::listeners(&mut check, &raw.listeners, has_identity);
        let services = services::services(&mut check, raw.services.as_deref().unwrap_or_default());
        let local: Vec<ServiceKey> = services.iter().map(ServiceConfig::key).collect();
        let peers = peers::peers(
            &mut check,
            raw.peers.as_deref().unwrap_or_default(),
            &local,
            &bundles,
        );
        let local_subsets: BTreeMap<ServiceKey, Vec<String>> = services
            .iter()
            .map(|s| (s.key(), s.subsets.iter().map(|x| x.name.clone()).collect()))
            .collect();
        let routes = routes::routes(&mut check, raw.routes.as_deref(), &local_subsets);
        let federation = federation::federation(
            &mut check,
            &raw.federation,
            listeners.as_ref().and_then(|l| l.east_west),
            has_identity,
            &bundles,
        );
        let dns = dns::dns(&mut check, &raw.dns);
        let discovery = discovery::discovery(&mut check, &raw.discovery);
        let limits = limits::limits(&mut check, &raw.limits);
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
                dns::outside_ranges(&mut check, dns, &tcp);
            }
        }
        match (
            (gateway, admin, log, runtime, shutdown, tracing),
            (trust, listeners, upstream, federation, dns, limits),
        ) {
            (
                (
                    Some(gateway),
                    Some(admin),
                    Some(log),
                    Some(runtime),
                    Some(shutdown),
                    Some(tracing),
                ),
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
                tracing,
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
                    weight: 1,
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
        self.discovery.resolve_paths(base);
        resolve_path(base, &mut self.runtime.upgrade_socket);
        if let Some(identity) = &mut self.identity {
            identity.resolve_paths(base);
        }
        self.trust.resolve_paths(base);
    }
}

impl FederationConfig {
    /// Who may peer and assert what, with `trust`'s opted-in bundle pushes
    /// (`trust.federated[].accept_peer_bundles`).
    pub fn authority(&self, trust: &TrustConfig) -> PeerAuthority {
        self.authority_with(
            trust
                .federated
                .iter()
                .filter(|f| f.accept_peer_bundles)
                .map(|f| f.trust_domain.clone()),
        )
    }
}

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
            check.fail(&path, format!("{addr} is already {other}"));
        }
        seen.push((path, addr));
    }
}
