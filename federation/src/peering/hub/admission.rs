//! Admission: which hellos open a session (the operator's grants, the
//! peer's cluster, locality and east-west address, its session cap), and
//! the guard that closes a session.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::leases::LeaseState;
use super::record::{PeerRecord, gateway_of};
use super::{Hub, Inner, SentView};
use crate::SpiffeId;
use crate::catalog::PeerCatalog;
use crate::peering::convert::{PeerHello, Resume};

impl Hub {
    /// A session with the peer that sent `hello` began. The returned guard
    /// ends it when dropped.
    pub fn session_open(self: &Arc<Self>, hello: &PeerHello) -> Result<SessionGuard, HelloRefused> {
        let mut inner = self.inner();
        if let Err(refused) = self.admit(&inner, hello) {
            drop(inner);
            warn!(peer = %hello.spiffe_id, cluster = %hello.cluster, reason = refused.reason.label(),
                error = %refused.message, "peer hello refused");
            self.metrics
                .refused
                .with_label_values(&[refused.reason.label()])
                .inc();
            return Err(refused);
        }
        let record = inner
            .peers
            .entry(hello.spiffe_id.clone())
            .or_insert_with(|| PeerRecord::new(hello.clone()));
        record.expired_at = None;
        if record.hello != *hello {
            if record.hello.incarnation != hello.incarnation {
                // A restarted peer: its versions start over; what it served
                // stays until its new snapshot replaces it.
                record.synced = false;
                record.version = 0;
            }
            let services = std::mem::take(&mut Arc::make_mut(&mut record.catalog).services);
            record.catalog = Arc::new(PeerCatalog {
                gateway: gateway_of(hello),
                services,
            });
            record.hello = hello.clone();
        }
        record.sessions += 1;
        record.last_heard = Instant::now();
        record.state = LeaseState::Live;
        record.refresh_live();
        self.metrics
            .peer_up
            .with_label_values(&[hello.spiffe_id.as_str(), hello.cluster.as_str()])
            .set(1);
        drop(inner);
        self.touch();
        Ok(SessionGuard {
            hub: self.clone(),
            peer: hello.spiffe_id.clone(),
        })
    }

    /// Whether the operator's grants let `hello` open a session: a grant for
    /// its identity, a cluster name the grant names, an east-west address
    /// that is nobody else's, and room for one more session.
    fn admit(&self, inner: &Inner, hello: &PeerHello) -> Result<(), HelloRefused> {
        let id = &hello.spiffe_id;
        let Some(grant) = inner.authority.grant(id) else {
            return Err(HelloRefused::new(
                HelloRefusal::NotGranted,
                format!("{id} is neither in federation.peers nor accepted by federation.accept"),
            ));
        };
        if !grant.clusters.contains(&hello.cluster) {
            let allowed: Vec<&str> = grant.clusters.iter().map(|c| c.as_str()).collect();
            return Err(HelloRefused::new(
                HelloRefusal::Cluster,
                format!(
                    "{id} may speak for cluster(s) {} only, not {:?}",
                    allowed.join(", "),
                    hello.cluster.as_str()
                ),
            ));
        }
        if !grant.localities.is_empty()
            && !grant.localities.iter().any(|l| hello.locality.is_within(l))
        {
            let allowed: Vec<String> = grant.localities.iter().map(ToString::to_string).collect();
            return Err(HelloRefused::new(
                HelloRefusal::Locality,
                format!(
                    "{id} may run in {} only, not {}",
                    allowed.join(", "),
                    hello.locality
                ),
            ));
        }
        if let Some(address) = hello.east_west
            && let Some(owner) = address_owner(inner, &self.me, id, address)
        {
            return Err(HelloRefused::new(
                HelloRefusal::Address,
                format!("east-west address {address} is {owner}'s"),
            ));
        }
        let open = inner.peers.get(id).map_or(0, |r| r.sessions);
        if open >= self.limits.max_sessions_per_peer {
            return Err(HelloRefused::new(
                HelloRefusal::Sessions,
                format!(
                    "{id} holds {open} sessions already; at most {}",
                    self.limits.max_sessions_per_peer
                ),
            ));
        }
        Ok(())
    }

    /// What this gateway holds of `peer`'s catalog, for the hello of a new
    /// session with it: the version applied, while a snapshot of its
    /// incarnation is.
    pub fn held_of(&self, peer: &SpiffeId) -> Option<Resume> {
        let inner = self.inner();
        let record = inner.peers.get(peer)?;
        record.synced.then_some(Resume {
            incarnation: record.hello.incarnation,
            version: record.version,
        })
    }

