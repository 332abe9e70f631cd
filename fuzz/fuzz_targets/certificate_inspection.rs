//! Bytes -> the registered-PEM split and the device-profile inspection, without a CA, with
//! a fixed issuing CA (fixtures/ca.der, the CA of the seed certificates), and with the input
//! as its own CA.
//!
//! Besides "no panic", checks what the activator relies on: a certificate that passes has a
//! device id, and the CA check ran exactly when a CA was given.

#![no_main]

use factory_ca::{
    certificates_from_pem_or_der, inspect_device_certificate, Check, IdFormat, InspectOptions,
    Inspection,
};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

const CA_DER: &[u8] = include_bytes!("../fixtures/ca.der");

/// A fixed "now" inside the seed certificates' validity, so runs are reproducible.
const NOW: i64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(now) = OffsetDateTime::from_unix_timestamp(NOW) else {
        return;
    };
    let split = certificates_from_pem_or_der(data);
    let mut inputs: Vec<&[u8]> = match &split {
        Ok(certs) => {
            assert!(!certs.is_empty(), "an Ok split holds a certificate");
            certs.iter().take(4).map(Vec::as_slice).collect()
        }
        Err(reason) => {
            assert!(reason.len() <= 512, "{reason:.200}");
            Vec::new()
        }
    };
    inputs.push(data);
    for der in inputs {
        for (ca, format) in [
            (None, IdFormat::BalenaUuid),
            (Some(CA_DER), IdFormat::BalenaUuid),
            (Some(der), IdFormat::Any),
        ] {
            let opts = InspectOptions {
                id_format: format,
                ca_der: ca,
                now,
                max_validity_days: Some(3660),
            };
            check(&inspect_device_certificate(der, &opts), ca.is_some());
        }
    }
});

fn check(inspection: &Inspection, with_ca: bool) {
    assert_eq!(inspection.certificate_id.len(), 64);
    let first = inspection.findings.first().map(|f| f.check);
    assert_eq!(first, Some(Check::Parse));
    if inspection.passed() {
        assert!(inspection.device_id.is_some(), "passed without a device id");
        let issuer = inspection.findings.iter().any(|f| f.check == Check::Issuer);
        assert_eq!(issuer, with_ca, "the CA check ran iff a CA was given");
    }
    if let Some(failure) = inspection.first_failure() {
        assert!(!failure.detail.is_empty());
    }
}
