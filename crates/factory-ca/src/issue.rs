//! Device issuance: a key and a certificate per device, written as one complete folder,
//! in parallel batches that record each device in the manifest once its files are in place.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;
use rcgen::PublicKeyData;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::ca::{pem_encode, random_serial, validity};
use crate::keys::DeviceKey;
use crate::run::{Clock, RunControl, Stage, Timings};
use crate::template::DeviceTemplate;
use crate::write::{create_dir, write_dir_atomic, DirFile};
use crate::{
    certificate_id, Ca, DeviceId, Error, KeyAlgorithm, Manifest, ManifestEntry, MANIFEST_FILE,
};

/// A device certificate, its key when we generated it, and its manifest line.
pub struct IssuedDevice {
    /// Private key (PKCS#8 PEM); `None` when the device keeps its own key (CSR).
    pub key_pem: Option<Zeroizing<String>>,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Device certificate followed by the signing CA: what the device presents.
    pub chain_pem: String,
    /// The manifest line.
    pub entry: ManifestEntry,
    /// Set when the validity asked for would have outlived the CA: notAfter was cut to the
    /// CA's own, this date.
    pub capped_at: Option<OffsetDateTime>,
}

impl std::fmt::Debug for IssuedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedDevice")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Certificate times are whole seconds within years 1950..9999, which always format.
    t.format(&Rfc3339).unwrap_or_default()
}

/// One batch's shared part of issuance: validity checked and capped once, the certificate
/// template encoded once ([`DeviceTemplate`]).
pub(crate) struct Prepared {
    pub(crate) template: DeviceTemplate,
    pub(crate) not_before: String,
    pub(crate) not_after: String,
    pub(crate) capped_at: Option<OffsetDateTime>,
}

impl Ca {
    /// Checks `days` against the profile and the CA's own validity, and prepares the batch's
    /// template (valid from a minute before `now`, never past the CA's notAfter).
    pub(crate) fn prepare(&self, days: u32, now: OffsetDateTime) -> Result<Prepared, Error> {
        if days > self.profile.device.max_days {
            return Err(Error::ValidityTooLong {
                days,
                max: self.profile.device.max_days,
            });
        }
        if now >= self.not_after {
            return Err(Error::CaExpired {
                not_after: rfc3339(self.not_after),
            });
        }
        let (not_before, mut not_after) = validity(now, days)?;
        // A device never outlives the CA that vouches for it.
        let capped_at = (not_after > self.not_after).then_some(self.not_after);
        if let Some(cap) = capped_at {
            not_after = cap;
        }
        let algorithm = rcgen::PublicKeyData::algorithm(self.issuer.key());
        Ok(Prepared {
            template: DeviceTemplate::new(&self.cert_der, algorithm, not_before, not_after)?,
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
            capped_at,
        })
    }

