//! Command-line syntax (clap). Exit codes: 0 success, 1 failed check or operation, 2 bad usage.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use factory_ca::{IdFormat, KeyAlgorithm};

/// `jitr --version`: the release and the commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("JITR_COMMIT"),
    ")"
);

/// Own-CA tooling and Just-In-Time Registration for balenaCloud fleets on AWS IoT Core.
#[derive(Debug, Parser)]
#[command(name = "jitr", version = VERSION, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create and register the fleet CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue device certificates (a key generated per device) into devices/<id>/.
    Issue(IssueArgs),
    /// Sign a device's certificate signing request; the device keeps its key. Delivered to
    /// balena: AWS_CERT, AWS_DATA_ENDPOINT and CLOUD_CONSUMER_TOPIC; the device must provide
    /// AWS_PRIVATE_KEY from its own key.
    SignCsr(SignCsrArgs),
    /// Check a certificate against the device profile (and its CA's signature).
    Inspect(InspectArgs),
    /// Print the AWS IoT data endpoint (ATS) that devices connect to.
    Endpoint(EndpointArgs),
    /// Sweep certificates left PENDING_ACTIVATION through the activator's own decision.
    Reconcile(ReconcileArgs),
    /// Revoke a device's certificate(s): REVOKED, policy and principal detached.
    Revoke(RevokeArgs),
    /// Activate a held certificate (another one was the device's identity) and retire the old.
    Approve(ApproveArgs),
    /// Every device's state (drifted, duplicate, held, expiring, pending, orphan, not-connected,
    /// revoked, active), the most urgent first; --fix [--yes] for the safe fixes.
    Status(StatusArgs),
    /// A device's next certificate in place before its old one goes: issued, delivered,
    /// ACTIVE, the old retired after --grace.
    Rotate(RotateArgs),
    /// Register certificates issued ahead (the manifest's) in AWS IoT: PENDING_ACTIVATION for
    /// the activator to decide, or ACTIVE with Thing and policy, at AWS's quota rates; a rerun
    /// skips what is done.
    Register(RegisterArgs),
    /// Act as a device: connect to AWS IoT (or any MQTT broker) with its certificate.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Settings of the balena fleet itself.
    #[command(subcommand)]
    Balena(BalenaCommand),
    /// Print the registrationConfig for AWS IoT's own just-in-time provisioning (JITP), giving
    /// what the activator gives (Thing named by the CN, the policy, the attributes) without a
    /// Lambda and without a fleet check.
    JitpTemplate(JitpTemplateArgs),
    /// AWS IoT fleet provisioning by claim, with our CA (the provisioner signs the CSRs) and
    /// our fleet check (the provisioner is the pre-provisioning hook).
    #[command(subcommand)]
    FleetProvisioning(FleetProvisioningCommand),
    /// The issuance ledger (DynamoDB): what the factory issued, as the activator checks it.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Print the shell completion script for SHELL, e.g. `jitr completions bash >
    /// /etc/bash_completion.d/jitr` (zsh: a file `_jitr` on $fpath).
    Completions(CompletionsArgs),
    /// Print jitr's manual page (roff: `jitr man | man -l -`), or with --out DIR write one page
    /// per command (jitr.1, jitr-issue.1, jitr-ca-init.1, ...).
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Write every command's page into this folder (made if need be) instead.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum LedgerCommand {
    /// Write a manifest's certificates into the ledger, keeping what it says of those it
    /// lists already (for certificates whose `--ledger` write failed, or issued without one).
    Import(LedgerImportArgs),
}

#[derive(Debug, Args)]
pub(crate) struct LedgerImportArgs {
    /// The issuance manifest, e.g. devices/manifest.jsonl.
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: PathBuf,
    /// The ledger's DynamoDB table (the stack's LedgerTableName output).
    #[arg(long, value_name = "TABLE")]
    pub(crate) ledger: String,
    /// The batch recorded on new items [default: import-<time>].
    #[arg(long, value_name = "NAME")]
    pub(crate) batch: Option<String>,
    /// UpdateItem calls at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub(crate) concurrency: usize,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
}

