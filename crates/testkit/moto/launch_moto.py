"""Start a moto server on 127.0.0.1 with the fidelity fixes jitr's tests rely on.

Usage: python3 launch_moto.py PORT

Fixes applied before the server starts (moto 5.x):
  1. Certificate ids are the SHA-256 of the certificate DER, as in AWS IoT
     (moto's default hashes the PEM text instead).
  2. DescribeCertificate answers with `caCertificateId` when the certificate was
     registered with a CA (moto keeps the field but leaves it out of the description).
  3. GetRegistrationCode answers 64 hex digits like AWS IoT (moto returns a UUID with
     hyphens, which is not a valid certificate CN for the verification certificate).

  4. ListCertificatesByCA honours pageSize (1 to 250), marker and ascendingOrder (by
     creation date, as AWS IoT does): moto answers every certificate at once, oldest first.

  7. KMS Sign with MessageType DIGEST signs the digest as given, as AWS KMS does (moto
     ignores MessageType and hashes the digest again, so no verifier accepts the signature).

  8. Fleet provisioning templates (Create/Describe/DeleteProvisioningTemplate) and
     CreateProvisioningClaim, which moto does not implement: a claim is a new ACTIVE
     certificate with its key pair, valid for 5 minutes, for a template that exists
     (ResourceNotFoundException otherwise), as AWS IoT answers.

And three changes for speed only, with the same answers:
  5. The server lists moto's service packages once, not on every request (its dispatcher
     walks the package folder per request: nearly half of its time under load).
  6. DescribeCertificate and the certificate principal lookup behind AttachPolicy and
     AttachThingPrincipal find a certificate by its id (the key moto stores it under), and
     DescribeThing and ListThingPrincipals find a Thing by its ARN (likewise), instead of
     scanning every certificate or Thing (the burst test makes 10,000 and 8,500).
  9. The request log (tests read it: `"GET /registrationcode"`) is one plain write per
     request, `"<request line>" <status>`, instead of werkzeug's logging call, whose handler
     lock and colouring every request thread queued on: with it, 400 devices connecting at
     once in the demo took 40 s; without it, 26 s.
"""

import os
import secrets
import sys

import moto.backends
import moto.core.config
import moto.core.responses
import moto.iot.models
import moto.iot.responses
import moto.server
import werkzeug.serving
from werkzeug.urls import uri_to_iri


def use_der_certificate_ids() -> None:
    moto.core.config.default_user_config.setdefault("iot", {})["use_valid_cert"] = True


def describe_certificate_with_ca_id() -> None:
    cls = moto.iot.models.FakeCertificate
    original = cls.to_description_dict
    if getattr(original, "_jitr_patched", False):
        return

    def to_description_dict(self):
        description = original(self)
        ca_certificate_id = getattr(self, "ca_certificate_id", None)
        if ca_certificate_id is not None:
            description["caCertificateId"] = ca_certificate_id
        return description

    to_description_dict._jitr_patched = True
    cls.to_description_dict = to_description_dict


def aws_shaped_registration_codes() -> None:
    moto.iot.models.IoTBackend.get_registration_code = lambda self: secrets.token_hex(32)


def certificates_by_ca_paged() -> None:
    def list_certificates_by_ca(self):
        ca_certificate_id = self._get_param("caCertificateId")
        certificates = sorted(
            self.iot_backend.list_certificates_by_ca(ca_certificate_id),
            key=lambda c: (c.creation_date, c.certificate_id),
        )
        if str(self._get_param("isAscendingOrder")).lower() == "false":
            certificates.reverse()
        size = min(max(self._get_int_param("pageSize") or 250, 1), 250)
        start = int(self._get_param("marker") or 0)
        result = {"certificates": [c.to_dict() for c in certificates[start : start + size]]}
        if start + size < len(certificates):
            result["nextMarker"] = str(start + size)
        return moto.core.responses.ActionResult(result)

    moto.iot.responses.IoTResponse.list_certificates_by_ca = list_certificates_by_ca


def service_packages_listed_once() -> None:
    packages = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: packages


def certificates_looked_up_by_id() -> None:
    backend = moto.iot.models.IoTBackend
    original_get_principal = backend._get_principal

    def describe_certificate(self, certificate_id):
        certificate = self.certificates.get(certificate_id)
        if certificate is None or certificate.certificate_id != certificate_id:
            raise moto.iot.models.ResourceNotFoundException()
        return certificate

    def get_principal(self, principal_arn):
        if ":cert/" in principal_arn:
            certificate = self.certificates.get(principal_arn.split(":cert/", 1)[1])
            if certificate is not None and certificate.arn == principal_arn:
                return certificate
        return original_get_principal(self, principal_arn)

    backend.describe_certificate = describe_certificate
    backend._get_principal = get_principal


def things_looked_up_by_arn() -> None:
    backend = moto.iot.models.IoTBackend
    original_describe_thing = backend.describe_thing
    original_list_thing_principals = backend.list_thing_principals

    def thing_named(self, thing_name):
        partition = moto.iot.models.get_partition(self.region_name)
        arn = f"arn:{partition}:iot:{self.region_name}:{self.account_id}:thing/{thing_name}"
        thing = self.things.get(arn)
        if thing is not None and thing.thing_name == thing_name:
            return thing
        return None

    def describe_thing(self, thing_name):
        thing = thing_named(self, thing_name)
        return thing if thing is not None else original_describe_thing(self, thing_name)

    def list_thing_principals(self, thing_name):
        if thing_named(self, thing_name) is None:
            return original_list_thing_principals(self, thing_name)
        return [principal for principal, name in self.principal_things if name == thing_name]

    backend.describe_thing = describe_thing
    backend.list_thing_principals = list_thing_principals


