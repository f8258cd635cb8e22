//! Gateway-to-gateway transport: SPIFFE mTLS streams that Pingora can drive.
//!
//! Pingora's rustls connector verifies DNS names only, and its listener cannot
//! count every failed handshake. Isthmus therefore owns the TLS of the east-west
//! hop and hands Pingora an already-authenticated stream:
//! - upstream, [`MeshConnector::peer`] builds the `HttpPeer` whose custom L4
//!   connector opens TCP to the peer gateway and runs `SpiffeConnector` (the
//!   peer's SPIFFE ID checked against its trust domain's bundle, the service
//!   SNI sent, the outcome counted), and hands Pingora the TLS stream as a
//!   virtual socket. Pingora sees a plaintext h2c peer and pools and
//!   multiplexes HTTP/2 over it; the TLS underneath is ours. (Pingora 0.9
//!   reuses such streams only with the patch in vendor/PATCHES.md.)
//! - downstream, the east-west listener accepts plain TCP, runs `SpiffeAcceptor`
//!   and wraps the result in [`MeshTlsStream`], which implements Pingora's `IO`
//!   traits (negotiated ALPN; a TLS digest whose `cert_digest` is the SHA-256 of
//!   the peer's leaf) so Pingora's HTTP server runs on it.

/// Implements tokio's `AsyncWrite` for the wrapper `$ty` (with the impl's
/// generics in brackets) by handing every call to its field `$field`;
/// `vectored` hands vectored writes over too, where without it the trait's
/// defaults apply (the first non-empty buffer is written).
macro_rules! delegate_async_write {
    ([$($generics:tt)*] $ty:ty, $field:ident) => {
        delegate_async_write!(@impl [$($generics)*] $ty, $field, {});
    };
    ([$($generics:tt)*] $ty:ty, $field:ident, vectored) => {
        delegate_async_write!(@impl [$($generics)*] $ty, $field, {
            fn poll_write_vectored(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::tokio::io::AsyncWrite::poll_write_vectored(
                    ::std::pin::Pin::new(&mut self.$field),
                    cx,
                    bufs,
                )
            }
            fn is_write_vectored(&self) -> bool {
                ::tokio::io::AsyncWrite::is_write_vectored(&self.$field)
            }
        });
    };
    (@impl [$($generics:tt)*] $ty:ty, $field:ident, {$($vectored:tt)*}) => {
        impl<$($generics)*> ::tokio::io::AsyncWrite for $ty {
            fn poll_write(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                data: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::tokio::io::AsyncWrite::poll_write(
                    ::std::pin::Pin::new(&mut self.$field),
                    cx,
                    data,
                )
            }
            delegate_async_write!(@unit $field, poll_flush poll_shutdown);
            $($vectored)*
        }
    };
    // poll_flush and poll_shutdown, which take nothing but the context.
    (@unit $field:ident, $($poll:ident)*) => {
        $(
            fn $poll(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::tokio::io::AsyncWrite::$poll(::std::pin::Pin::new(&mut self.$field), cx)
            }
        )*
    };
}

/// Implements tokio's `AsyncRead` and `AsyncWrite` (vectored writes too) for
/// `$ty` by handing every call to its field `$field`.
macro_rules! delegate_async_io {
    ($ty:ty, $field:ident) => {
        impl ::tokio::io::AsyncRead for $ty {
            fn poll_read(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::tokio::io::AsyncRead::poll_read(::std::pin::Pin::new(&mut self.$field), cx, buf)
            }
        }
        delegate_async_write!([] $ty, $field, vectored);
    };
}

mod connect;
mod hello;
mod stream;

pub use connect::{MeshAlpn, MeshConnector};
pub use hello::{HelloRecorder, MAX_CLIENT_HELLO};
pub use stream::{EastWestIo, MeshTlsStream};
