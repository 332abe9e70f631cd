//! [`DynamoLedger`]: the issuance ledger in a DynamoDB table keyed by `certificate_id` (a
//! string). The activator reads with GetItem and marks with UpdateItem (its only grants); the
//! factory writes new items with BatchWriteItem, 25 at a time, retrying what DynamoDB leaves
//! unprocessed until the command's deadline, and `jitr ledger import` / `approve
//! --add-to-ledger` add one with UpdateItem (the factory policy's two grants, both limited to
//! the issuance attributes: rules/README.md).
//!
//! The SDK's standard retry (three attempts, jittered) handles throttling of single calls; each
//! call is also bounded by the caller's deadline.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeValue, PutRequest, ReturnValuesOnConditionCheckFailure, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use tokio::time::Instant;

use crate::ledger::{item, Ledger, LedgerEntry, LedgerError, LedgerFuture, LedgerMark, Marked};
use iot::CertificateId;

/// BatchWriteItem's limit of items per call.
const BATCH: usize = 25;

/// Time kept free before a deadline: a call that would end past it is not started.
const RESERVE: Duration = Duration::from_millis(300);

/// The ledger table through the SDK.
#[derive(Debug, Clone)]
pub struct DynamoLedger {
    client: Client,
    table: String,
    /// The region this client works in: recorded on activation.
    region: Option<String>,
}

/// What a batch write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerBatchReport {
    /// Items written.
    pub written: usize,
    /// Certificate ids not written (the deadline came first, or DynamoDB refused), with why.
    pub unwritten: Vec<(String, String)>,
}

impl DynamoLedger {
    /// The table `table` through a client built from `sdk`.
    pub fn new(sdk: &SdkConfig, table: &str) -> Self {
        DynamoLedger {
            client: Client::new(sdk),
            table: table.to_owned(),
            region: sdk.region().map(|r| r.to_string()),
        }
    }

    fn error(&self, op: &'static str, retryable: bool, reason: String) -> LedgerError {
        LedgerError {
            op,
            table: self.table.clone(),
            retryable,
            source: reason.into(),
        }
    }

