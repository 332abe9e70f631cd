//! A balena device's whole first connect, as the device sees it, against the test kit's AWS
//! IoT stand-in ([`testkit::first_connect::DeviceWorld`]): moto behind it, the real
//! `bootstrap` invoked by the topic rule, the fleet on the fake balena API.
//!
//! The fleet owner's part runs through `jitr` (`ca init`, `ca register`, `issue
//! --push-balena --balena-service cloud-relay`); the device's part reads what balena hands
//! the cloud-relay container and connects with `jitr device connect`, with the Node library
//! cloud-relay itself uses (`aws-iot-device-sdk`, configured as cloud-relay configures it) and
//! with AWS's Python SDK (`awsiotsdk`). `scripts/setup` installs both.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use aws_sdk_iot::types::CertificateStatus;
use base64::Engine;
use serde_json::Value;
use testkit::first_connect::{DeviceWorld, WorldOptions, RELAY_SERVICE};
use testkit::iot_endpoint::Seen;

mod common;

use common::{stderr, stdout, uuid};

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// The fleet owner's setup through `jitr`: a CA with an offline root (the chain matters),
/// registered in the world's AWS IoT; then the world opened on it.
fn owner_setup(world: &mut DeviceWorld) -> tempfile::TempDir {
    let tmp = common::with_ca(&["--with-issuing-ca"]);
    let out = common::jitr(
        tmp.path(),
        &["ca", "register", "--passphrase-file", "pass"],
        &world.aws_env(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let ca_id = std::fs::read_to_string(tmp.path().join("ca/aws-ca-id")).unwrap();
    world
        .open(&common::bootstrap(), 2, &[ca_id.trim().to_owned()])
        .unwrap();
    std::fs::write(
        tmp.path().join("aws-root.pem"),
        world.endpoint().server_ca_pem(),
    )
    .unwrap();
    tmp
}

/// `jitr issue` for `ids`, delivered to the relay service of each device through balena.
fn issue_to_relay(world: &DeviceWorld, dir: &Path, ids: &[&str]) {
    let mut args = vec![
        "issue",
        "--passphrase-file",
        "pass",
        "--push-balena",
        "--balena-service",
        RELAY_SERVICE,
        "--endpoint",
        "localhost",
    ];
    for id in ids {
        args.extend(["--id", id]);
    }
    let out = common::jitr(dir, &args, &world.balena_env());
    assert!(out.status.success(), "{}", stderr(&out));
}

fn decode(value: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

/// What the device does with its container's variables before connecting with `jitr`:
/// the decoded chain and key as files (key mode 0600).
fn device_files(dir: &Path, id: &str, env: &BTreeMap<String, String>) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let folder = dir.join("on-device").join(id);
    std::fs::create_dir_all(&folder).unwrap();
    let (cert, key) = (folder.join("cert.pem"), folder.join("key.pem"));
    std::fs::write(&cert, decode(&env["AWS_CERT"])).unwrap();
    std::fs::write(&key, decode(&env["AWS_PRIVATE_KEY"])).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert, key)
}

/// `jitr device connect --json` with the device's files, publishing `message` to `topic`.
fn device_connect(
    world: &DeviceWorld,
    dir: &Path,
    files: &(PathBuf, PathBuf),
    topic: &str,
    deadline: &str,
) -> (Output, Value) {
    let out = common::jitr(
        dir,
        &[
            "device",
            "connect",
            "--cert",
            files.0.to_str().unwrap(),
            "--key",
            files.1.to_str().unwrap(),
            "--endpoint",
            &format!("127.0.0.1:{}", world.endpoint().port()),
            "--server-ca",
            "aws-root.pem",
            "--publish",
            topic,
            "{\"temperature\":21.5}",
            "--deadline",
            deadline,
            "--json",
        ],
        &[],
    );
    let report = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    (out, report)
}

fn certificate_id(dir: &Path, id: &str) -> String {
    let pem = std::fs::read_to_string(dir.join(format!("devices/{id}/device.crt"))).unwrap();
    testkit::certs::certificate_id_of(&pem).unwrap()
}

fn outcomes(world: &DeviceWorld, certificate_id: &str) -> Vec<String> {
    world
        .activations()
        .into_iter()
        .filter(|a| a.certificate_id == certificate_id)
        .map(|a| a.outcome)
        .collect()
}

#[test]
fn a_relay_device_is_closed_activated_then_accepted_and_its_message_arrives() {
    let mut world = DeviceWorld::start(WorldOptions::default()).unwrap();
    let tmp = owner_setup(&mut world);
    let dir = tmp.path();
    let (member, stranger) = (uuid(0xa1), uuid(0x5e));
    let balena_id = world.add_member(&member);
    issue_to_relay(&world, dir, &[&member]);
    // A certificate from the same CA for a device not in the fleet (issued elsewhere).
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--id",
            &stranger,
            "--passphrase-file",
            "pass",
            "--balena-env",
            "stranger.jsonl",
            "--endpoint",
            "localhost",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // What the cloud-relay container sees: its service's variables, nothing device-wide.
    let env = world.container_env(balena_id);
    assert!(world.balena.env_vars(balena_id).is_empty());
    assert_eq!(env["AWS_DATA_ENDPOINT"], "localhost");
    let topic = env["CLOUD_CONSUMER_TOPIC"].clone();
    assert_eq!(topic, format!("balena/{member}/sensors"));
    let files = device_files(dir, &member, &env);

    let (out, report) = device_connect(&world, dir, &files, &topic, "30");
    assert_eq!(out.status.code(), Some(0), "{report}\n{}", stderr(&out));
    assert_eq!(report["outcome"], "connected", "{report}");
    let attempts = report["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{report}");
    assert_eq!(attempts[0]["result"], "refused", "{report}");
    assert_eq!(
        attempts[0]["detail"], "connection closed before CONNACK",
        "{report}"
    );
    assert_eq!(attempts.last().unwrap()["result"], "connected");
    assert_eq!(report["published"]["accepted"], true);
    let cert = certificate_id(dir, &member);
    assert_eq!(world.status(&cert).unwrap(), CertificateStatus::Active);
    assert!(
        outcomes(&world, &cert).contains(&"activated".to_owned()),
        "{:?}",
        world.activations()
    );
    let received = world
        .wait_received(&topic, Duration::from_secs(5))
        .expect("the application received the message");
    assert_eq!(received.payload, "{\"temperature\":21.5}");
    let seen: Vec<Seen> = world
        .endpoint()
        .seen()
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert!(
        seen.contains(&Seen::Registered {
            certificate_id: cert
        }),
        "{seen:?}"
    );

    // The stranger: registered on its first connect, rejected by the fleet check, REVOKED,
    // never accepted; its connect gives up at the deadline.
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("stranger.jsonl"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let env: BTreeMap<String, String> = line
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let files = device_files(dir, &stranger, &env);
    let stranger_topic = env["CLOUD_CONSUMER_TOPIC"].clone();
    let (out, report) = device_connect(&world, dir, &files, &stranger_topic, "4");
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["outcome"], "deadline", "{report}");
    assert!(report["connected_after_ms"].is_null(), "{report}");
    let cert = certificate_id(dir, &stranger);
    assert_eq!(world.status(&cert).unwrap(), CertificateStatus::Revoked);
    assert!(outcomes(&world, &cert).contains(&"rejected".to_owned()));
    assert!(!world
        .endpoint()
        .seen()
        .iter()
        .any(|(_, s)| matches!(s, Seen::Connected { client_id } if *client_id == stranger)));

    // Revoked with --balena-cleanup: the relay service's variables are gone, and a second
    // run is no error. The stranger is not in the fleet: named, nothing touched.
    let revoke = |id: &str| {
        let mut env = world.aws_env();
        env.extend(world.balena_env());
        common::jitr(dir, &["revoke", "--id", id, "--balena-cleanup"], &env)
    };
    let out = revoke(&member);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "removed jitr's variables from balena device {member}"
        )),
        "{}",
        stdout(&out)
    );
    assert!(world.balena.service_vars(balena_id).is_empty());
    assert!(world.container_env(balena_id).is_empty());
    let out = revoke(&member);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = revoke(&stranger);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "jitr: balena: {stranger}: not found in balena fleet"
        )),
        "{}",
        stderr(&out)
    );
    // A revoked device is turned away.
    let files = device_files(dir, &member, &env_for_files(dir, &member));
    let (_, report) = device_connect(&world, dir, &files, &topic, "2");
    assert_eq!(report["outcome"], "deadline", "{report}");
}

