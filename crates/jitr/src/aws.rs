//! The async runtime and the AWS session a command's calls run on.

use activator::aws::Session;
use anyhow::{Context, Result};

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

/// `clap` value parser for `--endpoint-url`: an absolute http(s) URL.
pub(crate) fn parse_endpoint_url(value: &str) -> Result<String, String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(value.to_owned()),
        _ => Err("expected an http:// or https:// URL with a host".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_must_be_http_or_https_with_a_host() {
        assert!(parse_endpoint_url("http://127.0.0.1:5000").is_ok());
        assert!(parse_endpoint_url("https://iot.eu-west-1.amazonaws.com").is_ok());
        assert!(parse_endpoint_url("127.0.0.1:5000").is_err());
        assert!(parse_endpoint_url("http://").is_err());
        assert!(parse_endpoint_url("ftp://host").is_err());
    }
}
