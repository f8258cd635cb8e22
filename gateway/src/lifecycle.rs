//! Process lifecycle: signals, hot reload, graceful drain, binary upgrade and
//! systemd notification.
//!
//! - **SIGHUP** re-reads the configuration file. An invalid file is rejected with
//!   every problem logged and counted; the running configuration stays.
//! - **SIGTERM / SIGINT** stop gracefully: `STOPPING=1`, readiness turns false,
//!   Pingora closes the listeners (idle keep-alive connections close, HTTP/2
//!   gets GOAWAY), then in-flight requests and TCP streams get up to
//!   `shutdown.drain_timeout` before the process exits. A second SIGTERM or
//!   SIGINT cuts the drain short.
//! - **SIGUSR2** starts a binary upgrade: the binary this process was started
//!   from (by then perhaps replaced by a package upgrade) is run with
//!   `--upgrade-from <our pid>`. The new process checks its configuration, then
//!   sends us SIGQUIT and waits for the listening sockets.
//! - **SIGQUIT** hands the listening sockets to that new process (Pingora's
//!   upgrade): both accept for Pingora's 5 s overlap, then this process closes
//!   its listeners and drains as on SIGTERM. It sends no `STOPPING=1`: under
//!   systemd the new process has announced itself as the main PID.
//! - `READY=1` is sent once every readiness condition holds; `WATCHDOG=1` pings run
//!   at half of `WATCHDOG_USEC` when systemd asks for them, until the process
//!   exits.
//!
//! Signals are handled here rather than by Pingora's default watcher because
//! Pingora knows neither SIGHUP nor draining on in-flight work; and the drain
//! exits the process itself because Pingora's grace period is a fixed sleep.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::BackgroundService;
use prometheus::{IntCounterVec, IntGauge, Registry};
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::broadcast;
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
        // Each listener's limiter, deadline and h2 settings are built at start.
        if next.limits != current.limits {
            warn!("limits changed; they take effect on restart");
            next.limits = current.limits.clone();
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
            || next.federation.limits != current.federation.limits
            || next.federation.state_file != current.federation.state_file
        {
            warn!(
                "federation listen, advertise, lease, grace, limits or state_file changed; they take effect on restart"
            );
            let (peers, accept, export) = (
                next.federation.peers.clone(),
                next.federation.accept.clone(),
                next.federation.export.clone(),
            );
            next.federation = current.federation.clone();
            next.federation.peers = peers;
            next.federation.accept = accept;
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
    /// Pingora's execution phases: the drain starts once its listeners closed.
    pub phases: std::sync::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    /// Starts the new process of a binary upgrade.
    pub upgrade: Arc<Upgrade>,
}

struct Handlers {
    hup: Signal,
    term: Signal,
    int: Signal,
    quit: Signal,
    usr2: Signal,
}

impl Handlers {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr2: signal(SignalKind::user_defined2())?,
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
                _ = h.usr2.recv() => self.upgrade.start(),
                _ = h.term.recv() => return self.stop("SIGTERM", h),
                _ = h.int.recv() => return self.stop("SIGINT", h),
                _ = h.quit.recv() => {
                    // Readiness stays: both processes serve until the overlap ends.
                    info!("SIGQUIT received: handing the listening sockets to the new process");
                    self.exit_when_drained(h);
                    return ShutdownSignal::GracefulUpgrade;
                }
            }
        }
    }
}

impl Signals {
    fn stop(&self, signal: &str, h: Handlers) -> ShutdownSignal {
        info!(
            signal,
            in_flight = self.drain.in_flight(),
            "stopping: closing the listeners"
        );
        notify_systemd(&[NotifyState::Stopping, NotifyState::Status("draining")]);
        self.readiness.start_draining();
        self.exit_when_drained(h);
        ShutdownSignal::GracefulTerminate
    }

    /// Once Pingora has closed the listeners, waits for in-flight work (at
    /// most `shutdown.drain_timeout`, or until a second stop signal) and exits.
    /// Pingora's own grace period, a fixed sleep, is only the fallback.
    fn exit_when_drained(&self, mut h: Handlers) {
        let phases = self.phases.lock().ok().and_then(|mut p| p.take());
        let (drain, config) = (self.drain.clone(), self.config.clone());
        tokio::spawn(async move {
            let drained = async {
                if let Some(mut phases) = phases {
                    listeners_closed(&mut phases).await;
                }
                // Requests on lingering keep-alive connections are in flight too.
                tokio::time::sleep(crate::proxy::KEEPALIVE_LINGER).await;
                let timeout = config.load().shutdown.drain_timeout;
                info!(
                    in_flight = drain.in_flight(),
                    timeout = %humantime::format_duration(timeout),
                    "listeners closed: draining in-flight work"
                );
                let left = drain.wait_idle(timeout).await;
                if left > 0 {
                    warn!(in_flight = left, "drain timeout reached; stopping anyway");
                } else {
                    info!("drained");
                }
            };
            tokio::select! {
                () = drained => {}
                _ = h.term.recv() => warn!("second stop signal: cutting the drain short"),
                _ = h.int.recv() => warn!("second stop signal: cutting the drain short"),
            }
            log_stopped();
            std::process::exit(0);
        });
    }
}

