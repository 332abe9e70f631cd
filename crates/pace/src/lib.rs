//! One token bucket for every request rate jitr keeps to: an operator's bulk calls within AWS
//! IoT's per-operation quotas, the presence table's paged reads, KMS `Sign` within its quota.
//! One bucket is shared by every task or thread that calls the paced operation.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` requests a second, up to one second's worth (at least one request)
/// saved up.
#[derive(Debug)]
pub struct Pace {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Pace {
    /// A bucket for `rate` requests a second (a rate that is not a positive number means one a
    /// second), starting full.
    pub fn new(rate: f64) -> Pace {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1.0
        };
        Pace {
            rate,
            state: Mutex::new((rate.max(1.0), Instant::now())),
        }
    }

    /// A bucket that never makes anyone wait (work done one call at a time).
    pub fn unlimited() -> Pace {
        Pace {
            rate: f64::INFINITY,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// The rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Waits for a token.
    pub async fn take(&self) {
        while let Some(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits for a token, blocking the calling thread (for work run on threads of its own).
    pub fn take_blocking(&self) {
        while let Some(wait) = self.try_take() {
            std::thread::sleep(wait);
        }
    }

    /// Takes a token if there is one; otherwise how long until there is.
    fn try_take(&self) -> Option<Duration> {
        if self.rate.is_infinite() {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens =
            (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate.max(1.0));
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            return None;
        }
        *state = (tokens, now);
        Some(Duration::from_secs_f64((1.0 - tokens) / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_bucket_then_the_rate() {
        let pace = Pace::new(40.0);
        let start = Instant::now();
        for _ in 0..60 {
            pace.take().await;
        }
        // 40 at once, then 20 more at 40 a second.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(900), "{elapsed:?}");
    }

    #[test]
    fn blocking_takes_keep_the_rate_and_a_slow_rate_saves_one() {
        let pace = Pace::new(4.0);
        let start = std::time::Instant::now();
        for _ in 0..6 {
            pace.take_blocking();
        }
        // 4 at once, then 2 more at 4 a second.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
        let slow = Pace::new(0.5);
        assert_eq!(slow.try_take(), None);
        let wait = slow.try_take().expect("the one saved request is spent");
        assert!(wait > Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn unlimited_never_waits() {
        let pace = Pace::unlimited();
        assert!((0..1000).all(|_| pace.try_take().is_none()));
    }
}
