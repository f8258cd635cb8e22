//! `isthmus run`, in three steps that each return a value:
//!
//! 1. [`load`]: the configuration ([`config::load`]) and the certificate, key
//!    and bundle files it names;
//! 2. [`build`]: every service of the gateway, composed from small builders:
//!    the listeners and their bind check (`server/probes.rs`), federation and
//!    discovery, DNS, the admin API and the identity's services
//!    (`server/control.rs`), the backends and the data plane (here), then the
//!    signal watcher of [`crate::lifecycle`];
//! 3. [`Gateway::run`]: takes over from the old process of an upgrade, binds
//!    and serves until a stop signal.
//!
//! Each step fails with a [`StartError`], which [`crate::exit`] maps to the
//! exit code. Order matters: the configuration is validated and every listen
//! address is checked *before* anything is bound, so a bad config or a port in
//! use is one clear error at start-up rather than a service that silently
//! never listens (Pingora panics inside the service runtime when a bind
//! fails); and the old process of an upgrade is told to hand over only once
//! everything is built.

mod control;
mod probes;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::listeners::{DEFAULT_L4_WRITE_BUFFER_SIZE, L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use tracing::{error, info};

use std::time::Duration;

use isthmus_federation::limits::ConnectionLimiter;
use isthmus_federation::peering::Hub;
use isthmus_federation::trust::tls::mtls_server_config;
use isthmus_federation::trust::{HandshakeMetrics, SpiffeAcceptor, SpiffeConnector};
use isthmus_federation::{Catalog, ServiceKey};
use pingora_core::apps::HttpServerOptions;
use pingora_core::protocols::http::v2::server::{H2Options, default_h2_options};

use crate::admin::AdminState;
use crate::config::limits::LimitsConfig;
use crate::config::{self, Config, ConfigError, ConfigErrors};
use crate::dns::{ClusterSetListeners, DynApp};
use crate::exit::StartError;
use crate::health::{Drain, Readiness};
use crate::lifecycle::{Reloader, Signals, Startup, Upgrade};
use crate::limits::{Guarded, LimitMetrics, ListenerGuard};
use crate::logging::LogHandle;
use crate::mesh::MeshConnector;
use crate::metrics::Listener;
use crate::proxy::east_west::{Callers, EastWestApp, EastWestLimits, EastWestProxy};
use crate::proxy::outbound::OutboundProxy;
use crate::proxy::tcp::TcpOutboundApp;
use crate::proxy::{Lingering, ProxyMetrics, Runtime, TcpMetrics};
use crate::trust::Trust;
use crate::upstream::Upstreams;
use crate::upstream::balance::Here;
use crate::upstream::leases::LeaseWatcher;
use crate::upstream::probe::HealthChecker;
use crate::{logging, metrics};

use control::{add_admin, add_dns, add_federation, add_trust, federation_hub};
use probes::checked_listeners;

/// Seconds Pingora waits for service runtimes after its grace period; only
/// reached when our drain (see `lifecycle`) has not exited the process first.
const RUNTIME_SHUTDOWN_TIMEOUT_SECS: u64 = 2;

/// Runs the gateway; returns the process exit code. With `upgrade_from`, takes
/// over the listening sockets of that running gateway (a binary upgrade).
pub fn run(config_path: &Path, upgrade_from: Option<u32>) -> ExitCode {
    let started = load(config_path, metrics::new_registry()).and_then(|loaded| {
        let log = logging::init(&loaded.config.log)?;
        install_panic_logger();
        info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %config_path.display(),
            gateway = %loaded.config.gateway.name,
            cluster = %loaded.config.gateway.cluster,
            spiffe_id = %loaded.config.spiffe_id(),
            "isthmus starting"
        );
        build(loaded, Some(log), upgrade_from)
    });
    let code = match started.and_then(Gateway::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    };
    // Lines still buffered would be lost with the process.
    logging::flush();
    code
}

/// A configuration and the identity material it names, both checked.
pub struct Loaded {
    /// The configuration file, read again on reload and by an upgrade.
    pub path: PathBuf,
    /// The configuration with environment overrides.
    pub config: Config,
    /// With `[identity]`: the SVID, its key and the trust bundles.
    pub trust: Option<Trust>,
    /// Where every metric is registered.
    pub registry: prometheus::Registry,
}

