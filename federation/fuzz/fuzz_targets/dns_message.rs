//! DNS packets come from anyone who can reach the DNS port: any bytes, over
//! UDP or TCP, get nothing, FORMERR or an answer, never a panic; an answer is
//! a well-formed response to the query's id that fits the UDP size limits.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType};
use isthmus_federation::catalog::{HeadlessEndpoint, Protocol, ServiceEntry, ServicePort};
use isthmus_federation::dns::server::{MAX_UDP_PAYLOAD, Step};
use isthmus_federation::dns::{
    Allocator, ClusterSetZone, DnsMetrics, DnsPolicy, DnsServer, IpRange, Transport, Unready,
    ZoneSettings,
};
use isthmus_federation::{Catalog, ServiceKey};
use libfuzzer_sys::fuzz_target;

/// shop/web with a clusterset IP and a named port, and a headless data/db
/// with a named endpoint.
fn server() -> &'static DnsServer {
    static SERVER: OnceLock<DnsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let entry = |key: &str, headless: bool| ServiceEntry {
            ports: vec![ServicePort {
                port: 8080,
                protocol: Protocol::Http,
                name: Some("http".parse().expect("port name")),
            }],
            headless,
            headless_endpoints: if headless {
                vec![HeadlessEndpoint {
                    cluster: "east".parse().expect("cluster"),
                    hostname: Some("db-0".parse().expect("hostname")),
                    address: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
                }]
            } else {
                vec![]
            },
            ..ServiceEntry::exported(key.parse().expect("key"))
        };
        let catalog = Catalog::new([entry("shop/web", false), entry("data/db", true)]);
        let v4: IpRange = "127.240.0.0/16".parse().expect("range");
        let v6: IpRange = "fd00:1::/112".parse().expect("range");
        let keys: Vec<ServiceKey> = vec!["shop/web".parse().expect("key")];
        let (allocations, _) = Allocator::open(v4, Some(v6), None)
            .expect("allocator")
            .sync(&keys);
        let zone = ClusterSetZone::build(
            &catalog,
            &allocations,
            &[v4, v6],
            ZoneSettings { ttl: 5, serial: 1 },
            &Unready::default(),
        );
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).expect("metrics");
        // No rate limit: every input reaches the answering code.
        let mut policy = DnsPolicy::default();
        policy.rate_limit.per_second = 0;
        DnsServer::new(Arc::new(ArcSwap::from_pointee(zone)), None, policy, metrics)
            .expect("server")
    })
}

fuzz_target!(|data: &[u8]| {
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5300);
    for transport in [Transport::Udp, Transport::Tcp] {
        match server().handle(data, src, transport) {
            Step::Drop => {}
            Step::Forward(_) => panic!("no upstreams: nothing is forwarded"),
            Step::Reply(bytes) => {
                if transport == Transport::Udp {
                    assert!(bytes.len() <= usize::from(MAX_UDP_PAYLOAD));
                }
                let reply = Message::from_vec(&bytes).expect("replies parse");
                assert_eq!(reply.metadata.message_type, MessageType::Response);
                assert_eq!(reply.metadata.id, u16::from_be_bytes([data[0], data[1]]));
            }
        }
    }
});
