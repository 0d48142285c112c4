//! The maps shared by the programs; their names are in `ferry_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use ferry_common::{CaptureConfig, ConnKey, PodAddr, PodCounters, ProbeSource, SockAddr};

/// Entries in the original-destination tables. LRU, so records the proxy never claims (an app that
/// connects and dies before the SYN) age out instead of filling the table.
const CONN_ENTRIES: u32 = 65536;

/// Captured sockets whose original destination the getpeername programs can answer with. Each
/// entry lives as long as its socket (sock_ops removes it on close); LRU only as a backstop for
/// sockets that never got as far as a SYN.
const PEER_ENTRIES: u32 = 262144;

/// Socket cookie -> original destination, from connect4/6 to sock_ops and getpeername4/6.
#[map(name = "ORIG_DST_BY_COOKIE")]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(PEER_ENTRIES, 0);

/// (netns cookie, app address) -> original destination, from sock_ops to the proxy.
#[map(name = "ORIG_DST_BY_CONN")]
pub static ORIG_DST_BY_CONN: LruHashMap<ConnKey, SockAddr> = LruHashMap::with_max_entries(CONN_ENTRIES, 0);

/// Pod address -> the pod's inbound listener.
#[map(name = "INBOUND_LISTENERS")]
pub static INBOUND_LISTENERS: SockHash<PodAddr> = SockHash::with_max_entries(4096, 0);

/// Where the kubelet's probes come from, at index 0.
#[map(name = "PROBE_SOURCE")]
pub static PROBE_SOURCE: Array<ProbeSource> = Array::with_max_entries(1, 0);

/// Every enrolled pod address (value unused).
#[map(name = "POD_ADDRS")]
pub static POD_ADDRS: HashMap<PodAddr, u8> = HashMap::with_max_entries(4096, 0);

/// Pod address -> the pod's HBONE tunnel listener.
#[map(name = "TUNNEL_LISTENERS")]
pub static TUNNEL_LISTENERS: SockHash<PodAddr> = SockHash::with_max_entries(4096, 0);

/// Capture settings at index 0.
#[map(name = "CAPTURE_CONFIG")]
pub static CAPTURE_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Destination ports never captured (value unused).
#[map(name = "EXCLUDED_PORTS")]
pub static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(256, 0);

/// IPv4 destination CIDRs never captured (key data in network byte order).
#[map(name = "EXCLUDED_CIDRS_V4")]
pub static EXCLUDED_CIDRS_V4: LpmTrie<u32, u8> =
    LpmTrie::with_max_entries(256, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// IPv6 destination CIDRs never captured.
#[map(name = "EXCLUDED_CIDRS_V6")]
pub static EXCLUDED_CIDRS_V6: LpmTrie<[u32; 4], u8> =
    LpmTrie::with_max_entries(256, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Global counters, indexed by `ferry_common::counter`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ferry_common::counter::COUNT, 0);

/// Per-pod counters keyed by cgroup id.
#[map(name = "POD_COUNTERS")]
pub static POD_COUNTERS: PerCpuHashMap<u64, PodCounters> = PerCpuHashMap::with_max_entries(4096, 0);

/// Inbound steers per pod address (sk_lookup has no cgroup to key by).
#[map(name = "INBOUND_POD_COUNTERS")]
pub static INBOUND_POD_COUNTERS: PerCpuHashMap<PodAddr, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Adds one to a global counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Reads the capture settings; `None` until the agent has written them.
#[inline(always)]
pub fn capture_config() -> Option<CaptureConfig> {
    let cfg = CAPTURE_CONFIG.get(0)?;
    if cfg.enabled == 0 { None } else { Some(*cfg) }
}

/// The probe source; `None` until the agent has set it.
#[inline(always)]
pub fn probe_source() -> Option<ProbeSource> {
    let p = PROBE_SOURCE.get(0)?;
    if p.enabled == 0 { None } else { Some(*p) }
}