/// Loads the configuration (see [`config::load`]) and, with `[identity]`,
/// every certificate, key and bundle file it names; file problems are
/// configuration errors too. The trust metrics go to `registry`.
pub fn load(path: &Path, registry: prometheus::Registry) -> Result<Loaded, StartError> {
    let invalid = |errors| StartError::Config {
        path: path.to_owned(),
        errors,
    };
    let config = config::load(path).map_err(invalid)?;
    let trust = crate::trust::load(&config, &registry).map_err(|errors| {
        invalid(ConfigErrors(
            errors
                .into_iter()
                .map(|e| ConfigError::new(e.field, e.message))
                .collect(),
        ))
    })?;
    Ok(Loaded {
        path: path.to_owned(),
        config,
        trust,
        registry,
    })
}

/// A gateway built and not yet serving: [`Gateway::run`] takes over from the
/// old process of an upgrade, binds and serves.
pub struct Gateway {
    server: Server,
    signals: Signals,
    /// The old process of a binary upgrade and the socket it hands over on.
    upgrade_from: Option<(u32, PathBuf)>,
}

impl Gateway {
    /// Serves until a stop signal, then drains (see [`crate::lifecycle`]).
    pub fn run(self) -> Result<(), StartError> {
        let Gateway {
            mut server,
            signals,
            upgrade_from,
        } = self;
        // Everything that can fail has been built: only now is the old process of
        // an upgrade told to hand over.
        if let Some((old, socket)) = upgrade_from {
            take_over_from(old, &socket).map_err(|message| StartError::Upgrade {
                old_pid: old,
                message,
            })?;
        }
        // With `upgrade`, this receives the listening sockets (Pingora exits the
        // process if none arrive within 5 s).
        server.bootstrap();
        server.run(RunArgs {
            shutdown_signal: Box::new(signals),
        });
        crate::lifecycle::log_stopped();
        Ok(())
    }
}

