//! Stage one: the file's shape, as serde sees it.
//!
//! Every table denies unknown keys. Every leaf is optional and kept in its most
//! general form (strings for addresses, durations and names) so that stage two,
//! [`super::model`], can report every missing or malformed value at once with its
//! path instead of stopping at the first.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[gateway]`: who this gateway is.
    #[serde(default)]
    pub gateway: RawGateway,
    /// `[admin]`: the admin HTTP API.
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: RawLog,
    /// `[runtime]`: threads, the upgrade socket.
    #[serde(default)]
    pub runtime: RawRuntime,
    /// `[shutdown]`: draining on stop.
    #[serde(default)]
    pub shutdown: RawShutdown,
    /// `[identity]`: this gateway's X509-SVID and trust bundle.
    pub identity: Option<RawIdentity>,
    /// `[trust]`: peers, federated trust domains, the bundle endpoint.
    #[serde(default)]
    pub trust: RawTrust,
    /// `[listeners]`: the data plane's listeners.
    #[serde(default)]
    pub listeners: RawListeners,
    /// `[[services]]`: services and their endpoints in this cluster.
    pub services: Option<Vec<RawService>>,
    /// `[[peers]]`: peer gateways and the services they serve.
    pub peers: Option<Vec<RawPeer>>,
    /// `[[routes]]`: header matches and weighted splits per service.
    pub routes: Option<Vec<RawRoute>>,
    /// `[upstream]`: timeouts, retries and backend protection.
    #[serde(default)]
    pub upstream: RawUpstream,
    /// `[federation]`: peering with other gateways.
    #[serde(default)]
    pub federation: RawFederation,
    /// `[discovery]`: services from watched files, DNS and Kubernetes.
    #[serde(default)]
    pub discovery: super::discovery::RawDiscovery,
    /// `[dns]`: the DNS server and clusterset IPs.
    #[serde(default)]
    pub dns: RawDns,
    /// `[limits]`: what clients can make the listeners hold open.
    #[serde(default)]
    pub limits: RawLimits,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// `limits.header_timeout`
    pub header_timeout: Option<String>,
    /// `limits.h2_max_concurrent_streams`
    pub h2_max_concurrent_streams: Option<i64>,
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

/// `[dns]`
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

/// `[federation]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    /// `federation.listen`
    pub listen: Option<String>,
    /// `federation.advertise`
    pub advertise: Option<String>,
    /// `federation.lease`
    pub lease: Option<String>,
    /// `federation.grace`
    pub grace: Option<String>,
    /// `federation.accept_peer_bundles`: replaced by
    /// `trust.federated[].accept_peer_bundles`; only `false` is accepted.
    pub accept_peer_bundles: Option<bool>,
    /// `federation.export`
    pub export: Option<Vec<String>>,
    /// `federation.state_file`
    pub state_file: Option<String>,
    /// `[[federation.peers]]`
    pub peers: Option<Vec<RawFederationPeer>>,
    /// `[[federation.accept]]`
    pub accept: Option<Vec<RawFederationAccept>>,
    /// `[federation.limits]`
    #[serde(default)]
    pub limits: RawFederationLimits,
}

/// `[[federation.accept]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederationAccept {
    /// `federation.accept[].trust_domain`
    pub trust_domain: Option<String>,
    /// `federation.accept[].clusters`
    pub clusters: Option<Vec<String>>,
    /// `federation.accept[].localities`
    pub localities: Option<Vec<String>>,
    /// `federation.accept[].import`
    pub import: Option<Vec<String>>,
    /// `federation.accept[].export`
    pub export: Option<Vec<String>>,
}

/// `[federation.limits]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederationLimits {
    /// `federation.limits.max_services_per_peer`
    pub max_services_per_peer: Option<i64>,
    /// `federation.limits.max_ports_per_service`
    pub max_ports_per_service: Option<i64>,
    /// `federation.limits.max_endpoints_per_service`
    pub max_endpoints_per_service: Option<i64>,
    /// `federation.limits.max_message_bytes`
    pub max_message_bytes: Option<i64>,
    /// `federation.limits.max_sessions_per_peer`
    pub max_sessions_per_peer: Option<i64>,
    /// `federation.limits.max_streams_per_connection`
    pub max_streams_per_connection: Option<i64>,
    /// `federation.limits.max_connections`
    pub max_connections: Option<i64>,
    /// `federation.limits.max_connections_per_source`
    pub max_connections_per_source: Option<i64>,
    /// `federation.limits.max_handshakes`
    pub max_handshakes: Option<i64>,
    /// `federation.limits.peer_retention`
    pub peer_retention: Option<String>,
}

