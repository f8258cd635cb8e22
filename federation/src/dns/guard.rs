//! Who the DNS server answers, and how much: the decisions that keep it from
//! being an open door.
//!
//! - [`SourceAcl`]: queries (and so recursion) only from the configured
//!   networks; everyone else gets REFUSED over UDP, and TCP connections from
//!   them are closed at once. The default, [`DEFAULT_ALLOW_SOURCES`], is
//!   loopback and the private, shared and link-local ranges: an appliance
//!   answers its own networks, never the Internet, unless told to.
//! - [`RateLimiter`]: response-rate limiting per source (an IPv4 address or
//!   an IPv6 /64) with a token bucket. Over the limit an answer is dropped, or
//!   every `slip`-th one is sent empty with the TC bit so that a real client
//!   (whose address was not spoofed) retries over TCP, which is not limited
//!   this way (the handshake proves the source; connection caps bound it).
//!   The table of sources is bounded: when it is full, entries that have
//!   refilled (and so carry no state) are pruned, and sources that still find
//!   no room share one overflow bucket, so spoofed sources can neither grow
//!   memory nor escape the limit.
//! - [`transfer`] and [`minimal_any`]: zone transfers are refused, and ANY
//!   is answered with one RRset (RFC 8482).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use ipnet::IpNet;

use crate::limits::{ConnectionLimits, SourceKey};

/// The sources answered when the operator lists none: loopback, the private
/// IPv4 ranges (RFC 1918), shared address space (RFC 6598), link-local
/// (IPv4 and IPv6) and unique local IPv6 addresses (RFC 4193). None of them
/// is routed on the Internet.
pub const DEFAULT_ALLOW_SOURCES: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
];

/// Sources the rate limiter tracks at most (about 64 bytes each).
pub const RATE_LIMIT_SOURCES: usize = 65_536;

/// A network sources may come from: `10.0.0.0/8`, or one address
/// (`192.0.2.7`, `2001:db8::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceNet(IpNet);

/// Why a string is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceNetError {
    /// Neither `address/prefix` nor an address.
    #[error("{0:?} is not a network (address/prefix, e.g. 10.0.0.0/8) or an address")]
    Syntax(String),
    /// Host bits are set: probably a typo for a different network.
    #[error("{0} has host bits set; the network is {1}")]
    HostBits(String, String),
}

impl FromStr for SourceNet {
    type Err = SourceNetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self(IpNet::from(ip)));
        }
        let net: IpNet = s
            .parse()
            .map_err(|_| SourceNetError::Syntax(s.to_owned()))?;
        if net.trunc() != net {
            return Err(SourceNetError::HostBits(
                s.to_owned(),
                net.trunc().to_string(),
            ));
        }
        Ok(Self(net))
    }
}

impl std::fmt::Display for SourceNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl SourceNet {
    /// Whether `ip` is in the network.
    pub fn contains(self, ip: IpAddr) -> bool {
        self.0.contains(&unmapped(ip))
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4
/// client) as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The networks whose hosts the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAcl {
    nets: Vec<SourceNet>,
}

impl SourceAcl {
    /// Answers hosts in `nets` only.
    pub fn new(nets: Vec<SourceNet>) -> Self {
        Self { nets }
    }

    /// [`DEFAULT_ALLOW_SOURCES`].
    pub fn default_networks() -> Vec<SourceNet> {
        DEFAULT_ALLOW_SOURCES
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// Whether `ip` may ask.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The networks.
    pub fn networks(&self) -> &[SourceNet] {
        &self.nets
    }
}

impl Default for SourceAcl {
    fn default() -> Self {
        Self::new(Self::default_networks())
    }
}

/// Response-rate limiting settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Answers per second per source; 0 turns limiting off.
    pub per_second: u32,
    /// Answers a source may get at once after being quiet.
    pub burst: u32,
    /// Every `slip`-th limited answer is sent empty with the TC bit (the
    /// client retries over TCP); the others are dropped. 0: drop them all.
    pub slip: u32,
    /// Sources tracked at most.
    pub max_sources: usize,
}

/// What to do with an answer to one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Answer,
    /// Send it empty with the TC bit instead.
    Slip,
    /// Send nothing.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Answers limited so far (for `slip`).
    limited: u32,
}

