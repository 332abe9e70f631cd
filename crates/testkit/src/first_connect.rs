//! A balena device's whole first connect, on this machine: the world behind `jitr-demo`, the
//! cloud-relay tests and the first-connect benchmark.
//!
//! [`DeviceWorld::start`] brings up moto (AWS IoT's control plane), the device policy made from
//! `rules/device-policy.json` under a topic prefix, the fake balena API with a fleet whose
//! devices run a `cloud-relay` service, and the Lambda Runtime API emulator. Once the fleet CA
//! is registered in moto (by `jitr ca register`, as a fleet owner does), [`DeviceWorld::open`]
//! starts what the cloud runs:
//! - the [`IotEndpoint`], trusting the registered fleet CAs (and the application's), as AWS
//!   IoT trusts the CAs registered with it;
//! - the real `bootstrap` processes polling the emulator, checking the balena fleet;
//! - the topic rule: each certificate-registered event the endpoint publishes is handed to
//!   the Lambda asynchronously (an error retried twice, as Lambda does for an async invoke);
//! - an application subscribed to every device topic under the prefix (its own certificate
//!   from its own CA, its own policy), recording what it receives.
//!
//! Devices then connect as devices do: `jitr device connect`, Node's `aws-iot-device-sdk`
//! (what cloud-relay uses) or Python's `awsiotsdk`, to [`DeviceWorld::endpoint`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_iot::types::CertificateStatus;
use serde_json::Value;

use crate::balena::FakeBalena;
use crate::certs::TestCa;
use crate::iot_endpoint::{IotEndpoint, MqttClient, Next, RegisteredCa};
use crate::lambda::{Invocation, RuntimeEmulator};
use crate::moto::{MotoServer, ACCOUNT_ID, REGION};
use crate::proc::KillOnDrop;

/// The device policy every activated certificate gets.
pub const POLICY: &str = "jitr-device";
/// The balena fleet.
pub const FLEET_ID: u64 = 5150;
/// The fleet's slug.
pub const FLEET_SLUG: &str = "gh_jitr/relay-fleet";
/// The service that reads the AWS variables on each device.
pub const RELAY_SERVICE: &str = "cloud-relay";
/// The application's MQTT client id.
pub const APP_CLIENT_ID: &str = "jitr-app";
/// The application's policy: connect as itself, subscribe to and receive every device topic.
const APP_POLICY: &str = "jitr-app";
/// The (fake) balena API key; never printed.
const API_KEY: &str = "first-connect-key";
/// How long the topic rule's Lambda invocation may take.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Lambda runs an asynchronous invocation that failed twice more.
const ASYNC_RETRIES: u32 = 2;

/// How the world is set up.
#[derive(Debug, Clone)]
pub struct WorldOptions {
    /// The first topic level(s) of device topics (the stack's `TopicPrefix`).
    pub topic_prefix: String,
    /// An AWS IoT control plane already running (e.g. a moto server); else moto is started.
    pub endpoint_url: Option<String>,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            topic_prefix: "balena".to_owned(),
            endpoint_url: None,
        }
    }
}

/// One run of the Lambda for a certificate-registered event.
#[derive(Debug, Clone)]
pub struct Activation {
    /// The certificate the event named.
    pub certificate_id: String,
    /// The response's `outcome` (`activated`, `rejected`, `held`, ...) or `error <type>:
    /// <message>` when every attempt failed.
    pub outcome: String,
    /// Function runs for this event (1 + retries).
    pub runs: u32,
    /// When the event was published (the device's connect that registered it).
    pub published: Instant,
    /// When the last run answered.
    pub answered: Instant,
}

/// One message the application received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The topic.
    pub topic: String,
    /// The payload, as text.
    pub payload: String,
}

