//! sock_ops: once the kernel has picked the app socket's local port (TCP_CONNECT_CB, before the SYN
//! leaves), copy the cookie-keyed record to a key the proxy can compute from the accepted socket:
//! the pod's netns cookie and the app's address. The SYN has not been sent yet, so the record is
//! always in place before the proxy can accept. The cookie-keyed record stays for getpeername and
//! is removed when the socket closes (the state callback is asked for on captured sockets only).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use ferry_common::{AF_INET, AF_INET6, ConnKey, SockAddr, counter};

use crate::{
    ctx::{ctx_read, read_ip6},
    maps::{ORIG_DST_BY_CONN, ORIG_DST_BY_COOKIE, count},
};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn ferry_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // SAFETY (all ctx reads below): `ops` is the kernel's bpf_sock_ops for this program type.
    let op = unsafe { ctx_read(&raw const (*ops).op) };
    if op == BPF_SOCK_OPS_STATE_CB {
        // args[1] is the new state: a closed captured socket needs no getpeername answer.
        if unsafe { ctx_read(&raw const (*ops).__bindgen_anon_1.args[1]) } == TCP_CLOSE {
            // SAFETY: helper valid for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
        }
        return 1;
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: helpers valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read from the map.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let family = unsafe { ctx_read(&raw const (*ops).family) } as u16;
    let ip = if family == AF_INET {
        [unsafe { ctx_read(&raw const (*ops).local_ip4) }, 0, 0, 0]
    } else if family == AF_INET6 {
        unsafe { read_ip6(&raw const (*ops).local_ip6) }
    } else {
        return 1;
    };
    // A dual-stack socket reaching an IPv4 destination has a v4-mapped local address; the proxy
    // accepts it on its IPv4 listener and sees a plain IPv4 peer, so record it as IPv4.
    let (ip, family) = if family == AF_INET6 && ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0xffff) {
        ([ip[3], 0, 0, 0], AF_INET)
    } else if family == AF_INET || family == AF_INET6 {
        (ip, family)
    } else {
        return 1;
    };
    let key = ConnKey {
        // SAFETY: helper valid for sock_ops programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        src: SockAddr { ip, port: unsafe { ctx_read(&raw const (*ops).local_port) } as u16, family },
        pad: 0,
    };
    if ORIG_DST_BY_CONN.insert(&key, &orig, 0).is_ok() {
        count(counter::TUPLE_RECORDED);
    }
    // Without the close callback the record would stay until LRU eviction; then drop it now and
    // let getpeername show the proxy rather than leak entries.
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG).is_err() {
        let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
    }
    1
}
