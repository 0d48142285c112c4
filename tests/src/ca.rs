//! A mesh CA for multi-node tests and benchmarks, made the way an operator makes one: with
//! `ferry ca init` and `ferry ca issue-node`.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::bin_path;

/// Creates a root for `trust_domain` in a fresh temporary directory and an intermediate for each of
/// `nodes` under `DIR/nodes/NODE` (the directory a node's mesh file names in `[ca] dir`).
pub fn make_ca(trust_domain: &str, nodes: &[&str]) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("ferry-ca-").tempdir().context("creating the CA directory")?;
    let d = dir.path().to_str().context("the CA directory's path is not UTF-8")?;
    let mut steps = vec![vec!["ca", "init", d, "--trust-domain", trust_domain]];
    steps.extend(nodes.iter().map(|node| vec!["ca", "issue-node", d, node]));
    for args in steps {
        let out = Command::new(bin_path("ferry"))
            .args(&args)
            .output()
            .with_context(|| format!("cannot run ferry {args:?}"))?;
        if !out.status.success() {
            bail!("ferry {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(dir)
}
