//! `--balena-env FILE` and `--push-balena`: issued credentials delivered to balena devices as
//! the variables balena's cloud-relay block reads. The rendering and the API client live in
//! the `balena` crate; every device pushed to is looked up in the pinned fleet
//! (`BALENA_FLEET_ID`), so a key that sees several fleets never writes outside it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use balena::delivery::DeliveryVariables;
use balena::{Fleet, Scope, Upserted};
use factory_ca::DeviceId;
use futures::StreamExt;

use crate::cli::BalenaDeliveryArgs;

/// Devices pushed at once: the API rate-limits, and each device is a few requests.
const PUSH_CONCURRENCY: usize = 4;
/// Longest one device's push may take, 429 waits included.
const PUSH_DEADLINE: Duration = Duration::from_secs(60);

/// What to do with the issued credentials, settled before anything is issued.
#[derive(Debug)]
pub(crate) struct Delivery {
    env_file: Option<PathBuf>,
    push: Option<Fleet>,
    scope: Scope,
    endpoint: Option<String>,
    topic_prefix: String,
    timeout: Duration,
}

/// How long a whole push may take unless `--timeout` says otherwise.
const PUSH_TIMEOUT: Duration = Duration::from_secs(600);

impl Delivery {
    /// Reads the flags and, for `--push-balena`, the balena settings from the environment, so
    /// a missing key fails the command before any certificate is issued.
    pub(crate) fn from_args(args: &BalenaDeliveryArgs) -> Result<Delivery> {
        let push = if args.push_balena {
            Some(activator::balena_fleet_from_env().context(
                "--push-balena needs BALENA_API_KEY and BALENA_FLEET_ID (BALENA_API_URL for another API)",
            )?)
        } else {
            None
        };
        Ok(Delivery {
            env_file: args.balena_env.clone(),
            push,
            scope: match &args.balena_service {
                Some(service) => Scope::Service(service.clone()),
                None => Scope::Device,
            },
            endpoint: args.endpoint.clone(),
            topic_prefix: args.topic_prefix.clone(),
            timeout: args.timeout.unwrap_or(PUSH_TIMEOUT),
        })
    }

    /// Whether anything is to be delivered.
    pub(crate) fn wanted(&self) -> bool {
        self.env_file.is_some() || self.push.is_some()
    }

    /// The variables for one device (`key_pem` is `None` for a device that sent a CSR).
    pub(crate) fn variables(
        &self,
        id: &DeviceId,
        chain_pem: &str,
        key_pem: Option<&str>,
    ) -> DeliveryVariables {
        self.variables_at(id, chain_pem, key_pem, None)
    }

    /// The variables for one device with its own data endpoint (its region's), else
    /// `--endpoint`'s.
    pub(crate) fn variables_at(
        &self,
        id: &DeviceId,
        chain_pem: &str,
        key_pem: Option<&str>,
        endpoint: Option<&str>,
    ) -> DeliveryVariables {
        DeliveryVariables::new(
            id,
            chain_pem,
            key_pem,
            endpoint.or(self.endpoint.as_deref()),
            &self.topic_prefix,
        )
    }

    /// Writes the file and pushes to balena; `Ok(false)` when a device failed (each one is
    /// reported on standard error, the others still delivered).
    pub(crate) fn deliver(&self, devices: &[DeliveryVariables]) -> Result<bool> {
        crate::aws::runtime()?.block_on(self.deliver_on(devices))
    }

