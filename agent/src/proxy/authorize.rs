//! The proxy's side of authorization: every path into a pod (plaintext inbound, each HBONE stream,
//! the node-local shortcut) asks the policy engine here before the app is dialled, records the
//! decision with the connection, and live connections are re-checked when policies change.

use std::net::{IpAddr, SocketAddr};

use super::{ProxyShared, conns::ConnMeta};
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
}

impl AuthzSubject {
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
        let decision = state.authz.decide(&subject.workload, &subject.connection());
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

    /// Re-decides every live inbound connection with the current policies and closes the ones now
    /// denied, each with a close reason naming the policy; returns how many were closed.
    pub fn recheck_connections(&self) -> usize {
        let state = self.state();
        self.conns.close_where(|meta, subject| {
            let decision = state.authz.decide(&subject.workload, &subject.connection());
            if decision.allowed() {
                return None;
            }
            let rec = record(&state.authz, &decision);
            self.metrics.denied(&meta.labels, rec.policy.as_deref().unwrap_or(""), rec.reason.as_str());
            let text = format!("closed by policy change: {}", denial_text(&rec));
            tracing::info!(id = meta.id, pod = %meta.pod, src = %meta.src, reason = %text, "closing connection");
            Some(text)
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
