//! Federation end to end: three gateways as real processes peer over mTLS
//! (`isthmus.federation.v1`); exports appear, disappear, resync and expire;
//! unknown trust domains and malformed messages are refused while everything
//! else goes on.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use isthmus_tests::mesh::{Mesh, peer, reload, remote_clusters, shop_service, web_service};
use isthmus_tests::netns::{self, Partition};
use isthmus_tests::{
    DevPki, EchoServer, Gateway, curl, metric_sum, metric_value, undocumented_metrics, wait_for,
};

#[test]
fn three_gateways_federate_withdraw_resync_and_expire() -> Result<()> {
    let mesh = Mesh::new(&["a", "b", "c"]);
    let web = EchoServer::start("web-in-a");
    let api = EchoServer::start("api-in-c");
    let api_service = shop_service("api", api.addr);
    let mut a = Gateway::start(&mesh.full_config(0, ""), mesh.members[0].admin, &[])?;
    let mut b = Gateway::start(&mesh.full_config(1, ""), mesh.members[1].admin, &[])?;
    let mut c = Gateway::start(
        &mesh.full_config(2, &api_service),
        mesh.members[2].admin,
        &[],
    )?;
    for gw in [&mut a, &mut b, &mut c] {
        gw.wait_ready(Duration::from_secs(20))?;
    }

    // Exported on A: on B and C within a second, and reachable by name.
    reload(&a, &mesh.full_config(0, &web_service(web.addr, true)))?;
    let exported = Instant::now();
    for gw in [&b, &c] {
        wait_for(Duration::from_secs(5), "shop/web on a peer", || {
            (remote_clusters(gw, "shop/web")? == ["gw-a-cluster"]).then_some(())
        })?;
    }
    let appeared = exported.elapsed();
    assert!(appeared < Duration::from_secs(1), "took {appeared:?}");
    let via_b = format!("http://{}/", mesh.members[1].outbound);
    let response = curl(&["-H", "Host: web.shop.svc.clusterset.local:8080", &via_b]);
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.body.contains("web-in-a"), "{}", response.body);
    let b_metrics = b.admin_get("/metrics").body;
    let series = format!(
        "isthmus_federation_syncs_total{{direction=\"received\",kind=\"delta\",peer=\"{}\"}}",
        mesh.members[0].spiffe_id()
    );
    assert!(
        metric_value(&b_metrics, &series).unwrap_or(0.0) >= 1.0,
        "{series}"
    );

    // Withdrawn: gone from both within a second; B answers 404 for it.
    reload(&a, &mesh.full_config(0, &web_service(web.addr, false)))?;
    let withdrawn = Instant::now();
    for gw in [&b, &c] {
        wait_for(Duration::from_secs(5), "shop/web withdrawn", || {
            remote_clusters(gw, "shop/web").is_none().then_some(())
        })?;
    }
    let disappeared = withdrawn.elapsed();
    assert!(disappeared < Duration::from_secs(1), "took {disappeared:?}");
    let gone = curl(&["-H", "Host: web.shop.svc.clusterset.local:8080", &via_b]);
    assert_eq!(gone.status, 404, "{gone:?}");

    // A restarted peer resyncs: a new incarnation, its exports back.
    reload(&a, &mesh.full_config(0, &web_service(web.addr, true)))?;
    wait_for(Duration::from_secs(5), "re-export", || {
        remote_clusters(&b, "shop/web").map(|_| ())
    })?;
    let before = peer(&b.admin_json("/debug/peers"), &mesh.members[0].spiffe_id())
        .context("A in B's peers")?["incarnation"]
        .clone();
    a.signal("TERM")?;
    a.wait_exit(Duration::from_secs(15))?;
    let mut a = Gateway::start(
        &mesh.full_config(0, &web_service(web.addr, true)),
        mesh.members[0].admin,
        &[],
    )?;
    a.wait_ready(Duration::from_secs(20))?;
    wait_for(Duration::from_secs(5), "B resynced with the new A", || {
        let peers = b.admin_json("/debug/peers");
        let p = peer(&peers, &mesh.members[0].spiffe_id())?;
        (p["incarnation"] != before && p["synced"] == true && p["state"] == "live").then_some(())
    })?;
    assert_eq!(
        remote_clusters(&b, "shop/web").context("shop/web after resync")?,
        ["gw-a-cluster"]
    );
    let again = curl(&["-H", "Host: web.shop.svc.clusterset.local:8080", &via_b]);
    assert_eq!(again.status, 200, "{again:?}");

    // A killed peer: lapsed after its lease, its services expire after the
    // grace period (1 s + 1 s here), and never linger beyond.
    assert!(remote_clusters(&b, "shop/api").is_some());
    c.signal("KILL")?;
    let killed = Instant::now();
    wait_for(Duration::from_secs(10), "C lapsed", || {
        let peers = b.admin_json("/debug/peers");
        (peer(&peers, &mesh.members[2].spiffe_id())?["state"] == "lapsed").then_some(())
    })?;
    let lapsed = killed.elapsed();
    wait_for(Duration::from_secs(10), "C's services expired", || {
        remote_clusters(&b, "shop/api").is_none().then_some(())
    })?;
    let expired = killed.elapsed();
    // Leases count from C's last renewal, which came up to a third of a lease
    // (333 ms) before the kill.
    assert!(
        lapsed >= Duration::from_millis(650),
        "lapsed after {lapsed:?}"
    );
    assert!(
        expired >= Duration::from_millis(1650) && expired < Duration::from_secs(5),
        "expired after {expired:?}"
    );
    eprintln!(
        "appeared {appeared:?}, withdrawn {disappeared:?}, lapsed {lapsed:?}, expired {expired:?}"
    );
    let peers = b.admin_json("/debug/peers");
    assert_eq!(
        peer(&peers, &mesh.members[2].spiffe_id()).unwrap()["state"],
        "expired"
    );
    let metrics = b.admin_get("/metrics").body;
    assert_eq!(
        metric_value(&metrics, "isthmus_federation_peers{state=\"expired\"}"),
        Some(1.0)
    );
    Ok(())
}

