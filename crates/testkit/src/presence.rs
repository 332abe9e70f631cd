//! The stack's presence topic rule (`rules/presence-rule.json`) run against moto's DynamoDB:
//! what AWS IoT's rules engine does with each connected lifecycle event the
//! [`crate::iot_endpoint::IotEndpoint`] publishes. The rule file is parsed
//! ([`crate::topic_rule::TopicRule`]); its SELECT makes the item and its `dynamoDBv2` action
//! names the table the item is put into, so the tests exercise the rule as deployed.
//!
//! [`create_presence_table`] makes the table as the stack does: `device_id` (partition key, S),
//! `certificate_id` (sort key, S).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::Notify;

use crate::iot_endpoint::PresenceSink;
use crate::topic_rule::TopicRule;

/// The rule as the stack deploys it, placeholders unfilled.
pub const PRESENCE_RULE: &str = include_str!("../../../rules/presence-rule.json");
/// The table's partition key (the template's `KeySchema`).
pub const PARTITION_KEY: &str = "device_id";
/// The table's sort key.
pub const SORT_KEY: &str = "certificate_id";

/// Creates the presence table `table`: on demand, keyed by device and certificate.
pub async fn create_presence_table(client: &Client, table: &str) -> Result<()> {
    let string = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |name: &str, kind| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string(PARTITION_KEY)?)
        .attribute_definitions(string(SORT_KEY)?)
        .key_schema(key(PARTITION_KEY, KeyType::Hash)?)
        .key_schema(key(SORT_KEY, KeyType::Range)?)
        .send()
        .await
        .with_context(|| format!("DynamoDB CreateTable {table}"))?;
    Ok(())
}

/// One message the rule was given, and what its action did.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The topic the message came on.
    pub topic: String,
    /// The SELECT's result (`None`: the rule does not take that topic, no action ran).
    pub item: Option<Value>,
    /// The PutItem's outcome (`Ok` too when no action ran).
    pub result: Result<(), String>,
}

/// The presence rule with its DynamoDBv2 action, over moto.
#[derive(Debug)]
pub struct PresenceRule {
    rule: TopicRule,
    table: String,
    client: Client,
    deliveries: Mutex<Vec<Delivery>>,
    changed: Notify,
}

impl PresenceRule {
    /// `rules/presence-rule.json` with its table placeholder filled in as `table`, its action
    /// writing through `client`.
    pub fn new(client: Client, table: &str) -> Result<Arc<PresenceRule>> {
        PresenceRule::from_text(client, PRESENCE_RULE, table)
    }

    /// Another rule text (a test's variant of the file).
    pub fn from_text(client: Client, text: &str, table: &str) -> Result<Arc<PresenceRule>> {
        let rule = TopicRule::parse(
            text,
            &[
                ("PresenceTable", table),
                ("PresenceRoleArn", "arn:aws:iam::123456789012:role/presence"),
            ],
        )?;
        let Some(table) = rule.dynamodb_v2_table()? else {
            bail!("the presence rule has no dynamoDBv2 action");
        };
        Ok(Arc::new(PresenceRule {
            rule,
            table,
            client,
            deliveries: Mutex::new(Vec::new()),
            changed: Notify::new(),
        }))
    }

    /// The sink to give the endpoint ([`crate::iot_endpoint::EndpointOptions::presence`]).
    pub fn sink(self: &Arc<Self>) -> PresenceSink {
        let rule = Arc::clone(self);
        Arc::new(
            move |topic: String, event: Value| -> BoxFuture<'static, ()> {
                let rule = Arc::clone(&rule);
                Box::pin(async move { rule.deliver(topic, event).await })
            },
        )
    }

    /// Runs the rule on one message: the SELECT, then PutItem of its result.
    pub async fn deliver(&self, topic: String, message: Value) {
        let item = self.rule.apply(&topic, &message);
        let result = match &item {
            None => Ok(()),
            Some(item) => self.put(item).await,
        };
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Delivery {
                topic,
                item,
                result,
            });
        self.changed.notify_waiters();
    }

    /// What DynamoDBv2 does: each field of the result an attribute, PutItem (replacing an item
    /// of the same key).
    async fn put(&self, item: &Value) -> Result<(), String> {
        let Value::Object(fields) = item else {
            return Err(format!("the SELECT's result is not an object: {item}"));
        };
        let attributes: HashMap<String, AttributeValue> = fields
            .iter()
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect();
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(attributes))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "PutItem {}: {}",
                    self.table,
                    aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                )
            })
    }

    /// Every message handed to the rule so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `count` messages were handed to the rule (at most `timeout`); all of them.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            let now = self.deliveries();
            if now.len() >= count {
                return Ok(now);
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                bail!(
                    "{} presence event(s) after {timeout:?}, {count} expected",
                    now.len()
                );
            }
        }
    }
}

/// A JSON value as the DynamoDBv2 action stores it.
fn attribute(value: &Value) -> AttributeValue {
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(items) => AttributeValue::L(items.iter().map(attribute).collect()),
        Value::Object(fields) => AttributeValue::M(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), attribute(v)))
                .collect(),
        ),
    }
}
