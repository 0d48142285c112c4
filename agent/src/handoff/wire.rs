//! The handoff socket: a Unix SOCK_SEQPACKET socket (message boundaries kept, so each message
//! arrives with exactly its own fds) carrying one JSON message per packet and its fds as
//! SCM_RIGHTS. Blocking: it is used from blocking threads, a few times per upgrade.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, sockopt,
};

/// At most this many fds per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;
/// The largest message: a relay's state with both directions' unwritten bytes, as JSON.
const MAX_MESSAGE: usize = 1 << 20;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A socket call failed.
    #[error("{0}")]
    Socket(&'static str, #[source] nix::Error),
    /// The peer closed the socket.
    #[error("the other agent closed the handoff socket")]
    Closed,
    /// A message was not valid JSON of the expected shape.
    #[error("malformed handoff message")]
    Json(#[from] serde_json::Error),
    /// More fds than one message can carry.
    #[error("{0} fds in one message (at most {MAX_FDS})")]
    TooManyFds(usize),
    /// A message arrived cut short (larger than the receive buffer).
    #[error("a handoff message was truncated")]
    Truncated,
}

/// One end of a handoff connection.
pub struct Wire(OwnedFd);

/// The listening handoff socket of the serving agent.
pub struct WireListener(OwnedFd);

fn seqpacket() -> Result<OwnedFd, WireError> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| WireError::Socket("socket", e))
}

impl Wire {
    /// Connects to the serving agent's handoff socket; `None` when nothing listens there.
    pub fn connect(path: &Path) -> Result<Option<Self>, WireError> {
        if !path.exists() {
            return Ok(None);
        }
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|e| WireError::Socket("handoff socket path", e))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(Some(Self::sized(fd))),
            Err(nix::Error::ECONNREFUSED | nix::Error::ENOENT) => Ok(None),
            Err(e) => Err(WireError::Socket("connect", e)),
        }
    }

    fn sized(fd: OwnedFd) -> Self {
        // Room for the largest message both ways; the kernel caps it at wmem_max otherwise.
        let _ = socket::setsockopt(&fd, sockopt::SndBuf, &(MAX_MESSAGE * 2));
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &(MAX_MESSAGE * 2));
        Self(fd)
    }

    /// Sends `msg` with `fds`.
    pub fn send<T: serde::Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds(fds.len()));
        }
        let bytes = serde_json::to_vec(msg)?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        socket::sendmsg::<UnixAddr>(
            self.0.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| WireError::Socket("sendmsg", e))?;
        Ok(())
    }

    /// Whether the other agent closed its end (it exited or died), checked without blocking.
    pub fn peer_closed(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        // A closed peer sets POLLHUP on a Unix stream or seqpacket socket; it needs no request.
        let hangup = PollFlags::POLLHUP | PollFlags::POLLERR;
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::empty())];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0].revents().is_some_and(|r| r.intersects(hangup))
    }

    /// Receives one message and its fds.
    pub fn recv<T: serde::de::DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), WireError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<UnixAddr>(
                self.0.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| WireError::Socket("recvmsg", e))?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(|e| WireError::Socket("reading control messages", e))? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these fds in this process for us alone.
                    fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, fds, truncated)
        };
        if truncated {
            return Err(WireError::Truncated);
        }
        if len == 0 {
            return Err(WireError::Closed);
        }
        Ok((serde_json::from_slice(&buf[..len])?, fds))
    }
}

impl WireListener {
    /// Listens at `path`, replacing whatever socket file is there (the previous agent's, which no
    /// successor needs once this agent serves).
    pub fn bind(path: &Path) -> Result<Self, WireError> {
        let _ = std::fs::remove_file(path);
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|e| WireError::Socket("handoff socket path", e))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| WireError::Socket("bind", e))?;
        // Only root (the agent) may hand over or take over the node.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        socket::listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| WireError::Socket("listen", e))?;
        Ok(Self(fd))
    }

    /// Waits for the next agent.
    pub fn accept(&self) -> Result<Wire, WireError> {
        let fd = socket::accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(|e| WireError::Socket("accept", e))?;
        // SAFETY: accept4 returned a new fd nothing else owns.
        Ok(Wire::sized(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The listening fd (to wake a blocked accept by shutting it down).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_closes_is_seen_without_blocking() {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .unwrap();
        let (a, b) = (Wire(a), Wire(b));
        assert!(!a.peer_closed(), "open");
        b.send(&"hello", &[]).unwrap();
        assert!(!a.peer_closed(), "a message waiting is not a close");
        drop(b);
        assert!(a.peer_closed(), "closed");
    }
}
