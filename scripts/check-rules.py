#!/usr/bin/env python3
"""Checks rules/ and infra/template.yaml against the project's security properties.

Usage:
    scripts/check-rules.py [--root DIR]   check the repository (default: this checkout)
    scripts/check-rules.py --self-test    break temp copies on purpose; every break must be caught

Each property is reported as `ok` or `FAIL` with the reason; the last line is
`N passed, M failed`. Exit status: 0 when everything passed, 1 otherwise.

rules/ is the source of truth; the template embeds copies of it. The conventions
(placeholders in CloudFormation Fn::Sub syntax, IoT policy variables written
`${iot:...}` in rules/ and `${!iot:...}` in the template) are in rules/README.md.
Needs only the standard library plus cfn-lint's YAML loader (PyYAML as a fallback).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RULE_FILES = ("device-policy.json", "activator-policy.json", "topic-rule.json")
TEMPLATE = Path("infra/template.yaml")

# --- conventions shared with rules/README.md --------------------------------

THING = "${iot:Connection.Thing.ThingName}"
IOT_ARN = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:"
RULE_SQL = "SELECT * FROM '$aws/events/certificates/registered/${CaCertificateId}'"

PSEUDO_PARAMETERS = {"AWS::Partition", "AWS::Region", "AWS::AccountId"}
# Every placeholder rules/ may use besides the pseudo parameters.
PLACEHOLDERS = {
    "CaCertificateId",
    "TopicPrefix",
    "BalenaApiKeySecretArn",
    "LogGroupName",
    "FailureQueueArn",
    "FailureQueueUrl",
    "FunctionArn",
    "RuleErrorRoleArn",
}
# How the template spells (as Ref / GetAtt / Fn::Sub variable) what rules/ names
# by placeholder. Anything not listed keeps its name (template parameters).
TEMPLATE_ALIASES = {
    "ActivatorFunction.Arn": "FunctionArn",
    "FailureQueue": "FailureQueueUrl",
    "FailureQueue.Arn": "FailureQueueArn",
    "RuleErrorActionRole.Arn": "RuleErrorRoleArn",
    "ActivatorLogGroup": "LogGroupName",
}

# --- what the policies may grant ----------------------------------------------

DEVICE_ACTIONS = {"iot:Connect", "iot:Publish", "iot:Receive", "iot:Subscribe"}
DEVICE_TOPIC_ROOTS = (f"${{TopicPrefix}}/{THING}/", f"$aws/things/{THING}/shadow/")

ACTIVATOR_IOT_ACTIONS = {
    "iot:DescribeCertificate",
    "iot:DescribeCACertificate",
    "iot:UpdateCertificate",
    "iot:CreateThing",
    "iot:DescribeThing",
    "iot:AttachPolicy",
    "iot:AttachThingPrincipal",
    "iot:ListCertificatesByCA",
    "iot:AddThingToThingGroup",
}
ACTIVATOR_OTHER_ACTIONS = {
    "secretsmanager:GetSecretValue": {"${BalenaApiKeySecretArn}"},
    "logs:CreateLogStream": {
        "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${LogGroupName}:*"
    },
    "logs:PutLogEvents": {
        "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${LogGroupName}:*"
    },
    "sqs:SendMessage": {"${FailureQueueArn}"},
}
FORBIDDEN_ACTIONS = {"iot:*", "iot:CreatePolicy", "iot:CreatePolicyVersion", "iot:DeleteThing"}
ACTIVATOR_IOT_RESOURCE_TYPES = {"cert", "cacert", "thing", "thinggroup", "policy"}
# Resource types each IoT action authorises on, from the Service Authorization
# Reference; used when cfn-lint's copy of it (Policies.json) cannot be read.
# An empty set means the action has no resource-level permissions: only "*" works.
IOT_ACTION_RESOURCE_TYPES_FALLBACK = {
    "describecertificate": {"cert"},
    "describecacertificate": {"cacert"},
    "updatecertificate": {"cert"},
    "creatething": {"thing", "billinggroup"},
    "describething": {"thing"},
    "attachpolicy": {"cert", "thinggroup"},
    "attachthingprincipal": {"cert"},
    "listcertificatesbyca": set(),
    "addthingtothinggroup": {"thing", "thinggroup"},
}

# Values each parameter must accept and reject, as CloudFormation checks them at
# deploy time. A parameter without an entry here fails the check: every input
# has to be shown to refuse malformed values.
PARAMETER_SAMPLES = {
    "CaCertificateId": (
        ["0" * 64, "0123456789abcdef" * 4],
        ["", "a" * 63, "a" * 65, "A" * 64, "g" * 64, "+", "#", " " + "a" * 63],
    ),
    "BalenaFleetId": (["1", "2048576", "123456789012"], ["", "abc", "1234567890123", "-1", "12 ", "1.5"]),
    "BalenaApiKeySecretId": (
        [
            "jitr/balena-api-key",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:jitr/balena-api-key-AbC123",
        ],
        [
            "",
            "has space",
            "name:with:colons",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:partial",
            "arn:aws:s3:::bucket",
            "*",
        ],
    ),
    "PolicyName": (["jitr-device", "a" * 128], ["", "a" * 129, "bad name", "a:b", "*", "a/b"]),
    "TopicPrefix": (
        ["balena", "fleet/balena", "a_b-c"],
        ["", "/balena", "balena/", "bal+ena", "balena/#", "$aws", "a//b", "x" * 65, "a b"],
    ),
    "RuleName": (["jitr_certificate_registered"], ["", "jitr-rule", "a" * 129, "a b"]),
    "ReservedConcurrency": (["1", "5", "100"], ["0", "-1", "101"]),
    "RejectAction": (["revoke", "deactivate"], ["", "Revoke", "delete", "revoke "]),
    "MaximumEventAgeSeconds": (["60", "3600", "21600"], ["59", "21601", "0"]),
    "LogRetentionDays": (["30", "90", "365"], ["0", "2", "10000"]),
    "ThingTypeName": (["", "balena-device"], ["a b", "a" * 129, "*"]),
    "ThingGroupName": (["", "fleet:42"], ["a b", "a" * 129, "*"]),
    "AlarmTopicArn": (
        ["", "arn:aws:sns:eu-west-1:123456789012:jitr-alarms"],
        ["jitr-alarms", "arn:aws:sqs:eu-west-1:123456789012:q", "arn:aws:sns:eu-west-1:1234:t"],
    ),
}

VAR = re.compile(r"\$\{([^}]*)\}")


class NotComparable(Exception):
    """A template value has no rules/ form (an intrinsic the normaliser does not map)."""


# --- loading -----------------------------------------------------------------


def load_template(path: Path) -> dict:
    """Parses a CloudFormation YAML template into plain dicts/lists, short tags expanded."""
    try:
        from cfnlint.decode import decode
    except ImportError:
        return _load_template_pyyaml(path)
    template, matches = decode(str(path))
    if matches:
        raise ValueError("; ".join(str(m) for m in matches))
    return json.loads(json.dumps(template))


def _load_template_pyyaml(path: Path) -> dict:
    import yaml  # cfn-lint depends on PyYAML, so it is here whenever cfn-lint was

    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if suffix == "Ref":
            return {"Ref": value}
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {"Fn::" + suffix: value}

    Loader.add_multi_constructor("!", intrinsic)
    return json.loads(json.dumps(yaml.load(path.read_text(), Loader=Loader)))


def iot_action_resource_types() -> dict[str, set[str]]:
    """Resource types per IoT action (lowercase name), from cfn-lint's Service Authorization data."""
    try:
        import cfnlint

        data = json.loads((Path(cfnlint.__file__).parent / "data/AdditionalSpecs/Policies.json").read_text())
        return {name: set(info.get("Resources", [])) for name, info in data["iot"]["Actions"].items()}
    except Exception:  # noqa: BLE001 - any trouble reading it: use the built-in table
        return dict(IOT_ACTION_RESOURCE_TYPES_FALLBACK)