/// A request through two federated gateways is labelled, on both, with the
/// caller's cluster name (on the east-west side learnt from the peer's hello)
/// and, apart, its trust domain; a caller that is no known peer gateway is
/// `unknown`, never its trust domain.
#[test]
fn both_sides_label_requests_with_the_callers_cluster_and_trust_domain() -> Result<()> {
    let mesh = Mesh::new(&["a", "b"]);
    let web = EchoServer::start("web-in-a");
    let (ma, mb) = (&mesh.members[0], &mesh.members[1]);
    let mut a = Gateway::start(
        &mesh.full_config(0, &web_service(web.addr, true)),
        ma.admin,
        &[],
    )?;
    let mut b = Gateway::start(&mesh.full_config(1, ""), mb.admin, &[])?;
    for gw in [&mut a, &mut b] {
        gw.wait_ready(Duration::from_secs(20))?;
    }
    wait_for(Duration::from_secs(5), "shop/web on B", || {
        (remote_clusters(&b, "shop/web")? == ["gw-a-cluster"]).then_some(())
    })?;
    let host = "Host: web.shop.svc.clusterset.local:8080";
    let via_b = format!("http://{}/", mb.outbound);
    let r = curl(&["-H", host, "-H", "x-request-id: from-b", &via_b]);
    assert_eq!(r.status, 200, "{r:?}");

    let series = |listener: &str, cluster: &str| {
        format!(
            "isthmus_requests_total{{code=\"200\",destination_cluster=\"gw-a-cluster\",listener=\"{listener}\",namespace=\"shop\",service=\"web\",source_cluster=\"{cluster}\",source_trust_domain=\"b.example\"}}"
        )
    };
    let requests = |gw: &Gateway| -> String {
        let metrics = gw.admin_get("/metrics").body;
        let lines = metrics
            .lines()
            .filter(|l| l.starts_with("isthmus_requests_total"));
        lines.collect::<Vec<_>>().join("\n")
    };
    for (gw, listener) in [(&a, "east_west"), (&b, "outbound")] {
        let counted = requests(gw);
        assert_eq!(
            metric_value(&counted, &series(listener, "gw-b-cluster")),
            Some(1.0),
            "{counted}"
        );
    }
    for (gw, listener) in [(&b, "outbound"), (&a, "east_west")] {
        let line = &gw.access_lines(&["from-b"])?[0];
        assert_eq!(line["listener"], listener, "{line}");
        assert_eq!(line["source_cluster"], "gw-b-cluster", "{line}");
        assert_eq!(line["source_trust_domain"], "b.example", "{line}");
    }

    // A gateway of B's trust domain that is no peer of A's: A serves it
    // (its trust domain's gateways may call), and knows no cluster for it.
    let pki = DevPki::new();
    let stranger = pki.issue(
        &mb.ca,
        "spiffe://b.example/isthmus/gateway/stranger",
        "stranger",
    );
    let r = curl(&[
        "-k",
        "--cert",
        &stranger.join("svid.crt").to_string_lossy(),
        "--key",
        &stranger.join("svid.key").to_string_lossy(),
        "-H",
        host,
        "-H",
        "x-request-id: from-stranger",
        &format!("https://{}/", ma.east_west),
    ]);
    assert_eq!(r.status, 200, "{r:?}");
    let counted = requests(&a);
    assert_eq!(
        metric_value(&counted, &series("east_west", "unknown")),
        Some(1.0),
        "{counted}"
    );
    let line = &a.access_lines(&["from-stranger"])?[0];
    assert_eq!(line["source_cluster"], "unknown", "{line}");
    assert_eq!(line["source_trust_domain"], "b.example", "{line}");

    // Every label of every series either gateway exports is documented.
    for gw in [&a, &b] {
        let missing = undocumented_metrics(&gw.admin_get("/metrics").body);
        assert!(missing.is_empty(), "docs/metrics.md lacks:\n{missing:#?}");
    }
    Ok(())
}

