//! Process lifecycle: signals, hot reload, graceful drain and systemd notification.
//!
//! - **SIGHUP** re-reads the configuration file. An invalid file is rejected with
//!   every problem logged and counted; the running configuration stays.
//! - **SIGTERM / SIGINT** stop gracefully: `STOPPING=1`, readiness turns false,
//!   in-flight work gets up to `shutdown.drain_timeout`, then Pingora stops the
//!   listeners. A second SIGTERM or SIGINT cuts the drain short.
//! - **SIGQUIT** hands the listening sockets to a new process (Pingora upgrade).
//! - `READY=1` is sent once every readiness condition holds; `WATCHDOG=1` pings run
//!   at half of `WATCHDOG_USEC` when systemd asks for them.
//!
//! Signals are handled here rather than by Pingora's default watcher because
//! Pingora knows neither SIGHUP nor draining on in-flight work.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::BackgroundService;
use prometheus::{IntCounterVec, IntGauge, Registry};
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigErrors};
use crate::health::{Drain, Readiness};
use crate::logging::LogHandle;
use crate::metrics;

/// Sends `states` to systemd when it supervises us (`NOTIFY_SOCKET` set).
pub fn notify_systemd(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Re-reads the configuration file and applies what can change at run time.
pub struct Reloader {
    path: PathBuf,
    config: Arc<ArcSwap<Config>>,
    log: Option<LogHandle>,
    trust: Option<Arc<crate::trust::Trust>>,
    federation: crate::federation::Reconfigure,
    upstreams: Arc<crate::upstream::Upstreams>,
    reloads: IntCounterVec,
    last_success: IntGauge,
}

impl Reloader {
    /// Creates the reloader and registers its metrics.
    pub fn new(
        path: PathBuf,
        config: Arc<ArcSwap<Config>>,
        log: Option<LogHandle>,
        trust: Option<Arc<crate::trust::Trust>>,
        federation: crate::federation::Reconfigure,
        upstreams: Arc<crate::upstream::Upstreams>,
        registry: &Registry,
    ) -> Self {
        let reloads = metrics::counter_vec(
            registry,
            "config_reloads_total",
            "Configuration reloads by result (success, error).",
            &["result"],
        );
        let last_success = metrics::gauge(
            registry,
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
        );
        last_success.set(unix_now());
        Self {
            path,
            config,
            log,
            trust,
            federation,
            upstreams,
            reloads,
            last_success,
        }
    }

    /// Re-reads the configuration file, then every certificate, key and bundle
    /// file (which apply or are rejected one by one, see `FileMaterial`).
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let result = self.reload_config();
        if let Some(trust) = &self.trust {
            let report = trust.files.reload();
            if report.applied.is_empty() && report.rejected.is_empty() {
                info!("certificates and bundles unchanged");
            }
        }
        result
    }

    /// Loads the file again; on success swaps it in, on failure keeps the old one.
    fn reload_config(&self) -> Result<(), ConfigErrors> {
        let mut next = match config::load(&self.path) {
            Ok(next) => next,
            Err(errors) => {
                for e in &errors.0 {
                    error!(path = %e.path, problem = %e.message, "configuration reload rejected: {e}");
                }
                error!(
                    file = %self.path.display(),
                    problems = errors.0.len(),
                    "configuration reload rejected; the running configuration stays in force"
                );
                self.reloads.with_label_values(&["error"]).inc();
                return Err(errors);
            }
        };
        let current = self.config.load();
        // Listener addresses and thread counts are fixed when the services start.
        if next.admin != current.admin {
            warn!("admin.listen changed; it takes effect on restart");
            next.admin = current.admin.clone();
        }
        if next.runtime != current.runtime {
            warn!("runtime.threads changed; it takes effect on restart");
            next.runtime = current.runtime.clone();
        }
        // Which files hold the identity and which trust domains are federated are
        // fixed at start; their *contents* rotate without a restart.
        if next.identity != current.identity || next.trust != current.trust {
            warn!("identity or trust settings changed; they take effect on restart");
            next.identity = current.identity.clone();
            next.trust = current.trust.clone();
        }
        if next.listeners != current.listeners {
            warn!("listeners changed; they take effect on restart");
            next.listeners = current.listeners.clone();
        }
        // The DNS server's sockets, ranges and resolver are built at start.
        if next.dns != current.dns {
            warn!("dns settings changed; they take effect on restart");
            next.dns = current.dns.clone();
        }
        // The federation's listener and identity settings are fixed at start;
        // its peers, filters, services and static peers apply at once.
        if next.federation.listen != current.federation.listen
            || next.federation.advertise != current.federation.advertise
            || next.federation.lease != current.federation.lease
            || next.federation.grace != current.federation.grace
            || next.federation.accept_peer_bundles != current.federation.accept_peer_bundles
        {
            warn!(
                "federation listen, advertise, lease, grace or accept_peer_bundles changed; they take effect on restart"
            );
            let (peers, export) = (
                next.federation.peers.clone(),
                next.federation.export.clone(),
            );
            next.federation = current.federation.clone();
            next.federation.peers = peers;
            next.federation.export = export;
        }
        if next.services != current.services
            || next.peers != current.peers
            || next.federation != current.federation
            || next.discovery != current.discovery
        {
            self.federation.apply(&next);
            info!(
                services = next.services.len(),
                peers = next.peers.len(),
                federation_peers = next.federation.peers.len(),
                "services and peers updated"
            );
        }
        if next.upstream != current.upstream {
            self.upstreams.set_policy(next.upstream.clone());
            info!("upstream policy updated");
        }
        if next.routes != current.routes {
            self.upstreams.set_routes(&next.routes);
            info!(routes = next.routes.len(), "routes updated");
        }
        if next.log.format != current.log.format {
            warn!("log.format changed; it takes effect on restart");
            next.log.format = current.log.format;
        }
        if next.log.level != current.log.level
            && let Some(log) = &self.log
            && let Err(e) = log.set_level(&next.log.level)
        {
            error!(error = %e, "cannot apply log.level");
        }
        self.config.store(Arc::new(next));
        self.reloads.with_label_values(&["success"]).inc();
        self.last_success.set(unix_now());
        info!(file = %self.path.display(), "configuration reloaded");
        Ok(())
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Our replacement for Pingora's signal watcher (see the module docs).
pub struct Signals {
    /// Applies SIGHUP.
    pub reloader: Arc<Reloader>,
    /// Turned not-ready on stop.
    pub readiness: Arc<Readiness>,
    /// Waited on before stopping.
    pub drain: Arc<Drain>,
    /// The configuration in force, for the drain timeout.
    pub config: Arc<ArcSwap<Config>>,
}

struct Handlers {
    hup: Signal,
    term: Signal,
    int: Signal,
    quit: Signal,
}

impl Handlers {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut h = match Handlers::install() {
            Ok(h) => h,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers; stopping");
                return ShutdownSignal::FastShutdown;
            }
        };
        self.readiness.set("signals", true, "handlers installed");
        loop {
            tokio::select! {
                _ = h.hup.recv() => {
                    info!("SIGHUP received: reloading configuration");
                    notify_systemd(&[NotifyState::Reloading, monotonic_now()]);
                    let status = match self.reloader.reload() {
                        Ok(()) => "configuration reloaded".to_owned(),
                        Err(e) => format!("reload rejected ({} problems); previous configuration in force", e.0.len()),
                    };
                    notify_systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
                }
                _ = h.term.recv() => return self.drain("SIGTERM", &mut h).await,
                _ = h.int.recv() => return self.drain("SIGINT", &mut h).await,
                _ = h.quit.recv() => {
                    info!("SIGQUIT received: handing listening sockets to the new process");
                    self.readiness.start_draining();
                    return ShutdownSignal::GracefulUpgrade;
                }
            }
        }
    }
}

