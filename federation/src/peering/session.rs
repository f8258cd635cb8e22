//! One peering session: the protocol over a bidirectional stream, the same for
//! the side that dialled and the side that accepted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tracing::{debug, info, warn};

use super::authority::ServicePatterns;
use super::convert::{self, ConvertError, PeerHello, Resume};
use super::hub::{DeltaOutcome, ExportSet, Hub, SentView};
use super::proto::{self, peer_message::Kind};
use crate::SpiffeId;
use crate::catalog::{Export, ServiceKey};

/// How long a peer has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Problems listed in one NACK; the log has them all.
const NACK_REASONS: usize = 5;

/// Which end of the stream this gateway is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It dialled the peer.
    Client,
    /// The peer dialled it.
    Server,
}

impl Role {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// The metric label: shutdown, closed, stream_error, hello_timeout,
    /// hello_rejected, silent, send_failed.
    pub result: &'static str,
    /// For the log.
    pub detail: String,
    /// The peer's hello was accepted (the session was established).
    pub established: bool,
}

fn end(result: &'static str, detail: impl Into<String>, established: bool) -> SessionEnd {
    SessionEnd {
        result,
        detail: detail.into(),
        established,
    }
}

fn message(kind: Kind) -> proto::PeerMessage {
    proto::PeerMessage { kind: Some(kind) }
}

struct Session<'a> {
    hub: &'a Arc<Hub>,
    peer: PeerHello,
    out: &'a mpsc::Sender<proto::PeerMessage>,
    /// What the peer has of this gateway's exports, as far as this session
    /// knows.
    sent: SentView,
    bundle_revision: Option<u64>,
    /// No snapshot or delta received yet: a delta now is a resume.
    first_catalog: bool,
}

/// Runs a session until the stream ends, the peer goes silent for its lease,
/// or `stop`. `authenticated` is the SPIFFE ID the peer proved in the TLS
/// handshake.
pub async fn run<S>(
    hub: Arc<Hub>,
    role: Role,
    authenticated: SpiffeId,
    mut inbound: S,
    out: mpsc::Sender<proto::PeerMessage>,
    mut stop: watch::Receiver<bool>,
) -> SessionEnd
where
    S: Stream<Item = Result<proto::PeerMessage, tonic::Status>> + Unpin,
{
    let mut mine = hub.me().to_proto();
    Resume::stamp(hub.held_of(&authenticated), &mut mine);
    if out.send(message(Kind::Hello(mine))).await.is_err() {
        return end("send_failed", "stream closed before hello", false);
    }
    let first = tokio::select! {
        _ = stop.changed() => return end("shutdown", "", false),
        first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next()) => first,
    };
    let hello = match first {
        Err(_) => return end("hello_timeout", "no hello in time", false),
        Ok(None) => return end("closed", "stream closed before hello", false),
        Ok(Some(Err(status))) => return end("stream_error", status.to_string(), false),
        Ok(Some(Ok(proto::PeerMessage {
            kind: Some(Kind::Hello(hello)),
        }))) => hello,
        Ok(Some(Ok(_))) => {
            let _ = out
                .send(nack(0, "the first message must be a hello", false))
                .await;
            return end("hello_rejected", "first message was not a hello", false);
        }
    };
    let peer = match PeerHello::from_proto(&hello, &authenticated) {
        Ok(p) => p,
        Err(e) => {
            warn!(peer = %authenticated, role = role.label(), error = %e, "peer hello refused");
            let _ = out
                .send(nack(0, &format!("hello refused: {e}"), false))
                .await;
            return end("hello_rejected", e.to_string(), false);
        }
    };
    let _guard = match hub.session_open(&peer) {
        Ok(guard) => guard,
        Err(refused) => {
            let _ = out
                .send(nack(
                    0,
                    &format!("hello refused: {}", refused.message),
                    false,
                ))
                .await;
            return end("hello_rejected", refused.message, false);
        }
    };
    let kept = hub.resumable(&peer.spiffe_id, Resume::of(&hello));
    info!(peer = %peer.spiffe_id, cluster = %peer.cluster, locality = %peer.locality,
        role = role.label(), resume_from = kept.as_ref().map(|k| k.version),
        "peering session established");
    let mut session = Session {
        hub: &hub,
        peer,
        out: &out,
        sent: SentView::default(),
        bundle_revision: None,
        first_catalog: true,
    };
    session.serve(inbound, kept, stop).await
}

