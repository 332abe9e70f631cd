//! The async runtime and the AWS session a command's calls run on.

use anyhow::{Context, Result};
use iot::aws::Session;

use crate::cli::AwsArgs;

/// A runtime for one command's network calls (the CLI is otherwise synchronous).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The standard AWS chain with `--region` / `--endpoint-url` on top, region and credentials
/// checked before any call.
pub(crate) async fn session(args: &AwsArgs) -> Result<Session> {
    Ok(Session::load(args.region.as_deref(), args.endpoint_url.as_deref()).await?)
}