/// Waits until Pingora has broadcast the shutdown to its services, which then
/// stop accepting: that is when it enters its grace period.
async fn listeners_closed(phases: &mut broadcast::Receiver<ExecutionPhase>) {
    loop {
        match phases.recv().await {
            Ok(ExecutionPhase::ShutdownGracePeriod) | Err(broadcast::error::RecvError::Closed) => {
                return;
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
        }
    }
}

/// A TCP listener for a service Pingora does not hand over on upgrade (the
/// federation, DNS and clusterset listeners): with SO_REUSEPORT the new process
/// binds it while the old one still listens. `freebind` allows an address not
/// (yet) configured on an interface.
pub fn upgradable_tcp_listener(
    addr: SocketAddr,
    freebind: bool,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if freebind {
        let _ = match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true),
            SocketAddr::V6(_) => socket.set_freebind_v6(true),
        };
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The last line a stopping gateway logs.
pub fn log_stopped() {
    info!("isthmus stopped");
}

/// Starts the new process of a binary upgrade on SIGUSR2 (see the module docs).
pub struct Upgrade {
    /// The binary this process was started from, resolved at start: after a
    /// package upgrade `/proc/self/exe` names the deleted old file.
    exe: std::io::Result<PathBuf>,
    config: PathBuf,
    upgrade_socket: PathBuf,
    /// The new process while one runs and has not exited.
    running: std::sync::Mutex<Option<u32>>,
}

impl Upgrade {
    /// Remembers this process's binary and configuration file.
    pub fn new(config: PathBuf, upgrade_socket: PathBuf) -> Self {
        Self {
            exe: std::env::current_exe(),
            config,
            upgrade_socket,
            running: std::sync::Mutex::new(None),
        }
    }

    fn start(self: &Arc<Self>) {
        let exe = match &self.exe {
            Ok(exe) => exe,
            Err(e) => {
                error!(error = %e, "binary upgrade: cannot tell which binary this process runs");
                return;
            }
        };
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if let Some(pid) = *running {
            warn!(pid, "binary upgrade already in progress; SIGUSR2 ignored");
            return;
        }
        let mut command = std::process::Command::new(exe);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--upgrade-from")
            .arg(std::process::id().to_string())
            // Both processes must agree on the socket, whatever the file says now.
            .env("ISTHMUS__RUNTIME__UPGRADE_SOCKET", &self.upgrade_socket)
            // Without WATCHDOG_PID the watchdog applies to whichever process
            // is the main one (libsystemd's rule), so the new one feeds it.
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                error!(exe = %exe.display(), error = %e, "binary upgrade: cannot start the new process");
                return;
            }
        };
        let pid = child.id();
        info!(pid, exe = %exe.display(), "SIGUSR2 received: binary upgrade started");
        *running = Some(pid);
        let this = self.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            if let Ok(mut running) = this.running.lock() {
                *running = None;
            }
            match status {
                Ok(status) => error!(
                    pid, %status,
                    "binary upgrade: the new process exited; this process keeps serving"
                ),
                Err(e) => {
                    error!(pid, error = %e, "binary upgrade: cannot wait for the new process")
                }
            }
        });
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
    /// After a binary upgrade: tell systemd this process is now the main one.
    pub announce_main_pid: bool,
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
        if self.announce_main_pid {
            notify_systemd(&[
                NotifyState::MainPid(std::process::id()),
                NotifyState::Ready,
                NotifyState::Status("ready (upgraded)"),
            ]);
        } else {
            notify_systemd(&[NotifyState::Ready, NotifyState::Status("ready")]);
        }

        let Some(timeout) = watchdog_timeout(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        ) else {
            return;
        };
        let period = timeout / 2;
        info!(period = ?period, "feeding the systemd watchdog");
        // Fed through the drain too: it ends when the process exits.
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            notify_systemd(&[NotifyState::Watchdog]);
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
