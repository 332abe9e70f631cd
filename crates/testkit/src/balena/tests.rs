//! The fake balena API answers as the real one does, errors included.

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::http::{HttpRequest, HttpResponse};

const KEY: &str = "test-api-key";
const FLEET: u64 = 1234567;
const UUID: &str = "0123456789abcdef0123456789abcdef";

/// A fake with one fleet holding one active device; returns the device id too.
fn fake() -> (FakeBalena, u64) {
    let fake = FakeBalena::start(KEY).unwrap();
    fake.add_fleet(FLEET, "myorg/my-fleet");
    let device = fake.add_device(FLEET, UUID, true);
    (fake, device)
}

fn send(request: HttpRequest) -> HttpResponse {
    request
        .header("Authorization", &format!("Bearer {KEY}"))
        .send()
        .unwrap()
}

fn get(fake: &FakeBalena, target: &str) -> HttpResponse {
    send(HttpRequest::get(&format!("{}{target}", fake.url())))
}

/// The fleet check exactly as a client percent-encodes it (`+` or `%20` for spaces).
fn device_query(uuid: &str, fleet: u64, space: &str) -> String {
    format!(
        "/v7/device?%24select=id%2Cuuid%2Cis_active&%24filter=uuid{space}eq{space}%27{uuid}%27\
         {space}and{space}belongs_to__application{space}eq{space}{fleet}"
    )
}

#[test]
fn device_query_answers_selected_fields_with_metadata() {
    let (fake, device) = fake();
    for space in ["+", "%20"] {
        let response = get(&fake, &device_query(UUID, FLEET, space));
        assert_eq!(response.status, 200);
        assert_eq!(
            response.json().unwrap(),
            json!({"d": [{
                "id": device,
                "uuid": UUID,
                "is_active": true,
                "__metadata": {"uri": format!("/resin/device(@id)?@id={device}")}
            }]})
        );
    }
    let recorded = fake.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].path, "/v7/device");
    assert_eq!(
        recorded[0].query,
        format!(
            "$select=id,uuid,is_active&$filter=uuid eq '{UUID}' and belongs_to__application eq {FLEET}"
        )
    );
    assert!(recorded[0].has_authorization && recorded[0].authorized);
}

#[test]
fn device_query_is_empty_for_another_fleet_or_an_unknown_uuid() {
    let (fake, _) = fake();
    fake.add_fleet(7, "myorg/other");
    let other = "fedcba9876543210fedcba9876543210";
    fake.add_device(7, other, true);
    for target in [
        device_query(other, FLEET, "+"),
        device_query("ffffffffffffffffffffffffffffffff", FLEET, "+"),
        device_query(UUID, 7, "%20"),
    ] {
        let response = get(&fake, &target);
        assert_eq!(response.status, 200);
        assert_eq!(response.json().unwrap(), json!({"d": []}), "{target}");
    }
}

#[test]
fn inactive_devices_are_answered_as_inactive() {
    let (fake, device) = fake();
    fake.set_device_active(device, false);
    let body = get(&fake, &device_query(UUID, FLEET, "+")).json().unwrap();
    assert_eq!(body["d"][0]["is_active"], false);
}

#[test]
fn application_query_answers_the_fleet() {
    let (fake, _) = fake();
    let response = get(&fake, &format!("/v7/application({FLEET})?$select=id,slug"));
    assert_eq!(response.status, 200);
    assert_eq!(
        response.json().unwrap(),
        json!({"d": [{
            "id": FLEET,
            "slug": "myorg/my-fleet",
            "__metadata": {"uri": format!("/resin/application(@id)?@id={FLEET}")}
        }]})
    );
    let missing = get(&fake, "/v7/application(42)?$select=id");
    assert_eq!(missing.json().unwrap(), json!({"d": []}));
}

#[test]
fn a_hidden_fleet_looks_empty_to_the_key() {
    let (fake, device) = fake();
    fake.hide_fleet_from_key(FLEET);
    let app = get(&fake, &format!("/v7/application({FLEET})?$select=id"));
    assert_eq!((app.status, app.json().unwrap()), (200, json!({"d": []})));
    let dev = get(&fake, &device_query(UUID, FLEET, "+"));
    assert_eq!((dev.status, dev.json().unwrap()), (200, json!({"d": []})));
    let post = send(
        HttpRequest::post(&format!("{}/v7/device_tag", fake.url()))
            .json(&json!({"device": device, "tag_key": "k", "value": "v"})),
    );
    assert_eq!((post.status, post.text().as_str()), (401, "Unauthorized"));
}