    fn sdk_error<E, R>(&self, op: &'static str, err: SdkError<E, R>) -> LedgerError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let retryable = match &err {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => true,
            SdkError::ServiceError(_) => matches!(
                err.code(),
                Some(
                    "ProvisionedThroughputExceededException"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        | "InternalServerError"
                        | "ServiceUnavailable"
                )
            ),
            _ => false,
        };
        self.error(op, retryable, iot::aws::sdk_error_text("DynamoDB", &err))
    }

    /// Runs `call` by `deadline` (less the reserve), or fails retryably.
    async fn bounded<T>(
        &self,
        op: &'static str,
        deadline: Instant,
        call: impl std::future::Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        let until = deadline.checked_sub(RESERVE).unwrap_or(deadline);
        match tokio::time::timeout_at(until, call).await {
            Ok(result) => result,
            Err(_) => Err(self.error(op, true, "no answer before the deadline".into())),
        }
    }

    /// Writes new items, 25 a call and `concurrency` calls at once, retrying unprocessed items
    /// with a doubling backoff until `deadline`. An existing item of the same certificate id is
    /// replaced (issuance makes a new certificate every time, so only a retried write meets
    /// its own item). `progress` is called with the number of items each call wrote.
    pub async fn put_entries(
        &self,
        entries: &[LedgerEntry],
        concurrency: usize,
        deadline: Instant,
        progress: &(dyn Fn(usize) + Sync),
    ) -> LedgerBatchReport {
        use futures::StreamExt;
        let results: Vec<LedgerBatchReport> = futures::stream::iter(entries.chunks(BATCH))
            .map(|chunk| self.put_chunk(chunk, deadline, progress))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut report = LedgerBatchReport::default();
        for part in results {
            report.written += part.written;
            report.unwritten.extend(part.unwritten);
        }
        report
    }

    async fn put_chunk(
        &self,
        chunk: &[LedgerEntry],
        deadline: Instant,
        progress: &(dyn Fn(usize) + Sync),
    ) -> LedgerBatchReport {
        let mut pending: Vec<WriteRequest> = Vec::with_capacity(chunk.len());
        for entry in chunk {
            match put_request(entry) {
                Ok(request) => pending.push(request),
                Err(reason) => {
                    return LedgerBatchReport {
                        written: 0,
                        unwritten: chunk
                            .iter()
                            .map(|e| (e.certificate_id.clone(), reason.clone()))
                            .collect(),
                    }
                }
            }
        }
        let mut written = 0;
        let mut backoff = Duration::from_millis(50);
        let mut last = String::new();
        while !pending.is_empty() {
            if Instant::now() + RESERVE >= deadline {
                break;
            }
            let sent = pending.len();
            let call = self
                .client
                .batch_write_item()
                .request_items(&self.table, pending.clone())
                .send();
            let outcome = self
                .bounded("BatchWriteItem", deadline, async {
                    call.await.map_err(|e| self.sdk_error("BatchWriteItem", e))
                })
                .await;
            match outcome {
                Ok(answer) => {
                    let left = answer
                        .unprocessed_items()
                        .and_then(|items| items.get(&self.table))
                        .cloned()
                        .unwrap_or_default();
                    written += sent - left.len();
                    progress(sent - left.len());
                    if !left.is_empty() {
                        last = format!("{} item(s) left unprocessed (throttled)", left.len());
                    }
                    pending = left;
                }
                Err(e) if e.retryable => last = iot::error_chain(&e),
                Err(e) => {
                    last = iot::error_chain(&e);
                    break;
                }
            }
            if !pending.is_empty() {
                let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        let unwritten = pending
            .iter()
            .filter_map(|w| w.put_request())
            .filter_map(|p| p.item().get(item::CERTIFICATE_ID))
            .filter_map(|v| v.as_s().ok())
            .map(|id| (id.clone(), last.clone()))
            .collect();
        LedgerBatchReport { written, unwritten }
    }
}

/// An item for `entry`.
fn attributes(entry: &LedgerEntry) -> HashMap<String, AttributeValue> {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let mut map = HashMap::from([
        (item::CERTIFICATE_ID.to_owned(), s(&entry.certificate_id)),
        (item::DEVICE_ID.to_owned(), s(&entry.device_id)),
        (item::SERIAL.to_owned(), s(&entry.serial)),
        (item::NOT_AFTER.to_owned(), s(&entry.not_after)),
        (item::ISSUED_AT.to_owned(), s(&entry.issued_at)),
        (item::BATCH.to_owned(), s(&entry.batch)),
        (item::STATUS.to_owned(), s(&entry.status)),
    ]);
    if let Some(region) = &entry.region {
        map.insert(item::REGION.to_owned(), s(region));
    }
    map
}

fn put_request(entry: &LedgerEntry) -> Result<WriteRequest, String> {
    let put = PutRequest::builder()
        .set_item(Some(attributes(entry)))
        .build()
        .map_err(|e| e.to_string())?;
    Ok(WriteRequest::builder().put_request(put).build())
}

/// The entry an item holds; `None` when a required attribute is missing.
fn entry_of(found: &HashMap<String, AttributeValue>) -> Option<LedgerEntry> {
    let get = |name: &str| found.get(name).and_then(|v| v.as_s().ok()).cloned();
    Some(LedgerEntry {
        certificate_id: get(item::CERTIFICATE_ID)?,
        device_id: get(item::DEVICE_ID)?,
        serial: get(item::SERIAL).unwrap_or_default(),
        not_after: get(item::NOT_AFTER).unwrap_or_default(),
        issued_at: get(item::ISSUED_AT).unwrap_or_default(),
        batch: get(item::BATCH).unwrap_or_default(),
        status: get(item::STATUS).unwrap_or_default(),
        region: get(item::REGION),
    })
}

impl Ledger for DynamoLedger {
    fn entry<'a>(
        &'a self,
        id: &'a CertificateId,
        deadline: Instant,
    ) -> LedgerFuture<'a, Option<LedgerEntry>> {
        Box::pin(self.bounded("GetItem", deadline, async move {
            let answer = self
                .client
                .get_item()
                .table_name(&self.table)
                .key(item::CERTIFICATE_ID, AttributeValue::S(id.to_string()))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| self.sdk_error("GetItem", e))?;
            match answer.item() {
                None => Ok(None),
                Some(found) => entry_of(found).map(Some).ok_or_else(|| {
                    self.error(
                        "GetItem",
                        false,
                        format!("the item of {id} has no {} attribute", item::DEVICE_ID),
                    )
                }),
            }
        }))
    }

    fn mark<'a>(
        &'a self,
        id: &'a CertificateId,
        mark: &'a LedgerMark,
        now: &'a str,
        deadline: Instant,
    ) -> LedgerFuture<'a, Marked> {
        Box::pin(self.bounded("UpdateItem", deadline, async move {
            // Every attribute by a placeholder name: `status` and `region` are reserved words.
            let mut update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(item::CERTIFICATE_ID, AttributeValue::S(id.to_string()))
                .expression_attribute_names("#id", item::CERTIFICATE_ID)
                .expression_attribute_names("#s", item::STATUS)
                .expression_attribute_names("#decided", item::DECIDED_AT)
                .expression_attribute_names("#reason", item::REASON)
                .expression_attribute_values(":s", AttributeValue::S(mark.status().into()))
                .expression_attribute_values(":now", AttributeValue::S(now.into()))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            update = match mark {
                LedgerMark::Activated => {
                    // Marked once: a second mark (the sweep's) keeps the first time.
                    let mut set =
                        "SET #s = :s, #decided = :now, #activated = if_not_exists(#activated, :now)"
                            .to_owned();
                    update = update.expression_attribute_names("#activated", item::ACTIVATED_AT);
                    if let Some(region) = &self.region {
                        set.push_str(", #region = :region");
                        update = update
                            .expression_attribute_names("#region", item::REGION)
                            .expression_attribute_values(":region", AttributeValue::S(region.clone()));
                    }
                    update
                        .update_expression(format!("{set} REMOVE #reason"))
                        .condition_expression("attribute_exists(#id) AND #s <> :s")
                }
                LedgerMark::Held(reason) | LedgerMark::Rejected(reason) => update
                    .update_expression("SET #s = :s, #decided = :now, #reason = :reason")
                    .expression_attribute_values(":reason", AttributeValue::S(reason.clone()))
                    .condition_expression("attribute_exists(#id)"),
            };
            match update.send().await {
                Ok(_) => Ok(Marked::Written),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    let listed = match e.as_service_error() {
                        Some(
                            aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c),
                        ) => c.item().is_some_and(|i| !i.is_empty()),
                        _ => false,
                    };
                    Ok(if listed {
                        Marked::Unchanged
                    } else {
                        Marked::NotListed
                    })
                }
                Err(e) => Err(self.sdk_error("UpdateItem", e)),
            }
        }))
    }

    fn add<'a>(&'a self, entry: &'a LedgerEntry, deadline: Instant) -> LedgerFuture<'a, ()> {
        Box::pin(self.bounded("UpdateItem", deadline, async move {
            let s = |v: &str| AttributeValue::S(v.to_owned());
            // Every attribute by a placeholder name: `status` and `region` are reserved words.
            let mut set = vec![
                "#device = :device",
                "#serial = :serial",
                "#not_after = :not_after",
                "#issued_at = if_not_exists(#issued_at, :issued_at)",
                "#batch = if_not_exists(#batch, :batch)",
                "#s = if_not_exists(#s, :s)",
            ];
            let mut update = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(item::CERTIFICATE_ID, s(&entry.certificate_id))
                .expression_attribute_names("#device", item::DEVICE_ID)
                .expression_attribute_names("#serial", item::SERIAL)
                .expression_attribute_names("#not_after", item::NOT_AFTER)
                .expression_attribute_names("#issued_at", item::ISSUED_AT)
                .expression_attribute_names("#batch", item::BATCH)
                .expression_attribute_names("#s", item::STATUS)
                .expression_attribute_values(":device", s(&entry.device_id))
                .expression_attribute_values(":serial", s(&entry.serial))
                .expression_attribute_values(":not_after", s(&entry.not_after))
                .expression_attribute_values(":issued_at", s(&entry.issued_at))
                .expression_attribute_values(":batch", s(&entry.batch))
                .expression_attribute_values(":s", s(&entry.status));
            if let Some(region) = &entry.region {
                set.push("#region = if_not_exists(#region, :region)");
                update = update
                    .expression_attribute_names("#region", item::REGION)
                    .expression_attribute_values(":region", s(region));
            }
            update
                .update_expression(format!("SET {}", set.join(", ")))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.sdk_error("UpdateItem", e))
        }))
    }
}
