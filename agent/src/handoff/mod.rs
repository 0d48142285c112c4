//! Upgrade by handoff: a `ferry run` started while another agent serves the node takes over
//! without refusing a SYN or dropping a connection.
//!
//! 1. The new agent connects to the serving agent's handoff socket (`handoff.sock` beside the
//!    admin socket). The old agent sends duplicates of its listening sockets: the metrics and
//!    health endpoints and every pod's in-pod listeners. Both agents now accept from the same
//!    sockets, so nothing in their accept queues is lost.
//! 2. The new agent adopts the pinned datapath, enrolls the pods on the inherited listeners and,
//!    once ready, says `TakeOver`. A new agent that fails before that just goes away: the old
//!    one never stopped serving.
//! 3. The old agent stops accepting and its opaque plaintext relays pause between two steps: each
//!    moves with its two sockets, the bytes it read and had not written yet, its half-close state
//!    and its connection record. HBONE tunnels drain instead (a rustls session and h2 state cannot
//!    move): GOAWAY to the peers, whose next streams open new tunnels to the new agent, while the
//!    open streams finish on the old one, which exits when nothing is left (or at
//!    `--drain-deadline`).

pub mod giver;
pub mod relays;
pub mod taker;
pub mod wire;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use relays::MovedConn;

/// The handoff socket of the agent whose admin socket is `admin_socket`.
pub fn socket_path(admin_socket: &Path) -> PathBuf {
    admin_socket.with_file_name("handoff.sock")
}

/// What the two agents say to each other.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// New to old: the layout version it runs (the pinned maps are shared).
    Hello {
        /// `ferry_common::LAYOUT_VERSION` of the new agent.
        layout: u32,
    },
    /// Old to new: the operator endpoints' listeners (fds in this order).
    Operator {
        /// Which endpoints, in fd order: `metrics`, `health`.
        endpoints: Vec<String>,
    },
    /// Old to new: one pod's listeners (fds in `addresses` order).
    Pod {
        /// "namespace/name".
        key: String,
        /// The pod's netns cookie: a pod of the same name in another netns gets none of these.
        netns_cookie: u64,
        /// Each listener's bound address.
        addresses: Vec<SocketAddr>,
    },
    /// Old to new: every listener was sent.
    ListenersDone,
    /// Old to new: refused (another layout version, or a handoff already under way).
    Refused {
        /// Why.
        reason: String,
    },
    /// New to old: ready; stop accepting and hand the relays over.
    TakeOver,
    /// Old to new: one relay (fds: downstream, upstream).
    Relay(Box<MovedConn>),
    /// Old to new: every movable relay was sent; `draining` connections stay to finish.
    RelaysDone {
        /// Connections the old agent keeps until they end (HBONE streams, HTTP).
        draining: usize,
    },
}

/// Listeners received from the previous agent, by pod, then by bound address.
#[derive(Default)]
pub struct Inherited {
    pods: Mutex<HashMap<(String, u64), HashMap<SocketAddr, std::net::TcpListener>>>,
    operator: Mutex<HashMap<String, std::net::TcpListener>>,
}

impl Inherited {
    /// Takes pod `key`'s listeners, if its netns is the one the previous agent served.
    pub fn take_pod(&self, key: &str, netns_cookie: u64) -> HashMap<SocketAddr, std::net::TcpListener> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.remove(&(key.to_owned(), netns_cookie)).unwrap_or_default()
    }

    /// Takes an operator endpoint's listener (`metrics`, `health`).
    pub fn take_operator(&self, name: &str) -> Option<std::net::TcpListener> {
        self.operator.lock().unwrap_or_else(|p| p.into_inner()).remove(name)
    }
}

/// The proxy's side of a handoff: when relays pause, where they go, and how many are in flight.
pub struct Hub {
    /// True while a taking-over agent waits to be ready: it holds the shared listeners but leaves
    /// accepting to the serving agent, so giving up loses no connection.
    standby: watch::Sender<bool>,
    paused: watch::Sender<bool>,
    moving: Mutex<Option<mpsc::UnboundedSender<MovedConn>>>,
    /// Movable relays running now.
    active: AtomicUsize,
    /// Relays resumed from the previous agent so far.
    resumed: AtomicUsize,
    /// Accepted connections whose handling task still runs (set up, relayed or served).
    in_flight: Arc<AtomicUsize>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            standby: watch::channel(false).0,
            paused: watch::channel(false).0,
            moving: Mutex::new(None),
            active: AtomicUsize::new(0),
            resumed: AtomicUsize::new(0),
            in_flight: Arc::default(),
        }
    }
}

impl Hub {
    /// Holds every accept loop back until [`Hub::serve`] (for an agent about to take over).
    pub fn stand_by(&self) {
        self.standby.send_replace(true);
    }

    /// Lets the accept loops run.
    pub fn serve(&self) {
        self.standby.send_replace(false);
    }

    /// Resolves once this agent accepts connections.
    pub async fn until_serving(&self) {
        let mut rx = self.standby.subscribe();
        let _ = rx.wait_for(|standby| !*standby).await;
    }

    /// Resolves once this agent hands over (relays pause, tunnels drain).
    pub async fn handing_over(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|p| *p).await;
    }

    /// Whether this agent has handed over.
    pub fn handed_over(&self) -> bool {
        *self.paused.borrow()
    }

    /// Starts the handover: every movable relay pauses and is sent on `to`.
    pub fn hand_over(&self, to: mpsc::UnboundedSender<MovedConn>) {
        *self.moving.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
        self.paused.send_replace(true);
    }

    /// Stops taking relays (those that pause later go on here instead).
    pub fn close(&self) {
        self.moving.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Movable relays running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Counts one accepted connection until the returned guard drops: a draining agent exits only
    /// when none is left, including those still being set up.
    pub fn accepted(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// Accepted connections still being handled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Relays resumed from the previous agent.
    pub fn resumed(&self) -> usize {
        self.resumed.load(Ordering::Relaxed)
    }

    /// Hands a paused relay to the next agent; gives it back when that is no longer possible.
    #[allow(clippy::result_large_err)] // the error is the relay handed back, not an error
    fn send(&self, conn: MovedConn) -> Result<(), MovedConn> {
        match &*self.moving.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(conn).map_err(|e| e.0),
            None => Err(conn),
        }
    }

    /// Counts a movable relay while it runs.
    fn track(self: &Arc<Self>) -> Track {
        self.active.fetch_add(1, Ordering::AcqRel);
        Track(self.clone())
    }
}

/// One accepted connection being handled.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One movable relay in flight.
struct Track(Arc<Hub>);

impl Drop for Track {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}
