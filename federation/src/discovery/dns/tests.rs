//! Against a real DNS server on 127.0.0.1: a hickory-server serving an
//! in-memory zone with one-second TTLs, changed while the source runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

use super::*;
use crate::catalog::{Export, Protocol, ServiceKey, ServicePort};
use crate::discovery::testing::{Published, sink};
use crate::discovery::{DiscoveryMetrics, SourceHandle};

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

struct TestDns {
    zone: Arc<Zone>,
    addr: SocketAddr,
    server: Server<Catalog>,
    serial: u32,
}

impl TestDns {
    /// A server for `example.internal.`; negative answers live 1 s.
    async fn start() -> Self {
        let origin = name("example.internal.");
        let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name("ns.example.internal."),
            name("admin.example.internal."),
            1,
            60,
            60,
            600,
            1,
        );
        assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 1, RData::SOA(soa)), 1));
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 4096);
        Self {
            zone,
            addr,
            server,
            serial: 1,
        }
    }

    async fn add(&mut self, owner: &str, rdata: RData) {
        self.serial += 1;
        assert!(
            self.zone
                .upsert(Record::from_rdata(name(owner), 1, rdata), self.serial)
                .await
        );
    }

    async fn remove(&mut self, owner: &str, kind: RecordType) {
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::from(name(owner)), kind));
    }
}

fn target(query: &str, records: DnsRecords) -> DnsTarget {
    DnsTarget {
        service: LocalService {
            export: Export {
                key: "payments/ledger".parse::<ServiceKey>().unwrap(),
                ports: vec![ServicePort {
                    port: 8080,
                    protocol: Protocol::Http,
                    name: None,
                }],
                export_time_millis: 0,
                headless: false,
                endpoints: Vec::new(),
                subsets: Vec::new(),
            },
            endpoints: Vec::new(),
            endpoint_info: Default::default(),
            subsets: Vec::new(),
            exported: true,
            allowed_callers: None,
            passthrough: false,
        },
        query: parse_query(query).unwrap(),
        records,
        cluster: "east".parse().unwrap(),
    }
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    v.sort();
    v
}

fn settings(dns: &TestDns) -> DnsSettings {
    DnsSettings {
        resolvers: vec![dns.addr],
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(300),
        timeout: Duration::from_millis(500),
    }
}

fn start(
    target: DnsTarget,
    settings: DnsSettings,
) -> (Published, DiscoveryMetrics, watch::Sender<bool>) {
    let (sink, published) = sink();
    let metrics = DiscoveryMetrics::new(&prometheus::Registry::new()).unwrap();
    let handle = SourceHandle::new("dns:payments/ledger", sink, metrics.clone());
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(run(target, settings, handle, stop));
    (published, metrics, stop_tx)
}