/// `--ledger TABLE` on the commands that issue.
#[derive(Debug, Args)]
pub(crate) struct LedgerArgs {
    /// Record every certificate issued in this DynamoDB table, the issuance ledger (the stack's
    /// LedgerTableName output), which the activator checks with JITR_LEDGER=require. AWS
    /// settings from the standard chain (AWS_REGION, AWS_ENDPOINT_URL, AWS_PROFILE).
    #[arg(long, value_name = "TABLE")]
    pub(crate) ledger: Option<String>,
    /// The batch recorded with each certificate [default: issue-<time of issuance>].
    #[arg(long, value_name = "NAME", requires = "ledger")]
    pub(crate) batch: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct JitpTemplateArgs {
    /// The IAM role AWS IoT assumes to provision (e.g. with the AWSIoTThingsRegistration policy).
    #[arg(long, value_name = "ARN")]
    pub(crate) role_arn: String,
    #[command(flatten)]
    pub(crate) thing: ThingArgs,
}

/// What each Thing and certificate get, as the activator gives them (`jitp-template`,
/// `register --status ACTIVE`).
#[derive(Debug, Args)]
pub(crate) struct ThingArgs {
    /// The device IoT policy attached to each certificate.
    #[arg(
        long,
        value_name = "NAME",
        env = "JITR_POLICY_NAME",
        default_value = "jitr-device"
    )]
    pub(crate) policy: String,
    /// The balena fleet, for the Thing attribute `fleet=balena-fleet-<id>` the activator sets.
    #[arg(long, value_name = "ID", env = "BALENA_FLEET_ID")]
    pub(crate) fleet_id: Option<u64>,
    /// Thing type given to each Thing (must exist), as the activator's JITR_THING_TYPE.
    #[arg(long, value_name = "NAME", env = "JITR_THING_TYPE")]
    pub(crate) thing_type: Option<String>,
    /// Static thing group each Thing joins (must exist), as the activator's JITR_THING_GROUP.
    #[arg(long, value_name = "NAME", env = "JITR_THING_GROUP")]
    pub(crate) thing_group: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum FleetProvisioningCommand {
    /// Print the provisioning template (Thing named by the device UUID, certificate ACTIVE,
    /// the device policy), its hook, and the claim certificates' IoT policy, as one JSON object.
    Template(FpTemplateArgs),
    /// A claim certificate for one device (valid for minutes, the trusted-user way), handed
    /// with the template name and the endpoint to that device: a folder or balena variables.
    Claim(FpClaimArgs),
}

/// The template parameter holding the device UUID, as the provisioner's default.
pub(crate) const DEFAULT_UUID_PARAMETER: &str = "DeviceUuid";

#[derive(Debug, Args)]
pub(crate) struct FpTemplateArgs {
    /// The provisioning template's name (the stack's ProvisioningTemplateName).
    #[arg(long, value_name = "NAME", default_value = "jitr")]
    pub(crate) template_name: String,
    /// The device IoT policy the template attaches (the stack's PolicyName).
    #[arg(long, value_name = "NAME", default_value = "jitr-device")]
    pub(crate) policy_name: String,
    /// The template parameter holding the device UUID (the provisioner's JITR_FP_UUID_PARAMETER).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_UUID_PARAMETER)]
    pub(crate) uuid_parameter: String,
    /// The provisioner's ARN, as the template's pre-provisioning hook.
    #[arg(long, value_name = "ARN")]
    pub(crate) hook_arn: Option<String>,
    /// The region in the claim policy's ARNs [default: *].
    #[arg(long, value_name = "REGION", default_value = "*")]
    pub(crate) region: String,
    /// The account in the claim policy's ARNs [default: *].
    #[arg(long, value_name = "ID", default_value = "*")]
    pub(crate) account_id: String,
    /// The partition in the claim policy's ARNs.
    #[arg(long, value_name = "PARTITION", default_value = "aws")]
    pub(crate) partition: String,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("to").required(true).args(["out", "push_balena"])))]