    /// The DER of a device certificate for `public_key`, and its serial.
    pub(crate) fn sign_raw(
        &self,
        prepared: &Prepared,
        id: &DeviceId,
        public_key: &impl PublicKeyData,
    ) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let serial = random_serial()?.to_bytes();
        let tbs = prepared.template.tbs(&serial, id.as_str(), public_key);
        Ok((prepared.template.sign(tbs, self.issuer.key())?, serial))
    }

    /// Signs a device certificate for `public_key` with the device profile.
    pub(crate) fn sign_prepared(
        &self,
        prepared: &Prepared,
        id: &DeviceId,
        public_key: &impl PublicKeyData,
        key_pem: Option<Zeroizing<String>>,
    ) -> Result<IssuedDevice, Error> {
        let (cert_der, serial_bytes) = self.sign_raw(prepared, id, public_key)?;
        Ok(self.assemble(prepared, id, cert_der, &serial_bytes, key_pem))
    }

    /// A signed certificate's PEM, chain and manifest line.
    pub(crate) fn assemble(
        &self,
        prepared: &Prepared,
        id: &DeviceId,
        cert_der: Vec<u8>,
        serial_bytes: &[u8],
        key_pem: Option<Zeroizing<String>>,
    ) -> IssuedDevice {
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        let mut chain_pem = String::with_capacity(cert_pem.len() + self.cert_pem.len());
        chain_pem.push_str(&cert_pem);
        chain_pem.push_str(&self.cert_pem);
        let entry = ManifestEntry {
            id: id.to_string(),
            serial: crate::manifest::hex(serial_bytes),
            not_before: prepared.not_before.clone(),
            not_after: prepared.not_after.clone(),
            certificate_id: certificate_id(&cert_der),
            supersedes: None,
            retire_after: None,
        };
        IssuedDevice {
            key_pem,
            cert_der,
            cert_pem,
            chain_pem,
            entry,
            capped_at: prepared.capped_at,
        }
    }

    /// Signs a device certificate for `public_key` with the device profile.
    pub(crate) fn sign_device(
        &self,
        id: &DeviceId,
        public_key: &impl PublicKeyData,
        days: u32,
        now: OffsetDateTime,
        key_pem: Option<Zeroizing<String>>,
    ) -> Result<IssuedDevice, Error> {
        let prepared = self.prepare(days, now)?;
        self.sign_prepared(&prepared, id, public_key, key_pem)
    }

    /// Generates a key for `id` and issues its certificate (nothing is written).
    pub fn issue_device(
        &self,
        id: &DeviceId,
        key: KeyAlgorithm,
        days: u32,
        now: OffsetDateTime,
    ) -> Result<IssuedDevice, Error> {
        let prepared = self.prepare(days, now)?;
        self.issue_prepared(&prepared, id, key)
    }

    /// Generates a key for `id` and issues its certificate from a prepared batch.
    pub(crate) fn issue_prepared(
        &self,
        prepared: &Prepared,
        id: &DeviceId,
        key: KeyAlgorithm,
    ) -> Result<IssuedDevice, Error> {
        let device_key = DeviceKey::generate(key)?;
        let key_pem = device_key.pkcs8_pem()?;
        self.sign_prepared(prepared, id, &device_key, Some(key_pem))
    }
}

/// The device's private key inside `devices/<id>/` (mode 0600).
pub const DEVICE_KEY_FILE: &str = "device.key";
/// The device's certificate inside `devices/<id>/`.
pub const DEVICE_CERT_FILE: &str = "device.crt";
/// The device's certificate followed by the signing CA inside `devices/<id>/`: what it presents.
pub const CHAIN_FILE: &str = "chain.pem";

/// Writes `out/<id>/{device.key, device.crt, chain.pem}` as one complete folder.
pub(crate) fn write_device(out: &Path, issued: &IssuedDevice) -> Result<PathBuf, Error> {
    let dir = out.join(&issued.entry.id);
    let mut files = Vec::with_capacity(3);
    if let Some(key) = &issued.key_pem {
        files.push(DirFile {
            name: DEVICE_KEY_FILE,
            bytes: key.as_bytes(),
            mode: 0o600,
        });
    }
    files.push(DirFile {
        name: DEVICE_CERT_FILE,
        bytes: issued.cert_pem.as_bytes(),
        mode: 0o644,
    });
    files.push(DirFile {
        name: CHAIN_FILE,
        bytes: issued.chain_pem.as_bytes(),
        mode: 0o644,
    });
    write_dir_atomic(&dir, &files)?;
    Ok(dir)
}

/// Settings of a batch issuance.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Output folder (`devices`).
    pub out_dir: PathBuf,
    /// Key type generated per device.
    pub key: KeyAlgorithm,
    /// Validity in days.
    pub days: u32,
    /// Worker threads; 0 means one per core, or [`REMOTE_JOBS`] when the CA key is remote
    /// (each signature then waits on a KMS or a token, not on a core).
    pub jobs: usize,
    /// Issue again ids the manifest already holds.
    pub force: bool,
    /// Issuance time.
    pub now: OffsetDateTime,
    /// With `jitr rotate`: what each new certificate replaces, recorded in the manifest.
    pub rotation: Option<Rotation>,
}

/// A rotation's record: the certificate each device's new one replaces, and when the old ones
/// are retired.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// Device id to the certificate id its new certificate supersedes.
    pub supersedes: std::collections::HashMap<String, String>,
    /// When the superseded certificates are retired (RFC 3339).
    pub retire_after: Option<String>,
}

