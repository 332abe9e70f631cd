//! The operator's AWS IoT work, one module per `jitr` command, built on the activator's ports
//! ([`iot::IotAdmin`], [`iot::IotRegistry`]), its ownership rule
//! ([`activator::ownership`]) and its pacing. The `jitr` CLI parses, prompts and prints; the
//! work is here, so it runs the same against AWS, moto and the in-memory registry.
//!
//! - [`status`]: every device's state (`jitr status`) and the safe fixes (`--fix`).
//! - [`register`]: certificates issued ahead of time (`jitr register`).
//! - [`rotate`]: a device's next certificate (`jitr rotate`).
//! - [`revoke`]: cutting a device off (`jitr revoke`), and lifting the mark (`jitr approve
//!   --device`).
//! - [`ca_register`]: the fleet CA in AWS IoT (`jitr ca register`).
//!
//! None of this runs in the Lambda: `bootstrap` is the decision alone.

pub mod ca_register;
pub mod register;
pub mod revoke;
pub mod rotate;
pub mod status;
