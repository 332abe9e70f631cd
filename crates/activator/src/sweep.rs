//! The sweep that catches certificates whose events were lost: every certificate under a CA
//! still PENDING_ACTIVATION (and old enough) goes through the same decision as an event.
//!
//! Its cost follows the work, not the fleet: listings go newest first and stop at the window
//! (`JITR_SWEEP_WINDOW`, 48 h: anything older was swept many times already), decisions start as
//! soon as a page names a pending certificate, every page and every decision has a deadline of
//! its own, and each CA gets its own share of the time, so one CA whose listing keeps failing
//! neither stops nor starves the others.
//!
//! With a ledger, the sweep also marks `activated` on every ACTIVE certificate registered in
//! the last [`LEDGER_MARK_WINDOW`]: a decision whose ledger write failed is put right by the
//! next sweeps (a conditional write that changes nothing when the mark is there already).

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::ledger::{LedgerMark, Marked};
use crate::{ActivationError, Activator, Decision, FleetDirectory, Outcome};
use iot::error_chain;
use iot::{CertificateId, CertificateStatus, IotRegistry, ListedCertificate};

/// The time one decision of a sweep may take (the Lambda's own events get the invocation's).
pub const SWEEP_DECISION_TIME: Duration = Duration::from_secs(20);

/// The longest one page of a listing may take, retries included: an unreachable endpoint
/// fails a CA's listing in this time, not at the sweep's deadline.
pub const SWEEP_PAGE_TIME: Duration = Duration::from_secs(15);

/// A sweep starts no decision with less time than this left before its deadline: the fleet
/// check alone wants 3 s left when it starts (time for what follows it), the registry keeps
/// 0.5 s to answer, and the calls themselves take some.
const SWEEP_DECISION_MIN_TIME: Duration = Duration::from_secs(5);

/// How far back the sweep marks ACTIVE certificates in the ledger: eight sweeps at the
/// deployed 15-minute rate, so a failed mark gets eight more tries while the cost stays with
/// the recent activations, not the fleet.
pub const LEDGER_MARK_WINDOW: Duration = Duration::from_secs(2 * 3600);

/// What to sweep and how.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Leave certificates registered less than this ago to their own event.
    pub min_age: Duration,
    /// Look back this far, newest first; `None` lists the whole history, oldest first.
    pub window: Option<Duration>,
    /// The time the ages are measured from, epoch seconds.
    pub now: i64,
    /// Only list what would be decided.
    pub dry_run: bool,
    /// Decisions at once.
    pub concurrency: usize,
}

/// What a sweep of one CA found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// The CA swept.
    pub ca_certificate_id: String,
    /// Pages of ListCertificatesByCA read.
    pub pages: usize,
    /// Certificates listed.
    pub listed: usize,
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
    /// ACTIVE certificates the ledger did not say were activated, marked now.
    pub ledger_marked: usize,
    /// Certificates whose decision failed (still pending): id and reason.
    pub failing: Vec<(String, String)>,
    /// Every decision reached (empty on a dry run).
    pub decisions: Vec<Decision>,
    /// Pending certificate ids (what a dry run would act on).
    pub pending_ids: Vec<String>,
    /// Why the listing ended early, if it did (a failure, or no time left): the next sweep
    /// goes on from the newest again.
    pub incomplete: Option<String>,
}

impl SweepReport {
    /// Whether anything is left for another sweep: failing decisions or an unfinished listing.
    pub fn is_complete(&self) -> bool {
        self.failing.is_empty() && self.incomplete.is_none()
    }
}

/// What a sweep reports as it goes, for progress on a terminal or in a log.
#[derive(Debug)]
pub enum SweepEvent<'a> {
    /// A page was read.
    Page {
        /// The CA.
        ca: &'a CertificateId,
        /// Pages so far.
        pages: usize,
        /// Certificates listed so far.
        listed: usize,
        /// Pending ones found so far.
        pending: usize,
    },
    /// A decision was reached.
    Decided(&'a Decision),
    /// A decision failed; the certificate stays pending.
    Failed {
        /// The certificate.
        id: &'a str,
        /// Why.
        reason: &'a str,
    },
}

