//! The world the `bootstrap` tests share: the real binary run against the Lambda Runtime API
//! emulator, AWS IoT as a moto server with a CA and the device policy, balena as the fake API.

#![allow(dead_code)] // each test file uses its own part of this

use std::time::Duration;

use aws_sdk_iot::types::CertificateStatus;
use serde_json::Value;
use testkit::balena::FakeBalena;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::lambda::{Invocation, RuntimeEmulator};
use testkit::moto::MotoServer;
use testkit::proc::FunctionProcess;

pub(crate) const FLEET: u64 = 424242;
pub(crate) const KEY: &str = "bootstrap-test-balena-key-do-not-log";
pub(crate) const POLICY: &str = "jitr-device";
pub(crate) const INVOKE: Duration = Duration::from_secs(30);

/// The real `bootstrap` binary with exactly `env`.
pub(crate) fn spawn_bootstrap(env: &[(&str, String)]) -> FunctionProcess {
    FunctionProcess::spawn(env!("CARGO_BIN_EXE_bootstrap"), env).unwrap()
}

pub(crate) struct World {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) moto: MotoServer,
    pub(crate) balena: FakeBalena,
    pub(crate) ca: TestCa,
    pub(crate) ca_id: String,
    pub(crate) client: aws_sdk_iot::Client,
}

pub(crate) fn world() -> World {
    let rt = testkit::world::runtime();
    let testkit::world::World {
        moto,
        client,
        ca,
        ca_id,
        balena,
        ..
    } = testkit::world::Spec::new("bootstrap test CA")
        .policy(POLICY)
        .balena(FLEET, "acme/fleet", KEY)
        .start_on(&rt)
        .unwrap();
    World {
        rt,
        moto,
        balena: balena.unwrap(),
        ca,
        ca_id,
        client,
    }
}

impl World {
    pub(crate) fn env(&self, emulator: &RuntimeEmulator) -> Vec<(&'static str, String)> {
        let mut env = emulator.lambda_env();
        env.extend(self.moto.aws_env());
        env.extend([
            ("JITR_TRUSTED_CA_IDS", self.ca_id.clone()),
            ("JITR_POLICY_NAME", POLICY.to_owned()),
            ("BALENA_FLEET_ID", FLEET.to_string()),
            ("BALENA_API_KEY", KEY.to_owned()),
            ("BALENA_API_URL", self.balena.url()),
            // moto answers bad input with HTTP 500; one attempt keeps failures fast.
            ("AWS_MAX_ATTEMPTS", "1".to_owned()),
        ]);
        env
    }

    pub(crate) fn first_connect(&self, device: &str) -> String {
        let pem = self.ca.device_pem(device).unwrap();
        self.rt
            .block_on(iot::first_connect(&self.client, &pem, &self.ca.cert_pem))
            .unwrap()
    }

    pub(crate) fn status(&self, id: &str) -> CertificateStatus {
        self.rt.block_on(iot::status(&self.client, id)).unwrap()
    }

    pub(crate) fn things(&self) -> Vec<String> {
        self.rt.block_on(async {
            let out = self.client.list_things().send().await.unwrap();
            out.things()
                .iter()
                .filter_map(|t| t.thing_name().map(str::to_owned))
                .collect()
        })
    }

    pub(crate) fn event(&self, certificate_id: &str) -> Value {
        testkit::iot::registered_event(certificate_id, &self.ca_id)
    }
}

pub(crate) fn response(invocation: Invocation) -> Value {
    match invocation {
        Invocation::Response(v) => v,
        Invocation::Error {
            error_type,
            error_message,
        } => panic!("{error_type}: {error_message}"),
    }
}
