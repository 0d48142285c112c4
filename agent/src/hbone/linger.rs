//! Closing a tunnel's TCP connection without a reset. Closing a socket whose receive queue still
//! holds bytes makes the kernel send a RST (RFC 2525), and a tunnel's peer often has a last frame
//! in flight (a WINDOW_UPDATE, a GOAWAY). So a dropped tunnel socket is shut down for writing and
//! read until the peer's EOF (for a bounded time) before it is closed, on its own task.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};

/// How long a closing socket waits for its peer's EOF.
const LINGER: Duration = Duration::from_secs(3);

/// Sockets closing in the background now.
static CLOSING: AtomicUsize = AtomicUsize::new(0);

/// How many tunnel sockets are still closing (an agent that exits waits for none).
pub fn closing() -> usize {
    CLOSING.load(Ordering::Acquire)
}

/// A TCP socket that closes gracefully when dropped.
pub struct Lingering(Option<TcpStream>);

impl Lingering {
    /// Wraps `tcp`.
    pub fn new(tcp: TcpStream) -> Self {
        Self(Some(tcp))
    }

    fn inner(&mut self) -> io::Result<&mut TcpStream> {
        self.0.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut tcp) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let counted = Closing::count();
        runtime.spawn(async move {
            // Moved in, so a runtime that drops the task unfinished also uncounts it.
            let _counted = counted;
            let _ = tcp.shutdown().await;
            let drain = async {
                let mut sink = [0u8; 4096];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

/// One socket counted in [`closing`] for as long as this lives.
struct Closing;

impl Closing {
    fn count() -> Self {
        CLOSING.fetch_add(1, Ordering::AcqRel);
        Self
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        CLOSING.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.inner()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()?).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_dropped_socket_with_unread_bytes_closes_with_a_fin_not_a_reset() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut client, server) = (client.unwrap(), Lingering::new(server.unwrap().0));
        // Bytes the server side never reads, then it is dropped.
        client.write_all(b"unread").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(server);
        let mut rest = Vec::new();
        // A reset would make this read fail; a graceful close is an EOF.
        client.read_to_end(&mut rest).await.expect("EOF, not a reset");
        assert!(rest.is_empty(), "{rest:?}");
    }
}
