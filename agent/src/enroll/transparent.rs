//! Transparent inbound: the agent's connection to the app inside a pod carries the client's real
//! address (and its port where it can), so the app's `getpeername()`, access log and allow lists
//! see the client rather than the proxy. No iptables, no tc or XDP: only what the kernel's own
//! socket options and policy routing offer.
//!
//! The agent's socket to the app is bound to the client's address with `IP_TRANSPARENT`, bound to
//! the loopback device and marked with [`MARK`]. Its SYN carries the mark, and with `net.ipv4.tcp_fwmark_accept = 1` the app's
//! accepted socket inherits it, so every reply the app sends (SYN-ACK included) carries it too. A
//! rule sends marked packets to table [`TABLE`], whose only route is `local default dev lo`: the
//! replies are delivered back to the agent's socket inside the pod and never leave it.
//!
//! What is added to a pod's netns, and removed when the last user is gone:
//! - `ip rule add priority 100 fwmark 0x46450000/0xffff0000 lookup 17989` (IPv4 and IPv6);
//! - `ip route add local 0.0.0.0/0 dev lo table 17989` and `ip -6 route add local ::/0 dev lo table 17989`;
//! - `net.ipv4.tcp_fwmark_accept = 1` (it also covers IPv6), set back to its old value after.
//!
//! Unmarked traffic is untouched: packets from outside carry no mark into the pod (a mark never
//! crosses a netns), and the app's own connections never carry ours.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, Mutex, Weak},
};

use super::{
    netlink::{MarkRule, Rtnl},
    netns::{NetnsError, PodNetns},
};

/// The mark on the agent's transparent sockets, and so on the app's replies to them.
pub const MARK: u32 = 0x4645_0000;
/// The bits of the mark the rule compares.
pub const MARK_MASK: u32 = 0xffff_0000;
/// The routing table holding `local default dev lo`.
pub const TABLE: u32 = 17989;
/// The rule's priority: ahead of `main` (32766) and of anything a CNI usually adds in a pod.
pub const PRIORITY: u32 = 100;

