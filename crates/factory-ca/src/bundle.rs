//! Streaming issuance into one bundle: a JSON line per device with its chain and key, the form
//! a flashing station consumes, instead of a folder per device.
//!
//! Workers issue in parallel, each filling a buffer of whole lines that goes to the output
//! under a lock once it holds [`CHUNK`] bytes, so writing costs a few syscalls per thousand
//! devices. The buffers hold private keys: they are wiped when done. Manifest lines go to a
//! pending file beside the manifest and join it only once the bundle is complete: the manifest
//! never names a device whose key is not safely in the bundle.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;
use time::OffsetDateTime;
use zeroize::{Zeroize, Zeroizing};

use crate::issue::{check_new_ids, remove_temporaries, Prepared};
use crate::keys::{DeviceKey, PLAIN_LABEL};
use crate::run::{Clock, RunControl, Stage, Timings};
use crate::write::create_dir;
use crate::{certificate_id, pem};
use crate::{Ca, DeviceFailure, DeviceId, Error, KeyAlgorithm, Manifest};

/// Bytes of whole lines a worker gathers before it writes them out.
const CHUNK: usize = 256 * 1024;
/// Devices a worker takes at a time.
const BLOCK: usize = 512;

/// Settings of a bundle issuance.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// Where the manifest is (`devices`): the folder `--out` names.
    pub manifest_dir: PathBuf,
    /// Key type generated per device.
    pub key: KeyAlgorithm,
    /// Validity in days.
    pub days: u32,
    /// Worker threads; 0 means one per core.
    pub jobs: usize,
    /// Issue again ids that the manifest already holds.
    pub force: bool,
    /// Issuance time.
    pub now: OffsetDateTime,
}

/// What a bundle issuance did.
#[derive(Debug, Default)]
pub struct BundleReport {
    /// Devices in the bundle.
    pub issued: usize,
    /// Devices that failed; nothing of theirs is in the bundle.
    pub failures: Vec<DeviceFailure>,
    /// Set when notAfter was cut to the CA's own (this date).
    pub capped_at: Option<OffsetDateTime>,
    /// Ids left out because the manifest holds them (with [`RunControl::skip_issued`]).
    pub skipped: usize,
    /// The run was stopped before every device was started: the bundle holds those issued.
    pub stopped: bool,
    /// The number of the cut-off last manifest line removed before the run.
    pub repaired: Option<usize>,
}

/// Appends `text` as a JSON string (PEM, ids and dates need no escaping but quotes,
/// backslashes and control characters would).
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let mut rest = text.as_bytes();
    // Copy the runs that need no escaping whole (a PEM line at a time).
    while let Some(at) = rest
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
    {
        out.extend_from_slice(&rest[..at]);
        match rest[at] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// What every line of one run shares: the CA's PEM as it appears inside a JSON string.
struct Shared {
    ca_pem_json: Vec<u8>,
}

/// One device into `chunk`: its bundle line
/// `{"id","certificate_id","serial","not_after","chain_pem","key_pem"}` and its manifest line,
/// both written straight from the DER (PEM lines end in an escaped `\n` inside the JSON).
fn push_device(
    chunk: &mut Chunk,
    shared: &Shared,
    prepared: &Prepared,
    id: &DeviceId,
    device: &Device,
) {
    let (cert_der, serial_hex, key_der) = (&device.cert_der, &device.serial_hex, &device.key_der);
    let certificate_id = certificate_id(cert_der);
    let out = &mut chunk.lines;
    out.extend_from_slice(b"{\"id\":");
    push_json_string(out, id.as_str());
    out.extend_from_slice(b",\"certificate_id\":\"");
    out.extend_from_slice(certificate_id.as_bytes());
    out.extend_from_slice(b"\",\"serial\":\"");
    out.extend_from_slice(serial_hex.as_bytes());
    out.extend_from_slice(b"\",\"not_after\":");
    push_json_string(out, &prepared.not_after);
    out.extend_from_slice(b",\"chain_pem\":\"");
    pem::push_pem(out, "CERTIFICATE", cert_der, b"\\n");
    out.extend_from_slice(&shared.ca_pem_json);
    out.extend_from_slice(b"\",\"key_pem\":\"");
    pem::push_pem(out, PLAIN_LABEL, key_der, b"\\n");
    out.extend_from_slice(b"\"}\n");
    // The manifest line, as ManifestEntry serializes (same fields, same order).
    let m = &mut chunk.manifest;
    m.extend_from_slice(b"{\"id\":");
    push_json_string(m, id.as_str());
    m.extend_from_slice(b",\"serial\":\"");
    m.extend_from_slice(serial_hex.as_bytes());
    m.extend_from_slice(b"\",\"not_before\":");
    push_json_string(m, &prepared.not_before);
    m.extend_from_slice(b",\"not_after\":");
    push_json_string(m, &prepared.not_after);
    m.extend_from_slice(b",\"certificate_id\":\"");
    m.extend_from_slice(certificate_id.as_bytes());
    m.extend_from_slice(b"\"}\n");
    chunk.issued += 1;
}

/// A worker's buffers: bundle lines (keys inside: wiped on drop) and manifest lines.
struct Chunk {
    lines: Vec<u8>,
    manifest: Vec<u8>,
    issued: usize,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.lines.zeroize();
    }
}

