//! The `clusterset.local` zone, built from a catalog snapshot per the
//! Kubernetes Multi-Cluster Services DNS specification 1.0.0.
//!
//! | name | records |
//! | --- | --- |
//! | `dns-version.clusterset.local` | TXT `"1.0.0"` |
//! | `<svc>.<ns>.svc.clusterset.local` | A/AAAA: the clusterset IP, or every endpoint of a headless service |
//! | `_<port>._tcp.<svc>.<ns>.svc.clusterset.local` | SRV for each named port |
//! | `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` | A/AAAA of one headless endpoint |
//! | reverse names of clusterset IPs (and named endpoints inside the clusterset ranges) | PTR |
//!
//! A zone is immutable and rebuilt whole when the catalog changes; lookups
//! are a hash-map probe. Only services some cluster exports are in the zone
//! (an MCS ServiceImport exists only for exported services).

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use super::ips::{Allocations, IpRange};
use crate::catalog::{Catalog, ServiceEntry};

/// The zone apex.
pub const APEX: &str = "clusterset.local.";
/// The MCS DNS specification version this zone implements.
pub const DNS_VERSION: &str = "1.0.0";

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'z> {
    /// Records of the asked type, and records that help use them (the
    /// addresses of SRV targets).
    Found {
        /// The answer section.
        answers: Vec<&'z Record>,
        /// The additional section.
        additionals: Vec<&'z Record>,
    },
    /// The name exists, but has no record of that type.
    NoData,
    /// The name does not exist in a zone this server is authoritative for.
    NxDomain,
    /// Not a name this zone answers for: forward it.
    NotOurs,
}

impl Answer<'_> {
    /// Whether the zone is authoritative for the answer.
    pub fn is_authoritative(&self) -> bool {
        !matches!(self, Self::NotOurs)
    }
}

/// The zone's settings.
#[derive(Debug, Clone, Copy)]
pub struct ZoneSettings {
    /// TTL of every record, and the negative TTL.
    pub ttl: u32,
    /// SOA serial; callers increase it on every rebuild.
    pub serial: u32,
}

/// An immutable `clusterset.local` zone; see the module docs.
#[derive(Debug)]
pub struct ClusterSetZone {
    apex: LowerName,
    /// Every name of the zone with its records; empty non-terminals (such as
    /// `svc.clusterset.local`) are present with none.
    names: HashMap<LowerName, Vec<Record>>,
    /// PTR records, by reverse name.
    reverse: HashMap<LowerName, Record>,
    /// Clusterset IP ranges: reverse names inside them are ours.
    ranges: Vec<IpRange>,
    soa: Record,
}