#[test]
fn a_peer_of_an_unknown_trust_domain_is_refused() -> Result<()> {
    // A federates only with B; D (trust domain d.example) dials A anyway.
    let mesh = Mesh::new(&["a", "b", "d"]);
    let a_config = {
        // A's trust.federated lists B only.
        let full = mesh.config(0, &[], "");
        let d_bundle = format!(
            "[[trust.federated]]\ntrust_domain = \"d.example\"\nbundle = \"{}\"\n",
            mesh.members[2].ca.join("bundle.pem").display()
        );
        let d_accept = format!(
            "[[federation.accept]]\ntrust_domain = \"d.example\"\nclusters = [\"{}\"]\n",
            mesh.members[2].cluster()
        );
        full.replace(&d_bundle, "").replace(&d_accept, "")
    };
    assert!(!a_config.contains("d.example"));
    let mut a = Gateway::start(&a_config, mesh.members[0].admin, &[])?;
    a.wait_ready(Duration::from_secs(20))?;
    let d = Gateway::start(&mesh.config(2, &[0], ""), mesh.members[2].admin, &[])?;
    d.wait_log("peering session ended", Duration::from_secs(10))?;
    a.wait_log("federation handshake refused", Duration::from_secs(10))?;
    let peers = a.admin_json("/debug/peers");
    assert!(
        peer(&peers, &mesh.members[2].spiffe_id()).is_none(),
        "{peers}"
    );
    let d_peers = d.admin_json("/debug/peers");
    assert!(d_peers["peers"].as_array().unwrap().is_empty(), "{d_peers}");
    // D never syncs, so it stays unready until its grace period is over.
    assert_eq!(d.admin_get("/readyz").status, 503);
    Ok(())
}

/// A session that breaks while both gateways keep running resumes: B holds
/// A's catalog at some version, so after a partition longer than the lease
/// (the sessions end) A sends B a delta of what it changed meanwhile, not
/// its 100-service snapshot again.
#[test]
fn a_reconnect_after_a_partition_resends_only_what_changed() {
    netns::run_isolated(
        "resync",
        "a_reconnect_after_a_partition_resends_only_what_changed",
        || reconnect_after_partition().unwrap(),
    );
}

