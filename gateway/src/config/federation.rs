//! `[federation]`: peering with other gateways over `isthmus.federation.v1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use isthmus_federation::peering::convert::{MAX_LEASE, MAX_WEIGHT as MAX_GATEWAY_WEIGHT, MIN_LEASE};
use isthmus_federation::peering::{Grant, PeerAuthority, PeeringLimits, ServicePatterns};
use isthmus_federation::trust::tls::GATEWAY_PATH_PREFIX;
use isthmus_federation::{ClusterName, Locality, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use super::parse::{
    Bundles, Check, int, list, parse_duration, parse_duration_between, parse_path,
    parse_socket_addr, serialize_display_list,
};

/// Default lease: peers hear from this gateway at least every third of it, and
/// count on it no longer when it lapses. 1.5 s makes a partitioned peer stop
/// getting new requests within 2 s with no tuning; renewals are a few bytes.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(1500);
/// Default grace: a lapsed peer's services are served this long.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Longest grace: last-known-good is served for a while, never forever.
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest time an expired peer may be remembered.
const MAX_PEER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// `[federation]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    /// `federation.listen`
    pub listen: Option<String>,
    /// `federation.advertise`
    pub advertise: Option<String>,
    /// `federation.lease`
    pub lease: Option<String>,
    /// `federation.weight`
    pub weight: Option<i64>,
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

/// `[federation]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationConfig {
    /// Where peers connect (mTLS gRPC); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The east-west address peers send traffic to (defaults to
    /// `listeners.east_west`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// This gateway renews its lease with each peer at a third of this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// This gateway's share of its cluster's traffic relative to the other
    /// replicas of the cluster, announced to peers in its hello.
    pub weight: u32,
    /// A peer whose lease lapsed keeps its services this long.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// What peers without their own `export` see (`namespace/name`, `*`
    /// wildcards); empty: every exported service.
    pub export: Vec<String>,
    /// Where this gateway keeps its export times across restarts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// The peers this gateway dials (and accepts).
    pub peers: Vec<FederationPeer>,
    /// Gateways this gateway accepts without dialling them.
    pub accept: Vec<FederationAccept>,
    /// `[federation.limits]`: caps on what peers may make this gateway hold.
    pub limits: PeeringLimits,
}

/// `[[federation.peers]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationPeer {
    /// Its federation listener.
    pub address: SocketAddr,
    /// The SPIFFE ID it must prove (a gateway's).
    pub spiffe_id: SpiffeId,
    /// What it may assert and see.
    #[serde(flatten)]
    pub grant: GrantConfig,
}

/// `[[federation.accept]]`: every gateway (`/isthmus/gateway/<name>`) of a
/// trust domain may peer without being dialled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationAccept {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// What its gateways may assert and see.
    #[serde(flatten)]
    pub grant: GrantConfig,
}

/// What a peer (or every accepted gateway of a trust domain) may assert and
/// see: the keys `[[federation.peers]]` and `[[federation.accept]]` share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantConfig {
    /// The clusters it may speak for.
    pub clusters: Vec<ClusterName>,
    /// Where it may say it runs (`region[/zone[/subzone]]`); empty: anywhere.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_display_list"
    )]
    pub localities: Vec<Locality>,
    /// Which of its exports this gateway takes; empty: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub import: Vec<String>,
    /// What it may see; `None`: `federation.export`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<Vec<String>>,
}

impl GrantConfig {
    fn grant(&self) -> Grant {
        let patterns = |p: &[String]| ServicePatterns::new(p.to_vec());
        Grant {
            clusters: self.clusters.iter().cloned().collect(),
            localities: self.localities.clone(),
            imports: patterns(&self.import),
            exports: self.export.as_deref().map(patterns),
        }
    }
}

impl FederationConfig {
    /// Whether this gateway peers at all.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || !self.peers.is_empty()
    }

    /// Who may peer and assert what; `bundle_pushes`: the trust domains whose
    /// bundles configured peers may push (`trust.federated[].accept_peer_bundles`).
    pub(super) fn authority_with(
        &self,
        bundle_pushes: impl IntoIterator<Item = TrustDomain>,
    ) -> PeerAuthority {
        PeerAuthority {
            peers: self
                .peers
                .iter()
                .map(|p| (p.spiffe_id.clone(), p.grant.grant()))
                .collect(),
            gateways_of: self
                .accept
                .iter()
                .map(|a| (a.trust_domain.clone(), a.grant.grant()))
                .collect::<BTreeMap<_, _>>(),
            default_exports: ServicePatterns::new(self.export.clone()),
            bundle_pushes: bundle_pushes.into_iter().collect::<BTreeSet<_>>(),
        }
    }
}

/// Checks an export pattern: `namespace/name`, each part of lowercase letters,
/// digits, `-` and `*`.
fn export_pattern(s: &str) -> Result<String, String> {
    let valid_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '*')
    };
    match s.split_once('/') {
        Some((ns, name)) if valid_part(ns) && valid_part(name) => Ok(s.to_owned()),
        _ => Err(format!(
            "{s:?} is not a pattern such as \"shop/web\", \"shop/*\" or \"*/api\""
        )),
    }
}

