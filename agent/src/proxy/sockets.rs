//! Sockets made inside a pod's netns: the in-pod listeners and upstream connections.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    sync::atomic::{AtomicU32, Ordering},
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
/// taken (the client's own connection in this netns, or a lingering one), or none, gives way to
/// one from [`AGENT_PORTS`] for the same address.
pub async fn connect_transparent(
    netns: &PodNetns,
    source: SocketAddr,
    target: SocketAddr,
) -> io::Result<TcpStream> {
    let client_port = (source.port() != 0).then_some(source.port());
    let agent_ports = (0..AGENT_PORT_TRIES).map(|_| next_agent_port());
    for port in client_port.into_iter().chain(agent_ports) {
        match connect_transparent_once(netns, source, target, Some(port)).await {
            Err(e) if port_taken(&e) => continue,
            other => return other,
        }
    }
    // Every port tried is taken for this 4-tuple: the kernel picks from the netns's range.
    connect_transparent_once(netns, source, target, None).await
}

async fn connect_transparent_once(
    netns: &PodNetns,
    source: SocketAddr,
    target: SocketAddr,
    port: Option<u16>,
) -> io::Result<TcpStream> {
    connect_within(transparent_socket(netns, source, target, port).await?, target).await
}

/// The ports the agent's transparent sockets to apps take when the client's own port cannot be
/// used: below every common ephemeral range (Linux 32768-60999, IANA, Windows and macOS
/// 49152-65535) and above the privileged ones. The socket holds the client's address, and the
/// app's end of it the same 4-tuple as a connection the client itself would open from that port:
/// were the port from the client's range, a later connection of the client (whose kernel, on this
/// node, even walks the same port sequence) could land on the app's socket instead of being
/// steered to the proxy, and both connections break. The kernel cannot pick these itself
/// (`IP_LOCAL_PORT_RANGE` only narrows the netns's range), so the agent walks them.
pub const AGENT_PORTS: (u16, u16) = (16384, 32767);

/// Ports of [`AGENT_PORTS`] tried (each taken for this 4-tuple) before the kernel picks one.
const AGENT_PORT_TRIES: usize = 8;

/// The next port of [`AGENT_PORTS`]: one process-wide cursor, so a 4-tuple comes round again only
/// after the whole range has (and a lingering one then is reused or skipped).
fn next_agent_port() -> u16 {
    static CURSOR: AtomicU32 = AtomicU32::new(0);
    let (low, high) = AGENT_PORTS;
    let span = u32::from(high - low) + 1;
    // The remainder is below `span`, which fits a u16.
    low + (CURSOR.fetch_add(1, Ordering::Relaxed) % span) as u16
}

/// EADDRINUSE from bind, EADDRNOTAVAIL from connect: the 4-tuple exists already.
fn port_taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL))
}

async fn transparent_socket(
    netns: &PodNetns,
    source: SocketAddr,
    target: SocketAddr,
    port: Option<u16>,
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
            match port {
                // Two connections of one port to two app ports are two distinct 4-tuples.
                Some(_) => socket.set_reuse_address(true)?,
                // The port is picked at connect time, unique per 4-tuple rather than per address.
                None => set_bind_address_no_port(&socket)?,
            }
            socket.bind(&SocketAddr::new(source.ip(), port.unwrap_or(0)).into())?;
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

/// `IP_BIND_ADDRESS_NO_PORT` (it applies to IPv6 sockets too).
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