/// Builds every service of the gateway from `loaded`, in the order the
/// services depend on each other. Binds only what must exist before Pingora
/// starts (the DNS sockets, so a taken `dns.listen` fails here) and signals
/// no process. `log` takes `log.level` on reload.
pub fn build(
    loaded: Loaded,
    log: Option<LogHandle>,
    upgrade_from: Option<u32>,
) -> Result<Gateway, StartError> {
    let Loaded {
        path,
        config,
        trust,
        registry,
    } = loaded;
    let trust = trust.map(Arc::new);
    // During an upgrade the old process holds the ports until it hands them over.
    let listeners = checked_listeners(&config, trust.as_deref(), upgrade_from.is_none())?;
    if let Some(trust) = &trust {
        let svid = trust.material().svid();
        info!(spiffe_id = %svid.spiffe_id, fingerprint = %svid.fingerprint,
            trust_domains = trust.material().trust().iter().count(), "identity loaded");
    }
    let readiness = readiness(&path);
    let drain = Arc::new(Drain::default());
    let upgrade = Arc::new(Upgrade::new(
        path.clone(),
        config.runtime.upgrade_socket.clone(),
    ));
    let mut server = pingora_server(&config, upgrade_from);
    let phases = server.watch_execution_phase();
    let config = Arc::new(ArcSwap::from_pointee(config));

    let (hub, discovery, discovery_runner) =
        federation_hub(&config.load(), trust.as_deref(), &registry)?;
    let upstreams = upstreams(&mut server, &config.load(), &hub, &registry);
    let dns = crate::dns::DnsParts::new(
        &config.load().dns,
        &config.load().gateway.cluster,
        upstreams.clone(),
        &registry,
    )
    .map_err(StartError::Dns)?;
    let limit_metrics = LimitMetrics::new(&registry);
    let telemetry = {
        let c = config.load();
        crate::telemetry::Telemetry::new(
            c.tracing.as_ref(),
            &crate::telemetry::Origin {
                gateway: c.gateway.name.to_string(),
                cluster: c.gateway.cluster.to_string(),
                trust_domain: c.gateway.trust_domain.to_string(),
            },
            &registry,
        )
    };
    let clusterset_listeners = add_data_plane(
        &mut server,
        &config.load(),
        trust.as_ref(),
        DataPlane {
            catalog: hub.catalog(),
            upstreams: &upstreams,
            drain: &drain,
            config: &config,
            limits: &limit_metrics,
            telemetry: &telemetry,
        },
        dns.as_ref().map(|d| d.cluster_set.allocations()),
        &registry,
    )
    .map_err(StartError::DataPlane)?;
    let clusterset_ips = dns.as_ref().map(|d| d.cluster_set.allocations());
    if let Some(dns) = dns {
        add_dns(&mut server, dns, &hub, clusterset_listeners, &readiness);
    }
    add_admin(
        &mut server,
        AdminState {
            registry: registry.clone(),
            readiness: readiness.clone(),
            config: config.clone(),
            drain: drain.clone(),
            trust: trust.clone(),
            upstreams: upstreams.clone(),
            hub: hub.clone(),
            clusterset_ips,
        },
        &limit_metrics,
    );
    if let Some(trust) = &trust {
        add_trust(&mut server, &config.load(), trust, &limit_metrics)?;
    }
    let peer_targets = add_federation(
        &mut server,
        &config.load(),
        &hub,
        trust.clone(),
        &readiness,
        discovery_runner,
    );
    server.add_service(background_service(
        "startup",
        Startup {
            readiness: readiness.clone(),
            listeners,
            announce_main_pid: upgrade_from.is_some(),
        },
    ));

    let reloader = Reloader::new(
        path,
        config.clone(),
        log,
        trust,
        crate::federation::Reconfigure {
            hub,
            targets: peer_targets,
            discovery,
        },
        upstreams,
        &registry,
    )
    .with_telemetry(telemetry);
    let upgrade_socket = PathBuf::from(&server.configuration.upgrade_sock);
    Ok(Gateway {
        server,
        signals: Signals {
            reloader: Arc::new(reloader),
            readiness,
            drain,
            config,
            phases: parking_lot::Mutex::new(Some(phases)),
            upgrade,
        },
        upgrade_from: upgrade_from.map(|old| (old, upgrade_socket)),
    })
}

/// Process readiness as start-up begins: the configuration is in, listeners
/// and signal handlers are to come.
fn readiness(config_path: &Path) -> Arc<Readiness> {
    let readiness = Arc::new(Readiness::default());
    readiness.set(
        "config",
        true,
        format!("loaded from {}", config_path.display()),
    );
    readiness.set("listeners", false, "starting");
    readiness.set("signals", false, "starting");
    readiness
}

/// Pingora's server for `config`; with `upgrade_from`, one that receives the
/// listening sockets of that process.
fn pingora_server(config: &Config, upgrade_from: Option<u32>) -> Server {
    let opt = upgrade_from.map(|_| Opt {
        upgrade: true,
        ..Opt::default()
    });
    Server::new_with_opt_and_conf(opt, pingora_conf(config))
}

/// The backends' state (health, outliers, leases) with the configured policy
/// and routes, and the service that expires peer leases.
fn upstreams(
    server: &mut Server,
    config: &Config,
    hub: &Arc<Hub>,
    registry: &prometheus::Registry,
) -> Arc<Upstreams> {
    let here = Here {
        cluster: config.gateway.cluster.clone(),
        locality: config.gateway.locality.clone(),
        labels: config.gateway.labels.clone(),
    };
    let upstreams = Arc::new(Upstreams::new(config.upstream.clone(), here, registry));
    upstreams.set_routes(&config.routes);
    server.add_service(background_service(
        "peer leases",
        LeaseWatcher::new(upstreams.clone(), hub.clone()),
    ));
    upstreams
}