pub(crate) struct FpClaimArgs {
    /// The device (its UUID: the template's device UUID parameter).
    #[arg(long, value_name = "UUID")]
    pub(crate) id: String,
    /// The provisioning template the claim is for.
    #[arg(long, value_name = "NAME", default_value = "jitr")]
    pub(crate) template_name: String,
    /// Attach this IoT policy to the claim certificate (the stack's ClaimPolicyName output).
    #[arg(long, value_name = "NAME")]
    pub(crate) claim_policy: Option<String>,
    /// Write <DIR>/<uuid>/{claim.crt, claim.key (0600), provisioning.json}.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Set AWS_CLAIM_CERT, AWS_CLAIM_PRIVATE_KEY, AWS_PROVISIONING_TEMPLATE and
    /// AWS_DATA_ENDPOINT on the device through the balena API (BALENA_API_KEY, BALENA_FLEET_ID);
    /// the device must be an active member of the fleet.
    #[arg(long)]
    pub(crate) push_balena: bool,
    /// Set them as service variables of this service only.
    #[arg(long, value_name = "NAME", requires = "push_balena")]
    pub(crate) balena_service: Option<String>,
    /// The AWS IoT data endpoint [default: asked from AWS IoT, as `jitr endpoint` does].
    #[arg(long, value_name = "HOST", value_parser = parse_host)]
    pub(crate) endpoint: Option<String>,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BalenaCommand {
    /// Set the fleet variables cloud-relay needs to ask the provisioner for its certificate:
    /// PROVISION_URL (the stack's ProvisionUrl output) and AWS_DATA_ENDPOINT.
    FleetVars(FleetVarsArgs),
}

#[derive(Debug, Args)]
pub(crate) struct FleetVarsArgs {
    /// The provisioner's function URL (https://...).
    #[arg(long, value_name = "URL")]
    pub(crate) provision_url: String,
    /// The AWS IoT data endpoint devices connect to (default: asked from AWS IoT, as `jitr
    /// endpoint` does).
    #[arg(long, value_name = "HOST")]
    pub(crate) endpoint: Option<String>,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeviceCommand {
    /// MQTT 3.1.1 CONNECT over TLS with the device's chain, retried until accepted or the deadline.
    Connect(DeviceConnectArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create the CA: ca.crt + ca.key, and with --with-issuing-ca an offline root above it.
    Init(CaInitArgs),
    /// Write the verification certificate AWS IoT asks for when registering the CA.
    VerificationCert(VerificationCertArgs),
    /// Register the CA in AWS IoT: active, with auto-registration (JITR) on; saves its id.
    Register(CaRegisterArgs),
}

/// Where the CA lives and how its key is unlocked.
#[derive(Debug, Args)]
pub(crate) struct CaDirArgs {
    /// CA folder.
    #[arg(long, default_value = "ca", value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// File holding the CA key passphrase (else JITR_CA_PASSPHRASE, else a prompt on a terminal).
    #[arg(long, value_name = "FILE")]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// The PKCS#11 module (.so) of the token holding the CA key, for pkcs11: key URIs.
    #[arg(long, value_name = "FILE", env = "JITR_PKCS11_MODULE")]
    pub(crate) pkcs11_module: Option<PathBuf>,
    /// File holding the token's user PIN (else JITR_PKCS11_PIN, else a prompt on a terminal).
    #[arg(long, value_name = "FILE")]
    pub(crate) pin_file: Option<PathBuf>,
}

/// How results are printed.
#[derive(Debug, Args)]
pub(crate) struct OutputArgs {
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Which AWS region and endpoint to use, over the standard chain (AWS_PROFILE, AWS_REGION,
/// AWS_ENDPOINT_URL).
#[derive(Debug, Args)]
pub(crate) struct AwsArgs {
    /// AWS region [default: AWS_REGION, else the AWS profile's region].
    #[arg(long, value_name = "REGION")]
    pub(crate) region: Option<String>,
    /// AWS endpoint URL, e.g. a local emulator [default: AWS_ENDPOINT_URL, else AWS's own].
    #[arg(long, value_name = "URL", value_parser = parse_endpoint_url)]
    pub(crate) endpoint_url: Option<String>,
    /// Give up after this long in all, e.g. 30s, 10m [default: the command's own; one call
    /// never waits more than 10s].
    #[arg(long, value_name = "DURATION", value_parser = activator::parse_duration)]
    pub(crate) timeout: Option<std::time::Duration>,
}

impl AwsArgs {
    /// The standard chain alone (AWS_REGION, AWS_ENDPOINT_URL, AWS_PROFILE), for commands
    /// without AWS flags of their own.
    pub(crate) fn from_environment() -> AwsArgs {
        AwsArgs {
            region: None,
            endpoint_url: None,
            timeout: None,
        }
    }

    /// The command's deadline: `--timeout`, else `default`, from now.
    pub(crate) fn deadline(&self, default: std::time::Duration) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.timeout.unwrap_or(default)
    }
}

#[derive(Debug, Args)]
pub(crate) struct CaInitArgs {
    #[command(flatten)]
    pub(crate) ca: CaDirArgs,
    /// Key type of the top CA (the only CA, or the offline root) [default: from profile, p384].
    #[arg(long, value_name = "p256|p384")]
    pub(crate) key: Option<KeyAlgorithm>,
    /// Put an issuing CA (ca.crt, P-256, 5 years) below an offline root (root.crt).
    #[arg(long)]
    pub(crate) with_issuing_ca: bool,
    /// File holding the offline root's own passphrase (with --with-issuing-ca; else
    /// JITR_ROOT_PASSPHRASE, else a prompt on a terminal). Never the issuing CA's.
    #[arg(long, value_name = "FILE", requires = "with_issuing_ca")]
    pub(crate) root_passphrase_file: Option<PathBuf>,
    /// Subject of the top CA, e.g. "O=Acme,CN=Acme fleet CA".
    #[arg(long)]
    pub(crate) subject: Option<String>,
    /// Validity of the top CA in days [default: from profile, 20 years].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) days: Option<u32>,
    /// Subject of the issuing CA (with --with-issuing-ca) [default: --subject's names with
    /// "issuing" in its CN, e.g. O=Acme,CN=Acme fleet issuing CA].
    #[arg(long, requires = "with_issuing_ca")]
    pub(crate) issuing_subject: Option<String>,
    /// Validity of the issuing CA in days (with --with-issuing-ca) [default: 5 years].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), requires = "with_issuing_ca")]
    pub(crate) issuing_days: Option<u32>,
    /// Store the CA keys unencrypted (never do this for a production CA).
    #[arg(long)]
    pub(crate) insecure_plaintext_key: bool,
    /// Keep the key of the CA that signs devices in AWS KMS or on a PKCS#11 token, never on
    /// disk: awskms:key-id=alias/NAME[;region=R] or pkcs11:token=LABEL;object=LABEL. The key is
    /// created there (with --existing, the one already there is used); ca/ca.key-uri records it.
    #[arg(long, value_name = "URI")]
    pub(crate) key_uri: Option<String>,
    /// Use the key --key-uri names instead of creating one.
    #[arg(long, requires = "key_uri")]
    pub(crate) existing: bool,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct VerificationCertArgs {
    #[command(flatten)]
    pub(crate) ca: CaDirArgs,
    /// The code from `aws iot get-registration-code`.
    #[arg(long, value_name = "CODE")]
    pub(crate) registration_code: String,
    /// Write the certificate here instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CaRegisterArgs {
    #[command(flatten)]
    pub(crate) ca: CaDirArgs,
    /// Register in SNI_ONLY mode: no verification certificate, so the CA key is not needed.
    #[arg(long)]
    pub(crate) sni_only: bool,
    /// Also turn on AWS IoT's own just-in-time provisioning for the CA with this
    /// registrationConfig (`jitr jitp-template` writes one). AWS IoT then provisions every
    /// certificate the CA signed, with no fleet check; set on a CA registered before too.
    #[arg(long, value_name = "FILE")]
    pub(crate) jitp_template: Option<PathBuf>,
    /// AWS region; repeat it to register the CA in each region in turn (every id is recorded
    /// in ca/aws-ca-ids.json) [default: AWS_REGION, else the AWS profile's region].
    #[arg(long, value_name = "REGION")]
    pub(crate) region: Vec<String>,
    /// AWS endpoint URL, e.g. a local emulator [default: AWS_ENDPOINT_URL, else AWS's own].
    #[arg(long, value_name = "URL", value_parser = parse_endpoint_url)]
    pub(crate) endpoint_url: Option<String>,
    /// Give up after this long in all, e.g. 30s, 10m [default: 60s per region; one call never
    /// waits more than 10s].
    #[arg(long, value_name = "DURATION", value_parser = activator::parse_duration)]
    pub(crate) timeout: Option<std::time::Duration>,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

impl CaRegisterArgs {
    /// The AWS settings for one region (`None`: the standard chain's).
    pub(crate) fn aws(&self, region: Option<&str>) -> AwsArgs {
        AwsArgs {
            region: region.map(str::to_owned),
            endpoint_url: self.endpoint_url.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct EndpointArgs {
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "ids"])))]
pub(crate) struct IssueArgs {
    #[command(flatten)]
    pub(crate) ca: CaDirArgs,
    /// A device id (repeatable).
    #[arg(long, value_name = "ID")]
    pub(crate) id: Vec<String>,
    /// File of device ids, one per line (`-` for standard input; blank lines and #comments skipped).
    #[arg(long, value_name = "FILE")]
    pub(crate) ids: Option<PathBuf>,
    /// Output folder (with --bundle: the manifest's folder).
    #[arg(long, default_value = "devices", value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Write every device into one bundle instead of folders: a JSON line per device (id,
    /// certificate_id, serial, not_after, chain_pem, key_pem), the form a flashing station
    /// consumes; FILE is created with mode 0600 (never over an existing one), `-` is standard
    /// output. The manifest still goes under --out.
    /// With --json, one summary object is printed on standard output instead of the lines.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["balena_env", "push_balena"])]
    pub(crate) bundle: Option<PathBuf>,
    /// Validity in days [default: from profile, 10 years].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) days: Option<u32>,
    /// Device key type [default: from profile, p256].
    #[arg(long, value_name = "p256|p384")]
    pub(crate) key: Option<KeyAlgorithm>,
    /// Accepted ids: balena-uuid or any Thing name [default: from profile, balena-uuid].
    #[arg(long, value_name = "FORMAT")]
    pub(crate) id_format: Option<IdFormat>,
    /// Parallel workers [default: one per core; 16 with a CA key in KMS or on a token].
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) jobs: usize,
    /// Issue again ids that the manifest already holds.
    #[arg(long)]
    pub(crate) force: bool,
    /// Continue a run that was stopped (Ctrl-C) or failed, with the same ids: ids the
    /// manifest holds are skipped, so each is issued exactly once; a cut-off last manifest
    /// line is removed and its device issued again. With --bundle, name a new bundle file.
    #[arg(long, visible_alias = "skip-issued", conflicts_with = "force")]
    pub(crate) resume: bool,
    /// Print where the time went on standard error: reading the ids, unlocking the CA key,
    /// and per device keygen, sign, encode, write and manifest; `--timings=json` as one JSON
    /// object.
    #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true, default_missing_value = "text")]
    pub(crate) timings: Option<TimingsFormat>,
    /// With a CA key in AWS KMS: Sign requests per second at most (AWS's ECC signing quota,
    /// shared by the account and region, is 300/s by default).
    #[arg(long, value_name = "N", default_value_t = ca_keys::DEFAULT_KMS_RATE, value_parser = parse_rate)]
    pub(crate) kms_rate: f64,
    /// Each device's AWS region, for a fleet that connects in several: a file of
    /// `device_id,region` lines (or the two separated by spaces; a `device_id,region` header
    /// and #comments skipped). Every device issued must be listed; each is delivered its
    /// region's data endpoint (asked from AWS IoT once per region) as AWS_DATA_ENDPOINT.
    #[arg(long, value_name = "FILE", conflicts_with = "endpoint")]
    pub(crate) region_of: Option<PathBuf>,
    /// AWS endpoint URL for those questions and the --ledger writes, e.g. a local emulator
    /// [default: AWS_ENDPOINT_URL, else AWS's own].
    #[arg(long, value_name = "URL", value_parser = parse_endpoint_url)]
    pub(crate) endpoint_url: Option<String>,
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    #[command(flatten)]
    pub(crate) balena: BalenaDeliveryArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// How `issue --timings` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TimingsFormat {
    /// Lines for a person.
    Text,
    /// One JSON object.
    Json,
}

/// Delivery of the issued credentials to balena devices as the environment variables that
/// balena's cloud-relay block reads (AWS_CERT, AWS_PRIVATE_KEY, AWS_DATA_ENDPOINT,
/// CLOUD_CONSUMER_TOPIC).
#[derive(Debug, Args)]
pub(crate) struct BalenaDeliveryArgs {
    /// Write each device's balena variables here, one JSON object per line (mode 0600: it may
    /// hold private keys): AWS_CERT, AWS_PRIVATE_KEY (only when jitr made the key),
    /// AWS_DATA_ENDPOINT (with --endpoint) and CLOUD_CONSUMER_TOPIC.
    #[arg(long, value_name = "FILE")]
    pub(crate) balena_env: Option<PathBuf>,
    /// Set those variables on each device of the fleet through the balena API (BALENA_API_KEY,
    /// BALENA_FLEET_ID; BALENA_API_URL [default: https://api.balena-cloud.com]).
    #[arg(long)]
    pub(crate) push_balena: bool,
    /// Set them as service variables of this service only (e.g. the cloud-relay service);
    /// without it they are device variables, which every service on the device sees.
    #[arg(long, value_name = "NAME", requires = "push_balena")]
    pub(crate) balena_service: Option<String>,
    /// First topic level(s) of the device topics, as the stack's TopicPrefix: cloud-relay
    /// publishes to <prefix>/<uuid>/sensors, which the device policy allows.
    #[arg(long, value_name = "PREFIX", env = "JITR_TOPIC_PREFIX", default_value = balena::delivery::DEFAULT_TOPIC_PREFIX, value_parser = parse_topic_prefix)]
    pub(crate) topic_prefix: String,
    /// The AWS IoT data endpoint for AWS_DATA_ENDPOINT (`jitr endpoint` prints it).
    #[arg(long, value_name = "HOST", value_parser = parse_host)]
    pub(crate) endpoint: Option<String>,
    /// Give up pushing to balena after this long in all, e.g. 30s, 10m [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = activator::parse_duration)]
    pub(crate) timeout: Option<std::time::Duration>,
}

/// `clap` value parser for `--endpoint-url`: an absolute http(s) URL.
pub(crate) fn parse_endpoint_url(value: &str) -> Result<String, String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(value.to_owned()),
        _ => Err("expected an http:// or https:// URL with a host".to_owned()),
    }
}

/// `clap` value parser for `--kms-rate`: a positive number.
fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("a positive number of requests per second".to_owned()),
    }
}

