//! Reconnects: a peer that still holds this gateway's catalog at a version
//! of this incarnation gets a delta from there (a "resume"), anything else a
//! snapshot. Real sessions (`session::run`) over in-memory streams.

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::peering::convert::Resume;
use crate::peering::proto::{self, peer_message::Kind};
use crate::peering::session::{self, Role, SessionEnd};

/// Gateways `a` and `b`, each granting the other, A exporting shop/web and
/// shop/cart, B shop/db.
fn pair() -> (Arc<Hub>, Arc<Hub>) {
    let a = PeerHello {
        east_west: Some(([127, 0, 0, 1], 15443).into()),
        ..hello("a", 11)
    };
    let b = PeerHello {
        east_west: Some(([127, 0, 0, 2], 15443).into()),
        ..hello("b", 22)
    };
    let hub_a = hub_as(a.clone(), PeeringLimits::default(), None);
    grant(&hub_a, &[&b], &[]);
    hub_a.set_source("config", vec![web(), service("shop/cart", 2)]);
    let hub_b = hub_as(b, PeeringLimits::default(), None);
    grant(&hub_b, &[&a], &[]);
    hub_b.set_source("config", vec![service("shop/db", 3)]);
    (hub_a, hub_b)
}

fn service(key: &str, host: u8) -> LocalService {
    local(key, ([127, 0, 1, host], 8080).into(), 0)
}

fn web() -> LocalService {
    service("shop/web", 1)
}

/// One session each way between two hubs, as over one connection.
struct Link {
    stop: watch::Sender<bool>,
    ends: [JoinHandle<SessionEnd>; 2],
}

fn link(a: &Arc<Hub>, b: &Arc<Hub>) -> Link {
    let (stop, stopped) = watch::channel(false);
    let (to_b, from_a) = mpsc::channel(64);
    let (to_a, from_b) = mpsc::channel(64);
    let side = |hub: &Arc<Hub>, role, peer: &Arc<Hub>, inbound, out| {
        tokio::spawn(session::run(
            hub.clone(),
            role,
            peer.me().spiffe_id.clone(),
            ReceiverStream::new(inbound).map(Ok),
            out,
            stopped.clone(),
        ))
    };
    Link {
        stop,
        ends: [
            side(a, Role::Client, b, from_b, to_b),
            side(b, Role::Server, a, from_a, to_a),
        ],
    }
}

impl Link {
    /// Ends both sessions; both processes stay.
    async fn cut(self) {
        self.stop.send(true).unwrap();
        for end in self.ends {
            end.await.unwrap();
        }
    }
}

fn syncs(hub: &Hub, peer: &Hub, kind: &str, direction: &str) -> u64 {
    hub.metrics()
        .syncs
        .with_label_values(&[peer.me().spiffe_id.as_str(), kind, direction])
        .get()
}

fn sync_bytes(hub: &Hub, peer: &Hub, kind: &str, direction: &str) -> u64 {
    hub.metrics()
        .sync_bytes
        .with_label_values(&[peer.me().spiffe_id.as_str(), kind, direction])
        .get()
}

/// What `to` holds of `from`'s exports, when synced: the version and the
/// services.
fn held(to: &Hub, from: &Hub) -> Option<(u64, Vec<String>)> {
    let inner = to.inner();
    let record = inner.peers.get(&from.me().spiffe_id)?;
    record.synced.then(|| {
        let keys = record.catalog.services.keys().map(ToString::to_string);
        (record.version, keys.collect())
    })
}