# --- normalising template copies to rules/ form ----------------------------


def _alias(name: str) -> str:
    return TEMPLATE_ALIASES.get(name, name)


def _sub_to_rules(text: str, local: set[str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("!"):  # Fn::Sub's escape for a literal ${...}
            return "${" + name[1:] + "}"
        return "${" + (name if name in local else _alias(name)) + "}"

    return VAR.sub(repl, text)


def to_rules_form(node, where: str = "$", capitalised_keys: bool = False):
    """Turns a template copy into what the rules/ file must say, or raises NotComparable."""
    if isinstance(node, dict):
        if len(node) == 1:
            ((key, value),) = node.items()
            if key == "Ref":
                return "${" + _alias(value) + "}"
            if key == "Fn::GetAtt":
                name = value if isinstance(value, str) else ".".join(value)
                return "${" + _alias(name) + "}"
            if key == "Fn::Sub":
                if isinstance(value, str):
                    return _sub_to_rules(value, set())
                text, variables = value
                return _sub_to_rules(text, set(variables))
            if key.startswith("Fn::"):
                raise NotComparable(f"{where}: {key} has no rules/ form")
        out = {}
        for key, value in node.items():
            rules_key = key[:1].lower() + key[1:] if capitalised_keys else key
            out[rules_key] = to_rules_form(value, f"{where}.{key}", capitalised_keys)
        return out
    if isinstance(node, list):
        return [to_rules_form(v, f"{where}[{i}]", capitalised_keys) for i, v in enumerate(node)]
    return node


def diff_paths(a, b, where: str = "$") -> list[str]:
    """Where two JSON values differ (rules/ copy a, template copy b), for the report."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in b:
                out.append(f"{where}.{key} only in rules/")
            elif key not in a:
                out.append(f"{where}.{key} only in the template")
            else:
                out += diff_paths(a[key], b[key], f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_paths(x, y, f"{where}[{i}]")]
    if a != b:
        return [f"{where}: rules/ {json.dumps(a)} != template {json.dumps(b)}"]
    return []


# --- helpers -------------------------------------------------------------------


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def statements(policy: dict) -> list[dict]:
    return as_list(policy.get("Statement"))


def allow_statements(policy: dict) -> list[dict]:
    return [s for s in statements(policy) if s.get("Effect") == "Allow"]


def strings_in(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def sub_strings_in(node):
    """Every Fn::Sub template string in a template fragment."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Fn::Sub":
                yield value if isinstance(value, str) else value[0]
            yield from sub_strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from sub_strings_in(value)


def resources_of_type(template: dict, type_name: str) -> dict[str, dict]:
    return {k: v for k, v in template.get("Resources", {}).items() if v.get("Type") == type_name}


def parameter_accepts(spec: dict, value: str) -> bool:
    """Whether CloudFormation would accept `value` for a parameter declared as `spec`."""
    if "AllowedValues" in spec and value not in [str(v) for v in spec["AllowedValues"]]:
        return False
    if spec.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            return False
        if "MinValue" in spec and number < float(spec["MinValue"]):
            return False
        if "MaxValue" in spec and number > float(spec["MaxValue"]):
            return False
        return True
    if "AllowedPattern" in spec and re.fullmatch(spec["AllowedPattern"], value) is None:
        return False
    if "MinLength" in spec and len(value) < int(spec["MinLength"]):
        return False
    if "MaxLength" in spec and len(value) > int(spec["MaxLength"]):
        return False
    return True


# --- the checks ------------------------------------------------------------------

CHECKS: list[tuple[str, object]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn

    return register


class Context:
    """The parsed inputs. A part that failed to parse is None; its checks then fail."""

    def __init__(self, root: Path):
        self.root = root
        self.errors: dict[str, str] = {}
        self.rules: dict[str, dict | None] = {}
        for path in sorted((root / "rules").glob("*.json")):
            try:
                self.rules[path.name] = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                self.rules[path.name] = None
                self.errors[f"rules/{path.name}"] = str(err)
        try:
            self.template = load_template(root / TEMPLATE)
        except Exception as err:  # noqa: BLE001 - report any loader failure as a finding
            self.template = None
            self.errors[str(TEMPLATE)] = str(err)

    def rule(self, name: str) -> dict:
        doc = self.rules.get(name)
        if doc is None:
            raise Missing(f"rules/{name} is missing or did not parse")
        return doc

    def tpl(self) -> dict:
        if self.template is None:
            raise Missing(f"{TEMPLATE} did not parse")
        return self.template

    def resource(self, logical_id: str, type_name: str) -> dict:
        res = self.tpl().get("Resources", {}).get(logical_id)
        if res is None or res.get("Type") != type_name:
            raise Missing(f"template has no {type_name} named {logical_id}")
        return res.get("Properties", {})

    def embedded(self, rules_name: str) -> tuple[object, str]:
        """The template's copy of a rules/ file, its logical location."""
        if rules_name == "device-policy.json":
            return self.resource("DevicePolicy", "AWS::IoT::Policy").get("PolicyDocument"), "DevicePolicy"
        if rules_name == "activator-policy.json":
            for policy in self.resource("ActivatorRole", "AWS::IAM::Role").get("Policies", []):
                if policy.get("PolicyName") == "jitr-activator":
                    return policy.get("PolicyDocument"), "ActivatorRole jitr-activator"
            raise Missing("ActivatorRole has no inline policy named jitr-activator")
        if rules_name == "topic-rule.json":
            props = self.resource("CertificateRegisteredRule", "AWS::IoT::TopicRule")
            return props.get("TopicRulePayload"), "CertificateRegisteredRule"
        raise Missing(f"no template copy is known for rules/{rules_name}")

    def versions(self, rules_name: str) -> list[tuple[str, dict]]:
        """The rules/ file and the template's copy in rules/ form, each with a label.

        A copy that cannot be normalised is left out here; the identity check reports it.
        """
        out = [(f"rules/{rules_name}", self.rule(rules_name))]
        copy_doc, where = self.embedded(rules_name)
        try:
            doc = to_rules_form(copy_doc, where, capitalised_keys=rules_name == "topic-rule.json")
        except NotComparable:
            return out
        if isinstance(doc, dict):
            out.append((f"template {where}", doc))
        return out


class Missing(Exception):
    """An input a check needs is absent."""


@check("inputs: rules/*.json and infra/template.yaml parse")
def _(ctx: Context):
    out = [f"{where}: {err}" for where, err in ctx.errors.items()]
    for name in RULE_FILES:
        if name not in ctx.rules:
            out.append(f"rules/{name} is missing")
    return out


@check("rules/: placeholders are known, IoT variables unescaped")
def _(ctx: Context):
    out = []
    for name, doc in ctx.rules.items():
        if doc is None:
            continue
        for text in strings_in(doc):
            for var in VAR.findall(text):
                if var.startswith("!"):
                    out.append(f"rules/{name}: '${{{var}}}' is the template's escape; rules/ writes '${{{var[1:]}}}'")
                elif var.startswith("iot:"):
                    if name != "device-policy.json":
                        out.append(f"rules/{name}: IoT policy variable '${{{var}}}' outside the device policy")
                elif var not in PSEUDO_PARAMETERS and var not in PLACEHOLDERS:
                    out.append(f"rules/{name}: unknown placeholder '${{{var}}}' (see rules/README.md)")
    return out


@check("template: IoT policy variables inside Fn::Sub are escaped as ${!iot:...}")
def _(ctx: Context):
    out = []
    for text in sub_strings_in(ctx.tpl()):
        for var in VAR.findall(text):
            if var.startswith(("iot:", "aws:")):
                out.append(f"Fn::Sub '{text}': write '${{!{var}}}' so CloudFormation leaves it to AWS IoT")
    return out


for _rules_name in RULE_FILES:

    def _identical(ctx: Context, rules_name: str = _rules_name):
        rules_doc = ctx.rule(rules_name)
        copy_doc, where = ctx.embedded(rules_name)
        try:
            normalised = to_rules_form(copy_doc, where, capitalised_keys=rules_name == "topic-rule.json")
        except NotComparable as err:
            return [str(err)]
        return [f"{where}: {d}" for d in diff_paths(rules_doc, normalised)]

    check(f"template copy of rules/{_rules_name} is identical to rules/")(_identical)


# topic rule


@check("topic rule: SQL selects exactly the trusted CA's registered topic, no wildcard")
def _(ctx: Context):
    out = []
    for where, rule in ctx.versions("topic-rule.json"):
        sql = rule.get("sql")
        if not isinstance(sql, str):
            out.append(f"{where}: no SQL statement")
            continue
        topic = re.findall(r"FROM\s+'([^']*)'", sql)
        if any(c in t for t in topic for c in "+#"):
            out.append(f"{where}: topic {topic} has an MQTT wildcard; it must name the one trusted CA")
        if sql != RULE_SQL:
            out.append(f"{where}: SQL is {sql!r}, must be exactly {RULE_SQL!r}")
    return out


@check("topic rule: enabled, SQL version 2016-03-23, one Lambda action to the activator")
def _(ctx: Context):
    out = []
    for where, rule in ctx.versions("topic-rule.json"):
        if rule.get("ruleDisabled") is not False:
            out.append(f"{where}: ruleDisabled must be false")
        if rule.get("awsIotSqlVersion") != "2016-03-23":
            out.append(f"{where}: awsIotSqlVersion must be 2016-03-23")
        if rule.get("actions") != [{"lambda": {"functionArn": "${FunctionArn}"}}]:
            out.append(f"{where}: actions must be one lambda action on ${{FunctionArn}}, got {rule.get('actions')}")
    return out


@check("topic rule: has an error action that keeps undelivered events")
def _(ctx: Context):
    out = []
    keeping = {"sqs", "cloudwatchLogs", "s3", "firehose", "kinesis", "dynamoDB", "dynamoDBv2", "sns"}
    for where, rule in ctx.versions("topic-rule.json"):
        action = rule.get("errorAction")
        if not action:
            out.append(f"{where}: no error action")
            continue
        kinds = set(action)
        if not kinds & keeping:
            out.append(f"{where}: error action {sorted(kinds)} does not store the event")
    return out


# device policy


@check("device policy: no wildcard action, no NotAction/NotResource, only connect/publish/receive/subscribe")
def _(ctx: Context):
    out = []
    for where, doc in ctx.versions("device-policy.json"):
        for s in statements(doc):
            for key in ("NotAction", "NotResource", "NotPrincipal"):
                if key in s:
                    out.append(f"{where} {s.get('Sid')}: {key} widens the grant; list what is allowed")
            for action in as_list(s.get("Action")):
                if "*" in action or "?" in action:
                    out.append(f"{where} {s.get('Sid')}: wildcard action {action!r}")
                elif s.get("Effect") == "Allow" and action not in DEVICE_ACTIONS:
                    out.append(f"{where} {s.get('Sid')}: action {action!r} is not one a device needs")
    return out


@check("device policy: no bare '*' resource, every resource an IoT ARN of this account")
def _(ctx: Context):
    out = []
    for where, doc in ctx.versions("device-policy.json"):
        for s in allow_statements(doc):
            for res in as_list(s.get("Resource")):
                if res == "*":
                    out.append(f"{where} {s.get('Sid')}: bare '*' resource")
                elif not res.startswith(IOT_ARN):
                    out.append(f"{where} {s.get('Sid')}: {res!r} does not start with {IOT_ARN!r}")
    return out


@check("device policy: connect only as client/<own thing name>, only while the thing is attached")
def _(ctx: Context):
    out = []
    wanted = IOT_ARN + "client/" + THING
    for where, doc in ctx.versions("device-policy.json"):
        connects = [s for s in allow_statements(doc) if "iot:Connect" in as_list(s.get("Action"))]
        if not connects:
            out.append(f"{where}: no statement allows iot:Connect")
        for s in connects:
            resources = as_list(s.get("Resource"))
            if resources != [wanted]:
                out.append(f"{where} {s.get('Sid')}: iot:Connect on {resources}, must be only {wanted!r}")
            attached = (s.get("Condition") or {}).get("Bool", {}).get("iot:Connection.Thing.IsAttached")
            if [str(v).lower() for v in as_list(attached)] != ["true"]:
                out.append(f"{where} {s.get('Sid')}: iot:Connect lacks Bool iot:Connection.Thing.IsAttached = true")
    return out


@check("device policy: topics only under <TopicPrefix>/<thing>/ and the thing's own shadow")
def _(ctx: Context):
    out = []
    kind_for = {"iot:Publish": "topic/", "iot:Receive": "topic/", "iot:Subscribe": "topicfilter/"}
    for where, doc in ctx.versions("device-policy.json"):
        for s in allow_statements(doc):
            label = f"{where} {s.get('Sid')}"
            actions = [a for a in as_list(s.get("Action")) if a in kind_for]
            for res in as_list(s.get("Resource")):
                path = res[len(IOT_ARN):] if res.startswith(IOT_ARN) else res
                if path.startswith(("topic/", "topicfilter/")):
                    name = path.split("/", 1)[1]
                    if not name.startswith(DEVICE_TOPIC_ROOTS):
                        out.append(f"{label}: {res!r} is outside the device's own topics")
                    if any(c in name for c in "+#"):
                        out.append(f"{label}: {res!r} uses an MQTT wildcard (literal in a policy)")
                for action in actions:
                    if not path.startswith(kind_for[action]):
                        out.append(f"{label}: {action} on {res!r}; it takes {kind_for[action]}...")
    return out


# activator IAM policy


def _activator_grants(ctx: Context):
    """(label, statement, action) for every Allow of every version of the activator policy."""
    for where, doc in ctx.versions("activator-policy.json"):
        for s in allow_statements(doc):
            for action in as_list(s.get("Action")):
                yield f"{where} {s.get('Sid')}", s, action


@check("activator policy: only the actions the activator calls, none forbidden")
def _(ctx: Context):
    out = []
    allowed = ACTIVATOR_IOT_ACTIONS | set(ACTIVATOR_OTHER_ACTIONS)
    for where, doc in ctx.versions("activator-policy.json"):
        for s in statements(doc):
            for key in ("NotAction", "NotResource", "NotPrincipal"):
                if key in s:
                    out.append(f"{where} {s.get('Sid')}: {key} widens the grant")
        granted = {a for s in allow_statements(doc) for a in as_list(s.get("Action"))}
        for action in sorted(allowed - granted):
            out.append(f"{where}: {action} is not granted; the activator calls it")
    for label, _s, action in _activator_grants(ctx):
        if action in FORBIDDEN_ACTIONS or "*" in action or "?" in action:
            out.append(f"{label}: forbidden action {action!r}")
        elif action not in allowed:
            out.append(f"{label}: {action!r} is not an action the activator calls")
    return out


@check("activator policy: IoT actions scoped to their resource types, '*' only where IAM allows nothing else")
def _(ctx: Context):
    out = []
    types_for = iot_action_resource_types()
    for label, s, action in _activator_grants(ctx):
        if not action.startswith("iot:") or "*" in action:  # wildcards: the check above
            continue
        supported = types_for.get(action[4:].lower())
        if supported is None:
            out.append(f"{label}: {action} is unknown to the Service Authorization data")
            continue
        for res in as_list(s.get("Resource")):
            if res == "*":
                if supported:
                    out.append(f"{label}: {action} on '*'; it supports {sorted(supported)} ARNs")
                elif len(as_list(s.get("Action"))) > 1:
                    out.append(f"{label}: '*' is needed by {action} only; give it a statement of its own")
                continue
            if not res.startswith(IOT_ARN):
                out.append(f"{label}: {action} on {res!r}, not an IoT ARN of this account")
                continue
            rtype = res[len(IOT_ARN):].split("/", 1)[0]
            if rtype not in ACTIVATOR_IOT_RESOURCE_TYPES:
                out.append(f"{label}: resource type {rtype!r} is not among {sorted(ACTIVATOR_IOT_RESOURCE_TYPES)}")
            elif rtype not in supported:
                out.append(f"{label}: {action} is not authorised on {rtype} ARNs ({res!r}), a dead grant")
    return out


@check("activator policy: secret, logs and queue grants limited to its own resources")
def _(ctx: Context):
    out = []
    for label, s, action in _activator_grants(ctx):
        wanted = ACTIVATOR_OTHER_ACTIONS.get(action)
        if wanted is None:
            continue
        resources = set(as_list(s.get("Resource")))
        if resources != wanted:
            out.append(f"{label}: {action} on {sorted(resources)}, must be {sorted(wanted)}")
    return out


@check("activator role: exactly the rules/ policy, no managed policies, used by the function")
def _(ctx: Context):
    out = []
    role = ctx.resource("ActivatorRole", "AWS::IAM::Role")
    names = [p.get("PolicyName") for p in role.get("Policies", [])]
    if names != ["jitr-activator"]:
        out.append(f"ActivatorRole has inline policies {names}, must be only jitr-activator")
    if role.get("ManagedPolicyArns"):
        out.append("ActivatorRole has ManagedPolicyArns (e.g. AWSLambdaBasicExecutionRole grants logs on '*')")
    fn = ctx.resource("ActivatorFunction", "AWS::Serverless::Function")
    if fn.get("Role") != {"Fn::GetAtt": ["ActivatorRole", "Arn"]}:
        out.append("ActivatorFunction must run as ActivatorRole")
    if "Policies" in fn:
        out.append("ActivatorFunction has SAM Policies; they would widen the role")
    return out


# the rest of the template


@check("function: provided.al2023 on arm64, bootstrap handler, 128 MB, bounded timeout, reserved concurrency")
def _(ctx: Context):
    out = []
    fn = ctx.resource("ActivatorFunction", "AWS::Serverless::Function")
    expected = {
        "Runtime": "provided.al2023",
        "Architectures": ["arm64"],
        "Handler": "bootstrap",
        "MemorySize": 128,
        "ReservedConcurrentExecutions": {"Ref": "ReservedConcurrency"},
    }
    for key, value in expected.items():
        if fn.get(key) != value:
            out.append(f"{key} is {fn.get(key)!r}, must be {value!r}")
    timeout = fn.get("Timeout")
    if not isinstance(timeout, int) or not 10 <= timeout <= 60:
        out.append(f"Timeout is {timeout!r}, must be 10..60 s")
    spec = ctx.tpl().get("Parameters", {}).get("ReservedConcurrency", {})
    if spec.get("Type") != "Number" or "MinValue" not in spec or float(spec["MinValue"]) < 1:
        out.append("parameter ReservedConcurrency must be a Number with MinValue >= 1")
    return out


@check("function: environment follows the activator contract")
def _(ctx: Context):
    out = []
    env = ctx.resource("ActivatorFunction", "AWS::Serverless::Function").get("Environment", {}).get("Variables", {})
    expected = {
        "JITR_TRUSTED_CA_IDS": [{"Ref": "CaCertificateId"}],
        "JITR_POLICY_NAME": [{"Ref": "DevicePolicy"}, {"Ref": "PolicyName"}],
        "JITR_FLEET_BACKEND": ["balena"],
        "BALENA_FLEET_ID": [{"Ref": "BalenaFleetId"}],
        "BALENA_API_KEY_SECRET_ID": [{"Ref": "BalenaApiKeySecretId"}],
        "JITR_REJECT_ACTION": [{"Ref": "RejectAction"}],
    }
    for name, choices in expected.items():
        if env.get(name) not in choices:
            out.append(f"{name} is {env.get(name)!r}, must be one of {choices}")
    if "BALENA_API_KEY" in env:
        out.append("BALENA_API_KEY must not be in the environment; the key lives in Secrets Manager")
    policy = ctx.resource("DevicePolicy", "AWS::IoT::Policy")
    if policy.get("PolicyName") != {"Ref": "PolicyName"}:
        out.append("DevicePolicy's PolicyName must be the PolicyName parameter")
    return out


@check("lambda permission: iot.amazonaws.com, scoped by SourceArn (the rule) and SourceAccount")
def _(ctx: Context):
    out = []
    perms = resources_of_type(ctx.tpl(), "AWS::Lambda::Permission")
    if not perms:
        out.append("no AWS::Lambda::Permission")
    for name, res in perms.items():
        props = res.get("Properties", {})
        if props.get("Principal") != "iot.amazonaws.com":
            out.append(f"{name}: Principal must be iot.amazonaws.com")
        if not props.get("SourceAccount"):
            out.append(f"{name}: no SourceAccount")
        source_arn = props.get("SourceArn")
        if not source_arn:
            out.append(f"{name}: no SourceArn")
        else:
            arn = to_rules_form(source_arn)
            rule_arn = {IOT_ARN + "rule/${RuleName}", "${CertificateRegisteredRule.Arn}"}
            if arn not in rule_arn:
                out.append(f"{name}: SourceArn {arn!r} is not the topic rule's ARN")
    return out


@check("event invoke config: on-failure destination, bounded event age, at most 2 retries")
def _(ctx: Context):
    out = []
    configs = resources_of_type(ctx.tpl(), "AWS::Lambda::EventInvokeConfig")
    if not configs:
        out.append("no AWS::Lambda::EventInvokeConfig")
    params = ctx.tpl().get("Parameters", {})
    for name, res in configs.items():
        props = res.get("Properties", {})
        destination = props.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination")
        if destination != {"Fn::GetAtt": ["FailureQueue", "Arn"]}:
            out.append(f"{name}: OnFailure destination must be the failure queue, got {destination!r}")
        age = props.get("MaximumEventAgeInSeconds")
        if isinstance(age, dict) and "Ref" in age:
            age = params.get(age["Ref"], {}).get("MaxValue")
        if age is None:
            out.append(f"{name}: no MaximumEventAgeInSeconds")
        elif not 60 <= float(age) <= 21600:
            out.append(f"{name}: MaximumEventAgeInSeconds may reach {age}, must stay within 60..21600")
        if props.get("MaximumRetryAttempts") not in (0, 1, 2):
            out.append(f"{name}: MaximumRetryAttempts is {props.get('MaximumRetryAttempts')!r}, must be at most 2")
    return out


@check("observability: log group with retention, alarms on Lambda errors and a non-empty failure queue")
def _(ctx: Context):
    out = []
    props = ctx.resource("ActivatorLogGroup", "AWS::Logs::LogGroup")
    if "RetentionInDays" not in props:
        out.append("ActivatorLogGroup has no RetentionInDays")
    fn = ctx.resource("ActivatorFunction", "AWS::Serverless::Function")
    if fn.get("LoggingConfig", {}).get("LogGroup") != {"Ref": "ActivatorLogGroup"}:
        out.append("ActivatorFunction must log to ActivatorLogGroup (LoggingConfig.LogGroup)")
    alarms = [r.get("Properties", {}) for r in resources_of_type(ctx.tpl(), "AWS::CloudWatch::Alarm").values()]

    def has_alarm(namespace, metric, dimension):
        return any(
            a.get("Namespace") == namespace and a.get("MetricName") == metric and dimension in a.get("Dimensions", [])
            for a in alarms
        )

    if not has_alarm("AWS/Lambda", "Errors", {"Name": "FunctionName", "Value": {"Ref": "ActivatorFunction"}}):
        out.append("no alarm on AWS/Lambda Errors of ActivatorFunction")
    queue_dim = {"Name": "QueueName", "Value": {"Fn::GetAtt": ["FailureQueue", "QueueName"]}}
    if not has_alarm("AWS/SQS", "ApproximateNumberOfMessagesVisible", queue_dim):
        out.append("no alarm on ApproximateNumberOfMessagesVisible of FailureQueue")
    return out


@check("parameters: every one constrained; malformed samples refused, good ones accepted")
def _(ctx: Context):
    out = []
    params = ctx.tpl().get("Parameters", {})
    for name, spec in params.items():
        constrained = any(k in spec for k in ("AllowedPattern", "AllowedValues")) or (
            spec.get("Type") == "Number" and "MinValue" in spec
        )
        if not constrained:
            out.append(f"{name}: no AllowedPattern/AllowedValues/MinValue")
        if name not in PARAMETER_SAMPLES:
            out.append(f"{name}: no samples in PARAMETER_SAMPLES to show malformed values fail")
            continue
        good, bad = PARAMETER_SAMPLES[name]
        out += [f"{name}: refuses good value {v!r}" for v in good if not parameter_accepts(spec, v)]
        out += [f"{name}: accepts malformed value {v!r}" for v in bad if parameter_accepts(spec, v)]
        if "Default" in spec and not parameter_accepts(spec, str(spec["Default"])):
            out.append(f"{name}: its own Default {spec['Default']!r} is refused")
    for name in PARAMETER_SAMPLES:
        if name not in params:
            out.append(f"parameter {name} is missing")
    return out


@check("outputs: function ARN, rule name, failure queue URL, device policy name")
def _(ctx: Context):
    outputs = {k: v.get("Value") for k, v in ctx.tpl().get("Outputs", {}).items()}
    wanted = {
        "function ARN": {"Fn::GetAtt": ["ActivatorFunction", "Arn"]},
        "rule name": {"Ref": "CertificateRegisteredRule"},
        "failure queue URL": {"Ref": "FailureQueue"},
        "device policy name": {"Ref": "DevicePolicy"},
    }
    return [f"no output with the {what}" for what, value in wanted.items() if value not in outputs.values()]


# --- running -----------------------------------------------------------------------


def run_checks(root: Path) -> tuple[int, list[str]]:
    """Runs every check against `root`; prints one line each and returns (passed, failed names)."""
    ctx = Context(root)
    passed, failed = 0, []
    for name, fn in CHECKS:
        try:
            problems = fn(ctx)
        except Missing as err:
            problems = [f"not checked: {err}"]
        except Exception as err:  # noqa: BLE001 - a malformed input must be a finding, not a crash
            problems = [f"could not check: {type(err).__name__}: {err}"]
        if problems:
            failed.append(name)
            print(f"FAIL {name}")
            for problem in problems:
                print(f"     - {problem}")
        else:
            passed += 1
            print(f"ok   {name}")
    return passed, failed


# Each mutation breaks one property in a temp copy: (what, file, old text, new text,
# the check that must fail). `old` must occur in the file, so a mutation cannot
# silently stop applying when the files change.
MUTATIONS = [
    ("iot:* in the activator policy", "rules/activator-policy.json",
     '"iot:DescribeCertificate",', '"iot:*",\n        "iot:DescribeCertificate",',
     "activator policy: only the actions"),
    ("iot:DeleteThing in the activator policy", "rules/activator-policy.json",
     '"iot:DescribeThing"', '"iot:DescribeThing",\n        "iot:DeleteThing"',
     "activator policy: only the actions"),
    ("iot:CreatePolicy in the activator policy", "rules/activator-policy.json",
     '"iot:DescribeThing"', '"iot:DescribeThing",\n        "iot:CreatePolicy"',
     "activator policy: only the actions"),
    ("Resource '*' on certificate actions", "rules/activator-policy.json",
     '"Resource": "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:cert/*"', '"Resource": "*"',
     "activator policy: IoT actions scoped"),
    ("secret grant widened", "rules/activator-policy.json",
     '"Resource": "${BalenaApiKeySecretArn}"', '"Resource": "*"',
     "activator policy: secret, logs and queue"),
    ("iot:* only in the template's copy of the activator policy", "infra/template.yaml",
     "                  - iot:DescribeCertificate\n", "                  - iot:*\n                  - iot:DescribeCertificate\n",
     "activator policy: only the actions"),
    ("template's device policy connects as any client", "infra/template.yaml",
     ":client/${!iot:Connection.Thing.ThingName}", ":client/*",
     "device policy: connect only"),
    ("iot:* in the device policy", "rules/device-policy.json",
     '"Action": "iot:Subscribe"', '"Action": ["iot:Subscribe", "iot:*"]',
     "device policy: no wildcard action"),
    ("bare '*' resource in the device policy", "rules/device-policy.json",
     '"Action": "iot:Subscribe",\n      "Resource": [', '"Action": "iot:Subscribe",\n      "Resource": [\n        "*",',
     "device policy: no bare '*' resource"),
    ("connect as any client", "rules/device-policy.json",
     ":client/${iot:Connection.Thing.ThingName}", ":client/*",
     "device policy: connect only"),
    ("IsAttached condition dropped", "rules/device-policy.json",
     '"iot:Connection.Thing.IsAttached": "true"', '"iot:Connection.Thing.IsAttached": "false"',
     "device policy: connect only"),
    ("topic outside the device's own", "rules/device-policy.json",
     ":topic/${TopicPrefix}/${iot:Connection.Thing.ThingName}/*", ":topic/${TopicPrefix}/*",
     "device policy: topics only"),
    ("rule listens on every CA", "rules/topic-rule.json",
     "registered/${CaCertificateId}'", "registered/+'",
     "topic rule: SQL selects exactly"),
    ("rule error action dropped", "infra/template.yaml",
     "        ErrorAction:\n          Sqs:\n            QueueUrl: !Ref FailureQueue\n"
     "            RoleArn: !GetAtt RuleErrorActionRole.Arn\n            UseBase64: false\n", "",
     "topic rule: has an error action"),
    ("Lambda permission without SourceAccount", "infra/template.yaml",
     "      SourceAccount: !Ref AWS::AccountId\n      SourceArn:", "      SourceArn:",
     "lambda permission"),
    ("Lambda permission without SourceArn", "infra/template.yaml",
     '      SourceArn: !Sub "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:rule/${RuleName}"\n\n'
     "  RuleErrorActionRole:", "\n  RuleErrorActionRole:",
     "lambda permission"),
    ("no MaximumEventAgeInSeconds", "infra/template.yaml",
     "      MaximumEventAgeInSeconds: !Ref MaximumEventAgeSeconds\n", "",
     "event invoke config"),
    ("no on-failure destination", "infra/template.yaml",
     "      DestinationConfig:\n        OnFailure:\n          Destination: !GetAtt FailureQueue.Arn\n", "",
     "event invoke config"),
    ("template copy drifts from rules/", "infra/template.yaml",
     "Sid: SubscribeToItsOwnTopics", "Sid: SubscribeAnywhere",
     "template copy of rules/device-policy.json"),
    ("IoT variable not escaped in Fn::Sub", "infra/template.yaml",
     ":client/${!iot:Connection.Thing.ThingName}", ":client/${iot:Connection.Thing.ThingName}",
     "template: IoT policy variables inside Fn::Sub"),
    ("CA id pattern loosened", "infra/template.yaml",
     'AllowedPattern: "^[0-9a-f]{64}$"', 'AllowedPattern: ".*"',
     "parameters: every one constrained"),
    ("unknown placeholder in rules/", "rules/activator-policy.json",
     "${FailureQueueArn}", "${FailureQueue}",
     "rules/: placeholders are known"),
]


def self_test() -> int:
    passed = failed = 0

    def record(ok: bool, what: str, detail: str = "") -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"ok   {what}")
        else:
            failed += 1
            print(f"FAIL {what}{': ' + detail if detail else ''}")

    with tempfile.TemporaryDirectory(prefix="check-rules-") as tmp:
        pristine = Path(tmp) / "pristine"
        (pristine / "infra").mkdir(parents=True)
        shutil.copytree(REPO / "rules", pristine / "rules")
        shutil.copy2(REPO / TEMPLATE, pristine / TEMPLATE)

        buf = io.StringIO()
        with redirect_stdout(buf):
            _, failures = run_checks(pristine)
        record(not failures, "the unmodified files pass", f"failing: {failures}\n{buf.getvalue()}")

        for i, (what, rel, old, new, expected) in enumerate(MUTATIONS):
            work = Path(tmp) / f"m{i}"
            shutil.copytree(pristine, work)
            target = work / rel
            text = target.read_text()
            if old not in text:
                record(False, f"mutation '{what}'", f"text to replace no longer in {rel}; update MUTATIONS")
                continue
            target.write_text(text.replace(old, new, 1))
            buf = io.StringIO()
            with redirect_stdout(buf):
                _, failures = run_checks(work)
            caught = [f for f in failures if f.startswith(expected)]
            record(bool(caught), f"mutation '{what}' is caught by '{expected}...'",
                   f"failing checks were {failures}")

    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO, help="repository root to check (default: this checkout)")
    parser.add_argument("--self-test", action="store_true", help="check that broken copies are caught")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    passed, failed = run_checks(args.root)
    print(f"{passed} passed, {len(failed)} failed")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
