//! Loads the embedded eBPF object once per agent and writes the node-wide capture settings.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps, links::FdLink},
};
use ferry_common::{CaptureConfig, PodAddr, PodCounters, ProbeSource, maps, programs};

use super::{OrigDstTable, PodAttachment, Steering, addr::pod_addr};

/// The cgroup programs attached to every pod, in attach order.
const CGROUP_SOCK_ADDR: [&str; 4] =
    [programs::CONNECT4, programs::CONNECT6, programs::GETPEERNAME4, programs::GETPEERNAME6];

/// The compiled kernel programs, embedded at build time by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf"));

/// Errors loading the programs or attaching them.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The object could not be loaded (verifier log included by aya).
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("{what}")]
    Program {
        /// What was being done.
        what: String,
        /// The cause.
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{what}")]
    Map {
        /// What was being done.
        what: String,
        /// The cause.
        source: MapError,
    },
    /// An attachment is not an fd-based bpf_link (kernel too old for bpf_link_create).
    #[error("{what}")]
    Link {
        /// What was being done.
        what: String,
        /// The cause.
        source: aya::programs::links::LinkError,
    },
    /// A program or map is missing from the object (build mismatch).
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    /// A cgroup or netns path could not be opened.
    #[error("opening {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Node-wide capture settings as the programs need them.
#[derive(Clone, Debug, Default)]
pub struct CaptureParams {
    /// In-pod outbound listener port.
    pub outbound_port: u16,
    /// In-pod inbound listener port.
    pub inbound_port: u16,
    /// HBONE tunnel port.
    pub tunnel_port: u16,
    /// Destination ports never captured.
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs never captured, as (network address, prefix length).
    pub exclude_cidrs: Vec<(IpAddr, u8)>,
}

/// The loaded programs and the maps the agent uses.
pub struct Datapath {
    ebpf: Ebpf,
    steering: Steering,
    /// The probe programs' links on the node's cgroup (for the agent's lifetime).
    probe_links: Vec<FdLink>,
    counters: PerCpuArray<MapData, u64>,
    pod_counters: PerCpuHashMap<MapData, u64, PodCounters>,
    inbound_pod_counters: PerCpuHashMap<MapData, PodAddr, u64>,
}

/// Global eBPF counters summed over CPUs, in `ferry_common::counter` order.
pub type CounterValues = [u64; ferry_common::counter::COUNT as usize];

impl Datapath {
    /// Loads and verifies every program, writes the capture settings, and hands back the
    /// original-destination table for the proxy.
    pub fn load(params: &CaptureParams) -> Result<(Self, OrigDstTable), DatapathError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for name in CGROUP_SOCK_ADDR.into_iter().chain([programs::PROBE_CONNECT4, programs::PROBE_CONNECT6]) {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DatapathError::Program { what: format!("loading {name}"), source })?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
        sockops
            .load()
            .map_err(|source| DatapathError::Program { what: "loading sock_ops".into(), source })?;
        let lookup: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        lookup
            .load()
            .map_err(|source| DatapathError::Program { what: "loading sk_lookup".into(), source })?;

        let orig_dst = OrigDstTable::new(take_map(&mut ebpf, maps::ORIG_DST_BY_CONN)?);
        let steering = Steering::new(
            take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            take_map(&mut ebpf, maps::TUNNEL_LISTENERS)?,
            take_map(&mut ebpf, maps::POD_ADDRS)?,
        );
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let pod_counters = take_map(&mut ebpf, maps::POD_COUNTERS)?;
        let inbound_pod_counters = take_map(&mut ebpf, maps::INBOUND_POD_COUNTERS)?;
        let mut datapath =
            Self { ebpf, steering, probe_links: Vec::new(), counters, pod_counters, inbound_pod_counters };
        datapath.configure(params)?;
        Ok((datapath, orig_dst))
    }

    fn configure(&mut self, params: &CaptureParams) -> Result<(), DatapathError> {
        let map_err = |what: &str| {
            let what = what.to_string();
            move |source| DatapathError::Map { what, source }
        };
        let mut ports: HashMap<_, u16, u8> = map_mut(&mut self.ebpf, maps::EXCLUDED_PORTS)?;
        for port in &params.exclude_ports {
            ports.insert(port, 1, 0).map_err(map_err("writing excluded ports"))?;
        }
        let mut v4: LpmTrie<_, u32, u8> = map_mut(&mut self.ebpf, maps::EXCLUDED_CIDRS_V4)?;
        for (ip, len) in &params.exclude_cidrs {
            if let IpAddr::V4(ip) = ip {
                v4.insert(&Key::new(u32::from(*len), u32::from(*ip).to_be()), 1, 0)
                    .map_err(map_err("writing excluded IPv4 CIDRs"))?;
            }
        }
        let mut v6: LpmTrie<_, [u32; 4], u8> = map_mut(&mut self.ebpf, maps::EXCLUDED_CIDRS_V6)?;
        for (ip, len) in &params.exclude_cidrs {
            if let IpAddr::V6(ip) = ip {
                let words = pod_addr(IpAddr::V6(*ip)).ip;
                v6.insert(&Key::new(u32::from(*len), words), 1, 0)
                    .map_err(map_err("writing excluded IPv6 CIDRs"))?;
            }
        }
        // Written last: the programs capture nothing until this entry is enabled.
        let mut cfg: Array<_, CaptureConfig> = map_mut(&mut self.ebpf, maps::CAPTURE_CONFIG)?;
        let value = CaptureConfig {
            outbound_port: params.outbound_port,
            inbound_port: params.inbound_port,
            tunnel_port: params.tunnel_port,
            enabled: 1,
        };
        cfg.set(0, value, 0).map_err(map_err("writing capture config"))
    }

    /// Attaches connect4/6, getpeername4/6 and sock_ops to the pod's cgroup and sk_lookup to its
    /// netns, as bpf_links.
    /// Cgroup links always coexist with other programs on the same cgroup (the kernel treats link
    /// attachments as multi-attach and refuses the ALLOW_MULTI flag on them, hence `Single` here),
    /// so another agent's socket programs keep running. Dropping the result detaches them all.
    pub fn attach_pod(&mut self, cgroup: &Path, netns: &Path) -> Result<PodAttachment, DatapathError> {
        let open = |path: &Path| {
            std::fs::File::open(path).map_err(|source| DatapathError::Open { path: path.to_owned(), source })
        };
        let cgroup_fd = open(cgroup)?;
        let netns_fd = open(netns)?;
        let mut att = PodAttachment::default();
        for name in CGROUP_SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| attach_err(name, cgroup, source))?;
            let link = prog.take_link(id).map_err(|source| attach_err(name, cgroup, source))?;
            att.push(name, FdLink::try_from(link).map_err(|e| link_err(name, cgroup, e))?);
        }
        let prog: &mut SockOps = program(&mut self.ebpf, programs::SOCK_OPS)?;
        let id = prog
            .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| attach_err(programs::SOCK_OPS, cgroup, source))?;
        let link = prog.take_link(id).map_err(|source| attach_err(programs::SOCK_OPS, cgroup, source))?;
        att.push(
            programs::SOCK_OPS,
            FdLink::try_from(link).map_err(|e| link_err(programs::SOCK_OPS, cgroup, e))?,
        );
        let prog: &mut SkLookup = program(&mut self.ebpf, programs::SK_LOOKUP)?;
        let id =
            prog.attach(netns_fd.as_fd()).map_err(|source| attach_err(programs::SK_LOOKUP, netns, source))?;
        let link = prog.take_link(id).map_err(|source| attach_err(programs::SK_LOOKUP, netns, source))?;
        att.push(programs::SK_LOOKUP, FdLink::from(link));
        Ok(att)
    }

    /// Binds the node's own connects to enrolled pods (processes of netns `host_netns` in
    /// `cgroup` and below: the kubelet) to `ip4`/`ip6`, and lets SYNs from those reach apps.
    pub fn enable_probes(
        &mut self,
        cgroup: &Path,
        host_netns: u64,
        ip4: std::net::Ipv4Addr,
        ip6: std::net::Ipv6Addr,
    ) -> Result<(), DatapathError> {
        let mut source: Array<_, ProbeSource> = map_mut(&mut self.ebpf, maps::PROBE_SOURCE)?;
        let value = ProbeSource {
            host_netns,
            ip6: pod_addr(IpAddr::V6(ip6)).ip,
            ip4: u32::from(ip4).to_be(),
            enabled: 1,
        };
        source
            .set(0, value, 0)
            .map_err(|source| DatapathError::Map { what: "writing the probe source".into(), source })?;
        let fd = std::fs::File::open(cgroup)
            .map_err(|source| DatapathError::Open { path: cgroup.to_owned(), source })?;
        for name in [programs::PROBE_CONNECT4, programs::PROBE_CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(fd.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| attach_err(name, cgroup, source))?;
            let link = prog.take_link(id).map_err(|source| attach_err(name, cgroup, source))?;
            self.probe_links.push(FdLink::try_from(link).map_err(|e| link_err(name, cgroup, e))?);
        }
        Ok(())
    }

    /// The sk_lookup tables, for enrollment and the pods' address watches.
    pub fn steering(&self) -> Steering {
        self.steering.clone()
    }

    /// Kernel program ids, by name, for reporting.
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf.programs().filter_map(|(name, p)| Some((name.to_string(), p.info().ok()?.id()))).collect()
    }

    /// Global counters summed over CPUs.
    pub fn counters(&self) -> CounterValues {
        let mut out = [0u64; ferry_common::counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Inbound SYNs steered to the listener of pod address `ip`, summed over CPUs.
    pub fn inbound_steers(&self, ip: IpAddr) -> u64 {
        self.inbound_pod_counters.get(&pod_addr(ip), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Outbound redirects of the pod whose cgroup id is `cgroup_id`, summed over CPUs.
    pub fn pod_outbound_redirects(&self, cgroup_id: u64) -> u64 {
        self.pod_counters
            .get(&cgroup_id, 0)
            .map(|v| v.iter().map(|c| c.outbound_redirects).sum())
            .unwrap_or(0)
    }
}

fn attach_err(name: &str, target: &Path, source: ProgramError) -> DatapathError {
    DatapathError::Program { what: format!("attaching {name} to {}", target.display()), source }
}

fn link_err(name: &str, target: &Path, source: aya::programs::links::LinkError) -> DatapathError {
    DatapathError::Link { what: format!("attaching {name} to {}", target.display()), source }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
    prog.try_into().map_err(|source| DatapathError::Program {
        what: format!("program {name} has the wrong type"),
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { what: format!("map {name}"), source })
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { what: format!("map {name}"), source })
}
