//! Where a captured connection was going before capture sent it to the proxy. With eBPF capture
//! the kernel programs record it in a map keyed by the app's socket; with iptables REDIRECT (a
//! classic sidecar) conntrack remembers it and the accepted socket answers `SO_ORIGINAL_DST`.

use std::{io, net::SocketAddr, os::fd::AsFd};

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::bpf::OrigDstTable;

/// How the proxy recovers original destinations; one per agent, following `capture.mode`.
pub enum OrigDst {
    /// eBPF capture: sock_ops recorded it, keyed by the pod's netns cookie and the app's address.
    Ebpf(OrigDstTable),
    /// iptables REDIRECT: the connection's conntrack entry holds it.
    Netfilter,
}

/// Why a connection has no original destination to forward to.
#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    /// The kernel programs recorded nothing: the app connected to the proxy's port itself.
    #[error("no original destination recorded")]
    NotRecorded,
    /// conntrack saw no REDIRECT: the connection was made to the proxy's own address.
    #[error("not redirected: connected to the proxy's port directly")]
    NotRedirected,
    /// `SO_ORIGINAL_DST` failed (no conntrack entry, say).
    #[error("reading SO_ORIGINAL_DST: {0}")]
    Sockopt(io::Error),
}

impl OrigDst {
    /// The destination the app in the pod dialled, for a connection accepted on the outbound
    /// listener from `peer` in the pod whose netns cookie is `netns_cookie`.
    pub fn outbound(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
        stream: &TcpStream,
    ) -> Result<SocketAddr, OrigDstError> {
        match self {
            OrigDst::Ebpf(table) => table.take(netns_cookie, peer).ok_or(OrigDstError::NotRecorded),
            OrigDst::Netfilter => {
                let orig = so_original_dst(stream).map_err(OrigDstError::Sockopt)?;
                // Un-NATed, conntrack answers with the listener itself; forwarding there would loop.
                match stream.local_addr() {
                    Ok(local) if local == orig => Err(OrigDstError::NotRedirected),
                    _ => Ok(orig),
                }
            }
        }
    }

    /// The destination a connection accepted on the inbound plaintext listener was sent to.
    pub fn inbound(&self, stream: &TcpStream) -> Result<SocketAddr, OrigDstError> {
        match self {
            // sk_lookup hands over the SYN unchanged: the local address is the original one.
            OrigDst::Ebpf(_) => stream.local_addr().map_err(OrigDstError::Sockopt),
            // REDIRECT rewrote the destination to the pod's own address and the listener's port.
            OrigDst::Netfilter => so_original_dst(stream).map_err(OrigDstError::Sockopt),
        }
    }
}

/// The pre-NAT destination of an accepted TCP socket: `SO_ORIGINAL_DST` (level `SOL_IP`) for IPv4,
/// `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`) for IPv6, picked by the socket's own family.
pub fn so_original_dst(socket: &impl AsFd) -> io::Result<SocketAddr> {
    let socket = SockRef::from(socket);
    let addr =
        if socket.local_addr()?.is_ipv6() { socket.original_dst_v6()? } else { socket.original_dst_v4()? };
    addr.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    use super::*;

    /// A connection over loopback that no NAT rule touched: (client side, accepted side).
    async fn plain_pair(ip: std::net::IpAddr) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((ip, 0)).expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        accepted.set_nonblocking(true).expect("nonblocking");
        (client, TcpStream::from_std(accepted).expect("tokio stream"))
    }

    /// conntrack answers only when it tracks the netns (some nat rule loaded it); un-NATed, its
    /// answer is the socket's own address. Either way it must not be a made-up destination.
    fn assert_untranslated(result: io::Result<SocketAddr>, local: SocketAddr) {
        match result {
            Ok(orig) => assert_eq!(orig, local, "without NAT the original destination is the real one"),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)),
                "unexpected error: {e}"
            ),
        }
    }

    #[tokio::test]
    async fn so_original_dst_reads_each_family_at_its_own_level() {
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let (_client, accepted) = plain_pair(ip).await;
            let local = accepted.local_addr().expect("local addr");
            assert_untranslated(so_original_dst(&accepted), local);
        }
    }

    #[tokio::test]
    async fn a_direct_connection_to_the_outbound_listener_is_never_forwarded() {
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let (client, accepted) = plain_pair(ip).await;
            let peer = client.local_addr().expect("client addr");
            match OrigDst::Netfilter.outbound(0, peer, &accepted) {
                Err(OrigDstError::NotRedirected) => {}
                Err(OrigDstError::Sockopt(e)) => {
                    assert!(matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)), "{e}")
                }
                other => panic!("a connection nothing redirected must have no destination: {other:?}"),
            }
        }
    }
}
