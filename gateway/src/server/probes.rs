//! What must listen once the gateway runs: a readiness probe per listener,
//! named by its configuration path, each checked bindable before start-up.

use std::sync::Arc;

use isthmus_federation::trust::PeerPolicy;
use isthmus_federation::trust::tls::spiffe_client_config;

use crate::config::Config;
use crate::exit::StartError;
use crate::lifecycle::Probe;
use crate::trust::Trust;

/// Every listener the configuration asks for, checked bindable when `bind`.
pub(super) fn checked_listeners(
    config: &Config,
    trust: Option<&Trust>,
    bind: bool,
) -> Result<Vec<Probe>, StartError> {
    let listeners = listeners(config, trust).map_err(StartError::ReadinessProbe)?;
    if bind {
        check_bindable(&listeners)?;
    }
    Ok(listeners)
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

/// Turns "address in use" or "cannot assign address" on any listener into an
/// error before start-up, naming the listener's configuration path.
fn check_bindable(listeners: &[Probe]) -> Result<(), StartError> {
    for probe in listeners {
        crate::net::check_bindable(probe.addr).map_err(|source| StartError::Listen {
            listener: probe.name.clone(),
            addr: probe.addr,
            source,
        })?;
    }
    Ok(())
}