/// `clap` value parser for `--topic-prefix`.
fn parse_topic_prefix(value: &str) -> Result<String, String> {
    balena::delivery::validate_topic_prefix(value)
        .map(|()| value.to_owned())
        .map_err(str::to_owned)
}

/// `clap` value parser for a bare host name (no scheme, port or path).
fn parse_host(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err("expected a host name such as abc123-ats.iot.eu-west-1.amazonaws.com".to_owned())
    }
}

#[derive(Debug, Args)]
pub(crate) struct SignCsrArgs {
    #[command(flatten)]
    pub(crate) ca: CaDirArgs,
    /// The CSR (PEM or DER); its CN is the device id.
    #[arg(long, value_name = "FILE")]
    pub(crate) csr: PathBuf,
    /// Refuse the CSR unless its CN is this device id.
    #[arg(long, value_name = "ID")]
    pub(crate) expect_id: Option<String>,
    /// Write chain.pem (device certificate + CA) here instead of devices/<id>/ (the manifest
    /// records the signing either way).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Folder holding devices/<id>/ and the manifest.
    #[arg(long, default_value = "devices", value_name = "DIR")]
    pub(crate) devices: PathBuf,
    /// Validity in days [default: from profile].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) days: Option<u32>,
    /// Sign again for an id the manifest already holds.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    #[command(flatten)]
    pub(crate) balena: BalenaDeliveryArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Certificate file, PEM or DER (the first certificate of a chain is inspected).
    pub(crate) file: PathBuf,
    /// CA certificate that must have signed it.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Accepted ids: balena-uuid or any.
    #[arg(long, value_name = "FORMAT", default_value = "balena-uuid")]
    pub(crate) id_format: IdFormat,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// The `--help` footer of the commands that decide with the activator's configuration.
const ACTIVATOR_ENV_HELP: &str = "\
Configuration: the activator's, from the same variables as the Lambda (a missing one exits 2,
all named at once):
  JITR_TRUSTED_CA_IDS   comma-separated caCertificateIds (required)
  JITR_POLICY_NAME      the IoT policy attached to every activated certificate (required)
  JITR_FLEET_BACKEND    balena (default) or allowlist
  BALENA_FLEET_ID, BALENA_API_KEY (or BALENA_API_KEY_SECRET_ID)   with balena (required)
  JITR_ALLOWLIST        a file of device ids, with allowlist (required)
  JITR_LEDGER_TABLE     the issuance ledger: named alone it is a gate (JITR_LEDGER=record to only mark)
  JITR_THING_TYPE, JITR_THING_GROUP, JITR_REJECT_ACTION, JITR_ID_FORMAT: as the Lambda";

