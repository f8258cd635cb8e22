//! What a client can make an HTTP listener hold open, and for how long.
//!
//! - [`ListenerGuard::admit`]: each accepted connection takes a place from the
//!   listener's [`ConnectionLimiter`] (a total and a per-source cap); over a
//!   cap it is closed at once and counted in
//!   `isthmus_connections_refused_total{listener,reason}`, so a flood never
//!   makes anyone else wait.
//! - [`HeaderDeadline`]: a stream wrapper that cuts a connection whose request
//!   headers have not all arrived `limits.header_timeout` after they started
//!   (after the accept for a connection's first request, after the first byte
//!   for a kept-alive connection's next one), whatever the pace of the bytes.
//!   Pingora's own read timeout restarts on every byte, which a client sending
//!   one byte every 50 s never trips. For HTTP/1.1 the proxy phases tell the
//!   wrapper when the headers are in ([`headers_read`]) and when the request is
//!   over ([`request_done`]); for HTTP/2 the wrapper follows the frames itself:
//!   the preface, every frame header and every header block (HEADERS and its
//!   CONTINUATIONs) must each arrive within the deadline, and the first header
//!   block within the deadline of the accept. Cuts are counted in
//!   `isthmus_header_timeouts_total{listener}`.
//! - [`Guarded`]: a Pingora app behind both.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use isthmus_federation::limits::{
    ConnectionLimiter, ConnectionLimits, ConnectionPermit, LogLimit, Refused,
};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{ALPN, SslDigest};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::warn;

use crate::metrics::{self, Listener};

/// The refusal and cut counters every listener shares, and the count of
/// connections each holds.
#[derive(Clone)]
pub struct LimitMetrics {
    refused: IntCounterVec,
    header_timeouts: IntCounterVec,
    open: Arc<OpenConnections>,
}

/// `isthmus_connections_open{listener}`: read from the listeners' limiters
/// when gathered, so the count is the one the caps use and admitting a
/// connection costs nothing more.
struct OpenConnections {
    gauges: IntGaugeVec,
    /// Every listener's limiter; one that is gone (its listener removed)
    /// takes its series with it.
    limiters: parking_lot::Mutex<Vec<(Listener, Weak<ConnectionLimiter>)>>,
}

impl Collector for OpenConnections {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Held throughout, so that concurrent scrapes never see the reset.
        let mut limiters = self.limiters.lock();
        limiters.retain(|(_, l)| l.strong_count() > 0);
        self.gauges.reset();
        for (listener, limiter) in limiters.iter() {
            if let Some(limiter) = limiter.upgrade() {
                self.gauges
                    .with_label_values(&[listener.label()])
                    .add(limiter.open_total() as i64);
            }
        }
        self.gauges.collect()
    }
}

impl LimitMetrics {
    /// Registers the counters in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let refused = metrics::counter_vec(
            registry,
            "connections_refused_total",
            "Connections a listener closed at once, by listener and reason (total, per_source: \
             its connection caps; handshakes_total, handshakes_per_source: its caps on TLS \
             handshakes in flight; source_not_allowed: a passthrough service's allow_sources).",
            &["listener", "reason"],
        );
        let header_timeouts = metrics::counter_vec(
            registry,
            "header_timeouts_total",
            "Connections cut because a request's headers did not all arrive within \
             limits.header_timeout, by listener.",
            &["listener"],
        );
        let open = Arc::new(OpenConnections {
            gauges: IntGaugeVec::new(
                Opts::new(
                    "connections_open",
                    "Connections a listener holds open now (what its connection caps count), by \
                     listener.",
                )
                .namespace(metrics::NAMESPACE),
                &["listener"],
            )
            .expect("static metric definition is valid"),
            limiters: Default::default(),
        });
        metrics::register(registry, SharedCollector(open.clone()));
        Self {
            refused,
            header_timeouts,
            open,
        }
    }
}

/// Registers a collector that is also held elsewhere.
struct SharedCollector(Arc<OpenConnections>);

impl Collector for SharedCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

