//! A whole fleet's first connects at once: the world behind the burst test and the quota
//! drain benchmark.
//!
//! [`BurstWorld::start`] brings up moto with a jitr CA registered and the device policy made,
//! the fake balena API with a fleet, `n` device certificates registered PENDING_ACTIVATION
//! (what AWS IoT does on each first connect), a [`Proxy`] in front of moto, and the Lambda
//! Runtime API emulator. [`BurstWorld::start_runtimes`] runs the real `bootstrap` processes
//! against the proxy; [`BurstWorld::registry`] reads back what AWS IoT holds, straight from
//! moto, and [`RegistryState::check`] says whether every device ended where it must.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_iot::types::CertificateStatus;
use futures::stream::{self, StreamExt};
use serde_json::Value;

use crate::balena::FakeBalena;
use crate::certs::TestCa;
use crate::lambda::RuntimeEmulator;
use crate::moto::MotoServer;
use crate::proc::KillOnDrop;
use crate::proxy::{FaultPlan, Proxy};

/// The device policy every activated certificate gets.
pub const POLICY: &str = "jitr-device";

/// The balena fleet the devices belong to.
pub const FLEET_ID: u64 = 4242;

/// The (fake) balena API key; never printed.
const API_KEY: &str = "burst-test-key";

/// Where a device stands in the fleet, which decides where its certificate must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// An active device of the fleet: ACTIVE, one Thing, one policy, one principal.
    Member,
    /// In the fleet but deactivated: REVOKED, nothing attached.
    Inactive,
    /// Not in the fleet: REVOKED, nothing attached.
    Stranger,
}

/// One device of the burst.
#[derive(Debug, Clone)]
pub struct Device {
    /// The balena UUID (the certificate's CN and the Thing name).
    pub id: String,
    /// The AWS IoT certificate id.
    pub certificate_id: String,
    /// Where it stands in the fleet.
    pub standing: Standing,
}

/// moto, the fake balena API, a fault proxy, the Runtime API emulator and `n` devices.
pub struct BurstWorld {
    /// Runs the AWS SDK calls of the setup and the checks.
    pub rt: tokio::runtime::Runtime,
    /// The real AWS IoT stand-in.
    pub moto: MotoServer,
    /// A client straight to moto (no faults): for setup and checks.
    pub client: aws_sdk_iot::Client,
    /// The CA the devices' certificates come from.
    pub ca: TestCa,
    /// Its AWS IoT id.
    pub ca_id: String,
    /// The fleet.
    pub balena: FakeBalena,
    /// Every device, in creation order.
    pub devices: Vec<Device>,
    /// The faults between the activator and moto.
    pub proxy: Proxy,
    /// Where `bootstrap` gets its events.
    pub emulator: RuntimeEmulator,
    /// Another application's things in the same account: never touched.
    pub foreign: crate::foreign::Foreign,
    runtimes: std::sync::Mutex<Vec<KillOnDrop>>,
    bootstrap: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for BurstWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurstWorld")
            .field("devices", &self.devices.len())
            .field("runtimes", &self.runtimes().len())
            .finish_non_exhaustive()
    }
}

impl BurstWorld {
    /// Sets up `n` devices, device `k` standing where `standing(k)` says, each certificate
    /// registered PENDING_ACTIVATION; the proxy starts with `plan`.
    pub fn start(n: usize, standing: impl Fn(usize) -> Standing, plan: FaultPlan) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let crate::world::World {
            moto,
            client,
            ca,
            ca_id,
            balena,
            foreign,
            ..
        } = crate::world::Spec::new("burst CA")
            .policy(POLICY)
            .balena(FLEET_ID, "burst-fleet", API_KEY)
            .foreign()
            .start_on(&rt)?;
        let (balena, foreign) = (balena.context("the fleet")?, foreign.context("foreign")?);

