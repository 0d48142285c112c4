//! Every address of an enrolled pod is steered: the ones in the config, and any other address the
//! pod's netns has or gains while enrolled (a secondary IP, one a CNI adds later). The watch dumps
//! the netns's addresses once, before the programs attach, then follows rtnetlink's address
//! notifications. An address it has not registered yet is not a bypass: sk_lookup drops SYNs for
//! addresses it has no listener for, and the client's retransmit finds the new entry.

use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::{io::unix::AsyncFd, task::JoinHandle};

use super::{
    netlink::{AddrEvent, AddrEvents, Rtnl},
    netns::{NetnsError, PodNetns},
};
use crate::bpf::{PodListeners, SteerError, Steering};

/// Why the watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The netns worker is gone.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Subscribing to or dumping the addresses failed.
    #[error("{0}")]
    Netlink(&'static str, #[source] io::Error),
    /// An address could not be steered.
    #[error("steering the pod's addresses")]
    Steer(#[source] SteerError),
}

/// What the watch steers right now, and what it could not.
#[derive(Clone, Debug, Default)]
pub struct Steered {
    /// Addresses whose SYNs reach the pod's listeners.
    pub ips: BTreeSet<IpAddr>,
    /// Addresses left unsteered, with why (another pod has the same address).
    pub refused: Vec<(IpAddr, String)>,
}

/// A running watch; dropping it stops the watch and unsteers every address it steered.
pub struct AddressWatch {
    task: Option<JoinHandle<()>>,
    state: Arc<Mutex<Steered>>,
    steering: Steering,
    netns_cookie: u64,
}

/// Addresses that can carry a pod's inbound traffic: not loopback (never steered) and not multicast.
fn steerable(ip: IpAddr) -> bool {
    !ip.is_loopback() && !ip.is_multicast() && !ip.is_unspecified()
}

impl AddressWatch {
    /// Steers every current address of `netns` to `listeners`, then keeps following changes. Fails
    /// only when the netns cannot be read or the kernel refuses a map update.
    pub async fn start(
        netns: &PodNetns,
        steering: Steering,
        listeners: PodListeners,
        pod: String,
    ) -> Result<Self, WatchError> {
        // Subscribed before the dump, so nothing added in between is missed.
        let events = netns
            .run(AddrEvents::subscribe)
            .await?
            .map_err(|e| WatchError::Netlink("subscribing to address changes", e))?;
        let current = dump(netns).await?;
        let state = Arc::new(Mutex::new(Steered::default()));
        let mut watch = Self {
            task: None,
            state: state.clone(),
            steering: steering.clone(),
            netns_cookie: listeners.netns_cookie,
        };
        for ip in current {
            add(&steering, &listeners, &state, &pod, ip).map_err(WatchError::Steer)?;
        }
        // SAFETY: `AddrEvents` owns the socket whose fd it exposes, for as long as the AsyncFd holds it.
        let events = unsafe { AsyncFd::register(events) }
            .map_err(|e| WatchError::Netlink("polling address changes", e.into()))?;
        let netns = netns.clone();
        watch.task = Some(tokio::spawn(async move {
            if let Err(e) = follow(events, &netns, &steering, &listeners, &state, &pod).await {
                tracing::warn!(%pod, error = %e, "address watch stopped; addresses added from now on are dropped, not steered");
            }
        }));
        Ok(watch)
    }

    /// What is steered now.
    pub fn steered(&self) -> Steered {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl AddressWatch {
    /// Stops watching but leaves every address in the tables (for the next agent).
    pub fn release(self) {
        std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Drop for AddressWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        let state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()));
        for ip in state.ips {
            self.steering.remove(ip, self.netns_cookie);
        }
    }
}

async fn dump(netns: &PodNetns) -> Result<BTreeSet<IpAddr>, WatchError> {
    let all = netns
        .run(|| Rtnl::open().and_then(|mut r| r.addresses()))
        .await?
        .map_err(|e| WatchError::Netlink("listing the pod's addresses", e))?;
    Ok(all.into_iter().map(|(_, ip)| ip).filter(|ip| steerable(*ip)).collect())
}

/// Steers `ip`; another pod's address is reported, not taken.
fn add(
    steering: &Steering,
    listeners: &PodListeners,
    state: &Mutex<Steered>,
    pod: &str,
    ip: IpAddr,
) -> Result<(), SteerError> {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    if state.ips.contains(&ip) {
        return Ok(());
    }
    match steering.add(ip, listeners) {
        Ok(()) => {
            state.ips.insert(ip);
            state.refused.retain(|(r, _)| *r != ip);
            tracing::info!(%pod, %ip, "steering pod address");
            Ok(())
        }
        Err(e @ SteerError::Taken { .. }) => {
            tracing::warn!(%pod, %ip, error = %e, "pod address not steered");
            if !state.refused.iter().any(|(r, _)| *r == ip) {
                state.refused.push((ip, e.to_string()));
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn remove(steering: &Steering, cookie: u64, state: &Mutex<Steered>, pod: &str, ip: IpAddr) {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.refused.retain(|(r, _)| *r != ip);
    if state.ips.remove(&ip) {
        steering.remove(ip, cookie);
        tracing::info!(%pod, %ip, "pod address gone; no longer steered");
    }
}

async fn follow(
    events: AsyncFd<AddrEvents>,
    netns: &PodNetns,
    steering: &Steering,
    listeners: &PodListeners,
    state: &Mutex<Steered>,
    pod: &str,
) -> Result<(), WatchError> {
    let cookie = listeners.netns_cookie;
    loop {
        let mut ready =
            events.readable().await.map_err(|e| WatchError::Netlink("polling address changes", e))?;
        let batch = match ready.try_io(|fd| fd.get_ref().read()) {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => return Err(WatchError::Netlink("reading address changes", e)),
            Err(_would_block) => continue,
        };
        for event in batch {
            match event {
                AddrEvent::Added(_, ip) if steerable(ip) => {
                    add(steering, listeners, state, pod, ip).map_err(WatchError::Steer)?;
                }
                AddrEvent::Removed(_, ip) => remove(steering, cookie, state, pod, ip),
                AddrEvent::Added(..) => {}
                AddrEvent::Overrun => {
                    // Notifications were lost: make the tables match a fresh dump.
                    let now = dump(netns).await?;
                    let gone: Vec<IpAddr> = {
                        let s = state.lock().unwrap_or_else(|p| p.into_inner());
                        s.ips.difference(&now).copied().collect()
                    };
                    for ip in gone {
                        remove(steering, cookie, state, pod, ip);
                    }
                    for ip in now {
                        add(steering, listeners, state, pod, ip).map_err(WatchError::Steer)?;
                    }
                }
            }
        }
    }
}
