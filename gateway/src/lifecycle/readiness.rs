//! Start-up readiness: each listener is probed until it accepts, then `READY=1`
//! goes to systemd and its watchdog is fed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::info;

use super::systemd::{notify_systemd, watchdog_timeout};
use crate::health::Readiness;

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
