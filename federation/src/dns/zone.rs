//! The `clusterset.local` zone, built from a catalog snapshot per the
//! Kubernetes Multi-Cluster Services DNS specification 1.0.0.
//!
//! | name | records |
//! | --- | --- |
//! | `dns-version.clusterset.local` | TXT `"1.0.0"` |
//! | `<svc>.<ns>.svc.clusterset.local` | A/AAAA: the clusterset IP, or every endpoint of a headless service |
//! | `_<port>._tcp.<svc>.<ns>.svc.clusterset.local` | SRV for each named port |
//! | `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` | A/AAAA of one headless endpoint (an endpoint without a hostname is named by its address, `10-1-0-5`) |
//! | reverse names of clusterset IPs (and named endpoints inside the clusterset ranges) | PTR |
//!
//! A zone is immutable and rebuilt whole when the catalog (or the health of
//! this cluster's headless endpoints) changes; lookups are a hash-map probe.
//! Only services some cluster exports are in the zone (an MCS ServiceImport
//! exists only for exported services).
//!
//! A headless service lists its *ready* endpoints only (MCS DNS 2.4): those
//! of this cluster that its gateway's health checks or outlier detection hold
//! out ([`Unready`]) are left out, with their names and PTR records; those of
//! other clusters are listed as their cluster exported them. With no ready
//! endpoint left the service's names do not exist (NXDOMAIN, as the
//! specification asks).
//!
//! The reverse names of the clusterset ranges are answered from reverse
//! zones of their own ([`reverse_apexes`]), each with its SOA, so a negative
//! answer names the zone it comes from and not `clusterset.local`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use super::ips::{Allocations, IpRange};
use crate::catalog::{Catalog, HeadlessEndpoint, ServiceEntry};
use crate::{ClusterName, ServiceKey};

/// The zone apex.
pub const APEX: &str = "clusterset.local.";
/// The name server in every SOA and NS record this server gives.
const NS_NAME: &str = "ns.dns.clusterset.local.";
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
    /// The name exists, but has no record of that type; the SOA of its zone.
    NoData(&'z Record),
    /// The name does not exist in a zone this server is authoritative for;
    /// the SOA of that zone.
    NxDomain(&'z Record),
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

/// Endpoints of this cluster that its gateway holds out (failing health
/// checks, or ejected by outlier detection), by headless service: they are
/// not ready, so DNS does not publish them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unready {
    cluster: Option<ClusterName>,
    addresses: BTreeMap<ServiceKey, BTreeSet<IpAddr>>,
}

impl Unready {
    /// None held out, in `cluster`.
    pub fn new(cluster: ClusterName) -> Self {
        Self {
            cluster: Some(cluster),
            addresses: BTreeMap::new(),
        }
    }

    /// Holds out `service`'s endpoints of this cluster at `address`.
    pub fn insert(&mut self, service: ServiceKey, address: IpAddr) {
        self.addresses.entry(service).or_default().insert(address);
    }

    /// Whether `endpoint` of `service` is held out: only this cluster's
    /// endpoints can be (another cluster's readiness is what it exported).
    pub fn holds_out(&self, service: &ServiceKey, endpoint: &HeadlessEndpoint) -> bool {
        self.cluster.as_ref() == Some(&endpoint.cluster)
            && self
                .addresses
                .get(service)
                .is_some_and(|a| a.contains(&endpoint.address))
    }

    /// Whether no endpoint is held out.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }
}

/// A reverse zone: its apex records (SOA, NS) and the range whose addresses
/// it answers for.
#[derive(Debug)]
struct ReverseZone {
    apex: Vec<Record>,
    range: IpRange,
}

/// An immutable `clusterset.local` zone and the reverse zones of the
/// clusterset ranges; see the module docs.
#[derive(Debug)]
pub struct ClusterSetZone {
    apex: LowerName,
    /// Every name of the zone with its records; empty non-terminals (such as
    /// `svc.clusterset.local`) are present with none.
    names: HashMap<LowerName, Vec<Record>>,
    /// PTR records, by reverse name.
    reverse: HashMap<LowerName, Record>,
    /// The reverse zones, by apex.
    reverse_zones: HashMap<LowerName, ReverseZone>,
    /// Names between a reverse zone's apex and its PTR records (IPv6 nibbles,
    /// IPv4 octets): they exist, with no record.
    reverse_between: HashSet<LowerName>,
    /// Clusterset IP ranges: reverse names inside them are ours.
    ranges: Vec<IpRange>,
    soa: Record,
}

/// The SOA of the zone at `apex`.
fn soa_record(apex: Name, settings: ZoneSettings) -> Record {
    Record::from_rdata(
        apex,
        settings.ttl,
        RData::SOA(SOA::new(
            name(NS_NAME),
            name("hostmaster.clusterset.local."),
            settings.serial,
            // Secondaries do not apply (zones are never transferred).
            28_800,
            7_200,
            604_800,
            // The negative TTL (RFC 2308): as long as a positive answer.
            settings.ttl,
        )),
    )
}

/// The reverse zones this server is authoritative for, for `range`: the
/// zones at label boundaries (octets under `in-addr.arpa`, nibbles under
/// `ip6.arpa`) that tile it. A range on a boundary is one zone
/// (127.240.0.0/16: `240.127.in-addr.arpa`); one between boundaries is the
/// zones of the next boundary down that it covers whole (10.96.240.0/20: the
/// sixteen zones `240.96.10.in-addr.arpa` to `255.96.10.in-addr.arpa`),
/// rather than claiming a parent zone that holds others' addresses. A range
/// smaller than the last zone level (an IPv4 /25 to /30, an IPv6 /125 or
/// /126) gets that zone (the /24, the /124), but only its own addresses are
/// answered from it; other names there are not ours.
pub fn reverse_apexes(range: IpRange) -> Vec<Name> {
    let (bits, step): (u8, u8) = if range.is_ipv4() { (32, 8) } else { (128, 4) };
    let prefix = range.prefix();
    let zone_prefix = prefix.div_ceil(step).saturating_mul(step).min(bits - step);
    let base = match range.network() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let host_bits = u32::from(bits - zone_prefix);
    // Below the range's own prefix when the zones are smaller than it.
    let count = 1u128 << zone_prefix.saturating_sub(prefix);
    let base = base.checked_shr(host_bits).unwrap_or(0) << host_bits;
    (0..count)
        .map(|i| {
            let value = base + (i << host_bits);
            let ip = if range.is_ipv4() {
                IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX)))
            } else {
                IpAddr::V6(Ipv6Addr::from(value))
            };
            // The labels of the zone's bits, then `in-addr.arpa` or `ip6.arpa`.
            reverse_name(ip).trim_to(usize::from(zone_prefix / step) + 2)
        })
        .collect()
}