/// Workers by default when every signature is a round trip to a KMS or a token: enough to
/// keep a KMS at its request rate through 50 ms answers, a small share of the cores' time.
pub const REMOTE_JOBS: usize = 16;

impl Ca {
    /// The worker threads a batch uses for `jobs` ([`BatchOptions::jobs`]): `jobs` itself, or
    /// for 0 one per core, [`REMOTE_JOBS`] when the CA key is remote.
    pub fn workers(&self, jobs: usize) -> usize {
        match jobs {
            0 if self.remote_key_uri().is_some() => REMOTE_JOBS,
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            jobs => jobs,
        }
    }
}

/// The pool a batch's workers run on (folders and bundle alike).
pub(crate) fn worker_pool(workers: usize) -> Result<rayon::ThreadPool, Error> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(Error::Workers)
}

/// A device the batch could not issue.
#[derive(Debug)]
pub struct DeviceFailure {
    /// The device id.
    pub id: String,
    /// Why.
    pub error: Error,
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Manifest lines of the devices issued, in completion order.
    pub issued: Vec<ManifestEntry>,
    /// Devices that failed; nothing was written for them.
    pub failures: Vec<DeviceFailure>,
    /// Set when notAfter was cut to the CA's own (this date) because the validity asked for
    /// would have outlived it.
    pub capped_at: Option<OffsetDateTime>,
    /// Ids left out because the manifest holds them (with [`RunControl::skip_issued`]).
    pub skipped: usize,
    /// The run was stopped before every device was started.
    pub stopped: bool,
    /// The number of the cut-off last manifest line removed before the run.
    pub repaired: Option<usize>,
    /// With [`RunControl::hand_over`]: each device issued, its key and chain included, in
    /// the order of [`BatchReport::issued`], so delivery needs no second read of the folders.
    pub handed_over: Vec<IssuedDevice>,
}

/// The ids to issue: duplicates within `ids` refused; ids the manifest already holds refused
/// (all counted, the first named), or left out with `skip_issued`, or issued again with `force`.
pub(crate) fn check_new_ids<'a>(
    ids: impl IntoIterator<Item = &'a DeviceId>,
    manifest: &Manifest,
    force: bool,
    skip_issued: bool,
) -> Result<Vec<&'a DeviceId>, Error> {
    let mut seen = HashSet::new();
    let mut new = Vec::new();
    let mut issued: Option<(&DeviceId, usize)> = None;
    for id in ids {
        if !seen.insert(id.as_str()) {
            return Err(Error::DuplicateInput { id: id.to_string() });
        }
        if force || !manifest.contains_id(id.as_str()) {
            new.push(id);
        } else if !skip_issued {
            issued.get_or_insert((id, 0)).1 += 1;
        }
    }
    if let Some((id, count)) = issued {
        return Err(Error::AlreadyIssued {
            id: id.to_string(),
            count,
            manifest: manifest.path().to_owned(),
        });
    }
    Ok(new)
}

/// Appends the manifest line of a device whose files are in place, or records its failure;
/// either way the manifest and the folders on disk agree afterwards.
fn record(
    manifest: &mut Manifest,
    report: &mut BatchReport,
    out: &Path,
    id: &DeviceId,
    result: Result<IssuedDevice, Error>,
    hand_over: bool,
) {
    let error = match result {
        Ok(issued) if manifest.contains_serial(&issued.entry.serial) => {
            // 126 random bits make this practically impossible; never record a serial twice.
            Error::Crypto {
                op: "serial number collided; issue this device again",
            }
        }
        Ok(issued) => match manifest.append(&issued.entry) {
            Ok(()) => {
                report.capped_at = report.capped_at.or(issued.capped_at);
                if hand_over {
                    report.issued.push(issued.entry.clone());
                    report.handed_over.push(issued);
                } else {
                    report.issued.push(issued.entry);
                }
                return;
            }
            Err(error) => error,
        },
        Err(error) => {
            report.failures.push(DeviceFailure {
                id: id.to_string(),
                error,
            });
            return;
        }
    };
    // The folder was written but cannot be recorded: no line, no folder.
    let _ = std::fs::remove_dir_all(out.join(id.as_str()));
    report.failures.push(DeviceFailure {
        id: id.to_string(),
        error,
    });
}

