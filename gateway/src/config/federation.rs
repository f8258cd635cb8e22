//! `[federation]`: peering with other gateways over `isthmus.federation.v1`.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use isthmus_federation::peering::convert::{MAX_LEASE, MIN_LEASE};
use isthmus_federation::{SpiffeId, TrustDomain};
use serde::Serialize;

use super::error::ConfigError;
use super::model::{
    Check, ListenersConfig, TrustConfig, parse_duration, parse_socket_addr, require_bundle,
};
use super::raw::RawFederation;

/// Default lease: peers hear from this gateway at least every third of it, and
/// count on it no longer when it lapses. 1.5 s makes a partitioned peer stop
/// getting new requests within 2 s with no tuning; renewals are a few bytes.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(1500);
/// Default grace: a lapsed peer's services are served this long.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Longest grace: last-known-good is served for a while, never forever.
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);

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
    /// A peer whose lease lapsed keeps its services this long.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Take each peer's bundle for its own trust domain.
    pub accept_peer_bundles: bool,
    /// What peers without their own `export` see (`namespace/name`, `*`
    /// wildcards); empty: every exported service.
    pub export: Vec<String>,
    /// The peers this gateway dials.
    pub peers: Vec<FederationPeer>,
}

/// `[[federation.peers]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationPeer {
    /// Its federation listener.
    pub address: SocketAddr,
    /// The SPIFFE ID it must prove.
    pub spiffe_id: SpiffeId,
    /// What it may see; `None`: `federation.export`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<Vec<String>>,
}

impl FederationConfig {
    /// Whether this gateway peers at all.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || !self.peers.is_empty()
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

pub(super) fn federation(
    check: &mut Check,
    raw: &RawFederation,
    listeners: Option<&ListenersConfig>,
    has_identity: bool,
    own_td: Option<&TrustDomain>,
    trust: Option<&TrustConfig>,
) -> Option<FederationConfig> {
    let before = check.errors.len();
    let listen = raw
        .listen
        .as_deref()
        .and_then(|a| check.parsed("federation.listen", parse_socket_addr(a)));
    let lease = match raw.lease.as_deref() {
        None => Some(DEFAULT_LEASE),
        Some(s) => check.parsed(
            "federation.lease",
            parse_duration(s, MAX_LEASE).and_then(|d| {
                if d < MIN_LEASE {
                    Err(format!(
                        "{s:?} is shorter than the minimum of {}",
                        humantime::format_duration(MIN_LEASE)
                    ))
                } else {
                    Ok(d)
                }
            }),
        ),
    };
    let grace = match raw.grace.as_deref() {
        None => Some(DEFAULT_GRACE),
        Some(s) => check.parsed("federation.grace", parse_duration(s, MAX_GRACE)),
    };
    let export = patterns(check, "federation.export", raw.export.as_deref());
    let mut peers = Vec::new();
    for (i, p) in raw.peers.as_deref().unwrap_or_default().iter().enumerate() {
        let at = |field: &str| format!("federation.peers[{i}].{field}");
        let address = check.required(&at("address"), p.address.as_deref(), parse_socket_addr);
        let spiffe_id =
            check.required(&at("spiffe_id"), p.spiffe_id.as_deref(), SpiffeId::from_str);
        let export = p
            .export
            .as_deref()
            .map(|e| patterns(check, &at("export"), Some(e)));
        if let Some(id) = &spiffe_id {
            require_bundle(check, &at("spiffe_id"), id, own_td, trust);
            if peers.iter().any(|q: &FederationPeer| &q.spiffe_id == id) {
                check.errors.push(ConfigError::new(
                    at("spiffe_id"),
                    format!("{id} is listed twice"),
                ));
            }
        }
        if let (Some(address), Some(spiffe_id)) = (address, spiffe_id) {
            peers.push(FederationPeer {
                address,
                spiffe_id,
                export,
            });
        }
    }
    let enabled = listen.is_some() || !peers.is_empty();
    if enabled && !has_identity {
        check.errors.push(ConfigError::new(
            if listen.is_some() {
                "federation.listen"
            } else {
                "federation.peers"
            },
            "needs [identity]: peers authenticate this gateway by its SVID",
        ));
    }
    let advertise = match raw.advertise.as_deref() {
        Some(a) => check.parsed("federation.advertise", parse_socket_addr(a)),
        None => {
            let east_west = listeners.and_then(|l| l.east_west);
            match east_west {
                Some(a) if a.ip().is_unspecified() && enabled => {
                    check.errors.push(ConfigError::new(
                        "federation.advertise",
                        format!(
                            "is required: listeners.east_west is {a}, which peers cannot connect to"
                        ),
                    ));
                    None
                }
                other => other,
            }
        }
    };
    let (Some(lease), Some(grace)) = (lease, grace) else {
        return None;
    };
    (check.errors.len() == before).then_some(FederationConfig {
        listen,
        advertise,
        lease,
        grace,
        accept_peer_bundles: raw.accept_peer_bundles.unwrap_or(true),
        export,
        peers,
    })
}
