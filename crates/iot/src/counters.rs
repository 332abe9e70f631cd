//! Counters the AWS adapters bump as they go, read by the Lambda's metrics (`AwsRetries`,
//! `AwsGiveUps`): no API calls, no state beyond two numbers.

use std::sync::atomic::{AtomicU64, Ordering};

static RETRIES: AtomicU64 = AtomicU64::new(0);
static GIVE_UPS: AtomicU64 = AtomicU64::new(0);

/// An AWS call was tried again after a throttle or a transient failure.
pub fn retried() {
    RETRIES.fetch_add(1, Ordering::Relaxed);
}

/// An AWS call gave up at its deadline.
pub fn gave_up() {
    GIVE_UPS.fetch_add(1, Ordering::Relaxed);
}

/// The retries and the give-ups since the last call; both restart from zero.
pub fn take() -> (u64, u64) {
    (
        RETRIES.swap(0, Ordering::Relaxed),
        GIVE_UPS.swap(0, Ordering::Relaxed),
    )
}
