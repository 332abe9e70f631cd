//! The world the activator's integration tests share: AWS IoT as a moto server with a jitr CA
//! registered and the device policy made, and balena as the fake API with one fleet.

#![allow(dead_code)] // each test file uses its own part of this

use std::time::Duration;

use ::iot::{aws::AwsIotRegistry, CertificateId};
use activator::balena_directory::{BalenaDirectory, KeySource};
use activator::{FleetId, Policy, RegisteredEvent, RejectAction};
use aws_sdk_iot::types::CertificateStatus as SdkStatus;
use balena::ApiKey;
use factory_ca::IdFormat;
use testkit::balena::FakeBalena;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::moto::MotoServer;
use testkit::world::Spec;
use tokio::time::Instant;

/// The balena fleet devices must belong to.
pub(crate) const FLEET: u64 = 1234567;
/// The fake balena API's key.
pub(crate) const KEY: &str = "test-balena-key";
/// The device policy.
pub(crate) const POLICY: &str = "jitr-device";

pub(crate) struct World {
    pub(crate) moto: MotoServer,
    pub(crate) balena: FakeBalena,
    pub(crate) ca: TestCa,
    pub(crate) ca_id: String,
    /// Straight to moto, for setup and checks.
    pub(crate) client: aws_sdk_iot::Client,
    /// The adapter under test, straight to moto.
    pub(crate) registry: AwsIotRegistry,
    /// Another application's things in the same account: never touched.
    pub(crate) foreign: testkit::foreign::Foreign,
}

/// A device UUID from a number.
pub(crate) fn uuid(n: u32) -> String {
    format!("{n:032x}")
}

/// A deadline as generous as the Lambda's timeout.
pub(crate) fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

pub(crate) async fn world() -> World {
    let testkit::world::World {
        moto,
        sdk,
        client,
        ca,
        ca_id,
        balena,
        foreign,
    } = Spec::new("jitr test CA")
        .policy(POLICY)
        .balena(FLEET, "acme/sensors", KEY)
        .foreign()
        .start()
        .await
        .unwrap();
    World {
        moto,
        balena: balena.unwrap(),
        ca,
        ca_id,
        registry: AwsIotRegistry::new(&sdk),
        client,
        foreign: foreign.unwrap(),
    }
}

impl World {
    /// The rules: the test CA trusted, revoke on rejection.
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            trusted_ca_ids: vec![CertificateId::parse(&self.ca_id).unwrap()],
            policy_name: POLICY.into(),
            reject_action: RejectAction::Revoke,
            thing_type: None,
            thing_group: None,
            id_format: IdFormat::BalenaUuid,
            clock_skew: time::Duration::minutes(5),
            max_validity_days: factory_ca::DEFAULT_MAX_DEVICE_DAYS,
        }
    }

    /// The fleet directory over the fake balena API.
    pub(crate) fn fleet(&self, request_timeout: Duration) -> BalenaDirectory {
        BalenaDirectory::new(
            &self.balena.url(),
            FleetId::parse(&FLEET.to_string()).unwrap(),
            KeySource::Literal(ApiKey::new(KEY.into())),
        )
        .unwrap()
        .with_request_timeout(request_timeout)
    }

    /// What AWS IoT does on a device's first connect; the certificate id.
    pub(crate) async fn first_connect(&self, device_pem: &str) -> String {
        iot::first_connect(&self.client, device_pem, &self.ca.cert_pem)
            .await
            .unwrap()
    }

    /// The registered event AWS IoT publishes for `certificate_id`.
    pub(crate) fn event(&self, certificate_id: &str) -> RegisteredEvent {
        RegisteredEvent::from_value(&iot::registered_event(certificate_id, &self.ca_id)).unwrap()
    }

    /// Fails the test unless the other application's things are as planted.
    pub(crate) async fn assert_foreign_untouched(&self) {
        self.foreign.assert_untouched(&self.client).await.unwrap();
    }

    pub(crate) async fn status(&self, certificate_id: &str) -> SdkStatus {
        iot::status(&self.client, certificate_id).await.unwrap()
    }
}
