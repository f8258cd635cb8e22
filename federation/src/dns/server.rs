//! The DNS server: `clusterset.local` from the zone, everything else
//! forwarded to upstream resolvers through hickory-resolver (with its cache),
//! or REFUSED when none is configured.
//!
//! Requests are parsed and answers encoded with hickory-server's message
//! types; the UDP and TCP loops are ours so that every packet is counted
//! (malformed ones included) and work in flight is bounded:
//!
//! - Zone answers are computed inline in the receive loop (a hash-map probe).
//! - Forwarded queries run as tasks, at most [`MAX_FORWARDS_IN_FLIGHT`]; past
//!   that a query gets SERVFAIL at once rather than queueing without bound.
//! - A UDP answer larger than the client's buffer (512 bytes, or its EDNS
//!   size) is truncated with the TC bit, and the client retries over TCP.
//! - A packet that is not a query gets FORMERR when it has a header, and is
//!   dropped otherwise; responses are never answered (no reflection loops).
//!
//! And it is not an open door ([`super::guard`] holds the decisions):
//!
//! - Only sources in `allow_sources` are answered (so only they get
//!   recursion); others get REFUSED over UDP, and their TCP connections are
//!   closed at once.
//! - UDP answers are rate-limited per source (dropped, or slipped with TC so
//!   a real client retries over TCP).
//! - AXFR and IXFR are REFUSED; ANY gets one RRset from the zone, and a
//!   synthesised HINFO for other names (RFC 8482), never forwarded.
//! - TCP connections are capped in total and per source, each admitted only
//!   with a permit of the shared [`ConnectionLimiter`]; over a cap the
//!   connection is closed at once, and an idle one is closed after
//!   `tcp_idle_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::HINFO;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_resolver::Resolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};

use super::guard::{DnsPolicy, RateLimiter, Verdict, transfer};
use super::metrics::{DnsMetrics, QueryType, Rcode};
use super::zone::{Answer, ClusterSetZone};
use crate::limits::{ConnectionLimiter, Refused};

/// Forwarded queries in flight at once, across transports.
pub const MAX_FORWARDS_IN_FLIGHT: usize = 1024;
/// TTL of the HINFO synthesised for ANY (RFC 8482 section 4.2).
pub const ANY_HINFO_TTL: u32 = 3600;
/// The largest UDP payload this server accepts and sends (RFC 6891).
pub const MAX_UDP_PAYLOAD: u16 = 4096;

/// Where queries that are not ours go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Upstream resolvers, tried in order (UDP, then TCP on truncation).
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream has to answer.
    pub timeout: Duration,
    /// Answers the cache holds.
    pub cache_size: u64,
}

crate::label_enum! {
    /// The transport a query came over: the `transport` label of
    /// `isthmus_dns_malformed_total` and `isthmus_dns_overloaded_total`.
    pub enum Transport {
        /// UDP: answers are truncated to the client's buffer.
        Udp => "udp",
        /// TCP: answers up to 64 KiB.
        Tcp => "tcp",
    }
}

crate::label_enum! {
    /// Why a query was REFUSED by policy: the `reason` label of
    /// `isthmus_dns_refused_total`.
    pub enum PolicyRefusal {
        /// The client is outside `dns.allow_sources`.
        Source => "source",
        /// A zone transfer (AXFR or IXFR).
        Transfer => "transfer",
    }
}

crate::label_enum! {
    /// What response-rate limiting did with an answer: the `action` label of
    /// `isthmus_dns_rate_limited_total`.
    pub enum RateLimitAction {
        /// Not sent.
        Drop => "drop",
        /// Sent empty with the TC bit, so a real client retries over TCP.
        Slip => "slip",
    }
}

crate::label_enum! {
    /// Why a DNS TCP connection was closed at once: the `reason` label of
    /// `isthmus_dns_tcp_connections_refused_total`.
    pub enum TcpRefusal {
        /// The client is outside `dns.allow_sources`.
        Source => "source",
        /// The listener holds its total of connections already.
        Total => "total",
        /// The client's source holds its share of connections already.
        PerSource => "per_source",
    }
}

impl From<Refused> for TcpRefusal {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Total => Self::Total,
            Refused::PerSource => Self::PerSource,
        }
    }
}

