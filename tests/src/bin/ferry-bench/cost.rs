//! What the mesh processes cost, read from /proc: CPU time (user + system, all threads, including
//! threads that have exited) and resident memory.

use anyhow::{Context as _, Result, bail};

/// CPU seconds used so far by the processes `pids`, summed.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    let mut total = 0u64;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        total += cpu_ticks(&stat).with_context(|| format!("{path} has no CPU times: {stat:?}"))?;
    }
    Ok(total as f64 / ticks as f64)
}

/// utime + stime from a /proc/PID/stat line, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state (3), ppid (4), ... utime is field 14 and stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of the processes `pids`, summed, in MB (10^6 bytes).
pub fn rss_mb(pids: &[u32]) -> Result<f64> {
    let mut kib = 0u64;
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        kib += vm_rss_kib(&status).with_context(|| format!("{path} has no VmRSS line"))?;
    }
    Ok(kib as f64 * 1024.0 / 1e6)
}

/// The VmRSS line of /proc/PID/status, in KiB.
fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skips_a_name_with_spaces_and_parentheses() {
        let stat = "1234 (tokio (rt) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tferry\nVmPeak:\t  9000 kB\nVmRSS:\t   24800 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_kib(status), Some(24_800));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        // Burn a little CPU so the tick counter moves.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(&[me]).unwrap() > 0.0);
        assert!(rss_mb(&[me]).unwrap() > 0.5);
        assert!(cpu_seconds(&[u32::MAX]).is_err());
    }
}
