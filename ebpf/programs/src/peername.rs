//! getpeername4/6: a captured socket is connected to the in-pod outbound listener, but the app asked
//! for its original destination, so that is what getpeername() answers (in the form the app wrote
//! it: IPv4, IPv6, or v4-mapped on a dual-stack socket). The record is the one connect4/6 made,
//! kept by socket cookie until the socket closes. getsockname() is left alone.

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use ferry_common::{AF_INET, AF_INET6, SockAddr, counter};

use crate::{
    ctx::{ctx_read, ctx_write, read_ip6},
    maps::{ORIG_DST_BY_COOKIE, capture_config, count},
};

/// The only return value the kernel accepts from getpeername programs.
const DONE: i32 = 1;
/// 127.0.0.1 in network byte order as the kernel stores it on little-endian hosts.
const LOOPBACK_V4: u32 = u32::from_be(0x7f00_0001);

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(orig) = captured_peer(&ctx) else { return DONE };
    // SAFETY (ctx accesses): `sa` is the kernel's bpf_sock_addr for this program type.
    let ip = unsafe { ctx_read(&raw const (*sa).user_ip4) };
    if orig.family != AF_INET || ip != LOOPBACK_V4 || !at_listener(sa) {
        return DONE;
    }
    unsafe {
        ctx_write(&raw mut (*sa).user_ip4, orig.ip[0]);
        ctx_write(&raw mut (*sa).user_port, u32::from(orig.port.to_be()));
    }
    count(counter::PEER_REWRITTEN);
    DONE
}

#[cgroup_sock_addr(getpeername6)]
pub fn ferry_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(orig) = captured_peer(&ctx) else { return DONE };
    // SAFETY (ctx accesses): `sa` is the kernel's bpf_sock_addr for this program type.
    let ip = unsafe { read_ip6(&raw const (*sa).user_ip6) };
    let mapped_loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0xffff) && ip[3] == LOOPBACK_V4;
    let loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1);
    if !(mapped_loopback || loopback) || !at_listener(sa) {
        return DONE;
    }
    // An IPv4 destination reached from a dual-stack socket was written as ::ffff:a.b.c.d.
    let words = if orig.family == AF_INET {
        [0, 0, u32::from_be(0xffff), orig.ip[0]]
    } else if orig.family == AF_INET6 {
        orig.ip
    } else {
        return DONE;
    };
    unsafe {
        ctx_write(&raw mut (*sa).user_ip6[0], words[0]);
        ctx_write(&raw mut (*sa).user_ip6[1], words[1]);
        ctx_write(&raw mut (*sa).user_ip6[2], words[2]);
        ctx_write(&raw mut (*sa).user_ip6[3], words[3]);
        ctx_write(&raw mut (*sa).user_port, u32::from(orig.port.to_be()));
    }
    count(counter::PEER_REWRITTEN);
    DONE
}

/// The original destination recorded for this socket, if connect4/6 captured it.
#[inline(always)]
fn captured_peer(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: helper valid for cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read from the map.
    unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }.copied()
}

/// Whether the kernel's answer is the outbound listener's port: only then was the socket really
/// redirected (a socket that reconnected elsewhere keeps its true peer).
#[inline(always)]
fn at_listener(sa: *mut bpf_sock_addr) -> bool {
    let Some(cfg) = capture_config() else { return false };
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this program type.
    let port = u16::from_be(unsafe { ctx_read(&raw const (*sa).user_port) } as u16);
    port == cfg.outbound_port
}
