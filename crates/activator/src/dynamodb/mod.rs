//! The DynamoDB adapters of activator's ports: the issuance ledger ([`DynamoLedger`]) and the
//! presence log ([`presence::DynamoPresence`]). They retry by [`iot::aws::RetryPolicy`], the
//! one retry loop of the AWS adapters, and word SDK errors by [`iot::aws::sdk_error_text`].

mod ledger;
pub mod presence;

pub use ledger::{DynamoLedger, LedgerBatchReport};
