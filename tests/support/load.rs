//! A steady-rate (open-loop) HTTP/1.1 load generator: `GET` every
//! `1/rate` seconds over `connections` keep-alive connections used in turn,
//! every request with its own timeout. A request that hangs does not hold up
//! the schedule: when no connection is idle, another is opened. Every request
//! is recorded (start, latency, which upstream answered or why it failed);
//! [`Report`] cuts them into one-second buckets.
//!
//! A failure is a transport error, a timeout or a non-2xx status; a
//! connection is reused only after a success whose response did not say
//! `Connection: close`.

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// What to send, where, how fast.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The address connected to.
    pub target: SocketAddr,
    /// The `Host` header.
    pub authority: String,
    /// The request path.
    pub path: String,
    /// Keep-alive connections opened up front (more when all are busy).
    pub connections: usize,
    /// Requests per second over all connections.
    pub rate: f64,
    /// Longest wait for one complete response.
    pub timeout: Duration,
    /// When set, a success is attributed to `<served_by> via <value>`, the
    /// value of this request header as the upstream echoed it (an
    /// [`EchoServer`](crate::EchoServer) behind several gateways, told apart
    /// by the `x-forwarded-client-cert` each sends).
    pub via_header: Option<String>,
}

impl LoadSpec {
    /// 250 requests/s of `GET /` over 20 connections, 10 s timeout.
    pub fn new(target: SocketAddr, authority: &str) -> Self {
        Self {
            target,
            authority: authority.to_owned(),
            path: "/".to_owned(),
            connections: 20,
            rate: 250.0,
            timeout: Duration::from_secs(10),
            via_header: None,
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx; `served_by` is the body's `served_by` field (an
    /// [`EchoServer`](crate::EchoServer)'s name), else the body itself.
    Ok {
        /// Who answered.
        served_by: String,
    },
    /// Transport error, timeout or non-2xx status.
    Failed {
        /// What went wrong.
        reason: String,
    },
}

/// One request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the start of the load.
    pub start: Duration,
    /// How long until it ended.
    pub latency: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

impl Sample {
    /// Who served it, when it succeeded.
    pub fn served_by(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok { served_by } => Some(served_by),
            Outcome::Failed { .. } => None,
        }
    }
}

/// Load running on its own thread and runtime until [`Load::stop`].
pub struct Load {
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    /// Starts sending.
    pub fn start(spec: LoadSpec) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let thread = {
            let (samples, stop, opened) = (samples.clone(), stop.clone(), opened.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(run(spec, started, samples, stop, opened));
            })
        };
        Self {
            started,
            samples,
            stop,
            opened,
            thread: Some(thread),
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sleeps until `at` after the load started (at once when past).
    pub fn sleep_until(&self, at: Duration) {
        if let Some(left) = at.checked_sub(self.elapsed()) {
            std::thread::sleep(left);
        }
    }

    /// The requests that ended so far.
    pub fn snapshot(&self) -> Report {
        Report {
            samples: self.samples.lock().clone(),
            duration: self.elapsed(),
            connections: self.opened.load(Ordering::Relaxed),
        }
    }

    /// Stops sending, waits for requests in flight (at most their timeout)
    /// and reports.
    pub fn stop(mut self) -> Report {
        let duration = self.elapsed();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut samples = self.samples.lock().clone();
        samples.sort_by_key(|s| s.start);
        Report {
            samples,
            duration,
            connections: self.opened.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Idle keep-alive connections, used in turn (first out, last back in).
type Pool = Mutex<VecDeque<SendRequest<Empty<Bytes>>>>;

async fn run(
    spec: LoadSpec,
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
) {
    let spec = Arc::new(spec);
    let pool: Arc<Pool> = Arc::default();
    for _ in 0..spec.connections {
        if let Ok(c) = connect(&spec).await {
            opened.fetch_add(1, Ordering::Relaxed);
            pool.lock().push_back(c);
        }
    }
    let period = Duration::from_secs_f64(1.0 / spec.rate);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::from_std(started), period);
    // Sends missed while this task was not scheduled are not made up in a
    // burst; the achieved rate shows them.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut in_flight = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        ticks.tick().await;
        while in_flight.try_join_next().is_some() {}
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (spec, pool, samples, opened) =
            (spec.clone(), pool.clone(), samples.clone(), opened.clone());
        in_flight.spawn(async move {
            let sent = Instant::now();
            let outcome =
                match tokio::time::timeout(spec.timeout, request(&spec, &pool, &opened)).await {
                    Ok(Ok(served_by)) => Outcome::Ok { served_by },
                    Ok(Err(reason)) => Outcome::Failed { reason },
                    Err(_) => Outcome::Failed {
                        reason: format!("no response within {:?}", spec.timeout),
                    },
                };
            samples.lock().push(Sample {
                start: sent - started,
                latency: sent.elapsed(),
                outcome,
            });
        });
    }
    while in_flight.join_next().await.is_some() {}
}

async fn connect(spec: &LoadSpec) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(spec.target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on an idle connection of `pool`, or on a new one when none
/// is idle; the connection goes back to the pool only after a success.
async fn request(spec: &LoadSpec, pool: &Pool, opened: &AtomicUsize) -> Result<String, String> {
    let idle = {
        let mut idle = pool.lock();
        idle.retain(|c| !c.is_closed());
        idle.pop_front()
    };
    let mut sender = match idle {
        Some(c) => c,
        None => {
            let c = connect(spec).await?;
            opened.fetch_add(1, Ordering::Relaxed);
            c
        }
    };
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let req = hyper::Request::get(spec.path.as_str())
        .header(hyper::header::HOST, spec.authority.as_str())
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    // RFC 9112 §9.6: no further request on a connection the server closes.
    let closing = resp
        .headers()
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    if !status.is_success() {
        let head: String = body.chars().take(200).collect();
        return Err(format!("status {}: {head}", status.as_u16()));
    }
    if !closing {
        pool.lock().push_back(sender);
    }
    Ok(served_by(&body, spec.via_header.as_deref()))
}

fn served_by(body: &str, via_header: Option<&str>) -> String {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(body) else {
        return body.trim().to_owned();
    };
    let Some(name) = doc["served_by"].as_str() else {
        return body.trim().to_owned();
    };
    match via_header.and_then(|h| doc["headers"][h].as_str()) {
        Some(via) => format!("{name} via {via}"),
        None => name.to_owned(),
    }
}

/// One second of load, by request start.
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    /// Seconds since the load started.
    pub second: u64,
    /// Requests that succeeded.
    pub ok: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Successes by who served them.
    pub by: BTreeMap<String, usize>,
}

impl Bucket {
    /// The share (0..=1) of this second's successes served by `who`.
    pub fn share(&self, who: &str) -> f64 {
        if self.ok == 0 {
            return 0.0;
        }
        self.by.get(who).copied().unwrap_or(0) as f64 / self.ok as f64
    }
}

/// The requests of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every request that ended, by start time.
    pub samples: Vec<Sample>,
    /// How long the load ran.
    pub duration: Duration,
    /// Connections opened.
    pub connections: usize,
}

impl Report {
    /// Requests that ended.
    pub fn total(&self) -> usize {
        self.samples.len()
    }

