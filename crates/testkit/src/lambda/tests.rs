//! The Runtime API emulator against a hand-written runtime client.

use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::*;
use crate::http::{HttpRequest, HttpResponse};

const WAIT: Duration = Duration::from_secs(10);

/// Plays the runtime: one `next` poll.
fn poll_next(emulator: &RuntimeEmulator) -> HttpResponse {
    let response = HttpRequest::get(&format!(
        "http://{}/2018-06-01/runtime/invocation/next",
        emulator.address()
    ))
    .timeout(WAIT)
    .send()
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    response
}

/// Plays the runtime: posts `body` to `invocation/{id}/{kind}`.
fn post_result(emulator: &RuntimeEmulator, id: &str, kind: &str, body: &Value) -> HttpResponse {
    HttpRequest::post(&format!(
        "http://{}/2018-06-01/runtime/invocation/{id}/{kind}",
        emulator.address()
    ))
    .json(body)
    .send()
    .unwrap()
}

fn request_id(response: &HttpResponse) -> String {
    response
        .header("lambda-runtime-aws-request-id")
        .unwrap()
        .to_owned()
}

#[test]
fn hands_out_events_and_returns_responses_and_errors() {
    let emulator = RuntimeEmulator::start().unwrap();
    assert_eq!(emulator.first_poll_at(), None);
    thread::scope(|s| {
        let first = s.spawn(|| emulator.invoke(json!({"n": 1}), WAIT));
        let next = poll_next(&emulator);
        assert!(emulator.first_poll_at().is_some());
        assert_eq!(next.json().unwrap(), json!({"n": 1}));
        assert_eq!(
            next.header("lambda-runtime-invoked-function-arn"),
            Some(FUNCTION_ARN)
        );
        assert!(next
            .header("lambda-runtime-trace-id")
            .unwrap()
            .starts_with("Root=1-"));
        let deadline: u128 = next
            .header("lambda-runtime-deadline-ms")
            .unwrap()
            .parse()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(
            deadline > now + 25_000 && deadline <= now + 30_000,
            "{deadline} vs {now}"
        );
        let id = request_id(&next);
        let posted = post_result(&emulator, &id, "response", &json!({"outcome": "activated"}));
        assert_eq!(posted.status, 202);
        assert_eq!(
            first.join().unwrap().unwrap(),
            Invocation::Response(json!({"outcome": "activated"}))
        );

        let second = s.spawn(|| emulator.invoke(json!({"n": 2}), WAIT));
        let next = poll_next(&emulator);
        assert_eq!(next.json().unwrap(), json!({"n": 2}));
        let second_id = request_id(&next);
        assert_ne!(second_id, id);
        let posted = post_result(
            &emulator,
            &second_id,
            "error",
            &json!({"errorType": "activator::Transient", "errorMessage": "fleet API down"}),
        );
        assert_eq!(posted.status, 202);
        assert_eq!(
            second.join().unwrap().unwrap(),
            Invocation::Error {
                error_type: "activator::Transient".to_owned(),
                error_message: "fleet API down".to_owned(),
            }
        );
    });
    assert_eq!(emulator.polls(), 2);
}

#[test]
fn concurrent_invocations_each_get_their_own_answer() {
    let emulator = RuntimeEmulator::start().unwrap();
    thread::scope(|s| {
        let callers: Vec<_> = (0..4)
            .map(|n| {
                let emulator = &emulator;
                s.spawn(move || emulator.invoke(json!({ "n": n }), WAIT))
            })
            .collect();
        for _ in 0..4 {
            let next = poll_next(&emulator);
            let event = next.json().unwrap();
            let posted = post_result(
                &emulator,
                &request_id(&next),
                "response",
                &json!({"echo": event["n"]}),
            );
            assert_eq!(posted.status, 202);
        }
        for (n, caller) in callers.into_iter().enumerate() {
            assert_eq!(
                caller.join().unwrap().unwrap(),
                Invocation::Response(json!({ "echo": n }))
            );
        }
    });
}

#[test]
fn an_invocation_that_times_out_is_withdrawn() {
    let emulator = RuntimeEmulator::start().unwrap();
    emulator.set_function_timeout(Duration::from_secs(3));
    let error = emulator
        .invoke(json!({"n": "late"}), Duration::from_millis(200))
        .unwrap_err();
    assert!(error.to_string().contains("no answer"), "{error}");
    thread::scope(|s| {
        let caller = s.spawn(|| emulator.invoke(json!({"n": "kept"}), WAIT));
        let next = poll_next(&emulator);
        assert_eq!(next.json().unwrap(), json!({"n": "kept"}));
        let deadline: u128 = next
            .header("lambda-runtime-deadline-ms")
            .unwrap()
            .parse()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(deadline <= now + 3_000);
        post_result(&emulator, &request_id(&next), "response", &json!(null));
        assert_eq!(
            caller.join().unwrap().unwrap(),
            Invocation::Response(Value::Null)
        );
    });
}

#[test]
fn answers_for_unknown_request_ids_are_refused() {
    let emulator = RuntimeEmulator::start().unwrap();
    let posted = post_result(&emulator, "nope", "response", &json!({}));
    assert_eq!(posted.status, 400);
    assert_eq!(posted.json().unwrap()["errorType"], "InvalidRequestID");
}

