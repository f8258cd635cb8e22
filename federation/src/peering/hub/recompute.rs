//! The catalog recompute: this cluster's services (from every discovery
//! source, with export times that survive restarts), static peers and the
//! peers' exports merged into the catalog the data plane reads, and the
//! export set the sessions send.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use super::leases::LeaseState;
use super::{Hub, Inner, state, unix_millis};
use crate::SpiffeId;
use crate::catalog::{
    Catalog, LocalService, PeerCatalog, ServiceKey, changed_exports, changed_services, export_set,
    merge, merge_changed, zip_by_key,
};

impl Hub {
    /// Replaces the services found by discovery source `name` and publishes
    /// the new catalog at once.
    pub fn set_source(&self, name: &str, services: Vec<LocalService>) {
        let save = {
            let mut inner = self.inner();
            inner.sources.insert(name.to_owned(), services);
            let joined = join_sources(&inner.sources);
            let before = std::mem::replace(&mut inner.local, joined);
            let now = unix_millis(SystemTime::now());
            let Inner {
                local,
                first_exported,
                merged,
                ..
            } = &mut *inner;
            let times_before = first_exported.clone();
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
            if let Some(changed) = &mut merged.local_changed {
                changed_services(&before, local, changed);
            }
            (*first_exported != times_before).then(|| first_exported.clone())
        };
        if let (Some(times), Some(path)) = (save, &self.state_file) {
            state::save_export_times(path, &times);
        }
        self.recompute();
    }

    /// Replaces the statically configured peers (gateways that do not peer).
    pub fn set_static_peers(&self, peers: Vec<PeerCatalog>) {
        let mut inner = self.inner();
        inner.static_peers = peers.into_iter().map(Arc::new).collect();
        // Rare (configuration reloads): merged again in full.
        inner.merged.local_changed = None;
        drop(inner);
        self.recompute();
    }

    /// Rebuilds and publishes the catalog and the export set.
    pub fn recompute(&self) {
        let mut inner = self.inner();
        let Inner {
            local,
            static_peers,
            peers: records,
            merged,
            ..
        } = &mut *inner;
        // The peers that serve: neither expired nor without an east-west
        // listener.
        let serving: BTreeMap<&SpiffeId, &Arc<PeerCatalog>> = records
            .iter()
            .filter(|(_, r)| r.state != LeaseState::Expired && r.hello.east_west.is_some())
            .map(|(id, r)| (id, &r.catalog))
            .collect();
        let mut peers: Vec<&PeerCatalog> = static_peers.iter().map(AsRef::as_ref).collect();
        peers.extend(serving.values().map(|c| c.as_ref()));
        let changed = merged.changed(&serving);
        let merged_catalog = match (&merged.catalog, changed) {
            (Some(previous), Some(changed)) => {
                merge_changed(previous, &self.me.cluster, local, &peers, &changed)
            }
            _ => merge(&self.me.cluster, local, &peers),
        };
        merged.peers = serving
            .iter()
            .map(|(id, c)| ((*id).clone(), Arc::clone(c)))
            .collect();
        merged.local_changed = Some(BTreeSet::new());
        // Every peer the hub knows may call the east-west listener, also one
        // that serves nothing (no east-west listener, or lapsed).
        let gateways = static_peers
            .iter()
            .map(|p| &p.gateway)
            .chain(records.values().map(|r| &r.catalog.gateway))
            .map(|g| (g.spiffe_id.clone(), g.cluster.clone()));
        let catalog = Arc::new(merged_catalog.with_gateways(gateways));
        merged.catalog = Some(catalog.clone());
        let exports = export_set(local);
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
        self.catalog.store(catalog);
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

/// What the last recompute merged, so that the next one merges again only
/// the services whose inputs changed ([`merge_changed`]).
#[derive(Default)]
pub(super) struct Merged {
    /// The catalog it published (its peer gateways are rebuilt every time).
    catalog: Option<Arc<Catalog>>,
    /// The serving peers' catalogs it merged. Holding them makes the next
    /// change to one copy it (`Arc::make_mut`), so that both versions can be
    /// compared: a peer's change costs that peer's catalog, not everyone's.
    peers: BTreeMap<SpiffeId, Arc<PeerCatalog>>,
    /// The keys of this cluster's services changed since; `None` merges
    /// everything again (the first time, and after static peers changed).
    local_changed: Option<BTreeSet<ServiceKey>>,
}

impl Merged {
    /// The keys to merge again for the peers now `serving`, or `None` for a
    /// full merge: none was made yet, or so much changed that redoing it
    /// key by key would cost more.
    fn changed(
        &mut self,
        serving: &BTreeMap<&SpiffeId, &Arc<PeerCatalog>>,
    ) -> Option<BTreeSet<ServiceKey>> {
        let mut changed = self.local_changed.take()?;
        let previous = self.catalog.as_ref()?;
        let serving = serving.iter().map(|(id, c)| (*id, *c));
        zip_by_key(&self.peers, serving, |_, old, new| match (old, new) {
            (Some(old), Some(new)) => {
                if !Arc::ptr_eq(old, new) {
                    changed_exports(old, new, &mut changed);
                }
            }
            // A peer that came or went: all its services.
            (old, new) => {
                for peer in old.into_iter().chain(new) {
                    changed.extend(peer.services.keys().cloned());
                }
            }
        });
        // Key by key costs a few lookups per peer for each key: past a
        // quarter of the catalog the full merge is cheaper.
        (changed.len() <= previous.len() / 4 + 16).then_some(changed)
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
