//! The standalone sources: the mesh file and the policy files and directories it names, read into
//! one desired state, and watched so a change to any of them goes through the same apply.

use std::path::{Path, PathBuf};

use crate::{
    config::{ConfigError, MeshConfig},
    policy::{self, Origin, Policy, PolicyError, Snapshot},
};

/// Everything the node should run: the mesh and its policies.
#[derive(Debug)]
pub struct Desired {
    /// The validated mesh file.
    pub config: MeshConfig,
    /// The compiled policies, in load order.
    pub policies: Vec<(Policy, Origin)>,
}

/// Why a change was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The mesh file is invalid.
    #[error(transparent)]
    Mesh(#[from] ConfigError),
    /// A policy source is unreadable or invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The mesh file is not UTF-8.
    #[error("mesh file {} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
}

/// What the node runs and what was read last, to tell changes apart: the mesh file's bytes and the
/// policy files' bytes.
#[derive(Debug)]
pub struct Sources {
    mesh_path: PathBuf,
    /// The mesh file the node runs.
    applied_mesh: Vec<u8>,
    /// The policy sources the running mesh file names.
    applied_sources: Vec<PathBuf>,
    /// The policy files the node runs; `None` when they failed at start.
    applied_policies: Option<Snapshot>,
    /// Everything read at the last poll, so a rejected change is reported once, not every poll.
    last_seen: Option<Seen>,
    /// A change handed out by [`Sources::poll`], which [`Sources::commit`] makes the running one.
    pending: Option<(Vec<u8>, Vec<PathBuf>, Snapshot)>,
}

/// One poll's reading.
#[derive(Debug, PartialEq)]
struct Seen {
    mesh: Vec<u8>,
    policies: Result<Snapshot, String>,
}

/// What start-up read: the mesh must be valid; policies that fail leave the node denying inbound
/// connections until they are fixed.
pub struct Initial {
    /// The watcher's memory of what was read.
    pub sources: Sources,
    /// The mesh.
    pub config: MeshConfig,
    /// The policies, or why they could not be loaded.
    pub policies: Result<Vec<(Policy, Origin)>, PolicyError>,
}

impl Sources {
    /// Reads the mesh file and its policies at start.
    pub fn load(mesh_path: &Path) -> Result<Initial, SourceError> {
        let text = MeshConfig::read_file(mesh_path)?;
        let config = MeshConfig::parse_file(mesh_path, &text)?;
        let snapshot = policy::snapshot(&config.policies);
        let policies = snapshot.as_ref().map_err(Clone::clone).and_then(policy::compile_snapshot);
        let sources = Sources {
            mesh_path: mesh_path.to_owned(),
            applied_mesh: text.into_bytes(),
            applied_sources: config.policies.clone(),
            applied_policies: snapshot.ok().filter(|_| policies.is_ok()),
            last_seen: None,
            pending: None,
        };
        Ok(Initial { sources, config, policies })
    }

    /// The mesh file's path.
    pub fn mesh_path(&self) -> &Path {
        &self.mesh_path
    }

    /// Reads everything again. `None` when nothing changed since the last poll (or the mesh file is
    /// briefly missing, as mid-replace); otherwise the new desired state, or why the change is
    /// rejected. `current` is the running mesh, used when only policy files changed. Call
    /// [`Sources::commit`] once the desired state is applied.
    pub fn poll(&mut self, current: &MeshConfig) -> Option<Result<Desired, SourceError>> {
        let mesh = std::fs::read(&self.mesh_path).ok()?;
        let parsed = if mesh == self.applied_mesh {
            Ok(None)
        } else {
            // Parse the very bytes compared, so a second change in between is not skipped.
            match std::str::from_utf8(&mesh) {
                Ok(text) => {
                    MeshConfig::parse_file(&self.mesh_path, text).map(Some).map_err(SourceError::from)
                }
                Err(_) => Err(SourceError::NotUtf8(self.mesh_path.clone())),
            }
        };
        let sources = match &parsed {
            Ok(Some(c)) => c.policies.clone(),
            _ => self.applied_sources.clone(),
        };
        let snapshot = policy::snapshot(&sources);
        let seen = Seen { mesh, policies: snapshot.clone().map_err(|e| e.to_string()) };
        if self.last_seen.as_ref() == Some(&seen) {
            return None;
        }
        let mesh = seen.mesh.clone();
        self.last_seen = Some(seen);
        let config = match parsed {
            Err(e) => return Some(Err(e)),
            Ok(config) => config,
        };
        let snapshot = match snapshot {
            Err(e) => return Some(Err(e.into())),
            Ok(s) => s,
        };
        if config.is_none() && self.applied_policies.as_ref() == Some(&snapshot) {
            // Back to what runs (a rejected change was reverted): nothing to apply.
            return None;
        }
        let policies = match policy::compile_snapshot(&snapshot) {
            Err(e) => return Some(Err(e.into())),
            Ok(p) => p,
        };
        self.pending = Some((mesh, sources, snapshot));
        let config = config.unwrap_or_else(|| current.clone());
        Some(Ok(Desired { config, policies }))
    }

