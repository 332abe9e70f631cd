//! The decision against real parts: AWS IoT as a moto server, balena as the fake API.
//! Every scenario asserts the final registry state: certificate status, Thing, policy and
//! principal attachments.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::time::Duration;

use ::iot::aws::RetryPolicy;
use ::iot::{
    aws::AwsIotRegistry, CaDescription, CertificateDescription, CertificateId, CertificatePage,
    CertificateStatus, IotRegistry, RegistryError, ThingSpec,
};
use activator::balena_directory::{BalenaDirectory, KeySource};
use activator::{ActivationError, Activator, FleetDirectory, FleetId, Outcome, RejectAction};
use aws_sdk_iot::types::CertificateStatus as SdkStatus;
use testkit::balena::Fault;
use testkit::certs::{certificate_id_of, device_params, TestCa};
use testkit::iot;
use testkit::proxy::{FaultPlan, Proxy, Quotas};
use tokio::time::Instant;

mod common;

use common::{deadline, uuid, world, World, FLEET, POLICY};

const OTHER_FLEET: u64 = 7654321;

impl World {
    fn activator(&self) -> Activator<AwsIotRegistry, BalenaDirectory> {
        Activator::new(
            self.registry.clone(),
            self.fleet(Duration::from_millis(500)),
            self.policy(),
        )
    }

    /// What AWS IoT does on a device's first connect, with moto's id checked against AWS's.
    async fn connect(&self, device_pem: &str) -> String {
        let id = self.first_connect(device_pem).await;
        assert_eq!(
            id,
            certificate_id_of(device_pem).unwrap(),
            "moto ids are SHA-256 of the DER"
        );
        id
    }

    async fn arn(&self, certificate_id: &str) -> String {
        let d = self
            .client
            .describe_certificate()
            .certificate_id(certificate_id)
            .send()
            .await
            .unwrap();
        d.certificate_description()
            .unwrap()
            .certificate_arn()
            .unwrap()
            .to_owned()
    }

    async fn things_of(&self, certificate_id: &str) -> Vec<String> {
        let arn = self.arn(certificate_id).await;
        let out = self
            .client
            .list_principal_things()
            .principal(arn)
            .send()
            .await
            .unwrap();
        out.things().to_vec()
    }

    async fn policies_of(&self, certificate_id: &str) -> Vec<String> {
        let arn = self.arn(certificate_id).await;
        let out = self
            .client
            .list_attached_policies()
            .target(arn)
            .send()
            .await
            .unwrap();
        out.policies()
            .iter()
            .filter_map(|p| p.policy_name().map(str::to_owned))
            .collect()
    }

    /// The Things in the account but the other application's.
    async fn thing_count(&self) -> usize {
        let foreign = self.foreign.things();
        self.client
            .list_things()
            .send()
            .await
            .unwrap()
            .things()
            .iter()
            .filter(|t| !foreign.contains(&t.thing_name().unwrap_or_default()))
            .count()
    }

    /// Asserts the certificate is ACTIVE with exactly one Thing (the device) and the policy.
    async fn assert_activated(&self, certificate_id: &str, device: &str) {
        assert_eq!(self.status(certificate_id).await, SdkStatus::Active);
        assert_eq!(
            self.things_of(certificate_id).await,
            vec![device.to_owned()]
        );
        assert_eq!(
            self.policies_of(certificate_id).await,
            vec![POLICY.to_owned()]
        );
        let thing = self
            .client
            .describe_thing()
            .thing_name(device)
            .send()
            .await
            .unwrap();
        assert_eq!(
            thing.attributes().unwrap().get("fleet").map(String::as_str),
            Some("balena-fleet-1234567")
        );
    }