crate::label_enum! {
    /// Who answered a query: the `source` label of `isthmus_dns_queries_total`.
    pub enum AnswerSource {
        /// This server's `clusterset.local` zone.
        Clusterset => "clusterset",
        /// An upstream resolver or its cache.
        Forward => "forward",
        /// The HINFO synthesised for ANY (RFC 8482).
        Rfc8482 => "rfc8482",
        /// REFUSED by policy.
        Policy => "policy",
        /// No source could answer: a query this server does not answer (not
        /// in the zone with no resolver configured, or not answerable at all).
        NoSource => "none",
    }
}

impl Transport {
    fn protocol(self) -> Protocol {
        match self {
            Self::Udp => Protocol::Udp,
            Self::Tcp => Protocol::Tcp,
        }
    }
}

/// What to do with one packet.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing.
    Drop,
    /// Ask the upstream resolvers ([`DnsServer::forward`]).
    Forward(Box<Request>),
}

/// The DNS server; see the module docs.
pub struct DnsServer {
    zone: Arc<ArcSwap<ClusterSetZone>>,
    forwarder: Option<Resolver<TokioRuntimeProvider>>,
    forwards: Arc<Semaphore>,
    policy: DnsPolicy,
    rate_limiter: RateLimiter,
    tcp: Arc<ConnectionLimiter>,
    metrics: DnsMetrics,
}