/// What the workers share: the output, the pending manifest, the tallies.
struct Sink<'a> {
    out: Mutex<(&'a mut (dyn Write + Send), File)>,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    report: Mutex<BundleReport>,
}

impl Sink<'_> {
    /// Writes a chunk's lines, then its manifest lines to the pending file.
    fn drain(&self, chunk: &mut Chunk, pending: &Path, timings: &Timings) {
        if chunk.lines.is_empty() {
            return;
        }
        if !self.failed.load(Ordering::Relaxed) {
            let mut clock = Clock::start();
            let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
            let (bundle, manifest) = &mut *out;
            let result = bundle
                .write_all(&chunk.lines)
                .map_err(|source| Error::Write {
                    path: PathBuf::from("the bundle"),
                    source,
                });
            clock.lap(timings, Stage::Write);
            let result = result.and_then(|()| {
                manifest
                    .write_all(&chunk.manifest)
                    .map_err(|source| Error::Write {
                        path: pending.to_owned(),
                        source,
                    })
            });
            match result {
                Ok(()) => {
                    self.report
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .issued += chunk.issued;
                }
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    self.error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(e);
                }
            }
            drop(out);
            clock.lap(timings, Stage::Manifest);
        }
        chunk.lines.zeroize();
        chunk.lines.clear();
        chunk.manifest.clear();
        chunk.issued = 0;
    }
}

/// Issues every id in parallel into `out`, one JSON line per device, and records them in the
/// manifest under `opts.manifest_dir` once all are written and `out` is flushed. Devices that
/// fail are reported and left out; a write failure stops the run with nothing recorded.
pub fn issue_bundle(
    ca: &Ca,
    ids: &[DeviceId],
    opts: &BundleOptions,
    out: &mut (dyn Write + Send),
    progress: &(dyn Fn() + Sync),
) -> Result<BundleReport, Error> {
    issue_bundle_then(ca, ids, opts, out, progress, &mut || Ok(()))
}

/// [`issue_bundle`], with `commit` run once every line is written and flushed and before the
/// manifest records them: where the caller makes the bundle durable (syncs and links the file
/// into place). If `commit` fails, nothing is recorded.
pub fn issue_bundle_then(
    ca: &Ca,
    ids: &[DeviceId],
    opts: &BundleOptions,
    out: &mut (dyn Write + Send),
    progress: &(dyn Fn() + Sync),
    commit: &mut dyn FnMut() -> std::io::Result<()>,
) -> Result<BundleReport, Error> {
    let sinks = BundleSinks {
        out,
        commit,
        undo: &mut || {},
    };
    issue_bundle_with(ca, ids, opts, &RunControl::default(), sinks, progress)
}

/// Where a bundle run's lines go and how the caller makes them final: `commit` once every
/// line is written and flushed, before the manifest records them (sync the file and link it
/// into place); `undo` if the manifest then cannot record them (unlink it: a bundle whose
/// devices are not in the manifest must not be flashed).
pub struct BundleSinks<'a> {
    /// The bundle's lines.
    pub out: &'a mut (dyn Write + Send),
    /// Makes the written bundle durable and visible.
    pub commit: &'a mut dyn FnMut() -> std::io::Result<()>,
    /// Takes back what `commit` did.
    pub undo: &'a mut dyn FnMut(),
}

impl std::fmt::Debug for BundleSinks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleSinks").finish_non_exhaustive()
    }
}

