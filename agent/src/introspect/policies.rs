//! `GET /policies`: every loaded policy, the pods it selects and how each rule is enforced.

use crate::{
    admin::{
        StateError,
        model::{PolicyRuleView, PolicyView},
    },
    policy::Authorizer,
};

/// The views of every policy in `authz`; an error when the policies failed to load at start.
pub(super) fn views(authz: &Authorizer) -> Result<Vec<PolicyView>, StateError> {
    if let Some(error) = authz.failure() {
        return Err(StateError::Failed(format!(
            "the policies failed to load at start, so every inbound connection is denied: {error}"
        )));
    }
    Ok(authz
        .policies()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let i = i as u32;
            let source =
                authz.origin(i).map(|o| format!("{}#{}", o.file.display(), o.document)).unwrap_or_default();
            PolicyView {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                action: p.action.as_str().to_owned(),
                dry_run: p.dry_run,
                source,
                selector: p.selector.clone(),
                workloads: authz.selected_workloads(i).into_iter().map(str::to_owned).collect(),
                rules: p
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(r, rule)| PolicyRuleView {
                        index: r as u32,
                        enforcement: Authorizer::enforcement(p, rule).as_str().to_owned(),
                    })
                    .collect(),
            }
        })
        .collect())
}
