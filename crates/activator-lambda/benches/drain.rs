//! How fast a burst of first connects drains when AWS IoT enforces its default API quotas.
//!
//! `cargo bench -p activator-lambda --bench drain` registers `JITR_DRAIN_EVENTS` certificates
//! (default 300) PENDING_ACTIVATION in moto, puts a fault proxy that enforces AWS IoT's
//! default per-operation rates (token buckets; over the rate is a ThrottlingException) in
//! front of it, and delivers one certificate-registered event each to the real `bootstrap`,
//! `JITR_DRAIN_CONCURRENCY` instances at once (default 5, the template's reserved
//! concurrency), with Lambda's asynchronous retry rules. Every activation needs two
//! DescribeCertificate calls (the status is read again before activating) and two
//! ListThingPrincipals calls (before and alongside attaching), each 10 per second by default;
//! a rejection needs one of each. No client making those calls can drain faster than the most
//! loaded operation's calls divided by its rate: the bound. It prints the drain time, the bound
//! and their ratio (target <= 1.2x), and checks that nothing was lost: every certificate
//! decided, none in the failure queue.
//!
//! Run by `cargo test` (without `--bench`) it does a quick pass over 20 events.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::time::Duration;

use testkit::burst::{BurstWorld, Standing};
use testkit::proxy::{FaultPlan, Quotas};

/// The calls each decision makes: (operation, per activated member, per rejected stranger).
const PER_EVENT: [(&str, f64, f64); 6] = [
    ("DescribeCertificate", 2.0, 1.0),
    ("ListThingPrincipals", 2.0, 1.0),
    ("CreateThing", 1.0, 0.0),
    ("AttachPolicy", 1.0, 0.0),
    ("AttachThingPrincipal", 1.0, 0.0),
    ("UpdateCertificate", 1.0, 1.0),
];

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let events = if quick {
        20
    } else {
        env_count("JITR_DRAIN_EVENTS", 300).max(1)
    };
    let concurrency = env_count("JITR_DRAIN_CONCURRENCY", 5).max(1);
    let quotas = Quotas::aws_defaults();
    let strangers = (0..events).filter(|k| k % 10 == 9).count() as f64;
    let members = events as f64 - strangers;
    // The operation that takes longest at its quota sets the bound.
    let (slowest, calls, rate) = PER_EVENT
        .iter()
        .filter_map(|(op, per_member, per_stranger)| {
            let calls = per_member * members + per_stranger * strangers;
            Some((*op, calls, quotas.rate(op)?))
        })
        .max_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)))
        .expect("the quotas cover DescribeCertificate");

    let standing = |k: usize| {
        if k % 10 == 9 {
            Standing::Stranger
        } else {
            Standing::Member
        }
    };
    let mut world = BurstWorld::start(events, standing, FaultPlan::default()).unwrap();
    world
        .start_runtimes(env!("CARGO_BIN_EXE_bootstrap").as_ref(), concurrency)
        .unwrap();
    let deliveries: Vec<_> = world.devices.iter().map(|d| world.event(d)).collect();
    // Lambda's function timeout in infra/template.yaml.
    world.emulator.set_function_timeout(Duration::from_secs(30));
    world.proxy.set_plan(FaultPlan {
        quotas: Some(quotas.clone()),
        ..FaultPlan::default()
    });
    let delivery =
        world
            .emulator
            .deliver_async(&deliveries, concurrency, 2, Duration::from_secs(60));
    let stats = world.proxy.stats();
    world.stop_runtimes();

    let state = world.registry().unwrap();
    let tally = state.check(&world.devices);
    let drain = delivery.elapsed.as_secs_f64();
    let bound = calls / rate;
    let ratio = drain / bound;
    // AWS's buckets start full: the first `burst` calls pass at once.
    let burst = quotas.burst(slowest).unwrap_or(0.0);
    let floor = (calls - burst).max(0.0) / rate;
    let lost = delivery.failure_queue.len();
    println!(
        "drain: {events} events, {concurrency} Lambda instances, AWS IoT default quotas enforced"
    );
    println!(
        "  drain time {drain:.1} s; quota bound {bound:.1} s ({calls} {slowest} calls for {events} events, at {rate} per s); \
         ratio {ratio:.2}x (target <= 1.2x)"
    );
    println!(
        "  (no client can beat {floor:.1} s: the bucket's first {burst} requests pass at once, the rest at {rate} per s)"
    );
    println!(
        "  {} runs ({} Lambda retries), {} AWS IoT requests of which {} throttled by quota; \
         {lost} events in the failure queue",
        delivery.invocations, delivery.retries, stats.requests, stats.quota_throttled
    );
    match &tally {
        Ok(t) => println!(
            "  registry: {} ACTIVE, {} REVOKED, {} pending: nothing lost",
            t.active, t.revoked, t.pending
        ),
        Err(e) => println!("  registry: {e:#}"),
    }
    assert_eq!(lost, 0, "events reached the failure queue");
    tally.expect("every certificate decided");
    if !quick && ratio > 1.2 {
        println!("  ratio above the 1.2x target");
        std::process::exit(1);
    }
}
