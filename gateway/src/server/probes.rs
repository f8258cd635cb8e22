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
        probes.push(Probe {
            name: "listeners.east_west".into(),
            addr,
            tls: Some(own_client(config, trust, true)?),
            http_path: None,
            connect: true,
        });
    }
    if let (Some(trust), Some(endpoint)) = (trust, &config.trust.bundle_endpoint) {
        // The gateway checks it serves its own SVID, as its peers will.
        probes.push(Probe {
            name: "trust.bundle_endpoint.listen".into(),
            addr: endpoint.listen,
            tls: Some(own_client(config, trust, false)?),
            http_path: Some("/"),
            connect: true,
        });
    }
    Ok(probes)
}

/// An HTTP/1.1 TLS client that accepts only this gateway's own SVID, and
/// presents it when `present_svid`.
fn own_client(
    config: &Config,
    trust: &Trust,
    present_svid: bool,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let tls = spiffe_client_config(
        trust.material(),
        PeerPolicy::exact(config.spiffe_id()),
        present_svid,
        vec![b"http/1.1".to_vec()],
    )?;
    Ok(Arc::new(tls))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_config as config;
    use crate::exit::Exit;

    #[test]
    fn listeners_are_named_by_their_configuration_path() {
        let config = config(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[listeners]\noutbound = \"127.0.0.2:0\"\n\
             [[services]]\nnamespace = \"ns\"\nname = \"db\"\n\
             ports = [{ port = 5432, protocol = \"tcp\", listen = \"127.0.0.3:0\" }]\n\
             endpoints = [\"10.0.0.1:5432\"]\n",
        );
        let probes = checked_listeners(&config, None, true).unwrap();
        let names: Vec<(&str, bool)> = probes.iter().map(|p| (&*p.name, p.connect)).collect();
        // A TCP service port is only checked bindable: a probe would reach a backend.
        assert_eq!(
            names,
            [
                ("admin.listen", true),
                ("services[0].ports[0].listen", false),
                ("listeners.outbound", true)
            ]
        );
    }

    #[test]
    fn a_taken_port_is_a_start_error_naming_the_listener() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let config = config(&format!("[admin]\nlisten = \"{addr}\"\n"));
        let Err(e) = checked_listeners(&config, None, true) else {
            panic!("{addr} is taken");
        };
        assert!(
            matches!(&e, StartError::Listen { listener, .. } if listener == "admin.listen"),
            "{e:?}"
        );
        assert_eq!(e.exit(), Exit::Failure);
        // During an upgrade the old process holds the ports: no bind check.
        assert_eq!(checked_listeners(&config, None, false).unwrap().len(), 1);
    }
}
