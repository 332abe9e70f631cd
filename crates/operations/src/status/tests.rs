//! Classification: one device in each state, and the fixes each one gets.

use super::*;

fn id(n: u8) -> CertificateId {
    CertificateId::parse(&format!("{n:02x}").repeat(32)).unwrap()
}

fn cert(n: u8, status: CertificateStatus, created: i64) -> Listed {
    Listed {
        id: id(n),
        status,
        created: Some(created),
    }
}

struct World {
    observed: Observed,
    now: OffsetDateTime,
}

impl World {
    fn new() -> World {
        World {
            observed: Observed::default(),
            now: OffsetDateTime::now_utc(),
        }
    }

    /// A certificate of `device`, valid for `days` more days, issued `age_days` ago.
    fn cert(&mut self, device: &str, n: u8, status: CertificateStatus, days: i64, age_days: i64) {
        self.observed
            .certificates
            .push(cert(n, status, 1_000 - age_days));
        self.observed.known.insert(
            id(n).to_string(),
            Known {
                device: device.to_owned(),
                not_before: Some(self.now - time::Duration::days(age_days)),
                not_after: Some(self.now + time::Duration::days(days)),
                supersedes: None,
                retire_after: None,
            },
        );
    }

    fn thing(&mut self, device: &str, attached: &[u8]) {
        self.observed.things.insert(device.to_owned());
        self.observed.principals.insert(
            device.to_owned(),
            attached.iter().map(|n| id(*n).to_string()).collect(),
        );
    }

    fn connected(&mut self, device: &str, n: u8, at: i64) {
        self.observed
            .presence
            .get_or_insert_with(HashMap::new)
            .entry(device.to_owned())
            .or_default()
            .push(activator::presence::Connection {
                certificate_id: id(n).to_string(),
                connected_at: at,
            });
    }

    fn member(&mut self, device: &str, standing: Standing) {
        self.observed
            .roster
            .get_or_insert_with(HashMap::new)
            .insert(device.to_owned(), standing);
    }

    fn states(&self) -> BTreeMap<String, (State, String)> {
        classify(&self.observed, self.now, time::Duration::days(30))
            .into_iter()
            .map(|r| (r.device_id, (r.state, r.reason)))
            .collect()
    }
}

use CertificateStatus::{Active, Inactive, PendingActivation, Revoked};

/// One device in each state.
fn every_state() -> World {
    let mut w = World::new();
    // active
    w.cert("active", 1, Active, 365, 10);
    w.thing("active", &[1]);
    w.member("active", Standing::Active);
    // drifted: left the fleet, and one inactive in it
    w.cert("drifted", 2, Active, 365, 10);
    w.thing("drifted", &[2]);
    w.cert("sleeping", 3, Active, 365, 10);
    w.thing("sleeping", &[3]);
    w.member("sleeping", Standing::Inactive);
    // duplicate
    w.cert("dup", 4, Active, 365, 100);
    w.cert("dup", 5, Active, 365, 1);
    w.thing("dup", &[4, 5]);
    w.member("dup", Standing::Active);
    // held
    w.cert("held", 6, Active, 365, 100);
    w.cert("held", 7, PendingActivation, 365, 1);
    w.thing("held", &[6]);
    w.member("held", Standing::Active);
    // expiring
    w.cert("old", 8, Active, 10, 300);
    w.thing("old", &[8]);
    w.member("old", Standing::Active);
    // pending
    w.cert("new", 9, PendingActivation, 365, 0);
    w.member("new", Standing::Active);
    // orphan: a Thing alone; an ACTIVE certificate without its Thing
    w.thing("bare", &[]);
    w.member("bare", Standing::Active);
    w.cert("lost", 10, Active, 365, 10);
    w.member("lost", Standing::Active);
    // not-connected: in the fleet, and in the manifest only
    w.member("waiting", Standing::Active);
    w.observed.manifest_devices.insert("shelved".into());
    // revoked
    w.cert("gone", 11, Revoked, 365, 10);
    w.cert("gone", 12, Inactive, 365, 5);
    w.member("gone", Standing::Active);
    w
}

