//! `ferry trace`: the agent's trace answer told as sentences.

use crate::admin::model::{ModeView, TraceView, Transport};

use super::render::labelled;

/// Explains what would happen to a connection from `t.pod` to `t.dest`, and why.
pub fn explain(t: &TraceView) -> String {
    let mut lines: Vec<(&str, String)> = Vec::new();
    // A source given as an identity or an address is traced from the destination's side only:
    // there is no capture to explain, and the connection does reach the destination.
    let pod_source = crate::admin::check_pod_key(&t.pod).is_ok();
    if !pod_source {
        lines.push(("Source", t.reason.clone()));
    } else if !t.captured {
        lines.push(("Captured", format!("no: {}", t.reason)));
        lines.push((
            "Result",
            format!("{} connects to {} directly; the proxy is not involved", t.pod, t.dest),
        ));
        return finish(t, lines);
    }
    if pod_source {
        let by = t.program.as_deref().map(|p| format!(" by {p}")).unwrap_or_default();
        lines.push(("Captured", format!("yes{by}: {}", t.reason)));
    }
    match &t.service {
        Some(s) => lines
            .push(("Service", format!("{} (VIP {}, forwarded to port {})", s.name, s.vip, s.target_port))),
        None => lines.push(("Service", format!("none: {} is not a service VIP", t.dest))),
    }
    if let Some(e) = &t.endpoint {
        let who = e.pod.as_deref().map(|p| format!("{p} at ")).unwrap_or_default();
        let node = e.node.as_deref().map(|n| format!(" on node {n}")).unwrap_or_default();
        lines.push(("Endpoint", format!("{who}{}{node}", e.address)));
    } else if t.service.is_some() {
        lines.push(("Endpoint", "none available: the connection would be refused".to_owned()));
    }
    let identity = |id: &Option<String>, missing: &str| id.clone().unwrap_or_else(|| missing.into());
    // A mesh pod without an identity means this node has no CA, not that the pod is outside.
    let in_mesh = t.endpoint.as_ref().is_some_and(|e| e.pod.is_some());
    let no_destination_id =
        if in_mesh { "(none: no CA on this node)" } else { "(none: destination outside the mesh)" };
    lines.push((
        "Identities",
        format!(
            "{} -> {}",
            identity(&t.source_identity, "(none: no CA on this node)"),
            identity(&t.destination_identity, no_destination_id)
        ),
    ));
    if let Some(transport) = t.transport {
        lines.push(("Transport", transport_text(transport, in_mesh).to_owned()));
    }
    if let Some(mode) = t.destination_mode {
        lines.push(("Destination mode", mode_text(mode).to_owned()));
    }
    if let Some(r) = &t.request {
        let normalized = if r.normalized_path == r.path {
            String::new()
        } else {
            format!(" (normalized {})", r.normalized_path)
        };
        lines.push(("Request", format!("{} {}{normalized}, host {}", r.method, r.path, r.host)));
    }
    match (&t.decision, &t.decision_reason, t.allowed) {
        (Some(_), Some(reason), _) => lines.push(("Decision", reason.clone())),
        (_, _, Some(false)) => lines.push(("Decision", "denied: the connection would be refused".to_owned())),
        (_, _, Some(true)) => lines.push(("Decision", "allowed".to_owned())),
        _ => {}
    }
    if let Some(dry) = &t.dry_run {
        let by = dry.policy.as_deref().map(|p| format!(" (by {p})")).unwrap_or_default();
        lines.push(("Dry-run", format!("would {}{by}", dry.decision)));
    }
    for p in &t.policies {
        let dry = if p.dry_run { ", dry-run" } else { "" };
        let verdict = if p.matched { "matches" } else { "no match" };
        lines.push(("Policy", format!("{} ({}{dry}): {verdict}: {}", p.policy, p.action, p.why)));
    }
    finish(t, lines)
}

fn finish(t: &TraceView, mut lines: Vec<(&str, String)>) -> String {
    for note in &t.notes {
        lines.push(("Note", note.clone()));
    }
    format!("{} -> {}\n{}", t.pod, t.dest, labelled(&lines))
}

fn transport_text(t: Transport, in_mesh: bool) -> &'static str {
    match t {
        Transport::Hbone => "HBONE: HTTP/2 CONNECT over mutual TLS to the endpoint's tunnel port",
        Transport::Plaintext if in_mesh => "plain TCP from the proxy (no CA on this node, so no mTLS)",
        Transport::Plaintext => "plain TCP from the proxy (the destination is outside the mesh)",
        Transport::Local => "node-local: spliced inside the agent, identities and policy still checked",
        Transport::Passthrough => "passthrough: the kernel connects directly, without the proxy",
    }
}