#[test]
fn requests_without_the_key_get_401_unauthorized() {
    let (fake, _) = fake();
    let url = format!("{}{}", fake.url(), device_query(UUID, FLEET, "+"));
    let anonymous = HttpRequest::get(&url).send().unwrap();
    assert_eq!(
        (anonymous.status, anonymous.text().as_str()),
        (401, "Unauthorized")
    );
    let wrong = HttpRequest::get(&url)
        .header("Authorization", "Bearer not-the-key")
        .send()
        .unwrap();
    assert_eq!((wrong.status, wrong.text().as_str()), (401, "Unauthorized"));

    let recorded = fake.requests();
    assert!(!recorded[0].has_authorization && !recorded[0].authorized);
    assert!(recorded[1].has_authorization && !recorded[1].authorized);
    assert!(!format!("{recorded:?}{fake:?}").contains("not-the-key"));
    assert!(!format!("{fake:?}").contains(KEY));
}

#[test]
fn unparsable_filters_and_unmodelled_options_get_400_plain_text() {
    let (fake, _) = fake();
    for target in [
        "/v7/device?$filter=uuid%20eq%20%27open",
        "/v7/device?$filter=uuid+eq+'a'+or+id+eq+1",
        "/v7/device?$filter=nope+eq+1",
        "/v7/device?$select=id,nope",
        "/v7/device?$expand=belongs_to__application",
        "/v7/application(abc)",
    ] {
        let response = get(&fake, target);
        assert_eq!(response.status, 400, "{target}: {}", response.text());
        assert!(response
            .header("content-type")
            .unwrap()
            .starts_with("text/plain"));
        assert!(!response.text().is_empty());
    }
    assert_eq!(
        get(&fake, "/v7/device?$filter=uuid%20eq%20'a").text(),
        "Malformed url"
    );
    assert_eq!(get(&fake, "/v7/nothing").status, 404);
}

#[test]
fn env_vars_are_created_conflict_updated_and_listed() {
    let (fake, device) = fake();
    let url = format!("{}/v7/device_environment_variable", fake.url());
    let create = |value: &str| {
        send(
            HttpRequest::post(&url)
                .json(&json!({"device": device, "name": "AWS_CERT", "value": value})),
        )
    };

    let created = create("first");
    assert_eq!(created.status, 201, "{}", created.text());
    let row = created.json().unwrap();
    let id = row["id"].as_u64().unwrap();
    assert_eq!(
        row,
        json!({
            "id": id,
            "device": {"__id": device},
            "name": "AWS_CERT",
            "value": "first",
            "__metadata": {"uri": format!("/resin/device_environment_variable(@id)?@id={id}")}
        })
    );

    let duplicate = create("second");
    assert_eq!(duplicate.status, 409);
    assert!(duplicate.text().contains("nique"), "{}", duplicate.text());

    let patched = send(
        HttpRequest::patch(&format!(
            "{url}?$filter=device%20eq%20{device}%20and%20name%20eq%20%27AWS_CERT%27"
        ))
        .json(&json!({"value": "second"})),
    );
    assert_eq!((patched.status, patched.text().as_str()), (200, "OK"));
    assert_eq!(
        fake.env_vars(device),
        vec![("AWS_CERT".to_owned(), "second".to_owned())]
    );

    let listed = get(
        &fake,
        &format!("/v7/device_environment_variable?$filter=device%20eq%20{device}"),
    );
    let listed = listed.json().unwrap();
    assert_eq!(listed["d"].as_array().unwrap().len(), 1);
    assert_eq!(listed["d"][0]["value"], "second");
    assert_eq!(listed["d"][0]["device"], json!({"__id": device}));
}

