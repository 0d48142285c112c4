//! The proxy's side of authorization: every path into a pod (plaintext inbound, each HBONE stream,
//! the node-local shortcut) asks the policy engine here before the app is dialled, records the
//! decision with the connection, and live connections are re-checked when policies change.

use std::net::{IpAddr, SocketAddr};

use super::{ProxyShared, conns::ConnMeta};
use crate::metrics::ConnLabels;
use crate::{
    identity::SpiffeId,
    policy::{Authorizer, Connection, Decision, Outcome, Peer, Reason, Verdict},
};

/// What a decision looks at, kept with the connection so it can be decided again.
#[derive(Debug, Clone)]
pub struct AuthzSubject {
    /// The destination workload, `namespace/name`.
    pub workload: String,
    /// The source address (the client's for plaintext, the tunnel peer's for HBONE).
    pub source_ip: Option<IpAddr>,
    /// The verified peer identity; `None` for plaintext.
    pub peer: Option<SpiffeId>,
    /// The original destination (the app's address and port).
    pub destination: SocketAddr,
    /// The connection may carry HTTP whose requests are each decided: the connection itself is
    /// denied only when no request could pass ([`Authorizer::decide_unread`]).
    pub http: bool,
}

impl AuthzSubject {
    fn decide(&self, authz: &Authorizer) -> Decision {
        if self.http {
            authz.decide_unread(&self.workload, &self.connection())
        } else {
            authz.decide(&self.workload, &self.connection())
        }
    }

    fn connection(&self) -> Connection<'_> {
        Connection {
            source_ip: self.source_ip,
            peer: self.peer.as_ref().map(Peer::from_spiffe),
            destination_ip: self.destination.ip().to_canonical(),
            destination_port: self.destination.port(),
        }
    }
}

/// One outcome with names resolved, for records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRecord {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The deciding policy, `namespace/name`.
    pub policy: Option<String>,
    /// The deciding rule's index.
    pub rule: Option<u32>,
}

/// The decision recorded with a connection (events, access log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRecord {
    /// What was enforced.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// The deciding policy, `namespace/name`.
    pub policy: Option<String>,
    /// The deciding rule's index.
    pub rule: Option<u32>,
    /// What the dry-run policies would have decided.
    pub dry_run: Option<OutcomeRecord>,
    /// The AUDIT policy that matched.
    pub audit: Option<String>,
}

fn outcome_record(authz: &Authorizer, o: &Outcome) -> OutcomeRecord {
    OutcomeRecord {
        verdict: o.verdict,
        policy: o.by.and_then(|r| authz.policy(r.policy)).map(|p| p.key()),
        rule: o.by.map(|r| r.rule),
    }
}

fn record(authz: &Authorizer, d: &Decision) -> AuthzRecord {
    let enforced = outcome_record(authz, &d.enforced);
    AuthzRecord {
        verdict: enforced.verdict,
        reason: d.enforced.reason,
        policy: enforced.policy,
        rule: enforced.rule,
        dry_run: d.dry_run.as_ref().map(|o| outcome_record(authz, o)),
        audit: d.audit.and_then(|r| authz.policy(r.policy)).map(|p| p.key()),
    }
}

/// The sentence a denial is recorded with.
pub fn denial_text(record: &AuthzRecord) -> String {
    match (record.reason, &record.policy) {
        (Reason::DenyMatched, Some(policy)) => {
            format!("denied by policy {policy} rule {}", record.rule.unwrap_or_default())
        }
        (Reason::NoAllowMatched, _) => "denied: no ALLOW policy matches".into(),
        (Reason::PolicyError, _) => "denied: the policy set failed to load, so everything is denied".into(),
        (Reason::UnknownWorkload, _) => {
            "denied: the destination is not a workload this node can place".into()
        }
        _ => "denied".into(),
    }
}