#[tokio::test]
async fn srv_targets_are_resolved_and_changes_are_seen_after_the_ttl() {
    let mut dns = TestDns::start().await;
    let srv = |prio, port, t: &str| RData::SRV(SRV::new(prio, 10, port, name(t)));
    dns.add(
        "_http._tcp.ledger.example.internal.",
        srv(10, 8080, "a.example.internal."),
    )
    .await;
    dns.add(
        "_http._tcp.ledger.example.internal.",
        srv(10, 8081, "b.example.internal."),
    )
    .await;
    // A backup (higher priority value) is not used while others are listed.
    dns.add(
        "_http._tcp.ledger.example.internal.",
        srv(20, 9999, "backup.example.internal."),
    )
    .await;
    dns.add("a.example.internal.", RData::A(A::new(127, 0, 0, 10)))
        .await;
    dns.add("b.example.internal.", RData::A(A::new(127, 0, 0, 11)))
        .await;
    dns.add(
        "b.example.internal.",
        RData::AAAA(AAAA::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11)),
    )
    .await;
    dns.add("backup.example.internal.", RData::A(A::new(127, 0, 0, 99)))
        .await;

    let (mut published, metrics, _stop) = start(
        target("_http._tcp.ledger.example.internal", DnsRecords::Srv),
        settings(&dns),
    );
    let first = published.next().await;
    assert_eq!(first.0, "dns:payments/ledger");
    assert_eq!(
        first.1[0].endpoints,
        addrs(&["127.0.0.10:8080", "127.0.0.11:8081", "[fd00::11]:8081"])
    );
    assert!(first.1[0].exported);

    // Move a target: the change shows once the 1 s TTL has run out.
    let changed_at = Instant::now();
    dns.remove("a.example.internal.", RecordType::A).await;
    dns.add("a.example.internal.", RData::A(A::new(127, 0, 0, 12)))
        .await;
    let next = published.next().await;
    let took = changed_at.elapsed();
    assert_eq!(
        next.1[0].endpoints,
        addrs(&["127.0.0.12:8080", "127.0.0.11:8081", "[fd00::11]:8081"])
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    eprintln!("DNS change picked up after {took:?} (TTL 1 s)");

    // The SRV records go away (NODATA): an answer, so no endpoints.
    dns.remove("_http._tcp.ledger.example.internal.", RecordType::SRV)
        .await;
    let gone = published.next().await;
    assert!(gone.1[0].endpoints.is_empty());
    assert_eq!(
        metrics
            .errors
            .with_label_values(&["dns:payments/ledger", "resolve"])
            .get(),
        0
    );

    // They come back, then the server dies: a failure, not an answer; the
    // last endpoints stay and the failure is counted.
    dns.add(
        "_http._tcp.ledger.example.internal.",
        srv(10, 8080, "a.example.internal."),
    )
    .await;
    let back = published.next().await;
    assert_eq!(back.1[0].endpoints, addrs(&["127.0.0.12:8080"]));
    dns.server.shutdown_gracefully().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics
        .errors
        .with_label_values(&["dns:payments/ledger", "resolve"])
        .get()
        == 0
    {
        assert!(Instant::now() < deadline, "the failure was never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    published.assert_quiet(Duration::from_millis(1500)).await;
    assert_eq!(
        metrics
            .endpoints
            .with_label_values(&["dns:payments/ledger"])
            .get(),
        1
    );
}

#[tokio::test]
async fn a_and_aaaa_records_get_the_configured_port_and_nxdomain_empties() {
    let mut dns = TestDns::start().await;
    dns.add("ledger.example.internal.", RData::A(A::new(127, 0, 0, 20)))
        .await;
    dns.add("ledger.example.internal.", RData::A(A::new(127, 0, 0, 21)))
        .await;
    dns.add(
        "ledger.example.internal.",
        RData::AAAA(AAAA::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x20)),
    )
    .await;
    let mut t = target("ledger.example.internal.", DnsRecords::Ip { port: 9000 });
    t.service.export.headless = true;
    let (mut published, _metrics, stop) = start(t, settings(&dns));
    let first = published.next().await;
    let service = &first.1[0];
    assert_eq!(
        service.endpoints,
        addrs(&["127.0.0.20:9000", "127.0.0.21:9000", "[fd00::20]:9000"])
    );
    // Headless: DNS publishes the addresses themselves.
    let headless: Vec<String> = service
        .export
        .endpoints
        .iter()
        .map(|e| format!("{}/{}", e.cluster, e.address))
        .collect();
    assert_eq!(
        headless,
        ["east/127.0.0.20", "east/127.0.0.21", "east/fd00::20"]
    );

    // The name is removed: NXDOMAIN is an answer; the endpoints go.
    dns.remove("ledger.example.internal.", RecordType::A).await;
    dns.remove("ledger.example.internal.", RecordType::AAAA)
        .await;
    let gone = published.next().await;
    assert!(gone.1[0].endpoints.is_empty());
    stop.send_replace(true);
}

#[test]
fn without_resolvers_resolv_conf_is_read_and_none_is_an_error() {
    let none = DnsSettings::default();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    assert!(nameservers(&none, &conf).is_empty());
    assert!(resolver(&nameservers(&none, &conf), Duration::from_secs(1)).is_err());
    std::fs::write(
        &conf,
        "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\nnameserver bogus\n",
    )
    .unwrap();
    let found = nameservers(&none, &conf);
    assert_eq!(
        found,
        vec![
            "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
            "[fe80::1]:53".parse().unwrap()
        ]
    );
    assert!(resolver(&found, Duration::from_secs(1)).is_ok());
    // Configured resolvers win over the file.
    let explicit = DnsSettings {
        resolvers: vec!["127.0.0.1:5353".parse().unwrap()],
        ..DnsSettings::default()
    };
    assert_eq!(nameservers(&explicit, &conf), explicit.resolvers);
}

#[test]
fn queries_are_made_absolute_and_ttls_clamped() {
    assert_eq!(
        parse_query("ledger.example.internal").unwrap(),
        "ledger.example.internal."
    );
    assert_eq!(parse_query("_http._tcp.x.").unwrap(), "_http._tcp.x.");
    assert!(parse_query("").is_err());
    assert!(parse_query(".").is_err());
    assert!(parse_query("a..b").is_err());
    let s = DnsSettings::default();
    assert_eq!(
        refresh_after(Some(Duration::ZERO), &s),
        Duration::from_secs(1)
    );
    assert_eq!(
        refresh_after(Some(Duration::from_secs(86400)), &s),
        Duration::from_secs(300)
    );
    assert_eq!(
        refresh_after(Some(Duration::from_secs(30)), &s),
        Duration::from_secs(30)
    );
    assert_eq!(refresh_after(None, &s), Duration::from_secs(1));
}
