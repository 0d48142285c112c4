//! Outbound capture: a pod's TCP connect() to anywhere but loopback, excluded destinations and the
//! proxy's own ports is rewritten to the in-pod outbound listener, and the original destination is
//! recorded under the socket's cookie.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use ferry_common::{AF_INET, AF_INET6, CaptureConfig, PodCounters, SockAddr, counter};

use crate::{
    ctx::{ctx_read, ctx_write, read_ip6},
    maps::{
        EXCLUDED_CIDRS_V4, EXCLUDED_CIDRS_V6, EXCLUDED_PORTS, ORIG_DST_BY_COOKIE, POD_COUNTERS,
        capture_config, count,
    },
};

/// Allow the connect() to proceed (with or without a rewrite).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// 127.0.0.1 in network byte order as the kernel stores it on little-endian hosts.
const LOOPBACK_V4: u32 = u32::from_be(0x7f00_0001);

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let Some(cfg) = capture_config() else { return ALLOW };
    // SAFETY (all ctx accesses below): `sa` is the kernel's bpf_sock_addr for this program type.
    let ip = unsafe { ctx_read(&raw const (*sa).user_ip4) };
    let port = u16::from_be(unsafe { ctx_read(&raw const (*sa).user_port) } as u16);
    // 127.0.0.0/8: the first octet is the lowest byte of the network-order word.
    if ip & 0xff == 127 || !port_is_captured(&cfg, port) || EXCLUDED_CIDRS_V4.get(Key::new(32, ip)).is_some()
    {
        count(counter::OUTBOUND_BYPASSED);
        return ALLOW;
    }
    let orig = SockAddr { ip: [ip, 0, 0, 0], port, family: AF_INET };
    if !record(&ctx, &orig) {
        // Without a record the proxy could not route the connection: leave it alone.
        count(counter::OUTBOUND_BYPASSED);
        return ALLOW;
    }
    unsafe {
        ctx_write(&raw mut (*sa).user_ip4, LOOPBACK_V4);
        ctx_write(&raw mut (*sa).user_port, u32::from(cfg.outbound_port.to_be()));
    }
    count_redirect();
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    let Some(cfg) = capture_config() else { return ALLOW };
    // SAFETY (all ctx accesses below): `sa` is the kernel's bpf_sock_addr for this program type.
    let ip = unsafe { read_ip6(&raw const (*sa).user_ip6) };
    let port = u16::from_be(unsafe { ctx_read(&raw const (*sa).user_port) } as u16);
    if !port_is_captured(&cfg, port) {
        count(counter::OUTBOUND_BYPASSED);
        return ALLOW;
    }
    // An IPv4 destination on a dual-stack socket arrives as ::ffff:a.b.c.d and is treated as IPv4.
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff);
    let orig = if v4_mapped {
        let v4 = ip[3];
        if v4 & 0xff == 127 || EXCLUDED_CIDRS_V4.get(Key::new(32, v4)).is_some() {
            count(counter::OUTBOUND_BYPASSED);
            return ALLOW;
        }
        SockAddr { ip: [v4, 0, 0, 0], port, family: AF_INET }
    } else {
        let loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1);
        if loopback || EXCLUDED_CIDRS_V6.get(Key::new(128, ip)).is_some() {
            count(counter::OUTBOUND_BYPASSED);
            return ALLOW;
        }
        SockAddr { ip, port, family: AF_INET6 }
    };
    if !record(&ctx, &orig) {
        count(counter::OUTBOUND_BYPASSED);
        return ALLOW;
    }
    // A v4-mapped destination stays v4-mapped: the socket may in practice be IPv4-only.
    let new_ip =
        if v4_mapped { [0, 0, u32::from_be(0x0000_ffff), LOOPBACK_V4] } else { [0, 0, 0, u32::from_be(1)] };
    unsafe {
        ctx_write(&raw mut (*sa).user_ip6[0], new_ip[0]);
        ctx_write(&raw mut (*sa).user_ip6[1], new_ip[1]);
        ctx_write(&raw mut (*sa).user_ip6[2], new_ip[2]);
        ctx_write(&raw mut (*sa).user_ip6[3], new_ip[3]);
        ctx_write(&raw mut (*sa).user_port, u32::from(cfg.outbound_port.to_be()));
    }
    count_redirect();
    ALLOW
}

/// Only TCP is captured: UDP and raw sockets go their own way.
#[inline(always)]
pub(crate) fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this program type.
    let (ty, proto) = unsafe { (ctx_read(&raw const (*sa).type_), ctx_read(&raw const (*sa).protocol)) };
    ty == SOCK_STREAM && (proto == 0 || proto == IPPROTO_TCP)
}

/// The proxy's own ports and excluded ports are never captured: that is what prevents loops when
/// something connects to a proxy port directly.
#[inline(always)]
fn port_is_captured(cfg: &CaptureConfig, port: u16) -> bool {
    if port == cfg.outbound_port || port == cfg.inbound_port || port == cfg.tunnel_port {
        return false;
    }
    // SAFETY: the value is a plain u8 we only test for presence.
    unsafe { EXCLUDED_PORTS.get(&port) }.is_none()
}

#[inline(always)]
fn record(ctx: &SockAddrContext, orig: &SockAddr) -> bool {
    use aya_ebpf::EbpfContext as _;
    // SAFETY: helper valid for cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_DST_BY_COOKIE.insert(&cookie, orig, 0).is_ok()
}

#[inline(always)]
fn count_redirect() {
    count(counter::OUTBOUND_REDIRECTED);
    // SAFETY: helper valid in process context, which connect() always is.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    match POD_COUNTERS.get_ptr_mut(&cgroup) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(c) => unsafe { (*c).outbound_redirects += 1 },
        None => {
            let first = PodCounters { outbound_redirects: 1, inbound_steers: 0 };
            let _ = POD_COUNTERS.insert(&cgroup, &first, 0);
        }
    }
}
