//! In-memory implementations of activator's ports (feature `testing`), for unit tests of the
//! decision and of the operator's workflows: [`MemoryFleet`] is a fleet of chosen devices,
//! [`MemoryLedger`] an issuance ledger. AWS IoT in memory is `iot::memory::MemoryIot`.

mod fleet;
mod ledger;

pub use fleet::{MemoryFleet, Standing};
pub use ledger::MemoryLedger;
