//! The sweep that catches certificates whose events were lost: every certificate under a CA
//! still PENDING_ACTIVATION (and old enough) goes through the same decision as an event.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::error::error_chain;
use crate::{
    ActivationError, Activator, CertificateId, CertificateStatus, Decision, FleetDirectory,
    IotRegistry, Outcome,
};

/// What a reconcile sweep found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Certificates still PENDING_ACTIVATION (and old enough) when listed.
    pub pending: usize,
    /// Activated now.
    pub activated: usize,
    /// Rejected now (revoked or deactivated).
    pub rejected: usize,
    /// Held: another certificate is the device's identity (`jitr approve` decides).
    pub held: usize,
    /// Skipped or found already active by the time their turn came.
    pub skipped: usize,
    /// Certificates whose decision failed (still pending): id and reason.
    pub failing: Vec<(String, String)>,
    /// Every decision reached (empty on a dry run).
    pub decisions: Vec<Decision>,
    /// Pending certificate ids (what a dry run would act on).
    pub pending_ids: Vec<String>,
}

/// The time one decision of a sweep may take (the Lambda's own events get the invocation's).
pub const SWEEP_DECISION_TIME: Duration = Duration::from_secs(20);

/// A sweep starts no decision with less time than this left before its deadline: the fleet
/// check alone wants 3 s left when it starts (time for what follows it), the registry keeps
/// 0.5 s to answer, and the calls themselves take some.
const SWEEP_DECISION_MIN_TIME: Duration = Duration::from_secs(5);

/// Why a sweep did not decide a certificate.
enum SweepSkip {
    Failed(ActivationError),
    OutOfTime,
}

impl<R: IotRegistry, F: FleetDirectory> Activator<R, F> {
    /// Runs the decision for every certificate under `ca` still PENDING_ACTIVATION and
    /// registered at least `min_age` before `now` (epoch seconds): the sweep that catches
    /// events Lambda dropped. With `dry_run`, only lists them. Each decision gets
    /// [`SWEEP_DECISION_TIME`], and none starts once `deadline` is too near to finish it:
    /// those are reported failing, to be picked up by the next sweep.
    pub async fn sweep(
        &self,
        ca: &CertificateId,
        min_age: Duration,
        now: i64,
        dry_run: bool,
        concurrency: usize,
        deadline: Instant,
    ) -> Result<SweepReport, ActivationError> {
        use futures::StreamExt;

        let cutoff = now.saturating_sub(i64::try_from(min_age.as_secs()).unwrap_or(i64::MAX));
        let mut pending = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .registry
                .list_certificates_by_ca(ca, marker, deadline)
                .await?;
            pending.extend(
                page.certificates
                    .into_iter()
                    .filter(|c| c.status == CertificateStatus::PendingActivation)
                    .filter(|c| c.created.is_none_or(|t| t <= cutoff))
                    .map(|c| c.id),
            );
            match page.next_marker {
                Some(next) if !next.is_empty() => marker = Some(next),
                _ => break,
            }
        }
        let mut report = SweepReport {
            pending: pending.len(),
            pending_ids: pending.iter().map(|id| id.to_string()).collect(),
            ..SweepReport::default()
        };
        if dry_run {
            return Ok(report);
        }
        let results: Vec<_> = futures::stream::iter(pending)
            .map(|id| async move {
                let started = Instant::now();
                if started + SWEEP_DECISION_MIN_TIME > deadline {
                    return (id, Err(SweepSkip::OutOfTime));
                }
                let own_deadline = (started + SWEEP_DECISION_TIME).min(deadline);
                let result = self.activate(&id, Some(ca), own_deadline).await;
                (id, result.map_err(SweepSkip::Failed))
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        for (id, result) in results {
            match result {
                Ok(decision) => {
                    match decision.outcome {
                        Outcome::Activated => report.activated += 1,
                        Outcome::Rejected => report.rejected += 1,
                        Outcome::Held => report.held += 1,
                        Outcome::AlreadyActive | Outcome::Skipped => report.skipped += 1,
                    }
                    report.decisions.push(decision);
                }
                Err(SweepSkip::Failed(e)) => report.failing.push((id.to_string(), error_chain(&e))),
                Err(SweepSkip::OutOfTime) => report.failing.push((
                    id.to_string(),
                    "not reached before the deadline; the next sweep takes it".to_owned(),
                )),
            }
        }
        Ok(report)
    }
}
