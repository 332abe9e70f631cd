//! A tiny AWS IoT rules engine: a rule file of `rules/` (a `TopicRulePayload`) read as AWS IoT
//! reads it, so tests exercise the rule the stack deploys rather than a copy of its mapping.
//!
//! The SQL understood is the subset jitr's rules use, `SELECT * FROM 'filter'` and
//! `SELECT a AS b, c.d AS e, f FROM 'filter'` (SQL version 2016-03-23). Anything else (a
//! `WHERE`, a function, an operator) is refused when the rule is parsed, so a rule that grows
//! past this engine fails its tests instead of being half-understood. As in AWS IoT, a field the
//! message lacks is undefined and left out of the result; keywords are case-insensitive, field
//! names are not.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// A parsed topic rule.
#[derive(Debug, Clone)]
pub struct TopicRule {
    select: Select,
    from: String,
    document: Value,
}

/// What the SELECT takes from a message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Select {
    /// `*`: the message as it is.
    All,
    /// Each field (a dotted path) under its name in the result.
    Fields(Vec<(Vec<String>, String)>),
}

impl TopicRule {
    /// The rule in `text` (a `TopicRulePayload` as JSON) with each `${NAME}` of `vars`
    /// replaced by its value, as the stack's template fills them in.
    pub fn parse(text: &str, vars: &[(&str, &str)]) -> Result<TopicRule> {
        let mut text = text.to_owned();
        for (name, value) in vars {
            text = text.replace(&format!("${{{name}}}"), value);
        }
        let document: Value = serde_json::from_str(&text).context("the rule is not JSON")?;
        let sql = document["sql"].as_str().context("the rule has no sql")?;
        let version = document["awsIotSqlVersion"].as_str();
        if version != Some("2016-03-23") {
            bail!("SQL version {version:?}: only 2016-03-23 is understood");
        }
        let (select, from) = parse_sql(sql)?;
        Ok(TopicRule {
            select,
            from,
            document,
        })
    }

    /// The topic filter of the FROM clause.
    pub fn topic_filter(&self) -> &str {
        &self.from
    }

    /// The rule's payload, placeholders filled in.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// Whether the rule is enabled.
    pub fn enabled(&self) -> bool {
        !self.document["ruleDisabled"].as_bool().unwrap_or(false)
    }

    /// What the rule's actions receive for a message published on `topic`: `None` when the
    /// rule does not take that topic (or is disabled), else the SELECT's result.
    pub fn apply(&self, topic: &str, message: &Value) -> Option<Value> {
        if !self.enabled() || !crate::iot_endpoint::filter_matches(&self.from, topic) {
            return None;
        }
        Some(match &self.select {
            Select::All => message.clone(),
            Select::Fields(fields) => {
                let mut out = Map::new();
                for (path, name) in fields {
                    let found = path.iter().try_fold(message, |v, key| v.get(key));
                    if let Some(found) = found {
                        out.insert(name.clone(), found.clone());
                    }
                }
                Value::Object(out)
            }
        })
    }

    /// The table of the rule's `dynamoDBv2` action (PutItem of the SELECT's result), if it
    /// has one, with its placeholders filled in (an unfilled one is an error).
    pub fn dynamodb_v2_table(&self) -> Result<Option<String>> {
        let actions = self.document["actions"]
            .as_array()
            .context("the rule has no actions")?;
        let mut tables = actions
            .iter()
            .filter_map(|a| a.get("dynamoDBv2"))
            .map(|a| a["putItem"]["tableName"].as_str());
        match (tables.next(), tables.next()) {
            (None, _) => Ok(None),
            (Some(_), Some(_)) => bail!("more than one dynamoDBv2 action"),
            (Some(None), None) => bail!("the dynamoDBv2 action has no putItem.tableName"),
            (Some(Some(table)), None) if table.contains("${") => {
                bail!("the dynamoDBv2 action's table {table} is a placeholder nobody filled")
            }
            (Some(Some(table)), None) => Ok(Some(table.to_owned())),
        }
    }
}

/// SELECT's list and FROM's topic filter.
fn parse_sql(sql: &str) -> Result<(Select, String)> {
    let sql = sql.trim();
    let rest = strip_keyword(sql, "SELECT").context("the SQL does not start with SELECT")?;
    let from_at = find_keyword(rest, "FROM").context("the SQL has no FROM")?;
    let (list, tail) = rest.split_at(from_at);
    let tail = tail["FROM".len()..].trim();
    let Some(quoted) = tail.strip_prefix('\'') else {
        bail!("FROM takes a quoted topic filter: {tail}");
    };
    let Some((from, after)) = quoted.split_once('\'') else {
        bail!("FROM's topic filter is not closed: {tail}");
    };
    if !after.trim().is_empty() {
        bail!(
            "only SELECT ... FROM '...' is understood, not {:?}",
            after.trim()
        );
    }
    let list = list.trim();
    if list == "*" {
        return Ok((Select::All, from.to_owned()));
    }
    let mut fields = Vec::new();
    for part in list.split(',') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let (path, name) = match words.as_slice() {
            [path] => (*path, path.rsplit('.').next().unwrap_or(*path)),
            [path, as_, name] if as_.eq_ignore_ascii_case("AS") => (*path, *name),
            _ => bail!("only `field [AS name]` is understood in SELECT, not {part:?}"),
        };
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        if !path.iter().all(|p| identifier(p)) || !identifier(name) {
            bail!("only plain field names are understood in SELECT, not {part:?}");
        }
        fields.push((path, name.to_owned()));
    }
    if fields.is_empty() {
        bail!("SELECT names no field");
    }
    Ok((Select::Fields(fields), from.to_owned()))
}

