//! What steers an issuance run from outside and what it measures: the stop flag that Ctrl-C
//! sets, whether ids already issued are skipped, and the time each stage took.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One stage of a device's issuance, as [`Timings`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The device key pair generated.
    Keygen,
    /// The certificate built and signed by the CA key (serial, TBS, signature).
    Sign,
    /// PEM and JSON text: the key as PKCS#8, the certificate, the chain, the lines.
    Encode,
    /// The device's files or bundle lines written.
    Write,
    /// The manifest line recorded (and, at the end, the manifest synced).
    Manifest,
}

impl Stage {
    /// Every stage, in the order a device goes through them.
    pub const ALL: [Stage; 5] = [
        Stage::Keygen,
        Stage::Sign,
        Stage::Encode,
        Stage::Write,
        Stage::Manifest,
    ];

    /// The stage's name in `--timings` and `--json`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Keygen => "keygen",
            Stage::Sign => "sign",
            Stage::Encode => "encode",
            Stage::Write => "write",
            Stage::Manifest => "manifest",
        }
    }
}

/// Time spent in each [`Stage`], summed over every worker (so up to the wall time times the
/// worker count).
#[derive(Debug, Default)]
pub struct Timings {
    nanos: [AtomicU64; 5],
}

impl Timings {
    /// Adds `time` to `stage`.
    pub fn add(&self, stage: Stage, time: Duration) {
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        self.nanos[stage as usize].fetch_add(nanos, Ordering::Relaxed);
    }

    /// The time spent in `stage` so far.
    pub fn get(&self, stage: Stage) -> Duration {
        Duration::from_nanos(self.nanos[stage as usize].load(Ordering::Relaxed))
    }
}

/// A worker's stopwatch: each lap is charged to a stage.
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn start() -> Clock {
        Clock(Instant::now())
    }

    /// Charges the time since the last lap to `stage`.
    pub(crate) fn lap(&mut self, timings: &Timings, stage: Stage) {
        let now = Instant::now();
        timings.add(stage, now - self.0);
        self.0 = now;
    }
}

/// How a run is steered: stopped from outside, told to skip what was issued, and timed.
#[derive(Debug, Default)]
pub struct RunControl {
    /// Set (by a signal handler) to stop: no device is started after it, the devices in
    /// flight finish and are recorded.
    pub stop: Arc<AtomicBool>,
    /// Skip ids the manifest already holds instead of refusing them (`--resume`).
    pub skip_issued: bool,
    /// Where the workers' time went.
    pub timings: Timings,
    /// Keep each issued device's key and chain in the report ([`BatchReport::handed_over`])
    /// for the caller's delivery: folder issuance only.
    ///
    /// [`BatchReport::handed_over`]: crate::BatchReport::handed_over
    pub hand_over: bool,
}

impl RunControl {
    /// Whether a stop was asked for.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}
