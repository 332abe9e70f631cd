//! The proxy against moto and a counting upstream.

use super::*;
use std::io::{Read, Write};
use std::sync::atomic::AtomicUsize;

use aws_config::retry::RetryConfig;
use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iot::operation::RequestId;

use crate::moto::{MotoServer, REGION};
use crate::proc::port_is_closed;

/// An AWS IoT client for `url` with the given retry configuration.
async fn iot_client_with(url: &str, retry: RetryConfig) -> aws_sdk_iot::Client {
    let sdk_config = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            "testing", "testing", None, None, "testkit",
        ))
        .load()
        .await;
    let config = aws_sdk_iot::config::Builder::from(&sdk_config)
        .retry_config(retry)
        .build();
    aws_sdk_iot::Client::from_conf(config)
}

/// An AWS IoT client for `url` with retries disabled.
async fn iot_client(url: &str) -> aws_sdk_iot::Client {
    iot_client_with(url, RetryConfig::disabled()).await
}

/// A well-formed certificate id nobody registered.
fn unknown_certificate_id() -> String {
    "ab".repeat(32)
}

/// An upstream that answers `ok` to everything and counts what it saw.
fn counting_upstream() -> (crate::server::BackgroundServer, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let router = axum::Router::new().fallback(move || {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    let server = crate::server::BackgroundServer::start("counting-upstream", router).unwrap();
    (server, seen)
}

/// Writes `request` on a fresh connection and reads until the proxy closes it.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading from the proxy: {e}"),
    }
    received
}

#[test]
fn operation_of_names_every_mapped_call() {
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let arn = "arn%3Aaws%3Aiot%3Aus-east-1%3A123456789012%3Acert%2Fabc";
    let cases = [
        ("GET", format!("/certificates/{id}"), "DescribeCertificate"),
        (
            "PUT",
            format!("/certificates/{id}?newStatus=ACTIVE"),
            "UpdateCertificate",
        ),
        (
            "DELETE",
            format!("/certificates/{id}?forceDelete=true"),
            "DeleteCertificate",
        ),
        (
            "GET",
            "/certificates?pageSize=250".to_owned(),
            "ListCertificates",
        ),
        (
            "GET",
            format!("/cacertificate/{id}"),
            "DescribeCACertificate",
        ),
        (
            "POST",
            "/cacertificate?setAsActive=true&allowAutoRegistration=true".to_owned(),
            "RegisterCACertificate",
        ),
        (
            "PUT",
            format!("/cacertificate/{id}?newStatus=ACTIVE"),
            "UpdateCACertificate",
        ),
        (
            "DELETE",
            format!("/cacertificate/{id}"),
            "DeleteCACertificate",
        ),
        ("GET", "/cacertificates".to_owned(), "ListCACertificates"),
        (
            "POST",
            "/certificate/register".to_owned(),
            "RegisterCertificate",
        ),
        (
            "POST",
            "/certificate/register-no-ca".to_owned(),
            "RegisterCertificateWithoutCA",
        ),
        (
            "GET",
            format!("/certificates-by-ca/{id}?pageSize=250&marker=x"),
            "ListCertificatesByCA",
        ),
        ("POST", "/things/device-1".to_owned(), "CreateThing"),
        (
            "DELETE",
            "/things/device-1?expectedVersion=2".to_owned(),
            "DeleteThing",
        ),
        ("GET", "/things/device%201".to_owned(), "DescribeThing"),
        ("PATCH", "/things/device-1".to_owned(), "UpdateThing"),
        ("GET", "/things?maxResults=10".to_owned(), "ListThings"),
        (
            "PUT",
            "/things/device-1/principals".to_owned(),
            "AttachThingPrincipal",
        ),
        (
            "DELETE",
            "/things/device-1/principals".to_owned(),
            "DetachThingPrincipal",
        ),
        (
            "GET",
            "/things/device-1/principals".to_owned(),
            "ListThingPrincipals",
        ),
        (
            "GET",
            "/things/device-1/thing-groups".to_owned(),
            "ListThingGroupsForThing",
        ),
        (
            "GET",
            "/principals/things?maxResults=5".to_owned(),
            "ListPrincipalThings",
        ),
        (
            "PUT",
            "/target-policies/device-policy".to_owned(),
            "AttachPolicy",
        ),
        (
            "POST",
            "/target-policies/device-policy".to_owned(),
            "DetachPolicy",
        ),
        (
            "POST",
            format!("/attached-policies/{arn}?recursive=false"),
            "ListAttachedPolicies",
        ),
        (
            "POST",
            "/policy-targets/device-policy".to_owned(),
            "ListTargetsForPolicy",
        ),
        (
            "PUT",
            "/thing-groups/addThingToThingGroup".to_owned(),
            "AddThingToThingGroup",
        ),
        (
            "PUT",
            "/thing-groups/removeThingFromThingGroup".to_owned(),
            "RemoveThingFromThingGroup",
        ),
        ("POST", "/policies/device-policy".to_owned(), "CreatePolicy"),
        ("GET", "/policies/device-policy".to_owned(), "GetPolicy"),
        (
            "DELETE",
            "/policies/device-policy".to_owned(),
            "DeletePolicy",
        ),
        (
            "GET",
            "/endpoint?endpointType=iot:Data-ATS".to_owned(),
            "DescribeEndpoint",
        ),
        ("get", format!("/certificates/{id}"), "DescribeCertificate"),
        ("POST", format!("/certificates/{id}"), "Other"),
        ("GET", "/".to_owned(), "Other"),
        ("GET", "/moto-api/reset".to_owned(), "Other"),
        ("GET", "/things/a/b/c".to_owned(), "Other"),
    ];
    for (method, path, want) in cases {
        assert_eq!(operation_of(method, &path), want, "{method} {path}");
    }
}

