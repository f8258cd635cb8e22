//! Attacks by an authenticated peer. Gateway V (the victim) peers with L, a
//! real gateway that exports `shop/web`, and grants M (the attacker) its own
//! cluster `gw-m-cluster`, locality `test` and imports `m-ns/*`. M is driven
//! by hand over real mTLS with its legitimately issued SVID
//! ([`RoguePeer`]). Each test makes one attack, asserts the refusal (NACK,
//! metric, what V serves) and that a client of V kept being served through
//! it all: a steady load on V's outbound listener to `shop/web` in L.

use std::time::Duration;

use anyhow::Result;
use isthmus_federation::peering::proto::{self, peer_message::Kind};
use isthmus_tests::load::{Load, LoadSpec};
use isthmus_tests::mesh::{Mesh, remote_clusters, shop_service, web_service};
use isthmus_tests::rogue::{RoguePeer, hello, service};
use isthmus_tests::{DevPki, EchoServer, Gateway, curl, free_addr, metric_value, wait_for};

const START: Duration = Duration::from_secs(20);
/// Where shop/web is asked for through V.
const WEB: &str = "web.shop.svc.clusterset.local:8080";

/// V, L and the load; M is `mesh.members[2]`, never started as a gateway.
struct Arena {
    mesh: Mesh,
    v: Gateway,
    _l: Gateway,
    _web: EchoServer,
    local: EchoServer,
    load: Load,
}

impl Arena {
    /// V's configuration passes through `tweak` first.
    fn start(tweak: impl Fn(String) -> String) -> Result<Self> {
        let mesh = Mesh::new(&["v", "l", "m"]);
        let web = EchoServer::start("web-in-l");
        let local = EchoServer::start("local-in-v");
        let local_service = shop_service("local", local.addr);
        // V grants M only what a tenant of its own namespace needs.
        let v_config = tweak(mesh.config(0, &[1, 2], &local_service).replace(
            &format!("clusters = [\"{}\"]\n", mesh.members[2].cluster()),
            &format!(
                "clusters = [\"{}\"]\nlocalities = [\"test\"]\nimport = [\"m-ns/*\"]\n",
                mesh.members[2].cluster()
            ),
        ));
        let mut v = Gateway::start(&v_config, mesh.members[0].admin, &[])?;
        let mut l = Gateway::start(
            &mesh.config(1, &[0], &web_service(web.addr, true)),
            mesh.members[1].admin,
            &[],
        )?;
        v.wait_ready(START)?;
        l.wait_ready(START)?;
        wait_for(Duration::from_secs(10), "shop/web from L on V", || {
            (remote_clusters(&v, "shop/web")? == ["gw-l-cluster"]).then_some(())
        })?;
        let load = Load::start(LoadSpec {
            rate: 50.0,
            connections: 4,
            ..LoadSpec::new(mesh.members[0].outbound, WEB)
        });
        Ok(Self {
            mesh,
            v,
            _l: l,
            _web: web,
            local,
            load,
        })
    }

    /// M, connected to V with its real SVID and `hello`.
    async fn m(&self, hello: proto::Hello) -> Result<RoguePeer> {
        let m = &self.mesh.members[2];
        RoguePeer::connect(&self.mesh.members[0], &m.tls, hello).await
    }

    /// M's honest hello.
    fn m_hello(&self) -> proto::Hello {
        let m = &self.mesh.members[2];
        hello(m, &m.cluster(), &m.east_west.to_string())
    }

    fn metric(&self, series: &str) -> f64 {
        metric_value(&self.v.admin_get("/metrics").body, series).unwrap_or(0.0)
    }

    fn catalog_entry(&self, service: &str) -> Option<serde_json::Value> {
        let catalog = self.v.admin_json("/debug/catalog");
        catalog["services"]
            .as_array()?
            .iter()
            .find(|s| s["service"] == service)
            .cloned()
    }

    /// Stops the load once it has sent at least 50 requests (across the
    /// attack and after it): every request through V was answered by L.
    fn legitimate_traffic_never_failed(self) {
        let _ = wait_for(Duration::from_secs(10), "50 requests through V", || {
            (self.load.snapshot().total() >= 50).then_some(())
        });
        let report = self.load.stop();
        assert!(report.total() >= 50, "{}", report.summary());
        assert!(report.failures().is_empty(), "{}", report.summary());
        assert_eq!(
            report
                .buckets()
                .iter()
                .map(|b| b.share("web-in-l"))
                .fold(1.0, f64::min),
            1.0,
            "{}",
            report.summary()
        );
    }
}

