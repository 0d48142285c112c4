//! Compiles the kernel programs in `ebpf/programs` for the BPF target and places the object in
//! OUT_DIR, where the agent embeds it. Needs the nightly's rust-src and bpf-linker, which
//! `cargo xtask setup` (run by `cargo xtask test` and `cargo xtask demo`) installs.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = format!("{manifest_dir}/../ebpf/programs");
    let package = aya_build::Package { name: "ferry-ebpf", root_dir: &root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
