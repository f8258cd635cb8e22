//! The mesh relay: where east-west connections are opened and authenticated.
//!
//! Pingora pools an upstream connection only if the socket's peer address is the
//! peer's address (`Peer::matches_fd`); a custom virtual socket reports fd -1 and
//! is never reused (cloudflare/pingora#883, fix proposed in #971). So Pingora
//! connects to this relay over a Unix socket (a real fd whose peer address is the
//! relay's path), and the relay opens the TCP connection to the peer gateway, runs
//! the SPIFFE mTLS handshake (`SpiffeConnector`: peer ID checked, outcome
//! counted) and splices bytes. One relay connection is one mTLS connection, so
//! Pingora's HTTP/2 pooling and multiplexing carry through to the peer.
//!
//! The socket lives in a private directory (mode 0700) of the gateway's user: a
//! relay reachable by other users would let them speak as this gateway.
//!
//! Protocol, one line each way before the splice:
//! `ISTHMUS-MESH/1 <peer-addr> <expected-spiffe-id> <sni> <alpn>\n` (`alpn` is
//! `h2` or `http/1.1`), answered by `OK\n` or `ERR <reason> <message>\n`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_federation::SpiffeId;
use isthmus_federation::trust::{PeerPolicy, SpiffeConnector};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::upstream::{BackendId, BackendRef};

/// First word of a relay request line.
pub(crate) const MAGIC: &str = "ISTHMUS-MESH/1";
/// Longest request or reply line.
const MAX_LINE: usize = 4096;

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes, byte by byte so
/// nothing after it is consumed.
pub(crate) async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(128);
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        if line.len() == MAX_LINE {
            return Err(std::io::Error::other("relay line too long"));
        }
        line.push(byte);
    }
    String::from_utf8(line).map_err(|_| std::io::Error::other("relay line is not UTF-8"))
}

/// One parsed relay request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelayRequest {
    pub(crate) peer: SocketAddr,
    pub(crate) expected: SpiffeId,
    pub(crate) sni: ServerName<'static>,
    pub(crate) alpn: MeshAlpn,
}

/// The protocol spoken over an east-west connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeshAlpn {
    /// HTTP/2, multiplexed: the default.
    H2,
    /// HTTP/1.1: for requests HTTP/2 cannot carry here (WebSocket upgrades).
    Http1,
}

impl MeshAlpn {
    fn as_str(self) -> &'static str {
        match self {
            Self::H2 => "h2",
            Self::Http1 => "http/1.1",
        }
    }
}

impl RelayRequest {
    pub(crate) fn to_line(&self) -> String {
        format!(
            "{MAGIC} {} {} {} {}\n",
            self.peer,
            self.expected,
            self.sni.to_str(),
            self.alpn.as_str()
        )
    }

    pub(crate) fn parse(line: &str) -> Result<Self, String> {
        let mut words = line.split(' ');
        if words.next() != Some(MAGIC) {
            return Err("not an isthmus mesh request".into());
        }
        let (Some(peer), Some(expected), Some(sni), Some(alpn), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            return Err("expected <peer-addr> <spiffe-id> <sni> <alpn>".into());
        };
        Ok(Self {
            peer: peer.parse().map_err(|e| format!("peer address: {e}"))?,
            expected: expected.parse().map_err(|e| format!("SPIFFE ID: {e}"))?,
            sni: ServerName::try_from(sni.to_owned()).map_err(|e| format!("SNI: {e}"))?,
            alpn: match alpn {
                "h2" => MeshAlpn::H2,
                "http/1.1" => MeshAlpn::Http1,
                other => return Err(format!("ALPN {other:?}")),
            },
        })
    }
}

