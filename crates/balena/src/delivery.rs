//! The device environment variables balena's cloud-relay block reads to reach AWS IoT:
//! what `jitr issue --balena-env` writes to a file and `--push-balena` sets on each device.

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
    /// (not for a device that sent a CSR), `AWS_DATA_ENDPOINT` when known.
    pub fn new(
        device: &DeviceId,
        chain_pem: &str,
        key_pem: Option<&str>,
        endpoint: Option<&str>,
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
        let vars = DeliveryVariables::new(&id, "CHAIN", Some("KEY"), Some("x-ats.iot.aws"));
        let line = vars.to_json_line();
        assert_eq!(
            line.as_str(),
            format!(
                r#"{{"id":"{}","AWS_CERT":"Q0hBSU4=","AWS_PRIVATE_KEY":"S0VZ","AWS_DATA_ENDPOINT":"x-ats.iot.aws"}}"#,
                "a".repeat(32)
            )
        );
        assert!(!format!("{vars:?}").contains("S0VZ"), "Debug hides values");
    }

    #[test]
    fn a_csr_device_has_no_private_key_variable() {
        let id = DeviceId::parse(&"b".repeat(32), IdFormat::BalenaUuid).unwrap();
        let names: Vec<_> = DeliveryVariables::new(&id, "CHAIN", None, None)
            .iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, vec![AWS_CERT]);
    }
}