/// Everything but the devices.
pub struct DeviceWorld {
    /// Runs the SDK calls and the application.
    pub rt: tokio::runtime::Runtime,
    /// A client straight to AWS IoT (moto): for setup and checks.
    pub client: aws_sdk_iot::Client,
    /// The fleet.
    pub balena: FakeBalena,
    /// Where `bootstrap` gets its events.
    pub emulator: Arc<RuntimeEmulator>,
    /// The device topic prefix.
    pub topic_prefix: String,
    relay_service: u64,
    app_ca: TestCa,
    endpoint_url: String,
    // Dropped first: the endpoint (and with it the event sink), the runtimes, the app.
    open: Option<Open>,
    _moto: Option<MotoServer>,
}

impl std::fmt::Debug for DeviceWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWorld")
            .field("aws", &self.endpoint_url)
            .field("open", &self.open.is_some())
            .finish_non_exhaustive()
    }
}

/// What [`DeviceWorld::open`] started.
struct Open {
    endpoint: IotEndpoint,
    trusted_ca_ids: Vec<String>,
    runtimes: Vec<KillOnDrop>,
    activations: Arc<Mutex<Vec<Activation>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DeviceWorld {
    /// moto (unless `options.endpoint_url`), the device policy, the fleet with its relay
    /// service, the Runtime API emulator.
    pub fn start(options: WorldOptions) -> Result<DeviceWorld> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let moto = match options.endpoint_url {
            Some(_) => None,
            None => Some(MotoServer::start()?),
        };
        let endpoint_url = match (&options.endpoint_url, &moto) {
            (Some(url), _) => url.clone(),
            (None, Some(moto)) => moto.endpoint(),
            (None, None) => unreachable!("moto was started"),
        };
        let client =
            aws_sdk_iot::Client::new(&rt.block_on(crate::iot::sdk_config_for(&endpoint_url)));
        rt.block_on(crate::iot::create_device_policy(
            &client,
            POLICY,
            &options.topic_prefix,
        ))?;
        let balena = FakeBalena::start(API_KEY)?;
        balena.add_fleet(FLEET_ID, FLEET_SLUG);
        let relay_service = balena.add_service(FLEET_ID, RELAY_SERVICE);
        Ok(DeviceWorld {
            rt,
            client,
            balena,
            emulator: Arc::new(RuntimeEmulator::start()?),
            topic_prefix: options.topic_prefix,
            relay_service,
            app_ca: TestCa::new("jitr application CA")?,
            endpoint_url,
            open: None,
            _moto: moto,
        })
    }

    /// The AWS environment for a command or `bootstrap` talking to this world's AWS IoT.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint_url.clone()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }

