//! [`DynamoPresence`]: the presence log in the DynamoDB table the stack's presence topic rule
//! (`rules/presence-rule.json`) writes, one item per device and certificate: `device_id`
//! (partition key, S), `certificate_id` (sort key, S), `connected_at` (N, epoch milliseconds).
//!
//! Reads only: `all` scans every page, `device` queries one partition (the operator's grants
//! are `dynamodb:Scan` and `dynamodb:Query` on the table, nothing else). Reads are strongly
//! consistent, so a connection the rule has just recorded is seen. As the IoT adapter does, this
//! one owns its retrying: a throttled or transiently failed page is tried again after a
//! jittered, doubling backoff until the caller's deadline (less a reserve), then given up with
//! [`RegistryError::GaveUp`]. Pages are paced by a token bucket, so a large table's scan does
//! not eat a provisioned table's read capacity all at once.
//!
//! An item without a string `certificate_id` or a numeric `connected_at` is not a record the
//! rule wrote; it is skipped (logged), and a device without records counts as never connected,
//! which holds a retirement rather than allowing one.

use std::collections::HashMap;
use std::future::Future;

use aws_config::retry::RetryConfig;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use tokio::time::Instant;

use crate::presence::{Connection, PresenceLog};
use iot::aws::RetryPolicy;
use iot::Cause;
use iot::RegistryError;
use pace::Pace;

/// The attribute names the rule's SELECT gives.
pub mod item {
    /// Partition key: the MQTT client id, a jitr device's Thing name.
    pub const DEVICE_ID: &str = "device_id";
    /// Sort key: the certificate id (`principalIdentifier`).
    pub const CERTIFICATE_ID: &str = "certificate_id";
    /// Epoch milliseconds of the latest connection with that certificate.
    pub const CONNECTED_AT: &str = "connected_at";
}

/// Pages read a second by default.
const PAGES_PER_SECOND: f64 = 20.0;

/// The presence table through the SDK.
#[derive(Debug)]
pub struct DynamoPresence {
    client: Client,
    table: String,
    retry: RetryPolicy,
    pace: Pace,
    /// Items asked for per page (`Limit`); `None`: DynamoDB's 1 MB pages.
    page_size: Option<i32>,
}

/// One line saying why a call failed, in AWS's words or the network's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Detail(String);

impl DynamoPresence {
    /// The table `table` through a client built from `sdk` (the SDK's own retry off: this
    /// adapter retries, by [`RetryPolicy::default`], within the caller's deadline).
    pub fn new(sdk: &SdkConfig, table: &str) -> Self {
        let config = aws_sdk_dynamodb::config::Builder::from(sdk)
            .retry_config(RetryConfig::disabled())
            .build();
        DynamoPresence {
            client: Client::from_conf(config),
            table: table.to_owned(),
            retry: RetryPolicy::default(),
            pace: Pace::new(PAGES_PER_SECOND),
            page_size: None,
        }
    }

    /// The same with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same reading at most `pages_per_second` pages a second (at least one).
    pub fn with_pace(mut self, pages_per_second: f64) -> Self {
        self.pace = Pace::new(pages_per_second);
        self
    }

    /// The same asking for at most `items` items a page (at least one), so that each page's
    /// read is smaller (a provisioned table's capacity spread over more, paced, calls).
    pub fn with_page_size(mut self, items: i32) -> Self {
        self.page_size = Some(items.max(1));
        self
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Maps an SDK error to a [`RegistryError`] by DynamoDB's error code and HTTP status.
    fn classify<E, R>(&self, op: &'static str, err: SdkError<E, R>) -> RegistryError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let source = |detail: String| -> Cause { Box::new(Detail(detail)) };
        let detail = format!(
            "presence table {}: {}",
            self.table,
            iot::aws::sdk_error_text("DynamoDB", &err)
        );
        match &err {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => {
                return RegistryError::Unavailable {
                    op,
                    source: source(detail),
                }
            }
            SdkError::ServiceError(_) => {}
            _ => {
                return RegistryError::Failed {
                    op,
                    source: source(detail),
                }
            }
        }
        let source: Cause = Box::new(iot::AwsAnswer {
            code: err.code().map(str::to_owned),
            line: detail,
        });
        match err.code() {
            Some("ResourceNotFoundException") => RegistryError::NotFound { op, source },
            Some(
                "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded",
            ) => RegistryError::Throttled { op, source },
            Some("InternalServerError" | "ServiceUnavailable") => {
                RegistryError::Unavailable { op, source }
            }
            _ => RegistryError::Failed { op, source },
        }
    }

    /// Runs `attempt` by the retry policy ([`RetryPolicy::run`]) once the page's token is
    /// taken from the pace.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let service = format!("presence table {}", self.table);
        let usable = deadline.checked_sub(self.retry.reserve).unwrap_or(deadline);
        if tokio::time::timeout_at(usable, self.pace.take())
            .await
            .is_err()
        {
            return Err(RegistryError::GaveUp {
                op,
                attempts: 0,
                last: Box::new(RegistryError::Unavailable {
                    op,
                    source: format!("no answer from {service} before the deadline").into(),
                }),
            });
        }
        self.retry.run(op, deadline, &service, attempt).await
    }

