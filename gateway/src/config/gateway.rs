//! `[gateway]`: who this gateway is in the federation.

use std::collections::BTreeMap;
use std::str::FromStr;

use isthmus_federation::{ClusterName, GatewayName, Locality, LocalityError, TrustDomain};
use serde::{Deserialize, Serialize};

use super::parse::{Check, labels};

/// `[gateway]` as written.
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

/// `[gateway.locality]` as written.
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

/// Checks `[gateway]`.
pub(super) fn gateway(check: &mut Check, raw: &RawGateway) -> Option<GatewayIdentity> {
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
    let labels = labels(check, "gateway.labels", raw.labels.as_ref());
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
        check.fail("gateway.locality.region", "is required");
        return None;
    };
    Locality::new(region, raw.zone.as_deref(), raw.subzone.as_deref())
        .map_err(|e| match e {
            LocalityError::Part { part, source } => {
                check.fail(format!("gateway.locality.{part}"), source);
            }
            LocalityError::MissingParent { part, .. } => {
                check.fail(format!("gateway.locality.{part}"), e);
            }
            LocalityError::TooManyParts => check.fail("gateway.locality", e),
        })
        .ok()
}