    /// The balena environment for `jitr` (`--push-balena`, `--balena-cleanup`) and `bootstrap`.
    pub fn balena_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BALENA_API_URL", self.balena.url()),
            ("BALENA_API_KEY", API_KEY.to_owned()),
            ("BALENA_FLEET_ID", FLEET_ID.to_string()),
        ]
    }

    /// Adds an active device of the fleet, running the relay service; its balena id.
    pub fn add_member(&self, uuid: &str) -> u64 {
        let device = self.balena.add_device(FLEET_ID, uuid, true);
        self.balena.install(device, self.relay_service);
        device
    }

    /// The environment the relay service's container on `device` sees: device variables,
    /// overridden by the service's own (as the balena supervisor merges them).
    pub fn container_env(&self, device: u64) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = self.balena.env_vars(device).into_iter().collect();
        for (service, name, value) in self.balena.service_vars(device) {
            if service == RELAY_SERVICE {
                env.insert(name, value);
            }
        }
        env
    }

    /// Starts the cloud side: the endpoint trusting the fleet CAs `fleet_ca_ids` (registered
    /// in AWS IoT, e.g. by `jitr ca register`, which saves the id in `ca/aws-ca-id`), `runtimes`
    /// `bootstrap` processes (Lambda instances) trusting them, the topic rule, the application.
    pub fn open(
        &mut self,
        bootstrap: &Path,
        runtimes: usize,
        fleet_ca_ids: &[String],
    ) -> Result<()> {
        if self.open.is_some() {
            bail!("the world is already open");
        }
        if fleet_ca_ids.is_empty() {
            bail!("no fleet CA: register one first (jitr ca register)");
        }
        let app_ca_id = self
            .rt
            .block_on(crate::iot::register_ca(&self.client, &self.app_ca.cert_pem))?;
        let trusted_ca_ids = fleet_ca_ids.to_vec();
        let mut ids = trusted_ca_ids.clone();
        ids.push(app_ca_id);
        let cas = self.rt.block_on(registered_cas(&self.client, &ids))?;

        // The topic rule: events to the Lambda, asynchronously, one runner per instance.
        let (events, queue) = mpsc::channel::<(Value, Instant)>();
        let queue = Arc::new(Mutex::new(queue));
        let activations = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..runtimes.max(1) {
            let (queue, activations, emulator) = (
                Arc::clone(&queue),
                Arc::clone(&activations),
                Arc::clone(&self.emulator),
            );
            std::thread::spawn(move || loop {
                let next = lock(&queue).recv();
                let Ok((event, published)) = next else { break };
                let activation = run_rule(&emulator, event, published);
                lock(&activations).push(activation);
            });
        }
        let events = Mutex::new(events);
        let endpoint = IotEndpoint::start(
            self.client.clone(),
            cas,
            Box::new(move |event| {
                let _ = lock(&events).send((event, Instant::now()));
            }),
        )?;

        let mut children = Vec::new();
        for _ in 0..runtimes.max(1) {
            let child = Command::new(bootstrap)
                .env_clear()
                .envs(self.emulator.lambda_env())
                .envs(self.aws_env())
                .envs(self.balena_env())
                .envs([
                    ("JITR_TRUSTED_CA_IDS", trusted_ca_ids.join(",")),
                    ("JITR_POLICY_NAME", POLICY.to_owned()),
                    ("JITR_FLEET_BACKEND", "balena".to_owned()),
                    ("JITR_LOG", "error".to_owned()),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bootstrap.display()))?;
            children.push(KillOnDrop(child));
        }

        let received = Arc::new(Mutex::new(Vec::new()));
        let mut app = self.rt.block_on(self.application(&endpoint))?;
        let filter = format!("{}/#", self.topic_prefix);
        if !self.rt.block_on(app.subscribe(&filter))? {
            bail!("the application may not subscribe to {filter}");
        }
        let sink = Arc::clone(&received);
        self.rt.spawn(async move {
            loop {
                match app.next(Duration::from_secs(3600)).await {
                    Next::Packet(rumqttc::mqttbytes::v4::Packet::Publish(p)) => {
                        lock(&sink).push(Received {
                            topic: p.topic.clone(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        });
                    }
                    Next::Packet(_) | Next::Quiet => {}
                    Next::Closed => break,
                }
            }
        });
        self.open = Some(Open {
            endpoint,
            trusted_ca_ids,
            runtimes: children,
            activations,
            received,
        });
        Ok(())
    }

    fn opened(&self) -> &Open {
        match &self.open {
            Some(open) => open,
            None => panic!("DeviceWorld::open first"),
        }
    }

    /// The AWS IoT data plane devices connect to. Panics before [`DeviceWorld::open`].
    pub fn endpoint(&self) -> &IotEndpoint {
        &self.opened().endpoint
    }

    /// The fleet CAs the activator trusts (every CA registered before `open`).
    pub fn trusted_ca_ids(&self) -> &[String] {
        &self.opened().trusted_ca_ids
    }

    /// How many `bootstrap` processes run.
    pub fn runtimes(&self) -> usize {
        self.opened().runtimes.len()
    }

    /// Every Lambda run so far, in the order they answered.
    pub fn activations(&self) -> Vec<Activation> {
        lock(&self.opened().activations).clone()
    }

    /// Every message the application received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.opened().received).clone()
    }

    /// Waits up to `wait` for a message on `topic`.
    pub fn wait_received(&self, topic: &str, wait: Duration) -> Option<Received> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(r) = self.received().into_iter().find(|r| r.topic == topic) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A certificate's status in AWS IoT, `None` when it was never registered.
    pub fn status_if_registered(&self, certificate_id: &str) -> Result<Option<CertificateStatus>> {
        self.rt.block_on(crate::iot::status_if_registered(
            &self.client,
            certificate_id,
        ))
    }

    /// Waits up to `wait` in all for a message on each of `topics`; returns the topics still
    /// without one (none when every message arrived). One deadline for the lot: a thousand
    /// devices whose messages are missing cost `wait`, not a thousand times it.
    pub fn wait_received_all<'a>(
        &self,
        topics: impl IntoIterator<Item = &'a str>,
        wait: Duration,
    ) -> Vec<&'a str> {
        let deadline = Instant::now() + wait;
        let mut missing: Vec<&str> = topics.into_iter().collect();
        loop {
            {
                let received = lock(&self.opened().received);
                let arrived: std::collections::HashSet<&str> =
                    received.iter().map(|r| r.topic.as_str()).collect();
                missing.retain(|topic| !arrived.contains(topic));
            }
            if missing.is_empty() || Instant::now() >= deadline {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A certificate's status in AWS IoT.
    pub fn status(&self, certificate_id: &str) -> Result<CertificateStatus> {
        self.rt
            .block_on(crate::iot::status(&self.client, certificate_id))
    }

    /// The application: its certificate registered ACTIVE under its own CA, its policy
    /// attached, connected as [`APP_CLIENT_ID`].
    async fn application(&self, endpoint: &IotEndpoint) -> Result<MqttClient> {
        let issued = self.app_ca.ca.issue_device(
            &factory_ca::DeviceId::parse(APP_CLIENT_ID, factory_ca::IdFormat::Any)?,
            factory_ca::KeyAlgorithm::P256,
            30,
            time::OffsetDateTime::now_utc(),
        )?;
        let registered = self
            .client
            .register_certificate()
            .certificate_pem(&issued.cert_pem)
            .ca_certificate_pem(&self.app_ca.cert_pem)
            .status(CertificateStatus::Active)
            .send()
            .await
            .context("RegisterCertificate (application)")?;
        let arn = registered.certificate_arn().unwrap_or_default();
        let prefix = format!("arn:aws:iot:{REGION}:{ACCOUNT_ID}");
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "iot:Connect",
                 "Resource": format!("{prefix}:client/{APP_CLIENT_ID}")},
                {"Effect": "Allow", "Action": "iot:Subscribe",
                 "Resource": format!("{prefix}:topicfilter/{}/*", self.topic_prefix)},
                {"Effect": "Allow", "Action": "iot:Receive",
                 "Resource": format!("{prefix}:topic/{}/*", self.topic_prefix)},
            ]
        });
        self.client
            .create_policy()
            .policy_name(APP_POLICY)
            .policy_document(policy.to_string())
            .send()
            .await
            .context("CreatePolicy (application)")?;
        self.client
            .attach_policy()
            .policy_name(APP_POLICY)
            .target(arn)
            .send()
            .await
            .context("AttachPolicy (application)")?;
        let key = issued.key_pem.as_deref().context("no application key")?;
        let tls = crate::iot_endpoint::client::tls_config(
            &issued.chain_pem,
            key,
            endpoint.server_ca_pem(),
        )?;
        MqttClient::connect(endpoint.addr(), tls, APP_CLIENT_ID)
            .await
            .context("the application could not connect")
    }
}

