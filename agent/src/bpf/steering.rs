//! The sk_lookup tables: which in-pod listener takes a SYN for each address of an enrolled pod's
//! netns. Shared by enrollment and every pod's address watch, and the one place that knows which
//! pod owns which address, so one pod never takes over another's.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use ferry_common::PodAddr;

use super::{DatapathError, pod_addr};

/// The listeners one pod's addresses are steered to: duplicates of the listening sockets, so an
/// address added late can never be pointed at an fd number that was closed and reused.
#[derive(Debug)]
pub struct PodListeners {
    /// The pod's netns cookie: who owns an address.
    pub netns_cookie: u64,
    /// Inbound plaintext listeners (IPv4, IPv6).
    inbound: (OwnedFd, OwnedFd),
    /// HBONE listeners (IPv4, IPv6), when the node has a certificate for the pod.
    tunnel: (Option<OwnedFd>, Option<OwnedFd>),
}

/// Why an address was not steered.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// Another enrolled pod already has this address.
    #[error("{ip} is already steered to another pod")]
    Taken {
        /// The address.
        ip: IpAddr,
    },
    /// The kernel refused the map update.
    #[error(transparent)]
    Map(#[from] DatapathError),
}

/// Handle to the tables; cheap to clone.
#[derive(Clone)]
pub struct Steering(Arc<Mutex<Tables>>);

struct Tables {
    inbound: SockHash<MapData, PodAddr>,
    tunnel: SockHash<MapData, PodAddr>,
    /// Every steered address, for the probe programs.
    pod_addrs: BpfHashMap<MapData, PodAddr, u8>,
    owners: HashMap<IpAddr, u64>,
}

impl Steering {
    pub(super) fn new(
        inbound: SockHash<MapData, PodAddr>,
        tunnel: SockHash<MapData, PodAddr>,
        pod_addrs: BpfHashMap<MapData, PodAddr, u8>,
    ) -> Self {
        Self(Arc::new(Mutex::new(Tables { inbound, tunnel, pod_addrs, owners: HashMap::new() })))
    }

    /// Steers SYNs for `ip` to `pod`'s listeners of the address's family.
    pub fn add(&self, ip: IpAddr, pod: &PodListeners) -> Result<(), SteerError> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.owners.get(&ip).is_some_and(|owner| *owner != pod.netns_cookie) {
            return Err(SteerError::Taken { ip });
        }
        let key = pod_addr(ip);
        let (inbound, tunnel) = if ip.is_ipv4() {
            (pod.inbound.0.as_raw_fd(), pod.tunnel.0.as_ref().map(AsRawFd::as_raw_fd))
        } else {
            (pod.inbound.1.as_raw_fd(), pod.tunnel.1.as_ref().map(AsRawFd::as_raw_fd))
        };
        let map_err = |what: &str| {
            let what = format!("{what} for {ip}");
            move |source| DatapathError::Map { what, source }
        };
        t.inbound.insert(key, inbound, 0).map_err(map_err("registering the inbound listener"))?;
        if let Some(tunnel) = tunnel
            && let Err(e) = t.tunnel.insert(key, tunnel, 0)
        {
            let _ = t.inbound.remove(&key);
            return Err(map_err("registering the tunnel listener")(e).into());
        }
        // Only probes need it: a failure costs the node's probes to this address, nothing else.
        let _ = t.pod_addrs.insert(key, 1, 0);
        t.owners.insert(ip, pod.netns_cookie);
        Ok(())
    }

    /// Stops steering `ip`, if `netns_cookie` owns it.
    pub fn remove(&self, ip: IpAddr, netns_cookie: u64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.owners.get(&ip) != Some(&netns_cookie) {
            return;
        }
        t.owners.remove(&ip);
        let key = pod_addr(ip);
        let _ = t.inbound.remove(&key);
        let _ = t.tunnel.remove(&key);
        let _ = t.pod_addrs.remove(&key);
    }
}

impl Steering {
    /// Removes the probe table's addresses no pod owns now: those of pods that left while no
    /// agent ran (their listener entries went with their sockets).
    pub fn prune_unowned(&self) -> usize {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let owned: Vec<PodAddr> = t.owners.keys().map(|ip| pod_addr(*ip)).collect();
        let stale: Vec<PodAddr> = t.pod_addrs.keys().flatten().filter(|k| !owned.contains(k)).collect();
        for key in &stale {
            let _ = t.pod_addrs.remove(key);
        }
        stale.len()
    }
}

impl PodListeners {
    /// Duplicates the pod's listening sockets (inbound IPv4 and IPv6, tunnel IPv4 and IPv6).
    pub fn of(
        netns_cookie: u64,
        inbound: (&impl AsFd, &impl AsFd),
        tunnel: (Option<&impl AsFd>, Option<&impl AsFd>),
    ) -> std::io::Result<Self> {
        let dup = |fd: &dyn AsFd| fd.as_fd().try_clone_to_owned();
        Ok(Self {
            netns_cookie,
            inbound: (dup(inbound.0)?, dup(inbound.1)?),
            tunnel: (tunnel.0.map(|t| dup(t)).transpose()?, tunnel.1.map(|t| dup(t)).transpose()?),
        })
    }
}