/// A new directory only this process's user can enter, for the relay socket.
/// Whoever can connect to that socket can reach peer gateways with this
/// gateway's SVID, so the socket's own mode is not enough: it follows the
/// umask. tempfile applies the umask to directories too unless told a mode.
fn private_socket_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("isthmus-mesh-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// The relay's socket, in a private directory removed when this is dropped.
pub struct MeshRelay {
    dir: tempfile::TempDir,
    listener: std::os::unix::net::UnixListener,
    connector: SpiffeConnector,
    connect_timeout: Duration,
    /// Peer gateways declared dead: their connections end at once.
    cuts: broadcast::Sender<BackendId>,
}

impl MeshRelay {
    /// Binds the relay socket in a new private directory under the system's
    /// temporary directory (under systemd, `PrivateTmp` makes that private too).
    /// A peer gateway sent on `cuts` has its connections (and connection
    /// attempts) ended at once, so requests waiting on a dead peer fail now
    /// and are retried elsewhere instead of waiting for a timeout. Only
    /// connections to that address expecting that SPIFFE ID are cut: another
    /// peer claiming the same address keeps its connections.
    pub fn bind(
        connector: SpiffeConnector,
        connect_timeout: Duration,
        cuts: broadcast::Sender<BackendId>,
    ) -> std::io::Result<Self> {
        let dir = private_socket_dir()?;
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("relay.sock"))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            dir,
            listener,
            connector,
            connect_timeout,
            cuts,
        })
    }

    /// The socket path Pingora's peers point at.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("relay.sock")
    }

    /// Accepts relay connections until `stop` fires.
    pub async fn serve(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let listener = match self.listener.try_clone().and_then(UnixListener::from_std) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "mesh relay cannot listen; east-west connections will fail");
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let connector = self.connector.clone();
                        let timeout = self.connect_timeout;
                        let cut = self.cuts.subscribe();
                        tokio::spawn(relay(stream, connector, timeout, cut));
                    }
                    Err(e) => {
                        warn!(error = %e, "mesh relay accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }
}

async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, line: &str) -> bool {
    stream.write_all(line.as_bytes()).await.is_ok() && stream.flush().await.is_ok()
}

