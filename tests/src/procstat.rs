//! What the kernel says about a running process, read from /proc: CPU time, resident memory, open
//! descriptors and state; plus its RLIMIT_NOFILE, read and set from outside (prlimit(2)). For
//! tests that bound what the agent consumes under stress without timing how fast it is.

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// The fields of /proc/PID/stat after the command name, which may itself hold spaces and ')'.
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (_, rest) = text.rsplit_once(')').with_context(|| format!("{path}: no ')' in {text:?}"))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process's state letter (R, S, D, Z, ...): field 3 of /proc/PID/stat.
pub fn state(pid: u32) -> Result<char> {
    let fields = stat_fields(pid)?;
    fields.first().and_then(|s| s.chars().next()).context("no state field")
}

/// Whether `pid` is a live process: it exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    state(pid).is_ok_and(|s| s != 'Z' && s != 'X')
}

/// User plus system CPU time the process (all its threads) has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the state (index 0).
    let ticks = |i: usize| -> Result<u64> {
        let field = fields.get(i).with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))?;
        field.parse().with_context(|| format!("/proc/{pid}/stat field {}: {field:?}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(Duration::from_nanos(total.saturating_mul(1_000_000_000 / hz)))
}

/// CPU the process used over `window`, as a fraction of that wall time (1.0 is one core busy).
pub fn cpu_fraction(pid: u32, window: Duration) -> Result<f64> {
    let (cpu0, t0) = (cpu_time(pid)?, Instant::now());
    sleep(window);
    let (cpu1, wall) = (cpu_time(pid)?, t0.elapsed());
    Ok(cpu1.saturating_sub(cpu0).as_secs_f64() / wall.as_secs_f64())
}

/// The process's resident set size in bytes (VmRSS of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).with_context(|| format!("{path}: no VmRSS"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{path}: bad line {line:?}"))?;
    Ok(kib * 1024)
}

/// The descriptor numbers the process has open, sorted.
pub fn open_fds(pid: u32) -> Result<Vec<u32>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut fds: Vec<u32> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// The lowest descriptor number the process does not use: where its next open() lands, so a
/// limit of exactly this leaves it no descriptor at all.
pub fn lowest_free_fd(pid: u32) -> Result<u32> {
    let fds = open_fds(pid)?;
    Ok((0..).find(|n| fds.binary_search(n).is_err()).unwrap_or(0))
}

/// The process's RLIMIT_NOFILE as (soft, hard).
pub fn nofile(pid: u32) -> Result<(u64, u64)> {
    prlimit_nofile(pid, None)
}

/// Sets the process's RLIMIT_NOFILE to (soft, hard), as `prlimit --pid PID --nofile=SOFT:HARD`
/// does; returns the previous limits. Raising the hard limit needs CAP_SYS_RESOURCE.
pub fn set_nofile(pid: u32, soft: u64, hard: u64) -> Result<(u64, u64)> {
    prlimit_nofile(pid, Some((soft, hard)))
}

fn prlimit_nofile(pid: u32, new: Option<(u64, u64)>) -> Result<(u64, u64)> {
    let new = new.map(|(soft, hard)| libc::rlimit { rlim_cur: soft, rlim_max: hard });
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let new_ptr = new.as_ref().map_or(std::ptr::null(), |n| n as *const libc::rlimit);
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: both pointers are valid for the call (or null for "do not set").
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, new_ptr, &mut old) };
    if rc != 0 {
        bail!("prlimit(pid {pid}, RLIMIT_NOFILE, {new:?}): {}", std::io::Error::last_os_error());
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// Puts a process's RLIMIT_NOFILE back when dropped, so a failing test leaves the limit as it was
/// (the process usually dies with the test anyway; this covers one that outlives a step).
#[derive(Debug)]
pub struct NofileGuard {
    pid: u32,
    original: (u64, u64),
}

impl NofileGuard {
    /// Sets `pid`'s limit to `soft:hard`, remembering the previous one.
    pub fn set(pid: u32, soft: u64, hard: u64) -> Result<Self> {
        let original = set_nofile(pid, soft, hard)?;
        Ok(Self { pid, original })
    }

    /// Lowers (or raises) the limit again, still restoring the first one on drop.
    pub fn change(&self, soft: u64, hard: u64) -> Result<()> {
        set_nofile(self.pid, soft, hard).map(drop)
    }

    /// The limits the process had before [`NofileGuard::set`].
    pub fn original(&self) -> (u64, u64) {
        self.original
    }

    /// Restores the original limits now.
    pub fn restore(&self) -> Result<()> {
        let (soft, hard) = self.original;
        set_nofile(self.pid, soft, hard).map(drop)
    }
}

impl Drop for NofileGuard {
    fn drop(&mut self) {
        // A process that already exited has nothing left to restore.
        if alive(self.pid) && self.restore().is_err() {
            eprintln!("ferry-tests: could not restore RLIMIT_NOFILE of pid {}", self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(matches!(state(me).unwrap(), 'R' | 'S'));
        assert!(rss_bytes(me).unwrap() > 0);
        let fds = open_fds(me).unwrap();
        assert!(fds.contains(&0) || fds.contains(&1) || fds.contains(&2), "{fds:?}");
        let free = lowest_free_fd(me).unwrap();
        assert!(!fds.contains(&free));
        let (soft, hard) = nofile(me).unwrap();
        assert!(soft <= hard && soft > 0);
        // Burn a little CPU so the counter moves.
        let t0 = cpu_time(me).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_time(me).unwrap() >= t0);
    }

    #[test]
    fn a_missing_process_is_an_error() {
        // Pid numbers stop at 2^22 on Linux.
        let gone = 4_194_304 + 7;
        assert!(!alive(gone));
        assert!(cpu_time(gone).is_err() && rss_bytes(gone).is_err() && nofile(gone).is_err());
    }
}