/// The CAs `ids` as registered in AWS IoT, with their PEM as registered.
async fn registered_cas(client: &aws_sdk_iot::Client, ids: &[String]) -> Result<Vec<RegisteredCa>> {
    let mut cas = Vec::new();
    for id in ids {
        let described = client
            .describe_ca_certificate()
            .certificate_id(id)
            .send()
            .await
            .with_context(|| format!("DescribeCACertificate {id}"))?;
        let pem = described
            .certificate_description()
            .and_then(|d| d.certificate_pem())
            .context("DescribeCACertificate: no PEM")?;
        cas.push(RegisteredCa {
            pem: pem.to_owned(),
            id: id.clone(),
        });
    }
    Ok(cas)
}

/// The topic rule's Lambda action for one event: invoked, an error retried up to twice.
fn run_rule(emulator: &RuntimeEmulator, event: Value, published: Instant) -> Activation {
    let certificate_id = event["certificateId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut runs = 0;
    loop {
        runs += 1;
        let answer = emulator
            .invoke(event.clone(), INVOKE_TIMEOUT)
            .unwrap_or_else(|e| Invocation::Error {
                error_type: "Runtime.NoAnswer".to_owned(),
                error_message: e.to_string(),
            });
        let outcome = match answer {
            Invocation::Response(v) => v["outcome"].as_str().unwrap_or("?").to_owned(),
            Invocation::Error {
                error_type,
                error_message,
            } if runs > ASYNC_RETRIES => format!("error {error_type}: {error_message}"),
            Invocation::Error { .. } => continue,
        };
        return Activation {
            certificate_id,
            outcome,
            runs,
            published,
            answered: Instant::now(),
        };
    }
}

/// One device of a provisioned fleet: what it holds, as the device holds it.
#[derive(Debug, Clone)]
pub struct FleetDevice {
    /// The balena UUID (the certificate's CN, the client id, the Thing name).
    pub uuid: String,
    /// Whether it is an active device of the fleet (else a stranger the fleet check rejects).
    pub member: bool,
    /// Its certificate's AWS IoT id.
    pub certificate_id: String,
    /// Where it publishes (its `CLOUD_CONSUMER_TOPIC`).
    pub topic: String,
    /// Its chain, decoded from `AWS_CERT`.
    pub cert: std::path::PathBuf,
    /// Its key, decoded from `AWS_PRIVATE_KEY` (mode 0600).
    pub key: std::path::PathBuf,
    /// The variables it was given, as its relay container sees them (a stranger: as the
    /// issuing command wrote them to a file).
    pub env: BTreeMap<String, String>,
}

/// A fleet provisioned through `jitr` ([`DeviceWorld::provision`]).
#[derive(Debug)]
pub struct Fleet {
    /// The owner's folder: `ca/`, `devices/`, the server CA devices trust (`aws-root.pem`).
    pub dir: tempfile::TempDir,
    /// Members first, then strangers.
    pub devices: Vec<FleetDevice>,
}

/// How one device's `jitr device connect --json` ended.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// The device.
    pub uuid: String,
    /// `connected`, `deadline`, `publish-refused` or `failed`.
    pub outcome: String,
    /// From its first CONNECT to the accepting CONNACK.
    pub connected_after: Option<Duration>,
    /// The backoff it waited between attempts.
    pub backoff: Duration,
    /// Connection attempts.
    pub attempts: usize,
    /// The report as printed.
    pub json: Value,
}