#[test]
fn quotas_know_rates_bursts_and_the_slowest_operation() {
    let quotas = Quotas::aws_defaults();
    assert_eq!(quotas.rate("DescribeCertificate"), Some(10.0));
    assert_eq!(quotas.burst("DescribeCertificate"), Some(10.0));
    assert_eq!(quotas.rate("AttachPolicy"), Some(15.0));
    assert_eq!(quotas.rate("CreateThing"), Some(100.0));
    assert_eq!(quotas.rate("RegisterCertificate"), None);
    assert_eq!(
        quotas.slowest(&["CreateThing", "AttachPolicy", "UpdateCertificate", "Other"]),
        Some(("UpdateCertificate", 10.0))
    );
    assert_eq!(quotas.slowest(&["Other", "RegisterCertificate"]), None);
    assert_eq!(quotas.slowest(&[]), None);

    let custom = Quotas::default()
        .with("ListThings", 2.0, 0.0)
        .with("CreateThing", f64::NAN, 3.0);
    assert_eq!(custom.rate("ListThings"), Some(2.0));
    assert_eq!(custom.burst("ListThings"), Some(1.0));
    let blocked = Quotas::default().with("UpdateCertificate", 0.0, 0.0);
    assert_eq!(blocked.burst("UpdateCertificate"), Some(0.0));
    assert_eq!(custom.rate("CreateThing"), Some(0.0));
    assert_eq!(
        custom.slowest(&["ListThings", "CreateThing"]),
        Some(("CreateThing", 0.0))
    );
}

#[test]
fn token_bucket_allows_the_burst_then_refills_at_the_rate() {
    let start = Instant::now();
    let mut bucket = TokenBucket::full(
        Limit {
            rate: 10.0,
            burst: 3.0,
        },
        start,
    );
    let taken = (0..5).filter(|_| bucket.try_take(start)).count();
    assert_eq!(taken, 3);
    assert!(!bucket.try_take(start + Duration::from_millis(50)));
    assert!(bucket.try_take(start + Duration::from_millis(101)));
    assert!(!bucket.try_take(start + Duration::from_millis(120)));
    // A long pause saves up no more than the burst.
    let later = start + Duration::from_secs(60);
    assert_eq!((0..10).filter(|_| bucket.try_take(later)).count(), 3);
}

#[test]
fn draws_are_deterministic_per_seed_and_follow_the_probabilities() {
    let plan = FaultPlan {
        seed: 7,
        throttle: 0.1,
        server_error: 0.1,
        drop_before: 0.1,
        drop_after: 0.1,
        slow: 0.1,
        slow_by: Duration::from_millis(5),
        quotas: None,
        latency: Duration::ZERO,
    };
    let now = Instant::now();
    let run = |plan: &FaultPlan| {
        let mut state = State::new(plan.clone(), now);
        (0..10_000)
            .map(|_| state.decide("ListThings", now))
            .collect::<Vec<_>>()
    };
    let first = run(&plan);
    assert_eq!(first, run(&plan));
    assert_ne!(first, run(&FaultPlan { seed: 8, ..plan }));
    let share = |pred: &dyn Fn(&Fault) -> bool| {
        #[allow(clippy::cast_precision_loss)] // small counts
        let n = first.iter().filter(|f| pred(f)).count() as f64;
        n / 10_000.0
    };
    for (what, got) in [
        ("throttle", share(&|f| *f == Fault::Throttle)),
        (
            "500",
            share(&|f| *f == Fault::ServerError { unavailable: false }),
        ),
        (
            "503",
            share(&|f| *f == Fault::ServerError { unavailable: true }),
        ),
        ("drop_before", share(&|f| *f == Fault::DropBefore)),
        ("drop_after", share(&|f| *f == Fault::DropAfter)),
        ("slow", share(&|f| matches!(f, Fault::Slow(_)))),
        ("forward", share(&|f| *f == Fault::Forward)),
    ] {
        let want = match what {
            "500" | "503" => 0.05,
            "forward" => 0.5,
            _ => 0.1,
        };
        assert!((got - want).abs() < 0.02, "{what}: {got}");
    }
    // The default plan never draws a fault.
    let mut state = State::new(FaultPlan::default(), now);
    assert!((0..1000).all(|_| state.decide("ListThings", now) == Fault::Forward));
}

