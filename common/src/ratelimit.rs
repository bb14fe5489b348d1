//! One rate limiter for repeating log messages, shared by the agent and the
//! collector: a message of a kind is let through at most once per interval,
//! and the ones held back are counted so the next one can say how many.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one message through per `every`; counts the rest. Shared by
/// reference (`&self`), so one limiter can serve several tasks.
#[derive(Debug)]
pub struct RateLimiter {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A limiter letting one message through per `every` (the first at once).
    pub fn new(every: Duration) -> RateLimiter {
        RateLimiter {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the caller may log now (`n` messages were suppressed
    /// since the last one), `None` when it should stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_it_suppresses() {
        let r = RateLimiter::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        let r0 = RateLimiter::new(Duration::ZERO);
        assert_eq!(r0.allow(), Some(0));
        assert_eq!(r0.allow(), Some(0));
    }

    #[test]
    fn the_next_message_says_how_many_were_held_back() {
        let r = RateLimiter::new(Duration::from_millis(1));
        let start = Instant::now();
        assert_eq!(r.allow(), Some(0));
        // Held back until the interval has passed (measured, not slept).
        let mut held = 0;
        let got = loop {
            match r.allow() {
                None => held += 1,
                Some(n) => break n,
            }
        };
        assert!(start.elapsed() >= Duration::from_millis(1));
        assert_eq!(got, held);
    }
}
