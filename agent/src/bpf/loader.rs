//! Loads the embedded eBPF object once per agent, adopts (or pins) the programs, maps and links
//! under the bpffs pin root, and writes the node-wide capture settings.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramInfo, SkLookup, SockOps,
        cgroup_sock_addr::CgroupSockAddrAttachType,
        links::{FdLink, PinnedLink},
    },
};
use ferry_common::{CaptureConfig, PodAddr, PodCounters, ProbeSource, maps, programs};

use super::{OrigDstTable, PodAttachment, Steering, addr::pod_addr, pins::PinRoot};

/// The cgroup programs attached to every pod, in attach order.
const CGROUP_SOCK_ADDR: [&str; 4] =
    [programs::CONNECT4, programs::CONNECT6, programs::GETPEERNAME4, programs::GETPEERNAME6];
/// The probe programs, attached to the node's cgroup.
const PROBES: [&str; 2] = [programs::PROBE_CONNECT4, programs::PROBE_CONNECT6];
/// Every program of the object.
const ALL_PROGRAMS: [&str; 8] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCK_OPS,
    programs::SK_LOOKUP,
    programs::PROBE_CONNECT4,
    programs::PROBE_CONNECT6,
];

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
    /// A program or link could not be pinned.
    #[error("{what}")]
    Pin {
        /// What was being done.
        what: String,
        /// The cause.
        source: aya::pin::PinError,
    },
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
    pins: PinRoot,
    programs: Programs,
    steering: Steering,
    /// The probe programs' links on the node's cgroup (pinned: they outlive the agent).
    probe_links: Vec<PinnedLink>,
    counters: PerCpuArray<MapData, u64>,
    pod_counters: PerCpuHashMap<MapData, u64, PodCounters>,
    inbound_pod_counters: PerCpuHashMap<MapData, PodAddr, u64>,
    /// Whether programs pinned by an earlier agent were found and adopted.
    adopted: bool,
}

