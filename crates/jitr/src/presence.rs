//! The presence table (proof of use): which certificate each device connected with, written by
//! the stack's presence topic rule and read by `status` and `rotate` (JITR_PRESENCE_TABLE, the
//! stack's `PresenceTable` output). Without it, nothing is proven: no old certificate is
//! retired on a guess.

use std::collections::HashMap;

use activator::dynamodb::presence::DynamoPresence;
use activator::presence::{Connection, PresenceLog};
use anyhow::{Context, Result};

/// The variable naming the presence table.
pub(crate) const PRESENCE_TABLE: &str = "JITR_PRESENCE_TABLE";

/// The presence table's name, when one is configured.
pub(crate) fn table() -> Option<String> {
    std::env::var(PRESENCE_TABLE).ok().filter(|t| !t.is_empty())
}

/// The presence log, when a presence table is configured.
pub(crate) fn log(session: &iot::aws::Session) -> Option<DynamoPresence> {
    table().map(|table| DynamoPresence::new(session.config(), &table))
}

/// Every device's connections, when a presence table is configured.
pub(crate) async fn read(
    session: &iot::aws::Session,
    deadline: tokio::time::Instant,
) -> Result<Option<HashMap<String, Vec<Connection>>>> {
    let Some(log) = log(session) else {
        return Ok(None);
    };
    let all = log
        .all(deadline)
        .await
        .with_context(|| format!("the presence table {} ({PRESENCE_TABLE})", log.table()))?;
    Ok(Some(all))
}
