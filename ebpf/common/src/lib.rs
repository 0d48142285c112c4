//! Types shared between Ferry's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel and userspace read the same bytes.
//! Addresses are kept as the kernel hands them over (network byte order words) so the programs never
//! convert; the agent converts once, at the edge.
#![no_std]

/// `AF_INET`, as stored in [`SockAddr::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`SockAddr::family`].
pub const AF_INET6: u16 = 10;

/// An IPv4 or IPv6 socket address in the kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    /// Address words in network byte order; IPv4 uses `ip[0]` and leaves the rest zero.
    pub ip: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
}

/// Key of the original-destination table that the proxy reads on accept.
///
/// Every pod owns 127.0.0.1, so the app socket's address alone is ambiguous across pods: the netns
/// cookie of the pod makes it unique.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// `SO_NETNS_COOKIE` of the pod's network namespace.
    pub netns_cookie: u64,
    /// The app socket's local address, which the proxy sees as the peer of the accepted socket.
    pub src: SockAddr,
    /// Always zero: keeps the key free of uninitialised padding, which the kernel would hash.
    pub pad: u32,
}

/// Key of the inbound listener table: one of an enrolled pod's own addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodAddr {
    /// Address words in network byte order; IPv4 uses `ip[0]`.
    pub ip: [u32; 4],
    /// [`AF_INET`] or [`AF_INET6`] (u32 to keep the key free of padding).
    pub family: u32,
}

/// Node-wide capture settings, stored at index 0 of the `CAPTURE_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureConfig {
    /// In-pod outbound listener port (loopback), where connect() is redirected.
    pub outbound_port: u16,
    /// In-pod inbound plaintext listener port.
    pub inbound_port: u16,
    /// HBONE tunnel port on the pod address; never steered.
    pub tunnel_port: u16,
    /// Non-zero once the agent has written the configuration; before that nothing is captured.
    pub enabled: u16,
}

/// Where the kubelet's probes come from, at index 0 of the `PROBE_SOURCE` array: connections that
/// processes of the node's own netns make to an enrolled pod are bound to this address, and
/// sk_lookup leaves SYNs from it to the app (so STRICT pods stay probe-able). Nothing forwarded by
/// the node carries it: only sockets made on the node do.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProbeSource {
    /// The node's netns cookie: only connects made there are bound.
    pub host_netns: u64,
    /// The IPv6 source, network byte order words.
    pub ip6: [u32; 4],
    /// The IPv4 source, network byte order.
    pub ip4: u32,
    /// Non-zero once set.
    pub enabled: u32,
}

/// Indexes of the global per-CPU counters in the `COUNTERS` array.
pub mod counter {
    /// connect() calls rewritten to the outbound listener.
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    /// connect() calls left alone: loopback, excluded port or CIDR, proxy port, not TCP.
    pub const OUTBOUND_BYPASSED: u32 = 1;
    /// Original destinations recorded by 4-tuple in sock_ops.
    pub const TUPLE_RECORDED: u32 = 2;
    /// SYNs steered to an inbound listener by sk_lookup.
    pub const INBOUND_STEERED: u32 = 3;
    /// SYNs for an address of an enrolled pod's netns without a listener in the table: dropped,
    /// so an address the agent has not registered yet never reaches the app unproxied (the
    /// client's SYN retransmit finds the listener once the address watch has added it).
    pub const INBOUND_NO_LISTENER: u32 = 4;
    /// SYNs for the tunnel port steered to the pod's HBONE listener.
    pub const TUNNEL_STEERED: u32 = 5;
    /// SYNs for the tunnel port of an address without an HBONE listener (no certificate, or not
    /// registered yet): dropped.
    pub const TUNNEL_NO_LISTENER: u32 = 6;
    /// getpeername() answers rewritten to a captured socket's original destination.
    pub const PEER_REWRITTEN: u32 = 7;
    /// SYNs from the probe source address (the kubelet's probes) left to reach the app.
    pub const NODE_PASSED: u32 = 8;
    /// The node's own connects to enrolled pods bound to the probe source.
    pub const PROBE_BOUND: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;
}

