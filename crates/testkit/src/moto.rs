//! A moto server (AWS IoT and friends) on a free loopback port, with jitr's fidelity fixes.
//!
//! The server is started by `moto/launch_moto.py` (embedded in this crate), which before
//! starting `moto.server` on `127.0.0.1`:
//! 1. sets `moto.core.config.default_user_config["iot"]["use_valid_cert"] = True`, so a
//!    certificate id is the SHA-256 of the certificate DER, as in AWS IoT (moto's default hashes
//!    the PEM text);
//! 2. wraps `moto.iot.models.FakeCertificate.to_description_dict` so DescribeCertificate also
//!    answers `caCertificateId` when the certificate has one (moto 5.2 keeps the field but only
//!    puts it in `to_dict`);
//! 3. answers GetRegistrationCode with 64 hex digits, as AWS IoT does;
//! 4. pages ListCertificatesByCA by `pageSize` and `marker`, ordered by creation date as
//!    `ascendingOrder` asks (moto answers everything at once, oldest first);
//! 5. (speed only, same answers) lists moto's service packages once instead of per request,
//!    and finds a certificate by its id (DescribeCertificate, the principal lookup of
//!    AttachPolicy/AttachThingPrincipal) and a Thing by its ARN (DescribeThing,
//!    ListThingPrincipals) instead of scanning them all.
//!
//! Python is `TESTKIT_PYTHON` if set, else `python3` from `PATH`; when it cannot
//! `import moto.server`, the harness runs `python3 -m pip install --quiet 'moto[server]>=5.1'` once.
//!
//! Known moto behaviour tests must live with: RegisterCertificate links a device certificate to
//! its CA only when the `caCertificatePem` it is given equals, byte for byte, the PEM the CA was
//! registered with (`IoTBackend._find_ca_certificate` compares strings; a different line ending
//! or a trailing newline means no `caCertificateId`). Rules never fire, the verification
//! certificate is ignored, statuses are not validated and bad input often comes back as HTTP 500.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::{NamedTempFile, TempDir};

use crate::http::HttpRequest;

/// The launcher script, embedded so the harness works wherever the test binary runs.
const LAUNCHER: &str = include_str!("../moto/launch_moto.py");

/// The package spec installed when moto is missing.
const MOTO_REQUIREMENT: &str = "moto[server]>=5.1";

/// How long the server may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Account id moto uses unless a request says otherwise (`x-moto-account-id`).
pub const ACCOUNT_ID: &str = "123456789012";

/// Region the helpers in this module assume.
pub const REGION: &str = "us-east-1";

/// A running moto server; dropping it kills the process.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
    log: NamedTempFile,
    // Holds the launcher script for as long as the process runs.
    _launcher_dir: TempDir,
}

impl MotoServer {
    /// Starts moto on a free loopback port and waits until it answers (installs moto if needed).
    pub fn start() -> Result<Self> {
        let python = python_with_moto()?;
        let launcher_dir = tempfile::Builder::new()
            .prefix("testkit-moto-")
            .tempdir()
            .context("creating a directory for the moto launcher")?;
        let launcher = launcher_dir.path().join("launch_moto.py");
        std::fs::write(&launcher, LAUNCHER)
            .with_context(|| format!("writing {}", launcher.display()))?;

        // The port is picked before moto binds it, so another process can win the race:
        // try again on a new port when that happens.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::launch(&python, &launcher) {
                Ok((child, port, log)) => {
                    return Ok(Self {
                        child,
                        port,
                        log,
                        _launcher_dir: launcher_dir,
                    })
                }
                Err(Launch::PortTaken(e)) => last_error = Some(e),
                Err(Launch::Failed(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("moto did not start")))
    }