/// `[[federation.peers]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederationPeer {
    /// `federation.peers[].address`
    pub address: Option<String>,
    /// `federation.peers[].spiffe_id`
    pub spiffe_id: Option<String>,
    /// `federation.peers[].clusters`
    pub clusters: Option<Vec<String>>,
    /// `federation.peers[].localities`
    pub localities: Option<Vec<String>>,
    /// `federation.peers[].import`
    pub import: Option<Vec<String>>,
    /// `federation.peers[].export`
    pub export: Option<Vec<String>>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `upstream.connect_timeout`
    pub connect_timeout: Option<String>,
    /// `upstream.request_timeout`
    pub request_timeout: Option<String>,
    /// `upstream.idle_timeout`
    pub idle_timeout: Option<String>,
    /// `upstream.max_attempts`
    pub max_attempts: Option<i64>,
    /// `upstream.retry_budget_percent`
    pub retry_budget_percent: Option<i64>,
    /// `upstream.retry_min_per_second`
    pub retry_min_per_second: Option<i64>,
    /// `[upstream.circuit_breaker]`
    #[serde(default)]
    pub circuit_breaker: RawCircuitBreaker,
    /// `[upstream.outlier_detection]`
    #[serde(default)]
    pub outlier_detection: RawOutlierDetection,
    /// `[upstream.health_check]`
    #[serde(default)]
    pub health_check: RawHealthCheck,
    /// `[upstream.locality]`
    #[serde(default)]
    pub locality: RawLocalityPolicy,
}

/// `[upstream.locality]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalityPolicy {
    /// `upstream.locality.failover_order`
    pub failover_order: Option<Vec<String>>,
    /// `upstream.locality.failover_priority`
    pub failover_priority: Option<Vec<String>>,
    /// `upstream.locality.overprovisioning_factor`
    pub overprovisioning_factor: Option<f64>,
    /// `upstream.locality.panic_threshold_percent`
    pub panic_threshold_percent: Option<i64>,
    /// `upstream.locality.slow_start_window`
    pub slow_start_window: Option<String>,
}

/// `[upstream.circuit_breaker]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    /// `upstream.circuit_breaker.max_connections`
    pub max_connections: Option<i64>,
    /// `upstream.circuit_breaker.max_pending_requests`
    pub max_pending_requests: Option<i64>,
    /// `upstream.circuit_breaker.max_requests`
    pub max_requests: Option<i64>,
}

/// `[upstream.outlier_detection]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    /// `upstream.outlier_detection.consecutive_failures`
    pub consecutive_failures: Option<i64>,
    /// `upstream.outlier_detection.base_ejection_time`
    pub base_ejection_time: Option<String>,
    /// `upstream.outlier_detection.max_ejection_time`
    pub max_ejection_time: Option<String>,
    /// `upstream.outlier_detection.max_ejection_percent`
    pub max_ejection_percent: Option<i64>,
}

/// `[upstream.health_check]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `upstream.health_check.interval`
    pub interval: Option<String>,
    /// `upstream.health_check.timeout`
    pub timeout: Option<String>,
    /// `upstream.health_check.unhealthy_threshold`
    pub unhealthy_threshold: Option<i64>,
    /// `upstream.health_check.healthy_threshold`
    pub healthy_threshold: Option<i64>,
}

/// `[listeners]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListeners {
    /// `listeners.outbound`
    pub outbound: Option<String>,
    /// `listeners.east_west`
    pub east_west: Option<String>,
}

/// `[[services]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// `services[].namespace`
    pub namespace: Option<String>,
    /// `services[].name`
    pub name: Option<String>,
    /// `services[].ports`
    pub ports: Option<Vec<RawPort>>,
    /// `services[].endpoints`
    pub endpoints: Option<Vec<RawEndpoint>>,
    /// `services[].subsets`
    pub subsets: Option<Vec<RawSubset>>,
    /// `services[].export`
    pub export: Option<bool>,
    /// `services[].allow_ids`
    pub allow_ids: Option<Vec<String>>,
    /// `services[].allow_trust_domains`
    pub allow_trust_domains: Option<Vec<String>>,
    /// `services[].mode`
    pub mode: Option<String>,
    /// `services[].allow_sources`
    pub allow_sources: Option<Vec<String>>,
    /// `services[].headless`
    pub headless: Option<bool>,
}

/// `services[].endpoints[]`: `"ip:port"`, or a table with its locality,
/// labels and weight.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    /// `"ip:port"`
    Address(String),
    /// `{ address = "ip:port", locality = "region/zone", labels = {..}, weight = 2 }`
    Table(RawEndpointTable),
}

/// Deserialized by hand: serde's untagged enums say only "did not match any
/// variant", where a user needs to be told the two accepted shapes.
impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> Visitor<'de> for Shape {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an address \"ip:port\" or a table { address, locality, labels, weight }",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint::Address(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawEndpoint, A::Error> {
                RawEndpointTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawEndpoint::Table)
            }
        }
        d.deserialize_any(Shape)
    }
}

/// `services[].endpoints[]` as a table.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointTable {
    /// `services[].endpoints[].address`
    pub address: Option<String>,
    /// `services[].endpoints[].locality`
    pub locality: Option<String>,
    /// `services[].endpoints[].labels`
    pub labels: Option<BTreeMap<String, String>>,
    /// `services[].endpoints[].weight`
    pub weight: Option<i64>,
}

