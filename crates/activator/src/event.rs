//! The certificate-registered event AWS IoT publishes, validated before any AWS call.

use serde_json::Value;

use iot::{AccountId, CertificateId};

/// Why an event was refused before any AWS call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The event is not a JSON object.
    #[error("malformed event: not a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("malformed event: {field} is missing")]
    Missing { field: &'static str },
    /// A field has the wrong type or shape.
    #[error("malformed event: {field} {reason} (got {shown})")]
    Invalid {
        field: &'static str,
        reason: &'static str,
        shown: String,
    },
}

/// The certificate-registered event AWS IoT publishes on
/// `$aws/events/certificates/registered/<caCertificateId>`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredEvent {
    /// The certificate to activate.
    pub certificate_id: CertificateId,
    /// The CA it was registered under.
    pub ca_certificate_id: CertificateId,
    /// The account the event claims to come from.
    pub aws_account_id: AccountId,
    /// Event time, epoch milliseconds.
    pub timestamp: u64,
}

/// A field value for an error message: bounded, escaped, never the whole of a huge input.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    if text.len() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

impl RegisteredEvent {
    /// Validates the event's required fields; extra fields are ignored.
    pub fn from_value(v: &Value) -> Result<Self, EventError> {
        let obj = v.as_object().ok_or(EventError::NotAnObject)?;
        let get = |field: &'static str| obj.get(field).ok_or(EventError::Missing { field });
        let string = |field: &'static str| -> Result<&str, EventError> {
            let value = get(field)?;
            value.as_str().ok_or_else(|| EventError::Invalid {
                field,
                reason: "is not a string",
                shown: shown(value),
            })
        };
        let invalid = |field: &'static str, reason: &'static str| EventError::Invalid {
            field,
            reason,
            shown: obj.get(field).map(shown).unwrap_or_default(),
        };

        let certificate_id = CertificateId::parse(string("certificateId")?)
            .map_err(|r| invalid("certificateId", r))?;
        let ca_certificate_id = CertificateId::parse(string("caCertificateId")?)
            .map_err(|r| invalid("caCertificateId", r))?;
        if string("certificateStatus")? != "PENDING_ACTIVATION" {
            return Err(invalid("certificateStatus", "is not PENDING_ACTIVATION"));
        }
        let aws_account_id =
            AccountId::parse(string("awsAccountId")?).map_err(|r| invalid("awsAccountId", r))?;
        let timestamp = get("timestamp")?
            .as_u64()
            .ok_or_else(|| invalid("timestamp", "is not a non-negative integer"))?;
        if let Some(reg) = obj.get("certificateRegistrationTimestamp") {
            let ok = match reg {
                Value::String(s) => {
                    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
                }
                Value::Number(n) => n.is_u64(),
                _ => false,
            };
            if !ok {
                return Err(invalid(
                    "certificateRegistrationTimestamp",
                    "is not epoch milliseconds",
                ));
            }
        }
        Ok(RegisteredEvent {
            certificate_id,
            ca_certificate_id,
            aws_account_id,
            timestamp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> Value {
        serde_json::from_str(include_str!(
            "../../../testdata/aws/certificate-registered.json"
        ))
        .unwrap()
    }

    #[test]
    fn parses_the_aws_fixture_and_ignores_extra_fields() {
        let mut v = fixture();
        v["somethingNew"] = json!({"nested": true});
        let e = RegisteredEvent::from_value(&v).unwrap();
        assert_eq!(
            e.certificate_id.as_str(),
            v["certificateId"].as_str().unwrap()
        );
        assert_eq!(e.aws_account_id.as_str(), "123456789012");
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("certificateId", Value::Null, "certificateId is missing"),
            (
                "certificateId",
                json!("ABC"),
                "certificateId a certificate id has 64 hex characters",
            ),
            ("certificateId", json!(42), "certificateId is not a string"),
            (
                "caCertificateId",
                json!("z".repeat(64)),
                "caCertificateId a certificate id is lowercase hexadecimal",
            ),
            (
                "certificateStatus",
                json!("ACTIVE"),
                "certificateStatus is not PENDING_ACTIVATION",
            ),
            (
                "awsAccountId",
                json!("1234"),
                "awsAccountId an AWS account id has 12 digits",
            ),
            (
                "timestamp",
                json!(-5),
                "timestamp is not a non-negative integer",
            ),
            (
                "certificateRegistrationTimestamp",
                json!("12\u{0}3"),
                "certificateRegistrationTimestamp is not epoch milliseconds",
            ),
        ];
        for (field, value, want) in cases {
            let mut v = fixture();
            if value.is_null() {
                v.as_object_mut().unwrap().remove(field);
            } else {
                v[field] = value;
            }
            let err = RegisteredEvent::from_value(&v).unwrap_err().to_string();
            assert!(err.contains(want), "{field}: {err}");
        }
        assert_eq!(
            RegisteredEvent::from_value(&json!([1])).unwrap_err(),
            EventError::NotAnObject
        );
    }

    #[test]
    fn huge_values_are_not_echoed_whole() {
        let mut v = fixture();
        v["certificateId"] = json!("x".repeat(1_000_000));
        let err = RegisteredEvent::from_value(&v).unwrap_err().to_string();
        assert!(err.len() < 300, "{}", err.len());
    }
}