fn name(s: &str) -> Name {
    // Only called with names built from checked labels.
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

impl ClusterSetZone {
    /// Builds the zone for `catalog`, with clusterset IPs from `allocations`
    /// out of `ranges`.
    pub fn build(
        catalog: &Catalog,
        allocations: &Allocations,
        ranges: &[IpRange],
        settings: ZoneSettings,
    ) -> Self {
        let apex = name(APEX);
        let ttl = settings.ttl;
        let soa = Record::from_rdata(
            apex.clone(),
            ttl,
            RData::SOA(SOA::new(
                name("ns.dns.clusterset.local."),
                name("hostmaster.clusterset.local."),
                settings.serial,
                // Secondaries do not apply (the zone is never transferred).
                28_800,
                7_200,
                604_800,
                ttl,
            )),
        );
        let mut zone = Self {
            apex: LowerName::new(&apex),
            names: HashMap::new(),
            reverse: HashMap::new(),
            ranges: ranges.to_vec(),
            soa: soa.clone(),
        };
        zone.add(soa);
        zone.add(Record::from_rdata(
            apex.clone(),
            ttl,
            RData::NS(NS(name("ns.dns.clusterset.local."))),
        ));
        zone.add(Record::from_rdata(
            name("dns-version.clusterset.local."),
            ttl,
            RData::TXT(TXT::new(vec![DNS_VERSION.to_owned()])),
        ));
        for entry in catalog.iter() {
            if entry.exported || !entry.remote.is_empty() {
                zone.add_service(entry, allocations, ttl);
            }
        }
        zone
    }

    fn add_service(&mut self, entry: &ServiceEntry, allocations: &Allocations, ttl: u32) {
        let svc = name(&format!(
            "{}.{}.svc.{APEX}",
            entry.key.name, entry.key.namespace
        ));
        self.touch(&svc);
        let address = |owner: &Name, ip: IpAddr| match ip {
            IpAddr::V4(a) => Record::from_rdata(owner.clone(), ttl, RData::A(A(a))),
            IpAddr::V6(a) => Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(a))),
        };
        // (SRV target, its port) pairs.
        let mut targets: Vec<Name> = Vec::new();
        if entry.headless {
            let mut seen = std::collections::HashSet::new();
            for ep in &entry.headless_endpoints {
                if seen.insert(ep.address) {
                    self.add(address(&svc, ep.address));
                }
                let Some(host) = &ep.hostname else { continue };
                let own = name(&format!("{host}.{}.{svc}", ep.cluster));
                self.add(address(&own, ep.address));
                self.add_ptr(ep.address, &own, ttl);
                targets.push(own);
            }
        } else if let Some(ip) = allocations.get(&entry.key) {
            for a in [ip.ipv4.map(IpAddr::V4), ip.ipv6.map(IpAddr::V6)]
                .into_iter()
                .flatten()
            {
                self.add(address(&svc, a));
                self.add_ptr(a, &svc, ttl);
            }
            targets.push(svc.clone());
        }
        targets.sort();
        targets.dedup();
        for port in &entry.ports {
            let Some(port_name) = &port.name else {
                continue;
            };
            let owner = name(&format!("_{port_name}._tcp.{svc}"));
            self.touch(&owner);
            for target in &targets {
                self.add(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::SRV(SRV::new(0, 100, port.port, target.clone())),
                ));
            }
        }
    }

    /// Adds the PTR of `ip` when it is in a clusterset range (the only
    /// reverse names this zone answers; see [`Self::lookup`]).
    fn add_ptr(&mut self, ip: IpAddr, target: &Name, ttl: u32) {
        if !self.ranges.iter().any(|r| r.covers(ip)) {
            return;
        }
        let owner = reverse_name(ip);
        self.reverse
            .entry(LowerName::new(&owner))
            .or_insert_with(|| Record::from_rdata(owner, ttl, RData::PTR(PTR(target.clone()))));
    }

    /// Adds `record`, and its name's ancestors as empty non-terminals.
    fn add(&mut self, record: Record) {
        let owner = record.name.clone();
        self.touch(&owner);
        if let Some(records) = self.names.get_mut(&LowerName::new(&owner)) {
            records.push(record);
        }
    }

    /// Makes `owner` and its ancestors up to the apex exist.
    fn touch(&mut self, owner: &Name) {
        let mut n = owner.clone();
        loop {
            let lower = LowerName::new(&n);
            if self.names.contains_key(&lower) {
                return;
            }
            let at_apex = lower == self.apex;
            self.names.insert(lower, Vec::new());
            if at_apex || n.num_labels() == 0 {
                return;
            }
            n = n.base_name();
        }
    }

    /// The SOA record, for the authority section of negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// How many names the zone holds (reverse names included).
    pub fn len(&self) -> usize {
        self.names.len() + self.reverse.len()
    }

    /// Whether the zone holds no name (never: the apex is always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks `qname` up for `qtype`.
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Answer<'_> {
        if self.apex.zone_of(qname) {
            let Some(records) = self.names.get(qname) else {
                return Answer::NxDomain;
            };
            let answers: Vec<&Record> = if qtype == RecordType::ANY {
                // One RRset, never the whole name (RFC 8482).
                super::guard::minimal_any(records)
            } else {
                records
                    .iter()
                    .filter(|r| r.record_type() == qtype)
                    .collect()
            };
            if answers.is_empty() {
                return Answer::NoData;
            }
            let additionals = if qtype == RecordType::SRV {
                self.srv_additionals(&answers)
            } else {
                Vec::new()
            };
            return Answer::Found {
                answers,
                additionals,
            };
        }
        // Reverse names are ours only inside the clusterset ranges: the rest
        // of the address space belongs to others, whatever a catalog entry
        // claims about an address in it.
        match parse_reverse_name(qname) {
            Some(ip) if self.ranges.iter().any(|r| r.covers(ip)) => {
                match (self.reverse.get(qname), qtype) {
                    (Some(ptr), RecordType::PTR | RecordType::ANY) => Answer::Found {
                        answers: vec![ptr],
                        additionals: Vec::new(),
                    },
                    (Some(_), _) => Answer::NoData,
                    (None, _) => Answer::NxDomain,
                }
            }
            _ => Answer::NotOurs,
        }
    }

    fn srv_additionals<'z>(&'z self, answers: &[&'z Record]) -> Vec<&'z Record> {
        let mut out: Vec<&Record> = Vec::new();
        for record in answers {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            if let Some(addresses) = self.names.get(&LowerName::new(&srv.target)) {
                for a in addresses
                    .iter()
                    .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
                {
                    if !out.iter().any(|o| std::ptr::eq(*o, a)) {
                        out.push(a);
                    }
                }
            }
        }
        out
    }
}

