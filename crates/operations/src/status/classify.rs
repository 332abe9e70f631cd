//! Judging: each device's one state from what was read.

use super::*;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Every device's one state, the most urgent first (then by device id).
pub fn classify(
    observed: &Observed,
    now: OffsetDateTime,
    expiring_within: time::Duration,
) -> Vec<DeviceStatus> {
    let mut certs: BTreeMap<String, Vec<&Listed>> = BTreeMap::new();
    for c in &observed.certificates {
        if let Some(k) = observed.known.get(c.id.as_str()) {
            certs.entry(k.device.clone()).or_default().push(c);
        }
    }
    let mut devices: BTreeSet<String> = certs.keys().cloned().collect();
    devices.extend(observed.things.iter().cloned());
    if let Some(roster) = &observed.roster {
        devices.extend(roster.keys().cloned());
    }
    devices.extend(observed.manifest_devices.iter().cloned());

    let mut rows: Vec<DeviceStatus> = devices
        .into_iter()
        .map(|device| {
            let mut mine = certs.remove(&device).unwrap_or_default();
            // Oldest first; a certificate that supersedes another is the newer of the two even
            // when both were made in the same second.
            mine.sort_by_key(|c| {
                let known = observed.known.get(c.id.as_str());
                (
                    known.and_then(|k| k.not_before),
                    c.created,
                    known.is_some_and(|k| k.supersedes.is_some()),
                )
            });
            classify_device(observed, &device, &mine, now, expiring_within)
        })
        .collect();
    rows.sort_by(|a, b| (a.state, &a.device_id).cmp(&(b.state, &b.device_id)));
    rows
}

