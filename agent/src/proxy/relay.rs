//! Copies bytes both ways between two TCP streams, relaying half-close in each direction.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Per-direction buffer. Large enough for bulk transfers to move in few syscalls, small enough that
/// thousands of idle connections stay cheap.
const BUF_SIZE: usize = 32 * 1024;

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
pub async fn relay(downstream: &mut TcpStream, upstream: &mut TcpStream, stats: &RelayStats) -> CloseReason {
    let (mut dr, mut dw) = downstream.split();
    let (mut ur, mut uw) = upstream.split();
    let up = copy_half(&mut dr, &mut uw, &stats.sent);
    let down = copy_half(&mut ur, &mut dw, &stats.received);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let result = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r }
            r = &mut down, if !down_done => { down_done = true; r }
        };
        if let Err(e) = result {
            // Dropping the other direction closes both sockets when the caller drops them.
            return CloseReason::Error(e.to_string());
        }
    }
    CloseReason::Eof
}

async fn copy_half<R, W>(reader: &mut R, writer: &mut W, counter: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // shutdown(SHUT_WR): relays the half-close.
            return writer.shutdown().await;
        }
        writer.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

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
