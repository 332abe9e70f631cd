//! The device environment variables balena's cloud-relay block reads to reach AWS IoT:
//! what `jitr issue --balena-env` writes to a file and `--push-balena` sets on each device.
//!
//! cloud-relay base64-decodes `AWS_CERT` and `AWS_PRIVATE_KEY` (PEM inside), connects to
//! `AWS_DATA_ENDPOINT` on 8883 with its device UUID as client id, and publishes what it relays
//! to `CLOUD_CONSUMER_TOPIC` exactly as given (default `sensors`, which no device policy
//! allows). So the topic is delivered too, inside the device's own tree that the policy allows:
//! `<topic prefix>/<uuid>/sensors`, the prefix the template's `TopicPrefix` and the CLI's
//! `--topic-prefix` (`JITR_TOPIC_PREFIX`) both default to [`DEFAULT_TOPIC_PREFIX`].

use base64::Engine;
use factory_ca::DeviceId;
use serde::ser::{Serialize, SerializeMap, Serializer};
use zeroize::Zeroizing;

/// Base64 of `chain.pem`: the device certificate and its CA, the chain JITR needs.
pub const AWS_CERT: &str = "AWS_CERT";
/// Base64 of the device's private key (PKCS#8 PEM).
pub const AWS_PRIVATE_KEY: &str = "AWS_PRIVATE_KEY";
/// The AWS IoT data endpoint (ATS) host name.
pub const AWS_DATA_ENDPOINT: &str = "AWS_DATA_ENDPOINT";
/// The topic cloud-relay publishes relayed data to.
pub const CLOUD_CONSUMER_TOPIC: &str = "CLOUD_CONSUMER_TOPIC";
/// Every variable jitr sets, in the order it sets them (what a cleanup removes).
pub const ALL: [&str; 4] = [
    AWS_CERT,
    AWS_PRIVATE_KEY,
    AWS_DATA_ENDPOINT,
    CLOUD_CONSUMER_TOPIC,
];
/// The first topic level(s) of every device's tree: the device policy allows
/// `<prefix>/<thing>/*`. `infra/template.yaml`'s `TopicPrefix` defaults to the same (a rules
/// check keeps them equal).
pub const DEFAULT_TOPIC_PREFIX: &str = "balena";
/// The last level of the topic cloud-relay publishes to, under the device's tree.
const CONSUMER_LEAF: &str = "sensors";

/// The topic a device's cloud-relay publishes to: `<prefix>/<uuid>/sensors`.
pub fn consumer_topic(prefix: &str, device: &DeviceId) -> String {
    format!("{prefix}/{device}/{CONSUMER_LEAF}")
}

/// Checks a topic prefix: topic levels of letters, digits, `_` or `-`, no wildcards (what
/// the template's `TopicPrefix` allows).
pub fn validate_topic_prefix(prefix: &str) -> Result<(), &'static str> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix.split('/').all(|level| {
            !level.is_empty()
                && level
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err("topic levels of letters, digits, '_' or '-' separated by '/', no wildcards")
    }
}

/// One device's delivery variables, in the order they are set.
pub struct DeliveryVariables {
    device: DeviceId,
    vars: Vec<(&'static str, Zeroizing<String>)>,
}

impl std::fmt::Debug for DeliveryVariables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the values hold a private key.
        let names: Vec<_> = self.vars.iter().map(|(name, _)| *name).collect();
        f.debug_struct("DeliveryVariables")
            .field("device", &self.device.as_str())
            .field("names", &names)
            .finish()
    }
}

impl DeliveryVariables {
    /// The variables for `device`: `AWS_CERT`, `AWS_PRIVATE_KEY` when the key is at hand
    /// (not for a device that sent a CSR: it provides its own), `AWS_DATA_ENDPOINT` when known,
    /// and `CLOUD_CONSUMER_TOPIC` under `topic_prefix`.
    pub fn new(
        device: &DeviceId,
        chain_pem: &str,
        key_pem: Option<&str>,
        endpoint: Option<&str>,
        topic_prefix: &str,
    ) -> Self {
        let b64 =
            |bytes: &[u8]| Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes));
        let mut vars = vec![(AWS_CERT, b64(chain_pem.as_bytes()))];
        if let Some(key) = key_pem {
            vars.push((AWS_PRIVATE_KEY, b64(key.as_bytes())));
        }
        if let Some(endpoint) = endpoint {
            vars.push((AWS_DATA_ENDPOINT, Zeroizing::new(endpoint.to_owned())));
        }
        vars.push((
            CLOUD_CONSUMER_TOPIC,
            Zeroizing::new(consumer_topic(topic_prefix, device)),
        ));
        DeliveryVariables {
            device: device.clone(),
            vars,
        }
    }

    /// The device.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// `(name, value)` pairs, in the order they are set.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.vars
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
    }

    /// One JSON line (no newline): `{"id": "<uuid>", "AWS_CERT": "...", ...}`.
    pub fn to_json_line(&self) -> Zeroizing<String> {
        // A map of strings always serializes.
        Zeroizing::new(serde_json::to_string(self).unwrap_or_default())
    }
}

impl Serialize for DeliveryVariables {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.vars.len() + 1))?;
        map.serialize_entry("id", self.device.as_str())?;
        for (name, value) in &self.vars {
            map.serialize_entry(name, value.as_str())?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use factory_ca::IdFormat;

    #[test]
    fn variables_are_base64_of_the_files_and_the_endpoint_verbatim() {
        let id = DeviceId::parse(&"a".repeat(32), IdFormat::BalenaUuid).unwrap();
        let vars = DeliveryVariables::new(&id, "CHAIN", Some("KEY"), Some("x-ats.iot.aws"), "acme");
        let line = vars.to_json_line();
        assert_eq!(
            line.as_str(),
            format!(
                r#"{{"id":"{0}","AWS_CERT":"Q0hBSU4=","AWS_PRIVATE_KEY":"S0VZ","AWS_DATA_ENDPOINT":"x-ats.iot.aws","CLOUD_CONSUMER_TOPIC":"acme/{0}/sensors"}}"#,
                "a".repeat(32)
            )
        );
        assert!(!format!("{vars:?}").contains("S0VZ"), "Debug hides values");
    }

    #[test]
    fn a_csr_device_has_no_private_key_variable() {
        let id = DeviceId::parse(&"b".repeat(32), IdFormat::BalenaUuid).unwrap();
        let names: Vec<_> = DeliveryVariables::new(&id, "CHAIN", None, None, DEFAULT_TOPIC_PREFIX)
            .iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, vec![AWS_CERT, CLOUD_CONSUMER_TOPIC]);
    }

    #[test]
    fn topic_prefixes_are_plain_topic_levels() {
        for ok in ["balena", "acme/fleet-1", "a_b"] {
            assert!(validate_topic_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/+/b", "#", "a//b", "/a", "with space"] {
            assert!(validate_topic_prefix(bad).is_err(), "{bad}");
        }
    }
}