impl DnsServer {
    /// A server answering from `zone`, forwarding per `forward` (REFUSED for
    /// names outside the zone when `None`), protected per `policy`.
    pub fn new(
        zone: Arc<ArcSwap<ClusterSetZone>>,
        forward: Option<&ForwardConfig>,
        policy: DnsPolicy,
        metrics: DnsMetrics,
    ) -> Result<Self, String> {
        let forwarder = forward
            .filter(|f| !f.upstreams.is_empty())
            .map(resolver)
            .transpose()?;
        Ok(Self {
            zone,
            forwarder,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS_IN_FLIGHT)),
            rate_limiter: RateLimiter::new(policy.rate_limit),
            tcp: ConnectionLimiter::new(policy.tcp),
            policy,
            metrics,
        })
    }

    /// Its protection settings.
    pub fn policy(&self) -> &DnsPolicy {
        &self.policy
    }

    /// The metrics.
    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }

    /// Decides what to do with `packet`: answers it from the zone, refuses
    /// or rejects it, or hands it to [`Self::forward`].
    pub fn handle(&self, packet: &[u8], src: SocketAddr, transport: Transport) -> Step {
        // Over UDP the source may be spoofed: limit what any one source gets
        // before spending anything on it (TCP sources are proven by the
        // handshake and capped by connections instead).
        let verdict = match transport {
            Transport::Udp => self.rate_limiter.check(src.ip(), Instant::now()),
            Transport::Tcp => Verdict::Answer,
        };
        if verdict == Verdict::Drop {
            self.rate_limited(RateLimitAction::Drop);
            return Step::Drop;
        }
        let allowed = self.policy.allow_sources.allows(src.ip());
        let request = match Request::from_bytes(packet.to_vec(), src, transport.protocol()) {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!(%src, transport = transport.label(), error = %e, "malformed DNS packet");
                return self.malformed_reply(packet, transport, allowed, verdict);
            }
        };
        if request.metadata.message_type == MessageType::Response {
            self.malformed(transport);
            return Step::Drop;
        }
        if !question_names_are_self_contained(request.queries.as_bytes()) {
            // hickory echoes the question's bytes as they came: a pointer into
            // the header would point at the response's own header and make
            // the reply unreadable (found by the dns_message fuzz target).
            tracing::debug!(%src, transport = transport.label(), "DNS question compressed into the header");
            return self.malformed_reply(packet, transport, allowed, verdict);
        }
        let edns = response_edns(&request);
        if verdict == Verdict::Slip {
            // Empty, with TC: a real client asks again over TCP.
            self.rate_limited(RateLimitAction::Slip);
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.truncation = true;
            return Step::Reply(self.encode(
                &request,
                metadata,
                edns.as_ref(),
                transport,
                Sections::EMPTY,
            ));
        }
        if !allowed {
            tracing::debug!(%src, transport = transport.label(), "DNS query from a source outside dns.allow_sources: REFUSED");
            return self.refuse(&request, edns.as_ref(), transport, PolicyRefusal::Source);
        }
        // Neither the zone's nor an upstream's answer: only an rcode.
        let unanswered = |rcode| {
            self.reply(
                &request,
                edns.as_ref(),
                transport,
                rcode,
                AnswerSource::NoSource,
            )
        };
        let query = match answerable(&request) {
            Ok(query) => query,
            Err(rcode) => return unanswered(rcode),
        };
        if transfer(query.query_type()) {
            // The zone is built from the catalog and never transferred.
            tracing::debug!(%src, transport = transport.label(), "zone transfer asked: REFUSED");
            return self.refuse(&request, edns.as_ref(), transport, PolicyRefusal::Transfer);
        }
        let zone = self.zone.load();
        let answer = zone.lookup(query.name(), query.query_type());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = answer.is_authoritative();
        // A negative answer carries the SOA of the zone it comes from.
        let soa = match &answer {
            Answer::NoData(soa) | Answer::NxDomain(soa) => vec![*soa],
            _ => Vec::new(),
        };
        let (rcode, answers, authorities, additionals): (_, &[&Record], &[&Record], &[&Record]) =
            match &answer {
                Answer::Found {
                    answers,
                    additionals,
                } => (ResponseCode::NoError, answers, &[], additionals),
                Answer::NoData(_) => (ResponseCode::NoError, &[], &soa, &[]),
                Answer::NxDomain(_) => (ResponseCode::NXDomain, &[], &soa, &[]),
                Answer::NotOurs if self.forwarder.is_some() => {
                    if query.query_type() == RecordType::ANY {
                        return self.any_hinfo(
                            &request,
                            query.name().into(),
                            edns.as_ref(),
                            transport,
                        );
                    }
                    return Step::Forward(Box::new(request));
                }
                Answer::NotOurs => return unanswered(ResponseCode::Refused),
            };
        metadata.response_code = rcode;
        self.count(&request, rcode, AnswerSource::Clusterset);
        Step::Reply(self.encode(
            &request,
            metadata,
            edns.as_ref(),
            transport,
            Sections {
                answers,
                authorities,
                additionals,
            },
        ))
    }

    /// Answers `request` from the upstream resolvers (or their cache). When
    /// too many forwards are in flight, answers SERVFAIL at once.
    pub async fn forward(&self, request: &Request, transport: Transport) -> Vec<u8> {
        let edns = response_edns(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let (Some(resolver), Ok(info)) = (&self.forwarder, request.request_info()) else {
            metadata.response_code = ResponseCode::Refused;
            self.count(request, ResponseCode::Refused, AnswerSource::NoSource);
            return self.encode(request, metadata, edns.as_ref(), transport, Sections::EMPTY);
        };
        let Ok(_permit) = self.forwards.try_acquire() else {
            self.metrics
                .overloaded
                .with_label_values(&[transport.label()])
                .inc();
            metadata.response_code = ResponseCode::ServFail;
            self.count(request, ResponseCode::ServFail, AnswerSource::Forward);
            return self.encode(request, metadata, edns.as_ref(), transport, Sections::EMPTY);
        };
        let started = Instant::now();
        let name: Name = info.query.name().into();
        let result = resolver.lookup(name, info.query.query_type()).await;
        self.metrics
            .forward_duration
            .observe(started.elapsed().as_secs_f64());
        let (rcode, records, authorities) = match result {
            Ok(lookup) => {
                // Cached answers count down to their expiry.
                let left = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now())
                    .as_secs();
                let left = u32::try_from(left).unwrap_or(u32::MAX);
                let records: Vec<Record> = lookup
                    .answers()
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        r.ttl = r.ttl.min(left);
                        r
                    })
                    .collect();
                (ResponseCode::NoError, records, Vec::new())
            }
            Err(e) if e.is_no_records_found() => {
                let rcode = if e.is_nx_domain() {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                let soa = e.into_soa().map(|soa| soa.into_record_of_rdata());
                (rcode, Vec::new(), soa.into_iter().collect())
            }
            Err(e) => {
                tracing::debug!(name = %info.query.name(), error = %e, "forwarded query failed");
                (ResponseCode::ServFail, Vec::new(), Vec::new())
            }
        };
        metadata.response_code = rcode;
        self.count(request, rcode, AnswerSource::Forward);
        let answers: Vec<&Record> = records.iter().collect();
        let authorities: Vec<&Record> = authorities.iter().collect();
        self.encode(
            request,
            metadata,
            edns.as_ref(),
            transport,
            Sections {
                answers: &answers,
                authorities: &authorities,
                additionals: &[],
            },
        )
    }

    /// REFUSED by policy, counted under `reason`.
    fn refuse(
        &self,
        request: &Request,
        edns: Option<&Edns>,
        transport: Transport,
        reason: PolicyRefusal,
    ) -> Step {
        self.refused(reason);
        let rcode = ResponseCode::Refused;
        self.reply(request, edns, transport, rcode, AnswerSource::Policy)
    }

    fn reply(
        &self,
        request: &Request,
        edns: Option<&Edns>,
        transport: Transport,
        rcode: ResponseCode,
        source: AnswerSource,
    ) -> Step {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = rcode;
        self.count(request, rcode, source);
        Step::Reply(self.encode(request, metadata, edns, transport, Sections::EMPTY))
    }

    /// The RFC 8482 answer to ANY for a name that is not ours: one
    /// synthesised HINFO, rather than forwarding a query that exists mostly
    /// to amplify.
    fn any_hinfo(
        &self,
        request: &Request,
        name: Name,
        edns: Option<&Edns>,
        transport: Transport,
    ) -> Step {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let hinfo = Record::from_rdata(
            name,
            ANY_HINFO_TTL,
            RData::HINFO(HINFO::new("RFC8482".to_owned(), String::new())),
        );
        self.count(request, ResponseCode::NoError, AnswerSource::Rfc8482);
        let sections = Sections {
            answers: &[&hinfo],
            ..Sections::EMPTY
        };
        Step::Reply(self.encode(request, metadata, edns, transport, sections))
    }

    /// FORMERR (or nothing) for a malformed packet; nothing at all for a
    /// source outside `allow_sources` or one over its rate limit.
    fn malformed_reply(
        &self,
        packet: &[u8],
        transport: Transport,
        allowed: bool,
        verdict: Verdict,
    ) -> Step {
        self.malformed(transport);
        if !allowed {
            self.refused(PolicyRefusal::Source);
            return Step::Drop;
        }
        if verdict == Verdict::Slip {
            self.rate_limited(RateLimitAction::Drop);
            return Step::Drop;
        }
        formerr(packet)
    }

    fn refused(&self, reason: PolicyRefusal) {
        inc(&self.metrics.refused, reason.label());
    }

    fn rate_limited(&self, action: RateLimitAction) {
        inc(&self.metrics.rate_limited, action.label());
    }

    fn malformed(&self, transport: Transport) {
        inc(&self.metrics.malformed, transport.label());
    }

    fn tcp_refused(&self, reason: TcpRefusal) {
        inc(&self.metrics.tcp_refused, reason.label());
    }

    fn count(&self, request: &Request, rcode: ResponseCode, source: AnswerSource) {
        let rtype = request
            .queries
            .queries()
            .first()
            .map_or(QueryType::NoQuestion, |q| QueryType::of(q.query_type()));
        self.metrics
            .queries
            .with_label_values(&[rtype.label(), Rcode::of(rcode).label(), source.label()])
            .inc();
    }

    fn encode(
        &self,
        request: &Request,
        metadata: Metadata,
        edns: Option<&Edns>,
        transport: Transport,
        sections: Sections<'_>,
    ) -> Vec<u8> {
        let Sections {
            answers,
            authorities,
            additionals,
        } = sections;
        let max = match (transport, &request.edns) {
            (Transport::Tcp, _) => u16::MAX,
            (Transport::Udp, Some(e)) => e.max_payload().clamp(512, MAX_UDP_PAYLOAD),
            (Transport::Udp, None) => 512,
        };
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(edns) = edns {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            answers.iter().copied(),
            authorities.iter().copied(),
            std::iter::empty(),
            additionals.iter().copied(),
        );
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        match response.destructive_emit(&mut encoder) {
            Ok(info) => {
                if info.truncation {
                    self.metrics.truncated.inc();
                }
                bytes
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a DNS answer; sending SERVFAIL");
                Message::error_msg(metadata.id, metadata.op_code, ResponseCode::ServFail)
                    .to_vec()
                    .unwrap_or_default()
            }
        }
    }
}