/// The programs as attached: opened from their pins, so every agent attaches the same kernel
/// programs (their ids do not change across restarts).
struct Programs {
    cgroup: Vec<(&'static str, CgroupSockAddr)>,
    sock_ops: SockOps,
    sk_lookup: SkLookup,
    probes: Vec<(&'static str, CgroupSockAddr)>,
}

/// Global eBPF counters summed over CPUs, in `ferry_common::counter` order.
pub type CounterValues = [u64; ferry_common::counter::COUNT as usize];

impl Datapath {
    /// Loads and verifies every program, adopts the maps, programs and links pinned under `pins`
    /// (pinning what is not there yet), writes the capture settings, and hands back the
    /// original-destination table for the proxy.
    pub fn load(params: &CaptureParams, pins: PinRoot) -> Result<(Self, OrigDstTable), DatapathError> {
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            // An existing pin is opened and reused; a missing one is created and pinned.
            loader.map_pin_path(name, pins.map(name));
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in CGROUP_SOCK_ADDR.into_iter().chain(PROBES) {
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
        let mut adopted = false;
        for name in ALL_PROGRAMS {
            adopted |= settle(&mut ebpf, &pins, name)?;
        }
        let programs = Programs::open(&pins)?;
        // The freshly loaded copies are not needed any more: the pinned ones are what runs.
        for (_, prog) in ebpf.programs_mut() {
            let _ = unload(prog);
        }

        let orig_dst = OrigDstTable::new(take_map(&mut ebpf, maps::ORIG_DST_BY_CONN)?);
        let steering = Steering::new(
            take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            take_map(&mut ebpf, maps::TUNNEL_LISTENERS)?,
            take_map(&mut ebpf, maps::POD_ADDRS)?,
        );
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let pod_counters = take_map(&mut ebpf, maps::POD_COUNTERS)?;
        let inbound_pod_counters = take_map(&mut ebpf, maps::INBOUND_POD_COUNTERS)?;
        let mut datapath = Self {
            ebpf,
            pins,
            programs,
            steering,
            probe_links: Vec::new(),
            counters,
            pod_counters,
            inbound_pod_counters,
            adopted,
        };
        datapath.configure(params)?;
        Ok((datapath, orig_dst))
    }

    /// Whether an earlier agent's pinned programs were adopted (a restart, not a first start).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directories.
    pub fn pins(&self) -> &PinRoot {
        &self.pins
    }

    fn configure(&mut self, params: &CaptureParams) -> Result<(), DatapathError> {
        let map_err = |what: &str| {
            let what = what.to_string();
            move |source| DatapathError::Map { what, source }
        };
        // Adopted maps still hold the previous agent's settings: what is no longer configured goes.
        let mut ports: HashMap<_, u16, u8> = map_mut(&mut self.ebpf, maps::EXCLUDED_PORTS)?;
        let stale: Vec<u16> = ports.keys().flatten().filter(|p| !params.exclude_ports.contains(p)).collect();
        for port in stale {
            let _ = ports.remove(&port);
        }
        for port in &params.exclude_ports {
            ports.insert(port, 1, 0).map_err(map_err("writing excluded ports"))?;
        }
        let mut v4: LpmTrie<_, u32, u8> = map_mut(&mut self.ebpf, maps::EXCLUDED_CIDRS_V4)?;
        for key in v4.keys().flatten().collect::<Vec<_>>() {
            let _ = v4.remove(&key);
        }
        for (ip, len) in &params.exclude_cidrs {
            if let IpAddr::V4(ip) = ip {
                v4.insert(&Key::new(u32::from(*len), u32::from(*ip).to_be()), 1, 0)
                    .map_err(map_err("writing excluded IPv4 CIDRs"))?;
            }
        }
        let mut v6: LpmTrie<_, [u32; 4], u8> = map_mut(&mut self.ebpf, maps::EXCLUDED_CIDRS_V6)?;
        for key in v6.keys().flatten().collect::<Vec<_>>() {
            let _ = v6.remove(&key);
        }
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
    /// netns, as pinned bpf_links, adopting those an earlier agent pinned for the same cgroup and
    /// netns. Cgroup links always coexist with other programs on the same cgroup (the kernel treats
    /// link attachments as multi-attach and refuses the ALLOW_MULTI flag on them, hence `Single`
    /// here), so another agent's socket programs keep running. The links stay attached until
    /// [`PodAttachment::detach`]; on failure, the links made by this call are removed again.
    pub fn attach_pod(
        &mut self,
        cgroup: &Path,
        netns: &Path,
        cgroup_id: u64,
        netns_cookie: u64,
    ) -> Result<PodAttachment, DatapathError> {
        let dir = self.pins.pod(cgroup_id, netns_cookie);
        let mut att = PodAttachment::new(dir.clone());
        match self.attach_pod_links(&mut att, &dir, cgroup, netns) {
            Ok(()) => Ok(att),
            Err(e) => {
                att.remove_created();
                Err(e)
            }
        }
    }

    fn attach_pod_links(
        &mut self,
        att: &mut PodAttachment,
        dir: &Path,
        cgroup: &Path,
        netns: &Path,
    ) -> Result<(), DatapathError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| DatapathError::Open { path: dir.to_owned(), source })?;
        let cgroup_fd = open(cgroup)?;
        let mut netns_fd = None;
        let names = CGROUP_SOCK_ADDR.into_iter().chain([programs::SOCK_OPS, programs::SK_LOOKUP]);
        for name in names {
            let pin = dir.join(name);
            if let Some(link) = adopt_link(&pin) {
                att.push(name, link_id(&FdLink::from(link)), false);
                continue;
            }
            let link = if name == programs::SK_LOOKUP {
                let fd = match &netns_fd {
                    Some(fd) => fd,
                    None => netns_fd.insert(open(netns)?),
                };
                let prog = &mut self.programs.sk_lookup;
                let id = prog.attach(fd.as_fd()).map_err(|source| attach_err(name, netns, source))?;
                FdLink::from(prog.take_link(id).map_err(|source| attach_err(name, netns, source))?)
            } else if name == programs::SOCK_OPS {
                let prog = &mut self.programs.sock_ops;
                let id = prog
                    .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
                    .map_err(|source| attach_err(name, cgroup, source))?;
                let link = prog.take_link(id).map_err(|source| attach_err(name, cgroup, source))?;
                FdLink::try_from(link).map_err(|e| link_err(name, cgroup, e))?
            } else {
                let prog = cgroup_prog(&mut self.programs.cgroup, name)?;
                attach_cgroup(prog, name, &cgroup_fd, cgroup)?
            };
            let id = link_id(&link);
            pin_link(link, &pin)?;
            att.push(name, id, true);
        }
        Ok(())
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
        let fd = open(cgroup)?;
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(
            &fd.metadata().map_err(|source| DatapathError::Open { path: cgroup.to_owned(), source })?,
        );
        let dir = self.pins.node(cgroup_id);
        // Probe links an earlier agent left on another cgroup no longer apply.
        for other in self.pins.nodes().into_iter().filter(|d| *d != dir) {
            let _ = super::pins::remove_links(&other);
        }
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Open { path: dir.clone(), source })?;
        for name in PROBES {
            let pin = dir.join(name);
            if let Some(link) = adopt_link(&pin) {
                self.probe_links.push(link);
                continue;
            }
            let prog = cgroup_prog(&mut self.programs.probes, name)?;
            let link = attach_cgroup(prog, name, &fd, cgroup)?;
            self.probe_links.push(pin_link(link, &pin)?);
        }
        Ok(())
    }

    /// Removes the pinned links of pods no enrollment claims (`claimed` holds the directories of
    /// those that did): pods removed while no agent ran. Returns how many were removed.
    pub fn remove_unclaimed_pods(&self, claimed: &std::collections::HashSet<PathBuf>) -> usize {
        let mut removed = 0;
        for dir in self.pins.pods() {
            if !claimed.contains(&dir) {
                match super::pins::remove_links(&dir) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(error = %e, "removing a departed pod's links"),
                }
            }
        }
        removed
    }

