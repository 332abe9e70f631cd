//! Keeping an operator's bulk reads within AWS IoT's per-operation request rates: one token
//! bucket per operation, shared by every task that calls it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` requests a second, one second's worth saved up at most.
#[derive(Debug)]
pub struct Pace {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Pace {
    /// A bucket for `rate` requests a second (at least one a second), starting full.
    pub fn new(rate: f64) -> Pace {
        let rate = if rate.is_finite() && rate >= 1.0 {
            rate
        } else {
            1.0
        };
        Pace {
            rate,
            state: Mutex::new((rate, Instant::now())),
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
        if self.rate.is_infinite() {
            return;
        }
        loop {
            let wait = {
                let mut state = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                let (tokens, last) = *state;
                let tokens =
                    (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
                if tokens >= 1.0 {
                    *state = (tokens - 1.0, now);
                    return;
                }
                *state = (tokens, now);
                Duration::from_secs_f64((1.0 - tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
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
}