#[tokio::test]
async fn throttled_calls_fail_with_throttling_exception_and_are_not_forwarded() {
    let moto = MotoServer::start().unwrap();
    let plan = FaultPlan {
        throttle: 1.0,
        ..FaultPlan::default()
    };
    let proxy = Proxy::for_url(&moto.endpoint(), plan).unwrap();
    let client = iot_client(&proxy.url()).await;

    let err = client
        .describe_certificate()
        .certificate_id(unknown_certificate_id())
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, SdkError::ServiceError(_)), "{err:?}");
    assert_eq!(err.code(), Some("ThrottlingException"), "{err:?}");
    assert_eq!(err.message(), Some("Rate exceeded"));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(429));
    assert!(err.request_id().is_some_and(|id| id.len() == 36), "{err:?}");
    let stats = proxy.stats();
    assert_eq!(stats.requests, 1);
    assert_eq!(stats.throttled, 1);
    assert_eq!(stats.forwarded, 0);
    assert!(stats.by_operation.is_empty());

    // The SDK's standard retry strategy sees it as throttling and tries again.
    let retrying = iot_client_with(
        &proxy.url(),
        RetryConfig::standard()
            .with_max_attempts(3)
            .with_initial_backoff(Duration::from_millis(5)),
    )
    .await;
    let err = retrying.list_things().send().await.unwrap_err();
    assert_eq!(err.code(), Some("ThrottlingException"));
    assert_eq!(proxy.stats().throttled, 4);
}

#[tokio::test]
async fn server_errors_are_internal_failure_or_service_unavailable() {
    let moto = MotoServer::start().unwrap();
    let plan = FaultPlan {
        seed: 3,
        server_error: 1.0,
        ..FaultPlan::default()
    };
    let proxy = Proxy::for_url(&moto.endpoint(), plan).unwrap();
    let client = iot_client(&proxy.url()).await;

    let mut seen = BTreeMap::new();
    for _ in 0..12 {
        let err = client.list_things().send().await.unwrap_err();
        assert!(matches!(err, SdkError::ServiceError(_)), "{err:?}");
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        match (status, code.as_deref()) {
            (Some(500), Some("InternalFailureException"))
            | (Some(503), Some("ServiceUnavailableException")) => {}
            other => panic!("unexpected answer {other:?}: {err:?}"),
        }
        *seen.entry(status).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both 500 and 503 should occur: {seen:?}");
    let stats = proxy.stats();
    assert_eq!(stats.server_errors, 12);
    assert_eq!(stats.forwarded, 0);
}

#[tokio::test]
async fn dropped_connections_fail_at_the_client_before_or_after_taking_effect() {
    let moto = MotoServer::start().unwrap();
    let plan = FaultPlan {
        drop_before: 1.0,
        ..FaultPlan::default()
    };
    let proxy = Proxy::for_url(&moto.endpoint(), plan).unwrap();
    let client = iot_client(&proxy.url()).await;

    let err = client
        .create_thing()
        .thing_name("dropped-before")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
        ),
        "{err:?}"
    );
    proxy.set_plan(FaultPlan::default());
    let err = client
        .describe_thing()
        .thing_name("dropped-before")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("ResourceNotFoundException"), "{err:?}");

    proxy.set_plan(FaultPlan {
        drop_after: 1.0,
        ..FaultPlan::default()
    });
    let err = client
        .create_thing()
        .thing_name("dropped-after")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
        ),
        "{err:?}"
    );
    proxy.set_plan(FaultPlan::default());
    let thing = client
        .describe_thing()
        .thing_name("dropped-after")
        .send()
        .await
        .unwrap();
    assert_eq!(thing.thing_name(), Some("dropped-after"));

    let stats = proxy.stats();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.dropped_before, 1);
    assert_eq!(stats.dropped_after, 1);
    assert_eq!(stats.forwarded, 3);
    assert_eq!(stats.by_operation.get("CreateThing"), Some(&1));
    assert_eq!(stats.by_operation.get("DescribeThing"), Some(&2));
}

