//! Listening sockets made by hand, where Pingora does not make them.

use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// A TCP listener for a service Pingora does not hand over on upgrade (the
/// federation, DNS and clusterset listeners): with SO_REUSEPORT the new process
/// binds it while the old one still listens. `freebind` allows an address not
/// (yet) configured on an interface.
pub fn upgradable_tcp_listener(
    addr: SocketAddr,
    freebind: bool,
) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if freebind {
        let _ = match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true),
            SocketAddr::V6(_) => socket.set_freebind_v6(true),
        };
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds and releases `addr` the way Pingora will (SO_REUSEADDR), to turn
/// "address in use" or "cannot assign address" into an error before start-up.
pub fn check_bindable(addr: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)
}
