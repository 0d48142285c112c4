//! `cargo xtask image`: the agent's container image, `deploy/Containerfile` built `FROM scratch`
//! with podman (no registry is reachable, so no base image). The build context holds `rootfs/`:
//! the `ferry` binary and exactly the shared libraries `ldd` says it loads, at their paths.

use anyhow::{Context as _, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};

use crate::{cmd, paths, setup};

/// The image's name.
pub const IMAGE: &str = "localhost/ferry:latest";

/// Sets up, builds the agent in release mode, then the image.
pub fn run() -> Result<()> {
    setup::run(&setup::Options { rebuild_bpf_linker: false })?;
    cmd::run(&mut cmd::cargo(["build", "--release", "-p", "ferry-agent", "--bin", "ferry"]))?;
    build(&paths::target_dir().join("release/ferry"))
}

/// Builds the image around `binary` (the test step uses the debug build it already has).
pub fn build(binary: &Path) -> Result<()> {
    let context = paths::target_dir().join("image");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("cannot clear {}", context.display()))?;
    }
    let rootfs = context.join("rootfs");
    place(binary, &rootfs.join("usr/local/bin/ferry"))?;
    for lib in libraries(binary)? {
        place(&lib, &rootfs.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
    }
    // The mount points the DaemonSet uses must exist in a read-only root filesystem.
    for dir in [
        "run/ferry",
        "etc/ferry/config",
        "etc/ferry/ca",
        "host/proc",
        "host/sys/fs/cgroup",
        "sys/fs/bpf",
        "var/run/netns",
        "tmp",
    ] {
        fs::create_dir_all(rootfs.join(dir)).with_context(|| format!("cannot create {dir} in the image"))?;
    }
    let containerfile = paths::repo_root().join("deploy/Containerfile");
    cmd::run(
        cmd::command("podman")
            .args(["build", "--quiet", "--tag", IMAGE, "--file"])
            .arg(&containerfile)
            .arg(&context),
    )?;
    // The image holds what was placed, and starts the binary it was given.
    let config = cmd::stdout(cmd::command("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Config.Entrypoint}}",
        IMAGE,
    ]))?;
    if !config.contains("/usr/local/bin/ferry") {
        bail!("image {IMAGE} has entrypoint {config:?}, not /usr/local/bin/ferry");
    }
    eprintln!("image: built {IMAGE} from {}", containerfile.display());
    Ok(())
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`, as absolute paths.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::stdout(cmd::command("ldd").arg(binary))?;
    Ok(parse_ldd(&out))
}

/// Absolute paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `from` to `to`, creating the directories on the way.
fn place(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