    /// The failed requests.
    pub fn failures(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Failed { .. }))
            .collect()
    }

    /// Requests per second sent.
    pub fn rate(&self) -> f64 {
        self.total() as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// The slowest request.
    pub fn max_latency(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.latency)
            .max()
            .unwrap_or_default()
    }

    /// Requests that started in `[from, to)`.
    pub fn between(&self, from: Duration, to: Duration) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.start >= from && s.start < to)
    }

    /// (served by `who`, succeeded) among requests started in `[from, to)`.
    pub fn served(&self, who: &str, from: Duration, to: Duration) -> (usize, usize) {
        count_served(who, self.between(from, to))
    }

    /// (served by `who`, succeeded) among requests that started at `from` or
    /// later and ended before `to`: what a window saw from start to finish (a
    /// request sent just before `to` may reach the gateway after it).
    pub fn served_within(&self, who: &str, from: Duration, to: Duration) -> (usize, usize) {
        let whole = |s: &&Sample| s.start >= from && s.start + s.latency < to;
        count_served(who, self.samples.iter().filter(whole))
    }

    /// The start of the last request in `[from, to)` served by `who`.
    pub fn last_served_by(&self, who: &str, from: Duration, to: Duration) -> Option<Duration> {
        self.between(from, to)
            .filter(|s| s.served_by() == Some(who))
            .map(|s| s.start)
            .max()
    }

    /// One-second buckets by request start.
    pub fn buckets(&self) -> Vec<Bucket> {
        let Some(last) = self.samples.iter().map(|s| s.start.as_secs()).max() else {
            return Vec::new();
        };
        let mut buckets: Vec<Bucket> = (0..=last)
            .map(|second| Bucket {
                second,
                ..Bucket::default()
            })
            .collect();
        for s in &self.samples {
            let b = &mut buckets[usize::try_from(s.start.as_secs()).unwrap_or(0)];
            match &s.outcome {
                Outcome::Ok { served_by } => {
                    b.ok += 1;
                    *b.by.entry(served_by.clone()).or_default() += 1;
                }
                Outcome::Failed { .. } => b.failed += 1,
            }
        }
        buckets
    }

    /// A few lines for the test log: totals, then one line per second.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} requests in {:.1?} ({:.0}/s) over {} connections, {} failed, max latency {:.0?}\n",
            self.total(),
            self.duration,
            self.rate(),
            self.connections,
            self.failures().len(),
            self.max_latency()
        );
        for b in self.buckets() {
            out.push_str(&format!(
                "  t={:>2}s ok={:>3} failed={:>3} {:?}\n",
                b.second, b.ok, b.failed, b.by
            ));
        }
        for f in self.failures().iter().take(20) {
            if let Outcome::Failed { reason } = &f.outcome {
                out.push_str(&format!(
                    "  failed at {:.3?} after {:.0?}: {reason}\n",
                    f.start, f.latency
                ));
            }
        }
        out
    }
}

/// (served by `who`, succeeded) among `samples`.
fn count_served<'a>(who: &str, samples: impl Iterator<Item = &'a Sample>) -> (usize, usize) {
    let ok: Vec<&str> = samples.filter_map(Sample::served_by).collect();
    (ok.iter().filter(|s| **s == who).count(), ok.len())
}
