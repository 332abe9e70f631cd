#!/usr/bin/env python3
"""rules/ is the one source of the device policy, the activator's IAM policy and the topic rule;
infra/template.yaml takes them from there.

    scripts/rules.py render      rewrite the template's generated blocks from rules/
    scripts/rules.py check       the blocks match rules/, the security properties hold, every
                                 grant is one AWS's authorization reference allows, every invoke
                                 permission and service trust names its source
    scripts/rules.py self-test   break copies on purpose: every break must be caught
    scripts/rules.py all-on      print the template with every optional part on (SAM-transformed)
    scripts/rules.py lint        checkov and parliament over that, skips as rules/lint-skips.json says

A generated block in the template starts with `# rules: FILE [| VAR: EXPR]...` on the line
before its key and ends with `# end rules: FILE`. Rendering turns rules/' JSON into YAML:
strings holding `${...}` become `!Sub`, IoT policy variables are escaped as `${!iot:...}`,
placeholders become the template's names (ALIASES), a `| VAR: EXPR` becomes a Fn::Sub
variable, and the topic rule's keys are capitalised as CloudFormation spells them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "infra/template.yaml"
# Where jitr's default topic prefix lives: what the CLI delivers as CLOUD_CONSUMER_TOPIC.
DELIVERY = "crates/balena/src/delivery.rs"
ALIASES = {"FunctionArn": "ActivatorFunction.Arn", "FailureQueueUrl": "FailureQueue",
           "FailureQueueArn": "FailureQueue.Arn", "RuleErrorRoleArn": "RuleErrorActionRole.Arn",
           "LogGroupName": "ActivatorLogGroup", "DeadLetterQueueArn": "DeadLetterQueue.Arn",
           "ProvisionerLogGroupName": "ProvisionerLogGroup",
           "AttemptsTableArn": "ProvisioningAttemptsTable.Arn",
           "ProvisioningTemplateName": "ProvisioningTemplateName",
           "LedgerTableArn": "LedgerTable.Arn",
           "PresenceTable": "PresenceTable", "PresenceTableArn": "PresenceTable.Arn",
           "PresenceRoleArn": "PresenceRuleRole.Arn"}
# Files rendered as one JSON string (a property CloudFormation takes as text), not as YAML.
STRING_BLOCKS = {"fleet-provisioning-template.json"}
RULE_FILES = {"device-policy.json", "activator-policy.json", "topic-rule.json",
              "provisioner-policy.json", "fleet-provisioning-template.json", "claim-policy.json",
              "activator-ledger-policy.json", "factory-ledger-policy.json",
              "presence-rule.json", "presence-writer-policy.json"}
BLOCK = re.compile(r"^(?P<indent> *)# rules: (?P<file>[\w.-]+)(?P<vars>(?: \| [^\n]*)?)\n"
                   r"(?P=indent)(?P<key>\w+):(?P<inline>[^\n]*)\n(?P<body>.*?)"
                   r"^(?P=indent)# end rules: (?P=file)\n",
                   re.M | re.S)
THING = "${iot:Connection.Thing.ThingName}"
IOT_ARN = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:"
DEVICE_ACTIONS = {"iot:Connect", "iot:Publish", "iot:Receive", "iot:Subscribe"}
# The activator's grants: action -> the only resources it may have.
ACTIVATOR = {
    **{a: {IOT_ARN + "cert/*"} for a in ("iot:DescribeCertificate", "iot:UpdateCertificate",
                                         "iot:AttachPolicy", "iot:AttachThingPrincipal",
                                         "iot:DetachThingPrincipal")},
    "iot:DescribeCACertificate": {IOT_ARN + "cacert/*"},
    # DescribeThing: the revocation mark `jitr revoke --id` leaves (#21).
    **{a: {IOT_ARN + "thing/*"} for a in ("iot:CreateThing", "iot:DescribeThing",
                                         "iot:ListThingPrincipals")},
    "iot:AddThingToThingGroup": {IOT_ARN + "thing/*", IOT_ARN + "thinggroup/*"},
    # No resource-level permissions exist for this one: IAM honours only "*".
    "iot:ListCertificatesByCA": {"*"},
    "secretsmanager:GetSecretValue": {"${BalenaApiKeySecretArn}"},
    "logs:CreateLogStream": {"arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${LogGroupName}:*"},
    "logs:PutLogEvents": {"arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${LogGroupName}:*"},
    **{a: {"${FailureQueueArn}"} for a in ("sqs:SendMessage", "sqs:ReceiveMessage",
                                           "sqs:DeleteMessage", "sqs:GetQueueAttributes")},
}
# The provisioner's grants: action -> the only resources it may have.
PROVISIONER = {
    **{a: {IOT_ARN + "cert/*"} for a in ("iot:DescribeCertificate",
                                         "iot:UpdateCertificate", "iot:AttachPolicy",
                                         "iot:AttachThingPrincipal", "iot:DetachThingPrincipal")},
    "iot:DescribeCACertificate": {IOT_ARN + "cacert/*"},
    # DescribeThing: the revocation mark `jitr revoke --id` leaves (#21).
    **{a: {IOT_ARN + "thing/*"} for a in ("iot:CreateThing", "iot:DescribeThing",
                                         "iot:ListThingPrincipals")},
    "iot:AddThingToThingGroup": {IOT_ARN + "thing/*", IOT_ARN + "thinggroup/*"},
    # No resource-level permissions exist for these: IAM honours only "*".
    "iot:RegisterCertificate": {"*"},
    "iot:DescribeEndpoint": {"*"},
    **{a: {"${ProvisionerCaKeyArn}"} for a in ("kms:DescribeKey", "kms:GetPublicKey", "kms:Sign")},
    # Attempts, and an unfinished undo read back and cleared on the device's next request (#21).
    **{a: {"${AttemptsTableArn}"} for a in ("dynamodb:GetItem", "dynamodb:PutItem",
                                           "dynamodb:DeleteItem")},
    "secretsmanager:GetSecretValue": {"${BalenaApiKeySecretArn}"},
    **{a: {"arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${ProvisionerLogGroupName}:*"}
       for a in ("logs:CreateLogStream", "logs:PutLogEvents")},
}
# The ledger: the activator reads and marks, the factory writes issued certificates (batches,
# and `jitr ledger import`'s updates); nothing scans, queries or deletes one item.
ACTIVATOR_LEDGER = {a: {"${LedgerTableArn}"} for a in ("dynamodb:GetItem", "dynamodb:UpdateItem")}
FACTORY_LEDGER = {a: {"${LedgerTableArn}"} for a in ("dynamodb:BatchWriteItem", "dynamodb:UpdateItem")}
# Where the ledger's DynamoDB calls are made, and for whom: function in LEDGER_CODE -> (the
# policy that must grant its calls, the helpers whose attribute names it writes too).
LEDGER_CODE = "crates/activator/src/dynamodb/ledger.rs"
LEDGER_NAMES = "crates/activator/src/ledger.rs"
LEDGER_CALLS = {
    "entry": ("activator-ledger-policy.json", ()),     # the activator's check under `require`
    "mark": ("activator-ledger-policy.json", ()),      # the activator's (and sweep's) marks
    "put_chunk": ("factory-ledger-policy.json", ("put_request", "attributes")),  # issue --ledger
    "add": ("factory-ledger-policy.json", ()),         # jitr ledger import
}


def q(text: str) -> str:
    return json.dumps(text)


def scalar(value, variables: dict[str, str]) -> str:
    if not isinstance(value, str):
        return json.dumps(value)
    if "${" not in value:
        return q(value)
    text = re.sub(r"\$\{(\w+(?:::\w+)?)\}", lambda m: "${" + ALIASES.get(m[1], m[1]) + "}",
                  value.replace("${iot:", "${!iot:"))
    local = {v: e for v, e in variables.items() if "${" + v + "}" in text}
    if not local:
        return f"!Sub {q(text)}"
    return f"!Sub [{q(text)}, {{{', '.join(f'{v}: {e}' for v, e in local.items())}}}]"


def to_yaml(node, indent: int, variables: dict[str, str], capitalise: bool) -> list[str]:
    pad, lines = " " * indent, []
    items = node.items() if isinstance(node, dict) else ((None, v) for v in node)
    for key, value in items:
        if key is not None and capitalise:
            key = key[:1].upper() + key[1:]
        head = f"{pad}{key}:" if key is not None else f"{pad}-"
        if isinstance(value, (dict, list)) and value:
            if key is None and isinstance(value, dict):
                inner = to_yaml(value, indent + 2, variables, capitalise)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(head)
                lines += to_yaml(value, indent + 2, variables, capitalise)
        else:
            lines.append(f"{head} {scalar(value, variables)}")
    return lines


def render(text: str, rules: Path) -> str:
    def block(m: re.Match) -> str:
        variables = dict(v.split(": ", 1) for v in m["vars"].split(" | ")[1:])
        document = json.loads((rules / m["file"]).read_text())
        head = f"{m['indent']}# rules: {m['file']}{m['vars']}\n"
        tail = f"{m['indent']}# end rules: {m['file']}\n"
        if m["file"] in STRING_BLOCKS:
            text = json.dumps(document, separators=(",", ":"))
            return head + f"{m['indent']}{m['key']}: {scalar(text, variables)}\n" + tail
        body = to_yaml(document, len(m["indent"]) + 2, variables, m["file"].endswith("-rule.json"))
        return head + f"{m['indent']}{m['key']}:\n" + "\n".join(body) + "\n" + tail
    return BLOCK.sub(block, text)


def allows(policy: dict) -> list[dict]:
    return [s for s in policy["Statement"] if s.get("Effect") == "Allow"]


def listed(value) -> list:
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------
# IAM grants against AWS's Service Authorization Reference.
#
# Actions, their resource types and the resource types' ARN formats come from the copy that
# cfn-lint ships (cfnlint/data/AdditionalSpecs/Policies.json, regenerated from AWS's reference
# with every cfn-lint release; cfn-lint is pinned in scripts/setup). That copy does not say which
# condition keys an action takes, nor which of its resource types are required: those come from
# parliament's copy (parliament/iam_definition.json, pinned in scripts/setup too), which is older
# (it lacks actions AWS added since), so it is used only for what cfn-lint's lacks.

PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012",
          "AWS::StackName": "jitr", "AWS::URLSuffix": "amazonaws.com", "AWS::NoValue": None}
# Values for parameters without a usable default, so every ARN can be built and matched.
PARAM_SAMPLES = {
    "CaCertificateId": "a" * 64, "BalenaFleetId": "1234567",
    "BalenaApiKeySecretId": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:jitr/balena-api-key-AbCdEf",
    "ProvisionerCaKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    "AlarmTopicArn": "arn:aws:sns:eu-west-1:123456789012:jitr-alarms",
    "ThingTypeName": "jitr-device", "ThingGroupName": "jitr-fleet",
    "ProvisionerTokenSecretId": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:jitr/provision-token-AbCdEf",
}
# Every optional part of the stack on: the parameters `all-on` sets (the other defaults stand).
ALL_ON = {"BalenaApiKeySecretId": PARAM_SAMPLES["BalenaApiKeySecretId"],
          "CaCertificateId": PARAM_SAMPLES["CaCertificateId"], "BalenaFleetId": PARAM_SAMPLES["BalenaFleetId"],
          "ProvisionerCaKeyArn": PARAM_SAMPLES["ProvisionerCaKeyArn"], "FleetProvisioning": "true",
          "DeviceDefenderAudit": "true", "Ledger": "require", "AlarmTopicArn": PARAM_SAMPLES["AlarmTopicArn"],
          "ThingTypeName": PARAM_SAMPLES["ThingTypeName"], "ThingGroupName": PARAM_SAMPLES["ThingGroupName"],
          "ProvisionerTokenSecretId": PARAM_SAMPLES["ProvisionerTokenSecretId"]}
# What a resource's Ref and Fn::GetAtt give, by resource type ({n}: the logical id).
R, A = PSEUDO["AWS::Region"], PSEUDO["AWS::AccountId"]
REFS = {"AWS::SQS::Queue": f"https://sqs.{R}.amazonaws.com/{A}/{{n}}",
        "AWS::Logs::LogGroup": "/jitr/jitr/{n}", "AWS::DynamoDB::Table": "{n}",
        "AWS::IoT::Policy": "{n}", "AWS::IoT::TopicRule": "{n}", "AWS::Serverless::Function": "{n}",
        "AWS::Lambda::Function": "{n}", "AWS::IAM::Role": "{n}", "AWS::Events::Rule": "{n}",
        "AWS::IAM::ManagedPolicy": f"arn:aws:iam::{A}:policy/{{n}}",
        "AWS::IoT::ProvisioningTemplate": "{n}", "AWS::IoT::CertificateProvider": "{n}"}
ARNS = {"AWS::SQS::Queue": f"arn:aws:sqs:{R}:{A}:{{n}}",
        "AWS::DynamoDB::Table": f"arn:aws:dynamodb:{R}:{A}:table/{{n}}",
        "AWS::Serverless::Function": f"arn:aws:lambda:{R}:{A}:function:{{n}}",
        "AWS::Lambda::Function": f"arn:aws:lambda:{R}:{A}:function:{{n}}",
        "AWS::IAM::Role": f"arn:aws:iam::{A}:role/{{n}}",
        "AWS::Logs::LogGroup": f"arn:aws:logs:{R}:{A}:log-group:/jitr/jitr/{{n}}:*",
        "AWS::Events::Rule": f"arn:aws:events:{R}:{A}:rule/{{n}}",
        "AWS::IoT::TopicRule": f"arn:aws:iot:{R}:{A}:rule/{{n}}"}
# The keys every action takes (IAM's global condition context keys); `/` ends a prefix.
GLOBAL_KEYS = {k.lower() for k in (
    "aws:SourceAccount", "aws:SourceArn", "aws:SourceOrgID", "aws:SourceOrgPaths", "aws:SourceIp",
    "aws:SourceVpc", "aws:SourceVpce", "aws:VpcSourceIp", "aws:SecureTransport", "aws:CurrentTime",
    "aws:EpochTime", "aws:PrincipalArn", "aws:PrincipalAccount", "aws:PrincipalOrgID",
    "aws:PrincipalOrgPaths", "aws:PrincipalType", "aws:PrincipalIsAWSService",
    "aws:PrincipalServiceName", "aws:PrincipalServiceNamesList", "aws:userid", "aws:username",
    "aws:MultiFactorAuthPresent", "aws:MultiFactorAuthAge", "aws:RequestedRegion",
    "aws:ResourceAccount", "aws:ResourceOrgID", "aws:ResourceOrgPaths", "aws:TagKeys",
    "aws:CalledVia", "aws:CalledViaFirst", "aws:CalledViaLast", "aws:ViaAWSService",
    "aws:TokenIssueTime", "aws:UserAgent", "aws:Referer", "aws:SourceIdentity",
    "aws:FederatedProvider")}
GLOBAL_PREFIXES = ("aws:principaltag/", "aws:resourcetag/", "aws:requesttag/")
# Service principals whose calls carry the ARN of the resource acting: their trusts and
# permissions must name it (aws:SourceArn). Lambda assumes an execution role for a function
# whose ARN the role cannot name (the function names the role), so it gets the account only.
SOURCE_ARN_SERVICES = {"iot.amazonaws.com", "events.amazonaws.com"}


def cfnlint_dir() -> Path:
    import cfnlint  # scripts/setup installs it
    return Path(cfnlint.__file__).parent


def lint_venv() -> Path:
    """Where scripts/setup installs checkov and parliament (their own venv: checkov pins an old
    boto3 that moto's must not be replaced with)."""
    import os
    return Path(os.environ.get("JITR_LINT_VENV", Path.home() / ".cache/jitr/lint-venv"))


def parliament_definition() -> Path:
    found = sorted(lint_venv().glob("lib/python*/site-packages/parliament/iam_definition.json"))
    if not found:
        raise SystemExit(f"rules.py: parliament is not installed in {lint_venv()} (run scripts/setup)")
    return found[-1]


class Reference:
    """AWS's Service Authorization Reference: cfn-lint's copy, with parliament's condition keys."""

    def __init__(self):
        specs = json.loads((cfnlint_dir() / "data/AdditionalSpecs/Policies.json").read_text())
        # Lowercase throughout: the copy spells some resource types both ways ("Secret", "secret").
        self.services = {prefix.lower(): {
            "Actions": {a.lower(): {"Resources": sorted({k.lower() for k in v.get("Resources", [])})}
                        for a, v in spec.get("Actions", {}).items()},
            "Resources": {k.lower(): v for k, v in spec.get("Resources", {}).items()}}
            for prefix, spec in specs.items()}
        self.keys: dict[str, set[str]] = {}       # "svc:action" -> condition keys (lowercase)
        self.required: dict[str, set[str]] = {}   # "svc:action" -> required resource types
        for service in json.loads(parliament_definition().read_text()):
            prefix = service["prefix"].lower()
            for p in service["privileges"]:
                name = f"{prefix}:{p['privilege'].lower()}"
                keys = {k.lower() for r in p["resource_types"] for k in r["condition_keys"]}
                for r in p["resource_types"]:
                    kind = r["resource_type"]
                    if kind.endswith("*"):
                        self.required.setdefault(name, set()).add(kind[:-1].lower())
                        keys |= {k.lower() for res in service["resources"]
                                 if res["resource"] == kind[:-1] for k in res.get("condition_keys", [])}
                self.keys[name] = keys

    @classmethod
    def cached(cls) -> "Reference":
        if not hasattr(cls, "_cached"):
            cls._cached = cls()
        return cls._cached

    def actions(self, pattern: str) -> list[str]:
        """The actions `pattern` names (wildcards expanded), lowercase `svc:action`."""
        import fnmatch
        prefix, _, name = pattern.lower().partition(":")
        spec = self.services.get(prefix)
        if spec is None:
            return []
        return [f"{prefix}:{a}" for a in spec["Actions"] if fnmatch.fnmatchcase(a, name)]

    def resource_types(self, action: str) -> dict[str, list[str]]:
        """The resource types `action` is authorised on, each with its ARN formats as globs."""
        prefix, _, name = action.partition(":")
        spec = self.services[prefix]
        kinds = spec["Actions"][name].get("Resources", [])
        out = {}
        for kind in kinds:
            formats = spec["Resources"].get(kind, {}).get("ARNFormats", [])
            out[kind] = [re.sub(r"\$\{[^}]*\}", "*", f).replace(".*", "*") for f in formats]
        return out

    def condition_key_known(self, action: str, key: str) -> bool:
        key = key.lower()
        if key in GLOBAL_KEYS or key.startswith(GLOBAL_PREFIXES):
            return True
        prefix, _, name = action.partition(":")
        known = set(self.keys.get(action, set()))
        for kind in self.services[prefix]["Actions"][name].get("Resources", []):
            known |= {k.lower() for k in self.services[prefix]["Resources"].get(kind, {}).get("ConditionKeys", [])}
        return any(key == k or (k.endswith("${tagkey}") and key.startswith(k[:-len("${tagkey}")]))
                   for k in known)


def globs_meet(a: str, b: str) -> bool:
    """Whether some string matches both glob patterns (`*` any run, `?` one character)."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def meet(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*":
            return meet(i + 1, j) or (j < len(b) and meet(i, j + 1))
        if j < len(b) and b[j] == "*":
            return meet(i, j + 1) or (i < len(a) and meet(i + 1, j))
        if i < len(a) and j < len(b) and (a[i] == b[j] or "?" in (a[i], b[j])):
            return meet(i + 1, j + 1)
        return False
    return meet(0, 0)


def arn_matches(resource: str, arn_format: str) -> bool:
    """Whether the policy resource `resource` can name an ARN of `arn_format`: segment by
    segment as IAM compares them (partition, service, region, account), then the resource part."""
    left, right = resource.split(":", 5), arn_format.split(":", 5)
    if len(left) != 6 or len(right) != 6:
        return False
    return all(globs_meet(x, y) for x, y in zip(left, right))


class Resolver:
    """Turns CloudFormation values into the strings they can take (each `Fn::If` branch)."""

    def __init__(self, template: dict, overrides: dict | None = None):
        self.resources = template.get("Resources", {})
        self.params = template.get("Parameters", {})
        self.overrides = overrides or {}

    def param(self, name: str) -> str:
        if name in self.overrides:
            return self.overrides[name]
        default = str(self.params[name].get("Default", ""))
        return default if default else PARAM_SAMPLES.get(name, "x")

    def name(self, name: str) -> list[str]:
        """A `${Name}` of Fn::Sub, a Ref."""
        if name in PSEUDO:
            return [] if PSEUDO[name] is None else [PSEUDO[name]]
        if name in self.params:
            return [self.param(name)]
        if "." in name:
            logical, attr = name.split(".", 1)
            return self.getatt(logical, attr)
        if name in self.resources:
            kind = self.resources[name]["Type"]
            if kind not in REFS:
                raise ValueError(f"no Ref value known for {kind} ({name})")
            return [REFS[kind].format(n=name)]
        raise ValueError(f"unknown name {name!r}")

    def getatt(self, logical: str, attr: str) -> list[str]:
        if logical not in self.resources:
            raise ValueError(f"unknown resource {logical!r}")
        kind = self.resources[logical]["Type"]
        if attr == "Arn" and kind in ARNS:
            return [ARNS[kind].format(n=logical)]
        if attr == "QueueName":
            return [logical]
        raise ValueError(f"no {attr} value known for {kind} ({logical})")

    def values(self, node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, (int, float, bool)):
            return [str(node).lower() if isinstance(node, bool) else str(node)]
        if isinstance(node, dict) and len(node) == 1:
            (fn, arg), = node.items()
            if fn == "Ref":
                return self.name(arg)
            if fn == "Fn::GetAtt":
                logical, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.getatt(logical, attr)
            if fn == "Fn::If":
                return self.values(arg[1]) + self.values(arg[2])
            if fn == "Fn::Sub":
                text, local = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
                return self.sub(text, local)
            if fn == "Fn::Join":
                import itertools
                parts = [self.values(p) for p in arg[1]]
                return [arg[0].join(c) for c in itertools.product(*parts)]
        raise ValueError(f"cannot evaluate {json.dumps(node, default=str)[:120]}")

    def sub(self, text: str, local: dict) -> list[str]:
        import itertools
        pieces = re.split(r"(\$\{[^}]*\})", text)
        options = []
        for piece in pieces:
            if not (piece.startswith("${") and piece.endswith("}")):
                options.append([piece])
            elif piece.startswith("${!"):
                options.append(["${" + piece[3:]])  # a literal ${...}: an IoT policy variable
            elif piece[2:-1] in local:
                options.append(self.values(local[piece[2:-1]]))
            else:
                options.append(self.name(piece[2:-1]))
        return ["".join(c) for c in itertools.product(*options)]

    def all_values(self, node) -> list[str]:
        return [v for item in listed(node) for v in self.values(item)]


def load_template(path: Path, sam: bool = True) -> dict:
    """The template as CloudFormation sees it: cfn-lint's YAML loader, then (sam) the SAM
    transform, so that the resources SAM adds (event permissions, URL permissions) are checked."""
    import cfnlint.decode.cfn_yaml as cfn_yaml
    template = cfn_yaml.loads(path.read_text(), str(path))
    if sam and "Transform" in template:
        import logging
        from cfnlint.template.transforms._sam import Transform
        logging.getLogger("cfnlint").setLevel(logging.CRITICAL)
        transform = Transform(str(path), template, "eu-west-1")
        problems = transform.transform_template()
        if problems:
            raise ValueError(f"SAM transform: {problems[0]}")
        template = transform.template()
    return template


def policies(template: dict):
    """(where, document, kind) for every policy document: kind is "iam", "trust" or "iot"."""
    for logical, res in template.get("Resources", {}).items():
        props, kind = res.get("Properties", {}), res.get("Type")
        if kind == "AWS::IAM::Role":
            yield f"{logical} trust", props["AssumeRolePolicyDocument"], "trust"
            for p in props.get("Policies", []):
                yield f"{logical} {p['PolicyName']}", p["PolicyDocument"], "iam"
        elif kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            yield logical, props["PolicyDocument"], "iam"
        elif kind == "AWS::IoT::Policy":
            yield logical, props["PolicyDocument"], "iot"


def grant_problems(template: dict, reference: Reference) -> list[str]:
    """Every way a grant of the template differs from what AWS's reference allows."""
    resolve, out = Resolver(template), []
    for where, document, kind in policies(template):
        covered: dict[str, set[str]] = {}  # action -> the resource types its Allows name
        for n, s in enumerate(listed(document.get("Statement", []))):
            at = f"{where} statement {s.get('Sid', n)}"
            names = [a for a in listed(s.get("Action", []))]
            actions = []
            for name in names:
                found = reference.actions(name)
                if not found:
                    out.append(f"{at}: {name} is not an action in AWS's authorization reference")
                actions += [(name, a) for a in found]
            for op, keys in (s.get("Condition") or {}).items():
                for key in keys or {}:
                    if kind == "iot" and key.lower().startswith("iot:"):
                        continue  # IoT policy variables, evaluated by AWS IoT at connect
                    for name, a in actions:
                        if not reference.condition_key_known(a, key):
                            out.append(f"{at}: {name} takes no condition key {key}")
            if kind == "trust" or "Resource" not in s:
                continue
            try:
                resources = resolve.all_values(s["Resource"])
            except ValueError as e:
                out.append(f"{at}: Resource: {e}")
                continue
            resources = [re.sub(r"\$\{[^}]*\}", "*", r) for r in resources]  # policy variables
            for name, a in actions:
                if "*" in name.partition(":")[2]:
                    continue  # a wildcard action: its resources are each action's own
                types = reference.resource_types(a)
                for r in resources:
                    if r == "*":
                        if types:
                            out.append(f"{at}: {name} on \"*\": it is authorised on "
                                       f"{', '.join(sorted(types))}; name those")
                        covered.setdefault(a, set()).update(types)
                        continue
                    if not types:
                        out.append(f"{at}: {name} has no resource type: IAM honours only \"*\" "
                                   f"for it, not {r}")
                        continue
                    match = {t for t, formats in types.items() if any(arn_matches(r, f) for f in formats)}
                    if not match:
                        out.append(f"{at}: {name} on {r}: not an ARN of its resource types "
                                   f"({', '.join(sorted(types))})")
                    if s.get("Effect") == "Allow":
                        covered.setdefault(a, set()).update(match)
        for a, kinds in covered.items():
            missing = reference.required.get(a, set()) & set(reference.resource_types(a)) - kinds
            if missing:
                out.append(f"{where}: {a} needs every one of its required resource types; "
                           f"none names {', '.join(sorted(missing))}")
    return out


def service_principals(statement: dict) -> list[str]:
    principal = statement.get("Principal", {})
    if not isinstance(principal, dict):
        return []
    return [p for p in listed(principal.get("Service", [])) if isinstance(p, str)]


def condition_keys(statement: dict) -> dict[str, str]:
    """key (lowercase) -> the operator it is tested with."""
    return {k.lower(): op for op, keys in (statement.get("Condition") or {}).items() for k in keys or {}}


def confused_deputy_problems(template: dict) -> list[str]:
    """Invoke permissions and trusts that a service could exercise for another account or
    resource: each needs the account (and, where the service names it, the source ARN)."""
    out = []
    for logical, res in template.get("Resources", {}).items():
        props = res.get("Properties", {})
        if res.get("Type") == "AWS::Lambda::Permission":
            principal = props.get("Principal")
            if principal == "*" and (props.get("FunctionUrlAuthType") == "NONE"
                                     or props.get("InvokedViaFunctionUrl") is True):
                continue  # the public function URL: anyone, on purpose, only through the URL
            if not isinstance(principal, str) or not principal.endswith(".amazonaws.com"):
                out.append(f"{logical}: invoke permission for {principal!r}, not an AWS service")
                continue
            for key in ("SourceAccount", "SourceArn"):
                if key not in props:
                    out.append(f"{logical}: the invoke permission for {principal} has no {key}")
        if res.get("Type") == "AWS::IAM::Role":
            for s in listed(props["AssumeRolePolicyDocument"].get("Statement", [])):
                keys = condition_keys(s)
                for service in service_principals(s):
                    if keys.get("aws:sourceaccount") not in ("StringEquals",):
                        out.append(f"{logical}: the trust of {service} has no StringEquals aws:SourceAccount")
                    if service in SOURCE_ARN_SERVICES and keys.get("aws:sourcearn") not in ("ArnLike", "ArnEquals"):
                        out.append(f"{logical}: the trust of {service} has no aws:SourceArn (ArnLike/ArnEquals)")
    return out


# ---------------------------------------------------------------------------------------------
# The stack with every optional part on, for the linters (checkov, parliament).

LINT_SKIPS = "rules/lint-skips.json"
INTRINSICS = {"Ref", "Condition", "Fn::GetAtt", "Fn::If", "Fn::Sub", "Fn::Join", "Fn::Select",
              "Fn::Split", "Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or"}


def condition_value(node, template: dict, params: dict) -> object:
    """A Conditions expression (or a value inside one) evaluated with `params`."""
    if isinstance(node, dict) and len(node) == 1:
        (fn, arg), = node.items()
        ev = lambda n: condition_value(n, template, params)  # noqa: E731
        if fn == "Fn::Equals":
            return str(ev(arg[0])) == str(ev(arg[1]))
        if fn == "Fn::Not":
            return not ev(arg[0])
        if fn == "Fn::And":
            return all(ev(a) for a in arg)
        if fn == "Fn::Or":
            return any(ev(a) for a in arg)
        if fn == "Condition":
            return ev(template["Conditions"][arg])
        if fn == "Ref":
            return params[arg]
        if fn == "Fn::Select":
            return ev(arg[1])[int(arg[0])]
        if fn == "Fn::Split":
            return str(ev(arg[1])).split(arg[0])
    return node


def all_on(root: Path) -> dict:
    """The template as CloudFormation deploys it (SAM transformed) with ALL_ON's parameters as
    the defaults, so every condition holds and no optional resource is left out of a linter's
    view; each checkov skip of LINT_SKIPS is written into its resource's Metadata."""
    raw = load_template(root / TEMPLATE, sam=False)
    params = {name: str(p.get("Default", "")) for name, p in raw["Parameters"].items()}
    params.update(ALL_ON)
    off = [c for c, expr in raw.get("Conditions", {}).items() if condition_value(expr, raw, params) is not True]
    if off:
        raise ValueError(f"ALL_ON leaves conditions false: {', '.join(off)} (set their parameters in ALL_ON)")
    for name, value in ALL_ON.items():
        raw["Parameters"][name]["Default"] = value
    template = load_template_dict(root / TEMPLATE, raw)
    skips = json.loads((root / LINT_SKIPS).read_text())
    for check_id, skip in skips["checkov"].items():
        for logical in skip["resources"]:
            if logical not in template["Resources"]:
                raise ValueError(f"{LINT_SKIPS}: checkov {check_id}: no resource {logical}")
            metadata = template["Resources"][logical].setdefault("Metadata", {})
            metadata.setdefault("checkov", {}).setdefault("skip", []).append(
                {"id": check_id, "comment": skip["reason"]})
    return template


def load_template_dict(path: Path, template: dict) -> dict:
    import logging
    from cfnlint.template.transforms._sam import Transform
    logging.getLogger("cfnlint").setLevel(logging.CRITICAL)
    transform = Transform(str(path), template, "eu-west-1")
    problems = transform.transform_template()
    if problems:
        raise ValueError(f"SAM transform: {problems[0]}")
    return transform.template()


def concrete(node, resolve: Resolver):
    """`node` with every intrinsic replaced by the value(s) it takes: a policy parliament can read."""
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)) in INTRINSICS:
            values = resolve.values(node)
            return values[0] if len(values) == 1 else values
        return {k: concrete(v, resolve) for k, v in node.items()}
    if isinstance(node, list):
        out = []
        for item in node:
            value = concrete(item, resolve)
            out += value if isinstance(value, list) and isinstance(item, dict) and len(item) == 1 \
                and next(iter(item)) in INTRINSICS else [value]
        return out
    return node