fn nack(version: u64, reason: &str, resync: bool) -> proto::PeerMessage {
    message(Kind::Nack(proto::Nack {
        version,
        reason: reason.to_owned(),
        resync,
    }))
}

impl Session<'_> {
    /// The established session: the catalog (a snapshot, or a delta from
    /// the `kept` view of an earlier session the peer still holds), then
    /// changes, renewals and the peer's messages until the end.
    async fn serve<S>(
        &mut self,
        mut inbound: S,
        kept: Option<SentView>,
        mut stop: watch::Receiver<bool>,
    ) -> SessionEnd
    where
        S: Stream<Item = Result<proto::PeerMessage, tonic::Status>> + Unpin,
    {
        let hub = self.hub;
        let mut exports = hub.exports();
        let current = exports.borrow_and_update().clone();
        let first = match kept {
            Some(kept) => {
                self.sent = kept;
                self.send_delta(&current, true).await
            }
            None => self.send_snapshot(&current).await,
        };
        if let Err(e) = first {
            return e;
        }
        if let Err(e) = self.send_bundle_if_changed().await {
            return e;
        }

        let mut renew = tokio::time::interval(hub.me().lease / 3);
        renew.tick().await;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => return end("shutdown", "", true),
                next = inbound.next() => match next {
                    None => return end("closed", "peer closed the stream", true),
                    Some(Err(status)) => return end("stream_error", status.to_string(), true),
                    Some(Ok(msg)) => {
                        last_heard = Instant::now();
                        hub.heard(&self.peer.spiffe_id);
                        if let Err(e) = self.handle(msg, &exports).await {
                            return e;
                        }
                    }
                },
                changed = exports.changed() => {
                    if changed.is_err() {
                        return end("shutdown", "hub gone", true);
                    }
                    let current = exports.borrow_and_update().clone();
                    if let Err(e) = self.send_delta(&current, false).await {
                        return e;
                    }
                }
                _ = renew.tick() => {
                    if last_heard.elapsed() > self.peer.lease {
                        return end("silent", format!(
                            "nothing heard for {} (the peer's lease)",
                            humantime::format_duration(self.peer.lease)), true);
                    }
                    let lease = u64::try_from(hub.me().lease.as_millis()).unwrap_or(u64::MAX);
                    if let Err(e) = self.send(Kind::Lease(proto::LeaseRenewal { lease_millis: lease })).await {
                        return e;
                    }
                    if let Err(e) = self.send_bundle_if_changed().await {
                        return e;
                    }
                }
            }
        }
    }

    async fn send(&self, kind: Kind) -> Result<(), SessionEnd> {
        self.send_message(message(kind)).await
    }

    async fn send_message(&self, msg: proto::PeerMessage) -> Result<(), SessionEnd> {
        self.out
            .send(msg)
            .await
            .map_err(|_| end("send_failed", "stream closed", true))
    }

    fn peer_id(&self) -> &str {
        self.peer.spiffe_id.as_str()
    }

    /// What `set` holds for this peer, after its export filter: the set's
    /// own map, shared, when the filter lets everything through.
    fn view(&self, set: &ExportSet) -> Arc<BTreeMap<ServiceKey, Export>> {
        let filter = self.hub.exports_for(&self.peer.spiffe_id);
        if filter == ServicePatterns::default() {
            return set.services.clone();
        }
        let view = set
            .services
            .iter()
            .filter(|(k, _)| filter.allows(k))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        Arc::new(view)
    }

    async fn send_snapshot(&mut self, set: &ExportSet) -> Result<(), SessionEnd> {
        let view = self.view(set);
        let cluster = &self.hub.me().cluster;
        let services = view
            .values()
            .map(|e| convert::export_to_proto(e, cluster))
            .collect();
        let snapshot = Kind::Snapshot(proto::CatalogSnapshot {
            version: set.version,
            services,
        });
        self.send_sync(snapshot, "snapshot", set.version, view)
            .await
    }

    /// Sends what changed since `self.sent`; nothing when nothing did,
    /// unless it `resume`s a session: then the peer learns that what it
    /// holds is current, and ACKs it.
    async fn send_delta(&mut self, set: &ExportSet, resume: bool) -> Result<(), SessionEnd> {
        let view = self.view(set);
        let cluster = &self.hub.me().cluster;
        let upserts: Vec<proto::ExportedService> = view
            .iter()
            .filter(|(k, e)| self.sent.services.get(*k) != Some(*e))
            .map(|(_, e)| convert::export_to_proto(e, cluster))
            .collect();
        let removals: Vec<proto::ServiceRef> = self
            .sent
            .services
            .keys()
            .filter(|k| !view.contains_key(*k))
            .map(|k| proto::ServiceRef {
                namespace: k.namespace.to_string(),
                name: k.name.to_string(),
            })
            .collect();
        let unchanged = upserts.is_empty() && removals.is_empty();
        if unchanged && !resume {
            return Ok(());
        }
        if !unchanged && set.version <= self.sent.version {
            // Other services under the same version (an export filter
            // changed while this set was read): a delta would be taken for
            // a duplicate.
            return self.send_snapshot(set).await;
        }
        let delta = Kind::Delta(proto::CatalogDelta {
            base_version: self.sent.version,
            version: set.version,
            upserts,
            removals,
        });
        let kind = if resume { "resume" } else { "delta" };
        self.send_sync(delta, kind, set.version, view).await
    }

    /// Sends `sync` (counted as a `kind`) and remembers `services` at
    /// `version` as what the peer now has.
    async fn send_sync(
        &mut self,
        sync: Kind,
        kind: &str,
        version: u64,
        services: Arc<BTreeMap<ServiceKey, Export>>,
    ) -> Result<(), SessionEnd> {
        let sync = message(sync);
        let bytes = sync.encoded_len();
        self.send_message(sync).await?;
        self.count_sync(kind, "sent", bytes);
        self.sent = SentView { version, services };
        // Kept in the hub at once, not when this session ends: the peer may
        // reconnect before this side notices the old connection is gone,
        // and the new session resumes from here.
        self.hub.keep_sent(&self.peer.spiffe_id, self.sent.clone());
        Ok(())
    }

    async fn send_bundle_if_changed(&mut self) -> Result<(), SessionEnd> {
        let Some((revision, bundle)) = self.hub.own_bundle() else {
            return Ok(());
        };
        if self.bundle_revision == Some(revision) {
            return Ok(());
        }
        self.send(Kind::TrustBundle(proto::TrustBundle {
            trust_domain: self.hub.me().spiffe_id.trust_domain_str().to_owned(),
            spiffe_bundle: bundle,
        }))
        .await?;
        self.bundle_revision = Some(revision);
        Ok(())
    }

    /// Counts a snapshot or delta of `bytes` (encoded).
    fn count_sync(&self, kind: &str, direction: &str, bytes: usize) {
        let labels = [self.peer_id(), kind, direction];
        let metrics = self.hub.metrics();
        metrics.syncs.with_label_values(&labels).inc();
        metrics
            .sync_bytes
            .with_label_values(&labels)
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Refuses (part of) message `version`, logging every problem.
    async fn refuse(
        &self,
        version: u64,
        what: &str,
        problems: &[String],
        resync: bool,
    ) -> Result<(), SessionEnd> {
        warn!(peer = %self.peer.spiffe_id, what, version, resync, problems = ?problems,
            "peering message refused (NACK)");
        let mut reason = problems
            .iter()
            .take(NACK_REASONS)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if problems.len() > NACK_REASONS {
            reason.push_str(&format!("; and {} more", problems.len() - NACK_REASONS));
        }
        self.hub.nacked(&self.peer.spiffe_id, true, &reason);
        self.send_message(nack(version, &format!("{what}: {reason}"), resync))
            .await
    }

    async fn ack_or_refuse(
        &self,
        version: u64,
        what: &str,
        bad: Vec<ConvertError>,
    ) -> Result<(), SessionEnd> {
        if bad.is_empty() {
            self.send(Kind::Ack(proto::Ack { version })).await
        } else {
            let problems: Vec<String> = bad.iter().map(ToString::to_string).collect();
            self.refuse(version, what, &problems, false).await
        }
    }

    /// Counts a received `kind` of `bytes` and converts its `services` (the
    /// message's `field`): the good exports, the first of each key, and what
    /// was wrong.
    fn received(
        &mut self,
        kind: &str,
        bytes: usize,
        services: &[proto::ExportedService],
        field: &str,
    ) -> (Vec<Export>, Vec<ConvertError>) {
        // A delta before any snapshot resumes what an earlier session sent.
        let kind = if kind == "delta" && self.first_catalog {
            "resume"
        } else {
            kind
        };
        self.first_catalog = false;
        self.count_sync(kind, "received", bytes);
        let (good, mut bad) =
            convert::exports_from_proto(services, field, &self.peer.cluster, self.hub.limits());
        let good = dedup(good, &mut bad, field);
        (good, bad)
    }

    async fn handle(
        &mut self,
        msg: proto::PeerMessage,
        exports: &watch::Receiver<ExportSet>,
    ) -> Result<(), SessionEnd> {
        let bytes = match &msg.kind {
            Some(Kind::Snapshot(_) | Kind::Delta(_)) => msg.encoded_len(),
            _ => 0,
        };
        match msg.kind {
            Some(Kind::Snapshot(s)) => {
                let (good, mut bad) = self.received("snapshot", bytes, &s.services, "services");
                debug!(peer = %self.peer.spiffe_id, version = s.version, services = good.len(), "snapshot received");
                let refused = self.hub.apply_snapshot(&self.peer, s.version, good);
                bad.extend(refused.into_iter().map(|r| r.error));
                self.ack_or_refuse(s.version, "snapshot", bad).await
            }
            Some(Kind::Delta(d)) => {
                let (good, mut bad) = self.received("delta", bytes, &d.upserts, "upserts");
                let mut removals = Vec::with_capacity(d.removals.len());
                for (i, r) in d.removals.iter().enumerate() {
                    match convert::service_key(&r.namespace, &r.name) {
                        Ok(k) => removals.push(k),
                        Err(e) => bad.push(ConvertError {
                            path: format!("removals[{i}].{}", e.path),
                            message: e.message,
                        }),
                    }
                }
                let (outcome, refused) =
                    self.hub
                        .apply_delta(&self.peer, d.base_version, d.version, good, removals);
                bad.extend(refused.into_iter().map(|r| r.error));
                match outcome {
                    DeltaOutcome::Applied | DeltaOutcome::Duplicate => {
                        self.ack_or_refuse(d.version, "delta", bad).await
                    }
                    DeltaOutcome::Resync(why) => {
                        self.refuse(d.version, "delta", &[why], true).await
                    }
                }
            }
            Some(Kind::Ack(a)) => {
                self.hub.acked(&self.peer.spiffe_id, a.version);
                Ok(())
            }
            Some(Kind::Nack(n)) => {
                warn!(peer = %self.peer.spiffe_id, version = n.version, resync = n.resync,
                    reason = %n.reason, "peer refused a message (NACK)");
                self.hub.nacked(&self.peer.spiffe_id, false, &n.reason);
                if n.resync {
                    let current = exports.borrow().clone();
                    self.send_snapshot(&current).await?;
                }
                Ok(())
            }
            Some(Kind::TrustBundle(b)) => {
                let result = self
                    .hub
                    .peer_bundle(&self.peer, &b.trust_domain, &b.spiffe_bundle);
                debug!(peer = %self.peer.spiffe_id, result = result.label(), "trust bundle received");
                Ok(())
            }
            Some(Kind::Lease(_)) => Ok(()),
            Some(Kind::Hello(_)) => {
                self.refuse(0, "hello", &["hello sent twice".to_owned()], false)
                    .await
            }
            None => {
                self.refuse(
                    0,
                    "message",
                    &["empty or unknown message kind".to_owned()],
                    false,
                )
                .await
            }
        }
    }
}

/// Drops a service listed twice in one message (the first one stays).
fn dedup(exports: Vec<Export>, bad: &mut Vec<ConvertError>, field: &str) -> Vec<Export> {
    let mut seen = std::collections::BTreeSet::new();
    exports
        .into_iter()
        .filter(|e| {
            let fresh = seen.insert(e.key.clone());
            if !fresh {
                bad.push(ConvertError {
                    path: field.to_owned(),
                    message: format!("{} is listed twice", e.key),
                });
            }
            fresh
        })
        .collect()
}