fn reconnect_after_partition() -> Result<()> {
    let mut mesh = Mesh::new(&["a", "b"]);
    // Leases end the sessions within a second or so; a long grace keeps A's
    // services on B meanwhile.
    mesh.leases = Some(("1s", "60s"));
    let (am, bm) = (&mesh.members[0], &mesh.members[1]);
    let upstream = EchoServer::start("svc-in-a");
    let services = |n: usize| -> String {
        (0..n)
            .map(|i| shop_service(&format!("svc-{i:03}"), upstream.addr))
            .collect()
    };
    // A dials no one: B's dials reach A's federation port, which the
    // partition catches in both directions.
    let mut a = Gateway::start(&mesh.config(0, &[], &services(100)), am.admin, &[])?;
    let mut b = Gateway::start(&mesh.config(1, &[0], ""), bm.admin, &[])?;
    a.wait_ready(Duration::from_secs(20))?;
    b.wait_ready(Duration::from_secs(20))?;
    let held = |n: usize| {
        let peers = b.admin_json("/debug/peers");
        let p = peer(&peers, &am.spiffe_id())?;
        (p["synced"] == true && p["services"].as_array()?.len() == n).then_some(())
    };
    wait_for(Duration::from_secs(10), "B holds A's 100 services", || {
        held(100)
    })?;
    // What A sent B so far, by kind: (messages, bytes).
    let sent = |kind: &str| {
        let metrics = a.admin_get("/metrics").body;
        let labels = [
            ("peer", bm.spiffe_id()),
            ("kind", kind.into()),
            ("direction", "sent".into()),
        ];
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        (
            metric_sum(&metrics, "isthmus_federation_syncs_total", &labels),
            metric_sum(&metrics, "isthmus_federation_sync_bytes_total", &labels),
        )
    };
    let (snapshots, snapshot_bytes) = sent("snapshot");
    assert_eq!(snapshots, 1.0);
    let up = |gw: &Gateway, peer: &str| {
        metric_sum(
            &gw.admin_get("/metrics").body,
            "isthmus_federation_peer_up",
            &[("peer", peer)],
        )
    };

    // Partitioned past the lease: both sessions end, both processes stay.
    let mut partition = Partition::drop_tcp_ports("isthmus_resync", &[am.federation.port()])?;
    wait_for(Duration::from_secs(10), "the sessions ended", || {
        (up(&a, &bm.spiffe_id()) == 0.0 && up(&b, &am.spiffe_id()) == 0.0).then_some(())
    })?;
    // Meanwhile A exports one more service.
    reload(&a, &mesh.config(0, &[], &services(101)))?;
    wait_for(Duration::from_secs(5), "A exports 101", || {
        let metrics = a.admin_get("/metrics").body;
        (metric_value(&metrics, "isthmus_catalog_exported_services") == Some(101.0)).then_some(())
    })?;
    wait_for(Duration::from_secs(5), "A lapsed on B", || {
        let peers = b.admin_json("/debug/peers");
        (peer(&peers, &am.spiffe_id())?["state"] == "lapsed").then_some(())
    })?;
    partition.heal()?;

    wait_for(Duration::from_secs(20), "B holds A's 101 services", || {
        held(101)
    })?;
    wait_for(Duration::from_secs(5), "B's resume ACKed", || {
        let (on_a, on_b) = (a.admin_json("/debug/peers"), b.admin_json("/debug/peers"));
        let version = &peer(&on_b, &am.spiffe_id())?["version"];
        (&peer(&on_a, &bm.spiffe_id())?["acked_by_peer"] == version).then_some(())
    })?;
    let (resumes, resume_bytes) = sent("resume");
    assert_eq!(sent("snapshot").0, 1.0, "a snapshot again");
    assert!(resumes >= 1.0, "no resume");
    let b_metrics = b.admin_get("/metrics").body;
    let received = |kind: &str| {
        metric_sum(
            &b_metrics,
            "isthmus_federation_sync_bytes_total",
            &[
                ("peer", &am.spiffe_id()),
                ("kind", kind),
                ("direction", "received"),
            ],
        )
    };
    assert_eq!(received("resume"), resume_bytes);
    assert_eq!(received("snapshot"), snapshot_bytes);
    eprintln!(
        "snapshot of 100 services: {snapshot_bytes} bytes; resume after one more: {resume_bytes} bytes"
    );
    assert!(
        resume_bytes * 20.0 < snapshot_bytes,
        "resume {resume_bytes} bytes vs snapshot {snapshot_bytes}"
    );
    assert_eq!(
        remote_clusters(&b, "shop/svc-100").context("the new service on B")?,
        [am.cluster()]
    );
    Ok(())
}