isthmus_federation::label_enum! {
    /// Why a listener closed a connection at once: the `reason` label of
    /// `isthmus_connections_refused_total`.
    pub enum RefusalReason {
        /// The listener holds its total of connections already.
        Total => "total",
        /// The source holds its share of the listener's connections already.
        PerSource => "per_source",
        /// The east-west listener holds its total of TLS handshakes in flight.
        HandshakesTotal => "handshakes_total",
        /// The source holds its share of the east-west TLS handshakes in flight.
        HandshakesPerSource => "handshakes_per_source",
        /// The client is outside a passthrough service's `allow_sources`.
        SourceNotAllowed => "source_not_allowed",
    }
}

impl RefusalReason {
    /// The reason for a refusal by a listener's connection caps.
    pub fn connections(refused: Refused) -> Self {
        match refused {
            Refused::Total => Self::Total,
            Refused::PerSource => Self::PerSource,
        }
    }

    /// The reason for a refusal by the caps on TLS handshakes in flight.
    pub fn handshakes(refused: Refused) -> Self {
        match refused {
            Refused::Total => Self::HandshakesTotal,
            Refused::PerSource => Self::HandshakesPerSource,
        }
    }
}

/// Logs an attacker can trigger in bulk at most once per [`LOG_EVERY`].
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's caps, deadline and counters.
#[derive(Clone)]
pub struct ListenerGuard {
    listener: Listener,
    limiter: Arc<ConnectionLimiter>,
    header_timeout: Duration,
    metrics: LimitMetrics,
    cut: IntCounter,
    /// Refusals are logged at most once per [`LOG_EVERY`].
    log: Arc<LogLimit>,
}

impl ListenerGuard {
    /// The guard of `listener` (the metric label) with `limits`.
    pub fn new(
        listener: Listener,
        limits: ConnectionLimits,
        header_timeout: Duration,
        metrics: &LimitMetrics,
    ) -> Self {
        let limiter = ConnectionLimiter::new(limits);
        metrics
            .open
            .limiters
            .lock()
            .push((listener, Arc::downgrade(&limiter)));
        Self {
            listener,
            limiter,
            header_timeout,
            cut: metrics
                .header_timeouts
                .with_label_values(&[listener.label()]),
            metrics: metrics.clone(),
            log: Arc::new(LogLimit::new(LOG_EVERY)),
        }
    }

    /// The listener's name in metrics and logs.
    pub fn listener(&self) -> Listener {
        self.listener
    }

    /// Admits a connection from `source` or counts (and logs, now and then)
    /// why not.
    pub fn admit_from(&self, source: IpAddr) -> Option<ConnectionPermit> {
        self.limiter
            .try_acquire(source)
            .map_err(|refused| {
                self.refused(RefusalReason::connections(refused), source, &refused);
            })
            .ok()
    }

    /// Admits `stream` by its peer's address (see [`Self::admit_from`]).
    pub fn admit(&self, stream: &Stream) -> Option<ConnectionPermit> {
        self.admit_from(peer_ip(stream))
    }

    /// Counts a connection from `source` refused for `reason`, and logs it at
    /// WARN at most once per 10 s per listener.
    pub fn refused(&self, reason: RefusalReason, source: IpAddr, why: &dyn fmt::Display) {
        let reason = reason.label();
        self.metrics
            .refused
            .with_label_values(&[self.listener.label(), reason])
            .inc();
        if let Some(held_back) = self.log.allow() {
            warn!(
                listener = self.listener.label(),
                reason,
                %source,
                held_back,
                "connection refused: {why} (further refusals on this listener are counted in \
                 isthmus_connections_refused_total and logged at most every 10s)"
            );
        }
    }

    /// `stream` under this listener's header deadline, starting now.
    pub fn deadline(&self, stream: Stream) -> Stream {
        Box::new(HeaderDeadline::new(
            stream,
            self.header_timeout,
            self.cut.clone(),
        ))
    }
}