/// `jitr reconcile` reads the activator's configuration from the same environment variables
/// as the Lambda (JITR_TRUSTED_CA_IDS, JITR_POLICY_NAME, JITR_FLEET_BACKEND, BALENA_*...).
#[derive(Debug, Args)]
#[command(after_help = ACTIVATOR_ENV_HELP)]
pub(crate) struct ReconcileArgs {
    /// CA to sweep (repeatable) [default: every id in JITR_TRUSTED_CA_IDS].
    #[arg(long, value_name = "ID")]
    pub(crate) ca_id: Vec<String>,
    /// Only certificates registered at least this long ago, e.g. 30s, 10m, 2h, 1d.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = activator::parse_duration)]
    pub(crate) older_than: std::time::Duration,
    /// Look at the whole history, oldest first [default: newest first, back to
    /// JITR_SWEEP_WINDOW (48h), as the scheduled sweep does].
    #[arg(long)]
    pub(crate) all: bool,
    /// List what would be decided, change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Decisions run at once (AWS IoT API quotas are low).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub(crate) concurrency: usize,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "expiring_within"])))]
#[command(after_help = ACTIVATOR_ENV_HELP)]
pub(crate) struct RotateArgs {
    #[command(flatten)]
    pub(crate) ca: CaDirArgs,
    /// A device to rotate (repeatable).
    #[arg(long, value_name = "ID")]
    pub(crate) id: Vec<String>,
    /// Every device whose ACTIVE certificate ends within this, e.g. 30d (read like jitr
    /// status, with the manifest under --out).
    #[arg(long, value_name = "DURATION", value_parser = activator::parse_duration)]
    pub(crate) expiring_within: Option<std::time::Duration>,
    /// How long the old certificate stays ACTIVE beside the new one, e.g. 24h [default: 24h
    /// with --push-balena]; 0 retires it as soon as the device has connected with the new one
    /// (JITR_PRESENCE_TABLE). Without delivery there is no grace: the old one stays ACTIVE
    /// until the device is seen using the new one (then `jitr status --fix` retires it).
    #[arg(long, value_name = "DURATION", value_parser = activator::parse_duration)]
    pub(crate) grace: Option<std::time::Duration>,
    /// With --grace 0: how long to wait for the device to connect with its new certificate
    /// before leaving the old one ACTIVE.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = activator::parse_duration)]
    pub(crate) wait_connected: std::time::Duration,
    /// Output folder: devices/<id>/ are replaced, the manifest records what each supersedes.
    #[arg(long, default_value = "devices", value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Validity in days [default: from profile].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) days: Option<u32>,
    /// Device key type [default: from profile, p256].
    #[arg(long, value_name = "p256|p384")]
    pub(crate) key: Option<KeyAlgorithm>,
    #[command(flatten)]
    pub(crate) ledger: LedgerArgs,
    // --timeout (with the delivery's flags) bounds the whole rotation, AWS and balena alike.
    #[command(flatten)]
    pub(crate) balena: BalenaDeliveryArgs,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    /// AWS region [default: AWS_REGION, else the AWS profile's region].
    #[arg(long, value_name = "REGION")]
    pub(crate) region: Option<String>,
    /// AWS endpoint URL, e.g. a local emulator [default: AWS_ENDPOINT_URL, else AWS's own].
    #[arg(long, value_name = "URL", value_parser = parse_endpoint_url)]
    pub(crate) endpoint_url: Option<String>,
}

impl RotateArgs {
    /// The AWS settings, bounded by the one --timeout.
    pub(crate) fn aws(&self) -> AwsArgs {
        AwsArgs {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            timeout: self.balena.timeout,
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = ACTIVATOR_ENV_HELP)]
pub(crate) struct StatusArgs {
    /// CA whose certificates to read (repeatable) [default: every id in JITR_TRUSTED_CA_IDS].
    #[arg(long, value_name = "ID")]
    pub(crate) ca_id: Vec<String>,
    /// The issuance manifest (devices/manifest.jsonl): each certificate's device and validity
    /// without a DescribeCertificate each, and the devices issued but never connected.
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: Option<PathBuf>,
    /// An ACTIVE certificate ending within this is `expiring`, e.g. 30d.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = activator::parse_duration)]
    pub(crate) expiring_within: std::time::Duration,
    /// Read every Thing's attachments, not only where they decide a state (one
    /// ListThingPrincipals per device).
    #[arg(long)]
    pub(crate) deep: bool,
    /// Requests per second for each AWS IoT read (AWS's default quota for most is 10).
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    pub(crate) rate: f64,
    /// Show the safe fixes, on jitr's own Things and certificates only: revoke the
    /// certificates of devices not in the fleet, all but the newest ACTIVE certificate of a
    /// duplicate once the newest has connected (JITR_PRESENCE_TABLE), orphan certificates;
    /// delete orphan Things (with --delete-things). Inactive devices are never touched.
    #[arg(long)]
    pub(crate) fix: bool,
    /// Apply the fixes --fix shows (revokes and re-attachments).
    #[arg(long, requires = "fix")]
    pub(crate) yes: bool,
    /// With --fix --yes: also delete the Things the fixes name (asked on a terminal otherwise).
    #[arg(long, requires = "yes")]
    pub(crate) delete_things: bool,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["id", "certificate_id"])))]
