//! The burst: a whole fleet's first connects at once, delivered the way AWS delivers them
//! (at least once, some twice, some never), through an AWS IoT that throttles, fails, drops
//! connections and answers slowly, to the real `bootstrap` under Lambda's asynchronous retry
//! rules (two retries, then the failure queue); then one `jitr reconcile`. Afterwards every
//! fleet member's certificate must be ACTIVE with exactly one Thing and one attachment, every
//! other one REVOKED, and none left pending; another application's Things, certificate and
//! Cognito identity in the same account untouched.
//!
//! 10,000 certificates by default; `JITR_BURST_CERTS` sets another count. The counts and
//! times are printed to stderr (also when the test passes). `bootstrap` is taken from next to
//! the `jitr` binary, where `cargo test --workspace` builds it.
//!
//! The crash test (`JITR_CRASH_CERTS`, default 200) kills `bootstrap` instances with SIGKILL at
//! random points while they decide, under Lambda's retry rules, then runs one reconcile: every
//! member ACTIVE with exactly one principal, every stranger revoked, no Thing without its
//! certificate, nothing pending.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::burst::{BurstWorld, Standing};
use testkit::lambda::Invocation;
use testkit::proxy::{FaultPlan, FaultStats};

mod common;

/// Lambda instances running at once.
const RUNTIMES: usize = 8;

/// Lambda's default for asynchronous invocations.
const MAX_RETRIES: u32 = 2;

/// Events delivered while AWS IoT is down altogether: they exhaust their retries.
const OUTAGE_EVENTS: usize = 40;

