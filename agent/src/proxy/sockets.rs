//! Sockets made inside a pod's netns: the in-pod listeners and upstream connections.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::enroll::{netns::PodNetns, transparent};

/// How long an upstream connect may take before the downstream connection is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A non-blocking, close-on-exec TCP socket of `addr`'s family, in the calling thread's netns.
fn tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))
}

/// Binds a listener at `addr` inside the pod's netns.
pub async fn listen_in(netns: &PodNetns, addr: SocketAddr) -> io::Result<TcpListener> {
    let std_listener = netns
        .run(move || -> io::Result<StdListener> {
            let socket = tcp_socket(addr)?;
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
            let socket = tcp_socket(target)?;
            socket.set_tcp_nodelay(true)?;
            Ok(socket.into())
        })
        .await
        .map_err(io::Error::other)??;
    connect_within(TcpSocket::from_std_stream(std_stream), target).await
}

/// Connects to `target` from inside the pod's netns with `source` as the socket's own address
/// (transparent inbound: the app sees `source` as its peer). The socket carries the transparency
/// mark, so the pod's reply routing brings the app's answers back to it. A `source` port that is
/// taken (the client's own connection in this netns, or a lingering one) gives way to one the
/// kernel picks for the same address.
pub async fn connect_transparent(
    netns: &PodNetns,
    source: SocketAddr,
    target: SocketAddr,
) -> io::Result<TcpStream> {
    let first = transparent_socket(netns, source, target).await;
    let result = match first {
        Ok(socket) => connect_within(socket, target).await,
        Err(e) => Err(e),
    };
    match result {
        Err(e) if source.port() != 0 && port_taken(&e) => {
            let socket = transparent_socket(netns, SocketAddr::new(source.ip(), 0), target).await?;
            connect_within(socket, target).await
        }
        other => other,
    }
}

/// EADDRINUSE from bind, EADDRNOTAVAIL from connect: the 4-tuple exists already.
fn port_taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL))
}

async fn transparent_socket(
    netns: &PodNetns,
    source: SocketAddr,
    target: SocketAddr,
) -> io::Result<TcpSocket> {
    let std_stream = netns
        .run(move || -> io::Result<StdStream> {
            let socket = tcp_socket(target)?;
            if target.is_ipv4() {
                socket.set_ip_transparent_v4(true)?;
            } else {
                socket.set_only_v6(true)?;
                socket.set_ip_transparent_v6(true)?;
            }
            socket.set_mark(transparent::MARK)?;
            // Bound to loopback, the route to the app's (local) address skips the local table's
            // entry, whose device is the pod's interface, and comes from the transparency table
            // instead: the SYN then counts as arriving on loopback, which sk_lookup leaves alone
            // (otherwise it would be steered straight back to the inbound listener).
            socket.bind_device(Some(b"lo"))?;
            socket.set_tcp_nodelay(true)?;
            if source.port() == 0 {
                // The port is picked at connect time, unique per 4-tuple rather than per address:
                // a busy client gets more than one ephemeral range's worth of connections.
                set_bind_address_no_port(&socket)?;
            } else {
                // Two connections of one client port to two app ports are two distinct 4-tuples.
                socket.set_reuse_address(true)?;
            }
            socket.bind(&source.into())?;
            Ok(socket.into())
        })
        .await
        .map_err(io::Error::other)??;
    Ok(TcpSocket::from_std_stream(std_stream))
}

async fn connect_within(socket: TcpSocket, target: SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target} timed out"))),
    }
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: valid socket fd, pointer and length of a c_int option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