fn patterns(check: &mut Check, path: &str, raw: Option<&[String]>) -> Vec<String> {
    raw.unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, p)| check.parsed(&format!("{path}[{i}]"), export_pattern(p)))
        .collect()
}

/// Checks `[federation]`. `east_west`: `listeners.east_west`, the default of
/// `advertise`; `has_identity`: whether `[identity]` is set; `bundles`: the
/// trust domains a peer may belong to.
pub(super) fn federation(
    check: &mut Check,
    raw: &RawFederation,
    east_west: Option<SocketAddr>,
    has_identity: bool,
    bundles: &Bundles<'_>,
) -> Option<FederationConfig> {
    let before = check.errors.len();
    let listen = check.optional(
        "federation.listen",
        raw.listen.as_deref(),
        parse_socket_addr,
    );
    let lease = check.or_value(
        "federation.lease",
        raw.lease.as_deref(),
        DEFAULT_LEASE,
        |s| parse_duration_between(s, MIN_LEASE, MAX_LEASE),
    );
    let grace = check.or_value(
        "federation.grace",
        raw.grace.as_deref(),
        DEFAULT_GRACE,
        |s| parse_duration(s, MAX_GRACE),
    );
    let weight: Option<u32> = int(
        check,
        "federation.weight",
        raw.weight,
        1,
        1,
        i64::from(MAX_GATEWAY_WEIGHT),
    );
    let export = patterns(check, "federation.export", raw.export.as_deref());
    if raw.accept_peer_bundles == Some(true) {
        check.fail(
            "federation.accept_peer_bundles",
            "is no longer a global switch: opt in per trust domain with \
             trust.federated[].accept_peer_bundles = true",
        );
    }
    let state_file = check.optional(
        "federation.state_file",
        raw.state_file.as_deref(),
        parse_path,
    );
    let mut peers = Vec::new();
    for (i, p) in raw.peers.as_deref().unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("federation.peers[{i}].{field}");
        let address = check.required(&at("address"), p.address.as_deref(), parse_socket_addr);
        let spiffe_id = check.required(&at("spiffe_id"), p.spiffe_id.as_deref(), |s| {
            SpiffeId::from_str(s)
                .map_err(|e| e.to_string())
                .and_then(gateway_id)
        });
        let grant = grant(
            check,
            &format!("federation.peers[{i}]"),
            RawGrant {
                clusters: p.clusters.as_deref(),
                localities: p.localities.as_deref(),
                import: p.import.as_deref(),
                export: p.export.as_deref(),
            },
        );
        if let Some(id) = &spiffe_id {
            bundles.require_for(check, &at("spiffe_id"), id);
            if peers.iter().any(|q: &FederationPeer| &q.spiffe_id == id) {
                check.fail(at("spiffe_id"), format!("{id} is listed twice"));
            }
        }
        if let (Some(address), Some(spiffe_id), Some(grant)) = (address, spiffe_id, grant) {
            peers.push(FederationPeer {
                address,
                spiffe_id,
                grant,
            });
        }
    }
    let mut accept: Vec<FederationAccept> = Vec::new();
    for (i, a) in raw.accept.as_deref().unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("federation.accept[{i}].{field}");
        let trust_domain = check.required(
            &at("trust_domain"),
            a.trust_domain.as_deref(),
            TrustDomain::from_str,
        );
        let grant = grant(
            check,
            &format!("federation.accept[{i}]"),
            RawGrant {
                clusters: a.clusters.as_deref(),
                localities: a.localities.as_deref(),
                import: a.import.as_deref(),
                export: a.export.as_deref(),
            },
        );
        if let Some(td) = &trust_domain {
            bundles.require(check, &at("trust_domain"), td);
            if accept.iter().any(|q| &q.trust_domain == td) {
                check.fail(at("trust_domain"), format!("{td} is listed twice"));
            }
        }
        if let (Some(trust_domain), Some(grant)) = (trust_domain, grant) {
            accept.push(FederationAccept {
                trust_domain,
                grant,
            });
        }
    }
    let limits = limits(check, &raw.limits);
    let enabled = listen.is_some() || !peers.is_empty();
    if !accept.is_empty() && listen.is_none() {
        check.fail(
            "federation.accept",
            "needs federation.listen: accepted gateways dial this gateway's federation listener",
        );
    }
    if enabled && !has_identity {
        check.fail(
            if listen.is_some() {
                "federation.listen"
            } else {
                "federation.peers"
            },
            "needs [identity]: peers authenticate this gateway by its SVID",
        );
    }
    let advertise = match raw.advertise.as_deref() {
        Some(a) => check.parsed("federation.advertise", parse_socket_addr(a)),
        None => match east_west {
            Some(a) if a.ip().is_unspecified() && enabled => {
                check.fail(
                    "federation.advertise",
                    format!(
                        "is required: listeners.east_west is {a}, which peers cannot connect to"
                    ),
                );
                None
            }
            other => other,
        },
    };
    let (Some(lease), Some(grace), Some(limits), Some(weight)) = (lease, grace, limits, weight)
    else {
        return None;
    };
    (check.errors.len() == before).then_some(FederationConfig {
        listen,
        advertise,
        lease,
        weight,
        grace,
        export,
        state_file,
        peers,
        accept,
        limits,
    })
}

