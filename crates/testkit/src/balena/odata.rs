//! The slice of OData `$filter` the fake understands: `field eq literal` and `field gt integer`
//! (keyset paging), joined by `and`.
//!
//! Literals are `'text'` (a quote inside is doubled: `''`), integers, `true`, `false` and `null`.
//! Anything else is refused the way pinejs refuses a URL it cannot parse.

use serde_json::{Map, Value};

/// The message pinejs answers (HTTP 400) for a query it cannot parse.
const MALFORMED: &str = "Malformed url";

/// A literal on the right of `eq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Literal {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Eq,
    Gt,
}

/// A conjunction of conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Filter {
    pub(super) conditions: Vec<(String, Literal)>,
    /// The comparison of each condition, in the same order.
    pub(super) ops: Vec<Op>,
}

/// Parses a `$filter` value (already percent-decoded).
pub(super) fn parse_filter(input: &str) -> Result<Filter, String> {
    let mut parser = Parser { rest: input };
    let mut conditions = Vec::new();
    let mut ops = Vec::new();
    loop {
        parser.skip_spaces();
        let field = parser.identifier().ok_or(MALFORMED)?;
        let op = if parser.keyword("gt").is_some() {
            Op::Gt
        } else {
            parser.keyword("eq").ok_or(MALFORMED)?;
            Op::Eq
        };
        let literal = parser.literal().ok_or(MALFORMED)?;
        if op == Op::Gt && !matches!(literal, Literal::Int(_)) {
            return Err(MALFORMED.to_owned());
        }
        conditions.push((field.to_owned(), literal));
        ops.push(op);
        if parser.rest.trim_start_matches(' ').is_empty() {
            return Ok(Filter { conditions, ops });
        }
        parser.keyword("and").ok_or(MALFORMED)?;
    }
}

