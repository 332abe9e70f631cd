//! `jitr endpoint`: the AWS IoT data endpoint (ATS) devices connect to.

use anyhow::Result;
use iot::IotAdmin;

use super::{print_json, Outcome};
use crate::cli::EndpointArgs;

/// The endpoint type devices use: the Amazon Trust Services signed data endpoint.
pub(crate) const ENDPOINT_TYPE: &str = "iot:Data-ATS";

pub(crate) fn endpoint(args: EndpointArgs) -> Result<Outcome> {
    let address = crate::aws::runtime()?.block_on(async {
        let registry = crate::aws::session(&args.aws).await?.registry();
        let deadline = iot::call_deadline(args.aws.deadline(iot::OPERATOR_CALL_TIME));
        anyhow::Ok(registry.describe_endpoint(ENDPOINT_TYPE, deadline).await?)
    })?;
    if args.output.json {
        print_json(&serde_json::json!({
            "endpoint_address": address,
            "endpoint_type": ENDPOINT_TYPE,
        }))?;
    } else {
        println!("{address}");
    }
    Ok(Outcome::Success)
}