/// The device's own files, as issued (after cleanup balena no longer holds them).
fn env_for_files(dir: &Path, id: &str) -> BTreeMap<String, String> {
    let b64 = |path: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(dir.join(format!("devices/{id}/{path}"))).unwrap())
    };
    BTreeMap::from([
        ("AWS_CERT".to_owned(), b64("chain.pem")),
        ("AWS_PRIVATE_KEY".to_owned(), b64("device.key")),
    ])
}

/// A world with one fleet member, `device`, issued for cloud-relay: the world, the owner's
/// folder, the device, and the variables balena hands its cloud-relay container.
fn relay_world(
    device: String,
) -> (
    DeviceWorld,
    tempfile::TempDir,
    String,
    BTreeMap<String, String>,
) {
    let mut world = DeviceWorld::start(WorldOptions::default()).unwrap();
    let tmp = owner_setup(&mut world);
    let balena_id = world.add_member(&device);
    issue_to_relay(&world, tmp.path(), &[&device]);
    let env = world.container_env(balena_id);
    (world, tmp, device, env)
}

/// Runs a device client with the container's variables as its environment, plus what the
/// balena supervisor adds (RESIN_DEVICE_UUID), the server CA file and the test port.
fn client(
    world: &DeviceWorld,
    dir: &Path,
    program: &str,
    args: &[&str],
    env: &BTreeMap<String, String>,
    uuid: &str,
    extra: &[(&str, &str)],
) -> Output {
    client_command(world, dir, program, args, env, uuid, extra)
        .output()
        .unwrap()
}

