//! `ferry run`: load the programs, enroll the node's pods, proxy until told to stop, and leave
//! nothing behind in the kernel.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpf::{Datapath, loader::CaptureParams},
    config::MeshConfig,
    enroll::Enrollment,
    events::EventSink,
    proxy::{MeshState, ProxyPorts, ProxyShared, mtls::Mtls},
};

/// Options of `ferry run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The mesh file.
    pub config: PathBuf,
    /// Where to append JSON-lines events, if anywhere.
    pub events: Option<PathBuf>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // An invalid file stops us here, before anything touches the kernel.
    let config = MeshConfig::load(&opts.config).context("invalid mesh file")?;
    let events = EventSink::open(opts.events.as_deref())
        .with_context(|| format!("opening events file {:?}", opts.events))?;
    // Identities before the kernel: a bad CA directory must not leave half an agent behind.
    let mtls = match &config.ca {
        Some(ca) => Some(Mtls::start(ca, &config).context("setting up workload identities")?),
        None => {
            tracing::warn!("the mesh file names no CA: no identities, no mTLS, no inbound tunnel");
            None
        }
    };
    let capture = &config.capture;
    let params = CaptureParams {
        outbound_port: capture.outbound_port,
        inbound_port: capture.inbound_port,
        tunnel_port: capture.tunnel_port,
        exclude_ports: capture.exclude_ports.clone(),
        exclude_cidrs: capture.exclude_cidrs.iter().map(|n| (n.network(), n.prefix_len())).collect(),
    };
    let ports = ProxyPorts {
        outbound: capture.outbound_port,
        inbound: capture.inbound_port,
        tunnel: capture.tunnel_port,
    };
    let (datapath, orig_dst) = Datapath::load(&params).context("loading eBPF programs")?;
    let program_ids = datapath.program_ids();
    let datapath = Mutex::new(datapath);
    let local: Vec<_> = config.local_pods().cloned().collect();
    let shared = Arc::new(ProxyShared::new(orig_dst, events, ports, mtls, MeshState::new(config)));

    let mut enrolled: Vec<Enrollment> = Vec::new();
    for pod in &local {
        match Enrollment::enroll(pod, &datapath, shared.clone()).await {
            Ok(e) => {
                tracing::info!(pod = %e.key, "enrolled");
                shared.events.emit(json!({
                    "event": "enrolled", "pod": e.key, "cgroup": e.cgroup, "netns_cookie": e.netns_cookie(),
                    "links": e.link_ids().iter().map(|(p, id)| json!({"program": p, "id": id})).collect::<Vec<_>>(),
                }));
                enrolled.push(e);
            }
            Err(err) => {
                for e in enrolled {
                    e.unenroll(&datapath);
                }
                return Err(err).context("enrolling pods");
            }
        }
    }
    shared.events.emit(json!({
        "event": "ready", "pods": enrolled.len(),
        "programs": program_ids.iter().map(|(n, id)| json!({"name": n, "id": id})).collect::<Vec<_>>(),
    }));
    tracing::info!(pods = enrolled.len(), "ready");

    wait_for_shutdown().await?;
    tracing::info!("shutting down");
    for e in enrolled {
        e.unenroll(&datapath);
    }
    // Unloads the programs and closes the maps.
    drop(datapath);
    shared.events.emit(json!({ "event": "shutdown" }));
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
