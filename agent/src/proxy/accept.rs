//! The accept loop of every in-pod listener, and how it backs off when accepting fails.
//!
//! At the descriptor limit (EMFILE, ENFILE) or under memory pressure (ENOBUFS, ENOMEM) the failing
//! connection stays in the listen queue, so retrying at once would spin. The loop waits, doubling
//! the wait up to a cap, and says so once per streak and then at most every [`REPEAT_EVERY`], so a
//! node with many pods at its limit does not flood the log.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};

use super::PodContext;

/// The first wait after a failed accept.
const FIRST_DELAY: Duration = Duration::from_millis(5);
/// The longest wait: also how late, at worst, a listener notices that descriptors are free again.
const MAX_DELAY: Duration = Duration::from_millis(500);
/// How often a streak of failures is logged again after its first line.
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

/// Accepts connections forever, handing each to `handle` on its own task. Accept errors such as
/// EMFILE back off instead of spinning or exiting. An agent waiting to take over accepts nothing
/// until it does (see [`crate::handoff::Hub::stand_by`]).
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, pod: Arc<PodContext>, handle: F)
where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    pod.shared.handoff.until_serving().await;
    let mut backoff = Backoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Some(streak) = backoff.succeeded() {
                    tracing::info!(
                        pod = %pod.key, failures = streak.failures,
                        for_ms = u64::try_from(streak.lasted.as_millis()).unwrap_or(u64::MAX),
                        "accept recovered"
                    );
                }
                let _ = stream.set_nodelay(true);
                let in_flight = pod.shared.handoff.accepted();
                let task = handle(stream, peer, pod.clone());
                tokio::spawn(async move {
                    task.await;
                    drop(in_flight);
                });
            }
            Err(e) => {
                let now = Instant::now();
                let failed = backoff.failed(now);
                if failed.log {
                    tracing::warn!(
                        pod = %pod.key, error = %e, failures = failed.failures,
                        "accept failed; backing off"
                    );
                }
                tokio::time::sleep(failed.wait).await;
            }
        }
    }
}

/// The state of one listener's failure streak.
#[derive(Debug, Default)]
struct Backoff {
    /// When the streak began, `None` while accepting works.
    since: Option<Instant>,
    failures: u64,
    delay: Duration,
    logged: Option<Instant>,
}

/// What to do after one failed accept.
#[derive(Debug, PartialEq, Eq)]
struct Failed {
    wait: Duration,
    log: bool,
    failures: u64,
}

/// A streak that just ended.
#[derive(Debug, PartialEq, Eq)]
struct Streak {
    failures: u64,
    lasted: Duration,
}

impl Backoff {
    fn failed(&mut self, now: Instant) -> Failed {
        self.since.get_or_insert(now);
        self.failures += 1;
        self.delay = if self.delay.is_zero() { FIRST_DELAY } else { (self.delay * 2).min(MAX_DELAY) };
        let log = self.logged.is_none_or(|at| now.duration_since(at) >= REPEAT_EVERY);
        if log {
            self.logged = Some(now);
        }
        Failed { wait: self.delay, log, failures: self.failures }
    }

    /// Ends a streak, if one was running.
    fn succeeded(&mut self) -> Option<Streak> {
        let since = self.since.take()?;
        let streak = Streak { failures: self.failures, lasted: since.elapsed() };
        *self = Self::default();
        Some(streak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let waits: Vec<Duration> = (0..10).map(|_| b.failed(now).wait).collect();
        assert_eq!(waits[0], FIRST_DELAY);
        assert_eq!(waits[1], FIRST_DELAY * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), MAX_DELAY);
    }

    #[test]
    fn a_streak_is_logged_once_then_every_repeat_interval() {
        let mut b = Backoff::default();
        let start = Instant::now();
        assert!(b.failed(start).log, "the first failure is logged");
        assert!(!b.failed(start + Duration::from_secs(1)).log);
        assert!(!b.failed(start + REPEAT_EVERY - Duration::from_millis(1)).log);
        let again = b.failed(start + REPEAT_EVERY);
        assert!(again.log, "logged again after the interval");
        assert_eq!(again.failures, 4);
    }

    #[test]
    fn success_ends_the_streak_and_resets_the_wait() {
        let mut b = Backoff::default();
        assert_eq!(b.succeeded(), None, "no streak, nothing to report");
        let now = Instant::now();
        for _ in 0..5 {
            b.failed(now);
        }
        let streak = b.succeeded().expect("a streak ended");
        assert_eq!(streak.failures, 5);
        let next = b.failed(now);
        assert_eq!((next.wait, next.log, next.failures), (FIRST_DELAY, true, 1), "a new streak starts fresh");
    }
}
