//! `jitr device connect` against a real TLS MQTT broker on loopback: Debian's mosquitto, started
//! here with `require_certificate true` and only the jitr root as `cafile`. It proves that the
//! chain our CA issues works for a real TLS stack (OpenSSL), the most common JITR failure:
//! a device presenting `chain.pem` connects, one presenting only its leaf is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use testkit::certs::rcgen::{
    self, BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use testkit::proc::KillOnDrop;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const UUID: &str = "00000000000000000000000000c0ffee";

mod common;

fn jitr(dir: &Path, args: &[&str]) -> Output {
    common::jitr(dir, args, &[])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A mosquitto broker on a loopback port; killed when dropped.
struct Mosquitto {
    _process: KillOnDrop,
    addr: SocketAddr,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto with TLS client authentication against `cafile` only.
    fn start(dir: &Path, name: &str, port: u16, cafile: &Path) -> Mosquitto {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is missing: this test needs Debian's mosquitto (scripts/setup installs it: \
             apt-get install mosquitto)"
        );
        // Started as root, mosquitto drops to the `mosquitto` user before it reads the TLS
        // files; naming the current user keeps it able to read them (ignored when not root).
        let user = text(&Command::new("id").arg("-un").output().unwrap().stdout);
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 cafile {}\n\
                 certfile {}\n\
                 keyfile {}\n\
                 require_certificate true\n\
                 use_identity_as_username true\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 log_dest stderr\n\
                 user {}\n",
                cafile.display(),
                dir.join("server.crt").display(),
                dir.join("server.key").display(),
                user.trim()
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = testkit::proc::wait_for_port(addr, Duration::from_secs(10)) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mosquitto did not start: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Mosquitto {
            _process: KillOnDrop(child),
            addr,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A jitr CA with an offline root, one device issued, and a broker certificate for
/// 127.0.0.1 / localhost signed by the same root.
fn world() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "init",
            "--with-issuing-ca",
            "--insecure-plaintext-key",
            "--subject",
            "O=jitr tests,CN=jitr test root",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = jitr(tmp.path(), &["issue", "--id", UUID]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let root_pem = std::fs::read_to_string(tmp.path().join("ca/root.crt")).unwrap();
    let root_key =
        KeyPair::from_pem(&std::fs::read_to_string(tmp.path().join("ca/root.key")).unwrap())
            .unwrap();
    let root = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &root).unwrap();
    std::fs::write(tmp.path().join("server.crt"), cert.pem()).unwrap();
    std::fs::write(tmp.path().join("server.key"), key.serialize_pem()).unwrap();
    tmp
}

fn connect(dir: &Path, cert: &str, broker: &Mosquitto, deadline: &str) -> Output {
    jitr(
        dir,
        &[
            "device",
            "connect",
            "--cert",
            cert,
            "--key",
            &format!("devices/{UUID}/device.key"),
            "--endpoint",
            &broker.addr.to_string(),
            "--server-ca",
            "ca/root.crt",
            "--deadline",
            deadline,
        ],
    )
}

#[test]
fn the_issued_chain_connects_to_a_real_broker_and_the_bare_leaf_is_refused() {
    let tmp = world();
    let dir = tmp.path();
    let port = testkit::proc::free_port().unwrap();
    let broker = Mosquitto::start(dir, "root-only", port, &dir.join("ca/root.crt"));

    // chain.pem (device, then issuing CA) lets OpenSSL build the path to the root it trusts.
    let out = connect(dir, &format!("devices/{UUID}/chain.pem"), &broker, "5s");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("attempt 1: connected"), "{stdout}");
    assert!(
        broker.log().contains(&format!("as {UUID}")),
        "the client id is the device id:\n{}",
        broker.log()
    );

    // The leaf alone: the broker cannot reach its root, and refuses every attempt.
    let out = connect(dir, &format!("devices/{UUID}/device.crt"), &broker, "5");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let attempts: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with("attempt "))
        .collect();
    assert!(attempts.len() >= 2, "retried with backoff: {stdout}");
    assert!(
        attempts.iter().all(|l| l.contains(": refused (TLS alert")),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains(&format!("not connected to {} within 5s", broker.addr)),
        "{}",
        text(&out.stderr)
    );

    // A broker whose certificate the device cannot trust: no retry can help, exit 1 at once.
    let out = jitr(
        dir,
        &[
            "device",
            "connect",
            "--cert",
            &format!("devices/{UUID}/chain.pem"),
            "--key",
            &format!("devices/{UUID}/device.key"),
            "--endpoint",
            &broker.addr.to_string(),
            "--server-ca",
            "ca/ca.crt",
            "--deadline",
            "30",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("attempt 1: failed (the broker's certificate is not trusted"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_refused_first_attempt_is_retried_until_the_broker_accepts() {
    // The JITR first connect: refused while the certificate is pending, accepted once the
    // activator has run. Here the broker first trusts an unrelated CA, then the jitr root.
    let tmp = world();
    let dir = tmp.path();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    other
        .distinguished_name
        .push(rcgen::DnType::CommonName, "somebody else's CA");
    let other = other.self_signed(&KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("other.crt"), other.pem()).unwrap();

    let port = testkit::proc::free_port().unwrap();
    let pending = Mosquitto::start(dir, "pending", port, &dir.join("other.crt"));
    let device = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args([
            "device",
            "connect",
            "--cert",
            &format!("devices/{UUID}/chain.pem"),
            "--key",
            &format!("devices/{UUID}/device.key"),
            "--endpoint",
            &format!("127.0.0.1:{port}"),
            "--server-ca",
            "ca/root.crt",
            "--deadline",
            "20",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Swap brokers once the device has been turned away at least once.
    let waited = std::time::Instant::now();
    while !pending.log().contains("certificate verify failed") {
        assert!(
            waited.elapsed() < Duration::from_secs(15),
            "the device never reached the broker:\n{}",
            pending.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pending);
    let _active = Mosquitto::start(dir, "active", port, &dir.join("ca/root.crt"));

    let out = device.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("attempt 1: refused (TLS alert from the broker"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("attempt ") && last.contains(": connected"),
        "{stdout}"
    );
}
