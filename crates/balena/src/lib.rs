//! One client for the balena API v7 (OData via pinejs), as jitr uses it.
//!
//! - [`Client`]: the one request loop every call goes through: `Authorization: Bearer <key>`,
//!   a deadline on every request, 429 answered by waiting `Retry-After` within it, bodies
//!   capped, and one [`Error`] type.
//! - [`Fleet`]: the pinned fleet: membership of a device (returning the device's handle), a
//!   fleet-filtered device lookup, and whether the key can see the fleet at all.
//! - [`device`]: environment variables (device-wide or of one service) and tags on a device,
//!   set and removed idempotently.
//! - [`delivery`]: the variables balena's cloud-relay block reads to reach AWS IoT.
//!
//! Every device the crate writes to was found through [`Fleet`], so a key that sees several
//! fleets can never write to a device outside the pinned one.

mod client;
pub mod delivery;
mod device;
mod fleet;

pub use client::{validate_api_url, ApiKey, Client, Error, DEFAULT_API_URL, MAX_BODY};
pub use device::{Scope, Upserted};
pub use fleet::{Device, Fleet, FleetId, FleetMembership};