/// Whether `row` satisfies every condition; an unknown field or a type mismatch is an error.
pub(super) fn matches(filter: &Filter, row: &Map<String, Value>) -> Result<bool, String> {
    for ((field, literal), op) in filter.conditions.iter().zip(&filter.ops) {
        let value = row
            .get(field)
            .ok_or_else(|| format!("Unknown field '{field}' in $filter"))?;
        // A navigation property compares by the id it points at.
        let value = value.get("__id").unwrap_or(value);
        if *op == Op::Gt {
            let (Literal::Int(n), Value::Number(v)) = (literal, value) else {
                return Err(format!("Type mismatch comparing '{field}'"));
            };
            if v.as_i64().is_none_or(|v| v <= *n) {
                return Ok(false);
            }
            continue;
        }
        let equal = match (literal, value) {
            (Literal::Str(s), Value::String(v)) => s == v,
            (Literal::Int(n), Value::Number(v)) => v.as_i64() == Some(*n),
            (Literal::Bool(b), Value::Bool(v)) => b == v,
            (Literal::Null, v) => v.is_null(),
            _ => return Err(format!("Type mismatch comparing '{field}'")),
        };
        if !equal {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A cursor over the filter text.
struct Parser<'a> {
    rest: &'a str,
}

impl<'a> Parser<'a> {
    fn skip_spaces(&mut self) {
        self.rest = self.rest.trim_start_matches(' ');
    }

    /// `[A-Za-z_][A-Za-z0-9_]*`
    fn identifier(&mut self) -> Option<&'a str> {
        let first = self.rest.chars().next()?;
        if !(first.is_ascii_alphabetic() || first == '_') {
            return None;
        }
        let end = self
            .rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest.len());
        let (identifier, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(identifier)
    }

    /// ` word ` with at least one space on each side (the caller skipped none after the
    /// previous token).
    fn keyword(&mut self, word: &str) -> Option<()> {
        let after_space = self.rest.trim_start_matches(' ');
        if after_space.len() == self.rest.len() {
            return None;
        }
        let after_word = after_space.strip_prefix(word)?;
        let after = after_word.trim_start_matches(' ');
        if after.len() == after_word.len() {
            return None;
        }
        self.rest = after;
        Some(())
    }

    fn literal(&mut self) -> Option<Literal> {
        if let Some(mut rest) = self.rest.strip_prefix('\'') {
            let mut text = String::new();
            loop {
                let quote = rest.find('\'')?;
                text.push_str(&rest[..quote]);
                rest = &rest[quote + 1..];
                match rest.strip_prefix('\'') {
                    Some(after) => {
                        text.push('\'');
                        rest = after;
                    }
                    None => break,
                }
            }
            self.rest = rest;
            return Some(Literal::Str(text));
        }
        let end = self
            .rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(self.rest.len());
        let (token, rest) = self.rest.split_at(end);
        let literal = match token {
            "true" => Literal::Bool(true),
            "false" => Literal::Bool(false),
            "null" => Literal::Null,
            _ if token.bytes().all(|b| b.is_ascii_digit() || b == b'-') => {
                Literal::Int(token.parse().ok()?)
            }
            _ => return None,
        };
        self.rest = rest;
        Some(literal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greater_than_takes_integers_for_keyset_paging() {
        let filter = parse_filter("belongs_to__application eq 7 and id gt 41").unwrap();
        assert_eq!(filter.ops, [Op::Eq, Op::Gt]);
        let row = |id: i64| {
            serde_json::json!({"id": id, "belongs_to__application": {"__id": 7}})
                .as_object()
                .unwrap()
                .clone()
        };
        assert!(!matches(&filter, &row(41)).unwrap());
        assert!(matches(&filter, &row(42)).unwrap());
        assert!(parse_filter("uuid gt 'a'").is_err());
    }

    fn conditions(input: &str) -> Vec<(String, Literal)> {
        parse_filter(input).unwrap().conditions
    }

    #[test]
    fn parses_the_fleet_check_filter() {
        assert_eq!(
            conditions("uuid eq '0123abcd' and belongs_to__application eq 1234567"),
            vec![
                ("uuid".to_owned(), Literal::Str("0123abcd".to_owned())),
                ("belongs_to__application".to_owned(), Literal::Int(1234567)),
            ]
        );
    }

    #[test]
    fn unescapes_doubled_quotes_and_reads_other_literals() {
        assert_eq!(
            conditions("name eq 'it''s' and is_active eq true and x eq null"),
            vec![
                ("name".to_owned(), Literal::Str("it's".to_owned())),
                ("is_active".to_owned(), Literal::Bool(true)),
                ("x".to_owned(), Literal::Null),
            ]
        );
        assert_eq!(
            conditions("name eq ''''"),
            vec![("name".to_owned(), Literal::Str("'".to_owned()))]
        );
    }

    #[test]
    fn refuses_what_it_cannot_parse() {
        for bad in [
            "",
            "uuid",
            "uuid eq",
            "uuid eq 'open",
            "uuid eq 'a' or id eq 1",
            "uuid eq 'a' and",
            "uuideq 'a'",
            "uuid eq'a'",
            "uuid ne 'a'",
            "(uuid eq 'a')",
            "uuid eq \"a\"",
            "id eq 12x",
            "uuid eq 'a' extra",
        ] {
            assert_eq!(parse_filter(bad), Err(MALFORMED.to_owned()), "{bad:?}");
        }
    }

    #[test]
    fn matches_values_and_navigation_ids() {
        let row = serde_json::json!({"uuid": "u", "belongs_to__application": {"__id": 7}});
        let Value::Object(row) = row else {
            unreachable!()
        };
        let filter = parse_filter("uuid eq 'u' and belongs_to__application eq 7").unwrap();
        assert_eq!(matches(&filter, &row), Ok(true));
        let filter = parse_filter("belongs_to__application eq 8").unwrap();
        assert_eq!(matches(&filter, &row), Ok(false));
        assert!(matches(&parse_filter("nope eq 1").unwrap(), &row).is_err());
        assert!(matches(&parse_filter("uuid eq 1").unwrap(), &row).is_err());
    }
}
