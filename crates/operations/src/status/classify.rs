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

/// What judging one device looks at, read once from what was observed.
struct Facts<'a> {
    observed: &'a Observed,
    device: &'a str,
    certs: &'a [&'a Listed],
    active: Vec<&'a Listed>,
    pending: Vec<&'a Listed>,
    /// The device's standing in the fleet; `None` when not in it (or not read).
    standing: Option<Standing>,
    /// Whether the fleet's roster was read (a device missing from it is not in the fleet).
    judged: bool,
    thing: Option<String>,
    /// A rotation in its grace period: the newest ACTIVE certificate replaces the others,
    /// which stay ACTIVE until retire_after.
    rotating: bool,
    revoked_mark: Option<&'a String>,
    newest_connected: bool,
}

impl<'a> Facts<'a> {
    fn read(
        observed: &'a Observed,
        device: &'a str,
        certs: &'a [&'a Listed],
        now: OffsetDateTime,
    ) -> Self {
        let with = |status: CertificateStatus| -> Vec<&'a Listed> {
            certs
                .iter()
                .copied()
                .filter(|c| c.status == status)
                .collect()
        };
        let active = with(CertificateStatus::Active);
        let pending = with(CertificateStatus::PendingActivation);
        let rotating = active.len() >= 2 && {
            let newest = active[active.len() - 1];
            observed.known.get(newest.id.as_str()).is_some_and(|k| {
                k.retire_after.is_some_and(|at| at > now)
                    && active[..active.len() - 1]
                        .iter()
                        .all(|old| k.supersedes.as_deref() == Some(old.id.as_str()))
            })
        };
        let newest_connected = active.last().is_some_and(|newest| {
            activator::presence::has_connected(
                connections(observed, device),
                newest.id.as_str(),
                None,
            )
        });
        Facts {
            observed,
            device,
            certs,
            standing: observed
                .roster
                .as_ref()
                .and_then(|r| r.get(device).copied()),
            judged: observed.roster.is_some(),
            thing: observed.things.contains(device).then(|| device.to_owned()),
            rotating,
            revoked_mark: observed.revoked_marks.get(device),
            newest_connected,
            active,
            pending,
        }
    }

    fn known(&self, c: &Listed) -> Option<&'a Known> {
        self.observed.known.get(c.id.as_str())
    }

    /// The newest ACTIVE certificate, when there is one.
    fn newest(&self) -> Option<&'a Listed> {
        self.active.last().copied()
    }
}

/// Every connection the presence table records for `device`.
fn connections<'a>(observed: &'a Observed, device: &str) -> &'a [activator::presence::Connection] {
    observed
        .presence
        .as_ref()
        .and_then(|p| p.get(device))
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The first 12 characters of a certificate id, as the reasons show it.
fn short(id: &CertificateId) -> String {
    id.as_str()[..12.min(id.as_str().len())].to_owned()
}

fn classify_device(
    observed: &Observed,
    device: &str,
    certs: &[&Listed],
    now: OffsetDateTime,
    window: time::Duration,
) -> DeviceStatus {
    let facts = Facts::read(observed, device, certs, now);
    let (state, reason) = urgent(&facts, now, window).unwrap_or_else(|| settled(&facts));
    let rows: Vec<CertificateRow> = certs
        .iter()
        .map(|c| CertificateRow {
            certificate_id: c.id.to_string(),
            status: c.status.as_str().to_owned(),
            not_after: facts.known(c).and_then(|k| k.not_after).map(rfc3339),
            created: c.created,
        })
        .collect();
    DeviceStatus {
        device_id: device.to_owned(),
        state,
        certificates: rows,
        fleet_member: facts.standing == Some(Standing::Active),
        last_connected: activator::presence::last_connected(connections(observed, device)).cloned(),
        newest_connected: facts.newest_connected,
        thing: facts.thing,
        reason,
    }
}