    /// What a new session with `peer` may send a delta against, given what
    /// its hello says it `held`: the view an earlier session left, when it
    /// is of exactly that version of this incarnation. `None`: send a
    /// snapshot.
    pub fn resumable(&self, peer: &SpiffeId, held: Option<Resume>) -> Option<SentView> {
        let held = held?;
        if held.incarnation != self.me.incarnation {
            return None;
        }
        let inner = self.inner();
        let kept = inner.peers.get(peer)?.sent.as_ref()?;
        (kept.version == held.version).then(|| kept.clone())
    }

    /// A session with `peer` sent it `sent` (a version and a view shared
    /// with the session, not a copy). Kept (the newest of the sessions')
    /// until the peer is forgotten, for the next session to resume from.
    pub fn keep_sent(&self, peer: &SpiffeId, sent: SentView) {
        if sent.version == 0 {
            return; // sent nothing
        }
        if let Some(record) = self.inner().peers.get_mut(peer)
            && record
                .sent
                .as_ref()
                .is_none_or(|k| k.version <= sent.version)
        {
            record.sent = Some(sent);
        }
    }

    fn session_closed(&self, peer: &SpiffeId) {
        let mut inner = self.inner();
        if let Some(record) = inner.peers.get_mut(peer) {
            record.sessions = record.sessions.saturating_sub(1);
            if record.sessions == 0 {
                self.metrics
                    .peer_up
                    .with_label_values(&[peer.as_str(), record.hello.cluster.as_str()])
                    .set(0);
            }
            if record.refresh_live() {
                // A closed stream is the quickest sign of a dead peer: the
                // data plane stops counting on it now, not when the lease lapses.
                info!(peer = %peer, cluster = %record.hello.cluster,
                    "last session with peer closed; its gateway gets traffic only as a last resort");
                drop(inner);
                self.touch();
            }
        }
    }
}

/// Why a hello was refused: the `reason` label of
/// `isthmus_federation_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloRefusal {
    /// Its identity is neither a configured peer nor accepted.
    NotGranted,
    /// It speaks for a cluster its grant does not name.
    Cluster,
    /// It runs outside the localities its grant names.
    Locality,
    /// Its east-west address is someone else's.
    Address,
    /// It holds as many sessions as a peer may.
    Sessions,
}

impl HelloRefusal {
    /// Every reason, for tests and documentation.
    pub const ALL: [Self; 5] = [
        Self::NotGranted,
        Self::Cluster,
        Self::Locality,
        Self::Address,
        Self::Sessions,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotGranted => "not_granted",
            Self::Cluster => "cluster",
            Self::Locality => "locality",
            Self::Address => "address",
            Self::Sessions => "sessions",
        }
    }
}

/// Why a peer's hello was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRefused {
    /// Why, the metric label.
    pub reason: HelloRefusal,
    /// What the NACK and the log say.
    pub message: String,
}

impl HelloRefused {
    fn new(reason: HelloRefusal, message: String) -> Self {
        Self { reason, message }
    }
}

/// Who besides `peer` owns `address`: this gateway's own east-west
/// listener, a local endpoint, a static peer or another live peer. Backend
/// state follows addresses, so a peer announcing someone else's would have
/// its failures cut them.
fn address_owner(
    inner: &Inner,
    me: &PeerHello,
    peer: &SpiffeId,
    address: std::net::SocketAddr,
) -> Option<String> {
    if me.east_west == Some(address) {
        return Some("this gateway".into());
    }
    if let Some(s) = inner.local.iter().find(|s| s.endpoints.contains(&address)) {
        return Some(format!("an endpoint of local service {}", s.export.key));
    }
    if let Some(p) = inner
        .static_peers
        .iter()
        .find(|p| p.gateway.address == address)
    {
        return Some(format!("static peer {}", p.gateway.spiffe_id));
    }
    inner
        .peers
        .iter()
        .find(|(other, r)| {
            *other != peer && r.state != LeaseState::Expired && r.hello.east_west == Some(address)
        })
        .map(|(other, _)| format!("peer {other}"))
}

/// Ends a session in the hub when dropped.
pub struct SessionGuard {
    hub: Arc<Hub>,
    peer: SpiffeId,
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.session_closed(&self.peer);
    }
}
