//! Copies bytes both ways between two byte streams (TCP sockets, HBONE tunnels), relaying
//! half-close in each direction.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read: one TLS record's worth (and h2's default frame size), so a tunnel's reads and
/// writes line up.
const BUF_SIZE: usize = 16 * 1024;

/// Byte counters of one relayed connection, readable while it is live.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes from the downstream (accepted) side to the upstream side.
    pub sent: AtomicU64,
    /// Bytes from the upstream side back to the downstream side.
    pub received: AtomicU64,
}

/// A stream counting what is read from it as `sent` and what is written to it as `received`: the
/// downstream side of a connection that the HTTP layer serves instead of [`relay`].
pub struct Counted<T> {
    inner: T,
    stats: std::sync::Arc<RelayStats>,
}

impl<T> Counted<T> {
    /// Counts `inner`'s traffic into `stats`.
    pub fn new(inner: T, stats: std::sync::Arc<RelayStats>) -> Self {
        Self { inner, stats }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.stats.sent.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed their write halves cleanly.
    Eof,
    /// One side failed (reset, timeout); the other was torn down.
    Error(String),
    /// The agent closed it (a policy change now denies it); the reason says why.
    Closed(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Eof => f.write_str("eof"),
            CloseReason::Error(e) | CloseReason::Closed(e) => f.write_str(e),
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
    match relay_pausable(downstream, upstream, stats, RelayState::default(), std::future::pending()).await {
        Relayed::Closed(reason) => reason,
        Relayed::Paused(_) => unreachable!("a pending future never completes"),
    }
}

/// Where one direction of a paused relay stood: bytes read and not yet written, and how far its
/// half-close had gone. Enough for another process to go on from exactly there.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectionState {
    /// Read from the reader, not yet taken by the writer.
    pub pending: Vec<u8>,
    /// The reader reached EOF.
    pub read_eof: bool,
    /// The EOF was passed on (the writer is shut down): this direction is finished.
    pub done: bool,
}

/// Both directions of a paused relay.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayState {
    /// Downstream to upstream.
    pub up: DirectionState,
    /// Upstream back to downstream.
    pub down: DirectionState,
}

/// How [`relay_pausable`] ended.
#[derive(Debug)]
pub enum Relayed {
    /// The connection is over.
    Closed(CloseReason),
    /// `pause` completed first; the streams are intact and this is where the relay stood.
    Paused(RelayState),
}

/// [`relay`] from `state` (where an earlier relay of these streams paused), until done or until
/// `pause` completes. A pause takes effect between steps, never inside one, so no byte is lost or
/// duplicated: what was read and not written is in the returned state.
pub async fn relay_pausable<D, U>(
    downstream: &mut D,
    upstream: &mut U,
    stats: &RelayStats,
    state: RelayState,
    pause: impl Future<Output = ()>,
) -> Relayed
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::resume(&stats.sent, state.up);
    let mut down = Direction::resume(&stats.received, state.down);
    let mut pause = std::pin::pin!(pause);
    // Both directions are polled from one future over the two `&mut` streams, so neither stream
    // has to be split.
    let result: io::Result<bool> = poll_fn(|cx| {
        if pause.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(false));
        }
        let up_done = up.poll(cx, &mut *downstream, &mut *upstream)?.is_ready();
        let down_done = down.poll(cx, &mut *upstream, &mut *downstream)?.is_ready();
        if up_done && down_done { Poll::Ready(Ok(true)) } else { Poll::Pending }
    })
    .await;
    match result {
        Ok(true) => Relayed::Closed(CloseReason::Eof),
        Ok(false) => Relayed::Paused(RelayState { up: up.state(), down: down.state() }),
        // Dropping the other direction closes both sockets when the caller drops them.
        Err(e) => Relayed::Closed(CloseReason::Error(e.to_string())),
    }
}

thread_local! {
    /// Where each read lands. Whatever the writer takes at once never needs a buffer of the
    /// connection's own, so idle and request/response connections hold none: with a buffer per
    /// direction, 10,000 idle connections would pin 320 MiB.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
}

/// What one read-and-write step did.
enum Step {
    /// Bytes moved (all, or the rest kept in `pending`).
    Moved,
    /// The reader reached EOF.
    Eof,
    /// The reader has nothing now.
    Idle,
}

/// One direction: read, write it all out, and on EOF shut the writer down.
struct Direction<'a> {
    /// Bytes read that the writer has not taken yet (from `start`). Unallocated whenever the writer
    /// kept up, which on most connections is always.
    pending: Vec<u8>,
    start: usize,
    read_eof: bool,
    done: bool,
    /// Bytes written since the last flush.
    unflushed: bool,
    counter: &'a AtomicU64,
}

impl<'a> Direction<'a> {
    #[cfg(test)]
    fn new(counter: &'a AtomicU64) -> Self {
        Self::resume(counter, DirectionState::default())
    }

    fn resume(counter: &'a AtomicU64, state: DirectionState) -> Self {
        let DirectionState { pending, read_eof, done } = state;
        // Anything carried over is written before the next read.
        Self { pending, start: 0, read_eof, done, unflushed: false, counter }
    }