/// The record sections of a reply (its update section is always empty).
#[derive(Debug, Clone, Copy)]
struct Sections<'a> {
    answers: &'a [&'a Record],
    authorities: &'a [&'a Record],
    additionals: &'a [&'a Record],
}

impl Sections<'_> {
    /// No records: a reply that is all header (an error, a truncation).
    const EMPTY: Sections<'static> = Sections {
        answers: &[],
        authorities: &[],
        additionals: &[],
    };
}

/// Whether every name in the question section `bytes` (as it came, starting
/// at offset 12 of the message) stands on its own: a compression pointer may
/// point only at an earlier question, never into the 12-byte header, which
/// holds no name (a request doing so is malformed, and its question could not
/// be echoed in a reply, whose header differs).
/// Counts one more event under `label` in a labelled counter.
fn inc(counter: &prometheus::IntCounterVec, label: &str) {
    counter.with_label_values(&[label]).inc();
}

fn question_names_are_self_contained(bytes: &[u8]) -> bool {
    const HEADER: usize = 12;
    let mut i = 0;
    while i < bytes.len() {
        // One name: labels up to the root, or up to a pointer that ends it.
        loop {
            let Some(&len) = bytes.get(i) else {
                return false;
            };
            match len {
                0 => {
                    i += 1;
                    break;
                }
                l if l & 0xC0 == 0xC0 => {
                    let Some(&low) = bytes.get(i + 1) else {
                        return false;
                    };
                    let target = (usize::from(l & 0x3F) << 8) | usize::from(low);
                    if target < HEADER || target >= HEADER + i {
                        return false;
                    }
                    i += 2;
                    break;
                }
                l => i += 1 + usize::from(l),
            }
        }
        // Type and class.
        i += 4;
    }
    i == bytes.len()
}

