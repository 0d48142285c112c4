//! `GET /trace`: what would happen to a connection and why, told by the same code the proxy runs
//! (the capture rules, the routing table and the policy evaluator).

use std::net::{IpAddr, SocketAddr};

use crate::{
    admin::{
        StateError, TraceDest, TraceRequest, TraceSource,
        model::{
            ModeView, TraceDryRunView, TraceEndpointView, TraceRequestView, TraceServiceView, TraceView,
            Transport,
        },
    },
    config::{CaptureMode, MeshConfig, Mode, Pod},
    identity::SpiffeId,
    policy::{Connection, Peer, Reason, WorkloadRef},
    proxy::{
        MeshState,
        authorize::{AuthzRecord, denial_text},
        routes::Resolved,
    },
    reconcile::NodeState,
};

/// Who connects, as the destination will see it.
struct Caller {
    /// The verified identity, when the connection arrives over mTLS (or the node-local shortcut).
    identity: Option<SpiffeId>,
    /// The address the destination sees.
    source_ip: Option<IpAddr>,
}

/// Traces `src` to `dest`.
pub(super) fn trace(
    node: &NodeState,
    src: &TraceSource,
    dest: &TraceDest,
    request: Option<&TraceRequest>,
) -> Result<TraceView, StateError> {
    let state = node.shared.state();
    let config = &state.config;
    let dest = match dest {
        TraceDest::Address(a) => *a,
        TraceDest::Pod(key, port) => {
            let pod = find_pod(config, key)?;
            let ip =
                pod.ips().next().ok_or_else(|| StateError::NotFound(format!("pod {key} has no address")))?;
            SocketAddr::new(ip, *port)
        }
    };
    let label = match src {
        TraceSource::Pod(key) => key.clone(),
        TraceSource::Identity(id) => id.to_string(),
        TraceSource::Address(ip) => ip.to_string(),
    };
    let mut view = TraceView {
        pod: label,
        dest,
        captured: false,
        program: None,
        reason: String::new(),
        service: None,
        endpoint: None,
        source_identity: None,
        destination_identity: None,
        transport: None,
        destination_mode: None,
        allowed: None,
        decision: None,
        policy: None,
        rule: None,
        decision_reason: None,
        dry_run: None,
        request: None,
        policies: Vec::new(),
        notes: Vec::new(),
    };
    let (target, caller) = match src {
        TraceSource::Pod(key) => {
            let pod = find_pod(config, key)?;
            match from_pod(node, &state, pod, dest, &mut view) {
                Some(found) => found,
                None => return Ok(view),
            }
        }
        TraceSource::Identity(id) => {
            view.reason = "the source is given as an identity: only the destination's side is traced".into();
            view.source_identity = Some(id.to_string());
            view.transport = Some(Transport::Hbone);
            view.notes.push("the source address is unknown, so ipBlocks and source.ip match nothing".into());
            let Some(target) = resolve(&state, dest, &mut view) else { return Ok(view) };
            (target, Caller { identity: Some(id.clone()), source_ip: None })
        }
        TraceSource::Address(ip) => {
            view.reason =
                "the source is an address: a plaintext client, traced from the destination's side".into();
            view.transport = Some(Transport::Plaintext);
            let Some(target) = resolve(&state, dest, &mut view) else { return Ok(view) };
            (target, Caller { identity: None, source_ip: Some(ip.to_canonical()) })
        }
    };
    at_destination(node, &state, target, &caller, request, &mut view);
    Ok(view)
}

fn find_pod<'a>(config: &'a MeshConfig, key: &str) -> Result<&'a Pod, StateError> {
    config
        .pods
        .iter()
        .find(|p| p.key() == key)
        .ok_or_else(|| StateError::NotFound(format!("no pod {key} in the mesh file")))
}