    /// Where this direction stands, for a relay that goes on elsewhere.
    fn state(&mut self) -> DirectionState {
        let pending = self.pending.split_off(self.start.min(self.pending.len()));
        self.start = 0;
        DirectionState { pending, read_eof: self.read_eof, done: self.done }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            while self.start < self.pending.len() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.pending[self.start..]))?;
                self.wrote(n)?;
                self.start += n;
            }
            if !self.pending.is_empty() {
                // Drained: give the memory back rather than hold it for the connection's life.
                (self.pending, self.start) = (Vec::new(), 0);
            }
            if self.read_eof {
                // shutdown(SHUT_WR) on a socket, END_STREAM on a tunnel: relays the half-close.
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            match self.read_and_write(cx, reader, writer)? {
                Step::Moved => {}
                Step::Eof => self.read_eof = true,
                Step::Idle => {
                    // Nothing more to send for now: push out what the writer may hold back.
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads into the thread's scratch buffer and writes as much as the writer takes now; the rest
    /// is copied to `pending`.
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> io::Result<Step>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        SCRATCH.with(|scratch| {
            // Never re-entered: polling a reader or writer does not poll a relay.
            let mut scratch = scratch.borrow_mut();
            let mut read_buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                Poll::Ready(result) => result?,
                Poll::Pending => return Ok(Step::Idle),
            }
            let len = read_buf.filled().len();
            if len == 0 {
                return Ok(Step::Eof);
            }
            let mut at = 0;
            while at < len {
                match Pin::new(&mut *writer).poll_write(cx, &scratch[at..len]) {
                    Poll::Ready(written) => {
                        let n = written?;
                        self.wrote(n)?;
                        at += n;
                    }
                    Poll::Pending => {
                        // The writer will wake us; keep what it has not taken.
                        self.pending = scratch[at..len].to_vec();
                        break;
                    }
                }
            }
            Ok(Step::Moved)
        })
    }

    /// Accounts for `n` bytes the writer took; zero means it can take no more.
    fn wrote(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.unflushed = true;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
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

    /// Polls `dir` once from `reader` to `writer`.
    async fn poll_once<R, W>(dir: &mut Direction<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        poll_fn(|cx| Poll::Ready(dir.poll(cx, &mut *reader, &mut *writer))).await
    }

    #[tokio::test]
    async fn a_connection_holds_no_buffer_while_its_writer_keeps_up() {
        let counter = AtomicU64::new(0);
        let mut dir = Direction::new(&counter);
        let (mut app, mut reader) = tokio::io::duplex(64 * 1024);
        let (mut writer, mut peer) = tokio::io::duplex(64 * 1024);
        app.write_all(&[7u8; 1024]).await.unwrap();
        assert!(poll_once(&mut dir, &mut reader, &mut writer).await.is_pending());
        assert_eq!(dir.pending.capacity(), 0, "everything was written at once");
        let mut got = [0u8; 1024];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [7u8; 1024]);
        assert_eq!(counter.load(Ordering::Relaxed), 1024);
    }

    #[tokio::test]
    async fn what_a_slow_writer_has_not_taken_is_kept_then_released() {
        let counter = AtomicU64::new(0);
        let mut dir = Direction::new(&counter);
        let (mut app, mut reader) = tokio::io::duplex(64 * 1024);
        // The writer side takes at most 100 bytes until its peer reads.
        let (mut writer, mut peer) = tokio::io::duplex(100);
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        app.write_all(&data).await.unwrap();
        app.shutdown().await.unwrap();
        assert!(poll_once(&mut dir, &mut reader, &mut writer).await.is_pending());
        assert_eq!(dir.pending.len() - dir.start, 2900, "the rest waits in the connection's buffer");
        let mut got = Vec::new();
        let relay = async {
            loop {
                if let Poll::Ready(r) = poll_once(&mut dir, &mut reader, &mut writer).await {
                    r.unwrap();
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        let (_, read) = tokio::join!(relay, peer.read_to_end(&mut got));
        read.unwrap();
        assert_eq!(got, data, "bytes arrive whole and in order, then EOF");
        assert_eq!(dir.pending.capacity(), 0, "drained: the buffer is released");
        assert_eq!(counter.load(Ordering::Relaxed), 3000);
    }

    #[tokio::test]
    async fn a_paused_relay_resumes_elsewhere_without_losing_or_repeating_a_byte() {
        // client <-> (down relay up) <-> server, with the server not reading at first, so bytes
        // pile up in the relay; then the relay pauses and a second relay (another agent) resumes.
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let stats = RelayStats::default();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                client.write_all(&data).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let pause = tokio::time::sleep(std::time::Duration::from_millis(200));
        let Relayed::Paused(state) =
            relay_pausable(&mut down, &mut up, &stats, RelayState::default(), pause).await
        else {
            panic!("the relay should have paused");
        };
        let moved = stats.sent.load(Ordering::Relaxed);
        assert!(moved > 0, "some bytes went through before the pause");
        let stats2 = RelayStats::default();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(b"done").await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        let end = relay_pausable(&mut down, &mut up, &stats2, state, std::future::pending()).await;
        assert!(matches!(end, Relayed::Closed(CloseReason::Eof)), "{end:?}");
        assert_eq!(reader.await.unwrap(), data, "every byte once, in order");
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(moved + stats2.sent.load(Ordering::Relaxed), data.len() as u64);
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
