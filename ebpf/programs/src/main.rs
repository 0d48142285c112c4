//! Ferry's kernel programs.
//!
//! - `outbound`: cgroup connect4/connect6 redirect a pod's TCP connects to the in-pod outbound listener
//!   and record the original destination by socket cookie.
//! - `conntrack`: sock_ops moves that record to a key the proxy can compute on accept.
//! - `inbound`: sk_lookup steers SYNs for any address of a pod's netns to the in-pod inbound (or
//!   tunnel) listener, and drops those it has no listener for.
//! - `peername`: getpeername4/6 answer a captured socket's original destination.
//! - `probe`: connect4/6 on the node's cgroup bind the node's own connects to enrolled pods (the
//!   kubelet's probes) to the probe source address, which sk_lookup exempts.
#![no_std]
#![no_main]

mod conntrack;
mod ctx;
mod inbound;
mod maps;
mod outbound;
mod peername;
mod probe;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