impl Bucket {
    fn full(limit: &RateLimit, now: Instant) -> Self {
        Self {
            tokens: f64::from(limit.burst),
            at: now,
            limited: 0,
        }
    }

    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * f64::from(limit.per_second)).min(f64::from(limit.burst));
        self.at = now;
    }

    fn take(&mut self, limit: &RateLimit, now: Instant) -> Verdict {
        self.refill(limit, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Answer;
        }
        self.limited = self.limited.wrapping_add(1);
        if limit.slip > 0 && self.limited.is_multiple_of(limit.slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// Whether it has refilled by `now`, and so says nothing a new bucket
    /// would not.
    fn is_full_at(&self, limit: &RateLimit, now: Instant) -> bool {
        let mut b = *self;
        b.refill(limit, now);
        b.tokens >= f64::from(limit.burst)
    }
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<SourceKey, Bucket>,
    /// Shared by sources that find the table full.
    overflow: Bucket,
    last_prune: Instant,
}

/// A token bucket per source, in a bounded table; see the module docs.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    table: Mutex<Table>,
}

impl RateLimiter {
    /// A limiter with `limit`.
    pub fn new(limit: RateLimit) -> Self {
        let now = Instant::now();
        Self {
            limit,
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: Bucket::full(&limit, now),
                last_prune: now,
            }),
        }
    }

    /// Its settings.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Counts one answer to `source` at `now`, and says whether to send it.
    pub fn check(&self, source: IpAddr, now: Instant) -> Verdict {
        let limit = &self.limit;
        if limit.per_second == 0 {
            return Verdict::Answer;
        }
        let key = SourceKey::of(unmapped(source));
        // Each update is self-contained: a panic elsewhere leaves it usable.
        let mut table = self.table.lock();
        let table = &mut *table;
        if !table.buckets.contains_key(&key) && table.buckets.len() >= limit.max_sources {
            // Pruning scans the table: at most once per refill time, so a
            // flood of new sources cannot make every packet pay for a scan.
            let refill = Duration::from_secs_f64(
                f64::from(limit.burst.max(1)) / f64::from(limit.per_second),
            );
            if now.saturating_duration_since(table.last_prune) >= refill {
                table.last_prune = now;
                table.buckets.retain(|_, b| !b.is_full_at(limit, now));
            }
        }
        if let Some(bucket) = table.buckets.get_mut(&key) {
            return bucket.take(limit, now);
        }
        if table.buckets.len() < limit.max_sources {
            let mut bucket = Bucket::full(limit, now);
            let verdict = bucket.take(limit, now);
            table.buckets.insert(key, bucket);
            return verdict;
        }
        table.overflow.take(limit, now)
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().buckets.len()
    }
}

