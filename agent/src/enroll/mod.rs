//! Enrollment: putting one pod under the mesh, and taking it out again.
//!
//! Order matters. Listeners come first, then the sk_lookup table, then the program attachments, so
//! capture never starts before there is something to capture to. Unenrollment runs the other way.
//! With iptables capture there are no programs: the pod's REDIRECT rules already point at the
//! listeners, and the inbound one binds the wildcard address because REDIRECT rewrites the
//! destination to the pod's own address.

pub mod netns;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use crate::{
    bpf::{Datapath, DatapathError, PodAttachment},
    config::{CaptureMode, Pod},
    proxy::{
        PodContext, ProxyShared, accept_loop, inbound, mtls::MtlsError, outbound, sockets::listen_in, tunnel,
    },
};
use netns::{NetnsError, PodNetns};

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The pod has no netns or cgroup path (it is not local to this node).
    #[error("pod {0} has no {1} path")]
    MissingPath(String, &'static str),
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
    /// Attaching programs or writing maps failed.
    #[error("pod {pod}")]
    Datapath {
        /// "namespace/name".
        pod: String,
        /// The cause.
        source: DatapathError,
    },
}

/// An enrolled pod. Call [`Enrollment::unenroll`] to take it out cleanly; dropping it also detaches
/// the programs and closes the listeners.
pub struct Enrollment {
    /// "namespace/name".
    pub key: String,
    /// The pod's cgroup directory, when the programs attach to it (eBPF capture).
    pub cgroup: Option<PathBuf>,
    /// The cgroup's id (its inode), as the kernel programs key per-pod counters (eBPF capture).
    pub cgroup_id: Option<u64>,
    attachment: Option<PodAttachment>,
    inbound_ips: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
    context: Arc<PodContext>,
}

impl Enrollment {
    /// Enrolls `pod`: in-pod listeners, then (with a `datapath`, that is eBPF capture) sk_lookup
    /// entries and cgroup and netns programs.
    pub async fn enroll(
        pod: &Pod,
        datapath: Option<&Mutex<Datapath>>,
        shared: Arc<ProxyShared>,
    ) -> Result<Self, EnrollError> {
        let key = pod.key();
        let netns_path = pod.netns.clone().ok_or_else(|| EnrollError::MissingPath(key.clone(), "netns"))?;
        let cgroup = match datapath {
            Some(_) => {
                Some(pod.cgroup.clone().ok_or_else(|| EnrollError::MissingPath(key.clone(), "cgroup"))?)
            }
            None => None,
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
        let context = Arc::new(PodContext {
            key: key.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            netns,
            identity,
            mode: pod.mode,
            ips: ips.clone(),
            shared,
        });
        let mut enrollment = Self {
            key: key.clone(),
            cgroup: cgroup.clone(),
            cgroup_id,
            attachment: None,
            inbound_ips: Vec::new(),
            tasks: Vec::new(),
            context: context.clone(),
        };

        let listen = |addr: SocketAddr| {
            let context = context.clone();
            let key = key.clone();
            async move {
                listen_in(&context.netns, addr).await.map_err(|source| EnrollError::Listen {
                    pod: key,
                    addr,
                    source,
                })
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
                tunnels.push(listen(SocketAddr::new(*ip, ports.tunnel)).await?);
            }
        }

        if let (Some(datapath), Some(cgroup)) = (datapath, &cgroup) {
            let mut dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
            let attached = (|| {
                for ip in pod.ips() {
                    let listener = if ip.is_ipv4() { &in4 } else { &in6 };
                    dp.set_inbound_listener(ip, listener)?;
                    enrollment.inbound_ips.push(ip);
                }
                dp.attach_pod(cgroup, &netns_path)
            })();
            match attached {
                Ok(attachment) => enrollment.attachment = Some(attachment),
                Err(source) => {
                    // Leave nothing behind for a pod that did not make it.
                    for ip in enrollment.inbound_ips.drain(..) {
                        dp.remove_inbound_listener(ip);
                    }
                    return Err(EnrollError::Datapath { pod: key.clone(), source });
                }
            }
        }
        for listener in [out4, out6] {
            enrollment.tasks.push(tokio::spawn(accept_loop(listener, context.clone(), outbound::handle)));
        }
        for listener in [in4, in6] {
            enrollment.tasks.push(tokio::spawn(accept_loop(listener, context.clone(), inbound::handle)));
        }
        if let Some(tls) = tls {
            for listener in tunnels {
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

    /// The pod's addresses registered for inbound steering.
    pub fn inbound_ips(&self) -> &[IpAddr] {
        &self.inbound_ips
    }

    /// The pod's netns cookie.
    pub fn netns_cookie(&self) -> u64 {
        self.context.netns.cookie()
    }

    /// Detaches the programs, removes the sk_lookup entries and closes the listeners. Connections
    /// already being relayed run to completion on their own tasks.
    pub fn unenroll(mut self, datapath: Option<&Mutex<Datapath>>) {
        self.attachment = None;
        let Some(datapath) = datapath else { return };
        let mut dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
        for ip in self.inbound_ips.drain(..) {
            dp.remove_inbound_listener(ip);
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