fn name(s: &str) -> Name {
    // Only called with names built from checked labels.
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

impl ClusterSetZone {
    /// Builds the zone for `catalog`, with clusterset IPs from `allocations`
    /// out of `ranges`, leaving out the endpoints `unready` holds out.
    pub fn build(
        catalog: &Catalog,
        allocations: &Allocations,
        ranges: &[IpRange],
        settings: ZoneSettings,
        unready: &Unready,
    ) -> Self {
        let apex = name(APEX);
        let ttl = settings.ttl;
        let soa = soa_record(apex.clone(), settings);
        let ns = |owner: Name| Record::from_rdata(owner, ttl, RData::NS(NS(name(NS_NAME))));
        let mut reverse_zones = HashMap::new();
        for range in ranges {
            for owner in reverse_apexes(*range) {
                let records = vec![soa_record(owner.clone(), settings), ns(owner.clone())];
                reverse_zones.insert(
                    LowerName::new(&owner),
                    ReverseZone {
                        apex: records,
                        range: *range,
                    },
                );
            }
        }
        let mut zone = Self {
            apex: LowerName::new(&apex),
            names: HashMap::new(),
            reverse: HashMap::new(),
            reverse_zones,
            reverse_between: HashSet::new(),
            ranges: ranges.to_vec(),
            soa: soa.clone(),
        };
        zone.add(soa);
        zone.add(ns(apex.clone()));
        zone.add(Record::from_rdata(
            name("dns-version.clusterset.local."),
            ttl,
            RData::TXT(TXT::new(vec![DNS_VERSION.to_owned()])),
        ));
        for entry in catalog.iter() {
            if entry.exported || !entry.remote.is_empty() {
                zone.add_service(entry, allocations, ttl, unready);
            }
        }
        zone.reverse_between = zone
            .reverse
            .keys()
            .flat_map(|owner| {
                let mut between = Vec::new();
                let mut n = owner.base_name();
                while n.num_labels() > 2 && !zone.reverse_zones.contains_key(&n) {
                    between.push(n.clone());
                    n = n.base_name();
                }
                between
            })
            .collect();
        zone
    }

    fn add_service(
        &mut self,
        entry: &ServiceEntry,
        allocations: &Allocations,
        ttl: u32,
        unready: &Unready,
    ) {
        let svc = name(&format!(
            "{}.{}.svc.{APEX}",
            entry.key.name, entry.key.namespace
        ));
        let ready: Vec<&HeadlessEndpoint> = entry
            .headless_endpoints
            .iter()
            .filter(|ep| !unready.holds_out(&entry.key, ep))
            .collect();
        if entry.headless && ready.is_empty() {
            // No ready endpoint: none of the service's names exist (MCS DNS
            // 2.4.1 asks for NXDOMAIN).
            return;
        }
        self.touch(&svc);
        let address = |owner: &Name, ip: IpAddr| match ip {
            IpAddr::V4(a) => Record::from_rdata(owner.clone(), ttl, RData::A(A(a))),
            IpAddr::V6(a) => Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(a))),
        };
        // (SRV target, its port) pairs.
        let mut targets: Vec<Name> = Vec::new();
        if entry.headless {
            let mut seen = HashSet::new();
            for ep in ready {
                if seen.insert(ep.address) {
                    self.add(address(&svc, ep.address));
                }
                let host = ep
                    .hostname
                    .as_ref()
                    .map_or_else(|| address_label(ep.address), ToString::to_string);
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
                return Answer::NxDomain(&self.soa);
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
                return Answer::NoData(&self.soa);
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
        self.lookup_reverse(qname, qtype)
    }

    /// Looks `qname` up in the reverse zones. Reverse names are ours only
    /// inside the clusterset ranges: the rest of the address space belongs
    /// to others, whatever a catalog entry claims about an address in it.
    fn lookup_reverse(&self, qname: &LowerName, qtype: RecordType) -> Answer<'_> {
        // The closest enclosing reverse zone, if any (at most 34 labels up).
        let mut apex = qname.clone();
        let zone = loop {
            if let Some(zone) = self.reverse_zones.get(&apex) {
                break zone;
            }
            if apex.num_labels() <= 2 {
                return Answer::NotOurs;
            }
            apex = apex.base_name();
        };
        let soa = &zone.apex[0];
        if apex == *qname {
            let answers: Vec<&Record> = if qtype == RecordType::ANY {
                super::guard::minimal_any(&zone.apex)
            } else {
                zone.apex
                    .iter()
                    .filter(|r| r.record_type() == qtype)
                    .collect()
            };
            if answers.is_empty() {
                return Answer::NoData(soa);
            }
            return Answer::Found {
                answers,
                additionals: Vec::new(),
            };
        }
        match parse_reverse_name(qname) {
            // A zone larger than a small range holds others' addresses too.
            Some(ip) if !zone.range.covers(ip) => Answer::NotOurs,
            Some(_) => match (self.reverse.get(qname), qtype) {
                (Some(ptr), RecordType::PTR | RecordType::ANY) => Answer::Found {
                    answers: vec![ptr],
                    additionals: Vec::new(),
                },
                (Some(_), _) => Answer::NoData(soa),
                (None, _) => Answer::NxDomain(soa),
            },
            None if self.reverse_between.contains(qname) => Answer::NoData(soa),
            None => Answer::NxDomain(soa),
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

/// The hostname of an endpoint that has none: its address with dashes
/// (`10-1-0-5`, `fd00-1-0-0-0-0-0-5`), the system-assigned identifier the
/// Kubernetes DNS specification asks for (as CoreDNS does it, IPv6 written out
/// in full so that no label starts or ends with a dash).
fn address_label(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.octets().map(|o| o.to_string()).join("-"),
        IpAddr::V6(a) => a.segments().map(|s| format!("{s:x}")).join("-"),
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
                weight: 1,
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
            &Unready::default(),
        );
        (zone, allocations)
    }

    /// "nodata" or "nxdomain", and the owner of the SOA that comes with it.
    fn negative(answer: Answer<'_>) -> (&'static str, String) {
        match answer {
            Answer::NoData(soa) => ("nodata", soa.name.to_string()),
            Answer::NxDomain(soa) => ("nxdomain", soa.name.to_string()),
            other => panic!("expected a negative answer, got {other:?}"),
        }
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
        // N ready endpoints x M named ports: the endpoint without a hostname
        // is named by its address.
        let mut srv = rdata(zone.lookup(
            &lower("_http._tcp.db.data.svc.clusterset.local."),
            RecordType::SRV,
        ));
        srv.sort();
        assert_eq!(
            srv,
            [
                "0 100 8080 10-2-0-7.west.db.data.svc.clusterset.local.",
                "0 100 8080 db-0.east.db.data.svc.clusterset.local."
            ]
        );
        assert_eq!(
            rdata(zone.lookup(
                &lower("10-2-0-7.west.db.data.svc.clusterset.local."),
                RecordType::A
            )),
            ["10.2.0.7"]
        );
        assert_eq!(
            address_label("fd00:1::5".parse().unwrap()),
            "fd00-1-0-0-0-0-0-5"
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
            &Unready::default(),
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
            negative(zone.lookup(&lower("9.9.240.127.in-addr.arpa."), RecordType::A)),
            ("nodata", "240.127.in-addr.arpa.".to_owned())
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
            negative(zone.lookup(&lower("svc.clusterset.local."), RecordType::ANY)).0,
            "nodata"
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
        ] {
            assert_eq!(
                negative(zone.lookup(&lower(nx), RecordType::A)),
                ("nxdomain", APEX.to_owned()),
                "{nx}"
            );
        }
        for nodata in [
            ("svc.clusterset.local.", RecordType::A),
            ("shop.svc.clusterset.local.", RecordType::A),
            ("web.shop.svc.clusterset.local.", RecordType::TXT),
            ("clusterset.local.", RecordType::A),
        ] {
            assert_eq!(
                negative(zone.lookup(&lower(nodata.0), nodata.1)),
                ("nodata", APEX.to_owned()),
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
            "127.in-addr.arpa.",
        ] {
            assert_eq!(
                zone.lookup(&lower(other), RecordType::A),
                Answer::NotOurs,
                "{other}"
            );
        }
    }

    #[test]
    fn reverse_zones_tile_the_ranges_at_label_boundaries() {
        let apexes = |range: &str| -> Vec<String> {
            reverse_apexes(range.parse().unwrap())
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(apexes("127.240.0.0/16"), ["240.127.in-addr.arpa."]);
        assert_eq!(apexes("10.0.0.0/8"), ["10.in-addr.arpa."]);
        // Between boundaries: the zones one level down that it covers whole.
        let twenty = apexes("10.96.240.0/20");
        assert_eq!(twenty.len(), 16);
        assert_eq!(twenty[0], "240.96.10.in-addr.arpa.");
        assert_eq!(twenty[15], "255.96.10.in-addr.arpa.");
        assert_eq!(apexes("10.128.0.0/9").len(), 128);
        // Smaller than a /24: the /24 it is in.
        assert_eq!(apexes("10.1.0.64/26"), ["0.1.10.in-addr.arpa."]);
        assert_eq!(
            apexes("fd00:1::/112"),
            ["0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa."]
        );
        let v6 = apexes("fd00:1::/110");
        assert_eq!(v6.len(), 4);
        assert!(v6[3].starts_with("3.0.0.0."), "{v6:?}");
        assert_eq!(apexes("fd00:1::/126").len(), 1);
        assert!(apexes("fd00:1::/126")[0].starts_with("0.0.0.0.0."));
    }

    #[test]
    fn reverse_answers_carry_the_soa_of_their_reverse_zone() {
        let (zone, allocations) = zone();
        let ip = allocations.get(&"shop/web".parse().unwrap()).unwrap();
        let v4_apex = "240.127.in-addr.arpa.";
        // An address of the range nobody has: NXDOMAIN from the reverse zone.
        let free = (1..=255u8)
            .map(|d| IpAddr::from([127, 240, 255, d]))
            .find(|a| Some(*a) != ip.ipv4.map(IpAddr::V4))
            .unwrap();
        let free = LowerName::new(&reverse_name(free));
        assert_eq!(
            negative(zone.lookup(&free, RecordType::PTR)),
            ("nxdomain", v4_apex.to_owned())
        );
        // The apex has its SOA and NS.
        assert_eq!(
            rdata(zone.lookup(&lower(v4_apex), RecordType::SOA))[0]
                .split(' ')
                .next(),
            Some("ns.dns.clusterset.local.")
        );
        assert_eq!(
            rdata(zone.lookup(&lower(v4_apex), RecordType::NS)),
            ["ns.dns.clusterset.local."]
        );
        assert_eq!(
            negative(zone.lookup(&lower(v4_apex), RecordType::PTR)),
            ("nodata", v4_apex.to_owned())
        );
        // Names between the apex and the PTR records exist (IPv6 nibbles);
        // others under the apex do not.
        let v6 = ip.ipv6.unwrap();
        let ptr6 = reverse_name(IpAddr::V6(v6));
        let v6_apex = ptr6.trim_to(30).to_string();
        let between = LowerName::new(&ptr6.trim_to(32));
        assert_eq!(
            negative(zone.lookup(&between, RecordType::PTR)),
            ("nodata", v6_apex.clone())
        );
        let empty = lower(&format!(
            "{}{v6_apex}",
            if v6.octets()[14] & 0xf == 0xf {
                "e.e."
            } else {
                "f.f."
            }
        ));
        assert_eq!(
            negative(zone.lookup(&empty, RecordType::PTR)),
            ("nxdomain", v6_apex)
        );
        assert_eq!(
            negative(zone.lookup(&lower("x.240.127.in-addr.arpa."), RecordType::PTR)).0,
            "nxdomain"
        );
    }

    #[test]
    fn a_range_smaller_than_a_zone_answers_only_its_own_addresses() {
        let range: IpRange = "127.241.0.64/26".parse().unwrap();
        let key: ServiceKey = "shop/web".parse().unwrap();
        let catalog = Catalog::new([entry("shop/web", false)]);
        let (allocations, _) = Allocator::open(range, None, None)
            .unwrap()
            .sync(std::slice::from_ref(&key));
        let zone = ClusterSetZone::build(
            &catalog,
            &allocations,
            &[range],
            ZoneSettings { ttl: 5, serial: 1 },
            &Unready::default(),
        );
        let ip = allocations.get(&key).unwrap().ipv4.unwrap();
        assert_eq!(
            rdata(zone.lookup(
                &LowerName::new(&reverse_name(IpAddr::V4(ip))),
                RecordType::PTR
            )),
            ["web.shop.svc.clusterset.local."]
        );
        assert_eq!(
            negative(zone.lookup(&lower("127.0.241.127.in-addr.arpa."), RecordType::PTR)),
            ("nxdomain", "0.241.127.in-addr.arpa.".to_owned())
        );
        // The same /24 outside the range is someone else's.
        assert_eq!(
            zone.lookup(&lower("1.0.241.127.in-addr.arpa."), RecordType::PTR),
            Answer::NotOurs
        );
    }

    #[test]
    fn headless_answers_list_only_ready_endpoints() {
        let db: ServiceKey = "data/db".parse().unwrap();
        let build = |unready: &Unready| {
            ClusterSetZone::build(
                &Catalog::new([entry("data/db", true)]),
                &Allocations::default(),
                &["10.1.0.0/16".parse().unwrap()],
                ZoneSettings { ttl: 5, serial: 1 },
                unready,
            )
        };
        let name = lower("db.data.svc.clusterset.local.");
        let srv = lower("_http._tcp.db.data.svc.clusterset.local.");
        let own = lower("db-0.east.db.data.svc.clusterset.local.");
        let ptr = lower("5.0.1.10.in-addr.arpa.");
        // This cluster is east: its endpoint 10.1.0.5 is held out, with its
        // own name, SRV target and PTR; west's 10.2.0.7 stays.
        let mut east = Unready::new("east".parse().unwrap());
        east.insert(db.clone(), "10.1.0.5".parse().unwrap());
        let zone = build(&east);
        assert_eq!(rdata(zone.lookup(&name, RecordType::A)), ["10.2.0.7"]);
        assert_eq!(negative(zone.lookup(&own, RecordType::A)).0, "nxdomain");
        assert_eq!(
            rdata(zone.lookup(&srv, RecordType::SRV)),
            ["0 100 8080 10-2-0-7.west.db.data.svc.clusterset.local."]
        );
        assert_eq!(negative(zone.lookup(&ptr, RecordType::PTR)).0, "nxdomain");
        // In west, the same address names east's endpoint: east's to say.
        let mut west = Unready::new("west".parse().unwrap());
        west.insert(db.clone(), "10.1.0.5".parse().unwrap());
        let zone = build(&west);
        let mut all = rdata(zone.lookup(&name, RecordType::A));
        all.sort();
        assert_eq!(all, ["10.1.0.5", "10.2.0.7"]);
        assert_eq!(rdata(zone.lookup(&ptr, RecordType::PTR)).len(), 1);
        // No ready endpoint at all: the service's names do not exist.
        let mut both = HeadlessEndpoint {
            cluster: "east".parse().unwrap(),
            hostname: None,
            address: "10.2.0.7".parse().unwrap(),
        };
        east.insert(db.clone(), both.address);
        both.cluster = "west".parse().unwrap();
        let mut catalog_entry = entry("data/db", true);
        catalog_entry.headless_endpoints[1].cluster = "east".parse().unwrap();
        let zone = ClusterSetZone::build(
            &Catalog::new([catalog_entry]),
            &Allocations::default(),
            &[],
            ZoneSettings { ttl: 5, serial: 1 },
            &east,
        );
        assert!(!east.holds_out(&db, &both));
        for (qname, qtype) in [(&name, RecordType::A), (&srv, RecordType::SRV)] {
            assert_eq!(
                negative(zone.lookup(qname, qtype)),
                ("nxdomain", APEX.to_owned())
            );
        }
    }
}