def run_linters(root: Path) -> list[str]:
    """checkov over the all-on template, parliament over each of its IAM policies; the findings
    LINT_SKIPS does not name (with its reason), and the skips no finding needs any more."""
    import subprocess
    venv = lint_venv() / "bin"
    for tool in ("checkov", "parliament"):
        if not (venv / tool).exists():
            raise SystemExit(f"rules.py: {tool} is not installed in {lint_venv()} (run scripts/setup)")
    template = all_on(root)
    skips = json.loads((root / LINT_SKIPS).read_text())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "template.json"
        path.write_text(json.dumps(template, indent=1, default=str))
        run = subprocess.run([str(venv / "checkov"), "-f", str(path), "--framework", "cloudformation",
                              "-o", "json", "--skip-download"],
                             capture_output=True, text=True, timeout=600)
        try:
            report = json.loads(run.stdout)
        except json.JSONDecodeError:
            raise SystemExit(f"rules.py: checkov gave no report (exit {run.returncode}): "
                             f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
        results = report.get("results", {}) if isinstance(report, dict) else {}
        failed = results.get("failed_checks", [])
        skipped = {(c["check_id"], c["resource"].split(".", 1)[-1]) for c in results.get("skipped_checks", [])}
        passed = results.get("passed_checks", [])
        print(f"checkov {report.get('summary', {}).get('checkov_version', '')}: {len(passed)} passed, "
              f"{len(failed)} failed, {len(skipped)} skipped (each named in {LINT_SKIPS})")
        for c in failed:
            out.append(f"checkov {c['check_id']} on {c['resource']}: {c['check_name']}")
        for check_id, skip in skips["checkov"].items():
            for logical in skip["resources"]:
                if (check_id, logical) not in skipped:
                    out.append(f"{LINT_SKIPS}: checkov {check_id} on {logical} is skipped but not run there")
        resolve = Resolver(template)
        documents = [(where, d) for where, d, kind in policies(template) if kind == "iam"]
        ignored, used = skips["parliament"], {}
        for where, document in documents:
            policy = Path(tmp) / (re.sub(r"\W+", "-", where) + ".json")
            policy.write_text(json.dumps(concrete(document, resolve), indent=1))
            run = subprocess.run([str(venv / "parliament"), "--string", policy.read_text(), "--json",
                                  "--include-community-auditors"],
                                 capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            findings = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
            if run.returncode not in (0, 1) or (run.returncode and not findings):
                out.append(f"parliament on {where}: exit {run.returncode}: {run.stderr.strip()[-200:]}")
            for f in findings:
                actions = {d.get("action") for d in f.get("detail") or [] if isinstance(d, dict)}
                skip = ignored.get(f["issue"])
                if skip and actions and actions <= set(skip["actions"]):
                    used.setdefault(f["issue"], set()).update(actions)
                    continue
                out.append(f"parliament {f['issue']} in {where}: {f.get('title', '')} {f.get('detail', '')}")
        for issue, skip in ignored.items():
            for action in sorted(set(skip["actions"]) - used.get(issue, set())):
                out.append(f"{LINT_SKIPS}: parliament {issue} for {action} is skipped but not found")
        print(f"parliament: {len(documents)} policies, "
              f"{sum(len(v) for v in used.values())} action(s) skipped (each named in {LINT_SKIPS})")
    return out


def rust_fn(text: str, name: str) -> str | None:
    """The body of `fn name` in `text`, to the next item at the same or lower indent."""
    m = re.search(rf"^(?P<indent> *)(?:pub(?:\([a-z]+\))? )?(?:async )?fn {name}\b.*?^(?P=indent)\}}", text,
                  re.M | re.S)
    return m[0] if m else None


def ledger_problems(root: Path) -> list[str]:
    """Each ledger call against the grant of the role that makes it: the operation granted, every
    attribute it names allowed by the grant's dynamodb:Attributes, and no grant left uncalled."""
    code = (root / LEDGER_CODE).read_text()
    names = dict(re.findall(r'pub const (\w+): &str = "([^"]*)";', (root / LEDGER_NAMES).read_text()))
    out, called = [], {}
    for fn, (policy_file, helpers) in LEDGER_CALLS.items():
        bodies = [rust_fn(code, f) for f in (fn, *helpers)]
        if None in bodies:
            out.append(f"{LEDGER_CODE}: no fn {[f for f, b in zip((fn, *helpers), bodies) if b is None][0]}")
            continue
        body = "\n".join(bodies)
        ops = {"dynamodb:" + "".join(w.title() for w in op.split("_"))
               for op in re.findall(r"\.(\w+_item)\(\)", body)}
        attributes = {names[c] for c in re.findall(r"item::([A-Z_]+)\b", body)
                      if c in names and not c.startswith("STATUS_")}
        if not ops:
            out.append(f"{LEDGER_CODE} fn {fn}: no DynamoDB call found")
        policy = json.loads((root / "rules" / policy_file).read_text())
        for op in sorted(ops):
            called.setdefault(policy_file, set()).add(op)
            grants = [s for s in allows(policy) if op in listed(s["Action"])]
            if not grants:
                out.append(f"fn {fn} calls {op}, which {policy_file} does not grant")
            for s in grants:
                limit = (s.get("Condition") or {}).get("ForAllValues:StringEquals", {}).get("dynamodb:Attributes")
                if limit is not None and attributes - set(limit):
                    out.append(f"fn {fn} names {sorted(attributes - set(limit))} in {op}, which "
                               f"{policy_file} statement {s.get('Sid')} does not allow")
    for policy_file in sorted({p for p, _ in LEDGER_CALLS.values()}):
        policy = json.loads((root / "rules" / policy_file).read_text())
        granted = {a for s in allows(policy) for a in listed(s["Action"])}
        for a in sorted(granted - called.get(policy_file, set())):
            out.append(f"{policy_file} grants {a}, which no ledger call of its role makes")
    return out


def check(root: Path) -> list[str]:
    """Prints each property as ok or FAIL; returns the failures, each `name: reason`."""
    rules, out = root / "rules", []
    template = (root / TEMPLATE).read_text()
    device = json.loads((rules / "device-policy.json").read_text())
    activator = json.loads((rules / "activator-policy.json").read_text())
    provisioner = json.loads((rules / "provisioner-policy.json").read_text())
    activator_ledger = json.loads((rules / "activator-ledger-policy.json").read_text())
    factory_ledger = json.loads((rules / "factory-ledger-policy.json").read_text())
    rule = json.loads((rules / "topic-rule.json").read_text())

    def prop(name: str, problem):
        print(f"{'FAIL' if problem else 'ok  '} {name}{': ' + problem if problem else ''}")
        if problem:
            out.append(f"{name}: {problem}")

    found = {m["file"] for m in BLOCK.finditer(template)}
    prop("template: a generated block for each rules/ file",
         None if found == RULE_FILES
         else f"blocks for {sorted(found)}")
    prop("template: generated blocks match rules/ (run scripts/rules.py render)",
         None if render(template, rules) == template else "the template differs from its rendering")

    try:
        deployed = load_template(root / TEMPLATE)
    except Exception as e:  # noqa: BLE001 - a template that does not load fails every property
        deployed = {}
        prop("template: loads and passes the SAM transform", str(e).splitlines()[0])
    reference = Reference.cached()
    problems = grant_problems(deployed, reference)
    prop(f"grants: every action, resource and condition key as AWS's authorization reference has "
         f"them ({sum(1 for _ in policies(deployed))} policies)",
         "; ".join(problems) if problems else None)
    problems = ledger_problems(root)
    prop("ledger grants: exactly the calls each role's commands make, on the attributes they name",
         "; ".join(problems) if problems else None)
    problems = confused_deputy_problems(deployed)
    prop("invoke permissions and service trusts: aws:SourceAccount, and aws:SourceArn where the "
         "service names its source", "; ".join(problems) if problems else None)

    actions = [a for s in allows(device) for a in listed(s["Action"])]
    prop("device policy: only connect, publish, receive, subscribe; no wildcard",
         None if set(actions) <= DEVICE_ACTIONS else f"actions {sorted(set(actions) - DEVICE_ACTIONS)}")
    resources = [r for s in allows(device) for r in listed(s["Resource"])]
    prop("device policy: no bare '*' resource, no MQTT wildcard",
         next((f"resource {r}" for r in resources if r == "*" or "+" in r or "#" in r), None))
    connect = [s for s in allows(device) if "iot:Connect" in listed(s["Action"])]
    prop("device policy: connect only as its own attached Thing",
         None if connect and all(listed(s["Resource"]) == [IOT_ARN + "client/" + THING]
                                 and s.get("Condition", {}).get("Bool", {}).get(
                                     "iot:Connection.Thing.IsAttached") == "true" for s in connect)
         else "iot:Connect is not limited to client/<thing> with IsAttached true")
    roots = [IOT_ARN + kind + "/" + root for kind in ("topic", "topicfilter")
             for root in ("${TopicPrefix}/" + THING + "/", "$aws/things/" + THING + "/shadow/")]
    topical = [r for s in allows(device) if set(listed(s["Action"])) - {"iot:Connect"}
               for r in listed(s["Resource"])]
    prop("device policy: topics only under <prefix>/<thing>/ and its own shadow",
         next((f"resource {r}" for r in topical if not any(r.startswith(x) for x in roots)), None))

    delivered = re.search(r'pub const DEFAULT_TOPIC_PREFIX: &str = "([^"]*)";',
                          (root / DELIVERY).read_text())
    default = re.search(r"\n  TopicPrefix:\n(?:    .*\n)*?    Default: (\S+)\n", template)
    prop("template: TopicPrefix defaults to the prefix jitr delivers (DEFAULT_TOPIC_PREFIX)",
         None if delivered and default and default[1] == delivered[1]
         else f"template {default and default[1]!r}, {DELIVERY} {delivered and delivered[1]!r}")

    for role, policy, allowed in (("activator", activator, ACTIVATOR),
                                  ("provisioner", provisioner, PROVISIONER),
                                  ("activator ledger", activator_ledger, ACTIVATOR_LEDGER),
                                  ("factory ledger", factory_ledger, FACTORY_LEDGER)):
        granted: dict[str, set[str]] = {}
        for s in allows(policy):
            for a in listed(s["Action"]):
                granted.setdefault(a, set()).update(listed(s["Resource"]))
        prop(f"{role} policy: only the actions it calls",
             None if set(granted) <= set(allowed) else f"extra {sorted(set(granted) - set(allowed))}")
        prop(f"{role} policy: every grant on its own resources only",
             next((f"{a} on {sorted(r - allowed[a])}" for a, r in granted.items()
                   if a in allowed and r - allowed[a]), None))
        prop(f"{role} policy: no NotAction or NotResource",
             next((f"statement {s.get('Sid')}" for s in policy["Statement"]
                   if "NotAction" in s or "NotResource" in s), None))

    claim = json.loads((rules / "claim-policy.json").read_text())
    fp_template = json.loads((rules / "fleet-provisioning-template.json").read_text())
    actions = {a for s in allows(claim) for a in listed(s["Action"])}
    claim_connect = [r for s in allows(claim) if "iot:Connect" in listed(s["Action"])
                     for r in listed(s["Resource"])]
    prop("claim policy: connect only with a claim- client id (never a device's)",
         None if claim_connect == [IOT_ARN + "client/claim-*"] else f"connect on {claim_connect}")
    prop("claim policy: only connect, publish, receive, subscribe",
         None if actions <= DEVICE_ACTIONS else f"actions {sorted(actions - DEVICE_ACTIONS)}")
    fp_roots = [IOT_ARN + kind + "/$aws/" + root for kind in ("topic", "topicfilter")
                for root in ("certificates/create-from-csr/",
                             "provisioning-templates/${ProvisioningTemplateName}/provision/")]
    claim_topics = [r for s in allows(claim) if set(listed(s["Action"])) - {"iot:Connect"}
                    for r in listed(s["Resource"])]
    prop("claim policy: only the CSR and RegisterThing topics of our template (no AWS-made keys)",
         next((f"resource {r}" for r in claim_topics if not any(r.startswith(x) for x in fp_roots)),
              None))
    resources = fp_template.get("Resources", {})
    prop("fleet provisioning template: the Thing is named by the device UUID parameter",
         None if resources.get("thing", {}).get("Properties", {}).get("ThingName")
         == {"Ref": "${UuidParameter}"} else "ThingName is not {Ref: ${UuidParameter}}")
    prop("fleet provisioning template: the device policy and nothing else",
         None if [r for r in resources.values() if r.get("Type") == "AWS::IoT::Policy"]
         == [{"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "${PolicyName}"}}]
         else "a policy other than ${PolicyName}")

    prop("topic rule: SQL selects exactly the trusted CA's registered events",
         None if rule["sql"] == "SELECT * FROM '$aws/events/certificates/registered/${CaCertificateId}'"
         else rule["sql"])
    prop("topic rule: one Lambda action and an SQS error action",
         None if [list(a) for a in rule["actions"]] == [["lambda"]] and "sqs" in rule.get("errorAction", {})
         else "actions or error action changed")

    for name, needle in [("lambda permission: SourceAccount",
                          "FunctionName: !GetAtt ActivatorFunction.Arn\n      Principal: iot.amazonaws.com\n"
                          "      SourceAccount: !Ref AWS::AccountId"),
                         ("lambda permission: SourceArn of the rule", ":rule/${RuleName}\""),
                         ("event invoke config: MaximumEventAgeInSeconds", "MaximumEventAgeInSeconds:"),
                         ("event invoke config: failures to the failure queue",
                          "OnFailure:\n          Destination: !GetAtt FailureQueue.Arn")]:
        prop(f"template: {name}", None if needle in template else f"{needle!r} missing")
    # The records that matter (the factory's ledger, the proof of use) can be restored.
    for table in ("LedgerTable", "PresenceTable"):
        body = re.search(rf"\n  {table}:\n((?:    .*\n|\n)*)", template)
        prop(f"template: {table} has point-in-time recovery",
             None if body and "PointInTimeRecoveryEnabled: true" in body[1] else "missing")
    prop("template: no managed policy on any role",
         "ManagedPolicyArns found" if "ManagedPolicyArns" in template else None)
    for name, needle in [
            ("the function drains the failure queue with partial batch responses",
             "Queue: !GetAtt FailureQueue.Arn\n            BatchSize: 10\n            FunctionResponseTypes:\n"
             "              - ReportBatchItemFailures"),
            ("the queue's reader has bounded concurrency", "MaximumConcurrency: 2"),
            ("failed replays move to a dead-letter queue",
             "deadLetterTargetArn: !GetAtt DeadLetterQueue.Arn\n        maxReceiveCount:"),
            ("the dead-letter queue has its own alarm", "Value: !GetAtt DeadLetterQueue.QueueName"),
            ("alarms on give-ups and a rejection spike", "MetricName: AwsGiveUps"),
            ("an optional weekly audit with the six certificate checks",
             "TargetCheckNames:\n        - DEVICE_CERTIFICATE_EXPIRING_CHECK\n        - CA_CERTIFICATE_EXPIRING_CHECK\n"
             "        - DEVICE_CERTIFICATE_SHARED_CHECK\n        - REVOKED_DEVICE_CERTIFICATE_STILL_ACTIVE_CHECK\n"
             "        - DEVICE_CERTIFICATE_KEY_QUALITY_CHECK\n        - CONFLICTING_CLIENT_IDS_CHECK"),
            ("a rejection-spike alarm", "Value: rejected"),
            ("the provisioner's concurrency is reserved (its URL is public)",
             "ReservedConcurrentExecutions: !Ref ProvisionerConcurrency"),
            ("the pre-provisioning hook is the provisioner",
             "PreProvisioningHook:\n        TargetArn: !GetAtt ProvisionerFunction.Arn"),
            ("iot may invoke the provisioner only from this account",
             "Principal: iot.amazonaws.com\n      SourceAccount: !Ref AWS::AccountId"),
            ("the public URL invokes through the URL only",
             "Principal: \"*\"\n      InvokedViaFunctionUrl: true"),
            ("the ledger outlives the stack",
             "LedgerTable:\n    Type: AWS::DynamoDB::Table\n    Condition: HasLedger\n    DeletionPolicy: Retain"),
            ("the provisioner signs only through KMS",
             'JITR_CA_KEY_URI: !Sub "awskms:key-id=${ProvisionerCaKeyArn}"')]:
        prop(f"template: {name}", None if needle in template else f"{needle!r} missing")
    return out


MUTATIONS = [  # (what, file, old, new, the property that must fail)
    ("iot:* in the activator policy", "rules/activator-policy.json", '"iot:DescribeCertificate",',
     '"iot:*", "iot:DescribeCertificate",', "activator policy: only the actions"),
    ("iot:DeleteThing in the activator policy", "rules/activator-policy.json", '"iot:CreateThing",',
     '"iot:CreateThing", "iot:DeleteThing",', "activator policy: only the actions"),
    ("certificate actions on '*'", "rules/activator-policy.json",
     '"Resource": "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:cert/*"', '"Resource": "*"',
     "activator policy: every grant"),
    ("secret grant widened", "rules/activator-policy.json", '"Resource": "${BalenaApiKeySecretArn}"',
     '"Resource": "*"', "activator policy: every grant"),
    ("iot:* in the device policy", "rules/device-policy.json", '"Action": "iot:Subscribe"',
     '"Action": ["iot:Subscribe", "iot:*"]', "device policy: only connect"),
    ("bare '*' resource in the device policy", "rules/device-policy.json",
     '"Action": "iot:Subscribe",\n      "Resource": [', '"Action": "iot:Subscribe",\n      "Resource": [\n        "*",',
     "device policy: no bare"),
    ("connect as any client", "rules/device-policy.json", ":client/${iot:Connection.Thing.ThingName}",
     ":client/*", "device policy: connect only"),
    ("IsAttached dropped", "rules/device-policy.json", '"iot:Connection.Thing.IsAttached": "true"',
     '"iot:Connection.Thing.IsAttached": "false"', "device policy: connect only"),
    ("another device's topics", "rules/device-policy.json",
     ":topic/${TopicPrefix}/${iot:Connection.Thing.ThingName}/*", ":topic/${TopicPrefix}/*",
     "device policy: topics only"),
    ("rule on every CA", "rules/topic-rule.json", "registered/${CaCertificateId}'", "registered/+'",
     "topic rule: SQL"),
    ("rule error action dropped", "rules/topic-rule.json", '"errorAction"', '"errorActionGone"',
     "topic rule: one Lambda"),
    ("template drifts from rules/", TEMPLATE, "\"SubscribeToItsOwnTopics\"", "\"SubscribeAnywhere\"",
     "template: generated blocks match"),
    ("a generated block removed", TEMPLATE, "# rules: topic-rule.json", "# was rules: topic-rule.json",
     "template: a generated block"),
    ("permission without SourceAccount", TEMPLATE,
     "FunctionName: !GetAtt ActivatorFunction.Arn\n      Principal: iot.amazonaws.com\n      SourceAccount: !Ref AWS::AccountId\n",
     "FunctionName: !GetAtt ActivatorFunction.Arn\n      Principal: iot.amazonaws.com\n",
     "template: lambda permission: SourceAccount"),
    ("no failure destination", TEMPLATE, "OnFailure:\n          Destination: !GetAtt FailureQueue.Arn",
     "OnFailure: {}", "template: event invoke config: failures"),
    ("queue read on every queue", "rules/activator-policy.json",
     '"sqs:GetQueueAttributes"\n      ],\n      "Resource": "${FailureQueueArn}"',
     '"sqs:GetQueueAttributes"\n      ],\n      "Resource": "*"', "activator policy: every grant"),
    ("the failure queue not drained", TEMPLATE, "Queue: !GetAtt FailureQueue.Arn", "Queue: !GetAtt DeadLetterQueue.Arn",
     "template: the function drains"),
    ("no dead-letter queue", TEMPLATE, "deadLetterTargetArn: !GetAtt DeadLetterQueue.Arn", "deadLetterTargetArn: none",
     "template: failed replays"),
    ("delivered topics outside the policy's prefix", TEMPLATE,
     "TopicPrefix:\n    Type: String\n    Description: >-\n      First topic level(s) of the device topics: a device may use only\n      <TopicPrefix>/<thing name>/... and its own shadow.\n    Default: balena",
     "TopicPrefix:\n    Type: String\n    Description: >-\n      First topic level(s) of the device topics: a device may use only\n      <TopicPrefix>/<thing name>/... and its own shadow.\n    Default: devices",
     "template: TopicPrefix defaults"),
    ("an audit check dropped", TEMPLATE, "        - DEVICE_CERTIFICATE_SHARED_CHECK\n", "",
     "template: an optional weekly audit"),
    ("provisioner signs with any key", "rules/provisioner-policy.json", '"Resource": "${ProvisionerCaKeyArn}"',
     '"Resource": "*"', "provisioner policy: every grant"),
    ("provisioner may delete Things", "rules/provisioner-policy.json", '"iot:CreateThing",',
     '"iot:CreateThing", "iot:DeleteThing",', "provisioner policy: only the actions"),
    ("provisioner concurrency unbounded", TEMPLATE, "ReservedConcurrentExecutions: !Ref ProvisionerConcurrency",
     "ReservedConcurrentExecutions: !Ref AWS::NoValue", "template: the provisioner's concurrency"),
    ("claim certificates may ask AWS for keys", "rules/claim-policy.json",
     "topic/$aws/certificates/create-from-csr/*", "topic/$aws/certificates/create/*",
     "claim policy: only the CSR"),
    ("claim certificates may publish anywhere", "rules/claim-policy.json",
     '"iot:Publish",\n        "iot:Receive"\n      ],\n      "Resource": [',
     '"iot:Publish",\n        "iot:Receive"\n      ],\n      "Resource": [\n        "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:topic/*",',
     "claim policy: only the CSR"),
    ("claim certificates connect as any client", "rules/claim-policy.json", ":client/claim-*", ":client/*",
     "claim policy: connect only"),
    ("a fleet-provisioned Thing named by the client", "rules/fleet-provisioning-template.json",
     '"Ref": "${UuidParameter}"', '"Ref": "AWS::IoT::ClientId"', "fleet provisioning template: the Thing"),
    ("the hook dropped", TEMPLATE, "TargetArn: !GetAtt ProvisionerFunction.Arn",
     "TargetArn: !GetAtt ActivatorFunction.Arn", "template: the pre-provisioning hook"),
    ("the activator may scan the ledger", "rules/activator-ledger-policy.json", '"Action": "dynamodb:GetItem"',
     '"Action": ["dynamodb:GetItem", "dynamodb:Scan"]', "activator ledger policy: only the actions"),
    ("the activator may mark any table", "rules/activator-ledger-policy.json", '"Resource": "${LedgerTableArn}"',
     '"Resource": "*"', "activator ledger policy: every grant"),
    ("the factory may scan the ledger", "rules/factory-ledger-policy.json",
     '"Action": "dynamodb:BatchWriteItem"', '"Action": ["dynamodb:BatchWriteItem", "dynamodb:Scan"]',
     "factory ledger policy: only the actions"),
    # Grants against AWS's authorization reference.
    ("RegisterCertificate on cert/* (AWS honours only \"*\" for it)", "rules/provisioner-policy.json",
     '"Action": "iot:RegisterCertificate",\n      "Resource": "*"',
     '"Action": "iot:RegisterCertificate",\n      "Resource": "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:cert/*"',
     "grants: every action"),
    ("an action AWS does not have", TEMPLATE, "                  - iot:ListThings\n",
     "                  - iot:ListThing\n", "grants: every action"),
    ("a read on the wrong resource type", TEMPLATE,
     "Action: iot:DescribeCACertificate\n                Resource: !Sub \"arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:cacert/*\"",
     "Action: iot:DescribeCACertificate\n                Resource: !Sub \"arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:cert/*\"",
     "grants: every action"),
    ("a '*' where the action has a resource type", "rules/activator-policy.json",
     '"Action": "iot:DescribeCACertificate",\n      "Resource": "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:cacert/*"',
     '"Action": "iot:DescribeCACertificate",\n      "Resource": "*"', "grants: every action"),
    ("AddThingToThingGroup without its thing group", "rules/activator-policy.json",
     '"arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:thing/*",\n        "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:thinggroup/*"',
     '"arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:thing/*"', "grants: every action"),
    ("a condition key the action does not take", "rules/factory-ledger-policy.json",
     '"dynamodb:ReturnValues": "NONE"', '"dynamodb:ReturnValue": "NONE"', "grants: every action"),
    # The ledger grants against the calls.
    ("ledger import's UpdateItem not granted to the factory", "rules/factory-ledger-policy.json",
     '"Action": "dynamodb:UpdateItem"', '"Action": "dynamodb:PutItem"', "ledger grants"),
    ("a mark's attribute outside the activator's grant", "rules/activator-ledger-policy.json",
     '"region",\n            "reason"', '"region"', "ledger grants"),
    ("a batch's attribute outside the factory's grant", "rules/factory-ledger-policy.json",
     '"status",\n            "region"\n          ]\n        }\n      }\n    },',
     '"status"\n          ]\n        }\n      }\n    },', "ledger grants"),
    ("a ledger grant no command uses", "rules/activator-ledger-policy.json",
     '"Action": "dynamodb:GetItem"', '"Action": ["dynamodb:GetItem", "dynamodb:PutItem"]', "ledger grants"),
    ("a ledger call moved out of its role's grant", LEDGER_CODE, ".batch_write_item()", ".transact_write_items()",
     "ledger grants"),
    # Confused deputies.
    ("the hook's permission without SourceArn", TEMPLATE,
     '      SourceArn: !Sub "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:provisioningtemplate/${ProvisioningTemplateName}"\n\n',
     "\n", "invoke permissions and service trusts"),
    ("the certificate provider's permission without SourceAccount", TEMPLATE,
     "      SourceAccount: !Ref AWS::AccountId\n      SourceArn: !Sub \"arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:certificateprovider/",
     "      SourceArn: !Sub \"arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:certificateprovider/",
     "invoke permissions and service trusts"),
    ("the sweep's permission without SourceAccount", TEMPLATE,
     "      SourceAccount: !Ref AWS::AccountId\n      SourceArn: !GetAtt SweepRule.Arn",
     "      SourceArn: !GetAtt SweepRule.Arn", "invoke permissions and service trusts"),
    ("the provisioning role's trust without aws:SourceArn", TEMPLATE,
     '              ArnLike:\n                aws:SourceArn: !Sub "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:provisioningtemplate/',
     '              ArnLikeGone:\n                aws:SourceArn: !Sub "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:provisioningtemplate/',
     "invoke permissions and service trusts"),
    ("a Lambda role's trust without aws:SourceAccount", TEMPLATE,
     "            Condition:\n              StringEquals:\n                aws:SourceAccount: !Ref AWS::AccountId\n"
     "      Policies:\n        - PolicyName: jitr-activator",
     "      Policies:\n        - PolicyName: jitr-activator", "invoke permissions and service trusts"),
    ("the audit role's trust without aws:SourceArn", TEMPLATE,
     '              ArnLike:\n                aws:SourceArn: !Sub "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:*"\n', "",
     "invoke permissions and service trusts"),
    ("the ledger deleted with the stack", TEMPLATE,
     "Condition: HasLedger\n    DeletionPolicy: Retain", "Condition: HasLedger\n    DeletionPolicy: Delete",
     "template: the ledger outlives the stack"),
    ("the ledger without point-in-time recovery", TEMPLATE, "PointInTimeRecoveryEnabled: true",
     "PointInTimeRecoveryEnabled: false", "template: LedgerTable has point-in-time recovery"),
    ("a managed policy", TEMPLATE, "      Policies:\n        - PolicyName: jitr-activator",
     "      ManagedPolicyArns: [arn:aws:iam::aws:policy/AdministratorAccess]\n      Policies:\n"
     "        - PolicyName: jitr-activator", "template: no managed policy"),
]


LINT_MUTATIONS = [  # (what, file, old, new, what all-on must say)
    ("an optional part all-on leaves off", TEMPLATE, "  HasLedger: !Not [!Equals [!Ref Ledger, \"off\"]]\n",
     "  HasLedger: !Not [!Equals [!Ref Ledger, \"off\"]]\n  HasExtra: !Equals [!Ref RuleName, \"extra\"]\n",
     "ALL_ON leaves conditions false: HasExtra"),
    ("a checkov skip of a resource that is gone", LINT_SKIPS, '"resources": [\n        "ProvisionerFunctionUrl"\n      ]',
     '"resources": ["ProvisionerUrl"]', "no resource ProvisionerUrl"),
]


def self_test() -> int:
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (what, rel, old, new, expected) in enumerate(MUTATIONS):
            work = Path(tmp) / str(i)
            for part in ("rules", "infra"):
                shutil.copytree(REPO / part, work / part)
            for rel_copy in (DELIVERY, LEDGER_CODE, LEDGER_NAMES):
                (work / rel_copy).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / rel_copy, work / rel_copy)
            target = work / rel
            text = target.read_text()
            if old not in text:
                print(f"FAIL mutation '{what}': {old!r} is no longer in {rel}")
                failed += 1
                continue
            target.write_text(text.replace(old, new, 1))
            if rel.startswith("rules/") and not expected.startswith("template"):
                # A change made in rules/ and rendered: only the property can catch it.
                tpl = work / TEMPLATE
                tpl.write_text(render(tpl.read_text(), work / "rules"))
            caught = [f for f in quiet(check, work) if f.startswith(expected)]
            print(f"{'ok  ' if caught else 'FAIL'} mutation '{what}' caught by '{expected}'")
            failed += not caught
        # The linters' view: every optional part on, every skip about a resource that exists.
        for what, rel, old, new, expected in LINT_MUTATIONS:
            work = Path(tmp) / f"lint-{len(what)}"
            for part in ("rules", "infra"):
                shutil.copytree(REPO / part, work / part)
            target = work / rel
            if old not in target.read_text():
                print(f"FAIL mutation '{what}': {old!r} is no longer in {rel}")
                failed += 1
                continue
            target.write_text(target.read_text().replace(old, new, 1))
            try:
                all_on(work)
                caught = False
            except ValueError as e:
                caught = expected in str(e)
            print(f"{'ok  ' if caught else 'FAIL'} mutation '{what}' caught by all-on ('{expected}')")
            failed += not caught
    total = len(MUTATIONS) + len(LINT_MUTATIONS)
    print(f"{total - failed} caught, {failed} missed")
    return 1 if failed else 0


def quiet(fn, *args):
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def main() -> int:
    command = sys.argv[1] if len(sys.argv) == 2 else ""
    if command == "render":
        path = REPO / TEMPLATE
        path.write_text(render(path.read_text(), REPO / "rules"))
        return 0
    if command == "check":
        failures = check(REPO)
        print(f"{len(failures)} failed")
        return 1 if failures else 0
    if command == "self-test":
        return self_test()
    if command == "all-on":
        print(json.dumps(all_on(REPO), indent=1, default=str))
        return 0
    if command == "lint":
        problems = run_linters(REPO)
        for p in problems:
            print(f"FAIL {p}")
        print(f"{len(problems)} failed")
        return 1 if problems else 0
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
