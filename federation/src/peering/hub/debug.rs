//! The debug views: `/debug/peers` and `/debug/catalog`.

use std::time::Instant;

use serde_json::{Value, json};

use super::Hub;
use crate::SpiffeId;

impl Hub {
    /// `/debug/peers`.
    pub fn debug_peers(&self) -> Value {
        let inner = self.inner();
        let now = Instant::now();
        let peers: Vec<Value> = inner
            .peers
            .iter()
            .map(|(id, r)| {
                json!({
                    "spiffe_id": id,
                    "cluster": r.hello.cluster,
                    "locality": r.hello.locality.to_string(),
                    "east_west": r.hello.east_west.map(|a| a.to_string()),
                    "configured": inner.authority.is_configured(id),
                    "state": r.state,
                    // Whether its gateway gets traffic (a session open, lease renewed).
                    "live": r.catalog.gateway.live,
                    "sessions": r.sessions,
                    "incarnation": r.hello.incarnation,
                    "lease_ms": u64::try_from(r.hello.lease.as_millis()).unwrap_or(u64::MAX),
                    "last_heard_ms_ago": u64::try_from(now.saturating_duration_since(r.last_heard).as_millis()).unwrap_or(u64::MAX),
                    "synced": r.synced,
                    "version": r.version,
                    "acked_by_peer": r.acked,
                    "last_sync": r.last_sync.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    "services": r.catalog.services.keys().map(ToString::to_string).collect::<Vec<_>>(),
                    "nacks_sent": r.nacks_sent,
                    "nacks_received": r.nacks_received,
                    "last_nack": r.last_nack,
                    "refused_exports_total": r.refused_total,
                    "refused_exports": r.refused,
                })
            })
            .collect();
        let waiting: Vec<&SpiffeId> = inner
            .authority
            .peers
            .keys()
            .filter(|id| !inner.peers.contains_key(*id))
            .collect();
        let exports = self.exports.borrow();
        json!({
            "gateway": self.me.spiffe_id,
            "cluster": self.me.cluster,
            "incarnation": self.me.incarnation,
            "export_version": exports.version,
            "exported": exports.services.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "peers": peers,
            "never_connected": waiting,
        })
    }

    /// `/debug/catalog`.
    pub fn debug_catalog(&self) -> Value {
        let catalog = self.catalog.load();
        json!({
            "cluster": self.me.cluster,
            "services": catalog.iter().map(|e| json!({
                "service": e.key.to_string(),
                "ports": e.ports,
                "exported": e.exported,
                "headless": e.headless,
                "local_endpoints": e.endpoints,
                "remote": e.remote.iter().map(|g| json!({
                    "cluster": g.cluster,
                    "gateway": g.spiffe_id,
                    "address": g.address,
                    "locality": g.locality.to_string(),
                })).collect::<Vec<_>>(),
                "headless_endpoints": e.headless_endpoints,
            })).collect::<Vec<_>>(),
            "conflicts": catalog.conflicts(),
        })
    }
}