/// Where sweep progress goes.
pub type Progress<'a> = &'a (dyn Fn(SweepEvent<'_>) + Sync);

/// What a sweep does with a listed certificate.
enum Work {
    /// Run the decision: it is pending.
    Decide(CertificateId),
    /// Mark it activated in the ledger: it is ACTIVE and recent.
    Mark(CertificateId),
}

/// What a sweep did with a listed certificate.
enum Done {
    /// Decided, or not.
    Decided(CertificateId, Result<Decision, SweepSkip>),
    /// Marked in the ledger (`true` when the mark was written now).
    Marked(bool),
}

/// Why a sweep did not decide a certificate.
enum SweepSkip {
    Failed(ActivationError),
    OutOfTime,
}

/// The listing of one CA as it goes.
struct Listing {
    marker: Option<String>,
    done: bool,
    pages: usize,
    listed: usize,
    pending: usize,
    incomplete: Option<String>,
}

impl<R: IotRegistry, F: FleetDirectory> Activator<R, F> {
    /// Sweeps every CA in `cas`, one after another, each with an equal share of the time left
    /// (time a CA does not use goes to the ones after it). A CA whose listing fails is reported
    /// and the next one swept all the same.
    pub async fn sweep_all(
        &self,
        cas: &[CertificateId],
        opts: &SweepOptions,
        deadline: Instant,
        progress: Progress<'_>,
    ) -> Vec<SweepReport> {
        let mut reports = Vec::with_capacity(cas.len());
        for (n, ca) in cas.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(cas.len() - n).unwrap_or(u32::MAX);
            let report = self.sweep(ca, opts, Instant::now() + share, progress).await;
            reports.push(report);
        }
        reports
    }

    /// Runs the decision for every certificate under `ca` still PENDING_ACTIVATION and old
    /// enough, listing and deciding at once; with `opts.dry_run`, only lists them. Each
    /// decision gets [`SWEEP_DECISION_TIME`] and each page [`SWEEP_PAGE_TIME`]; nothing starts
    /// once `deadline` is too near to finish it, and the report says how far it got.
    pub async fn sweep(
        &self,
        ca: &CertificateId,
        opts: &SweepOptions,
        deadline: Instant,
        progress: Progress<'_>,
    ) -> SweepReport {
        let cutoff = opts
            .now
            .saturating_sub(i64::try_from(opts.min_age.as_secs()).unwrap_or(i64::MAX));
        let oldest = opts.window.map(|w| {
            opts.now
                .saturating_sub(i64::try_from(w.as_secs()).unwrap_or(i64::MAX))
        });
        let listing = Mutex::new(Listing {
            marker: None,
            done: false,
            pages: 0,
            listed: 0,
            pending: 0,
            incomplete: None,
        });
        let listing_ref = &listing;
        let mark_since = (self.ledger.is_some() && !opts.dry_run)
            .then(|| opts.now.saturating_sub(LEDGER_MARK_WINDOW.as_secs() as i64));
        let pages = futures::stream::unfold((), move |()| async move {
            let listing = listing_ref;
            let page = self.next_page(ca, opts, oldest, listing, deadline).await?;
            let found = {
                let mut state = listing.lock().unwrap_or_else(|e| e.into_inner());
                let work: Vec<Work> = page
                    .into_iter()
                    .filter_map(|c| match c.status {
                        CertificateStatus::PendingActivation
                            if c.created.is_none_or(|t| t <= cutoff) =>
                        {
                            Some(Work::Decide(c.id))
                        }
                        CertificateStatus::Active
                            if mark_since
                                .is_some_and(|since| c.created.is_some_and(|t| t >= since)) =>
                        {
                            Some(Work::Mark(c.id))
                        }
                        _ => None,
                    })
                    .collect();
                state.pending += work.iter().filter(|w| matches!(w, Work::Decide(_))).count();
                progress(SweepEvent::Page {
                    ca,
                    pages: state.pages,
                    listed: state.listed,
                    pending: state.pending,
                });
                work
            };
            Some((futures::stream::iter(found), ()))
        })
        .flatten();
        let mut report = SweepReport {
            ca_certificate_id: ca.to_string(),
            ..SweepReport::default()
        };
        if opts.dry_run {
            report.pending_ids = pages
                .filter_map(|work| async move {
                    match work {
                        Work::Decide(id) => Some(id.to_string()),
                        Work::Mark(_) => None,
                    }
                })
                .collect()
                .await;
        } else {
            let results: Vec<_> = pages
                .map(|work| async move {
                    match work {
                        Work::Decide(id) => {
                            let (id, result) = self.sweep_one(id, ca, deadline).await;
                            Done::Decided(id, result)
                        }
                        Work::Mark(id) => {
                            let own = deadline.min(Instant::now() + SWEEP_PAGE_TIME);
                            let marked = self.mark_ledger(&id, LedgerMark::Activated, own).await;
                            if marked == Some(Marked::Written) {
                                tracing::info!(certificate_id = %id, "ledger marked activated by the sweep");
                            }
                            Done::Marked(marked == Some(Marked::Written))
                        }
                    }
                })
                .buffer_unordered(opts.concurrency.max(1))
                .collect()
                .await;
            for done in results {
                match done {
                    Done::Decided(id, result) => report.record(&id, result, progress),
                    Done::Marked(written) => report.ledger_marked += usize::from(written),
                }
            }
        }
        let listing = listing.into_inner().unwrap_or_else(|e| e.into_inner());
        report.pages = listing.pages;
        report.listed = listing.listed;
        report.pending = listing.pending;
        report.incomplete = listing.incomplete;
        report
    }

    /// The next page of `ca`'s listing, or `None` at its end, at the window, out of time or
    /// on a failure (noted in `listing`).
    async fn next_page(
        &self,
        ca: &CertificateId,
        opts: &SweepOptions,
        oldest: Option<i64>,
        listing: &Mutex<Listing>,
        deadline: Instant,
    ) -> Option<Vec<ListedCertificate>> {
        let marker = {
            let state = listing.lock().unwrap_or_else(|e| e.into_inner());
            if state.done {
                return None;
            }
            state.marker.clone()
        };
        let stop = |why: Option<String>| {
            let mut state = listing.lock().unwrap_or_else(|e| e.into_inner());
            state.done = true;
            state.incomplete = why;
        };
        if Instant::now() + Duration::from_secs(1) >= deadline {
            let pages = listing.lock().unwrap_or_else(|e| e.into_inner()).pages;
            stop(Some(format!(
                "no time left to list more than {pages} page(s); the next sweep starts from the newest again"
            )));
            return None;
        }
        let page_deadline = deadline.min(Instant::now() + SWEEP_PAGE_TIME);
        let newest_first = opts.window.is_some();
        match self
            .registry
            .list_certificates_by_ca(ca, marker, newest_first, page_deadline)
            .await
        {
            Err(e) => {
                stop(Some(format!("listing failed: {}", error_chain(&e))));
                None
            }
            Ok(page) => {
                let mut state = listing.lock().unwrap_or_else(|e| e.into_inner());
                state.pages += 1;
                state.listed += page.certificates.len();
                let past_window = oldest.is_some_and(|oldest| {
                    page.certificates
                        .iter()
                        .filter_map(|c| c.created)
                        .any(|t| t < oldest)
                });
                match page.next_marker {
                    Some(next) if !next.is_empty() && !past_window => state.marker = Some(next),
                    _ => state.done = true,
                }
                let certificates = page
                    .certificates
                    .into_iter()
                    .filter(|c| oldest.is_none_or(|o| c.created.is_none_or(|t| t >= o)))
                    .collect();
                Some(certificates)
            }
        }
    }

    /// One decision of a sweep, within its own time, unless too little is left.
    async fn sweep_one(
        &self,
        id: CertificateId,
        ca: &CertificateId,
        deadline: Instant,
    ) -> (CertificateId, Result<Decision, SweepSkip>) {
        let started = Instant::now();
        if started + SWEEP_DECISION_MIN_TIME > deadline {
            return (id, Err(SweepSkip::OutOfTime));
        }
        let own_deadline = (started + SWEEP_DECISION_TIME).min(deadline);
        let result = self.activate(&id, Some(ca), own_deadline).await;
        (id, result.map_err(SweepSkip::Failed))
    }
}

impl SweepReport {
    fn record(
        &mut self,
        id: &CertificateId,
        result: Result<Decision, SweepSkip>,
        progress: Progress<'_>,
    ) {
        match result {
            Ok(decision) => {
                match decision.outcome {
                    Outcome::Activated => self.activated += 1,
                    Outcome::Rejected => self.rejected += 1,
                    Outcome::Held => self.held += 1,
                    Outcome::AlreadyActive | Outcome::Skipped => self.skipped += 1,
                }
                progress(SweepEvent::Decided(&decision));
                self.decisions.push(decision);
            }
            Err(skip) => {
                let reason = match skip {
                    SweepSkip::Failed(e) => error_chain(&e),
                    SweepSkip::OutOfTime => {
                        "not reached before the deadline; the next sweep takes it".to_owned()
                    }
                };
                progress(SweepEvent::Failed {
                    id: id.as_str(),
                    reason: &reason,
                });
                self.failing.push((id.to_string(), reason));
            }
        }
    }
}

#[cfg(test)]
mod tests;
