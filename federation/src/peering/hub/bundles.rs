//! Trust bundles: this trust domain's bundle for peers, and the bundles
//! peers push, taken only where the operator opted in.

use tracing::{debug, info, warn};

use super::Hub;
use crate::TrustDomain;
use crate::peering::convert::PeerHello;
use crate::trust::{BundleSource, DomainTrust, TrustBundle};

/// What became of a bundle a peer pushed: the `result` label of
/// `isthmus_federation_trust_bundles_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleOutcome {
    /// Taken: it replaced the bundle in use.
    Updated,
    /// The same authorities as the bundle in use.
    Unchanged,
    /// Not for this gateway to take: no trust material, or this gateway's
    /// own trust domain.
    Ignored,
    /// Not a valid or usable SPIFFE bundle.
    Invalid,
    /// Refused: a bundle for another trust domain than the peer's.
    OtherTrustDomain,
    /// Refused: the trust domain is not opted in to pushes.
    NotOptedIn,
    /// Refused: the peer is not in `federation.peers`.
    NotConfiguredPeer,
    /// Refused: the bundle in use comes from its bundle endpoint.
    EndpointSourced,
    /// Refused: an older `spiffe_sequence`, or none, than the one in use.
    Rollback,
}

impl BundleOutcome {
    /// Every outcome, for tests and documentation.
    pub const ALL: [Self; 9] = [
        Self::Updated,
        Self::Unchanged,
        Self::Ignored,
        Self::Invalid,
        Self::OtherTrustDomain,
        Self::NotOptedIn,
        Self::NotConfiguredPeer,
        Self::EndpointSourced,
        Self::Rollback,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
            Self::Ignored => "ignored",
            Self::Invalid => "invalid",
            Self::OtherTrustDomain => "other_trust_domain",
            Self::NotOptedIn => "not_opted_in",
            Self::NotConfiguredPeer => "not_configured_peer",
            Self::EndpointSourced => "endpoint_sourced",
            Self::Rollback => "rollback",
        }
    }
}

impl Hub {
    /// This trust domain's bundle in the SPIFFE format, and its revision.
    pub fn own_bundle(&self) -> Option<(u64, Vec<u8>)> {
        let material = self.material.as_ref()?;
        let store = material.trust();
        let domain = store.get(self.me.spiffe_id.trust_domain_str())?;
        let json = domain
            .bundle
            .to_spiffe_json(domain.bundle.sequence.unwrap_or(domain.revision), None)
            .inspect_err(|e| warn!(error = %e, "own trust bundle not sent to peers"))
            .ok()?;
        Some((domain.revision, json.into_bytes()))
    }

    /// A bundle `peer` sent for `trust_domain`. Taken only where the
    /// operator opted that trust domain in to pushes, from a configured peer
    /// of that trust domain (which it proved in the handshake), never for
    /// this gateway's own, never over a bundle that came from an endpoint, and
    /// never older than the one in use. Returns what became of it.
    pub fn peer_bundle(&self, peer: &PeerHello, trust_domain: &str, data: &[u8]) -> BundleOutcome {
        let result = self.take_peer_bundle(peer, trust_domain, data);
        self.metrics
            .bundles
            .with_label_values(&[peer.spiffe_id.trust_domain_str(), result.label()])
            .inc();
        result
    }

    fn take_peer_bundle(&self, peer: &PeerHello, trust_domain: &str, data: &[u8]) -> BundleOutcome {
        let Some(material) = self.material.as_ref() else {
            return BundleOutcome::Ignored;
        };
        let peer_td = peer.spiffe_id.trust_domain_str();
        if peer_td == self.me.spiffe_id.trust_domain_str() && trust_domain == peer_td {
            // A gateway of this trust domain: its bundle is ours, which only
            // local configuration sets. Routine, so not worth a warning.
            debug!(peer = %peer.spiffe_id, "bundle from a peer of this trust domain; ours stays");
            return BundleOutcome::Ignored;
        }
        let refuse = |result: BundleOutcome, why: &str| {
            warn!(peer = %peer.spiffe_id, trust_domain, result = result.label(), "peer's trust bundle refused: {why}");
            result
        };
        if trust_domain != peer_td {
            return refuse(
                BundleOutcome::OtherTrustDomain,
                "a peer may push only its own trust domain's bundle",
            );
        }
        let authority = self.authority();
        if !authority.bundle_pushes.contains(peer_td) {
            return refuse(
                BundleOutcome::NotOptedIn,
                "this trust domain's bundle comes from its configured source only \
                 (opt in with trust.federated[].accept_peer_bundles)",
            );
        }
        if !authority.is_configured(&peer.spiffe_id) {
            return refuse(
                BundleOutcome::NotConfiguredPeer,
                "only peers listed in federation.peers may push bundles",
            );
        }
        let td: TrustDomain = peer.spiffe_id.trust_domain();
        let bundle = match TrustBundle::from_spiffe_json(td, data) {
            Ok(b) => b,
            Err(e) => {
                warn!(peer = %peer.spiffe_id, error = %e, "peer sent an invalid trust bundle; keeping the one in use");
                return BundleOutcome::Invalid;
            }
        };
        let store = material.trust();
        if let Some(current) = store.get(peer_td) {
            if matches!(current.source, BundleSource::Endpoint(_)) {
                return refuse(
                    BundleOutcome::EndpointSourced,
                    "the bundle in use comes from its bundle endpoint",
                );
            }
            if current.bundle.authorities == bundle.authorities {
                return BundleOutcome::Unchanged;
            }
            if let Some(have) = current.bundle.sequence {
                match bundle.sequence {
                    Some(got) if got >= have => {}
                    got => {
                        warn!(peer = %peer.spiffe_id, ?got, have,
                            "peer sent a bundle with an older or no spiffe_sequence; keeping the one in use");
                        return BundleOutcome::Rollback;
                    }
                }
            }
        }
        let authorities = bundle.authorities.len();
        match DomainTrust::new(
            bundle,
            BundleSource::Peer(peer.spiffe_id.to_string()),
            material.provider(),
        ) {
            Ok(domain) => {
                material.update_trust(|s| s.with(domain.clone()));
                info!(peer = %peer.spiffe_id, trust_domain = peer_td, authorities,
                    "federated trust bundle updated by its peer gateway");
                BundleOutcome::Updated
            }
            Err(e) => {
                warn!(peer = %peer.spiffe_id, error = %e, "peer sent an unusable trust bundle");
                BundleOutcome::Invalid
            }
        }
    }
}
