//! Stage one: the file's shape, as serde sees it.
//!
//! Every table denies unknown keys. Every leaf is optional and kept in its most
//! general form (strings for addresses, durations and names) so that stage two,
//! [`super::model`], can report every missing or malformed value at once with its
//! path instead of stopping at the first. Each section's raw struct lives in
//! that section's file, beside its typed struct and its checks; this file
//! composes them.

use serde::{Deserialize, Serialize};

pub use super::admin::RawAdmin;
pub use super::discovery::{RawDiscovery, RawDnsService, RawKubernetes};
pub use super::dns::RawDns;
pub use super::federation::{
    RawFederation, RawFederationAccept, RawFederationLimits, RawFederationPeer,
};
pub use super::gateway::{RawGateway, RawLocality};
pub use super::identity::RawIdentity;
pub use super::limits::{RawConnectionLimits, RawEastWestLimits, RawLimits};
pub use super::listeners::RawListeners;
pub use super::log::RawLog;
pub use super::peers::RawPeer;
pub use super::routes::{RawHeaderMatch, RawRoute, RawRouteRule, RawSplit};
pub use super::runtime::RawRuntime;
pub use super::services::{RawEndpoint, RawEndpointTable, RawPort, RawService, RawSubset};
pub use super::shutdown::RawShutdown;
pub use super::tracing::RawTracing;
pub use super::trust::{RawBundleEndpoint, RawFederated, RawTrust};
pub use super::upstream::{
    RawCircuitBreaker, RawHealthCheck, RawLocalityPolicy, RawOutlierDetection, RawUpstream,
};

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
    pub discovery: RawDiscovery,
    /// `[dns]`: the DNS server and clusterset IPs.
    #[serde(default)]
    pub dns: RawDns,
    /// `[limits]`: what clients can make the listeners hold open.
    #[serde(default)]
    pub limits: RawLimits,
    /// `[tracing]`: spans exported over OTLP.
    #[serde(default)]
    pub tracing: RawTracing,
}