#[test]
fn env_var_posts_are_validated() {
    let (fake, device) = fake();
    let url = format!("{}/v7/device_environment_variable", fake.url());
    for body in [
        json!({"device": device, "name": "1BAD", "value": "v"}),
        json!({"device": device, "name": "BALENA_X", "value": "v"}),
        json!({"device": device, "name": "OK"}),
    ] {
        let response = send(HttpRequest::post(&url).json(&body));
        assert_eq!(response.status, 400, "{body}: {}", response.text());
    }
    // A device that does not exist: 401, as the real API answers (not pinejs's 400).
    let body = json!({"device": 1, "name": "OK", "value": "v"});
    let response = send(HttpRequest::post(&url).json(&body));
    assert_eq!(response.status, 401, "{body}: {}", response.text());
    assert!(fake.env_vars(device).is_empty());
}

#[test]
fn tags_are_created_conflict_and_updated() {
    let (fake, device) = fake();
    let url = format!("{}/v7/device_tag", fake.url());
    let create = || {
        send(
            HttpRequest::post(&url)
                .json(&json!({"device": device, "tag_key": "aws-iot thing", "value": "a"})),
        )
    };
    let created = create();
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json().unwrap()["tag_key"], "aws-iot thing");
    assert_eq!(created.json().unwrap()["device"], json!({"__id": device}));
    assert_eq!(create().status, 409);

    let patched = send(
        HttpRequest::patch(&format!(
            "{url}?$filter=device+eq+{device}+and+tag_key+eq+'aws-iot+thing'"
        ))
        .json(&json!({"value": "b"})),
    );
    assert_eq!((patched.status, patched.text().as_str()), (200, "OK"));
    assert_eq!(
        fake.tags(device),
        vec![("aws-iot thing".to_owned(), "b".to_owned())]
    );
}

#[test]
fn status_faults_answer_until_cleared() {
    let (fake, _) = fake();
    fake.set_fault(Fault::Status(503));
    for _ in 0..2 {
        let response = get(&fake, &device_query(UUID, FLEET, "+"));
        assert_eq!(
            (response.status, response.text().as_str()),
            (503, "Service Unavailable")
        );
    }
    fake.set_fault(Fault::Status(401));
    assert_eq!(get(&fake, "/v7/application(1)").text(), "Unauthorized");
    fake.set_fault(Fault::None);
    assert_eq!(get(&fake, &device_query(UUID, FLEET, "+")).status, 200);
}

#[test]
fn write_faults_refuse_posts_and_patches_but_serve_reads() {
    let (fake, device) = fake();
    fake.set_fault(Fault::WriteStatus(401));
    let url = format!("{}/v7/device_tag", fake.url());
    let body = json!({"device": device, "tag_key": "k", "value": "v"});
    let response = send(HttpRequest::post(&url).json(&body));
    assert_eq!(
        (response.status, response.text().as_str()),
        (401, "Unauthorized")
    );
    let response = send(
        HttpRequest::patch(&format!("{url}?$filter=device%20eq%20{device}"))
            .json(&json!({"value": "w"})),
    );
    assert_eq!(response.status, 401);
    assert_eq!(get(&fake, &device_query(UUID, FLEET, "+")).status, 200);
    assert!(fake.tags(device).is_empty());
}

#[test]
fn rate_limiting_refuses_the_next_requests_then_serves() {
    let (fake, _) = fake();
    fake.set_fault(Fault::RateLimited {
        retry_after_secs: 3,
        times: 2,
    });
    for _ in 0..2 {
        let response = get(&fake, &device_query(UUID, FLEET, "+"));
        assert_eq!(response.status, 429);
        assert_eq!(response.header("retry-after"), Some("3"));
        assert_eq!(response.text(), "Too Many Requests");
    }
    assert_eq!(get(&fake, &device_query(UUID, FLEET, "+")).status, 200);
    assert_eq!(fake.requests().len(), 3);
}

#[test]
fn delays_slow_answers_down() {
    let (fake, _) = fake();
    fake.set_fault(Fault::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(get(&fake, &device_query(UUID, FLEET, "+")).status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn dropping_the_fake_closes_its_port() {
    let (fake, _) = fake();
    let addr = fake.server.addr();
    drop(fake);
    assert!(crate::proc::port_is_closed(addr));
}
