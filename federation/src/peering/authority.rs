//! Who may assert what over peering, and how much a peer may make this
//! gateway hold.
//!
//! A peer gateway authenticates with its SVID, but an identity alone proves
//! nothing about what it may say. The operator binds each peer, by its SPIFFE
//! ID (`[[federation.peers]]`) or as any gateway of a trust domain
//! (`[[federation.accept]]`), to a [`Grant`]: the cluster names it speaks for,
//! the services (`namespace/name` patterns) it may export to this gateway, and
//! what it sees of this gateway's exports. Anything outside its grant is
//! refused, counted and NACKed with the reason; a peer with no grant does not
//! get past the TLS handshake. Trust bundles pushed by peers are taken only for
//! the trust domains the operator opted in, and only from configured peers of
//! that trust domain ([`PeerAuthority::bundle_pushes`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::catalog::ServiceKey;
use crate::trust::PeerPolicy;
use crate::trust::tls::GATEWAY_PATH_PREFIX;
use crate::{ClusterName, Locality, SpiffeId, TrustDomain};

/// `namespace/name` patterns where `*` matches any run of characters. No
/// patterns: every service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServicePatterns(Vec<String>);

impl ServicePatterns {
    /// The patterns `patterns`; empty matches everything.
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    /// Whether `key` matches.
    pub fn allows(&self, key: &ServiceKey) -> bool {
        self.0.is_empty() || {
            let name = key.to_string();
            self.0.iter().any(|p| wildcard_match(p, &name))
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// What the operator allows one peer gateway (or every gateway of a trust
/// domain) to assert.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// The cluster names its hello may declare.
    pub clusters: BTreeSet<ClusterName>,
    /// Where its hello may say it runs (each a region, zone or subzone);
    /// empty: anywhere. Locality steers failover, so a peer must not pass
    /// for one in this gateway's zone when it is not.
    pub localities: Vec<Locality>,
    /// Which of its exports this gateway takes.
    pub imports: ServicePatterns,
    /// Which of this gateway's exports it sees; `None`: the default.
    pub exports: Option<ServicePatterns>,
}

/// Every grant, and the trust domains whose bundles peers may push.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerAuthority {
    /// Configured peers (`[[federation.peers]]`), by SPIFFE ID.
    pub peers: BTreeMap<SpiffeId, Grant>,
    /// Any gateway (`/isthmus/gateway/<name>`) of these trust domains
    /// (`[[federation.accept]]`).
    pub gateways_of: BTreeMap<TrustDomain, Grant>,
    /// What peers whose grant says nothing see of this gateway's exports.
    pub default_exports: ServicePatterns,
    /// Trust domains whose bundle configured peers of that trust domain may
    /// replace by pushing theirs (opt-in per trust domain; off by default).
    pub bundle_pushes: BTreeSet<TrustDomain>,
}

impl PeerAuthority {
    /// The grant of `peer`: its own, else its trust domain's if it is a
    /// gateway. `None`: it may not peer.
    pub fn grant(&self, peer: &SpiffeId) -> Option<&Grant> {
        self.peers.get(peer).or_else(|| {
            peer.path()
                .starts_with(GATEWAY_PATH_PREFIX)
                .then(|| self.gateways_of.get(peer.trust_domain_str()))
                .flatten()
        })
    }

    /// Whether `peer` is listed in `[[federation.peers]]`.
    pub fn is_configured(&self, peer: &SpiffeId) -> bool {
        self.peers.contains_key(peer)
    }

    /// What `peer` sees of this gateway's exports.
    pub fn exports_for(&self, peer: &SpiffeId) -> &ServicePatterns {
        self.grant(peer)
            .and_then(|g| g.exports.as_ref())
            .unwrap_or(&self.default_exports)
    }

    /// Who may complete the TLS handshake on the federation listener: the
    /// configured peers and the gateways of the accepted trust domains,
    /// nothing else (never a workload SVID).
    pub fn listener_policy(&self) -> PeerPolicy {
        PeerPolicy::peers(self.peers.keys().cloned(), self.gateways_of.keys().cloned())
    }
}

/// How much one peer, or everyone together, may make this gateway hold over
/// peering. Every cap refuses at once (a NACK or a refused connection), is
/// counted and logged, and never stalls other peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PeeringLimits {
    /// Services one peer may export here.
    pub max_services_per_peer: usize,
    /// Ports one exported service may have.
    pub max_ports_per_service: usize,
    /// Endpoints one exported headless service may publish.
    pub max_endpoints_per_service: usize,
    /// Largest peering message, in bytes (gRPC refuses larger).
    pub max_message_bytes: usize,
    /// Sessions one peer may hold open at once (normally two: the one it
    /// dialled and the one it accepted).
    pub max_sessions_per_peer: u32,
    /// Concurrent gRPC streams on one federation connection.
    pub max_streams_per_connection: u32,
    /// Connections the federation listener holds at once.
    pub max_connections: usize,
    /// Connections from one source (IPv4 address or IPv6 /64).
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once on the federation listener.
    pub max_handshakes: usize,
    /// How long an expired peer is remembered (in `/debug/peers` and its
    /// metric series) before it is forgotten.
    #[serde(serialize_with = "humantime_string")]
    pub peer_retention: Duration,
}

/// A duration as configuration writes it (`"1h"`).
fn humantime_string<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Default for PeeringLimits {
    fn default() -> Self {
        Self {
            max_services_per_peer: 10_000,
            max_ports_per_service: 128,
            max_endpoints_per_service: 1_000,
            max_message_bytes: 4 << 20,
            max_sessions_per_peer: 4,
            max_streams_per_connection: 4,
            max_connections: 1_024,
            max_connections_per_source: 16,
            max_handshakes: 64,
            peer_retention: Duration::from_secs(3600),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_namespace_name() {
        let key = |s: &str| s.parse::<ServiceKey>().unwrap();
        let f = ServicePatterns::new(vec!["shop/*".into(), "*/api".into(), "a*c/x".into()]);
        assert!(f.allows(&key("shop/web")));
        assert!(f.allows(&key("other/api")));
        assert!(f.allows(&key("abbc/x")));
        assert!(!f.allows(&key("other/web")));
        assert!(!f.allows(&key("ab/x")));
        assert!(!f.allows(&key("shops/web")));
        assert!(ServicePatterns::default().allows(&key("any/thing")));
        assert!(wildcard_match("*", "x"));
        assert!(wildcard_match("a*a", "aa"));
        assert!(!wildcard_match("a*a", "a"));
    }

    #[test]
    fn a_trust_domain_rule_grants_only_its_gateways() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let rule = Grant {
            clusters: ["vm".parse().unwrap()].into(),
            ..Grant::default()
        };
        let authority = PeerAuthority {
            gateways_of: [("vms.example".parse().unwrap(), rule.clone())].into(),
            ..PeerAuthority::default()
        };
        assert_eq!(
            authority.grant(&id("spiffe://vms.example/isthmus/gateway/edge-1")),
            Some(&rule)
        );
        assert_eq!(
            authority.grant(&id("spiffe://vms.example/ns/web/sa/web")),
            None
        );
        assert_eq!(
            authority.grant(&id("spiffe://other.example/isthmus/gateway/edge-1")),
            None
        );
        let policy = authority.listener_policy();
        assert!(policy.allows(&id("spiffe://vms.example/isthmus/gateway/edge-1")));
        assert!(!policy.allows(&id("spiffe://vms.example/ns/web/sa/web")));
    }
}