#[test]
fn each_device_gets_its_most_urgent_state() {
    let w = every_state();
    let states = w.states();
    let expect = [
        ("active", State::Active),
        ("drifted", State::Drifted),
        ("sleeping", State::Inactive),
        ("dup", State::Duplicate),
        ("held", State::Held),
        ("old", State::Expiring),
        ("new", State::Pending),
        ("bare", State::Orphan),
        ("lost", State::Orphan),
        ("waiting", State::NotConnected),
        ("shelved", State::NotConnected),
        ("gone", State::Revoked),
    ];
    for (device, state) in expect {
        assert_eq!(states[device].0, state, "{device}: {:?}", states[device]);
    }
    assert_eq!(states.len(), expect.len());
    assert!(states["sleeping"].1.contains("inactive in the fleet"));
    assert!(states["drifted"].1.contains("not in the fleet"));
    assert!(states["dup"].1.contains("2 attached to the Thing"));
    assert!(states["lost"].1.contains("with no Thing"));
    // Most urgent first.
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    assert!(rows.windows(2).all(|p| p[0].state <= p[1].state));
    assert_eq!(summary(&rows)[&State::Drifted], 1);
    assert_eq!(summary(&rows)[&State::Inactive], 1);
}

#[test]
fn a_rotation_in_its_grace_is_active_and_past_it_a_duplicate() {
    let mut w = World::new();
    w.cert("dev", 1, Active, 365, 100);
    w.cert("dev", 2, Active, 365, 1);
    w.thing("dev", &[1, 2]);
    w.member("dev", Standing::Active);
    let new = w.observed.known.get_mut(&id(2).to_string()).unwrap();
    new.supersedes = Some(id(1).to_string());
    new.retire_after = Some(w.now + time::Duration::hours(2));
    assert_eq!(w.states()["dev"].0, State::Active);
    assert!(w.states()["dev"].1.contains("rotating"));
    w.observed
        .known
        .get_mut(&id(2).to_string())
        .unwrap()
        .retire_after = Some(w.now - time::Duration::hours(1));
    assert_eq!(w.states()["dev"].0, State::Duplicate);
}