    /// The sk_lookup tables, for enrollment and the pods' address watches.
    pub fn steering(&self) -> Steering {
        self.steering.clone()
    }

    /// Kernel program ids, by name, for reporting.
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        let p = &self.programs;
        let mut out: Vec<(String, u32)> = p
            .cgroup
            .iter()
            .chain(&p.probes)
            .filter_map(|(name, prog)| Some((name.to_string(), prog.info().ok()?.id())))
            .collect();
        out.extend(p.sock_ops.info().ok().map(|i| (programs::SOCK_OPS.to_string(), i.id())));
        out.extend(p.sk_lookup.info().ok().map(|i| (programs::SK_LOOKUP.to_string(), i.id())));
        out.sort();
        out
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

impl Programs {
    /// Opens every program from its pin.
    fn open(pins: &PinRoot) -> Result<Self, DatapathError> {
        let from_pin = |name: &'static str| {
            move |source| DatapathError::Program { what: format!("opening pinned {name}"), source }
        };
        let cgroup_prog = |name: &'static str| -> Result<(&'static str, CgroupSockAddr), DatapathError> {
            let kind = match name {
                programs::CONNECT4 | programs::PROBE_CONNECT4 => CgroupSockAddrAttachType::Connect4,
                programs::CONNECT6 | programs::PROBE_CONNECT6 => CgroupSockAddrAttachType::Connect6,
                programs::GETPEERNAME4 => CgroupSockAddrAttachType::GetPeerName4,
                _ => CgroupSockAddrAttachType::GetPeerName6,
            };
            Ok((name, CgroupSockAddr::from_pin(pins.program(name), kind).map_err(from_pin(name))?))
        };
        Ok(Self {
            cgroup: CGROUP_SOCK_ADDR.into_iter().map(cgroup_prog).collect::<Result<_, _>>()?,
            probes: PROBES.into_iter().map(cgroup_prog).collect::<Result<_, _>>()?,
            sock_ops: SockOps::from_pin(pins.program(programs::SOCK_OPS))
                .map_err(from_pin(programs::SOCK_OPS))?,
            sk_lookup: SkLookup::from_pin(pins.program(programs::SK_LOOKUP))
                .map_err(from_pin(programs::SK_LOOKUP))?,
        })
    }
}

