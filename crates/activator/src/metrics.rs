//! Metrics without API calls: counters the adapters bump as they go, and CloudWatch Embedded
//! Metric Format lines the Lambda prints to standard output (CloudWatch Logs turns them into
//! metrics, in Text or JSON log format alike).
//!
//! Namespace `jitr`, dimension `Function` (the Lambda's name) on everything and `Outcome` on
//! decisions: `Decisions` and `DecisionDuration` (ms) by outcome, `AwsRetries`, `AwsGiveUps`,
//! `FleetErrors`, `LedgerErrors`, and per sweep `SweepPages`, `SweepPending`, `SweepFailing`,
//! `SweepIncomplete`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

/// The CloudWatch namespace of every jitr metric.
pub const NAMESPACE: &str = "jitr";

static FLEET_ERRORS: AtomicU64 = AtomicU64::new(0);
static LEDGER_ERRORS: AtomicU64 = AtomicU64::new(0);

/// A fleet check could not be answered.
pub fn fleet_error() {
    FLEET_ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// A ledger write (or required read) failed.
pub fn ledger_error() {
    LEDGER_ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// The counters since the last call (they restart from zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// AWS retries (AWS IoT and DynamoDB calls, [`iot::counters`]).
    pub aws_retries: u64,
    /// AWS give-ups.
    pub aws_give_ups: u64,
    /// Fleet checks that failed.
    pub fleet_errors: u64,
    /// Ledger calls that failed.
    pub ledger_errors: u64,
}

/// Takes the counters, leaving zeros.
pub fn take() -> Counters {
    let (aws_retries, aws_give_ups) = iot::counters::take();
    Counters {
        aws_retries,
        aws_give_ups,
        fleet_errors: FLEET_ERRORS.swap(0, Ordering::Relaxed),
        ledger_errors: LEDGER_ERRORS.swap(0, Ordering::Relaxed),
    }
}

/// One EMF line: `metrics` as (name, unit, value) under `dimensions` (name, value), all in one
/// directive, each dimension set with `Function` first.
pub fn emf_line(
    function: &str,
    timestamp_ms: i64,
    dimensions: &[(&str, &str)],
    metrics: &[(&str, &str, f64)],
) -> String {
    let mut keys = vec!["Function"];
    keys.extend(dimensions.iter().map(|(k, _)| *k));
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
        .collect();
    let mut line = Map::new();
    line.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [keys],
                "Metrics": definitions,
            }],
        }),
    );
    line.insert("Function".into(), json!(function));
    for (key, value) in dimensions {
        line.insert((*key).into(), json!(value));
    }
    for (name, _, value) in metrics {
        line.insert((*name).into(), json!(value));
    }
    Value::Object(line).to_string()
}

/// The counters as an EMF line (no `Outcome` dimension).
pub fn counters_line(function: &str, timestamp_ms: i64, counters: Counters) -> String {
    emf_line(
        function,
        timestamp_ms,
        &[],
        &[
            ("AwsRetries", "Count", counters.aws_retries as f64),
            ("AwsGiveUps", "Count", counters.aws_give_ups as f64),
            ("FleetErrors", "Count", counters.fleet_errors as f64),
            ("LedgerErrors", "Count", counters.ledger_errors as f64),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_embedded_metric_format() {
        let line = emf_line(
            "jitr-activator",
            1_700_000_000_000,
            &[("Outcome", "activated")],
            &[
                ("Decisions", "Count", 1.0),
                ("DecisionDuration", "Milliseconds", 123.0),
            ],
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "jitr");
        assert_eq!(directive["Dimensions"], json!([["Function", "Outcome"]]));
        assert_eq!(directive["Metrics"][1]["Unit"], "Milliseconds");
        // Every metric and dimension is a top-level member, as EMF requires.
        assert_eq!(v["Outcome"], "activated");
        assert_eq!(v["Function"], "jitr-activator");
        assert_eq!(v["DecisionDuration"], 123.0);
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_000_i64);
    }

    #[test]
    fn counters_restart_from_zero_once_taken() {
        let before = take();
        iot::counters::retried();
        iot::counters::retried();
        iot::counters::gave_up();
        fleet_error();
        let taken = take();
        // Other tests in this process may bump them too: at least ours are there.
        assert!(taken.aws_retries >= 2 && taken.aws_give_ups >= 1 && taken.fleet_errors >= 1);
        let _ = before;
    }
}
