//! Opaque plaintext relays that move to the next agent: paused between two steps, they go with
//! both sockets, what they read and had not written, their half-close state and their record.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    admin::model::Direction,
    http::rewind::Rewind,
    metrics::{ConnLabels, SecurityPolicy},
    proxy::{
        ProxyShared,
        authorize::AuthzSubject,
        conns::{Carried, ConnMeta, OpenConn},
        relay::{CloseReason, RelayState, Relayed, relay_pausable},
    },
};

/// A stream a relay can hand over: a plain TCP socket can, a tunnel stream cannot.
pub trait Movable: Sized {
    /// The TCP socket, or `self` back when this stream cannot move.
    fn into_tcp(self) -> Result<TcpStream, Self>;
    /// Whether [`Movable::into_tcp`] would succeed.
    fn movable(&self) -> bool;
}

impl Movable for TcpStream {
    fn into_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
    fn movable(&self) -> bool {
        true
    }
}

impl Movable for crate::hbone::HboneStream {
    fn into_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }
    fn movable(&self) -> bool {
        false
    }
}

impl Movable for tokio::io::DuplexStream {
    fn into_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }
    fn movable(&self) -> bool {
        false
    }
}

/// A moved connection's record and relay state, as the handoff carries it.
#[derive(Debug, Serialize, Deserialize)]
pub struct MovedConn {
    /// The connection's record.
    pub record: MovedRecord,
    /// Where the relay stood.
    pub state: RelayState,
    /// Bytes relayed so far (downstream to upstream, and back).
    pub bytes: (u64, u64),
    /// How long the connection has been open.
    pub age: Duration,
    /// Downstream and upstream sockets (sent as SCM_RIGHTS, not in the JSON).
    #[serde(skip)]
    pub fds: Vec<OwnedFd>,
}

/// The parts of [`ConnMeta`] a moved connection keeps (the policy decision is re-made by the
/// next agent from the subject, so a policy change there re-checks it like any other).
#[derive(Debug, Serialize, Deserialize)]
pub struct MovedRecord {
    direction: Direction,
    pod: String,
    src: SocketAddr,
    src_pod: Option<String>,
    original_dst: SocketAddr,
    endpoint: Option<SocketAddr>,
    endpoint_pod: Option<String>,
    service: Option<String>,
    source_identity: Option<String>,
    destination_identity: Option<String>,
    security: SecurityPolicy,
    labels: ConnLabels,
    protocol: Carried,
    subject: Option<MovedSubject>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MovedSubject {
    workload: String,
    source_ip: Option<IpAddr>,
    peer: Option<String>,
    destination: SocketAddr,
    http: bool,
}

impl MovedRecord {
    fn of(m: &ConnMeta) -> Self {
        Self {
            direction: m.direction,
            pod: m.pod.clone(),
            src: m.src,
            src_pod: m.src_pod.clone(),
            original_dst: m.original_dst,
            endpoint: m.endpoint,
            endpoint_pod: m.endpoint_pod.clone(),
            service: m.service.clone(),
            source_identity: m.source_identity.clone(),
            destination_identity: m.destination_identity.clone(),
            security: m.security,
            labels: m.labels.clone(),
            protocol: m.protocol,
            subject: m.subject.as_ref().map(|s| MovedSubject {
                workload: s.workload.clone(),
                source_ip: s.source_ip,
                peer: s.peer.as_ref().map(|p| p.to_string()),
                destination: s.destination,
                http: s.http,
            }),
        }
    }

