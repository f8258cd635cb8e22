//! The catalog recompute: this cluster's services (from every discovery
//! source, with export times that survive restarts), static peers and the
//! peers' exports merged into the catalog the data plane reads, and the
//! export set the sessions send.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::leases::LeaseState;
use super::{Hub, Inner, state, unix_millis};
use crate::catalog::{LocalService, PeerCatalog, ServiceKey, export_set, merge};

impl Hub {
    /// Replaces the services found by discovery source `name` and publishes
    /// the new catalog at once.
    pub fn set_source(&self, name: &str, services: Vec<LocalService>) {
        let save = {
            let mut inner = self.inner();
            inner.sources.insert(name.to_owned(), services);
            inner.local = join_sources(&inner.sources);
            let now = unix_millis(SystemTime::now());
            let Inner {
                local,
                first_exported,
                ..
            } = &mut *inner;
            let before = first_exported.clone();
            // Only what is exported now is kept: a service exported again
            // later is a new export.
            first_exported.retain(|key, _| {
                local
                    .iter()
                    .any(|s| s.exported && s.export.export_time_millis == 0 && &s.export.key == key)
            });
            for service in local.iter_mut().filter(|s| s.exported) {
                if service.export.export_time_millis == 0 {
                    service.export.export_time_millis = *first_exported
                        .entry(service.export.key.clone())
                        .or_insert(now);
                }
            }
            (*first_exported != before).then(|| first_exported.clone())
        };
        if let (Some(times), Some(path)) = (save, &self.state_file) {
            state::save_export_times(path, &times);
        }
        self.recompute();
    }

    /// Replaces the statically configured peers (gateways that do not peer).
    pub fn set_static_peers(&self, peers: Vec<PeerCatalog>) {
        self.inner().static_peers = peers.into_iter().map(Arc::new).collect();
        self.recompute();
    }

    /// Rebuilds and publishes the catalog and the export set.
    pub fn recompute(&self) {
        let inner = self.inner();
        let mut peers: Vec<&PeerCatalog> = inner.static_peers.iter().map(AsRef::as_ref).collect();
        peers.extend(
            inner
                .peers
                .values()
                .filter(|r| r.state != LeaseState::Expired && r.hello.east_west.is_some())
                .map(|r| r.catalog.as_ref()),
        );
        // Every peer the hub knows may call the east-west listener, also one
        // that serves nothing (no east-west listener, or lapsed).
        let gateways = inner
            .static_peers
            .iter()
            .map(|p| &p.gateway)
            .chain(inner.peers.values().map(|r| &r.catalog.gateway))
            .map(|g| (g.spiffe_id.clone(), g.cluster.clone()));
        let catalog = merge(&self.me.cluster, &inner.local, &peers).with_gateways(gateways);
        let exports = export_set(&inner.local);
        drop(inner);
        self.metrics
            .catalog_services
            .set(i64::try_from(catalog.len()).unwrap_or(i64::MAX));
        self.metrics
            .catalog_conflicts
            .set(i64::try_from(catalog.conflicts().len()).unwrap_or(i64::MAX));
        self.metrics
            .catalog_exported
            .set(i64::try_from(exports.len()).unwrap_or(i64::MAX));
        self.metrics.catalog_updates.inc();
        self.catalog.store(Arc::new(catalog));
        self.catalog_version.send_modify(|v| *v += 1);
        self.exports.send_if_modified(|current| {
            if *current.services == exports {
                return false;
            }
            current.version += 1;
            current.services = Arc::new(exports);
            true
        });
    }
}

/// Joins every source's services; a service found by several sources gets
/// all their endpoints and ports (the first source's definition otherwise).
fn join_sources(sources: &BTreeMap<String, Vec<LocalService>>) -> Vec<LocalService> {
    let mut joined: BTreeMap<ServiceKey, LocalService> = BTreeMap::new();
    for service in sources.values().flatten() {
        match joined.get_mut(&service.export.key) {
            None => {
                joined.insert(service.export.key.clone(), service.clone());
            }
            Some(into) => {
                for e in &service.endpoints {
                    if !into.endpoints.contains(e) {
                        into.endpoints.push(*e);
                    }
                }
                for p in &service.export.ports {
                    if !into.export.ports.iter().any(|q| q.port == p.port) {
                        into.export.ports.push(p.clone());
                    }
                }
                into.export
                    .endpoints
                    .extend(service.export.endpoints.iter().cloned());
                into.exported |= service.exported;
            }
        }
    }
    joined.into_values().collect()
}
