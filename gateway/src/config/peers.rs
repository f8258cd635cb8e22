//! `[[peers]]`: peer gateways configured by hand, and the services they serve
//! (static until federation discovers them).

use std::net::SocketAddr;
use std::str::FromStr;

use isthmus_federation::catalog::ServiceKey;
use isthmus_federation::{ClusterName, Locality, SpiffeId};
use serde::{Deserialize, Serialize};

use super::parse::{
    Bundles, Check, list, parse_socket_addr, serialize_display, serialize_display_list,
};

/// `[[peers]]` as written.
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
    #[serde(serialize_with = "serialize_display_list")]
    pub services: Vec<ServiceKey>,
}

/// Checks `[[peers]]`: each service must be one of `local` (the keys of
/// `[[services]]`, which give its ports), each SPIFFE ID's trust domain one
/// of `bundles`.
pub(super) fn peers(
    check: &mut Check,
    raw: &[RawPeer],
    local: &[ServiceKey],
    bundles: &Bundles<'_>,
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
            if !local.contains(key) {
                check.fail(
                    format!("peers[{i}].services[{j}]"),
                    format!("{key} is not in [[services]], which gives its ports"),
                );
            }
        }
        if let Some(id) = &spiffe_id {
            bundles.require_for(check, &at("spiffe_id"), id);
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
