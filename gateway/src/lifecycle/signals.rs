//! The signal watcher that replaces Pingora's: SIGHUP reloads, SIGTERM / SIGINT
//! stop with a drain, SIGQUIT hands the sockets to an upgrade, SIGUSR2 starts
//! one (see the module docs of [`crate::lifecycle`]).

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::{ExecutionPhase, ShutdownSignal, ShutdownSignalWatch};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::broadcast;
use tracing::{error, info, warn};

use super::systemd::{monotonic_now, notify_systemd};
use super::{Reloader, Upgrade, log_stopped};
use crate::config::Config;
use crate::health::{Drain, Readiness};

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
    pub phases: parking_lot::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
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
        let phases = self.phases.lock().take();
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