fn classify_device(
    observed: &Observed,
    device: &str,
    certs: &[&Listed],
    now: OffsetDateTime,
    window: time::Duration,
) -> DeviceStatus {
    let known = |c: &Listed| observed.known.get(c.id.as_str());
    let rows: Vec<CertificateRow> = certs
        .iter()
        .map(|c| CertificateRow {
            certificate_id: c.id.to_string(),
            status: c.status.as_str().to_owned(),
            not_after: known(c).and_then(|k| k.not_after).map(rfc3339),
            created: c.created,
        })
        .collect();
    let active: Vec<&Listed> = certs
        .iter()
        .copied()
        .filter(|c| c.status == CertificateStatus::Active)
        .collect();
    let pending: Vec<&Listed> = certs
        .iter()
        .copied()
        .filter(|c| c.status == CertificateStatus::PendingActivation)
        .collect();
    let standing = observed
        .roster
        .as_ref()
        .and_then(|r| r.get(device).copied());
    let member = standing == Some(Standing::Active);
    let judged = observed.roster.is_some();
    let thing = observed.things.contains(device).then(|| device.to_owned());
    let short = |id: &CertificateId| id.as_str()[..12.min(id.as_str().len())].to_owned();

    // A rotation in its grace period: the newest ACTIVE certificate replaces the others, which
    // stay ACTIVE until retire_after.
    let rotating = active.len() >= 2 && {
        let newest = active[active.len() - 1];
        known(newest).is_some_and(|k| {
            k.retire_after.is_some_and(|at| at > now)
                && active[..active.len() - 1]
                    .iter()
                    .all(|old| k.supersedes.as_deref() == Some(old.id.as_str()))
        })
    };
    let revoked_mark = observed.revoked_marks.get(device);
    let connections = observed
        .presence
        .as_ref()
        .and_then(|p| p.get(device))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let last_connected = activator::presence::last_connected(connections).cloned();
    let newest_connected = active.last().is_some_and(|newest| {
        activator::presence::has_connected(connections, newest.id.as_str(), None)
    });
    let (state, reason) = if let (Some(at), false) = (revoked_mark, active.is_empty()) {
        (
            State::Drifted,
            format!(
                "cut off by jitr revoke at {at}, yet {} ACTIVE certificate(s)",
                active.len()
            ),
        )
    } else if !active.is_empty() && judged && standing.is_none() {
        (
            State::Drifted,
            format!(
                "{} ACTIVE certificate(s), but the device is not in the fleet",
                active.len()
            ),
        )
    } else if standing == Some(Standing::Inactive) && !(active.is_empty() && pending.is_empty()) {
        (
            State::Inactive,
            "inactive in the fleet (paused): its certificates are held as they are".to_owned(),
        )
    } else if active.len() >= 2 && !rotating {
        let attached = observed
            .principals
            .get(device)
            .map(|ids| {
                active
                    .iter()
                    .filter(|c| ids.iter().any(|i| i == c.id.as_str()))
                    .count()
            })
            .map_or(String::new(), |n| format!(", {n} attached to the Thing"));
        let newest = active[active.len() - 1];
        let proof = if newest_connected {
            "it has connected".to_owned()
        } else {
            "held for the operator: no record that it has connected".to_owned()
        };
        (
            State::Duplicate,
            format!(
                "{} ACTIVE certificates{attached}: the newest ({}) replaces the others; {proof}",
                active.len(),
                short(&newest.id)
            ),
        )
    } else if !pending.is_empty() && !active.is_empty() {
        (
            State::Held,
            format!(
                "{} waits for approval (jitr approve) beside ACTIVE {}",
                short(&pending[0].id),
                short(&active[0].id)
            ),
        )
    } else if let Some((c, end)) = (if rotating {
        // Only the newest counts: the ones it replaces are on their way out.
        &active[active.len() - 1..]
    } else {
        &active[..]
    })
    .iter()
    .find_map(|c| {
        known(c)
            .and_then(|k| k.not_after)
            .filter(|end| *end <= now + window)
            .map(|end| (c, end))
    }) {
        (
            State::Expiring,
            format!("{} ends {}", short(&c.id), rfc3339(end)),
        )
    } else if !pending.is_empty() {
        (
            State::Pending,
            format!(
                "{} is PENDING_ACTIVATION: the device's next connect or a sweep decides",
                short(&pending[0].id)
            ),
        )
    } else if let (Some(at), true) = (revoked_mark, active.is_empty()) {
        (
            State::Revoked,
            format!("cut off by jitr revoke at {at} (jitr approve --device lifts it)"),
        )
    } else if thing.is_some()
        && !observed.other_principals.contains_key(device)
        && observed
            .principals
            .get(device)
            .is_some_and(|ids| ids.is_empty())
    {
        (
            State::Orphan,
            "a Thing with no certificate attached".to_owned(),
        )
    } else if let (Some(c), None) = (active.first(), &thing) {
        let elsewhere = observed
            .certificate_things
            .get(c.id.as_str())
            .filter(|t| !t.is_empty())
            .map_or(String::new(), |t| {
                format!(" (attached to {})", t.join(", "))
            });
        (
            State::Orphan,
            format!(
                "ACTIVE certificate {} with no Thing{elsewhere}",
                short(&c.id)
            ),
        )
    } else if certs.is_empty() {
        let why = match standing {
            Some(Standing::Active) => "in the fleet, nothing registered in AWS IoT yet",
            Some(Standing::Inactive) => "inactive in the fleet, nothing registered in AWS IoT",
            None => "in the manifest, nothing registered in AWS IoT yet",
        };
        (State::NotConnected, why.to_owned())
    } else if active.is_empty() {
        (
            State::Revoked,
            "every certificate is REVOKED or INACTIVE".to_owned(),
        )
    } else if rotating {
        (
            State::Active,
            format!(
                "rotating: {} replaces the old certificate(s) until its grace ends",
                short(&active[active.len() - 1].id)
            ),
        )
    } else {
        (State::Active, String::new())
    };
    DeviceStatus {
        device_id: device.to_owned(),
        state,
        certificates: rows,
        thing,
        fleet_member: member,
        last_connected,
        newest_connected,
        reason,
    }
}

/// Counts per state, every state listed.
pub fn summary(rows: &[DeviceStatus]) -> BTreeMap<State, usize> {
    let mut counts: BTreeMap<State, usize> = State::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        *counts.entry(row.state).or_default() += 1;
    }
    counts
}
