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
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use socket2::{Domain, Socket, Type};
use tracing::{error, info};

use isthmus_federation::trust::PeerPolicy;
use isthmus_federation::trust::tls::{SvidResolver, spiffe_client_config};
use pingora_core::listeners::tls::TlsSettings;

use crate::admin::{AdminApp, AdminState};
use crate::bundle_endpoint::BundleEndpointApp;
use crate::cli::{EXIT_CONFIG, EXIT_FAILURE};
use crate::config::Config;
use crate::health::{Drain, Readiness};
use crate::lifecycle::{Probe, Reloader, Signals, Startup};
use crate::trust::{Trust, TrustService};
use crate::{logging, metrics};

/// Seconds Pingora waits for service runtimes after listeners close; our drain
/// has already waited for in-flight work by then.
const RUNTIME_SHUTDOWN_TIMEOUT_SECS: u64 = 2;

/// Runs the gateway; returns the process exit code.
pub fn run(config_path: &Path) -> ExitCode {
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
    if let Err((path, addr, e)) = check_bindable(&listeners) {
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
    let threads = config.runtime.threads;
    let config = Arc::new(ArcSwap::from_pointee(config));

    let mut server = Server::new_with_opt_and_conf(None, pingora_conf(threads));
    server.bootstrap();

    let admin_addr = config.load().admin.listen;
    let admin = AdminApp::new(Arc::new(AdminState {
        registry: registry.clone(),
        readiness: readiness.clone(),
        config: config.clone(),
        drain: drain.clone(),
        trust: trust.clone(),
    }));
    let mut admin_service = Service::new("admin".to_owned(), admin);
    admin_service.add_tcp(&admin_addr.to_string());
    // The admin API is light; keep its runtime small whatever `runtime.threads` says.
    admin_service.threads = Some(1);
    server.add_service(admin_service);
    if let Some(trust) = &trust {
        if let Some(service) = bundle_endpoint_service(&config.load(), trust) {
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
    server.add_service(background_service(
        "startup",
        Startup {
            readiness: readiness.clone(),
            listeners,
        },
    ));

    let reloader = Reloader::new(
        config_path.to_owned(),
        config.clone(),
        Some(log),
        trust,
        &registry,
    );
    let signals = Signals {
        reloader: Arc::new(reloader),
        readiness,
        drain,
        config,
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    info!("isthmus stopped");
    ExitCode::SUCCESS
}

/// The SPIFFE bundle endpoint's listening service, when configured.
fn bundle_endpoint_service(
    config: &Config,
    trust: &Trust,
) -> Option<pingora_error::Result<Service<BundleEndpointApp>>> {
    let endpoint = config.trust.bundle_endpoint.as_ref()?;
    let app = BundleEndpointApp {
        material: trust.material().clone(),
        trust_domain: config.gateway.trust_domain.clone(),
        refresh_hint: endpoint.refresh_hint,
    };
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
        name: "admin.listen",
        addr: config.admin.listen,
        tls: None,
        http_path: Some("/healthz"),
    }];
    if let (Some(trust), Some(endpoint)) = (trust, &config.trust.bundle_endpoint) {
        // The gateway checks it serves its own SVID, as its peers will.
        let tls = spiffe_client_config(
            trust.material(),
            PeerPolicy::exact(config.spiffe_id()),
            false,
            vec![b"http/1.1".to_vec()],
        )?;
        probes.push(Probe {
            name: "trust.bundle_endpoint.listen",
            addr: endpoint.listen,
            tls: Some(Arc::new(tls)),
            http_path: Some("/"),
        });
    }
    Ok(probes)
}

fn pingora_conf(threads: usize) -> ServerConf {
    ServerConf {
        threads,
        // Draining happens before Pingora's shutdown (see `lifecycle`), so its
        // unconditional grace-period sleep is not needed.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_TIMEOUT_SECS),
        ..ServerConf::default()
    }
}

/// Binds and releases each address the way Pingora will (SO_REUSEADDR), to turn
/// "address in use" or "cannot assign address" into an error before start-up.
fn check_bindable(listeners: &[Probe]) -> Result<(), (&'static str, SocketAddr, std::io::Error)> {
    for &Probe {
        name: path, addr, ..
    } in listeners
    {
        let bind = || -> std::io::Result<()> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1)
        };
        bind().map_err(|e| (path, addr, e))?;
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