fn burst_size() -> usize {
    std::env::var("JITR_BURST_CERTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// One device in ten is not in the fleet, one in twenty is deactivated.
fn standing(k: usize) -> Standing {
    match (k % 10, k % 20) {
        (9, _) => Standing::Stranger,
        (_, 8) => Standing::Inactive,
        _ => Standing::Member,
    }
}

/// 10% of AWS IoT calls go wrong: throttled, 5xx, connection dropped before or after the
/// call took effect, or answered 2 s late (a third of the function's time).
fn faulty() -> FaultPlan {
    FaultPlan {
        seed: 2026,
        throttle: 0.055,
        server_error: 0.025,
        drop_before: 0.01,
        drop_after: 0.008,
        slow: 0.002,
        slow_by: Duration::from_secs(2),
        ..FaultPlan::default()
    }
}

/// The function timeout during the burst: short, so slow answers and long backoffs can
/// exhaust an invocation, but above the 3 s the fleet check keeps for what follows it.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(6);

fn say(line: &str) {
    // Straight to the process's stderr, past the test harness's capture: CI logs show it.
    let _ = writeln!(std::io::stderr(), "burst: {line}");
}

#[test]
fn a_burst_through_faults_ends_with_every_certificate_decided() {
    let n = burst_size();
    let started = Instant::now();
    let mut world = BurstWorld::start(n, standing, FaultPlan::default()).unwrap();
    say(&format!(
        "{n} certificates registered PENDING_ACTIVATION in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // What AWS delivers: every event once, one in ten twice, one in a hundred never.
    let mut deliveries = Vec::new();
    let mut never = 0;
    for (k, device) in world.devices.iter().enumerate() {
        if k % 100 == 57 {
            never += 1;
            continue;
        }
        deliveries.push(world.event(device));
        if k % 10 == 3 {
            deliveries.push(world.event(device));
        }
    }
    // Duplicates arrive apart, not back to back: a fixed shuffle.
    let len = deliveries.len();
    for i in (1..len).rev() {
        deliveries.swap(i, (i * 7_919 + 13) % (i + 1));
    }
    let duplicates = len - (n - never);

    world
        .start_runtimes(&common::bootstrap(), RUNTIMES)
        .unwrap();

    // First a full outage: these events fail every attempt and land in the failure queue.
    world.emulator.set_function_timeout(Duration::from_secs(1));
    world.proxy.set_plan(FaultPlan {
        server_error: 1.0,
        ..FaultPlan::default()
    });
    let (outage, rest) = deliveries.split_at(OUTAGE_EVENTS.min(len));
    let during_outage =
        world
            .emulator
            .deliver_async(outage, RUNTIMES, MAX_RETRIES, Duration::from_secs(30));
    assert_eq!(during_outage.failure_queue.len(), outage.len());
    let after_outage = world.proxy.stats();

    // Then the burst, with 10% of calls going wrong.
    world.emulator.set_function_timeout(FUNCTION_TIMEOUT);
    world.proxy.set_plan(faulty());
    let burst = world
        .emulator
        .deliver_async(rest, RUNTIMES, MAX_RETRIES, Duration::from_secs(30));
    let all = world.proxy.stats();
    // The burst's own faults, without the outage's.
    let faults = FaultStats {
        requests: all.requests - after_outage.requests,
        throttled: all.throttled - after_outage.throttled,
        server_errors: all.server_errors - after_outage.server_errors,
        dropped_before: all.dropped_before - after_outage.dropped_before,
        dropped_after: all.dropped_after - after_outage.dropped_after,
        slowed: all.slowed - after_outage.slowed,
        ..FaultStats::default()
    };
    world.stop_runtimes();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for e in &burst.events {
        let key = match &e.last {
            Invocation::Response(v) => v["outcome"].as_str().unwrap_or("?").to_owned(),
            Invocation::Error {
                error_type,
                error_message,
            } => {
                if std::env::var_os("JITR_BURST_DEBUG").is_some() {
                    say(&format!("{error_type}: {error_message}"));
                }
                format!("error {error_type}")
            }
        };
        *outcomes.entry(key).or_default() += 1;
    }
    say(&format!(
        "{len} deliveries ({duplicates} duplicates, {never} events never delivered); \
         {OUTAGE_EVENTS} during an outage, the rest through faults, in {:.1} s",
        (during_outage.elapsed + burst.elapsed).as_secs_f64()
    ));
    say(&format!(
        "lambda: {} runs, {} retries, {} events to the failure queue; final answers {outcomes:?}",
        during_outage.invocations + burst.invocations,
        during_outage.retries + burst.retries,
        during_outage.failure_queue.len() + burst.failure_queue.len(),
    ));
    say(&format!(
        "AWS IoT calls during the burst: {} requests, {} throttled, {} 5xx, {} dropped before, \
         {} dropped after, {} slow",
        faults.requests,
        faults.throttled,
        faults.server_errors,
        faults.dropped_before,
        faults.dropped_after,
        faults.slowed
    ));
    // Every kind of fault came up (a small JITR_BURST_CERTS may miss the rarest).
    for (kind, count) in [
        ("throttled", faults.throttled),
        ("5xx", faults.server_errors),
        ("dropped before", faults.dropped_before),
        ("dropped after", faults.dropped_after),
        ("slow", faults.slowed),
    ] {
        assert!(
            count > 0 || n < 1_000,
            "no {kind} fault was injected during the burst"
        );
    }

    let (statuses, _) = world.certificates().unwrap();
    let pending_before = statuses
        .values()
        .filter(|s| **s == aws_sdk_iot::types::CertificateStatus::PendingActivation)
        .count();
    // Pending now: only certificates no delivery decided (never delivered, or every delivery
    // in the failure queue) or decided to wait (`held`: an inactive member), and every one of
    // those unless a lost answer hid its decision.
    let decided: std::collections::BTreeSet<&str> = [(outage, &during_outage), (rest, &burst)]
        .into_iter()
        .flat_map(|(events, delivery)| {
            delivery
                .events
                .iter()
                .filter(|e| {
                    matches!(&e.last, Invocation::Response(answer) if answer["outcome"] != "held")
                })
                .map(move |e| {
                    events[e.index]["certificateId"]
                        .as_str()
                        .unwrap_or_default()
                })
        })
        .collect();
    assert!(pending_before <= n - decided.len());
    assert!(pending_before >= never);
    for id in &decided {
        assert_ne!(
            statuses.get(*id),
            Some(&aws_sdk_iot::types::CertificateStatus::PendingActivation),
            "{id} was decided but is still pending"
        );
    }

    // One reconcile, through the same faults, finishes the job.
    let reconcile_started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args([
            "reconcile",
            "--older-than",
            "0s",
            "--concurrency",
            "8",
            "--json",
        ])
        .env_clear()
        .envs(world.activator_env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reconcile failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = &report[0]["report"];
    say(&format!(
        "reconcile: {} pending, {} activated, {} rejected, {} skipped, {} failing, in {:.1} s",
        report["pending"],
        report["activated"],
        report["rejected"],
        report["skipped"],
        report["failing"].as_array().map_or(0, Vec::len),
        reconcile_started.elapsed().as_secs_f64()
    ));
    assert_eq!(report["pending"], pending_before);

    let after = world.registry().unwrap();
    let tally = after.check(&world.devices).unwrap();
    let members = world
        .devices
        .iter()
        .filter(|d| d.standing == Standing::Member)
        .count();
    say(&format!(
        "registry: {} ACTIVE, {} REVOKED, {} pending, {} Things ({} members); checked in {:.1} s; \
         whole test {:.1} s",
        tally.active,
        tally.revoked,
        tally.pending,
        tally.things,
        members,
        after.read_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    let inactive = world
        .devices
        .iter()
        .filter(|d| d.standing == Standing::Inactive)
        .count();
    assert_eq!(tally.active, members);
    assert_eq!(tally.revoked, n - members - inactive);
    assert_eq!(
        tally.pending, inactive,
        "inactive members are held, never revoked"
    );
    world.assert_foreign_untouched().unwrap();
}

fn crash_size() -> usize {
    std::env::var("JITR_CRASH_CERTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn lambdas_killed_mid_decision_leave_nothing_half_made() {
    const RUNNING: usize = 4;
    let n = crash_size();
    let started = Instant::now();
    let mut world = BurstWorld::start(n, standing, FaultPlan::default()).unwrap();
    let deliveries: Vec<_> = world.devices.iter().map(|d| world.event(d)).collect();
    world.start_runtimes(&common::bootstrap(), RUNNING).unwrap();
    world.emulator.set_function_timeout(FUNCTION_TIMEOUT);
    // A little latency on every AWS IoT call, so a kill lands inside decisions, between
    // their writes, rather than between events.
    world.proxy.set_plan(FaultPlan {
        latency: Duration::from_millis(15),
        ..FaultPlan::default()
    });
    let done = std::sync::atomic::AtomicBool::new(false);
    let kills = std::sync::atomic::AtomicUsize::new(0);
    let delivery = std::thread::scope(|scope| {
        scope.spawn(|| {
            // A fixed sequence of "random" instants and victims: repeatable runs.
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_millis(150 + x % 400));
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                world.crash_runtime(x as usize).unwrap();
                kills.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let delivery = world.emulator.deliver_async(
            &deliveries,
            RUNNING,
            MAX_RETRIES,
            // A killed instance never answers: Lambda sees the function time out.
            FUNCTION_TIMEOUT,
        );
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        delivery
    });
    world.stop_runtimes();
    let kills = kills.into_inner();
    say(&format!(
        "crash: {n} events, {kills} SIGKILLs of {RUNNING} running instances; {} runs, {} retries, \
         {} to the failure queue, in {:.1} s",
        delivery.invocations,
        delivery.retries,
        delivery.failure_queue.len(),
        delivery.elapsed.as_secs_f64()
    ));
    assert!(kills >= 3, "only {kills} kills: the test did not test");

    // A crash between two writes left work half done; it must be invisible from outside:
    // nothing activated that should not be, and one reconcile finishes the rest.
    let (statuses, _) = world.certificates().unwrap();
    let half_done = statuses
        .values()
        .filter(|s| **s == aws_sdk_iot::types::CertificateStatus::PendingActivation)
        .count();
    let out = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args([
            "reconcile",
            "--older-than",
            "0s",
            "--concurrency",
            "8",
            "--json",
        ])
        .env_clear()
        .envs(world.activator_env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reconcile failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tally = world.registry().unwrap().check(&world.devices).unwrap();
    say(&format!(
        "crash: {half_done} pending after the burst, reconcile {} activated {} rejected; \
         registry {} ACTIVE (one principal each), {} REVOKED, {} pending, {} Things; {:.1} s",
        report[0]["report"]["activated"],
        report[0]["report"]["rejected"],
        tally.active,
        tally.revoked,
        tally.pending,
        tally.things,
        started.elapsed().as_secs_f64()
    ));
    let inactive = world
        .devices
        .iter()
        .filter(|d| d.standing == Standing::Inactive)
        .count();
    assert_eq!(
        tally.pending, inactive,
        "inactive members are held, never revoked"
    );
    world.assert_foreign_untouched().unwrap();
}
