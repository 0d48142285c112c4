//! The serving agent's side of a handoff: offer the listeners, wait for `TakeOver`, then send
//! the paused relays.

use std::{net::SocketAddr, os::fd::AsFd, os::fd::OwnedFd, sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::{
    Hub, Message,
    relays::MovedConn,
    wire::{Wire, WireError, WireListener},
};

/// What this agent offers the next one: operator endpoints and each pod's listeners (duplicates).
pub struct Offer {
    /// (`metrics` or `health`, listener).
    pub operator: Vec<(String, OwnedFd)>,
    /// (pod key, netns cookie, (bound address, listener) of each of its listeners).
    pub pods: Vec<PodListeners>,
}

/// One pod's listeners: (pod key, netns cookie, (bound address, listener) of each).
pub type PodListeners = (String, u64, Vec<(SocketAddr, OwnedFd)>);

/// Waits for an agent that takes over: each one that connects gets `offer()`'s listeners; one
/// that goes away before `TakeOver` changes nothing here. Returns the connection of the one that
/// took over.
pub async fn wait_for_taker<F>(listener: Arc<WireListener>, offer: F) -> Wire
where
    F: Fn() -> OfferFuture + Send + Sync + 'static,
{
    loop {
        let l = listener.clone();
        let wire = match tokio::task::spawn_blocking(move || l.accept()).await {
            Ok(Ok(wire)) => wire,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "handoff socket accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => continue,
        };
        let offered = offer().await;
        let result = tokio::task::spawn_blocking(move || negotiate(wire, offered)).await;
        match result {
            Ok(Ok(wire)) => return wire,
            Ok(Err(e)) => tracing::warn!(error = %e, "a starting agent did not take over; still serving"),
            Err(e) => tracing::warn!(error = %e, "handoff task failed; still serving"),
        }
    }
}

/// Offers the listeners and waits for `TakeOver` (blocking).
fn negotiate(wire: Wire, offer: Offer) -> Result<Wire, WireError> {
    let (hello, _) = wire.recv::<Message>()?;
    match hello {
        Message::Hello { layout } if layout == ferry_common::LAYOUT_VERSION => {}
        Message::Hello { layout } => {
            let reason = format!(
                "this agent's maps are layout v{}, the new agent's v{layout}: stop this one first",
                ferry_common::LAYOUT_VERSION
            );
            wire.send(&Message::Refused { reason: reason.clone() }, &[])?;
            return Err(WireError::Socket("refusing the handoff", nix::Error::EPROTO));
        }
        _ => return Err(WireError::Socket("expected hello", nix::Error::EPROTO)),
    }
    let (names, fds): (Vec<String>, Vec<OwnedFd>) = offer.operator.into_iter().unzip();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    wire.send(&Message::Operator { endpoints: names }, &borrowed)?;
    for (key, netns_cookie, listeners) in offer.pods {
        for chunk in listeners.chunks(super::wire::MAX_FDS) {
            let addresses = chunk.iter().map(|(a, _)| *a).collect();
            let borrowed: Vec<_> = chunk.iter().map(|(_, f)| f.as_fd()).collect();
            wire.send(&Message::Pod { key: key.clone(), netns_cookie, addresses }, &borrowed)?;
        }
    }
    wire.send(&Message::ListenersDone, &[])?;
    match wire.recv::<Message>()?.0 {
        Message::TakeOver => Ok(wire),
        _ => Err(WireError::Socket("expected take_over", nix::Error::EPROTO)),
    }
}

/// After `TakeOver`: pauses every movable relay and sends each to the next agent, then says how
/// many connections stay here to drain. Returns how many relays moved.
pub async fn send_relays(wire: Wire, hub: &Hub, draining: impl Fn() -> usize) -> Result<usize, WireError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<MovedConn>();
    hub.hand_over(tx);
    let mut wire = Some(wire);
    let mut moved = 0;
    let result = loop {
        let next = match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
            Ok(Some(conn)) => conn,
            Ok(None) => break Ok(()),
            Err(_) if hub.active() == 0 => match rx.try_recv() {
                Ok(conn) => conn,
                Err(_) => break Ok(()),
            },
            Err(_) => continue,
        };
        let Some(w) = wire.take() else { break Ok(()) };
        let mut next = next;
        let fds = std::mem::take(&mut next.fds);
        let sent = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            // This process's copies of the sockets close when `fds` drops after the send.
            let r = w.send(&Message::Relay(Box::new(next)), &borrowed);
            (w, r)
        })
        .await;
        match sent {
            Ok((w, Ok(()))) => {
                moved += 1;
                wire = Some(w);
            }
            Ok((_, Err(e))) => break Err(e),
            Err(_) => break Err(WireError::Closed),
        }
    };
    hub.close();
    result?;
    if let Some(w) = wire {
        let n = draining();
        let _ = tokio::task::spawn_blocking(move || w.send(&Message::RelaysDone { draining: n }, &[])).await;
    }
    Ok(moved)
}

/// A pending [`Offer`], built when an agent connects (the pods enrolled then).
pub type OfferFuture = std::pin::Pin<Box<dyn Future<Output = Offer> + Send>>;