/// The source side for a pod of the mesh: capture, routing and transport. `None` when the trace
/// ends there (not captured, no endpoint).
fn from_pod(
    node: &NodeState,
    state: &MeshState,
    pod: &Pod,
    dest: SocketAddr,
    view: &mut TraceView,
) -> Option<(SocketAddr, Caller)> {
    let shared = &node.shared;
    let config = &state.config;
    let mtls = shared.mtls.as_ref();
    let identity = mtls.and_then(|m| m.identity_of(pod).ok());
    view.source_identity = identity.as_ref().map(|i| i.to_string());
    let ip = dest.ip().to_canonical();
    let source_ip = pod.ips().find(|a| a.is_ipv4() == ip.is_ipv4()).or_else(|| pod.ips().next());
    if !pod.is_local(&config.node) {
        view.captured = true;
        view.reason = format!("pod {} runs on node {}: its agent captures it", pod.key(), pod.node);
    } else {
        let key = pod.key();
        let enrolled = node.with_enrolled_blocking(|e| e.contains_key(&key));
        let capture = &config.capture;
        let skip = if !enrolled {
            Some("the pod is not enrolled".to_owned())
        } else if ip.is_loopback() {
            Some("loopback is never captured".to_owned())
        } else if shared.ports.contains(dest.port()) {
            Some(format!("port {} is one of the proxy's own ports", dest.port()))
        } else if capture.exclude_ports.contains(&dest.port()) {
            Some(format!("port {} is excluded (capture.exclude_ports)", dest.port()))
        } else {
            capture.exclude_cidrs.iter().find(|n| n.contains(&ip)).map(|n| format!("{ip} is in excluded {n}"))
        };
        if let Some(reason) = skip {
            view.reason = reason;
            view.transport = Some(Transport::Passthrough);
            view.notes.push("the kernel connects the pod directly, without the proxy".into());
            return None;
        }
        view.captured = true;
        match capture.mode {
            CaptureMode::Ebpf => {
                let program = if dest.is_ipv4() { "ferry_connect4" } else { "ferry_connect6" };
                view.program = Some(program.to_owned());
                view.reason = "TCP to a non-loopback destination that is not excluded".into();
            }
            CaptureMode::Iptables => {
                view.reason = "TCP to a non-loopback destination, if the pod's iptables rules \
                               redirect it (capture mode iptables)"
                    .into();
            }
        }
    }
    let target = resolve(state, SocketAddr::new(ip, dest.port()), view)?;
    let dst_pod = config.pod_by_ip(target.ip());
    let both_local = pod.is_local(&config.node) && dst_pod.is_some_and(|d| d.is_local(&config.node));
    let transport = match (dst_pod, mtls) {
        (Some(_), Some(_)) if both_local && config.datapath.local_shortcut => Transport::Local,
        (Some(_), Some(_)) => Transport::Hbone,
        _ => Transport::Plaintext,
    };
    view.transport = Some(transport);
    // Over the tunnel or the shortcut the destination knows the pod's identity; plaintext has none.
    let identity = matches!(transport, Transport::Hbone | Transport::Local).then_some(identity).flatten();
    Some((target, Caller { identity, source_ip }))
}

/// The request's headers, normalized path and authority, as the HTTP layer would pass them to
/// policy; `None` (with a deny in the view) when the HTTP layer would refuse it with 400.
fn http_request(
    r: &TraceRequest,
    target: SocketAddr,
    normalization: crate::http::path::Normalization,
    view: &mut TraceView,
) -> Option<(http::HeaderMap, String, String)> {
    let mut headers = http::HeaderMap::new();
    for (name, value) in &r.headers {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value))
        {
            headers.append(name, value);
        }
    }
    let host = r.host.clone().unwrap_or_else(|| target.to_string());
    let path = match crate::http::path::normalize(&r.path, normalization) {
        Ok(path) => path,
        Err(e) => {
            view.allowed = Some(false);
            view.decision = Some("deny".into());
            view.decision_reason = Some(format!("refused with 400 before policy: {e}"));
            return None;
        }
    };
    view.request = Some(TraceRequestView {
        method: r.method.clone(),
        path: r.path.clone(),
        normalized_path: path.clone(),
        host: host.clone(),
    });
    Some((headers, path, host))
}

/// Resolves a service VIP to the endpoint a connection would reach; `None` (with the reason in the
/// view) when there is none.
fn resolve(state: &MeshState, dest: SocketAddr, view: &mut TraceView) -> Option<SocketAddr> {
    let dest = SocketAddr::new(dest.ip().to_canonical(), dest.port());
    match state.routes.resolve(dest) {
        Ok(Resolved::Service { route, pick }) => {
            view.service = Some(TraceServiceView {
                name: route.name.clone(),
                vip: dest,
                target_port: pick.target.port(),
            });
            view.notes
                .push("endpoint picked by power of two choices; a real connection may pick another".into());
            Some(pick.target)
        }
        Ok(Resolved::Direct(addr)) => Some(addr),
        Err(e) => {
            view.reason = e.to_string();
            view.allowed = Some(false);
            None
        }
    }
}

