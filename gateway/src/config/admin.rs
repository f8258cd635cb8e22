//! `[admin]`: the admin HTTP API (health, metrics, debug views).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::parse::{Check, parse_socket_addr};

/// Default admin listener: loopback only, so metrics and debug data stay on the host.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `admin.listen`
    pub listen: Option<String>,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener.
    pub listen: SocketAddr,
}

/// Checks `[admin]`.
pub(super) fn admin(check: &mut Check, raw: &RawAdmin) -> Option<AdminConfig> {
    let listen = check.or_default(
        "admin.listen",
        raw.listen.as_deref(),
        DEFAULT_ADMIN_LISTEN,
        parse_socket_addr,
    )?;
    Some(AdminConfig { listen })
}