/// How long a peer gateway has to complete the east-west handshake.
const EAST_WEST_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// ALPN offered and accepted on the east-west hop.
fn east_west_alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// L4 buffers of the outbound listener (HTTP/1.1 and h2c). No read buffer:
/// request heads are read into the session's own 4 KiB buffer and bodies and
/// HTTP/2 frames into theirs, so one in front would only add a copy (Pingora's
/// default is 64 KiB per connection). The write buffer gathers a response's
/// head and a small body into one send; it exists only while it holds data.
const HTTP_L4_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: Some(DEFAULT_L4_WRITE_BUFFER_SIZE),
};
/// L4 buffers of the east-west listener: rustls reads the socket in small
/// pieces, so a read buffer of one full TLS record (16 KiB of plaintext plus
/// its overhead) saves system calls; it exists only while it holds data.
const TLS_L4_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(17 * 1024),
    write: Some(DEFAULT_L4_WRITE_BUFFER_SIZE),
};

/// What every listener of the data plane shares.
struct DataPlane<'a> {
    catalog: &'a Arc<ArcSwap<Catalog>>,
    upstreams: &'a Arc<Upstreams>,
    /// Requests and TCP streams in flight, waited for on stop.
    drain: &'a Arc<Drain>,
    /// The configuration in force (swapped on reload).
    config: &'a Arc<ArcSwap<Config>>,
    /// Refusals and header deadline cuts.
    limits: &'a LimitMetrics,
    /// Request spans.
    telemetry: &'a Arc<crate::telemetry::Telemetry>,
}

