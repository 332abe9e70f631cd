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
    let d = || call_deadline(deadline);
    let (list_pace, describe_pace, principals_pace, things_pace) = (
        Pace::new(rates.per_operation),
        Pace::new(rates.per_operation),
        Pace::new(rates.per_operation),
        Pace::new(rates.per_operation),
    );
    // 1. Every certificate under each trusted CA, oldest first.
    let mut certificates = Vec::new();
    for ca in &cas {
        let mut marker = None;
        loop {
            list_pace.take().await;
            let page = iot.list_certificates_by_ca(ca, marker, false, d()).await?;
            certificates.extend(page.certificates.into_iter().map(|c| Listed {
                id: c.id,
                status: c.status,
                created: c.created,
            }));
            progress.step("certificates listed", certificates.len(), None);
            match page.next_marker {
                Some(next) => marker = Some(next),
                None => break,
            }
        }
    }
    // 2. The device and validity of every certificate the manifest does not name.
    let unknown: Vec<&CertificateId> = certificates
        .iter()
        .map(|c| &c.id)
        .filter(|id| !known.contains_key(id.as_str()))
        .collect();
    let total = unknown.len();
    let described: Vec<Result<(String, Option<Known>), RegistryError>> = stream::iter(unknown)
        .map(|id| async {
            describe_pace.take().await;
            let description = iot.describe_certificate(id, d()).await?;
            Ok((id.to_string(), known_from_pem(&description.pem)))
        })
        .buffer_unordered(rates.concurrency.max(1))
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
        progress.step("certificates described", n + 1, Some(total));
    }
    // 3. Every Thing, of which only jitr's are kept.
    things_pace.take().await;
    let listed = iot.list_things(d()).await?;
    progress.step("things listed", listed.len(), None);
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
    let mut things = BTreeSet::new();
    let mut revoked_marks = HashMap::new();
    let mut foreign_things = 0;
    for thing in &listed {
        if !ownership.owns(thing, known_device(&thing.name)) {
            foreign_things += 1;
            continue;
        }
        if let Some(at) = activator::ownership::revoked_mark(thing) {
            revoked_marks.insert(thing.name.clone(), at.to_owned());
        }
        things.insert(thing.name.clone());
    }

    // 4. The attachments that decide a state.
    let active = |device: &str| {
        by_device.get(device).map_or(0, |cs| {
            cs.iter()
                .filter(|c| c.status == CertificateStatus::Active)
                .count()
        })
    };
    let has_live = |device: &str| {
        by_device
            .get(device)
            .is_some_and(|cs| cs.iter().any(|c| live(&c.status)))
    };
    let things_to_read: Vec<&String> = things
        .iter()
        .filter(|t| deep || !has_live(t) || active(t) >= 2)
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
    // Per Thing: its certificate ids, and how many other principals it holds.
    type Attached = (String, Vec<String>, usize);
    let principals: Vec<Result<Attached, RegistryError>> = stream::iter(things_to_read)
        .map(|thing| async {
            principals_pace.take().await;
            let arns = iot.thing_principals(thing, d()).await?;
            let (certs, others): (Vec<&String>, Vec<&String>) = arns
                .iter()
                .partition(|arn| activator::ownership::is_certificate_arn(arn));
            let ids = certs
                .into_iter()
                .filter_map(|arn| id_from_arn(arn).map(str::to_owned))
                .collect();
            Ok((thing.clone(), ids, others.len()))
        })
        .buffer_unordered(rates.concurrency.max(1))
        .collect()
        .await;
    let mut done = 0;
    let mut thing_principals = HashMap::new();
    let mut other_principals = HashMap::new();
    for result in principals {
        let (thing, ids, others) = result?;
        if others > 0 {
            other_principals.insert(thing.clone(), others);
        }
        thing_principals.insert(thing, ids);
        done += 1;
        progress.step("attachments read", done, Some(total));
    }
    let attached: Vec<Result<(String, Vec<String>), RegistryError>> =
        stream::iter(certificates_to_read)
            .map(|c| async {
                principals_pace.take().await;
                let arn = iot.describe_certificate(&c.id, d()).await?.arn;
                Ok((c.id.to_string(), iot.principal_things(&arn, d()).await?))
            })
            .buffer_unordered(rates.concurrency.max(1))
            .collect()
            .await;
    let mut certificate_things = HashMap::new();
    for result in attached {
        let (id, things) = result?;
        certificate_things.insert(id, things);
        done += 1;
        progress.step("attachments read", done, Some(total));
    }
    Ok(Observed {
        certificates,
        known,
        things,
        foreign_things,
        revoked_marks,
        principals: thing_principals,
        other_principals,
        presence: None,
        certificate_things,
        roster,
        manifest_devices,
        unattributed,
    })
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
