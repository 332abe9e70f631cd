//! AWS IoT policy evaluation, as far as the data plane needs it: `Allow`/`Deny` statements
//! over `iot:Connect`, `iot:Publish`, `iot:Subscribe` and `iot:Receive` (or `iot:*`), resource
//! ARNs with `*` and `?` wildcards and the policy variables `${iot:Connection.Thing.ThingName}`,
//! `${iot:Connection.Thing.IsAttached}` and `${iot:ClientId}`, and the `Bool` condition on
//! `iot:Connection.Thing.IsAttached`. An explicit Deny wins; nothing allowed is denied.
//! A statement with any other condition never matches, so the stand-in errs on refusing.

use serde_json::Value;

/// What the policy variables of one connection stand for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The MQTT client id.
    pub client_id: String,
    /// Whether a Thing named as the client id is attached to the certificate.
    pub attached: bool,
}

impl Context {
    /// The Thing name variable: the client id when that Thing is attached, else empty (a
    /// resource naming it then matches nothing).
    fn thing_name(&self) -> &str {
        if self.attached {
            &self.client_id
        } else {
            ""
        }
    }

    fn expand(&self, pattern: &str) -> String {
        pattern
            .replace("${iot:Connection.Thing.ThingName}", self.thing_name())
            .replace(
                "${iot:Connection.Thing.IsAttached}",
                if self.attached { "true" } else { "false" },
            )
            .replace("${iot:ClientId}", &self.client_id)
    }
}

/// One statement, parsed.
#[derive(Debug, Clone)]
struct Statement {
    allow: bool,
    actions: Vec<String>,
    resources: Vec<String>,
    /// `Bool` conditions on `iot:Connection.Thing.IsAttached`: the value required.
    attached: Option<bool>,
    /// A condition this evaluator does not know: the statement never matches.
    unknown_condition: bool,
}

/// The policies attached to one certificate.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    statements: Vec<Statement>,
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

impl Policies {
    /// Parses policy documents (JSON text); one that does not parse grants nothing.
    pub fn parse<'a>(documents: impl IntoIterator<Item = &'a str>) -> Policies {
        let mut statements = Vec::new();
        for document in documents {
            let Ok(doc) = serde_json::from_str::<Value>(document) else {
                continue;
            };
            let listed = match doc.get("Statement") {
                Some(Value::Array(items)) => items.clone(),
                Some(one @ Value::Object(_)) => vec![one.clone()],
                _ => Vec::new(),
            };
            for s in listed {
                let mut attached = None;
                let mut unknown_condition = false;
                if let Some(Value::Object(conditions)) = s.get("Condition") {
                    for (operator, tests) in conditions {
                        let Value::Object(tests) = tests else {
                            unknown_condition = true;
                            continue;
                        };
                        for (key, value) in tests {
                            let wanted = value.as_str().or_else(|| {
                                value
                                    .as_array()
                                    .and_then(|a| a.first())
                                    .and_then(Value::as_str)
                            });
                            match (operator.as_str(), key.as_str(), wanted) {
                                ("Bool", "iot:Connection.Thing.IsAttached", Some(v)) => {
                                    attached = Some(v.eq_ignore_ascii_case("true"));
                                }
                                _ => unknown_condition = true,
                            }
                        }
                    }
                }
                statements.push(Statement {
                    allow: s.get("Effect").and_then(Value::as_str) == Some("Allow"),
                    actions: strings(s.get("Action")),
                    resources: strings(s.get("Resource")),
                    attached,
                    unknown_condition,
                });
            }
        }
        Policies { statements }
    }

    /// Whether `action` (e.g. `iot:Publish`) on `resource` (a full ARN) is allowed.
    pub fn allows(&self, action: &str, resource: &str, ctx: &Context) -> bool {
        let matching = |s: &&Statement| {
            !s.unknown_condition
                && s.attached.is_none_or(|want| want == ctx.attached)
                && s.actions.iter().any(|a| action_matches(a, action))
                && s.resources.iter().any(|r| glob(&ctx.expand(r), resource))
        };
        let hits: Vec<&Statement> = self.statements.iter().filter(matching).collect();
        !hits.is_empty() && hits.iter().all(|s| s.allow)
    }
}

fn action_matches(pattern: &str, action: &str) -> bool {
    glob(&pattern.to_ascii_lowercase(), &action.to_ascii_lowercase())
}

/// `*` matches any run of characters, `?` any one; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:iot:us-east-1:123456789012";

    fn device_policy() -> Policies {
        Policies::parse([crate::iot::device_policy("balena").as_str()])
    }

    #[test]
    fn the_device_policy_lets_a_device_act_only_as_its_attached_thing() {
        let p = device_policy();
        let me = Context {
            client_id: "dev1".into(),
            attached: true,
        };
        assert!(p.allows("iot:Connect", &format!("{ARN}:client/dev1"), &me));
        assert!(p.allows(
            "iot:Publish",
            &format!("{ARN}:topic/balena/dev1/sensors"),
            &me
        ));
        assert!(p.allows(
            "iot:Subscribe",
            &format!("{ARN}:topicfilter/balena/dev1/cmd"),
            &me
        ));
        assert!(!p.allows("iot:Publish", &format!("{ARN}:topic/sensors"), &me));
        assert!(!p.allows(
            "iot:Publish",
            &format!("{ARN}:topic/balena/dev2/sensors"),
            &me
        ));
        // A client id whose Thing is not attached to the certificate connects as nothing.
        let other = Context {
            client_id: "dev2".into(),
            attached: false,
        };
        assert!(!p.allows("iot:Connect", &format!("{ARN}:client/dev2"), &other));
    }

    #[test]
    fn an_explicit_deny_wins_and_unknown_conditions_never_match() {
        let p = Policies::parse([r#"{"Statement": [
            {"Effect": "Allow", "Action": "iot:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "iot:Publish", "Resource": "arn:*:topic/secret"},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": "*", "Condition": {"StringEquals": {"x": "y"}}}
        ]}"#]);
        let ctx = Context::default();
        assert!(p.allows("iot:Publish", "arn:aws:iot:r:a:topic/open", &ctx));
        assert!(!p.allows("iot:Publish", "arn:aws:iot:r:a:topic/secret", &ctx));
        assert!(glob("a*c?e", "abbbcde") && !glob("a*c", "abd"));
    }
}
