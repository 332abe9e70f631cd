//! The balena client against the fake balena API: fleet-pinned lookups, membership and its
//! proof of visibility, variable upserts, and the answers it must not trust.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::time::Duration;

use balena::{ApiKey, Client, Device, Error, Fleet, FleetId, FleetMembership, Scope, Upserted};
use factory_ca::{DeviceId, IdFormat};
use testkit::balena::{FakeBalena, Fault};
use tokio::time::Instant;

const KEY: &str = "test-balena-key";
const FLEET: u64 = 1234567;
const OTHER_FLEET: u64 = 7654321;

fn uuid(n: u32) -> DeviceId {
    DeviceId::parse(&format!("{n:032x}"), IdFormat::BalenaUuid).unwrap()
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

async fn fake() -> FakeBalena {
    let balena = tokio::task::spawn_blocking(|| FakeBalena::start(KEY))
        .await
        .unwrap()
        .unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    balena.add_fleet(OTHER_FLEET, "acme/other");
    balena
}

fn fleet(balena: &FakeBalena, key: &str) -> Fleet {
    let client = Client::new(&balena.url(), ApiKey::new(key.into())).unwrap();
    Fleet::new(client, FleetId::parse(&FLEET.to_string()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_pinned_to_the_fleet_and_variables_upserted() {
    let balena = fake().await;
    let numeric = balena.add_device(FLEET, uuid(5).as_str(), true);
    // The same key sees a device of another fleet: never found through this fleet.
    balena.add_device(OTHER_FLEET, uuid(6).as_str(), true);
    let fleet = fleet(&balena, KEY);

    let device = fleet.device(&uuid(5), deadline()).await.unwrap().unwrap();
    assert_eq!(
        device,
        Device {
            id: numeric,
            uuid: uuid(5),
            is_active: true
        }
    );
    assert_eq!(fleet.device(&uuid(6), deadline()).await.unwrap(), None);
    let lookup = balena
        .requests()
        .into_iter()
        .find(|r| r.path == "/v7/device")
        .unwrap();
    assert_eq!(
        lookup.query,
        format!(
            "$select=id,uuid,is_active,belongs_to__application&$filter=uuid eq '{}' and belongs_to__application eq {FLEET}",
            uuid(5)
        )
    );

    let set = |value: &'static str| {
        fleet.set_env_var(&device, &Scope::Device, "AWS_CERT", value, deadline())
    };
    assert_eq!(set("one").await.unwrap(), Upserted::Created);
    assert_eq!(set("two").await.unwrap(), Upserted::Updated);
    assert_eq!(
        balena.env_vars(numeric),
        vec![("AWS_CERT".to_owned(), "two".to_owned())]
    );

    let refused = fleet_with_key(&balena, "wrong");
    let err = refused
        .set_env_var(&device, &Scope::Device, "AWS_CERT", "x", deadline())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "balena API refused the API key (HTTP 401)");
}

fn fleet_with_key(balena: &FakeBalena, key: &str) -> Fleet {
    fleet(balena, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_answer_is_not_a_member_only_while_the_key_sees_the_fleet() {
    let balena = fake().await;
    let member = balena.add_device(FLEET, uuid(1).as_str(), true);
    balena.add_device(FLEET, uuid(2).as_str(), false);
    let fleet = fleet(&balena, KEY);

    assert!(matches!(
        fleet.membership(&uuid(1), deadline()).await.unwrap(),
        FleetMembership::Member(Device { id, .. }) if id == member
    ));
    assert!(matches!(
        fleet.membership(&uuid(2), deadline()).await.unwrap(),
        FleetMembership::Inactive(_)
    ));
    assert_eq!(
        fleet.membership(&uuid(3), deadline()).await.unwrap(),
        FleetMembership::NotMember
    );

    // The key loses sight of the fleet in a warm process: every member now looks absent, and
    // that must never read as "not a member".
    balena.hide_fleet_from_key(FLEET);
    for device in [uuid(1), uuid(3)] {
        let err = fleet.membership(&device, deadline()).await.unwrap_err();
        assert!(
            matches!(err, Error::FleetNotVisible { fleet } if fleet == FLEET),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_too_large_or_too_slow_are_errors_not_verdicts() {
    let balena = fake().await;
    balena.add_device(FLEET, uuid(1).as_str(), true);
    let client = Client::new(&balena.url(), ApiKey::new(KEY.into()))
        .unwrap()
        .with_request_timeout(Duration::from_millis(300));
    let fleet = Fleet::new(client, FleetId::parse(&FLEET.to_string()).unwrap());

    balena.set_fault(Fault::Body {
        bytes: balena::MAX_BODY + 1,
    });
    let err = fleet.membership(&uuid(1), deadline()).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");

    balena.set_fault(Fault::SlowBody(Duration::from_secs(2)));
    let started = std::time::Instant::now();
    let err = fleet.membership(&uuid(1), deadline()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));

    balena.set_fault(Fault::ForeignRow { fleet: OTHER_FLEET });
    let err = fleet.membership(&uuid(1), deadline()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongFleet {
                fleet: FLEET,
                found: OTHER_FLEET
            }
        ),
        "{err}"
    );
}

#[test]
fn the_key_never_travels_in_the_clear_beyond_loopback() {
    let err = Client::new("http://api.balena-cloud.com", ApiKey::new(KEY.into())).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
    assert!(Client::new("http://127.0.0.1:1", ApiKey::new(KEY.into())).is_ok());
}

/// A device deleted while jitr writes to it: balena answers the write 401, as it answers a
/// refused key. The client looks again with the same key and says which it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_deleted_mid_write_is_reported_gone_not_as_a_refused_key() {
    let balena = fake().await;
    let id = balena.add_device(FLEET, uuid(1).as_str(), true);
    let fleet = fleet(&balena, KEY);
    let FleetMembership::Member(device) = fleet.membership(&uuid(1), deadline()).await.unwrap()
    else {
        panic!("a member");
    };
    balena.remove_device(id);
    let err = fleet
        .set_env_var(&device, &Scope::Device, "AWS_CERT", "x", deadline())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeviceGone { .. }), "{err:?}");
    assert!(err.to_string().contains("no longer in the fleet"), "{err}");
    let err = fleet
        .set_tag(&device, "jitr", "x", deadline())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeviceGone { .. }), "{err:?}");

    // A key the API refuses stays a refused key, device or not.
    let id = balena.add_device(FLEET, uuid(2).as_str(), true);
    let other = Device {
        id,
        uuid: uuid(2),
        is_active: true,
    };
    let err = fleet_with_key(&balena, "wrong-key")
        .set_env_var(&other, &Scope::Device, "AWS_CERT", "x", deadline())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unauthorized { status: 401 }),
        "{err:?}"
    );
}