        let mut devices = Vec::with_capacity(n);
        let mut pems = Vec::with_capacity(n);
        for k in 0..n {
            let id = format!("{:032x}", 0xb0_0000_0000_u64 + k as u64);
            let standing = standing(k);
            match standing {
                Standing::Member => _ = balena.add_device(FLEET_ID, &id, true),
                Standing::Inactive => _ = balena.add_device(FLEET_ID, &id, false),
                Standing::Stranger => {}
            }
            pems.push(ca.device_pem(&id)?);
            devices.push(Device {
                id,
                certificate_id: String::new(),
                standing,
            });
        }
        // Registered a few at a time, as devices connecting would be.
        let ids: Vec<Result<String>> = rt.block_on(
            stream::iter(pems.iter())
                .map(|pem| crate::iot::first_connect(&client, pem, &ca.cert_pem))
                .buffered(8)
                .collect(),
        );
        for (device, id) in devices.iter_mut().zip(ids) {
            device.certificate_id = id?;
        }
        let proxy = Proxy::for_url(&moto.endpoint(), plan)?;
        let emulator = RuntimeEmulator::start()?;
        Ok(BurstWorld {
            rt,
            moto,
            client,
            ca,
            ca_id,
            balena,
            devices,
            proxy,
            emulator,
            foreign,
            runtimes: std::sync::Mutex::new(Vec::new()),
            bootstrap: None,
        })
    }

    /// The environment the activator (`bootstrap` or `jitr reconcile`) runs with: AWS IoT
    /// through the fault proxy, the fleet on the fake balena API.
    pub fn activator_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.moto.aws_env();
        for (name, value) in &mut env {
            if *name == "AWS_ENDPOINT_URL" {
                *value = self.proxy.url();
            }
        }
        env.extend([
            ("JITR_TRUSTED_CA_IDS", self.ca_id.clone()),
            ("JITR_POLICY_NAME", POLICY.to_owned()),
            ("JITR_FLEET_BACKEND", "balena".to_owned()),
            ("BALENA_API_URL", self.balena.url()),
            ("BALENA_FLEET_ID", FLEET_ID.to_string()),
            ("BALENA_API_KEY", API_KEY.to_owned()),
            ("JITR_LOG", "error".to_owned()),
        ]);
        env
    }

    fn runtimes(&self) -> std::sync::MutexGuard<'_, Vec<KillOnDrop>> {
        self.runtimes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spawn_runtime(&self, bootstrap: &Path) -> Result<KillOnDrop> {
        let child = Command::new(bootstrap)
            .env_clear()
            .envs(self.emulator.lambda_env())
            .envs(self.activator_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bootstrap.display()))?;
        Ok(KillOnDrop(child))
    }

    /// Starts `count` `bootstrap` processes (Lambda instances) polling the emulator.
    pub fn start_runtimes(&mut self, bootstrap: &Path, count: usize) -> Result<()> {
        self.bootstrap = Some(bootstrap.to_owned());
        for _ in 0..count {
            let child = self.spawn_runtime(bootstrap)?;
            self.runtimes().push(child);
        }
        Ok(())
    }

    /// Kills runtime `k` (modulo their number) with SIGKILL, wherever it is in a decision,
    /// and starts a fresh one in its place, as Lambda replaces a crashed instance. The
    /// invocation it was running gets no answer: the emulator's timeout and Lambda's retry
    /// rules take it from there.
    pub fn crash_runtime(&self, k: usize) -> Result<()> {
        let bootstrap = self.bootstrap.clone().context("start_runtimes first")?;
        let fresh = self.spawn_runtime(&bootstrap)?;
        let mut runtimes = self.runtimes();
        if runtimes.is_empty() {
            return Ok(());
        }
        let n = k % runtimes.len();
        // Dropping kills (SIGKILL) and reaps the old process.
        runtimes[n] = fresh;
        Ok(())
    }

    /// Stops every `bootstrap` process.
    pub fn stop_runtimes(&mut self) {
        self.runtimes().clear();
    }

    /// The certificate-registered event AWS IoT publishes for `device`.
    pub fn event(&self, device: &Device) -> Value {
        crate::iot::registered_event(&device.certificate_id, &self.ca_id)
    }

    /// Every certificate under the burst's CA: status by id, and id by ARN (read from moto).
    pub fn certificates(
        &self,
    ) -> Result<(
        BTreeMap<String, CertificateStatus>,
        BTreeMap<String, String>,
    )> {
        self.rt.block_on(async {
            let listed = self
                .client
                .list_certificates_by_ca()
                .ca_certificate_id(&self.ca_id)
                .page_size(250)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .context("ListCertificatesByCA")?;
            let (mut statuses, mut arns) = (BTreeMap::new(), BTreeMap::new());
            for c in listed {
                if let (Some(id), Some(status)) = (c.certificate_id(), c.status()) {
                    statuses.insert(id.to_owned(), status.clone());
                }
                if let (Some(id), Some(arn)) = (c.certificate_id(), c.certificate_arn()) {
                    arns.insert(arn.to_owned(), id.to_owned());
                }
            }
            Ok((statuses, arns))
        })
    }

    /// Fails unless the foreign application's things are as planted.
    pub fn assert_foreign_untouched(&self) -> Result<()> {
        self.rt
            .block_on(self.foreign.assert_untouched(&self.client))
    }

    /// What AWS IoT (moto) holds now, read without faults: certificates, Things, policy
    /// targets and every Thing's principals (jitr's: the foreign Things are checked by
    /// [`BurstWorld::assert_foreign_untouched`]).
    pub fn registry(&self) -> Result<RegistryState> {
        let started = Instant::now();
        let (statuses, arns) = self.certificates()?;
        self.rt.block_on(async {
            let mut state = RegistryState {
                statuses,
                arns,
                ..RegistryState::default()
            };
            let things = self
                .client
                .list_things()
                .max_results(250)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .context("ListThings")?;
            for thing in things {
                if let Some(name) = thing
                    .thing_name()
                    .filter(|name| !self.foreign.things().contains(name))
                {
                    *state.things.entry(name.to_owned()).or_default() += 1;
                }
            }
            let pages = self
                .client
                .list_targets_for_policy()
                .policy_name(POLICY)
                .into_paginator()
                .send()
                .try_collect()
                .await
                .context("ListTargetsForPolicy")?;
            for target in pages.iter().flat_map(|page| page.targets()) {
                *state.policy_targets.entry(target.clone()).or_default() += 1;
            }
            let names: Vec<String> = state.things.keys().cloned().collect();
            let principals = stream::iter(names)
                .map(|name| async move {
                    let out = self
                        .client
                        .list_thing_principals()
                        .thing_name(&name)
                        .send()
                        .await
                        .with_context(|| format!("ListThingPrincipals {name}"))?;
                    anyhow::Ok((name, out.principals().to_vec()))
                })
                .buffered(8)
                .collect::<Vec<_>>()
                .await;
            for entry in principals {
                let (name, principals) = entry?;
                state.thing_principals.insert(name, principals);
            }
            state.read_in = started.elapsed();
            anyhow::Ok(state)
        })
    }
}

