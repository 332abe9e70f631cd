//! `jitr device connect`: a device's first connect, retried with backoff until accepted.

use std::time::Duration;

use anyhow::{bail, Result};
use factory_ca::{inspect_device_certificate, IdFormat, InspectOptions};
use tokio::time::Instant;

use super::Outcome;
use crate::cli::DeviceConnectArgs;
use crate::mqtt::{self, Attempt};

/// The wait after the first refused attempt; it doubles after each one.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(16);
/// The longest one attempt (TCP, TLS, CONNECT, CONNACK) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn connect(args: DeviceConnectArgs) -> Result<Outcome> {
    let chain = mqtt::read_certificates(&args.cert)?;
    let client_id = match &args.client_id {
        Some(id) => id.clone(),
        None => {
            // The device id is the leaf's CN (the first certificate of the chain).
            let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
            let opts = InspectOptions {
                id_format: IdFormat::Any,
                ca_der: None,
                now: time::OffsetDateTime::now_utc(),
                max_validity_days: None,
            };
            match inspect_device_certificate(leaf, &opts).device_id {
                Some(id) => id.to_string(),
                None => bail!(
                    "{}: the certificate's CN is not a device id; give --client-id",
                    args.cert.display()
                ),
            }
        }
    };
    let server_ca = args
        .server_ca
        .as_deref()
        .map(mqtt::read_certificates)
        .transpose()?;
    let config = mqtt::tls_config(chain, &args.key, server_ca, &args.endpoint)?;

    let endpoint = &args.endpoint;
    let deadline = Duration::from_secs(args.deadline);
    println!(
        "connecting to {endpoint} as {client_id} (MQTT 3.1.1 over TLS, deadline {}s)",
        args.deadline
    );
    let connected = crate::aws::runtime()?.block_on(async {
        let start = Instant::now();
        let deadline = start + deadline;
        let mut backoff = FIRST_BACKOFF;
        let mut n = 0u32;
        loop {
            n += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = remaining.min(ATTEMPT_TIMEOUT).max(Duration::from_secs(1));
            let result = mqtt::attempt(endpoint, config.clone(), &client_id, timeout).await;
            let elapsed = start.elapsed().as_secs_f32();
            match result {
                Attempt::Connected => {
                    println!("attempt {n}: connected ({elapsed:.1}s)");
                    return Ok(true);
                }
                Attempt::Refused(why) => println!("attempt {n}: refused ({why})"),
                Attempt::Unreachable(why) => println!("attempt {n}: failed ({why})"),
                Attempt::Fatal(why) => {
                    println!("attempt {n}: failed ({why})");
                    bail!("not connected to {endpoint}: retrying cannot help");
                }
            }
            if Instant::now() + backoff >= deadline {
                eprintln!(
                    "jitr: not connected to {endpoint} within {}s ({n} attempt(s))",
                    args.deadline
                );
                return Ok(false);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })?;
    Ok(if connected {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