/// The destination's side: its mode, then the policy decision, with every policy explained.
fn at_destination(
    node: &NodeState,
    state: &MeshState,
    target: SocketAddr,
    caller: &Caller,
    request: Option<&TraceRequest>,
    view: &mut TraceView,
) {
    let config = &state.config;
    let Some(dst) = config.pod_by_ip(target.ip()) else {
        view.endpoint = Some(TraceEndpointView { pod: None, address: target, node: None });
        view.allowed = Some(true);
        view.notes.push("the destination is outside the mesh: no policy applies".into());
        return;
    };
    let key = dst.key();
    view.endpoint =
        Some(TraceEndpointView { pod: Some(key.clone()), address: target, node: Some(dst.node.clone()) });
    view.destination_mode = Some(ModeView::from(dst.mode));
    view.destination_identity =
        node.shared.mtls.as_ref().and_then(|m| m.identity_of(dst).ok()).map(|i| i.to_string());
    if !dst.is_local(&config.node) {
        view.notes.push(format!(
            "policy is enforced by node {}'s agent; this trace uses this node's copy of the policies",
            dst.node
        ));
    }
    let local = view.transport == Some(Transport::Local);
    if caller.identity.is_none() && !local && dst.mode == Mode::Strict {
        view.allowed = Some(false);
        view.decision = Some("deny".into());
        view.decision_reason =
            Some("plaintext refused: the destination is STRICT (before any policy)".into());
        if node.shared.mtls.is_none() {
            view.notes.push("this node has no CA, so its pods cannot use mTLS".into());
        }
        return;
    }
    let conn = Connection {
        source_ip: caller.source_ip,
        peer: caller.identity.as_ref().map(Peer::from_spiffe),
        destination_ip: target.ip().to_canonical(),
        destination_port: target.port(),
    };
    let authz = &state.authz;
    let workload = WorkloadRef { key: &key, namespace: &dst.namespace, labels: &dst.labels };
    let http = match request {
        None => None,
        Some(r) => match http_request(r, target, config.http.path_normalization, view) {
            Some(parts) => Some(parts),
            // The HTTP layer refuses the request (400) before policy.
            None => return,
        },
    };
    let protocol = config.declared_protocol(dst, target.port());
    let (decision, explained) = match &http {
        Some((headers, path, host)) => {
            if protocol == Some(crate::config::AppProtocol::Tcp) {
                view.notes.push(format!(
                    "port {} is declared tcp: its bytes are never read as HTTP, so the real decision is the                      connection's (trace without --method/--path to see it)",
                    target.port()
                ));
            }
            let method = request.map_or("GET", |r| r.method.as_str());
            let req = crate::policy::Request { method, host, path, headers };
            (authz.decide_request(&key, &conn, &req), authz.explain_request(workload, &conn, &req))
        }
        None => (authz.decide(&key, &conn), authz.explain(workload, &conn)),
    };
    if http.is_none() && protocol != Some(crate::config::AppProtocol::Tcp) {
        view.notes.push(
            "decided as plain TCP; if the connection is HTTP each request is decided instead (give              --method, --path, --host or --header)"
                .into(),
        );
    }
    let name = |r: Option<crate::policy::RuleRef>| r.and_then(|r| authz.policy(r.policy)).map(|p| p.key());
    let enforced = &decision.enforced;
    view.allowed = Some(decision.allowed());
    view.decision = Some(enforced.verdict.as_str().to_owned());
    view.policy = name(enforced.by);
    view.rule = enforced.by.map(|r| r.rule);
    view.decision_reason = Some(if decision.allowed() {
        match (&view.policy, enforced.reason) {
            (Some(p), _) => format!("allowed by policy {p} rule {}", view.rule.unwrap_or_default()),
            (None, Reason::NoAllowPolicies) => "allowed: no ALLOW policy selects the destination".into(),
            _ => "allowed".into(),
        }
    } else {
        denial_text(&AuthzRecord {
            verdict: enforced.verdict,
            reason: enforced.reason,
            policy: view.policy.clone(),
            rule: view.rule,
            dry_run: None,
            audit: None,
        })
    });
    view.dry_run = decision.dry_run.map(|o| TraceDryRunView {
        decision: o.verdict.as_str().to_owned(),
        policy: name(o.by),
        rule: o.by.map(|r| r.rule),
    });
    if let Some(audit) = name(decision.audit) {
        view.notes.push(format!("AUDIT policy {audit} matches: the connection would be logged"));
    }
    view.policies = explained;
    if let Some(error) = authz.failure() {
        view.notes.push(format!("the policies failed to load at start: {error}"));
    }
}
