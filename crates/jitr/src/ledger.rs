//! The issuance ledger from the factory's side: `--ledger TABLE` on `issue`, `sign-csr` and
//! `rotate` writes an item per certificate issued (BatchWriteItem, under the stack's
//! FactoryLedgerPolicy); `jitr ledger import` writes a manifest's certificates that never
//! reached it and `jitr approve --add-to-ledger` adds one certificate (UpdateItem, the policy's
//! other grant).

use std::time::Duration;

use activator::dynamodb::DynamoLedger;
use activator::ledger::item;
use activator::ledger::LedgerEntry;
use anyhow::{Context, Result};
use factory_ca::ManifestEntry;
use time::OffsetDateTime;

use crate::cli::{AwsArgs, LedgerArgs};

/// The longest the ledger writes of one command may take, retries included.
pub(crate) const LEDGER_TIME: Duration = Duration::from_secs(120);

/// BatchWriteItem calls at once: 100 items in flight, well inside an on-demand table's start.
const CONCURRENCY: usize = 4;

/// The ledger item of a manifest line.
pub(crate) fn entry(
    line: &ManifestEntry,
    batch: &str,
    issued_at: &str,
    region: Option<String>,
) -> LedgerEntry {
    LedgerEntry {
        certificate_id: line.certificate_id.clone(),
        device_id: line.id.clone(),
        serial: line.serial.clone(),
        not_after: line.not_after.clone(),
        issued_at: issued_at.to_owned(),
        batch: batch.to_owned(),
        status: item::STATUS_ISSUED.to_owned(),
        region,
    }
}

/// The batch name: `--batch`, else the issuance time (one batch per command run).
pub(crate) fn batch_name(args: &LedgerArgs, now: OffsetDateTime) -> String {
    args.batch
        .clone()
        .unwrap_or_else(|| format!("issue-{}", factory_ca::show_time(now)))
}

/// Writes `entries` to the ledger `table`, saying what it did: `false` (reported) when some
/// could not be written; the certificates are issued all the same, and the message names the
/// command that writes them later.
pub(crate) fn write(
    table: &str,
    aws: &AwsArgs,
    entries: &[LedgerEntry],
    manifest: &std::path::Path,
) -> Result<bool> {
    if entries.is_empty() {
        return Ok(true);
    }
    crate::aws::runtime()?.block_on(async {
        let session = crate::aws::session(aws).await?;
        let deadline = aws.deadline(LEDGER_TIME);
        put(table, &session, entries, manifest, deadline).await
    })
}

/// [`write`] on the command's runtime and AWS session, by `deadline`.
pub(crate) async fn put(
    table: &str,
    session: &iot::aws::Session,
    entries: &[LedgerEntry],
    manifest: &std::path::Path,
    deadline: tokio::time::Instant,
) -> Result<bool> {
    if entries.is_empty() {
        return Ok(true);
    }
    let bar = crate::progress::bar(entries.len(), "in the ledger", 200);
    let report = DynamoLedger::new(session.config(), table)
        .put_entries(entries, CONCURRENCY, deadline, &|n| bar.inc(n as u64))
        .await;
    bar.finish_and_clear();
    if report.unwritten.is_empty() {
        eprintln!(
            "recorded {} certificate(s) in the ledger {table}",
            report.written
        );
        return Ok(true);
    }
    let (first, why) = &report.unwritten[0];
    eprintln!(
        "jitr: {} of {} certificate(s) are issued but NOT in the ledger {table} (first {first}: {why}); \
         with JITR_LEDGER=require they are held at first connect: write them with \
         `jitr ledger import --manifest {} --ledger {table}`",
        report.unwritten.len(),
        entries.len(),
        manifest.display()
    );
    Ok(false)
}

/// The newest manifest line of each of `ids` (a forced re-issue appends a newer one).
pub(crate) fn newest_entries(
    manifest: &std::path::Path,
    ids: &std::collections::HashSet<&str>,
) -> Result<Vec<ManifestEntry>> {
    let mut newest = std::collections::HashMap::new();
    for line in factory_ca::read_manifest(manifest)? {
        if ids.contains(line.id.as_str()) {
            newest.insert(line.id.clone(), line);
        }
    }
    Ok(newest.into_values().collect())
}

/// The ledger entry of a certificate AWS IoT holds (`jitr approve --add-to-ledger`).
pub(crate) fn entry_from_pem(
    pem: &str,
    certificate_id: &str,
    now: OffsetDateTime,
) -> Result<LedgerEntry> {
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())
        .map_err(|reason| anyhow::anyhow!("the certificate AWS IoT holds: {reason}"))?
        .into_iter()
        .next()
        .context("AWS IoT holds no certificate PEM for it")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("the certificate AWS IoT holds: {e}"))?;
    let device_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .context("the certificate has no CN (device id)")?
        .to_owned();
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map(factory_ca::show_time)
        .unwrap_or_default();
    Ok(LedgerEntry {
        certificate_id: certificate_id.to_owned(),
        device_id,
        serial: hex::encode(cert.raw_serial()),
        not_after,
        issued_at: factory_ca::show_time(now),
        batch: "approved".to_owned(),
        status: item::STATUS_ISSUED.to_owned(),
        region: None,
    })
}

/// Marks `ids` activated in the ledger `table` (the operator activated them: `jitr rotate`);
/// `false` (reported) when some could not be marked.
pub(crate) async fn mark_activated(
    table: &str,
    session: &iot::aws::Session,
    ids: &[&iot::CertificateId],
    deadline: tokio::time::Instant,
) -> Result<bool> {
    use activator::ledger::Ledger;
    let ledger = DynamoLedger::new(session.config(), table);
    let now = factory_ca::show_time(OffsetDateTime::now_utc());
    let mark = activator::ledger::LedgerMark::Activated;
    let mut all = true;
    for id in ids {
        if let Err(e) = ledger
            .mark(id, &mark, &now, iot::call_deadline(deadline))
            .await
        {
            eprintln!(
                "jitr: {id} is ACTIVE but not marked activated in the ledger ({}); the activator's sweep marks it",
                iot::error_chain(&e)
            );
            all = false;
        }
    }
    Ok(all)
}