pub(crate) struct RevokeArgs {
    /// The device (Thing name): every certificate attached to it.
    #[arg(long, value_name = "DEVICE")]
    pub(crate) id: Option<String>,
    /// One certificate.
    #[arg(long, value_name = "ID")]
    pub(crate) certificate_id: Option<String>,
    /// Delete the Thing too. Without it, `--id` leaves the revocation mark on the device's
    /// Thing (made if need be): the device stays cut off, through a re-flash or the
    /// provisioner, until `jitr approve --device`. Deleting the Thing deletes the mark.
    #[arg(long)]
    pub(crate) delete_thing: bool,
    /// With --id: also revoke the certificates this manifest lists for the device (those
    /// that never got a Thing, registered or still pending), e.g. devices/manifest.jsonl.
    #[arg(long, value_name = "FILE", requires = "id")]
    pub(crate) manifest: Option<std::path::PathBuf>,
    /// Also remove the variables jitr set on the device in balena (device and service level;
    /// BALENA_API_KEY, BALENA_FLEET_ID), idempotently.
    #[arg(long)]
    pub(crate) balena_cleanup: bool,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
}

/// `jitr approve` reads the activator's configuration from the same environment variables as
/// the Lambda (JITR_TRUSTED_CA_IDS, JITR_POLICY_NAME, JITR_FLEET_BACKEND, BALENA_*...) and runs
/// the same checks before it activates anything.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["certificate_id", "device"])))]
#[command(after_help = ACTIVATOR_ENV_HELP)]
pub(crate) struct ApproveArgs {
    /// The held certificate.
    #[arg(long, value_name = "ID")]
    pub(crate) certificate_id: Option<String>,
    /// Lift the revocation mark `jitr revoke --id` left on this device's Thing (first, when
    /// given with --certificate-id): its certificates are decided as anyone's again.
    #[arg(long, value_name = "DEVICE")]
    pub(crate) device: Option<String>,
    /// What happens to the certificate(s) it replaces, once it is active.
    #[arg(long, value_name = "revoke|deactivate|keep", default_value = "revoke")]
    pub(crate) retire: activator::ownership::Retire,
    /// With a ledger (JITR_LEDGER_TABLE): add the certificate to it first, so that a
    /// certificate the factory never recorded can be approved under JITR_LEDGER=require.
    #[arg(long)]
    pub(crate) add_to_ledger: bool,
    #[command(flatten)]
    pub(crate) output: OutputArgs,
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
}