def kms_sign_digest() -> None:
    import base64
    import json

    import moto.kms.exceptions
    import moto.kms.responses
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    original = moto.kms.responses.KmsResponse.sign
    hash_of = {
        "ECDSA_SHA_256": hashes.SHA256(),
        "ECDSA_SHA_384": hashes.SHA384(),
        "ECDSA_SHA_512": hashes.SHA512(),
    }

    def sign(self):
        algorithm = self._get_param("SigningAlgorithm")
        if self._get_param("MessageType") != "DIGEST" or algorithm not in hash_of:
            return original(self)
        key = self.kms_backend.describe_key(self._get_param("KeyId"))
        private = getattr(key.private_key, "private_key", None)
        if key.key_usage != "SIGN_VERIFY" or not isinstance(private, ec.EllipticCurvePrivateKey):
            return original(self)
        digest = self._get_param("Message")
        if isinstance(digest, str):
            digest = base64.b64decode(digest)
        chosen = hash_of[algorithm]
        if len(digest) != chosen.digest_size:
            raise moto.kms.exceptions.ValidationException(
                f"Digest is invalid length for algorithm {algorithm}."
            )
        signature = private.sign(digest, ec.ECDSA(utils.Prehashed(chosen)))
        return json.dumps(
            {
                "KeyId": key.arn,
                "Signature": base64.b64encode(signature).decode("ascii"),
                "SigningAlgorithm": algorithm,
            }
        )

    moto.kms.responses.KmsResponse.sign = sign


def fleet_provisioning() -> None:
    import json
    import time

    import moto.iot.exceptions

    responses = moto.iot.responses.IoTResponse

    def templates(backend) -> dict:
        return backend.__dict__.setdefault("_jitr_provisioning_templates", {})

    def template_arn(backend, name: str) -> str:
        return (
            f"arn:aws:iot:{backend.region_name}:{backend.account_id}:provisioningtemplate/{name}"
        )

    def create_provisioning_template(self):
        name = self._get_param("templateName")
        store = templates(self.iot_backend)
        arn = template_arn(self.iot_backend, name)
        if name in store:
            raise moto.iot.exceptions.ResourceAlreadyExistsException(
                f"Template {name} already exists", name, arn
            )
        store[name] = {
            "templateName": name,
            "templateArn": arn,
            "templateBody": self._get_param("templateBody"),
            "enabled": bool(self._get_param("enabled")),
            "provisioningRoleArn": self._get_param("provisioningRoleArn"),
            "preProvisioningHook": self._get_param("preProvisioningHook"),
            "defaultVersionId": 1,
        }
        return json.dumps({"templateArn": arn, "templateName": name, "defaultVersionId": 1})

    def describe_provisioning_template(self):
        name = self._get_param("templateName")
        template = templates(self.iot_backend).get(name)
        if template is None:
            raise moto.iot.exceptions.ResourceNotFoundException(f"Template {name} not found")
        return json.dumps({k: v for k, v in template.items() if v is not None})

    def delete_provisioning_template(self):
        name = self._get_param("templateName")
        if templates(self.iot_backend).pop(name, None) is None:
            raise moto.iot.exceptions.ResourceNotFoundException(f"Template {name} not found")
        return json.dumps({})

    def create_provisioning_claim(self):
        name = self._get_param("templateName")
        if name not in templates(self.iot_backend):
            raise moto.iot.exceptions.ResourceNotFoundException(f"Template {name} not found")
        certificate, key_pair = self.iot_backend.create_keys_and_certificate(set_as_active=True)
        return json.dumps(
            {
                "certificateId": certificate.certificate_id,
                "certificatePem": certificate.certificate_pem,
                "keyPair": key_pair,
                "expiration": int(time.time()) + 300,
            }
        )

    responses.create_provisioning_template = create_provisioning_template
    responses.describe_provisioning_template = describe_provisioning_template
    responses.delete_provisioning_template = delete_provisioning_template
    responses.create_provisioning_claim = create_provisioning_claim


def plain_request_log() -> None:
    def log_request(self, code="-", size="-"):
        code = getattr(code, "value", code)
        # The path as werkzeug logs it: percent-escapes decoded (`iot:Data-ATS`, not `%3A`).
        try:
            request = f"{self.command} {uri_to_iri(self.path)} {self.request_version}"
        except AttributeError:  # a request line that could not be parsed
            request = self.requestline
        line = f'{self.address_string()} "{request}" {code}\n'
        # One write(2) of a short line: whole, without a lock, among the request threads.
        os.write(2, line.encode("utf-8", "replace"))

    werkzeug.serving.WSGIRequestHandler.log_request = log_request


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: launch_moto.py PORT")
    port = int(sys.argv[1])
    use_der_certificate_ids()
    describe_certificate_with_ca_id()
    aws_shaped_registration_codes()
    certificates_by_ca_paged()
    service_packages_listed_once()
    certificates_looked_up_by_id()
    things_looked_up_by_arn()
    kms_sign_digest()
    fleet_provisioning()
    plain_request_log()
    moto.server.main(["--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    main()