/// Only gateways peer: their SPIFFE IDs are `spiffe://<td>/isthmus/gateway/<name>`.
fn gateway_id(id: SpiffeId) -> Result<SpiffeId, String> {
    if id.path().starts_with(GATEWAY_PATH_PREFIX) {
        Ok(id)
    } else {
        Err(format!(
            "{id} is not a gateway identity (spiffe://<trust-domain>{GATEWAY_PATH_PREFIX}<name>)"
        ))
    }
}

/// The grant keys as written, shared by `[[federation.peers]]` and
/// `[[federation.accept]]`.
struct RawGrant<'a> {
    clusters: Option<&'a [String]>,
    localities: Option<&'a [String]>,
    import: Option<&'a [String]>,
    export: Option<&'a [String]>,
}

/// Checks the grant keys under `path`.
fn grant(check: &mut Check, path: &str, raw: RawGrant<'_>) -> Option<GrantConfig> {
    let at = |field: &str| format!("{path}.{field}");
    let before = check.errors.len();
    let clusters = clusters(check, &at("clusters"), raw.clusters);
    let localities = list(check, &at("localities"), raw.localities, Locality::from_str);
    let import = patterns(check, &at("import"), raw.import);
    let export = raw.export.map(|e| patterns(check, &at("export"), Some(e)));
    (check.errors.len() == before).then_some(GrantConfig {
        clusters: clusters?,
        localities,
        import,
        export,
    })
}

/// The cluster names a peer may speak for: required, at least one.
fn clusters(check: &mut Check, path: &str, raw: Option<&[String]>) -> Option<Vec<ClusterName>> {
    match raw {
        None | Some([]) => {
            check.fail(
                path,
                "is required: the cluster name(s) this peer may speak for, e.g. [\"west\"]",
            );
            None
        }
        Some(names) => {
            let before = check.errors.len();
            let parsed = list(check, path, Some(names), ClusterName::from_str);
            (check.errors.len() == before).then_some(parsed)
        }
    }
}

fn limits(check: &mut Check, raw: &RawFederationLimits) -> Option<PeeringLimits> {
    let d = PeeringLimits::default();
    let at = |field: &str| format!("federation.limits.{field}");
    let mut count = |field: &str, value: Option<i64>, default: usize, min: i64, max: i64| {
        int::<usize>(check, &at(field), value, default as i64, min, max)
    };
    let max_services_per_peer = count(
        "max_services_per_peer",
        raw.max_services_per_peer,
        d.max_services_per_peer,
        1,
        1_000_000,
    );
    let max_ports_per_service = count(
        "max_ports_per_service",
        raw.max_ports_per_service,
        d.max_ports_per_service,
        1,
        1_024,
    );
    let max_endpoints_per_service = count(
        "max_endpoints_per_service",
        raw.max_endpoints_per_service,
        d.max_endpoints_per_service,
        0,
        100_000,
    );
    let max_message_bytes = count(
        "max_message_bytes",
        raw.max_message_bytes,
        d.max_message_bytes,
        64 << 10,
        256 << 20,
    );
    let max_sessions_per_peer = count(
        "max_sessions_per_peer",
        raw.max_sessions_per_peer,
        d.max_sessions_per_peer as usize,
        2,
        64,
    );
    let max_streams_per_connection = count(
        "max_streams_per_connection",
        raw.max_streams_per_connection,
        d.max_streams_per_connection as usize,
        1,
        64,
    );
    let max_connections = count(
        "max_connections",
        raw.max_connections,
        d.max_connections,
        2,
        100_000,
    );
    let max_connections_per_source = count(
        "max_connections_per_source",
        raw.max_connections_per_source,
        d.max_connections_per_source,
        2,
        100_000,
    );
    let max_handshakes = count(
        "max_handshakes",
        raw.max_handshakes,
        d.max_handshakes,
        1,
        10_000,
    );
    let peer_retention = check.or_value(
        &at("peer_retention"),
        raw.peer_retention.as_deref(),
        d.peer_retention,
        |s| parse_duration(s, MAX_PEER_RETENTION),
    );
    Some(PeeringLimits {
        max_services_per_peer: max_services_per_peer?,
        max_ports_per_service: max_ports_per_service?,
        max_endpoints_per_service: max_endpoints_per_service?,
        max_message_bytes: max_message_bytes?,
        max_sessions_per_peer: u32::try_from(max_sessions_per_peer?).ok()?,
        max_streams_per_connection: u32::try_from(max_streams_per_connection?).ok()?,
        max_connections: max_connections?,
        max_connections_per_source: max_connections_per_source?,
        max_handshakes: max_handshakes?,
        peer_retention: peer_retention?,
    })
}
