//! What peers export here: snapshots and deltas applied to a peer's
//! catalog, filtered by the peer's grant and service cap (the refusals go
//! back in a NACK), and the ACK/NACK bookkeeping.

use std::sync::Arc;
use std::time::SystemTime;

use super::{Hub, unix_millis};
use crate::SpiffeId;
use crate::catalog::{Export, ServiceKey};
use crate::peering::authority::ServicePatterns;
use crate::peering::convert::{ConvertError, PeerHello};

/// What a delta did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied.
    Applied,
    /// Already applied (another session delivered it).
    Duplicate,
    /// It does not apply to what the hub holds; a snapshot is needed.
    Resync(String),
}

/// Why an export was refused: the `reason` label of
/// `isthmus_federation_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportRefusal {
    /// The peer is no longer granted any imports.
    NotGranted,
    /// Outside the services this gateway imports from the peer.
    Import,
    /// Over the number of services the peer may export here.
    ServicesCap,
}

impl ExportRefusal {
    /// Every reason, for tests and documentation.
    pub const ALL: [Self; 3] = [Self::NotGranted, Self::Import, Self::ServicesCap];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotGranted => "not_granted",
            Self::Import => "import",
            Self::ServicesCap => "services_cap",
        }
    }
}

/// An export a peer sent that this gateway did not take.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The service, `namespace/name`.
    pub service: String,
    /// Why, the metric label.
    pub reason: ExportRefusal,
    /// What the NACK says.
    pub error: ConvertError,
}

impl Hub {
    /// Replaces `peer`'s services with a snapshot (of the incarnation the
    /// session saw in its hello).
    /// Returns the exports refused (outside the peer's grant or over its
    /// cap), for the NACK.
    pub fn apply_snapshot(
        &self,
        peer: &PeerHello,
        version: u64,
        services: Vec<Export>,
    ) -> Vec<Refusal> {
        let mut inner = self.inner();
        let authority = inner.authority.clone();
        let Some(record) = inner.peers.get_mut(&peer.spiffe_id) else {
            return Vec::new();
        };
        if record.hello.incarnation != peer.incarnation
            || (record.synced && version < record.version)
        {
            return Vec::new(); // from an older session
        }
        let (mut taken, refused) = authorize(
            authority.grant(&peer.spiffe_id).map(|g| &g.imports),
            services,
            self.limits.max_services_per_peer,
            |_| false,
        );
        let now_millis = unix_millis(SystemTime::now());
        record
            .first_seen
            .retain(|key, _| taken.iter().any(|e| &e.key == key));
        record.clamp_export_times(&mut taken, now_millis);
        record.note_refused(&refused);
        Arc::make_mut(&mut record.catalog).services =
            taken.into_iter().map(|e| (e.key.clone(), e)).collect();
        record.version = version;
        record.synced = true;
        let now = SystemTime::now();
        record.first_sync.get_or_insert(now);
        record.last_sync = Some(now);
        drop(inner);
        self.count_refused(&refused);
        self.touch();
        refused
    }

    fn count_refused(&self, refused: &[Refusal]) {
        for r in refused {
            self.metrics
                .refused
                .with_label_values(&[r.reason.label()])
                .inc();
        }
    }

    /// Applies a delta from `base` to `version` to `peer`'s services. The
    /// refusals (outside its grant, over its cap) are for the NACK.
    pub fn apply_delta(
        &self,
        peer: &PeerHello,
        base: u64,
        version: u64,
        upserts: Vec<Export>,
        removals: Vec<ServiceKey>,
    ) -> (DeltaOutcome, Vec<Refusal>) {
        let mut inner = self.inner();
        let authority = inner.authority.clone();
        let Some(record) = inner.peers.get_mut(&peer.spiffe_id) else {
            return (
                DeltaOutcome::Resync("no state for this peer".into()),
                Vec::new(),
            );
        };
        if record.hello.incarnation != peer.incarnation || !record.synced {
            return (
                DeltaOutcome::Resync("no snapshot of this incarnation yet".into()),
                Vec::new(),
            );
        }
        if version <= record.version {
            return (DeltaOutcome::Duplicate, Vec::new());
        }
        if base != record.version {
            return (
                DeltaOutcome::Resync(format!(
                    "delta from version {base} does not apply to version {}",
                    record.version
                )),
                Vec::new(),
            );
        }
        for key in &removals {
            Arc::make_mut(&mut record.catalog).services.remove(key);
            record.first_seen.remove(key);
        }
        // Updates of services it holds always fit; new ones only while the
        // peer is under its cap.
        let held = record.catalog.services.len();
        let room = self.limits.max_services_per_peer.saturating_sub(held);
        let services = &record.catalog.services;
        let (mut taken, refused) = authorize(
            authority.grant(&peer.spiffe_id).map(|g| &g.imports),
            upserts,
            room,
            |key| services.contains_key(key),
        );
        record.clamp_export_times(&mut taken, unix_millis(SystemTime::now()));
        record.note_refused(&refused);
        let services = &mut Arc::make_mut(&mut record.catalog).services;
        for export in taken {
            services.insert(export.key.clone(), export);
        }
        record.version = version;
        record.last_sync = Some(SystemTime::now());
        drop(inner);
        self.count_refused(&refused);
        self.touch();
        (DeltaOutcome::Applied, refused)
    }

    /// Notes an ACK from `peer`.
    pub fn acked(&self, peer: &SpiffeId, version: u64) {
        if let Some(r) = self.inner().peers.get_mut(peer) {
            r.acked = r.acked.max(version);
        }
    }

    /// Notes a NACK: `sent` by this gateway or received from `peer`.
    pub fn nacked(&self, peer: &SpiffeId, sent: bool, reason: &str) {
        let direction = if sent { "sent" } else { "received" };
        self.metrics
            .nacks
            .with_label_values(&[peer.as_str(), direction])
            .inc();
        if let Some(r) = self.inner().peers.get_mut(peer) {
            if sent {
                r.nacks_sent += 1;
            } else {
                r.nacks_received += 1;
            }
            r.last_nack = Some(format!("{direction}: {reason}"));
        }
    }
}

/// Splits `exports` into those `imports` lets a peer export here (`None`:
/// the peer has no grant any more) and the refused ones. At most `room`
/// services not yet `held` are taken; the rest are over the peer's cap.
fn authorize(
    imports: Option<&ServicePatterns>,
    exports: Vec<Export>,
    mut room: usize,
    held: impl Fn(&ServiceKey) -> bool,
) -> (Vec<Export>, Vec<Refusal>) {
    let mut taken = Vec::with_capacity(exports.len().min(room));
    let mut refused = Vec::new();
    let refuse = |export: Export, reason: ExportRefusal, message: String| Refusal {
        service: export.key.to_string(),
        reason,
        error: ConvertError {
            path: export.key.to_string(),
            message,
        },
    };
    for export in exports {
        match imports {
            None => refused.push(refuse(
                export,
                ExportRefusal::NotGranted,
                "this peer is no longer granted any imports".into(),
            )),
            Some(imports) if !imports.allows(&export.key) => refused.push(refuse(
                export,
                ExportRefusal::Import,
                "not among the services this gateway imports from this peer".into(),
            )),
            Some(_) if held(&export.key) => taken.push(export),
            Some(_) if room == 0 => refused.push(refuse(
                export,
                ExportRefusal::ServicesCap,
                "over the number of services this peer may export here".into(),
            )),
            Some(_) => {
                room -= 1;
                taken.push(export);
            }
        }
    }
    (taken, refused)
}