/// `jitr register`: the certificates are read from devices/<id>/device.crt beside the manifest.
#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// The issuance manifest (devices/manifest.jsonl); each device's certificate is read from
    /// <id>/device.crt in the manifest's folder (a --bundle issuance has no such folders).
    #[arg(long, value_name = "FILE")]
    pub(crate) manifest: PathBuf,
    /// PENDING_ACTIVATION: registered only, the activator decides on the first connect (fleet
    /// check, Thing, policy). ACTIVE: the Thing made, policy and Thing attached, ACTIVE last;
    /// the activator is not involved.
    #[arg(long, value_name = "ACTIVE|PENDING_ACTIVATION", default_value = "PENDING_ACTIVATION", value_parser = parse_register_status)]
    pub(crate) status: operations::register::Wanted,
    /// Register only active members of the balena fleet (BALENA_API_KEY, BALENA_FLEET_ID);
    /// the others are reported and skipped. Without it no fleet check is made.
    #[arg(long)]
    pub(crate) fleet_check: bool,
    /// CA folder: ca.crt, the CA that signed the certificates, registered in AWS IoT.
    #[arg(long, default_value = "ca", value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// With ACTIVE: the policy, fleet attribute, type and group of each Thing.
    #[command(flatten)]
    pub(crate) thing: ThingArgs,
    /// Devices in flight at once (each operation is paced at AWS IoT's default rate anyway).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub(crate) concurrency: usize,
    // --timeout defaults to twice the time AWS's quotas need for the manifest, plus 10 minutes.
    #[command(flatten)]
    pub(crate) aws: AwsArgs,
    // --json: one line per device, then one summary line.
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