#[test]
fn fixes_revoke_what_drifted_or_is_duplicated_and_clear_orphans_only() {
    let mut w = every_state();
    w.connected("dup", 5, 1_000);
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    let fixes = plan_fixes(&rows, true);
    let planned: BTreeSet<(String, FixAction)> =
        fixes.into_iter().map(|f| (f.device_id, f.action)).collect();
    let revoke = |n: u8| FixAction::Revoke {
        certificate_id: id(n).to_string(),
    };
    let want: BTreeSet<(String, FixAction)> = [
        ("drifted".to_owned(), revoke(2)),
        (
            "drifted".to_owned(),
            FixAction::DeleteThing {
                thing: "drifted".into(),
            },
        ),
        ("dup".to_owned(), revoke(4)), // the older one; 5 stays
        (
            "bare".to_owned(),
            FixAction::DeleteThing {
                thing: "bare".into(),
            },
        ),
        (
            "lost".to_owned(),
            FixAction::Reattach {
                certificate_id: id(10).to_string(),
                thing: "lost".into(),
            },
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(planned, want);
}

#[test]
fn duplicates_are_fixed_only_once_the_newest_has_connected_and_a_rotation_expires_on_its_newest() {
    let mut w = every_state();
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    assert!(!plan_fixes(&rows, true).iter().any(|f| f.device_id == "dup"));
    let dup = rows.iter().find(|r| r.device_id == "dup").unwrap();
    assert!(
        dup.reason.contains("held for the operator"),
        "{}",
        dup.reason
    );
    // The old one connecting proves nothing about the new one.
    w.connected("dup", 4, 2_000);
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    assert!(!plan_fixes(&rows, true).iter().any(|f| f.device_id == "dup"));
    let dup = rows.iter().find(|r| r.device_id == "dup").unwrap();
    assert_eq!(
        dup.last_connected.as_ref().unwrap().certificate_id,
        id(4).to_string()
    );
    w.connected("dup", 5, 1_500);
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    let dup_fixes: Vec<_> = plan_fixes(&rows, true)
        .into_iter()
        .filter(|f| f.device_id == "dup")
        .collect();
    assert_eq!(dup_fixes.len(), 1);
    assert_eq!(
        dup_fixes[0].action,
        FixAction::Revoke {
            certificate_id: id(4).to_string()
        }
    );
    // A rotation of an expiring certificate: the old one ends soon, the new one does not.
    let mut w = World::new();
    w.cert("dev", 1, Active, 5, 300);
    w.cert("dev", 2, Active, 365, 0);
    w.thing("dev", &[1, 2]);
    w.member("dev", Standing::Active);
    let new = w.observed.known.get_mut(&id(2).to_string()).unwrap();
    new.supersedes = Some(id(1).to_string());
    new.retire_after = Some(w.now + time::Duration::hours(2));
    assert_eq!(w.states()["dev"].0, State::Active);
}

#[test]
fn things_are_deleted_only_when_asked_and_never_one_holding_another_principal_or_the_mark() {
    let mut w = every_state();
    // A Thing whose only principal is a Cognito identity is not empty.
    w.thing("shared", &[]);
    w.member("shared", Standing::Active);
    w.observed.other_principals.insert("shared".into(), 1);
    // A device cut off by jitr revoke: its Thing holds the mark.
    w.thing("cut", &[]);
    w.member("cut", Standing::Active);
    w.observed
        .revoked_marks
        .insert("cut".into(), "2026-12-01T00:00:00Z".into());
    let states = w.states();
    assert_ne!(states["shared"].0, State::Orphan, "{:?}", states["shared"]);
    assert_eq!(states["cut"].0, State::Revoked, "{:?}", states["cut"]);
    assert!(states["cut"].1.contains("jitr approve --device"));
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    let deletes = |delete_things: bool| -> BTreeSet<String> {
        plan_fixes(&rows, delete_things)
            .into_iter()
            .filter_map(|f| match f.action {
                FixAction::DeleteThing { thing } => Some(thing),
                _ => None,
            })
            .collect()
    };
    assert!(deletes(false).is_empty());
    let asked = deletes(true);
    assert!(
        asked.contains("bare") && asked.contains("drifted"),
        "{asked:?}"
    );
    assert!(!asked.contains("shared") && !asked.contains("cut") && !asked.contains("sleeping"));
}

#[test]
fn an_inactive_device_is_held_never_revoked() {
    let w = every_state();
    let rows = classify(&w.observed, w.now, time::Duration::days(30));
    let sleeping = rows.iter().find(|r| r.device_id == "sleeping").unwrap();
    assert_eq!(sleeping.state, State::Inactive);
    assert!(sleeping.state.is_fine());
    assert!(!plan_fixes(&rows, true)
        .iter()
        .any(|f| f.device_id == "sleeping"));
}

#[test]
fn the_ownership_rule() {
    use activator::ownership::{fleet_attribute, FleetMark};
    use activator::ownership::{Ownership, REVOKED_ATTRIBUTE};
    use iot::ThingSpec;
    let thing = |attributes: Vec<(String, String)>, thing_type: Option<&str>| ThingSpec {
        name: "warehouse-door-sensor-7".into(),
        thing_type: thing_type.map(str::to_owned),
        attributes,
    };
    let ours = Ownership {
        fleet: Some(FleetMark::Balena(42)),
        thing_type: Some("jitr-device".into()),
    };
    let foreign = thing(vec![("app".into(), "facilities".into())], None);
    assert!(!ours.owns(&foreign, false));
    assert!(ours.owns(&foreign, true), "a device jitr knows by name");
    assert!(ours.owns(
        &thing(vec![fleet_attribute(FleetMark::Balena(42))], None),
        false
    ));
    assert!(!ours.owns(
        &thing(vec![fleet_attribute(FleetMark::Balena(43))], None),
        false
    ));
    assert!(!ours.owns(
        &thing(vec![("fleet".into(), "balena-fleet-x".into())], None),
        false
    ));
    assert!(ours.owns(&thing(Vec::new(), Some("jitr-device")), false));
    assert!(!ours.owns(&thing(Vec::new(), Some("door-sensor")), false));
    assert!(ours.owns(
        &thing(vec![(REVOKED_ATTRIBUTE.into(), "t".into())], None),
        false
    ));
    // With no fleet known, any fleet jitr marks.
    let any = Ownership::default();
    assert!(any.owns(
        &thing(vec![fleet_attribute(FleetMark::Balena(43))], None),
        false
    ));
    assert!(any.owns(
        &thing(vec![fleet_attribute(FleetMark::Allowlist)], None),
        false
    ));
    assert!(!any.owns(
        &thing(vec![("fleet".into(), "facilities".into())], None),
        false
    ));
    assert!(activator::ownership::is_certificate_arn(
        "arn:aws:iot:us-east-1:123456789012:cert/abc"
    ));
    assert!(!activator::ownership::is_certificate_arn(
        "us-east-1:1f2e3d4c-0000-0000-0000-000000000000"
    ));
}