fn mode_text(m: ModeView) -> &'static str {
    match m {
        ModeView::Strict => "strict: only mTLS from the mesh is accepted",
        ModeView::Permissive => "permissive: mTLS from the mesh and plaintext from outside it",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::model::{TraceEndpointView, TraceServiceView};

    fn base() -> TraceView {
        TraceView {
            pod: "default/client".into(),
            dest: "10.96.0.10:80".parse().expect("addr"),
            captured: true,
            program: Some("ferry_connect4".into()),
            reason: "destination is not excluded".into(),
            service: Some(TraceServiceView {
                name: "default/web".into(),
                vip: "10.96.0.10:80".parse().expect("addr"),
                target_port: 8080,
            }),
            endpoint: Some(TraceEndpointView {
                pod: Some("default/web-1".into()),
                address: "10.0.1.7:8080".parse().expect("addr"),
                node: Some("node-b".into()),
            }),
            source_identity: Some("spiffe://td/ns/default/sa/client".into()),
            destination_identity: Some("spiffe://td/ns/default/sa/web".into()),
            transport: Some(Transport::Hbone),
            destination_mode: Some(ModeView::Strict),
            allowed: Some(true),
            decision: Some("allow".into()),
            policy: Some("default/allow-client".into()),
            rule: Some(0),
            decision_reason: Some("allowed by policy default/allow-client rule 0".into()),
            dry_run: None,
            request: None,
            policies: vec![],
            notes: vec!["picked by load".into()],
        }
    }

    #[test]
    fn an_l7_trace_shows_the_request_as_policy_saw_it() {
        let mut t = base();
        t.request = Some(crate::admin::model::TraceRequestView {
            method: "GET".into(),
            path: "/public/../admin".into(),
            normalized_path: "/admin".into(),
            host: "web.default".into(),
        });
        let text = explain(&t);
        let want = "Request:           GET /public/../admin (normalized /admin), host web.default\n";
        assert!(text.contains(want), "{text}");
    }

    #[test]
    fn captured_connection_names_each_decision() {
        let text = explain(&base());
        assert!(text.starts_with("default/client -> 10.96.0.10:80\n"), "{text}");
        for want in [
            "Captured:          yes by ferry_connect4: destination is not excluded",
            "Service:           default/web (VIP 10.96.0.10:80, forwarded to port 8080)",
            "Endpoint:          default/web-1 at 10.0.1.7:8080 on node node-b",
            "Identities:        spiffe://td/ns/default/sa/client -> spiffe://td/ns/default/sa/web",
            "Transport:         HBONE",
            "Destination mode:  strict",
            "Decision:          allowed by policy default/allow-client rule 0",
            "Note:              picked by load",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn an_address_or_identity_source_is_traced_at_the_destination() {
        let t = TraceView {
            pod: "192.0.2.7".into(),
            captured: false,
            program: None,
            reason: "the source is an address: a plaintext client".into(),
            service: None,
            source_identity: None,
            transport: Some(Transport::Plaintext),
            allowed: Some(false),
            decision: Some("deny".into()),
            decision_reason: Some("denied by policy demo/deny-lan rule 0".into()),
            ..base()
        };
        let text = explain(&t);
        assert!(!text.contains("Captured"), "{text}");
        assert!(text.contains("Source:            the source is an address"), "{text}");
        assert!(text.contains("Decision:          denied by policy demo/deny-lan rule 0"), "{text}");
    }

    #[test]
    fn uncaptured_connection_says_why_and_stops() {
        let t = TraceView { captured: false, reason: "port 22 is excluded".into(), ..base() };
        let text = explain(&t);
        assert!(text.contains("Captured:  no: port 22 is excluded"), "{text}");
        assert!(text.contains("connects to 10.96.0.10:80 directly"), "{text}");
        assert!(!text.contains("Service"), "{text}");
    }

    #[test]
    fn plaintext_to_a_mesh_pod_blames_the_missing_ca() {
        let no_ca = TraceView {
            source_identity: None,
            destination_identity: None,
            transport: Some(Transport::Plaintext),
            ..base()
        };
        let text = explain(&no_ca);
        assert!(text.contains("Identities:        (none: no CA on this node) -> (none: no CA on this node)"));
        assert!(text.contains("Transport:         plain TCP from the proxy (no CA on this node"), "{text}");
        let outside = TraceView {
            endpoint: Some(TraceEndpointView {
                pod: None,
                address: "192.0.2.1:80".parse().expect("addr"),
                node: None,
            }),
            ..no_ca
        };
        let text = explain(&outside);
        assert!(text.contains("-> (none: destination outside the mesh)"), "{text}");
        assert!(text.contains("(the destination is outside the mesh)"), "{text}");
    }

    #[test]
    fn service_without_endpoint_is_refused() {
        let t = TraceView {
            endpoint: None,
            allowed: None,
            decision: None,
            decision_reason: None,
            source_identity: None,
            ..base()
        };
        let text = explain(&t);
        assert!(text.contains("none available"), "{text}");
        assert!(text.contains("(none: no CA on this node) -> "), "{text}");
        assert!(!text.contains("Decision"), "{text}");
    }
}