/// `clap` value parser for `register --status`.
fn parse_register_status(value: &str) -> Result<operations::register::Wanted, String> {
    match value {
        "ACTIVE" => Ok(operations::register::Wanted::Active),
        "PENDING_ACTIVATION" => Ok(operations::register::Wanted::PendingActivation),
        _ => Err("ACTIVE or PENDING_ACTIVATION".to_owned()),
    }
}

#[derive(Debug, Args)]
pub(crate) struct DeviceConnectArgs {
    /// The device's certificate chain, PEM: its certificate first, then its CA (chain.pem).
    #[arg(long, value_name = "FILE")]
    pub(crate) cert: PathBuf,
    /// The device's private key, PEM (device.key).
    #[arg(long, value_name = "FILE")]
    pub(crate) key: PathBuf,
    /// The broker, e.g. the AWS IoT data endpoint (`jitr endpoint`); port 8883 unless given.
    #[arg(long, value_name = "HOST[:PORT]", value_parser = crate::mqtt::Endpoint::parse)]
    pub(crate) endpoint: crate::mqtt::Endpoint,
    /// MQTT client id [default: the certificate's CN, the device id].
    #[arg(long, value_name = "ID")]
    pub(crate) client_id: Option<String>,
    /// CA certificate(s), PEM, the broker's certificate must chain to [default: the platform's
    /// trusted roots].
    #[arg(long, value_name = "FILE")]
    pub(crate) server_ca: Option<PathBuf>,
    /// Give up when not connected after this long (`90s`, `5m`; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = activator::parse_duration)]
    pub(crate) deadline: std::time::Duration,
    /// Once connected, publish MESSAGE to TOPIC (QoS 1) and wait for its acknowledgement; a
    /// broker that disconnects instead (AWS IoT does, for a topic the policy does not allow)
    /// fails the command.
    #[arg(long, num_args = 2, value_names = ["TOPIC", "MESSAGE"])]
    pub(crate) publish: Option<Vec<String>>,
    // --json: one report at the end instead of a line per attempt (outcome,
    // connected_after_ms from the first attempt to the accepting CONNACK, backoff_ms, attempts).
    #[command(flatten)]
    pub(crate) output: OutputArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn endpoint_urls_must_be_http_or_https_with_a_host() {
        assert!(parse_endpoint_url("http://127.0.0.1:5000").is_ok());
        assert!(parse_endpoint_url("https://iot.eu-west-1.amazonaws.com").is_ok());
        assert!(parse_endpoint_url("127.0.0.1:5000").is_err());
        assert!(parse_endpoint_url("http://").is_err());
        assert!(parse_endpoint_url("ftp://host").is_err());
    }

    #[test]
    fn data_endpoints_are_bare_host_names() {
        assert!(parse_host("abc123-ats.iot.eu-west-1.amazonaws.com").is_ok());
        for bad in [
            "",
            "https://x.example",
            "x.example:8883",
            "x.example/",
            "a b",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }
}
