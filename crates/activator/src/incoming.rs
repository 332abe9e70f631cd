//! What can invoke the activator: the rule's certificate-registered event, a scheduled
//! (EventBridge) sweep, or SQS records replaying events that failed before.

use base64::Engine;
use serde_json::Value;

use crate::{EventError, RegisteredEvent};

/// One SQS record replaying an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    /// The SQS message id (reported back for records that should be retried).
    pub message_id: String,
    /// The event, or why it cannot be replayed.
    pub event: Result<RegisteredEvent, EventError>,
}

/// A parsed invocation payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `$aws/events/certificates/registered/<caId>` via the topic rule.
    Registered(RegisteredEvent),
    /// An EventBridge scheduled event: sweep every trusted CA.
    Sweep,
    /// SQS records from the failure queue.
    Replay(Vec<ReplayRecord>),
}

impl Incoming {
    /// Recognises the payload's kind and validates it.
    pub fn from_value(v: &Value) -> Result<Incoming, EventError> {
        if let Some(records) = v.get("Records").and_then(Value::as_array) {
            return Ok(Incoming::Replay(
                records.iter().map(replay_record).collect(),
            ));
        }
        if v.get("source").and_then(Value::as_str) == Some("aws.events")
            && v.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event")
        {
            return Ok(Incoming::Sweep);
        }
        RegisteredEvent::from_value(v).map(Incoming::Registered)
    }
}

/// The registered event inside one SQS record: a Lambda on-failure destination record
/// (`requestPayload`), a topic rule error-action message (`base64OriginalPayload`), or the
/// event itself.
fn replay_record(record: &Value) -> ReplayRecord {
    let message_id = record
        .get("messageId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let invalid = |reason| EventError::Invalid {
        field: "Records[].body",
        reason,
        shown: String::new(),
    };
    let event = (|| {
        let body = record
            .get("body")
            .and_then(Value::as_str)
            .ok_or(EventError::Missing {
                field: "Records[].body",
            })?;
        let body: Value = serde_json::from_str(body).map_err(|_| invalid("is not JSON"))?;
        if let Some(payload) = body.get("requestPayload") {
            return RegisteredEvent::from_value(payload);
        }
        if let Some(encoded) = body.get("base64OriginalPayload").and_then(Value::as_str) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| invalid("has invalid base64OriginalPayload"))?;
            let payload: Value = serde_json::from_slice(&bytes)
                .map_err(|_| invalid("has a base64OriginalPayload that is not JSON"))?;
            return RegisteredEvent::from_value(&payload);
        }
        RegisteredEvent::from_value(&body)
    })();
    ReplayRecord { message_id, event }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Value {
        serde_json::from_str(include_str!(
            "../../../testdata/aws/certificate-registered.json"
        ))
        .unwrap()
    }

    #[test]
    fn recognises_each_kind_of_invocation() {
        assert!(matches!(
            Incoming::from_value(&event()),
            Ok(Incoming::Registered(_))
        ));
        let scheduled = json!({"version": "0", "source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
        assert_eq!(Incoming::from_value(&scheduled), Ok(Incoming::Sweep));
        let destination = json!({"version": "1.0", "requestContext": {"condition": "RetriesExhausted"}, "requestPayload": event()});
        let rule_error = json!({"ruleName": "jitr", "base64OriginalPayload": base64::engine::general_purpose::STANDARD.encode(event().to_string())});
        let sqs = json!({"Records": [
            {"messageId": "m1", "body": destination.to_string()},
            {"messageId": "m2", "body": rule_error.to_string()},
            {"messageId": "m3", "body": "not json"},
        ]});
        let Ok(Incoming::Replay(records)) = Incoming::from_value(&sqs) else {
            panic!()
        };
        assert_eq!(records.len(), 3);
        assert!(records[0].event.is_ok() && records[1].event.is_ok());
        assert_eq!(records[0].event, records[1].event);
        assert_eq!(records[2].message_id, "m3");
        assert!(records[2]
            .event
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("is not JSON"));
    }
}
