"""Start a moto server on 127.0.0.1 with the fidelity fixes jitr's tests rely on.

Usage: python3 launch_moto.py PORT

Fixes applied before the server starts (moto 5.x):
  1. Certificate ids are the SHA-256 of the certificate DER, as in AWS IoT
     (moto's default hashes the PEM text instead).
  2. DescribeCertificate answers with `caCertificateId` when the certificate was
     registered with a CA (moto keeps the field but leaves it out of the description).
  3. GetRegistrationCode answers 64 hex digits like AWS IoT (moto returns a UUID with
     hyphens, which is not a valid certificate CN for the verification certificate).
"""

import secrets
import sys

import moto.core.config
import moto.iot.models
import moto.server


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


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: launch_moto.py PORT")
    port = int(sys.argv[1])
    use_der_certificate_ids()
    describe_certificate_with_ca_id()
    aws_shaped_registration_codes()
    moto.server.main(["--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    main()
