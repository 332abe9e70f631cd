#!/usr/bin/env python3
"""Baseline for the issuance benchmark: the same work as `jitr issue`, done the way a
typical provisioning script does it with Python `cryptography` (one process).

Per device: P-256 key, certificate with the jitr device profile signed by the CA,
devices/<id>/{device.key (0600), device.crt, chain.pem}, one manifest JSON line. With a fifth
argument `bundle`, no folders: one JSON line per device in OUT/bundle.jsonl (0600) instead,
with the fields `jitr issue --bundle` writes.
Prints {"devices": N, "seconds": S} on stdout.
"""
import datetime
import hashlib
import json
import os
import secrets
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def main() -> None:
    ca_cert_path, ca_key_path, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    bundle_mode = len(sys.argv) > 5 and sys.argv[5] == "bundle"
    with open(ca_cert_path, "rb") as f:
        ca_pem = f.read()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    with open(ca_key_path, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    bundle = None
    if bundle_mode:
        fd = os.open(os.path.join(out, "bundle.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        bundle = os.fdopen(fd, "w")
    with open(os.path.join(out, "manifest.jsonl"), "a") as manifest:
        for n in range(count):
            device_id = f"{n:032x}"
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
            serial = int.from_bytes(secrets.token_bytes(16), "big") >> 1 | (1 << 126)
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(days=3652))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(aki, critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if bundle is not None:
                bundle.write(
                    json.dumps(
                        {
                            "id": device_id,
                            "certificate_id": hashlib.sha256(der).hexdigest(),
                            "serial": format(serial, "x"),
                            "not_after": cert.not_valid_after_utc.isoformat(),
                            "chain_pem": (cert_pem + ca_pem).decode(),
                            "key_pem": key_pem.decode(),
                        }
                    )
                    + "\n"
                )
            else:
                d = os.path.join(out, device_id)
                os.makedirs(d, exist_ok=True)
                fd = os.open(os.path.join(d, "device.key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key_pem)
                with open(os.path.join(d, "device.crt"), "wb") as f:
                    f.write(cert_pem)
                with open(os.path.join(d, "chain.pem"), "wb") as f:
                    f.write(cert_pem + ca_pem)
            manifest.write(
                json.dumps(
                    {
                        "id": device_id,
                        "serial": format(serial, "x"),
                        "not_before": cert.not_valid_before_utc.isoformat(),
                        "not_after": cert.not_valid_after_utc.isoformat(),
                        "certificate_id": hashlib.sha256(der).hexdigest(),
                    }
                )
                + "\n"
            )
    if bundle is not None:
        bundle.close()
    print(json.dumps({"devices": count, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
