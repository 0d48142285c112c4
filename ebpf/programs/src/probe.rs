//! Probes: connect4/connect6 attached to the node's cgroup (where the kubelet runs) bind a TCP
//! connect that a process of the node's own netns makes to an enrolled pod to the probe source
//! address, before the SYN leaves. sk_lookup lets SYNs from that address reach the app. Traffic the
//! node forwards (a NodePort masqueraded to the node's address, say) never passes here, so it never
//! carries the address: only sockets made on the node do, as istio-cni's probe SNAT does.

use aya_ebpf::{
    EbpfContext as _,
    bindings::sockaddr,
    helpers::{bpf_bind, bpf_get_netns_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use ferry_common::{AF_INET, AF_INET6, PodAddr, counter};

use crate::{
    ctx::{ctx_read, read_ip6},
    maps::{POD_ADDRS, count, probe_source},
    outbound::is_tcp,
};

const ALLOW: i32 = 1;

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sock_addr(connect4)]
pub fn ferry_probe_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(probe) = probe_source() else { return ALLOW };
    if !is_tcp(sa) || !in_host_netns(&ctx, probe.host_netns) {
        return ALLOW;
    }
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this program type.
    let dst = unsafe { ctx_read(&raw const (*sa).user_ip4) };
    // SAFETY: plain value read from the map, tested for presence only.
    if unsafe { POD_ADDRS.get(&PodAddr { ip: [dst, 0, 0, 0], family: u32::from(AF_INET) }) }.is_none() {
        return ALLOW;
    }
    let mut addr = SockaddrIn { family: AF_INET, port: 0, addr: probe.ip4, zero: [0; 8] };
    // SAFETY: helper valid in connect4; the address lives on this program's stack.
    let rc = unsafe {
        bpf_bind(ctx.sock_addr, (&raw mut addr).cast::<sockaddr>(), core::mem::size_of::<SockaddrIn>() as i32)
    };
    if rc == 0 {
        count(counter::PROBE_BOUND);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ferry_probe_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(probe) = probe_source() else { return ALLOW };
    if !is_tcp(sa) || !in_host_netns(&ctx, probe.host_netns) {
        return ALLOW;
    }
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this program type.
    let dst = unsafe { read_ip6(&raw const (*sa).user_ip6) };
    // A v4-mapped destination is an IPv4 connect on a dual-stack socket; those are left alone.
    // SAFETY: plain value read from the map, tested for presence only.
    if unsafe { POD_ADDRS.get(&PodAddr { ip: dst, family: u32::from(AF_INET6) }) }.is_none() {
        return ALLOW;
    }
    let mut addr = SockaddrIn6 { family: AF_INET6, port: 0, flowinfo: 0, addr: probe.ip6, scope_id: 0 };
    // SAFETY: helper valid in connect6; the address lives on this program's stack.
    let rc = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&raw mut addr).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn6>() as i32,
        )
    };
    if rc == 0 {
        count(counter::PROBE_BOUND);
    }
    ALLOW
}

/// Only the node's own netns: the agent's sockets inside pods (its process is in this cgroup too)
/// are never rebound.
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext, host_netns: u64) -> bool {
    // SAFETY: helper valid for cgroup_sock_addr programs.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    cookie == host_netns
}