/// The address of `stream`'s peer; unspecified when unknown (one source).
pub fn peer_ip(stream: &Stream) -> IpAddr {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// A Pingora app whose connections are admitted by a [`ListenerGuard`] and
/// read under its header deadline.
pub struct Guarded<A> {
    app: Arc<A>,
    guard: ListenerGuard,
}

impl<A> Guarded<A> {
    /// `app` behind `guard`.
    pub fn new(app: Arc<A>, guard: ListenerGuard) -> Self {
        Self { app, guard }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _permit = self.guard.admit(&stream)?;
        let mut stream = self.guard.deadline(stream);
        // The place is held for the connection's whole life, reuses included.
        loop {
            stream = self.app.process_new(stream, shutdown).await?;
        }
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Pingora HTTP/1.1 session phases call this once the request's headers are
/// read: the deadline no longer applies to this request (its body has the
/// read timeouts).
pub fn headers_read(stream: Option<&Stream>) {
    signal(stream, Command::HeadersRead);
}

/// ... and this once the request is over: the next request on a kept-alive
/// connection has the deadline again, from its first byte.
pub fn request_done(stream: Option<&Stream>) {
    signal(stream, Command::RequestDone);
}

fn signal(stream: Option<&Stream>, command: Command) {
    // `as_any` on the trait object itself, not on the Box (which is an IO too).
    if let Some(deadline) = stream.and_then(|s| (**s).as_any().downcast_ref::<HeaderDeadline>()) {
        deadline.command.store(command as u8, Ordering::Release);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Command {
    None = 0,
    HeadersRead = 1,
    RequestDone = 2,
}

/// Where the connection is, as far as the deadline goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not known yet whether it is HTTP/2: the first bytes are compared with
    /// the preface (`matched` of them so far).
    Sniffing { matched: usize },
    /// HTTP/1.1: the proxy phases drive the deadline.
    Http1,
    /// HTTP/2: the frames drive it.
    Http2(H2Frames),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_FRAME_HEADER: usize = 9;
const H2_HEADERS: u8 = 0x1;
const H2_CONTINUATION: u8 = 0x9;
const H2_END_HEADERS: u8 = 0x4;

/// Follows HTTP/2 frame boundaries (lengths and types only, never payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct H2Frames {
    header: [u8; H2_FRAME_HEADER],
    /// Bytes of the current frame header seen.
    header_seen: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// The current payload belongs to a header block.
    in_header_frame: bool,
    /// The current header frame ends its block.
    ends_block: bool,
    /// A header block is open (HEADERS without END_HEADERS so far).
    block_open: bool,
    /// No header block has completed yet on this connection.
    first_pending: bool,
}

impl H2Frames {
    fn new() -> Self {
        Self {
            header: [0; H2_FRAME_HEADER],
            header_seen: 0,
            payload_left: 0,
            in_header_frame: false,
            ends_block: false,
            block_open: false,
            first_pending: true,
        }
    }

    /// Feeds bytes read from the client.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
                continue;
            }
            let n = bytes.len().min(H2_FRAME_HEADER - self.header_seen);
            self.header[self.header_seen..self.header_seen + n].copy_from_slice(&bytes[..n]);
            self.header_seen += n;
            bytes = &bytes[n..];
            if self.header_seen == H2_FRAME_HEADER {
                self.header_seen = 0;
                let h = self.header;
                let length = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                let (kind, flags) = (h[3], h[4]);
                self.in_header_frame = kind == H2_HEADERS || kind == H2_CONTINUATION;
                self.ends_block = self.in_header_frame && flags & H2_END_HEADERS != 0;
                if self.in_header_frame {
                    self.block_open = true;
                }
                self.payload_left = length;
                if length == 0 {
                    self.frame_done();
                }
            }
        }
    }

    fn frame_done(&mut self) {
        if self.in_header_frame && self.ends_block {
            self.block_open = false;
            self.first_pending = false;
        }
        self.in_header_frame = false;
        self.ends_block = false;
    }

    /// Whether the client owes header bytes now.
    fn owes_headers(&self) -> bool {
        self.first_pending
            || self.block_open
            || self.header_seen > 0
            || (self.in_header_frame && self.payload_left > 0)
    }
}

/// A stream cut when its request headers take longer than a deadline; see the
/// module docs.
pub struct HeaderDeadline {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
    /// When the headers owed now must be in; `None`: none owed, or (HTTP/1.1
    /// between requests) owed from the next byte on.
    deadline: Option<Instant>,
    /// HTTP/1.1 between requests: the next byte starts the deadline.
    await_first_byte: bool,
    timer: Pin<Box<Sleep>>,
    command: AtomicU8,
    cut: Option<IntCounter>,
    was_cut: bool,
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl HeaderDeadline {
    /// `inner`, whose first request's headers are due `timeout` from now;
    /// `cut` counts the connections cut.
    pub fn new(inner: Stream, timeout: Duration, cut: IntCounter) -> Self {
        let deadline = Instant::now() + timeout;
        Self {
            inner,
            timeout,
            phase: Phase::Sniffing { matched: 0 },
            deadline: Some(deadline),
            await_first_byte: false,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            command: AtomicU8::new(Command::None as u8),
            cut: Some(cut),
            was_cut: false,
        }
    }

    fn apply_command(&mut self) {
        let command = self.command.swap(Command::None as u8, Ordering::Acquire);
        if self.phase != Phase::Http1 && !matches!(self.phase, Phase::Sniffing { .. }) {
            return;
        }
        if command == Command::HeadersRead as u8 {
            self.phase = Phase::Http1;
            self.deadline = None;
            self.await_first_byte = false;
        } else if command == Command::RequestDone as u8 {
            self.phase = Phase::Http1;
            self.deadline = None;
            self.await_first_byte = true;
        }
    }

    /// Notes `bytes` just read from the client.
    fn observe(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match &mut self.phase {
            Phase::Sniffing { matched } => {
                let want = &H2_PREFACE[*matched..];
                let n = bytes.len().min(want.len());
                if bytes[..n] != want[..n] {
                    self.phase = Phase::Http1;
                } else {
                    *matched += n;
                    if *matched == H2_PREFACE.len() {
                        let mut frames = H2Frames::new();
                        frames.feed(&bytes[n..]);
                        self.phase = Phase::Http2(frames);
                        self.h2_rearm();
                    }
                }
            }
            Phase::Http1 => {
                if self.await_first_byte {
                    self.await_first_byte = false;
                    self.deadline = Some(Instant::now() + self.timeout);
                }
            }
            Phase::Http2(frames) => {
                frames.feed(bytes);
                self.h2_rearm();
            }
        }
    }

    fn h2_rearm(&mut self) {
        let Phase::Http2(frames) = &self.phase else {
            return;
        };
        match (frames.owes_headers(), frames.first_pending) {
            // The first header block stays due from the accept.
            (true, true) => {}
            (true, false) => {
                if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + self.timeout);
                }
            }
            (false, _) => self.deadline = None,
        }
    }

    fn cut(&mut self) -> io::Error {
        if !self.was_cut {
            self.was_cut = true;
            if let Some(c) = self.cut.take() {
                c.inc();
            }
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            "request headers not received within limits.header_timeout",
        )
    }

    /// Whether the deadline has passed; arms the timer to wake `cx` at it.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline else {
            return false;
        };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.apply_command();
        if this.was_cut || this.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(Err(this.cut()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase != Phase::Http1 || this.await_first_byte {
                    this.observe(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.poll_deadline(cx) {
                    Poll::Ready(Err(this.cut()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    /// Pingora peeks for the h2c preface before reading: that wait is under
    /// the deadline too.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.apply_command();
        let Some(deadline) = self.deadline else {
            return self.inner.try_peek(buf).await;
        };
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(peeked) => peeked,
            Err(_) => Err(self.cut()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::http::ServerSession;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Duration = Duration::from_millis(300);

    #[test]
    fn open_connections_are_the_limiters_counts_per_listener() {
        let registry = Registry::new();
        let m = LimitMetrics::new(&registry);
        let open = |listener: &str| {
            let text = String::from_utf8(metrics::render(&registry)).unwrap();
            let series = format!("isthmus_connections_open{{listener=\"{listener}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|v| v.parse::<i64>().unwrap())
        };
        let caps = ConnectionLimits {
            total: 10,
            per_source: 10,
        };
        let outbound = ListenerGuard::new(Listener::Outbound, caps, T, &m);
        let admin = ListenerGuard::new(Listener::Admin, caps, T, &m);
        let ip = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        let permits: Vec<_> = (1..=3)
            .map(|i| outbound.admit_from(ip(i)).unwrap())
            .collect();
        let one = admin.admit_from(ip(1)).unwrap();
        assert_eq!((open("outbound"), open("admin")), (Some(3), Some(1)));
        drop(permits);
        assert_eq!((open("outbound"), open("admin")), (Some(0), Some(1)));
        drop(one);
        assert_eq!(open("admin"), Some(0));
        // A listener that is gone has no series.
        drop(admin);
        assert_eq!((open("outbound"), open("admin")), (Some(0), None));
    }

    /// A deadline-wrapped server stream and its client, over loopback TCP.
    /// Asserts a read on `stream` is still waiting after three deadlines:
    /// nothing cut it (`why` says why nothing should).
    async fn uncut_for_three_deadlines(stream: &mut Stream, why: &str) {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(3 * T, stream.read(&mut buf)).await;
        assert!(read.is_err(), "{why}");
    }

    async fn pair() -> (Stream, tokio::net::TcpStream, IntCounter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let server = pingora_core::protocols::l4::stream::Stream::from(server);
        let cut = IntCounter::new("cut", "cut").unwrap();
        let stream: Stream = Box::new(HeaderDeadline::new(Box::new(server), T, cut.clone()));
        (stream, client, cut)
    }

    #[tokio::test]
    async fn trickled_headers_are_cut_at_the_deadline() {
        let (stream, mut client, cut) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let mut session = ServerSession::new_http1(stream);
        let started = std::time::Instant::now();
        let read = session.read_request().await;
        assert!(read.is_err(), "{read:?}");
        assert!(started.elapsed() >= T - Duration::from_millis(50));
        assert_eq!(cut.get(), 1);
    }

    #[tokio::test]
    async fn read_headers_disarm_and_the_next_request_rearms_from_its_first_byte() {
        let (mut stream, mut client, cut) = pair().await;
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(request).await.unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < request.len() {
            got += stream.read(&mut buf[got..]).await.unwrap();
        }
        headers_read(Some(&stream));
        // Idle past the deadline: nothing owed, so no cut.
        uncut_for_three_deadlines(
            &mut stream,
            "the wait ends by the test's timeout, not by a cut",
        )
        .await;
        request_done(Some(&stream));
        uncut_for_three_deadlines(
            &mut stream,
            "between requests nothing is owed until the first byte",
        )
        .await;
        client.write_all(b"G").await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(cut.get(), 1);
    }

    #[tokio::test]
    async fn an_h2_client_owes_its_first_header_block() {
        let (mut stream, mut client, cut) = pair().await;
        client.write_all(H2_PREFACE).await.unwrap();
        // SETTINGS, then a HEADERS frame whose payload never comes.
        client
            .write_all(&[
                0,
                0,
                0,
                0x4,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                5,
                H2_HEADERS,
                H2_END_HEADERS,
                0,
                0,
                0,
                1,
            ])
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        let err = loop {
            match stream.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!(got, H2_PREFACE.len() + 18);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(cut.get(), 1);
    }

    #[test]
    fn h2_frames_track_header_blocks() {
        let mut f = H2Frames::new();
        assert!(f.owes_headers(), "the first request is owed from the start");
        // SETTINGS, empty.
        f.feed(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        assert!(f.owes_headers());
        // HEADERS without END_HEADERS, 3 bytes of payload, split.
        f.feed(&[0, 0, 3, H2_HEADERS, 0x1, 0, 0, 0, 1, 0xaa]);
        assert!(f.block_open && f.owes_headers());
        f.feed(&[0xbb, 0xcc]);
        assert!(f.block_open, "no END_HEADERS yet");
        // CONTINUATION with END_HEADERS.
        f.feed(&[0, 0, 1, H2_CONTINUATION, H2_END_HEADERS, 0, 0, 0, 1]);
        assert!(f.owes_headers(), "its payload is still owed");
        f.feed(&[0xdd]);
        assert!(!f.owes_headers() && !f.first_pending);
        // DATA trickling is a body, not headers.
        f.feed(&[0, 0, 10, 0x0, 0, 0, 0, 0, 1, 1, 2]);
        assert!(!f.owes_headers());
        // A frame header cut in the middle is owed.
        f.feed(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(f.owes_headers());
    }
}