/// The command [`client`] runs, to start it in the background instead.
fn client_command(
    world: &DeviceWorld,
    dir: &Path,
    program: &str,
    args: &[&str],
    env: &BTreeMap<String, String>,
    uuid: &str,
    extra: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(clients_dir())
        .env_clear()
        .envs(env)
        .env("RESIN_DEVICE_UUID", uuid)
        .env("AWS_ROOT_CA_PATH", dir.join("aws-root.pem"))
        .env("TEST_PORT", world.endpoint().port().to_string())
        .envs(extra.iter().copied())
        .stdin(Stdio::null());
    for var in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(var) {
            command.env(var, value);
        }
    }
    command
}

/// The JSON lines a Node client printed.
fn events_of(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn cloud_relays_own_client_library_publishes_where_the_policy_allows() {
    let node_sdk = clients_dir().join("node_modules/aws-iot-device-sdk");
    assert!(
        node_sdk.exists(),
        "{} is missing: run scripts/setup (npm ci in tests/clients)",
        node_sdk.display()
    );
    let (world, tmp, device, env) = relay_world(uuid(0xc1));
    let dir = tmp.path();
    let topic = env["CLOUD_CONSUMER_TOPIC"].clone();

    // The first connect, as cloud-relay makes it: closed while the certificate is pending,
    // the SDK reconnects on its own, accepted once activated; the message relayed.
    let out = client(
        &world,
        dir,
        "node",
        &["cloud_relay.js", "{\"relayed\":1}"],
        &env,
        &device,
        &[],
    );
    let events = events_of(&out);
    let result = events.iter().find(|e| e["event"] == "result");
    assert!(
        result.is_some_and(|r| r["connected"] == true && r["closes_after_publish"] == 0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        events.iter().position(|e| e["event"] == "close")
            < events.iter().position(|e| e["event"] == "connect"),
        "the first connect was closed: {events:?}"
    );
    let received = world
        .wait_received(&topic, Duration::from_secs(5))
        .expect("the application received the relayed message");
    assert_eq!(received.payload, "{\"relayed\":1}");

    // cloud-relay's default topic, which jitr no longer leaves it with: disconnected.
    let mut bare = env;
    bare.remove("CLOUD_CONSUMER_TOPIC");
    let out = client(
        &world,
        dir,
        "node",
        &["cloud_relay.js", "{\"relayed\":2}"],
        &bare,
        &device,
        &[("SETTLE_MS", "1000")],
    );
    let events = events_of(&out);
    let result = events.iter().find(|e| e["event"] == "result").cloned();
    assert!(
        result
            .as_ref()
            .is_some_and(|r| r["connected"] == true && r["closes_after_publish"] != 0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(world.endpoint().seen().iter().any(|(_, s)| matches!(
        s,
        Seen::ForbiddenPublish { client_id, topic } if *client_id == device && topic == "sensors"
    )));
    assert!(!world.received().iter().any(|r| r.topic == "sensors"));
}

/// One client id is one session, on AWS IoT and on the stand-in: `jitr device connect` beside
/// a running cloud-relay (AWS's own Node library) ends cloud-relay's connection, which the
/// library then makes again. jitr says so before it connects.
#[test]
fn a_second_connection_with_the_devices_client_id_drops_the_first() {
    let (world, tmp, device, env) = relay_world(uuid(0xc7));
    let dir = tmp.path();
    let topic = env["CLOUD_CONSUMER_TOPIC"].clone();
    // Activated first (a first connect is closed while the certificate is pending).
    let files = device_files(dir, &device, &env);
    let (out, _) = device_connect(&world, dir, &files, &topic, "30s");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stderr(&out).contains("AWS IoT keeps one connection per client id"),
        "{}",
        stderr(&out)
    );

    // cloud-relay, connected and staying so for 8 s.
    let mut command = client_command(
        &world,
        dir,
        "node",
        &["cloud_relay.js", "{\"relayed\":7}"],
        &env,
        &device,
        &[("SETTLE_MS", "8000")],
    );
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let relay = command.spawn().unwrap();
    let connected = |n: usize| {
        world
            .endpoint()
            .seen()
            .iter()
            .filter(|(_, s)| matches!(s, Seen::Connected { client_id } if *client_id == device))
            .count()
            >= n
    };
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while !connected(2) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(connected(2), "cloud-relay never connected");
    let (out, _) = device_connect(&world, dir, &files, &topic, "30s");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let relay = relay.wait_with_output().unwrap();
    let events = events_of(&relay);
    let result = events.iter().find(|e| e["event"] == "result");
    // Dropped after its publish, and connected again by the library on its own.
    assert!(
        result
            .is_some_and(|r| r["closes_after_publish"].as_u64() >= Some(1)
                && r["connects"].as_u64() >= Some(2)),
        "{events:?}{}",
        stderr(&relay)
    );
    assert!(
        world
            .endpoint()
            .seen()
            .iter()
            .any(|(_, s)| matches!(s, Seen::TakenOver { client_id } if *client_id == device)),
        "the stand-in recorded no takeover"
    );
}

#[test]
fn awss_python_device_sdk_connects_with_the_delivered_variables() {
    let (world, tmp, device, env) = relay_world(uuid(0xd1));
    let dir = tmp.path();
    let topic = env["CLOUD_CONSUMER_TOPIC"].clone();

    let out = client(
        &world,
        dir,
        "python3",
        &["awsiotsdk_device.py", "{\"py\":1}", &topic, "sensors"],
        &env,
        &device,
        &[],
    );
    let report: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    assert_eq!(report["connected"], true, "{report}");
    assert!(
        report["connect_attempts"].as_u64().unwrap() >= 2,
        "{report}"
    );
    assert_eq!(
        report["published"],
        serde_json::json!([
            {"topic": topic, "acked": true},
            {"topic": "sensors", "acked": false, "error": report["published"][1]["error"]},
        ]),
        "{report}"
    );
    assert_eq!(
        world
            .wait_received(&topic, Duration::from_secs(5))
            .map(|r| r.payload),
        Some("{\"py\":1}".to_owned())
    );
}
