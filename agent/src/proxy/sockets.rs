//! Sockets made inside a pod's netns: the in-pod listeners and upstream connections.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::enroll::netns::PodNetns;

/// How long an upstream connect may take before the downstream connection is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a listener at `addr` inside the pod's netns.
pub async fn listen_in(netns: &PodNetns, addr: SocketAddr) -> io::Result<TcpListener> {
    let std_listener = netns
        .run(move || -> io::Result<StdListener> {
            let socket = Socket::new(
                Domain::for_address(addr),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .await
        .map_err(io::Error::other)??;
    TcpListener::from_std(std_listener)
}

/// Connects to `target` from inside the pod's netns, so the source address is the pod's.
pub async fn connect_from(netns: &PodNetns, target: SocketAddr) -> io::Result<TcpStream> {
    let std_stream = netns
        .run(move || -> io::Result<StdStream> {
            let socket = Socket::new(
                Domain::for_address(target),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            socket.set_tcp_nodelay(true)?;
            Ok(socket.into())
        })
        .await
        .map_err(io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std_stream);
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target} timed out"))),
    }
}