/// Adds the outbound and east-west listeners and the mesh connector; returns the
/// clusterset listeners when `clusterset` (the clusterset IPs) is given and
/// `dns.clusterset_listeners` is on.
fn add_data_plane(
    server: &mut Server,
    config: &Config,
    trust: Option<&Arc<Trust>>,
    shared: DataPlane<'_>,
    clusterset: Option<tokio::sync::watch::Receiver<Arc<isthmus_federation::dns::Allocations>>>,
    registry: &prometheus::Registry,
) -> Result<Option<ClusterSetListeners>, String> {
    let DataPlane {
        catalog,
        upstreams,
        drain,
        config: live_config,
        limits: limit_metrics,
        telemetry,
    } = shared;
    let limits = &config.limits;
    let guard = |listener: Listener, caps| {
        ListenerGuard::new(listener, caps, limits.header_timeout, limit_metrics)
    };
    let clusterset = clusterset.filter(|_| config.dns.clusterset_listeners);
    let conf = server.configuration.clone();
    let metrics = ProxyMetrics::new(registry);
    let tcp_metrics = TcpMetrics::new(registry);
    let threads = config.runtime.threads;

    // The mesh connector opens east-west connections for the outbound listener.
    let mesh = match trust {
        Some(trust) if config.listeners.outbound.is_some() || clusterset.is_some() => {
            let tls = SpiffeConnector::new(
                trust.material().clone(),
                trust.handshake_metrics.clone(),
                EAST_WEST_HANDSHAKE_TIMEOUT,
                vec![b"h2".to_vec()],
            );
            let mesh = MeshConnector::new(tls, upstreams.cut_signal());
            server.add_service(background_service(
                "mesh connection cuts",
                MeshCutService(mesh.clone()),
            ));
            Some(mesh)
        }
        _ => None,
    };
    // Each tcp port with `listen` gets a listener of its own; they share one
    // connector to peer gateways (no ALPN: the stream is the service's bytes).
    let l4_connector = trust.map(|t| {
        SpiffeConnector::new(
            t.material().clone(),
            t.handshake_metrics.clone(),
            EAST_WEST_HANDSHAKE_TIMEOUT,
            Vec::new(),
        )
    });
    let runtime = Arc::new(Runtime {
        catalog: catalog.clone(),
        upstreams: upstreams.clone(),
        drain: drain.clone(),
        cluster: config.gateway.cluster.clone(),
        trust_domain: config.gateway.trust_domain.clone(),
        metrics,
        tcp_metrics,
        mesh,
        peers: l4_connector,
        config: live_config.clone(),
        telemetry: telemetry.clone(),
    });

    let outbound_proxy = |clusterset: Option<_>| {
        let mut outbound = OutboundProxy::new(runtime.clone());
        if let Some(allocations) = clusterset {
            outbound = outbound.with_clusterset(allocations);
        }
        let mut proxy = pingora_proxy::http_proxy(&conf, outbound);
        proxy.server_options = Some(server_options(limits, Hop::First, true));
        proxy.h2_options = Some(h2_options(limits, Hop::First));
        proxy
    };
    if let Some(addr) = config.listeners.outbound {
        let proxy = Guarded::new(
            Arc::new(Lingering(Arc::new(outbound_proxy(None)))),
            guard(Listener::Outbound, limits.outbound),
        );
        let mut service = Service::new("outbound".to_owned(), proxy);
        service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(HTTP_L4_BUFFERS));
        service.threads = Some(threads);
        server.add_service(service);
    }

    for svc in &config.services {
        for port in &svc.ports {
            let Some(addr) = port.listen else { continue };
            let key = ServiceKey {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            };
            let app = TcpOutboundApp::new(runtime.clone(), key.clone(), port.port);
            let mut service = Service::new(format!("tcp {key}:{}", port.port), app);
            service.add_tcp(&addr.to_string());
            service.threads = Some(threads);
            server.add_service(service);
        }
    }

    // Listeners at clusterset IPs serve what the outbound listener serves;
    // they run in the DNS service, which knows the allocations.
    let clusterset_listeners = match clusterset {
        Some(allocations) => {
            // Counted apart from the outbound listener's, with its caps.
            let http: Arc<dyn DynApp> = Arc::new(Guarded::new(
                Arc::new(outbound_proxy(Some(allocations))),
                guard(Listener::Clusterset, limits.outbound),
            ));
            let tcp_app = {
                let runtime = runtime.clone();
                move |key: &ServiceKey, port: u16| -> Arc<dyn DynApp> {
                    Arc::new(TcpOutboundApp::new(runtime.clone(), key.clone(), port))
                }
            };
            Some(
                ClusterSetListeners::new(
                    http,
                    Arc::new(tcp_app),
                    crate::dns::max_clusterset_listeners(),
                    registry,
                )
                .map_err(|e| format!("clusterset listener metrics: {e}"))?,
            )
        }
        None => None,
    };

    if let (Some(addr), Some(trust)) = (config.listeners.east_west, trust) {
        let tls = mtls_server_config(trust.material(), trust.policy.clone(), east_west_alpn())
            .map_err(|e| format!("east-west TLS: {e}"))?;
        let acceptor = SpiffeAcceptor::new(
            Arc::new(tls),
            trust.handshake_metrics.clone(),
            EAST_WEST_HANDSHAKE_TIMEOUT,
        );
        let callers = Arc::new(Callers::new(config.spiffe_id()));
        let mut proxy = pingora_proxy::http_proxy(
            &conf,
            EastWestProxy::new(runtime.clone(), callers.clone(), registry),
        );
        proxy.server_options = Some(server_options(limits, Hop::EastWest, false));
        proxy.h2_options = Some(h2_options(limits, Hop::EastWest));
        let app = EastWestApp::new(
            acceptor,
            proxy,
            callers,
            runtime.clone(),
            EastWestLimits {
                guard: guard(Listener::EastWest, limits.east_west),
                handshakes: ConnectionLimiter::new(limits.east_west_handshakes),
                config: live_config.clone(),
            },
        );
        let mut service = Service::new("east-west".to_owned(), app);
        service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(TLS_L4_BUFFERS));
        service.threads = Some(threads);
        server.add_service(service);
    }

    // Active health checks of every backend in the catalog. Their handshakes
    // are counted by isthmus_upstream_health_checks_total, not with traffic's.
    let probe_connector = match trust {
        Some(t) => Some(SpiffeConnector::new(
            t.material().clone(),
            HandshakeMetrics::new(&prometheus::Registry::new())
                .map_err(|e| format!("health check metrics: {e}"))?,
            EAST_WEST_HANDSHAKE_TIMEOUT,
            Vec::new(),
        )),
        None => None,
    };
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(upstreams.clone(), catalog.clone(), probe_connector),
    ));
    Ok(clusterset_listeners)
}