/// The sysctl that makes an accepted socket inherit its SYN's mark, read and written from the pod's
/// netns worker (`/proc/sys/net` is per network namespace of the calling thread).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// Why transparency could not be set up in a pod's netns.
#[derive(Debug, thiserror::Error)]
pub enum TransparencyError {
    /// The netns worker is gone.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// One step failed (what, and the kernel's answer).
    #[error("{0}")]
    Step(String, #[source] io::Error),
}

/// Transparency installed in one pod's netns; removed when the last holder drops it. The pod's
/// enrollment holds it, and so does every connection of the pod (through its context), so replies
/// of a connection relayed past an unenroll still come back to the agent.
pub struct Transparency {
    netns: PodNetns,
    /// The sysctl's value before we set it, when we changed it.
    restore: Option<String>,
    registry: Weak<Mutex<HashMap<u64, Weak<Transparency>>>>,
    /// Left installed when dropped: the next agent (a handoff's relays) depends on it.
    kept: std::sync::atomic::AtomicBool,
}

impl Transparency {
    /// Leaves the routing in place when the last holder drops it.
    pub fn keep(&self) {
        self.kept.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The netns that have transparency installed, so a pod re-enrolled while its old connections
/// still run shares the installation instead of racing its removal.
#[derive(Default)]
pub struct TransparencyRegistry(Arc<Mutex<HashMap<u64, Weak<Transparency>>>>);

impl TransparencyRegistry {
    /// Installs transparency in `netns` (or shares what is installed there already).
    pub fn install(&self, netns: &PodNetns) -> Result<Arc<Transparency>, TransparencyError> {
        let mut installed = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = installed.get(&netns.cookie()).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let restore = netns.run_blocking(install_here)??;
        let t = Arc::new(Transparency {
            netns: netns.clone(),
            restore,
            registry: Arc::downgrade(&self.0),
            kept: Default::default(),
        });
        installed.insert(netns.cookie(), Arc::downgrade(&t));
        Ok(t)
    }
}

impl Drop for Transparency {
    fn drop(&mut self) {
        // Under the registry's lock, so a concurrent install in the same netns waits for this
        // removal instead of having its fresh rules deleted under it. An install that already
        // replaced this entry (it saw it dead before this drop got the lock) owns the routing now:
        // then nothing is removed.
        let registry = self.registry.upgrade();
        let mut installed = registry.as_ref().map(|r| r.lock().unwrap_or_else(|p| p.into_inner()));
        let me: *const Transparency = self;
        let replaced = installed
            .as_ref()
            .is_some_and(|i| i.get(&self.netns.cookie()).is_some_and(|w| !std::ptr::eq(w.as_ptr(), me)));
        if replaced || self.kept.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let restore = self.restore.take();
        match self.netns.run_blocking(move || uninstall_here(restore.as_deref())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(netns = %self.netns.path().display(), error = %e,
                "removing transparent-inbound routing from a pod netns"),
            Err(e) => tracing::warn!(error = %e, "pod netns gone before transparent-inbound cleanup"),
        }
        if let Some(installed) = installed.as_mut() {
            installed.remove(&self.netns.cookie());
        }
    }
}

/// Removes Ferry's transparent-inbound routing from the netns at `path` if its cookie is one of
/// `ours` (the pods this installation enrolled), and takes that cookie out of `ours` (`ferry
/// uninstall`, after agents that left the routing for their successors). Another installation's
/// pods (another simulated node on the same host) keep theirs. The sysctl stays as it is: its value
/// before Ferry is no longer known.
pub fn remove_from(path: &std::path::Path, ours: &mut HashSet<u64>) -> Result<(), TransparencyError> {
    let netns = PodNetns::open(path, "ferry-uninstall".into())?;
    if !ours.remove(&netns.cookie()) {
        return Ok(());
    }
    netns
        .run_blocking(|| uninstall_here(None))?
        .map_err(|e| TransparencyError::Step("removing the routing".into(), e))
}

fn rules() -> [MarkRule; 2] {
    [false, true].map(|ipv6| MarkRule { ipv6, mark: MARK, mask: MARK_MASK, table: TABLE, priority: PRIORITY })
}

/// Runs on the netns worker: routes, rules, then the sysctl; undoes what it did on failure.
/// Returns the sysctl's old value when it changed it.
fn install_here() -> Result<Option<String>, TransparencyError> {
    let mut rtnl = Rtnl::open().map_err(|e| TransparencyError::Step("opening rtnetlink".into(), e))?;
    let done = (|| {
        for ipv6 in [false, true] {
            rtnl.add_local_default(ipv6, TABLE).map_err(|e| {
                let family = if ipv6 { "IPv6" } else { "IPv4" };
                TransparencyError::Step(format!("adding the {family} local route of table {TABLE}"), e)
            })?;
        }
        for rule in rules() {
            rtnl.add_rule(&rule).map_err(|e| {
                TransparencyError::Step(format!("adding the fwmark rule (ipv6: {})", rule.ipv6), e)
            })?;
        }
        let old = std::fs::read_to_string(FWMARK_ACCEPT)
            .map_err(|e| TransparencyError::Step(format!("reading {FWMARK_ACCEPT}"), e))?;
        let old = old.trim().to_owned();
        if old == "1" {
            return Ok(None);
        }
        std::fs::write(FWMARK_ACCEPT, "1")
            .map_err(|e| TransparencyError::Step(format!("writing {FWMARK_ACCEPT}"), e))?;
        Ok(Some(old))
    })();
    if done.is_err() {
        let _ = remove_routing(&mut rtnl);
    }
    done
}

/// Runs on the netns worker: removes the rules and routes, and restores the sysctl.
fn uninstall_here(restore: Option<&str>) -> io::Result<()> {
    let mut rtnl = Rtnl::open()?;
    let routing = remove_routing(&mut rtnl);
    if let Some(old) = restore {
        std::fs::write(FWMARK_ACCEPT, old)?;
    }
    routing
}

fn remove_routing(rtnl: &mut Rtnl) -> io::Result<()> {
    let mut first_error = None;
    for rule in rules() {
        if let Err(e) = rtnl.del_rule(&rule) {
            first_error.get_or_insert(e);
        }
    }
    for ipv6 in [false, true] {
        if let Err(e) = rtnl.del_local_default(ipv6, TABLE) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