/// Runs `jitr` in `dir` with nothing of the caller's environment but `PATH` and `HOME`.
fn jitr_command(jitr: &Path, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Command {
    let mut command = Command::new(jitr);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_clear()
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    for var in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(var) {
            command.env(var, value);
        }
    }
    command
}

fn run_jitr(jitr: &Path, dir: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let out = jitr_command(jitr, dir, args, env)
        .output()
        .with_context(|| format!("running {}", jitr.display()))?;
    if !out.status.success() {
        bail!(
            "jitr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `arg` as a shell reads it back: quoted when it holds anything but plain characters.
fn shell_quoted(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

fn decode_b64(value: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(value)?)
}

impl DeviceWorld {
    /// The fleet owner's whole setup through `jitr`, each command shown through `say`: a CA
    /// below an offline root, registered in AWS IoT; the cloud side opened on it
    /// ([`DeviceWorld::open`] with `runtimes` `bootstrap` processes); `members` devices added
    /// to the fleet and issued with delivery to their relay service; `strangers` issued from the
    /// same CA but in no fleet (their variables in a file). Then each device's variables are
    /// read as its container sees them and decoded to the files it connects with.
    pub fn provision(
        &mut self,
        jitr: &Path,
        bootstrap: &Path,
        runtimes: usize,
        members: usize,
        strangers: usize,
        say: &dyn Fn(&str),
    ) -> Result<Fleet> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let aws = self.aws_env();
        let balena = self.balena_env();
        let step = |args: &[&str], env: &[(&str, String)]| {
            let shown: Vec<String> = args.iter().map(|a| shell_quoted(a)).collect();
            say(&format!("$ jitr {}", shown.join(" ")));
            run_jitr(jitr, dir, args, env)
        };
        step(
            &[
                "ca",
                "init",
                "--with-issuing-ca",
                "--subject",
                "O=jitr demo,CN=jitr demo fleet root",
                "--insecure-plaintext-key",
            ],
            &[],
        )?;
        step(&["ca", "register"], &aws)?;
        let ca_id = std::fs::read_to_string(dir.join("ca/aws-ca-id"))?
            .trim()
            .to_owned();
        self.open(bootstrap, runtimes, &[ca_id])?;
        std::fs::write(dir.join("aws-root.pem"), self.endpoint().server_ca_pem())?;

        let uuids: Vec<String> = (0..members + strangers)
            .map(|n| format!("{:032x}", 0xde40_0000_u64 + n as u64))
            .collect();
        let (member_ids, stranger_ids) = uuids.split_at(members);
        let mut balena_ids = Vec::new();
        for uuid in member_ids {
            balena_ids.push(self.add_member(uuid));
        }
        let ids_arg = |path: &str, ids: &[String]| -> Result<()> {
            std::fs::write(dir.join(path), ids.join("\n") + "\n")?;
            Ok(())
        };
        if members > 0 {
            ids_arg("members.txt", member_ids)?;
            step(
                &[
                    "issue",
                    "--ids",
                    "members.txt",
                    "--push-balena",
                    "--balena-service",
                    RELAY_SERVICE,
                    "--endpoint",
                    "localhost",
                    "--topic-prefix",
                    &self.topic_prefix,
                ],
                &balena,
            )?;
        }
        let mut stranger_envs = Vec::new();
        if strangers > 0 {
            ids_arg("strangers.txt", stranger_ids)?;
            step(
                &[
                    "issue",
                    "--ids",
                    "strangers.txt",
                    "--balena-env",
                    "strangers.jsonl",
                    "--endpoint",
                    "localhost",
                    "--topic-prefix",
                    &self.topic_prefix,
                ],
                &[],
            )?;
            for line in std::fs::read_to_string(dir.join("strangers.jsonl"))?.lines() {
                let value: Value = serde_json::from_str(line)?;
                let env: BTreeMap<String, String> = value
                    .as_object()
                    .context("a strangers.jsonl line is not an object")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                stranger_envs.push(env);
            }
        }

        let mut devices = Vec::new();
        let envs = balena_ids
            .iter()
            .map(|&id| self.container_env(id))
            .chain(stranger_envs);
        for (n, (uuid, env)) in uuids.iter().zip(envs).enumerate() {
            devices.push(device_files(dir, uuid, n < members, &env)?);
        }
        Ok(Fleet { dir: tmp, devices })
    }

    /// Every device of `fleet` connects at once, as a device does: `jitr device connect`
    /// with its chain, client id = UUID, jittered backoff, publishing `message` to its topic
    /// once accepted, giving up after `deadline(device)`. At most [`AT_ONCE`] device processes
    /// run together (a larger fleet comes in waves, the next device starting as one ends);
    /// `progress(done, total)` is called as each one ends.
    pub fn connect_all(
        &self,
        jitr: &Path,
        fleet: &Fleet,
        message: &str,
        deadline: &dyn Fn(&FleetDevice) -> Duration,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<DeviceReport>> {
        let endpoint = format!("127.0.0.1:{}", self.endpoint().port());
        let total = fleet.devices.len();
        // Reports in the fleet's order (callers zip them with its devices), whenever they end.
        let mut reports: Vec<Option<DeviceReport>> = Vec::new();
        reports.resize_with(total, || None);
        let mut running: Vec<(usize, KillOnDrop)> = Vec::new();
        let (mut started, mut done) = (0, 0);
        while done < total {
            // Start devices while there is room, then collect the ones that ended.
            while running.len() < AT_ONCE && started < total {
                let device = &fleet.devices[started];
                let child =
                    self.device_process(jitr, fleet, &endpoint, device, message, deadline)?;
                running.push((started, child));
                started += 1;
            }
            let before = done;
            let mut n = 0;
            while n < running.len() {
                if running[n].1.try_wait()?.is_some() {
                    let (index, child) = running.swap_remove(n);
                    let uuid = fleet.devices[index].uuid.clone();
                    reports[index] = Some(device_report(uuid, child)?);
                    done += 1;
                } else {
                    n += 1;
                }
            }
            if done > before {
                progress(done, total);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let reports = reports.into_iter().flatten().collect();
        Ok(reports)
    }

    /// One device's `jitr device connect`, started.
    fn device_process(
        &self,
        jitr: &Path,
        fleet: &Fleet,
        endpoint: &str,
        device: &FleetDevice,
        message: &str,
        deadline: &dyn Fn(&FleetDevice) -> Duration,
    ) -> Result<KillOnDrop> {
        let deadline_arg = deadline(device).as_secs().max(1).to_string();
        let (cert, key) = (device.cert.to_string_lossy(), device.key.to_string_lossy());
        let args = [
            "device",
            "connect",
            "--cert",
            &cert,
            "--key",
            &key,
            "--endpoint",
            endpoint,
            "--server-ca",
            "aws-root.pem",
            "--publish",
            &device.topic,
            message,
            "--deadline",
            &deadline_arg,
            "--json",
        ];
        let child = jitr_command(jitr, fleet.dir.path(), &args, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {}", jitr.display()))?;
        Ok(KillOnDrop(child))
    }
}

/// How many `jitr device connect` processes [`DeviceWorld::connect_all`] runs at once: a
/// thousand fit this machine's memory and process limits, ten thousand would not.
pub const AT_ONCE: usize = 1000;

/// What one `jitr device connect` reported once it ended (it stops at its deadline; one that
/// does not is killed when dropped).
fn device_report(uuid: String, mut child: KillOnDrop) -> Result<DeviceReport> {
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        out.read_to_string(&mut stdout)?;
    }
    let _ = child.wait();
    let json: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!("device {uuid}: jitr device connect printed no report: {stdout}")
    })?;
    let ms = |v: &Value| v.as_f64().map(|ms| Duration::from_secs_f64(ms / 1000.0));
    Ok(DeviceReport {
        uuid,
        outcome: json["outcome"].as_str().unwrap_or("?").to_owned(),
        connected_after: ms(&json["connected_after_ms"]),
        backoff: ms(&json["backoff_ms"]).unwrap_or_default(),
        attempts: json["attempts"].as_array().map_or(0, Vec::len),
        json,
    })
}

/// One device's files from its variables: the chain and key decoded, as cloud-relay does.
fn device_files(
    dir: &Path,
    uuid: &str,
    member: bool,
    env: &BTreeMap<String, String>,
) -> Result<FleetDevice> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let var = |name: &str| {
        env.get(name)
            .with_context(|| format!("device {uuid} has no {name}"))
    };
    let folder = dir.join("on-device").join(uuid);
    std::fs::create_dir_all(&folder)?;
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700))?;
    let chain = decode_b64(var("AWS_CERT")?)?;
    let (cert, key) = (folder.join("cert.pem"), folder.join("key.pem"));
    std::fs::write(&cert, &chain)?;
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)?;
        file.write_all(&decode_b64(var("AWS_PRIVATE_KEY")?)?)?;
    }
    let certificate_id = crate::certs::certificate_id_of(&String::from_utf8_lossy(&chain))?;
    Ok(FleetDevice {
        uuid: uuid.to_owned(),
        member,
        certificate_id,
        topic: var("CLOUD_CONSUMER_TOPIC")?.clone(),
        cert,
        key,
        env: env.clone(),
    })
}