impl Signals {
    async fn drain(&self, signal: &str, h: &mut Handlers) -> ShutdownSignal {
        let timeout = self.config.load().shutdown.drain_timeout;
        info!(
            signal,
            in_flight = self.drain.in_flight(),
            timeout = %humantime::format_duration(timeout),
            "stopping: draining in-flight work"
        );
        notify_systemd(&[NotifyState::Stopping, NotifyState::Status("draining")]);
        self.readiness.start_draining();
        tokio::select! {
            left = self.drain.wait_idle(timeout) => {
                if left > 0 {
                    warn!(in_flight = left, "drain timeout reached; stopping anyway");
                } else {
                    info!("drained");
                }
            }
            _ = h.term.recv() => warn!("second stop signal: cutting the drain short"),
            _ = h.int.recv() => warn!("second stop signal: cutting the drain short"),
        }
        ShutdownSignal::GracefulTerminate
    }
}

fn monotonic_now() -> NotifyState<'static> {
    NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0))
}

/// The watchdog timeout systemd asks for, as libsystemd's `sd_watchdog_enabled`
/// reads it: `WATCHDOG_USEC` set and `WATCHDOG_PID` either absent or our pid.
/// (The sd-notify crate insists on `WATCHDOG_PID` being present.)
pub fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    match pid {
        Some(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Where to connect to reach a listener bound to `addr` from this host.
pub fn probe_address(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// A listener to probe before declaring readiness.
pub struct Probe {
    /// Its configuration path, e.g. `admin.listen`.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// For TLS listeners, a client config that completes a real handshake, so the
    /// probe neither trips the listener's handshake-error log nor passes while
    /// the listener cannot present its certificate.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// For HTTP listeners, a path to GET: the probe passes on any HTTP answer.
    pub http_path: Option<&'static str>,
    /// False for listeners a probe connection would be proxied from to a real
    /// backend (TCP service ports): those are only checked for bindability.
    pub connect: bool,
}

impl Probe {
    async fn succeeds(&self) -> bool {
        let Ok(tcp) = tokio::net::TcpStream::connect(probe_address(self.addr)).await else {
            return false;
        };
        match &self.tls {
            None => self.exchange(tcp).await,
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("isthmus-readiness-probe")
                    .unwrap_or_else(|_| unreachable!("a valid DNS name"));
                match tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                {
                    Ok(tls) => self.exchange(tls).await,
                    Err(_) => false,
                }
            }
        }
    }

    /// Sends one HTTP request when the listener speaks HTTP, so the probe is a
    /// well-behaved client rather than a connection dropped mid-request.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) -> bool {
        let Some(path) = self.http_path else {
            return true;
        };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.")
    }
}

/// Background service that turns `listeners` ready once each one accepts a
/// connection, sends `READY=1` when the whole process is ready, then keeps the
/// systemd watchdog fed.
pub struct Startup {
    /// Process readiness.
    pub readiness: Arc<Readiness>,
    /// Every listener that must accept before we are ready.
    pub listeners: Vec<Probe>,
}

/// Delay between attempts to reach our own listeners while they start.
const PROBE_RETRY: Duration = Duration::from_millis(20);

#[async_trait]
impl BackgroundService for Startup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let ready = async {
            for probe in self.listeners.iter().filter(|p| p.connect) {
                while !probe.succeeds().await {
                    tokio::time::sleep(PROBE_RETRY).await;
                }
                info!(listener = %probe.name, addr = %probe.addr, "listener accepting connections");
            }
            self.readiness
                .set("listeners", true, "all listeners accept connections");
            self.readiness.wait_ready().await;
        };
        tokio::select! {
            _ = ready => {}
            _ = shutdown.changed() => return,
        }
        info!("isthmus is ready");
        notify_systemd(&[NotifyState::Ready, NotifyState::Status("ready")]);

        let Some(timeout) = watchdog_timeout(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        ) else {
            return;
        };
        let period = timeout / 2;
        info!(period = ?period, "feeding the systemd watchdog");
        let mut ticks = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = ticks.tick() => notify_systemd(&[NotifyState::Watchdog]),
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_libsystemd_rules() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_timeout(None, None), None);
        assert_eq!(watchdog_timeout(Some("0"), None), None);
        assert_eq!(watchdog_timeout(Some("x"), None), None);
        assert_eq!(
            watchdog_timeout(Some("2000000"), None),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_timeout(Some("2000000"), Some(&me)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_timeout(Some("2000000"), Some("1")), None);
    }

    #[test]
    fn probes_unspecified_addresses_on_loopback() {
        assert_eq!(
            probe_address("0.0.0.0:15000".parse().unwrap()),
            "127.0.0.1:15000".parse().unwrap()
        );
        assert_eq!(
            probe_address("[::]:15000".parse().unwrap()),
            "[::1]:15000".parse().unwrap()
        );
        assert_eq!(
            probe_address("127.0.0.5:1".parse().unwrap()),
            "127.0.0.5:1".parse().unwrap()
        );
    }
}
