//! `[listeners]`: the data plane's listeners, each off unless given an address.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::parse::{Check, parse_socket_addr};

/// `[listeners]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListeners {
    /// `listeners.outbound`
    pub outbound: Option<String>,
    /// `listeners.east_west`
    pub east_west: Option<String>,
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

/// Checks `[listeners]`; `has_identity`: whether `[identity]` is set.
pub(super) fn listeners(
    check: &mut Check,
    raw: &RawListeners,
    has_identity: bool,
) -> Option<ListenersConfig> {
    let before = check.errors.len();
    let outbound = check.optional(
        "listeners.outbound",
        raw.outbound.as_deref(),
        parse_socket_addr,
    );
    let east_west = check.optional(
        "listeners.east_west",
        raw.east_west.as_deref(),
        parse_socket_addr,
    );
    if raw.east_west.is_some() && !has_identity {
        check.fail(
            "listeners.east_west",
            "needs [identity]: peers authenticate this gateway by its SVID",
        );
    }
    (check.errors.len() == before).then_some(ListenersConfig {
        outbound,
        east_west,
    })
}
