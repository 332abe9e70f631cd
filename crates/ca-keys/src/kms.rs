//! A CA key in AWS KMS: asymmetric `ECC_NIST_P256` or `ECC_NIST_P384`, key usage
//! `SIGN_VERIFY`. The certificate's to-be-signed bytes go to `Sign` as `RAW` (KMS hashes them;
//! up to 4096 bytes) or, longer, hashed here and sent as `DIGEST`.
//!
//! Signing is synchronous for rcgen, called from many issuing threads at once: each call runs
//! the SDK future to completion on this key's own runtime, after taking a token from a shared
//! bucket that keeps the key under `kms_rate` requests per second. Throttling, KMS's internal
//! errors and dropped connections are retried with jittered backoff until `sign_timeout`.

use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};
use factory_ca::{KeyAlgorithm, RemoteKey};

use crate::{Error, KeyUri, Options};

/// The largest message KMS hashes itself (`MessageType::Raw`).
const RAW_LIMIT: usize = 4096;
/// The first backoff after a throttled or failed call; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// One call's own limit (a stalled connection), within the signature's timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A KMS signing key.
pub struct KmsKey {
    rt: OwnRuntime,
    client: aws_sdk_kms::Client,
    arn: String,
    uri: String,
    algorithm: KeyAlgorithm,
    public_raw: Vec<u8>,
    bucket: pace::Pace,
    sign_timeout: Duration,
}

impl std::fmt::Debug for KmsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKey")
            .field("arn", &self.arn)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

fn spec_of(algorithm: KeyAlgorithm) -> (KeySpec, SigningAlgorithmSpec) {
    match algorithm {
        KeyAlgorithm::P256 => (KeySpec::EccNistP256, SigningAlgorithmSpec::EcdsaSha256),
        KeyAlgorithm::P384 => (KeySpec::EccNistP384, SigningAlgorithmSpec::EcdsaSha384),
    }
}

/// One line for an SDK error: the service's code and message, or the transport's story.
fn describe<E, R>(e: &aws_sdk_kms::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(e).to_string().replace('\n', " "),
    }
}

/// Whether a failed call may succeed if tried again.
fn transient<E, R>(e: &aws_sdk_kms::error::SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    use aws_sdk_kms::error::SdkError;
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => matches!(
            e.code(),
            Some(
                "ThrottlingException"
                    | "KMSInternalException"
                    | "DependencyTimeoutException"
                    | "KeyUnavailableException"
                    | "ServiceUnavailableException"
                    | "InternalFailure"
            )
        ),
        _ => false,
    }
}

/// A jittered wait under `ceiling`: between half of it and all of it.
fn jittered(ceiling: Duration) -> Duration {
    use std::hash::BuildHasher;
    let draw = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    ceiling.mul_f64(0.5 + 0.5 * ((draw >> 11) as f64 / (1u64 << 53) as f64))
}