mod malformed {
    //! A hand-driven peer (the real protocol client, real mTLS) sends bad
    //! messages to a real gateway.
    use super::*;
    use isthmus_federation::peering::proto::{self, peer_message::Kind};
    use isthmus_tests::rogue::{RoguePeer, hello, service};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_malformed_message_is_nacked_and_logged_while_the_stream_goes_on() -> Result<()> {
        let mesh = Mesh::new(&["a", "b"]);
        let (am, bm) = (&mesh.members[0], &mesh.members[1]);
        let mut a = Gateway::start(&mesh.config(0, &[], ""), am.admin, &[])?;
        tokio::task::block_in_place(|| a.wait_ready(Duration::from_secs(20)))?;
        let cluster = bm.cluster();
        let mut b =
            RoguePeer::connect(am, &bm.tls, hello(bm, &cluster, &bm.east_west.to_string())).await?;

        // One bad service among good ones: the good one is used, the bad one
        // NACKed with its field named.
        b.send(Kind::Snapshot(proto::CatalogSnapshot {
            version: 1,
            services: vec![
                service("Bad!", "x", &cluster, 1),
                service("shop", "ok", &cluster, 1),
            ],
        }))
        .await?;
        let Kind::Nack(nack) = b.verdict().await? else {
            panic!("expected a NACK");
        };
        assert!(
            nack.reason.contains("services[0].namespace"),
            "{}",
            nack.reason
        );
        assert!(!nack.resync);
        let a_ref = &a;
        let catalog_has = |svc: &str| {
            let catalog = a_ref.admin_json("/debug/catalog");
            catalog["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|e| e["service"] == svc))
        };
        tokio::task::block_in_place(|| {
            wait_for(Duration::from_secs(5), "shop/ok in A's catalog", || {
                catalog_has("shop/ok").then_some(())
            })
        })?;

        // A delta that does not apply: NACK asking for a resync.
        b.send(Kind::Delta(proto::CatalogDelta {
            base_version: 5,
            version: 6,
            upserts: vec![],
            removals: vec![],
        }))
        .await?;
        let Kind::Nack(nack) = b.verdict().await? else {
            panic!("expected a NACK");
        };
        assert!(nack.resync, "{nack:?}");

        // An empty message, then a good delta: the stream goes on.
        b.send_raw(proto::PeerMessage { kind: None }).await?;
        assert!(matches!(b.verdict().await?, Kind::Nack(_)));
        b.send(Kind::Delta(proto::CatalogDelta {
            base_version: 1,
            version: 2,
            upserts: vec![service("shop", "more", &cluster, 1)],
            removals: vec![proto::ServiceRef {
                namespace: "shop".into(),
                name: "ok".into(),
            }],
        }))
        .await?;
        let Kind::Ack(ack) = b.verdict().await? else {
            panic!("expected an ACK");
        };
        assert_eq!(ack.version, 2);
        tokio::task::block_in_place(|| {
            wait_for(Duration::from_secs(5), "the delta applied", || {
                (catalog_has("shop/more") && !catalog_has("shop/ok")).then_some(())
            })
        })?;
        assert!(a.log().contains("peering message refused (NACK)"));
        let metrics = a.admin_get("/metrics").body;
        let series = format!(
            "isthmus_federation_nacks_total{{direction=\"sent\",peer=\"{}\"}}",
            bm.spiffe_id()
        );
        assert_eq!(metric_value(&metrics, &series), Some(3.0), "{series}");
        Ok(())
    }
}
