//! Authorization policy: Istio's `AuthorizationPolicy`, read unchanged from YAML, compiled into
//! rules and evaluated for every connection a pod receives. A pure engine with no I/O beyond reading
//! its source files: the proxy asks it at every inbound point, and `ferry trace` asks the same
//! evaluator, so what trace says is what the proxy does.
//!
//! - `model`: the YAML shape, with unknown fields refused;
//! - `compile`: Istio's validation and the lowering into [`Policy`] rules;
//! - `load`: files and directories, multi-document YAML, `List`s;
//! - `matcher`: Istio's string forms, IP blocks and ports;
//! - `eval`: the per-workload index, [`Authorizer::decide`] and [`Authorizer::explain`].
//!
//! Decision order (Istio's): a matching DENY denies; otherwise, when no ALLOW policy selects the
//! workload, allow; otherwise a matching ALLOW allows and anything else is denied. AUDIT is logged
//! and never decides; a policy annotated `istio.io/dry-run: "true"` is evaluated and logged but
//! does not change the decision.

mod compile;
mod error;
mod eval;
mod load;
mod matcher;
mod model;

pub use compile::{Action, DRY_RUN_ANNOTATION, Policy, Rule};
pub use error::PolicyError;
pub use eval::{
    Authorizer, Connection, Considered, Decision, Enforcement, Outcome, Peer, Reason, Request, RuleRef,
    Verdict, WorkloadRef,
};
pub use load::{Origin, Snapshot, compile_snapshot, parse_file, snapshot};
pub use matcher::{PathMatch, StrMatch};

/// The mesh-wide root namespace when the mesh file names none.
pub const DEFAULT_ROOT_NAMESPACE: &str = "ferry-system";

#[cfg(test)]
mod tests;