    /// Asserts nothing was provisioned for the certificate and it has `status`.
    async fn assert_untouched(&self, certificate_id: &str, status: SdkStatus) {
        assert_eq!(self.status(certificate_id).await, status);
        assert!(
            self.things_of(certificate_id).await.is_empty(),
            "no Thing attached"
        );
        assert!(
            self.policies_of(certificate_id).await.is_empty(),
            "no policy attached"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_membership_decides_activation() {
    let w = world().await;
    let a = w.activator();

    // In the fleet and active: activated, one Thing, policy and principal attached.
    let member = uuid(1);
    w.balena.add_device(FLEET, &member, true);
    let id = w.connect(&w.ca.device_pem(&member).unwrap()).await;
    let d = a
        .handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    assert_eq!(
        (d.outcome, d.thing_name.as_deref()),
        (Outcome::Activated, Some(member.as_str()))
    );
    w.assert_activated(&id, &member).await;

    // Unknown to balena: revoked, no Thing.
    let stranger = uuid(2);
    let id = w.connect(&w.ca.device_pem(&stranger).unwrap()).await;
    let d = a
        .handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Rejected);
    assert_eq!(
        d.reason,
        format!("device {stranger} is not in balena fleet {FLEET}")
    );
    w.assert_untouched(&id, SdkStatus::Revoked).await;

    // In another fleet of the same owner: rejected.
    w.balena.add_fleet(OTHER_FLEET, "acme/other");
    let elsewhere = uuid(3);
    w.balena.add_device(OTHER_FLEET, &elsewhere, true);
    let id = w.connect(&w.ca.device_pem(&elsewhere).unwrap()).await;
    assert_eq!(
        a.handle_event(&w.event(&id), None, deadline())
            .await
            .unwrap()
            .outcome,
        Outcome::Rejected
    );
    w.assert_untouched(&id, SdkStatus::Revoked).await;

    // In the fleet but deactivated (paused, which can be undone): held, never revoked.
    let inactive = uuid(4);
    w.balena.add_device(FLEET, &inactive, false);
    let id = w.connect(&w.ca.device_pem(&inactive).unwrap()).await;
    let d = a
        .handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    assert_eq!(
        (d.outcome, d.reason.contains("inactive")),
        (Outcome::Held, true)
    );
    w.assert_untouched(&id, SdkStatus::PendingActivation).await;
    assert_eq!(w.thing_count().await, 1, "only the member got a Thing");

    // JITR_REJECT_ACTION=deactivate leaves the certificate INACTIVE instead.
    let mut policy = w.policy();
    policy.reject_action = RejectAction::Deactivate;
    let soft = Activator::new(
        w.registry.clone(),
        w.fleet(Duration::from_millis(500)),
        policy,
    );
    let id = w.connect(&w.ca.device_pem(&uuid(5)).unwrap()).await;
    assert_eq!(
        soft.handle_event(&w.event(&id), None, deadline())
            .await
            .unwrap()
            .outcome,
        Outcome::Rejected
    );
    w.assert_untouched(&id, SdkStatus::Inactive).await;
    w.assert_foreign_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_we_issued_to_the_profile_are_activated() {
    let w = world().await;
    let a = w.activator();
    let now = time::OffsetDateTime::now_utc();
    let mut n = 100;
    let mut next = || {
        n += 1;
        let id = uuid(n);
        w.balena.add_device(FLEET, &id, true);
        id
    };

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let id = next();
    cases.push((
        "signed by an impostor key under our CA's name",
        w.ca.forged_pem(&device_params(&id)).unwrap(),
        "issuer: the signature does not verify",
    ));
    let id = next();
    let mut p = device_params(&id);
    p.not_after = now - time::Duration::days(1);
    p.not_before = now - time::Duration::days(30);
    cases.push(("expired", w.ca.sign(&p).unwrap(), "validity: expired"));
    let id = next();
    let mut p = device_params(&id);
    p.not_before = now + time::Duration::days(1);
    cases.push((
        "not yet valid",
        w.ca.sign(&p).unwrap(),
        "validity: not valid before",
    ));
    let id = next();
    let mut p = device_params(&id);
    p.is_ca =
        testkit::certs::rcgen::IsCa::Ca(testkit::certs::rcgen::BasicConstraints::Unconstrained);
    cases.push((
        "CA:TRUE leaf",
        w.ca.sign(&p).unwrap(),
        "basic-constraints: CA:TRUE",
    ));
    let id = next();
    let mut p = device_params(&id);
    p.extended_key_usages = vec![testkit::certs::rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    cases.push((
        "no clientAuth",
        w.ca.sign(&p).unwrap(),
        "extended-key-usage",
    ));
    next();
    cases.push((
        "CN is not a balena UUID",
        w.ca.sign(&device_params("Not-A-UUID")).unwrap(),
        "common-name: invalid device id",
    ));

    for (name, pem, want) in cases {
        let id = w.connect(&pem).await;
        let d = a
            .handle_event(&w.event(&id), None, deadline())
            .await
            .unwrap();
        assert_eq!(d.outcome, Outcome::Rejected, "{name}");
        assert!(d.reason.starts_with(want), "{name}: {}", d.reason);
        w.assert_untouched(&id, SdkStatus::Revoked).await;
    }

    // A certificate from a CA that is registered but not trusted.
    let other = TestCa::new("someone else's CA").unwrap();
    let other_ca_id = iot::register_ca(&w.client, &other.cert_pem).await.unwrap();
    let id = next();
    let pem = other.device_pem(&id).unwrap();
    let cert_id = iot::first_connect(&w.client, &pem, &other.cert_pem)
        .await
        .unwrap();
    let mut event = w.event(&cert_id);
    event.ca_certificate_id = CertificateId::parse(&other_ca_id).unwrap();
    let d = a.handle_event(&event, None, deadline()).await.unwrap();
    assert_eq!(d.outcome, Outcome::Rejected);
    assert!(
        d.reason.contains("is not in JITR_TRUSTED_CA_IDS"),
        "{}",
        d.reason
    );
    w.assert_untouched(&cert_id, SdkStatus::Revoked).await;
    assert_eq!(w.thing_count().await, 0);
    w.assert_foreign_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_other_than_pending_are_never_changed() {
    let w = world().await;
    let a = w.activator();
    let device = uuid(1);
    w.balena.add_device(FLEET, &device, true);
    let id = w.connect(&w.ca.device_pem(&device).unwrap()).await;
    a.handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    let d = a
        .handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::AlreadyActive);
    w.assert_activated(&id, &device).await;

    // A revoked certificate of a fleet member stays revoked: never reactivated.
    let revoked = uuid(2);
    w.balena.add_device(FLEET, &revoked, true);
    let id = w.connect(&w.ca.device_pem(&revoked).unwrap()).await;
    w.client
        .update_certificate()
        .certificate_id(&id)
        .new_status(SdkStatus::Revoked)
        .send()
        .await
        .unwrap();
    let d = a
        .handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Skipped);
    w.assert_untouched(&id, SdkStatus::Revoked).await;

    // An event for a certificate that does not exist, and one from another account.
    let d = a
        .handle_event(&w.event(&"f".repeat(64)), None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Skipped);
    // The adapter keeps AWS's error code as a value callers can match.
    let missing = CertificateId::parse(&"f".repeat(64)).unwrap();
    let err = w
        .registry
        .describe_certificate(&missing, deadline())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(err.code(), Some("ResourceNotFoundException"), "{err:?}");
    let pending = uuid(3);
    w.balena.add_device(FLEET, &pending, true);
    let id = w.connect(&w.ca.device_pem(&pending).unwrap()).await;
    let ours = ::iot::AccountId::parse("999999999999").unwrap();
    let d = a
        .handle_event(&w.event(&id), Some(&ours), deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Skipped);
    w.assert_untouched(&id, SdkStatus::PendingActivation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_twice_at_once_gives_one_thing_and_an_active_certificate() {
    let w = world().await;
    let a = w.activator();
    let device = uuid(9);
    w.balena.add_device(FLEET, &device, true);
    let id = w.connect(&w.ca.device_pem(&device).unwrap()).await;
    let event = w.event(&id);
    let (x, y) = tokio::join!(
        a.handle_event(&event, None, deadline()),
        a.handle_event(&event, None, deadline())
    );
    let outcomes = [x.unwrap().outcome, y.unwrap().outcome];
    assert!(outcomes.contains(&Outcome::Activated), "{outcomes:?}");
    w.assert_activated(&id, &device).await;
    assert_eq!(w.thing_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_api_trouble_leaves_the_certificate_pending() {
    let w = world().await;
    let device = uuid(7);
    w.balena.add_device(FLEET, &device, true);
    let id = w.connect(&w.ca.device_pem(&device).unwrap()).await;
    for fault in [
        Fault::Status(503),
        Fault::Status(500),
        Fault::Status(401),
        Fault::Delay(Duration::from_secs(2)),
        Fault::RateLimited {
            retry_after_secs: 120,
            times: 10,
        },
    ] {
        w.balena.set_fault(fault.clone());
        let err = w
            .activator()
            .handle_event(&w.event(&id), None, deadline())
            .await
            .unwrap_err();
        assert!(matches!(err, ActivationError::Fleet(_)), "{fault:?}: {err}");
        assert!(err.is_retryable(), "{fault:?}");
        w.assert_untouched(&id, SdkStatus::PendingActivation).await;
    }
    // An empty answer from a key that cannot see the fleet proves nothing.
    w.balena.set_fault(Fault::None);
    let stranger = uuid(8);
    let stranger_id = w.connect(&w.ca.device_pem(&stranger).unwrap()).await;
    w.balena.hide_fleet_from_key(FLEET);
    let err = w
        .activator()
        .handle_event(&w.event(&stranger_id), None, deadline())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fleet check failed"), "{err}");
    w.assert_untouched(&stranger_id, SdkStatus::PendingActivation)
        .await;

    // A short 429 is waited out within the deadline, then the device is activated.
    let w = world().await;
    w.balena.add_device(FLEET, &device, true);
    let id = w.connect(&w.ca.device_pem(&device).unwrap()).await;
    w.balena.set_fault(Fault::RateLimited {
        retry_after_secs: 1,
        times: 1,
    });
    let d = w
        .activator()
        .handle_event(&w.event(&id), None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    w.assert_activated(&id, &device).await;
}

/// A registry that fails (as a crash would stop the Lambda) at one named step.
struct CrashAt<'a> {
    inner: &'a AwsIotRegistry,
    step: &'static str,
}

impl CrashAt<'_> {
    fn check(&self, op: &'static str) -> Result<(), RegistryError> {
        if op == self.step {
            Err(RegistryError::Unavailable {
                op,
                source: "simulated crash".into(),
            })
        } else {
            Ok(())
        }
    }
}

impl IotRegistry for CrashAt<'_> {
    async fn describe_thing(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> Result<Option<::iot::ThingSpec>, RegistryError> {
        self.check("DescribeThing")?;
        self.inner.describe_thing(thing, deadline).await
    }
    async fn update_thing_attributes(
        &self,
        thing: &str,
        attributes: &[(String, Option<String>)],
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.check("UpdateThing")?;
        self.inner
            .update_thing_attributes(thing, attributes, deadline)
            .await
    }
    async fn thing_principals(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        self.check("ListThingPrincipals")?;
        self.inner.thing_principals(thing, deadline).await
    }
    async fn detach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.check("DetachThingPrincipal")?;
        self.inner
            .detach_thing_principal(thing, certificate_arn, deadline)
            .await
    }
    async fn describe_certificate(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> Result<CertificateDescription, RegistryError> {
        self.check("DescribeCertificate")?;
        self.inner.describe_certificate(id, deadline).await
    }
    async fn describe_ca_certificate(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> Result<CaDescription, RegistryError> {
        self.check("DescribeCACertificate")?;
        self.inner.describe_ca_certificate(id, deadline).await
    }
    async fn create_thing(
        &self,
        thing: &ThingSpec,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.check("CreateThing")?;
        self.inner.create_thing(thing, deadline).await
    }
    async fn add_thing_to_group(
        &self,
        thing: &str,
        group: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.inner.add_thing_to_group(thing, group, deadline).await
    }
    async fn attach_policy(
        &self,
        policy: &str,
        arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.check("AttachPolicy")?;
        self.inner.attach_policy(policy, arn, deadline).await
    }
    async fn attach_thing_principal(
        &self,
        thing: &str,
        arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.check("AttachThingPrincipal")?;
        self.inner
            .attach_thing_principal(thing, arn, deadline)
            .await
    }
    async fn set_certificate_status(
        &self,
        id: &CertificateId,
        status: CertificateStatus,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.check("UpdateCertificate")?;
        self.inner
            .set_certificate_status(id, status, deadline)
            .await
    }
    async fn list_certificates_by_ca(
        &self,
        ca: &CertificateId,
        marker: Option<String>,
        newest_first: bool,
        deadline: Instant,
    ) -> Result<CertificatePage, RegistryError> {
        self.inner
            .list_certificates_by_ca(ca, marker, newest_first, deadline)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_any_two_steps_then_a_rerun_converges_to_active() {
    let w = world().await;
    for (n, step) in [
        "DescribeCertificate",
        "DescribeCACertificate",
        "CreateThing",
        "AttachPolicy",
        "AttachThingPrincipal",
        "UpdateCertificate",
    ]
    .into_iter()
    .enumerate()
    {
        let device = uuid(50 + n as u32);
        w.balena.add_device(FLEET, &device, true);
        let id = w.connect(&w.ca.device_pem(&device).unwrap()).await;
        let crashing = Activator::new(
            CrashAt {
                inner: &w.registry,
                step,
            },
            w.fleet(Duration::from_millis(500)),
            w.policy(),
        );
        let err = crashing
            .handle_event(&w.event(&id), None, deadline())
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{step}");
        assert_eq!(
            w.status(&id).await,
            SdkStatus::PendingActivation,
            "still pending after a crash at {step}"
        );
        let d = w
            .activator()
            .handle_event(&w.event(&id), None, deadline())
            .await
            .unwrap();
        assert_eq!(d.outcome, Outcome::Activated, "{step}");
        w.assert_activated(&id, &device).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_to_the_deadline_it_gives_up_retryably_and_the_next_run_completes() {
    let w = world().await;
    let device = uuid(70);
    w.balena.add_device(FLEET, &device, true);
    let id = w.connect(&w.ca.device_pem(&device).unwrap()).await;

    // A fifth of the calls throttled and a tenth failing with 5xx, and UpdateCertificate stuck
    // over its quota: every step retries through, but the activation can never happen.
    let noisy = |seed| FaultPlan {
        seed,
        throttle: 0.2,
        server_error: 0.1,
        ..FaultPlan::default()
    };
    let proxy = Proxy::for_url(
        &w.moto.endpoint(),
        FaultPlan {
            quotas: Some(Quotas::default().with("UpdateCertificate", 0.0, 0.0)),
            ..noisy(7)
        },
    )
    .unwrap();
    let retry = RetryPolicy {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
        reserve: Duration::from_millis(200),
    };
    let registry = AwsIotRegistry::new(&iot::sdk_config_for(&proxy.url()).await).with_retry(retry);
    let a = Activator::new(registry, w.fleet(Duration::from_millis(500)), w.policy());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    let err = a
        .handle_event(&w.event(&id), None, deadline)
        .await
        .unwrap_err();
    let took = started.elapsed();
    let ActivationError::Registry(RegistryError::GaveUp { op, attempts, .. }) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*op, "UpdateCertificate");
    assert!(*attempts > 5, "kept trying: {attempts} attempts");
    assert_eq!(err.error_type(), "Retryable");
    // It used the time it had and stopped before the deadline (the last attempt may be cut
    // at `deadline - reserve`, so the reserve is what it keeps, give or take scheduling).
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        took > Duration::from_secs(5) - retry.reserve - retry.cap * 2,
        "{took:?}"
    );
    let stats = proxy.stats();
    // Every attempt but perhaps a last one cut short reached the proxy and was refused.
    let attempts = u64::from(*attempts);
    assert!(
        (attempts - 1..=attempts).contains(&stats.quota_throttled),
        "{attempts} attempts, {stats:?}"
    );
    assert!(stats.throttled + stats.server_errors > 0, "{stats:?}");
    // Provisioned, perhaps, but never activated.
    assert_eq!(w.status(&id).await, SdkStatus::PendingActivation);

    // The quota clears: the next run (Lambda's retry, a sweep) completes the same work.
    proxy.set_plan(noisy(8));
    let d = a
        .handle_event(
            &w.event(&id),
            None,
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    w.assert_activated(&id, &device).await;
    assert_eq!(w.thing_count().await, 1);
}

#[test]
fn fleet_directory_is_labelled_by_its_numeric_id() {
    let fleet = BalenaDirectory::new(
        "http://127.0.0.1:9",
        FleetId::parse("42").unwrap(),
        KeySource::Literal(balena::ApiKey::new("k".into())),
    )
    .unwrap();
    assert_eq!(fleet.label(), "balena fleet 42");
}