#[test]
fn an_init_error_is_recorded_and_fails_invocations() {
    let emulator = RuntimeEmulator::start().unwrap();
    let body =
        json!({"errorType": "Runtime.InitError", "errorMessage": "JITR_POLICY_NAME is not set"});
    let posted = HttpRequest::post(&format!(
        "http://{}/2018-06-01/runtime/init/error",
        emulator.address()
    ))
    .header("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")
    .json(&body)
    .send()
    .unwrap();
    assert_eq!(posted.status, 202);
    assert_eq!(emulator.init_error(), Some(body));
    let error = emulator.invoke(json!({}), WAIT).unwrap_err();
    assert!(error.to_string().contains("JITR_POLICY_NAME"), "{error}");
}

#[test]
fn dropping_the_emulator_ends_a_pending_poll_and_closes_the_port() {
    let emulator = RuntimeEmulator::start().unwrap();
    let addr = emulator.server.addr();
    let poller = thread::spawn(move || {
        HttpRequest::get(&format!("http://{addr}/2018-06-01/runtime/invocation/next"))
            .timeout(WAIT)
            .send()
    });
    while emulator.polls() == 0 {
        thread::sleep(Duration::from_millis(10));
    }
    drop(emulator);
    // The long poll is cut off rather than answered.
    assert!(poller.join().unwrap().is_err());
    assert!(crate::proc::port_is_closed(addr));
}

#[test]
fn a_runtime_that_hangs_up_mid_poll_does_not_swallow_the_next_event() {
    use std::io::Write;
    let emulator = RuntimeEmulator::start().unwrap();
    {
        let mut stream = std::net::TcpStream::connect(emulator.address()).unwrap();
        stream
            .write_all(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        while emulator.polls() == 0 {
            thread::sleep(Duration::from_millis(10));
        }
    } // the "runtime" dies here, mid long poll
    thread::sleep(Duration::from_millis(200));
    thread::scope(|s| {
        let caller = s.spawn(|| emulator.invoke(json!({"n": "after restart"}), WAIT));
        let next = poll_next(&emulator);
        assert_eq!(next.json().unwrap(), json!({"n": "after restart"}));
        post_result(&emulator, &request_id(&next), "response", &json!(1));
        assert_eq!(
            caller.join().unwrap().unwrap(),
            Invocation::Response(json!(1))
        );
    });
}

/// Plays `runtimes` runtime processes until the emulator stops: an event `{"fail": k}` fails
/// its first `k` runs, counted per event.
fn flaky_runtimes(emulator: &RuntimeEmulator, runtimes: usize) {
    let runs = Arc::new(Mutex::new(HashMap::<u64, u64>::new()));
    for _ in 0..runtimes {
        let address = emulator.address();
        let runs = Arc::clone(&runs);
        thread::spawn(move || loop {
            let Ok(next) = HttpRequest::get(&format!(
                "http://{address}/2018-06-01/runtime/invocation/next"
            ))
            .timeout(Duration::from_secs(60))
            .send() else {
                return;
            };
            if next.status != 200 {
                return;
            }
            let id = request_id(&next);
            let event: Value = next.json().unwrap();
            let key = event["n"].as_u64().unwrap();
            let run = {
                let mut runs = runs.lock().unwrap();
                let run = runs.entry(key).or_default();
                *run += 1;
                *run
            };
            let (kind, body) = if run <= event["fail"].as_u64().unwrap() {
                (
                    "error",
                    json!({"errorType": "Retryable", "errorMessage": format!("run {run}")}),
                )
            } else {
                ("response", json!({"n": key, "run": run}))
            };
            let url = format!("http://{address}/2018-06-01/runtime/invocation/{id}/{kind}");
            if HttpRequest::post(&url).json(&body).send().is_err() {
                return;
            }
        });
    }
}

#[test]
fn async_delivery_retries_twice_then_queues_the_failure() {
    let emulator = RuntimeEmulator::start().unwrap();
    flaky_runtimes(&emulator, 3);
    // Event n fails its first `fail` runs: 0 and 2 succeed (the second on its last retry),
    // 3 exhausts the two retries and lands in the failure queue.
    let events: Vec<Value> = [0, 2, 3, 1, 0]
        .iter()
        .enumerate()
        .map(|(n, fail)| json!({"n": n, "fail": fail}))
        .collect();
    let delivery = emulator.deliver_async(&events, 3, 2, WAIT);
    let attempts: Vec<u32> = delivery.events.iter().map(|e| e.attempts).collect();
    assert_eq!(attempts, [1, 3, 3, 2, 1]);
    assert_eq!(delivery.failure_queue, [2]);
    assert_eq!(delivery.succeeded(), 4);
    assert_eq!(delivery.invocations, 10);
    assert_eq!(delivery.retries, 5);
    assert_eq!(
        delivery.events[1].last,
        Invocation::Response(json!({"n": 1, "run": 3}))
    );
    assert!(matches!(
        &delivery.events[2].last,
        Invocation::Error { error_type, error_message } if error_type == "Retryable" && error_message == "run 3"
    ));
}