/// `services[].subsets[]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubset {
    /// `services[].subsets[].name`
    pub name: Option<String>,
    /// `services[].subsets[].labels`
    pub labels: Option<BTreeMap<String, String>>,
}

/// `[[routes]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// `routes[].service`
    pub service: Option<String>,
    /// `[[routes.rules]]`
    pub rules: Option<Vec<RawRouteRule>>,
}

/// `[[routes.rules]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteRule {
    /// `routes[].rules[].headers`
    pub headers: Option<Vec<RawHeaderMatch>>,
    /// `routes[].rules[].split`
    pub split: Option<Vec<RawSplit>>,
}

/// `routes[].rules[].headers[]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    /// `routes[].rules[].headers[].name`
    pub name: Option<String>,
    /// `routes[].rules[].headers[].exact`
    pub exact: Option<String>,
    /// `routes[].rules[].headers[].prefix`
    pub prefix: Option<String>,
    /// `routes[].rules[].headers[].present`
    pub present: Option<bool>,
}

/// `routes[].rules[].split[]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    /// `routes[].rules[].split[].subset`
    pub subset: Option<String>,
    /// `routes[].rules[].split[].cluster`
    pub cluster: Option<String>,
    /// `routes[].rules[].split[].weight`
    pub weight: Option<i64>,
}

/// `services[].ports[]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPort {
    /// `services[].ports[].port`
    pub port: Option<i64>,
    /// `services[].ports[].protocol`
    pub protocol: Option<String>,
    /// `services[].ports[].listen`
    pub listen: Option<String>,
    /// `services[].ports[].name`
    pub name: Option<String>,
}

/// `[[peers]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    /// `peers[].cluster`
    pub cluster: Option<String>,
    /// `peers[].spiffe_id`
    pub spiffe_id: Option<String>,
    /// `peers[].address`
    pub address: Option<String>,
    /// `peers[].locality`
    pub locality: Option<String>,
    /// `peers[].services`
    pub services: Option<Vec<String>>,
}

/// `[identity]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// `identity.cert`
    pub cert: Option<String>,
    /// `identity.key`
    pub key: Option<String>,
    /// `identity.bundle`
    pub bundle: Option<String>,
}

/// `[trust]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrust {
    /// `trust.allow_ids`
    pub allow_ids: Option<Vec<String>>,
    /// `trust.allow_trust_domains`
    pub allow_trust_domains: Option<Vec<String>>,
    /// `trust.refresh_interval`
    pub refresh_interval: Option<String>,
    /// `[[trust.federated]]`
    pub federated: Option<Vec<RawFederated>>,
    /// `[trust.bundle_endpoint]`
    pub bundle_endpoint: Option<RawBundleEndpoint>,
}

/// `[[trust.federated]]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederated {
    /// `trust.federated[].trust_domain`
    pub trust_domain: Option<String>,
    /// `trust.federated[].bundle`
    pub bundle: Option<String>,
    /// `trust.federated[].endpoint_url`
    pub endpoint_url: Option<String>,
    /// `trust.federated[].endpoint_profile`
    pub endpoint_profile: Option<String>,
    /// `trust.federated[].endpoint_spiffe_id`
    pub endpoint_spiffe_id: Option<String>,
    /// `trust.federated[].endpoint_ca`
    pub endpoint_ca: Option<String>,
    /// `trust.federated[].accept_peer_bundles`
    pub accept_peer_bundles: Option<bool>,
}

/// `[trust.bundle_endpoint]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundleEndpoint {
    /// `trust.bundle_endpoint.listen`
    pub listen: Option<String>,
    /// `trust.bundle_endpoint.refresh_hint`
    pub refresh_hint: Option<String>,
}

/// `[gateway]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// `gateway.name`
    pub name: Option<String>,
    /// `gateway.cluster`
    pub cluster: Option<String>,
    /// `gateway.trust_domain`
    pub trust_domain: Option<String>,
    /// `[gateway.locality]`
    #[serde(default)]
    pub locality: RawLocality,
    /// `gateway.labels`
    pub labels: Option<BTreeMap<String, String>>,
}

/// `[gateway.locality]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocality {
    /// `gateway.locality.region`
    pub region: Option<String>,
    /// `gateway.locality.zone`
    pub zone: Option<String>,
    /// `gateway.locality.subzone`
    pub subzone: Option<String>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `admin.listen`
    pub listen: Option<String>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `log.level`
    pub level: Option<String>,
    /// `log.format`
    pub format: Option<String>,
}

/// `[runtime]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// `runtime.threads`
    pub threads: Option<i64>,
    /// `runtime.upgrade_socket`
    pub upgrade_socket: Option<String>,
}

/// `[shutdown]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// `shutdown.drain_timeout`
    pub drain_timeout: Option<String>,
}
