//! The starting agent's side of a handoff: inherit the listeners, and once ready, take over and
//! resume the relays the old agent sends.

use std::{path::Path, sync::Arc};

use super::{Inherited, Message, relays, wire::Wire, wire::WireError};
use crate::proxy::ProxyShared;

/// Why taking over failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// The handoff socket failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The serving agent refused.
    #[error("the serving agent refused the handoff: {0}")]
    Refused(String),
    /// A message came out of order.
    #[error("unexpected handoff message {0}")]
    Unexpected(&'static str),
}

impl TakeOverError {
    /// Whether the serving agent went away (exited or died) rather than refused: this agent,
    /// ready by then, serves alone; relays still in flight died with the old agent.
    pub fn serving_agent_gone(&self) -> bool {
        use nix::errno::Errno::{ECONNRESET, ENOTCONN, EPIPE};
        matches!(self, Self::Wire(WireError::Closed | WireError::Socket(_, ECONNRESET | ENOTCONN | EPIPE)))
    }
}

/// A connection to the serving agent, between inheriting its listeners and taking over.
pub struct Taker {
    wire: Wire,
}

/// Connects to the agent serving at `path`, if any, and inherits its listeners.
pub async fn connect(path: &Path) -> Result<Option<(Taker, Inherited)>, TakeOverError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let Some(wire) = Wire::connect(&path)? else { return Ok(None) };
        wire.send(&Message::Hello { layout: ferry_common::LAYOUT_VERSION }, &[])?;
        let inherited = Inherited::default();
        loop {
            let (msg, fds) = wire.recv::<Message>()?;
            match msg {
                Message::Operator { endpoints } => {
                    let mut op = inherited.operator.lock().unwrap_or_else(|p| p.into_inner());
                    for (name, fd) in endpoints.into_iter().zip(fds) {
                        op.insert(name, std::net::TcpListener::from(fd));
                    }
                }
                Message::Pod { key, netns_cookie, addresses } => {
                    let mut pods = inherited.pods.lock().unwrap_or_else(|p| p.into_inner());
                    let entry = pods.entry((key, netns_cookie)).or_default();
                    for (addr, fd) in addresses.into_iter().zip(fds) {
                        entry.insert(addr, std::net::TcpListener::from(fd));
                    }
                }
                Message::ListenersDone => return Ok(Some((Taker { wire }, inherited))),
                Message::Refused { reason } => return Err(TakeOverError::Refused(reason)),
                _ => return Err(TakeOverError::Unexpected("before listeners_done")),
            }
        }
    })
    .await
    .unwrap_or(Err(TakeOverError::Unexpected("handoff task ended")))
}

/// What taking over brought.
#[derive(Debug, Default)]
pub struct TakenOver {
    /// Relays resumed here.
    pub relays: usize,
    /// Relays that came but could not be resumed (their sockets failed).
    pub failed: usize,
    /// Connections the old agent keeps until they end.
    pub draining: usize,
}

impl Taker {
    /// Whether the serving agent has gone away (exited or died) since it offered its listeners.
    pub fn serving_agent_gone(&self) -> bool {
        self.wire.peer_closed()
    }

    /// Tells the old agent to stop and resumes every relay it sends.
    pub async fn take_over(self, shared: &Arc<ProxyShared>) -> Result<TakenOver, TakeOverError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let wire = self.wire;
        let reader = tokio::task::spawn_blocking(move || -> Result<(), TakeOverError> {
            wire.send(&Message::TakeOver, &[])?;
            loop {
                let (msg, fds) = wire.recv::<Message>()?;
                let done = matches!(msg, Message::RelaysDone { .. });
                if tx.send((msg, fds)).is_err() || done {
                    return Ok(());
                }
            }
        });
        let mut out = TakenOver::default();
        while let Some((msg, fds)) = rx.recv().await {
            match msg {
                Message::Relay(mut moved) => {
                    moved.fds = fds;
                    match relays::resume(shared, *moved) {
                        Ok(()) => out.relays += 1,
                        Err(e) => {
                            out.failed += 1;
                            tracing::warn!(error = %e, "a handed-over relay could not be resumed");
                        }
                    }
                }
                Message::RelaysDone { draining } => out.draining = draining,
                _ => return Err(TakeOverError::Unexpected("after take_over")),
            }
        }
        match reader.await {
            Ok(result) => result.map(|()| out),
            Err(_) => Err(TakeOverError::Unexpected("reader task")),
        }
    }
}
