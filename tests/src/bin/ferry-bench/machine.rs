//! The machine and the commit the figures come from.

use std::process::Command;

use serde::Serialize;

/// The machine a run measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// The kernel release.
    pub kernel: String,
    /// CPUs available to the bench.
    pub cpus: usize,
    /// The CPU's model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory, in GB.
    pub memory_gb: f64,
    /// The 1, 5 and 15 minute load averages when the report was made: other work on a shared
    /// machine shows up in the figures.
    pub load_average: String,
    /// How the bench and the binaries it ran were built.
    pub profile: &'static str,
}

impl Machine {
    /// This machine, now.
    pub fn now() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model: field(&cpuinfo, "model name").unwrap_or("unknown").to_owned(),
            memory_gb: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| kib * 1024.0 / 1e9)
                .unwrap_or(0.0),
            load_average: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        }
    }
}

/// The value of the first `key: value` line of a /proc text file.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// The commit of the working tree (`git rev-parse HEAD`, "-dirty" when tracked files changed), or
/// "unknown" outside a git checkout.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
            _ => head,
        },
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_reads_proc_style_lines() {
        let text = "processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\nflags\t: fpu\n";
        assert_eq!(field(text, "model name"), Some("Test CPU @ 2.0GHz"));
        assert_eq!(field(text, "MemTotal"), None);
    }

    #[test]
    fn this_machine_has_a_kernel_and_cpus() {
        let m = Machine::now();
        assert!(!m.kernel.is_empty());
        assert!(m.cpus >= 1);
        assert!(m.memory_gb > 0.0);
    }
}
