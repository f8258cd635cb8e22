//! `isthmus run`: builds the Pingora server from the configuration and runs it
//! until a stop signal.
//!
//! Order matters: the configuration is validated and every listen address is
//! checked *before* anything is bound, so a bad config or a port in use is one
//! clear error at start-up rather than a service that silently never listens
//! (Pingora panics inside the service runtime when a bind fails).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use socket2::{Domain, Socket, Type};
use tracing::{error, info};

use std::time::Duration;

use isthmus_federation::limits::ConnectionLimiter;
use isthmus_federation::trust::tls::{SvidResolver, mtls_server_config, spiffe_client_config};
use isthmus_federation::trust::{HandshakeMetrics, PeerPolicy, SpiffeAcceptor, SpiffeConnector};
use isthmus_federation::{Catalog, ServiceKey};
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::protocols::http::v2::server::{H2Options, default_h2_options};

use crate::admin::{AdminApp, AdminState};
use crate::bundle_endpoint::BundleEndpointApp;
use crate::cli::{EXIT_CONFIG, EXIT_FAILURE};
use crate::config::Config;
use crate::config::limits::LimitsConfig;
use crate::dns::{ClusterSetListeners, DynApp};
use crate::health::{Drain, Readiness};
use crate::lifecycle::{Probe, Reloader, Signals, Startup, Upgrade};
use crate::limits::{Guarded, LimitMetrics, ListenerGuard};
use crate::mesh::MeshRelay;
use crate::proxy::east_west::{Callers, EastWestApp, EastWestLimits, EastWestProxy};
use crate::proxy::outbound::OutboundProxy;
use crate::proxy::tcp::TcpOutboundApp;
use crate::proxy::{Lingering, ProxyMetrics, Runtime, TcpMetrics};
use crate::trust::{Trust, TrustService};
use crate::upstream::Upstreams;
use crate::upstream::balance::Here;
use crate::upstream::leases::LeaseWatcher;
use crate::upstream::probe::HealthChecker;
use crate::{logging, metrics};

/// Seconds Pingora waits for service runtimes after its grace period; only
/// reached when our drain (see `lifecycle`) has not exited the process first.
const RUNTIME_SHUTDOWN_TIMEOUT_SECS: u64 = 2;

