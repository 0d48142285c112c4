//! Enrollment: putting one pod under the mesh, and taking it out again.
//!
//! Order matters. Listeners come first, then transparent inbound (the pod's reply routing), then
//! the sk_lookup table (every address the pod's netns has, and those it gains while enrolled),
//! then the program attachments, so capture never starts before there is something to capture to.
//! Unenrollment runs the other way.
//! With iptables capture there are no programs: the pod's REDIRECT rules already point at the
//! listeners, and the inbound one binds the wildcard address because REDIRECT rewrites the
//! destination to the pod's own address.

pub mod addresses;
pub mod discover;
pub mod netlink;
pub mod netns;
pub mod transparent;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use crate::{
    bpf::{Datapath, DatapathError, PodAttachment, PodListeners},
    config::{CaptureMode, Pod},
    proxy::{
        PodContext, ProxyShared, accept_loop, inbound, mtls::MtlsError, outbound, sockets::listen_in, tunnel,
    },
};
use addresses::{AddressWatch, Steered, WatchError};
use discover::{DiscoveryError, Host};
use netns::{NetnsError, PodNetns};

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The pod has no netns or cgroup path (it is not local to this node).
    #[error("pod {0} has no {1} path")]
    MissingPath(String, &'static str),
    /// The pod, given by UID, was not found on the node.
    #[error("pod {pod}: finding it on the node")]
    Discovery {
        /// "namespace/name".
        pod: String,
        /// The cause.
        source: DiscoveryError,
    },
    /// The netns could not be entered.
    #[error("pod {pod}")]
    Netns {
        /// "namespace/name".
        pod: String,
        /// The cause.
        source: NetnsError,
    },
    /// The cgroup directory is missing or unreadable.
    #[error("pod {pod}: reading its cgroup")]
    Cgroup {
        /// "namespace/name".
        pod: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An in-pod listener could not be opened.
    #[error("pod {pod}: listening on {addr} in its netns")]
    Listen {
        /// "namespace/name".
        pod: String,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The pod's identity is invalid.
    #[error("pod {0}")]
    Identity(String, #[source] MtlsError),
    /// No TLS configuration for the pod's identity.
    #[error("pod {0}: tunnel TLS")]
    Tls(String, #[source] crate::identity::StoreError),
    /// The pod's addresses could not be watched or steered.
    #[error("pod {pod}")]
    Addresses {
        /// "namespace/name".
        pod: String,
        /// The cause.
        source: WatchError,
    },
    /// Attaching programs or writing maps failed.
    #[error("pod {pod}")]
    Datapath {
        /// "namespace/name".
        pod: String,
        /// The cause.
        source: DatapathError,
    },
}

/// An enrolled pod. Call [`Enrollment::unenroll`] to take it out, or [`Enrollment::release`] to
/// leave its datapath for the next agent; dropping it closes the listeners and keeps the pins.
pub struct Enrollment {
    /// "namespace/name".
    pub key: String,
    /// The pod's cgroup directory, when the programs attach to it (eBPF capture).
    pub cgroup: Option<PathBuf>,
    /// The cgroup's id (its inode), as the kernel programs key per-pod counters (eBPF capture).
    pub cgroup_id: Option<u64>,
    attachment: Option<PodAttachment>,
    addresses: Option<AddressWatch>,
    tasks: Vec<JoinHandle<()>>,
    context: Arc<PodContext>,
    /// Duplicates of the pod's listeners, by bound address: what a handoff passes on.
    listeners: Vec<(SocketAddr, std::os::fd::OwnedFd)>,
}

impl Enrollment {
    /// Enrolls `pod`: in-pod listeners, then (with a `datapath`, that is eBPF capture) sk_lookup
    /// entries and cgroup and netns programs. A pod given by UID is first found on `host`.
    pub async fn enroll(
        pod: &Pod,
        datapath: Option<&Mutex<Datapath>>,
        shared: Arc<ProxyShared>,
        host: Option<&Host>,
        inherited: &crate::handoff::Inherited,
    ) -> Result<Self, EnrollError> {
        let key = pod.key();
        // A pod given by UID is found on the node now; one that is not running yet fails here and
        // is retried.
        let located = match (&pod.uid, &pod.netns) {
            (Some(uid), None) => {
                let ips: Vec<IpAddr> = pod.ips().collect();
                let discovery = |source| EnrollError::Discovery { pod: key.clone(), source };
                let host =
                    host.ok_or_else(|| discovery(DiscoveryError::NoCgroup2("/proc/self/mounts".into())))?;
                let found = host.locate(uid, &ips).map_err(discovery)?;
                Some(found)
            }
            _ => None,
        };
        let netns_path = match &located {
            Some(found) => found.netns.clone(),
            None => pod.netns.clone().ok_or_else(|| EnrollError::MissingPath(key.clone(), "netns"))?,
        };
        let cgroup = match (datapath, &located) {
            (Some(_), Some(found)) => Some(found.cgroup.clone()),
            (Some(_), None) => {
                Some(pod.cgroup.clone().ok_or_else(|| EnrollError::MissingPath(key.clone(), "cgroup"))?)
            }
            (None, _) => None,
        };
        let cgroup_id = match &cgroup {
            Some(dir) => Some(std::os::unix::fs::MetadataExt::ino(
                &std::fs::metadata(dir).map_err(|source| EnrollError::Cgroup { pod: key.clone(), source })?,
            )),
            None => None,
        };
        let netns = PodNetns::open(&netns_path, format!("netns-{}", pod.name))
            .map_err(|source| EnrollError::Netns { pod: key.clone(), source })?;
        let ports = shared.ports;
        let capture = shared.state().config.capture.mode;
        let (identity, tls) = match &shared.mtls {
            Some(mtls) => {
                let id = mtls.identity_of(pod).map_err(|e| EnrollError::Identity(key.clone(), e))?;
                let tls = mtls.store.server_config_for(&id).map_err(|e| EnrollError::Tls(key.clone(), e))?;
                (Some(id), Some(Arc::new(tls)))
            }
            // No certificate means no inbound TLS: the tunnel port is simply not opened.
            None => (None, None),
        };
        let ips: Vec<IpAddr> = pod.ips().collect();
        // The app sees each client's real address unless this pod's netns cannot support it;
        // then it sees the proxy on loopback, and `ferry workloads` says why.
        let (transparency, source_note) = match (capture, shared.state().config.capture.original_source) {
            (CaptureMode::Iptables, _) => {
                (None, Some("iptables capture: the app sees the proxy on loopback".into()))
            }
            (_, false) => {
                (None, Some("[capture] original_source = false: the app sees the proxy on loopback".into()))
            }
            (CaptureMode::Ebpf, true) => match shared.transparency.install(&netns) {
                Ok(t) => (Some(t), None),
                Err(e) => {
                    let why = format!("{:#}", anyhow::Error::new(e));
                    tracing::warn!(pod = %key, error = %why, "transparent inbound unavailable; the app sees the proxy on loopback");
                    (
                        None,
                        Some(format!(
                            "transparent inbound unavailable ({why}): the app sees the proxy on loopback"
                        )),
                    )
                }
            },
        };
        let context = Arc::new(PodContext {
            key: key.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            netns,
            identity,
            mode: pod.mode,
            ips: ips.clone(),
            transparency,
            source_note,
            shared,
        });
        let mut enrollment = Self {
            key: key.clone(),
            cgroup: cgroup.clone(),
            cgroup_id,
            attachment: None,
            addresses: None,
            tasks: Vec::new(),
            context: context.clone(),
            listeners: Vec::new(),
        };

        // Listeners the previous agent handed over are the same sockets (nothing in their accept
        // queues is lost); the rest are opened now.
        let handed = Mutex::new(inherited.take_pod(&key, context.netns.cookie()));
        let listen = |addr: SocketAddr| {
            let context = context.clone();
            let key = key.clone();
            let handed = handed.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
            async move {
                let err = |source| EnrollError::Listen { pod: key.clone(), addr, source };
                match handed {
                    Some(listener) => {
                        listener.set_nonblocking(true).map_err(err)?;
                        tokio::net::TcpListener::from_std(listener).map_err(err)
                    }
                    None => listen_in(&context.netns, addr).await.map_err(err),
                }
            }
        };
        let v4_loop = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6_loop = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let out4 = listen(SocketAddr::new(v4_loop, ports.outbound)).await?;
        let out6 = listen(SocketAddr::new(v6_loop, ports.outbound)).await?;
        // sk_lookup steers to a listener wherever it is bound; REDIRECT sends to the pod's address.
        let (in4_ip, in6_ip) = match capture {
            CaptureMode::Ebpf => (v4_loop, v6_loop),
            CaptureMode::Iptables => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        let in4 = listen(SocketAddr::new(in4_ip, ports.inbound)).await?;
        let in6 = listen(SocketAddr::new(in6_ip, ports.inbound)).await?;
        let mut tunnels = Vec::new();
        if tls.is_some() {
            for ip in &ips {
                tunnels.push((*ip, listen(SocketAddr::new(*ip, ports.tunnel)).await?));
            }
        }

        if let (Some(datapath), Some(cgroup)) = (datapath, &cgroup) {
            let steering = datapath.lock().unwrap_or_else(|p| p.into_inner()).steering();
            // SYNs for any address of the pod, listed or not, go to the listeners of its family.
            let tunnel_of = |v4: bool| tunnels.iter().find(|(ip, _)| ip.is_ipv4() == v4).map(|(_, l)| l);
            let listeners =
                PodListeners::of(context.netns.cookie(), (&in4, &in6), (tunnel_of(true), tunnel_of(false)))
                    .map_err(|source| EnrollError::Listen {
                    pod: key.clone(),
                    addr: SocketAddr::new(in4_ip, ports.inbound),
                    source,
                })?;
            let watch = AddressWatch::start(&context.netns, steering, listeners, key.clone())
                .await
                .map_err(|source| EnrollError::Addresses { pod: key.clone(), source })?;
            // Dropping the watch (on the error path) unsteers what it steered.
            enrollment.addresses = Some(watch);
            let mut dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
            let cgroup_id = cgroup_id.unwrap_or_default();
            match dp.attach_pod(cgroup, &netns_path, cgroup_id, context.netns.cookie()) {
                Ok(attachment) => enrollment.attachment = Some(attachment),
                Err(source) => return Err(EnrollError::Datapath { pod: key.clone(), source }),
            }
        }
        let dup = |l: &tokio::net::TcpListener| -> Option<(SocketAddr, std::os::fd::OwnedFd)> {
            Some((l.local_addr().ok()?, std::os::fd::AsFd::as_fd(l).try_clone_to_owned().ok()?))
        };
        enrollment.listeners = [&out4, &out6, &in4, &in6]
            .into_iter()
            .chain(tunnels.iter().map(|(_, l)| l))
            .filter_map(dup)
            .collect();
        for listener in [out4, out6] {
            enrollment.tasks.push(tokio::spawn(accept_loop(listener, context.clone(), outbound::handle)));
        }
        for listener in [in4, in6] {
            enrollment.tasks.push(tokio::spawn(accept_loop(listener, context.clone(), inbound::handle)));
        }
        if let Some(tls) = tls {
            for (_, listener) in tunnels {
                let tls = tls.clone();
                let handle = move |tcp, peer, pod| tunnel::handle(tcp, peer, pod, tls.clone());
                enrollment.tasks.push(tokio::spawn(accept_loop(listener, context.clone(), handle)));
            }
        }
        context.shared.register_pod(&context);
        Ok(enrollment)
    }

    /// (program, link id) pairs of this pod's attachments.
    pub fn link_ids(&self) -> Vec<(&'static str, u32)> {
        self.attachment.as_ref().map(|a| a.link_ids()).unwrap_or_default()
    }

    /// The addresses steered to the pod right now (listed or not), and any left unsteered.
    pub fn steered(&self) -> Steered {
        self.addresses.as_ref().map(AddressWatch::steered).unwrap_or_default()
    }

    /// Whether the pod's app sees its clients' real addresses; otherwise why not.
    pub fn source_note(&self) -> Option<&str> {
        self.context.source_note.as_deref()
    }

    /// The pod's netns file (given, or found from its UID).
    pub fn netns_path(&self) -> &std::path::Path {
        self.context.netns.path()
    }

    /// The pod's netns cookie.
    pub fn netns_cookie(&self) -> u64 {
        self.context.netns.cookie()
    }

    /// Duplicates of the pod's listeners with their bound addresses, for the next agent.
    pub fn listener_fds(&self) -> Vec<(SocketAddr, std::os::fd::OwnedFd)> {
        self.listeners.iter().filter_map(|(a, fd)| Some((*a, fd.try_clone().ok()?))).collect()
    }

    /// Where this pod's links are pinned (eBPF capture).
    pub fn pin_dir(&self) -> Option<PathBuf> {
        self.attachment.as_ref().map(|a| a.dir().to_owned())
    }

    /// How many of the pod's links an earlier agent had pinned and this one adopted.
    pub fn adopted_links(&self) -> usize {
        self.attachment.as_ref().map_or(0, PodAttachment::adopted)
    }

    /// Detaches the programs, stops steering the pod's addresses and closes the listeners.
    /// Connections already being relayed run to completion on their own tasks (and keep the pod's
    /// transparent-inbound routing until the last of them ends).
    pub fn unenroll(mut self) {
        if let Some(attachment) = self.attachment.take() {
            attachment.detach();
        }
        self.addresses = None;
    }

    /// Stops serving the pod but leaves its datapath in the kernel: programs attached, its
    /// addresses in the tables, its transparent-inbound routing. The agent is stopping or handing
    /// over; until the next agent serves the pod, it fails closed.
    pub fn release(mut self) {
        self.attachment = None;
        if let Some(addresses) = self.addresses.take() {
            addresses.release();
        }
        if let Some(t) = &self.context.transparency {
            t.keep();
        }
    }
}

impl Drop for Enrollment {
    fn drop(&mut self) {
        self.context.shared.unregister_pod(&self.context);
        // Aborting the accept loops drops the listeners, closing them in the pod's netns.
        for task in &self.tasks {
            task.abort();
        }
    }
}