/// Per-pod counters, keyed by the pod's cgroup id (outbound) or first address (inbound).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodCounters {
    /// Outbound connections redirected to the proxy.
    pub outbound_redirects: u64,
    /// Inbound connections steered to the proxy.
    pub inbound_steers: u64,
}

/// Version of the maps' layout (names, types, key and value sizes). Part of the bpffs pin path, so an
/// agent never reuses maps a differently built one pinned (the kernel does not check sizes on reuse):
/// bump it whenever a map or a type stored in one changes.
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the maps in the object file, shared so the agent cannot drift from the programs.
pub mod maps {
    /// cookie -> original destination, written by connect4/6, kept for the socket's life (the
    /// getpeername programs answer from it) and removed by sock_ops when the socket closes.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    /// (netns cookie, app address) -> original destination, written by sock_ops.
    pub const ORIG_DST_BY_CONN: &str = "ORIG_DST_BY_CONN";
    /// pod address -> inbound listener socket.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// pod address -> HBONE tunnel listener socket.
    pub const TUNNEL_LISTENERS: &str = "TUNNEL_LISTENERS";
    /// Where the kubelet's probes come from (index 0).
    pub const PROBE_SOURCE: &str = "PROBE_SOURCE";
    /// Every enrolled pod address (value unused): the node's connects to them are probes.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// Capture settings.
    pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
    /// Ports never captured.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// IPv4 CIDRs never captured.
    pub const EXCLUDED_CIDRS_V4: &str = "EXCLUDED_CIDRS_V4";
    /// IPv6 CIDRs never captured.
    pub const EXCLUDED_CIDRS_V6: &str = "EXCLUDED_CIDRS_V6";
    /// Global counters.
    pub const COUNTERS: &str = "COUNTERS";
    /// Outbound redirects by pod cgroup id.
    pub const POD_COUNTERS: &str = "POD_COUNTERS";
    /// Inbound steers by pod address.
    pub const INBOUND_POD_COUNTERS: &str = "INBOUND_POD_COUNTERS";
    /// Every map, for pinning.
    pub const ALL: [&str; 13] = [
        ORIG_DST_BY_COOKIE,
        ORIG_DST_BY_CONN,
        INBOUND_LISTENERS,
        TUNNEL_LISTENERS,
        PROBE_SOURCE,
        POD_ADDRS,
        CAPTURE_CONFIG,
        EXCLUDED_PORTS,
        EXCLUDED_CIDRS_V4,
        EXCLUDED_CIDRS_V6,
        COUNTERS,
        POD_COUNTERS,
        INBOUND_POD_COUNTERS,
    ];
}

/// Names of the programs in the object file.
pub mod programs {
    /// cgroup/connect4.
    pub const CONNECT4: &str = "ferry_connect4";
    /// cgroup/connect6.
    pub const CONNECT6: &str = "ferry_connect6";
    /// sock_ops recording the 4-tuple.
    pub const SOCK_OPS: &str = "ferry_sockops";
    /// sk_lookup steering inbound SYNs.
    pub const SK_LOOKUP: &str = "ferry_sk_lookup";
    /// cgroup/getpeername4.
    pub const GETPEERNAME4: &str = "ferry_getpeername4";
    /// cgroup/getpeername6.
    pub const GETPEERNAME6: &str = "ferry_getpeername6";
    /// cgroup/connect4 on the node's (kubelet's) cgroup: binds probes to the probe source.
    pub const PROBE_CONNECT4: &str = "ferry_probe_connect4";
    /// cgroup/connect6 on the node's cgroup.
    pub const PROBE_CONNECT6: &str = "ferry_probe_connect6";
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are repr(C) structs of integers with no padding holes the kernel reads.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::PodAddr {}
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::ProbeSource {}
}
