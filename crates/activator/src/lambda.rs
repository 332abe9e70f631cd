//! What both Lambda binaries (`bootstrap`, `provisioner`) set up the same way: JSON log lines
//! on stdout, the cold start (configuration, then the service built), the exit code, and the
//! invocation's deadline as a tokio instant.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the epoch.
pub fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The invocation deadline (Lambda's epoch milliseconds) as a tokio instant.
pub fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = epoch_ms() as u64;
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// One flat JSON object per log line on stdout (CloudWatch Logs), filtered by `JITR_LOG`
/// (default `info`).
pub fn init_json_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JITR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}

/// A Lambda binary's cold start: JSON logs on, the configuration read from the environment,
/// then the service built from it. A failure is logged and printed on stderr in one line
/// (`jitr <name>: configuration error: …`, `jitr <name>: …`) and ends the process with exit
/// code 1, which Lambda reports as the init error.
pub async fn start<C, S, CE, BE, Fut>(
    name: &str,
    config: impl FnOnce() -> Result<C, CE>,
    build: impl FnOnce(C) -> Fut,
) -> Result<S, ExitCode>
where
    CE: Display,
    BE: Display,
    Fut: Future<Output = Result<S, BE>>,
{
    init_json_logs();
    let config = config().map_err(|e| {
        tracing::error!(error = %e, "invalid configuration");
        eprintln!("jitr {name}: configuration error: {e}");
        ExitCode::from(1)
    })?;
    build(config).await.map_err(|e| {
        tracing::error!(error = %e, "cannot start");
        eprintln!("jitr {name}: {e}");
        ExitCode::from(1)
    })
}

/// The exit code once the runtime's loop has ended: 0, or 1 with the error logged.
pub fn ended<E: Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "runtime failed");
            ExitCode::from(1)
        }
    }
}
