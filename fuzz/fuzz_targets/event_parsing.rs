//! Bytes off the wire -> JSON -> the activator's payload parsing, both entry points.
//!
//! Besides "no panic", checks what the decision relies on: an accepted event carries ids
//! that re-validate, both entry points agree, and a refusal's message stays short whatever
//! the input's size (it is logged and returned to Lambda).

#![no_main]

use activator::{EventError, Incoming, RegisteredEvent};
use iot::{AccountId, CertificateId};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let direct = RegisteredEvent::from_value(&value);
    match &direct {
        Ok(event) => valid(event),
        Err(error) => bounded(error),
    }
    match Incoming::from_value(&value) {
        Ok(Incoming::Registered(event)) => assert_eq!(direct.as_ref(), Ok(&event)),
        Ok(Incoming::Sweep) => {}
        Ok(Incoming::Replay(records)) => {
            for record in &records {
                match &record.event {
                    Ok(event) => valid(event),
                    Err(error) => bounded(error),
                }
            }
        }
        Err(error) => {
            assert_eq!(direct.as_ref().err(), Some(&error));
            bounded(&error);
        }
    }
});

fn valid(event: &RegisteredEvent) {
    let id = event.certificate_id.as_str();
    assert_eq!(CertificateId::parse(id).as_ref(), Ok(&event.certificate_id));
    let ca = event.ca_certificate_id.as_str();
    assert_eq!(
        CertificateId::parse(ca).as_ref(),
        Ok(&event.ca_certificate_id)
    );
    let account = event.aws_account_id.as_str();
    assert_eq!(
        AccountId::parse(account).as_ref(),
        Ok(&event.aws_account_id)
    );
}

fn bounded(error: &EventError) {
    let text = error.to_string();
    assert!(text.len() <= 512, "{} bytes: {text:.200}", text.len());
}
