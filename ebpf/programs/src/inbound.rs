//! Inbound capture: sk_lookup, attached to each enrolled pod's netns, steers every TCP SYN that
//! arrives on a real interface for a local address of the netns: the tunnel port to the pod's HBONE
//! listener, every other port to its inbound listener. The tables are keyed by address and hold
//! every non-loopback address of the netns (the agent watches them), so a SYN for an address with
//! no entry is dropped, and the kernel answers a dropped lookup with a RST: the address belongs to
//! an enrolled pod whose new address is not registered yet, or no agent runs (the listeners are
//! gone, the pinned programs stay), and the client is refused rather than reaching the app. Nothing reaches a pod's app unproxied, with one
//! exception: a SYN from the probe source address (which only the node's own connects carry, see
//! `probe`) goes to the app as it would without the mesh, so STRICT pods stay probe-able. The node
//! drops packets from outside that claim one of its own addresses as their source (a martian
//! source), so another node cannot use that exception by spoofing. Loopback (the proxy handing a
//! connection to the app, or the app talking to itself) is never touched.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use ferry_common::{AF_INET, AF_INET6, PodAddr, counter};

use crate::{
    ctx::{ctx_read, read_ip6},
    maps::{INBOUND_LISTENERS, INBOUND_POD_COUNTERS, TUNNEL_LISTENERS, capture_config, count, probe_source},
};

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn ferry_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    // SAFETY (all reads below): `lk` is the kernel's bpf_sk_lookup for this program type.
    if unsafe { ctx_read(&raw const (*lk).protocol) } != IPPROTO_TCP
        || unsafe { ctx_read(&raw const (*lk).ingress_ifindex) } == LOOPBACK_IFINDEX
    {
        return SK_PASS;
    }
    let Some(cfg) = capture_config() else { return SK_PASS };
    let family = unsafe { ctx_read(&raw const (*lk).family) };
    let key = if family == u32::from(AF_INET) {
        PodAddr { ip: [unsafe { ctx_read(&raw const (*lk).local_ip4) }, 0, 0, 0], family }
    } else if family == u32::from(AF_INET6) {
        PodAddr { ip: unsafe { read_ip6(&raw const (*lk).local_ip6) }, family }
    } else {
        return SK_PASS;
    };
    if let Some(probe) = probe_source() {
        let from_probe = if family == u32::from(AF_INET) {
            let remote = unsafe { ctx_read(&raw const (*lk).remote_ip4) };
            remote == probe.ip4
        } else {
            let remote = unsafe { read_ip6(&raw const (*lk).remote_ip6) };
            remote == probe.ip6
        };
        if from_probe {
            count(counter::NODE_PASSED);
            return SK_PASS;
        }
    }
    if unsafe { ctx_read(&raw const (*lk).local_port) } == u32::from(cfg.tunnel_port) {
        return match TUNNEL_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
            Ok(()) => {
                count(counter::TUNNEL_STEERED);
                SK_PASS
            }
            Err(_) => {
                count(counter::TUNNEL_NO_LISTENER);
                SK_DROP
            }
        };
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(counter::INBOUND_STEERED);
            match INBOUND_POD_COUNTERS.get_ptr_mut(&key) {
                // SAFETY: per-CPU value, no concurrent writer on this CPU.
                Some(c) => unsafe { *c += 1 },
                None => {
                    let _ = INBOUND_POD_COUNTERS.insert(&key, &1, 0);
                }
            }
            SK_PASS
        }
        Err(_) => {
            count(counter::INBOUND_NO_LISTENER);
            SK_DROP
        }
    }
}