/// What AWS IoT holds for the burst's CA, policy and Things.
#[derive(Debug, Clone, Default)]
pub struct RegistryState {
    /// Status by certificate id.
    pub statuses: BTreeMap<String, CertificateStatus>,
    /// Certificate id by ARN.
    pub arns: BTreeMap<String, String>,
    /// How many Things by name (a name is unique in AWS IoT; counted all the same).
    pub things: BTreeMap<String, usize>,
    /// How many times each ARN is a target of the device policy.
    pub policy_targets: BTreeMap<String, usize>,
    /// The principals attached to each Thing.
    pub thing_principals: BTreeMap<String, Vec<String>>,
    /// How long reading it took.
    pub read_in: Duration,
}

/// The tally of [`RegistryState::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Certificates ACTIVE.
    pub active: usize,
    /// Certificates REVOKED.
    pub revoked: usize,
    /// Certificates still PENDING_ACTIVATION.
    pub pending: usize,
    /// Things.
    pub things: usize,
}

impl RegistryState {
    /// Checks every device against where it must end: a member ACTIVE with exactly one Thing
    /// (named after it), the policy attached once, and its certificate the Thing's only
    /// principal; an inactive member held PENDING_ACTIVATION and a stranger REVOKED, both with
    /// no Thing and nothing attached; nothing extra. Returns the tally, or every problem found.
    pub fn check(&self, devices: &[Device]) -> Result<Tally> {
        let mut problems = Vec::new();
        let mut tally = Tally::default();
        for status in self.statuses.values() {
            match status {
                CertificateStatus::Active => tally.active += 1,
                CertificateStatus::Revoked => tally.revoked += 1,
                CertificateStatus::PendingActivation => tally.pending += 1,
                _ => {}
            }
        }
        tally.things = self.things.len();
        let arn_of: BTreeMap<&str, &str> = self
            .arns
            .iter()
            .map(|(arn, id)| (id.as_str(), arn.as_str()))
            .collect();
        let mut expected_things = BTreeSet::new();
        for d in devices {
            let status = self.statuses.get(&d.certificate_id);
            let arn = arn_of.get(d.certificate_id.as_str()).copied().unwrap_or("");
            let targets = self.policy_targets.get(arn).copied().unwrap_or(0);
            let things = self.things.get(&d.id).copied().unwrap_or(0);
            match d.standing {
                Standing::Member => {
                    expected_things.insert(d.id.as_str());
                    let principals = self.thing_principals.get(&d.id);
                    if status != Some(&CertificateStatus::Active) {
                        problems.push(format!("member {} is {status:?}, not ACTIVE", d.id));
                    }
                    if things != 1 {
                        problems.push(format!("member {} has {things} Things", d.id));
                    }
                    if targets != 1 {
                        problems.push(format!("member {}: policy attached {targets} times", d.id));
                    }
                    if principals.map(Vec::as_slice) != Some(&[arn.to_owned()][..]) {
                        problems.push(format!("member {}: Thing principals {principals:?}", d.id));
                    }
                }
                Standing::Inactive | Standing::Stranger => {
                    // A stranger is rejected; an inactive (paused) member is held, never
                    // revoked: its certificate waits PENDING_ACTIVATION (#21 case 5).
                    let want = match d.standing {
                        Standing::Inactive => CertificateStatus::PendingActivation,
                        _ => CertificateStatus::Revoked,
                    };
                    if status != Some(&want) {
                        problems.push(format!(
                            "{:?} {} is {status:?}, not {want:?}",
                            d.standing, d.id
                        ));
                    }
                    if things != 0 || targets != 0 {
                        problems.push(format!(
                            "{:?} {} has {things} Things and the policy {targets} times",
                            d.standing, d.id
                        ));
                    }
                }
            }
        }
        let extra: Vec<_> = self
            .things
            .keys()
            .filter(|name| !expected_things.contains(name.as_str()))
            .collect();
        if !extra.is_empty() {
            problems.push(format!("Things nobody should have made: {extra:?}"));
        }
        if self.statuses.len() != devices.len() {
            problems.push(format!(
                "{} certificates under the CA, {} devices",
                self.statuses.len(),
                devices.len()
            ));
        }
        if problems.is_empty() {
            return Ok(tally);
        }
        let shown = problems.len().min(20);
        bail!(
            "{} problem(s), the first {shown}:\n  {}",
            problems.len(),
            problems[..shown].join("\n  ")
        )
    }
}
