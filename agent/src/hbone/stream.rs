//! One HBONE tunnel: an HTTP/2 CONNECT stream seen as a byte stream (tokio `AsyncRead` +
//! `AsyncWrite`), so the proxy's byte relay can move bytes between an app socket and a tunnel.
//!
//! Flow control is what bounds memory: received data is only acknowledged (its window released) once
//! the reader has taken it, and writes only hand h2 as many bytes as the peer's window allows, so
//! neither side ever buffers more than a window per stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::Lease;

/// A byte stream carried by one HTTP/2 CONNECT stream. Shutting down the write half sends
/// END_STREAM (a TCP half-close); reading the peer's END_STREAM yields EOF; a reset stream or a
/// broken connection is an `io::Error`. Dropping it before both ends closed resets the stream.
#[derive(Debug)]
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes the reader has not taken yet; their window is released as they are taken.
    unread: Bytes,
    write_closed: bool,
    /// Counts this stream against its pooled connection (client side only).
    _lease: Option<Lease>,
}

impl HboneStream {
    /// Wraps the two halves of an established CONNECT stream.
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, unread: Bytes::new(), write_closed: false, _lease: None }
    }

    /// Ties the stream to a pooled connection's stream count.
    pub(super) fn with_lease(mut self, lease: Lease) -> Self {
        self._lease = Some(lease);
        self
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            loop {
                match ready!(this.recv.poll_data(cx)) {
                    // END_STREAM: the peer half-closed.
                    None => return Poll::Ready(Ok(())),
                    Some(Ok(chunk)) if chunk.is_empty() => continue,
                    Some(Ok(chunk)) => {
                        this.unread = chunk;
                        break;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                }
            }
        }
        let n = this.unread.len().min(out.remaining());
        out.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        // An error here means the stream was reset meanwhile; the next read reports it.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream write half is shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Ask for window for this write only: h2 buffers whatever it is given, so giving it no more
        // than the granted capacity is what keeps the send side bounded.
        this.send.reserve_capacity(buf.len());
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                return match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => Poll::Ready(Err(h2_to_io(e))),
                };
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                // The send side is no longer open: find out why.
                None => return Poll::Ready(Err(send_side_gone(&mut this.send, cx))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.write_closed = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => Poll::Ready(Err(send_side_gone(&mut this.send, cx))),
        }
    }
}

/// The error for a send side that closed underneath the writer (peer reset, connection gone).
fn send_side_gone(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => reset_error(reason),
        Poll::Ready(Err(e)) => h2_to_io(e),
        Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream is closed for sending"),
    }
}

fn reset_error(reason: Reason) -> io::Error {
    // NO_ERROR: the peer finished and wants no more data (RFC 9113 8.1); anything else is an abort.
    let kind =
        if reason == Reason::NO_ERROR { io::ErrorKind::BrokenPipe } else { io::ErrorKind::ConnectionReset };
    io::Error::new(kind, format!("HBONE stream reset by peer ({reason})"))
}

/// Maps an h2 error to the `io::Error` a TCP socket would give in the same situation.
pub(super) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HBONE connection I/O error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::super::STREAM_WINDOW;
    use super::super::test_support::{Mesh, nowhere, pattern, start_server, tunnel_to};
    use super::*;

    const MIB: usize = 1 << 20;

    /// Writes `len` bytes of `pattern(seed)` in uneven chunks, counting what the stream accepted.
    async fn write_pattern(
        stream: &mut (impl AsyncWrite + Unpin),
        seed: u8,
        len: usize,
        written: &AtomicUsize,
    ) {
        let data = pattern(seed, len);
        for chunk in data.chunks(48 * 1024 + 7) {
            stream.write_all(chunk).await.unwrap();
            written.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        stream.shutdown().await.unwrap();
    }

    /// Reads to EOF in small reads, yielding now and then so the reader is slower than the writer.
    async fn read_slowly(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() % (256 * 1024) < 4096 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    #[tokio::test]
    async fn bulk_transfer_both_ways_is_flow_controlled() {
        const LEN: usize = 32 * MIB;
        let mesh = Mesh::new();
        let (to_test, mut server_streams) = mpsc::unbounded_channel();
        let server = start_server(mesh.server_config(), move |_| {
            let to_test = to_test.clone();
            async move { Ok(move |s: HboneStream| async move { to_test.send(s).unwrap() }) }
        })
        .await;
        let (client, _) = tunnel_to(&mesh, &mesh.pool(), &server, nowhere()).await.unwrap();
        let mut far = server_streams.recv().await.unwrap();

        // While the server reads nothing, the client can write at most one stream window: every byte
        // in h2's buffers, in the sockets and in the TLS layers counts against it.
        let client_written = Arc::new(AtomicUsize::new(0));
        let writer = {
            let written = client_written.clone();
            tokio::spawn(async move {
                let mut c = client;
                let (mut rd, mut wr) = tokio::io::split(&mut c);
                let (_, got) = tokio::join!(write_pattern(&mut wr, 1, LEN, &written), read_slowly(&mut rd));
                got
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled_at = client_written.load(Ordering::SeqCst);
        assert!(stalled_at > 0, "nothing was written");
        assert!(
            stalled_at <= STREAM_WINDOW as usize,
            "{stalled_at} bytes accepted while the receiver was paused; window is {STREAM_WINDOW}"
        );

        let far_written = AtomicUsize::new(0);
        let (mut rd, mut wr) = tokio::io::split(&mut far);
        let (from_client, ()) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(read_slowly(&mut rd), write_pattern(&mut wr, 2, LEN, &far_written))
        })
        .await
        .expect("server side of the transfer stalled");
        let from_server = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("client side of the transfer stalled")
            .unwrap();
        assert_eq!(from_client.len(), LEN);
        assert!(from_client == pattern(1, LEN), "client-to-server bytes differ");
        assert_eq!(from_server.len(), LEN);
        assert!(from_server == pattern(2, LEN), "server-to-client bytes differ");
        assert_eq!(client_written.load(Ordering::SeqCst), LEN);
    }

    #[tokio::test]
    async fn a_reset_stream_is_an_io_error_on_both_halves() {
        let mesh = Mesh::new();
        let server = start_server(mesh.server_config(), |_| async {
            // Drop the stream straight away without ending it: h2 resets it.
            Ok(|s: HboneStream| async move { drop(s) })
        })
        .await;
        let (mut client, _) = tunnel_to(&mesh, &mesh.pool(), &server, nowhere()).await.unwrap();
        let mut buf = [0u8; 16];
        let err =
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let err = client.write_all(b"after reset").await.unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{err}");
    }

    #[tokio::test]
    async fn writes_after_shutdown_fail_and_shutdown_is_idempotent() {
        let mesh = Mesh::new();
        // The far side reads to EOF, then ends its own half.
        let server = start_server(mesh.server_config(), |_| async {
            Ok(|mut s: HboneStream| async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.shutdown().await.unwrap();
            })
        })
        .await;
        let (mut client, _) = tunnel_to(&mesh, &mesh.pool(), &server, nowhere()).await.unwrap();
        client.shutdown().await.unwrap();
        client.shutdown().await.unwrap();
        let err = client.write(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
