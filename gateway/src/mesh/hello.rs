//! [`HelloRecorder`]: keeps a copy of the bytes read until told to stop, so a
//! ClientHello read to learn its SNI can be replayed to a passthrough endpoint.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a ClientHello may take before the connection is refused: TLS caps a
/// handshake message at 16 MiB, but real ClientHellos fit in a few KiB.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// A stream that records what is read from it until [`Self::stop_recording`].
#[derive(Debug)]
pub struct HelloRecorder<S> {
    inner: S,
    recorded: Option<Vec<u8>>,
}

impl<S> HelloRecorder<S> {
    /// Starts recording reads from `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            recorded: Some(Vec::with_capacity(1024)),
        }
    }

    /// Stops recording and drops what was recorded.
    pub fn stop_recording(&mut self) {
        self.recorded = None;
    }

    /// What was recorded, and the stream.
    pub fn into_parts(self) -> (Vec<u8>, S) {
        (self.recorded.unwrap_or_default(), self.inner)
    }

    /// The wrapped stream.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HelloRecorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(recorded)) = (&poll, self.recorded.as_mut()) {
            let new = &buf.filled()[before..];
            if recorded.len() + new.len() > MAX_CLIENT_HELLO {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ClientHello larger than 64 KiB",
                )));
            }
            recorded.extend_from_slice(new);
        }
        poll
    }
}

delegate_async_write!([S: AsyncWrite + Unpin] HelloRecorder<S>, inner);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    /// A recorder on one end of an in-memory pipe, and the other end (kept
    /// open) with `sent` written to it.
    async fn recorder(sent: &[u8]) -> (DuplexStream, HelloRecorder<DuplexStream>) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut client, sent)
            .await
            .unwrap();
        (client, HelloRecorder::new(server))
    }

    #[tokio::test]
    async fn records_until_stopped_and_bounds_the_hello() {
        let (_client, mut rec) = recorder(b"hello world").await;
        let mut buf = [0u8; 5];
        rec.read_exact(&mut buf).await.unwrap();
        rec.stop_recording();
        rec.read_exact(&mut buf).await.unwrap();
        let (recorded, _) = rec.into_parts();
        assert!(recorded.is_empty(), "stopped recording drops the copy");

        let (_client, mut rec) = recorder(b"abc").await;
        let mut three = [0u8; 3];
        rec.read_exact(&mut three).await.unwrap();
        assert_eq!(rec.into_parts().0, b"abc");

        let (mut client, mut rec) = recorder(b"").await;
        let big = vec![0u8; MAX_CLIENT_HELLO + 1];
        tokio::spawn(async move { tokio::io::AsyncWriteExt::write_all(&mut client, &big).await });
        let mut sink = vec![0u8; MAX_CLIENT_HELLO + 1];
        assert!(
            rec.read_exact(&mut sink).await.is_err(),
            "oversized hello refused"
        );
    }
}
