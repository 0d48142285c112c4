//! Copies bytes both ways between two byte streams (TCP sockets, HBONE tunnels), relaying
//! half-close in each direction.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-direction buffer: one TLS record's worth (and h2's default frame size), so a tunnel's reads
/// and writes line up; small, because every live connection holds two.
const BUF_SIZE: usize = 16 * 1024;

/// Byte counters of one relayed connection, readable while it is live.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes from the downstream (accepted) side to the upstream side.
    pub sent: AtomicU64,
    /// Bytes from the upstream side back to the downstream side.
    pub received: AtomicU64,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed their write halves cleanly.
    Eof,
    /// One side failed (reset, timeout); the other was torn down.
    Error(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Eof => f.write_str("eof"),
            CloseReason::Error(e) => f.write_str(e),
        }
    }
}

/// Relays until both directions reach EOF or one fails. When one side half-closes, the write half of
/// the other side is shut down, so the peer sees the EOF and can still send its reply.
pub async fn relay<D, U>(downstream: &mut D, upstream: &mut U, stats: &RelayStats) -> CloseReason
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::new(&stats.sent);
    let mut down = Direction::new(&stats.received);
    // Both directions are polled from one future over the two `&mut` streams, so neither stream
    // has to be split.
    let result: io::Result<()> = poll_fn(|cx| {
        let up_done = up.poll(cx, &mut *downstream, &mut *upstream)?.is_ready();
        let down_done = down.poll(cx, &mut *upstream, &mut *downstream)?.is_ready();
        if up_done && down_done { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await;
    match result {
        Ok(()) => CloseReason::Eof,
        // Dropping the other direction closes both sockets when the caller drops them.
        Err(e) => CloseReason::Error(e.to_string()),
    }
}

/// One direction: read into the buffer, write it all out, and on EOF shut the writer down.
struct Direction<'a> {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    read_eof: bool,
    done: bool,
    /// Bytes written since the last flush.
    unflushed: bool,
    counter: &'a AtomicU64,
}

impl<'a> Direction<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        Self {
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            read_eof: false,
            done: false,
            unflushed: false,
            counter,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            if self.start == self.end && !self.read_eof {
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                    Poll::Ready(result) => result?,
                    Poll::Pending => {
                        // Nothing more to send for now: push out what the writer may hold back.
                        if self.unflushed {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = read_buf.filled().len();
                if n == 0 {
                    self.read_eof = true;
                } else {
                    (self.start, self.end) = (0, n);
                }
            }
            while self.start < self.end {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.unflushed = true;
                self.counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            if self.read_eof {
                // shutdown(SHUT_WR) on a socket, END_STREAM on a tunnel: relays the half-close.
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn half_close_is_relayed_and_reply_still_flows() {
        // client <-> (c_down relay u_up) <-> server
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let stats = RelayStats::default();
        let relay = async { relay(&mut down, &mut up, &stats).await };
        let peers = async {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            server.write_all(b"reply after eof").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"reply after eof");
        };
        let (reason, ()) = tokio::join!(relay, peers);
        assert_eq!(reason, CloseReason::Eof);
        assert_eq!(stats.sent.load(Ordering::Relaxed), 5);
        assert_eq!(stats.received.load(Ordering::Relaxed), 15);
    }
}