    fn into_meta(self, id: u64) -> ConnMeta {
        ConnMeta {
            id,
            direction: self.direction,
            pod: self.pod,
            src: self.src,
            src_pod: self.src_pod,
            original_dst: self.original_dst,
            endpoint: self.endpoint,
            endpoint_pod: self.endpoint_pod,
            service: self.service,
            source_identity: self.source_identity,
            destination_identity: self.destination_identity,
            security: self.security,
            labels: self.labels,
            authz: None,
            subject: self.subject.map(|s| AuthzSubject {
                workload: s.workload,
                source_ip: s.source_ip,
                // An identity that no longer parses is re-checked as no identity: fail closed.
                peer: s.peer.and_then(|p| p.parse().ok()),
                destination: s.destination,
                http: s.http,
            }),
            protocol: self.protocol,
        }
    }
}

/// How a movable relay ended here.
pub enum Outcome {
    /// Over; the caller records it.
    Closed(CloseReason),
    /// Handed to the next agent, which records it when it ends.
    Moved,
}

/// Relays `down` (with the bytes detection already read) and `up` like [`OpenConn::relay`], but
/// when this agent hands over, pauses and moves the connection to the next one.
pub async fn relay_movable<D>(
    shared: &Arc<ProxyShared>,
    conn: &OpenConn<'_>,
    down: Rewind<D>,
    up: TcpStream,
    state: RelayState,
) -> Outcome
where
    D: Movable + AsyncRead + AsyncWrite + Unpin,
{
    let (mut down, mut up) = (down, up);
    if !down.inner().movable() {
        return Outcome::Closed(conn.relay(&mut down, &mut up, conn.stats()).await);
    }
    let hub = &shared.handoff;
    let _track = hub.track();
    let relayed = tokio::select! {
        r = relay_pausable(&mut down, &mut up, conn.stats(), state, hub.handing_over()) => r,
        reason = conn.closed() => Relayed::Closed(CloseReason::Closed(reason)),
    };
    let mut paused = match relayed {
        Relayed::Closed(reason) => return Outcome::Closed(reason),
        Relayed::Paused(paused) => paused,
    };
    let (prefix, inner) = down.into_parts();
    // Bytes detection read and the relay had not reached yet come after what it holds.
    paused.up.pending.extend_from_slice(&prefix);
    let Ok(down) = inner.into_tcp() else {
        return Outcome::Closed(CloseReason::Error("a stream that cannot move was paused".into()));
    };
    let moved = match package(conn, paused, down, up) {
        Ok(moved) => moved,
        Err(reason) => return Outcome::Closed(reason),
    };
    match hub.send(moved) {
        Ok(()) => Outcome::Moved,
        // Too late for this handoff: go on here, from exactly where it stopped.
        Err(back) => match unpack(back) {
            Ok((down, up, state)) => {
                Outcome::Closed(finish(conn, Rewind::new(Bytes::new(), down), up, state).await)
            }
            Err(e) => Outcome::Closed(CloseReason::Error(format!("resuming after a failed handoff: {e}"))),
        },
    }
}

/// The rest of a relay that could not move.
async fn finish(
    conn: &OpenConn<'_>,
    mut down: Rewind<TcpStream>,
    mut up: TcpStream,
    state: RelayState,
) -> CloseReason {
    let relayed = tokio::select! {
        r = relay_pausable(&mut down, &mut up, conn.stats(), state, std::future::pending()) => r,
        reason = conn.closed() => Relayed::Closed(CloseReason::Closed(reason)),
    };
    match relayed {
        Relayed::Closed(reason) => reason,
        Relayed::Paused(_) => CloseReason::Error("paused without a pause".into()),
    }
}

fn package(
    conn: &OpenConn<'_>,
    state: RelayState,
    down: TcpStream,
    up: TcpStream,
) -> Result<MovedConn, CloseReason> {
    let to_fd = |s: TcpStream| -> Result<OwnedFd, CloseReason> {
        Ok(OwnedFd::from(s.into_std().map_err(|e| CloseReason::Error(format!("handing over: {e}")))?))
    };
    let stats = conn.stats();
    Ok(MovedConn {
        record: MovedRecord::of(conn.meta()),
        state,
        bytes: (stats.sent.load(Ordering::Relaxed), stats.received.load(Ordering::Relaxed)),
        age: conn.age(),
        fds: vec![to_fd(down)?, to_fd(up)?],
    })
}

fn unpack(mut moved: MovedConn) -> std::io::Result<(TcpStream, TcpStream, RelayState)> {
    let to_tcp = |fd: OwnedFd| TcpStream::from_std(std::net::TcpStream::from(fd));
    let up = moved.fds.pop().map(to_tcp).transpose()?;
    let down = moved.fds.pop().map(to_tcp).transpose()?;
    match (down, up) {
        (Some(d), Some(u)) => Ok((d, u, moved.state)),
        _ => Err(std::io::Error::other("a paused relay without its sockets")),
    }
}

/// Goes on with a relay the previous agent handed over: registered as a connection of this agent
/// (with its bytes and age so far), relayed from where it stopped, and movable again.
pub fn resume(shared: &Arc<ProxyShared>, mut moved: MovedConn) -> Result<(), std::io::Error> {
    if moved.fds.len() != 2 {
        return Err(std::io::Error::other(format!("a relay came with {} sockets, not 2", moved.fds.len())));
    }
    let up_fd = moved.fds.pop().map(std::net::TcpStream::from);
    let down_fd = moved.fds.pop().map(std::net::TcpStream::from);
    let (Some(down), Some(up)) = (down_fd, up_fd) else {
        return Err(std::io::Error::other("a relay without its sockets"));
    };
    down.set_nonblocking(true)?;
    up.set_nonblocking(true)?;
    let (down, up) = (TcpStream::from_std(down)?, TcpStream::from_std(up)?);
    let meta = moved.record.into_meta(shared.next_id());
    let (bytes, age, state) = (moved.bytes, moved.age, moved.state);
    shared.handoff.resumed.fetch_add(1, Ordering::Relaxed);
    let shared = shared.clone();
    tokio::spawn(async move {
        let conn = shared.open_resumed(meta, bytes, age);
        match relay_movable(&shared, &conn, Rewind::new(Bytes::new(), down), up, state).await {
            Outcome::Closed(reason) => conn.close(&reason),
            Outcome::Moved => conn.moved(),
        }
    });
    Ok(())
}
