//! sock_ops: once the kernel has picked the app socket's local port (TCP_CONNECT_CB, before the SYN
//! leaves), move the cookie-keyed record to a key the proxy can compute from the accepted socket:
//! the pod's netns cookie and the app's address. The SYN has not been sent yet, so the record is
//! always in place before the proxy can accept.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use ferry_common::{AF_INET, AF_INET6, ConnKey, SockAddr, counter};

use crate::maps::{ORIG_DST_BY_CONN, ORIG_DST_BY_COOKIE, count};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;

#[sock_ops]
pub fn ferry_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: valid bpf_sock_ops for this program type.
    let ops = unsafe { &*ctx.ops };
    if ops.op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: helpers valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read from the map.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
    let family = ops.family as u16;
    let ip = if family == AF_INET {
        [ops.local_ip4, 0, 0, 0]
    } else if family == AF_INET6 {
        [ops.local_ip6[0], ops.local_ip6[1], ops.local_ip6[2], ops.local_ip6[3]]
    } else {
        return 1;
    };
    let key = ConnKey {
        // SAFETY: helper valid for sock_ops programs.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        src: SockAddr { ip, port: ops.local_port as u16, family },
        pad: 0,
    };
    if ORIG_DST_BY_CONN.insert(&key, &orig, 0).is_ok() {
        count(counter::TUPLE_RECORDED);
    }
    1
}
