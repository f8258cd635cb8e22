//! DNS server metrics, registered in the process registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// `isthmus_dns_*`.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    /// Queries answered, by query type, response code and who answered.
    pub queries: IntCounterVec,
    /// Packets that are not DNS queries, by transport.
    pub malformed: IntCounterVec,
    /// UDP answers cut short with the TC bit (the client retries over TCP).
    pub truncated: IntCounter,
    /// Queries refused because too many were in flight.
    pub overloaded: IntCounterVec,
    /// Queries refused by policy, by reason: `source` (outside
    /// `dns.allow_sources`), `transfer` (AXFR, IXFR).
    pub refused: IntCounterVec,
    /// UDP answers held back by response-rate limiting, by action: `drop`
    /// or `slip` (sent empty with TC).
    pub rate_limited: IntCounterVec,
    /// TCP connections closed at once, by reason: `source`, `total`,
    /// `per_source`.
    pub tcp_refused: IntCounterVec,
    /// TCP connections open.
    pub tcp_connections: IntGauge,
    /// TCP connections closed for being idle (or not reading their answers).
    pub tcp_idle_closed: IntCounter,
    /// How long forwarded queries took (cache hits included).
    pub forward_duration: Histogram,
    /// Names in the `clusterset.local` zone (and its reverse names).
    pub zone_names: IntGauge,
    /// Services with a clusterset IP.
    pub clusterset_ips: IntGauge,
    /// Services left without a clusterset IP because the range is full.
    pub clusterset_exhausted: IntGauge,
}

crate::label_enum! {
    /// The `type` label of `isthmus_dns_queries_total`: common types by name,
    /// the rest as `other` (bounded cardinality whatever clients send).
    pub enum QueryType {
        /// A.
        A => "A",
        /// AAAA.
        Aaaa => "AAAA",
        /// SRV.
        Srv => "SRV",
        /// TXT.
        Txt => "TXT",
        /// PTR.
        Ptr => "PTR",
        /// SOA.
        Soa => "SOA",
        /// NS.
        Ns => "NS",
        /// CNAME.
        Cname => "CNAME",
        /// MX.
        Mx => "MX",
        /// ANY.
        Any => "ANY",
        /// HTTPS.
        Https => "HTTPS",
        /// SVCB.
        Svcb => "SVCB",
        /// Any other type.
        Other => "other",
        /// The message carried no question.
        NoQuestion => "none",
    }
}

impl QueryType {
    /// The label of `rtype`.
    pub fn of(rtype: hickory_proto::rr::RecordType) -> Self {
        use hickory_proto::rr::RecordType as T;
        match rtype {
            T::A => Self::A,
            T::AAAA => Self::Aaaa,
            T::SRV => Self::Srv,
            T::TXT => Self::Txt,
            T::PTR => Self::Ptr,
            T::SOA => Self::Soa,
            T::NS => Self::Ns,
            T::CNAME => Self::Cname,
            T::MX => Self::Mx,
            T::ANY => Self::Any,
            T::HTTPS => Self::Https,
            T::SVCB => Self::Svcb,
            _ => Self::Other,
        }
    }
}

crate::label_enum! {
    /// The `rcode` label of `isthmus_dns_queries_total`: the response codes
    /// this server sends by name, any other as `other`.
    pub enum Rcode {
        /// NOERROR.
        NoError => "NOERROR",
        /// FORMERR.
        FormErr => "FORMERR",
        /// SERVFAIL.
        ServFail => "SERVFAIL",
        /// NXDOMAIN.
        NxDomain => "NXDOMAIN",
        /// NOTIMP.
        NotImp => "NOTIMP",
        /// REFUSED.
        Refused => "REFUSED",
        /// BADVERS.
        BadVers => "BADVERS",
        /// Any other code.
        Other => "other",
    }
}

impl Rcode {
    /// The label of `rcode`.
    pub fn of(rcode: hickory_proto::op::ResponseCode) -> Self {
        use hickory_proto::op::ResponseCode as R;
        match rcode {
            R::NoError => Self::NoError,
            R::FormErr => Self::FormErr,
            R::ServFail => Self::ServFail,
            R::NXDomain => Self::NxDomain,
            R::NotImp => Self::NotImp,
            R::Refused => Self::Refused,
            R::BADVERS => Self::BadVers,
            _ => Self::Other,
        }
    }
}

impl DnsMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let truncated = IntCounter::with_opts(Opts::new(
            "isthmus_dns_truncated_total",
            "UDP answers truncated (TC bit set) because they exceeded the client's buffer; the client retries over TCP.",
        ))?;
        registry.register(Box::new(truncated.clone()))?;
        let tcp_idle_closed = IntCounter::with_opts(Opts::new(
            "isthmus_dns_tcp_idle_closed_total",
            "DNS TCP connections closed because they sent no query (or read no answer) for dns.tcp_idle_timeout.",
        ))?;
        registry.register(Box::new(tcp_idle_closed.clone()))?;
        let forward_duration = Histogram::with_opts(
            HistogramOpts::new(
                "isthmus_dns_forward_duration_seconds",
                "Time to answer a forwarded query, cache hits included.",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(forward_duration.clone()))?;
        Ok(Self {
            queries: counter_vec(
                "isthmus_dns_queries_total",
                "DNS queries answered, by query type, response code and source: clusterset (this server's zone), forward (an upstream resolver or its cache), rfc8482 (the HINFO synthesised for ANY), policy (REFUSED by dns.allow_sources or as a zone transfer) or none (no upstream: REFUSED).",
                &["type", "rcode", "source"],
            )?,
            malformed: counter_vec(
                "isthmus_dns_malformed_total",
                "Packets that are not valid DNS queries (answered FORMERR when they have a header, else dropped), by transport.",
                &["transport"],
            )?,
            truncated,
            overloaded: counter_vec(
                "isthmus_dns_overloaded_total",
                "Queries refused with SERVFAIL because too many forwards were in flight, by transport.",
                &["transport"],
            )?,
            refused: counter_vec(
                "isthmus_dns_refused_total",
                "DNS queries REFUSED by policy, by reason: source (outside dns.allow_sources), transfer (AXFR or IXFR).",
                &["reason"],
            )?,
            rate_limited: counter_vec(
                "isthmus_dns_rate_limited_total",
                "UDP answers held back by response-rate limiting, by action: drop, or slip (sent empty with TC so the client retries over TCP).",
                &["action"],
            )?,
            tcp_refused: counter_vec(
                "isthmus_dns_tcp_connections_refused_total",
                "DNS TCP connections closed at once, by reason: source (outside dns.allow_sources), total or per_source (over a connection cap).",
                &["reason"],
            )?,
            tcp_connections: gauge("isthmus_dns_tcp_connections", "DNS TCP connections open.")?,
            tcp_idle_closed,
            forward_duration,
            zone_names: gauge(
                "isthmus_dns_zone_names",
                "Names in the clusterset.local zone, reverse names included.",
            )?,
            clusterset_ips: gauge(
                "isthmus_dns_clusterset_ips",
                "Services with a clusterset IP.",
            )?,
            clusterset_exhausted: gauge(
                "isthmus_dns_clusterset_ips_exhausted",
                "Services without a clusterset IP because the range is full.",
            )?,
        })
    }
}