    /// Spawns the launcher on a fresh port and waits for it to answer.
    fn launch(python: &PathBuf, launcher: &PathBuf) -> Result<(Child, u16, NamedTempFile), Launch> {
        let port = crate::proc::free_port().map_err(Launch::Failed)?;
        let log = NamedTempFile::new()
            .context("creating the moto log file")
            .map_err(Launch::Failed)?;
        let stdout = log.reopen().map_err(|e| Launch::Failed(e.into()))?;
        let stderr = log.reopen().map_err(|e| Launch::Failed(e.into()))?;
        let mut child = Command::new(python)
            .arg(launcher)
            .arg(port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {} {}", python.display(), launcher.display()))
            .map_err(Launch::Failed)?;

        let url = format!("http://127.0.0.1:{port}/moto-api/");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let output = read_log(&log);
                    let error = anyhow!("moto exited with {status} before answering:\n{output}");
                    return Err(if output.contains("Address already in use") {
                        Launch::PortTaken(error)
                    } else {
                        Launch::Failed(error)
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    kill(&mut child);
                    return Err(Launch::Failed(
                        anyhow!(e).context("polling the moto process"),
                    ));
                }
            }
            let probe = HttpRequest::get(&url)
                .timeout(Duration::from_secs(2))
                .send();
            if probe.is_ok() {
                return Ok((child, port, log));
            }
            if Instant::now() >= deadline {
                kill(&mut child);
                return Err(Launch::Failed(anyhow!(
                    "moto did not answer on port {port} within {START_TIMEOUT:?}:\n{}",
                    read_log(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT` (the value for `AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The loopback port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address moto listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Environment for an AWS SDK client (or the `bootstrap` binary) that should talk to moto.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }

    /// Forgets every resource in every backend (`POST /moto-api/reset`).
    pub fn reset(&self) -> Result<()> {
        let response = HttpRequest::post(&format!("{}/moto-api/reset", self.endpoint())).send()?;
        if response.status != 200 {
            bail!(
                "moto reset answered HTTP {}: {}",
                response.status,
                response.text()
            );
        }
        Ok(())
    }

    /// Everything the moto process has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// An `Authorization` header that makes moto route an unsigned request to `service`.
///
/// Moto picks the backend from the SigV4 credential scope and does not check the signature,
/// so raw HTTP tests can call REST-JSON APIs like `GET /things` with this header.
pub fn routing_authorization(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=testing/20250101/{REGION}/{service}/aws4_request, \
         SignedHeaders=host, Signature=00"
    )
}

/// Why one launch attempt failed.
enum Launch {
    /// Another process took the port first; worth another try.
    PortTaken(anyhow::Error),
    /// Anything else.
    Failed(anyhow::Error),
}

/// Kills and reaps the child (no zombie left behind).
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads the server log, best effort.
fn read_log(log: &NamedTempFile) -> String {
    std::fs::read(log.path())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|e| format!("(could not read the moto log: {e})"))
}

/// The Python interpreter to use: `TESTKIT_PYTHON`, else `python3` from `PATH`.
fn python_command() -> String {
    std::env::var("TESTKIT_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// The absolute path of a Python that can `import moto.server`, installing moto once if needed.
///
/// Resolving `sys.executable` also means the process we later kill is Python itself, not a
/// wrapper script (pyenv shims) that might leave Python running.
fn python_with_moto() -> Result<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| find_python_with_moto().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Uncached body of [`python_with_moto`].
fn find_python_with_moto() -> Result<PathBuf> {
    let python = python_command();
    let probe = "import sys, moto.server; print(sys.executable)";
    let first = Command::new(&python)
        .args(["-c", probe])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {python} (set TESTKIT_PYTHON to choose another)"))?;
    let output = if first.status.success() {
        first
    } else {
        let install = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", MOTO_REQUIREMENT])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {python} -m pip"))?;
        if !install.status.success() {
            bail!(
                "moto is not importable by {python} and `{python} -m pip install '{MOTO_REQUIREMENT}'` \
                 failed ({}); install it by hand:\n{}",
                install.status,
                String::from_utf8_lossy(&install.stderr)
            );
        }
        let second = Command::new(&python)
            .args(["-c", probe])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {python}"))?;
        if !second.status.success() {
            bail!(
                "moto was installed but `import moto.server` still fails:\n{}",
                String::from_utf8_lossy(&second.stderr)
            );
        }
        second
    };
    let executable = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if executable.is_empty() {
        bail!("{python} did not report sys.executable");
    }
    Ok(PathBuf::from(executable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::port_is_closed;

    #[test]
    fn serves_iot_rest_json_and_closes_its_port_when_dropped() {
        let moto = MotoServer::start().unwrap();
        let response = HttpRequest::get(&format!("{}/things", moto.endpoint()))
            .header("Authorization", &routing_authorization("iot"))
            .send()
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json().unwrap(), serde_json::json!({"things": []}));
        moto.reset().unwrap();

        let addr = moto.addr();
        drop(moto);
        assert!(port_is_closed(addr), "moto still listens on {addr}");
    }

    /// A CA and a device certificate it signed, as PEM, plus the device certificate's DER.
    fn ca_and_device() -> (String, String, Vec<u8>) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "testkit CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let device_key = KeyPair::generate().unwrap();
        let mut device_params = CertificateParams::new(Vec::new()).unwrap();
        device_params
            .distinguished_name
            .push(DnType::CommonName, "0123456789abcdef0123456789abcdef");
        let device = device_params.signed_by(&device_key, &issuer).unwrap();
        (ca_cert.pem(), device.pem(), device.der().to_vec())
    }

    #[test]
    fn certificates_by_ca_come_in_pages_newest_first_when_asked() {
        let moto = MotoServer::start().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let certs = crate::certs::TestCa::new("paging CA").unwrap();
        let ids = rt.block_on(async {
            let client = crate::iot::client(&moto).await;
            crate::iot::register_ca(&client, &certs.cert_pem)
                .await
                .unwrap();
            let mut ids = Vec::new();
            for n in 0..5 {
                let pem = certs.device_pem(&format!("{n:032x}")).unwrap();
                ids.push(
                    crate::iot::first_connect(&client, &pem, &certs.cert_pem)
                        .await
                        .unwrap(),
                );
            }
            ids
        });
        let ca_id = factory_ca::certificate_id(certs.ca.cert_der());
        let listed = |ascending: bool| {
            rt.block_on(async {
                let client = crate::iot::client(&moto).await;
                let (mut all, mut pages, mut marker) = (Vec::new(), 0, None::<String>);
                loop {
                    let out = client
                        .list_certificates_by_ca()
                        .ca_certificate_id(&ca_id)
                        .page_size(2)
                        .ascending_order(ascending)
                        .set_marker(marker.clone())
                        .send()
                        .await
                        .unwrap();
                    pages += 1;
                    all.extend(
                        out.certificates()
                            .iter()
                            .map(|c| c.certificate_id().unwrap().to_owned()),
                    );
                    match out.next_marker() {
                        Some(next) => marker = Some(next.to_owned()),
                        None => return (all, pages),
                    }
                }
            })
        };
        assert_eq!(listed(true), (ids.clone(), 3));
        let mut newest_first = ids;
        newest_first.reverse();
        assert_eq!(listed(false), (newest_first, 3));
    }

    #[test]
    fn certificate_ids_are_der_sha256_and_description_names_the_ca() {
        let moto = MotoServer::start().unwrap();
        let auth = routing_authorization("iot");
        let (ca_pem, device_pem, device_der) = ca_and_device();
        let call = |request: HttpRequest| {
            let response = request.header("Authorization", &auth).send().unwrap();
            assert_eq!(response.status, 200, "{}", response.text());
            response.json().unwrap()
        };

        let ca = call(
            HttpRequest::post(&format!(
                "{}/cacertificate?setAsActive=true&allowAutoRegistration=true",
                moto.endpoint()
            ))
            .json(&serde_json::json!({"caCertificate": ca_pem, "verificationCertificate": ca_pem})),
        );
        let device = call(
            HttpRequest::post(&format!("{}/certificate/register", moto.endpoint())).json(
                &serde_json::json!({
                    "certificatePem": device_pem,
                    "caCertificatePem": ca_pem,
                    "status": "PENDING_ACTIVATION"
                }),
            ),
        );
        let expected_id = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &device_der,
        ));
        assert_eq!(device["certificateId"], expected_id.as_str());

        let described = call(HttpRequest::get(&format!(
            "{}/certificates/{expected_id}",
            moto.endpoint()
        )));
        let description = &described["certificateDescription"];
        assert_eq!(description["caCertificateId"], ca["certificateId"]);
        assert_eq!(description["status"], "PENDING_ACTIVATION");
    }
}
