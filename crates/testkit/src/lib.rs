//! Test harness for jitr: real parts and faithful fakes on loopback ports.
//!
//! - [`moto::MotoServer`]: a moto server (AWS IoT) with jitr's fidelity fixes applied.
//! - [`balena::FakeBalena`]: the balena API v7 calls jitr makes, with fault injection.
//! - [`lambda::RuntimeEmulator`]: the AWS Lambda Runtime API, to run the real `bootstrap`.
//! - [`iot`]: an AWS IoT client for moto and the steps every scenario repeats.
//! - [`iot_endpoint::IotEndpoint`]: AWS IoT's MQTT data plane as a device meets it, which moto
//!   lacks: TLS with client certificates, JITR on first connect, policy enforcement, relay.
//! - [`presence::PresenceRule`]: the stack's presence topic rule (`rules/presence-rule.json`,
//!   run by [`topic_rule::TopicRule`], a tiny rules engine) writing the endpoint's connected
//!   events into a DynamoDB table in moto.
//! - [`proxy::Proxy`]: the one HTTP proxy, in front of moto or the fake balena API: latency,
//!   AWS IoT throttling, 5xx, dropped connections, slow answers, per-operation quotas, and
//!   answers of its own for chosen operations; every request recorded.
//! - [`burst::BurstWorld`]: thousands of devices' first connects at once, through faults,
//!   and a check of what the registry holds afterwards.
//! - [`first_connect::DeviceWorld`]: a balena device's whole first connect: moto, the fleet,
//!   the endpoint, the real `bootstrap` behind a topic rule, an application subscribed.
//! - [`certs::TestCa`]: a jitr CA with good and hostile device certificates.
//! - [`http::HttpRequest`]: a tiny blocking HTTP/1.1 client for talking to all of the above.
//! - [`world::Spec`]: the one moto world the suites start from (the CA registered, the device
//!   policy, the fleet, another application's things).
//!
//! Every server listens on `127.0.0.1` on a free port, runs on its own thread (so it works
//! from plain `#[test]`s and from `#[tokio::test]`s alike) and stops when dropped.

pub mod balena;
pub mod burst;
pub mod certs;
pub mod dynamodb;
pub mod first_connect;
pub mod foreign;
pub mod http;
pub mod iot;
pub mod iot_endpoint;
pub mod lambda;
pub mod moto;
pub mod presence;
pub mod proc;
pub mod proxy;
mod server;
pub mod topic_rule;
pub mod world;