/// Issues every id in parallel, writing each device's folder and then its manifest line,
/// so the manifest only ever names devices whose files are complete. `progress` is
/// called once per device finished (issued or failed).
pub fn issue_batch(
    ca: &Ca,
    ids: &[DeviceId],
    opts: &BatchOptions,
    progress: &(dyn Fn() + Sync),
) -> Result<BatchReport, Error> {
    issue_batch_with(ca, ids, opts, &RunControl::default(), progress)
}

/// [`issue_batch`] steered by `control`: stopped from outside (the devices in flight finish,
/// each with its folder and its line), ids already issued skipped, each stage timed.
pub fn issue_batch_with(
    ca: &Ca,
    ids: &[DeviceId],
    opts: &BatchOptions,
    control: &RunControl,
    progress: &(dyn Fn() + Sync),
) -> Result<BatchReport, Error> {
    create_dir(&opts.out_dir)?;
    let manifest = if control.skip_issued {
        Manifest::open_repairing(&opts.out_dir)?
    } else {
        Manifest::open(&opts.out_dir)?
    };
    let todo = check_new_ids(ids, &manifest, opts.force, control.skip_issued)?;
    // The manifest is locked: what a stopped or crashed run left half-made is no one's.
    remove_temporaries(&opts.out_dir);
    let pool = worker_pool(ca.workers(opts.jobs))?;

    // Workers record their own results: a lock taken once per device costs far less
    // than waking a collector thread for every certificate.
    let prepared = ca.prepare(opts.days, opts.now)?;
    let report = BatchReport {
        skipped: ids.len() - todo.len(),
        repaired: manifest.repaired(),
        ..BatchReport::default()
    };
    let shared = Mutex::new((manifest, report));
    let timings = &control.timings;
    pool.install(|| {
        todo.par_iter().for_each(|&id| {
            if control.stopped() {
                return;
            }
            let mut clock = Clock::start();
            let result = issue_timed(ca, &prepared, id, opts, timings, &mut clock)
                .and_then(|issued| write_device(&opts.out_dir, &issued).map(|_| issued));
            clock.lap(timings, Stage::Write);
            let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let (manifest, report) = &mut *guard;
            record(
                manifest,
                report,
                &opts.out_dir,
                id,
                result,
                control.hand_over,
            );
            drop(guard);
            clock.lap(timings, Stage::Manifest);
            progress();
        });
    });
    let (mut manifest, mut report) = shared.into_inner().unwrap_or_else(PoisonError::into_inner);
    let mut clock = Clock::start();
    manifest.flush()?;
    clock.lap(timings, Stage::Manifest);
    report.stopped = control.stopped() && report.issued.len() + report.failures.len() < todo.len();
    Ok(report)
}

/// One device's key and certificate, each stage charged to `timings`.
fn issue_timed(
    ca: &Ca,
    prepared: &Prepared,
    id: &DeviceId,
    opts: &BatchOptions,
    timings: &Timings,
    clock: &mut Clock,
) -> Result<IssuedDevice, Error> {
    let key = DeviceKey::generate(opts.key)?;
    clock.lap(timings, Stage::Keygen);
    let (cert_der, serial) = ca.sign_raw(prepared, id, &key)?;
    clock.lap(timings, Stage::Sign);
    let mut issued = ca.assemble(prepared, id, cert_der, &serial, Some(key.pkcs8_pem()?));
    if let Some(rotation) = &opts.rotation {
        issued.entry.supersedes = rotation.supersedes.get(id.as_str()).cloned();
        issued.entry.retire_after = issued
            .entry
            .supersedes
            .as_ref()
            .and(rotation.retire_after.clone());
    }
    clock.lap(timings, Stage::Encode);
    Ok(issued)
}

/// Removes what a stopped or crashed run left half-made in `dir`: temporary device folders
/// (`.<id>.tmp.<hex>`, `.<id>.old.<hex>`) and a bundle run's pending manifest lines. Called
/// only with the manifest locked, so no live run owns them.
pub(crate) fn remove_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let temporary = name.starts_with('.') && (name.contains(".tmp.") || name.contains(".old."));
        if temporary {
            let path = entry.path();
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let _ = std::fs::remove_file(dir.join(MANIFEST_FILE).with_extension("jsonl.pending"));
}