    /// Every item of a paged read: `page(start)` answers one page's items and where the next
    /// starts (DynamoDB's `LastEvaluatedKey`).
    async fn every_page<F, Fut>(&self, mut page: F) -> Result<Vec<Record>, RegistryError>
    where
        F: FnMut(Option<HashMap<String, AttributeValue>>) -> Fut,
        Fut: Future<Output = Result<Page, RegistryError>>,
    {
        let mut records = Vec::new();
        let mut start = None;
        loop {
            let (items, next) = page(start).await?;
            records.extend(items.iter().filter_map(|i| self.record(i)));
            match next {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => return Ok(records),
            }
        }
    }

    /// The record an item holds, or `None` (logged) when it is not one the rule wrote.
    fn record(&self, found: &HashMap<String, AttributeValue>) -> Option<Record> {
        let string = |name| found.get(name).and_then(|v| v.as_s().ok()).cloned();
        let device = string(item::DEVICE_ID);
        let certificate_id = string(item::CERTIFICATE_ID);
        let connected_at = found
            .get(item::CONNECTED_AT)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<i64>().ok());
        match (device, certificate_id, connected_at) {
            (Some(device), Some(certificate_id), Some(connected_at)) => Some((
                device,
                Connection {
                    certificate_id,
                    connected_at,
                },
            )),
            (device, _, _) => {
                tracing::warn!(table = %self.table, device = device.as_deref().unwrap_or("?"), "skipping a presence item without certificate_id or a numeric connected_at");
                None
            }
        }
    }
}

/// A device id and one of its connections.
type Record = (String, Connection);
/// One page's items and where the next page starts.
type Page = (
    Vec<HashMap<String, AttributeValue>>,
    Option<HashMap<String, AttributeValue>>,
);

impl PresenceLog for DynamoPresence {
    async fn all(
        &self,
        deadline: Instant,
    ) -> Result<HashMap<String, Vec<Connection>>, RegistryError> {
        const OP: &str = "DynamoDB Scan";
        let records = self
            .every_page(|start| async move {
                self.call(OP, deadline, || {
                    let request = self
                        .client
                        .scan()
                        .table_name(&self.table)
                        .consistent_read(true)
                        .projection_expression("#d, #c, #t")
                        .expression_attribute_names("#d", item::DEVICE_ID)
                        .expression_attribute_names("#c", item::CERTIFICATE_ID)
                        .expression_attribute_names("#t", item::CONNECTED_AT)
                        .set_limit(self.page_size)
                        .set_exclusive_start_key(start.clone());
                    async move {
                        let out = request.send().await.map_err(|e| self.classify(OP, e))?;
                        Ok((out.items().to_vec(), out.last_evaluated_key().cloned()))
                    }
                })
                .await
            })
            .await?;
        let mut by_device: HashMap<String, Vec<Connection>> = HashMap::new();
        for (device, connection) in records {
            by_device.entry(device).or_default().push(connection);
        }
        Ok(by_device)
    }

    async fn device(
        &self,
        device: &str,
        deadline: Instant,
    ) -> Result<Vec<Connection>, RegistryError> {
        const OP: &str = "DynamoDB Query";
        let records = self
            .every_page(|start| async move {
                self.call(OP, deadline, || {
                    let request = self
                        .client
                        .query()
                        .table_name(&self.table)
                        .consistent_read(true)
                        .key_condition_expression("#d = :d")
                        .projection_expression("#d, #c, #t")
                        .expression_attribute_names("#d", item::DEVICE_ID)
                        .expression_attribute_names("#c", item::CERTIFICATE_ID)
                        .expression_attribute_names("#t", item::CONNECTED_AT)
                        .expression_attribute_values(":d", AttributeValue::S(device.to_owned()))
                        .set_limit(self.page_size)
                        .set_exclusive_start_key(start.clone());
                    async move {
                        let out = request.send().await.map_err(|e| self.classify(OP, e))?;
                        Ok((out.items().to_vec(), out.last_evaluated_key().cloned()))
                    }
                })
                .await
            })
            .await?;
        Ok(records.into_iter().map(|(_, c)| c).collect())
    }
}