/// Resolves when the peer gateway at `peer` expected to prove `expected` is
/// announced on `cuts`.
async fn cut_for(cuts: &mut broadcast::Receiver<BackendId>, peer: SocketAddr, expected: &SpiffeId) {
    loop {
        match cuts.recv().await {
            Ok(cut) if cut.as_ref() == BackendRef::gateway(peer, expected) => return,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            // The sender is gone with the gateway's upstreams: nothing will be cut.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// Serves one relay connection until it ends or its peer is cut.
async fn relay(
    mut local: UnixStream,
    connector: SpiffeConnector,
    connect_timeout: Duration,
    mut cuts: broadcast::Receiver<BackendId>,
) {
    let Some(request) = peer_of(&mut local).await else {
        return;
    };
    let peer = request.peer;
    let expected = request.expected.clone();
    tokio::select! {
        () = serve_one(local, request, connector, connect_timeout) => {}
        () = cut_for(&mut cuts, peer, &expected) => {
            debug!(%peer, %expected, "east-west connection cut: the peer was declared dead");
        }
    }
}

/// Reads the relay request, answering a malformed one.
async fn peer_of(local: &mut UnixStream) -> Option<RelayRequest> {
    match read_line(local)
        .await
        .map_err(|e| e.to_string())
        .and_then(|l| RelayRequest::parse(&l))
    {
        Ok(r) => Some(r),
        Err(e) => {
            let _ = reply(local, &format!("ERR bad_request {e}\n")).await;
            None
        }
    }
}

/// Connects and authenticates per `request`, then splices.
async fn serve_one(
    mut local: UnixStream,
    request: RelayRequest,
    connector: SpiffeConnector,
    connect_timeout: Duration,
) {
    let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(request.peer)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let _ = reply(
                &mut local,
                &format!("ERR connect_refused {}: {e}\n", request.peer),
            )
            .await;
            return;
        }
        Err(_) => {
            let _ = reply(
                &mut local,
                &format!("ERR connect_timeout {}\n", request.peer),
            )
            .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let alpn = vec![request.alpn.as_str().as_bytes().to_vec()];
    let mut tls = match connector
        .connect_with_alpn(
            tcp,
            request.sni.clone(),
            PeerPolicy::exact(request.expected.clone()),
            alpn,
        )
        .await
    {
        Ok((tls, _)) => tls,
        Err(e) => {
            let _ = reply(
                &mut local,
                &format!("ERR tls {}\n", e.to_string().replace('\n', " ")),
            )
            .await;
            return;
        }
    };
    if !reply(&mut local, "OK\n").await {
        return;
    }
    match tokio::io::copy_bidirectional(&mut local, &mut tls).await {
        Ok((up, down)) => debug!(peer = %request.peer, up, down, "east-west connection closed"),
        Err(e) => debug!(peer = %request.peer, error = %e, "east-west connection ended"),
    }
}

/// Asks the relay at `path` for an authenticated connection per `request`;
/// returns the Unix stream to speak over, or why the relay could not.
pub(crate) async fn open(path: &Path, request: &RelayRequest) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("mesh relay {}: {e}", path.display()))?;
    if !reply(&mut stream, &request.to_line()).await {
        return Err("mesh relay closed the connection".into());
    }
    let answer = read_line(&mut stream)
        .await
        .map_err(|e| format!("mesh relay: {e}"))?;
    if answer == "OK" {
        Ok(stream)
    } else {
        Err(answer.strip_prefix("ERR ").unwrap_or(&answer).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_ends_only_connections_to_that_address_expecting_that_identity() {
        use futures::FutureExt;
        let addr: SocketAddr = "127.0.0.1:15443".parse().unwrap();
        let other_addr: SocketAddr = "127.0.0.1:15444".parse().unwrap();
        let a: SpiffeId = "spiffe://a.example/isthmus/gateway/gw".parse().unwrap();
        let b: SpiffeId = "spiffe://b.example/isthmus/gateway/gw".parse().unwrap();
        let (cuts, mut rx) = broadcast::channel(8);
        // Another peer at the same address, the same peer at another
        // address, and an endpoint's address with no identity: no cut.
        cuts.send(BackendId::gateway(addr, b.clone())).unwrap();
        cuts.send(BackendId::gateway(other_addr, a.clone()))
            .unwrap();
        cuts.send(BackendId::endpoint(addr)).unwrap();
        assert!(cut_for(&mut rx, addr, &a).now_or_never().is_none());
        // That peer at that address: cut.
        cuts.send(BackendId::gateway(addr, a.clone())).unwrap();
        assert!(cut_for(&mut rx, addr, &a).now_or_never().is_some());
    }

    #[test]
    fn the_socket_directory_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = private_socket_dir().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "mode {:o}", mode & 0o777);
    }

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let r = RelayRequest {
            peer: "127.0.0.1:15443".parse().unwrap(),
            expected: "spiffe://a.example/isthmus/gateway/gw".parse().unwrap(),
            sni: ServerName::try_from("outbound_.80_._.svc.ns.svc.cluster.local").unwrap(),
            alpn: MeshAlpn::Http1,
        };
        let line = r.to_line();
        assert_eq!(RelayRequest::parse(line.trim_end()), Ok(r));
        for bad in [
            "",
            "GET / HTTP/1.1",
            "ISTHMUS-MESH/1 127.0.0.1:1",
            "ISTHMUS-MESH/1 nowhere spiffe://a/b x",
            "ISTHMUS-MESH/1 127.0.0.1:1 http://a/b x",
            "ISTHMUS-MESH/1 127.0.0.1:1 spiffe://a/b x",
            "ISTHMUS-MESH/1 127.0.0.1:1 spiffe://a/b x spdy/3",
            "ISTHMUS-MESH/1 127.0.0.1:1 spiffe://a/b x h2 extra",
        ] {
            assert!(RelayRequest::parse(bad).is_err(), "{bad:?}");
        }
    }
}