/// Runs the gateway; returns the process exit code. With `upgrade_from`, takes
/// over the listening sockets of that running gateway (a binary upgrade).
pub fn run(config_path: &Path, upgrade_from: Option<u32>) -> ExitCode {
    let registry = metrics::new_registry();
    let (config, trust) = match crate::cli::load_all(config_path, &registry) {
        Ok(loaded) => loaded,
        Err(errors) => {
            crate::cli::print_config_errors(config_path, &errors);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let trust = trust.map(Arc::new);
    let log = match logging::init(&config.log) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("isthmus: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    install_panic_logger();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.display(),
        gateway = %config.gateway.name,
        cluster = %config.gateway.cluster,
        spiffe_id = %config.spiffe_id(),
        "isthmus starting"
    );

    let listeners = match listeners(&config, trust.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot build the TLS readiness probe");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // During an upgrade the old process holds the ports until it hands them over.
    if upgrade_from.is_none()
        && let Err((path, addr, e)) = check_bindable(&listeners)
    {
        error!(%addr, error = %e, "{path}: cannot listen on {addr}: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    if let Some(trust) = &trust {
        let svid = trust.material().svid();
        info!(spiffe_id = %svid.spiffe_id, fingerprint = %svid.fingerprint,
            trust_domains = trust.material().trust().iter().count(), "identity loaded");
    }

    let readiness = Arc::new(Readiness::default());
    readiness.set(
        "config",
        true,
        format!("loaded from {}", config_path.display()),
    );
    readiness.set("listeners", false, "starting");
    readiness.set("signals", false, "starting");
    let drain = Arc::new(Drain::default());
    let conf = pingora_conf(&config);
    let upgrade = Arc::new(Upgrade::new(
        config_path.to_owned(),
        config.runtime.upgrade_socket.clone(),
    ));
    let config = Arc::new(ArcSwap::from_pointee(config));

    let upgrade_socket = conf.upgrade_sock.clone();
    let opt = upgrade_from.map(|_| Opt {
        upgrade: true,
        ..Opt::default()
    });
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    let phases = server.watch_execution_phase();
    let hub = match crate::federation::hub(&config.load(), trust.as_deref(), &registry) {
        Ok(hub) => hub,
        Err(e) => {
            error!(error = %e, "cannot register the federation metrics");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let (discovery, discovery_runner) =
        match crate::discovery::discovery(&config.load(), hub.clone(), &registry) {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "cannot register the discovery metrics");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
    let catalog = hub.catalog().clone();
    let dns = match crate::dns::DnsParts::new(&config.load().dns, &registry) {
        Ok(dns) => dns,
        Err(e) => {
            error!(error = %e, "cannot set up DNS");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let here = Here {
        cluster: config.load().gateway.cluster.clone(),
        locality: config.load().gateway.locality.clone(),
        labels: config.load().gateway.labels.clone(),
    };
    let upstreams = Arc::new(Upstreams::new(
        config.load().upstream.clone(),
        here,
        &registry,
    ));
    upstreams.set_routes(&config.load().routes);
    server.add_service(background_service(
        "peer leases",
        LeaseWatcher::new(upstreams.clone(), hub.clone()),
    ));
    let limit_metrics = LimitMetrics::new(&registry);
    let clusterset_listeners = match add_data_plane(
        &mut server,
        &config.load(),
        trust.as_ref(),
        DataPlane {
            catalog: &catalog,
            upstreams: &upstreams,
            drain: &drain,
            config: &config,
            limits: &limit_metrics,
        },
        dns.as_ref().map(|d| d.cluster_set.allocations()),
        &registry,
    ) {
        Ok(listeners) => listeners,
        Err(e) => {
            error!(error = %e, "cannot set up the data plane");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let clusterset_ips = dns.as_ref().map(|d| d.cluster_set.allocations());
    if let Some(dns) = dns {
        readiness.set("dns", false, "starting");
        server.add_service(background_service(
            "dns",
            crate::dns::DnsService {
                cluster_set: dns.cluster_set,
                hub: hub.clone(),
                server: dns.server,
                sockets: std::sync::Mutex::new(Some(dns.sockets)),
                listeners: clusterset_listeners,
                readiness: readiness.clone(),
            },
        ));
    }

    let admin_addr = config.load().admin.listen;
    let admin = AdminApp::new(Arc::new(AdminState {
        registry: registry.clone(),
        readiness: readiness.clone(),
        config: config.clone(),
        drain: drain.clone(),
        trust: trust.clone(),
        upstreams: upstreams.clone(),
        hub: hub.clone(),
        clusterset_ips,
    }));
    let limits = config.load().limits.clone();
    let admin = Guarded::new(
        Arc::new(admin),
        ListenerGuard::new("admin", limits.admin, limits.header_timeout, &limit_metrics),
    );
    let mut admin_service = Service::new("admin".to_owned(), admin);
    admin_service.add_tcp(&admin_addr.to_string());
    // The admin API is light; keep its runtime small whatever `runtime.threads` says.
    admin_service.threads = Some(1);
    server.add_service(admin_service);
    if let Some(trust) = &trust {
        if let Some(service) = bundle_endpoint_service(&config.load(), trust, &limit_metrics) {
            match service {
                Ok(service) => {
                    server.add_service(service);
                }
                Err(e) => {
                    error!(error = %e, "cannot configure the bundle endpoint's TLS");
                    return ExitCode::from(EXIT_FAILURE);
                }
            }
        }
        server.add_service(background_service(
            "trust",
            TrustService {
                trust: trust.clone(),
            },
        ));
    }
    let federation = &config.load().federation;
    if federation.enabled() {
        readiness.set("federation", false, "starting");
    }
    let (peer_targets, targets) =
        tokio::sync::watch::channel(crate::federation::targets(&config.load()));
    server.add_service(background_service(
        "federation",
        crate::federation::FederationService {
            hub: hub.clone(),
            trust: trust.clone(),
            listen: federation.listen,
            targets,
            connect_timeout: config.load().upstream.connect_timeout,
            readiness: readiness.clone(),
            enabled: federation.enabled(),
            discovery: discovery_runner,
        },
    ));
    server.add_service(background_service(
        "startup",
        Startup {
            readiness: readiness.clone(),
            listeners,
            announce_main_pid: upgrade_from.is_some(),
        },
    ));

    let reloader = Reloader::new(
        config_path.to_owned(),
        config.clone(),
        Some(log),
        trust,
        crate::federation::Reconfigure {
            hub,
            targets: peer_targets,
            discovery,
        },
        upstreams,
        &registry,
    );
    let signals = Signals {
        reloader: Arc::new(reloader),
        readiness,
        drain,
        config,
        phases: std::sync::Mutex::new(Some(phases)),
        upgrade,
    };
    // Everything that can fail has been built: only now is the old process of
    // an upgrade told to hand over.
    if let Some(old) = upgrade_from
        && let Err(e) = take_over_from(old, Path::new(&upgrade_socket))
    {
        error!(
            old_pid = old,
            "binary upgrade: {e}; the running gateway keeps serving"
        );
        return ExitCode::from(EXIT_FAILURE);
    }
    // With `upgrade`, this receives the listening sockets (Pingora exits the
    // process if none arrive within 5 s).
    server.bootstrap();
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    crate::lifecycle::log_stopped();
    ExitCode::SUCCESS
}

/// How long a peer gateway has to complete the east-west handshake.
const EAST_WEST_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// ALPN offered and accepted on the east-west hop.
fn east_west_alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

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
}

/// Adds the outbound and east-west listeners and the mesh relay; returns the
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
    } = shared;
    let limits = &config.limits;
    let guard = |listener: &'static str, caps| {
        ListenerGuard::new(listener, caps, limits.header_timeout, limit_metrics)
    };
    let clusterset = clusterset.filter(|_| config.dns.clusterset_listeners);
    let conf = server.configuration.clone();
    let metrics = ProxyMetrics::new(registry);
    let tcp_metrics = TcpMetrics::new(registry);
    let threads = config.runtime.threads;

    // The relay opens east-west connections for the outbound listener.
    let relay = match trust {
        Some(trust) if config.listeners.outbound.is_some() || clusterset.is_some() => {
            let connector = SpiffeConnector::new(
                trust.material().clone(),
                trust.handshake_metrics.clone(),
                EAST_WEST_HANDSHAKE_TIMEOUT,
                vec![b"h2".to_vec()],
            );
            let relay = MeshRelay::bind(
                connector,
                config.upstream.connect_timeout,
                upstreams.cut_signal(),
            )
            .map_err(|e| format!("mesh relay: {e}"))?;
            let path = relay.path();
            server.add_service(background_service("mesh relay", RelayService::new(relay)));
            Some(path)
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
        metrics,
        tcp_metrics,
        relay,
        peers: l4_connector,
    });

    let outbound_proxy = |clusterset: Option<_>| {
        let mut outbound = OutboundProxy::new(runtime.clone());
        if let Some(allocations) = clusterset {
            outbound = outbound.with_clusterset(allocations);
        }
        let mut proxy = pingora_proxy::http_proxy(&conf, outbound);
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        proxy.server_options = Some(options);
        proxy.h2_options = Some(h2_options(limits));
        proxy
    };
    if let Some(addr) = config.listeners.outbound {
        let proxy = Guarded::new(
            Arc::new(Lingering(Arc::new(outbound_proxy(None)))),
            guard("outbound", limits.outbound),
        );
        let mut service = Service::new("outbound".to_owned(), proxy);
        service.add_tcp(&addr.to_string());
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
                guard("clusterset", limits.outbound),
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
        let peer_clusters = config
            .peers
            .iter()
            .map(|p| (p.spiffe_id.clone(), p.cluster.clone()))
            .collect();
        let callers = Arc::new(Callers::default());
        let mut proxy = pingora_proxy::http_proxy(
            &conf,
            EastWestProxy::new(
                runtime.clone(),
                config.spiffe_id(),
                peer_clusters,
                callers.clone(),
                registry,
            ),
        );
        proxy.h2_options = Some(h2_options(limits));
        let app = EastWestApp::new(
            acceptor,
            proxy,
            callers,
            runtime.clone(),
            EastWestLimits {
                guard: guard("east_west", limits.east_west),
                handshakes: ConnectionLimiter::new(limits.east_west_handshakes),
                config: live_config.clone(),
            },
        );
        let mut service = Service::new("east-west".to_owned(), app);
        service.add_tcp(&addr.to_string());
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

/// Pingora's bounded HTTP/2 defaults with `limits.h2_max_concurrent_streams`.
fn h2_options(limits: &LimitsConfig) -> H2Options {
    let mut options = default_h2_options();
    options.max_concurrent_streams(limits.h2_max_concurrent_streams);
    options
}

/// Runs the mesh relay as a Pingora background service.
struct RelayService(std::sync::Mutex<Option<MeshRelay>>);

impl RelayService {
    fn new(relay: MeshRelay) -> Self {
        Self(std::sync::Mutex::new(Some(relay)))
    }
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for RelayService {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let relay = self.0.lock().ok().and_then(|mut r| r.take());
        let Some(relay) = relay else { return };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let serve = tokio::spawn(relay.serve(stop_rx));
        let _ = shutdown.changed().await;
        let _ = stop_tx.send(true);
        let _ = serve.await;
    }
}

/// The SPIFFE bundle endpoint's listening service, when configured.
fn bundle_endpoint_service(
    config: &Config,
    trust: &Trust,
    limit_metrics: &LimitMetrics,
) -> Option<pingora_error::Result<Service<Guarded<BundleEndpointApp>>>> {
    let endpoint = config.trust.bundle_endpoint.as_ref()?;
    let app = BundleEndpointApp {
        material: trust.material().clone(),
        trust_domain: config.gateway.trust_domain.clone(),
        refresh_hint: endpoint.refresh_hint,
    };
    // Pingora completes the TLS handshake before the app sees the connection:
    // the caps count connections from then on.
    let app = Guarded::new(
        Arc::new(app),
        ListenerGuard::new(
            "bundle_endpoint",
            config.limits.bundle_endpoint,
            config.limits.header_timeout,
            limit_metrics,
        ),
    );
    let mut service = Service::new("bundle endpoint".to_owned(), app);
    // Pingora builds the listener's rustls config once; our resolver reads the
    // live SVID on every handshake, so rotation needs no rebuild. The
    // certificate paths are unused when a resolver is set.
    let mut tls = match TlsSettings::intermediate("", "") {
        Ok(tls) => tls,
        Err(e) => return Some(Err(e)),
    };
    tls.set_cert_resolver(Arc::new(SvidResolver::new(trust.material().clone())));
    service.add_tls_with_settings(&endpoint.listen.to_string(), None, tls);
    service.threads = Some(1);
    Some(Ok(service))
}

/// Every listener the configuration asks for, named by its config path.
fn listeners(config: &Config, trust: Option<&Trust>) -> Result<Vec<Probe>, rustls::Error> {
    let mut probes = vec![Probe {
        name: "admin.listen".into(),
        addr: config.admin.listen,
        tls: None,
        http_path: Some("/healthz"),
        connect: true,
    }];
    for (i, svc) in config.services.iter().enumerate() {
        for (j, port) in svc.ports.iter().enumerate() {
            if let Some(addr) = port.listen {
                probes.push(Probe {
                    name: format!("services[{i}].ports[{j}].listen"),
                    addr,
                    tls: None,
                    http_path: None,
                    connect: false,
                });
            }
        }
    }
    if let Some(addr) = config.federation.listen.filter(|_| trust.is_some()) {
        // Bound by the federation service; a TLS probe would be a peering
        // session, so readiness follows the peers' syncs instead.
        probes.push(Probe {
            name: "federation.listen".into(),
            addr,
            tls: None,
            http_path: None,
            connect: false,
        });
    }
    if let Some(addr) = config.listeners.outbound {
        probes.push(Probe {
            name: "listeners.outbound".into(),
            addr,
            tls: None,
            // A TCP connect only: an HTTP probe would be routed and counted.
            http_path: None,
            connect: true,
        });
    }
    if let (Some(trust), Some(addr)) = (trust, config.listeners.east_west) {
        // The gateway reaches its own east-west port as a peer would. HTTP/1.1
        // only: closing after the handshake is then an ordinary idle client,
        // where an h2 connection without a preface is logged as an error.
        let tls = spiffe_client_config(
            trust.material(),
            PeerPolicy::exact(config.spiffe_id()),
            true,
            vec![b"http/1.1".to_vec()],
        )?;
        probes.push(Probe {
            name: "listeners.east_west".into(),
            addr,
            tls: Some(Arc::new(tls)),
            http_path: None,
            connect: true,
        });
    }
    if let (Some(trust), Some(endpoint)) = (trust, &config.trust.bundle_endpoint) {
        // The gateway checks it serves its own SVID, as its peers will.
        let tls = spiffe_client_config(
            trust.material(),
            PeerPolicy::exact(config.spiffe_id()),
            false,
            vec![b"http/1.1".to_vec()],
        )?;
        probes.push(Probe {
            name: "trust.bundle_endpoint.listen".into(),
            addr: endpoint.listen,
            tls: Some(Arc::new(tls)),
            http_path: Some("/"),
            connect: true,
        });
    }
    Ok(probes)
}

fn pingora_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.runtime.threads,
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

/// Binds and releases each address the way Pingora will (SO_REUSEADDR), to turn
/// "address in use" or "cannot assign address" into an error before start-up.
fn check_bindable(listeners: &[Probe]) -> Result<(), (&str, SocketAddr, std::io::Error)> {
    for probe in listeners {
        let addr = probe.addr;
        let bind = || -> std::io::Result<()> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1)
        };
        bind().map_err(|e| (probe.name.as_str(), addr, e))?;
    }
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