fn refused(arena: &Arena, reason: &str) -> f64 {
    arena.metric(&format!(
        "isthmus_federation_refused_total{{reason=\"{reason}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_bundle_with_a_rogue_ca_is_refused_and_the_rogue_ca_never_authenticates()
-> Result<()> {
    let arena = tokio::task::block_in_place(|| Arena::start(|c| c))?;
    let m = &arena.mesh.members[2];
    // M's key is stolen; the thief makes its own CA for m.example and pushes
    // a bundle with both roots, as M.
    let rogue_pki = DevPki::new();
    let rogue_ca = rogue_pki.ca("rogue-ca", &m.td());
    let rogue_tls = rogue_pki.issue(&rogue_ca, &m.spiffe_id(), "rogue-tls");
    let both = {
        let keys = |dir: &std::path::Path| -> Result<Vec<serde_json::Value>> {
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("bundle.json"))?)?;
            Ok(doc["keys"].as_array().cloned().unwrap_or_default())
        };
        let mut all = keys(&m.ca)?;
        all.extend(keys(&rogue_ca)?);
        serde_json::json!({ "keys": all, "spiffe_sequence": 99 }).to_string()
    };
    let mut peer = arena.m(arena.m_hello()).await?;
    peer.send(Kind::TrustBundle(proto::TrustBundle {
        trust_domain: m.td(),
        spiffe_bundle: both.into_bytes(),
    }))
    .await?;
    // A bundle for another trust domain (L's) is refused too.
    peer.send(Kind::TrustBundle(proto::TrustBundle {
        trust_domain: arena.mesh.members[1].td(),
        spiffe_bundle: b"{}".to_vec(),
    }))
    .await?;
    // A snapshot after them: once it is ACKed, the bundles were handled.
    peer.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 1,
        services: vec![],
    }))
    .await?;
    assert!(matches!(peer.verdict().await?, Kind::Ack(_)));
    let series = |result: &str, td: &str| {
        format!(
            "isthmus_federation_trust_bundles_total{{result=\"{result}\",trust_domain=\"{td}\"}}"
        )
    };
    assert_eq!(arena.metric(&series("not_opted_in", &m.td())), 1.0);
    assert_eq!(arena.metric(&series("other_trust_domain", &m.td())), 1.0);
    let trust = arena.v.admin_json("/debug/trust");
    let domain = trust["trust_domains"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["trust_domain"] == m.td()))
        .cloned()
        .expect("m.example in /debug/trust");
    assert_eq!(
        domain["authorities"].as_array().map(Vec::len),
        Some(1),
        "{domain}"
    );
    assert!(domain["source"].get("file").is_some(), "{domain}");

    // The rogue CA's certificate for M's own ID does not get through V's
    // east-west listener; M's real one does (so the check can fail).
    let east_west = arena.mesh.members[0].east_west;
    let sni = "outbound_.80_._.local.shop.svc.cluster.local";
    let ask = |tls: &std::path::Path| {
        curl(&[
            "-k",
            "-H",
            "Host: local.shop.svc.clusterset.local:80",
            "--cert",
            tls.join("svid.crt").to_str().unwrap_or_default(),
            "--key",
            tls.join("svid.key").to_str().unwrap_or_default(),
            "--resolve",
            &format!("{sni}:{}:127.0.0.1", east_west.port()),
            &format!("https://{sni}:{}/", east_west.port()),
        ])
    };
    let real = tokio::task::block_in_place(|| ask(&m.tls));
    assert_eq!(real.status, 200, "{real:?}");
    assert!(real.body.contains("local-in-v"), "{}", real.body);
    let rogue = tokio::task::block_in_place(|| ask(&rogue_tls));
    assert_ne!(rogue.status, 200, "{rogue:?}");
    drop(peer);
    tokio::task::block_in_place(|| arena.legitimate_traffic_never_failed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_and_locality_spoofing_and_address_theft_are_refused_at_hello() -> Result<()> {
    let arena = tokio::task::block_in_place(|| Arena::start(|c| c))?;
    let m = &arena.mesh.members[2];
    let l = &arena.mesh.members[1];
    let cases = [
        // L's cluster, to take over its services.
        (hello(m, &l.cluster(), &m.east_west.to_string()), "cluster"),
        // A region it was not granted, to pass for a nearer gateway.
        (
            proto::Hello {
                locality: Some(proto::Locality {
                    region: "elsewhere".into(),
                    ..Default::default()
                }),
                ..arena.m_hello()
            },
            "locality",
        ),
        // L's east-west address: L's failures would be cut as M's.
        (hello(m, &m.cluster(), &l.east_west.to_string()), "address"),
        // A local endpoint's address on V.
        (
            hello(m, &m.cluster(), &arena.local.addr.to_string()),
            "address",
        ),
    ];
    for (i, (spoof, reason)) in cases.into_iter().enumerate() {
        let mut peer = arena.m(spoof).await?;
        let nacks = peer.nacks_until_closed().await?;
        assert!(
            nacks.iter().any(|n| n.reason.starts_with("hello refused")),
            "case {i}: {nacks:?}"
        );
        assert!(refused(&arena, reason) >= 1.0, "case {i}: {reason}");
    }
    let peers = arena.v.admin_json("/debug/peers");
    let m_record = peers["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["spiffe_id"] == m.spiffe_id()));
    assert!(
        m_record.is_none(),
        "a refused hello leaves no record: {peers}"
    );
    // L's services still come from L only.
    assert_eq!(
        remote_clusters(&arena.v, "shop/web"),
        Some(vec!["gw-l-cluster".to_owned()])
    );
    // M's honest hello is accepted.
    let mut peer = arena.m(arena.m_hello()).await?;
    peer.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 1,
        services: vec![],
    }))
    .await?;
    assert!(matches!(peer.verdict().await?, Kind::Ack(_)));
    tokio::task::block_in_place(|| arena.legitimate_traffic_never_failed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorised_imports_forged_export_times_and_redefinitions_are_refused() -> Result<()> {
    let arena = tokio::task::block_in_place(|| Arena::start(|c| c))?;
    let m = &arena.mesh.members[2];
    let mut peer = arena.m(arena.m_hello()).await?;
    let cluster = m.cluster();
    // shop/web is L's: outside M's imports, as is kube-system; m-ns/api is
    // its own, claimed as exported in 1970 to win every conflict.
    let mut redefined_local = service("shop", "local", &cluster, 1);
    redefined_local.headless = true;
    redefined_local.endpoints = vec![proto::Endpoint {
        hostname: String::new(),
        address: "127.66.66.66".into(),
    }];
    peer.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 1,
        services: vec![
            service("shop", "web", &cluster, 1),
            service("kube-system", "dns", &cluster, 1),
            redefined_local,
            service("m-ns", "api", &cluster, 1),
        ],
    }))
    .await?;
    let Kind::Nack(nack) = peer.verdict().await? else {
        panic!("expected a NACK");
    };
    for refused_export in ["shop/web", "kube-system/dns", "shop/local"] {
        assert!(nack.reason.contains(refused_export), "{}", nack.reason);
    }
    assert!(!nack.resync);
    assert_eq!(refused(&arena, "import"), 3.0);
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(5), "m-ns/api in V's catalog", || {
            arena.catalog_entry("m-ns/api")
        })
    })?;
    assert_eq!(
        remote_clusters(&arena.v, "shop/web"),
        Some(vec!["gw-l-cluster".to_owned()])
    );
    assert!(arena.catalog_entry("kube-system/dns").is_none());
    let local = arena.catalog_entry("shop/local").expect("shop/local");
    assert_eq!(local["headless"], false, "{local}");
    assert_eq!(local["remote"].as_array().map(Vec::len), Some(0), "{local}");
    // The forged time was clamped to when V first saw the export.
    let peers = arena.v.admin_json("/debug/peers");
    let m_record = peers["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["spiffe_id"] == m.spiffe_id()))
        .cloned()
        .expect("M's record");
    assert_eq!(m_record["refused_exports_total"], 3, "{m_record}");
    assert!(
        m_record["refused_exports"]["shop/web"].is_string(),
        "{m_record}"
    );
    drop(peer);
    tokio::task::block_in_place(|| arena.legitimate_traffic_never_failed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_export_time_does_not_win_a_conflict() -> Result<()> {
    // L exports shop/web as HTTP; M (granted shop/web for this test) says it
    // is gRPC and was exported in 1970. V saw L's first, so L's wins.
    let arena = tokio::task::block_in_place(|| {
        Arena::start(|c| {
            c.replace(
                "import = [\"m-ns/*\"]",
                "import = [\"m-ns/*\", \"shop/web\"]",
            )
        })
    })?;
    let m = &arena.mesh.members[2];
    let mut peer = arena.m(arena.m_hello()).await?;
    let mut forged = service("shop", "web", &m.cluster(), 1);
    forged.ports[0].port = 8080;
    forged.ports[0].protocol = "grpc".into();
    peer.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 1,
        services: vec![forged],
    }))
    .await?;
    assert!(matches!(peer.verdict().await?, Kind::Ack(_)));
    let entry = tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(5),
            "M among shop/web's clusters",
            || {
                let entry = arena.catalog_entry("shop/web")?;
                (entry["remote"].as_array()?.len() == 2).then_some(entry)
            },
        )
    })?;
    let port = &entry["ports"][0];
    assert_eq!(port["protocol"], "http", "{entry}");
    let catalog = arena.v.admin_json("/debug/catalog");
    let conflict = catalog["conflicts"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["service"]["namespace"] == "shop" && c["service"]["name"] == "web")
        })
        .cloned()
        .expect("the conflict is reported");
    assert_eq!(conflict["chosen_from"], "gw-l-cluster", "{conflict}");
    drop(peer);
    tokio::task::block_in_place(|| arena.legitimate_traffic_never_failed());
    Ok(())
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5000_port_export_and_an_oversized_message_are_refused_with_fds_bounded() -> Result<()> {
    // With clusterset listeners on, every port of every federated service
    // would be a listening socket on V.
    let dns = free_addr();
    let arena = tokio::task::block_in_place(|| {
        Arena::start(|c| {
            format!("{c}[dns]\nlisten = \"{dns}\"\nclusterset_ipv4_range = \"127.243.0.0/24\"\n")
        })
    })?;
    let m = &arena.mesh.members[2];
    let fds_before = open_fds(arena.v.pid());
    let mut peer = arena.m(arena.m_hello()).await?;
    let mut wide = service("m-ns", "wide", &m.cluster(), 1);
    wide.ports = (1..=5000)
        .map(|port| proto::ServicePort {
            port,
            protocol: "tcp".into(),
            name: String::new(),
        })
        .collect();
    peer.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 1,
        services: vec![wide, service("m-ns", "api", &m.cluster(), 1)],
    }))
    .await?;
    let Kind::Nack(nack) = peer.verdict().await? else {
        panic!("expected a NACK");
    };
    assert!(
        nack.reason
            .contains("services[0].ports: 5000 ports; at most 128"),
        "{}",
        nack.reason
    );
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(5), "m-ns/api in V's catalog", || {
            arena.catalog_entry("m-ns/api")
        })
    })?;
    assert!(arena.catalog_entry("m-ns/wide").is_none());
    let fds_after = open_fds(arena.v.pid());
    assert!(
        fds_after < fds_before + 40,
        "V's open files went from {fds_before} to {fds_after}"
    );

    // A message over the 4 MiB cap ends the stream; V goes on.
    let huge = (0..120_000)
        .map(|i| service("m-ns", &format!("svc-{i}"), &m.cluster(), 1))
        .collect();
    peer.send(Kind::Snapshot(proto::CatalogSnapshot {
        version: 2,
        services: huge,
    }))
    .await?;
    assert!(peer.verdict().await.is_err(), "the stream ends");
    assert!(arena.catalog_entry("m-ns/svc-0").is_none());
    tokio::task::block_in_place(|| arena.legitimate_traffic_never_failed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_listener_refuses_workload_svids_of_an_allowed_trust_domain() -> Result<()> {
    // V lets workloads of L's trust domain call it east-west; that must not
    // let them onto its federation listener.
    let arena = tokio::task::block_in_place(|| {
        Arena::start(|c| {
            c.replacen(
                "[listeners]",
                "[trust]\nallow_trust_domains = [\"l.example\", \"m.example\"]\n[listeners]",
                1,
            )
        })
    })?;
    let l = &arena.mesh.members[1];
    let pki = DevPki::new();
    let workload = pki.issue(&l.ca, "spiffe://l.example/ns/shop/sa/web", "workload");
    let attempt = RoguePeer::connect(
        &arena.mesh.members[0],
        &workload,
        hello(l, &l.cluster(), &l.east_west.to_string()),
    )
    .await;
    let refused_at_tls = match attempt {
        Err(_) => true,
        Ok(mut peer) => peer.verdict().await.is_err(),
    };
    assert!(
        refused_at_tls,
        "a workload SVID completed a federation session"
    );
    let unauthorized =
        arena.metric("isthmus_tls_handshakes_total{result=\"unauthorized\",side=\"server\"}");
    assert!(unauthorized >= 1.0, "counted as unauthorized");
    tokio::task::block_in_place(|| arena.legitimate_traffic_never_failed());
    Ok(())
}