impl ProxyShared {
    /// Decides `subject` with the current policies and records the decision in `meta`. On a deny,
    /// counts it and returns the sentence the refusal is recorded with; the caller refuses the
    /// connection before the app is dialled.
    pub(super) fn authorize(&self, meta: &mut ConnMeta, subject: AuthzSubject) -> Result<(), String> {
        let state = self.state();
        let decision = subject.decide(&state.authz);
        let rec = record(&state.authz, &decision);
        log_side_effects(&rec, &subject);
        let denied = (!decision.allowed()).then(|| {
            self.metrics.denied(&meta.labels, rec.policy.as_deref().unwrap_or(""), rec.reason.as_str());
            denial_text(&rec)
        });
        meta.authz = Some(rec);
        meta.subject = Some(subject);
        match denied {
            Some(text) => Err(text),
            None => Ok(()),
        }
    }

    /// Whether the plain-TCP decision (HTTP fields unknown: an ALLOW needing them never matches)
    /// would let `subject` through. Records nothing.
    pub(super) fn allowed_as_tcp(&self, subject: &AuthzSubject) -> bool {
        self.state().authz.decide(&subject.workload, &subject.connection()).allowed()
    }

    /// Decides one HTTP request on the connection `subject` describes, counting a denial under
    /// `labels`; AUDIT and dry-run outcomes are logged as for connections.
    pub(super) fn authorize_request(
        &self,
        labels: &ConnLabels,
        subject: &AuthzSubject,
        request: &crate::policy::Request<'_>,
    ) -> AuthzRecord {
        let state = self.state();
        let decision = state.authz.decide_request(&subject.workload, &subject.connection(), request);
        let rec = record(&state.authz, &decision);
        log_side_effects(&rec, subject);
        if !decision.allowed() {
            self.metrics.denied(labels, rec.policy.as_deref().unwrap_or(""), rec.reason.as_str());
        }
        rec
    }

    /// Re-decides every live inbound connection with the current policies and closes the ones now
    /// denied, each with a close reason naming the policy; returns how many were closed.
    pub fn recheck_connections(&self) -> usize {
        let state = self.state();
        self.conns.close_where(|meta, subject| {
            let decision = subject.decide(&state.authz);
            if decision.allowed() {
                return None;
            }
            let rec = record(&state.authz, &decision);
            self.metrics.denied(&meta.labels, rec.policy.as_deref().unwrap_or(""), rec.reason.as_str());
            let text = format!("closed by policy change: {}", denial_text(&rec));
            tracing::info!(id = meta.id, pod = %meta.pod, src = %meta.src, reason = %text, "closing connection");
            Some((text, rec))
        })
    }
}

