//! Reading: what AWS IoT and the fleet hold, in bulk and paced.

use super::*;

/// Reads AWS IoT for the certificates under the scope's CAs, the Things jitr owns and the
/// attachments that matter. Foreign Things are counted, never read further. Every call is
/// bounded by `deadline`.
pub async fn observe<A: IotAdmin>(
    iot: &A,
    scope: Scope,
    progress: &dyn Progress,
    deadline: Instant,
) -> Result<Observed, RegistryError> {
    let Scope {
        cas,
        mut known,
        roster,
        manifest_devices,
        ownership,
        deep,
        rates,
    } = scope;
    let reader = Reader {
        iot,
        progress,
        deadline,
        concurrency: rates.concurrency.max(1),
        list_pace: Pace::new(rates.per_operation),
        describe_pace: Pace::new(rates.per_operation),
        principals_pace: Pace::new(rates.per_operation),
        things_pace: Pace::new(rates.per_operation),
    };
    let certificates = reader.certificates(&cas).await?;
    let unattributed = reader.describe_unknown(&certificates, &mut known).await?;
    let mut by_device: BTreeMap<&str, Vec<&Listed>> = BTreeMap::new();
    for c in &certificates {
        if let Some(k) = known.get(c.id.as_str()) {
            by_device.entry(k.device.as_str()).or_default().push(c);
        }
    }
    let known_device = |name: &str| {
        by_device.contains_key(name)
            || manifest_devices.contains(name)
            || roster.as_ref().is_some_and(|r| r.contains_key(name))
    };
    let owned = reader.owned_things(&ownership, known_device).await?;
    let attachments = reader
        .attachments(&certificates, &known, &by_device, &owned.things, deep)
        .await?;
    Ok(Observed {
        known,
        things: owned.things,
        foreign_things: owned.foreign,
        revoked_marks: owned.revoked_marks,
        principals: attachments.thing_principals,
        other_principals: attachments.other_principals,
        presence: None,
        certificate_things: attachments.certificate_things,
        certificates,
        roster,
        manifest_devices,
        unattributed,
    })
}

/// What the reads share: the port, the per-operation paces, the progress, the deadline.
struct Reader<'a, A> {
    iot: &'a A,
    progress: &'a dyn Progress,
    deadline: Instant,
    concurrency: usize,
    list_pace: Pace,
    describe_pace: Pace,
    principals_pace: Pace,
    things_pace: Pace,
}

/// The Things jitr owns, the revocation marks on them, and how many others there are.
struct Owned {
    things: BTreeSet<String>,
    revoked_marks: HashMap<String, String>,
    foreign: usize,
}

/// The attachments that decide a state.
struct Attachments {
    /// Per owned Thing read: its certificate ids.
    thing_principals: HashMap<String, Vec<String>>,
    /// Per owned Thing read: how many attached principals are not certificates.
    other_principals: HashMap<String, usize>,
    /// Per ACTIVE certificate whose device has no Thing: the Things it is attached to.
    certificate_things: HashMap<String, Vec<String>>,
}