/// The one question of `request`, or the response code refusing it: a newer
/// EDNS version, an opcode other than QUERY, not exactly one question (nobody
/// sends that), or a class other than IN.
fn answerable(request: &Request) -> Result<&LowerQuery, ResponseCode> {
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Err(ResponseCode::BADVERS);
    }
    if request.metadata.op_code != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    let info = request.request_info().map_err(|_| ResponseCode::FormErr)?;
    if info.query.query_class() != DNSClass::IN {
        return Err(ResponseCode::Refused);
    }
    Ok(info.query)
}

/// FORMERR for a packet with a readable header; nothing otherwise.
fn formerr(packet: &[u8]) -> Step {
    if packet.len() < 12 {
        return Step::Drop;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    // A packet with the QR bit set claims to be a response: never answer one.
    if packet[2] & 0x80 != 0 {
        return Step::Drop;
    }
    match Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
        Ok(bytes) => Step::Reply(bytes),
        Err(_) => Step::Drop,
    }
}

/// The EDNS of the answer, when the query had EDNS (RFC 6891).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|_| {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        edns.set_version(0);
        edns
    })
}

fn resolver(forward: &ForwardConfig) -> Result<Resolver<TokioRuntimeProvider>, String> {
    let servers = forward
        .upstreams
        .iter()
        .map(|addr| {
            let connections = [ProtocolConfig::Udp, ProtocolConfig::Tcp]
                .into_iter()
                .map(|protocol| {
                    let mut c = ConnectionConfig::new(protocol);
                    c.port = addr.port();
                    c
                })
                .collect();
            NameServerConfig::new(addr.ip(), true, connections)
        })
        .collect();
    let mut builder = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    );
    let options = builder.options_mut();
    options.timeout = forward.timeout;
    options.attempts = 2;
    options.cache_size = forward.cache_size;
    // Forward names as asked: no search list, no /etc/hosts, and keep CNAME
    // chains in the answer.
    options.ndots = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.preserve_intermediates = true;
    options.edns0 = true;
    builder
        .build()
        .map_err(|e| format!("cannot build the forwarding resolver: {e}"))
}

