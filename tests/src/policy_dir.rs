//! A directory of Istio AuthorizationPolicy files for agents to read (`policies = [DIR]` in their
//! mesh files, see [`crate::MeshFile::policies`]).

use std::path::Path;

use anyhow::{Context as _, Result};

/// A temporary directory of policy files; removed when it drops, so it must outlive the agents
/// that read it.
#[derive(Debug)]
pub struct PolicyDir(tempfile::TempDir);

impl PolicyDir {
    /// A new, empty directory.
    pub fn new() -> Result<Self> {
        Ok(Self(tempfile::Builder::new().prefix("ferry-policies-").tempdir()?))
    }

    /// A new directory holding `files` (file name, YAML).
    pub fn with_files(files: &[(&str, &str)]) -> Result<Self> {
        let dir = Self::new()?;
        for (file, yaml) in files {
            dir.write(file, yaml)?;
        }
        Ok(dir)
    }

    /// The directory, for the mesh files.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `file` whole: first to a dot-file (which the agent skips), then renamed into place,
    /// so a watching agent never reads half a file.
    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.path().join(file)).with_context(|| format!("cannot place {file}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_land_whole_and_leave_no_dot_files() {
        let dir = PolicyDir::with_files(&[("a.yaml", "kind: A\n"), ("b.yaml", "kind: B\n")]).unwrap();
        dir.write("a.yaml", "kind: A2\n").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.yaml", "b.yaml"]);
        assert_eq!(std::fs::read_to_string(dir.path().join("a.yaml")).unwrap(), "kind: A2\n");
    }
}