impl KmsKey {
    /// The SDK client, on a runtime of its own.
    fn client(region: Option<&str>) -> Result<(OwnRuntime, aws_sdk_kms::Client), Error> {
        let rt = OwnRuntime::new()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            // Retries are ours: throttling waits on the shared bucket, within the deadline.
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(CALL_TIMEOUT)
                    .build(),
            );
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
        let config = block(&rt, loader.load());
        if config.region().is_none() {
            return Err(Error::Missing(
                "AWS KMS needs a region: put region=R in the key URI, or set AWS_REGION".to_owned(),
            ));
        }
        Ok((rt, aws_sdk_kms::Client::new(&config)))
    }

    /// Opens an existing key: it must be an ECC P-256/P-384 key for SIGN_VERIFY, enabled.
    pub fn open(key_id: &str, region: Option<&str>, options: &Options) -> Result<KmsKey, Error> {
        let (rt, client) = KmsKey::client(region)?;
        let described = block(&rt, client.describe_key().key_id(key_id).send()).map_err(|e| {
            let text = describe(&e);
            match e.code() {
                Some("NotFoundException") => {
                    Error::NotFound(format!("AWS KMS key {key_id} not found: {text}"))
                }
                _ => Error::Backend(format!("AWS KMS DescribeKey {key_id}: {text}")),
            }
        })?;
        let Some(meta) = described.key_metadata() else {
            return Err(Error::Backend(format!(
                "AWS KMS DescribeKey {key_id}: no key metadata in the answer"
            )));
        };
        let arn = meta.arn().unwrap_or(meta.key_id()).to_owned();
        let spec = meta
            .key_spec()
            .map(|s| s.as_str())
            .unwrap_or("an unknown key spec");
        if meta.key_usage() != Some(&KeyUsageType::SignVerify) {
            let usage = meta.key_usage().map_or("no usage", |u| u.as_str());
            return Err(Error::Unsuitable(format!(
                "AWS KMS key {arn} is for {usage}, not SIGN_VERIFY: a CA key must sign"
            )));
        }
        if !matches!(
            meta.key_spec(),
            Some(KeySpec::EccNistP256 | KeySpec::EccNistP384)
        ) {
            return Err(Error::Unsuitable(format!(
                "AWS KMS key {arn} is {spec}: a jitr CA key is ECC_NIST_P256 or ECC_NIST_P384"
            )));
        }
        if !meta.enabled() {
            let state = meta.key_state().map_or("disabled", |s| s.as_str());
            return Err(Error::Unsuitable(format!(
                "AWS KMS key {arn} cannot sign: it is {state}"
            )));
        }
        let key = block(&rt, client.get_public_key().key_id(&arn).send())
            .map_err(|e| Error::Backend(format!("AWS KMS GetPublicKey {arn}: {}", describe(&e))))?;
        let public = key.public_key().map(Blob::as_ref).unwrap_or_default();
        let Some((algorithm, public_raw)) = crate::der::ec_spki(public) else {
            return Err(Error::Unsuitable(format!(
                "AWS KMS key {arn}: its public key is not an EC P-256 or P-384 key"
            )));
        };
        let region = client.config().region().map(|r| r.as_ref().to_owned());
        Ok(KmsKey {
            uri: KeyUri::AwsKms {
                key_id: arn.clone(),
                region,
            }
            .to_string(),
            rt,
            client,
            arn,
            algorithm,
            public_raw,
            bucket: pace::Pace::new(options.kms_rate),
            sign_timeout: options.sign_timeout,
        })
    }

    /// Creates a key for `algorithm` and names it with the alias `key_id` (`alias/NAME`); an
    /// alias already in use is refused (give `--existing` to use its key).
    pub fn create(
        key_id: &str,
        region: Option<&str>,
        algorithm: KeyAlgorithm,
        options: &Options,
    ) -> Result<KmsKey, Error> {
        let Some(name) = key_id.strip_prefix("alias/") else {
            return Err(Error::Missing(format!(
                "to create a KMS key, name an alias for it (key-id=alias/NAME); {key_id} names an existing key: use --existing"
            )));
        };
        if name.is_empty() || name.starts_with("aws/") {
            return Err(Error::Missing(format!(
                "{key_id} cannot be created (an alias needs a name outside alias/aws/)"
            )));
        }
        let (rt, client) = KmsKey::client(region)?;
        let taken = block(&rt, client.describe_key().key_id(key_id).send());
        match taken {
            Ok(_) => {
                return Err(Error::Exists(format!(
                "AWS KMS alias {key_id} already names a key: use --existing to make it the CA key"
            )))
            }
            Err(e) if e.code() == Some("NotFoundException") => {}
            Err(e) => {
                return Err(Error::Backend(format!(
                    "AWS KMS DescribeKey {key_id}: {}",
                    describe(&e)
                )))
            }
        }
        let (spec, _) = spec_of(algorithm);
        let created = block(
            &rt,
            client
                .create_key()
                .key_spec(spec)
                .key_usage(KeyUsageType::SignVerify)
                .description(format!("jitr CA key ({key_id})"))
                .send(),
        )
        .map_err(|e| Error::Backend(format!("AWS KMS CreateKey: {}", describe(&e))))?;
        let new_id = created
            .key_metadata()
            .map(|m| m.key_id().to_owned())
            .unwrap_or_default();
        let aliased = block(
            &rt,
            client
                .create_alias()
                .alias_name(key_id)
                .target_key_id(&new_id)
                .send(),
        );
        if let Err(e) = aliased {
            // The key was made for nothing: have it deleted after KMS's shortest wait.
            let _ = block(
                &rt,
                client
                    .schedule_key_deletion()
                    .key_id(&new_id)
                    .pending_window_in_days(7)
                    .send(),
            );
            return Err(Error::Backend(format!(
                "AWS KMS CreateAlias {key_id}: {} (the new key {new_id} is scheduled for deletion)",
                describe(&e)
            )));
        }
        drop(rt);
        KmsKey::open(&new_id, region, options)
    }

    async fn sign_once(&self, message: &[u8]) -> Result<Vec<u8>, (bool, String)> {
        let (_, algorithm) = spec_of(self.algorithm);
        let request = if message.len() <= RAW_LIMIT {
            self.client
                .sign()
                .message(Blob::new(message))
                .message_type(MessageType::Raw)
        } else {
            self.client
                .sign()
                .message(Blob::new(crate::digest(self.algorithm, message)))
                .message_type(MessageType::Digest)
        };
        match request
            .key_id(&self.arn)
            .signing_algorithm(algorithm)
            .send()
            .await
        {
            Ok(out) => out
                .signature()
                .map(|s| s.as_ref().to_vec())
                .ok_or((false, "no signature in the answer".to_owned())),
            Err(e) => Err((transient(&e), describe(&e))),
        }
    }

    async fn sign_async(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.sign_timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 0u32;
        loop {
            tries += 1;
            match self.sign_once(message).await {
                Ok(signature) => return Ok(signature),
                Err((retry, why)) => {
                    let wait = jittered(backoff);
                    if !retry || Instant::now() + wait >= deadline {
                        let after = if retry {
                            format!(
                                " (gave up after {tries} tries in {:.0?})",
                                self.sign_timeout
                            )
                        } else {
                            String::new()
                        };
                        return Err(format!("AWS KMS Sign with {}: {why}{after}", self.arn));
                    }
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

impl RemoteKey for KmsKey {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key_raw(&self) -> &[u8] {
        &self.public_raw
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        self.bucket.take_blocking();
        block(&self.rt, self.sign_async(message))
    }
}

/// A runtime of the key's own, shut down without blocking when dropped (which may happen
/// inside another runtime, where a blocking shutdown would panic).
pub(crate) struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    pub(crate) fn new() -> Result<OwnRuntime, Error> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("jitr-kms")
            .enable_all()
            .build()
            .map(|rt| OwnRuntime(Some(rt)))
            .map_err(|e| Error::Backend(format!("AWS KMS: cannot start a runtime: {e}")))
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `future` to completion on `rt`: on the caller's thread normally; from inside another
/// tokio runtime (where blocking on a future would panic) on a short-lived thread instead.
fn block<F>(rt: &OwnRuntime, future: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let Some(rt) = rt.0.as_ref() else {
        unreachable!("the runtime lives as long as its key")
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|scope| match scope.spawn(|| rt.block_on(future)).join() {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    } else {
        rt.block_on(future)
    }
}