#[test]
fn drops_close_the_connection_without_a_byte_of_answer() {
    let (upstream, seen) = counting_upstream();
    let plan = FaultPlan {
        drop_before: 1.0,
        ..FaultPlan::default()
    };
    let proxy = Proxy::start(upstream.addr(), plan).unwrap();
    let request = b"POST /things/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(raw_exchange(proxy.addr(), request), b"");
    assert_eq!(seen.load(Ordering::SeqCst), 0);

    proxy.set_plan(FaultPlan {
        drop_after: 1.0,
        ..FaultPlan::default()
    });
    assert_eq!(raw_exchange(proxy.addr(), request), b"");
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // And a fault-free plan answers on the same kind of connection.
    proxy.set_plan(FaultPlan::default());
    let answer = raw_exchange(
        proxy.addr(),
        b"GET /things HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
}

#[tokio::test]
async fn slow_answers_arrive_after_the_delay() {
    let moto = MotoServer::start().unwrap();
    let plan = FaultPlan {
        slow: 1.0,
        slow_by: Duration::from_millis(300),
        ..FaultPlan::default()
    };
    let proxy = Proxy::for_url(&moto.endpoint(), plan).unwrap();
    let client = iot_client(&proxy.url()).await;

    let started = Instant::now();
    let things = client.list_things().send().await.unwrap();
    let took = started.elapsed();
    assert!(things.things().is_empty());
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let stats = proxy.stats();
    assert_eq!(stats.slowed, 1);
    assert_eq!(stats.forwarded, 1);
}

#[tokio::test]
async fn quotas_throttle_an_operation_beyond_its_rate() {
    let moto = MotoServer::start().unwrap();
    let quotas = Quotas::aws_defaults();
    let (rate, burst) = (
        quotas.rate("DescribeCertificate").unwrap(),
        quotas.burst("DescribeCertificate").unwrap(),
    );
    let plan = FaultPlan {
        quotas: Some(quotas),
        ..FaultPlan::default()
    };
    let proxy = Proxy::for_url(&moto.endpoint(), plan).unwrap();
    let client = iot_client(&proxy.url()).await;

    // Waves of concurrent calls: tokens are taken as requests arrive, so how fast moto
    // answers (slow on a busy machine) does not change how many get through.
    let started = Instant::now();
    let wave = |n: usize| {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..n {
            let client = client.clone();
            calls.spawn(async move {
                client
                    .describe_certificate()
                    .certificate_id(unknown_certificate_id())
                    .send()
                    .await
                    .unwrap_err()
            });
        }
        async move {
            let (mut passed, mut throttled) = (0u64, 0u64);
            while let Some(err) = calls.join_next().await {
                let err = err.unwrap();
                match err.code() {
                    Some("ResourceNotFoundException") => passed += 1,
                    Some("ThrottlingException") => throttled += 1,
                    _ => panic!("unexpected error {err:?}"),
                }
            }
            (passed, throttled)
        }
    };
    let (first_passed, first_throttled) = wave(40).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (second_passed, second_throttled) = wave(20).await;
    let elapsed = started.elapsed().as_secs_f64();

    let (passed, throttled) = (
        first_passed + second_passed,
        first_throttled + second_throttled,
    );
    assert_eq!(passed + throttled, 60);
    let stats = proxy.stats();
    assert_eq!(stats.by_operation.get("DescribeCertificate"), Some(&passed));
    assert_eq!(stats.forwarded, passed);
    assert_eq!(stats.quota_throttled, throttled);
    assert_eq!(stats.throttled, 0);
    #[allow(clippy::cast_precision_loss)] // small counts
    let (first, second, forwarded) = (first_passed as f64, second_passed as f64, passed as f64);
    assert!(first >= burst, "first wave: {first} forwarded");
    assert!(
        forwarded <= burst + rate * elapsed + 1.0,
        "{forwarded} forwarded in {elapsed}s"
    );
    // Half a second refills about five tokens.
    assert!(
        second >= rate * 0.5 - 1.0,
        "second wave: {second} forwarded"
    );

    // Other operations have their own buckets.
    client.list_things().send().await.unwrap();
}

#[test]
fn dropping_the_proxy_closes_its_port_and_connections() {
    let (upstream, _) = counting_upstream();
    let proxy = Proxy::start(upstream.addr(), FaultPlan::default()).unwrap();
    let addr = proxy.addr();
    let mut open = std::net::TcpStream::connect(addr).unwrap();
    open.write_all(b"GET /things HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = [0u8; 12];
    open.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert!(format!("{proxy:?}").contains("Proxy"));

    drop(proxy);
    assert!(port_is_closed(addr), "{addr} still open");
    // The keep-alive connection is closed too: the rest of the answer, then EOF.
    let mut rest = Vec::new();
    match open.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{e}"),
    }
}

/// An upstream that answers every request with its method, target and body, keeping the
/// connection open (HTTP/1.1 keep-alive).
fn echo_upstream() -> crate::server::BackgroundServer {
    let router = axum::Router::new().fallback(
        |method: axum::http::Method, uri: axum::http::Uri, body: axum::body::Bytes| async move {
            format!("{method} {uri} {}", String::from_utf8_lossy(&body))
        },
    );
    crate::server::BackgroundServer::start("echo", router).unwrap()
}

/// Reads one response with a Content-Length body from a keep-alive connection.
fn read_response(reader: &mut std::io::BufReader<std::net::TcpStream>) -> String {
    use std::io::BufRead;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn latency(delay: Duration) -> FaultPlan {
    FaultPlan {
        latency: delay,
        ..FaultPlan::default()
    }
}

#[test]
fn latency_delays_every_request_on_a_keep_alive_connection_and_each_is_recorded() {
    let upstream = echo_upstream();
    let delay = Duration::from_millis(60);
    let proxy = Proxy::start(upstream.addr(), latency(delay)).unwrap();
    let stream = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = std::io::BufReader::new(stream);

    let requests: [(&[u8], &str); 3] = [
        (b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", "GET /a?x=1 "),
        (
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
            "POST /b hello",
        ),
        (
            b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
            "PUT /c abcde",
        ),
    ];
    for (request, want) in requests {
        let started = Instant::now();
        // Written in two pieces: the delay applies to the request, not to each write.
        let (first, rest) = request.split_at(request.len() / 2);
        writer.write_all(first).unwrap();
        writer.flush().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        writer.write_all(rest).unwrap();
        assert_eq!(read_response(&mut reader), want);
        let took = started.elapsed();
        assert!(took >= delay, "{took:?}");
        assert!(took < delay * 3, "{took:?}");
    }
    let seen = proxy.requests();
    assert_eq!(proxy.count(), 3);
    assert_eq!(
        seen.iter()
            .map(|r| format!("{} {} {}", r.method, r.target, r.body))
            .collect::<Vec<_>>(),
        ["GET /a?x=1 ", "POST /b hello", "PUT /c abcde"]
    );
    assert_eq!(proxy.requests_since(2).len(), 1);
    assert!(seen[1].arrived >= seen[0].arrived + delay);
}

#[test]
fn concurrent_requests_are_delayed_side_by_side() {
    let upstream = echo_upstream();
    let delay = Duration::from_millis(80);
    let proxy = Proxy::start(upstream.addr(), latency(delay)).unwrap();
    let url = format!("{}/x", proxy.url());
    let started = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || crate::http::HttpRequest::get(&url).send().unwrap())
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap().text(), "GET /x ");
    }
    let took = started.elapsed();
    assert!(took >= delay && took < delay * 2, "{took:?}");
    assert_eq!(proxy.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_operations_are_answered_by_the_proxy_and_the_rest_reach_moto() {
    let moto = tokio::task::spawn_blocking(MotoServer::start)
        .await
        .unwrap()
        .unwrap();
    let proxy = Proxy::for_url(&moto.endpoint(), FaultPlan::default()).unwrap();
    proxy.answer("GetRegistrationCode", |_| {
        Some(Canned::ok(serde_json::json!({"registrationCode": "c0de"})))
    });
    proxy.answer("DescribeCertificate", |request| {
        request
            .target
            .ends_with(&"f".repeat(64))
            .then(Canned::not_found)
    });
    let client = iot_client(&proxy.url()).await;
    let code = client.get_registration_code().send().await.unwrap();
    assert_eq!(code.registration_code(), Some("c0de"));
    let err = client
        .describe_certificate()
        .certificate_id("f".repeat(64))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("ResourceNotFoundException"));
    // Not answered here: moto's own answer.
    client.list_things().send().await.unwrap();
    let ops: Vec<_> = proxy
        .requests()
        .iter()
        .map(|r| operation_of(&r.method, &r.target))
        .collect();
    assert_eq!(
        ops,
        ["GetRegistrationCode", "DescribeCertificate", "ListThings"]
    );
    assert_eq!(proxy.stats().forwarded, 1);
}
