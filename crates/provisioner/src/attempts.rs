//! One provisioning attempt per device per interval, across every running instance of the
//! function: a conditional write to a DynamoDB table (key `device_id`, a string) that succeeds
//! only when the device has no attempt younger than the interval. Items carry `expires_at`
//! (epoch seconds) for the table's TTL, so the table holds only recent attempts.

use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use factory_ca::DeviceId;
use tokio::time::Instant;

/// Whether an attempt may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Recorded: go ahead.
    Granted,
    /// The device had an attempt within the interval; the next may start in this many seconds.
    Limited {
        /// Seconds until the next attempt is allowed.
        retry_after: u64,
    },
}

/// The attempts table.
#[derive(Debug, Clone)]
pub struct Attempts {
    client: aws_sdk_dynamodb::Client,
    table: String,
    interval: Duration,
}

/// The write failed (the table is missing, access denied, DynamoDB unreachable): one line.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB PutItem on {table}: {reason}")]
pub struct AttemptsError {
    table: String,
    reason: String,
}

impl Attempts {
    /// The table `table` through a client built from `sdk`.
    pub fn new(sdk: &aws_config::SdkConfig, table: &str, interval: Duration) -> Self {
        Attempts {
            client: aws_sdk_dynamodb::Client::new(sdk),
            table: table.to_owned(),
            interval,
        }
    }

    /// Records an attempt for `device` at `now` (epoch seconds) unless one was recorded within
    /// the interval, by `deadline`.
    pub async fn claim(
        &self,
        device: &DeviceId,
        now: i64,
        deadline: Instant,
    ) -> Result<Claim, AttemptsError> {
        let interval = self.interval.as_secs() as i64;
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("device_id", AttributeValue::S(device.to_string()))
            .item("attempted_at", AttributeValue::N(now.to_string()))
            .item(
                "expires_at",
                AttributeValue::N((now + interval).to_string()),
            )
            .condition_expression("attribute_not_exists(device_id) OR attempted_at <= :cutoff")
            .expression_attribute_values(":cutoff", AttributeValue::N((now - interval).to_string()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send();
        let error = |reason: String| AttemptsError {
            table: self.table.clone(),
            reason,
        };
        let result = tokio::time::timeout_at(deadline, put)
            .await
            .map_err(|_| error("no answer before the deadline".into()))?;
        match result {
            Ok(_) => Ok(Claim::Granted),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                let previous = match e.as_service_error() {
                    Some(PutItemError::ConditionalCheckFailedException(c)) => c.item(),
                    _ => None,
                };
                let previous = previous
                    .and_then(|item| item.get("attempted_at"))
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<i64>().ok());
                let retry_after = match previous {
                    Some(at) => (at + interval - now).clamp(1, interval),
                    None => interval,
                };
                Ok(Claim::Limited {
                    retry_after: retry_after as u64,
                })
            }
            Err(e) => Err(error(DisplayErrorContext(&e).to_string())),
        }
    }
}