/// What the east-west listener allows over `limits.max_request_header_bytes`:
/// the calling gateway held the request to the limit and then added its own
/// headers (request id, trace context, subset), and HTTP/2 counts 32 bytes
/// more per field than HTTP/1 does. A request under the limit at the first
/// hop is then under it at the second.
const EAST_WEST_HEADER_ALLOWANCE: u32 = 16 * 1024;

/// Which hop a proxy listener is, for its request-header limit.
#[derive(Clone, Copy)]
enum Hop {
    /// Outbound and clusterset listeners: workloads' requests.
    First,
    /// East-west: requests another gateway already checked.
    EastWest,
}

impl Hop {
    fn max_request_header_bytes(self, limits: &LimitsConfig) -> u32 {
        match self {
            Self::First => limits.max_request_header_bytes,
            Self::EastWest => limits.max_request_header_bytes + EAST_WEST_HEADER_ALLOWANCE,
        }
    }
}

/// Pingora's bounded HTTP/2 defaults with `limits.h2_max_concurrent_streams`
/// and the request-header limit (counted as RFC 9113 §6.5.2 counts a header
/// list: each field 32 bytes over its name and value). The h2 crate answers a
/// header block over it with 431.
fn h2_options(limits: &LimitsConfig, hop: Hop) -> H2Options {
    let mut options = default_h2_options();
    options.max_concurrent_streams(limits.h2_max_concurrent_streams);
    options.max_header_list_size(hop.max_request_header_bytes(limits));
    options
}

/// HTTP/1 options of a proxy listener: h2c or not, and the request-header
/// limit (the request line and fields as sent; over it, 431).
fn server_options(limits: &LimitsConfig, hop: Hop, h2c: bool) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h2c = h2c;
    options.max_request_header_bytes = Some(hop.max_request_header_bytes(limits) as usize);
    options
}

/// Cuts the east-west connections of peer gateways declared dead, as a
/// Pingora background service.
struct MeshCutService(Arc<MeshConnector>);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for MeshCutService {
    async fn start(&self, shutdown: pingora_core::server::ShutdownWatch) {
        self.0.clone().serve_cuts(shutdown).await;
    }
}

fn pingora_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.runtime.threads,
        // One current-thread runtime per worker thread instead of a
        // work-stealing pool: a proxied request then stays on the thread that
        // accepted its connection, with fewer wake-ups and context switches
        // (measured with tests/bench/proxy-bench.sh: docs/performance.md).
        work_stealing: false,
        // Our drain exits the process as soon as in-flight work is done (see
        // `lifecycle`); Pingora's unconditional grace-period sleep is the
        // fallback, a little longer than the drain may take.
        grace_period_seconds: Some(config.shutdown.drain_timeout.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_TIMEOUT_SECS),
        upgrade_sock: config.runtime.upgrade_socket.to_string_lossy().into_owned(),
        ..ServerConf::default()
    }
}

/// Prepares a binary upgrade: checks the new process can listen on the upgrade
/// socket (Pingora panics when it cannot), then tells the old process `old`
/// to hand its listening sockets over. Every check before this returns has
/// passed, so a failed upgrade leaves the old process serving.
fn take_over_from(old: u32, upgrade_socket: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(upgrade_socket);
    std::os::unix::net::UnixListener::bind(upgrade_socket).map_err(|e| {
        format!(
            "runtime.upgrade_socket: cannot listen on {}: {e}",
            upgrade_socket.display()
        )
    })?;
    let _ = std::fs::remove_file(upgrade_socket);
    let pid = i32::try_from(old).map_err(|_| format!("{old} is not a process id"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .map_err(|e| format!("cannot signal process {old}: {e}"))?;
    info!(old_pid = old, socket = %upgrade_socket.display(), "binary upgrade: waiting for the listening sockets");
    Ok(())
}

/// Sends panics through the log pipeline (JSON/journald) before the default hook
/// prints them, so a panicking service thread is never silent in production logs.
fn install_panic_logger() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = info.location().map(ToString::to_string).unwrap_or_default(),
            "panic: {}",
            info.payload_as_str().unwrap_or("(non-string payload)")
        );
        default(info);
    }));
}
