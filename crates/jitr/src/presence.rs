//! The presence table (proof of use): which certificate each device connected with, written by
//! the stack's presence topic rule and read by `status` and `rotate` (JITR_PRESENCE_TABLE, the
//! stack's `PresenceTable` output). Without it, nothing is proven: no old certificate is
//! retired on a guess.

use std::collections::HashMap;

use activator::presence::Connection;
use anyhow::Result;

/// The variable naming the presence table.
pub(crate) const PRESENCE_TABLE: &str = "JITR_PRESENCE_TABLE";

/// The presence table's name, when one is configured.
pub(crate) fn table() -> Option<String> {
    std::env::var(PRESENCE_TABLE).ok().filter(|t| !t.is_empty())
}

/// The presence log, when a presence table is configured.
pub(crate) fn log(session: &activator::aws::Session) -> Option<PresenceTable> {
    let _ = session;
    table().map(|_| PresenceTable::new())
}

/// The presence table's reader. FIXME(lead): DynamoPresence once it lands.
pub(crate) type PresenceTable = activator::presence::MemoryPresence;

/// Every device's connections, when a presence table is configured.
pub(crate) async fn read(
    session: &activator::aws::Session,
    deadline: tokio::time::Instant,
) -> Result<Option<HashMap<String, Vec<Connection>>>> {
    let Some(table) = table() else {
        return Ok(None);
    };
    let _ = (session, deadline);
    anyhow::bail!("{PRESENCE_TABLE}={table}: reading the presence table is not built yet")
}
