//! Inbound capture: sk_lookup, attached to each enrolled pod's netns, steers a TCP SYN that arrives on
//! a real interface for one of the pod's addresses to the pod's inbound listener, except for the
//! tunnel port, whose listener is bound to the pod address and found by the normal lookup. Loopback
//! (the proxy handing a connection to the app, or the app talking to itself) is never touched.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use ferry_common::{AF_INET, AF_INET6, PodAddr, counter};

use crate::maps::{INBOUND_LISTENERS, capture_config, count};

const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn ferry_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid bpf_sk_lookup for this program type.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP || lk.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let Some(cfg) = capture_config() else { return SK_PASS };
    if lk.local_port == u32::from(cfg.tunnel_port) {
        return SK_PASS;
    }
    let family = lk.family;
    let key = if family == u32::from(AF_INET) {
        PodAddr { ip: [lk.local_ip4, 0, 0, 0], family }
    } else if family == u32::from(AF_INET6) {
        PodAddr { ip: [lk.local_ip6[0], lk.local_ip6[1], lk.local_ip6[2], lk.local_ip6[3]], family }
    } else {
        return SK_PASS;
    };
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => count(counter::INBOUND_STEERED),
        Err(_) => count(counter::INBOUND_NO_LISTENER),
    }
    SK_PASS
}
