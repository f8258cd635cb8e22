//! SIGHUP: re-reads the configuration file and applies what can change at run
//! time; an invalid file is rejected whole and the running configuration stays.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, IntGauge, Registry};
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigErrors};
use crate::logging::LogHandle;
use crate::metrics;

isthmus_federation::label_enum! {
    /// How a reload ended: the `result` label of `isthmus_config_reloads_total`.
    pub enum ReloadResult {
        /// The new configuration is in force.
        Success => "success",
        /// It was rejected; the running configuration stays in force.
        Error => "error",
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
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
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
            telemetry: None,
            reloads,
            last_success,
        }
    }

    /// Applies `[tracing]` on reload to `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
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

    fn count(&self, result: ReloadResult) {
        self.reloads.with_label_values(&[result.label()]).inc();
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
                self.count(ReloadResult::Error);
                return Err(errors);
            }
        };
        let current = self.config.load();
        // Listener addresses and thread counts are fixed when the services start.
        keep_running(
            &mut next.admin,
            &current.admin,
            "admin.listen changed; it takes effect on restart",
        );
        keep_running(
            &mut next.runtime,
            &current.runtime,
            "runtime.threads changed; it takes effect on restart",
        );
        // Which files hold the identity and which trust domains are federated are
        // fixed at start; their *contents* rotate without a restart.
        if next.identity != current.identity || next.trust != current.trust {
            warn!("identity or trust settings changed; they take effect on restart");
            next.identity = current.identity.clone();
            next.trust = current.trust.clone();
        }
        keep_running(
            &mut next.listeners,
            &current.listeners,
            "listeners changed; they take effect on restart",
        );
        // Each listener's limiter, deadline and h2 settings are built at start.
        keep_running(
            &mut next.limits,
            &current.limits,
            "limits changed; they take effect on restart",
        );
        // The DNS server's sockets, ranges and resolver are built at start.
        keep_running(
            &mut next.dns,
            &current.dns,
            "dns settings changed; they take effect on restart",
        );
        // The federation's listener and identity settings are fixed at start;
        // its peers, filters, services and static peers apply at once.
        if next.federation.listen != current.federation.listen
            || next.federation.advertise != current.federation.advertise
            || next.federation.lease != current.federation.lease
            || next.federation.weight != current.federation.weight
            || next.federation.grace != current.federation.grace
            || next.federation.limits != current.federation.limits
            || next.federation.state_file != current.federation.state_file
        {
            warn!(
                "federation listen, advertise, lease, weight, grace, limits or state_file changed; they take effect on restart"
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
        if next.tracing != current.tracing
            && let Some(telemetry) = &self.telemetry
        {
            // A new exporter; the old one sends what it holds and ends.
            telemetry.apply(next.tracing.as_ref());
            if next.tracing.is_none() {
                info!("tracing off");
            }
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
        self.count(ReloadResult::Success);
        self.last_success.set(unix_now());
        info!(file = %self.path.display(), "configuration reloaded");
        Ok(())
    }
}

/// A setting fixed at start: where the reloaded file changes it, warns with
/// `message` and keeps the running value.
fn keep_running<T: PartialEq + Clone>(next: &mut T, current: &T, message: &str) {
    if next != current {
        warn!("{message}");
        *next = current.clone();
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
