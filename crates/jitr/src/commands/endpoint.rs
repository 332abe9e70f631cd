use anyhow::{Context, Result};

use super::{print_json, Outcome};
use crate::aws::{self, Aws};
use crate::cli::EndpointArgs;

/// The endpoint type devices use: the Amazon Trust Services signed data endpoint.
const ENDPOINT_TYPE: &str = "iot:Data-ATS";

pub(crate) fn endpoint(args: EndpointArgs) -> Result<Outcome> {
    let address = aws::runtime()?.block_on(async {
        let aws = Aws::load(&args.aws).await?;
        let answer = aws
            .iot()
            .describe_endpoint()
            .endpoint_type(ENDPOINT_TYPE)
            .send()
            .await
            .map_err(|err| aws.call_error("DescribeEndpoint", err))?;
        answer
            .endpoint_address()
            .map(str::to_owned)
            .context("AWS IoT DescribeEndpoint answered without an endpointAddress")
    })?;
    if args.json {
        print_json(&serde_json::json!({
            "endpoint_address": address,
            "endpoint_type": ENDPOINT_TYPE,
        }))?;
    } else {
        println!("{address}");
    }
    Ok(Outcome::Success)
}
