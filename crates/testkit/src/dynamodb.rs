//! DynamoDB on a [`crate::moto::MotoServer`]: the tables the provisioner and the ledger use.

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;

/// Creates an on-demand table keyed by the string attribute `key`.
pub async fn create_table(client: &Client, table: &str, key: &str) -> Result<()> {
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(key)
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(key)
                .key_type(KeyType::Hash)
                .build()?,
        )
        .send()
        .await
        .with_context(|| format!("DynamoDB CreateTable {table}"))?;
    Ok(())
}

/// The string attribute `name` of the item whose `key` is `value`, if both exist.
pub async fn string_attribute(
    client: &Client,
    table: &str,
    key: (&str, &str),
    name: &str,
) -> Result<Option<String>> {
    let item = client
        .get_item()
        .table_name(table)
        .key(key.0, AttributeValue::S(key.1.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .with_context(|| format!("DynamoDB GetItem on {table}"))?
        .item;
    Ok(item
        .and_then(|item| item.get(name).cloned())
        .and_then(|v| v.as_s().ok().cloned()))
}