/// The server's protection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPolicy {
    /// Who is answered.
    pub allow_sources: SourceAcl,
    /// Response-rate limiting of UDP answers.
    pub rate_limit: RateLimit,
    /// Caps on TCP connections.
    pub tcp: ConnectionLimits,
    /// A TCP connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for DnsPolicy {
    fn default() -> Self {
        Self {
            allow_sources: SourceAcl::default(),
            rate_limit: RateLimit {
                per_second: 200,
                burst: 400,
                slip: 2,
                max_sources: RATE_LIMIT_SOURCES,
            },
            tcp: ConnectionLimits {
                total: 512,
                per_source: 16,
            },
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether `qtype` asks for a zone transfer (AXFR, IXFR): always refused.
pub fn transfer(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::AXFR | RecordType::IXFR)
}

/// The RRset an ANY query gets (RFC 8482 section 4.1): the records of the
/// first type among `records`, in order.
pub fn minimal_any<'r>(
    records: impl IntoIterator<Item = &'r hickory_proto::rr::Record>,
) -> Vec<&'r hickory_proto::rr::Record> {
    let mut first = None;
    records
        .into_iter()
        .filter(|r| *first.get_or_insert(r.record_type()) == r.record_type())
        .collect()
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::{Name, RData, Record};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limit(per_second: u32, burst: u32, slip: u32, max_sources: usize) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            slip,
            max_sources,
        }
    }

    #[test]
    fn networks_parse_strictly_and_match_mapped_addresses() {
        let net: SourceNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        let host: SourceNet = "192.0.2.7".parse().unwrap();
        assert_eq!(host.to_string(), "192.0.2.7/32");
        assert!(host.contains(ip("192.0.2.7")) && !host.contains(ip("192.0.2.8")));
        assert_eq!(
            "10.0.0.1/8".parse::<SourceNet>().unwrap_err().to_string(),
            "10.0.0.1/8 has host bits set; the network is 10.0.0.0/8"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<SourceNet>(),
            Err(SourceNetError::Syntax(_))
        ));
        assert!("fd00::/8".parse::<SourceNet>().is_ok());
        assert!("example.com".parse::<SourceNet>().is_err());
    }

    #[test]
    fn the_default_acl_answers_local_networks_and_not_the_internet() {
        let acl = SourceAcl::default();
        assert_eq!(acl.networks().len(), DEFAULT_ALLOW_SOURCES.len());
        for ok in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "fd12::1",
            "fe80::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(acl.allows(ip(ok)), "{ok}");
        }
        for no in [
            "8.8.8.8",
            "172.32.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!acl.allows(ip(no)), "{no}");
        }
        let only = SourceAcl::new(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(only.allows(ip("127.0.0.1")) && !only.allows(ip("127.0.0.3")));
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate_with_every_nth_limited_answer_slipped() {
        let rrl = RateLimiter::new(limit(10, 5, 2, 100));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(rrl.check(a, t0), Verdict::Answer);
        }
        let over: Vec<Verdict> = (0..4).map(|_| rrl.check(a, t0)).collect();
        assert_eq!(
            over,
            [Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        // Another source is not affected.
        assert_eq!(rrl.check(ip("192.0.2.2"), t0), Verdict::Answer);
        // 10 per second: one more after 100 ms, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(rrl.check(a, t1), Verdict::Answer);
        assert_ne!(rrl.check(a, t1), Verdict::Answer);
        // Refilled to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(rrl.check(a, t2), Verdict::Answer);
        }
        assert_ne!(rrl.check(a, t2), Verdict::Answer);
    }

    #[test]
    fn slip_zero_drops_every_limited_answer_and_rate_zero_limits_nothing() {
        let rrl = RateLimiter::new(limit(1, 1, 0, 10));
        let t = Instant::now();
        assert_eq!(rrl.check(ip("192.0.2.1"), t), Verdict::Answer);
        for _ in 0..10 {
            assert_eq!(rrl.check(ip("192.0.2.1"), t), Verdict::Drop);
        }
        let off = RateLimiter::new(limit(0, 0, 2, 10));
        for _ in 0..1000 {
            assert_eq!(off.check(ip("192.0.2.1"), t), Verdict::Answer);
        }
        assert_eq!(off.tracked(), 0);
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_bucket() {
        let rrl = RateLimiter::new(limit(1, 2, 0, 10));
        let t = Instant::now();
        assert_eq!(rrl.check(ip("2001:db8:1:2::1"), t), Verdict::Answer);
        assert_eq!(rrl.check(ip("2001:db8:1:2::ffff"), t), Verdict::Answer);
        assert_eq!(rrl.check(ip("2001:db8:1:2:3::9"), t), Verdict::Drop);
        assert_eq!(rrl.check(ip("2001:db8:1:3::1"), t), Verdict::Answer);
    }

    #[test]
    fn spoofed_sources_cannot_grow_the_table_or_escape_the_limit() {
        let rrl = RateLimiter::new(limit(10, 2, 0, 100));
        let t0 = Instant::now();
        let spoofed = |i: u32| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
        // A legitimate source, tracked before the flood.
        let client = ip("192.0.2.1");
        assert_eq!(rrl.check(client, t0), Verdict::Answer);
        let mut answered = 0;
        for i in 0..100_000 {
            if rrl.check(spoofed(i), t0) == Verdict::Answer {
                answered += 1;
            }
        }
        assert_eq!(rrl.tracked(), 100);
        // 99 sources found room (2 answers of burst, 1 used); the rest share
        // the overflow bucket's burst of 2.
        assert_eq!(answered, 99 + 2);
        // The tracked client keeps its own bucket.
        assert_eq!(rrl.check(client, t0), Verdict::Answer);
        // Once refilled, entries are pruned and new sources get room again,
        // still within the bound.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(rrl.check(ip("198.51.100.1"), t1), Verdict::Answer);
        assert!(rrl.tracked() <= 100);
        assert!(rrl.tracked() < 10, "pruned: {}", rrl.tracked());
    }

    #[test]
    fn transfers_are_recognised_and_any_gets_the_first_rrset() {
        assert!(transfer(RecordType::AXFR) && transfer(RecordType::IXFR));
        assert!(!transfer(RecordType::A) && !transfer(RecordType::ANY));
        let owner = Name::from_ascii("web.shop.svc.clusterset.local.").unwrap();
        let records = [
            Record::from_rdata(owner.clone(), 5, RData::A(A::new(127, 0, 0, 1))),
            Record::from_rdata(
                owner.clone(),
                5,
                RData::AAAA(AAAA::new(0, 0, 0, 0, 0, 0, 0, 1)),
            ),
            Record::from_rdata(owner.clone(), 5, RData::A(A::new(127, 0, 0, 2))),
        ];
        let any = minimal_any(&records);
        assert_eq!(any.len(), 2);
        assert!(any.iter().all(|r| r.record_type() == RecordType::A));
        assert!(minimal_any(&[]).is_empty());
    }
}