/// Serves DNS over UDP on `socket` until `stop`.
pub async fn serve_udp(server: Arc<DnsServer>, socket: UdpSocket, mut stop: watch::Receiver<bool>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; usize::from(MAX_UDP_PAYLOAD)];
    loop {
        let (len, src) = tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; keep going.
                    tracing::debug!(error = %e, "DNS UDP receive error");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if src.port() == 0 {
            continue;
        }
        match server.handle(&buf[..len], src, Transport::Udp) {
            Step::Reply(bytes) => {
                let _ = socket.send_to(&bytes, src).await;
            }
            Step::Drop => {}
            Step::Forward(request) => {
                let server = server.clone();
                let socket = socket.clone();
                tokio::spawn(async move {
                    let bytes = server.forward(&request, Transport::Udp).await;
                    let _ = socket.send_to(&bytes, src).await;
                });
            }
        }
    }
}

/// Serves DNS over TCP on `listener` until `stop` (RFC 7766: several queries
/// per connection, answered in order, closed when idle).
pub async fn serve_tcp(
    server: Arc<DnsServer>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, src) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS TCP accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Refusals close the connection at once (dropping the stream): no
        // one waits behind a source that holds too many.
        if !server.policy.allow_sources.allows(src.ip()) {
            server.tcp_refused(TcpRefusal::Source);
            tracing::debug!(%src, "DNS TCP connection from a source outside dns.allow_sources: closed");
            continue;
        }
        let permit = match server.tcp.try_acquire(src.ip()) {
            Ok(permit) => permit,
            Err(why) => {
                server.tcp_refused(why.into());
                tracing::debug!(%src, reason = %why, "DNS TCP connection refused");
                continue;
            }
        };
        server.metrics.tcp_connections.inc();
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            connection(&server, stream, src, stop).await;
            drop(permit);
            server.metrics.tcp_connections.dec();
        });
    }
}