/// AUDIT matches and dry-run denials go to the log (they never change what happens).
fn log_side_effects(rec: &AuthzRecord, subject: &AuthzSubject) {
    if let Some(audit) = &rec.audit {
        tracing::info!(policy = %audit, workload = %subject.workload, src = ?subject.source_ip,
            peer = ?subject.peer.as_ref().map(|p| p.as_str()), "AUDIT policy matched");
    }
    if let Some(dry) = &rec.dry_run
        && dry.verdict != rec.verdict
    {
        tracing::info!(would = dry.verdict.as_str(), policy = ?dry.policy, workload = %subject.workload,
            src = ?subject.source_ip, peer = ?subject.peer.as_ref().map(|p| p.as_str()),
            "dry-run policies would decide otherwise");
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        admin::model::Direction,
        config::MeshConfig,
        events::EventSink,
        metrics::{BuildInfo, ConnLabels, Metrics, Reporter, SecurityPolicy},
        proxy::{MeshState, ProxyPorts, Sinks, orig_dst::OrigDst, relay::CloseReason},
    };

    const MESH: &str = "node = \"n\"\n[[pods]]\nname = \"echo\"\nnamespace = \"demo\"\nservice_account = \"echo\"\n\
                        node = \"m\"\nips = [\"10.1.0.2\"]\n";
    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-lan, namespace: demo}\n\
                        spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.9.0.0/16\"]\n";

    fn state(policies: &str) -> MeshState {
        let config = MeshConfig::parse(MESH).expect("mesh");
        MeshState::new(
            config,
            Ok(crate::policy::parse_file(Path::new("p.yaml"), policies).expect("policies")),
        )
    }

    fn meta() -> ConnMeta {
        ConnMeta {
            id: 7,
            direction: Direction::Inbound,
            pod: "demo/echo".into(),
            src: "10.9.0.1:40000".parse().expect("addr"),
            src_pod: None,
            original_dst: "10.1.0.2:8080".parse().expect("addr"),
            endpoint: None,
            endpoint_pod: None,
            service: None,
            source_identity: None,
            destination_identity: None,
            security: SecurityPolicy::None,
            labels: ConnLabels::unknown(Reporter::Destination),
            authz: None,
            subject: None,
            protocol: Default::default(),
        }
    }

    fn subject(src: &str) -> AuthzSubject {
        AuthzSubject {
            workload: "demo/echo".into(),
            source_ip: Some(src.parse().expect("ip")),
            peer: None,
            destination: "10.1.0.2:8080".parse().expect("addr"),
            http: false,
        }
    }

    fn shared(policies: &str) -> Arc<ProxyShared> {
        let metrics = Arc::new(Metrics::new(&BuildInfo::current()).expect("metrics"));
        let sink = || EventSink::open(None).expect("sink");
        let sinks = Sinks { events: sink(), access_log: sink(), metrics };
        let ports = ProxyPorts { outbound: 15001, inbound: 15006, tunnel: 15008 };
        Arc::new(ProxyShared::new(OrigDst::Netfilter, sinks, ports, None, state(policies)))
    }

    #[tokio::test]
    async fn a_policy_change_closes_what_it_now_denies_and_keeps_the_rest() {
        let shared = shared("");
        let mut allowed = meta();
        shared.authorize(&mut allowed, subject("10.9.0.1")).expect("no policy: allowed");
        assert_eq!(allowed.authz.as_ref().map(|a| a.verdict), Some(Verdict::Allow));
        let mut other = meta();
        other.id = 8;
        shared.authorize(&mut other, subject("10.8.0.1")).expect("allowed");

        let (mut app_side, mut down) = tokio::io::duplex(64);
        let (mut up, _peer) = tokio::io::duplex(64);
        let relayed = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let conn = shared.open_conn(allowed);
                let reason = conn.relay(&mut down, &mut up, conn.stats()).await;
                conn.close(&reason);
                reason
            })
        };
        let kept = shared.open_conn(other);
        app_side.write_all(b"x").await.expect("write");
        while shared.conns.len() < 2 {
            tokio::task::yield_now().await;
        }

        shared.set_state(state(DENY));
        assert_eq!(shared.recheck_connections(), 1, "only the 10.9/16 connection is denied now");
        let reason = relayed.await.expect("relay task");
        assert_eq!(
            reason,
            CloseReason::Closed("closed by policy change: denied by policy demo/deny-lan rule 0".into())
        );
        assert_eq!(shared.conns.len(), 1, "the other connection lives on");
        assert_eq!(shared.recheck_connections(), 0, "nothing else to close");
        kept.close(&CloseReason::Eof);
        let mut rest = Vec::new();
        let _ = app_side.read_to_end(&mut rest).await;

        let mut denied = meta();
        let err = shared.authorize(&mut denied, subject("10.9.3.3")).expect_err("denied now");
        assert_eq!(err, "denied by policy demo/deny-lan rule 0");
        let record = denied.record();
        assert_eq!(record["policy_decision"], "deny");
        assert_eq!(record["policy"], "demo/deny-lan");
        assert_eq!(record["policy_rule"], 0);
    }

    #[tokio::test]
    async fn a_set_that_failed_to_load_denies_and_says_why() {
        let shared = shared("");
        shared.set_state(MeshState::new(MeshConfig::parse(MESH).expect("mesh"), Err("bad file".into())));
        let err = shared.authorize(&mut meta(), subject("10.8.0.1")).expect_err("fail closed");
        assert!(err.contains("failed to load"), "{err}");
        let mut unknown = meta();
        shared.set_state(state(""));
        let mut s = subject("10.8.0.1");
        s.workload = "demo/nowhere".into();
        let err = shared.authorize(&mut unknown, s).expect_err("unknown workload");
        assert!(err.contains("not a workload this node can place"), "{err}");
    }
}
