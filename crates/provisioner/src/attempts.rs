//! One provisioning attempt per device per interval, across every running instance of the
//! function: a conditional write to a DynamoDB table (key `device_id`, a string) that succeeds
//! only when the device has no attempt younger than the interval. Items carry `expires_at`
//! (epoch seconds) for the table's TTL, so the table holds only recent attempts.
//!
//! The same table holds, under the key `undo/<device>`, what an attempt that failed could not
//! undo (the certificate to revoke and detach, the service whose credentials to remove), with
//! no `expires_at`: it stays until the device's next request finishes the undo.

use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use factory_ca::DeviceId;
use iot::CertificateId;
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

/// What a failed attempt left to undo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingUndo {
    /// The certificate made for the device, still to revoke and detach from its Thing.
    pub certificate: Option<CertificateId>,
    /// The service whose `AWS_CERT` and `AWS_PRIVATE_KEY` are still to remove.
    pub service: Option<String>,
}

impl PendingUndo {
    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.certificate.is_none() && self.service.is_none()
    }
}

/// A call on the table failed (the table is missing, access denied, DynamoDB unreachable):
/// one line.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {op} on {table}: {reason}")]
pub struct AttemptsError {
    op: &'static str,
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
        let error = |reason: String| self.error("PutItem", reason);
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

    /// Records what a failed attempt for `device` left to undo, at `now`, replacing any
    /// earlier record; an empty `undo` removes the record.
    pub async fn record_undo(
        &self,
        device: &DeviceId,
        undo: &PendingUndo,
        now: i64,
        deadline: Instant,
    ) -> Result<(), AttemptsError> {
        if undo.is_empty() {
            return self.clear_undo(device, deadline).await;
        }
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("device_id", undo_key(device))
            .item("recorded_at", AttributeValue::N(now.to_string()));
        if let Some(id) = &undo.certificate {
            put = put.item("certificate_id", AttributeValue::S(id.to_string()));
        }
        if let Some(service) = &undo.service {
            put = put.item("service", AttributeValue::S(service.clone()));
        }
        self.bounded("PutItem", deadline, put.send())
            .await
            .map(|_| ())
    }

    /// What an earlier attempt for `device` left to undo, if anything (a strongly consistent
    /// read: a record just written is seen).
    pub async fn pending_undo(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> Result<Option<PendingUndo>, AttemptsError> {
        let get = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("device_id", undo_key(device))
            .consistent_read(true)
            .send();
        let out = self.bounded("GetItem", deadline, get).await?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
        let certificate =
            match text("certificate_id") {
                Some(id) => Some(CertificateId::parse(&id).map_err(|e| {
                    self.error("GetItem", format!("the undo record of {device}: {e}"))
                })?),
                None => None,
            };
        let undo = PendingUndo {
            certificate,
            service: text("service"),
        };
        Ok((!undo.is_empty()).then_some(undo))
    }

    /// Removes the undo record of `device` (none is no error).
    pub async fn clear_undo(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> Result<(), AttemptsError> {
        let delete = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("device_id", undo_key(device))
            .send();
        self.bounded("DeleteItem", deadline, delete)
            .await
            .map(|_| ())
    }

    /// `call`'s answer by `deadline`, its failure as one line.
    async fn bounded<T, E>(
        &self,
        op: &'static str,
        deadline: Instant,
        call: impl std::future::Future<Output = Result<T, aws_sdk_dynamodb::error::SdkError<E>>>,
    ) -> Result<T, AttemptsError>
    where
        E: std::error::Error + 'static,
    {
        tokio::time::timeout_at(deadline, call)
            .await
            .map_err(|_| self.error(op, "no answer before the deadline".into()))?
            .map_err(|e| self.error(op, DisplayErrorContext(&e).to_string()))
    }

    fn error(&self, op: &'static str, reason: String) -> AttemptsError {
        AttemptsError {
            op,
            table: self.table.clone(),
            reason,
        }
    }
}

/// The key of a device's undo record: apart from its attempts (`device_id` is the bare id,
/// which holds no `/`).
fn undo_key(device: &DeviceId) -> AttributeValue {
    AttributeValue::S(format!("undo/{device}"))
}