/// `ip`'s reverse name: `4.3.2.1.in-addr.arpa.` or the nibbles under `ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> Name {
    let text = match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::with_capacity(73);
            for byte in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    name(&text)
}

/// The address a full reverse name stands for.
pub fn parse_reverse_name(qname: &LowerName) -> Option<IpAddr> {
    let text = qname.to_string();
    let text = text.trim_end_matches('.');
    if let Some(rest) = text.strip_suffix(".in-addr.arpa") {
        let octets: Vec<u8> = rest
            .split('.')
            .map(|o| o.parse().ok())
            .collect::<Option<_>>()?;
        let [d, c, b, a] = <[u8; 4]>::try_from(octets).ok()?;
        return Some(IpAddr::from([a, b, c, d]));
    }
    let rest = text.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 1))
        .collect::<Option<_>>()?;
    let nibbles = <[u8; 32]>::try_from(nibbles).ok()?;
    let mut octets = [0u8; 16];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        octets[15 - i] = pair[0] | (pair[1] << 4);
    }
    Some(IpAddr::from(octets))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::ServiceKey;
    use crate::catalog::{HeadlessEndpoint, Protocol, RemoteGateway, ServicePort};
    use crate::dns::ips::Allocator;

    fn lower(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    fn entry(key: &str, headless: bool) -> ServiceEntry {
        ServiceEntry {
            ports: vec![
                ServicePort {
                    port: 8080,
                    protocol: Protocol::Http,
                    name: Some("http".parse().unwrap()),
                },
                ServicePort {
                    port: 9000,
                    protocol: Protocol::Tcp,
                    name: None,
                },
            ],
            remote: vec![RemoteGateway {
                cluster: "east".parse().unwrap(),
                spiffe_id: "spiffe://east.example/isthmus/gateway/gw".parse().unwrap(),
                address: "127.0.0.1:15443".parse::<SocketAddr>().unwrap(),
                locality: "eu/eu-1".parse().unwrap(),
                labels: Default::default(),
                live: true,
                subsets: vec![],
            }],
            exported: false,
            headless,
            headless_endpoints: if headless {
                vec![
                    HeadlessEndpoint {
                        cluster: "east".parse().unwrap(),
                        hostname: Some("db-0".parse().unwrap()),
                        address: "10.1.0.5".parse().unwrap(),
                    },
                    HeadlessEndpoint {
                        cluster: "west".parse().unwrap(),
                        hostname: None,
                        address: "10.2.0.7".parse().unwrap(),
                    },
                ]
            } else {
                vec![]
            },
            ..ServiceEntry::exported(key.parse().unwrap())
        }
    }

    /// A zone with shop/web (clusterset IP, IPv4 and IPv6), data/db
    /// (headless, one endpoint with a hostname) and shop/internal (not
    /// exported anywhere), for this module's tests and the server's.
    pub(crate) fn zone() -> (ClusterSetZone, Allocations) {
        let mut local_only = entry("shop/internal", false);
        local_only.remote.clear();
        let catalog = Catalog::new([entry("shop/web", false), entry("data/db", true), local_only]);
        let range: IpRange = "127.240.0.0/16".parse().unwrap();
        let v6: IpRange = "fd00:1::/112".parse().unwrap();
        let keys: Vec<ServiceKey> = catalog.iter().map(|e| e.key.clone()).collect();
        let (allocations, _) = Allocator::open(range, Some(v6), None).unwrap().sync(&keys);
        let zone = ClusterSetZone::build(
            &catalog,
            &allocations,
            &[range, v6],
            ZoneSettings { ttl: 5, serial: 1 },
        );
        (zone, allocations)
    }

    fn rdata(answer: Answer<'_>) -> Vec<String> {
        match answer {
            Answer::Found { answers, .. } => answers.iter().map(|r| r.data.to_string()).collect(),
            other => panic!("expected records, got {other:?}"),
        }
    }

    #[test]
    fn a_aaaa_srv_txt_and_ptr_follow_the_mcs_spec() {
        let (zone, allocations) = zone();
        let ip = allocations.get(&"shop/web".parse().unwrap()).unwrap();
        let web = lower("web.shop.svc.clusterset.local.");
        assert_eq!(
            rdata(zone.lookup(&web, RecordType::A)),
            [ip.ipv4.unwrap().to_string()]
        );
        assert_eq!(
            rdata(zone.lookup(&lower("WEB.Shop.svc.clusterset.local."), RecordType::AAAA)),
            [ip.ipv6.unwrap().to_string()]
        );
        let srv = zone.lookup(
            &lower("_http._tcp.web.shop.svc.clusterset.local."),
            RecordType::SRV,
        );
        let Answer::Found {
            answers,
            additionals,
        } = srv
        else {
            panic!("{srv:?}")
        };
        assert_eq!(
            answers[0].data.to_string(),
            "0 100 8080 web.shop.svc.clusterset.local."
        );
        assert_eq!(additionals.len(), 2, "A and AAAA of the target");
        assert_eq!(
            rdata(zone.lookup(&lower("dns-version.clusterset.local."), RecordType::TXT)),
            ["1.0.0"]
        );
        let ptr = reverse_name(IpAddr::V4(ip.ipv4.unwrap()));
        assert_eq!(
            rdata(zone.lookup(&LowerName::new(&ptr), RecordType::PTR)),
            ["web.shop.svc.clusterset.local."]
        );
        let ptr6 = reverse_name(IpAddr::V6(ip.ipv6.unwrap()));
        assert_eq!(
            parse_reverse_name(&LowerName::new(&ptr6)),
            Some(IpAddr::V6(ip.ipv6.unwrap()))
        );
        assert_eq!(
            rdata(zone.lookup(&LowerName::new(&ptr6), RecordType::PTR)),
            ["web.shop.svc.clusterset.local."]
        );
    }

    #[test]
    fn headless_services_publish_their_endpoints() {
        let (zone, _) = zone();
        let mut all = rdata(zone.lookup(&lower("db.data.svc.clusterset.local."), RecordType::A));
        all.sort();
        assert_eq!(all, ["10.1.0.5", "10.2.0.7"]);
        assert_eq!(
            rdata(zone.lookup(
                &lower("db-0.east.db.data.svc.clusterset.local."),
                RecordType::A
            )),
            ["10.1.0.5"]
        );
        assert_eq!(
            rdata(zone.lookup(
                &lower("_http._tcp.db.data.svc.clusterset.local."),
                RecordType::SRV
            )),
            ["0 100 8080 db-0.east.db.data.svc.clusterset.local."]
        );
        // 10.1.0.5 is outside the clusterset ranges: its reverse name is not
        // ours, whatever the catalog says about the address.
        assert_eq!(
            zone.lookup(&lower("5.0.1.10.in-addr.arpa."), RecordType::PTR),
            Answer::NotOurs
        );
    }

    #[test]
    fn reverse_names_are_answered_only_inside_the_clusterset_ranges() {
        // A peer exports a headless service naming someone else's address
        // (a public resolver) and one inside the clusterset range.
        let mut entry = entry("evil/claims", true);
        entry.headless_endpoints = vec![
            HeadlessEndpoint {
                cluster: "east".parse().unwrap(),
                hostname: Some("dns".parse().unwrap()),
                address: "8.8.8.8".parse().unwrap(),
            },
            HeadlessEndpoint {
                cluster: "east".parse().unwrap(),
                hostname: Some("inside".parse().unwrap()),
                address: "127.240.9.9".parse().unwrap(),
            },
        ];
        let range: IpRange = "127.240.0.0/16".parse().unwrap();
        let zone = ClusterSetZone::build(
            &Catalog::new([entry]),
            &Allocations::default(),
            &[range],
            ZoneSettings { ttl: 5, serial: 1 },
        );
        for qtype in [RecordType::PTR, RecordType::ANY] {
            assert_eq!(
                zone.lookup(&lower("8.8.8.8.in-addr.arpa."), qtype),
                Answer::NotOurs
            );
        }
        assert_eq!(
            rdata(zone.lookup(&lower("9.9.240.127.in-addr.arpa."), RecordType::PTR)),
            ["inside.east.claims.evil.svc.clusterset.local."]
        );
        assert_eq!(
            zone.lookup(&lower("9.9.240.127.in-addr.arpa."), RecordType::A),
            Answer::NoData
        );
        // The forward name still has its address: that is the service's own.
        assert_eq!(
            rdata(zone.lookup(
                &lower("dns.east.claims.evil.svc.clusterset.local."),
                RecordType::A
            )),
            ["8.8.8.8"]
        );
        // No PTR is kept for an address that can never be asked.
        assert_eq!(zone.reverse.len(), 1);
    }

    #[test]
    fn any_gets_one_rrset() {
        let (zone, _) = zone();
        let Answer::Found { answers, .. } =
            zone.lookup(&lower("web.shop.svc.clusterset.local."), RecordType::ANY)
        else {
            panic!("no answer");
        };
        assert_eq!(answers.len(), 1, "the A RRset, not A and AAAA");
        assert_eq!(answers[0].record_type(), RecordType::A);
        let Answer::Found { answers, .. } =
            zone.lookup(&lower("clusterset.local."), RecordType::ANY)
        else {
            panic!("no answer");
        };
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].record_type(), RecordType::SOA);
        assert_eq!(
            zone.lookup(&lower("svc.clusterset.local."), RecordType::ANY),
            Answer::NoData
        );
    }

    #[test]
    fn unknown_names_are_nxdomain_and_the_rest_is_forwarded() {
        let (zone, _) = zone();
        for nx in [
            "nope.shop.svc.clusterset.local.",
            "internal.shop.svc.clusterset.local.", // not exported anywhere
            "_grpc._tcp.web.shop.svc.clusterset.local.",
            "x.clusterset.local.",
            "1.0.240.127.in-addr.arpa.", // in the range, unallocated (or someone else's)
        ] {
            let got = zone.lookup(&lower(nx), RecordType::A);
            // The allocated address of one of the services may be .0.1; skip it then.
            if nx.ends_with("arpa.") && got == Answer::NoData {
                continue;
            }
            assert_eq!(got, Answer::NxDomain, "{nx}");
        }
        for nodata in [
            ("svc.clusterset.local.", RecordType::A),
            ("shop.svc.clusterset.local.", RecordType::A),
            ("web.shop.svc.clusterset.local.", RecordType::TXT),
            ("clusterset.local.", RecordType::A),
        ] {
            assert_eq!(
                zone.lookup(&lower(nodata.0), nodata.1),
                Answer::NoData,
                "{nodata:?}"
            );
        }
        assert!(
            zone.lookup(&lower("clusterset.local."), RecordType::SOA)
                .is_authoritative()
        );
        for other in [
            "example.com.",
            "local.",
            "1.0.0.10.in-addr.arpa.",
            "240.127.in-addr.arpa.",
        ] {
            assert_eq!(
                zone.lookup(&lower(other), RecordType::A),
                Answer::NotOurs,
                "{other}"
            );
        }
    }
}
