#!/usr/bin/env python3
"""rules/ is the one source of the device policy, the activator's IAM policy and the topic rule;
infra/template.yaml takes them from there.

    scripts/rules.py render      rewrite the template's generated blocks from rules/
    scripts/rules.py check       the blocks match rules/, and the security properties hold
    scripts/rules.py self-test   break copies on purpose: every break must be caught

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
           "LedgerTableArn": "LedgerTable.Arn"}
# Files rendered as one JSON string (a property CloudFormation takes as text), not as YAML.
STRING_BLOCKS = {"fleet-provisioning-template.json"}
RULE_FILES = {"device-policy.json", "activator-policy.json", "topic-rule.json",
              "provisioner-policy.json", "fleet-provisioning-template.json", "claim-policy.json",
              "activator-ledger-policy.json", "factory-ledger-policy.json"}
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
    **{a: {IOT_ARN + "thing/*"} for a in ("iot:CreateThing", "iot:ListThingPrincipals")},
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
    **{a: {IOT_ARN + "cert/*"} for a in ("iot:RegisterCertificate", "iot:DescribeCertificate",
                                         "iot:UpdateCertificate", "iot:AttachPolicy",
                                         "iot:AttachThingPrincipal", "iot:DetachThingPrincipal")},
    "iot:DescribeCACertificate": {IOT_ARN + "cacert/*"},
    **{a: {IOT_ARN + "thing/*"} for a in ("iot:CreateThing", "iot:ListThingPrincipals")},
    "iot:AddThingToThingGroup": {IOT_ARN + "thing/*", IOT_ARN + "thinggroup/*"},
    # No resource-level permissions exist for this one: IAM honours only "*".
    "iot:DescribeEndpoint": {"*"},
    **{a: {"${ProvisionerCaKeyArn}"} for a in ("kms:DescribeKey", "kms:GetPublicKey", "kms:Sign")},
    "dynamodb:PutItem": {"${AttemptsTableArn}"},
    "secretsmanager:GetSecretValue": {"${BalenaApiKeySecretArn}"},
    **{a: {"arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${ProvisionerLogGroupName}:*"}
       for a in ("logs:CreateLogStream", "logs:PutLogEvents")},
}
# The ledger: the activator reads and marks, the factory only adds; nothing scans or deletes.
ACTIVATOR_LEDGER = {a: {"${LedgerTableArn}"} for a in ("dynamodb:GetItem", "dynamodb:UpdateItem")}
FACTORY_LEDGER = {"dynamodb:BatchWriteItem": {"${LedgerTableArn}"}}


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
        body = to_yaml(document, len(m["indent"]) + 2, variables, m["file"] == "topic-rule.json")
        return head + f"{m['indent']}{m['key']}:\n" + "\n".join(body) + "\n" + tail
    return BLOCK.sub(block, text)


def allows(policy: dict) -> list[dict]:
    return [s for s in policy["Statement"] if s.get("Effect") == "Allow"]


def listed(value) -> list:
    return value if isinstance(value, list) else [value]


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
            ("the ledger table has point-in-time recovery", "PointInTimeRecoveryEnabled: true"),
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
    ("the activator may scan the ledger", "rules/activator-ledger-policy.json", '"dynamodb:GetItem",',
     '"dynamodb:GetItem", "dynamodb:Scan",', "activator ledger policy: only the actions"),
    ("the activator may mark any table", "rules/activator-ledger-policy.json", '"Resource": "${LedgerTableArn}"',
     '"Resource": "*"', "activator ledger policy: every grant"),
    ("the factory may rewrite the ledger's items", "rules/factory-ledger-policy.json",
     '"Action": "dynamodb:BatchWriteItem"', '"Action": ["dynamodb:BatchWriteItem", "dynamodb:UpdateItem"]',
     "factory ledger policy: only the actions"),
    ("the ledger deleted with the stack", TEMPLATE,
     "Condition: HasLedger\n    DeletionPolicy: Retain", "Condition: HasLedger\n    DeletionPolicy: Delete",
     "template: the ledger outlives the stack"),
    ("the ledger without point-in-time recovery", TEMPLATE, "PointInTimeRecoveryEnabled: true",
     "PointInTimeRecoveryEnabled: false", "template: the ledger table has point-in-time recovery"),
    ("a managed policy", TEMPLATE, "      Policies:\n        - PolicyName: jitr-activator",
     "      ManagedPolicyArns: [arn:aws:iam::aws:policy/AdministratorAccess]\n      Policies:\n"
     "        - PolicyName: jitr-activator", "template: no managed policy"),
]


def self_test() -> int:
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (what, rel, old, new, expected) in enumerate(MUTATIONS):
            work = Path(tmp) / str(i)
            for part in ("rules", "infra"):
                shutil.copytree(REPO / part, work / part)
            (work / DELIVERY).parent.mkdir(parents=True)
            shutil.copy(REPO / DELIVERY, work / DELIVERY)
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
    print(f"{len(MUTATIONS) - failed} caught, {failed} missed")
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
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