impl<A: IotAdmin> Reader<'_, A> {
    fn d(&self) -> Instant {
        call_deadline(self.deadline)
    }

    /// Step 1: every certificate under each trusted CA, oldest first.
    async fn certificates(&self, cas: &[CertificateId]) -> Result<Vec<Listed>, RegistryError> {
        let mut certificates = Vec::new();
        for ca in cas {
            let mut marker = None;
            loop {
                self.list_pace.take().await;
                let page = self
                    .iot
                    .list_certificates_by_ca(ca, marker, false, self.d())
                    .await?;
                certificates.extend(page.certificates.into_iter().map(|c| Listed {
                    id: c.id,
                    status: c.status,
                    created: c.created,
                }));
                self.progress
                    .step("certificates listed", certificates.len(), None);
                match page.next_marker {
                    Some(next) => marker = Some(next),
                    None => break,
                }
            }
        }
        Ok(certificates)
    }

    /// Step 2: the device and validity of every certificate the manifest does not name,
    /// into `known`; the ids whose PEM names no device.
    async fn describe_unknown(
        &self,
        certificates: &[Listed],
        known: &mut HashMap<String, Known>,
    ) -> Result<Vec<String>, RegistryError> {
        let unknown: Vec<&CertificateId> = certificates
            .iter()
            .map(|c| &c.id)
            .filter(|id| !known.contains_key(id.as_str()))
            .collect();
        let total = unknown.len();
        let described: Vec<Result<(String, Option<Known>), RegistryError>> = stream::iter(unknown)
            .map(|id| async {
                self.describe_pace.take().await;
                let description = self.iot.describe_certificate(id, self.d()).await?;
                Ok((id.to_string(), known_from_pem(&description.pem)))
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut unattributed = Vec::new();
        for (n, result) in described.into_iter().enumerate() {
            let (id, found) = result?;
            match found {
                Some(k) => {
                    known.insert(id, k);
                }
                None => unattributed.push(id),
            }
            self.progress
                .step("certificates described", n + 1, Some(total));
        }
        Ok(unattributed)
    }

    /// Step 3: every Thing, of which only jitr's are kept.
    async fn owned_things(
        &self,
        ownership: &activator::ownership::Ownership,
        known_device: impl Fn(&str) -> bool,
    ) -> Result<Owned, RegistryError> {
        self.things_pace.take().await;
        let listed = self.iot.list_things(self.d()).await?;
        self.progress.step("things listed", listed.len(), None);
        let mut owned = Owned {
            things: BTreeSet::new(),
            revoked_marks: HashMap::new(),
            foreign: 0,
        };
        for thing in &listed {
            if !ownership.owns(thing, known_device(&thing.name)) {
                owned.foreign += 1;
                continue;
            }
            if let Some(at) = activator::ownership::revoked_mark(thing) {
                owned
                    .revoked_marks
                    .insert(thing.name.clone(), at.to_owned());
            }
            owned.things.insert(thing.name.clone());
        }
        Ok(owned)
    }

    /// Step 4: the attachments that decide a state: the principals of each owned Thing that
    /// is not plainly fine (all of them with `deep`), and the Things of each ACTIVE
    /// certificate whose device has none.
    async fn attachments(
        &self,
        certificates: &[Listed],
        known: &HashMap<String, Known>,
        by_device: &BTreeMap<&str, Vec<&Listed>>,
        things: &BTreeSet<String>,
        deep: bool,
    ) -> Result<Attachments, RegistryError> {
        let count = |device: &str, pick: &dyn Fn(&CertificateStatus) -> bool| {
            by_device
                .get(device)
                .map_or(0, |cs| cs.iter().filter(|c| pick(&c.status)).count())
        };
        let things_to_read: Vec<&String> = things
            .iter()
            .filter(|t| {
                deep || count(t, &live) == 0 || count(t, &|s| *s == CertificateStatus::Active) >= 2
            })
            .collect();
        let certificates_to_read: Vec<&Listed> = certificates
            .iter()
            .filter(|c| c.status == CertificateStatus::Active)
            .filter(|c| {
                known
                    .get(c.id.as_str())
                    .is_some_and(|k| !things.contains(&k.device))
            })
            .collect();
        let total = things_to_read.len() + certificates_to_read.len();
        let mut read = Attachments {
            thing_principals: HashMap::new(),
            other_principals: HashMap::new(),
            certificate_things: HashMap::new(),
        };
        let principals = self.principals(things_to_read).await;
        let mut done = 0;
        for result in principals {
            let (thing, ids, others) = result?;
            if others > 0 {
                read.other_principals.insert(thing.clone(), others);
            }
            read.thing_principals.insert(thing, ids);
            done += 1;
            self.progress.step("attachments read", done, Some(total));
        }
        let attached: Vec<Result<(String, Vec<String>), RegistryError>> =
            stream::iter(certificates_to_read)
                .map(|c| async {
                    self.principals_pace.take().await;
                    let arn = self.iot.describe_certificate(&c.id, self.d()).await?.arn;
                    let things = self.iot.principal_things(&arn, self.d()).await?;
                    Ok((c.id.to_string(), things))
                })
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
        for result in attached {
            let (id, things) = result?;
            read.certificate_things.insert(id, things);
            done += 1;
            self.progress.step("attachments read", done, Some(total));
        }
        Ok(read)
    }

    /// Per Thing: its certificate ids, and how many other principals it holds.
    async fn principals(
        &self,
        things: Vec<&String>,
    ) -> Vec<Result<(String, Vec<String>, usize), RegistryError>> {
        stream::iter(things)
            .map(|thing| async {
                self.principals_pace.take().await;
                let arns = self.iot.thing_principals(thing, self.d()).await?;
                let (certs, others): (Vec<&String>, Vec<&String>) = arns
                    .iter()
                    .partition(|arn| activator::ownership::is_certificate_arn(arn));
                let ids = certs
                    .into_iter()
                    .filter_map(|arn| id_from_arn(arn).map(str::to_owned))
                    .collect();
                Ok((thing.clone(), ids, others.len()))
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await
    }
}

/// The device and validity a certificate's PEM carries.
pub fn known_from_pem(pem: &str) -> Option<Known> {
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes()).ok()?;
    let inspection = factory_ca::inspect_device_certificate(
        der.first()?,
        &factory_ca::InspectOptions {
            id_format: factory_ca::IdFormat::Any,
            ca_der: None,
            now: OffsetDateTime::now_utc(),
            max_validity_days: None,
        },
    );
    Some(Known {
        device: inspection.device_id?.to_string(),
        not_before: inspection.not_before,
        not_after: inspection.not_after,
        supersedes: None,
        retire_after: None,
    })
}
