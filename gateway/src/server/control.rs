//! The control-plane services `build` composes: federation and discovery,
//! DNS, the admin API and the identity's services.

use std::sync::Arc;

use isthmus_federation::peering::{Hub, PeerTarget};
use isthmus_federation::trust::tls::SvidResolver;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use crate::admin::{AdminApp, AdminState};
use crate::bundle_endpoint::BundleEndpointApp;
use crate::config::Config;
use crate::discovery::{DiscoveryHandle, DiscoveryRunner};
use crate::dns::ClusterSetListeners;
use crate::exit::StartError;
use crate::health::Readiness;
use crate::limits::{Guarded, LimitMetrics, ListenerGuard};
use crate::metrics::Listener;
use crate::trust::{Trust, TrustService};

/// The federation hub with the configured services and peers, and the
/// discovery sources that feed it.
pub(super) fn federation_hub(
    config: &Config,
    trust: Option<&Trust>,
    registry: &prometheus::Registry,
) -> Result<(Arc<Hub>, DiscoveryHandle, DiscoveryRunner), StartError> {
    let hub =
        crate::federation::hub(config, trust, registry).map_err(StartError::FederationMetrics)?;
    let (discovery, runner) = crate::discovery::discovery(config, hub.clone(), registry)
        .map_err(StartError::DiscoveryMetrics)?;
    Ok((hub, discovery, runner))
}

/// The DNS server, with the clusterset listeners when there are any.
pub(super) fn add_dns(
    server: &mut Server,
    dns: crate::dns::DnsParts,
    hub: &Arc<Hub>,
    listeners: Option<ClusterSetListeners>,
    readiness: &Arc<Readiness>,
) {
    readiness.set("dns", false, "starting");
    server.add_service(background_service(
        "dns",
        crate::dns::DnsService {
            cluster_set: dns.cluster_set,
            hub: hub.clone(),
            server: dns.server,
            sockets: parking_lot::Mutex::new(Some(dns.sockets)),
            listeners,
            readiness: readiness.clone(),
        },
    ));
}

/// The admin API on `admin.listen`.
pub(super) fn add_admin(server: &mut Server, state: AdminState, limit_metrics: &LimitMetrics) {
    let config = state.config.load();
    let limits = &config.limits;
    let admin = Guarded::new(
        Arc::new(AdminApp::new(Arc::new(state))),
        ListenerGuard::new(
            Listener::Admin,
            limits.admin,
            limits.header_timeout,
            limit_metrics,
        ),
    );
    let mut admin_service = Service::new("admin".to_owned(), admin);
    admin_service.add_tcp(&config.admin.listen.to_string());
    // The admin API is light; keep its runtime small whatever `runtime.threads` says.
    admin_service.threads = Some(1);
    server.add_service(admin_service);
}

/// The bundle endpoint, when configured, and the service that watches the
/// identity files for rotation.
pub(super) fn add_trust(
    server: &mut Server,
    config: &Config,
    trust: &Arc<Trust>,
    limit_metrics: &LimitMetrics,
) -> Result<(), StartError> {
    if let Some(service) = bundle_endpoint_service(config, trust, limit_metrics) {
        server.add_service(service.map_err(StartError::BundleEndpoint)?);
    }
    server.add_service(background_service(
        "trust",
        TrustService {
            trust: trust.clone(),
        },
    ));
    Ok(())
}

/// The federation service (peering listener and diallers); returns the
/// sender that tells it which peers to dial after a reload.
pub(super) fn add_federation(
    server: &mut Server,
    config: &Config,
    hub: &Arc<Hub>,
    trust: Option<Arc<Trust>>,
    readiness: &Arc<Readiness>,
    discovery: DiscoveryRunner,
) -> tokio::sync::watch::Sender<Vec<PeerTarget>> {
    let federation = &config.federation;
    if federation.enabled() {
        readiness.set("federation", false, "starting");
    }
    let (peer_targets, targets) = tokio::sync::watch::channel(crate::federation::targets(config));
    server.add_service(background_service(
        "federation",
        crate::federation::FederationService {
            hub: hub.clone(),
            trust,
            listen: federation.listen,
            targets,
            connect_timeout: config.upstream.connect_timeout,
            readiness: readiness.clone(),
            enabled: federation.enabled(),
            discovery,
        },
    ));
    peer_targets
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
            Listener::BundleEndpoint,
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