    /// Records that the last desired state [`Sources::poll`] returned now runs.
    pub fn commit(&mut self) {
        if let Some((mesh, sources, snapshot)) = self.pending.take() {
            self.applied_mesh = mesh;
            self.applied_sources = sources;
            self.applied_policies = Some(snapshot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: demo\nspec: {}\n";

    fn mesh(policies: &str) -> String {
        format!("node = \"n\"\npolicies = [{policies}]\n")
    }

    fn desired(change: Option<Result<Desired, SourceError>>) -> Desired {
        match change {
            Some(Ok(d)) => d,
            Some(Err(e)) => panic!("rejected: {e}"),
            None => panic!("no change seen"),
        }
    }

    #[test]
    fn policy_file_changes_are_changes_and_bad_ones_are_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let mesh_path = dir.path().join("mesh.toml");
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(&mesh_path, mesh("\"policies\"")).unwrap();
        let initial = Sources::load(&mesh_path).unwrap();
        assert_eq!(initial.config.policies, vec![dir.path().join("policies")], "relative to the mesh file");
        assert_eq!(initial.policies.as_ref().map(Vec::len).ok(), Some(0));
        let (mut sources, current) = (initial.sources, initial.config);
        assert!(sources.poll(&current).is_none(), "nothing changed");

        // A file added to the directory.
        std::fs::write(dir.path().join("policies/a.yaml"), POLICY).unwrap();
        assert_eq!(desired(sources.poll(&current)).policies.len(), 1);
        sources.commit();
        assert!(sources.poll(&current).is_none());

        // An invalid policy: rejected, once, naming the file.
        std::fs::write(
            dir.path().join("policies/a.yaml"),
            POLICY.replace("spec: {}", "spec: {action: NOPE}"),
        )
        .unwrap();
        let err = sources.poll(&current).expect("a change").expect_err("invalid");
        assert!(err.to_string().contains("a.yaml, document 1 (demo/p): spec.action"), "{err}");
        assert!(sources.poll(&current).is_none(), "reported once");

        // Reverted to what runs: nothing to apply.
        std::fs::write(dir.path().join("policies/a.yaml"), POLICY).unwrap();
        assert!(sources.poll(&current).is_none());

        // Removed: a change to an empty set.
        std::fs::remove_file(dir.path().join("policies/a.yaml")).unwrap();
        assert_eq!(desired(sources.poll(&current)).policies.len(), 0);
    }

    #[test]
    fn a_mesh_change_rejected_for_its_policies_is_applied_once_they_are_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let mesh_path = dir.path().join("mesh.toml");
        std::fs::write(&mesh_path, mesh("")).unwrap();
        let initial = Sources::load(&mesh_path).unwrap();
        let (mut sources, current) = (initial.sources, initial.config);
        std::fs::write(dir.path().join("p.yaml"), "not: [valid").unwrap();
        std::fs::write(&mesh_path, mesh("\"p.yaml\"")).unwrap();
        assert!(sources.poll(&current).expect("a change").is_err());
        assert!(sources.poll(&current).is_none());
        std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
        let d = desired(sources.poll(&current));
        assert_eq!((d.config.policies.len(), d.policies.len()), (1, 1), "the new mesh file comes with it");
        // A named file that disappears is an error, not an empty set.
        sources.commit();
        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        let err = sources.poll(&current).expect("a change").expect_err("missing file");
        assert!(err.to_string().contains("cannot read policy source"), "{err}");
    }

    #[test]
    fn policies_that_fail_at_start_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mesh_path = dir.path().join("mesh.toml");
        std::fs::write(&mesh_path, mesh("\"missing.yaml\"")).unwrap();
        let initial = Sources::load(&mesh_path).expect("the mesh itself is valid");
        assert!(initial.policies.is_err());
        std::fs::write(&mesh_path, "node = [").unwrap();
        assert!(Sources::load(&mesh_path).is_err(), "an invalid mesh file stops the start");
    }
}