/// The states that ask something of the operator, in order of urgency: drifted, inactive,
/// duplicate, held, expiring, pending. `None` when none applies.
fn urgent(f: &Facts<'_>, now: OffsetDateTime, window: time::Duration) -> Option<(State, String)> {
    let (active, pending) = (&f.active, &f.pending);
    if let (Some(at), false) = (f.revoked_mark, active.is_empty()) {
        let reason = format!(
            "cut off by jitr revoke at {at}, yet {} ACTIVE certificate(s)",
            active.len()
        );
        return Some((State::Drifted, reason));
    }
    if !active.is_empty() && f.judged && f.standing.is_none() {
        let reason = format!(
            "{} ACTIVE certificate(s), but the device is not in the fleet",
            active.len()
        );
        return Some((State::Drifted, reason));
    }
    if f.standing == Some(Standing::Inactive) && !(active.is_empty() && pending.is_empty()) {
        let reason = "inactive in the fleet (paused): its certificates are held as they are";
        return Some((State::Inactive, reason.to_owned()));
    }
    if active.len() >= 2 && !f.rotating {
        return Some((State::Duplicate, duplicate_reason(f)));
    }
    if let (Some(waiting), Some(live)) = (pending.first(), active.first()) {
        let reason = format!(
            "{} waits for approval (jitr approve) beside ACTIVE {}",
            short(&waiting.id),
            short(&live.id)
        );
        return Some((State::Held, reason));
    }
    // In a rotation only the newest counts: the ones it replaces are on their way out.
    let counted = match f.rotating {
        true => &active[active.len() - 1..],
        false => &active[..],
    };
    let expiring = counted.iter().find_map(|c| {
        f.known(c)
            .and_then(|k| k.not_after)
            .filter(|end| *end <= now + window)
            .map(|end| (c, end))
    });
    if let Some((c, end)) = expiring {
        return Some((
            State::Expiring,
            format!("{} ends {}", short(&c.id), rfc3339(end)),
        ));
    }
    pending.first().map(|waiting| {
        let reason = format!(
            "{} is PENDING_ACTIVATION: the device's next connect or a sweep decides",
            short(&waiting.id)
        );
        (State::Pending, reason)
    })
}

/// Two or more ACTIVE certificates outside a rotation: how many, how many attached, and
/// whether the newest has proven itself by connecting.
fn duplicate_reason(f: &Facts<'_>) -> String {
    let attached = f
        .observed
        .principals
        .get(f.device)
        .map(|ids| {
            f.active
                .iter()
                .filter(|c| ids.iter().any(|i| i == c.id.as_str()))
                .count()
        })
        .map_or(String::new(), |n| format!(", {n} attached to the Thing"));
    let proof = match f.newest_connected {
        true => "it has connected",
        false => "held for the operator: no record that it has connected",
    };
    let newest = f.newest().map(|c| short(&c.id)).unwrap_or_default();
    format!(
        "{} ACTIVE certificates{attached}: the newest ({newest}) replaces the others; {proof}",
        f.active.len()
    )
}

/// The states that need nothing unless something is amiss: revoked, orphan, not-connected,
/// active.
fn settled(f: &Facts<'_>) -> (State, String) {
    let active = &f.active;
    if let (Some(at), true) = (f.revoked_mark, active.is_empty()) {
        let reason = format!("cut off by jitr revoke at {at} (jitr approve --device lifts it)");
        return (State::Revoked, reason);
    }
    let no_principals = f
        .observed
        .principals
        .get(f.device)
        .is_some_and(|ids| ids.is_empty());
    if f.thing.is_some() && !f.observed.other_principals.contains_key(f.device) && no_principals {
        return (
            State::Orphan,
            "a Thing with no certificate attached".to_owned(),
        );
    }
    if let (Some(c), None) = (active.first(), &f.thing) {
        let elsewhere = f
            .observed
            .certificate_things
            .get(c.id.as_str())
            .filter(|t| !t.is_empty())
            .map_or(String::new(), |t| {
                format!(" (attached to {})", t.join(", "))
            });
        let reason = format!(
            "ACTIVE certificate {} with no Thing{elsewhere}",
            short(&c.id)
        );
        return (State::Orphan, reason);
    }
    if f.certs.is_empty() {
        let why = match f.standing {
            Some(Standing::Active) => "in the fleet, nothing registered in AWS IoT yet",
            Some(Standing::Inactive) => "inactive in the fleet, nothing registered in AWS IoT",
            None => "in the manifest, nothing registered in AWS IoT yet",
        };
        return (State::NotConnected, why.to_owned());
    }
    match (active.is_empty(), f.rotating, f.newest()) {
        (true, _, _) => (
            State::Revoked,
            "every certificate is REVOKED or INACTIVE".to_owned(),
        ),
        (false, true, Some(newest)) => (
            State::Active,
            format!(
                "rotating: {} replaces the old certificate(s) until its grace ends",
                short(&newest.id)
            ),
        ),
        _ => (State::Active, String::new()),
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