    /// [`Delivery::deliver`] on the command's runtime.
    pub(crate) async fn deliver_on(&self, devices: &[DeliveryVariables]) -> Result<bool> {
        if let Some(path) = &self.env_file {
            write_env_file(path, devices)?;
            eprintln!(
                "wrote balena variables of {} device(s) to {} (mode 0600: it holds private keys)",
                devices.len(),
                path.display()
            );
        }
        let Some(fleet) = &self.push else {
            return Ok(true);
        };
        let holds_keys = devices.iter().any(|d| {
            d.iter()
                .any(|(name, _)| name == balena::delivery::AWS_PRIVATE_KEY)
        });
        if self.scope == Scope::Device && holds_keys {
            eprintln!(
                "warning: AWS_PRIVATE_KEY is set as a device variable: every service on the device \
                 sees it; --balena-service NAME gives it to that service only"
            );
        }
        let scope = &self.scope;
        let overall = tokio::time::Instant::now() + self.timeout;
        let results = futures::stream::iter(devices)
            .map(|device| async move { (device, push(fleet, scope, device, overall).await) })
            .buffer_unordered(PUSH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut failed = 0;
        for (device, result) in &results {
            match result {
                Ok(done) => {
                    let done: Vec<_> = done
                        .iter()
                        .map(|(name, how)| match how {
                            Upserted::Created => format!("{name} created"),
                            Upserted::Updated => format!("{name} updated"),
                        })
                        .collect();
                    eprintln!("balena: {}: {}", device.device(), done.join(", "));
                }
                Err(reason) => {
                    failed += 1;
                    eprintln!("jitr: balena: {}: {reason}", device.device());
                }
            }
        }
        eprintln!(
            "pushed the variables to {} of {} device(s) of fleet {} through {}{}",
            results.len() - failed,
            results.len(),
            fleet.id(),
            fleet.client().api_url(),
            if failed == 0 {
                String::new()
            } else {
                format!(", {failed} failed (their certificates are issued: push again)")
            }
        );
        Ok(failed == 0)
    }
}

/// Sets every variable of one device; the error names the variable that failed.
async fn push(
    fleet: &Fleet,
    scope: &Scope,
    device: &DeliveryVariables,
    overall: tokio::time::Instant,
) -> Result<Vec<(&'static str, Upserted)>, String> {
    if tokio::time::Instant::now() >= overall {
        return Err("not pushed: --timeout reached before its turn (push again)".to_owned());
    }
    let deadline = overall.min(tokio::time::Instant::now() + PUSH_DEADLINE);
    let target = match fleet.device(device.device(), deadline).await {
        Ok(Some(target)) => target,
        Ok(None) => {
            return Err(format!(
                "not found in balena fleet {} (no such device there, or the API key cannot see it)",
                fleet.id()
            ))
        }
        Err(e) => return Err(format!("device lookup: {}", iot::error_chain(&e))),
    };
    let mut done = Vec::new();
    for (name, value) in device.iter() {
        match fleet
            .set_env_var(&target, scope, name, value, deadline)
            .await
        {
            Ok(how) => done.push((name, how)),
            Err(e) => return Err(format!("{name}: {}", iot::error_chain(&e))),
        }
    }
    Ok(done)
}

/// Writes one JSON line per device, replacing `path` whole, readable by its owner only.
fn write_env_file(path: &Path, devices: &[DeliveryVariables]) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let cannot = || format!("cannot write {}", path.display());
    // A temporary file is created 0600, and renamed into place only once complete.
    let mut file = tempfile::Builder::new()
        .prefix(".balena-env")
        .tempfile_in(dir)
        .with_context(cannot)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(cannot)?;
    for device in devices {
        let line = device.to_json_line();
        file.write_all(line.as_bytes()).with_context(cannot)?;
        file.write_all(b"\n").with_context(cannot)?;
    }
    file.as_file().sync_all().with_context(cannot)?;
    file.persist(path)
        .map_err(|e| e.error)
        .with_context(cannot)?;
    Ok(())
}

/// Removes the variables jitr sets from each of `devices` in the pinned fleet, device-wide and
/// from every service; a device not in the fleet is reported, never touched. The devices
/// cleaned, and the failures (`device: reason`).
pub(crate) async fn cleanup(
    devices: &[String],
    deadline: tokio::time::Instant,
) -> Result<(Vec<String>, Vec<String>)> {
    let fleet = activator::balena_fleet_from_env().context(
        "--balena-cleanup needs BALENA_API_KEY and BALENA_FLEET_ID (BALENA_API_URL for another API)",
    )?;
    let (mut cleaned, mut failed) = (Vec::new(), Vec::new());
    for id in devices {
        let Ok(uuid) = DeviceId::parse(id, factory_ca::IdFormat::Any) else {
            continue;
        };
        let result = match fleet.device(&uuid, deadline).await {
            Ok(Some(device)) => fleet
                .remove_env_vars(&device, &balena::delivery::ALL, deadline)
                .await
                .map_err(|e| iot::error_chain(&e)),
            Ok(None) => Err(format!(
                "not found in balena fleet {}: nothing removed",
                fleet.id()
            )),
            Err(e) => Err(iot::error_chain(&e)),
        };
        match result {
            Ok(()) => cleaned.push(id.clone()),
            Err(reason) => failed.push(format!("{id}: {reason}")),
        }
    }
    Ok((cleaned, failed))
}