fn identifier(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `text` after the keyword `word` (any case) and a space.
fn strip_keyword<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let head = text.get(..word.len())?;
    let rest = &text[word.len()..];
    (head.eq_ignore_ascii_case(word) && rest.starts_with(char::is_whitespace)).then_some(rest)
}

/// Where the keyword `word` (any case, a word of its own, outside quotes) starts in `text`.
fn find_keyword(text: &str, word: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut quoted = false;
    for (i, &byte) in bytes.iter().enumerate() {
        if byte == b'\'' {
            quoted = !quoted;
            continue;
        }
        let Some(candidate) = text.get(i..i + word.len()) else {
            continue;
        };
        let before = i == 0 || bytes[i - 1].is_ascii_whitespace();
        let after = bytes
            .get(i + word.len())
            .is_none_or(u8::is_ascii_whitespace);
        if !quoted && before && after && candidate.eq_ignore_ascii_case(word) {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(sql: &str) -> Result<TopicRule> {
        let doc = serde_json::json!({
            "sql": sql,
            "awsIotSqlVersion": "2016-03-23",
            "actions": [{"dynamoDBv2": {"roleArn": "${Role}", "putItem": {"tableName": "${Table}"}}}],
        });
        TopicRule::parse(&doc.to_string(), &[("Table", "t1")])
    }

    #[test]
    fn fields_are_renamed_and_undefined_ones_left_out() {
        let r = rule("select a AS x, b.c as y, d FROM 'top/+/ic'").unwrap();
        assert_eq!(r.topic_filter(), "top/+/ic");
        let message = serde_json::json!({"a": "1", "b": {"c": 2}, "e": 3});
        assert_eq!(
            r.apply("top/any/ic", &message),
            Some(serde_json::json!({"x": "1", "y": 2}))
        );
        assert_eq!(r.apply("top/any/other", &message), None);
        assert_eq!(r.apply("top/a/b/ic", &message), None);
        assert_eq!(r.dynamodb_v2_table().unwrap().as_deref(), Some("t1"));
    }

    #[test]
    fn star_passes_the_message_through() {
        let r = rule("SELECT * FROM '$aws/events/x/#'").unwrap();
        let message = serde_json::json!({"a": [1, 2]});
        assert_eq!(r.apply("$aws/events/x/y/z", &message), Some(message));
    }

    #[test]
    fn what_the_engine_does_not_understand_is_refused() {
        for sql in [
            "SELECT a FROM 't' WHERE a = 1",
            "SELECT upper(a) AS b FROM 't'",
            "SELECT a + 1 AS b FROM 't'",
            "SELECT a b FROM 't'",
            "SELECT a FROM t",
            "SELECT FROM 't'",
            "DELETE a FROM 't'",
        ] {
            assert!(rule(sql).is_err(), "{sql}");
        }
    }

    #[test]
    fn an_unfilled_table_placeholder_is_an_error() {
        let doc = serde_json::json!({
            "sql": "SELECT a FROM 't'",
            "awsIotSqlVersion": "2016-03-23",
            "actions": [{"dynamoDBv2": {"putItem": {"tableName": "${Table}"}}}],
        });
        let r = TopicRule::parse(&doc.to_string(), &[]).unwrap();
        assert!(r.dynamodb_v2_table().is_err());
    }

    #[test]
    fn the_presence_rule_takes_the_certificate_the_client_and_the_time() {
        let r = TopicRule::parse(
            include_str!("../../../rules/presence-rule.json"),
            &[("PresenceTable", "presence"), ("PresenceRoleArn", "arn")],
        )
        .unwrap();
        let event = serde_json::json!({
            "clientId": "dev-1", "timestamp": 1_702_562_499_818_i64, "eventType": "connected",
            "sessionIdentifier": "s", "principalIdentifier": "ab12", "ipAddress": "127.0.0.1",
            "versionNumber": 3,
        });
        assert_eq!(
            r.apply("$aws/events/presence/connected/dev-1", &event),
            Some(serde_json::json!({
                "device_id": "dev-1", "certificate_id": "ab12", "connected_at": 1_702_562_499_818_i64,
            }))
        );
        assert_eq!(
            r.apply("$aws/events/presence/disconnected/dev-1", &event),
            None
        );
        assert_eq!(r.dynamodb_v2_table().unwrap().as_deref(), Some("presence"));
    }
}