/// Waits until `to` holds exactly what `from` exports to it, at `from`'s
/// current version, and `from` has heard the ACK; returns the services.
async fn in_sync(from: &Hub, to: &Hub) -> Vec<String> {
    let expected = || {
        let set = from.exports().borrow().clone();
        let filter = from.exports_for(&to.me().spiffe_id);
        let keys = set.services.keys().filter(|k| filter.allows(k));
        (set.version, keys.map(ToString::to_string).collect())
    };
    let acked = || from.inner().peers.get(&to.me().spiffe_id).map(|r| r.acked);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let want: (u64, Vec<String>) = expected();
        if held(to, from).as_ref() == Some(&want) && acked() >= Some(want.0) {
            return want.1;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held {want:?} of {} (holds {:?}, acked {:?})",
            to.me().cluster,
            from.me().cluster,
            held(to, from),
            acked()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_reconnect_resends_only_what_changed_from_the_version_the_peer_holds() {
    let (a, b) = pair();
    let first = link(&a, &b);
    assert_eq!(in_sync(&a, &b).await, ["shop/cart", "shop/web"]);
    assert_eq!(in_sync(&b, &a).await, ["shop/db"]);
    first.cut().await;

    // Apart: A's lease lapses on B (its services still held), A withdraws
    // shop/cart, exports shop/new and stops showing shop/web to B. B
    // changes nothing.
    b.check_leases(Instant::now() + Duration::from_secs(1));
    assert_eq!(b.debug_peers().peers[0].state, LeaseState::Lapsed);
    a.set_source("config", vec![web(), service("shop/new", 4)]);
    let mut authority = (*a.authority()).clone();
    authority.default_exports = ServicePatterns::new(vec!["shop/new".into(), "shop/cart".into()]);
    a.set_authority(authority);

    let second = link(&a, &b);
    assert_eq!(in_sync(&a, &b).await, ["shop/new"]);
    assert_eq!(in_sync(&b, &a).await, ["shop/db"]);
    assert_eq!(b.debug_peers().peers[0].state, LeaseState::Live);
    for (from, to) in [(&a, &b), (&b, &a)] {
        assert_eq!(
            syncs(from, to, "snapshot", "sent"),
            1,
            "{}",
            from.me().cluster
        );
        assert_eq!(
            syncs(from, to, "resume", "sent"),
            1,
            "{}",
            from.me().cluster
        );
        assert_eq!(syncs(to, from, "resume", "received"), 1);
        assert_eq!(to.debug_peers().peers[0].nacks_received, 0);
        let sent = sync_bytes(from, to, "resume", "sent");
        assert_eq!(sync_bytes(to, from, "resume", "received"), sent);
        assert!(sent > 0 && sent < sync_bytes(from, to, "snapshot", "sent"));
    }
    second.cut().await;
}

/// A peer may reconnect before this side has noticed the old connection is
/// gone (its silence check runs at renewals): the new session resumes from
/// what the old one sent, not from a snapshot.
#[tokio::test]
async fn a_reconnect_before_the_old_session_ended_still_resumes() {
    let (a, b) = pair();
    let old = link(&a, &b);
    assert_eq!(in_sync(&a, &b).await, ["shop/cart", "shop/web"]);
    a.set_source("config", vec![web()]);
    assert_eq!(in_sync(&a, &b).await, ["shop/web"]);
    // The old sessions are still up when the new ones start.
    let new = link(&a, &b);
    // Until each new session has sent its first catalog message.
    let catalogs_sent = |from: &Hub, to: &Hub| {
        ["snapshot", "resume"]
            .map(|kind| syncs(from, to, kind, "sent"))
            .iter()
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while catalogs_sent(&a, &b) < 2 || catalogs_sent(&b, &a) < 2 {
        assert!(
            Instant::now() < deadline,
            "the new sessions sent no catalog"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(in_sync(&a, &b).await, ["shop/web"]);
    assert_eq!(
        syncs(&a, &b, "snapshot", "sent"),
        1,
        "one snapshot, the first"
    );
    assert_eq!(syncs(&a, &b, "resume", "sent"), 1);
    assert_eq!(syncs(&b, &a, "snapshot", "sent"), 1);
    assert_eq!(syncs(&b, &a, "resume", "sent"), 1);
    old.cut().await;
    new.cut().await;
}

#[tokio::test]
async fn an_expired_peer_and_a_restarted_gateway_get_snapshots() {
    let (a, b) = pair();
    let first = link(&a, &b);
    in_sync(&a, &b).await;
    first.cut().await;

    // A expired on B: B dropped its services, so it needs all of them.
    let now = Instant::now();
    b.check_leases(now + Duration::from_secs(1));
    b.check_leases(now + Duration::from_secs(40));
    assert_eq!(held(&b, &a), None);
    let second = link(&a, &b);
    assert_eq!(in_sync(&a, &b).await, ["shop/cart", "shop/web"]);
    assert_eq!(syncs(&a, &b, "snapshot", "sent"), 2);
    assert_eq!(syncs(&a, &b, "resume", "sent"), 0);
    second.cut().await;

    // A restarted: a new incarnation that never sent B anything. B, which
    // held the old one at some version, gets a snapshot.
    let restarted = hub_as(
        PeerHello {
            incarnation: 12,
            ..a.me().clone()
        },
        PeeringLimits::default(),
        None,
    );
    grant(&restarted, &[b.me()], &[]);
    restarted.set_source("config", vec![web()]);
    let third = link(&restarted, &b);
    assert_eq!(in_sync(&restarted, &b).await, ["shop/web"]);
    assert_eq!(syncs(&restarted, &b, "snapshot", "sent"), 1);
    assert_eq!(syncs(&restarted, &b, "resume", "sent"), 0);
    assert_eq!(syncs(&b, &a, "resume", "received"), 0);
    third.cut().await;
}

/// A peer played by hand against one real session of `hub`.
struct Scripted {
    to_hub: mpsc::Sender<proto::PeerMessage>,
    from_hub: mpsc::Receiver<proto::PeerMessage>,
    _stop: watch::Sender<bool>,
    end: JoinHandle<SessionEnd>,
}

impl Scripted {
    /// Opens a session with `hub` as `peer`, saying it holds `held` of
    /// `hub`'s catalog; returns it and `hub`'s hello.
    async fn open(hub: &Arc<Hub>, peer: &PeerHello, held: Option<Resume>) -> (Self, proto::Hello) {
        let (to_hub, inbound) = mpsc::channel(64);
        let (out, from_hub) = mpsc::channel(64);
        let (stop, stopped) = watch::channel(false);
        let end = tokio::spawn(session::run(
            hub.clone(),
            Role::Server,
            peer.spiffe_id.clone(),
            ReceiverStream::new(inbound).map(Ok),
            out,
            stopped,
        ));
        let mut hello = peer.to_proto();
        Resume::stamp(held, &mut hello);
        let mut scripted = Self {
            to_hub,
            from_hub,
            _stop: stop,
            end,
        };
        scripted.send(Kind::Hello(hello)).await;
        let Kind::Hello(theirs) = scripted.next().await else {
            panic!("no hello first");
        };
        (scripted, theirs)
    }

    async fn send(&self, kind: Kind) {
        let msg = proto::PeerMessage { kind: Some(kind) };
        self.to_hub.send(msg).await.unwrap();
    }

    /// The hub's next message other than a lease renewal.
    async fn next(&mut self) -> Kind {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.from_hub.recv())
                .await
                .expect("a message in time")
                .expect("the session goes on");
            match msg.kind.unwrap() {
                Kind::Lease(_) => {}
                kind => return kind,
            }
        }
    }

    /// Closes the stream; the session ends and leaves what it sent.
    async fn close(self) {
        drop(self.to_hub);
        self.end.await.unwrap();
    }
}

fn names(services: &[proto::ExportedService]) -> Vec<String> {
    services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

/// The sender side on the wire: which claims are resumed, and a resume the
/// peer cannot use (NACKed with resync) still ends in a snapshot.
#[tokio::test]
async fn only_a_version_this_incarnation_sent_is_resumed_and_a_nack_gets_a_snapshot() {
    let (a, b) = pair();
    let peer = b.me().clone();
    let incarnation = a.me().incarnation;

    // A first session: nothing held, a snapshot, ACKed. A holds nothing of
    // B yet, and says so.
    let (s, hello) = Scripted::open(&a, &peer, None).await;
    assert_eq!((hello.resume_incarnation, hello.resume_version), (0, 0));
    let mut s = s;
    let Kind::Snapshot(snapshot) = s.next().await else {
        panic!("not a snapshot");
    };
    let v1 = snapshot.version;
    assert_eq!(names(&snapshot.services), ["shop/cart", "shop/web"]);
    s.send(Kind::Ack(proto::Ack { version: v1 })).await;
    s.close().await;

    // Held at v1 of this incarnation: a delta from v1 with the change only.
    a.set_source(
        "config",
        vec![web(), service("shop/cart", 2), service("shop/new", 4)],
    );
    let v2 = a.exports().borrow().version;
    let held = Resume {
        incarnation,
        version: v1,
    };
    let (mut s, _) = Scripted::open(&a, &peer, Some(held)).await;
    let Kind::Delta(delta) = s.next().await else {
        panic!("not a resume");
    };
    assert_eq!((delta.base_version, delta.version), (v1, v2));
    assert_eq!(names(&delta.upserts), ["shop/new"]);
    assert!(delta.removals.is_empty());
    // The peer cannot use it after all: a snapshot follows.
    s.send(Kind::Nack(proto::Nack {
        version: v2,
        reason: "no snapshot of this incarnation yet".into(),
        resync: true,
    }))
    .await;
    let Kind::Snapshot(snapshot) = s.next().await else {
        panic!("not a snapshot after the NACK");
    };
    assert_eq!(snapshot.version, v2);
    assert_eq!(snapshot.services.len(), 3);
    s.close().await;

    // Held at v2, nothing changed since: an empty delta says it is current.
    let held = Resume {
        incarnation,
        version: v2,
    };
    let (mut s, _) = Scripted::open(&a, &peer, Some(held)).await;
    let Kind::Delta(delta) = s.next().await else {
        panic!("not a resume");
    };
    assert_eq!((delta.base_version, delta.version), (v2, v2));
    assert!(delta.upserts.is_empty() && delta.removals.is_empty());
    s.close().await;

    // A version A never sent, or another incarnation's: snapshots.
    for (incarnation, version) in [
        (incarnation, v2 + 5),
        (incarnation + 1, v2),
        (incarnation, v1),
    ] {
        let held = Resume {
            incarnation,
            version,
        };
        let (mut s, _) = Scripted::open(&a, &peer, Some(held)).await;
        assert!(
            matches!(s.next().await, Kind::Snapshot(_)),
            "{held:?} resumed"
        );
        s.close().await;
    }
    assert_eq!(syncs(&a, &b, "snapshot", "sent"), 5);
    assert_eq!(syncs(&a, &b, "resume", "sent"), 2);

    // Once A holds B's catalog, its hello says which version.
    let (mut s, _) = Scripted::open(&a, &peer, None).await;
    s.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 7,
        services: vec![],
    }))
    .await;
    assert!(matches!(s.next().await, Kind::Snapshot(_)));
    assert!(matches!(
        s.next().await,
        Kind::Ack(proto::Ack { version: 7 })
    ));
    let (other, hello) = Scripted::open(&a, &peer, None).await;
    assert_eq!(
        (hello.resume_incarnation, hello.resume_version),
        (peer.incarnation, 7)
    );
    other.close().await;
    s.close().await;
}