/// The fleet variables that make balena's cloud-relay ask the provisioner for a certificate.
const PROVISION_URL: &str = "PROVISION_URL";

/// An `https://` URL with a host, or `http://` to this machine only (a local test stack).
fn provision_url_ok(url: &str) -> bool {
    let host_of = |rest: &str| {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
            _ => host.to_owned(),
        }
    };
    if url.contains(char::is_whitespace) {
        return false;
    }
    if let Some(rest) = url.strip_prefix("https://") {
        return !host_of(rest).is_empty();
    }
    url.strip_prefix("http://")
        .is_some_and(|rest| matches!(host_of(rest).as_str(), "127.0.0.1" | "localhost" | "[::1]"))
}

/// `jitr balena fleet-vars`: PROVISION_URL and AWS_DATA_ENDPOINT set on the pinned fleet, so
/// cloud-relay on a device without a certificate knows it is on AWS and where to ask.
pub(crate) fn fleet_vars(args: crate::cli::FleetVarsArgs) -> Result<super::Outcome> {
    let url = args.provision_url.trim();
    if !provision_url_ok(url) {
        return Err(crate::UsageError(format!(
            "--provision-url {url:?}: expected the provisioner's https:// function URL (the stack's ProvisionUrl output)"
        ))
        .into());
    }
    let fleet = activator::balena_fleet_from_env()
        .context("jitr balena fleet-vars needs BALENA_API_KEY and BALENA_FLEET_ID (BALENA_API_URL for another API)")?;
    let set = crate::aws::runtime()?.block_on(async {
        let endpoint = match &args.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                use iot::IotAdmin;
                let registry = crate::aws::session(&args.aws).await?.registry();
                let deadline = iot::call_deadline(args.aws.deadline(iot::OPERATOR_CALL_TIME));
                registry.describe_endpoint("iot:Data-ATS", deadline).await?
            }
        };
        let deadline = args.aws.deadline(PUSH_DEADLINE);
        let mut set = Vec::new();
        for (name, value) in [
            (PROVISION_URL, url.to_owned()),
            (balena::delivery::AWS_DATA_ENDPOINT, endpoint),
        ] {
            let upserted = fleet
                .set_fleet_env_var(name, &value, deadline)
                .await
                .with_context(|| format!("fleet variable {name}"))?;
            set.push((name, value, upserted));
        }
        anyhow::Ok(set)
    })?;
    for (name, value, upserted) in &set {
        let how = match upserted {
            Upserted::Created => "created",
            Upserted::Updated => "updated",
        };
        if args.output.json {
            super::print_json(
                &serde_json::json!({"fleet_id": fleet.id().get(), "name": name, "value": value, "result": how}),
            )?;
        } else {
            println!("{name}={value} ({how} on balena fleet {})", fleet.id());
        }
    }
    Ok(super::Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::provision_url_ok;

    #[test]
    fn provision_urls_are_https_or_this_machine() {
        for ok in [
            "https://abc.lambda-url.eu-west-1.on.aws/",
            "http://127.0.0.1:9000/",
            "http://localhost/",
            "http://[::1]:80/x",
        ] {
            assert!(provision_url_ok(ok), "{ok}");
        }
        for bad in [
            "http://localhost.evil.example/",
            "http://127.0.0.1.evil.example/",
            "http://example.com/",
            "ftp://x",
            "https://",
            "https://a b/",
        ] {
            assert!(!provision_url_ok(bad), "{bad}");
        }
    }
}