/// Makes the pinned program `name` the one this build loaded: kept when it is the same code
/// (same kernel tag), otherwise every pinned link of it is switched to the new program in place
/// (BPF_LINK_UPDATE: no moment without a program) and the new one pinned. Returns whether an
/// earlier agent's program was there.
fn settle(ebpf: &mut Ebpf, pins: &PinRoot, name: &'static str) -> Result<bool, DatapathError> {
    let path = pins.program(name);
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
    let prog_err = |what: &str| {
        let what = format!("{what} {name}");
        move |source| DatapathError::Program { what, source }
    };
    let fresh = prog.info().map_err(prog_err("reading"))?;
    let mut existed = false;
    if path.exists() {
        existed = true;
        match ProgramInfo::from_pin(&path) {
            Ok(pinned) if pinned.tag() == fresh.tag() => return Ok(true),
            Ok(_) => {
                let fd = prog.fd().map_err(prog_err("reading"))?;
                for link in pins.links_of(name) {
                    super::relink::update(&link, fd.as_fd())
                        .map_err(|source| DatapathError::Open { path: link.clone(), source })?;
                }
                tracing::info!(program = name, "pinned program replaced by this build's");
            }
            Err(e) => tracing::warn!(program = name, error = %e, "unreadable program pin replaced"),
        }
        std::fs::remove_file(&path).map_err(|source| DatapathError::Open { path: path.clone(), source })?;
    }
    prog.pin(&path).map_err(|e| DatapathError::Pin { what: format!("pinning {name}"), source: e })?;
    Ok(existed)
}

/// Drops this process's reference to a freshly loaded program (the pinned copy keeps running).
fn unload(prog: &mut aya::programs::Program) -> Result<(), ProgramError> {
    use aya::programs::Program;
    match prog {
        Program::CgroupSockAddr(p) => p.unload(),
        Program::SockOps(p) => p.unload(),
        Program::SkLookup(p) => p.unload(),
        _ => Ok(()),
    }
}

/// Opens a link an earlier agent pinned at `pin`, if there is a usable one (an unusable pin is
/// removed, so a fresh link takes its place).
fn adopt_link(pin: &Path) -> Option<PinnedLink> {
    if !pin.exists() {
        return None;
    }
    match PinnedLink::from_pin(pin) {
        Ok(link) => Some(link),
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "unusable link pin replaced");
            let _ = std::fs::remove_file(pin);
            None
        }
    }
}

fn link_id(link: &FdLink) -> u32 {
    link.info().map(|i| i.id()).unwrap_or(0)
}

fn pin_link(link: FdLink, pin: &Path) -> Result<PinnedLink, DatapathError> {
    link.pin(pin).map_err(|source| DatapathError::Pin { what: format!("pinning {}", pin.display()), source })
}

fn attach_cgroup(
    prog: &mut CgroupSockAddr,
    name: &str,
    fd: &std::fs::File,
    cgroup: &Path,
) -> Result<FdLink, DatapathError> {
    let id = prog
        .attach(fd.as_fd(), CgroupAttachMode::Single)
        .map_err(|source| attach_err(name, cgroup, source))?;
    let link = prog.take_link(id).map_err(|source| attach_err(name, cgroup, source))?;
    FdLink::try_from(link).map_err(|e| link_err(name, cgroup, e))
}

fn cgroup_prog<'a>(
    progs: &'a mut [(&'static str, CgroupSockAddr)],
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    progs.iter_mut().find(|(n, _)| *n == name).map(|(_, p)| p).ok_or(DatapathError::Missing(name))
}

fn open(path: &Path) -> Result<std::fs::File, DatapathError> {
    std::fs::File::open(path).map_err(|source| DatapathError::Open { path: path.to_owned(), source })
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
