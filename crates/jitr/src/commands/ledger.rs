//! `jitr ledger import`: a manifest's certificates written into the issuance ledger.

use activator::dynamodb::DynamoLedger;
use activator::ledger::Ledger;
use anyhow::Result;
use futures::StreamExt;
use time::OffsetDateTime;

use super::{print_json, Outcome};
use crate::cli::LedgerImportArgs;

/// The longest an import may take in all [`--timeout` overrides it].
const IMPORT_TIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// The longest one item's write may take, the SDK's retries included.
const ITEM_TIME: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn import(args: LedgerImportArgs) -> Result<Outcome> {
    let lines = factory_ca::read_manifest(&args.manifest)?;
    let now = OffsetDateTime::now_utc();
    let batch = args
        .batch
        .clone()
        .unwrap_or_else(|| format!("import-{}", factory_ca::show_time(now)));
    // A line's issuance time is its notBefore: the manifest keeps no other.
    let entries: Vec<_> = lines
        .iter()
        .map(|line| crate::ledger::entry(line, &batch, &line.not_before, None))
        .collect();
    let bar = crate::progress::bar(entries.len(), "in the ledger", 200);
    let failures: Vec<(String, String)> = crate::aws::runtime()?.block_on(async {
        let session = crate::aws::session(&args.aws).await?;
        let ledger = DynamoLedger::new(session.config(), &args.ledger);
        let deadline = args.aws.deadline(IMPORT_TIME);
        let failures = futures::stream::iter(&entries)
            .map(|entry| {
                let ledger = &ledger;
                let bar = &bar;
                async move {
                    let own = deadline.min(tokio::time::Instant::now() + ITEM_TIME);
                    let result = ledger.add(entry, own).await;
                    bar.inc(1);
                    result
                        .err()
                        .map(|e| (entry.certificate_id.clone(), iot::error_chain(&e)))
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .filter_map(|failure| async move { failure })
            .collect()
            .await;
        anyhow::Ok(failures)
    })?;
    bar.finish_and_clear();
    for line in failure_lines(&failures) {
        eprintln!("jitr: {line}");
    }
    let written = entries.len() - failures.len();
    if args.output.json {
        print_json(&serde_json::json!({
            "table": args.ledger,
            "written": written,
            "failed": failures.len(),
        }))?;
    }
    eprintln!(
        "{written} of {} certificate(s) of {} are in the ledger {} (those it listed keep their status){}",
        entries.len(),
        args.manifest.display(),
        args.ledger,
        if failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed: run it again", failures.len())
        }
    );
    Ok(if failures.is_empty() {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// One line per distinct reason, not per certificate: a missing table or an unreachable
/// endpoint fails every item alike, and a million lines of it help nobody. In the order the
/// reasons first appeared, each with its count and the first certificate it failed.
fn failure_lines(failures: &[(String, String)]) -> Vec<String> {
    let mut reasons: Vec<(&str, &str, usize)> = Vec::new();
    for (id, why) in failures {
        match reasons.iter_mut().find(|(reason, _, _)| reason == why) {
            Some((_, _, count)) => *count += 1,
            None => reasons.push((why, id, 1)),
        }
    }
    reasons
        .into_iter()
        .map(|(why, id, count)| match count {
            1 => format!("{id}: {why}"),
            n => format!("{why} ({n} certificates, the first {id})"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::failure_lines;

    #[test]
    fn failures_are_told_once_per_reason() {
        let f = |id: &str, why: &str| (id.to_owned(), why.to_owned());
        let failures = [
            f(
                "a1",
                "ResourceNotFoundException: Requested resource not found",
            ),
            f("b2", "ValidationException: too big"),
            f(
                "c3",
                "ResourceNotFoundException: Requested resource not found",
            ),
        ];
        assert_eq!(
            failure_lines(&failures),
            [
                "ResourceNotFoundException: Requested resource not found (2 certificates, the first a1)",
                "b2: ValidationException: too big",
            ]
        );
    }
}