async fn connection(
    server: &DnsServer,
    mut stream: TcpStream,
    src: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let idle = server.policy.tcp_idle_timeout;
    let mut buf = Vec::new();
    loop {
        let len = tokio::select! {
            len = tokio::time::timeout(idle, stream.read_u16()) => match len {
                Ok(Ok(len)) => usize::from(len),
                Ok(Err(_)) => return,
                Err(_) => {
                    server.metrics.tcp_idle_closed.inc();
                    return;
                }
            },
            _ = stop.changed() => return,
        };
        buf.resize(len, 0);
        match tokio::time::timeout(idle, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                server.metrics.tcp_idle_closed.inc();
                return;
            }
        }
        let reply = match server.handle(&buf, src, Transport::Tcp) {
            Step::Reply(bytes) => bytes,
            Step::Drop => continue,
            Step::Forward(request) => server.forward(&request, Transport::Tcp).await,
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        // A client that does not read its answers holds the connection no
        // longer than one that sends nothing.
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                server.metrics.tcp_idle_closed.inc();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;
    use crate::dns::zone::tests::zone;

    const SRC: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5300);

    fn server() -> DnsServer {
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
        DnsServer::new(
            Arc::new(ArcSwap::from_pointee(zone().0)),
            None,
            DnsPolicy::default(),
            metrics,
        )
        .unwrap()
    }

    fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.edns = Some(e);
        }
        m.to_vec().unwrap()
    }

    fn reply(step: Step) -> Message {
        match step {
            Step::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// The reply to a plain UDP query (no EDNS) for `name` from `SRC`.
    fn ask(s: &DnsServer, name: &str, rtype: RecordType) -> Message {
        reply(s.handle(&query(name, rtype, None), SRC, Transport::Udp))
    }

    #[test]
    fn answers_are_authoritative_and_outside_names_refused_without_upstreams() {
        let s = server();
        let m = ask(&s, "web.shop.svc.clusterset.local.", RecordType::A);
        assert_eq!(m.metadata.id, 4242);
        assert!(m.metadata.authoritative);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        let refused = ask(&s, "example.com.", RecordType::A);
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
        let nx = reply(s.handle(
            &query("nope.shop.svc.clusterset.local.", RecordType::A, Some(1232)),
            SRC,
            Transport::Udp,
        ));
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.authorities.len(), 1, "the SOA");
        assert!(nx.edns.is_some(), "EDNS in, EDNS out");
    }

    fn server_with(policy: DnsPolicy) -> DnsServer {
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
        DnsServer::new(
            Arc::new(ArcSwap::from_pointee(zone().0)),
            None,
            policy,
            metrics,
        )
        .unwrap()
    }

    #[test]
    fn sources_outside_allow_sources_are_refused_over_either_transport() {
        let s = server_with(DnsPolicy {
            allow_sources: super::super::guard::SourceAcl::new(vec![
                "127.0.0.1/32".parse().unwrap(),
            ]),
            ..DnsPolicy::default()
        });
        let outsider: SocketAddr = "127.0.0.3:5300".parse().unwrap();
        let web = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        for transport in [Transport::Udp, Transport::Tcp] {
            let m = reply(s.handle(&web, outsider, transport));
            assert_eq!(m.metadata.response_code, ResponseCode::Refused);
            assert!(m.answers.is_empty());
            let m = reply(s.handle(&web, SRC, transport));
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(m.answers.len(), 1);
        }
        // Garbage from an outsider gets nothing, not even FORMERR.
        assert!(matches!(
            s.handle(&web[..20], outsider, Transport::Udp),
            Step::Drop
        ));
        assert_eq!(s.metrics().refused.with_label_values(&["source"]).get(), 3);
    }

    #[test]
    fn transfers_are_refused_and_any_is_minimal() {
        let s = server();
        for rtype in [RecordType::AXFR, RecordType::IXFR] {
            for transport in [Transport::Udp, Transport::Tcp] {
                let m = reply(s.handle(&query("clusterset.local.", rtype, None), SRC, transport));
                assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{rtype}");
                assert!(m.answers.is_empty());
            }
        }
        assert_eq!(
            s.metrics().refused.with_label_values(&["transfer"]).get(),
            4
        );
        let m = ask(&s, "web.shop.svc.clusterset.local.", RecordType::ANY);
        assert_eq!(m.answers.len(), 1, "one RRset of A and AAAA");
        // Without upstreams, ANY for other names is refused like any query.
        let m = ask(&s, "example.com.", RecordType::ANY);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn ptr_outside_the_ranges_is_not_ours() {
        // data/db's endpoint 10.1.0.5 has a hostname but is outside the
        // ranges: without upstreams the query is REFUSED like other names.
        let s = server();
        let m = ask(&s, "5.0.1.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn udp_floods_are_dropped_or_slipped_and_tcp_is_not_limited() {
        let mut policy = DnsPolicy::default();
        policy.rate_limit.per_second = 1;
        policy.rate_limit.burst = 2;
        policy.rate_limit.slip = 2;
        let s = server_with(policy);
        let web = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        let mut answered = 0;
        let mut slipped = 0;
        let mut dropped = 0;
        let started = Instant::now();
        for _ in 0..100 {
            match s.handle(&web, SRC, Transport::Udp) {
                Step::Reply(bytes) => {
                    let m = Message::from_vec(&bytes).unwrap();
                    if m.metadata.truncation {
                        assert!(m.answers.is_empty());
                        assert_eq!(m.metadata.id, 4242);
                        slipped += 1;
                    } else {
                        answered += 1;
                    }
                }
                Step::Drop => dropped += 1,
                Step::Forward(_) => unreachable!(),
            }
        }
        // The burst, and one a second after it.
        let refilled = started.elapsed().as_secs() + 1;
        assert!(answered >= 2 && answered <= 2 + refilled, "{answered}");
        let limited = 100 - answered;
        assert_eq!(slipped + dropped, limited);
        assert!(
            slipped.abs_diff(dropped) <= refilled + 1,
            "{slipped} {dropped}"
        );
        assert_eq!(
            s.metrics().rate_limited.with_label_values(&["slip"]).get(),
            slipped
        );
        // Another source, and TCP, are answered.
        let other: SocketAddr = "127.0.0.2:5300".parse().unwrap();
        assert_eq!(
            reply(s.handle(&web, other, Transport::Udp)).answers.len(),
            1
        );
        assert_eq!(reply(s.handle(&web, SRC, Transport::Tcp)).answers.len(), 1);
    }

    #[test]
    fn bad_packets_get_formerr_or_nothing() {
        let s = server();
        assert!(matches!(s.handle(&[], SRC, Transport::Udp), Step::Drop));
        assert!(matches!(
            s.handle(&[1, 2, 3], SRC, Transport::Tcp),
            Step::Drop
        ));
        let mut truncated = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        truncated.truncate(20);
        let m = reply(s.handle(&truncated, SRC, Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered (no reflection loops).
        let mut response = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        response[2] |= 0x80;
        assert!(matches!(
            s.handle(&response, SRC, Transport::Udp),
            Step::Drop
        ));
        // Unknown opcode, and an EDNS version from the future.
        // A question compressed into the header (from the fuzz target): it
        // cannot be echoed, so FORMERR, and the reply parses.
        let into_header = [
            1, 0, 0, 6, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x00, 0x01, 0x00, 0x40, 0x00,
        ];
        let m = reply(s.handle(&into_header, SRC, Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(question_names_are_self_contained(&[
            3, b'w', b'e', b'b', 0, 0, 1, 0, 1
        ]));
        // A second question may point at the first.
        assert!(question_names_are_self_contained(&[
            1, b'a', 0, 0, 1, 0, 1, 0xc0, 12, 0, 1, 0, 1
        ]));
        assert!(!question_names_are_self_contained(&[0xc0, 12, 0, 1, 0, 1]));
        let mut notify = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        notify[2] |= 4 << 3;
        assert_eq!(
            reply(s.handle(&notify, SRC, Transport::Udp))
                .metadata
                .response_code,
            ResponseCode::NotImp
        );
        let mut m =
            Message::from_vec(&query("a.clusterset.local.", RecordType::A, Some(1232))).unwrap();
        if let Some(e) = m.edns.as_mut() {
            e.set_version(1);
        }
        let badvers = reply(s.handle(&m.to_vec().unwrap(), SRC, Transport::Udp));
        // BADVERS and BADSIG share code 16 (RFC 6891, RFC 8945).
        assert_eq!(u16::from(badvers.metadata.response_code), 16);
        assert_eq!(s.metrics().malformed.with_label_values(&["udp"]).get(), 4);
    }

    #[test]
    fn udp_answers_fit_the_clients_buffer_with_tc_and_tcp_answers_do_not_need_to() {
        // 300 endpoints: about 4.8 KB of A records.
        let entry = crate::catalog::ServiceEntry {
            headless: true,
            headless_endpoints: (0..300u32)
                .map(|i| crate::catalog::HeadlessEndpoint {
                    cluster: "east".parse().unwrap(),
                    hostname: None,
                    address: std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                })
                .collect(),
            ..crate::catalog::ServiceEntry::exported("data/big".parse().unwrap())
        };
        let zone = ClusterSetZone::build(
            &crate::Catalog::new([entry]),
            &super::super::Allocations::default(),
            &[],
            super::super::ZoneSettings { ttl: 5, serial: 1 },
            &super::super::Unready::default(),
        );
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).unwrap();
        let s = DnsServer::new(
            Arc::new(ArcSwap::from_pointee(zone)),
            None,
            DnsPolicy::default(),
            metrics,
        )
        .unwrap();
        let name = "big.data.svc.clusterset.local.";
        for (edns, transport, max) in [
            (None, Transport::Udp, 512),
            (Some(1232), Transport::Udp, 1232),
            (Some(65000), Transport::Udp, usize::from(MAX_UDP_PAYLOAD)),
        ] {
            let Step::Reply(bytes) = s.handle(&query(name, RecordType::A, edns), SRC, transport)
            else {
                panic!("no reply");
            };
            assert!(bytes.len() <= max, "{} > {max}", bytes.len());
            let m = Message::from_vec(&bytes).unwrap();
            assert!(m.metadata.truncation, "TC set for {edns:?}");
        }
        let full = reply(s.handle(&query(name, RecordType::A, None), SRC, Transport::Tcp));
        assert!(!full.metadata.truncation);
        assert_eq!(full.answers.len(), 300);
        assert_eq!(s.metrics().truncated.get(), 3);
    }

    #[test]
    fn the_fuzz_seeds_are_queries_this_server_answers() {
        let s = server();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/dns_message");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let asked = Message::from_vec(&bytes).unwrap();
            let m = reply(s.handle(&bytes, SRC, Transport::Udp));
            assert_eq!(m.metadata.id, asked.metadata.id, "{}", path.display());
            assert!(
                matches!(
                    m.metadata.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                ),
                "{}: {:?}",
                path.display(),
                m.metadata.response_code
            );
            n += 1;
        }
        assert!(n >= 8);
    }
}