/// [`issue_bundle_then`] steered by `control`: a stop ends the run after the devices in flight
/// (the bundle then holds, and the manifest records, those issued); ids already issued are
/// skipped; each stage is timed.
pub fn issue_bundle_with(
    ca: &Ca,
    ids: &[DeviceId],
    opts: &BundleOptions,
    control: &RunControl,
    sinks: BundleSinks<'_>,
    progress: &(dyn Fn() + Sync),
) -> Result<BundleReport, Error> {
    let BundleSinks { out, commit, undo } = sinks;
    let timings = &control.timings;
    create_dir(&opts.manifest_dir)?;
    let mut manifest = if control.skip_issued {
        Manifest::open_repairing(&opts.manifest_dir)?
    } else {
        Manifest::open(&opts.manifest_dir)?
    };
    let todo = check_new_ids(ids, &manifest, opts.force, control.skip_issued)?;
    remove_temporaries(&opts.manifest_dir);
    let pending_path = manifest.path().with_extension("jsonl.pending");
    let pending = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&pending_path)
        .map_err(|source| Error::Write {
            path: pending_path.clone(),
            source,
        })?;
    let pool = crate::issue::worker_pool(ca.workers(opts.jobs))?;
    let sink = Sink {
        out: Mutex::new((out, pending)),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        report: Mutex::new(BundleReport {
            skipped: ids.len() - todo.len(),
            repaired: manifest.repaired(),
            ..BundleReport::default()
        }),
    };
    let prepared = ca.prepare(opts.days, opts.now)?;
    let shared = Shared {
        ca_pem_json: {
            let mut escaped = Vec::new();
            push_json_string(&mut escaped, ca.cert_pem());
            // Inside the chain's string: without its own quotes.
            escaped[1..escaped.len() - 1].to_vec()
        },
    };
    let existing = &manifest;
    pool.install(|| {
        // Blocks of devices, each drained at its end: no line waits in a buffer after its
        // block is done.
        todo.par_chunks(BLOCK).for_each(|block| {
            let mut chunk = Chunk {
                lines: Vec::with_capacity(CHUNK + 8192),
                manifest: Vec::with_capacity(CHUNK / 8),
                issued: 0,
            };
            for &id in block {
                if sink.failed.load(Ordering::Relaxed) {
                    return;
                }
                if control.stopped() {
                    break;
                }
                let mut clock = Clock::start();
                match issue_one(ca, &prepared, id, opts.key, existing, timings, &mut clock) {
                    Ok(device) => {
                        push_device(&mut chunk, &shared, &prepared, id, &device);
                        clock.lap(timings, Stage::Encode);
                        if chunk.lines.len() >= CHUNK {
                            sink.drain(&mut chunk, &pending_path, timings);
                        }
                    }
                    Err(error) => sink
                        .report
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .failures
                        .push(DeviceFailure {
                            id: id.to_string(),
                            error,
                        }),
                }
                progress();
            }
            sink.drain(&mut chunk, &pending_path, timings);
        });
    });
    let (out, pending) = sink
        .out
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let mut clock = Clock::start();
    let flushed = out.flush().map_err(|source| Error::Write {
        path: PathBuf::from("the bundle"),
        source,
    });
    clock.lap(timings, Stage::Write);
    let synced = pending.sync_all().map_err(|source| Error::Write {
        path: pending_path.clone(),
        source,
    });
    drop(pending);
    clock.lap(timings, Stage::Manifest);
    let failure = sink
        .error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .map_or(Ok(()), Err);
    let mut committed = || {
        commit().map_err(|source| Error::Write {
            path: PathBuf::from("the bundle"),
            source,
        })
    };
    if let Err(e) = failure.and(flushed).and(synced).and_then(|()| committed()) {
        let _ = std::fs::remove_file(&pending_path);
        return Err(e);
    }
    clock.lap(timings, Stage::Write);
    let mut report = sink
        .report
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = manifest.append_pending(&pending_path) {
        undo();
        let _ = std::fs::remove_file(&pending_path);
        return Err(e);
    }
    clock.lap(timings, Stage::Manifest);
    report.stopped = control.stopped() && report.issued + report.failures.len() < todo.len();
    Ok(report)
}

/// One device as the bundle writes it.
struct Device {
    cert_der: Vec<u8>,
    serial_hex: String,
    key_der: Zeroizing<Vec<u8>>,
}

/// One device: its certificate's DER, its serial (hex, checked against the manifest's) and
/// its key's PKCS#8 DER.
fn issue_one(
    ca: &Ca,
    prepared: &Prepared,
    id: &DeviceId,
    key: KeyAlgorithm,
    manifest: &Manifest,
    timings: &Timings,
    clock: &mut Clock,
) -> Result<Device, Error> {
    let device_key = DeviceKey::generate(key)?;
    let key_der = device_key.pkcs8_der()?;
    clock.lap(timings, Stage::Keygen);
    let (cert_der, serial) = ca.sign_raw(prepared, id, &device_key)?;
    clock.lap(timings, Stage::Sign);
    let serial_hex = crate::manifest::hex(&serial);
    if manifest.contains_serial(&serial_hex) {
        // 126 random bits make this practically impossible; never record a serial twice.
        return Err(Error::Crypto {
            op: "serial number collided; issue this device again",
        });
    }
    Ok(Device {
        cert_der,
        serial_hex,
        key_der,
    })
}
