//! `ferry-sweep`: removes network namespaces and cgroups left by crashed test runs.

fn main() -> anyhow::Result<()> {
    let report = ferry_tests::cleanup::sweep_stale()?;
    for item in &report.removed {
        println!("removed {item}");
    }
    if !report.killed.is_empty() {
        println!("killed leftover processes {:?}", report.killed);
    }
    for error in &report.errors {
        eprintln!("could not remove {error}");
    }
    if !report.errors.is_empty() {
        anyhow::bail!("{} leftovers could not be removed", report.errors.len());
    }
    Ok(())
}
